/**
 * Reports a statement to the `onQuery` hook and to OpenTelemetry. Only called when one of
 * them is in use; otherwise the query path skips it with one check.
 *
 * @module
 */

import type { ResolvedConfig } from "./config.ts";
import { maskQueryParams } from "./_mask.ts";
import { endSpan, startQuerySpan, type Tracer } from "./_telemetry.ts";

/** What a finished statement reports: its row count and where it ran. */
interface Outcome {
  rowCount: number;
  node?: "replica";
}

/** Runs `run`, timing it, and reports it to the hook and as a span. */
export async function instrumented<T extends Outcome>(
  config: ResolvedConfig | undefined,
  tracer: Tracer | undefined,
  schema: string | undefined,
  sql: string,
  params: readonly unknown[],
  run: () => Promise<T>,
): Promise<T> {
  const finish = startReport(config, tracer, schema, sql, params);
  let result: T | undefined;
  let failure: unknown;
  try {
    result = await run();
    return result;
  } catch (error) {
    failure = error;
    throw error;
  } finally {
    finish(result, failure);
  }
}

/**
 * Yields what `chunks` yields and reports it as one statement when it ends: its row count
 * is the generator's return value (0 when the loop was left early), its duration runs from
 * the first `next()` to the end.
 */
export async function* instrumentedChunks<C>(
  config: ResolvedConfig | undefined,
  tracer: Tracer | undefined,
  schema: string | undefined,
  sql: string,
  params: readonly unknown[],
  chunks: AsyncGenerator<C, number>,
): AsyncGenerator<C, number> {
  const finish = startReport(config, tracer, schema, sql, params);
  let result: Outcome | undefined;
  let failure: unknown;
  try {
    const rowCount = yield* chunks;
    result = { rowCount };
    return rowCount;
  } catch (error) {
    failure = error;
    throw error;
  } finally {
    finish(result ?? (failure === undefined ? { rowCount: 0 } : undefined), failure);
  }
}

/** Starts the span and the clock of one statement; the function returned reports its end. */
function startReport(
  config: ResolvedConfig | undefined,
  tracer: Tracer | undefined,
  schema: string | undefined,
  sql: string,
  params: readonly unknown[],
): (result: Outcome | undefined, failure: unknown) => void {
  const span = tracer === undefined || config === undefined ? undefined : startQuerySpan(
    tracer,
    sql,
    { database: config.database, schema, host: config.host, port: config.port },
  );
  const start = performance.now();
  return (result, failure) => {
    const durationMs = performance.now() - start;
    if (span !== undefined) endSpan(span, failure, result?.rowCount);
    const hook = config?.onQuery;
    if (hook === undefined) return;
    try {
      hook({
        sql,
        params: maskQueryParams(sql, params),
        durationMs,
        rowCount: result?.rowCount ?? 0,
        schema: schema ?? null,
        node: result?.node ?? "primary",
        error: failure === undefined
          ? undefined
          : failure instanceof Error
          ? failure
          : new Error(String(failure)),
      });
    } catch (error) {
      config!.logger.warn(
        `pgdbm: the onQuery hook threw (${error instanceof Error ? error.message : error}); ` +
          "it must not throw: catch inside the hook",
      );
    }
  };
}
