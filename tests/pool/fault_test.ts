/**
 * The fault harness (SPEC sections 3 "opts" and 9): the pool under mixed load while its
 * server is hurt, and timeouts and aborts racing innocent queries on shared connections.
 *
 * 1. A throwaway cluster (tests/_support/fault_cluster.ts) and a pool of 10 to it. Many callers
 *    run about 1,000 calls/s of mixed work (reads that must get their own result,
 *    inserts, two-row transactions, transfers that keep a sum) while an admin connection
 *    terminates a random pgdbm backend every 200 ms, the cluster restarts once (fast stop,
 *    1.5 s down, start) and is frozen once (SIGSTOP of the postmaster and every backend for 3 s). Every call's
 *    outcome is recorded; at the end: no call got another call's result, every call
 *    settled, every error is a pgdbm error of the contract, no unhandled rejection, no
 *    committed write lost, no transaction half visible, the sum holds, the service is
 *    back, and `close()` settles.
 * 2. On the shared test server (nothing is killed): the issue's exact repro, then 1,000
 *    rounds of timeouts and aborts of queued and running queries on a pool of one
 *    connection (and rounds on a pool of three), with innocent queries mixed in. No wrong
 *    result, and no innocent query fails because of another caller's cancel.
 *
 * Nothing here asserts on speed: the bounds are hang detectors, far above any legitimate
 * duration. Set PGDBM_FAULT_SEED to replay a run's random choices (the seed is printed).
 */
import assert from "node:assert/strict";
import {
  ConnectionError,
  createSharedPool,
  DatabaseManager,
  type Pool,
  PoolError,
  QueryError,
  TimeoutError,
} from "../../mod.ts";
import type { DatabaseConfig } from "../../src/config.ts";
import {
  type FaultCluster,
  faultClusterUnavailable,
  startFaultCluster,
} from "../_support/fault_cluster.ts";
import { serverTest, TEST_URL, uniqueName } from "../_support/server.ts";

// ---------------------------------------------------------------------------------------
// Shared machinery: randomness, outcomes, the contract's errors, unhandled rejections.

const SEED = Number(Deno.env.get("PGDBM_FAULT_SEED") ?? Math.floor(Math.random() * 2 ** 31));

/** A small seeded generator (mulberry32), so a failing run can be replayed. */
function random(seed: number): { next(): number; int(n: number): number; pick<T>(xs: T[]): T } {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  return { next, int, pick: (xs) => xs[int(xs.length)] };
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** Races `promise` against a bound; `undefined` when the bound came first. */
async function within<T>(promise: Promise<T>, ms: number): Promise<{ value: T } | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const bound = new Promise<undefined>((resolve) =>
    timer = setTimeout(() => resolve(undefined), ms)
  );
  try {
    return await Promise.race([promise.then((value) => ({ value })), bound]);
  } finally {
    clearTimeout(timer);
  }
}

