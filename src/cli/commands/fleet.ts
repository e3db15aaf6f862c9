/**
 * Tenant fleets on the command line: `migrate apply` and `migrate status` with
 * `--schemas`, `--schema-pattern` or `--schemas-query` run one module in many schemas
 * through {@link migrateSchemas} and {@link checkSchemas}.
 *
 * @module
 */

import type { FlagSpec, ParsedCommand } from "../_args.ts";
import { UsageError } from "../_args.ts";
import { type CliModule, maskUrl, type ResolvedUrl } from "../_config.ts";
import {
  type CliContext,
  CommandFailure,
  CommandInterrupted,
  flagValue,
  flagValues,
  hasFlag,
  openPool,
} from "../_context.ts";
import { duration, plural, table } from "../_output.ts";
import { MigrationError } from "../../errors.ts";
import { DatabaseManager } from "../../manager.ts";
import {
  checkSchemas,
  type FleetResult,
  type FleetStatusReport,
  migrateSchemas,
  type SchemaMigrationResult,
  type SchemaStatus,
} from "../../migrate/fleet.ts";
import { assertIdentifier } from "../../template.ts";

const DEFAULT_CONCURRENCY = 4;
const MAX_CONCURRENCY = 64;

/** The flags that turn `migrate apply|status` into a fleet run, and `--concurrency`. */
export const FLEET_FLAGS: FlagSpec[] = [
  {
    name: "schemas",
    value: "LIST",
    repeatable: true,
    description: "A tenant fleet: run the module in each of these schemas (a,b,c)",
  },
  {
    name: "schema-pattern",
    value: "GLOB",
    description: "A tenant fleet: every existing schema matching GLOB ('tenant_*'; * and ?)",
  },
  {
    name: "schemas-query",
    value: "SQL",
    description: "A tenant fleet: the schemas in the first column of the rows SQL returns",
  },
  {
    name: "concurrency",
    value: "N",
    description: `Fleet schemas handled at once (default ${DEFAULT_CONCURRENCY}, at most ` +
      `${MAX_CONCURRENCY})`,
  },
];

const SELECTORS = ["schemas", "schema-pattern", "schemas-query"] as const;
/** How often the progress bar is redrawn at most. */
const REDRAW_MS = 100;

/** How the schemas of a fleet are chosen. */
interface Selection {
  /** For messages: `the listed schemas`, `schemas matching 'tenant_*'`. */
  label: string;
  /** `--schemas`: the names, checked. */
  names?: string[];
  /** `--schema-pattern`: the pattern as a regular expression over whole names. */
  pattern?: RegExp;
  /** `--schemas-query`: the SQL. */
  query?: string;
}

/**
 * The fleet selection of `input`, or `undefined` when it names no fleet.
 *
 * @throws {UsageError} When two selectors are given, or a flag that names one schema is.
 */
export function fleetSelection(input: ParsedCommand, path: string): Selection | undefined {
  const given = SELECTORS.filter((flag) => hasFlag(input, flag));
  if (given.length === 0) {
    if (hasFlag(input, "concurrency")) {
      throw new UsageError(
        `--concurrency applies to a tenant fleet: add --schemas LIST, --schema-pattern GLOB or ` +
          `--schemas-query SQL to '${path}'`,
      );
    }
    return undefined;
  }
  if (given.length > 1) {
    throw new UsageError(
      `Choose the fleet's schemas one way: ${given.map((f) => `--${f}`).join(" and ")} were ` +
        `both given to '${path}'`,
    );
  }
  for (const single of ["schema", "all", "all-modules"]) {
    if (hasFlag(input, single)) {
      throw new UsageError(
        `Cannot combine --${single} with --${given[0]}: a fleet runs one module (--module NAME) ` +
          `in the schemas --${given[0]} names`,
      );
    }
  }
  const kind = given[0];
  if (kind === "schemas") {
    const value = flagValues(input, kind).join(",");
    const names = value.split(",").map((s) => s.trim()).filter((s) => s !== "");
    if (names.length === 0) {
      throw new UsageError("--schemas needs schema names, such as '--schemas tenant_1,tenant_2'");
    }
    return {
      label: "the listed schemas",
      names: [...new Set(names.map((n) => checkSchemaName(n, "--schemas")))],
    };
  }
  const value = flagValue(input, kind)!;
  if (kind === "schema-pattern") {
    return { label: `schemas matching '${value}'`, pattern: globRegExp(value) };
  }
  return { label: "schemas from --schemas-query", query: value };
}

