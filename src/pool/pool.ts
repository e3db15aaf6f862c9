/**
 * The connection pool. Autocommit queries share connections and are pipelined (many in
 * flight on one session), which is how a client on a small machine reaches the server's
 * limit; transactions and `acquire()` lease a connection of their own. A statement known to
 * be slow is kept off the connections that carry fast ones, and a connection whose head
 * query stalls gets no new work, so slow queries do not hold fast ones behind them.
 *
 * @module
 */

import {
  type DatabaseConfig,
  describeTarget,
  poolKey,
  resolveConfig,
  type ResolvedConfig,
} from "../config.ts";
import type { Driver, DriverConnection, DriverResult, RunningQuery } from "../drivers/driver.ts";
import { ConnectionError, PoolError, QueryError, TimeoutError } from "../errors.ts";
import { createPostgresDriver } from "../drivers/postgres.ts";
import { ReplicaSet, type ReplicaStats } from "./replicas.ts";

export type { ReplicaStats };

/** Per-call options of every query method. */
export interface QueryOptions {
  /**
   * Reject with {@link TimeoutError} after this many milliseconds from the call, and cancel
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

/** Live statistics of a pool. */
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
 * A shared connection pool, made by {@link createSharedPool}. Managers over it
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
  /** Streams COPY text to the leased connection. */
  copyIn(sql: string, chunks: AsyncIterable<string>): Promise<number>;
  /** Returns the connection; `discard` closes it instead (its state is unknown). */
  release(discard?: boolean): void;
}

/** A head query this long without progress marks its connection stalled for new work. */
const STALL_MS = 10;
/** A statement averaging longer than this is slow: it gets a connection of its own. */
const SLOW_MS = 20;
/** The most statements in flight on one shared connection. */
const PIPELINE_LIMIT = 250;
/** How often deadlines, hung cancels, idle and old connections are checked. */
const TICK_MS = 250;
/**
 * How long a statement may go on after its cancel request was delivered before its session
 * is ended (a pooler that lost the statement, a network that drops the answer).
 */
const CANCEL_GRACE_MS = 1000;
/** How often a statement failed by another statement's cancel is run again. */
const MAX_CANCEL_RETRIES = 3;
const MAX_TRACKED_STATEMENTS = 5000;
const WAIT_WINDOW = 1024;
/** A `SET` (not `SET LOCAL`) or `set_config(…, false)`: state of the session. */
const SESSION_SET = /^\s*set\s+(?!local\b)|set_config\s*\([^)]*,\s*false\s*\)/i;
/** Statements that may commit part of their work before a cancel stops them. */
const COMMITS_INSIDE = /^\s*(?:call|do)\b|;\s*(?:commit|end|begin|start|rollback|savepoint)\b/i;

/** One open connection and what runs on it. */
interface Slot {
  conn: DriverConnection;
  /** Statements sent and not yet settled, in the order they were sent. */
  running: Set<InFlight>;
  prepared: Set<string>;
  slowRunning: number;
  leased: boolean;
  /** Takes no new shared work, so that it comes free for a waiting transaction. */
  draining: boolean;
  /** Takes no new work of any kind and is closed once its work is done. */
  retiring: boolean;
  /**
   * Cancels requested on this connection that have not yet taken effect (the request not
   * delivered, or its target not settled). While above 0 the connection gets no new work,
   * so a late cancel can only reach statements that were already in flight.
   */
  cancelling: number;
  /** Settles when `cancelling` is back to 0 (for the next statement of a lease). */
  cancelsDone?: Promise<void>;
  endCancels?: () => void;
  queries: number;
  createdAt: number;
  lastUsed: number;
  lastProgress: number;
}

/** One statement sent on a slot. */
interface InFlight {
  running: RunningQuery;
  sql: string;
  /** When the pool's tick cancels it (`commandTimeoutMs`); `Infinity` when its call has its own timer. */
  deadline: number;
  slow: boolean;
  start: number;
  /** What its caller gets once it was cancelled (a timeout or the abort reason). */
  cancelError?: unknown;
  /** When the cancel request reached the server. */
  cancelSentAt?: number;
  /** A cancel aimed at another statement on its connection was requested while it ran. */
  exposed: boolean;
}

/**
 * The timeout and abort signal of one call, armed when the call is made. When it fires the
 * caller's promise rejects at once; `onFire` takes the work out of the queue or cancels it.
 */
interface CallGuard {
  fired?: unknown;
  onFire?: () => void;
}

