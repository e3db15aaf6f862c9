import assert from "node:assert/strict";
import { backoffDelay, pollUntilTaken, sleep } from "../src/_backoff.ts";

Deno.test("sleep() waits about the time asked", async () => {
  const start = performance.now();
  await sleep(30);
  assert.ok(performance.now() - start >= 25);
});

Deno.test("sleep() ends early, without rejecting, when the signal aborts", async () => {
  const controller = new AbortController();
  const start = performance.now();
  const waiting = sleep(10_000, controller.signal);
  setTimeout(() => controller.abort(new Error("stop")), 10);
  await waiting;
  assert.ok(performance.now() - start < 5_000);
  await sleep(10_000, controller.signal);
});

Deno.test("backoffDelay() grows by the factor up to the maximum", () => {
  const options = { initialMs: 100, maxMs: 1_000 };
  assert.deepEqual([1, 2, 3, 4, 5, 6].map((n) => backoffDelay(n, options)), [
    100,
    200,
    400,
    800,
    1_000,
    1_000,
  ]);
  assert.deepEqual(
    [1, 2, 3].map((n) => backoffDelay(n, { initialMs: 10, maxMs: 1_000, factor: 3 })),
    [10, 30, 90],
  );
  assert.equal(backoffDelay(1, { initialMs: 10, maxMs: 1_000, factor: 1 }), 10);
  assert.equal(backoffDelay(5, { initialMs: 10, maxMs: 1_000, factor: 1 }), 10);
});

Deno.test("backoffDelay() with jitter waits a whole number between half and all of it", () => {
  for (let i = 0; i < 200; i++) {
    const delay = backoffDelay(3, { initialMs: 100, maxMs: 1_000, jitter: true });
    assert.ok(Number.isInteger(delay) && delay >= 200 && delay <= 400, String(delay));
  }
});

Deno.test("pollUntilTaken() returns what the try took, after calling onWait once", async () => {
  let tries = 0;
  let waits = 0;
  const value = await pollUntilTaken(() => Promise.resolve(++tries === 4 ? "taken" : undefined), {
    initialMs: 1,
    maxMs: 4,
    timeoutMs: 10_000,
    onWait: () => {
      waits++;
    },
    onTimeout: () => new Error("timed out"),
  });
  assert.equal(value, "taken");
  assert.equal(tries, 4);
  assert.equal(waits, 1);
});

Deno.test("pollUntilTaken() returns at once, without onWait, when the first try takes it", async () => {
  const value = await pollUntilTaken(() => Promise.resolve(0), {
    initialMs: 1,
    maxMs: 4,
    timeoutMs: 0,
    onWait: () => assert.fail("waited"),
    onTimeout: () => new Error("timed out"),
  });
  assert.equal(value, 0);
});

Deno.test("pollUntilTaken() throws onTimeout's error once the timeout has passed", async () => {
  const start = performance.now();
  let waited = -1;
  await assert.rejects(
    pollUntilTaken(() => Promise.resolve(undefined), {
      initialMs: 5,
      maxMs: 20,
      timeoutMs: 60,
      onTimeout: (ms) => {
        waited = ms;
        return new RangeError("gave up");
      },
    }),
    RangeError,
  );
  assert.ok(waited >= 60);
  assert.ok(performance.now() - start < 2_000);
});

Deno.test("pollUntilTaken() stops with onAbort's error (or the reason) when the signal aborts", async () => {
  const controller = new AbortController();
  const polling = pollUntilTaken(() => Promise.resolve(undefined), {
    initialMs: 5_000,
    maxMs: 5_000,
    timeoutMs: 60_000,
    signal: controller.signal,
    onTimeout: () => new Error("timed out"),
    onAbort: (reason) => new Error("aborted", { cause: reason }),
  });
  setTimeout(() => controller.abort("stop"), 10);
  const error = await polling.catch((e) => e);
  assert.equal(error.message, "aborted");
  assert.equal(error.cause, "stop");
  await assert.rejects(
    pollUntilTaken(() => Promise.resolve(undefined), {
      initialMs: 1,
      maxMs: 1,
      timeoutMs: 1_000,
      signal: AbortSignal.abort(new TypeError("reason")),
      onTimeout: () => new Error("timed out"),
    }),
    TypeError,
  );
});
