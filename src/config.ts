/**
 * `DatabaseConfig`: the options of a pool or standalone manager, their defaults, and their
 * validation. Precedence, field by field: option > connection string > environment > default.
 *
 * @module
 */

import { ConfigurationError } from "./errors.ts";
import type { QueryHook } from "./query_event.ts";
import { assertIdentifier } from "./template.ts";
import { maskPasswords } from "./_secrets.ts";
import { suggest } from "./_suggest.ts";

/** TLS verification modes, as in libpq's `sslmode`. */
export type SslMode = "require" | "verify-ca" | "verify-full";

/** TLS options. Each of `ca`, `cert`, `key` is a PEM string or a path to a PEM file. */
export interface SslConfig {
  /** `require` encrypts without verifying; `verify-ca` checks the chain; `verify-full` also the host name. */
  mode: SslMode;
  /** CA certificate(s) that sign the server's certificate. */
  ca?: string;
  /** Client certificate. */
  cert?: string;
  /** Client private key. */
  key?: string;
  /** Passphrase of an encrypted `key`. */
  keyPassword?: string;
}

/** Retry policy for opening connections. */
export interface RetryConfig {
  /**
   * Attempts in all (1 means no retry).
   * @default {3}
   */
  attempts: number;
  /**
   * Delay before the second attempt.
   * @default {1000}
   */
  delayMs: number;
  /**
   * Factor the delay grows by after each failed attempt.
   * @default {2}
   */
  backoff: number;
  /**
   * Upper bound of any delay.
   * @default {30000}
   */
  maxDelayMs: number;
}

/** Where pgdbm writes its few warnings (such as a second standalone pool to one database). */
export interface Logger {
  /** Receives a warning. */
  warn(message: string): void;
}

/**
 * Options of a pool or a standalone {@link DatabaseManager}. Either `connectionString` or
 * the parts (`host`, `port`, `database`, `user`, `password`).
 *
 * A `connectionString` of `pglite:memory` (or `pglite:<directory>`) runs on the embedded
 * PostgreSQL (PGlite) in this process instead of a server.
 *
 * @example Shared pool over a server
 * ```ts
 * import type { DatabaseConfig } from "@pgdbm/pgdbm";
 * const config: DatabaseConfig = {
 *   connectionString: "postgres://app@db.internal:5432/app?sslmode=verify-full",
 *   maxConnections: 20,
 *   serverSettings: { application_name: "billing" },
 * };
 * ```
 */
export interface DatabaseConfig {
  /** `postgres://user:password@host:port/database?sslmode=…`, or `pglite:memory`. */
  connectionString?: string;
  /**
   * Host name, address, or a Unix socket directory (a path starting with `/`).
   * @default {"localhost"}
   */
  host?: string;
  /**
   * Server port.
   * @default {5432}
   */
  port?: number;
  /**
   * Database name.
   * @default {"postgres"}
   */
  database?: string;
  /**
   * User name.
   * @default {"postgres"}
   */
  user?: string;
  /** Password; falls back to env `DB_PASSWORD`, then `PGPASSWORD`. Never shown in errors. */
  password?: string;
  /** Schema of a standalone manager. */
  schema?: string;
  /**
   * Connections opened at connect time and kept open. When left out it is 2, or
   * `maxConnections` when that is smaller.
   * @default {2}
   */
  minConnections?: number;
  /**
   * Connections never exceeded.
   * @default {10}
   */
  maxConnections?: number;
  /**
   * A connection is recycled after this many queries.
   * @default {50000}
   */
  maxQueries?: number;
  /**
   * Connections idle this long are closed (never below `minConnections`).
   * @default {300000}
   */
  idleTimeoutMs?: number;
  /**
   * Connections older than this are recycled.
   * @default {3600000}
   */
  maxLifetimeMs?: number;
  /**
   * Waiting for a free connection longer than this throws `PoolError`.
   * @default {30000}
   */
  acquireTimeoutMs?: number;
  /**
   * Default client-side query timeout; on expiry the query is cancelled on the server.
   * @default {60000}
   */
  commandTimeoutMs?: number;
  /**
   * Opening one connection longer than this counts as a failed attempt. It also bounds the
   * statements that set up a new connection, which `statementTimeoutMs` and `lockTimeoutMs`
   * do not.
   * @default {10000}
   */
  connectTimeoutMs?: number;
  /**
   * Server `statement_timeout`; `null` leaves the server's setting.
   * @default {60000}
   */
  statementTimeoutMs?: number | null;
  /**
   * Server `idle_in_transaction_session_timeout`; `null` leaves the server's setting.
   * @default {60000}
   */
  idleInTransactionSessionTimeoutMs?: number | null;
  /**
   * Server `lock_timeout`; `null` leaves the server's setting.
   * @default {5000}
   */
  lockTimeoutMs?: number | null;
  /**
   * Extra server settings for every connection (`application_name`, `timezone`…); `null`
   * sends nothing for that name, not even pgdbm's default (for PgBouncer, which refuses
   * startup settings it does not know: `{ jit: null }`).
   * @default {{ jit: "off" }}
   */
  serverSettings?: Record<string, string | null>;
  /**
   * SQL run on every new connection.
   * @default {[]}
   */
  initCommands?: string[];
  /** TLS; `sslmode=` in the connection string works too. Off by default. */
  ssl?: SslConfig;
  /** Retry policy for opening connections; fields left out keep their defaults. */
  retry?: Partial<RetryConfig>;
  /**
   * Named server-side prepared statements; `false` for PgBouncer in transaction mode.
   * @default {true}
   */
  prepare?: boolean;
  /**
   * Where warnings go.
   * @default {console}
   */
  logger?: Logger;
  /**
   * Called after every statement a manager, transaction or connection runs, with the
   * expanded SQL, the parameters masked, its duration and row count (see `QueryMonitor` in
   * `@pgdbm/pgdbm/monitoring` for history and slow queries). It must not throw; it runs on
   * the query path, so keep it cheap.
   */
  onQuery?: QueryHook;
  /**
   * Connection strings of streaming replicas. Reads outside transactions (`fetchOne`,
   * `fetchAll`, `fetchValue`, `fetchAsModel`, `fetchAllAsModel`) go to a healthy one, round
   * robin; everything else goes to the primary. Every other option is the primary's.
   * @default {[]}
   */
  replicas?: string[];
  /**
   * A replica whose replay lags the primary by more than this is skipped until it catches
   * up; left out, lag is not checked.
   */
  maxReplicaLagMs?: number;
  /**
   * A replica that failed is skipped this long, then tried again.
   * @default {5000}
   */
  replicaRetryMs?: number;
}

