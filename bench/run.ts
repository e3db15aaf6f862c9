/**
 * The comparison table of the README: every workload through pgdbm and through its peers in
 * the same run — raw postgres.js and node-postgres from Deno, asyncpg and pgbench when they
 * are installed (see bench/peers.ts), psql for the migration rows — interleaved, medians of
 * 3 rounds, printed as pgdbm / best peer (> 1 means pgdbm is faster).
 *
 *   deno task bench                       # this, after the micro benches
 *   deno run -A bench/run.ts [rounds] [--markdown] [--only=TEXT]…  # rows whose name has a TEXT
 *
 * Everything runs in a database made for the run (`pgdbm_bench_…`) and dropped after it.
 */

import type { Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import postgres from "postgres";
import pg from "pg";
import { from as copyFrom } from "pg-copy-streams";
import { createSharedPool, DatabaseManager } from "../mod.ts";
import { migrateSchemas } from "../src/migrate/fleet.ts";
import { expandTemplate } from "../src/template.ts";
import {
  callers,
  type Candidate,
  createBenchDatabase,
  formatResults,
  interleaved,
  markdownTable,
  timed,
  type Workload,
} from "./_support.ts";
import { externalPeers } from "./peers.ts";

const ROUNDS = Number(Deno.args.find((a) => /^\d+$/.test(a)) ?? 3);
/** `--only=TEXT`, repeatable: the rows whose name contains one of the texts (all rows without). */
const ONLY = Deno.args.filter((a) => a.startsWith("--only=")).map((a) => a.slice("--only=".length));
const FLEET = fileURLToPath(new URL("../tests/fixtures/migrations/fleet/", import.meta.url));
const FIRST_RESULT = fileURLToPath(new URL("./_first_result.ts", import.meta.url));
const MODULE = "tenant";
const TPCB_TRANSACTIONS = 320;
const CHECK_SCHEMAS = 1000;

type Record3 = [number, string, string];
const RECORDS: Record3[] = Array.from(
  { length: 500_000 },
  (_, i) => [i, `user${i}@example.com`, `Name ${i}`],
);

const INSERT = "INSERT INTO bench_rows VALUES ($1, $2, $3)";
const UNNEST = "INSERT INTO bench_rows SELECT * FROM unnest($1::int[], $2::text[], $3::text[])";
const POINT = "SELECT v FROM bench_points WHERE id = $1";
const ALL = "SELECT id, email, name FROM bench_big";
const PAGE = "SELECT id, email, name FROM bench_big WHERE id > $1 ORDER BY id LIMIT 100";
const TPCB = [
  "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
  "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
  "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
  "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = 1",
  "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) " +
  "VALUES ($1, 1, $2, $3, CURRENT_TIMESTAMP)",
] as const;

const database = await createBenchDatabase();
const url = database.url;
const log = (line: string) => console.error(line);

/** Tables of the run; the TPC-B ones are pgbench's at scale 1, so pgbench runs on them too. */
async function createTables(): Promise<void> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    await sql.unsafe(`
      CREATE TABLE bench_rows (id int, email text, name text);
      CREATE TABLE bench_copy (id int, email text, name text);
      CREATE TABLE bench_points (id int PRIMARY KEY, v int NOT NULL);
      INSERT INTO bench_points SELECT g, g * 7 FROM generate_series(1, 10000) g;
      CREATE TABLE bench_big (id int PRIMARY KEY, email text NOT NULL, name text NOT NULL);
      INSERT INTO bench_big SELECT g, 'user' || g || '@example.com', 'Name ' || g
        FROM generate_series(1, 100000) g;
      CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler char(88));
      CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler char(84));
      CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
      CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp,
        filler char(22));
      INSERT INTO pgbench_branches VALUES (1, 0, '');
      INSERT INTO pgbench_tellers SELECT g, 1, 0, '' FROM generate_series(1, 10) g;
      INSERT INTO pgbench_accounts SELECT g, 1, 0, '' FROM generate_series(1, 100000) g;
    `);
    await sql.unsafe("VACUUM ANALYZE");
  } finally {
    await sql.end();
  }
}

