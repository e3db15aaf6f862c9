/**
 * Which driver should sit behind pgdbm's seam (`src/drivers/driver.ts`)? The same workloads through
 * each candidate, in one run, against raw postgres.js on one connection (the baseline of
 * every group). See docs/driver.md for the numbers and the decision.
 *
 * Groups:
 * - `burst`: one iteration is 1,000 concurrent `SELECT $1::int` (prepared where the driver
 *   supports it), workload (a) of the issue, plus the same through 10 connections.
 * - `callers`: one iteration is 64 callers, each looping 50 point reads
 *   (`SELECT v FROM driver_bench_points WHERE id = $1`, awaiting each before the next),
 *   workloads (b) on 1 connection and (c) on 10 connections.
 * Both groups also run pgdbm's pool (`createSharedPool` + `DatabaseManager.fetchValue`) at
 * `maxConnections` 1 and 10 — workload (d).
 *
 * Candidates: postgres.js 3.4.9 (`max: 1` / `max: 10`); node-postgres 8.23 with its opt-in
 * `pipeline: true` (one `pg.Client` per connection, callers spread round-robin), and its
 * normal one-query-at-a-time queue (`pg.Client`, `pg.Pool`) for contrast; and
 * {@link WireConnection}, a minimal pipelining loop over `pg-protocol` (Parse + Describe
 * once per statement, then Bind/Execute/Sync per query on one `Deno.connect` socket, trust
 * auth only), the ceiling of a connection layer of our own.
 *
 * Every iteration checks that each caller got its own value back, so a driver that shifts
 * results between pipelined callers fails the bench instead of looking fast.
 *
 *   deno bench -A bench/driver_bench.ts
 *   deno run -A bench/driver_bench.ts [rounds]   # interleaved rounds, see interleaved()
 *
 * The point table `driver_bench_points` (3,200 rows) is created once if missing and left in
 * place (it never changes), so concurrent runs share it safely.
 */
import { Buffer } from "node:buffer";
import postgres from "postgres";
import pg from "pg";
import { serialize } from "pg-protocol";
import { Parser } from "pg-protocol/dist/parser.js";
import type { BackendMessage, DatabaseError, Field } from "pg-protocol/dist/messages.js";
import { createSharedPool, DatabaseManager } from "../mod.ts";
import { median } from "./_support.ts";

const url = Deno.env.get("PGDBM_TEST_URL") ?? "postgres://postgres@127.0.0.1:5432/test";
const BURST = 1000;
const CALLERS = 64;
const READS = 50;
const POINTS = CALLERS * READS;
const TABLE = "driver_bench_points";
const SELECT_INT = "SELECT $1::int AS v";
const POINT_READ = `SELECT v FROM ${TABLE} WHERE id = $1`;

/** The value stored for `id`: unique per row, so a result shifted to another caller shows. */
const valueOf = (id: number) => id * 7 + 3;

// ---------------------------------------------------------------------------------------
// A minimal pipelining connection over pg-protocol (the ceiling of an own layer)
// ---------------------------------------------------------------------------------------

type Row = Record<string, unknown>;

interface Statement {
  text: string;
  name: string;
  fields: Field[] | null;
}

interface Pending {
  statement: Statement;
  rows: string[][];
  error: DatabaseError | null;
  resolve: (rows: Row[]) => void;
  reject: (error: unknown) => void;
}

const PARSERS: Record<number, (text: string) => unknown> = {
  16: (text) => text === "t",
  21: Number,
  23: Number,
  26: Number,
  700: Number,
  701: Number,
};

/**
 * One PostgreSQL session that pipelines extended-protocol queries: every query is a named
 * prepared statement (Parse + Describe on first use, on the wire ahead of the queries that
 * reuse it), then Bind/Execute/Sync. Replies are matched to callers in FIFO order, one
 * ReadyForQuery each. No TLS, no password auth, no cancel, no COPY: just the hot path.
 */
class WireConnection {
  readonly #conn: Deno.TcpConn;
  readonly #parser = new Parser();
  readonly #pending: Pending[] = [];
  readonly #statements = new Map<string, Statement>();
  #statementCount = 0;
  #out: Uint8Array[] = [];
  #writing = false;
  #closed = false;
  #onStartup: ((message: BackendMessage) => void) | null = null;

