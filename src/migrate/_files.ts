/**
 * Migration files as data: which names count, their version and order, pgdbm's checksum,
 * the `-- pgdbm:no-transaction` marker, and the `BEGIN;`/`COMMIT;` wrapper that pgdbm's
 * `create_migration` writes (stripped so the migrator's own transaction stays in charge).
 *
 * @module
 */

import { MigrationError } from "../errors.ts";
import { sha256Hex } from "../_hash.ts";
import { splitSqlStatements, type SqlStatement } from "../_sql.ts";

/** A migration file's name and text, as a source returns it. */
export interface MigrationFileContent {
  /** The file name, such as `001_create_users.sql`. */
  readonly filename: string;
  /** The file's text. */
  readonly content: string;
}

/** A migration file with its parsed version and checksum. */
export interface ParsedMigrationFile extends MigrationFileContent {
  /** The version as dotted decimal, such as `"1"`, `"1.2"` or `"20251025120000"`. */
  readonly version: string;
  /** The version's numeric parts, for ordering. */
  readonly versionParts: readonly bigint[];
  /** SHA-256 hex of the content by pgdbm's rule. */
  readonly checksum: string;
  /** True when the file has a `-- pgdbm:no-transaction` line. */
  readonly noTransaction: boolean;
}

const NUMERIC_PREFIX = /^(\d+)_/;
const PGDBM_TIMESTAMP = /^(\d{8})_(\d{6})_/;
const FLYWAY = /^V(\d+(?:[._]\d+)*)__/;
/**
 * A marker line's start: `--`, then `pgdbm:no-transaction`, which must be followed by
 * Python's whitespace or the end of the line (checked in {@link isNoTransaction}). pgdbm's
 * rule is `^-- pgdbm:no-transaction(?=\s|$)`; this one also takes blanks before and after
 * `--` and any letter case.
 */
const NO_TRANSACTION = /^[ \t]*--[ \t]*pgdbm:no-transaction/i;
const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]*\.sql$/;

/**
 * Python's `str.isspace()` set, which `str.strip()` removes. It differs from JavaScript's
 * `trim()`: it includes U+001C–U+001F and U+0085 and excludes U+FEFF (the byte order mark).
 */
const PY_WHITESPACE = new Set(
  [
    "\t",
    "\n",
    "\v",
    "\f",
    "\r",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x1f",
    " ",
    "\x85",
    "\xa0",
    "\u1680",
    "\u2000",
    "\u2001",
    "\u2002",
    "\u2003",
    "\u2004",
    "\u2005",
    "\u2006",
    "\u2007",
    "\u2008",
    "\u2009",
    "\u200a",
    "\u2028",
    "\u2029",
    "\u202f",
    "\u205f",
    "\u3000",
  ],
);

/**
 * True when `name` is a migration file name: ends in `.sql` and is not hidden. (Whether it
 * carries a version is checked by {@link parseMigrationVersion}.)
 *
 * @param name A file name without directories.
 * @returns Whether a source lists it.
 */
export function isMigrationFilename(name: string): boolean {
  return name.endsWith(".sql") && !name.startsWith(".") && !/[/\\]/.test(name);
}

/**
 * True when `name` is safe to use as a path segment when writing or fetching a file.
 *
 * @param name A file name.
 * @returns Whether it is a plain `*.sql` name of letters, digits, `_`, `.` and `-`.
 */
export function isSafeMigrationFilename(name: string): boolean {
  return SAFE_NAME.test(name) && !name.includes("..");
}

/**
 * Parses the version of a migration file name: `001_name.sql` → `[1n]`,
 * `V1__name.sql` → `[1n]`, `V1.2__name.sql` → `[1n, 2n]`,
 * `20251025120000_name.sql` → `[20251025120000n]`, and pgdbm's own
 * `20251025_120000_name.sql` (what its `create_migration` writes) → `[20251025120000n]`.
 * Trailing zero parts are dropped, so `V1.0` equals `V1`.
 *
 * @param filename The file name.
 * @returns The numeric parts, or `undefined` when the name carries no version.
 */
