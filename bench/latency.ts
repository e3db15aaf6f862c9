/**
 * Head-of-line blocking: latency of fast queries while 200 ms queries run beside them.
 * 64 callers loop on `SELECT $1::int` while 2 callers loop on `SELECT pg_sleep(0.2)`,
 * for each client; prints p50 / p99 / max of the fast queries and their throughput.
 *
 *   deno run -A bench/latency.ts
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager } from "../mod.ts";

const url = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const SECONDS = Number(Deno.env.get("LATENCY_SECONDS") ?? 3);
const FAST_CALLERS = 64;
const SLOW_CALLERS = 2;

type Run = (sql: string, params: unknown[]) => Promise<unknown>;

async function measure(name: string, run: Run): Promise<void> {
  for (let i = 0; i < 5; i++) await run("SELECT pg_sleep(0.2)", []);
  const latencies: number[] = [];
  const end = performance.now() + SECONDS * 1000;
  const fast = async () => {
    let i = 0;
    while (performance.now() < end) {
      const start = performance.now();
      await run("SELECT $1::int", [i++]);
      latencies.push(performance.now() - start);
    }
  };
  const slow = async () => {
    while (performance.now() < end) await run("SELECT pg_sleep(0.2)", []);
  };
  await Promise.all([
    ...Array.from({ length: FAST_CALLERS }, fast),
    ...Array.from({ length: SLOW_CALLERS }, slow),
  ]);
  latencies.sort((a, b) => a - b);
  const at = (q: number) =>
    latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
  console.log(
    `${name.padEnd(28)} fast queries/s ${(latencies.length / SECONDS).toFixed(0).padStart(7)}  ` +
      `p50 ${at(0.5).toFixed(2)} ms  p99 ${at(0.99).toFixed(2)} ms  max ${at(1).toFixed(1)} ms`,
  );
}

const raw10 = postgres(url, { max: 10, onnotice: () => {} });
const raw1 = postgres(url, { max: 1, onnotice: () => {} });
const pool = await createSharedPool({ connectionString: url, maxConnections: 10 });
const db = new DatabaseManager({ pool });
try {
  await measure(
    "postgres.js, 10 connections",
    (q, p) => raw10.unsafe(q, p as never[], { prepare: true }),
  );
  await measure(
    "postgres.js, 1 connection",
    (q, p) => raw1.unsafe(q, p as never[], { prepare: true }),
  );
  await measure("DatabaseManager", (q, p) => db.fetchValue(q, p));
} finally {
  await raw10.end();
  await raw1.end();
  await pool.close();
}
