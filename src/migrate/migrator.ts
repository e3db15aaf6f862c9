/**
 * `Migrator`: applies a module's SQL migration files to a manager's schema, each exactly
 * once, each entirely or not at all, safely from many processes at once, and without
 * stalling production traffic behind a queued lock. Its history table is pgdbm's, so a
 * Python pgdbm service and this one share one history.
 *
 * ## How a run works
 *
 * 1. The source is read and ordered by version (`001_`, `V1__`, timestamps); a repeated
 *    version, a name without a version or a file with no statement (empty, or only
 *    comments, as a fresh `migrate create` stub) is refused. Files are split as `psql -f`
 *    reads them (see `../_sql.ts`): a `COPY … FROM stdin` takes its data block, pg_dump's
 *    `\restrict` lines and psql's output-only commands are skipped, and any other psql
 *    meta-command (or a `COPY … TO STDOUT`) is refused with its line.
 * 2. The history is read without any lock. When nothing is pending, the run ends here
 *    (`up_to_date`): checking a fleet of up-to-date tenants costs one query each.
 * 3. Otherwise one connection of the pool is leased for the rest of the run. It takes the
 *    advisory lock of (schema, module) by polling `pg_try_advisory_lock` with jitter —
 *    never a blocking `pg_advisory_lock`, whose open wait a `CREATE INDEX CONCURRENTLY`
 *    of the lock holder would wait on in turn. The history is read again under the lock.
 * 4. Each pending migration runs on that connection in one transaction together with its
 *    history row, under `SET LOCAL lock_timeout`; a statement that times out waiting for a
 *    lock (SQLSTATE `55P03`, or a deadlock, `40P01`) rolls the migration back, and it is
 *    retried after a growing, jittered delay. Other queries on that table therefore wait
 *    at most `lockTimeoutMs` behind the migration's queued lock.
 * 5. A file with a `-- pgdbm:no-transaction` line runs statement by statement in
 *    autocommit (for `CREATE INDEX CONCURRENTLY`); its history row is written after its
 *    last statement. Such files cannot be atomic: write them so that running them again
 *    is harmless (`IF NOT EXISTS`). A failure that left an INVALID index names it.
 * 6. A migration runs with `search_path` set to the manager's schema, then `public`
 *    (`SET LOCAL` in its transaction; set, then reset, on the dedicated connection of a
 *    no-transaction file), as Python pgdbm runs it, so unqualified names in a file land in
 *    the manager's schema and a file moves between the two libraries unchanged. Settings a
 *    file changes with `SET` end with that file. The migrator's own SQL never depends on
 *    `search_path`: its history table is always schema-qualified (`public` for a manager
 *    without a schema). Queries of the application still never use `search_path`.
 *
 * ## Stopping a run: `applyPending({ signal })`
 *
 * When the signal aborts, the statement running on the server is cancelled (PostgreSQL's
 * cancel request), the migration in progress rolls back together with its history row, a
 * wait for the lock or for a retry ends, and the lock is released; only then does the run
 * reject, with a `MigrationError` whose `cause` is the signal's reason and whose
 * `partialResult.failure` has `aborted: true` and says what was done. Migrations committed
 * before the abort stay applied. A `-- pgdbm:no-transaction` file stops at its current
 * statement: the statements before it stay applied and it gets no history row, so the next
 * run starts it from the top again. The command line wires `SIGINT` and `SIGTERM` to it.
 *
 * ## Behind a pooler in transaction mode: `lock: "transaction"`
 *
 * The run-wide lock above is a session lock: through PgBouncer in transaction mode the
 * statements of one client connection run on whichever server connection is free, so the
 * lock can be taken on one server session and released (or checked) on another. pgdbm
 * notices — each migration's transaction takes the lock again, which only the holding
 * session can, the release is checked, and a session that already holds the lock for
 * another client is refused — and fails with a `MigrationError` that names the fix.
 *
 * With `lock: "transaction"` there is no session lock. Each pending migration runs in one
 * transaction that first takes `pg_try_advisory_xact_lock` on the same key (polled with
 * the same backoff, one short transaction per try), then reads that file's history row and
 * skips the file when another process applied it meanwhile, then applies it with its
 * history row and commits, which releases the lock. A transaction runs on one server
 * connection, so a pooler cannot split it. Files with `-- pgdbm:no-transaction` are refused
 * in this mode (outside a transaction only a session lock keeps other migrators out).
 * Session and transaction locks on one key exclude each other, so migrators of both modes
 * may run against one schema.
 *
 * ## The advisory lock key
 *
 * ```sql
 * SELECT pg_try_advisory_lock(hashtext('pgdbm_migration_' || module), hashtext(schema));
 * ```
 *
 * with `schema` the manager's schema, or `'public'` for a manager without one. Any tool
 * (a Python pgdbm job, a psql script) that takes the same lock is serialized with this
 * migrator. Python pgdbm itself locks `hashtext('pgdbm_migration_' || module)` as one
 * 64-bit key, which is a different lock.
 *
 * @module
 */

