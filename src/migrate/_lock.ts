/**
 * How a migrator keeps the other migrators of its (schema, module) out: one small
 * interface, two strategies (`_session_lock.ts`, `_transaction_lock.ts`), and what they
 * share — the lock's key, polling for it with jittered backoff, and who holds it.
 *
 * The key, which any tool taking the same lock shares:
 *
 * ```sql
 * SELECT pg_try_advisory_lock(hashtext('pgdbm_migration_' || module), hashtext(schema));
 * ```
 *
 * @module
 */

import type { Queries } from "../queries.ts";
import { pollUntilTaken } from "../_backoff.ts";
import type { Failures, PreparedMigration, RunState } from "./_failure.ts";
import { RunAborted } from "./_failure.ts";
import type { AppliedMigration, MigrationEvent, MigrationLockMode } from "./types.ts";

/** A lock strategy: holds the (schema, module) lock around a run's migrations. */
export interface MigrationLock {
  /** Which strategy this is. */
  readonly mode: MigrationLockMode;
  /**
   * Whether `-- pgdbm:no-transaction` files can be applied under this lock (outside a
   * transaction only a session lock keeps other migrators out).
   */
  readonly allowsNoTransaction: boolean;
  /**
   * Runs `fn` with the history table in place and the lock strategy ready: for a session
   * lock, held for all of `fn`; for a transaction lock, taken by each attempt. `run` (of
   * `applyPending()`) carries the abort signal and records what became of the lock.
   */
  hold<T>(fn: (scope: LockScope) => Promise<T>, run?: RunState): Promise<T>;
  /**
   * What became of the lock, for the report of an aborted run (such as `, and released
   * the migration lock`); `lockHeld`: whether the run held it when it stopped.
   */
  abortClause(run: RunState, lockHeld: boolean): string;
}

/** What a lock strategy gives a run while it holds the lock (see {@link MigrationLock.hold}). */
export interface LockScope {
  /**
   * The history rows that count for the module (`undefined` while the table does not
   * exist): for a session lock, read under the lock, in the same round trip that took it.
   * Called once per {@link MigrationLock.hold}.
   */
  applied(): Promise<AppliedMigration[] | undefined>;
  /**
   * Whether the lock is held for the whole run, so the history from `applied()` stays
   * true until the run ends. When it is not, each attempt reads its file's row again.
   */
  readonly heldForRun: boolean;
  /**
   * One attempt at a migration: its run time, or `undefined` when another process applied
   * it meanwhile (`whenApplied: "skip"`; `"refuse"` fails instead).
   */
  attempt(
    prepared: PreparedMigration,
    attempt: number,
    whenApplied: "skip" | "refuse",
    signal?: AbortSignal,
  ): Promise<number | undefined>;
}

/** What a lock strategy needs of its migrator. */
export interface LockContext {
  /** The schema, or `undefined` (the key then uses `public`). */
  readonly schema?: string;
  /** The module. */
  readonly module: string;
  /** How long to wait for another run before failing. */
  readonly waitTimeoutMs: number;
  /** The longest pause between two tries. */
  readonly pollMaxMs: number;
  /** Builds the errors. */
  readonly failures: Failures;
  /** Reports progress. */
  emit(event: MigrationEvent): void;
}

/** The two keys of the lock: `hashtext` of each is taken on the server. */
export function lockKey(context: LockContext): [string, string] {
  return [`pgdbm_migration_${context.module}`, context.schema ?? "public"];
}

/**
 * Calls `attempt` until it takes the lock (returns a value), pausing with jittered,
 * doubling delays (up to `pollMaxMs`); `lock_wait` is sent before the first pause.
 * `attempt` calls `taken()` the moment it holds the lock. Stops (throws `RunAborted`) when
 * `signal` aborts; fails with reason `lock_timeout` after `waitTimeoutMs`.
 */
export async function pollForLock<T>(
  context: LockContext,
  attempt: (taken: () => void) => Promise<T | undefined>,
  q: Queries,
  signal?: AbortSignal,
): Promise<T> {
  const start = performance.now();
  const schema = context.schema ?? null;
  const { module } = context;
  const taken = (): void =>
    context.emit({ type: "lock_acquired", schema, module, waitedMs: performance.now() - start });
  let reported = false;
  return await pollUntilTaken(() => attempt(taken), {
    initialMs: 25,
    maxMs: context.pollMaxMs,
    timeoutMs: context.waitTimeoutMs,
    signal,
    onWait: async () => {
      reported = true;
      const holder = await lockHolder(context, q);
      context.emit({
        type: "lock_wait",
        schema,
        module,
        ...(holder === null ? {} : { holderPid: holder }),
      });
    },
    onTimeout: async (waited) => context.failures.lockTimeout(waited, await lockHolder(context, q)),
    onAbort: (reason) => new RunAborted("lock", reason, reported),
  });
}

/** The server process holding the (schema, module) lock, or `null` (none, or unreadable). */
async function lockHolder(context: LockContext, q: Queries): Promise<number | null> {
  return await q.fetchValue<number>(
    `SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
         AND l.objsubid = 2
         AND l.classid = oid(hashtext($1)::bigint & 4294967295)
         AND l.objid = oid(hashtext($2)::bigint & 4294967295)
       LIMIT 1`,
    lockKey(context),
  ).catch(() => null);
}
