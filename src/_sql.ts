/**
 * A statement splitter for migration files, lexing SQL the way `psql` does: a `;` ends a
 * statement only outside single-quoted strings (`'…'`, `E'…'` with backslash escapes),
 * double-quoted identifiers, dollar-quoted bodies (`$$…$$`, `$tag$…$tag$`), `--` and nested
 * `/* *\/` comments, parentheses (rules with several actions), and the `BEGIN … END` of a
 * SQL-standard function body (`CREATE FUNCTION … BEGIN ATOMIC … END`). Like psql, a `--`
 * comment ends at a line feed or a carriage return, so files with old Mac (CR-only) line
 * endings split as they apply with `psql -f`; a lone CR also counts as a line break in the
 * line numbers reported. Like psql, it follows `standard_conforming_strings` as the text
 * sets it (`SET standard_conforming_strings = off` … `= on`, `RESET`): while it is off, a
 * backslash escapes the next character in every `'…'` string, as the server then reads it.
 * And like `psql -f`, it reads the data block after a `COPY … FROM STDIN` statement (the
 * lines after the statement's line, up to a line `\.`) as that statement's data, not as SQL.
 * A backslash outside quotes and comments starts a psql meta-command, which runs to the end
 * of its line. Between statements, those that change nothing on the server and nothing in
 * how psql runs the rest are skipped: `\restrict` and `\unrestrict` (which pg_dump writes
 * around a dump), output and display (`\echo`, `\qecho`, `\warn`, `\o`, `\pset`, `\timing`,
 * `\t`, `\a`, `\x`, `\H`, `\C`, `\f`), `\encoding UTF8`, and `\set`/`\unset` of psql's
 * display and error variables (`ECHO`, `ECHO_HIDDEN`, `QUIET`, `ON_ERROR_STOP`, `VERBOSITY`,
 * `SHOW_CONTEXT`). Any other is returned with {@link SqlStatement.psqlCommand} set, for the
 * caller to refuse.
 *
 * It also answers the small questions asked of one statement (its first keyword, whether it
 * only reads, has `RETURNING`, may `BEGIN`, sets session state, may commit inside, says
 * `CONCURRENTLY` or `FROM STDIN`), each as its own small regular expression: one place for
 * them, with what the lexer would answer differently said beside each.
 *
 * @module
 */

/** One statement of a SQL text. */
export interface SqlStatement {
  /**
   * The statement from its first token up to, not including, the `;` that ends it, with
   * trailing whitespace removed. Comments before the first token are not part of it.
   */
  text: string;
  /** 1-based line of the statement's first token. */
  line: number;
  /** Offset of the first token in the input. */
  start: number;
  /** Offset just past the last character of {@link SqlStatement.text} in the input. */
  end: number;
  /**
   * For a `COPY … FROM STDIN` statement, the data block that follows it, as `psql -f` reads
   * it: the lines after the line the statement ends on, up to (not including) a line that
   * is exactly `\.`, or to the end of the text; each line with its line break. An empty
   * string when there is no line. `undefined` for every other statement.
   */
  copyData?: string;
  /** 1-based line of the first line of {@link SqlStatement.copyData}. */
  copyDataLine?: number;
  /**
   * True for a `COPY … TO STDOUT` statement, whose rows psql prints (a migration has
   * nowhere to print them).
   */
  copyToStdout?: boolean;
  /**
   * Set when this entry is a psql meta-command, not SQL: its name, such as `\connect`
   * ({@link SqlStatement.text} is then the whole command line). No server runs it.
   */
  psqlCommand?: string;
}

const IDENT_START = /[A-Za-z_\u0080-\uffff]/;
const IDENT_PART = /[A-Za-z0-9_$\u0080-\uffff]/;
const DOLLAR_TAG = /\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$/y;
const NUMBER_PART = /[A-Za-z0-9_.]/;
const LINE_END = /[\n\r]/g;
const FUNCTION_HEAD_WORDS = new Set(["create", "function", "procedure", "or", "replace"]);

/** Options of {@link splitSqlStatements}. */
export interface SplitOptions {
  /**
   * `standard_conforming_strings` when the text starts (what a `RESET` goes back to);
   * statements of the text that set it are followed from there.
   *
   * @default {true}
   */
  standardConformingStrings?: boolean;
}

