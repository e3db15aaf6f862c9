/**
 * The connection pool. Autocommit queries share connections and are pipelined (many in
 * flight on one session), which is how a client on a small machine reaches the server's
 * limit; transactions and `acquire()` lease a connection of their own. A statement known to
 * be slow is kept off the connections that carry fast ones, and a connection whose head
 * query stalls gets no new work, so slow queries do not hold fast ones behind them.
 *
 * @module
 */

import { type DatabaseConfig, poolKey, resolveConfig, type ResolvedConfig } from "../config.ts";
import type {
  Driver,
  DriverConnection,
  DriverResult,
  NotificationListener,
  Row,
} from "../drivers/driver.ts";
import { createDriver } from "../drivers/mod.ts";
import { PoolError } from "../errors.ts";
import { setsSessionState } from "../_sql.ts";
import {
  type CallGuard,
  CANCEL_GRACE_MS,
  cancelInFlight,
  guarded,
  MAX_CANCEL_RETRIES,
  statementTimeoutError,
  strayCancelVictim,
  timeoutError,
} from "./_cancel.ts";
import { connectWithRetry, prepareStatement } from "./_connect.ts";
import { Listener, type ListenSession } from "./_listener.ts";
import {
  type ListenOptions,
  type NotificationHandler,
  quoteChannel,
  type Subscription,
} from "../listen.ts";
import { available, type InFlight, openedSlot, type Slot } from "./_slot.ts";
import { StatementTimings } from "./_statement_timings.ts";
import { ReplicaSet } from "./replicas.ts";
import type {
  Lease,
  Pool,
  PoolStats,
  QueryOptions,
  QueryResult,
  WaitPercentiles,
} from "./types.ts";

export type * from "./types.ts";

/**
 * A head statement this long without progress marks its connection stalled: new work goes
 * elsewhere. A point read takes well under a millisecond, so 10 ms is a stall, not a queue.
 */
const STALL_MS = 10;
/**
 * The most statements in flight on one shared connection. More adds latency without adding
 * throughput.
 */
const PIPELINE_LIMIT = 250;
/**
 * How often deadlines (`commandTimeoutMs`), hung cancels, idle and old connections are
 * checked: the precision of `commandTimeoutMs` and of idle closing.
 */
const TICK_MS = 250;
/** Wait times kept for the `acquireWaitMs` percentiles. */
const WAIT_WINDOW = 1024;

