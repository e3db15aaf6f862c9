/**
 * One process of the start-up row of bench/run.ts: connects with the library named by the
 * first argument (`pgdbm`, `postgres.js`, `node-postgres`, `embedded`, or `empty` for no
 * library), runs one query, prints its result and exits. The parent times the whole process.
 * For `embedded` it prints the time to the first result and the process's resident memory.
 *
 *   deno run -A bench/_first_result.ts pgdbm postgres://…
 */

const [library, url] = Deno.args;
const started = performance.now();

switch (library) {
  case "empty":
    console.log(1);
    break;
  case "pgdbm": {
    const { createSharedPool, DatabaseManager } = await import("../mod.ts");
    const pool = await createSharedPool({ connectionString: url });
    console.log(await new DatabaseManager({ pool }).fetchValue("SELECT 1"));
    break;
  }
  case "embedded": {
    const { createSharedPool, DatabaseManager } = await import("../mod.ts");
    const pool = await createSharedPool({ connectionString: "pglite:memory" });
    await new DatabaseManager({ pool }).fetchValue("SELECT 1");
    const ms = performance.now() - started;
    console.log(JSON.stringify({ ms, rss: Deno.memoryUsage().rss }));
    break;
  }
  case "postgres.js": {
    const { default: postgres } = await import("postgres");
    const sql = postgres(url, { onnotice: () => {} });
    console.log((await sql`SELECT 1 AS v`)[0].v);
    break;
  }
  case "node-postgres": {
    const { default: pg } = await import("pg");
    const pool = new pg.Pool({ connectionString: url });
    console.log((await pool.query("SELECT 1 AS v")).rows[0].v);
    break;
  }
  default:
    throw new Error(`Unknown library '${library}': pgdbm, postgres.js, node-postgres or empty`);
}
Deno.exit(0);
