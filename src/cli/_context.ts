/**
 * What every command of the pgdbm CLI shares: the context it runs in, flag access, the
 * connection flags, opening the pool, and confirmations.
 *
 * @module
 */

import type { FlagSpec, ParsedCommand } from "./_args.ts";
import { UsageError } from "./_args.ts";
import { type CliConfig, loadConfig, type ResolvedUrl, resolveUrl } from "./_config.ts";
import { passwordsOf } from "../_secrets.ts";
import type { Output, ResolvedIo } from "./_output.ts";
import { createSharedPool, type Pool } from "../pool/pool.ts";

/** What a command runs with. */
export interface CliContext {
  /** The process's streams and surroundings. */
  io: ResolvedIo;
  /** Where it writes. */
  out: Output;
  /**
   * Aborts when the CLI is interrupted (SIGINT, SIGTERM): a command cancels the SQL it
   * runs, cleans up, and throws; `main` then exits with 130.
   */
  signal: AbortSignal;
  /** The command running (`migrate apply`), once known. */
  command?: string;
}

/**
 * The reason of the CLI's abort signal when the process receives a signal; its message
 * is the signal's name (`SIGINT`), so messages built from it read "aborted (SIGINT)".
 */
export class Interrupt extends Error {
  /** The signal received. */
  readonly signalName: string;

  constructor(signalName: string) {
    super(signalName);
    this.name = "Interrupt";
    this.signalName = signalName;
  }
}

/**
 * `promise`, or, as soon as `signal` aborts, a rejection with its reason (`promise` goes on
 * unobserved; `onLate` receives its value if it still arrives, to close what it opened).
 */
export function orAbort<T>(
  promise: Promise<T>,
  signal: AbortSignal,
  onLate?: (value: T) => void,
): Promise<T> {
  if (signal.aborted) {
    promise.then((value) => onLate?.(value), () => {});
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => {
      promise.then((value) => onLate?.(value), () => {});
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then((value) => {
      signal.removeEventListener("abort", onAbort);
      resolve(value);
    }, (error) => {
      signal.removeEventListener("abort", onAbort);
      reject(error);
    });
  });
}

/**
 * A command failed after doing part of its work: `cause` is the error, `details` are
 * added to the JSON document, `notes` are printed on stderr after the message.
 */
export class CommandFailure extends Error {
  /** Fields merged into the `--json` error document. */
  readonly details: Record<string, unknown>;
  /** Lines printed after the error message. */
  readonly notes: string[];

  constructor(cause: unknown, details: Record<string, unknown>, notes: string[] = []) {
    super(cause instanceof Error ? cause.message : String(cause), { cause });
    this.name = "CommandFailure";
    this.details = details;
    this.notes = notes;
  }
}

/**
 * A command stopped because the CLI was interrupted; `done` says what was done about the
 * work in progress ("cancelled '002_x.sql' and rolled it back, …").
 */
export class CommandInterrupted extends CommandFailure {
  /** What was done about the work in progress, as a sentence without its final period. */
  readonly done: string;

  constructor(
    cause: unknown,
    done: string,
    details: Record<string, unknown>,
    notes: string[] = [],
  ) {
    super(cause, details, notes);
    this.name = "CommandInterrupted";
    this.done = done;
  }
}

/** `--json`. */
export const JSON_FLAG: FlagSpec = {
  name: "json",
  description: "Print one JSON document on stdout instead of text",
};

/** `--config` and `--env`. */
export const CONNECTION_FLAGS: FlagSpec[] = [
  {
    name: "config",
    value: "PATH",
    description: "The configuration file (default: $PGDBM_CONFIG, else ./pgdbm.json if any)",
  },
  {
    name: "env",
    value: "NAME",
    description: "The environment of pgdbm.json (default: $PGDBM_ENV, else 'default')",
  },
];

/** The last value of a flag, or `undefined`. */
export function flagValue(input: ParsedCommand, name: string): string | undefined {
  return input.flags.get(name)?.at(-1);
}

/** Every value of a repeatable flag. */
export function flagValues(input: ParsedCommand, name: string): string[] {
  return input.flags.get(name) ?? [];
}

/** True when a switch is given. */
export function hasFlag(input: ParsedCommand, name: string): boolean {
  return input.flags.has(name);
}

/**
 * Reads the configuration the flags point at: `--config PATH`, else `$PGDBM_CONFIG`, else
 * `pgdbm.json` in the working directory when it is there.
 */
export async function readConfig(context: CliContext, input: ParsedCommand): Promise<CliConfig> {
  const flag = flagValue(input, "config");
  if (flag !== undefined) return await loadConfig(context.io.cwd, flag, "--config");
  const variable = context.io.env("PGDBM_CONFIG");
  if (variable !== undefined && variable.trim() !== "") {
    return await loadConfig(context.io.cwd, variable, "PGDBM_CONFIG");
  }
  return await loadConfig(context.io.cwd);
}

/** Resolves the database URL and registers its password for scrubbing. */
export function databaseUrl(
  context: CliContext,
  config: CliConfig,
  input: ParsedCommand,
): ResolvedUrl {
  const target = resolveUrl(config, flagValue(input, "env"), (name) => context.io.env(name));
  context.out.addSecrets(passwordsOf(target.url));
  return target;
}

/** Options of {@link openPool}. */
export interface OpenPoolOptions {
  /** Connection attempts (the library's retry policy when left out). */
  attempts?: number;
  /** Named prepared statements; off for modules migrated through PgBouncer. */
  prepare?: boolean;
  /** The pool's size (default 4); a fleet needs one connection per schema at once. */
  maxConnections?: number;
}

/** Opens a small pool for the command; gives up (and closes it later) when interrupted. */
export async function openPool(
  context: CliContext,
  url: string,
  { attempts, prepare = true, maxConnections = 4 }: OpenPoolOptions = {},
): Promise<Pool> {
  context.out.addSecrets(passwordsOf(url));
  const opening = createSharedPool({
    connectionString: url,
    minConnections: 1,
    maxConnections,
    serverSettings: { application_name: "pgdbm-cli" },
    prepare,
    logger: { warn: (message) => context.out.error(`Warning: ${message}`) },
    ...(attempts === undefined ? {} : { retry: { attempts } }),
  });
  return await orAbort(opening, context.signal, (pool) => {
    pool.close().catch(() => {});
  });
}

/**
 * Asks the person at the terminal to type `name` to go on, unless `--yes` was given.
 *
 * @returns `true` to go on, `false` when the answer did not match.
 * @throws {UsageError} When stdin is not a terminal and `--yes` was not given.
 */
export async function confirm(
  context: CliContext,
  input: ParsedCommand,
  what: string,
  name: string,
  command: string,
): Promise<boolean> {
  if (hasFlag(input, "yes")) return true;
  if (!context.io.stdinIsTerminal) {
    throw new UsageError(
      `Refusing to drop ${what} '${name}' without confirmation: stdin is not a terminal, so ` +
        `no one can type its name. Pass --yes to drop it: '${command} --yes'`,
    );
  }
  const answer = await orAbort(
    context.out.ask(
      `This drops ${what} '${name}' and everything in it. Type its name to confirm: `,
    ),
    context.signal,
  );
  if (answer?.trim() === name) return true;
  context.out.error(`Not dropped: the answer did not match '${name}'.`);
  return false;
}
