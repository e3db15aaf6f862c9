/**
 * The pgdbm command line: migrations, databases and schemas.
 *
 * ```sh
 * deno run -A jsr:@pgdbm/pgdbm/cli migrate apply     # in any project
 * deno task migrate apply                            # with a "migrate" task (below)
 * ```
 *
 * A task in your `deno.json` keeps it short:
 *
 * ```json
 * { "tasks": { "migrate": "deno run -A jsr:@pgdbm/pgdbm/cli migrate",
 *              "pgdbm": "deno run -A jsr:@pgdbm/pgdbm/cli" } }
 * ```
 *
 * ## Commands
 *
 * | command | does |
 * |---|---|
 * | `migrate apply [--module M]… [--all] [--dry-run] [--progress]` | applies pending migrations, dependencies first |
 * | `migrate status [--module M]… [--all-modules] [--check]` | table of module, schema, applied, pending, drifted, missing (`--all-modules`, every module, is the default) |
 * | `migrate apply --module M --schemas A,B \| --schema-pattern GLOB \| --schemas-query SQL [--concurrency N] [--dry-run]` | a tenant fleet: module M in many schemas, N at a time, with a summary table |
 * | `migrate status --module M --schemas … \| --schema-pattern … \| --schemas-query … [--check]` | a fleet's schemas that are behind, drifted, or could not be checked |
 * | `migrate create NAME [--module M] [--sql TEXT]` | writes `YYYYMMDDHHMMSS_NAME.sql` (needs no database) |
 * | `migrate rollback FILE [--module M]` | removes FILE's history row so that it runs again (its changes are not undone) |
 * | `db create [NAME] [--if-not-exists]` | `CREATE DATABASE` (NAME defaults to the URL's database) |
 * | `db drop [NAME] [--yes] [--if-exists] [--force]` | `DROP DATABASE`, after you type its name |
 * | `db reset [NAME] [--yes] [--force] [--module M]…` | drops the database (after you type its name), creates it, applies the migrations |
 * | `db info` | server version, database, user, size, connections |
 * | `db test-connection` | connects once: `ok` and the latency, or the error |
 * | `schema list` | schemas that are not PostgreSQL's own, with owner, tables and size |
 * | `schema create NAME [--if-not-exists]` | `CREATE SCHEMA` |
 * | `schema drop NAME [--cascade] [--yes] [--if-exists]` | `DROP SCHEMA`, after you type its name |
 * | `schema dump [--schema S] [--output FILE] [--pg-dump PATH]` | the DDL through `pg_dump --schema-only` (which must be installed; the password goes in `PGPASSWORD`, not its arguments) |
 *
 * Every level takes `--help` (`pgdbm --help`, `pgdbm migrate --help`,
 * `pgdbm migrate apply --help`); `pgdbm --version` prints the version. Every command that
 * reports takes `--json`: stdout then holds exactly one JSON document (`{ "ok": true, … }`,
 * or `{ "ok": false, "error": { … } }` on failure) and nothing else; messages go to stderr.
 * `--config PATH` and `--env NAME` are accepted by every command that connects.
 *
 * `db create`, `db drop` and `db reset` connect to the maintenance database of the same
 * server (the URL with its database replaced by `postgres`, or `--maintenance-db NAME`).
 * `db drop`, `db reset` and `schema drop` ask you to type the name; when stdin is not a
 * terminal they refuse (exit 2) unless `--yes` is given. Database and schema names must be
 * identifiers
 * (`^[A-Za-z_][A-Za-z0-9_]{0,62}$`). URLs are printed with the password replaced by `****`,
 * and a password never appears in any output.
 *
 * `migrate apply` shows a progress line on stderr (`[3/12] users: 003_add_index.sql`) when
 * stderr is a terminal, or always with `--progress`. When another run holds the migration
 * lock of a module, it says so on stderr (with the holder's server process id) while it
 * waits.
 *
 * ## Tenant fleets
 *
 * `--schemas a,b,c` (repeatable), `--schema-pattern 'tenant_*'` (`*` and `?` over the
 * existing schemas, in name order) or `--schemas-query "SELECT …"` (the first column of its
 * rows) turn `migrate apply` and `migrate status` into a run of one module (`--module`,
 * or the `--path` module) in each of those schemas, `--concurrency N` (default 4) at a
 * time. The module's `dependsOn` modules are not applied. One schema's failure does not
 * stop the others: the summary table lists each schema that was migrated, failed or not
 * started (and counts those already up to date), and the exit code is 1 when any failed.
 * On a terminal stderr shows a progress bar (done/total, failures, rate, time left).
 * Resuming is running the same command again: schemas already up to date cost one query
 * each and the others continue from their first pending migration. Ctrl-C stops starting
 * new schemas, cancels and rolls back the migration running in each schema in progress
 * (what those schemas committed before stays applied) and exits with 130, saying so.
 *
 * ## Ctrl-C and SIGTERM
 *
 * The first SIGINT or SIGTERM interrupts the command cleanly. `migrate apply` cancels the
 * statement running on the server, rolls the migration in progress back (a
 * `-- pgdbm:no-transaction` file stops at its current statement; the statements before it
 * stay applied), releases the migration lock, prints what it did, such as
 *
 * ```text
 * Interrupted (SIGINT): in module 'users' (schema users): cancelled '002_x.sql' (its
 * statement at line 3) and rolled it back, and released the migration lock; nothing from
 * that file was applied.
 * ```
 *
 * and exits with 130 (a signal that arrives after the command finished changes nothing,
 * not even its exit code). Migrations committed before stay applied; the next
 * `migrate apply` runs the rest. `db create`, `db drop` and `schema create` cancel their statement too. A
 * second signal exits at once, and so does a command that has not stopped 15 s after the
 * first. Send the signal to the `deno run` process (a terminal's Ctrl-C reaches it through
 * `deno task` too).
 *
 * ## Where the database URL comes from
 *
 * 1. `DATABASE_URL`, when set (it overrides the environment's `url`);
 * 2. else the `url` of the environment of `pgdbm.json` named by `--env NAME`, else by
 *    `PGDBM_ENV`, else `default`.
 *
 * With neither, the command fails (exit 2) saying what to set. An `--env` that
 * `pgdbm.json` does not declare is refused even when `DATABASE_URL` is set.
 *
 * ## `pgdbm.json`
 *
 * Read from `--config PATH`, else from the path in `PGDBM_CONFIG`, else from the working
 * directory when it is there; optional. Relative paths in it are relative to the file.
 *
 * ```json
 * {
 *   "environments": {
 *     "default": { "url": "postgres://postgres@localhost:5432/app" },
 *     "prod": { "url": "env:PROD_DATABASE_URL" }
 *   },
 *   "migrationsTable": "schema_migrations",
 *   "modules": {
 *     "users": { "migrationsPath": "migrations/users", "schema": "users" },
 *     "orders": { "migrationsPath": "migrations/orders", "schema": "orders", "dependsOn": ["users"] }
 *   }
 * }
 * ```
 *
 * - `environments.<name>.url`: a `postgres://` (or `pglite:`) URL, or `env:VAR` to read it
 *   from the variable `VAR` (keep passwords out of the file).
 * - `modules.<name>`: the module name is the history's `module_name`.
 *   - `migrationsPath`: a folder, or a `file:`/`https:` URL of one (default
 *     `migrations/<name>`);
 *   - `schema`: the schema its migrations run in (default: the connection's default schema);
 *   - `dependsOn`: modules whose migrations are applied before this module's;
 *   - `migrationsTable`: its history table (default: the top-level `migrationsTable`, else
 *     `schema_migrations`).
 *   - `lock`: `"session"` (default) or `"transaction"`, the Migrator's lock; `"transaction"`
 *     when the URL goes through PgBouncer in transaction mode (the CLI then also turns off
 *     prepared statements). The top-level `lock` is the default of every module.
 * - Modules run in dependency order (otherwise in the file's order); `migrate apply
 *   --module orders` also applies the modules `orders` depends on. A dependency that is not a
 *   module, or a cycle (`'a' → 'b' → 'a'`), is refused with exit code 2 and a message naming
 *   them. Unknown keys are refused too (with a suggestion).
 *
 * Without modules in `pgdbm.json` (or with `--path`, `--schema` or `--migrations-table`),
 * the flags describe one module: `--module` (default `default`), `--path` (default
 * `./migrations`), `--schema` (default none), `--migrations-table`.
 *
 * ## Exit codes
 *
 * | code | meaning |
 * |---|---|
 * | 0 | success |
 * | 1 | the command ran and failed: a migration failed (stderr names its file, module, schema and line), the server could not be reached, a database exists already, a confirmation was not given… |
 * | 2 | bad usage: unknown command or flag (with a suggestion), missing argument, invalid `pgdbm.json` (unknown dependency, dependency cycle), no database URL, `--yes` needed |
 * | 130 | interrupted by SIGINT or SIGTERM (stderr says what was cancelled and rolled back) |
 *
 * @example Test a migration run from code (needs a server)
 * ```ts ignore
 * import { main } from "@pgdbm/pgdbm/cli";
 * const code = await main(["migrate", "status", "--json"], {
 *   env: { DATABASE_URL: "postgres://postgres@localhost:5432/app" },
 *   stdout: (text) => console.log(JSON.parse(text)),
 * });
 * ```
 *
 * @module
 */

