/**
 * Read replicas against a real primary with two streaming standbys (a throwaway cluster,
 * tests/_support/replica_cluster.ts). Where a query ran is told by the server itself:
 * `pg_is_in_recovery()` is true only on a standby, `inet_server_port()` names the node.
 */
import assert from "node:assert/strict";
import postgres from "postgres";
import {
  ConfigurationError,
  createSharedPool,
  type DatabaseConfig,
  DatabaseManager,
  type Pool,
  type PoolStats,
  QueryError,
  type StandardSchemaV1,
} from "../../mod.ts";
import {
  type ReplicaCluster,
  replicaClusterUnavailable,
  startReplicaCluster,
} from "../_support/replica_cluster.ts";

const unavailable = replicaClusterUnavailable();
if (unavailable !== undefined && Deno.env.get("PGDBM_REQUIRE_SERVER") === "1") {
  throw new Error(
    `PGDBM_REQUIRE_SERVER=1 but the replica test cluster cannot start: ${unavailable}`,
  );
}

const SCHEMA = "app";
const IN_RECOVERY = "SELECT pg_is_in_recovery()";
const PASSWORD = "Replica-Secret-PW-7";

function statsOf(pool: Pool): PoolStats {
  return pool.getStats();
}

/** A validator that accepts any object (Standard Schema v1). */
const anyRow: StandardSchemaV1<unknown, Record<string, unknown>> = {
  "~standard": {
    version: 1,
    vendor: "pgdbm-test",
    validate: (value) => ({ value: value as Record<string, unknown> }),
  },
};

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it is true; fails with `what` after `ms`. */
async function waitUntil(
  what: string,
  check: () => boolean | Promise<boolean>,
  ms = 15_000,
): Promise<void> {
  const deadline = performance.now() + ms;
  while (!(await check())) {
    if (performance.now() > deadline) assert.fail(`timed out after ${ms} ms waiting until ${what}`);
    await sleep(50);
  }
}

function portOf(url: string): number {
  return Number(new URL(url).port);
}

function targetOf(url: string): string {
  return `127.0.0.1:${portOf(url)}/postgres`;
}

/** Runs SQL on a raw connection to one node, outside any pgdbm pool. */
async function onNode<T>(url: string, fn: (sql: postgres.Sql) => Promise<T>): Promise<T> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 1 });
  }
}

/**
 * Opens a pool on the primary with `replicas`, and a manager over it; closes it after.
 * `createSharedPool()` resolves once each replica's first connection attempt settled, so
 * unless `waitForReplicas` is false every replica must be healthy at once.
 */
async function withReplicaPool(
  cluster: ReplicaCluster,
  config: DatabaseConfig,
  fn: (db: DatabaseManager, pool: Pool) => Promise<void>,
  waitForReplicas = true,
): Promise<void> {
  const pool = await createSharedPool({ connectionString: cluster.primaryUrl, ...config });
  try {
    if (waitForReplicas) {
      assert.ok(
        statsOf(pool).replicas.every((replica) => replica.healthy),
        "createSharedPool() resolved before its replicas could serve reads",
      );
    }
    await fn(new DatabaseManager({ pool, schema: SCHEMA }), pool);
  } finally {
    await pool.close();
  }
}