/** Counts unhandled rejections and uncaught errors instead of letting them end the run. */
class Uncaught {
  readonly reasons: unknown[] = [];
  readonly #onRejection = (event: PromiseRejectionEvent) => {
    event.preventDefault();
    this.reasons.push(event.reason);
  };
  readonly #onError = (event: ErrorEvent) => {
    event.preventDefault();
    this.reasons.push(event.error ?? event.message);
  };

  constructor() {
    globalThis.addEventListener("unhandledrejection", this.#onRejection);
    globalThis.addEventListener("error", this.#onError);
  }

  dispose(): void {
    globalThis.removeEventListener("unhandledrejection", this.#onRejection);
    globalThis.removeEventListener("error", this.#onError);
  }

  describe(): string[] {
    return this.reasons.slice(0, 5).map((reason) => Deno.inspect(reason, { depth: 4 }));
  }
}

/** A result that is not the caller's own. */
class WrongResult extends Error {
  constructor(readonly expected: unknown, readonly got: unknown, readonly foreign: boolean) {
    super(`expected ${Deno.inspect(expected)}, got ${Deno.inspect(got)}`);
  }
}

/** One call and what it may legitimately fail with. */
interface Call {
  readonly id: number;
  readonly kind: string;
  readonly start: number;
  /** The call has its own `timeoutMs` or `signal`: a TimeoutError is its own. */
  own: boolean;
  /** The reason its signal aborts with: a rejection with it (or with it as `cause`) is fine. */
  abortReason?: unknown;
  settledAt?: number;
}

/** A short, stable description of an error for the histogram. */
function errorKey(error: unknown): string {
  if (!(error instanceof Error)) return `non-Error ${typeof error}: ${String(error).slice(0, 80)}`;
  const code = (error as { code?: unknown }).code;
  const state = error instanceof QueryError ? ` ${error.sqlstate ?? "NO-SQLSTATE"}` : "";
  const message = error.message.replace(/\d+/g, "N").slice(0, 110);
  return `${error.constructor.name}${
    typeof code === "string" ? ` ${code}` : ""
  }${state}: ${message}`;
}

/** An error with its chain of causes and where the innermost one was thrown. */
function describeError(error: unknown): string {
  const parts: string[] = [];
  let current: unknown = error;
  let innermost: Error | undefined;
  for (let depth = 0; current !== undefined && depth < 4; depth++) {
    if (!(current instanceof Error)) {
      parts.push(Deno.inspect(current));
      break;
    }
    const state = current instanceof QueryError ? ` sqlstate=${current.sqlstate}` : "";
    parts.push(`${current.constructor.name}${state}: ${current.message}`);
    innermost = current;
    current = current.cause;
  }
  const frames = (innermost?.stack ?? "").split("\n").filter((line) => line.includes(" at "))
    .slice(0, 4).map((line) => line.trim());
  return `${parts.join("\n      caused by ")}\n      ${frames.join("\n      ")}`;
}

/** Why `error` is outside the contract for `call`, or `undefined` when it is allowed. */
function outsideContract(error: unknown, call: Call): string | undefined {
  if (call.abortReason !== undefined) {
    if (error === call.abortReason) return undefined;
    if (error instanceof Error && error.cause === call.abortReason) return undefined;
  }
  if (error instanceof QueryError) {
    return /^[0-9A-Z]{5}$/.test(error.sqlstate ?? "") ? undefined : "QueryError without sqlstate";
  }
  if (error instanceof ConnectionError || error instanceof PoolError) return undefined;
  if (error instanceof TimeoutError) return undefined;
  return "not one of QueryError/ConnectionError/PoolError/TimeoutError";
}

/**
 * Whether `error` is a cancel that hit a call with no timeout or signal of its own
 * (someone else's cancel). A TimeoutError from `commandTimeoutMs` is the call's own only
 * once that much time has passed.
 */
function innocentCancel(error: unknown, call: Call, commandTimeoutMs: number): boolean {
  if (call.own) return false;
  if (error instanceof QueryError && error.sqlstate === "57014") return true;
  return error instanceof TimeoutError && performance.now() - call.start < commandTimeoutMs;
}

/** How one call ended: `error` is set when it failed, not when its result was wrong. */
interface Outcome {
  ok: boolean;
  error?: unknown;
}

/** Every call's outcome. */
class Tally {
  readonly pending = new Set<Call>();
  readonly histogram = new Map<string, number>();
  readonly wrong: string[] = [];
  readonly outside: string[] = [];
  readonly outsideKeys = new Map<string, number>();
  readonly innocent: string[] = [];
  started = 0;
  ok = 0;
  failed = 0;
  foreign = 0;
  late = 0;

  constructor(readonly commandTimeoutMs: number, readonly watchdogMs: number) {}

  /** Runs one call; `check` throws {@link WrongResult} when the value is not the caller's. */
  track<T>(
    call: Call,
    run: () => Promise<T>,
    check: (value: T) => void,
  ): Promise<Outcome> {
    this.started++;
    this.pending.add(call);
    let promise: Promise<T>;
    try {
      promise = run();
    } catch (error) {
      promise = Promise.reject(error);
    }
    return promise.then((value) => {
      this.#settle(call);
      try {
        check(value);
        this.ok++;
        return { ok: true };
      } catch (error) {
        this.#wrong(call, error);
        return { ok: false };
      }
    }, (error) => {
      this.#settle(call);
      this.failed++;
      if (error instanceof WrongResult) {
        this.#wrong(call, error); // a check inside a transaction callback
        return { ok: false };
      }
      const key = errorKey(error);
      this.histogram.set(key, (this.histogram.get(key) ?? 0) + 1);
      const outside = outsideContract(error, call);
      if (outside !== undefined) {
        this.outsideKeys.set(key, (this.outsideKeys.get(key) ?? 0) + 1);
        if (this.outside.length < 4) {
          this.outside.push(`#${call.id} ${call.kind} (${outside}): ${describeError(error)}`);
        }
      }
      if (innocentCancel(error, call, this.commandTimeoutMs)) {
        this.innocent.push(`#${call.id} ${call.kind}: ${errorKey(error)}`);
      }
      return { ok: false, error };
    });
  }

  #settle(call: Call): void {
    call.settledAt = performance.now();
    this.pending.delete(call);
    if (call.settledAt - call.start > this.watchdogMs) this.late++;
  }

  #wrong(call: Call, error: unknown): void {
    if (error instanceof WrongResult && error.foreign) this.foreign++;
    this.wrong.push(`#${call.id} ${call.kind}: ${error instanceof Error ? error.message : error}`);
  }

  /** Waits until every call settled or is past its watchdog; returns the ones that hang. */
  async drain(): Promise<Call[]> {
    while (this.pending.size > 0) {
      const now = performance.now();
      if ([...this.pending].every((call) => now - call.start > this.watchdogMs)) break;
      await sleep(100);
    }
    return [...this.pending];
  }

  histogramText(): string {
    return [...this.histogram].sort((a, b) => b[1] - a[1])
      .map(([key, n]) => `  ${String(n).padStart(6)}  ${key}`).join("\n");
  }
}

/** Checks that `got` is `expected`; a number from the id range is another call's result. */
function expectValue(got: unknown, expected: unknown, isId: (v: unknown) => boolean): void {
  if (got !== expected) throw new WrongResult(expected, got, got !== expected && isId(got));
}

/** Distinct lines with how often each occurs, most frequent first. */
function countLines(lines: string[]): string[] {
  const counts = new Map<string, number>();
  for (const line of lines) counts.set(line, (counts.get(line) ?? 0) + 1);
  return [...counts].sort((a, b) => b[1] - a[1]).map(([line, n]) => `${n} × ${line}`);
}

// ---------------------------------------------------------------------------------------
// 1. The fault harness on a throwaway cluster.

const unavailable = faultClusterUnavailable();
if (unavailable !== undefined && Deno.env.get("PGDBM_REQUIRE_SERVER") === "1") {
  throw new Error(`PGDBM_REQUIRE_SERVER=1 but the fault test cluster cannot start: ${unavailable}`);
}

const APP = "pgdbm_fault";
const SCHEMA = "fault";
const LOAD_MS = 20_000;
const RATE_PER_S = 1_000;
const MAX_OUTSTANDING = 6_000;
const KILL_EVERY_MS = 200;
const RESTART_AT_MS = 5_000;
/** The server stays down this long in the restart: new connections are refused. */
const RESTART_DOWN_MS = 1_500;
const FREEZE_AT_MS = 12_000;
const FREEZE_MS = 3_000;
const ACCOUNTS = 20;
const START_BALANCE = 1_000;
const ID_BASE = 1_000_000;
/** A call not settled this long after it started never settles (legit ones take < 30 s). */
const WATCHDOG_MS = 45_000;
const CLOSE_BOUND_MS = 10_000;
const FINAL_CALLS = 300;
const FINAL_ATTEMPTS = 3;
/** Far above commandTimeoutMs: a final call still running then is stuck. */
const FINAL_ATTEMPT_BOUND_MS = 25_000;

const FAULT_POOL: DatabaseConfig = {
  maxConnections: 10,
  minConnections: 2,
  commandTimeoutMs: 15_000,
  acquireTimeoutMs: 10_000,
  connectTimeoutMs: 5_000,
  retry: { attempts: 3, delayMs: 200, backoff: 2, maxDelayMs: 1_000 },
  serverSettings: { application_name: APP },
};

/** Writes whose call resolved: they must all be in the tables after the run. */
interface Committed {
  items: Set<number>;
  pairs: Set<number>;
  transfers: Set<number>;
  batches: Set<number>;
  /** Writes refused before they were sent (POOL_EXHAUSTED): they must not be there. */
  neverSent: Set<number>;
  /** Transactions that failed with their own statement's timeout or abort: rolled back. */
  rolledBack: Set<number>;
}

const KINDS: Array<[string, number]> = [
  ["param", 28],
  ["literal", 14],
  ["rows", 8],
  ["rowsLiteral", 5],
  ["insert", 12],
  ["insertId", 8],
  ["pair", 9],
  ["transfer", 8],
  ["batch", 4],
  ["timed", 5],
  ["aborted", 3],
  ["txTimed", 3],
];
const KIND_TOTAL = KINDS.reduce((sum, [, weight]) => sum + weight, 0);

/** Runs call `id` of `kind` through `db`, recording its outcome in `tally`. */
function launch(
  db: DatabaseManager,
  tally: Tally,
  committed: Committed,
  kind: string,
  id: number,
  rng: ReturnType<typeof random>,
  isId: (v: unknown) => boolean,
): Promise<Outcome> {
  const call: Call = { id, kind, start: performance.now(), own: false };
  const same = (got: unknown, expected: unknown) => expectValue(got, expected, isId);
  const rows = (got: Array<Record<string, unknown>>, k: number) => {
    if (got.length !== k) throw new WrongResult(`${k} rows`, `${got.length} rows`, false);
    got.forEach((row, i) => {
      same(row.caller, id);
      same(row.i, i + 1);
    });
  };
  const refusedBeforeSending = (error: unknown) => {
    if (error instanceof PoolError && error.code === "POOL_EXHAUSTED") committed.neverSent.add(id);
    throw error;
  };
  switch (kind) {
    case "param":
      return tally.track(
        call,
        () => db.fetchValue("SELECT $1::int AS v", [id]),
        (v) => same(v, id),
      );
    case "literal":
      return tally.track(call, () => db.fetchValue(`SELECT ${id}::int AS v`), (v) => same(v, id));
    case "rows": {
      const k = 1 + id % 7;
      return tally.track(
        call,
        () =>
          db.fetchAll(
            "SELECT $1::int AS caller, g::int AS i FROM generate_series(1, $2::int) g",
            [id, k],
          ),
        (got) => rows(got, k),
      );
    }
    case "rowsLiteral": {
      const k = 1 + id % 5;
      return tally.track(
        call,
        () =>
          db.fetchAll(`SELECT ${id}::int AS caller, g::int AS i FROM generate_series(1, ${k}) g`),
        (got) => rows(got, k),
      );
    }
    case "insert":
      return tally.track(
        call,
        () =>
          db.execute("INSERT INTO {{tables.items}} (id, kind) VALUES ($1, 'insert')", [id])
            .catch(refusedBeforeSending),
        (result) => {
          same(result.command, "INSERT");
          same(result.rowCount, 1);
          committed.items.add(id);
        },
      );
    case "insertId":
      return tally.track(
        call,
        () =>
          db.executeAndReturnId("INSERT INTO {{tables.items}} (id, kind) VALUES ($1, 'id')", [id])
            .catch(refusedBeforeSending),
        (got) => {
          same(got, id);
          committed.items.add(id);
        },
      );
    case "pair":
      return tally.track(
        call,
        () =>
          db.transaction(async (tx) => {
            const insert = "INSERT INTO {{tables.pairs}} (pair, side) VALUES ($1, $2) " +
              "RETURNING pair, side";
            const a = await tx.fetchOne(insert, [id, 1]);
            same(a?.pair, id);
            same(a?.side, 1);
            same(await tx.fetchValue("SELECT $1::int", [id]), id);
            const b = await tx.fetchOne(insert, [id, 2]);
            same(b?.pair, id);
            same(b?.side, 2);
            return await tx.fetchValue<number>(
              "SELECT count(*)::int FROM {{tables.pairs}} WHERE pair = $1",
              [id],
            );
          }).catch(refusedBeforeSending),
        (n) => {
          same(n, 2);
          committed.pairs.add(id);
        },
      );
    case "transfer": {
      const from = 1 + rng.int(ACCOUNTS);
      const to = 1 + (from + rng.int(ACCOUNTS - 1)) % ACCOUNTS;
      const amount = 1 + id % 50;
      return tally.track(
        call,
        () =>
          db.transaction(async (tx) => {
            // Lock both rows in id order: transfers never deadlock one another.
            const locked = await tx.fetchAll(
              "SELECT id FROM {{tables.accounts}} WHERE id = ANY($1::int[]) ORDER BY id FOR UPDATE",
              [[from, to]],
            );
            same(locked.map((row) => row.id).join(","), [from, to].sort((a, b) => a - b).join(","));
            const update = "UPDATE {{tables.accounts}} SET balance = balance + $2 WHERE id = $1";
            same((await tx.execute(update, [from, -amount])).rowCount, 1);
            same((await tx.execute(update, [to, amount])).rowCount, 1);
            await tx.execute(
              "INSERT INTO {{tables.ledger}} (id, src, dst, amount) VALUES ($1, $2, $3, $4)",
              [id, from, to, amount],
            );
            return id;
          }).catch(refusedBeforeSending),
        (got) => {
          same(got, id);
          committed.transfers.add(id);
        },
      );
    }
    case "batch":
      return tally.track(
        call,
        () =>
          db.executeMany("INSERT INTO {{tables.batches}} (id, side) VALUES ($1, $2)", [
            [id, 1],
            [id, 2],
            [id, 3],
          ]).catch(refusedBeforeSending),
        (n) => {
          same(n, 3);
          committed.batches.add(id);
        },
      );
    case "txTimed": {
      // A transaction whose middle statement has its own short timeout or abort: it
      // commits both rows, or fails with that timeout / abort and leaves nothing.
      call.own = true;
      const seconds = rng.pick([0, 0.005, 0.02]);
      const timeoutMs = 1 + rng.int(30);
      let options: { timeoutMs?: number; signal?: AbortSignal } = { timeoutMs };
      if (rng.next() < 0.4) {
        const controller = new AbortController();
        call.abortReason = new Error(`transaction ${id} aborted by the harness`);
        setTimeout(() => controller.abort(call.abortReason), rng.int(30));
        options = { signal: controller.signal };
      }
      const insert = "INSERT INTO {{tables.pairs}} (pair, side) VALUES ($1, $2)";
      return tally.track(
        call,
        () =>
          db.transaction(async (tx) => {
            await tx.execute(insert, [id, 1]);
            same(
              await tx.fetchValue("SELECT $1::int FROM pg_sleep($2)", [id, seconds], options),
              id,
            );
            await tx.execute(insert, [id, 2]);
            return id;
          }).catch((error) => {
            const own = options.signal !== undefined
              ? error === call.abortReason || error?.cause === call.abortReason
              : error instanceof TimeoutError && error.timeoutMs === timeoutMs;
            if (own) committed.rolledBack.add(id);
            return refusedBeforeSending(error);
          }),
        (got) => {
          same(got, id);
          committed.pairs.add(id);
        },
      );
    }
    case "timed": {
      // Its own short timeout, on a statement that may or may not finish in time.
      call.own = true;
      const seconds = rng.pick([0, 0.002, 0.01, 0.03]);
      return tally.track(
        call,
        () =>
          db.fetchValue("SELECT $1::int AS v FROM pg_sleep($2::float8)", [id, seconds], {
            timeoutMs: 1 + rng.int(40),
          }),
        (v) => same(v, id),
      );
    }
    case "aborted": {
      call.own = true;
      const controller = new AbortController();
      const reason = new Error(`call ${id} aborted by the harness`);
      call.abortReason = reason;
      const seconds = rng.pick([0, 0.005, 0.02]);
      setTimeout(() => controller.abort(reason), rng.int(30));
      return tally.track(
        call,
        () =>
          db.fetchValue(`SELECT ${id}::int AS v FROM pg_sleep(${seconds})`, [], {
            signal: controller.signal,
          }),
        (v) => same(v, id),
      );
    }
    default:
      throw new Error(`unknown kind ${kind}`);
  }
}

function pickKind(rng: ReturnType<typeof random>): string {
  let n = rng.int(KIND_TOTAL);
  for (const [kind, weight] of KINDS) {
    if (n < weight) return kind;
    n -= weight;
  }
  return "param";
}

/** What the faults did, for the report. */
interface FaultLog {
  kills: number;
  killAttempts: number;
  killFailures: string[];
  restartMs?: number;
  restartError?: string;
  frozen?: number;
  freezeError?: string;
}

/** Terminates a random pgdbm backend every 200 ms, and restarts and freezes the cluster once. */
async function hurt(
  cluster: FaultCluster,
  log: FaultLog,
  loadStart: number,
  stopped: () => boolean,
): Promise<void> {
  let busy = false; // no terminate while the restart or the freeze runs
  const terminator = (async () => {
    let next = performance.now();
    while (!stopped()) {
      next = Math.max(next + KILL_EVERY_MS, performance.now());
      while (!stopped() && performance.now() < next) {
        await sleep(Math.min(50, next - performance.now()));
      }
      if (busy || stopped()) continue;
      log.killAttempts++;
      try {
        const out = await cluster.psql(
          "SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity " +
            `WHERE application_name = '${APP}' ORDER BY random() LIMIT 1) s`,
          3_000,
        );
        log.kills += Number(out) || 0;
      } catch (error) {
        if (!busy && log.killFailures.length < 5) log.killFailures.push(String(error));
      }
    }
  })();
  const at = async (ms: number) => {
    while (!stopped() && performance.now() < loadStart + ms) {
      await sleep(Math.min(100, loadStart + ms - performance.now()));
    }
  };
  await at(RESTART_AT_MS);
  if (!stopped()) {
    busy = true;
    const start = performance.now();
    try {
      await cluster.restart(RESTART_DOWN_MS);
      log.restartMs = Math.round(performance.now() - start);
    } catch (error) {
      log.restartError = String(error);
    } finally {
      busy = false;
    }
  }
  await at(FREEZE_AT_MS);
  if (!stopped()) {
    busy = true;
    try {
      log.frozen = await cluster.freeze(FREEZE_MS);
    } catch (error) {
      log.freezeError = String(error);
    } finally {
      busy = false;
    }
  }
  await terminator;
}

/** Calls with a retry budget: a lost session may fail a call or two right after faults. */
async function finalRound(
  db: DatabaseManager,
  committed: Committed,
  firstId: number,
  rng: ReturnType<typeof random>,
  isId: (v: unknown) => boolean,
): Promise<{ tally: Tally; failures: string[] }> {
  const tally = new Tally(FAULT_POOL.commandTimeoutMs!, WATCHDOG_MS);
  const failures: string[] = [];
  const kinds = ["param", "literal", "rows", "rowsLiteral", "insert", "insertId", "pair"];
  const one = async (index: number) => {
    const kind = kinds[index % kinds.length];
    const errors: string[] = [];
    for (let attempt = 0; attempt < FINAL_ATTEMPTS; attempt++) {
      const id = firstId + index * FINAL_ATTEMPTS + attempt;
      const settled = await within(
        launch(db, tally, committed, kind, id, rng, isId),
        FINAL_ATTEMPT_BOUND_MS,
      );
      if (settled === undefined) {
        failures.push(`${kind} #${id}: not settled after ${FINAL_ATTEMPT_BOUND_MS} ms`);
        return;
      }
      const outcome = settled.value;
      if (outcome.ok || !("error" in outcome)) return; // a wrong result is counted, not retried
      errors.push(errorKey(outcome.error));
      await sleep(250);
    }
    failures.push(`${kind}: ${[...new Set(errors)].join(" | ")}`);
  };
  await Promise.all(Array.from({ length: FINAL_CALLS }, (_, i) => one(i)));
  return { tally, failures };
}

/** Rows of a psql query, split on `|`. */
async function rowsOf(cluster: FaultCluster, sql: string): Promise<string[][]> {
  const out = await cluster.psql(sql, 30_000);
  return out === "" ? [] : out.split("\n").map((line) => line.split("|"));
}

/** Compares the tables with the writes that resolved; returns what is wrong. */
async function checkData(cluster: FaultCluster, committed: Committed): Promise<string[]> {
  const problems: string[] = [];
  const items = new Set(
    (await rowsOf(cluster, `SELECT id FROM ${SCHEMA}.items`)).map((r) => +r[0]),
  );
  const lostItems = [...committed.items].filter((id) => !items.has(id));
  if (lostItems.length > 0) {
    problems.push(`${lostItems.length} committed INSERTs lost, e.g. ${lostItems.slice(0, 5)}`);
  }
  const pairs = new Map(
    (await rowsOf(cluster, `SELECT pair, count(*) FROM ${SCHEMA}.pairs GROUP BY pair`))
      .map((r) => [+r[0], +r[1]]),
  );
  const half = [...pairs].filter(([, n]) => n !== 2).map(([pair]) => pair);
  if (half.length > 0) problems.push(`${half.length} pair transactions half visible: ${half}`);
  const lostPairs = [...committed.pairs].filter((id) => pairs.get(id) !== 2);
  if (lostPairs.length > 0) {
    problems.push(`${lostPairs.length} committed pair transactions lost: ${lostPairs.slice(0, 5)}`);
  }
  const ledger = await rowsOf(cluster, `SELECT id, src, dst, amount FROM ${SCHEMA}.ledger`);
  const ledgerIds = new Set(ledger.map((r) => +r[0]));
  const lostTransfers = [...committed.transfers].filter((id) => !ledgerIds.has(id));
  if (lostTransfers.length > 0) {
    problems.push(`${lostTransfers.length} committed transfers lost: ${lostTransfers.slice(0, 5)}`);
  }
  const expected = new Map<number, number>();
  for (let a = 1; a <= ACCOUNTS; a++) expected.set(a, START_BALANCE);
  for (const [, src, dst, amount] of ledger.map((r) => r.map(Number))) {
    expected.set(src, expected.get(src)! - amount);
    expected.set(dst, expected.get(dst)! + amount);
  }
  const accounts = await rowsOf(cluster, `SELECT id, balance FROM ${SCHEMA}.accounts ORDER BY id`);
  const sum = accounts.reduce((total, r) => total + Number(r[1]), 0);
  if (accounts.length !== ACCOUNTS || sum !== ACCOUNTS * START_BALANCE) {
    problems.push(
      `the sum of balances is ${sum} over ${accounts.length} accounts, not ` +
        `${ACCOUNTS * START_BALANCE} over ${ACCOUNTS}`,
    );
  }
  const off = accounts.filter((r) => expected.get(+r[0]) !== +r[1]);
  if (off.length > 0) {
    problems.push(
      `${off.length} balances disagree with the ledger (a transfer half applied): ` +
        off.slice(0, 5).map((r) => `${r[0]}: ${r[1]} ≠ ${expected.get(+r[0])}`).join(", "),
    );
  }
  const batches = new Map(
    (await rowsOf(cluster, `SELECT id, count(*) FROM ${SCHEMA}.batches GROUP BY id`))
      .map((r) => [+r[0], +r[1]]),
  );
  const partial = [...batches].filter(([, n]) => n !== 3).map(([id]) => id);
  if (partial.length > 0) problems.push(`${partial.length} executeMany batches partly applied`);
  const lostBatches = [...committed.batches].filter((id) => batches.get(id) !== 3);
  if (lostBatches.length > 0) {
    problems.push(`${lostBatches.length} committed executeMany batches lost`);
  }
  const present = (id: number) =>
    items.has(id) || pairs.has(id) || ledgerIds.has(id) || batches.has(id);
  const phantoms = [...committed.neverSent].filter(present);
  if (phantoms.length > 0) {
    problems.push(`${phantoms.length} writes refused with POOL_EXHAUSTED are in the tables`);
  }
  const undead = [...committed.rolledBack].filter(present);
  if (undead.length > 0) {
    problems.push(
      `${undead.length} transactions failed with their own timeout/abort yet committed: ` +
        undead.slice(0, 5).join(", "),
    );
  }
  return problems;
}

Deno.test({
  name: unavailable === undefined
    ? "Pool under load survives terminated backends, a restart and a frozen server"
    : `Pool under load and faults (skipped: ${unavailable})`,
  ignore: unavailable !== undefined,
  sanitizeOps: false, // a broken pool may leave timers and sockets: the asserts say so
  sanitizeResources: false,
  async fn() {
    const rng = random(SEED);
    const uncaught = new Uncaught();
    const cluster = await startFaultCluster({ maxConnections: 40 });
    let pool: Pool | undefined;
    try {
      pool = await createSharedPool({ connectionString: cluster.url, ...FAULT_POOL });
      const db = new DatabaseManager({ pool, schema: SCHEMA });
      await db.ensureSchema();
      await db.execute("CREATE TABLE {{tables.items}} (id int PRIMARY KEY, kind text NOT NULL)");
      await db.execute(
        "CREATE TABLE {{tables.pairs}} (pair int, side int, PRIMARY KEY (pair, side))",
      );
      await db.execute(
        "CREATE TABLE {{tables.accounts}} (id int PRIMARY KEY, balance int NOT NULL)",
      );
      await db.execute(
        "CREATE TABLE {{tables.batches}} (id int, side int, PRIMARY KEY (id, side))",
      );
      await db.execute(
        "CREATE TABLE {{tables.ledger}} " +
          "(id int PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount int NOT NULL)",
      );
      await db.execute(
        "INSERT INTO {{tables.accounts}} SELECT g, $1 FROM generate_series(1, $2::int) g",
        [START_BALANCE, ACCOUNTS],
      );

      const tally = new Tally(FAULT_POOL.commandTimeoutMs!, WATCHDOG_MS);
      const committed: Committed = {
        items: new Set(),
        pairs: new Set(),
        transfers: new Set(),
        batches: new Set(),
        neverSent: new Set(),
        rolledBack: new Set(),
      };
      let nextId = ID_BASE;
      const isId = (v: unknown) => typeof v === "number" && v >= ID_BASE && v < nextId;
      const faults: FaultLog = { kills: 0, killAttempts: 0, killFailures: [] };
      let loadOver = false;
      let shed = 0;
      const loadStart = performance.now();
      const hurting = hurt(cluster, faults, loadStart, () => loadOver);
      let launched = 0;
      while (performance.now() - loadStart < LOAD_MS) {
        const due = Math.floor((performance.now() - loadStart) * RATE_PER_S / 1000);
        while (launched < due) {
          launched++;
          if (tally.pending.size >= MAX_OUTSTANDING) {
            shed++;
            continue;
          }
          launch(db, tally, committed, pickKind(rng), nextId++, rng, isId);
        }
        await sleep(5);
      }
      loadOver = true;
      const loadMs = performance.now() - loadStart;
      await hurting;
      const hung = await tally.drain();

      // The service is back: the server answers, then every call succeeds within its budget.
      await cluster.psql("SELECT 1", 30_000);
      await sleep(500);
      const finalFirstId = nextId;
      nextId += FINAL_CALLS * FINAL_ATTEMPTS;
      const final = await finalRound(db, committed, finalFirstId, rng, isId);
      const finalHung = await final.tally.drain();

      const closing = pool.close();
      const closed = await within(closing, CLOSE_BOUND_MS);
      pool = undefined;
      const dataProblems = await checkData(cluster, committed);
      await sleep(500); // late rejections of cancel requests and sockets
      const stats = `seed ${SEED}: ${tally.started} calls in ${Math.round(loadMs)} ms ` +
        `(${Math.round(tally.started / loadMs * 1000)}/s, ${shed} shed at ` +
        `${MAX_OUTSTANDING} outstanding), ${tally.ok} ok, ${tally.failed} failed; ` +
        `${faults.kills} backends terminated in ${faults.killAttempts} tries, ` +
        (faults.restartError ?? `restarted in ${faults.restartMs} ms (down ${RESTART_DOWN_MS})`) +
        ", " +
        (faults.freezeError ?? `${faults.frozen} processes frozen for ${FREEZE_MS} ms`) +
        `; committed ${committed.items.size} inserts, ${committed.pairs.size} ` +
        `pairs, ${committed.transfers.size} transfers, ${committed.batches.size} batches; ` +
        `${committed.rolledBack.size} transactions rolled back by their own timeout/abort`;
      console.log(`${stats}\nerrors:\n${tally.histogramText() || "  none"}`);

      const failures: string[] = [];
      const section = (title: string, lines: string[]) => {
        if (lines.length > 0) failures.push(`${title}:\n  ${lines.join("\n  ")}`);
      };
      section(
        `${tally.wrong.length} calls resolved with a result not their own ` +
          `(${tally.foreign} with another call's)`,
        tally.wrong.slice(0, 10),
      );
      section(
        `${hung.length} calls never settled (${WATCHDOG_MS} ms watchdog)`,
        hung.slice(0, 10).map((c) => `#${c.id} ${c.kind}${c.own ? " (own timeout/signal)" : ""}`),
      );
      if (tally.late > 0) failures.push(`${tally.late} calls settled after the watchdog`);
      section(
        `${[...tally.outsideKeys.values()].reduce((a, b) => a + b, 0)} errors outside the ` +
          "contract (by kind)",
        [...tally.outsideKeys].map(([key, n]) => `${n} × ${key}`).concat(tally.outside),
      );
      section(
        `${tally.innocent.length} innocent calls failed with someone else's cancel`,
        countLines(tally.innocent.map((line) => line.replace(/^#\d+ /, ""))),
      );
      section(
        `${uncaught.reasons.length} unhandled rejections / uncaught errors`,
        uncaught.describe(),
      );
      section("lost or torn writes", dataProblems);
      section(
        `the service is not back: ${final.failures.length} of ${FINAL_CALLS} final calls failed ` +
          `${FINAL_ATTEMPTS} times`,
        countLines(final.failures.map((line) => line.replace(/#\d+/g, "#N"))),
      );
      section(
        "the final round went wrong",
        [
          ...final.tally.wrong.slice(0, 5),
          ...final.tally.outside.slice(0, 3),
          ...finalHung.map((c) => `#${c.id} ${c.kind} never settled`),
        ],
      );
      if (closed === undefined) {
        failures.push(`pool.close() did not settle in ${CLOSE_BOUND_MS} ms`);
      }
      if (failures.length > 0) {
        const tail = await cluster.logTail(15);
        const report =
          `${stats}\n\n${failures.join("\n\n")}\n\nerrors (all calls):\n${tally.histogramText()}` +
          `\n\nfinal round errors:\n${final.tally.histogramText()}` +
          `\n\nterminate failures: ${faults.killFailures.join(" / ") || "none"}` +
          `\n\nserver log tail:\n${tail}`;
        console.error(report); // now, in case a later step hangs
        assert.fail(`${stats}\n\n${failures.join("\n\n")}\n\n(the full report is above)`);
      }
    } finally {
      uncaught.dispose();
      if (pool !== undefined) await within(pool.close(), CLOSE_BOUND_MS);
      await cluster.stop();
    }
  },
});

// ---------------------------------------------------------------------------------------
// 2. Timeouts and aborts racing innocent queries, on the shared server (nothing killed).

/** Opens a pool on the shared server, runs `fn`, then requires `close()` to settle. */
async function withSmallPool(
  maxConnections: number,
  fn: (db: DatabaseManager) => Promise<void>,
): Promise<void> {
  const pool = await createSharedPool({
    connectionString: TEST_URL,
    maxConnections,
    minConnections: 1,
    serverSettings: { application_name: uniqueName("pgdbm_cancel") },
  });
  let failure: unknown;
  try {
    await fn(new DatabaseManager({ pool }));
  } catch (error) {
    failure = error;
  }
  const closed = await within(pool.close(), CLOSE_BOUND_MS);
  const hang = closed === undefined
    ? `pool.close() did not settle within ${CLOSE_BOUND_MS} ms`
    : undefined;
  if (failure !== undefined) {
    if (hang !== undefined && failure instanceof Error) failure.message += `\n\nAlso: ${hang}`;
    throw failure;
  }
  assert.equal(hang, undefined);
}

serverTest(
  "The issue's repro: a timed-out queued query takes no other caller's result",
  async () => {
    const uncaught = new Uncaught();
    try {
      const outcomes: Record<string, unknown> = {};
      for (const prepared of [true, false]) {
        const run = withSmallPool(1, async (db) => {
          if (prepared) assert.equal(await db.fetchValue("SELECT $1::int", [0]), 0);
          const slow = db.fetchValue("SELECT 'slow' FROM pg_sleep(0.5)")
            .catch((error) => errorKey(error));
          const timed = db.fetchValue("SELECT $1::int", [100], { timeoutMs: 100 })
            .then(
              (value) => `resolved with ${value}`,
              (error) =>
                error instanceof TimeoutError && error.timeoutMs === 100
                  ? "TimeoutError(100)"
                  : errorKey(error),
            );
          await sleep(20);
          const next = [1, 2, 3].map((n) =>
            db.fetchValue("SELECT $1::int", [n]).catch((error) => errorKey(error))
          );
          const settled = await within(Promise.all([slow, timed, ...next]), 30_000);
          if (settled === undefined) throw new Error("the queries did not settle within 30 s");
          const [slowResult, timedResult, ...values] = settled.value;
          outcomes[prepared ? "prepared" : "first use"] = {
            slow: slowResult,
            timed: timedResult,
            values,
          };
        }).catch((error) => {
          const key = prepared ? "prepared" : "first use";
          outcomes[key] = { ...outcomes[key] as object, error: String(error) };
        });
        await run;
      }
      await sleep(200);
      const expected = { slow: "slow", timed: "TimeoutError(100)", values: [1, 2, 3] };
      assert.deepEqual(
        { ...outcomes, unhandled: uncaught.describe() },
        { prepared: expected, "first use": expected, unhandled: [] },
      );
    } finally {
      uncaught.dispose();
    }
  },
);

function percentile(values: number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return Math.round(sorted[Math.max(0, Math.ceil(sorted.length * p) - 1)]);
}

/** Outcomes of the cancel rounds. */
interface RoundReport {
  rounds: number;
  victims: number;
  victimsTimedOut: number;
  innocents: number;
  wrong: string[];
  innocentFailures: string[];
  victimErrors: string[];
  hung?: string;
  /** Round durations, for the report (never asserted). */
  roundMs: number[];
  /** Why the rounds stopped early, when they did. */
  stopped?: string;
}

/** Rounds stop after this long (reported, not failed): only a pathologically slow pool hits it. */
const ROUNDS_BUDGET_MS = 90_000;

/**
 * Runs `rounds` rounds: each starts 1–3 victims (a short statement with a timeout of a few
 * ms, or aborted after a few ms, or with an aborted signal) and 2–4 innocents (no timeout,
 * no signal), in random order a few ms apart, and waits for all of them.
 */
async function cancelRounds(
  db: DatabaseManager,
  rounds: number,
  rng: ReturnType<typeof random>,
  idBase: number,
): Promise<RoundReport> {
  const report: RoundReport = {
    rounds: 0,
    victims: 0,
    victimsTimedOut: 0,
    innocents: 0,
    wrong: [],
    innocentFailures: [],
    victimErrors: [],
    roundMs: [],
  };
  let nextId = idBase;
  const begin = performance.now();
  const note = (list: string[], line: string) => list.length < 10 && list.push(line);
  for (let round = 0; round < rounds; round++) {
    const failures = report.wrong.length + report.innocentFailures.length +
      report.victimErrors.length;
    if (failures >= 10) {
      report.stopped = `after ${round} rounds: enough failures to report`;
      break;
    }
    if (performance.now() - begin > ROUNDS_BUDGET_MS) {
      report.stopped = `after ${round} rounds: the ${ROUNDS_BUDGET_MS} ms budget ran out`;
      break;
    }
    const roundStart = performance.now();
    const ops: Array<{ at: number; run: () => Promise<void> }> = [];
    const victims = 1 + rng.int(3);
    const innocents = 2 + rng.int(3);
    for (let v = 0; v < victims; v++) {
      const id = nextId++;
      const seconds = rng.pick([0, 0, 0.001, 0.003, 0.008]);
      const literal = rng.next() < 0.4;
      const sql = literal
        ? `SELECT ${id}::int AS v FROM pg_sleep(${seconds})`
        : "SELECT $1::int AS v FROM pg_sleep($2::float8)";
      const params = literal ? [] : [id, seconds];
      const mode = rng.next();
      const timeoutMs = 1 + rng.int(10);
      const abortAfter = rng.int(10);
      ops.push({
        at: rng.int(6),
        run: async () => {
          report.victims++;
          const reason = new Error(`victim ${id} aborted`);
          let options: { timeoutMs?: number; signal?: AbortSignal };
          if (mode < 0.5) {
            options = { timeoutMs };
          } else if (mode < 0.9) {
            const controller = new AbortController();
            setTimeout(() => controller.abort(reason), abortAfter);
            options = { signal: controller.signal };
          } else {
            options = { signal: AbortSignal.abort(reason) };
          }
          try {
            const got = await db.fetchValue(sql, params, options);
            if (got !== id) note(report.wrong, `victim ${id} got ${Deno.inspect(got)}`);
          } catch (error) {
            const own = error instanceof TimeoutError ||
              (options.signal !== undefined &&
                (error === reason || (error instanceof Error && error.cause === reason)));
            if (own) report.victimsTimedOut++;
            else note(report.victimErrors, `victim ${id}: ${errorKey(error)}`);
          }
        },
      });
    }
    for (let i = 0; i < innocents; i++) {
      const id = nextId++;
      const variant = rng.int(4);
      ops.push({
        at: rng.int(6),
        run: async () => {
          report.innocents++;
          try {
            if (variant === 2) {
              const k = 1 + id % 4;
              const rows = await db.fetchAll(
                "SELECT $1::int AS caller, g::int AS i FROM generate_series(1, $2::int) g",
                [id, k],
              );
              const ok = rows.length === k &&
                rows.every((r, j) => r.caller === id && r.i === j + 1);
              if (!ok) note(report.wrong, `innocent ${id} got rows ${Deno.inspect(rows)}`);
              return;
            }
            const got = variant === 0
              ? await db.fetchValue("SELECT $1::int", [id])
              : variant === 1
              ? await db.fetchValue(`SELECT ${id}::int`)
              : await db.fetchValue("SELECT $1::int FROM pg_sleep(0.002)", [id]);
            if (got !== id) note(report.wrong, `innocent ${id} got ${Deno.inspect(got)}`);
          } catch (error) {
            note(
              report.innocentFailures,
              `innocent ${id} (variant ${variant}): ${errorKey(error)}`,
            );
          }
        },
      });
    }
    ops.sort((a, b) => a.at - b.at);
    const started: Promise<void>[] = [];
    let clock = 0;
    for (const op of ops) {
      if (op.at > clock) {
        await sleep(op.at - clock);
        clock = op.at;
      }
      started.push(op.run());
    }
    if ((await within(Promise.all(started), 30_000)) === undefined) {
      report.hung = `round ${round}: its queries did not settle within 30 s`;
      return report;
    }
    report.rounds++;
    report.roundMs.push(performance.now() - roundStart);
  }
  return report;
}

serverTest("Timeouts and aborts never cancel an innocent query nor swap results", async (t) => {
  const uncaught = new Uncaught();
  try {
    const run = (connections: number, rounds: number, idBase: number) =>
      withSmallPool(connections, async (db) => {
        await db.fetchValue("SELECT $1::int", [0]);
        const report = await cancelRounds(db, rounds, random(SEED + connections), idBase);
        const summary = `${connections} connection(s), seed ${SEED}: ${report.rounds} rounds, ` +
          `${report.victims} victims (${report.victimsTimedOut} timed out or aborted), ` +
          `${report.innocents} innocents; round ms p50 ${percentile(report.roundMs, 0.5)}, ` +
          `p99 ${percentile(report.roundMs, 0.99)}, max ${percentile(report.roundMs, 1)}` +
          (report.stopped ? `; stopped ${report.stopped}` : "");
        console.log(summary);
        assert.deepEqual(
          {
            hung: report.hung,
            wrong: report.wrong,
            innocentFailures: report.innocentFailures,
            victimErrors: report.victimErrors,
          },
          { hung: undefined, wrong: [], innocentFailures: [], victimErrors: [] },
          summary,
        );
      });
    await t.step("1,000 rounds on maxConnections 1 and 500 on maxConnections 3", async () => {
      const results = await Promise.allSettled([run(1, 1_000, 1_000), run(3, 500, 500_000)]);
      const failed = results.filter((r): r is PromiseRejectedResult => r.status === "rejected");
      if (failed.length > 0) {
        throw failed.length === 1 ? failed[0].reason : new AggregateError(
          failed.map((r) => r.reason),
          failed.map((r) => String(r.reason)).join("\n\n"),
        );
      }
    });
    await sleep(200);
    assert.deepEqual(uncaught.describe(), [], "unhandled rejections or uncaught errors");
  } finally {
    uncaught.dispose();
  }
});
