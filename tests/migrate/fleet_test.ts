import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { MigrationError, QueryError, SchemaError } from "../../src/errors.ts";
import { DatabaseManager } from "../../src/manager.ts";
import { createSharedPool, type Pool } from "../../src/pool/pool.ts";
import { checkSchemas, type FleetProgress, migrateSchemas } from "../../src/migrate/fleet.ts";
import { serverTest, TEST_URL } from "../_support/server.ts";

const FLEET = fileURLToPath(new URL("../fixtures/migrations/fleet/", import.meta.url));
const FLEET_FILES = [
  "001_accounts.sql",
  "002_accounts_email.sql",
  "003_projects.sql",
  "004_touch_function.sql",
  "005_seed.sql",
];

function tenantNames(count: number): string[] {
  const run = crypto.randomUUID().replaceAll("-", "").slice(0, 8);
  return Array.from({ length: count }, (_, i) => `pgdbm_fleet_${run}_${i}`);
}

/** A shared pool and tenant schema names, all dropped afterwards. */
async function withTenants(
  count: number,
  fn: (pool: Pool, tenants: string[]) => Promise<void>,
): Promise<void> {
  const pool = await createSharedPool({ connectionString: TEST_URL, maxConnections: 8 });
  const tenants = tenantNames(count);
  try {
    await fn(pool, tenants);
  } finally {
    try {
      const db = new DatabaseManager({ pool });
      await Promise.all(
        tenants.map((t) => db.execute(`DROP SCHEMA IF EXISTS "${t}" CASCADE`)),
      );
    } finally {
      await pool.close();
    }
  }
}

async function historyCount(pool: Pool, schema: string): Promise<number> {
  const db = new DatabaseManager({ pool, schema });
  return (await db.fetchValue<number>(
    "SELECT count(*)::int FROM {{tables.schema_migrations}} WHERE module_name = 'tenant'",
  ))!;
}

serverTest("migrateSchemas() migrates 200 tenant schemas over one pool with progress", async () => {
  await withTenants(200, async (pool, tenants) => {
    const progress: FleetProgress[] = [];
    let maxUsed = 0;
    const result = await migrateSchemas(pool, tenants, {
      migrationsPath: FLEET,
      moduleName: "tenant",
      concurrency: 6,
      onProgress: (p) => {
        progress.push(p);
        maxUsed = Math.max(maxUsed, pool.getStats().used);
      },
    });
    assert.equal(result.status, "success");
    assert.equal(result.module, "tenant");
    assert.equal(result.succeeded.length, 200);
    assert.deepEqual(result.failed, []);
    assert.deepEqual(result.notStarted, []);
    assert.equal(result.appliedCount, 1000);
    assert.deepEqual(result.results.map((r) => r.schema), tenants);
    for (const r of result.results) {
      assert.equal(r.status, "success");
      assert.deepEqual(r.applied.map((m) => m.filename), FLEET_FILES);
    }
    assert.equal(progress.length, 200);
    assert.deepEqual(progress.map((p) => p.done), Array.from({ length: 200 }, (_, i) => i + 1));
    assert.equal(progress.at(-1)!.appliedCount, 1000);
    assert.ok(maxUsed <= 8, `pool used ${maxUsed} connections`);
    for (const schema of [tenants[0], tenants[99], tenants[199]]) {
      assert.equal(await historyCount(pool, schema), 5);
      const db = new DatabaseManager({ pool, schema });
      assert.equal(await db.fetchValue("SELECT name FROM {{tables.projects}}"), "First project");
    }

    const again = await migrateSchemas(pool, tenants, {
      migrationsPath: FLEET,
      moduleName: "tenant",
    });
    assert.equal(again.status, "up_to_date");
    assert.equal(again.appliedCount, 0);
    assert.ok(again.results.every((r) => r.status === "up_to_date"));
  });
});

