/**
 * `executeMany` of a plain `INSERT … VALUES ($1, $2, …)` as multi-row `VALUES` statements:
 * one statement carries up to {@link MAX_ROWS} rows instead of one, which is what makes a
 * batch fast on a driver that sends a Sync (and pays a round of client work) per statement.
 *
 * It is done only where the outcome cannot differ from one statement per row: the values
 * are parameters (a cast at most), `DEFAULT` or `NULL`, so no expression, subquery or
 * volatile function is evaluated once per statement instead of once per row; nothing follows
 * the tuple (no `ON CONFLICT`, no `RETURNING`); and the target is a plain table with no
 * trigger (user triggers, foreign keys: their checks would run at the end of a statement of
 * many rows), no rule and no row-level security, which {@link TARGET_CHECK_SQL} asks the
 * server inside the batch's transaction.
 *
 * @module
 */

/** The most rows in one statement. */
const MAX_ROWS = 128;
/** The most parameters one statement can bind (the protocol counts them in 16 bits). */
const MAX_PARAMS = 65_535;
/** Batches smaller than this run one statement per row: the target check would cost more. */
export const MIN_BATCH_ROWS = 16;

const IDENT = String.raw`(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")`;
const TYPE = String.raw`[A-Za-z_][A-Za-z0-9_ ]*(?:\(\s*\d+\s*(?:,\s*\d+\s*)?\))?(?:\[\])*`;
const VALUE = String.raw`(?:\$\d+(?:\s*::\s*${TYPE})?|DEFAULT|NULL)`;
const PLAIN_INSERT = new RegExp(
  String.raw`^\s*INSERT\s+INTO\s+(${IDENT}(?:\s*\.\s*${IDENT})?)\s*` +
    String.raw`(\(\s*${IDENT}(?:\s*,\s*${IDENT})*\s*\))?\s*` +
    String.raw`VALUES\s*\((\s*${VALUE}(?:\s*,\s*${VALUE})*\s*)\)[\s;]*$`,
  "i",
);
const PARAM = /\$(\d+)/g;

/**
 * Whether the target takes a multi-row statement exactly as it takes one statement per row:
 * `$1` is the table's name as the statement wrote it (resolved with the session's
 * `search_path`). Answers one row, `plain`.
 */
export const TARGET_CHECK_SQL = `SELECT coalesce((
    SELECT c.relkind = 'r' AND NOT c.relhastriggers AND NOT c.relhasrules
      AND NOT c.relrowsecurity
    FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass($1)), false) AS plain`;

/** A plain INSERT that a batch may send as multi-row statements. */
export interface PlainInsert {
  /** The target table as written in the statement. */
  table: string;
  /** Builds the statement and its parameters for `rows` (at most {@link chunkRows}). */
  statement(rows: readonly (readonly unknown[])[]): { sql: string; params: unknown[] };
  /** Rows per statement. */
  chunkRows: number;
}

/**
 * Recognises a plain `INSERT … VALUES (…)` whose parameters are `$1…$n` with `n` the
 * length of every parameter list; `undefined` for any other statement or batch.
 */
export function plainInsert(
  sql: string,
  paramsList: readonly (readonly unknown[])[],
): PlainInsert | undefined {
  if (paramsList.length < MIN_BATCH_ROWS) return undefined;
  const match = PLAIN_INSERT.exec(sql);
  if (match === null) return undefined;
  const [, table, columns = "", tuple] = match;
  const width = paramsList[0].length;
  let highest = 0;
  for (const [, n] of tuple.matchAll(PARAM)) highest = Math.max(highest, Number(n));
  if (width === 0 || highest !== width) return undefined;
  for (const params of paramsList) if (params.length !== width) return undefined;
  const head = `INSERT INTO ${table} ${columns} VALUES `;
  const tuples = new Map<number, string>();
  return {
    table,
    chunkRows: Math.min(MAX_ROWS, Math.floor(MAX_PARAMS / width)),
    statement(rows) {
      let text = tuples.get(rows.length);
      if (text === undefined) {
        const parts: string[] = [];
        for (let k = 0; k < rows.length; k++) {
          parts.push(`(${tuple.replace(PARAM, (_, n) => `$${Number(n) + k * width}`)})`);
        }
        text = head + parts.join(", ");
        tuples.set(rows.length, text);
      }
      const params: unknown[] = [];
      for (const row of rows) for (let i = 0; i < width; i++) params.push(row[i]);
      return { sql: text, params };
    },
  };
}

/**
 * Cuts a batch into statements of `chunkRows` rows and, for the rest, of descending powers
 * of two, so that a session prepares a handful of statement texts whatever the batch sizes.
 */
export function chunkSizes(total: number, chunkRows: number): number[] {
  const sizes: number[] = [];
  let left = total;
  while (left >= chunkRows) {
    sizes.push(chunkRows);
    left -= chunkRows;
  }
  for (let size = 1 << 30; size >= 1; size >>= 1) {
    if (left >= size) {
      sizes.push(size);
      left -= size;
    }
  }
  return sizes;
}
