/**
 * Migration files as real projects have them (pg_dump output, files written for Python
 * pgdbm), applied through the Migrator against the test server in fresh databases.
 */
import assert from "node:assert/strict";
import { MigrationError } from "../../src/errors.ts";
import { DatabaseManager } from "../../src/manager.ts";
import { Migrator } from "../../src/migrate/migrator.ts";
import { createSharedPool, type Pool } from "../../src/pool/pool.ts";
import { createTestDatabase } from "../../src/testing/mod.ts";
import { splitSqlStatements } from "../../src/_sql.ts";
import { serverTest, TEST_URL } from "../_support/server.ts";
import { settlesWithin } from "../_support/settle.ts";

interface FreshDb {
  url: string;
  pool: Pool;
  /** A manager without a schema. */
  db: DatabaseManager;
}

/** A fresh database and a one-connection pool on it (so every call sees one session). */
async function withDatabase(fn: (fresh: FreshDb) => Promise<void>): Promise<void> {
  await using test = await createTestDatabase({ url: TEST_URL });
  const url = test.url!; // on a server, the test database has a URL
  const pool = await createSharedPool({ connectionString: url, maxConnections: 1 });
  try {
    await fn({ url, pool, db: new DatabaseManager({ pool }) });
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

serverTest(
  "Migrator runs each migration with search_path set to the manager's schema, then public",
  async () => {
    await withDatabase(async ({ pool, db: base }) => {
      await base.execute(
        "CREATE FUNCTION public.shared_helper() RETURNS int LANGUAGE sql AS 'SELECT 7'",
      );
      const db = new DatabaseManager({ pool, schema: "tenant_a" });
      const migrator = new Migrator(db, {
        migrations: {
          // Written for Python pgdbm: unqualified names, an extension, a helper in public.
          "001_tables.sql": [
            'CREATE EXTENSION IF NOT EXISTS "uuid-ossp";',
            "CREATE TABLE items (id uuid PRIMARY KEY DEFAULT uuid_generate_v4(), n int);",
            "CREATE FUNCTION item_count() RETURNS bigint LANGUAGE sql AS",
            "  'SELECT count(*) FROM items';",
            "INSERT INTO items (n) VALUES (shared_helper());",
          ].join("\n"),
          "002_index.sql": [
            "-- pgdbm:no-transaction",
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS items_n ON items (n);",
            "CREATE TABLE later (id int);",
            "COPY later FROM stdin;",
            "1",
            "\\.",
            "COPY {{tables.later}} (id) FROM stdin;",
            "2",
            "\\.",
          ].join("\n"),
        },
        moduleName: "m",
      });
      const result = await migrator.applyPending();
      assert.equal(result.applied.length, 2);
      const where = await base.fetchAll<{ kind: string; schema: string }>(
        `SELECT 'table ' || c.relname AS kind, n.nspname AS schema
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relname IN ('items', 'items_n', 'later')
         UNION ALL
         SELECT 'extension', n.nspname FROM pg_extension e
           JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'uuid-ossp'
         UNION ALL
         SELECT 'function', n.nspname FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = 'item_count'
         ORDER BY 1`,
      );
      assert.deepEqual(where.map((w) => `${w.kind}: ${w.schema}`), [
        "extension: tenant_a",
        "function: tenant_a",
        "table items: tenant_a",
        "table items_n: tenant_a",
        "table later: tenant_a",
      ]);
      assert.equal(await db.fetchValue("SELECT n FROM {{tables.items}}"), 7);
      assert.equal(await db.fetchValue("SELECT sum(id)::int FROM {{tables.later}}"), 3);
      // Queries of the application still run with the session's own search_path.
      assert.equal(await db.fetchValue("SHOW search_path"), '"$user", public');
      assert.equal(await db.tableExists("tenant_a.schema_migrations"), true);
    });
  },
);

/** A file as `pg_dump` writes table data: COPY … FROM stdin, its rows, then `\.`. */
const COPY_FILE = [
  "CREATE TABLE public.notes (id integer, body text, tags text[]);",
  "",
  "COPY public.notes (id, body, tags) FROM stdin;",
  "1\ttab\\there; and 'quote'\t{a,b}",
  "2\t\\N\t\\N",
  "3\tback\\\\slash\\nnew line\t{}",
  "\\.",
  "",
  "COPY public.notes (id, body) FROM stdin WITH (FORMAT csv);",
  '4,"comma, ""csv"";"',
  "\\.",
  "",
  "CREATE TABLE public.after_copy (id integer);",
  "",
].join("\n");

for (const mode of ["transaction", "no-transaction"] as const) {
  for (const lock of ["session", "transaction"] as const) {
    if (mode === "no-transaction" && lock === "transaction") continue;
    serverTest(
      `Migrator feeds COPY … FROM stdin data blocks to the server (${mode}, lock: ${lock})`,
      async () => {
        await withDatabase(async ({ db }) => {
          const marker = mode === "no-transaction" ? "-- pgdbm:no-transaction\n" : "";
          const migrator = new Migrator(db, {
            migrations: {
              "001_data.sql": marker + COPY_FILE,
              "002_more.sql": "COPY public.notes (id) FROM stdin;\n5\n\\.\n",
            },
            moduleName: "m",
            lock,
          });
          const result = await migrator.applyPending();
          assert.deepEqual(result.applied.map((m) => m.filename), ["001_data.sql", "002_more.sql"]);
          const rows = await db.fetchAll<{ id: number; body: string | null; tags: string[] }>(
            "SELECT id, body, tags FROM public.notes ORDER BY id",
          );
          assert.deepEqual(rows.map((r) => [r.id, r.body, r.tags]), [
            [1, "tab\there; and 'quote'", ["a", "b"]],
            [2, null, null],
            [3, "back\\slash\nnew line", []],
            [4, 'comma, "csv";', null],
            [5, null, null],
          ]);
          assert.equal(await db.tableExists("public.after_copy"), true);
          assert.equal((await migrator.applyPending()).status, "up_to_date");
        });
      },
    );
  }
}

serverTest(
  "Migrator reports bad COPY data as the COPY's failure, records nothing and keeps no lock",
  async () => {
    await withDatabase(async ({ db }) => {
      for (const marker of ["", "-- pgdbm:no-transaction\n"]) {
        const migrator = new Migrator(db, {
          migrations: {
            "001_bad.sql": marker + "CREATE TABLE IF NOT EXISTS public.n (id int);\n" +
              "COPY public.n (id) FROM stdin;\n1\nnot a number\n\\.\nSELECT 1;\n",
          },
          moduleName: "m",
          lockWaitTimeoutMs: 2000,
        });
        await assert.rejects(migrator.applyPending(), (error: unknown) => {
          assert.ok(error instanceof MigrationError, String(error));
          assert.equal(error.filename, "001_bad.sql");
          // The line of the bad row in the file (the COPY is at line 2, the row at 4).
          assert.equal(error.line, marker === "" ? 4 : 5);
          assert.match(error.message, /at line [45] failed: invalid input syntax for type integer/);
          return true;
        });
        assert.deepEqual(await migrator.getApplied(), []);
        if (marker === "") assert.equal(await db.tableExists("public.n"), false);
        else assert.equal(await db.fetchValue("SELECT count(*)::int FROM public.n"), 0);
        // The lock was released: another run gets it at once (and fails the same way).
        await assert.rejects(migrator.applyPending(), /invalid input syntax/);
      }
    });
  },
);

/** A schema with most kinds of objects and awkward values, made in the source database. */
const RICH_SCHEMA = String.raw`
CREATE SCHEMA app;
CREATE DOMAIN app.email AS text CHECK (VALUE ~ '^[^@]+@[^@]+$');
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE app.pair AS (a int, b text);
CREATE TYPE app.floatrange AS RANGE (subtype = float8);
CREATE TABLE app.users (
  id serial PRIMARY KEY,
  email app.email UNIQUE,
  mood app.mood DEFAULT 'ok',
  pair app.pair,
  span app.floatrange,
  bio text,
  created timestamptz DEFAULT now()
);
CREATE TABLE app.events (id bigint GENERATED ALWAYS AS IDENTITY, at date NOT NULL, payload jsonb)
  PARTITION BY RANGE (at);
CREATE TABLE app.events_2024 PARTITION OF app.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE app.events_2025 PARTITION OF app.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  NEW.bio := coalesce(NEW.bio, 'none; yet $$');
  RETURN NEW;
END
$body$;
CREATE TRIGGER users_touch BEFORE INSERT ON app.users FOR EACH ROW EXECUTE FUNCTION app.touch();
CREATE FUNCTION app.add(a int, b int) RETURNS int LANGUAGE sql IMMUTABLE
BEGIN ATOMIC
  SELECT CASE WHEN a > 0 THEN a + b ELSE b END;
END;
CREATE FUNCTION app.greet(who text) RETURNS text LANGUAGE sql AS $fn$ SELECT 'hi; ' || who $fn$;
CREATE PROCEDURE app.bump(n int) LANGUAGE plpgsql AS $$
BEGIN UPDATE app.users SET mood = 'happy' WHERE id = n; END
$$;
CREATE TABLE app.audit (id serial PRIMARY KEY, note text);
CREATE RULE users_audit AS ON UPDATE TO app.users DO ALSO (
  INSERT INTO app.audit (note) VALUES ('u; ' || NEW.id);
  INSERT INTO app.audit (note) VALUES ('twice')
);
CREATE VIEW app.happy AS SELECT id, email FROM app.users WHERE mood = 'happy';
CREATE MATERIALIZED VIEW app.mood_counts AS SELECT mood, count(*) AS n FROM app.users GROUP BY mood;
ALTER TABLE app.users ENABLE ROW LEVEL SECURITY;
CREATE POLICY users_self ON app.users USING (email::text = current_user);
COMMENT ON TABLE app.users IS E'People; with \'quotes\' and a\nnewline';
COMMENT ON COLUMN app.users.bio IS 'bio $$ not a tag; -- nor a comment';
CREATE INDEX users_bio ON app.users (lower(bio));
INSERT INTO app.users (email, mood, pair, span, bio) VALUES
  ('a@x.io', 'sad', ROW(1, 'x;y'), '[1.5,2.5)', E'tab\there\\back\nline \\N'),
  ('b@x.io', 'happy', NULL, NULL, NULL),
  ('c@x.io', 'ok', ROW(2, NULL), 'empty', 'semi; colon ''quoted'' \.');
INSERT INTO app.events (at, payload) VALUES ('2024-05-01', '{"k": "v;\t\\"}'), ('2025-02-02', NULL);
CALL app.bump(3);
REFRESH MATERIALIZED VIEW app.mood_counts;
`;

const TABLES = ["app.users", "app.events", "app.audit", "app.mood_counts"];

async function pgDump(url: string, ...args: string[]): Promise<string> {
  const output = await new Deno.Command("pg_dump", {
    args: [...args, "--exclude-table=public.schema_migrations*", url],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  assert.equal(output.code, 0, decoder.decode(output.stderr));
  return decoder.decode(output.stdout);
}

/** A dump to compare: without pg_dump's random \restrict keys. */
function comparable(dump: string): string {
  return dump.split("\n").filter((line) => !/^\\(un)?restrict /.test(line)).join("\n");
}

async function rowCounts(
  db: DatabaseManager,
  tables = TABLES,
): Promise<Record<string, number>> {
  const counts: Record<string, number> = {};
  for (const table of tables) {
    counts[table] = await db.fetchValue<number>(`SELECT count(*)::int FROM ${table}`) ?? -1;
  }
  return counts;
}

serverTest(
  "Migrator applies pg_dump output of a rich schema as psql does (schema, data, --inserts)",
  async (t) => {
    await withDatabase(async ({ url: sourceUrl, db: source }) => {
      for (const statement of splitSqlStatements(RICH_SCHEMA)) {
        await source.execute(statement.text);
      }
      const expectedSchema = comparable(await pgDump(sourceUrl, "--schema-only"));
      const expectedCounts = await rowCounts(source);
      assert.deepEqual(expectedCounts, {
        "app.users": 3,
        "app.events": 2,
        "app.audit": 2,
        "app.mood_counts": 2,
      });
      const dumps = {
        "schema only": await pgDump(sourceUrl, "--schema-only"),
        "with COPY data": await pgDump(sourceUrl),
        "with --inserts": await pgDump(sourceUrl, "--inserts"),
      };
      assert.match(dumps["with COPY data"], /^COPY app\.users .* FROM stdin;$/m);
      assert.match(dumps["with COPY data"], /^\\restrict /m);
      for (const [variant, dump] of Object.entries(dumps)) {
        for (const marker of ["", "-- pgdbm:no-transaction\n"]) {
          const mode = marker === "" ? "in a transaction" : "no-transaction";
          await t.step(`${variant}, ${mode}`, async () => {
            await withDatabase(async ({ url, db }) => {
              const migrator = new Migrator(db, {
                migrations: { "001_dump.sql": marker + dump },
                moduleName: "dump",
              });
              const result = await migrator.applyPending();
              assert.deepEqual(result.applied.map((m) => m.filename), ["001_dump.sql"]);
              assert.equal(comparable(await pgDump(url, "--schema-only")), expectedSchema);
              if (variant === "schema only") {
                // Tables empty, and the materialized view made WITH NO DATA.
                assert.deepEqual(await rowCounts(db, TABLES.slice(0, 3)), {
                  "app.users": 0,
                  "app.events": 0,
                  "app.audit": 0,
                });
                assert.equal(
                  await db.fetchValue(
                    "SELECT relispopulated FROM pg_class WHERE oid = 'app.mood_counts'::regclass",
                  ),
                  false,
                );
              } else {
                assert.deepEqual(await rowCounts(db), expectedCounts);
                assert.deepEqual(
                  await db.fetchAll("SELECT * FROM app.users ORDER BY id"),
                  await source.fetchAll("SELECT * FROM app.users ORDER BY id"),
                );
                assert.deepEqual(
                  await db.fetchAll("SELECT * FROM app.events ORDER BY id"),
                  await source.fetchAll("SELECT * FROM app.events ORDER BY id"),
                );
              }
              assert.equal((await migrator.applyPending()).status, "up_to_date");
              assert.equal(await db.fetchValue("SHOW search_path"), '"$user", public');
            });
          });
        }
      }
    });
  },
);

serverTest("Migrator refuses a psql meta-command in a file, naming it and its line", async () => {
  await withDatabase(async ({ db }) => {
    const migrator = new Migrator(db, {
      migrations: { "001_meta.sql": "CREATE TABLE a (id int);\n\\connect other\nSELECT 1;\n" },
      moduleName: "m",
    });
    await assert.rejects(migrator.applyPending(), (error: unknown) => {
      assert.ok(error instanceof MigrationError);
      assert.equal(error.line, 2);
      assert.match(error.message, /line 2 is the psql command '\\connect'/);
      return true;
    });
    assert.equal(await db.tableExists("public.a"), false);
    assert.deepEqual(await migrator.getApplied(), []);
  });
});

serverTest("Migrator refuses COPY … TO STDOUT in a file, naming its line", async () => {
  await withDatabase(async ({ db }) => {
    for (const marker of ["", "-- pgdbm:no-transaction\n"]) {
      const migrator = new Migrator(db, {
        migrations: {
          "001_out.sql": marker + "CREATE TABLE out_t (id int);\nCOPY out_t TO stdout;\n",
        },
        moduleName: "m",
      });
      await assert.rejects(migrator.applyPending(), (error: unknown) => {
        assert.ok(error instanceof MigrationError);
        assert.equal(error.line, marker === "" ? 2 : 3);
        assert.match(error.message, /'COPY … TO STDOUT', whose rows psql prints/);
        return true;
      });
      assert.equal(await db.tableExists("public.out_t"), false);
    }
  });
});

serverTest("applyPending({ signal }) stops a long COPY data block and rolls it back", async () => {
  await withDatabase(async ({ url, db }) => {
    const rows = Array.from(
      { length: 400_000 },
      (_, i) => `${i}\tsome text to make the row longer`,
    );
    // The COPY stalls at row 1,000 until the test lets it go (an advisory lock the test
    // holds): the abort is signalled while the server is inside the COPY, however fast or
    // slow the machine is, and the rest of the data is still to be sent when the gate opens.
    const gate = await createSharedPool({ connectionString: url, maxConnections: 1 });
    try {
      const gateKeeper = new DatabaseManager({ pool: gate });
      await gateKeeper.execute("SELECT pg_advisory_lock(4242)");
      await db.execute(
        "CREATE FUNCTION public.stall() RETURNS boolean LANGUAGE plpgsql AS " +
          "$$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN true; END $$",
      );
      const migrator = new Migrator(db, {
        migrations: {
          "001_big.sql":
            "CREATE TABLE public.big (id int CHECK (id <> 1000 OR public.stall()), body text);\n" +
            "COPY public.big (id, body) FROM stdin;\n" + rows.join("\n") + "\n\\.\n",
        },
        moduleName: "m",
        // The COPY waits at the gate for as long as the watcher takes to see it.
        lockTimeoutMs: 120_000,
      });
      const controller = new AbortController();
      // Abort once the server's COPY waits at the gate, then open the gate.
      const watcher = (async () => {
        const watch = new DatabaseManager({ pool: gate });
        while (true) {
          const stalled = await watch.fetchValue<number>(
            "SELECT count(*)::int FROM pg_stat_activity WHERE datname = current_database() " +
              "AND query LIKE 'COPY public.big%' AND wait_event_type = 'Lock' " +
              "AND wait_event = 'advisory'",
          );
          if (stalled === 1) break;
          await new Promise((resolve) => setTimeout(resolve, 5));
        }
        controller.abort(new Error("stop"));
        await gateKeeper.execute("SELECT pg_advisory_unlock(4242)");
      })();
      await assert.rejects(
        migrator.applyPending({ signal: controller.signal }),
        (error: unknown) => {
          assert.ok(error instanceof MigrationError, String(error));
          assert.match(error.message, /aborted \(stop\)/);
          assert.match(error.message, /rolled it back/);
          return true;
        },
      );
      await watcher;
      assert.equal(await db.tableExists("public.big"), false);
      assert.deepEqual(await migrator.getApplied(), []);
      // The lock was released: the next run applies the file.
      assert.equal((await migrator.applyPending()).status, "success");
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM public.big"), 400_000);
    } finally {
      await gate.close();
    }
  });
});

serverTest(
  "applyPending({ signal }) stops a COPY while the server is busy on one of its rows",
  async () => {
    await withDatabase(async ({ url, db }) => {
      // Row 2 keeps the server busy for 60 s after the whole data block was sent: only a cancel
      // request sent with the abort ends the COPY sooner.
      await db.execute(
        "CREATE FUNCTION public.slow() RETURNS boolean LANGUAGE sql AS " +
          "$$ SELECT true FROM pg_sleep(60) $$",
      );
      const migrator = new Migrator(db, {
        migrations: {
          "001_busy.sql": "CREATE TABLE public.busy (id int CHECK (id <> 2 OR public.slow()));\n" +
            "COPY public.busy (id) FROM stdin;\n1\n2\n3\n\\.\n",
        },
        moduleName: "m",
      });
      const controller = new AbortController();
      const watcher = (async () => {
        const pool = await createSharedPool({ connectionString: url, maxConnections: 1 });
        try {
          const watch = new DatabaseManager({ pool });
          while (!controller.signal.aborted) {
            const sleeping = await watch.fetchValue<number>(
              "SELECT count(*)::int FROM pg_stat_activity " +
                "WHERE datname = current_database() AND wait_event = 'PgSleep'",
            );
            if (sleeping === 1) controller.abort(new Error("stop"));
            else await new Promise((resolve) => setTimeout(resolve, 10));
          }
        } finally {
          await pool.close();
        }
      })();
      await settlesWithin(
        assert.rejects(migrator.applyPending({ signal: controller.signal }), (error: unknown) => {
          assert.ok(error instanceof MigrationError, String(error));
          assert.match(error.message, /aborted \(stop\)/);
          return true;
        }),
        20_000,
        "the aborted migration whose COPY row sleeps 60 s",
      );
      await watcher;
      assert.equal(await db.tableExists("public.busy"), false);
      assert.deepEqual(await migrator.getApplied(), []);
    });
  },
);
