/**
 * `DatabaseManager`: schema-isolated query methods over a pool, standalone (owning its
 * pool) or over a shared one (`{ pool, schema }`).
 *
 * @module
 */

import { type DatabaseConfig, resolveConfig, type ResolvedConfig } from "./config.ts";
import type { DriverResult, Row } from "./drivers/driver.ts";
import { ConfigurationError, PoolError, QueryError } from "./errors.ts";
import {
  ConnectionPool,
  createSharedPool,
  type Pool,
  type PoolStats,
  type QueryOptions,
} from "./pool/pool.ts";
import { Queries, type Runner } from "./queries.ts";
import type { ListenOptions, NotificationHandler, Subscription } from "./listen.ts";
import {
  cursorBatches,
  type CursorSession,
  portalBatches,
  type Reporter,
  type StreamOptions,
} from "./stream.ts";
import { assertIdentifier, quoteIdentifier } from "./template.ts";
import { Connection, LeaseRunner, runTransaction, type Transaction } from "./transaction.ts";

/** Options of a manager over a shared pool. */
export interface SharedPoolOptions {
  /** The pool from {@link createSharedPool}. */
  pool: Pool;
  /** The schema this manager's templates expand to. */
  schema?: string;
}

/** What `getPoolStats()` returns. */
export interface ManagerPoolStats extends PoolStats {
  /** The database name. */
  database: string;
  /** This manager's schema, or `null`. */
  schema: string | null;
  /** The server process id of one pool connection, or `null` when not connected. */
  pid: number | null;
  /** The server's version, or `null` when not connected. */
  version: string | null;
}

/** Options of `dropSchema()`. */
export interface DropSchemaOptions {
  /**
   * Also drop every object in the schema.
   * @default {false}
   */
  cascade?: boolean;
}

/** The pool a family of managers (one and its `withSchema()` copies) runs on. */
interface PoolHolder {
  pool?: ConnectionPool;
  readonly config?: ResolvedConfig;
}

/** Marks options built by `withSchema()`: a view over another manager's pool. */
const VIEW_OF: unique symbol = Symbol("pgdbm.viewOf");
/** Marks options built by `onPrimary()`: every read goes to the primary. */
const PRIMARY_ONLY: unique symbol = Symbol("pgdbm.primaryOnly");

const SHARED_PATTERN = "  const pool = await createSharedPool({ connectionString });\n" +
  '  const users = new DatabaseManager({ pool, schema: "users" });\n' +
  '  const orders = new DatabaseManager({ pool, schema: "orders" });';

/**
 * Runs schema-isolated queries: every method expands `{{tables.name}}` and `{{schema}}`
 * for this manager's schema, so the same SQL serves every service and tenant.
 *
 * @example Standalone: the manager owns its pool (needs a server)
 * ```ts ignore
 * import { DatabaseManager } from "@pgdbm/pgdbm";
 * await using db = new DatabaseManager({ connectionString: Deno.env.get("DATABASE_URL"), schema: "app" });
 * await db.connect();
 * await db.execute("CREATE TABLE IF NOT EXISTS {{tables.notes}} (id serial PRIMARY KEY, body text)");
 * const id = await db.executeAndReturnId("INSERT INTO {{tables.notes}} (body) VALUES ($1)", ["hi"]);
 * ```
 *
 * @example Shared pool: one pool, many schemas (needs a server)
 * ```ts ignore
 * import { createSharedPool, DatabaseManager } from "@pgdbm/pgdbm";
 * const pool = await createSharedPool({ connectionString: Deno.env.get("DATABASE_URL") });
 * const users = new DatabaseManager({ pool, schema: "users" });
 * const tenant = users.withSchema("tenant_42");
 * await pool.close();
 * ```
 */
export class DatabaseManager extends Queries implements AsyncDisposable {
  readonly #holder: PoolHolder;
  readonly #owner: boolean;
  readonly #primaryOnly: boolean;