export function parseMigrationVersion(filename: string): bigint[] | undefined {
  let parts: bigint[];
  const stamp = PGDBM_TIMESTAMP.exec(filename);
  const numeric = NUMERIC_PREFIX.exec(filename);
  const flyway = FLYWAY.exec(filename);
  if (stamp !== null) parts = [BigInt(stamp[1] + stamp[2])];
  else if (numeric !== null) parts = [BigInt(numeric[1])];
  else if (flyway !== null) parts = flyway[1].split(/[._]/).map((p) => BigInt(p));
  else return undefined;
  while (parts.length > 0 && parts[parts.length - 1] === 0n) parts.pop();
  return parts;
}

/**
 * Compares two versions part by part (a missing part counts as zero).
 *
 * @param a One version.
 * @param b The other.
 * @returns Negative, zero or positive, like a sort comparator.
 */
export function compareVersions(a: readonly bigint[], b: readonly bigint[]): number {
  const length = Math.max(a.length, b.length);
  for (let i = 0; i < length; i++) {
    const x = a[i] ?? 0n;
    const y = b[i] ?? 0n;
    if (x !== y) return x < y ? -1 : 1;
  }
  return 0;
}

/**
 * Normalizes line endings the way pgdbm sees a file: Python reads it in text mode, which
 * turns CRLF and a lone CR into LF.
 *
 * @param content The file's text.
 * @returns The text with LF line endings only.
 */
export function normalizeNewlines(content: string): string {
  return content.includes("\r") ? content.replace(/\r\n?/g, "\n") : content;
}

/**
 * Removes outer whitespace exactly as Python's `str.strip()` does.
 *
 * @param text The text.
 * @returns The text without leading and trailing Python whitespace.
 */
export function pythonStrip(text: string): string {
  let start = 0;
  let end = text.length;
  while (start < end && PY_WHITESPACE.has(text[start])) start++;
  while (end > start && PY_WHITESPACE.has(text[end - 1])) end--;
  return text.slice(start, end);
}

/**
 * pgdbm's checksum of a migration: SHA-256 hex of the UTF-8 text with line endings made LF
 * and outer whitespace stripped. An edit that only changes CRLF to LF keeps the checksum.
 *
 * @param content The file's text.
 * @returns 64 lowercase hex digits.
 */
export async function migrationChecksum(content: string): Promise<string> {
  return await sha256Hex(pythonStrip(normalizeNewlines(content)));
}

/**
 * True when the file asks to run outside a transaction: a line starts with
 * `-- pgdbm:no-transaction` followed by whitespace or the end of the line, which is what
 * Python pgdbm accepts, so `-- pgdbm:no-transaction  (CREATE INDEX CONCURRENTLY needs it)`
 * counts. Also accepted, beyond pgdbm: blanks before `--` and between `--` and the marker
 * (`  --pgdbm:no-transaction`), any letter case (`-- PGDBM:No-Transaction`), and a byte
 * order mark before the file's first line. Lines end at LF, CRLF or a lone CR, as Python
 * reads a file. Not accepted (nor by pgdbm): the marker after SQL on its line, after other
 * words in a comment, or run into other characters (`-- pgdbm:no-transactional`,
 * `-- pgdbm:no-transaction;`).
 *
 * @param content The file's text.
 * @returns Whether the file runs statement by statement in autocommit.
 */
export function isNoTransaction(content: string): boolean {
  const lines = normalizeNewlines(content.replace(/^\ufeff/, "")).split("\n");
  return lines.some((line) => {
    const marker = NO_TRANSACTION.exec(line);
    if (marker === null) return false;
    const next = line[marker[0].length];
    return next === undefined || PY_WHITESPACE.has(next);
  });
}

/**
 * Parses, validates and orders migration files: by version, then name. Refuses names
 * without a version, two files of one version, and files with no statement (empty, or only
 * comments and whitespace, whatever their line endings).
 *
 * @param files The files of a source.
 * @param where The source's location, for messages.
 * @returns The files with version and checksum, in the order they apply.
 * @throws {MigrationError} When a name carries no version, a version repeats, or a file has
 *   no statement.
 */
