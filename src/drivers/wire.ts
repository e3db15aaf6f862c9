/**
 * The network driver: pgdbm's own client of PostgreSQL's protocol 3.0, one socket per
 * {@link DriverConnection} (one server backend: its own pid, pipelining, cancel requests).
 *
 * Statements written before earlier ones are answered are pipelined: each ends with its own
 * Sync, and the answers come back in the order they were sent, so each settles exactly the
 * statement it belongs to. A statement with parameters is described once (its parameter
 * types decide how each value is written) and, with `prepare`, kept on the session as a
 * named prepared statement. Rows are parsed straight from the socket's bytes into plain
 * objects, which keeps what a stream of rows leaves behind for the garbage collector small.
 *
 * @module
 */

import type { Buffer } from "node:buffer";
import type { ResolvedConfig } from "../config.ts";
import type {
  Driver,
  DriverConnection,
  DriverResult,
  NotificationListener,
  Row,
  RunningQuery,
  StatementOptions,
} from "./driver.ts";
import { QueryError, type ServerErrorFields } from "../errors.ts";
import { arrayTypesSql, FIRST_ASSIGNED_OID } from "./_pg_array.ts";
import {
  Backend,
  cancelRequest,
  Frontend,
  MessageReader,
  MessageWriter,
  type PostgresError,
  serverMessage,
  sslRequest,
} from "./_wire_protocol.ts";
import { type ArrayTypePair, TypeMap } from "./_wire_types.ts";
import {
  allocBuffer,
  openTransport,
  sendCancelRequest,
  type Transport,
} from "./_wire_transport.ts";
import {
  type Column,
  CopyIn,
  CopyOut,
  type Description,
  type Endpoint,
  type Exchange,
  type ExchangeSession,
  Portal,
  queryErrorOf,
  Startup,
  Statement,
} from "./_wire_exchanges.ts";

/** How long a cancelled COPY or stream may take to end before its session is ended instead. */
const STOP_MS = 2000;
/** How much longer than `connectTimeoutMs` the client waits for a new session's setup. */
const SETUP_GRACE_MS = 5000;
/** How long `close()` waits for the statements already sent before it ends the session. */
const CLOSE_MS = 5000;

const CANCELED_MESSAGE = "canceling statement due to user request";
const LOST_MESSAGE =
  "Cannot finish the query: the connection to the server was lost; it may or may not have " +
  "run, so retry only if it is safe to repeat";

/**
 * Creates the network driver for a resolved configuration.
 *
 * @param config The resolved configuration (`kind: "network"`).
 * @returns A driver whose sessions are sockets of pgdbm's own protocol client.
 */
export function createWireDriver(config: ResolvedConfig): Driver {
  const endpoint = endpointOf(config);
  return {
    maxSessions: Infinity,
    capabilities: { parameterizedAlone: !config.prepare },
    connect: () => WireConnection.open(endpoint),
    close: () => Promise.resolve(),
  };
}

function endpointOf(config: ResolvedConfig): Endpoint {
  const endpoint: Endpoint = {
    host: config.host,
    port: config.port,
    user: config.user,
    database: config.database,
    serverSettings: config.serverSettings,
    ssl: config.ssl,
    prepare: config.prepare,
    connectTimeoutMs: Math.ceil(config.connectTimeoutMs),
  };
  // A host with a slash is a Unix socket folder, as in libpq.
  if (config.host.includes("/")) endpoint.path = `${config.host}/.s.PGSQL.${config.port}`;
  // Non-enumerable, as in the resolved configuration: never printed with the endpoint.
  Object.defineProperty(endpoint, "password", { value: config.password, enumerable: false });
  return endpoint;
}

