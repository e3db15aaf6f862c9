/**
 * The server side of the test helpers: where the test server is, a short-lived admin
 * connection, and creating, marking, listing and dropping the databases they make.
 *
 * Every database the helpers create carries a comment
 * `pgdbm-testing <kind> created=<UTC time of the server>`, the marker that
 * `cleanupTestDatabases()` trusts; a database without it is never dropped.
 *
 * @module
 */

import { ConfigurationError, QueryError } from "../errors.ts";
import { DatabaseManager } from "../manager.ts";
import { assertIdentifier, quoteIdentifier } from "../template.ts";
import type { Connection } from "../transaction.ts";

/** What a marked database is. */
export type MarkerKind = "database" | "template" | "building";

/** A database found by {@link listMarked}. */
export interface MarkedDatabase {
  /** Its name. */
  name: string;
  /** What the helpers made it for. */
  kind: MarkerKind;
  /** How long ago it was created, by the server's clock. */
  ageMs: number;
}

const MARKER = "pgdbm-testing";
const MARKER_PATTERN = /^pgdbm-testing (database|template|building) created=(\S+)$/;
const SILENT = { warn(): void {} };
const PREFIX = /^[a-z][a-z0-9_]{0,19}$/;

/** The default name prefix of test databases, schemas and templates. */
export const DEFAULT_PREFIX = "pgdbm_test";

/**
 * The server the helpers use: `PGDBM_TEST_URL`, else `DATABASE_URL`, else none (embedded).
 * Without `--allow-env` for them, they count as unset.
 */
export function serverUrlFromEnv(): string | undefined {
  for (const name of ["PGDBM_TEST_URL", "DATABASE_URL"]) {
    try {
      const value = Deno.env.get(name);
      if (value !== undefined && value.trim() !== "") return value.trim();
    } catch {
      // Not allowed to read it: the variable counts as unset.
    }
  }
  return undefined;
}

/**
 * Checks a name prefix of the helpers.
 *
 * @throws {ConfigurationError} When it is not 1 to 20 lowercase letters, digits or `_`.
 */
export function checkPrefix(prefix: string): string {
  if (typeof prefix !== "string" || !PREFIX.test(prefix)) {
    throw new ConfigurationError(
      "prefix",
      `Cannot use '${String(prefix)}' as the test name prefix: use 1 to 20 lowercase ` +
        `letters, digits or underscores, starting with a letter`,
    );
  }
  return prefix;
}

/** A new name `prefix_<time>_<random>` that no other test uses. */
export function uniqueTestName(prefix: string): string {
  const random = crypto.randomUUID().replaceAll("-", "").slice(0, 10);
  return `${prefix}_${Date.now().toString(36)}_${random}`;
}

/**
 * The URL of the same server and user with another database.
 *
 * @throws {ConfigurationError} When the URL is not a `postgres://` URL.
 */
export function withDatabase(url: string, database: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (cause) {
    throw new ConfigurationError(
      "url",
      "Cannot use the test server URL: it is not a postgres:// URL; set PGDBM_TEST_URL to " +
        "one such as postgres://user@localhost:5432/postgres",
      { cause },
    );
  }
  if (parsed.protocol !== "postgres:" && parsed.protocol !== "postgresql:") {
    throw new ConfigurationError(
      "url",
      `Cannot use the test server URL: its scheme is '${parsed.protocol}', not postgres:; ` +
        "set PGDBM_TEST_URL to a postgres:// URL, or leave it unset for the embedded PostgreSQL",
    );
  }
  parsed.pathname = `/${encodeURIComponent(database)}`;
  parsed.searchParams.delete("dbname");
  return parsed.toString();
}

/**
 * Runs `fn` on one connection to the database named by `url` (the maintenance database
 * the test databases are created from), then closes it.
 */
export async function withAdmin<T>(url: string, fn: (conn: Connection) => Promise<T>): Promise<T> {
  const admin = new DatabaseManager({
    connectionString: url,
    minConnections: 1,
    maxConnections: 1,
    logger: SILENT,
  });
  await admin.connect();
  try {
    return await admin.acquire(fn);
  } finally {
    await admin.close();
  }
}

/** True when a database of that name exists. */
export async function databaseExists(conn: Connection, name: string): Promise<boolean> {
  return await conn.fetchValue<boolean>(
    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
    [name],
  ) === true;
}

/**
 * Creates a database (a copy of `template` when given) and marks it.
 *
 * @throws {QueryError} When the user may not create databases (with what to do).
 */
export async function createDatabase(
  conn: Connection,
  name: string,
  kind: MarkerKind,
  template?: string,
): Promise<void> {
  assertIdentifier(name, "database");
  if (template !== undefined) assertIdentifier(template, "database");
  try {
    await conn.execute(
      `CREATE DATABASE ${quoteIdentifier(name)}${
        template === undefined ? "" : ` TEMPLATE ${quoteIdentifier(template)}`
      }`,
    );
  } catch (error) {
    if (error instanceof QueryError && error.sqlstate === "42501") {
      throw new QueryError(
        `Cannot create test database '${name}': the user may not create databases; grant it ` +
          "(ALTER ROLE … CREATEDB) or use withTestSchema(), which needs only a schema",
        error.sql,
        [],
        { sqlstate: error.sqlstate },
        { cause: error },
      );
    }
    throw error;
  }
  await mark(conn, name, kind);
}

/** Sets the marker comment of a database, with the server's current time. */
export async function mark(conn: Connection, name: string, kind: MarkerKind): Promise<void> {
  const statement = await conn.fetchValue<string>(
    "SELECT format('COMMENT ON DATABASE %I IS %L', $1::text, $2::text || " +
      `to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))`,
    [name, `${MARKER} ${kind} created=`],
  );
  await conn.execute(statement!);
}

/**
 * Drops a database if it exists, ending the connections still open to it first
 * (`WITH (FORCE)` on PostgreSQL 13 and later).
 */
export async function dropDatabase(conn: Connection, name: string): Promise<void> {
  assertIdentifier(name, "database");
  await terminateConnections(conn, name);
  const version = Number(await conn.fetchValue<string>("SHOW server_version_num"));
  await conn.execute(
    `DROP DATABASE IF EXISTS ${quoteIdentifier(name)}${version >= 130000 ? " WITH (FORCE)" : ""}`,
  );
}

/** Ends every other connection to a database (they may be closing already). */
export async function terminateConnections(conn: Connection, name: string): Promise<void> {
  await conn.execute(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity " +
      "WHERE datname = $1 AND pid <> pg_backend_pid()",
    [name],
  );
}

/** The marked databases whose name starts with `prefix`; unmarked ones are left out. */
export async function listMarked(conn: Connection, prefix: string): Promise<MarkedDatabase[]> {
  const rows = await conn.fetchAll<{ name: string; comment: string | null; now: Date }>(
    "SELECT datname AS name, shobj_description(oid, 'pg_database') AS comment, now() AS now " +
      "FROM pg_database WHERE left(datname, length($1)) = $1 ORDER BY datname",
    [prefix],
  );
  const found: MarkedDatabase[] = [];
  for (const row of rows) {
    const match = MARKER_PATTERN.exec(row.comment ?? "");
    const created = match === null ? Number.NaN : Date.parse(match[2]);
    if (match === null || Number.isNaN(created)) continue;
    found.push({
      name: row.name,
      kind: match[1] as MarkerKind,
      ageMs: new Date(row.now).getTime() - created,
    });
  }
  return found;
}
