/**
 * Running a migration's statements: in one transaction with its history row (pipelined:
 * one round trip for the file), statement by statement for a `-- pgdbm:no-transaction`
 * file (naming an INVALID index a failure left), `COPY … FROM stdin` with its data block,
 * and the retries after a lock timeout or deadlock. Which lock is held is not its concern:
 * a lock strategy (`_lock.ts`) calls it, and may add a guard to a transaction's first
 * statement.
 *
 * @module
 */

import type { DatabaseManager } from "../manager.ts";
import { QueryError } from "../errors.ts";
import type { ConnectionPool, Lease } from "../pool/pool.ts";
import type { Queries } from "../queries.ts";
import { backoffDelay, sleep } from "../_backoff.ts";
import { mentionsConcurrently, splitSqlStatements, type SqlStatement } from "../_sql.ts";
import { quoteIdentifier } from "../template.ts";
import { Connection, LeaseRunner, runTransaction, type Transaction } from "../transaction.ts";
import { refusePsqlCommands, transactionalBody } from "./_files.ts";
import {
  type Failures,
  type PreparedMigration,
  RETRYABLE,
  RunAborted,
  StatementFailure,
} from "./_failure.ts";
import { type History, quoteLiteral } from "./_history.ts";
import type { AppliedMigrationResult, Migration, MigrationEvent } from "./types.ts";

/** The longest timer `setTimeout` takes: the client-side timeout of an unlimited statement. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** The longest pause between two attempts at a migration. */
const MAX_RETRY_DELAY_MS = 30_000;

/**
 * Saves the session's own settings (those set with `SET`) in the transaction, before a
 * migration's statements run; {@link RESTORE_SAVED_SQL} puts them back after them. Both
 * are pipelined with the file, so this costs no round trip. Only needed when the caller
 * does not know the session's settings already (see {@link Applier.inTransaction}'s
 * `baseline`): reading `pg_settings` costs the server about half a millisecond.
 */
const SAVE_SETTINGS_SQL = "SELECT pg_catalog.set_config('pgdbm.saved_settings', " +
  "coalesce((SELECT pg_catalog.json_object_agg(name, setting) FROM pg_catalog.pg_settings " +
  "WHERE source = 'session' AND name <> 'pgdbm.saved_settings'), '{}')::text, true)";

/**
 * Puts back, as session values, the settings in `saved` (an SQL expression of a JSON object
 * of name → value): a plain `SET` in a migration (pg_dump's `search_path` of '', say) would
 * otherwise outlive the file and reach the next one and the application's queries.
 * `set_config(name, NULL, false)` is RESET.
 */
function restoreSettingsSql(saved: string): string {
  return `SELECT pg_catalog.count(pg_catalog.set_config(n, v, false))
FROM (SELECT coalesce(now.name, was.key) AS n, was.value AS v
  FROM (SELECT name, setting FROM pg_catalog.pg_settings
        WHERE source = 'session' AND name <> 'pgdbm.saved_settings') AS now
  FULL JOIN pg_catalog.json_each_text(coalesce(${saved}, '{}')::json) AS was
    ON was.key = now.name
  WHERE now.setting IS DISTINCT FROM was.value) AS changed`;
}

/** Puts back the settings {@link SAVE_SETTINGS_SQL} saved in the transaction. */
const RESTORE_SAVED_SQL = restoreSettingsSql(
  "pg_catalog.current_setting('pgdbm.saved_settings', true)",
);

/**
 * Each migration's split statements, with the text and mode they were split from (see
 * {@link Applier.prepare}).
 */
const preparedCache = new WeakMap<
  Migration,
  { content: string; noTransaction: boolean; prepared: PreparedMigration }
>();

/** The migrator's settings for running statements. */
export interface ApplySettings {
  /** `lock_timeout` of migration statements. */
  readonly lockTimeoutMs: number;
  /** Retries after a lock timeout or deadlock. */
  readonly lockRetries: number;
  /** Delay before the first retry. */
  readonly lockRetryDelayMs: number;
  /** `statement_timeout` of migration statements (`null`: none). */
  readonly statementTimeoutMs: number | null;
}

