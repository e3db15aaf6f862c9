/**
 * Notify-to-handler latency on loopback: one notification in flight at a time, timed from
 * the `notify()` call to the handler's call; median and p99 for pgdbm's `listen()` /
 * `notify()` and, in the same run, raw postgres.js `sql.listen()` / `sql.notify()`. The two
 * run in alternating rounds so that load on the machine hits both alike.
 *
 *   deno run -A bench/notify_bench.ts [notifications per round, default 500]
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager } from "../mod.ts";

const url = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const PER_ROUND = Number(Deno.args[0] ?? 500);
const ROUNDS = 6;
const CHANNEL = `notify_bench_${crypto.randomUUID().slice(0, 8)}`;

/** Waits for the next payload delivered to a handler. */
class NextPayload {
  #resolve?: () => void;

  readonly handler = (): void => this.#resolve?.();

  arrival(): Promise<void> {
    return new Promise((resolve) => this.#resolve = resolve);
  }
}

/** Sends `PER_ROUND` notifications one after another; pushes each latency in ms. */
async function round(
  next: NextPayload,
  notify: (payload: string) => Promise<unknown>,
  latencies: number[],
): Promise<void> {
  for (let i = 0; i < PER_ROUND; i++) {
    const arrived = next.arrival();
    const start = performance.now();
    await notify(String(i));
    await arrived;
    latencies.push(performance.now() - start);
  }
}

function summary(latencies: number[]): string {
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return `median ${at(0.5).toFixed(3)} ms  p99 ${at(0.99).toFixed(3)} ms  (${sorted.length})`;
}

const raw = postgres(url, { max: 2, onnotice: () => {} });
const pool = await createSharedPool({ connectionString: url, maxConnections: 4 });
const db = new DatabaseManager({ pool });
try {
  const rawNext = new NextPayload();
  const dbNext = new NextPayload();
  await raw.listen(CHANNEL + "_raw", rawNext.handler);
  const sub = await db.listen(CHANNEL, dbNext.handler);
  const rawLatencies: number[] = [];
  const dbLatencies: number[] = [];
  // One warm-up round each, not counted.
  await round(rawNext, (p) => raw.notify(CHANNEL + "_raw", p), []);
  await round(dbNext, (p) => db.notify(CHANNEL, p), []);
  for (let r = 0; r < ROUNDS; r++) {
    await round(rawNext, (p) => raw.notify(CHANNEL + "_raw", p), rawLatencies);
    await round(dbNext, (p) => db.notify(CHANNEL, p), dbLatencies);
  }
  console.log(`postgres.js sql.listen/notify  ${summary(rawLatencies)}`);
  console.log(`pgdbm listen()/notify()        ${summary(dbLatencies)}`);
  await sub.unlisten();
} finally {
  await pool.close();
  await raw.end({ timeout: 1 });
}
