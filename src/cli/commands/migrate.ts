/**
 * `pgdbm migrate apply|status|create|rollback`.
 *
 * @module
 */

import { basename } from "node:path";
import type { CommandSpec, FlagSpec, GroupSpec, ParsedCommand } from "../_args.ts";
import { UsageError } from "../_args.ts";
import {
  adHocModule,
  type CliConfig,
  type CliModule,
  maskUrl,
  type ResolvedUrl,
  selectModules,
  unknownModule,
} from "../_config.ts";
import {
  type CliContext,
  CommandFailure,
  CommandInterrupted,
  CONNECTION_FLAGS,
  databaseUrl,
  flagValue,
  flagValues,
  hasFlag,
  JSON_FLAG,
  openPool,
  readConfig,
} from "../_context.ts";
import { duration, plural, table } from "../_output.ts";
import { applyFleet, FLEET_FLAGS, fleetSelection, statusFleet } from "./fleet.ts";
import { MigrationError } from "../../errors.ts";
import { DatabaseManager } from "../../manager.ts";
import {
  type MigrationEvent,
  type MigrationFailure,
  type MigrationResult,
  type MigrationStatus,
  Migrator,
} from "../../migrate/migrator.ts";
import { createMigrationFile, resolveMigrationSource } from "../../migrate/source.ts";
import type { Pool } from "../../pool/pool.ts";

const MODULE_FLAGS: FlagSpec[] = [
  {
    name: "module",
    value: "NAME",
    description: "A module of pgdbm.json (or the name of the --path module: 'default')",
  },
  {
    name: "path",
    value: "DIR",
    description: "Migrations folder or URL of one module (default ./migrations)",
  },
  {
    name: "schema",
    value: "NAME",
    description: "Its schema (default: the connection's default schema)",
  },
  {
    name: "migrations-table",
    value: "NAME",
    description: "Its history table (default schema_migrations)",
  },
];

/** `--module` (repeatable), `--path`, `--schema`, `--migrations-table`. */
export const MANY_MODULE_FLAGS: FlagSpec[] = [
  { ...MODULE_FLAGS[0], repeatable: true },
  ...MODULE_FLAGS.slice(1),
];

/** The configuration and the modules a command works on. */
export interface Selection {
  config: CliConfig;
  modules: CliModule[];
}

function isAdHoc(config: CliConfig, input: ParsedCommand): boolean {
  return config.modules.length === 0 || hasFlag(input, "path") || hasFlag(input, "schema") ||
    hasFlag(input, "migrations-table");
}

function adHoc(context: CliContext, config: CliConfig, input: ParsedCommand): CliModule {
  const names = flagValues(input, "module");
  if (names.length > 1) {
    throw new UsageError(
      `Cannot take several --module flags without modules in pgdbm.json: --path, --schema and ` +
        `--module describe one module. Declare the modules in pgdbm.json to run several`,
    );
  }
  return adHocModule(context.io.cwd, {
    module: names[0],
    path: flagValue(input, "path"),
    schema: flagValue(input, "schema"),
    table: flagValue(input, "migrations-table"),
    lock: config.lock,
  });
}

/** Every module the flags select (with their dependencies when `withDependencies`). */
export async function selectMany(
  context: CliContext,
  input: ParsedCommand,
  withDependencies: boolean,
): Promise<Selection> {
  const config = await readConfig(context, input);
  if (isAdHoc(config, input)) return { config, modules: [adHoc(context, config, input)] };
  const names = flagValues(input, "module");
  const all = ["all", "all-modules"].find((flag) => hasFlag(input, flag));
  if (names.length > 0 && all !== undefined) {
    throw new UsageError(
      `Cannot combine --${all} with --module: pass --${all} for every module, or --module ` +
        `NAME for some`,
    );
  }
  const selected = selectModules(config, names);
  const wanted = new Set(names);
  return {
    config,
    modules: withDependencies || names.length === 0
      ? selected
      : selected.filter((m) => wanted.has(m.name)),
  };
}

