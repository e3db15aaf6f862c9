/**
 * `stream()`: rows from a server-side cursor in batches, on one connection, freed when the
 * loop ends however it ends.
 */
import assert from "node:assert/strict";
import { createSharedPool, DatabaseManager, type Pool, QueryError } from "../mod.ts";
import { fileURLToPath } from "node:url";
import { serverTest, TEST_URL, withManager } from "./_support/server.ts";

async function seed(db: DatabaseManager, n: number): Promise<void> {
  await db.execute("CREATE TABLE {{tables.numbers}} (n int PRIMARY KEY)");
  await db.execute("INSERT INTO {{tables.numbers}} SELECT g FROM generate_series(1, $1::int) g", [
    n,
  ]);
}

function idle(pool: Pool): void {
  const stats = pool.getStats();
  assert.equal(stats.used, 0, `a connection is still in use: ${JSON.stringify(stats)}`);
}

serverTest(
  "stream() yields every row in order, batch by batch, and frees its connection",
  async () => {
    await withManager(async (db, pool) => {
      await seed(db, 2500);
      const seen: number[] = [];
      for await (
        const row of db.stream<{ n: number }>(
          "SELECT n FROM {{tables.numbers}} WHERE n > $1 ORDER BY n",
          [0],
          { batchSize: 1000 },
        )
      ) {
        seen.push(row.n);
        if (row.n === 1500) {
          assert.equal(pool.getStats().used, 1, "the stream holds one connection");
        }
      }
      assert.deepEqual(
        seen,
        Array.from({ length: 2500 }, (_, i) => i + 1),
      );
      idle(pool);
      const tagged: number[] = [];
      for await (
        const row of db.stream<
          { n: number }
        >`SELECT n FROM {{tables.numbers}} WHERE n <= ${3} ORDER BY n`
      ) {
        tagged.push(row.n);
      }
      assert.deepEqual(tagged, [1, 2, 3]);
    }, { minConnections: 1, maxConnections: 2 });
  },
);

