/**
 * Test helpers for code built on pgdbm: throwaway databases and schemas, fixtures, table
 * snapshots.
 *
 * ## Where the databases live
 *
 * - `PGDBM_TEST_URL` (else `DATABASE_URL`) names a server: every test database is a new,
 *   uniquely named database on it, created from the database in that URL (which is
 *   otherwise left alone). The user needs `CREATEDB`; without it, use
 *   {@link withTestSchema}.
 * - Neither set (or `embedded: true`): the in-memory PostgreSQL (PGlite), so a test suite
 *   runs on a machine with nothing installed. It has one database and takes seconds and
 *   hundreds of MB to start, so the process starts ONE engine, on the first test that
 *   needs it, and keeps it: every test database is then a schema of its own on that engine
 *   (`test.name`), ready in milliseconds and dropped `CASCADE` at the end. Every migration
 *   set, whatever its `schema`, migrates into that one schema, and the manager's schema is
 *   it. (With `config`, a test gets an engine of its own instead, with those settings.)
 *   The tests of a process share the engine's one session: session state a test leaves
 *   (a plain `SET`, a temporary table) is seen by the others; use `SET LOCAL`.
 *
 * ## Building the code under test
 *
 * Give the code under test `test.db`, or the pool and schema (`test.pool`,
 * `test.db.schema`): they reach the test's database on both engines. `test.url` is the
 * test database's URL on a server and `null` on the embedded engine, whose database no
 * URL reaches (a `pglite:memory` URL would start a second, empty engine).
 *
 * ## Migrations and templates
 *
 * With `migrations`, the first call migrates a template database once per distinct set of
 * migration files and every later call clones it (`CREATE DATABASE … TEMPLATE`), so the
 * hundredth test database costs a copy, not a migration run. Templates are named
 * `<prefix>_tpl_<hash of modules>_<hash of checksums>`, reused across runs, and replaced
 * (the old one dropped) when a file changes. Processes running `deno test --parallel`
 * build each template once, serialized by an advisory lock; a template refuses
 * connections, so nothing keeps it from being cloned.
 *
 * ## Leftovers
 *
 * Every database the helpers make is marked (`COMMENT ON DATABASE … IS 'pgdbm-testing …'`).
 * A crashed run leaves its databases behind; {@link cleanupTestDatabases} drops the marked
 * ones older than a limit and never touches others.
 *
 * @example A test with its own database (needs a server, or runs on PGlite without one)
 * ```ts ignore
 * import { loadFixtures, withTestDatabase } from "@pgdbm/pgdbm/testing";
 * import assert from "node:assert/strict";
 *
 * Deno.test("NoteRepository.search() finds notes by word", async () => {
 *   await withTestDatabase(async (db) => {
 *     await loadFixtures(db, { notes: [{ id: 1, body: "buy milk" }] });
 *     assert.equal(await db.fetchValue("SELECT count(*)::int FROM {{tables.notes}}"), 1);
 *   }, { migrations: { moduleName: "notes", migrationsPath: "./migrations" } });
 * });
 * ```
 *
 * @module
 */

import type { DatabaseConfig } from "../config.ts";
import { ConfigurationError, QueryError } from "../errors.ts";
import { DatabaseManager } from "../manager.ts";
import { createSharedPool, type Pool } from "../pool/pool.ts";
import { runsOnPglite, sharedEngine } from "./_embedded.ts";
import {
  checkPrefix,
  createDatabase,
  DEFAULT_PREFIX,
  dropDatabase,
  listMarked,
  serverUrlFromEnv,
  uniqueTestName,
  withAdmin,
  withDatabase,
} from "./_server.ts";
import {
  applyMigrations,
  ensureTemplate,
  type LoadedMigrations,
  loadMigrations,
  templateName,
  type TestMigrations,
} from "./_template.ts";
import type { Connection } from "../transaction.ts";

export type { TestMigrations } from "./_template.ts";
export { assertTableUnchanged, countRows, snapshotTable, truncateTable } from "./_tables.ts";
export type { SnapshotOptions, TableSnapshot, TruncateOptions } from "./_tables.ts";
export { loadFixtures } from "./_fixtures.ts";
export type { Fixtures } from "./_fixtures.ts";
export type { Transactional } from "../transaction.ts";

