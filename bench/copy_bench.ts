/**
 * Bulk loading 200,000 rows: `copyRecordsToTable` (COPY FROM STDIN) against
 * `executeMany` (one pipelined batch of INSERTs) and against the raw driver's COPY
 * (postgres.js writable stream fed with the same rows, encoded by a plain join).
 *
 *   deno bench -A bench/copy_bench.ts
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager } from "../mod.ts";

const url = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const ROWS = 200_000;
const schema = `copy_bench_${Date.now().toString(36)}`;

const records: [number, string, string][] = Array.from(
  { length: ROWS },
  (_, i) => [i, `user${i}@example.com`, `Name ${i}`],
);

const raw = postgres(url, { max: 1, onnotice: () => {} });
const pool = await createSharedPool({ connectionString: url });
const db = new DatabaseManager({ pool, schema });
await db.ensureSchema();
await db.execute("CREATE TABLE {{tables.people}} (id int, email text, name text)");

async function truncate(): Promise<void> {
  await db.execute("TRUNCATE {{tables.people}}");
}

Deno.bench({
  group: "copy",
  name: "postgres.js COPY (raw)",
  baseline: true,
  n: 5,
  warmup: 1,
  async fn(b) {
    await truncate();
    b.start();
    const stream = await raw.unsafe(`COPY "${schema}".people FROM STDIN`).writable();
    const finished = new Promise((resolve, reject) => {
      stream.once("finish", resolve);
      stream.once("error", reject);
    });
    let chunk = "";
    for (const [id, email, name] of records) {
      chunk += `${id}\t${email}\t${name}\n`;
      if (chunk.length > 65536) {
        if (!stream.write(chunk)) await new Promise((r) => stream.once("drain", r));
        chunk = "";
      }
    }
    stream.end(chunk);
    await finished;
    b.end();
  },
});

Deno.bench({
  group: "copy",
  name: "copyRecordsToTable",
  n: 5,
  warmup: 1,
  async fn(b) {
    await truncate();
    b.start();
    const copied = await db.copyRecordsToTable("people", records);
    b.end();
    if (copied !== ROWS) throw new Error(`Copied ${copied} rows, expected ${ROWS}`);
  },
});

Deno.bench({
  group: "copy",
  name: "executeMany (pipelined INSERTs)",
  n: 2,
  warmup: 0,
  async fn(b) {
    await truncate();
    b.start();
    await db.executeMany("INSERT INTO {{tables.people}} VALUES ($1, $2, $3)", records);
    b.end();
  },
});

globalThis.addEventListener("unload", () => {
  raw.end();
  db.dropSchema({ cascade: true }).finally(() => pool.close());
});
