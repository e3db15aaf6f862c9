/**
 * How a migration run fails: every `MigrationError` the migrator builds, each with the
 * {@link MigrationErrorReason} that says which failure it is, and the internal errors that
 * carry what a report needs from where a run stopped to where it is reported.
 *
 * @module
 */

import {
  MigrationError,
  type MigrationErrorReason,
  type PgdbmErrorOptions,
  QueryError,
} from "../errors.ts";
import { lineOfPosition, type SqlStatement } from "../_sql.ts";
import type { AppliedMigration, DriftedMigration, Migration, MigrationResult } from "./types.ts";

/** SQLSTATEs of a statement worth retrying: a `lock_timeout` (55P03) or a deadlock (40P01). */
export const RETRYABLE: ReadonlySet<string> = new Set(["55P03", "40P01"]);

/** What every fix for a pooler in transaction mode says. */
const POOLER_FIX = `set the Migrator option lock: "transaction" ("lock": "transaction" in ` +
  "pgdbm.json), whose lock lives in each migration's transaction, or run migrations on a URL " +
  "that goes directly to PostgreSQL (or through a session-mode pool)";

/** A migration with its statements, as the file is split for running. */
export interface PreparedMigration {
  /** The migration. */
  migration: Migration;
  /** Its statements, in order. */
  statements: SqlStatement[];
}

/** One `applyPending()` run: its abort signal, and what an abort report needs. */
export interface RunState {
  /** Stops the run. */
  readonly signal?: AbortSignal;
  /** When it started (`performance.now()`). */
  readonly started: number;
  /** The session lock: not taken, held, released, or not confirmed released. */
  lock: "none" | "held" | "released" | "unknown";
  /** The source's migrations, once read. */
  files?: Migration[];
  /** The history last read (`undefined` while the table is missing). */
  before?: AppliedMigration[];
}

/** The run's signal aborted at `stage` (for a lock, `waited`: after another run held it). */
export class RunAborted extends Error {
  /**
   * @param stage Where the run was when the signal aborted.
   * @param cause The signal's reason.
   * @param waited For `lock`: whether another run held the lock meanwhile.
   */
  constructor(
    readonly stage: "start" | "lock" | "retry" | "statement",
    override readonly cause: unknown,
    readonly waited = false,
  ) {
    super(`The migration run was aborted (${stage})`);
  }
}

/**
 * An aborted run stopped at `filename`: `what` was done about it, then (after the lock
 * clause, when `lockHeld`) `tail`.
 */
export class RunStopped extends Error {
  /**
   * @param partial What the run applied before.
   * @param filename The file it stopped in (or before).
   * @param what What was done about that file.
   * @param lockHeld Whether the migration lock was held when it stopped.
   * @param tail What follows the lock clause.
   * @param line The line of the statement it stopped at.
   */
  constructor(
    readonly partial: MigrationResult,
    readonly filename: string,
    readonly what: string,
    readonly lockHeld: boolean,
    readonly tail: string,
    readonly line?: number,
  ) {
    super(what);
  }
}

/** A statement of a migration failed; carries which one, and INVALID indexes it left. */
export class StatementFailure extends Error {
  /**
   * @param cause The statement's error.
   * @param statement The statement.
   * @param invalidIndexes INVALID indexes the statement left (no-transaction files).
   */
  constructor(
    override readonly cause: unknown,
    readonly statement: SqlStatement,
    readonly invalidIndexes: string[],
  ) {
    super(cause instanceof Error ? cause.message : String(cause));
  }
}

/** Builds the `MigrationError`s of one migrator: its module and schema in every one. */
export class Failures {
  readonly #module: string;
  readonly #schema?: string;
  readonly #lockRetries: number;

  /**
   * @param module The migrator's module.
   * @param schema The manager's schema.
   * @param lockRetries The migrator's `lockRetries`, which a retried failure reports.
   */
  constructor(module: string, schema: string | undefined, lockRetries: number) {
    this.#module = module;
    this.#schema = schema;
    this.#lockRetries = lockRetries;
  }

