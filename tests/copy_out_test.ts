/**
 * `copyFromTable()` / `copyFromQuery()`: COPY out as text or CSV bytes, on the server and on
 * PGlite. The output is parsed back here (COPY text and CSV, by their documented rules) and
 * compared with the table read as text; leaving early stops the COPY on the server and the
 * connection serves the next caller; a parameter value never becomes SQL.
 */
import assert from "node:assert/strict";
import { createSharedPool, DatabaseManager, type Pool, QueryError, SchemaError } from "../mod.ts";
import { observe, serverTest, uniqueName, withManager } from "./_support/server.ts";

type Field = string | null;

/** Joins the chunks as UTF-8 text (a chunk may end inside a character). */
async function text(chunks: AsyncIterable<Uint8Array>): Promise<string> {
  const decoder = new TextDecoder();
  let out = "";
  for await (const chunk of chunks) out += decoder.decode(chunk, { stream: true });
  return out + decoder.decode();
}

const ESCAPES: Record<string, string> = {
  b: "\b",
  f: "\f",
  n: "\n",
  r: "\r",
  t: "\t",
  v: "\v",
};

/** Parses COPY text format: one line per row, `\N` for NULL, backslash escapes. */
function parseCopyText(out: string, delimiter = "\t", nullString = "\\N"): Field[][] {
  const lines = out.split("\n");
  assert.equal(lines.pop(), "", "the output ends with a line break");
  return lines.map((line) =>
    line.split(delimiter).map((field) =>
      field === nullString ? null : field.replace(
        /\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.)/g,
        (_, c: string) =>
          c.length > 1 || /[0-7]/.test(c)
            ? String.fromCharCode(c[0] === "x" ? parseInt(c.slice(1), 16) : parseInt(c, 8))
            : ESCAPES[c] ?? c,
      )
    )
  );
}

/** Parses CSV: quoted fields (`""` a quote) may hold anything; an unquoted empty field is NULL. */
function parseCsv(out: string, delimiter = ","): Field[][] {
  const rows: Field[][] = [];
  let row: Field[] = [];
  let i = 0;
  while (i < out.length) {
    let field: Field;
    if (out[i] === '"') {
      let value = "";
      i++;
      while (true) {
        const quote = out.indexOf('"', i);
        assert.ok(quote >= 0, "a quoted field is closed");
        value += out.slice(i, quote);
        i = quote + 1;
        if (out[i] !== '"') break;
        value += '"';
        i++;
      }
      field = value;
    } else {
      let end = i;
      while (end < out.length && out[end] !== delimiter && out[end] !== "\n") end++;
      field = end === i ? null : out.slice(i, end);
      i = end;
    }
    row.push(field);
    if (out[i] === delimiter) {
      i++;
    } else {
      assert.equal(out[i], "\n", `a field ends at a delimiter or a line break (at ${i})`);
      i++;
      rows.push(row);
      row = [];
    }
  }
  return rows;
}

/** Awkward values in every column, made on the server. */
async function seedAwkward(db: DatabaseManager, count: number): Promise<void> {
  await db.execute(
    "CREATE TABLE {{tables.awkward}} (id int PRIMARY KEY, t text, b bytea, arr text[], " +
      "ts timestamptz, n numeric)",
  );
  await db.execute(
    String.raw`INSERT INTO {{tables.awkward}}
      SELECT g,
        CASE g % 9 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN E'tab\there\t'
          WHEN 3 THEN E'line\nbreak\r\nend' WHEN 4 THEN E'back\\slash \\N \\.'
          WHEN 5 THEN 'quote" and ''single'', comma' WHEN 6 THEN 'ünïcødé ✓ 😀 ' || g
          WHEN 7 THEN '\N' ELSE 'plain ' || g END,
        CASE WHEN g % 7 = 0 THEN NULL WHEN g % 7 = 1 THEN '\x'::bytea
          ELSE decode(md5(g::text), 'hex') || '\x000a09'::bytea END,
        CASE WHEN g % 6 = 0 THEN NULL
          ELSE ARRAY['a,b', NULL, E'q"\\', '', 'x y', g::text] END,
        CASE WHEN g % 5 = 0 THEN NULL
          ELSE timestamptz '2020-01-01 00:00:00+00' + g * interval '1 minute 7.123456 seconds' END,
        CASE WHEN g % 4 = 0 THEN NULL ELSE g / 7.0 END
      FROM generate_series(1, $1::int) g`,
    [count],
  );
}

