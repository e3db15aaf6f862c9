/**
 * The query methods shared by {@link DatabaseManager}, {@link Transaction} and
 * {@link Connection}: each expands templates for its schema, then runs on its runner (the
 * shared pool, or one leased connection).
 *
 * @module
 */

import { adviseQueryError, adviseReturningId, refuseUndefinedParams } from "./_advice.ts";
import { encodeCopyRows } from "./_copy_text.ts";
import { hasReturning } from "./_sql.ts";
import { instrumented, instrumentedChunks } from "./_instrument.ts";
import {
  copyOptionsClause,
  type CopyQueryOptions,
  type CopyTableOptions,
  inlineParameters,
  quoteParametersSql,
} from "./_copy_out.ts";
import { activeTracer } from "./_telemetry.ts";
import type { ResolvedConfig } from "./config.ts";
import type { DriverResult, Row } from "./drivers/driver.ts";
import { QueryError, SchemaError, ValidationError } from "./errors.ts";
import type { QueryOptions } from "./pool/pool.ts";
import { BatchRows, type Reporter, type StreamOptions } from "./stream.ts";
import type { InferOutput, StandardSchemaV1 } from "./standard_schema.ts";
import { assertIdentifier, expandTemplate, quoteIdentifier } from "./template.ts";
import { assertChannel } from "./listen.ts";

export type { Row };

/** What `execute()` returns. */
export interface ExecuteResult {
  /** The command verb, such as `"INSERT"` or `"CREATE TABLE"`. */
  command: string;
  /** Rows affected (or returned). */
  rowCount: number;
}

/** Options of `fetchValue()`. */
export interface FetchValueOptions extends QueryOptions {
  /**
   * Which column: its index (from 0) or its name.
   * @default {0}
   */
  column?: number | string;
}

/** Options of `copyRecordsToTable()`. */
export interface CopyOptions {
  /**
   * Columns the records fill, in order. Left out: the first object's keys for object
   * records, all the table's columns for array records.
   */
  columns?: readonly string[];
}

/** Records for `copyRecordsToTable()`: arrays of values, from an array or (async) iterable. */
export type CopyRecords =
  | Iterable<readonly unknown[] | CopyObject>
  | AsyncIterable<readonly unknown[] | CopyObject>;

/** A record for `copyRecordsToTable()` as an object: column name → value. */
export type CopyObject = Readonly<Record<string, unknown>>;

/** Where a query object sends its SQL. Internal. */
export interface Runner {
  /** The configuration of the pool, for the hook and spans; `undefined` before connecting. */
  readonly config: ResolvedConfig | undefined;
  /** Runs one statement. */
  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult>;
  /** Runs one read: on a replica when the pool has them and this is not a transaction. */
  read(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult>;
  /** Runs one statement for each parameter list, pipelined and atomically. */
  batch(sql: string, paramsList: readonly (readonly unknown[])[]): Promise<number>;
  /** Streams COPY text. */
  copyIn(sql: string, chunks: AsyncIterable<string | Uint8Array>): Promise<number>;
  /**
   * Yields the rows of a query in batches from a server-side cursor on one connection,
   * sending each statement of the cursor through `report`.
   */
  stream(
    sql: string,
    params: readonly unknown[],
    options: StreamOptions | undefined,
    report: Reporter,
  ): AsyncGenerator<Row[]>;
  /** Yields the output of a `COPY … TO STDOUT` on one connection; returns its row count. */
  copyOut(sql: string, signal: AbortSignal | undefined): AsyncGenerator<Uint8Array, number>;
}

const TRAILING = /[\s;]+$/;

/**
 * The query methods. Every method expands `{{tables.name}}` and `{{schema}}` for this
 * object's schema first; `params` bind to `$1…$n` (values are never put into the text).
 */
export abstract class Queries {
  readonly #runner: Runner;
  readonly #schema: string | undefined;

  /**
   * Builds the query methods over a runner; subclasses call it.
   *
   * @param runner Where the SQL runs.
   * @param schema The schema templates expand to.
   */
  protected constructor(runner: Runner, schema: string | undefined) {
    this.#runner = runner;
    this.#schema = schema;
  }