serverTest("migrateSchemas() reports one tenant's failure and migrates the others", async () => {
  await withTenants(6, async (pool, tenants) => {
    // This tenant already has an incompatible table, so its first migration fails.
    const broken = new DatabaseManager({ pool, schema: tenants[2] });
    await broken.ensureSchema();
    await broken.execute("CREATE TABLE {{tables.projects}} (id int)");
    const result = await migrateSchemas(pool, tenants, {
      migrationsPath: FLEET,
      moduleName: "tenant",
      concurrency: 3,
    });
    assert.equal(result.status, "failed");
    assert.deepEqual(result.failed, [tenants[2]]);
    assert.equal(result.succeeded.length, 5);
    const failure = result.results[2];
    assert.equal(failure.status, "failed");
    assert.deepEqual(failure.applied.map((m) => m.filename), FLEET_FILES.slice(0, 2));
    assert.ok(failure.error instanceof MigrationError);
    assert.equal(failure.error.filename, "003_projects.sql");
    assert.equal(failure.error.schema, tenants[2]);
    assert.equal(failure.error.line, 1);
    assert.match(failure.error.message, /already exists/);
    assert.equal(await historyCount(pool, tenants[2]), 2);
    for (const i of [0, 1, 3, 4, 5]) assert.equal(await historyCount(pool, tenants[i]), 5);
  });
});

serverTest("migrateSchemas() resumes an interrupted run where it stopped", async () => {
  await withTenants(12, async (pool, tenants) => {
    const controller = new AbortController();
    const first = await migrateSchemas(pool, tenants, {
      migrationsPath: FLEET,
      moduleName: "tenant",
      concurrency: 2,
      signal: controller.signal,
      onProgress: (p) => {
        if (p.done === 4) controller.abort();
      },
    });
    assert.equal(first.status, "interrupted");
    const finished = first.results.filter((r) => r.status === "success").map((r) => r.schema);
    assert.ok(finished.length >= 4 && finished.length <= 5, `finished ${finished.length}`);
    assert.equal(first.notStarted.length, 12 - finished.length);
    assert.ok(first.results.every((r) => r.status === "success" || r.status === "not_started"));

    const report = await checkSchemas(pool, tenants, {
      migrationsPath: FLEET,
      moduleName: "tenant",
    });
    assert.deepEqual(report.upToDate, finished);
    assert.deepEqual(report.behind, first.notStarted);

    const second = await migrateSchemas(pool, tenants, {
      migrationsPath: FLEET,
      moduleName: "tenant",
    });
    assert.equal(second.status, "success");
    for (const r of second.results) {
      assert.equal(r.status, finished.includes(r.schema) ? "up_to_date" : "success", r.schema);
    }
    for (const t of tenants) assert.equal(await historyCount(pool, t), 5);
  });
});

serverTest("checkSchemas() lists tenants that are up to date, behind or drifted", async () => {
  await withTenants(5, async (pool, tenants) => {
    const migrations: Record<string, string> = {};
    for (const name of FLEET_FILES) migrations[name] = await Deno.readTextFile(FLEET + name);
    const firstThree = Object.fromEntries(FLEET_FILES.slice(0, 3).map((n) => [n, migrations[n]]));
    await migrateSchemas(pool, tenants.slice(0, 3), { migrations, moduleName: "tenant" });
    await migrateSchemas(pool, [tenants[3]], { migrations: firstThree, moduleName: "tenant" });
    // Simulate a file edited after it was applied in one tenant.
    await new DatabaseManager({ pool, schema: tenants[1] }).execute(
      "UPDATE {{tables.schema_migrations}} SET checksum = repeat('0', 64) " +
        "WHERE filename = '002_accounts_email.sql'",
    );
    const seen: string[] = [];
    const report = await checkSchemas(pool, tenants, {
      migrations,
      moduleName: "tenant",
      onProgress: (p) => seen.push(p.schema),
    });
    assert.equal(report.module, "tenant");
    assert.deepEqual(report.upToDate, [tenants[0], tenants[2]]);
    assert.deepEqual(report.drifted, [tenants[1]]);
    assert.deepEqual(report.behind, [tenants[3], tenants[4]]);
    assert.deepEqual(report.errors, []);
    assert.deepEqual(seen.sort(), [...tenants].sort());
    const byName = new Map(report.schemas.map((s) => [s.schema, s]));
    assert.deepEqual(byName.get(tenants[3])!.pending, FLEET_FILES.slice(3));
    assert.equal(byName.get(tenants[3])!.initialized, true);
    assert.equal(byName.get(tenants[4])!.initialized, false);
    assert.deepEqual(byName.get(tenants[1])!.drifted.map((d) => d.appliedChecksum), [
      "0".repeat(64),
    ]);

    // The fleet refuses the drifted tenant and still brings the one behind up to date.
    const result = await migrateSchemas(pool, tenants, { migrations, moduleName: "tenant" });
    assert.equal(result.status, "failed");
    assert.deepEqual(result.failed, [tenants[1]]);
    assert.match(result.results[1].error!.message, /changed after it was applied/);
    assert.deepEqual(result.results[3].applied.map((m) => m.filename), FLEET_FILES.slice(3));
  });
});

