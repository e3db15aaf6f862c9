import assert from "node:assert/strict";
import { once } from "node:events";
import postgres from "postgres";
import { encodeCopyRows, encodeCopyValue } from "../src/_copy_text.ts";
import { serverTest, TEST_URL } from "./_support/server.ts";

async function collect(
  records: Iterable<readonly unknown[]> | AsyncIterable<readonly unknown[]>,
  columnCount: number | undefined,
): Promise<string[]> {
  // Each chunk is decoded before the next is asked for: the encoder reuses its buffer.
  const decoder = new TextDecoder();
  const text: string[] = [];
  for await (const chunk of encodeCopyRows(records, columnCount)) text.push(decoder.decode(chunk));
  return text;
}

Deno.test("encodeCopyValue() writes null and undefined as \\N", () => {
  assert.equal(encodeCopyValue(null), "\\N");
  assert.equal(encodeCopyValue(undefined), "\\N");
});

Deno.test("encodeCopyValue() leaves plain strings as they are", () => {
  assert.equal(encodeCopyValue(""), "");
  assert.equal(encodeCopyValue("hello, world"), "hello, world");
  assert.equal(encodeCopyValue("quotes \" and ' stay"), "quotes \" and ' stay");
  assert.equal(encodeCopyValue("🎉 e\u0301 漢字"), "🎉 e\u0301 漢字");
});

Deno.test("encodeCopyValue() escapes backslash and control characters", () => {
  assert.equal(encodeCopyValue("a\\b"), "a\\\\b");
  assert.equal(encodeCopyValue("a\tb"), "a\\tb");
  assert.equal(encodeCopyValue("a\nb"), "a\\nb");
  assert.equal(encodeCopyValue("a\rb"), "a\\rb");
  assert.equal(encodeCopyValue("a\bb"), "a\\bb");
  assert.equal(encodeCopyValue("a\fb"), "a\\fb");
  assert.equal(encodeCopyValue("a\vb"), "a\\vb");
  assert.equal(encodeCopyValue("\\\t\n\r\\"), "\\\\\\t\\n\\r\\\\");
  assert.equal(encodeCopyValue("\u0001\u007f"), "\u0001\u007f");
});

Deno.test("encodeCopyValue() escapes the literal string \\N so it is not NULL", () => {
  assert.equal(encodeCopyValue("\\N"), "\\\\N");
});

Deno.test("encodeCopyValue() refuses a string with a NUL character with RangeError", () => {
  assert.throws(() => encodeCopyValue("a\u0000b"), RangeError);
  assert.throws(() => encodeCopyValue(["a\u0000b"]), RangeError);
});

Deno.test("encodeCopyValue() writes numbers and bigints as PostgreSQL reads them", () => {
  assert.equal(encodeCopyValue(42), "42");
  assert.equal(encodeCopyValue(-1.5), "-1.5");
  assert.equal(encodeCopyValue(0), "0");
  assert.equal(encodeCopyValue(-0), "0");
  assert.equal(encodeCopyValue(NaN), "NaN");
  assert.equal(encodeCopyValue(Infinity), "Infinity");
  assert.equal(encodeCopyValue(-Infinity), "-Infinity");
  assert.equal(encodeCopyValue(1e21), "1e+21");
  assert.equal(encodeCopyValue(9223372036854775807n), "9223372036854775807");
  assert.equal(encodeCopyValue(-5n), "-5");
});

Deno.test("encodeCopyValue() writes booleans as t and f", () => {
  assert.equal(encodeCopyValue(true), "t");
  assert.equal(encodeCopyValue(false), "f");
});

Deno.test("encodeCopyValue() writes a Date as its ISO string and refuses an invalid one", () => {
  assert.equal(
    encodeCopyValue(new Date("2024-02-29T12:34:56.789Z")),
    "2024-02-29T12:34:56.789Z",
  );
  assert.throws(() => encodeCopyValue(new Date("nope")), RangeError);
});

Deno.test("encodeCopyValue() writes a Uint8Array as bytea hex with the backslash doubled", () => {
  assert.equal(encodeCopyValue(new Uint8Array([0x00, 0xff, 0x0a, 0x5c])), "\\\\x00ff0a5c");
  assert.equal(encodeCopyValue(new Uint8Array(0)), "\\\\x");
});

