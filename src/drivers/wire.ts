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

import { Buffer } from "node:buffer";
import type { ResolvedConfig, ResolvedSsl } from "../config.ts";
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
import { md5Password, ScramSha256 } from "./_auth.ts";
import { arrayTypesSql, FIRST_USER_OID } from "./_pg_array.ts";
import {
  cancelRequest,
  MessageReader,
  MessageWriter,
  type PostgresError,
  serverMessage,
  sslRequest,
  startupMessage,
  textAt,
} from "./_wire_protocol.ts";
import { type ArrayTypePair, type TextParser, TypeMap } from "./_wire_types.ts";
import { openTransport, sendCancelRequest, type Transport } from "./_wire_transport.ts";

/** Backend message types, as their bytes. */
const enum Backend {
  Authentication = 0x52, // R
  BackendKeyData = 0x4b, // K
  BindComplete = 0x32, // 2
  CloseComplete = 0x33, // 3
  CommandComplete = 0x43, // C
  CopyData = 0x64, // d
  CopyDone = 0x63, // c
  CopyInResponse = 0x47, // G
  CopyOutResponse = 0x48, // H
  CopyBothResponse = 0x57, // W
  DataRow = 0x44, // D
  EmptyQueryResponse = 0x49, // I
  ErrorResponse = 0x45, // E
  NoData = 0x6e, // n
  NoticeResponse = 0x4e, // N
  NotificationResponse = 0x41, // A
  ParameterDescription = 0x74, // t
  ParameterStatus = 0x53, // S
  ParseComplete = 0x31, // 1
  PortalSuspended = 0x73, // s
  ReadyForQuery = 0x5a, // Z
  RowDescription = 0x54, // T
}

/** Frontend message types, as their bytes. */
const enum Frontend {
  Bind = 0x42, // B
  Close = 0x43, // C
  CopyData = 0x64, // d
  CopyDone = 0x63, // c
  CopyFail = 0x66, // f
  Describe = 0x44, // D
  Execute = 0x45, // E
  Flush = 0x48, // H
  Parse = 0x50, // P
  Password = 0x70, // p
  Query = 0x51, // Q
  Sync = 0x53, // S
  Terminate = 0x58, // X
}

/** How long a cancelled COPY or stream may take to end before its session is ended instead. */
const STOP_MS = 2000;
/** How much longer than `connectTimeoutMs` the client waits for a new session's setup. */
const SETUP_GRACE_MS = 5000;
/** How long `close()` waits for the statements already sent before it ends the session. */
const CLOSE_MS = 5000;
/** The first size of the buffer a COPY out joins rows into, for one chunk to its reader. */
const COPY_OUT_CHUNK = 64 * 1024;
/** COPY-out bytes held for a reader that is behind before the socket pauses. */
const COPY_OUT_HIGH_WATER = 1024 * 1024;
/** Server routines whose error means a named statement went stale: it is prepared again once. */
const STALE_STATEMENT_ROUTINES = new Set([
  "FetchPreparedStatement",
  "RevalidateCachedQuery",
  "transformAssignedExpr",
]);

/** The Describe and Close target byte for a statement (`S`). */
const STATEMENT = new Uint8Array([0x53]);
/** The Describe and Close target byte for a portal (`P`). */
const PORTAL = new Uint8Array([0x50]);

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

/** Everything a session needs to open, and to send its cancel requests. */
interface Endpoint {
  host: string;
  port: number;
  /** A Unix socket path, when `host` is a folder. */
  path?: string;
  user: string;
  password?: string;
  database: string;
  serverSettings: Record<string, string>;
  ssl?: ResolvedSsl;
  prepare: boolean;
  connectTimeoutMs: number;
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

/** One column of a result: its name and its parser (`undefined`: the text as it is). */
interface Column {
  name: string;
  type: number;
  parse: TextParser | undefined;
}

/** What the server said of a statement it parsed: its parameter types and its columns. */
interface Description {
  /** The prepared statement's name, `""` for the unnamed one. */
  name: string;
  parameterTypes: number[];
  /** `null` when the statement returns no rows. */
  columns: Column[] | null;
}

/**
 * One unit of work on a session, answered in order: everything the server sends between
 * the work's first message and its ReadyForQuery belongs to it.
 */
abstract class Exchange {
  /** True while nothing may be written after this exchange's messages. */
  holdsWrites = false;
  /** True once settled. */
  settled = false;
  /** Called when the exchange becomes the one the session answers, for a pending cancel. */
  onHead?: () => void;
  /**
   * Once the exchange is over, later statements are written only after this settles: a
   * cancel request sent for it must not reach the statement after it.
   */
  releaseAfter?: Promise<void>;

  constructor(
    readonly session: WireConnection,
    readonly sql: string,
    readonly params: readonly unknown[],
  ) {}

  /** Writes the exchange's first messages. */
  abstract write(writer: MessageWriter): void;
  /** Takes one backend message addressed to the exchange. */
  abstract message(type: number, reader: MessageReader): void;
  /** The server is ready for the next statement: the exchange is over. */
  abstract ready(): void;
  /** The exchange ended without ReadyForQuery (withdrawn, or the session was lost). */
  abstract fail(error: QueryError): void;

