/**
 * Integration tests of `DatabaseManager` against a real PostgreSQL server (SPEC sections 3
 * and 4): every query method, type mapping, schema isolation over one shared pool,
 * transactions, `acquire()`, errors, the standalone / shared-pool rules and template
 * injection. Skipped, with the reason, when no server answers at PGDBM_TEST_URL.
 */
import assert from "node:assert/strict";
import {
  ConfigurationError,
  createSharedPool,
  DatabaseManager,
  PoolError,
  QueryError,
  SchemaError,
  type StandardSchemaV1,
  ValidationError,
} from "../mod.ts";
import { observe, serverTest, TEST_URL, uniqueName, withManager } from "./_support/server.ts";

/** Resolves for everyone once `n` callers have arrived (to hold `n` connections at once). */
function barrier(n: number): () => Promise<void> {
  let arrived = 0;
  let release!: () => void;
  const all = new Promise<void>((resolve) => release = resolve);
  return () => {
    if (++arrived === n) release();
    return all;
  };
}

/** Lets pending promise callbacks and timers run. */
function tick(ms = 20): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function countRows(db: DatabaseManager, table: string): Promise<number> {
  return (await db.fetchValue<number>(`SELECT count(*)::int FROM {{tables.${table}}}`))!;
}

async function schemaExists(name: string): Promise<boolean> {
  return await observe(async (sql) => {
    const rows = await sql`SELECT 1 FROM pg_namespace WHERE nspname = ${name}`;
    return rows.length === 1;
  });
}

async function dropSchemaOutside(name: string): Promise<void> {
  await observe((sql) => sql.unsafe(`DROP SCHEMA IF EXISTS "${name}" CASCADE`));
}

// ---------------------------------------------------------------------------------------
// execute / executeMany / executeAndReturnId
// ---------------------------------------------------------------------------------------

serverTest("DatabaseManager.execute() returns the command verb and the rows affected", async () => {
  await withManager(async (db) => {
    const created = await db.execute("CREATE TABLE {{tables.items}} (id int, name text)");
    assert.equal(created.command, "CREATE TABLE");
    assert.equal(created.rowCount, 0);

    const inserted = await db.execute(
      "INSERT INTO {{tables.items}} (id, name) VALUES ($1, $2), ($3, $4), ($5, $6)",
      [1, "a", 2, "b", 3, "c"],
    );
    assert.deepEqual(inserted, { command: "INSERT", rowCount: 3 });

    const updated = await db.execute("UPDATE {{tables.items}} SET name = 'z' WHERE id >= $1", [2]);
    assert.deepEqual(updated, { command: "UPDATE", rowCount: 2 });

    const deleted = await db.execute("DELETE FROM {{tables.items}} WHERE id = $1", [1]);
    assert.deepEqual(deleted, { command: "DELETE", rowCount: 1 });

    const none = await db.execute("DELETE FROM {{tables.items}} WHERE id = $1", [99]);
    assert.deepEqual(none, { command: "DELETE", rowCount: 0 });
    assert.equal(await countRows(db, "items"), 2);
  });
});

serverTest("DatabaseManager.execute() runs several statements when given no params", async () => {
  await withManager(async (db) => {
    const result = await db.execute(
      "CREATE TABLE {{tables.multi}} (x int); " +
        "INSERT INTO {{tables.multi}} VALUES (1), (2); " +
        "INSERT INTO {{tables.multi}} SELECT x + 10 FROM {{tables.multi}}",
    );
    assert.deepEqual(result, { command: "INSERT", rowCount: 2 });
    const xs = await db.fetchAll<{ x: number }>("SELECT x FROM {{tables.multi}} ORDER BY x");
    assert.deepEqual(xs.map((r) => r.x), [1, 2, 11, 12]);
  });
});

serverTest("DatabaseManager.executeMany() returns the total of rows affected", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY, grp text)");
    const inserted = await db.executeMany(
      "INSERT INTO {{tables.items}} (id, grp) VALUES ($1, $2)",
      [[1, "a"], [2, "a"], [3, "b"], [4, "b"], [5, "b"]],
    );
    assert.equal(inserted, 5);
    const updated = await db.executeMany(
      "UPDATE {{tables.items}} SET grp = grp || '!' WHERE grp = $1",
      [["a"], ["b"], ["none"]],
    );
    assert.equal(updated, 5);
    assert.equal(await db.executeMany("DELETE FROM {{tables.items}}", []), 0);
    assert.equal(await countRows(db, "items"), 5);
  });
});

serverTest(
  "DatabaseManager.executeMany() runs every row in one transaction on one connection",
  async () => {
    await withManager(async (db) => {
      await db.execute(
        "CREATE TABLE {{tables.log}} (n int, pid int, xid text)",
      );
      const rows = Array.from({ length: 500 }, (_, i) => [i]);
      const started = performance.now();
      const total = await db.executeMany(
        "INSERT INTO {{tables.log}} (n, pid, xid) " +
          "VALUES ($1, pg_backend_pid(), txid_current()::text)",
        rows,
      );
      const elapsed = performance.now() - started;
      assert.equal(total, 500);
      const stats = await db.fetchOne<{ n: number; pids: number; xids: number }>(
        "SELECT count(*)::int AS n, count(DISTINCT pid)::int AS pids, " +
          "count(DISTINCT xid)::int AS xids FROM {{tables.log}}",
      );
      assert.deepEqual(stats, { n: 500, pids: 1, xids: 1 });
      // 500 round trips one after the other would still pass this on localhost; the bound
      // only catches a batch that waits on something (a timer, a lock) per row.
      assert.ok(elapsed < 10_000, `executeMany of 500 rows took ${elapsed} ms`);
    });
  },
);

serverTest(
  "DatabaseManager.executeMany() inserts nothing when one row in the middle fails",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY, name text NOT NULL)");
      const error = await db.executeMany(
        "INSERT INTO {{tables.items}} (id, name) VALUES ($1, $2)",
        [[1, "a"], [2, "b"], [3, null], [4, "d"], [5, "e"]],
      ).then(() => undefined, (e: unknown) => e);
      assert.ok(error instanceof QueryError, `expected QueryError, got ${error}`);
      assert.equal(error.sqlstate, "23502");
      assert.equal(error.code, "QUERY_ERROR");
      assert.match(error.sql, /INSERT INTO "[^"]+"\.items/);
      assert.equal(await countRows(db, "items"), 0);

      // The connection is back in autocommit and usable: the same batch, fixed, goes in.
      for (let i = 0; i < 5; i++) assert.equal(await db.fetchValue("SELECT 1"), 1);
      const total = await db.executeMany(
        "INSERT INTO {{tables.items}} (id, name) VALUES ($1, $2)",
        [[1, "a"], [2, "b"], [3, "c"]],
      );
      assert.equal(total, 3);
      assert.equal(await countRows(db, "items"), 3);
    });
  },
);

serverTest("DatabaseManager.executeAndReturnId() appends RETURNING id", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.notes}} (id serial PRIMARY KEY, body text)");
    const first = await db.executeAndReturnId(
      "INSERT INTO {{tables.notes}} (body) VALUES ($1)",
      ["one"],
    );
    const second = await db.executeAndReturnId(
      "INSERT INTO {{tables.notes}} (body) VALUES ($1)",
      ["two"],
    );
    assert.equal(first, 1);
    assert.equal(second, 2);
    assert.equal(
      await db.fetchValue("SELECT body FROM {{tables.notes}} WHERE id = $1", [second]),
      "two",
    );
  });
});

serverTest("DatabaseManager.executeAndReturnId() keeps an existing RETURNING clause", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.codes}} (code text PRIMARY KEY, n int)");
    const code = await db.executeAndReturnId(
      "INSERT INTO {{tables.codes}} (code, n) VALUES ($1, $2) RETURNING code",
      ["abc", 1],
    );
    assert.equal(code, "abc");
    await db.execute("CREATE TABLE {{tables.notes}} (id bigserial PRIMARY KEY, body text)");
    const id = await db.executeAndReturnId(
      "INSERT INTO {{tables.notes}} (body) VALUES ($1) returning body, id",
      ["x"],
    );
    assert.equal(id, "1", "the id column is preferred, and int8 comes back as a string");
  });
});

serverTest("DatabaseManager.executeAndReturnId() accepts a trailing semicolon", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.notes}} (id serial PRIMARY KEY, body text)");
    const a = await db.executeAndReturnId("INSERT INTO {{tables.notes}} (body) VALUES ($1);", [
      "a",
    ]);
    const b = await db.executeAndReturnId(
      "INSERT INTO {{tables.notes}} (body) VALUES ($1) ;  \n",
      ["b"],
    );
    assert.equal(a, 1);
    assert.equal(b, 2);
    assert.equal(await countRows(db, "notes"), 2);
  });
});

