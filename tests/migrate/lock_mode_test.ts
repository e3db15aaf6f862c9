/**
 * `Migrator` with `lock: "transaction"` against the server directly: each migration's
 * transaction takes the (schema, module) transaction lock, skips a file another process
 * applied meanwhile, refuses no-transaction files and drift; and the `lock` setting of
 * `migrateSchemas` and of `pgdbm.json`. The same through PgBouncer:
 * tests/migrate/pgbouncer_test.ts.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import postgres from "postgres";
import { ConfigurationError, MigrationError } from "../../src/errors.ts";
import { DatabaseManager } from "../../src/manager.ts";
import { type MigrationEvent, Migrator, type MigratorOptions } from "../../src/migrate/migrator.ts";
import { migrateSchemas } from "../../src/migrate/fleet.ts";
import { migrationChecksum } from "../../src/migrate/_files.ts";
import { loadConfig } from "../../src/cli/_config.ts";
import { UsageError } from "../../src/cli/_args.ts";
import { main } from "../../src/cli/mod.ts";
import { createSharedPool, type Pool } from "../../src/pool/pool.ts";
import { RACE_FILES } from "../_support/race_migrations.ts";
import { holdTableLock, observe, serverTest, TEST_URL, uniqueName } from "../_support/server.ts";

interface Ctx {
  pool: Pool;
  db: DatabaseManager;
  schema: string;
}

/** A pool, a manager over a fresh schema, and the schema dropped afterwards. */
async function withSchema(fn: (ctx: Ctx) => Promise<void>, maxConnections = 4): Promise<void> {
  const pool = await createSharedPool({ connectionString: TEST_URL, maxConnections });
  const schema = uniqueName("pgdbm_lockmode");
  try {
    await fn({ pool, db: new DatabaseManager({ pool, schema }), schema });
  } finally {
    try {
      await observe((sql) => sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`));
    } finally {
      await pool.close();
    }
  }
}

/** The history rows' file names, in the order they were written. */
async function historyOf(db: DatabaseManager): Promise<string[]> {
  const rows = await db.fetchAll<{ filename: string }>(
    "SELECT filename FROM {{tables.schema_migrations}} ORDER BY id",
  );
  return rows.map((r) => r.filename);
}

/** How many times each migration's side effect ran. */
async function logCounts(db: DatabaseManager): Promise<Record<string, number>> {
  const rows = await db.fetchAll<{ filename: string; n: number }>(
    "SELECT filename, count(*)::int AS n FROM {{tables.applied_log}} GROUP BY filename",
  );
  return Object.fromEntries(rows.map((r) => [r.filename, r.n]));
}

/** Holds the documented (schema, module) lock on a connection of its own until released. */
async function holdLock(module: string, schema: string) {
  const sql = postgres(TEST_URL, { max: 1, onnotice: () => {} });
  await sql`SELECT pg_advisory_lock(hashtext(${"pgdbm_migration_" + module}), hashtext(${schema}))`;
  return {
    async release(): Promise<void> {
      await sql.end({ timeout: 1 });
    },
  };
}

async function until(what: string, check: () => boolean): Promise<void> {
  const deadline = performance.now() + 10_000;
  while (!check()) {
    if (performance.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

serverTest(
  "Migrator lock: 'transaction': racing migrators on separate pools apply each migration once",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const pools = await Promise.all(
        Array.from({ length: 6 }, () => createSharedPool({ connectionString: TEST_URL })),
      );
      try {
        const runs = await Promise.all(
          pools.map((pool) =>
            new Migrator(new DatabaseManager({ pool, schema }), {
              migrations: RACE_FILES,
              moduleName: "race",
              lock: "transaction",
              lockPollMaxMs: 50,
            }).applyPending()
          ),
        );
        const files = Object.keys(RACE_FILES);
        const applied = runs.flatMap((r) => r.applied.map((m) => m.filename)).sort();
        assert.deepEqual(applied, files, "every file applied by exactly one racer");
        for (const run of runs) {
          assert.ok(run.status === "success" || run.status === "up_to_date", run.status);
          const seen = [...run.skipped, ...run.applied.map((m) => m.filename)].sort();
          assert.deepEqual(seen, files, "each racer applied or skipped every file");
          assert.equal(run.total, files.length);
        }
        assert.deepEqual(await historyOf(db), files, "history rows in version order");
        assert.deepEqual(
          await logCounts(db),
          Object.fromEntries(files.map((f) => [f, 1])),
          "each side effect ran once",
        );
        assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 2);
      } finally {
        await Promise.all(pools.map((pool) => pool.close()));
      }
    });
  },
);

serverTest(
  "Migrator lock: 'transaction' skips a file another process applied while it waited",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const events: MigrationEvent[] = [];
      const migrations = {
        "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
        "002_b.sql": "CREATE TABLE {{tables.b}} (id int);",
      };
      const migrator = new Migrator(db, {
        migrations,
        moduleName: "skip",
        lock: "transaction",
        lockPollMaxMs: 20,
        onEvent: (e) => events.push(e),
      });
      const holder = await holdLock("skip", schema);
      let run: Promise<unknown> | undefined;
      try {
        run = migrator.applyPending();
        run.catch(() => {});
        await until(
          "the migrator to wait for the lock",
          () => events.some((e) => e.type === "lock_wait"),
        );
        // The "other process", holding the lock: applies 001 and records it.
        await db.execute("CREATE TABLE {{tables.a}} (id int, by_other boolean DEFAULT true)");
        await db.execute(
          "INSERT INTO {{tables.schema_migrations}} (filename, checksum, module_name) " +
            "VALUES ($1, $2, $3)",
          ["001_a.sql", await migrationChecksum(migrations["001_a.sql"]), "skip"],
        );
      } finally {
        await holder.release();
      }
      const result = await run as Awaited<ReturnType<Migrator["applyPending"]>>;
      assert.equal(result.status, "success");
      assert.deepEqual(result.applied.map((m) => m.filename), ["002_b.sql"]);
      assert.deepEqual(result.skipped, ["001_a.sql"]);
      assert.equal(result.total, 2);
      assert.deepEqual(await historyOf(db), ["001_a.sql", "002_b.sql"]);
      assert.equal(await db.tableExists("b"), true);
      assert.equal(
        events.filter((e) => e.type === "lock_wait").length,
        1,
        "one lock_wait for the wait",
      );
      assert.equal(events.filter((e) => e.type === "lock_acquired").length, 2, "one per file");
      assert.deepEqual(
        events.filter((e) => e.type === "apply_start").map((e) =>
          (e as { filename: string })
            .filename
        ),
        ["002_b.sql"],
        "001 was never started",
      );
    });
  },
);

serverTest(
  "Migrator lock: 'transaction' refuses a file that changed while it waited (drift)",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const events: MigrationEvent[] = [];
      const migrator = new Migrator(db, {
        migrations: {
          "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
          "002_b.sql": "CREATE TABLE {{tables.b}} (id int);",
        },
        moduleName: "drift",
        lock: "transaction",
        lockPollMaxMs: 20,
        onEvent: (e) => events.push(e),
      });
      const holder = await holdLock("drift", schema);
      let run: Promise<unknown> | undefined;
      try {
        run = migrator.applyPending();
        run.catch(() => {});
        await until("the migrator to wait", () => events.some((e) => e.type === "lock_wait"));
        await db.execute(
          "INSERT INTO {{tables.schema_migrations}} (filename, checksum, module_name) " +
            "VALUES ('001_a.sql', 'not-this-file', 'drift')",
        );
      } finally {
        await holder.release();
      }
      await assert.rejects(run!, (error: unknown) => {
        assert.ok(error instanceof MigrationError, String(error));
        assert.equal(error.filename, "001_a.sql");
        assert.match(error.message, /'001_a\.sql' changed after it was applied/);
        assert.match(error.message, /applied checksum not-this-file/);
        return true;
      });
      assert.deepEqual(await historyOf(db), ["001_a.sql"]);
      assert.equal(await db.tableExists("b"), false, "nothing after the drifted file ran");
    });
  },
);

serverTest(
  "Migrator lock: 'transaction' refuses drift found before the run, applying nothing",
  async () => {
    await withSchema(async ({ db }) => {
      const options: MigratorOptions = {
        migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
        moduleName: "drift",
        lock: "transaction",
      };
      assert.equal((await new Migrator(db, options).applyPending()).status, "success");
      const changed = new Migrator(db, {
        ...options,
        migrations: {
          "001_a.sql": "CREATE TABLE {{tables.a}} (id bigint);",
          "002_b.sql": "CREATE TABLE {{tables.b}} (id int);",
        },
      });
      await assert.rejects(changed.applyPending(), (error: unknown) => {
        assert.ok(error instanceof MigrationError, String(error));
        assert.match(error.message, /'001_a\.sql' changed after it was applied.*Nothing was/s);
        return true;
      });
      assert.deepEqual(await historyOf(db), ["001_a.sql"]);
      assert.equal(await db.tableExists("b"), false);
    });
  },
);

serverTest(
  "Migrator lock: 'transaction' refuses a no-transaction file with the fix, applying nothing",
  async () => {
    await withSchema(async ({ db }) => {
      const migrations = {
        "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
        "002_index.sql": "-- pgdbm:no-transaction\n" +
          "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_id ON {{tables.a}} (id);",
        "003_b.sql": "CREATE TABLE {{tables.b}} (id int);",
      };
      const migrator = new Migrator(db, { migrations, moduleName: "notx", lock: "transaction" });
      const refused = (error: unknown): boolean => {
        assert.ok(error instanceof MigrationError, String(error));
        assert.equal(error.filename, "002_index.sql");
        assert.equal(error.module, "notx");
        assert.match(error.message, /'-- pgdbm:no-transaction'/);
        assert.match(error.message, /lock: "session"/);
        assert.match(error.message, /directly to PostgreSQL/);
        return true;
      };
      await assert.rejects(migrator.applyPending(), refused);
      assert.equal(await db.tableExists("a"), false, "not even 001 was applied");
      const [, index] = await migrator.findMigrationFiles();
      await assert.rejects(migrator.applyMigration(index), refused);

      // Applied once on a direct session lock, the file no longer stands in the way.
      await new Migrator(db, { migrations, moduleName: "notx" }).applyPending();
      await db.execute("DELETE FROM {{tables.schema_migrations}} WHERE filename = '003_b.sql'");
      await db.execute("DROP TABLE {{tables.b}}");
      const result = await migrator.applyPending();
      assert.deepEqual(result.applied.map((m) => m.filename), ["003_b.sql"]);
      assert.deepEqual(result.skipped, ["001_a.sql", "002_index.sql"]);
    });
  },
);

serverTest("Migrator lock: 'transaction' retries a migration after a lock timeout", async () => {
  await withSchema(async ({ db, pool }) => {
    await db.ensureSchema();
    await db.execute("CREATE TABLE {{tables.busy}} (id int)");
    const events: MigrationEvent[] = [];
    const migrator = new Migrator(db, {
      migrations: { "001_note.sql": "ALTER TABLE {{tables.busy}} ADD COLUMN note text;" },
      moduleName: "busy",
      lock: "transaction",
      lockTimeoutMs: 50,
      lockRetries: 20,
      lockRetryDelayMs: 20,
      onEvent: (e) => events.push(e),
    });
    // A transaction that read the table holds a lock the ALTER TABLE must wait for.
    const lock = await holdTableLock(new DatabaseManager({ pool, schema: db.schema }), "busy");
    const run = migrator.applyPending();
    const outcome = run.then(() => undefined, (error) => error);
    try {
      await until("a retry", () => events.some((e) => e.type === "retry"));
    } finally {
      await lock.release();
      await outcome;
    }
    const result = await run;
    assert.ok(result.applied[0].attempts >= 2, `attempts: ${result.applied[0].attempts}`);
    const starts = events.filter((e) => e.type === "apply_start").map((e) =>
      (e as { attempt: number }).attempt
    );
    assert.deepEqual(starts, starts.map((_, i) => i + 1), "each attempt started once");
    assert.deepEqual(await historyOf(db), ["001_note.sql"]);
  });
});

serverTest(
  "Migrator lock: 'transaction' puts back session settings a migration changed with SET",
  async () => {
    await withSchema(async ({ db }) => {
      const settings = "SELECT current_setting('search_path') AS path, " +
        "current_setting('work_mem') AS mem, current_setting('lock_timeout') AS lock";
      const defaults = await db.fetchOne(settings);
      const migrator = new Migrator(db, {
        migrations: {
          // What pg_dump writes at the top of a schema dump.
          "001_dump.sql": [
            "SET lock_timeout = 0;",
            "SELECT pg_catalog.set_config('search_path', '', false);",
            "SET work_mem = '7MB';",
            "CREATE TABLE {{tables.dumped}} (id int);",
          ].join("\n"),
        },
        moduleName: "dump",
        lock: "transaction",
      });
      await migrator.applyPending();
      assert.equal(await db.tableExists("dumped"), true);
      // One connection in the pool: the migration ran on the connection that answers this.
      assert.deepEqual(await db.fetchOne(settings), defaults);
    }, 1);
  },
);

serverTest(
  "Migrator lock modes exclude each other: session and transaction racers apply once",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const pools = await Promise.all(
        Array.from({ length: 4 }, () => createSharedPool({ connectionString: TEST_URL })),
      );
      try {
        const runs = await Promise.all(
          pools.map((pool, i) =>
            new Migrator(new DatabaseManager({ pool, schema }), {
              migrations: RACE_FILES,
              moduleName: "mixed",
              lock: i % 2 === 0 ? "session" : "transaction",
              lockPollMaxMs: 50,
            }).applyPending()
          ),
        );
        const files = Object.keys(RACE_FILES);
        assert.deepEqual(runs.flatMap((r) => r.applied.map((m) => m.filename)).sort(), files);
        assert.deepEqual(await historyOf(db), files);
        assert.deepEqual(await logCounts(db), Object.fromEntries(files.map((f) => [f, 1])));
      } finally {
        await Promise.all(pools.map((pool) => pool.close()));
      }
    });
  },
);

serverTest(
  "Migrator lock: 'transaction' applyMigration() applies once, then says it is applied",
  async () => {
    await withSchema(async ({ db }) => {
      const migrator = new Migrator(db, {
        migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
        moduleName: "one",
        lock: "transaction",
      });
      assert.equal(migrator.lock, "transaction");
      const [file] = await migrator.findMigrationFiles();
      const result = await migrator.applyMigration(file);
      assert.equal(result.filename, "001_a.sql");
      assert.equal(result.attempts, 1);
      await assert.rejects(migrator.applyMigration(file), /it is already applied/);
      assert.deepEqual(await historyOf(db), ["001_a.sql"]);
    });
  },
);

serverTest("migrateSchemas() passes lock: 'transaction' to every schema", async () => {
  const pool = await createSharedPool({ connectionString: TEST_URL, maxConnections: 4 });
  const schemas = [uniqueName("pgdbm_lockfleet"), uniqueName("pgdbm_lockfleet")];
  try {
    const migrations = { "001_a.sql": "-- pgdbm:no-transaction\nSELECT 1;" };
    const refused = await migrateSchemas(pool, schemas, {
      migrations,
      moduleName: "fleet",
      lock: "transaction",
    });
    assert.equal(refused.status, "failed");
    for (const r of refused.results) assert.match(String(r.error), /lock: "session"/);

    const result = await migrateSchemas(pool, schemas, {
      migrations: RACE_FILES,
      moduleName: "fleet",
      lock: "transaction",
    });
    assert.equal(result.status, "success");
    assert.equal(result.appliedCount, 2 * Object.keys(RACE_FILES).length);
  } finally {
    try {
      await observe(async (sql) => {
        for (const s of schemas) await sql.unsafe(`DROP SCHEMA IF EXISTS "${s}" CASCADE`);
      });
    } finally {
      await pool.close();
    }
  }
});

serverTest("new Migrator() refuses a 'lock' other than 'session' or 'transaction'", async () => {
  const pool = await createSharedPool({ connectionString: TEST_URL, minConnections: 0 });
  try {
    const db = new DatabaseManager({ pool });
    assert.equal(new Migrator(db, { migrations: {}, moduleName: "m" }).lock, "session");
    assert.throws(
      () =>
        new Migrator(db, {
          migrations: {},
          moduleName: "m",
          lock: "advisory" as unknown as "session",
        }),
      (error: unknown) => {
        assert.ok(error instanceof ConfigurationError, String(error));
        assert.match(error.message, /'lock' must be "session" \(the default\) or "transaction"/);
        return true;
      },
    );
  } finally {
    await pool.close();
  }
});

Deno.test("pgdbm.json 'lock': top-level default, module override, bad value refused", async () => {
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_lock_cfg_" });
  try {
    const path = join(dir, "pgdbm.json");
    await Deno.writeTextFile(
      path,
      JSON.stringify({
        lock: "transaction",
        modules: { users: {}, orders: { lock: "session", dependsOn: ["users"] } },
      }),
    );
    const config = await loadConfig(dir);
    assert.equal(config.lock, "transaction");
    assert.deepEqual(config.modules.map((m) => [m.name, m.lock]), [
      ["users", "transaction"],
      ["orders", "session"],
    ]);
    await Deno.writeTextFile(path, JSON.stringify({ modules: { users: { lock: "table" } } }));
    await assert.rejects(loadConfig(dir), (error: unknown) => {
      assert.ok(error instanceof UsageError, String(error));
      assert.match(error.message, /'lock' of 'users' must be "session".*"transaction"/);
      return true;
    });
    await Deno.writeTextFile(path, JSON.stringify({ modules: { users: {} } }));
    assert.equal((await loadConfig(dir)).modules[0].lock, undefined, "no key: the default");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

serverTest(
  "pgdbm migrate apply passes pgdbm.json 'lock' to the Migrator (a no-transaction file is refused)",
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "pgdbm_lock_cli_" });
    const schema = uniqueName("pgdbm_lockcli");
    try {
      await Deno.mkdir(join(dir, "migrations", "app"), { recursive: true });
      await Deno.writeTextFile(
        join(dir, "migrations", "app", "001_a.sql"),
        "CREATE TABLE {{tables.a}} (id int);",
      );
      await Deno.writeTextFile(
        join(dir, "migrations", "app", "002_index.sql"),
        "-- pgdbm:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS a_id ON {{tables.a}} (id);",
      );
      const run = async (lock: string): Promise<{ code: number; stderr: string }> => {
        await Deno.writeTextFile(
          join(dir, "pgdbm.json"),
          JSON.stringify({ lock, modules: { app: { schema } } }),
        );
        let stderr = "";
        const code = await main(["migrate", "apply"], {
          cwd: dir,
          env: { DATABASE_URL: TEST_URL },
          stdout: () => {},
          stderr: (text) => stderr += text,
        });
        return { code, stderr };
      };
      const refused = await run("transaction");
      assert.equal(refused.code, 1, refused.stderr);
      assert.match(refused.stderr, /002_index\.sql/);
      assert.match(refused.stderr, /lock: "session"/);
      const applied = await run("session");
      assert.equal(applied.code, 0, applied.stderr);
    } finally {
      await observe((sql) => sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`));
      await Deno.remove(dir, { recursive: true });
    }
  },
);
