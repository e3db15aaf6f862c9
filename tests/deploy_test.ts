/**
 * The Deno Deploy example (examples/deploy/main.ts) run as it runs in production: three
 * `deno serve` processes started cold at once against one empty database, driven over HTTP.
 */
import assert from "node:assert/strict";
import postgres from "postgres";
import { observe, serverTest, TEST_URL, uniqueName } from "./_support/server.ts";

const ROOT = new URL("..", import.meta.url);
const ENTRY = "examples/deploy/main.ts";
const MAX_CONNECTIONS = 3;
const TENANTS = ["acme", "globex", "initech", "umbrella"];
const MIGRATIONS = ["001_create_notes.sql", "002_create_audit.sql"];
const REQUESTS = 360;
const SLOW_REQUESTS = 3;
const SLOW_MS = 2500;

interface Instance {
  appName: string;
  base: string;
  port: number;
  child: Deno.ChildProcess;
  /** Everything the process wrote so far, stdout and stderr interleaved as they came. */
  log: string[];
  /** Settles when the process exited and its output was read to the end. */
  status: Promise<Deno.CommandStatus>;
  exited: boolean;
}

interface NotesBody {
  tenant: string;
  notes: { id: number; body: string }[];
}

serverTest(
  "examples/deploy: three cold `deno serve` instances migrate each tenant once, answer " +
    "every request, keep tenants apart, stay under the pool cap, and stop cleanly on SIGTERM",
  async (t) => {
    const database = uniqueName("pgdbm_deploy");
    await observe((sql) => sql.unsafe(`CREATE DATABASE "${database}"`));
    const databaseUrl = new URL(TEST_URL);
    databaseUrl.pathname = `/${database}`;
    const watcher = postgres(TEST_URL, { max: 1, onnotice: () => {} });
    const client = Deno.createHttpClient({});
    const instances: Instance[] = [];
    const step = (name: string, fn: () => Promise<void>) =>
      t.step(name, () => reportingLogs(instances, fn));
    try {
      for (let i = 0; i < 3; i++) {
        instances.push(start(databaseUrl.href, `${database}_i${i}`));
      }
      await reportingLogs(instances, async () => {
        await Promise.all(instances.map(waitListening));
      });

      const posted = new Map<string, string[]>(TENANTS.map((tenant) => [tenant, []]));
      await step("a cold burst across instances and tenants: every request 2xx", async () => {
        const sampling = new AbortController();
        const peaks = sampleConnections(watcher, database, sampling.signal);
        let statuses: number[];
        let peak: Map<string, number>;
        try {
          statuses = await Promise.all(
            Array.from({ length: REQUESTS }, (_, i) => {
              const instance = instances[i % instances.length];
              const tenant = TENANTS[i % TENANTS.length];
              if (i % 3 === 2) return getNotes(client, instance, tenant).then((r) => r.status);
              const body = `${tenant}:${i}`;
              posted.get(tenant)!.push(body);
              return postNote(client, instance, tenant, body).then((r) => r.status);
            }),
          );
        } finally {
          sampling.abort();
          peak = await peaks;
        }
        const failed = statuses.filter((status) => status < 200 || status > 299);
        assert.deepEqual(failed, [], "every request of the burst must succeed");

        for (const instance of instances) {
          const seen = peak.get(instance.appName);
          assert.ok(seen !== undefined, `no connection of ${instance.appName} was ever seen`);
          assert.ok(
            seen <= MAX_CONNECTIONS,
            `${instance.appName} held ${seen} connections, above its cap of ${MAX_CONNECTIONS}`,
          );
        }
        for (const instance of instances) {
          const health = await request(client, instance, "/healthz");
          assert.equal(health.status, 200);
          const { pool } = health.body as { pool: { size: number; maxSize: number } };
          assert.equal(pool.maxSize, MAX_CONNECTIONS);
          assert.ok(pool.size <= MAX_CONNECTIONS);
        }
      });

      await step("each tenant schema was migrated exactly once", async () => {
        for (const tenant of TENANTS) {
          const schema = `tenant_${tenant}`;
          const rows = await queryDatabase(databaseUrl.href, (sql) =>
            sql.unsafe(
              `SELECT filename FROM "${schema}".schema_migrations WHERE module_name = 'notes'
               ORDER BY filename`,
            ));
          assert.deepEqual(rows.map((row) => row.filename), MIGRATIONS, schema);
          const audit = await queryDatabase(databaseUrl.href, (sql) =>
            sql.unsafe(
              `SELECT count(*)::int AS n FROM "${schema}".audit WHERE event = 'schema_migrated'`,
            ));
          assert.equal(audit[0].n, 1, `the migration's own insert ran once in ${schema}`);
        }
      });

      await step("tenants never see each other's notes, from any instance", async () => {
        for (const tenant of TENANTS) {
          for (const instance of instances) {
            const { status, body } = await getNotes(client, instance, tenant);
            assert.equal(status, 200);
            const notes = (body as NotesBody).notes.map((note) => note.body).sort();
            assert.deepEqual(
              notes,
              [...posted.get(tenant)!].sort(),
              `${tenant} via ${instance.port}`,
            );
          }
        }
      });

      await step("a bad tenant name gets 400 with a clear message and runs no SQL", async () => {
        const before = await noteCounts(databaseUrl.href);
        const bad = [
          "Robert'); DROP TABLE notes;--",
          "Acme",
          "a b",
          'tenant"x',
          "a".repeat(41),
          "1st",
        ];
        for (const name of bad) {
          for (const method of ["GET", "POST"] as const) {
            const path = `/tenants/${encodeURIComponent(name)}/notes`;
            const json = method === "POST" ? { body: "x" } : undefined;
            const response = await request(client, instances[0], path, method, json);
            assert.equal(response.status, 400, `${method} ${path}`);
            const { error } = response.body as { error: string };
            assert.match(error, /^Cannot use the tenant ".*": a tenant name is 1 to 40 lowercase/);
          }
        }
        assert.deepEqual(await noteCounts(databaseUrl.href), before);
        const schemas = await queryDatabase(
          databaseUrl.href,
          (sql) => sql`SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant%' ORDER BY 1`,
        );
        assert.deepEqual(schemas.map((row) => row.nspname), TENANTS.map((t) => `tenant_${t}`));
      });

      await step("SIGTERM: no new connections, in-flight requests finish, exit 0", async () => {
        const target = instances[0];
        const slow = Array.from(
          { length: SLOW_REQUESTS },
          (_, i) => postNote(client, target, "acme", `acme:slow:${i}`, SLOW_MS),
        );
        let pending = SLOW_REQUESTS;
        for (const reply of slow) reply.then(() => pending--, () => pending--);
        await waitFor(
          async () =>
            (await watcher`SELECT count(*)::int AS n FROM pg_stat_activity
              WHERE datname = ${database} AND application_name = ${target.appName}
                AND state = 'active' AND query LIKE 'SELECT pg_sleep%'`)[0].n === SLOW_REQUESTS,
          "the slow requests to reach pg_sleep",
        );
        target.child.kill("SIGTERM");
        await waitFor(() => refuses(target.port), "the instance to stop accepting connections");
        assert.ok(pending > 0, "new connections must be refused while requests are in flight");

        const replies = await Promise.all(slow);
        assert.deepEqual(replies.map((reply) => reply.status), [201, 201, 201]);
        await expectCleanExit(target, watcher, database);
        const slowNotes = await queryDatabase(
          databaseUrl.href,
          (sql) =>
            sql`SELECT count(*)::int AS n FROM tenant_acme.notes WHERE body LIKE 'acme:slow:%'`,
        );
        assert.equal(slowNotes[0].n, SLOW_REQUESTS, "the in-flight transactions committed");

        for (const instance of instances.slice(1)) instance.child.kill("SIGTERM");
        for (const instance of instances.slice(1)) {
          await expectCleanExit(instance, watcher, database);
        }
      });
    } finally {
      for (const instance of instances) {
        if (!instance.exited) {
          try {
            instance.child.kill("SIGKILL");
          } catch {
            // It exited on its own meanwhile.
          }
        }
        await instance.status;
      }
      client.close();
      await watcher.end({ timeout: 1 });
      await observe((sql) => sql.unsafe(`DROP DATABASE IF EXISTS "${database}" WITH (FORCE)`));
    }
  },
);