import { ConfigurationError, type MigrationError } from "../errors.ts";
import type { DatabaseManager } from "../manager.ts";
import type { ConnectionPool } from "../pool/pool.ts";
import { assertIdentifier } from "../template.ts";
import {
  activeTracer,
  endSpan,
  type Span,
  startMigrationSpan,
  withActiveSpan,
} from "../_telemetry.ts";
import { Applier } from "./_apply.ts";
import { Failures, RunAborted, type RunState, RunStopped } from "./_failure.ts";
import { type ParsedMigrationFile, parseMigrationFiles, pgdbmOrder } from "./_files.ts";
import { DEFAULT_HISTORY_TABLE, History, type Plan } from "./_history.ts";
import type { LockScope, MigrationLock } from "./_lock.ts";
import { SessionLock } from "./_session_lock.ts";
import { TransactionLock } from "./_transaction_lock.ts";
import { createMigrationFile, resolveMigrationSource } from "./source.ts";
import type {
  AppliedMigration,
  AppliedMigrationResult,
  ApplyPendingOptions,
  CreateMigrationOptions,
  Migration,
  MigrationEvent,
  MigrationFile,
  MigrationLockMode,
  MigrationResult,
  MigrationSource,
  MigrationStatus,
  MigratorOptions,
} from "./types.ts";
export type * from "./types.ts";

const LOCK_MODES: readonly MigrationLockMode[] = ["session", "transaction"];

const parsedCache = new WeakMap<readonly MigrationFile[], Promise<Migration[]>>();

/** Migrators whose next run skips the unlocked read (see {@link withoutHistory}). */
const fresh = new WeakSet<Migrator>();

/**
 * For a fleet, which looked for the history tables of many schemas at once and found none
 * in `migrator`'s schema: its next `applyPending()` that is not a dry run goes to the lock
 * without looking again (a round trip), as it does when its own unlocked read finds no
 * table. The history is read under the lock as always.
 *
 * @param migrator A migrator that has not run yet.
 */
export function withoutHistory(migrator: Migrator): void {
  fresh.add(migrator);
}

/**
 * Applies a module's SQL migrations to the schema of a {@link DatabaseManager}.
 *
 * @example Apply on startup (needs a server)
 * ```ts ignore
 * import { createSharedPool, DatabaseManager, Migrator } from "@pgdbm/pgdbm";
 * const pool = await createSharedPool({ connectionString: Deno.env.get("DATABASE_URL") });
 * const db = new DatabaseManager({ pool, schema: "users" });
 * const migrator = new Migrator(db, { migrationsPath: "./migrations", moduleName: "users" });
 * const result = await migrator.applyPending();
 * console.log(result.status, result.applied.map((m) => m.filename));
 * await pool.close();
 * ```
 *
 * @example Migrations shipped inside a JSR package (needs a server)
 * ```ts ignore
 * const migrator = new Migrator(db, {
 *   migrationsPath: new URL("../migrations/", import.meta.url),
 *   moduleName: "my_library",
 * });
 * ```
 */
