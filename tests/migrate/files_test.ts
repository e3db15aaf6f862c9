import assert from "node:assert/strict";
import { MigrationError } from "../../src/errors.ts";
import {
  compareVersions,
  isMigrationFilename,
  isNoTransaction,
  migrationChecksum,
  normalizeNewlines,
  parseMigrationFiles,
  parseMigrationVersion,
  pgdbmOrder,
  pythonStrip,
  timestampVersion,
  transactionalBody,
} from "../../src/migrate/_files.ts";

Deno.test("parseMigrationVersion() reads numeric, Flyway and timestamp prefixes", () => {
  assert.deepEqual(parseMigrationVersion("001_create_users.sql"), [1n]);
  assert.deepEqual(parseMigrationVersion("10_x.sql"), [10n]);
  assert.deepEqual(parseMigrationVersion("V1__init.sql"), [1n]);
  assert.deepEqual(parseMigrationVersion("V1.2__more.sql"), [1n, 2n]);
  assert.deepEqual(parseMigrationVersion("V1_2__more.sql"), [1n, 2n]);
  assert.deepEqual(parseMigrationVersion("V2.0__same_as_2.sql"), [2n]);
  assert.deepEqual(parseMigrationVersion("20251025120000_add.sql"), [20251025120000n]);
  // pgdbm's create_migration writes "%Y%m%d_%H%M%S_name.sql".
  assert.deepEqual(parseMigrationVersion("20251025_120000_add.sql"), [20251025120000n]);
  assert.equal(parseMigrationVersion("schema.sql"), undefined);
  assert.equal(parseMigrationVersion("R__repeatable.sql"), undefined);
  assert.equal(parseMigrationVersion("001-dash.sql"), undefined);
});

Deno.test("compareVersions() orders by number, not by text", () => {
  assert.ok(compareVersions([2n], [10n]) < 0);
  assert.ok(compareVersions([1n, 2n], [1n, 10n]) < 0);
  assert.ok(compareVersions([1n], [1n, 1n]) < 0);
  assert.equal(compareVersions([3n], [3n]), 0);
});

Deno.test("isMigrationFilename() accepts *.sql and refuses hidden and other files", () => {
  assert.ok(isMigrationFilename("001_a.sql"));
  assert.ok(!isMigrationFilename(".001_a.sql"));
  assert.ok(!isMigrationFilename("001_a.SQL"));
  assert.ok(!isMigrationFilename("001_a.sql.bak"));
  assert.ok(!isMigrationFilename("README.md"));
  assert.ok(!isMigrationFilename("sub/001_a.sql"));
});

Deno.test("migrationChecksum() matches pgdbm's rule (CRLF to LF, stripped, SHA-256 hex)", async () => {
  // Values from Python: hashlib.sha256(content.replace("\r\n", "\n").strip().encode()).hexdigest()
  const selectOne = "17db4fd369edb9244b9f91d9aeed145c3d04ad8ba6e95d06247f07a63527d11a";
  assert.equal(await migrationChecksum("SELECT 1;"), selectOne);
  assert.equal(await migrationChecksum("\n  SELECT 1;\r\n\r\n"), selectOne);
  assert.equal(await migrationChecksum("\x1cSELECT 1;\x85"), selectOne);
  assert.equal(
    await migrationChecksum("\ufeffSELECT 1;"),
    "a35432496aa3b58f1818bc547ae78c87d1a5e702dcc7f28e2e1fdb38ff3bbf52",
  );
  assert.equal(
    await migrationChecksum("CREATE TABLE t (id int);\n"),
    "32a1db02f656154be7fa359e4878a6f2770ee9269d598f0557c940690d614a23",
  );
  assert.equal(
    await migrationChecksum("CREATE TABLE a (\r\n  id int\r\n);\r\n"),
    await migrationChecksum("CREATE TABLE a (\n  id int\n);\n"),
  );
  assert.notEqual(await migrationChecksum("SELECT 2;"), selectOne);
  assert.notEqual(await migrationChecksum("SELECT  1;"), selectOne);
});

Deno.test("pythonStrip() strips what Python's str.strip() strips", () => {
  assert.equal(pythonStrip(" \t\n\x1c\x85x y\u3000\v\f"), "x y");
  // A byte order mark is not whitespace for Python (unlike String.prototype.trim()).
  assert.equal(pythonStrip("\ufeffSELECT 1;\n"), "\ufeffSELECT 1;");
});

Deno.test("normalizeNewlines() turns CRLF and lone CR into LF", () => {
  assert.equal(normalizeNewlines("a\r\nb\rc\n"), "a\nb\nc\n");
  assert.equal(normalizeNewlines("plain\n"), "plain\n");
});

Deno.test("isNoTransaction() detects a -- pgdbm:no-transaction line", () => {
  assert.ok(isNoTransaction("-- pgdbm:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (x);"));
  assert.ok(isNoTransaction("-- first\r\n  --   PGDBM:NO-TRANSACTION  \r\nSELECT 1;"));
  assert.ok(!isNoTransaction("SELECT 1; -- pgdbm:no-transaction"));
  assert.ok(!isNoTransaction("SELECT 1;"));
});

