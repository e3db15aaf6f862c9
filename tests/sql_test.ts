import assert from "node:assert/strict";
import { lineOfPosition, type SplitOptions, splitSqlStatements } from "../src/_sql.ts";

function texts(sql: string, options?: SplitOptions): string[] {
  return splitSqlStatements(sql, options).map((s) => s.text);
}

Deno.test("splitSqlStatements() splits on semicolons and reports 1-based start lines", () => {
  const sql = "CREATE TABLE a (id int);\n\nCREATE TABLE b (id int);\n  INSERT INTO a VALUES (1)";
  const statements = splitSqlStatements(sql);
  assert.deepEqual(statements.map((s) => [s.text, s.line]), [
    ["CREATE TABLE a (id int)", 1],
    ["CREATE TABLE b (id int)", 3],
    ["INSERT INTO a VALUES (1)", 4],
  ]);
  for (const s of statements) assert.equal(sql.slice(s.start, s.end), s.text);
});

Deno.test("splitSqlStatements() ignores semicolons inside single-quoted strings", () => {
  assert.deepEqual(texts("SELECT 'a;b', 'it''s; fine';SELECT 2"), [
    "SELECT 'a;b', 'it''s; fine'",
    "SELECT 2",
  ]);
});

Deno.test("splitSqlStatements() treats a backslash as an escape only in E'' strings", () => {
  assert.deepEqual(texts("SELECT E'a\\';b';SELECT 2"), ["SELECT E'a\\';b'", "SELECT 2"]);
  assert.deepEqual(texts("SELECT e'\\\\';SELECT 2"), ["SELECT e'\\\\'", "SELECT 2"]);
  // In a standard string the backslash is an ordinary character.
  assert.deepEqual(texts("SELECT 'a\\';SELECT 2"), ["SELECT 'a\\'", "SELECT 2"]);
  // An identifier ending in "e" does not start an E'' string.
  assert.deepEqual(texts("SELECT date'2020-01-01\\';SELECT 2"), [
    "SELECT date'2020-01-01\\'",
    "SELECT 2",
  ]);
});

Deno.test("splitSqlStatements() ignores semicolons inside double-quoted identifiers", () => {
  assert.deepEqual(texts('CREATE TABLE "a;""b" (id int);SELECT 1'), [
    'CREATE TABLE "a;""b" (id int)',
    "SELECT 1",
  ]);
});

Deno.test("splitSqlStatements() keeps dollar-quoted bodies with semicolons whole", () => {
  const sql = [
    "CREATE FUNCTION f() RETURNS trigger AS $$",
    "BEGIN",
    "  NEW.x := 1;",
    "  RETURN NEW;",
    "END;",
    "$$ LANGUAGE plpgsql;",
    "DO $body$ BEGIN PERFORM 1; PERFORM '$$'; END $body$;",
    "SELECT $1, a$b$c FROM t;",
  ].join("\n");
  const statements = splitSqlStatements(sql);
  assert.equal(statements.length, 3);
  assert.ok(statements[0].text.endsWith("$$ LANGUAGE plpgsql"));
  assert.equal(statements[1].line, 7);
  assert.equal(statements[1].text, "DO $body$ BEGIN PERFORM 1; PERFORM '$$'; END $body$");
  assert.equal(statements[2].line, 8);
  assert.equal(statements[2].text, "SELECT $1, a$b$c FROM t");
});

Deno.test("splitSqlStatements() skips line comments and nested block comments", () => {
  const sql = [
    "-- a comment; with a semicolon",
    "/* outer /* inner; */ still comment; */",
    "SELECT 1; -- trailing; comment",
    "SELECT /* ; */ 2;",
    "-- only a comment at the end;",
  ].join("\n");
  const statements = splitSqlStatements(sql);
  assert.deepEqual(statements.map((s) => [s.text, s.line]), [
    ["SELECT 1", 3],
    ["SELECT /* ; */ 2", 4],
  ]);
});

Deno.test("splitSqlStatements() drops empty statements", () => {
  assert.deepEqual(texts(";;  ; SELECT 1;; \n -- x\n ;"), ["SELECT 1"]);
  assert.deepEqual(texts(""), []);
  assert.deepEqual(texts("-- nothing\n/* here */"), []);
});

