/**
 * Monitoring for pgdbm: a query history and slow-query log fed by the pool's `onQuery`
 * hook ({@link QueryMonitor}), query plans ({@link explain}), and a look into the server
 * ({@link DatabaseDebugger}: health, lock waits, long-running queries, table sizes).
 *
 * Parameters reach the hook masked: strings over 200 characters shortened, bytes
 * summarized, and values bound to columns or stored under keys named like password,
 * secret, token or api_key replaced by `"<hidden>"`.
 *
 * @example Slow queries of a pool (needs a server)
 * ```ts ignore
 * import { createSharedPool, DatabaseManager } from "@pgdbm/pgdbm";
 * import { QueryMonitor } from "@pgdbm/pgdbm/monitoring";
 *
 * const monitor = new QueryMonitor({ slowQueryMs: 250 });
 * const pool = await createSharedPool({
 *   connectionString: Deno.env.get("DATABASE_URL"),
 *   onQuery: monitor.onQuery,
 * });
 * const db = new DatabaseManager({ pool, schema: "app" });
 * await db.fetchAll("SELECT * FROM {{tables.orders}} WHERE total > $1", [100]);
 * for (const q of monitor.getSlowQueries(10)) console.log(q.durationMs, q.sql, q.params);
 * console.log(monitor.getSummary()); // { count, errors, slow, avgMs, p50Ms, p99Ms, … }
 * await pool.close();
 * ```
 *
 * @example Plans and the server's state (needs a server)
 * ```ts ignore
 * import { DatabaseDebugger, explain } from "@pgdbm/pgdbm/monitoring";
 *
 * const plan = await explain(db, "DELETE FROM {{tables.orders}} WHERE id = $1", [7], {
 *   analyze: true, // runs it, then rolls back: nothing is deleted
 * });
 * console.log(plan.Plan["Node Type"], plan["Execution Time"]);
 *
 * const debug = new DatabaseDebugger(db);
 * console.log(await debug.checkConnectionHealth());
 * console.log(await debug.findBlockingQueries());
 * console.log(await debug.findLongRunningQueries(30));
 * console.log(await debug.analyzeTableSizes());
 * ```
 *
 * @module
 */

export { QueryMonitor } from "./query_monitor.ts";
export type { QueryMonitorOptions, QueryRecord, QuerySummary } from "./query_monitor.ts";
export { explain } from "./explain.ts";
export type { ExplainOptions, ExplainResult, ExplainTarget, PlanNode } from "./explain.ts";
export { DatabaseDebugger } from "./debugger.ts";
export type { BlockingQuery, ConnectionHealth, LongRunningQuery, TableSize } from "./debugger.ts";
export type { QueryEvent, QueryHook } from "../query_event.ts";
