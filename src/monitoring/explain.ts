/**
 * `explain()`: PostgreSQL's plan for a statement, as parsed JSON. With `analyze` the
 * statement really runs, inside a transaction that is always rolled back.
 *
 * @module
 */

import { splitSqlStatements } from "../_sql.ts";
import type { Transactional } from "../transaction.ts";

/** Options of {@link explain}. */
export interface ExplainOptions {
  /**
   * Run the statement to report actual times and row counts (`EXPLAIN ANALYZE`). It runs
   * inside a transaction that is rolled back, so writes take no effect — but it does take
   * the time, locks and sequence values a real run takes.
   * @default {false}
   */
  analyze?: boolean;
  /**
   * Report shared, local and temporary buffer use (`BUFFERS`); meaningful with `analyze`.
   * @default {false}
   */
  buffers?: boolean;
}

/**
 * One node of a plan, as PostgreSQL's `EXPLAIN (FORMAT JSON)` names its fields. The
 * fields listed are always there (the `Actual …` ones with `analyze`); many more appear
 * depending on the node type (`"Index Name"`, `"Filter"`, `"Hash Cond"`, `"Shared Hit
 * Blocks"` with `buffers`…).
 */
export interface PlanNode {
  /** Such as `"Seq Scan"`, `"Index Scan"`, `"Hash Join"`, `"ModifyTable"`. */
  "Node Type": string;
  /** Estimated cost before the first row. */
  "Startup Cost": number;
  /** Estimated cost of all rows. */
  "Total Cost": number;
  /** Estimated rows. */
  "Plan Rows": number;
  /** Estimated average row width in bytes. */
  "Plan Width": number;
  /** The table scanned, for scan nodes. */
  "Relation Name"?: string;
  /** Actual rows per loop (with `analyze`). */
  "Actual Rows"?: number;
  /** Actual milliseconds per loop (with `analyze`). */
  "Actual Total Time"?: number;
  /** How many times the node ran (with `analyze`). */
  "Actual Loops"?: number;
  /** Child nodes. */
  Plans?: PlanNode[];
  /** Every other field PostgreSQL reports for this node. */
  [field: string]: unknown;
}

/** The top object of `EXPLAIN (FORMAT JSON)`: the plan tree and, with `analyze`, timings. */
export interface ExplainResult {
  /** The root node of the plan. */
  Plan: PlanNode;
  /** Milliseconds spent planning (with `analyze`). */
  "Planning Time"?: number;
  /** Milliseconds spent executing (with `analyze`). */
  "Execution Time"?: number;
  /** Triggers that fired, with their times (with `analyze`). */
  Triggers?: unknown[];
  /** Every other field PostgreSQL reports. */
  [field: string]: unknown;
}

/**
 * What {@link explain} runs on: a `DatabaseManager`, `Transaction` or `Connection` (any
 * query object with `transaction()`). Templates expand for its schema.
 */
export type ExplainTarget = Transactional;

/** Thrown inside the transaction to roll it back; never escapes. */
const ROLLBACK: unique symbol = Symbol("pgdbm.explain.rollback");

/**
 * Asks PostgreSQL for the plan of one statement: `EXPLAIN (FORMAT JSON[, ANALYZE,
 * BUFFERS]) …`, templates expanded for `db`'s schema, parameters bound as usual. With
 * `analyze` the statement runs inside a transaction (a savepoint when `db` is a
 * transaction) that is always rolled back, so an `INSERT`, `UPDATE` or `DELETE` changes
 * nothing.
 *
 * @param db The manager, transaction or connection to plan on.
 * @param sql One statement (a trailing `;` is allowed).
 * @param params Values for `$1…$n`.
 * @param options `analyze` and `buffers`.
 * @returns The top object of PostgreSQL's JSON plan.
 * @throws {TypeError} When `sql` is empty or holds more than one statement.
 * @throws {QueryError} When the server rejects the statement.
 *
 * @example Plan and time a query (needs a server)
 * ```ts ignore
 * import { explain } from "@pgdbm/pgdbm/monitoring";
 * const plan = await explain(db, "SELECT * FROM {{tables.users}} WHERE email = $1", [email], {
 *   analyze: true,
 * });
 * console.log(plan.Plan["Node Type"], plan["Execution Time"]);
 * ```
 */
export async function explain(
  db: ExplainTarget,
  sql: string,
  params: readonly unknown[] = [],
  options: ExplainOptions = {},
): Promise<ExplainResult> {
  const statement = singleStatement(sql);
  const flags = ["FORMAT JSON"];
  if (options.analyze) flags.push("ANALYZE");
  if (options.buffers) flags.push("BUFFERS");
  const text = `EXPLAIN (${flags.join(", ")}) ${statement}`;
  if (!options.analyze) return planOf(await db.fetchValue(text, params));
  let plan: unknown;
  try {
    await db.transaction(async (tx) => {
      plan = await tx.fetchValue(text, params);
      throw ROLLBACK;
    });
  } catch (error) {
    if (error !== ROLLBACK) throw error;
  }
  return planOf(plan);
}

function singleStatement(sql: string): string {
  const statements = typeof sql === "string" ? splitSqlStatements(sql) : [];
  if (statements.length !== 1) {
    throw new TypeError(
      `Cannot explain the SQL: it must be exactly one statement; got ${statements.length}. ` +
        "Pass the statements one at a time",
    );
  }
  return statements[0].text;
}

function planOf(value: unknown): ExplainResult {
  const top = typeof value === "string" ? JSON.parse(value) : value;
  return (Array.isArray(top) ? top[0] : top) as ExplainResult;
}