/** The one module a command works on. */
async function selectOne(
  context: CliContext,
  input: ParsedCommand,
  path: string,
): Promise<Selection> {
  const config = await readConfig(context, input);
  if (isAdHoc(config, input)) return { config, modules: [adHoc(context, config, input)] };
  const name = flagValue(input, "module");
  if (name === undefined) {
    if (config.modules.length === 1) return { config, modules: config.modules };
    throw new UsageError(
      `Say which module: '${path} --module NAME', with NAME one of ` +
        config.modules.map((m) => `'${m.name}'`).join(", "),
    );
  }
  const module = config.modules.find((m) => m.name === name);
  if (module === undefined) throw unknownModule(config, name);
  return { config, modules: [module] };
}

function migratorFor(
  module: CliModule,
  db: DatabaseManager,
  onEvent?: (event: MigrationEvent) => void,
): Migrator {
  return new Migrator(db, {
    migrationsPath: module.migrationsPath,
    moduleName: module.name,
    migrationsTable: module.migrationsTable,
    lock: module.lock,
    onEvent,
  });
}

function managerFor(pool: Pool, module: CliModule): DatabaseManager {
  return new DatabaseManager({ pool, schema: module.schema });
}

function where(module: { schema?: string | null }): string {
  return `schema ${module.schema ?? "public (default)"}`;
}

/** A module's result as JSON (times rounded to milliseconds). */
export function resultJson(result: MigrationResult): Record<string, unknown> {
  return {
    ...result,
    applied: result.applied.map((a) => ({ ...a, executionTimeMs: Math.round(a.executionTimeMs) })),
    totalTimeMs: Math.round(result.totalTimeMs),
  };
}

function printResult(context: CliContext, result: MigrationResult, dryRun: boolean): void {
  const head = `${result.module} (${where(result)})`;
  if (dryRun) {
    const pending = result.pending ?? [];
    context.out.print(
      pending.length === 0
        ? `${head}: up to date, nothing to apply`
        : `${head}: would apply ${plural(pending.length, "migration")}`,
    );
    for (const filename of pending) context.out.print(`  ${filename}`);
  } else if (result.applied.length === 0) {
    context.out.print(`${head}: up to date (${result.skipped.length} applied before)`);
  } else {
    context.out.print(
      `${head}: applied ${plural(result.applied.length, "migration")} in ` +
        duration(result.totalTimeMs),
    );
    const width = Math.max(...result.applied.map((a) => a.filename.length));
    for (const applied of result.applied) {
      context.out.print(
        `  ${applied.filename.padEnd(width)}  ${duration(applied.executionTimeMs)}`,
      );
    }
  }
  if (result.missing.length > 0) {
    context.out.error(
      `Warning: module '${result.module}' has applied migrations whose file is gone: ` +
        result.missing.join(", "),
    );
  }
}

/** The module and URL of a fleet run (`--schemas`, `--schema-pattern`, `--schemas-query`). */
async function fleetTarget(
  context: CliContext,
  input: ParsedCommand,
  path: string,
): Promise<{ target: ResolvedUrl; module: CliModule }> {
  const { config, modules } = await selectOne(context, input, `pgdbm ${path}`);
  return { target: databaseUrl(context, config, input), module: modules[0] };
}

async function apply(context: CliContext, input: ParsedCommand): Promise<number> {
  const fleet = fleetSelection(input, "migrate apply");
  if (fleet !== undefined) {
    const { target, module } = await fleetTarget(context, input, "migrate apply");
    return await applyFleet(context, input, target, module, fleet);
  }
  const dryRun = hasFlag(input, "dry-run");
  const { config, modules } = await selectMany(context, input, true);
  const target = databaseUrl(context, config, input);
  const results = await applyModules(context, target, modules, dryRun);
  const applied = results.reduce((sum, r) => sum + r.applied.length, 0);
  if (dryRun) context.out.print("Dry run: nothing was applied.");
  else {
    context.out.print(
      `Done: ${plural(applied, "migration")} applied in ${plural(results.length, "module")}.`,
    );
  }
  context.out.document({
    ok: true,
    command: "migrate apply",
    dryRun,
    database: maskUrl(target.url),
    modules: results.map(resultJson),
  });
  return 0;
}