  /** The schema templates expand to (`undefined`: none, tables unqualified). */
  get schema(): string | undefined {
    return this.#schema;
  }

  /**
   * Sends one statement (a read to `read`), reporting it to the `onQuery` hook and to
   * OpenTelemetry when either is in use.
   */
  #send(
    sql: string,
    params: readonly unknown[],
    options: QueryOptions | undefined,
    read: boolean,
  ): Promise<DriverResult> {
    const runner = this.#runner;
    return this.#report(
      sql,
      params,
      () => read ? runner.read(sql, params, options) : runner.query(sql, params, options),
    ).catch((error) => {
      throw adviseQueryError(error, sql, params, runner.config);
    });
  }

  /** Runs `run`, reporting it as `sql` when the `onQuery` hook or OpenTelemetry is in use. */
  readonly #report: Reporter = (sql, params, run) => {
    const tracer = activeTracer();
    if (tracer === undefined && this.#runner.config?.onQuery === undefined) return run();
    return instrumented(this.#runner.config, tracer, this.#schema, sql, params, run);
  };

  /**
   * Expands templates without running anything (for debugging and logs).
   *
   * @param sql SQL with `{{tables.name}}` / `{{schema}}` placeholders.
   * @returns The SQL that would be sent.
   * @throws {SchemaError} When a placeholder names an invalid identifier.
   */
  prepareQuery(sql: string): string {
    return expandTemplate(sql, this.#schema);
  }

  /**
   * Runs a statement and reports what it did. Without `params`, several statements
   * separated by `;` may be given (simple protocol).
   *
   * @param sql The statement.
   * @param params Values for `$1…$n`.
   * @param options Timeout and abort signal.
   * @returns The command verb and the number of rows affected.
   * @throws {QueryError} When the server rejects the statement.
   * @throws {TimeoutError} When it ran past its time limit (an abort rejects with `signal.reason`).
   */
  execute(sql: string, params?: readonly unknown[], options?: QueryOptions): Promise<ExecuteResult>;
  /**
   * Runs a statement written as a tagged template: each `${value}` is sent as a parameter
   * (`$1…$n`), and `{{…}}` placeholders expand in the literal text only.
   *
   * @example
   * ```ts ignore
   * await db.execute`UPDATE {{tables.users}} SET name = ${name} WHERE id = ${id}`;
   * ```
   */
  execute(strings: TemplateStringsArray, ...values: unknown[]): Promise<ExecuteResult>;
  async execute(sql: string | TemplateStringsArray, ...rest: unknown[]): Promise<ExecuteResult> {
    const call = callOf(sql, rest);
    const result = await this.#send(this.prepareQuery(call.sql), call.params, call.options, false);
    return { command: result.command, rowCount: result.rowCount };
  }

  /**
   * Runs one statement once per parameter list, pipelined in one batch, atomically: all
   * of them or none.
   *
   * @param sql The statement.
   * @param paramsList One parameter list per execution.
   * @returns The total number of rows affected.
   * @throws {QueryError} When any execution fails (then none took effect).
   */
  async executeMany(sql: string, paramsList: readonly (readonly unknown[])[]): Promise<number> {
    if (!Array.isArray(paramsList)) {
      throw new TypeError("Cannot run executeMany(): 'paramsList' must be an array of arrays");
    }
    if (paramsList.length === 0) return 0;
    for (const params of paramsList) refuseUndefinedParams(params);
    const text = this.prepareQuery(sql);
    const runner = this.#runner;
    const tracer = activeTracer();
    if (tracer === undefined && runner.config?.onQuery === undefined) {
      return await runner.batch(text, paramsList);
    }
    const result = await instrumented(runner.config, tracer, this.#schema, text, [], async () => ({
      rowCount: await runner.batch(text, paramsList),
    }));
    return result.rowCount;
  }

  /**
   * Sends a notification with `pg_notify(channel, payload)`. Inside a transaction it is
   * delivered when the transaction commits, and not at all when it rolls back. The channel
   * is a name global to the database: it is not prefixed with the schema and templates are
   * not expanded in it.
   *
   * @example Notify the listeners of a channel
   * ```ts ignore
   * await db.notify("orders_changed", JSON.stringify({ id: 42 }));
   * ```
   *
   * @param channel The channel, 1 to 63 bytes.
   * @param payload The text listeners receive (PostgreSQL takes up to 7999 bytes).
   * @throws {TypeError} When `channel` or `payload` is not a string.
   * @throws {RangeError} When `channel` is empty or longer than 63 bytes.
   * @throws {QueryError} When the server refuses it (a payload too long).
   */
  async notify(channel: string, payload = ""): Promise<void> {
    assertChannel(channel);
    if (typeof payload !== "string") {
      throw new TypeError(
        `Cannot notify "${channel}": the payload must be a string (JSON.stringify an object); ` +
          `got ${typeof payload}`,
      );
    }
    await this.#send("SELECT pg_notify($1, $2)", [channel, payload], undefined, false);
  }

  /**
   * Runs an `INSERT` and returns the new row's `id`, appending `RETURNING id` unless the
   * statement already has a `RETURNING` clause (then its first column is returned).
   *
   * @param sql The `INSERT` statement.
   * @param params Values for `$1…$n`.
   * @param options Timeout and abort signal.
   * @returns The id, or `null` when no row was inserted.
   */
  executeAndReturnId<T = unknown>(
    sql: string,
    params?: readonly unknown[],
    options?: QueryOptions,
  ): Promise<T | null>;
  /** The same, written as a tagged template (`${value}` is a parameter). */
  executeAndReturnId<T = unknown>(
    strings: TemplateStringsArray,
    ...values: unknown[]
  ): Promise<T | null>;
  async executeAndReturnId<T = unknown>(
    sql: string | TemplateStringsArray,
    ...rest: unknown[]
  ): Promise<T | null> {
    const { sql: source, params, options } = callOf(sql, rest);
    let text = this.prepareQuery(source);
    const appended = !hasReturning(text);
    if (appended) text = text.replace(TRAILING, "") + " RETURNING id";
    const { rows } = await this.#send(text, params, options, false).catch((error) => {
      throw appended ? adviseReturningId(error, params) : error;
    });
    if (rows.length === 0) return null;
    const row = rows[0];
    return ("id" in row ? row.id : Object.values(row)[0]) as T;
  }

  /**
   * Fetches the first row.
   *
   * @param sql The query.
   * @param params Values for `$1…$n`.
   * @param options Timeout and abort signal.
   * @returns The first row as a plain object, or `null` when there is none.
   */
  fetchOne<T = Row>(
    sql: string,
    params?: readonly unknown[],
    options?: QueryOptions,
  ): Promise<T | null>;
  /**
   * The same, written as a tagged template: each `${value}` is sent as a parameter, and
   * `{{…}}` placeholders expand in the literal text only (a value never becomes SQL).
   *
   * @example
   * ```ts ignore
   * const order = await db.fetchOne`SELECT * FROM {{tables.orders}} WHERE id = ${id}`;
   * ```
   */
  fetchOne<T = Row>(strings: TemplateStringsArray, ...values: unknown[]): Promise<T | null>;
  async fetchOne<T = Row>(
    sql: string | TemplateStringsArray,
    ...rest: unknown[]
  ): Promise<T | null> {
    const call = callOf(sql, rest);
    const { rows } = await this.#send(this.prepareQuery(call.sql), call.params, call.options, true);
    return (rows[0] ?? null) as T | null;
  }

  /**
   * Fetches every row.
   *
   * @param sql The query.
   * @param params Values for `$1…$n`.
   * @param options Timeout and abort signal.
   * @returns The rows as plain objects.
   */
  fetchAll<T = Row>(sql: string, params?: readonly unknown[], options?: QueryOptions): Promise<T[]>;
  /** The same, written as a tagged template (`${value}` is a parameter). */
  fetchAll<T = Row>(strings: TemplateStringsArray, ...values: unknown[]): Promise<T[]>;
  async fetchAll<T = Row>(sql: string | TemplateStringsArray, ...rest: unknown[]): Promise<T[]> {
    const call = callOf(sql, rest);
    const { rows } = await this.#send(this.prepareQuery(call.sql), call.params, call.options, true);
    return rows as T[];
  }

  /**
   * Streams the rows of a query, `batchSize` rows per round trip, in constant memory.
   * Outside a transaction it holds one connection until the loop ends, reading a portal of
   * the extended protocol (a cursor in a transaction of its own through a transaction pooler
   * or on PGlite); leaving the loop early (`break`, `throw`) or aborting `signal` closes it
   * and frees the connection. In a transaction (`tx.stream`) or on an acquired connection
   * it is a server-side cursor on that connection, so other statements can run between rows.
   *
   * @param sql The query.
   * @param params Values for `$1…$n`.
   * @param options `batchSize` (default 5000) and `signal`.
   * @returns The rows, as plain objects.
   * @throws {RangeError} When `batchSize` is not a positive integer.
   *
   * @example Export a large table (needs a server)
   * ```ts ignore
   * for await (const order of db.stream("SELECT * FROM {{tables.orders}} WHERE total > $1", [100])) {
   *   console.log(order);
   * }
   * ```
   */
  stream<T = Row>(
    sql: string,
    params?: readonly unknown[],
    options?: StreamOptions,
  ): AsyncIterable<T>;
  /** The same, written as a tagged template (`${value}` is a parameter). */
  stream<T = Row>(strings: TemplateStringsArray, ...values: unknown[]): AsyncIterable<T>;
  stream<T = Row>(sql: string | TemplateStringsArray, ...rest: unknown[]): AsyncIterable<T> {
    const call = callOf<StreamOptions>(sql, rest);
    const text = this.prepareQuery(call.sql);
    const batches = this.#runner.stream(text, call.params, call.options, this.#report);
    return new BatchRows<T>(batches, call.options?.signal);
  }

  /**
   * Copies a table of this schema out with `COPY … TO STDOUT`, as bytes of COPY text or CSV
   * (PostgreSQL's own encoding of every type), without loading it into memory. The COPY runs
   * on one connection, held until the loop ends; leaving the loop early (`break`, `throw`) or
   * aborting `signal` stops the COPY on the server and frees the connection. In a
   * transaction (`tx.copyFromTable`) it runs in a savepoint, so that leaving early does not
   * abort the transaction. On the embedded engine (PGlite) the whole output is made before
   * the first chunk.
   *
   * @param table The table name, unqualified: this object's schema is applied.
   * @param options `columns`, `format` ("text" or "csv"), `header`, `delimiter`, `null`,
   *   `signal`.
   * @returns The output, in chunks of whole or partial lines.
   * @throws {SchemaError} When the table or a column name is not a valid identifier.
   * @throws {RangeError} When an option has a value COPY cannot take.
   * @throws {QueryError} When the server fails the COPY, before or during it.
   *
   * @example Export a table as CSV (needs a server)
   * ```ts ignore
   * const file = await Deno.open("orders.csv", { write: true, create: true });
   * for await (const chunk of db.copyFromTable("orders", { format: "csv", header: true })) {
   *   await file.write(chunk);
   * }
   * file.close();
   * ```
   */
  copyFromTable(table: string, options: CopyTableOptions = {}): AsyncIterable<Uint8Array> {
    assertIdentifier(table, "table");
    const columns = options.columns ?? [];
    for (const column of columns) assertIdentifier(column, "column");
    const list = columns.length > 0 ? ` (${columns.map(quoteIdentifier).join(", ")})` : "";
    const sql = `COPY ${this.prepareQuery(`{{tables.${table}}}`)}${list} TO STDOUT` +
      copyOptionsClause(options);
    return this.#copyOut(sql, [], () => Promise.resolve(sql), options.signal);
  }

  /**
   * Copies the rows of a query out with `COPY (query) TO STDOUT`, as bytes of COPY text or
   * CSV, like {@link copyFromTable}. COPY takes no bind parameters: each of `params` is
   * quoted by the server (`quote_nullable($n::text)`, one statement before the COPY) and the
   * literal replaces its `$n`, so a value is never SQL and a `$n` inside a string or a
   * comment is left alone. A value is therefore read as its text form, as a string literal
   * in that place would be (`$1::int` and `id > $1` work as with a bound parameter).
   *
   * @param sql The query, with `{{tables.name}}` placeholders and `$1…$n`.
   * @param params Values for `$1…$n`.
   * @param options `format` ("text" or "csv"), `header`, `delimiter`, `null`, `signal`.
   * @returns The output, in chunks of whole or partial lines.
   * @throws {RangeError} When an option has a value COPY cannot take, or `$n` has no value.
   * @throws {QueryError} When the server fails the COPY, before or during it.
   *
   * @example Export the rows of a query (needs a server)
   * ```ts ignore
   * for await (
   *   const chunk of db.copyFromQuery("SELECT id, total FROM {{tables.orders}} WHERE id > $1", [10])
   * ) {
   *   console.log(new TextDecoder().decode(chunk));
   * }
   * ```
   */
  copyFromQuery(
    sql: string,
    params?: readonly unknown[],
    options?: CopyQueryOptions,
  ): AsyncIterable<Uint8Array>;
  /** The same, written as a tagged template (`${value}` is a parameter). */
  copyFromQuery(strings: TemplateStringsArray, ...values: unknown[]): AsyncIterable<Uint8Array>;
  copyFromQuery(sql: string | TemplateStringsArray, ...rest: unknown[]): AsyncIterable<Uint8Array> {
    const call = callOf<CopyQueryOptions>(sql, rest);
    const options = call.options ?? {};
    const clause = copyOptionsClause(options);
    const query = this.prepareQuery(call.sql).replace(TRAILING, "");
    // Checks that every $n has a value before anything is sent.
    inlineParameters(query, call.params.map(() => "NULL"));
    const literals = async () => {
      if (call.params.length === 0) return [];
      // Part of the COPY for the hook and spans: reported alone, its values would show.
      const sent = quoteParametersSql(call.params.length);
      const { rows } = await this.#runner.query(sent, call.params);
      return Object.values(rows[0]).map((literal) => literal as string);
    };
    return this.#copyOut(
      `COPY (${query}\n) TO STDOUT${clause}`,
      call.params,
      // The line break ends a `--` comment at the end of the query.
      async () => `COPY (${inlineParameters(query, await literals())}\n) TO STDOUT${clause}`,
      options.signal,
    );
  }

  /**
   * Runs a COPY out on the runner. It is reported as `shown` with `params` (the values stay
   * out of the reported text), the statement sent being made by `statement` (which quotes
   * the values on the server: part of the COPY's time).
   */
  async *#copyOut(
    shown: string,
    params: readonly unknown[],
    statement: () => Promise<string>,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<Uint8Array, number> {
    const runner = this.#runner;
    const chunks = (async function* () {
      return yield* runner.copyOut(await statement(), signal);
    })();
    const tracer = activeTracer();
    if (tracer === undefined && runner.config?.onQuery === undefined) return yield* chunks;
    return yield* instrumentedChunks(runner.config, tracer, this.#schema, shown, params, chunks);
  }

  /**
   * Fetches one value: a column of the first row.
   *
   * @param sql The query.
   * @param params Values for `$1…$n`.
   * @param options `column` (index or name, default 0), timeout and abort signal.
   * @returns The value, or `null` when there is no row.
   * @throws {RangeError} When the column does not exist in the result.
   */
  fetchValue<T = unknown>(
    sql: string,
    params?: readonly unknown[],
    options?: FetchValueOptions,
  ): Promise<T | null>;
  /** The same, written as a tagged template (`${value}` is a parameter; first column). */
  fetchValue<T = unknown>(strings: TemplateStringsArray, ...values: unknown[]): Promise<T | null>;
  async fetchValue<T = unknown>(
    sql: string | TemplateStringsArray,
    ...rest: unknown[]
  ): Promise<T | null> {
    const call = callOf<FetchValueOptions>(sql, rest);
    const { rows } = await this.#send(this.prepareQuery(call.sql), call.params, call.options, true);
    const row = rows[0];
    if (row === undefined) return null;
    const column = call.options?.column ?? 0;
    if (typeof column === "string") {
      if (!(column in row)) throw missingColumn(column, row);
      return row[column] as T;
    }
    const values = Object.values(row);
    if (column >= values.length || column < 0) throw missingColumn(column, row);
    return values[column] as T;
  }

  /**
   * Fetches the first row and validates it with a Standard Schema validator (Zod,
   * Valibot, ArkType…).
   *
   * @param model The validator.
   * @param sql The query.
   * @param params Values for `$1…$n`.
   * @returns The validated (and converted) row, or `null` when there is none.
   * @throws {ValidationError} When the row does not pass, with the validator's issues.
   */
  async fetchAsModel<S extends StandardSchemaV1>(
    model: S,
    sql: string,
    params: readonly unknown[] = [],
    options?: QueryOptions,
  ): Promise<InferOutput<S> | null> {
    const row = await this.fetchOne(sql, params, options);
    return row === null ? null : await validate(model, row, 0);
  }

  /**
   * Fetches every row and validates each with a Standard Schema validator.
   *
   * @param model The validator.
   * @param sql The query.
   * @param params Values for `$1…$n`.
   * @returns The validated rows.
   * @throws {ValidationError} When a row does not pass; the message names its index.
   */
  async fetchAllAsModel<S extends StandardSchemaV1>(
    model: S,
    sql: string,
    params: readonly unknown[] = [],
    options?: QueryOptions,
  ): Promise<InferOutput<S>[]> {
    const rows = await this.fetchAll(sql, params, options);
    const out: InferOutput<S>[] = [];
    for (let i = 0; i < rows.length; i++) out.push(await validate(model, rows[i], i));
    return out;
  }

  /**
   * Copies records into a table of this schema with `COPY … FROM STDIN` (the fastest way
   * to load rows). Values are encoded for COPY exactly: tabs, newlines, backslashes,
   * `null`, unicode, `Uint8Array` (bytea), arrays, dates and JSON objects.
   *
   * @param table The table name, unqualified: this object's schema is applied.
   * @param records One row each, from an array or an (async) iterable: arrays of values, or
   *   objects keyed by column (then the columns are `options.columns`, else the first
   *   object's keys, which every object must have exactly: another key would be lost).
   * @param options The columns the values fill, in order.
   * @returns The number of rows copied.
   * @throws {SchemaError} When the table or a column name is not a valid identifier.
   * @throws {RangeError} When a record has the wrong number of values, an object lacks a
   *   column or has a key that is not one, or arrays and objects are mixed (nothing is
   *   copied).
   * @throws {unknown} What iterating `records` threw, as it is (the same object; nothing is
   *   copied).
   *
   * @example Load rows (needs a server)
   * ```ts ignore
   * await db.copyRecordsToTable("users", [["a@x.io", "Ann"], ["b@x.io", null]], {
   *   columns: ["email", "name"],
   * });
   * ```
   */
  async copyRecordsToTable(
    table: string,
    records: CopyRecords,
    options: CopyOptions = {},
  ): Promise<number> {
    assertIdentifier(table, "table");
    const { rows, objectColumns } = await recordRows(records, options.columns);
    const columns = objectColumns ?? options.columns ?? [];
    for (const column of columns) assertIdentifier(column, "column");
    const list = columns.length > 0 ? ` (${columns.map(quoteIdentifier).join(", ")})` : "";
    const sql = `COPY ${this.prepareQuery(`{{tables.${table}}}`)}${list} FROM STDIN`;
    const count = columns.length > 0 ? columns.length : undefined;
    const counter = { rows: 0 };
    const runner = this.#runner;
    const copy = async () => {
      const source: SourceFailure = {};
      try {
        return await runner.copyIn(
          sql,
          watchFailure(encodeCopyRows(rows, count, counter), source),
        );
      } catch (error) {
        // The records (or their encoding) failed: that error is the caller's, whatever the
        // driver made of it while it abandoned the COPY.
        if (source.failed) throw source.error;
        throw error;
      }
    };
    const tracer = activeTracer();
    if (tracer === undefined && runner.config?.onQuery === undefined) {
      await copy();
    } else {
      await instrumented(runner.config, tracer, this.#schema, sql, [], async () => {
        await copy();
        return { rowCount: counter.rows };
      });
    }
    return counter.rows;
  }

  /**
   * Tells whether a table (or view) exists.
   *
   * @param name `table` (in this object's schema, or `public`) or `schema.table`; each part
   *   1 to 63 ASCII letters, digits or underscores, starting with a letter or underscore.
   * @returns `true` when it exists.
   * @throws {SchemaError} When the table or schema part is not such a name (nothing is sent).
   */
  async tableExists(name: string): Promise<boolean> {
    const [schema, table] = splitTableName(name, this.#schema);
    const row = await this.fetchOne<{ exists: boolean }>(
      "SELECT EXISTS (SELECT 1 FROM information_schema.tables " +
        "WHERE table_schema = $1 AND table_name = $2) AS exists",
      [schema, table],
      { primary: true },
    );
    return row?.exists === true;
  }
}

