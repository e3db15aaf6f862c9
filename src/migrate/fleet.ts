/**
 * Tenant fleets: one module's migrations applied to many schemas over one shared pool,
 * with bounded concurrency. Each schema runs {@link Migrator.applyPending} (its own
 * advisory lock, one transaction per migration), so a tenant's failure is reported for
 * that tenant and the others go on; a run that was interrupted (aborted, or the process
 * killed) resumes where it stopped on the next call, because up-to-date tenants cost one
 * query each. {@link checkSchemas} reports which tenants are behind or have drifted.
 * Behind PgBouncer in transaction mode pass `lock: "transaction"` (see
 * {@link MigratorOptions.lock}): each schema's migrations then lock in their own
 * transactions instead of on a session.
 *
 * @module
 */

import { MigrationError, PgdbmError } from "../errors.ts";
import { DatabaseManager } from "../manager.ts";
import {
  type AppliedMigrationResult,
  type DriftedMigration,
  Migrator,
  type MigratorOptions,
  withoutHistory,
} from "./migrator.ts";
import { resolveMigrationSource } from "./source.ts";
import type { MigrationSource } from "./types.ts";
import { upToDateSchemas } from "./_fleet_history.ts";
import { DEFAULT_HISTORY_TABLE } from "./_history.ts";
import type { Pool } from "../pool/pool.ts";
import { assertIdentifier } from "../template.ts";

/**
 * Options of {@link migrateSchemas}: a {@link Migrator}'s options (`lock` included) plus the
 * fleet's own.
 */
export interface MigrateSchemasOptions extends Omit<MigratorOptions, "onEvent"> {
  /**
   * How many schemas migrate at once; each holds one pool connection while it has
   * migrations to apply.
   * @default {"the pool's maxConnections - 1 (at least 1, at most 32)"}
   */
  concurrency?: number;
  /**
   * Report what would be applied to each schema without running anything.
   * @default {false}
   */
  dryRun?: boolean;
  /**
   * Stops starting new schemas when aborted; schemas already running finish their run,
   * unless {@link MigrateSchemasOptions.cancelRunning}.
   */
  signal?: AbortSignal;
  /**
   * When `signal` aborts, also stop the schemas that are running, as
   * `applyPending({ signal })` does: the statement is cancelled and the migration in
   * progress rolls back. Their results are `failed`, with a {@link MigrationError} whose
   * `reason` is `aborted`; migrations they committed before stay applied.
   * @default {false}
   */
  cancelRunning?: boolean;
  /** Called after each schema finishes. Exceptions it throws are ignored. */
  onProgress?: (progress: FleetProgress) => void;
}

/** Options of {@link checkSchemas}. */
export interface CheckSchemasOptions extends
  Pick<
    MigratorOptions,
    "moduleName" | "migrationsPath" | "migrations" | "source" | "migrationsTable"
  > {
  /**
   * How many schemas are checked at once (one query each, pipelined on the pool).
   * @default {16}
   */
  concurrency?: number;
  /** Called after each schema is checked. Exceptions it throws are ignored. */
  onProgress?: (progress: { schema: string; done: number; total: number }) => void;
}

/** How one schema fared in {@link migrateSchemas}. */
export interface SchemaMigrationResult {
  /** The schema. */
  schema: string;
  /** As in {@link MigrationResult}, plus `failed`, and `not_started` when the run was aborted first. */
  status: "success" | "up_to_date" | "dry_run" | "failed" | "not_started";
  /** What was applied to it (before the failure, when it failed). */
  applied: AppliedMigrationResult[];
  /** What would be applied (dry run only). */
  pending?: string[];
  /** Applied migrations whose file is gone. */
  missing: string[];
  /** Why it failed (usually a {@link MigrationError} with the file, line and server message). */
  error?: Error;
  /** Time spent on this schema in milliseconds. */
  durationMs: number;
}

/** Reported to {@link MigrateSchemasOptions.onProgress} after each schema. */
export interface FleetProgress {
  /** The schema that just finished. */
  schema: string;
  /** Its result. */
  result: SchemaMigrationResult;
  /** Schemas finished so far. */
  done: number;
  /** Schemas in the run. */
  total: number;
  /** Schemas failed so far. */
  failed: number;
  /** Migrations applied so far, over all schemas. */
  appliedCount: number;
  /** Time since the run started. */
  elapsedMs: number;
}