/**
 * Applies the pending migrations of `modules` (in that order) to the database of
 * `target`, printing each module's result and the progress line.
 *
 * @throws {CommandFailure} When a migration fails (what was applied before is in it).
 * @throws {CommandInterrupted} When the CLI is interrupted.
 */
export async function applyModules(
  context: CliContext,
  target: ResolvedUrl,
  modules: CliModule[],
  dryRun: boolean,
): Promise<MigrationResult[]> {
  const pool = await openPool(context, target.url, { prepare: !behindPooler(modules) });
  const results: MigrationResult[] = [];
  try {
    let total = 0;
    if (context.out.showsProgress && !dryRun) {
      for (const module of modules) {
        total += (await migratorFor(module, managerFor(pool, module)).getStatus()).pending.length;
      }
    }
    context.out.print(`Database: ${maskUrl(target.url)} (${target.source})`);
    let started = 0;
    for (const module of modules) {
      if (context.signal.aborted) throw stoppedBefore(module, modules, results);
      const onEvent = (event: MigrationEvent): void => {
        if (event.type === "apply_start") {
          if (event.attempt === 1) started++;
          const retry = event.attempt > 1 ? ` (attempt ${event.attempt})` : "";
          context.out.progress(
            `[${started}/${Math.max(total, started)}] ${module.name}: ${event.filename}${retry}`,
          );
        } else if (event.type === "lock_wait") {
          // Always said (not only as progress): a wait must never look like a hang.
          const holder = event.holderPid === undefined
            ? ""
            : ` (server process ${event.holderPid}; see pg_stat_activity)`;
          context.out.error(
            `Waiting for the migration lock of module '${module.name}' (${where(module)}): ` +
              `another run holds it${holder}; this run goes on when that one ends`,
          );
        } else if (event.type === "retry") {
          context.out.progress(
            `${module.name}: ${event.filename} waited too long for a lock; retrying in ` +
              duration(event.delayMs),
          );
        }
      };
      try {
        const result = await migratorFor(module, managerFor(pool, module), onEvent)
          .applyPending({ dryRun, signal: context.signal });
        results.push(result);
        context.out.endProgress();
        printResult(context, result, dryRun);
      } catch (error) {
        if (context.signal.aborted) throw interrupted(error, module, modules, results);
        throw applyFailure(error, module, modules, results);
      }
    }
    return results;
  } finally {
    context.out.endProgress();
    await pool.close();
  }
}

function applyFailure(
  error: unknown,
  module: CliModule,
  modules: CliModule[],
  results: MigrationResult[],
): CommandFailure {
  const partial = error instanceof MigrationError
    ? error.partialResult as MigrationResult | undefined
    : undefined;
  const notes: string[] = [];
  const before = [
    ...results.flatMap((r) => r.applied.map((a) => `${a.filename} (${r.module})`)),
    ...(partial?.applied ?? []).map((a) => `${a.filename} (${module.name})`),
  ];
  if (before.length > 0) notes.push(`Applied by this run before the failure: ${before.join(", ")}`);
  const notRun = modules.slice(modules.indexOf(module) + 1).map((m) => m.name);
  if (notRun.length > 0) notes.push(`Modules not run: ${notRun.join(", ")}`);
  return new CommandFailure(error, {
    modules: [...results, ...(partial === undefined ? [] : [partial])].map(resultJson),
    notRun,
  }, notes);
}

