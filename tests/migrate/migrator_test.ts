import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ConfigurationError, MigrationError, QueryError } from "../../src/errors.ts";
import { DatabaseManager } from "../../src/manager.ts";
import { createSharedPool, type Pool } from "../../src/pool/pool.ts";
import { type MigrationEvent, Migrator } from "../../src/migrate/migrator.ts";
import { migrationChecksum } from "../../src/migrate/_files.ts";
import { holdTableLock, serverTest, TEST_URL } from "../_support/server.ts";

const FIXTURES = new URL("../fixtures/migrations/", import.meta.url);
const fixture = (name: string): string => fileURLToPath(new URL(`${name}/`, FIXTURES));

interface Ctx {
  pool: Pool;
  db: DatabaseManager;
  schema: string;
}

function uniqueSchema(prefix = "mig"): string {
  return `pgdbm_${prefix}_${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
}

/** A shared pool and a fresh schema, dropped and closed afterwards. */
async function withSchema(fn: (ctx: Ctx) => Promise<void>, maxConnections = 4): Promise<void> {
  const pool = await createSharedPool({
    connectionString: TEST_URL,
    maxConnections,
    minConnections: 1,
  });
  const schema = uniqueSchema();
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

async function historyRows(db: DatabaseManager, table = "schema_migrations") {
  return await db.fetchAll<{ filename: string; module_name: string; checksum: string }>(
    `SELECT filename, module_name, checksum FROM {{tables.${table}}} ORDER BY id`,
  );
}

serverTest(
  "Migrator.applyPending() applies files in version order with pgdbm's history table",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const migrator = new Migrator(db, { migrationsPath: fixture("basic"), moduleName: "blog" });
      const result = await migrator.applyPending();
      assert.equal(result.status, "success");
      assert.equal(result.module, "blog");
      assert.equal(result.schema, schema);
      assert.deepEqual(result.applied.map((m) => m.filename), [
        "1_users.sql",
        "2_posts.sql",
        "10_function.sql",
      ]);
      assert.ok(result.applied.every((m) => m.executionTimeMs >= 1 && m.attempts === 1));
      assert.deepEqual(result.skipped, []);
      assert.equal(result.total, 3);
      // The DO block ran and the trigger (a $$ body with semicolons) trimmed the name.
      assert.equal(await db.fetchValue("SELECT name FROM {{tables.users}}"), "seed;user");
      assert.equal(
        await db.fetchValue(
          "SELECT column_default FROM information_schema.columns " +
            "WHERE table_schema = $1 AND table_name = 'posts' AND column_name = 'body'",
          [schema],
        ),
        "'semi;colon'::text",
      );
      const history = await historyRows(db);
      assert.deepEqual(history.map((h) => [h.filename, h.module_name]), [
        ["1_users.sql", "blog"],
        ["2_posts.sql", "blog"],
        ["10_function.sql", "blog"],
      ]);
      const users = await Deno.readTextFile(join(fixture("basic"), "1_users.sql"));
      assert.equal(history[0].checksum, await migrationChecksum(users));
      // pgdbm's columns, in pgdbm's order, in the manager's schema.
      const columns = await db.fetchAll<{ column_name: string; data_type: string }>(
        "SELECT column_name, data_type FROM information_schema.columns " +
          "WHERE table_schema = $1 AND table_name = 'schema_migrations' ORDER BY ordinal_position",
        [schema],
      );
      assert.deepEqual(columns.map((c) => `${c.column_name}:${c.data_type}`), [
        "id:integer",
        "filename:character varying",
        "checksum:character varying",
        "module_name:character varying",
        "applied_at:timestamp without time zone",
        "applied_by:character varying",
        "execution_time_ms:integer",
      ]);
      await assert.rejects(
        db.execute(
          "INSERT INTO {{tables.schema_migrations}} (filename, checksum, module_name) " +
            "VALUES ('1_users.sql', 'x', 'blog')",
        ),
        (error: unknown) => error instanceof QueryError && error.sqlstate === "23505",
      );

      const again = await migrator.applyPending();
      assert.equal(again.status, "up_to_date");
      assert.deepEqual(again.applied, []);
      assert.deepEqual(again.skipped, ["1_users.sql", "2_posts.sql", "10_function.sql"]);
      assert.equal(again.total, 3);
    });
  },
);

serverTest(
  "Migrator.applyPending({ dryRun }) reports pending files and creates nothing",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const migrator = new Migrator(db, { migrationsPath: fixture("basic"), moduleName: "blog" });
      const result = await migrator.applyPending({ dryRun: true });
      assert.equal(result.status, "dry_run");
      assert.deepEqual(result.pending, ["1_users.sql", "2_posts.sql", "10_function.sql"]);
      assert.deepEqual(result.applied, []);
      assert.equal(result.total, 3);
      assert.equal(
        await db.fetchValue("SELECT count(*)::int FROM pg_namespace WHERE nspname = $1", [schema]),
        0,
      );
      await migrator.applyPending();
      const none = await migrator.applyPending({ dryRun: true });
      assert.equal(none.status, "dry_run");
      assert.deepEqual(none.pending, []);
      assert.equal(none.total, 3);
    });
  },
);

serverTest(
  "Migrator query methods report files, applied, pending, history and status",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const migrations: Record<string, string> = {
        "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
        "002_b.sql": "CREATE TABLE {{tables.b}} (id int);",
      };
      const migrator = new Migrator(db, { migrations, moduleName: "m" });
      assert.equal(migrator.moduleName, "m");
      assert.equal(migrator.schema, schema);
      assert.equal(migrator.migrationsTable, "schema_migrations");
      assert.deepEqual(await migrator.getApplied(), []);
      assert.deepEqual(await migrator.getHistory(), []);
      const status0 = await migrator.getStatus();
      assert.equal(status0.initialized, false);
      assert.equal(status0.upToDate, false);

      const files = await migrator.findMigrationFiles();
      assert.deepEqual(files.map((f) => [f.filename, f.version, f.noTransaction]), [
        ["001_a.sql", "1", false],
        ["002_b.sql", "2", false],
      ]);
      assert.equal(files[0].checksum, await migrationChecksum(migrations["001_a.sql"]));
      await migrator.ensureMigrationsTable();
      await migrator.ensureMigrationsTable();
      assert.equal((await migrator.getStatus()).initialized, true);

      await migrator.applyMigration(files[0]);
      await assert.rejects(migrator.applyMigration(files[0]), /already applied/);
      assert.deepEqual((await migrator.getPending()).map((m) => m.filename), ["002_b.sql"]);
      const applied = await migrator.getApplied();
      assert.equal(applied.length, 1);
      assert.equal(applied[0].filename, "001_a.sql");
      assert.equal(applied[0].moduleName, "m");
      assert.ok(applied[0].appliedAt instanceof Date);
      assert.equal(typeof applied[0].appliedBy, "string");

      await migrator.applyPending();
      const history = await migrator.getHistory(1);
      assert.deepEqual(history.map((h) => h.filename), ["002_b.sql"]);
      assert.deepEqual((await migrator.getHistory()).map((h) => h.filename), [
        "002_b.sql",
        "001_a.sql",
      ]);
      await assert.rejects(migrator.getHistory(0), RangeError);
      const status = await migrator.getStatus();
      assert.equal(status.upToDate, true);
      assert.deepEqual(status.pending, []);
      assert.deepEqual(status.drifted, []);
      assert.deepEqual(status.missing, []);
    });
  },
);

serverTest(
  "Migrator.applyPending() refuses drift, shows both checksums and applies nothing",
  async () => {
    await withSchema(async ({ db }) => {
      const migrations: Record<string, string> = {
        "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
      };
      const migrator = new Migrator(db, { migrations, moduleName: "m" });
      await migrator.applyPending();
      const applied = await migrationChecksum(migrations["001_a.sql"]);
      migrations["001_a.sql"] = "CREATE TABLE {{tables.a}} (id bigint);";
      migrations["002_b.sql"] = "CREATE TABLE {{tables.b}} (id int);";
      const current = await migrationChecksum(migrations["001_a.sql"]);
      for (const call of [() => migrator.applyPending(), () => migrator.getPending()]) {
        await assert.rejects(call(), (error: unknown) => {
          assert.ok(error instanceof MigrationError);
          assert.equal(error.filename, "001_a.sql");
          assert.equal(error.module, "m");
          assert.equal(error.schema, db.schema);
          assert.ok(error.message.includes(applied), error.message);
          assert.ok(error.message.includes(current), error.message);
          return true;
        });
      }
      assert.equal(await db.tableExists("b"), false);
      const status = await migrator.getStatus();
      assert.deepEqual(status.drifted, [
        { filename: "001_a.sql", appliedChecksum: applied, currentChecksum: current },
      ]);
      assert.equal(status.upToDate, false);
      assert.deepEqual(status.pending.map((m) => m.filename), ["002_b.sql"]);
    });
  },
);

serverTest(
  "Migrator.applyPending() treats CRLF-only and outer whitespace edits as unchanged",
  async () => {
    await withSchema(async ({ db }) => {
      const dir = await Deno.makeTempDir();
      try {
        const path = join(dir, "001_a.sql");
        await Deno.writeTextFile(path, "CREATE TABLE {{tables.a}} (\n  id int\n);\n");
        const migrator = new Migrator(db, { migrationsPath: dir, moduleName: "m" });
        assert.equal((await migrator.applyPending()).status, "success");
        await Deno.writeTextFile(
          path,
          "\r\n  CREATE TABLE {{tables.a}} (\r\n  id int\r\n);\r\n\r\n",
        );
        assert.equal((await migrator.applyPending()).status, "up_to_date");
        await Deno.writeTextFile(path, "CREATE TABLE {{tables.a}} (\r\n  id  int\r\n);\r\n");
        await assert.rejects(migrator.applyPending(), /changed after it was applied/);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
);

serverTest("Migrator.applyPending() reports applied migrations whose file is gone", async () => {
  await withSchema(async ({ db }) => {
    const migrations: Record<string, string> = {
      "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
      "002_b.sql": "CREATE TABLE {{tables.b}} (id int);",
    };
    const events: MigrationEvent[] = [];
    const migrator = new Migrator(db, {
      migrations,
      moduleName: "m",
      onEvent: (e) => events.push(e),
    });
    await migrator.applyPending();
    delete migrations["001_a.sql"];
    const result = await migrator.applyPending();
    assert.equal(result.status, "up_to_date");
    assert.deepEqual(result.missing, ["001_a.sql"]);
    assert.deepEqual(events.filter((e) => e.type === "missing"), [
      { type: "missing", filenames: ["001_a.sql"] },
    ]);
    assert.deepEqual((await migrator.getStatus()).missing.map((m) => m.filename), ["001_a.sql"]);
    // Another module's rows are not this module's missing files.
    const other = new Migrator(db, { migrations: {}, moduleName: "other" });
    assert.deepEqual((await other.applyPending()).missing, []);
  });
});

serverTest(
  "Migrator.applyPending() leaves nothing of a file whose statement fails midway",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const migrator = new Migrator(db, { migrationsPath: fixture("failing"), moduleName: "f" });
      const error = await migrator.applyPending().then(
        () => assert.fail("expected a MigrationError"),
        (e: unknown) => e,
      );
      assert.ok(error instanceof MigrationError, String(error));
      assert.equal(error.filename, "002_fails_midway.sql");
      assert.equal(error.module, "f");
      assert.equal(error.schema, schema);
      assert.equal(error.line, 5);
      assert.match(error.message, /002_fails_midway\.sql/);
      assert.match(error.message, /module 'f'/);
      assert.match(error.message, new RegExp(`schema '${schema}'`));
      assert.match(error.message, /line 5/);
      assert.match(error.message, /duplicate key value violates unique constraint/);
      assert.ok(error.cause instanceof QueryError);
      assert.equal(error.cause.sqlstate, "23505");
      const partial = error.partialResult as {
        status: string;
        applied: { filename: string }[];
        failure: { filename: string; line: number; sqlstate: string };
      };
      assert.equal(partial.status, "failed");
      assert.deepEqual(partial.applied.map((m) => m.filename), ["001_ok.sql"]);
      assert.equal(partial.failure.filename, "002_fails_midway.sql");
      assert.equal(partial.failure.line, 5);
      assert.equal(partial.failure.sqlstate, "23505");
      // The earlier file stays; nothing of the failed file (nor later ones) remains.
      assert.equal(await db.tableExists("first"), true);
      assert.equal(await db.tableExists("second"), false);
      assert.equal(await db.tableExists("never"), false);
      assert.deepEqual((await historyRows(db)).map((h) => h.filename), ["001_ok.sql"]);
    });
  },
);

serverTest(
  "MigrationError.line points at the server's error position in a long statement",
  async () => {
    await withSchema(async ({ db }) => {
      const migrator = new Migrator(db, {
        migrations: {
          "001_typo.sql": [
            "CREATE TABLE {{tables.ok}} (id int);",
            "",
            "CREATE TABLE {{tables.broken}} (",
            "  id int,",
            "  name txet",
            ");",
          ].join("\n"),
        },
        moduleName: "m",
      });
      await assert.rejects(migrator.applyPending(), (error: unknown) => {
        assert.ok(error instanceof MigrationError);
        assert.equal(error.line, 5);
        assert.match(error.message, /type "txet" does not exist/);
        return true;
      });
      assert.equal(await db.tableExists("ok"), false);
    });
  },
);

serverTest(
  "Migrator applies a file with CR-only line endings and refuses a comment-only one",
  async () => {
    await withSchema(async ({ db }) => {
      // pgdbm's own example migration, saved by an old Mac editor: each line ends in a CR.
      const accounts = await Deno.readTextFile(
        new URL("../../migrations/users/001_accounts.sql", import.meta.url),
      );
      const crOnly = accounts.replace(/\r?\n/g, "\r");
      assert.ok(crOnly.startsWith("--") && !crOnly.includes("\n"));
      const migrator = new Migrator(db, {
        migrations: {
          "001_accounts.sql": crOnly,
          "002_more.sql": "-- a comment\rCREATE TABLE {{tables.more}} (id int);\r-- done\r",
        },
        moduleName: "users",
      });
      const result = await migrator.applyPending();
      assert.deepEqual(result.applied.map((m) => m.filename), ["001_accounts.sql", "002_more.sql"]);
      assert.equal(await db.tableExists("accounts"), true);
      assert.equal(await db.tableExists("more"), true);

      // A file of comments only (CR endings, as before this was its whole content) is
      // refused like an empty file: nothing runs and nothing is recorded.
      const stub = new Migrator(db, {
        migrations: {
          "001_accounts.sql": crOnly,
          "002_more.sql": "-- a comment\rCREATE TABLE {{tables.more}} (id int);\r-- done\r",
          "003_comments.sql": "-- CREATE TABLE {{tables.never}} (id int);\r-- later\r",
        },
        moduleName: "users",
      });
      await assert.rejects(stub.applyPending(), (error: unknown) => {
        assert.ok(error instanceof MigrationError);
        assert.equal(error.filename, "003_comments.sql");
        assert.match(error.message, /has no SQL statement/);
        return true;
      });
      assert.deepEqual((await historyRows(db)).map((h) => h.filename), [
        "001_accounts.sql",
        "002_more.sql",
      ]);
    });
  },
);

serverTest(
  "cli migrate apply refuses a 'migrate create' stub not filled in yet, recording nothing",
  async () => {
    const schema = uniqueSchema("stub");
    const dir = await Deno.makeTempDir({ prefix: "pgdbm_stub_" });
    const run = async (...args: string[]) => {
      const env: Record<string, string> = { NO_COLOR: "1", DATABASE_URL: TEST_URL };
      for (const name of ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR"]) {
        const value = Deno.env.get(name);
        if (value !== undefined) env[name] = value;
      }
      const output = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          "--config",
          fileURLToPath(new URL("../../deno.json", import.meta.url)),
          fileURLToPath(new URL("../../src/cli/mod.ts", import.meta.url)),
          ...args,
          "--schema",
          schema,
        ],
        cwd: dir,
        env,
        clearEnv: true,
        stdin: "null",
      }).output();
      const decoder = new TextDecoder();
      return {
        code: output.code,
        stdout: decoder.decode(output.stdout),
        stderr: decoder.decode(output.stderr),
      };
    };
    const pool = await createSharedPool({ connectionString: TEST_URL, maxConnections: 1 });
    const db = new DatabaseManager({ pool, schema });
    try {
      const created = await run("migrate", "create", "add_notes");
      assert.equal(created.code, 0, created.stderr);
      const [stub] = [...Deno.readDirSync(join(dir, "migrations"))].map((e) => e.name);
      assert.match(stub, /^\d{14}_add_notes\.sql$/);

      const early = await run("migrate", "apply");
      assert.equal(early.code, 1, early.stdout);
      assert.match(early.stderr, new RegExp(`'${stub}'.*has no SQL statement`));
      assert.match(early.stderr, /migrate create/);
      assert.equal(await db.tableExists("schema_migrations"), false);

      // Written later, the file applies: it was never recorded as applied while empty.
      const path = join(dir, "migrations", stub);
      await Deno.writeTextFile(
        path,
        (await Deno.readTextFile(path)) + "CREATE TABLE {{tables.notes}} (id int);\n",
      );
      const applied = await run("migrate", "apply");
      assert.equal(applied.code, 0, applied.stderr);
      assert.equal(await db.tableExists("notes"), true);
      assert.deepEqual((await historyRows(db)).map((h) => h.filename), [stub]);
    } finally {
      await db.execute(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`).finally(() => pool.close());
      await Deno.remove(dir, { recursive: true });
    }
  },
);

