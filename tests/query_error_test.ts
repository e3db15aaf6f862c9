/**
 * What pgdbm hands out when a query fails: QueryError's message, detail, string form,
 * inspected form (with its cause) and the onQuery event never show a bound value the server
 * repeated; tableExists() refuses an invalid name before sending anything; and an error
 * thrown by the caller's own COPY records comes back as itself, on the server and on the
 * embedded engine (one PGlite instance for the whole file: it takes about 2 s and 650 MB).
 */
import assert from "node:assert/strict";
import {
  createSharedPool,
  DatabaseManager,
  QueryError,
  type QueryEvent,
  SchemaError,
} from "../mod.ts";
import { observe, serverTest, TEST_URL, withManager } from "./_support/server.ts";

const SECRET = "s3cr3t-value";
const NUMBER_SECRET = 987654;

/** Awaits `promise` and returns what it rejected with; fails when it resolved. */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("expected the call to reject");
}

/** Awaits `promise` and returns its QueryError. */
async function queryError(promise: Promise<unknown>): Promise<QueryError> {
  const error = await rejection(promise);
  assert.ok(error instanceof QueryError, `expected a QueryError, got ${Deno.inspect(error)}`);
  return error;
}

/** Every text of `value` a log line could show, own non-enumerable properties included. */
function everyText(value: unknown, depth = 0): string {
  if (value === null || value === undefined) return "";
  if (typeof value !== "object" && typeof value !== "function") return String(value);
  if (depth > 4) return "";
  const parts = [Deno.inspect(value, { depth: 10, showHidden: true })];
  for (const key of Object.getOwnPropertyNames(value)) {
    let item: unknown;
    try {
      item = (value as Record<string, unknown>)[key];
    } catch {
      continue;
    }
    parts.push(everyText(item, depth + 1));
  }
  return parts.join("\n");
}

/** Asserts that no secret is in anything pgdbm hands out for `error` and its events. */
function assertHidden(
  error: QueryError,
  secrets: readonly string[],
  events: readonly QueryEvent[] = [],
): void {
  const shown: Record<string, string> = {
    message: error.message,
    detail: error.detail ?? "",
    hint: error.hint ?? "",
    "String(error)": String(error),
    "Deno.inspect(error)": Deno.inspect(error, { depth: 10 }),
    stack: error.stack ?? "",
    "Deno.inspect(error.cause)": Deno.inspect(error.cause, { depth: 10 }),
    "the cause's own properties": everyText(error.cause),
  };
  for (const event of events) {
    shown["onQuery event error"] = (shown["onQuery event error"] ?? "") +
      Deno.inspect(event.error, { depth: 10 });
  }
  for (const secret of secrets) {
    for (const [where, text] of Object.entries(shown)) {
      assert.ok(!text.includes(secret), `${where} shows the bound value "${secret}":\n${text}`);
    }
  }
}

/** A manager over a fresh schema that records every onQuery event. */
async function withEvents(
  fn: (db: DatabaseManager, events: QueryEvent[]) => Promise<void>,
): Promise<void> {
  const events: QueryEvent[] = [];
  await withManager((db) => fn(db, events), {
    maxConnections: 1,
    onQuery: (event) => events.push(event),
  });
}

async function createTables(db: DatabaseManager): Promise<void> {
  await db.execute("CREATE TABLE {{tables.parent}} (id int PRIMARY KEY)");
  await db.execute(
    "CREATE TABLE {{tables.t}} (id int PRIMARY KEY, token text CONSTRAINT t_token_key UNIQUE, " +
      "n int CONSTRAINT t_n_positive CHECK (n > 0), note text NOT NULL, " +
      "ref int CONSTRAINT t_ref_fkey REFERENCES {{tables.parent}} (id), short varchar(10))",
  );
  await db.execute(
    "INSERT INTO {{tables.t}} (id, token, n, note) VALUES (1, $1, 1, 'first')",
    [SECRET],
  );
}

const INSERT = "INSERT INTO {{tables.t}} (id, token, n, note, ref) VALUES ($1, $2, $3, $4, $5)";

