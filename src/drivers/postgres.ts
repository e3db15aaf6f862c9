/**
 * The network driver: one postgres.js instance with `max: 1` per session, so each
 * {@link DriverConnection} is exactly one server backend (its own pid, pipelining, cancel).
 * postgres.js never reconnects a session behind our back: once the socket closes, the
 * connection is marked closed and the pool replaces it (re-running `initCommands`).
 *
 * @module
 */

import type { Buffer } from "node:buffer";
import type { Readable, Writable } from "node:stream";
import { Socket } from "node:net";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import postgres from "postgres";
import type { ResolvedConfig, ResolvedSsl } from "../config.ts";
import type {
  Driver,
  DriverConnection,
  DriverResult,
  NotificationListener,
  Row,
  RunningQuery,
  StatementOptions,
} from "./driver.ts";
import { QueryError, type ServerErrorFields } from "../errors.ts";
import {
  arrayTypesSql,
  FIRST_USER_OID,
  parseArrayBody,
  serializeArray,
  UNKNOWN_TYPE_SERIALIZERS,
} from "./_pg_array.ts";
import { byteaFromHex, byteaToHex } from "./_bytea.ts";

type Sql = ReturnType<typeof postgres>;
type PgQuery = ReturnType<Sql["unsafe"]>;
type TlsOptions = Record<string, unknown>;

const SQLSTATE = /^[0-9A-Z]{5}$/;

/**
 * Statements postgres.js writes to a session before it waits for their answers. Its default
 * (100) drains the whole pipeline before writing more, a round trip of idle server and client
 * every 100 statements of an `executeMany` batch; the pool bounds shared pipelines itself.
 */
const MAX_PIPELINE = 10_000;

const CONNECTION_LOST_CODES = new Set([
  "CONNECTION_CLOSED",
  "CONNECTION_DESTROYED",
  "CONNECTION_ENDED",
  "CONNECT_TIMEOUT",
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
]);

/**
 * Creates the postgres.js driver for a resolved network configuration.
 *
 * @param config The resolved configuration (`kind: "network"`).
 * @returns A driver whose sessions are single postgres.js connections.
 */
export function createPostgresDriver(config: ResolvedConfig): Driver {
  const options = connectionOptions(config);
  const setupTimeoutMs = Math.ceil(config.connectTimeoutMs);
  return {
    maxSessions: Infinity,
    capabilities: { parameterizedAlone: !config.prepare },
    connect: () => PostgresConnection.open(options, setupTimeoutMs),
    close: () => Promise.resolve(),
  };
}

function connectionOptions(config: ResolvedConfig): postgres.Options<Record<string, never>> {
  // `max_pipeline` is a postgres.js option its type declarations leave out.
  const options: postgres.Options<Record<string, never>> & { max_pipeline: number } = {
    host: config.host,
    port: config.port,
    database: config.database,
    username: config.user,
    password: config.password,
    max: 1,
    max_pipeline: MAX_PIPELINE,
    idle_timeout: 0,
    max_lifetime: null,
    connect_timeout: config.connectTimeoutMs / 1000,
    prepare: config.prepare,
    // postgres.js fetches array types itself on every new session and leaves a failure of
    // that query unhandled, which ends the process; the driver fetches them in open().
    fetch_types: false,
    ssl: tlsOptions(config.ssl, config.host) as postgres.Options<Record<string, never>>["ssl"],
    connection: config.serverSettings as postgres.Options<Record<string, never>>["connection"],
    onnotice: () => {},
    // A host with a slash is a Unix socket folder, where Nagle's algorithm does not apply.
    ...(config.host.includes("/") ? {} : { socket: () => noDelaySocket(config.host, config.port) }),
    types: {
      bytea: {
        to: 17,
        from: [17],
        serialize: byteaToHex,
        parse: byteaFromHex,
      },
    } as unknown as Record<string, never>,
  };
  return options;
}

/**
 * A TCP socket to `host:port` with Nagle's algorithm off, connecting (postgres.js queues its
 * first writes until it is connected, and puts TLS on top itself). postgres.js writes a
 * COPY's data and its CopyDone, and statements sent while others are in flight, as separate
 * small writes: with Nagle on, such a write waits for the server to acknowledge the one
 * before it, which Linux delays by up to 40 ms. Measured in one run: 10 COPYs of 5,000 rows
 * took 422–481 ms with Nagle and 37–39 ms without; 200 two-statement transactions 124–190 ms
 * and 60–85 ms. postgres.js takes such a socket only ready-made, through its `socket` option.
 */
