/**
 * Streaming 1,000,000 rows with `stream()` against `fetchAll()` of the same query: rows/s of
 * each (ratio in the same run, alternating, median of the runs), then how much the process's
 * memory (RSS and V8 heap) grows above where it started while one stream runs.
 *
 * Memory is measured in a fresh process per candidate (RSS seldom shrinks, so a second
 * candidate in the same process would start from the first one's pages): pgdbm's `stream()`
 * and, as the peer, raw postgres.js's own `cursor()`, each with V8's default young
 * generation and with `--max-semi-space-size=8` (the engine flag that bounds it).
 *
 *   deno run -A bench/stream_bench.ts [runs=3] [batchSize=default]
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager } from "../mod.ts";
import { BENCH_URL, median } from "./_support.ts";

const ROWS = 1_000_000;
const SQL =
  `SELECT g AS id, 'name ' || g AS name, g * 0.5 AS score FROM generate_series(1, ${ROWS}) g`;
const WARM_UP_SQL = SQL.replace(String(ROWS), "10000");
const MB = 1024 * 1024;
const CURSOR_BATCH = 5000;
const MEMORY_FLAG = "--memory=";

type MemoryCandidate = "stream" | "cursor";

interface Growth {
  rssMb: number;
  heapMb: number;
}

/** Runs `fn` while sampling memory; returns rows/s and the growth above the start. */
async function measure(
  fn: (sample: () => void) => Promise<number>,
): Promise<Growth & { rowsPerSecond: number }> {
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
    rssMb: (rss - start.rss) / MB,
    heapMb: (heap - start.heapUsed) / MB,
  };
}

/** One candidate's growth while streaming once, after a warm-up of 10,000 rows. */
async function memoryOf(
  candidate: MemoryCandidate,
  batchSize: number | undefined,
): Promise<Growth> {
  if (candidate === "cursor") {
    const sql = postgres(BENCH_URL, { max: 1, onnotice: () => {} });
    try {
      for await (const _ of sql.unsafe(WARM_UP_SQL).cursor(CURSOR_BATCH)) { /* rows */ }
      return await measure(async (sample) => {
        let n = 0;
        for await (const rows of sql.unsafe(SQL).cursor(batchSize ?? CURSOR_BATCH)) {
          for (const _ of rows) if (++n % 100_000 === 0) sample();
        }
        return n;
      });
    } finally {
      await sql.end();
    }
  }
  const pool = await createSharedPool({ connectionString: BENCH_URL, maxConnections: 2 });
  const db = new DatabaseManager({ pool });
  try {
    for await (const _ of db.stream(WARM_UP_SQL, [], { batchSize })) { /* rows */ }
    return await measure(async (sample) => {
      let n = 0;
      for await (const _ of db.stream(SQL, [], { batchSize })) if (++n % 100_000 === 0) sample();
      return n;
    });
  } finally {
    await pool.close();
  }
}

/** Measures one candidate's growth in a fresh process with the given V8 flags. */
async function memoryInChild(
  candidate: MemoryCandidate,
  v8Flags: string,
  batchSize: number | undefined,
): Promise<Growth> {
  const args = ["run", "-A", `--v8-flags=--expose-gc${v8Flags}`, import.meta.filename!];
  args.push(`${MEMORY_FLAG}${candidate}`, ...(batchSize === undefined ? [] : [`${batchSize}`]));
  const output = await new Deno.Command(Deno.execPath(), { args, stderr: "inherit" }).output();
  if (!output.success) throw new Error(`the ${candidate} memory run failed`);
  return JSON.parse(new TextDecoder().decode(output.stdout).trim().split("\n").at(-1)!);
}

async function speed(runs: number, batchSize: number | undefined): Promise<void> {
  const pool = await createSharedPool({ connectionString: BENCH_URL, maxConnections: 2 });
  const db = new DatabaseManager({ pool });
  const streamed: number[] = [];
  const fetched: number[] = [];
  try {
    for await (const _ of db.stream(WARM_UP_SQL, [], { batchSize })) { /* rows */ }
    for (let i = 0; i < runs; i++) {
      const stream = await measure(async () => {
        let n = 0;
        for await (const _ of db.stream(SQL, [], { batchSize })) n++;
        return n;
      });
      streamed.push(stream.rowsPerSecond);
      const all = await measure(async () => (await db.fetchAll(SQL)).length);
      fetched.push(all.rowsPerSecond);
    }
  } finally {
    await pool.close();
  }
  const s = median(streamed);
  const f = median(fetched);
  const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
  console.log(
    `stream(), batchSize ${batchSize ?? "default"}: ${fmt(s)} rows/s; fetchAll(): ${fmt(f)} rows/s`,
  );
  console.log(`stream / fetchAll: ${(s / f).toFixed(2)}x (median of ${runs} alternating runs)`);
}

async function main(): Promise<void> {
  const memory = Deno.args.find((a) => a.startsWith(MEMORY_FLAG));
  const numbers = Deno.args.filter((a) => /^\d+$/.test(a)).map(Number);
  if (memory !== undefined) {
    const candidate = memory.slice(MEMORY_FLAG.length) as MemoryCandidate;
    console.log(JSON.stringify(await memoryOf(candidate, numbers[0])));
    return;
  }
  const runs = numbers[0] ?? 3;
  const batchSize = numbers[1];
  await speed(runs, batchSize);
  console.log("memory growth while streaming 1,000,000 rows (a fresh process each):");
  for (
    const [label, flags] of [["V8 defaults", ""], [
      "--max-semi-space-size=8",
      ",--max-semi-space-size=8",
    ]]
  ) {
    const stream = await memoryInChild("stream", flags, batchSize);
    const cursor = await memoryInChild("cursor", flags, batchSize);
    console.log(
      `  ${label}: stream() RSS +${stream.rssMb.toFixed(1)} MB, heap +${
        stream.heapMb.toFixed(1)
      } MB;` +
        ` postgres.js cursor() RSS +${cursor.rssMb.toFixed(1)} MB, heap +${
          cursor.heapMb.toFixed(1)
        } MB`,
    );
  }
}

if (import.meta.main) await main();
