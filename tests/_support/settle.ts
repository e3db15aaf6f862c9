/**
 * How tests wait for a promise's end: within a time bound (to catch a hang rather than wait
 * for it forever), or expecting a rejection.
 */

import assert from "node:assert/strict";
import { QueryError } from "../../src/errors.ts";

/**
 * `promise`, or a rejection naming `what` once `ms` have passed: a hang detector, not a
 * speed assertion.
 */
export async function settlesWithin<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

/** The QueryError `promise` rejects with; fails the test when it resolves or rejects otherwise. */
export async function rejection(promise: Promise<unknown>): Promise<QueryError> {
  const error = await promise.then(
    (value) => assert.fail(`expected a rejection, got ${JSON.stringify(value)}`),
    (error: unknown) => error,
  );
  assert.ok(error instanceof QueryError, `expected a QueryError, got ${error}`);
  return error;
}
