/**
 * Table helpers for tests: snapshots and their comparison, counting and truncating. Table
 * names go through `{{tables.…}}` templates, so they are checked identifiers and take the
 * manager's schema.
 *
 * @module
 */

import { AssertionError } from "node:assert";
import { SchemaError } from "../errors.ts";
import type { Queries, Row } from "../queries.ts";
import { assertIdentifier, quoteIdentifier } from "../template.ts";

/** A column of a table, as the helpers need it. */
export interface ColumnInfo {
  /** The column's name. */
  readonly name: string;
  /** True for a generated column (it cannot be written). */
  readonly generated: boolean;
  /** The sequence that fills it (serial or identity), or `null`. */
  readonly sequence: string | null;
  /** True when it is part of the primary key. */
  readonly primary: boolean;
}

/** A table found by {@link tableInfo}. */
export interface TableInfo {
  /** Its oid, as text. */
  readonly oid: string;
  /** Its columns in order. */
  readonly columns: readonly ColumnInfo[];
}

/** Options of {@link snapshotTable}. */
export interface SnapshotOptions {
  /**
   * Columns that order the rows. Default: the primary key, or the whole row as text for a
   * table without one.
   */
  orderBy?: string | readonly string[];
}

/** The contents of a table at one moment, from {@link snapshotTable}. */
export interface TableSnapshot {
  /** The table as named by the caller. */
  readonly table: string;
  /** Its columns, in order. */
  readonly columns: readonly string[];
  /** Its primary key columns (empty when it has none); rows are matched by them. */
  readonly key: readonly string[];
  /** The columns the rows are ordered by (empty: the whole row). */
  readonly orderBy: readonly string[];
  /** The rows, as plain objects. */
  readonly rows: readonly Row[];
}

/** Options of {@link truncateTable}. */
export interface TruncateOptions {
  /**
   * Also truncate the tables whose foreign keys point at it.
   * @default {false}
   */
  cascade?: boolean;
  /**
   * Restart the sequences of its serial and identity columns.
   * @default {true}
   */
  restartIdentity?: boolean;
}

const MAX_SHOWN = 10;

/**
 * The template of a table name: `name` (the object's schema) or `schema.name`.
 *
 * @throws {SchemaError} When a part is not an identifier.
 */
export function tableTemplate(table: string): string {
  const parts = typeof table === "string" ? table.split(".") : [table];
  if (parts.length > 2) assertIdentifier(table, "table");
  if (parts.length === 2) assertIdentifier(parts[0], "schema");
  assertIdentifier(parts[parts.length - 1], "table");
  return `{{tables.${parts.join(".")}}}`;
}

/**
 * Looks a table up (as the object's queries would resolve its name).
 *
 * @throws {SchemaError} When it does not exist.
 */
export async function tableInfo(db: Queries, table: string, verb: string): Promise<TableInfo> {
  const name = db.prepareQuery(tableTemplate(table));
  const oid = await db.fetchValue<string>("SELECT to_regclass($1)::oid::text", [name]);
  if (oid === null) {
    throw new SchemaError(
      `Cannot ${verb} '${table}': no such table in schema '${db.schema ?? "public"}'; ` +
        "check the name, and that the migrations that create it ran",
    );
  }
  const columns = await db.fetchAll<ColumnInfo>(
    `SELECT a.attname AS name, a.attgenerated <> '' AS generated,
       (SELECT s.oid::regclass::text FROM pg_depend d
          JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
         WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
           AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum
           AND d.deptype IN ('a', 'i') LIMIT 1) AS sequence,
       EXISTS (SELECT 1 FROM pg_index i
                WHERE i.indrelid = a.attrelid AND i.indisprimary
                  AND a.attnum = ANY (i.indkey)) AS primary
     FROM pg_attribute a
     WHERE a.attrelid = $1::text::oid AND a.attnum > 0 AND NOT a.attisdropped
     ORDER BY a.attnum`,
    [oid],
  );
  return { oid, columns };
}