serverTest(
  "DatabaseManager.executeAndReturnId() returns the id when a string literal says 'returning'",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.notes}} (id serial PRIMARY KEY, body text)");
      const id = await db.executeAndReturnId(
        "INSERT INTO {{tables.notes}} (body) VALUES ('returning customer')",
      );
      assert.equal(id, 1);
    });
  },
);

// ---------------------------------------------------------------------------------------
// fetchOne / fetchAll / fetchValue
// ---------------------------------------------------------------------------------------

serverTest("DatabaseManager.fetchOne() returns the first row as a plain object", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int, name text)");
    await db.execute("INSERT INTO {{tables.items}} VALUES (1, 'a'), (2, 'b')");
    const row = await db.fetchOne("SELECT id, name FROM {{tables.items}} ORDER BY id DESC");
    assert.deepEqual(row, { id: 2, name: "b" });
    assert.equal(Object.getPrototypeOf(row), Object.prototype);
  });
});

serverTest("DatabaseManager.fetchOne() returns null when there is no row", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    assert.equal(await db.fetchOne("SELECT * FROM {{tables.items}}"), null);
    assert.equal(await db.fetchOne("SELECT 1 AS x WHERE $1::bool", [false]), null);
  });
});

serverTest("DatabaseManager.fetchAll() returns a plain Array of plain objects", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int, name text)");
    await db.execute("INSERT INTO {{tables.items}} VALUES (1, 'a'), (2, 'b'), (3, null)");
    const rows = await db.fetchAll(
      "SELECT id, name FROM {{tables.items}} WHERE id > $1 ORDER BY id",
      [
        0,
      ],
    );
    assert.equal(Object.getPrototypeOf(rows), Array.prototype);
    assert.ok(Array.isArray(rows));
    assert.deepEqual(rows, [{ id: 1, name: "a" }, { id: 2, name: "b" }, { id: 3, name: null }]);
    for (const row of rows) assert.equal(Object.getPrototypeOf(row), Object.prototype);
    assert.deepEqual(Object.keys(rows[0]), ["id", "name"]);
    // postgres.js result metadata must not leak onto the array.
    assert.deepEqual(Object.keys(rows), ["0", "1", "2"]);

    const empty = await db.fetchAll("SELECT id FROM {{tables.items}} WHERE id > 100");
    assert.equal(Object.getPrototypeOf(empty), Array.prototype);
    assert.deepEqual(empty, []);
  });
});

serverTest(
  "arrays of an enum created after the connection opened come back as arrays, bound and read",
  async () => {
    // One connection, opened before the types exist: it must learn them when it meets them.
    await withManager(async (db, pool) => {
      const pid = await db.fetchValue<number>("SELECT pg_backend_pid()");
      await db.execute(
        "CREATE TYPE {{tables.mood}} AS ENUM ('happy', 'sad', 'it''s, \"odd\"'); " +
          "CREATE DOMAIN {{tables.score}} AS int CHECK (VALUE >= 0); " +
          "CREATE TABLE {{tables.feelings}} (id int, moods {{tables.mood}}[], scores {{tables.score}}[])",
      );
      const moods = ["happy", null, 'it\'s, "odd"'];
      await db.execute("INSERT INTO {{tables.feelings}} VALUES (1, $1, $2)", [moods, [3, 0]]);
      for (let round = 0; round < 2; round++) {
        const row = await db.fetchOne("SELECT moods, scores FROM {{tables.feelings}} WHERE id = 1");
        assert.deepEqual(row, { moods, scores: [3, 0] }, `round ${round}`);
        assert.deepEqual(
          await db.fetchValue("SELECT ARRAY['sad', 'happy']::{{tables.mood}}[]"),
          ["sad", "happy"],
        );
      }
      assert.equal(await db.fetchValue<number>("SELECT pg_backend_pid()"), pid);
      assert.equal(pool.getStats().size, 1);
      // A session opened after the types reads the same.
      const later = await createSharedPool({ connectionString: TEST_URL, maxConnections: 1 });
      try {
        const fresh = new DatabaseManager({ pool: later, schema: db.schema });
        assert.deepEqual(
          await fresh.fetchOne("SELECT moods, scores FROM {{tables.feelings}} WHERE id = 1"),
          { moods, scores: [3, 0] },
        );
      } finally {
        await later.close();
      }
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest("DatabaseManager.fetchValue() reads a column by index and by name", async () => {
  await withManager(async (db) => {
    const sql = "SELECT 10 AS a, 'two' AS b, NULL::int AS c";
    assert.equal(await db.fetchValue(sql), 10);
    assert.equal(await db.fetchValue(sql, [], { column: 0 }), 10);
    assert.equal(await db.fetchValue(sql, [], { column: 1 }), "two");
    assert.equal(await db.fetchValue(sql, [], { column: "b" }), "two");
    assert.equal(await db.fetchValue(sql, [], { column: "a" }), 10);
    assert.equal(await db.fetchValue(sql, [], { column: "c" }), null);
    assert.equal(await db.fetchValue("SELECT $1::text || '!' AS v", ["hi"]), "hi!");
  });
});

serverTest("DatabaseManager.fetchValue() returns null when there is no row", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    assert.equal(await db.fetchValue("SELECT id FROM {{tables.items}}"), null);
    assert.equal(
      await db.fetchValue("SELECT id FROM {{tables.items}}", [], { column: "id" }),
      null,
    );
  });
});

serverTest("DatabaseManager.fetchValue() throws RangeError for an unknown column", async () => {
  await withManager(async (db) => {
    const sql = "SELECT 1 AS a, 2 AS b";
    await assert.rejects(db.fetchValue(sql, [], { column: "nope" }), (error: unknown) => {
      assert.ok(error instanceof RangeError);
      assert.match(error.message, /"nope"/);
      assert.match(error.message, /"a", "b"/);
      return true;
    });
    await assert.rejects(db.fetchValue(sql, [], { column: 2 }), RangeError);
    await assert.rejects(db.fetchValue(sql, [], { column: -1 }), RangeError);
  });
});

// ---------------------------------------------------------------------------------------
// fetchAsModel / fetchAllAsModel
// ---------------------------------------------------------------------------------------

interface Person {
  id: number;
  name: string;
  shout: string;
}

/** A hand-written Standard Schema validator that converts rows (asynchronously). */
const personModel: StandardSchemaV1<unknown, Person> = {
  "~standard": {
    version: 1,
    vendor: "test",
    validate(value: unknown) {
      const row = value as Record<string, unknown>;
      const issues: { message: string; path: PropertyKey[] }[] = [];
      if (typeof row?.id !== "number") {
        issues.push({ message: "id must be a number", path: ["id"] });
      }
      if (typeof row?.name !== "string") {
        issues.push({ message: "name must be a string", path: ["name"] });
      }
      if (issues.length > 0) return { issues };
      const id = row.id as number;
      const name = row.name as string;
      return Promise.resolve({ value: { id, name, shout: name.toUpperCase() + "!" } });
    },
  },
};

serverTest(
  "DatabaseManager.fetchAsModel() returns the row converted by the validator",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.people}} (id int, name text)");
      await db.execute("INSERT INTO {{tables.people}} VALUES (1, 'ann'), (2, 'bob')");
      const person = await db.fetchAsModel(
        personModel,
        "SELECT id, name FROM {{tables.people}} WHERE id = $1",
        [2],
      );
      assert.deepEqual(person, { id: 2, name: "bob", shout: "BOB!" });
      assert.equal(
        await db.fetchAsModel(personModel, "SELECT id, name FROM {{tables.people}} WHERE id = 9"),
        null,
      );
    });
  },
);

serverTest("DatabaseManager.fetchAllAsModel() converts every row", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.people}} (id int, name text)");
    await db.execute("INSERT INTO {{tables.people}} VALUES (1, 'ann'), (2, 'bob')");
    const people = await db.fetchAllAsModel(
      personModel,
      "SELECT id, name FROM {{tables.people}} ORDER BY id",
    );
    assert.deepEqual(people, [
      { id: 1, name: "ann", shout: "ANN!" },
      { id: 2, name: "bob", shout: "BOB!" },
    ]);
    assert.deepEqual(
      await db.fetchAllAsModel(personModel, "SELECT id, name FROM {{tables.people}} WHERE false"),
      [],
    );
  });
});

