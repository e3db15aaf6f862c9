/**
 * The test helpers on the embedded PostgreSQL (PGlite): one engine per process, a schema of
 * its own per test database, and what a test hands to the code under test (`db`, `pool`,
 * `url`) reaching the same database as the fixtures on both engines. These run on PGlite
 * whatever the environment; the server halves run when the test server answers.
 */
import assert from "node:assert/strict";
import { AssertionError } from "node:assert";
import { DatabaseManager, type Pool } from "../../mod.ts";
import {
  assertTableUnchanged,
  createTestDatabase,
  loadFixtures,
  snapshotTable,
  type TestDatabase,
  withTestDatabase,
  withTestSchema,
} from "../../src/testing/mod.ts";
import { serverTest, TEST_URL } from "../_support/server.ts";

const NOTES = {
  moduleName: "notes",
  schema: "notes",
  migrations: {
    "001_notes.sql": "CREATE TABLE {{tables.notes}} (id serial PRIMARY KEY, body text NOT NULL);",
    "002_tags.sql":
      "CREATE TABLE {{tables.tags}} (note_id int REFERENCES {{tables.notes}} (id), tag text);",
  },
};

/** An app as a user builds it: from a pool and a schema, never from the test's manager. */
function notesApp(pool: Pool, schema: string | undefined) {
  const db = new DatabaseManager({ pool, schema });
  return {
    body: (id: number) =>
      db.fetchValue<string>("SELECT body FROM {{tables.notes}} WHERE id = $1", [id]),
  };
}

/** Loads a note through `test.db`, then checks an app built from `test.pool` sees it. */
async function appSeesFixtures(test: TestDatabase): Promise<void> {
  await loadFixtures(test.db, { notes: [{ id: 7, body: "seen by the app" }] });
  assert.equal(await notesApp(test.pool, test.db.schema).body(7), "seen by the app");
}

async function schemaCount(db: DatabaseManager, schema: string): Promise<number> {
  return (await db.fetchValue<number>(
    "SELECT count(*)::int FROM pg_namespace WHERE nspname = $1",
    [schema],
  ))!;
}

Deno.test("createTestDatabase() on PGlite gives the app a pool that sees the fixtures, and no URL", async () => {
  await using test = await createTestDatabase({ embedded: true, migrations: NOTES });
  assert.equal(test.embedded, true);
  assert.equal(test.url, null, "no URL reaches the embedded engine's database");
  assert.equal(test.db.pool, test.pool);
  await appSeesFixtures(test);
});

serverTest(
  "createTestDatabase() on a server gives a pool and a URL that see the fixtures",
  async () => {
    await using test = await createTestDatabase({ url: TEST_URL, migrations: NOTES });
    assert.equal(test.db.pool, test.pool);
    await appSeesFixtures(test);
    await using fromUrl = new DatabaseManager({
      connectionString: test.url!,
      schema: "notes",
      logger: { warn() {} }, // a second pool to the database is what this test means
    });
    await fromUrl.connect();
    assert.equal(
      await fromUrl.fetchValue("SELECT body FROM {{tables.notes}} WHERE id = 7"),
      "seen by the app",
    );
  },
);

Deno.test("Embedded test databases share one engine per process, each in a schema of its own", async () => {
  const tests = await Promise.all(
    [1, 2, 3].map(() => createTestDatabase({ embedded: true, migrations: NOTES })),
  );
  const [a, b, c] = tests;
  try {
    assert.equal(a.pool, b.pool, "one engine for the process");
    assert.equal(b.pool, c.pool);
    assert.equal(new Set(tests.map((t) => t.db.schema)).size, 3);
    for (const test of tests) {
      assert.equal(test.db.schema, test.name);
      assert.equal(await test.db.tableExists("tags"), true, "migrated into its own schema");
    }
    await loadFixtures(a.db, { notes: [{ id: 1, body: "only in a" }] });
    await a.db.execute("CREATE TABLE {{tables.extra}} (id int)");
    assert.equal(await b.db.fetchValue("SELECT count(*)::int FROM {{tables.notes}}"), 0);
    assert.equal(await b.db.tableExists("extra"), false, "a's tables are invisible to b");
    assert.equal(await schemaCount(b.db, "notes"), 0, "nothing lands in the named schema");
    await a.drop();
    assert.equal(await schemaCount(b.db, a.name), 0, "dropping a test database drops its schema");
    assert.equal(b.pool.closed, false, "the engine stays open for the next test");
    await appSeesFixtures(b);
  } finally {
    for (const test of tests) await test.drop();
  }
});

/** A module whose migration makes an enum with `labels` and a domain over int. */
function moodsModule(labels: readonly string[]) {
  const list = labels.map((label) => `'${label.replaceAll("'", "''")}'`).join(", ");
  return {
    moduleName: "moods",
    schema: "moods",
    migrations: {
      "001_moods.sql": `CREATE TYPE {{tables.mood}} AS ENUM (${list});
        CREATE DOMAIN {{tables.score}} AS int CHECK (VALUE >= 0);
        CREATE TABLE {{tables.feelings}} (id int, moods {{tables.mood}}[], scores {{tables.score}}[]);`,
    },
  };
}