/**
 * TLS options with the PEM contents read. `key` and `keyPassword` are non-enumerable, so
 * printing the object does not show them.
 */
export interface ResolvedSsl {
  /** The verification mode. */
  mode: SslMode;
  /** PEM text of the CA certificate(s). */
  ca?: string;
  /** PEM text of the client certificate. */
  cert?: string;
  /** PEM text of the client key. */
  key?: string;
  /** Passphrase of the key. */
  keyPassword?: string;
}

/**
 * A configuration with every default applied and every value checked, as made by
 * {@link resolveConfig}.
 *
 * `password`, and `ssl.key` / `ssl.keyPassword`, are non-enumerable properties so that
 * printing or serializing the object never shows them. Read them by name; a spread
 * (`{ ...resolved }`) or `structuredClone` drops them.
 */
export interface ResolvedConfig {
  /** `network` for a server, `embedded` for PGlite. */
  kind: "network" | "embedded";
  /** PGlite data directory, or `undefined` for memory (embedded only). */
  embeddedDataDir?: string;
  /** Host name, address, or Unix socket directory. */
  host: string;
  /** Port. */
  port: number;
  /** Database name. */
  database: string;
  /** User name. */
  user: string;
  /** Password, or `undefined`. Non-enumerable; never put into messages. */
  password?: string;
  /** Standalone schema, validated. */
  schema?: string;
  /** Pool floor. */
  minConnections: number;
  /** Pool cap. */
  maxConnections: number;
  /** Queries before a connection is recycled. */
  maxQueries: number;
  /** Idle close delay. */
  idleTimeoutMs: number;
  /** Connection lifetime. */
  maxLifetimeMs: number;
  /** Wait limit for a connection. */
  acquireTimeoutMs: number;
  /** Default query timeout. */
  commandTimeoutMs: number;
  /** Limit for opening one connection. */
  connectTimeoutMs: number;
  /** Every server setting sent at connection start (timeouts, `jit`, `application_name`…). */
  serverSettings: Record<string, string>;
  /** SQL run on every new connection. */
  initCommands: string[];
  /** TLS, or `undefined` for none. */
  ssl?: ResolvedSsl;
  /** Retry policy. */
  retry: RetryConfig;
  /** Named prepared statements on or off. */
  prepare: boolean;
  /** Where warnings go. */
  logger: Logger;
  /** The statement hook, or `undefined`. */
  onQuery?: QueryHook;
  /** The replicas, each a full configuration (with no replicas of its own). */
  replicas: ResolvedConfig[];
  /** Lag beyond which a replica is skipped, or `undefined` (not checked). */
  maxReplicaLagMs?: number;
  /** How long a failed replica is skipped. */
  replicaRetryMs: number;
}

