/**
 * Streaming 1,000,000 rows with `stream()` against `fetchAll()` of the same query: rows/s of
 * each (ratio in the same run, alternating, median of the runs) and how much the process's
 * memory (RSS and V8 heap) grows above where it started while the stream runs.
 *
 *   deno run -A --v8-flags=--expose-gc bench/stream_bench.ts [runs=3] [batchSize=default]
 */
import { createSharedPool, DatabaseManager } from "../mod.ts";

const url = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const ROWS = 1_000_000;
const SQL =
  `SELECT g AS id, 'name ' || g AS name, g * 0.5 AS score FROM generate_series(1, ${ROWS}) g`;
const MB = 1024 * 1024;

interface Run {
  rowsPerSecond: number;
  rssGrowthMb: number;
  heapGrowthMb: number;
}

async function measure(fn: (sample: () => void) => Promise<number>): Promise<Run> {
  (globalThis as { gc?: () => void }).gc?.();
  const start = Deno.memoryUsage();
  let rss = start.rss;
  let heap = start.heapUsed;
  const sample = () => {
    const now = Deno.memoryUsage();
    rss = Math.max(rss, now.rss);
    heap = Math.max(heap, now.heapUsed);
  };
  const timer = setInterval(sample, 20);
  const t0 = performance.now();
  const rows = await fn(sample);
  const seconds = (performance.now() - t0) / 1000;
  clearInterval(timer);
  sample();
  if (rows !== ROWS) throw new Error(`expected ${ROWS} rows, got ${rows}`);
  return {
    rowsPerSecond: rows / seconds,
    rssGrowthMb: (rss - start.rss) / MB,
    heapGrowthMb: (heap - start.heapUsed) / MB,
  };
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[values.length >> 1];

async function main(): Promise<void> {
  const runs = Number(Deno.args[0] ?? 3);
  const batchSize = Deno.args[1] === undefined ? undefined : Number(Deno.args[1]);
  const pool = await createSharedPool({ connectionString: url, maxConnections: 2 });
  const db = new DatabaseManager({ pool });
  const streamed: Run[] = [];
  const fetched: Run[] = [];
  try {
    // Warm-up: the connection, compiled code and the driver's buffers are not growth.
    for await (const _ of db.stream(SQL.replace(String(ROWS), "10000"), [], { batchSize })) {
      /* rows */
    }
    for (let i = 0; i < runs; i++) {
      streamed.push(
        await measure(async (sample) => {
          let n = 0;
          for await (const _ of db.stream(SQL, [], { batchSize })) {
            if (++n % 100_000 === 0) sample();
          }
          return n;
        }),
      );
      fetched.push(await measure(async () => (await db.fetchAll(SQL)).length));
    }
  } finally {
    await pool.close();
  }
  const s = median(streamed.map((r) => r.rowsPerSecond));
  const f = median(fetched.map((r) => r.rowsPerSecond));
  const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
  console.log(
    `stream(), batchSize ${batchSize ?? "default"}: ${fmt(s)} rows/s; fetchAll(): ${fmt(f)} rows/s`,
  );
  console.log(`stream / fetchAll: ${(s / f).toFixed(2)}x (median of ${runs} alternating runs)`);
  // RSS seldom shrinks, so only the first stream (before any fetchAll) shows its growth.
  console.log(
    `memory growth while streaming: RSS ${streamed[0].rssGrowthMb.toFixed(1)} MB (first run), ` +
      `heap max ${Math.max(...streamed.map((r) => r.heapGrowthMb)).toFixed(1)} MB; ` +
      `fetchAll: RSS ${fetched[0].rssGrowthMb.toFixed(1)} MB (first run), heap ${
        median(fetched.map((r) => r.heapGrowthMb)).toFixed(1)
      } MB`,
  );
}

if (import.meta.main) await main();
