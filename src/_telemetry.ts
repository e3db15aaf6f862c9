/**
 * OpenTelemetry without a dependency: the tracer registered with `npm:@opentelemetry/api`
 * (or by Deno itself with `OTEL_DENO=true`) is found through the API's global registry, so
 * an application that uses no OpenTelemetry pays one property lookup per query.
 *
 * @module
 */

import { firstKeyword } from "./_sql.ts";

/** The part of an OpenTelemetry span pgdbm uses. */
export interface Span {
  setAttribute(key: string, value: string | number | boolean): unknown;
  addEvent(name: string, attributes?: Record<string, string | number | boolean>): unknown;
  recordException(exception: Error): unknown;
  setStatus(status: { code: number; message?: string }): unknown;
  end(endTime?: number): void;
}

/** The part of an OpenTelemetry tracer pgdbm uses. */
export interface Tracer {
  startSpan(
    name: string,
    options?: { kind?: number; attributes?: Record<string, string | number | boolean> },
  ): Span;
}

interface TracerProvider {
  getTracer(name: string, version?: string): Tracer;
}

interface Context {
  setValue(key: symbol, value: unknown): Context;
}

interface ContextManager {
  active(): Context;
  with<T>(context: Context, fn: () => T): T;
}

interface GlobalApi {
  trace?: TracerProvider;
  context?: ContextManager;
}

/** The API's global registry key for major version 1. */
const API_KEY = Symbol.for("opentelemetry.js.api.1");
/** The key under which the API keeps the active span in a context. */
const SPAN_KEY = Symbol.for("OpenTelemetry Context Key SPAN");
const SPAN_KIND_CLIENT = 2;
const STATUS_ERROR = 2;
const TRACER_NAME = "@pgdbm/pgdbm";

let cachedProvider: TracerProvider | undefined;
let cachedTracer: Tracer | undefined;

/** The tracer of the registered OpenTelemetry provider, or `undefined` when none is. */
export function activeTracer(): Tracer | undefined {
  const provider = globalApi()?.trace;
  if (provider === undefined) return undefined;
  if (provider !== cachedProvider) {
    cachedProvider = provider;
    cachedTracer = provider.getTracer(TRACER_NAME);
  }
  return cachedTracer;
}

function globalApi(): GlobalApi | undefined {
  return (globalThis as { [API_KEY]?: GlobalApi })[API_KEY];
}

/** Runs `fn` with `span` as the active span, so spans started inside are its children. */
export function withActiveSpan<T>(span: Span, fn: () => T): T {
  const manager = globalApi()?.context;
  if (manager === undefined) return fn();
  return manager.with(manager.active().setValue(SPAN_KEY, span), fn);
}

/** Where a statement runs, for the span's attributes. */
export interface SpanTarget {
  /** Database name. */
  database: string;
  /** Schema, or `undefined`. */
  schema: string | undefined;
  /** Server host. */
  host: string;
  /** Server port. */
  port: number;
}

/**
 * Starts a client span for one statement, named and attributed per OpenTelemetry's
 * PostgreSQL conventions. The query text is recorded without parameter values.
 */
export function startQuerySpan(tracer: Tracer, sql: string, target: SpanTarget): Span {
  const operation = operationName(sql);
  const namespace = target.schema === undefined
    ? target.database
    : `${target.database}.${target.schema}`;
  return tracer.startSpan(`${operation} ${namespace}`, {
    kind: SPAN_KIND_CLIENT,
    attributes: {
      "db.system.name": "postgresql",
      "db.namespace": namespace,
      "db.operation.name": operation,
      "db.query.text": sql,
      "server.address": target.host,
      "server.port": target.port,
    },
  });
}

/** Starts a span for a whole migration run of one module in one schema. */
export function startMigrationSpan(
  tracer: Tracer,
  module: string,
  target: SpanTarget,
): Span {
  const namespace = target.schema === undefined
    ? target.database
    : `${target.database}.${target.schema}`;
  return tracer.startSpan(`migrate ${module}`, {
    kind: SPAN_KIND_CLIENT,
    attributes: {
      "db.system.name": "postgresql",
      "db.namespace": namespace,
      "pgdbm.migration.module": module,
    },
  });
}

/** Ends a span, recording the error (and its SQLSTATE) when there is one. */
export function endSpan(span: Span, error: unknown, rowCount?: number): void {
  if (error === undefined) {
    if (rowCount !== undefined) span.setAttribute("db.response.returned_rows", rowCount);
  } else {
    const err = error instanceof Error ? error : new Error(String(error));
    const sqlstate = (err as { sqlstate?: string }).sqlstate;
    span.recordException(err);
    span.setAttribute("error.type", sqlstate ?? err.name);
    if (sqlstate !== undefined) span.setAttribute("db.response.status_code", sqlstate);
    span.setStatus({ code: STATUS_ERROR, message: err.message });
  }
  span.end();
}

/** The statement's first keyword, upper case (`SELECT`, `INSERT`…), or `QUERY`. */
export function operationName(sql: string): string {
  return firstKeyword(sql) ?? "QUERY";
}
