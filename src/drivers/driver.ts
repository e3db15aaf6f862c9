/**
 * The narrow seam between pgdbm and the wire: "a connection that runs SQL". Two
 * implementations sit behind it: {@link ./wire.ts} (pgdbm's own protocol client over TCP, Unix
 * socket or TLS) and {@link ./pglite.ts} (PGlite in process); {@link ./mod.ts} is the one
 * place that chooses. Above the seam nothing knows which one it has: what differs is stated
 * as {@link DriverCapabilities}. No driver type leaks into the public API.
 *
 * Drivers reject with {@link QueryError} for every failure of a statement; a failure that
 * lost the connection has `sqlstate` class `08` (or `57P01`, when the server's message
 * arrived before the session ended) and leaves {@link DriverConnection.closed} `true`.
 *
 * @module
 */

/** A row as a plain object keyed by column name. */
export type Row = Record<string, unknown>;

/** What one statement returned. */
export interface DriverResult {
  /** Rows as plain objects (empty for commands that return none). */
  rows: Row[];
  /** The command tag's verb, such as `"INSERT"` or `"SELECT"`. */
  command: string;
  /** Rows affected or returned, as the command tag reports it. */
  rowCount: number;
}

/** Options of one statement. */
export interface StatementOptions {
  /**
   * Run a statement with parameters as a named prepared statement (kept on the session).
   * @default {the driver's `prepare` setting}
   */
  prepare?: boolean;
}

/** What the pool must know of a driver's sessions. */
export interface DriverCapabilities {
  /**
   * A statement with parameters must travel alone on its session: nothing else in flight
   * when it is sent, nothing sent after it until it is answered. The network driver with
   * `prepare: false` sends it as Parse/Describe/Flush before its Sync, and a transaction
   * pooler up to PgBouncer 1.20 hands the server connection away at an earlier Sync's answer.
   */
  readonly parameterizedAlone: boolean;
}

/** A statement on its way: its result, and a way to cancel it on the server. */
export interface RunningQuery {
  /** Settles with the result or a `QueryError`. */
  readonly result: Promise<DriverResult>;
  /**
   * Cancels this statement; a no-op once it finished. A statement not yet written to the
   * session is withdrawn: its result rejects with SQLSTATE `57014` and the server never sees
   * it. One the session is running is stopped by a cancel request (its result then rejects
   * with `57014`, or resolves when it finished first). One written behind others gets its
   * cancel request when the session reaches it, by which time the server may run a later
   * statement of the session: that one then fails with `57014` instead, so a caller that
   * cancels must treat the statements in flight on the session as possibly cancelled (the
   * pool runs such autocommit statements again). Drivers that cannot interrupt a running
   * statement let it run to its end. Resolves once the cancel request has been delivered
   * (or the statement withdrawn or finished).
   */
  cancel(): Promise<void>;
}

/** Receives one notification: its channel and its payload (`""` when none was given). */
export type NotificationListener = (channel: string, payload: string) => void;

/** One physical session with PostgreSQL. */
export interface DriverConnection {
  /** The server process id of this session. */
  readonly pid: number;
  /** `server_version` as the server reports it. */
  readonly serverVersion: string;
  /** True once the session is gone (closed by us, by the server, or by the network). */
  readonly closed: boolean;
  /**
   * Whether `sql` is prepared on this session as a named statement: running it here again
   * skips parsing it, and the server keeps the plans it made for it. Always false on a
   * driver that prepares no named statements.
   */
  hasPrepared(sql: string): boolean;
  /**
   * Runs one statement. With `params` it uses the extended protocol, as a named prepared
   * statement when `options.prepare` (default: the driver's setting) is true; without params
   * it uses the simple protocol, which accepts several statements separated by `;`: the
   * result has the last statement's `command`, and the rows and `rowCount` of the last
   * statement that returned rows on the network driver (as postgres.js, its first driver,
   * did), of the last statement on the embedded one. Statements sent before earlier ones finish are
   * pipelined on the session.
   */
  query(sql: string, params: readonly unknown[], options?: StatementOptions): RunningQuery;
  /**
   * Runs `COPY … FROM STDIN` with `sql`, streaming `chunks` (text, or its UTF-8 bytes) to the
   * server. Resolves with the number of rows copied. When `chunks` throws, or `signal`
   * aborts, the COPY is stopped (the server rolls it back; a cancel request interrupts a row
   * the server is busy with, such as a lock wait or a slow trigger) and the call rejects with
   * that error or `signal.reason` once the session is ready for its next statement; a session
   * that gives no sign of being ready in time is ended. The embedded driver reads every chunk
   * before the COPY runs and cannot interrupt it once it does.
   */
  copyIn(
    sql: string,
    chunks: AsyncIterable<string | Uint8Array>,
    signal?: AbortSignal,
  ): Promise<number>;
  /**
   * Runs `COPY … TO STDOUT` with `sql` and yields its output (COPY text or CSV, as `sql`
   * asks) in chunks of whole or partial rows; the generator returns the number of rows
   * copied. A server error, before or during the COPY, is thrown from the iterator as a
   * {@link QueryError}. Leaving early (`return()`, as `break` in `for await` does) or
   * aborting `signal` (the iterator then throws `signal.reason`) stops the COPY on the server
   * and settles only once the session is ready for its next statement; a session that gives
   * no sign of being ready in time is ended ({@link DriverConnection.closed}). An iterator
   * dropped without `return()` holds the session. The embedded driver runs the COPY to its
   * end before the first chunk (PGlite hands over the whole output at once).
   */
  copyOut(sql: string, signal?: AbortSignal): AsyncGenerator<Uint8Array, number>;
  /**
   * Runs one statement and yields its rows `batchSize` at a time (never an empty batch)
   * from a portal of the extended protocol: the statement runs once, each batch is one
   * Execute, and no transaction is needed. Nothing else can run on the session until the
   * rows end, so only a caller that holds the session alone, and sends nothing in between,
   * may use it. A server error is thrown from the iterator as a {@link QueryError}. Leaving
   * early (`return()`) closes the portal; aborting `signal` cancels the statement and throws
   * `signal.reason`. Drivers without it (the embedded one, and the network one with
   * `prepare: false`, for transaction poolers) leave it undefined: callers declare a cursor.
   */
  readonly cursor?: (
    sql: string,
    params: readonly unknown[],
    batchSize: number,
    signal?: AbortSignal,
  ) => AsyncGenerator<Row[]>;
  /** Calls `listener` once when the session ends, for whatever reason. */
  onClose(listener: () => void): void;
  /**
   * Calls `listener` with each notification the session receives (`LISTEN` on it, then a
   * `NOTIFY` committed anywhere), until the session ends. On the embedded driver the one
   * session receives them after the statement during which they arrived.
   */
  onNotification(listener: NotificationListener): void;
  /** Ends the session after the statements already sent; idempotent. */
  close(): Promise<void>;
  /**
   * Ends the session now, for a session that stopped answering: statements in flight
   * reject. Drivers that cannot interrupt a statement end it as `close()` does.
   */
  terminate(): Promise<void>;
}

/** Opens sessions to one server. */
export interface Driver {
  /** The most sessions this driver can have open at once (`Infinity` when unbounded). */
  readonly maxSessions: number;
  /** What the pool must know of its sessions. */
  readonly capabilities: DriverCapabilities;
  /** Opens one session with the server settings applied. Rejects on failure. */
  connect(): Promise<DriverConnection>;
  /** Releases what the driver holds beyond its sessions (the embedded engine). */
  close(): Promise<void>;
}
