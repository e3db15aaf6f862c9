/**
 * `executeMany` of a plain INSERT as multi-row statements (src/_batch_values.ts): which
 * statements qualify, and, against the server, that the outcome is the one of a statement per
 * row: every value in its place across statement boundaries, all or nothing, and the
 * per-row path kept where a multi-row statement would act differently (statement triggers,
 * foreign keys checked at the end of a statement).
 */
import assert from "node:assert/strict";
import { QueryError } from "../mod.ts";
import { chunkSizes, MIN_BATCH_ROWS, plainInsert } from "../src/_batch_values.ts";
import { serverTest, withManager } from "./_support/server.ts";

const rows = (n: number, width = 2) =>
  Array.from({ length: n }, (_, i) => Array.from({ length: width }, (_, j) => i * 10 + j));

Deno.test("plainInsert() takes an INSERT whose values are parameters, casts, DEFAULT or NULL", () => {
  for (
    const sql of [
      "INSERT INTO t VALUES ($1, $2)",
      'insert into "s"."t" (a, "B") values ($2::int, $1)',
      "INSERT INTO s.t (a, b, c) VALUES ($1, DEFAULT, $2::timestamp with time zone);",
      "INSERT INTO t (a, b, c) VALUES ($1::numeric(10, 2), NULL, $2::text[])",
    ]
  ) {
    assert.ok(plainInsert(sql, rows(MIN_BATCH_ROWS)), sql);
  }
});

Deno.test("plainInsert() refuses statements whose multi-row form could act differently", () => {
  for (
    const sql of [
      "INSERT INTO t VALUES ($1, now())",
      "INSERT INTO t VALUES ($1, $2 + 1)",
      "INSERT INTO t VALUES ($1, (SELECT max(b) FROM t))",
      "INSERT INTO t VALUES ($1, $2) ON CONFLICT DO NOTHING",
      "INSERT INTO t VALUES ($1, $2) RETURNING a",
      "INSERT INTO t SELECT $1, $2",
      "INSERT INTO t VALUES ($1, $2), ($3, $4)",
      "INSERT INTO t VALUES ($1, $2) -- note",
      "UPDATE t SET a = $1 WHERE b = $2",
      "WITH x AS (SELECT 1) INSERT INTO t VALUES ($1, $2)",
    ]
  ) {
    assert.equal(plainInsert(sql, rows(MIN_BATCH_ROWS)), undefined, sql);
  }
  // Parameter lists that do not match the statement run row by row (and fail as they would).
  assert.equal(plainInsert("INSERT INTO t VALUES ($1)", rows(MIN_BATCH_ROWS)), undefined);
  assert.equal(plainInsert("INSERT INTO t VALUES ($1, $2)", [...rows(20), [1]]), undefined);
  assert.equal(plainInsert("INSERT INTO t VALUES ($1, $2)", rows(MIN_BATCH_ROWS - 1)), undefined);
});

Deno.test("plainInsert() numbers each row's parameters after the previous row's", () => {
  const insert = plainInsert("INSERT INTO t (a, b) VALUES ($2, $1::int)", rows(20))!;
  const { sql, params } = insert.statement([[1, 2], [3, 4], [5, 6]]);
  assert.equal(sql, "INSERT INTO t (a, b) VALUES ($2, $1::int), ($4, $3::int), ($6, $5::int)");
  assert.deepEqual(params, [1, 2, 3, 4, 5, 6]);
});

Deno.test("chunkSizes() covers every row with full statements, then powers of two", () => {
  assert.deepEqual(chunkSizes(300, 128), [128, 128, 32, 8, 4]);
  assert.deepEqual(chunkSizes(5, 128), [4, 1]);
  assert.deepEqual(chunkSizes(256, 128), [128, 128]);
  for (const n of [1, 17, 129, 1000, 10_001]) {
    assert.equal(chunkSizes(n, 128).reduce((a, b) => a + b, 0), n);
  }
});

serverTest("executeMany() of a plain INSERT puts every value in its row", async () => {
  await withManager(async (db) => {
    await db.execute(
      "CREATE TABLE {{tables.items}} (id int PRIMARY KEY, name text, made date DEFAULT '2020-01-02')",
    );
    const batch = Array.from({ length: 301 }, (_, i) => [`name ${i}`, i]);
    const total = await db.executeMany(
      "INSERT INTO {{tables.items}} (name, id, made) VALUES ($1, $2::int, DEFAULT)",
      batch,
    );
    assert.equal(total, 301);
    const wrong = await db.fetchValue(
      "SELECT count(*)::int FROM {{tables.items}} " +
        "WHERE name <> 'name ' || id OR made <> '2020-01-02' OR id NOT BETWEEN 0 AND 300",
    );
    assert.equal(wrong, 0);
    assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 301);
  });
});

serverTest(
  "executeMany() of a plain INSERT is all or nothing, in and out of a transaction",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY, name text NOT NULL)");
      const batch = Array.from({ length: 200 }, (_, i) => [i, i === 190 ? null : "x"]);
      const sql = "INSERT INTO {{tables.items}} (id, name) VALUES ($1, $2)";
      const error = await db.executeMany(sql, batch).then(() => undefined, (e: unknown) => e);
      assert.ok(error instanceof QueryError, `expected QueryError, got ${error}`);
      assert.equal(error.sqlstate, "23502");
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 0);

      await db.transaction(async (tx) => {
        await tx.execute(sql, [1000, "kept"]);
        await assert.rejects(tx.executeMany(sql, batch), QueryError);
        assert.equal(await tx.executeMany(sql, batch.slice(0, 100)), 100);
      });
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 101);
    });
  },
);

serverTest(
  "executeMany() fires a statement trigger once per row, as one statement per row does",
  async () => {
    await withManager(async (db) => {
      await db.execute(`
      CREATE TABLE {{tables.items}} (id int);
      CREATE TABLE {{tables.fired}} (n int);
      CREATE FUNCTION {{schema}}.count_insert() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN INSERT INTO {{tables.fired}} VALUES (1); RETURN NULL; END $$;
      CREATE TRIGGER counted AFTER INSERT ON {{tables.items}}
        FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.count_insert();
    `);
      const total = await db.executeMany("INSERT INTO {{tables.items}} VALUES ($1)", rows(50, 1));
      assert.equal(total, 50);
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.fired}}"), 50);
    });
  },
);

serverTest(
  "executeMany() checks a foreign key after each row, as one statement per row does",
  async () => {
    await withManager(async (db) => {
      await db.execute(
        "CREATE TABLE {{tables.nodes}} (id int PRIMARY KEY, parent int REFERENCES {{tables.nodes}})",
      );
      // Row 0 names a parent that only a later row inserts: per row, that fails at once.
      const batch = Array.from({ length: 40 }, (_, i) => [i, i === 0 ? 5 : null]);
      await assert.rejects(
        db.executeMany("INSERT INTO {{tables.nodes}} VALUES ($1, $2)", batch),
        (error: unknown) => error instanceof QueryError && error.sqlstate === "23503",
      );
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.nodes}}"), 0);
    });
  },
);