serverTest(
  "DatabaseManager.fetchAsModel() throws ValidationError with the issues when a row fails",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.people}} (id int, name text)");
      await db.execute("INSERT INTO {{tables.people}} VALUES (1, 'ann'), (2, NULL)");
      await assert.rejects(
        db.fetchAsModel(personModel, "SELECT id::text AS id, name FROM {{tables.people}} LIMIT 1"),
        (error: unknown) => {
          assert.ok(error instanceof ValidationError);
          assert.equal(error.code, "VALIDATION_ERROR");
          assert.deepEqual(error.issues, [{ message: "id must be a number", path: ["id"] }]);
          assert.match(error.message, /id must be a number/);
          return true;
        },
      );
      await assert.rejects(
        db.fetchAllAsModel(personModel, "SELECT id, name FROM {{tables.people}} ORDER BY id"),
        (error: unknown) => {
          assert.ok(error instanceof ValidationError);
          assert.deepEqual(error.issues, [{ message: "name must be a string", path: ["name"] }]);
          assert.match(error.message, /row 1\b/);
          return true;
        },
      );
    });
  },
);

// ---------------------------------------------------------------------------------------
// copyRecordsToTable
// ---------------------------------------------------------------------------------------

serverTest("DatabaseManager.copyRecordsToTable() copies an array of records", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int, name text, ok bool)");
    const copied = await db.copyRecordsToTable("items", [
      [1, "a", true],
      [2, "b", false],
      [3, null, null],
    ]);
    assert.equal(copied, 3);
    assert.deepEqual(await db.fetchAll("SELECT * FROM {{tables.items}} ORDER BY id"), [
      { id: 1, name: "a", ok: true },
      { id: 2, name: "b", ok: false },
      { id: 3, name: null, ok: null },
    ]);
  });
});

serverTest(
  "DatabaseManager.copyRecordsToTable() copies from a sync iterable and an async generator",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int, name text)");
      function* sync(): Generator<[number, string]> {
        for (let i = 1; i <= 1000; i++) yield [i, `s${i}`];
      }
      await db.copyRecordsToTable("items", sync());
      assert.equal(await countRows(db, "items"), 1000);
      const set = new Set<readonly unknown[]>([[5001, "set-a"], [5002, "set-b"]]);
      await db.copyRecordsToTable("items", set);
      assert.equal(await countRows(db, "items"), 1002);
      async function* slow(): AsyncGenerator<[number, string]> {
        for (let i = 10_001; i <= 13_000; i++) {
          if (i % 1000 === 0) await tick(1);
          yield [i, `a${i}`];
        }
      }
      assert.equal(await db.copyRecordsToTable("items", slow()), 3000);
      const summary = await db.fetchOne(
        "SELECT count(*)::int AS n, min(id) AS lo, max(id) AS hi, " +
          "count(*) FILTER (WHERE name = 'a' || id)::int AS async_ok FROM {{tables.items}}",
      );
      assert.deepEqual(summary, { n: 4002, lo: 1, hi: 13_000, async_ok: 3000 });
    });
  },
);

serverTest("DatabaseManager.copyRecordsToTable() fills only the given columns", async () => {
  await withManager(async (db) => {
    await db.execute(
      "CREATE TABLE {{tables.items}} (id serial PRIMARY KEY, name text, qty int DEFAULT 7, note text)",
    );
    await db.copyRecordsToTable("items", [["x", "n1"], ["y", null]], {
      columns: ["name", "note"],
    });
    assert.deepEqual(await db.fetchAll("SELECT * FROM {{tables.items}} ORDER BY id"), [
      { id: 1, name: "x", qty: 7, note: "n1" },
      { id: 2, name: "y", qty: 7, note: null },
    ]);
  });
});

serverTest("DatabaseManager.copyRecordsToTable() round-trips awkward values exactly", async () => {
  await withManager(async (db) => {
    await db.execute(
      "CREATE TABLE {{tables.awkward}} " +
        "(n int, t text, b bytea, j jsonb, ia int4[], ta text[], ts timestamptz)",
    );
    const when = new Date("2024-02-29T23:59:58.123Z");
    const records: unknown[][] = [
      [
        1,
        "tab\there",
        new Uint8Array([0x00, 0xff, 0x5c, 0x0a, 0x09, 0x00]),
        { s: 'x\ty\n\\z"q', u: "☃", nested: { list: [1, null, "a"] }, nul: null },
        [1, null, 3],
        ["a", null, "NULL", "b,c", 'q"uote', "back\\slash", "", "tab\tin", "{braces}", " sp "],
        when,
      ],
      [2, "new\nline\r\nand cr\r", new Uint8Array([]), null, [], [], null],
      [3, "back\\slash \\t \\\\ end\\", null, { k: "\\N" }, null, null, null],
      [4, "\\N", null, null, [null], [null], null],
      [5, null, null, null, null, null, null],
      [
        6,
        "unicode ☃ 日本語 🎉 é",
        new Uint8Array([0xff, 0xfe, 0xfd]),
        { "ключ": "значение" },
        [
          -2147483648,
          2147483647,
        ],
        ["🎉", "日本"],
        null,
      ],
      [7, "", new Uint8Array([0x00]), {}, null, [""], null],
    ];
    await db.copyRecordsToTable("awkward", records);
    const rows = await db.fetchAll<Record<string, unknown>>(
      "SELECT n, t, b, j, ia, ta, ts FROM {{tables.awkward}} ORDER BY n",
    );
    assert.equal(rows.length, records.length);
    const keys = ["n", "t", "b", "j", "ia", "ta", "ts"];
    for (let i = 0; i < records.length; i++) {
      for (let k = 0; k < keys.length; k++) {
        assert.deepEqual(
          rows[i][keys[k]],
          records[i][k],
          `row ${i + 1} column ${keys[k]}`,
        );
      }
    }
    // The literal string "\N" is text, not NULL; the empty string is not NULL either.
    assert.equal(
      await db.fetchValue("SELECT count(*)::int FROM {{tables.awkward}} WHERE t IS NULL"),
      1,
    );
    assert.equal(await db.fetchValue("SELECT t FROM {{tables.awkward}} WHERE n = 4"), "\\N");
    assert.equal(await db.fetchValue("SELECT length(b) FROM {{tables.awkward}} WHERE n = 1"), 6);
  });
});

serverTest(
  "DatabaseManager.copyRecordsToTable() copies plain rows and awkward ones mixed in the same chunks exactly",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.mixed}} (id int, t text, f float8, big int8)");
      // Plain rows take the encoder's one-pass line; each awkward value sends its row through
      // the general one, and the two kinds alternate inside every chunk.
      const awkward: unknown[] = [
        "tab\there",
        "new\nline",
        "cr\r",
        "back\\slash",
        "\\N",
        "",
        null,
        undefined,
        "\b\f\v",
        "☃ 日本語 🎉 e\u0301",
        "trailing\\",
      ];
      const floats = [0.1, -0, 1e21, -1.5e-300, NaN, Infinity, -Infinity, 2 ** 53 + 2];
      const records: unknown[][] = Array.from({ length: 6000 }, (_, i) => [
        i,
        i % 7 === 3 ? awkward[(i >> 3) % awkward.length] : `plain ${i} 🎉`,
        i % 5 === 1 ? floats[(i >> 2) % floats.length] : i / 8,
        i % 11 === 0 ? 9_007_199_254_740_991 - i : i % 13 === 0 ? null : -i,
      ]);
      assert.equal(await db.copyRecordsToTable("mixed", records), records.length);
      const rows = await db.fetchAll<{ id: number; t: string | null; f: number; big: string }>(
        "SELECT id, t, f, big::text AS big FROM {{tables.mixed}} ORDER BY id",
      );
      assert.equal(rows.length, records.length);
      for (const [i, [id, t, f, big]] of records.entries()) {
        assert.deepEqual(
          rows[i],
          { id, t: t ?? null, f: Object.is(f, -0) ? 0 : f, big: big === null ? null : String(big) },
          `row ${i}`,
        );
      }
    });
  },
);

serverTest(
  "DatabaseManager.copyRecordsToTable() refuses an array of arrays holding a non-array and copies nothing",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int, body text)");
      const records: unknown[] = Array.from({ length: 5000 }, (_, i) => [i, "x".repeat(50)]);
      records[4000] = { id: 4000, body: "object" };
      await assert.rejects(
        db.copyRecordsToTable("items", records as unknown[][]),
        (error: unknown) =>
          error instanceof RangeError && /record 4000\b.*not both/.test(error.message),
      );
      assert.equal(await countRows(db, "items"), 0);
    });
  },
);