interface StatementTiming {
  avg: number;
  seen: number;
  slow: boolean;
}

interface Waiter {
  exclusive: boolean;
  /** Takes the slot synchronously, so the next waiter already sees it busy. */
  take: (slot: Slot) => void;
  reject: (error: unknown) => void;
  timer: TimerId;
}

type TimerId = ReturnType<typeof setTimeout>;

const openPools = new Map<string, number>();

/**
 * Opens a pool to share among managers: one pool, many schema-isolated managers.
 *
 * @param config Connection and pool options ({@link DatabaseConfig}).
 * @returns The pool, with `minConnections` connections open.
 * @throws {ConfigurationError} When an option is invalid.
 * @throws {ConnectionError} When the server cannot be reached after every retry.
 *
 * @example One pool, two services (needs a server)
 * ```ts ignore
 * import { createSharedPool, DatabaseManager } from "@pgdbm/pgdbm";
 * const pool = await createSharedPool({ connectionString: Deno.env.get("DATABASE_URL") });
 * const users = new DatabaseManager({ pool, schema: "users" });
 * const orders = new DatabaseManager({ pool, schema: "orders" });
 * await users.fetchAll("SELECT * FROM {{tables.accounts}}");
 * await pool.close();
 * ```
 */
export async function createSharedPool(config: DatabaseConfig): Promise<Pool> {
  return await ConnectionPool.open(resolveConfig(config));
}

/** The pool implementation; managers reach it through {@link Pool}. */
export class ConnectionPool implements Pool {
  readonly config: ResolvedConfig;
  readonly #driver: Driver;
  readonly #maxSize: number;
  readonly #minSize: number;
  readonly #slots: Slot[] = [];
  readonly #waiters: Waiter[] = [];
  readonly #prepared = new Map<string, string>();
  readonly #durations = new Map<string, StatementTiming>();
  readonly #waits = new Float64Array(WAIT_WINDOW);
  #waitCount = 0;
  #queries = 0;
  #errors = 0;
  #replicas?: ReplicaSet;
  #opening = 0;
  #turnAt = 0;
  #turnProbe = false;
  #closed = false;
  #closing?: Promise<void>;
  #drained?: () => void;
  #ticker: TimerId;