/** What the COPY source threw, once it did. */
interface SourceFailure {
  failed?: true;
  error?: unknown;
}

/** Passes the chunks through, noting in `failure` what producing them threw. */
async function* watchFailure(
  chunks: AsyncIterable<string | Uint8Array>,
  failure: SourceFailure,
): AsyncGenerator<string | Uint8Array> {
  try {
    yield* chunks;
  } catch (error) {
    failure.failed = true;
    failure.error = error;
    throw error;
  }
}

/**
 * Splits `table` or `schema.table` into its parts, each checked by the rule of
 * {@link assertIdentifier}, before anything is sent.
 */
function splitTableName(name: unknown, schema: string | undefined): [string, string] {
  const parts = typeof name === "string" ? name.split(".") : [];
  const [what, bad] = parts.length === 0 || parts.length > 2
    ? ["table", name]
    : parts.length === 2 && !isIdentifier(parts[0])
    ? ["schema", parts[0]]
    : !isIdentifier(parts[parts.length - 1])
    ? ["table", parts[parts.length - 1]]
    : [undefined, undefined];
  if (what !== undefined) {
    const shown = (value: unknown) => typeof value === "string" ? `"${value}"` : String(value);
    const part = bad === name ? "" : `: ${shown(bad)} is not a valid ${what} name`;
    throw new SchemaError(
      `Cannot look up table ${shown(name)}${part}; give "table" or "schema.table", each part ` +
        "1 to 63 ASCII letters, digits or underscores, starting with a letter or underscore",
    );
  }
  return parts.length === 2 ? [parts[0], parts[1]] : [schema ?? "public", parts[0]];
}