  /** ` in schema 'x'`, or nothing for a manager without a schema. */
  where(): string {
    return this.#schema === undefined ? "" : ` in schema '${this.#schema}'`;
  }

  /** An error of this migrator's module and schema. */
  error(
    reason: MigrationErrorReason,
    message: string,
    at: { filename?: string; line?: number; partialResult?: MigrationResult } = {},
    options?: PgdbmErrorOptions,
  ): MigrationError {
    return new MigrationError(
      message,
      {
        reason,
        filename: at.filename,
        module: this.#module,
        schema: this.#schema,
        line: at.line,
        partialResult: at.partialResult,
      },
      options,
    );
  }

  /** An applied file changed: nothing is applied. */
  drift(drifted: DriftedMigration[]): MigrationError {
    const first = drifted[0];
    const others = drifted.length > 1
      ? ` (and ${drifted.length - 1} more: ${
        drifted.slice(1).map((d) => `'${d.filename}'`).join(", ")
      })`
      : "";
    return this.error(
      "drift",
      `Cannot apply migrations of module '${this.#module}'${this.where()}: ` +
        `'${first.filename}' changed after it was applied${others}; applied checksum ` +
        `${first.appliedChecksum}, file checksum ${first.currentChecksum}. Nothing was ` +
        `applied. Restore the file as it was and put the change in a new migration`,
      { filename: first.filename },
    );
  }

  /** Another migrator held the lock longer than `lockWaitTimeoutMs`. */
  lockTimeout(waitedMs: number, holder: number | null): MigrationError {
    return this.error(
      "lock_timeout",
      `Cannot migrate module '${this.#module}'${this.where()}: another migrator` +
        (holder === null ? "" : ` (server process ${holder})`) +
        ` has held its lock for ${Math.round(waitedMs)} ms, longer than 'lockWaitTimeoutMs'; ` +
        `wait for it to finish or raise 'lockWaitTimeoutMs'. When no migrator runs, a ` +
        `pooler in transaction mode (PgBouncer) may have left a session lock behind on ` +
        `that server connection: to migrate through such a pooler, ${POOLER_FIX}`,
    );
  }

  /**
   * Statements ran on another server session than the one holding the lock: a pooler in
   * transaction mode (PgBouncer) sits between pgdbm and PostgreSQL.
   */
  sessionLost(partialResult?: MigrationResult): MigrationError {
    return this.error(
      "lost_lock_session",
      `Cannot keep the migration lock of module '${this.#module}'${this.where()}: the ` +
        "statements ran on another server session than the one holding it, which happens " +
        "behind a pooler in transaction mode (PgBouncer). The lock may stay held until that " +
        `server connection closes. To migrate through such a pooler, ${POOLER_FIX}`,
      { partialResult },
    );
  }

  /** A server session already holds the lock for another client. */
  sharedSession(): MigrationError {
    return this.error(
      "shared_lock_session",
      `Cannot take the migration lock of module '${this.#module}'${this.where()}: the ` +
        "server session that answered already holds it for another client, which happens " +
        "behind a pooler in transaction mode (PgBouncer). Nothing was applied. To migrate " +
        `through such a pooler, ${POOLER_FIX}`,
    );
  }

  /** `applyMigration()` of a migration in the history. */
  alreadyApplied(migration: Migration): MigrationError {
    return this.error(
      "already_applied",
      `Cannot apply migration '${migration.filename}' of module '${this.#module}'` +
        `${this.where()}: it is already applied; use rollbackMigration() first to run it again`,
      { filename: migration.filename },
    );
  }

