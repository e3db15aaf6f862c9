/**
 * The embedded PostgreSQL of the test helpers: one in-memory PGlite engine per process,
 * shared by every test of that process, each test isolated in a schema of its own.
 *
 * Starting PGlite costs seconds and hundreds of MB, and it has one database that only the
 * engine that made it can reach, so the helpers start it once (on the first test that needs
 * it) and keep it until the process exits: it holds no timer or handle that keeps the
 * process alive or trips Deno's test sanitizers. Files run by `deno test --parallel` are
 * separate processes, each with its engine.
 *
 * @module
 */

import { createSharedPool, type Pool } from "../pool/pool.ts";
import { DatabaseManager } from "../manager.ts";

let engine: Promise<Pool> | undefined;
let started: Pool | undefined;

/**
 * The process's shared embedded engine, started on the first call (concurrent first calls
 * share one start). A failed start is not kept (the next call tries again), nor a pool
 * someone closed.
 *
 * @returns The pool over the engine (one connection: the pool is a queue).
 * @throws {QueryError} When PGlite cannot start.
 */
export function sharedEngine(): Promise<Pool> {
  if (engine === undefined || started?.closed === true) {
    started = undefined;
    const starting = createSharedPool({ connectionString: "pglite:memory", minConnections: 1 })
      .then((pool) => started = pool);
    starting.catch(() => {
      if (engine === starting) engine = undefined;
    });
    engine = starting;
  }
  return engine;
}

/**
 * True when the pool runs on PGlite: asks the engine itself (`version()` names PGlite), so
 * it holds for any pool, whoever opened it.
 */
export async function runsOnPglite(pool: Pool): Promise<boolean> {
  const version = await new DatabaseManager({ pool }).fetchValue<string>("SELECT version()");
  return /\(PGlite [^)]*\)/.test(version ?? "");
}