/**
 * Splits SQL text into statements. Statements that hold only whitespace and comments are
 * dropped; a last statement without a `;` is kept. Unterminated quotes, comments and
 * dollar-quoted bodies run to the end of the text (the server then reports them).
 *
 * @param sql The SQL text.
 * @param options The session's `standard_conforming_strings` at the start.
 * @returns The statements in order, each with its 1-based start line.
 *
 * @example Split a file with a function body
 * ```ts
 * import { splitSqlStatements } from "./_sql.ts";
 * const statements = splitSqlStatements(
 *   "CREATE TABLE t (id int);\nCREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;",
 * );
 * // statements[1].line === 2
 * ```
 */
export function splitSqlStatements(sql: string, options: SplitOptions = {}): SqlStatement[] {
  const initialStd = options.standardConformingStrings ?? true;
  // The session value, and the one a SET LOCAL holds until its transaction ends.
  let sessionStd = initialStd;
  let localStd: boolean | undefined;
  const statements: SqlStatement[] = [];
  const n = sql.length;
  let i = 0;
  let line = 1;
  let start = -1;
  let startLine = 1;
  let parenDepth = 0;
  let beginDepth = 0;
  let identifierCount = 0;
  let heads: string[] = [];
  // COPY … FROM STDIN: tokens of the statement so far, where FROM was, and what was seen.
  let tokens = 0;
  let fromToken = -1;
  let isCopy = false;
  let copyFromStdin = false;
  let toToken = -1;
  let copyToStdout = false;
  // The data block of the COPY just ended: lexing jumps over it on reaching `from`; a
  // statement started before it (after the COPY's `;`, on its line) leaves it out.
  let jump: { from: number; to: number } | undefined;
  let gap: { from: number; to: number } | undefined;

  const finish = (end: number): void => {
    if (start >= 0) {
      let text = sql.slice(start, end).trimEnd();
      if (gap !== undefined && start < gap.from && end > gap.to) {
        text = (sql.slice(start, gap.from) + sql.slice(gap.to, end)).trimEnd();
      }
      statements.push({ text, line: startLine, start, end: start + text.length });
      if (copyToStdout) statements[statements.length - 1].copyToStdout = true;
      gap = undefined;
      const change = stdStringsChange(text, initialStd);
      if (change === "end") localStd = undefined;
      else if (change?.local === true) localStd = change.value;
      else if (change !== undefined) {
        sessionStd = change.value;
        localStd = undefined;
      }
    }
    start = -1;
    parenDepth = 0;
    beginDepth = 0;
    identifierCount = 0;
    heads = [];
    tokens = 0;
    fromToken = -1;
    isCopy = false;
    copyFromStdin = false;
    toToken = -1;
    copyToStdout = false;
  };

  // After the `;` at `i` of a COPY … FROM STDIN: finds its data block, as psql reads it.
  const copyBlock = (statement: SqlStatement): void => {
    let from = n;
    statement.copyDataLine = line;
    for (let j = i + 1; j < n; j++) {
      if (sql[j] === "\n" || sql[j] === "\r") {
        from = sql[j] === "\r" && sql[j + 1] === "\n" ? j + 2 : j + 1;
        statement.copyDataLine = line + 1;
        break;
      }
    }
    let lineStart = from;
    let to = n;
    let end = n;
    while (lineStart < n) {
      let eol = lineStart;
      while (eol < n && sql[eol] !== "\n" && sql[eol] !== "\r") eol++;
      const next = eol >= n ? n : sql[eol] === "\r" && sql[eol + 1] === "\n" ? eol + 2 : eol + 1;
      if (sql.slice(lineStart, eol) === "\\.") {
        end = lineStart;
        to = next;
        break;
      }
      lineStart = next;
    }
    statement.copyData = sql.slice(from, end);
    jump = { from, to };
  };

  // Skips a quoted run that started at `i` (the opening quote) and returns the offset after
  // the closing quote. `backslash` is true for E'' strings.
  const skipQuoted = (quote: string, backslash: boolean): number => {
    let j = i + 1;
    while (j < n) {
      const c = sql[j];
      if (isLineBreak(sql, j)) line++;
      if (backslash && c === "\\") {
        if (isLineBreak(sql, j + 1)) line++;
        j += 2;
        continue;
      }
      if (c === quote) {
        if (sql[j + 1] === quote) {
          j += 2;
          continue;
        }
        return j + 1;
      }
      j++;
    }
    return n;
  };

  while (i < n) {
    if (jump !== undefined && i >= jump.from) {
      // Skip the COPY's data block (and its `\.` line), counting its lines.
      for (let j = i; j < jump.to; j++) if (isLineBreak(sql, j)) line++;
      if (start >= 0) gap = { from: jump.from, to: jump.to };
      i = Math.max(i, jump.to);
      jump = undefined;
      if (i >= n) break;
    }
    const c = sql[i];
    if (c === "\n" || c === "\r") {
      if (isLineBreak(sql, i)) line++;
      i++;
      continue;
    }
    if (c === " " || c === "\t" || c === "\f" || c === "\v") {
      i++;
      continue;
    }
    if (c === "-" && sql[i + 1] === "-") {
      // psql's lexer: a line comment runs up to a line feed or a carriage return.
      LINE_END.lastIndex = i;
      i = LINE_END.exec(sql) === null ? n : LINE_END.lastIndex - 1;
      continue;
    }
    if (c === "/" && sql[i + 1] === "*") {
      let depth = 1;
      i += 2;
      while (i < n && depth > 0) {
        if (sql[i] === "/" && sql[i + 1] === "*") {
          depth++;
          i += 2;
        } else if (sql[i] === "*" && sql[i + 1] === "/") {
          depth--;
          i += 2;
        } else {
          if (isLineBreak(sql, i)) line++;
          i++;
        }
      }
      continue;
    }
    if (c === ";") {
      if (parenDepth === 0 && beginDepth === 0) {
        const copy = copyFromStdin && start >= 0;
        finish(i);
        if (copy) copyBlock(statements[statements.length - 1]);
      }
      i++;
      continue;
    }
    if (c === "\\") {
      // psql: a meta-command, up to the end of its line.
      LINE_END.lastIndex = i;
      const eol = LINE_END.exec(sql) === null ? n : LINE_END.lastIndex - 1;
      const text = sql.slice(i, eol).trimEnd();
      const name = /^\\[^\s\\]*/.exec(text)![0];
      if (start >= 0 || !isHarmlessPsqlCommand(text, name)) {
        statements.push({ text, line, start: i, end: i + text.length, psqlCommand: name });
      }
      i = eol;
      continue;
    }
    if (start < 0) {
      start = i;
      startLine = line;
    }
    tokens++;
    if (c === "'") {
      i = skipQuoted("'", !(localStd ?? sessionStd));
      continue;
    }
    if (c === '"') {
      i = skipQuoted('"', false);
      continue;
    }
    if (c === "$") {
      DOLLAR_TAG.lastIndex = i;
      const match = DOLLAR_TAG.exec(sql);
      if (match === null) {
        i++;
        continue;
      }
      const tag = match[0];
      const close = sql.indexOf(tag, i + tag.length);
      const end = close === -1 ? n : close + tag.length;
      for (let j = i; j < end; j++) if (isLineBreak(sql, j)) line++;
      i = end;
      continue;
    }
    if (c === "(") {
      parenDepth++;
      i++;
      continue;
    }
    if (c === ")") {
      if (parenDepth > 0) parenDepth--;
      i++;
      continue;
    }
    if (c >= "0" && c <= "9") {
      while (i < n && NUMBER_PART.test(sql[i])) i++;
      continue;
    }
    if (IDENT_START.test(c)) {
      let j = i + 1;
      while (j < n && IDENT_PART.test(sql[j])) j++;
      const word = sql.slice(i, j);
      if ((word === "e" || word === "E") && sql[j] === "'") {
        i = j; // the opening quote
        i = skipQuoted("'", true);
        continue;
      }
      i = j;
      const lower = word.toLowerCase();
      if (tokens === 1 && lower === "copy") isCopy = true;
      if (isCopy && parenDepth === 0) {
        if (lower === "from") fromToken = tokens;
        else if (lower === "stdin" && fromToken === tokens - 1) copyFromStdin = true;
        else if (lower === "to") toToken = tokens;
        else if (lower === "stdout" && toToken === tokens - 1) copyToStdout = true;
      }
      if (identifierCount < 4 && FUNCTION_HEAD_WORDS.has(lower)) heads[identifierCount] = lower[0];
      identifierCount++;
      if (parenDepth === 0 && isFunctionHead(heads)) {
        if (lower === "begin") beginDepth++;
        else if (lower === "case" && beginDepth >= 1) beginDepth++;
        else if (lower === "end" && beginDepth > 0) beginDepth--;
      }
      continue;
    }
    i++;
  }
  finish(n);
  return statements;
}

