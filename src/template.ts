/**
 * `{{tables.name}}` and `{{schema}}` templates: the same SQL (queries and migration files)
 * runs in any schema. Expansion is byte for byte pgdbm's, identifiers are validated (the
 * templates are an injection-proof boundary), and results are cached per (schema, text).
 *
 * @module
 */

import { codeOnly } from "./_sql.ts";
import { suggest } from "./_suggest.ts";
import { SchemaError } from "./errors.ts";

const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;
const PLACEHOLDER = /\{\{(tables\.[^}]*|schema)\}\}(\.)?/g;
const LEFT_OVER = /\{\{([^}]*)\}\}/;
const MAX_TEXTS_PER_SCHEMA = 2000;
const MAX_SCHEMAS = 5000;
const cache = new Map<string, Map<string, string>>();
const unqualified = new Map<string, string>();

/**
 * Checks that `name` is a plain PostgreSQL identifier (`^[A-Za-z_][A-Za-z0-9_]{0,62}$`).
 *
 * @param name The identifier to check.
 * @param what What the identifier names, for the message (such as `"schema"`).
 * @throws {SchemaError} When `name` is not such an identifier.
 */
export function assertIdentifier(name: unknown, what: string): asserts name is string {
  if (typeof name !== "string" || !IDENTIFIER.test(name)) {
    const shown = typeof name === "string" ? `"${name}"` : String(name);
    throw new SchemaError(
      `Cannot use ${shown} as a ${what} name: use 1 to 63 ASCII letters, digits or underscores, ` +
        `starting with a letter or underscore`,
    );
  }
}

/**
 * Expands `{{tables.name}}`, `{{tables.other.name}}` and `{{schema}}` in `sql`.
 *
 * | placeholder | `schema: "app"` | no schema |
 * |---|---|---|
 * | `{{tables.users}}` | `"app".users` | `users` |
 * | `{{tables.other.users}}` | `"other".users` | `"other".users` |
 * | `{{schema}}` | `"app"` | `public` (and `{{schema}}.` is dropped) |
 *
 * @param sql SQL text with placeholders.
 * @param schema The schema; `undefined` or `null` for none. An empty string is refused.
 * @returns The expanded SQL.
 * @throws {SchemaError} When the schema or a table name is not a valid identifier, or the
 *   SQL has a `{{…}}` that is not a placeholder (such as `{{table.users}}`) outside its
 *   strings, quoted identifiers, dollar-quoted bodies and comments.
 *
 * @example Expand a query for a schema
 * ```ts
 * import { expandTemplate } from "@pgdbm/pgdbm";
 * import assert from "node:assert/strict";
 * assert.equal(
 *   expandTemplate("SELECT * FROM {{tables.users}}", "app"),
 *   'SELECT * FROM "app".users',
 * );
 * assert.equal(expandTemplate("SELECT * FROM {{tables.users}}"), "SELECT * FROM users");
 * ```
 */
export function expandTemplate(sql: string, schema?: string | null): string {
  const key = schema ?? undefined;
  let texts = key === undefined ? unqualified : cache.get(key);
  const hit = texts?.get(sql);
  if (hit !== undefined) return hit;
  if (typeof sql !== "string") {
    throw new TypeError(`Cannot expand the SQL: expected a string, got ${typeof sql}`);
  }
  if (schema !== undefined && schema !== null) assertIdentifier(schema, "schema");
  const expanded = sql.includes("{{") ? expand(sql, schema ?? undefined) : sql;
  if (expanded.includes("{{")) refuseUnknownPlaceholder(expanded);
  if (texts === undefined) {
    if (cache.size >= MAX_SCHEMAS) cache.delete(cache.keys().next().value!);
    texts = new Map();
    cache.set(key!, texts);
  }
  if (texts.size >= MAX_TEXTS_PER_SCHEMA) texts.delete(texts.keys().next().value!);
  texts.set(sql, expanded);
  return expanded;
}

/**
 * Quotes an identifier the way pgdbm does, after checking it.
 *
 * @param name The identifier.
 * @returns `"name"`.
 * @throws {SchemaError} When `name` is not a valid identifier.
 */
export function quoteIdentifier(name: string): string {
  assertIdentifier(name, "identifier");
  return `"${name}"`;
}

function expand(sql: string, schema: string | undefined): string {
  const quoted = schema === undefined ? undefined : quoteIdentifier(schema);
  return sql.replace(PLACEHOLDER, (_match, body: string, dot: string | undefined) => {
    const after = dot ?? "";
    if (body === "schema") {
      if (quoted !== undefined) return quoted + after;
      return dot === undefined ? "public" : "";
    }
    const parts = body.slice("tables.".length).split(".");
    if (parts.length === 1) {
      assertIdentifier(parts[0], "table");
      return (quoted === undefined ? parts[0] : `${quoted}.${parts[0]}`) + after;
    }
    if (parts.length === 2) {
      assertIdentifier(parts[0], "schema");
      assertIdentifier(parts[1], "table");
      return `${quoteIdentifier(parts[0])}.${parts[1]}${after}`;
    }
    throw new SchemaError(
      `Cannot expand "{{${body}}}": write {{tables.name}} or {{tables.schema.name}}`,
    );
  });
}

/**
 * Refuses a `{{…}}` left in the code of expanded SQL: it is a misspelt placeholder, which
 * the server would only report as a syntax error at `{`. Inside strings, quoted identifiers,
 * dollar-quoted bodies and comments it is text, and left alone.
 */
function refuseUnknownPlaceholder(expanded: string): void {
  const found = LEFT_OVER.exec(codeOnly(expanded));
  if (found === null) return;
  const body = found[1].trim();
  const dot = body.indexOf(".");
  const head = dot === -1 ? body : body.slice(0, dot);
  let meant: string | undefined;
  if (dot !== -1 && suggest(head, ["tables"]) !== undefined) {
    meant = `{{tables${body.slice(dot)}}}`;
  } else if (suggest(head, ["schema", "tables"]) === "schema") meant = "{{schema}}";
  else if (head === "tables") meant = "{{tables.name}}";
  throw new SchemaError(
    `Cannot expand "${found[0]}": it is not a placeholder` +
      (meant === undefined ? "." : `; did you mean ${meant}?`) +
      " Write {{tables.name}}, {{tables.schema.name}} or {{schema}} (a literal {{ belongs in " +
      "a string)",
  );
}