Deno.test("Embedded test databases bind and read arrays of the enums and domains they make", async () => {
  // The engine is shared: each test database's types are made after it started, and two
  // schemas' types of the same name are different types.
  await using a = await createTestDatabase({
    embedded: true,
    migrations: moodsModule(["happy", 'it\'s, "odd"', "NULL"]),
  });
  const aMoods = ["happy", null, 'it\'s, "odd"', "NULL"];
  await a.db.execute("INSERT INTO {{tables.feelings}} VALUES (1, $1, $2)", [aMoods, [3, null]]);
  assert.deepEqual(
    await a.db.fetchOne("SELECT moods, scores FROM {{tables.feelings}}"),
    { moods: aMoods, scores: [3, null] },
  );
  await using b = await createTestDatabase({
    embedded: true,
    migrations: moodsModule(["calm", "back\\slash", "{x}"]),
  });
  assert.equal(a.pool, b.pool, "one engine");
  const bMoods = ["{x}", "back\\slash", null, "calm"];
  await b.db.execute("INSERT INTO {{tables.feelings}} VALUES (1, $1, $2)", [bMoods, [[1], [2]]]);
  assert.deepEqual(
    await b.db.fetchOne("SELECT moods, scores FROM {{tables.feelings}}"),
    { moods: bMoods, scores: [[1], [2]] },
  );
  assert.deepEqual(
    await a.db.fetchValue("SELECT $1::{{tables.mood}}[]", [["NULL", "happy"]]),
    ["NULL", "happy"],
  );
  await b.db.execute("CREATE TYPE {{tables.later}} AS ENUM ('x', 'y')");
  assert.deepEqual(await b.db.fetchValue("SELECT '{y,x,NULL}'::{{tables.later}}[]"), [
    "y",
    "x",
    null,
  ]);
});

Deno.test("withTestDatabase() on PGlite drops its schema when the body throws", async () => {
  let name = "";
  let pool: Pool | undefined;
  await assert.rejects(
    withTestDatabase(async (db, test) => {
      name = test.name;
      pool = test.pool;
      await db.execute("CREATE TABLE {{tables.t}} (id int)");
      throw new Error("test body failed");
    }, { embedded: true }),
    { message: "test body failed" },
  );
  assert.equal(await schemaCount(new DatabaseManager({ pool: pool! }), name), 0);
});

Deno.test("withTestSchema() on PGlite runs on the process's engine and leaves it open", async () => {
  await using test = await createTestDatabase({ embedded: true });
  const schema = await withTestSchema(async (db, context) => {
    assert.equal(context.embedded, true);
    assert.equal(context.pool, test.pool, "the shared engine, not a second one");
    await db.execute("CREATE TABLE {{tables.x}} (id int)");
    return context.schema;
  }, { embedded: true });
  assert.equal(test.pool.closed, false);
  assert.equal(await schemaCount(test.db, schema), 0);
});

serverTest(
  "withTestSchema() tells a server pool it was given from PGlite by asking it",
  async () => {
    await using test = await createTestDatabase({ url: TEST_URL });
    await withTestSchema((_db, context) => {
      assert.equal(context.embedded, false);
      return Promise.resolve();
    }, { pool: test.pool });
  },
);

Deno.test("createTestDatabase() without a configured server runs on the embedded PostgreSQL", async (t) => {
  const saved = ["PGDBM_TEST_URL", "DATABASE_URL"].map((name) => [name, Deno.env.get(name)]);
  for (const [name] of saved) Deno.env.delete(name!);
  let test;
  try {
    test = await createTestDatabase({ migrations: NOTES });
  } finally {
    for (const [name, value] of saved) if (value !== undefined) Deno.env.set(name!, value);
  }
  try {
    assert.equal(test.embedded, true);
    assert.equal(test.fromTemplate, false);

    await t.step("migrations, fixtures and snapshots work on it", async () => {
      assert.equal(await test.db.tableExists("tags"), true);
      await loadFixtures(test.db, {
        tags: [{ note_id: 1, tag: "x" }],
        notes: [{ id: 1, body: "hello" }],
      });
      const snapshot = await snapshotTable(test.db, "notes");
      await assertTableUnchanged(test.db, "notes", snapshot);
      await test.db.execute("UPDATE {{tables.notes}} SET body = 'bye'");
      await assert.rejects(assertTableUnchanged(test.db, "notes", snapshot), AssertionError);
    });
  } finally {
    await test.drop();
  }
});

Deno.test("createTestDatabase({ config }) on PGlite starts an engine of its own and closes it", async () => {
  await using shared = await createTestDatabase({ embedded: true });
  const test = await createTestDatabase({
    embedded: true,
    migrations: NOTES,
    config: { maxConnections: 1 },
  });
  try {
    assert.notEqual(test.pool, shared.pool);
    assert.equal(test.url, null);
    assert.equal(test.db.schema, "notes", "a private engine keeps the schema names");
    await appSeesFixtures(test);
  } finally {
    await test.drop();
  }
  assert.equal(test.pool.closed, true);
  assert.equal(shared.pool.closed, false);
});

Deno.test("The example's tests run on PGlite, saying so, when PGDBM_TEST_URL names a server that is down", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  const env: Record<string, string> = {
    PGDBM_TEST_URL: `postgres://postgres@127.0.0.1:${port}/test`,
    PGDBM_REQUIRE_SERVER: "",
    NO_COLOR: "1",
  };
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["test", "-A", new URL("../../examples/notes_service_test.ts", import.meta.url).pathname],
    env,
    clearEnv: false,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(output.stdout) + new TextDecoder().decode(output.stderr);
  assert.equal(output.code, 0, text);
  assert.match(text, /SKIPPED server tests: no PostgreSQL answers at PGDBM_TEST_URL/);
  assert.match(text, /ok \| 4 passed \| 0 failed/);
  assert.equal(
    text.match(/\(on embedded PGlite: no server at PGDBM_TEST_URL\) \.\.\. ok/g)?.length,
    4,
  );
});