  /** A QueryError of this exchange's statement from the server's ErrorResponse. */
  serverError(reader: MessageReader): QueryError {
    return queryErrorOf(serverMessage(reader), this.sql, this.params);
  }

  /** A QueryError for a failure on the client's side. */
  clientError(message: string, cause?: unknown): QueryError {
    return new QueryError(message, this.sql, this.params, {}, { cause });
  }
}

/** The QueryError of a statement the server failed, with the server's error as its cause. */
function queryErrorOf(error: PostgresError, sql: string, params: readonly unknown[]): QueryError {
  return new QueryError(error.message, sql, params, error.fields, { cause: error });
}

/** Reads a RowDescription into columns with their parsers. */
function readColumns(reader: MessageReader, types: TypeMap): Column[] {
  const count = reader.int16();
  const columns: Column[] = new Array(count);
  for (let i = 0; i < count; i++) {
    const name = reader.cstring();
    reader.at += 6; // table OID, column number
    const type = reader.int32();
    reader.at += 8; // type size, type modifier, format
    columns[i] = { name, type, parse: types.parser(type) };
  }
  return columns;
}

/** Reads a DataRow into a plain object. */
function readRow(reader: MessageReader, columns: Column[]): Row {
  const bytes = reader.bytes;
  let at = reader.at + 2;
  const row: Row = {};
  for (let i = 0; i < columns.length; i++) {
    const length = (bytes[at] << 24) | (bytes[at + 1] << 16) | (bytes[at + 2] << 8) | bytes[at + 3];
    at += 4;
    const column = columns[i];
    if (length < 0) {
      row[column.name] = null;
      continue;
    }
    const text = textAt(bytes, at, at + length);
    at += length;
    row[column.name] = column.parse === undefined ? text : column.parse(text);
  }
  return row;
}

/** The command and row count of a CommandComplete tag, such as `INSERT 0 3` or `CREATE TABLE`. */
function commandTag(reader: MessageReader): { command: string; count: number } {
  const tag = reader.cstring();
  const numbers = TAG_NUMBERS.exec(tag);
  if (numbers === null) return { command: tag, count: 0 };
  const command = tag.slice(0, numbers.index);
  return { command, count: Number(tag.slice(tag.lastIndexOf(" ") + 1)) };
}

/** The numbers that end a command tag (an INSERT's OID and its count). */
const TAG_NUMBERS = /( \d+)+$/;

/** The parameters as text for their declared types; throws a message for a value that has none. */
function bindValues(
  types: TypeMap,
  params: readonly unknown[],
  parameterTypes: readonly number[],
): Array<string | null> {
  const values: Array<string | null> = new Array(params.length);
  for (let i = 0; i < params.length; i++) {
    const value = params[i];
    if (value === null) {
      values[i] = null;
    } else if (value === undefined) {
      throw new TypeError(`parameter $${i + 1} is undefined; pass null for NULL`);
    } else {
      values[i] = types.serialize(value, parameterTypes[i] ?? 0);
    }
  }
  return values;
}

/**
 * The parameter types a statement declares from its values, or `undefined` when the server
 * is to infer them all: a `Date` is a `timestamptz`, a `Uint8Array` a `bytea`, a boolean a
 * `bool`, a bigint an `int8` (as they always were in pgdbm), so that `$1::text` of a `Date`
 * is the server's text of that instant, not JavaScript's.
 */
function declaredTypes(params: readonly unknown[]): number[] | undefined {
  let types: number[] | undefined;
  for (let i = 0; i < params.length; i++) {
    const value = params[i];
    const type = value instanceof Date
      ? 1184
      : value instanceof Uint8Array
      ? 17
      : typeof value === "boolean"
      ? 16
      : typeof value === "bigint"
      ? 20
      : 0;
    if (type === 0) continue;
    types ??= new Array(params.length).fill(0);
    types[i] = type;
  }
  return types;
}

/** Writes Parse of `sql` as the statement `name`, with the declared parameter types. */
function writeParse(
  writer: MessageWriter,
  name: string,
  sql: string,
  declared: readonly number[] | undefined,
): void {
  writer.begin(Frontend.Parse).cstring(name).cstring(sql);
  if (declared === undefined) {
    writer.int16(0);
  } else {
    writer.int16(declared.length);
    for (const type of declared) writer.int32(type);
  }
  writer.end();
}

/** Writes Bind of the unnamed portal with text values and text results. */
function writeBind(
  writer: MessageWriter,
  statement: string,
  values: ReadonlyArray<string | null>,
): void {
  writer.begin(Frontend.Bind).cstring("").cstring(statement).int16(0).int16(values.length);
  for (const value of values) writer.value(value);
  writer.int16(0).end();
}

/** A statement of `query()`: the simple protocol without params, the extended one with. */
class Statement extends Exchange implements RunningQuery {
  readonly result: Promise<DriverResult>;
  #resolve!: (result: DriverResult) => void;
  #reject!: (error: QueryError) => void;
  #cancelled?: Promise<void>;
  readonly #prepare: boolean;
  /** Set while the statement waits for its description before it binds. */
  #describing = false;
  #description?: Description;
  /** The statement's key among the session's named ones: its declared types and its text. */
  #key = "";
  /** The named statement found stale, closed before it is prepared again. */
  #stale?: string;
  /** The error of the first try, when the statement was prepared again. */
  #firstError?: QueryError;
  #columns: Column[] | null = null;
  /** The columns of the last statement that returned rows. */
  #shown: Column[] | null = null;
  #rows: Row[] = [];
  #command = "";
  #rowCount = 0;
  /** The rows and count of the last statement that returned rows (simple protocol). */
  #lastRows?: { rows: Row[]; count: number };
  #error?: QueryError;
  /** Every statement's rows, for the session's own setup. */
  readonly #all?: Row[];

