/**
 * `DatabaseDebugger`: what is going on in the server right now — health, lock waits,
 * long-running queries and table sizes — read from PostgreSQL's statistics views.
 *
 * @module
 */

import type { DatabaseManager, ManagerPoolStats } from "../manager.ts";
import type { Row } from "../queries.ts";

/** What {@link DatabaseDebugger.checkConnectionHealth} returns. */
export interface ConnectionHealth {
  /** True when the server answered. */
  healthy: boolean;
  /** Why it is not healthy (the error's message), when it is not. */
  error?: string;
  /** Round trip of a `SELECT 1`, in milliseconds (including waiting for a connection). */
  latencyMs: number;
  /** The server's version, such as `"15.8"`, or `null` when it did not answer. */
  serverVersion: string | null;
  /** The database name, or `null` when the server did not answer. */
  database: string | null;
  /** True on a standby (recovering, read-only), or `null` when the server did not answer. */
  inRecovery: boolean | null;
  /** Client connections open on the whole server, or `null` when it did not answer. */
  connectionsUsed: number | null;
  /** The server's `max_connections`, or `null` when it did not answer. */
  maxConnections: number | null;
  /** This manager's pool. */
  pool: ManagerPoolStats;
}

/** One session waiting for a lock, and one session it waits for. */
export interface BlockingQuery {
  /** Process id of the waiting session. */
  blockedPid: number;
  /** The waiting session's user. */
  blockedUser: string | null;
  /** The statement that waits (as the server reports it). */
  blockedQuery: string;
  /** How long that statement has been running (mostly waiting), in milliseconds. */
  blockedDurationMs: number;
  /** What it waits on, such as `"Lock:transactionid"` or `"Lock:relation"`. */
  waitEvent: string | null;
  /** Process id of the session holding what it waits for. */
  blockingPid: number;
  /** The holding session's user. */
  blockingUser: string | null;
  /** The holding session's current or last statement. */
  blockingQuery: string;
  /** The holding session's state, such as `"idle in transaction"` or `"active"`. */
  blockingState: string | null;
  /** How long the holding session's transaction has been open, in milliseconds. */
  blockingTransactionMs: number | null;
}

/** An active statement that has run longer than asked. */
export interface LongRunningQuery {
  /** The session's process id. */
  pid: number;
  /** The session's user. */
  user: string | null;
  /** The session's `application_name`. */
  applicationName: string;
  /** The statement (as the server reports it). */
  query: string;
  /** The session's state (`"active"`). */
  state: string;
  /** What it waits on, such as `"Timeout:PgSleep"`, or `null` when running. */
  waitEvent: string | null;
  /** When the statement started. */
  startedAt: Date;
  /** How long it has been running, in milliseconds. */
  durationMs: number;
}

/** The size of one table of the schema. */
export interface TableSize {
  /** The table's name, unqualified. */
  table: string;
  /** `"table"`, `"partitioned table"` or `"materialized view"`. */
  kind: "table" | "partitioned table" | "materialized view";
  /** The planner's row estimate, or `null` before the table was first analyzed or vacuumed. */
  rowsEstimate: number | null;
  /** Bytes of the table's data (TOAST included, indexes excluded). */
  tableBytes: number;
  /** Bytes of its indexes. */
  indexBytes: number;
  /** Bytes of data and indexes. */
  totalBytes: number;
  /** `tableBytes` for people, such as `"8192 bytes"` or `"12 MB"`. */
  tableSize: string;
  /** `indexBytes` for people. */
  indexSize: string;
  /** `totalBytes` for people. */
  totalSize: string;
}

const HEALTH_SQL = `SELECT current_setting('server_version') AS version,
  current_database() AS database,
  pg_is_in_recovery() AS in_recovery,
  (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'client backend') AS used,
  current_setting('max_connections')::int AS max`;