  private constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
  }

  static async open(connectionString: string): Promise<WireConnection> {
    const target = new URL(connectionString);
    const conn = await Deno.connect({
      hostname: target.hostname,
      port: Number(target.port || 5432),
    });
    conn.setNoDelay(true);
    const connection = new WireConnection(conn);
    const ready = new Promise<void>((resolve, reject) => {
      connection.#onStartup = (message) => {
        if (message.name === "readyForQuery") resolve();
        else if (message.name === "error") reject(message);
        else if (message.name.startsWith("authentication") && message.name !== "authenticationOk") {
          reject(new Error(`only trust auth is supported, the server asked for ${message.name}`));
        }
      };
    });
    connection.#readLoop();
    connection.#send(serialize.startup({
      user: decodeURIComponent(target.username || "postgres"),
      database: decodeURIComponent(target.pathname.slice(1) || "postgres"),
    }));
    await ready;
    connection.#onStartup = null;
    return connection;
  }

  /** Runs `text` as a named prepared statement with text-format `values`. */
  query(text: string, values: readonly unknown[]): Promise<Row[]> {
    if (this.#closed) return Promise.reject(new Error("connection closed"));
    let statement = this.#statements.get(text);
    const { promise, resolve, reject } = Promise.withResolvers<Row[]>();
    if (statement === undefined) {
      statement = { text, name: `s${this.#statementCount++}`, fields: null };
      this.#statements.set(text, statement);
      this.#out.push(
        serialize.parse({ name: statement.name, text }),
        serialize.describe({ type: "S", name: statement.name }),
      );
    }
    this.#out.push(
      serialize.bind({
        statement: statement.name,
        values: values.map((v) => v === null || v === undefined ? null : String(v)),
      }),
      serialize.execute(),
      serialize.sync(),
    );
    this.#pending.push({ statement, rows: [], error: null, resolve, reject });
    this.#flush();
    return promise;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#conn.write(serialize.end());
    } catch {
      // already gone
    }
    this.#conn.close();
  }

  #send(buffer: Uint8Array): void {
    this.#out.push(buffer);
    this.#flush();
  }

  /** Writes what callers queued, coalescing everything queued while a write is under way. */
  async #flush(): Promise<void> {
    if (this.#writing) return;
    this.#writing = true;
    try {
      // Let the callers of this tick queue their messages first: one write for all of them.
      await Promise.resolve();
      while (this.#out.length > 0) {
        const chunks = this.#out;
        this.#out = [];
        let data = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
        while (data.length > 0) {
          const n = await this.#conn.write(data);
          data = data.subarray(n);
        }
      }
    } catch (error) {
      this.#fail(error);
    } finally {
      this.#writing = false;
    }
  }

  async #readLoop(): Promise<void> {
    try {
      while (true) {
        // A fresh buffer per read: the parser keeps a reference to an incomplete tail.
        const buffer = new Uint8Array(65536);
        const n = await this.#conn.read(buffer);
        if (n === null) break;
        this.#parser.parse(Buffer.from(buffer.buffer, 0, n), this.#onMessage);
      }
      this.#fail(new Error("connection closed by the server"));
    } catch (error) {
      this.#fail(error);
    }
  }

  #onMessage = (message: BackendMessage): void => {
    if (this.#onStartup !== null) return this.#onStartup(message);
    const head = this.#pending[0];
    switch (message.name) {
      case "dataRow":
        head.rows.push((message as unknown as { fields: string[] }).fields);
        break;
      case "rowDescription":
        head.statement.fields = (message as unknown as { fields: Field[] }).fields;
        break;
      case "error":
        head.error = message as DatabaseError;
        break;
      case "readyForQuery":
        this.#pending.shift();
        if (head.error !== null) {
          // A failed Parse leaves no statement: the next user parses it again.
          if (head.statement.fields === null) this.#statements.delete(head.statement.text);
          head.reject(head.error);
        } else {
          head.resolve(toRows(head.statement.fields ?? [], head.rows));
        }
        break;
      default:
        // parseComplete, bindComplete, parameterDescription, noData, commandComplete,
        // notice, parameterStatus: nothing to keep for this bench.
    }
  };

  #fail(error: unknown): void {
    this.#closed = true;
    for (const pending of this.#pending.splice(0)) pending.reject(error);
  }
}

function toRows(fields: Field[], raw: string[][]): Row[] {
  const rows: Row[] = new Array(raw.length);
  for (let r = 0; r < raw.length; r++) {
    const values = raw[r];
    const row: Row = {};
    for (let i = 0; i < fields.length; i++) {
      const text = values[i];
      const parse = PARSERS[fields[i].dataTypeID];
      row[fields[i].name] = text === null ? null : parse === undefined ? text : parse(text);
    }
    rows[r] = row;
  }
  return rows;
}

// ---------------------------------------------------------------------------------------
// The candidates, each as "run one query, give me the first column of the first row"
// ---------------------------------------------------------------------------------------