/** What {@link migrateSchemas} returns. */
export interface FleetResult {
  /**
   * `interrupted` when aborted before every schema started; else `failed` when any schema
   * failed; else `dry_run`, `success` (something applied) or `up_to_date`.
   */
  status: "success" | "up_to_date" | "dry_run" | "failed" | "interrupted";
  /** The module. */
  module: string;
  /** One result per schema, in the order given (duplicates removed). */
  results: SchemaMigrationResult[];
  /** Schemas that finished without error. */
  succeeded: string[];
  /** Schemas that failed. */
  failed: string[];
  /** Schemas not started because the run was aborted; run again to finish them. */
  notStarted: string[];
  /** Migrations applied, over all schemas. */
  appliedCount: number;
  /** Wall-clock time of the run in milliseconds. */
  totalTimeMs: number;
}

/** Where one schema stands, from {@link checkSchemas}. */
export interface SchemaStatus {
  /** The schema. */
  schema: string;
  /** `drifted` wins over `behind`; `error` when the check itself failed. */
  state: "up_to_date" | "behind" | "drifted" | "error";
  /** False when the schema has no history table yet. */
  initialized: boolean;
  /** Files not applied yet. */
  pending: string[];
  /** Applied files that changed since. */
  drifted: DriftedMigration[];
  /** Applied migrations whose file is gone. */
  missing: string[];
  /** How many history rows count for the module. */
  appliedCount: number;
  /** Why the check failed. */
  error?: Error;
}

/** What {@link checkSchemas} returns. */
export interface FleetStatusReport {
  /** The module. */
  module: string;
  /** One status per schema, in the order given. */
  schemas: SchemaStatus[];
  /** Schemas with nothing pending and nothing drifted. */
  upToDate: string[];
  /** Schemas with pending migrations (and no drift), including never migrated ones. */
  behind: string[];
  /** Schemas where an applied file changed. */
  drifted: string[];
  /** Schemas that could not be checked. */
  errors: string[];
  /** Time the check took in milliseconds. */
  totalTimeMs: number;
}

/**
 * Applies a module's migrations to many schemas over one shared pool, `concurrency`
 * schemas at a time. One schema's failure does not stop the others; it is reported in
 * its result. Call it again after an interruption: finished schemas are found up to date
 * for the whole fleet in a few queries, and the rest resume.
 *
 * @param target The shared pool, or a manager over it.
 * @param schemas The schemas (tenants) to migrate.
 * @param options The source, `moduleName`, the migrator's settings (`lock: "transaction"`
 *   behind PgBouncer in transaction mode), and `concurrency`, `dryRun`, `signal`,
 *   `onProgress`.
 * @returns Per-schema results and a summary.
 * @throws {ConfigurationError} When an option is invalid.
 * @throws {MigrationError} When the source is invalid (nothing is run then).
 *
 * @example Migrate every tenant (needs a server)
 * ```ts ignore
 * import { createSharedPool, migrateSchemas } from "@pgdbm/pgdbm";
 * const pool = await createSharedPool({ connectionString: Deno.env.get("DATABASE_URL") });
 * const tenants = ["tenant_1", "tenant_2", "tenant_3"];
 * const result = await migrateSchemas(pool, tenants, {
 *   migrationsPath: "./migrations/tenant",
 *   moduleName: "tenant",
 *   onProgress: (p) => console.log(`${p.done}/${p.total} ${p.schema}: ${p.result.status}`),
 * });
 * if (result.failed.length > 0) console.error(result.results.filter((r) => r.error));
 * await pool.close();
 * ```
 */