const PREFIX = "Cannot create the pool";
const MAX_TIMER_MS = 2_147_483_647;
const SETTING_NAME = /^[A-Za-z_][A-Za-z0-9_.]*$/;
const SSL_MODES: readonly SslMode[] = ["require", "verify-ca", "verify-full"];
const SSLMODES_WITHOUT_TLS: readonly string[] = ["disable", "allow", "prefer"];
const OPTION_NAMES: readonly string[] = [
  "connectionString",
  "host",
  "port",
  "database",
  "user",
  "password",
  "schema",
  "minConnections",
  "maxConnections",
  "maxQueries",
  "idleTimeoutMs",
  "maxLifetimeMs",
  "acquireTimeoutMs",
  "commandTimeoutMs",
  "connectTimeoutMs",
  "statementTimeoutMs",
  "idleInTransactionSessionTimeoutMs",
  "lockTimeoutMs",
  "serverSettings",
  "initCommands",
  "ssl",
  "retry",
  "prepare",
  "logger",
  "onQuery",
  "replicas",
  "maxReplicaLagMs",
  "replicaRetryMs",
];
const SSL_OPTION_NAMES: readonly string[] = ["mode", "ca", "cert", "key", "keyPassword"];
const RETRY_OPTION_NAMES: readonly string[] = ["attempts", "delayMs", "backoff", "maxDelayMs"];

/** What a `postgres://` connection string says; `sslMode: null` means "no TLS". */
interface UrlParts {
  host?: string;
  port?: string;
  database?: string;
  user?: string;
  password?: string;
  sslMode?: SslMode | null;
  sslRootCert?: string;
  sslCert?: string;
  sslKey?: string;
  sslPassword?: string;
  applicationName?: string;
}

/** A parsed connection string: a server, or the embedded PostgreSQL. */
type Target =
  | { kind: "network"; parts: UrlParts }
  | { kind: "embedded"; dataDir: string | undefined };

/**
 * Applies the defaults, the connection string and the environment to `config`, and checks
 * every value. Precedence, field by field: explicit option > connection string >
 * environment (`PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `DB_PASSWORD` then `PGPASSWORD`,
 * `PGSSLMODE`, `PGAPPNAME`) > default. The environment is read only where the `env`
 * permission is already granted (never prompted for), and not at all for `pglite:`.
 *
 * Connection strings are `postgres://` or `postgresql://` URLs with percent-encoded parts;
 * the host may be a Unix socket directory, percent-encoded (`%2Fvar%2Frun%2Fpostgresql`) or
 * given as `?host=/var/run/postgresql`. Query parameters `host`, `port`, `dbname`, `user`,
 * `password`, `sslmode`, `sslrootcert` (`system` for the system roots), `sslcert`, `sslkey`,
 * `sslpassword` and `application_name` are used; others (such as `options`) are ignored.
 * `pglite:memory` and `pglite:<directory>` select the embedded PostgreSQL.
 *
 * The result's `password` (and `ssl.key`, `ssl.keyPassword`) are non-enumerable, so
 * printing or serializing the result never shows them.
 *
 * @param config The options as the user wrote them.
 * @returns The configuration with every default applied.
 * @throws {ConfigurationError} When an option is unknown or invalid; `field` names it.
 * @throws {SchemaError} When `schema` is not a valid identifier (an empty string included).
 *
 * @example Resolve a connection string
 * ```ts
 * import { resolveConfig } from "./config.ts";
 * import assert from "node:assert/strict";
 * const config = resolveConfig({
 *   connectionString: "postgres://app:s3cret@db.internal:6432/shop?sslmode=require",
 *   maxConnections: 20,
 * });
 * assert.equal(config.host, "db.internal");
 * assert.equal(config.port, 6432);
 * assert.equal(config.ssl?.mode, "require");
 * assert.equal(config.serverSettings.jit, "off");
 * assert.ok(!JSON.stringify(config).includes("s3cret"));
 * ```
 */