/** `migrate apply` was interrupted while `module` ran: what the migrator did about it. */
function interrupted(
  error: unknown,
  module: CliModule,
  modules: CliModule[],
  results: MigrationResult[],
): CommandInterrupted {
  const partial = error instanceof MigrationError
    ? error.partialResult as MigrationResult | undefined
    : undefined;
  const failure: MigrationFailure | undefined = partial?.failure;
  const done = failure?.aborted === true
    ? `in module '${module.name}' (${where(module)}): ${failure.message}`
    : `in module '${module.name}' (${where(module)}): the run stopped before it finished`;
  const base = applyFailure(error, module, modules, results);
  return new CommandInterrupted(
    error,
    done,
    base.details,
    base.notes.map((note) => note.replace("before the failure", "before the interruption")),
  );
}

/** Interrupted between modules: `module` and those after it were not started. */
function stoppedBefore(
  module: CliModule,
  modules: CliModule[],
  results: MigrationResult[],
): CommandInterrupted {
  const notRun = modules.slice(modules.indexOf(module)).map((m) => m.name);
  const applied = results.flatMap((r) => r.applied.map((a) => `${a.filename} (${r.module})`));
  return new CommandInterrupted(
    new MigrationError(
      `Cannot finish 'migrate apply': it was interrupted before module '${module.name}'`,
      { reason: "aborted", module: module.name, schema: module.schema },
    ),
    `stopped before module '${module.name}'; nothing was running, and no migration lock ` +
      "is held",
    { modules: results.map(resultJson), notRun },
    [
      ...(applied.length > 0
        ? [`Applied by this run before the interruption: ${applied.join(", ")}`]
        : []),
      `Modules not run: ${notRun.join(", ")}`,
    ],
  );
}

function statusJson(status: MigrationStatus): Record<string, unknown> {
  return {
    module: status.module,
    schema: status.schema,
    initialized: status.initialized,
    upToDate: status.upToDate,
    applied: status.applied,
    pending: status.pending.map((m) => ({
      filename: m.filename,
      version: m.version,
      checksum: m.checksum,
      noTransaction: m.noTransaction,
    })),
    drifted: status.drifted,
    missing: status.missing.map((m) => m.filename),
    ...(status.pgdbmOrder === undefined ? {} : { pgdbmOrder: status.pgdbmOrder }),
  };
}

function state(status: MigrationStatus): string {
  if (status.drifted.length > 0) return "DRIFTED";
  if (status.pending.length > 0) return "pending";
  if (status.missing.length > 0) return "files missing";
  return "up to date";
}

