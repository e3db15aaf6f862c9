/**
 * Masks query parameters for the `onQuery` hook: long strings shortened, bytes summarized,
 * and values under sensitive keys or bound to sensitive columns replaced by `"<hidden>"`.
 * Which `$n` positions a statement binds to sensitive columns is worked out once per SQL
 * text and cached, so masking costs little more than a copy of the parameter array.
 *
 * Also masks bound values that the server repeats in the text of an error (see
 * {@link boundValueMasker}).
 *
 * @module
 */

/** What replaces a sensitive value. */
export const HIDDEN = "<hidden>";

/** Strings longer than this are shortened. */
export const MAX_STRING_LENGTH = 200;

/** Names of keys and columns whose values are never shown. "author" is not "auth". */
const SENSITIVE_NAME =
  /passw(?:or)?d|pwd|secret|token|api_?key|credential|private_?key|auth(?!or(?!i))/i;

const MAX_DEPTH = 8;
const CACHE_SIZE = 512;
const MAX_CACHED_SQL_LENGTH = 16_384;
const NONE: readonly number[] = Object.freeze([]);

const STRING_LITERAL = /'(?:[^']|'')*'/g;
const IDENTIFIER = String.raw`(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)`;
const QUALIFIED = String.raw`${IDENTIFIER}(?:\s*\.\s*${IDENTIFIER})*`;
const FUNCTION_CALLS = String.raw`(?:[\w.]+\s*\(\s*)*`;
/** `column = $n`, `column <> fn($n`, `column LIKE $n`. */
const COLUMN_THEN_PARAM = new RegExp(
  String.raw`(${QUALIFIED})\s*(?:=|<>|!=|\blike\b|\bilike\b)\s*${FUNCTION_CALLS}\$(\d+)`,
  "gi",
);
/** `$n = column`. */
const PARAM_THEN_COLUMN = new RegExp(String.raw`\$(\d+)\s*(?:=|<>|!=)\s*(${QUALIFIED})`, "gi");
/** `column IN ($1, $2)`. */
const COLUMN_IN_LIST = new RegExp(String.raw`(${QUALIFIED})\s+in\s*\(([^()]*)\)`, "gi");
/** `INSERT INTO t (a, b) VALUES`. */
const INSERT_HEAD = new RegExp(
  String
    .raw`\binsert\s+into\s+${QUALIFIED}(?:\s+(?:as\s+)?${IDENTIFIER})?\s*\(([^()]*)\)\s*values\s*`,
  "gi",
);

const positionsCache = new Map<string, readonly number[]>();

/**
 * Masks parameters for logging: strings longer than 200 characters are shortened to a
 * prefix and `…(N chars)`, `Uint8Array`s become `<bytes:N>`, values of object keys named
 * like password, secret, token, api_key, auth, credential or private_key become
 * `"<hidden>"` (in objects, arrays and JSON text, recursively, without changing the
 * caller's values), and so do parameters bound to columns with such names in the SQL
 * (`password = $2`, `SET token = $1`, `INSERT INTO t (email, password_hash) VALUES ($1, $2)`).
 * Numbers, booleans, dates and `null` pass through.
 *
 * @param sql The statement the parameters are bound to.
 * @param params The parameters as given.
 * @returns A new array of masked parameters.
 *
 * @example Hide a password bound by column
 * ```ts
 * import { maskQueryParams } from "./_mask.ts";
 * const masked = maskQueryParams("UPDATE users SET password = $2 WHERE id = $1", [7, "s3cret"]);
 * // masked: [7, "<hidden>"]
 * ```
 */
export function maskQueryParams(sql: string, params: readonly unknown[]): unknown[] {
  const n = params.length;
  const out = new Array<unknown>(n);
  if (n === 0) return out;
  const hidden = sensitivePositions(sql);
  for (let i = 0; i < n; i++) out[i] = maskValue(params[i], 0);
  for (const position of hidden) {
    if (position <= n) out[position - 1] = HIDDEN;
  }
  return out;
}