/** Where the helpers put a database: shared by every helper's options. */
export interface TestTargetOptions {
  /**
   * The server: a `postgres://` URL whose database the test databases are created from.
   * @default {Deno.env.get("PGDBM_TEST_URL") ?? Deno.env.get("DATABASE_URL")}
   */
  url?: string;
  /**
   * Use the in-memory PostgreSQL (PGlite) even when a server is configured. Without a
   * `url` and without either variable, it is used anyway.
   * @default {false}
   */
  embedded?: boolean;
  /**
   * Extra settings of the pool opened for the test (`maxConnections`, `logger`,
   * timeouts…); the connection target and schema are set by the helper. On the embedded
   * engine, a test with `config` gets an engine of its own (seconds to start) instead of
   * a schema on the process's shared one.
   * @default {{ minConnections: 1 }}
   */
  config?: DatabaseConfig;
  /**
   * The start of every name the helpers create (databases, schemas, templates):
   * 1 to 20 lowercase letters, digits or `_`.
   * @default {"pgdbm_test"}
   */
  prefix?: string;
}

/** Options of {@link createTestDatabase} and {@link withTestDatabase}. */
export interface TestDatabaseOptions extends TestTargetOptions {
  /** One module's migrations, or several (applied in order) to run before the test. */
  migrations?: TestMigrations | readonly TestMigrations[];
  /**
   * The schema of the returned manager. On the shared embedded engine, the test's own
   * schema stands in for it.
   * @default {the `schema` of the first migration set, else none}
   */
  schema?: string;
  /**
   * Clone a migrated template instead of migrating each database (server only).
   * `false` migrates every new database from scratch.
   * @default {true}
   */
  template?: boolean;
  /**
   * How long to wait for another process that builds the same template.
   * @default {300000}
   */
  lockWaitMs?: number;
}

/** A database made by {@link createTestDatabase}; dispose of it to drop it. */
export interface TestDatabase extends AsyncDisposable {
  /** A connected manager over the database: give it, or {@link pool}, to the code under test. */
  readonly db: DatabaseManager;
  /**
   * The pool `db` runs on; a manager made with `{ pool, schema: db.schema }` reaches the
   * test's tables on both engines. Dropping the test database closes it when it is the
   * test's own; the shared embedded engine stays open for the next test.
   */
  readonly pool: Pool;
  /**
   * The database's connection string on a server; `null` on the embedded engine, whose
   * database no URL reaches (use {@link pool}).
   */
  readonly url: string | null;
  /** The database's name; on the shared embedded engine, the name of the test's schema. */
  readonly name: string;
  /** True on the in-memory PostgreSQL (PGlite). */
  readonly embedded: boolean;
  /** True when it was cloned from a migrated template (`CREATE DATABASE … TEMPLATE`). */
  readonly fromTemplate: boolean;
  /** True when this call built (or rebuilt) the template it was cloned from. */
  readonly templateBuilt: boolean;
  /** The template's name, or `null`. */
  readonly template: string | null;
  /** Closes the manager and drops the database; a second call does nothing. */
  drop(): Promise<void>;
}

/** Options of {@link withTestSchema}. */
export interface TestSchemaOptions extends TestTargetOptions {
  /** Migrations to apply to the throwaway schema (their `schema` must be left out). */
  migrations?: TestMigrations | readonly TestMigrations[];
  /** A pool of your own to use (it stays open); by default one is opened and closed. */
  pool?: Pool;
}

/** What {@link withTestSchema} gives the test besides the manager. */
export interface TestSchemaContext {
  /** The throwaway schema's name. */
  readonly schema: string;
  /** The pool the manager runs on. */
  readonly pool: Pool;
  /** True on the in-memory PostgreSQL (PGlite). */
  readonly embedded: boolean;
}

/** Options of {@link cleanupTestDatabases}. */
export interface CleanupOptions {
  /**
   * Drop only databases created longer ago than this (by the server's clock).
   * @default {3600000} (one hour)
   */
  olderThanMs?: number;
  /**
   * The server.
   * @default {Deno.env.get("PGDBM_TEST_URL") ?? Deno.env.get("DATABASE_URL")}
   */
  url?: string;
  /**
   * The name prefix the databases were created with.
   * @default {"pgdbm_test"}
   */
  prefix?: string;
  /**
   * Also drop templates (and half-built ones) older than the limit.
   * @default {false}
   */
  templates?: boolean;
  /**
   * Report what would be dropped without dropping it.
   * @default {false}
   */
  dryRun?: boolean;
}