export function resolveConfig(config: DatabaseConfig): ResolvedConfig {
  if (!isPlainObject(config)) {
    throw new ConfigurationError(
      "config",
      `${PREFIX}: the configuration must be an object such as ` +
        `{ connectionString: "postgres://…" }; got ${show(config)}`,
    );
  }
  checkKnownNames(config, OPTION_NAMES, "");
  const connectionString = stringOption(config, "connectionString");
  const target: Target | undefined = connectionString === undefined
    ? undefined
    : parseConnectionString(connectionString);
  const embedded = target?.kind === "embedded";
  const url = target?.kind === "network" ? target.parts : undefined;
  const env = embedded ? noEnv : readEnv;

  const host = stringOption(config, "host") ?? url?.host ?? env("PGHOST") ?? "localhost";
  const port = resolvePort(config.port, url?.port, env);
  const database = stringOption(config, "database") ?? url?.database ?? env("PGDATABASE") ??
    "postgres";
  const user = stringOption(config, "user") ?? url?.user ?? env("PGUSER") ?? "postgres";
  const password = passwordOption(config.password) ?? url?.password ?? env("DB_PASSWORD") ??
    env("PGPASSWORD");

  let schema: string | undefined;
  if (config.schema !== undefined && config.schema !== null) {
    assertIdentifier(config.schema, "schema");
    schema = config.schema;
  }

  const maxConnections = integerOption(config, "maxConnections", 1) ?? 10;
  const minConnections = integerOption(config, "minConnections", 0) ??
    Math.min(2, maxConnections);
  if (minConnections > maxConnections) {
    throw new ConfigurationError(
      "minConnections",
      `${PREFIX}: 'minConnections' must not exceed 'maxConnections'; got ` +
        `${minConnections} > ${maxConnections}`,
    );
  }

  const statementTimeoutMs = serverTimeoutOption(config, "statementTimeoutMs", 60_000);
  const idleInTransactionMs = serverTimeoutOption(
    config,
    "idleInTransactionSessionTimeoutMs",
    60_000,
  );
  const lockTimeoutMs = serverTimeoutOption(config, "lockTimeoutMs", 5_000);
  const userSettings = serverSettingsOption(config.serverSettings);
  const serverSettings: Record<string, string> = {
    jit: "off",
    application_name: userSettings.application_name ?? url?.applicationName ??
      env("PGAPPNAME") ?? "pgdbm",
  };
  if (statementTimeoutMs !== null) serverSettings.statement_timeout = String(statementTimeoutMs);
  if (idleInTransactionMs !== null) {
    serverSettings.idle_in_transaction_session_timeout = String(idleInTransactionMs);
  }
  if (lockTimeoutMs !== null) serverSettings.lock_timeout = String(lockTimeoutMs);
  for (const [name, setting] of Object.entries(userSettings)) {
    if (setting === null) delete serverSettings[name];
    else serverSettings[name] = setting;
  }

  const resolved: ResolvedConfig = {
    kind: embedded ? "embedded" : "network",
    host,
    port,
    database,
    user,
    minConnections,
    maxConnections,
    maxQueries: integerOption(config, "maxQueries", 1) ?? 50_000,
    idleTimeoutMs: durationOption(config, "idleTimeoutMs") ?? 300_000,
    maxLifetimeMs: durationOption(config, "maxLifetimeMs") ?? 3_600_000,
    acquireTimeoutMs: durationOption(config, "acquireTimeoutMs") ?? 30_000,
    commandTimeoutMs: durationOption(config, "commandTimeoutMs") ?? 60_000,
    connectTimeoutMs: durationOption(config, "connectTimeoutMs") ?? 10_000,
    serverSettings,
    initCommands: initCommandsOption(config.initCommands),
    retry: retryOption(config.retry),
    prepare: booleanOption(config, "prepare") ?? true,
    logger: loggerOption(config.logger),
    replicas: [],
    replicaRetryMs: durationOption(config, "replicaRetryMs") ?? 5_000,
  };
  const onQuery = hookOption(config.onQuery);
  if (onQuery !== undefined) resolved.onQuery = onQuery;
  const maxReplicaLagMs = durationOption(config, "maxReplicaLagMs");
  if (maxReplicaLagMs !== undefined) resolved.maxReplicaLagMs = maxReplicaLagMs;
  if (target?.kind === "embedded" && target.dataDir !== undefined) {
    resolved.embeddedDataDir = target.dataDir;
  }
  if (schema !== undefined) resolved.schema = schema;
  const ssl = embedded ? undefined : resolveSsl(config.ssl, url, env);
  if (ssl !== undefined) resolved.ssl = ssl;
  Object.defineProperty(resolved, "password", { value: password, enumerable: false });
  resolved.replicas = replicasOption(config.replicas, resolved);
  return resolved;
}

/** Each replica: the primary's configuration with the replica's server, user and password. */
function replicasOption(value: unknown, primary: ResolvedConfig): ResolvedConfig[] {
  if (value === undefined) return [];
  if (!Array.isArray(value) || value.some((url) => typeof url !== "string")) {
    throw new ConfigurationError(
      "replicas",
      `${PREFIX}: 'replicas' must be an array of connection strings ` +
        `(["postgres://user@replica1/db"]); got ${show(value)}`,
    );
  }
  if (value.length > 0 && primary.kind === "embedded") {
    throw new ConfigurationError(
      "replicas",
      `${PREFIX}: 'replicas' cannot be used with the embedded PostgreSQL (pglite:); ` +
        "connect to a server to read from replicas",
    );
  }
  return value.map((url: string) => {
    let target: Target;
    try {
      target = parseConnectionString(url);
    } catch (error) {
      throw new ConfigurationError(
        "replicas",
        `${PREFIX}: a replica's connection string is invalid: ${(error as Error).message}`,
      );
    }
    if (target.kind !== "network") {
      throw new ConfigurationError(
        "replicas",
        `${PREFIX}: each of 'replicas' must be a postgres:// URL; got ${maskPasswords(url)}`,
      );
    }
    const parts = target.parts;
    const replica: ResolvedConfig = {
      ...primary,
      host: parts.host ?? primary.host,
      port: parts.port === undefined
        ? primary.port
        : checkPort(parsePort(parts.port), "'port' in a replica's connection string", parts.port),
      database: parts.database ?? primary.database,
      user: parts.user ?? primary.user,
      replicas: [],
    };
    Object.defineProperty(replica, "password", {
      value: parts.password ?? primary.password,
      enumerable: false,
    });
    return replica;
  });
}

