/**
 * Opening one connection for the pool: the driver's session, then `initCommands` and the
 * pool's prepared statements, retried with exponential backoff while retrying can help.
 *
 * @module
 */

import { describeTarget, type ResolvedConfig } from "../config.ts";
import type { Driver, DriverConnection } from "../drivers/driver.ts";
import { ConnectionError, QueryError } from "../errors.ts";
import { backoffDelay, sleep } from "../_backoff.ts";
import { quoteIdentifier } from "../template.ts";

/** The SQL that prepares `sql` under `name` on a session. */
export function prepareStatement(name: string, sql: string): string {
  return `PREPARE ${quoteIdentifier(name)} AS ${sql}`;
}

/**
 * Opens a session ready for the pool, retrying per `config.retry`.
 *
 * @param driver The driver that opens sessions.
 * @param config The pool's configuration (`retry`, `initCommands`, the target).
 * @param prepared The pool's prepared statements, name → SQL.
 * @param stopped Whether the pool was closed meanwhile (no more attempts then).
 * @returns The session.
 * @throws {ConnectionError} After the last attempt, or at once when retrying cannot help
 *   (bad credentials, an unknown database).
 */
export async function connectWithRetry(
  driver: Driver,
  config: ResolvedConfig,
  prepared: ReadonlyMap<string, string>,
  stopped: () => boolean,
): Promise<DriverConnection> {
  const { attempts, delayMs, backoff, maxDelayMs } = config.retry;
  let lastError: unknown;
  let made = 0;
  let step = "";
  const at = (name: string) => step = name;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    made = attempt;
    try {
      return await connectOnce(driver, config, prepared, at);
    } catch (error) {
      lastError = error;
      if (!isRetryable(error) || stopped()) break;
      if (attempt < attempts) {
        await sleep(
          backoffDelay(attempt, { initialMs: delayMs, factor: backoff, maxMs: maxDelayMs }),
        );
      }
    }
  }
  const tries = `${made} attempt${made === 1 ? "" : "s"}` +
    (isRetryable(lastError) ? "" : "; not retried, retrying cannot help");
  if (statementFailed(lastError)) {
    // The server took the session: where it is and who logs in are right.
    throw new ConnectionError(
      config,
      made,
      `Cannot set up a connection to ${describeTarget(config)} (${tries}): the server ` +
        `accepted it, but ${step} failed with SQLSTATE ${lastError.sqlstate}: ` +
        lastError.message,
      { cause: lastError },
    );
  }
  const reason = tlsRefused(lastError, config)
    ? `the server refused TLS: sslmode=${config.ssl!.mode} asks for an encrypted connection ` +
      "and this server does not offer one. Turn on ssl in the server's postgresql.conf, or " +
      "connect without sslmode (without TLS) where the network is trusted"
    : lastError instanceof Error
    ? lastError.message
    : String(lastError);
  throw new ConnectionError(
    config,
    made,
    `Cannot connect to ${describeTarget(config)} (${tries}): ${reason}. ` +
      "Check that the server is running and that the host, port, database, user and password " +
      "are right",
    { cause: lastError },
  );
}

/** Opens one session and prepares it, telling `at` which step runs (for the error). */
async function connectOnce(
  driver: Driver,
  config: ResolvedConfig,
  prepared: ReadonlyMap<string, string>,
  at: (step: string) => void,
): Promise<DriverConnection> {
  at("the driver's setup of the session");
  const conn = await driver.connect();
  try {
    for (const [i, command] of config.initCommands.entries()) {
      at(`initCommands[${i}]`);
      await conn.query(command, []).result;
    }
    for (const [name, sql] of prepared) {
      at(`preparing the pool's statement ${name}`);
      await conn.query(prepareStatement(name, sql), []).result;
    }
  } catch (error) {
    await conn.close();
    throw error;
  }
  return conn;
}

/**
 * Whether opening a connection may succeed when tried again: not after bad credentials or
 * SQL, but after a lost or refused session, and after a setup statement that was cancelled
 * (a timeout) or waited too long for a lock.
 */
function isRetryable(error: unknown): boolean {
  if (!(error instanceof QueryError)) return true;
  const state = error.sqlstate ?? "";
  return state === "" || state.startsWith("08") || state.startsWith("57P") ||
    state === "57014" || state === "55P03";
}

/**
 * Whether the server failed a statement on a session it had accepted (severity `ERROR`: the
 * driver's setup, `initCommands`, the pool's prepared statements), rather than refusing or
 * ending the session itself (`FATAL`), or the session being lost.
 */
function statementFailed(error: unknown): error is QueryError {
  return error instanceof QueryError && error.severity === "ERROR";
}

/**
 * Whether opening a TLS connection failed because the server does not speak TLS: it
 * answered the driver's SSLRequest with "no".
 */
function tlsRefused(error: unknown, config: ResolvedConfig): boolean {
  return config.ssl !== undefined && error instanceof Error &&
    /does not offer TLS/.test(error.message);
}