/**
 * The first statement of a migration's transaction: it sets the two timeouts (as
 * `set_config` values, `lock_timeout` then `statement_timeout`) with `SET LOCAL` scope. A
 * lock strategy may pass its own, which also checks the lock (its failure is the run's).
 */
export type TransactionGuard = (tx: Transaction, timeouts: [string, string]) => Promise<unknown>;

/** The default {@link TransactionGuard}: only the timeouts. */
function setTimeouts(tx: Transaction, timeouts: [string, string]): Promise<unknown> {
  return tx.execute(
    "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
    timeouts,
  );
}

/**
 * Streams a COPY data block with `sql` (`COPY … FROM STDIN`); resolves with the row count.
 * Stops sending when `signal` aborts, which fails the COPY with a `RunAborted`.
 */
type CopyIn = (sql: string, data: string, signal?: AbortSignal) => Promise<number>;

/** Runs the statements of one migrator's migrations on the connections it is given. */
export class Applier {
  readonly #db: DatabaseManager;
  readonly #history: History;
  readonly #settings: ApplySettings;
  readonly #failures: Failures;
  readonly #emit: (event: MigrationEvent) => void;
  /** How to run `COPY … FROM STDIN` with data on the connection of a migration's queries. */
  readonly #copiers = new WeakMap<Queries, CopyIn>();

  /**
   * @param db The manager (on the primary) whose pool and schema migrations run with.
   * @param history Where applied migrations are recorded.
   * @param settings Timeouts and retries.
   * @param failures Builds the errors.
   * @param emit Reports progress.
   */
  constructor(
    db: DatabaseManager,
    history: History,
    settings: ApplySettings,
    failures: Failures,
    emit: (event: MigrationEvent) => void,
  ) {
    this.#db = db;
    this.#history = history;
    this.#settings = settings;
    this.#failures = failures;
    this.#emit = emit;
  }

  /**
   * Splits a migration as `psql -f` reads it; refuses psql commands it cannot run. The
   * split is kept with the migration object, which a fleet shares between its schemas.
   */
  prepare(migration: Migration): PreparedMigration {
    const known = preparedCache.get(migration);
    if (known?.content === migration.content && known.noTransaction === migration.noTransaction) {
      return known.prepared;
    }
    const content = migration.content.replace(/^\ufeff/, "");
    try {
      const statements = migration.noTransaction
        ? splitSqlStatements(content)
        : transactionalBody(content, migration.filename).statements;
      refusePsqlCommands(statements, migration.filename);
      const prepared = { migration, statements };
      preparedCache.set(migration, {
        content: migration.content,
        noTransaction: migration.noTransaction,
        prepared,
      });
      return prepared;
    } catch (error) {
      throw this.#failures.decorate(error);
    }
  }