/** A caller queued for a connection. */
interface Waiter {
  /** Wants a connection of its own (a transaction, `acquire()`). */
  exclusive: boolean;
  /** Takes the slot synchronously, so the next waiter already sees it busy. */
  take: (slot: Slot) => void;
  /** Fails the wait (`acquireTimeoutMs`, a closed pool, a fired guard). */
  reject: (error: unknown) => void;
  /** The `acquireTimeoutMs` timer. */
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
  readonly #timings = new StatementTimings();
  readonly #waits = new Float64Array(WAIT_WINDOW);
  #waitCount = 0;
  #queries = 0;
  #errors = 0;
  #replicas?: ReplicaSet;
  #listener?: Listener;
  /** Where the sessions of a one-session driver hand their notifications. */
  #sharedNotify?: NotificationListener;
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
    if (!config.prepare && config.initCommands.some(setsSessionState)) {
      config.logger.warn(
        "pgdbm: 'initCommands' sets session state, and 'prepare: false' suggests a pooler in " +
          "transaction mode (PgBouncer), where such a SET reaches one server connection once " +
          "and other transactions run without it. Set it on the server instead (ALTER ROLE … " +
          "SET), or with 'serverSettings' through a direct connection",
      );
    }
    const driver = await createDriver(config);
    const pool = new ConnectionPool(config, driver);
    const key = poolKey(config);
    if (key !== undefined) openPools.set(key, (openPools.get(key) ?? 0) + 1);
    try {
      // The floor opens at once, not one connection after another: connecting is a round
      // trip or three each, and the first query waits for the whole floor.
      await Promise.all(Array.from({ length: Math.max(pool.#minSize, 1) }, () => pool.#openSlot()));
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
    const key = poolKey(config);
    return key === undefined ? 0 : openPools.get(key) ?? 0;
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
    const size = this.#slots.length + this.#listenSeats();
    return {
      status: this.#closed ? "closed" : "connected",
      minSize: this.#minSize,
      maxSize: this.#maxSize,
      size,
      idle,
      used: size - idle,
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
  read(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<QueryResult> {
    if (this.#replicas === undefined || options?.primary === true) {
      return this.query(sql, params, options);
    }
    if (this.#closed) return Promise.reject(this.#closedError());
    return this.#replicas.read(this, sql, params, options);
  }

  /**
   * Runs one autocommit statement on a shared connection, pipelined with others. With
   * `prepare: false` (PgBouncer in transaction mode) a statement with parameters gets a
   * connection with nothing else in flight: the driver sends it as Parse/Describe/Flush
   * before its Sync, and PgBouncer up to 1.20 hands the server connection to another client
   * once the Sync of an earlier statement is answered, which loses the answer.
   */
  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    if (this.#closed) return Promise.reject(this.#closedError());
    if (params.length > 0 && this.#driver.capabilities.parameterizedAlone) {
      return guarded(
        options,
        this.config.commandTimeoutMs,
        (guard) => this.#queryAlone(sql, params, guard),
      );
    }
    if (options?.timeoutMs === undefined && options?.signal === undefined) {
      return this.#dispatch(sql, params, undefined, 0);
    }
    return guarded(
      options,
      this.config.commandTimeoutMs,
      (guard) => this.#dispatch(sql, params, guard, 0),
    );
  }

  /** Sends a statement to a shared connection, or queues it until one is free. */
  #dispatch(
    sql: string,
    params: readonly unknown[],
    guard: CallGuard | undefined,
    retries: number,
  ): Promise<DriverResult> {
    const slow = this.#timings.isSlow(sql);
    const slot = slow ? this.#pickQuiet(sql) : this.#pickShared();
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
      await this.#listener?.close();
      if (this.#slots.some((slot) => slot.leased || slot.running.size > 0)) {
        await new Promise<void>((resolve) => this.#drained = resolve);
      }
      clearInterval(this.#ticker);
      await this.#replicas?.close();
      await Promise.all(this.#slots.splice(0).map((slot) => slot.conn.close()));
      await this.#driver.close();
      const key = poolKey(this.config);
      if (key === undefined) return;
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
   * Subscribes to a channel on the pool's listening session (see `DatabaseManager.listen`).
   * On a server the session is a connection of its own, opened on the first subscription
   * and counted against `maxConnections`; on the embedded engine it is the pool's one
   * session.
   */
  listen(
    channel: string,
    handler: NotificationHandler,
    options: ListenOptions | undefined,
    schema: string | undefined,
  ): Promise<Subscription> {
    if (this.#closed) return Promise.reject(this.#closedError());
    if (!this.#sharesListenSession() && !this.config.prepare) {
      return Promise.reject(
        new PoolError(
          "Cannot listen: this pool has 'prepare: false', pgdbm's setting for a pooler in " +
            "transaction mode (PgBouncer), where LISTEN cannot work (each transaction may run " +
            "on another server connection, and notifications go to none of yours). Open a " +
            "second pool with a direct URL to the server (not through the pooler) for listen()",
        ),
      );
    }
    if (!this.#sharesListenSession() && this.#maxSize < 2) {
      return Promise.reject(
        new PoolError(
          "Cannot listen: the listening session needs a connection of its own and " +
            `'maxConnections' is ${this.#maxSize}, which leaves none for queries; set ` +
            "'maxConnections' to 2 or more",
        ),
      );
    }
    this.#listener ??= new Listener({
      config: this.config,
      openSession: (stopped) =>
        this.#sharesListenSession() ? this.#sharedListenSession() : this.#ownListenSession(stopped),
    });
    return this.#listener.add(channel, handler, options, schema);
  }

  /** One session in all (the embedded engine): the listener uses the pool's. */
  #sharesListenSession(): boolean {
    return this.#driver.maxSessions === 1;
  }

  /** The connection the listening session takes from `maxConnections` (0 or 1). */
  #listenSeats(): number {
    return this.#listener?.holdsSession === true && !this.#sharesListenSession() ? 1 : 0;
  }

  /** Opens the listener's own connection, closing one of the pool's when at the cap. */
  async #ownListenSession(stopped: () => boolean): Promise<ListenSession> {
    this.#makeRoom();
    const conn = await connectWithRetry(
      this.#driver,
      this.config,
      new Map(),
      () => this.#closed || stopped(),
    );
    if (this.#closed) {
      await conn.close();
      throw this.#closedError();
    }
    return {
      run: (sql) => conn.query(sql, []).result,
      onNotification: (listener) => conn.onNotification(listener),
      onClose: (listener) => conn.onClose(listener),
      close: () => conn.close(),
    };
  }

  /**
   * The pool's own session, for a driver that has only one (the embedded engine): every
   * session the pool opens listens on the listener's channels before its first statement
   * (see `#openSlot`), so a replaced session misses nothing (no other session exists to send
   * a notification meanwhile) and the listening session never counts as lost.
   */
  #sharedListenSession(): Promise<ListenSession> {
    let deliver: NotificationListener | undefined;
    this.#sharedNotify = (channel, payload) => deliver?.(channel, payload);
    return Promise.resolve({
      run: (sql) => this.query(sql, []),
      onNotification: (listener) => deliver = listener,
      onClose: () => {},
      close: () => {
        this.#sharedNotify = undefined;
        return Promise.resolve();
      },
    });
  }

  /** Makes a new session of a one-session driver listen as the one before it did. */
  async #listenOnShared(conn: DriverConnection): Promise<void> {
    conn.onNotification((channel, payload) => this.#sharedNotify?.(channel, payload));
    const channels = this.#listener?.channels ?? [];
    if (channels.length === 0) return;
    try {
      await conn.query(channels.map((c) => `LISTEN ${quoteChannel(c)}`).join("; "), []).result;
    } catch (error) {
      await conn.close();
      throw error;
    }
  }

  /** Frees a place for the listening session: closes a connection (an idle one first). */
  #makeRoom(): void {
    const open = this.#slots.filter((slot) => !slot.retiring);
    if (open.length + this.#opening < this.#maxSize) return;
    const victim = open.find((slot) => !slot.leased && slot.running.size === 0) ??
      open.find((slot) => !slot.leased) ?? open[open.length - 1];
    if (victim === undefined) return;
    if (!victim.leased && victim.running.size === 0) this.#remove(victim);
    else victim.retiring = true;
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
    return guarded(options, this.config.commandTimeoutMs, work);
  }

  /** Streams COPY text on a leased slot. */
  async copyIn(
    slot: Slot,
    sql: string,
    chunks: AsyncIterable<string | Uint8Array>,
    signal: AbortSignal | undefined,
  ): Promise<number> {
    const entry = copyEntry(sql);
    slot.running.add(entry);
    try {
      return await slot.conn.copyIn(sql, chunks, signal);
    } finally {
      this.#settle(slot, entry);
    }
  }

  /** Yields a statement's rows in batches from a portal on a leased slot. */
  async *cursor(
    slot: Slot,
    sql: string,
    params: readonly unknown[],
    batchSize: number,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<Row[]> {
    const entry = copyEntry(sql);
    slot.running.add(entry);
    try {
      yield* slot.conn.cursor!(sql, params, batchSize, signal);
    } finally {
      this.#settle(slot, entry);
    }
  }

  /** Yields the output of a `COPY … TO STDOUT` on a leased slot. */
  async *copyOut(
    slot: Slot,
    sql: string,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<Uint8Array, number> {
    const entry = copyEntry(sql);
    slot.running.add(entry);
    try {
      return yield* slot.conn.copyOut(sql, signal);
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
    const running = slot.conn.query(sql, params);
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
    if (
      strayCancelVictim(entry, error) && !slot.leased && retries < MAX_CANCEL_RETRIES &&
      guard?.fired === undefined
    ) {
      return this.#dispatch(entry.sql, params, guard, retries + 1);
    }
    this.#errors++;
    throw statementTimeoutError(error, this.config.serverSettings.statement_timeout) ?? error;
  }

  /** Cancels a statement; once the cancel has taken effect its slot takes work again. */
  #cancel(slot: Slot, entry: InFlight, error: unknown): void {
    cancelInFlight(slot, entry, error)?.then(() => {
      if (slot.cancelling > 0) return;
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
    if (entry.cancelError === undefined && this.#timings.learn(entry.sql, serviceMs)) {
      this.#markQueuedSlow(entry.sql);
    }
    if (slot.running.size === 0 && !slot.leased) this.#afterWork(slot);
  }

  /**
   * When a statement turns slow, the copies of it already queued count as slow too, so fast
   * queries stop joining the queues they are in (a burst of a new slow statement would
   * otherwise hold them).
   */
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

  /**
   * A slot for a slow statement (fast queries keep off a slot while it runs one): an idle
   * slot, preferring one where `sql` is prepared, since it then skips parsing and the
   * server plans it as before; else, once a new connection is asked for, one already
   * running slow work; else the least busy.
   */
  #pickQuiet(sql: string): Slot | undefined {
    let idle: Slot | undefined;
    for (let i = this.#slots.length - 1; i >= 0; i--) {
      const slot = this.#slots[i];
      if (!available(slot) || slot.running.size > 0) continue;
      if (slot.conn.hasPrepared(sql)) return slot;
      idle ??= slot;
    }
    if (idle !== undefined) return idle;
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
    const taken = this.#slots.length + this.#opening + this.#listenSeats();
    if (this.#closed || taken >= this.#maxSize) return false;
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
      const conn = await connectWithRetry(
        this.#driver,
        this.config,
        this.#prepared,
        () => this.#closed,
      );
      if (this.#closed) {
        await conn.close();
        return;
      }
      if (this.#sharesListenSession()) await this.#listenOnShared(conn);
      const slot = openedSlot(conn, this.#prepared.keys());
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
  readonly cursor?: Lease["cursor"];

  constructor(pool: ConnectionPool, slot: Slot) {
    this.#pool = pool;
    this.#slot = slot;
    if (slot.conn.cursor !== undefined) {
      this.cursor = (sql, params, batchSize, signal) => {
        if (this.#released) throw releasedError();
        return pool.cursor(slot, sql, params, batchSize, signal);
      };
    }
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

  copyIn(
    sql: string,
    chunks: AsyncIterable<string | Uint8Array>,
    signal?: AbortSignal,
  ): Promise<number> {
    if (this.#released) return Promise.reject(releasedError());
    return this.#pool.copyIn(this.#slot, sql, chunks, signal);
  }

  async *copyOut(sql: string, signal?: AbortSignal): AsyncGenerator<Uint8Array, number> {
    if (this.#released) throw releasedError();
    return yield* this.#pool.copyOut(this.#slot, sql, signal);
  }

  release(discard = false): void {
    if (this.#released) return;
    this.#released = true;
    this.#pool.release(this.#slot, discard);
  }
}

const EMPTY: DriverResult = { rows: [], command: "", rowCount: 0 };

function releasedError(): PoolError {
  return new PoolError(
    "Cannot use this connection: its transaction or acquire() callback has already finished; " +
      "run queries only inside the callback",
  );
}

/**
 * A COPY's or a portal's entry among a leased slot's statements in flight: no driver
 * statement to cancel (it ends with its stream) and no deadline of the pool's tick.
 */
function copyEntry(sql: string): InFlight {
  return {
    running: { result: Promise.resolve(EMPTY), cancel: () => Promise.resolve() },
    sql,
    deadline: Infinity,
    slow: true,
    start: performance.now(),
    exposed: false,
  };
}
