/**
 * Transactions, savepoints and dedicated connections: {@link Transaction} (from
 * `db.transaction(fn)`) and {@link Connection} (from `db.acquire(fn)`), both on one leased
 * connection for as long as their callback runs.
 *
 * @module
 */

import type { ResolvedConfig } from "./config.ts";
import type { DriverResult, Row } from "./drivers/driver.ts";
import { PoolError } from "./errors.ts";
import { mayBeginTransaction } from "./_sql.ts";
import { chunkSizes, plainInsert, TARGET_CHECK_SQL } from "./_batch_values.ts";
import type { Lease, QueryOptions } from "./pool/pool.ts";
import { abortedCommitError, Queries, type Runner } from "./queries.ts";
import { cursorBatches, type CursorSession, type Reporter, type StreamOptions } from "./stream.ts";

/** Runs SQL on one leased connection until it is closed (the callback returned). */
export class LeaseRunner implements Runner {
  readonly #lease: Lease;
  readonly #inTransaction: boolean;
  readonly #savepoints: { next: number };
  /** Cursors open on the connection (names must differ while they are open). */
  readonly #cursors: { open: number };
  #open = true;
  #beganOwnTransaction = false;

  /**
   * @param lease The leased connection.
   * @param inTransaction Whether statements run inside `BEGIN` (batches use savepoints then).
   * @param savepoints Counter shared by every runner of one transaction.
   */
  constructor(
    lease: Lease,
    inTransaction: boolean,
    savepoints = { next: 1 },
    cursors = { open: 0 },
  ) {
    this.#lease = lease;
    this.#inTransaction = inTransaction;
    this.#savepoints = savepoints;
    this.#cursors = cursors;
  }

  /** The leased connection. */
  get lease(): Lease {
    return this.#lease;
  }

  get config(): ResolvedConfig {
    return this.#lease.config;
  }

  /** Whether a statement run through this runner may have opened a transaction. */
  get beganOwnTransaction(): boolean {
    return this.#beganOwnTransaction;
  }