function noDelaySocket(host: string, port: number): Socket {
  const socket = new Socket();
  socket.setNoDelay(true);
  socket.connect(port, host);
  return socket;
}

/**
 * TLS options for one libpq-style mode. `verify-full` checks the certificate against the
 * configured host itself: the TLS layer skips the name check when the host is an IP
 * address (it sends no server name then), which would make verify-full verify-ca.
 */
function tlsOptions(ssl: ResolvedSsl | undefined, host: string): boolean | TlsOptions {
  if (ssl === undefined) return false;
  const options: TlsOptions = { rejectUnauthorized: ssl.mode !== "require" };
  if (ssl.ca !== undefined) options.ca = ssl.ca;
  if (ssl.cert !== undefined) options.cert = ssl.cert;
  if (ssl.key !== undefined) options.key = ssl.key;
  if (ssl.keyPassword !== undefined) options.passphrase = ssl.keyPassword;
  options.checkServerIdentity = ssl.mode === "verify-full"
    ? (_name: string, cert: PeerCertificate) => checkServerIdentity(host, cert)
    : () => undefined;
  return options;
}

class PostgresConnection implements DriverConnection {
  readonly #sql: Sql;
  readonly #prepare: boolean;
  #pid = 0;
  #serverVersion = "";
  #closed = false;
  #listeners: Array<() => void> = [];
  #notified: NotificationListener[] = [];
  readonly cursor?: DriverConnection["cursor"];
  /**
   * Types of this database's own (OIDs from {@link FIRST_USER_OID}) whose array types the
   * session has installed, or found it has none: the setup's, then each one a result showed.
   */
  readonly #knownTypes = new Set<number>();

  private constructor(options: postgres.Options<Record<string, never>>) {
    this.#prepare = options.prepare !== false;
    // A lost session must fail what postgres.js still holds for it: left alone, it keeps
    // the queries not yet sent and reconnects to run them, so they hang while the server
    // is down.
    // `onnotify` (every NotificationResponse of the session) is an option postgres.js
    // reads but does not declare: its own `sql.listen` opens a second session with it.
    const onnotify = (channel: string, payload: string) => {
      for (const listener of this.#notified) listener(channel, payload);
    };
    this.#sql = postgres({
      ...options,
      onclose: () => this.#lose(),
      onnotify,
    } as postgres.Options<Record<string, never>>);
    Object.setPrototypeOf(this.#types.serializers, UNKNOWN_TYPE_SERIALIZERS);
    // Through a transaction pooler (`prepare: false`) a portal left open between batches
    // would hold a server connection on terms the pooler does not expect: callers declare a
    // cursor there.
    if (this.#prepare) this.cursor = (...args) => this.#cursor(...args);
  }

  /** The parsers and serializers of this session's postgres.js instance. */
  get #types(): TypeOptions {
    return this.#sql.options as unknown as TypeOptions;
  }

  /**
   * Opens a session and runs its setup statements (its pid, the server's array types). They
   * run in a transaction under `SET LOCAL` timeouts of their own: the user's
   * `statement_timeout` and `lock_timeout` are startup settings, meant for the user's
   * statements, and would otherwise fail the setup whenever the server is slow or a session
   * holds a lock on `pg_type`. `setupTimeoutMs` (the pool's `connectTimeoutMs`) bounds them
   * instead; the transaction's end restores the session's own values, wherever they came
   * from (startup settings, the role's defaults, a pooler's `connect_query`).
   *
   * It is one message (servers from 13 on time each statement of it on its own), so nothing
   * waits in postgres.js's queue while the session connects: when a connect fails,
   * postgres.js at once connects again to run what is queued, before `end()` can stop it,
   * and ending a socket that is still connecting leaves it open, a backend nobody closes.
   */
  static async open(
    options: postgres.Options<Record<string, never>>,
    setupTimeoutMs: number,
  ): Promise<PostgresConnection> {
    const connection = new PostgresConnection(options);
    const sql = connection.#sql;
    try {
      // postgres.js labels the results of a multi-statement message oddly; the setup's one
      // row is its only row.
      const results = await sql.unsafe(setupSql(setupTimeoutMs)) as unknown as Row[][];
      const [setup] = results.flat();
      connection.#pid = setup.pid as number;
      connection.#serverVersion = setup.version as string;
      connection.#install(arrayTypePairs(String(setup.arrays ?? "")));
      return connection;
    } catch (error) {
      connection.#markClosed();
      await sql.end({ timeout: 0 }).catch(() => {});
      throw setupError(error, setupTimeoutMs);
    }
  }

