/**
 * Slow-statement learning: the pool keeps a statement known to be slow off the connections
 * that carry fast ones. A statement is slow once its service time, averaged over its runs,
 * exceeds {@link SLOW_MS} on at least two runs: one slow run (a cold cache, a lock wait) does
 * not make it slow, and a statement that turns fast again is fast again.
 *
 * @module
 */

/**
 * Above this average service time a statement is slow. Pipelined behind it, a fast query
 * would wait this long: 20 ms is about a hundred point reads on one connection here.
 */
export const SLOW_MS = 20;
/** Weight of a new run in the average (an exponential moving average). */
const NEW_RUN_WEIGHT = 0.3;
/** Statements remembered, oldest forgotten first: bounds memory for generated SQL texts. */
const MAX_TRACKED_STATEMENTS = 5000;

interface StatementTiming {
  avg: number;
  seen: number;
  slow: boolean;
}

/** The service times of the statements that ran slowly at least once. */
export class StatementTimings {
  readonly #timings = new Map<string, StatementTiming>();

  /** Whether `sql` is known to be slow. */
  isSlow(sql: string): boolean {
    return this.#timings.get(sql)?.slow === true;
  }

  /**
   * Records one run of `sql` that took `ms` of service time.
   *
   * @returns True when this run made the statement slow (its copies already queued should
   *   count as slow too).
   */
  learn(sql: string, ms: number): boolean {
    const known = this.#timings.get(sql);
    if (known !== undefined) {
      const wasSlow = known.slow;
      known.avg = known.avg * (1 - NEW_RUN_WEIGHT) + ms * NEW_RUN_WEIGHT;
      known.seen++;
      known.slow = known.avg > SLOW_MS && known.seen >= 2;
      return known.slow && !wasSlow;
    }
    if (ms < SLOW_MS) return false;
    if (this.#timings.size >= MAX_TRACKED_STATEMENTS) {
      this.#timings.delete(this.#timings.keys().next().value!);
    }
    this.#timings.set(sql, { avg: ms, seen: 1, slow: false });
    return false;
  }
}