const BLOCKING_SQL = `SELECT blocked.pid AS blocked_pid,
  blocked.usename AS blocked_user,
  blocked.query AS blocked_query,
  (extract(epoch FROM clock_timestamp() - blocked.query_start) * 1000)::float8 AS blocked_ms,
  blocked.wait_event_type || ':' || blocked.wait_event AS wait_event,
  blocking.pid AS blocking_pid,
  blocking.usename AS blocking_user,
  blocking.query AS blocking_query,
  blocking.state AS blocking_state,
  (extract(epoch FROM clock_timestamp() - blocking.xact_start) * 1000)::float8 AS blocking_ms
FROM pg_stat_activity AS blocked
CROSS JOIN LATERAL unnest(pg_blocking_pids(blocked.pid)) AS holder(pid)
JOIN pg_stat_activity AS blocking ON blocking.pid = holder.pid
WHERE blocked.datname = current_database() AND blocked.pid <> pg_backend_pid()
ORDER BY blocked.query_start, blocked.pid, blocking.pid`;

const LONG_RUNNING_SQL = `SELECT pid, usename AS user, application_name, query, state,
  wait_event_type || ':' || wait_event AS wait_event,
  query_start,
  (extract(epoch FROM clock_timestamp() - query_start) * 1000)::float8 AS duration_ms
FROM pg_stat_activity
WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND datname = current_database()
  AND query_start < clock_timestamp() - make_interval(secs => $1::float8)
ORDER BY query_start`;

const TABLE_SIZES_SQL = `SELECT c.relname AS table,
  CASE c.relkind WHEN 'p' THEN 'partitioned table' WHEN 'm' THEN 'materialized view'
    ELSE 'table' END AS kind,
  CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::float8 END AS rows_estimate,
  pg_table_size(c.oid)::float8 AS table_bytes,
  pg_indexes_size(c.oid)::float8 AS index_bytes,
  pg_total_relation_size(c.oid)::float8 AS total_bytes,
  pg_size_pretty(pg_table_size(c.oid)) AS table_size,
  pg_size_pretty(pg_indexes_size(c.oid)) AS index_size,
  pg_size_pretty(pg_total_relation_size(c.oid)) AS total_size
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = coalesce($1::text, current_schema()) AND c.relkind IN ('r', 'p', 'm')
ORDER BY total_bytes DESC, c.relname`;

/**
 * Looks into the server a manager runs on: connection health, who blocks whom, which
 * queries run long, and how big the manager's tables are. Every method leases one
 * connection of the manager's pool (the primary, never a read replica) for its query. Query texts are as the server reports them (`pg_stat_activity`,
 * cut at `track_activity_query_size`): they may hold literal values written into the SQL,
 * never the bound parameters.
 *
 * @example Find what holds a lock (needs a server)
 * ```ts ignore
 * import { DatabaseDebugger } from "@pgdbm/pgdbm/monitoring";
 * const debug = new DatabaseDebugger(db);
 * for (const wait of await debug.findBlockingQueries()) {
 *   console.log(`${wait.blockedPid} waits for ${wait.blockingPid}: ${wait.blockingQuery}`);
 * }
 * ```
 */
export class DatabaseDebugger {
  readonly #db: DatabaseManager;

  /**
   * Makes a debugger over a manager (connected, or over a shared pool).
   *
   * @param db The manager whose server and schema to look at.
   */
  constructor(db: DatabaseManager) {
    this.#db = db;
  }

