/**
 * `lock: "transaction"`: no session lock. Each attempt at a migration is one transaction
 * that first takes `pg_try_advisory_xact_lock` on the (schema, module) key (polled, one
 * short transaction per try), then reads that file's history row and skips the file when
 * another process applied it meanwhile, then applies it with its history row and commits,
 * which releases the lock. A transaction runs on one server connection, so a pooler in
 * transaction mode cannot split it. Files with `-- pgdbm:no-transaction` are refused.
 *
 * @module
 */

import type { DatabaseManager } from "../manager.ts";
import type { Applier } from "./_apply.ts";
import type { PreparedMigration, RunState } from "./_failure.ts";
import type { History } from "./_history.ts";
import {
  type LockContext,
  lockKey,
  type LockScope,
  type MigrationLock,
  pollForLock,
} from "./_lock.ts";
import type { MigrationLockMode } from "./types.ts";

/** A transaction advisory lock in each migration's transaction. */
export class TransactionLock implements MigrationLock {
  /** `"transaction"`. */
  readonly mode: MigrationLockMode = "transaction";
  /** Outside a transaction, a transaction lock keeps nobody out. */
  readonly allowsNoTransaction = false;
  readonly #db: DatabaseManager;
  readonly #context: LockContext;
  readonly #history: History;
  readonly #applier: Applier;

  /**
   * @param db The manager (on the primary), where the history is read.
   * @param context The migrator's module, schema, lock settings, errors and events.
   * @param history The history table.
   * @param applier Runs the statements, and leases each transaction's connection.
   */
  constructor(db: DatabaseManager, context: LockContext, history: History, applier: Applier) {
    this.#db = db;
    this.#context = context;
    this.#history = history;
    this.#applier = applier;
  }

  /** Creates the history table, then runs `fn`: each attempt takes the lock itself. */
  async hold<T>(fn: (scope: LockScope) => Promise<T>, _run?: RunState): Promise<T> {
    await this.#history.ensure(this.#db);
    return await fn({
      applied: () => this.#history.applied(this.#db),
      heldForRun: false,
      attempt: (prepared, attempt, whenApplied, signal) =>
        this.#attempt(prepared, attempt, whenApplied, signal),
    });
  }

  /** The lock lived in the migration's transaction, which rolled back. */
  abortClause(_run: RunState, lockHeld: boolean): string {
    return lockHeld ? ", and released the migration lock" : "";
  }

  /**
   * One attempt: a transaction that takes the lock (polling, one short transaction per
   * try), reads the file's history row — skips the file (`undefined`) or, for `refuse`,
   * fails when it is there, and refuses a drifted file — then applies it with its history
   * row, puts back session settings it changed with `SET`, and commits.
   */
  async #attempt(
    prepared: PreparedMigration,
    attempt: number,
    whenApplied: "skip" | "refuse",
    signal?: AbortSignal,
  ): Promise<number | undefined> {
    const { migration } = prepared;
    const context = this.#context;
    const outcome = await pollForLock(
      context,
      (taken) =>
        this.#applier.transaction(async (tx) => {
          const [, locked] = await Promise.all([
            // Each statement must see what committed before it: the lock comes first.
            tx.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED"),
            tx.fetchValue<boolean>(
              "SELECT pg_try_advisory_xact_lock(hashtext($1), hashtext($2))",
              lockKey(context),
            ),
          ]);
          if (locked !== true) return undefined;
          taken();
          const checksum = await this.#history.checksumOf(tx, migration.filename);
          if (checksum !== undefined) {
            if (checksum !== migration.checksum) {
              throw context.failures.drift([{
                filename: migration.filename,
                appliedChecksum: checksum,
                currentChecksum: migration.checksum,
              }]);
            }
            if (whenApplied === "refuse") throw context.failures.alreadyApplied(migration);
            return { executionTimeMs: undefined };
          }
          context.emit({ type: "apply_start", filename: migration.filename, attempt });
          const executionTimeMs = await this.#applier.inTransaction(
            tx,
            prepared,
            undefined,
            signal,
          );
          return { executionTimeMs };
        }),
      this.#db,
      signal,
    );
    return outcome.executionTimeMs;
  }
}
