/**
 * Migrations over tenant fleets, against the server in `PGDBM_TEST_URL`:
 *
 * - 200 tenant schemas × 5 migrations: `migrateSchemas()` against a sequential loop of
 *   `Migrator.applyPending()` (the baseline), in the same run. Target: the fleet at least
 *   2× faster.
 * - The up-to-date check of 1,000 migrated schemas (what every deploy runs): the fleet
 *   runner and `checkSchemas()` against a sequential loop. Target: under 5 s.
 *
 * Run: `deno bench -A bench/migrate_bench.ts`. Every schema it creates is named
 * `pgdbm_bench_…` and dropped afterwards.
 */

import { fileURLToPath } from "node:url";
import { DatabaseManager } from "../src/manager.ts";
import { Migrator } from "../src/migrate/migrator.ts";
import { checkSchemas, migrateSchemas } from "../src/migrate/fleet.ts";
import { createSharedPool, type Pool } from "../src/pool/pool.ts";

const URL_ = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const FLEET = fileURLToPath(new URL("../tests/fixtures/migrations/fleet/", import.meta.url));
const MODULE = "tenant";
const MAX_CONNECTIONS = 10;
const FLEET_SIZE = 200;
const CHECK_SIZE = 1000;
const RUNS = 2;
// Deno calls a bench function RUNS + 2 times (calibration and warmup included).
const CALLS = RUNS + 2;

function names(prefix: string, count: number): string[] {
  const run = crypto.randomUUID().replaceAll("-", "").slice(0, 8);
  return Array.from({ length: count }, (_, i) => `pgdbm_bench_${prefix}_${run}_${i}`);
}

async function dropSchemas(pool: Pool, schemas: string[]): Promise<void> {
  const db = new DatabaseManager({ pool });
  await Promise.all(schemas.map((s) => db.execute(`DROP SCHEMA IF EXISTS "${s}" CASCADE`)));
}

async function openPool(): Promise<Pool> {
  return await createSharedPool({ connectionString: URL_, maxConnections: MAX_CONNECTIONS });
}

// ------------------------------------------------------------ 200 schemas × 5 migrations

Deno.bench({
  group: "200 schemas × 5 migrations",
  name: "sequential Migrator.applyPending() loop",
  baseline: true,
  n: RUNS,
  warmup: 0,
  async fn(b) {
    const pool = await openPool();
    const schemas = names("loop", FLEET_SIZE);
    try {
      const db = new DatabaseManager({ pool });
      b.start();
      for (const schema of schemas) {
        await new Migrator(db.withSchema(schema), { migrationsPath: FLEET, moduleName: MODULE })
          .applyPending();
      }
      b.end();
    } finally {
      await dropSchemas(pool, schemas);
      await pool.close();
    }
  },
});

Deno.bench({
  group: "200 schemas × 5 migrations",
  name: "migrateSchemas() fleet runner",
  n: RUNS,
  warmup: 0,
  async fn(b) {
    const pool = await openPool();
    const schemas = names("fleet", FLEET_SIZE);
    try {
      b.start();
      const result = await migrateSchemas(pool, schemas, {
        migrationsPath: FLEET,
        moduleName: MODULE,
      });
      b.end();
      if (result.status !== "success") throw new Error(`fleet run ended ${result.status}`);
    } finally {
      await dropSchemas(pool, schemas);
      await pool.close();
    }
  },
});

// ------------------------------------------------------- up-to-date check of 1,000 schemas

let shared: Promise<{ pool: Pool; schemas: string[] }> | undefined;
let sharedCalls = 0;
const CHECK_BENCHES = 3;

/** 1,000 migrated schemas, made once for the group and dropped after its last call. */
function migratedFleet(): Promise<{ pool: Pool; schemas: string[] }> {
  shared ??= (async () => {
    const pool = await openPool();
    const schemas = names("uptodate", CHECK_SIZE);
    const result = await migrateSchemas(pool, schemas, {
      migrationsPath: FLEET,
      moduleName: MODULE,
    });
    if (result.status !== "success") throw new Error(`setup ended ${result.status}`);
    return { pool, schemas };
  })();
  return shared;
}

async function release(): Promise<void> {
  sharedCalls++;
  if (sharedCalls < CHECK_BENCHES * CALLS) return;
  const { pool, schemas } = await migratedFleet();
  await dropSchemas(pool, schemas);
  await pool.close();
}

Deno.bench({
  group: "up-to-date check of 1,000 schemas",
  name: "sequential Migrator.applyPending() loop",
  baseline: true,
  n: RUNS,
  warmup: 0,
  async fn(b) {
    const { pool, schemas } = await migratedFleet();
    try {
      const db = new DatabaseManager({ pool });
      b.start();
      for (const schema of schemas) {
        const result = await new Migrator(db.withSchema(schema), {
          migrationsPath: FLEET,
          moduleName: MODULE,
        }).applyPending();
        if (result.status !== "up_to_date") throw new Error(`${schema} was ${result.status}`);
      }
      b.end();
    } finally {
      await release();
    }
  },
});

Deno.bench({
  group: "up-to-date check of 1,000 schemas",
  name: "migrateSchemas() fleet runner (nothing pending)",
  n: RUNS,
  warmup: 0,
  async fn(b) {
    const { pool, schemas } = await migratedFleet();
    try {
      b.start();
      const result = await migrateSchemas(pool, schemas, {
        migrationsPath: FLEET,
        moduleName: MODULE,
      });
      b.end();
      if (result.status !== "up_to_date") throw new Error(`fleet run ended ${result.status}`);
    } finally {
      await release();
    }
  },
});

Deno.bench({
  group: "up-to-date check of 1,000 schemas",
  name: "checkSchemas() report",
  n: RUNS,
  warmup: 0,
  async fn(b) {
    const { pool, schemas } = await migratedFleet();
    try {
      b.start();
      const report = await checkSchemas(pool, schemas, {
        migrationsPath: FLEET,
        moduleName: MODULE,
      });
      b.end();
      if (report.upToDate.length !== CHECK_SIZE) throw new Error("not every schema is up to date");
    } finally {
      await release();
    }
  },
});
