/**
 * A throwaway primary with streaming standbys for the read-replica tests and benchmark.
 * The primary is a fresh `initdb` (trust auth, `wal_level=replica`, a `replication` entry
 * for 127.0.0.1); each standby is a `pg_basebackup -R -X stream` of it, started in hot
 * standby. Every node listens on 127.0.0.1 and a free port. Built for speed, not safety
 * (`fsync=off`, small buffers). `stop()` stops every node and deletes every file, even
 * after a failure. Needs the Debian PostgreSQL binaries and root (the servers run as the
 * `postgres` user).
 */

const PG_ROOT = "/usr/lib/postgresql";
const TOOLS = ["initdb", "pg_ctl", "pg_basebackup", "psql"];
const RUNUSER = "/usr/sbin/runuser";
const REPLAY_TIMEOUT_MS = 15_000;

/** A running primary with its standbys. */
export interface ReplicaCluster {
  /** `postgres://postgres@127.0.0.1:<port>/postgres` of the primary. */
  readonly primaryUrl: string;
  /** The same URL form for each standby, in start order. */
  readonly standbyUrls: readonly string[];
  /** Pauses WAL replay on a standby (`pg_wal_replay_pause()`): it falls behind. */
  pauseReplay(standby?: number): Promise<void>;
  /** Resumes WAL replay on a standby (`pg_wal_replay_resume()`). */
  resumeReplay(standby?: number): Promise<void>;
  /** Stops a standby at once (`pg_ctl stop -m immediate`): its sessions drop. */
  stopStandby(standby?: number): Promise<void>;
  /** Starts a stopped standby again and waits until it accepts connections. */
  startStandby(standby?: number): Promise<void>;
  /** Waits until a standby has replayed everything the primary has written so far. */
  waitForReplay(standby?: number): Promise<void>;
  /** Stops every node and removes the files; later calls return the same promise. */
  stop(): Promise<void>;
}

/** Options of {@link startReplicaCluster}. */
export interface ReplicaClusterOptions {
  /**
   * How many standbys to start.
   * @default {1}
   */
  standbys?: number;
}

interface Node {
  name: string;
  port: number;
  running: boolean;
}

/**
 * Why a replica cluster cannot be started here, or `undefined` when it can.
 *
 * @returns The reason, for the skipped test's name.
 */
export function replicaClusterUnavailable(): string | undefined {
  try {
    if (Deno.uid() !== 0) return "the tests do not run as root (servers run as 'postgres')";
    Deno.statSync(RUNUSER);
    const bin = binDir();
    if (bin === undefined) return `no PostgreSQL under ${PG_ROOT}`;
    for (const tool of TOOLS) Deno.statSync(`${bin}/${tool}`);
    return undefined;
  } catch (error) {
    return `missing tools (${(error as Error).message})`;
  }
}

