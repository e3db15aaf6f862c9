/**
 * A throwaway PgBouncer for the PgBouncer tests: a config in a temp dir, listening on
 * 127.0.0.1 and a free port, `pool_mode = transaction`, `auth_type = trust`, with a
 * `[databases]` entry (named like the target database) pointing to the server of
 * PGDBM_TEST_URL. Run as root, it drops to the `postgres` user (`pgbouncer -u postgres`:
 * PgBouncer refuses to run as root); run as anyone else, it runs as that user. `stop()`
 * kills it and removes the temp dir. Beyond installing a missing `pgbouncer` package and
 * its own temp dirs, the helper changes nothing on the host: it starts, stops or disables
 * no service.
 */
import postgres from "postgres";
import { SERVER_AVAILABLE } from "./server.ts";

const BINARIES = [
  "/usr/sbin/pgbouncer",
  "/usr/bin/pgbouncer",
  "/usr/local/sbin/pgbouncer",
  "/usr/local/bin/pgbouncer",
];
const RUN_AS = "postgres";
const START_TIMEOUT_MS = 10_000;

/** What to add to the PgBouncer config. */
export interface PgBouncerOptions {
  /**
   * More `[databases]` entries: name → extra connection options (such as `pool_size=2`)
   * appended to the target's `host`, `port`, `dbname`, `user` (and `password`).
   */
  databases?: Record<string, string>;
  /** More (or overriding) `[pgbouncer]` settings, such as `ignore_startup_parameters`. */
  settings?: Record<string, string>;
}

/** A running PgBouncer. */
export interface PgBouncer {
  /** TCP port on 127.0.0.1. */
  readonly port: number;
  /** The `[databases]` entry named like the target database. */
  readonly database: string;
  /** Where the temp dir (config, log, socket) is. */
  readonly dir: string;
  /** A `postgres://` URL for a `[databases]` entry (default: the target's name). */
  url(database?: string): string;
  /** Runs a command on the admin console (`SHOW POOLS`, `SET …`, `KILL db`, `RESUME db`). */
  admin(command: string): Promise<Record<string, unknown>[]>;
  /** The log so far. */
  log(): Promise<string>;
  /** Kills PgBouncer and removes its temp dir; later calls return the same promise. */
  stop(): Promise<void>;
}

interface Target {
  host: string;
  port: number;
  database: string;
  user: string;
  password: string;
}

function findBinary(): string | undefined {
  for (const path of BINARIES) {
    try {
      if (Deno.statSync(path).isFile) return path;
    } catch {
      // not there
    }
  }
  return undefined;
}

/** uid and gid of a user, from /etc/passwd. */
function userIds(name: string): { uid: number; gid: number } | undefined {
  for (const line of Deno.readTextFileSync("/etc/passwd").split("\n")) {
    const fields = line.split(":");
    if (fields[0] === name) return { uid: Number(fields[2]), gid: Number(fields[3]) };
  }
  return undefined;
}

/**
 * Why PgBouncer cannot be started here, or `undefined` when it can.
 *
 * @returns The reason, for the skipped test's name.
 */
export function pgbouncerUnavailable(): string | undefined {
  try {
    if (findBinary() === undefined) {
      return `no pgbouncer binary (looked in ${BINARIES.join(", ")}); apt-get install pgbouncer`;
    }
    if (Deno.uid() === 0 && userIds(RUN_AS) === undefined) {
      return `running as root, but there is no '${RUN_AS}' user for PgBouncer to run as`;
    }
    return undefined;
  } catch (error) {
    return `cannot check for pgbouncer (${(error as Error).message})`;
  }
}

/** The startup parameters pgdbm sends that PgBouncer 1.18 does not know (README). */
export const IGNORED_STARTUP_PARAMETERS: readonly string[] = [
  "jit",
  "statement_timeout",
  "lock_timeout",
  "idle_in_transaction_session_timeout",
];

/**
 * Installs PgBouncer from Debian's packages when it is absent and this runs as root with
 * apt-get; concurrent callers wait for each other on dpkg's lock. Nothing else on the host
 * is touched: if the package starts a system PgBouncer (Debian's listens on 6432 and
 * `/var/run/postgresql`), it is left as it is, since the tests' own instances listen on a
 * free port with their own socket and pid files in a temp dir and never meet it.
 */
async function installPgBouncer(): Promise<void> {
  if (findBinary() !== undefined || Deno.uid() !== 0) return;
  try {
    Deno.statSync("/usr/bin/apt-get");
  } catch {
    return;
  }
  const env = { DEBIAN_FRONTEND: "noninteractive" };
  const apt = (args: string[]) =>
    new Deno.Command("apt-get", { args, env, stdout: "null", stderr: "null" }).output();
  const install = ["-o", "DPkg::Lock::Timeout=120", "install", "-y", "-q", "pgbouncer"];
  if (!(await apt(install)).success) {
    await apt(["-o", "DPkg::Lock::Timeout=120", "update", "-q"]);
    await apt(install);
  }
}

/**
 * Why the PgBouncer tests cannot run here (no PgBouncer, or no server), or `undefined`.
 * PgBouncer is installed from Debian's packages first when it is absent and this runs as
 * root. With PGDBM_REQUIRE_SERVER=1 a missing PgBouncer is an error instead of a reason
 * to skip.
 */
