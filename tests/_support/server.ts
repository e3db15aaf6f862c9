/**
 * Shared setup of the tests that need a PostgreSQL server: where it is, whether it is
 * up, and fresh uniquely named schemas. Without a server the tests are skipped with a
 * message saying why, unless PGDBM_REQUIRE_SERVER=1 (CI), which makes them fail instead.
 *
 * The suite's one rule for where a test runs:
 * - The server is the one the testing helpers would use (`PGDBM_TEST_URL`, else
 *   `DATABASE_URL`: `serverUrlFromEnv()` of src/testing), else the documented default
 *   {@link DEFAULT_TEST_URL}, the server `deno task test` expects on a developer's machine.
 * - When it answers, every test that can use a server runs on it, including the tests
 *   that could run on either engine (the example tests, the fixture and snapshot helpers):
 *   they take {@link TEST_TARGET} (or use {@link targetTest}) instead of leaving the choice
 *   to the helpers, which without an environment variable would pick the embedded engine
 *   even with the default server up.
 * - When it does not answer, server-only tests are skipped (with PGDBM_REQUIRE_SERVER=1
 *   the import fails instead), and the either-engine tests run on the embedded PostgreSQL
 *   (PGlite), saying so in their names. Tests of the embedded engine itself always run on it.
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager, type Pool } from "../../mod.ts";
import type { DatabaseConfig } from "../../src/config.ts";
import { serverUrlFromEnv } from "../../src/testing/_server.ts";

/** The server `deno task test` uses when no environment variable names one. */
export const DEFAULT_TEST_URL: string = "postgres://postgres@127.0.0.1:5432/test";

/** The server the tests use: `PGDBM_TEST_URL`, else `DATABASE_URL`, else the default. */
export const TEST_URL: string = serverUrlFromEnv() ?? DEFAULT_TEST_URL;

const REQUIRED = Deno.env.get("PGDBM_REQUIRE_SERVER") === "1";

async function probe(): Promise<string | undefined> {
  const sql = postgres(TEST_URL, { max: 1, connect_timeout: 3, onnotice: () => {} });
  try {
    await sql`SELECT 1`;
    return undefined;
  } catch (error) {
    return error instanceof Error ? error.message : String(error);
  } finally {
    await sql.end({ timeout: 0 });
  }
}

const unavailable = await probe();
if (unavailable !== undefined) {
  if (REQUIRED) {
    throw new Error(
      `PGDBM_REQUIRE_SERVER=1 but no PostgreSQL answers at PGDBM_TEST_URL (${unavailable}); ` +
        "start the server or unset PGDBM_REQUIRE_SERVER",
    );
  }
  console.warn(
    `SKIPPED server tests: no PostgreSQL answers at PGDBM_TEST_URL (${unavailable}). ` +
      "Set PGDBM_TEST_URL to a server to run them.",
  );
}

/** True when the test server answers. */
export const SERVER_AVAILABLE: boolean = unavailable === undefined;

/**
 * Where a test that can run on either engine runs, as options of the testing helpers
 * (`withTestDatabase`, `withTestSchema`, `createTestDatabase`): the test server when it
 * answers, else the embedded PostgreSQL.
 */
export const TEST_TARGET: { url: string } | { embedded: true } = SERVER_AVAILABLE
  ? { url: TEST_URL }
  : { embedded: true };

/**
 * Registers a test that runs on {@link TEST_TARGET}: the server when it answers, else the
 * embedded PostgreSQL, named so (never silently).
 */
export function targetTest(
  name: string,
  fn: (t: Deno.TestContext) => void | Promise<void>,
): void {
  Deno.test({
    name: SERVER_AVAILABLE ? name : `${name} (on embedded PGlite: no server at PGDBM_TEST_URL)`,
    fn,
  });
}

/** Registers a test that needs the server; skipped (ignored, with the reason) without one. */
export function serverTest(
  name: string,
  fn: (t: Deno.TestContext) => void | Promise<void>,
): void {
  Deno.test({
    name: SERVER_AVAILABLE ? name : `${name} (skipped: no PostgreSQL server at PGDBM_TEST_URL)`,
    ignore: !SERVER_AVAILABLE,
    fn,
  });
}

let counter = 0;

/** A schema name no other test uses. */
export function uniqueName(prefix = "t"): string {
  const random = crypto.randomUUID().replaceAll("-", "").slice(0, 10);
  return `${prefix}_${Date.now().toString(36)}_${random}_${counter++}`;
}

/**
 * Opens a shared pool and a manager over a fresh schema; drops the schema and closes the
 * pool after `fn`, whatever happens.
 */
export async function withManager(
  fn: (db: DatabaseManager, pool: Pool) => Promise<void>,
  config: DatabaseConfig = {},
): Promise<void> {
  const pool = await createSharedPool({ connectionString: TEST_URL, ...config });
  const schema = uniqueName("pgdbm");
  const db = new DatabaseManager({ pool, schema });
  try {
    await db.ensureSchema();
    await fn(db, pool);
  } finally {
    await pool.close();
    await observe((sql) => sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`));
  }
}

/** Runs SQL on a separate raw connection (to observe the server from outside the pool). */
export async function observe<T>(fn: (sql: postgres.Sql) => Promise<T>): Promise<T> {
  const sql = postgres(TEST_URL, { max: 1, onnotice: () => {} });
  try {
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 1 });
  }
}

/**
 * Opens a transaction on `db` that reads `table` and stays open, holding the lock an
 * `ALTER TABLE` must wait for, until `release()` (which waits for the transaction to end).
 */
export async function holdTableLock(
  db: DatabaseManager,
  table: string,
): Promise<{ release(): Promise<void> }> {
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let holding!: () => void;
  const held = new Promise<void>((resolve) => (holding = resolve));
  const holder = db.transaction(async (tx) => {
    await tx.fetchAll(`SELECT * FROM {{tables.${table}}}`);
    holding();
    await released;
  });
  await Promise.race([held, holder]);
  return {
    release: async () => {
      release();
      await holder;
    },
  };
}
