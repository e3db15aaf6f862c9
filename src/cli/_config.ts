/**
 * The configuration of the pgdbm CLI: `pgdbm.json` (environments and modules), where the
 * database URL comes from, the order of the modules, and URLs made safe to print.
 *
 * @module
 */

import { dirname, isAbsolute, resolve } from "node:path";
import { UsageError } from "./_args.ts";
import { maskPasswords } from "../_secrets.ts";
import { suggest } from "../_suggest.ts";
import type { MigrationLockMode } from "../migrate/migrator.ts";
import { assertIdentifier } from "../template.ts";

/** The name of the configuration file looked for in the working directory. */
export const CONFIG_FILE = "pgdbm.json";

/** One module: a folder of migrations applied to a schema. */
export interface CliModule {
  /** The module name (the history's `module_name`). */
  name: string;
  /** An absolute directory path, or a `file:`/`https:` URL. */
  migrationsPath: string;
  /** The schema, or `undefined` for the connection's default schema. */
  schema?: string;
  /** Modules whose migrations must be applied first. */
  dependsOn: string[];
  /** The history table. */
  migrationsTable?: string;
  /** The Migrator's `lock` (`"transaction"` behind PgBouncer in transaction mode). */
  lock?: MigrationLockMode;
}

/** `pgdbm.json` read and checked. */
export interface CliConfig {
  /** The absolute path of the file, or `undefined` when there is none. */
  path?: string;
  /** Environment name → its `url` as written (`postgres://…` or `env:VAR`). */
  environments: Map<string, string | undefined>;
  /** The modules, in the file's order (empty when the file declares none). */
  modules: CliModule[];
  /** The top-level `lock`: the default of every module (and of `--path` modules). */
  lock?: MigrationLockMode;
}

/** Where the database URL came from. */
export interface ResolvedUrl {
  /** The URL (with its password: never print it, print {@link maskUrl}'s result). */
  url: string;
  /** Where it came from, for messages: `DATABASE_URL`, `environment 'prod' of pgdbm.json`… */
  source: string;
}

const TOP_KEYS = ["$schema", "environments", "modules", "migrationsTable", "lock"];
const ENVIRONMENT_KEYS = ["url"];
const MODULE_KEYS = ["migrationsPath", "schema", "dependsOn", "migrationsTable", "lock"];
const LOCK_MODES: readonly string[] = ["session", "transaction"];
const URL_SCHEME = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//;

/**
 * Reads `pgdbm.json` from `explicitPath` (which must exist), or from `cwd` when it is
 * there; no file gives an empty configuration. `origin` names where `explicitPath` came
 * from (`--config`, `PGDBM_CONFIG`) for the message when it cannot be read.
 *
 * @throws {UsageError} When the file is missing (explicit path), not JSON, or invalid.
 */
export async function loadConfig(
  cwd: string,
  explicitPath?: string,
  origin = "--config",
): Promise<CliConfig> {
  const path = explicitPath === undefined ? resolve(cwd, CONFIG_FILE) : resolve(cwd, explicitPath);
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (explicitPath === undefined && error instanceof Deno.errors.NotFound) {
      return { environments: new Map(), modules: [] };
    }
    const reason = error instanceof Deno.errors.NotFound
      ? "the file does not exist"
      : error instanceof Error
      ? error.message
      : String(error);
    throw new UsageError(
      `Cannot read the configuration '${path}': ${reason}; check the path given to ${origin}`,
    );
  }
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (error) {
    throw new UsageError(
      `Cannot read the configuration '${path}': it is not valid JSON ` +
        `(${error instanceof Error ? error.message : String(error)})`,
    );
  }
  return checkConfig(data, path);
}

