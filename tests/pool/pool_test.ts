/**
 * Integration tests of the connection pool against a real server (SPEC sections 2, 3 and
 * 9): sizing, the wait queue, recycling, per-connection setup, broken connections,
 * statistics, closing, cancellation, slow-query isolation, configuration errors, password
 * hiding, TLS and Unix sockets. Each pool gets a unique `application_name` so the tests
 * can count its backends in `pg_stat_activity` from a separate connection.
 */
import assert from "node:assert/strict";
import postgres from "postgres";
import {
  ConfigurationError,
  ConnectionError,
  createSharedPool,
  DatabaseManager,
  type Pool,
  PoolError,
  QueryError,
  TimeoutError,
} from "../../mod.ts";
import type { DatabaseConfig } from "../../src/config.ts";
import {
  observe,
  SERVER_AVAILABLE,
  serverTest,
  TEST_URL,
  uniqueName,
  withManager,
} from "../_support/server.ts";

const PASSWORD = "Sup3rSecretPW";

/** Opens a pool with a unique application_name and a manager without schema; closes it after. */
async function withPool(
  config: DatabaseConfig,
  fn: (db: DatabaseManager, pool: Pool, app: string) => Promise<void>,
): Promise<void> {
  const app = uniqueName("pgdbm_app");
  const pool = await createSharedPool({
    connectionString: TEST_URL,
    ...config,
    serverSettings: { application_name: app, ...config.serverSettings },
  });
  try {
    await fn(new DatabaseManager({ pool }), pool, app);
  } finally {
    await pool.close();
  }
}

/** Backends the server has with this application_name. */
async function countBackends(app: string): Promise<number> {
  return await observe(async (sql) => {
    const [row] = await sql`
      SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = ${app}`;
    return row.n as number;
  });
}

/** Options of {@link waitFor}. */
interface WaitOptions {
  /** Give up after this long. */
  timeoutMs?: number;
  /** Time between checks. */
  intervalMs?: number;
  /** Promises whose rejection ends the wait at once with their error. */
  watch?: readonly Promise<unknown>[];
}

/** Polls `check` until it returns true, failing with `what` after `timeoutMs`. */
async function waitFor(
  what: string,
  check: () => boolean | Promise<boolean>,
  { timeoutMs = 5000, intervalMs = 25, watch = [] }: WaitOptions = {},
): Promise<void> {
  let failure: { error: unknown } | undefined;
  for (const promise of watch) promise.catch((error) => failure ??= { error });
  const deadline = performance.now() + timeoutMs;
  while (!(await check())) {
    if (failure !== undefined) throw failure.error;
    if (performance.now() > deadline) {
      throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await delay(intervalMs);
  }
}

/**
 * Marks a promise started in the background as handled, so that an assertion failing
 * before the test awaits it reports that failure instead of an unhandled rejection.
 */
function background<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => {});
  return promise;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A promise with its resolver, to hold a transaction open until the test lets it go. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => open = resolve);
  return { promise, open };
}

/** A port on 127.0.0.1 that nothing listens on (it was just free). */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

function assertNoPassword(error: unknown, password = PASSWORD): void {
  assert.ok(error instanceof Error);
  const texts = [
    error.message,
    String(error),
    error.stack ?? "",
    Deno.inspect(error, { depth: 10 }),
    JSON.stringify(error),
  ];
  for (const text of texts) assert.ok(!text.includes(password), `password leaked in: ${text}`);
}

const SSL_ON: boolean = SERVER_AVAILABLE &&
  await observe(async (sql) => (await sql`SHOW ssl`)[0].ssl === "on");
const SOCKET_DIR = "/var/run/postgresql";
const SOCKET_DIR_EXISTS: boolean = (() => {
  try {
    return Deno.statSync(SOCKET_DIR).isDirectory;
  } catch {
    return false;
  }
})();
const TEST_TARGET = new URL(TEST_URL);
const LOCAL_SERVER = ["127.0.0.1", "localhost", "[::1]"].includes(TEST_TARGET.hostname);

// ---------------------------------------------------------------------------------------
// Sizing

serverTest("createSharedPool() opens minConnections connections at start", async () => {
  await withPool({ minConnections: 3, maxConnections: 6 }, async (_db, pool, app) => {
    const stats = pool.getStats();
    assert.equal(stats.size, 3);
    assert.equal(stats.idle, 3);
    assert.equal(stats.used, 0);
    assert.equal(stats.minSize, 3);
    assert.equal(stats.maxSize, 6);
    assert.equal(await countBackends(app), 3);
  });
});

serverTest("createSharedPool() opens 2 connections by default", async () => {
  await withPool({}, async (_db, pool, app) => {
    assert.equal(pool.getStats().size, 2);
    assert.equal(pool.getStats().maxSize, 10);
    assert.equal(await countBackends(app), 2);
  });
});