import {
  commandHelp,
  groupHelp,
  type GroupSpec,
  HELP_FLAG,
  isHelp,
  parseCommand,
  PROGRAM,
  tokenize,
  UsageError,
} from "./_args.ts";
import { suggest } from "../_suggest.ts";
import { type CliContext, CommandFailure, CommandInterrupted, Interrupt } from "./_context.ts";
import { DB_GROUP } from "./commands/db.ts";
import { MIGRATE_GROUP } from "./commands/migrate.ts";
import { Output, type ResolvedIo } from "./_output.ts";
import { SCHEMA_GROUP } from "./commands/schema.ts";
import { VERSION } from "./_version.ts";
import { ConfigurationError, MigrationError, PgdbmError, QueryError } from "../errors.ts";

/**
 * The surroundings of a {@link main} run; anything left out is the process's own.
 */
export interface CliIo {
  /** Receives stdout text (lines end with `\n`). */
  stdout?: (text: string) => void;
  /** Receives stderr text. */
  stderr?: (text: string) => void;
  /** Reads one line of the answer to a confirmation; `null` at the end of input. */
  readLine?: () => Promise<string | null>;
  /** Whether stdin is a terminal (confirmations can be asked). */
  stdinIsTerminal?: boolean;
  /** Whether stderr is a terminal (the progress line is shown). */
  stderrIsTerminal?: boolean;
  /** The environment variables the CLI reads (`DATABASE_URL`, `PGDBM_ENV`, `env:` URLs). */
  env?: Record<string, string | undefined>;
  /** The working directory (where `pgdbm.json` and `./migrations` are looked for). */
  cwd?: string;
  /**
   * Interrupts the command when it aborts, as SIGINT and SIGTERM do when the CLI runs as a
   * program: `migrate apply` cancels its running statement on the server, rolls the
   * migration back and releases the lock; `db create|drop` and `schema create` cancel
   * their statement. `main` then returns 130 after printing what was done.
   */
  signal?: AbortSignal;
}

