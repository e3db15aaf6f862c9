/**
 * `QueryMonitor`: a recent-query history and a slow-query log fed by the pool's `onQuery`
 * hook, in fixed-size ring buffers (constant time and memory per statement).
 *
 * @module
 */

import { ConfigurationError } from "../errors.ts";
import type { QueryEvent, QueryHook } from "../query_event.ts";

/** Options of {@link QueryMonitor}. */
export interface QueryMonitorOptions {
  /**
   * Statements that take at least this many milliseconds are also kept in the slow log.
   * @default {1000}
   */
  slowQueryMs?: number;
  /**
   * How many recent statements the history keeps (the oldest are dropped).
   * @default {1000}
   */
  historySize?: number;
  /**
   * How many slow statements the slow log keeps (the oldest are dropped).
   * @default {100}
   */
  slowHistorySize?: number;
  /** Another hook to call after the monitor recorded each statement (chained). */
  onQuery?: QueryHook;
}

/** A statement in the history: the hook's event and when it was recorded. */
export interface QueryRecord extends QueryEvent {
  /** When the statement finished, in milliseconds since the epoch. */
  timestamp: number;
}

/** What {@link QueryMonitor.getSummary} returns, over the statements in the history. */
export interface QuerySummary {
  /** Statements in the history. */
  count: number;
  /** Of those, how many failed. */
  errors: number;
  /** Of those, how many took at least `slowQueryMs`. */
  slow: number;
  /** Sum of their durations, in milliseconds. */
  totalMs: number;
  /** Mean duration, in milliseconds (`0` when empty). */
  avgMs: number;
  /** Median duration, in milliseconds (`0` when empty). */
  p50Ms: number;
  /** 99th percentile duration (nearest rank), in milliseconds (`0` when empty). */
  p99Ms: number;
  /** Longest duration, in milliseconds (`0` when empty). */
  maxMs: number;
}

/**
 * Keeps the most recent statements and the slow ones, from the pool's `onQuery` hook.
 * Recording is constant time (a ring buffer write); sorting happens only in
 * {@link QueryMonitor.getSummary}. Parameters arrive already masked by the core.
 *
 * @example Watch a pool (needs a server)
 * ```ts ignore
 * import { createSharedPool, DatabaseManager } from "@pgdbm/pgdbm";
 * import { QueryMonitor } from "@pgdbm/pgdbm/monitoring";
 *
 * const monitor = new QueryMonitor({ slowQueryMs: 200 });
 * const pool = await createSharedPool({
 *   connectionString: Deno.env.get("DATABASE_URL"),
 *   onQuery: monitor.onQuery,
 * });
 * const db = new DatabaseManager({ pool, schema: "app" });
 * await db.fetchAll("SELECT * FROM {{tables.users}}");
 * console.log(monitor.getSlowQueries(), monitor.getSummary());
 * await pool.close();
 * ```
 */
export class QueryMonitor {
  readonly #slowQueryMs: number;
  readonly #history: Ring<QueryRecord>;
  readonly #slow: Ring<QueryRecord>;
  readonly #next: QueryHook | undefined;