  constructor(
    session: WireConnection,
    sql: string,
    params: readonly unknown[],
    prepare: boolean,
    all?: Row[],
  ) {
    super(session, sql, params);
    this.#prepare = prepare;
    this.#all = all;
    this.result = new Promise<DriverResult>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
  }

  cancel(): Promise<void> {
    return this.#cancelled ??= this.session.cancel(this);
  }

  write(writer: MessageWriter): void {
    if (this.params.length === 0) {
      writer.begin(Frontend.Query).cstring(this.sql).end();
      return;
    }
    if (this.#stale !== undefined) {
      writer.begin(Frontend.Close).bytes(STATEMENT).cstring(this.#stale).end();
      this.#stale = undefined;
    }
    const declared = declaredTypes(this.params);
    this.#key = declared === undefined ? this.sql : `${declared.join(",")} ${this.sql}`;
    const known = this.#prepare ? this.session.statements.get(this.#key) : undefined;
    if (known !== undefined) {
      this.#description = known;
      this.#columns = known.columns;
      this.#shown = known.columns;
      this.#bind(writer, known);
      return;
    }
    const name = this.#prepare ? this.session.nextStatementName() : "";
    this.#description = { name, parameterTypes: [], columns: null };
    writeParse(writer, name, this.sql, declared);
    writer.begin(Frontend.Describe).bytes(STATEMENT).cstring(name).end();
    writer.begin(Frontend.Flush).end();
    this.#describing = true;
    this.holdsWrites = true;
  }

  #bind(writer: MessageWriter, description: Description): void {
    let values: Array<string | null>;
    try {
      values = bindValues(this.session.types, this.params, description.parameterTypes);
    } catch (error) {
      this.#error ??= this.clientError(
        `Cannot run the query: ${error instanceof Error ? error.message : String(error)}`,
        error,
      );
      writer.begin(Frontend.Sync).end();
      return;
    }
    writeBind(writer, description.name, values);
    writer.begin(Frontend.Execute).cstring("").int32(0).end();
    writer.begin(Frontend.Sync).end();
  }

  /** The description arrived: binds now, and lets later statements be written. */
  #described(): void {
    const description = this.#description!;
    this.#describing = false;
    if (description.name !== "") this.session.statements.set(this.#key, description);
    this.session.continueWith(this, (writer) => this.#bind(writer, description));
  }

  message(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.DataRow:
        this.#rows.push(readRow(reader, this.#columns!));
        return;
      case Backend.RowDescription:
        this.#columns = readColumns(reader, this.session.types);
        this.#shown = this.#columns;
        if (this.#describing) {
          this.#description!.columns = this.#columns;
          this.#described();
        } else {
          this.#rows = [];
        }
        return;
      case Backend.NoData:
        if (this.#describing) this.#described();
        return;
      case Backend.ParameterDescription: {
        const count = reader.int16();
        const types = this.#description!.parameterTypes;
        for (let i = 0; i < count; i++) types.push(reader.int32() >>> 0);
        return;
      }
      case Backend.CommandComplete: {
        const { command, count } = commandTag(reader);
        this.#command = command;
        if (this.#columns !== null) {
          this.#lastRows = { rows: this.#rows, count };
          this.#all?.push(...this.#rows);
          this.#rowCount = this.#lastRows.count;
          if (this.params.length === 0) this.#columns = null;
        } else if (this.#lastRows === undefined) {
          this.#rowCount = count;
        }
        return;
      }
      case Backend.EmptyQueryResponse:
        this.#command = "";
        return;
      case Backend.ErrorResponse:
        this.#error ??= this.serverError(reader);
        if (this.#describing) {
          this.#describing = false;
          this.session.continueWith(this, (writer) => writer.begin(Frontend.Sync).end());
        }
        return;
      case Backend.CopyInResponse:
        // COPY … FROM STDIN runs through copyIn(); here the server gets a CopyFail.
        this.session.writeNow((writer) =>
          writer.begin(Frontend.CopyFail).cstring("COPY FROM STDIN runs through copyIn()").end()
        );
        return;
      default:
        // ParseComplete, BindComplete, CloseComplete, and a COPY out's data through query().
        return;
    }
  }

  ready(): void {
    const error = this.#error;
    if (error !== undefined) {
      if (
        this.#firstError === undefined && this.#prepare && this.params.length > 0 &&
        STALE_STATEMENT_ROUTINES.has((error.cause as PostgresError | undefined)?.routine ?? "") &&
        this.#description?.name
      ) {
        // A named statement that went stale (its table changed): prepared again, once.
        this.session.statements.delete(this.#key);
        this.#firstError = error;
        this.#stale = this.#description.name;
        this.#reset();
        this.session.retry(this);
        return;
      }
      this.settled = true;
      // A retry that failed too (in a transaction the first error aborted) reports the first.
      this.#reject(this.#firstError ?? error);
      return;
    }
    this.settled = true;
    const last = this.#lastRows;
    this.#resolve({
      rows: last?.rows ?? [],
      command: this.#command,
      rowCount: last?.count ?? this.#rowCount,
    });
  }

