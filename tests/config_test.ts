import assert from "node:assert/strict";
import {
  type DatabaseConfig,
  describeTarget,
  poolKey,
  resolveConfig,
  type ResolvedConfig,
} from "../src/config.ts";
import { ConfigurationError, SchemaError } from "../src/errors.ts";

const PASSWORD = "s3cr3t-PW";
const PEM = "-----BEGIN CERTIFICATE-----\nMIIBfakefakefake\n-----END CERTIFICATE-----\n";
const KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIIEkeykeykey\n-----END PRIVATE KEY-----\n";
const ENV_NAMES = [
  "PGHOST",
  "PGPORT",
  "PGDATABASE",
  "PGUSER",
  "PGPASSWORD",
  "DB_PASSWORD",
  "PGSSLMODE",
  "PGAPPNAME",
];

/**
 * Runs `fn` with exactly `vars` set among the variables the resolver reads, then restores
 * them. Synchronous on purpose: the window in which the process environment differs is as
 * short as possible for test files running in parallel.
 */
function withEnv<T>(vars: Record<string, string>, fn: () => T): T {
  const saved = new Map(ENV_NAMES.map((name) => [name, Deno.env.get(name)]));
  try {
    for (const name of ENV_NAMES) {
      if (name in vars) Deno.env.set(name, vars[name]);
      else Deno.env.delete(name);
    }
    return fn();
  } finally {
    for (const [name, value] of saved) {
      if (value === undefined) Deno.env.delete(name);
      else Deno.env.set(name, value);
    }
  }
}

/** Resolves with none of the resolver's environment variables set. */
function resolveClean(config: DatabaseConfig): ResolvedConfig {
  return withEnv({}, () => resolveConfig(config));
}

function configurationError(fn: () => unknown): ConfigurationError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof ConfigurationError, `expected ConfigurationError, got ${error}`);
    return error;
  }
  assert.fail("expected a ConfigurationError");
}

function assertNoPassword(text: string): void {
  assert.ok(!text.includes(PASSWORD), `the password leaked into: ${text}`);
  assert.ok(!text.includes("s3cr3t"), `part of the password leaked into: ${text}`);
}

Deno.test({
  name: "resolveConfig() applies every default and reads no env without permission",
  permissions: { env: false },
  fn() {
    const config = resolveConfig({});
    assert.equal(config.kind, "network");
    assert.equal(config.embeddedDataDir, undefined);
    assert.equal(config.host, "localhost");
    assert.equal(config.port, 5432);
    assert.equal(config.database, "postgres");
    assert.equal(config.user, "postgres");
    assert.equal(config.password, undefined);
    assert.equal(config.schema, undefined);
    assert.equal(config.minConnections, 2);
    assert.equal(config.maxConnections, 10);
    assert.equal(config.maxQueries, 50000);
    assert.equal(config.idleTimeoutMs, 300000);
    assert.equal(config.maxLifetimeMs, 3600000);
    assert.equal(config.acquireTimeoutMs, 30000);
    assert.equal(config.commandTimeoutMs, 60000);
    assert.equal(config.connectTimeoutMs, 10000);
    assert.deepEqual(config.serverSettings, {
      jit: "off",
      application_name: "pgdbm",
      statement_timeout: "60000",
      idle_in_transaction_session_timeout: "60000",
      lock_timeout: "5000",
    });
    assert.deepEqual(config.initCommands, []);
    assert.equal(config.ssl, undefined);
    assert.deepEqual(config.retry, { attempts: 3, delayMs: 1000, backoff: 2, maxDelayMs: 30000 });
    assert.equal(config.prepare, true);
    assert.equal(config.logger, globalThis.console);
  },
});

Deno.test("resolveConfig() parses a postgres:// URL with percent-encoded parts", () => {
  const config = resolveClean({
    connectionString: "postgres://app%20user:p%40ss%3Aword@db.example.com:6543/my%2Fdb",
  });
  assert.equal(config.host, "db.example.com");
  assert.equal(config.port, 6543);
  assert.equal(config.user, "app user");
  assert.equal(config.password, "p@ss:word");
  assert.equal(config.database, "my/db");
});