function isIdentifier(part: string): boolean {
  try {
    assertIdentifier(part, "table");
    return true;
  } catch {
    return false;
  }
}

async function validate<S extends StandardSchemaV1>(
  model: S,
  row: unknown,
  index: number,
): Promise<InferOutput<S>> {
  const standard = model?.["~standard"];
  if (typeof standard?.validate !== "function") {
    throw new TypeError(
      "Cannot validate rows: 'model' must be a Standard Schema validator (Zod, Valibot, ArkType…)",
    );
  }
  const result = await standard.validate(row);
  if (result.issues) {
    const first = result.issues[0]?.message ?? "invalid";
    throw new ValidationError(
      `Cannot convert row ${index}: ${result.issues.length} issue(s), first: ${first}`,
      result.issues,
    );
  }
  return result.value as InferOutput<S>;
}

function missingColumn(column: number | string, row: Row): RangeError {
  const names = Object.keys(row).map((name) => `"${name}"`).join(", ");
  return new RangeError(
    `Cannot read column ${typeof column === "string" ? `"${column}"` : column}: ` +
      `the result has ${names || "no columns"}`,
  );
}

/** Builds the error for a COMMIT that the server turned into a ROLLBACK. */
export function abortedCommitError(): QueryError {
  return new QueryError(
    "Cannot commit: an earlier statement failed and its error was caught inside the " +
      "transaction, so PostgreSQL rolled everything back; nothing was saved. Let the error " +
      "propagate, or use a nested tx.transaction() to recover from it",
    "COMMIT",
    [],
    { sqlstate: "25P02" },
  );
}

