/**
 * Command-line parsing of the pgdbm CLI: the command table's shape, the tokenizer, the
 * usage errors (exit code 2) with "did you mean" suggestions, and the help screens.
 *
 * @module
 */

import { suggest } from "../_suggest.ts";

/** The name the CLI calls itself in messages. */
export const PROGRAM = "pgdbm";

/** A bad invocation or configuration: the CLI exits with code 2. */
export class UsageError extends Error {
  /**
   * @param message What is wrong and what to type instead.
   */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** A flag a command accepts. */
export interface FlagSpec {
  /** The long name without dashes, such as `dry-run`. */
  name: string;
  /** A one-letter alias without the dash, such as `y`. */
  short?: string;
  /** The placeholder of its value (`NAME`); absent for a switch. */
  value?: string;
  /** True when it may be given more than once. */
  repeatable?: boolean;
  /** One line for the help screen. */
  description: string;
}

/** A positional argument of a command. */
export interface ArgSpec {
  /** The placeholder, such as `NAME`. */
  name: string;
  /** What it is, for "Missing …" messages (`the database name`). */
  what: string;
  /** True when it must be given. */
  required: boolean;
}

/** A leaf command, such as `migrate apply`. */
export interface CommandSpec<C> {
  /** The word that selects it. */
  name: string;
  /** One line for the group's help. */
  summary: string;
  /** Its positional arguments. */
  args: ArgSpec[];
  /** Its flags (the help flag is added to every command). */
  flags: FlagSpec[];
  /** Paragraphs shown under the usage line. */
  details?: string;
  /** An example invocation, shown in the help. */
  example?: string;
  /** Runs it; resolves to the exit code. */
  run(context: C, input: ParsedCommand): Promise<number>;
}

/** A group of commands, such as `migrate`. */
export interface GroupSpec<C> {
  /** The word that selects it. */
  name: string;
  /** One line for the top-level help. */
  summary: string;
  /** Its commands. */
  commands: CommandSpec<C>[];
}

/** What a command receives: its positional arguments and flags. */
export interface ParsedCommand {
  /** The positional arguments after the group and command words. */
  args: string[];
  /** Flag name → values (a switch has `[""]`). */
  flags: Map<string, string[]>;
}

/** The flag asking for help, accepted everywhere. */
export const HELP_FLAG: FlagSpec = { name: "help", short: "h", description: "Show this help" };

interface Token {
  flag?: string;
  value?: string;
  positional?: string;
  raw: string;
}

/**
 * Splits `args` into flags and positional arguments. `valueFlags` names the flags that
 * take a value (`--module users` as well as `--module=users`).
 */
export function tokenize(args: readonly string[], valueFlags: ReadonlySet<string>): Token[] {
  const tokens: Token[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--") {
      for (const rest of args.slice(i + 1)) tokens.push({ positional: rest, raw: rest });
      break;
    }
    if (arg.startsWith("--") && arg.length > 2) {
      const equals = arg.indexOf("=");
      const name = equals < 0 ? arg.slice(2) : arg.slice(2, equals);
      if (equals >= 0) tokens.push({ flag: name, value: arg.slice(equals + 1), raw: arg });
      else if (valueFlags.has(name) && i + 1 < args.length) {
        tokens.push({ flag: name, value: args[++i], raw: arg });
      } else tokens.push({ flag: name, raw: arg });
    } else if (arg.startsWith("-") && arg.length === 2 && arg !== "--") {
      tokens.push({ flag: arg.slice(1), raw: arg, value: undefined });
    } else tokens.push({ positional: arg, raw: arg });
  }
  return tokens;
}

/** True when a token asks for help. */
export function isHelp(token: Token): boolean {
  return token.flag === "help" || token.flag === "h";
}

/**
 * Checks the flags and arguments of `command` and returns them parsed.
 *
 * @throws {UsageError} On an unknown or repeated flag, a missing value or argument, or an
 *   extra argument.
 */