  /**
   * Runs `attempt` (one attempt at a migration: its run time, or `undefined` when it turned
   * out applied already), retrying it after a lock timeout or deadlock with growing,
   * jittered delays; the wait before a retry ends when `signal` aborts.
   */
  async withRetries(
    prepared: PreparedMigration,
    attempt: (attempt: number) => Promise<number | undefined>,
    signal?: AbortSignal,
  ): Promise<AppliedMigrationResult | undefined> {
    const { filename } = prepared.migration;
    const { lockRetries, lockRetryDelayMs } = this.#settings;
    let n = 1;
    while (true) {
      try {
        const executionTimeMs = await attempt(n);
        if (executionTimeMs === undefined) return undefined;
        this.#emit({ type: "applied", filename, executionTimeMs });
        return { filename, executionTimeMs, attempts: n };
      } catch (error) {
        const cause = error instanceof StatementFailure ? error.cause : error;
        const retryable = cause instanceof QueryError && RETRYABLE.has(cause.sqlstate ?? "") &&
          !(error instanceof StatementFailure && error.invalidIndexes.length > 0);
        if (!retryable || n > lockRetries) throw error;
        const delayMs = backoffDelay(n, {
          initialMs: lockRetryDelayMs,
          maxMs: MAX_RETRY_DELAY_MS,
          jitter: true,
        });
        this.#emit({
          type: "retry",
          filename,
          attempt: n,
          delayMs,
          message: (cause as QueryError).message,
        });
        await sleep(delayMs, signal);
        if (signal?.aborted) throw new RunAborted("retry", signal.reason);
        n++;
      }
    }
  }

  /**
   * `manager.acquire()`, keeping the lease, so that a migration's `COPY … FROM STDIN` can
   * stream its data block on the connection.
   */
  async acquire<T>(fn: (conn: Connection) => Promise<T>): Promise<T> {
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

  /** `manager.transaction()`, keeping the lease (see {@link Applier.acquire}). */
  async transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T> {
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

  /** A transaction on `conn` (from {@link Applier.acquire}), where COPY streams too. */
  async transactionOn<T>(conn: Connection, fn: (tx: Transaction) => Promise<T>): Promise<T> {
    return await conn.transaction((tx) => {
      const copy = this.#copiers.get(conn);
      if (copy !== undefined) this.#copiers.set(tx, copy);
      return fn(tx);
    });
  }

  /**
   * Runs a migration's statements and its history row in `tx`, `guard` first (the
   * timeouts, and what the lock strategy checks). When `signal` aborts, the statement
   * running is cancelled on the server (the transaction then rolls back). Session settings
   * the file changed with a plain `SET` (which would outlive the transaction) are put back
   * before it commits: to `baseline` when given (the session's own settings, which a lock
   * held for the whole run read once), else to those read in the transaction before the
   * file's statements.
   *
   * @returns The run time in milliseconds (at least 1).
   */
  async inTransaction(
    tx: Transaction,
    prepared: PreparedMigration,
    guard: TransactionGuard = setTimeouts,
    signal?: AbortSignal,
    baseline?: Map<string, string>,
  ): Promise<number> {
    if (signal?.aborted) throw new RunAborted("statement", signal.reason);
    const { migration, statements } = prepared;
    const timeoutMs = this.#timeoutMs();
    const { lockTimeoutMs, statementTimeoutMs } = this.#settings;
    // Everything is sent at once and pipelined on the connection: one round trip for the
    // whole file. The first statement that fails is the one reported; the server answers
    // every later one with 25P02, and the transaction rolls back. The history row measures
    // the time since BEGIN on the server (now() is the transaction's start).
    const start = performance.now();
    const saved = baseline === undefined ? tx.execute(SAVE_SETTINGS_SQL) : undefined;
    const settings = guard(tx, [`${lockTimeoutMs}ms`, `${statementTimeoutMs ?? 0}ms`]);
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
      for (const answer of head) if (answer.status === "rejected") throw answer.reason;
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
    const history = this.#history.recordInTransaction(tx, migration);
    const restored = restoreSettings(tx, baseline);
    const [last, put] = await settle([history, restored]);
    if (last.status === "rejected") throw last.reason;
    if (put.status === "rejected") throw put.reason;
    return Math.max(1, Math.round(performance.now() - start));
  }

  /**
   * Runs a `-- pgdbm:no-transaction` file statement by statement in autocommit on `conn`,
   * then writes its history row. `CONCURRENTLY` statements run without `lock_timeout`; a
   * statement that fails names the INVALID indexes it left. Settings the file changed end
   * with it.
   *
   * @returns The run time in milliseconds (at least 1).
   */
  async autocommit(
    conn: Connection,
    prepared: PreparedMigration,
    signal?: AbortSignal,
  ): Promise<number> {
    const { migration, statements } = prepared;
    const timeoutMs = this.#timeoutMs();
    const { lockTimeoutMs, statementTimeoutMs } = this.#settings;
    // Settings the file changes (its own SET, and the timeouts below) end with the file.
    const saved = await sessionSettings(conn);
    const invalidBefore = new Set(await this.#invalidIndexes(conn));
    const start = performance.now();
    let current: string | undefined;
    try {
      await conn.execute("SELECT pg_catalog.set_config('statement_timeout', $1, false)", [
        `${statementTimeoutMs ?? 0}ms`,
      ]);
      const searchPath = this.#searchPath();
      if (searchPath !== undefined) {
        await conn.execute("SELECT pg_catalog.set_config('search_path', $1, false)", [searchPath]);
      }
      for (const statement of statements) {
        if (signal?.aborted) {
          throw new StatementFailure(new RunAborted("statement", signal.reason), statement, []);
        }
        // CONCURRENTLY waits do not block reads or writes, and a timeout would leave an
        // invalid index: such statements run without lock_timeout.
        const lockTimeout = mentionsConcurrently(statement.text) ? "0" : `${lockTimeoutMs}ms`;
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
      await restoreSettings(conn, saved).catch(() => {});
    }
    const executionTimeMs = Math.max(1, Math.round(performance.now() - start));
    await this.#history.record(conn, migration, executionTimeMs);
    return executionTimeMs;
  }

  /** The client-side timeout of a migration statement: `statementTimeoutMs` and 5 s. */
  #timeoutMs(): number {
    const { statementTimeoutMs } = this.#settings;
    return statementTimeoutMs === null || statementTimeoutMs === 0
      ? MAX_TIMER_MS
      : Math.min(statementTimeoutMs + 5000, MAX_TIMER_MS);
  }

  /**
   * The `search_path` a migration runs with: the manager's schema, then `public`, as Python
   * pgdbm runs it, so unqualified names in a file land where they did there. `undefined`
   * for a manager without a schema (the session's own `search_path` stays).
   */
  #searchPath(): string | undefined {
    const schema = this.#db.schema;
    return schema === undefined ? undefined : `${quoteIdentifier(schema)}, public`;
  }

  /**
   * Runs a `COPY … FROM STDIN` statement of a migration with its data block from the file,
   * streamed through the driver's COPY, as `psql -f` feeds it. When `signal` aborts, the
   * data stops and the COPY fails (the server rolls it back).
   */
  async #copy(q: Queries, statement: SqlStatement, signal?: AbortSignal): Promise<void> {
    const copy = this.#copiers.get(q);
    if (copy === undefined) {
      throw new StatementFailure(this.#failures.copyUnavailable(statement), statement, []);
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
}

/**
 * COPY on a leased connection, the data in chunks of 64 KiB. An abort stops the COPY on the
 * server, even while the server is busy on a row.
 */
function copier(lease: Lease): CopyIn {
  return async (sql, data, signal) => {
    try {
      return await lease.copyIn(sql, chunksOf(data), signal);
    } catch (error) {
      if (signal?.aborted && error === signal.reason) {
        throw new RunAborted("statement", signal.reason);
      }
      throw error;
    }
  };
}

async function* chunksOf(data: string): AsyncGenerator<string> {
  for (let i = 0; i < data.length; i += 65536) yield data.slice(i, i + 65536);
}

/** Settings changed by `SET` in this session (not those sent when connecting). */
export async function sessionSettings(conn: Queries): Promise<Map<string, string>> {
  const rows = await conn.fetchAll<{ name: string; setting: string }>(
    "SELECT name, setting FROM pg_catalog.pg_settings " +
      "WHERE source = 'session' AND name <> 'pgdbm.saved_settings'",
  );
  return new Map(rows.map((row) => [row.name, row.setting]));
}

/**
 * Puts the session's own settings back as `baseline` has them (read by
 * {@link sessionSettings}), in one statement that a caller can pipeline; without
 * `baseline`, as {@link SAVE_SETTINGS_SQL} saved them in the transaction.
 */
export function restoreSettings(q: Queries, baseline?: Map<string, string>): Promise<unknown> {
  if (baseline === undefined) return q.execute(RESTORE_SAVED_SQL);
  // A literal, not a parameter: as a simple query it needs no prepared statement, which a
  // pooler in transaction mode may have left on another server session.
  return q.execute(restoreSettingsSql(quoteLiteral(JSON.stringify(Object.fromEntries(baseline)))));
}