  /**
   * Measures a round trip and reads the server's version, recovery state and connection
   * use. Does not throw when the server cannot be reached: it reports `healthy: false`
   * with the error's message.
   *
   * @returns The health report.
   *
   * @example Health endpoint (needs a server)
   * ```ts ignore
   * const health = await new DatabaseDebugger(db).checkConnectionHealth();
   * return Response.json(health, { status: health.healthy ? 200 : 503 });
   * ```
   */
  async checkConnectionHealth(): Promise<ConnectionHealth> {
    const start = performance.now();
    try {
      const { latencyMs, row } = await this.#db.acquire(async (conn) => {
        await conn.fetchValue("SELECT 1");
        const latencyMs = performance.now() - start;
        return { latencyMs, row: (await conn.fetchOne(HEALTH_SQL))! };
      });
      return {
        healthy: true,
        latencyMs,
        serverVersion: row.version as string,
        database: row.database as string,
        inRecovery: row.in_recovery as boolean,
        connectionsUsed: row.used as number,
        maxConnections: row.max as number,
        pool: this.#db.getPoolStats(),
      };
    } catch (error) {
      return {
        healthy: false,
        error: error instanceof Error ? error.message : String(error),
        latencyMs: performance.now() - start,
        serverVersion: null,
        database: null,
        inRecovery: null,
        connectionsUsed: null,
        maxConnections: null,
        pool: this.#db.getPoolStats(),
      };
    }
  }

  /**
   * Lists sessions of the current database waiting for a lock, each with a session that
   * holds it (`pg_blocking_pids`); a session waiting for two holders appears twice.
   *
   * @returns The waits, longest first (empty when nothing waits).
   * @throws {QueryError} When the server rejects the query.
   */
  async findBlockingQueries(): Promise<BlockingQuery[]> {
    const rows = await this.#onPrimary(BLOCKING_SQL, []);
    return rows.map((row) => ({
      blockedPid: row.blocked_pid as number,
      blockedUser: row.blocked_user as string | null,
      blockedQuery: row.blocked_query as string,
      blockedDurationMs: row.blocked_ms as number,
      waitEvent: row.wait_event as string | null,
      blockingPid: row.blocking_pid as number,
      blockingUser: row.blocking_user as string | null,
      blockingQuery: row.blocking_query as string,
      blockingState: row.blocking_state as string | null,
      blockingTransactionMs: row.blocking_ms as number | null,
    }));
  }

  /**
   * Lists active statements of the current database that have run longer than `seconds`
   * (its own query excluded).
   *
   * @param seconds The threshold, in seconds (fractions allowed).
   * @returns The statements, oldest first.
   * @throws {RangeError} When `seconds` is not a finite number of 0 or more.
   * @throws {QueryError} When the server rejects the query.
   */
  async findLongRunningQueries(seconds: number): Promise<LongRunningQuery[]> {
    if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) {
      throw new RangeError(
        `Cannot find long-running queries: 'seconds' must be a finite number of 0 or more; ` +
          `got ${String(seconds)}`,
      );
    }
    const rows = await this.#onPrimary(LONG_RUNNING_SQL, [seconds]);
    return rows.map((row) => ({
      pid: row.pid as number,
      user: row.user as string | null,
      applicationName: row.application_name as string,
      query: row.query as string,
      state: row.state as string,
      waitEvent: row.wait_event as string | null,
      startedAt: row.query_start as Date,
      durationMs: row.duration_ms as number,
    }));
  }

  /**
   * Sizes of the tables, partitioned tables and materialized views of the manager's
   * schema (the connection's current schema when the manager has none).
   *
   * @returns The tables, largest first.
   * @throws {QueryError} When the server rejects the query.
   */
  async analyzeTableSizes(): Promise<TableSize[]> {
    const rows = await this.#onPrimary(TABLE_SIZES_SQL, [this.#db.schema ?? null]);
    return rows.map((row) => ({
      table: row.table as string,
      kind: row.kind as TableSize["kind"],
      rowsEstimate: row.rows_estimate as number | null,
      tableBytes: row.table_bytes as number,
      indexBytes: row.index_bytes as number,
      totalBytes: row.total_bytes as number,
      tableSize: row.table_size as string,
      indexSize: row.index_size as string,
      totalSize: row.total_size as string,
    }));
  }

  /** Runs a query on a connection of the primary (never a read replica). */
  #onPrimary(sql: string, params: readonly unknown[]): Promise<Row[]> {
    return this.#db.acquire((conn) => conn.fetchAll(sql, params));
  }
}
