/**
 * Ctrl-C (SIGINT) and SIGTERM during `migrate apply`, with the real command as a child
 * process against the test server: the running statement is cancelled on the server, the
 * migration rolls back, the advisory lock is released, the output says so, and the exit
 * code is 130. Also `Migrator.applyPending({ signal })` in process, which the CLI uses.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createSharedPool, DatabaseManager, MigrationError, Migrator } from "../../mod.ts";
import type { MigrationResult } from "../../src/migrate/migrator.ts";
import { observe, serverTest, TEST_URL, uniqueName } from "../_support/server.ts";

const CLI = fileURLToPath(new URL("../../src/cli/mod.ts", import.meta.url));
const DENO_JSON = fileURLToPath(new URL("../../deno.json", import.meta.url));

/** How soon an interrupted run must have exited. */
const EXIT_WITHIN_MS = 5_000;

/** The variables the child keeps from this process (Deno's cache, PATH); nothing else. */
function baseEnv(): Record<string, string> {
  const env: Record<string, string> = { NO_COLOR: "1", DATABASE_URL: TEST_URL };
  for (const name of ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  return env;
}

/** A CLI child process whose output is collected while it runs. */
interface Running {
  child: Deno.ChildProcess;
  stdout(): string;
  stderr(): string;
  /** The exit code, or a failure when it has not exited within `ms`. */
  exit(ms: number): Promise<number>;
}

function collect(stream: ReadableStream<Uint8Array>): { text: () => string; done: Promise<void> } {
  let text = "";
  const done = (async () => {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) text += chunk;
  })();
  return { text: () => text, done };
}

