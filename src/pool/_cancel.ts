/**
 * Timeouts, aborts and cancels on connections that other callers share. A call's timeout or
 * abort rejects its caller at once; the statement is withdrawn or cancelled by the driver,
 * and until that cancel has taken effect its connection gets no new work. A cancel lands on
 * whatever the server runs when it arrives, so an autocommit statement that was in flight
 * behind the target and failed with 57014 did nothing and is run again.
 *
 * @module
 */

import { QueryError, TimeoutError } from "../errors.ts";
import { mayCommitInside } from "../_sql.ts";
import type { DriverResult } from "../drivers/driver.ts";
import type { InFlight, Slot } from "./_slot.ts";
import type { QueryOptions } from "./types.ts";

/**
 * How long a statement may go on after its cancel request was delivered before its session
 * is ended (a pooler that lost the statement, a network that drops the answer): a cancelled
 * statement stops within milliseconds on a server that answers.
 */
export const CANCEL_GRACE_MS = 1000;
/**
 * How often a statement failed by another statement's cancel is run again: each retry waits
 * for the cancel to take effect, so a second failure needs another cancel racing it.
 */
export const MAX_CANCEL_RETRIES = 3;

/**
 * The timeout and abort signal of one call, armed when the call is made. When it fires the
 * caller's promise rejects at once; `onFire` takes the work out of the queue or cancels it.
 */
export interface CallGuard {
  /** What the caller was rejected with; `null` once the call resolved. */
  fired?: unknown;
  /** Takes the call's work out of the queue, or cancels its statement. */
  onFire?: () => void;
}

/**
 * Arms a call's timeout (`timeoutMs`, else `commandTimeoutMs`) and abort signal around
 * `work`. The caller's promise rejects as soon as either fires: with a
 * {@link TimeoutError} naming the limit, or with the signal's reason (as `fetch` does).
 * The work itself is taken out of the queue or cancelled, and its outcome is dropped.
 */
export function guarded(
  options: QueryOptions | undefined,
  commandTimeoutMs: number,
  work: (guard: CallGuard) => Promise<DriverResult>,
): Promise<DriverResult> {
  const signal = options?.signal;
  if (signal?.aborted) return Promise.reject(signal.reason);
  const limitMs = options?.timeoutMs ?? commandTimeoutMs;
  return new Promise<DriverResult>((resolve, reject) => {
    const guard: CallGuard = {};
    const fire = (error: unknown) => {
      if (guard.fired !== undefined) return;
      guard.fired = error;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      reject(error);
      guard.onFire?.();
    };
    const onAbort = () => fire(signal!.reason);
    const timer = setTimeout(() => fire(timeoutError(limitMs)), limitMs);
    signal?.addEventListener("abort", onAbort, { once: true });
    work(guard).then((result) => {
      if (guard.fired !== undefined) return;
      guard.fired = null;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      resolve(result);
    }, (error) => fire(error));
  });
}

/**
 * Cancels one statement on its slot: its caller gets `error`; the driver withdraws it or asks
 * the server to stop it once it is the statement the session runs. Statements in flight
 * beside it are marked exposed, and the slot counts the cancel until it has taken effect.
 *
 * @returns Settles once the cancel has taken effect (the request delivered and the statement
 *   settled) and no other cancel is pending on the slot; `undefined` when nothing was done.
 */
export function cancelInFlight(
  slot: Slot,
  entry: InFlight,
  error: unknown,
): Promise<void> | undefined {
  if (entry.cancelError !== undefined || !slot.running.has(entry)) return undefined;
  entry.cancelError = error;
  for (const other of slot.running) if (other !== entry) other.exposed = true;
  if (slot.cancelling++ === 0) {
    slot.cancelsDone = new Promise<void>((resolve) => slot.endCancels = resolve);
  }
  const delivered = entry.running.cancel().then(() => {
    entry.cancelSentAt = performance.now();
  });
  const settled = entry.running.result.then(() => {}, () => {});
  return Promise.all([delivered, settled]).then(() => {
    if (--slot.cancelling > 0) return;
    slot.cancelsDone = undefined;
    slot.endCancels!();
  });
}

/**
 * Whether a failed shared statement ran into a cancel aimed at another statement, and may
 * run again: it failed with 57014, was in flight beside a cancel's target, and cannot have
 * committed part of its work (`CALL`, `DO` and strings with their own `COMMIT` can).
 */
export function strayCancelVictim(entry: InFlight, error: unknown): boolean {
  return error instanceof QueryError && error.sqlstate === "57014" && entry.exposed &&
    !mayCommitInside(entry.sql);
}

/** The error of a call whose time limit fired. */
export function timeoutError(ms: number): TimeoutError {
  return new TimeoutError(
    `Cannot finish the query within ${ms} ms: it was cancelled on the server; ` +
      "raise timeoutMs (or commandTimeoutMs) or make the query faster",
    ms,
  );
}

/**
 * The error of a statement the server's `statement_timeout` stopped, or `undefined` when a
 * 57014 came from a cancel request (`pg_cancel_backend`, another client): the server's
 * English message says "user request" then; with another `lc_messages` every 57014 pgdbm did
 * not cause counts as a statement timeout.
 *
 * @param error The statement's error.
 * @param statementTimeout The `statement_timeout` pgdbm set on the session, if any.
 */
export function statementTimeoutError(
  error: unknown,
  statementTimeout: string | undefined,
): TimeoutError | undefined {
  if (!(error instanceof QueryError) || error.sqlstate !== "57014") return undefined;
  if (error.message.includes("user request")) return undefined;
  const limitMs = statementTimeout === undefined ? undefined : parseDurationMs(statementTimeout);
  return new TimeoutError(
    `Cannot finish the query: the server cancelled it after its statement_timeout` +
      `${limitMs === undefined ? "" : ` (${limitMs} ms)`}; raise statementTimeoutMs ` +
      "(or the statement_timeout set on the server) or make the query faster",
    limitMs,
    { cause: error, sqlstate: error.sqlstate },
  );
}

/** A PostgreSQL duration setting (`"5000"`, `"5s"`, `"1min"`) in milliseconds; 0 is none. */
function parseDurationMs(setting: string): number | undefined {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*$/.exec(setting);
  if (match === null) return undefined;
  const scale: Record<string, number> = {
    us: 0.001,
    ms: 1,
    s: 1000,
    min: 60_000,
    h: 3_600_000,
    d: 86_400_000,
  };
  const ms = Number(match[1]) * scale[match[2] ?? "ms"];
  return ms > 0 ? ms : undefined;
}
