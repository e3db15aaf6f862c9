import assert from "node:assert/strict";
import {
  firstKeyword,
  hasReturning,
  isCopyFromStdin,
  isReadStatement,
  mayBeginTransaction,
  mayCommitInside,
  mentionsConcurrently,
  setsSessionState,
} from "../src/_sql.ts";

Deno.test("firstKeyword() reads the first word past leading comments, upper case", () => {
  assert.equal(firstKeyword("select 1"), "SELECT");
  assert.equal(firstKeyword("  -- note\n/* x */ INSERT INTO t VALUES (1)"), "INSERT");
  assert.equal(firstKeyword("(SELECT 1)"), undefined);
  assert.equal(firstKeyword(""), undefined);
  assert.equal(firstKeyword("-- only a comment"), undefined);
});

Deno.test("isReadStatement() takes SELECT, WITH, VALUES, TABLE and SHOW past comments and (", () => {
  for (
    const sql of [
      "SELECT 1",
      "  with x AS (SELECT 1) SELECT * FROM x",
      "VALUES (1)",
      "TABLE t",
      "show search_path",
      "-- c\n/* d */ ( (select 1) )",
      "SELECT * FROM t FOR UPDATE",
      "WITH added AS (INSERT INTO t VALUES (1) RETURNING id) SELECT * FROM added",
    ]
  ) assert.equal(isReadStatement(sql), true, sql);
  for (
    const sql of [
      "INSERT INTO t VALUES (1)",
      "selection",
      "UPDATE t SET a = 1",
      "/* unclosed SELECT 1",
      "EXPLAIN SELECT 1",
      "",
    ]
  ) assert.equal(isReadStatement(sql), false, sql);
});

Deno.test("hasReturning() finds RETURNING outside strings, and (unlike the lexer) in comments", () => {
  assert.equal(hasReturning("INSERT INTO t VALUES (1) RETURNING id"), true);
  assert.equal(hasReturning("insert into t values (1) returning *"), true);
  assert.equal(hasReturning("INSERT INTO t VALUES ('returning')"), false);
  assert.equal(hasReturning("INSERT INTO t VALUES ('it''s returning')"), false);
  assert.equal(hasReturning("INSERT INTO returning_log VALUES (1)"), false);
  assert.equal(hasReturning("INSERT INTO t VALUES (1) -- returning"), true);
});

Deno.test("mayBeginTransaction() finds BEGIN or START TRANSACTION anywhere", () => {
  for (
    const sql of [
      "BEGIN",
      "begin isolation level serializable",
      "START  TRANSACTION",
      "SELECT 'begin'",
    ]
  ) assert.equal(mayBeginTransaction(sql), true, sql);
  for (const sql of ["SELECT 1", "COMMIT", "START", "beginning"]) {
    assert.equal(mayBeginTransaction(sql), false, sql);
  }
});

Deno.test("setsSessionState() finds SET (not SET LOCAL) and set_config(…, false)", () => {
  for (
    const sql of [
      "SET search_path = app",
      "  set session timezone = 'UTC'",
      "SELECT set_config('search_path', 'app', false)",
      "select SET_CONFIG('a.b', 'x', FALSE)",
    ]
  ) assert.equal(setsSessionState(sql), true, sql);
  for (
    const sql of [
      "SET LOCAL search_path = app",
      "SELECT set_config('search_path', 'app', true)",
      "UPDATE t SET a = 1",
      "RESET search_path",
    ]
  ) assert.equal(setsSessionState(sql), false, sql);
});

Deno.test("mayCommitInside() finds CALL, DO, and a later transaction-control statement", () => {
  for (
    const sql of [
      "CALL p()",
      "  do $$ BEGIN COMMIT; END $$",
      "INSERT INTO t VALUES (1); COMMIT",
      "SELECT 1;begin",
      "SELECT ';  rollback'",
    ]
  ) assert.equal(mayCommitInside(sql), true, sql);
  for (const sql of ["SELECT 1", "COMMIT", "SELECT 1; SELECT 2", "called"]) {
    assert.equal(mayCommitInside(sql), false, sql);
  }
});

Deno.test("mentionsConcurrently() and isCopyFromStdin() find their words anywhere", () => {
  assert.equal(mentionsConcurrently("CREATE INDEX CONCURRENTLY i ON t (a)"), true);
  assert.equal(mentionsConcurrently("refresh materialized view concurrently v"), true);
  assert.equal(mentionsConcurrently("CREATE INDEX i ON t (a)"), false);
  assert.equal(mentionsConcurrently("CREATE INDEX i ON concurrently_log (a)"), false);
  assert.equal(isCopyFromStdin("COPY t (a, b) FROM STDIN"), true);
  assert.equal(isCopyFromStdin("copy t from\n  stdin with (format csv)"), true);
  assert.equal(isCopyFromStdin("COPY t TO STDOUT"), false);
  assert.equal(isCopyFromStdin("COPY t FROM '/tmp/x'"), false);
});