const GROUPS: GroupSpec<CliContext>[] = [MIGRATE_GROUP, DB_GROUP, SCHEMA_GROUP];

const VALUE_FLAGS: ReadonlySet<string> = new Set(
  GROUPS.flatMap((g) => g.commands.flatMap((c) => c.flags))
    .filter((f) => f.value !== undefined)
    .map((f) => f.name),
);

/**
 * Runs the CLI with `args` (the words after the program name) and returns the exit code:
 * 0 success, 1 failure, 2 bad usage, 130 interrupted (`io.signal` aborted). Every pool it
 * opens is closed before it returns.
 *
 * @param args The arguments, such as `["migrate", "apply", "--dry-run"]`.
 * @param io Streams, environment and working directory to use instead of the process's.
 * @returns The exit code.
 *
 * @example Show the help
 * ```ts
 * import { main } from "./mod.ts";
 * let text = "";
 * const code = await main(["--help"], { stdout: (t) => text += t });
 * console.assert(code === 0 && text.includes("migrate"));
 * ```
 */
export async function main(args: string[], io: CliIo = {}): Promise<number> {
  const resolved = resolveIo(io);
  const out = new Output(resolved, {
    json: args.includes("--json"),
    progress: args.includes("--progress"),
  });
  const signal = io.signal ?? new AbortController().signal;
  const context: CliContext = { io: resolved, out, signal };
  try {
    const code = await dispatch(context, args);
    if (signal.aborted) {
      // Too late to interrupt anything: the command's own result (and exit code) stands.
      const name = interruptName(signal.reason);
      context.out.error(
        `${name ?? "The interruption"} arrived after '${context.command ?? "the command"}' ` +
          "had finished: nothing was cancelled.",
      );
    }
    return code;
  } catch (error) {
    if (signal.aborted) return reportInterrupted(context, error);
    return report(context, error);
  }
}