  /** With `lock: "transaction"`, a no-transaction file cannot be kept apart. */
  noTransactionRefused(file: Migration): MigrationError {
    return this.error(
      "no_transaction_refused",
      `Cannot apply migration '${file.filename}' of module '${this.#module}'${this.where()} ` +
        `with lock: "transaction": the file has a '-- pgdbm:no-transaction' line, so its ` +
        "statements run outside a transaction, where only a session lock keeps other " +
        'migrators out. Nothing was applied. Apply this module with lock: "session" (the ' +
        "default) on a URL that goes directly to PostgreSQL (or through a session-mode pool)",
      { filename: file.filename },
    );
  }

  /** A `COPY … FROM STDIN` on a connection that cannot stream its data. */
  copyUnavailable(statement: SqlStatement): MigrationError {
    return this.error(
      "statement_failed",
      "Cannot run a COPY … FROM STDIN of a migration on this connection: run it with " +
        "applyPending() or applyMigration()",
      { line: statement.line },
    );
  }

  /** Adds the module and schema to a MigrationError thrown by a helper. */
  decorate(error: unknown): unknown {
    if (!(error instanceof MigrationError) || error.module !== undefined) return error;
    return new MigrationError(error.message, {
      reason: error.reason,
      filename: error.filename,
      module: this.#module,
      schema: this.#schema,
      line: error.line,
    }, { cause: error.cause });
  }

  /**
   * The error of a migration that failed (not aborted): the statement, its line (in the
   * file, or in a COPY data block), what stayed applied; `partial.failure` is filled in.
   */
  failed(error: unknown, migration: Migration, partial: MigrationResult | undefined): unknown {
    if (error instanceof MigrationError) {
      if (partial === undefined || error.partialResult !== undefined) return this.decorate(error);
      partial.failure = { filename: migration.filename, line: error.line, message: error.message };
      return new MigrationError(error.message, {
        reason: error.reason,
        filename: error.filename ?? migration.filename,
        module: this.#module,
        schema: this.#schema,
        line: error.line,
        partialResult: partial,
      }, { cause: error.cause });
    }
    const failure = error instanceof StatementFailure ? error : undefined;
    const cause = failure?.cause ?? error;
    const serverMessage = cause instanceof Error ? cause.message : String(cause);
    const sqlstate = cause instanceof QueryError ? cause.sqlstate : undefined;
    let line: number | undefined;
    if (failure !== undefined) {
      line = failure.statement.line;
      if (cause instanceof QueryError && cause.position !== undefined) {
        line += lineOfPosition(cause.sql ?? failure.statement.text, cause.position) - 1;
      }
      const dataLine = copyDataLine(cause);
      if (dataLine !== undefined && failure.statement.copyDataLine !== undefined) {
        line = failure.statement.copyDataLine + dataLine - 1;
      }
    }
    if (partial !== undefined) {
      partial.failure = { filename: migration.filename, line, message: serverMessage, sqlstate };
    }
    const where = line === undefined ? "" : ` at line ${line}`;
    const state = sqlstate === undefined ? "" : ` (SQLSTATE ${sqlstate})`;
    const invalid = failure !== undefined && failure.invalidIndexes.length > 0
      ? `. It left the INVALID index ${failure.invalidIndexes.join(", ")}: drop it with ` +
        `DROP INDEX CONCURRENTLY before running the migration again`
      : "";
    const undone = migration.noTransaction
      ? ". The file runs outside a transaction: its statements before this one stay applied"
      : ". Nothing of this file was applied";
    const exhausted = cause instanceof QueryError && RETRYABLE.has(sqlstate ?? "");
    const retried = exhausted
      ? ` after ${this.#lockRetries + 1} attempts (raise 'lockTimeoutMs' or 'lockRetries', ` +
        `or run it when the tables are less busy)`
      : "";
    return this.error(
      exhausted ? "retries_exhausted" : "statement_failed",
      `Cannot apply migration '${migration.filename}' of module '${this.#module}'` +
        `${this.where()}: the statement${where} failed${retried}: ${serverMessage}${state}` +
        `${invalid}${undone}`,
      { filename: migration.filename, line, partialResult: partial },
      { cause },
    );
  }

