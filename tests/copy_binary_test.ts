/**
 * `copyRecordsToTable()` in binary (arrays of 10,000 rows or more whose values fit their
 * columns' types): the rows must read back exactly as the text COPY's do, and the COPY must
 * not run into a table whose columns changed after they were looked up.
 */
import assert from "node:assert/strict";
import {
  BINARY_COPY_MIN_ROWS,
  type CopyTarget,
  describeCopySql,
  encodeBinaryCopy,
  fieldKinds,
  guardedCopySql,
  signatureTypes,
  TABLE_CHANGED_SQLSTATE,
} from "../src/_copy_binary.ts";
import { resolveConfig } from "../src/config.ts";
import { createWireDriver } from "../src/drivers/wire.ts";
import { QueryError } from "../src/errors.ts";
import { serverTest, TEST_URL, withManager } from "./_support/server.ts";
import { rejection } from "./_support/settle.ts";

const COLUMNS = "i2 int2, i4 int4, i8 int8, f8 float8, b bool, t text, v varchar(20), " +
  "by bytea, ts timestamptz";

/** Rows of every kind sent in binary, awkward values first, then plain ones up to `count`. */
function awkwardRows(count: number): unknown[][] {
  const awkward: unknown[][] = [
    [-32768, -2147483648, 9007199254740991, -0, true, "", "x", new Uint8Array(), new Date(0)],
    [32767, 2147483647, -9007199254740991, NaN, false, "\\N", "é", new Uint8Array([0, 255])],
    [0, 0, 9223372036854775807n, Infinity, null, "tab\tnew\nline\\slash", null, null, null],
    [null, null, -9223372036854775808n, -Infinity, true, "☃ 日本語 🎉 e\u0301", "", null],
    [1, -1, -4294967296, 5e-324, false, "\ud800 lone", 'a"q', new Uint8Array([92, 48])],
    [2, 2, 4294967295, 1.7976931348623157e308, null, "x".repeat(100_000), "y", null],
    [3, 3, 0, 0.1, true, "NULL", "z", null, new Date(Date.UTC(1, 0, 1, 0, 0, 0, 1))],
    [4, 4, 1n, -2.5e-7, true, "  ", " ", null, new Date(Date.UTC(9999, 11, 31, 23, 59, 59, 999))],
  ].map((row) => [...row, ...new Array(9 - row.length).fill(undefined)]);
  const rows = [...awkward];
  for (let i = rows.length; i < count; i++) {
    rows.push([
      i % 30000,
      i,
      i * 1000,
      i / 7,
      i % 2 === 0,
      `user${i}@example.com`,
      `n${i}`,
      new Uint8Array([i & 0xff]),
      new Date(1_700_000_000_000 + i),
    ]);
  }
  return rows;
}

type Db = Parameters<Parameters<typeof withManager>[0]>[0];

/**
 * The rows of `a` that `b` lacks and of `b` that `a` lacks, counted by the server (a diff of
 * 10,000 rows in JavaScript would take minutes to print when they differ), and a few rows
 * of `a` for a message.
 */
async function difference(db: Db, a: string, b: string, columns: string) {
  const select = (table: string) => `SELECT ${columns} FROM {{tables.${table}}}`;
  return await db.fetchOne(
    `SELECT (SELECT count(*)::int FROM (${select(a)} EXCEPT ALL ${select(b)}) x) AS missing, ` +
      `(SELECT count(*)::int FROM (${select(b)} EXCEPT ALL ${select(a)}) x) AS extra`,
  );
}

serverTest("copyRecordsToTable() copies 10,000+ rows of every kind as text would", async () => {
  await withManager(async (db) => {
    await db.execute(
      `CREATE TABLE {{tables.bin}} (${COLUMNS}); CREATE TABLE {{tables.txt}} (${COLUMNS})`,
    );
    const rows = awkwardRows(BINARY_COPY_MIN_ROWS + 5);
    assert.equal(await db.copyRecordsToTable("bin", rows), rows.length);
    // A generator always goes as text.
    assert.equal(await db.copyRecordsToTable("txt", rows.values()), rows.length);
    const all = "i2, i4, i8, f8, b, t, v, by, ts";
    assert.deepEqual(await difference(db, "bin", "txt", all), { missing: 0, extra: 0 });
    assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.bin}}"), rows.length);
    assert.deepEqual(
      await db.fetchOne(
        "SELECT i2, i4, i8, f8::text AS f8, b, t, encode(by, 'hex') AS by, ts " +
          "FROM {{tables.bin}} WHERE i2 = -32768",
      ),
      {
        i2: -32768,
        i4: -2147483648,
        i8: "9007199254740991",
        f8: "0",
        b: true,
        t: "",
        by: "",
        ts: new Date(0),
      },
    );
    // In a transaction, and with a column list in another order.
    await db.execute("TRUNCATE {{tables.bin}}");
    const pairs = rows.map((row) => [row[5], row[2]]);
    await db.transaction(async (tx) => {
      assert.equal(
        await tx.copyRecordsToTable("bin", pairs, { columns: ["t", "i8"] }),
        rows.length,
      );
    });
    assert.deepEqual(await difference(db, "bin", "txt", "t, i8"), { missing: 0, extra: 0 });
  });
});

