import assert from "node:assert/strict";
import postgres from "postgres";
import { ConfigurationError, createSharedPool, DatabaseManager, QueryError } from "../../mod.ts";
import {
  DatabaseDebugger,
  explain,
  type PlanNode,
  type QueryEvent,
  QueryMonitor,
} from "../../src/monitoring/mod.ts";
import { observe, serverTest, TEST_URL, withManager } from "../_support/server.ts";

function event(durationMs: number, extra: Partial<QueryEvent> = {}): QueryEvent {
  return {
    sql: `SELECT ${durationMs}`,
    params: [],
    durationMs,
    rowCount: 1,
    schema: null,
    node: "primary",
    ...extra,
  };
}

/** Polls `probe` until it returns something, for up to 10 seconds. */
async function eventually<T>(what: string, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const found = await probe();
    if (found !== undefined) return found;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`Timed out waiting for ${what}`);
}

function planNodes(node: PlanNode): PlanNode[] {
  return [node, ...(node.Plans ?? []).flatMap(planNodes)];
}

function rawClient(): postgres.Sql {
  return postgres(TEST_URL, { max: 1, onnotice: () => {} });
}

// --- QueryMonitor, without a server ---

Deno.test("QueryMonitor.getQueryHistory() returns the newest first and keeps historySize", () => {
  const monitor = new QueryMonitor({ historySize: 3 });
  for (const ms of [1, 2, 3, 4, 5]) monitor.onQuery(event(ms));
  assert.deepEqual(monitor.getQueryHistory().map((r) => r.durationMs), [5, 4, 3]);
  assert.deepEqual(monitor.getQueryHistory(2).map((r) => r.durationMs), [5, 4]);
  assert.deepEqual(monitor.getQueryHistory(0), []);
  const [newest] = monitor.getQueryHistory(1);
  assert.equal(newest.sql, "SELECT 5");
  assert.ok(Math.abs(newest.timestamp - Date.now()) < 5_000);
});

Deno.test("QueryMonitor.getSlowQueries() keeps only statements at or over the threshold", () => {
  const monitor = new QueryMonitor({ slowQueryMs: 100, historySize: 2, slowHistorySize: 2 });
  for (const ms of [150, 5, 99.9, 100, 7, 300, 1]) monitor.onQuery(event(ms));
  assert.deepEqual(monitor.getSlowQueries().map((r) => r.durationMs), [300, 100]);
  assert.deepEqual(monitor.getQueryHistory().map((r) => r.durationMs), [1, 300]);
  assert.equal(monitor.slowQueryMs, 100);
});

Deno.test("QueryMonitor.getSummary() counts errors and reports percentiles over the history", () => {
  const monitor = new QueryMonitor({ slowQueryMs: 90 });
  assert.deepEqual(monitor.getSummary(), {
    count: 0,
    errors: 0,
    slow: 0,
    totalMs: 0,
    avgMs: 0,
    p50Ms: 0,
    p99Ms: 0,
    maxMs: 0,
  });
  for (let ms = 100; ms >= 1; ms--) {
    monitor.onQuery(event(ms, ms % 10 === 0 ? { error: new Error("boom"), rowCount: 0 } : {}));
  }
  const summary = monitor.getSummary();
  assert.equal(summary.count, 100);
  assert.equal(summary.errors, 10);
  assert.equal(summary.slow, 11);
  assert.equal(summary.totalMs, 5050);
  assert.equal(summary.avgMs, 50.5);
  assert.equal(summary.p50Ms, 50);
  assert.equal(summary.p99Ms, 99);
  assert.equal(summary.maxMs, 100);
});

Deno.test("QueryMonitor.clear() forgets the history and the slow log", () => {
  const monitor = new QueryMonitor({ slowQueryMs: 0 });
  monitor.onQuery(event(3));
  monitor.clear();
  assert.deepEqual(monitor.getQueryHistory(), []);
  assert.deepEqual(monitor.getSlowQueries(), []);
  monitor.onQuery(event(4));
  assert.deepEqual(monitor.getQueryHistory().map((r) => r.durationMs), [4]);
});