/**
 * Masks one value: long strings, bytes, and sensitive keys of objects, arrays and JSON
 * text. Returns the value itself when nothing in it needs masking.
 *
 * @param value The value.
 * @param depth How deep in an object it sits (deeper than 8 levels is not shown).
 * @returns The masked value.
 */
export function maskValue(value: unknown, depth = 0): unknown {
  switch (typeof value) {
    case "string":
      return maskString(value);
    case "object":
      if (value === null || value instanceof Date) return value;
      if (ArrayBuffer.isView(value)) return `<bytes:${value.byteLength}>`;
      if (value instanceof ArrayBuffer) return `<bytes:${value.byteLength}>`;
      if (depth >= MAX_DEPTH) return "<nested>";
      if (Array.isArray(value)) return maskArray(value, depth + 1);
      return isPlainObject(value) ? maskObject(value, depth + 1) : value;
    default:
      return value;
  }
}

/**
 * The 1-based `$n` positions a statement binds to sensitive columns (cached per SQL text).
 *
 * @param sql The statement.
 * @returns The positions, in no particular order.
 */
export function sensitivePositions(sql: string): readonly number[] {
  const cached = positionsCache.get(sql);
  if (cached !== undefined) return cached;
  const positions = findSensitivePositions(sql);
  if (sql.length <= MAX_CACHED_SQL_LENGTH) {
    if (positionsCache.size >= CACHE_SIZE) {
      positionsCache.delete(positionsCache.keys().next().value!);
    }
    positionsCache.set(sql, positions);
  }
  return positions;
}

/**
 * Whether a key or column name is sensitive (password, secret, token, api_key, auth…).
 *
 * @param name The name, quoted or not.
 * @returns True when its values must be hidden.
 */
export function isSensitiveName(name: string): boolean {
  return SENSITIVE_NAME.test(name);
}

function findSensitivePositions(sql: string): readonly number[] {
  if (!SENSITIVE_NAME.test(sql) || !sql.includes("$")) return NONE;
  const text = sql.replace(STRING_LITERAL, "''");
  const found = new Set<number>();
  for (const match of text.matchAll(COLUMN_THEN_PARAM)) {
    if (isSensitiveName(lastPart(match[1]))) found.add(Number(match[2]));
  }
  for (const match of text.matchAll(PARAM_THEN_COLUMN)) {
    if (isSensitiveName(lastPart(match[2]))) found.add(Number(match[1]));
  }
  for (const match of text.matchAll(COLUMN_IN_LIST)) {
    if (isSensitiveName(lastPart(match[1]))) addParams(match[2], found);
  }
  for (const match of text.matchAll(INSERT_HEAD)) {
    const sensitive = match[1].split(",").map(isSensitiveName);
    if (sensitive.includes(true)) {
      insertPositions(text, match.index + match[0].length, sensitive, found);
    }
  }
  return found.size === 0 ? NONE : Object.freeze([...found]);
}

/** Maps each `VALUES (…), (…)` tuple from `start` onto the columns (sensitive or not). */
function insertPositions(
  text: string,
  start: number,
  sensitive: readonly boolean[],
  found: Set<number>,
): void {
  let i = start;
  while (text[i] === "(") {
    const end = tupleEnd(text, i);
    splitTopLevel(text.slice(i + 1, end)).forEach((item, index) => {
      if (sensitive[index] === true) addParams(item, found);
    });
    i = end + 1;
    while (/\s/.test(text[i] ?? "")) i++;
    if (text[i] !== ",") return;
    i++;
    while (/\s/.test(text[i] ?? "")) i++;
  }
}

/** The index of the `)` closing the `(` at `open` (or the end of the text). */
function tupleEnd(text: string, open: number): number {
  let depth = 0;
  for (let i = open; i < text.length; i++) {
    if (text[i] === "(") depth++;
    else if (text[i] === ")" && --depth === 0) return i;
  }
  return text.length;
}

