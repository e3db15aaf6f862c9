/**
 * A multi-tenant notes API for Deno Deploy, or any host that runs `deno serve`, on one small
 * pgdbm pool per instance (see docs/deploy.md):
 *
 *   DATABASE_URL=postgres://… deno serve --allow-net --allow-env examples/deploy/main.ts
 *
 * - `POST /tenants/:tenant/notes` with `{"body": "…"}` adds a note (201, with the tenant's
 *   note count).
 * - `GET /tenants/:tenant/notes` lists the tenant's notes.
 * - `GET /healthz` checks the database and reports the pool's statistics.
 *
 * Each tenant has its own schema (`tenant_<name>`), created and migrated by the first request
 * for it in each instance. The pool opens on the first request. On SIGTERM (or SIGINT) the
 * server stops accepting connections, the requests in flight finish, and the pool closes.
 *
 * Environment: `DATABASE_URL` (required), `DB_MAX_CONNECTIONS` (default 3), `APP_NAME` (the
 * connections' `application_name`, default `pgdbm-deploy-example`), and
 * `DEPLOY_EXAMPLE_ALLOW_SLEEP=1`, for tests only, which lets `POST …/notes?sleepMs=N` hold
 * its transaction open for N ms.
 *
 * @module
 */

import {
  ConfigurationError,
  ConnectionError,
  PoolError,
  SchemaError,
  TimeoutError,
} from "../../mod.ts";
import { TenantDatabase } from "./_database.ts";

const NOTES = new URLPattern({ pathname: "/tenants/:tenant/notes" });
const MAX_BODY = 10_000;
const MAX_SLEEP_MS = 5_000;
const ALLOW_SLEEP = Deno.env.get("DEPLOY_EXAMPLE_ALLOW_SLEEP") === "1";
const DATABASE_URL = Deno.env.get("DATABASE_URL");
if (!DATABASE_URL) {
  throw new ConfigurationError(
    "connectionString",
    "Cannot start the notes API: DATABASE_URL is not set; set it to the server's URL, " +
      "such as postgres://app@db.example.com:5432/app",
  );
}

const db = new TenantDatabase({
  connectionString: DATABASE_URL,
  minConnections: 0,
  maxConnections: Number(Deno.env.get("DB_MAX_CONNECTIONS") ?? "3"),
  idleTimeoutMs: 10_000,
  acquireTimeoutMs: 10_000,
  connectTimeoutMs: 5_000,
  commandTimeoutMs: 15_000,
  statementTimeoutMs: 15_000,
  retry: { attempts: 2, delayMs: 250 },
  serverSettings: { application_name: Deno.env.get("APP_NAME") ?? "pgdbm-deploy-example" },
});

interface Note {
  id: number;
  body: string;
  created_at: Date;
}

let inFlight = 0;
let stopping: Promise<void> | undefined;
let drained: (() => void) | undefined;

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  try {
    Deno.addSignalListener(signal, stop);
  } catch {
    // This platform cannot listen for the signal (SIGTERM on Windows); it ends the process.
  }
}

/** Lets the requests in flight finish, then closes the pool (once, whatever the signal). */
function stop(): void {
  stopping ??= (async () => {
    while (inFlight > 0) await new Promise<void>((resolve) => drained = resolve);
    await db.close();
  })().catch((error) => {
    console.error("Cannot close the database pool cleanly:", error);
    Deno.exitCode = 1;
  });
}

async function handle(request: Request): Promise<Response> {
  if (stopping !== undefined) {
    return json(503, {
      error: "Cannot serve the request: this instance is shutting down; send it again",
    }, { connection: "close", "retry-after": "1" });
  }
  inFlight++;
  try {
    return await route(request);
  } catch (error) {
    return failure(error);
  } finally {
    if (--inFlight === 0) drained?.();
  }
}

async function route(request: Request): Promise<Response> {
  const url = new URL(request.url);
  if (url.pathname === "/healthz") {
    if (request.method !== "GET") return notAllowed("GET");
    await (await db.root()).fetchValue("SELECT 1");
    return json(200, { status: "ok", pool: db.stats, tenants: db.tenantCount, inFlight });
  }
  const match = NOTES.exec(url);
  if (match === null) return json(404, { error: `Cannot find ${url.pathname}` });
  const tenant = match.pathname.groups.tenant ?? "";
  if (request.method === "GET") {
    const notes = await (await db.tenant(tenant)).fetchAll<Note>(
      "SELECT id, body, created_at FROM {{tables.notes}} ORDER BY id",
    );
    return json(200, { tenant, notes });
  }
  if (request.method === "POST") return await addNote(request, tenant, url);
  return notAllowed("GET, POST");
}

async function addNote(request: Request, tenant: string, url: URL): Promise<Response> {
  const sleepMs = parseSleep(url.searchParams.get("sleepMs"));
  if (typeof sleepMs === "string") return json(400, { error: sleepMs });
  let body: unknown;
  try {
    body = await request.json();
  } catch {
    return json(400, { error: 'Cannot add the note: send JSON such as {"body": "text"}' });
  }
  const text = (body as { body?: unknown } | null)?.body;
  if (typeof text !== "string" || text.length === 0 || text.length > MAX_BODY) {
    return json(400, {
      error: `Cannot add the note: "body" must be a string of 1 to ${MAX_BODY} characters`,
    });
  }
  const notes = await db.tenant(tenant);
  const note = await notes.transaction(async (tx) => {
    const row = await tx.fetchOne<Note>(
      "INSERT INTO {{tables.notes}} (body) VALUES ($1) RETURNING id, body, created_at",
      [text],
    );
    if (sleepMs > 0) await tx.execute("SELECT pg_sleep($1::float8 / 1000)", [sleepMs]);
    return row;
  });
  const count = await notes.fetchValue<number>("SELECT count(*)::int FROM {{tables.notes}}");
  return json(201, { tenant, note, count });
}

/** The `sleepMs` query parameter: a number of ms, or the message of a 400 as a string. */
function parseSleep(value: string | null): number | string {
  if (value === null) return 0;
  if (!ALLOW_SLEEP) {
    return "Cannot use sleepMs: it is for tests, enabled by DEPLOY_EXAMPLE_ALLOW_SLEEP=1";
  }
  const ms = Number(value);
  if (!Number.isInteger(ms) || ms < 0 || ms > MAX_SLEEP_MS) {
    return `Cannot use sleepMs: it must be an integer from 0 to ${MAX_SLEEP_MS}`;
  }
  return ms;
}

function failure(error: unknown): Response {
  if (error instanceof SchemaError) return json(400, { error: error.message });
  if (
    error instanceof PoolError || error instanceof TimeoutError || error instanceof ConnectionError
  ) {
    console.error("Database unavailable:", error);
    return json(503, {
      error: "Cannot serve the request: the database is busy or unreachable; send it again",
    }, { "retry-after": "1" });
  }
  console.error("Request failed:", error);
  return json(500, { error: "Cannot serve the request: internal error (see the server log)" });
}

function notAllowed(allow: string): Response {
  return json(405, { error: `Cannot use this method here: use ${allow}` }, { allow });
}

function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return Response.json(body, { status, headers });
}

/** The `deno serve` entry point. */
export default { fetch: handle } satisfies Deno.ServeDefaultExport;
