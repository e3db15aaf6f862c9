/**
 * PostgreSQL array literals: parsing, NULL elements included (postgres.js turns an unquoted
 * `NULL` element into the string `"NULL"` or into `NaN`; this parser returns `null`),
 * writing arrays bound as parameters, and what both drivers share to learn the array types of
 * the database's own types (an enum's, a domain's) made after they started.
 *
 * @module
 */

import { byteaToHex } from "./_bytea.ts";

/** Parses one element's text into a value. */
export type ElementParser = (text: string) => unknown;

/**
 * Parses the text of an array literal that starts just after its opening `{`.
 *
 * @param text The literal without its first `{`, such as `1,NULL,3}`.
 * @param parse The element parser, or `undefined` to keep strings.
 * @param delimiter The element delimiter (`;` for `box`, `,` otherwise).
 * @returns The elements, nested arrays as arrays and NULL as `null`.
 */
export function parseArrayBody(
  text: string,
  parse: ElementParser | undefined,
  delimiter = ",",
): unknown[] {
  const state = { i: 0 };
  return parseLevel(text, state, parse, delimiter);
}

function parseLevel(
  text: string,
  state: { i: number },
  parse: ElementParser | undefined,
  delimiter: string,
): unknown[] {
  const out: unknown[] = [];
  while (state.i < text.length) {
    const char = text[state.i];
    if (char === "}") {
      state.i++;
      return out;
    }
    if (char === delimiter) {
      state.i++;
      continue;
    }
    if (char === "{") {
      state.i++;
      out.push(parseLevel(text, state, parse, delimiter));
      continue;
    }
    if (char === '"') {
      let value = "";
      state.i++;
      while (state.i < text.length && text[state.i] !== '"') {
        if (text[state.i] === "\\") state.i++;
        value += text[state.i++];
      }
      state.i++;
      out.push(parse ? parse(value) : value);
      continue;
    }
    let end = state.i;
    while (end < text.length && text[end] !== delimiter && text[end] !== "}") end++;
    const raw = text.slice(state.i, end);
    state.i = end;
    out.push(raw.length === 4 && raw.toUpperCase() === "NULL" ? null : parse ? parse(raw) : raw);
  }
  return out;
}

/** Writes one element's value as text. */
export type ElementSerializer = (value: unknown) => string;

/**
 * Characters that make an element need double quotes: braces, quotes, backslashes, the
 * delimiters and whitespace (`array_in` trims unquoted whitespace; `\s` also takes the
 * non-ASCII spaces, which only costs them quotes).
 */