export function parseCommand<C>(
  path: string,
  command: CommandSpec<C>,
  tokens: readonly Token[],
): ParsedCommand {
  const flags = new Map<string, string[]>();
  const args: string[] = [];
  const specs = [...command.flags, HELP_FLAG];
  for (const token of tokens) {
    if (token.positional !== undefined) {
      args.push(token.positional);
      continue;
    }
    const spec = specs.find((f) => f.name === token.flag || f.short === token.flag);
    if (spec === undefined) {
      const known = specs.map((f) => `--${f.name}`);
      const hint = suggest(`--${token.flag}`, known);
      throw new UsageError(
        `Unknown flag '${token.raw}' for '${path}'.` +
          (hint === undefined ? "" : ` Did you mean '${hint}'?`) +
          ` Run '${PROGRAM} ${path} --help' to see its flags`,
      );
    }
    if (spec.value === undefined && token.value !== undefined) {
      throw new UsageError(
        `Flag '--${spec.name}' takes no value; got '${token.raw}'. Write '--${spec.name}' alone`,
      );
    }
    if (spec.value !== undefined && token.value === undefined) {
      throw new UsageError(
        `Flag '--${spec.name}' needs a value: write '--${spec.name} ${spec.value}'`,
      );
    }
    const values = flags.get(spec.name) ?? [];
    if (values.length > 0 && spec.repeatable !== true) {
      throw new UsageError(
        `Flag '--${spec.name}' is given twice for '${path}'; give it once`,
      );
    }
    values.push(token.value ?? "");
    flags.set(spec.name, values);
  }
  const usage = usageLine(path, command);
  for (const [index, arg] of command.args.entries()) {
    if (arg.required && args[index] === undefined) {
      throw new UsageError(
        `Missing ${arg.what}: type '${usage}'. Run '${PROGRAM} ${path} --help' for more`,
      );
    }
  }
  if (args.length > command.args.length) {
    const extra = args[command.args.length];
    throw new UsageError(
      `Unexpected argument '${extra}' for '${path}': type '${usage}'. ` +
        `Run '${PROGRAM} ${path} --help' for more`,
    );
  }
  return { args, flags };
}

/** `pgdbm migrate create NAME`: the words to type, without the flags. */
export function usageLine<C>(path: string, command: CommandSpec<C>): string {
  const args = command.args.map((a) => (a.required ? a.name : `[${a.name}]`));
  return [PROGRAM, path, ...args].join(" ");
}

/** The help screen of one command. */
export function commandHelp<C>(path: string, command: CommandSpec<C>): string {
  const lines = [`Usage: ${usageLine(path, command)} [flags]`, "", command.summary];
  if (command.details !== undefined) lines.push("", command.details);
  const flags = [...command.flags, HELP_FLAG];
  lines.push("", "Flags:");
  const labels = flags.map((f) =>
    (f.short === undefined ? "    " : `-${f.short}, `) +
    `--${f.name}${f.value === undefined ? "" : ` ${f.value}`}`
  );
  const width = Math.max(...labels.map((l) => l.length));
  for (const [i, flag] of flags.entries()) {
    lines.push(`  ${labels[i].padEnd(width)}  ${flag.description}`);
  }
  if (command.example !== undefined) lines.push("", "Example:", `  ${command.example}`);
  return lines.join("\n") + "\n";
}

/** The help screen of a group: its commands. */
export function groupHelp<C>(group: GroupSpec<C>): string {
  const width = Math.max(...group.commands.map((c) => c.name.length));
  const lines = [
    `Usage: ${PROGRAM} ${group.name} <command> [flags]`,
    "",
    group.summary,
    "",
    "Commands:",
    ...group.commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    "",
    `Run '${PROGRAM} ${group.name} <command> --help' for a command's flags.`,
  ];
  return lines.join("\n") + "\n";
}