export async function migrateSchemas(
  target: Pool | DatabaseManager,
  schemas: Iterable<string>,
  options: MigrateSchemasOptions,
): Promise<FleetResult> {
  const started = performance.now();
  const list = unique(schemas);
  const { concurrency, dryRun, signal, cancelRunning, onProgress, ...migratorOptions } = options;
  const frozen = await freeze(migratorOptions);
  const base: MigratorOptions = {
    ...migratorOptions,
    migrationsPath: undefined,
    migrations: undefined,
    source: frozen,
  };
  const managerFor = managerFactory(target);
  // Validates the options and the source once, before any schema is touched.
  const files = await new Migrator(managerFor(undefined), base).findMigrationFiles();
  const limit = checkConcurrency(concurrency, defaultConcurrency(target), "concurrency");
  // Schemas already up to date are found in a few round trips for the whole fleet.
  const read = performance.now();
  const current = dryRun === true ? undefined : await upToDateSchemas(
    managerFor(undefined),
    list,
    files,
    options.moduleName,
    options.migrationsTable ?? DEFAULT_HISTORY_TABLE,
  );
  const readMs = performance.now() - read;

  const results: SchemaMigrationResult[] = list.map((schema) => ({
    schema,
    status: "not_started",
    applied: [],
    missing: [],
    durationMs: 0,
  }));
  let done = 0;
  let failed = 0;
  let appliedCount = 0;
  await runPool(list.length, limit, signal, async (index) => {
    const schema = list[index];
    const result = current?.upToDate.has(schema)
      ? { schema, status: "up_to_date" as const, applied: [], missing: [], durationMs: readMs }
      : await migrateOne(managerFor, schema, base, {
        dryRun: dryRun === true,
        signal: cancelRunning === true ? signal : undefined,
      }, current?.withoutTable.has(schema) === true);
    results[index] = result;
    done++;
    if (result.status === "failed") failed++;
    appliedCount += result.applied.length;
    if (onProgress !== undefined) {
      try {
        onProgress({
          schema,
          result,
          done,
          total: list.length,
          failed,
          appliedCount,
          elapsedMs: performance.now() - started,
        });
      } catch {
        // A failing progress listener must not stop the fleet.
      }
    }
  });

  const notStarted = results.filter((r) => r.status === "not_started").map((r) => r.schema);
  const failedSchemas = results.filter((r) => r.status === "failed").map((r) => r.schema);
  const status: FleetResult["status"] = notStarted.length > 0
    ? "interrupted"
    : failedSchemas.length > 0
    ? "failed"
    : dryRun
    ? "dry_run"
    : appliedCount > 0
    ? "success"
    : "up_to_date";
  return {
    status,
    module: options.moduleName,
    results,
    succeeded: results
      .filter((r) => r.status !== "failed" && r.status !== "not_started")
      .map((r) => r.schema),
    failed: failedSchemas,
    notStarted,
    appliedCount,
    totalTimeMs: performance.now() - started,
  };
}

/**
 * Reports where a module stands in many schemas without changing anything: which are up to
 * date, behind (pending migrations) or drifted (an applied file changed). One query per
 * schema, pipelined over the pool.
 *
 * @param target The shared pool, or a manager over it.
 * @param schemas The schemas (tenants) to check.
 * @param options The source, `moduleName`, `migrationsTable`, `concurrency`, `onProgress`.
 * @returns Per-schema statuses and the lists of schemas by state.
 * @throws {MigrationError} When the source is invalid.
 *
 * @example Find tenants that need a migration (needs a server)
 * ```ts ignore
 * import { checkSchemas } from "@pgdbm/pgdbm";
 * const report = await checkSchemas(pool, tenants, {
 *   migrationsPath: "./migrations/tenant",
 *   moduleName: "tenant",
 * });
 * console.log(`behind: ${report.behind.length}, drifted: ${report.drifted.join(", ")}`);
 * ```
 */