Deno.test("QueryMonitor.onQuery is bound and calls the chained hook with the same event", () => {
  const seen: QueryEvent[] = [];
  const monitor = new QueryMonitor({ onQuery: (e) => seen.push(e) });
  const { onQuery } = monitor;
  const e = event(12);
  onQuery(e);
  assert.equal(seen.length, 1);
  assert.equal(seen[0], e);
  assert.equal(monitor.getQueryHistory().length, 1);
});

Deno.test("QueryMonitor rejects invalid options with ConfigurationError naming the field", () => {
  const bad: [Record<string, unknown>, string][] = [
    [{ slowQueryMs: -1 }, "slowQueryMs"],
    [{ slowQueryMs: Number.NaN }, "slowQueryMs"],
    [{ historySize: 0 }, "historySize"],
    [{ historySize: 2.5 }, "historySize"],
    [{ slowHistorySize: -3 }, "slowHistorySize"],
    [{ onQuery: "log" }, "onQuery"],
  ];
  for (const [options, field] of bad) {
    assert.throws(
      () => new QueryMonitor(options as never),
      (error) => error instanceof ConfigurationError && error.field === field,
      JSON.stringify(options),
    );
  }
  const monitor = new QueryMonitor();
  assert.throws(() => monitor.getQueryHistory(-1), RangeError);
  assert.throws(() => monitor.getSlowQueries(Number.NaN), RangeError);
});

// --- QueryMonitor on a real pool ---

serverTest("QueryMonitor records every statement of a pool with masked parameters", async () => {
  const secret = `pw-${crypto.randomUUID()}`;
  const chained: QueryEvent[] = [];
  const monitor = new QueryMonitor({ slowQueryMs: 150, onQuery: (e) => chained.push(e) });
  await withManager(async (db) => {
    await db.execute(
      "CREATE TABLE {{tables.users}} (id int PRIMARY KEY, email text, password_hash text, " +
        "profile jsonb)",
    );
    await db.execute(
      "INSERT INTO {{tables.users}} (id, email, password_hash, profile) VALUES ($1, $2, $3, $4)",
      [1, "ann@example.com", secret, { name: "Ann", api_token: secret }],
    );
    await db.execute("UPDATE {{tables.users}} SET password_hash = $1 WHERE id = $2", [secret, 1]);
    const found = await db.fetchValue(
      "SELECT id FROM {{tables.users}} WHERE email = $1 AND password_hash = $2",
      ["ann@example.com", secret],
    );
    assert.equal(found, 1, "the hook does not change what runs");
    await db.transaction(async (tx) => {
      await tx.execute("UPDATE {{tables.users}} SET password_hash = $1", [secret]);
    });
    await assert.rejects(
      db.execute("INSERT INTO {{tables.users}} (id, password_hash) VALUES ($1, $2)", [
        "not-a-number",
        secret,
      ]),
      QueryError,
    );
    await db.fetchValue("SELECT pg_sleep(0.2)");

    const history = monitor.getQueryHistory();
    assert.ok(!JSON.stringify(history).includes(secret), "no secret in the history");
    assert.ok(!JSON.stringify(chained).includes(secret), "no secret in the events");
    for (const record of history) {
      assert.ok(!record.sql.includes("{{"), `templates expanded: ${record.sql}`);
      assert.equal(record.schema, db.schema);
      assert.equal(record.node, "primary");
      assert.ok(record.durationMs >= 0);
      assert.ok(!String(record.error?.message).includes(secret));
    }
    assert.equal(chained.length, history.length);

    const insert = history.find((r) => r.sql.startsWith("INSERT") && r.error === undefined)!;
    assert.ok(insert.sql.includes(`"${db.schema}"`), insert.sql);
    assert.deepEqual(insert.params, [1, "ann@example.com", "<hidden>", {
      name: "Ann",
      api_token: "<hidden>",
    }]);
    assert.equal(insert.rowCount, 1);

    const select = history.find((r) => r.sql.startsWith("SELECT id"))!;
    assert.deepEqual(select.params, ["ann@example.com", "<hidden>"]);
    assert.equal(select.rowCount, 1);

    const failed = history.filter((r) => r.error !== undefined);
    assert.equal(failed.length, 1);
    assert.ok(failed[0].error instanceof QueryError);
    assert.equal(failed[0].rowCount, 0);
    assert.deepEqual(failed[0].params, ["not-a-number", "<hidden>"]);

    // The slow ones are exactly those of the history at or over 150 ms: the pg_sleep(0.2),
    // and on a loaded machine maybe a statement that waited for the CPU.
    const slow = monitor.getSlowQueries();
    const overThreshold = history.filter((r) => r.durationMs >= 150);
    assert.deepEqual(slow, overThreshold);
    const sleep = slow.find((r) => r.sql === "SELECT pg_sleep(0.2)");
    assert.ok(sleep !== undefined, JSON.stringify(slow));
    assert.ok(sleep.durationMs >= 150);

    const summary = monitor.getSummary();
    assert.equal(summary.count, history.length);
    assert.equal(summary.errors, 1);
    assert.equal(summary.slow, overThreshold.length);
    assert.ok(summary.p99Ms >= 150);
  }, { onQuery: monitor.onQuery });
});

