/**
 * Rows as a stream, fetched in batches, so memory stays constant however many rows the query
 * returns. Outside a transaction the statement runs on a connection of its own as a portal
 * of the extended protocol (where the driver has them; else a cursor in a `BEGIN … COMMIT`
 * of its own); in a transaction or on an acquired connection, whose caller may run other
 * statements between rows, as a server-side cursor (`DECLARE … NO SCROLL CURSOR`). Leaving
 * the loop early (`break`, `throw`) or aborting the signal closes the portal or cursor.
 * Works the same on both drivers and through PgBouncer in transaction mode.
 *
 * @module
 */

import type { DriverResult, Row } from "./drivers/driver.ts";
import type { Lease, QueryOptions } from "./pool/types.ts";

/**
 * Sends one statement with `run`, reporting it to the `onQuery` hook and OpenTelemetry like
 * every other statement (the statements a stream sends: its portal's one, or a cursor's
 * DECLARE, FETCH and CLOSE). Internal.
 */
export type Reporter = (
  sql: string,
  params: readonly unknown[],
  run: () => Promise<DriverResult>,
) => Promise<DriverResult>;

/** Options of `stream()`. */
export interface StreamOptions {
  /**
   * Rows fetched per round trip: more means fewer round trips and more memory per batch.
   * 2000 streams 1,000,000 small rows at about `fetchAll()`'s rate through a portal (0.7 of
   * it through a `DECLARE` / `FETCH` cursor, whatever the batch size) while the process
   * grows by about 25 MB; larger batches are no faster and V8 keeps more young objects alive
   * (bench/stream_bench.ts). Lower it for wide rows.
   * @default {2000}
   */
  batchSize?: number;
  /** Aborting ends the stream (the loop throws `signal.reason`) and frees its connection. */
  signal?: AbortSignal;
}

const DEFAULT_BATCH_SIZE = 2000;
const TRAILING = /[\s;]+$/;

/** The one session a cursor runs on. */
export interface CursorSession {
  /** Runs one statement on the session. */
  run(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult>;
  /** Whether the session is inside a transaction already (the cursor then lives in it). */
  readonly inTransaction: boolean;
  /** A cursor name unique among the session's open cursors. */
  readonly cursorName: string;
  /** Set when cleaning up failed: the session's state is unknown, so it must be discarded. */
  broken?: boolean;
}

/** The batch size of `options`, checked. */
function batchSizeOf(options: StreamOptions | undefined): number {
  const batchSize = options?.batchSize ?? DEFAULT_BATCH_SIZE;
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) {
    throw new RangeError(
      `Cannot stream rows: 'batchSize' must be a positive integer; got ${String(batchSize)}`,
    );
  }
  return batchSize;
}

/**
 * Yields the rows of `sql` in batches of up to `batchSize` from a portal of the extended
 * protocol on a session held alone (`Lease.cursor`): one statement, no transaction and no
 * cursor to declare, which streams at `fetchAll`'s pace where `DECLARE`/`FETCH` runs at
 * 0.7 of it. `report` sees it as one statement, its rows counted, once the rows end.
 *
 * @throws {RangeError} When `batchSize` is not a positive integer.
 */
export async function* portalBatches(
  cursor: NonNullable<Lease["cursor"]>,
  sql: string,
  params: readonly unknown[],
  options: StreamOptions | undefined,
  report: Reporter,
): AsyncGenerator<Row[]> {
  const batchSize = batchSizeOf(options);
  const signal = options?.signal;
  signal?.throwIfAborted();
  let rowCount = 0;
  let end!: (failure?: { error: unknown }) => void;
  const ended = new Promise<DriverResult>((resolve, reject) => {
    end = (failure) =>
      failure === undefined ? resolve({ rows: [], command: "SELECT", rowCount }) : reject(
        failure.error,
      );
  });
  const reported = report(sql, params, () => ended);
  let failure: { error: unknown } | undefined;
  try {
    for await (const rows of cursor(sql, params, batchSize, signal)) {
      rowCount += rows.length;
      yield rows;
    }
  } catch (error) {
    failure = { error };
    throw error;
  } finally {
    end(failure);
    await reported.catch(() => {});
  }
}

/**
 * Yields the rows of `sql` from a cursor on `session` in batches of up to `batchSize` (never
 * an empty one); {@link BatchRows} hands them out one at a time.
 *
 * @throws {RangeError} When `batchSize` is not a positive integer.
 */