async function status(context: CliContext, input: ParsedCommand): Promise<number> {
  const fleet = fleetSelection(input, "migrate status");
  if (fleet !== undefined) {
    const { target, module } = await fleetTarget(context, input, "migrate status");
    return await statusFleet(context, input, target, module, fleet);
  }
  const { config, modules } = await selectMany(context, input, false);
  const target = databaseUrl(context, config, input);
  const pool = await openPool(context, target.url, { prepare: !behindPooler(modules) });
  const statuses: MigrationStatus[] = [];
  try {
    for (const module of modules) {
      statuses.push(await migratorFor(module, managerFor(pool, module)).getStatus());
    }
  } finally {
    await pool.close();
  }
  const check = hasFlag(input, "check");
  const clean = statuses.every((s) => s.upToDate);
  context.out.document({
    ok: !check || clean,
    command: "migrate status",
    database: maskUrl(target.url),
    upToDate: clean,
    modules: statuses.map(statusJson),
  });
  context.out.print(`Database: ${maskUrl(target.url)} (${target.source})`);
  context.out.print();
  for (
    const line of table(
      ["MODULE", "SCHEMA", "APPLIED", "PENDING", "DRIFTED", "MISSING", "STATE"],
      statuses.map((s) => [
        s.module,
        s.schema ?? "-",
        String(s.applied.length),
        String(s.pending.length),
        String(s.drifted.length),
        String(s.missing.length),
        state(s),
      ]),
    )
  ) context.out.print(line);
  for (const s of statuses) {
    if (s.pending.length > 0) {
      context.out.print();
      context.out.print(`Pending in ${s.module}:`);
      for (const m of s.pending) context.out.print(`  ${m.filename}`);
    }
    if (s.drifted.length > 0) {
      context.out.print();
      context.out.print(`Changed after they were applied, in ${s.module}:`);
      for (const d of s.drifted) {
        context.out.print(
          `  ${d.filename}  applied ${d.appliedChecksum.slice(0, 12)}…, file now ` +
            `${d.currentChecksum.slice(0, 12)}…`,
        );
      }
      context.out.print(
        "  Restore these files as they were and put the changes in new migrations.",
      );
    }
    if (s.missing.length > 0) {
      context.out.print();
      context.out.print(`Applied but their file is gone, in ${s.module}:`);
      for (const m of s.missing) context.out.print(`  ${m.filename}`);
    }
    if (s.pgdbmOrder !== undefined) {
      context.out.print();
      context.out.print(
        `Python pgdbm would apply ${s.module}'s files in another order (it sorts by plain ` +
          "name; pgdbm for Deno by version number). Rename them with equal-width numbers if " +
          "both libraries migrate this folder:",
      );
      for (const name of s.pgdbmOrder) context.out.print(`  ${name}`);
    }
  }
  if (check && !clean) {
    context.out.error(
      "Not up to date: migrations are pending or changed after they were applied (--check).",
    );
    return 1;
  }
  return 0;
}

async function create(context: CliContext, input: ParsedCommand): Promise<number> {
  const [name] = input.args;
  const { modules } = await selectOne(context, input, `pgdbm migrate create ${name}`);
  const module = modules[0];
  const content = flagValue(input, "sql") ??
    `-- ${name}\n` +
      `-- Write the SQL below. It runs in one transaction; {{tables.name}} is a table of the\n` +
      `-- module's schema. A '-- pgdbm:no-transaction' line runs it statement by statement.\n`;
  let path: string;
  try {
    path = await createMigrationFile(
      resolveMigrationSource({ migrationsPath: module.migrationsPath }),
      name,
      content,
      { module: module.name },
    );
  } catch (error) {
    // A name that cannot be a file name is bad usage (exit 2), like a missing one.
    if (error instanceof MigrationError && error.reason === "invalid_filename") {
      throw new UsageError(error.message);
    }
    throw error;
  }
  context.out.print(`Created ${path}`);
  context.out.document({
    ok: true,
    command: "migrate create",
    module: module.name,
    path,
    filename: basename(path),
  });
  return 0;
}

async function rollback(context: CliContext, input: ParsedCommand): Promise<number> {
  const filename = basename(input.args[0]);
  const { config, modules } = await selectOne(
    context,
    input,
    `pgdbm migrate rollback ${filename}`,
  );
  const module = modules[0];
  const target = databaseUrl(context, config, input);
  const pool = await openPool(context, target.url, { prepare: !behindPooler(modules) });
  let removed: boolean;
  try {
    removed = await migratorFor(module, managerFor(pool, module)).rollbackMigration(filename);
  } finally {
    await pool.close();
  }
  if (!removed) {
    throw new CommandFailure(
      new MigrationError(
        `Cannot roll back '${filename}' of module '${module.name}' (${where(module)}): it is ` +
          `not applied. Run 'pgdbm migrate status' to see what is`,
        { reason: "not_applied", filename, module: module.name, schema: module.schema },
      ),
      { module: module.name, filename },
    );
  }
  context.out.print(
    `Removed '${filename}' from the history of module '${module.name}' (${where(module)}). ` +
      `Its changes to the database were not undone; 'pgdbm migrate apply' runs it again.`,
  );
  context.out.document({
    ok: true,
    command: "migrate rollback",
    module: module.name,
    schema: module.schema ?? null,
    filename,
  });
  return 0;
}

