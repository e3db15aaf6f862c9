/**
 * Getting a test database with 20 migrations, against the server in `PGDBM_TEST_URL`:
 * `createTestDatabase()` cloning its migrated template (`CREATE DATABASE … TEMPLATE`)
 * against creating a fresh database and migrating it each time (`template: false`, the
 * baseline), in the same run, with an empty database as the floor. Target: the clone at
 * least 3× faster. A clone cannot be cheaper than `CREATE DATABASE` itself (a copy of
 * `template1`, bound by the disk's fsync), so the ratio depends on how much the migrations
 * cost relative to that copy on the machine.
 *
 * Only getting the database is timed; dropping it is not. Every database is named
 * `pgdbm_bench_…` and dropped, the template too.
 *
 * Run: `deno bench -A bench/testing_bench.ts`.
 */

import {
  cleanupTestDatabases,
  createTestDatabase,
  type TestDatabaseOptions,
} from "../src/testing/mod.ts";

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