Deno.test("splitSqlStatements() does not split inside parentheses", () => {
  const sql = "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); " +
    "INSERT INTO b VALUES (2));SELECT 1";
  assert.equal(splitSqlStatements(sql).length, 2);
});

Deno.test("splitSqlStatements() keeps a BEGIN ATOMIC function body whole", () => {
  const sql = [
    "CREATE OR REPLACE FUNCTION f(x int) RETURNS int LANGUAGE sql",
    "BEGIN ATOMIC",
    "  SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END;",
    "  SELECT x;",
    "END;",
    "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END;",
    "BEGIN;",
    "SELECT 1;",
    "END;",
  ].join("\n");
  const statements = splitSqlStatements(sql);
  assert.deepEqual(statements.map((s) => s.line), [1, 6, 7, 8, 9]);
  assert.ok(statements[0].text.endsWith("END"));
  assert.equal(statements[2].text, "BEGIN");
});

Deno.test("splitSqlStatements() counts lines inside strings, bodies and comments", () => {
  const sql = "SELECT 'a\nb';\n/* c\nd */\nSELECT $$\n;\n$$;\nSELECT E'\\\n';\nSELECT 4";
  assert.deepEqual(splitSqlStatements(sql).map((s) => s.line), [1, 5, 8, 10]);
});

Deno.test("splitSqlStatements() runs an unterminated string to the end of the text", () => {
  assert.deepEqual(texts("SELECT 'oops; SELECT 2;"), ["SELECT 'oops; SELECT 2;"]);
  assert.deepEqual(texts("SELECT $x$ never closed; "), ["SELECT $x$ never closed;"]);
});

Deno.test("lineOfPosition() maps a server character position to a line", () => {
  const sql = "SELECT 1;\nSELECT 'é🙂';\nSELEC 3";
  const position = Array.from(sql).indexOf("S", 20) + 1;
  assert.equal(lineOfPosition(sql, 1), 1);
  assert.equal(lineOfPosition(sql, 11), 2);
  assert.equal(lineOfPosition(sql, position), 3);
});

Deno.test("splitSqlStatements() ends a -- comment at a carriage return, as psql does", () => {
  // Old Mac (CR-only) line endings: each comment ends at its CR, not at the end of the file.
  const sql =
    "-- The users service.\rCREATE TABLE a (id int);\r-- b next\rCREATE TABLE b (id int);\r";
  assert.deepEqual(splitSqlStatements(sql).map((s) => [s.text, s.line]), [
    ["CREATE TABLE a (id int)", 2],
    ["CREATE TABLE b (id int)", 4],
  ]);
  // A comment after a statement on its line ends at the CR too.
  assert.deepEqual(texts("SELECT 1; -- one\rSELECT 2 -- two\r;"), ["SELECT 1", "SELECT 2 -- two"]);
  // CRLF counts as one line break; a lone CR as one.
  assert.deepEqual(
    splitSqlStatements("SELECT 1;\r\n-- x\r\nSELECT 2;\r\rSELECT 'a\rb';\rSELECT 4;").map((s) =>
      s.line
    ),
    [1, 3, 5, 7],
  );
  assert.deepEqual(texts("-- only\r-- comments\r/* here */\r"), []);
});

Deno.test("lineOfPosition() counts a lone CR and a CRLF as one line break each", () => {
  const sql = "SELECT 1;\rSELECT 2;\r\nSELEC 3";
  assert.equal(lineOfPosition(sql, 11), 2);
  assert.equal(lineOfPosition(sql, sql.indexOf("SELEC ") + 1), 3);
});