// --- explain() ---

async function withItems(fn: (db: DatabaseManager) => Promise<void>): Promise<void> {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY, name text)");
    await db.execute(
      "INSERT INTO {{tables.items}} SELECT g, 'item ' || g FROM generate_series(1, 100) g",
    );
    await fn(db);
  });
}

function countItems(db: DatabaseManager): Promise<number | null> {
  return db.fetchValue<number>("SELECT count(*)::int FROM {{tables.items}}");
}

serverTest("explain() returns the estimated plan without running the statement", async () => {
  await withItems(async (db) => {
    const plan = await explain(db, "DELETE FROM {{tables.items}} WHERE id <= $1;", [50]);
    assert.equal(plan.Plan["Node Type"], "ModifyTable");
    assert.equal(typeof plan.Plan["Total Cost"], "number");
    assert.equal(plan["Execution Time"], undefined);
    assert.equal(plan.Plan["Actual Rows"], undefined);
    assert.ok(planNodes(plan.Plan).some((node) => node["Relation Name"] === "items"));
    assert.equal(await countItems(db), 100);
  });
});

serverTest(
  "explain() with analyze and buffers reports actual rows, times and buffers",
  async () => {
    await withItems(async (db) => {
      const plan = await explain(
        db,
        "SELECT count(*) FROM {{tables.items}} WHERE name LIKE $1",
        ["item 1%"],
        { analyze: true, buffers: true },
      );
      assert.equal(plan.Plan["Node Type"], "Aggregate");
      assert.equal(plan.Plan["Actual Rows"], 1);
      assert.equal(typeof plan["Execution Time"], "number");
      assert.ok(planNodes(plan.Plan).some((node) => "Shared Hit Blocks" in node));
    });
  },
);

serverTest("explain() with analyze of DELETE, UPDATE and INSERT changes nothing", async () => {
  await withItems(async (db) => {
    const deleted = await explain(db, "DELETE FROM {{tables.items}} WHERE id <= $1", [50], {
      analyze: true,
    });
    const scan = planNodes(deleted.Plan).find((node) =>
      node["Relation Name"] === "items" && node["Node Type"] !== "ModifyTable"
    );
    assert.equal(scan?.["Actual Rows"], 50, "the DELETE really ran");
    await explain(db, "UPDATE {{tables.items}} SET name = 'changed'", [], { analyze: true });
    await explain(db, "INSERT INTO {{tables.items}} VALUES (1000, 'new')", [], { analyze: true });
    assert.equal(await countItems(db), 100);
    assert.equal(
      await db.fetchValue("SELECT count(*)::int FROM {{tables.items}} WHERE name = 'changed'"),
      0,
    );
  });
});