Deno.test({
  name: unavailable === undefined
    ? "createSharedPool({ replicas }) routes reads to streaming standbys and falls back"
    : `createSharedPool({ replicas }) read replicas (skipped: ${unavailable})`,
  ignore: unavailable !== undefined,
  async fn(t) {
    const cluster = await startReplicaCluster({ standbys: 2 });
    const [standby0, standby1] = cluster.standbyUrls;
    try {
      await onNode(cluster.primaryUrl, async (sql) => {
        await sql.unsafe(
          `CREATE SCHEMA ${SCHEMA}; ` +
            `CREATE TABLE ${SCHEMA}.items (id serial PRIMARY KEY, note text NOT NULL)`,
        );
      });
      await cluster.waitForReplay(0);
      await cluster.waitForReplay(1);

      await t.step(
        "reads go to the replica; writes, { primary: true }, transactions and acquire() go to the primary",
        async () => {
          await withReplicaPool(cluster, { replicas: [standby0] }, async (db, pool) => {
            const replicaBefore = statsOf(pool).replicas[0].queries;
            assert.equal(await db.fetchValue(IN_RECOVERY), true, "fetchValue ran on the primary");
            assert.deepEqual(await db.fetchOne("SELECT pg_is_in_recovery() AS r"), { r: true });
            assert.deepEqual(await db.fetchAll("SELECT pg_is_in_recovery() AS r"), [{ r: true }]);
            assert.deepEqual(await db.fetchAsModel(anyRow, "SELECT pg_is_in_recovery() AS r"), {
              r: true,
            });
            assert.deepEqual(
              await db.fetchAllAsModel(anyRow, "SELECT pg_is_in_recovery() AS r"),
              [{ r: true }],
            );
            assert.ok(statsOf(pool).replicas[0].queries >= replicaBefore + 5);

            const primaryBefore = statsOf(pool).queries;
            assert.equal(await db.fetchValue(IN_RECOVERY, [], { primary: true }), false);
            assert.deepEqual(await db.fetchOne(IN_RECOVERY, [], { primary: true }), {
              pg_is_in_recovery: false,
            });
            assert.ok(statsOf(pool).queries >= primaryBefore + 2);
            assert.equal(await db.transaction((tx) => tx.fetchValue(IN_RECOVERY)), false);
            assert.equal(await db.acquire((conn) => conn.fetchValue(IN_RECOVERY)), false);

            // Each of these fails if it runs on a standby: a write, or a read-only statement
            // that raises there.
            const onStandbyFails = "DO $$ BEGIN IF pg_is_in_recovery() THEN " +
              "RAISE EXCEPTION 'ran on a standby'; END IF; END $$";
            await db.execute(onStandbyFails);
            await db.executeMany(
              "SELECT $1::int / (NOT pg_is_in_recovery())::int",
              [[1], [2]],
            );
            const id = await db.executeAndReturnId<number>(
              "INSERT INTO {{tables.items}} (note) VALUES ($1)",
              ["routing"],
            );
            assert.equal(typeof id, "number");
            assert.equal(
              await db.copyRecordsToTable("items", [["copied"]], { columns: ["note"] }),
              1,
            );
            const written = await onNode(
              cluster.primaryUrl,
              (sql) =>
                sql`SELECT count(*)::int AS n FROM app.items WHERE note IN ('routing', 'copied')`,
            );
            assert.equal(written[0].n, 2);
          });
        },
      );

      await t.step(
        "onPrimary() sends every read to the primary: a write is read back while replay is paused",
        async () => {
          await withReplicaPool(cluster, { replicas: [standby0] }, async (db, pool) => {
            const primary = db.onPrimary();
            assert.equal(primary.schema, SCHEMA);
            assert.equal(primary.pool, pool, "onPrimary() opened a pool of its own");
            const replicaBefore = statsOf(pool).replicas[0].queries;
            assert.equal(await primary.fetchValue(IN_RECOVERY), false, "fetchValue on a standby");
            assert.deepEqual(await primary.fetchOne("SELECT pg_is_in_recovery() AS r"), {
              r: false,
            });
            assert.deepEqual(await primary.fetchAll("SELECT pg_is_in_recovery() AS r"), [
              { r: false },
            ]);
            assert.deepEqual(
              await primary.fetchAsModel(anyRow, "SELECT pg_is_in_recovery() AS r"),
              {
                r: false,
              },
            );
            assert.deepEqual(
              await primary.fetchAllAsModel(anyRow, "SELECT pg_is_in_recovery() AS r"),
              [{ r: false }],
            );
            assert.equal(
              await primary.withSchema("public").fetchValue(IN_RECOVERY),
              false,
              "withSchema() of an onPrimary() manager reads on a standby",
            );
            assert.equal(
              statsOf(pool).replicas[0].queries,
              replicaBefore,
              "a read reached the replica",
            );
            assert.equal(
              await db.fetchValue(IN_RECOVERY),
              true,
              "the manager it came from changed",
            );

            // Read your own write: the standby cannot have the row, the primary has it at once.
            await cluster.pauseReplay(0);
            try {
              const id = await db.executeAndReturnId<number>(
                "INSERT INTO {{tables.items}} (note) VALUES ($1)",
                ["on-primary"],
              );
              const onReplica = await onNode(
                standby0,
                (sql) => sql`SELECT count(*)::int AS n FROM app.items WHERE id = ${id}`,
              );
              assert.equal(onReplica[0].n, 0, "the paused replica already has the row");
              assert.deepEqual(
                await primary.fetchOne("SELECT note FROM {{tables.items}} WHERE id = $1", [id]),
                { note: "on-primary" },
              );
            } finally {
              await cluster.resumeReplay(0);
            }

            await primary.close();
            assert.equal(pool.closed, false, "close() of an onPrimary() manager closed the pool");
            assert.equal(await db.fetchValue(IN_RECOVERY), true);
          });

          // A standalone manager: a view taken before connect() reads on the primary after it.
          const owner = new DatabaseManager({
            connectionString: cluster.primaryUrl,
            replicas: [standby0],
            schema: SCHEMA,
          });
          const early = owner.onPrimary();
          try {
            await owner.connect();
            await waitUntil(
              "the standalone manager's reads reach the replica",
              async () => await owner.fetchValue(IN_RECOVERY) === true,
            );
            assert.equal(await early.fetchValue(IN_RECOVERY), false);
          } finally {
            await owner.close();
          }
        },
      );

      await t.step(
        "reads take turns between two replicas and never reach the primary",
        async () => {
          await withReplicaPool(cluster, { replicas: [standby0, standby1] }, async (db, pool) => {
            const ports = new Map<number, number>();
            for (let i = 0; i < 20; i++) {
              const port = await db.fetchValue<number>("SELECT inet_server_port()");
              ports.set(port!, (ports.get(port!) ?? 0) + 1);
            }
            assert.deepEqual([...ports.keys()].sort(), [portOf(standby0), portOf(standby1)].sort());
            for (const [port, count] of ports) {
              assert.ok(count >= 5, `replica on port ${port} served only ${count} of 20 reads`);
            }
            const stats = statsOf(pool);
            assert.equal(stats.replicas.length, 2);
            for (const replica of stats.replicas) assert.ok(replica.queries >= 5);
          });
        },
      );

      await t.step(
        "a read the server refuses as a protocol violation fails for its caller; the replica stays up",
        async () => {
          await withReplicaPool(cluster, { replicas: [standby0] }, async (db, pool) => {
            assert.equal(await db.fetchValue<number>("SELECT 1 + $1::int", [1]), 2);
            // Too few values: the server answers 08P01 and the session goes on.
            const error = await db.fetchValue("SELECT $1::int + $2::int", [1]).catch((e) => e);
            assert.ok(error instanceof QueryError, `expected QueryError, got ${error}`);
            assert.equal(error.sqlstate, "08P01");
            const [replica] = statsOf(pool).replicas;
            assert.equal(replica.healthy, true, "the replica was marked down");
            assert.equal(
              await db.fetchValue<number>("SELECT inet_server_port()"),
              portOf(standby0),
            );
          });
        },
      );

      await t.step("getStats() has one entry per replica, without the password", async () => {
        const withPassword = standby0.replace("postgres@", `postgres:${PASSWORD}@`);
        await withReplicaPool(cluster, { replicas: [withPassword] }, async (db, pool) => {
          await db.fetchValue(IN_RECOVERY);
          await db.execute("SELECT 1");
          const stats = statsOf(pool);
          assert.equal(typeof stats.queries, "number");
          assert.ok(stats.queries >= 1, "the primary counted no query");
          assert.equal(stats.errors, 0);
          assert.equal(stats.replicas.length, 1);
          const [replica] = stats.replicas;
          assert.equal(replica.target, targetOf(standby0));
          assert.equal(replica.healthy, true);
          assert.ok(replica.lagMs === null || replica.lagMs >= 0, `lagMs ${replica.lagMs}`);
          assert.ok(replica.size >= 1, "the replica has no open connection");
          assert.equal(replica.idle + replica.used, replica.size);
          assert.equal(replica.waiting, 0);
          assert.ok(replica.queries >= 1);
          assert.equal(replica.errors, 0);
          const managerStats = db.getPoolStats();
          assert.equal(managerStats.replicas[0].target, targetOf(standby0));
          for (const text of [JSON.stringify(stats), Deno.inspect(managerStats, { depth: 5 })]) {
            assert.ok(!text.includes(PASSWORD), "the replica's password is in the stats");
          }
        });
      });

      await t.step(
        "a read that writes is retried on the primary; other errors reach the caller",
        async () => {
          await withReplicaPool(cluster, { replicas: [standby0] }, async (db) => {
            const row = await db.fetchOne<{ id: number; r: boolean }>(
              "INSERT INTO {{tables.items}} (note) VALUES ($1) RETURNING id, pg_is_in_recovery() AS r",
              ["fetch-insert"],
            );
            assert.equal(row?.r, false);
            const stored = await onNode(
              cluster.primaryUrl,
              (sql) => sql`SELECT id FROM app.items WHERE note = 'fetch-insert'`,
            );
            assert.deepEqual(stored.map((r) => r.id), [row!.id], "inserted other than once");
            assert.equal(
              await db.fetchValue("SELECT nextval('app.items_id_seq') > 0"),
              true,
            );
            const viaCte = await db.fetchValue<boolean>(
              "WITH added AS (INSERT INTO {{tables.items}} (note) VALUES ('cte') RETURNING id) " +
                "SELECT pg_is_in_recovery() FROM added",
            );
            assert.equal(viaCte, false);

            const missing = await db.fetchOne("SELECT * FROM {{tables.no_such_table}}").catch((e) =>
              e
            );
            assert.ok(missing instanceof QueryError, `expected QueryError, got ${missing}`);
            assert.equal(missing.sqlstate, "42P01");
            const division = await db.fetchValue("SELECT 1 / 0").catch((e) => e);
            assert.ok(division instanceof QueryError, `expected QueryError, got ${division}`);
            assert.equal(division.sqlstate, "22012");
            assert.equal(await db.fetchValue(IN_RECOVERY), true, "reads left the replica");
          });
        },
      );

      await t.step(
        "a replica lagging more than maxReplicaLagMs is skipped until it catches up",
        async () => {
          await withReplicaPool(
            cluster,
            { replicas: [standby0], maxReplicaLagMs: 500 },
            async (db, pool) => {
              await waitUntil(
                "reads reach the replica",
                async () => await db.fetchValue(IN_RECOVERY) === true,
              );
              await cluster.pauseReplay(0);
              let id: number | null = null;
              try {
                id = await db.executeAndReturnId<number>(
                  "INSERT INTO {{tables.items}} (note) VALUES ($1)",
                  ["while-paused"],
                );
                const onReplica = await onNode(
                  standby0,
                  (sql) => sql`SELECT count(*)::int AS n FROM app.items WHERE id = ${id}`,
                );
                assert.equal(onReplica[0].n, 0, "the paused replica already has the row");
                await waitUntil(
                  "a read sees the new row (on the primary)",
                  async () =>
                    await db.fetchValue(
                      "SELECT count(*)::int FROM {{tables.items}} WHERE id = $1",
                      [id],
                    ) === 1,
                );
                assert.equal(await db.fetchValue(IN_RECOVERY), false);
                const replica = statsOf(pool).replicas[0];
                assert.ok(replica.lagMs !== null && replica.lagMs > 500, `lagMs ${replica.lagMs}`);
              } finally {
                await cluster.resumeReplay(0);
              }
              await waitUntil(
                "reads return to the replica",
                async () => await db.fetchValue(IN_RECOVERY) === true,
              );
              assert.equal(
                await db.fetchValue("SELECT count(*)::int FROM {{tables.items}} WHERE id = $1", [
                  id,
                ]),
                1,
              );
              const replica = statsOf(pool).replicas[0];
              assert.ok(replica.lagMs !== null && replica.lagMs <= 500, `lagMs ${replica.lagMs}`);
            },
            // A loaded host can leave the replica over 500 ms behind when the pool opens; the
            // step waits for reads to reach it instead.
            false,
          );
        },
      );

      await t.step(
        "a replica stopped under load: no read fails, reads move to the primary and come back",
        async () => {
          const retryMs = 1000;
          await withReplicaPool(
            cluster,
            { replicas: [standby0], replicaRetryMs: retryMs, commandTimeoutMs: 10_000 },
            async (db, pool) => {
              assert.equal(await db.fetchValue(IN_RECOVERY), true);
              const served = { replica: 0, primary: 0 };
              const failures: unknown[] = [];
              let running = true;
              const hardStop = performance.now() + 20_000;
              const worker = async (index: number) => {
                const sql = index % 2 === 0 ? IN_RECOVERY : `${IN_RECOVERY} FROM pg_sleep(0.02)`;
                while (running && performance.now() < hardStop) {
                  try {
                    if (await db.fetchValue<boolean>(sql)) served.replica++;
                    else served.primary++;
                  } catch (error) {
                    failures.push(error);
                  }
                }
              };
              const load = Promise.all(Array.from({ length: 200 }, (_, index) => worker(index)));
              try {
                await waitUntil("the replica served 400 reads", () => served.replica >= 400);
                await cluster.stopStandby(0);
                const primaryAtStop = served.primary;
                await waitUntil(
                  "the primary served 400 more reads",
                  () => served.primary >= primaryAtStop + 400,
                );
              } finally {
                running = false;
                await load;
              }
              assert.deepEqual(failures.slice(0, 3), [], `${failures.length} reads failed`);
              assert.ok(served.replica >= 400 && served.primary >= 400, JSON.stringify(served));

              for (let i = 0; i < 10; i++) assert.equal(await db.fetchValue(IN_RECOVERY), false);
              const down = statsOf(pool).replicas[0];
              assert.equal(down.healthy, false);
              assert.ok(down.errors > 0, "the replica's failures were not counted");

              await cluster.startStandby(0);
              await cluster.waitForReplay(0);
              await waitUntil(
                `reads return to the restarted replica (replicaRetryMs ${retryMs})`,
                async () => await db.fetchValue(IN_RECOVERY) === true,
                retryMs + 15_000,
              );
              assert.equal(statsOf(pool).replicas[0].healthy, true);
            },
          );
        },
      );

      await t.step(
        "a replica unreachable at start: the pool opens and reads go to the primary",
        async () => {
          const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
          const port = (listener.addr as Deno.NetAddr).port;
          listener.close();
          const nowhere = `postgres://postgres@127.0.0.1:${port}/postgres`;
          await withReplicaPool(
            cluster,
            { replicas: [nowhere], retry: { attempts: 1 } },
            async (db, pool) => {
              for (let i = 0; i < 3; i++) assert.equal(await db.fetchValue(IN_RECOVERY), false);
              const [replica] = statsOf(pool).replicas;
              assert.equal(replica.target, `127.0.0.1:${port}/postgres`);
              assert.equal(replica.healthy, false);
            },
            false,
          );
        },
      );

      await t.step("bad replica options get a ConfigurationError and open nothing", async () => {
        const cases: [string, DatabaseConfig][] = [
          ["replicas", { replicas: standby0 as unknown as string[] }],
          ["replicas", { replicas: [42 as unknown as string] }],
          ["maxReplicaLagMs", { maxReplicaLagMs: -1 }],
          ["replicaRetryMs", { replicaRetryMs: "soon" as unknown as number }],
        ];
        for (const [option, config] of cases) {
          const error = await createSharedPool({ connectionString: cluster.primaryUrl, ...config })
            .then((pool) => pool.close().then(() => undefined), (e) => e);
          assert.ok(error instanceof ConfigurationError, `${option}: got ${error}`);
          assert.match(error.message, new RegExp(option));
        }
      });
    } finally {
      await cluster.stop();
    }
  },
});