  #reset(): void {
    this.#error = undefined;
    this.#columns = null;
    this.#rows = [];
    this.#lastRows = undefined;
    this.#command = "";
    this.#rowCount = 0;
  }

  fail(error: QueryError): void {
    if (this.settled) return;
    this.settled = true;
    this.#reject(error);
  }

  /** The columns of the last statement that returned rows (`null`: none did). */
  get columnsShown(): Column[] | null {
    return this.#shown;
  }
}

/** An iterator's next step: a value, or the end with a return value, or a failure. */
interface Settle<T> {
  resolve(value: T): void;
  reject(error: unknown): void;
}

/**
 * COPY … FROM STDIN: the chunks are written as CopyData as fast as the socket takes them,
 * then CopyDone; a source that fails, or an abort, sends CopyFail (and a cancel request,
 * for a row the server is busy with).
 */
class CopyIn extends Exchange {
  readonly done: Promise<number>;
  #resolve!: (count: number) => void;
  #reject!: (error: unknown) => void;
  #count = 0;
  #error?: unknown;
  /** Resolves once the server asked for the data (CopyInResponse), or refused the COPY. */
  readonly started: Promise<void>;
  #start!: () => void;
  /** True once the server asked for the data. */
  copying = false;

  constructor(session: WireConnection, sql: string) {
    super(session, sql, []);
    this.done = new Promise<number>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.started = new Promise<void>((resolve) => this.#start = resolve);
  }

  write(writer: MessageWriter): void {
    writer.begin(Frontend.Query).cstring(this.sql).end();
    this.holdsWrites = true;
  }

  /**
   * Ends the COPY with CopyDone, or with CopyFail and `error` as its outcome. Later
   * statements are written once the server answered (and any cancel request is delivered).
   */
  finish(error?: unknown): void {
    if (error !== undefined) this.#error ??= error;
    this.session.writeNow((writer) => {
      if (error === undefined) writer.begin(Frontend.CopyDone).end();
      else writer.begin(Frontend.CopyFail).cstring("the COPY's source stopped").end();
    });
  }

  message(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.CopyInResponse:
        this.copying = true;
        this.#start();
        return;
      case Backend.CommandComplete:
        this.#count = commandTag(reader).count;
        return;
      case Backend.ErrorResponse:
        // The server ended the COPY (or never started it): what is still sent for it, it drops.
        this.#error ??= this.serverError(reader);
        this.#start();
        return;
    }
  }

  ready(): void {
    this.settled = true;
    this.#start();
    if (this.#error !== undefined) this.#reject(this.#error);
    else this.#resolve(this.#count);
  }

  fail(error: QueryError): void {
    if (this.settled) return;
    this.settled = true;
    this.#start();
    this.#reject(this.#error instanceof QueryError ? this.#error : error);
  }
}

/** COPY … TO STDOUT: CopyData chunks queued for the reader, the socket paused while it is behind. */
class CopyOut extends Exchange {
  /** The rows received since the reader last took them, joined as they arrive. */
  #buffer = new Uint8Array(COPY_OUT_CHUNK);
  #buffered = 0;
  #count = 0;
  #error?: QueryError;
  #over = false;
  /** Waiting for a chunk or the end: the reader, and whoever waits for the end. */
  #waiters: Array<() => void> = [];
  #discard = false;

  write(writer: MessageWriter): void {
    writer.begin(Frontend.Query).cstring(this.sql).end();
  }