serverTest(
  "Migrator runs a file marked '-- pgdbm:no-transaction  (why)' outside a transaction",
  async () => {
    await withSchema(async ({ db }) => {
      const migrator = new Migrator(db, {
        migrations: {
          "001_table.sql": "CREATE TABLE {{tables.items}} (id int, name text);",
          "002_index.sql": [
            "-- pgdbm:no-transaction  (CREATE INDEX CONCURRENTLY needs it)",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS items_name ON {{tables.items}} (name);",
          ].join("\n"),
        },
        moduleName: "m",
      });
      const files = await migrator.findMigrationFiles();
      assert.deepEqual(files.map((f) => f.noTransaction), [false, true]);
      const result = await migrator.applyPending();
      assert.deepEqual(result.applied.map((m) => m.filename), ["001_table.sql", "002_index.sql"]);
      assert.equal(
        await db.fetchValue(
          "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
          [`"${db.schema}".items_name`],
        ),
        true,
      );
    });
  },
);

serverTest(
  "Migrator splits strings as the file sets standard_conforming_strings, in both modes",
  async () => {
    await withSchema(async ({ db }) => {
      const body = [
        "CREATE TABLE IF NOT EXISTS {{tables.quotes}} (mode text, body text);",
        "SET standard_conforming_strings = off;",
        "INSERT INTO {{tables.quotes}} VALUES (:mode, 'it\\'s; here');",
        "INSERT INTO {{tables.quotes}} VALUES (:mode, 'back\\\\slash; too');",
        "SET standard_conforming_strings = on;",
        "INSERT INTO {{tables.quotes}} VALUES (:mode, 'plain\\');",
      ].join("\n");
      const migrator = new Migrator(db, {
        migrations: {
          "001_tx.sql": body.replaceAll(":mode", "'tx'"),
          "002_autocommit.sql": "-- pgdbm:no-transaction\n" + body.replaceAll(":mode", "'auto'"),
        },
        moduleName: "m",
      });
      const result = await migrator.applyPending();
      assert.equal(result.applied.length, 2);
      const rows = await db.fetchAll<{ mode: string; body: string }>(
        "SELECT mode, body FROM {{tables.quotes}} ORDER BY mode, body",
      );
      assert.deepEqual(rows.map((r) => `${r.mode}:${r.body}`), [
        "auto:back\\slash; too",
        "auto:it's; here",
        "auto:plain\\",
        "tx:back\\slash; too",
        "tx:it's; here",
        "tx:plain\\",
      ]);
      // The setting the files changed did not outlive them.
      await db.acquire(async (conn) => {
        assert.equal(await conn.fetchValue("SHOW standard_conforming_strings"), "on");
      });
    }, 1);
  },
);

