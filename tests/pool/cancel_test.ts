/**
 * Timeouts, aborts and cancels on shared (pipelined) connections: a caller's trouble never
 * reaches another caller. Each test here failed on the pool as it was before: later queries
 * resolved with earlier queries' results, innocent queries failed with 57014, timeouts named
 * the wrong limit, aborts lost their reason, and a failed type fetch crashed the process.
 */
import assert from "node:assert/strict";
import {
  ConnectionError,
  createSharedPool,
  DatabaseManager,
  type Pool,
  QueryError,
  TimeoutError,
} from "../../mod.ts";
import type { DatabaseConfig } from "../../src/config.ts";
import { observe, serverTest, TEST_URL, uniqueName } from "../_support/server.ts";
import { settlesWithin } from "../_support/settle.ts";

async function withPool(
  config: DatabaseConfig,
  fn: (db: DatabaseManager, pool: Pool) => Promise<void>,
): Promise<void> {
  const pool = await createSharedPool({ connectionString: TEST_URL, ...config });
  try {
    await fn(new DatabaseManager({ pool }), pool);
  } finally {
    await settlesWithin(pool.close(), 10_000, "pool.close()");
  }
}

function outcome<T>(promise: Promise<T>): Promise<{ value?: T; error?: unknown }> {
  return promise.then((value) => ({ value }), (error) => ({ error }));
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

serverTest(
  "A query that times out in the queue leaves later answers with their callers",
  async () => {
    for (let round = 0; round < 5; round++) {
      await withPool({ minConnections: 1, maxConnections: 1 }, async (db) => {
        assert.equal(await db.fetchValue<number>("SELECT $1::int", [0]), 0);
        const slow = db.fetchValue<string>("SELECT 'slow' FROM pg_sleep(0.5)");
        const timed = outcome(db.fetchValue<number>("SELECT $1::int", [100], { timeoutMs: 100 }));
        await sleep(20);
        const later = [1, 2, 3].map((n) => db.fetchValue<number>("SELECT $1::int", [n]));
        assert.equal(await slow, "slow");
        const { error } = await timed;
        assert.ok(error instanceof TimeoutError, `expected TimeoutError, got ${error}`);
        assert.equal(error.timeoutMs, 100);
        assert.deepEqual(await settlesWithin(Promise.all(later), 5000, "later queries"), [1, 2, 3]);
        assert.equal(await db.fetchValue<number>("SELECT $1::int", [4]), 4);
      });
    }
  },
);

serverTest("A query aborted in the queue leaves later answers with their callers", async () => {
  await withPool({ minConnections: 1, maxConnections: 1 }, async (db) => {
    for (let round = 0; round < 5; round++) {
      const controller = new AbortController();
      const slow = db.fetchValue<string>("SELECT 'slow' FROM pg_sleep(0.2)");
      const aborted = outcome(
        db.fetchValue<number>("SELECT $1::int", [100], { signal: controller.signal }),
      );
      const later = [1, 2, 3].map((n) => db.fetchValue<number>("SELECT $1::int", [n + round]));
      await sleep(20);
      const reason = new Error(`the user went away ${round}`);
      controller.abort(reason);
      assert.equal((await aborted).error, reason);
      assert.equal(await slow, "slow");
      assert.deepEqual(
        await settlesWithin(Promise.all(later), 5000, "later queries"),
        [1, 2, 3].map((n) => n + round),
      );
    }
  });
});

serverTest("A timeout names the limit that fired", async () => {
  await withPool({ minConnections: 1, maxConnections: 2, commandTimeoutMs: 300 }, async (db) => {
    const calls = Array.from(
      { length: 40 },
      (_, i) =>
        outcome(db.fetchValue("SELECT pg_sleep(2)", [], i % 2 === 0 ? { timeoutMs: 100 } : {})),
    );
    for (const [i, { error }] of (await Promise.all(calls)).entries()) {
      assert.ok(error instanceof TimeoutError, `call ${i}: expected TimeoutError, got ${error}`);
      const limit = i % 2 === 0 ? 100 : 300;
      assert.equal(error.timeoutMs, limit, `call ${i}`);
      assert.match(error.message, new RegExp(`within ${limit} ms`));
    }
    assert.equal(await db.fetchValue<number>("SELECT 7"), 7);
  });
});

serverTest("An abort rejects with the signal's reason, like fetch", async () => {
  await withPool({ minConnections: 1, maxConnections: 1 }, async (db) => {
    const reason = new Error("request closed");
    const before = await outcome(
      db.fetchValue("SELECT 1", [], { signal: AbortSignal.abort(reason) }),
    );
    assert.equal(before.error, reason);

    const controller = new AbortController();
    const running = outcome(
      db.fetchValue("SELECT pg_sleep(30)", [], { signal: controller.signal }),
    );
    await sleep(100);
    controller.abort();
    const { error } = await settlesWithin(running, 3000, "the aborted query");
    assert.ok(error instanceof DOMException && error.name === "AbortError", String(error));

    const timedOut = await outcome(
      db.fetchValue("SELECT pg_sleep(30)", [], { signal: AbortSignal.timeout(100) }),
    );
    assert.ok(
      timedOut.error instanceof DOMException && timedOut.error.name === "TimeoutError",
      String(timedOut.error),
    );
    assert.equal(await db.fetchValue<number>("SELECT 8"), 8);
  });
});

serverTest("A cancel never fails another caller's query on the same connection", async () => {
  await withPool({ minConnections: 1, maxConnections: 1 }, async (db) => {
    let cancelled = 0;
    for (let round = 0; round < 300; round++) {
      // The target ends at about the moment its timer fires, so its cancel often arrives
      // while the server already runs the queries pipelined behind it.
      const target = outcome(
        db.fetchValue("SELECT pg_sleep(0.004)", [], { timeoutMs: 1 + (round % 8) }),
      );
      const innocents = [1, 2, 3].map((n) =>
        outcome(db.fetchValue<number>("SELECT $1::int + 0", [round * 10 + n]))
      );
      const plain = outcome(db.fetchValue<number>(`SELECT ${round}`));
      if ((await target).error !== undefined) cancelled++;
      for (const [i, result] of (await Promise.all(innocents)).entries()) {
        assert.equal(
          result.error,
          undefined,
          `round ${round}: innocent ${i} failed: ${result.error}`,
        );
        assert.equal(result.value, round * 10 + i + 1);
      }
      assert.deepEqual(await plain, { value: round });
    }
    assert.ok(cancelled > 0, "no target was cancelled: the test did not test anything");
  });
});

serverTest(
  "The server's statement_timeout rejects with TimeoutError and keeps SQLSTATE",
  async () => {
    await withPool(
      { minConnections: 1, maxConnections: 1, statementTimeoutMs: 1000 },
      async (db) => {
        const { error } = await outcome(db.fetchValue("SELECT pg_sleep(5)"));
        assert.ok(error instanceof TimeoutError, `expected TimeoutError, got ${error}`);
        assert.equal(error.timeoutMs, 1000);
        assert.equal(error.sqlstate, "57014");
        assert.ok(error.cause instanceof QueryError);
        assert.equal(await db.fetchValue<number>("SELECT 9"), 9);
      },
    );
    // A cancel from outside (an operator's pg_cancel_backend) is not a timeout.
    await withPool({ minConnections: 1, maxConnections: 1 }, async (db) => {
      const pid = await db.fetchValue<number>("SELECT pg_backend_pid()");
      const running = outcome(db.fetchValue("SELECT pg_sleep(30)"));
      await sleep(200);
      await observe((sql) => sql`SELECT pg_cancel_backend(${pid})`);
      const { error } = await running;
      assert.ok(error instanceof QueryError && !(error instanceof TimeoutError), String(error));
      assert.equal(error.sqlstate, "57014");
    });
  },
);

serverTest("A query after one that failed mid-stream gets exactly its own rows", async () => {
  await withPool({ minConnections: 1, maxConnections: 1 }, async (db) => {
    for (let round = 0; round < 20; round++) {
      const [failed, next] = await Promise.all([
        outcome(db.fetchAll(
          "SELECT CASE WHEN g < 4 THEN g ELSE 1 / (g - g) END AS v FROM generate_series(1, 10) g",
        )),
        db.fetchAll<{ v: number }>("SELECT g AS v FROM generate_series(1, 3) g"),
      ]);
      assert.ok(failed.error instanceof QueryError && failed.error.sqlstate === "22012");
      assert.equal(next.length, 3);
      assert.deepEqual(next, [{ v: 1 }, { v: 2 }, { v: 3 }]);
    }
  });
});

serverTest("Arrays bound and returned without postgres.js's per-session type fetch", async () => {
  await withPool({ minConnections: 1, maxConnections: 2 }, async (db) => {
    assert.deepEqual(await db.fetchValue("SELECT $1::int[] AS a", [[1, null, 3]]), [1, null, 3]);
    const texts = ['a "quoted" word', "back\\slash", "NULL", "", "comma, here"];
    assert.deepEqual(await db.fetchValue("SELECT $1::text[] AS a", [texts]), texts);
    assert.deepEqual(
      await db.fetchValue("SELECT $1::int[][] AS a", [[[1, 2], [3, 4]]]),
      [[1, 2], [3, 4]],
    );
    const day = new Date("2024-01-02T03:04:05.000Z");
    assert.deepEqual(await db.fetchValue("SELECT $1::timestamptz[] AS a", [[day]]), [day]);
    const bytes = new Uint8Array([0, 1, 255]);
    assert.deepEqual(await db.fetchValue("SELECT $1::bytea[] AS a", [[bytes, null]]), [
      bytes,
      null,
    ]);
  });
});

/** A private database, and a session that can hold its `pg_type` locked against every other. */
interface LockedCatalog {
  /** The database's URL. */
  url: string;
  /** Takes `ACCESS EXCLUSIVE` on `pg_type` in a transaction left open; resolves once held. */
  lock(): Promise<void>;
  /** Ends that transaction; resolves once it ended. */
  release(): Promise<void>;
}

/**
 * Runs `fn` with a fresh database whose `pg_type` is locked (the array-types query that sets
 * up a new connection waits for it), then drops the database.
 */
async function withLockedCatalog(fn: (catalog: LockedCatalog) => Promise<void>): Promise<void> {
  const database = uniqueName("pgdbm_types");
  await observe((sql) => sql.unsafe(`CREATE DATABASE "${database}"`));
  const url = new URL(TEST_URL);
  url.pathname = `/${database}`;
  const locker = await createSharedPool({ connectionString: url.href, minConnections: 1 });
  const lockDb = new DatabaseManager({ pool: locker });
  let holder: Promise<void> | undefined;
  let release = () => {};
  const catalog: LockedCatalog = {
    url: url.href,
    lock: async () => {
      const released = new Promise<void>((resolve) => release = resolve);
      let locked!: () => void;
      const isLocked = new Promise<void>((resolve) => locked = resolve);
      holder = lockDb.transaction(async (tx) => {
        await tx.execute("LOCK TABLE pg_catalog.pg_type IN ACCESS EXCLUSIVE MODE");
        locked();
        await released;
      });
      await Promise.race([isLocked, holder]);
    },
    release: async () => {
      release();
      await holder;
    },
  };
  try {
    await catalog.lock();
    await fn(catalog);
  } finally {
    await catalog.release().catch(() => {});
    await locker.close();
    await observe((sql) => sql.unsafe(`DROP DATABASE IF EXISTS "${database}" WITH (FORCE)`));
  }
}

serverTest(
  "A type fetch cut by connectTimeoutMs is a ConnectionError naming the cause, not a crash",
  async () => {
    await withLockedCatalog(async ({ url, release }) => {
      const failed = await outcome(createSharedPool({
        connectionString: url,
        minConnections: 1,
        connectTimeoutMs: 1000,
        retry: { attempts: 2, delayMs: 50 },
      }));
      await release();
      const error = failed.error;
      assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
      assert.equal(error.attempts, 2, "a setup statement that timed out is worth a retry");
      assert.match(error.message, /^Cannot set up a connection to /);
      assert.match(error.message, /the driver's setup of the session failed with SQLSTATE 57014/);
      assert.match(error.message, /longer than connectTimeoutMs \(1000 ms\)/);
      assert.match(error.message, /lock on the system catalog pg_type/);
      assert.doesNotMatch(error.message, /Check that the server is running/);
      await withPool({ connectionString: url, minConnections: 1 }, async (db) => {
        assert.deepEqual(await db.fetchValue("SELECT $1::int[]", [[1, 2]]), [1, 2]);
      });
    });
  },
);

serverTest(
  "A new connection's setup waits out a locked catalog past statementTimeoutMs and " +
    "lockTimeoutMs, which still bound the caller's statements",
  async () => {
    const cases = [
      { config: { statementTimeoutMs: 200 }, setting: "statement_timeout" },
      { config: { lockTimeoutMs: 200 }, setting: "lock_timeout" },
    ];
    for (const { config, setting } of cases) {
      await withLockedCatalog(async ({ url, lock, release }) => {
        const opening = outcome(createSharedPool({
          connectionString: url,
          minConnections: 1,
          maxConnections: 1,
          retry: { attempts: 1 },
          ...config,
        }));
        await sleep(1000);
        await release();
        const { value: pool, error } = await settlesWithin(opening, 10_000, "createSharedPool()");
        assert.equal(error, undefined, `${setting}: the pool did not open: ${error}`);
        try {
          const db = new DatabaseManager({ pool: pool! });
          assert.equal(await db.fetchValue(`SHOW ${setting}`), "200ms");
          if (setting === "statement_timeout") {
            const slept = await outcome(db.fetchValue("SELECT pg_sleep(1)"));
            assert.ok(slept.error instanceof TimeoutError, `expected TimeoutError: ${slept.error}`);
            assert.equal(slept.error.sqlstate, "57014");
            assert.equal(slept.error.timeoutMs, 200);
          } else {
            await lock();
            const waited = await outcome(db.fetchValue("SELECT count(*) FROM pg_catalog.pg_type"));
            await release();
            assert.ok(waited.error instanceof QueryError, `expected QueryError: ${waited.error}`);
            assert.equal(waited.error.sqlstate, "55P03");
          }
          assert.equal(await db.fetchValue<number>("SELECT 1"), 1);
        } finally {
          await pool?.close();
        }
      });
    }
  },
);