Deno.test("splitSqlStatements() follows standard_conforming_strings as the text sets it", () => {
  const sql = [
    "SELECT 'a\\';SELECT 2;",
    "SET standard_conforming_strings = off;",
    "INSERT INTO t VALUES ('it\\'s; here');",
    "INSERT INTO t VALUES ('back\\\\slash;');",
    "SET standard_conforming_strings TO 'on';",
    "SELECT 'c\\';SELECT 4;",
  ].join("\n");
  assert.deepEqual(texts(sql), [
    "SELECT 'a\\'",
    "SELECT 2",
    "SET standard_conforming_strings = off",
    "INSERT INTO t VALUES ('it\\'s; here')",
    "INSERT INTO t VALUES ('back\\\\slash;')",
    "SET standard_conforming_strings TO 'on'",
    "SELECT 'c\\'",
    "SELECT 4",
  ]);
  // Spellings of the value and of the command; what leaves it off (an invalid value fails
  // on the server and changes nothing; other settings; text in a string).
  for (
    const [set, off] of [
      ["set session standard_conforming_strings to false", true],
      ["SET standard_conforming_strings = 'of'", true],
      ['SET standard_conforming_strings="0"', true],
      ["SET /* c */ standard_conforming_strings -- c\n= no", true],
      ["SELECT pg_catalog.set_config('standard_conforming_strings', 'off', false)", true],
      ["SET standard_conforming_strings = on", false],
      ["SET standard_conforming_strings = DEFAULT", false],
      ["RESET standard_conforming_strings", false],
      ["SET standard_conforming_strings = maybe", true],
      ["SET escape_string_warning = off", true],
      ["SELECT 'SET standard_conforming_strings = off'", true],
    ] as const
  ) {
    const split = texts(`SET standard_conforming_strings = off;${set};SELECT 'x\\';SELECT 2;`);
    // While off, 'x\';SELECT 2;' is one string; while on, the ; after 'x\' ends a statement.
    assert.equal(split.length, off ? 3 : 4, `${set}: ${JSON.stringify(split)}`);
  }
  // The starting value can be given, and RESET returns to it.
  assert.deepEqual(
    texts("SELECT 'x\\';SELECT 2;", { standardConformingStrings: false }),
    ["SELECT 'x\\';SELECT 2;"],
  );
  assert.equal(
    texts(
      "SET standard_conforming_strings = on; RESET standard_conforming_strings; SELECT 'x\\';1;",
      {
        standardConformingStrings: false,
      },
    ).length,
    3,
  );
  // SET LOCAL lasts until its transaction ends.
  assert.deepEqual(
    texts(
      "BEGIN; SET LOCAL standard_conforming_strings = off; SELECT 'a\\';b'; COMMIT; SELECT 'c\\';d';",
    ),
    [
      "BEGIN",
      "SET LOCAL standard_conforming_strings = off",
      "SELECT 'a\\';b'",
      "COMMIT",
      "SELECT 'c\\'",
      "d';",
    ],
  );
});

Deno.test("splitSqlStatements() reads the data block after COPY … FROM stdin as psql does", () => {
  const sql = [
    "CREATE TABLE t (a int, b text);",
    "COPY public.t (a, b) FROM stdin;",
    "1\ttab;semi'quote",
    "2\t\\N",
    "3\tback\\\\slash \\. not the end",
    "\\.",
    "",
    "-- after the data",
    "copy t FROM STDIN WITH (FORMAT csv);",
    '4,"x;y"',
    "\\.",
    "COPY t TO stdout;",
    "COPY t FROM '/tmp/stdin';",
    "SELECT 'from stdin';",
    "COPY t FROM stdin;",
  ].join("\n");
  const statements = splitSqlStatements(sql);
  assert.deepEqual(
    statements.map((s) => [s.text, s.line, s.copyData, s.copyDataLine]),
    [
      ["CREATE TABLE t (a int, b text)", 1, undefined, undefined],
      [
        "COPY public.t (a, b) FROM stdin",
        2,
        "1\ttab;semi'quote\n2\t\\N\n3\tback\\\\slash \\. not the end\n",
        3,
      ],
      ["copy t FROM STDIN WITH (FORMAT csv)", 9, '4,"x;y"\n', 10],
      ["COPY t TO stdout", 12, undefined, undefined],
      ["COPY t FROM '/tmp/stdin'", 13, undefined, undefined],
      ["SELECT 'from stdin'", 14, undefined, undefined],
      // At the end of the text: no data at all.
      ["COPY t FROM stdin", 15, "", 15],
    ],
  );
});

