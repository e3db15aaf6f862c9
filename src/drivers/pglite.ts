/**
 * The embedded driver: PostgreSQL in process (PGlite, WASM) behind the driver seam of
 * {@link ./driver.ts}. One PGlite instance per driver, started on the first `connect()`,
 * serves one session at a time; statements run one after another in a FIFO queue, so the
 * pool above can send several at once as it does on the network.
 *
 * Values come back as the network driver gives them (the mapping pgdbm always had): `int8` and
 * `numeric` as strings, `int2`/`int4`/`float4`/`float8`/`oid` as numbers, `json`/`jsonb`
 * parsed, `date`/`timestamp`/`timestamptz` as `Date`, `bytea` as a plain `Uint8Array`, and
 * arrays as arrays with NULL elements as `null`, also of the database's own types (an enum's,
 * a domain's, whose elements read as the domain's base type) made after the engine started.
 *
 * @module
 */

import {
  type ExecProtocolOptions,
  messages,
  type ParserOptions,
  PGlite,
  type Results,
} from "@electric-sql/pglite";
import type {
  Driver,
  DriverCapabilities,
  DriverConnection,
  DriverResult,
  NotificationListener,
  Row,
  RunningQuery,
  StatementOptions,
} from "./driver.ts";
import { QueryError } from "../errors.ts";
import { isCopyFromStdin } from "../_sql.ts";
import {
  arrayTypesSql,
  FIRST_USER_OID,
  parseArrayBody,
  serializeArray,
  UNKNOWN_TYPE_SERIALIZERS,
} from "./_pg_array.ts";

/** Options of {@link createPgliteDriver}. */
export interface PgliteDriverOptions {
  /**
   * The directory that holds the database; the database lives in memory when absent.
   *
   * @default {undefined}
   */
  dataDir?: string;
  /** Settings applied to every session, such as `{ lock_timeout: "5s" }`. */
  serverSettings: Record<string, string>;
}

/**
 * Creates the embedded driver: PostgreSQL running in this process on PGlite (WASM).
 *
 * The engine starts on the first `connect()` (about 2 s and 650 MB) and is kept until
 * `close()`. It has one session (`maxSessions` is 1): a second `connect()` while a session
 * is open rejects; after that session closes, `connect()` opens a fresh one on the same
 * engine (the old session's transaction is rolled back and its state discarded).
 * `serverSettings` are applied to every session with `set_config`, so a value is read as in
 * `postgresql.conf` (`search_path` may list several schemas).
 *
 * Limitations: PGlite cannot interrupt a running statement, so `cancel()` only removes a
 * statement that is still queued behind others (it then rejects with SQLSTATE `57014`); a
 * statement that has started runs to its end. Named prepared statements are not used (the
 * `prepare` option of `query()` is ignored). After a statement that kept the engine busy for
 * more than 10 ms, the driver yields to the event loop once, so timers keep firing.
 *
 * @example Run a query in memory
 * ```ts
 * import { createPgliteDriver } from "./pglite.ts";
 *
 * const driver = createPgliteDriver({ serverSettings: { lock_timeout: "5s" } });
 * const conn = await driver.connect();
 * const { rows } = await conn.query("SELECT 1 + $1::int AS n", [1]).result;
 * console.log(rows[0].n); // 2
 * await conn.close();
 * await driver.close();
 * ```
 *
 * @param options Where the data lives (`dataDir`, in memory when absent) and the server
 *   settings of every session.
 * @returns A driver with one session at a time over one PGlite instance.
 * @throws {QueryError} From `connect()`: SQLSTATE `08001` when PGlite cannot start,
 *   `53300` when a session is already open, `08003` once the driver is closed, or the
 *   server's error when a server setting is refused.
 */
export function createPgliteDriver(options: PgliteDriverOptions): Driver {
  return new PgliteDriver(options);
}

/** PGlite's parsers, changed where the network driver returns something else. */
const PARSERS: ParserOptions = {
  20: (text) => text,
  1082: (text) => new Date(text),
  1114: (text) => new Date(text),
  1184: (text) => new Date(text),
};

const YIELD_AFTER_MS = 10;
const COPY_FROM_STDIN = /\bFROM\s+STDIN\b/i;

/**
 * PGlite that reports the command tag of every statement it completes, and the data of a
 * `COPY … TO STDOUT`, and knows the array types of the database's own types.
 */