/** Splits a tuple's inside on the commas outside nested parentheses. */
function splitTopLevel(inner: string): string[] {
  const items: string[] = [];
  let depth = 0;
  let from = 0;
  for (let i = 0; i < inner.length; i++) {
    const c = inner[i];
    if (c === "(") depth++;
    else if (c === ")") depth--;
    else if (c === "," && depth === 0) {
      items.push(inner.slice(from, i));
      from = i + 1;
    }
  }
  items.push(inner.slice(from));
  return items;
}

/** Adds every `$n` of `text` (scanned by hand: this runs once per VALUES item). */
function addParams(text: string, found: Set<number>): void {
  for (let i = text.indexOf("$"); i !== -1; i = text.indexOf("$", i + 1)) {
    let n = 0;
    let j = i + 1;
    for (let c = text.charCodeAt(j); c >= 48 && c <= 57; c = text.charCodeAt(++j)) {
      n = n * 10 + c - 48;
    }
    if (j > i + 1) found.add(n);
  }
}

function lastPart(qualified: string): string {
  const dot = qualified.lastIndexOf(".");
  return dot === -1 ? qualified : qualified.slice(dot + 1);
}

function maskString(value: string): unknown {
  const first = value.charCodeAt(0);
  // "{" or "[": JSON text, whose sensitive keys are hidden too.
  if ((first === 123 || first === 91) && SENSITIVE_NAME.test(value)) {
    const masked = maskJsonText(value);
    if (masked !== undefined) return masked;
  }
  return shorten(value);
}

function maskJsonText(value: string): string | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(value);
  } catch {
    return undefined;
  }
  const masked = maskValue(parsed, 1);
  return masked === parsed ? undefined : shorten(JSON.stringify(masked));
}

function shorten(value: string): string {
  if (value.length <= MAX_STRING_LENGTH) return value;
  return `${value.slice(0, MAX_STRING_LENGTH)}…(${value.length} chars)`;
}

function maskArray(value: readonly unknown[], depth: number): readonly unknown[] {
  let copy: unknown[] | undefined;
  for (let i = 0; i < value.length; i++) {
    const masked = maskValue(value[i], depth);
    if (masked !== value[i]) {
      copy ??= value.slice();
      copy[i] = masked;
    }
  }
  return copy ?? value;
}

function maskObject(value: object, depth: number): object {
  let copy: Record<string, unknown> | undefined;
  for (const [key, item] of Object.entries(value)) {
    const masked = isSensitiveName(key) ? HIDDEN : maskValue(item, depth);
    if (masked !== item) {
      copy ??= { ...value };
      copy[key] = masked;
    }
  }
  return copy ?? value;
}

