/**
 * One open connection of the pool (a slot) and the statements in flight on it.
 *
 * @module
 */

import type { DriverConnection, RunningQuery } from "../drivers/driver.ts";

/** One open connection and what runs on it. */
export interface Slot {
  /** The driver's session. */
  conn: DriverConnection;
  /** Statements sent and not yet settled, in the order they were sent. */
  running: Set<InFlight>;
  /** Names of the pool's prepared statements this session has prepared. */
  prepared: Set<string>;
  /** How many of `running` are known to be slow (the slot then takes no fast work). */
  slowRunning: number;
  /** Leased to a transaction or `acquire()`: no shared work. */
  leased: boolean;
  /**
   * Takes no new shared work, so that it comes free for a waiting transaction (a pool at its
   * cap with every slot pipelining would otherwise never free one). Cleared when leased.
   */
  draining: boolean;
  /**
   * Takes no new work of any kind and is closed once its work is done: its session was lost,
   * reached `maxQueries` or `maxLifetimeMs`, or was leased and handed back in an unknown state.
   */
  retiring: boolean;
  /**
   * Cancels requested on this connection that have not yet taken effect (the request not
   * delivered, or its target not settled). While above 0 the connection gets no new work,
   * so a late cancel can only reach statements that were already in flight.
   */
  cancelling: number;
  /** Settles when `cancelling` is back to 0 (the next statement of a lease waits for it). */
  cancelsDone?: Promise<void>;
  /** Settles `cancelsDone`. */
  endCancels?: () => void;
  /** Statements run on the session (for `maxQueries`). */
  queries: number;
  /** When the session opened (for `maxLifetimeMs`). */
  createdAt: number;
  /** When a statement last settled (for `idleTimeoutMs`). */
  lastUsed: number;
  /** When the head statement last made progress (for stall detection and service times). */
  lastProgress: number;
}

/** One statement sent on a slot. */
export interface InFlight {
  /** The driver's handle on it. */
  running: RunningQuery;
  /** Its SQL (for slow-statement learning and retries). */
  sql: string;
  /**
   * When the pool's tick cancels it (`commandTimeoutMs`); `Infinity` when its call has a timer
   * of its own.
   */
  deadline: number;
  /** Counted in its slot's `slowRunning`. */
  slow: boolean;
  /** When it was sent. */
  start: number;
  /** What its caller gets once it was cancelled (a timeout or the abort reason). */
  cancelError?: unknown;
  /** When the cancel request reached the server. */
  cancelSentAt?: number;
  /** A cancel aimed at another statement on its connection was requested while it ran. */
  exposed: boolean;
}

/** A new slot for a session that has just opened. */
export function openedSlot(conn: DriverConnection, prepared: Iterable<string>): Slot {
  const now = performance.now();
  return {
    conn,
    running: new Set(),
    prepared: new Set(prepared),
    slowRunning: 0,
    leased: false,
    draining: false,
    retiring: false,
    cancelling: 0,
    queries: 0,
    createdAt: now,
    lastUsed: now,
    lastProgress: now,
  };
}

/** Whether a slot may take new work (shared or leased). */
export function available(slot: Slot): boolean {
  return !slot.leased && !slot.draining && !slot.retiring && slot.cancelling === 0 &&
    !slot.conn.closed;
}