function hookOption(value: unknown): QueryHook | undefined {
  if (value === undefined || typeof value === "function") return value as QueryHook | undefined;
  throw new ConfigurationError(
    "onQuery",
    `${PREFIX}: 'onQuery' must be a function (event) => void; got ${show(value)}`,
  );
}

/**
 * Describes where a configuration connects, safely for messages and logs: never the
 * password.
 *
 * @param config A resolved configuration.
 * @returns A URL without password, such as `postgres://postgres@127.0.0.1:5432/test`, or
 *   `pglite:memory` / `pglite:<directory>` for the embedded PostgreSQL.
 *
 * @example Describe a target
 * ```ts
 * import { describeTarget, resolveConfig } from "./config.ts";
 * import assert from "node:assert/strict";
 * const config = resolveConfig({ connectionString: "postgres://app:pw@127.0.0.1/shop" });
 * assert.equal(describeTarget(config), "postgres://app@127.0.0.1:5432/shop");
 * ```
 */
export function describeTarget(config: ResolvedConfig): string {
  if (config.kind === "embedded") return `pglite:${config.embeddedDataDir ?? "memory"}`;
  const host = config.host.startsWith("/")
    ? encodeURIComponent(config.host)
    : config.host.includes(":")
    ? `[${config.host}]`
    : config.host;
  return `postgres://${encodeURIComponent(config.user)}@${host}:${config.port}/` +
    encodeURIComponent(config.database);
}

/**
 * The identity of the database a configuration connects to, used to notice a second
 * standalone pool to the same database.
 *
 * @param config A resolved configuration.
 * @returns `host:port/database`, or `pglite:<directory>`; `undefined` for `pglite:memory`,
 *   since every in-memory engine is a database of its own.
 *
 * @example Compare two configurations
 * ```ts
 * import { poolKey, resolveConfig } from "./config.ts";
 * import assert from "node:assert/strict";
 * const a = resolveConfig({ connectionString: "postgres://a@db:5432/shop" });
 * const b = resolveConfig({ host: "db", database: "shop", user: "b" });
 * assert.equal(poolKey(a), "db:5432/shop");
 * assert.equal(poolKey(a), poolKey(b));
 * ```
 */
export function poolKey(config: ResolvedConfig): string | undefined {
  if (config.kind === "embedded") {
    // Every in-memory engine is a database of its own: never "the same database".
    return config.embeddedDataDir === undefined ? undefined : `pglite:${config.embeddedDataDir}`;
  }
  return `${config.host}:${config.port}/${config.database}`;
}

function parseConnectionString(text: string): Target {
  const colon = text.indexOf(":");
  const scheme = colon > 0 ? text.slice(0, colon).toLowerCase() : "";
  if (scheme === "pglite") {
    const path = text.slice(colon + 1);
    if (path === "") {
      throw new ConfigurationError(
        "connectionString",
        `${PREFIX}: 'connectionString' "pglite:" needs "memory" or a data directory, ` +
          `such as "pglite:memory" or "pglite:./data"`,
      );
    }
    return { kind: "embedded", dataDir: path === "memory" ? undefined : path };
  }
  if ((scheme !== "postgres" && scheme !== "postgresql") || !text.startsWith("//", colon + 1)) {
    const shown = scheme === "" ? "no scheme" : `the scheme "${scheme}:"`;
    throw new ConfigurationError(
      "connectionString",
      `${PREFIX}: 'connectionString' must start with "postgres://", "postgresql://" or ` +
        `"pglite:"; got ${shown}`,
    );
  }
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new ConfigurationError(
      "connectionString",
      `${PREFIX}: 'connectionString' is not a valid URL; got ${maskPasswords(text)}. ` +
        `Write postgres://user:password@host:port/database and percent-encode special ` +
        `characters`,
    );
  }
  const parts: UrlParts = {};
  let host = url.hostname;
  if (host.startsWith("[") && host.endsWith("]")) host = host.slice(1, -1);
  if (host.includes(",")) {
    throw new ConfigurationError(
      "connectionString",
      `${PREFIX}: 'connectionString' names several hosts; name exactly one`,
    );
  }
  setPart(parts, "host", decodeUrlPart(host, "host"));
  setPart(parts, "port", url.port);
  setPart(parts, "user", decodeUrlPart(url.username, "user name"));
  setPart(parts, "password", decodeUrlPart(url.password, "password"));
  setPart(parts, "database", decodeUrlPart(url.pathname.slice(1), "database name"));
  for (const pair of url.search.slice(1).split("&")) {
    if (pair === "") continue;
    const equals = pair.indexOf("=");
    const name = decodeUrlPart(equals < 0 ? pair : pair.slice(0, equals), "query");
    const value = equals < 0 ? "" : decodeUrlPart(pair.slice(equals + 1), "query");
    applyQueryParameter(parts, name, value);
  }
  return { kind: "network", parts };
}