  message(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.CopyData: {
        if (this.#discard) return;
        const length = reader.end - reader.at;
        if (this.#buffered + length > this.#buffer.length) {
          const grown = new Uint8Array(Math.max(this.#buffer.length * 2, this.#buffered + length));
          grown.set(this.#buffer.subarray(0, this.#buffered));
          this.#buffer = grown;
        }
        this.#buffer.set(reader.bytes.subarray(reader.at, reader.end), this.#buffered);
        this.#buffered += length;
        if (this.#buffered > COPY_OUT_HIGH_WATER) this.session.pause();
        if (this.#waiters.length > 0) this.#wake();
        return;
      }
      case Backend.CommandComplete:
        this.#count = commandTag(reader).count;
        return;
      case Backend.ErrorResponse:
        this.#error ??= this.serverError(reader);
        return;
    }
  }

  ready(): void {
    this.settled = true;
    this.#over = true;
    this.session.resume();
    this.#wake();
  }

  fail(error: QueryError): void {
    if (this.settled) return;
    this.settled = true;
    this.#over = true;
    this.#error ??= error;
    this.session.resume();
    this.#wake();
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }

  #change(): Promise<void> {
    return new Promise<void>((resolve) => this.#waiters.push(resolve));
  }

  /** The next chunk of everything queued, or `null` at the end; throws the statement's error. */
  async next(): Promise<Uint8Array | null> {
    while (this.#buffered === 0 && !this.#over) await this.#change();
    if (this.#buffered === 0) {
      if (this.#error !== undefined) throw this.#error;
      return null;
    }
    const chunk = this.#buffer.subarray(0, this.#buffered);
    this.#buffer = new Uint8Array(COPY_OUT_CHUNK);
    this.#buffered = 0;
    this.session.resume();
    return chunk;
  }

  /** The row count, once over. */
  get count(): number {
    return this.#count;
  }

  get over(): boolean {
    return this.#over;
  }

  /** Drops what arrives from now on (the reader left) and resumes the socket. */
  discard(): void {
    this.#discard = true;
    this.#buffered = 0;
    this.session.resume();
  }

  /** Settles once the exchange is over. */
  async end(): Promise<void> {
    while (!this.#over) await this.#change();
  }
}

/**
 * A portal read in batches: Parse and Describe, then Bind and Execute with a row limit and a
 * Flush per batch; Sync once the rows end or the reader leaves (after Close of the portal).
 * One batch is fetched ahead: the server makes the next batch while the reader goes through
 * the one it has, so at most two batches are held.
 */
class Portal extends Exchange {
  readonly #batchSize: number;
  #columns: Column[] | null = null;
  #parameterTypes: number[] = [];
  /** The rows of the batch the server is sending. */
  #rows: Row[] = [];
  /** A complete batch the reader has not asked for yet. */
  #ready?: Row[];
  #error?: QueryError;
  /** The reader, waiting for a batch. */
  #batch?: Settle<Row[] | null>;
  /** Sync was sent (the rows ended, the statement failed, or the portal was closed). */
  #complete = false;
  /** The reader left while a batch was coming: the portal closes once it is suspended. */
  #closing = false;
  #over = false;
  #overWaiters: Array<() => void> = [];
  /** True while the server works on a batch (a cancel request can stop it). */
  working = false;

  constructor(session: WireConnection, sql: string, params: readonly unknown[], batchSize: number) {
    super(session, sql, params);
    this.#batchSize = batchSize;
  }

  write(writer: MessageWriter): void {
    writeParse(writer, "", this.sql, declaredTypes(this.params));
    writer.begin(Frontend.Describe).bytes(STATEMENT).cstring("").end();
    writer.begin(Frontend.Flush).end();
    this.holdsWrites = true;
    this.working = true;
  }

  message(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.DataRow:
        this.#rows.push(readRow(reader, this.#columns!));
        return;
      case Backend.ParameterDescription: {
        const count = reader.int16();
        for (let i = 0; i < count; i++) this.#parameterTypes.push(reader.int32() >>> 0);
        return;
      }
      case Backend.RowDescription:
      case Backend.NoData: {
        if (type === Backend.RowDescription) {
          this.#columns = readColumns(reader, this.session.types);
        }
        let values: Array<string | null>;
        try {
          values = bindValues(this.session.types, this.params, this.#parameterTypes);
        } catch (error) {
          this.#error = this.clientError(
            `Cannot stream the rows: ${error instanceof Error ? error.message : String(error)}`,
            error,
          );
          this.#complete = true;
          this.session.writeNow((writer) => writer.begin(Frontend.Sync).end());
          return;
        }
        this.session.writeNow((writer) => {
          writeBind(writer, "", values);
          this.#execute(writer);
        });
        return;
      }
      case Backend.PortalSuspended: {
        this.working = false;
        const rows = this.#rows;
        this.#rows = [];
        if (this.#closing) {
          this.#close();
        } else if (this.#batch !== undefined) {
          const batch = this.#batch;
          this.#batch = undefined;
          batch.resolve(rows);
          this.#fetchAhead();
        } else {
          this.#ready = rows;
        }
        return;
      }
      case Backend.CommandComplete:
        this.working = false;
        this.#complete = true;
        this.session.writeNow((writer) => writer.begin(Frontend.Sync).end());
        return;
      case Backend.ErrorResponse:
        this.working = false;
        this.#error ??= this.serverError(reader);
        if (!this.#complete) {
          this.#complete = true;
          this.session.writeNow((writer) => writer.begin(Frontend.Sync).end());
        }
        return;
    }
  }

  #execute(writer: MessageWriter): void {
    this.working = true;
    writer.begin(Frontend.Execute).cstring("").int32(this.#batchSize).end();
    writer.begin(Frontend.Flush).end();
  }

  /** Asks for the next batch, unless the rows ended or the reader left. */
  #fetchAhead(): void {
    if (this.#complete || this.#closing || this.working) return;
    this.session.writeNow((writer) => this.#execute(writer));
  }

  /** Closes the suspended portal and ends the exchange. */
  #close(): void {
    this.#complete = true;
    this.session.writeNow((writer) => {
      writer.begin(Frontend.Close).bytes(PORTAL).cstring("").end();
      writer.begin(Frontend.Sync).end();
    });
  }

  ready(): void {
    this.settled = true;
    this.#finish();
  }

  fail(error: QueryError): void {
    if (this.settled) return;
    this.settled = true;
    this.#error ??= error;
    this.#finish();
  }

  #finish(): void {
    this.#over = true;
    const batch = this.#batch;
    this.#batch = undefined;
    if (batch !== undefined) {
      if (this.#error !== undefined) batch.reject(this.#error);
      else batch.resolve(this.#rows.length > 0 ? this.#rows : null);
      this.#rows = [];
    }
    for (const wake of this.#overWaiters.splice(0)) wake();
  }

  /** The next batch, or `null` once the rows ended; throws the statement's error. */
  next(): Promise<Row[] | null> {
    const ready = this.#ready;
    if (ready !== undefined) {
      this.#ready = undefined;
      this.#fetchAhead();
      return Promise.resolve(ready);
    }
    if (this.#over) {
      if (this.#error !== undefined) return Promise.reject(this.#error);
      const rows = this.#rows;
      this.#rows = [];
      return Promise.resolve(rows.length > 0 ? rows : null);
    }
    // A batch is on its way: one is always asked for while the reader has none.
    return new Promise<Row[] | null>((resolve, reject) => {
      this.#batch = { resolve, reject };
    });
  }

  /**
   * Closes the portal (the reader left early), once the batch on its way has arrived, and
   * waits for the session to be ready.
   */
  async close(): Promise<void> {
    this.#ready = undefined;
    if (!this.#over && !this.#complete) {
      if (this.working) this.#closing = true;
      else this.#close();
    }
    await this.ended();
  }

  /** Settles once the session is ready again (or lost). */
  ended(): Promise<void> {
    if (this.#over) return Promise.resolve();
    return new Promise<void>((resolve) => this.#overWaiters.push(resolve));
  }
}

/** The startup: authentication, the session's settings and keys, up to the first ReadyForQuery. */
class Startup extends Exchange {
  readonly done: Promise<void>;
  #resolve!: () => void;
  #reject!: (error: unknown) => void;
  #scram?: ScramSha256;
  readonly #endpoint: Endpoint;

  constructor(session: WireConnection, endpoint: Endpoint) {
    super(session, "", []);
    this.#endpoint = endpoint;
    this.done = new Promise<void>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.done.catch(() => {});
  }

  write(writer: MessageWriter): void {
    const parameters: Record<string, string> = {
      user: this.#endpoint.user,
      database: this.#endpoint.database,
      client_encoding: "UTF8",
      ...this.#endpoint.serverSettings,
    };
    writer.bytes(startupMessage(parameters));
  }

  message(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.Authentication:
        this.#authenticate(reader).catch((error) => {
          this.#reject(error);
          this.session.destroy();
        });
        return;
      case Backend.ErrorResponse:
        this.#reject(queryErrorOf(serverMessage(reader), "", []));
        return;
      case Backend.BackendKeyData:
        this.session.setKey(reader.int32(), reader.int32());
        return;
    }
  }

  async #authenticate(reader: MessageReader): Promise<void> {
    const code = reader.int32();
    if (code === 0) return;
    const password = this.#endpoint.password;
    if (code === 3 || code === 5 || code === 10) {
      if (password === undefined || password === "") {
        throw new QueryError(
          "the server asks for a password and none was given: put it in the connection " +
            "string or the `password` option",
          "",
          [],
          { sqlstate: "28P01" },
        );
      }
    }
    switch (code) {
      case 3: // cleartext
        return this.session.writeNow((writer) =>
          writer.begin(Frontend.Password).cstring(password!).end()
        );
      case 5: { // MD5
        const salt = Uint8Array.from(reader.bytes.subarray(reader.at, reader.at + 4));
        const answer = await md5Password(this.#endpoint.user, password!, salt);
        return this.session.writeNow((writer) =>
          writer.begin(Frontend.Password).cstring(answer).end()
        );
      }
      case 10: { // SASL: the mechanisms the server offers
        const mechanisms: string[] = [];
        for (let name = reader.cstring(); name !== ""; name = reader.cstring()) {
          mechanisms.push(name);
        }
        if (!mechanisms.includes("SCRAM-SHA-256")) {
          throw new QueryError(
            `the server offers only ${mechanisms.join(", ")} for passwords, which pgdbm ` +
              "does not speak; allow scram-sha-256 for this user in pg_hba.conf",
            "",
            [],
            { sqlstate: "28000" },
          );
        }
        const scram = this.#scram = new ScramSha256(password!);
        const first = new TextEncoder().encode(scram.clientFirstMessage());
        return this.session.writeNow((writer) =>
          writer.begin(Frontend.Password).cstring(scram.mechanism).int32(first.length)
            .bytes(first).end()
        );
      }
      case 11: { // SASL continue
        const serverFirst = textAt(reader.bytes, reader.at, reader.end);
        const final = await this.#scram!.clientFinalMessage(serverFirst);
        return this.session.writeNow((writer) =>
          writer.begin(Frontend.Password).bytes(new TextEncoder().encode(final)).end()
        );
      }
      case 12: // SASL final
        this.#scram!.verifyServerFinal(textAt(reader.bytes, reader.at, reader.end));
        return;
      default:
        throw new QueryError(
          `the server asks for an authentication method pgdbm does not speak (code ${code}); ` +
            "use scram-sha-256, md5, password or trust in pg_hba.conf",
          "",
          [],
          { sqlstate: "28000" },
        );
    }
  }

  ready(): void {
    this.settled = true;
    this.#resolve();
  }

  fail(error: QueryError): void {
    this.settled = true;
    this.#reject(error);
  }
}

/** One session: a socket, the statements in flight on it in order, and the ones waiting. */
class WireConnection implements DriverConnection {
  readonly #endpoint: Endpoint;
  #transport?: Transport;
  readonly #writer = new MessageWriter();
  readonly #reader = new MessageReader();
  /** Written, waiting for their answers, in order: the first is answered now. */
  readonly #inflight: Exchange[] = [];
  /** Not written yet. */
  readonly #outbox: Exchange[] = [];
  /** An exchange after which nothing may be written for now. */
  #blocked?: Exchange;
  #flushScheduled = false;
  /** Bytes of an incomplete message, kept between reads. */
  #pending: Buffer = Buffer.alloc(0);
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
  /** The session's named statements by SQL text. */
  readonly statements = new Map<string, Description>();
  readonly types = new TypeMap();
  /**
   * Types of this database's own (OIDs from {@link FIRST_USER_OID}) whose array types the
   * session has installed, or found it has none: the setup's, then each one a result showed.
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
   * statements (its pid, the server's array types), all within `connectTimeoutMs`.
   */
  static async open(endpoint: Endpoint): Promise<WireConnection> {
    const ms = endpoint.connectTimeoutMs;
    const connection = new WireConnection(endpoint);
    let opening: Promise<Transport> | undefined;
    const events = {
      data: (chunk: Buffer) => connection.#onData(chunk),
      close: () => connection.#onSocketClose(),
    };
    const connecting = deadline(ms, `the server did not answer within connectTimeoutMs (${ms} ms)`);
    // The setup statements are bounded by the server (`SET LOCAL statement_timeout`); this
    // only ends the wait for a server that stopped answering altogether.
    const settingUp = deadline(
      ms + SETUP_GRACE_MS,
      `the server did not answer the connection's setup within connectTimeoutMs (${ms} ms)`,
    );
    try {
      opening = openTransport(endpoint, endpoint.ssl, sslRequest(), events);
      connection.#transport = await Promise.race([opening, connecting.promise]);
      const startup = new Startup(connection, endpoint);
      connection.#send(startup);
      await Promise.race([startup.done, connecting.promise]);
      const all: Row[] = [];
      const setup = new Statement(connection, setupSql(ms), [], false, all);
      connection.#send(setup);
      await Promise.race([setup.result, settingUp.promise]);
      const row = all[0];
      connection.#pid = row.pid as number;
      connection.#serverVersion = row.version as string;
      connection.#install(arrayTypePairs(String(row.arrays ?? "")));
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
   * A result with the array types it showed that the session did not know yet (made after
   * it opened: an enum, a domain, a table's row type) parsed as arrays, as a session opened
   * after them would have: their array types are looked up and installed once, and the
   * values still text are parsed. When the look-up fails, the values stay text.
   */
  #withArrays(result: DriverResult, statement: Statement): DriverResult | Promise<DriverResult> {
    const columns = statement.columnsShown;
    let unknown: number[] | undefined;
    for (const column of columns ?? []) {
      const type = column.type;
      if (type >= FIRST_USER_OID && !this.#knownTypes.has(type)) (unknown ??= []).push(type);
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
      if (element >= FIRST_USER_OID) this.#knownTypes.add(element);
      if (array >= FIRST_USER_OID) this.#knownTypes.add(array);
    }
  }

  async copyIn(sql: string, chunks: AsyncIterable<string>, signal?: AbortSignal): Promise<number> {
    if (this.#closed) throw closedError(sql, []);
    signal?.throwIfAborted();
    const copy = new CopyIn(this, sql);
    this.#send(copy);
    const aborted = abortion(signal);
    let source: AsyncIterator<string> | undefined;
    let stopping: Promise<void> | undefined;
    /** Ends the COPY with CopyFail and a cancel request; the session ends if it does not answer. */
    const stop = (error: unknown) => {
      copy.finish(error);
      stopping ??= this.#stopWithin(copy, copy.done.then(() => {}, () => {}));
      return stopping;
    };
    const over = copy.done.then((): typeof OVER => OVER, (): typeof OVER => OVER);
    try {
      await Promise.race([copy.started, aborted.promise]);
      if (!copy.copying) return await copy.done;
      source = chunks[Symbol.asyncIterator]();
      while (true) {
        let next: IteratorResult<string> | typeof OVER;
        try {
          next = await Promise.race([source.next(), aborted.promise, over]);
        } catch (error) {
          if (error === ABORTED) throw error;
          // The caller's own records failed: the server rolls the COPY back.
          await stop(error);
          throw error;
        }
        if (next === OVER) {
          // The server ended the COPY (a bad row): its error is the outcome.
          source.return?.().catch(() => {});
          return await copy.done;
        }
        if (next.done) break;
        if (!this.#writeCopyData(next.value)) {
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

  /** Writes one chunk as CopyData; false when the socket asks the writer to wait. */
  #writeCopyData(text: string): boolean {
    if (this.#socketClosed) return true;
    return this.#transport!.write(this.#writer.begin(Frontend.CopyData).string(text).end().take());
  }

  #drained(): Promise<void> {
    return this.#transport!.drained();
  }

  /**
   * Sends a cancel request for `exchange` (now the one the session runs) and waits for
   * `ended`; ends the session when it does not end within {@link STOP_MS}.
   */
  async #stopWithin(exchange: Exchange, ended: Promise<void>): Promise<void> {
    if (this.#inflight[0] === exchange) {
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
      cancelled ??= this.#stopWithin(copy, copy.end());
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
        cancelled ??= this.#stopWithin(copy, copy.end());
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
      const last = this.#outbox.at(-1) ?? this.#inflight.at(-1)!;
      await settledExchange(last);
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
    const waiting = this.#outbox.indexOf(exchange);
    if (waiting >= 0) {
      this.#outbox.splice(waiting, 1);
      exchange.fail(
        new QueryError(CANCELED_MESSAGE, exchange.sql, exchange.params, { sqlstate: "57014" }),
      );
      return Promise.resolve();
    }
    if (this.#inflight[0] === exchange) return this.#sendCancel();
    // Settles once the request is delivered, or once the statement ended before its turn.
    return new Promise<void>((resolve) => {
      let sent = false;
      exchange.onHead = () => {
        sent = true;
        this.#sendCancel().then(resolve);
      };
      settledExchange(exchange).then(() => {
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
      const needed = this.#pendingLength + chunk.length;
      if (needed > this.#pending.length) {
        const grown = Buffer.allocUnsafe(Math.max(needed, this.#pending.length * 2));
        grown.set(this.#pending.subarray(0, this.#pendingLength));
        this.#pending = grown;
      }
      this.#pending.set(chunk, this.#pendingLength);
      bytes = this.#pending;
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
      this.#pending.copyWithin(0, at, end);
      this.#pendingLength = left;
    } else {
      if (left > this.#pending.length) {
        this.#pending = Buffer.allocUnsafe(Math.max(left, 64 * 1024));
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
        for (const listener of this.#notified) listener(channel, payload);
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
        const head = this.#inflight[0];
        const onHead = head?.onHead;
        if (onHead !== undefined) {
          head!.onHead = undefined;
          onHead();
        }
        if (this.#blocked === exchange) this.#release(exchange);
        return;
      }
    }
    const exchange = this.#inflight[0];
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
    const exchanges = [...this.#inflight, ...this.#outbox];
    this.#inflight.length = 0;
    this.#outbox.length = 0;
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

/** Settles when the exchange settles, whatever its outcome. */
function settledExchange(exchange: Exchange): Promise<void> {
  if (exchange.settled) return Promise.resolve();
  if (exchange instanceof Statement) return exchange.result.then(() => {}, () => {});
  if (exchange instanceof CopyIn) return exchange.done.then(() => {}, () => {});
  if (exchange instanceof CopyOut) return exchange.end();
  if (exchange instanceof Portal) return exchange.ended();
  if (exchange instanceof Startup) return exchange.done.then(() => {}, () => {});
  return Promise.resolve();
}

/**
 * A promise that rejects with a QueryError saying `message` after `ms` (and never settles
 * otherwise); `clear` stops its timer.
 */
function deadline(ms: number, message: string): { promise: Promise<never>; clear(): void } {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const promise = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new QueryError(message, "", [])), ms);
  });
  promise.catch(() => {});
  return { promise, clear: () => clearTimeout(timer) };
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
 * The setup of a new session, under timeouts of its own: one row with its pid, its version
 * and every array type with its element type as `element array parseAs` triples separated
 * by commas. The user's `statement_timeout` and `lock_timeout` are startup settings, meant
 * for the user's statements, and would otherwise fail the setup whenever the server is slow
 * or a session holds a lock on `pg_type`; the transaction's end restores them.
 */
function setupSql(timeoutMs: number): string {
  return [
    "BEGIN",
    `SET LOCAL statement_timeout = ${timeoutMs}`,
    "SET LOCAL lock_timeout = 0",
    `SELECT pg_backend_pid() AS pid, current_setting('server_version') AS version,
      (SELECT string_agg(DISTINCT b.oid::text || ' ' || b.typarray::text || ' ' ||
          (CASE WHEN b.typtype = 'd' THEN b.typbasetype ELSE b.oid END)::text, ',')
        FROM pg_catalog.pg_type a JOIN pg_catalog.pg_type b ON b.oid = a.typelem
        WHERE a.typcategory = 'A') AS arrays`,
    "COMMIT",
  ].join(";\n");
}

/** The pairs of the setup's `element array parseAs,…` list. */
function arrayTypePairs(list: string): ArrayTypePair[] {
  return list === "" ? [] : list.split(",").map((pair) => {
    const [element, array, parseAs] = pair.split(" ").map(Number);
    return [element, array, parseAs] as const;
  });
}