serverTest(
  "Pool never exceeds maxConnections on the server under 500 concurrent queries",
  async () => {
    const max = 4;
    await withManager(async (db, pool) => {
      const app = await db.fetchValue<string>("SELECT current_setting('application_name')");
      assert.ok(app !== null && app.startsWith("pgdbm_load"));
      await db.execute("CREATE TABLE {{tables.hits}} (id serial PRIMARY KEY, n int NOT NULL)");

      let serverMax = 0;
      let statsMax = 0;
      let samples = 0;
      let running = true;
      const sampler = background(observe(async (sql) => {
        while (running) {
          const [row] = await sql`
            SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = ${app}`;
          serverMax = Math.max(serverMax, row.n as number);
          statsMax = Math.max(statsMax, pool.getStats().size);
          samples++;
          await delay(5);
        }
      }));

      try {
        const work = Array.from({ length: 500 }, (_, i) => {
          if (i % 50 === 7) {
            return db.transaction(async (tx) => {
              await tx.execute("INSERT INTO {{tables.hits}} (n) VALUES ($1)", [i]);
              await tx.execute("SELECT pg_sleep(0.02)");
              return i;
            });
          }
          if (i % 25 === 3) {
            return db.fetchValue<number>("SELECT $1::int FROM pg_sleep(0.05)", [i]);
          }
          return db.fetchValue<number>("SELECT $1::int", [i]);
        });
        const results = await Promise.all(work);
        assert.deepEqual(results, Array.from({ length: 500 }, (_, i) => i));
        assert.equal(await db.fetchValue<number>("SELECT count(*)::int FROM {{tables.hits}}"), 10);
      } finally {
        running = false;
        await sampler;
      }
      assert.ok(samples >= 3, `the sampler ran only ${samples} times`);
      assert.ok(serverMax >= 2, `the sampler saw ${serverMax} backends: the pool never grew`);
      assert.ok(serverMax <= max, `the server saw ${serverMax} backends (max ${max})`);
      assert.ok(statsMax <= max, `getStats().size reached ${statsMax} (max ${max})`);
    }, {
      minConnections: 1,
      maxConnections: max,
      serverSettings: { application_name: uniqueName("pgdbm_load") },
    });
  },
);

// ---------------------------------------------------------------------------------------
// Wait queue

serverTest(
  "DatabaseManager.transaction() rejects with PoolError POOL_EXHAUSTED after acquireTimeoutMs",
  async () => {
    await withPool(
      { minConnections: 2, maxConnections: 2, acquireTimeoutMs: 400 },
      async (db, pool) => {
        const hold = gate();
        const entered: number[] = [];
        const holders = [1, 2].map((n) =>
          background(db.transaction(async (tx) => {
            entered.push(n);
            await hold.promise;
            return await tx.fetchValue<number>("SELECT $1::int", [n]);
          }))
        );
        try {
          await waitFor("both holders to enter", () => entered.length === 2, { watch: holders });
          const start = performance.now();
          const third = background(db.transaction((tx) => tx.fetchValue("SELECT 3")));
          await waitFor("the third caller to wait", () => pool.getStats().waiting === 1, {
            timeoutMs: 300,
            intervalMs: 5,
          });
          const error = await third.then(() => undefined, (e) => e);
          const elapsed = performance.now() - start;
          assert.ok(error instanceof PoolError, `expected PoolError, got ${error}`);
          assert.equal(error.code, "POOL_EXHAUSTED");
          assert.match(error.message, /acquireTimeoutMs/);
          assert.ok(elapsed >= 350, `rejected after ${elapsed} ms, before acquireTimeoutMs`);
          assert.ok(elapsed < 3000, `rejected only after ${elapsed} ms`);
          assert.equal(pool.getStats().waiting, 0);

          const query = await db.fetchValue("SELECT 4").then(() => undefined, (e) => e);
          assert.ok(query instanceof PoolError, `a plain query got ${query}`);
          assert.equal(query.code, "POOL_EXHAUSTED");
        } finally {
          hold.open();
        }
        assert.deepEqual(await Promise.all(holders), [1, 2]);
        assert.equal(await db.fetchValue<number>("SELECT 5::int"), 5);
      },
    );
  },
);

serverTest("DatabaseManager.transaction() serves waiting callers in FIFO order", async () => {
  await withPool(
    { minConnections: 1, maxConnections: 1, acquireTimeoutMs: 10_000 },
    async (db, pool) => {
      const hold = gate();
      let holding = false;
      const holder = background(db.transaction(async () => {
        holding = true;
        await hold.promise;
      }));
      const order: number[] = [];
      let waiters: Promise<number>[] = [];
      try {
        await waitFor("the holder to enter", () => holding, { watch: [holder] });
        waiters = Array.from({ length: 6 }, (_, i) =>
          background(db.transaction(async (tx) => {
            order.push(i);
            await tx.execute("SELECT pg_sleep(0.01)");
            return i;
          })));
        assert.equal(pool.getStats().waiting, 6);
      } finally {
        hold.open();
      }
      await holder;
      assert.deepEqual(await Promise.all(waiters), [0, 1, 2, 3, 4, 5]);
      assert.deepEqual(order, [0, 1, 2, 3, 4, 5]);
      assert.equal(pool.getStats().waiting, 0);
    },
  );
});

// ---------------------------------------------------------------------------------------
// Recycling

serverTest("Pool closes connections above the floor after idleTimeoutMs", async () => {
  await withPool(
    { minConnections: 1, maxConnections: 4, idleTimeoutMs: 300 },
    async (db, pool, app) => {
      const hold = gate();
      let entered = 0;
      const holders = Array.from({ length: 3 }, () =>
        background(db.transaction(async () => {
          entered++;
          await hold.promise;
        })));
      try {
        await waitFor("three transactions to hold connections", () => entered === 3, {
          watch: holders,
        });
        assert.equal(pool.getStats().size, 3);
        assert.equal(await countBackends(app), 3);
      } finally {
        hold.open();
      }
      await Promise.all(holders);
      assert.ok(pool.getStats().size > 1, "connections closed before they were idle long enough");
      await waitFor("idle connections to close", () => pool.getStats().size === 1);
      await waitFor("the server to see one backend", async () => await countBackends(app) === 1);
      await delay(700);
      assert.equal(pool.getStats().size, 1, "the pool went below minConnections");
      assert.equal(await db.fetchValue<number>("SELECT 1::int"), 1);
    },
  );
});

