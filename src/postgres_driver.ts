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
import type { ResolvedConfig, ResolvedSsl } from "./config.ts";
import type { Driver, DriverConnection, DriverResult, Row, RunningQuery } from "./driver.ts";
import { QueryError, type ServerErrorFields } from "./errors.ts";
import { parseArrayBody } from "./_pg_array.ts";
import { byteaFromHex, byteaToHex } from "./_bytea.ts";

type Sql = ReturnType<typeof postgres>;
type PgQuery = ReturnType<Sql["unsafe"]>;
type TlsOptions = Record<string, unknown>;

const SQLSTATE = /^[0-9A-Z]{5}$/;

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
    connect: () => PostgresConnection.open(options),
    close: () => Promise.resolve(),
  };
}

function connectionOptions(config: ResolvedConfig): postgres.Options<Record<string, never>> {
  return {
    host: config.host,
    port: config.port,
    database: config.database,
    username: config.user,
    password: config.password,
    max: 1,
    idle_timeout: 0,
    max_lifetime: null,
    connect_timeout: config.connectTimeoutMs / 1000,
    prepare: config.prepare,
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
  #pid = 0;
  #serverVersion = "";
  #closed = false;
  #listeners: Array<() => void> = [];

  private constructor(options: postgres.Options<Record<string, never>>) {
    // A lost session must fail what postgres.js still holds for it: left alone, it keeps
    // the queries not yet sent and reconnects to run them, so they hang while the server
    // is down.
    this.#sql = postgres({ ...options, onclose: () => this.#lose() });
  }

  static async open(options: postgres.Options<Record<string, never>>): Promise<PostgresConnection> {
    const connection = new PostgresConnection(options);
    try {
      const [row] = await connection.#sql.unsafe(
        "SELECT pg_backend_pid() AS pid, current_setting('server_version') AS version",
      );
      connection.#pid = row.pid as number;
      connection.#serverVersion = row.version as string;
      replaceArrayParsers(connection.#sql.options as unknown as ParserOptions);
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

  query(sql: string, params: readonly unknown[], prepare: boolean): RunningQuery {
    if (this.#closed) return closedQuery(sql, params);
    const query = params.length === 0
      ? this.#sql.unsafe(sql)
      : this.#sql.unsafe(sql, params as postgres.ParameterOrJSON<never>[], { prepare });
    return new PostgresRunningQuery(query, this, sql, params);
  }

  async copyIn(sql: string, chunks: AsyncIterable<string>): Promise<number> {
    if (this.#closed) return closedQuery(sql, []).result.then(() => 0);
    const query = this.#sql.unsafe(sql) as PgQuery & { reject: (error: unknown) => void };
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
      try {
        for await (const chunk of chunks) {
          if (!stream.write(chunk)) {
            await Promise.race([
              new Promise<void>((resolve) => stream.once("drain", resolve)),
              finished,
              failed,
            ]);
          }
        }
      } catch (error) {
        stream.destroy(error instanceof Error ? error : new Error(String(error)));
        await Promise.race([finished, failed]).catch(() => {});
        throw error;
      }
      stream.end();
      await Promise.race([finished, failed]);
      const done = await query;
      return (done as { count?: number }).count ?? 0;
    } catch (error) {
      if (error instanceof RangeError || error instanceof TypeError) throw error;
      throw this.toQueryError(error, sql, []);
    }
  }

  onClose(listener: () => void): void {
    if (this.#closed) listener();
    else this.#listeners.push(listener);
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
    const listeners = this.#listeners;
    this.#listeners = [];
    for (const listener of listeners) listener();
  }
}

interface ParserOptions {
  parsers: Record<number, ((text: string) => unknown) & { array?: boolean }>;
  shared: { typeArrayMap: Record<number, number> };
}

/** Swaps postgres.js's array parsers for ones that turn NULL elements into `null`. */
function replaceArrayParsers(options: ParserOptions): void {
  for (const [element, array] of Object.entries(options.shared.typeArrayMap)) {
    const parse = options.parsers[Number(element)];
    const delimiter = array === 1020 ? ";" : ",";
    const parser = (text: string) => parseArrayBody(text, parse, delimiter);
    parser.array = true;
    options.parsers[array] = parser;
  }
}

class PostgresRunningQuery implements RunningQuery {
  readonly result: Promise<DriverResult>;
  readonly #query: PgQuery;

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

  cancel(): Promise<void> {
    // Query.cancel() drops the promise of the cancel request, so a failed request (the
    // server or a pooler resetting it) would be an unhandled rejection: call the canceller
    // itself and keep its promise.
    const query = this.#query as PgQuery & { canceller: ((q: PgQuery) => Promise<void>) | null };
    const canceller = query.canceller;
    if (typeof canceller !== "function") return Promise.resolve();
    query.canceller = null;
    return Promise.resolve(canceller(query)).then(() => {}, () => {});
  }
}

/** Copies rows into a plain array (a loop: slice() on postgres.js's Array subclass is slow). */
function toDriverResult(result: postgres.RowList<Row[]> | postgres.RowList<Row[]>[]): DriverResult {
  const last = (result as { command?: unknown }).command === undefined
    ? (result as postgres.RowList<Row[]>[])[(result as unknown[]).length - 1]
    : result as postgres.RowList<Row[]>;
  const length = last.length;
  const rows: Row[] = new Array(length);
  for (let i = 0; i < length; i++) rows[i] = last[i];
  return { rows, command: last.command ?? "", rowCount: last.count ?? length };
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
