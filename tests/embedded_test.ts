/**
 * The embedded engine (SPEC section 8): the same manager, templates and migrator on PGlite,
 * one connection, the pool a queue. One PGlite instance for the whole file (it takes about
 * 2 s and 650 MB to start).
 */
import assert from "node:assert/strict";
import {
  createSharedPool,
  DatabaseManager,
  MigrationError,
  Migrator,
  PoolError,
  QueryError,
} from "../mod.ts";

Deno.test("DatabaseManager and Migrator run on the embedded PostgreSQL (pglite:memory)", async (t) => {
  const pool = await createSharedPool({
    connectionString: "pglite:memory",
    acquireTimeoutMs: 500,
  });
  try {
    const users = new DatabaseManager({ pool, schema: "users" });
    const orders = new DatabaseManager({ pool, schema: "orders" });

    await t.step("the pool is one connection", () => {
      const stats = pool.getStats();
      assert.equal(stats.maxSize, 1);
      assert.equal(stats.size, 1);
    });

    await t.step("migrations create each service's tables in its schema", async () => {
      const migrations = {
        "001_items.sql":
          "CREATE TABLE {{tables.items}} (id serial PRIMARY KEY, name text NOT NULL);",
        "002_items_note.sql": "ALTER TABLE {{tables.items}} ADD COLUMN note text;",
      };
      for (const db of [users, orders]) {
        await db.ensureSchema();
        const result = await new Migrator(db, { migrations, moduleName: "items" }).applyPending();
        assert.equal(result.status, "success");
        assert.deepEqual(result.applied.map((m) => m.filename), Object.keys(migrations));
        const again = await new Migrator(db, { migrations, moduleName: "items" }).applyPending();
        assert.equal(again.status, "up_to_date");
      }
      assert.equal(await users.tableExists("items"), true);
      assert.equal(await orders.tableExists("orders.items"), true);
      const history = await users.fetchValue<string>(
        "SELECT count(*) FROM {{tables.schema_migrations}} WHERE module_name = 'items'",
      );
      assert.equal(history, "2");
    });

    await t.step("a drifted file is refused and nothing is applied", async () => {
      const error = await new Migrator(users, {
        migrations: {
          "001_items.sql": "CREATE TABLE {{tables.items}} (id int);",
          "002_items_note.sql": "ALTER TABLE {{tables.items}} ADD COLUMN note text;",
          "003_more.sql": "CREATE TABLE {{tables.more}} (id int);",
        },
        moduleName: "items",
      }).applyPending().then(() => undefined, (e) => e);
      assert.ok(error instanceof MigrationError);
      assert.equal(error.filename, "001_items.sql");
      assert.equal(await users.tableExists("more"), false);
    });

    await t.step("a failing migration leaves nothing of its file", async () => {
      const error = await new Migrator(orders, {
        migrations: {
          "001_items.sql":
            "CREATE TABLE {{tables.items}} (id serial PRIMARY KEY, name text NOT NULL);",
          "002_items_note.sql": "ALTER TABLE {{tables.items}} ADD COLUMN note text;",
          "003_bad.sql": "CREATE TABLE {{tables.half}} (id int);\nSELECT nope FROM nowhere;",
        },
        moduleName: "items",
      }).applyPending().then(() => undefined, (e) => e);
      assert.ok(error instanceof MigrationError);
      assert.equal(error.filename, "003_bad.sql");
      assert.equal(error.line, 2);
      assert.equal(await orders.tableExists("half"), false);
    });

    await t.step("query methods and schema isolation", async () => {
      await users.executeMany("INSERT INTO {{tables.items}} (name) VALUES ($1)", [["a"], ["b"]]);
      const id = await orders.executeAndReturnId<number>(
        "INSERT INTO {{tables.items}} (name) VALUES ($1)",
        ["only in orders"],
      );
      assert.equal(id, 1);
      assert.deepEqual(
        await users.fetchAll("SELECT name FROM {{tables.items}} ORDER BY id"),
        [{ name: "a" }, { name: "b" }],
      );
      assert.equal(await orders.fetchValue("SELECT count(*) FROM {{tables.items}}"), "1");
      assert.equal(await users.fetchOne("SELECT * FROM {{tables.items}} WHERE id = -1"), null);
    });

    await t.step("stream() and tagged templates work on the embedded engine too", async () => {
      const names: string[] = [];
      for await (
        const row of users.stream<{ name: string }>(
          "SELECT name FROM {{tables.items}} ORDER BY id",
          [],
          { batchSize: 1 },
        )
      ) names.push(row.name);
      assert.deepEqual(names, ["a", "b"]);
      assert.equal(await users.fetchValue`SELECT name FROM {{tables.items}} WHERE id = ${2}`, "b");
    });

    await t.step("transactions commit, roll back, and savepoints roll back alone", async () => {
      await assert.rejects(
        users.transaction(async (tx) => {
          await tx.execute("INSERT INTO {{tables.items}} (name) VALUES ('rolled back')");
          throw new Error("abort");
        }),
        /abort/,
      );
      await users.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} (name) VALUES ('kept')");
        await tx.transaction(async (sp) => {
          await sp.execute("INSERT INTO {{tables.items}} (name) VALUES ('savepoint')");
          throw new Error("inner");
        }).catch(() => {});
      });
      assert.deepEqual(
        await users.fetchAll<{ name: string }>("SELECT name FROM {{tables.items}} ORDER BY id"),
        [{ name: "a" }, { name: "b" }, { name: "kept" }],
      );
    });

    await t.step("COPY round-trips awkward values", async () => {
      const copied = await orders.copyRecordsToTable(
        "items",
        [["tab\there", "line\nbreak"], ["back\\slash", null], ["ünïcødé 🐘", "\\N"]],
        { columns: ["name", "note"] },
      );
      assert.equal(copied, 3);
      assert.deepEqual(
        await orders.fetchAll("SELECT name, note FROM {{tables.items}} WHERE id > 1 ORDER BY id"),
        [
          { name: "tab\there", note: "line\nbreak" },
          { name: "back\\slash", note: null },
          { name: "ünïcødé 🐘", note: "\\N" },
        ],
      );
    });

    await t.step("types map as on the network driver", async () => {
      const row = await users.fetchOne<Record<string, unknown>>(
        "SELECT 9007199254740993::int8 AS big, 1.50::numeric AS num, '{1,NULL}'::int[] AS arr, " +
          "'\\x00ff'::bytea AS bytes, '{\"a\":1}'::jsonb AS doc, now() AS at",
      );
      assert.equal(row!.big, "9007199254740993");
      assert.equal(row!.num, "1.50");
      assert.deepEqual(row!.arr, [1, null]);
      assert.deepEqual(row!.bytes, new Uint8Array([0, 255]));
      assert.deepEqual(row!.doc, { a: 1 });
      assert.ok(row!.at instanceof Date);
    });

    await t.step("server errors keep their SQLSTATE", async () => {
      const error = await users.execute("SELECT * FROM {{tables.missing}}").then(
        () => undefined,
        (e) => e,
      );
      assert.ok(error instanceof QueryError);
      assert.equal(error.sqlstate, "42P01");
    });

    await t.step(
      "the one connection is a queue: a second lease waits, then times out",
      async () => {
        let release!: () => void;
        const held = new Promise<void>((resolve) => release = resolve);
        const holder = users.acquire(async () => await held);
        const waiting = users.transaction(async () => {}).then(() => undefined, (e) => e);
        const error = await waiting;
        release();
        await holder;
        assert.ok(error instanceof PoolError);
        assert.equal(error.code, "POOL_EXHAUSTED");
        assert.equal(await users.fetchValue("SELECT 1"), 1);
      },
    );

    await t.step(
      "a standalone pglite:memory manager is a database of its own, with no warning",
      async () => {
        const warnings: string[] = [];
        await using other = new DatabaseManager({
          connectionString: "pglite:memory",
          schema: "users",
          logger: { warn: (message) => warnings.push(message) },
        });
        await other.connect();
        assert.equal(await other.tableExists("items"), false);
        assert.deepEqual(warnings, []);
      },
    );

    await t.step(
      "an aborted signal rejects with its reason before anything is sent",
      async () => {
        const reason = new Error("the request was closed");
        const error = await users.fetchValue("SELECT 1", [], { signal: AbortSignal.abort(reason) })
          .then(() => undefined, (e) => e);
        assert.equal(error, reason);
      },
    );
  } finally {
    await pool.close();
  }
});