Deno.test("encodeCopyValue() writes an array as a quoted array literal", () => {
  assert.equal(encodeCopyValue([]), "{}");
  assert.equal(encodeCopyValue(["a", "b"]), '{"a","b"}');
  assert.equal(encodeCopyValue([1, null, undefined, 3]), '{"1",NULL,NULL,"3"}');
  assert.equal(encodeCopyValue([[1, 2], [3, 4]]), '{{"1","2"},{"3","4"}}');
  assert.equal(encodeCopyValue(["NULL", "", " x ", "a,b", "{}"]), '{"NULL",""," x ","a,b","{}"}');
  assert.equal(encodeCopyValue([true, false, 2n]), '{"t","f","2"}');
});

Deno.test("encodeCopyValue() escapes quotes and backslashes in array elements, then for COPY", () => {
  // Array literal: {"say \"hi\"","back\\slash"}; COPY doubles each backslash.
  assert.equal(
    encodeCopyValue(['say "hi"', "back\\slash"]),
    '{"say \\\\"hi\\\\"","back\\\\\\\\slash"}',
  );
  assert.equal(encodeCopyValue(["tab\there", "nl\nhere"]), '{"tab\\there","nl\\nhere"}');
  assert.equal(encodeCopyValue(["\\N"]), '{"\\\\\\\\N"}');
  assert.equal(
    encodeCopyValue([new Uint8Array([1, 255])]),
    '{"\\\\\\\\x01ff"}',
  );
  assert.equal(
    encodeCopyValue([new Date("2000-01-01T00:00:00.000Z")]),
    '{"2000-01-01T00:00:00.000Z"}',
  );
  assert.equal(encodeCopyValue([{ a: "b" }]), '{"{\\\\"a\\\\":\\\\"b\\\\"}"}');
});

Deno.test("encodeCopyValue() writes a plain object as JSON, escaped for COPY", () => {
  assert.equal(encodeCopyValue({ a: 1, b: [true, null] }), '{"a":1,"b":[true,null]}');
  assert.equal(encodeCopyValue({ q: 'say "hi"' }), '{"q":"say \\\\"hi\\\\""}');
  assert.equal(encodeCopyValue({ t: "a\tb" }), '{"t":"a\\\\tb"}');
  const bare = Object.assign(Object.create(null), { x: 1 });
  assert.equal(encodeCopyValue(bare), '{"x":1}');
  assert.equal(encodeCopyValue({ toJSON: () => "custom" }), '"custom"');
});

Deno.test("encodeCopyValue() throws TypeError naming the type it cannot encode", () => {
  const cases: ReadonlyArray<readonly [unknown, string]> = [
    [() => 1, "function"],
    [Symbol("s"), "symbol"],
    [new Map(), "Map"],
    [new Set([1]), "Set"],
    [new Int32Array(2), "Int32Array"],
    [[() => 1], "function"],
  ];
  for (const [value, name] of cases) {
    assert.throws(() => encodeCopyValue(value), (error: unknown) => {
      assert.ok(error instanceof TypeError);
      assert.match(error.message, new RegExp(`'${name}'`));
      return true;
    });
  }
});

Deno.test("encodeCopyRows() writes tab-separated lines ending in a newline", async () => {
  const chunks = await collect([[1, "a\tb", null], [2, "", true]], 3);
  assert.deepEqual(chunks, ["1\ta\\tb\t\\N\n2\t\tt\n"]);
});

Deno.test("encodeCopyRows() yields nothing for no rows", async () => {
  assert.deepEqual(await collect([], 2), []);
  assert.deepEqual(await collect([], undefined), []);
});

Deno.test("encodeCopyRows() reads sync iterables, generators and async iterables", async () => {
  function* sync(): Generator<unknown[]> {
    yield [1, "x"];
    yield [2, "y"];
  }
  async function* later(): AsyncGenerator<unknown[]> {
    yield [1, "x"];
    await Promise.resolve();
    yield [2, "y"];
  }
  const expected = ["1\tx\n2\ty\n"];
  assert.deepEqual(await collect(sync(), 2), expected);
  assert.deepEqual(await collect(later(), undefined), expected);
  assert.deepEqual(await collect(new Set([[1, "x"], [2, "y"]]), 2), expected);
});

