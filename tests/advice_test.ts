/**
 * Errors that say what to do, on the server and on the embedded engine (one PGlite instance
 * for the file): a parameter count that does not match the SQL, an `undefined` parameter, a
 * misspelt `{{…}}` placeholder, `executeAndReturnId()` on a table without `id`, a lock
 * wait cut by `lockTimeoutMs`, and `sslmode=require` against a server without TLS.
 */
import assert from "node:assert/strict";
import {
  ConnectionError,
  createSharedPool,
  DatabaseManager,
  expandTemplate,
  QueryError,
  type QueryEvent,
  SchemaError,
} from "../mod.ts";
import { maskParams } from "../src/errors.ts";
import { parameterCount } from "../src/_sql.ts";
import { serverTest, TEST_URL, withManager } from "./_support/server.ts";

/** Awaits `promise` and returns what it rejected with; fails when it resolved. */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("expected the call to reject");
}

/** Awaits `promise` and returns its error, checking its class. */
async function failure<E extends Error>(
  promise: Promise<unknown>,
  type: abstract new (...args: never[]) => E,
): Promise<E> {
  const error = await rejection(promise);
  assert.ok(error instanceof type, `expected a ${type.name}, got ${Deno.inspect(error)}`);
  return error;
}

/** The steps that run the same on both engines, over a fresh schema of `db`. */
async function steps(t: Deno.TestContext, db: DatabaseManager, events: QueryEvent[]) {
  await db.execute("CREATE TABLE {{tables.keyed}} (k text PRIMARY KEY, v int)");

  await t.step("too many parameters: the SQL's count and the number given", async () => {
    const error = await failure(db.fetchValue("SELECT $1::int", [1, 2]), QueryError);
    assert.match(error.message, /the SQL uses 1 parameter \(\$1\) but 2 values were given/);
    assert.ok(error.sqlstate !== undefined);
    const none = await failure(db.execute("SELECT 1 AS one", [7]), QueryError);
    assert.match(none.message, /the SQL uses no parameters but 1 value was given/);
  });

  await t.step(
    "too few parameters: the same, and $n in strings and comments do not count",
    async () => {
      const error = await failure(
        db.fetchValue("SELECT $1::int + $2::int -- and $3\n, '$4' AS s", [1]),
        QueryError,
      );
      assert.match(error.message, /the SQL uses 2 parameters \(\$1 to \$2\) but 1 value was given/);
      const missing = await failure(db.fetchValue("SELECT $1::int"), QueryError);
      assert.match(missing.message, /the SQL uses 1 parameter \(\$1\) but 0 values were given/);
    },
  );

  await t.step(
    "an undefined parameter is refused, naming its $n, before anything is sent",
    async () => {
      events.length = 0;
      const error = await failure(
        db.fetchValue("SELECT $1::int, $2::text", [1, undefined]),
        TypeError,
      );
      assert.match(error.message, /parameter \$2 is undefined; pass null for SQL NULL/);
      const tagged = await failure(db.execute`SELECT ${undefined}::text`, TypeError);
      assert.match(tagged.message, /parameter \$1 is undefined/);
      const many = await failure(
        db.executeMany("INSERT INTO {{tables.keyed}} (k, v) VALUES ($1, $2)", [["a", 1], [
          "b",
          undefined,
        ]]),
        TypeError,
      );
      assert.match(many.message, /parameter \$2 is undefined/);
      assert.equal(events.length, 0);
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.keyed}}"), 0);
      assert.deepEqual(maskParams([undefined, null]), ["undefined", "null"]);
    },
  );

  await t.step(
    "a misspelt placeholder is refused before sending, with the right spelling",
    async () => {
      events.length = 0;
      const error = await failure(db.fetchAll("SELECT * FROM {{table.keyed}}"), SchemaError);
      assert.match(
        error.message,
        /"\{\{table\.keyed\}\}": it is not a placeholder; did you mean \{\{tables\.keyed\}\}\?/,
      );
      const schema = await failure(db.execute("CREATE TABLE {{shcema}}.x (id int)"), SchemaError);
      assert.match(schema.message, /did you mean \{\{schema\}\}\?/);
      assert.equal(events.length, 0);
      // Inside strings, quoted identifiers, dollar quotes and comments, {{…}} is text.
      const text = await db.fetchValue<string>(
        `SELECT '{{table.x}}' || $q${"$"}{{y}}$q${"$"} AS "{{z}}" -- {{w}}\n/* {{v}} */`,
      );
      assert.equal(text, "{{table.x}}{{y}}");
    },
  );

  await t.step(
    "executeAndReturnId() on a table without id says it appended RETURNING id",
    async () => {
      const error = await failure(
        db.executeAndReturnId("INSERT INTO {{tables.keyed}} (k, v) VALUES ($1, $2)", ["a", 1]),
        QueryError,
      );
      assert.equal(error.sqlstate, "42703");
      assert.match(error.message, /appended RETURNING id/);
      assert.match(error.message, /your own RETURNING clause/);
      // The advice holds: its own RETURNING works.
      const key = await db.executeAndReturnId(
        "INSERT INTO {{tables.keyed}} (k, v) VALUES ($1, $2) RETURNING k",
        ["a", 1],
      );
      assert.equal(key, "a");
    },
  );
}