  private constructor(config: ResolvedConfig, driver: Driver) {
    this.config = config;
    this.#driver = driver;
    this.#maxSize = Math.min(config.maxConnections, driver.maxSessions);
    this.#minSize = Math.min(config.minConnections, this.#maxSize);
    this.#ticker = setInterval(() => this.#tick(), TICK_MS);
    Deno.unrefTimer(this.#ticker as unknown as number);
  }

  /** Opens a pool for a resolved configuration, with its floor of connections. */
  static async open(config: ResolvedConfig): Promise<ConnectionPool> {
    if (!config.prepare && config.initCommands.some((command) => SESSION_SET.test(command))) {
      config.logger.warn(
        "pgdbm: 'initCommands' sets session state, and 'prepare: false' suggests a pooler in " +
          "transaction mode (PgBouncer), where such a SET reaches one server connection once " +
          "and other transactions run without it. Set it on the server instead (ALTER ROLE … " +
          "SET), or with 'serverSettings' through a direct connection",
      );
    }
    const driver = config.kind === "embedded"
      ? (await import("../drivers/pglite.ts")).createPgliteDriver({
        dataDir: config.embeddedDataDir,
        serverSettings: config.serverSettings,
      })
      : createPostgresDriver(config);
    const pool = new ConnectionPool(config, driver);
    const key = poolKey(config);
    openPools.set(key, (openPools.get(key) ?? 0) + 1);
    try {
      await pool.#openSlot();
      await Promise.all(Array.from({ length: pool.#minSize - 1 }, () => pool.#openSlot()));
      if (config.replicas.length > 0) {
        pool.#replicas = new ReplicaSet(
          config,
          (replica) =>
            ConnectionPool.open({ ...replica, retry: { ...replica.retry, attempts: 1 } }),
        );
        // Reads right after opening go to the replicas that answer (one attempt each; a
        // replica that is down does not fail the pool, it is tried again later).
        await pool.#replicas.ready;
      }
    } catch (error) {
      await pool.close();
      throw error;
    }
    return pool;
  }

  /** How many pools are open to the target of `config` in this process. */
  static openCount(config: ResolvedConfig): number {
    return openPools.get(poolKey(config)) ?? 0;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** The pid and server version of one open connection (for statistics). */
  get server(): { pid: number; version: string } | undefined {
    const slot = this.#slots[0];
    return slot && { pid: slot.conn.pid, version: slot.conn.serverVersion };
  }

  getStats(): PoolStats {
    let idle = 0;
    for (const slot of this.#slots) if (!slot.leased && slot.running.size === 0) idle++;
    return {
      status: this.#closed ? "closed" : "connected",
      minSize: this.#minSize,
      maxSize: this.#maxSize,
      size: this.#slots.length,
      idle,
      used: this.#slots.length - idle,
      waiting: this.#waiters.length,
      queries: this.#queries,
      errors: this.#errors,
      acquireWaitMs: this.#waitPercentiles(),
      replicas: this.#replicas?.stats() ?? [],
    };
  }

  #waitPercentiles(): WaitPercentiles {
    const n = Math.min(this.#waitCount, WAIT_WINDOW);
    if (n === 0) return { p50: 0, p99: 0 };
    const sorted = this.#waits.slice(0, n).sort();
    // Nearest rank: the smallest value with at least p of the samples at or below it.
    return { p50: sorted[Math.ceil(n * 0.5) - 1], p99: sorted[Math.ceil(n * 0.99) - 1] };
  }

  #recordWait(ms: number): void {
    this.#waits[this.#waitCount++ % WAIT_WINDOW] = ms;
  }

  /**
   * Runs a read: on a healthy replica when the pool has replicas (unless
   * `options.primary`), else like {@link query}.
   */
  read(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    if (this.#replicas === undefined || options?.primary === true) {
      return this.query(sql, params, options);
    }
    if (this.#closed) return Promise.reject(this.#closedError());
    return this.#replicas.read(this, sql, params, options);
  }

  /**
   * Runs one autocommit statement on a shared connection, pipelined with others. With
   * `prepare: false` (PgBouncer in transaction mode) a statement with parameters gets a
   * connection with nothing else in flight: postgres.js sends it as Parse/Describe/Flush
   * before its Sync, and PgBouncer up to 1.20 hands the server connection to another client
   * once the Sync of an earlier statement is answered, which loses the answer.
   */
  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    if (this.#closed) return Promise.reject(this.#closedError());
    if (!this.config.prepare && params.length > 0) {
      return this.#guarded(options, (guard) => this.#queryAlone(sql, params, guard));
    }
    if (options?.timeoutMs === undefined && options?.signal === undefined) {
      return this.#dispatch(sql, params, undefined, 0);
    }
    return this.#guarded(options, (guard) => this.#dispatch(sql, params, guard, 0));
  }

  /** Sends a statement to a shared connection, or queues it until one is free. */
  #dispatch(
    sql: string,
    params: readonly unknown[],
    guard: CallGuard | undefined,
    retries: number,
  ): Promise<DriverResult> {
    const slow = this.#durations.get(sql)?.slow === true;
    const slot = slow ? this.#pickQuiet() : this.#pickShared();
    if (slot !== undefined) return this.#run(slot, sql, params, guard, slow, retries);
    const start = performance.now();
    return this.#wait(false, guard, (waited) => {
      this.#recordWait(performance.now() - start);
      return this.#run(waited, sql, params, guard, slow, retries);
    });
  }

  async #queryAlone(
    sql: string,
    params: readonly unknown[],
    guard: CallGuard,
  ): Promise<DriverResult> {
    const slot = await this.#leaseSlot(guard);
    try {
      return await this.#run(slot, sql, params, guard, false, MAX_CANCEL_RETRIES);
    } finally {
      this.release(slot, false);
    }
  }

  /**
   * Arms a call's timeout (`timeoutMs`, else `commandTimeoutMs`) and abort signal around
   * `work`. The caller's promise rejects as soon as either fires: with a
   * {@link TimeoutError} naming the limit, or with the signal's reason (as `fetch` does).
   * The work itself is taken out of the queue or cancelled on the server, and its outcome
   * is dropped.
   */
  #guarded(
    options: QueryOptions | undefined,
    work: (guard: CallGuard) => Promise<DriverResult>,
  ): Promise<DriverResult> {
    const signal = options?.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    const limitMs = options?.timeoutMs ?? this.config.commandTimeoutMs;
    return new Promise<DriverResult>((resolve, reject) => {
      const guard: CallGuard = {};
      const fire = (error: unknown) => {
        if (guard.fired !== undefined) return;
        guard.fired = error;
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        reject(error);
        guard.onFire?.();
      };
      const onAbort = () => fire(signal!.reason);
      const timer = setTimeout(() => fire(timeoutError(limitMs)), limitMs);
      signal?.addEventListener("abort", onAbort, { once: true });
      work(guard).then((result) => {
        if (guard.fired !== undefined) return;
        guard.fired = null;
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        resolve(result);
      }, (error) => fire(error));
    });
  }

