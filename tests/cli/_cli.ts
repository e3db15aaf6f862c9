/**
 * Running the pgdbm CLI as the real command (`deno run -A src/cli/mod.ts …`) in temporary
 * directories, against the test server, for the CLI tests.
 */
import assert from "node:assert/strict";
import { cp } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { observe, TEST_URL } from "../_support/server.ts";

/** The CLI's entry point. */
export const CLI: string = fileURLToPath(new URL("../../src/cli/mod.ts", import.meta.url));
/** The project's deno.json (the child uses its import map). */
export const DENO_JSON: string = fileURLToPath(new URL("../../deno.json", import.meta.url));
/** Migration folders and configurations for the CLI tests. */
export const FIXTURES: string = fileURLToPath(new URL("../fixtures/cli/", import.meta.url));

/** The variables the child keeps from this process (Deno's cache, PATH); nothing else. */
export function baseEnv(): Record<string, string> {
  const env: Record<string, string> = { NO_COLOR: "1" };
  for (const name of ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  return env;
}

/** What a finished CLI run printed, and its exit code. */
export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the CLI in `cwd` with `DATABASE_URL` set to the test server unless `env` says otherwise. */
export async function cli(
  cwd: string,
  args: string[],
  env: Record<string, string | undefined> = { DATABASE_URL: TEST_URL },
): Promise<Run> {
  const childEnv = baseEnv();
  for (const [name, value] of Object.entries(env)) if (value !== undefined) childEnv[name] = value;
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--config", DENO_JSON, CLI, ...args],
    cwd,
    env: childEnv,
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/** Runs `fn` in a fresh temporary directory, removed afterwards. */
export async function inTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_cli_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Copies fixture folders into `dir/migrations/<name>`. */
export async function copyFixtures(dir: string, ...names: string[]): Promise<void> {
  for (const name of names) {
    await cp(join(FIXTURES, name), join(dir, "migrations", name), { recursive: true });
  }
}

/** Drops schemas (and everything in them) if they exist. */
export async function dropSchemas(...schemas: string[]): Promise<void> {
  await observe(async (sql) => {
    for (const schema of schemas) await sql.unsafe(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  });
}

/** True when the server has a database of that name. */
export async function databaseExists(name: string): Promise<boolean> {
  return await observe(async (sql) =>
    (await sql`SELECT 1 FROM pg_database WHERE datname = ${name}`).length === 1
  );
}

/** Drops a database if it exists, ending its sessions. */
export async function dropDatabase(name: string): Promise<void> {
  await observe((sql) => sql.unsafe(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`));
}

/** The test URL with another database. */
export function urlOf(database: string): string {
  const url = new URL(TEST_URL);
  url.pathname = `/${database}`;
  return url.toString();
}

/** stdout parsed as the one JSON document it must be. */
export function parseJson(run: Run): Record<string, unknown> {
  try {
    return JSON.parse(run.stdout);
  } catch {
    assert.fail(`stdout is not one JSON document:\n${run.stdout}\nstderr:\n${run.stderr}`);
  }
}