export async function pgbouncerSkipReason(): Promise<string | undefined> {
  await installPgBouncer();
  const missing = pgbouncerUnavailable();
  if (missing !== undefined && Deno.env.get("PGDBM_REQUIRE_SERVER") === "1") {
    throw new Error(`PGDBM_REQUIRE_SERVER=1 but PgBouncer cannot start: ${missing}`);
  }
  return missing ?? (SERVER_AVAILABLE ? undefined : "no PostgreSQL server at PGDBM_TEST_URL");
}

function parseTarget(url: string): Target {
  const parsed = new URL(url);
  const socketDir = parsed.searchParams.get("host");
  const hostname = decodeURIComponent(parsed.hostname).replace(/^\[(.*)\]$/, "$1");
  const user = decodeURIComponent(parsed.username) || "postgres";
  return {
    host: socketDir ?? (hostname || "/var/run/postgresql"),
    port: Number(parsed.port || 5432),
    database: decodeURIComponent(parsed.pathname.slice(1)) || user,
    user,
    password: decodeURIComponent(parsed.password),
  };
}

/** A value of a PgBouncer connection string, single-quoted. */
function quoted(value: string): string {
  if (/['\\]/.test(value)) {
    throw new Error(`Cannot put '${value.replace(/./g, "*")}' into a PgBouncer connection string`);
  }
  return `'${value}'`;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

async function readLog(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch {
    return "(no log)";
  }
}

/**
 * Starts PgBouncer in front of the server of `targetUrl`; call `stop()` in `finally`.
 *
 * @param targetUrl The server (PGDBM_TEST_URL).
 * @param options More databases and settings.
 * @returns The running PgBouncer, once it accepts connections.
 * @throws {Error} When it exits or does not listen within 10 s (with its log).
 */
export async function startPgBouncer(
  targetUrl: string,
  options: PgBouncerOptions = {},
): Promise<PgBouncer> {
  const binary = findBinary();
  if (binary === undefined) throw new Error(pgbouncerUnavailable());
  const target = parseTarget(targetUrl);
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_pgbouncer_" });
  const port = freePort();
  const logfile = `${dir}/pgbouncer.log`;
  const server = [
    `host=${quoted(target.host)}`,
    `port=${target.port}`,
    `dbname=${quoted(target.database)}`,
    `user=${quoted(target.user)}`,
    ...(target.password === "" ? [] : [`password=${quoted(target.password)}`]),
  ].join(" ");
  const databases: Record<string, string> = { [target.database]: server };
  for (const [name, extra] of Object.entries(options.databases ?? {})) {
    databases[name] = `${server} ${extra}`;
  }
  const settings: Record<string, string> = {
    listen_addr: "127.0.0.1",
    listen_port: String(port),
    unix_socket_dir: dir,
    pool_mode: "transaction",
    auth_type: "trust",
    auth_file: `${dir}/userlist.txt`,
    admin_users: target.user,
    logfile,
    pidfile: `${dir}/pgbouncer.pid`,
    max_client_conn: "500",
    ...options.settings,
  };
  const ini = [
    "[databases]",
    ...Object.entries(databases).map(([name, value]) => `${name} = ${value}`),
    "",
    "[pgbouncer]",
    ...Object.entries(settings).map(([name, value]) => `${name} = ${value}`),
    "",
  ].join("\n");
  const config = `${dir}/pgbouncer.ini`;
  await Deno.writeTextFile(config, ini);
  await Deno.writeTextFile(`${dir}/userlist.txt`, `"${target.user.replaceAll('"', '""')}" ""\n`);

  const args = [config];
  if (Deno.uid() === 0) {
    const ids = userIds(RUN_AS)!;
    for (const path of [dir, config, `${dir}/userlist.txt`]) {
      await Deno.chown(path, ids.uid, ids.gid);
    }
    args.unshift("-u", RUN_AS);
  }
  const child = new Deno.Command(binary, { args, stdin: "null", stdout: "null", stderr: "null" })
    .spawn();
  let exited = false;
  const status = child.status.finally(() => exited = true);

  let admin: postgres.Sql | undefined;
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    stopping ??= (async () => {
      try {
        await admin?.end({ timeout: 0 });
        if (!exited) child.kill("SIGTERM");
        await status;
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    })();

  const deadline = performance.now() + START_TIMEOUT_MS;
  while (true) {
    if (exited) {
      const log = await readLog(logfile);
      await stop();
      throw new Error(`PgBouncer exited at start (status ${(await status).code}):\n${log}`);
    }
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conn.close();
      break;
    } catch {
      if (performance.now() > deadline) {
        const log = await readLog(logfile);
        await stop();
        throw new Error(`PgBouncer did not listen on port ${port} within 10 s:\n${log}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  const user = encodeURIComponent(target.user);
  return {
    port,
    database: target.database,
    dir,
    url: (database = target.database) =>
      `postgres://${user}@127.0.0.1:${port}/${encodeURIComponent(database)}`,
    async admin(command: string): Promise<Record<string, unknown>[]> {
      admin ??= postgres({
        host: "127.0.0.1",
        port,
        database: "pgbouncer",
        username: target.user,
        max: 1,
        prepare: false,
        fetch_types: false,
        onnotice: () => {},
      });
      // The admin console speaks the simple query protocol only.
      return [...await admin.unsafe(command).simple()];
    },
    log: () => readLog(logfile),
    stop,
  };
}