serverTest(
  "checkSchemas() reports a schema whose history cannot be read as an error and checks the rest",
  async () => {
    await withTenants(5, async (pool, tenants) => {
      const migrations: Record<string, string> = {};
      for (const name of FLEET_FILES) migrations[name] = await Deno.readTextFile(FLEET + name);
      await migrateSchemas(pool, [tenants[0], tenants[2], tenants[3]], {
        migrations,
        moduleName: "tenant",
      });
      // A history table of another shape, and one that raises when read.
      const alien = new DatabaseManager({ pool, schema: tenants[1] });
      await alien.ensureSchema();
      await alien.execute("CREATE TABLE {{tables.schema_migrations}} (id int)");
      const raising = new DatabaseManager({ pool, schema: tenants[2] });
      await raising.execute(
        "ALTER TABLE {{tables.schema_migrations}} RENAME TO history; " +
          "CREATE VIEW {{tables.schema_migrations}} AS SELECT * FROM {{tables.history}} " +
          "WHERE 1 / (SELECT count(*) - count(*) FROM {{tables.history}}) = 1",
      );
      // An applied file edited since: drifted, not an error.
      await new DatabaseManager({ pool, schema: tenants[3] }).execute(
        "UPDATE {{tables.schema_migrations}} SET checksum = repeat('0', 64) " +
          "WHERE filename = '001_accounts.sql'",
      );

      const seen: string[] = [];
      const schemas = [...tenants, "Not-A-Schema"];
      const report = await checkSchemas(pool, schemas, {
        migrations,
        moduleName: "tenant",
        concurrency: 2,
        onProgress: (p) => seen.push(p.schema),
      });
      assert.deepEqual(report.errors, [tenants[1], tenants[2], "Not-A-Schema"]);
      assert.deepEqual(report.upToDate, [tenants[0]]);
      assert.deepEqual(report.drifted, [tenants[3]]);
      assert.deepEqual(report.behind, [tenants[4]]);
      assert.deepEqual(seen.sort(), [...schemas].sort(), "onProgress skipped a schema");
      assert.deepEqual(report.schemas.map((s) => s.schema), schemas, "not in the order given");

      const [alienStatus, raisingStatus, badName] = [1, 2, 5].map((i) => report.schemas[i]);
      for (const status of [alienStatus, raisingStatus, badName]) {
        assert.equal(status.state, "error");
        assert.equal(status.initialized, false);
        assert.deepEqual(status.pending, []);
        assert.deepEqual(status.drifted, []);
        assert.deepEqual(status.missing, []);
        assert.equal(status.appliedCount, 0);
      }
      assert.ok(alienStatus.error instanceof QueryError, `got ${alienStatus.error}`);
      assert.equal(alienStatus.error.sqlstate, "42703", alienStatus.error.message);
      assert.ok(raisingStatus.error instanceof QueryError, `got ${raisingStatus.error}`);
      assert.equal(raisingStatus.error.sqlstate, "22012", raisingStatus.error.message);
      assert.ok(badName.error instanceof SchemaError, `got ${badName.error}`);
      assert.match(badName.error.message, /"Not-A-Schema"/);

      const drifted = report.schemas[3];
      assert.equal(drifted.error, undefined);
      assert.deepEqual(drifted.drifted.map((d) => [d.filename, d.appliedChecksum]), [
        ["001_accounts.sql", "0".repeat(64)],
      ]);
      assert.deepEqual(drifted.pending, []);
      assert.equal(drifted.appliedCount, FLEET_FILES.length);

      // The check changed nothing: the unreadable histories are as they were.
      assert.equal(
        await alien.fetchValue("SELECT count(*)::int FROM {{tables.schema_migrations}}"),
        0,
      );
      assert.equal(
        await raising.fetchValue("SELECT count(*)::int FROM {{tables.history}}"),
        FLEET_FILES.length,
      );
    });
  },
);

