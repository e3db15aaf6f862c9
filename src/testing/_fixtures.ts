/**
 * `loadFixtures()`: rows as plain objects, loaded with COPY in foreign-key order, in one
 * transaction, after every table and column was checked.
 *
 * @module
 */

import { SchemaError } from "../errors.ts";
import { assertIdentifier, quoteIdentifier } from "../template.ts";
import type { Queries } from "../queries.ts";
import type { Transaction, Transactional } from "../transaction.ts";
import { type TableInfo, tableInfo } from "./_tables.ts";

/** Rows to load: table name (in the object's schema) → rows as plain objects. */
export type Fixtures = Record<string, readonly Record<string, unknown>[]>;

interface Plan {
  readonly table: string;
  readonly info: TableInfo;
  readonly rows: readonly Record<string, unknown>[];
}

/**
 * Loads rows given as plain objects into tables of `db`'s schema with `COPY`, in
 * foreign-key order (parents before the tables that reference them, looked up in
 * `pg_constraint`, whatever the order of the keys), all in one transaction. Every table
 * and column is checked before anything is written, so a typo loads nothing. A key left
 * out of a row (or `undefined`) takes the column's default. Sequences of serial and
 * identity columns given explicit values continue after the largest one loaded.
 *
 * @param db A manager, connection or transaction (then a savepoint) whose schema holds
 *   the tables.
 * @param fixtures Table name (unqualified) → rows.
 * @returns Rows loaded per table, in the order the tables were loaded.
 * @throws {SchemaError} When a table or column does not exist, a name is not an
 *   identifier, or a column is generated.
 * @throws {TypeError} When `fixtures` or a row is not a plain object.
 * @throws {QueryError} When the server rejects a row (nothing is loaded then).
 *
 * @example Authors before the notes that reference them (needs a server, or PGlite)
 * ```ts ignore
 * import { loadFixtures } from "@pgdbm/pgdbm/testing";
 * await loadFixtures(db, {
 *   notes: [{ id: 1, author_id: 1, body: "Buy milk" }],
 *   authors: [{ id: 1, name: "ann" }],
 * });
 * ```
 */
export async function loadFixtures(
  db: Transactional,
  fixtures: Fixtures,
): Promise<Record<string, number>> {
  if (fixtures === null || typeof fixtures !== "object" || Array.isArray(fixtures)) {
    throw new TypeError(
      "Cannot load fixtures: pass an object of table name to rows, such as " +
        "{ users: [{ id: 1, name: 'Ann' }] }",
    );
  }
  const plans: Plan[] = [];
  for (const [table, rows] of Object.entries(fixtures)) {
    if (!Array.isArray(rows)) {
      throw new TypeError(
        `Cannot load fixtures into '${table}': its value must be an array of rows`,
      );
    }
    assertIdentifier(table, "table");
    const info = await tableInfo(db, table, "load fixtures into");
    checkRows(table, info, rows);
    plans.push({ table, info, rows });
  }
  const ordered = await dependencyOrder(db, plans);
  return await db.transaction(async (tx) => {
    const counts: Record<string, number> = {};
    await tx.execute("SET CONSTRAINTS ALL DEFERRED");
    for (const plan of ordered) counts[plan.table] = await load(tx, plan);
    return counts;
  });
}

function checkRows(table: string, info: TableInfo, rows: readonly unknown[]): void {
  const columns = new Map(info.columns.map((c) => [c.name, c]));
  for (const [i, row] of rows.entries()) {
    if (row === null || typeof row !== "object" || Array.isArray(row)) {
      throw new TypeError(
        `Cannot load fixtures into '${table}': row ${i} is not a plain object of column ` +
          "name to value",
      );
    }
    for (const name of Object.keys(row)) {
      const column = columns.get(name);
      if (column === undefined) {
        throw new SchemaError(
          `Cannot load fixtures into '${table}': row ${i} names column '${name}', which the ` +
            `table does not have; it has ${info.columns.map((c) => c.name).join(", ")}`,
        );
      }
      if (column.generated) {
        throw new SchemaError(
          `Cannot load fixtures into '${table}': column '${name}' is generated; leave it out ` +
            "of the rows",
        );
      }
    }
  }
}

/** Orders the tables so that every table comes after the tables its foreign keys name. */
async function dependencyOrder(db: Queries, plans: readonly Plan[]): Promise<Plan[]> {
  const byOid = new Map(plans.map((plan) => [plan.info.oid, plan]));
  const edges = await db.fetchAll<{ child: string; parent: string }>(
    "SELECT conrelid::text AS child, confrelid::text AS parent FROM pg_constraint " +
      "WHERE contype = 'f' AND conrelid <> confrelid",
  );
  const parents = new Map<Plan, Set<Plan>>(plans.map((plan) => [plan, new Set()]));
  for (const edge of edges) {
    const child = byOid.get(edge.child);
    const parent = byOid.get(edge.parent);
    if (child !== undefined && parent !== undefined) parents.get(child)!.add(parent);
  }
  const ordered: Plan[] = [];
  const remaining = [...plans];
  while (remaining.length > 0) {
    const ready = remaining.findIndex((plan) =>
      [...parents.get(plan)!].every((parent) => ordered.includes(parent))
    );
    // A cycle: load in the given order and rely on deferrable constraints.
    ordered.push(...remaining.splice(ready === -1 ? 0 : ready, 1));
  }
  return ordered;
}

async function load(tx: Transaction, plan: Plan): Promise<number> {
  const table = plan.table;
  let count = 0;
  let start = 0;
  const used = new Set<string>();
  while (start < plan.rows.length) {
    const columns = presentKeys(plan.rows[start]);
    const signature = columns.join(",");
    let end = start + 1;
    while (end < plan.rows.length && presentKeys(plan.rows[end]).join(",") === signature) end++;
    const records = plan.rows.slice(start, end).map((row) => columns.map((c) => row[c]));
    if (columns.length === 0) {
      for (let i = start; i < end; i++) {
        await tx.execute(`INSERT INTO {{tables.${table}}} DEFAULT VALUES`);
      }
    } else {
      await tx.copyRecordsToTable(table, records, { columns });
    }
    for (const column of columns) used.add(column);
    count += end - start;
    start = end;
  }
  for (const column of plan.info.columns) {
    if (column.sequence === null || !used.has(column.name)) continue;
    await tx.execute(
      `SELECT setval($1::regclass, m) FROM (SELECT max(${quoteIdentifier(column.name)}) AS m ` +
        `FROM {{tables.${table}}}) AS s WHERE m IS NOT NULL`,
      [column.sequence],
    );
  }
  return count;
}

function presentKeys(row: Record<string, unknown>): string[] {
  return Object.keys(row).filter((key) => row[key] !== undefined).sort();
}
