/**
 * `pgdbm db create|drop|info|test-connection`.
 *
 * @module
 */

import type { CommandSpec, GroupSpec, ParsedCommand } from "../_args.ts";
import { UsageError } from "../_args.ts";
import { databaseOfUrl, maskUrl, withDatabase } from "../_config.ts";
import {
  type CliContext,
  CommandFailure,
  confirm,
  CONNECTION_FLAGS,
  databaseUrl,
  flagValue,
  hasFlag,
  JSON_FLAG,
  openPool,
  readConfig,
} from "../_context.ts";
import { duration, plural } from "../_output.ts";
import { applyModules, MANY_MODULE_FLAGS, resultJson, selectMany } from "./migrate.ts";
import { QueryError } from "../../errors.ts";
import { DatabaseManager } from "../../manager.ts";
import { assertIdentifier, quoteIdentifier } from "../../template.ts";

/** Checks a name given on the command line as an identifier. */
export function checkName(name: string, what: string): string {
  try {
    assertIdentifier(name, what);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  return name;
}

/** The target database and the URL of the maintenance database on the same server. */
async function maintenanceTarget(
  context: CliContext,
  input: ParsedCommand,
  verb: string,
): Promise<{ name: string; url: string; maintenance: string }> {
  const config = await readConfig(context, input);
  const target = databaseUrl(context, config, input);
  const name = input.args[0] ?? databaseOfUrl(target.url);
  if (name === undefined) {
    throw new UsageError(
      `Missing the database name: type 'pgdbm db ${verb} NAME' (the database URL names none)`,
    );
  }
  checkName(name, "database");
  const maintenanceDb = checkName(flagValue(input, "maintenance-db") ?? "postgres", "database");
  if (maintenanceDb === name) {
    throw new UsageError(
      `Cannot ${verb} database '${name}' from itself: pass --maintenance-db NAME with another ` +
        `database of the server (such as template1)`,
    );
  }
  return { name, url: target.url, maintenance: withDatabase(target.url, maintenanceDb) };
}

async function exists(db: DatabaseManager, name: string): Promise<boolean> {
  return await db.fetchValue<boolean>(
    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
    [name],
  ) === true;
}

async function create(context: CliContext, input: ParsedCommand): Promise<number> {
  const { name, maintenance } = await maintenanceTarget(context, input, "create");
  const pool = await openPool(context, maintenance);
  let created = false;
  try {
    const db = new DatabaseManager({ pool });
    if (await exists(db, name)) {
      if (!hasFlag(input, "if-not-exists")) {
        throw new CommandFailure(
          new Error(
            `Cannot create database '${name}': it already exists. Pass --if-not-exists to ` +
              `accept that, or drop it first with 'pgdbm db drop ${name}'`,
          ),
          { database: name },
        );
      }
    } else {
      await db.execute(`CREATE DATABASE ${quoteIdentifier(name)}`, [], { signal: context.signal });
      created = true;
    }
  } finally {
    await pool.close();
  }
  context.out.print(created ? `Created database '${name}'.` : `Database '${name}' already exists.`);
  context.out.document({ ok: true, command: "db create", database: name, created });
  return 0;
}

/** `DROP DATABASE name [WITH (FORCE)]`, explaining the failure when sessions are connected. */
async function dropDatabase(
  context: CliContext,
  db: DatabaseManager,
  name: string,
  force: boolean,
): Promise<void> {
  try {
    await db.execute(
      `DROP DATABASE ${quoteIdentifier(name)}${force ? " WITH (FORCE)" : ""}`,
      [],
      { signal: context.signal },
    );
  } catch (error) {
    if (error instanceof QueryError && error.sqlstate === "55006") {
      throw new CommandFailure(
        new Error(
          `Cannot drop database '${name}': other sessions are connected to it ` +
            `(${error.message}). Close them, or pass --force to end them`,
        ),
        { database: name },
      );
    }
    throw error;
  }
}

async function drop(context: CliContext, input: ParsedCommand): Promise<number> {
  const { name, maintenance } = await maintenanceTarget(context, input, "drop");
  const command = `pgdbm db drop ${name}`;
  if (!await confirm(context, input, "database", name, command)) return 1;
  const pool = await openPool(context, maintenance);
  let dropped = false;
  try {
    const db = new DatabaseManager({ pool });
    if (!await exists(db, name)) {
      if (!hasFlag(input, "if-exists")) {
        throw new CommandFailure(
          new Error(
            `Cannot drop database '${name}': it does not exist. Pass --if-exists to accept that`,
          ),
          { database: name },
        );
      }
    } else {
      await dropDatabase(context, db, name, hasFlag(input, "force"));
      dropped = true;
    }
  } finally {
    await pool.close();
  }
  context.out.print(dropped ? `Dropped database '${name}'.` : `Database '${name}' does not exist.`);
  context.out.document({ ok: true, command: "db drop", database: name, dropped });
  return 0;
}

async function reset(context: CliContext, input: ParsedCommand): Promise<number> {
  const { name, url, maintenance } = await maintenanceTarget(context, input, "reset");
  const { modules } = await selectMany(context, input, true);
  const command = `pgdbm db reset ${name}`;
  if (!await confirm(context, input, "database", name, command)) return 1;
  const pool = await openPool(context, maintenance);
  let dropped = false;
  try {
    const db = new DatabaseManager({ pool });
    if (await exists(db, name)) {
      await dropDatabase(context, db, name, hasFlag(input, "force"));
      dropped = true;
    }
    await db.execute(`CREATE DATABASE ${quoteIdentifier(name)}`, [], { signal: context.signal });
  } finally {
    await pool.close();
  }
  context.out.print(
    dropped ? `Dropped and created database '${name}'.` : `Created database '${name}'.`,
  );
  const target = { url: withDatabase(url, name), source: `database '${name}'` };
  const results = await applyModules(context, target, modules, false);
  const applied = results.reduce((sum, r) => sum + r.applied.length, 0);
  context.out.print(
    `Reset database '${name}': ${plural(applied, "migration")} applied in ` +
      `${plural(results.length, "module")}.`,
  );
  context.out.document({
    ok: true,
    command: "db reset",
    database: name,
    dropped,
    created: true,
    modules: results.map(resultJson),
  });
  return 0;
}

interface InfoRow {
  database: string;
  user: string;
  version: string;
  versionText: string;
  sizeBytes: string;
  size: string;
  connections: number;
  serverConnections: number;
  maxConnections: number;
}

async function info(context: CliContext, input: ParsedCommand): Promise<number> {
  const config = await readConfig(context, input);
  const target = databaseUrl(context, config, input);
  const pool = await openPool(context, target.url);
  let row: InfoRow | null;
  try {
    row = await new DatabaseManager({ pool }).fetchOne<InfoRow>(
      `SELECT current_database() AS database, current_user AS "user",
              current_setting('server_version') AS version, version() AS "versionText",
              pg_database_size(current_database())::text AS "sizeBytes",
              pg_size_pretty(pg_database_size(current_database())) AS size,
              (SELECT count(*)::int FROM pg_stat_activity
                WHERE datname = current_database()) AS connections,
              (SELECT count(*)::int FROM pg_stat_activity
                WHERE backend_type = 'client backend') AS "serverConnections",
              current_setting('max_connections')::int AS "maxConnections"`,
    );
  } finally {
    await pool.close();
  }
  const data = { ...row!, sizeBytes: Number(row!.sizeBytes) };
  context.out.document({ ok: true, command: "db info", url: maskUrl(target.url), ...data });
  const fields: [string, string][] = [
    ["URL", maskUrl(target.url)],
    ["Server", `PostgreSQL ${data.version}`],
    ["Database", data.database],
    ["User", data.user],
    ["Size", data.size],
    [
      "Connections",
      `${data.connections} to this database; ${data.serverConnections} of ` +
      `${data.maxConnections} on the server`,
    ],
  ];
  for (const [label, value] of fields) context.out.print(`${`${label}:`.padEnd(13)}${value}`);
  return 0;
}

async function testConnection(context: CliContext, input: ParsedCommand): Promise<number> {
  const config = await readConfig(context, input);
  const target = databaseUrl(context, config, input);
  const url = maskUrl(target.url);
  const started = performance.now();
  let connectMs: number;
  let roundTripMs = Infinity;
  let version: string | null;
  try {
    const pool = await openPool(context, target.url, { attempts: 1 });
    connectMs = performance.now() - started;
    try {
      const db = new DatabaseManager({ pool });
      version = await db.fetchValue<string>("SELECT current_setting('server_version')");
      for (let i = 0; i < 3; i++) {
        const start = performance.now();
        await db.fetchValue("SELECT 1");
        roundTripMs = Math.min(roundTripMs, performance.now() - start);
      }
    } finally {
      await pool.close();
    }
  } catch (error) {
    throw new CommandFailure(error, { url });
  }
  context.out.print(
    `ok  ${url}  PostgreSQL ${version}, connected in ${duration(connectMs)}, ` +
      `round trip ${roundTripMs.toFixed(1)} ms`,
  );
  context.out.document({
    ok: true,
    command: "db test-connection",
    url,
    serverVersion: version,
    connectMs: Math.round(connectMs),
    roundTripMs: Number(roundTripMs.toFixed(2)),
  });
  return 0;
}

const MAINTENANCE_FLAG = {
  name: "maintenance-db",
  value: "NAME",
  description: "The database to connect to for CREATE/DROP DATABASE (default postgres)",
};

const NAME_ARG = {
  name: "NAME",
  what: "the database name",
  required: false,
};

/** The `db` group. */
export const DB_GROUP: GroupSpec<CliContext> = {
  name: "db",
  summary: "Create, drop, reset and inspect databases",
  commands: [
    {
      name: "create",
      summary: "Create a database (default: the one the URL names)",
      args: [NAME_ARG],
      flags: [
        { name: "if-not-exists", description: "Succeed when it exists already" },
        MAINTENANCE_FLAG,
        JSON_FLAG,
        ...CONNECTION_FLAGS,
      ],
      details: "Connects to the maintenance database of the same server (the URL with its\n" +
        "database replaced) and runs CREATE DATABASE.",
      example: "DATABASE_URL=postgres://postgres@localhost/app pgdbm db create",
      run: create,
    },
    {
      name: "drop",
      summary: "Drop a database, after you type its name (or --yes)",
      args: [NAME_ARG],
      flags: [
        { name: "yes", short: "y", description: "Do not ask for confirmation" },
        { name: "if-exists", description: "Succeed when it does not exist" },
        { name: "force", description: "End the other sessions connected to it (WITH (FORCE))" },
        MAINTENANCE_FLAG,
        JSON_FLAG,
        ...CONNECTION_FLAGS,
      ],
      details: "Asks you to type the database's name. When stdin is not a terminal (scripts,\n" +
        "CI), --yes is required.",
      example: "pgdbm db drop app_test --yes",
      run: drop,
    },
    {
      name: "reset",
      summary: "Drop a database (after you type its name, or --yes), create it, migrate it",
      args: [NAME_ARG],
      flags: [
        { name: "yes", short: "y", description: "Do not ask for confirmation" },
        { name: "force", description: "End the other sessions connected to it (WITH (FORCE))" },
        ...MANY_MODULE_FLAGS,
        MAINTENANCE_FLAG,
        JSON_FLAG,
        ...CONNECTION_FLAGS,
      ],
      details: "Drops the database if it exists, creates it, and applies the migrations of\n" +
        "every module of pgdbm.json (or of --module, --path, as 'migrate apply' does).\n" +
        "Asks you to type the database's name, as 'db drop' does; when stdin is not a\n" +
        "terminal (scripts, CI), --yes is required.",
      example: "pgdbm db reset app_dev --yes",
      run: reset,
    },
    {
      name: "info",
      summary: "Show the server version, database, size and connections",
      args: [],
      flags: [JSON_FLAG, ...CONNECTION_FLAGS],
      run: info,
    },
    {
      name: "test-connection",
      summary: "Connect once and report ok and the latency, or the error",
      args: [],
      flags: [JSON_FLAG, ...CONNECTION_FLAGS],
      details: "Makes a single attempt (no retries). The password is never printed.",
      run: testConnection,
    },
  ] satisfies CommandSpec<CliContext>[],
};