function concurrencyOf(input: ParsedCommand): number {
  const raw = flagValue(input, "concurrency");
  if (raw === undefined) return DEFAULT_CONCURRENCY;
  const value = Number(raw);
  if (!/^\d+$/.test(raw) || value < 1 || value > MAX_CONCURRENCY) {
    throw new UsageError(
      `--concurrency must be a whole number from 1 to ${MAX_CONCURRENCY}; got '${raw}'`,
    );
  }
  return value;
}

function checkSchemaName(name: string, where: string): string {
  try {
    assertIdentifier(name, "schema");
  } catch (error) {
    throw new UsageError(`Cannot use '${name}' from ${where}: ${(error as Error).message}`);
  }
  return name;
}

/** `tenant_*` → a regular expression matching whole names. */
function globRegExp(glob: string): RegExp {
  if (!/^[A-Za-z0-9_*?]+$/.test(glob)) {
    throw new UsageError(
      `Cannot use --schema-pattern '${glob}': write a schema name with * (any characters) and ` +
        `? (one character), such as 'tenant_*'`,
    );
  }
  const body = glob.replaceAll("*", ".*").replaceAll("?", ".");
  return new RegExp(`^${body}$`);
}

/** The fleet's schemas, in the order of the list, by name for a pattern, as the query returns. */
async function resolveSchemas(
  context: CliContext,
  db: DatabaseManager,
  selection: Selection,
): Promise<string[]> {
  if (selection.names !== undefined) return selection.names;
  const pattern = selection.pattern;
  if (pattern !== undefined) {
    const names = await db.fetchAll<{ name: string }>(
      `SELECT nspname AS name FROM pg_namespace
        WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%'
        ORDER BY nspname`,
      [],
      { signal: context.signal },
    );
    return names.map((r) => r.name).filter((name) => pattern.test(name));
  }
  let rows: Record<string, unknown>[];
  try {
    rows = await db.fetchAll(selection.query!, [], { signal: context.signal });
  } catch (error) {
    if (context.signal.aborted) throw error;
    throw new CommandFailure(
      new Error(
        `Cannot run --schemas-query: ${(error as Error).message}. It must be one SELECT whose ` +
          "first column is a schema name",
        { cause: error },
      ),
      {},
    );
  }
  const names: string[] = [];
  for (const row of rows) {
    const value = Object.values(row)[0];
    if (typeof value !== "string") {
      throw new CommandFailure(
        new Error(
          `Cannot use --schemas-query: its first column must hold schema names (text); got ` +
            `${JSON.stringify(value)}`,
        ),
        {},
      );
    }
    try {
      assertIdentifier(value, "schema");
    } catch (error) {
      throw new CommandFailure(
        new Error(`Cannot use '${value}' from --schemas-query: ${(error as Error).message}`),
        {},
      );
    }
    names.push(value);
  }
  return [...new Set(names)];
}

/** The progress bar of a fleet run on stderr: done/total, failures, rate, time left. */
class ProgressBar {
  readonly #context: CliContext;
  readonly #total: number;
  readonly #noun: string;
  readonly #started = performance.now();
  #drawn = -Infinity;

  constructor(context: CliContext, total: number, noun: string) {
    this.#context = context;
    this.#total = total;
    this.#noun = noun;
  }