serverTest(
  "explain() with analyze in a transaction rolls back only the explained statement",
  async () => {
    await withItems(async (db) => {
      await db.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} VALUES (101, 'kept')");
        await explain(tx, "DELETE FROM {{tables.items}}", [], { analyze: true });
        assert.equal(await tx.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 101);
      });
      assert.equal(await countItems(db), 101);
    });
  },
);

serverTest(
  "explain() rejects several statements with TypeError and runs none of them",
  async () => {
    await withItems(async (db) => {
      await assert.rejects(
        explain(db, "SELECT 1; DROP TABLE {{tables.items}}"),
        (error) => error instanceof TypeError && /exactly one statement; got 2/.test(error.message),
      );
      await assert.rejects(explain(db, "  -- nothing\n"), TypeError);
      await assert.rejects(
        explain(db, "SELECT missing FROM {{tables.items}}", [], { analyze: true }),
        QueryError,
      );
      assert.equal(await countItems(db), 100);
    });
  },
);

// --- DatabaseDebugger ---

serverTest(
  "DatabaseDebugger.findBlockingQueries() names the waiting and the holding pid",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.accounts}} (id int PRIMARY KEY, balance int)");
      await db.execute("INSERT INTO {{tables.accounts}} VALUES (1, 100)");
      const table = db.prepareQuery("{{tables.accounts}}");
      const debug = new DatabaseDebugger(db);
      assert.deepEqual(
        (await debug.findBlockingQueries()).filter((b) => b.blockedQuery.includes(table)),
        [],
      );
      const holder = rawClient();
      const waiter = rawClient();
      let waiting: Promise<unknown> | undefined;
      try {
        const [{ pid: holderPid }] = await holder.unsafe("SELECT pg_backend_pid() AS pid");
        const [{ pid: waiterPid }] = await waiter.unsafe("SELECT pg_backend_pid() AS pid");
        await holder.unsafe("BEGIN");
        await holder.unsafe(`UPDATE ${table} SET balance = balance - 1 WHERE id = 1`);
        waiting = waiter.unsafe(`UPDATE ${table} SET balance = balance + 1 WHERE id = 1`).then(
          () => {},
        );

        const wait = await eventually("the lock wait", async () => {
          const waits = await debug.findBlockingQueries();
          // The lock manager can name the holder a moment before the activity view shows
          // the waiter's wait event: that sample is not yet the wait.
          return waits.find((w) => w.blockedPid === waiterPid && w.waitEvent !== null);
        });
        assert.equal(wait.blockingPid, holderPid);
        assert.match(wait.blockedQuery, /balance \+ 1/);
        assert.match(wait.blockingQuery, /balance - 1/);
        assert.equal(wait.blockingState, "idle in transaction");
        assert.match(wait.waitEvent ?? "", /^Lock:/);
        assert.ok(wait.blockedDurationMs >= 0);
        assert.ok((wait.blockingTransactionMs ?? -1) >= wait.blockedDurationMs);
        assert.equal(typeof wait.blockedUser, "string");
      } finally {
        await holder.unsafe("ROLLBACK").catch(() => {});
        await waiting?.catch(() => {});
        await holder.end({ timeout: 1 });
        await waiter.end({ timeout: 1 });
      }
      assert.equal(await db.fetchValue("SELECT balance FROM {{tables.accounts}}"), 101);
    });
  },
);