function checkConfig(data: unknown, path: string): CliConfig {
  const where = `'${path}'`;
  const top = objectAt(data, where, "the file");
  checkKeys(top, TOP_KEYS, where, "the top level");
  const tableDefault = optionalTable(top.migrationsTable, where, "'migrationsTable'");
  const lockDefault = optionalLock(top.lock, where, "'lock'");
  const environments = new Map<string, string | undefined>();
  if (top.environments !== undefined) {
    const record = objectAt(top.environments, where, "'environments'");
    for (const [name, value] of Object.entries(record)) {
      const env = objectAt(value, where, `environment '${name}'`);
      checkKeys(env, ENVIRONMENT_KEYS, where, `environment '${name}'`);
      if (env.url !== undefined && (typeof env.url !== "string" || env.url.trim() === "")) {
        throw new UsageError(
          `Cannot use ${where}: 'url' of environment '${name}' must be a URL such as ` +
            `"postgres://user@localhost:5432/app" or "env:DATABASE_URL"`,
        );
      }
      environments.set(name, env.url as string | undefined);
    }
  }
  const modules: CliModule[] = [];
  if (top.modules !== undefined) {
    const record = objectAt(top.modules, where, "'modules'");
    for (const [name, value] of Object.entries(record)) {
      checkModuleName(name, where);
      const entry = objectAt(value, where, `module '${name}'`);
      checkKeys(entry, MODULE_KEYS, where, `module '${name}'`);
      const rawPath = entry.migrationsPath ?? `migrations/${name}`;
      if (typeof rawPath !== "string" || rawPath.trim() === "") {
        throw new UsageError(
          `Cannot use ${where}: 'migrationsPath' of module '${name}' must be a folder path ` +
            `(relative to the file) or a file:/https: URL; got ${JSON.stringify(rawPath)}`,
        );
      }
      const dependsOn = entry.dependsOn ?? [];
      if (!Array.isArray(dependsOn) || dependsOn.some((d) => typeof d !== "string")) {
        throw new UsageError(
          `Cannot use ${where}: 'dependsOn' of module '${name}' must be a list of module ` +
            `names such as ["users"]; got ${JSON.stringify(dependsOn)}`,
        );
      }
      const module: CliModule = {
        name,
        migrationsPath: URL_SCHEME.test(rawPath) ? rawPath : resolve(dirname(path), rawPath),
        dependsOn: [...new Set(dependsOn as string[])],
      };
      if (entry.schema !== undefined && entry.schema !== null) {
        module.schema = checkSchema(entry.schema, `${where}, module '${name}'`);
      }
      const table = optionalTable(entry.migrationsTable, where, `'migrationsTable' of '${name}'`) ??
        tableDefault;
      if (table !== undefined) module.migrationsTable = table;
      const lock = optionalLock(entry.lock, where, `'lock' of '${name}'`) ?? lockDefault;
      if (lock !== undefined) module.lock = lock;
      modules.push(module);
    }
    orderModules(modules, path);
  }
  const config: CliConfig = { path, environments, modules };
  if (lockDefault !== undefined) config.lock = lockDefault;
  return config;
}

function objectAt(value: unknown, where: string, what: string): Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new UsageError(`Cannot use ${where}: ${what} must be a JSON object`);
  }
  return value as Record<string, unknown>;
}

function checkKeys(
  record: Record<string, unknown>,
  allowed: readonly string[],
  where: string,
  what: string,
): void {
  for (const key of Object.keys(record)) {
    if (allowed.includes(key)) continue;
    const hint = suggest(key, allowed);
    throw new UsageError(
      `Cannot use ${where}: unknown key '${key}' in ${what}` +
        (hint === undefined ? "" : `; did you mean '${hint}'?`) +
        ` Known keys: ${allowed.map((k) => `'${k}'`).join(", ")}`,
    );
  }
}

function checkModuleName(name: string, where: string): void {
  if (name.trim() === "" || name.length > 100) {
    throw new UsageError(
      `Cannot use ${where}: module names must be 1 to 100 characters; got '${name}'`,
    );
  }
}

function optionalTable(value: unknown, where: string, what: string): string | undefined {
  if (value === undefined) return undefined;
  try {
    assertIdentifier(value, "table");
  } catch (error) {
    throw new UsageError(`Cannot use ${where}: ${what} is invalid. ${(error as Error).message}`);
  }
  return value;
}

function optionalLock(value: unknown, where: string, what: string): MigrationLockMode | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "string" || !LOCK_MODES.includes(value)) {
    throw new UsageError(
      `Cannot use ${where}: ${what} must be "session" (the default) or "transaction" (for a ` +
        `URL through PgBouncer in transaction mode); got ${JSON.stringify(value)}`,
    );
  }
  return value as MigrationLockMode;
}

/**
 * Checks a schema name.
 *
 * @throws {UsageError} When it is not an identifier.
 */
