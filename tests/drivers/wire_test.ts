/**
 * Adversarial cases for the network driver (src/drivers/wire.ts), against a real server:
 * notifications in the middle of a portal stream or a COPY out, close() and server
 * terminations in the middle of every kind of exchange, cancel() of a statement still being
 * described, awkward parameters, a 60 MB row, 200,000 pipelined statements, errors in the
 * middle of a multi-statement query, COPY FROM STDIN through query(), non-ASCII startup
 * settings and a database name that needs quoting.
 *
 * Every case asserts one outcome (or the few the contract of src/drivers/driver.ts allows);
 * hangs are caught with `settlesWithin`.
 */
import assert from "node:assert/strict";
import { resolveConfig } from "../../src/config.ts";
import type { Driver, DriverConnection, DriverResult, Row } from "../../src/drivers/driver.ts";
import { QueryError } from "../../src/errors.ts";
import { createWireDriver } from "../../src/drivers/wire.ts";
import { BUILTIN_ARRAY_TYPES } from "../../src/drivers/_wire_types.ts";
import { SERVER_AVAILABLE, TEST_URL, uniqueName } from "../_support/server.ts";
import { rejection, settlesWithin } from "../_support/settle.ts";
import { concat } from "../_support/bytes.ts";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

function driverFor(
  settings: Record<string, string> = {},
  url = TEST_URL,
  prepare?: boolean,
): Driver {
  return createWireDriver(
    resolveConfig({
      connectionString: url,
      serverSettings: settings,
      ...(prepare === undefined ? {} : { prepare }),
    }),
  );
}

/** A test on the server; sessions are ended by the test itself (terminate() in finally). */
function wireTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name: SERVER_AVAILABLE ? name : `${name} (skipped: no PostgreSQL server at PGDBM_TEST_URL)`,
    ignore: !SERVER_AVAILABLE,
    sanitizeOps: false,
    sanitizeResources: false,
    fn,
  });
}

/** Opens a session, runs `fn`, and ends the session whatever happens. */
async function withConn(
  fn: (conn: DriverConnection, driver: Driver) => Promise<void>,
  driver: Driver = driverFor(),
): Promise<void> {
  const conn = await settlesWithin(driver.connect(), 10_000, "connect()");
  try {
    await fn(conn, driver);
  } finally {
    await settlesWithin(conn.terminate(), 10_000, "terminate()").catch(() => {});
    await driver.close();
  }
}

async function exec(
  conn: DriverConnection,
  sql: string,
  params: readonly unknown[] = [],
  prepare?: boolean,
): Promise<DriverResult> {
  return await conn.query(sql, params, prepare === undefined ? undefined : { prepare }).result;
}

type Outcome = { rows: unknown[] } | { sqlstate: string | undefined } | { other: string };

function outcome(promise: Promise<DriverResult>): Promise<Outcome> {
  return promise.then(
    ({ rows }) => ({ rows }),
    (error: unknown) =>
      error instanceof QueryError ? { sqlstate: error.sqlstate } : { other: String(error) },
  );
}