  get pid(): number {
    return this.#pid;
  }

  /** Installs array types, and notes their element and array types as known. */
  #install(pairs: readonly ArrayTypePair[]): void {
    installArrayTypes(this.#types, pairs);
    for (const [element, array] of pairs) {
      if (element >= FIRST_USER_OID) this.#knownTypes.add(element);
      if (array >= FIRST_USER_OID) this.#knownTypes.add(array);
    }
  }

  /**
   * A statement's result with the array types it showed that the session did not know yet
   * (made after it opened: an enum, a domain, a table's row type) parsed as arrays, as a
   * session opened after them would have: their array types are looked up and installed
   * once, and the values postgres.js left as text are parsed. When the look-up fails (the
   * session is lost, its transaction failed meanwhile), the values stay text.
   */
  typed(result: PgResult): DriverResult | Promise<DriverResult> {
    const rows = toDriverResult(result);
    const columns = lastResult(result).columns;
    let unknown: number[] | undefined;
    for (const column of columns ?? []) {
      const type = column.type;
      if (type >= FIRST_USER_OID && !this.#knownTypes.has(type)) (unknown ??= []).push(type);
    }
    if (unknown === undefined) return rows;
    return this.#learnTypes(unknown).then(
      () => reparsed(rows, columns!, this.#types.parsers),
      () => rows,
    );
  }

  async #learnTypes(types: readonly number[]): Promise<void> {
    for (const type of types) this.#knownTypes.add(type);
    try {
      // Only numbers go into the text: a simple-protocol statement, which a pooler in
      // transaction mode lets share the session.
      const found = await this.#sql.unsafe(arrayTypesSql(types)) as unknown as Array<
        { element: number; array: number; parseAs: number }
      >;
      this.#install(found.map((row) => [row.element, row.array, row.parseAs]));
    } catch (error) {
      for (const type of types) this.#knownTypes.delete(type);
      throw error;
    }
  }

  get serverVersion(): string {
    return this.#serverVersion;
  }

  get closed(): boolean {
    return this.#closed;
  }

