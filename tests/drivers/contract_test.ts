/**
 * The driver contract of src/drivers/driver.ts as one table of cases, run over every driver: the
 * network driver (pgdbm's own protocol client over TCP, against PGDBM_TEST_URL) and the embedded one
 * (PGlite, in process). Each case gets a fresh session and its own tables in a schema of its
 * driver run. Where a driver documents that it cannot do what the other does (PGlite cannot
 * interrupt a running statement, has one session, ignores `prepare`), the case asserts that
 * documented behaviour instead.
 *
 * A step that fails names a driver that breaks the contract; when this file was written,
 * four network steps failed that way (the commit that added it lists them).
 *
 * PGlite takes ~2 s and ~650 MB to start, so the file has one PGlite driver.
 */
import assert from "node:assert/strict";
import { resolveConfig } from "../../src/config.ts";
import type { Driver, DriverConnection, DriverResult } from "../../src/drivers/driver.ts";
import { QueryError } from "../../src/errors.ts";
import { createPgliteDriver } from "../../src/drivers/pglite.ts";
import { createWireDriver } from "../../src/drivers/wire.ts";
import { serverTest, TEST_URL, uniqueName } from "../_support/server.ts";
import { rejection, settlesWithin } from "../_support/settle.ts";
import { concat } from "../_support/bytes.ts";

type Kind = "network" | "embedded";

/** One driver under test, and the schema its cases create their tables in. */
interface Target {
  kind: Kind;
  driver: Driver;
  schema: string;
  /** `name` qualified with this run's schema. */
  table(name: string): string;
}

interface Case {
  name: string;
  /** Why the case does not apply to a target, or `undefined` when it does. */
  skip?: (target: Target) => string | undefined;
  run(conn: DriverConnection, target: Target): Promise<void>;
}

/** Settings both drivers apply to every session. */
const SERVER_SETTINGS = { application_name: "pgdbm driver contract", lock_timeout: "1500" };

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async function exec(
  conn: DriverConnection,
  sql: string,
  params: readonly unknown[] = [],
  prepare = false,
): Promise<DriverResult> {
  return await conn.query(sql, params, { prepare }).result;
}

/** How a statement ended, in a form `assert.deepEqual` compares and prints well. */
type Outcome =
  | { rows: unknown[]; command: string; rowCount: number }
  | { sqlstate: string | undefined }
  | { other: string };

function outcome(promise: Promise<DriverResult>): Promise<Outcome> {
  return promise.then(
    ({ rows, command, rowCount }) => ({ rows, command, rowCount }),
    (error: unknown) =>
      error instanceof QueryError ? { sqlstate: error.sqlstate } : { other: String(error) },
  );
}

