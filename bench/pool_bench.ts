/**
 * Pool throughput: one iteration is 1,000 concurrent `fetchValue("SELECT $1::int", [i])`.
 * Baselines measured in the same run: raw postgres.js with 1 connection (it pipelines)
 * and with 10 connections. Also the same with a `QueryMonitor` on the `onQuery` hook, to
 * measure what monitoring costs.
 *
 *   deno bench -A bench/pool_bench.ts
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager } from "../mod.ts";
import { QueryMonitor } from "../src/monitoring/mod.ts";

const url = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const BATCH = 1000;

const raw1 = postgres(url, { max: 1, onnotice: () => {} });
const raw10 = postgres(url, { max: 10, onnotice: () => {} });
const pool = await createSharedPool({ connectionString: url, maxConnections: 10 });
const db = new DatabaseManager({ pool, schema: "bench" });
const monitor = new QueryMonitor({ slowQueryMs: 100 });
const monitoredPool = await createSharedPool({
  connectionString: url,
  maxConnections: 10,
  onQuery: monitor.onQuery,
});
const monitored = new DatabaseManager({ pool: monitoredPool, schema: "bench" });

function check(value: unknown): void {
  if (value !== BATCH - 1) throw new Error(`Wrong result: ${value}`);
}

async function raw(sql: postgres.Sql): Promise<void> {
  const pending = [];
  for (let i = 0; i < BATCH; i++) {
    pending.push(sql.unsafe("SELECT $1::int AS v", [i], { prepare: true }));
  }
  const results = await Promise.all(pending);
  check(results[BATCH - 1][0].v);
}

Deno.bench({
  group: "pool",
  name: "postgres.js, 1 connection",
  baseline: true,
  async fn() {
    await raw(raw1);
  },
});

Deno.bench({
  group: "pool",
  name: "postgres.js, 10 connections",
  async fn() {
    await raw(raw10);
  },
});

Deno.bench({
  group: "pool",
  name: "DatabaseManager.fetchValue",
  async fn() {
    const pending = [];
    for (let i = 0; i < BATCH; i++) pending.push(db.fetchValue("SELECT $1::int", [i]));
    const results = await Promise.all(pending);
    check(results[BATCH - 1]);
  },
});

Deno.bench({
  group: "pool",
  name: "DatabaseManager.fetchValue, onQuery → QueryMonitor",
  async fn() {
    const pending = [];
    for (let i = 0; i < BATCH; i++) pending.push(monitored.fetchValue("SELECT $1::int", [i]));
    const results = await Promise.all(pending);
    check(results[BATCH - 1]);
  },
});

globalThis.addEventListener("unload", () => {
  raw1.end();
  raw10.end();
  pool.close();
  monitoredPool.close();
});