Deno.test("encodeCopyRows() yields chunks of about 64 KiB that end at row boundaries", async () => {
  const rows = Array.from({ length: 10000 }, (_, i) => [i, `row number ${i} with some text`]);
  const chunks = await collect(rows, 2);
  assert.ok(chunks.length > 3, `expected several chunks, got ${chunks.length}`);
  for (const chunk of chunks.slice(0, -1)) {
    assert.ok(chunk.length >= 65536 && chunk.length < 65536 + 100, `chunk of ${chunk.length}`);
    assert.ok(chunk.endsWith("\n"));
  }
  assert.equal(chunks.join(""), rows.map(([i, t]) => `${i}\t${t}\n`).join(""));
});

Deno.test("encodeCopyRows() writes every row as encodeCopyValue() writes its values", async () => {
  // The rows are written as bytes, most values straight into the chunk: they must come out
  // as the value encoder's text would, whatever mix of values a row holds.
  const pieces = [
    "a",
    "é",
    "日本",
    "🎉",
    "\t",
    "\n",
    "\\",
    "\u0001",
    "\u007f",
    "\\N",
    " ",
    "x".repeat(70),
  ];
  const numbers = [
    0,
    -0,
    7,
    -7,
    2147483647,
    -2147483648,
    2147483648,
    -2147483649,
    1.5,
    -2.25e-7,
    1e21,
    NaN,
    Infinity,
    -Infinity,
    Number.MAX_SAFE_INTEGER,
    10,
    100,
    999999999,
    1000000000,
  ];
  let seed = 7;
  const next = (n: number) => (seed = (seed * 1103515245 + 12345) % 2147483648) % n;
  const value = (): unknown => {
    switch (next(6)) {
      case 0:
        return numbers[next(numbers.length)];
      case 1:
        return next(2) === 0 ? null : undefined;
      case 2:
        return [true, 12n, new Date(Date.UTC(2024, 1, 29)), new Uint8Array([0, 255])][next(4)];
      default:
        return Array.from({ length: next(5) }, () => pieces[next(pieces.length)]).join("");
    }
  };
  const rows = Array.from({ length: 5000 }, () => Array.from({ length: 4 }, value));
  const expected = rows.map((row) => row.map(encodeCopyValue).join("\t") + "\n").join("");
  assert.equal((await collect(rows, 4)).join(""), expected);
  const huge = ["é".repeat(200_000) + "\t", 1, "x".repeat(300_000)];
  assert.equal((await collect([huge], 3)).join(""), huge.map(encodeCopyValue).join("\t") + "\n");
});

Deno.test("encodeCopyRows() throws RangeError naming the row and the expected count", async () => {
  await assert.rejects(collect([[1, 2], [3, 4], [5]], 2), (error: unknown) => {
    assert.ok(error instanceof RangeError);
    assert.match(error.message, /row 3\b/);
    assert.match(error.message, /expected 2 values/);
    assert.match(error.message, /got 1/);
    return true;
  });
  await assert.rejects(collect([[1, 2, 3]], 2), /row 1\b.*expected 2 values/);
});

Deno.test("encodeCopyRows() takes the expected count from the first row when none is given", async () => {
  await assert.rejects(collect([[1, 2, 3], [4, 5, 6], [7, 8]], undefined), (error: unknown) => {
    assert.ok(error instanceof RangeError);
    assert.match(error.message, /row 3\b.*expected 3 values/);
    return true;
  });
});

Deno.test("encodeCopyRows() refuses a columnCount that is not a positive integer", async () => {
  for (const count of [0, -1, 1.5, NaN]) {
    await assert.rejects(collect([[1]], count), RangeError);
  }
});

Deno.test("encodeCopyRows() refuses a row that is not an array with TypeError", async () => {
  await assert.rejects(
    collect([[1], "x" as unknown as unknown[]], 1),
    (error: unknown) => error instanceof TypeError && /row 2\b/.test(error.message),
  );
});

Deno.test("encodeCopyRows() names the row and column of a value it cannot encode", async () => {
  await assert.rejects(collect([[1, "a"], [2, new Map()]], 2), (error: unknown) => {
    assert.ok(error instanceof TypeError);
    assert.match(error.message, /row 2, column 2\b.*'Map'/);
    return true;
  });
  await assert.rejects(collect([["a\u0000"]], 1), /row 1, column 1\b.*NUL/);
});