  query(sql: string, params: readonly unknown[], options?: StatementOptions): RunningQuery {
    if (this.#closed) return closedQuery(sql, params);
    const query = params.length === 0
      ? this.#sql.unsafe(sql)
      : this.#sql.unsafe(sql, this.#bindable(params), {
        prepare: options?.prepare ?? this.#prepare,
      });
    return new PostgresRunningQuery(query, this, sql, params);
  }

  /**
   * postgres.js declares an array parameter with its first element's type (`timestamptz`
   * for an array of dates), which the server cannot cast to the array type: arrays are
   * declared untyped, so the server infers the array type from the statement.
   */
  #bindable(params: readonly unknown[]): postgres.ParameterOrJSON<never>[] {
    let bound: unknown[] | undefined;
    for (let i = 0; i < params.length; i++) {
      if (!Array.isArray(params[i])) continue;
      bound ??= [...params];
      bound[i] = this.#sql.typed(params[i] as never, 0);
    }
    return (bound ?? params) as postgres.ParameterOrJSON<never>[];
  }

  async copyIn(sql: string, chunks: AsyncIterable<string>, signal?: AbortSignal): Promise<number> {
    if (this.#closed) return closedQuery(sql, []).result.then(() => 0);
    signal?.throwIfAborted();
    const query = this.#sql.unsafe(sql) as CopyQuery;
    const copy = watchCopy(query);
    const { count, failed } = copy;
    const cancel = copyCanceller(query, copy);
    const aborted = abortion(signal);
    let stream: Writable | undefined;
    let source: AsyncIterator<string> | undefined;
    try {
      stream = await Promise.race([query.writable(), aborted.promise]);
      const finished = new Promise<void>((resolve, reject) => {
        stream!.once("finish", resolve);
        stream!.once("error", reject);
      });
      finished.catch(() => {});
      source = chunks[Symbol.asyncIterator]();
      while (true) {
        let next: IteratorResult<string>;
        try {
          next = await Promise.race([source.next(), aborted.promise]);
        } catch (error) {
          if (error === ABORTED) throw error;
          // The caller's own records failed: end the COPY (the server rolls it back) and
          // hand the caller its own error once the session is ready for its next statement.
          stream.destroy(error instanceof Error ? error : new Error(String(error)));
          await this.#stopCopy(copy, cancel, undefined);
          throw new CopySourceError(error);
        }
        if (next.done) break;
        if (!stream.write(next.value)) {
          await Promise.race([
            new Promise<void>((resolve) => stream!.once("drain", resolve)),
            finished,
            failed,
            aborted.promise,
          ]);
        }
      }
      stream.end();
      await Promise.race([finished, failed, aborted.promise]);
      return await Promise.race([count, failed, aborted.promise]);
    } catch (error) {
      if (error === ABORTED) {
        // The server reads the COPY's end only after the row it is busy with (a lock wait,
        // a slow trigger): a cancel request goes with it.
        stream?.destroy(new Error("the COPY was aborted"));
        source?.return?.().catch(() => {});
        await this.#stopCopy(copy, cancel, undefined);
        throw signal!.reason;
      }
      if (error instanceof CopySourceError) throw error.error;
      if (error instanceof RangeError || error instanceof TypeError) throw error;
      throw this.toQueryError(error, sql, []);
    } finally {
      aborted.dispose();
    }
  }

  /**
   * postgres.js pauses the socket while a COPY-out stream's buffer is full and resumes it
   * only when the stream is read, so a stream that is destroyed, or no longer read, leaves
   * the session stuck. Leaving early therefore cancels the COPY on the server and keeps
   * reading (discarding) until the server's answer ends the statement.
   */
  async *copyOut(sql: string, signal?: AbortSignal): AsyncGenerator<Uint8Array, number> {
    if (this.#closed) await closedQuery(sql, []).result;
    signal?.throwIfAborted();
    const query = this.#sql.unsafe(sql) as CopyQuery;
    const copy = watchCopy(query);
    const cancel = copyCanceller(query, copy);
    const onAbort = () => void cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    let reader: CopyOutReader | undefined;
    try {
      reader = new CopyOutReader(await query.readable());
      while (true) {
        const chunk = await reader.next();
        signal?.throwIfAborted();
        if (chunk === null) break;
        yield chunk;
      }
      return await Promise.race([copy.count, copy.failed]);
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      throw this.toQueryError(error, sql, []);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (!copy.over) await this.#stopCopy(copy, cancel, reader);
    }
  }

  /**
   * Cancels a COPY and reads the rest of a COPY out; ends the session when the COPY does not
   * finish in time.
   */
  async #stopCopy(
    copy: CopyWatch,
    cancel: () => Promise<void>,
    reader: CopyOutReader | undefined,
  ): Promise<void> {
    const drained = (async () => {
      // The cancel request is delivered before the session can take another statement: a
      // cancel that arrives once the COPY has ended finds the session idle and is ignored.
      await cancel();
      try {
        while (reader !== undefined && await reader.next() !== null) { /* discard */ }
      } catch {
        // The cancel's own 57014 (or the error that ended the COPY).
      }
      await copy.ended;
    })();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<false>((resolve) => timer = setTimeout(resolve, COPY_STOP_MS, false));
    const inTime = await Promise.race([drained.then(() => true), late]);
    clearTimeout(timer);
    if (!inTime) await this.terminate();
  }

  /**
   * postgres.js's own cursor: Bind, then Execute with a row limit and a Flush per batch;
   * the next Execute goes once the batch is handed over. Leaving early makes postgres.js
   * send Close and Sync when the portal next suspends. A cancel request goes only while the
   * server works on a batch, and is delivered before the session takes anything else.
   */
  async *#cursor(
    sql: string,
    params: readonly unknown[],
    batchSize: number,
    signal?: AbortSignal,
  ): AsyncGenerator<Row[]> {
    if (this.#closed) await closedQuery(sql, params).result;
    signal?.throwIfAborted();
    // Unnamed: a named statement per streamed text would stay on the session until it ends.
    const query = this.#sql.unsafe(sql, this.#bindable(params), { prepare: false });
    const batches = query.cursor(batchSize)[Symbol.asyncIterator]();
    const send = takeCanceller(query);
    let working = false;
    let cancelled: Promise<void> | undefined;
    const onAbort = () => {
      if (working && send !== undefined) cancelled ??= send();
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    let ended = false;
    try {
      while (true) {
        let next: IteratorResult<unknown>;
        working = true;
        try {
          next = await batches.next();
        } catch (error) {
          // The statement failed (or was cancelled): postgres.js has ended it.
          ended = true;
          if (signal?.aborted) throw signal.reason;
          throw this.toQueryError(error, sql, params);
        } finally {
          working = false;
        }
        if (next.done === true) {
          ended = true;
          return;
        }
        // The portal waits for its next Execute: leaving here closes it.
        signal?.throwIfAborted();
        const { rows } = toDriverResult(next.value as PgResult);
        if (rows.length > 0) yield rows;
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
      await cancelled;
      if (!ended) await batches.return?.();
    }
  }

  onClose(listener: () => void): void {
    if (this.#closed) listener();
    else this.#listeners.push(listener);
  }

  onNotification(listener: NotificationListener): void {
    if (!this.#closed) this.#notified.push(listener);
  }

  async close(): Promise<void> {
    this.#markClosed();
    await this.#sql.end({ timeout: 5 });
  }

  /** Converts a postgres.js failure, marking the session closed when it was lost. */
  toQueryError(error: unknown, sql: string, params: readonly unknown[]): QueryError {
    const e = error as Record<string, unknown> & Error;
    if (e?.name === "PostgresError") {
      const sqlstate = e.code as string;
      if (sqlstate.startsWith("08") || sqlstate.startsWith("57P")) this.#lose();
      return new QueryError(e.message, sql, params, serverFields(e), { cause: error });
    }
    const code = typeof e?.code === "string" ? e.code : undefined;
    if (code !== undefined && CONNECTION_LOST_CODES.has(code)) {
      this.#lose();
      return new QueryError(
        `Cannot finish the query: the connection to the server was lost (${code}); ` +
          "it may or may not have run, so retry only if it is safe to repeat",
        sql,
        params,
        { sqlstate: "08006" },
        { cause: error },
      );
    }
    if (code !== undefined && SQLSTATE.test(code)) {
      // postgres.js's own errors in SQLSTATE form, such as 57014 for a query cancelled
      // while it still waited in postgres.js's queue.
      const message = (e.message ?? "").replace(`${code}: `, "");
      return new QueryError(message, sql, params, { sqlstate: code }, { cause: error });
    }
    if (this.#closed) {
      // Whatever the socket layer threw once the session was gone (a write after the end,
      // a destroyed stream) is a lost connection to the caller.
      return new QueryError(
        "Cannot finish the query: the connection to the server was lost; it may or may not " +
          "have run, so retry only if it is safe to repeat",
        sql,
        params,
        { sqlstate: "08006" },
        { cause: error },
      );
    }
    return new QueryError(
      `Cannot run the query: ${e?.message ?? String(error)}`,
      sql,
      params,
      {},
      { cause: error },
    );
  }

  /** Ends the session at once: statements in flight reject. */
  terminate(): Promise<void> {
    this.#markClosed();
    return this.#sql.end({ timeout: 0 }).catch(() => {});
  }

  #lose(): void {
    if (this.#closed) return;
    this.#markClosed();
    this.#sql.end({ timeout: 0 }).catch(() => {});
  }

  #markClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#notified = [];
    const listeners = this.#listeners;
    this.#listeners = [];
    for (const listener of listeners) listener();
  }
}

/**
 * The error of a session that did not open: the server's error with its fields (a FATAL one
 * refused the session; an ERROR failed a setup statement), or the socket's.
 */
function setupError(error: unknown, setupTimeoutMs: number): QueryError {
  const e = error as Error & Record<string, unknown>;
  if (e?.name !== "PostgresError") {
    return new QueryError(e?.message ?? String(error), "", [], {}, { cause: error });
  }
  const fields = serverFields(e);
  const message = fields.sqlstate === "57014" && /statement timeout/.test(e.message)
    ? `the statements that set up the connection (its pid, the server's array types) took ` +
      `longer than connectTimeoutMs (${setupTimeoutMs} ms), which bounds them instead of ` +
      `statementTimeoutMs and lockTimeoutMs (the server said: ${e.message}); the server is ` +
      "overloaded, or a session holds a lock on the system catalog pg_type"
    : e.message;
  return new QueryError(message, "", [], fields, { cause: error });
}

/**
 * The setup of a new session, under timeouts of its own: one row with its pid, its version
 * and every array type with its element type (what postgres.js would fetch per session) as
 * `element array` pairs separated by commas.
 */
function setupSql(timeoutMs: number): string {
  return [
    "BEGIN",
    `SET LOCAL statement_timeout = ${timeoutMs}`,
    "SET LOCAL lock_timeout = 0",
    `SELECT pg_backend_pid() AS pid, current_setting('server_version') AS version,
      (SELECT string_agg(DISTINCT b.oid::text || ' ' || b.typarray::text || ' ' ||
          (CASE WHEN b.typtype = 'd' THEN b.typbasetype ELSE b.oid END)::text, ',')
        FROM pg_catalog.pg_type a JOIN pg_catalog.pg_type b ON b.oid = a.typelem
        WHERE a.typcategory = 'A') AS arrays`,
    "COMMIT",
  ].join(";\n");
}

/**
 * An element type, its array type, and the type whose parser and serializer its elements
 * take: the element type's own, or a domain's base type (which is what PostgreSQL reports
 * for a column of the domain itself).
 */
type ArrayTypePair = readonly [element: number, array: number, parseAs: number];

/** The pairs of the setup's `element array parseAs,…` list. */
function arrayTypePairs(list: string): ArrayTypePair[] {
  return list === "" ? [] : list.split(",").map((pair) => {
    const [element, array, parseAs] = pair.split(" ").map(Number);
    return [element, array, parseAs] as const;
  });
}

interface TypeOptions {
  parsers: Record<number, ((text: string) => unknown) & { array?: boolean }>;
  serializers: Record<number, (value: unknown) => string>;
  shared: { typeArrayMap: Record<number, number> };
}

/**
 * Teaches one session's postgres.js instance array types: parsers that turn NULL elements into `null`, and serializers
 * for arrays bound as parameters.
 */
function installArrayTypes(options: TypeOptions, pairs: readonly ArrayTypePair[]): void {
  for (const [element, array, parseAs] of pairs) {
    const parse = options.parsers[parseAs];
    const serialize = options.serializers[parseAs];
    const delimiter = array === BOX_ARRAY ? ";" : ",";
    const parser = (text: string) => parseArrayBody(text, parse, delimiter);
    parser.array = true;
    options.parsers[array] = parser;
    options.serializers[array] = (value) => serializeArray(value, serialize, delimiter);
    options.shared.typeArrayMap[element] = array;
  }
}

/** `box[]`, the one array type whose elements are separated by `;`. */
const BOX_ARRAY = 1020;

/** How long a cancelled COPY out may take to end before its session is ended instead. */
const COPY_STOP_MS = 2000;

/**
 * Reads a COPY-out stream in chunks of everything it has buffered: it holds one buffer per
 * row, and handing each on alone costs more than joining them. Waits with the stream's own
 * async iterator (never ended early: its `return()` would destroy the stream).
 *
 * postgres.js pauses the session's socket whenever the stream's buffer is full and resumes
 * it only from the stream's `_read()`, which a stream that has ended never calls again: a
 * COPY whose end arrived while the socket was paused would leave it paused, and the
 * session would hang on its next statement. So the reader resumes the socket, through
 * that same `_read()`, once the stream has ended or failed.
 */
class CopyOutReader {
  readonly #stream: Readable;
  readonly #rows: AsyncIterator<Buffer>;

  constructor(stream: Readable) {
    this.#stream = stream;
    this.#rows = stream[Symbol.asyncIterator]();
  }

  /** The next chunk, or `null` at the end; rejects with the error that ended the stream. */
  async next(): Promise<Uint8Array | null> {
    let next: IteratorResult<Buffer>;
    try {
      next = await this.#rows.next();
    } catch (error) {
      this.#resume();
      throw error;
    }
    if (next.done) {
      this.#resume();
      return null;
    }
    const first = next.value;
    const rows: Buffer[] = [first];
    let length = first.byteLength;
    for (let row = this.#read(); row !== null; row = this.#read()) {
      rows.push(row);
      length += row.byteLength;
    }
    if (rows.length === 1) return new Uint8Array(first.buffer, first.byteOffset, length);
    const chunk = new Uint8Array(length);
    let at = 0;
    for (const row of rows) {
      chunk.set(row, at);
      at += row.byteLength;
    }
    return chunk;
  }

  #resume(): void {
    (this.#stream as unknown as { _read(size: number): void })._read(0);
  }

  #read(): Buffer | null {
    return this.#stream.readableLength > 0 ? this.#stream.read() as Buffer | null : null;
  }
}

/** A postgres.js COPY query, with the settle functions the driver wraps. */
type CopyQuery = PgQuery & {
  resolve: (value: unknown) => void;
  reject: (error: unknown) => void;
};

/** How a COPY statement ends: its row count, or its error. */
interface CopyWatch {
  /** The row count of the command tag, once the statement ended. */
  count: Promise<number>;
  /** Rejects with the statement's error; never resolves. */
  failed: Promise<never>;
  /** Settles when the statement ended either way (the session is ready again). */
  ended: Promise<void>;
  /** True once it ended. */
  over: boolean;
}

/**
 * Watches a COPY query's end. postgres.js resolves a COPY query with its stream, and then
 * resolves it a second time (ignored) with the result that holds the row count, or rejects
 * it (also ignored) with a server error that neither ends nor fails a COPY-in stream: both
 * are caught where the query is settled.
 */
function watchCopy(query: CopyQuery): CopyWatch {
  let counted!: (count: number) => void;
  let serverError!: (error: unknown) => void;
  const watch: CopyWatch = {
    count: new Promise<number>((resolve) => counted = resolve),
    failed: new Promise<never>((_, reject) => serverError = reject),
    ended: Promise.resolve(),
    over: false,
  };
  watch.failed.catch(() => {});
  watch.ended = Promise.race([watch.count, watch.failed]).then(() => {}, () => {});
  watch.ended.then(() => watch.over = true);
  const resolve = query.resolve;
  query.resolve = (value) => {
    if (Array.isArray(value) && "count" in value) counted(Number(value.count ?? 0));
    resolve(value);
  };
  const reject = query.reject;
  query.reject = (error) => {
    serverError(error);
    reject(error);
  };
  return watch;
}

/** What {@link abortion} rejects with when its signal aborts. */
const ABORTED = Symbol("aborted");

/**
 * A promise that rejects with {@link ABORTED} once `signal` aborts (and never settles
 * otherwise), to race the steps of a COPY against; `dispose` removes its listener.
 */
function abortion(signal: AbortSignal | undefined): { promise: Promise<never>; dispose(): void } {
  if (signal === undefined) return { promise: new Promise<never>(() => {}), dispose() {} };
  let onAbort!: () => void;
  const promise = new Promise<never>((_, reject) => {
    onAbort = () => reject(ABORTED);
    signal.addEventListener("abort", onAbort, { once: true });
  });
  promise.catch(() => {});
  return { promise, dispose: () => signal.removeEventListener("abort", onAbort) };
}

/**
 * Sends a COPY's cancel request, once, unless the COPY has ended. postgres.js marks a COPY
 * query inactive once it resolved with its stream, and would hold a cancel for an inactive
 * query until its turn, which has come already.
 */
function copyCanceller(query: CopyQuery, copy: CopyWatch): () => Promise<void> {
  const send = takeCanceller(query);
  let cancelled: Promise<void> | undefined;
  return () =>
    cancelled ??= copy.over || send === undefined ? Promise.resolve() : (() => {
      (query as unknown as QueryInternals).active = true;
      return send();
    })();
}

/**
 * Takes a query's canceller (once: `undefined` after that) as a function that sends the
 * cancel request and settles once the server took it, never rejecting. Query.cancel() would
 * drop the request's promise, so a failed request (the server or a pooler resetting it)
 * would be an unhandled rejection.
 */
function takeCanceller(query: PgQuery): (() => Promise<void>) | undefined {
  const internals = query as unknown as QueryInternals;
  const canceller = internals.canceller;
  if (typeof canceller !== "function") return undefined;
  internals.canceller = null;
  return () => Promise.resolve(canceller(query)).then(() => {}, () => {});
}

/** Carries an error of the caller's COPY source past the driver's own error handling. */
class CopySourceError {
  constructor(readonly error: unknown) {}
}

/** The parts of a postgres.js query the cancel path reads. */
interface QueryInternals {
  /** Set once postgres.js wrote the query to its session. */
  state: unknown;
  /** True while the query is the one whose answer the session reads. */
  active: boolean;
  canceller: ((query: PgQuery) => Promise<void>) | null;
  /** Hands the query to a session (called once, a microtask after the query is made). */
  handler: (query: PgQuery) => void;
}

class PostgresRunningQuery implements RunningQuery {
  readonly result: Promise<DriverResult>;
  readonly #query: PgQuery;
  #cancelled?: Promise<void>;

  constructor(
    query: PgQuery,
    connection: PostgresConnection,
    sql: string,
    params: readonly unknown[],
  ) {
    this.#query = query;
    // Handed to its session now (as then() would), so that a close() right after still
    // finishes it.
    query.execute();
    this.result = settled(query, connection, sql, params);
  }

  /**
   * A query not yet written to the session is taken out of postgres.js's queue (it rejects
   * with 57014); the query the session is running gets a CancelRequest now; a query written
   * behind others gets one once it is the query the session runs. postgres.js itself would
   * mark that last one cancelled and skip it when its turn came, although the server still
   * runs it, so every later answer would go to the wrong query.
   */
  cancel(): Promise<void> {
    return this.#cancelled ??= this.#requestCancel();
  }

  async #requestCancel(): Promise<void> {
    const query = this.#query as unknown as QueryInternals;
    const send = takeCanceller(this.#query);
    if (send === undefined) return;
    if (!query.state) {
      // Not written yet: withdrawn. postgres.js hands a new query to its session a microtask
      // after making it; a query cancelled in between would still reach the session, which
      // skips it and then stays "full" forever: it must not be handed over at all.
      query.handler = () => {};
      return await send();
    }
    if (query.active) return await send();
    return await new Promise<void>((resolve) => {
      let active = false;
      let sent = false;
      Object.defineProperty(query, "active", {
        configurable: true,
        get: () => active,
        set: (value: boolean) => {
          active = value;
          if (value && !sent) {
            sent = true;
            send().then(resolve);
          }
        },
      });
      // Settled before its turn (its session was lost): there is nothing left to cancel.
      const settled = () => {
        if (!sent) resolve();
      };
      this.result.then(settled, settled);
    });
  }
}

/**
 * A statement's result, or its error as a {@link QueryError}. Awaited, not given callbacks
 * with `then()`: with `then()` V8's young-generation collections kept about 4 MB of dead
 * objects alive each (promoted, collected only by full collections), with `await` 0.15 MB,
 * as with raw postgres.js. Measured with 64 callers looping on point reads straight on the
 * driver (`--trace-gc-nvp`, field new_space_survived); why is not known.
 */
async function settled(
  query: PgQuery,
  connection: PostgresConnection,
  sql: string,
  params: readonly unknown[],
): Promise<DriverResult> {
  let result: PgResult;
  try {
    result = await query as unknown as PgResult;
  } catch (error) {
    throw connection.toQueryError(error, sql, params);
  }
  return connection.typed(result);
}

/** A postgres.js result: one statement's, or each statement's of a multi-statement text. */
type PgResult = PgStatementResult | PgStatementResult[];

/** One statement's rows, as postgres.js hands them over. */
type PgStatementResult = postgres.RowList<Row[]> & {
  /** The result's columns (`null` for a command without rows). */
  columns: ReadonlyArray<{ name: string; type: number }> | null;
};

/** The result of a text's last statement: what the driver returns. */
function lastResult(result: PgResult): PgStatementResult {
  return (result as { command?: unknown }).command === undefined
    ? (result as PgStatementResult[])[(result as unknown[]).length - 1]
    : result as PgStatementResult;
}

/**
 * `result` with the text postgres.js left in the columns whose type now has an array parser
 * parsed (postgres.js hands an array parser the text after its opening brace). A name that
 * several columns share holds the last one's value.
 */
function reparsed(
  result: DriverResult,
  columns: ReadonlyArray<{ name: string; type: number }>,
  parsers: TypeOptions["parsers"],
): DriverResult {
  columns.forEach((column, index) => {
    const parse = parsers[column.type];
    if (parse?.array !== true) return;
    if (columns.findLastIndex((other) => other.name === column.name) !== index) return;
    for (const row of result.rows) {
      const value = row[column.name];
      if (typeof value === "string") row[column.name] = parse(value.slice(1));
    }
  });
  return result;
}

/** A text's last rows as a plain array (a loop: slice() on postgres.js's Array subclass is slow). */
function toDriverResult(result: PgResult): DriverResult {
  const last = lastResult(result);
  const length = last.length;
  // postgres.js keeps its row counter after a query that failed while streaming rows, so
  // the next query's rows start at that index (porsager/postgres#1119, #1181).
  if (length > 0 && !(0 in last)) return compacted(last);
  const rows: Row[] = new Array(length);
  for (let i = 0; i < length; i++) rows[i] = last[i];
  return { rows, command: last.command ?? "", rowCount: last.count ?? length };
}

function compacted(last: postgres.RowList<Row[]>): DriverResult {
  const rows: Row[] = [];
  for (let i = 0; i < last.length; i++) if (i in last) rows.push(last[i]);
  return { rows, command: last.command ?? "", rowCount: last.count ?? rows.length };
}

function serverFields(e: Record<string, unknown>): ServerErrorFields {
  const str = (value: unknown) => typeof value === "string" ? value : undefined;
  const position = str(e.position);
  return {
    sqlstate: str(e.code),
    severity: str(e.severity),
    detail: str(e.detail),
    hint: str(e.hint),
    position: position === undefined ? undefined : Number(position),
    schemaName: str(e.schema_name),
    table: str(e.table_name),
    column: str(e.column_name),
    constraint: str(e.constraint_name),
  };
}

function closedQuery(sql: string, params: readonly unknown[]): RunningQuery {
  const result = Promise.reject(
    new QueryError(
      "Cannot run the query: its connection is closed; run it again to use a fresh connection",
      sql,
      params,
      { sqlstate: "08003" },
    ),
  );
  return { result, cancel: () => Promise.resolve() };
}
