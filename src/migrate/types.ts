/**
 * The public types of the migrator: what it reads (migrations), what it reports
 * (results, status, events) and how it is configured. A leaf: it imports only types.
 *
 * @module
 */

/** One migration file as a source returns it. */
export interface MigrationFile {
  /** The file name, such as `001_create_users.sql`. */
  readonly filename: string;
  /** The file's text. */
  readonly content: string;
}

/**
 * A place migration files are read from. {@link Migrator} reads it afresh on every call,
 * so edits between calls are seen.
 */
export interface MigrationSource {
  /** Where the files are (a path, a URL, or `"<in-memory>"`), for messages. */
  readonly location: string;
  /**
   * Reads every migration file (`*.sql`, not hidden, directly in the source), in no
   * particular order.
   *
   * @throws {MigrationError} When the source cannot be read.
   */
  read(): Promise<MigrationFile[]>;
  /**
   * Writes a new migration file into the source and returns its path; only sources on a
   * local disk have it.
   *
   * @throws {MigrationError} When the name is unsafe or the file exists.
   */
  write?(filename: string, content: string): Promise<string>;
}

/** Options naming one source, as {@link Migrator} takes them. */
export interface MigrationSourceOptions {
  /** A directory path, or a `file:`/`https:` URL (string or `URL`) of a folder. */
  migrationsPath?: string | URL;
  /** File name → SQL, in memory. */
  migrations?: Record<string, string>;
  /** A source of your own. */
  source?: MigrationSource;
}

/** A migration file, ordered and checksummed, as {@link Migrator.findMigrationFiles} returns it. */
export interface Migration {
  /** The file name, such as `001_create_users.sql`; the key of its history row. */
  readonly filename: string;
  /** The version from the name as dotted decimal (`"1"`, `"1.2"`, `"20251025120000"`). */
  readonly version: string;
  /** SHA-256 hex of the content (CRLF → LF, outer whitespace stripped): pgdbm's rule. */
  readonly checksum: string;
  /** The file's text. */
  readonly content: string;
  /** True when the file has a `-- pgdbm:no-transaction` line. */
  readonly noTransaction: boolean;
}

/** A row of the history table. */
export interface AppliedMigration {
  /** The migration's file name. */
  readonly filename: string;
  /** The checksum the file had when it was applied. */
  readonly checksum: string;
  /** The module that applied it (`null` for rows of old pgdbm versions, which count for every module). */
  readonly moduleName: string | null;
  /** When it was applied (the column is `timestamp` without time zone, as in pgdbm). */
  readonly appliedAt: Date;
  /** The database user that applied it. */
  readonly appliedBy: string | null;
  /** How long it ran. */
  readonly executionTimeMs: number | null;
}

/** One migration applied by a run. */
export interface AppliedMigrationResult {
  /** The file name. */
  filename: string;
  /** How long the successful attempt ran, in milliseconds (at least 1). */
  executionTimeMs: number;
  /** Attempts it took (more than 1 when it was retried after a lock timeout). */
  attempts: number;
}

/** Where a failed run stopped. */
export interface MigrationFailure {
  /**
   * The file that failed. For an aborted run, the file it stopped in, or the next pending
   * file when it stopped between files or while waiting for the lock.
   */
  filename: string;
  /** 1-based line of the failing statement in the file, when known. */
  line?: number;
  /**
   * The server's message (or the reason). For an aborted run, what was done about the work
   * in progress, such as "cancelled '002_x.sql' and rolled it back, and released the
   * migration lock; nothing from that file was applied".
   */
  message: string;
  /** The SQLSTATE, when the server reported one. */
  sqlstate?: string;
  /**
   * `true` when the run stopped because the `signal` passed to
   * {@link Migrator.applyPending} aborted (see {@link ApplyPendingOptions.signal}).
   */
  aborted?: boolean;
}

/**
 * What {@link Migrator.applyPending} returns: pgdbm's result, plus the module, schema
 * and the migrations whose files are gone. A `MigrationError`'s `partialResult` is one of
 * these with `status: "failed"`.
 */