function isPlainObject(value: object): boolean {
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** Numbers (and bigints) shorter than this are not masked in text: `varchar(10)` stays. */
export const MIN_MASKED_NUMBER_LENGTH = 3;

const STARTS_WITH_WORD_CHAR = /^[\p{L}\p{N}_]/u;
const ENDS_WITH_WORD_CHAR = /[\p{L}\p{N}_]$/u;
const REGEXP_SYNTAX = /[\\^$.*+?()[\]{}|/]/g;

/**
 * The mask of one value that tells only its type: `"<string>"`, `"<number>"`,
 * `"<bytes:N>"`, `"<array:N>"`, `"<date>"`, `"null"`, `"undefined"`…
 *
 * @param value The value.
 * @returns Its mask.
 */
export function typeMask(value: unknown): string {
  if (value === null) return "null";
  if (value === undefined) return "undefined";
  if (value instanceof Date) return "<date>";
  if (value instanceof Uint8Array) return `<bytes:${value.length}>`;
  if (Array.isArray(value)) return `<array:${value.length}>`;
  return `<${typeof value}>`;
}

/**
 * Builds a function that replaces, in a text, every occurrence of a bound value as the
 * server prints it by that value's {@link typeMask}: `Key (token)=(s3cr3t) already exists.`
 * becomes `Key (token)=(<string>) already exists.`
 *
 * Which values are looked for: strings of any non-empty length; numbers and bigints whose
 * decimal text has at least {@link MIN_MASKED_NUMBER_LENGTH} characters (so a bound `10`
 * leaves `varchar(10)` alone); bytes as the server's hex form (`\x…`); and, recursively, the
 * strings and numbers inside arrays, plain objects and JSON text (values, not keys). Dates
 * and booleans are not looked for. An occurrence is masked only as a whole token: a value
 * that starts (or ends) with a letter, digit or underscore is not masked where another such
 * character precedes (or follows) it, so a bound `"t"` leaves `"t_token_key"` whole. The
 * longest value wins where several overlap, and a mask is never masked again.
 *
 * @param params The parameters as given.
 * @returns The masking function; it returns its argument unchanged when there is nothing
 *   to mask (always so when no parameter has text worth looking for).
 *
 * @example Mask a unique violation's detail
 * ```ts
 * import { boundValueMasker } from "./_mask.ts";
 * const mask = boundValueMasker([7, "s3cr3t"]);
 * console.log(mask("Key (token)=(s3cr3t) already exists.")); // Key (token)=(<string>) already exists.
 * ```
 */
export function boundValueMasker(params: readonly unknown[]): (text: string) => string {
  const texts = new Map<string, string>();
  for (const value of params) collectTexts(value, typeMask(value), texts, 0);
  if (texts.size === 0) return identity;
  return (text) => maskTexts(text, texts);
}

function identity(text: string): string {
  return text;
}

/** Adds the texts the server may print for `value` (first mask wins for equal texts). */
function collectTexts(value: unknown, mask: string, out: Map<string, string>, depth: number) {
  switch (typeof value) {
    case "string":
      if (value.length > 0 && !out.has(value)) out.set(value, mask);
      if (depth < MAX_DEPTH && (value.startsWith("{") || value.startsWith("["))) {
        const parsed = parseJson(value);
        if (parsed !== undefined && typeof parsed === "object") {
          collectTexts(parsed, mask, out, depth + 1);
        }
      }
      return;
    case "number":
    case "bigint": {
      const text = String(value);
      if (text.length >= MIN_MASKED_NUMBER_LENGTH && !out.has(text)) out.set(text, mask);
      return;
    }
    case "object": {
      if (value === null || value instanceof Date || depth >= MAX_DEPTH) return;
      if (value instanceof Uint8Array) {
        if (value.length > 0) out.set(`\\x${hex(value)}`, mask);
        return;
      }
      const items = Array.isArray(value)
        ? value
        : isPlainObject(value)
        ? Object.values(value)
        : undefined;
      for (const item of items ?? []) collectTexts(item, typeMask(item), out, depth + 1);
      return;
    }
    default:
      return;
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

function hex(bytes: Uint8Array): string {
  let out = "";
  for (const byte of bytes) out += byte.toString(16).padStart(2, "0");
  return out;
}

/** Replaces the whole-token occurrences of `texts`' keys in one pass, longest first. */
function maskTexts(text: string, texts: ReadonlyMap<string, string>): string {
  const present: string[] = [];
  for (const value of texts.keys()) if (text.includes(value)) present.push(value);
  if (present.length === 0) return text;
  present.sort((a, b) => b.length - a.length);
  const pattern = present.map((value) => {
    const body = value.replace(REGEXP_SYNTAX, "\\$&");
    const before = STARTS_WITH_WORD_CHAR.test(value) ? String.raw`(?<![\p{L}\p{N}_])` : "";
    const after = ENDS_WITH_WORD_CHAR.test(value) ? String.raw`(?![\p{L}\p{N}_])` : "";
    return before + body + after;
  }).join("|");
  return text.replace(new RegExp(pattern, "gu"), (found) => texts.get(found) ?? found);
}