export async function* cursorBatches(
  session: CursorSession,
  sql: string,
  params: readonly unknown[],
  options: StreamOptions | undefined,
): AsyncGenerator<Row[]> {
  const batchSize = batchSizeOf(options);
  const signal = options?.signal;
  signal?.throwIfAborted();
  const run = (text: string, values: readonly unknown[] = []) =>
    session.run(text, values, signal === undefined ? undefined : { signal });
  const own = !session.inTransaction;
  const name = session.cursorName;
  let declared = false;
  let finished = false;
  if (own) await run("BEGIN");
  try {
    await run(`DECLARE ${name} NO SCROLL CURSOR FOR ${sql.replace(TRAILING, "")}`, params);
    declared = true;
    while (true) {
      signal?.throwIfAborted();
      const { rows } = await run(`FETCH FORWARD ${batchSize} FROM ${name}`);
      if (rows.length > 0) yield rows;
      if (rows.length < batchSize) break;
    }
    await run(`CLOSE ${name}`);
    declared = false;
    if (own) await run("COMMIT");
    finished = true;
  } finally {
    if (!finished) {
      // Without the signal: the cleanup must run even when the signal is what ended the loop.
      const cleanup = own ? "ROLLBACK" : declared ? `CLOSE ${name}` : undefined;
      if (cleanup !== undefined) {
        await session.run(cleanup, []).catch(() => {
          // In the caller's own transaction a failed statement leaves it aborted and the
          // caller rolls it back; on a connection of its own the state is unknown.
          if (own) session.broken = true;
        });
      }
    }
  }
}

/**
 * Ends the batches of rows dropped half-way, neither read to the end nor `return()`ed, once
 * the garbage collector takes them: their portal or cursor is closed and their connection
 * goes back to the pool (at a moment the collector chooses, so code should still end its
 * loops).
 */
const dropped = new FinalizationRegistry<AsyncGenerator<Row[]>>((batches) => {
  batches.return(undefined).catch(() => {});
});

/**
 * The rows of a cursor's batches, one per `next()`. An async generator yielding each row
 * costs several promise turns per row (and one more per `yield*` layer): this hands out a
 * fetched batch's rows as resolved promises (about 40 ns a row), and
 * drops each batch once it is read. Leaving the loop (`return()`) or an aborted `signal`
 * ends the batches' generator, which closes the cursor.
 */
export class BatchRows<T = Row> implements AsyncIterableIterator<T> {
  readonly #batches: AsyncGenerator<Row[]>;
  readonly #signal: AbortSignal | undefined;
  #batch: Row[] = [];
  #index = 0;

  /**
   * @param batches The cursor's batches.
   * @param signal Aborting ends the rows with `signal.reason`.
   */
  constructor(batches: AsyncGenerator<Row[]>, signal: AbortSignal | undefined) {
    this.#batches = batches;
    this.#signal = signal;
    dropped.register(this, batches, this);
  }

  /** This iterator. */
  [Symbol.asyncIterator](): this {
    return this;
  }

  /** The next row, from the batch at hand or from the next batch. */
  next(): Promise<IteratorResult<T>> {
    if (this.#index < this.#batch.length && this.#signal?.aborted !== true) {
      return Promise.resolve({ value: this.#batch[this.#index++] as T, done: false });
    }
    return this.#nextBatch();
  }

  /** Ends the rows early: closes the cursor and frees its connection. */
  async return(): Promise<IteratorResult<T>> {
    this.#batch = [];
    dropped.unregister(this);
    await this.#batches.return(undefined);
    return { value: undefined, done: true };
  }

  async #nextBatch(): Promise<IteratorResult<T>> {
    this.#batch = [];
    this.#index = 0;
    if (this.#signal?.aborted === true) {
      dropped.unregister(this);
      await this.#batches.return(undefined);
      throw this.#signal.reason;
    }
    let next: IteratorResult<Row[]>;
    try {
      next = await this.#batches.next();
    } catch (error) {
      dropped.unregister(this);
      throw error;
    }
    if (next.done === true) {
      dropped.unregister(this);
      return { value: undefined, done: true };
    }
    this.#batch = next.value;
    this.#index = 1;
    return { value: next.value[0] as T, done: false };
  }
}