/** Runs `sql` with `params` and resolves with the first column of the first row. */
type Fetch = (sql: string, params: [number]) => Promise<unknown>;

function roundRobin<T>(items: T[]): () => T {
  let next = 0;
  return () => {
    const item = items[next];
    next = (next + 1) % items.length;
    return item;
  };
}

function postgresJs(sql: postgres.Sql): Fetch {
  return async (text, params) => {
    const rows = await sql.unsafe(text, params, { prepare: true });
    return rows[0].v;
  };
}

/** node-postgres clients (pipelined or not), callers spread round-robin; named statements. */
function nodePostgres(clients: pg.Client[]): Fetch {
  const pick = roundRobin(clients);
  const names = new Map<string, string>();
  return async (text, values) => {
    let name = names.get(text);
    if (name === undefined) names.set(text, name = `q${names.size}`);
    const result = await pick().query({ name, text, values });
    return result.rows[0].v;
  };
}

function nodePostgresPool(pool: pg.Pool): Fetch {
  const names = new Map<string, string>();
  return async (text, values) => {
    let name = names.get(text);
    if (name === undefined) names.set(text, name = `q${names.size}`);
    const result = await pool.query({ name, text, values });
    return result.rows[0].v;
  };
}

function wire(connections: WireConnection[]): Fetch {
  const pick = roundRobin(connections);
  return async (text, params) => (await pick().query(text, params))[0].v;
}

function pgdbm(db: DatabaseManager): Fetch {
  return (text, params) => db.fetchValue(text, params);
}

// ---------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------

const pgjs1 = postgres(url, { max: 1, onnotice: () => {} });
const pgjs10 = postgres(url, { max: 10, onnotice: () => {} });

await pgjs1.begin(async (sql) => {
  // Concurrent runs: one creates and fills the table, the others find it done.
  await sql`SELECT pg_advisory_xact_lock(7391, 1)`;
  await sql.unsafe(`CREATE TABLE IF NOT EXISTS ${TABLE} (id int PRIMARY KEY, v int NOT NULL)`);
  await sql.unsafe(
    `INSERT INTO ${TABLE} SELECT g, g * 7 + 3 FROM generate_series(1, ${POINTS}) g ` +
      "ON CONFLICT (id) DO NOTHING",
  );
});

async function pgClients(n: number, pipeline: boolean): Promise<pg.Client[]> {
  const clients = Array.from(
    { length: n },
    () => new pg.Client({ connectionString: url, pipeline } as pg.ClientConfig),
  );
  for (const client of clients) {
    // Without a listener a server-side disconnect would be an uncaught 'error' event.
    client.on("error", () => {});
    await client.connect();
  }
  return clients;
}

const pgPipe1 = await pgClients(1, true);
const pgPipe10 = await pgClients(10, true);
const pgQueue1 = await pgClients(1, false);
const pgPool10 = new pg.Pool({ connectionString: url, max: 10 });
pgPool10.on("error", () => {});

if (!(pgPipe1[0] as unknown as { pipeline?: boolean }).pipeline) {
  throw new Error("this node-postgres has no `pipeline` option: the bench would measure its queue");
}

const wire1 = [await WireConnection.open(url)];
const wire10 = await Promise.all(Array.from({ length: 10 }, () => WireConnection.open(url)));

const pool1 = await createSharedPool({ connectionString: url, maxConnections: 1 });
const pool10 = await createSharedPool({ connectionString: url, maxConnections: 10 });
const db1 = new DatabaseManager({ pool: pool1 });
const db10 = new DatabaseManager({ pool: pool10 });

interface Candidate {
  name: string;
  fetch: Fetch;
}

const candidates: Candidate[] = [
  { name: "postgres.js, 1 connection", fetch: postgresJs(pgjs1) },
  { name: "postgres.js, 10 connections", fetch: postgresJs(pgjs10) },
  { name: "node-postgres pipeline, 1 connection", fetch: nodePostgres(pgPipe1) },
  { name: "node-postgres pipeline, 10 connections", fetch: nodePostgres(pgPipe10) },
  { name: "node-postgres queue (no pipeline), 1 connection", fetch: nodePostgres(pgQueue1) },
  {
    name: "node-postgres pg.Pool (no pipeline), 10 connections",
    fetch: nodePostgresPool(pgPool10),
  },
  { name: "pg-protocol loop, 1 connection", fetch: wire(wire1) },
  { name: "pg-protocol loop, 10 connections", fetch: wire(wire10) },
  { name: "pgdbm pool, maxConnections 1", fetch: pgdbm(db1) },
  { name: "pgdbm pool, maxConnections 10", fetch: pgdbm(db10) },
];

