/**
 * `pgdbm schema list|create|drop`.
 *
 * @module
 */

import type { CommandSpec, GroupSpec, ParsedCommand } from "../_args.ts";
import { UsageError } from "../_args.ts";
import {
  type CliContext,
  CommandFailure,
  confirm,
  CONNECTION_FLAGS,
  databaseUrl,
  hasFlag,
  JSON_FLAG,
  openPool,
  readConfig,
} from "../_context.ts";
import { checkName } from "./db.ts";
import { dump } from "./_pg_dump.ts";
import { table } from "../_output.ts";
import { QueryError } from "../../errors.ts";
import { DatabaseManager } from "../../manager.ts";
import { quoteIdentifier } from "../../template.ts";

const SYSTEM_SCHEMAS = new Set(["information_schema"]);

/** Runs `fn` with a manager over a pool to the configured database, then closes the pool. */
async function withDatabase<T>(
  context: CliContext,
  input: ParsedCommand,
  fn: (db: DatabaseManager) => Promise<T>,
): Promise<T> {
  const config = await readConfig(context, input);
  const target = databaseUrl(context, config, input);
  const pool = await openPool(context, target.url);
  try {
    return await fn(new DatabaseManager({ pool }));
  } finally {
    await pool.close();
  }
}

interface SchemaRow {
  name: string;
  owner: string;
  tables: number;
  sizeBytes: string;
  size: string;
}

async function list(context: CliContext, input: ParsedCommand): Promise<number> {
  const rows = await withDatabase(context, input, (db) =>
    db.fetchAll<SchemaRow>(
      `SELECT n.nspname AS name, pg_get_userbyid(n.nspowner) AS owner,
              count(c.oid) FILTER (WHERE c.relkind IN ('r', 'p'))::int AS tables,
              coalesce(sum(pg_total_relation_size(c.oid))
                FILTER (WHERE c.relkind IN ('r', 'm')), 0)::text AS "sizeBytes",
              pg_size_pretty(coalesce(sum(pg_total_relation_size(c.oid))
                FILTER (WHERE c.relkind IN ('r', 'm')), 0)) AS size
         FROM pg_namespace n
         LEFT JOIN pg_class c ON c.relnamespace = n.oid
        WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
        GROUP BY n.oid, n.nspname, n.nspowner
        ORDER BY n.nspname`,
    ));
  const schemas = rows.map((r) => ({ ...r, sizeBytes: Number(r.sizeBytes) }));
  context.out.document({ ok: true, command: "schema list", schemas });
  for (
    const line of table(
      ["SCHEMA", "OWNER", "TABLES", "SIZE"],
      schemas.map((s) => [s.name, s.owner, String(s.tables), s.size]),
    )
  ) context.out.print(line);
  return 0;
}

async function create(context: CliContext, input: ParsedCommand): Promise<number> {
  const name = checkName(input.args[0], "schema");
  const ifNotExists = hasFlag(input, "if-not-exists");
  const created = await withDatabase(context, input, async (db) => {
    const found = await db.fetchValue<boolean>(
      "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
      [name],
    );
    if (found === true) {
      if (ifNotExists) return false;
      throw new CommandFailure(
        new Error(
          `Cannot create schema '${name}': it already exists. Pass --if-not-exists to accept that`,
        ),
        { schema: name },
      );
    }
    await db.execute(`CREATE SCHEMA ${quoteIdentifier(name)}`, [], { signal: context.signal });
    return true;
  });
  context.out.print(created ? `Created schema '${name}'.` : `Schema '${name}' already exists.`);
  context.out.document({ ok: true, command: "schema create", schema: name, created });
  return 0;
}

async function drop(context: CliContext, input: ParsedCommand): Promise<number> {
  const name = checkName(input.args[0], "schema");
  if (SYSTEM_SCHEMAS.has(name)) {
    throw new UsageError(`Cannot drop schema '${name}': it belongs to PostgreSQL`);
  }
  const cascade = hasFlag(input, "cascade");
  const command = `pgdbm schema drop ${name}${cascade ? " --cascade" : ""}`;
  if (!await confirm(context, input, "schema", name, command)) return 1;
  const dropped = await withDatabase(context, input, async (db) => {
    const found = await db.fetchValue<boolean>(
      "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
      [name],
    );
    if (found !== true) {
      if (hasFlag(input, "if-exists")) return false;
      throw new CommandFailure(
        new Error(
          `Cannot drop schema '${name}': it does not exist. Pass --if-exists to accept that`,
        ),
        { schema: name },
      );
    }
    try {
      await db.withSchema(name).dropSchema({ cascade });
    } catch (error) {
      if (error instanceof QueryError && error.sqlstate === "2BP01") {
        throw new CommandFailure(
          new Error(
            `Cannot drop schema '${name}': it is not empty (${error.message}). Pass --cascade ` +
              `to drop everything in it too`,
          ),
          { schema: name },
        );
      }
      throw error;
    }
    return true;
  });
  context.out.print(dropped ? `Dropped schema '${name}'.` : `Schema '${name}' does not exist.`);
  context.out.document({ ok: true, command: "schema drop", schema: name, dropped, cascade });
  return 0;
}

const NAME_ARG = { name: "NAME", what: "the schema name", required: true };

/** The `schema` group. */
export const SCHEMA_GROUP: GroupSpec<CliContext> = {
  name: "schema",
  summary: "List, create, drop and dump schemas of the database",
  commands: [
    {
      name: "list",
      summary: "List the schemas that are not PostgreSQL's own, with tables and size",
      args: [],
      flags: [JSON_FLAG, ...CONNECTION_FLAGS],
      run: list,
    },
    {
      name: "create",
      summary: "Create a schema",
      args: [NAME_ARG],
      flags: [
        { name: "if-not-exists", description: "Succeed when it exists already" },
        JSON_FLAG,
        ...CONNECTION_FLAGS,
      ],
      run: create,
    },
    {
      name: "drop",
      summary: "Drop a schema, after you type its name (or --yes)",
      args: [NAME_ARG],
      flags: [
        { name: "cascade", description: "Also drop everything in it" },
        { name: "yes", short: "y", description: "Do not ask for confirmation" },
        { name: "if-exists", description: "Succeed when it does not exist" },
        JSON_FLAG,
        ...CONNECTION_FLAGS,
      ],
      details: "Asks you to type the schema's name. When stdin is not a terminal (scripts,\n" +
        "CI), --yes is required.",
      example: "pgdbm schema drop tenant_42 --cascade --yes",
      run: drop,
    },
    {
      name: "dump",
      summary: "Print the database's DDL (pg_dump --schema-only), or one schema's",
      args: [],
      flags: [
        { name: "schema", value: "NAME", description: "Only this schema (default: all of them)" },
        { name: "output", value: "FILE", description: "Write to FILE, not stdout" },
        {
          name: "pg-dump",
          value: "PATH",
          description: "The pg_dump program (default: pg_dump on the PATH)",
        },
        ...CONNECTION_FLAGS,
      ],
      details: "Runs PostgreSQL's pg_dump, which must be installed (of the server's major\n" +
        "version or newer); says what to install when it is not. The password reaches\n" +
        "pg_dump in PGPASSWORD, never on its command line.",
      example: "pgdbm schema dump --schema tenant_42 > tenant.sql",
      run: dump,
    },
  ] satisfies CommandSpec<CliContext>[],
};
