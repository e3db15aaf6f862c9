import assert from "node:assert/strict";
import type { DriverConnection } from "../../src/drivers/driver.ts";
import { rejection } from "../_support/settle.ts";
import { createPgliteDriver } from "../../src/drivers/pglite.ts";

/** Escapes one value for COPY text format (`null` becomes `\N`). */
function copyValue(value: string | null): string {
  if (value === null) return "\\N";
  return value.replaceAll("\\", "\\\\").replaceAll("\t", "\\t").replaceAll("\n", "\\n")
    .replaceAll("\r", "\\r");
}

async function run(conn: DriverConnection, sql: string, params: unknown[] = []) {
  return await conn.query(sql, params).result;
}

// PGlite takes ~2 s and ~650 MB to start, so the whole file shares one driver.
Deno.test("createPgliteDriver() behaves like the network driver behind the seam", async (t) => {
  const driver = createPgliteDriver({
    serverSettings: {
      lock_timeout: "1500",
      application_name: "pgdbm 'quoted' test",
      search_path: "app, public",
    },
  });
  try {
    assert.equal(driver.maxSessions, 1);
    let conn = await driver.connect();

    await t.step(
      "Driver.connect() applies serverSettings and reports pid and version",
      async () => {
        assert.deepEqual((await run(conn, "SHOW lock_timeout")).rows, [{ lock_timeout: "1500ms" }]);
        assert.deepEqual((await run(conn, "SHOW application_name")).rows, [
          { application_name: "pgdbm 'quoted' test" },
        ]);
        assert.deepEqual((await run(conn, "SHOW search_path")).rows, [
          { search_path: "app, public" },
        ]);
        assert.equal(typeof conn.pid, "number");
        assert.match(conn.serverVersion, /^\d+\.\d+/);
        assert.equal(conn.closed, false);
      },
    );

    await t.step("Driver.connect() rejects a second session while one is open", async () => {
      const error = await rejection(driver.connect());
      assert.equal(error.sqlstate, "53300");
      assert.match(error.message, /second session/);
    });

    await t.step(
      "DriverConnection.query() binds params and runs several statements without",
      async () => {
        const bound = await run(conn, "SELECT $1::int + $2::int AS n, $3::text AS s", [
          1,
          2,
          "x'y",
        ]);
        assert.deepEqual(bound, { rows: [{ n: 3, s: "x'y" }], command: "SELECT", rowCount: 1 });

        const last = await run(
          conn,
          "CREATE TABLE public.multi (id int); INSERT INTO public.multi VALUES (1), (2); " +
            "SELECT id FROM public.multi ORDER BY id",
        );
        assert.deepEqual(last, { rows: [{ id: 1 }, { id: 2 }], command: "SELECT", rowCount: 2 });
        assert.equal(Object.getPrototypeOf(last.rows[0]), Object.prototype);

        const error = await rejection(conn.query("SELECT 1; SELECT 2", [1]).result);
        assert.equal(error.sqlstate, "42601");
      },
    );

    await t.step(
      "DriverConnection.query() reports the command tag's verb and row count",
      async () => {
        const cases: Array<[string, unknown[], string, number]> = [
          ["CREATE TABLE public.tags (id int PRIMARY KEY, v text)", [], "CREATE TABLE", 0],
          ["INSERT INTO public.tags VALUES (1, 'a'), (2, 'b'), (3, 'c')", [], "INSERT", 3],
          ["INSERT INTO public.tags VALUES ($1, $2) RETURNING id", [4, "d"], "INSERT", 1],
          ["UPDATE public.tags SET v = v || '!' WHERE id <= $1", [2], "UPDATE", 2],
          ["DELETE FROM public.tags WHERE id = 4", [], "DELETE", 1],
          ["SELECT * FROM public.tags", [], "SELECT", 3],
          ["SHOW lock_timeout", [], "SHOW", 1],
          ["CREATE INDEX tags_v ON public.tags (v)", [], "CREATE INDEX", 0],
          ["BEGIN", [], "BEGIN", 0],
          ["ROLLBACK", [], "ROLLBACK", 0],
          ["", [], "", 0],
        ];
        for (const [sql, params, command, rowCount] of cases) {
          const result = await run(conn, sql, params);
          assert.equal(result.command, command, sql);
          assert.equal(result.rowCount, rowCount, sql);
        }
      },
    );

    await t.step("DriverConnection.query() returns values typed as postgres.js does", async () => {
      const { rows: [row] } = await run(
        conn,
        `SELECT 9007199254740993::int8 AS big, 1.50::numeric AS num,
          7::int2 AS small, 8::int4 AS int, 1.5::float4 AS f4, 2.25::float8 AS f8, 26::oid AS oid,
          true AS yes, 'text' AS txt, 'v'::varchar AS vc,
          '{"a":[1,null]}'::json AS js, '{"b":{"c":"d"}}'::jsonb AS jsb,
          '2024-02-29 12:34:56'::timestamp AS ts, '2024-02-29 12:34:56+02'::timestamptz AS tstz,
          '2024-02-29'::date AS d, '\\x00ff10'::bytea AS bytes,
          '{1,NULL,9007199254740993}'::int8[] AS bigs, '{1.5,NULL}'::numeric[] AS nums,
          '{{1,2},{3,NULL}}'::int4[] AS grid, '{t,NULL,f}'::bool[] AS bools,
          ARRAY['a,b', NULL, 'NULL', '', 'q"x', 'back\\slash'] AS texts,
          ARRAY['\\x01'::bytea, NULL] AS byteas, NULL::int AS nothing`,
      );
      assert.equal(row.big, "9007199254740993");
      assert.equal(row.num, "1.50");
      assert.equal(row.small, 7);
      assert.equal(row.int, 8);
      assert.equal(row.f4, 1.5);
      assert.equal(row.f8, 2.25);
      assert.equal(row.oid, 26);
      assert.equal(row.yes, true);
      assert.equal(row.txt, "text");
      assert.equal(row.vc, "v");
      assert.deepEqual(row.js, { a: [1, null] });
      assert.deepEqual(row.jsb, { b: { c: "d" } });
      assert.ok(row.ts instanceof Date);
      assert.equal((row.ts as Date).getTime(), new Date("2024-02-29 12:34:56").getTime());
      assert.ok(row.tstz instanceof Date);
      assert.equal((row.tstz as Date).toISOString(), "2024-02-29T10:34:56.000Z");
      assert.ok(row.d instanceof Date);
      assert.equal((row.d as Date).toISOString(), "2024-02-29T00:00:00.000Z");
      assert.equal(Object.getPrototypeOf(row.bytes), Uint8Array.prototype);
      assert.deepEqual(row.bytes, new Uint8Array([0, 255, 16]));
      assert.deepEqual(row.bigs, ["1", null, "9007199254740993"]);
      assert.deepEqual(row.nums, ["1.5", null]);
      assert.deepEqual(row.grid, [[1, 2], [3, null]]);
      assert.deepEqual(row.bools, [true, null, false]);
      assert.deepEqual(row.texts, ["a,b", null, "NULL", "", 'q"x', "back\\slash"]);
      const byteas = row.byteas as unknown[];
      assert.equal(Object.getPrototypeOf(byteas[0]), Uint8Array.prototype);
      assert.deepEqual(byteas, [new Uint8Array([1]), null]);
      assert.equal(row.nothing, null);
    });

    await t.step("DriverConnection.query() round-trips bytea, Date and json params", async () => {
      const bytes = new Uint8Array([0, 1, 2, 254, 255]);
      const when = new Date("2024-05-06T07:08:09.123Z");
      const { rows: [row] } = await run(
        conn,
        "SELECT $1::bytea AS b, $2::timestamptz AS t, $3::jsonb AS j, $4::int8 AS i",
        [bytes, when, { k: [1, "two"] }, "9007199254740993"],
      );
      assert.equal(Object.getPrototypeOf(row.b), Uint8Array.prototype);
      assert.deepEqual(row.b, bytes);
      assert.equal((row.t as Date).getTime(), when.getTime());
      assert.deepEqual(row.j, { k: [1, "two"] });
      assert.equal(row.i, "9007199254740993");
    });

    await t.step("DriverConnection.query() rejects with the server's error fields", async () => {
      await run(conn, "CREATE TABLE public.uniq (id int CONSTRAINT uniq_id UNIQUE)");
      await run(conn, "INSERT INTO public.uniq VALUES (1)");
      const error = await rejection(
        conn.query("INSERT INTO public.uniq VALUES ($1)", [1]).result,
      );
      assert.equal(error.code, "QUERY_ERROR");
      assert.equal(error.sqlstate, "23505");
      assert.equal(error.constraint, "uniq_id");
      assert.equal(error.table, "uniq");
      assert.equal(error.schemaName, "public");
      assert.equal(error.severity, "ERROR");
      assert.equal(error.detail, "Key (id)=(1) already exists.");
      assert.match(error.message, /duplicate key value violates unique constraint "uniq_id"/);
      assert.equal(error.sql, "INSERT INTO public.uniq VALUES ($1)");
      assert.deepEqual(error.params, ["<number>"]);
      assert.ok(error.cause instanceof Error);
      assert.ok(!Object.keys(error.cause).includes("params"), "the cause must not list params");

      const syntax = await rejection(run(conn, "SELECT * FROM public.uniq WHER id = 1"));
      assert.equal(syntax.sqlstate, "42601");
      assert.equal(syntax.position, 32);

      assert.deepEqual((await run(conn, "SELECT count(*)::int AS n FROM public.uniq")).rows, [
        { n: 1 },
      ]);
    });

    await t.step("DriverConnection.copyIn() copies awkward values exactly", async () => {
      await run(conn, "CREATE TABLE public.copied (id int, v text, note text)");
      const values: Array<string | null> = [
        "tab\there",
        "new\nline",
        "carriage\r\nreturn",
        "back\\slash \\N not null",
        null,
        "\\N",
        "",
        "unicode é 😀 中文",
        "quote ' and \" and ,",
      ];
      const lines = values.map((v, i) => `${i}\t${copyValue(v)}\t${copyValue(`n${i}`)}\n`);
      async function* chunks(): AsyncGenerator<string> {
        const text = lines.join("");
        const cut = text.indexOf("😀") + "😀".length;
        yield text.slice(0, 5);
        yield text.slice(5, cut);
        yield text.slice(cut);
      }
      const copied = await conn.copyIn("COPY public.copied (id, v, note) FROM STDIN", chunks());
      assert.equal(copied, values.length);
      const { rows } = await run(conn, "SELECT id, v, note FROM public.copied ORDER BY id");
      assert.deepEqual(rows, values.map((v, id) => ({ id, v, note: `n${id}` })));

      const bad = await rejection(
        conn.copyIn(
          "COPY public.copied (id) FROM STDIN",
          (async function* () {
            yield "not a number\n";
          })(),
        ),
      );
      assert.equal(bad.sqlstate, "22P02");
      assert.equal(bad.sql, "COPY public.copied (id) FROM STDIN");
      await assert.rejects(
        conn.copyIn("COPY public.copied TO STDOUT", (async function* () {})()),
        TypeError,
      );
      const failing = new Error("source failed");
      await assert.rejects(
        conn.copyIn(
          "COPY public.copied (id) FROM STDIN",
          (async function* () {
            yield "1\n";
            throw failing;
          })(),
        ),
        (error) => error === failing,
      );
      const count = await run(conn, "SELECT count(*)::int AS n FROM public.copied");
      assert.deepEqual(count.rows, [{ n: values.length }]);
    });

    await t.step("DriverConnection.query() lets timers fire during a loop of queries", async () => {
      let firedAt = -1;
      let i = 0;
      const timer = setTimeout(() => firedAt = i, 1);
      try {
        for (; i < 2000; i++) await run(conn, "SELECT $1::int AS i", [i]);
      } finally {
        clearTimeout(timer);
      }
      assert.ok(firedAt >= 0 && firedAt < 2000, `the timer fired at ${firedAt}`);
    });

    await t.step("DriverConnection.query() runs pipelined statements in order", async () => {
      await run(conn, "CREATE TABLE public.piped (n int)");
      const sent = [
        conn.query("INSERT INTO public.piped VALUES (1)", []),
        conn.query("UPDATE public.piped SET n = n * 10", []),
        conn.query("INSERT INTO public.piped VALUES ($1)", [2]),
        conn.query("SELECT n FROM public.piped ORDER BY n", []),
      ];
      const results = await Promise.all(sent.map((q) => q.result));
      assert.deepEqual(results.map((r) => r.command), ["INSERT", "UPDATE", "INSERT", "SELECT"]);
      assert.deepEqual(results[3].rows, [{ n: 2 }, { n: 10 }]);
    });

    await t.step(
      "RunningQuery.cancel() removes a queued statement with SQLSTATE 57014",
      async () => {
        const slow = conn.query("SELECT count(*)::int AS n FROM generate_series(1, 200000)", []);
        const queued = conn.query("SELECT 'never' AS x", []);
        const after = conn.query("SELECT 'after' AS x", []);
        await queued.cancel();
        await slow.cancel();
        const error = await rejection(queued.result);
        assert.equal(error.sqlstate, "57014");
        assert.equal(error.message, "canceling statement due to user request");
        // A statement that already started runs to its end (PGlite cannot interrupt it).
        assert.deepEqual((await slow.result).rows, [{ n: 200000 }]);
        assert.deepEqual((await after.result).rows, [{ x: "after" }]);
        await after.cancel();
      },
    );

    await t.step("DriverConnection.close() ends the session after what was sent", async () => {
      await run(conn, "CREATE TEMP TABLE scratch (n int)");
      await run(conn, "SET work_mem = '8MB'");
      await run(conn, "BEGIN");
      await run(conn, "INSERT INTO public.multi VALUES (99)");
      const pending = conn.query("SELECT 'sent' AS x", []);
      let calls = 0;
      conn.onClose(() => calls++);
      const closing = conn.close();
      assert.equal(conn.closed, true);
      assert.equal(calls, 1);
      const started = performance.now();
      // As the pool does: open the next session without waiting for the old one to end.
      const next = driver.connect();
      assert.deepEqual((await pending.result).rows, [{ x: "sent" }]);
      await closing;
      await conn.close();
      assert.equal(calls, 1);
      let late = 0;
      conn.onClose(() => late++);
      assert.equal(late, 1);

      const error = await rejection(conn.query("SELECT 1", []).result);
      assert.equal(error.sqlstate, "08003");
      assert.match(error.message, /connection is closed/);
      const copyError = await rejection(
        conn.copyIn("COPY public.copied (id) FROM STDIN", (async function* () {})()),
      );
      assert.equal(copyError.sqlstate, "08003");

      conn = await next;
      assert.ok(performance.now() - started < 1000, "the engine is reused, not restarted");
      assert.deepEqual((await run(conn, "SELECT count(*)::int AS n FROM public.multi")).rows, [
        { n: 2 },
      ]);
      assert.deepEqual((await run(conn, "SHOW work_mem")).rows, [{ work_mem: "4MB" }]);
      assert.deepEqual((await run(conn, "SHOW lock_timeout")).rows, [{ lock_timeout: "1500ms" }]);
      const gone = await rejection(run(conn, "SELECT * FROM scratch"));
      assert.equal(gone.sqlstate, "42P01");
    });

    await t.step(
      "Driver.connect() rejects once the driver is closed, without starting PGlite",
      async () => {
        const unused = createPgliteDriver({ serverSettings: {} });
        await unused.close();
        const error = await rejection(unused.connect());
        assert.equal(error.sqlstate, "08003");
        assert.match(error.message, /driver is closed/);
      },
    );

    await t.step("Driver.close() closes the open session and refuses new ones", async () => {
      let closedCalls = 0;
      conn.onClose(() => closedCalls++);
      const pending = conn.query("SELECT 'last' AS x", []);
      await Promise.all([driver.close(), driver.close()]);
      assert.deepEqual((await pending.result).rows, [{ x: "last" }]);
      assert.equal(conn.closed, true);
      assert.equal(closedCalls, 1);
      const error = await rejection(driver.connect());
      assert.equal(error.sqlstate, "08003");
    });
  } finally {
    await driver.close();
  }
});