/** The table read as text, as COPY writes each value. */
async function tableAsText(db: DatabaseManager): Promise<Field[][]> {
  const rows = await db.fetchAll<Record<string, Field>>(
    "SELECT a.id::text, a.t, a.b::text, a.arr::text, a.ts::text, a.n::text " +
      "FROM {{tables.awkward}} a ORDER BY a.id",
  );
  return rows.map((row) => Object.values(row));
}

const byId = (a: Field[], b: Field[]) => Number(a[0]) - Number(b[0]);

/** Row by row (`assert.deepEqual` of 100,000 rows at once takes minutes). */
function assertSameRows(actual: Field[][], expected: Field[][], what: string): void {
  assert.equal(actual.length, expected.length, `${what}: the number of rows`);
  for (let i = 0; i < expected.length; i++) {
    if (JSON.stringify(actual[i]) !== JSON.stringify(expected[i])) {
      assert.deepEqual(actual[i], expected[i], `${what}: row ${i}`);
    }
  }
}

/** Both formats, from the table and from a query, parsed back, equal the table. */
async function assertRoundTrip(db: DatabaseManager, count: number): Promise<void> {
  await seedAwkward(db, count);
  const expected = await tableAsText(db);
  assert.equal(expected.length, count);

  const fromText = parseCopyText(await text(db.copyFromTable("awkward")));
  assertSameRows(fromText.sort(byId), expected, "COPY text from the table");

  const csv = parseCsv(await text(db.copyFromTable("awkward", { format: "csv", header: true })));
  assert.deepEqual(csv[0], ["id", "t", "b", "arr", "ts", "n"], "the CSV header");
  assertSameRows(csv.slice(1).sort(byId), expected, "CSV from the table");

  const query = "SELECT id, t, b, arr, ts, n FROM {{tables.awkward}} WHERE id > $1 ORDER BY id";
  const tail = expected.filter((row) => Number(row[0]) > 10);
  assertSameRows(parseCopyText(await text(db.copyFromQuery(query, [10]))), tail, "query, text");
  assertSameRows(
    parseCsv(await text(db.copyFromQuery(query, [10], { format: "csv" }))),
    tail,
    "query, CSV",
  );
}

function idle(pool: Pool): void {
  const stats = pool.getStats();
  assert.equal(stats.used, 0, `a connection is still in use: ${JSON.stringify(stats)}`);
}

/** A manager over the embedded engine, in a schema of its own. */
async function withEmbedded(fn: (db: DatabaseManager, pool: Pool) => Promise<void>) {
  const pool = await createSharedPool({ connectionString: "pglite:memory" });
  try {
    const db = new DatabaseManager({ pool, schema: uniqueName("copyout") });
    await db.ensureSchema();
    await fn(db, pool);
  } finally {
    await pool.close();
  }
}

/** Millions of rows without materializing a set function's output first. */
const ENDLESS = "SELECT a.g * 2000 + b.g AS n, repeat('x', 100) AS pad " +
  "FROM generate_series(1, 2000) a(g), generate_series(1, 2000) b(g)";

serverTest(
  "copyFromTable/copyFromQuery: 100,000 rows of awkward values, parsed back as text and CSV, equal the table",
  async () => {
    await withManager((db) => assertRoundTrip(db, 100_000), { maxConnections: 2 });
  },
);

