/**
 * COPY out of a 1,000,000-row table: `copyFromTable()` against raw postgres.js's COPY stream
 * (`readable()`), rows/s of each, alternating in the same run, median of the runs.
 *
 *   deno run -A bench/copy_out_bench.ts [runs=3]
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager } from "../mod.ts";

const url = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const ROWS = 1_000_000;

const median = (values: number[]) => [...values].sort((a, b) => a - b)[values.length >> 1];

async function timed(fn: () => Promise<number>): Promise<number> {
  const t0 = performance.now();
  const bytes = await fn();
  if (bytes === 0) throw new Error("nothing was copied");
  return ROWS / ((performance.now() - t0) / 1000);
}

async function main(): Promise<void> {
  const runs = Number(Deno.args[0] ?? 3);
  const schema = `copy_out_bench_${Date.now().toString(36)}`;
  const pool = await createSharedPool({ connectionString: url, maxConnections: 2 });
  const db = new DatabaseManager({ pool, schema });
  const raws: number[] = [];
  const ours: number[] = [];
  try {
    await db.ensureSchema();
    await db.execute("CREATE TABLE {{tables.rows}} (id int, email text, score numeric)");
    await db.execute(
      "INSERT INTO {{tables.rows}} SELECT g, 'user' || g || '@example.com', g / 7.0 " +
        "FROM generate_series(1, $1::int) g",
      [ROWS],
    );
    for (let i = 0; i < runs; i++) {
      raws.push(
        await timed(async () => {
          // A fresh connection each run: postgres.js can leave a session's socket paused
          // after a COPY out, which hangs that session's next statement.
          const sql = postgres(url, { max: 1, onnotice: () => {} });
          try {
            let bytes = 0;
            const stream = await sql.unsafe(`COPY "${schema}".rows TO STDOUT`).readable();
            for await (const chunk of stream) bytes += chunk.length;
            return bytes;
          } finally {
            await sql.end({ timeout: 1 });
          }
        }),
      );
      ours.push(
        await timed(async () => {
          let bytes = 0;
          for await (const chunk of db.copyFromTable("rows")) bytes += chunk.length;
          return bytes;
        }),
      );
    }
    await db.execute(`DROP SCHEMA "${schema}" CASCADE`);
  } finally {
    await pool.close();
  }
  const raw = median(raws);
  const mine = median(ours);
  const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
  console.log(
    `raw postgres.js COPY stream: ${fmt(raw)} rows/s; copyFromTable(): ${fmt(mine)} rows/s`,
  );
  console.log(
    `copyFromTable / raw: ${(mine / raw).toFixed(2)}x (median of ${runs} alternating runs)`,
  );
}

if (import.meta.main) await main();