serverTest(
  "DatabaseDebugger.findLongRunningQueries() finds a sleeping query on another connection",
  async () => {
    await withManager(async (db) => {
      const debug = new DatabaseDebugger(db);
      const sleeper = rawClient();
      let pid: number | undefined;
      let sleeping: Promise<unknown> | undefined;
      try {
        [{ pid }] = await sleeper.unsafe("SELECT pg_backend_pid() AS pid");
        sleeping = sleeper.unsafe("SELECT pg_sleep(30) AS long_one").then(() => {}, () => {});
        const found = await eventually("the sleeping query", async () => {
          const queries = await debug.findLongRunningQueries(0.2);
          return queries.find((q) => q.pid === pid);
        });
        assert.match(found.query, /pg_sleep\(30\)/);
        assert.equal(found.state, "active");
        assert.equal(found.waitEvent, "Timeout:PgSleep");
        assert.ok(found.durationMs >= 200);
        assert.ok(found.startedAt instanceof Date);
        assert.ok(Date.now() - found.startedAt.getTime() >= 150);

        const all = await debug.findLongRunningQueries(0);
        assert.ok(all.some((q) => q.pid === pid));
        assert.ok(!all.some((q) => q.query.includes("make_interval")), "its own query excluded");
        const hours = await debug.findLongRunningQueries(3600);
        assert.ok(!hours.some((q) => q.pid === pid));
        await assert.rejects(debug.findLongRunningQueries(-1), RangeError);
        await assert.rejects(debug.findLongRunningQueries(Number.NaN), RangeError);
      } finally {
        if (pid !== undefined) await observe((sql) => sql`SELECT pg_cancel_backend(${pid!})`);
        await sleeping;
        await sleeper.end({ timeout: 1 });
      }
    });
  },
);

serverTest(
  "DatabaseDebugger.analyzeTableSizes() lists the schema's tables, largest first",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.small}} (id int)");
      await db.execute("CREATE TABLE {{tables.big}} (id int PRIMARY KEY, body text)");
      await db.execute(
        "INSERT INTO {{tables.big}} SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g",
      );
      await db.execute("ANALYZE {{tables.big}}");
      await db.execute(
        "CREATE MATERIALIZED VIEW {{tables.big_ids}} AS SELECT id FROM {{tables.big}}",
      );

      const sizes = await new DatabaseDebugger(db).analyzeTableSizes();
      assert.deepEqual(sizes.map((s) => s.table), ["big", "big_ids", "small"]);
      const [big, view, small] = sizes;
      assert.equal(big.kind, "table");
      assert.equal(view.kind, "materialized view");
      assert.equal(big.rowsEstimate, 5000);
      assert.equal(small.rowsEstimate, null);
      assert.ok(big.tableBytes > 500_000, String(big.tableBytes));
      assert.ok(big.indexBytes > 0);
      assert.equal(big.totalBytes, big.tableBytes + big.indexBytes);
      assert.equal(small.totalBytes, 0);
      assert.match(big.totalSize, /^\d+ (kB|MB)$/);
      assert.equal(small.totalSize, "0 bytes");
    });
  },
);

serverTest("DatabaseDebugger.checkConnectionHealth() reports the server and the pool", async () => {
  await withManager(async (db) => {
    const health = await new DatabaseDebugger(db).checkConnectionHealth();
    const expected = await observe(async (sql) => {
      const [row] = await sql`SELECT current_setting('server_version') AS v,
        current_setting('max_connections')::int AS max, current_database() AS db`;
      return row;
    });
    assert.equal(health.healthy, true);
    assert.equal(health.error, undefined);
    assert.ok(health.latencyMs >= 0);
    assert.equal(health.serverVersion, expected.v);
    assert.equal(health.database, expected.db);
    assert.equal(health.maxConnections, expected.max);
    assert.equal(health.inRecovery, false);
    assert.ok(health.connectionsUsed! >= 1 && health.connectionsUsed! <= health.maxConnections!);
    assert.equal(health.pool.status, "connected");
    assert.equal(health.pool.schema, db.schema);
  });
});

serverTest(
  "DatabaseDebugger.checkConnectionHealth() reports a closed pool as unhealthy",
  async () => {
    const pool = await createSharedPool({ connectionString: TEST_URL });
    const db = new DatabaseManager({ pool });
    await pool.close();
    const health = await new DatabaseDebugger(db).checkConnectionHealth();
    assert.equal(health.healthy, false);
    assert.match(health.error ?? "", /closed/i);
    assert.equal(health.serverVersion, null);
    assert.equal(health.pool.status, "closed");
  },
);