  /** Leases a connection for a transaction or `acquire()`. */
  async lease(): Promise<Lease> {
    if (this.#closed) throw this.#closedError();
    return new SlotLease(this, await this.#leaseSlot(undefined));
  }

  async #leaseSlot(guard: CallGuard | undefined): Promise<Slot> {
    const slot = this.#pickIdle();
    if (slot !== undefined) {
      this.#recordWait(0);
      return slot;
    }
    const start = performance.now();
    const waited = await this.#wait(true, guard, (taken) => taken);
    this.#recordWait(performance.now() - start);
    return waited;
  }

  /** Prepares `sql` as `name` on every open connection and every future one. */
  async addPreparedStatement(name: string, sql: string): Promise<void> {
    this.#prepared.set(name, sql);
    const statement = prepareStatement(name, sql);
    await Promise.all(
      this.#slots.filter((slot) => !slot.leased).map((slot) => {
        slot.prepared.add(name);
        return this.#run(slot, statement, [], undefined, false, 0);
      }),
    );
  }

  close(): Promise<void> {
    if (this.#closing) return this.#closing;
    this.#closed = true;
    for (const waiter of this.#waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.reject(this.#closedError());
    }
    this.#closing = (async () => {
      if (this.#slots.some((slot) => slot.leased || slot.running.size > 0)) {
        await new Promise<void>((resolve) => this.#drained = resolve);
      }
      clearInterval(this.#ticker);
      await this.#replicas?.close();
      await Promise.all(this.#slots.splice(0).map((slot) => slot.conn.close()));
      await this.#driver.close();
      const key = poolKey(this.config);
      const count = (openPools.get(key) ?? 1) - 1;
      if (count > 0) openPools.set(key, count);
      else openPools.delete(key);
    })();
    return this.#closing;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /**
   * Runs a statement on a leased slot, with timeout, abort and bookkeeping. While a cancel
   * on the slot has not yet taken effect, the statement waits, so the cancel cannot stop it.
   */
  run(
    slot: Slot,
    sql: string,
    params: readonly unknown[],
    options: QueryOptions | undefined,
  ): Promise<DriverResult> {
    const work = (guard: CallGuard | undefined) =>
      slot.cancelsDone === undefined
        ? this.#run(slot, sql, params, guard, false, 0)
        : slot.cancelsDone.then(() => this.#run(slot, sql, params, guard, false, 0));
    if (options?.timeoutMs === undefined && options?.signal === undefined) return work(undefined);
    return this.#guarded(options, work);
  }

  /** Streams COPY text on a leased slot. */
  async copyIn(slot: Slot, sql: string, chunks: AsyncIterable<string>): Promise<number> {
    const entry: InFlight = {
      running: { result: Promise.resolve(EMPTY), cancel: () => Promise.resolve() },
      sql,
      deadline: Infinity,
      slow: true,
      start: performance.now(),
      exposed: false,
    };
    slot.running.add(entry);
    try {
      return await slot.conn.copyIn(sql, chunks);
    } finally {
      this.#settle(slot, entry);
    }
  }

  /** Returns a leased slot, preparing the statements added while it was leased. */
  release(slot: Slot, discard: boolean): void {
    slot.leased = false;
    if (discard || slot.conn.closed) slot.retiring = true;
    else this.#prepareMissing(slot);
    this.#afterWork(slot);
  }

  #prepareMissing(slot: Slot): void {
    if (slot.prepared.size === this.#prepared.size) return;
    for (const [name, sql] of this.#prepared) {
      if (slot.prepared.has(name)) continue;
      slot.prepared.add(name);
      this.#run(slot, prepareStatement(name, sql), [], undefined, false, 0).catch(() => {});
    }
  }

  /** Sends a statement on a slot and keeps the books until it settles. */
  #run(
    slot: Slot,
    sql: string,
    params: readonly unknown[],
    guard: CallGuard | undefined,
    slow: boolean,
    retries: number,
  ): Promise<DriverResult> {
    if (guard?.fired !== undefined) return Promise.reject(guard.fired);
    const start = performance.now();
    const running = slot.conn.query(sql, params, this.config.prepare);
    const entry: InFlight = {
      running,
      sql,
      deadline: guard === undefined ? start + this.config.commandTimeoutMs : Infinity,
      slow,
      start,
      exposed: false,
    };
    if (slot.running.size === 0) slot.lastProgress = start;
    slot.running.add(entry);
    if (slow) slot.slowRunning++;
    this.#queries++;
    if (guard !== undefined) guard.onFire = () => this.#cancel(slot, entry, guard.fired);
    return running.result.then(
      (result) => {
        this.#settle(slot, entry);
        return result;
      },
      (error) => {
        this.#settle(slot, entry);
        return this.#recover(slot, entry, error, params, guard, retries);
      },
    );
  }

  /**
   * Decides what a failed statement's caller gets. A statement the pool cancelled gets its
   * cancel's error. A shared autocommit statement stopped by a cancel aimed at another
   * statement on its connection did nothing, so it runs again. A cancel by the server's
   * own `statement_timeout` is a {@link TimeoutError}.
   */
  #recover(
    slot: Slot,
    entry: InFlight,
    error: unknown,
    params: readonly unknown[],
    guard: CallGuard | undefined,
    retries: number,
  ): Promise<DriverResult> {
    if (entry.cancelError !== undefined) throw entry.cancelError;
    const cancelled = error instanceof QueryError && error.sqlstate === "57014";
    if (
      cancelled && entry.exposed && !slot.leased && retries < MAX_CANCEL_RETRIES &&
      guard?.fired === undefined && !COMMITS_INSIDE.test(entry.sql)
    ) {
      return this.#dispatch(entry.sql, params, guard, retries + 1);
    }
    this.#errors++;
    if (cancelled && !isUserCancel(error)) throw this.#statementTimeoutError(error);
    throw error;
  }

  #statementTimeoutError(error: QueryError): TimeoutError {
    const limitMs = this.config.serverSettings.statement_timeout === undefined
      ? undefined
      : parseDurationMs(this.config.serverSettings.statement_timeout);
    return new TimeoutError(
      `Cannot finish the query: the server cancelled it after its statement_timeout` +
        `${limitMs === undefined ? "" : ` (${limitMs} ms)`}; raise statementTimeoutMs ` +
        "(or the statement_timeout set on the server) or make the query faster",
      limitMs,
      { cause: error, sqlstate: error.sqlstate },
    );
  }

  /**
   * Cancels one statement: its caller gets `error`, and the driver takes it out of its
   * queue or asks the server to stop it once it is the statement the session runs. Until
   * the cancel has taken effect the connection gets no new work; statements already in
   * flight on it are marked exposed, so one the cancel reaches instead runs again.
   */
  #cancel(slot: Slot, entry: InFlight, error: unknown): void {
    if (entry.cancelError !== undefined || !slot.running.has(entry)) return;
    entry.cancelError = error;
    for (const other of slot.running) if (other !== entry) other.exposed = true;
    if (slot.cancelling++ === 0) {
      slot.cancelsDone = new Promise<void>((resolve) => slot.endCancels = resolve);
    }
    const delivered = entry.running.cancel().then(() => {
      entry.cancelSentAt = performance.now();
    });
    const settled = entry.running.result.then(() => {}, () => {});
    Promise.all([delivered, settled]).then(() => {
      if (--slot.cancelling > 0) return;
      slot.cancelsDone = undefined;
      slot.endCancels!();
      if (slot.running.size === 0 && !slot.leased) this.#afterWork(slot);
      else if (this.#waiters.length > 0) this.#serveWaiters();
    });
  }

  #settle(slot: Slot, entry: InFlight): void {
    if (!slot.running.delete(entry)) return;
    const now = performance.now();
    const serviceMs = now - Math.max(entry.start, slot.lastProgress);
    slot.lastProgress = now;
    slot.lastUsed = now;
    if (++slot.queries >= this.config.maxQueries) slot.retiring = true;
    if (entry.slow) slot.slowRunning--;
    if (entry.cancelError === undefined) this.#learn(entry.sql, serviceMs);
    if (slot.running.size === 0 && !slot.leased) this.#afterWork(slot);
  }

  /**
   * Remembers statements that ran slowly (twice or more) so they get a quiet connection.
   * When a statement turns slow, the copies of it already queued count as slow too, so
   * fast queries stop joining the queues they are in (a burst of a new slow statement
   * would otherwise hold them).
   */
  #learn(sql: string, ms: number): void {
    const known = this.#durations.get(sql);
    if (known !== undefined) {
      const wasSlow = known.slow;
      known.avg = known.avg * 0.7 + ms * 0.3;
      known.seen++;
      known.slow = known.avg > SLOW_MS && known.seen >= 2;
      if (known.slow && !wasSlow) this.#markQueuedSlow(sql);
      return;
    }
    if (ms < SLOW_MS) return;
    if (this.#durations.size >= MAX_TRACKED_STATEMENTS) {
      this.#durations.delete(this.#durations.keys().next().value!);
    }
    this.#durations.set(sql, { avg: ms, seen: 1, slow: false });
  }

  #markQueuedSlow(sql: string): void {
    for (const slot of this.#slots) {
      for (const entry of slot.running) {
        if (entry.sql === sql && !entry.slow) {
          entry.slow = true;
          slot.slowRunning++;
        }
      }
    }
  }

  /** A slot became free of work: recycle it, hand it to a waiter, or finish closing. */
  #afterWork(slot: Slot): void {
    const old = slot.queries >= this.config.maxQueries ||
      performance.now() - slot.createdAt >= this.config.maxLifetimeMs;
    if (slot.retiring || old || slot.conn.closed) {
      this.#remove(slot);
    } else if (this.#waiters.length > 0) {
      this.#serveWaiters();
    }
    if (this.#closed && this.#drained !== undefined) {
      if (!this.#slots.some((s) => s.leased || s.running.size > 0)) this.#drained();
    }
  }

  #pickShared(): Slot | undefined {
    const now = performance.now();
    let fallback: Slot | undefined;
    for (const slot of this.#slots) {
      if (!available(slot) || slot.slowRunning > 0) continue;
      const n = slot.running.size;
      if (n === 0) return slot;
      if (n < PIPELINE_LIMIT && !this.#stalled(slot, now)) return slot;
      if (fallback === undefined || n < fallback.running.size) fallback = slot;
    }
    this.#grow();
    return fallback ?? this.#pickAny();
  }

  /**
   * A slot is stalled when it made no progress for STALL_MS although the event loop has
   * turned since (a burst dispatched in one synchronous run is not a stall).
   */
  #stalled(slot: Slot, now: number): boolean {
    if (now - slot.lastProgress < STALL_MS) return false;
    if (this.#turnAt > slot.lastProgress + STALL_MS) return true;
    if (!this.#turnProbe) {
      this.#turnProbe = true;
      setTimeout(() => {
        this.#turnProbe = false;
        this.#turnAt = performance.now();
      }, 0);
    }
    return false;
  }

  #pickQuiet(): Slot | undefined {
    for (let i = this.#slots.length - 1; i >= 0; i--) {
      const slot = this.#slots[i];
      if (available(slot) && slot.running.size === 0) return slot;
    }
    this.#grow();
    for (let i = this.#slots.length - 1; i >= 0; i--) {
      const slot = this.#slots[i];
      if (available(slot) && slot.slowRunning > 0) return slot;
    }
    return this.#pickAny();
  }

  #pickAny(): Slot | undefined {
    let best: Slot | undefined;
    for (const slot of this.#slots) {
      if (!available(slot)) continue;
      if (best === undefined || slot.running.size < best.running.size) best = slot;
    }
    return best;
  }

  #pickIdle(): Slot | undefined {
    for (let i = this.#slots.length - 1; i >= 0; i--) {
      const slot = this.#slots[i];
      if (
        !slot.leased && !slot.retiring && slot.cancelling === 0 && !slot.conn.closed &&
        slot.running.size === 0
      ) {
        slot.leased = true;
        slot.draining = false;
        return slot;
      }
    }
    return undefined;
  }

  /**
   * Queues a caller until a slot is free: `take` runs synchronously when one is (it
   * registers the caller's work on the slot before the next waiter is served). A fired
   * guard takes the caller out of the queue.
   */
  #wait<T>(
    exclusive: boolean,
    guard: CallGuard | undefined,
    take: (slot: Slot) => T | Promise<T>,
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const leave = () => {
        const index = this.#waiters.indexOf(waiter);
        if (index >= 0) this.#waiters.splice(index, 1);
        clearTimeout(waiter.timer);
        if (!this.#waiters.some((w) => w.exclusive)) {
          for (const slot of this.#slots) slot.draining = false;
        }
      };
      const waiter: Waiter = {
        exclusive,
        take: (slot) => {
          try {
            resolve(take(slot));
          } catch (error) {
            reject(error);
          }
        },
        reject,
        timer: setTimeout(() => {
          leave();
          reject(
            new PoolError(
              `Cannot get a connection: all ${this.#maxSize} are busy and none came free within ` +
                `acquireTimeoutMs (${this.config.acquireTimeoutMs} ms); raise maxConnections, ` +
                "shorten transactions, or do not run pool queries inside a transaction callback",
              "POOL_EXHAUSTED",
            ),
          );
        }, this.config.acquireTimeoutMs),
      };
      if (guard !== undefined) {
        guard.onFire = () => {
          leave();
          reject(guard.fired);
        };
      }
      this.#waiters.push(waiter);
      if (!this.#grow() && exclusive) this.#drainOne();
    });
  }

  /** Marks the least busy shared slot so it takes no new queries and goes to a waiter. */
  #drainOne(): void {
    if (this.#slots.some((slot) => slot.draining)) return;
    let best: Slot | undefined;
    for (const slot of this.#slots) {
      if (slot.leased || slot.retiring) continue;
      if (best === undefined || slot.running.size < best.running.size) best = slot;
    }
    if (best !== undefined) best.draining = true;
  }

  #serveWaiters(): void {
    while (this.#waiters.length > 0) {
      const waiter = this.#waiters[0];
      const slot = waiter.exclusive ? this.#pickIdle() : this.#pickAny();
      if (slot === undefined) {
        if (waiter.exclusive) this.#drainOne();
        return;
      }
      this.#waiters.shift();
      clearTimeout(waiter.timer);
      waiter.take(slot);
    }
  }

  /** Opens one more connection in the background when below the cap. */
  #grow(): boolean {
    if (this.#closed || this.#slots.length + this.#opening >= this.#maxSize) return false;
    this.#openSlot().catch((error) => {
      if (this.#slots.length === 0) {
        for (const waiter of this.#waiters.splice(0)) {
          clearTimeout(waiter.timer);
          waiter.reject(error);
        }
      }
    });
    return true;
  }

  async #openSlot(): Promise<void> {
    this.#opening++;
    try {
      const conn = await this.#connectWithRetry();
      if (this.#closed) {
        await conn.close();
        return;
      }
      const now = performance.now();
      const slot: Slot = {
        conn,
        running: new Set(),
        prepared: new Set(this.#prepared.keys()),
        slowRunning: 0,
        leased: false,
        draining: false,
        retiring: false,
        cancelling: 0,
        queries: 0,
        createdAt: now,
        lastUsed: now,
        lastProgress: now,
      };
      conn.onClose(() => {
        if (!slot.leased && slot.running.size === 0) this.#remove(slot);
        else slot.retiring = true;
      });
      this.#slots.push(slot);
      this.#serveWaiters();
    } finally {
      this.#opening--;
    }
  }

  async #connectWithRetry(): Promise<DriverConnection> {
    const { attempts, delayMs, backoff, maxDelayMs } = this.config.retry;
    let delay = delayMs;
    let lastError: unknown;
    let made = 0;
    for (let attempt = 1; attempt <= attempts; attempt++) {
      made = attempt;
      try {
        const conn = await this.#driver.connect();
        try {
          for (const command of this.config.initCommands) {
            await conn.query(command, [], false).result;
          }
          for (const [name, sql] of this.#prepared) {
            await conn.query(prepareStatement(name, sql), [], false).result;
          }
        } catch (error) {
          await conn.close();
          throw error;
        }
        return conn;
      } catch (error) {
        lastError = error;
        if (!isRetryable(error) || this.#closed) break;
        if (attempt < attempts) {
          await new Promise((resolve) => setTimeout(resolve, delay));
          delay = Math.min(delay * backoff, maxDelayMs);
        }
      }
    }
    const reason = lastError instanceof Error ? lastError.message : String(lastError);
    throw new ConnectionError(
      this.config,
      made,
      `Cannot connect to ${describeTarget(this.config)} (${made} attempt${made === 1 ? "" : "s"}` +
        `${isRetryable(lastError) ? "" : "; not retried, retrying cannot help"}): ${reason}. ` +
        "Check that the server is running and that the host, port, database, user and password " +
        "are right",
      { cause: lastError },
    );
  }

  #remove(slot: Slot): void {
    const index = this.#slots.indexOf(slot);
    if (index < 0) return;
    this.#slots.splice(index, 1);
    slot.conn.close().catch(() => {});
    if (!this.#closed && this.#slots.length + this.#opening < Math.max(this.#minSize, 1)) {
      this.#grow();
    } else if (this.#waiters.length > 0) {
      this.#grow();
    }
  }

  #tick(): void {
    const now = performance.now();
    for (const slot of [...this.#slots]) {
      let hung = false;
      for (const entry of slot.running) {
        if (entry.cancelError === undefined) {
          if (now > entry.deadline) {
            this.#cancel(slot, entry, timeoutError(this.config.commandTimeoutMs));
          }
        } else if (
          entry.cancelSentAt !== undefined && now - entry.cancelSentAt > CANCEL_GRACE_MS
        ) {
          hung = true;
        }
      }
      // The cancel request changed nothing (a pooler that lost the query, a dead network):
      // end the session, so that its statements reject instead of hanging forever.
      if (hung) {
        slot.retiring = true;
        slot.conn.terminate();
      }
    }
    const idleLimit = now - this.config.idleTimeoutMs;
    for (const slot of [...this.#slots]) {
      const old = now - slot.createdAt >= this.config.maxLifetimeMs;
      if (slot.leased || slot.running.size > 0) {
        if (old) slot.retiring = true;
        continue;
      }
      if (old || (slot.lastUsed < idleLimit && this.#slots.length > this.#minSize)) {
        this.#remove(slot);
      }
    }
  }

  #closedError(): PoolError {
    return new PoolError(
      "Cannot run the query: the pool is closed; create a new pool (or call connect()) first",
      "POOL_CLOSED",
    );
  }
}

