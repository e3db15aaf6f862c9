import assert from "node:assert/strict";
import {
  boundValueMasker,
  isSensitiveName,
  maskQueryParams,
  sensitivePositions,
} from "../src/_mask.ts";

const SECRET = "hunter2-Secret-Value";

Deno.test("maskQueryParams() hides the parameter compared with a password column", () => {
  const masked = maskQueryParams("SELECT id FROM users WHERE email = $1 AND password = $2", [
    "ann@example.com",
    SECRET,
  ]);
  assert.deepEqual(masked, ["ann@example.com", "<hidden>"]);
  assert.ok(!JSON.stringify(masked).includes(SECRET));
});

Deno.test("maskQueryParams() hides SET token = $1 and WHERE api_key=$3 (no spaces)", () => {
  assert.deepEqual(
    maskQueryParams("UPDATE sessions SET token = $1, seen = $2 WHERE api_key=$3", [
      "tok",
      true,
      "key",
    ]),
    ["<hidden>", true, "<hidden>"],
  );
});

Deno.test("maskQueryParams() maps an INSERT column list onto its VALUES tuples", () => {
  const sql = "INSERT INTO t (email, password_hash, note) VALUES ($1, $2, lower($3)), ($4, $5, $6)";
  assert.deepEqual(maskQueryParams(sql, ["a@x", SECRET, "n1", "b@x", SECRET, "n2"]), [
    "a@x",
    "<hidden>",
    "n1",
    "b@x",
    "<hidden>",
    "n2",
  ]);
});

Deno.test("maskQueryParams() handles quoted, qualified and reversed column references", () => {
  assert.deepEqual(sensitivePositions('SELECT 1 FROM "Users" u WHERE u."Password" = $1'), [1]);
  assert.deepEqual(sensitivePositions("SELECT 1 FROM u WHERE $2 = u.secret AND id = $1"), [2]);
  assert.deepEqual(
    [...sensitivePositions("SELECT 1 FROM u WHERE auth_token IN ($1, $2)")].sort(),
    [1, 2],
  );
  assert.deepEqual(
    sensitivePositions("UPDATE u SET password = crypt($1, gen_salt('bf')) WHERE id = $2"),
    [1],
  );
});

Deno.test("maskQueryParams() leaves parameters of ordinary columns alone", () => {
  const params = ["Ann", 42, false, null, new Date(0), 10n];
  const sql = "SELECT * FROM books WHERE author = $1 AND pages = $2 AND draft = $3 " +
    "AND isbn IS NOT DISTINCT FROM $4 AND published > $5 AND id = $6";
  const masked = maskQueryParams(sql, params);
  assert.deepEqual(masked, params);
  assert.equal(masked[4], params[4], "dates pass through as the same object");
  assert.notEqual(masked, params, "a new array");
});

Deno.test("maskQueryParams() ignores column names inside string literals", () => {
  assert.deepEqual(
    maskQueryParams("SELECT $1 = 'password = $1' AS same", ["value"]),
    ["value"],
  );
});

Deno.test("maskQueryParams() shortens strings longer than 200 characters", () => {
  const long = "x".repeat(5000);
  const [masked] = maskQueryParams("SELECT $1", [long]) as string[];
  assert.equal(masked, `${"x".repeat(200)}…(5000 chars)`);
  const exact = "y".repeat(200);
  assert.equal(maskQueryParams("SELECT $1", [exact])[0], exact);
});

Deno.test("maskQueryParams() summarizes bytes", () => {
  assert.deepEqual(maskQueryParams("SELECT $1", [new Uint8Array(1234)]), ["<bytes:1234>"]);
});

Deno.test("maskQueryParams() hides sensitive keys of objects recursively without mutating", () => {
  const profile = {
    name: "Ann",
    credentials: { user: "ann" },
    nested: { apiKey: "k-1", list: [{ private_key: SECRET, keep: 1 }] },
    Authorization: "Bearer abc",
    author: "Ann",
  };
  const before = structuredClone(profile);
  const [masked] = maskQueryParams("INSERT INTO t (doc) VALUES ($1)", [profile]);
  assert.deepEqual(masked, {
    name: "Ann",
    credentials: "<hidden>",
    nested: { apiKey: "<hidden>", list: [{ private_key: "<hidden>", keep: 1 }] },
    Authorization: "<hidden>",
    author: "Ann",
  });
  assert.deepEqual(profile, before, "the caller's object is unchanged");
  assert.ok(!JSON.stringify(masked).includes(SECRET));
});

Deno.test("maskQueryParams() hides sensitive keys of JSON text", () => {
  const json = JSON.stringify({ user: "ann", password: SECRET, tags: ["a"] });
  const [masked] = maskQueryParams("INSERT INTO t (doc) VALUES ($1::jsonb)", [json]);
  assert.equal(masked, JSON.stringify({ user: "ann", password: "<hidden>", tags: ["a"] }));
  assert.equal(maskQueryParams("SELECT $1", ["{not json password"])[0], "{not json password");
});

Deno.test("maskQueryParams() never shows a password-looking value anywhere", () => {
  const cases: [string, unknown[]][] = [
    ["UPDATE u SET pwd = $1", [SECRET]],
    ["INSERT INTO u (name, passwd) VALUES ($1, $2)", ["x", SECRET]],
    ["SELECT $1::jsonb", [{ deep: { deeper: { client_secret: SECRET } } }]],
    ["SELECT $1::jsonb", [[{ token: SECRET }]]],
    ["SELECT $1", [JSON.stringify([{ accessToken: SECRET }])]],
    ["INSERT INTO u (email, api_key) VALUES ($1, $2) ON CONFLICT DO NOTHING", ["e", SECRET]],
  ];
  for (const [sql, params] of cases) {
    const text = JSON.stringify(maskQueryParams(sql, params));
    assert.ok(!text.includes(SECRET), `${sql} leaked: ${text}`);
  }
});