serverTest(
  "DatabaseManager.copyRecordsToTable() throws RangeError for a record of the wrong length and copies nothing",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int, body text)");
      const body = "x".repeat(100);
      // Enough good rows that several chunks are on the wire before the bad record.
      function* records(): Generator<unknown[]> {
        for (let i = 1; i <= 3000; i++) yield [i, body];
        yield [3001];
        yield [3002, body];
      }
      await assert.rejects(db.copyRecordsToTable("items", records()), (error: unknown) => {
        assert.ok(error instanceof RangeError, `expected RangeError, got ${error}`);
        assert.match(error.message, /3001/);
        return true;
      });
      await assert.rejects(
        db.copyRecordsToTable("items", [[1, "a"], [2, "b", "extra"]]),
        RangeError,
      );
      assert.equal(await countRows(db, "items"), 0);
      // The pool is still healthy after the aborted COPY.
      await db.copyRecordsToTable("items", [[1, "ok"]]);
      assert.equal(await countRows(db, "items"), 1);
    });
  },
);

serverTest(
  "DatabaseManager.copyRecordsToTable() returns the number of rows copied",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int, name text)");
      assert.equal(await db.copyRecordsToTable("items", [[1, "a"], [2, "b"], [3, null]]), 3);
      async function* many(): AsyncGenerator<[number, string]> {
        for (let i = 0; i < 5000; i++) yield [i, "x".repeat(50)];
      }
      assert.equal(await db.copyRecordsToTable("items", many()), 5000);
      assert.equal(await db.copyRecordsToTable("items", []), 0);
      assert.equal(await countRows(db, "items"), 5003);
    });
  },
);

serverTest(
  "DatabaseManager.copyRecordsToTable() rejects with QueryError when the server refuses a value",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY, body text)");
      const body = "y".repeat(100);
      function* records(bad: unknown[]): Generator<unknown[]> {
        for (let i = 1; i <= 2000; i++) yield [i, body];
        yield bad;
      }
      // A value the server cannot parse, after several chunks were sent.
      await assert.rejects(
        db.copyRecordsToTable("items", records(["not-an-int", body])),
        (error: unknown) => error instanceof QueryError && error.sqlstate === "22P02",
      );
      // A constraint violated by the last row.
      await assert.rejects(
        db.copyRecordsToTable("items", records([1, "duplicate"])),
        (error: unknown) => {
          assert.ok(error instanceof QueryError);
          assert.equal(error.sqlstate, "23505");
          assert.match(error.sql, /^COPY "[^"]+"\.items/);
          return true;
        },
      );
      // A table that does not exist.
      await assert.rejects(
        db.copyRecordsToTable("missing", [[1]]),
        (error: unknown) => error instanceof QueryError && error.sqlstate === "42P01",
      );
      assert.equal(await countRows(db, "items"), 0);
      assert.equal(await db.copyRecordsToTable("items", [[1, "ok"]]), 1);
      assert.equal(await countRows(db, "items"), 1);
    });
  },
);

serverTest(
  "DatabaseManager.copyRecordsToTable() throws SchemaError for an invalid table or column",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      for (const table of ['items"; DROP TABLE x; --', "items;drop", "a.b", "", "has space"]) {
        await assert.rejects(db.copyRecordsToTable(table, [[1]]), SchemaError, table);
      }
      await assert.rejects(
        db.copyRecordsToTable("items", [[1]], { columns: ['id"); DROP'] }),
        SchemaError,
      );
      assert.equal(await countRows(db, "items"), 0);
    });
  },
);

// ---------------------------------------------------------------------------------------
// tableExists / prepareQuery / addPreparedStatement
// ---------------------------------------------------------------------------------------

serverTest("DatabaseManager.tableExists() accepts name and schema.name", async () => {
  await withManager(async (db, pool) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    const schema = db.schema!;
    assert.equal(await db.tableExists("items"), true);
    assert.equal(await db.tableExists(`${schema}.items`), true);
    assert.equal(await db.tableExists("missing"), false);
    assert.equal(await db.tableExists(`${schema}.missing`), false);
    assert.equal(await db.tableExists("no_such_schema_x.items"), false);

    const other = new DatabaseManager({ pool, schema: uniqueName("other") });
    assert.equal(await other.tableExists("items"), false);
    assert.equal(await other.tableExists(`${schema}.items`), true);
  });
});

serverTest("DatabaseManager.prepareQuery() returns the expanded SQL", async () => {
  await withManager((db, pool) => {
    const s = db.schema!;
    assert.equal(
      db.prepareQuery("SELECT * FROM {{tables.users}} JOIN {{tables.other.t}} ON true"),
      `SELECT * FROM "${s}".users JOIN "other".t ON true`,
    );
    assert.equal(db.prepareQuery("SET search_path TO {{schema}}"), `SET search_path TO "${s}"`);
    const bare = new DatabaseManager({ pool });
    assert.equal(bare.prepareQuery("SELECT * FROM {{tables.users}}"), "SELECT * FROM users");
    assert.throws(() => db.prepareQuery("SELECT * FROM {{tables.a b}}"), SchemaError);
    return Promise.resolve();
  });
});

serverTest(
  "DatabaseManager.addPreparedStatement() prepares on current and future connections",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      await db.execute("INSERT INTO {{tables.items}} VALUES (1), (2), (3)");
      assert.equal(db.getPoolStats().size, 2);
      await db.addPreparedStatement(
        "count_above",
        "SELECT count(*)::int AS n, pg_backend_pid() AS pid FROM {{tables.items}} WHERE id > $1",
      );
      const holders = 4;
      const arrive = barrier(holders);
      const results = await Promise.all(
        Array.from({ length: holders }, () =>
          db.acquire(async (conn) => {
            await arrive();
            const { rows } = await conn.raw.query("EXECUTE count_above(1)");
            return { pid: conn.pid, row: rows[0] };
          })),
      );
      const pids = new Set(results.map((r) => r.pid));
      assert.equal(pids.size, holders, "each acquire() held a different connection");
      for (const { pid, row } of results) assert.deepEqual(row, { n: 2, pid });
    }, { minConnections: 2, maxConnections: 6, acquireTimeoutMs: 10_000 });
  },
);

serverTest(
  "DatabaseManager.addPreparedStatement() reaches a connection that was leased when it was added",
  async () => {
    await withManager(async (db) => {
      let releaseHolder!: () => void;
      const held = new Promise<void>((resolve) => releaseHolder = resolve);
      let holding!: () => void;
      const isHolding = new Promise<void>((resolve) => holding = resolve);
      const holder = db.acquire(async (conn) => {
        holding();
        await held;
        return conn.pid;
      });
      await isHolding;
      await db.addPreparedStatement("plus_one", "SELECT $1::int + 1 AS v");
      releaseHolder();
      const heldPid = await holder;
      // Hold every connection at once so the formerly leased one is among them.
      const size = db.getPoolStats().size;
      const arrive = barrier(size);
      const results = await Promise.all(
        Array.from({ length: size }, () =>
          db.acquire(async (conn) => {
            await arrive();
            const result = await conn.raw.query("EXECUTE plus_one(41)").then(
              ({ rows }) => rows[0].v,
              (e: unknown) => e,
            );
            return { pid: conn.pid, result };
          })),
      );
      assert.ok(results.some((r) => r.pid === heldPid), "the formerly leased connection is used");
      for (const { pid, result } of results) assert.equal(result, 42, `connection ${pid}`);
    }, { minConnections: 2, maxConnections: 2, acquireTimeoutMs: 10_000 });
  },
);

// ---------------------------------------------------------------------------------------
// Type mapping
// ---------------------------------------------------------------------------------------

serverTest("DatabaseManager.fetchOne() maps PostgreSQL types to JavaScript values", async () => {
  await withManager(async (db) => {
    const row = await db.fetchOne<Record<string, unknown>>(
      `SELECT 9007199254740993::int8 AS big, 12.50::numeric AS num, 42::int4 AS i4,
         7::int2 AS i2, 1.5::float8 AS f8, true AS yes, false AS no,
         '2024-01-02T03:04:05.678Z'::timestamptz AS ts,
         '{"a":[1,2],"b":null}'::json AS js, '{"k":"v","n":1.5}'::jsonb AS jb,
         ARRAY[1,NULL,3]::int4[] AS ia, ARRAY['x',NULL,'y z','NULL','a,b','"q"']::text[] AS ta,
         ARRAY[[1,2],[3,NULL]]::int4[] AS nested, '{}'::int4[] AS empty,
         ARRAY[1,NULL]::int8[] AS bigs, '\\x00ff10'::bytea AS bytes,
         'text'::text AS tx, NULL::int AS nul`,
    );
    assert.ok(row);
    assert.equal(row.big, "9007199254740993");
    assert.equal(row.num, "12.50");
    assert.equal(row.i4, 42);
    assert.equal(row.i2, 7);
    assert.equal(row.f8, 1.5);
    assert.equal(row.yes, true);
    assert.equal(row.no, false);
    assert.ok(row.ts instanceof Date);
    assert.equal(row.ts.getTime(), Date.parse("2024-01-02T03:04:05.678Z"));
    assert.deepEqual(row.js, { a: [1, 2], b: null });
    assert.deepEqual(row.jb, { k: "v", n: 1.5 });
    assert.deepEqual(row.ia, [1, null, 3]);
    assert.deepEqual(row.ta, ["x", null, "y z", "NULL", "a,b", '"q"']);
    assert.deepEqual(row.nested, [[1, 2], [3, null]]);
    assert.deepEqual(row.empty, []);
    assert.deepEqual(row.bigs, ["1", null]);
    assert.ok(row.bytes instanceof Uint8Array);
    assert.deepEqual([...row.bytes], [0x00, 0xff, 0x10]);
    assert.equal(row.tx, "text");
    assert.equal(row.nul, null);
  });
});