serverTest("Pool recycles a connection older than maxLifetimeMs and keeps working", async () => {
  await withPool(
    { minConnections: 1, maxConnections: 2, maxLifetimeMs: 400 },
    async (db, _pool, app) => {
      const first = await db.fetchValue<number>("SELECT pg_backend_pid()");
      assert.ok(typeof first === "number");
      let pid = first;
      await waitFor(
        "the connection to be replaced",
        async () => {
          pid = (await db.fetchValue<number>("SELECT pg_backend_pid()"))!;
          return pid !== first;
        },
        { intervalMs: 50 },
      );
      assert.notEqual(pid, first);
      await waitFor(
        "the old backend to end",
        () =>
          observe(async (sql) =>
            (await sql`SELECT 1 FROM pg_stat_activity WHERE pid = ${first}`).length === 0
          ),
      );
      assert.ok(await countBackends(app) <= 2);
      assert.equal(await db.fetchValue<number>("SELECT 7::int"), 7);
    },
  );
});

serverTest("Pool recycles a connection after maxQueries queries", async () => {
  await withPool({ minConnections: 1, maxConnections: 1, maxQueries: 5 }, async (db) => {
    const pids: number[] = [];
    for (let i = 0; i < 17; i++) {
      pids.push((await db.fetchValue<number>("SELECT pg_backend_pid()"))!);
    }
    const runs: number[] = [];
    for (let i = 0; i < pids.length; i++) {
      if (i > 0 && pids[i] === pids[i - 1]) runs[runs.length - 1]++;
      else runs.push(1);
    }
    assert.ok(new Set(pids).size >= 3, `pids: ${pids.join(",")}`);
    for (const run of runs) assert.ok(run <= 5, `one connection ran ${run} queries: ${pids}`);
    assert.equal(runs[0], 5, `the first connection ran ${runs[0]} queries, not maxQueries`);
  });
});

// ---------------------------------------------------------------------------------------
// Per-connection setup

serverTest(
  "Pool applies initCommands and server settings to every connection, new ones included",
  async () => {
    await withPool(
      {
        minConnections: 2,
        maxConnections: 4,
        statementTimeoutMs: 12_345,
        lockTimeoutMs: 2_345,
        idleInTransactionSessionTimeoutMs: 34_567,
        serverSettings: { timezone: "Asia/Kathmandu" },
        initCommands: ["SET work_mem = '7MB'", "CREATE TEMP TABLE pgdbm_init_marker (x int)"],
      },
      async (db, pool, app) => {
        assert.equal(pool.getStats().size, 2);
        const hold = gate();
        const seen: Record<string, unknown>[] = [];
        const leases = Array.from({ length: 4 }, () =>
          background(db.acquire(async (conn) => {
            seen.push(
              (await conn.fetchOne(
                `SELECT pg_backend_pid() AS pid,
                  current_setting('application_name') AS app,
                  current_setting('jit') AS jit,
                  current_setting('work_mem') AS work_mem,
                  current_setting('TimeZone') AS tz,
                  (SELECT setting FROM pg_settings WHERE name = 'statement_timeout') AS st,
                  (SELECT setting FROM pg_settings WHERE name = 'lock_timeout') AS lt,
                  (SELECT setting FROM pg_settings
                    WHERE name = 'idle_in_transaction_session_timeout') AS itt,
                  to_regclass('pg_temp.pgdbm_init_marker') IS NOT NULL AS marker`,
              ))!,
            );
            await hold.promise;
          })));
        try {
          await waitFor("four leased connections", () => seen.length === 4, { watch: leases });
        } finally {
          hold.open();
        }
        await Promise.all(leases);
        assert.equal(new Set(seen.map((row) => row.pid)).size, 4, "leases shared a connection");
        for (const row of seen) {
          assert.deepEqual({ ...row, pid: 0 }, {
            pid: 0,
            app,
            jit: "off",
            work_mem: "7MB",
            tz: "Asia/Kathmandu",
            st: "12345",
            lt: "2345",
            itt: "34567",
            marker: true,
          });
        }
      },
    );
  },
);

serverTest("Pool leaves server timeouts alone when they are null", async () => {
  const defaults = await observe(async (sql) =>
    (await sql`SELECT setting FROM pg_settings WHERE name = 'lock_timeout'`)[0].setting as string
  );
  await withPool({ lockTimeoutMs: null, statementTimeoutMs: 4_321 }, async (db) => {
    const row = await db.fetchOne(
      `SELECT (SELECT setting FROM pg_settings WHERE name = 'lock_timeout') AS lt,
        (SELECT setting FROM pg_settings WHERE name = 'statement_timeout') AS st`,
    );
    assert.deepEqual(row, { lt: defaults, st: "4321" });
  });
});

serverTest(
  "DatabaseManager.addPreparedStatement() prepares on current and future connections",
  async () => {
    await withPool({ minConnections: 2, maxConnections: 4 }, async (db, pool) => {
      await db.addPreparedStatement("pgdbm_add_one", "SELECT $1::int + 1 AS n");
      assert.equal(pool.getStats().size, 2);
      const hold = gate();
      const seen: { pid: number; names: number; value: number }[] = [];
      const leases = Array.from({ length: 4 }, () =>
        background(db.acquire(async (conn) => {
          const names = await conn.fetchValue<number>(
            "SELECT count(*)::int FROM pg_prepared_statements WHERE name = 'pgdbm_add_one'",
          );
          const value = await conn.fetchValue<number>("EXECUTE pgdbm_add_one(41)");
          seen.push({ pid: conn.pid, names: names!, value: value! });
          await hold.promise;
        })));
      try {
        await waitFor("four leased connections", () => seen.length === 4, { watch: leases });
      } finally {
        hold.open();
      }
      await Promise.all(leases);
      assert.equal(new Set(seen.map((s) => s.pid)).size, 4);
      for (const s of seen) {
        assert.deepEqual({ names: s.names, value: s.value }, {
          names: 1,
          value: 42,
        });
      }
      assert.equal(await db.fetchValue<number>("EXECUTE pgdbm_add_one(1)"), 2);
    });
  },
);