/** What {@link cleanupTestDatabases} did. */
export interface CleanupResult {
  /** The databases dropped (or that would be, in a dry run). */
  dropped: string[];
  /** Marked databases kept because they are younger than the limit (or are templates). */
  kept: string[];
}

/**
 * Creates a fresh, uniquely named database for one test, migrated when `migrations` are
 * given (by cloning a template built once per set of migration files), and returns it
 * with a connected manager. Dispose of it (`await using`) to close the manager and drop
 * the database. Without a server configured, it is a schema of its own on the process's
 * in-memory PGlite engine (started by the first test, seconds; later tests take
 * milliseconds), dropped the same way.
 *
 * @param options Migrations, the manager's schema, the server and pool settings.
 * @returns The database; `fromTemplate`/`templateBuilt` tell how it was made.
 * @throws {ConfigurationError} When an option is invalid.
 * @throws {QueryError} When the user may not create databases.
 * @throws {MigrationError} When a migration fails (nothing is left behind).
 * @throws {ConnectionError} When the server cannot be reached.
 *
 * @example Clone a migrated template for each test (needs a server)
 * ```ts ignore
 * import { createTestDatabase } from "@pgdbm/pgdbm/testing";
 * Deno.test("notes are stored", async () => {
 *   await using test = await createTestDatabase({
 *     migrations: { moduleName: "notes", migrationsPath: "./migrations", schema: "notes" },
 *   });
 *   await test.db.execute("INSERT INTO {{tables.notes}} (body) VALUES ($1)", ["hi"]);
 * });
 * ```
 */
export async function createTestDatabase(
  options: TestDatabaseOptions = {},
): Promise<TestDatabase> {
  const prefix = checkPrefix(options.prefix ?? DEFAULT_PREFIX);
  const sets = await loadMigrations(options.migrations);
  const schema = options.schema ?? sets[0]?.set.schema;
  const url = serverUrl(options);
  if (url === undefined) return await embeddedTestDatabase(prefix, sets, schema, options);
  const name = uniqueTestName(prefix);
  const useTemplate = sets.length > 0 && options.template !== false;
  const made = await withAdmin(url, async (conn) => {
    if (!useTemplate) {
      await createDatabase(conn, name, "database");
      return { template: null, templateBuilt: false };
    }
    const template = await templateName(prefix, sets);
    const built = await cloneTemplate(conn, url, name, template, sets, options);
    return { template: template.name, templateBuilt: built };
  });
  const dropIt = () => withAdmin(url, (conn) => dropDatabase(conn, name));
  const dbUrl = withDatabase(url, name);
  const db = new DatabaseManager({
    minConnections: 1,
    ...options.config,
    connectionString: dbUrl,
    schema,
  });
  try {
    await db.connect();
    if (!useTemplate) await applyMigrations(db, sets);
  } catch (error) {
    await db.close();
    await dropIt();
    throw error;
  }
  return testDatabase({
    db,
    pool: db.pool,
    url: dbUrl,
    name,
    embedded: false,
    fromTemplate: made.template !== null,
    templateBuilt: made.templateBuilt,
    template: made.template,
    drop: async () => {
      await db.close();
      await dropIt();
    },
  });
}

/**
 * Runs `fn` with a fresh test database (see {@link createTestDatabase}) and drops the
 * database afterwards, also when `fn` throws.
 *
 * @param fn The test body; it gets the connected manager and the database.
 * @param options As for {@link createTestDatabase}.
 * @returns What `fn` returns.
 * @throws What `fn` throws, after the cleanup; and what {@link createTestDatabase} throws.
 *
 * @example Run a test in its own database (needs a server, or runs on PGlite)
 * ```ts ignore
 * import { withTestDatabase } from "@pgdbm/pgdbm/testing";
 * Deno.test("notes table exists", async () => {
 *   await withTestDatabase(async (db) => {
 *     console.log(await db.tableExists("notes"));
 *   }, { migrations: { moduleName: "notes", migrationsPath: "./migrations" } });
 * });
 * ```
 */
