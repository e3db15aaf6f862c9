/**
 * Shared setup of the tests that need a PostgreSQL server: where it is, whether it is
 * up, and fresh uniquely named schemas. Without a server the tests are skipped with a
 * message saying why, unless PGDBM_REQUIRE_SERVER=1 (CI), which makes them fail instead.
 */
import postgres from "postgres";
import { createSharedPool, DatabaseManager, type Pool } from "../../mod.ts";
import type { DatabaseConfig } from "../../src/config.ts";

/** The server the tests use. */
export const TEST_URL: string = Deno.env.get("PGDBM_TEST_URL") ??
  "postgres://postgres@127.0.0.1:5432/test";

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
