/**
 * The `onQuery` hook: one event per statement a manager, transaction or connection runs,
 * with the expanded SQL, masked parameters, duration, rows and errors; a hook that throws
 * never breaks the query.
 */
import assert from "node:assert/strict";
import { ConfigurationError, createSharedPool, DatabaseManager, type QueryEvent } from "../mod.ts";
import { observe, serverTest, TEST_URL, uniqueName } from "./_support/server.ts";

const PASSWORD = "hunter2-correct-horse";

async function withHook(
  fn: (db: DatabaseManager, events: QueryEvent[]) => Promise<void>,
  warnings: string[] = [],
  hook?: (event: QueryEvent) => void,
): Promise<void> {
  const events: QueryEvent[] = [];
  const pool = await createSharedPool({
    connectionString: TEST_URL,
    onQuery: hook ?? ((event) => events.push(event)),
    logger: { warn: (message) => warnings.push(message) },
  });
  const schema = uniqueName("hook");
  const db = new DatabaseManager({ pool, schema });
  try {
    await db.ensureSchema();
    events.length = 0;
    await fn(db, events);
  } finally {
    await pool.close();
    await observe((sql) => sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`));
  }
}

serverTest(
  "onQuery sees every statement with expanded SQL, rows, schema and duration",
  async () => {
    await withHook(async (db, events) => {
      await db.execute("CREATE TABLE {{tables.users}} (id int PRIMARY KEY, email text)");
      await db.execute("INSERT INTO {{tables.users}} VALUES ($1, $2), ($3, $4)", [1, "a", 2, "b"]);
      await db.transaction(async (tx) => {
        await tx.fetchAll("SELECT * FROM {{tables.users}} ORDER BY id");
      });
      await db.acquire((conn) => conn.fetchValue("SELECT count(*) FROM {{tables.users}}"));
      await db.executeMany("UPDATE {{tables.users}} SET email = $2 WHERE id = $1", [[1, "c"], [
        2,
        "d",
      ]]);
      const schema = db.schema!;
      assert.deepEqual(
        events.map((e) => [e.sql, e.rowCount, e.schema, e.node, e.error]),
        [
          [`CREATE TABLE "${schema}".users (id int PRIMARY KEY, email text)`, 0, schema, "primary"],
          [`INSERT INTO "${schema}".users VALUES ($1, $2), ($3, $4)`, 2, schema, "primary"],
          [`SELECT * FROM "${schema}".users ORDER BY id`, 2, schema, "primary"],
          [`SELECT count(*) FROM "${schema}".users`, 1, schema, "primary"],
          [`UPDATE "${schema}".users SET email = $2 WHERE id = $1`, 2, schema, "primary"],
        ].map((row) => [...row, undefined]),
      );
      assert.deepEqual(events[1].params, [1, "a", 2, "b"]);
      for (const event of events) assert.ok(event.durationMs >= 0 && event.durationMs < 60_000);
    });
  },
);

serverTest("onQuery reports failures with their error and hides password parameters", async () => {
  await withHook(async (db, events) => {
    await db.execute("CREATE TABLE {{tables.accounts}} (email text, password text)");
    await db.execute(
      "INSERT INTO {{tables.accounts}} (email, password) VALUES ($1, $2)",
      ["ann@example.com", PASSWORD],
    );
    await db.fetchOne("SELECT * FROM {{tables.accounts}} WHERE password = $1", [PASSWORD]);
    await db.execute("SELECT $1::jsonb", [{ user: "ann", token: PASSWORD }]);
    await assert.rejects(
      db.execute("SELECT * FROM {{tables.nope}} WHERE password = $1", [PASSWORD]),
    );
    const failed = events.at(-1)!;
    assert.equal((failed.error as { sqlstate?: string }).sqlstate, "42P01");
    assert.equal(failed.rowCount, 0);
    assert.deepEqual(events[1].params, ["ann@example.com", "<hidden>"]);
    assert.ok(!JSON.stringify(events).includes(PASSWORD), "a password reached the hook");
  });
});

serverTest("a hook that throws does not break the query; the logger says why", async () => {
  const warnings: string[] = [];
  await withHook(
    async (db) => {
      assert.equal(await db.fetchValue("SELECT 41 + 1"), 42);
    },
    warnings,
    () => {
      throw new Error("hook bug");
    },
  );
  assert.ok(warnings.some((w) => w.includes("onQuery hook threw (hook bug)")), String(warnings));
});

Deno.test("onQuery and replicas are checked when the pool is made", () => {
  assert.throws(
    () => new DatabaseManager({ connectionString: TEST_URL, onQuery: "log" as never }),
    (error) => error instanceof ConfigurationError && error.field === "onQuery",
  );
  assert.throws(
    () => new DatabaseManager({ connectionString: TEST_URL, replicas: "postgres://r/db" as never }),
    (error) => error instanceof ConfigurationError && error.field === "replicas",
  );
  assert.throws(
    () => new DatabaseManager({ connectionString: "pglite:memory", replicas: ["postgres://r/x"] }),
    /cannot be used with the embedded PostgreSQL/,
  );
  assert.throws(
    () => new DatabaseManager({ connectionString: TEST_URL, replicas: ["mysql://u:pw@r/x"] }),
    (error) =>
      error instanceof ConfigurationError && error.field === "replicas" &&
      !error.message.includes(":pw@"),
  );
  assert.throws(
    () => new DatabaseManager({ connectionString: TEST_URL, maxReplicaLagMs: -1 }),
    (error) => error instanceof ConfigurationError && error.field === "maxReplicaLagMs",
  );
});

serverTest(
  "onQuery sees a stream (in a transaction: its cursor's statements) and a COPY out, values kept out",
  async () => {
    await withHook(async (db, events) => {
      await db.execute("CREATE TABLE {{tables.users}} (id int, password text)");
      await db.execute("INSERT INTO {{tables.users}} SELECT g, 'x' FROM generate_series(1, 5) g");
      events.length = 0;
      const schema = db.schema!;
      const ids: unknown[] = [];
      for await (
        const row of db.stream<{ id: number }>(
          "SELECT id FROM {{tables.users}} WHERE id > $1 ORDER BY id",
          [1],
          { batchSize: 3 },
        )
      ) ids.push(row.id);
      assert.deepEqual(ids, [2, 3, 4, 5]);
      // On a connection of its own the stream is one statement, read through a portal.
      assert.deepEqual(
        events.map((e) => [e.sql, e.rowCount, e.error]),
        [[`SELECT id FROM "${schema}".users WHERE id > $1 ORDER BY id`, 4, undefined]],
      );
      assert.deepEqual(events[0].params, [1]);

      // In a transaction it is a cursor, whose statements are seen one by one.
      events.length = 0;
      const inTransaction: unknown[] = [];
      await db.transaction(async (tx) => {
        for await (
          const row of tx.stream<{ id: number }>(
            "SELECT id FROM {{tables.users}} WHERE id > $1 ORDER BY id",
            [1],
            { batchSize: 3 },
          )
        ) inTransaction.push(row.id);
      });
      assert.deepEqual(inTransaction, [2, 3, 4, 5]);
      assert.deepEqual(
        events.filter((e) => e.sql.includes("pgdbm_cursor")).map((e) => [e.sql, e.rowCount]),
        [
          [
            `DECLARE pgdbm_cursor_1 NO SCROLL CURSOR FOR SELECT id FROM "${schema}".users WHERE id > $1 ORDER BY id`,
            0,
          ],
          ["FETCH FORWARD 3 FROM pgdbm_cursor_1", 3],
          ["FETCH FORWARD 3 FROM pgdbm_cursor_1", 1],
          ["CLOSE pgdbm_cursor_1", 0],
        ],
      );

      events.length = 0;
      const chunks: Uint8Array[] = [];
      for await (
        const chunk of db.copyFromQuery(
          "SELECT id FROM {{tables.users}} WHERE password = $1 OR id > 0",
          [PASSWORD],
        )
      ) chunks.push(chunk);
      for await (const _ of db.copyFromTable("users", { format: "csv" })) break;
      assert.deepEqual(
        events.map((e) => [e.sql, e.rowCount, e.error]),
        [
          [
            `COPY (SELECT id FROM "${schema}".users WHERE password = $1 OR id > 0\n) TO STDOUT`,
            5,
            undefined,
          ],
          [`COPY "${schema}".users TO STDOUT WITH (FORMAT csv)`, 0, undefined],
        ],
      );
      assert.deepEqual(events[0].params, ["<hidden>"]);
      assert.ok(!JSON.stringify(events).includes(PASSWORD), "a password reached the hook");
      await assert.rejects(async () => {
        for await (const _ of db.copyFromTable("missing")) { /* nothing */ }
      });
      assert.equal((events.at(-1)!.error as { sqlstate?: string }).sqlstate, "42P01");
    });
  },
);
