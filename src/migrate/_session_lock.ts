/**
 * `lock: "session"`: one session advisory lock for the whole run, on one leased
 * connection. It is polled with `pg_try_advisory_lock`, never waited for with a blocking
 * `pg_advisory_lock`, whose open wait a `CREATE INDEX CONCURRENTLY` of the holder would wait
 * on in turn. The holding session is marked with the run's token, so that statements a
 * pooler in transaction mode ran on another server session are noticed (each migration's
 * transaction checks the mark, and the release is checked) instead of running unlocked.
 *
 * @module
 */

import { QueryError } from "../errors.ts";
import type { Connection, Transaction } from "../transaction.ts";
import { type Applier, restoreSettings, sessionSettings } from "./_apply.ts";
import type { PreparedMigration, RunState } from "./_failure.ts";
import type { History } from "./_history.ts";
import {
  type LockContext,
  lockKey,
  type LockScope,
  type MigrationLock,
  pollForLock,
} from "./_lock.ts";
import type { AppliedMigration, MigrationLockMode, MigrationResult } from "./types.ts";

/** What a try that took the lock read behind it. */
interface Taken {
  /** The session's own settings, with the lock's mark. */
  settings: Promise<Map<string, string>>;
  /** The history. */
  applied: Promise<AppliedMigration[] | undefined>;
}

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

/** One session advisory lock held for the whole run. */
export class SessionLock implements MigrationLock {
  /** `"session"`. */
  readonly mode: MigrationLockMode = "session";
  /** A session lock keeps other migrators out of autocommit statements too. */
  readonly allowsNoTransaction = true;
  readonly #context: LockContext;
  readonly #history: History;
  readonly #applier: Applier;

  /**
   * @param context The migrator's module, schema, lock settings, errors and events.
   * @param history The history table, created before the lock is taken.
   * @param applier Runs the statements, and leases the connection.
   */
  constructor(context: LockContext, history: History, applier: Applier) {
    this.#context = context;
    this.#history = history;
    this.#applier = applier;
  }

  /**
   * Runs `fn` on a leased connection that holds the lock, with the history table in place.
   * Session settings a migration changed with a plain `SET` (pg_dump files set
   * `search_path` to '', say) are put back before the connection returns to the pool, so
   * they never leak into the application's queries. A release that finds the lock held by
   * another session fails the run (reason `lost_lock_session`).
   */
  async hold<T>(fn: (scope: LockScope) => Promise<T>, run?: RunState): Promise<T> {
    return await this.#applier.acquire(async (conn) => {
      await this.#history.ensure(conn);
      const token = crypto.randomUUID();
      const { settings, applied } = await this.#lock(conn, token, run?.signal);
      if (run !== undefined) run.lock = "held";
      let before: Map<string, string> | undefined;
      let result: T;
      try {
        before = await settings;
        result = await fn(this.#scope(conn, token, before, applied));
      } catch (error) {
        const released = await this.#release(conn, token, before);
        if (run !== undefined) run.lock = released ? "released" : "unknown";
        throw error;
      }
      if (!await this.#release(conn, token, before)) {
        throw this.#context.failures.sessionLost(isResult(result) ? result : undefined);
      }
      return result;
    });
  }

  /** `, and released the migration lock`, or that its release is not confirmed. */
  abortClause(run: RunState, _lockHeld: boolean): string {
    if (run.lock === "released") return ", and released the migration lock";
    if (run.lock === "unknown") {
      return ", and could not confirm that the migration lock was released: it is released " +
        "when its connection closes";
    }
    return "";
  }

  /**
   * Each attempt runs on the holding connection: a no-transaction file statement by
   * statement, any other file in a transaction whose first statement checks that it runs
   * in the session holding the lock. `before` is the session's own settings once the lock
   * was taken: each file puts them back, with no need to read them again.
   */
  #scope(
    conn: Connection,
    token: string,
    before: Map<string, string>,
    applied: Promise<AppliedMigration[] | undefined>,
  ): LockScope {
    const context = this.#context;
    const applier = this.#applier;
    const guard = (tx: Transaction, timeouts: [string, string]): Promise<unknown> =>
      tx.execute(SESSION_GUARD_SQL, [...lockKey(context), token, ...timeouts]).catch(
        (error: unknown) => {
          // The division by zero: this transaction runs in another server session.
          if (error instanceof QueryError && error.sqlstate === "22012") {
            throw context.failures.sessionLost();
          }
          throw error;
        },
      );
    return {
      applied: () => applied,
      heldForRun: true,
      attempt(prepared: PreparedMigration, attempt: number, _whenApplied, signal) {
        context.emit({ type: "apply_start", filename: prepared.migration.filename, attempt });
        return prepared.migration.noTransaction
          ? applier.autocommit(conn, prepared, signal)
          : applier.transactionOn(
            conn,
            (tx) => applier.inTransaction(tx, prepared, guard, signal, before),
          );
      },
    };
  }

  /**
   * Takes the lock on `conn`, marking the server session with `token` in the same statement.
   * The session's own settings and the history are read in the same round trip, behind the
   * lock's statement: once it is taken, they were read under it; a try that did not take
   * it drops them.
   */
  async #lock(conn: Connection, token: string, signal?: AbortSignal): Promise<Taken> {
    return await pollForLock(
      this.#context,
      async (taken) => {
        const state = conn.fetchValue<string | null>(SESSION_LOCK_SQL, [
          ...lockKey(this.#context),
          token,
        ]);
        const read: Taken = {
          settings: sessionSettings(conn),
          applied: this.#history.appliedInEnsured(conn),
        };
        // Whoever awaits them later sees their errors; none is left unhandled meanwhile.
        const reads = Promise.allSettled([read.settings, read.applied]);
        let got: string | null;
        try {
          got = await state;
        } finally {
          await reads;
        }
        if (got === null) return undefined;
        if (got !== token) throw this.#context.failures.sharedSession();
        taken();
        return read;
      },
      conn,
      signal,
    );
  }

  /**
   * Puts back the session's settings as `before` has them (when read), then releases the
   * lock; `false` when this session did not hold the lock. The release waits for the
   * restore: sent together through PgBouncer in transaction mode, the pair changed which
   * server session the release reached, and a leaked lock went unreported
   * (tests/pool/pgbouncer_test.ts).
   */
  async #release(conn: Connection, token: string, before?: Map<string, string>): Promise<boolean> {
    if (before !== undefined) await restoreSettings(conn, before).catch(() => {});
    return await this.#unlock(conn, token);
  }

  /** Releases the lock; `false` when this session did not hold it (a pooler moved us). */
  async #unlock(conn: Connection, token: string): Promise<boolean> {
    const unlock = () =>
      conn.fetchValue<boolean>(SESSION_UNLOCK_SQL, [...lockKey(this.#context), token]);
    // A cancel aimed at a migration statement that arrived late fails this statement
    // (57014) on a healthy session: try again. Any other failure means the connection is
    // broken, and its session (and lock) ends with it.
    const released = await unlock().catch((error) =>
      error instanceof QueryError && error.sqlstate === "57014" ? unlock() : true
    ).catch(() => true);
    return released === true;
  }
}

/** Whether a run's value is a `MigrationResult` (reported with a lost lock). */
function isResult(value: unknown): value is MigrationResult {
  return typeof value === "object" && value !== null && "status" in value && "applied" in value;
}
