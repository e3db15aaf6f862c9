/**
 * The database side of the Deploy example: one small pool per isolate, opened by the first
 * request that needs it (concurrent first requests share the one opening), and one manager
 * per tenant schema, migrated the first time this isolate sees the tenant.
 *
 * @module
 */

import {
  createSharedPool,
  type DatabaseConfig,
  DatabaseManager,
  Migrator,
  type Pool,
  PoolError,
  type PoolStats,
  SchemaError,
} from "../../mod.ts";
import { TENANT_MIGRATIONS, TENANT_MODULE } from "./_migrations.ts";

const TENANT_NAME = /^[a-z][a-z0-9_]{0,39}$/;

/**
 * The schema of a tenant: `tenant_<name>`.
 *
 * @param name The tenant name from the URL, unchecked.
 * @returns The schema name.
 * @throws {SchemaError} When `name` is not 1 to 40 lowercase letters, digits or underscores
 *   starting with a letter.
 */
export function tenantSchema(name: string): string {
  if (!TENANT_NAME.test(name)) {
    const shown = JSON.stringify(name.length > 60 ? `${name.slice(0, 60)}…` : name);
    throw new SchemaError(
      `Cannot use the tenant ${shown}: a tenant name is 1 to 40 lowercase ASCII letters, ` +
        `digits or underscores, starting with a letter`,
    );
  }
  return `tenant_${name}`;
}

/** The pool and the tenants' managers of one isolate. */
export class TenantDatabase {
  readonly #config: DatabaseConfig;
  readonly #tenants = new Map<string, Promise<DatabaseManager>>();
  #opening?: Promise<DatabaseManager>;
  #pool?: Pool;
  #closed = false;

  /**
   * Keeps the configuration; nothing is opened until the first request.
   *
   * @param config The pool's configuration.
   */
  constructor(config: DatabaseConfig) {
    this.#config = config;
  }

  /** Statistics of the pool, or `null` before it was opened. */
  get stats(): PoolStats | null {
    return this.#pool?.getStats() ?? null;
  }

  /** How many tenant schemas this isolate has migrated (or is migrating). */
  get tenantCount(): number {
    return this.#tenants.size;
  }

  /**
   * A manager over the shared pool without a schema; opens the pool on the first call.
   *
   * @returns The manager.
   * @throws {PoolError} After `close()`.
   * @throws {ConnectionError} When the server cannot be reached (the next call tries again).
   */
  root(): Promise<DatabaseManager> {
    if (this.#closed) return Promise.reject(shuttingDown());
    this.#opening ??= this.#open();
    return this.#opening;
  }

  /**
   * The manager of a tenant, its schema created and migrated once per isolate.
   *
   * @param name The tenant name from the URL.
   * @returns The tenant's manager.
   * @throws {SchemaError} When the name is not a valid tenant name (nothing is run).
   * @throws {MigrationError} When a migration fails (the next call tries again).
   */
  tenant(name: string): Promise<DatabaseManager> {
    let schema: string;
    try {
      schema = tenantSchema(name);
    } catch (error) {
      return Promise.reject(error);
    }
    let ready = this.#tenants.get(schema);
    if (ready === undefined) {
      ready = this.#migrate(schema);
      this.#tenants.set(schema, ready);
      const current = ready;
      current.catch(() => {
        if (this.#tenants.get(schema) === current) this.#tenants.delete(schema);
      });
    }
    return ready;
  }

  /** Closes the pool once its running queries finish; later calls to `root()` reject. */
  async close(): Promise<void> {
    this.#closed = true;
    const root = await this.#opening?.catch(() => undefined);
    await root?.pool.close();
  }

  async #open(): Promise<DatabaseManager> {
    try {
      this.#pool = await createSharedPool(this.#config);
      return new DatabaseManager({ pool: this.#pool });
    } catch (error) {
      this.#opening = undefined;
      throw error;
    }
  }

  async #migrate(schema: string): Promise<DatabaseManager> {
    const tenant = (await this.root()).withSchema(schema);
    await tenant.ensureSchema();
    const migrator = new Migrator(tenant, {
      migrations: TENANT_MIGRATIONS,
      moduleName: TENANT_MODULE,
    });
    await migrator.applyPending();
    return tenant;
  }
}

function shuttingDown(): PoolError {
  return new PoolError(
    "Cannot open the database pool: this instance is shutting down; send the request again",
    "POOL_CLOSED",
  );
}
