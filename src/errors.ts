/**
 * The error classes of pgdbm. Every error the library throws on purpose is a
 * {@link PgdbmError} with a stable {@link PgdbmErrorCode}, so callers can branch on
 * `error.code` (or `instanceof`) instead of parsing messages.
 *
 * @module
 */

import { boundValueMasker, typeMask } from "./_mask.ts";
import type { MigrationResult } from "./migrate/types.ts";

/** Stable codes carried by every {@link PgdbmError}. */
export type PgdbmErrorCode =
  | "CONFIGURATION_ERROR"
  | "CONNECTION_ERROR"
  | "POOL_ERROR"
  | "POOL_CLOSED"
  | "POOL_EXHAUSTED"
  | "QUERY_ERROR"
  | "SCHEMA_ERROR"
  | "MIGRATION_ERROR"
  | "VALIDATION_ERROR"
  | "TIMEOUT_ERROR";

/** Options accepted by every error constructor. */
export interface PgdbmErrorOptions {
  /** The underlying error, kept as the standard `cause`. */
  cause?: unknown;
}

/**
 * Base class of every error pgdbm throws on purpose.
 *
 * @example Branch on the code
 * ```ts
 * import { PgdbmError } from "@pgdbm/pgdbm";
 * try {
 *   throw new PgdbmError("CONFIGURATION_ERROR", "Cannot connect: 'port' is -1");
 * } catch (error) {
 *   if (error instanceof PgdbmError) console.log(error.code);
 * }
 * ```
 */
export class PgdbmError extends Error {
  /** A stable machine-readable code. */
  readonly code: PgdbmErrorCode;

  /**
   * Makes an error with a code.
   *
   * @param code The stable code.
   * @param message What went wrong and what to do next.
   * @param options The `cause`, when there is one.
   */
  constructor(code: PgdbmErrorCode, message: string, options?: PgdbmErrorOptions) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
  }
}

/**
 * An option of {@link DatabaseConfig} (or of another options object) is invalid.
 * `field` names the option.
 */
export class ConfigurationError extends PgdbmError {
  /** The option that is wrong, such as `"maxConnections"`. */
  readonly field: string;

  /**
   * Makes the error.
   *
   * @param field The option that is wrong.
   * @param message What is wrong and what to do.
   */
  constructor(field: string, message: string, options?: PgdbmErrorOptions) {
    super("CONFIGURATION_ERROR", message, options);
    this.field = field;
  }
}

/** Where a {@link ConnectionError} tried to connect. Never holds the password. */
export interface ConnectionTarget {
  /** Host name, address, or Unix socket directory. */
  host: string;
  /** Port number. */
  port: number;
  /** Database name. */
  database: string;
  /** User name. */
  user: string;
}

/**
 * The server could not be reached, or a new connection could not be set up (a setup
 * statement or `initCommands` failed), after every retry. Carries no password.
 */
export class ConnectionError extends PgdbmError {
  /** Host name, address, or Unix socket directory. */
  readonly host: string;
  /** Port number. */
  readonly port: number;
  /** Database name. */
  readonly database: string;
  /** How many attempts were made. */
  readonly attempts: number;

  /**
   * Makes the error.
   *
   * @param target Where the connection was tried.
   * @param attempts How many attempts were made.
   * @param message What went wrong and what to check.
   */
  constructor(
    target: ConnectionTarget,
    attempts: number,
    message: string,
    options?: PgdbmErrorOptions,
  ) {
    super("CONNECTION_ERROR", message, options);
    this.host = target.host;
    this.port = target.port;
    this.database = target.database;
    this.attempts = attempts;
  }
}

/**
 * The pool cannot serve the request: it is closed (`code: "POOL_CLOSED"`), no connection
 * became free within `acquireTimeoutMs` (`code: "POOL_EXHAUSTED"`), or the manager is used
 * against its pattern (`code: "POOL_ERROR"`).
 */
export class PoolError extends PgdbmError {
  /**
   * Makes the error.
   *
   * @param message What went wrong and what to do.
   * @param code One of the pool codes.
   */
  constructor(
    message: string,
    code: "POOL_ERROR" | "POOL_CLOSED" | "POOL_EXHAUSTED" = "POOL_ERROR",
    options?: PgdbmErrorOptions,
  ) {
    super(code, message, options);
  }
}