  /** A runner for a nested savepoint on the same connection. */
  nested(): LeaseRunner {
    return new LeaseRunner(this.#lease, true, this.#savepoints, this.#cursors);
  }

  /** A fresh savepoint name, unique within the transaction. */
  savepointName(): string {
    return `pgdbm_sp_${this.#savepoints.next++}`;
  }

  /** Refuses every later statement (the callback that owned this runner returned). */
  close(): void {
    this.#open = false;
  }

  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    if (!this.#open) return Promise.reject(finishedError());
    if (!this.#inTransaction && mayBeginTransaction(sql)) this.#beganOwnTransaction = true;
    return this.#lease.query(sql, params, options);
  }

  /** On a leased connection every statement runs on it, reads included. */
  read(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    return this.query(sql, params, options);
  }

  copyIn(sql: string, chunks: AsyncIterable<string | Uint8Array>): Promise<number> {
    if (!this.#open) return Promise.reject(finishedError());
    return this.#lease.copyIn(sql, chunks);
  }

  async *stream(
    sql: string,
    params: readonly unknown[],
    options: StreamOptions | undefined,
    report: Reporter,
  ): AsyncGenerator<Row[]> {
    if (!this.#open) throw finishedError();
    const session: CursorSession = {
      run: (text, values, runOptions) =>
        report(text, values, () => this.query(text, values, runOptions)),
      inTransaction: this.#inTransaction || this.#beganOwnTransaction,
      cursorName: `pgdbm_cursor_${++this.#cursors.open}`,
    };
    try {
      yield* cursorBatches(session, sql, params, options);
    } finally {
      this.#cursors.open--;
      if (session.broken === true) this.#lease.release(true);
    }
  }

  /**
   * In a transaction the COPY runs in a savepoint: leaving the loop early cancels it on the
   * server, which would otherwise abort the whole transaction.
   */
  async *copyOut(
    sql: string,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<Uint8Array, number> {
    if (!this.#open) throw finishedError();
    if (!this.#inTransaction && !this.#beganOwnTransaction) {
      return yield* this.#lease.copyOut(sql, signal);
    }
    const savepoint = this.savepointName();
    await this.#lease.query(`SAVEPOINT ${savepoint}`, []);
    let ended: "early" | "done" | "failed" = "early";
    try {
      const count = yield* this.#lease.copyOut(sql, signal);
      ended = "done";
      return count;
    } catch (error) {
      // A server error leaves the transaction aborted, as any failed statement does.
      if (!(signal?.aborted ?? false)) ended = "failed";
      throw error;
    } finally {
      if (ended === "early") await this.#lease.query(`ROLLBACK TO SAVEPOINT ${savepoint}`, []);
      if (ended !== "failed") await this.#lease.query(`RELEASE SAVEPOINT ${savepoint}`, []);
    }
  }

  async batch(sql: string, paramsList: readonly (readonly unknown[])[]): Promise<number> {
    if (!this.#open) throw finishedError();
    const savepoint = this.#inTransaction ? this.savepointName() : undefined;
    const sent: Promise<DriverResult>[] = [
      this.#lease.query(savepoint ? `SAVEPOINT ${savepoint}` : "BEGIN", []),
    ];
    const counted = await this.#sendRows(sql, paramsList, sent);
    if (savepoint === undefined) sent.push(this.#lease.query("COMMIT", []));
    const settled = await Promise.allSettled(sent);
    const failed = settled.find((s): s is PromiseRejectedResult => s.status === "rejected");
    if (failed !== undefined) {
      const undo = savepoint ? `ROLLBACK TO SAVEPOINT ${savepoint}` : "ROLLBACK";
      await this.#lease.query(undo, []).catch(() => this.#lease.release(true));
      if (savepoint) await this.#lease.query(`RELEASE SAVEPOINT ${savepoint}`, []);
      throw failed.reason;
    }
    if (savepoint) await this.#lease.query(`RELEASE SAVEPOINT ${savepoint}`, []);
    else if ((settled.at(-1) as PromiseFulfilledResult<DriverResult>).value.command !== "COMMIT") {
      throw abortedCommitError();
    }
    let total = 0;
    const end = savepoint ? sent.length : sent.length - 1;
    for (let i = counted; i < end; i++) {
      total += (settled[i] as PromiseFulfilledResult<DriverResult>).value.rowCount;
    }
    return total;
  }

  /**
   * Sends a batch's rows behind its `BEGIN` (or `SAVEPOINT`), as multi-row statements when
   * the statement is a plain INSERT into a plain table (see {@link plainInsert}), else one
   * statement per row, all pipelined.
   *
   * @returns The index in `sent` of the first statement that carries rows.
   */
  async #sendRows(
    sql: string,
    paramsList: readonly (readonly unknown[])[],
    sent: Promise<DriverResult>[],
  ): Promise<number> {
    const insert = plainInsert(sql, paramsList);
    if (insert !== undefined) {
      const check = this.#lease.query(TARGET_CHECK_SQL, [insert.table]);
      // The batch's caller reads every outcome later; a BEGIN that fails meanwhile is not
      // an unhandled rejection.
      sent[0].catch(() => {});
      sent.push(check);
      if (await check.then((result) => result.rows[0]?.plain === true, () => false)) {
        const first = sent.length;
        let at = 0;
        for (const size of chunkSizes(paramsList.length, insert.chunkRows)) {
          const chunk = insert.statement(paramsList.slice(at, at += size));
          sent.push(this.#lease.query(chunk.sql, chunk.params));
        }
        return first;
      }
    }
    const first = sent.length;
    for (const params of paramsList) sent.push(this.#lease.query(sql, params));
    return first;
  }
}

/**
 * What can run a transaction: the query methods and `transaction()`, as a
 * `DatabaseManager`, a `Connection` and a `Transaction` (a savepoint inside it) have.
 */
export type Transactional = Queries & {
  /** Runs `fn` in a transaction (a savepoint inside one). */
  transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T>;
};

/**
 * A transaction: every query method of the manager, on one connection inside
 * `BEGIN … COMMIT`. Valid only inside the callback it was given to.
 *
 * @example Nested savepoint (needs a server)
 * ```ts ignore
 * await db.transaction(async (tx) => {
 *   await tx.execute("INSERT INTO {{tables.orders}} (total) VALUES ($1)", [10]);
 *   await tx.transaction(async (sp) => {
 *     await sp.execute("UPDATE {{tables.stock}} SET n = n - 1"); // rolled back alone on throw
 *   }).catch(() => {});
 * });
 * ```
 */
export class Transaction extends Queries {
  readonly #runner: LeaseRunner;

  /**
   * Wraps a transaction's connection; made by `transaction()`, not by users.
   *
   * @param runner The transaction's connection.
   * @param schema The schema templates expand to.
   */
  constructor(runner: LeaseRunner, schema: string | undefined) {
    super(runner, schema);
    this.#runner = runner;
  }

  /**
   * Runs `fn` inside a `SAVEPOINT`: released when `fn` returns, rolled back to (alone,
   * the outer transaction goes on) when it throws.
   *
   * @param fn The work; it gets a transaction object for the savepoint.
   * @returns What `fn` returns.
   */
  async transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T> {
    const name = this.#runner.savepointName();
    await this.#runner.query(`SAVEPOINT ${name}`, []);
    const inner = this.#runner.nested();
    try {
      const result = await fn(new Transaction(inner, this.schema));
      await this.#runner.query(`RELEASE SAVEPOINT ${name}`, []);
      return result;
    } catch (error) {
      await this.#runner.query(`ROLLBACK TO SAVEPOINT ${name}`, []).catch(() => {});
      throw error;
    } finally {
      inner.close();
    }
  }
}

/** Statement-level access to a connection, without templates. */
export interface RawConnection {
  /** The server process id of the connection. */
  readonly pid: number;
  /**
   * Runs SQL exactly as given (no template expansion).
   *
   * @param sql The statement.
   * @param params Values for `$1…$n`.
   */
  query(
    sql: string,
    params?: readonly unknown[],
    options?: QueryOptions,
  ): Promise<{ rows: Record<string, unknown>[]; command: string; rowCount: number }>;
}

/**
 * A connection of its own for the length of an `acquire()` callback: every query method,
 * `transaction()` on this same connection, and `raw` for SQL without templates. Session
 * state you set (`SET …`) stays with the connection; prefer `SET LOCAL` in a transaction.
 */
export class Connection extends Queries {
  readonly #runner: LeaseRunner;
  readonly #raw: RawConnection;

  /**
   * Wraps a leased connection; made by `acquire()`, not by users.
   *
   * @param runner The leased connection.
   * @param schema The schema templates expand to.
   */
  constructor(runner: LeaseRunner, schema: string | undefined) {
    super(runner, schema);
    this.#runner = runner;
    this.#raw = {
      pid: runner.lease.pid,
      query: (sql, params = [], options) => runner.query(sql, params, options),
    };
  }

  /** The connection without templates. */
  get raw(): RawConnection {
    return this.#raw;
  }

  /** The server process id of this connection. */
  get pid(): number {
    return this.#runner.lease.pid;
  }

  /**
   * Runs `fn` in a transaction on this connection (`BEGIN … COMMIT`, `ROLLBACK` on throw).
   *
   * @param fn The work.
   * @returns What `fn` returns.
   */
  transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T> {
    return runTransaction(this.#runner.lease, this.schema, fn);
  }
}

/**
 * Runs `fn` in `BEGIN … COMMIT` on a leased connection; rolls back and rethrows when `fn`
 * throws. A connection whose rollback failed is marked for closing.
 */
export async function runTransaction<T>(
  leased: Lease,
  schema: string | undefined,
  fn: (tx: Transaction) => Promise<T>,
): Promise<T> {
  const lease = new BegunLease(leased);
  const runner = new LeaseRunner(lease, true);
  try {
    let result: T;
    try {
      result = await fn(new Transaction(runner, schema));
    } catch (error) {
      await lease.query("ROLLBACK", []).catch(() => lease.release(true));
      throw error;
    }
    const commit = await lease.query("COMMIT", []);
    if (commit.command !== "COMMIT") throw abortedCommitError();
    return result;
  } finally {
    runner.close();
  }
}

/**
 * A leased connection whose `BEGIN` is sent without waiting for its answer, so the first
 * statement of the transaction travels in the same write (one round trip fewer per
 * transaction). Until `BEGIN` has answered, each statement's caller also waits for it and
 * gets its error when it failed. `BEGIN` fails only with its session (a lost or terminated
 * connection, where the statements behind it fail too): a cancel cannot reach it, since a
 * leased connection takes no statement while a cancel on it is pending.
 */
class BegunLease implements Lease {
  readonly #lease: Lease;
  #begun: Promise<unknown> | undefined;

  constructor(lease: Lease) {
    this.#lease = lease;
    const begun = lease.query("BEGIN", []);
    this.#begun = begun;
    begun.then(() => {
      if (this.#begun === begun) this.#begun = undefined;
    }, () => {});
  }

  get config(): ResolvedConfig {
    return this.#lease.config;
  }

  get pid(): number {
    return this.#lease.pid;
  }

  query(sql: string, params: readonly unknown[], options?: QueryOptions): Promise<DriverResult> {
    const begun = this.#begun;
    const result = this.#lease.query(sql, params, options);
    if (begun === undefined) return result;
    result.catch(() => {});
    return begun.then(() => result);
  }

  async copyIn(
    sql: string,
    chunks: AsyncIterable<string | Uint8Array>,
    signal?: AbortSignal,
  ): Promise<number> {
    await this.#begun;
    return await this.#lease.copyIn(sql, chunks, signal);
  }

  async *copyOut(sql: string, signal?: AbortSignal): AsyncGenerator<Uint8Array, number> {
    await this.#begun;
    return yield* this.#lease.copyOut(sql, signal);
  }

  release(discard?: boolean): void {
    this.#lease.release(discard);
  }
}

function finishedError(): PoolError {
  return new PoolError(
    "Cannot run the query: the transaction or acquire() callback it belongs to has already " +
      "finished; run queries only inside the callback (await them before it returns)",
  );
}