function applyQueryParameter(parts: UrlParts, name: string, value: string): void {
  switch (name) {
    case "host":
      return setPart(parts, "host", value);
    case "port":
      return setPart(parts, "port", value);
    case "dbname":
      return setPart(parts, "database", value);
    case "user":
      return setPart(parts, "user", value);
    case "password":
      return setPart(parts, "password", value);
    case "application_name":
      return setPart(parts, "applicationName", value);
    case "sslmode":
      parts.sslMode = parseSslMode(value, "'sslmode' in the connection string");
      return;
    case "sslrootcert":
      return setPart(parts, "sslRootCert", value);
    case "sslcert":
      return setPart(parts, "sslCert", value);
    case "sslkey":
      return setPart(parts, "sslKey", value);
    case "sslpassword":
      return setPart(parts, "sslPassword", value);
  }
}

function setPart(
  parts: UrlParts,
  name: Exclude<keyof UrlParts, "sslMode">,
  value: string,
): void {
  if (value !== "") parts[name] = value;
}

/** Parses a libpq `sslmode`; `null` means no TLS. */
function parseSslMode(value: string, where: string): SslMode | null {
  if ((SSL_MODES as readonly string[]).includes(value)) return value as SslMode;
  if (SSLMODES_WITHOUT_TLS.includes(value)) return null;
  throw new ConfigurationError(
    "ssl",
    `${PREFIX}: ${where} must be one of ${[...SSLMODES_WITHOUT_TLS, ...SSL_MODES].join(", ")}; ` +
      `got ${show(value)}`,
  );
}

function decodeUrlPart(value: string, what: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    throw new ConfigurationError(
      "connectionString",
      `${PREFIX}: 'connectionString' has a malformed percent-encoding in its ${what}; ` +
        `encode "%" as "%25"`,
    );
  }
}

/** Reads an environment variable only when the `env` permission for it is granted. */
function readEnv(name: string): string | undefined {
  try {
    if (Deno.permissions.querySync({ name: "env", variable: name }).state !== "granted") {
      return undefined;
    }
    const value = Deno.env.get(name);
    return value === "" ? undefined : value;
  } catch {
    return undefined;
  }
}

function noEnv(_name: string): undefined {
  return undefined;
}

function resolvePort(
  option: unknown,
  fromUrl: string | undefined,
  env: (name: string) => string | undefined,
): number {
  if (option !== undefined) return checkPort(option, "'port'");
  if (fromUrl !== undefined) {
    return checkPort(parsePort(fromUrl), "'port' in the connection string", fromUrl);
  }
  const fromEnv = env("PGPORT");
  if (fromEnv !== undefined) {
    return checkPort(parsePort(fromEnv), "'port' from env PGPORT", fromEnv);
  }
  return 5432;
}

function parsePort(text: string): number {
  return /^\d{1,5}$/.test(text) ? Number(text) : NaN;
}

function checkPort(value: unknown, what: string, original: unknown = value): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 1 || value > 65535) {
    throw new ConfigurationError(
      "port",
      `${PREFIX}: ${what} must be an integer from 1 to 65535; got ${show(original)}`,
    );
  }
  return value;
}

function stringOption(config: DatabaseConfig, name: keyof DatabaseConfig): string | undefined {
  const value = config[name];
  if (value === undefined) return undefined;
  if (typeof value !== "string" || value === "") {
    throw new ConfigurationError(
      name,
      `${PREFIX}: '${name}' must be a non-empty string; got ${show(value)}`,
    );
  }
  return value;
}

function passwordOption(value: unknown): string | undefined {
  if (value === undefined || typeof value === "string") return value;
  throw new ConfigurationError(
    "password",
    `${PREFIX}: 'password' must be a string; got ${kindOf(value)}`,
  );
}

function integerOption(
  config: DatabaseConfig,
  name: keyof DatabaseConfig,
  min: number,
): number | undefined {
  const value = config[name];
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !Number.isInteger(value) || value < min) {
    throw new ConfigurationError(
      name,
      `${PREFIX}: '${name}' must be an integer ≥ ${min}; got ${show(value)}`,
    );
  }
  return value;
}

function durationOption(config: DatabaseConfig, name: keyof DatabaseConfig): number | undefined {
  const value = config[name];
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !(value > 0) || value > MAX_TIMER_MS) {
    throw new ConfigurationError(
      name,
      `${PREFIX}: '${name}' must be a number of milliseconds > 0 and ≤ ${MAX_TIMER_MS}; ` +
        `got ${show(value)}`,
    );
  }
  return value;
}

function serverTimeoutOption(
  config: DatabaseConfig,
  name: keyof DatabaseConfig,
  fallback: number,
): number | null {
  const value = config[name];
  if (value === undefined) return fallback;
  if (value === null) return null;
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > MAX_TIMER_MS) {
    throw new ConfigurationError(
      name,
      `${PREFIX}: '${name}' must be an integer number of milliseconds from 0 to ` +
        `${MAX_TIMER_MS}, or null to keep the server's setting; got ${show(value)}`,
    );
  }
  return value;
}