serverTest("DatabaseManager.execute() round-trips parameters of every mapped type", async () => {
  await withManager(async (db) => {
    await db.execute(
      `CREATE TABLE {{tables.typed}} (big int8, num numeric, i4 int4, b bool, ts timestamptz,
         js json, jb jsonb, ia int4[], ta text[], by bytea)`,
    );
    const values = {
      big: "9007199254740993",
      num: "12345678901234567890.000000000123",
      i4: 2147483647,
      b: false,
      ts: new Date("2024-05-06T07:08:09.123Z"),
      js: { a: [1, "two"], n: null },
      jb: { nested: { k: "v" }, arr: [1, 2], s: 'quote" back\\' },
      ia: [1, null, 3],
      ta: ["a", null, "b,c", 'q"uote', "NULL", ""],
      by: new Uint8Array([0x00, 0xff, 0x0a, 0x5c, 0x00]),
    };
    const result = await db.execute(
      "INSERT INTO {{tables.typed}} (big, num, i4, b, ts, js, jb, ia, ta, by) " +
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
      Object.values(values),
    );
    assert.deepEqual(result, { command: "INSERT", rowCount: 1 });
    const row = await db.fetchOne("SELECT * FROM {{tables.typed}}");
    assert.deepEqual(row, values);
    // The server stored real values of the declared types, not text.
    const checks = await db.fetchOne(
      `SELECT big = 9007199254740993 AS big, ia[2] IS NULL AS ia_null, ta[2] IS NULL AS ta_null,
         ta[5] = 'NULL' AS ta_text, length(by) AS by_len, jb->'nested'->>'k' AS jb_k,
         ts = '2024-05-06T07:08:09.123Z'::timestamptz AS ts_ok FROM {{tables.typed}}`,
    );
    assert.deepEqual(checks, {
      big: true,
      ia_null: true,
      ta_null: true,
      ta_text: true,
      by_len: 5,
      jb_k: "v",
      ts_ok: true,
    });
    // Parameters bound in a WHERE clause match too.
    assert.equal(
      await db.fetchValue("SELECT count(*)::int FROM {{tables.typed}} WHERE by = $1 AND big = $2", [
        values.by,
        values.big,
      ]),
      1,
    );
  });
});

// ---------------------------------------------------------------------------------------
// Schema isolation
// ---------------------------------------------------------------------------------------

serverTest(
  "DatabaseManager over one shared pool keeps rows of same-named tables apart per schema",
  async () => {
    const pool = await createSharedPool({ connectionString: TEST_URL });
    const users = new DatabaseManager({ pool, schema: uniqueName("users") });
    const orders = new DatabaseManager({ pool, schema: uniqueName("orders") });
    try {
      await users.ensureSchema();
      await orders.ensureSchema();
      const ddl = "CREATE TABLE {{tables.items}} (id int, owner text)";
      await users.execute(ddl);
      await orders.execute(ddl);
      await users.execute("INSERT INTO {{tables.items}} VALUES (1, 'users'), (2, 'users')");
      await orders.executeMany("INSERT INTO {{tables.items}} VALUES ($1, $2)", [[10, "orders"]]);
      await orders.copyRecordsToTable("items", [[11, "orders"]]);

      assert.deepEqual(
        await users.fetchAll("SELECT id, owner FROM {{tables.items}} ORDER BY id"),
        [{ id: 1, owner: "users" }, { id: 2, owner: "users" }],
      );
      assert.deepEqual(
        await orders.fetchAll("SELECT id, owner FROM {{tables.items}} ORDER BY id"),
        [{ id: 10, owner: "orders" }, { id: 11, owner: "orders" }],
      );
      // Seen from outside: each table lives in its own schema.
      const outside = await observe((sql) =>
        sql.unsafe(
          `SELECT (SELECT count(*)::int FROM "${users.schema}".items) AS u,
                  (SELECT count(*)::int FROM "${orders.schema}".items) AS o`,
        )
      );
      assert.deepEqual([...outside], [{ u: 2, o: 2 }]);
      // Isolation is by template, not by search_path on shared connections.
      const paths = await Promise.all([
        users.fetchValue("SHOW search_path"),
        orders.fetchValue("SHOW search_path"),
      ]);
      for (const path of paths) {
        assert.ok(!String(path).includes(users.schema!), String(path));
        assert.ok(!String(path).includes(orders.schema!), String(path));
      }
      assert.equal(pool.getStats().maxSize, 10);
    } finally {
      try {
        await users.dropSchema({ cascade: true });
        await orders.dropSchema({ cascade: true });
      } finally {
        await pool.close();
      }
    }
  },
);

serverTest("DatabaseManager.withSchema() is cheap and sees its own schema", async () => {
  await withManager(async (db, pool) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    await db.execute("INSERT INTO {{tables.items}} VALUES (1)");
    const before = pool.getStats();
    const name = uniqueName("tenant");
    const tenant = db.withSchema(name);
    try {
      assert.equal(tenant.schema, name);
      assert.equal(tenant.pool, db.pool);
      assert.deepEqual(pool.getStats(), before, "withSchema() opens nothing");
      assert.equal(tenant.prepareQuery("{{tables.items}}"), `"${name}".items`);
      assert.equal(await tenant.tableExists("items"), false);
      await tenant.ensureSchema();
      await tenant.execute("CREATE TABLE {{tables.items}} (id int)");
      await tenant.execute("INSERT INTO {{tables.items}} VALUES (7), (8)");
      assert.deepEqual(
        (await tenant.fetchAll<{ id: number }>("SELECT id FROM {{tables.items}} ORDER BY id"))
          .map((r) => r.id),
        [7, 8],
      );
      assert.equal(await countRows(db, "items"), 1);
      assert.equal(tenant.getPoolStats().schema, name);
      // A view does not own the pool: close() leaves it open.
      await tenant.close();
      assert.equal(pool.closed, false);
      assert.equal(await db.fetchValue("SELECT 1"), 1);
    } finally {
      await tenant.dropSchema({ cascade: true });
    }
  });
});

serverTest(
  "DatabaseManager.onPrimary() without replicas reads and writes like its manager and opens nothing",
  async () => {
    await withManager(async (db, pool) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      await db.execute("INSERT INTO {{tables.items}} VALUES (1)");
      const before = pool.getStats();
      const primary = db.onPrimary();
      assert.equal(primary.schema, db.schema);
      assert.equal(primary.pool, pool);
      assert.deepEqual(pool.getStats(), before, "onPrimary() opens nothing");
      assert.equal(primary.prepareQuery("{{tables.items}}"), db.prepareQuery("{{tables.items}}"));
      await primary.execute("INSERT INTO {{tables.items}} VALUES (2)");
      assert.deepEqual(
        (await primary.fetchAll<{ id: number }>("SELECT id FROM {{tables.items}} ORDER BY id"))
          .map((r) => r.id),
        [1, 2],
      );
      assert.equal(await primary.fetchValue("SELECT pg_is_in_recovery()"), false);
      assert.equal(
        await primary.transaction((tx) =>
          tx.fetchValue("SELECT count(*)::int FROM {{tables.items}}")
        ),
        2,
      );
      assert.equal(primary.onPrimary().schema, db.schema);
      // A view does not own the pool: close() leaves it open.
      await primary.close();
      assert.equal(pool.closed, false);
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 2);
    });
  },
);

serverTest("DatabaseManager templates {{tables.other.t}} reach another schema", async () => {
  await withManager(async (db) => {
    const otherName = uniqueName("other");
    const other = db.withSchema(otherName);
    try {
      await other.ensureSchema();
      await other.execute("CREATE TABLE {{tables.t}} (v text)");
      await other.execute("INSERT INTO {{tables.t}} VALUES ('from other')");
      assert.deepEqual(await db.fetchAll(`SELECT v FROM {{tables.${otherName}.t}}`), [
        { v: "from other" },
      ]);
      await db.execute(`INSERT INTO {{tables.${otherName}.t}} VALUES ($1)`, ["from db"]);
      assert.equal(await countRows(other, "t"), 2);
      assert.equal(await db.tableExists("t"), false);
    } finally {
      await other.dropSchema({ cascade: true });
    }
  });
});