Deno.test("resolveConfig() accepts postgresql:// and an IPv6 host", () => {
  const config = resolveClean({ connectionString: "postgresql://u@[::1]:5433/d" });
  assert.equal(config.host, "::1");
  assert.equal(config.port, 5433);
  assert.equal(describeTarget(config), "postgres://u@[::1]:5433/d");
});

Deno.test("resolveConfig() reads a Unix socket directory from the host or ?host=", () => {
  const encoded = resolveClean({
    connectionString: "postgres://user@%2Fvar%2Frun%2Fpostgresql/db",
  });
  assert.equal(encoded.host, "/var/run/postgresql");
  assert.equal(encoded.user, "user");
  assert.equal(encoded.database, "db");
  const query = resolveClean({ connectionString: "postgres:///db?host=/var/run/postgresql" });
  assert.equal(query.host, "/var/run/postgresql");
  assert.equal(query.database, "db");
  assert.equal(query.port, 5432);
});

Deno.test("resolveConfig() maps every sslmode of the URL", () => {
  for (const mode of ["disable", "allow", "prefer"]) {
    const config = resolveClean({ connectionString: `postgres://h/db?sslmode=${mode}` });
    assert.equal(config.ssl, undefined, mode);
  }
  for (const mode of ["require", "verify-ca", "verify-full"] as const) {
    const config = resolveClean({ connectionString: `postgres://h/db?sslmode=${mode}` });
    assert.deepEqual(config.ssl, { mode });
  }
  const error = configurationError(() =>
    resolveClean({ connectionString: "postgres://h/db?sslmode=always" })
  );
  assert.equal(error.field, "ssl");
  assert.match(error.message, /"always"/);
});

Deno.test("resolveConfig() takes application_name from the URL and ignores options", () => {
  const config = resolveClean({
    connectionString: "postgres://h/db?application_name=billing%20api&options=-c%20x%3Dy",
  });
  assert.equal(config.serverSettings.application_name, "billing api");
  assert.equal(config.serverSettings.options, undefined);
});

Deno.test("resolveConfig() prefers option over URL over env over default, field by field", () => {
  const env = {
    PGHOST: "env-host",
    PGPORT: "7000",
    PGDATABASE: "env_db",
    PGUSER: "env_user",
    PGPASSWORD: "env-pw",
    PGSSLMODE: "require",
    PGAPPNAME: "env-app",
  };
  const fromEnv = withEnv(env, () => resolveConfig({}));
  assert.equal(fromEnv.host, "env-host");
  assert.equal(fromEnv.port, 7000);
  assert.equal(fromEnv.database, "env_db");
  assert.equal(fromEnv.user, "env_user");
  assert.equal(fromEnv.password, "env-pw");
  assert.equal(fromEnv.ssl?.mode, "require");
  assert.equal(fromEnv.serverSettings.application_name, "env-app");

  const url = "postgres://url_user:url-pw@url-host:7100/url_db?sslmode=verify-ca" +
    "&application_name=url-app";
  const fromUrl = withEnv(env, () => resolveConfig({ connectionString: url }));
  assert.equal(fromUrl.host, "url-host");
  assert.equal(fromUrl.port, 7100);
  assert.equal(fromUrl.database, "url_db");
  assert.equal(fromUrl.user, "url_user");
  assert.equal(fromUrl.password, "url-pw");
  assert.equal(fromUrl.ssl?.mode, "verify-ca");
  assert.equal(fromUrl.serverSettings.application_name, "url-app");

  const fromOptions = withEnv(env, () =>
    resolveConfig({
      connectionString: url,
      host: "opt-host",
      port: 7200,
      database: "opt_db",
      user: "opt_user",
      password: "opt-pw",
      ssl: { mode: "verify-full" },
      serverSettings: { application_name: "opt-app" },
    }));
  assert.equal(fromOptions.host, "opt-host");
  assert.equal(fromOptions.port, 7200);
  assert.equal(fromOptions.database, "opt_db");
  assert.equal(fromOptions.user, "opt_user");
  assert.equal(fromOptions.password, "opt-pw");
  assert.equal(fromOptions.ssl?.mode, "verify-full");
  assert.equal(fromOptions.serverSettings.application_name, "opt-app");

  const partial = withEnv(env, () => resolveConfig({ connectionString: "postgres://url-host" }));
  assert.equal(partial.host, "url-host");
  assert.equal(partial.port, 7000);
  assert.equal(partial.database, "env_db");
  assert.equal(partial.user, "env_user");
});

