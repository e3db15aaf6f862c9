/**
 * The pool's public types, in a leaf module: the pool, its replicas and the manager import
 * them from here, so nothing imports in a circle.
 *
 * @module
 */

import type { ResolvedConfig } from "../config.ts";
import type { DriverConnection, DriverResult } from "../drivers/driver.ts";

/** A statement's result as the pool hands it on. */
export interface QueryResult extends DriverResult {
  /** `"replica"` when a read replica answered. */
  node?: "replica";
}

/** Per-call options of every query method. */
export interface QueryOptions {
  /**
   * Reject with `TimeoutError` after this many milliseconds from the call, and cancel
   * the query (default `commandTimeoutMs`).
   */
  timeoutMs?: number;
  /** Reject with `signal.reason` when this signal aborts, and cancel the query. */
  signal?: AbortSignal;
  /**
   * Send a read to the primary even when the pool has replicas (to read what was just
   * written).
   * @default {false}
   */
  primary?: boolean;
}

/** The connections of one pool, and who waits for one. */
export interface ConnectionCounts {
  /** Open connections. */
  size: number;
  /** Open connections with nothing running and not leased. */
  idle: number;
  /** Open connections running queries or leased to a transaction / `acquire()`. */
  used: number;
  /** Callers waiting for a connection. */
  waiting: number;
}

/** Percentiles of the time callers waited for a connection. */
export interface WaitPercentiles {
  /** Median, in milliseconds. */
  p50: number;
  /** 99th percentile, in milliseconds. */
  p99: number;
}

/**
 * Live statistics of a pool. On a server, `size` and `used` count the listening session of
 * `listen()` while it is open (it is one of `maxConnections`).
 */
export interface PoolStats extends ConnectionCounts {
  /** `connected` until `close()` is called. */
  status: "connected" | "closed";
  /** `minConnections`. */
  minSize: number;
  /** `maxConnections`. */
  maxSize: number;
  /** Statements run since the pool opened (on the primary). */
  queries: number;
  /** Statements that failed since the pool opened (on the primary). */
  errors: number;
  /**
   * Time transactions, `acquire()` calls and queued queries waited for a connection, over
   * the last 1,024 of them.
   */
  acquireWaitMs: WaitPercentiles;
  /** One entry per read replica (empty without `replicas`). */
  replicas: ReplicaStats[];
}

/**
 * A shared connection pool, made by `createSharedPool`. Managers over it
 * (`new DatabaseManager({ pool, schema })`) never close it; its owner does.
 */
export interface Pool {
  /** True once `close()` was called. */
  readonly closed: boolean;
  /** Live statistics. */
  getStats(): PoolStats;
  /** Waits for running queries and transactions, then closes every connection. */
  close(): Promise<void>;
  /** Same as `close()`, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** A connection leased to one transaction or `acquire()` callback. */
export interface Lease {
  /** The configuration of the pool the connection belongs to. */
  readonly config: ResolvedConfig;
  /** The session's server process id. */
  readonly pid: number;
  /** Runs a statement on the leased connection. */
  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult>;
  /** Streams COPY text to the leased connection; aborting `signal` stops the COPY. */
  copyIn(
    sql: string,
    chunks: AsyncIterable<string | Uint8Array>,
    signal?: AbortSignal,
  ): Promise<number>;
  /**
   * Yields a statement's rows in batches from a portal on the leased connection, when its
   * driver has portals (see `DriverConnection.cursor`); nothing else may run on it meanwhile.
   */
  readonly cursor?: DriverConnection["cursor"];
  /** Yields the output of a `COPY … TO STDOUT` on the leased connection; returns its row count. */
  copyOut(sql: string, signal?: AbortSignal): AsyncGenerator<Uint8Array, number>;
  /** Returns the connection; `discard` closes it instead (its state is unknown). */
  release(discard?: boolean): void;
}

/** Statistics of one replica. */
export interface ReplicaStats extends ConnectionCounts {
  /** `host:port/database`. */
  target: string;
  /** Open, answering, and within `maxReplicaLagMs`. */
  healthy: boolean;
  /** Replay lag last measured, or `null` when not measured. */
  lagMs: number | null;
  /** Reads it answered. */
  queries: number;
  /** Reads that failed on it (those retried on the primary included). */
  errors: number;
}

/** What a replica set needs of a pool (the primary's and each replica's). */
export interface ReadPool {
  readonly closed: boolean;
  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<QueryResult>;
  getStats(): ConnectionCounts;
  close(): Promise<void>;
}