export function checkSchema(value: unknown, where: string): string {
  try {
    assertIdentifier(value, "schema");
  } catch (error) {
    throw new UsageError(`Cannot use the schema of ${where}: ${(error as Error).message}`);
  }
  return value;
}

/**
 * Orders modules so every module comes after the modules it depends on (otherwise the
 * file's order).
 *
 * @throws {UsageError} When a dependency is not a module, or the dependencies form a cycle.
 */
export function orderModules(modules: readonly CliModule[], path: string): CliModule[] {
  const byName = new Map(modules.map((m) => [m.name, m]));
  const names = modules.map((m) => m.name);
  for (const module of modules) {
    for (const dependency of module.dependsOn) {
      if (byName.has(dependency)) continue;
      const hint = suggest(dependency, names);
      throw new UsageError(
        `Cannot use '${path}': module '${module.name}' depends on '${dependency}', which is ` +
          `not a module there` + (hint === undefined ? "" : ` (did you mean '${hint}'?)`) +
          `. Its modules: ${names.map((n) => `'${n}'`).join(", ")}`,
      );
    }
  }
  const done = new Set<string>();
  const visiting: string[] = [];
  const order: CliModule[] = [];
  const visit = (module: CliModule): void => {
    if (done.has(module.name)) return;
    const at = visiting.indexOf(module.name);
    if (at >= 0) {
      const cycle = [...visiting.slice(at), module.name].map((n) => `'${n}'`).join(" → ");
      throw new UsageError(
        `Cannot order the modules of '${path}': their dependencies form a cycle: ${cycle}. ` +
          `Remove one of these 'dependsOn' entries`,
      );
    }
    visiting.push(module.name);
    for (const dependency of module.dependsOn) visit(byName.get(dependency)!);
    visiting.pop();
    done.add(module.name);
    order.push(module);
  };
  for (const module of modules) visit(module);
  return order;
}

/**
 * The modules named by `names` and everything they depend on, dependencies first; every
 * module when `names` is empty.
 *
 * @throws {UsageError} When a name is not a module of the configuration.
 */
export function selectModules(config: CliConfig, names: readonly string[]): CliModule[] {
  const ordered = orderModules(config.modules, config.path ?? CONFIG_FILE);
  if (names.length === 0) return ordered;
  const byName = new Map(ordered.map((m) => [m.name, m]));
  const wanted = new Set<string>();
  const add = (name: string): void => {
    if (wanted.has(name)) return;
    wanted.add(name);
    for (const dependency of byName.get(name)!.dependsOn) add(dependency);
  };
  for (const name of names) {
    if (!byName.has(name)) throw unknownModule(config, name);
    add(name);
  }
  return ordered.filter((m) => wanted.has(m.name));
}

/** The error for a `--module` that the configuration does not declare. */
export function unknownModule(config: CliConfig, name: string): UsageError {
  const names = config.modules.map((m) => m.name);
  const hint = suggest(name, names);
  return new UsageError(
    `Unknown module '${name}'.` + (hint === undefined ? "" : ` Did you mean '${hint}'?`) +
      ` The modules of '${config.path}': ${names.map((n) => `'${n}'`).join(", ")}`,
  );
}

/**
 * The database URL: `DATABASE_URL` when set, else the `url` of the environment (`--env`,
 * else `PGDBM_ENV`, else `default`) of the configuration.
 *
 * @throws {UsageError} When the environment is unknown, its variable is not set, or there
 *   is no URL at all (the message says what to set).
 */