/**
 * Reads a whole table, ordered, for a later {@link assertTableUnchanged}: its columns,
 * primary key and rows as plain objects.
 *
 * @param db A manager, transaction or connection; its schema qualifies `table`.
 * @param table `name` (in `db`'s schema) or `schema.name`; checked as identifiers.
 * @param options `orderBy`: columns to order the rows by (default: the primary key).
 * @returns The snapshot.
 * @throws {SchemaError} When the table or an `orderBy` column does not exist, or a name is
 *   not an identifier.
 *
 * @example Check that a failed call changed nothing (needs a server, or PGlite)
 * ```ts ignore
 * import { assertTableUnchanged, snapshotTable } from "@pgdbm/pgdbm/testing";
 * const before = await snapshotTable(db, "notes");
 * await service.add("").catch(() => {});
 * await assertTableUnchanged(db, "notes", before);
 * ```
 */
export async function snapshotTable(
  db: Queries,
  table: string,
  options: SnapshotOptions = {},
): Promise<TableSnapshot> {
  const info = await tableInfo(db, table, "snapshot");
  const names = info.columns.map((c) => c.name);
  const key = info.columns.filter((c) => c.primary).map((c) => c.name);
  const given = options.orderBy;
  const orderBy = given === undefined ? key : typeof given === "string" ? [given] : [...given];
  for (const column of orderBy) {
    assertIdentifier(column, "column");
    if (!names.includes(column)) {
      throw new SchemaError(
        `Cannot order the snapshot of '${table}' by '${column}': the table has no such ` +
          `column; it has ${names.join(", ")}`,
      );
    }
  }
  const order = orderBy.length > 0
    ? orderBy.map((c) => `t.${quoteIdentifier(c)}`).join(", ")
    : "t::text";
  const rows = await db.fetchAll(
    `SELECT * FROM ${tableTemplate(table)} AS t ORDER BY ${order}`,
  );
  return { table, columns: names, key, orderBy, rows };
}

/**
 * Throws when a table's contents differ from a snapshot. The message lists the rows
 * added (`+`), removed (`-`) and changed (`~ before → after`, matched by primary key;
 * without one, a changed row shows as removed and added), the first ten of them.
 *
 * @param db A manager, transaction or connection; its schema qualifies `table`.
 * @param table The table, as given to {@link snapshotTable}.
 * @param snapshot The snapshot taken before.
 * @returns When the table is unchanged.
 * @throws {AssertionError} When the table changed (`node:assert`'s, with `actual` and
 *   `expected` rows).
 * @throws {SchemaError} When the table no longer exists.
 *
 * @example Assert a table was left alone (needs a server, or PGlite)
 * ```ts ignore
 * import { assertTableUnchanged, snapshotTable } from "@pgdbm/pgdbm/testing";
 * const before = await snapshotTable(db, "users");
 * await assertTableUnchanged(db, "users", before);
 * ```
 */
export async function assertTableUnchanged(
  db: Queries,
  table: string,
  snapshot: TableSnapshot,
): Promise<void> {
  const now = await snapshotTable(db, table, { orderBy: snapshot.orderBy });
  const lines: string[] = [];
  if (canonical(now.columns) !== canonical(snapshot.columns)) {
    lines.push(
      `  columns: ${snapshot.columns.join(", ")} → ${now.columns.join(", ")}`,
    );
  }
  const key = snapshot.key.length > 0 && lines.length === 0 ? snapshot.key : undefined;
  const before = group(snapshot.rows, key);
  const after = group(now.rows, key);
  let added = 0, removed = 0, changed = 0;
  for (const [id, rows] of after) {
    const old = before.get(id) ?? [];
    for (const [i, row] of rows.entries()) {
      if (i >= old.length) {
        added++;
        lines.push(`+ ${show(row)}`);
      } else if (canonical(old[i]) !== canonical(row)) {
        changed++;
        lines.push(`~ ${show(old[i])}\n  → ${show(row)}`);
      }
    }
  }
  for (const [id, rows] of before) {
    const count = after.get(id)?.length ?? 0;
    for (const row of rows.slice(count)) {
      removed++;
      lines.push(`- ${show(row)}`);
    }
  }
  if (lines.length === 0) return;
  const shown = lines.slice(0, MAX_SHOWN);
  if (lines.length > MAX_SHOWN) shown.push(`… and ${lines.length - MAX_SHOWN} more`);
  throw new AssertionError({
    message: `Table '${table}' changed since its snapshot: ${added} row(s) added, ` +
      `${removed} removed, ${changed} changed\n${shown.join("\n")}`,
    actual: now.rows,
    expected: snapshot.rows,
    operator: "assertTableUnchanged",
  });
}