  /**
   * The hook to give the pool (`createSharedPool({ …, onQuery: monitor.onQuery })`);
   * bound, so it can be passed around on its own.
   */
  readonly onQuery: QueryHook = (event: QueryEvent): void => {
    const record: QueryRecord = { ...event, timestamp: Date.now() };
    this.#history.push(record);
    if (event.durationMs >= this.#slowQueryMs) this.#slow.push(record);
    this.#next?.(event);
  };

  /**
   * Makes a monitor; nothing is recorded until its `onQuery` is given to a pool.
   *
   * @param options Threshold, buffer sizes and a hook to chain.
   * @throws {ConfigurationError} When a size is not a positive integer, the threshold is
   *   negative, or `onQuery` is not a function.
   */
  constructor(options: QueryMonitorOptions = {}) {
    this.#slowQueryMs = nonNegative(options.slowQueryMs, "slowQueryMs", 1000);
    this.#history = new Ring(positiveInteger(options.historySize, "historySize", 1000));
    this.#slow = new Ring(positiveInteger(options.slowHistorySize, "slowHistorySize", 100));
    if (options.onQuery !== undefined && typeof options.onQuery !== "function") {
      throw new ConfigurationError(
        "onQuery",
        "Cannot create the QueryMonitor: 'onQuery' must be a function (event) => void; " +
          `got ${typeof options.onQuery}`,
      );
    }
    this.#next = options.onQuery;
  }

  /** The slow-query threshold, in milliseconds. */
  get slowQueryMs(): number {
    return this.#slowQueryMs;
  }

  /**
   * The most recent statements, newest first.
   *
   * @param limit At most this many (default: the whole history).
   * @returns The records.
   * @throws {RangeError} When `limit` is not an integer of 0 or more.
   */
  getQueryHistory(limit?: number): QueryRecord[] {
    return this.#history.newestFirst(checkLimit(limit));
  }

  /**
   * The most recent statements that took at least `slowQueryMs`, newest first.
   *
   * @param limit At most this many (default: the whole slow log).
   * @returns The records.
   * @throws {RangeError} When `limit` is not an integer of 0 or more.
   */
  getSlowQueries(limit?: number): QueryRecord[] {
    return this.#slow.newestFirst(checkLimit(limit));
  }

  /**
   * Counts and duration statistics over the statements in the history.
   *
   * @returns The summary (all zeros when the history is empty).
   */
  getSummary(): QuerySummary {
    const records = this.#history.newestFirst();
    const durations = new Float64Array(records.length);
    let errors = 0;
    let slow = 0;
    let totalMs = 0;
    records.forEach((record, i) => {
      durations[i] = record.durationMs;
      totalMs += record.durationMs;
      if (record.error !== undefined) errors++;
      if (record.durationMs >= this.#slowQueryMs) slow++;
    });
    durations.sort();
    const count = records.length;
    return {
      count,
      errors,
      slow,
      totalMs,
      avgMs: count === 0 ? 0 : totalMs / count,
      p50Ms: percentile(durations, 0.5),
      p99Ms: percentile(durations, 0.99),
      maxMs: count === 0 ? 0 : durations[count - 1],
    };
  }

  /** Forgets the history and the slow log. */
  clear(): void {
    this.#history.clear();
    this.#slow.clear();
  }
}

/** A fixed-capacity buffer that overwrites its oldest item. */
class Ring<T> {
  readonly #items: (T | undefined)[];
  #next = 0;
  #size = 0;

  constructor(capacity: number) {
    this.#items = new Array<T | undefined>(capacity);
  }

  push(item: T): void {
    this.#items[this.#next] = item;
    this.#next = (this.#next + 1) % this.#items.length;
    if (this.#size < this.#items.length) this.#size++;
  }

  newestFirst(limit = this.#size): T[] {
    const n = Math.min(limit, this.#size);
    const capacity = this.#items.length;
    const out = new Array<T>(n);
    for (let i = 0; i < n; i++) out[i] = this.#items[(this.#next - 1 - i + capacity) % capacity]!;
    return out;
  }

  clear(): void {
    this.#items.fill(undefined);
    this.#next = 0;
    this.#size = 0;
  }
}

function checkLimit(limit: number | undefined): number | undefined {
  if (limit === undefined || (Number.isInteger(limit) && limit >= 0)) return limit;
  throw new RangeError(
    `Cannot read the query history: 'limit' must be an integer of 0 or more; got ${String(limit)}`,
  );
}

/** Nearest-rank percentile of sorted values. */
function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.max(0, Math.ceil(p * sorted.length) - 1)];
}

function nonNegative(value: number | undefined, field: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new ConfigurationError(
      field,
      `Cannot create the QueryMonitor: '${field}' must be a number of milliseconds of 0 or ` +
        `more; got ${String(value)}`,
    );
  }
  return value;
}

function positiveInteger(value: number | undefined, field: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < 1) {
    throw new ConfigurationError(
      field,
      `Cannot create the QueryMonitor: '${field}' must be a positive integer; got ${String(value)}`,
    );
  }
  return value;
}
