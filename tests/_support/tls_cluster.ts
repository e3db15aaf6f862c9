/**
 * A throwaway PostgreSQL cluster with TLS for the TLS tests: its own CA, a server
 * certificate for `localhost` only, and a client certificate for the user `certuser`
 * (who must present it). It listens on 127.0.0.1 and a free port, accepts only TLS over
 * TCP, and is stopped and deleted by `stop()`. Needs the Debian PostgreSQL binaries,
 * openssl, and root (to run the server as the `postgres` user).
 */

const PG_ROOT = "/usr/lib/postgresql";

/** A running TLS cluster. */
export interface TlsCluster {
  /** TCP port on 127.0.0.1. */
  port: number;
  /** Path of the CA certificate that signed the server and client certificates. */
  caFile: string;
  /** Path of a CA certificate that signed nothing here. */
  otherCaFile: string;
  /** Client certificate and key of `certuser`. */
  clientCertFile: string;
  /** Client key of `certuser`. */
  clientKeyFile: string;
  /** Stops the server and removes its files. */
  stop(): Promise<void>;
}

async function run(command: string, args: string[], cwd: string): Promise<void> {
  const output = await new Deno.Command(command, { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  if (!output.success) {
    const stderr = new TextDecoder().decode(output.stderr);
    throw new Error(`${command} ${args.join(" ")} failed: ${stderr}`);
  }
}

/** Why a TLS cluster cannot be started here, or `undefined` when it can. */
export function tlsClusterUnavailable(): string | undefined {
  try {
    if (Deno.uid() !== 0) return "the tests do not run as root";
    const versions = [...Deno.readDirSync(PG_ROOT)].map((e) => e.name);
    if (versions.length === 0) return `no PostgreSQL under ${PG_ROOT}`;
    Deno.statSync("/usr/bin/openssl");
    Deno.statSync("/usr/sbin/runuser");
    return undefined;
  } catch (error) {
    return `missing tools (${(error as Error).message})`;
  }
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Starts the cluster; call `stop()` in `finally`. */
export async function startTlsCluster(): Promise<TlsCluster> {
  const version = [...Deno.readDirSync(PG_ROOT)].map((e) => e.name).sort().at(-1)!;
  const bin = `${PG_ROOT}/${version}/bin`;
  const dir = await Deno.makeTempDir({ prefix: "pgdbm_tls_" });
  const ssl = (args: string[]) => run("openssl", args, dir);
  const csr = async (name: string, subject: string) =>
    await ssl([
      "req",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-subj",
      subject,
      "-keyout",
      `${name}.key`,
      "-out",
      `${name}.csr`,
    ]);
  const sign = async (name: string, extra: string[] = []) =>
    await ssl([
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      "ca.crt",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-days",
      "2",
      "-out",
      `${name}.crt`,
      ...extra,
    ]);
  for (const ca of ["ca", "other_ca"]) {
    await ssl([
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "2",
      "-subj",
      `/CN=pgdbm ${ca}`,
      "-keyout",
      `${ca}.key`,
      "-out",
      `${ca}.crt`,
    ]);
  }
  await Deno.writeTextFile(`${dir}/san.ext`, "subjectAltName=DNS:localhost\n");
  await csr("server", "/CN=localhost");
  await sign("server", ["-extfile", "san.ext"]);
  await csr("client", "/CN=certuser");
  await sign("client");
  await Deno.chmod(`${dir}/server.key`, 0o600);
  await run("chown", ["-R", "postgres", dir], dir);
  const asPostgres = (args: string[]) => run("runuser", ["-u", "postgres", "--", ...args], dir);
  await asPostgres([`${bin}/initdb`, "-D", `${dir}/data`, "-A", "trust", "-U", "postgres"]);
  await Deno.writeTextFile(
    `${dir}/data/pg_hba.conf`,
    [
      "local all all trust",
      "hostssl all certuser 127.0.0.1/32 cert",
      "hostssl all all 127.0.0.1/32 trust",
      "",
    ].join("\n"),
  );
  const port = freePort();
  const options = [
    `-p ${port}`,
    `-k ${dir}`,
    "-c listen_addresses=127.0.0.1",
    "-c ssl=on",
    `-c ssl_cert_file=${dir}/server.crt`,
    `-c ssl_key_file=${dir}/server.key`,
    `-c ssl_ca_file=${dir}/ca.crt`,
  ].join(" ");
  await asPostgres([
    `${bin}/pg_ctl`,
    "-D",
    `${dir}/data`,
    "-l",
    `${dir}/log`,
    "-w",
    "-o",
    options,
    "start",
  ]);
  await asPostgres([
    `${bin}/psql`,
    "-h",
    dir,
    "-p",
    String(port),
    "-qc",
    "CREATE USER certuser",
    "postgres",
  ]);
  return {
    port,
    caFile: `${dir}/ca.crt`,
    otherCaFile: `${dir}/other_ca.crt`,
    clientCertFile: `${dir}/client.crt`,
    clientKeyFile: `${dir}/client.key`,
    async stop() {
      try {
        await asPostgres([`${bin}/pg_ctl`, "-D", `${dir}/data`, "-m", "immediate", "-w", "stop"]);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  };
}