serverTest(
  "stream() left early by break or throw closes the cursor and ends its transaction",
  async () => {
    await withManager(async (db, pool) => {
      await seed(db, 100);
      for await (
        const row of db.stream<{ n: number }>("SELECT n FROM {{tables.numbers}} ORDER BY n", [], {
          batchSize: 10,
        })
      ) {
        if (row.n === 15) break;
      }
      idle(pool);
      const boom = new Error("consumer failed");
      await assert.rejects(async () => {
        for await (
          const _ of db.stream("SELECT n FROM {{tables.numbers}}", [], { batchSize: 10 })
        ) {
          throw boom;
        }
      }, (error) => error === boom);
      idle(pool);
      // The connection went back clean: no transaction left open, no cursor left declared.
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
      await db.transaction(async (tx) => {
        assert.equal(await tx.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
      });
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest(
  "stream() with an aborted signal ends with the reason and frees the connection",
  async () => {
    await withManager(async (db, pool) => {
      await seed(db, 50);
      const controller = new AbortController();
      const reason = new Error("client went away");
      const seen: number[] = [];
      await assert.rejects(async () => {
        for await (
          const row of db.stream<{ n: number }>("SELECT n FROM {{tables.numbers}} ORDER BY n", [], {
            batchSize: 5,
            signal: controller.signal,
          })
        ) {
          seen.push(row.n);
          if (row.n === 7) controller.abort(reason);
        }
      }, (error) => error === reason);
      assert.ok(seen.length < 50, "the stream stopped");
      idle(pool);
      assert.equal(await db.fetchValue<number>("SELECT count(*)::int FROM {{tables.numbers}}"), 50);
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest("tx.stream() and conn.stream() run the cursor on their own connection", async () => {
  await withManager(async (db, pool) => {
    await seed(db, 30);
    await db.transaction(async (tx) => {
      await tx.execute("INSERT INTO {{tables.numbers}} VALUES (31)");
      const outer: number[] = [];
      for await (
        const a of tx.stream<{ n: number }>(
          "SELECT n FROM {{tables.numbers}} WHERE n > 28 ORDER BY n",
          [],
          { batchSize: 2 },
        )
      ) {
        // A second cursor while the first is open, in the same transaction.
        let inner = 0;
        for await (const _ of tx.stream("SELECT n FROM {{tables.numbers}}", [], { batchSize: 7 })) {
          inner++;
        }
        assert.equal(inner, 31, "the transaction's own insert is visible to its cursors");
        outer.push(a.n);
      }
      assert.deepEqual(outer, [29, 30, 31]);
    });
    await db.acquire(async (conn) => {
      let count = 0;
      for await (const _ of conn.stream("SELECT n FROM {{tables.numbers}}", [], { batchSize: 4 })) {
        count++;
      }
      assert.equal(count, 31);
      assert.equal(await conn.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
    });
    idle(pool);
  }, { minConnections: 1, maxConnections: 2 });
});

serverTest("stream() refuses a batchSize that is not a positive integer", async () => {
  await withManager(async (db, pool) => {
    for (const batchSize of [0, -1, 1.5, Number.NaN]) {
      await assert.rejects(async () => {
        for await (const _ of db.stream("SELECT 1", [], { batchSize })) { /* nothing */ }
      }, RangeError);
    }
    idle(pool);
  });
});

/** Streams a 1,000,000-row query on the server and leaves after 10 rows. */
serverTest(
  "break after 10 rows of a 1,000,000-row stream frees the connection and leaves no cursor on it",
  async () => {
    await withManager(async (db, pool) => {
      let seen = 0;
      for await (const _ of db.stream("SELECT g FROM generate_series(1, 1000000) g")) {
        if (++seen === 10) break;
      }
      idle(pool);
      // maxConnections 1: the same connection the stream used.
      await db.acquire(async (conn) => {
        assert.equal(await conn.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
        assert.equal(
          await conn.fetchValue("SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid()"),
          "active",
          "the session runs only this statement: not 'idle in transaction' before it",
        );
        assert.equal(await conn.fetchValue("SELECT now() = statement_timestamp()"), true);
      });
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest(
  "an error in the middle of a stream is thrown from the iterator after the rows before it",
  async () => {
    await withManager(async (db, pool) => {
      const seen: number[] = [];
      await assert.rejects(
        async () => {
          for await (
            const row of db.stream<{ n: number }>(
              "SELECT g AS n, 1 / (g - 2500) AS boom FROM generate_series(1, 5000) g",
              [],
              { batchSize: 1000 },
            )
          ) seen.push(row.n);
        },
        (error) => error instanceof QueryError && error.sqlstate === "22012",
      );
      assert.deepEqual(seen.length, 2000, "the two batches before the failing one");
      idle(pool);
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest("an aborted stream closes its cursor on the connection it used", async () => {
  await withManager(async (db, pool) => {
    const controller = new AbortController();
    await assert.rejects(async () => {
      for await (
        const _ of db.stream("SELECT g FROM generate_series(1, 100000) g", [], {
          batchSize: 100,
          signal: controller.signal,
        })
      ) controller.abort(new Error("enough"));
    }, /enough/);
    idle(pool);
    assert.equal(await db.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
  }, { minConnections: 1, maxConnections: 1 });
});

serverTest(
  "streams stopped at any point (break, abort while the server works, error) leave the next statements alone",
  async () => {
    // One connection: a cancel request that outlived its stream, or a portal or transaction
    // left open, would fail or hold the statements that follow on it. 45 rounds, stopping at
    // varied points; the aborts come from a timer, mostly while the server is busy making a
    // batch (pg_sleep every 500 rows), so they are sent to the server as cancel requests.
    await withManager(async (db, pool) => {
      const sql = "SELECT g, CASE WHEN g % 500 = 0 THEN pg_sleep(0.005)::text END AS slow " +
        "FROM generate_series(1, 5000) g";
      for (let round = 0; round < 45; round++) {
        const stopAt = 1 + (round * 397) % 4000;
        const how = round % 3;
        const controller = new AbortController();
        const timer = how === 1
          ? setTimeout(() => controller.abort(new Error("stop")), 1 + round % 7)
          : undefined;
        let seen = 0;
        try {
          for await (
            const _ of db.stream(sql, [], { batchSize: 250, signal: controller.signal })
          ) {
            if (++seen < stopAt || how === 1) continue;
            if (how === 0) break;
            throw new Error("the caller's own error");
          }
          assert.ok(how === 0 || (how === 1 && seen === 5000), `round ${round}: ${seen} rows`);
        } catch (error) {
          const expected = how === 1 ? /stop/ : /the caller's own error/;
          assert.match(String(error), expected, `round ${round}`);
        } finally {
          clearTimeout(timer);
        }
        idle(pool);
        assert.equal(await db.fetchValue<number>("SELECT $1::int", [round]), round);
        // Outside any transaction, a statement's transaction starts with it.
        assert.equal(await db.fetchValue("SELECT now() = statement_timestamp()"), true);
      }
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest(
  "streams of many texts leave no prepared statement behind on the connection",
  async () => {
    await withManager(async (db) => {
      const prepared = () =>
        db.fetchValue<number>("SELECT count(*)::int FROM pg_prepared_statements");
      const before = await prepared();
      for (let i = 1; i <= 5; i++) {
        let n = 0;
        for await (const _ of db.stream(`SELECT g FROM generate_series(1, ${i}) g`)) n++;
        assert.equal(n, i);
        for await (const _ of db.stream("SELECT g FROM generate_series(1, $1::int) g", [i])) n++;
        assert.equal(n, 2 * i);
      }
      assert.equal(await prepared(), before);
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest("a stream dropped half-way frees its connection once it is garbage", async () => {
  const script = fileURLToPath(new URL("./fixtures/abandoned_stream.ts", import.meta.url));
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", script, TEST_URL],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  assert.equal(code, 0, decoder.decode(stderr));
  const lines = decoder.decode(stdout).trim().split("\n");
  assert.deepEqual(JSON.parse(lines.at(-1)!), { freed: true, used: 0, afterwards: 42 });
});

serverTest("a stream in a transaction runs on the transaction's connection", async () => {
  await withManager(async (db) => {
    await db.transaction(async (tx) => {
      const pid = await tx.fetchValue<number>("SELECT pg_backend_pid()");
      for await (
        const row of tx.stream<{ pid: number }>(
          "SELECT pg_backend_pid() AS pid FROM generate_series(1, 3)",
        )
      ) assert.equal(row.pid, pid);
      const cursors = await tx.fetchValue("SELECT count(*)::int FROM pg_cursors");
      assert.equal(cursors, 0, "the cursor is closed once the loop ended");
    });
  }, { minConnections: 2, maxConnections: 2 });
});

Deno.test(
  "on PGlite: break after 10 rows of a 20,000-row stream (1,000,000 take minutes in WASM) frees the connection, no cursor left",
  async () => {
    const pool = await createSharedPool({ connectionString: "pglite:memory" });
    try {
      const db = new DatabaseManager({ pool });
      let seen = 0;
      for await (const _ of db.stream("SELECT g FROM generate_series(1, 20000) g")) {
        if (++seen === 10) break;
      }
      idle(pool);
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
      await assert.rejects(
        async () => {
          for await (
            const _ of db.stream("SELECT 1 / (g - 50) FROM generate_series(1, 100) g", [], {
              batchSize: 10,
            })
          ) { /* rows */ }
        },
        (error) => error instanceof QueryError && error.sqlstate === "22012",
      );
      idle(pool);
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM pg_cursors"), 0);
    } finally {
      await pool.close();
    }
  },
);