Deno.test("isNoTransaction() accepts every marker line Python pgdbm accepts", () => {
  // pgdbm: re.search(r"^-- pgdbm:no-transaction(?=\s|$)", text, re.MULTILINE), on the text
  // as Python reads the file (CRLF and lone CR made LF). Each case: [text, pgdbm's answer].
  const pgdbm: [string, boolean][] = [
    ["-- pgdbm:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (x);", true],
    ["-- pgdbm:no-transaction  (CREATE INDEX CONCURRENTLY needs it)\nSELECT 1;", true],
    ["-- pgdbm:no-transaction please\nSELECT 1;", true],
    ["-- pgdbm:no-transaction -- why\nSELECT 1;", true],
    ["-- pgdbm:no-transaction\t\nSELECT 1;", true],
    ["-- pgdbm:no-transaction\u00a0(nbsp)\nSELECT 1;", true],
    ["-- pgdbm:no-transaction\x1c\nSELECT 1;", true],
    ["-- pgdbm:no-transaction\x85\nSELECT 1;", true],
    ["SELECT 1;\n-- pgdbm:no-transaction", true],
    ["-- header\r\n-- pgdbm:no-transaction\r\nSELECT 1;\r\n", true],
    ["-- header\r-- pgdbm:no-transaction (old Mac)\rSELECT 1;\r", true],
    ["/*\n-- pgdbm:no-transaction\n*/ SELECT 1;", true],
    ["-- pgdbm:no-transactional\nSELECT 1;", false],
    ["-- pgdbm:no-transaction;\nSELECT 1;", false],
    ["-- pgdbm:no-transaction-please\nSELECT 1;", false],
    ["-- pgdbm:no-transaction\ufeff\nSELECT 1;", false],
    ["-- pgdbm: no-transaction\nSELECT 1;", false],
    ["-- note: pgdbm:no-transaction\nSELECT 1;", false],
    ["SELECT 1; -- pgdbm:no-transaction\n", false],
    ["-- pgdbm:no_transaction\nSELECT 1;", false],
  ];
  for (const [text, expected] of pgdbm) {
    assert.equal(isNoTransaction(text), expected, JSON.stringify(text));
  }
  // Accepted beyond pgdbm (documented): blanks around "--", any case, a byte order mark.
  for (
    const text of [
      "  -- pgdbm:no-transaction\nSELECT 1;",
      "--pgdbm:no-transaction\nSELECT 1;",
      "--\tpgdbm:no-transaction (why)\nSELECT 1;",
      "-- PGDBM:No-Transaction\nSELECT 1;",
      "\ufeff-- pgdbm:no-transaction\nSELECT 1;",
    ]
  ) {
    assert.equal(isNoTransaction(text), true, JSON.stringify(text));
  }
  // A byte order mark counts only at the very start of the file.
  assert.equal(isNoTransaction("SELECT 1;\n\ufeff-- pgdbm:no-transaction\n"), false);
  // A line separator is not a line break for pgdbm.
  assert.equal(isNoTransaction("SELECT 1;\u2028-- pgdbm:no-transaction\n"), false);
});

Deno.test("parseMigrationFiles() orders by version number and computes checksums", async () => {
  const files = await parseMigrationFiles([
    { filename: "10_ten.sql", content: "SELECT 10;" },
    { filename: "2_two.sql", content: "SELECT 2;" },
    { filename: "V1__one.sql", content: "-- pgdbm:no-transaction\nSELECT 1;" },
    { filename: "20251025_120000_stamp.sql", content: "SELECT 3;" },
  ], "test");
  assert.deepEqual(files.map((f) => f.filename), [
    "V1__one.sql",
    "2_two.sql",
    "10_ten.sql",
    "20251025_120000_stamp.sql",
  ]);
  assert.deepEqual(files.map((f) => f.version), ["1", "2", "10", "20251025120000"]);
  assert.equal(files[0].noTransaction, true);
  assert.equal(files[1].noTransaction, false);
  assert.equal(files[1].checksum, await migrationChecksum("SELECT 2;"));
});

Deno.test("parseMigrationFiles() rejects two files of one version with MigrationError", async () => {
  await assert.rejects(
    parseMigrationFiles([
      { filename: "001_a.sql", content: "SELECT 1;" },
      { filename: "1_b.sql", content: "SELECT 2;" },
    ], "dir"),
    (error: unknown) => {
      assert.ok(error instanceof MigrationError);
      assert.match(error.message, /'001_a\.sql' and '1_b\.sql' have the same version 1/);
      return true;
    },
  );
});

Deno.test("parseMigrationFiles() rejects a name without a version and an empty file", async () => {
  await assert.rejects(
    parseMigrationFiles([{ filename: "schema.sql", content: "SELECT 1;" }], "dir"),
    (error: unknown) =>
      error instanceof MigrationError && error.filename === "schema.sql" &&
      /has no version/.test(error.message),
  );
  await assert.rejects(
    parseMigrationFiles([{ filename: "001_empty.sql", content: " \r\n\t" }], "dir"),
    (error: unknown) =>
      error instanceof MigrationError && error.filename === "001_empty.sql" &&
      /is empty/.test(error.message),
  );
});