export async function parseMigrationFiles(
  files: readonly MigrationFileContent[],
  where: string,
): Promise<ParsedMigrationFile[]> {
  const parsed: ParsedMigrationFile[] = [];
  for (const file of files) {
    const parts = parseMigrationVersion(file.filename);
    if (parts === undefined) {
      throw new MigrationError(
        `Cannot order migration '${file.filename}' in '${where}': its name has no version; ` +
          `rename it like '001_name.sql', 'V1__name.sql' or '20251025120000_name.sql'`,
        { reason: "invalid_filename", filename: file.filename },
      );
    }
    if (pythonStrip(file.content) === "") {
      throw new MigrationError(
        `Cannot apply migration '${file.filename}' in '${where}': the file is empty; ` +
          `add SQL to it or delete it`,
        { reason: "empty_file", filename: file.filename },
      );
    }
    const statements = splitSqlStatements(file.content.replace(/^\ufeff/, ""));
    // Applying such a file would record it with nothing run, and filling it in later would
    // then fail every run as a changed file.
    if (statements.length === 0) {
      throw new MigrationError(
        `Cannot apply migration '${file.filename}' in '${where}': the file has no SQL ` +
          `statement, only comments and whitespace (as a new file from 'migrate create' ` +
          `has until its SQL is written); add SQL to it or delete it`,
        { reason: "empty_file", filename: file.filename },
      );
    }
    if (
      statements.length === 2 && isPlainBegin(words(statements[0].text)) &&
      isPlainCommit(words(statements[1].text))
    ) {
      throw new MigrationError(
        `Cannot apply migration '${file.filename}' in '${where}': the file has no SQL ` +
          `statement between its 'BEGIN;' and 'COMMIT;'; add SQL to it or delete it`,
        { reason: "empty_file", filename: file.filename },
      );
    }
    parsed.push({
      filename: file.filename,
      content: file.content,
      version: parts.length === 0 ? "0" : parts.join("."),
      versionParts: parts,
      checksum: await migrationChecksum(file.content),
      noTransaction: isNoTransaction(file.content),
    });
  }
  parsed.sort((a, b) =>
    compareVersions(a.versionParts, b.versionParts) ||
    (a.filename < b.filename ? -1 : a.filename > b.filename ? 1 : 0)
  );
  for (let i = 1; i < parsed.length; i++) {
    if (compareVersions(parsed[i - 1].versionParts, parsed[i].versionParts) === 0) {
      throw new MigrationError(
        `Cannot order migrations in '${where}': '${parsed[i - 1].filename}' and ` +
          `'${parsed[i].filename}' have the same version ${parsed[i].version}; ` +
          `give one of them a new version`,
        { reason: "duplicate_version", filename: parsed[i].filename },
      );
    }
  }
  return parsed;
}

/** The statements of a transactional migration, ready to run inside one transaction. */
export interface TransactionalBody {
  /** The statements, without a wrapping `BEGIN;` … `COMMIT;`. */
  statements: SqlStatement[];
  /** True when the file had a `BEGIN;` … `COMMIT;` wrapper that was removed. */
  unwrapped: boolean;
}

/**
 * Splits a transactional migration into statements and removes a wrapping `BEGIN;` …
 * `COMMIT;` (also `START TRANSACTION`, `BEGIN WORK`, `END`), because the migrator runs
 * the file and its history row in one transaction of its own: an inner `COMMIT` would
 * commit half of it.
 *
 * @param content The file's text.
 * @param filename The file name, for messages.
 * @returns The statements to run.
 * @throws {MigrationError} When the file controls transactions anywhere else (an inner
 *   `COMMIT`, `ROLLBACK`, a `BEGIN` without its `COMMIT`, or one with options).
 */
export function transactionalBody(content: string, filename: string): TransactionalBody {
  const statements = splitSqlStatements(content);
  let unwrapped = false;
  if (statements.length >= 2) {
    const first = words(statements[0].text);
    const last = words(statements[statements.length - 1].text);
    if (isPlainBegin(first) && isPlainCommit(last)) {
      statements.pop();
      statements.shift();
      unwrapped = true;
    }
  }
  for (const statement of statements) {
    const control = transactionControl(words(statement.text));
    if (control !== undefined) {
      throw new MigrationError(
        `Cannot apply migration '${filename}': it runs '${control}' at line ${statement.line}, ` +
          `but a migration runs in one transaction with its history row; remove the ` +
          `transaction control, or wrap the whole file in one 'BEGIN;' … 'COMMIT;', or mark ` +
          `the file with a '-- pgdbm:no-transaction' line`,
        { reason: "transaction_control_refused", filename, line: statement.line },
      );
    }
  }
  return { statements, unwrapped };
}