const COLUMNS = "id, t, i8, n, b, by, j, ta, ia, ts";
/**
 * Reads arrays back as JSON: postgres.js 3.4.9 parses a NULL array element as the string
 * "NULL", so its array parser cannot tell what the server stored.
 */
const SELECT_COLUMNS =
  "id, t, i8, n, b, by, j, array_to_json(ta) AS ta, array_to_json(ia) AS ia, ts";
const ALL_BYTES = Uint8Array.from({ length: 256 }, (_, i) => i);

/** Rows of awkward values, in the order of {@link COLUMNS}. */
const AWKWARD_ROWS: readonly (readonly unknown[])[] = [
  [
    1,
    "tab\there\nnewline\rcarriage\\back\\\\slashes",
    9223372036854775807n,
    "12345678901234567890.123456789",
    true,
    new Uint8Array([0x00, 0xff, 0x0a, 0x5c, 0x09, 0x00]),
    { quote: 'say "hi"', nested: { back: "\\", tab: "\t", 'k"ey': ['x"y', null] } },
    ['has "quotes"', null, "back\\slash", "comma,brace}{", " spaced ", "NULL", "", "t\tn\n"],
    [1, null, -3],
    new Date("2024-02-29T12:34:56.789Z"),
  ],
  [2, "\\N", -1n, 0.1, false, new Uint8Array(0), {}, [], [[1, 2], [3, 4]], new Date(0)],
  [3, "", null, null, null, null, null, null, null, null],
  [4, null, null, null, null, null, null, null, null, null],
  [
    5,
    "emoji 🎉👩‍👩‍👧 combining e\u0301 漢字 עברית \b\f\v\u0001\u007f",
    0n,
    NaN,
    true,
    ALL_BYTES,
    { emoji: "🎉", "back\\slash": "v\\al", nl: "a\nb" },
    ["🎉", "e\u0301", "\\N", "{NULL}"],
    [2147483647, -2147483648],
    new Date("1999-12-31T23:59:59.999Z"),
  ],
];

/** What postgres.js reads back for {@link AWKWARD_ROWS}. */
const EXPECTED_ROWS: readonly (readonly unknown[])[] = [
  [
    1,
    "tab\there\nnewline\rcarriage\\back\\\\slashes",
    "9223372036854775807",
    "12345678901234567890.123456789",
    true,
    new Uint8Array([0x00, 0xff, 0x0a, 0x5c, 0x09, 0x00]),
    { quote: 'say "hi"', nested: { back: "\\", tab: "\t", 'k"ey': ['x"y', null] } },
    ['has "quotes"', null, "back\\slash", "comma,brace}{", " spaced ", "NULL", "", "t\tn\n"],
    [1, null, -3],
    new Date("2024-02-29T12:34:56.789Z"),
  ],
  [2, "\\N", "-1", "0.1", false, new Uint8Array(0), {}, [], [[1, 2], [3, 4]], new Date(0)],
  [3, "", null, null, null, null, null, null, null, null],
  [4, null, null, null, null, null, null, null, null, null],
  [
    5,
    "emoji 🎉👩‍👩‍👧 combining e\u0301 漢字 עברית \b\f\v\u0001\u007f",
    "0",
    "NaN",
    true,
    ALL_BYTES,
    { emoji: "🎉", "back\\slash": "v\\al", nl: "a\nb" },
    ["🎉", "e\u0301", "\\N", "{NULL}"],
    [2147483647, -2147483648],
    new Date("1999-12-31T23:59:59.999Z"),
  ],
];

async function withCopyTable(
  fn: (sql: postgres.Sql, table: string) => Promise<void>,
): Promise<void> {
  const sql = postgres(TEST_URL, { max: 1, onnotice: () => {} });
  const schema = `copy_text_test_${crypto.randomUUID().replaceAll("-", "")}`;
  try {
    await sql.unsafe(`CREATE SCHEMA "${schema}"`);
    await sql.unsafe(
      `CREATE TABLE "${schema}".t (id int4 PRIMARY KEY, t text, i8 int8, n numeric, b bool, ` +
        `by bytea, j jsonb, ta text[], ia int4[], ts timestamptz)`,
    );
    await fn(sql, `"${schema}".t`);
  } finally {
    await sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    await sql.end({ timeout: 5 });
  }
}

