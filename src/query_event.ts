/**
 * What the `onQuery` hook receives for each statement a manager, transaction or connection
 * runs: the expanded SQL, the parameters masked, how long it took and what it did.
 *
 * @module
 */

/** One statement that ran (or failed), as the `onQuery` hook sees it. */
export interface QueryEvent {
  /** The SQL as sent, templates expanded. */
  sql: string;
  /**
   * The parameters, masked: long strings shortened, values bound to columns or keys named
   * like password, token or secret replaced by `"<hidden>"`.
   */
  params: unknown[];
  /** Time from the call to its result, in milliseconds (waiting for a connection included). */
  durationMs: number;
  /** Rows returned or affected (`0` when it failed). */
  rowCount: number;
  /** The schema its templates expanded to, or `null`. */
  schema: string | null;
  /** Where it ran: the primary, or a read replica. */
  node: "primary" | "replica";
  /** The error it failed with, or `undefined`. */
  error?: Error;
}

/** A function called after every statement, for logging and metrics; it must not throw. */
export type QueryHook = (event: QueryEvent) => void;
