/**
 * Getting a test database, on both engines.
 *
 * **Server** (`PGDBM_TEST_URL`), with 20 migrations: `createTestDatabase()` cloning its
 * migrated template (`CREATE DATABASE … TEMPLATE`) against creating a fresh database and
 * migrating it each time (`template: false`, the baseline), in the same run, with an empty
 * database as the floor. Target: the clone at least 3× faster. A clone cannot be cheaper
 * than `CREATE DATABASE` itself (a copy of `template1`, bound by the disk's fsync), so the
 * ratio depends on how much the migrations cost relative to that copy on the machine.
 *
 * **Embedded** (PGlite), with the notes example's migrations: a schema on the process's one
 * shared engine against a PGlite engine of the test's own (what every embedded test paid
 * before the engine was shared), in the same run. Printed first, before the timed benches:
 * ten test databases in a row on the shared engine, each used and dropped as a test does,
 * with the time each took to be ready and the process's RSS after the first and the tenth.
 * Targets: the second and later ready in under 300 ms each, RSS after the tenth at most
 * 1.2× that after the first.
 *
 * Only getting the database is timed; dropping it is not. Every server database is named
 * `pgdbm_bench_…` and dropped, the template too.
 *
 * Run: `deno bench -A bench/testing_bench.ts`.
 */

import {
  cleanupTestDatabases,
  createTestDatabase,
  loadFixtures,
  type TestDatabaseOptions,
} from "../src/testing/mod.ts";

const NOTES = {
  moduleName: "notes",
  migrationsPath: new URL("../examples/notes_migrations/", import.meta.url),
  schema: "notes",
};
const EMBEDDED_RUNS = 10;

/** Ten test databases in a row on the shared engine: ready times and RSS, printed. */
async function embeddedFigures(): Promise<void> {
  const readyMs: number[] = [];
  const rssMb: number[] = [];
  for (let i = 0; i < EMBEDDED_RUNS; i++) {
    const started = performance.now();
    const test = await createTestDatabase({ embedded: true, migrations: NOTES });
    readyMs.push(performance.now() - started);
    await loadFixtures(test.db, {
      authors: [{ id: 1, name: "ann" }],
      notes: Array.from({ length: 200 }, (_, id) => ({ id, author_id: 1, body: `note ${id}` })),
    });
    await test.drop();
    rssMb.push(Deno.memoryUsage().rss / 1e6);
  }
  const later = readyMs.slice(1);
  console.log(
    `embedded, ${EMBEDDED_RUNS} test databases in a row on one engine: first ready in ` +
      `${readyMs[0].toFixed(0)} ms (engine start included), later ones ` +
      `${Math.min(...later).toFixed(0)}–${Math.max(...later).toFixed(0)} ms ` +
      `(median ${median(later).toFixed(0)} ms); RSS after the first ${rssMb[0].toFixed(0)} MB, ` +
      `after the tenth ${rssMb[EMBEDDED_RUNS - 1].toFixed(0)} MB ` +
      `(${(rssMb[EMBEDDED_RUNS - 1] / rssMb[0]).toFixed(2)}×)`,
  );
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

await embeddedFigures();

Deno.bench({
  name: "a PGlite engine of the test's own + migrations (before: every embedded test)",
  group: "embedded test database",
  baseline: true,
  n: 2,
  warmup: 0,
  async fn(b): Promise<void> {
    b.start();
    const test = await createTestDatabase({ embedded: true, migrations: NOTES, config: {} });
    b.end();
    await test.drop();
  },
});

Deno.bench({
  name: "a schema on the process's shared engine + migrations",
  group: "embedded test database",
  n: EMBEDDED_RUNS,
  warmup: 1,
  async fn(b): Promise<void> {
    b.start();
    const test = await createTestDatabase({ embedded: true, migrations: NOTES });
    b.end();
    await test.drop();
  },
});

const URL_ = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const PREFIX = `pgdbm_bench_${crypto.randomUUID().replaceAll("-", "").slice(0, 6)}`;
const RUNS = 8;
// Deno calls a bench function RUNS + 2 times (calibration and warmup included).
const CALLS = RUNS + 2;
let cloneCalls = 0;

function migrations(count: number): Record<string, string> {
  const files: Record<string, string> = {};
  for (let i = 1; i <= count; i++) {
    const n = String(i).padStart(3, "0");
    files[`${n}_table_${n}.sql`] = `
      CREATE TABLE {{tables.t${n}}} (
        id bigserial PRIMARY KEY,
        name text NOT NULL,
        data jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now()${
      i > 1
        ? `,\n        parent_id bigint REFERENCES {{tables.t${
          String(i - 1).padStart(3, "0")
        }}} (id)`
        : ""
    }
      );
      CREATE INDEX t${n}_name_idx ON {{tables.t${n}}} (name);
      COMMENT ON TABLE {{tables.t${n}}} IS 'bench table ${n}';`;
  }
  return files;
}

const options: TestDatabaseOptions = {
  url: URL_,
  prefix: PREFIX,
  migrations: { moduleName: "bench", migrations: migrations(20), schema: "app" },
};

async function timed(b: Deno.BenchContext, template: boolean): Promise<void> {
  b.start();
  const test = await createTestDatabase({ ...options, template });
  b.end();
  await test.drop();
}

async function dropTemplate(): Promise<void> {
  await cleanupTestDatabases({ url: URL_, prefix: PREFIX, olderThanMs: 0, templates: true });
}

// Build the template once, before timing, as a test suite's first call would.
await (await createTestDatabase(options)).drop();

Deno.bench({
  name: "fresh database + 20 migrations",
  group: "test database",
  baseline: true,
  n: RUNS,
  warmup: 1,
  async fn(b): Promise<void> {
    await timed(b, false);
  },
});

Deno.bench({
  name: "empty database, no migrations (the floor: CREATE DATABASE)",
  group: "test database",
  n: RUNS,
  warmup: 1,
  async fn(b): Promise<void> {
    b.start();
    const test = await createTestDatabase({ url: URL_, prefix: PREFIX });
    b.end();
    await test.drop();
  },
});

Deno.bench({
  name: "clone of the migrated template",
  group: "test database",
  n: RUNS,
  warmup: 1,
  async fn(b): Promise<void> {
    await timed(b, true);
    if (++cloneCalls === CALLS) await dropTemplate();
  },
});