serverTest(
  "Migrator checks for its history table in the catalog: a first run fails no query",
  async () => {
    const failed: string[] = [];
    const pool = await createSharedPool({
      connectionString: TEST_URL,
      maxConnections: 2,
      onQuery: (event) => {
        if (event.error !== undefined) failed.push(`${event.sql}: ${event.error.message}`);
      },
    });
    const schema = uniqueSchema("probe");
    const db = new DatabaseManager({ pool, schema });
    try {
      const migrator = new Migrator(db, {
        migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
        moduleName: "m",
      });
      assert.deepEqual(await migrator.getApplied(), []);
      assert.deepEqual(await migrator.getHistory(), []);
      assert.equal((await migrator.getStatus()).initialized, false);
      assert.equal((await migrator.getPending()).length, 1);
      assert.equal(await migrator.rollbackMigration("001_a.sql"), false);
      assert.equal((await migrator.applyPending({ dryRun: true })).status, "dry_run");
      assert.equal((await migrator.applyPending()).status, "success");
      // Another module's first run, on a history table that exists.
      const other = new Migrator(db, { migrations: {}, moduleName: "other" });
      assert.equal((await other.applyPending()).status, "up_to_date");
      assert.deepEqual(failed, []);
      assert.equal(pool.getStats().errors, 0);
    } finally {
      await db.execute(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`).finally(() => pool.close());
    }
  },
);

serverTest(
  "Migrator.getStatus() says when Python pgdbm would apply the files in another order",
  async () => {
    await withSchema(async ({ db }) => {
      const differ = new Migrator(db, {
        migrations: {
          "0001_a.sql": "SELECT 1;",
          "00010_b.sql": "SELECT 10;",
          "0002_c.sql": "SELECT 2;",
        },
        moduleName: "m",
      });
      const status = await differ.getStatus();
      assert.deepEqual(status.pending.map((m) => m.filename), [
        "0001_a.sql",
        "0002_c.sql",
        "00010_b.sql",
      ]);
      assert.deepEqual(status.pgdbmOrder, ["00010_b.sql", "0001_a.sql", "0002_c.sql"]);
      const same = new Migrator(db, {
        migrations: { "00001_a.sql": "SELECT 1;", "00010_b.sql": "SELECT 10;" },
        moduleName: "n",
      });
      assert.equal("pgdbmOrder" in await same.getStatus(), false);
    });
  },
);

serverTest("Migrator runs $$ bodies and strings containing semicolons intact", async () => {
  await withSchema(async ({ db }) => {
    const migrator = new Migrator(db, {
      migrations: {
        "001_fn.sql": [
          "CREATE FUNCTION {{schema}}.greet(who text) RETURNS text LANGUAGE plpgsql AS $body$",
          "DECLARE sep text := '; ';",
          "BEGIN",
          "  RETURN 'hello' || sep || who || $$;$$;",
          "END;",
          "$body$;",
          "COMMENT ON FUNCTION {{schema}}.greet(text) IS E'says hello\\'; twice';",
          "CREATE FUNCTION {{schema}}.answer() RETURNS int LANGUAGE sql",
          "BEGIN ATOMIC",
          "  SELECT 42;",
          "END;",
        ].join("\n"),
      },
      moduleName: "m",
    });
    await migrator.applyPending();
    assert.equal(await db.fetchValue("SELECT {{schema}}.greet('you')"), "hello; you;");
    assert.equal(await db.fetchValue("SELECT {{schema}}.answer()"), 42);
    assert.equal(
      await db.fetchValue("SELECT obj_description('{{schema}}.greet(text)'::regprocedure)"),
      "says hello'; twice",
    );
  });
});

serverTest("Migrator handles files wrapped in BEGIN;/COMMIT; as pgdbm writes them", async () => {
  await withSchema(async ({ db }) => {
    const migrator = new Migrator(db, {
      migrationsPath: fixture("pgdbm_wrapped"),
      moduleName: "shop",
    });
    const result = await migrator.applyPending();
    assert.deepEqual(result.applied.map((m) => m.filename), [
      "20251025_120000_create_items.sql",
      "20251025_130000_add_price.sql",
    ]);
    assert.equal(await db.fetchValue("SELECT price::int FROM {{tables.items}}"), 1);
  });
  // A wrapped file that fails midway leaves nothing: its COMMIT did not commit half of it.
  await withSchema(async ({ db }) => {
    const migrator = new Migrator(db, {
      migrations: {
        "001_wrapped.sql": "BEGIN;\nCREATE TABLE {{tables.y}} (id int);\nSELECT 1/0;\nCOMMIT;\n",
      },
      moduleName: "m",
    });
    await assert.rejects(
      migrator.applyPending(),
      (error: unknown) =>
        error instanceof MigrationError && error.line === 3 &&
        /division by zero/.test(error.message),
    );
    assert.equal(await db.tableExists("y"), false);
    assert.deepEqual(await historyRows(db), []);
  });
});

serverTest("Migrator refuses a file with a COMMIT inside before applying anything", async () => {
  await withSchema(async ({ db }) => {
    const migrator = new Migrator(db, {
      migrations: {
        "000_first.sql": "CREATE TABLE {{tables.first}} (id int);",
        "001_inner_commit.sql": await Deno.readTextFile(
          join(fixture("inner_commit"), "001_inner_commit.sql"),
        ),
      },
      moduleName: "m",
    });
    await assert.rejects(migrator.applyPending(), (error: unknown) => {
      assert.ok(error instanceof MigrationError);
      assert.equal(error.filename, "001_inner_commit.sql");
      assert.equal(error.module, "m");
      assert.equal(error.line, 2);
      assert.match(error.message, /'COMMIT' at line 2/);
      return true;
    });
    assert.equal(await db.tableExists("first"), false);
    assert.equal(await db.tableExists("a"), false);
  });
});

serverTest(
  "Migrator refuses invalid sources: repeated versions, no version, empty file",
  async () => {
    await withSchema(async ({ db }) => {
      for (
        const [dir, pattern] of [
          ["duplicate_versions", /'001_a\.sql' and '1_b\.sql' have the same version 1/],
          ["unversioned", /'schema\.sql'.*has no version/],
          ["empty_file", /'001_empty\.sql'.*is empty/],
        ] as const
      ) {
        const migrator = new Migrator(db, { migrationsPath: fixture(dir), moduleName: "m" });
        await assert.rejects(migrator.applyPending(), (error: unknown) => {
          assert.ok(error instanceof MigrationError, String(error));
          assert.match(error.message, pattern);
          assert.equal(error.module, "m");
          return true;
        });
      }
      assert.equal(await db.tableExists("a"), false);
    });
  },
);

serverTest("Migrator runs -- pgdbm:no-transaction files statement by statement", async () => {
  await withSchema(async ({ db }) => {
    const migrator = new Migrator(db, {
      migrationsPath: fixture("no_transaction"),
      moduleName: "events",
    });
    const files = await migrator.findMigrationFiles();
    assert.deepEqual(files.map((f) => f.noTransaction), [false, true]);
    const result = await migrator.applyPending();
    assert.deepEqual(result.applied.map((m) => m.filename), ["001_events.sql", "002_indexes.sql"]);
    const indexes = await db.fetchAll<{ name: string; valid: boolean }>(
      `SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname LIKE 'events_%idx' ORDER BY 1`,
      [db.schema],
    );
    assert.deepEqual(indexes, [
      { name: "events_id_kind_idx", valid: true },
      { name: "events_kind_idx", valid: true },
    ]);
    // The session settings of the pooled connection are restored afterwards.
    await db.acquire(async (conn) => {
      assert.equal(await conn.fetchValue("SHOW lock_timeout"), "5s");
    });
  });
});

serverTest(
  "Migrator reports an INVALID index left by a failed no-transaction migration",
  async () => {
    await withSchema(async ({ db, schema }) => {
      const migrator = new Migrator(db, {
        migrationsPath: fixture("invalid_index"),
        moduleName: "events",
      });
      await assert.rejects(migrator.applyPending(), (error: unknown) => {
        assert.ok(error instanceof MigrationError, String(error));
        assert.equal(error.filename, "002_unique_kind.sql");
        assert.equal(error.line, 3);
        assert.match(error.message, /could not create unique index/);
        assert.ok(error.message.includes(`INVALID index ${schema}.events_kind_key`), error.message);
        assert.match(error.message, /DROP INDEX CONCURRENTLY/);
        return true;
      });
      assert.deepEqual((await historyRows(db)).map((h) => h.filename), ["001_events.sql"]);
    });
  },
);

serverTest("Migrator retries a migration that times out behind a long-held lock", async () => {
  await withSchema(async ({ db, pool }) => {
    await db.ensureSchema();
    await db.execute("CREATE TABLE {{tables.busy}} (id int)");
    await db.execute("INSERT INTO {{tables.busy}} VALUES (1)");
    const events: MigrationEvent[] = [];
    const migrator = new Migrator(db, {
      migrationsPath: fixture("lock"),
      moduleName: "m",
      lockTimeoutMs: 150,
      lockRetries: 20,
      lockRetryDelayMs: 100,
      onEvent: (e) => events.push(e),
    });
    const other = new DatabaseManager({ pool, schema: db.schema });
    // A long transaction that reads the table holds a lock the ALTER TABLE must wait for.
    const lock = await holdTableLock(other, "busy");
    const migration = migrator.applyPending();
    const deadline = performance.now() + 5000;
    while (!events.some((e) => e.type === "retry")) {
      if (performance.now() > deadline) {
        await lock.release();
        await migration.catch(() => {});
        assert.fail("the migration never timed out waiting for its lock");
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    // While the migration waits and retries, other queries are not stuck behind it for long.
    const started = performance.now();
    for (let i = 0; i < 3; i++) await other.fetchAll("SELECT * FROM {{tables.busy}}");
    const elapsed = performance.now() - started;
    assert.ok(elapsed < 1000, `reads waited ${elapsed} ms behind the migration`);
    await new Promise((resolve) => setTimeout(resolve, 300));
    await lock.release();
    const result = await migration;
    assert.equal(result.status, "success");
    assert.ok(result.applied[0].attempts >= 2, `attempts: ${result.applied[0].attempts}`);
    const retries = events.filter((e) => e.type === "retry");
    assert.ok(retries.length >= 1);
    assert.match((retries[0] as { message: string }).message, /lock timeout/);
    assert.equal(
      await db.fetchValue(
        "SELECT count(*)::int FROM information_schema.columns " +
          "WHERE table_schema = $1 AND table_name = 'busy' AND column_name = 'note'",
        [db.schema],
      ),
      1,
    );
  });
});

serverTest("Migrator fails with SQLSTATE 55P03 when the lock is never released", async () => {
  await withSchema(async ({ db, pool }) => {
    await db.ensureSchema();
    await db.execute("CREATE TABLE {{tables.busy}} (id int)");
    const migrator = new Migrator(db, {
      migrationsPath: fixture("lock"),
      moduleName: "m",
      lockTimeoutMs: 50,
      lockRetries: 2,
      lockRetryDelayMs: 10,
    });
    const other = new DatabaseManager({ pool, schema: db.schema });
    await other.transaction(async (tx) => {
      await tx.execute("LOCK TABLE {{tables.busy}} IN ACCESS SHARE MODE");
      await assert.rejects(migrator.applyPending(), (error: unknown) => {
        assert.ok(error instanceof MigrationError, String(error));
        assert.equal(error.filename, "001_add_note.sql");
        assert.ok(error.cause instanceof QueryError);
        assert.equal(error.cause.sqlstate, "55P03");
        assert.match(error.message, /after 3 attempts/);
        return true;
      });
    });
    assert.deepEqual(await historyRows(db), []);
  });
});

serverTest("Migrator waits for another holder of the (schema, module) advisory lock", async () => {
  await withSchema(async ({ db }) => {
    const migrator = new Migrator(db, {
      migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
      moduleName: "locked",
      lockWaitTimeoutMs: 300,
    });
    await migrator.ensureMigrationsTable();
    await db.acquire(async (conn) => {
      // The documented key: any tool taking it is serialized with the migrator.
      await conn.execute(
        "SELECT pg_advisory_lock(hashtext('pgdbm_migration_' || $1), hashtext($2))",
        ["locked", db.schema],
      );
      try {
        await assert.rejects(migrator.applyPending(), (error: unknown) => {
          assert.ok(error instanceof MigrationError, String(error));
          assert.ok(error.message.includes(`server process ${conn.pid}`), error.message);
          assert.match(error.message, /lockWaitTimeoutMs/);
          return true;
        });
      } finally {
        await conn.execute("SELECT pg_advisory_unlock_all()");
      }
    });
    assert.equal((await migrator.applyPending()).status, "success");
  });
});

serverTest("Migrator keeps two modules of one schema apart in one history table", async () => {
  await withSchema(async ({ db }) => {
    const users = new Migrator(db, {
      migrationsPath: fixture("modules/users"),
      moduleName: "users",
    });
    const billing = new Migrator(db, {
      migrationsPath: fixture("modules/billing"),
      moduleName: "billing",
    });
    const [u, b] = await Promise.all([users.applyPending(), billing.applyPending()]);
    assert.deepEqual(u.applied.map((m) => m.filename), ["001_init.sql"]);
    assert.deepEqual(b.applied.map((m) => m.filename), ["001_init.sql"]);
    assert.equal(await db.tableExists("users"), true);
    assert.equal(await db.tableExists("invoices"), true);
    const history = await historyRows(db);
    assert.deepEqual(history.map((h) => `${h.module_name}/${h.filename}`).sort(), [
      "billing/001_init.sql",
      "users/001_init.sql",
    ]);
    assert.deepEqual((await users.getApplied()).map((a) => a.moduleName), ["users"]);
    assert.equal((await users.applyPending()).status, "up_to_date");
    assert.equal((await billing.applyPending()).status, "up_to_date");
  });
});

serverTest(
  "Migrator applies each migration once when many run at once in one process",
  async () => {
    await withSchema(async ({ db }) => {
      const migrationsPath = fixture("race");
      const runs = await Promise.all(
        Array.from(
          { length: 5 },
          () => new Migrator(db, { migrationsPath, moduleName: "race" }).applyPending(),
        ),
      );
      const applied = runs.flatMap((r) => r.applied.map((m) => m.filename)).sort();
      assert.deepEqual(applied, ["001_log.sql", "002_slow.sql", "003_index.sql", "004_final.sql"]);
      const log = await db.fetchAll<{ filename: string }>(
        "SELECT filename FROM {{tables.applied_log}} ORDER BY filename",
      );
      assert.deepEqual(log.map((l) => l.filename), applied);
    }, 8);
  },
);

serverTest(
  "Migrator: pools starting cold at once create each schema's history table (40 rounds)",
  async () => {
    // Three pools (as three processes would) migrate the same four fresh schemas at once,
    // on new connections: the history tables are created concurrently.
    const admin = await createSharedPool({ connectionString: TEST_URL, maxConnections: 1 });
    const root = new DatabaseManager({ pool: admin });
    try {
      for (let round = 0; round < 40; round++) {
        const schemas = Array.from({ length: 4 }, () => uniqueSchema("cold"));
        const pools = await Promise.all(
          Array.from(
            { length: 3 },
            () =>
              createSharedPool({
                connectionString: TEST_URL,
                maxConnections: 3,
                minConnections: 0,
              }),
          ),
        );
        try {
          const outcomes = await Promise.allSettled(
            pools.flatMap((pool) =>
              schemas.map(async (schema) => {
                const db = new DatabaseManager({ pool, schema });
                await db.ensureSchema();
                const migrations = { "001_a.sql": "CREATE TABLE {{tables.a}} (id int)" };
                return await new Migrator(db, { migrations, moduleName: "m" }).applyPending();
              })
            ),
          );
          const failed = outcomes.filter((o) => o.status === "rejected");
          assert.deepEqual(failed, [], `round ${round}`);
          const applied = outcomes.flatMap((o) =>
            o.status === "fulfilled" ? o.value.applied.map(() => o.value.schema) : []
          );
          assert.deepEqual(applied.sort(), [...schemas].sort(), `round ${round}`);
        } finally {
          await Promise.all(pools.map((pool) => pool.close()));
          for (const schema of schemas) {
            await root.execute(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
          }
        }
      }
    } finally {
      await admin.close();
    }
  },
);

serverTest("Migrator applies each migration exactly once across racing processes", async () => {
  await withSchema(async ({ db }) => {
    const script = fileURLToPath(new URL("../fixtures/migrate_race.ts", import.meta.url));
    const children = Array.from({ length: 5 }, () =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", script, TEST_URL, db.schema!, "race", fixture("race")],
        stdout: "piped",
        stderr: "piped",
      }).output());
    const outputs = await Promise.all(children);
    const decoder = new TextDecoder();
    const results = outputs.map((out) => {
      const stderr = decoder.decode(out.stderr);
      assert.equal(out.code, 0, stderr);
      const lines = decoder.decode(out.stdout).trim().split("\n");
      return JSON.parse(lines[lines.length - 1]) as { applied: string[]; status: string };
    });
    assert.ok(results.every((r) => r.status === "success" || r.status === "up_to_date"));
    const applied = results.flatMap((r) => r.applied).sort();
    assert.deepEqual(applied, ["001_log.sql", "002_slow.sql", "003_index.sql", "004_final.sql"]);
    const log = await db.fetchAll<{ filename: string }>(
      "SELECT filename FROM {{tables.applied_log}} ORDER BY filename",
    );
    assert.deepEqual(log.map((l) => l.filename), applied);
    assert.equal((await historyRows(db)).length, 4);
  });
});

serverTest(
  "Migrator finishes cleanly after a process was killed in the middle of a run",
  async () => {
    await withSchema(async ({ db }) => {
      const script = fileURLToPath(new URL("../fixtures/migrate_race.ts", import.meta.url));
      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", script, TEST_URL, db.schema!, "killed", fixture("killed")],
        stdout: "piped",
        stderr: "null",
      }).spawn();
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let seen = "";
      while (!seen.includes('"filename":"002_slow.sql"')) {
        const { value, done } = await reader.read();
        if (done) break;
        seen += value;
      }
      // Let the statements of 002 reach the server, then kill the process outright.
      await new Promise((resolve) => setTimeout(resolve, 300));
      child.kill("SIGKILL");
      await reader.cancel();
      const status = await child.status;
      assert.equal(status.success, false);
      assert.ok(seen.includes('"filename":"002_slow.sql"'), seen);

      const migrator = new Migrator(db, {
        migrationsPath: fixture("killed"),
        moduleName: "killed",
      });
      // The killed run's open transaction is invisible: 001 is applied, nothing of 002.
      assert.deepEqual((await migrator.getApplied()).map((a) => a.filename), ["001_first.sql"]);
      assert.equal(await db.tableExists("half"), false);
      const result = await migrator.applyPending();
      assert.deepEqual(result.applied.map((m) => m.filename), ["002_slow.sql", "003_after.sql"]);
      assert.deepEqual(result.skipped, ["001_first.sql"]);
      assert.deepEqual(
        (await db.fetchAll<{ id: number }>("SELECT id FROM {{tables.half}} ORDER BY id")).map((r) =>
          r.id
        ),
        [1, 2],
      );
      assert.equal((await historyRows(db)).length, 3);
    });
  },
);

serverTest("Migrator puts back session settings a migration changed with SET", async () => {
  await withSchema(async ({ db }) => {
    const defaults = await db.fetchOne(
      "SELECT current_setting('search_path') AS path, " +
        "current_setting('work_mem') AS mem, current_setting('lock_timeout') AS lock",
    );
    const migrator = new Migrator(db, {
      migrations: {
        // What pg_dump writes at the top of a schema dump.
        "001_dump.sql": [
          "SET lock_timeout = 0;",
          "SELECT pg_catalog.set_config('search_path', '', false);",
          "SET work_mem = '7MB';",
          "CREATE TABLE {{tables.dumped}} (id int);",
        ].join("\n"),
        "002_more.sql": "-- pgdbm:no-transaction\nSET work_mem = '9MB';\nSELECT 1;",
        // What the next file sees: each file's SET ends with it.
        "003_after.sql":
          "CREATE TABLE {{tables.seen}} AS SELECT current_setting('work_mem') AS mem;",
      },
      moduleName: "m",
    });
    await migrator.applyPending();
    assert.equal(await db.tableExists("dumped"), true);
    assert.deepEqual(await db.fetchOne("SELECT mem FROM {{tables.seen}}"), { mem: defaults?.mem });
    // One connection in the pool: the migration ran on the connection that serves this.
    assert.deepEqual(
      await db.fetchOne(
        "SELECT current_setting('search_path') AS path, " +
          "current_setting('work_mem') AS mem, current_setting('lock_timeout') AS lock",
      ),
      defaults,
    );
  }, 1);
});

serverTest("Migrator uses a custom migrationsTable in the manager's schema", async () => {
  await withSchema(async ({ db, schema }) => {
    const migrator = new Migrator(db, {
      migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
      moduleName: "m",
      migrationsTable: "my_history",
    });
    await migrator.applyPending();
    assert.equal(await db.tableExists(`${schema}.my_history`), true);
    assert.equal(await db.tableExists(`${schema}.schema_migrations`), false);
    assert.deepEqual((await historyRows(db, "my_history")).map((h) => h.filename), ["001_a.sql"]);
  });
});

serverTest(
  "Migrator.rollbackMigration() removes only the history row so the file runs again",
  async () => {
    await withSchema(async ({ db }) => {
      const migrations = { "001_a.sql": "CREATE TABLE IF NOT EXISTS {{tables.a}} (id int);" };
      const migrator = new Migrator(db, { migrations, moduleName: "m" });
      assert.equal(await migrator.rollbackMigration("001_a.sql"), false);
      await migrator.applyPending();
      assert.equal(await migrator.rollbackMigration("001_a.sql"), true);
      assert.equal(await migrator.rollbackMigration("001_a.sql"), false);
      assert.equal(await db.tableExists("a"), true);
      assert.deepEqual((await migrator.getPending()).map((m) => m.filename), ["001_a.sql"]);
      assert.equal((await migrator.applyPending()).status, "success");
    });
  },
);

serverTest(
  "Migrator.applyPending() through a broken migrations.json applies nothing and names the manifest",
  async () => {
    const folders = [
      "not_json",
      "not_a_list",
      "not_sql",
      "not_a_string",
      "in_a_folder",
      "listed_twice",
      "missing_file",
    ];
    await withSchema(async ({ db }) => {
      await db.ensureSchema();
      for (const folder of folders) {
        const migrationsPath = new URL(`broken_manifest/${folder}/`, FIXTURES).href;
        const migrator = new Migrator(db, { migrationsPath, moduleName: "manifest" });
        const error = await migrator.applyPending().then(() => undefined, (e) => e);
        assert.ok(
          error instanceof MigrationError,
          `${folder}: expected MigrationError, got ${error}`,
        );
        assert.equal(
          error.reason,
          folder === "missing_file" ? "missing_file" : "invalid_manifest",
          folder,
        );
        assert.match(
          error.message,
          folder === "missing_file"
            ? /Cannot read migration '.*002_missing\.sql'/
            : /manifest '.*migrations\.json'/,
          folder,
        );
        // The listed file that exists (001_a.sql) was not applied before the error.
        assert.equal(await db.tableExists("manifest_a"), false, `${folder}: 001_a.sql ran`);
      }
      const tables = await db.fetchAll<{ name: string }>(
        "SELECT tablename AS name FROM pg_tables WHERE schemaname = $1",
        [db.schema],
      );
      assert.deepEqual(tables, [], "the failed runs created tables");
    });
  },
);

serverTest(
  "Migrator.createMigration() writes a timestamped file into the folder only",
  async () => {
    const dir = await Deno.makeTempDir();
    const pool = await createSharedPool({ connectionString: TEST_URL, maxConnections: 1 });
    try {
      const db = new DatabaseManager({ pool, schema: uniqueSchema() });
      const migrator = new Migrator(db, {
        migrationsPath: join(dir, "migrations"),
        moduleName: "m",
      });
      const now = new Date(Date.UTC(2025, 9, 25, 12, 0, 0));
      const path = await migrator.createMigration("add_users", "CREATE TABLE x (id int);", { now });
      assert.equal(path, join(dir, "migrations", "20251025120000_add_users.sql"));
      assert.equal(await Deno.readTextFile(path), "CREATE TABLE x (id int);");
      // The same second again: the next free second, so versions stay unique.
      const second = await migrator.createMigration("more", "SELECT 1;", { now });
      assert.equal(second, join(dir, "migrations", "20251025120001_more.sql"));
      await assert.rejects(migrator.createMigration("../escape", "SELECT 1;"), MigrationError);
      await assert.rejects(migrator.createMigration("a b", "SELECT 1;"), MigrationError);
      const inMemory = new Migrator(db, { migrations: {}, moduleName: "m" });
      await assert.rejects(inMemory.createMigration("x", "SELECT 1;"), /only a directory/);
      assert.deepEqual(
        [...Deno.readDirSync(join(dir, "migrations"))].map((e) => e.name).sort(),
        ["20251025120000_add_users.sql", "20251025120001_more.sql"],
      );
    } finally {
      await pool.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

serverTest("new Migrator() validates its options before any SQL", () => {
  const db = new DatabaseManager({ connectionString: TEST_URL, schema: "never_used" });
  const check = (options: unknown, field: string): void => {
    assert.throws(
      () => new Migrator(db, options as ConstructorParameters<typeof Migrator>[1]),
      (error: unknown) => error instanceof ConfigurationError && error.field === field,
    );
  };
  check({ migrations: {} }, "moduleName");
  check({ migrations: {}, moduleName: "" }, "moduleName");
  check({ migrations: {}, moduleName: "x".repeat(101) }, "moduleName");
  check({ moduleName: "m" }, "migrationsPath");
  check({ migrations: {}, moduleName: "m", migrationsTable: "bad-name" }, "migrationsTable");
  check({ migrations: {}, moduleName: "m", migrationsTable: "x; DROP TABLE y" }, "migrationsTable");
  check({ migrations: {}, moduleName: "m", lockTimeoutMs: -1 }, "lockTimeoutMs");
  check({ migrations: {}, moduleName: "m", lockRetries: Number.NaN }, "lockRetries");
  check(undefined, "moduleName");
});

Deno.test("Migrator reads checksums byte-identical to Python pgdbm's on 45 file variants", async () => {
  // Each file's checksum as pgdbm computes it (Path.read_text(encoding="utf-8"), CRLF to LF,
  // str.strip(), SHA-256 hex), over LF, CRLF and CR endings, with and without a BOM, and
  // with whitespace only Python strips.
  const cases = JSON.parse(
    await Deno.readTextFile(new URL("../fixtures/pgdbm_checksums.json", import.meta.url)),
  ) as { filename: string; content: string; checksum: string }[];
  assert.equal(cases.length, 45);
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_checksums_" });
  try {
    for (const c of cases) {
      await Deno.writeFile(join(dir, c.filename), new TextEncoder().encode(c.content));
    }
    // Never connected: reading the folder needs no database.
    const db = new DatabaseManager({ connectionString: "pglite:memory" });
    const files = await new Migrator(db, { migrationsPath: dir, moduleName: "m" })
      .findMigrationFiles();
    assert.deepEqual(
      files.map((f) => [f.filename, f.checksum]),
      cases.map((c) => [c.filename, c.checksum]),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("new Migrator() refuses a first argument that is not a DatabaseManager", () => {
  for (const db of [null, undefined, {}, "postgres://x/y"]) {
    assert.throws(
      () => new Migrator(db as unknown as DatabaseManager, { migrations: {}, moduleName: "m" }),
      (error: unknown) =>
        error instanceof TypeError &&
        /first argument must be a DatabaseManager/.test(error.message),
    );
  }
});

serverTest(
  "Migrator keeps the history of a module whose name has quotes, backslashes and braces",
  async () => {
    await withSchema(async ({ pool, schema }) => {
      // The history's statements carry the module name as a literal: it must reach the
      // table exactly, and select only its own rows, whatever characters it holds.
      const names = ["it's", "back\\slash\\'", "{{tables.x}} {{schema}}", "ünï 🎉 E'x'"];
      for (const [i, moduleName] of names.entries()) {
        const db = new DatabaseManager({ pool, schema: `${schema}_${i}` });
        try {
          const migrator = new Migrator(db, { migrationsPath: fixture("basic"), moduleName });
          assert.equal((await migrator.applyPending()).status, "success", moduleName);
          assert.equal((await migrator.applyPending()).status, "up_to_date", moduleName);
          const modules = (await historyRows(db)).map((row) => row.module_name);
          assert.ok(modules.length > 0 && modules.every((name) => name === moduleName));
        } finally {
          await db.execute(`DROP SCHEMA IF EXISTS "${schema}_${i}" CASCADE`);
        }
      }
    });
  },
);