const SET_STD = /^SET\s+(SESSION\s+|LOCAL\s+)?STANDARD_CONFORMING_STRINGS\s*(?:=|\bTO\b)\s*(.*)$/is;
const SET_CONFIG_STD =
  /^SELECT\s+(?:PG_CATALOG\s*\.\s*)?SET_CONFIG\s*\(\s*'standard_conforming_strings'\s*,\s*'([^']*)'\s*,\s*(TRUE|FALSE)\s*\)$/is;
const RESET_STD = /^(?:RESET\s+(?:STANDARD_CONFORMING_STRINGS|ALL)|DISCARD\s+ALL)$/is;
const TRANSACTION_END =
  /^(?:COMMIT|END|ROLLBACK|ABORT)(?:\s+(?:WORK|TRANSACTION)|\s+AND\s+(?:NO\s+)?CHAIN)*$/is;

/**
 * How a statement changes `standard_conforming_strings`: a new value (`local` for a
 * `SET LOCAL`, which lasts until its transaction ends), `"end"` when it ends a transaction,
 * or `undefined`. Values are read as PostgreSQL reads a boolean setting.
 */
function stdStringsChange(
  text: string,
  initial: boolean,
): { value: boolean; local: boolean } | "end" | undefined {
  const plain = text.replace(/--[^\n\r]*/g, " ").replace(/\/\*[\s\S]*?\*\//g, " ").trim();
  if (TRANSACTION_END.test(plain)) return "end";
  if (RESET_STD.test(plain)) return { value: initial, local: false };
  const set = SET_STD.exec(plain);
  if (set !== null) {
    const raw = set[2].trim();
    const value = /^default$/i.test(raw)
      ? initial
      : parseBoolSetting(raw.replace(/^(['"])(.*)\1$/s, "$2"));
    return value === undefined ? undefined : { value, local: /^local/i.test(set[1] ?? "") };
  }
  const config = SET_CONFIG_STD.exec(plain);
  if (config !== null) {
    const value = parseBoolSetting(config[1]);
    return value === undefined ? undefined : { value, local: config[2].toLowerCase() === "true" };
  }
  return undefined;
}

/** PostgreSQL's `parse_bool`: on/off, true/false, yes/no, 1/0 and unambiguous prefixes. */
function parseBoolSetting(raw: string): boolean | undefined {
  const value = raw.trim().toLowerCase();
  if (value === "") return undefined;
  if (value === "1" || value === "on") return true;
  if (value === "0" || (value.length >= 2 && "off".startsWith(value))) return false;
  if ("true".startsWith(value) || "yes".startsWith(value)) return true;
  if ("false".startsWith(value) || "no".startsWith(value)) return false;
  return undefined;
}

const HARMLESS_COMMANDS = new Set([
  "\\restrict",
  "\\unrestrict",
  "\\echo",
  "\\qecho",
  "\\warn",
  "\\o",
  "\\out",
  "\\pset",
  "\\timing",
  "\\t",
  "\\a",
  "\\x",
  "\\H",
  "\\C",
  "\\f",
]);
const HARMLESS_SET =
  /^\\(?:set|unset)\s+(?:ECHO|ECHO_HIDDEN|QUIET|ON_ERROR_STOP|VERBOSITY|SHOW_CONTEXT)(?:\s|$)/;
/** The file's own encoding, which the migrator already reads it in. */
const HARMLESS_ENCODING = /^\\encoding\s+['"]?UTF-?8['"]?\s*$/i;

/**
 * True for a psql meta-command that changes nothing on the server nor in how psql runs the
 * rest of the file, so skipping it applies the file as psql does.
 */
function isHarmlessPsqlCommand(text: string, name: string): boolean {
  return HARMLESS_COMMANDS.has(name) || HARMLESS_SET.test(text) || HARMLESS_ENCODING.test(text);
}

/** True when `sql[i]` ends a line: a LF, or a CR not followed by a LF (CRLF counts once). */
function isLineBreak(sql: string, i: number): boolean {
  const c = sql[i];
  return c === "\n" || (c === "\r" && sql[i + 1] !== "\n");
}

/** True when the statement so far starts with CREATE [OR REPLACE] FUNCTION|PROCEDURE. */
function isFunctionHead(heads: string[]): boolean {
  if (heads[0] !== "c") return false;
  if (heads[1] === "f" || heads[1] === "p") return true;
  return heads[1] === "o" && heads[2] === "r" && (heads[3] === "f" || heads[3] === "p");
}

/**
 * Converts a 1-based character position reported by PostgreSQL (counted in characters,
 * not UTF-16 units) into a 1-based line number of `sql`.
 *
 * @param sql The SQL text the position refers to.
 * @param position The server's 1-based position.
 * @returns The 1-based line holding that position.
 */
export function lineOfPosition(sql: string, position: number): number {
  let line = 1;
  let chars = 0;
  let previous = "";
  for (const ch of sql) {
    chars++;
    if (chars >= position) break;
    if (ch === "\n" || ch === "\r") line++;
    if (ch === "\n" && previous === "\r") line--; // CRLF is one line break
    previous = ch;
  }
  return line;
}

// The small questions asked of one statement's text. Each answers as the regular
// expression it replaced did, without the lexer above; where the lexer would answer
// differently (a keyword inside a comment, a dollar-quoted body or a quoted identifier), the
// comment says so: these answers are cheap guesses whose mistakes are harmless, as stated.

const LEADING_COMMENTS = String.raw`^\s*(?:(?:--[^\n]*\n|\/\*[\s\S]*?\*\/)\s*)*`;
const FIRST_KEYWORD = new RegExp(`${LEADING_COMMENTS}([A-Za-z]+)`);
const READ_STATEMENT = new RegExp(
  `${LEADING_COMMENTS}(?:\\(\\s*)*(?:select|with|values|table|show)\\b`,
  "i",
);
const RETURNING = /\breturning\b/i;
const STRING_LITERAL = /'(?:[^']|'')*'/g;
const BEGIN_STATEMENT = /\b(begin|start\s+transaction)\b/i;
const SESSION_SET = /^\s*set\s+(?!local\b)|set_config\s*\([^)]*,\s*false\s*\)/i;
const COMMITS_INSIDE = /^\s*(?:call|do)\b|;\s*(?:commit|end|begin|start|rollback|savepoint)\b/i;
const CONCURRENTLY = /\bconcurrently\b/i;
const COPY_FROM_STDIN = /\bFROM\s+STDIN\b/i;

/**
 * The statement's first keyword past leading comments, upper case (`SELECT`, `INSERT`…), or
 * `undefined` when it does not start with a word (`(SELECT 1)`, an empty text).
 *
 * @param sql One statement.
 * @returns The keyword, or `undefined`.
 */
export function firstKeyword(sql: string): string | undefined {
  return FIRST_KEYWORD.exec(sql)?.[1].toUpperCase();
}

/**
 * True when the statement reads only, as far as its first keyword tells (past leading
 * comments and parentheses): `SELECT`, `WITH`, `VALUES`, `TABLE` or `SHOW`. A `WITH` whose
 * query writes (`WITH x AS (INSERT … RETURNING …) SELECT …`) and `SELECT … FOR UPDATE`
 * count as reads here; what runs them must tell them apart otherwise.
 *
 * @param sql One statement.
 * @returns Whether a read replica may answer it.
 */
export function isReadStatement(sql: string): boolean {
  return READ_STATEMENT.test(sql);
}

/**
 * True when the statement has the word `RETURNING` outside `'…'` strings. Unlike the
 * lexer, it also finds it in a comment, a quoted identifier or a dollar-quoted body (then
 * `executeAndReturnId()` adds no `RETURNING id` and returns what the statement returns).
 *
 * @param sql One statement.
 * @returns Whether it has a `RETURNING` clause.
 */
export function hasReturning(sql: string): boolean {
  return RETURNING.test(sql.replace(STRING_LITERAL, "''"));
}

/**
 * True when the text may open a transaction: it has the word `BEGIN` or the words `START
 * TRANSACTION` anywhere. Unlike the lexer, this also matches inside strings, comments and
 * function bodies (`BEGIN ATOMIC`, `DO $$ BEGIN … END $$`): over-matching only costs a
 * harmless `ROLLBACK` when the connection goes back to the pool.
 *
 * @param sql A statement or several.
 * @returns Whether a transaction may be open after it.
 */
export function mayBeginTransaction(sql: string): boolean {
  return BEGIN_STATEMENT.test(sql);
}

/**
 * True when the statement changes the session's state: it starts with `SET` (not `SET
 * LOCAL`), or calls `set_config(…, false)` anywhere (a call whose arguments hold a `)` is
 * not seen).
 *
 * @param sql One statement.
 * @returns Whether its effect outlives its transaction.
 */
export function setsSessionState(sql: string): boolean {
  return SESSION_SET.test(sql);
}

/**
 * True when the text may commit part of its work before a cancel stops it: a `CALL` or a
 * `DO` (a procedure may `COMMIT`), or a later statement of several that controls a
 * transaction (`; COMMIT`, `; BEGIN`…). Unlike the lexer, a `;` inside a string or a
 * comment counts too, which only makes the answer more cautious.
 *
 * @param sql A statement or several.
 * @returns Whether running it again after a cancel could repeat committed work.
 */
export function mayCommitInside(sql: string): boolean {
  return COMMITS_INSIDE.test(sql);
}

/**
 * True when the word `CONCURRENTLY` stands anywhere in the statement (`CREATE INDEX
 * CONCURRENTLY`, `REINDEX … CONCURRENTLY`, `REFRESH MATERIALIZED VIEW CONCURRENTLY`, `DETACH
 * PARTITION … CONCURRENTLY`). Unlike the lexer, it also finds it in strings and comments.
 *
 * @param sql One statement.
 * @returns Whether it may wait for other transactions on purpose.
 */
export function mentionsConcurrently(sql: string): boolean {
  return CONCURRENTLY.test(sql);
}

/**
 * True when the words `FROM STDIN` stand anywhere in the statement, as in `COPY … FROM
 * STDIN`. Unlike the lexer, it also finds them in strings and comments.
 *
 * @param sql A `COPY` statement.
 * @returns Whether it reads its rows from the client.
 */
export function isCopyFromStdin(sql: string): boolean {
  return COPY_FROM_STDIN.test(sql);
}

/** A `$n` placeholder (not the tail of a name such as `a$1`); search {@link codeOnly}'s text. */
export const PARAMETER = /(?<![A-Za-z0-9_$\u0080-\uffff])\$([0-9]+)/g;

/**
 * The SQL with every single-quoted string (`'…'`, `E'…'`), double-quoted identifier,
 * dollar-quoted body and comment replaced by spaces of the same length (line breaks kept),
 * so that a search for code (`$1`, `{{…}}`) finds it only where the server reads it as
 * code. Strings follow `standard_conforming_strings = on`, the server's default.
 *
 * @param sql The SQL text.
 * @returns The text of the same length with only its code left.
 */
export function codeOnly(sql: string): string {
  const n = sql.length;
  let out = "";
  let i = 0;
  const blank = (from: number, to: number): void => {
    out += sql.slice(from, to).replace(/[^\n\r]/g, " ");
  };
  while (i < n) {
    const c = sql[i];
    let end = -1;
    if (c === "-" && sql[i + 1] === "-") {
      LINE_END.lastIndex = i;
      end = LINE_END.exec(sql) === null ? n : LINE_END.lastIndex - 1;
    } else if (c === "/" && sql[i + 1] === "*") {
      let depth = 1;
      end = i + 2;
      while (end < n && depth > 0) {
        const pair = sql.slice(end, end + 2);
        if (pair === "/*" || pair === "*/") {
          depth += pair === "/*" ? 1 : -1;
          end += 2;
        } else end++;
      }
    } else if (c === "'" || c === '"') {
      const escapes = c === "'" && /[eE]/.test(sql[i - 1] ?? "") &&
        !IDENT_PART.test(sql[i - 2] ?? "");
      end = i + 1;
      while (end < n) {
        if (escapes && sql[end] === "\\") end += 2;
        else if (sql[end] === c && sql[end + 1] === c) end += 2;
        else if (sql[end++] === c) break;
      }
      end = Math.min(end, n);
    } else if (c === "$" && !IDENT_PART.test(sql[i - 1] ?? "")) {
      DOLLAR_TAG.lastIndex = i;
      const tag = DOLLAR_TAG.exec(sql)?.[0];
      if (tag !== undefined) {
        const close = sql.indexOf(tag, i + tag.length);
        end = close === -1 ? n : close + tag.length;
      }
    }
    if (end === -1) {
      out += c;
      i++;
    } else {
      blank(i, end);
      i = end;
    }
  }
  return out;
}

/**
 * How many parameters a statement takes: the highest `$n` in its code (not in strings,
 * quoted identifiers, dollar-quoted bodies or comments), as the server counts them.
 *
 * @param sql The SQL text.
 * @returns The highest `n`, or 0 when there is none.
 */
export function parameterCount(sql: string): number {
  let count = 0;
  for (const match of codeOnly(sql).matchAll(PARAMETER)) count = Math.max(count, +match[1]);
  return count;
}
