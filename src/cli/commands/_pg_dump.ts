/**
 * `pgdbm schema dump`: the database's DDL through PostgreSQL's own `pg_dump`, when it is
 * installed. The password goes to `pg_dump` in `PGPASSWORD`, never on its command line.
 *
 * @module
 */

import type { ParsedCommand } from "../_args.ts";
import {
  type CliContext,
  CommandFailure,
  databaseUrl,
  flagValue,
  readConfig,
} from "../_context.ts";
import { maskUrl, parseNetworkUrl } from "../_config.ts";
import { checkName } from "./db.ts";

/** What to install when `pg_dump` is missing. */
const INSTALL_HINT = "Install PostgreSQL's client tools, of the server's major version or newer " +
  "(Debian/Ubuntu: 'apt-get install postgresql-client'; macOS: 'brew install libpq'; Windows: " +
  "the PostgreSQL installer), or pass --pg-dump PATH";

/** The URL without its password, and the password (for `PGPASSWORD`). */
function splitPassword(url: string): { url: string; password?: string } {
  const parsed = parseNetworkUrl(url, "run pg_dump (the embedded engine has none)");
  const password = parsed.password !== ""
    ? decodeURIComponent(parsed.password)
    : parsed.searchParams.get("password") ?? undefined;
  parsed.password = "";
  parsed.searchParams.delete("password");
  return password === undefined ? { url: parsed.toString() } : { url: parsed.toString(), password };
}

/** Runs `pg_dump --schema-only` on the configured database; its output goes to stdout. */
export async function dump(context: CliContext, input: ParsedCommand): Promise<number> {
  const config = await readConfig(context, input);
  const target = databaseUrl(context, config, input);
  const schema = flagValue(input, "schema");
  if (schema !== undefined) checkName(schema, "schema");
  const output = flagValue(input, "output");
  const program = flagValue(input, "pg-dump") ?? "pg_dump";
  const { url, password } = splitPassword(target.url);
  const args = ["--schema-only", `--dbname=${url}`];
  if (schema !== undefined) args.push(`--schema=${schema}`);
  if (output !== undefined) args.push(`--file=${output}`);
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(program, {
      args,
      cwd: context.io.cwd,
      env: password === undefined ? {} : { PGPASSWORD: password },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new CommandFailure(
        new Error(
          `Cannot dump the schema: ${
            program === "pg_dump"
              ? "pg_dump is not installed (not found on PATH)"
              : `'${program}' does not exist`
          }. ${INSTALL_HINT}`,
        ),
        { program },
      );
    }
    throw error;
  }
  const stop = (): void => {
    try {
      child.kill("SIGTERM");
    } catch {
      // It has exited already.
    }
  };
  context.signal.addEventListener("abort", stop, { once: true });
  try {
    const [status, , errors] = await Promise.all([
      child.status,
      (async () => {
        for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
          context.io.stdout(text);
        }
      })(),
      new Response(child.stderr).text(),
    ]);
    if (context.signal.aborted) throw context.signal.reason;
    if (!status.success) {
      throw new CommandFailure(
        new Error(
          `pg_dump failed (exit code ${status.code}) on ${maskUrl(target.url)}: ` +
            (errors.trim() || "it printed nothing") +
            (/version mismatch/.test(errors) ? `. ${INSTALL_HINT}` : ""),
        ),
        { program },
      );
    }
    if (errors.trim() !== "") context.out.error(errors.trimEnd());
  } finally {
    context.signal.removeEventListener("abort", stop);
  }
  if (output !== undefined) {
    context.out.error(
      `Wrote the schema${schema === undefined ? "" : ` of '${schema}'`} of ` +
        `${maskUrl(target.url)} to ${output}.`,
    );
  }
  return 0;
}