export function resolveUrl(
  config: CliConfig,
  envFlag: string | undefined,
  env: (name: string) => string | undefined,
): ResolvedUrl {
  const chosen = envFlag ?? nonEmpty(env("PGDBM_ENV"));
  const name = chosen ?? "default";
  const file = config.path ?? CONFIG_FILE;
  if (chosen !== undefined && !config.environments.has(name)) {
    const names = [...config.environments.keys()];
    const hint = suggest(name, names);
    throw new UsageError(
      config.path === undefined
        ? `Unknown environment '${name}': there is no ${CONFIG_FILE} here to declare it; ` +
          `create one or pass --config PATH`
        : `Unknown environment '${name}'.` +
          (hint === undefined ? "" : ` Did you mean '${hint}'?`) +
          ` The environments of '${file}': ` +
          (names.length === 0 ? "none" : names.map((n) => `'${n}'`).join(", ")),
    );
  }
  const direct = nonEmpty(env("DATABASE_URL"));
  if (direct !== undefined) {
    const overriding = config.environments.has(name) && config.environments.get(name) !== undefined
      ? `, overriding environment '${name}'`
      : "";
    return { url: direct, source: `DATABASE_URL${overriding}` };
  }
  const written = config.environments.get(name);
  if (written !== undefined) {
    if (written.startsWith("env:")) {
      const variable = written.slice(4);
      const value = nonEmpty(env(variable));
      if (value === undefined) {
        throw new UsageError(
          `No database URL: environment '${name}' of '${file}' reads it from the variable ` +
            `${variable}, which is not set. Set ${
              variable === "DATABASE_URL" ? variable : `${variable} (or DATABASE_URL)`
            } to a URL such as ` +
            `postgres://user@localhost:5432/app`,
        );
      }
      return { url: value, source: `${variable} (environment '${name}' of '${file}')` };
    }
    return { url: written, source: `environment '${name}' of '${file}'` };
  }
  throw new UsageError(
    `No database URL: set DATABASE_URL to a URL such as postgres://user@localhost:5432/app, ` +
      `or give ${CONFIG_FILE} an environment: ` +
      `{ "environments": { "default": { "url": "env:MY_DATABASE_URL" } } }` +
      (config.environments.size > 0
        ? ` (it has ${
          [...config.environments.keys()].map((n) => `'${n}'`).join(", ")
        }; pick one with --env NAME)`
        : ""),
  );
}

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value.trim() === "" ? undefined : value;
}

/**
 * The URL with its passwords (see {@link maskPasswords}) replaced by `****`, safe to print.
 */
export function maskUrl(url: string): string {
  return maskPasswords(url, "****");
}

/**
 * Parses a `postgres://` URL of a server.
 *
 * @throws {UsageError} Naming what could not be done (`what`) when the URL is not one.
 */
export function parseNetworkUrl(url: string, what: string): URL {
  let parsed: URL | undefined;
  try {
    parsed = new URL(url);
  } catch {
    parsed = undefined;
  }
  if (parsed === undefined || !/^postgres(ql)?:$/.test(parsed.protocol)) {
    throw new UsageError(
      `Cannot ${what}: the database URL ${maskUrl(url)} is not a postgres:// URL of a server`,
    );
  }
  return parsed;
}

/** The database a URL names, or `undefined` when it names none. */
export function databaseOfUrl(url: string): string | undefined {
  const parsed = parseNetworkUrl(url, "find the database name");
  const fromPath = decodeURIComponent(parsed.pathname.slice(1));
  return fromPath !== "" ? fromPath : parsed.searchParams.get("dbname") ?? undefined;
}

/**
 * The URL of the same server and user with another database (the maintenance database
 * that `CREATE DATABASE` and `DROP DATABASE` run from).
 *
 * @throws {UsageError} When the URL is not a `postgres://` URL.
 */
export function withDatabase(url: string, database: string): string {
  const parsed = parseNetworkUrl(url, `connect to the '${database}' database`);
  parsed.pathname = `/${encodeURIComponent(database)}`;
  parsed.searchParams.delete("dbname");
  return parsed.toString();
}

/** The module described by `--module`, `--path` and `--schema` (no pgdbm.json modules). */
export function adHocModule(
  cwd: string,
  flags: {
    module?: string;
    path?: string;
    schema?: string;
    table?: string;
    lock?: MigrationLockMode;
  },
): CliModule {
  const name = flags.module ?? "default";
  if (name.trim() === "" || name.length > 100) {
    throw new UsageError(`Cannot use --module '${name}': use 1 to 100 characters`);
  }
  const rawPath = flags.path ?? "./migrations";
  const module: CliModule = {
    name,
    migrationsPath: URL_SCHEME.test(rawPath) || isAbsolute(rawPath)
      ? rawPath
      : resolve(cwd, rawPath),
    dependsOn: [],
  };
  if (flags.schema !== undefined) module.schema = checkSchema(flags.schema, "--schema");
  if (flags.table !== undefined) {
    module.migrationsTable = optionalTable(flags.table, "--migrations-table", "the value");
  }
  if (flags.lock !== undefined) module.lock = flags.lock;
  return module;
}