Deno.test("parseMigrationFiles() refuses a file with no statement, whatever its line endings", async () => {
  for (
    const content of [
      "-- Only a comment\n-- and another;\n",
      "-- Old Mac line endings\r-- only comments\r",
      "-- CRLF\r\n/* block; */\r\n;;\r\n",
      "\ufeff-- a byte order mark, then a comment\n",
      "BEGIN;\n\n-- nothing here yet\n\nCOMMIT;",
      "-- pgdbm:no-transaction\n",
    ]
  ) {
    await assert.rejects(
      parseMigrationFiles([{ filename: "002_stub.sql", content }], "dir"),
      (error: unknown) => {
        assert.ok(error instanceof MigrationError, JSON.stringify(content));
        assert.equal(error.filename, "002_stub.sql");
        assert.match(error.message, /'002_stub\.sql' in 'dir': the file has no SQL statement/);
        assert.match(error.message, /add SQL to it or delete it/);
        return true;
      },
    );
  }
  // A CR-only file with a statement after its comment is fine.
  const [file] = await parseMigrationFiles([
    { filename: "001_cr.sql", content: "-- header\rCREATE TABLE t (id int);\r" },
  ], "dir");
  assert.equal(file.filename, "001_cr.sql");
});

Deno.test("transactionalBody() strips a BEGIN/COMMIT wrapper as pgdbm writes it", () => {
  const body = transactionalBody(
    "BEGIN;\n\nCREATE TABLE a (id int);\nCREATE TABLE b (id int);\n\nCOMMIT;",
    "x.sql",
  );
  assert.equal(body.unwrapped, true);
  assert.deepEqual(body.statements.map((s) => [s.text, s.line]), [
    ["CREATE TABLE a (id int)", 3],
    ["CREATE TABLE b (id int)", 4],
  ]);
  for (
    const content of [
      "start transaction;\nSELECT 1;\nend;",
      "BEGIN WORK;\nSELECT 1;\nCOMMIT TRANSACTION;\n-- trailing comment",
      "-- header\nBegin; SELECT 1; Commit;",
      "-- header\rBEGIN -- open\r;\rSELECT 1;\rCOMMIT -- close\r;\r",
    ]
  ) {
    const b = transactionalBody(content, "x.sql");
    assert.equal(b.unwrapped, true, content);
    assert.deepEqual(b.statements.map((s) => s.text), ["SELECT 1"]);
  }
});

Deno.test("transactionalBody() leaves DO blocks and function bodies alone", () => {
  const body = transactionalBody(
    "DO $$ BEGIN PERFORM 1; COMMIT; END $$;\nCREATE FUNCTION f() RETURNS int LANGUAGE sql " +
      "BEGIN ATOMIC SELECT 1; END;",
    "x.sql",
  );
  assert.equal(body.unwrapped, false);
  assert.equal(body.statements.length, 2);
});

Deno.test("transactionalBody() rejects transaction control inside the file", () => {
  for (
    const [content, command, line] of [
      ["CREATE TABLE a (id int);\nCOMMIT;\nCREATE TABLE b (id int);", "COMMIT", 2],
      ["BEGIN;\nCREATE TABLE a (id int);\nROLLBACK;", "BEGIN", 1],
      ["BEGIN ISOLATION LEVEL SERIALIZABLE;\nSELECT 1;\nCOMMIT;", "BEGIN", 1],
      ["SELECT 1;\nBEGIN;\nSELECT 2;\nCOMMIT;", "BEGIN", 2],
    ] as const
  ) {
    assert.throws(() => transactionalBody(content, "bad.sql"), (error: unknown) => {
      assert.ok(error instanceof MigrationError);
      assert.equal(error.filename, "bad.sql");
      assert.equal(error.line, line);
      assert.ok(error.message.includes(`'${command}'`), error.message);
      return true;
    });
  }
  // Savepoints are fine inside the migrator's transaction.
  const ok = transactionalBody("SAVEPOINT s;\nSELECT 1;\nROLLBACK TO SAVEPOINT s;", "ok.sql");
  assert.equal(ok.statements.length, 3);
});

Deno.test("timestampVersion() formats UTC YYYYMMDDHHMMSS", () => {
  assert.equal(timestampVersion(new Date(Date.UTC(2025, 9, 5, 7, 8, 9))), "20251005070809");
});

Deno.test("pgdbmOrder() sorts names as Python's sorted() does", () => {
  assert.deepEqual(pgdbmOrder(["0001_a.sql", "00010_b.sql", "2_c.sql", "10_d.sql"]), [
    "00010_b.sql",
    "0001_a.sql",
    "10_d.sql",
    "2_c.sql",
  ]);
  // By code point: an astral character sorts after U+FFFD (UTF-16 would put it first).
  assert.deepEqual(pgdbmOrder(["1_\u{1F600}.sql", "1_\uFFFD.sql"]), [
    "1_\uFFFD.sql",
    "1_\u{1F600}.sql",
  ]);
});