/** Starts `pgdbm <args>` in `cwd` (DATABASE_URL is the test server). */
function start(cwd: string, args: string[]): Running {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--config", DENO_JSON, CLI, ...args],
    cwd,
    env: baseEnv(),
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const out = collect(child.stdout);
  const err = collect(child.stderr);
  return {
    child,
    stdout: out.text,
    stderr: err.text,
    exit: async (ms) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new Error(
                `the CLI did not exit within ${ms} ms\nstdout:\n${out.text()}\nstderr:\n${err.text()}`,
              ),
            ),
          ms,
        );
      });
      try {
        const status = await Promise.race([child.status, late]);
        await Promise.all([out.done, err.done]);
        return status.code;
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

/** Kills a child that is still running (a failed test), by its handle. */
async function reap(run: Running | undefined): Promise<void> {
  if (run === undefined) return;
  try {
    run.child.kill("SIGKILL");
  } catch {
    // Already exited.
  }
  await run.child.status;
}

async function until<T>(
  what: string,
  probe: () => Promise<T | undefined> | T | undefined,
  ms = 20_000,
): Promise<T> {
  const deadline = performance.now() + ms;
  while (true) {
    const value = await probe();
    if (value !== undefined) return value;
    if (performance.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Server processes running a statement that contains `marker`. */
async function running(marker: string): Promise<number[]> {
  return await observe(async (sql) =>
    (await sql<{ pid: number }[]>`
      SELECT pid FROM pg_stat_activity
       WHERE state = 'active' AND pid <> pg_backend_pid()
         AND query LIKE ${"%pg_sleep%" + marker + "%"}`).map((row) => row.pid)
  );
}

/** Sessions holding the migration lock of (schema, module). */
async function lockHolders(schema: string, module: string): Promise<number[]> {
  return await observe(async (sql) =>
    (await sql<{ pid: number }[]>`
      SELECT pid FROM pg_locks
       WHERE locktype = 'advisory' AND objsubid = 2
         AND classid = oid(hashtext(${"pgdbm_migration_" + module})::bigint & 4294967295)
         AND objid = oid(hashtext(${schema})::bigint & 4294967295)`).map((row) => row.pid)
  );
}

async function tableExists(schema: string, table: string): Promise<boolean> {
  return await observe(async (sql) =>
    (await sql`SELECT to_regclass(${`"${schema}".${table}`}) IS NOT NULL AS found`)[0].found
  );
}

async function history(schema: string): Promise<string[]> {
  return await observe(async (sql) =>
    (await sql.unsafe(`SELECT filename FROM "${schema}".schema_migrations ORDER BY id`)).map(
      (row) => row.filename as string,
    )
  );
}

/** Ends whatever a failed test left running with `marker`, then drops the schema. */
async function cleanUp(schema: string, marker: string): Promise<void> {
  await observe(async (sql) => {
    await sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE pid <> pg_backend_pid() AND query LIKE ${"%" + marker + "%"}`;
    await sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  });
}

async function inTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_interrupt_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function writeMigrations(dir: string, files: Record<string, string>): Promise<void> {
  await Deno.mkdir(join(dir, "migrations"), { recursive: true });
  for (const [name, sql] of Object.entries(files)) {
    await Deno.writeTextFile(join(dir, "migrations", name), sql);
  }
}

serverTest(
  "cli migrate apply: SIGINT cancels the statement, rolls back, releases the lock, exits 130; " +
    "a second apply says it waits, then runs; SIGTERM stops it the same way",
  async () => {
    const schema = uniqueName("intr");
    const marker = `${schema}_sleep`;
    await inTempDir(async (dir) => {
      await writeMigrations(dir, {
        "001_first.sql": "CREATE TABLE {{tables.first_t}} (id int);\n",
        "002_slow.sql": "CREATE TABLE {{tables.slow_t}} (id int);\n" +
          `SELECT pg_sleep(30), '${marker}';\n` +
          "CREATE TABLE {{tables.after_t}} (id int);\n",
      });
      const args = ["migrate", "apply", "--path", "migrations", "--schema", schema];
      let first: Running | undefined;
      let second: Running | undefined;
      try {
        first = start(dir, args);
        const [firstPid] = await until("the first run's pg_sleep", async () => {
          const pids = await running(marker);
          return pids.length > 0 ? pids : undefined;
        });
        assert.deepEqual(await lockHolders(schema, "default"), [firstPid]);

        // A second run must say that it waits, and for whom.
        second = start(dir, args);
        await until(
          "the second run to say it waits for the lock",
          () => /Waiting for the migration lock/.test(second!.stderr()) || undefined,
        );
        assert.match(second.stderr(), new RegExp(`server process ${firstPid}\\b`));

        const interrupted = performance.now();
        first.child.kill("SIGINT");
        const code = await first.exit(EXIT_WITHIN_MS);
        const took = performance.now() - interrupted;
        const output = first.stdout() + first.stderr();
        assert.equal(code, 130, output);
        assert.ok(took < EXIT_WITHIN_MS, `exited after ${Math.round(took)} ms`);
        assert.match(first.stderr(), /Interrupted \(SIGINT\)/);
        assert.match(first.stderr(), /cancelled '002_slow\.sql'/);
        assert.match(first.stderr(), /rolled it back/);
        assert.match(first.stderr(), /released the migration lock/);
        assert.match(first.stderr(), /nothing from that file was applied/);
        assert.match(first.stderr(), /Applied by this run before the interruption: 001_first\.sql/);
        assert.doesNotMatch(output, /Error:/);

        assert.deepEqual(
          await observe(async (sql) =>
            (await sql`SELECT pid FROM pg_stat_activity
                        WHERE pid = ${firstPid} AND state = 'active'`).length
          ),
          0,
          "the first run's statement no longer runs on the server",
        );
        // The lock came free at once: the second run took it and now runs 002 itself.
        const [secondPid] = await until("the second run's pg_sleep", async () => {
          const pids = (await running(marker)).filter((pid) => pid !== firstPid);
          return pids.length > 0 ? pids : undefined;
        }, EXIT_WITHIN_MS);
        assert.deepEqual(await lockHolders(schema, "default"), [secondPid]);

        second.child.kill("SIGTERM");
        const secondCode = await second.exit(EXIT_WITHIN_MS);
        assert.equal(secondCode, 130, second.stdout() + second.stderr());
        assert.match(second.stderr(), /Interrupted \(SIGTERM\)/);
        assert.match(second.stderr(), /cancelled '002_slow\.sql'.*rolled it back/);

        assert.deepEqual(await running(marker), [], "no statement of either run is left");
        assert.deepEqual(await lockHolders(schema, "default"), [], "no advisory lock is held");
        assert.equal(await tableExists(schema, "slow_t"), false, "002 was rolled back");
        assert.equal(await tableExists(schema, "after_t"), false);
        assert.equal(await tableExists(schema, "first_t"), true, "001 stays applied");
        assert.deepEqual(await history(schema), ["001_first.sql"], "no history row for 002");

        // 002 was never recorded, so it may still change: without the sleep it applies at once.
        await Deno.writeTextFile(
          join(dir, "migrations", "002_slow.sql"),
          "CREATE TABLE {{tables.slow_t}} (id int);\n",
        );
        const again = start(dir, args);
        const againCode = await again.exit(15_000);
        assert.equal(againCode, 0, again.stdout() + again.stderr());
        assert.match(again.stdout(), /applied 1 migration/);
        assert.doesNotMatch(again.stderr(), /Waiting/);
        assert.deepEqual(await history(schema), ["001_first.sql", "002_slow.sql"]);
      } finally {
        await reap(first);
        await reap(second);
        await cleanUp(schema, marker);
      }
    });
  },
);

serverTest(
  "cli migrate apply: SIGINT in a no-transaction file stops at its statement and says what stays",
  async () => {
    const schema = uniqueName("intr");
    const marker = `${schema}_sleep`;
    await inTempDir(async (dir) => {
      await writeMigrations(dir, {
        "001_nt.sql": "-- pgdbm:no-transaction\n" +
          "CREATE TABLE IF NOT EXISTS {{tables.nt_a}} (id int);\n" +
          `SELECT pg_sleep(30), '${marker}';\n` +
          "CREATE TABLE IF NOT EXISTS {{tables.nt_b}} (id int);\n",
      });
      let run: Running | undefined;
      try {
        run = start(dir, ["migrate", "apply", "--json", "--schema", schema]);
        await until("the pg_sleep", async () => (await running(marker)).length > 0 || undefined);
        run.child.kill("SIGINT");
        const code = await run.exit(EXIT_WITHIN_MS);
        assert.equal(code, 130, run.stdout() + run.stderr());
        assert.match(
          run.stderr(),
          /stopped '001_nt\.sql' at its statement at line 3, which was cancelled, and released the migration lock/,
        );
        assert.match(run.stderr(), /statements before that one stay applied/);
        const document = JSON.parse(run.stdout());
        assert.equal(document.ok, false);
        assert.equal(document.interrupted, "SIGINT");
        assert.equal(document.error.exitCode, 130);
        assert.equal(document.error.filename, "001_nt.sql");
        assert.equal(document.error.line, 3);

        assert.deepEqual(await running(marker), []);
        assert.deepEqual(await lockHolders(schema, "default"), []);
        assert.equal(await tableExists(schema, "nt_a"), true, "the statement before stays");
        assert.equal(await tableExists(schema, "nt_b"), false, "the statement after never ran");
        assert.deepEqual(await history(schema), [], "no history row");
      } finally {
        await reap(run);
        await cleanUp(schema, marker);
      }
    });
  },
);

serverTest(
  "cli migrate apply: SIGINT while waiting for another run's lock stops at once (session " +
    "and transaction locks)",
  async () => {
    for (const lock of ["session", "transaction"] as const) {
      const schema = uniqueName("intr");
      await inTempDir(async (dir) => {
        await writeMigrations(dir, { "001_t.sql": "CREATE TABLE {{tables.t}} (id int);\n" });
        await Deno.writeTextFile(
          join(dir, "pgdbm.json"),
          JSON.stringify({
            lock,
            modules: { app: { migrationsPath: "migrations", schema } },
          }),
        );
        let run: Running | undefined;
        let release!: () => void;
        let held!: () => void;
        const isHeld = new Promise<void>((resolve) => (held = resolve));
        // Another "run" holds the lock in a session of its own.
        const holder = observe(async (sql) => {
          await sql.reserve().then(async (conn) => {
            await conn`SELECT pg_advisory_lock(hashtext('pgdbm_migration_app'), hashtext(${schema}))`;
            held();
            await new Promise<void>((resolve) => (release = resolve));
            await conn`SELECT pg_advisory_unlock_all()`;
            conn.release();
          });
        });
        try {
          await isHeld;
          run = start(dir, ["migrate", "apply"]);
          await until(
            "the run to say it waits",
            () => /Waiting for the migration lock/.test(run!.stderr()) || undefined,
          );
          run.child.kill("SIGINT");
          const code = await run.exit(EXIT_WITHIN_MS);
          assert.equal(code, 130, `${lock}: ${run.stdout()}${run.stderr()}`);
          assert.match(run.stderr(), /Interrupted \(SIGINT\)/);
          assert.match(run.stderr(), /stopped waiting for the migration lock/);
          assert.match(run.stderr(), /nothing (from that file )?was applied/);
          assert.equal(await tableExists(schema, "t"), false);
        } finally {
          release?.();
          await holder;
          await reap(run);
          await cleanUp(schema, `${schema}_none`);
        }
      });
    }
  },
);

serverTest(
  "Migrator.applyPending({ signal }) cancels the running migration, rolls it back and " +
    "releases the lock before it rejects",
  async () => {
    const schema = uniqueName("intr");
    const marker = `${schema}_sleep`;
    const pool = await createSharedPool({ connectionString: TEST_URL });
    const db = new DatabaseManager({ pool, schema });
    try {
      const migrator = new Migrator(db, {
        moduleName: "lib",
        migrations: {
          "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
          "002_b.sql": "CREATE TABLE {{tables.b}} (id int);\n" +
            `SELECT pg_sleep(30), '${marker}';`,
          "003_c.sql": "CREATE TABLE {{tables.c}} (id int);",
        },
      });
      const controller = new AbortController();
      const reason = new Error("stop now");
      const run = migrator.applyPending({ signal: controller.signal });
      run.catch(() => {});
      await until("the pg_sleep", async () => (await running(marker)).length > 0 || undefined);
      const aborted = performance.now();
      controller.abort(reason);
      const error = await run.then(
        () => assert.fail("applyPending resolved after its signal aborted"),
        (e: unknown) => e,
      );
      assert.ok(performance.now() - aborted < EXIT_WITHIN_MS);
      assert.ok(error instanceof MigrationError, String(error));
      assert.equal(error.cause, reason);
      assert.equal(error.filename, "002_b.sql");
      assert.match(error.message, /aborted \(stop now\)/);
      const partial = error.partialResult as MigrationResult;
      assert.equal(partial.status, "failed");
      assert.deepEqual(partial.applied.map((a) => a.filename), ["001_a.sql"]);
      assert.equal(partial.failure?.aborted, true);
      assert.equal(partial.failure?.line, 2);
      assert.match(partial.failure!.message, /cancelled '002_b\.sql'.*released the migration lock/);

      // All of this held when applyPending rejected.
      assert.deepEqual(await running(marker), []);
      assert.deepEqual(await lockHolders(schema, "lib"), []);
      assert.equal(await db.tableExists("b"), false);
      assert.deepEqual((await migrator.getApplied()).map((m) => m.filename), ["001_a.sql"]);

      // An aborted signal stops a run before it starts.
      await assert.rejects(
        migrator.applyPending({ signal: AbortSignal.abort(reason) }),
        (e: unknown) =>
          e instanceof MigrationError && e.cause === reason &&
          /nothing was applied/.test(e.message),
      );
    } finally {
      await pool.close();
      await cleanUp(schema, marker);
    }
  },
);

serverTest(
  "cli migrate apply on a fleet: SIGINT stops starting schemas, rolls back the running one, " +
    "exits 130 saying how to resume; the same command then finishes the fleet",
  async () => {
    const prefix = uniqueName("intr_fleet");
    const schemas = ["a", "b", "c"].map((s) => `${prefix}_${s}`);
    const marker = `${prefix}_sleep`;
    await inTempDir(async (dir) => {
      await writeMigrations(dir, {
        "001_first.sql": "CREATE TABLE {{tables.first_t}} (id int);\n",
        "002_slow.sql":
          `CREATE TABLE {{tables.slow_t}} (id int);\nSELECT pg_sleep(30), '${marker}';\n`,
      });
      const args = [
        "migrate",
        "apply",
        "--path",
        "migrations",
        "--module",
        "tenant",
        "--schemas",
        schemas.join(","),
        "--concurrency",
        "1",
      ];
      let run: Running | undefined;
      try {
        run = start(dir, args);
        await until("the first schema's pg_sleep", async () => {
          const pids = await running(marker);
          return pids.length > 0 ? pids : undefined;
        });
        run.child.kill("SIGINT");
        const code = await run.exit(EXIT_WITHIN_MS);
        const output = run.stdout() + run.stderr();
        assert.equal(code, 130, output);
        assert.match(run.stderr(), /Interrupted \(SIGINT\): stopped starting schemas/);
        assert.match(
          run.stderr(),
          new RegExp(`cancelled the migration running in ${schemas[0]} and rolled it back`),
        );
        assert.match(run.stderr(), /2 schemas not started/);
        assert.match(run.stderr(), /Resume with the same command: schemas already up to date/);
        assert.match(run.stdout(), new RegExp(`${schemas[0]}\\s+interrupted\\s+1`));
        assert.match(run.stdout(), new RegExp(`${schemas[1]}\\s+not started\\s+0`));
        assert.deepEqual(await running(marker), [], "the statement was cancelled on the server");
        assert.deepEqual(await history(schemas[0]), ["001_first.sql"], "002 rolled back");
        assert.equal(await tableExists(schemas[0], "slow_t"), false);
        assert.equal(await tableExists(schemas[1], "first_t"), false, "b was not started");

        await Deno.writeTextFile(
          join(dir, "migrations", "002_slow.sql"),
          "CREATE TABLE {{tables.slow_t}} (id int);\n",
        );
        const again = start(dir, [...args, "--json"]);
        const againCode = await again.exit(30_000);
        assert.equal(againCode, 0, again.stdout() + again.stderr());
        const document = JSON.parse(again.stdout());
        assert.deepEqual(
          document.schemas.map((s: { schema: string; applied: unknown[] }) => [
            s.schema,
            s.applied.length,
          ]),
          [[schemas[0], 1], [schemas[1], 2], [schemas[2], 2]],
          "the interrupted schema resumes at 002, the others start from 001",
        );
        for (const schema of schemas) {
          assert.deepEqual(await history(schema), ["001_first.sql", "002_slow.sql"]);
        }
      } finally {
        await reap(run);
        await observe(async (sql) => {
          await sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE pid <> pg_backend_pid() AND query LIKE ${"%" + marker + "%"}`;
          for (const schema of schemas) {
            await sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
          }
        });
      }
    });
  },
);
