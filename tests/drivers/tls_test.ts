/**
 * TLS against a real TLS server: a throwaway cluster (tests/_support/tls_cluster.ts) with its own
 * CA, a server certificate for `localhost` only, and a user that must present a client
 * certificate.
 */
import assert from "node:assert/strict";
import {
  ConnectionError,
  createSharedPool,
  type DatabaseConfig,
  DatabaseManager,
} from "../../mod.ts";
import { startTlsCluster, tlsClusterUnavailable } from "../_support/tls_cluster.ts";

const unavailable = tlsClusterUnavailable();
if (unavailable !== undefined && Deno.env.get("PGDBM_REQUIRE_SERVER") === "1") {
  throw new Error(`PGDBM_REQUIRE_SERVER=1 but the TLS test cluster cannot start: ${unavailable}`);
}

const PASSWORD = "Tls-Secret-PW-42";

async function sslOf(config: DatabaseConfig): Promise<{ ssl: boolean; user: string }> {
  const pool = await createSharedPool({ retry: { attempts: 1 }, minConnections: 1, ...config });
  try {
    const db = new DatabaseManager({ pool });
    const row = await db.fetchOne<{ ssl: boolean; user: string }>(
      "SELECT ssl, current_user AS user FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    return row!;
  } finally {
    await pool.close();
  }
}

async function refused(config: DatabaseConfig, reason: RegExp): Promise<void> {
  const error = await createSharedPool({ retry: { attempts: 1 }, ...config })
    .then((pool) => pool.close().then(() => undefined), (e) => e);
  assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
  assert.match(error.message, reason);
  for (const text of [error.message, String(error), Deno.inspect(error, { depth: 5 })]) {
    assert.ok(!text.includes(PASSWORD), "the password leaked into the error");
  }
}

Deno.test({
  name: unavailable === undefined
    ? "createSharedPool() speaks TLS in every sslmode against a real TLS server"
    : `createSharedPool() TLS modes (skipped: ${unavailable})`,
  ignore: unavailable !== undefined,
  async fn(t) {
    const cluster = await startTlsCluster();
    const base = { port: cluster.port, database: "postgres", password: PASSWORD };
    try {
      await t.step("a plain connection is refused: the server takes TLS only", async () => {
        await refused({ ...base, host: "127.0.0.1" }, /no encryption/);
      });
      await t.step("require encrypts without checking the certificate", async () => {
        assert.deepEqual(await sslOf({ ...base, host: "127.0.0.1", ssl: { mode: "require" } }), {
          ssl: true,
          user: "postgres",
        });
      });
      await t.step("verify-ca accepts the right CA and refuses another one", async () => {
        const ssl = { mode: "verify-ca" as const, ca: cluster.caFile };
        assert.equal((await sslOf({ ...base, host: "127.0.0.1", ssl })).ssl, true);
        await refused(
          { ...base, host: "127.0.0.1", ssl: { mode: "verify-ca", ca: cluster.otherCaFile } },
          /certificate/i,
        );
      });
      await t.step("verify-full checks the host name too", async () => {
        const ssl = { mode: "verify-full" as const, ca: cluster.caFile };
        assert.equal((await sslOf({ ...base, host: "localhost", ssl })).ssl, true);
        await refused({ ...base, host: "127.0.0.1", ssl }, /does not match|altnames/i);
        await refused({ ...base, host: "localhost", ssl: { mode: "verify-full" } }, /certificate/i);
      });
      await t.step("the URL's sslmode and sslrootcert work like the options", async () => {
        const url = `postgres://postgres:${PASSWORD}@localhost:${cluster.port}/postgres` +
          `?sslmode=verify-full&sslrootcert=${encodeURIComponent(cluster.caFile)}`;
        assert.equal((await sslOf({ connectionString: url })).ssl, true);
      });
      await t.step("a client certificate and key log in a user who must present one", async () => {
        const ssl = {
          mode: "verify-ca" as const,
          ca: cluster.caFile,
          cert: cluster.clientCertFile,
          key: await Deno.readTextFile(cluster.clientKeyFile),
        };
        assert.deepEqual(await sslOf({ ...base, host: "127.0.0.1", user: "certuser", ssl }), {
          ssl: true,
          user: "certuser",
        });
        await refused(
          {
            ...base,
            host: "127.0.0.1",
            user: "certuser",
            ssl: { mode: "verify-ca", ca: cluster.caFile },
          },
          /client certificate/,
        );
      });
    } finally {
      await cluster.stop();
    }
  },
});