/** Starts `deno serve` on the example with the permissions the docs give, on a free port. */
function start(databaseUrl: string, appName: string): Instance {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "serve",
      "--allow-net",
      "--allow-env",
      "--host",
      "127.0.0.1",
      "--port",
      String(port),
      ENTRY,
    ],
    cwd: ROOT,
    env: {
      DATABASE_URL: databaseUrl,
      APP_NAME: appName,
      DB_MAX_CONNECTIONS: String(MAX_CONNECTIONS),
      DEPLOY_EXAMPLE_ALLOW_SLEEP: "1",
      NO_COLOR: "1",
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const log: string[] = [];
  const collect = async (stream: ReadableStream<Uint8Array>): Promise<void> => {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) log.push(text);
  };
  const instance: Instance = {
    appName,
    base: `http://127.0.0.1:${port}`,
    port,
    child,
    log,
    status: Promise.all([collect(child.stdout), collect(child.stderr)]).then(() => child.status),
    exited: false,
  };
  const exited = (): void => {
    instance.exited = true;
  };
  instance.status.then(exited, exited);
  return instance;
}

/**
 * Runs `fn`; when it fails, the error's message gains what each instance wrote so far
 * (the head and tail of a long log), so that a failure says why the server failed.
 */
async function reportingLogs(instances: Instance[], fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (error) {
    if (!(error instanceof Error)) throw error;
    error.message += instances.map((instance) =>
      `\n--- output of ${instance.appName} (${instance.base}) ---\n${excerpt(instance.log)}`
    ).join("");
    throw error;
  }
}

