/**
 * LISTEN / NOTIFY: the public types of `db.listen()` and the channel-name check shared by
 * `listen()` and `notify()`.
 *
 * A channel is a name global to the database: it is not prefixed with the manager's
 * schema, and `{{tables.x}}` / `{{schema}}` placeholders are not expanded in it. For a
 * channel per tenant, build the name from the schema yourself (`${schema}_events`).
 *
 * @module
 */

/** Receives the payload of one notification (`""` when it was sent without one). */
export type NotificationHandler = (payload: string) => void | Promise<void>;

/** Options of `listen()`. */
export interface ListenOptions {
  /**
   * Called after the listening session was lost (a terminated backend, a server restart)
   * and is back, listening again. PostgreSQL keeps no notifications for a session that is
   * gone: whatever was sent in between is lost, so resync here (read what changed).
   *
   * @default {undefined}
   */
  onReconnect?: () => void | Promise<void>;
}

/** One `listen()` call: a handler on a channel until `unlisten()`. */
export interface Subscription {
  /** The channel, as given to `listen()`. */
  readonly channel: string;
  /**
   * Stops calling the handler. The last subscription of a channel sends `UNLISTEN`; when no
   * subscription is left, the pool closes its listening session. Calling it again does
   * nothing.
   */
  unlisten(): Promise<void>;
}

/** PostgreSQL truncates identifiers to 63 bytes (`NAMEDATALEN - 1`). */
const MAX_CHANNEL_BYTES = 63;

/**
 * Checks a channel name for `listen()` and `notify()`.
 *
 * @param channel The channel name.
 * @throws {TypeError} When it is not a string, or holds a NUL character.
 * @throws {RangeError} When it is empty or longer than 63 bytes in UTF-8.
 */
export function assertChannel(channel: unknown): asserts channel is string {
  if (typeof channel !== "string") {
    throw new TypeError(
      `Cannot use the channel: it must be a string (such as "orders_events"); got ${typeof channel}`,
    );
  }
  const bytes = new TextEncoder().encode(channel).length;
  if (bytes === 0 || bytes > MAX_CHANNEL_BYTES) {
    throw new RangeError(
      `Cannot use the channel "${channel}": a channel name must be 1 to ${MAX_CHANNEL_BYTES} ` +
        `bytes long (PostgreSQL would cut it to ${MAX_CHANNEL_BYTES}); got ${bytes}. ` +
        "Use a shorter name",
    );
  }
  if (channel.includes("\0")) {
    throw new TypeError(
      `Cannot use the channel ${JSON.stringify(channel)}: it holds a NUL character; remove it`,
    );
  }
}

/** The channel as a quoted identifier, for `LISTEN` / `UNLISTEN`. */
export function quoteChannel(channel: string): string {
  return `"${channel.replaceAll('"', '""')}"`;
}