/** The exit code of an interrupted command (128 + SIGINT's number, as shells report it). */
const INTERRUPTED = 130;

/** `SIGINT`, or the abort reason's message, or nothing, for "Interrupted (…)". */
function interruptName(reason: unknown): string | undefined {
  if (reason instanceof Interrupt) return reason.signalName;
  if (reason instanceof Error && reason.name !== "AbortError") return reason.message;
  return undefined;
}

/**
 * Reports an interrupted command: what was done about the work in progress (from the
 * command), or that it stopped, then the usual details; returns 130.
 */
function reportInterrupted(context: CliContext, error: unknown): number {
  const name = interruptName(context.signal.reason);
  const head = `Interrupted${name === undefined ? "" : ` (${name})`}`;
  const command = context.command === undefined ? "the command" : `'${context.command}'`;
  const done = error instanceof CommandInterrupted
    ? error.done
    : `${command} stopped before it finished; a statement it was running, if any, was ` +
      "cancelled on the server";
  const failure = error instanceof CommandFailure ? error : undefined;
  const cause = failure?.cause ?? error;
  const lines = [`${head}: ${done}.`];
  const details: Record<string, unknown> = {};
  if (cause instanceof MigrationError) addMigrationDetails(cause, details, lines);
  lines.push(...(failure?.notes ?? []));
  context.out.error(lines.join("\n"));
  context.out.document({
    ok: false,
    interrupted: name ?? true,
    error: { message: `${head}: ${done}`, exitCode: INTERRUPTED, ...details },
    ...(failure?.details ?? {}),
  });
  return INTERRUPTED;
}

/**
 * Adds where a migration failed (file, module, schema, line) to the JSON `details` and, as
 * indented `label: value` lines, to the human `lines`.
 */
function addMigrationDetails(
  error: MigrationError,
  details: Record<string, unknown>,
  lines: string[],
): void {
  for (
    const [label, value] of [
      ["file", error.filename],
      ["module", error.module],
      ["schema", error.schema],
      ["line", error.line],
    ] as const
  ) {
    if (value === undefined) continue;
    details[label === "file" ? "filename" : label] = value;
    lines.push(`  ${`${label}:`.padEnd(10)}${value}`);
  }
}

async function dispatch(context: CliContext, args: string[]): Promise<number> {
  const tokens = tokenize(args, VALUE_FLAGS);
  const help = tokens.some(isHelp);
  const words = tokens.flatMap((t, i) => (t.positional === undefined ? [] : [i]));
  if (words.length > 0 && tokens[words[0]].positional === "help") {
    return showHelp(
      context,
      tokens.filter((_, i) => i !== words[0]).flatMap((t) =>
        t.positional === undefined ? [] : [t.positional]
      ),
    );
  }
  if (words.length === 0) {
    if (help) return write(context, topHelp());
    if (tokens.some((t) => t.flag === "version" || t.flag === "V")) {
      return write(context, `${PROGRAM} ${VERSION} (Deno ${Deno.version.deno})\n`);
    }
    if (tokens.length === 0) {
      context.out.error(topHelp().trimEnd());
      return 2;
    }
    throw new UsageError(
      `Missing the command: type '${PROGRAM} <group> <command>', such as ` +
        `'${PROGRAM} migrate apply'. Run '${PROGRAM} --help' to see them`,
    );
  }
  const groupWord = tokens[words[0]].positional!;
  const group = findGroup(groupWord);
  if (words.length === 1) {
    if (help) return write(context, groupHelp(group));
    throw new UsageError(
      `Missing the command after '${group.name}': one of ` +
        group.commands.map((c) => `'${c.name}'`).join(", ") +
        `. Run '${PROGRAM} ${group.name} --help' to see what they do`,
    );
  }
  const commandWord = tokens[words[1]].positional!;
  if (commandWord === "help") return write(context, groupHelp(group));
  const command = group.commands.find((c) => c.name === commandWord);
  if (command === undefined) {
    const hint = suggest(commandWord, group.commands.map((c) => c.name));
    throw new UsageError(
      `Unknown command '${commandWord}'.` + (hint === undefined ? "" : ` Did you mean '${hint}'?`) +
        ` Run '${PROGRAM} ${group.name} --help' to see the commands`,
    );
  }
  const path = `${group.name} ${command.name}`;
  if (help) return write(context, commandHelp(path, command));
  context.command = path;
  const rest = tokens.filter((_, i) => i !== words[0] && i !== words[1]);
  return await command.run(context, parseCommand(path, command, rest));
}