Deno.test("maskQueryParams() stops at deeply nested values and keeps other objects as they are", () => {
  let deep: Record<string, unknown> = { leaf: 1 };
  for (let i = 0; i < 20; i++) deep = { child: deep };
  const text = JSON.stringify(maskQueryParams("SELECT $1", [deep]));
  assert.ok(text.includes("<nested>"));
  const map = new Map([["password", SECRET]]);
  assert.equal(maskQueryParams("SELECT $1", [map])[0], map);
});

Deno.test("maskQueryParams() returns an empty array for no parameters", () => {
  assert.deepEqual(maskQueryParams("SELECT 1", []), []);
});

Deno.test("isSensitiveName() matches secrets but not 'author'", () => {
  for (const name of ["password", "passwd", "PWD", "client_secret", "refresh_token", "apikey"]) {
    assert.ok(isSensitiveName(name), name);
  }
  for (const name of ["api_key", "auth", "authorization", "credentials", "private_key"]) {
    assert.ok(isSensitiveName(name), name);
  }
  for (const name of ["author", "authored_at", "email", "name", "keys", "passage"]) {
    assert.ok(!isSensitiveName(name), name);
  }
});

Deno.test("sensitivePositions() caches per SQL text and still answers after many distinct statements", () => {
  const sql = "UPDATE u SET password = $1";
  assert.equal(sensitivePositions(sql), sensitivePositions(sql));
  for (let i = 0; i < 2000; i++) sensitivePositions(`UPDATE u SET token = $1 WHERE id = ${i}`);
  assert.deepEqual(sensitivePositions(sql), [1]);
});

Deno.test("boundValueMasker() masks a bound string where the server repeats it", () => {
  const mask = boundValueMasker([7, SECRET]);
  assert.equal(
    mask(`Key (token)=(${SECRET}) already exists.`),
    "Key (token)=(<string>) already exists.",
  );
  assert.equal(
    mask(`invalid input syntax for type integer: "${SECRET}"`),
    'invalid input syntax for type integer: "<string>"',
  );
  assert.equal(mask("nothing to hide"), "nothing to hide");
});

Deno.test("boundValueMasker() masks whole tokens only, so words stay whole", () => {
  const mask = boundValueMasker(["t", "key"]);
  assert.equal(
    mask('duplicate key value violates unique constraint "t_token_key"'),
    'duplicate <string> value violates unique constraint "t_token_key"',
  );
  assert.equal(mask("Key (token)=(t) already exists."), "Key (token)=(<string>) already exists.");
  assert.equal(boundValueMasker(["ünï"])("xünï ünï ünïx"), "xünï <string> ünïx");
  // A value that starts or ends with punctuation needs no boundary on that side.
  assert.equal(boundValueMasker(["-42x"])("a-42x b"), "a<string> b");
});

Deno.test("boundValueMasker() masks numbers of 3+ characters, not short ones", () => {
  const mask = boundValueMasker([10, 987654, -12345, 12345678901234567890n, 1.5]);
  assert.equal(
    mask("value too long for type character varying(10)"),
    "value too long for type character varying(10)",
  );
  assert.equal(
    mask("Failing row contains (10, 987654, -12345, 12345678901234567890, 1.5)."),
    "Failing row contains (10, <number>, <number>, <bigint>, <number>).",
  );
  assert.equal(mask("id 9876543 is not 987654"), "id 9876543 is not <number>");
  assert.equal(boundValueMasker([10, 5, true, null, new Date(0)])("any text 10"), "any text 10");
});

Deno.test("boundValueMasker() prefers the longest value and never masks a mask", () => {
  const mask = boundValueMasker(["string", "abc", "abc def"]);
  assert.equal(mask("(abc def) and abc and string"), "(<string>) and <string> and <string>");
  // Values with regular-expression syntax are matched literally.
  assert.equal(boundValueMasker(["a.c(x)*"])("abc(x) a.c(x)*"), "abc(x) <string>");
});

Deno.test("boundValueMasker() masks elements of arrays, objects, JSON text and bytes", () => {
  const mask = boundValueMasker([
    ["first-elem", 4242],
    { note: "in-object", nested: { deep: "deeper" } },
    '{"password": "from-json", "n": 31337}',
    new Uint8Array([0xde, 0xad, 0xbe, 0xef]),
  ]);
  assert.equal(
    mask(
      'Failing row contains ({first-elem,4242}, {"note": "in-object", "nested": {"deep": ' +
        '"deeper"}}, {"n": 31337, "password": "from-json"}, \\xdeadbeef).',
    ),
    'Failing row contains ({<string>,<number>}, {"note": "<string>", "nested": {"deep": ' +
      '"<string>"}}, {"n": <number>, "password": "<string>"}, <bytes:4>).',
  );
  // Keys are not masked: only values.
  assert.equal(boundValueMasker([{ note: "v" }])("note"), "note");
});

Deno.test("boundValueMasker() returns the text itself when no parameter has text", () => {
  const mask = boundValueMasker([]);
  const text = "Key (id)=(1) already exists.";
  assert.equal(mask(text), text);
  assert.equal(boundValueMasker([1, "", false])(text), text);
});