serverTest(
  "DatabaseManager.ensureSchema() is idempotent and safe to call concurrently",
  async () => {
    await withManager(async (db) => {
      const name = uniqueName("ens");
      const m = db.withSchema(name);
      try {
        assert.equal(await schemaExists(name), false);
        await Promise.all(Array.from({ length: 8 }, () => m.ensureSchema()));
        assert.equal(await schemaExists(name), true);
        await m.ensureSchema();
        await m.execute("CREATE TABLE {{tables.kept}} (id int)");
        await m.ensureSchema();
        assert.equal(await m.tableExists("kept"), true, "a second ensureSchema() drops nothing");
      } finally {
        await m.dropSchema({ cascade: true });
      }
      assert.equal(await schemaExists(name), false);
    }, { maxConnections: 8 });
  },
);

serverTest("DatabaseManager.dropSchema() needs cascade for a schema with tables", async () => {
  await withManager(async (db) => {
    const name = uniqueName("drop");
    const m = db.withSchema(name);
    try {
      await m.ensureSchema();
      await m.execute("CREATE TABLE {{tables.t}} (id int)");
      await assert.rejects(m.dropSchema(), (error: unknown) => {
        assert.ok(error instanceof QueryError);
        assert.equal(error.sqlstate, "2BP01");
        return true;
      });
      assert.equal(await schemaExists(name), true);
      await m.dropSchema({ cascade: true });
      assert.equal(await schemaExists(name), false);
      await m.dropSchema({ cascade: true }); // already gone: no error
      await m.ensureSchema();
      await m.dropSchema();
      assert.equal(await schemaExists(name), false);
    } finally {
      await dropSchemaOutside(name);
    }
  });
});

serverTest(
  "DatabaseManager.dropSchema() throws ConfigurationError on a manager with no schema",
  async () => {
    await withManager(async (_db, pool) => {
      const bare = new DatabaseManager({ pool });
      assert.equal(bare.schema, undefined);
      await assert.rejects(bare.dropSchema({ cascade: true }), (error: unknown) => {
        assert.ok(error instanceof ConfigurationError);
        assert.equal(error.field, "schema");
        return true;
      });
      assert.equal(await schemaExists("public"), true);
    });
  },
);

// ---------------------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------------------

serverTest("DatabaseManager.transaction() commits and returns the callback's value", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    const value = await db.transaction(async (tx) => {
      await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
      await tx.execute("INSERT INTO {{tables.items}} VALUES ($1)", [2]);
      return { inside: await tx.fetchValue<number>("SELECT count(*)::int FROM {{tables.items}}") };
    });
    assert.deepEqual(value, { inside: 2 });
    const outside = await observe((sql) =>
      sql.unsafe(`SELECT count(*)::int AS n FROM "${db.schema}".items`)
    );
    assert.equal(outside[0].n, 2);
  });
});

serverTest(
  "DatabaseManager.transaction() rolls back and rethrows when the callback throws",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      const boom = new Error("boom");
      const thrown = await db.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} VALUES (1), (2)");
        await tx.executeMany("INSERT INTO {{tables.items}} VALUES ($1)", [[3], [4]]);
        throw boom;
      }).then(() => undefined, (e: unknown) => e);
      assert.equal(thrown, boom, "the very same error is rethrown");
      assert.equal(await countRows(db, "items"), 0);
      // A server error inside the callback also rolls back and propagates as QueryError.
      await assert.rejects(
        db.transaction(async (tx) => {
          await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
          await tx.execute("INSERT INTO {{tables.items}} VALUES ('not a number')");
        }),
        (error: unknown) => error instanceof QueryError && error.sqlstate === "22P02",
      );
      assert.equal(await countRows(db, "items"), 0);
    });
  },
);

serverTest(
  "Transaction.transaction() rolls back a failed savepoint alone while the outer transaction commits",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY)");
      await db.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
        const kept = await tx.transaction(async (sp) => {
          await sp.execute("INSERT INTO {{tables.items}} VALUES (2)");
          return "kept";
        });
        assert.equal(kept, "kept");
        await assert.rejects(
          tx.transaction(async (sp) => {
            await sp.execute("INSERT INTO {{tables.items}} VALUES (3)");
            await sp.transaction(async (deeper) => {
              await deeper.execute("INSERT INTO {{tables.items}} VALUES (4)");
            });
            await sp.execute("INSERT INTO {{tables.items}} VALUES (1)"); // duplicate key
          }),
          (error: unknown) => error instanceof QueryError && error.sqlstate === "23505",
        );
        // The outer transaction goes on after the savepoint was rolled back.
        await tx.execute("INSERT INTO {{tables.items}} VALUES (5)");
      });
      const ids = await db.fetchAll<{ id: number }>("SELECT id FROM {{tables.items}} ORDER BY id");
      assert.deepEqual(ids.map((r) => r.id), [1, 2, 5]);
    });
  },
);

serverTest(
  "DatabaseManager.transaction() throws QueryError 25P02 when an error was caught inside and nothing is saved",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY)");
      const error = await db.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
        try {
          await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
        } catch {
          // swallowed on purpose: the transaction is now aborted on the server
        }
        return "finished";
      }).then(() => undefined, (e: unknown) => e);
      assert.ok(error instanceof QueryError, `expected QueryError, got ${error}`);
      assert.equal(error.sqlstate, "25P02");
      assert.equal(await countRows(db, "items"), 0);
      // The connection is usable afterwards (no transaction left open).
      await db.transaction((tx) => tx.execute("INSERT INTO {{tables.items}} VALUES (2)"));
      assert.equal(await countRows(db, "items"), 1);
    });
  },
);

serverTest("Transaction used after its callback returned throws PoolError", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    let saved:
      | { execute(sql: string): Promise<unknown>; fetchValue(sql: string): Promise<unknown> }
      | undefined;
    await db.transaction(async (tx) => {
      saved = tx;
      await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
    });
    assert.ok(saved);
    await assert.rejects(saved.execute("INSERT INTO {{tables.items}} VALUES (2)"), PoolError);
    await assert.rejects(saved.fetchValue("SELECT 1"), PoolError);
    assert.equal(await countRows(db, "items"), 1);
  });
});

serverTest(
  "Transaction.executeMany() runs inside the transaction and a failed batch is undone alone",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY)");
      await db.transaction(async (tx) => {
        const n = await tx.executeMany("INSERT INTO {{tables.items}} VALUES ($1)", [[1], [2], [3]]);
        assert.equal(n, 3);
        assert.equal(await tx.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 3);
        await assert.rejects(
          tx.executeMany("INSERT INTO {{tables.items}} VALUES ($1)", [[10], [1], [11]]),
          (error: unknown) => error instanceof QueryError && error.sqlstate === "23505",
        );
        await tx.execute("INSERT INTO {{tables.items}} VALUES (4)");
        // Not visible outside before COMMIT.
        assert.equal(await countRows(db, "items"), 0);
      });
      const ids = await db.fetchAll<{ id: number }>("SELECT id FROM {{tables.items}} ORDER BY id");
      assert.deepEqual(ids.map((r) => r.id), [1, 2, 3, 4]);

      await db.transaction(async (tx) => {
        await tx.executeMany("INSERT INTO {{tables.items}} VALUES ($1)", [[20], [21]]);
        throw new Error("undo");
      }).catch(() => {});
      assert.equal(await countRows(db, "items"), 4);
    });
  },
);

serverTest(
  "DatabaseManager.transaction() runs on one connection while autocommit queries run beside it",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      const { txPids, outsidePid, outsideCount } = await db.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} VALUES (1)");
        const txPids = await Promise.all(
          Array.from({ length: 6 }, () => tx.fetchValue<number>("SELECT pg_backend_pid()")),
        );
        txPids.push((await tx.fetchValue<number>("SELECT pg_backend_pid()"))!);
        const [outsidePid, outsideCount] = await Promise.all([
          db.fetchValue<number>("SELECT pg_backend_pid()"),
          countRows(db, "items"),
        ]);
        return { txPids, outsidePid, outsideCount };
      });
      assert.equal(new Set(txPids).size, 1, `one pid inside the transaction: ${txPids}`);
      assert.notEqual(outsidePid, txPids[0]);
      assert.equal(outsideCount, 0, "the uncommitted row is invisible outside");
      assert.equal(await countRows(db, "items"), 1);
    });
  },
);

// ---------------------------------------------------------------------------------------
// acquire()
// ---------------------------------------------------------------------------------------