export async function withTestDatabase<T>(
  fn: (db: DatabaseManager, database: TestDatabase) => Promise<T>,
  options: TestDatabaseOptions = {},
): Promise<T> {
  const database = await createTestDatabase(options);
  return await afterwards(() => fn(database.db, database), () => database.drop());
}

/**
 * Runs `fn` with a manager over a throwaway schema, migrated when `migrations` are
 * given, and drops the schema (`CASCADE`) afterwards, also when `fn` throws. Cheaper than
 * a database and needs no `CREATEDB`: only the right to create schemas. On a server it
 * opens a pool and closes it after `fn`; on the embedded engine it uses the process's
 * shared one (an engine of its own with `config`); with `pool`, it uses yours.
 *
 * @param fn The test body; it gets the manager and the schema, pool and mode.
 * @param options Migrations, a pool of your own, the server and pool settings.
 * @returns What `fn` returns.
 * @throws {ConfigurationError} When a migration set names a schema, or an option is invalid.
 * @throws {MigrationError} When a migration fails (the schema is dropped).
 * @throws What `fn` throws, after the cleanup.
 *
 * @example A test in a schema of a shared pool (needs a server, or runs on PGlite)
 * ```ts ignore
 * import { withTestSchema } from "@pgdbm/pgdbm/testing";
 * Deno.test("notes in a throwaway schema", async () => {
 *   await withTestSchema(async (db, { schema }) => {
 *     await db.execute("CREATE TABLE {{tables.notes}} (id int)");
 *     console.log(schema);
 *   });
 * });
 * ```
 */
export async function withTestSchema<T>(
  fn: (db: DatabaseManager, context: TestSchemaContext) => Promise<T>,
  options: TestSchemaOptions = {},
): Promise<T> {
  const prefix = checkPrefix(options.prefix ?? DEFAULT_PREFIX);
  const sets = await loadMigrations(options.migrations);
  const named = sets.find((loaded) => loaded.set.schema !== undefined);
  if (named !== undefined) {
    throw new ConfigurationError(
      "migrations",
      `Cannot apply module '${named.set.moduleName}' to a throwaway schema: it names schema ` +
        `'${named.set.schema}'; leave 'schema' out (every module migrates into the test ` +
        "schema) or use withTestDatabase()",
    );
  }
  const url = options.pool === undefined ? serverUrl(options) : undefined;
  const shared = options.pool === undefined && url === undefined && options.config === undefined;
  const pool = options.pool ?? (shared ? await sharedEngine() : await createSharedPool({
    minConnections: 1,
    ...options.config,
    connectionString: url ?? "pglite:memory",
  }));
  const owned = options.pool === undefined && !shared;
  const embedded = options.pool === undefined ? url === undefined : await runsOnPglite(pool);
  const schema = uniqueTestName(prefix);
  const db = new DatabaseManager({ pool, schema });
  const cleanup = async () => {
    try {
      await db.dropSchema({ cascade: true });
    } finally {
      if (owned) await pool.close();
    }
  };
  return await afterwards(async () => {
    await db.ensureSchema();
    await applyMigrations(db, sets, schema);
    return await fn(db, { schema, pool, embedded });
  }, cleanup);
}

/**
 * Drops the test databases that crashed runs left behind: those whose name starts with
 * the prefix, that carry the helpers' marker, and that are older than `olderThanMs`.
 * Databases without the marker are never touched; templates only with `templates: true`.
 * Without a server configured there is nothing to clean.
 *
 * @param options The age limit, the server, the prefix, templates, dry run.
 * @returns The databases dropped and those kept.
 * @throws {RangeError} When `olderThanMs` is negative or not a number.
 * @throws {ConnectionError} When the server cannot be reached.
 *
 * @example Clean up before a test run (needs a server)
 * ```ts ignore
 * import { cleanupTestDatabases } from "@pgdbm/pgdbm/testing";
 * const { dropped } = await cleanupTestDatabases({ olderThanMs: 60 * 60 * 1000 });
 * console.log(`dropped ${dropped.length} leftover test databases`);
 * ```
 */