// ---------------------------------------------------------------------------------------
// Connecting and broken connections

Deno.test(
  "createSharedPool() retries with exponential backoff, then rejects with ConnectionError",
  async () => {
    const port = freePort();
    const start = performance.now();
    const error = await createSharedPool({
      host: "127.0.0.1",
      port,
      database: "test",
      password: PASSWORD,
      retry: { attempts: 3, delayMs: 150, backoff: 2 },
    }).then(() => undefined, (e) => e);
    const elapsed = performance.now() - start;
    assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
    assert.equal(error.attempts, 3);
    assert.equal(error.host, "127.0.0.1");
    assert.equal(error.port, port);
    assert.equal(error.database, "test");
    assert.match(error.message, new RegExp(`127\\.0\\.0\\.1:${port}`));
    assert.ok(elapsed >= 400, `gave up after ${elapsed} ms; the delays add up to 450 ms`);
    assert.ok(elapsed < 5000, `took ${elapsed} ms`);
    assertNoPassword(error);
  },
);

Deno.test("createSharedPool() does not retry when attempts is 1", async () => {
  const start = performance.now();
  const error = await createSharedPool({
    host: "127.0.0.1",
    port: freePort(),
    retry: { attempts: 1, delayMs: 2000 },
  }).then(() => undefined, (e) => e);
  assert.ok(error instanceof ConnectionError);
  assert.equal(error.attempts, 1);
  assert.ok(performance.now() - start < 1500, "it waited for a retry delay");
});

serverTest(
  "createSharedPool() does not retry what retrying cannot fix (a missing database)",
  async () => {
    const start = performance.now();
    const url = new URL(TEST_URL);
    url.pathname = `/${uniqueName("missing_db")}`;
    const error = await createSharedPool({
      connectionString: url.href,
      retry: { attempts: 3, delayMs: 2000 },
    }).then(() => undefined, (e) => e);
    assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
    assert.equal(error.attempts, 1);
    assert.match(error.message, /does not exist/);
    assert.match(error.message, /not retried/);
    assert.ok(performance.now() - start < 1500, "it waited for a retry delay");
  },
);

serverTest(
  "A failing initCommands statement is named in the ConnectionError, not the server's address",
  async () => {
    const error = await createSharedPool({
      connectionString: TEST_URL,
      minConnections: 1,
      initCommands: ["SET work_mem = '7MB'", "SELEC 1"],
      retry: { attempts: 3, delayMs: 2000 },
    }).then(() => undefined, (e) => e);
    assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
    assert.equal(error.attempts, 1);
    assert.match(error.message, /^Cannot set up a connection to .*not retried/);
    assert.match(error.message, /initCommands\[1\] failed with SQLSTATE 42601: syntax error/);
    assert.doesNotMatch(error.message, /Check that the server is running/);
  },
);

