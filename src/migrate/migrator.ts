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

import { ConfigurationError, MigrationError, QueryError } from "../errors.ts";
import type { DatabaseManager } from "../manager.ts";
import { type MigrationFile, type MigrationSource, resolveMigrationSource } from "./source.ts";
import type {
  AppliedMigration,
  AppliedMigrationResult,
  ApplyPendingOptions,
  CreateMigrationOptions,
  DriftedMigration,
  Migration,
  MigrationEvent,
  MigrationLockMode,
  MigrationResult,
  MigrationStatus,
  MigratorOptions,
} from "./types.ts";
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
} from "./types.ts";
import type { ConnectionPool, Lease } from "../pool/pool.ts";
import type { Queries } from "../queries.ts";
import {
  activeTracer,
  endSpan,
  type Span,
  startMigrationSpan,
  withActiveSpan,
} from "../_telemetry.ts";
import { assertIdentifier } from "../template.ts";
import { Connection, LeaseRunner, runTransaction, type Transaction } from "../transaction.ts";
import {
  type ParsedMigrationFile,
  parseMigrationFiles,
  pgdbmOrder,
  refusePsqlCommands,
  timestampVersion,
  transactionalBody,
} from "./_files.ts";
import { lineOfPosition, splitSqlStatements, type SqlStatement } from "../_sql.ts";

const DEFAULT_TABLE = "schema_migrations";
const MAX_TIMER_MS = 2 ** 31 - 1;
const RETRYABLE = new Set(["55P03", "40P01"]);
const CREATE_RACE = new Set(["23505", "42P07", "42P06"]);
const CONCURRENTLY = /\bconcurrently\b/i;
const MAX_RETRY_DELAY_MS = 30_000;
const MIGRATION_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]*$/;
const LOCK_MODES: readonly MigrationLockMode[] = ["session", "transaction"];
const POOLER_FIX = `set the Migrator option lock: "transaction" ("lock": "transaction" in ` +
  "pgdbm.json), whose lock lives in each migration's transaction, or run migrations on a URL " +
  "that goes directly to PostgreSQL (or through a session-mode pool)";

/**
 * Saves the session's own settings (those set with `SET`) in the transaction, before a
 * migration's statements run; {@link RESTORE_SETTINGS_SQL} puts them back after them. Both
 * are pipelined with the file, so this costs no round trip.
 */
const SAVE_SETTINGS_SQL = "SELECT pg_catalog.set_config('pgdbm.saved_settings', " +
  "coalesce((SELECT pg_catalog.json_object_agg(name, setting) FROM pg_catalog.pg_settings " +
  "WHERE source = 'session' AND name <> 'pgdbm.saved_settings'), '{}')::text, true)";

/**
 * Puts back, as session values, the settings {@link SAVE_SETTINGS_SQL} saved: a plain `SET`
 * in a migration (pg_dump's `search_path` of '', say) would otherwise outlive the file and
 * reach the next one and the application's queries. `set_config(name, NULL, false)` is RESET.
 */
const RESTORE_SETTINGS_SQL = `SELECT pg_catalog.count(pg_catalog.set_config(n, v, false))
FROM (SELECT coalesce(now.name, was.key) AS n, was.value AS v
  FROM (SELECT name, setting FROM pg_catalog.pg_settings
        WHERE source = 'session' AND name <> 'pgdbm.saved_settings') AS now
  FULL JOIN pg_catalog.json_each_text(
    coalesce(pg_catalog.current_setting('pgdbm.saved_settings', true), '{}')::json) AS was
    ON was.key = now.name
  WHERE now.setting IS DISTINCT FROM was.value) AS changed`;

/** `k`: the lock's two keys, and `marker`: the session setting naming the session's holder. */
const LOCK_KEY_CTE = "WITH k AS (SELECT hashtext($1) AS a, hashtext($2) AS b, " +
  "format('pgdbm.migration_lock_%s_%s', to_hex(hashtext($1)), to_hex(hashtext($2))) AS marker)";

/**
 * Takes the session lock and marks the session with this run's token, in one statement
 * (a pooler may run the next statement elsewhere): `null` when another session holds the
 * lock; the token when taken; `shared` when this server session already held it for
 * another client (the lock is re-entrant: the extra hold is given back at once).
 */
const SESSION_LOCK_SQL = `${LOCK_KEY_CTE}
SELECT CASE WHEN pg_try_advisory_lock(a, b) THEN
  CASE WHEN coalesce(current_setting(marker, true), '') = '' THEN set_config(marker, $3, false)
  ELSE 'shared:' || pg_advisory_unlock(a, b)::text END
END AS state FROM k`;

/** Releases the session lock when this session holds it for this run (or for nobody). */
const SESSION_UNLOCK_SQL = `${LOCK_KEY_CTE}
SELECT CASE WHEN coalesce(current_setting(marker, true), '') IN ('', $3) THEN
  CASE WHEN set_config(marker, '', false) = '' THEN pg_advisory_unlock(a, b) END
ELSE false END AS released FROM k`;

/**
 * The first statement of a migration's transaction under the session lock: its timeouts,
 * and a division by zero (which stops the batch) unless this is the holding session.
 */
const SESSION_GUARD_SQL = `${LOCK_KEY_CTE}
SELECT set_config('lock_timeout', $4, true), set_config('statement_timeout', $5, true),
  1 / (pg_try_advisory_xact_lock(a, b)
    AND coalesce(current_setting(marker, true), '') = $3)::int FROM k`;