/**
 * Refuses a psql meta-command in a migration (`\connect`, `\set`, `\i`, …): only psql runs
 * them, and skipping one silently could apply the file differently. (`\restrict` and
 * `\unrestrict` lines, which pg_dump writes, never reach here: the splitter skips them.)
 * Refuses a `COPY … TO STDOUT` too: psql prints its rows; the driver has nowhere to.
 *
 * @param statements The file's statements.
 * @param filename The file name, for messages.
 * @throws {MigrationError} When one of them is a psql meta-command or a `COPY … TO STDOUT`.
 */
export function refusePsqlCommands(statements: readonly SqlStatement[], filename: string): void {
  const copyOut = statements.find((s) => s.copyToStdout === true);
  if (copyOut !== undefined) {
    throw new MigrationError(
      `Cannot apply migration '${filename}': its statement at line ${copyOut.line} is a ` +
        `'COPY … TO STDOUT', whose rows psql prints, but a migration has nowhere to print ` +
        `them; remove it (or copy to a file on the server with COPY … TO '/path')`,
      { reason: "psql_command_refused", filename, line: copyOut.line },
    );
  }
  const command = statements.find((s) => s.psqlCommand !== undefined);
  if (command === undefined) return;
  throw new MigrationError(
    `Cannot apply migration '${filename}': line ${command.line} is the psql command ` +
      `'${command.psqlCommand}', which only psql runs (a migration's SQL goes to the server ` +
      `as it is); remove it, or write what it does in SQL`,
    { reason: "psql_command_refused", filename, line: command.line },
  );
}

function words(text: string): string[] {
  return text
    .replace(/--[^\n\r]*/g, " ")
    .replace(/\/\*[\s\S]*?\*\//g, " ")
    .trim()
    .toUpperCase()
    .split(/\s+/)
    .filter((w) => w !== "");
}

function isPlainBegin(w: string[]): boolean {
  if (w[0] === "BEGIN") {
    return w.length === 1 || (w.length === 2 && /^(WORK|TRANSACTION)$/.test(w[1]));
  }
  return w.length === 2 && w[0] === "START" && w[1] === "TRANSACTION";
}

function isPlainCommit(w: string[]): boolean {
  if (w[0] !== "COMMIT" && w[0] !== "END") return false;
  return w.length === 1 || (w.length === 2 && /^(WORK|TRANSACTION)$/.test(w[1]));
}

/** The transaction-control command a statement is, or undefined (savepoints are fine). */
function transactionControl(w: string[]): string | undefined {
  switch (w[0]) {
    case "BEGIN":
    case "COMMIT":
    case "END":
    case "ABORT":
      return w[0];
    case "START":
      return w[1] === "TRANSACTION" ? "START TRANSACTION" : undefined;
    case "ROLLBACK":
      return w[1] === "TO" ? undefined : "ROLLBACK";
    case "PREPARE":
      return w[1] === "TRANSACTION" ? "PREPARE TRANSACTION" : undefined;
    default:
      return undefined;
  }
}

/**
 * The order Python pgdbm applies files in: `sorted()` of their names, by code point (so
 * `00010_b.sql` comes before `0001_a.sql`, and `10_x.sql` before `2_y.sql`), where this
 * library orders by version number.
 *
 * @param filenames The file names.
 * @returns The names in pgdbm's order.
 */
export function pgdbmOrder(filenames: readonly string[]): string[] {
  const codePoints = (name: string): number[] => Array.from(name, (ch) => ch.codePointAt(0)!);
  return [...filenames].sort((a, b) => {
    const x = codePoints(a);
    const y = codePoints(b);
    for (let i = 0; i < Math.min(x.length, y.length); i++) {
      if (x[i] !== y[i]) return x[i] - y[i];
    }
    return x.length - y.length;
  });
}

/**
 * A version stamp for a new migration file: UTC `YYYYMMDDHHMMSS`.
 *
 * @param date The moment.
 * @returns Fourteen digits.
 */
export function timestampVersion(date: Date): string {
  const pad = (n: number, width = 2): string => String(n).padStart(width, "0");
  return pad(date.getUTCFullYear(), 4) + pad(date.getUTCMonth() + 1) + pad(date.getUTCDate()) +
    pad(date.getUTCHours()) + pad(date.getUTCMinutes()) + pad(date.getUTCSeconds());
}