function booleanOption(config: DatabaseConfig, name: keyof DatabaseConfig): boolean | undefined {
  const value = config[name];
  if (value === undefined || typeof value === "boolean") return value;
  throw new ConfigurationError(
    name,
    `${PREFIX}: '${name}' must be true or false; got ${show(value)}`,
  );
}

function serverSettingsOption(value: unknown): Record<string, string | null> {
  if (value === undefined) return {};
  if (!isPlainObject(value)) {
    throw new ConfigurationError(
      "serverSettings",
      `${PREFIX}: 'serverSettings' must be an object of setting names to string values, ` +
        `such as { timezone: "UTC" }; got ${show(value)}`,
    );
  }
  const settings: Record<string, string | null> = {};
  for (const [name, setting] of Object.entries(value)) {
    if (!SETTING_NAME.test(name)) {
      throw new ConfigurationError(
        "serverSettings",
        `${PREFIX}: 'serverSettings' names must be made of letters, digits, "_" and "."; ` +
          `got ${show(name)}`,
      );
    }
    if (setting !== null && (typeof setting !== "string" || setting.includes("\0"))) {
      throw new ConfigurationError(
        "serverSettings",
        `${PREFIX}: 'serverSettings.${name}' must be a string without NUL characters, or null ` +
          `to send none; ` +
          `got ${show(setting)}`,
      );
    }
    settings[name] = setting;
  }
  return settings;
}

function initCommandsOption(value: unknown): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) {
    throw new ConfigurationError(
      "initCommands",
      `${PREFIX}: 'initCommands' must be an array of SQL strings; got ${show(value)}`,
    );
  }
  const index = value.findIndex((command) => typeof command !== "string");
  if (index >= 0) {
    throw new ConfigurationError(
      "initCommands",
      `${PREFIX}: 'initCommands' must be an array of SQL strings; got ${
        kindOf(value[index])
      } at index ${index}`,
    );
  }
  return [...value];
}

function retryOption(value: unknown): RetryConfig {
  const retry: RetryConfig = { attempts: 3, delayMs: 1000, backoff: 2, maxDelayMs: 30_000 };
  if (value === undefined) return retry;
  if (!isPlainObject(value)) {
    throw new ConfigurationError(
      "retry",
      `${PREFIX}: 'retry' must be an object such as { attempts: 3, delayMs: 1000 }; ` +
        `got ${show(value)}`,
    );
  }
  checkKnownNames(value, RETRY_OPTION_NAMES, "retry.");
  const given = value as Partial<RetryConfig>;
  retry.attempts = retryNumber(given.attempts, "attempts", 1, true) ?? retry.attempts;
  retry.delayMs = retryNumber(given.delayMs, "delayMs", 0, false) ?? retry.delayMs;
  retry.backoff = retryNumber(given.backoff, "backoff", 1, false) ?? retry.backoff;
  retry.maxDelayMs = retryNumber(given.maxDelayMs, "maxDelayMs", 0, false) ?? retry.maxDelayMs;
  return retry;
}

function retryNumber(
  value: unknown,
  name: keyof RetryConfig,
  min: number,
  integer: boolean,
): number | undefined {
  if (value === undefined) return undefined;
  const max = name === "delayMs" || name === "maxDelayMs" ? MAX_TIMER_MS : Infinity;
  if (
    typeof value !== "number" || !Number.isFinite(value) || value < min || value > max ||
    (integer && !Number.isInteger(value))
  ) {
    const kind = integer ? "an integer" : "a number";
    const upper = max === Infinity ? "" : ` and ≤ ${max}`;
    throw new ConfigurationError(
      `retry.${name}`,
      `${PREFIX}: 'retry.${name}' must be ${kind} ≥ ${min}${upper}; got ${show(value)}`,
    );
  }
  return value;
}

function loggerOption(value: unknown): Logger {
  if (value === undefined) return globalThis.console;
  if (
    (typeof value !== "object" && typeof value !== "function") || value === null ||
    typeof (value as Partial<Logger>).warn !== "function"
  ) {
    throw new ConfigurationError(
      "logger",
      `${PREFIX}: 'logger' must be an object with a warn(message) method; got ${show(value)}`,
    );
  }
  return value as Logger;
}