const NEEDS_QUOTES = /[{}"\\,;\s]/;
/** Characters that need a backslash inside double quotes. */
const NEEDS_ESCAPE = /["\\]/;
const ESCAPES = /["\\]/g;

/**
 * Writes a JavaScript array as an array literal: `null` and `undefined` as NULL, nested
 * arrays as nested literals, and every other element as its text, bare when `array_in`
 * reads it back unchanged (not empty, not `NULL` in any case, none of {@link NEEDS_QUOTES})
 * and double-quoted otherwise, with `"` and `\` escaped. A value that is not an array
 * (already a literal) is returned as it is.
 *
 * Bare elements are what numbers, ids and e-mail addresses mostly are: they spare a regex
 * replacement per element here and the unquoting in the server's `array_in`.
 *
 * @param value The array.
 * @param serialize The element serializer, or `undefined` for `String(element)`.
 * @param delimiter The element delimiter (`;` for `box`, `,` otherwise).
 * @returns The literal, such as `{1,"NULL is not this",NULL}`.
 */
export function serializeArray(
  value: unknown,
  serialize: ElementSerializer | undefined,
  delimiter = ",",
): string {
  if (!Array.isArray(value)) return value as string;
  if (serialize === undefined && allBare(value)) return `{${value.join(delimiter)}}`;
  let literal = "{";
  for (let i = 0; i < value.length; i++) {
    if (i > 0) literal += delimiter;
    const element = value[i];
    if (element === null || element === undefined) {
      literal += "NULL";
    } else if (Array.isArray(element)) {
      literal += serializeArray(element, serialize, delimiter);
    } else {
      const text = serialize === undefined ? String(element) : serialize(element);
      if (text !== "" && !NEEDS_QUOTES.test(text) && !(text.length === 4 && isNull(text))) {
        literal += text;
      } else if (NEEDS_ESCAPE.test(text)) {
        literal += `"${text.replace(ESCAPES, "\\$&")}"`;
      } else {
        literal += `"${text}"`;
      }
    }
  }
  return literal + "}";
}

/**
 * Whether every element is a number, or a string `array_in` reads back unchanged without
 * quotes: then the literal is the elements joined, which the engine builds in one piece (a
 * 10,000-element array: about a third of the client's time for an `unnest` INSERT).
 */
function allBare(value: readonly unknown[]): boolean {
  for (let i = 0; i < value.length; i++) {
    const element = value[i];
    if (typeof element === "number") continue;
    if (
      typeof element !== "string" || element === "" || NEEDS_QUOTES.test(element) ||
      (element.length === 4 && isNull(element))
    ) return false;
  }
  return true;
}

function isNull(text: string): boolean {
  return text.toUpperCase() === "NULL";
}

/**
 * The first OID of a database's own objects (`FirstNormalObjectId`): types below it are
 * PostgreSQL's, whose array types a driver knows from the start.
 */
export const FIRST_USER_OID = 16384;

/**
 * The first OID that `initdb` assigns (`FirstGenbkiObjectId`): types below it are
 * PostgreSQL's own with the same OIDs in every release, so a driver can know their array
 * types without asking; types from it on (the `information_schema` domains, system
 * catalogs' row types, the database's own types) can differ between servers.
 */
export const FIRST_ASSIGNED_OID = 10000;

/**
 * The condition on the element type `alias` of the array types the embedded engine looks up
 * as it starts: every type but the composite types of the database's own, which are mostly
 * tables' row types. A database of many tenants has thousands of those (one per table). An
 * array of one of them is rare, and is learned the first time a result shows it (see
 * {@link arrayTypesSql}).
 *
 * @param alias The element type's alias in the statement.
 * @returns The SQL condition.
 */
export function lookedUpAtStart(alias: string): string {
  return `(${alias}.typtype <> 'c' OR ${alias}.oid < ${FIRST_USER_OID})`;
}

/**
 * The statement that looks up array types: one row per array type with its `element` type,
 * the `array` type, and `parseAs`, the type whose parser and serializer its elements take (the
 * element type's own, or a domain's base type, which is what PostgreSQL reports for a column
 * of the domain itself). Only numbers go into the text, so it runs on the simple protocol.
 *
 * @param types The types to look up, element or array types, or `undefined` for the array
 *   types of the database's own types (from {@link FIRST_USER_OID}) that the embedded
 *   engine looks up as it starts ({@link lookedUpAtStart}).
 * @returns The statement.
 */
export function arrayTypesSql(types: readonly number[] | undefined): string {
  const list = types?.map(Number).join(", ");
  const where = list === undefined
    ? `e.oid >= ${FIRST_USER_OID} AND ${lookedUpAtStart("e")}`
    : `(a.oid IN (${list}) OR e.oid IN (${list}))`;
  return `SELECT e.oid::int AS element, a.oid::int AS array,
      (CASE WHEN e.typtype = 'd' THEN e.typbasetype ELSE e.oid END)::int AS "parseAs"
    FROM pg_catalog.pg_type a JOIN pg_catalog.pg_type e ON e.oid = a.typelem
    WHERE a.typcategory = 'A' AND ${where}`;
}

/**
 * A value's text for a type the session does not know (made after it opened, or a domain
 * over a type it knows), chosen by the value's own kind as pgdbm binds the types it knows: a
 * `Uint8Array` as bytea hex, a `Date` as its ISO instant, a plain object as JSON, an array as
 * an array literal of such elements, anything else as `String(value)`. Without it, a
 * `Uint8Array` element would go as `1,2,3`, which a bytea reads as those five characters.
 *
 * @param value The parameter's value (not null).
 * @returns Its text.
 */
export function serializeUnknown(value: unknown): string {
  return Array.isArray(value) ? serializeArray(value, unknownElement) : unknownElement(value);
}

function unknownElement(value: unknown): string {
  if (typeof value !== "object" || value === null) return String(value);
  if (value instanceof Uint8Array) return byteaToHex(value);
  if (value instanceof Date) return value.toISOString();
  return isJsonObject(value) ? JSON.stringify(value) : String(value);
}

/**
 * Whether an object is bound as JSON: a plain object (or one without a prototype), or one
 * with `toJSON`.
 *
 * @param value The object.
 * @returns `true` when it is.
 */
export function isJsonObject(value: object): boolean {
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null ||
    typeof (value as { toJSON?: unknown }).toJSON === "function";
}

const TYPE_OID = /^\d+$/;

/**
 * The fallback of a session's serializers, keyed by type OID, for a type that has none (a
 * driver would bind `String(value)`, which joins an array with commas): {@link serializeUnknown}.
 */
export const UNKNOWN_TYPE_SERIALIZERS: object = new Proxy({}, {
  has: (_, key) => typeof key === "string" && TYPE_OID.test(key),
  get: (_, key) => typeof key === "string" && TYPE_OID.test(key) ? serializeUnknown : undefined,
});
