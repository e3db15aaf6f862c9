/**
 * Migration sets of the test helpers and the template databases built from them.
 *
 * A template is named after what it contains: `<prefix>_tpl_<family>_<content>`, where
 * `family` hashes the modules and schemas and `content` hashes every file name and
 * checksum too. It is built under another name (`…_new`) and renamed when complete, so a
 * template that exists is a finished one; it then refuses connections
 * (`ALLOW_CONNECTIONS false`), because `CREATE DATABASE … TEMPLATE` fails while anyone is
 * connected to it. Builds of one family are serialized by an advisory lock on the
 * maintenance database; the build that makes a new template drops the family's older ones.
 *
 * @module
 */

import { ConfigurationError, TimeoutError } from "../errors.ts";
import { DatabaseManager } from "../manager.ts";
import { Migrator } from "../migrate/migrator.ts";
import { resolveMigrationSource } from "../migrate/source.ts";
import type { MigrationSource } from "../migrate/types.ts";
import { assertIdentifier, quoteIdentifier } from "../template.ts";
import { sha256Hex } from "../_hash.ts";
import { pollUntilTaken } from "../_backoff.ts";
import type { Connection } from "../transaction.ts";
import { parseMigrationFiles } from "../migrate/_files.ts";
import {
  createDatabase,
  databaseExists,
  dropDatabase,
  listMarked,
  mark,
  terminateConnections,
  withDatabase,
} from "./_server.ts";

/** One module's migrations for a test database or schema. */
export interface TestMigrations {
  /** The module the migrations belong to (the `moduleName` of {@link Migrator}). */
  moduleName: string;
  /** A directory path, or a `file:`/`https:` URL of a folder. */
  migrationsPath?: string | URL;
  /** File name → SQL, in memory (instead of `migrationsPath`). */
  migrations?: Record<string, string>;
  /**
   * The schema they run in; created when missing. Not allowed with `withTestSchema()`,
   * whose throwaway schema receives every module.
   * @default {undefined} (no schema: unqualified names, the `public` schema)
   */
  schema?: string;
  /**
   * The history table.
   * @default {"schema_migrations"}
   */
  migrationsTable?: string;
}

/** A migration set read once: its files are fixed for the template's name and its build. */
export interface LoadedMigrations {
  readonly set: TestMigrations;
  readonly source: MigrationSource;
  readonly checksums: readonly (readonly [string, string])[];
}

/** Bump when the layout of templates changes, so old templates are not reused. */
const TEMPLATE_FORMAT = 1;
const LOCK_NAMESPACE = "pgdbm_testing_template";
const SILENT = { warn(): void {} };

/**
 * Reads every set's source once (checksums computed) and validates the sets.
 *
 * @throws {ConfigurationError} When a set has no module, no source or two, or a bad schema.
 * @throws {MigrationError} When a source cannot be read or holds invalid files.
 */
export async function loadMigrations(
  input: TestMigrations | readonly TestMigrations[] | undefined,
): Promise<LoadedMigrations[]> {
  if (input === undefined) return [];
  const sets = Array.isArray(input) ? input : [input as TestMigrations];
  const loaded: LoadedMigrations[] = [];
  for (const set of sets) {
    if (set === null || typeof set !== "object" || typeof set.moduleName !== "string") {
      throw new ConfigurationError(
        "migrations",
        "Cannot use 'migrations': each entry needs a 'moduleName' and a source, such as " +
          "{ moduleName: 'notes', migrationsPath: './migrations' }",
      );
    }
    if (set.schema !== undefined) assertIdentifier(set.schema, "schema");
    const source = resolveMigrationSource(set);
    const files = await source.read();
    const parsed = await parseMigrationFiles(files, source.location);
    loaded.push({
      set,
      source: { location: source.location, read: () => Promise.resolve(files) },
      checksums: parsed.map((file) => [file.filename, file.checksum] as const),
    });
  }
  return loaded;
}

/**
 * Applies every set to a database, each in its schema (or in `schema` when given).
 *
 * @throws {MigrationError} When a migration fails.
 */
export async function applyMigrations(
  db: DatabaseManager,
  sets: readonly LoadedMigrations[],
  schema?: string,
): Promise<void> {
  for (const { set, source } of sets) {
    const target = schema ?? set.schema;
    const manager = target === undefined ? db : db.withSchema(target);
    await manager.ensureSchema();
    await new Migrator(manager, {
      source,
      moduleName: set.moduleName,
      migrationsTable: set.migrationsTable,
    }).applyPending();
  }
}

/** The template's family (modules and schemas) and full name (contents too). */
export async function templateName(
  prefix: string,
  sets: readonly LoadedMigrations[],
): Promise<{ family: string; name: string }> {
  const shape = sets.map(({ set }) => [
    set.moduleName,
    set.schema ?? null,
    set.migrationsTable ?? null,
  ]);
  const family = `${prefix}_tpl_${
    (await sha256Hex(JSON.stringify([TEMPLATE_FORMAT, shape]))).slice(0, 8)
  }`;
  const content = sets.map((loaded, i) => [shape[i], loaded.checksums]);
  const name = `${family}_${(await sha256Hex(JSON.stringify(content))).slice(0, 12)}`;
  return { family, name };
}

/**
 * Makes sure the template exists: under the family's advisory lock, builds it when no
 * other process has, and drops the family's outdated templates.
 *
 * @returns True when this call built it.
 * @throws {TimeoutError} When another process held the lock longer than `lockWaitMs`.
 */
export async function ensureTemplate(
  conn: Connection,
  url: string,
  template: { family: string; name: string },
  sets: readonly LoadedMigrations[],
  lockWaitMs: number,
): Promise<boolean> {
  await lock(conn, template.family, lockWaitMs);
  try {
    if (await databaseExists(conn, template.name)) return false;
    for (const stale of await listMarked(conn, `${template.family}_`)) {
      if (stale.kind !== "database") await dropDatabase(conn, stale.name);
    }
    const building = `${template.name}_new`;
    await createDatabase(conn, building, "building");
    const db = new DatabaseManager({
      connectionString: withDatabase(url, building),
      minConnections: 1,
      maxConnections: 2,
      logger: SILENT,
    });
    try {
      await db.connect();
      await applyMigrations(db, sets);
    } catch (error) {
      await db.close();
      await dropDatabase(conn, building);
      throw error;
    }
    await db.close();
    await conn.execute(`ALTER DATABASE ${quoteIdentifier(building)} ALLOW_CONNECTIONS false`);
    await terminateConnections(conn, building);
    await conn.execute(
      `ALTER DATABASE ${quoteIdentifier(building)} RENAME TO ${quoteIdentifier(template.name)}`,
    );
    await mark(conn, template.name, "template");
    return true;
  } finally {
    await conn.execute("SELECT pg_advisory_unlock(hashtext($1), hashtext($2))", [
      LOCK_NAMESPACE,
      template.family,
    ]);
  }
}

async function lock(conn: Connection, family: string, lockWaitMs: number): Promise<void> {
  const tryLock = async (): Promise<true | undefined> => {
    const taken = await conn.fetchValue<boolean>(
      "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))",
      [LOCK_NAMESPACE, family],
    );
    return taken === true ? true : undefined;
  };
  await pollUntilTaken(
    tryLock,
    {
      initialMs: 20,
      maxMs: 500,
      timeoutMs: lockWaitMs,
      onTimeout: () =>
        new TimeoutError(
          `Cannot build test template '${family}': another process has been building it for ` +
            `${lockWaitMs} ms; wait for it to finish or raise 'lockWaitMs'`,
          lockWaitMs,
        ),
    },
  );
}
