/**
 * Read replicas: reads go round robin to the replicas that are up and not lagging; a read a
 * replica cannot serve (it is down, or the statement writes) is retried on the primary, so
 * the caller never sees that failure.
 *
 * @module
 */

import type { ResolvedConfig } from "../config.ts";
import { ConnectionError, PoolError, QueryError } from "../errors.ts";
import { isReadStatement } from "../_sql.ts";
import type { QueryOptions, QueryResult, ReadPool, ReplicaStats } from "./types.ts";

interface ReplicaNode {
  config: ResolvedConfig;
  target: string;
  pool?: ReadPool;
  opening: boolean;
  downUntil: number;
  lagMs: number | null;
  queries: number;
  errors: number;
}

const LAG_SQL = "SELECT COALESCE(CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() " +
  "THEN 0 ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000 END, 0) " +
  "AS lag";
const MAX_REMEMBERED_WRITES = 1000;

/** The replicas of one pool. */
export class ReplicaSet {
  readonly #nodes: ReplicaNode[];
  readonly #open: (config: ResolvedConfig) => Promise<ReadPool>;
  readonly #maxLagMs: number | undefined;
  readonly #retryMs: number;
  readonly #writes = new Set<string>();
  readonly #probe: ReturnType<typeof setInterval> | undefined;
  #next = 0;
  #closed = false;
  /** Settles when every replica's first connection attempt (and lag check) has. */
  readonly ready: Promise<void>;

  /**
   * @param primary The primary's configuration, with its replicas.
   * @param open Opens a pool for one replica.
   */
  constructor(primary: ResolvedConfig, open: (config: ResolvedConfig) => Promise<ReadPool>) {
    this.#open = open;
    this.#maxLagMs = primary.maxReplicaLagMs;
    this.#retryMs = primary.replicaRetryMs;
    this.#nodes = primary.replicas.map((config) => ({
      config,
      target: `${config.host}:${config.port}/${config.database}`,
      opening: false,
      downUntil: 0,
      lagMs: null,
      queries: 0,
      errors: 0,
    }));
    this.ready = Promise.all(this.#nodes.map((node) => this.#connect(node))).then(() => {});
    if (this.#maxLagMs !== undefined) {
      const every = Math.min(1000, Math.max(50, this.#maxLagMs / 2));
      this.#probe = setInterval(() => this.#measureAll(), every);
      Deno.unrefTimer(this.#probe as unknown as number);
    }
  }

  /**
   * Runs a read on a healthy replica, or on the primary when none is, when the statement
   * is not a plain read, or when the replica fails for a reason the primary does not have.
   */
  read(
    primary: ReadPool,
    sql: string,
    params: readonly unknown[],
    options: QueryOptions | undefined,
  ): Promise<QueryResult> {
    const node = isReadStatement(sql) && !this.#writes.has(sql) ? this.#pick() : undefined;
    if (node === undefined) return primary.query(sql, params, options);
    return node.pool!.query(sql, params, options).then((result) => {
      node.queries++;
      result.node = "replica";
      return result;
    }, (error) => {
      node.errors++;
      if (isWriteError(error)) {
        if (this.#writes.size >= MAX_REMEMBERED_WRITES) this.#writes.clear();
        this.#writes.add(sql);
      } else if (isNodeFailure(error)) {
        this.#markDown(node);
      } else if (!isRecoveryConflict(error)) {
        throw error;
      }
      return primary.query(sql, params, options);
    });
  }

  /** Statistics per replica. */
  stats(): ReplicaStats[] {
    const now = performance.now();
    return this.#nodes.map((node) => {
      const pool = node.pool?.getStats() ?? { size: 0, idle: 0, used: 0, waiting: 0 };
      return {
        target: node.target,
        healthy: this.#healthy(node, now),
        lagMs: node.lagMs,
        size: pool.size,
        idle: pool.idle,
        used: pool.used,
        waiting: pool.waiting,
        queries: node.queries,
        errors: node.errors,
      };
    });
  }

  /** Stops probing and closes every replica's pool. */
  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#probe);
    await Promise.all(this.#nodes.map((node) => {
      const pool = node.pool;
      node.pool = undefined;
      return pool?.close();
    }));
  }

  #pick(): ReplicaNode | undefined {
    const now = performance.now();
    const count = this.#nodes.length;
    for (let i = 0; i < count; i++) {
      const node = this.#nodes[(this.#next + i) % count];
      if (this.#healthy(node, now)) {
        this.#next = (this.#next + i + 1) % count;
        return node;
      }
      if (node.pool === undefined && now >= node.downUntil) this.#connect(node);
    }
    return undefined;
  }

  #healthy(node: ReplicaNode, now: number): boolean {
    if (node.pool === undefined || node.pool.closed || now < node.downUntil) return false;
    return this.#maxLagMs === undefined || (node.lagMs !== null && node.lagMs <= this.#maxLagMs);
  }

  #connect(node: ReplicaNode): Promise<void> {
    if (node.opening || this.#closed) return Promise.resolve();
    node.opening = true;
    return this.#open(node.config).then(async (pool) => {
      if (this.#closed) return await pool.close();
      node.pool = pool;
      if (this.#maxLagMs !== undefined) await this.#measure(node);
    }).catch(() => this.#markDown(node)).finally(() => node.opening = false);
  }

  #measureAll(): void {
    for (const node of this.#nodes) {
      if (node.pool !== undefined) this.#measure(node).catch(() => this.#markDown(node));
    }
  }

  async #measure(node: ReplicaNode): Promise<void> {
    const { rows } = await node.pool!.query(LAG_SQL, []);
    node.lagMs = Number(rows[0].lag);
  }

  #markDown(node: ReplicaNode): void {
    node.downUntil = performance.now() + this.#retryMs;
    node.lagMs = null;
    const pool = node.pool;
    node.pool = undefined;
    pool?.close().catch(() => {});
  }
}

/** The statement writes, which a replica refuses (`read_only_sql_transaction`). */
function isWriteError(error: unknown): boolean {
  return error instanceof QueryError && error.sqlstate === "25006";
}

/** A replica canceled the read because replay needed what it was reading. */
function isRecoveryConflict(error: unknown): boolean {
  return error instanceof QueryError && error.sqlstate === "40001";
}

/** The replica is down, shutting down, or its pool was closed under the read. */
function isNodeFailure(error: unknown): boolean {
  if (error instanceof ConnectionError) return true;
  if (error instanceof PoolError) return error.code === "POOL_CLOSED";
  if (!(error instanceof QueryError)) return false;
  const state = error.sqlstate ?? "";
  // 08P01 is also the server's answer to a statement's bind with the wrong number of
  // values, on a session that goes on: that is the caller's error, not the replica's.
  if (state === "08P01") return false;
  return state.startsWith("08") || state.startsWith("57P");
}