Deno.test("resolveConfig() takes the password from DB_PASSWORD before PGPASSWORD", () => {
  const both = withEnv({ DB_PASSWORD: "db-pw", PGPASSWORD: "pg-pw" }, () => resolveConfig({}));
  assert.equal(both.password, "db-pw");
  const pgOnly = withEnv({ PGPASSWORD: "pg-pw" }, () => resolveConfig({}));
  assert.equal(pgOnly.password, "pg-pw");
  const urlFirst = withEnv(
    { DB_PASSWORD: "db-pw" },
    () => resolveConfig({ connectionString: "postgres://u:url-pw@h/d" }),
  );
  assert.equal(urlFirst.password, "url-pw");
});

Deno.test("resolveConfig() rejects a bad PGPORT or PGSSLMODE naming the field", () => {
  const port = configurationError(() => withEnv({ PGPORT: "abc" }, () => resolveConfig({})));
  assert.equal(port.field, "port");
  assert.match(port.message, /PGPORT/);
  const ssl = configurationError(() => withEnv({ PGSSLMODE: "bogus" }, () => resolveConfig({})));
  assert.equal(ssl.field, "ssl");
  assert.match(ssl.message, /PGSSLMODE/);
});

Deno.test("resolveConfig() throws ConfigurationError naming the field of each bad value", () => {
  const cases: [Record<string, unknown>, string][] = [
    [{ minConnections: -1 }, "minConnections"],
    [{ minConnections: 1.5 }, "minConnections"],
    [{ maxConnections: 0 }, "maxConnections"],
    [{ maxConnections: "10" }, "maxConnections"],
    [{ minConnections: 5, maxConnections: 3 }, "minConnections"],
    [{ port: 0 }, "port"],
    [{ port: 65536 }, "port"],
    [{ port: 5432.5 }, "port"],
    [{ connectionString: "postgres://h:0/db" }, "port"],
    [{ host: "" }, "host"],
    [{ database: 5 }, "database"],
    [{ user: null }, "user"],
    [{ password: 1234 }, "password"],
    [{ maxQueries: 0 }, "maxQueries"],
    [{ idleTimeoutMs: 0 }, "idleTimeoutMs"],
    [{ maxLifetimeMs: -5 }, "maxLifetimeMs"],
    [{ acquireTimeoutMs: Infinity }, "acquireTimeoutMs"],
    [{ commandTimeoutMs: NaN }, "commandTimeoutMs"],
    [{ connectTimeoutMs: "1000" }, "connectTimeoutMs"],
    [{ statementTimeoutMs: -1 }, "statementTimeoutMs"],
    [{ idleInTransactionSessionTimeoutMs: 1.5 }, "idleInTransactionSessionTimeoutMs"],
    [{ lockTimeoutMs: "5s" }, "lockTimeoutMs"],
    [{ serverSettings: { "bad key": "x" } }, "serverSettings"],
    [{ serverSettings: { timezone: 5 } }, "serverSettings"],
    [{ serverSettings: ["jit"] }, "serverSettings"],
    [{ initCommands: "SET x = 1" }, "initCommands"],
    [{ initCommands: ["SET x = 1", 2] }, "initCommands"],
    [{ ssl: { mode: "prefer" } }, "ssl.mode"],
    [{ ssl: {} }, "ssl.mode"],
    [{ ssl: true }, "ssl"],
    [{ ssl: { mode: "require", sslrootcert: "x" } }, "ssl.sslrootcert"],
    [{ retry: { attempts: 0 } }, "retry.attempts"],
    [{ retry: { attempts: 2.5 } }, "retry.attempts"],
    [{ retry: { delayMs: -1 } }, "retry.delayMs"],
    [{ retry: { backoff: 0.5 } }, "retry.backoff"],
    [{ retry: { maxDelayMs: -1 } }, "retry.maxDelayMs"],
    [{ retry: { attempt: 3 } }, "retry.attempt"],
    [{ retry: 3 }, "retry"],
    [{ prepare: "false" }, "prepare"],
    [{ logger: {} }, "logger"],
    [{ connectionString: "mysql://u@h/db" }, "connectionString"],
    [{ connectionString: "localhost:5432" }, "connectionString"],
    [{ connectionString: "postgres://h:99999/db" }, "connectionString"],
    [{ connectionString: "postgres://a,b/db" }, "connectionString"],
    [{ connectionString: "postgres://u:%zz@h/db" }, "connectionString"],
    [{ connectionString: "pglite:" }, "connectionString"],
    [{ connectionString: "" }, "connectionString"],
    [{ maxConnection: 5 }, "maxConnection"],
    [{ pool: {} }, "pool"],
  ];
  for (const [config, field] of cases) {
    const error = configurationError(() => resolveClean(config as DatabaseConfig));
    assert.equal(error.field, field, `field for ${Deno.inspect(config)}`);
    assert.equal(error.code, "CONFIGURATION_ERROR");
    assert.match(error.message, /^Cannot create the pool: /);
  }
});

