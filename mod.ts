/**
 * pgdbm for Deno: one shared PostgreSQL connection pool, many schema-isolated managers
 * over it, `{{tables.name}}` SQL templates that make the same queries and migration files
 * run in any schema, and a migrator keyed by module.
 *
 * @example Standalone manager (needs a server)
 * ```ts ignore
 * import { DatabaseManager } from "@pgdbm/pgdbm";
 * await using db = new DatabaseManager({ connectionString: Deno.env.get("DATABASE_URL"), schema: "app" });
 * await db.connect();
 * const n = await db.fetchValue<number>("SELECT count(*)::int FROM {{tables.users}}");
 * ```
 *
 * @module
 */

export { DatabaseManager } from "./src/manager.ts";
export type { DropSchemaOptions, ManagerPoolStats, SharedPoolOptions } from "./src/manager.ts";
export { createSharedPool } from "./src/pool/pool.ts";
export type {
  ConnectionCounts,
  Pool,
  PoolStats,
  QueryOptions,
  ReplicaStats,
  WaitPercentiles,
} from "./src/pool/pool.ts";
export type { QueryEvent, QueryHook } from "./src/query_event.ts";
export type { DatabaseConfig, Logger, RetryConfig, SslConfig, SslMode } from "./src/config.ts";
export type {
  CopyObject,
  CopyOptions,
  CopyRecords,
  ExecuteResult,
  FetchValueOptions,
  Queries,
  Row,
} from "./src/queries.ts";
export type { Connection, RawConnection, Transaction } from "./src/transaction.ts";
export type { StreamOptions } from "./src/stream.ts";
export type { ListenOptions, NotificationHandler, Subscription } from "./src/listen.ts";
export type { CopyQueryOptions, CopyTableOptions } from "./src/_copy_out.ts";
export type {
  InferOutput,
  StandardSchemaIssue,
  StandardSchemaResult,
  StandardSchemaV1,
} from "./src/standard_schema.ts";
export { expandTemplate } from "./src/template.ts";
export { Migrator } from "./src/migrate/migrator.ts";
export type {
  AppliedMigration,
  AppliedMigrationResult,
  ApplyPendingOptions,
  CreateMigrationOptions,
  DriftedMigration,
  Migration,
  MigrationEvent,
  MigrationFailure,
  MigrationLockMode,
  MigrationResult,
  MigrationStatus,
  MigratorOptions,
} from "./src/migrate/migrator.ts";
export { checkSchemas, migrateSchemas } from "./src/migrate/fleet.ts";
export type {
  CheckSchemasOptions,
  FleetProgress,
  FleetResult,
  FleetStatusReport,
  MigrateSchemasOptions,
  SchemaMigrationResult,
  SchemaStatus,
} from "./src/migrate/fleet.ts";
export {
  createDirectorySource,
  createRecordSource,
  createUrlSource,
  writeMigrationManifest,
} from "./src/migrate/source.ts";
export type { UrlSourceOptions } from "./src/migrate/source.ts";
export type {
  MigrationFile,
  MigrationSource,
  MigrationSourceOptions,
} from "./src/migrate/types.ts";
export {
  ConfigurationError,
  ConnectionError,
  MigrationError,
  PgdbmError,
  PoolError,
  QueryError,
  SchemaError,
  TimeoutError,
  ValidationError,
} from "./src/errors.ts";
export type {
  ConnectionTarget,
  MigrationErrorDetails,
  MigrationErrorReason,
  PgdbmErrorCode,
  PgdbmErrorOptions,
  ServerErrorFields,
  TimeoutErrorOptions,
  ValidationIssue,
} from "./src/errors.ts";
