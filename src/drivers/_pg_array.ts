/**
 * PostgreSQL array literals: parsing, NULL elements included (postgres.js turns an unquoted
 * `NULL` element into the string `"NULL"` or into `NaN`; this parser returns `null`), and
 * writing arrays bound as parameters.
 *
 * @module
 */

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
 * Writes a JavaScript array as an array literal: every element quoted and escaped, nested
 * arrays as nested literals, `null` and `undefined` as NULL. A value that is not an array
 * (already a literal) is returned as it is.
 *
 * @param value The array.
 * @param serialize The element serializer, or `undefined` for `String(element)`.
 * @param delimiter The element delimiter (`;` for `box`, `,` otherwise).
 * @returns The literal, such as `{"1","NULL is not this",NULL}`.
 */
export function serializeArray(
  value: unknown,
  serialize: ElementSerializer | undefined,
  delimiter = ",",
): string {
  if (!Array.isArray(value)) return value as string;
  const parts = value.map((element) => {
    if (element === null || element === undefined) return "NULL";
    if (Array.isArray(element)) return serializeArray(element, serialize, delimiter);
    const text = serialize === undefined ? String(element) : serialize(element);
    return `"${text.replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"`;
  });
  return `{${parts.join(delimiter)}}`;
}
