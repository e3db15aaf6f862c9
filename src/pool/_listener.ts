/**
 * The pool's listening session: every `listen()` of a pool shares it. It holds the channel
 * → handlers map, sends `LISTEN`/`UNLISTEN` (one at a time, in call order), dispatches
 * notifications, and after the session is lost opens a new one, listens again on every
 * channel and calls each `onReconnect`.
 *
 * @module
 */

import type { ResolvedConfig } from "../config.ts";
import type { DriverResult, NotificationListener } from "../drivers/driver.ts";
import { PoolError } from "../errors.ts";
import { instrumented } from "../_instrument.ts";
import { activeTracer } from "../_telemetry.ts";
import { sleep } from "../_backoff.ts";
import {
  assertChannel,
  type ListenOptions,
  type NotificationHandler,
  quoteChannel,
  type Subscription,
} from "../listen.ts";

/** The session notifications arrive on, as the pool opens it for the listener. */
export interface ListenSession {
  /** Runs `LISTEN` / `UNLISTEN` on the session. */
  run(sql: string): Promise<DriverResult>;
  /** Passes the session's notifications to `listener`. */
  onNotification(listener: NotificationListener): void;
  /** Calls `listener` once the session has ended. */
  onClose(listener: () => void): void;
  /** Ends the session (or gives it back), when the listener no longer needs it. */
  close(): Promise<void>;
}

/** What the listener needs of its pool. */
export interface ListenHost {
  /** The pool's configuration (logger, retry policy, hook). */
  readonly config: ResolvedConfig;
  /**
   * Opens the listening session, retrying per `config.retry` until it opens, the attempts
   * run out, or `stopped()` (no subscription left, the pool closing) turns true.
   */
  openSession(stopped: () => boolean): Promise<ListenSession>;
}

interface Entry {
  readonly handler: NotificationHandler;
  readonly onReconnect?: () => void | Promise<void>;
  active: boolean;
}

/** One pool's listening session and its subscriptions. */
export class Listener {
  readonly #host: ListenHost;
  readonly #channels = new Map<string, Set<Entry>>();
  readonly #stopped = new AbortController();
  #session?: ListenSession;
  #queue: Promise<unknown> = Promise.resolve();
  #wanted = false;
  #relistening = false;
  /** Aborted when the last subscription is dropped: ends a reconnect loop's waits. */
  #idle = new AbortController();

  constructor(host: ListenHost) {
    this.#host = host;
  }