/** The first 4000 and the last 2000 characters of a log. */
function excerpt(log: string[]): string {
  const text = log.join("");
  if (text.length <= 6000) return text || "(nothing)";
  return `${text.slice(0, 4000)}\n[… ${text.length - 6000} characters left out …]\n` +
    text.slice(-2000);
}

async function waitListening(instance: Instance): Promise<void> {
  await waitFor(async () => {
    if (instance.exited) {
      const { code } = await instance.status;
      throw new Error(`deno serve exited with ${code}: ${excerpt(instance.log)}`);
    }
    return !await refuses(instance.port);
  }, `${instance.appName} to listen`);
}

/** True when a TCP connection to the port is refused. */
async function refuses(port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.close();
    return false;
  } catch (error) {
    if (error instanceof Deno.errors.ConnectionRefused) return true;
    throw error;
  }
}

async function expectCleanExit(
  instance: Instance,
  watcher: postgres.Sql,
  database: string,
): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${instance.appName} did not exit within 15 s of SIGTERM`)),
      15_000,
    );
  });
  const { code } = await Promise.race([instance.status, timeout]).finally(() =>
    clearTimeout(timer)
  );
  assert.equal(code, 0, `${instance.appName} exit code; output: ${excerpt(instance.log)}`);
  await waitFor(
    async () =>
      (await watcher`SELECT count(*)::int AS n FROM pg_stat_activity
        WHERE datname = ${database} AND application_name = ${instance.appName}`)[0].n === 0,
    `${instance.appName}'s connections to leave pg_stat_activity`,
  );
}

/** The most connections each application_name held at once while `signal` was not aborted. */
async function sampleConnections(
  watcher: postgres.Sql,
  database: string,
  signal: AbortSignal,
): Promise<Map<string, number>> {
  const peak = new Map<string, number>();
  while (!signal.aborted) {
    const rows = await watcher`SELECT application_name AS name, count(*)::int AS n
      FROM pg_stat_activity WHERE datname = ${database} GROUP BY 1`;
    for (const { name, n } of rows) peak.set(name, Math.max(peak.get(name) ?? 0, n));
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return peak;
}

async function noteCounts(databaseUrl: string): Promise<number[]> {
  const counts: number[] = [];
  for (const tenant of TENANTS) {
    const rows = await queryDatabase(
      databaseUrl,
      (sql) => sql.unsafe(`SELECT count(*)::int AS n FROM "tenant_${tenant}".notes`),
    );
    counts.push(rows[0].n);
  }
  return counts;
}

async function queryDatabase(
  url: string,
  fn: (sql: postgres.Sql) => Promise<postgres.Row[]>,
): Promise<postgres.Row[]> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 1 });
  }
}

function getNotes(
  client: Deno.HttpClient,
  instance: Instance,
  tenant: string,
): Promise<{ status: number; body: unknown }> {
  return request(client, instance, `/tenants/${tenant}/notes`);
}

function postNote(
  client: Deno.HttpClient,
  instance: Instance,
  tenant: string,
  body: string,
  sleepMs?: number,
): Promise<{ status: number; body: unknown }> {
  const query = sleepMs === undefined ? "" : `?sleepMs=${sleepMs}`;
  return request(client, instance, `/tenants/${tenant}/notes${query}`, "POST", { body });
}

async function request(
  client: Deno.HttpClient,
  instance: Instance,
  path: string,
  method: "GET" | "POST" = "GET",
  json?: unknown,
): Promise<{ status: number; body: unknown }> {
  const response = await fetch(instance.base + path, {
    client,
    method,
    headers: json === undefined ? {} : { "content-type": "application/json" },
    body: json === undefined ? undefined : JSON.stringify(json),
  });
  return { status: response.status, body: await response.json() };
}

/** Polls `check` every 25 ms until it is true; fails after 20 s. */
async function waitFor(check: () => boolean | Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}