Deno.test("resolveConfig() words messages as 'Cannot X: field must be …; got …'", () => {
  const error = configurationError(() => resolveClean({ maxConnections: 0 }));
  assert.equal(
    error.message,
    "Cannot create the pool: 'maxConnections' must be an integer ≥ 1; got 0",
  );
});

Deno.test("resolveConfig() suggests the option a typo meant", () => {
  const error = configurationError(() =>
    resolveClean({ maxConnection: 5 } as unknown as DatabaseConfig)
  );
  assert.match(error.message, /unknown option 'maxConnection'; did you mean 'maxConnections'\?/);
});

Deno.test("resolveConfig() suggests as the CLI does: a name cut short, a swap, any case", () => {
  for (
    const [typo, meant] of [
      ["connection", "connectionString"],
      ["prot", "port"],
      ["STATEMENTTIMEOUTMS", "statementTimeoutMs"],
    ]
  ) {
    const error = configurationError(() =>
      resolveClean({ [typo]: 1 } as unknown as DatabaseConfig)
    );
    assert.match(error.message, new RegExp(`unknown option '${typo}'; did you mean '${meant}'\\?`));
  }
});

Deno.test("resolveConfig() throws SchemaError for a bad or empty schema", () => {
  for (const schema of ["", "bad-name", "a;b", 'x"y', "1abc", "a".repeat(64)]) {
    assert.throws(() => resolveClean({ schema }), SchemaError, JSON.stringify(schema));
  }
  assert.equal(resolveClean({ schema: "tenant_42" }).schema, "tenant_42");
});

Deno.test("resolveConfig() never puts the password into an error", () => {
  const configs: DatabaseConfig[] = [
    { connectionString: `postgres://u:${PASSWORD}@h:99999/db` },
    { connectionString: `postgres://u:${PASSWORD}/db` },
    { connectionString: `mysql://u:${PASSWORD}@h/db` },
    { connectionString: `postgres://u:${PASSWORD}%zz@h/db` },
    { connectionString: `postgres://u:${PASSWORD}@a,b/db` },
    { connectionString: `postgres://u:${PASSWORD}@h/db?sslmode=bogus` },
    { connectionString: `postgres://u@h:99999/db?password=${PASSWORD}` },
    { connectionString: `postgres://u:${PASSWORD}@h/db`, maxConnections: 0 },
    { password: PASSWORD, port: -1 },
    { password: PASSWORD, ssl: { mode: "require", ca: "/no/such/ca.pem" } },
  ];
  for (const config of configs) {
    const error = configurationError(() => resolveClean(config));
    assertNoPassword(error.message);
    assertNoPassword(String(error));
    assertNoPassword(Deno.inspect(error));
  }
});

