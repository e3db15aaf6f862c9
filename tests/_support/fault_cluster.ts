/**
 * A throwaway PostgreSQL cluster the fault tests may hurt: terminate its backends, restart
 * it (`pg_ctl restart -m fast`), freeze it (SIGSTOP of the postmaster and every backend)
 * and thaw it. A fresh `initdb` (trust auth, unless `hba` lines say otherwise) that listens
 * on 127.0.0.1 and a free port, with its Unix socket in its own temporary folder. Built for speed, not safety
 * (`fsync=off`; a fast shutdown still writes every committed transaction). `stop()` thaws,
 * stops and deletes it, even after a failure; so does SIGINT or SIGTERM of the test run. Needs the Debian PostgreSQL binaries and
 * root (the server runs as the `postgres` user), like tests/_support/replica_cluster.ts, whose
 * availability check it shares.
 */

import { replicaClusterUnavailable } from "./replica_cluster.ts";

const PG_ROOT = "/usr/lib/postgresql";
const RUNUSER = "/usr/sbin/runuser";
const PGREP = "/usr/bin/pgrep";

/** A running throwaway cluster. */
export interface FaultCluster {
  /** TCP port on 127.0.0.1. */
  readonly port: number;
  /** `postgres://postgres@127.0.0.1:<port>/postgres`. */
  readonly url: string;
  /** The folder of the server's Unix socket (`<socketDir>/.s.PGSQL.<port>`). */
  readonly socketDir: string;
  /**
   * Runs SQL through `psql` over the Unix socket, as `postgres`; returns the unaligned,
   * tuples-only output. `psql` is killed (and this rejects) after `timeoutMs`.
   */
  psql(sql: string, timeoutMs?: number): Promise<string>;
  /**
   * Restarts the server (`-m fast`): every session ends, the server comes back on the same
   * port. With `downMs`, it stays stopped that long first (connections are refused).
   */
  restart(downMs?: number): Promise<void>;
  /**
   * Stops (SIGSTOP) the postmaster and all its children for `ms`, then continues them
   * (SIGCONT, also when something throws). Returns how many processes were frozen.
   */
  freeze(ms: number): Promise<number>;
  /** The last lines of the server log (for failure reports). */
  logTail(lines?: number): Promise<string>;
  /** Thaws, stops and deletes the cluster; later calls return the same promise. */
  stop(): Promise<void>;
}

/** Options of {@link startFaultCluster}. */
export interface FaultClusterOptions {
  /**
   * The server's `max_connections`.
   * @default {60}
   */
  maxConnections?: number;
  /** More `postgresql.conf` lines. */
  settings?: readonly string[];
  /**
   * More `pg_hba.conf` lines, put before the default ones (trust for every local socket
   * and 127.0.0.1 connection), so they win where they match (the first matching line
   * applies). Keep `psql()` working: leave `local … postgres` connections alone.
   */
  hba?: readonly string[];
}

/**
 * Why a fault cluster cannot be started here, or `undefined` when it can.
 *
 * @returns The reason, for the skipped test's name.
 */
export function faultClusterUnavailable(): string | undefined {
  const reason = replicaClusterUnavailable();
  if (reason !== undefined) return reason;
  try {
    Deno.statSync(PGREP);
    return undefined;
  } catch (error) {
    return `missing tools (${(error as Error).message})`;
  }
}

function binDir(): string {
  const versions = [...Deno.readDirSync(PG_ROOT)]
    .map((entry) => entry.name)
    .filter((name) => /^\d+$/.test(name))
    .sort((a, b) => Number(a) - Number(b));
  return `${PG_ROOT}/${versions.at(-1)}/bin`;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

async function run(command: string, args: string[], signal?: AbortSignal): Promise<string> {
  const output = await new Deno.Command(command, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal,
  }).output();
  const stdout = new TextDecoder().decode(output.stdout);
  if (!output.success) {
    const stderr = new TextDecoder().decode(output.stderr);
    const why = signal?.aborted ? " (killed: it ran too long)" : "";
    throw new Error(`${command} ${args.join(" ")} failed${why}: ${stderr}${stdout}`);
  }
  return stdout;
}

function signalProcess(pid: number, signal: Deno.Signal): boolean {
  try {
    Deno.kill(pid, signal);
    return true;
  } catch {
    return false; // it exited meanwhile
  }
}

/**
 * Starts a cluster; call `stop()` in `finally`.
 *
 * @param options `max_connections`, extra settings and extra `pg_hba.conf` lines.
 * @returns The running cluster.
 * @throws {Error} When it does not start (what was made is removed).
 */