/** The failures of the masking tests, shared by the server and the embedded engine. */
async function maskingSteps(
  t: Deno.TestContext,
  db: DatabaseManager,
  events: QueryEvent[],
): Promise<void> {
  await createTables(db);

  await t.step("a unique violation's detail masks the value, keeps the rest", async () => {
    events.length = 0;
    const error = await queryError(db.execute(INSERT, [2, SECRET, 1, "n", null]));
    assert.equal(error.sqlstate, "23505");
    assert.equal(error.constraint, "t_token_key");
    assert.match(error.message, /duplicate key value violates unique constraint "t_token_key"/);
    assert.equal(error.detail, "Key (token)=(<string>) already exists.");
    assertHidden(error, [SECRET], events);
    assert.ok(events.length > 0 && events.every((e) => e.error === error));
  });

  await t.step("invalid input syntax masks the value in the message", async () => {
    events.length = 0;
    const bad = `${SECRET}-not-a-number`;
    const error = await queryError(db.fetchValue("SELECT $1::int", [bad]));
    assert.equal(error.sqlstate, "22P02");
    assert.equal(error.message, 'invalid input syntax for type integer: "<string>"');
    assertHidden(error, [bad, SECRET], events);
  });

  await t.step("a NOT NULL violation's failing row masks each bound value", async () => {
    events.length = 0;
    const error = await queryError(db.execute(INSERT, [3, `${SECRET}-nn`, 4242, null, null]));
    assert.equal(error.sqlstate, "23502");
    assert.match(error.message, /null value in column "note"/);
    assert.match(error.detail ?? "", /^Failing row contains \(3, <string>, <number>, null, null/);
    assertHidden(error, [`${SECRET}-nn`, "4242"], events);
  });

  await t.step("a CHECK violation's failing row masks strings and numbers", async () => {
    events.length = 0;
    const error = await queryError(db.execute(INSERT, [4, `${SECRET}-ck`, -12345, "x", null]));
    assert.equal(error.sqlstate, "23514");
    assert.equal(error.constraint, "t_n_positive");
    assert.match(error.message, /violates check constraint "t_n_positive"/);
    assert.match(error.detail ?? "", /^Failing row contains \(4, <string>, -?<number>, <string>/);
    assertHidden(error, [`${SECRET}-ck`, "12345"], events);
  });

  await t.step("a foreign key violation masks the key", async () => {
    events.length = 0;
    const error = await queryError(db.execute(INSERT, [5, "fk", 1, "x", NUMBER_SECRET]));
    assert.equal(error.sqlstate, "23503");
    assert.equal(error.constraint, "t_ref_fkey");
    assert.match(error.message, /violates foreign key constraint "t_ref_fkey"/);
    assert.equal(error.detail, 'Key (ref)=(<number>) is not present in table "parent".');
    assertHidden(error, [String(NUMBER_SECRET)], events);
  });

  await t.step("masking keeps words whole and leaves short numbers alone", async () => {
    await db.execute("INSERT INTO {{tables.t}} (id, token, n, note) VALUES (6, 't', 1, 'x')");
    const dup = await queryError(db.execute(INSERT, [7, "t", 1, "x", null]));
    // "t" is masked where it stands alone, not inside "t_token_key" or "(token)".
    assert.match(dup.message, /unique constraint "t_token_key"$/);
    assert.equal(dup.detail, "Key (token)=(<string>) already exists.");
    const long = "s3cr3t-longer-than-ten";
    const tooLong = await queryError(
      db.execute("INSERT INTO {{tables.t}} (id, n, note, short) VALUES ($1, $2, 'x', $3)", [
        10,
        10,
        long,
      ]),
    );
    assert.equal(tooLong.sqlstate, "22001");
    assert.equal(tooLong.message, "value too long for type character varying(10)");
    assertHidden(tooLong, [long]);
  });

  await t.step("executeMany() masks the failing execution's values", async () => {
    const error = await queryError(
      db.executeMany(INSERT, [[20, "fine", 1, "x", null], [21, SECRET, 1, "x", null]]),
    );
    assert.equal(error.sqlstate, "23505");
    assert.equal(error.detail, "Key (token)=(<string>) already exists.");
    assertHidden(error, [SECRET]);
  });
}

// ---------------------------------------------------------------------------------------
// 1. Bound values never reach QueryError or the onQuery event
// ---------------------------------------------------------------------------------------

serverTest("QueryError masks bound values the server repeats (server)", async (t) => {
  await withEvents(async (db, events) => {
    await maskingSteps(t, db, events);

    await t.step("the server's context line of a parameter is masked in the cause", async () => {
      const bad = `${SECRET}-in-context`;
      const error = await queryError(db.transaction(async (tx) => {
        await tx.execute("SET LOCAL log_parameter_max_length_on_error = -1");
        await tx.fetchValue("SELECT $1::int", [bad]);
      }));
      assert.equal(error.sqlstate, "22P02");
      const where = (error.cause as { where?: string }).where ?? "";
      assert.match(where, /parameter \$1 = '<string>'/);
      assertHidden(error, [bad]);
    });
  });
});

serverTest("a cancel's message stays whole when a bound value is one of its words", async () => {
  await withManager(async (db) => {
    const error = await rejection(db.transaction(async (tx) => {
      const pid = await tx.fetchValue<number>("SELECT pg_backend_pid()");
      const sleeping = tx.fetchValue("SELECT pg_sleep(30), $1::text, $2::text", [
        "user",
        "request",
      ]);
      sleeping.catch(() => {}); // awaited below, after the cancel
      await observe(async (sql) => {
        for (let i = 0; i < 500; i++) {
          const [row] = await sql`SELECT state, query FROM pg_stat_activity WHERE pid = ${pid}`;
          if (row?.state === "active" && String(row.query).includes("pg_sleep")) break;
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        await sql`SELECT pg_cancel_backend(${pid})`;
      });
      await sleeping;
    }));
    assert.ok(error instanceof QueryError, `expected a QueryError, got ${Deno.inspect(error)}`);
    assert.equal(error.sqlstate, "57014");
    assert.equal(error.message, "canceling statement due to user request");
  });
});

// ---------------------------------------------------------------------------------------
// 2. tableExists() validates both parts of the name before sending anything
// ---------------------------------------------------------------------------------------

const INVALID_NAMES = [
  "",
  "items; DROP TABLE x",
  "two words",
  '"quoted"',
  "bad-name",
  "bad-schema.items",
  "app.bad-name",
  ".items",
  "items.",
  "a.b.c",
  "x".repeat(64),
  `app.${"x".repeat(64)}`,
  "1starts_with_digit",
];

serverTest("tableExists() refuses an invalid name before sending any SQL", async () => {
  await withEvents(async (db, events) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    events.length = 0;
    for (const name of INVALID_NAMES) {
      const error = await rejection(db.tableExists(name));
      assert.ok(
        error instanceof SchemaError,
        `tableExists(${JSON.stringify(name)}) must throw SchemaError, got ${Deno.inspect(error)}`,
      );
      assert.match(error.message, /1 to 63 ASCII letters, digits or underscores/);
    }
    assert.equal(events.length, 0, "no SQL was sent for an invalid name");
    assert.ok(await rejection(db.tableExists(42 as unknown as string)) instanceof SchemaError);

    assert.equal(await db.tableExists("items"), true);
    assert.equal(await db.tableExists(`${db.schema}.items`), true);
    assert.equal(await db.tableExists("missing"), false);
    assert.equal(await db.tableExists(`${db.schema}.missing`), false);
    assert.equal(await db.tableExists("no_such_schema_x.items"), false);
  });

  // Refused before the pool is even needed: a manager that never connected.
  const idle = new DatabaseManager({ connectionString: TEST_URL, schema: "app" });
  for (const name of ["bad-name", "bad-schema.items", "app.bad name"]) {
    assert.ok(await rejection(idle.tableExists(name)) instanceof SchemaError, name);
  }
});

// ---------------------------------------------------------------------------------------
// 3. The caller's own COPY records error comes back as itself
// ---------------------------------------------------------------------------------------

const ROWS_BEFORE_THROW = 5000;
const PAD = "p".repeat(100);

/** Records that yield several 64 KiB chunks' worth of rows, then throw `error`. */
async function* failingRecords(error: unknown): AsyncGenerator<unknown[]> {
  for (let i = 1; i <= ROWS_BEFORE_THROW; i++) yield [i, PAD];
  throw error;
}

function* failingSyncRecords(error: unknown): Generator<unknown[]> {
  for (let i = 1; i <= ROWS_BEFORE_THROW; i++) yield [i, PAD];
  throw error;
}

async function copySteps(
  t: Deno.TestContext,
  db: DatabaseManager,
  events: QueryEvent[],
): Promise<void> {
  await db.execute("CREATE TABLE {{tables.copied}} (id int, pad text)");
  const count = () => db.fetchValue<string>("SELECT count(*)::text FROM {{tables.copied}}");

  await t.step("an async iterator's error is the caller's own error", async () => {
    events.length = 0;
    const mine = new Error("records source failed");
    const error = await rejection(db.copyRecordsToTable("copied", failingRecords(mine)));
    assert.equal(error, mine);
    assert.equal(await count(), "0", "no partial rows");
    const copyEvent = events.find((e) => e.sql.startsWith("COPY"));
    assert.ok(copyEvent !== undefined, "the COPY reached the onQuery hook");
    assert.equal(copyEvent.error, mine, "the onQuery event has the caller's error too");
  });

  await t.step("a sync iterator's error and a thrown non-Error come back as they are", async () => {
    const mine = new RangeError("sync source failed");
    assert.equal(
      await rejection(db.copyRecordsToTable("copied", failingSyncRecords(mine))),
      mine,
    );
    const thrown = { reason: "not an Error" };
    assert.equal(await rejection(db.copyRecordsToTable("copied", failingRecords(thrown))), thrown);
    assert.equal(await count(), "0", "no partial rows");
  });

  await t.step("inside a transaction the caller's error comes back and nothing stays", async () => {
    const mine = new Error("records failed in a transaction");
    const error = await rejection(db.transaction(async (tx) => {
      await tx.execute("INSERT INTO {{tables.copied}} VALUES (0, 'before')");
      await tx.copyRecordsToTable("copied", failingRecords(mine));
    }));
    assert.equal(error, mine);
    assert.equal(await count(), "0");
  });

  await t.step("the manager still works: queries and a good COPY", async () => {
    assert.equal(await db.fetchValue<number>("SELECT 1 + 1 AS n"), 2);
    const copied = await db.copyRecordsToTable("copied", [[1, "a"], [2, "b"]]);
    assert.equal(copied, 2);
    assert.equal(await count(), "2");
  });
}

serverTest("copyRecordsToTable() rethrows the caller's records error (server)", async (t) => {
  await withEvents((db, events) => copySteps(t, db, events));
});

// ---------------------------------------------------------------------------------------
// The same on the embedded engine (one instance for the file)
// ---------------------------------------------------------------------------------------

Deno.test("the same on the embedded PostgreSQL (pglite:memory)", async (t) => {
  const events: QueryEvent[] = [];
  const pool = await createSharedPool({
    connectionString: "pglite:memory",
    onQuery: (event) => events.push(event),
  });
  try {
    const masking = new DatabaseManager({ pool, schema: "masking" });
    await masking.ensureSchema();
    await t.step("QueryError masks bound values", (t) => maskingSteps(t, masking, events));

    const copying = new DatabaseManager({ pool, schema: "copying" });
    await copying.ensureSchema();
    await t.step("copyRecordsToTable() rethrows the caller's error", async (t) => {
      await copySteps(t, copying, events);
    });

    await t.step("tableExists() refuses invalid names", async () => {
      events.length = 0;
      for (const name of INVALID_NAMES) {
        assert.ok(await rejection(copying.tableExists(name)) instanceof SchemaError, name);
      }
      assert.equal(events.length, 0);
      assert.equal(await copying.tableExists("copying.copied"), true);
      assert.equal(await copying.tableExists("copied"), true);
    });
  } finally {
    await pool.close();
  }
});