/** One session: a socket, the statements in flight on it in order, and the ones waiting. */
class WireConnection implements DriverConnection, ExchangeSession {
  readonly #endpoint: Endpoint;
  #transport?: Transport;
  readonly #writer = new MessageWriter();
  readonly #reader = new MessageReader();
  /** Written, waiting for their answers, in order: the first is answered now. */
  readonly #inflight = new Queue<Exchange>();
  /** Not written yet. */
  readonly #outbox = new Queue<Exchange>();
  /** An exchange after which nothing may be written for now. */
  #blocked?: Exchange;
  #flushScheduled = false;
  /** The start of a message whose end has not arrived yet (its first `#pendingLength` bytes). */
  #pending?: Buffer;
  #pendingLength = 0;
  #pid = 0;
  /** The process id of the cancel key. */
  #keyPid = 0;
  #secret = 0;
  #serverVersion = "";
  #closed = false;
  #socketClosed = false;
  #socketEnd!: () => void;
  readonly #socketEnded = new Promise<void>((resolve) => this.#socketEnd = resolve);
  /** The FATAL error the server sent before it ended the session. */
  #fatal?: PostgresError;
  #closing?: Promise<void>;
  #listeners: Array<() => void> = [];
  #notified: NotificationListener[] = [];
  #paused = false;
  #statementCount = 0;
  /** The session's named statements by their key: declared parameter types and text. */
  readonly statements = new Map<string, Description>();
  readonly types = new TypeMap();
  /**
   * Types from {@link FIRST_ASSIGNED_OID} on (the database's own, the `information_schema`
   * domains, system catalogs' row types) whose array types the session has installed, or
   * found it has none: each one a result showed.
   */
  readonly #knownTypes = new Set<number>();
  readonly cursor?: DriverConnection["cursor"];

  private constructor(endpoint: Endpoint) {
    this.#endpoint = endpoint;
    // Through a transaction pooler (`prepare: false`) a portal left open between batches
    // would hold a server connection on terms the pooler does not expect: callers declare a
    // cursor there.
    if (endpoint.prepare) this.cursor = (...args) => this.#cursor(...args);
  }

