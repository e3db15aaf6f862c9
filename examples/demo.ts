/**
 * The demo application: one shared pool, two services (`users`, `orders`) each in its own
 * schema, their tables created by migrations (`migrations/users`, `migrations/orders`) at
 * start, the same `{{tables.name}}` SQL serving both.
 *
 *   deno task demo                      # embedded PostgreSQL (PGlite), no server needed
 *   DATABASE_URL=postgres://… deno task demo
 */
import { createSharedPool, DatabaseManager, Migrator, type Pool } from "../mod.ts";

const url = Deno.env.get("DATABASE_URL") ?? "pglite:memory";
const where = url.startsWith("pglite:") ? "embedded PostgreSQL (PGlite)" : "DATABASE_URL";
console.log(`pgdbm demo on ${where}`);

const pool: Pool = await createSharedPool({ connectionString: url, maxConnections: 5 });
try {
  const users = new DatabaseManager({ pool, schema: "demo_users" });
  const orders = new DatabaseManager({ pool, schema: "demo_orders" });

  for (const [service, name] of [[users, "users"], [orders, "orders"]] as const) {
    await service.ensureSchema();
    const migrator = new Migrator(service, {
      migrationsPath: new URL(`../migrations/${name}/`, import.meta.url).pathname,
      moduleName: name,
    });
    const result = await migrator.applyPending();
    const applied = result.applied.map((m) => m.filename).join(", ") || "none";
    console.log(`${name}: migrations ${result.status} (applied: ${applied})`);
  }
  console.log("users SQL:  ", users.prepareQuery("SELECT * FROM {{tables.accounts}}"));
  console.log("orders SQL: ", orders.prepareQuery("SELECT * FROM {{tables.orders}}"));

  await users.execute("TRUNCATE {{tables.accounts}} RESTART IDENTITY");
  await orders.execute("TRUNCATE {{tables.orders}} RESTART IDENTITY");
  const ada = await users.executeAndReturnId<number>(
    "INSERT INTO {{tables.accounts}} (email, name) VALUES ($1, $2)",
    ["ada@example.com", "Ada"],
  );
  const alan = await users.executeAndReturnId<number>(
    "INSERT INTO {{tables.accounts}} (email, name) VALUES ($1, $2)",
    ["alan@example.com", "Alan"],
  );
  await orders.executeMany("INSERT INTO {{tables.orders}} (account_id, total) VALUES ($1, $2)", [
    [ada, "19.99"],
    [ada, "5.00"],
    [alan, "42.00"],
  ]);

  const accounts = await users.fetchAll<{ id: number; name: string }>(
    "SELECT id, name FROM {{tables.accounts}} ORDER BY id",
  );
  for (const account of accounts) {
    const total = await orders.fetchValue<string>(
      "SELECT coalesce(sum(total), 0)::text FROM {{tables.orders}} WHERE account_id = $1",
      [account.id],
    );
    console.log(`  ${account.name}: orders total ${total}`);
  }

  try {
    await orders.transaction(async (tx) => {
      await tx.execute("INSERT INTO {{tables.orders}} (account_id, total) VALUES ($1, $2)", [
        alan,
        "1000.00",
      ]);
      throw new Error("payment declined");
    });
  } catch (error) {
    const count = await orders.fetchValue<string>("SELECT count(*) FROM {{tables.orders}}");
    console.log(`transaction rolled back (${(error as Error).message}); orders still ${count}`);
  }

  const { size, idle, used, waiting, minSize, maxSize } = pool.getStats();
  console.log("pool:", { size, idle, used, waiting, minSize, maxSize });
} finally {
  await pool.close();
}