serverTest("DatabaseManager.acquire() gives one dedicated connection", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    await db.acquire(async (conn) => {
      const pids = [];
      for (let i = 0; i < 5; i++) {
        pids.push(await conn.fetchValue<number>("SELECT pg_backend_pid()"));
      }
      assert.deepEqual(new Set(pids), new Set([conn.pid]));
      assert.equal(conn.raw.pid, conn.pid);
      // Session state stays with the connection for the whole callback.
      await conn.execute("SET application_name = 'pgdbm_acquire_test'");
      assert.equal(await conn.fetchValue("SHOW application_name"), "pgdbm_acquire_test");
      await conn.execute("RESET application_name");
      // raw runs SQL exactly as given: no template expansion.
      const raw = await conn.raw.query("SELECT '{{tables.items}}'::text AS s, $1::int AS v", [5]);
      assert.deepEqual(raw.rows, [{ s: "{{tables.items}}", v: 5 }]);
      assert.equal(raw.command, "SELECT");
      await conn.raw.query(`INSERT INTO "${db.schema}".items VALUES ($1)`, [9]);
      // conn.transaction() runs on this same connection.
      const txPid = await conn.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} VALUES (10)");
        return await tx.fetchValue<number>("SELECT pg_backend_pid()");
      });
      assert.equal(txPid, conn.pid);
    });
    assert.equal(await countRows(db, "items"), 2);
  });
});

serverTest(
  "DatabaseManager.acquire() rolls back a BEGIN left open when the callback returns",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      for (const begin of ["BEGIN", "start transaction isolation level serializable"]) {
        const pid = await db.acquire(async (conn) => {
          await conn.raw.query(begin);
          await conn.execute("INSERT INTO {{tables.items}} VALUES (1)");
          return conn.pid;
        });
        const state = await observe((sql) =>
          sql`SELECT count(*)::int AS open FROM pg_stat_activity
              WHERE state = 'idle in transaction' AND pid = ${pid}`
        );
        assert.equal(state[0].open, 0, `${begin}: no open transaction on pid ${pid}`);
        assert.equal(await countRows(db, "items"), 0, `${begin}: the insert was rolled back`);
        // The next user of that connection runs in autocommit.
        await db.acquire(async (conn) => {
          await conn.execute("INSERT INTO {{tables.items}} VALUES (2)");
        });
        assert.equal(await countRows(db, "items"), 1);
        await db.execute("DELETE FROM {{tables.items}}");
      }
      // Through the query methods too, and with an error after the BEGIN.
      const pid = await db.acquire(async (conn) => {
        await conn.execute("BEGIN");
        await conn.execute("INSERT INTO {{tables.items}} VALUES (3)");
        await conn.execute("SELECT 1/0").catch(() => {});
        return conn.pid;
      });
      const state = await observe((sql) =>
        sql`SELECT state FROM pg_stat_activity WHERE pid = ${pid}`
      );
      assert.notEqual(state[0]?.state, "idle in transaction (aborted)");
      assert.notEqual(state[0]?.state, "idle in transaction");
      assert.equal(await countRows(db, "items"), 0);
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest(
  "DatabaseManager.acquire() rolls back a transaction opened after a comment or another statement",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      for (const begin of ["/* open */ BEGIN", "-- open\nBEGIN", "SELECT 1; BEGIN"]) {
        const pid = await db.acquire(async (conn) => {
          await conn.raw.query(begin);
          await conn.raw.query(`INSERT INTO "${db.schema}".items VALUES (1)`);
          return conn.pid;
        });
        const state = await observe((sql) =>
          sql`SELECT count(*)::int AS open FROM pg_stat_activity
              WHERE state LIKE 'idle in transaction%' AND pid = ${pid}`
        );
        if (state[0].open !== 0) {
          // Clean up the leak (the pool has one connection, so this is the same one).
          await db.acquire((conn) => conn.raw.query("ROLLBACK"));
        }
        assert.equal(state[0].open, 0, `${JSON.stringify(begin)} left pid ${pid} in a transaction`);
        assert.equal(await countRows(db, "items"), 0);
      }
    }, { minConnections: 1, maxConnections: 1 });
  },
);

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

serverTest(
  "QueryError from DatabaseManager keeps sqlstate, detail, constraint and the expanded SQL",
  async () => {
    await withManager(async (db) => {
      await db.execute(
        "CREATE TABLE {{tables.items}} (id int, code text, CONSTRAINT items_code_key UNIQUE (code))",
      );
      await db.execute("INSERT INTO {{tables.items}} VALUES (1, 'dup')");
      const sql = "INSERT INTO {{tables.items}} VALUES ($1, $2)";
      const error = await db.execute(sql, [2, "dup"]).then(() => undefined, (e: unknown) => e);
      assert.ok(error instanceof QueryError, `expected QueryError, got ${error}`);
      assert.equal(error.code, "QUERY_ERROR");
      assert.equal(error.name, "QueryError");
      assert.equal(error.sqlstate, "23505");
      assert.equal(error.constraint, "items_code_key");
      assert.equal(error.table, "items");
      assert.equal(error.schemaName, db.schema);
      assert.match(error.detail ?? "", /Key \(code\)=\(<string>\) already exists/);
      assert.equal(error.sql, db.prepareQuery(sql));
      assert.equal(error.sql, `INSERT INTO "${db.schema}".items VALUES ($1, $2)`);
      assert.deepEqual(error.params, ["<number>", "<string>"]);
      assert.ok(error.cause !== undefined, "the driver's error is kept as cause");
    });
  },
);

serverTest("QueryError from DatabaseManager keeps position and hint", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    const bad = "SELECT * FROM {{tables.items}} WHER id = 1";
    const syntax = await db.fetchAll(bad).then(() => undefined, (e: unknown) => e);
    assert.ok(syntax instanceof QueryError);
    assert.equal(syntax.sqlstate, "42601");
    assert.equal(syntax.sql, db.prepareQuery(bad));
    assert.equal(typeof syntax.position, "number");
    assert.equal(
      syntax.sql.slice(syntax.position! - 1, syntax.position! + 1),
      "id",
      `position ${syntax.position} points at the offending token of the expanded SQL`,
    );

    const hinted = await db.fetchValue("SELECT lower(42)").then(() => undefined, (e: unknown) => e);
    assert.ok(hinted instanceof QueryError);
    assert.equal(hinted.sqlstate, "42883");
    assert.match(hinted.hint ?? "", /explicit type casts/);
  });
});

serverTest("QueryError from DatabaseManager never shows parameter values", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.users}} (id int, password text)");
    const secret = "hunter2-secret";
    const failures: unknown[] = [];
    failures.push(
      await db.fetchAll("SELECT * FROM {{tables.users}} WHERE nonexistent = $1", [secret]).then(
        () => undefined,
        (e: unknown) => e,
      ),
    );
    failures.push(
      await db.executeMany("INSERT INTO {{tables.users}} (id, password) VALUES ($1, $2)", [
        [1, secret],
        ["not-an-int", secret],
      ]).then(() => undefined, (e: unknown) => e),
    );
    failures.push(
      await db.transaction((tx) =>
        tx.execute("INSERT INTO {{tables.users}} (id, password) VALUES ($2, $1)", [secret])
      ).then(() => undefined, (e: unknown) => e),
    );
    for (const error of failures) {
      assert.ok(error instanceof QueryError, `expected QueryError, got ${error}`);
      assert.ok(error.params.length > 0);
      assert.ok(!error.params.includes(secret), `params: ${error.params}`);
      for (const param of error.params) assert.match(param, /^(<\w+(:\d+)?>|null)$/);
      const views = {
        message: error.message,
        stack: error.stack ?? "",
        sql: error.sql,
        json: JSON.stringify(error),
        string: String(error),
        inspect: Deno.inspect(error),
        inspectDeep: Deno.inspect(error, { depth: 10 }),
      };
      for (const [view, text] of Object.entries(views)) {
        assert.ok(!text.includes(secret), `${view} shows the parameter value: ${text}`);
      }
    }
    assert.equal(await countRows(db, "users"), 0);
  });
});

// ---------------------------------------------------------------------------------------
// Pattern rules: shared pool vs standalone
// ---------------------------------------------------------------------------------------