function findGroup(word: string): GroupSpec<CliContext> {
  const group = GROUPS.find((g) => g.name === word);
  if (group !== undefined) return group;
  const owner = GROUPS.find((g) => g.commands.some((c) => c.name === word));
  const hint = owner !== undefined
    ? `${owner.name} ${word}`
    : suggest(word, GROUPS.map((g) => g.name));
  throw new UsageError(
    `Unknown command '${word}'.` + (hint === undefined ? "" : ` Did you mean '${hint}'?`) +
      ` Run '${PROGRAM} --help' to see the commands`,
  );
}

function showHelp(context: CliContext, words: string[]): number {
  if (words.length === 0) return write(context, topHelp());
  const group = findGroup(words[0]);
  if (words.length === 1) return write(context, groupHelp(group));
  const command = group.commands.find((c) => c.name === words[1]);
  if (command === undefined) {
    const hint = suggest(words[1], group.commands.map((c) => c.name));
    throw new UsageError(
      `Unknown command '${words[1]}'.` + (hint === undefined ? "" : ` Did you mean '${hint}'?`) +
        ` Run '${PROGRAM} ${group.name} --help' to see the commands`,
    );
  }
  return write(context, commandHelp(`${group.name} ${command.name}`, command));
}

function write(context: CliContext, text: string): number {
  context.io.stdout(text);
  return 0;
}

function topHelp(): string {
  const lines = [
    `Usage: ${PROGRAM} <group> <command> [arguments] [flags]`,
    "",
    "Migrations, databases and schemas of PostgreSQL, for pgdbm.",
    "",
  ];
  for (const group of GROUPS) {
    lines.push(`${group.name}: ${group.summary}`);
    const width = Math.max(...group.commands.map((c) => c.name.length));
    for (const command of group.commands) {
      lines.push(`  ${group.name} ${command.name.padEnd(width)}  ${command.summary}`);
    }
    lines.push("");
  }
  lines.push(
    "The database URL is $DATABASE_URL, else the 'url' of the environment of pgdbm.json",
    "chosen by --env NAME (or $PGDBM_ENV, else 'default'). The configuration file is",
    "--config PATH, else $PGDBM_CONFIG, else ./pgdbm.json; it also declares the modules:",
    '{ "modules": { "users": { "migrationsPath": "migrations/users", "schema": "users",',
    '"dependsOn": [] } } }.',
    "",
    "Exit codes: 0 success, 1 failure, 2 bad usage, 130 interrupted (Ctrl-C, SIGTERM).",
    `Run '${PROGRAM} <group> --help' or '${PROGRAM} <group> <command> --help' for more.`,
    `  -${HELP_FLAG.short}, --${HELP_FLAG.name}     ${HELP_FLAG.description}`,
    "  -V, --version  Show the version of pgdbm",
  );
  return lines.join("\n") + "\n";
}

