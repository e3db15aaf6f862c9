/**
 * Shared helpers of the benchmarks: the server URL, a throwaway database per run, timing,
 * medians, and the interleaved runner that prints pgdbm's ratio to the best peer
 * (> 1 means pgdbm is faster). Every workload reports milliseconds for a fixed amount of
 * work, so lower is better and ratios are `best peer ms / pgdbm ms`.
 *
 * @module
 */

import postgres from "postgres";

/** The server the benchmarks run against. */
export const BENCH_URL = Deno.env.get("PGDBM_TEST_URL") ??
  "postgres://postgres@127.0.0.1:5432/test";

/** The median of `values` (the mean of the two middle ones for an even count). */
export function median(values: readonly number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Runs `fn` once and returns how long it took, in milliseconds. */
export async function timed(fn: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await fn();
  return performance.now() - start;
}

/** Runs `count` callers at once, each looping `fn(caller, i)` `perCaller` times. */
export async function callers(
  count: number,
  perCaller: number,
  fn: (caller: number, i: number) => Promise<unknown>,
): Promise<void> {
  await Promise.all(Array.from({ length: count }, async (_, caller) => {
    for (let i = 0; i < perCaller; i++) await fn(caller, i);
  }));
}

/** A database made for one benchmark run: its URL, and `drop()` to remove it. */
export interface BenchDatabase {
  /** Connection string of the new database. */
  url: string;
  /** Its name. */
  name: string;
  /** Drops it (closing whatever is still connected to it). */
  drop(): Promise<void>;
}

/** Creates a uniquely named database `pgdbm_bench_…` on the bench server. */
export async function createBenchDatabase(): Promise<BenchDatabase> {
  const name = `pgdbm_bench_${crypto.randomUUID().replaceAll("-", "").slice(0, 10)}`;
  const admin = postgres(BENCH_URL, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`CREATE DATABASE "${name}"`);
  } finally {
    await admin.end();
  }
  const url = new URL(BENCH_URL);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    name,
    async drop() {
      const sql = postgres(BENCH_URL, { max: 1, onnotice: () => {} });
      try {
        await sql.unsafe(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
      } finally {
        await sql.end();
      }
    },
  };
}

/** One way of running a workload: returns the milliseconds its fixed work took. */
export type Candidate = () => Promise<number>;

/** A workload of the comparison table, run by pgdbm and by each peer. */
export interface Workload {
  /** The row name, as in the README table. */
  name: string;
  /** pgdbm's run. */
  pgdbm: Candidate;
  /** The peers' runs, by name; a peer that is not installed is left out. */
  peers: Record<string, Candidate>;
  /** Why the comparison is not like for like, printed beside the ratio. */
  note?: string;
  /** Runs once before the rounds (warms caches, prepares statements). */
  warmup?: boolean;
}

/** The medians of one workload. */
export interface WorkloadResult {
  /** The workload's name. */
  name: string;
  /** pgdbm's median in milliseconds. */
  pgdbm: number;
  /** Each peer's median in milliseconds. */
  peers: Record<string, number>;
  /** The fastest peer's name, or undefined without peers. */
  best?: string;
  /** Best peer ms / pgdbm ms: > 1 means pgdbm is faster. */
  ratio?: number;
  /** The workload's note. */
  note?: string;
}

/**
 * Runs every workload `rounds` times, interleaved (round 1 of every workload and
 * candidate, then round 2, …, with the candidates' order rotated each round so none always
 * runs first), and returns the medians. `settle` runs, untimed, before every timed run: the
 * table's runner passes a CHECKPOINT, so no candidate is timed while the server writes out
 * what the one before it (or the setup) wrote.
 */
export async function interleaved(
  workloads: readonly Workload[],
  rounds = 3,
  log: (line: string) => void = console.log,
  settle: () => Promise<unknown> = () => Promise.resolve(),
): Promise<WorkloadResult[]> {
  const samples = workloads.map((w) => ({
    pgdbm: [] as number[],
    peers: Object.fromEntries(Object.keys(w.peers).map((p) => [p, [] as number[]])),
  }));
  for (const w of workloads) {
    if (w.warmup !== true) continue;
    await w.pgdbm();
    for (const peer of Object.values(w.peers)) await peer();
  }
  for (let round = 0; round < rounds; round++) {
    for (const [index, w] of workloads.entries()) {
      const order: [string, Candidate][] = [["pgdbm", w.pgdbm], ...Object.entries(w.peers)];
      for (let i = 0; i < order.length; i++) {
        const [name, run] = order[(i + round) % order.length];
        await settle();
        const ms = await run();
        if (name === "pgdbm") samples[index].pgdbm.push(ms);
        else samples[index].peers[name].push(ms);
      }
      log(`round ${round + 1}/${rounds}: ${w.name}`);
    }
  }
  return workloads.map((w, index) => {
    const peers = Object.fromEntries(
      Object.entries(samples[index].peers).map(([name, values]) => [name, median(values)]),
    );
    const result: WorkloadResult = { name: w.name, pgdbm: median(samples[index].pgdbm), peers };
    const best = Object.entries(peers).sort((a, b) => a[1] - b[1])[0];
    if (best !== undefined) {
      result.best = best[0];
      result.ratio = best[1] / result.pgdbm;
    }
    if (w.note !== undefined) result.note = w.note;
    return result;
  });
}

/** Formats results as a text table: medians per candidate and pgdbm / best peer. */
export function formatResults(results: readonly WorkloadResult[]): string {
  const lines = results.map((r) => {
    const peers = Object.entries(r.peers)
      .map(([name, ms]) => `${name} ${ms.toFixed(1)}`)
      .join(", ");
    const ratio = r.ratio === undefined ? "   –" : r.ratio.toFixed(2);
    return `${r.name.padEnd(44)} ${ratio.padStart(5)} × ${(r.best ?? "").padEnd(24)} ` +
      `pgdbm ${r.pgdbm.toFixed(1)} ms; ${peers}${r.note === undefined ? "" : ` (${r.note})`}`;
  });
  return [
    `${"workload".padEnd(44)} pgdbm / best peer (> 1: pgdbm faster), medians in ms`,
    ...lines,
  ].join("\n");
}

/** Formats results as the README's Markdown table. */
export function markdownTable(results: readonly WorkloadResult[]): string {
  const rows = results.map((r) => {
    const ratio = r.ratio === undefined ? "–" : r.ratio.toFixed(2);
    const note = r.note === undefined ? "" : ` (${r.note})`;
    return `| ${r.name} | ${ratio}${note} | ${r.best ?? "–"} |`;
  });
  return ["| workload | pgdbm / best peer | best peer |", "|---|---|---|", ...rows].join("\n");
}