/** A query call's SQL, parameters and options, from `(sql, params?, options?)` or a tagged template. */
interface Call<O> {
  sql: string;
  params: readonly unknown[];
  options?: O;
}

/**
 * Reads a query method's arguments. A tagged template's literal parts are joined with
 * `$1…$n` in place of its values, which become the parameters, so a value is never SQL and
 * never a `{{…}}` placeholder.
 */
function callOf<O = QueryOptions>(sql: string | TemplateStringsArray, rest: unknown[]): Call<O> {
  if (typeof sql === "string") {
    const params = (rest[0] ?? []) as readonly unknown[];
    refuseUndefinedParams(params);
    return { sql, params, options: rest[1] as O | undefined };
  }
  if (!Array.isArray(sql) || !("raw" in sql)) {
    throw new TypeError(
      "Cannot run the query: pass the SQL as a string (with a parameter array), or call the " +
        "method as a tagged template: db.fetchAll`SELECT … WHERE id = ${id}`",
    );
  }
  let text = sql[0];
  for (let i = 1; i < sql.length; i++) text += `$${i}` + sql[i];
  refuseUndefinedParams(rest);
  return { sql: text, params: rest };
}

/**
 * The records as arrays, looking at the first one: objects are turned into arrays in the
 * order of `columns` (else the first object's keys), refusing a missing or extra key, so
 * that no value is dropped or put in the wrong column.
 */