export class Migrator {
  readonly #db: DatabaseManager;
  /** The OpenTelemetry span of the `applyPending()` run in progress, when tracing. */
  #span?: Span;
  readonly #source: MigrationSource;
  readonly #module: string;
  readonly #table: string;
  readonly #onEvent?: (event: MigrationEvent) => void;
  readonly #history: History;
  readonly #failures: Failures;
  readonly #applier: Applier;
  readonly #lock: MigrationLock;

  /**
   * Creates a migrator; nothing is read or run until a method is called.
   *
   * @param db The manager whose schema is migrated; its pool runs the migrations.
   * @param options The source (`migrationsPath`, `migrations` or `source`), `moduleName`,
   *   and the safety settings.
   * @throws {ConfigurationError} When `moduleName` is missing, no source or several are
   *   given, `migrationsTable` is not an identifier, `lock` is neither `"session"` nor
   *   `"transaction"`, or a number is out of range.
   */
  constructor(db: DatabaseManager, options: MigratorOptions) {
    if (typeof db?.onPrimary !== "function") {
      throw new TypeError(
        "Cannot create a Migrator: the first argument must be a DatabaseManager " +
          "(new Migrator(db, { migrationsPath, moduleName }))",
      );
    }
    if (options === null || typeof options !== "object") {
      throw new ConfigurationError(
        "moduleName",
        "Cannot create a Migrator: pass options such as " +
          "{ migrationsPath: './migrations', moduleName: 'users' }",
      );
    }
    const module = options.moduleName;
    if (typeof module !== "string" || module.trim() === "" || module.length > 100) {
      throw new ConfigurationError(
        "moduleName",
        `Cannot create a Migrator: 'moduleName' must be a non-empty string of at most 100 ` +
          `characters that names the module owning these migrations (such as 'users'); got ` +
          (typeof module === "string" ? `'${module}'` : String(module)),
      );
    }
    const table = options.migrationsTable ?? DEFAULT_HISTORY_TABLE;
    try {
      assertIdentifier(table, "table");
    } catch (cause) {
      throw new ConfigurationError(
        "migrationsTable",
        `Cannot use '${String(table)}' as 'migrationsTable': use 1 to 63 ASCII letters, ` +
          `digits or underscores, starting with a letter or underscore`,
        { cause },
      );
    }
    // History reads must see the primary: a replica may not have the latest rows yet.
    this.#db = db.onPrimary();
    this.#source = resolveMigrationSource(options);
    this.#module = module;
    this.#table = table;
    const lockTimeoutMs = checkCount(options.lockTimeoutMs, "lockTimeoutMs", 5000);
    const lockRetries = checkCount(options.lockRetries, "lockRetries", 5);
    const lockRetryDelayMs = checkCount(options.lockRetryDelayMs, "lockRetryDelayMs", 1000);
    const statementTimeoutMs = options.statementTimeoutMs === null ||
        options.statementTimeoutMs === undefined
      ? null
      : checkCount(options.statementTimeoutMs, "statementTimeoutMs", 0);
    const waitTimeoutMs = checkCount(options.lockWaitTimeoutMs, "lockWaitTimeoutMs", 600_000);
    const pollMaxMs = Math.max(1, checkCount(options.lockPollMaxMs, "lockPollMaxMs", 1000));
    const lock = options.lock ?? "session";
    if (!LOCK_MODES.includes(lock)) {
      throw new ConfigurationError(
        "lock",
        `Cannot create a Migrator: 'lock' must be "session" (the default) or "transaction" ` +
          `(behind PgBouncer in transaction mode); got ${JSON.stringify(lock)}`,
      );
    }
    this.#onEvent = options.onEvent;
    const schema = this.#db.schema;
    const emit = (event: MigrationEvent): void => this.#emit(event);
    this.#history = new History(schema, module, table);
    this.#failures = new Failures(module, schema, lockRetries);
    this.#applier = new Applier(
      this.#db,
      this.#history,
      { lockTimeoutMs, lockRetries, lockRetryDelayMs, statementTimeoutMs },
      this.#failures,
      emit,
    );
    const context = { schema, module, waitTimeoutMs, pollMaxMs, failures: this.#failures, emit };
    this.#lock = lock === "transaction"
      ? new TransactionLock(this.#db, context, this.#history, this.#applier)
      : new SessionLock(context, this.#history, this.#applier);
  }

  /** The module these migrations belong to. */
  get moduleName(): string {
    return this.#module;
  }

  /** The schema migrated, or `undefined` for a manager without one. */
  get schema(): string | undefined {
    return this.#db.schema;
  }

  /** How this migrator keeps other migrators of its (schema, module) out. */
  get lock(): MigrationLockMode {
    return this.#lock.mode;
  }

  /** The history table's name (unqualified). */
  get migrationsTable(): string {
    return this.#table;
  }

  /** Where the migration files come from. */
  get source(): MigrationSource {
    return this.#source;
  }

  /**
   * Reads the source (afresh) and returns its migrations in the order they apply.
   *
   * @returns The migrations, ordered by version.
   * @throws {MigrationError} When the source cannot be read (`reason`: `missing_file`,
   *   `source_unreadable`, `invalid_manifest`), a name has no version (`invalid_filename`),
   *   two files share a version (`duplicate_version`), or a file has no statement, being
   *   empty or only comments (`empty_file`).
   */
  async findMigrationFiles(): Promise<Migration[]> {
    return (await this.#migrations()).map((migration) => ({ ...migration }));
  }

  /**
   * The source's migrations, one shared object per parsed file: a source that returns the
   * same files each time (a fleet's) is parsed, and each file split, once for all schemas.
   */
  async #migrations(): Promise<Migration[]> {
    const files = await this.#source.read();
    let parsed = parsedCache.get(files);
    if (parsed === undefined) {
      parsed = parseMigrationFiles(files, this.#source.location).then((all) =>
        all.map(toMigration)
      );
      parsedCache.set(files, parsed);
    }
    try {
      return await parsed;
    } catch (error) {
      throw this.#failures.decorate(error);
    }
  }

  /**
   * The history rows that count for this module (its own and pgdbm's module-less rows),
   * oldest first; empty while the history table does not exist.
   *
   * @returns The applied migrations.
   */
  async getApplied(): Promise<AppliedMigration[]> {
    return (await this.#history.applied(this.#db)) ?? [];
  }

  /**
   * The migrations not applied yet, in order.
   *
   * @returns The pending migrations.
   * @throws {MigrationError} When an applied file changed (reason `drift`), with both
   *   checksums.
   */
  async getPending(): Promise<Migration[]> {
    const [files, applied] = await Promise.all([
      this.findMigrationFiles(),
      this.#history.applied(this.#db),
    ]);
    const plan = this.#history.plan(files, applied ?? []);
    this.#refuseDrift(plan);
    return plan.pending;
  }

  /**
   * Where this module stands: applied, pending, drifted and missing migrations. Unlike
   * {@link Migrator.getPending} it reports drift instead of throwing, for status screens.
   *
   * @returns The status.
   * @throws {MigrationError} When the source cannot be read.
   */
  async getStatus(): Promise<MigrationStatus> {
    const [files, applied] = await Promise.all([
      this.findMigrationFiles(),
      this.#history.applied(this.#db),
    ]);
    const plan = this.#history.plan(files, applied ?? []);
    const status: MigrationStatus = {
      module: this.#module,
      schema: this.#db.schema ?? null,
      initialized: applied !== undefined,
      applied: applied ?? [],
      pending: plan.pending,
      drifted: plan.drifted,
      missing: plan.missing,
      upToDate: plan.pending.length === 0 && plan.drifted.length === 0,
    };
    const names = files.map((f) => f.filename);
    const theirs = pgdbmOrder(names);
    if (theirs.some((name, i) => name !== names[i])) status.pgdbmOrder = theirs;
    return status;
  }

  /**
   * The most recent history rows of this module, newest first.
   *
   * @param limit How many rows.
   * @returns The rows.
   */
  async getHistory(limit = 10): Promise<AppliedMigration[]> {
    if (!Number.isInteger(limit) || limit < 1) {
      throw new RangeError(
        `Cannot read the history: 'limit' must be a positive integer; got ${limit}`,
      );
    }
    return await this.#history.recent(this.#db, limit);
  }

  /**
   * Creates the schema (when the manager has one) and the history table with pgdbm's
   * columns, if they do not exist. Safe to call from many processes at once.
   *
   * @throws {QueryError} When the user may not create them.
   */
  async ensureMigrationsTable(): Promise<void> {
    await this.#history.ensure(this.#db);
  }

  /**
   * Applies every pending migration, in order, each in its own transaction with its
   * history row (see the module documentation for the lock and retry rules).
   *
   * @param options `dryRun` to report what would be applied; `signal` to stop the run
   *   (the running statement is cancelled on the server and its migration rolled back).
   * @returns What was applied, skipped, pending (dry run) and missing.
   * @throws {MigrationError} Its `reason` says which failure it was: an applied file
   *   changed (`drift`; nothing is applied then), the source is invalid (see
   *   {@link Migrator.findMigrationFiles}), the lock could not be taken in time
   *   (`lock_timeout`), a pooler in transaction mode moved or shared the session lock
   *   (`lost_lock_session`, `shared_lock_session`; `lock: "session"`), a pending file is a
   *   no-transaction file (`no_transaction_refused`; `lock: "transaction"`; nothing is
   *   applied then), or a migration failed (`statement_failed`, or `retries_exhausted`
   *   after lock timeouts): `filename`, `module`, `schema`, `line` and the server's message,
   *   and as `partialResult` what the run applied before. When `signal` aborted (`aborted`):
   *   `cause` is its reason and `partialResult.failure.aborted` is `true`.
   *
   * @example Stop cleanly on Ctrl-C (needs a server)
   * ```ts ignore
   * const controller = new AbortController();
   * Deno.addSignalListener("SIGINT", () => controller.abort(new Error("SIGINT")));
   * try {
   *   await migrator.applyPending({ signal: controller.signal });
   * } catch (error) {
   *   if (!controller.signal.aborted) throw error;
   *   console.error(`Interrupted: ${(error as Error).message}`);
   *   Deno.exit(130);
   * }
   * ```
   */
  async applyPending(options: ApplyPendingOptions = {}): Promise<MigrationResult> {
    const tracer = activeTracer();
    const config = (this.#db.pool as ConnectionPool).config;
    if (tracer === undefined || this.#span !== undefined) return await this.#applyPending(options);
    const span = startMigrationSpan(tracer, this.#module, {
      database: config.database,
      schema: this.#db.schema,
      host: config.host,
      port: config.port,
    });
    this.#span = span;
    try {
      const result = await withActiveSpan(span, () => this.#applyPending(options));
      span.setAttribute("pgdbm.migration.status", result.status);
      span.setAttribute("pgdbm.migration.applied", result.applied.length);
      endSpan(span, undefined);
      return result;
    } catch (error) {
      endSpan(span, error);
      throw error;
    } finally {
      this.#span = undefined;
    }
  }

  async #applyPending(options: ApplyPendingOptions): Promise<MigrationResult> {
    const signal = options.signal;
    const run: RunState = { signal, lock: "none", started: performance.now() };
    if (signal === undefined) return await this.#applyRun(options, run);
    try {
      if (signal.aborted) throw new RunAborted("start", signal.reason);
      return await this.#applyRun(options, run);
    } catch (error) {
      if (!signal.aborted) throw error;
      throw this.#abortedError(error, run);
    }
  }

  /**
   * Reads the history without a lock and ends there when nothing is pending (or for a dry
   * run); otherwise applies the pending migrations under the lock.
   */
  async #applyRun(options: ApplyPendingOptions, run: RunState): Promise<MigrationResult> {
    const { started } = run;
    const files = await this.#migrations();
    run.files = files;
    const before = fresh.delete(this) && !options.dryRun
      ? undefined
      : await this.#history.applied(this.#db);
    run.before = before;
    if (before !== undefined || options.dryRun) {
      const plan = this.#history.plan(files, before ?? []);
      this.#refuseDrift(plan);
      if (plan.pending.length === 0 || options.dryRun) {
        this.#reportMissing(plan);
        return this.#result(
          options.dryRun ? "dry_run" : "up_to_date",
          filenames(before ?? []),
          [],
          plan,
          started,
          options.dryRun ? plan.pending.map((m) => m.filename) : undefined,
        );
      }
      this.#refuseNoTransaction(plan.pending);
    }
    return await this.#lock.hold((scope) => this.#applyPlanned(scope, files, run), run);
  }

  /**
   * Plans the run from the history read under the lock, then applies each pending
   * migration with the lock's attempts (an attempt returns `undefined` for a file another
   * process applied meanwhile: it is counted as skipped).
   */
  async #applyPlanned(
    scope: LockScope,
    files: Migration[],
    run: RunState,
  ): Promise<MigrationResult> {
    const { started, signal } = run;
    const applied = (await scope.applied()) ?? [];
    run.before = applied;
    const plan = this.#history.plan(files, applied);
    this.#refuseDrift(plan);
    this.#refuseNoTransaction(plan.pending);
    this.#reportMissing(plan);
    const prepared = plan.pending.map((m) => this.#applier.prepare(m));
    const skipped = filenames(applied);
    const done: AppliedMigrationResult[] = [];
    for (const migration of prepared) {
      if (signal?.aborted) {
        const { filename } = migration.migration;
        throw new RunStopped(
          this.#result("failed", skipped, done, plan, started),
          filename,
          `stopped before '${filename}'`,
          scope.heldForRun,
          `; '${filename}'${
            migration === prepared.at(-1) ? " was" : " and the files after it were"
          } not started`,
        );
      }
      try {
        const result = await this.#applier.withRetries(
          migration,
          (attempt) => scope.attempt(migration, attempt, "skip", signal),
          signal,
        );
        if (result === undefined) skipped.push(migration.migration.filename);
        else done.push(result);
      } catch (error) {
        const partial = this.#result("failed", skipped, done, plan, started);
        if (signal?.aborted) throw this.#failures.stopped(error, migration, partial);
        throw this.#failures.failed(error, migration.migration, partial);
      }
    }
    return this.#result(done.length > 0 ? "success" : "up_to_date", skipped, done, plan, started);
  }

  /**
   * The `MigrationError` of a run whose signal aborted: what was done about the work in
   * progress, the lock, and what the run applied before.
   */
  #abortedError(error: unknown, run: RunState): MigrationError {
    const signal = run.signal!;
    if (error instanceof RunStopped) {
      return this.#failures.aborted(signal, error.partial, {
        filename: error.filename,
        line: error.line,
        what: error.what + this.#lock.abortClause(run, error.lockHeld) + error.tail,
      });
    }
    const plan = this.#history.plan(run.files ?? [], run.before ?? []);
    return this.#failures.aborted(
      signal,
      this.#result("failed", filenames(run.before ?? []), [], plan, run.started),
      { filename: plan.pending[0]?.filename ?? "", what: this.#failures.stoppedBeforeLock(error) },
    );
  }

  /**
   * Applies one migration under the (schema, module) lock, in its own transaction with its
   * history row (or statement by statement for a no-transaction file).
   *
   * @param migration A migration from {@link Migrator.findMigrationFiles}.
   * @returns How it ran.
   * @throws {MigrationError} When it is already applied (`already_applied`) or fails
   *   (`statement_failed`, `retries_exhausted`, or a lock's reason), or (with
   *   `lock: "transaction"`) when it is a no-transaction file (`no_transaction_refused`).
   */
  async applyMigration(migration: Migration): Promise<AppliedMigrationResult> {
    const prepared = this.#applier.prepare(migration);
    this.#refuseNoTransaction([migration]);
    return await this.#lock.hold(async (scope) => {
      if (scope.heldForRun) {
        const applied = (await scope.applied()) ?? [];
        if (applied.some((row) => row.filename === migration.filename)) {
          throw this.#failures.alreadyApplied(migration);
        }
      }
      try {
        return (await this.#applier.withRetries(
          prepared,
          (attempt) => scope.attempt(prepared, attempt, "refuse"),
        ))!;
      } catch (error) {
        throw this.#failures.failed(error, migration, undefined);
      }
    });
  }

  /**
   * Writes a new migration file named `YYYYMMDDHHMMSS_<name>.sql` (UTC) into the source
   * folder (a directory or `file:` URL; a `migrations.json` there is updated). The file
   * is not wrapped in `BEGIN`/`COMMIT`: the migrator runs each file in a transaction.
   *
   * @param name What the migration does, such as `add_user_email` (letters, digits, `_`, `-`).
   * @param content The SQL.
   * @param options `now` to fix the timestamp.
   * @returns The path of the new file.
   * @throws {MigrationError} When the source cannot be written, being a record or an
   *   `https:` URL, or the file exists (`write_failed`), or the name is invalid
   *   (`invalid_filename`).
   */
  async createMigration(
    name: string,
    content: string,
    options: CreateMigrationOptions = {},
  ): Promise<string> {
    return await createMigrationFile(this.#source, name, content, {
      ...options,
      module: this.#module,
    });
  }

  /**
   * Removes the history row of a migration so it runs again; its schema changes are not
   * undone.
   *
   * @param filename The migration's file name.
   * @returns `true` when a row was removed, `false` when it was not applied.
   */
  async rollbackMigration(filename: string): Promise<boolean> {
    return await this.#history.remove(this.#db, filename);
  }

  // ---------------------------------------------------------------- internals

  #emit(event: MigrationEvent): void {
    if (this.#span !== undefined) {
      this.#span.addEvent(`pgdbm.migration.${event.type}`, spanAttributes(event));
    }
    try {
      this.#onEvent?.(event);
    } catch {
      // A failing listener must not break a migration.
    }
  }

  #refuseDrift(plan: Plan): void {
    if (plan.drifted.length > 0) throw this.#failures.drift(plan.drifted);
  }

  /** Under a lock that cannot keep no-transaction files apart, refuse them. */
  #refuseNoTransaction(pending: Migration[]): void {
    if (this.#lock.allowsNoTransaction) return;
    const file = pending.find((m) => m.noTransaction);
    if (file !== undefined) throw this.#failures.noTransactionRefused(file);
  }

  #reportMissing(plan: Plan): void {
    if (plan.missing.length > 0) {
      this.#emit({ type: "missing", filenames: plan.missing.map((m) => m.filename) });
    }
  }

  #result(
    status: MigrationResult["status"],
    skipped: string[],
    applied: AppliedMigrationResult[],
    plan: Plan,
    started: number,
    pending?: string[],
  ): MigrationResult {
    const result: MigrationResult = {
      status,
      module: this.#module,
      schema: this.#db.schema ?? null,
      applied,
      skipped: [...skipped],
      missing: plan.missing.map((row) => row.filename),
      total: skipped.length + (pending?.length ?? applied.length),
      totalTimeMs: performance.now() - started,
    };
    if (pending !== undefined) result.pending = pending;
    return result;
  }
}

function filenames(rows: AppliedMigration[]): string[] {
  return rows.map((row) => row.filename);
}

function toMigration(file: ParsedMigrationFile): Migration {
  return {
    filename: file.filename,
    version: file.version,
    checksum: file.checksum,
    content: file.content,
    noTransaction: file.noTransaction,
  };
}

function checkCount(value: number | undefined, field: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) {
    throw new ConfigurationError(
      field,
      `Cannot create a Migrator: '${field}' must be a number of 0 or more; got ${String(value)}`,
    );
  }
  return Math.floor(value);
}

/** An event's fields as span attributes (lists joined). */
function spanAttributes(event: MigrationEvent): Record<string, string | number | boolean> {
  const attributes: Record<string, string | number | boolean> = {};
  for (const [key, value] of Object.entries(event)) {
    if (key === "type" || value === null || value === undefined) continue;
    attributes[`pgdbm.${key}`] = Array.isArray(value)
      ? value.join(", ")
      : typeof value === "object"
      ? String(value)
      : value;
  }
  return attributes;
}
