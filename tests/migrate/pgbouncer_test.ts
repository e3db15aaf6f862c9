/**
 * Racing Migrators through a real PgBouncer 1.18 in transaction mode (tests/_support/pgbouncer.ts),
 * `prepare: false`, two server connections for six clients, so the clients' statements
 * land on whichever server session is free:
 * - `lock: "transaction"`: every racer succeeds and every migration is applied exactly
 *   once (history rows and side effects counted); a migration's `SET` does not leak into
 *   the server connection.
 * - `lock: "session"` (the default): each racer succeeds or fails with a MigrationError
 *   naming the fix (`lock: "transaction"`), and still no migration is applied twice; a
 *   server session that already holds the lock for another client is refused at once.
 */
import assert from "node:assert/strict";
import postgres from "postgres";
import {
  createSharedPool,
  type DatabaseConfig,
  DatabaseManager,
  MigrationError,
  type MigrationResult,
  Migrator,
  type MigratorOptions,
} from "../../mod.ts";
import { RACE_FILES } from "../_support/race_migrations.ts";
import { observe, TEST_URL, uniqueName } from "../_support/server.ts";
import {
  IGNORED_STARTUP_PARAMETERS,
  type PgBouncer,
  pgbouncerSkipReason,
  startPgBouncer,
} from "../_support/pgbouncer.ts";

const unavailable = await pgbouncerSkipReason();

const RACERS = 6;

/** How a racer ended. */
type Outcome = { result: MigrationResult } | { error: unknown };

/** Starts `RACERS` migrators at once, each on a pool of its own through PgBouncer. */
async function race(
  config: DatabaseConfig,
  schema: string,
  options: Omit<MigratorOptions, "migrations" | "moduleName">,
): Promise<Outcome[]> {
  const pools = await Promise.all(
    Array.from(
      { length: RACERS },
      () => createSharedPool({ ...config, minConnections: 1, maxConnections: 2 }),
    ),
  );
  try {
    // Every pool is connected before any migrator starts.
    await Promise.all(pools.map((pool) => new DatabaseManager({ pool }).fetchValue("SELECT 1")));
    return await Promise.all(
      pools.map((pool) =>
        new Migrator(new DatabaseManager({ pool, schema }), {
          migrations: RACE_FILES,
          moduleName: "race",
          lockPollMaxMs: 50,
          ...options,
        }).applyPending().then(
          (result): Outcome => ({ result }),
          (error): Outcome => ({ error }),
        )
      ),
    );
  } finally {
    await Promise.all(pools.map((pool) => pool.close()));
  }
}

/** The history rows and side effects of the schema, read directly from the server. */
async function tally(schema: string): Promise<{
  history: string[];
  effects: Record<string, number>;
  pids: number;
}> {
  return await observe(async (sql) => {
    const exists = await sql`SELECT to_regclass(${`"${schema}".applied_log`}) IS NOT NULL AS t,
      to_regclass(${`"${schema}".schema_migrations`}) IS NOT NULL AS h`;
    const history = exists[0].h
      ? (await sql.unsafe(`SELECT filename FROM "${schema}".schema_migrations ORDER BY id`))
        .map((r) => r.filename as string)
      : [];
    if (!exists[0].t) return { history, effects: {}, pids: 0 };
    const rows = await sql.unsafe(
      `SELECT filename, count(*)::int AS n FROM "${schema}".applied_log GROUP BY filename`,
    );
    const [{ pids }] = await sql.unsafe(
      `SELECT count(DISTINCT pid)::int AS pids FROM "${schema}".applied_log`,
    );
    return {
      history,
      effects: Object.fromEntries(rows.map((r) => [r.filename as string, r.n as number])),
      pids: pids as number,
    };
  });
}

