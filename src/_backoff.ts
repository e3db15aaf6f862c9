/**
 * Waiting between tries: an abortable sleep, exponential backoff (with jitter where many
 * processes may retry at once), and "poll until taken" for advisory locks.
 *
 * @module
 */

/** How the delay grows from one try to the next. */
export interface BackoffOptions {
  /** The delay before the first retry, in milliseconds. */
  initialMs: number;
  /** No delay is longer than this (before jitter), in milliseconds. */
  maxMs: number;
  /**
   * Each delay is the one before times this.
   *
   * @default {2}
   */
  factor?: number;
  /**
   * Wait a random part of the delay, between half and all of it, so that processes that
   * failed together do not retry together.
   *
   * @default {false}
   */
  jitter?: boolean;
}

/** What {@link pollUntilTaken} polls with, and what it does when it has to wait. */
export interface PollOptions {
  /** The first pause, in milliseconds; each later one doubles (with jitter). */
  initialMs: number;
  /** The longest pause, in milliseconds. */
  maxMs: number;
  /** Give up when this many milliseconds have passed since the first try. */
  timeoutMs: number;
  /** Stops the polling: checked before each try, and it ends a pause early. */
  signal?: AbortSignal;
  /** Called once, after the first try that did not take it (before the first pause). */
  onWait?: () => void | Promise<void>;
  /** The error to throw when `timeoutMs` has passed; `waitedMs` since the first try. */
  onTimeout: (waitedMs: number) => Error | Promise<Error>;
  /** The error to throw when `signal` has aborted; its reason itself by default. */
  onAbort?: (reason: unknown) => unknown;
}

/**
 * Waits `ms` milliseconds, or less when `signal` aborts; it never rejects.
 *
 * @param ms How long to wait; 0 or less waits for the next turn of the event loop.
 * @param signal Ends the wait early.
 */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
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

/**
 * The delay before retry number `retry` (1 for the first): `initialMs × factor^(retry − 1)`,
 * at most `maxMs`, and with jitter a random whole number of milliseconds between half of
 * that and all of it.
 *
 * @param retry Which retry, from 1.
 * @param options How the delay grows.
 * @returns The delay in milliseconds.
 */
export function backoffDelay(retry: number, options: BackoffOptions): number {
  const base = Math.min(options.initialMs * (options.factor ?? 2) ** (retry - 1), options.maxMs);
  return options.jitter === true ? Math.round(base * (0.5 + Math.random() / 2)) : base;
}

/**
 * Calls `attempt` until it takes what it polls for (returns a value other than
 * `undefined`), pausing between tries with jittered, doubling delays; no pause runs past
 * the timeout.
 *
 * @param attempt One try: the value when taken, `undefined` when not (yet).
 * @param options The pauses, the timeout, and what to say when waiting or giving up.
 * @returns What `attempt` returned when it took it.
 * @throws What `onTimeout` returns when `timeoutMs` has passed, and what `onAbort`
 *   returns (the signal's reason by default) when `signal` has aborted before a try.
 */
export async function pollUntilTaken<T>(
  attempt: () => Promise<T | undefined>,
  options: PollOptions,
): Promise<T> {
  const { signal, timeoutMs } = options;
  const start = performance.now();
  const backoff = { initialMs: options.initialMs, maxMs: options.maxMs, jitter: true };
  for (let retry = 1;; retry++) {
    if (signal?.aborted) {
      throw options.onAbort === undefined ? signal.reason : options.onAbort(signal.reason);
    }
    const value = await attempt();
    if (value !== undefined) return value;
    const waited = performance.now() - start;
    if (retry === 1) await options.onWait?.();
    if (waited >= timeoutMs) throw await options.onTimeout(waited);
    await sleep(Math.min(backoffDelay(retry, backoff), timeoutMs - waited + 1), signal);
  }
}