serverTest(
  "DatabaseManager constructor throws ConfigurationError for a pool with connection options",
  async () => {
    const pool = await createSharedPool({ connectionString: TEST_URL, minConnections: 1 });
    try {
      for (
        const options of [
          { pool, host: "x" },
          { pool, schema: "app", connectionString: TEST_URL },
          { pool, maxConnections: 3 },
        ]
      ) {
        assert.throws(
          () => new DatabaseManager(options as unknown as { pool: typeof pool }),
          (error: unknown) => {
            assert.ok(error instanceof ConfigurationError);
            assert.equal(error.field, "pool");
            assert.match(error.message, /createSharedPool/);
            assert.match(error.message, /new DatabaseManager\(\{ pool, schema/);
            return true;
          },
        );
      }
      assert.equal(pool.closed, false);
    } finally {
      await pool.close();
    }
  },
);

serverTest(
  "DatabaseManager.connect() on a manager over a shared pool throws PoolError showing the pattern",
  async () => {
    await withManager(async (db) => {
      await assert.rejects(db.connect(), (error: unknown) => {
        assert.ok(error instanceof PoolError);
        assert.equal(error.code, "POOL_ERROR");
        assert.match(error.message, /createSharedPool/);
        assert.match(error.message, /new DatabaseManager\(\{ pool, schema/);
        return true;
      });
      assert.equal(await db.fetchValue("SELECT 1"), 1);
    });
  },
);

serverTest(
  "DatabaseManager.close() on a manager over a shared pool leaves the pool open",
  async () => {
    await withManager(async (db, pool) => {
      await db.close();
      await db[Symbol.asyncDispose]();
      assert.equal(pool.closed, false);
      assert.equal(db.getPoolStats().status, "connected");
      assert.equal(await db.fetchValue("SELECT 2"), 2);
      const sibling = new DatabaseManager({ pool, schema: db.schema });
      await sibling.close();
      assert.equal(await db.fetchValue("SELECT 3"), 3);
    });
  },
);

serverTest(
  "DatabaseManager standalone: connect() creates the schema and await using closes the pool",
  async () => {
    const schema = uniqueName("standalone");
    let closedDb: DatabaseManager | undefined;
    try {
      {
        await using db = new DatabaseManager({
          connectionString: TEST_URL,
          schema,
          minConnections: 1,
          maxConnections: 3,
        });
        closedDb = db;
        await assert.rejects(db.fetchValue("SELECT 1"), (error: unknown) => {
          assert.ok(error instanceof PoolError);
          assert.match(error.message, /connect\(\)/);
          return true;
        });
        await assert.rejects(db.transaction(async () => {}), PoolError);
        await assert.rejects(db.acquire(async () => {}), PoolError);
        assert.throws(() => db.pool, PoolError);
        assert.equal(await schemaExists(schema), false);

        await db.connect();
        await db.connect(); // a second call does nothing
        assert.equal(await schemaExists(schema), true);
        await db.execute("CREATE TABLE {{tables.items}} (id int)");
        assert.equal(await db.tableExists(`${schema}.items`), true);
        assert.equal(db.getPoolStats().status, "connected");
      }
      assert.ok(closedDb);
      assert.equal(closedDb.getPoolStats().status, "closed");
      assert.equal(closedDb.pool.closed, true);
      await assert.rejects(closedDb.fetchValue("SELECT 1"), (error: unknown) => {
        assert.ok(error instanceof PoolError);
        assert.equal(error.code, "POOL_CLOSED");
        return true;
      });
    } finally {
      await dropSchemaOutside(schema);
    }
  },
);

serverTest(
  "DatabaseManager.connect() warns through logger about a second standalone pool to one database",
  async () => {
    const first: string[] = [];
    const second: string[] = [];
    const a = new DatabaseManager({
      connectionString: TEST_URL,
      minConnections: 1,
      logger: { warn: (m: string) => first.push(m) },
    });
    const b = new DatabaseManager({
      connectionString: TEST_URL,
      minConnections: 1,
      logger: { warn: (m: string) => second.push(m) },
    });
    try {
      await a.connect();
      assert.deepEqual(first, [], "the first pool is no reason to warn");
      await b.connect();
      assert.equal(second.length, 1, `warnings: ${JSON.stringify(second)}`);
      assert.match(second[0], /createSharedPool/);
      assert.equal(await b.fetchValue("SELECT 1"), 1, "the second pool still works");
    } finally {
      await a.close();
      await b.close();
    }
    // Once both are closed, a new standalone pool is the only one again.
    const third: string[] = [];
    const c = new DatabaseManager({
      connectionString: TEST_URL,
      minConnections: 1,
      logger: { warn: (m: string) => third.push(m) },
    });
    try {
      await c.connect();
      assert.deepEqual(third, []);
    } finally {
      await c.close();
    }
  },
);

serverTest(
  "DatabaseManager.getPoolStats() reports the pool before connect, while connected and after close",
  async () => {
    const schema = uniqueName("stats");
    const db = new DatabaseManager({
      connectionString: TEST_URL,
      schema,
      minConnections: 1,
      maxConnections: 1,
      acquireTimeoutMs: 10_000,
    });
    try {
      const server = await observe(async (sql) => {
        const [row] =
          await sql`SELECT current_database() AS db, current_setting('server_version') AS v`;
        return { database: row.db as string, version: row.v as string };
      });
      assert.deepEqual(db.getPoolStats(), {
        status: "closed",
        minSize: 1,
        maxSize: 1,
        size: 0,
        idle: 0,
        used: 0,
        waiting: 0,
        queries: 0,
        errors: 0,
        acquireWaitMs: { p50: 0, p99: 0 },
        replicas: [],
        database: server.database,
        schema,
        pid: null,
        version: null,
      });

      await db.connect();
      const connected = db.getPoolStats();
      assert.equal(connected.status, "connected");
      assert.equal(connected.minSize, 1);
      assert.equal(connected.maxSize, 1);
      assert.equal(connected.size, 1);
      assert.equal(connected.idle, 1);
      assert.equal(connected.used, 0);
      assert.equal(connected.waiting, 0);
      assert.equal(connected.database, server.database);
      assert.equal(connected.schema, schema);
      assert.equal(connected.version, server.version);
      assert.equal(typeof connected.pid, "number");
      assert.equal(connected.pid, await db.fetchValue("SELECT pg_backend_pid()"));

      // One connection held, one caller waiting for it.
      let release!: () => void;
      const hold = new Promise<void>((resolve) => release = resolve);
      let entered!: () => void;
      const inside = new Promise<void>((resolve) => entered = resolve);
      const holder = db.acquire(async () => {
        entered();
        await hold;
      });
      await inside;
      const waiter = db.acquire((conn) => conn.fetchValue("SELECT 1"));
      await tick();
      const busy = db.getPoolStats();
      assert.equal(busy.size, 1);
      assert.equal(busy.used, 1);
      assert.equal(busy.idle, 0);
      assert.equal(busy.waiting, 1);
      release();
      await holder;
      assert.equal(await waiter, 1);
      assert.equal(db.getPoolStats().waiting, 0);
      assert.equal(db.getPoolStats().idle, 1);

      await db.dropSchema();
      await db.close();
      const closed = db.getPoolStats();
      assert.equal(closed.status, "closed");
      assert.equal(closed.size, 0);
      assert.equal(closed.database, server.database);
      assert.equal(closed.schema, schema);
    } finally {
      await db.close();
      await dropSchemaOutside(schema);
    }
  },
);

// ---------------------------------------------------------------------------------------
// Template injection
// ---------------------------------------------------------------------------------------

serverTest(
  "DatabaseManager rejects a placeholder with an invalid name and sends nothing",
  async () => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.log}} (id int)");
      await assert.rejects(db.fetchAll("SELECT * FROM {{tables.x;drop}}"), SchemaError);
      for (
        const placeholder of [
          "{{tables.x;drop}}",
          '{{tables.x"y}}',
          "{{tables.a b}}",
          "{{tables.}}",
          "{{tables.a.b.c}}",
          '{{tables.x".y}}',
        ]
      ) {
        await assert.rejects(
          db.execute(`INSERT INTO {{tables.log}} VALUES (1); SELECT * FROM ${placeholder}`),
          SchemaError,
          placeholder,
        );
        await assert.rejects(
          db.transaction((tx) =>
            tx.execute(`INSERT INTO {{tables.log}} VALUES (2); ${placeholder}`)
          ),
          SchemaError,
        );
        await assert.rejects(
          db.executeMany(`INSERT INTO {{tables.log}} SELECT $1 FROM ${placeholder}`, [[3]]),
          SchemaError,
        );
      }
      assert.equal(
        await countRows(db, "log"),
        0,
        "the statement before the bad placeholder never ran",
      );
    });
  },
);

serverTest(
  "DatabaseManager.withSchema() throws SchemaError for an invalid schema name",
  async () => {
    await withManager((db, pool) => {
      for (const name of ['bad"name', "a;b", "a.b", "", " x", "1abc", "x".repeat(64)]) {
        assert.throws(() => db.withSchema(name), SchemaError, JSON.stringify(name));
        assert.throws(() => new DatabaseManager({ pool, schema: name }), SchemaError, name);
      }
      assert.equal(db.withSchema("x".repeat(63)).schema, "x".repeat(63));
      return Promise.resolve();
    });
  },
);