/** Fields PostgreSQL reports with an error, kept on {@link QueryError}. */
export interface ServerErrorFields {
  /** The SQLSTATE code, such as `"23505"`. */
  sqlstate?: string;
  /** Severity, such as `"ERROR"` or `"FATAL"`. */
  severity?: string;
  /** The server's detail line. */
  detail?: string;
  /** The server's hint. */
  hint?: string;
  /** 1-based character position in the SQL text. */
  position?: number;
  /** Schema of the object involved. */
  schemaName?: string;
  /** Table of the object involved. */
  table?: string;
  /** Column involved. */
  column?: string;
  /** Constraint that was violated. */
  constraint?: string;
}

/**
 * A query failed. Holds the expanded SQL, the parameters masked, and the server's fields
 * (`sqlstate`, `detail`, `hint`, `position`, `constraint`…). `sql` and `params` are not
 * enumerable, so logging the error object does not print them.
 *
 * Bound values never reach what this error hands out, even where the server repeats them
 * (`Key (token)=(…) already exists.`, `invalid input syntax for type integer: "…"`,
 * `Failing row contains (…)`): in `message`, `detail`, `hint`, `stack` (so `String(error)`
 * and `console.log(error)` too) and in `cause`, every whole occurrence of a bound value's
 * text is replaced by its mask (`<string>`, `<number>`…). Strings of any length are masked,
 * numbers and bigints of 3 or more characters (a bound `10` leaves `varchar(10)` alone),
 * bytes in their hex form, and the strings and numbers inside arrays, objects and JSON
 * text; dates and booleans are not looked for. When the query had parameters, `cause` is a
 * copy of the driver's error (same class, so `instanceof` holds) whose texts (message,
 * stack, detail, the server's context line `where`…) are masked the same way and which
 * keeps none of the driver's objects, such as its copy of the parameters.
 *
 * `sql`, `sqlstate`, `severity`, `position`, `schemaName`, `table`, `column` and
 * `constraint` are the server's text as it is: names and codes, never a bound value. So
 * are the message, detail and hint of SQLSTATE class 57 (operator intervention: a cancel,
 * a shutdown), whose fixed texts name no value and tell why the statement stopped
 * (`canceling statement due to user request` stays whole when `"user"` was bound).
 */
export class QueryError extends PgdbmError implements ServerErrorFields {
  /** The expanded SQL that was sent. */
  declare readonly sql: string;
  /** The parameters, each replaced by a mask that tells only its type. */
  declare readonly params: readonly string[];
  /** The SQLSTATE code, such as `"23505"`. */
  readonly sqlstate?: string;
  /** Severity, such as `"ERROR"` or `"FATAL"`. */
  readonly severity?: string;
  /** The server's detail line, bound values masked. */
  readonly detail?: string;
  /** The server's hint, bound values masked. */
  readonly hint?: string;
  /** 1-based character position in the SQL text. */
  readonly position?: number;
  /** Schema of the object involved. */
  readonly schemaName?: string;
  /** Table of the object involved. */
  readonly table?: string;
  /** Column involved. */
  readonly column?: string;
  /** Constraint that was violated. */
  readonly constraint?: string;

  /**
   * Makes the error, masking the bound values in every text it keeps.
   *
   * @param message The server's message, or what went wrong.
   * @param sql The expanded SQL.
   * @param params The parameters as given; they are masked here, and so is their text
   *   wherever the message, the fields or the cause repeat it.
   * @param fields The server's error fields.
   * @param options The driver's error as `cause`; kept as a masked copy when there are
   *   parameters.
   */
  constructor(
    message: string,
    sql: string,
    params: readonly unknown[],
    fields: ServerErrorFields = {},
    options?: PgdbmErrorOptions,
  ) {
    const mask = fields.sqlstate?.startsWith("57") ? keepText : boundValueMasker(params);
    const cause = options?.cause;
    super(
      "QUERY_ERROR",
      mask(message),
      cause === undefined || params.length === 0 ? options : { cause: maskCause(cause, mask, 0) },
    );
    Object.defineProperty(this, "sql", { value: sql, enumerable: false });
    Object.defineProperty(this, "params", { value: maskParams(params), enumerable: false });
    this.sqlstate = fields.sqlstate;
    this.severity = fields.severity;
    this.detail = fields.detail === undefined ? undefined : mask(fields.detail);
    this.hint = fields.hint === undefined ? undefined : mask(fields.hint);
    this.position = fields.position;
    this.schemaName = fields.schemaName;
    this.table = fields.table;
    this.column = fields.column;
    this.constraint = fields.constraint;
  }
}

const MAX_CAUSE_DEPTH = 4;

function keepText(text: string): string {
  return text;
}

/**
 * A copy of a driver's error with every text masked and no object kept but its own
 * masked `cause`: the driver's error may hold the parameters (PGlite keeps them in `params`).
 */