export async function checkSchemas(
  target: Pool | DatabaseManager,
  schemas: Iterable<string>,
  options: CheckSchemasOptions,
): Promise<FleetStatusReport> {
  const started = performance.now();
  const list = unique(schemas);
  const { concurrency, onProgress, ...rest } = options;
  const frozen = await freeze(rest);
  const base: MigratorOptions = {
    moduleName: rest.moduleName,
    migrationsTable: rest.migrationsTable,
    source: frozen,
  };
  const managerFor = managerFactory(target);
  await new Migrator(managerFor(undefined), base).findMigrationFiles();
  const limit = checkConcurrency(concurrency, 16, "concurrency");
  const statuses: SchemaStatus[] = new Array(list.length);
  let done = 0;
  await runPool(list.length, limit, undefined, async (index) => {
    const schema = list[index];
    try {
      assertIdentifier(schema, "schema");
      const status = await new Migrator(managerFor(schema), base).getStatus();
      statuses[index] = {
        schema,
        state: status.drifted.length > 0
          ? "drifted"
          : status.pending.length > 0
          ? "behind"
          : "up_to_date",
        initialized: status.initialized,
        pending: status.pending.map((m) => m.filename),
        drifted: status.drifted,
        missing: status.missing.map((m) => m.filename),
        appliedCount: status.applied.length,
      };
    } catch (error) {
      statuses[index] = {
        schema,
        state: "error",
        initialized: false,
        pending: [],
        drifted: [],
        missing: [],
        appliedCount: 0,
        error: asError(error),
      };
    }
    done++;
    try {
      onProgress?.({ schema, done, total: list.length });
    } catch {
      // A failing progress listener must not stop the check.
    }
  });
  const by = (state: SchemaStatus["state"]): string[] =>
    statuses.filter((s) => s.state === state).map((s) => s.schema);
  return {
    module: options.moduleName,
    schemas: statuses,
    upToDate: by("up_to_date"),
    behind: by("behind"),
    drifted: by("drifted"),
    errors: by("error"),
    totalTimeMs: performance.now() - started,
  };
}

/**
 * Runs one schema's migrator; `fresh`: the fleet's read found no history table there, so
 * the migrator goes to the lock without looking for it again.
 */
async function migrateOne(
  managerFor: (schema: string | undefined) => DatabaseManager,
  schema: string,
  options: MigratorOptions,
  run: { dryRun: boolean; signal?: AbortSignal },
  fresh: boolean,
): Promise<SchemaMigrationResult> {
  const started = performance.now();
  try {
    assertIdentifier(schema, "schema");
    const migrator = new Migrator(managerFor(schema), options);
    if (fresh) withoutHistory(migrator);
    const result = await migrator.applyPending(run);
    const out: SchemaMigrationResult = {
      schema,
      status: result.status,
      applied: result.applied,
      missing: result.missing,
      durationMs: performance.now() - started,
    };
    if (result.pending !== undefined) out.pending = result.pending;
    return out;
  } catch (error) {
    const partial = error instanceof MigrationError ? error.partialResult : undefined;
    return {
      schema,
      status: "failed",
      applied: partial?.applied ?? [],
      missing: partial?.missing ?? [],
      error: asError(error),
      durationMs: performance.now() - started,
    };
  }
}

/** Reads the source once; every schema of the run then sees the same files. */
async function freeze(
  options: Parameters<typeof resolveMigrationSource>[0],
): Promise<MigrationSource> {
  const source = resolveMigrationSource(options);
  const files = await source.read();
  return { location: source.location, read: () => Promise.resolve(files) };
}

function managerFactory(
  target: Pool | DatabaseManager,
): (schema: string | undefined) => DatabaseManager {
  if (target instanceof DatabaseManager) {
    return (schema) => schema === undefined ? target : target.withSchema(schema);
  }
  const root = new DatabaseManager({ pool: target });
  return (schema) => schema === undefined ? root : root.withSchema(schema);
}

function defaultConcurrency(target: Pool | DatabaseManager): number {
  const max = target instanceof DatabaseManager
    ? target.getPoolStats().maxSize
    : target.getStats().maxSize;
  return Math.max(1, Math.min(32, max - 1));
}

function checkConcurrency(value: number | undefined, fallback: number, field: string): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < 1) {
    throw new RangeError(
      `Cannot run the fleet: '${field}' must be a positive integer; got ${String(value)}`,
    );
  }
  return value;
}

function unique(schemas: Iterable<string>): string[] {
  return [...new Set(schemas)];
}

/** Runs `task(i)` for i in [0, count) with at most `limit` at once; stops starting when aborted. */
async function runPool(
  count: number,
  limit: number,
  signal: AbortSignal | undefined,
  task: (index: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count && signal?.aborted !== true) await task(next++);
  };
  await Promise.all(Array.from({ length: Math.min(limit, count) }, worker));
}

function asError(error: unknown): Error {
  if (error instanceof Error) return error;
  return new PgdbmError("MIGRATION_ERROR", String(error));
}