function report(context: CliContext, error: unknown): number {
  const failure = error instanceof CommandFailure ? error : undefined;
  const cause = failure?.cause ?? error;
  const usage = cause instanceof UsageError || cause instanceof ConfigurationError;
  const code = usage ? 2 : 1;
  const message = cause instanceof Error ? cause.message : String(cause);
  const details: Record<string, unknown> = {};
  const lines = [`Error: ${message}`];
  if (cause instanceof PgdbmError) details.code = cause.code;
  if (cause instanceof MigrationError) addMigrationDetails(cause, details, lines);
  const server = cause instanceof QueryError
    ? cause
    : cause instanceof Error && cause.cause instanceof QueryError
    ? cause.cause
    : undefined;
  if (server !== undefined) {
    for (const field of ["sqlstate", "detail", "hint"] as const) {
      const value = server[field];
      if (value === undefined) continue;
      details[field] = value;
      lines.push(`  ${`${field}:`.padEnd(10)}${value}`);
    }
  }
  lines.push(...(failure?.notes ?? []));
  if (!usage && !(cause instanceof PgdbmError) && context.io.env("PGDBM_DEBUG") === "1") {
    lines.push(String((cause as Error)?.stack ?? ""));
  }
  context.out.error(lines.join("\n"));
  context.out.document({
    ok: false,
    error: { message, exitCode: code, ...details },
    ...(failure?.details ?? {}),
  });
  return code;
}

const encoder = new TextEncoder();

function writeAll(stream: { writeSync(data: Uint8Array): number }, text: string): void {
  let data = encoder.encode(text);
  while (data.length > 0) data = data.subarray(stream.writeSync(data));
}

async function readStdinLine(): Promise<string | null> {
  const decoder = new TextDecoder();
  const buffer = new Uint8Array(1024);
  let text = "";
  while (true) {
    const read = await Deno.stdin.read(buffer);
    if (read === null) return text === "" ? null : text;
    text += decoder.decode(buffer.subarray(0, read), { stream: true });
    const newline = text.indexOf("\n");
    if (newline >= 0) return text.slice(0, newline).replace(/\r$/, "");
  }
}

function resolveIo(io: CliIo): ResolvedIo {
  const env = io.env;
  return {
    stdout: io.stdout ?? ((text) => writeAll(Deno.stdout, text)),
    stderr: io.stderr ?? ((text) => writeAll(Deno.stderr, text)),
    readLine: io.readLine ?? readStdinLine,
    stdinIsTerminal: io.stdinIsTerminal ?? Deno.stdin.isTerminal(),
    stderrIsTerminal: io.stderrIsTerminal ?? Deno.stderr.isTerminal(),
    env: env === undefined ? (name) => Deno.env.get(name) : (name) => env[name],
    cwd: io.cwd ?? Deno.cwd(),
  };
}

/** How long a command may take to clean up after SIGINT/SIGTERM before the process exits. */
const STOP_GRACE_MS = 15_000;

/**
 * Runs {@link main} as the program: the first SIGINT or SIGTERM aborts the command (it
 * cancels its SQL and cleans up; exit code 130), a second one exits at once, and so does a
 * command that has not stopped within {@link STOP_GRACE_MS}.
 */
async function runProgram(): Promise<number> {
  const controller = new AbortController();
  const names: Deno.Signal[] = Deno.build.os === "windows"
    ? ["SIGINT", "SIGBREAK"]
    : ["SIGINT", "SIGTERM"];
  const listeners = names.map((name) => {
    const listener = (): void => {
      if (controller.signal.aborted) {
        writeAll(
          Deno.stderr,
          `\n${name} again: exiting at once, without waiting for the cleanup\n`,
        );
        Deno.exit(INTERRUPTED);
      }
      writeAll(
        Deno.stderr,
        `\n${name}: stopping; cancelling what runs on the server (${name} again exits at once)\n`,
      );
      controller.abort(new Interrupt(name));
      const timer = setTimeout(() => {
        writeAll(
          Deno.stderr,
          `Error: the command did not stop within ${STOP_GRACE_MS / 1000} s after ${name}; ` +
            "exiting: the server may still be running its statement\n",
        );
        Deno.exit(INTERRUPTED);
      }, STOP_GRACE_MS);
      Deno.unrefTimer(timer);
    };
    return { name, listener };
  });
  for (const { name, listener } of listeners) {
    try {
      Deno.addSignalListener(name, listener);
    } catch {
      // This platform cannot listen to this signal: it keeps its default action.
    }
  }
  try {
    return await main(Deno.args, { signal: controller.signal });
  } finally {
    for (const { name, listener } of listeners) {
      try {
        Deno.removeSignalListener(name, listener);
      } catch {
        // Was never added.
      }
    }
  }
}

if (import.meta.main) Deno.exit(await runProgram());
