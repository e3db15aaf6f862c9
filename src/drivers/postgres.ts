/**
 * The network driver: one postgres.js instance with `max: 1` per session, so each
 * {@link DriverConnection} is exactly one server backend (its own pid, pipelining, cancel).
 * postgres.js never reconnects a session behind our back: once the socket closes, the
 * connection is marked closed and the pool replaces it (re-running `initCommands`).
 *
 * @module
 */

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
import { parseArrayBody, serializeArray } from "./_pg_array.ts";
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
  return {
    maxSessions: Infinity,
    capabilities: { parameterizedAlone: !config.prepare },
    connect: () => PostgresConnection.open(options),
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
  }

  static async open(options: postgres.Options<Record<string, never>>): Promise<PostgresConnection> {
    const connection = new PostgresConnection(options);
    try {
      const [[identity], types] = await Promise.all([
        connection.#sql.unsafe(
          "SELECT pg_backend_pid() AS pid, current_setting('server_version') AS version",
        ),
        connection.#sql.unsafe(ARRAY_TYPES_SQL),
      ]);
      connection.#pid = identity.pid as number;
      connection.#serverVersion = identity.version as string;
      installArrayTypes(
        connection.#sql.options as unknown as TypeOptions,
        types as unknown as ArrayTypeRow[],
      );
      return connection;
    } catch (error) {
      connection.#markClosed();
      await connection.#sql.end({ timeout: 0 }).catch(() => {});
      const e = error as Error & { code?: unknown };
      const sqlstate = e?.name === "PostgresError" ? String(e.code) : undefined;
      throw new QueryError(e?.message ?? String(error), "", [], { sqlstate }, { cause: error });
    }
  }

  get pid(): number {
    return this.#pid;
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

  async copyIn(sql: string, chunks: AsyncIterable<string>): Promise<number> {
    if (this.#closed) return closedQuery(sql, []).result.then(() => 0);
    const query = this.#sql.unsafe(sql) as PgQuery & {
      resolve: (value: unknown) => void;
      reject: (error: unknown) => void;
    };
    // The query resolves with its stream; its result (with the row count of the command
    // tag) comes in a second, ignored resolve at the end: read the count there.
    let counted!: (count: number) => void;
    const count = new Promise<number>((resolve) => counted = resolve);
    const resolve = query.resolve;
    query.resolve = (value) => {
      if (Array.isArray(value) && "count" in value) counted(Number(value.count ?? 0));
      resolve(value);
    };
    // postgres.js resolves a COPY query with its stream, then loses a later server error
    // (the stream neither finishes nor errors): catch it where the query is rejected.
    let serverError: (error: unknown) => void = () => {};
    const failed = new Promise<never>((_, reject) => serverError = reject);
    failed.catch(() => {});
    const reject = query.reject;
    query.reject = (error) => {
      serverError(error);
      reject(error);
    };
    try {
      const stream = await query.writable();
      const finished = new Promise<void>((resolve, reject) => {
        stream.once("finish", resolve);
        stream.once("error", reject);
      });
      finished.catch(() => {});
      const source = chunks[Symbol.asyncIterator]();
      while (true) {
        let next: IteratorResult<string>;
        try {
          next = await source.next();
        } catch (error) {
          // The caller's own records failed: end the COPY (the server rolls it back) and
          // hand the caller its own error.
          stream.destroy(error instanceof Error ? error : new Error(String(error)));
          await Promise.race([finished, failed]).catch(() => {});
          throw new CopySourceError(error);
        }
        if (next.done) break;
        if (!stream.write(next.value)) {
          await Promise.race([
            new Promise<void>((resolve) => stream.once("drain", resolve)),
            finished,
            failed,
          ]);
        }
      }
      stream.end();
      await Promise.race([finished, failed]);
      return await Promise.race([count, failed]);
    } catch (error) {
      if (error instanceof CopySourceError) throw error.error;
      if (error instanceof RangeError || error instanceof TypeError) throw error;
      throw this.toQueryError(error, sql, []);
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

/** Every array type with its element type (what postgres.js would fetch per session). */
const ARRAY_TYPES_SQL = `SELECT b.oid, b.typarray
  FROM pg_catalog.pg_type a JOIN pg_catalog.pg_type b ON b.oid = a.typelem
  WHERE a.typcategory = 'A' GROUP BY b.oid, b.typarray`;

interface ArrayTypeRow {
  oid: number | string;
  typarray: number | string;
}

interface TypeOptions {
  parsers: Record<number, ((text: string) => unknown) & { array?: boolean }>;
  serializers: Record<number, (value: unknown) => string>;
  shared: { typeArrayMap: Record<number, number> };
}

/**
 * Teaches one session's postgres.js instance the server's array types: parsers that turn
 * NULL elements into `null`, and serializers for arrays bound as parameters.
 */
function installArrayTypes(options: TypeOptions, rows: readonly ArrayTypeRow[]): void {
  for (const row of rows) {
    const element = Number(row.oid);
    const array = Number(row.typarray);
    const parse = options.parsers[element];
    const serialize = options.serializers[element];
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
    this.result = query.then(toDriverResult, (error) => {
      throw connection.toQueryError(error, sql, params);
    });
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
    const canceller = query.canceller;
    if (typeof canceller !== "function") return;
    query.canceller = null;
    // Query.cancel() drops the promise of the cancel request, so a failed request (the
    // server or a pooler resetting it) would be an unhandled rejection: call the canceller
    // itself and keep its promise.
    const send = () => Promise.resolve(canceller(this.#query)).then(() => {}, () => {});
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

/** Copies rows into a plain array (a loop: slice() on postgres.js's Array subclass is slow). */
function toDriverResult(result: postgres.RowList<Row[]> | postgres.RowList<Row[]>[]): DriverResult {
  const last = (result as { command?: unknown }).command === undefined
    ? (result as postgres.RowList<Row[]>[])[(result as unknown[]).length - 1]
    : result as postgres.RowList<Row[]>;
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
