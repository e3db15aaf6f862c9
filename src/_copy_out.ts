/**
 * The SQL of a COPY out: the `WITH (…)` options from {@link CopyOutOptions}, and a query's
 * parameters put into its text as literals, since `COPY (query) TO STDOUT` takes no bind
 * parameters. The literals come from the server (`quote_nullable($n::text)`, bound as a
 * parameter), so a value is quoted by PostgreSQL's own rules and never becomes SQL; and
 * only real placeholders are replaced, never a `$1` inside a string, a quoted name, a
 * comment or a dollar-quoted body.
 *
 * @module
 */

import { codeOnly, PARAMETER } from "./_sql.ts";

/** Options of `copyFromQuery()`. */
export interface CopyQueryOptions {
  /**
   * `"text"` (tab-separated, `\N` for NULL, backslash escapes) or `"csv"`.
   * @default {"text"}
   */
  format?: "text" | "csv";
  /** Write a first line with the column names. @default {false} */
  header?: boolean;
  /** The one character between columns. @default {tab for text, "," for CSV} */
  delimiter?: string;
  /** The string written for NULL. @default {"\\N" for text, an empty unquoted field for CSV} */
  null?: string;
  /** Aborting stops the COPY on the server and ends the loop with `signal.reason`. */
  signal?: AbortSignal;
}

/** Options of `copyFromTable()`. */
export interface CopyTableOptions extends CopyQueryOptions {
  /** The columns to copy, in order. @default {every column of the table} */
  columns?: readonly string[];
}

/**
 * The ` WITH (…)` clause for the options (empty when none is given), each value checked and
 * quoted as a literal.
 *
 * @throws {RangeError} When `format` is not "text" or "csv", `delimiter` is not one
 *   character, or `header` is not a boolean, or `null` is not a string.
 */
export function copyOptionsClause(options: CopyQueryOptions): string {
  const parts: string[] = [];
  const { format, header, delimiter } = options;
  if (format !== undefined) {
    if (format !== "text" && format !== "csv") {
      throw new RangeError(
        `Cannot copy out: 'format' must be "text" or "csv"; got ${JSON.stringify(format)}`,
      );
    }
    parts.push(`FORMAT ${format}`);
  }
  if (header !== undefined) {
    if (typeof header !== "boolean") {
      throw new RangeError(`Cannot copy out: 'header' must be true or false; got ${header}`);
    }
    parts.push(`HEADER ${header}`);
  }
  if (delimiter !== undefined) {
    if (typeof delimiter !== "string" || [...delimiter].length !== 1) {
      throw new RangeError(
        "Cannot copy out: 'delimiter' must be a single character, such as \";\"; got " +
          JSON.stringify(delimiter),
      );
    }
    parts.push(`DELIMITER ${quoteLiteral(delimiter)}`);
  }
  if (options.null !== undefined) {
    if (typeof options.null !== "string") {
      throw new RangeError(
        `Cannot copy out: 'null' must be the string to write for NULL; got ${options.null}`,
      );
    }
    parts.push(`NULL ${quoteLiteral(options.null)}`);
  }
  return parts.length === 0 ? "" : ` WITH (${parts.join(", ")})`;
}

/**
 * The statement that turns `count` parameters into SQL literals on the server: one row with
 * columns `p1…pn`, each `quote_nullable($n::text)` (`NULL` for null).
 */
export function quoteParametersSql(count: number): string {
  const columns = Array.from(
    { length: count },
    (_, i) => `quote_nullable($${i + 1}::text) AS p${i + 1}`,
  );
  return `SELECT ${columns.join(", ")}`;
}

/**
 * Replaces every `$n` placeholder of `sql` with ` literals[n-1] ` (spaced, so that it joins
 * no neighbouring token); placeholders inside strings, quoted names, comments and
 * dollar-quoted bodies are text, not placeholders ({@link codeOnly}).
 *
 * @throws {RangeError} When a placeholder has no value.
 */
export function inlineParameters(sql: string, literals: readonly string[]): string {
  let out = "";
  let copied = 0;
  for (const placeholder of codeOnly(sql).matchAll(PARAMETER)) {
    const n = Number(placeholder[1]);
    if (n < 1 || n > literals.length) {
      throw new RangeError(
        `Cannot copy out: the query uses $${placeholder[1]} but ${literals.length} ` +
          "parameter(s) were given; pass one value for each $n",
      );
    }
    out += sql.slice(copied, placeholder.index) + ` ${literals[n - 1]} `;
    copied = placeholder.index + placeholder[0].length;
  }
  return out + sql.slice(copied);
}

/** A string literal that reads the same whatever `standard_conforming_strings` is. */
function quoteLiteral(value: string): string {
  return `E'${value.replaceAll("\\", "\\\\").replaceAll("'", "''")}'`;
}