function maskCause(cause: unknown, mask: (text: string) => string, depth: number): unknown {
  if (typeof cause === "string") return mask(cause);
  if (cause === null || (typeof cause !== "object" && typeof cause !== "function")) return cause;
  if (depth >= MAX_CAUSE_DEPTH) return undefined;
  const source = cause as Record<PropertyKey, unknown>;
  // A real Error (with its internal slot), so inspection prints it as an error.
  const copy: Record<PropertyKey, unknown> = cause instanceof Error
    ? Object.setPrototypeOf(new Error(), Object.getPrototypeOf(cause))
    : Object.create(Object.getPrototypeOf(cause));
  delete copy.stack; // the original's stack, if it has one, is copied below
  for (const key of Reflect.ownKeys(cause)) {
    const descriptor = Object.getOwnPropertyDescriptor(cause, key)!;
    let value: unknown;
    try {
      value = "value" in descriptor ? descriptor.value : source[key];
    } catch {
      continue;
    }
    if (key === "cause") value = maskCause(value, mask, depth + 1);
    else if (typeof value === "string") value = mask(value);
    else if (value !== null && (typeof value === "object" || typeof value === "function")) {
      continue;
    }
    Object.defineProperty(copy, key, {
      value,
      enumerable: descriptor.enumerable,
      writable: true,
      configurable: true,
    });
  }
  return copy;
}

/** A schema or identifier is not a valid PostgreSQL identifier, or a schema operation failed. */
export class SchemaError extends PgdbmError {
  /**
   * Makes the error.
   *
   * @param message What is wrong and what to do.
   */
  constructor(message: string, options?: PgdbmErrorOptions) {
    super("SCHEMA_ERROR", message, options);
  }
}

/**
 * Which failure a {@link MigrationError} is, so callers branch on `error.reason` instead of
 * parsing messages (every `MigrationError` keeps `code: "MIGRATION_ERROR"`).
 *
 * Reading the source:
 * - `missing_file`: the migrations folder, a file the manifest lists, or a file or manifest
 *   at a URL does not exist.
 * - `source_unreadable`: the source could not be read otherwise (permissions, network, a
 *   file that is not UTF-8, an in-memory value that is not text).
 * - `invalid_manifest`: a `migrations.json` is not valid, lists a file twice, or leaves a
 *   file of the folder out.
 * - `invalid_filename`: a file name has no version, or is not a plain `*.sql` name.
 * - `duplicate_version`: two files share a version.
 * - `empty_file`: a file has no statement (empty, or only comments).
 * - `transaction_control_refused`: a file runs `BEGIN`/`COMMIT`/… among its statements.
 * - `psql_command_refused`: a file has a psql meta-command or a `COPY … TO STDOUT`.
 *
 * Checking and locking:
 * - `drift`: an applied file changed since; nothing was applied.
 * - `lock_timeout`: another migrator held the (schema, module) lock longer than
 *   `lockWaitTimeoutMs`.
 * - `lost_lock_session`: statements ran on another server session than the one holding
 *   the session lock (a pooler in transaction mode).
 * - `shared_lock_session`: the server session already held the lock for another client
 *   (a pooler in transaction mode); nothing was applied.
 * - `no_transaction_refused`: a `-- pgdbm:no-transaction` file with `lock: "transaction"`.
 * - `already_applied`: `applyMigration()` of a file that is in the history.
 *
 * Applying:
 * - `statement_failed`: a statement of a migration failed (the server's error is `cause`).
 * - `retries_exhausted`: a statement kept timing out waiting for a table lock (or
 *   deadlocking) after `lockRetries` retries.
 * - `aborted`: the `signal` of `applyPending()` aborted the run (`cause` is its reason).
 *
 * Writing and the command line:
 * - `write_failed`: `createMigration()` could not write (a read-only source, an invalid
 *   name, or the file exists).
 * - `not_applied`: a migration to roll back is not applied (the command line's
 *   `migrate rollback`).
 */
export type MigrationErrorReason =
  | "missing_file"
  | "source_unreadable"
  | "invalid_manifest"
  | "invalid_filename"
  | "duplicate_version"
  | "empty_file"
  | "transaction_control_refused"
  | "psql_command_refused"
  | "drift"
  | "lock_timeout"
  | "lost_lock_session"
  | "shared_lock_session"
  | "no_transaction_refused"
  | "already_applied"
  | "statement_failed"
  | "retries_exhausted"
  | "aborted"
  | "write_failed"
  | "not_applied";