  /**
   * Makes a manager; a standalone one opens its pool in `connect()`.
   *
   * @param options A {@link DatabaseConfig} for a standalone manager, or
   *   `{ pool, schema }` for one over a shared pool.
   * @throws {ConfigurationError} When an option is invalid, or a pool is combined with
   *   connection options.
   * @throws {SchemaError} When the schema is not a valid identifier.
   */
  constructor(options: DatabaseConfig | SharedPoolOptions) {
    const view = (options as { [VIEW_OF]?: PoolHolder })?.[VIEW_OF];
    const primaryOnly = (options as { [PRIMARY_ONLY]?: boolean })?.[PRIMARY_ONLY] === true;
    const shared = view !== undefined ||
      (options !== null && typeof options === "object" && "pool" in options);
    const holder: PoolHolder = view ??
      (shared
        ? { pool: checkSharedOptions(options as SharedPoolOptions) }
        : { config: resolveConfig(options as DatabaseConfig) });
    const schema = shared ? (options as SharedPoolOptions).schema : holder.config!.schema;
    if (shared && schema !== undefined && schema !== null) assertIdentifier(schema, "schema");
    super(new PoolRunner(holder, primaryOnly), schema ?? undefined);
    this.#holder = holder;
    this.#owner = !shared;
    this.#primaryOnly = primaryOnly;
  }

  /**
   * Opens a pool to share among managers (same as the top-level {@link createSharedPool}).
   *
   * @param config Connection and pool options.
   * @returns The open pool.
   */
  static createSharedPool(config: DatabaseConfig): Promise<Pool> {
    return createSharedPool(config);
  }

