/**
 * Migration files as real projects have them (pg_dump output, files written for Python
 * pgdbm), applied through the Migrator against the test server in fresh databases.
 */
import assert from "node:assert/strict";
import { DatabaseManager } from "../src/manager.ts";
import { Migrator } from "../src/migrate.ts";
import { createSharedPool, type Pool } from "../src/pool.ts";
import { createTestDatabase } from "../src/testing.ts";
import { serverTest, TEST_URL } from "./_server.ts";

interface FreshDb {
  url: string;
  pool: Pool;
  /** A manager without a schema. */
  db: DatabaseManager;
}

/** A fresh database and a one-connection pool on it (so every call sees one session). */
async function withDatabase(fn: (fresh: FreshDb) => Promise<void>): Promise<void> {
  await using test = await createTestDatabase({ url: TEST_URL });
  const pool = await createSharedPool({ connectionString: test.url, maxConnections: 1 });
  try {
    await fn({ url: test.url, pool, db: new DatabaseManager({ pool }) });
  } finally {
    await pool.close();
  }
}

/** What `pg_dump` puts at the top of every file, search_path included. */
const DUMP_HEADER = [
  "SET statement_timeout = 0;",
  "SET lock_timeout = 0;",
  "SET client_encoding = 'UTF8';",
  "SET standard_conforming_strings = on;",
  "SELECT pg_catalog.set_config('search_path', '', false);",
  "SET check_function_bodies = false;",
  "SET client_min_messages = warning;",
  "SET row_security = off;",
  "",
].join("\n");

serverTest(
  "Migrator applies pg_dump files under a manager without a schema, in both modes",
  async () => {
    await withDatabase(async ({ db }) => {
      const before = await db.fetchValue<string>("SHOW search_path");
      const migrator = new Migrator(db, {
        migrations: {
          "001_dump.sql": DUMP_HEADER + "CREATE TABLE public.dumped (id integer);\n",
          "002_dump.sql": "-- pgdbm:no-transaction\n" + DUMP_HEADER +
            "CREATE TABLE public.dumped_too (id integer);\n",
          // Runs after the dumps: their search_path '' must not reach it.
          "003_plain.sql": "CREATE TABLE plain (id integer);",
        },
        moduleName: "dump",
      });
      const result = await migrator.applyPending();
      assert.deepEqual(result.applied.map((m) => m.filename), [
        "001_dump.sql",
        "002_dump.sql",
        "003_plain.sql",
      ]);
      assert.equal(await db.tableExists("public.plain"), true);
      assert.deepEqual(
        (await db.fetchAll<{ filename: string }>(
          "SELECT filename FROM public.schema_migrations ORDER BY id",
        )).map((r) => r.filename),
        ["001_dump.sql", "002_dump.sql", "003_plain.sql"],
      );
      assert.equal((await migrator.applyPending()).status, "up_to_date");
      // The session the files ran on is as it was (the pool has one connection).
      assert.equal(await db.fetchValue("SHOW search_path"), before);
      assert.equal(await db.fetchValue("SHOW client_min_messages"), "notice");
    });
  },
);

for (const lock of ["session", "transaction"] as const) {
  serverTest(
    `Migrator's own SQL does not depend on a search_path a file left behind (lock: ${lock})`,
    async () => {
      await withDatabase(async ({ db }) => {
        // A file that points search_path at a schema with a look-alike history table.
        const migrator = new Migrator(db, {
          migrations: {
            "001_decoy.sql": [
              "CREATE SCHEMA decoy;",
              "CREATE TABLE decoy.schema_migrations (id int);",
              "SET search_path = decoy;",
            ].join("\n"),
            "002_next.sql": "CREATE TABLE next (id int);",
          },
          moduleName: "m",
          lock,
        });
        const result = await migrator.applyPending();
        assert.equal(result.applied.length, 2);
        assert.equal(await db.fetchValue("SELECT count(*)::int FROM public.schema_migrations"), 2);
        assert.equal(await db.fetchValue("SELECT count(*)::int FROM decoy.schema_migrations"), 0);
        assert.equal((await migrator.getApplied()).length, 2);
        // The file's search_path ended with it: the next file's table is in public.
        assert.equal(await db.tableExists("public.next"), true);
        assert.equal(await db.fetchValue("SHOW search_path"), '"$user", public');
      });
    },
  );
}
