/**
 * Every query method as a tagged template: values become `$1…$n` parameters, and `{{…}}`
 * placeholders expand in the literal text only.
 */
import assert from "node:assert/strict";
import { SchemaError } from "../mod.ts";
import { serverTest, withManager } from "./_support/server.ts";

serverTest("Query methods as tagged templates bind values as parameters", async () => {
  await withManager(async (db) => {
    await db.execute`CREATE TABLE {{tables.items}} (id serial PRIMARY KEY, name text, n int)`;
    const name = "it's {{tables.items}}; DROP TABLE items; --";
    const id = await db.executeAndReturnId<number>`
      INSERT INTO {{tables.items}} (name, n) VALUES (${name}, ${41 + 1})`;
    assert.equal(id, 1);
    assert.deepEqual(
      await db.fetchOne`SELECT name, n FROM {{tables.items}} WHERE id = ${id}`,
      { name, n: 42 },
      "a value is a parameter: never SQL, never a placeholder",
    );
    assert.equal(
      await db.fetchValue<number>`SELECT n FROM {{tables.items}} WHERE name = ${name}`,
      42,
    );
    const updated = await db.execute`UPDATE {{tables.items}} SET n = n + ${1} WHERE id = ${id}`;
    assert.deepEqual(updated, { command: "UPDATE", rowCount: 1 });
    assert.deepEqual(await db.fetchAll`SELECT id, n FROM {{tables.items}} WHERE n > ${0}`, [{
      id: 1,
      n: 43,
    }]);
    await db.transaction(async (tx) => {
      await tx.execute`INSERT INTO {{tables.items}} (name, n) VALUES (${"in tx"}, ${7})`;
      assert.equal(await tx.fetchValue`SELECT count(*)::int FROM {{tables.items}}`, 2);
    });
    assert.equal(await db.fetchValue`SELECT ${"no placeholders"}::text`, "no placeholders");
  });
});

serverTest("A tagged template's placeholder cannot come from a value", async () => {
  await withManager(async (db) => {
    const table = "items";
    // `{{tables.${table}}}` puts a parameter inside the placeholder: refused, never expanded.
    await assert.rejects(() => db.fetchAll`SELECT * FROM {{tables.${table}}}`, SchemaError);
  });
});

serverTest("A query method given neither a string nor a template says what to pass", async () => {
  await withManager(async (db) => {
    await assert.rejects(
      () => db.fetchAll(42 as unknown as string),
      (error: unknown) => error instanceof TypeError && /tagged template/.test(error.message),
    );
  });
});