async function recordRows(
  records: CopyRecords,
  columns: readonly string[] | undefined,
): Promise<{
  rows: Iterable<readonly unknown[]> | AsyncIterable<readonly unknown[]>;
  objectColumns?: readonly string[];
}> {
  if (Array.isArray(records) && (records.length === 0 || Array.isArray(records[0]))) {
    // Arrays of arrays go to the encoder as they are, checked here first: a generator step
    // per row cost a tenth of a large COPY's client time.
    for (let index = 0; index < records.length; index++) arrayRecord(records[index], index);
    return { rows: records as readonly (readonly unknown[])[] };
  }
  // Records that come synchronously stay synchronous: an async step per row costs more
  // than encoding it.
  const sync = !(Symbol.asyncIterator in records);
  const iterator = sync
    ? (records as Iterable<readonly unknown[] | CopyObject>)[Symbol.iterator]()
    : (records as AsyncIterable<readonly unknown[] | CopyObject>)[Symbol.asyncIterator]();
  const first = await iterator.next();
  const isObject = !first.done && first.value !== null && typeof first.value === "object" &&
    !Array.isArray(first.value);
  const keys = isObject ? columns ?? Object.keys(first.value as CopyObject) : undefined;
  const record = (value: unknown, index: number): readonly unknown[] =>
    keys === undefined
      ? arrayRecord(value, index)
      : objectRecord(value, keys, columns === undefined, index);
  function* syncRows(): Generator<readonly unknown[]> {
    const source = iterator as Iterator<readonly unknown[] | CopyObject>;
    let index = 0;
    for (let next = first; !next.done; next = source.next(), index++) {
      yield record(next.value, index);
    }
  }
  async function* asyncRows(): AsyncGenerator<readonly unknown[]> {
    let index = 0;
    for (let next = first; !next.done; next = await iterator.next(), index++) {
      yield record(next.value, index);
    }
  }
  return { rows: sync ? syncRows() : asyncRows(), objectColumns: keys };
}