// ---------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------

/** (a): 1,000 concurrent `SELECT $1::int`; every caller must get its own number back. */
async function burst(fetch: Fetch): Promise<void> {
  const pending = new Array<Promise<unknown>>(BURST);
  for (let i = 0; i < BURST; i++) pending[i] = fetch(SELECT_INT, [i]);
  const results = await Promise.all(pending);
  for (let i = 0; i < BURST; i++) {
    if (results[i] !== i) throw new Error(`caller ${i} got ${results[i]}`);
  }
}

/** (b)/(c): 64 callers, each awaiting 50 point reads in turn, each checking its own row. */
async function callers(fetch: Fetch): Promise<void> {
  const loop = async (caller: number) => {
    for (let j = 0; j < READS; j++) {
      const id = caller * READS + j + 1;
      const v = await fetch(POINT_READ, [id]);
      if (v !== valueOf(id)) throw new Error(`caller ${caller} read id ${id}, got v=${v}`);
    }
  };
  await Promise.all(Array.from({ length: CALLERS }, (_, c) => loop(c)));
}

// Fixed sample counts (about 2 s per bench for `burst`, 3 s for `callers` here) so every
// candidate is measured over a similar stretch of a noisy machine's time.
const workloads = [
  { group: "burst", workload: burst, n: 60 },
  { group: "callers", workload: callers, n: 20 },
] as const;

for (const { group, workload, n } of workloads) {
  for (const [index, candidate] of candidates.entries()) {
    Deno.bench({
      group,
      name: `${group}: ${candidate.name}`,
      baseline: index === 0,
      n,
      warmup: 5,
      async fn() {
        await workload(candidate.fetch);
      },
    });
  }
}

async function closeAll(): Promise<void> {
  await Promise.all([
    pgjs1.end(),
    pgjs10.end(),
    ...[...pgPipe1, ...pgPipe10, ...pgQueue1].map((client) => client.end()),
    pgPool10.end(),
    ...[...wire1, ...wire10].map((connection) => connection.close()),
    pool1.close(),
    pool10.close(),
  ]);
}

/**
 * `deno run -A bench/driver_bench.ts [rounds]`: the same workloads, interleaved. Within a
 * round every candidate runs one iteration in turn (the order rotating by one each time)
 * until each has run a fixed number, so all candidates are sampled over the same stretch
 * of time and a burst of load from other processes hits them alike. A round's ratio is the
 * baseline's median iteration time divided by the candidate's. Prints, per candidate, the
 * median of the per-round ratios and their range.
 */
async function interleaved(rounds: number): Promise<void> {
  const iterations = { burst: 15, callers: 5 } as const;
  for (const { group, workload } of workloads) {
    const ratios: number[][] = candidates.map(() => []);
    const times: number[][] = candidates.map(() => []);
    for (const candidate of candidates) await workload(candidate.fetch); // warm up
    for (let round = 0; round < rounds; round++) {
      const samples: number[][] = candidates.map(() => []);
      for (let i = 0; i < iterations[group]; i++) {
        for (let k = 0; k < candidates.length; k++) {
          const index = (k + i + round) % candidates.length;
          const start = performance.now();
          await workload(candidates[index].fetch);
          samples[index].push(performance.now() - start);
        }
      }
      const medians = samples.map(median);
      for (let index = 0; index < candidates.length; index++) {
        ratios[index].push(medians[0] / medians[index]);
        times[index].push(medians[index]);
      }
    }
    console.log(`\n${group}: ${rounds} rounds, ${iterations[group]} interleaved iterations each`);
    console.log("ratio = baseline time / candidate time (> 1 is faster than the baseline)");
    for (const [index, candidate] of candidates.entries()) {
      const r = ratios[index];
      console.log(
        `${candidate.name.padEnd(54)} ratio ${median(r).toFixed(2)} ` +
          `(${Math.min(...r).toFixed(2)}–${Math.max(...r).toFixed(2)})  ` +
          `median ${median(times[index]).toFixed(1)} ms/iteration`,
      );
    }
  }
}

if (import.meta.main) {
  try {
    await interleaved(Number(Deno.args[0] ?? 7));
  } finally {
    await closeAll();
  }
}

globalThis.addEventListener("unload", () => {
  pgjs1.end();
  pgjs10.end();
  for (const client of [...pgPipe1, ...pgPipe10, ...pgQueue1]) client.end();
  pgPool10.end();
  for (const connection of [...wire1, ...wire10]) connection.close();
  pool1.close();
  pool10.close();
});