  /** The channels listened to (or being listened to). */
  get channels(): string[] {
    return [...this.#channels.keys()];
  }

  /** True while the listener has (or is opening) its session: it holds a connection. */
  get holdsSession(): boolean {
    return this.#wanted;
  }

  /**
   * Subscribes `handler` to `channel`, opening the session on the first subscription.
   *
   * @param channel The channel (1–63 bytes).
   * @param handler Called with each payload.
   * @param options `onReconnect`.
   * @param schema The manager's schema, for the hook and spans.
   */
  async add(
    channel: string,
    handler: NotificationHandler,
    options: ListenOptions | undefined,
    schema: string | undefined,
  ): Promise<Subscription> {
    assertChannel(channel);
    if (typeof handler !== "function") {
      throw new TypeError(
        `Cannot listen on "${channel}": the handler must be a function (payload) => void; ` +
          `got ${typeof handler}`,
      );
    }
    const onReconnect = options?.onReconnect;
    if (onReconnect !== undefined && typeof onReconnect !== "function") {
      throw new TypeError(
        `Cannot listen on "${channel}": 'onReconnect' must be a function; got ${typeof onReconnect}`,
      );
    }
    const entry: Entry = { handler, onReconnect, active: true };
    await this.#serial(async () => {
      if (this.#stopped.signal.aborted) throw closedError();
      if (this.#idle.signal.aborted) this.#idle = new AbortController();
      this.#wanted = true;
      try {
        const session = await this.#ensureSession();
        let entries = this.#channels.get(channel);
        if (entries === undefined) {
          // In the map first: a session opened meanwhile listens on it too.
          entries = new Set();
          this.#channels.set(channel, entries);
          try {
            await this.#run(session, `LISTEN ${quoteChannel(channel)}`, schema);
          } catch (error) {
            if (entries.size === 0) this.#channels.delete(channel);
            throw error;
          }
        }
        entries.add(entry);
      } finally {
        if (this.#channels.size === 0) await this.#endSession();
      }
    });
    let removed: Promise<void> | undefined;
    return {
      channel,
      unlisten: () => removed ??= this.#remove(channel, entry, schema),
    };
  }

  /** Ends the session and drops every subscription (the pool is closing). */
  close(): Promise<void> {
    this.#stopped.abort();
    for (const entries of this.#channels.values()) {
      for (const entry of entries) entry.active = false;
    }
    this.#channels.clear();
    return this.#serial(() => this.#endSession());
  }

  /**
   * Drops a subscription at once (a reconnect loop then stops once no channel is left);
   * the last one of a channel sends `UNLISTEN` in turn, unless the channel was listened to
   * again meanwhile.
   */
  #remove(channel: string, entry: Entry, schema: string | undefined): Promise<void> {
    entry.active = false;
    const entries = this.#channels.get(channel);
    if (entries === undefined || !entries.delete(entry) || entries.size > 0) {
      return Promise.resolve();
    }
    this.#channels.delete(channel);
    if (this.#channels.size === 0) this.#idle.abort();
    // No session (it was lost): nothing to UNLISTEN, and the reconnect skips the channel.
    if (this.#session === undefined && this.#channels.size > 0) return Promise.resolve();
    return this.#serial(async () => {
      if (this.#channels.has(channel)) return;
      const session = this.#session;
      try {
        if (session !== undefined) {
          await this.#run(session, `UNLISTEN ${quoteChannel(channel)}`, schema).catch((error) => {
            // A session lost meanwhile listens on nothing, and the reconnect skips the channel.
            if (this.#session === session) throw error;
          });
        }
      } finally {
        if (this.#channels.size === 0) await this.#endSession();
      }
    });
  }

  async #ensureSession(): Promise<ListenSession> {
    if (this.#session !== undefined) return this.#session;
    const idle = this.#idle.signal;
    const session = await this.#host.openSession(() =>
      this.#stopped.signal.aborted || idle.aborted
    );
    this.#session = session;
    session.onNotification((channel, payload) => {
      if (this.#session === session) this.#dispatch(channel, payload);
    });
    session.onClose(() => this.#lost(session));
    return session;
  }

  async #endSession(): Promise<void> {
    const session = this.#session;
    this.#session = undefined;
    this.#wanted = false;
    await session?.close().catch(() => {});
  }

  #dispatch(channel: string, payload: string): void {
    const entries = this.#channels.get(channel);
    if (entries === undefined) return;
    for (const entry of [...entries]) {
      if (!entry.active) continue;
      try {
        const result = entry.handler(payload);
        if (result instanceof Promise) {
          result.catch((error) => this.#report(`a handler of channel "${channel}" threw`, error));
        }
      } catch (error) {
        this.#report(`a handler of channel "${channel}" threw`, error);
      }
    }
  }

  /** The session ended without being asked to: listen again on a new one. */
  #lost(session: ListenSession): void {
    if (this.#session !== session) return;
    this.#session = undefined;
    this.#scheduleRelisten();
  }

  #scheduleRelisten(): void {
    if (this.#stopped.signal.aborted || this.#channels.size === 0 || this.#relistening) return;
    this.#relistening = true;
    this.#serial(() => this.#relisten()).then((entries) => {
      this.#relistening = false;
      // Lost again before this turn: the next round calls onReconnect.
      if (this.#session === undefined) return this.#scheduleRelisten();
      for (const entry of entries) {
        if (!entry.active || entry.onReconnect === undefined) continue;
        try {
          const result = entry.onReconnect();
          if (result instanceof Promise) {
            result.catch((error) => this.#report("an onReconnect callback threw", error));
          }
        } catch (error) {
          this.#report("an onReconnect callback threw", error);
        }
      }
    }, (error) => {
      this.#relistening = false;
      this.#report("listening again failed", error);
    });
  }

  /**
   * Opens a session and listens on every channel, round after round (each with the pool's
   * retry policy, `retry.maxDelayMs` apart) until it works, the channels are gone or the
   * pool closes. Returns the subscriptions to call `onReconnect` of.
   */
  async #relisten(): Promise<Entry[]> {
    const { maxDelayMs } = this.#host.config.retry;
    while (!this.#stopped.signal.aborted && this.#channels.size > 0) {
      try {
        const session = await this.#ensureSession();
        const channels = [...this.#channels.keys()];
        await this.#run(session, channels.map((c) => `LISTEN ${quoteChannel(c)}`).join("; "));
        if (this.#session === session) {
          return [...this.#channels.values()].flatMap((entries) => [...entries]);
        }
      } catch (error) {
        this.#report("listening again after the listening session was lost failed", error);
        const session = this.#session;
        this.#session = undefined;
        await session?.close().catch(() => {});
        await sleep(maxDelayMs, AbortSignal.any([this.#stopped.signal, this.#idle.signal]));
      }
    }
    if (this.#channels.size === 0 || this.#stopped.signal.aborted) await this.#endSession();
    return [];
  }

  #run(session: ListenSession, sql: string, schema?: string): Promise<DriverResult> {
    const config = this.#host.config;
    const tracer = activeTracer();
    if (tracer === undefined && config.onQuery === undefined) return session.run(sql);
    return instrumented(config, tracer, schema, sql, [], () => session.run(sql));
  }

  /** Runs `work` after the work queued before it, whatever that did. */
  #serial<T>(work: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(work, work);
    this.#queue = next.catch(() => {});
    return next;
  }

  #report(what: string, error: unknown): void {
    const message = error instanceof Error ? error.message : String(error);
    this.#host.config.logger.warn(`pgdbm: ${what} (${message})`);
  }
}

function closedError(): PoolError {
  return new PoolError(
    "Cannot listen: the pool is closed; create a new pool (or call connect()) first",
    "POOL_CLOSED",
  );
}
