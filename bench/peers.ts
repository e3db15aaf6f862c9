/**
 * The peers outside Deno: asyncpg (through bench/peers.py) and pgbench, when they are
 * installed. bench/run.ts adds them to its workloads and says which ones are missing.
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import type { Candidate } from "./_support.ts";

const SCRIPT = fileURLToPath(new URL("./peers.py", import.meta.url));
/** Interpreters tried for asyncpg: `PGDBM_BENCH_PYTHON`, then the PATH's, then Debian's. */
const PYTHONS = [Deno.env.get("PGDBM_BENCH_PYTHON"), "python3", "/usr/bin/python3"]
  .filter((p): p is string => p !== undefined && p !== "");

async function output(command: string, args: string[]): Promise<string | undefined> {
  try {
    const result = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
      .output();
    if (!result.success) return undefined;
    return new TextDecoder().decode(result.stdout);
  } catch {
    return undefined;
  }
}

async function run(command: string, args: string[]): Promise<string> {
  const result = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  const text = new TextDecoder().decode(result.stdout);
  if (!result.success) {
    throw new Error(
      `${command} ${args.join(" ")} failed: ${new TextDecoder().decode(result.stderr)}`,
    );
  }
  return text;
}

/** The peers found on this machine. */
export interface ExternalPeers {
  /** asyncpg's run of a workload of bench/peers.py, or undefined when asyncpg is missing. */
  asyncpg?: (workload: string) => Candidate;
  /** asyncpg's start-up process (connect, one query, exit), timed whole. */
  asyncpgStart?: Candidate;
  /** pgbench's built-in TPC-B-like script at `clients` clients, 320 transactions. */
  pgbench?: (clients: number) => Candidate;
}

/** Finds asyncpg and pgbench, logging which are missing. */
export async function externalPeers(
  url: string,
  log: (line: string) => void = console.log,
): Promise<ExternalPeers> {
  const peers: ExternalPeers = {};
  let python: string | undefined;
  for (const candidate of PYTHONS) {
    if (await output(candidate, ["-c", "import asyncpg"]) !== undefined) {
      python = candidate;
      break;
    }
  }
  if (python === undefined) {
    log("asyncpg is not installed (apt-get install python3-asyncpg): its columns are left out");
  } else {
    const py = python;
    peers.asyncpg = (workload) => async () =>
      Number((await run(py, [SCRIPT, url, workload])).trim());
    peers.asyncpgStart = async () => {
      const start = performance.now();
      await run(py, [SCRIPT, url, "first_result"]);
      return performance.now() - start;
    };
  }
  if (await output("pgbench", ["--version"]) === undefined) {
    log("pgbench is not installed (apt-get install postgresql-contrib): its column is left out");
  } else {
    peers.pgbench = (clients) => async () => {
      const text = await run("pgbench", [
        "-n",
        "-b",
        "tpcb-like",
        "-M",
        "prepared",
        "-c",
        String(clients),
        "-j",
        "2",
        "-t",
        String(320 / clients),
        url,
      ]);
      const tps = Number(/tps = ([\d.]+)/.exec(text)?.[1]);
      if (!(tps > 0)) throw new Error(`pgbench printed no tps:\n${text}`);
      return 320 / tps * 1000;
    };
  }
  return peers;
}
