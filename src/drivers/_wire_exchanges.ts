/**
 * The wire driver's exchanges: one unit of work each on a session (a statement, a COPY in or
 * out, a portal read in batches, the startup), answered in order. Everything the server sends
 * between an exchange's first message and its ReadyForQuery belongs to it; {@link ./wire.ts}
 * writes them, reads the socket and hands each message to the exchange it belongs to.
 *
 * @module
 */

import type { ResolvedSsl } from "../config.ts";
import type { DriverResult, Row, RunningQuery } from "./driver.ts";
import { QueryError } from "../errors.ts";
import { md5Password, ScramSha256 } from "./_auth.ts";
import { BinaryArray } from "./_wire_binary.ts";
import {
  Backend,
  Frontend,
  type MessageReader,
  type MessageWriter,
  type PostgresError,
  serverMessage,
  startupMessage,
  textAt,
} from "./_wire_protocol.ts";
import type { TextParser, TypeMap } from "./_wire_types.ts";

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

/** Everything a session needs to open, and to send its cancel requests. */
export interface Endpoint {
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

/** What an exchange asks of the session it runs on ({@link ./wire.ts}'s connection). */
export interface ExchangeSession {
  /** The session's parsers and serializers. */
  readonly types: TypeMap;
  /** The session's named statements by their key (declared types and text). */
  readonly statements: Map<string, Description>;
  /** A new name for a named prepared statement. */
  nextStatementName(): string;
  /** Writes the exchange's next messages and lets the exchanges behind it be written. */
  continueWith(exchange: Exchange, write: (writer: MessageWriter) => void): void;
  /** Writes messages of the exchange the session runs now. */
  writeNow(write: (writer: MessageWriter) => void): void;
  /** Runs a statement again, first of the waiting ones. */
  retry(exchange: Exchange): void;
  /** Cancels the exchange (see the connection's `cancel`). */
  cancel(exchange: Exchange): Promise<void>;
  /** Stops reading (a COPY out's reader is behind). */
  pause(): void;
  /** Resumes reading. */
  resume(): void;
  /** Notes the session's cancel key. */
  setKey(pid: number, secret: number): void;
  /** Ends the socket now. */
  destroy(): void;
  /** Writes data messages now; false when the writer should wait until they drained. */
  writeData(write: (writer: MessageWriter) => void): boolean;
}

/**
 * Whether a parameterless statement may be a `COPY … FROM STDIN`, which puts the session in
 * a mode where any statement behind it ends the session: such a statement holds the writes.
 */
function mayReadStdin(sql: string): boolean {
  return STDIN.test(sql) && COPY.test(sql);
}

const STDIN = /stdin/i;
const COPY = /copy/i;

/** One column of a result: its name and its parser (`undefined`: the text as it is). */
export interface Column {
  name: string;
  type: number;
  parse: TextParser | undefined;
}

/** What the server said of a statement it parsed: its parameter types and its columns. */
export interface Description {
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
export abstract class Exchange {
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
    readonly session: ExchangeSession,
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
  /** Settles once the exchange is over, whatever its outcome. */
  abstract ended(): Promise<void>;

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
export function queryErrorOf(
  error: PostgresError,
  sql: string,
  params: readonly unknown[],
): QueryError {
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

/** A parameter as Bind carries it: text, an array in binary, or NULL. */
type BoundValue = string | BinaryArray | null;

/**
 * The parameters for their declared types: text, or binary for the arrays
 * {@link BinaryArray} takes; throws a message for a value that has none.
 */
function bindValues(
  types: TypeMap,
  params: readonly unknown[],
  parameterTypes: readonly number[],
): BoundValue[] {
  const values: BoundValue[] = new Array(params.length);
  for (let i = 0; i < params.length; i++) {
    const value = params[i];
    if (value === null) {
      values[i] = null;
    } else if (value === undefined) {
      throw new TypeError(`parameter $${i + 1} is undefined; pass null for NULL`);
    } else {
      const type = parameterTypes[i] ?? 0;
      const binary = Array.isArray(value) ? BinaryArray.of(value, type) : undefined;
      values[i] = binary ?? types.serialize(value, type);
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

/**
 * Writes Bind of the unnamed portal with text results. Every value is text (one format code
 * for all) unless an array goes in binary (then a format code per value).
 */
function writeBind(
  writer: MessageWriter,
  statement: string,
  values: readonly BoundValue[],
): void {
  writer.begin(Frontend.Bind).cstring("").cstring(statement);
  let binary = false;
  for (let i = 0; i < values.length && !binary; i++) binary = values[i] instanceof BinaryArray;
  if (binary) {
    writer.int16(values.length);
    for (const value of values) writer.int16(value instanceof BinaryArray ? 1 : 0);
  } else {
    writer.int16(0);
  }
  writer.int16(values.length);
  for (const value of values) {
    if (value instanceof BinaryArray) value.write(writer);
    else writer.value(value);
  }
  writer.int16(0).end();
}

/** A statement of `query()`: the simple protocol without params, the extended one with. */
export class Statement extends Exchange implements RunningQuery {
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
    session: ExchangeSession,
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
      // A COPY … FROM STDIN here gets a CopyFail: nothing may reach the server before it.
      if (mayReadStdin(this.sql)) this.holdsWrites = true;
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
    let values: BoundValue[];
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

  ended(): Promise<void> {
    return this.result.then(() => {}, () => {});
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
export class CopyIn extends Exchange {
  readonly done: Promise<number>;
  #resolve!: (count: number) => void;
  #reject!: (error: unknown) => void;
  #count = 0;
  #error?: unknown;
  /** Resolves once the COPY statement was written (or the exchange ended before). */
  readonly sent: Promise<void>;
  #sent!: () => void;
  /**
   * True from the COPY statement's writing until the server ended the COPY. The data goes
   * right behind the statement, without waiting for the server's CopyInResponse (a round
   * trip less per COPY): a server that refuses the COPY drops it, as the protocol has it
   * drop copy messages outside a COPY.
   */
  copying = false;
  /** Whether the server began the COPY (its CopyInResponse came). */
  #started = false;

  constructor(session: ExchangeSession, sql: string) {
    super(session, sql, []);
    this.done = new Promise<number>((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.sent = new Promise<void>((resolve) => this.#sent = resolve);
  }

  write(writer: MessageWriter): void {
    writer.begin(Frontend.Query).cstring(this.sql).end();
    this.holdsWrites = true;
    this.copying = true;
    this.#sent();
  }

  /**
   * Ends the COPY with CopyDone, or with CopyFail and `error` as its outcome. Later
   * statements are written once the server answered (and any cancel request is delivered).
   */
  finish(error?: unknown): void {
    if (error !== undefined) this.#error ??= error;
    if (!this.copying) return;
    this.copying = false;
    this.session.writeNow((writer) => {
      if (error === undefined) writer.begin(Frontend.CopyDone).end();
      else writer.begin(Frontend.CopyFail).cstring("the COPY's source stopped").end();
    });
  }

  message(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.CopyInResponse:
        this.#started = true;
        return;
      case Backend.CommandComplete:
        // Before the COPY started, the tag is a statement's sent ahead of it in the same query.
        if (this.#started) this.copying = false;
        this.#count = commandTag(reader).count;
        return;
      case Backend.ErrorResponse:
        // The server ended the COPY (or never started it): nothing more is sent for it.
        this.copying = false;
        this.#error ??= this.serverError(reader);
        this.#sent();
        return;
    }
  }

  /**
   * Writes one chunk as CopyData while the server takes it (a COPY it ended takes nothing,
   * and must not: the session's next COPY would read it); false when the writer should wait.
   */
  send(chunk: string | Uint8Array): boolean {
    if (!this.copying) return true;
    return this.session.writeData((writer) => {
      writer.begin(Frontend.CopyData);
      if (typeof chunk === "string") writer.string(chunk);
      else writer.bytes(chunk);
      writer.end();
    });
  }

  ready(): void {
    this.settled = true;
    this.copying = false;
    this.#sent();
    if (this.#error !== undefined) this.#reject(this.#error);
    else this.#resolve(this.#count);
  }

  fail(error: QueryError): void {
    if (this.settled) return;
    this.settled = true;
    this.copying = false;
    this.#sent();
    this.#reject(this.#error instanceof QueryError ? this.#error : error);
  }

  ended(): Promise<void> {
    return this.done.then(() => {}, () => {});
  }
}

/** COPY … TO STDOUT: CopyData chunks queued for the reader, the socket paused while it is behind. */
export class CopyOut extends Exchange {
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
    if (mayReadStdin(this.sql)) this.holdsWrites = true;
  }

  message(type: number, reader: MessageReader): void {
    switch (type) {
      case Backend.CopyInResponse:
        this.session.writeNow((writer) =>
          writer.begin(Frontend.CopyFail).cstring(
            "copyOut() runs COPY … TO STDOUT; COPY … FROM STDIN runs through copyIn()",
          ).end()
        );
        return;
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

  async ended(): Promise<void> {
    while (!this.#over) await this.#change();
  }
}

/** Batches asked for beyond the one the reader goes through. */
const BATCHES_AHEAD = 2;

/**
 * A portal read in batches: Parse and Describe, then Bind and Execute with a row limit and a
 * Flush per batch; Sync once the rows end or the reader leaves (after Close of the portal).
 * Batches are asked for ahead of the reader: while it goes through one, the server has the
 * Execute of the next queued behind the one it is answering, so it never waits for a round
 * trip. At most {@link BATCHES_AHEAD} batches wait beside the reader's.
 */
export class Portal extends Exchange {
  readonly #batchSize: number;
  #columns: Column[] | null = null;
  #parameterTypes: number[] = [];
  /** The rows of the batch the server is sending. */
  #rows: Row[] = [];
  /** Complete batches the reader has not asked for yet. */
  #ready: Row[][] = [];
  /** Executes sent and not answered yet. */
  #outstanding = 0;
  #error?: QueryError;
  /** The reader, waiting for a batch. */
  #batch?: Settle<Row[] | null>;
  /** Sync was sent (the rows ended, the statement failed, or the portal was closed). */
  #complete = false;
  /** The reader left while batches were coming: the portal closes once they have. */
  #closing = false;
  #over = false;
  #overWaiters: Array<() => void> = [];
  /** True while the portal is being described, or until it is bound. */
  #describing = true;

  constructor(
    session: ExchangeSession,
    sql: string,
    params: readonly unknown[],
    batchSize: number,
  ) {
    super(session, sql, params);
    this.#batchSize = batchSize;
  }

  /** True while the server works for the portal (a cancel request can stop it). */
  get working(): boolean {
    return this.#describing || this.#outstanding > 0;
  }

  write(writer: MessageWriter): void {
    writeParse(writer, "", this.sql, declaredTypes(this.params));
    writer.begin(Frontend.Describe).bytes(STATEMENT).cstring("").end();
    writer.begin(Frontend.Flush).end();
    this.holdsWrites = true;
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
      case Backend.NoData:
        if (type === Backend.RowDescription) {
          this.#columns = readColumns(reader, this.session.types);
        }
        this.#bind();
        return;
      case Backend.PortalSuspended:
        this.#outstanding--;
        this.#suspended();
        return;
      case Backend.CommandComplete:
        // An Execute queued behind the last rows finds the portal done: its answer is empty.
        this.#outstanding--;
        this.#sync();
        return;
      case Backend.ErrorResponse:
        // The server skips what was queued up to the Sync.
        this.#outstanding = 0;
        this.#describing = false;
        this.#error ??= this.serverError(reader);
        this.#sync();
        return;
    }
  }

  #bind(): void {
    this.#describing = false;
    // The reader left while the statement was described: nothing to read.
    if (this.#closing) return this.#sync();
    let values: BoundValue[];
    try {
      values = bindValues(this.session.types, this.params, this.#parameterTypes);
    } catch (error) {
      this.#error = this.clientError(
        `Cannot stream the rows: ${error instanceof Error ? error.message : String(error)}`,
        error,
      );
      this.#sync();
      return;
    }
    this.session.writeNow((writer) => {
      writeBind(writer, "", values);
      for (let i = 0; i < BATCHES_AHEAD; i++) this.#execute(writer);
    });
  }

  /** A batch is complete: the reader's if it waits, else queued; more are asked for. */
  #suspended(): void {
    const rows = this.#rows;
    this.#rows = [];
    if (this.#closing) {
      if (this.#outstanding === 0) this.#close();
      return;
    }
    const batch = this.#batch;
    if (batch !== undefined) {
      this.#batch = undefined;
      batch.resolve(rows);
    } else {
      this.#ready.push(rows);
    }
    this.#askAhead();
  }

  #execute(writer: MessageWriter): void {
    this.#outstanding++;
    writer.begin(Frontend.Execute).cstring("").int32(this.#batchSize).end();
    writer.begin(Frontend.Flush).end();
  }

  /** Asks for batches until {@link BATCHES_AHEAD} are queued or on their way. */
  #askAhead(): void {
    if (this.#complete || this.#closing) return;
    const wanted = BATCHES_AHEAD - this.#outstanding - this.#ready.length;
    if (wanted <= 0) return;
    this.session.writeNow((writer) => {
      for (let i = 0; i < wanted; i++) this.#execute(writer);
    });
  }

  /** Ends the exchange with Sync (once). */
  #sync(): void {
    if (this.#complete) return;
    this.#complete = true;
    this.session.writeNow((writer) => writer.begin(Frontend.Sync).end());
  }

  /** Closes the suspended portal and ends the exchange. */
  #close(): void {
    if (this.#complete) return;
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
    this.#outstanding = 0;
    this.#describing = false;
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
    const ready = this.#ready.shift();
    if (ready !== undefined) {
      this.#askAhead();
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
   * Closes the portal (the reader left early), once the batches on their way have arrived,
   * and waits for the session to be ready.
   */
  async close(): Promise<void> {
    this.#ready = [];
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
export class Startup extends Exchange {
  readonly done: Promise<void>;
  #resolve!: () => void;
  #reject!: (error: unknown) => void;
  #scram?: ScramSha256;
  readonly #endpoint: Endpoint;

  constructor(session: ExchangeSession, endpoint: Endpoint) {
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
      case Backend.Authentication: {
        const fail = (error: unknown) => {
          this.#reject(error);
          this.session.destroy();
        };
        // Decided before anything else the server sent is read: a setup statement sent with
        // the startup message (no password given) makes the server end the session at once.
        const missing = this.#missingPassword(reader);
        if (missing !== undefined) return fail(missing);
        this.#authenticate(reader).catch(fail);
        return;
      }
      case Backend.ErrorResponse:
        this.#reject(queryErrorOf(serverMessage(reader), "", []));
        return;
      case Backend.BackendKeyData:
        this.session.setKey(reader.int32(), reader.int32());
        return;
    }
  }

  /** The error of a password request when no password was given, else `undefined`. */
  #missingPassword(reader: MessageReader): QueryError | undefined {
    const code = (reader.bytes[reader.at] << 24) | (reader.bytes[reader.at + 1] << 16) |
      (reader.bytes[reader.at + 2] << 8) | reader.bytes[reader.at + 3];
    if (code !== 3 && code !== 5 && code !== 10) return undefined;
    if (this.#endpoint.password) return undefined;
    return new QueryError(
      "the server asks for a password and none was given: put it in the connection " +
        "string or the `password` option",
      "",
      [],
      { sqlstate: "28P01" },
    );
  }

  async #authenticate(reader: MessageReader): Promise<void> {
    const code = reader.int32();
    if (code === 0) return;
    const password = this.#endpoint.password;
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

  ended(): Promise<void> {
    return this.done.then(() => {}, () => {});
  }
}
