/**
 * Errors that say what to do: the checks made on a query's parameters before it is sent,
 * and the server errors whose bare text does not name the cause pgdbm knows (a parameter
 * count that does not match the SQL, `lockTimeoutMs`, the `RETURNING id` that
 * `executeAndReturnId()` appends). Each rewritten error stays a {@link QueryError} with the
 * server's SQLSTATE and fields; only its message says more. These run only on the failure
 * path, so a query that succeeds costs nothing more.
 *
 * @module
 */

import { parameterCount } from "./_sql.ts";
import type { ResolvedConfig } from "./config.ts";
import { QueryError } from "./errors.ts";

const PARAMETER_COUNT_STATES = new Set(["42P18", "08P01", "42P02"]);
const PARAMETER_COUNT_MESSAGE =
  /could not determine data type of parameter|^bind message supplies|^there is no parameter/;

/**
 * Refuses an `undefined` parameter before anything is sent: the network driver refuses it while
 * PGlite sends NULL, and a missing property (`user.nmae`) stored as NULL is a bug more often
 * than an intent.
 *
 * @param params The parameters.
 * @throws {TypeError} Naming the first `$n` that is `undefined`, and saying to pass `null`.
 */
export function refuseUndefinedParams(params: readonly unknown[]): void {
  if (!Array.isArray(params)) {
    throw new TypeError(
      `Cannot run the query: 'params' must be an array of values for $1…$n, got ${typeof params}`,
    );
  }
  for (let i = 0; i < params.length; i++) {
    if (params[i] === undefined) {
      throw new TypeError(
        `Cannot run the query: parameter $${i + 1} is undefined; pass null for SQL NULL ` +
          "(undefined is refused so that a missing value is not stored as NULL by mistake)",
      );
    }
  }
}

/**
 * The error to hand out for a failed statement: `error` itself, or a {@link QueryError}
 * with the same fields whose message also names what pgdbm knows about the cause.
 *
 * @param error What the statement rejected with.
 * @param sql The expanded SQL that was sent.
 * @param params The parameters as given.
 * @param config The pool's configuration (for `lockTimeoutMs`), when known.
 * @returns The error to throw.
 */
export function adviseQueryError(
  error: unknown,
  sql: string,
  params: readonly unknown[],
  config: ResolvedConfig | undefined,
): unknown {
  if (!(error instanceof QueryError)) return error;
  const state = error.sqlstate ?? "";
  if (PARAMETER_COUNT_STATES.has(state) && PARAMETER_COUNT_MESSAGE.test(error.message)) {
    const used = parameterCount(sql);
    if (used === params.length) return error;
    const uses = used === 0
      ? "no parameters"
      : used === 1
      ? "1 parameter ($1)"
      : `${used} parameters ($1 to $${used})`;
    const given = params.length === 1 ? "1 value was" : `${params.length} values were`;
    return rewritten(
      error,
      params,
      `Cannot run the query: the SQL uses ${uses} but ${given} given; pass one value per $n ` +
        `(the server said: ${error.message})`,
    );
  }
  const lockTimeout = config?.serverSettings.lock_timeout;
  if (state === "55P03" && /lock timeout/.test(error.message) && lockTimeout !== undefined) {
    const shown = /^[0-9]+$/.test(lockTimeout) ? `${lockTimeout} ms` : lockTimeout;
    return rewritten(
      error,
      params,
      `${error.message}: the statement waited for a lock another transaction holds longer ` +
        `than lock_timeout, which pgdbm sets from lockTimeoutMs (the pool's: ${shown}; a ` +
        "Migrator's own for migrations). Raise lockTimeoutMs in the pool's config (null keeps " +
        "the server's lock_timeout), or run SET LOCAL lock_timeout = '30s' inside the " +
        "transaction that waits",
    );
  }
  return error;
}

/**
 * The error for a failed `executeAndReturnId()` whose `RETURNING id` pgdbm appended: a
 * table without an `id` column says so, with what to write instead.
 *
 * @param error What the statement rejected with.
 * @param params The parameters as given.
 * @returns The error to throw.
 */
export function adviseReturningId(error: unknown, params: readonly unknown[]): unknown {
  if (
    !(error instanceof QueryError) || error.sqlstate !== "42703" ||
    !/column "id" does not exist/.test(error.message)
  ) {
    return error;
  }
  return rewritten(
    error,
    params,
    `${error.message}: executeAndReturnId() appended RETURNING id to the statement, and the ` +
      "table has no id column. Write your own RETURNING clause (executeAndReturnId() then " +
      'returns its first column), or use fetchOne("INSERT … RETURNING your_key")',
  );
}

/** A copy of `error` with another message: the same SQL, fields and cause. */
function rewritten(error: QueryError, params: readonly unknown[], message: string): QueryError {
  return new QueryError(message, error.sql, params, {
    sqlstate: error.sqlstate,
    severity: error.severity,
    detail: error.detail,
    hint: error.hint,
    position: error.position,
    schemaName: error.schemaName,
    table: error.table,
    column: error.column,
    constraint: error.constraint,
  }, error.cause === undefined ? undefined : { cause: error.cause });
}