async function dropSchema(schema: string): Promise<void> {
  await observe((sql) => sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`));
}

Deno.test({
  name: unavailable === undefined
    ? "Migrator racing through PgBouncer 1.18 in transaction mode (2 server connections)"
    : `Migrator racing through PgBouncer (skipped: ${unavailable})`,
  ignore: unavailable !== undefined,
  async fn(t) {
    const bouncer: PgBouncer = await startPgBouncer(TEST_URL, {
      settings: { ignore_startup_parameters: IGNORED_STARTUP_PARAMETERS.join(", ") },
      databases: { pgdbm_two: "pool_size=2", pgdbm_one: "pool_size=1" },
    });
    const config: DatabaseConfig = { connectionString: bouncer.url("pgdbm_two"), prepare: false };
    const watchdog = setTimeout(() => {
      console.error("PgBouncer migrate test still running after 120 s: stopping PgBouncer");
      bouncer.stop().catch(() => {});
    }, 120_000);
    try {
      await t.step(
        `lock: "transaction": ${RACERS} racing migrators all succeed, each migration applied once`,
        async () => {
          const schema = uniqueName("pgb_race_tx");
          try {
            const outcomes = await race(config, schema, { lock: "transaction" });
            const files = Object.keys(RACE_FILES);
            const applied: string[] = [];
            for (const outcome of outcomes) {
              assert.ok(
                "result" in outcome,
                `a racer failed: ${(outcome as { error: unknown }).error}`,
              );
              const { result } = outcome;
              applied.push(...result.applied.map((m) => m.filename));
              const seen = [...result.skipped, ...result.applied.map((m) => m.filename)].sort();
              assert.deepEqual(seen, files, "each racer applied or skipped every file");
            }
            assert.deepEqual(applied.sort(), files, "each file applied by exactly one racer");
            const { history, effects, pids } = await tally(schema);
            assert.deepEqual(history, files, "one history row per file, in version order");
            assert.deepEqual(effects, Object.fromEntries(files.map((f) => [f, 1])));
            // Six clients shared the two server connections of the pool.
            assert.ok(pids >= 1 && pids <= 2, `migrations ran on ${pids} server processes`);
            const left = await observe((sql) =>
              sql`SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory'
                AND objsubid = 2 AND classid = oid(hashtext('pgdbm_migration_race')::bigint & 4294967295)
                AND objid = oid(hashtext(${schema})::bigint & 4294967295)`
            );
            assert.equal(left[0].n, 0, "no lock left behind");
          } finally {
            await dropSchema(schema);
          }
        },
      );

      await t.step(
        `lock: "session": racers succeed or fail naming lock: "transaction"; nothing applied twice`,
        async () => {
          const schema = uniqueName("pgb_race_session");
          try {
            const outcomes = await race(config, schema, { lockWaitTimeoutMs: 5_000 });
            let succeeded = 0;
            const applied: string[] = [];
            for (const outcome of outcomes) {
              if ("result" in outcome) {
                succeeded++;
                applied.push(...outcome.result.applied.map((m) => m.filename));
                continue;
              }
              const { error } = outcome;
              assert.ok(error instanceof MigrationError, `expected MigrationError, got ${error}`);
              assert.match(error.message, /PgBouncer/);
              assert.match(error.message, /lock: "transaction"/, error.message);
              assert.ok(
                ["lost_lock_session", "shared_lock_session", "lock_timeout"].includes(
                  error.reason ?? "",
                ),
                `reason: ${error.reason}`,
              );
              const partial = error.partialResult;
              applied.push(...(partial?.applied ?? []).map((m) => m.filename));
            }
            const { history, effects } = await tally(schema);
            assert.equal(new Set(history).size, history.length, `a file applied twice: ${history}`);
            assert.deepEqual(
              [...applied].sort(),
              [...history].sort(),
              "the racers' reports add up",
            );
            assert.deepEqual(
              effects,
              Object.fromEntries(history.map((f) => [f, 1])),
              "each recorded migration's side effect ran once, and no other ran",
            );
            assert.deepEqual(history, Object.keys(RACE_FILES).slice(0, history.length), "in order");
            if (succeeded === RACERS) assert.equal(history.length, Object.keys(RACE_FILES).length);
          } finally {
            await dropSchema(schema);
          }
        },
      );

      await t.step(
        `lock: "session" refuses a server session that holds the lock for another client`,
        async () => {
          // pgdbm_one has one server connection. A migrator's lock that stayed there (as
          // when its unlock ran elsewhere) is what the next migrator's try lands on: the
          // advisory lock is re-entrant, so only the session's marker tells it apart.
          const schema = uniqueName("pgb_shared");
          const key = ["pgdbm_migration_shared", schema];
          const marker = "format('pgdbm.migration_lock_%s_%s', " +
            "to_hex(hashtext($1)), to_hex(hashtext($2)))";
          const other = postgres(bouncer.url("pgdbm_one"), {
            max: 1,
            prepare: false,
            onnotice: () => {},
          });
          const pool = await createSharedPool({
            connectionString: bouncer.url("pgdbm_one"),
            prepare: false,
            maxConnections: 1,
          });
          try {
            await other.unsafe(
              `SELECT pg_advisory_lock(hashtext($1), hashtext($2)), ` +
                `set_config(${marker}, 'another-run', false)`,
              key,
            );
            const db = new DatabaseManager({ pool, schema });
            const error = await new Migrator(db, {
              migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
              moduleName: "shared",
            }).applyPending().catch((e) => e);
            assert.ok(error instanceof MigrationError, `expected MigrationError, got ${error}`);
            assert.match(error.message, /already holds it for another client/);
            assert.equal(error.reason, "shared_lock_session");
            assert.match(error.message, /Nothing was applied/);
            assert.match(error.message, /lock: "transaction"/);
            assert.equal(await db.tableExists("a"), false);
            // The refused try gave its hold back: one unlock of the first holder frees it.
            const holders = (): Promise<number> =>
              observe(async (sql) =>
                (await sql`SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory'
                  AND objsubid = 2 AND classid = oid(hashtext(${key[0]})::bigint & 4294967295)
                  AND objid = oid(hashtext(${key[1]})::bigint & 4294967295)`)[0].n
              );
            assert.equal(await holders(), 1);
            const [{ released }] = await other.unsafe(
              `SELECT pg_advisory_unlock(hashtext($1), hashtext($2)) AS released, ` +
                `set_config(${marker}, '', false)`,
              key,
            );
            assert.equal(released, true);
            assert.equal(await holders(), 0, "one unlock freed it: the refused try kept no hold");
            // With lock: "transaction" the same pool migrates.
            const result = await new Migrator(db, {
              migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
              moduleName: "shared",
              lock: "transaction",
            }).applyPending();
            assert.equal(result.status, "success");
          } finally {
            await other.end({ timeout: 1 });
            await pool.close();
            await dropSchema(schema);
          }
        },
      );

      await t.step(
        `lock: "transaction": a migration's SET does not stay on the server connection`,
        async () => {
          // pgdbm_one has one server connection: the migration and the check share it.
          const pool = await createSharedPool({
            connectionString: bouncer.url("pgdbm_one"),
            prepare: false,
            maxConnections: 1,
          });
          const schema = uniqueName("pgb_set");
          try {
            const db = new DatabaseManager({ pool, schema });
            const probe = "SELECT current_setting('work_mem') AS mem, " +
              "current_setting('search_path') AS path, pg_backend_pid() AS pid";
            const before = await db.fetchOne<{ mem: string; path: string; pid: number }>(probe);
            const result = await new Migrator(db, {
              migrations: {
                "001_dump.sql": "SET work_mem = '7MB';\n" +
                  "SELECT pg_catalog.set_config('search_path', '', false);\n" +
                  "CREATE TABLE {{tables.dumped}} (id int);",
              },
              moduleName: "dump",
              lock: "transaction",
            }).applyPending();
            assert.equal(result.status, "success");
            const after = await db.fetchOne<{ mem: string; path: string; pid: number }>(probe);
            assert.equal(after?.pid, before?.pid, "the same server connection");
            assert.deepEqual(after, before);
          } finally {
            await pool.close();
            await dropSchema(schema);
          }
        },
      );
    } catch (error) {
      console.error(`PgBouncer log:\n${(await bouncer.log()).split("\n").slice(-40).join("\n")}`);
      throw error;
    } finally {
      clearTimeout(watchdog);
      await bouncer.stop();
    }
  },
});