const APPLY: CommandSpec<CliContext> = {
  name: "apply",
  summary: "Apply pending migrations, dependencies first",
  args: [],
  flags: [
    ...MANY_MODULE_FLAGS,
    { name: "all", description: "Every module of pgdbm.json (the default)" },
    { name: "dry-run", description: "Show what would be applied; change nothing" },
    {
      name: "progress",
      description: "Show a progress line on stderr even when it is not a terminal",
    },
    ...FLEET_FLAGS,
    JSON_FLAG,
    ...CONNECTION_FLAGS,
  ],
  details: "Each migration runs in its own transaction with its history row. With pgdbm.json,\n" +
    "modules run in 'dependsOn' order, and --module NAME also applies the modules NAME\n" +
    "depends on. The run stops at the first failing migration (exit code 1).\n\n" +
    "Tenant fleets: --schemas, --schema-pattern or --schemas-query run one module in\n" +
    "many schemas, --concurrency at a time (its dependencies are not applied). A schema's\n" +
    "failure does not stop the others; the exit code is 1 if any failed. Ctrl-C stops\n" +
    "starting schemas and rolls back the migrations running (exit code 130). Run the same\n" +
    "command again to resume: schemas already up to date are skipped.",
  example: "pgdbm migrate apply --module tenant --schema-pattern 'tenant_*' --concurrency 8",
  run: apply,
};

const STATUS: CommandSpec<CliContext> = {
  name: "status",
  summary: "Show applied, pending, changed and missing migrations per module",
  args: [],
  flags: [
    ...MANY_MODULE_FLAGS,
    {
      name: "all-modules",
      description: "Every module of pgdbm.json (the default; as Python pgdbm spells it)",
    },
    { name: "check", description: "Exit with code 1 when anything is pending or changed" },
    ...FLEET_FLAGS,
    JSON_FLAG,
    ...CONNECTION_FLAGS,
  ],
  details: "With --schemas, --schema-pattern or --schemas-query: one module in many schemas,\n" +
    "listing those behind (pending migrations), drifted (an applied file changed) and\n" +
    "those that could not be checked (exit code 1).",
  example: "pgdbm migrate status --json",
  run: status,
};

const CREATE: CommandSpec<CliContext> = {
  name: "create",
  summary: "Create a new migration file named YYYYMMDDHHMMSS_NAME.sql",
  args: [{ name: "NAME", what: "the migration name", required: true }],
  flags: [
    ...MODULE_FLAGS,
    { name: "sql", value: "TEXT", description: "The file's SQL (default: a commented stub)" },
    JSON_FLAG,
    { ...CONNECTION_FLAGS[0] },
  ],
  details: "NAME says what the migration does: letters, digits, '_' and '-'.\n" +
    "Needs no database.",
  example: "pgdbm migrate create add_user_email --module users",
  run: create,
};

const ROLLBACK: CommandSpec<CliContext> = {
  name: "rollback",
  summary: "Remove a migration from the history so that it runs again",
  args: [{ name: "FILE", what: "the migration file name", required: true }],
  flags: [...MODULE_FLAGS, JSON_FLAG, ...CONNECTION_FLAGS],
  details: "Only the history row is removed: undo the migration's changes yourself\n" +
    "(or write a new migration that does).",
  example: "pgdbm migrate rollback 20251025120000_add_user_email.sql --module users",
  run: rollback,
};

/** The `migrate` group. */
export const MIGRATE_GROUP: GroupSpec<CliContext> = {
  name: "migrate",
  summary: "Apply and inspect SQL migrations",
  commands: [APPLY, STATUS, CREATE, ROLLBACK],
};

/**
 * Modules migrated with `lock: "transaction"` are reached through PgBouncer in transaction
 * mode, where named prepared statements do not survive from one transaction to the next.
 */
function behindPooler(modules: readonly { lock?: string }[]): boolean {
  return modules.some((module) => module.lock === "transaction");
}