function resolveSsl(
  option: unknown,
  url: UrlParts | undefined,
  env: (name: string) => string | undefined,
): ResolvedSsl | undefined {
  let mode: SslMode | null | undefined;
  let given: Partial<SslConfig> = {};
  if (option !== undefined) {
    if (!isPlainObject(option)) {
      throw new ConfigurationError(
        "ssl",
        `${PREFIX}: 'ssl' must be an object such as { mode: "verify-full" }; ` +
          `got ${show(option)}`,
      );
    }
    checkKnownNames(option, SSL_OPTION_NAMES, "ssl.");
    given = option as Partial<SslConfig>;
    if (!(SSL_MODES as readonly unknown[]).includes(given.mode)) {
      throw new ConfigurationError(
        "ssl.mode",
        `${PREFIX}: 'ssl.mode' must be one of ${SSL_MODES.join(", ")}; got ${show(given.mode)}`,
      );
    }
    mode = given.mode;
  } else if (url?.sslMode !== undefined) {
    mode = url.sslMode;
  } else {
    const fromEnv = env("PGSSLMODE");
    if (fromEnv !== undefined) mode = parseSslMode(fromEnv, "env PGSSLMODE");
  }
  if (mode === undefined || mode === null) return undefined;

  const caSource = given.ca !== undefined ? "'ssl.ca'" : "'sslrootcert' in the connection string";
  const caValue = given.ca ?? (url?.sslRootCert === "system" ? undefined : url?.sslRootCert);
  const cert = given.cert ?? url?.sslCert;
  const key = given.key ?? url?.sslKey;
  const keyPassword = given.keyPassword ?? url?.sslPassword;
  if (cert !== undefined && key === undefined) {
    throw new ConfigurationError(
      "ssl.key",
      `${PREFIX}: 'ssl.cert' is set but 'ssl.key' is not; pass both for client ` +
        `certificate authentication`,
    );
  }
  if (key !== undefined && cert === undefined) {
    throw new ConfigurationError(
      "ssl.cert",
      `${PREFIX}: 'ssl.key' is set but 'ssl.cert' is not; pass both for client ` +
        `certificate authentication`,
    );
  }
  if (keyPassword !== undefined && (typeof keyPassword !== "string" || key === undefined)) {
    throw new ConfigurationError(
      "ssl.keyPassword",
      `${PREFIX}: 'ssl.keyPassword' must be a string, and only given together with 'ssl.key'`,
    );
  }
  const ssl: ResolvedSsl = { mode };
  if (caValue !== undefined) ssl.ca = readPem(caValue, "ssl.ca", caSource);
  if (cert !== undefined) {
    const source = given.cert !== undefined ? "'ssl.cert'" : "'sslcert' in the connection string";
    ssl.cert = readPem(cert, "ssl.cert", source);
  }
  if (key !== undefined) {
    const source = given.key !== undefined ? "'ssl.key'" : "'sslkey' in the connection string";
    Object.defineProperty(ssl, "key", {
      value: readPem(key, "ssl.key", source),
      enumerable: false,
    });
  }
  if (keyPassword !== undefined) {
    Object.defineProperty(ssl, "keyPassword", { value: keyPassword, enumerable: false });
  }
  return ssl;
}

/** Returns PEM text given as such, or reads it from the file `value` names. */
function readPem(value: unknown, field: string, source: string): string {
  if (typeof value !== "string" || value === "") {
    throw new ConfigurationError(
      field,
      `${PREFIX}: ${source} must be PEM text or a file path; got ${kindOf(value)}`,
    );
  }
  if (value.includes("-----BEGIN")) return value;
  if (value.includes("\n") || value.length > 4096) {
    throw new ConfigurationError(
      field,
      `${PREFIX}: ${source} is neither PEM text (it has no "-----BEGIN" line) nor a file path`,
    );
  }
  let text: string;
  try {
    text = Deno.readTextFileSync(value);
  } catch (error) {
    const reason = error instanceof Error ? ` (${error.name})` : "";
    throw new ConfigurationError(
      field,
      `${PREFIX}: ${source} names the file "${value}", which could not be read${reason}; ` +
        `pass the PEM text or the path of a readable PEM file`,
      { cause: error },
    );
  }
  if (!text.includes("-----BEGIN")) {
    throw new ConfigurationError(
      field,
      `${PREFIX}: ${source} names the file "${value}", which is not PEM (it has no ` +
        `"-----BEGIN" line); pass a PEM file`,
    );
  }
  return text;
}

/** Throws for the first name of `value` that is not in `known` (and not `undefined`). */
function checkKnownNames(value: object, known: readonly string[], prefix: string): void {
  for (const [name, option] of Object.entries(value)) {
    if (option === undefined || known.includes(name)) continue;
    const suggestion = suggest(name, known);
    const hint = suggestion === undefined
      ? `use one of ${known.join(", ")}`
      : `did you mean '${prefix}${suggestion}'?`;
    throw new ConfigurationError(
      prefix + name,
      `${PREFIX}: unknown option '${prefix}${name}'; ${hint}`,
    );
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Shows a value for a message: strings quoted, objects by kind only. */
function show(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "number" || typeof value === "boolean" || value == null) {
    return String(value);
  }
  if (typeof value === "bigint") return `${value}n`;
  return kindOf(value);
}

function kindOf(value: unknown): string {
  if (value === null || value === undefined) return String(value);
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `a ${typeof value}`;
}