export async function cleanupTestDatabases(options: CleanupOptions = {}): Promise<CleanupResult> {
  const olderThanMs = options.olderThanMs ?? 3_600_000;
  if (typeof olderThanMs !== "number" || !(olderThanMs >= 0)) {
    throw new RangeError(
      `Cannot clean up test databases: 'olderThanMs' must be a number of milliseconds ` +
        `of at least 0; got ${String(olderThanMs)}`,
    );
  }
  const prefix = checkPrefix(options.prefix ?? DEFAULT_PREFIX);
  const url = options.url ?? serverUrlFromEnv();
  const result: CleanupResult = { dropped: [], kept: [] };
  if (url === undefined) return result;
  await withAdmin(url, async (conn) => {
    for (const found of await listMarked(conn, `${prefix}_`)) {
      const eligible = found.kind === "database" || options.templates === true;
      if (!eligible || found.ageMs <= olderThanMs) {
        result.kept.push(found.name);
        continue;
      }
      if (!options.dryRun) await dropDatabase(conn, found.name);
      result.dropped.push(found.name);
    }
  });
  return result;
}

function serverUrl(options: TestTargetOptions): string | undefined {
  if (options.embedded === true) {
    if (options.url !== undefined) {
      throw new ConfigurationError(
        "embedded",
        "Cannot use both 'embedded: true' and 'url': pass one of them",
      );
    }
    return undefined;
  }
  return options.url ?? serverUrlFromEnv();
}

/**
 * A test database on the embedded engine: a schema of the process's shared engine that
 * every migration set migrates into, or, with `config`, an engine of the test's own.
 */
async function embeddedTestDatabase(
  prefix: string,
  sets: readonly LoadedMigrations[],
  schema: string | undefined,
  options: TestDatabaseOptions,
): Promise<TestDatabase> {
  const fields = { url: null, embedded: true, fromTemplate: false, templateBuilt: false };
  if (options.config !== undefined) {
    const db = new DatabaseManager({
      ...options.config,
      connectionString: "pglite:memory",
      schema,
    });
    await db.connect();
    try {
      await applyMigrations(db, sets);
      const name = await db.fetchValue<string>("SELECT current_database()");
      const drop = () => db.close();
      return testDatabase({ ...fields, db, pool: db.pool, name: name!, template: null, drop });
    } catch (error) {
      await db.close();
      throw error;
    }
  }
  const pool = await sharedEngine();
  const name = uniqueTestName(prefix);
  const db = new DatabaseManager({ pool, schema: name });
  const drop = () => db.dropSchema({ cascade: true });
  try {
    await db.ensureSchema();
    await applyMigrations(db, sets, name);
  } catch (error) {
    await drop().catch(() => {});
    throw error;
  }
  return testDatabase({ ...fields, db, pool, name, template: null, drop });
}

/** Clones the template into `name`, building the template first when it is missing. */
async function cloneTemplate(
  conn: Connection,
  url: string,
  name: string,
  template: { family: string; name: string },
  sets: readonly LoadedMigrations[],
  options: TestDatabaseOptions,
): Promise<boolean> {
  try {
    await createDatabase(conn, name, "database", template.name);
    return false;
  } catch (error) {
    // 3D000: the template does not exist (yet, or was replaced); build it.
    if (!(error instanceof QueryError && error.sqlstate === "3D000")) throw error;
  }
  const built = await ensureTemplate(conn, url, template, sets, options.lockWaitMs ?? 300_000);
  await createDatabase(conn, name, "database", template.name);
  return built;
}

function testDatabase(
  fields: Omit<TestDatabase, typeof Symbol.asyncDispose | "drop"> & {
    drop: () => Promise<void>;
  },
): TestDatabase {
  let dropped: Promise<void> | undefined;
  const drop = () => dropped ??= fields.drop();
  return { ...fields, drop, [Symbol.asyncDispose]: drop };
}

/** Runs `fn`, then `cleanup`; an error of `fn` wins over one of the cleanup. */
async function afterwards<T>(fn: () => Promise<T>, cleanup: () => Promise<void>): Promise<T> {
  let result: T;
  try {
    result = await fn();
  } catch (error) {
    await cleanup().catch(() => {});
    throw error;
  }
  await cleanup();
  return result;
}