Deno.test("resolveConfig() hides the password from inspect and JSON", () => {
  const viaOption = resolveClean({ password: PASSWORD });
  const viaUrl = resolveClean({ connectionString: `postgres://u:${PASSWORD}@h/db` });
  for (const config of [viaOption, viaUrl]) {
    assert.equal(config.password, PASSWORD);
    assertNoPassword(Deno.inspect(config, { depth: Infinity }));
    assertNoPassword(JSON.stringify(config));
    assertNoPassword(describeTarget(config));
    assertNoPassword(poolKey(config) ?? "");
  }
  assert.equal(describeTarget(viaUrl), "postgres://u@h:5432/db");
});

Deno.test("resolveConfig() falls back to maxConnections when it is below the default floor", () => {
  const config = resolveClean({ maxConnections: 1 });
  assert.equal(config.minConnections, 1);
  assert.equal(config.maxConnections, 1);
  assert.equal(resolveClean({ minConnections: 0 }).minConnections, 0);
});

Deno.test("resolveConfig() builds serverSettings with the user's entries winning", () => {
  const config = resolveClean({
    statementTimeoutMs: null,
    idleInTransactionSessionTimeoutMs: 0,
    lockTimeoutMs: 250,
    serverSettings: { jit: "on", timezone: "UTC", "pg_trgm.similarity_threshold": "0.5" },
  });
  assert.deepEqual(config.serverSettings, {
    jit: "on",
    application_name: "pgdbm",
    idle_in_transaction_session_timeout: "0",
    lock_timeout: "250",
    timezone: "UTC",
    "pg_trgm.similarity_threshold": "0.5",
  });
  const explicit = resolveClean({ serverSettings: { statement_timeout: "5s" } });
  assert.equal(explicit.serverSettings.statement_timeout, "5s");
});

Deno.test("resolveConfig() merges a partial retry and keeps the other options", () => {
  const warnings: string[] = [];
  const logger = { warn: (message: string) => warnings.push(message) };
  const commands = ["SET search_path TO public"];
  const config = resolveClean({
    retry: { attempts: 1, maxDelayMs: 0 },
    prepare: false,
    logger,
    initCommands: commands,
  });
  assert.deepEqual(config.retry, { attempts: 1, delayMs: 1000, backoff: 2, maxDelayMs: 0 });
  assert.equal(config.prepare, false);
  assert.equal(config.logger, logger);
  assert.deepEqual(config.initCommands, commands);
  assert.notEqual(config.initCommands, commands);
});

Deno.test("resolveConfig() takes TLS material as PEM text", () => {
  const config = resolveClean({
    ssl: { mode: "verify-full", ca: PEM, cert: PEM, key: KEY_PEM, keyPassword: PASSWORD },
  });
  assert.equal(config.ssl?.mode, "verify-full");
  assert.equal(config.ssl?.ca, PEM);
  assert.equal(config.ssl?.cert, PEM);
  assert.equal(config.ssl?.key, KEY_PEM);
  assert.equal(config.ssl?.keyPassword, PASSWORD);
  const shown = Deno.inspect(config, { depth: Infinity }) + JSON.stringify(config);
  assertNoPassword(shown);
  assert.ok(!shown.includes("PRIVATE KEY"), "the private key is shown");
  assert.equal(resolveClean({ ssl: { mode: "verify-ca" } }).ssl?.ca, undefined);
});

Deno.test("resolveConfig() reads TLS material from file paths", async () => {
  const path = await Deno.makeTempFile({ suffix: ".pem" });
  try {
    await Deno.writeTextFile(path, PEM);
    const fromOption = resolveClean({ ssl: { mode: "verify-ca", ca: path } });
    assert.equal(fromOption.ssl?.ca, PEM);
    const fromUrl = resolveClean({
      connectionString: `postgres://h/db?sslmode=verify-full&sslrootcert=${path}`,
    });
    assert.equal(fromUrl.ssl?.ca, PEM);
    const system = resolveClean({
      connectionString: "postgres://h/db?sslmode=verify-full&sslrootcert=system",
    });
    assert.deepEqual(system.ssl, { mode: "verify-full" });
    await Deno.writeTextFile(path, "not a certificate");
    const notPem = configurationError(() => resolveClean({ ssl: { mode: "require", ca: path } }));
    assert.equal(notPem.field, "ssl.ca");
  } finally {
    await Deno.remove(path);
  }
});