export async function startFaultCluster(options: FaultClusterOptions = {}): Promise<FaultCluster> {
  const unavailable = faultClusterUnavailable();
  if (unavailable !== undefined) throw new Error(`Cannot start a fault cluster: ${unavailable}`);
  const bin = binDir();
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_fault_" });
  const data = `${dir}/data`;
  const log = `${dir}/server.log`;
  const port = freePort();
  const asPostgres = (args: string[], signal?: AbortSignal) =>
    run(RUNUSER, ["-u", "postgres", "--", ...args], signal);
  const pgCtl = (args: string[]) =>
    asPostgres([`${bin}/pg_ctl`, "-D", data, "-l", log, "-w", "-t", "60", ...args]);
  let running = false;
  let frozen: number[] = [];

  const thaw = () => {
    // Backends first, then the postmaster (which may fork new ones at once).
    for (const pid of frozen.toReversed()) signalProcess(pid, "SIGCONT");
    frozen = [];
  };
  const postmasterPid = async (): Promise<number> => {
    const text = await Deno.readTextFile(`${data}/postmaster.pid`);
    const pid = Number(text.split("\n")[0]);
    if (!Number.isInteger(pid) || pid <= 0) throw new Error(`Bad postmaster.pid: ${text}`);
    return pid;
  };
  const children = async (pid: number): Promise<number[]> => {
    const output = await new Deno.Command(PGREP, { args: ["-P", String(pid)], stdout: "piped" })
      .output(); // exit code 1: no children
    return new TextDecoder().decode(output.stdout).split("\n").filter((l) => l !== "")
      .map(Number);
  };

  // Ctrl-C or a kill of the test run still stops the server and deletes its files.
  const interrupted = () => {
    stop().finally(() => Deno.exit(130));
  };
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    stopping ??= (async () => {
      for (const signal of signals) Deno.removeSignalListener(signal, interrupted);
      try {
        thaw();
        if (running) {
          await pgCtl(["-m", "immediate", "stop"]).catch(async (error) => {
            // pg_ctl could not stop it: kill what is left rather than leak a server.
            const pid = await postmasterPid().catch(() => undefined);
            if (pid !== undefined) {
              for (const child of await children(pid)) signalProcess(child, "SIGKILL");
              signalProcess(pid, "SIGKILL");
            }
            console.warn(`fault cluster: pg_ctl stop failed, killed it: ${error}`);
          });
          running = false;
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    })();

  for (const signal of signals) Deno.addSignalListener(signal, interrupted);
  try {
    await run("chown", ["postgres", dir]);
    await asPostgres([
      `${bin}/initdb`,
      "-D",
      data,
      "-A",
      "trust",
      "-U",
      "postgres",
      "-N",
      "--no-instructions",
    ]);
    const settings = [
      "listen_addresses = '127.0.0.1'",
      `port = ${port}`,
      `unix_socket_directories = '${dir}'`,
      `max_connections = ${options.maxConnections ?? 60}`,
      "shared_buffers = '32MB'",
      "fsync = off",
      "full_page_writes = off",
      "log_min_messages = warning",
      ...(options.settings ?? []),
    ];
    await Deno.writeTextFile(`${data}/postgresql.conf`, settings.join("\n") + "\n", {
      append: true,
    });
    await Deno.writeTextFile(
      `${data}/pg_hba.conf`,
      [...(options.hba ?? []), "local all all trust", "host all all 127.0.0.1/32 trust"]
        .join("\n") + "\n",
    );
    await pgCtl(["start"]);
    running = true;
  } catch (error) {
    await stop();
    throw error;
  }

  return {
    port,
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    socketDir: dir,
    async psql(sql, timeoutMs = 10_000) {
      const out = await run(`${bin}/psql`, [
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        dir,
        "-p",
        String(port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
      ], AbortSignal.timeout(timeoutMs));
      return out.trim();
    },
    async restart(downMs = 0) {
      thaw();
      if (downMs <= 0) {
        await pgCtl(["-m", "fast", "restart"]);
        return;
      }
      await pgCtl(["-m", "fast", "stop"]);
      running = false;
      await new Promise((resolve) => setTimeout(resolve, downMs));
      await pgCtl(["start"]);
      running = true;
    },
    async freeze(ms) {
      const pid = await postmasterPid();
      try {
        // The postmaster first, so that it forks no backend the list below would miss.
        if (signalProcess(pid, "SIGSTOP")) frozen.push(pid);
        for (const child of await children(pid)) {
          if (signalProcess(child, "SIGSTOP")) frozen.push(child);
        }
        const count = frozen.length;
        await new Promise((resolve) => setTimeout(resolve, ms));
        return count;
      } finally {
        thaw();
      }
    },
    async logTail(lines = 40) {
      const text = await Deno.readTextFile(log).catch(() => "");
      return text.split("\n").slice(-lines - 1).join("\n");
    },
    stop,
  };
}