Deno.test("splitSqlStatements() takes COPY data to the end without \\., with any line ending", () => {
  // No terminator: the data runs to the end of the text, as psql reads it.
  assert.deepEqual(
    splitSqlStatements("COPY t FROM stdin;\n1\n2\n").map((s) => s.copyData),
    ["1\n2\n"],
  );
  // CRLF and CR-only files: the terminator line ends with its own line break.
  for (const eol of ["\r\n", "\r"]) {
    const sql = ["COPY t FROM stdin;", "1\tx", "\\.", "SELECT 2;", ""].join(eol);
    assert.deepEqual(
      splitSqlStatements(sql).map((s) => [s.text, s.line, s.copyData]),
      [["COPY t FROM stdin", 1, `1\tx${eol}`], ["SELECT 2", 4, undefined]],
    );
  }
  // A terminator with no line break at the very end.
  assert.deepEqual(splitSqlStatements("COPY t FROM stdin;\n1\n\\.").map((s) => s.copyData), [
    "1\n",
  ]);
  // SQL after the COPY's ; on its line runs after the data, as in psql.
  assert.deepEqual(
    splitSqlStatements("COPY t FROM stdin; SELECT 1;\n5\n\\.\nSELECT 2;").map((s) => [
      s.text,
      s.copyData,
    ]),
    [["COPY t FROM stdin", "5\n"], ["SELECT 1", undefined], ["SELECT 2", undefined]],
  );
  // A statement left open on that line goes on after the data, without it.
  assert.deepEqual(
    splitSqlStatements("COPY t FROM stdin; SELECT\n5\n\\.\n2;").map((s) => s.text),
    ["COPY t FROM stdin", "SELECT\n2"],
  );
});

Deno.test("splitSqlStatements() skips pg_dump's \\restrict lines and returns other psql commands", () => {
  const sql = [
    "--",
    "-- PostgreSQL database dump",
    "--",
    "",
    "\\restrict QGL0mCEpNtmLfslAjfdYxya",
    "",
    "SET statement_timeout = 0;",
    "SELECT 'a\\b', E'\\\\', $$\\x$$; -- \\not a command",
    "\\connect other",
    "SELECT 2;",
    "",
    "\\unrestrict QGL0mCEpNtmLfslAjfdYxya",
    "",
  ].join("\n");
  assert.deepEqual(
    splitSqlStatements(sql).map((s) => [s.text, s.line, s.psqlCommand]),
    [
      ["SET statement_timeout = 0", 7, undefined],
      ["SELECT 'a\\b', E'\\\\', $$\\x$$", 8, undefined],
      ["\\connect other", 9, "\\connect"],
      ["SELECT 2", 10, undefined],
    ],
  );
  // Output and display settings are skipped too; what changes the run is returned.
  assert.deepEqual(
    splitSqlStatements(
      [
        "\\set ON_ERROR_STOP 1",
        "\\set QUIET",
        "\\echo Loading; please wait",
        "\\pset format unaligned",
        "\\t",
        "\\o /dev/null",
        "\\encoding UTF-8",
        "\\unset ECHO",
        "SELECT 1;",
        "\\encoding LATIN1",
        "\\set name value",
        "\\i other.sql",
        "\\quit",
      ].join("\n"),
    ).map((s) => s.psqlCommand ?? s.text),
    ["SELECT 1", "\\encoding", "\\set", "\\i", "\\quit"],
  );
  // Inside a statement even \restrict is returned (the statement is not what psql runs).
  assert.deepEqual(
    splitSqlStatements("SELECT\n\\restrict x\n1;").map((s) => s.psqlCommand),
    ["\\restrict", undefined],
  );
});

Deno.test("splitSqlStatements() marks COPY … TO STDOUT, whose rows psql prints", () => {
  assert.deepEqual(
    splitSqlStatements(
      "COPY t TO stdout;COPY (SELECT 1) TO STDOUT WITH (FORMAT csv);COPY t TO '/tmp/stdout';" +
        "SELECT 1 AS to, 2 AS stdout;",
    ).map((s) => s.copyToStdout),
    [true, true, undefined, undefined],
  );
});