Deno.test("resolveConfig() names the TLS path that cannot be read", () => {
  const missing = "/no/such/dir/root.crt";
  const ca = configurationError(() => resolveClean({ ssl: { mode: "require", ca: missing } }));
  assert.equal(ca.field, "ssl.ca");
  assert.ok(ca.message.includes(missing), ca.message);
  const fromUrl = configurationError(() =>
    resolveClean({ connectionString: `postgres://h/db?sslmode=require&sslrootcert=${missing}` })
  );
  assert.equal(fromUrl.field, "ssl.ca");
  const cert = configurationError(() =>
    resolveClean({ ssl: { mode: "require", cert: missing, key: KEY_PEM } })
  );
  assert.equal(cert.field, "ssl.cert");
  const key = configurationError(() =>
    resolveClean({ ssl: { mode: "require", cert: PEM, key: missing } })
  );
  assert.equal(key.field, "ssl.key");
});

Deno.test("resolveConfig() refuses a client certificate without its key and vice versa", () => {
  const noKey = configurationError(() => resolveClean({ ssl: { mode: "require", cert: PEM } }));
  assert.equal(noKey.field, "ssl.key");
  const noCert = configurationError(() => resolveClean({ ssl: { mode: "require", key: KEY_PEM } }));
  assert.equal(noCert.field, "ssl.cert");
  const noKeyUrl = configurationError(() =>
    resolveClean({ connectionString: "postgres://h/db?sslmode=require&sslcert=/x.crt" })
  );
  assert.equal(noKeyUrl.field, "ssl.key");
});

Deno.test("resolveConfig() selects the embedded PostgreSQL for pglite: strings", () => {
  const memory = withEnv(
    { PGHOST: "env-host", PGSSLMODE: "require" },
    () => resolveConfig({ connectionString: "pglite:memory" }),
  );
  assert.equal(memory.kind, "embedded");
  assert.equal(memory.embeddedDataDir, undefined);
  assert.equal(memory.ssl, undefined);
  assert.equal(memory.host, "localhost");
  assert.equal(describeTarget(memory), "pglite:memory");
  assert.equal(poolKey(memory), undefined, "every in-memory engine is a database of its own");
  const directory = resolveClean({ connectionString: "pglite:./data", schema: "app" });
  assert.equal(directory.kind, "embedded");
  assert.equal(directory.embeddedDataDir, "./data");
  assert.equal(directory.schema, "app");
  assert.equal(describeTarget(directory), "pglite:./data");
  assert.equal(poolKey(directory), "pglite:./data");
});

Deno.test("describeTarget() and poolKey() describe a server without its password", () => {
  const config = resolveClean({
    host: "127.0.0.1",
    database: "test",
    password: PASSWORD,
  });
  assert.equal(describeTarget(config), "postgres://postgres@127.0.0.1:5432/test");
  assert.equal(poolKey(config), "127.0.0.1:5432/test");
  const socket = resolveClean({ host: "/var/run/postgresql", user: "app", database: "d" });
  assert.equal(describeTarget(socket), "postgres://app@%2Fvar%2Frun%2Fpostgresql:5432/d");
  assert.equal(poolKey(socket), "/var/run/postgresql:5432/d");
  const sameDb = resolveClean({ connectionString: "postgres://other:pw@127.0.0.1/test" });
  assert.equal(poolKey(sameDb), poolKey(config));
});

Deno.test("resolveConfig() sends no setting whose serverSettings value is null", () => {
  const config = resolveConfig({
    connectionString: "postgres://app@db/app",
    statementTimeoutMs: null,
    lockTimeoutMs: null,
    idleInTransactionSessionTimeoutMs: null,
    serverSettings: { jit: null, application_name: null, timezone: "UTC" },
  });
  assert.deepEqual(config.serverSettings, { timezone: "UTC" });
});
