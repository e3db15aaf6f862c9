/**
 * The wire driver's type mapping, by type OID, in PostgreSQL's text format: how a column's
 * text becomes a JavaScript value, and how a parameter becomes text for the type the server
 * declared for it. The mapping is the one pgdbm has always had (postgres.js's defaults, its first driver): `int2`,
 * `int4`, `oid`, `float4` and `float8` as numbers; `int8` and `numeric` as strings (no
 * precision lost); `bool`; `json`/`jsonb` parsed; `date`, `timestamp` and `timestamptz` as
 * `Date`; `bytea` as `Uint8Array`; arrays of all of these; anything else as its text.
 * PostgreSQL's own array types are known from the start ({@link BUILTIN_ARRAY_TYPES}); the
 * others are installed as the session learns them.
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

/**
 * The array types of PostgreSQL's own types below `FIRST_ASSIGNED_OID` (10000), as `element
 * array` pairs: the same in every release (PostgreSQL 15 and 17 list the same 82), so a
 * session knows them without reading `pg_type` as it opens. Any other array type is learned
 * the first time a result shows it. A test compares the list with the server's.
 */
export const BUILTIN_ARRAY_TYPES: readonly ArrayTypePair[] = (
  "16 1000,17 1001,18 1002,19 1003,20 1016,21 1005,22 1006,23 1007,24 1008,25 1009,26 1028," +
  "27 1010,28 1011,29 1012,30 1013,71 210,75 270,81 272,83 273,114 199,142 143,600 1017," +
  "601 1018,602 1019,603 1020,604 1027,628 629,650 651,700 1021,701 1022,718 719,774 775," +
  "790 791,829 1040,869 1041,1033 1034,1042 1014,1043 1015,1082 1182,1083 1183,1114 1115," +
  "1184 1185,1186 1187,1266 1270,1560 1561,1562 1563,1700 1231,1790 2201,2202 2207,2203 2208," +
  "2204 2209,2205 2210,2206 2211,2249 2287,2275 1263,2950 2951,2970 2949,3220 3221,3614 3643," +
  "3615 3645,3642 3644,3734 3735,3769 3770,3802 3807,3904 3905,3906 3907,3908 3909,3910 3911," +
  "3912 3913,3926 3927,4072 4073,4089 4090,4096 4097,4191 4192,4451 6150,4532 6151,4533 6152," +
  "4534 6153,4535 6155,4536 6157,5038 5039,5069 271"
).split(",").map((pair) => {
  const [element, array] = pair.split(" ").map(Number);
  return [element, array, element] as const;
});

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

  constructor() {
    this.install(BUILTIN_ARRAY_TYPES);
  }

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