serverTest(
  "checkSchemas() lists an applied file that is gone under missing, without an error",
  async () => {
    await withTenants(2, async (pool, tenants) => {
      const migrations: Record<string, string> = {};
      for (const name of FLEET_FILES) migrations[name] = await Deno.readTextFile(FLEET + name);
      const withGone = { ...migrations, "006_gone.sql": "SELECT 6;" };
      await migrateSchemas(pool, tenants, { migrations: withGone, moduleName: "tenant" });
      const report = await checkSchemas(pool, tenants, { migrations, moduleName: "tenant" });
      // As the README says: an applied file that is gone is reported, not refused.
      assert.deepEqual(report.upToDate, tenants);
      assert.deepEqual(report.errors, []);
      for (const status of report.schemas) {
        assert.deepEqual(status.missing, ["006_gone.sql"]);
        assert.equal(status.appliedCount, FLEET_FILES.length + 1);
      }
    });
  },
);

serverTest("migrateSchemas({ dryRun }) reports pending files and changes nothing", async () => {
  await withTenants(3, async (pool, tenants) => {
    const db = new DatabaseManager({ pool });
    const result = await migrateSchemas(db, tenants, {
      migrationsPath: FLEET,
      moduleName: "tenant",
      dryRun: true,
    });
    assert.equal(result.status, "dry_run");
    for (const r of result.results) assert.deepEqual(r.pending, FLEET_FILES);
    assert.equal(
      await db.fetchValue("SELECT count(*)::int FROM pg_namespace WHERE nspname = ANY($1)", [
        tenants,
      ]),
      0,
    );
  });
});

serverTest("migrateSchemas() refuses an invalid source before touching any schema", async () => {
  await withTenants(2, async (pool, tenants) => {
    await assert.rejects(
      migrateSchemas(pool, tenants, {
        migrations: { "001_a.sql": "SELECT 1;", "1_b.sql": "SELECT 2;" },
        moduleName: "tenant",
      }),
      /same version 1/,
    );
    await assert.rejects(
      migrateSchemas(pool, tenants, { migrations: {}, moduleName: "tenant", concurrency: 0 }),
      RangeError,
    );
    const bad = await migrateSchemas(pool, ["not-a-schema", tenants[0]], {
      migrations: { "001_a.sql": "CREATE TABLE {{tables.a}} (id int);" },
      moduleName: "tenant",
    });
    assert.deepEqual(bad.failed, ["not-a-schema"]);
    assert.deepEqual(bad.succeeded, [tenants[0]]);
  });
});