Deno.test("createPgliteDriver({ dataDir }) reads arrays of the types an earlier run made", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "pgdbm-pglite-types-" });
  try {
    const first = createPgliteDriver({ dataDir, serverSettings: {} });
    try {
      const conn = await first.connect();
      await run(
        conn,
        "CREATE TYPE mood AS ENUM ('happy', 'sad'); CREATE DOMAIN score AS int; " +
          "CREATE TABLE feelings (moods mood[], scores score[]); " +
          "INSERT INTO feelings VALUES ('{sad,NULL}', '{1,NULL,2}')",
      );
      await conn.close();
    } finally {
      await first.close();
    }
    // PGlite learns the stored array types when it starts, a domain's with text elements.
    const second = createPgliteDriver({ dataDir, serverSettings: {} });
    try {
      const conn = await second.connect();
      const expected = [{ moods: ["sad", null], scores: [1, null, 2] }];
      assert.deepEqual((await run(conn, "SELECT moods, scores FROM feelings")).rows, expected);
      await run(conn, "DELETE FROM feelings");
      await run(conn, "INSERT INTO feelings VALUES ($1, $2)", [["sad", null], [1, null, 2]]);
      assert.deepEqual((await run(conn, "SELECT moods, scores FROM feelings")).rows, expected);
      await conn.close();
    } finally {
      await second.close();
    }
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});