function binDir(): string | undefined {
  const versions = [...Deno.readDirSync(PG_ROOT)]
    .map((entry) => entry.name)
    .filter((name) => /^\d+$/.test(name))
    .sort((a, b) => Number(a) - Number(b));
  return versions.length === 0 ? undefined : `${PG_ROOT}/${versions.at(-1)}/bin`;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

async function run(command: string, args: string[]): Promise<string> {
  const output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  const stdout = new TextDecoder().decode(output.stdout);
  if (!output.success) {
    const stderr = new TextDecoder().decode(output.stderr);
    throw new Error(`${command} ${args.join(" ")} failed: ${stderr}${stdout}`);
  }
  return stdout;
}

const PRIMARY_SETTINGS = [
  "listen_addresses = '127.0.0.1'",
  "wal_level = replica",
  "max_wal_senders = 10",
  "wal_keep_size = '256MB'",
  "hot_standby = on",
  "hot_standby_feedback = on",
  "max_connections = 60",
  "shared_buffers = '16MB'",
  "fsync = off",
  "synchronous_commit = off",
  "wal_receiver_status_interval = '1s'",
  "log_min_messages = warning",
];

const HBA = [
  "local all all trust",
  "host all all 127.0.0.1/32 trust",
  "host replication all 127.0.0.1/32 trust",
  "",
].join("\n");

/**
 * Starts a primary and its standbys; call `stop()` in `finally`.
 *
 * @param options How many standbys.
 * @returns The cluster, once every standby streams and has replayed the primary's start.
 * @throws {Error} When a node does not start (everything started is stopped and removed).
 */
export async function startReplicaCluster(
  options: ReplicaClusterOptions = {},
): Promise<ReplicaCluster> {
  const bin = binDir();
  if (bin === undefined || replicaClusterUnavailable() !== undefined) {
    throw new Error(`Cannot start a replica cluster: ${replicaClusterUnavailable()}`);
  }
  const count = options.standbys ?? 1;
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_replica_" });
  await run("chown", ["postgres", dir]);
  const asPostgres = (args: string[]) => run(RUNUSER, ["-u", "postgres", "--", ...args]);
  const primary: Node = { name: "primary", port: freePort(), running: false };
  const standbys: Node[] = [];

  const pgCtl = async (node: Node, action: "start" | "stop"): Promise<void> => {
    const data = `${dir}/${node.name}`;
    if (action === "start") {
      await asPostgres([
        `${bin}/pg_ctl`,
        "-D",
        data,
        "-l",
        `${dir}/${node.name}.log`,
        "-w",
        "-t",
        "30",
        "-o",
        `-p ${node.port} -k ${dir}`,
        "start",
      ]);
      node.running = true;
    } else {
      await asPostgres([`${bin}/pg_ctl`, "-D", data, "-m", "immediate", "-w", "stop"]);
      node.running = false;
    }
  };
  const psql = (node: Node, sql: string): Promise<string> =>
    run(`${bin}/psql`, [
      "-X",
      "-At",
      "-v",
      "ON_ERROR_STOP=1",
      "-h",
      "127.0.0.1",
      "-p",
      String(node.port),
      "-U",
      "postgres",
      "-d",
      "postgres",
      "-c",
      sql,
    ]).then((out) => out.trim());
  const standbyAt = (index: number): Node => {
    const node = standbys[index];
    if (node === undefined) throw new RangeError(`No standby ${index}; there are ${count}`);
    return node;
  };
  const waitForReplay = async (index = 0): Promise<void> => {
    const node = standbyAt(index);
    const target = await psql(primary, "SELECT pg_current_wal_lsn()");
    const deadline = performance.now() + REPLAY_TIMEOUT_MS;
    while (true) {
      const done = await psql(
        node,
        `SELECT coalesce(pg_last_wal_replay_lsn() >= '${target}'::pg_lsn, false)`,
      );
      if (done === "t") return;
      if (performance.now() > deadline) {
        throw new Error(`Standby ${index} did not replay up to ${target} within 15 s`);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    stopping ??= (async () => {
      try {
        for (const node of [...standbys, primary]) {
          if (node.running) await pgCtl(node, "stop").catch(() => {});
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    })();

  try {
    await asPostgres([
      `${bin}/initdb`,
      "-D",
      `${dir}/primary`,
      "-A",
      "trust",
      "-U",
      "postgres",
      "-N",
      "--no-instructions",
    ]);
    await Deno.writeTextFile(
      `${dir}/primary/postgresql.conf`,
      PRIMARY_SETTINGS.join("\n") + "\n",
      { append: true },
    );
    await Deno.writeTextFile(`${dir}/primary/pg_hba.conf`, HBA);
    await pgCtl(primary, "start");
    for (let index = 0; index < count; index++) {
      const node: Node = { name: `standby${index}`, port: freePort(), running: false };
      standbys.push(node);
      await asPostgres([
        `${bin}/pg_basebackup`,
        "-h",
        "127.0.0.1",
        "-p",
        String(primary.port),
        "-U",
        "postgres",
        "-D",
        `${dir}/${node.name}`,
        "-R",
        "-X",
        "stream",
        "-c",
        "fast",
        "-N",
      ]);
      await pgCtl(node, "start");
    }
    for (let index = 0; index < count; index++) await waitForReplay(index);
  } catch (error) {
    await stop();
    throw error;
  }

  const url = (node: Node) => `postgres://postgres@127.0.0.1:${node.port}/postgres`;
  return {
    primaryUrl: url(primary),
    standbyUrls: standbys.map(url),
    async pauseReplay(index = 0) {
      await psql(standbyAt(index), "SELECT pg_wal_replay_pause()");
    },
    async resumeReplay(index = 0) {
      await psql(standbyAt(index), "SELECT pg_wal_replay_resume()");
    },
    async stopStandby(index = 0) {
      await pgCtl(standbyAt(index), "stop");
    },
    async startStandby(index = 0) {
      await pgCtl(standbyAt(index), "start");
    },
    waitForReplay,
    stop,
  };
}