  /** What an abort did to the migration in progress, for {@link Failures.aborted}. */
  stopped(error: unknown, prepared: PreparedMigration, partial: MigrationResult): RunStopped {
    const { filename, noTransaction } = prepared.migration;
    const aborted = error instanceof StatementFailure ? error.cause : error;
    if (aborted instanceof RunAborted && aborted.stage === "lock") {
      // lock: "transaction": each migration's transaction waits for the lock.
      return new RunStopped(
        partial,
        filename,
        `stopped waiting for the migration lock (another run holds it) before '${filename}'`,
        false,
        "; nothing from that file was applied",
      );
    }
    if (aborted instanceof RunAborted && aborted.stage === "retry") {
      return new RunStopped(
        partial,
        filename,
        `stopped '${filename}' while it waited to be retried after a lock timeout (that ` +
          `attempt was rolled back)`,
        true,
        "; nothing from that file was applied",
      );
    }
    const failure = error instanceof StatementFailure ? error : undefined;
    const line = failure?.statement.line;
    if (!noTransaction) {
      const running = line === undefined || aborted instanceof RunAborted
        ? ""
        : ` (its statement at line ${line})`;
      return new RunStopped(
        partial,
        filename,
        `cancelled '${filename}'${running} and rolled it back`,
        true,
        "; nothing from that file was applied",
        running === "" ? undefined : line,
      );
    }
    const at = line === undefined
      ? ""
      : aborted instanceof RunAborted
      ? ` before its statement at line ${line}`
      : ` at its statement at line ${line}, which was cancelled`;
    const invalid = failure !== undefined && failure.invalidIndexes.length > 0
      ? `. It left the INVALID index ${failure.invalidIndexes.join(", ")}: drop it with ` +
        `DROP INDEX CONCURRENTLY before running the migration again`
      : "";
    return new RunStopped(
      partial,
      filename,
      `stopped '${filename}'${at}`,
      true,
      `; the file runs outside a transaction (-- pgdbm:no-transaction), so its statements ` +
        `before that one stay applied, and it has no history row: the next run starts it ` +
        `again from the top${invalid}`,
      line,
    );
  }

  /**
   * What a run that stopped before it held the lock did (`error` is how it stopped): for
   * {@link Failures.aborted}.
   */
  stoppedBeforeLock(error: unknown): string {
    return error instanceof RunAborted && error.stage === "lock" && error.waited
      ? "stopped waiting for the migration lock, which another run holds; nothing was applied"
      : "stopped before taking the migration lock; nothing was applied";
  }

  /**
   * The error of a run whose signal aborted: `what` was done about the work in progress and
   * the lock, and `partial` what the run applied before (its `failure` is filled in).
   */
  aborted(
    signal: AbortSignal,
    partial: MigrationResult,
    stop: { filename: string; line?: number; what: string },
  ): MigrationError {
    const { filename, line, what } = stop;
    partial.failure = { filename, line, message: what, aborted: true };
    const reason = signal.reason instanceof Error ? ` (${signal.reason.message})` : "";
    const before = partial.applied.length === 0
      ? ""
      : `. Applied by this run before: ${partial.applied.map((a) => a.filename).join(", ")}`;
    return this.error(
      "aborted",
      `Cannot finish migrating module '${this.#module}'${this.where()}: the run was ` +
        `aborted${reason}; ${what}${before}. Apply again to run what is left`,
      { filename: filename || undefined, line, partialResult: partial },
      { cause: signal.reason },
    );
  }
}

/**
 * The line of the COPY data a server error is about (its context says `COPY t, line 3…`),
 * counted from 1 at the data block's first line.
 */
function copyDataLine(error: unknown): number | undefined {
  if (!(error instanceof QueryError)) return undefined;
  const where = (error.cause as { where?: unknown } | undefined)?.where;
  const match = typeof where === "string" ? /\bCOPY [^\n]*?, line (\d+)/.exec(where) : null;
  return match === null ? undefined : Number(match[1]);
}