class SlotLease implements Lease {
  readonly #pool: ConnectionPool;
  readonly #slot: Slot;
  #released = false;

  constructor(pool: ConnectionPool, slot: Slot) {
    this.#pool = pool;
    this.#slot = slot;
  }

  get config(): ResolvedConfig {
    return this.#pool.config;
  }

  get pid(): number {
    return this.#slot.conn.pid;
  }

  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    if (this.#released) return Promise.reject(releasedError());
    return this.#pool.run(this.#slot, sql, params, options);
  }

  copyIn(sql: string, chunks: AsyncIterable<string>): Promise<number> {
    if (this.#released) return Promise.reject(releasedError());
    return this.#pool.copyIn(this.#slot, sql, chunks);
  }

  release(discard = false): void {
    if (this.#released) return;
    this.#released = true;
    this.#pool.release(this.#slot, discard);
  }
}

const EMPTY: DriverResult = { rows: [], command: "", rowCount: 0 };

function prepareStatement(name: string, sql: string): string {
  return `PREPARE "${name}" AS ${sql}`;
}

/** Whether opening a connection may succeed when tried again (not bad credentials or SQL). */
function isRetryable(error: unknown): boolean {
  if (!(error instanceof QueryError)) return true;
  const state = error.sqlstate ?? "";
  return state === "" || state.startsWith("08") || state.startsWith("57P");
}

function timeoutError(ms: number): TimeoutError {
  return new TimeoutError(
    `Cannot finish the query within ${ms} ms: it was cancelled on the server; ` +
      "raise timeoutMs (or commandTimeoutMs) or make the query faster",
    ms,
  );
}

/** Whether a slot may take new work (shared or leased). */
function available(slot: Slot): boolean {
  return !slot.leased && !slot.draining && !slot.retiring && slot.cancelling === 0 &&
    !slot.conn.closed;
}

/**
 * Whether a 57014 came from a cancel request (`pg_cancel_backend`, another client) rather
 * than from the server's `statement_timeout`. The server's English message says so; with
 * another `lc_messages` every 57014 pgdbm did not cause counts as a statement timeout.
 */
function isUserCancel(error: QueryError): boolean {
  return error.message.includes("user request");
}

/** A PostgreSQL duration setting (`"5000"`, `"5s"`, `"1min"`) in milliseconds; 0 is none. */
function parseDurationMs(setting: string): number | undefined {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*$/.exec(setting);
  if (match === null) return undefined;
  const scale: Record<string, number> = {
    us: 0.001,
    ms: 1,
    s: 1000,
    min: 60_000,
    h: 3_600_000,
    d: 86_400_000,
  };
  const ms = Number(match[1]) * scale[match[2] ?? "ms"];
  return ms > 0 ? ms : undefined;
}

function releasedError(): PoolError {
  return new PoolError(
    "Cannot use this connection: its transaction or acquire() callback has already finished; " +
      "run queries only inside the callback",
  );
}
