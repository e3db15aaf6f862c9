/**
 * Read throughput with and without a read replica, and through PgBouncer. Starts a
 * throwaway primary with one streaming standby (tests/_support/replica_cluster.ts; needs root and
 * the PostgreSQL binaries), then for each read shape runs 64 callers looping on a read for
 * a few seconds in each mode, and prints queries/s, p50 / p99 and ratios against the
 * baseline of the same run:
 *
 * - `primary only` vs `primary + 1 replica` (reads routed to the standby);
 * - `direct, prepare: false` and `PgBouncer (transaction mode), prepare: false` vs
 *   `direct` (PgBouncer needs tests/_support/pgbouncer.ts and a pgbouncer binary).
 *
 * Every node runs on this machine, so a replica adds no CPU: with few cores expect no gain
 * (or a loss), unlike a replica on its own host.
 *
 *   deno run -A bench/replicas.ts
 */
import { createSharedPool, type DatabaseConfig, DatabaseManager, type Pool } from "../mod.ts";
import {
  type PgBouncer,
  pgbouncerUnavailable,
  startPgBouncer,
} from "../tests/_support/pgbouncer.ts";
import {
  replicaClusterUnavailable,
  startReplicaCluster,
} from "../tests/_support/replica_cluster.ts";

const SECONDS = Number(Deno.env.get("REPLICA_BENCH_SECONDS") ?? 3);
const CALLERS = 64;
const ROWS = 50_000;

interface Shape {
  name: string;
  sql: string;
  params: (i: number) => unknown[];
}

const SHAPES: Shape[] = [
  {
    name: "point lookup",
    sql: "SELECT id, note FROM bench_items WHERE id = $1",
    params: (i) => [1 + (i * 7919) % ROWS],
  },
  {
    name: "scan 5k rows",
    sql:
      "SELECT count(*)::int FROM bench_items WHERE id > $1 AND id <= $1 + 5000 AND note LIKE 'n%'",
    params: (i) => [(i * 7919) % (ROWS - 5000)],
  },
];

interface Result {
  perSecond: number;
  p50: number;
  p99: number;
}

async function measure(label: string, db: DatabaseManager, shape: Shape): Promise<Result> {
  const warmEnd = performance.now() + 300;
  let i = 0;
  while (performance.now() < warmEnd) await db.fetchAll(shape.sql, shape.params(i++));
  const latencies: number[] = [];
  const end = performance.now() + SECONDS * 1000;
  const caller = async () => {
    while (performance.now() < end) {
      const start = performance.now();
      await db.fetchAll(shape.sql, shape.params(i++));
      latencies.push(performance.now() - start);
    }
  };
  await Promise.all(Array.from({ length: CALLERS }, caller));
  latencies.sort((a, b) => a - b);
  const at = (q: number) =>
    latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
  const result = { perSecond: latencies.length / SECONDS, p50: at(0.5), p99: at(0.99) };
  console.log(
    `  ${label.padEnd(44)} ${result.perSecond.toFixed(0).padStart(7)} q/s  ` +
      `p50 ${result.p50.toFixed(2)} ms  p99 ${result.p99.toFixed(2)} ms`,
  );
  return result;
}

/** Measures one mode over a fresh pool and prints where the reads ran. */
async function mode(label: string, config: DatabaseConfig, shape: Shape): Promise<Result> {
  const pool: Pool = await createSharedPool({ maxConnections: 10, ...config });
  try {
    const result = await measure(label, new DatabaseManager({ pool }), shape);
    const stats = pool.getStats();
    if (stats.replicas.length > 0) {
      const routed = stats.replicas.map((r) => `${r.queries} on the replica`).join(", ");
      console.log(`  ${"".padEnd(44)} (${stats.queries} on the primary, ${routed})`);
    }
    return result;
  } finally {
    await pool.close();
  }
}

function ratio(name: string, value: Result, base: Result): void {
  console.log(`  ${name.padEnd(44)} ${(value.perSecond / base.perSecond).toFixed(2)}x`);
}

const unavailable = replicaClusterUnavailable();
if (unavailable !== undefined) {
  console.error(`Cannot run the replica benchmark: ${unavailable}`);
  Deno.exit(1);
}
const noBouncer = pgbouncerUnavailable();
const cluster = await startReplicaCluster({ standbys: 1 });
let bouncer: PgBouncer | undefined;
try {
  const setup = await createSharedPool({ connectionString: cluster.primaryUrl });
  try {
    await new DatabaseManager({ pool: setup }).execute(
      "CREATE TABLE bench_items AS SELECT g AS id, 'n' || g AS note " +
        `FROM generate_series(1, ${ROWS}) g; ALTER TABLE bench_items ADD PRIMARY KEY (id); ` +
        "ANALYZE bench_items",
    );
  } finally {
    await setup.close();
  }
  await cluster.waitForReplay();
  if (noBouncer === undefined) {
    bouncer = await startPgBouncer(cluster.primaryUrl, {
      settings: {
        ignore_startup_parameters:
          "jit, statement_timeout, lock_timeout, idle_in_transaction_session_timeout",
        default_pool_size: "10",
      },
    });
  }
  const cores = navigator.hardwareConcurrency;
  console.log(`${CALLERS} callers, ${SECONDS} s per mode, pools of 10, ${cores} cores\n`);
  const direct: DatabaseConfig = { connectionString: cluster.primaryUrl };
  for (const shape of SHAPES) {
    console.log(`${shape.name}: ${shape.sql}`);
    const primaryOnly = await mode("primary only", direct, shape);
    const withReplica = await mode(
      "primary + 1 replica",
      { ...direct, replicas: [...cluster.standbyUrls] },
      shape,
    );
    const noPrepare = await mode("direct, prepare: false", { ...direct, prepare: false }, shape);
    let bounced: Result | undefined;
    if (bouncer !== undefined) {
      bounced = await mode(
        "PgBouncer (transaction mode), prepare: false",
        { connectionString: bouncer.url(), prepare: false },
        shape,
      );
    }
    ratio("replica / primary only", withReplica, primaryOnly);
    ratio("direct prepare: false / direct", noPrepare, primaryOnly);
    if (bounced !== undefined) {
      ratio("PgBouncer / direct", bounced, primaryOnly);
      ratio("PgBouncer / direct prepare: false", bounced, noPrepare);
    } else {
      console.log(`  PgBouncer skipped: ${noBouncer}`);
    }
    console.log();
  }
} finally {
  await bouncer?.stop();
  await cluster.stop();
}