/**
 * Streams `records` into `table` with COPY, as `copyRecordsToTable` will. postgres.js
 * 3.4.9 never settles the writable when the server rejects the data after `end()`
 * (porsager/postgres#1173), so a deadline turns that hang into a failure.
 */
async function copyIn(
  sql: postgres.Sql,
  table: string,
  records: Iterable<readonly unknown[]>,
): Promise<number> {
  const writable = await sql.unsafe(`COPY ${table} (${COLUMNS}) FROM STDIN`).writable();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const failed = new Promise<never>((_, reject) => {
    writable.once("error", reject);
    timer = setTimeout(
      () => reject(new Error("COPY did not finish in 10 s: the server rejected the data")),
      10_000,
    );
  });
  let chunks = 0;
  try {
    for await (const chunk of encodeCopyRows(records, 10)) {
      chunks++;
      // A copy: the stream may keep the chunk queued, and the encoder reuses its buffer.
      if (!writable.write(chunk.slice())) await Promise.race([once(writable, "drain"), failed]);
    }
    writable.end();
    await Promise.race([once(writable, "finish"), failed]);
  } finally {
    clearTimeout(timer);
  }
  return chunks;
}

function normalize(row: Record<string, unknown>): unknown[] {
  return COLUMNS.split(", ").map((column) => {
    const value = row[column];
    return value instanceof Uint8Array ? new Uint8Array(value) : value;
  });
}

serverTest("encodeCopyRows() round-trips awkward values through COPY FROM STDIN", async () => {
  await withCopyTable(async (sql, table) => {
    await copyIn(sql, table, AWKWARD_ROWS);
    const rows = await sql.unsafe(`SELECT ${SELECT_COLUMNS} FROM ${table} ORDER BY id`);
    assert.deepEqual(rows.map(normalize), EXPECTED_ROWS);

    const [checks] = await sql.unsafe(
      `SELECT
         (SELECT t = E'\\\\N' FROM ${table} WHERE id = 2) AS literal_backslash_n,
         (SELECT t IS NULL FROM ${table} WHERE id = 4) AS real_null,
         (SELECT t = '' FROM ${table} WHERE id = 3) AS empty_string,
         (SELECT encode(by, 'hex') FROM ${table} WHERE id = 1) AS bytes_hex,
         (SELECT octet_length(by) FROM ${table} WHERE id = 5) AS all_bytes,
         (SELECT ta[2] IS NULL AND ta[6] = 'NULL' FROM ${table} WHERE id = 1) AS null_element,
         (SELECT j->>'quote' FROM ${table} WHERE id = 1) AS json_quote,
         (SELECT array_dims(ia) FROM ${table} WHERE id = 2) AS dims,
         (SELECT length(t) FROM ${table} WHERE id = 5) AS unicode_length`,
    );
    assert.deepEqual({ ...checks }, {
      literal_backslash_n: true,
      real_null: true,
      empty_string: true,
      bytes_hex: "00ff0a5c0900",
      all_bytes: 256,
      null_element: true,
      json_quote: 'say "hi"',
      dims: "[1:2][1:2]",
      unicode_length: [...EXPECTED_ROWS[4][1] as string].length,
    });
  });
});

serverTest("encodeCopyRows() round-trips many rows sent in several chunks", async () => {
  await withCopyTable(async (sql, table) => {
    const rows = Array.from({ length: 5000 }, (_, i) => [
      i,
      `line ${i}\twith\ttabs\nand\\slashes 🎉`,
      BigInt(i) * 1000000007n,
      i / 4,
      i % 2 === 0,
      new Uint8Array([i & 0xff, 0, 0xff]),
      { i, s: `"${i}"` },
      [`a${i}`, null],
      [i, -2 * i - 1],
      new Date(i * 86400000),
    ]);
    const chunks = await copyIn(sql, table, rows);
    assert.ok(chunks > 1, `expected several chunks, got ${chunks}`);
    const back = await sql.unsafe(`SELECT ${SELECT_COLUMNS} FROM ${table} ORDER BY id`);
    assert.equal(back.length, rows.length);
    assert.deepEqual(
      back.map(normalize),
      rows.map((row) => [
        row[0],
        row[1],
        String(row[2]),
        String(row[3]),
        ...row.slice(4),
      ]),
    );
  });
});