function random(max: number): number {
  return 1 + Math.floor(Math.random() * max);
}

/** The values of one TPC-B-like transaction, drawn like pgbench's. */
function tpcbValues(): { aid: number; tid: number; delta: number } {
  return { aid: random(100_000), tid: random(10), delta: random(10_001) - 5001 };
}

function checkPoint(key: number, value: unknown): void {
  if (value !== key * 7) throw new Error(`point read ${key} got ${value}`);
}

const pageStart = (caller: number, i: number) => (caller * 100 + i) * 97 % 99_000;

function checkPage(first: number, rows: readonly { id: unknown }[]): void {
  if (rows.length !== 100 || rows[0].id !== first + 1) throw new Error("wrong page of rows");
}

/** COPY text of `rows`, for the raw drivers (no escaping needed for these values). */
function* copyChunks(rows: readonly Record3[]): Generator<string> {
  let chunk = "";
  for (const [id, email, name] of rows) {
    chunk += `${id}\t${email}\t${name}\n`;
    if (chunk.length > 65536) {
      yield chunk;
      chunk = "";
    }
  }
  if (chunk !== "") yield chunk;
}

async function writeAll(
  stream: Writable,
  rows: readonly Record3[],
): Promise<void> {
  const finished = new Promise((resolve, reject) => {
    stream.once("finish", resolve);
    stream.once("error", reject);
  });
  for (const chunk of copyChunks(rows)) {
    if (!stream.write(chunk)) await new Promise((r) => stream.once("drain", r));
  }
  stream.end();
  await finished;
}

/** node-postgres named statements, one name per text. */
const names = new Map<string, string>();
function named(text: string, values: unknown[]): pg.QueryConfig {
  let name = names.get(text);
  if (name === undefined) names.set(text, name = `q${names.size}`);
  return { name, text, values };
}

/**
 * Runs `fn` twice on a client from `open`, timing the second run, and closes the client.
 * Each JS candidate gets what `peers.py` gives asyncpg (`min_size = max_size`, one untimed
 * run): connections opened and code warmed outside the timing.
 */
async function secondRun<C>(
  open: () => Promise<C> | C,
  close: (client: C) => Promise<unknown>,
  fn: (client: C) => Promise<unknown>,
): Promise<number> {
  const client = await open();
  try {
    await fn(client);
    return await timed(() => fn(client));
  } finally {
    await close(client);
  }
}

/** {@link secondRun} on a pgdbm pool of `max` connections. */
function withPgdbm(max: number, fn: (db: DatabaseManager) => Promise<unknown>): Promise<number> {
  return secondRun(
    async () =>
      new DatabaseManager({
        pool: await createSharedPool({ connectionString: url, maxConnections: max }),
      }),
    (db) => db.pool.close(),
    fn,
  );
}

/** {@link secondRun} on raw postgres.js with `max` connections. */
function withPostgresJs(max: number, fn: (sql: postgres.Sql) => Promise<unknown>): Promise<number> {
  return secondRun(() => postgres(url, { max, onnotice: () => {} }), (sql) => sql.end(), fn);
}

/** {@link secondRun} on a node-postgres pool of `max` connections. */
function withNodePostgres(max: number, fn: (pool: pg.Pool) => Promise<unknown>): Promise<number> {
  return secondRun(
    () => {
      const pool = new pg.Pool({ connectionString: url, max });
      pool.on("error", () => {});
      return pool;
    },
    (pool) => pool.end(),
    fn,
  );
}

// Warm pools shared by the workloads that measure steady state (10 connections each).
const pgdbmPool = await createSharedPool({ connectionString: url, maxConnections: 10 });
const db = new DatabaseManager({ pool: pgdbmPool });
const pgjs10 = postgres(url, { max: 10, onnotice: () => {} });
const pgjs1 = postgres(url, { max: 1, onnotice: () => {} });
const pgPool = new pg.Pool({ connectionString: url, max: 10 });
pgPool.on("error", () => {});
const pgPipelined = new pg.Client({ connectionString: url, pipeline: true } as pg.ClientConfig);
pgPipelined.on("error", () => {});