/** Where a {@link MigrationError} happened, and which failure it is. */
export interface MigrationErrorDetails {
  /** Which failure it is. */
  reason?: MigrationErrorReason;
  /** The migration file, when one is involved. */
  filename?: string;
  /** The migrator's module name. */
  module?: string;
  /** The schema migrated. */
  schema?: string;
  /** 1-based line in the file of the failing statement. */
  line?: number;
  /** What the run applied before it failed (`status: "failed"`, with `failure`). */
  partialResult?: MigrationResult;
}

/**
 * A migration could not be found, checked, or applied. `reason` says which failure it was.
 *
 * @example Branch on the reason (needs a server)
 * ```ts ignore
 * import { MigrationError } from "@pgdbm/pgdbm";
 * try {
 *   await migrator.applyPending();
 * } catch (error) {
 *   if (error instanceof MigrationError && error.reason === "drift") {
 *     console.error(`Restore ${error.filename}: it changed after it was applied`);
 *   }
 *   throw error;
 * }
 * ```
 */
export class MigrationError extends PgdbmError {
  /** Which failure it is (absent only on errors made without one). */
  readonly reason?: MigrationErrorReason;
  /** The migration file, when one is involved. */
  readonly filename?: string;
  /** The migrator's module name. */
  readonly module?: string;
  /** The schema migrated. */
  readonly schema?: string;
  /** 1-based line in the file of the failing statement. */
  readonly line?: number;
  /**
   * What an `applyPending()` run applied before it failed: `status: "failed"`, with
   * `failure` saying where it stopped. Absent for failures outside such a run.
   */
  readonly partialResult?: MigrationResult;

  /**
   * Makes the error.
   *
   * @param message What went wrong and what to do.
   * @param details Which failure it is, and where it happened.
   */
  constructor(message: string, details: MigrationErrorDetails = {}, options?: PgdbmErrorOptions) {
    super("MIGRATION_ERROR", message, options);
    this.reason = details.reason;
    this.filename = details.filename;
    this.module = details.module;
    this.schema = details.schema;
    this.line = details.line;
    this.partialResult = details.partialResult;
  }
}

/** One problem reported by a Standard Schema validator. */
export interface ValidationIssue {
  /** What is wrong. */
  readonly message: string;
  /** Where in the value, as keys and indexes. */
  readonly path?: ReadonlyArray<PropertyKey | { readonly key: PropertyKey }>;
}

/** A row did not pass the validator given to `fetchAsModel`. */
export class ValidationError extends PgdbmError {
  /** The validator's issues. */
  readonly issues: readonly ValidationIssue[];

  /**
   * Makes the error.
   *
   * @param message What failed.
   * @param issues The validator's issues.
   */
  constructor(message: string, issues: readonly ValidationIssue[], options?: PgdbmErrorOptions) {
    super("VALIDATION_ERROR", message, options);
    this.issues = issues;
  }
}

/** Options of a {@link TimeoutError}. */
export interface TimeoutErrorOptions extends PgdbmErrorOptions {
  /** The server's SQLSTATE (`57014`) when the server's own `statement_timeout` fired. */
  sqlstate?: string;
}

/**
 * A query ran longer than a time limit; it was cancelled on the server. `timeoutMs` is the
 * limit that fired: the call's `timeoutMs`, else `commandTimeoutMs`, else the server's
 * `statement_timeout` (then `sqlstate` is `57014` and `cause` is the server's error). An
 * aborted signal does not make a `TimeoutError`: the call rejects with `signal.reason`.
 */
export class TimeoutError extends PgdbmError {
  /** The limit that expired, in milliseconds (absent when the server's limit is unknown). */
  readonly timeoutMs?: number;
  /** `57014` when the server's `statement_timeout` stopped the statement. */
  readonly sqlstate?: string;

  /**
   * Makes the error.
   *
   * @param message What timed out.
   * @param timeoutMs The limit that expired.
   * @param options The `cause`, and the server's SQLSTATE when the server's limit fired.
   */
  constructor(message: string, timeoutMs?: number, options?: TimeoutErrorOptions) {
    super("TIMEOUT_ERROR", message, options);
    this.timeoutMs = timeoutMs;
    if (options?.sqlstate !== undefined) this.sqlstate = options.sqlstate;
  }
}

/**
 * Masks query parameters so their values never reach an error or a log: each becomes a
 * mask that tells only its type (`"<string>"`, `"<number>"`, `"<bytes:N>"`, `"null"`…).
 *
 * @param params The parameters as given.
 * @returns One mask per parameter.
 */
export function maskParams(params: readonly unknown[]): string[] {
  return params.map(typeMask);
}