class TaggedPGlite extends PGlite {
  onTag?: (tag: string) => void;
  onCopyData?: (chunk: Uint8Array) => void;
  /**
   * Types of the database's own (OIDs from {@link FIRST_USER_OID}) whose array types the
   * engine has installed, or found it has none: those there when it started, then each one a
   * result showed.
   */
  readonly knownTypes = new Set<number>();

  override async execProtocolStream(
    message: Uint8Array,
    options?: ExecProtocolOptions,
  ): Promise<messages.BackendMessage[]> {
    const replies = await super.execProtocolStream(message, options);
    if (this.onTag || this.onCopyData) {
      for (const reply of replies) {
        if (reply instanceof messages.CommandCompleteMessage) this.onTag?.(reply.text);
        else if (reply instanceof messages.CopyDataMessage) this.onCopyData?.(reply.chunk);
      }
    }
    return replies;
  }
}

interface Task {
  sql: string;
  params: readonly unknown[];
  run(pg: TaggedPGlite): Promise<unknown>;
  resolve(value: unknown): void;
  reject(error: unknown): void;
}

class PgliteDriver implements Driver {
  readonly maxSessions = 1;
  readonly capabilities: DriverCapabilities = { parameterizedAlone: false };
  readonly #options: PgliteDriverOptions;
  #engine?: Promise<TaggedPGlite>;
  #pg?: TaggedPGlite;
  readonly #queue: Task[] = [];
  #pumping = false;
  #drained: Array<() => void> = [];
  #lastYield = performance.now();
  #session?: PgliteConnection;
  #opening = false;
  #closed = false;
  #closing?: Promise<void>;

  constructor(options: PgliteDriverOptions) {
    this.#options = options;
  }