  /**
   * Opens a session: the socket (TLS when configured), the startup, then the setup
   * statement (its pid and version), all within `connectTimeoutMs`. The session reads no
   * types: it knows PostgreSQL's own array types from the start, and learns the others when
   * a result shows them ({@link #withArrays}). Reading `pg_type` was a new backend's first
   * look at it: 5-6 ms of the server's time on a fresh database, 12-16 ms with 1,000
   * schemas of 3 tables, where a plain `SELECT` takes 1.2.
   */
  static async open(endpoint: Endpoint): Promise<WireConnection> {
    const ms = endpoint.connectTimeoutMs;
    const connection = new WireConnection(endpoint);
    let opening: Promise<Transport> | undefined;
    const events = {
      data: (chunk: Buffer) => connection.#onData(chunk),
      close: () => connection.#onSocketClose(),
      written: (bytes: Uint8Array) => connection.#writer.recycle(bytes),
    };
    const connecting = deadline(ms, `the server did not answer within connectTimeoutMs (${ms} ms)`);
    // The setup statements are bounded by the server (`SET LOCAL statement_timeout`); this
    // only ends the wait for a server that stopped answering altogether.
    const settingUp = deadline(
      ms + SETUP_GRACE_MS,
      `the server did not answer the connection's setup within connectTimeoutMs (${ms} ms)`,
    );
    try {
      opening = openTransport(endpoint, endpoint.ssl, sslRequest(), events, connecting.signal);
      connection.#transport = await Promise.race([opening, connecting.promise]);
      const startup = new Startup(connection, endpoint);
      const all: Row[] = [];
      const setup = new Statement(connection, setupSql(ms), [], false, all);
      setup.result.catch(() => {}); // awaited below, once the startup is through
      // Without a password there is nothing to answer before the server is ready: the setup
      // travels with the startup message, a round trip less per connection. (A server that
      // asks for a password anyway fails the startup, with the error that says so.)
      const withStartup = !endpoint.password;
      connection.#send(startup);
      if (withStartup) connection.#send(setup);
      await Promise.race([startup.done, connecting.promise]);
      if (!withStartup) connection.#send(setup);
      await Promise.race([setup.result, settingUp.promise]);
      const row = all[0];
      connection.#pid = row.pid as number;
      connection.#serverVersion = row.version as string;
      return connection;
    } catch (error) {
      connection.destroy();
      // A transport that opens after the deadline is closed at once.
      if (connection.#transport === undefined) opening?.then((late) => late.destroy(), () => {});
      throw setupError(error, ms);
    } finally {
      connecting.clear();
      settingUp.clear();
    }
  }

  get pid(): number {
    return this.#pid;
  }

  get serverVersion(): string {
    return this.#serverVersion;
  }

  get closed(): boolean {
    return this.#closed;
  }

  hasPrepared(sql: string): boolean {
    return this.statements.has(sql);
  }

  /**
   * Notes the session's cancel key. Its process id is the server's, or a pooler's stand-in
   * (PgBouncer's): the pid the session reports is the server backend's own.
   */
  setKey(pid: number, secret: number): void {
    this.#keyPid = pid;
    this.#secret = secret;
  }

  /** A new name for a named prepared statement of this session. */
  nextStatementName(): string {
    return `pgdbm_${++this.#statementCount}`;
  }

  query(sql: string, params: readonly unknown[], options?: StatementOptions): RunningQuery {
    const statement = new Statement(this, sql, params, options?.prepare ?? this.#endpoint.prepare);
    if (this.#closed) statement.fail(closedError(sql, params));
    else this.#send(statement);
    return this.#typed(statement);
  }

  /** The statement, with a result whose new array types are learned first. */
  #typed(statement: Statement): RunningQuery {
    const result = statement.result.then((result) => this.#withArrays(result, statement));
    return { result, cancel: () => statement.cancel() };
  }

  /**
   * A result with the array types it showed that the session did not know yet (any type
   * but PostgreSQL's own: an enum, a domain, a table's row type) parsed as arrays: their
   * array types are looked up and installed once, and the values still text are parsed.
   * When the look-up fails, the values stay text.
   */
  #withArrays(result: DriverResult, statement: Statement): DriverResult | Promise<DriverResult> {
    const columns = statement.columnsShown;
    let unknown: number[] | undefined;
    for (const column of columns ?? []) {
      const type = column.type;
      if (type >= FIRST_ASSIGNED_OID && !this.#knownTypes.has(type)) (unknown ??= []).push(type);
    }
    if (unknown === undefined) return result;
    return this.#learnTypes(unknown).then(() => this.#reparsed(result, columns!), () => result);
  }

  #reparsed(result: DriverResult, columns: readonly Column[]): DriverResult {
    columns.forEach((column, index) => {
      if (!this.types.isArray(column.type)) return;
      if (columns.findLastIndex((other) => other.name === column.name) !== index) return;
      const parse = this.types.parser(column.type)!;
      for (const row of result.rows) {
        const value = row[column.name];
        if (typeof value === "string") row[column.name] = parse(value);
      }
    });
    return result;
  }

  async #learnTypes(types: readonly number[]): Promise<void> {
    for (const type of types) this.#knownTypes.add(type);
    try {
      const found = await this.query(arrayTypesSql(types), []).result;
      this.#install(
        found.rows.map((
          row,
        ) => [row.element as number, row.array as number, row.parseAs as number]),
      );
      // Named statements described before the types were known parse with their new parsers.
      for (const description of this.statements.values()) {
        for (const column of description.columns ?? []) {
          column.parse = this.types.parser(column.type);
        }
      }
    } catch (error) {
      for (const type of types) this.#knownTypes.delete(type);
      throw error;
    }
  }

