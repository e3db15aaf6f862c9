/**
 * Every MigrationError says which failure it is in `reason` (its `code` stays
 * `MIGRATION_ERROR`), so callers branch without parsing messages.
 */

import assert from "node:assert/strict";
import { MigrationError, type MigrationErrorReason } from "../../src/errors.ts";
import { DatabaseManager } from "../../src/manager.ts";
import { createSharedPool, type Pool } from "../../src/pool/pool.ts";
import { Migrator, type MigratorOptions } from "../../src/migrate/migrator.ts";
import { holdTableLock, serverTest, TEST_URL } from "../_support/server.ts";

/** A pool and a fresh schema, dropped and closed afterwards. */
async function withSchema(
  fn: (ctx: { pool: Pool; db: DatabaseManager; schema: string }) => Promise<void>,
): Promise<void> {
  const pool = await createSharedPool({
    connectionString: TEST_URL,
    maxConnections: 4,
    minConnections: 1,
  });
  const schema = `pgdbm_reason_${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
  const db = new DatabaseManager({ pool, schema });
  try {
    await fn({ pool, db, schema });
  } finally {
    try {
      await db.execute(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    } finally {
      await pool.close();
    }
  }
}

/** Asserts that `promise` rejects with a MigrationError of `reason`, and returns it. */
async function rejectsWith(
  promise: Promise<unknown>,
  reason: MigrationErrorReason,
): Promise<MigrationError> {
  let caught: unknown;
  try {
    await promise;
  } catch (error) {
    caught = error;
  }
  assert.ok(caught instanceof MigrationError, `expected a MigrationError, got ${caught}`);
  assert.equal(caught.reason, reason, caught.message);
  assert.equal(caught.code, "MIGRATION_ERROR");
  return caught;
}

function migrator(
  db: DatabaseManager,
  migrations: Record<string, string>,
  options: Partial<MigratorOptions> = {},
): Migrator {
  return new Migrator(db, { migrations, moduleName: "reasons", ...options });
}

serverTest("MigrationError.reason is 'drift' when an applied file changed", async () => {
  await withSchema(async ({ db, schema }) => {
    await migrator(db, { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" }).applyPending();
    const changed = migrator(db, {
      "001_a.sql": "CREATE TABLE {{tables.a}} (id bigint);",
      "002_b.sql": "CREATE TABLE {{tables.b}} (id int);",
    });
    const error = await rejectsWith(changed.applyPending(), "drift");
    assert.equal(error.filename, "001_a.sql");
    assert.equal(error.module, "reasons");
    assert.equal(error.schema, schema);
    await rejectsWith(changed.getPending(), "drift");
    // With lock: "transaction" the file's row is checked in the migration's transaction.
    const inTransactions = migrator(db, {
      "001_a.sql": "CREATE TABLE {{tables.a}} (id bigint);",
    }, { lock: "transaction" });
    await rejectsWith(
      inTransactions.applyMigration((await changed.findMigrationFiles())[0]),
      "drift",
    );
  });
});

serverTest(
  "MigrationError.reason is 'lock_timeout' when another migrator holds the lock too long",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const holder = await db.acquire(async (conn) => {
        await conn.execute("SELECT pg_advisory_lock(hashtext($1), hashtext($2))", [
          "pgdbm_migration_reasons",
          schema,
        ]);
        try {
          for (const lock of ["session", "transaction"] as const) {
            const m = migrator(db, { "001_a.sql": "SELECT 1;" }, {
              lock,
              lockWaitTimeoutMs: 100,
              lockPollMaxMs: 20,
            });
            const error = await rejectsWith(m.applyPending(), "lock_timeout");
            assert.match(error.message, /lockWaitTimeoutMs/);
          }
        } finally {
          await conn.execute("SELECT pg_advisory_unlock(hashtext($1), hashtext($2))", [
            "pgdbm_migration_reasons",
            schema,
          ]);
        }
        return true;
      });
      assert.equal(holder, true);
    });
  },
);

serverTest("MigrationError.reason is 'empty_file' for a file with no statement", async () => {
  await withSchema(async ({ db }) => {
    for (const content of ["", "-- TODO: write the migration\n", "BEGIN;\nCOMMIT;\n"]) {
      const m = migrator(db, { "001_a.sql": "SELECT 1;", "002_todo.sql": content });
      const error = await rejectsWith(m.applyPending(), "empty_file");
      assert.equal(error.filename, "002_todo.sql");
      assert.equal(error.module, "reasons");
    }
  });
});

serverTest(
  "MigrationError.reason is 'statement_failed' for a failing statement, with a typed partialResult",
  async () => {
    await withSchema(async ({ db }) => {
      const m = migrator(db, {
        "001_ok.sql": "CREATE TABLE {{tables.ok}} (id int);",
        "002_bad.sql": "CREATE TABLE {{tables.bad}} (id int);\nSELEC 1;\n",
      });
      const error = await rejectsWith(m.applyPending(), "statement_failed");
      assert.equal(error.filename, "002_bad.sql");
      assert.equal(error.line, 2);
      const partial = error.partialResult;
      assert.equal(partial?.status, "failed");
      assert.deepEqual(partial?.applied.map((a) => a.filename), ["001_ok.sql"]);
      assert.equal(partial?.failure?.filename, "002_bad.sql");
      assert.equal(partial?.failure?.sqlstate, "42601");
    });
  },
);

serverTest(
  "MigrationError.reason is 'retries_exhausted' when a statement keeps timing out on a lock",
  async () => {
    await withSchema(async ({ db, pool, schema }) => {
      await db.execute(`CREATE SCHEMA "${schema}"`);
      await db.execute("CREATE TABLE {{tables.busy}} (id int)");
      const lock = await holdTableLock(new DatabaseManager({ pool, schema }), "busy");
      try {
        const m = migrator(db, { "001_alter.sql": "ALTER TABLE {{tables.busy}} ADD x int;" }, {
          lockTimeoutMs: 50,
          lockRetries: 1,
          lockRetryDelayMs: 10,
        });
        const error = await rejectsWith(m.applyPending(), "retries_exhausted");
        assert.equal(error.partialResult?.failure?.sqlstate, "55P03");
        assert.match(error.message, /after 2 attempts/);
      } finally {
        await lock.release();
      }
    });
  },
);

serverTest("MigrationError.reason is 'aborted' when the run's signal aborts", async () => {
  await withSchema(async ({ db }) => {
    const controller = new AbortController();
    controller.abort(new Error("SIGTERM"));
    const m = migrator(db, { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" });
    const error = await rejectsWith(m.applyPending({ signal: controller.signal }), "aborted");
    assert.equal(error.cause, controller.signal.reason);
    assert.equal(error.partialResult?.failure?.aborted, true);
    assert.equal(error.partialResult?.status, "failed");
  });
});

serverTest(
  "MigrationError.reason says which file or lock rule refused the run",
  async () => {
    await withSchema(async ({ db }) => {
      await rejectsWith(
        migrator(db, { "001_a.sql": "SELECT 1;", "1_b.sql": "SELECT 2;" }).applyPending(),
        "duplicate_version",
      );
      await rejectsWith(
        migrator(db, { "a.sql": "SELECT 1;" }).findMigrationFiles(),
        "invalid_filename",
      );
      await rejectsWith(
        migrator(db, { "001_a.sql": "SELECT 1;\nCOMMIT;\n" }).applyPending(),
        "transaction_control_refused",
      );
      await rejectsWith(
        migrator(db, { "001_a.sql": "\\connect other\nSELECT 1;\n" }).applyPending(),
        "psql_command_refused",
      );
      const noTx = "-- pgdbm:no-transaction\nCREATE TABLE {{tables.n}} (id int);\n";
      await rejectsWith(
        migrator(db, { "001_n.sql": noTx }, { lock: "transaction" }).applyPending(),
        "no_transaction_refused",
      );
      const m = migrator(db, { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" });
      const [file] = await m.findMigrationFiles();
      await m.applyMigration(file);
      await rejectsWith(m.applyMigration(file), "already_applied");
      await rejectsWith(m.createMigration("next", "SELECT 1;"), "write_failed");
      await rejectsWith(
        new Migrator(db, {
          migrationsPath: `/nonexistent-${crypto.randomUUID()}`,
          moduleName: "reasons",
        }).findMigrationFiles(),
        "missing_file",
      );
    });
  },
);