Deno.test("parameterCount() counts $n in code only", () => {
  assert.equal(parameterCount("SELECT $1, $2"), 2);
  assert.equal(
    parameterCount("SELECT $3 $$ $9 $$, $t$ $8 $t$, \"$7\", E'\\' $6', a$5 /* $4 */"),
    3,
  );
  assert.equal(parameterCount("SELECT 1"), 0);
});

Deno.test("expandTemplate() refuses a {{…}} that is not a placeholder, outside literals only", () => {
  assert.throws(
    () => expandTemplate("SELECT * FROM {{table.users}}", "app"),
    /did you mean \{\{tables\.users\}\}/,
  );
  assert.throws(
    () => expandTemplate("SELECT * FROM {{ tables.users }}"),
    /did you mean \{\{tables\.users\}\}/,
  );
  assert.throws(
    () => expandTemplate("SELECT {{whatever}}"),
    /"\{\{whatever\}\}": it is not a placeholder\. Write/,
  );
  assert.equal(
    expandTemplate("SELECT '{\"a\": {{1}}}' -- {{x}}"),
    "SELECT '{\"a\": {{1}}}' -- {{x}}",
  );
});

serverTest("errors that say what to do (server)", async (t) => {
  const events: QueryEvent[] = [];
  await withManager((db) => steps(t, db, events), { onQuery: (event) => events.push(event) });
});

serverTest("a lock wait cut by lockTimeoutMs names lockTimeoutMs", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.counters}} (id int PRIMARY KEY, n int)");
    await db.execute("INSERT INTO {{tables.counters}} VALUES (1, 0)");
    let release!: () => void;
    const released = new Promise<void>((resolve) => release = resolve);
    let locked!: () => void;
    const holding = new Promise<void>((resolve) => locked = resolve);
    const holder = db.transaction(async (tx) => {
      await tx.execute("UPDATE {{tables.counters}} SET n = n + 1 WHERE id = 1");
      locked();
      await released;
    });
    try {
      await holding;
      const error = await failure(
        db.execute("UPDATE {{tables.counters}} SET n = n + 1 WHERE id = 1"),
        QueryError,
      );
      assert.equal(error.sqlstate, "55P03");
      assert.match(error.message, /lock timeout: .*from lockTimeoutMs \(the pool.s: 200 ms/);
      assert.match(error.message, /Raise lockTimeoutMs in the pool's config/);
    } finally {
      release();
      await holder;
    }
  }, { lockTimeoutMs: 200 });
});

serverTest("sslmode=require against a server without TLS says the server refused TLS", async () => {
  const url = new URL(TEST_URL);
  url.searchParams.set("sslmode", "require");
  const error = await failure(
    createSharedPool({ connectionString: url.href, retry: { attempts: 1 } }),
    ConnectionError,
  );
  assert.match(
    error.message,
    /the server refused TLS: sslmode=require asks for an encrypted connection/,
  );
});

Deno.test("errors that say what to do (embedded PostgreSQL, pglite:memory)", async (t) => {
  const events: QueryEvent[] = [];
  const pool = await createSharedPool({
    connectionString: "pglite:memory",
    onQuery: (event) => events.push(event),
  });
  try {
    const db = new DatabaseManager({ pool, schema: "advice" });
    await db.ensureSchema();
    await steps(t, db, events);
  } finally {
    await pool.close();
  }
});