serverTest(
  "migrateSchemas() rerun reads the fleet's histories at once yet treats each schema as before",
  async () => {
    await withTenants(6, async (pool, tenants) => {
      const migrations: Record<string, string> = {};
      for (const name of FLEET_FILES) migrations[name] = await Deno.readTextFile(FLEET + name);
      const withGone = { ...migrations, "006_gone.sql": "SELECT 6;" };
      const firstThree = Object.fromEntries(FLEET_FILES.slice(0, 3).map((n) => [n, migrations[n]]));
      await migrateSchemas(pool, [tenants[0], tenants[2]], { migrations, moduleName: "tenant" });
      await migrateSchemas(pool, [tenants[1]], { migrations: firstThree, moduleName: "tenant" });
      await migrateSchemas(pool, [tenants[3]], { migrations: withGone, moduleName: "tenant" });
      // tenants[1] is behind by two files, tenants[2] drifted, tenants[3] has a file that
      // is gone, tenants[4] a history table of another shape, tenants[5] none at all.
      await new DatabaseManager({ pool, schema: tenants[2] }).execute(
        "UPDATE {{tables.schema_migrations}} SET checksum = repeat('0', 64) " +
          "WHERE filename = '001_accounts.sql'",
      );
      const alien = new DatabaseManager({ pool, schema: tenants[4] });
      await alien.ensureSchema();
      await alien.execute("CREATE TABLE {{tables.schema_migrations}} (id int)");

      const result = await migrateSchemas(pool, [...tenants, "Not-A-Schema"], {
        migrations,
        moduleName: "tenant",
      });
      const byName = new Map(result.results.map((r) => [r.schema, r]));
      assert.equal(byName.get(tenants[0])!.status, "up_to_date");
      assert.deepEqual(byName.get(tenants[0])!.missing, []);
      assert.equal(byName.get(tenants[1])!.status, "success");
      assert.deepEqual(
        byName.get(tenants[1])!.applied.map((m) => m.filename),
        FLEET_FILES.slice(3),
      );
      assert.equal(byName.get(tenants[2])!.status, "failed");
      assert.match(byName.get(tenants[2])!.error!.message, /changed after it was applied/);
      assert.equal(byName.get(tenants[3])!.status, "up_to_date");
      assert.deepEqual(byName.get(tenants[3])!.missing, ["006_gone.sql"]);
      assert.equal(byName.get(tenants[4])!.status, "failed");
      assert.equal(byName.get(tenants[5])!.status, "success");
      assert.equal(byName.get(tenants[5])!.applied.length, FLEET_FILES.length);
      assert.equal(byName.get("Not-A-Schema")!.status, "failed");
      assert.ok(byName.get("Not-A-Schema")!.error instanceof SchemaError);
      assert.deepEqual(result.failed, [tenants[2], tenants[4], "Not-A-Schema"]);
    });
  },
);

serverTest(
  "migrateSchemas({ signal, cancelRunning }) rolls back the running schemas' migrations",
  async () => {
    await withTenants(4, async (pool, tenants) => {
      const marker = `cancel_${tenants[0]}`;
      const db = new DatabaseManager({ pool });
      const controller = new AbortController();
      const run = migrateSchemas(pool, tenants, {
        migrations: {
          "001_a.sql": "CREATE TABLE {{tables.a}} (id int);",
          "002_slow.sql": `CREATE TABLE {{tables.b}} (id int);\nSELECT pg_sleep(30), '${marker}';`,
        },
        moduleName: "tenant",
        concurrency: 2,
        signal: controller.signal,
        cancelRunning: true,
      });
      const deadline = performance.now() + 20_000;
      while (
        await db.fetchValue<number>(
          "SELECT count(*)::int FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
          [`%pg_sleep%${marker}%`],
        ) !== 2
      ) {
        assert.ok(performance.now() < deadline, "two schemas reach their slow migration");
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      controller.abort();
      const result = await run;
      assert.equal(result.status, "interrupted");
      const cancelled = result.results.filter((r) => r.status === "failed");
      assert.equal(cancelled.length, 2);
      for (const r of cancelled) {
        assert.ok(r.error instanceof MigrationError && r.error.reason === "aborted", r.schema);
        assert.deepEqual(r.applied.map((a) => a.filename), ["001_a.sql"]);
        assert.equal(await historyCount(pool, r.schema), 1, "002 rolled back");
      }
      assert.equal(result.notStarted.length, 2);
    });
  },
);
