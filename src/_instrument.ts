/**
 * Reports a statement to the `onQuery` hook and to OpenTelemetry. Only called when one of
 * them is in use; otherwise the query path skips it with one check.
 *
 * @module
 */

import type { ResolvedConfig } from "./config.ts";
import { maskQueryParams } from "./_mask.ts";
import { endSpan, startQuerySpan, type Tracer } from "./_telemetry.ts";

/** Runs `run`, timing it, and reports it to the hook and as a span. */
export async function instrumented<T extends { rowCount: number; node?: "replica" }>(
  config: ResolvedConfig | undefined,
  tracer: Tracer | undefined,
  schema: string | undefined,
  sql: string,
  params: readonly unknown[],
  run: () => Promise<T>,
): Promise<T> {
  const span = tracer === undefined || config === undefined ? undefined : startQuerySpan(
    tracer,
    sql,
    { database: config.database, schema, host: config.host, port: config.port },
  );
  const start = performance.now();
  let result: T | undefined;
  let failure: unknown;
  try {
    result = await run();
    return result;
  } catch (error) {
    failure = error;
    throw error;
  } finally {
    const durationMs = performance.now() - start;
    if (span !== undefined) endSpan(span, failure, result?.rowCount);
    const hook = config?.onQuery;
    if (hook !== undefined) {
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
    }
  }
}