serverTest(
  "copyRecordsToTable() sends rows as text where a value or column does not fit binary",
  async () => {
    await withManager(async (db) => {
      await db.execute(
        "CREATE DOMAIN {{schema}}.positive AS int CHECK (VALUE > 0); " +
          "CREATE TABLE {{tables.mixed}} (id int, note text, g int GENERATED ALWAYS AS (id * 2) STORED); " +
          "CREATE TABLE {{tables.domained}} (id {{schema}}.positive, note text)",
      );
      const rows = Array.from({ length: BINARY_COPY_MIN_ROWS }, (_, i) => [i + 1, `n${i}`]);
      // A string for an int column: the server reads its text, as it always did.
      const mixed = rows.map((row, i) => i === 500 ? [String(row[0]), row[1]] : row);
      assert.equal(await db.copyRecordsToTable("mixed", mixed), rows.length);
      assert.equal(await db.copyRecordsToTable("domained", rows), rows.length);
      assert.deepEqual(
        await db.fetchOne(
          "SELECT sum(id)::text AS ids, sum(g)::text AS gs, count(DISTINCT note)::int AS notes " +
            "FROM {{tables.mixed}}",
        ),
        { ids: "50005000", gs: "100010000", notes: rows.length },
      );
      assert.equal(
        await db.fetchValue("SELECT sum(id)::text FROM {{tables.domained}}"),
        "50005000",
      );
      // A NUL is refused before anything is copied, naming its row and column as the text
      // path does.
      await db.execute("CREATE TABLE {{tables.plain}} (id int, note text)");
      const nul = rows.map((row, i) => i === 9000 ? [row[0], "a\u0000b"] : row);
      await assert.rejects(
        db.copyRecordsToTable("plain", nul),
        (error) =>
          error instanceof RangeError &&
          /^Cannot copy row 9001, column 2: .*NUL character/.test(error.message),
      );
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.plain}}"), 0);
    });
  },
);

serverTest(
  "a binary COPY into a table whose columns changed fails before any row, and the session goes on",
  async () => {
    const driver = createWireDriver(resolveConfig({ connectionString: TEST_URL }));
    const conn = await driver.connect();
    const table = `copy_guard_${crypto.randomUUID().slice(0, 8)}`;
    const run = async (sql: string) => (await conn.query(sql, [], {}).result).rows;
    try {
      await run(`CREATE TABLE ${table} (id int, note text)`);
      const [found] = await run(describeCopySql([]).replace("$1", `'${table}'`));
      const target = found as unknown as CopyTarget;
      assert.equal(target.signature, "id:23,note:25");
      const rows = [[1, "a"], [2, null]];
      const kinds = fieldKinds(rows, signatureTypes(target.signature))!;
      assert.equal(
        await conn.copyIn(guardedCopySql(target, []), encodeBinaryCopy(rows, kinds, { rows: 0 })),
        2,
      );
      // Another session changes a column's type after the look-up: int4 data read as float4
      // would be wrong numbers, so the guard fails the statement instead.
      await run(`ALTER TABLE ${table} ALTER COLUMN id TYPE float4`);
      const error = await rejection(
        conn.copyIn(guardedCopySql(target, []), encodeBinaryCopy(rows, kinds, { rows: 0 })),
      );
      assert.ok(error instanceof QueryError);
      assert.equal(error.sqlstate, TABLE_CHANGED_SQLSTATE);
      // Dropped and made again under the same name: another table, refused as well.
      await run(`DROP TABLE ${table}; CREATE TABLE ${table} (id int, note text)`);
      const again = await rejection(
        conn.copyIn(guardedCopySql(target, []), encodeBinaryCopy(rows, kinds, { rows: 0 })),
      );
      assert.equal((again as QueryError).sqlstate, TABLE_CHANGED_SQLSTATE);
      assert.deepEqual(await run(`SELECT count(*)::int AS n FROM ${table}`), [{ n: 0 }]);
    } finally {
      await run(`DROP TABLE IF EXISTS ${table}`).catch(() => {});
      await conn.terminate();
      await driver.close();
    }
  },
);