function selected(rows: unknown[]): Outcome {
  return { rows, command: "SELECT", rowCount: rows.length };
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** The whole output of a COPY out, as text. */
async function collect(chunks: AsyncIterable<Uint8Array>): Promise<string> {
  const all: Uint8Array[] = [];
  for await (const chunk of chunks) all.push(chunk);
  return new TextDecoder().decode(concat(all));
}

/** Escapes one value for COPY text format (`null` becomes `\N`). */
function copyValue(value: string | null): string {
  if (value === null) return "\\N";
  return value.replaceAll("\\", "\\\\").replaceAll("\t", "\\t").replaceAll("\n", "\\n")
    .replaceAll("\r", "\\r");
}

async function* fromChunks(chunks: readonly string[]): AsyncGenerator<string> {
  for (const chunk of chunks) yield chunk;
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

const CASES: Case[] = [
  {
    name: "connect() opens a session with a positive pid, its server_version and the settings",
    async run(conn) {
      assert.ok(Number.isInteger(conn.pid) && conn.pid > 0, `pid ${conn.pid}`);
      assert.match(conn.serverVersion, /^\d+(\.\d+)?/);
      assert.equal(conn.closed, false);
      const { rows } = await exec(
        conn,
        "SELECT pg_backend_pid() AS pid, current_setting('server_version') AS version, " +
          "current_setting('application_name') AS app, current_setting('lock_timeout') AS lock",
      );
      assert.deepEqual(rows, [{
        pid: conn.pid,
        version: conn.serverVersion,
        app: SERVER_SETTINGS.application_name,
        lock: "1500ms",
      }]);
    },
  },

  {
    name: "connect() rejects with a QueryError when it cannot open a session",
    async run(_conn, target) {
      if (target.kind === "network") {
        const url = new URL(TEST_URL);
        url.pathname = `/${uniqueName("no_such_db")}`;
        const elsewhere = createWireDriver(resolveConfig({ connectionString: url.href }));
        try {
          const error = await rejection(elsewhere.connect());
          assert.equal(error.sqlstate, "3D000");
        } finally {
          await elsewhere.close();
        }
      } else {
        // PGlite has one session (documented): a second one while it is open is refused.
        assert.equal(target.driver.maxSessions, 1);
        const error = await rejection(target.driver.connect());
        assert.equal(error.sqlstate, "53300");
      }
    },
  },

  {
    name: "query() without params runs the simple protocol: several statements, last result",
    async run(conn, target) {
      const t = target.table("simple");
      assert.deepEqual(await exec(conn, "SELECT 1 AS one"), selected([{ one: 1 }]));
      assert.deepEqual(
        await exec(
          conn,
          `CREATE TABLE ${t} (id int); INSERT INTO ${t} VALUES (1), (2); ` +
            `SELECT id FROM ${t} ORDER BY id`,
        ),
        selected([{ id: 1 }, { id: 2 }]),
      );
      assert.deepEqual(
        await exec(conn, `INSERT INTO ${t} VALUES (3); SELECT 1 AS a; SELECT 2 AS b WHERE false`),
        selected([]),
      );
      // `prepare` does not matter without params: still the simple protocol.
      assert.deepEqual(
        (await conn.query("SELECT 1 AS a; SELECT 2 AS b", [], { prepare: true }).result).rows,
        [{ b: 2 }],
      );
      // With params it is the extended protocol, which takes one statement only.
      const error = await rejection(
        conn.query("SELECT 1; SELECT $1::int", [1], { prepare: false }).result,
      );
      assert.equal(error.sqlstate, "42601");
      assert.deepEqual((await exec(conn, `SELECT count(*)::int AS n FROM ${t}`)).rows, [{ n: 3 }]);
    },
  },

  {
    name: "query() without params: a last statement without rows gives its own command",
    async run(conn, target) {
      // The rows and rowCount are the last row-returning statement's on the network driver
      // (as postgres.js, its first driver, did), the last
      // statement's on PGlite: driver.ts documents both.
      const t = target.table("simple_last");
      await exec(conn, `CREATE TABLE ${t} (id int)`);
      const inserted = await exec(conn, `SELECT 1 AS a; INSERT INTO ${t} VALUES (1), (2), (3)`);
      assert.equal(inserted.command, "INSERT");
      const updated = await exec(conn, `SELECT 1 AS a; UPDATE ${t} SET id = id + 1`);
      assert.equal(updated.command, "UPDATE");
      assert.deepEqual(
        await exec(conn, `UPDATE ${t} SET id = id + 1; SELECT id FROM ${t} ORDER BY id`),
        { rows: [{ id: 3 }, { id: 4 }, { id: 5 }], command: "SELECT", rowCount: 3 },
      );
    },
  },

  {
    name: "query() with params runs the extended protocol, prepared (named) or not",
    async run(conn, target) {
      const sql = "SELECT $1::int + $2::int AS n, $3::text AS s, $4::text AS nothing";
      for (const prepare of [false, true, false, true]) {
        const result = await conn.query(sql, [40, 2, "it's $1 -- ;", null], { prepare }).result;
        assert.deepEqual(
          result,
          { rows: [{ n: 42, s: "it's $1 -- ;", nothing: null }], command: "SELECT", rowCount: 1 },
          `prepare: ${prepare}`,
        );
      }
      const { rows } = await exec(
        conn,
        "SELECT count(*)::int AS n FROM pg_prepared_statements WHERE statement = $1",
        [sql],
      );
      // The network driver names the statement when `prepare` is true (once, then reuses
      // it); PGlite documents that it does not use named prepared statements.
      assert.deepEqual(rows, [{ n: target.kind === "network" ? 1 : 0 }]);
    },
  },

  {
    name: "query() reports command and rowCount of INSERT, UPDATE, DELETE and SELECT",
    async run(conn, target) {
      for (const prepare of [false, true]) {
        const t = target.table(`counts_${prepare}`);
        const cases: Array<[string, unknown[], string, number, unknown[]?]> = [
          [`CREATE TABLE ${t} (id int PRIMARY KEY, v text)`, [], "CREATE TABLE", 0],
          [`INSERT INTO ${t} VALUES (1, 'a'), (2, 'b'), (3, 'c')`, [], "INSERT", 3],
          [`INSERT INTO ${t} VALUES ($1, $2) RETURNING id`, [4, "d"], "INSERT", 1, [{ id: 4 }]],
          [`UPDATE ${t} SET v = v || '!' WHERE id <= $1`, [2], "UPDATE", 2],
          [`UPDATE ${t} SET v = 'x' WHERE id > 100`, [], "UPDATE", 0],
          [`DELETE FROM ${t} WHERE id = $1`, [4], "DELETE", 1],
          [`DELETE FROM ${t} WHERE id > $1 RETURNING v`, [2], "DELETE", 1, [{ v: "c" }]],
          [`SELECT id, v FROM ${t} ORDER BY id`, [], "SELECT", 2, [{ id: 1, v: "a!" }, {
            id: 2,
            v: "b!",
          }]],
          [`SELECT id FROM ${t} WHERE id > $1`, [10], "SELECT", 0, []],
        ];
        for (const [sql, params, command, rowCount, rows] of cases) {
          const result = await exec(conn, sql, params, prepare);
          assert.equal(result.command, command, sql);
          assert.equal(result.rowCount, rowCount, sql);
          assert.deepEqual(result.rows, rows ?? [], sql);
        }
      }
    },
  },

  {
    name: "query() returns int8/numeric as strings, json parsed, dates as Date, arrays, bytea",
    async run(conn) {
      for (const [params, prepare] of [[[], false], [[0], false], [[0], true]] as const) {
        const zero = params.length === 0 ? "0" : "$1::int";
        const { rows: [row] } = await exec(
          conn,
          `SELECT 9007199254740993::int8 + ${zero} AS big, 1.50::numeric AS num,
            8::int4 AS int, 2.25::float8 AS f8, true AS yes, false AS no,
            '{"a":[1,null]}'::json AS js, '{"b":{"c":"d"}}'::jsonb AS jsb,
            '2024-02-29 12:34:56+02'::timestamptz AS tstz, '2024-02-29'::date AS d,
            '{a,NULL,"b,c","NULL"}'::text[] AS texts, '{1,NULL,3}'::int[] AS ints,
            '{{1,2},{3,NULL}}'::int4[] AS grid, '{{a},{NULL}}'::text[] AS tgrid,
            '\\x00ff10'::bytea AS bytes, ARRAY['\\x01'::bytea, NULL] AS byteas,
            NULL::int AS nothing`,
          params,
          prepare,
        );
        const where = `params ${JSON.stringify(params)}, prepare ${prepare}`;
        assert.equal(row.big, "9007199254740993", where);
        assert.equal(row.num, "1.50", where);
        assert.equal(row.int, 8, where);
        assert.equal(row.f8, 2.25, where);
        assert.equal(row.yes, true, where);
        assert.equal(row.no, false, where);
        assert.deepEqual(row.js, { a: [1, null] }, where);
        assert.deepEqual(row.jsb, { b: { c: "d" } }, where);
        assert.ok(row.tstz instanceof Date, where);
        assert.equal(row.tstz.toISOString(), "2024-02-29T10:34:56.000Z", where);
        assert.ok(row.d instanceof Date, where);
        assert.equal(row.d.toISOString(), "2024-02-29T00:00:00.000Z", where);
        assert.deepEqual(row.texts, ["a", null, "b,c", "NULL"], where);
        assert.deepEqual(row.ints, [1, null, 3], where);
        assert.deepEqual(row.grid, [[1, 2], [3, null]], where);
        assert.deepEqual(row.tgrid, [["a"], [null]], where);
        assert.equal(Object.getPrototypeOf(row.bytes), Uint8Array.prototype, where);
        assert.deepEqual(row.bytes, new Uint8Array([0, 255, 16]), where);
        const byteas = row.byteas as unknown[];
        assert.equal(Object.getPrototypeOf(byteas[0]), Uint8Array.prototype, where);
        assert.deepEqual(byteas, [new Uint8Array([1]), null], where);
        assert.equal(row.nothing, null, where);
      }
    },
  },

  {
    name: "query() binds bytea, Date, json, and arrays of Date, bytea, text and int",
    async run(conn, target) {
      const bytes = new Uint8Array([0, 1, 2, 92, 254, 255]);
      const when = new Date("2024-05-06T07:08:09.123Z");
      const later = new Date("2030-01-02T03:04:05.678Z");
      for (const prepare of [false, true]) {
        const { rows: [row] } = await exec(
          conn,
          "SELECT $1::bytea AS b, $2::timestamptz AS t, $3::jsonb AS j, $4::int8 AS i",
          [bytes, when, { k: [1, "two"] }, "9007199254740993"],
          prepare,
        );
        assert.equal(Object.getPrototypeOf(row.b), Uint8Array.prototype);
        assert.deepEqual(row.b, bytes);
        assert.ok(row.t instanceof Date);
        assert.equal(row.t.getTime(), when.getTime());
        assert.deepEqual(row.j, { k: [1, "two"] });
        assert.equal(row.i, "9007199254740993");

        const { rows: [arrays] } = await exec(
          conn,
          "SELECT $1::timestamptz[] AS ts, $2::bytea[] AS bs, $3::text[] AS txt, $4::int[] AS ints",
          [
            [when, later],
            [bytes, new Uint8Array([7]), null],
            ["a", null, 'q"x', "b,c", "back\\slash"],
            [[1, 2], [3, null]],
          ],
          prepare,
        );
        assert.deepEqual(arrays.ts, [when, later], `prepare ${prepare}`);
        assert.deepEqual(arrays.bs, [bytes, new Uint8Array([7]), null], `prepare ${prepare}`);
        assert.deepEqual(arrays.txt, ["a", null, 'q"x', "b,c", "back\\slash"]);
        assert.deepEqual(arrays.ints, [[1, 2], [3, null]]);
      }

      // Untyped array parameters: the server infers their types from the columns.
      const t = target.table("bound");
      await exec(conn, `CREATE TABLE ${t} (b bytea, ts timestamptz[], bs bytea[])`);
      const { rows } = await exec(
        conn,
        `INSERT INTO ${t} (b, ts, bs) VALUES ($1, $2, $3) RETURNING b, ts, bs`,
        [bytes, [when, later], [bytes, null]],
        true,
      );
      assert.deepEqual(rows, [{ b: bytes, ts: [when, later], bs: [bytes, null] }]);
    },
  },

  {
    name: "query() binds arrays of awkward elements exactly, bare or quoted",
    async run(conn, target) {
      const texts = [
        "plain",
        "user1@example.com",
        null,
        "NULL",
        "null",
        "NuLl",
        "",
        " lead",
        "trail ",
        "in side",
        "a,b",
        "semi;colon",
        "{}",
        "}",
        "{x",
        'q"uote',
        "back\\slash",
        "\\",
        '\\"',
        "tab\there",
        "new\nline",
        "cr\r",
        "nbsp\u00a0here",
        "☃ 日本語 🎉 e\u0301",
        "[1:2]",
        "a[b]",
        "'single'",
        "N",
        "NULLS",
      ];
      const ints = [0, -1, 2147483647, -2147483648, null];
      const floats = [0.1, -0, 1e21, -1.5e-300, NaN, Infinity, -Infinity, null];
      const bigs = ["9223372036854775807", "-9223372036854775808", null];
      const nested = [["a b", null], ['c"', "d"]];
      const t = target.table("awkward_arrays");
      await exec(conn, `CREATE TABLE ${t} (t text[], i int4[], f float8[], b int8[], n text[])`);
      for (const prepare of [false, true]) {
        await exec(conn, `DELETE FROM ${t}`);
        await exec(
          conn,
          `INSERT INTO ${t} SELECT $1::text[], $2::int4[], $3::float8[], $4::int8[], $5::text[]`,
          [texts, ints, floats, bigs, nested],
          prepare,
        );
        const { rows: [row] } = await exec(
          conn,
          `SELECT array_to_json(t)::text AS t, array_to_json(i)::text AS i, f::text AS f, ` +
            `b::text AS b, array_to_json(n)::text AS n FROM ${t}`,
        );
        assert.deepEqual(JSON.parse(row.t as string), texts, `prepare ${prepare}`);
        assert.deepEqual(JSON.parse(row.i as string), ints, `prepare ${prepare}`);
        assert.equal(
          row.f,
          // -0 is written as JavaScript prints it: 0.
          "{0.1,0,1e+21,-1.5e-300,NaN,Infinity,-Infinity,NULL}",
          `prepare ${prepare}`,
        );
        assert.equal(row.b, "{9223372036854775807,-9223372036854775808,NULL}");
        assert.deepEqual(JSON.parse(row.n as string), nested, `prepare ${prepare}`);
      }
    },
  },

  {
    name: "query() binds flat arrays of every scalar type as the server reads their text",
    async run(conn) {
      // The network driver sends these arrays in binary when every element fits its type,
      // and as literals otherwise: the server must read the same values either way.
      const cases: Array<[string, unknown[], string]> = [
        ["int2[]", [-32768, 32767, 0, null, undefined], "{-32768,32767,0,NULL,NULL}"],
        ["int4[]", [-2147483648, 2147483647, -1, null], "{-2147483648,2147483647,-1,NULL}"],
        [
          "int8[]",
          [9007199254740991, -9007199254740991, -1, -4294967296, 4294967296, 4294967295, null],
          "{9007199254740991,-9007199254740991,-1,-4294967296,4294967296,4294967295,NULL}",
        ],
        [
          "int8[]",
          [9223372036854775807n, -9223372036854775808n, -1n, 0n],
          "{9223372036854775807,-9223372036854775808,-1,0}",
        ],
        [
          "float8[]",
          [0.1, -0, 5e-324, 1.7976931348623157e308, NaN, -Infinity, null],
          "{0.1,0,5e-324,1.7976931348623157e+308,NaN,-Infinity,NULL}",
        ],
        ["bool[]", [true, false, null], "{t,f,NULL}"],
        ["text[]", ["", "NULL", "☃ 🎉", "a\tb", null], '{"","NULL","☃ 🎉","a\tb",NULL}'],
        ["varchar[]", ["x", "y z"], '{x,"y z"}'],
        ["int4[]", [], "{}"],
        ["text[]", [], "{}"],
        // Elements that do not fit the type go as a literal, which the server reads as before.
        ["int4[]", [1, "2", null], "{1,2,NULL}"],
        ["int8[]", ["9223372036854775807", 1], "{9223372036854775807,1}"],
        ["text[]", ["a", 1, true], "{a,1,true}"],
        ["bool[]", ["t", false], "{t,f}"],
        ["int4[]", [[1, 2], [3, null]], "{{1,2},{3,NULL}}"],
      ];
      for (const prepare of [false, true]) {
        for (const [type, value, text] of cases) {
          const { rows: [row] } = await exec(
            conn,
            `SELECT $1::${type}::text AS t`,
            [value],
            prepare,
          );
          assert.equal(row.t, text, `${type} ${String(value)}, prepare ${prepare}`);
        }
        const { rows: [found] } = await exec(
          conn,
          "SELECT count(*)::int AS n FROM generate_series(1, 10) g WHERE g = ANY($1)",
          [[2, 3, 99]],
          prepare,
        );
        assert.equal(found.n, 2);
        const many = Array.from({ length: 20_000 }, (_, i) => i);
        const { rows: [big] } = await exec(
          conn,
          "SELECT (SELECT sum(x)::text FROM unnest($1::int4[]) x) AS sum, " +
            "(SELECT sum(length(x))::int FROM unnest($2::text[]) x) AS chars",
          [many, many.map((i) => `☃${i}`)],
          prepare,
        );
        assert.deepEqual(big, {
          sum: "199990000",
          chars: many.reduce((total, i) => total + 1 + String(i).length, 0),
        });
        const outOfRange: Array<[string, unknown[], string]> = [
          ["int2[]", [32768], "22003"],
          ["int4[]", [2147483648], "22003"],
          ["int4[]", [1.5], "22P02"],
          ["int8[]", [9223372036854775808n], "22003"],
        ];
        for (const [type, value, sqlstate] of outOfRange) {
          const error = await rejection(
            conn.query(`SELECT $1::${type}`, [value], { prepare }).result,
          );
          assert.equal(error.sqlstate, sqlstate, `${type} ${String(value)}, prepare ${prepare}`);
        }
      }
    },
  },

  {
    name: "query() binds and reads arrays of an enum and a domain created in the session",
    async run(conn, target) {
      // The types are newer than the session (and than PGlite's engine): the driver learns
      // them from the results that show them. A domain's elements read as its base type.
      const mood = target.table("mood");
      const score = target.table("score");
      const t = target.table("feelings");
      await exec(
        conn,
        `CREATE TYPE ${mood} AS ENUM ('happy', 'sad', 'it''s, "odd"', 'NULL', 'back\\slash', '{x}'); ` +
          `CREATE DOMAIN ${score} AS int CHECK (VALUE >= 0); ` +
          `CREATE TABLE ${t} (id int, moods ${mood}[], scores ${score}[])`,
      );
      const moods = ["happy", null, 'it\'s, "odd"', "NULL", "back\\slash", "{x}"];
      const scores = [3, null, 0];
      // Bound before any result showed the types.
      await exec(conn, `INSERT INTO ${t} VALUES (1, $1, $2)`, [moods, scores]);
      await exec(conn, `INSERT INTO ${t} VALUES (2, $1, $2)`, [[], [[1, 2], [3, null]]], true);
      await exec(conn, `INSERT INTO ${t} VALUES (3, NULL, NULL)`);
      for (const prepare of [false, true]) {
        const where = `prepare ${prepare}`;
        const { rows } = await exec(
          conn,
          `SELECT id, moods, scores FROM ${t} WHERE id > $1 ORDER BY id`,
          [0],
          prepare,
        );
        assert.deepEqual(rows, [
          { id: 1, moods, scores },
          { id: 2, moods: [], scores: [[1, 2], [3, null]] },
          { id: 3, moods: null, scores: null },
        ], where);
        const { rows: [row] } = await exec(
          conn,
          `SELECT $1::${mood}[] AS m, $2::${score}[] AS s, $3::${score} AS one, ` +
            `array_to_json($1::${mood}[])::text AS json`,
          [moods, [7, null], 5],
          prepare,
        );
        assert.deepEqual(
          row,
          { m: moods, s: [7, null], one: 5, json: JSON.stringify(moods) },
          where,
        );
      }
      // The simple protocol, and several statements of which the last shows the types.
      const { rows: simple } = await exec(
        conn,
        `SELECT 1; SELECT ARRAY['sad', NULL, 'NULL']::${mood}[] AS m, ARRAY[4, NULL]::${score}[] AS s`,
      );
      assert.deepEqual(simple, [{ m: ["sad", null, "NULL"], s: [4, null] }]);
    },
  },

  {
    name:
      "query() binds domains over bytea, json and timestamptz, and their arrays made after it opened",
    async run(conn, target) {
      // Bound before any result showed the types (and a domain has no serializer of its own):
      // values must go as their base type's text (bytea as hex, json as JSON, an instant as
      // ISO), never as String(value), which turns bytes into "1,2,3".
      const blob = target.table("blob");
      const doc = target.table("doc");
      const moment = target.table("moment");
      const t = target.table("domain_arrays");
      await exec(
        conn,
        `CREATE DOMAIN ${blob} AS bytea; CREATE DOMAIN ${doc} AS jsonb; ` +
          `CREATE DOMAIN ${moment} AS timestamptz; ` +
          `CREATE TABLE ${t} (id int, b ${blob}[], j ${doc}[], m ${moment}[], d ${doc})`,
      );
      const bytes = [new Uint8Array([1, 2, 3]), null, new Uint8Array([0, 255])];
      const docs = [{ a: [1, "two"] }, null, { b: null }];
      const moments = [new Date(Date.UTC(2024, 1, 29, 12, 30)), null];
      const values = [bytes, docs, moments, docs[0]];
      await exec(conn, `INSERT INTO ${t} VALUES (1, $1, $2, $3, $4)`, values);
      await exec(conn, `INSERT INTO ${t} VALUES (2, $1, $2, $3, $4)`, values, true);
      const { rows } = await exec(
        conn,
        `SELECT id, array_to_json(b)::text AS b, array_to_json(j)::text AS j, ` +
          `array_to_json(m)::text AS m, d::text AS d FROM ${t} ORDER BY id`,
      );
      const expected = {
        b: '["\\\\x010203",null,"\\\\x00ff"]',
        j: '[{"a": [1, "two"]},null,{"b": null}]',
        m: '["2024-02-29T12:30:00+00:00",null]',
        d: '{"a": [1, "two"]}',
      };
      assert.deepEqual(rows, [{ id: 1, ...expected }, { id: 2, ...expected }]);
    },
  },

  {
    name: "query() rejects with QueryError and the server's SQLSTATE; the session goes on",
    async run(conn, target) {
      const t = target.table("errors");
      await exec(conn, `CREATE TABLE ${t} (id int CONSTRAINT errors_id_key UNIQUE)`);
      await exec(conn, `INSERT INTO ${t} VALUES (1)`);

      const syntax = await rejection(
        conn.query(`SELECT * FROM ${t} WHER id = 1`, [], { prepare: false }).result,
      );
      assert.equal(syntax.sqlstate, "42601");
      // 1-based: the character after `WHER `, where the parser gave up.
      assert.equal(syntax.position, `SELECT * FROM ${t} WHER `.length + 1);
      assert.equal(syntax.sql, `SELECT * FROM ${t} WHER id = 1`);

      const unique = await rejection(
        conn.query(`INSERT INTO ${t} VALUES (1)`, [], { prepare: false }).result,
      );
      assert.equal(unique.code, "QUERY_ERROR");
      assert.equal(unique.sqlstate, "23505");
      assert.equal(unique.severity, "ERROR");
      assert.equal(unique.constraint, "errors_id_key");
      assert.equal(unique.table, "errors");
      assert.equal(unique.schemaName, target.schema);
      assert.equal(unique.detail, "Key (id)=(1) already exists.");
      for (const prepare of [false, true]) {
        const bound = await rejection(
          conn.query(`INSERT INTO ${t} VALUES ($1)`, [1], { prepare }).result,
        );
        assert.equal(bound.sqlstate, "23505");
        assert.equal(bound.constraint, "errors_id_key");
        assert.equal(typeof bound.detail, "string");
      }

      const zero = await rejection(conn.query("SELECT 1 / 0 AS x", [], { prepare: false }).result);
      assert.equal(zero.sqlstate, "22012");
      for (const prepare of [false, true]) {
        const bound = await rejection(
          conn.query("SELECT $1::int / $2::int", [1, 0], { prepare }).result,
        );
        assert.equal(bound.sqlstate, "22012");
      }

      assert.deepEqual(
        await exec(conn, `SELECT count(*)::int AS n FROM ${t} WHERE id = $1`, [1], true),
        selected([{ n: 1 }]),
      );
      assert.equal(conn.closed, false);
    },
  },

  {
    name: "a failed statement among pipelined ones leaves the others their own results",
    async run(conn, target) {
      const t = target.table("piped");
      await exec(conn, `CREATE TABLE ${t} (n int)`);
      const sent = [
        conn.query(`INSERT INTO ${t} VALUES (1)`, [], { prepare: false }),
        conn.query("SELECT 1 / 0 AS boom", [], { prepare: false }),
        conn.query(`INSERT INTO ${t} VALUES ($1)`, [2], { prepare: false }),
        conn.query("SELECT $1::int / $2::int AS boom", [1, 0], { prepare: true }),
        conn.query(`INSERT INTO ${t} VALUES ($1) RETURNING n`, [3], { prepare: true }),
        conn.query("SELECT nonsense FROM", [], { prepare: false }),
        conn.query(`SELECT n FROM ${t} ORDER BY n`, [], { prepare: false }),
        conn.query("SELECT $1::text AS s", ["last"], { prepare: false }),
      ];
      const outcomes = await Promise.all(sent.map((q) => outcome(q.result)));
      assert.deepEqual(outcomes, [
        { rows: [], command: "INSERT", rowCount: 1 },
        { sqlstate: "22012" },
        { rows: [], command: "INSERT", rowCount: 1 },
        { sqlstate: "22012" },
        { rows: [{ n: 3 }], command: "INSERT", rowCount: 1 },
        { sqlstate: "42601" },
        selected([{ n: 1 }, { n: 2 }, { n: 3 }]),
        selected([{ s: "last" }]),
      ]);
    },
  },

  {
    name: "a prepared statement whose table changed runs again with the new columns, in autocommit",
    skip: (target) =>
      target.kind === "embedded" ? "PGlite keeps no named statements (documented)" : undefined,
    async run(conn, target) {
      const t = target.table("altered");
      await exec(conn, `CREATE TABLE ${t} (id int, v text)`);
      await exec(conn, `INSERT INTO ${t} VALUES (1, 'a')`);
      const sql = `SELECT * FROM ${t} WHERE id = $1`;
      assert.deepEqual((await exec(conn, sql, [1], true)).rows, [{ id: 1, v: "a" }]);
      await exec(conn, `ALTER TABLE ${t} ADD COLUMN w int DEFAULT 7`);
      // The server refuses the kept statement (its result type changed): it is prepared again.
      assert.deepEqual((await exec(conn, sql, [1], true)).rows, [{ id: 1, v: "a", w: 7 }]);
      await exec(conn, `ALTER TABLE ${t} DROP COLUMN v`);
      // In a transaction the refusal aborts it, so the error is the caller's.
      await exec(conn, "BEGIN");
      const error = await rejection(conn.query(sql, [1], { prepare: true }).result);
      await exec(conn, "ROLLBACK");
      assert.equal(error.sqlstate, "0A000");
    },
  },

  {
    name:
      "pipelined statements of every kind, some failing or cancelled, each get their own answer",
    async run(conn) {
      // New texts (described before they bind), kept ones, parameterless and failing
      // statements and cancels, all in flight at once: every answer must be its caller's.
      for (let round = 0; round < 40; round++) {
        const calls = Array.from({ length: 30 }, (_, i) => {
          const n = round * 100 + i;
          switch (i % 6) {
            case 0:
              return { n, running: conn.query(`SELECT $1::int AS n /* r${round} */`, [n]) };
            case 1:
              return { n, running: conn.query("SELECT $1::int AS n", [n], { prepare: true }) };
            case 2:
              return { n, running: conn.query(`SELECT ${n} AS n`, []) };
            case 3:
              return { n, running: conn.query("SELECT $1::int / 0 AS n", [n]), fails: "22012" };
            case 4:
              return { n, running: conn.query("SELECT $1::int AS n", [n], { prepare: false }) };
            default:
              return {
                n,
                running: conn.query(`SELECT $1::int AS n /* c${i} */`, [n]),
                cancel: true,
              };
          }
        });
        const cancels = calls.filter((c) => c.cancel).map((c) => c.running.cancel());
        const outcomes = await Promise.all(calls.map((c) => outcome(c.running.result)));
        await Promise.all(cancels);
        outcomes.forEach((got, i) => {
          const call = calls[i];
          const own = selected([{ n: call.n }]);
          const fine = call.fails !== undefined
            ? JSON.stringify(got) === JSON.stringify({ sqlstate: call.fails })
            : JSON.stringify(got) === JSON.stringify(own) ||
              (call.cancel === true &&
                JSON.stringify(got) === JSON.stringify({ sqlstate: "57014" }));
          assert.ok(fine, `round ${round}, call ${i}: ${JSON.stringify(got)}`);
        });
      }
      assert.deepEqual((await exec(conn, "SELECT 1 AS n")).rows, [{ n: 1 }]);
    },
  },

  {
    name: "cursor() yields every row once at any count around its batch size, and leaves early",
    skip: (target) =>
      target.kind === "embedded" ? "PGlite has no cursor() (documented)" : undefined,
    async run(conn) {
      const cursor = conn.cursor!;
      for (const count of [0, 1, 99, 100, 101, 250, 300, 1000]) {
        const seen: number[] = [];
        for await (
          const rows of cursor("SELECT g FROM generate_series(1, $1::int) g", [count], 100)
        ) {
          assert.ok(rows.length > 0 && rows.length <= 100, `a batch of ${rows.length}`);
          for (const row of rows) seen.push(row.g as number);
        }
        assert.deepEqual(seen, Array.from({ length: count }, (_, i) => i + 1), `${count} rows`);
      }
      // Leaving after the first batch, while the next ones are on their way.
      for (const count of [150, 5000]) {
        for await (const _ of cursor("SELECT g FROM generate_series(1, $1::int) g", [count], 100)) {
          break;
        }
        assert.deepEqual((await exec(conn, "SELECT $1::int AS n", [count])).rows, [{ n: count }]);
      }
      assert.equal(conn.closed, false);
    },
  },

  {
    name: "values of several megabytes and multibyte text read back exactly, in any chunking",
    async run(conn) {
      const big = "é😀x".repeat(700_000);
      const { rows } = await exec(
        conn,
        "SELECT $1::text AS v, length($1::text) AS n, repeat('ab', 1000000) AS r",
        [big],
        true,
      );
      assert.equal(rows[0].n, [...big].length);
      assert.equal(rows[0].v, big);
      assert.equal(rows[0].r, "ab".repeat(1_000_000));
      const many = await exec(
        conn,
        "SELECT g, repeat('ü', g % 300) AS s FROM generate_series(1, 20000) g",
      );
      assert.equal(many.rows.length, 20000);
      for (const row of many.rows) assert.equal(row.s, "ü".repeat((row.g as number) % 300));
    },
  },

  {
    name: "cancel() in the same tick withdraws a statement queued behind a running one (57014)",
    async run(conn) {
      const slow = conn.query("SELECT 'slow' AS x FROM pg_sleep(0.3)", [], { prepare: false });
      const queued = conn.query("SELECT 'queued' AS x", [], { prepare: false });
      const after = conn.query("SELECT $1::text AS x", ["after"], { prepare: false });
      const outcomes = Promise.all([slow, queued, after].map((q) => outcome(q.result)));
      await queued.cancel();
      assert.deepEqual(await settlesWithin(outcomes, 10_000, "the statements"), [
        selected([{ x: "slow" }]),
        { sqlstate: "57014" },
        selected([{ x: "after" }]),
      ]);
      assert.deepEqual(
        (await settlesWithin(exec(conn, "SELECT 1 AS n"), 5000, "the next query")).rows,
        [
          { n: 1 },
        ],
      );
    },
  },

  {
    name: "cancel() of a statement sent behind a running one stops it or a later one, no other",
    async run(conn) {
      const slow = conn.query("SELECT 'slow' AS x FROM pg_sleep(0.4)", [], { prepare: false });
      const queued = conn.query("SELECT 'queued' AS x", [], { prepare: false });
      const after = conn.query("SELECT 'after' AS x FROM pg_sleep(0.3)", [], { prepare: false });
      const outcomes = Promise.all([slow, queued, after].map((q) => outcome(q.result)));
      // Every statement has left the client by now (pipelined); `slow` is running.
      await sleep(100);
      await queued.cancel();
      const [first, second, third] = await settlesWithin(outcomes, 10_000, "the statements");
      // The cancel request goes when the session reaches `queued`; the server may already
      // run `after` then (driver.ts: the pool runs such a statement again). `slow` and the
      // results themselves are never touched: every statement gets its own rows or 57014.
      assert.deepEqual(first, selected([{ x: "slow" }]));
      assert.ok(
        JSON.stringify(second) === JSON.stringify(selected([{ x: "queued" }])) ||
          JSON.stringify(second) === JSON.stringify({ sqlstate: "57014" }),
        JSON.stringify(second),
      );
      assert.ok(
        JSON.stringify(third) === JSON.stringify(selected([{ x: "after" }])) ||
          JSON.stringify(third) === JSON.stringify({ sqlstate: "57014" }),
        JSON.stringify(third),
      );
      assert.deepEqual(
        (await settlesWithin(exec(conn, "SELECT 1 AS n"), 5000, "the next query")).rows,
        [
          { n: 1 },
        ],
      );
    },
  },

  {
    name: "cancel() right after query() on an idle session leaves the session usable",
    async run(conn) {
      const first = conn.query("SELECT 'first' AS x", [], { prepare: false });
      const firstOutcome = outcome(first.result);
      await first.cancel();
      // Either it was withdrawn before it started or it ran: both are within the contract.
      const ended = await settlesWithin(firstOutcome, 5000, "the cancelled statement");
      assert.ok(
        JSON.stringify(ended) === JSON.stringify({ sqlstate: "57014" }) ||
          JSON.stringify(ended) === JSON.stringify(selected([{ x: "first" }])),
        `unexpected outcome ${JSON.stringify(ended)}`,
      );
      const next = conn.query("SELECT 'next' AS x", [], { prepare: false });
      const nextOutcome = outcome(next.result);
      try {
        assert.deepEqual(
          await settlesWithin(nextOutcome, 5000, "the next statement on the session"),
          selected([{ x: "next" }]),
        );
      } finally {
        // A wedged session must not hold the step up: end it, which settles `next`.
        await conn.terminate();
        await nextOutcome;
      }
    },
  },

  {
    name: "cancel() of a finished statement is a no-op and reaches no later statement",
    async run(conn) {
      const done = conn.query("SELECT 'done' AS x", [], { prepare: false });
      assert.deepEqual((await done.result).rows, [{ x: "done" }]);
      const later = conn.query("SELECT 'later' AS x FROM pg_sleep(0.3)", [], { prepare: false });
      const laterOutcome = outcome(later.result);
      await done.cancel();
      await done.cancel();
      assert.deepEqual((await done.result).rows, [{ x: "done" }]);
      assert.deepEqual(
        await settlesWithin(laterOutcome, 5000, "the later statement"),
        selected([{
          x: "later",
        }]),
      );
      await later.cancel();
      assert.deepEqual((await exec(conn, "SELECT 1 AS n")).rows, [{ n: 1 }]);
    },
  },

  {
    name: "cancel() of a running statement: stopped on the network, run to its end on PGlite",
    async run(conn, target) {
      if (target.kind === "network") {
        const running = conn.query("SELECT pg_sleep(10) AS x", [], { prepare: false });
        const ended = outcome(running.result);
        await sleep(200);
        const started = performance.now();
        await running.cancel();
        assert.deepEqual(await settlesWithin(ended, 3000, "the cancelled pg_sleep(10)"), {
          sqlstate: "57014",
        });
        assert.ok(performance.now() - started < 3000);
        const error = await rejection(running.result);
        assert.equal(error.message, "canceling statement due to user request");
      } else {
        // PGlite cannot interrupt a running statement (documented): it runs to its end.
        const started = performance.now();
        const running = conn.query("SELECT 'slept' AS x FROM pg_sleep(0.3)", [], {
          prepare: false,
        });
        const ended = outcome(running.result);
        await sleep(0);
        await running.cancel();
        assert.deepEqual(await ended, selected([{ x: "slept" }]));
        assert.ok(performance.now() - started >= 290);
      }
      assert.deepEqual((await exec(conn, "SELECT 'usable' AS x")).rows, [{ x: "usable" }]);
      assert.equal(conn.closed, false);
    },
  },

  {
    name: "copyIn() streams COPY text rows (tabs, backslashes, \\N) and returns the row count",
    async run(conn, target) {
      const t = target.table("copied");
      await exec(conn, `CREATE TABLE ${t} (id int, v text, note text)`);
      const values: Array<string | null> = [
        "plain",
        "tab\there",
        "new\nline",
        "back\\slash \\N not null",
        null,
        "\\N",
        "",
        "unicode é 😀",
      ];
      const text = values.map((v, i) => `${i}\t${copyValue(v)}\t${copyValue(`n${i}`)}\n`).join("");
      // Chunks that cut rows, an escape and a surrogate pair's neighbourhood apart.
      const cuts = [3, text.indexOf("\\\\") + 1, text.indexOf("😀"), text.length];
      const chunks = cuts.map((cut, i) => text.slice(i === 0 ? 0 : cuts[i - 1], cut));
      assert.equal(chunks.join(""), text);
      const copied = await conn.copyIn(`COPY ${t} (id, v, note) FROM STDIN`, fromChunks(chunks));
      const { rows } = await exec(conn, `SELECT id, v, note FROM ${t} ORDER BY id`);
      assert.deepEqual(rows, values.map((v, id) => ({ id, v, note: `n${id}` })));

      const bad = await rejection(
        conn.copyIn(`COPY ${t} (id) FROM STDIN`, fromChunks(["not a number\n"])),
      );
      assert.equal(bad.sqlstate, "22P02");
      assert.deepEqual((await exec(conn, `SELECT count(*)::int AS n FROM ${t}`)).rows, [{
        n: values.length,
      }]);
      // Checked last, so a wrong count does not hide the checks above.
      assert.equal(copied, values.length, "copyIn() resolves with the number of rows copied");
    },
  },

  {
    name: "copyIn() hands the copy source's own error to the caller and copies nothing",
    async run(conn, target) {
      const t = target.table("copy_failed");
      await exec(conn, `CREATE TABLE ${t} (id int, v text)`);
      const failing = new Error("the copy source failed");
      let thrown: unknown;
      try {
        await conn.copyIn(
          `COPY ${t} (id, v) FROM STDIN`,
          (async function* () {
            yield "1\tone\n";
            yield "2\ttwo\n";
            throw failing;
          })(),
        );
      } catch (error) {
        thrown = error;
      }
      assert.equal(thrown, failing, `expected the source's own error, got ${thrown}`);
      assert.deepEqual((await exec(conn, `SELECT count(*)::int AS n FROM ${t}`)).rows, [{ n: 0 }]);
      assert.equal(conn.closed, false);
    },
  },

  {
    name:
      "copyIn() stopped by its source or its signal while the server is busy on a row ends at once",
    skip: (target) =>
      target.kind === "embedded"
        ? "PGlite cannot interrupt a running statement (documented)"
        : undefined,
    async run(conn, target) {
      const t = target.table("copy_busy");
      await exec(conn, `CREATE TABLE ${t} (id int, v text)`);
      // Row 2 keeps the server busy for 60 s: only a cancel request gets the COPY out sooner,
      // since the server reads the COPY's end (CopyFail) only after the row.
      await exec(
        conn,
        `CREATE FUNCTION ${t}_slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.id = 2 THEN PERFORM pg_sleep(60); END IF; RETURN NEW; END $$`,
      );
      await exec(
        conn,
        `CREATE TRIGGER slow BEFORE INSERT ON ${t} FOR EACH ROW EXECUTE FUNCTION ${t}_slow()`,
      );
      const watcher = await target.driver.connect();
      const serverSleeps = async () => {
        while (true) {
          const { rows } = await exec(
            watcher,
            "SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'PgSleep'",
            [conn.pid],
          );
          if (rows[0].n === 1) return;
          await sleep(20);
        }
      };
      try {
        for (const stop of ["source", "signal"] as const) {
          const failing = new Error(`the COPY was stopped by its ${stop}`);
          const controller = new AbortController();
          const copied = conn.copyIn(
            `COPY ${t} (id, v) FROM STDIN`,
            (async function* () {
              yield "1\tone\n2\ttwo\n";
              await serverSleeps();
              if (stop === "source") throw failing;
              controller.abort(failing);
              // A source that would go on forever: the abort must not wait for it.
              await new Promise(() => {});
            })(),
            controller.signal,
          );
          const thrown = await settlesWithin(
            copied.then(() => undefined, (error: unknown) => error),
            20_000,
            `the COPY stopped by its ${stop} while row 2 slept 60 s`,
          );
          assert.equal(thrown, failing, `expected the ${stop}'s error, got ${thrown}`);
          const { rows } = await settlesWithin(
            exec(conn, `SELECT count(*)::int AS n FROM ${t}`),
            20_000,
            `the statement after the COPY stopped by its ${stop}`,
          );
          assert.deepEqual(rows, [{ n: 0 }]);
        }
      } finally {
        await watcher.close();
      }
      assert.equal(conn.closed, false);
    },
  },

  {
    name: "copyOut() yields COPY text of the rows and returns the row count",
    async run(conn, target) {
      const t = target.table("copied_out");
      await exec(conn, `CREATE TABLE ${t} (id int, v text)`);
      await exec(conn, `INSERT INTO ${t} VALUES (1, E'tab\\there'), (2, NULL), (3, 'é 😀')`);
      const out = conn.copyOut(`COPY ${t} (id, v) TO STDOUT`);
      const bytes: Uint8Array[] = [];
      let next = await out.next();
      for (; !next.done; next = await out.next()) bytes.push(next.value);
      const text = new TextDecoder().decode(concat(bytes));
      assert.equal(text, "1\ttab\\there\n2\t\\N\n3\té 😀\n");
      assert.equal(next.value, 3, "the generator returns the number of rows copied");
      const csv = await collect(conn.copyOut(`COPY (SELECT 'a,b' AS x) TO STDOUT (FORMAT csv)`));
      assert.equal(csv, '"a,b"\n');
      // Read to its end, a COPY larger than the client's buffers leaves the session ready
      // for its next statement.
      let size = 0;
      for await (
        const chunk of conn.copyOut(
          "COPY (SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g) TO STDOUT",
        )
      ) size += chunk.length;
      assert.ok(size > 10_000_000, `${size} bytes`);
      const after = await settlesWithin(
        exec(conn, "SELECT 'next' AS x"),
        5000,
        "the next statement",
      );
      assert.deepEqual(after.rows, [{ x: "next" }]);
    },
  },

  {
    name: "copyOut() left early stops the COPY; the session runs its next statement",
    async run(conn, target) {
      // PGlite makes the whole output first (and slowly): fewer rows there.
      const rows = target.kind === "network" ? 200_000 : 20_000;
      for await (
        const _ of conn.copyOut(
          `COPY (SELECT g, repeat('x', 100) FROM generate_series(1, ${rows}) a(g)) TO STDOUT`,
        )
      ) break;
      assert.equal(conn.closed, false);
      assert.deepEqual((await exec(conn, "SELECT 'next' AS x")).rows, [{ x: "next" }]);
      assert.equal(await collect(conn.copyOut("COPY (SELECT 1) TO STDOUT")), "1\n");
      const controller = new AbortController();
      const reason = new Error("stop");
      await assert.rejects(async () => {
        for await (
          const _ of conn.copyOut(
            `COPY (SELECT g FROM generate_series(1, ${rows}) a(g)) TO STDOUT`,
            controller.signal,
          )
        ) controller.abort(reason);
      }, (error) => error === reason);
      assert.deepEqual((await exec(conn, "SELECT 'after abort' AS x")).rows, [{
        x: "after abort",
      }]);
    },
  },

  {
    name: "copyOut() throws a server error from the iterator; the session goes on",
    async run(conn) {
      const error = await rejection(
        collect(conn.copyOut("COPY (SELECT 1 / (g - 3) FROM generate_series(1, 5) g) TO STDOUT")),
      );
      assert.equal(error.sqlstate, "22012");
      const missing = await rejection(collect(conn.copyOut("COPY no_such_table TO STDOUT")));
      assert.equal(missing.sqlstate, "42P01");
      assert.equal(conn.closed, false);
      assert.deepEqual((await exec(conn, "SELECT 1 AS x")).rows, [{ x: 1 }]);
    },
  },

  {
    name: "close() finishes what was sent, fires onClose once, then refuses with 08003",
    async run(conn) {
      let calls = 0;
      conn.onClose(() => calls++);
      const pending = conn.query("SELECT 'sent' AS x", [], { prepare: false });
      const pendingOutcome = outcome(pending.result);
      await conn.close();
      assert.deepEqual(await pendingOutcome, selected([{ x: "sent" }]));
      assert.equal(conn.closed, true);
      assert.equal(calls, 1);
      await conn.close();
      assert.equal(calls, 1);

      const error = await rejection(conn.query("SELECT 1", [], { prepare: false }).result);
      assert.equal(error.sqlstate, "08003");
      const bound = await rejection(conn.query("SELECT $1::int", [1], { prepare: true }).result);
      assert.equal(bound.sqlstate, "08003");
      const copy = await rejection(conn.copyIn("COPY x FROM STDIN", fromChunks([])));
      assert.equal(copy.sqlstate, "08003");
      // A listener added after the end is called at once (the session did end).
      let late = 0;
      conn.onClose(() => late++);
      assert.equal(late, 1);
      assert.equal(calls, 1);
    },
  },

  {
    name: "terminate() rejects statements in flight (PGlite: ends the session as close() does)",
    async run(conn, target) {
      let calls = 0;
      conn.onClose(() => calls++);
      if (target.kind === "network") {
        const running = conn.query("SELECT pg_sleep(5) AS x", [], { prepare: false });
        const queued = conn.query("SELECT 'queued' AS x", [], { prepare: false });
        const ended = Promise.all([outcome(running.result), outcome(queued.result)]);
        await sleep(100);
        await conn.terminate();
        const [a, b] = await settlesWithin(ended, 3000, "the statements in flight");
        for (const end of [a, b]) {
          assert.ok("sqlstate" in end, `expected a QueryError, got ${JSON.stringify(end)}`);
          assert.match(String(end.sqlstate), /^08/);
        }
      } else {
        const running = conn.query("SELECT 'ran' AS x FROM pg_sleep(0.2)", [], { prepare: false });
        const ended = outcome(running.result);
        await conn.terminate();
        assert.deepEqual(await ended, selected([{ x: "ran" }]));
      }
      assert.equal(conn.closed, true);
      assert.equal(calls, 1);
      await conn.terminate();
      await conn.close();
      assert.equal(calls, 1);
      const error = await rejection(conn.query("SELECT 1", [], { prepare: false }).result);
      assert.equal(error.sqlstate, "08003");
    },
  },

  {
    name: "a session the server terminates rejects its statement (08/57P01) and reports closed",
    skip: (target) =>
      target.driver.maxSessions < 2 ? "needs a second session to terminate the first" : undefined,
    async run(conn, target) {
      let calls = 0;
      conn.onClose(() => calls++);
      const running = conn.query("SELECT pg_sleep(5) AS x", [], { prepare: false });
      const ended = outcome(running.result);
      const killer = await target.driver.connect();
      try {
        await sleep(100);
        assert.deepEqual(
          (await exec(killer, "SELECT pg_terminate_backend($1) AS ok", [conn.pid])).rows,
          [{ ok: true }],
        );
      } finally {
        await killer.close();
      }
      // driver.ts: a lost connection has class 08, "or 57P01 when the server's message
      // arrived before the session ended", as the network driver's does.
      const end = await settlesWithin(ended, 3000, "the terminated statement");
      assert.deepEqual(end, { sqlstate: "57P01" });
      assert.equal(conn.closed, true);
      assert.equal(calls, 1);
      const error = await rejection(conn.query("SELECT 1", [], { prepare: false }).result);
      assert.equal(error.sqlstate, "08003");
    },
  },

  {
    name: "onNotification() receives the session's notifications after LISTEN, none after UNLISTEN",
    async run(conn, target) {
      const channel = uniqueName("contract_chan");
      const received: Array<[string, string]> = [];
      conn.onNotification((name, payload) => received.push([name, payload]));
      await exec(conn, `LISTEN "${channel}"`);
      await exec(conn, "SELECT pg_notify($1, $2)", [channel, 'it\'s "here" ✓']);
      await exec(conn, `NOTIFY "${channel}"`);
      // Delivered at the latest with the answer of a later statement on the session.
      await exec(conn, "SELECT 1");
      await settlesWithin(
        (async () => {
          while (received.length < 2) await sleep(5);
        })(),
        3000,
        "the notifications",
      );
      assert.deepEqual(received, [[channel, 'it\'s "here" ✓'], [channel, ""]]);
      await exec(conn, `UNLISTEN "${channel}"`);
      await exec(conn, "SELECT pg_notify($1, 'unheard')", [channel]);
      await exec(conn, "SELECT 1");
      await sleep(20);
      assert.equal(received.length, 2, "no notification after UNLISTEN");
      if (target.kind === "network") {
        // Another session's notification reaches this one.
        const other = await target.driver.connect();
        try {
          await exec(conn, `LISTEN "${channel}"`);
          await exec(other, "SELECT pg_notify($1, 'from another session')", [channel]);
          await settlesWithin(
            (async () => {
              while (received.length < 3) await sleep(5);
            })(),
            3000,
            "the other session's notification",
          );
          assert.deepEqual(received[2], [channel, "from another session"]);
        } finally {
          await other.close();
        }
      }
    },
  },
];

// ---------------------------------------------------------------------------------------
// The runs
// ---------------------------------------------------------------------------------------

async function withSession(
  driver: Driver,
  fn: (conn: DriverConnection) => Promise<void>,
): Promise<void> {
  const conn = await driver.connect();
  try {
    await fn(conn);
  } finally {
    await conn.close();
  }
}

async function runContract(t: Deno.TestContext, kind: Kind, driver: Driver): Promise<void> {
  const schema = uniqueName("contract");
  const target: Target = { kind, driver, schema, table: (name) => `"${schema}".${name}` };
  try {
    await withSession(driver, async (conn) => {
      await exec(conn, `CREATE SCHEMA "${schema}"`);
    });
    try {
      for (const contractCase of CASES) {
        const reason = contractCase.skip?.(target);
        await t.step({
          name: reason === undefined ? contractCase.name : `${contractCase.name} (${reason})`,
          ignore: reason !== undefined,
          fn: () => withSession(driver, (conn) => contractCase.run(conn, target)),
        });
      }
    } finally {
      await withSession(driver, async (conn) => {
        await exec(conn, `DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      });
    }
  } finally {
    await driver.close();
  }
}

serverTest("driver contract: the network driver", async (t) => {
  const config = resolveConfig({ connectionString: TEST_URL, serverSettings: SERVER_SETTINGS });
  await runContract(t, "network", createWireDriver(config));
});

Deno.test("driver contract: the embedded driver (PGlite)", async (t) => {
  await runContract(t, "embedded", createPgliteDriver({ serverSettings: SERVER_SETTINGS }));
});