/** A lost session's error: class 08, or 57P01 (the server's message arrived first). */
function assertLost(error: unknown, what: string): void {
  assert.ok(error instanceof QueryError, `${what}: expected a QueryError, got ${error}`);
  const state = error.sqlstate ?? "";
  assert.ok(
    state.startsWith("08") || state === "57P01",
    `${what}: expected class 08 or 57P01, got ${state} (${error.message})`,
  );
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

async function until(check: () => boolean, ms: number, what: string): Promise<void> {
  await settlesWithin(
    (async () => {
      while (!check()) await sleep(5);
    })(),
    ms,
    what,
  );
}

/** Terminates `pid` from a session of its own. */
async function terminateBackend(driver: Driver, pid: number): Promise<void> {
  const killer = await driver.connect();
  try {
    const { rows } = await exec(killer, "SELECT pg_terminate_backend($1) AS ok", [pid]);
    assert.deepEqual(rows, [{ ok: true }]);
  } finally {
    await killer.close();
  }
}

/** Waits until the server shows `pid` running a statement that matches `like`. */
async function waitRunning(driver: Driver, pid: number, like: string): Promise<void> {
  const watcher = await driver.connect();
  try {
    await settlesWithin(
      (async () => {
        while (true) {
          const { rows } = await exec(
            watcher,
            "SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1 AND state = 'active' " +
              "AND query LIKE $2",
            [pid, like],
          );
          if (rows[0].n === 1) return;
          await sleep(10);
        }
      })(),
      5000,
      `pid ${pid} running ${like}`,
    );
  } finally {
    await watcher.close();
  }
}

/** Counts `onClose` calls of a session. */
function closeCounter(conn: DriverConnection): { readonly calls: number } {
  const counter = { calls: 0 };
  conn.onClose(() => counter.calls++);
  return counter;
}

/** After a lost session: closed, onClose once, later statements refused with 08003. */
async function assertGone(conn: DriverConnection, counter: { readonly calls: number }) {
  assert.equal(conn.closed, true, "closed");
  await sleep(20);
  assert.equal(counter.calls, 1, "onClose calls");
  const error = await rejection(conn.query("SELECT 1", []).result);
  assert.equal(error.sqlstate, "08003");
}

// ---------------------------------------------------------------------------------------
// Notifications in the middle of a stream
// ---------------------------------------------------------------------------------------

wireTest("wire: a NOTIFY during a portal stream is delivered; the rows are intact", async () => {
  await withConn(async (conn, driver) => {
    const channel = uniqueName("wire_chan");
    const received: Array<[string, string]> = [];
    conn.onNotification((name, payload) => received.push([name, payload]));
    await exec(conn, `LISTEN "${channel}"`);
    const other = await driver.connect();
    const seen: number[] = [];
    try {
      let batches = 0;
      for await (
        const rows of conn.cursor!(
          "SELECT i, repeat('r', 50) AS pad FROM generate_series(1, 5000) i",
          [],
          100,
        )
      ) {
        assert.ok(rows.length > 0 && rows.length <= 100, `batch of ${rows.length}`);
        for (const row of rows) {
          assert.equal(row.pad, "r".repeat(50));
          seen.push(row.i as number);
        }
        if (batches++ === 2) {
          await exec(other, "SELECT pg_notify($1, $2)", [channel, "mid-stream ✓"]);
          await sleep(50);
        }
      }
    } finally {
      await other.close();
    }
    assert.deepEqual(seen, Array.from({ length: 5000 }, (_, i) => i + 1));
    await exec(conn, "SELECT 1");
    await until(() => received.length >= 1, 3000, "the notification");
    assert.deepEqual(received, [[channel, "mid-stream ✓"]]);
  });
});

wireTest("wire: a NOTIFY during a COPY out is delivered; the output is intact", async () => {
  await withConn(async (conn, driver) => {
    const channel = uniqueName("wire_chan");
    const received: Array<[string, string]> = [];
    conn.onNotification((name, payload) => received.push([name, payload]));
    await exec(conn, `LISTEN "${channel}"`);
    const other = await driver.connect();
    const chunks: Uint8Array[] = [];
    let count = -1;
    try {
      const copy = conn.copyOut("COPY (SELECT i FROM generate_series(1, 200000) i) TO STDOUT");
      let notified = false;
      while (true) {
        const step = await copy.next();
        if (step.done) {
          count = step.value;
          break;
        }
        chunks.push(step.value);
        if (!notified) {
          notified = true;
          await exec(other, "SELECT pg_notify($1, 'during copy')", [channel]);
          await sleep(50);
        }
      }
    } finally {
      await other.close();
    }
    assert.equal(count, 200000);
    const text = new TextDecoder().decode(concat(chunks));
    assert.equal(text, Array.from({ length: 200000 }, (_, i) => `${i + 1}\n`).join(""));
    await exec(conn, "SELECT 1");
    await until(() => received.length >= 1, 3000, "the notification");
    assert.deepEqual(received, [[channel, "during copy"]]);
  });
});

// ---------------------------------------------------------------------------------------
// close() in the middle of things
// ---------------------------------------------------------------------------------------

/** A COPY source that yields a row every 10 ms until stopped; notes when it was finalized. */
function slowSource(): { chunks: AsyncGenerator<string>; readonly finalized: boolean } {
  const state = { finalized: false, chunks: undefined as unknown as AsyncGenerator<string> };
  state.chunks = (async function* () {
    try {
      for (let i = 0;; i++) {
        await sleep(10);
        yield `${i}\n`;
      }
    } finally {
      state.finalized = true;
    }
  })();
  return state;
}

wireTest("wire: close() during a COPY in with an endless source settles everything", async () => {
  await withConn(async (conn) => {
    const table = uniqueName("wire_copy_close");
    await exec(conn, `CREATE TEMP TABLE ${table} (n int)`);
    const counter = closeCounter(conn);
    const source = slowSource();
    const copying = conn.copyIn(`COPY ${table} FROM STDIN`, source.chunks).then(
      (count) => ({ count }),
      (error: unknown) => ({ error }),
    );
    await sleep(150);
    const closing = conn.close();
    const copied = await settlesWithin(copying, 15_000, "copyIn() after close()");
    await settlesWithin(closing, 15_000, "close() during a COPY in");
    assert.ok("error" in copied, `the endless COPY must not succeed: ${JSON.stringify(copied)}`);
    assertLost(copied.error, "copyIn()");
    assert.equal(conn.closed, true);
    assert.equal(counter.calls, 1);
    await until(() => source.finalized, 2000, "the source's finalization");
  });
});

wireTest(
  "wire: close() while a portal stream waits for its reader settles everything",
  async () => {
    await withConn(async (conn) => {
      const counter = closeCounter(conn);
      const stream = conn.cursor!("SELECT i FROM generate_series(1, 100000) i", [], 100);
      const first = await stream.next();
      assert.equal(first.done, false);
      assert.deepEqual((first.value as Row[])[0], { i: 1 });
      // The reader stalls: close() must end the session anyway.
      await settlesWithin(conn.close(), 15_000, "close() during a stream");
      assert.equal(conn.closed, true);
      assert.equal(counter.calls, 1);
      // The reader comes back: it may get the batch fetched ahead, then the loss.
      let error: unknown;
      try {
        for (let i = 0; i < 3; i++) {
          const step = await settlesWithin(stream.next(), 5000, "the stream after close()");
          if (step.done) break;
        }
      } catch (caught) {
        error = caught;
      }
      assertLost(error, "the stream after close()");
    });
  },
);

wireTest(
  "wire: close() with statements pipelined behind a first describe answers them all",
  async () => {
    await withConn(async (conn) => {
      const counter = closeCounter(conn);
      const marker = uniqueName("m");
      const results = [
        conn.query(`SELECT $1::int + 1 AS v /* ${marker} */`, [1]).result,
        conn.query("SELECT pg_sleep(0.2), 2 AS v", []).result,
        conn.query(`SELECT $1::int + 1 AS v /* ${marker} */`, [2]).result,
        conn.query(`SELECT $1::text AS v /* ${marker} */`, ["four"], { prepare: false }).result,
        conn.query("SELECT 5 AS v", []).result,
      ];
      const closing = conn.close();
      const values = await settlesWithin(
        Promise.all(results.map((result) => outcome(result))),
        10_000,
        "the pipelined statements",
      );
      assert.deepEqual(values.map((value) => "rows" in value ? value.rows[0] : value), [
        { v: 2 },
        { pg_sleep: "", v: 2 },
        { v: 3 },
        { v: "four" },
        { v: 5 },
      ]);
      await settlesWithin(closing, 10_000, "close()");
      assert.equal(counter.calls, 1);
      assert.equal((await rejection(conn.query("SELECT 1", []).result)).sqlstate, "08003");
    });
  },
);

// ---------------------------------------------------------------------------------------
// The server ends the session in the middle of things
// ---------------------------------------------------------------------------------------

wireTest("wire: terminated while statements wait to be described: all reject as lost", async () => {
  await withConn(async (conn, driver) => {
    const counter = closeCounter(conn);
    const marker = uniqueName("m");
    const sleeping = outcome(conn.query("SELECT pg_sleep(10) AS s", []).result);
    // Parse/Describe/Flush written behind the sleep: the describe is what the server runs next.
    const described = outcome(conn.query(`SELECT $1::int AS v /* ${marker} */`, [1]).result);
    // Held behind the describe, not written yet.
    const held = outcome(conn.query("SELECT 3 AS v", []).result);
    await waitRunning(driver, conn.pid, "SELECT pg_sleep(10)%");
    await terminateBackend(driver, conn.pid);
    const all = await settlesWithin(Promise.all([sleeping, described, held]), 5000, "statements");
    for (const [index, end] of all.entries()) {
      assert.ok("sqlstate" in end, `statement ${index}: ${JSON.stringify(end)}`);
      const state = end.sqlstate ?? "";
      assert.ok(state.startsWith("08") || state === "57P01", `statement ${index}: ${state}`);
    }
    await assertGone(conn, counter);
  });
});

/**
 * Reads an iterator to its end within 5 s, calling `onStep` with each value; returns what it
 * threw, or `undefined` when it ended.
 */
async function readToEnd<T>(
  iterator: AsyncIterator<T>,
  what: string,
  onStep: (value: T) => void,
): Promise<unknown> {
  const reading = (async () => {
    for (let step = await iterator.next(); !step.done; step = await iterator.next()) {
      onStep(step.value);
    }
  })();
  return await settlesWithin(reading, 5000, what).then(() => undefined, (error: unknown) => error);
}

wireTest("wire: terminated during a COPY in: copyIn() rejects as lost", async () => {
  await withConn(async (conn, driver) => {
    const table = uniqueName("wire_copy_kill");
    await exec(conn, `CREATE TEMP TABLE ${table} (n int)`);
    const counter = closeCounter(conn);
    const source = slowSource();
    const copying = conn.copyIn(`COPY ${table} FROM STDIN`, source.chunks).then(
      (count) => ({ count }),
      (error: unknown) => ({ error }),
    );
    await waitRunning(driver, conn.pid, "COPY %");
    await sleep(100);
    await terminateBackend(driver, conn.pid);
    const copied = await settlesWithin(copying, 5000, "copyIn() of a terminated session");
    assert.ok("error" in copied, JSON.stringify(copied));
    assertLost(copied.error, "copyIn()");
    await assertGone(conn, counter);
    await until(() => source.finalized, 2000, "the source's finalization");
  });
});

wireTest(
  "wire: terminated during a COPY out: the iterator throws a lost-session error",
  async () => {
    await withConn(async (conn, driver) => {
      const counter = closeCounter(conn);
      const copy = conn.copyOut(
        "COPY (SELECT i, repeat('x', 2000), pg_sleep(0.002) FROM generate_series(1, 100000) i) " +
          "TO STDOUT",
      );
      const first = await settlesWithin(copy.next(), 5000, "the first chunk");
      assert.equal(first.done, false);
      await terminateBackend(driver, conn.pid);
      let chunks = 0;
      const error = await readToEnd(copy, "the COPY out of a terminated session", () => chunks++);
      assertLost(error, `copyOut() after ${chunks} more chunks`);
      await assertGone(conn, counter);
    });
  },
);

wireTest(
  "wire: terminated during a portal stream: the iterator throws a lost-session error",
  async () => {
    await withConn(async (conn, driver) => {
      const counter = closeCounter(conn);
      const stream = conn.cursor!(
        "SELECT i, pg_sleep(0.001) AS s FROM generate_series(1, 100000) i",
        [],
        50,
      );
      const first = await settlesWithin(stream.next(), 5000, "the first batch");
      assert.equal(first.done, false);
      await terminateBackend(driver, conn.pid);
      let last = 0;
      const error = await readToEnd(stream, "the stream of a terminated session", (rows) => {
        last = rows.at(-1)!.i as number;
      });
      assertLost(error, `the stream (last row ${last})`);
      await assertGone(conn, counter);
    });
  },
);

// ---------------------------------------------------------------------------------------
// cancel() of a statement still being described
// ---------------------------------------------------------------------------------------

wireTest(
  "wire: cancel() of a statement still being described; later statements are theirs",
  async () => {
    await withConn(async (conn) => {
      const marker = uniqueName("m");
      const sleeping = outcome(conn.query("SELECT pg_sleep(0.5) AS s, 1 AS v", []).result);
      const target = conn.query(`SELECT $1::int + 1 AS v /* ${marker} */`, [41]);
      const targetEnd = outcome(target.result);
      const later = [
        outcome(conn.query("SELECT 3 AS v", []).result),
        outcome(conn.query(`SELECT $1::text AS v /* ${marker} */`, ["x"]).result),
        outcome(conn.query(`SELECT $1::int + 1 AS v /* ${marker} */`, [99]).result),
      ];
      // The describe is written behind the sleep by now (not withdrawn from the outbox).
      await sleep(50);
      await settlesWithin(target.cancel(), 5000, "cancel()");
      assert.deepEqual(await settlesWithin(sleeping, 5000, "the sleep"), {
        rows: [{ s: "", v: 1 }],
      });
      const targetOutcome = await settlesWithin(targetEnd, 5000, "the cancelled statement");
      assert.ok(
        JSON.stringify(targetOutcome) === JSON.stringify({ rows: [{ v: 42 }] }) ||
          JSON.stringify(targetOutcome) === JSON.stringify({ sqlstate: "57014" }),
        `the cancelled statement: ${JSON.stringify(targetOutcome)}`,
      );
      const expected = [{ v: 3 }, { v: "x" }, { v: 100 }];
      const ends = await settlesWithin(Promise.all(later), 5000, "the later statements");
      for (const [index, end] of ends.entries()) {
        // driver.ts: a later statement may be the one the cancel request stops.
        assert.ok(
          JSON.stringify(end) === JSON.stringify({ rows: [expected[index]] }) ||
            JSON.stringify(end) === JSON.stringify({ sqlstate: "57014" }),
          `later statement ${index}: ${JSON.stringify(end)}`,
        );
      }
      assert.deepEqual((await exec(conn, `SELECT $1::int + 1 AS v /* ${marker} */`, [6])).rows, [
        { v: 7 },
      ]);
      assert.deepEqual((await exec(conn, "SELECT 8 AS v")).rows, [{ v: 8 }]);
    });
  },
);

// ---------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------

const INSTANT = new Date(Date.UTC(2024, 0, 2, 3, 4, 5, 678));

const PARAM_CASES: Array<
  { name: string; sql: string; params: unknown[]; rows?: Row[]; sqlstate?: string }
> = [
  {
    name: "text a server cannot take as int",
    sql: "SELECT $1::int AS v",
    params: ["abc"],
    sqlstate: "22P02",
  },
  {
    name: "an object for jsonb",
    sql: "SELECT $1::jsonb AS v",
    params: [{ a: [1, "x", null], b: { c: true } }],
    rows: [{ v: { a: [1, "x", null], b: { c: true } } }],
  },
  {
    name: "a JSON string for jsonb is stored as a JSON string",
    sql: "SELECT $1::jsonb AS v, jsonb_typeof($1::jsonb) AS t",
    params: ['{"a":1}'],
    rows: [{ v: '{"a":1}', t: "string" }],
  },
  {
    name: "bigint for int8, beyond 2^53",
    sql: "SELECT $1::int8 AS v, $1::int8 + 1 AS w",
    params: [9007199254740993n],
    rows: [{ v: "9007199254740993", w: "9007199254740994" }],
  },
  {
    name: "bigint for an untyped parameter",
    sql: "SELECT $1 AS v, pg_typeof($1)::text AS t",
    params: [-5n],
    rows: [{ v: "-5", t: "bigint" }],
  },
  {
    name: "booleans",
    sql: "SELECT $1::bool AS a, $2::bool AS b, $3 AS c",
    params: [true, false, true],
    rows: [{ a: true, b: false, c: true }],
  },
  {
    name: "a Date for timestamptz",
    sql: "SELECT $1::timestamptz AS v",
    params: [INSTANT],
    rows: [{ v: INSTANT }],
  },
  {
    name: "a Date for $1::text is the server's text of the instant",
    sql: "SELECT $1::text AS v",
    params: [INSTANT],
    rows: [{ v: "2024-01-02 03:04:05.678+00" }],
  },
  {
    name: "a nested array for int[][]",
    sql: "SELECT $1::int[][] AS v, array_dims($1::int[][]) AS d",
    params: [[[1, 2, 3], [4, 5, 6]]],
    rows: [{ v: [[1, 2, 3], [4, 5, 6]], d: "[1:2][1:3]" }],
  },
  {
    name: "null inside int[] and text[]",
    sql: "SELECT $1::int[] AS a, $2::text[] AS b",
    params: [[1, null, 3], [null, "NULL", "", "a,b", 'q"uote']],
    rows: [{ a: [1, null, 3], b: [null, "NULL", "", "a,b", 'q"uote'] }],
  },
  {
    name: "empty arrays",
    sql: "SELECT $1::int[] AS a, $2::text[] AS b, cardinality($1::int[]) AS n",
    params: [[], []],
    rows: [{ a: [], b: [], n: 0 }],
  },
  {
    name: "bigints and booleans in arrays",
    sql: "SELECT $1::int8[] AS a, $2::bool[] AS b",
    params: [[1n, -2n, null], [true, false, null]],
    rows: [{ a: ["1", "-2", null], b: [true, false, null] }],
  },
  {
    name: "an invalid Date is refused on the client",
    sql: "SELECT $1::timestamptz AS v",
    params: [new Date(NaN)],
    sqlstate: undefined,
  },
  {
    name: "a NUL character in text is the server's error",
    sql: "SELECT $1::text AS v",
    params: ["a\u0000b"],
    sqlstate: "22021",
  },
  {
    name: "too few values is the server's 08P01, and the session lives on",
    sql: "SELECT $1::int AS a, $2::int AS b",
    params: [1],
    sqlstate: "08P01",
  },
  {
    name: "undefined is refused on the client",
    sql: "SELECT $1::int AS v",
    params: [undefined],
    sqlstate: undefined,
  },
];

wireTest("wire: parameters of every awkward kind, prepared and not", async (t) => {
  await withConn(async (conn) => {
    await exec(conn, "SET TimeZone = 'UTC'");
    for (const prepare of [true, false]) {
      for (const paramCase of PARAM_CASES) {
        await t.step(`${paramCase.name} (prepare: ${prepare})`, async () => {
          const result = conn.query(paramCase.sql, paramCase.params, { prepare }).result;
          if (paramCase.rows !== undefined) {
            assert.deepEqual((await result).rows, paramCase.rows);
          } else {
            const error = await rejection(result);
            assert.equal(error.sqlstate, paramCase.sqlstate, error.message);
          }
          // The session goes on.
          assert.deepEqual((await exec(conn, "SELECT $1::int AS ok", [1], prepare)).rows, [
            { ok: 1 },
          ]);
        });
      }
    }
  });
});

// ---------------------------------------------------------------------------------------
// Size and volume
// ---------------------------------------------------------------------------------------

wireTest("wire: a 60 MB row reads back exactly, in bounded time", async () => {
  await withConn(async (conn) => {
    const size = 60 * 1024 * 1024;
    const started = performance.now();
    const { rows } = await settlesWithin(
      exec(conn, `SELECT repeat('x', ${size}) AS v, 7 AS after`),
      30_000,
      "the 60 MB row",
    );
    const ms = performance.now() - started;
    const value = rows[0].v as string;
    assert.equal(value.length, size);
    assert.equal(value, "x".repeat(size));
    assert.equal(rows[0].after, 7);
    // A reader that copies its pending bytes again for each chunk takes minutes here.
    assert.ok(ms < 15_000, `the 60 MB row took ${Math.round(ms)} ms`);
    assert.deepEqual((await exec(conn, "SELECT 1 AS ok")).rows, [{ ok: 1 }]);
  });
});

wireTest(
  "wire: large statements pipelined on one session each arrive with their own bytes",
  async () => {
    // Messages from 64 KiB on are sent from the writer's own buffer, which is written into
    // again once the socket took all of it: a buffer reused too early would send another
    // statement's bytes. The server sleeps first, so the socket fills and writes wait; each
    // statement is sent in its own turn (its own write); sizes vary, so buffers of every
    // size are handed back and reused; small statements travel between the large ones.
    await withConn(async (conn) => {
      const text = "SELECT array_to_string($1::text[], ',') AS v, $2::int AS i";
      await conn.query(text, [[], 0]).result;
      for (let round = 0; round < 5; round++) {
        const arrays = Array.from({ length: 40 }, (_, i) => {
          const count = 3_000 + ((i * 7919 + round * 104_729) % 17_000);
          return Array.from({ length: count }, (_, j) => `r${round}s${i}e${j}`);
        });
        const sleep = conn.query("SELECT pg_sleep(0.3)", []).result;
        const large: Array<Promise<DriverResult>> = [];
        const small: Array<Promise<DriverResult>> = [];
        for (const [i, values] of arrays.entries()) {
          large.push(conn.query(text, [values, i]).result);
          small.push(conn.query("SELECT $1::int AS n", [i]).result);
          await new Promise((resolve) => setTimeout(resolve, 0));
        }
        await sleep;
        const results = await settlesWithin(Promise.all(large), 60_000, "the large statements");
        for (const [i, result] of results.entries()) {
          const expected = arrays[i].join(",");
          if (result.rows[0].i !== i || result.rows[0].v !== expected) {
            assert.fail(`round ${round}, statement ${i}: its answer is not its own array`);
          }
        }
        assert.deepEqual(
          (await Promise.all(small)).map((r) => r.rows[0].n),
          arrays.map((_, i) => i),
        );
      }
    });
  },
);

wireTest(
  "wire: 200,000 pipelined SELECT $1::int on one session, each its own",
  async () => {
    await withConn(async (conn) => {
      // Its time is bench material (it took 23-33 s while the session's queues were arrays
      // whose shift() copies them past ~16,000 items, 1.4 s since); here, its answers.
      const n = 200_000;
      const results: Array<Promise<DriverResult>> = new Array(n);
      for (let i = 0; i < n; i++) results[i] = conn.query("SELECT $1::int AS v", [i]).result;
      const all = await settlesWithin(Promise.all(results), 120_000, `${n} statements`);
      for (let i = 0; i < n; i++) {
        if (all[i].rows.length !== 1 || all[i].rows[0].v !== i) {
          assert.fail(`statement ${i} of ${n}: ${JSON.stringify(all[i])}`);
        }
      }
      assert.deepEqual((await exec(conn, "SELECT 1 AS ok")).rows, [{ ok: 1 }]);
    });
  },
);

// ---------------------------------------------------------------------------------------
// Errors in the middle of the simple protocol, COPY FROM STDIN through query()
// ---------------------------------------------------------------------------------------

wireTest(
  "wire: an error in the middle of a multi-statement query; the session goes on",
  async () => {
    await withConn(async (conn) => {
      const failed = conn.query("SELECT 1 AS a; SELECT 1/0 AS b; SELECT 3 AS c", []).result;
      const next = conn.query("SELECT 4 AS d", []).result;
      const error = await rejection(failed);
      assert.equal(error.sqlstate, "22012");
      assert.deepEqual((await next).rows, [{ d: 4 }]);
      // The third statement never ran: the error ended the implicit transaction.
      const table = uniqueName("wire_multi");
      await exec(conn, `CREATE TEMP TABLE ${table} (n int)`);
      await rejection(
        conn.query(
          `INSERT INTO ${table} VALUES (1); SELECT 1/0; INSERT INTO ${table} VALUES (3)`,
          [],
        ).result,
      );
      assert.deepEqual((await exec(conn, `SELECT count(*)::int AS n FROM ${table}`)).rows, [
        { n: 0 },
      ]);
    });
  },
);

wireTest("wire: COPY FROM STDIN through query() fails clearly; the session goes on", async () => {
  await withConn(async (conn) => {
    const table = uniqueName("wire_copy_query");
    await exec(conn, `CREATE TEMP TABLE ${table} (n int)`);
    const error = await settlesWithin(
      rejection(conn.query(`COPY ${table} FROM STDIN`, []).result),
      5000,
      "COPY FROM STDIN through query()",
    );
    assert.match(error.message, /copyIn\(\)/);
    assert.deepEqual((await exec(conn, "SELECT 2 AS v")).rows, [{ v: 2 }]);
    assert.deepEqual((await exec(conn, `SELECT count(*)::int AS n FROM ${table}`)).rows, [
      { n: 0 },
    ]);
  });
});

wireTest("wire: COPY FROM STDIN through query() with statements pipelined behind it", async () => {
  await withConn(async (conn) => {
    const table = uniqueName("wire_copy_query");
    await exec(conn, `CREATE TEMP TABLE ${table} (n int)`);
    const copy = outcome(conn.query(`COPY ${table} FROM STDIN`, []).result);
    const behind = outcome(conn.query("SELECT 2 AS v", []).result);
    const behindParams = outcome(conn.query("SELECT $1::int AS v", [3]).result);
    const ends = await settlesWithin(
      Promise.all([copy, behind, behindParams]),
      5000,
      "COPY FROM STDIN through query() and the statements behind it",
    );
    assert.ok("sqlstate" in ends[0], `the COPY: ${JSON.stringify(ends[0])}`);
    assert.deepEqual(ends.slice(1), [{ rows: [{ v: 2 }] }, { rows: [{ v: 3 }] }]);
  });
});

wireTest("wire: copyIn() of a COPY behind another statement in the same query copies", async () => {
  await withConn(async (conn) => {
    const table = uniqueName("wire_copy_behind");
    await exec(conn, `CREATE TEMP TABLE ${table} (n int, t text)`);
    // The first statement's CommandComplete comes before the COPY starts: the rows must
    // still go, and the COPY's own count come back.
    async function* rows() {
      for (let i = 0; i < 3; i++) {
        // Slower than the server's answers to the statement ahead of the COPY.
        await new Promise((resolve) => setTimeout(resolve, 100));
        yield `${i}\trow ${i}\n`;
      }
    }
    const copied = await settlesWithin(
      conn.copyIn(`SET LOCAL work_mem = '8MB'; COPY ${table} FROM STDIN`, rows()),
      5000,
      "copyIn() of SET; COPY",
    );
    assert.equal(copied, 3);
    assert.deepEqual((await exec(conn, `SELECT count(*)::int AS n FROM ${table}`)).rows, [
      { n: 3 },
    ]);
  });
});

wireTest("wire: copyOut() of a COPY FROM STDIN rejects instead of hanging", async () => {
  await withConn(async (conn) => {
    const table = uniqueName("wire_copy_out_in");
    await exec(conn, `CREATE TEMP TABLE ${table} (n int)`);
    const reading = (async () => {
      for await (const _ of conn.copyOut(`COPY ${table} FROM STDIN`)) {
        // nothing is expected
      }
    })();
    await rejection(settlesWithin(reading, 5000, "copyOut() of COPY FROM STDIN"));
  });
});

wireTest(
  "wire: a portal stream with a parameter the server cannot take; the session goes on",
  async () => {
    await withConn(async (conn) => {
      const reading = (async () => {
        for await (
          const _ of conn.cursor!("SELECT i FROM generate_series(1, $1::int) i", ["abc"], 10)
        ) {
          assert.fail("no rows expected");
        }
      })();
      const error = await rejection(settlesWithin(reading, 5000, "the stream"));
      assert.equal(error.sqlstate, "22P02");
      const rows: Row[] = [];
      for await (
        const batch of conn.cursor!("SELECT i FROM generate_series(1, $1::int) i", [25], 10)
      ) {
        rows.push(...batch);
      }
      assert.deepEqual(rows, Array.from({ length: 25 }, (_, i) => ({ i: i + 1 })));
      assert.deepEqual((await exec(conn, "SELECT 2 AS v")).rows, [{ v: 2 }]);
    });
  },
);

/** A COPY source whose `next()` answers with promises already resolved. */
function eagerSource(chunks: readonly string[]): AsyncIterable<string> {
  return {
    [Symbol.asyncIterator]() {
      let i = 0;
      return {
        next: () =>
          Promise.resolve(
            i < chunks.length
              ? { value: chunks[i++], done: false as const }
              : { value: undefined, done: true as const },
          ),
      };
    },
  };
}

wireTest(
  "wire: a COPY the server ended sends nothing more: its rows never reach the next COPY",
  async () => {
    await withConn(async (conn) => {
      const a = uniqueName("wire_copy_a");
      const b = uniqueName("wire_copy_b");
      await exec(conn, `CREATE TEMP TABLE ${a} (n int); CREATE TEMP TABLE ${b} (n int)`);
      // A bad row first, then ~25 MB of rows: the server fails the COPY at once while the
      // client is still writing, held back by the socket.
      const block = "1\n".repeat(32 * 1024);
      const first = conn.copyIn(
        `COPY ${a} FROM STDIN`,
        eagerSource(["x\n", ...Array.from({ length: 400 }, () => block)]),
      );
      const second = conn.copyIn(
        `COPY ${b} FROM STDIN`,
        (async function* () {
          for (let i = 0; i < 10; i++) {
            await sleep(5);
            yield "2\n";
          }
        })(),
      );
      const ends = await settlesWithin(
        Promise.all(
          [first, second].map((copy) =>
            copy.then((count) => ({ count }), (error: unknown) => ({
              error: error instanceof QueryError ? error.sqlstate : String(error),
            }))
          ),
        ),
        20_000,
        "the two COPYs",
      );
      assert.deepEqual(ends, [{ error: "22P02" }, { count: 10 }]);
      assert.deepEqual(
        (await exec(conn, `SELECT n, count(*)::int AS c FROM ${b} GROUP BY n ORDER BY n`)).rows,
        [{ n: 2, c: 10 }],
      );
      assert.deepEqual((await exec(conn, `SELECT count(*)::int AS c FROM ${a}`)).rows, [{ c: 0 }]);
    });
  },
);

wireTest(
  "wire: the data written behind a COPY the server refuses is dropped; the next COPY gets its own",
  async () => {
    await withConn(async (conn) => {
      const b = uniqueName("wire_copy_ok");
      await exec(conn, `CREATE TEMP TABLE ${b} (n int)`);
      // The data goes right behind the COPY statement, before the server's answer: a COPY
      // the server refuses (no such table, no such column) must not leak it anywhere.
      for (
        const refused of [`COPY ${uniqueName("missing")} FROM STDIN`, `COPY ${b} (nope) FROM STDIN`]
      ) {
        const error = await conn.copyIn(refused, eagerSource(["7\n", "8\n".repeat(50_000)])).then(
          (count) => assert.fail(`the refused COPY copied ${count} rows`),
          (error: unknown) => error,
        );
        assert.ok(error instanceof QueryError, String(error));
        assert.ok(["42P01", "42703"].includes(error.sqlstate ?? ""), error.sqlstate);
        assert.equal(await conn.copyIn(`COPY ${b} FROM STDIN`, eagerSource(["2\n", "3\n"])), 2);
      }
      assert.deepEqual((await exec(conn, `SELECT n FROM ${b} ORDER BY n`)).rows, [
        { n: 2 },
        { n: 2 },
        { n: 3 },
        { n: 3 },
      ]);
      assert.deepEqual((await exec(conn, "SELECT 1 AS ok")).rows, [{ ok: 1 }]);
    });
  },
);

wireTest(
  "wire: a portal stream never yields an empty batch (exact multiples, no rows)",
  async () => {
    await withConn(async (conn) => {
      const batches = async (sql: string, size: number) => {
        const sizes: number[] = [];
        for await (const rows of conn.cursor!(sql, [], size)) sizes.push(rows.length);
        return sizes;
      };
      assert.deepEqual(await batches("SELECT i FROM generate_series(1, 30) i", 10), [10, 10, 10]);
      assert.deepEqual(await batches("SELECT i FROM generate_series(1, 31) i", 10), [
        10,
        10,
        10,
        1,
      ]);
      assert.deepEqual(await batches("SELECT 1 AS i WHERE false", 10), []);
      assert.deepEqual(await batches("SELECT i FROM generate_series(1, 3) i", 1), [1, 1, 1]);
      assert.deepEqual((await exec(conn, "SELECT 2 AS v")).rows, [{ v: 2 }]);
    });
  },
);

wireTest(
  "wire: query() of COPY TO STDOUT, of an empty string, of a NOTICE; the session goes on",
  async () => {
    await withConn(async (conn) => {
      const copied = await exec(conn, "COPY (SELECT generate_series(1, 3)) TO STDOUT");
      assert.deepEqual(copied, { rows: [], command: "COPY", rowCount: 3 });
      assert.deepEqual(await exec(conn, ""), { rows: [], command: "", rowCount: 0 });
      const noticed = await exec(
        conn,
        "DO $$ BEGIN RAISE NOTICE 'hello %', repeat('n', 10000); END $$; SELECT 5 AS v",
      );
      assert.deepEqual(noticed.rows, [{ v: 5 }]);
      assert.deepEqual((await exec(conn, "SELECT $1::int AS v", [6])).rows, [{ v: 6 }]);
    });
  },
);

wireTest(
  "wire: named statements dropped by DEALLOCATE ALL and DISCARD ALL are prepared again",
  async () => {
    await withConn(async (conn) => {
      const sql = `SELECT $1::int * 2 AS v /* ${uniqueName("m")} */`;
      assert.deepEqual((await exec(conn, sql, [1], true)).rows, [{ v: 2 }]);
      await exec(conn, "DEALLOCATE ALL");
      assert.deepEqual((await exec(conn, sql, [2], true)).rows, [{ v: 4 }]);
      await exec(conn, "DISCARD ALL");
      assert.deepEqual((await exec(conn, sql, [3], true)).rows, [{ v: 6 }]);
    });
  },
);

wireTest(
  "wire: a session the server ends while idle (idle_session_timeout) reports closed",
  async () => {
    await withConn(async (conn) => {
      const counter = closeCounter(conn);
      await exec(conn, "SET idle_session_timeout = 200");
      await until(() => conn.closed, 5000, "the idle session's end");
      await assertGone(conn, counter);
    });
  },
);

wireTest("wire: a statement sent during a COPY in runs after it and sees its rows", async () => {
  await withConn(async (conn) => {
    const table = uniqueName("wire_copy_behind");
    await exec(conn, `CREATE TEMP TABLE ${table} (n int)`);
    const copying = conn.copyIn(
      `COPY ${table} FROM STDIN`,
      (async function* () {
        for (let i = 1; i <= 5; i++) {
          await sleep(20);
          yield `${i}\n`;
        }
      })(),
    );
    await sleep(30);
    const counted = conn.query(`SELECT count(*)::int AS n FROM ${table}`, []).result;
    const countedParams = conn.query(`SELECT count(*)::int AS n FROM ${table} WHERE n > $1`, [
      0,
    ]).result;
    assert.equal(await settlesWithin(copying, 5000, "the COPY"), 5);
    assert.deepEqual((await counted).rows, [{ n: 5 }]);
    assert.deepEqual((await countedParams).rows, [{ n: 5 }]);
  });
});

wireTest(
  "wire: close() while a COPY out's reader stalls settles; the reader then fails",
  async () => {
    await withConn(async (conn) => {
      const counter = closeCounter(conn);
      const copy = conn.copyOut(
        "COPY (SELECT i, repeat('y', 100) FROM generate_series(1, 2000000) i) TO STDOUT",
      );
      const first = await settlesWithin(copy.next(), 5000, "the first chunk");
      assert.equal(first.done, false);
      await settlesWithin(conn.close(), 15_000, "close() during a stalled COPY out");
      assert.equal(conn.closed, true);
      assert.equal(counter.calls, 1);
      let error: unknown;
      try {
        await settlesWithin(
          (async () => {
            while (!(await copy.next()).done) {
              // drain what was buffered
            }
          })(),
          5000,
          "the COPY out after close()",
        );
      } catch (caught) {
        error = caught;
      }
      assertLost(error, "the COPY out after close()");
    });
  },
);

// ---------------------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------------------

wireTest("wire: startup settings with non-ASCII values", async () => {
  const schema = `schéma ✓ ${uniqueName("s")}`;
  const settings = {
    search_path: `"${schema}", public`,
    "pgdbm.note": "é ✓ 𝄞 \"quoted\" 'single'",
    application_name: "pgdbm wire é",
  };
  await withConn(async (conn) => {
    const { rows } = await exec(
      conn,
      "SELECT current_setting('search_path') AS path, current_setting('pgdbm.note') AS note",
    );
    assert.deepEqual(rows, [{ path: settings.search_path, note: settings["pgdbm.note"] }]);
  }, driverFor(settings));
});

wireTest("wire: a database whose name needs quoting", async () => {
  const database = `pgdbm wire "é" ${uniqueName("db")}`;
  const quoted = `"${database.replaceAll('"', '""')}"`;
  await withConn(async (admin) => {
    await exec(admin, `CREATE DATABASE ${quoted}`);
    try {
      const url = new URL(TEST_URL);
      url.pathname = `/${encodeURIComponent(database)}`;
      await withConn(async (conn) => {
        assert.deepEqual((await exec(conn, "SELECT current_database() AS db")).rows, [
          { db: database },
        ]);
      }, driverFor({}, url.href));
    } finally {
      await exec(admin, `DROP DATABASE IF EXISTS ${quoted} WITH (FORCE)`);
    }
  });
});

wireTest(
  "wire: a session knows PostgreSQL's own array types from the start and learns the others",
  async () => {
    const domain = uniqueName("wire_json_domain");
    await withConn(async (setup) => {
      // The list a session starts with is the server's own: every built-in type below 10000
      // whose array type is below 10000 too.
      const { rows: [server] } = await exec(
        setup,
        `SELECT string_agg(oid::text || ' ' || typarray::text, ',' ORDER BY oid) AS pairs
           FROM pg_catalog.pg_type WHERE oid < 10000 AND typarray <> 0 AND typarray < 10000`,
      );
      assert.equal(
        BUILTIN_ARRAY_TYPES.map(([element, array]) => `${element} ${array}`).join(","),
        server.pairs,
      );
      await exec(setup, `CREATE DOMAIN ${domain} AS jsonb`);
      try {
        // Types from 10000 on, made before the session opened or by initdb, read as arrays
        // once a result has shown them: a domain's elements as its base type.
        await withConn(async (conn) => {
          for (const prepare of [false, true]) {
            assert.deepEqual(
              (await exec(
                conn,
                `SELECT $1::int[] AS ints, $2::${domain}[] AS docs, ` +
                  "ARRAY[7, NULL]::information_schema.cardinal_number[] AS cardinals, " +
                  "ARRAY(SELECT d.datname FROM pg_catalog.pg_database d " +
                  "WHERE d.datname = 'template1') AS names",
                [[1, null], [{ a: 1 }, null]],
                prepare,
              )).rows,
              [{
                ints: [1, null],
                docs: [{ a: 1 }, null],
                cardinals: [7, null],
                names: ["template1"],
              }],
              `prepare ${prepare}`,
            );
          }
        });
      } finally {
        await exec(setup, `DROP DOMAIN ${domain}`);
      }
    });
  },
);

wireTest(
  "wire: arrays of composite types made before the session opened read and bind as arrays",
  async () => {
    // A session's setup looks up the array types of every type but composite ones (tables'
    // row types: a database of many tenants has thousands): those are learned when a result
    // first shows one, and read as a session that knew them would.
    const table = uniqueName("wire_row_type");
    const pair = uniqueName("wire_pair");
    await withConn(async (setup) => {
      await exec(
        setup,
        `CREATE TABLE ${table} (id int, name text); ` +
          `INSERT INTO ${table} VALUES (1, 'a'), (2, 'b c'); ` +
          `CREATE TYPE ${pair} AS (a int, b text)`,
      );
      try {
        await withConn(async (conn) => {
          for (const prepare of [false, true, true]) {
            const { rows } = await exec(
              conn,
              `SELECT array_agg(r ORDER BY id) AS rows, ARRAY[ROW(1, 'x')::${pair}] AS pairs, ` +
                `$1::${table}[]::text AS bound FROM ${table} r`,
              [["(3,d)", null]],
              prepare,
            );
            assert.deepEqual(rows, [{
              rows: ["(1,a)", '(2,"b c")'],
              pairs: ["(1,x)"],
              bound: '{"(3,d)",NULL}',
            }], `prepare ${prepare}`);
          }
        });
      } finally {
        await exec(setup, `DROP TABLE ${table}; DROP TYPE ${pair}`);
      }
    });
  },
);
