/**
 * The wire driver's type mapping, by type OID, in PostgreSQL's text format: how a column's
 * text becomes a JavaScript value, and how a parameter becomes text for the type the server
 * declared for it. The mapping is the one pgdbm has always had (postgres.js's defaults, its first driver): `int2`,
 * `int4`, `oid`, `float4` and `float8` as numbers; `int8` and `numeric` as strings (no
 * precision lost); `bool`; `json`/`jsonb` parsed; `date`, `timestamp` and `timestamptz` as
 * `Date`; `bytea` as `Uint8Array`; arrays of all of these; anything else as its text.
 *
 * @module
 */

import { byteaFromHex, byteaToHex } from "./_bytea.ts";
import { parseArrayBody, serializeArray, serializeUnknown } from "./_pg_array.ts";

/** Turns a column's text into its value. */
export type TextParser = (text: string) => unknown;
/** Turns a parameter's value into text for its declared type. */
export type TextSerializer = (value: unknown) => string;

const toNumber: TextParser = (text) => +text;
const toJson: TextParser = (text) => JSON.parse(text);
const toBoolean: TextParser = (text) => text === "t";
const toDate: TextParser = (text) => new Date(text);

const fromNumber: TextSerializer = (value) => "" + value;
const fromJson: TextSerializer = (value) => JSON.stringify(value);
const fromBoolean: TextSerializer = (value) =>
  typeof value === "string" ? value : value === true ? "t" : "f";
const fromDate: TextSerializer = (value) =>
  typeof value === "string" ? value : (value instanceof Date ? value : new Date(value as number))
    .toISOString();
const fromBytea: TextSerializer = (value) =>
  value instanceof Uint8Array ? byteaToHex(value) : String(value);

/** `box[]`, the one array type whose elements are separated by `;`. */
const BOX_ARRAY = 1020;

/**
 * An element type, its array type, and the type whose parser and serializer its elements
 * take: the element type's own, or a domain's base type (which is what PostgreSQL reports
 * for a column of the domain itself).
 */
export type ArrayTypePair = readonly [element: number, array: number, parseAs: number];

/** One session's parsers and serializers: the built-in ones, then the array types it learns. */
export class TypeMap {
  readonly #parsers = new Map<number, TextParser>([
    [21, toNumber],
    [23, toNumber],
    [26, toNumber],
    [700, toNumber],
    [701, toNumber],
    [114, toJson],
    [3802, toJson],
    [16, toBoolean],
    [1082, toDate],
    [1114, toDate],
    [1184, toDate],
    [17, byteaFromHex],
  ]);
  readonly #serializers = new Map<number, TextSerializer>([
    [21, fromNumber],
    [23, fromNumber],
    [26, fromNumber],
    [700, fromNumber],
    [701, fromNumber],
    [114, fromJson],
    [3802, fromJson],
    [16, fromBoolean],
    [1082, fromDate],
    [1114, fromDate],
    [1184, fromDate],
    [17, fromBytea],
  ]);
  readonly #arrays = new Set<number>();

  /** The parser of a column of type `oid`, or `undefined` to keep its text. */
  parser(oid: number): TextParser | undefined {
    return this.#parsers.get(oid);
  }

  /** True once `oid` is known as an array type. */
  isArray(oid: number): boolean {
    return this.#arrays.has(oid);
  }

  /**
   * A parameter's text for the type the server declared for it. A type without a
   * serializer (made after the session opened, or a domain) takes the text of the value's
   * own kind ({@link serializeUnknown}). A string for `json`/`jsonb` is a JSON string, as
   * any other value is JSON.
   */
  serialize(value: unknown, oid: number): string {
    const serialize = this.#serializers.get(oid);
    return serialize !== undefined ? serialize(value) : serializeUnknown(value);
  }

  /** Installs array types: parsers that turn NULL elements into `null`, and serializers. */
  install(pairs: readonly ArrayTypePair[]): void {
    for (const [_element, array, parseAs] of pairs) {
      const parse = this.#parsers.get(parseAs);
      const own = this.#serializers.get(parseAs);
      // `String()` writes numbers as `fromNumber` does, and lets serializeArray join them.
      const serialize = own === fromNumber ? undefined : own;
      const delimiter = array === BOX_ARRAY ? ";" : ",";
      this.#arrays.add(array);
      this.#parsers.set(array, (text) => parseArrayBody(text.slice(1), parse, delimiter));
      this.#serializers.set(
        array,
        (value) => serializeArray(value, serialize, delimiter),
      );
    }
  }
}