  /** Installs array types, and notes their element and array types as known. */
  #install(pairs: readonly ArrayTypePair[]): void {
    this.types.install(pairs);
    for (const [element, array] of pairs) {
      if (element >= FIRST_ASSIGNED_OID) this.#knownTypes.add(element);
      if (array >= FIRST_ASSIGNED_OID) this.#knownTypes.add(array);
    }
  }

  async copyIn(
    sql: string,
    chunks: AsyncIterable<string | Uint8Array>,
    signal?: AbortSignal,
  ): Promise<number> {
    if (this.#closed) throw closedError(sql, []);
    signal?.throwIfAborted();
    const copy = new CopyIn(this, sql);
    this.#send(copy);
    const aborted = abortion(signal);
    let source: AsyncIterator<string | Uint8Array> | undefined;
    let stopping: Promise<void> | undefined;
    /** Ends the COPY with CopyFail and a cancel request; the session ends if it does not answer. */
    const stop = (error: unknown) => {
      copy.finish(error);
      stopping ??= this.#stopWithin(copy, copy.ended());
      return stopping;
    };
    const over = copy.done.then((): typeof OVER => OVER, (): typeof OVER => OVER);
    try {
      await Promise.race([copy.sent, aborted.promise]);
      if (!copy.copying) return await copy.done;
      source = chunks[Symbol.asyncIterator]();
      while (true) {
        let next: IteratorResult<string | Uint8Array> | typeof OVER;
        try {
          next = await Promise.race([source.next(), aborted.promise, over]);
        } catch (error) {
          if (error === ABORTED) throw error;
          // The caller's own records failed: the server rolls the COPY back.
          await stop(error);
          throw error;
        }
        if (next === OVER || !copy.copying) {
          // The server ended the COPY (a bad row): its error is the outcome.
          source.return?.().catch(() => {});
          return await copy.done;
        }
        if (next.done) break;
        if (!copy.send(next.value)) {
          await Promise.race([this.#drained(), aborted.promise, over]);
        }
      }
      copy.finish();
      return await Promise.race([copy.done, aborted.promise]);
    } catch (error) {
      if (error === ABORTED) {
        source?.return?.().catch(() => {});
        await stop(signal!.reason);
        throw signal!.reason;
      }
      throw error;
    } finally {
      aborted.dispose();
    }
  }

  writeData(write: (writer: MessageWriter) => void): boolean {
    write(this.#writer);
    const bytes = this.#writer.take();
    return this.#socketClosed ? true : this.#transport!.write(bytes);
  }

  #drained(): Promise<void> {
    return this.#transport!.drained();
  }

  /**
   * Sends a cancel request for `exchange` (now the one the session runs) and waits for
   * `ended`; ends the session when it does not end within {@link STOP_MS}.
   */
  async #stopWithin(exchange: Exchange, ended: Promise<void>): Promise<void> {
    if (this.#inflight.first === exchange) {
      const delivered = this.#sendCancel();
      exchange.releaseAfter = delivered;
      if (this.#blocked === undefined) this.#blocked = exchange;
      await delivered;
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<false>((resolve) => timer = setTimeout(resolve, STOP_MS, false));
    const inTime = await Promise.race([ended.then(() => true), late]);
    clearTimeout(timer);
    if (!inTime) this.destroy();
  }

  async *copyOut(sql: string, signal?: AbortSignal): AsyncGenerator<Uint8Array, number> {
    if (this.#closed) throw closedError(sql, []);
    signal?.throwIfAborted();
    const copy = new CopyOut(this, sql, []);
    this.#send(copy);
    let cancelled: Promise<void> | undefined;
    const onAbort = () => {
      cancelled ??= this.#stopWithin(copy, copy.ended());
      copy.discard();
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      while (true) {
        const chunk = await copy.next();
        signal?.throwIfAborted();
        if (chunk === null) break;
        yield chunk;
      }
      return copy.count;
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      throw error;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (!copy.over) {
        copy.discard();
        cancelled ??= this.#stopWithin(copy, copy.ended());
      }
      await cancelled;
    }
  }

  /**
   * Reads a portal in batches. A cancel request goes only while the server works on a
   * batch; leaving between batches closes the portal.
   */
  async *#cursor(
    sql: string,
    params: readonly unknown[],
    batchSize: number,
    signal?: AbortSignal,
  ): AsyncGenerator<Row[]> {
    if (this.#closed) throw closedError(sql, params);
    signal?.throwIfAborted();
    const portal = new Portal(this, sql, params, batchSize);
    this.#send(portal);
    let cancelled: Promise<void> | undefined;
    const onAbort = () => {
      if (portal.working) cancelled ??= this.#stopWithin(portal, portal.ended());
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      while (true) {
        const rows = await portal.next().catch((error) => {
          if (signal?.aborted) throw signal.reason;
          throw error;
        });
        if (rows === null) return;
        signal?.throwIfAborted();
        yield rows;
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
      // A cancel request that reached the server between batches changes nothing: the
      // portal is closed either way.
      const closed = portal.close();
      await cancelled;
      await closed;
    }
  }

  onClose(listener: () => void): void {
    if (this.#closed) listener();
    else this.#listeners.push(listener);
  }

  onNotification(listener: NotificationListener): void {
    if (!this.#closed) this.#notified.push(listener);
  }

  close(): Promise<void> {
    return this.#closing ??= this.#close();
  }

  async #close(): Promise<void> {
    this.#markClosed();
    if (!this.#socketClosed) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<void>((resolve) => timer = setTimeout(resolve, CLOSE_MS));
      await Promise.race([this.#idle(), late]);
      clearTimeout(timer);
      if (!this.#socketClosed) {
        this.#writer.begin(Frontend.Terminate).end();
        this.#transport!.write(this.#writer.take());
        this.#transport!.end();
      }
      const gone = new Promise<void>((resolve) => timer = setTimeout(resolve, CLOSE_MS));
      await Promise.race([this.#socketEnded, gone]);
      clearTimeout(timer);
      this.destroy();
    }
    await this.#socketEnded;
  }

  /** Settles once nothing is waiting or in flight. */
  async #idle(): Promise<void> {
    while (this.#inflight.length > 0 || this.#outbox.length > 0) {
      const last = this.#outbox.last ?? this.#inflight.last!;
      await last.ended();
    }
  }

  terminate(): Promise<void> {
    this.#markClosed();
    this.destroy();
    return this.#socketEnded;
  }

  /** Ends the socket now: what is in flight rejects. */
  destroy(): void {
    if (this.#transport === undefined) this.#onSocketClose();
    else this.#transport.destroy();
  }

  /** Pauses reading (a COPY out's reader is behind). */
  pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.#transport!.pause();
  }

  /** Resumes reading. */
  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    this.#transport!.resume();
  }

  // -- writing ---------------------------------------------------------------------------

  #send(exchange: Exchange): void {
    this.#outbox.push(exchange);
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    queueMicrotask(() => {
      this.#flushScheduled = false;
      this.#flush();
    });
  }

  /** Writes the waiting exchanges up to one that holds the writes. */
  #flush(): void {
    const writer = this.#writer;
    while (this.#blocked === undefined && this.#outbox.length > 0) {
      const exchange = this.#outbox.shift()!;
      exchange.write(writer);
      this.#inflight.push(exchange);
      if (exchange.holdsWrites) this.#blocked = exchange;
    }
    if (!writer.empty && !this.#socketClosed) this.#transport!.write(writer.take());
  }

  /**
   * Writes `exchange`'s next messages and lets the exchanges waiting behind it be written
   * (it no longer holds the writes).
   */
  continueWith(exchange: Exchange, write: (writer: MessageWriter) => void): void {
    write(this.#writer);
    exchange.holdsWrites = false;
    if (this.#blocked === exchange) this.#blocked = undefined;
    this.#flush();
  }

  /** Lets the statements behind an exchange that is over be written. */
  #release(exchange: Exchange): void {
    const unblock = () => {
      if (this.#blocked !== exchange) return;
      this.#blocked = undefined;
      this.#flush();
    };
    if (exchange.releaseAfter === undefined) unblock();
    else exchange.releaseAfter.then(unblock);
  }

  /** Writes messages of the exchange the session runs now. */
  writeNow(write: (writer: MessageWriter) => void): void {
    write(this.#writer);
    if (!this.#socketClosed) this.#transport!.write(this.#writer.take());
    else this.#writer.take();
  }

  /** Runs a statement again, first of the waiting ones (a stale named statement). */
  retry(exchange: Exchange): void {
    this.#outbox.unshift(exchange);
    if (!this.#flushScheduled) this.#flush();
  }

  // -- cancelling ------------------------------------------------------------------------

  /**
   * Cancels `exchange`: one not yet written is withdrawn (57014); the one the session runs
   * gets a cancel request now; one written behind others gets it when its turn comes.
   */
  cancel(exchange: Exchange): Promise<void> {
    if (exchange.settled) return Promise.resolve();
    if (this.#outbox.remove(exchange)) {
      exchange.fail(
        new QueryError(CANCELED_MESSAGE, exchange.sql, exchange.params, { sqlstate: "57014" }),
      );
      return Promise.resolve();
    }
    if (this.#inflight.first === exchange) return this.#sendCancel();
    // Settles once the request is delivered, or once the statement ended before its turn.
    return new Promise<void>((resolve) => {
      let sent = false;
      exchange.onHead = () => {
        sent = true;
        this.#sendCancel().then(resolve);
      };
      exchange.ended().then(() => {
        if (sent) return;
        exchange.onHead = undefined;
        resolve();
      });
    });
  }

  /** Sends a CancelRequest for this session; settles once delivered (or it failed). */
  #sendCancel(): Promise<void> {
    if (this.#socketClosed) return Promise.resolve();
    return sendCancelRequest(this.#endpoint, cancelRequest(this.#keyPid, this.#secret));
  }

  // -- reading ---------------------------------------------------------------------------

  #onData(chunk: Buffer): void {
    let bytes: Buffer;
    let end: number;
    if (this.#pendingLength === 0) {
      bytes = chunk;
      end = chunk.length;
    } else {
      const pending = this.#pending!;
      const needed = this.#pendingLength + chunk.length;
      bytes = pending;
      if (needed > pending.length) {
        bytes = allocBuffer(Math.max(needed, pending.length * 2));
        bytes.set(pending.subarray(0, this.#pendingLength));
        this.#pending = bytes;
      }
      bytes.set(chunk, this.#pendingLength);
      end = needed;
    }
    let at = 0;
    const reader = this.#reader;
    while (end - at >= 5) {
      const length = ((bytes[at + 1] << 24) | (bytes[at + 2] << 16) | (bytes[at + 3] << 8) |
        bytes[at + 4]) >>> 0;
      if (end - at < length + 1) break;
      reader.reset(bytes, at + 5, at + 1 + length);
      this.#dispatch(bytes[at], reader);
      at += length + 1;
    }
    const left = end - at;
    if (left === 0) {
      this.#pendingLength = 0;
    } else if (bytes === this.#pending) {
      bytes.copyWithin(0, at, end);
      this.#pendingLength = left;
    } else {
      if (this.#pending === undefined || left > this.#pending.length) {
        this.#pending = allocBuffer(Math.max(left, 64 * 1024));
      }
      this.#pending.set(bytes.subarray(at, end));
      this.#pendingLength = left;
    }
  }

  #dispatch(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.NotificationResponse: {
        reader.int32();
        const channel = reader.cstring();
        const payload = reader.cstring();
        for (const listener of this.#notified) {
          try {
            listener(channel, payload);
          } catch {
            // A listener's own failure is its caller's to report; the session reads on.
          }
        }
        return;
      }
      case Backend.NoticeResponse:
        return;
      case Backend.ParameterStatus: {
        const name = reader.cstring();
        const value = reader.cstring();
        if (name === "server_version") this.#serverVersion = value;
        return;
      }
      case Backend.ReadyForQuery: {
        const exchange = this.#inflight.shift();
        if (exchange === undefined) return;
        exchange.ready();
        const head = this.#inflight.first;
        const onHead = head?.onHead;
        if (onHead !== undefined) {
          head!.onHead = undefined;
          onHead();
        }
        if (this.#blocked === exchange) this.#release(exchange);
        return;
      }
    }
    const exchange = this.#inflight.first;
    if (type === Backend.ErrorResponse) {
      const at = reader.at;
      const error = serverMessage(reader);
      reader.at = at;
      // The server ends the session after a FATAL: what is in flight fails with it.
      if (error.severity === "FATAL" || error.severity === "PANIC") this.#fatal = error;
    }
    if (exchange === undefined) return;
    try {
      exchange.message(type, reader);
    } catch (error) {
      // A value the client could not read (the server's answer is intact): the session
      // cannot know where it stands, so it ends.
      exchange.fail(exchange.clientError(
        `Cannot read the result: ${error instanceof Error ? error.message : String(error)}`,
        error,
      ));
      this.destroy();
    }
  }

  #onSocketClose(): void {
    if (this.#socketClosed) return;
    this.#socketClosed = true;
    this.#socketEnd();
    this.#markClosed();
    const exchanges = [...this.#inflight.drain(), ...this.#outbox.drain()];
    for (const exchange of exchanges) {
      exchange.fail(
        this.#fatal === undefined
          ? new QueryError(LOST_MESSAGE, exchange.sql, exchange.params, { sqlstate: "08006" })
          : queryErrorOf(this.#fatal, exchange.sql, exchange.params),
      );
    }
  }

  #markClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#notified = [];
    const listeners = this.#listeners;
    this.#listeners = [];
    for (const listener of listeners) listener();
  }
}

/**
 * A first-in first-out queue whose `shift()` costs the same at any length (an array's copies
 * the array once it holds more than about 16,000 items: 200,000 pipelined statements took
 * 23-33 s instead of about 2).
 */
class Queue<T> {
  #items: Array<T | undefined> = [];
  #head = 0;

  get length(): number {
    return this.#items.length - this.#head;
  }

  get first(): T | undefined {
    return this.#items[this.#head];
  }

  get last(): T | undefined {
    return this.length > 0 ? this.#items[this.#items.length - 1] : undefined;
  }

  push(item: T): void {
    this.#items.push(item);
  }

  /** Puts an item first. */
  unshift(item: T): void {
    if (this.#head > 0) this.#items[--this.#head] = item;
    else this.#items.unshift(item);
  }

  shift(): T | undefined {
    if (this.#head >= this.#items.length) return undefined;
    const item = this.#items[this.#head];
    this.#items[this.#head++] = undefined;
    if (this.#head === this.#items.length) {
      this.#items = [];
      this.#head = 0;
    } else if (this.#head > 1024 && this.#head * 2 > this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }

  /** Takes `item` out; false when it is not queued. */
  remove(item: T): boolean {
    const at = this.#items.indexOf(item, this.#head);
    if (at < 0) return false;
    this.#items.splice(at, 1);
    return true;
  }

  /** Empties the queue, returning what it held in order. */
  drain(): T[] {
    const items = this.#items.slice(this.#head) as T[];
    this.#items = [];
    this.#head = 0;
    return items;
  }
}

/**
 * A promise that rejects with a QueryError saying `message` after `ms` (and never settles
 * otherwise), and a signal aborted with that error then; `clear` stops its timer.
 */
function deadline(
  ms: number,
  message: string,
): { promise: Promise<never>; signal: AbortSignal; clear(): void } {
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const promise = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const error = new QueryError(message, "", []);
      controller.abort(error);
      reject(error);
    }, ms);
  });
  promise.catch(() => {});
  return { promise, signal: controller.signal, clear: () => clearTimeout(timer) };
}

/** What {@link abortion} rejects with when its signal aborts. */
const ABORTED = Symbol("aborted");
/** What a COPY's race yields once the server ended the COPY. */
const OVER = Symbol("over");

/**
 * A promise that rejects with {@link ABORTED} once `signal` aborts (and never settles
 * otherwise); `dispose` removes its listener.
 */
function abortion(signal: AbortSignal | undefined): { promise: Promise<never>; dispose(): void } {
  if (signal === undefined) return { promise: new Promise<never>(() => {}), dispose() {} };
  let onAbort!: () => void;
  const promise = new Promise<never>((_, reject) => {
    onAbort = () => reject(ABORTED);
    signal.addEventListener("abort", onAbort, { once: true });
  });
  promise.catch(() => {});
  return { promise, dispose: () => signal.removeEventListener("abort", onAbort) };
}

function closedError(sql: string, params: readonly unknown[]): QueryError {
  return new QueryError(
    "Cannot run the query: its connection is closed; run it again to use a fresh connection",
    sql,
    params,
    { sqlstate: "08003" },
  );
}

/**
 * The error of a session that did not open: the server's error with its fields (a FATAL one
 * refused the session; an ERROR failed a setup statement), or the socket's.
 */
function setupError(error: unknown, setupTimeoutMs: number): QueryError {
  if (!(error instanceof QueryError)) {
    const message = error instanceof Error ? error.message : String(error);
    return new QueryError(message, "", [], {}, { cause: error });
  }
  if (error.sqlstate === "57014" && /statement timeout/.test(error.message)) {
    const fields: ServerErrorFields = error;
    return new QueryError(
      `the statements that set up the connection (its pid, the server's array types) took ` +
        `longer than connectTimeoutMs (${setupTimeoutMs} ms), which bounds them instead of ` +
        `statementTimeoutMs and lockTimeoutMs (the server said: ${error.message}); the server ` +
        "is overloaded, or a session holds a lock on the system catalog pg_type",
      "",
      [],
      fields,
      { cause: error },
    );
  }
  if (error.sql === "") return error;
  return new QueryError(error.message, "", [], error, { cause: error.cause ?? error });
}

/**
 * The setup of a new session, under timeouts of its own: one row with its pid and version.
 * The user's `statement_timeout` and `lock_timeout` are startup settings, meant for the
 * user's statements, and would otherwise fail the setup whenever the server is slow; the
 * transaction's end restores them.
 */
function setupSql(timeoutMs: number): string {
  return [
    "BEGIN",
    `SET LOCAL statement_timeout = ${timeoutMs}`,
    "SET LOCAL lock_timeout = 0",
    "SELECT pg_backend_pid() AS pid, current_setting('server_version') AS version",
    "COMMIT",
  ].join(";\n");
}
