/**
 * How a user tests a service with `@pgdbm/pgdbm/testing`: each test gets a database
 * cloned from a template migrated once (or, with no PGDBM_TEST_URL/DATABASE_URL, a schema
 * of its own on the process's one in-memory PGlite engine), fixtures loaded as plain
 * objects, tables compared with snapshots. The repository is built from the test's
 * manager, which reaches the test's database on both engines.
 *
 *   PGDBM_TEST_URL=postgres://postgres@127.0.0.1:5432/test deno test -A examples/notes_service_test.ts
 *
 * A user's own tests leave the target out and let the helpers choose from the environment.
 * Here, as part of this repository's suite, they follow the suite's one rule
 * (tests/_support/server.ts): the test server (PGDBM_TEST_URL, else DATABASE_URL, else
 * the default local server `deno task test` uses) when it answers, the embedded PGlite only
 * when none does; so `deno task test` never runs them on PGlite beside a running server.
 */
import assert from "node:assert/strict";
import {
  assertTableUnchanged,
  countRows,
  loadFixtures,
  snapshotTable,
  type TestDatabaseOptions,
  withTestDatabase,
} from "../src/testing/mod.ts";
import { NOTES_MIGRATIONS, NOTES_MODULE, NotesRepository } from "./notes_service.ts";
import { targetTest, TEST_TARGET } from "../tests/_support/server.ts";

const options: TestDatabaseOptions = {
  ...TEST_TARGET,
  migrations: { moduleName: NOTES_MODULE, migrationsPath: NOTES_MIGRATIONS, schema: "notes" },
};

const fixtures = {
  notes: [
    { id: 1, author_id: 1, body: "Buy milk" },
    { id: 2, author_id: 1, body: "Call the plumber" },
    { id: 3, author_id: 2, body: "Milk the cows" },
  ],
  authors: [{ id: 1, name: "ann" }, { id: 2, name: "bob" }],
};

targetTest("NotesRepository.add() stores a note and creates its author once", async () => {
  await withTestDatabase(async (db) => {
    const notes = new NotesRepository(db);
    const first = await notes.add("ann", "hello");
    const second = await notes.add("ann", "again");
    assert.ok(second > first);
    assert.equal(await countRows(db, "authors"), 1);
    assert.deepEqual((await notes.byAuthor("ann")).map((n) => n.body), ["again", "hello"]);
  }, options);
});

targetTest("NotesRepository.add() refuses an empty body and changes nothing", async () => {
  await withTestDatabase(async (db) => {
    await loadFixtures(db, fixtures);
    const before = await snapshotTable(db, "notes");
    await assert.rejects(new NotesRepository(db).add("ann", "  "), RangeError);
    await assertTableUnchanged(db, "notes", before);
  }, options);
});

targetTest("NotesRepository.pin() puts a note first in its author's list", async () => {
  await withTestDatabase(async (db) => {
    await loadFixtures(db, fixtures);
    const notes = new NotesRepository(db);
    assert.equal(await notes.pin(1), true);
    assert.equal(await notes.pin(99), false);
    assert.deepEqual((await notes.byAuthor("ann")).map((n) => n.id), [1, 2]);
    assert.equal(await countRows(db, "notes", "pinned"), 1);
  }, options);
});

targetTest("NotesRepository.search() matches words case-insensitively, literally", async () => {
  await withTestDatabase(async (db) => {
    await loadFixtures(db, fixtures);
    const notes = new NotesRepository(db);
    assert.deepEqual(await notes.search("milk"), [1, 3]);
    assert.deepEqual(await notes.search("%"), []);
    const id = await notes.add("bob", "100% done");
    assert.deepEqual(await notes.search("%"), [id], "ids continue after the fixtures");
  }, options);
});
