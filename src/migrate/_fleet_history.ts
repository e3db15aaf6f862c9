/**
 * The fleet's up-to-date check in a few round trips instead of two per schema: which of
 * the schemas have the history table (one catalog query), then their rows (one query per
 * {@link CHUNK} schemas, pipelined). A schema whose files are all applied, unchanged, with
 * nothing missing, needs nothing more; every other one goes through its own migrator.
 *
 * @module
 */

import type { DatabaseManager } from "../manager.ts";
import { assertIdentifier, quoteIdentifier } from "../template.ts";
import { appliedMigration, History, HISTORY_COLUMNS } from "./_history.ts";
import type { AppliedMigration, Migration } from "./types.ts";

/**
 * Schemas read by one query (a UNION ALL of that many selects). Measured over 1,000
 * schemas: 25 a query took 1.7 s, 5 took 1.9 s and 250 took 8.7 s (planning a wide UNION
 * costs more than the round trips it saves); one query per schema took 8.0 s.
 */
const CHUNK = 25;

/**
 * The schemas among `schemas` (valid identifiers) where the module is up to date, and those
 * without a history table, read on the primary without a lock, as the migrator's own
 * unlocked read does. On any error the answer is `undefined`: every schema then takes the
 * migrator's whole path.
 *
 * @param db A manager over the fleet's pool.
 * @param schemas Schemas to look at; those that are not valid identifiers are left to the
 *   migrator, which reports them.
 * @param files The module's migrations.
 * @param module The module's name.
 * @param table The history table's name.
 */
export async function upToDateSchemas(
  db: DatabaseManager,
  schemas: readonly string[],
  files: Migration[],
  module: string,
  table: string,
): Promise<{ upToDate: Set<string>; withoutTable: Set<string> } | undefined> {
  const primary = db.onPrimary();
  const upToDate = new Set<string>();
  const valid = schemas.filter(isIdentifier);
  try {
    const withTable = await primary.fetchAll<{ schema: string }>(
      "SELECT n.nspname AS schema FROM pg_catalog.pg_class c " +
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace " +
        "WHERE c.relname = $1 AND c.relkind IN ('r', 'p') AND n.nspname = ANY($2::text[])",
      [table, valid],
    );
    const found = withTable.map((row) => row.schema);
    const withoutTable = new Set(valid);
    for (const schema of found) withoutTable.delete(schema);
    const chunks: string[][] = [];
    for (let i = 0; i < found.length; i += CHUNK) chunks.push(found.slice(i, i + CHUNK));
    const bySchema = new Map<string, AppliedMigration[]>(found.map((s) => [s, []]));
    const read = await Promise.all(chunks.map((chunk) => readChunk(primary, chunk, module, table)));
    for (const [c, rows] of read.entries()) {
      for (const row of rows) bySchema.get(chunks[c][Number(row.n)])!.push(appliedMigration(row));
    }
    for (const [schema, applied] of bySchema) {
      const plan = new History(schema, module, table).plan(files, applied);
      if (plan.pending.length + plan.drifted.length + plan.missing.length === 0) {
        upToDate.add(schema);
      }
    }
    return { upToDate, withoutTable };
  } catch {
    // A table dropped or changed meanwhile: the migrators read each schema themselves.
    return undefined;
  }
}

/**
 * The module's rows in the `schemas`' history tables, oldest first in each schema; `n` is
 * the schema's index in `schemas`.
 */
function readChunk(
  db: DatabaseManager,
  schemas: readonly string[],
  module: string,
  table: string,
): Promise<Record<string, unknown>[]> {
  const selects = schemas.map((schema, i) =>
    `(SELECT ${i} AS n, id, ${HISTORY_COLUMNS} ` +
    `FROM ${quoteIdentifier(schema)}.${table} WHERE module_name = $1 OR module_name IS NULL)`
  );
  return db.fetchAll(`${selects.join(" UNION ALL ")} ORDER BY n, id`, [module]);
}

function isIdentifier(name: string): boolean {
  try {
    assertIdentifier(name, "schema");
    return true;
  } catch {
    return false;
  }
}