/**
 * Counts a table's rows, optionally those matching `where`.
 *
 * WARNING: `where` is SQL put into the statement as it is (templates expanded): pass
 * values through `params` (`$1…$n`), never by concatenating them into `where`.
 *
 * @param db A manager, transaction or connection; its schema qualifies `table`.
 * @param table `name` or `schema.name`; checked as identifiers.
 * @param where A condition, such as `"status = $1"`.
 * @param params Values for `$1…$n` in `where`.
 * @returns The number of rows.
 * @throws {SchemaError} When the table name is not an identifier.
 * @throws {QueryError} When the table does not exist or `where` is invalid.
 *
 * @example Count rows (needs a server, or PGlite)
 * ```ts ignore
 * import { countRows } from "@pgdbm/pgdbm/testing";
 * const pinned = await countRows(db, "notes", "pinned AND author_id = $1", [1]);
 * ```
 */
export async function countRows(
  db: Queries,
  table: string,
  where?: string,
  params: readonly unknown[] = [],
): Promise<number> {
  const filter = where === undefined || where.trim() === "" ? "" : ` WHERE ${where}`;
  const count = await db.fetchValue<string | number>(
    `SELECT count(*)::text FROM ${tableTemplate(table)}${filter}`,
    params,
  );
  return Number(count);
}

/**
 * Empties a table with `TRUNCATE`, restarting its sequences unless told not to.
 *
 * @param db A manager, transaction or connection; its schema qualifies `table`.
 * @param table `name` or `schema.name`; checked as identifiers.
 * @param options `cascade` to empty the tables that reference it too;
 *   `restartIdentity: false` to keep the sequences where they are.
 * @returns When the table is empty.
 * @throws {SchemaError} When the table name is not an identifier.
 * @throws {QueryError} When the table does not exist, or other tables reference it and
 *   `cascade` is not set.
 *
 * @example Reset a table between steps (needs a server, or PGlite)
 * ```ts ignore
 * import { truncateTable } from "@pgdbm/pgdbm/testing";
 * await truncateTable(db, "authors", { cascade: true });
 * ```
 */
export async function truncateTable(
  db: Queries,
  table: string,
  options: TruncateOptions = {},
): Promise<void> {
  const restart = options.restartIdentity ?? true;
  await db.execute(
    `TRUNCATE ${tableTemplate(table)}${restart ? " RESTART IDENTITY" : ""}` +
      (options.cascade ? " CASCADE" : ""),
  );
}

function group(rows: readonly Row[], key: readonly string[] | undefined): Map<string, Row[]> {
  const groups = new Map<string, Row[]>();
  for (const row of rows) {
    const id = canonical(key === undefined ? row : key.map((c) => row[c]));
    const list = groups.get(id);
    if (list === undefined) groups.set(id, [row]);
    else list.push(row);
  }
  return groups;
}

function canonical(value: unknown): string {
  return JSON.stringify(value, (_key, item: unknown) => {
    if (typeof item === "bigint") return `${item}n`;
    if (item instanceof Uint8Array) return `\\x${Array.from(item, hex).join("")}`;
    return item;
  });
}

function hex(byte: number): string {
  return byte.toString(16).padStart(2, "0");
}

function show(row: Row): string {
  return Deno.inspect(row, { compact: true, breakLength: Infinity, depth: 4 });
}