export interface MigrationResult {
  /** `success`: something was applied; `up_to_date`: nothing was pending; `dry_run`: nothing was run; `failed`: only in a `MigrationError`'s `partialResult`. */
  status: "success" | "up_to_date" | "dry_run" | "failed";
  /** The module. */
  module: string;
  /** The schema, or `null` for a manager without one. */
  schema: string | null;
  /** What this run applied, in order. */
  applied: AppliedMigrationResult[];
  /**
   * File names already applied before this run (with `lock: "transaction"`, also those
   * another process applied while this run waited for the lock).
   */
  skipped: string[];
  /** File names that would be applied (dry run only). */
  pending?: string[];
  /** Applied migrations of this module whose file is no longer in the source. */
  missing: string[];
  /** Applied before this run plus applied (or, in a dry run, pending) by it. */
  total: number;
  /** Wall-clock time of the run in milliseconds, lock wait included. */
  totalTimeMs: number;
  /** Where the run stopped (only when `status` is `failed`). */
  failure?: MigrationFailure;
}

/** An applied migration whose file changed since. */
export interface DriftedMigration {
  /** The file name. */
  filename: string;
  /** The checksum recorded when it was applied. */
  appliedChecksum: string;
  /** The file's checksum now. */
  currentChecksum: string;
}

/** Where a module stands in a schema, from {@link Migrator.getStatus}; nothing throws on drift. */
export interface MigrationStatus {
  /** The module. */
  module: string;
  /** The schema, or `null`. */
  schema: string | null;
  /** False while the history table does not exist yet. */
  initialized: boolean;
  /** The history rows that count for this module, oldest first. */
  applied: AppliedMigration[];
  /** Files not applied yet, in the order they would apply. */
  pending: Migration[];
  /** Applied files whose content changed. */
  drifted: DriftedMigration[];
  /** Applied migrations of this module whose file is gone. */
  missing: AppliedMigration[];
  /** True when nothing is pending and nothing drifted. */
  upToDate: boolean;
  /**
   * Set only when Python pgdbm would apply this folder's files in another order: its order
   * (plain name order, where this library orders by version number, so `0001_a.sql` comes
   * before `00010_b.sql` here and after it there). A Python service sharing the folder would
   * then apply pending files differently: rename them with equal-width versions.
   */
  pgdbmOrder?: string[];
}

/** Progress reported through {@link MigratorOptions.onEvent}. */
export type MigrationEvent =
  | {
    /**
     * Another process holds the (schema, module) lock; this one polls. Sent once per wait:
     * once per run with `lock: "session"`, at most once per migration with `"transaction"`.
     */
    type: "lock_wait";
    /** The schema, or `null`. */
    schema: string | null;
    /** The module. */
    module: string;
    /**
     * The server process id of the session holding the lock, when it could be read (look
     * it up in `pg_stat_activity`).
     */
    holderPid?: number;
  }
  | {
    /** The lock is taken (once per run, or once per migration with `lock: "transaction"`). */
    type: "lock_acquired";
    /** The schema, or `null`. */
    schema: string | null;
    /** The module. */
    module: string;
    /** How long it was waited for. */
    waitedMs: number;
  }
  | {
    /** A migration starts (again, after a retry). */
    type: "apply_start";
    /** The file. */
    filename: string;
    /** 1 for the first attempt. */
    attempt: number;
  }
  | {
    /** A migration was applied and recorded. */
    type: "applied";
    /** The file. */
    filename: string;
    /** How long it ran. */
    executionTimeMs: number;
  }
  | {
    /** A migration timed out waiting for a lock (or deadlocked) and will be retried. */
    type: "retry";
    /** The file. */
    filename: string;
    /** The attempt that failed. */
    attempt: number;
    /** The wait before the next attempt. */
    delayMs: number;
    /** The server's message. */
    message: string;
  }
  | {
    /** Applied migrations whose file is gone. */
    type: "missing";
    /** Their file names. */
    filenames: string[];
  };

