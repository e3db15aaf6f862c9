/**
 * `stream()`: rows from a server-side cursor in batches, on one connection, freed when the
 * loop ends however it ends.
 */
import assert from "node:assert/strict";
import type { DatabaseManager, Pool } from "../mod.ts";
import { serverTest, withManager } from "./_support/server.ts";

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