  async connect(): Promise<DriverConnection> {
    if (this.#closed) throw driverClosedError();
    if (this.#opening || (this.#session !== undefined && !this.#session.closed)) {
      throw new QueryError(
        "Cannot open a second session on the embedded PostgreSQL (PGlite): it has one " +
          "session and it is open; close that session first",
        "",
        [],
        { sqlstate: "53300" },
      );
    }
    this.#opening = true;
    try {
      await this.#start();
      if (this.#closed) throw driverClosedError();
      const settings = Object.entries(this.#options.serverSettings);
      const { pid, version } = await this.schedule(
        async (pg) => {
          try {
            for (const [name, value] of settings) await applySetting(pg, name, value);
            const { rows } = await runStatement(
              pg,
              "SELECT pg_backend_pid() AS pid, current_setting('server_version') AS version",
              [],
            );
            return { pid: rows[0].pid as number, version: rows[0].version as string };
          } catch (error) {
            await resetSession(pg);
            throw error;
          }
        },
        "SELECT pg_backend_pid()",
        [],
      ).promise;
      if (this.#closed) throw driverClosedError();
      this.#session = new PgliteConnection(this, pid, version);
      return this.#session;
    } finally {
      this.#opening = false;
    }
  }

  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  /** Queues `run` behind the statements already sent; maps PGlite's errors. */
  schedule<T>(
    run: (pg: TaggedPGlite) => Promise<T>,
    sql: string,
    params: readonly unknown[],
  ): { promise: Promise<T>; task: Task } {
    let task!: Task;
    const promise = new Promise<T>((resolve, reject) => {
      task = {
        sql,
        params,
        run,
        resolve: resolve as (value: unknown) => void,
        reject: (error) => reject(toQueryError(error, sql, params)),
      };
    });
    this.#queue.push(task);
    this.#pump();
    return { promise, task };
  }

  /** Passes the engine's notifications to `listener` until the returned function is called. */
  subscribe(listener: NotificationListener): () => void {
    return this.#pg?.onNotification(listener) ?? (() => {});
  }

  /** Removes `task` if it has not started; true when it was removed. */
  unschedule(task: Task): boolean {
    const index = this.#queue.indexOf(task);
    if (index < 0) return false;
    this.#queue.splice(index, 1);
    return true;
  }

  /** Ends `session` after what it already sent: rolls back and discards its state. */
  endSession(session: PgliteConnection): Promise<void> {
    if (this.#session !== session || this.#pg === undefined) return Promise.resolve();
    const done = this.schedule(
      async (pg) => {
        if (!pg.closed) await resetSession(pg);
      },
      "DISCARD ALL",
      [],
    ).promise;
    return done.catch(() => {});
  }

  async #start(): Promise<void> {
    this.#engine ??= this.#create();
    try {
      this.#pg = await this.#engine;
    } catch (error) {
      this.#engine = undefined;
      throw error;
    }
  }

  async #create(): Promise<TaggedPGlite> {
    const { dataDir } = this.#options;
    let pg: TaggedPGlite | undefined;
    try {
      pg = new TaggedPGlite({ dataDir, parsers: PARSERS });
      Object.setPrototypeOf(pg.serializers, UNKNOWN_TYPE_SERIALIZERS);
      await pg.waitReady;
      const { rows } = await pg.query<ArrayType>(arrayTypesSql(undefined));
      installArrayTypes(pg, rows);
      return pg;
    } catch (error) {
      await pg?.close().catch(() => {});
      const where = dataDir === undefined ? "in memory" : `in "${dataDir}"`;
      throw new QueryError(
        `Cannot start the embedded PostgreSQL (PGlite) ${where}: ${messageOf(error)}; ` +
          "check that the data directory is writable, not used by another process, and " +
          "that there is about 650 MB of free memory",
        "",
        [],
        { sqlstate: "08001" },
        { cause: error },
      );
    }
  }

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    for (let task = this.#queue.shift(); task !== undefined; task = this.#queue.shift()) {
      let failed = false;
      let outcome: unknown;
      try {
        const pg = this.#pg;
        if (pg === undefined || pg.closed) throw sessionClosedError(task.sql, task.params);
        outcome = await task.run(pg);
      } catch (error) {
        failed = true;
        outcome = error;
      }
      if (performance.now() - this.#lastYield > YIELD_AFTER_MS) {
        await new Promise((resolve) => setTimeout(resolve, 0));
        this.#lastYield = performance.now();
      }
      if (failed) task.reject(outcome);
      else task.resolve(outcome);
    }
    this.#pumping = false;
    const drained = this.#drained;
    this.#drained = [];
    for (const resolve of drained) resolve();
  }

  async #shutdown(): Promise<void> {
    this.#closed = true;
    await this.#session?.close();
    const pg = await this.#engine?.catch(() => undefined);
    if (this.#pumping) await new Promise<void>((resolve) => this.#drained.push(resolve));
    if (pg !== undefined && !pg.closed) await pg.close();
  }
}

class PgliteConnection implements DriverConnection {
  readonly pid: number;
  readonly serverVersion: string;
  readonly #driver: PgliteDriver;
  #closed = false;
  #closing?: Promise<void>;
  #listeners: Array<() => void> = [];
  #unsubscribe: Array<() => void> = [];

  constructor(driver: PgliteDriver, pid: number, serverVersion: string) {
    this.#driver = driver;
    this.pid = pid;
    this.serverVersion = serverVersion;
  }

  get closed(): boolean {
    return this.#closed;
  }

  hasPrepared(_sql: string): boolean {
    return false;
  }

  query(sql: string, params: readonly unknown[], _options?: StatementOptions): RunningQuery {
    if (this.#closed) {
      return { result: Promise.reject(sessionClosedError(sql, params)), cancel: resolved };
    }
    const { promise, task } = this.#driver.schedule(
      (pg) => runStatement(pg, sql, params),
      sql,
      params,
    );
    const cancel = (): Promise<void> => {
      if (this.#driver.unschedule(task)) {
        task.reject(
          new QueryError("canceling statement due to user request", sql, params, {
            sqlstate: "57014",
            severity: "ERROR",
          }),
        );
      }
      return Promise.resolve();
    };
    return { result: promise, cancel };
  }

  async copyIn(
    sql: string,
    chunks: AsyncIterable<string | Uint8Array>,
    signal?: AbortSignal,
  ): Promise<number> {
    if (this.#closed) throw sessionClosedError(sql, []);
    signal?.throwIfAborted();
    if (!isCopyFromStdin(sql)) {
      throw new TypeError(
        `Cannot run COPY: 'sql' must be "COPY <table> [(<columns>)] FROM STDIN …"; got "${sql}"`,
      );
    }
    const fromBlob = sql.replace(COPY_FROM_STDIN, "FROM '/dev/blob'");
    let sourceError: { error: unknown } | undefined;
    const { promise } = this.#driver.schedule(
      async (pg) => {
        const parts: BlobPart[] = [];
        try {
          for await (const chunk of chunks) {
            signal?.throwIfAborted();
            // Bytes are copied: the source may reuse its buffer once the next chunk is asked for.
            parts.push(typeof chunk === "string" ? chunk : chunk.slice());
          }
          signal?.throwIfAborted();
        } catch (error) {
          sourceError = { error };
          throw error;
        }
        const results = await pg.exec(fromBlob, { blob: new Blob(parts) });
        return results[results.length - 1]?.rowCount ?? 0;
      },
      sql,
      [],
    );
    try {
      return await promise;
    } catch (error) {
      if (sourceError !== undefined) throw sourceError.error;
      throw error;
    }
  }

  async *copyOut(sql: string, signal?: AbortSignal): AsyncGenerator<Uint8Array, number> {
    if (this.#closed) throw sessionClosedError(sql, []);
    signal?.throwIfAborted();
    const { promise } = this.#driver.schedule(
      async (pg) => {
        const chunks = new CopyChunks();
        pg.onCopyData = (chunk) => chunks.add(chunk);
        try {
          const { rowCount } = await runStatement(pg, sql, []);
          return { chunks: chunks.done(), rowCount };
        } finally {
          pg.onCopyData = undefined;
        }
      },
      sql,
      [],
    );
    const { chunks, rowCount } = await promise;
    for (const chunk of chunks) {
      signal?.throwIfAborted();
      yield chunk;
    }
    return rowCount;
  }

  onClose(listener: () => void): void {
    if (this.#closed) listener();
    else this.#listeners.push(listener);
  }

  onNotification(listener: NotificationListener): void {
    if (!this.#closed) this.#unsubscribe.push(this.#driver.subscribe(listener));
  }

  close(): Promise<void> {
    if (this.#closing === undefined) {
      this.#closed = true;
      for (const unsubscribe of this.#unsubscribe.splice(0)) unsubscribe();
      const listeners = this.#listeners;
      this.#listeners = [];
      for (const listener of listeners) listener();
      this.#closing = this.#driver.endSession(this);
    }
    return this.#closing;
  }

  /** PGlite cannot interrupt a statement: the session ends after it, as with `close()`. */
  terminate(): Promise<void> {
    return this.close();
  }
}

/** Bytes of COPY output handed out per chunk. */
const COPY_CHUNK_BYTES = 64 * 1024;

/** Gathers COPY data rows (views into PGlite's memory, so copied) into chunks of ~64 KiB. */
class CopyChunks {
  readonly #full: Uint8Array[] = [];
  #current = new Uint8Array(COPY_CHUNK_BYTES);
  #length = 0;

  add(data: Uint8Array): void {
    if (this.#length + data.length > this.#current.length) {
      this.#flush();
      if (data.length > this.#current.length) this.#current = new Uint8Array(data.length);
    }
    this.#current.set(data, this.#length);
    this.#length += data.length;
  }

  done(): Uint8Array[] {
    this.#flush();
    return this.#full;
  }

  #flush(): void {
    if (this.#length === 0) return;
    this.#full.push(this.#current.subarray(0, this.#length));
    this.#current = new Uint8Array(COPY_CHUNK_BYTES);
    this.#length = 0;
  }
}

/**
 * Runs one statement: extended protocol with params, simple protocol without. A result that
 * shows types the engine does not know yet has them learned ({@link learnTypes}).
 */
async function runStatement(
  pg: TaggedPGlite,
  sql: string,
  params: readonly unknown[],
): Promise<DriverResult> {
  const tags: string[] = [];
  let last: Results<Row> | undefined;
  pg.onTag = (tag) => tags.push(tag);
  try {
    const results: Results<Row>[] = params.length > 0
      ? [await pg.query<Row>(sql, params as unknown[])]
      : await pg.exec(sql);
    last = results[results.length - 1];
  } finally {
    pg.onTag = undefined;
  }
  if (last !== undefined) {
    let unknown: number[] | undefined;
    for (const { dataTypeID } of last.fields) {
      if (dataTypeID >= FIRST_USER_OID && !pg.knownTypes.has(dataTypeID)) {
        (unknown ??= []).push(dataTypeID);
      }
    }
    if (unknown !== undefined) await learnTypes(pg, unknown, last);
  }
  return toDriverResult(last, tags[tags.length - 1]);
}

/** An array type as {@link arrayTypesSql} gives it. */
interface ArrayType {
  element: number;
  array: number;
  parseAs: number;
}

/**
 * Installs parsers and serializers for array types (PGlite has them only for the types there
 * when it started, and for a domain's array it parses the elements as text): NULL elements
 * read as `null`, elements parsed and bound as their `parseAs` type. Notes the element and
 * array types as known.
 */
function installArrayTypes(pg: TaggedPGlite, types: readonly ArrayType[]): void {
  for (const { element, array, parseAs } of types) {
    const parse = pg.parsers[parseAs];
    const serialize = pg.serializers[parseAs];
    pg.parsers[array] = (text) => parseArrayBody(text.slice(1), parse);
    pg.serializers[array] = (value) => serializeArray(value, serialize);
    pg.knownTypes.add(element);
    pg.knownTypes.add(array);
  }
}

/**
 * Looks the array types of `types` up once (types made after the engine started: an enum, a
 * domain, a table's row type), installs them, and parses the values of `result` PGlite left
 * as text, as a result after them would read. When the look-up fails, the values stay text.
 */
async function learnTypes(
  pg: TaggedPGlite,
  types: readonly number[],
  result: Results<Row>,
): Promise<void> {
  for (const type of types) pg.knownTypes.add(type);
  let found: Results<ArrayType>;
  try {
    found = await pg.query<ArrayType>(arrayTypesSql(types));
  } catch {
    for (const type of types) pg.knownTypes.delete(type);
    return;
  }
  installArrayTypes(pg, found.rows);
  const { fields, rows } = result;
  fields.forEach(({ name, dataTypeID }, index) => {
    if (!found.rows.some(({ array }) => array === dataTypeID)) return;
    // A name several columns share holds the last one's value.
    if (fields.findLastIndex((other) => other.name === name) !== index) return;
    const parse = pg.parsers[dataTypeID];
    for (const row of rows) {
      const value = row[name];
      if (typeof value === "string") row[name] = parse(value);
    }
  });
}

/** Builds the result of the last statement, its command from the full command tag. */
function toDriverResult(last: Results<Row> | undefined, tag: string | undefined): DriverResult {
  if (last === undefined || last.command === undefined) {
    return { rows: [], command: "", rowCount: 0 };
  }
  const match = tag === undefined ? null : /^(.*?)((?: \d+)*)$/.exec(tag);
  const command = match !== null && match[1].startsWith(last.command) ? match[1] : last.command;
  return { rows: last.rows, command, rowCount: last.rowCount ?? last.rows.length };
}

/** Sets one server setting for the session, as `postgresql.conf` would read its value. */
async function applySetting(pg: TaggedPGlite, name: string, value: string): Promise<void> {
  const sql = "SELECT set_config($1, $2, false)";
  try {
    await runStatement(pg, sql, [name, value]);
  } catch (error) {
    throw toQueryError(error, sql, [name, value]);
  }
}

/** Ends what a session left behind: its transaction, settings, prepared statements, temp tables. */
async function resetSession(pg: TaggedPGlite): Promise<void> {
  await pg.exec("ROLLBACK").catch(() => {});
  await pg.exec("DISCARD ALL").catch(() => {});
}

function toQueryError(error: unknown, sql: string, params: readonly unknown[]): QueryError {
  if (error instanceof QueryError) return error;
  if (error instanceof messages.DatabaseError) {
    for (const key of ["query", "params", "queryOptions"]) {
      if (Object.hasOwn(error, key)) Object.defineProperty(error, key, { enumerable: false });
    }
    return new QueryError(error.message, sql, params, {
      sqlstate: error.code,
      severity: error.severity,
      detail: error.detail,
      hint: error.hint,
      position: error.position === undefined ? undefined : Number(error.position),
      schemaName: error.schema,
      table: error.table,
      column: error.column,
      constraint: error.constraint,
    }, { cause: error });
  }
  return new QueryError(`Cannot run the query: ${messageOf(error)}`, sql, params, {}, {
    cause: error,
  });
}

function sessionClosedError(sql: string, params: readonly unknown[]): QueryError {
  return new QueryError(
    "Cannot run the query: its connection is closed; run it again to use a fresh connection",
    sql,
    params,
    { sqlstate: "08003" },
  );
}

function driverClosedError(): QueryError {
  return new QueryError(
    "Cannot open a session: the embedded PostgreSQL (PGlite) driver is closed; " +
      "create a new driver",
    "",
    [],
    { sqlstate: "08003" },
  );
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function resolved(): Promise<void> {
  return Promise.resolve();
}