Deno.test(
  "copyFromTable/copyFromQuery on PGlite: 10,000 rows of awkward values (100,000 take minutes in WASM), parsed back, equal the table",
  async () => {
    await withEmbedded((db) => assertRoundTrip(db, 10_000));
  },
);

serverTest(
  "a COPY out left by break is stopped on the server and its connection serves the next caller",
  async () => {
    await withManager(async (db, pool) => {
      const marker = uniqueName("copy");
      let chunks = 0;
      for await (const _ of db.copyFromQuery(`SELECT /* ${marker} */ * FROM (${ENDLESS}) x`)) {
        if (++chunks === 2) break;
      }
      idle(pool);
      const running = await observe((sql) =>
        sql`SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE query LIKE ${"%" + marker + "%"} AND state <> 'idle'
              AND pid <> pg_backend_pid()`
      );
      assert.equal(running[0].n, 0, "the COPY no longer runs on the server");
      assert.equal(await db.fetchValue("SELECT 42 AS answer"), 42);
      assert.equal(await text(db.copyFromQuery("SELECT 1 AS a, 'b' AS b")), "1\tb\n");
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest(
  "a COPY out stopped by its signal ends with the reason, and the server stops it",
  async () => {
    await withManager(async (db, pool) => {
      const marker = uniqueName("copy");
      const controller = new AbortController();
      const reason = new Error("client went away");
      let chunks = 0;
      await assert.rejects(async () => {
        for await (
          const _ of db.copyFromQuery(`SELECT /* ${marker} */ * FROM (${ENDLESS}) x`, [], {
            signal: controller.signal,
          })
        ) {
          if (++chunks === 2) controller.abort(reason);
        }
      }, (error) => error === reason);
      idle(pool);
      const running = await observe((sql) =>
        sql`SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE query LIKE ${"%" + marker + "%"} AND state <> 'idle'
              AND pid <> pg_backend_pid()`
      );
      assert.equal(running[0].n, 0, "the COPY no longer runs on the server");
      assert.equal(await db.fetchValue("SELECT 'next' AS x"), "next");
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest(
  "an error in the middle of a COPY out is thrown from the iterator; the connection goes on",
  async () => {
    await withManager(async (db, pool) => {
      let bytes = 0;
      const error = await (async () => {
        try {
          for await (
            const chunk of db.copyFromQuery(
              "SELECT g, 1 / (g - 150000) AS boom FROM generate_series(1, 200000) g",
            )
          ) bytes += chunk.length;
        } catch (error) {
          return error;
        }
      })();
      assert.ok(error instanceof QueryError, `expected a QueryError, got ${error}`);
      assert.equal(error.sqlstate, "22012");
      assert.ok(bytes > 0, "rows before the failing one were streamed first");
      idle(pool);
      assert.equal(await db.fetchValue("SELECT 7 AS x"), 7);
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest(
  "tx.copyFromTable sees the transaction's rows; leaving it early does not abort the transaction",
  async () => {
    await withManager(async (db, pool) => {
      await db.execute("CREATE TABLE {{tables.items}} (id int)");
      await db.transaction(async (tx) => {
        await tx.execute("INSERT INTO {{tables.items}} SELECT generate_series(1, 3)");
        assert.equal(await text(tx.copyFromTable("items")), "1\n2\n3\n");
        for await (const _ of tx.copyFromQuery(ENDLESS)) break;
        await tx.execute("INSERT INTO {{tables.items}} VALUES (4)");
      });
      assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.items}}"), 4);
      await db.acquire(async (conn) => {
        assert.equal(await text(conn.copyFromQuery("SELECT max(id) FROM {{tables.items}}")), "4\n");
        for await (const _ of conn.copyFromQuery(ENDLESS)) break;
        assert.equal(await conn.fetchValue("SELECT 1 AS x"), 1);
      });
      idle(pool);
    }, { minConnections: 1, maxConnections: 1 });
  },
);

serverTest("copyFromQuery: a parameter value stays a value, whatever it holds", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.t}} (id int)");
    await db.execute("INSERT INTO {{tables.t}} VALUES (1)");
    const values = [
      "'); DROP TABLE {{tables.t}}; --",
      "x' || (SELECT 'injected') || '",
      "$1",
      "{{tables.t}}",
      "back\\slash' \\' E'",
      "*/ SELECT 1 /*",
      "$$ dollar $$",
      null,
    ];
    for (const value of values) {
      const out = await text(
        db.copyFromQuery("SELECT $1::text AS v, '$1' AS literal /* $1 */ -- $1", [value], {
          format: "csv",
        }),
      );
      assert.deepEqual(parseCsv(out), [[value, "$1"]], `value ${JSON.stringify(value)}`);
      const tagged = await text(
        db.copyFromQuery`SELECT ${value}::text AS v, count(*) FROM {{tables.t}} WHERE ${value} IS NULL OR true`,
      );
      assert.deepEqual(parseCopyText(tagged), [[value, "1"]], `tagged ${JSON.stringify(value)}`);
    }
    assert.equal(await db.tableExists("t"), true);
    assert.equal(
      await text(db.copyFromQuery("SELECT $1::int + 1, $2::date", [41, new Date("2024-02-03")])),
      "42\t2024-02-03\n",
    );
  });
});

serverTest("COPY out options: header, delimiter, null, columns; bad ones are refused", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.t}} (a int, b text, c text)");
    await db.execute("INSERT INTO {{tables.t}} VALUES (1, NULL, 'x;y'), (2, 'z', NULL)");
    assert.equal(
      await text(
        db.copyFromTable("t", {
          columns: ["c", "a"],
          format: "csv",
          header: true,
          delimiter: ";",
          null: "-",
        }),
      ),
      'c;a\n"x;y";1\n-;2\n',
    );
    assert.equal(
      await text(db.copyFromTable("t", { header: true, delimiter: "|", null: "NULL" })),
      "a|b|c\n1|NULL|x;y\n2|z|NULL\n",
    );
    assert.throws(() => db.copyFromTable("t; DROP TABLE x"), SchemaError);
    assert.throws(() => db.copyFromTable("t", { columns: ["a b"] }), SchemaError);
    assert.throws(
      () => db.copyFromTable("t", { format: "binary" as "csv" }),
      /'format' must be "text" or "csv"/,
    );
    assert.throws(() => db.copyFromTable("t", { delimiter: ";;" }), /single character/);
    assert.throws(() => db.copyFromQuery("SELECT $2::int", [1]), /uses \$2 but 1 parameter/);
    await assert.rejects(
      text(db.copyFromTable("missing")),
      (error) => error instanceof QueryError && error.sqlstate === "42P01",
    );
  });
});

Deno.test("COPY out on PGlite: leaving early, an error and a transaction work as on the server", async () => {
  await withEmbedded(async (db, pool) => {
    for await (const _ of db.copyFromQuery("SELECT g FROM generate_series(1, 10000) g")) break;
    idle(pool);
    await assert.rejects(
      text(db.copyFromQuery("SELECT 1 / (g - 5) FROM generate_series(1, 10) g")),
      (error) => error instanceof QueryError && error.sqlstate === "22012",
    );
    assert.equal(await db.fetchValue("SELECT 3 AS x"), 3);
    await db.execute("CREATE TABLE {{tables.items}} (id int)");
    await db.transaction(async (tx) => {
      await tx.execute("INSERT INTO {{tables.items}} VALUES (1), (2)");
      for await (const _ of tx.copyFromTable("items")) break;
      assert.equal(await text(tx.copyFromTable("items", { format: "csv" })), "1\n2\n");
    });
    assert.equal(
      await text(db.copyFromQuery("SELECT $1::text", ["it's $1"])),
      "it's $1\n",
    );
    idle(pool);
  });
});