const parsedCache = new WeakMap<readonly MigrationFile[], Promise<ParsedMigrationFile[]>>();

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
  readonly #lockTimeoutMs: number;
  readonly #lockRetries: number;
  readonly #lockRetryDelayMs: number;
  readonly #statementTimeoutMs: number | null;
  readonly #lockWaitTimeoutMs: number;
  readonly #lockPollMaxMs: number;
  readonly #lockMode: MigrationLockMode;
  readonly #onEvent?: (event: MigrationEvent) => void;
  /** How to run `COPY … FROM STDIN` with data on the connection of a migration's queries. */
  readonly #copiers = new WeakMap<Queries, CopyIn>();

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
    const table = options.migrationsTable ?? DEFAULT_TABLE;
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
    this.#lockTimeoutMs = checkCount(options.lockTimeoutMs, "lockTimeoutMs", 5000);
    this.#lockRetries = checkCount(options.lockRetries, "lockRetries", 5);
    this.#lockRetryDelayMs = checkCount(options.lockRetryDelayMs, "lockRetryDelayMs", 1000);
    this.#statementTimeoutMs = options.statementTimeoutMs === null ||
        options.statementTimeoutMs === undefined
      ? null
      : checkCount(options.statementTimeoutMs, "statementTimeoutMs", 0);
    this.#lockWaitTimeoutMs = checkCount(options.lockWaitTimeoutMs, "lockWaitTimeoutMs", 600_000);
    this.#lockPollMaxMs = Math.max(
      1,
      checkCount(options.lockPollMaxMs, "lockPollMaxMs", 1000),
    );
    const lock = options.lock ?? "session";
    if (!LOCK_MODES.includes(lock)) {
      throw new ConfigurationError(
        "lock",
        `Cannot create a Migrator: 'lock' must be "session" (the default) or "transaction" ` +
          `(behind PgBouncer in transaction mode); got ${JSON.stringify(lock)}`,
      );
    }
    this.#lockMode = lock;
    this.#onEvent = options.onEvent;
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
    return this.#lockMode;
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
   * @throws {MigrationError} When the source cannot be read, a name has no version, two
   *   files share a version, or a file has no statement (empty, or only comments).
   */
  async findMigrationFiles(): Promise<Migration[]> {
    const files = await this.#source.read();
    let parsed = parsedCache.get(files);
    if (parsed === undefined) {
      parsed = parseMigrationFiles(files, this.#source.location);
      parsedCache.set(files, parsed);
    }
    try {
      return (await parsed).map(toMigration);
    } catch (error) {
      throw this.#decorate(error);
    }
  }

  /**
   * The history rows that count for this module (its own and pgdbm's module-less rows),
   * oldest first; empty while the history table does not exist.
   *
   * @returns The applied migrations.
   */
  async getApplied(): Promise<AppliedMigration[]> {
    return (await this.#readApplied(this.#db)) ?? [];
  }

  /**
   * The migrations not applied yet, in order.
   *
   * @returns The pending migrations.
   * @throws {MigrationError} When an applied file changed (drift), with both checksums.
   */
  async getPending(): Promise<Migration[]> {
    const [files, applied] = await Promise.all([
      this.findMigrationFiles(),
      this.#readApplied(this.#db),
    ]);
    const plan = this.#plan(files, applied ?? []);
    this.#refuseDrift(plan.drifted);
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
      this.#readApplied(this.#db),
    ]);
    const plan = this.#plan(files, applied ?? []);
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
    const rows = await this.#select(
      this.#db,
      `WHERE module_name = $1 OR module_name IS NULL ORDER BY applied_at DESC, id DESC LIMIT ${limit}`,
    );
    return rows ?? [];
  }

  /**
   * Creates the schema (when the manager has one) and the history table with pgdbm's
   * columns, if they do not exist. Safe to call from many processes at once.
   *
   * @throws {QueryError} When the user may not create them.
   */
  async ensureMigrationsTable(): Promise<void> {
    await this.#ensureTable(this.#db);
  }

  /**
   * Applies every pending migration, in order, each in its own transaction with its
   * history row (see the module documentation for the lock and retry rules).
   *
   * @param options `dryRun` to report what would be applied; `signal` to stop the run
   *   (the running statement is cancelled on the server and its migration rolled back).
   * @returns What was applied, skipped, pending (dry run) and missing.
   * @throws {MigrationError} When an applied file changed (nothing is applied then), the
   *   source is invalid, the lock could not be taken in time, a pooler in transaction mode
   *   moved the session lock (`lock: "session"`), a pending file is a no-transaction file
   *   (`lock: "transaction"`; nothing is applied then), or a migration failed: `filename`,
   *   `module`, `schema`, `line` and the server's message, and as `partialResult` what the
   *   run applied before. When `signal` aborted: `cause` is its reason and
   *   `partialResult.failure.aborted` is `true`.
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

  async #applyRun(options: ApplyPendingOptions, run: RunState): Promise<MigrationResult> {
    const { started } = run;
    const files = await this.findMigrationFiles();
    run.files = files;
    const before = await this.#readApplied(this.#db);
    run.before = before;
    if (before !== undefined || options.dryRun) {
      const plan = this.#plan(files, before ?? []);
      this.#refuseDrift(plan.drifted);
      if (plan.pending.length === 0 || options.dryRun) {
        this.#reportMissing(plan.missing);
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
    if (this.#lockMode === "transaction") return await this.#applyInTransactions(files, run);
    return await this.#locked(
      (conn, token) =>
        this.#applyPlanned(conn, files, run, (m) => this.#onSession(conn, token, m, run.signal)),
      run,
    );
  }

  /**
   * The `MigrationError` of a run whose signal aborted: what was done about the work in
   * progress, the lock, and what the run applied before.
   */
  #abortedError(error: unknown, run: RunState): MigrationError {
    const signal = run.signal!;
    let partial: MigrationResult;
    let filename: string;
    let line: number | undefined;
    let what: string;
    if (error instanceof RunStopped) {
      ({ partial, filename, line } = error);
      what = error.what + this.#lockClause(run, error.lockHeld) + error.tail;
    } else {
      const plan = this.#plan(run.files ?? [], run.before ?? []);
      partial = this.#result("failed", filenames(run.before ?? []), [], plan, run.started);
      filename = plan.pending[0]?.filename ?? "";
      what = error instanceof RunAborted && error.stage === "lock" && error.waited
        ? "stopped waiting for the migration lock, which another run holds; nothing was applied"
        : "stopped before taking the migration lock; nothing was applied";
    }
    partial.failure = { filename, line, message: what, aborted: true };
    const reason = signal.reason instanceof Error ? ` (${signal.reason.message})` : "";
    const before = partial.applied.length === 0
      ? ""
      : `. Applied by this run before: ${partial.applied.map((a) => a.filename).join(", ")}`;
    return new MigrationError(
      `Cannot finish migrating module '${this.#module}'${this.#where()}: the run was ` +
        `aborted${reason}; ${what}${before}. Apply again to run what is left`,
      this.#details(filename || undefined, line, partial),
      { cause: signal.reason },
    );
  }

  /** `, and released the migration lock` (or what became of it) for an abort report. */
  #lockClause(run: RunState, lockHeld: boolean): string {
    if (this.#lockMode === "transaction") {
      // The lock lived in the migration's transaction, which rolled back.
      return lockHeld ? ", and released the migration lock" : "";
    }
    if (run.lock === "released") return ", and released the migration lock";
    if (run.lock === "unknown") {
      return ", and could not confirm that the migration lock was released: it is released " +
        "when its connection closes";
    }
    return "";
  }

  /**
   * Plans the run from the history `q` sees, then applies each pending migration with the
   * attempts `attempt` makes for it (an attempt returns `undefined` for a file another
   * process applied meanwhile: it is counted as skipped).
   */
  async #applyPlanned(
    q: Queries,
    files: Migration[],
    run: RunState,
    attempt: (migration: PreparedMigration) => (attempt: number) => Promise<number | undefined>,
  ): Promise<MigrationResult> {
    const { started, signal } = run;
    const applied = (await this.#readApplied(q)) ?? [];
    run.before = applied;
    const plan = this.#plan(files, applied);
    this.#refuseDrift(plan.drifted);
    if (this.#lockMode === "transaction") this.#refuseNoTransaction(plan.pending);
    this.#reportMissing(plan.missing);
    const prepared = plan.pending.map((m) => this.#prepare(m));
    const skipped = filenames(applied);
    const done: AppliedMigrationResult[] = [];
    for (const migration of prepared) {
      if (signal?.aborted) {
        const { filename } = migration.migration;
        throw new RunStopped(
          this.#result("failed", skipped, done, plan, started),
          filename,
          `stopped before '${filename}'`,
          this.#lockMode === "session",
          `; '${filename}'${
            migration === prepared.at(-1) ? " was" : " and the files after it were"
          } not started`,
        );
      }
      try {
        const result = await this.#apply(migration, attempt(migration), signal);
        if (result === undefined) skipped.push(migration.migration.filename);
        else done.push(result);
      } catch (error) {
        const partial = this.#result("failed", skipped, done, plan, started);
        if (signal?.aborted) throw this.#stopped(error, migration, partial);
        throw this.#failed(error, migration.migration, partial);
      }
    }
    return this.#result(done.length > 0 ? "success" : "up_to_date", skipped, done, plan, started);
  }

  /** What an abort did to the migration in progress, for {@link Migrator.#abortedError}. */
  #stopped(error: unknown, prepared: PreparedMigration, partial: MigrationResult): RunStopped {
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
   * Applies one migration under the (schema, module) lock, in its own transaction with its
   * history row (or statement by statement for a no-transaction file).
   *
   * @param migration A migration from {@link Migrator.findMigrationFiles}.
   * @returns How it ran.
   * @throws {MigrationError} When it is already applied or fails, or (with
   *   `lock: "transaction"`) when it is a no-transaction file.
   */
  async applyMigration(migration: Migration): Promise<AppliedMigrationResult> {
    const prepared = this.#prepare(migration);
    if (this.#lockMode === "transaction") {
      this.#refuseNoTransaction([migration]);
      await this.#ensureTable(this.#db);
      try {
        return (await this.#apply(prepared, this.#underXactLock(prepared, "refuse")))!;
      } catch (error) {
        throw this.#failed(error, migration, undefined);
      }
    }
    return await this.#locked(async (conn, token) => {
      const applied = (await this.#readApplied(conn)) ?? [];
      if (applied.some((row) => row.filename === migration.filename)) {
        throw this.#alreadyApplied(migration);
      }
      try {
        return (await this.#apply(prepared, this.#onSession(conn, token, prepared)))!;
      } catch (error) {
        throw this.#failed(error, migration, undefined);
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
   * @throws {MigrationError} When the source cannot be written (a record or `https:` URL),
   *   the name is invalid, or the file exists.
   */
  async createMigration(
    name: string,
    content: string,
    options: CreateMigrationOptions = {},
  ): Promise<string> {
    const write = this.#source.write;
    if (write === undefined) {
      throw new MigrationError(
        `Cannot create a migration in '${this.#source.location}': only a directory (or a ` +
          `file: URL) can be written; pass 'migrationsPath' as a local folder`,
        { module: this.#module },
      );
    }
    if (typeof name !== "string" || !MIGRATION_NAME.test(name)) {
      throw new MigrationError(
        `Cannot create a migration named '${String(name)}': use letters, digits, '_' and '-' ` +
          `(such as 'add_user_email')`,
        { module: this.#module },
      );
    }
    const existing = (await this.#source.read().catch((error: unknown) => {
      // A folder that does not exist yet is created by write().
      if (error instanceof MigrationError && error.cause instanceof Deno.errors.NotFound) return [];
      throw error;
    })).map((f) => f.filename);
    let moment = (options.now ?? new Date()).getTime();
    let filename = `${timestampVersion(new Date(moment))}_${name}.sql`;
    while (existing.some((f) => f.startsWith(filename.slice(0, 15)))) {
      moment += 1000;
      filename = `${timestampVersion(new Date(moment))}_${name}.sql`;
    }
    return await write.call(this.#source, filename, content);
  }

  /**
   * Removes the history row of a migration so it runs again; its schema changes are not
   * undone.
   *
   * @param filename The migration's file name.
   * @returns `true` when a row was removed, `false` when it was not applied.
   */
  async rollbackMigration(filename: string): Promise<boolean> {
    if (!await this.#historyExists(this.#db)) return false;
    try {
      const result = await this.#db.execute(
        `DELETE FROM ${this.#tableRef()} WHERE filename = $1 AND module_name = $2`,
        [filename, this.#module],
      );
      return result.rowCount > 0;
    } catch (error) {
      if (isMissingTable(error)) return false;
      throw error;
    }
  }

  // ---------------------------------------------------------------- internals

  /**
   * The history table, always schema-qualified (`public` for a manager without a schema):
   * the migrator's own SQL must not depend on a `search_path` a migration changed.
   */
  #tableRef(): string {
    return `"${this.#db.schema ?? "public"}".${this.#table}`;
  }

  #where(): string {
    return this.#db.schema === undefined ? "" : ` in schema '${this.#db.schema}'`;
  }

  #details(filename?: string, line?: number, partialResult?: unknown) {
    return { filename, module: this.#module, schema: this.#db.schema, line, partialResult };
  }

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

  /**
   * Whether the history table exists, asked of the catalog: reading a missing table would
   * fail a query (counted in the pool's errors, seen by `onQuery`, logged by the server).
   */
  async #historyExists(q: Queries): Promise<boolean> {
    return await q.fetchValue<boolean>(
      "SELECT to_regclass($1) IS NOT NULL",
      [q.prepareQuery(this.#tableRef())],
    ) === true;
  }

  async #select(q: Queries, tail: string): Promise<AppliedMigration[] | undefined> {
    if (!await this.#historyExists(q)) return undefined;
    let rows: Record<string, unknown>[];
    try {
      rows = await q.fetchAll(
        `SELECT filename, checksum, module_name, applied_at, applied_by, execution_time_ms ` +
          `FROM ${this.#tableRef()} ${tail}`,
        [this.#module],
      );
    } catch (error) {
      if (isMissingTable(error)) return undefined;
      throw error;
    }
    return rows.map((row) => ({
      filename: String(row.filename),
      checksum: String(row.checksum),
      moduleName: row.module_name === null ? null : String(row.module_name),
      appliedAt: row.applied_at as Date,
      appliedBy: row.applied_by === null ? null : String(row.applied_by),
      executionTimeMs: row.execution_time_ms === null ? null : Number(row.execution_time_ms),
    }));
  }

  #readApplied(q: Queries): Promise<AppliedMigration[] | undefined> {
    return this.#select(q, "WHERE module_name = $1 OR module_name IS NULL ORDER BY id");
  }

  #plan(files: Migration[], applied: AppliedMigration[]): {
    pending: Migration[];
    drifted: DriftedMigration[];
    missing: AppliedMigration[];
  } {
    const byName = new Map<string, AppliedMigration>();
    for (const row of applied) byName.set(row.filename, row);
    const pending: Migration[] = [];
    const drifted: DriftedMigration[] = [];
    const present = new Set<string>();
    for (const file of files) {
      present.add(file.filename);
      const row = byName.get(file.filename);
      if (row === undefined) pending.push(file);
      else if (row.checksum !== file.checksum) {
        drifted.push({
          filename: file.filename,
          appliedChecksum: row.checksum,
          currentChecksum: file.checksum,
        });
      }
    }
    const missing = applied.filter((row) =>
      row.moduleName === this.#module && !present.has(row.filename)
    );
    return { pending, drifted, missing };
  }

  #refuseDrift(drifted: DriftedMigration[]): void {
    if (drifted.length === 0) return;
    const first = drifted[0];
    const others = drifted.length > 1
      ? ` (and ${drifted.length - 1} more: ${
        drifted.slice(1).map((d) => `'${d.filename}'`).join(", ")
      })`
      : "";
    throw new MigrationError(
      `Cannot apply migrations of module '${this.#module}'${this.#where()}: ` +
        `'${first.filename}' changed after it was applied${others}; applied checksum ` +
        `${first.appliedChecksum}, file checksum ${first.currentChecksum}. Nothing was ` +
        `applied. Restore the file as it was and put the change in a new migration`,
      this.#details(first.filename),
    );
  }

  #reportMissing(missing: AppliedMigration[]): void {
    if (missing.length > 0) {
      this.#emit({ type: "missing", filenames: missing.map((m) => m.filename) });
    }
  }

  #result(
    status: MigrationResult["status"],
    skipped: string[],
    applied: AppliedMigrationResult[],
    plan: { missing: AppliedMigration[]; pending: Migration[] },
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

  async #ensureTable(q: Transactional): Promise<void> {
    const table = this.#tableRef();
    const schema = q.schema;
    const exists = (): Promise<{ table: boolean; schema: boolean } | null> =>
      q.fetchOne<{ table: boolean; schema: boolean }>(
        "SELECT to_regclass($1) IS NOT NULL AS table, " +
          "($2::text IS NULL OR to_regnamespace($2) IS NOT NULL) AS schema",
        [q.prepareQuery(table), schema === undefined ? null : `"${schema}"`],
      );
    const found = await exists();
    if (found?.table === true) return;
    try {
      await q.transaction(async (tx) => {
        // Only when missing: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even then.
        if (found?.schema === false) await tx.execute(`CREATE SCHEMA IF NOT EXISTS "${schema}"`);
        await tx.execute(
          `CREATE TABLE IF NOT EXISTS ${table} (
    id SERIAL PRIMARY KEY,
    filename VARCHAR(255) NOT NULL,
    checksum VARCHAR(64) NOT NULL,
    module_name VARCHAR(100),
    applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    applied_by VARCHAR(100) DEFAULT CURRENT_USER,
    execution_time_ms INTEGER,
    UNIQUE(filename, module_name)
)`,
        );
        await tx.execute(
          `CREATE INDEX IF NOT EXISTS idx_${this.#table}_module ON ${table}(module_name, filename)`,
        );
      });
    } catch (error) {
      // Another process created them at the same moment: its catalog rows won.
      if (!(error instanceof QueryError && CREATE_RACE.has(error.sqlstate ?? ""))) throw error;
      if ((await exists())?.table !== true) throw error;
    }
  }

  /**
   * Calls `attempt` until it takes the lock (returns a value), pausing with jittered,
   * doubling delays (up to `lockPollMaxMs`); `lock_wait` is sent before the first pause.
   * `attempt` calls `taken()` the moment it holds the lock. Stops (throws `RunAborted`)
   * when `signal` aborts.
   */
  async #poll<T>(
    attempt: (taken: () => void) => Promise<T | undefined>,
    q: Queries,
    signal?: AbortSignal,
  ): Promise<T> {
    const start = performance.now();
    const taken = (): void =>
      this.#emit({
        type: "lock_acquired",
        schema: this.#db.schema ?? null,
        module: this.#module,
        waitedMs: performance.now() - start,
      });
    let pause = 25;
    let reported = false;
    while (true) {
      if (signal?.aborted) throw new RunAborted("lock", signal.reason, reported);
      const value = await attempt(taken);
      if (value !== undefined) return value;
      const waited = performance.now() - start;
      if (!reported) {
        reported = true;
        const holder = await this.#lockHolder(q);
        this.#emit({
          type: "lock_wait",
          schema: this.#db.schema ?? null,
          module: this.#module,
          ...(holder === null ? {} : { holderPid: holder }),
        });
      }
      if (waited >= this.#lockWaitTimeoutMs) {
        const holder = await this.#lockHolder(q);
        throw new MigrationError(
          `Cannot migrate module '${this.#module}'${this.#where()}: another migrator` +
            (holder === null ? "" : ` (server process ${holder})`) +
            ` has held its lock for ${Math.round(waited)} ms, longer than 'lockWaitTimeoutMs'; ` +
            `wait for it to finish or raise 'lockWaitTimeoutMs'. When no migrator runs, a ` +
            `pooler in transaction mode (PgBouncer) may have left a session lock behind on ` +
            `that server connection: to migrate through such a pooler, ${POOLER_FIX}`,
          this.#details(),
        );
      }
      await sleep(
        Math.min(pause * (0.5 + Math.random()), this.#lockWaitTimeoutMs - waited + 1),
        signal,
      );
      pause = Math.min(pause * 2, this.#lockPollMaxMs);
    }
  }

  /** The server process holding the (schema, module) lock, or `null` (none, or unreadable). */
  async #lockHolder(q: Queries): Promise<number | null> {
    return await q.fetchValue<number>(
      `SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
         AND l.objsubid = 2
         AND l.classid = oid(hashtext($1)::bigint & 4294967295)
         AND l.objid = oid(hashtext($2)::bigint & 4294967295)
       LIMIT 1`,
      this.#lockKey(),
    ).catch(() => null);
  }

  /**
   * Takes the session lock on `conn`, marking the server session with `token` in the same
   * statement.
   */
  async #lock(conn: Connection, token: string, signal?: AbortSignal): Promise<void> {
    await this.#poll(
      async (taken) => {
        const state = await conn.fetchValue<string | null>(SESSION_LOCK_SQL, [
          ...this.#lockKey(),
          token,
        ]);
        if (state === null) return undefined;
        if (state !== token) throw this.#sharedSession();
        taken();
        return true;
      },
      conn,
      signal,
    );
  }

  /**
   * Runs `fn` on a leased connection that holds the (schema, module) session lock, with the
   * history table in place; `fn` gets the run's token, which marks the holding session.
   * Session settings a migration changed with a plain `SET` (pg_dump files set
   * `search_path` to '', say) are put back before the connection returns to the pool, so
   * they never leak into the application's queries. `run` (of `applyPending`) carries the
   * abort signal, which ends a wait for the lock, and records what became of the lock.
   */
  async #locked<T>(
    fn: (conn: Connection, token: string) => Promise<T>,
    run?: RunState,
  ): Promise<T> {
    return await this.#acquire(async (conn) => {
      await this.#ensureTable(conn);
      const token = crypto.randomUUID();
      await this.#lock(conn, token, run?.signal);
      if (run !== undefined) run.lock = "held";
      let before: Map<string, string> | undefined;
      let result: T;
      try {
        before = await sessionSettings(conn);
        result = await fn(conn, token);
      } catch (error) {
        if (before !== undefined) await restoreSessionSettings(conn, before).catch(() => {});
        const released = await this.#unlock(conn, token);
        if (run !== undefined) run.lock = released ? "released" : "unknown";
        throw error;
      }
      await restoreSessionSettings(conn, before).catch(() => {});
      if (!await this.#unlock(conn, token)) throw this.#sessionLost(result);
      return result;
    });
  }

  /** Releases the lock; `false` when this session did not hold it (a pooler moved us). */
  async #unlock(conn: Connection, token: string): Promise<boolean> {
    const unlock = () => conn.fetchValue<boolean>(SESSION_UNLOCK_SQL, [...this.#lockKey(), token]);
    // A cancel aimed at a migration statement that arrived late fails this statement
    // (57014) on a healthy session: try again. Any other failure means the connection is
    // broken, and its session (and lock) ends with it.
    const released = await unlock().catch((error) =>
      error instanceof QueryError && error.sqlstate === "57014" ? unlock() : true
    ).catch(() => true);
    return released === true;
  }

  /**
   * The error for statements that ran on another server session than the one holding the
   * lock: a pooler in transaction mode (PgBouncer) sits between pgdbm and PostgreSQL.
   */
  #sessionLost(partialResult?: unknown): MigrationError {
    return new MigrationError(
      `Cannot keep the migration lock of module '${this.#module}'${this.#where()}: the ` +
        "statements ran on another server session than the one holding it, which happens " +
        "behind a pooler in transaction mode (PgBouncer). The lock may stay held until that " +
        `server connection closes. To migrate through such a pooler, ${POOLER_FIX}`,
      this.#details(undefined, undefined, partialResult),
    );
  }

  /** The error for a server session that already holds the lock for another client. */
  #sharedSession(): MigrationError {
    return new MigrationError(
      `Cannot take the migration lock of module '${this.#module}'${this.#where()}: the ` +
        "server session that answered already holds it for another client, which happens " +
        "behind a pooler in transaction mode (PgBouncer). Nothing was applied. To migrate " +
        `through such a pooler, ${POOLER_FIX}`,
      this.#details(),
    );
  }

  #alreadyApplied(migration: Migration): MigrationError {
    return new MigrationError(
      `Cannot apply migration '${migration.filename}' of module '${this.#module}'` +
        `${this.#where()}: it is already applied; use rollbackMigration() first to run it again`,
      this.#details(migration.filename),
    );
  }

  /** With `lock: "transaction"`, no-transaction files cannot be kept apart: refuse them. */
  #refuseNoTransaction(pending: Migration[]): void {
    if (this.#lockMode !== "transaction") return;
    const file = pending.find((m) => m.noTransaction);
    if (file === undefined) return;
    throw new MigrationError(
      `Cannot apply migration '${file.filename}' of module '${this.#module}'${this.#where()} ` +
        `with lock: "transaction": the file has a '-- pgdbm:no-transaction' line, so its ` +
        "statements run outside a transaction, where only a session lock keeps other " +
        'migrators out. Nothing was applied. Apply this module with lock: "session" (the ' +
        "default) on a URL that goes directly to PostgreSQL (or through a session-mode pool)",
      this.#details(file.filename),
    );
  }

  /**
   * `manager.acquire()`, keeping the lease, so that a migration's `COPY … FROM STDIN` can
   * stream its data block on the connection (see {@link Migrator.#copiers}).
   */
  async #acquire<T>(fn: (conn: Connection) => Promise<T>): Promise<T> {
    const lease = await (this.#db.pool as ConnectionPool).lease();
    const runner = new LeaseRunner(lease, false);
    const conn = new Connection(runner, this.#db.schema);
    this.#copiers.set(conn, copier(lease));
    try {
      return await fn(conn);
    } finally {
      runner.close();
      if (runner.beganOwnTransaction) {
        await lease.query("ROLLBACK", []).catch(() => lease.release(true));
      }
      lease.release();
    }
  }

  /** `manager.transaction()`, keeping the lease (see {@link Migrator.#acquire}). */
  async #transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T> {
    const lease = await (this.#db.pool as ConnectionPool).lease();
    try {
      return await runTransaction(lease, this.#db.schema, (tx) => {
        this.#copiers.set(tx, copier(lease));
        return fn(tx);
      });
    } finally {
      lease.release();
    }
  }

  /**
   * The `search_path` a migration runs with: the manager's schema, then `public`, as Python
   * pgdbm runs it, so unqualified names in a file land where they did there. `undefined`
   * for a manager without a schema (the session's own `search_path` stays).
   */
  #searchPath(): string | undefined {
    const schema = this.#db.schema;
    return schema === undefined ? undefined : `"${schema}", public`;
  }

  #lockKey(): [string, string] {
    return [`pgdbm_migration_${this.#module}`, this.#db.schema ?? "public"];
  }

  #prepare(migration: Migration): PreparedMigration {
    const content = migration.content.replace(/^\ufeff/, "");
    try {
      const statements = migration.noTransaction
        ? splitSqlStatements(content)
        : transactionalBody(content, migration.filename).statements;
      refusePsqlCommands(statements, migration.filename);
      return { migration, statements };
    } catch (error) {
      throw this.#decorate(error);
    }
  }

  /**
   * With `lock: "transaction"`: applies the pending migrations one transaction each, every
   * transaction under the (schema, module) transaction lock.
   */
  async #applyInTransactions(files: Migration[], run: RunState): Promise<MigrationResult> {
    await this.#ensureTable(this.#db);
    return await this.#applyPlanned(
      this.#db,
      files,
      run,
      (m) => this.#underXactLock(m, "skip", run.signal),
    );
  }

  /**
   * Runs `run` (one attempt at a migration: its run time, or `undefined` when it turned out
   * applied already), retrying it after a lock timeout or deadlock; the wait before a
   * retry ends when `signal` aborts.
   */
  async #apply(
    prepared: PreparedMigration,
    run: (attempt: number) => Promise<number | undefined>,
    signal?: AbortSignal,
  ): Promise<AppliedMigrationResult | undefined> {
    const { migration } = prepared;
    let attempt = 1;
    while (true) {
      try {
        const executionTimeMs = await run(attempt);
        if (executionTimeMs === undefined) return undefined;
        this.#emit({ type: "applied", filename: migration.filename, executionTimeMs });
        return { filename: migration.filename, executionTimeMs, attempts: attempt };
      } catch (error) {
        const cause = error instanceof StatementFailure ? error.cause : error;
        const retryable = cause instanceof QueryError && RETRYABLE.has(cause.sqlstate ?? "") &&
          !(error instanceof StatementFailure && error.invalidIndexes.length > 0);
        if (!retryable || attempt > this.#lockRetries) throw error;
        const base = Math.min(this.#lockRetryDelayMs * 2 ** (attempt - 1), MAX_RETRY_DELAY_MS);
        const delayMs = Math.round(base * (0.5 + Math.random() / 2));
        this.#emit({
          type: "retry",
          filename: migration.filename,
          attempt,
          delayMs,
          message: (cause as QueryError).message,
        });
        await sleep(delayMs, signal);
        if (signal?.aborted) throw new RunAborted("retry", signal.reason);
        attempt++;
      }
    }
  }

  /** One attempt at a migration on the connection that holds the session lock. */
  #onSession(
    conn: Connection,
    token: string,
    prepared: PreparedMigration,
    signal?: AbortSignal,
  ): (attempt: number) => Promise<number> {
    return (attempt) => {
      this.#emit({ type: "apply_start", filename: prepared.migration.filename, attempt });
      return prepared.migration.noTransaction
        ? this.#runAutocommit(conn, prepared, signal)
        : conn.transaction((tx) => {
          const copy = this.#copiers.get(conn);
          if (copy !== undefined) this.#copiers.set(tx, copy);
          return this.#runStatements(tx, prepared, token, signal);
        });
    };
  }

  /**
   * One attempt at a migration with `lock: "transaction"`: a transaction that takes the
   * transaction lock (polling, one short transaction per try), reads the file's history
   * row — skips the file (`undefined`) or, for `refuse`, fails when it is there, and
   * refuses a drifted file — then applies it with its history row, puts back session
   * settings it changed with `SET`, and commits.
   */
  #underXactLock(
    prepared: PreparedMigration,
    whenApplied: "skip" | "refuse",
    signal?: AbortSignal,
  ): (attempt: number) => Promise<number | undefined> {
    const { migration } = prepared;
    return async (attempt) => {
      const outcome = await this.#poll(
        (taken) =>
          this.#transaction(async (tx) => {
            const [, locked] = await Promise.all([
              // Each statement must see what committed before it: the lock comes first.
              tx.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED"),
              tx.fetchValue<boolean>(
                "SELECT pg_try_advisory_xact_lock(hashtext($1), hashtext($2))",
                this.#lockKey(),
              ),
            ]);
            if (locked !== true) return undefined;
            taken();
            const row = await tx.fetchOne<{ checksum: string }>(
              `SELECT checksum FROM ${this.#tableRef()} WHERE filename = $1 ` +
                "AND (module_name = $2 OR module_name IS NULL) ORDER BY id DESC LIMIT 1",
              [migration.filename, this.#module],
            );
            if (row !== null) {
              this.#refuseDrift(
                row.checksum === migration.checksum ? [] : [{
                  filename: migration.filename,
                  appliedChecksum: row.checksum,
                  currentChecksum: migration.checksum,
                }],
              );
              if (whenApplied === "refuse") throw this.#alreadyApplied(migration);
              return { executionTimeMs: undefined };
            }
            this.#emit({ type: "apply_start", filename: migration.filename, attempt });
            const executionTimeMs = await this.#runStatements(tx, prepared, undefined, signal);
            return { executionTimeMs };
          }),
        this.#db,
        signal,
      );
      return outcome.executionTimeMs;
    };
  }

  #timeoutMs(): number {
    return this.#statementTimeoutMs === null || this.#statementTimeoutMs === 0
      ? MAX_TIMER_MS
      : Math.min(this.#statementTimeoutMs + 5000, MAX_TIMER_MS);
  }

  /**
   * Runs a migration's statements and its history row in `tx`. With `token` (the session
   * lock's run), the first statement also checks that `tx` runs in the session holding the
   * lock. When `signal` aborts, the statement running is cancelled on the server (the
   * transaction then rolls back). Session settings the file changed with a plain `SET`
   * (which would outlive the transaction) are put back before it commits.
   */
  async #runStatements(
    tx: Transaction,
    prepared: PreparedMigration,
    token?: string,
    signal?: AbortSignal,
  ): Promise<number> {
    if (signal?.aborted) throw new RunAborted("statement", signal.reason);
    const { migration, statements } = prepared;
    const timeoutMs = this.#timeoutMs();
    const timeouts = [`${this.#lockTimeoutMs}ms`, `${this.#statementTimeoutMs ?? 0}ms`];
    // Everything is sent at once and pipelined on the connection: one round trip for the
    // whole file. The first statement that fails is the one reported; the server answers
    // every later one with 25P02, and the transaction rolls back. The history row measures
    // the time since BEGIN on the server (now() is the transaction's start).
    const start = performance.now();
    const saved = tx.execute(SAVE_SETTINGS_SQL);
    const settings = token === undefined
      ? tx.execute(
        "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
        timeouts,
      )
      : tx.execute(SESSION_GUARD_SQL, [...this.#lockKey(), token, ...timeouts]);
    const searchPath = this.#searchPath();
    const path = searchPath === undefined
      ? Promise.resolve(undefined)
      : tx.execute("SELECT pg_catalog.set_config('search_path', $1, true)", [searchPath]);
    // A COPY … FROM STDIN streams its data block once everything before it has answered;
    // the statements after it are pipelined again.
    let sent: { statement: SqlStatement; result: Promise<unknown> }[] = [];
    const settle = async (tail: Promise<unknown>[]): Promise<PromiseSettledResult<unknown>[]> => {
      const [head, answers, ends] = await Promise.all([
        Promise.allSettled([saved, settings, path]),
        Promise.allSettled(sent.map((s) => s.result)),
        Promise.allSettled(tail),
      ]);
      const [save, first, pathSet] = head;
      if (save.status === "rejected") throw save.reason;
      if (first.status === "rejected") {
        const lost = token !== undefined && first.reason instanceof QueryError &&
          first.reason.sqlstate === "22012";
        throw lost ? this.#sessionLost() : first.reason;
      }
      if (pathSet.status === "rejected") throw pathSet.reason;
      answers.forEach((answer, i) => {
        if (answer.status === "rejected") {
          throw new StatementFailure(answer.reason, sent[i].statement, []);
        }
      });
      sent = [];
      return ends;
    };
    for (const statement of statements) {
      if (statement.copyData === undefined) {
        sent.push({ statement, result: tx.execute(statement.text, [], { timeoutMs, signal }) });
        continue;
      }
      await settle([]);
      if (signal?.aborted) {
        throw new StatementFailure(new RunAborted("statement", signal.reason), statement, []);
      }
      await this.#copy(tx, statement, signal);
    }
    const history = tx.execute(
      `INSERT INTO ${this.#tableRef()} (filename, checksum, module_name, execution_time_ms) ` +
        "VALUES ($1, $2, $3, greatest(1, pg_catalog.round(extract(epoch FROM " +
        "pg_catalog.clock_timestamp() - pg_catalog.now()) * 1000))::int)",
      [migration.filename, migration.checksum, this.#module],
    );
    const restored = tx.execute(RESTORE_SETTINGS_SQL);
    const [last, put] = await settle([history, restored]);
    if (last.status === "rejected") throw last.reason;
    if (put.status === "rejected") throw put.reason;
    return Math.max(1, Math.round(performance.now() - start));
  }

  async #runAutocommit(
    conn: Connection,
    prepared: PreparedMigration,
    signal?: AbortSignal,
  ): Promise<number> {
    const { migration, statements } = prepared;
    const timeoutMs = this.#timeoutMs();
    // Settings the file changes (its own SET, and the timeouts below) end with the file.
    const saved = await sessionSettings(conn);
    const invalidBefore = new Set(await this.#invalidIndexes(conn));
    const start = performance.now();
    let current: string | undefined;
    try {
      await conn.execute("SELECT pg_catalog.set_config('statement_timeout', $1, false)", [
        `${this.#statementTimeoutMs ?? 0}ms`,
      ]);
      const searchPath = this.#searchPath();
      if (searchPath !== undefined) {
        await conn.execute("SELECT pg_catalog.set_config('search_path', $1, false)", [searchPath]);
      }
      for (const statement of statements) {
        if (signal?.aborted) {
          throw new StatementFailure(new RunAborted("statement", signal.reason), statement, []);
        }
        const lockTimeout = CONCURRENTLY.test(statement.text) ? "0" : `${this.#lockTimeoutMs}ms`;
        if (lockTimeout !== current) {
          await conn.execute("SELECT set_config('lock_timeout', $1, false)", [lockTimeout]);
          current = lockTimeout;
        }
        try {
          if (statement.copyData === undefined) {
            await conn.execute(statement.text, [], { timeoutMs, signal });
          } else {
            await this.#copy(conn, statement, signal);
          }
        } catch (error) {
          if (error instanceof StatementFailure) throw error;
          const after = await this.#invalidIndexes(conn).catch(() => [] as string[]);
          throw new StatementFailure(error, statement, after.filter((i) => !invalidBefore.has(i)));
        }
      }
    } finally {
      await restoreSessionSettings(conn, saved).catch(() => {});
    }
    const executionTimeMs = Math.max(1, Math.round(performance.now() - start));
    await conn.execute(
      `INSERT INTO ${this.#tableRef()} (filename, checksum, module_name, execution_time_ms) ` +
        `VALUES ($1, $2, $3, $4)`,
      [migration.filename, migration.checksum, this.#module, executionTimeMs],
    );
    return executionTimeMs;
  }

  /**
   * Runs a `COPY … FROM STDIN` statement of a migration with its data block from the file,
   * streamed through the driver's COPY, as `psql -f` feeds it. When `signal` aborts, the
   * data stops and the COPY fails (the server rolls it back).
   */
  async #copy(q: Queries, statement: SqlStatement, signal?: AbortSignal): Promise<void> {
    const copy = this.#copiers.get(q);
    if (copy === undefined) {
      throw new StatementFailure(
        new MigrationError(
          "Cannot run a COPY … FROM STDIN of a migration on this connection: run it with " +
            "applyPending() or applyMigration()",
          this.#details(undefined, statement.line),
        ),
        statement,
        [],
      );
    }
    try {
      await copy(q.prepareQuery(statement.text), statement.copyData ?? "", signal);
    } catch (error) {
      throw new StatementFailure(error, statement, []);
    }
  }

  async #invalidIndexes(q: Queries): Promise<string[]> {
    const rows = await q.fetchAll<{ name: string }>(
      `SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) AS name
         FROM pg_catalog.pg_index i
         JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT i.indisvalid AND n.nspname = $1`,
      [this.#db.schema ?? "public"],
    );
    return rows.map((row) => row.name);
  }

  /** Adds the module and schema to a MigrationError thrown by a helper. */
  #decorate(error: unknown): unknown {
    if (!(error instanceof MigrationError) || error.module !== undefined) return error;
    return new MigrationError(
      error.message,
      this.#details(error.filename, error.line),
      { cause: error.cause },
    );
  }

  #failed(error: unknown, migration: Migration, partial: MigrationResult | undefined): unknown {
    if (error instanceof MigrationError) {
      if (partial === undefined || error.partialResult !== undefined) return this.#decorate(error);
      partial.failure = { filename: migration.filename, line: error.line, message: error.message };
      return new MigrationError(
        error.message,
        this.#details(error.filename ?? migration.filename, error.line, partial),
        { cause: error.cause },
      );
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
    const retried = cause instanceof QueryError && RETRYABLE.has(sqlstate ?? "")
      ? ` after ${this.#lockRetries + 1} attempts (raise 'lockTimeoutMs' or 'lockRetries', ` +
        `or run it when the tables are less busy)`
      : "";
    return new MigrationError(
      `Cannot apply migration '${migration.filename}' of module '${this.#module}'` +
        `${this.#where()}: the statement${where} failed${retried}: ${serverMessage}${state}` +
        `${invalid}${undone}`,
      this.#details(migration.filename, line, partial),
      { cause },
    );
  }
}

/** A manager or connection: query methods and `transaction()`. */
type Transactional = Queries & {
  transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T>;
};

interface PreparedMigration {
  migration: Migration;
  statements: SqlStatement[];
}

/** One `applyPending()` run: its abort signal, and what an abort report needs. */
interface RunState {
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
class RunAborted extends Error {
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
class RunStopped extends Error {
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

/** A statement of a migration failed; carries which one. */
class StatementFailure extends Error {
  constructor(
    override readonly cause: unknown,
    readonly statement: SqlStatement,
    readonly invalidIndexes: string[],
  ) {
    super(cause instanceof Error ? cause.message : String(cause));
  }
}

/**
 * Streams a COPY data block with `sql` (`COPY … FROM STDIN`); resolves with the row count.
 * Stops sending when `signal` aborts, which fails the COPY with a `RunAborted`.
 */
type CopyIn = (sql: string, data: string, signal?: AbortSignal) => Promise<number>;

/** COPY on a leased connection, the data in chunks of 64 KiB. */
function copier(lease: Lease): CopyIn {
  return (sql, data, signal) =>
    lease.copyIn(
      sql,
      (async function* () {
        for (let i = 0; i < data.length; i += 65536) {
          if (signal?.aborted) throw new RunAborted("statement", signal.reason);
          yield data.slice(i, i + 65536);
        }
      })(),
    );
}

/** Settings changed by `SET` in this session (not those sent when connecting). */
async function sessionSettings(conn: Queries): Promise<Map<string, string>> {
  const rows = await conn.fetchAll<{ name: string; setting: string }>(
    "SELECT name, setting FROM pg_catalog.pg_settings " +
      "WHERE source = 'session' AND name <> 'pgdbm.saved_settings'",
  );
  return new Map(rows.map((row) => [row.name, row.setting]));
}

/** Puts the session's settings back as `before` had them. */
async function restoreSessionSettings(
  conn: Queries,
  before: Map<string, string>,
): Promise<void> {
  const after = await sessionSettings(conn);
  const names: string[] = [];
  const values: (string | null)[] = [];
  for (const [name, value] of after) {
    if (before.get(name) !== value) {
      names.push(name);
      values.push(before.get(name) ?? null);
    }
  }
  for (const [name, value] of before) {
    if (!after.has(name)) {
      names.push(name);
      values.push(value);
    }
  }
  if (names.length === 0) return;
  // set_config(name, NULL, false) is RESET name.
  await conn.execute(
    "SELECT pg_catalog.set_config(n, v, false) " +
      "FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) AS s(n, v)",
    [names, values],
  );
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

function isMissingTable(error: unknown): boolean {
  return error instanceof QueryError && (error.sqlstate === "42P01" || error.sqlstate === "3F000");
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

/** Waits `ms`, or less when `signal` aborts. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, Math.max(0, ms));
    signal?.addEventListener("abort", done, { once: true });
  });
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