async function truncate(table: string): Promise<void> {
  await db.execute(`TRUNCATE ${table}`);
}

/** A candidate that times `fn` writing into an emptied `bench_rows` (the emptying untimed). */
function intoEmptyRows(fn: () => Promise<unknown>): Candidate {
  return async () => {
    await truncate("bench_rows");
    return await timed(fn);
  };
}

async function startProcess(args: string[]): Promise<number> {
  const start = performance.now();
  const result = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", FIRST_RESULT, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const ms = performance.now() - start;
  if (!result.success) throw new Error(new TextDecoder().decode(result.stderr));
  return ms;
}

async function psql(file: string): Promise<number> {
  const start = performance.now();
  const result = await new Deno.Command("psql", {
    args: ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", "-f", file, url],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const ms = performance.now() - start;
  if (!result.success) throw new Error(new TextDecoder().decode(result.stderr));
  return ms;
}

function schemaNames(prefix: string, count: number): string[] {
  const run = crypto.randomUUID().replaceAll("-", "").slice(0, 8);
  return Array.from({ length: count }, (_, i) => `${prefix}_${run}_${i}`);
}

async function dropSchemas(schemas: string[]): Promise<void> {
  for (let i = 0; i < schemas.length; i += 100) {
    await db.execute(
      `DROP SCHEMA IF EXISTS ${schemas.slice(i, i + 100).map((s) => `"${s}"`).join(", ")} CASCADE`,
    );
  }
}

const migrationFiles = await Promise.all(
  [...Deno.readDirSync(FLEET)].map((e) => e.name).sort().map((name) =>
    Deno.readTextFile(`${FLEET}/${name}`)
  ),
);

/** The SQL a psql session runs for `schemas`: each migration in its own transaction. */
function migrationScript(schemas: string[]): string {
  return schemas.map((schema) =>
    `CREATE SCHEMA "${schema}";\n` +
    migrationFiles.map((sql) => `BEGIN;\n${expandTemplate(sql, schema)}\nCOMMIT;\n`).join("")
  ).join("");
}

async function scriptFile(text: string): Promise<string> {
  const file = await Deno.makeTempFile({ suffix: ".sql" });
  await Deno.writeTextFile(file, text);
  return file;
}

let fleetSchemas: string[] = [];
let checkFile = "";

const psqlMigrate = async () => {
  const schemas = schemaNames("psql", 20);
  const file = await scriptFile(migrationScript(schemas));
  try {
    return await psql(file);
  } finally {
    await Deno.remove(file);
    await dropSchemas(schemas);
  }
};

async function pgdbmMigrate(): Promise<number> {
  const schemas = schemaNames("fleet", 20);
  try {
    return await timed(async () => {
      const result = await migrateSchemas(pgdbmPool, schemas, {
        migrationsPath: FLEET,
        moduleName: MODULE,
      });
      if (result.status !== "success") throw new Error(`fleet run ended ${result.status}`);
    });
  } finally {
    await dropSchemas(schemas);
  }
}

/**
 * 1,000 migrated schemas: the first by pgdbm, the others by psql running the same SQL and
 * copying the first one's history rows (50 schemas a transaction), which is much quicker.
 */
async function prepareCheck(): Promise<void> {
  fleetSchemas = schemaNames("check", CHECK_SCHEMAS);
  const [first, ...rest] = fleetSchemas;
  const result = await migrateSchemas(pgdbmPool, [first], {
    migrationsPath: FLEET,
    moduleName: MODULE,
  });
  if (result.status !== "success") throw new Error(`setup ended ${result.status}`);
  const history = `"${first}".schema_migrations`;
  let script = "";
  for (let i = 0; i < rest.length; i += 50) {
    script += "BEGIN;\n" + rest.slice(i, i + 50).map((schema) =>
      `CREATE SCHEMA "${schema}";\n` +
      migrationFiles.map((sql) => `${expandTemplate(sql, schema)}\n`).join("") +
      `CREATE TABLE "${schema}".schema_migrations (LIKE ${history} INCLUDING ALL);\n` +
      `INSERT INTO "${schema}".schema_migrations SELECT * FROM ${history};\n`
    ).join("") + "COMMIT;\n";
  }
  const setup = await scriptFile(script);
  try {
    await psql(setup);
  } finally {
    await Deno.remove(setup);
  }
  checkFile = await scriptFile(
    fleetSchemas.map((s) =>
      `SELECT filename, checksum FROM "${s}".schema_migrations ` +
      `WHERE module_name = '${MODULE}' OR module_name IS NULL ORDER BY id;\n`
    ).join(""),
  );
}

function workloads(peers: Awaited<ReturnType<typeof externalPeers>>): Workload[] {
  const asyncpg = (name: string): Record<string, Candidate> =>
    peers.asyncpg === undefined ? {} : { asyncpg: peers.asyncpg(name) };
  const tpcb = (clients: number): Workload => ({
    name: `TPC-B-like transactions, ${clients} clients`,
    pgdbm: () =>
      withPgdbm(
        clients,
        (db) =>
          callers(clients, TPCB_TRANSACTIONS / clients, () =>
            db.transaction(async (tx) => {
              const { aid, tid, delta } = tpcbValues();
              await tx.execute(TPCB[0], [delta, aid]);
              await tx.fetchValue(TPCB[1], [aid]);
              await tx.execute(TPCB[2], [delta, tid]);
              await tx.execute(TPCB[3], [delta]);
              await tx.execute(TPCB[4], [tid, aid, delta]);
            })),
      ),
    peers: {
      "postgres.js": () =>
        withPostgresJs(
          clients,
          (sql) =>
            callers(clients, TPCB_TRANSACTIONS / clients, () =>
              sql.begin(async (tx) => {
                const { aid, tid, delta } = tpcbValues();
                const p = { prepare: true };
                await tx.unsafe(TPCB[0], [delta, aid], p);
                await tx.unsafe(TPCB[1], [aid], p);
                await tx.unsafe(TPCB[2], [delta, tid], p);
                await tx.unsafe(TPCB[3], [delta], p);
                await tx.unsafe(TPCB[4], [tid, aid, delta], p);
              })),
        ),
      "node-postgres": () =>
        withNodePostgres(
          clients,
          (pool) =>
            callers(clients, TPCB_TRANSACTIONS / clients, async () => {
              const client = await pool.connect();
              try {
                const { aid, tid, delta } = tpcbValues();
                await client.query("BEGIN");
                await client.query(named(TPCB[0], [delta, aid]));
                await client.query(named(TPCB[1], [aid]));
                await client.query(named(TPCB[2], [delta, tid]));
                await client.query(named(TPCB[3], [delta]));
                await client.query(named(TPCB[4], [tid, aid, delta]));
                await client.query("COMMIT");
              } finally {
                client.release();
              }
            }),
        ),
      ...asyncpg(`tpcb${clients}`),
      ...(peers.pgbench === undefined ? {} : { pgbench: peers.pgbench(clients) }),
    },
  });
  const tenThousand = RECORDS.slice(0, 10_000);
  const columns = [0, 1, 2].map((c) => tenThousand.map((r) => r[c]));
  const fiveThousand = RECORDS.slice(0, 5_000);
  return [
    {
      name: "`executeMany` of 10,000 rows",
      warmup: true,
      pgdbm: intoEmptyRows(() => db.executeMany(INSERT, tenThousand)),
      peers: {
        "postgres.js": intoEmptyRows(() =>
          pgjs1.begin((tx) =>
            Promise.all(tenThousand.map((r) => tx.unsafe(INSERT, r, { prepare: true })))
          )
        ),
        "node-postgres (pipeline)": intoEmptyRows(async () => {
          await pgPipelined.query("BEGIN");
          await Promise.all(tenThousand.map((r) => pgPipelined.query(named(INSERT, r))));
          await pgPipelined.query("COMMIT");
        }),
        ...asyncpg("executemany"),
      },
    },
    {
      name: "the same through an `unnest` INSERT",
      warmup: true,
      pgdbm: intoEmptyRows(() => db.execute(UNNEST, columns)),
      peers: {
        "postgres.js": intoEmptyRows(() => pgjs10.unsafe(UNNEST, columns, { prepare: true })),
        "node-postgres": intoEmptyRows(() => pgPool.query(named(UNNEST, columns))),
        ...asyncpg("unnest"),
      },
    },
    tpcb(10),
    tpcb(32),
    {
      name: "point reads, 64 callers looping, pool max 10",
      warmup: true,
      pgdbm: () =>
        timed(() =>
          callers(64, 100, async (c, i) => {
            const key = (c * 100 + i) % 10_000 + 1;
            checkPoint(key, await db.fetchValue(POINT, [key]));
          })
        ),
      peers: {
        "postgres.js, 1 connection": () =>
          timed(() =>
            callers(64, 100, async (c, i) => {
              const key = (c * 100 + i) % 10_000 + 1;
              checkPoint(key, (await pgjs1.unsafe(POINT, [key], { prepare: true }))[0].v);
            })
          ),
        "postgres.js, 10 connections": () =>
          timed(() =>
            callers(64, 100, async (c, i) => {
              const key = (c * 100 + i) % 10_000 + 1;
              checkPoint(key, (await pgjs10.unsafe(POINT, [key], { prepare: true }))[0].v);
            })
          ),
        "node-postgres": () =>
          timed(() =>
            callers(64, 100, async (c, i) => {
              const key = (c * 100 + i) % 10_000 + 1;
              checkPoint(key, (await pgPool.query(named(POINT, [key]))).rows[0].v);
            })
          ),
        ...asyncpg("point_reads"),
      },
    },
    {
      name: "process start to first result",
      pgdbm: () => startProcess(["pgdbm", url]),
      peers: {
        "postgres.js": () => startProcess(["postgres.js", url]),
        "node-postgres": () => startProcess(["node-postgres", url]),
        ...(peers.asyncpgStart === undefined ? {} : { asyncpg: peers.asyncpgStart }),
      },
    },
    {
      name: "COPY of 5,000 rows, warm (10 in a row)",
      warmup: true,
      pgdbm: async () => {
        await truncate("bench_copy");
        return await timed(async () => {
          for (let i = 0; i < 10; i++) await db.copyRecordsToTable("bench_copy", fiveThousand);
        });
      },
      peers: {
        "postgres.js": async () => {
          await truncate("bench_copy");
          return await timed(async () => {
            for (let i = 0; i < 10; i++) {
              await writeAll(
                await pgjs1.unsafe("COPY bench_copy FROM STDIN").writable(),
                fiveThousand,
              );
            }
          });
        },
        "node-postgres + pg-copy-streams": async () => {
          await truncate("bench_copy");
          const client = await pgPool.connect();
          try {
            return await timed(async () => {
              for (let i = 0; i < 10; i++) {
                await writeAll(client.query(copyFrom("COPY bench_copy FROM STDIN")), fiveThousand);
              }
            });
          } finally {
            client.release();
          }
        },
        ...asyncpg("copy_small"),
      },
    },
    {
      name: "COPY of 500,000 rows",
      warmup: true,
      pgdbm: async () => {
        await truncate("bench_copy");
        return await timed(() => db.copyRecordsToTable("bench_copy", RECORDS));
      },
      peers: {
        "postgres.js": async () => {
          await truncate("bench_copy");
          return await timed(async () =>
            writeAll(await pgjs1.unsafe("COPY bench_copy FROM STDIN").writable(), RECORDS)
          );
        },
        "node-postgres + pg-copy-streams": async () => {
          await truncate("bench_copy");
          const client = await pgPool.connect();
          try {
            return await timed(() =>
              writeAll(client.query(copyFrom("COPY bench_copy FROM STDIN")), RECORDS)
            );
          } finally {
            client.release();
          }
        },
        ...asyncpg("copy_large"),
      },
    },
    {
      name: "`fetchAll` of 100,000 rows",
      warmup: true,
      pgdbm: () => timed(() => db.fetchAll(ALL)),
      peers: {
        "postgres.js": () => timed(() => pgjs10.unsafe(ALL, [], { prepare: true })),
        "node-postgres": () => timed(() => pgPool.query(named(ALL, []))),
        ...asyncpg("fetch_all"),
      },
    },
    {
      name: "1,000 queries of 100 rows, 10 callers",
      warmup: true,
      pgdbm: () =>
        timed(() =>
          callers(10, 100, async (c, i) => {
            const first = pageStart(c, i);
            checkPage(first, await db.fetchAll<{ id: number }>(PAGE, [first]));
          })
        ),
      peers: {
        "postgres.js": () =>
          timed(() =>
            callers(10, 100, async (c, i) => {
              const first = pageStart(c, i);
              checkPage(first, await pgjs10.unsafe(PAGE, [first], { prepare: true }));
            })
          ),
        "node-postgres": () =>
          timed(() =>
            callers(10, 100, async (c, i) => {
              const first = pageStart(c, i);
              checkPage(first, (await pgPool.query(named(PAGE, [first]))).rows);
            })
          ),
        ...asyncpg("hundred_rows"),
      },
    },
    {
      name: "5 migrations × 20 schemas",
      note: "psql writes no history, takes no lock and computes no checksum",
      pgdbm: pgdbmMigrate,
      peers: { "one psql session": psqlMigrate },
    },
    {
      name: "up-to-date check of 1,000 schemas",
      note: "psql only reads the history rows; pgdbm also plans each schema against the files",
      pgdbm: () =>
        timed(async () => {
          const result = await migrateSchemas(pgdbmPool, fleetSchemas, {
            migrationsPath: FLEET,
            moduleName: MODULE,
          });
          if (result.status !== "up_to_date") throw new Error(`check ended ${result.status}`);
        }),
      peers: { "one psql session": () => psql(checkFile) },
    },
  ];
}

/** The embedded engine's start: time to the first result and the process's memory. */
async function embeddedStart(): Promise<{ ms: number; rss: number }> {
  const result = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", FIRST_RESULT, "embedded"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!result.success) throw new Error(new TextDecoder().decode(result.stderr));
  return JSON.parse(new TextDecoder().decode(result.stdout));
}

try {
  await createTables();
  await pgPipelined.connect();
  const peers = await externalPeers(url, log);
  const chosen = workloads(peers).filter((w) =>
    ONLY.length === 0 || ONLY.some((text) => w.name.includes(text))
  );
  if (chosen.some((w) => w.name.includes("up-to-date"))) {
    log(`preparing ${CHECK_SCHEMAS} migrated schemas…`);
    await prepareCheck();
  }
  const results = await interleaved(chosen, ROUNDS, log, () => db.execute("CHECKPOINT"));
  const embedded = await embeddedStart();
  const empty = await startProcess(["empty"]);
  console.log(
    `\n${ROUNDS} rounds, medians; ${navigator.hardwareConcurrency} cores`,
  );
  console.log(formatResults(results));
  console.log(
    `embedded engine start (pglite:memory to first result): ${
      (embedded.ms / 1000).toFixed(1)
    } s, ` +
      `${(embedded.rss / 2 ** 20).toFixed(0)} MB resident; an empty Deno process: ${
        empty.toFixed(0)
      } ms`,
  );
  if (Deno.args.includes("--markdown")) console.log(`\n${markdownTable(results)}`);
} finally {
  await dropSchemas(fleetSchemas).catch(() => {});
  if (checkFile !== "") await Deno.remove(checkFile).catch(() => {});
  await pgjs1.end();
  await pgjs10.end();
  await pgPool.end();
  await pgPipelined.end();
  await pgdbmPool.close();
  await database.drop();
}