  /** The pool this manager runs on. */
  get pool(): Pool {
    return requirePool(this.#holder);
  }

  /**
   * Opens the pool of a standalone manager (retrying per `retry`) and creates its schema
   * when it has one. A second call does nothing.
   *
   * @throws {PoolError} On a manager over a shared pool: its owner opened it.
   * @throws {ConnectionError} When the server cannot be reached.
   */
  async connect(): Promise<void> {
    if (!this.#owner) {
      throw new PoolError(
        "Cannot call connect() on a manager over a shared pool: the pool is already open and " +
          "its owner manages it. Use the manager directly, and close the pool itself at shutdown:\n" +
          SHARED_PATTERN,
      );
    }
    if (this.#holder.pool !== undefined && !this.#holder.pool.closed) return;
    const config = this.#holder.config!;
    if (ConnectionPool.openCount(config) > 0) {
      config.logger.warn(
        "pgdbm: opening another standalone pool to the same database. Each pool holds its own " +
          "connections; share one pool between managers instead:\n" + SHARED_PATTERN,
      );
    }
    this.#holder.pool = await ConnectionPool.open(config);
    await this.ensureSchema();
  }

  /**
   * Closes the pool of a standalone manager after running queries finish. On a manager
   * over a shared pool it does nothing: the pool's owner closes the pool.
   */
  async close(): Promise<void> {
    if (this.#owner) await this.#holder.pool?.close();
  }

  /** Same as `close()`, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /**
   * A manager for another schema over the same pool: cheap, nothing is opened.
   *
   * @param schema The other schema.
   * @returns A manager that does not own the pool.
   * @throws {SchemaError} When `schema` is not a valid identifier.
   */
  withSchema(schema: string): DatabaseManager {
    assertIdentifier(schema, "schema");
    return this.#view(schema, this.#primaryOnly);
  }

  /**
   * A manager for the same schema and pool whose reads all go to the primary, even when
   * the pool has `replicas`: for reading what was just written. Cheap, nothing is opened;
   * without replicas it behaves exactly like this manager.
   *
   * @returns A manager that does not own the pool.
   *
   * @example Read your own write (needs a server)
   * ```ts ignore
   * await db.execute("INSERT INTO {{tables.users}} (email) VALUES ($1)", [email]);
   * const user = await db.onPrimary().fetchOne("SELECT * FROM {{tables.users}} WHERE email = $1", [email]);
   * ```
   */
  onPrimary(): DatabaseManager {
    return this.#view(this.schema, true);
  }

  #view(schema: string | undefined, primaryOnly: boolean): DatabaseManager {
    const options = { schema, [VIEW_OF]: this.#holder, [PRIMARY_ONLY]: primaryOnly };
    return new DatabaseManager(options as unknown as SharedPoolOptions);
  }

  /**
   * Creates this manager's schema if it does not exist (no-op without a schema).
   *
   * @throws {QueryError} When the user may not create schemas.
   */
  async ensureSchema(): Promise<void> {
    if (this.schema === undefined) return;
    try {
      await this.execute(`CREATE SCHEMA IF NOT EXISTS ${quoteIdentifier(this.schema)}`);
    } catch (error) {
      if (!(error instanceof QueryError && error.sqlstate === "23505")) throw error;
    }
  }

  /**
   * Drops this manager's schema if it exists.
   *
   * @param options `cascade` to drop what it contains too.
   * @throws {ConfigurationError} When the manager has no schema (it never drops `public`).
   */
  async dropSchema(options: DropSchemaOptions = {}): Promise<void> {
    if (this.schema === undefined) {
      throw new ConfigurationError(
        "schema",
        "Cannot drop the schema: this manager has none (it never drops 'public'); " +
          "use withSchema(name) for the schema to drop",
      );
    }
    await this.execute(
      `DROP SCHEMA IF EXISTS ${quoteIdentifier(this.schema)}${options.cascade ? " CASCADE" : ""}`,
    );
  }

  /**
   * Runs `fn` in a transaction on a connection of its own: `BEGIN`, then `COMMIT` when
   * `fn` returns or `ROLLBACK` when it throws (the error is rethrown).
   *
   * @param fn The work; `tx` has every query method and `tx.transaction()` for savepoints.
   * @returns What `fn` returns.
   * @throws {PoolError} When no connection comes free within `acquireTimeoutMs`.
   */
  async transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T> {
    const lease = await requirePool(this.#holder).lease();
    try {
      return await runTransaction(lease, this.schema, fn);
    } finally {
      lease.release();
    }
  }

  /**
   * Runs `fn` with a connection of its own for as long as it runs.
   *
   * @param fn The work; `conn` has every query method, `transaction()` and `raw`.
   * @returns What `fn` returns.
   * @throws {PoolError} When no connection comes free within `acquireTimeoutMs`.
   */
  async acquire<T>(fn: (conn: Connection) => Promise<T>): Promise<T> {
    const lease = await requirePool(this.#holder).lease();
    const runner = new LeaseRunner(lease, false);
    try {
      return await fn(new Connection(runner, this.schema));
    } finally {
      runner.close();
      if (runner.beganOwnTransaction) {
        await lease.query("ROLLBACK", []).catch(() => lease.release(true));
      }
      lease.release();
    }
  }

  /**
   * Calls `onMessage` with the payload of each notification sent to `channel` (by
   * `notify()` or `pg_notify()`/`NOTIFY` anywhere in the database), until `unlisten()`.
   *
   * All the listens of a pool share one listening session. On a server it is a
   * connection of its own, opened on the first `listen()` and counted against
   * `maxConnections` (in `getPoolStats()` as a used connection; at the cap the pool closes
   * one of its other connections to make room), and closed when the last subscription
   * ends or the pool closes. On the embedded engine (PGlite) it is the pool's one session
   * (a session the pool replaces listens before its first statement: nothing is missed and
   * `onReconnect` is not called there).
   * When the session is lost (a terminated backend, a server restart) the pool opens a
   * new one with its `retry` policy (round after round, until it works or the pool
   * closes), listens again on every channel, then calls each `onReconnect`. PostgreSQL
   * keeps no notifications for a session that is gone: what was sent meanwhile is lost,
   * so resync in `onReconnect`.
   *
   * The channel is a name global to the database: it is not prefixed with the manager's
   * schema and templates are not expanded in it; for a channel per schema, name it after
   * the schema (`${db.schema}_events`). A handler that throws (or rejects) is reported
   * through the `logger`; the other handlers still run.
   *
   * @example Listen, notify, stop listening
   * ```ts ignore
   * const sub = await db.listen("orders_changed", (payload) => console.log(JSON.parse(payload)), {
   *   onReconnect: () => console.log("reconnected: reload the orders"),
   * });
   * await db.notify("orders_changed", JSON.stringify({ id: 42 }));
   * await sub.unlisten();
   * ```
   *
   * @param channel The channel, 1 to 63 bytes.
   * @param onMessage Called with each payload.
   * @param options `onReconnect`: called after the session was lost and is listening again.
   * @returns The subscription; `unlisten()` ends it.
   * @throws {TypeError} When `channel` is not a string or `onMessage` not a function.
   * @throws {RangeError} When `channel` is empty or longer than 63 bytes.
   * @throws {PoolError} When the pool is closed, has `prepare: false` (a pooler in
   *   transaction mode, where LISTEN cannot work: use a direct URL), or has
   *   `maxConnections: 1` on a server.
   * @throws {ConnectionError} When the listening session cannot be opened.
   */
  async listen(
    channel: string,
    onMessage: NotificationHandler,
    options?: ListenOptions,
  ): Promise<Subscription> {
    return await requirePool(this.#holder).listen(channel, onMessage, options, this.schema);
  }

  /**
   * Prepares a statement on every current and future connection of the pool, as
   * `PREPARE name AS …` (templates expanded), so `EXECUTE name(…)` works on any of them.
   *
   * @param name The statement's name (an identifier).
   * @param sql The statement.
   */
  async addPreparedStatement(name: string, sql: string): Promise<void> {
    assertIdentifier(name, "prepared statement");
    await requirePool(this.#holder).addPreparedStatement(name, this.prepareQuery(sql));
  }

  /**
   * Live statistics of the pool, with the database, schema, a connection's pid and the
   * server version.
   *
   * @returns The statistics (`status: "closed"` before `connect()` and after `close()`).
   */
  getPoolStats(): ManagerPoolStats {
    const pool = this.#holder.pool;
    const server = pool?.server;
    const base: PoolStats = pool?.getStats() ?? {
      status: "closed",
      minSize: this.#holder.config?.minConnections ?? 0,
      maxSize: this.#holder.config?.maxConnections ?? 0,
      size: 0,
      idle: 0,
      used: 0,
      waiting: 0,
      queries: 0,
      errors: 0,
      acquireWaitMs: { p50: 0, p99: 0 },
      replicas: [],
    };
    return {
      ...base,
      database: (pool?.config ?? this.#holder.config)!.database,
      schema: this.schema ?? null,
      pid: server?.pid ?? null,
      version: server?.version ?? null,
    };
  }
}

/** Autocommit queries on the shared pool; batches and COPY lease a connection. */
class PoolRunner implements Runner {
  readonly #holder: PoolHolder;
  readonly #primaryOnly: boolean;

  constructor(holder: PoolHolder, primaryOnly: boolean) {
    this.#holder = holder;
    this.#primaryOnly = primaryOnly;
  }

  get config(): ResolvedConfig | undefined {
    return this.#holder.pool?.config;
  }

  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    const pool = this.#holder.pool;
    if (pool === undefined) return Promise.reject(notConnectedError());
    return pool.query(sql, params, options);
  }

  read(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    const pool = this.#holder.pool;
    if (pool === undefined) return Promise.reject(notConnectedError());
    return this.#primaryOnly ? pool.query(sql, params, options) : pool.read(sql, params, options);
  }

  async batch(sql: string, paramsList: readonly (readonly unknown[])[]): Promise<number> {
    const lease = await requirePool(this.#holder).lease();
    try {
      return await new LeaseRunner(lease, false).batch(sql, paramsList);
    } finally {
      lease.release();
    }
  }

  async copyIn(sql: string, chunks: AsyncIterable<string | Uint8Array>): Promise<number> {
    const lease = await requirePool(this.#holder).lease();
    try {
      return await lease.copyIn(sql, chunks);
    } finally {
      lease.release();
    }
  }

  async *stream(
    sql: string,
    params: readonly unknown[],
    options: StreamOptions | undefined,
    report: Reporter,
  ): AsyncGenerator<Row[]> {
    const lease = await requirePool(this.#holder).lease();
    if (lease.cursor !== undefined) {
      try {
        yield* portalBatches(lease.cursor, sql, params, options, report);
      } finally {
        lease.release();
      }
      return;
    }
    const session: CursorSession = {
      run: (text, values, runOptions) =>
        report(text, values, () => lease.query(text, values, runOptions)),
      inTransaction: false,
      cursorName: "pgdbm_cursor_1",
    };
    try {
      yield* cursorBatches(session, sql, params, options);
    } finally {
      lease.release(session.broken === true);
    }
  }

  async *copyOut(
    sql: string,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<Uint8Array, number> {
    const lease = await requirePool(this.#holder).lease();
    try {
      return yield* lease.copyOut(sql, signal);
    } finally {
      lease.release();
    }
  }
}

function checkSharedOptions(options: SharedPoolOptions): ConnectionPool {
  const extra = Object.keys(options).filter((key) => key !== "pool" && key !== "schema");
  if (extra.length > 0) {
    throw new ConfigurationError(
      "pool",
      `Cannot combine 'pool' with connection options (${extra.map((k) => `'${k}'`).join(", ")}): ` +
        "the shared pool already has its configuration. Pass only the pool and a schema:\n" +
        SHARED_PATTERN,
    );
  }
  if (!(options.pool instanceof ConnectionPool)) {
    throw new ConfigurationError(
      "pool",
      "Cannot use 'pool': it must be a pool from createSharedPool():\n" + SHARED_PATTERN,
    );
  }
  return options.pool;
}

function requirePool(holder: PoolHolder): ConnectionPool {
  if (holder.pool === undefined) throw notConnectedError();
  return holder.pool;
}

function notConnectedError(): PoolError {
  return new PoolError(
    "Cannot run the query: the manager is not connected; call `await db.connect()` first " +
      "(or build it over a shared pool: new DatabaseManager({ pool, schema }))",
  );
}