function arrayRecord(record: unknown, index: number): readonly unknown[] {
  if (!Array.isArray(record)) {
    throw new RangeError(
      `Cannot copy record ${index}: the first record was an array, so every record must be ` +
        "one; pass arrays or objects, not both",
    );
  }
  return record;
}

/** `strict`: the columns came from the first object, so another key would be lost. */
function objectRecord(
  record: unknown,
  keys: readonly string[],
  strict: boolean,
  index: number,
): unknown[] {
  if (record === null || typeof record !== "object" || Array.isArray(record)) {
    throw new RangeError(
      `Cannot copy record ${index}: the first record was an object, so every record must be ` +
        "one; pass objects or arrays, not both",
    );
  }
  const values = keys.map((key) => {
    if (!(key in record)) {
      throw new RangeError(
        `Cannot copy record ${index}: it has no '${key}' (the columns are ${keys.join(", ")}); ` +
          "give every object every column (null for none)",
      );
    }
    return (record as CopyObject)[key];
  });
  for (const key of strict ? Object.keys(record) : []) {
    if (!keys.includes(key)) {
      throw new RangeError(
        `Cannot copy record ${index}: its key '${key}' is not one of the columns ` +
          `(${keys.join(", ")}); it would be lost. Pass 'columns' with every column to load`,
      );
    }
  }
  return values;
}