serverTest(
  "A connect the server refuses at startup leaves no session behind on the server",
  async () => {
    // A role that may hold one session, held, so that the pool's connect fails FATAL
    // (53300). postgres.js used to connect again at once for the setup statements still
    // queued, and the driver's end() could not stop that new socket: a session nobody
    // closed. A proxy holds every later connection until the role's session is free, so
    // such a session reaches the server, where it is counted. It did so in about one
    // round in five (a race of that socket's connect with end()), hence the rounds.
    const ROUNDS = 20;
    const role = uniqueName("pgdbm_limited");
    const app = uniqueName("pgdbm_app");
    await observe((sql) => sql.unsafe(`CREATE ROLE "${role}" LOGIN CONNECTION LIMIT 1`));
    const server = { hostname: TEST_TARGET.hostname, port: Number(TEST_TARGET.port || 5432) };
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    let accepted = 0;
    let free = gate();
    const proxying = (async () => {
      for await (const client of listener) {
        const first = accepted++ === 0;
        (async () => {
          if (!first) await free.promise;
          const upstream = await Deno.connect(server);
          await Promise.all([
            client.readable.pipeTo(upstream.writable),
            upstream.readable.pipeTo(client.writable),
          ]).catch(() => {});
        })().catch(() => {});
      }
    })();
    const left: number[] = [];
    try {
      for (let round = 0; round < ROUNDS; round++) {
        accepted = 0;
        free = gate();
        const held = new URL(TEST_URL);
        held.username = role;
        const holder = postgres(held.href, { max: 1 });
        await holder`SELECT 1`;
        const error = await createSharedPool({
          host: "127.0.0.1",
          port: (listener.addr as Deno.NetAddr).port,
          database: TEST_TARGET.pathname.slice(1),
          user: role,
          retry: { attempts: 1 },
          serverSettings: { application_name: app },
        }).then(() => undefined, (e) => e);
        assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
        assert.match(error.message, /too many connections for role/);
        await holder.end();
        free.open();
        await delay(300);
        left.push(await countBackends(app));
        await observe((sql) =>
          sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ${role}`
        );
        await waitFor(
          "the role's sessions to end",
          async () =>
            await observe(async (sql) =>
              (await sql`SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = ${role}`)[
                0
              ]
                .n === 0
            ),
        );
      }
      assert.deepEqual(left, left.map(() => 0), "sessions left open on the server, per round");
    } finally {
      listener.close();
      await proxying;
      await observe((sql) =>
        sql`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ${role}`
      );
      await observe((sql) => sql.unsafe(`DROP ROLE IF EXISTS "${role}"`));
    }
  },
);

serverTest("prepare: false runs mixed traffic without named statements", async () => {
  await withManager(async (db) => {
    const values = await Promise.all(
      Array.from(
        { length: 200 },
        (_, i) =>
          i % 10 === 0
            ? db.fetchValue<number>(`SELECT ${i}`)
            : db.fetchValue<number>("SELECT $1::int", [i]),
      ),
    );
    assert.deepEqual(values, Array.from({ length: 200 }, (_, i) => i));
    const named = await db.acquire((conn) =>
      conn.fetchValue<string>("SELECT count(*) FROM pg_prepared_statements")
    );
    assert.equal(named, "0");
  }, { prepare: false });
});

serverTest("Pool replaces a connection whose backend was terminated", async () => {
  await withPool({ minConnections: 1, maxConnections: 1 }, async (db, pool, app) => {
    const pid = (await db.fetchValue<number>("SELECT pg_backend_pid()"))!;
    const killed = await observe(async (sql) =>
      (await sql`SELECT pg_terminate_backend(${pid}) AS ok`)[0].ok as boolean
    );
    assert.equal(killed, true);
    await waitFor(
      "the backend to end",
      () =>
        observe(async (sql) =>
          (await sql`SELECT 1 FROM pg_stat_activity WHERE pid = ${pid}`).length === 0
        ),
    );
    const next = await db.fetchValue<number>("SELECT pg_backend_pid()");
    assert.ok(typeof next === "number");
    assert.notEqual(next, pid);
    assert.equal(pool.getStats().size, 1);
    assert.equal(await countBackends(app), 1);
  });
});

serverTest(
  "DatabaseManager.transaction() rejects with QueryError and leaves no data when its backend dies",
  async () => {
    await withManager(async (db, pool) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY)");
      let pid = 0;
      const error = await db.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
        pid = (await tx.fetchValue<number>("SELECT pg_backend_pid()"))!;
        await observe((sql) => sql`SELECT pg_terminate_backend(${pid})`);
        await tx.execute("INSERT INTO {{tables.items}} VALUES (2)");
      }).then(() => undefined, (e) => e);
      assert.ok(pid > 0);
      assert.ok(error instanceof QueryError, `expected QueryError, got ${error}`);
      assert.equal(await db.fetchValue<number>("SELECT count(*)::int FROM {{tables.items}}"), 0);
      assert.notEqual(await db.fetchValue<number>("SELECT pg_backend_pid()"), pid);
      assert.ok(pool.getStats().size <= 2);
    }, { minConnections: 1, maxConnections: 2 });
  },
);

// ---------------------------------------------------------------------------------------
// Statistics

serverTest("Pool.getStats() counts size, idle, used and waiting live", async () => {
  await withPool(
    { minConnections: 1, maxConnections: 3, acquireTimeoutMs: 10_000 },
    async (db, pool) => {
      assert.deepEqual(pool.getStats(), {
        status: "connected",
        minSize: 1,
        maxSize: 3,
        size: 1,
        idle: 1,
        used: 0,
        waiting: 0,
        queries: 0,
        errors: 0,
        acquireWaitMs: { p50: 0, p99: 0 },
        replicas: [],
      });
      const holds = [gate(), gate(), gate(), gate()];
      let entered = 0;
      const txs = holds.map((hold, i) =>
        background(db.transaction(async (tx) => {
          entered++;
          await hold.promise;
          return await tx.fetchValue<number>("SELECT $1::int", [i]);
        }))
      );
      try {
        await waitFor("three transactions to hold connections", () => entered === 3, {
          watch: txs,
        });
        await delay(50);
        assert.equal(entered, 3, "a fourth transaction got a connection beyond maxConnections");
        const busy = pool.getStats();
        assert.deepEqual(
          { size: busy.size, idle: busy.idle, used: busy.used, waiting: busy.waiting },
          { size: 3, idle: 0, used: 3, waiting: 1 },
        );
        const managerStats = db.getPoolStats();
        assert.equal(managerStats.waiting, 1);
        assert.equal(managerStats.database, TEST_TARGET.pathname.slice(1));
        assert.equal(managerStats.schema, null);
        assert.ok(typeof managerStats.pid === "number" && managerStats.pid > 0);
        assert.match(managerStats.version ?? "", /^\d+/);

        holds[0].open();
        await waitFor("the waiter to get a connection", () => entered === 4, { watch: txs });
        assert.equal(pool.getStats().waiting, 0);
        assert.equal(pool.getStats().used, 3);
      } finally {
        for (const hold of holds) hold.open();
      }
      assert.deepEqual(await Promise.all(txs), [0, 1, 2, 3]);
      const after = pool.getStats();
      assert.equal(after.queries, 12, "BEGIN, SELECT and COMMIT of four transactions");
      assert.equal(after.errors, 0);
      // Two waited for a connection to open, the fourth for one to come free.
      assert.ok(after.acquireWaitMs.p50 < after.acquireWaitMs.p99, "the fourth waited longest");
      assert.ok(after.acquireWaitMs.p99 >= 45, `the fourth waited: ${after.acquireWaitMs.p99}`);
      assert.equal(after.used, 0);
      assert.equal(after.idle, after.size);
      assert.equal(after.size, 3);
      await assert.rejects(db.execute("SELECT 1/0"));
      assert.equal(pool.getStats().errors, 1);
    },
  );
});

// ---------------------------------------------------------------------------------------
// Closing

serverTest("Pool.close() waits for running queries, then closes every connection", async () => {
  const app = uniqueName("pgdbm_close");
  const pool = await createSharedPool({
    connectionString: TEST_URL,
    minConnections: 2,
    maxConnections: 3,
    serverSettings: { application_name: app },
  });
  try {
    const db = new DatabaseManager({ pool });
    assert.equal(await countBackends(app), 2);
    const sleeping = background(db.fetchOne("SELECT 'done' AS status FROM pg_sleep(0.3)"));
    const inTransaction = background(db.transaction(async (tx) => {
      await delay(200);
      return await tx.fetchValue<number>("SELECT 11::int");
    }));
    await delay(20);
    const start = performance.now();
    await pool.close();
    const elapsed = performance.now() - start;
    assert.deepEqual(await sleeping, { status: "done" });
    assert.equal(await inTransaction, 11);
    assert.ok(elapsed >= 150, `close() returned after ${elapsed} ms, before the query ended`);
    assert.equal(pool.closed, true);
    assert.equal(pool.getStats().status, "closed");
    assert.equal(pool.getStats().size, 0);
    await waitFor("every backend to end", async () => await countBackends(app) === 0);

    for (
      const call of [
        () => db.fetchValue("SELECT 1"),
        () => db.transaction(() => Promise.resolve()),
        () => db.acquire(() => Promise.resolve()),
      ]
    ) {
      const error = await call().then(() => undefined, (e) => e);
      assert.ok(error instanceof PoolError, `expected PoolError, got ${error}`);
      assert.equal(error.code, "POOL_CLOSED");
    }
    await pool.close();
  } finally {
    await pool.close();
  }
});

serverTest("Pool.close() rejects callers waiting for a connection with POOL_CLOSED", async () => {
  await withPool(
    { minConnections: 1, maxConnections: 1, acquireTimeoutMs: 10_000 },
    async (db, pool) => {
      const hold = gate();
      let holding = false;
      const holder = background(db.transaction(async () => {
        holding = true;
        await hold.promise;
      }));
      await waitFor("the holder to enter", () => holding, { watch: [holder] });
      const waiter = db.transaction(() => Promise.resolve()).then(() => undefined, (e) => e);
      assert.equal(pool.getStats().waiting, 1);
      const closing = pool.close();
      const error = await waiter;
      assert.ok(error instanceof PoolError);
      assert.equal(error.code, "POOL_CLOSED");
      hold.open();
      await holder;
      await closing;
    },
  );
});

// ---------------------------------------------------------------------------------------
// Cancellation

async function activeSleeps(app: string): Promise<number> {
  return await observe(async (sql) => {
    const [row] = await sql`
      SELECT count(*)::int AS n FROM pg_stat_activity
      WHERE application_name = ${app} AND state = 'active' AND query LIKE '%pg_sleep(30)%'`;
    return row.n as number;
  });
}

serverTest("Queries timeoutMs cancels the query on the server with TimeoutError", async () => {
  await withPool({ minConnections: 1, maxConnections: 1 }, async (db, _pool, app) => {
    const pid = await db.fetchValue<number>("SELECT pg_backend_pid()");
    const start = performance.now();
    const pending = background(db.fetchValue("SELECT pg_sleep(30)", [], { timeoutMs: 1000 }));
    await waitFor("the sleep to run on the server", async () => await activeSleeps(app) === 1, {
      watch: [pending],
    });
    const error = await pending.then(() => undefined, (e) => e);
    const elapsed = performance.now() - start;
    assert.ok(error instanceof TimeoutError, `expected TimeoutError, got ${error}`);
    assert.ok(elapsed >= 950, `rejected after ${elapsed} ms, before timeoutMs`);
    assert.ok(elapsed < 4000, `rejected only after ${elapsed} ms`);
    await waitFor("the server to stop the sleep", async () => await activeSleeps(app) === 0);
    assert.equal(await db.fetchValue<number>("SELECT pg_backend_pid()"), pid);
    assert.equal(await db.fetchValue<number>("SELECT 2::int"), 2);
  });
});

serverTest("Queries signal aborts and cancels the query on the server", async () => {
  await withPool({ minConnections: 1, maxConnections: 1 }, async (db, _pool, app) => {
    const controller = new AbortController();
    const start = performance.now();
    const pending = background(
      db.fetchValue("SELECT pg_sleep(30)", [], { signal: controller.signal }),
    );
    await waitFor("the sleep to run on the server", async () => await activeSleeps(app) === 1, {
      watch: [pending],
    });
    const abortedAt = performance.now();
    const reason = new Error("the user went away");
    controller.abort(reason);
    const error = await pending.then(() => undefined, (e) => e);
    assert.equal(error, reason);
    assert.ok(performance.now() - abortedAt < 3000, "the abort took effect only after 3 s");
    assert.ok(performance.now() - start < 8000);
    await waitFor("the server to stop the sleep", async () => await activeSleeps(app) === 0);
    assert.equal(await db.fetchValue<number>("SELECT 3::int"), 3);

    const aborted = AbortSignal.abort();
    const early = await db.fetchValue("SELECT 1", [], { signal: aborted }).then(
      () => undefined,
      (e) => e,
    );
    assert.equal(early, aborted.reason);
  });
});

serverTest("Pool cancels a query after commandTimeoutMs by default", async () => {
  await withPool(
    { minConnections: 1, maxConnections: 1, commandTimeoutMs: 500 },
    async (db, _pool, app) => {
      const start = performance.now();
      const error = await db.fetchValue("SELECT pg_sleep(30)").then(() => undefined, (e) => e);
      const elapsed = performance.now() - start;
      assert.ok(error instanceof TimeoutError, `expected TimeoutError, got ${error}`);
      assert.ok(elapsed >= 450, `rejected after ${elapsed} ms, before commandTimeoutMs`);
      assert.ok(elapsed < 4000, `rejected only after ${elapsed} ms`);
      await waitFor("the server to stop the sleep", async () => await activeSleeps(app) === 0);
      assert.equal(await db.fetchValue<number>("SELECT 4::int"), 4);
    },
  );
});

serverTest("Pool keeps a slow statement from stalling fast ones", async () => {
  await withPool({ minConnections: 2, maxConnections: 4 }, async (db) => {
    const slowSql = "SELECT 'slow' AS kind FROM pg_sleep(0.3)";
    for (let i = 0; i < 3; i++) assert.equal(await db.fetchValue(slowSql), "slow");

    const finished: string[] = [];
    const slow = background(
      db.fetchValue(slowSql).then((value) => {
        finished.push("slow");
        return value;
      }),
    );
    const fast = Array.from(
      { length: 100 },
      (_, i) =>
        db.fetchValue<number>("SELECT $1::int", [i]).then((value) => {
          finished.push("fast");
          return value;
        }),
    );
    const values = await Promise.all(fast);
    const slowDoneWhenFastDone = finished.includes("slow");
    assert.equal(await slow, "slow");
    assert.deepEqual(values, Array.from({ length: 100 }, (_, i) => i));
    assert.equal(slowDoneWhenFastDone, false, "the fast queries waited for the slow one");
    assert.equal(finished.indexOf("slow"), 100, "a fast query finished after the slow one");
  });
});

serverTest("Pool runs a slow statement on the idle connection that has it prepared", async () => {
  await withPool({ minConnections: 3, maxConnections: 3 }, async (db) => {
    // Two runs of 30 ms make the statement slow; a slow statement goes to an idle
    // connection, and the one that ran it before has it parsed and planned.
    const slowSql = "SELECT pg_backend_pid() AS pid FROM pg_sleep($1::float8)";
    const pids: number[] = [];
    for (let i = 0; i < 6; i++) pids.push((await db.fetchValue<number>(slowSql, [0.03]))!);
    assert.deepEqual(pids, Array(6).fill(pids[0]), "the statement moved to another session");
  });
});

serverTest(
  "Pool keeps fast queries out of a queue of a new statement that turned slow",
  async () => {
    const key = Math.floor(Math.random() * 2 ** 31);
    const sequence = uniqueName("pgdbm_burst");
    const gatePool = await createSharedPool({ connectionString: TEST_URL, maxConnections: 1 });
    const gateKeeper = new DatabaseManager({ pool: gatePool });
    await gateKeeper.execute(`CREATE SEQUENCE "${sequence}"`);
    await gateKeeper.execute("SELECT pg_advisory_lock($1)", [key]);
    try {
      // The burst may wait at the gate as long as the test takes to look (no lock_timeout).
      const config = { minConnections: 4, maxConnections: 4, lockTimeoutMs: null };
      await withPool(config, async (db, _pool, app) => {
        // A burst of a statement never seen before is pipelined like a fast one: 30 of them
        // queue up on one connection. Each takes 30 ms; the first three run, the others
        // wait at a gate (an advisory lock the test holds), so that the statement is known
        // to be slow (two runs make it so) while most of the burst is still queued.
        const slowSql = `SELECT 'slow' AS kind FROM pg_sleep(0.03) WHERE CASE ` +
          `WHEN nextval('"${sequence}"') <= 3 THEN true ` +
          `ELSE pg_advisory_xact_lock_shared(${key}) IS NOT NULL END`;
        let slowDone = 0;
        const burst = background(
          Promise.all(Array.from({ length: 30 }, () =>
            db.fetchValue(slowSql).then((value) => {
              slowDone++;
              return value;
            }))),
        );
        await waitFor(
          "three runs of the burst, and the fourth at the gate",
          async () => slowDone === 3 && await gateWaiters(app) === 1,
          { watch: [burst], timeoutMs: 30_000 },
        );
        const fast = db.fetchValue<number>("SELECT $1::int", [7]).then((value) => ({
          value,
          slowDone,
        }));
        // Were the fast query queued behind the burst, it could only finish once the gate
        // opens: the gate opens after a while anyway, and the assertion below fails then
        // instead of the test hanging.
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([fast, new Promise((resolve) => timer = setTimeout(resolve, 20_000))]);
        clearTimeout(timer);
        await gateKeeper.execute("SELECT pg_advisory_unlock($1)", [key]);
        const answered = await fast;
        assert.equal(answered.value, 7);
        assert.deepEqual(await burst, Array(30).fill("slow"));
        assert.equal(
          answered.slowDone,
          3,
          `the fast query waited behind the burst (${answered.slowDone} of 30 had finished)`,
        );
      });
    } finally {
      await gateKeeper.execute(`DROP SEQUENCE IF EXISTS "${sequence}"`);
      await gatePool.close();
    }
  },
);

/** Backends of the pool with this application_name waiting for an advisory lock. */
async function gateWaiters(app: string): Promise<number> {
  return await observe(async (sql) => {
    const [row] = await sql`
      SELECT count(*)::int AS n FROM pg_stat_activity
      WHERE application_name = ${app} AND wait_event_type = 'Lock' AND wait_event = 'advisory'`;
    return row.n as number;
  });
}

serverTest(
  "createSharedPool() warns when prepare: false meets a session SET in initCommands",
  async () => {
    const cases: { config: DatabaseConfig; warns: boolean }[] = [
      { config: { prepare: false, initCommands: ["SET search_path = app"] }, warns: true },
      {
        config: { prepare: false, initCommands: ["SELECT set_config('x.y', '1', false)"] },
        warns: true,
      },
      { config: { prepare: false, initCommands: ["SELECT 1"] }, warns: false },
      { config: { prepare: true, initCommands: ["SET search_path = app"] }, warns: false },
    ];
    for (const { config, warns } of cases) {
      const warnings: string[] = [];
      const pool = await createSharedPool({
        connectionString: TEST_URL,
        minConnections: 1,
        ...config,
        logger: { warn: (message) => warnings.push(message) },
      });
      await pool.close();
      assert.equal(
        warnings.some((w) => w.includes("transaction mode") && w.includes("ALTER ROLE")),
        warns,
        `${JSON.stringify(config)}: ${warnings}`,
      );
    }
  },
);

// ---------------------------------------------------------------------------------------
// Configuration errors and passwords

const BAD_CONFIGS: { config: DatabaseConfig; field: RegExp }[] = [
  { config: { maxConnections: 0 }, field: /^maxConnections$/ },
  { config: { minConnections: 5, maxConnections: 2 }, field: /^minConnections$/ },
  { config: { minConnections: -1 }, field: /^minConnections$/ },
  { config: { ssl: { mode: "bogus" as "require" } }, field: /^ssl/ },
  { config: { connectionString: `${TEST_URL}?sslmode=bogus` }, field: /^ssl/ },
];

Deno.test("createSharedPool() rejects invalid options with ConfigurationError naming the field", async () => {
  for (const { config, field } of BAD_CONFIGS) {
    const error = await createSharedPool({ connectionString: TEST_URL, ...config }).then(
      () => undefined,
      (e) => e,
    );
    assert.ok(error instanceof ConfigurationError, `${JSON.stringify(config)} gave ${error}`);
    assert.match(error.field, field);
    assert.ok(error.message.includes(error.field.split(".")[0]), error.message);
  }
});

Deno.test("DatabaseManager() throws ConfigurationError synchronously for invalid options", () => {
  for (const { config, field } of BAD_CONFIGS) {
    let thrown: unknown;
    try {
      new DatabaseManager({ connectionString: TEST_URL, ...config });
    } catch (error) {
      thrown = error;
    }
    assert.ok(thrown instanceof ConfigurationError, `${JSON.stringify(config)} gave ${thrown}`);
    assert.match(thrown.field, field);
  }
});

Deno.test("ConnectionError never contains the password", async () => {
  const error = await createSharedPool({
    connectionString: `postgres://postgres:${PASSWORD}@127.0.0.1:1/test`,
    retry: { attempts: 1 },
  }).then(() => undefined, (e) => e);
  assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
  assert.equal(error.port, 1);
  assert.equal(error.attempts, 1);
  assertNoPassword(error);
});

Deno.test("ConnectionError never contains a password given as an option", async () => {
  const error = await createSharedPool({
    host: "127.0.0.1",
    port: freePort(),
    password: PASSWORD,
    retry: { attempts: 2, delayMs: 10 },
  }).then(() => undefined, (e) => e);
  assert.ok(error instanceof ConnectionError);
  assertNoPassword(error);
});

// ---------------------------------------------------------------------------------------
// TLS and Unix sockets

serverTest(
  SSL_ON
    ? "createSharedPool() connects without TLS when the URL says sslmode=disable"
    : "createSharedPool() with sslmode=require rejects with ConnectionError when the server has no TLS",
  async () => {
    if (SSL_ON) {
      await withPool({ connectionString: withSslMode(TEST_URL, "disable") }, async (db) => {
        const ssl = await db.fetchValue<boolean>(
          "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        );
        assert.equal(ssl, false);
      });
      return;
    }
    const url = new URL(withSslMode(TEST_URL, "require"));
    url.password = PASSWORD;
    const error = await createSharedPool({
      connectionString: url.href,
      retry: { attempts: 1 },
    }).then(() => undefined, (e) => e);
    assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
    assertNoPassword(error);
  },
);

function withSslMode(url: string, mode: string): string {
  const parsed = new URL(url);
  parsed.searchParams.set("sslmode", mode);
  return parsed.href;
}

Deno.test({
  name: SERVER_AVAILABLE && LOCAL_SERVER && SOCKET_DIR_EXISTS
    ? "createSharedPool() connects over a Unix socket directory"
    : `createSharedPool() Unix socket (skipped: no local server or no ${SOCKET_DIR})`,
  ignore: !(SERVER_AVAILABLE && LOCAL_SERVER && SOCKET_DIR_EXISTS),
  fn: async () => {
    await withPool(
      {
        connectionString: undefined,
        host: SOCKET_DIR,
        port: Number(TEST_TARGET.port || 5432),
        database: decodeURIComponent(TEST_TARGET.pathname.slice(1)),
        user: decodeURIComponent(TEST_TARGET.username) || "postgres",
        password: decodeURIComponent(TEST_TARGET.password) || undefined,
        minConnections: 1,
      },
      async (db, pool, app) => {
        const row = await db.fetchOne(
          `SELECT client_addr IS NULL AS local, application_name AS app
           FROM pg_stat_activity WHERE pid = pg_backend_pid()`,
        );
        assert.deepEqual(row, { local: true, app });
        assert.equal(pool.getStats().size, 1);
      },
    );
  },
});