  /** Redraws the bar (at most every {@link REDRAW_MS}, and always at the end). */
  update(done: number, failed: number | undefined, schema?: string): void {
    const now = performance.now();
    const last = done === this.#total;
    if (!this.#context.io.stderrIsTerminal) {
      // `--progress` without a terminal: one line per schema instead of a bar.
      if (schema !== undefined) this.#context.out.progress(`${this.#line(done, failed, now)}`);
      return;
    }
    if (!last && now - this.#drawn < REDRAW_MS) return;
    this.#drawn = now;
    this.#context.out.progress(this.#line(done, failed, now));
  }

  #line(done: number, failed: number | undefined, now: number): string {
    const width = 24;
    const filled = this.#total === 0 ? width : Math.round((done / this.#total) * width);
    const parts = [
      `[${"#".repeat(filled)}${"-".repeat(width - filled)}] ${done}/${this.#total} ${this.#noun}`,
    ];
    if (failed !== undefined) parts.push(`${failed} failed`);
    const seconds = (now - this.#started) / 1000;
    if (done > 0 && seconds > 0) {
      const rate = done / seconds;
      parts.push(`${rate < 10 ? rate.toFixed(1) : Math.round(rate)}/s`);
      if (done < this.#total) {
        parts.push(`about ${duration(((this.#total - done) / rate) * 1000)} left`);
      }
    }
    return parts.join("  ");
  }
}

function abortedRun(result: SchemaMigrationResult): boolean {
  return result.error instanceof MigrationError && result.error.reason === "aborted";
}

function statusWord(result: SchemaMigrationResult): string {
  if (abortedRun(result)) return "interrupted";
  switch (result.status) {
    case "success":
      return "migrated";
    case "up_to_date":
      return "up to date";
    case "dry_run":
      return (result.pending ?? []).length === 0 ? "up to date" : "would apply";
    case "failed":
      return "FAILED";
    case "not_started":
      return "not started";
  }
}

function errorJson(error: Error | undefined): Record<string, unknown> | undefined {
  if (error === undefined) return undefined;
  const json: Record<string, unknown> = { message: error.message };
  if (error instanceof MigrationError) {
    for (const key of ["reason", "filename", "line"] as const) {
      if (error[key] !== undefined) json[key] = error[key];
    }
  }
  return json;
}

function fleetJson(result: FleetResult): Record<string, unknown> {
  return {
    status: result.status,
    schemas: result.results.map((r) => ({
      schema: r.schema,
      status: abortedRun(r) ? "interrupted" : r.status,
      applied: r.applied.map((a) => ({
        filename: a.filename,
        executionTimeMs: Math.round(a.executionTimeMs),
      })),
      ...(r.pending === undefined ? {} : { pending: r.pending }),
      missing: r.missing,
      ...(r.error === undefined ? {} : { error: errorJson(r.error) }),
      durationMs: Math.round(r.durationMs),
    })),
    succeeded: result.succeeded,
    failed: result.failed.filter((s) => !abortedRun(result.results.find((r) => r.schema === s)!)),
    interrupted: result.results.filter(abortedRun).map((r) => r.schema),
    notStarted: result.notStarted,
    appliedCount: result.appliedCount,
    totalTimeMs: Math.round(result.totalTimeMs),
  };
}

/** The message, with the file and line when it does not name them already. */
function describe(error: Error | undefined): string {
  if (error === undefined) return "";
  if (!(error instanceof MigrationError) || error.filename === undefined) return error.message;
  if (error.message.includes(error.filename)) return error.message;
  return `${error.message} (file ${error.filename}` +
    (error.line === undefined ? ")" : `, line ${error.line})`);
}

function printFleet(context: CliContext, result: FleetResult, dryRun: boolean): void {
  const interesting = result.results.filter((r) =>
    r.status !== "up_to_date" && !(r.status === "dry_run" && (r.pending ?? []).length === 0)
  );
  const quiet = result.results.length - interesting.length;
  context.out.print();
  if (interesting.length > 0) {
    const rows = interesting.map((r) => [
      r.schema,
      statusWord(r),
      String(dryRun ? (r.pending ?? []).length : r.applied.length),
      r.status === "not_started" ? "-" : duration(r.durationMs),
    ]);
    for (
      const line of table(["SCHEMA", "STATUS", dryRun ? "PENDING" : "APPLIED", "TIME"], rows)
    ) context.out.print(line);
  }
  if (quiet > 0) {
    context.out.print(
      `${interesting.length > 0 ? "and " : ""}${plural(quiet, "schema")} already up to date`,
    );
  }
  const failures = result.results.filter((r) => r.status === "failed" && !abortedRun(r));
  if (failures.length > 0) {
    context.out.print();
    context.out.print("Failures:");
    for (const r of failures) context.out.print(`  ${r.schema}: ${describe(r.error)}`);
  }
}

/** Counts by state, `2 migrated, 1 up to date, 1 failed`. */
function summary(result: FleetResult, dryRun: boolean): string {
  const counts = new Map<string, number>();
  for (const r of result.results) {
    const word = statusWord(r).toLowerCase();
    counts.set(word, (counts.get(word) ?? 0) + 1);
  }
  const parts = [...counts].map(([word, count]) => `${count} ${word}`);
  return `${plural(result.results.length, "schema")} (${parts.join(", ")}); ` +
    (dryRun
      ? "dry run: nothing was applied"
      : `${plural(result.appliedCount, "migration")} applied in ${duration(result.totalTimeMs)}`);
}

const RESUME = "Resume with the same command: schemas already up to date are skipped (one " +
  "query each) and the others are migrated from where they stopped.";

type FleetPool = Awaited<ReturnType<typeof openPool>>;

/**
 * Runs `run` with the pool a fleet runs on and the schemas `selection` names, then ends the
 * progress display and closes the pool. The pool has a connection per schema in progress
 * and one to list the schemas, with prepared statements unless the module's lock is meant
 * for a transaction pooler.
 */
async function onFleet<T>(
  context: CliContext,
  target: ResolvedUrl,
  module: CliModule,
  selection: Selection,
  concurrency: number,
  run: (pool: FleetPool, schemas: string[]) => Promise<T>,
): Promise<T> {
  const pool = await openPool(context, target.url, {
    prepare: module.lock !== "transaction",
    maxConnections: concurrency + 1,
  });
  try {
    return await run(pool, await resolveSchemas(context, new DatabaseManager({ pool }), selection));
  } finally {
    context.out.endProgress();
    await pool.close();
  }
}

/**
 * `migrate apply` on a fleet: `module` in every schema `selection` names, `--concurrency`
 * at a time, with a progress bar on a terminal and a summary table.
 */
export async function applyFleet(
  context: CliContext,
  input: ParsedCommand,
  target: ResolvedUrl,
  module: CliModule,
  selection: Selection,
): Promise<number> {
  const dryRun = hasFlag(input, "dry-run");
  const concurrency = concurrencyOf(input);
  const result = await onFleet(context, target, module, selection, concurrency, (pool, schemas) => {
    context.out.print(`Database: ${maskUrl(target.url)} (${target.source})`);
    context.out.print(
      `Module '${module.name}' in ${plural(schemas.length, "schema")} (${selection.label}), ` +
        `${concurrency} at a time${dryRun ? ", dry run" : ""}`,
    );
    if (schemas.length === 0) context.out.error(`Warning: no schema: ${selection.label}.`);
    const bar = new ProgressBar(context, schemas.length, "schemas");
    bar.update(0, 0);
    return migrateSchemas(pool, schemas, {
      migrationsPath: module.migrationsPath,
      moduleName: module.name,
      migrationsTable: module.migrationsTable,
      lock: module.lock,
      concurrency,
      dryRun,
      signal: context.signal,
      cancelRunning: true,
      onProgress: (p) => bar.update(p.done, p.failed, p.schema),
    });
  });
  printFleet(context, result, dryRun);
  const document = {
    command: "migrate apply",
    database: maskUrl(target.url),
    module: module.name,
    dryRun,
    concurrency,
    ...fleetJson(result),
  };
  const interrupted = result.results.filter(abortedRun).map((r) => r.schema);
  if (context.signal.aborted && (interrupted.length > 0 || result.notStarted.length > 0)) {
    const finished = result.results.length - interrupted.length - result.notStarted.length;
    const parts = [`stopped starting schemas after ${plural(finished, "schema")} finished`];
    if (interrupted.length > 0) {
      parts.push(
        `cancelled the migration running in ${interrupted.join(", ")} and rolled it back ` +
          "(the migrations they committed before stay applied)",
      );
    }
    if (result.notStarted.length > 0) {
      parts.push(`${plural(result.notStarted.length, "schema")} not started`);
    }
    throw new CommandInterrupted(
      new MigrationError(`'migrate apply' was interrupted in module '${module.name}'`, {
        reason: "aborted",
        module: module.name,
      }),
      parts.join("; "),
      document,
      [`Summary: ${summary(result, dryRun)}.`, RESUME],
    );
  }
  if (result.failed.length > 0) {
    throw new CommandFailure(
      new Error(
        `${result.failed.length} of ${plural(result.results.length, "schema")} failed in module ` +
          `'${module.name}': ${result.failed.join(", ")} (see Failures above)`,
      ),
      document,
      [
        `Summary: ${summary(result, dryRun)}.`,
        "Fix the failing migrations, then run the same command again: schemas already up to " +
        "date are skipped.",
      ],
    );
  }
  context.out.print();
  context.out.print(`Done: ${summary(result, dryRun)}.`);
  context.out.document({ ok: true, ...document });
  return 0;
}

function stateWord(status: SchemaStatus): string {
  return status.state === "up_to_date"
    ? "up to date"
    : status.state === "drifted"
    ? "DRIFTED"
    : status.state === "error"
    ? "CHECK FAILED"
    : "behind";
}

function statusJson(report: FleetStatusReport): Record<string, unknown> {
  return {
    upToDate: report.upToDate,
    behind: report.behind,
    drifted: report.drifted,
    errors: report.errors,
    schemas: report.schemas.map((s) => ({
      schema: s.schema,
      state: s.state,
      initialized: s.initialized,
      appliedCount: s.appliedCount,
      pending: s.pending,
      drifted: s.drifted,
      missing: s.missing,
      ...(s.error === undefined ? {} : { error: errorJson(s.error) }),
    })),
    totalTimeMs: Math.round(report.totalTimeMs),
  };
}

/**
 * `migrate status` on a fleet: which schemas are up to date, behind, drifted, or could
 * not be checked. Exit code 1 when a check failed, or with `--check` when any schema is
 * not up to date.
 */
export async function statusFleet(
  context: CliContext,
  input: ParsedCommand,
  target: ResolvedUrl,
  module: CliModule,
  selection: Selection,
): Promise<number> {
  const concurrency = concurrencyOf(input);
  const report = await onFleet(context, target, module, selection, concurrency, (pool, schemas) => {
    const bar = new ProgressBar(context, schemas.length, "schemas checked");
    return checkSchemas(pool, schemas, {
      migrationsPath: module.migrationsPath,
      moduleName: module.name,
      migrationsTable: module.migrationsTable,
      concurrency,
      onProgress: (p) => bar.update(p.done, undefined, p.schema),
    });
  });
  const check = hasFlag(input, "check");
  const clean = report.schemas.every((s) => s.state === "up_to_date");
  const document = {
    command: "migrate status",
    database: maskUrl(target.url),
    module: module.name,
    allUpToDate: clean,
    ...statusJson(report),
  };
  context.out.print(`Database: ${maskUrl(target.url)} (${target.source})`);
  context.out.print(
    `Module '${module.name}' in ${plural(report.schemas.length, "schema")} (${selection.label})`,
  );
  context.out.print();
  const behind = report.schemas.filter((s) => s.state !== "up_to_date");
  if (behind.length > 0) {
    for (
      const line of table(
        ["SCHEMA", "STATE", "APPLIED", "PENDING", "DRIFTED", "MISSING"],
        behind.map((s) => [
          s.schema,
          stateWord(s),
          String(s.appliedCount),
          String(s.pending.length),
          String(s.drifted.length),
          String(s.missing.length),
        ]),
      )
    ) context.out.print(line);
    context.out.print();
  }
  context.out.print(
    `${plural(report.schemas.length, "schema")}: ${report.upToDate.length} up to date, ` +
      `${report.behind.length} behind, ${report.drifted.length} drifted, ` +
      `${report.errors.length} could not be checked.`,
  );
  for (const s of report.schemas.filter((s) => s.error !== undefined)) {
    context.out.print(`  ${s.schema}: ${describe(s.error)}`);
  }
  if (report.drifted.length > 0) {
    context.out.print(
      "Drifted: a migration file changed after it was applied there; restore it and put the " +
        "change in a new migration.",
    );
  }
  if (report.errors.length > 0) {
    throw new CommandFailure(
      new Error(
        `Cannot check ${plural(report.errors.length, "schema")} of module '${module.name}': ` +
          report.errors.join(", "),
      ),
      document,
    );
  }
  context.out.document({ ok: !check || clean, ...document });
  if (check && !clean) {
    context.out.error(
      "Not up to date: schemas are behind or drifted (--check). Run 'pgdbm migrate apply' " +
        "with the same selection to migrate them.",
    );
    return 1;
  }
  return 0;
}