/**
 * How a {@link Migrator} keeps other migrators of the same (schema, module) out:
 * `session` holds a session advisory lock for the whole run (needs a connection that is
 * one server session: a direct URL or a session-mode pool); `transaction` takes a
 * transaction advisory lock in each migration's transaction (safe through PgBouncer in
 * transaction mode; refuses `-- pgdbm:no-transaction` files).
 */
export type MigrationLockMode = "session" | "transaction";

/** Options of {@link Migrator}: one source, plus the module and safety settings. */
export interface MigratorOptions extends MigrationSourceOptions {
  /** The module these migrations belong to; required, at most 100 characters. */
  moduleName: string;
  /**
   * The history table, in the manager's schema; an identifier.
   * @default {"schema_migrations"}
   */
  migrationsTable?: string;
  /**
   * `lock_timeout` of every migration statement: how long a statement may queue for a
   * lock (and hold other queries queued behind it) before it gives up and is retried.
   * `0` waits forever. Statements with `CONCURRENTLY` in no-transaction files run
   * without it: their waits do not block reads or writes, and a timeout would leave an
   * invalid index.
   * @default {5000}
   */
  lockTimeoutMs?: number;
  /**
   * How many times a migration that timed out waiting for a lock (or deadlocked) is
   * retried before the run fails.
   * @default {5}
   */
  lockRetries?: number;
  /**
   * Delay before the first retry; it doubles for each later one (up to 30 s), with jitter.
   * @default {1000}
   */
  lockRetryDelayMs?: number;
  /**
   * `statement_timeout` of migration statements (and the client-side timeout); `null`
   * lets them run as long as they need, whatever the pool's `statementTimeoutMs` and
   * `commandTimeoutMs` are.
   * @default {null}
   */
  statementTimeoutMs?: number | null;
  /**
   * How long to wait for another process's run of the same (schema, module) to finish
   * before failing.
   * @default {600000}
   */
  lockWaitTimeoutMs?: number;
  /**
   * The longest pause between two attempts to take the advisory lock.
   * @default {1000}
   */
  lockPollMaxMs?: number;
  /**
   * `"session"`: one session advisory lock for the whole run, on a dedicated connection.
   * `"transaction"`: no session lock; each migration's transaction takes
   * `pg_try_advisory_xact_lock`, re-reads the file's history row and skips the file when
   * another process applied it meanwhile. Use it behind a pooler in transaction mode
   * (PgBouncer `pool_mode = transaction`); it refuses `-- pgdbm:no-transaction` files.
   * @default {"session"}
   */
  lock?: MigrationLockMode;
  /** Receives progress events (for logs and progress bars). Exceptions it throws are ignored. */
  onEvent?: (event: MigrationEvent) => void;
}

/** Options of {@link Migrator.applyPending}. */
export interface ApplyPendingOptions {
  /**
   * Report what would be applied without running it (nothing is created).
   * @default {false}
   */
  dryRun?: boolean;
  /**
   * Stops the run when it aborts (wire it to `SIGINT`/`SIGTERM` to stop a deploy cleanly).
   * The statement running on the server is cancelled, the migration in progress is rolled
   * back (a `-- pgdbm:no-transaction` file stops at its current statement: the statements
   * before it stay applied, and it gets no history row), a wait for the lock or for a
   * retry ends, and the advisory lock is released before `applyPending` rejects. Migrations
   * that committed before the abort stay applied. The rejection is a `MigrationError`
   * whose `cause` is `signal.reason` and whose `partialResult` (status `failed`) has
   * `failure.aborted: true` and, in `failure.message`, what was done. A signal that aborts
   * after the last migration committed changes nothing: the run's result is returned.
   */
  signal?: AbortSignal;
}

/** Options of {@link Migrator.createMigration}. */
export interface CreateMigrationOptions {
  /**
   * The moment that names the file (`YYYYMMDDHHMMSS`, UTC).
   * @default {new Date()}
   */
  now?: Date;
}
