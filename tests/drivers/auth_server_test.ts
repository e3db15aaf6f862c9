/**
 * Password authentication and Unix sockets of the wire driver against a real server: a
 * throwaway cluster (tests/_support/fault_cluster.ts) whose pg_hba.conf asks each test role
 * for its own method. The other server tests only ever use trust auth over TCP, so this is
 * the only place where SCRAM-SHA-256, md5 and cleartext passwords, a missing password, and
 * a Unix socket connection (with a cancel request over that socket) meet PostgreSQL.
 *
 * 1. SCRAM-SHA-256: the right password connects; a wrong one rejects with ConnectionError
 *    carrying the server's "password authentication failed", never the password, after a
 *    single attempt (28P01 is not retried).
 * 2. md5: a role whose password is stored as md5, under hba `md5`.
 * 3. `password` (cleartext).
 * 4. No password where one is required: a clear message, not retried.
 * 5. Unix socket folder with trust, and a `timeoutMs` cancel sent over the socket.
 */
import assert from "node:assert/strict";
import { ConnectionError, createSharedPool, DatabaseManager, type Pool } from "../../mod.ts";
import { TimeoutError } from "../../src/errors.ts";
import type { DatabaseConfig } from "../../src/config.ts";
import { faultClusterUnavailable, startFaultCluster } from "../_support/fault_cluster.ts";

const unavailable = faultClusterUnavailable();
if (unavailable !== undefined && Deno.env.get("PGDBM_REQUIRE_SERVER") === "1") {
  throw new Error(`PGDBM_REQUIRE_SERVER=1 but the fault test cluster cannot start: ${unavailable}`);
}

/** Passwords with characters SCRAM's SASLprep and the md5 hash must carry as they are. */
const SCRAM_PASSWORD = "scr-Pässwörd_9!x";
const MD5_PASSWORD = "md5-Secret/42#q";
const CLEAR_PASSWORD = "clear-Secret:77@z";
const WRONG_PASSWORD = "Wrong-Guess-31415";

/** Retries that would show (attempts > 1) if an authentication failure were retried. */
const RETRY = { attempts: 3, delayMs: 50, backoff: 2 };

/** Every place a rejected connection's text can reach a log. */
function texts(error: Error): string[] {
  return [error.message, String(error), Deno.inspect(error, { depth: 5 })];
}

/** Runs `body` with a pool of one connection opened with `config`, then closes it. */
async function withPool<T>(
  config: DatabaseConfig,
  body: (db: DatabaseManager, pool: Pool) => Promise<T>,
): Promise<T> {
  const pool = await createSharedPool({ minConnections: 1, maxConnections: 1, ...config });
  try {
    return await body(new DatabaseManager({ pool }), pool);
  } finally {
    await pool.close();
  }
}

/** Runs `body` without DB_PASSWORD and PGPASSWORD (the config's fallbacks), then restores them. */
async function withoutEnvPassword<T>(body: () => Promise<T>): Promise<T> {
  const saved = new Map<string, string>();
  for (const name of ["DB_PASSWORD", "PGPASSWORD"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) {
      saved.set(name, value);
      Deno.env.delete(name);
    }
  }
  try {
    return await body();
  } finally {
    for (const [name, value] of saved) Deno.env.set(name, value);
  }
}

Deno.test({
  name: unavailable === undefined
    ? "Wire driver against a real server: SCRAM-SHA-256, md5 and cleartext passwords, a missing password, and a Unix socket with a cancel"
    : `Wire driver authentication and Unix sockets (skipped: ${unavailable})`,
  ignore: unavailable !== undefined,
  async fn(t) {
    const cluster = await startFaultCluster({
      maxConnections: 20,
      hba: [
        "host all scram_user 127.0.0.1/32 scram-sha-256",
        "host all md5_user 127.0.0.1/32 md5",
        "host all clear_user 127.0.0.1/32 password",
      ],
    });
    try {
      await cluster.psql(
        "SET password_encryption = 'scram-sha-256';" +
          `CREATE ROLE scram_user LOGIN PASSWORD '${SCRAM_PASSWORD}';` +
          `CREATE ROLE clear_user LOGIN PASSWORD '${CLEAR_PASSWORD}';` +
          "SET password_encryption = 'md5';" +
          `CREATE ROLE md5_user LOGIN PASSWORD '${MD5_PASSWORD}';`,
      );
      // The md5 step tests md5 only if the secret is md5: with a SCRAM secret the server
      // would switch an `md5` hba line to SCRAM.
      assert.equal(
        await cluster.psql(
          "SELECT string_agg(rolname || '=' || CASE WHEN rolpassword LIKE 'md5%' THEN 'md5' " +
            "ELSE split_part(rolpassword, '$', 1) END, ',' ORDER BY rolname) FROM pg_authid " +
            "WHERE rolname IN ('scram_user', 'md5_user', 'clear_user')",
        ),
        "clear_user=SCRAM-SHA-256,md5_user=md5,scram_user=SCRAM-SHA-256",
      );
      const tcp = (user: string, password?: string): DatabaseConfig => ({
        host: "127.0.0.1",
        port: cluster.port,
        database: "postgres",
        user,
        password,
        retry: RETRY,
      });

      await t.step("SCRAM-SHA-256: the right password connects and queries", async () => {
        await withPool(tcp("scram_user", SCRAM_PASSWORD), async (db) => {
          assert.equal(await db.fetchValue("SELECT current_user"), "scram_user");
          assert.equal(await db.fetchValue("SELECT $1::int + 1", [41]), 42);
        });
      });

      await t.step(
        "SCRAM-SHA-256: a wrong password rejects once with the server's message, never the password",
        async () => {
          const error = await createSharedPool({
            ...tcp("scram_user", WRONG_PASSWORD),
            minConnections: 1,
            maxConnections: 1,
          }).then(
            async (pool) => {
              await pool.close();
              assert.fail("the pool opened with a wrong password");
            },
            (reason: unknown) => reason,
          );
          assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
          assert.match(error.message, /password authentication failed/);
          assert.equal(error.attempts, 1, `retried: ${error.message}`);
          for (const text of texts(error)) {
            assert.ok(!text.includes(WRONG_PASSWORD), `the password leaked: ${text}`);
            assert.ok(!text.includes(SCRAM_PASSWORD), `the real password leaked: ${text}`);
          }
        },
      );

      await t.step("md5: a role stored as md5 connects under hba md5", async () => {
        await withPool(tcp("md5_user", MD5_PASSWORD), async (db) => {
          assert.equal(await db.fetchValue("SELECT current_user"), "md5_user");
        });
      });

      await t.step("password (cleartext): connects under hba password", async () => {
        await withPool(tcp("clear_user", CLEAR_PASSWORD), async (db) => {
          assert.equal(await db.fetchValue("SELECT current_user"), "clear_user");
        });
      });

      await t.step(
        "no password where one is required: rejects once, saying the password is missing",
        async () => {
          // 30 rounds: without a password the setup statement goes with the startup message,
          // and the server's answer to it (a FATAL 08P01) races the password request.
          for (let round = 0; round < 30; round++) {
            const error = await withoutEnvPassword(() =>
              createSharedPool({ ...tcp("scram_user"), minConnections: 1, maxConnections: 1 })
                .then(
                  async (pool) => {
                    await pool.close();
                    assert.fail("the pool opened without a password");
                  },
                  (reason: unknown) => reason,
                )
            );
            assert.ok(error instanceof ConnectionError, `expected ConnectionError, got ${error}`);
            assert.match(
              error.message,
              /the server asks for a password and none was given/,
              `round ${round}: ${error.message}`,
            );
            assert.equal(error.attempts, 1, `round ${round}, retried: ${error.message}`);
          }
        },
      );

      await t.step(
        "Unix socket folder (trust): queries, and a timeoutMs cancel over the socket",
        async () => {
          await withPool({
            host: cluster.socketDir,
            port: cluster.port,
            database: "postgres",
            user: "postgres",
            retry: RETRY,
          }, async (db) => {
            // An empty client address is a Unix socket session.
            assert.equal(await db.fetchValue("SELECT inet_client_addr() IS NULL"), true);
            const started = performance.now();
            await assert.rejects(
              db.fetchValue("SELECT pg_sleep(10)", [], { timeoutMs: 200 }),
              (error: unknown) => {
                assert.ok(error instanceof TimeoutError, `expected TimeoutError, got ${error}`);
                return true;
              },
            );
            const took = performance.now() - started;
            assert.ok(took < 5000, `the timeout took ${Math.round(took)} ms`);
            // The server stopped the statement (it got the cancel), rather than sleeping on.
            const sleeping = () =>
              cluster.psql(
                "SELECT count(*) FROM pg_stat_activity " +
                  "WHERE query = 'SELECT pg_sleep(10)' AND state = 'active'",
              );
            const deadline = performance.now() + 3000;
            while ((await sleeping()) !== "0" && performance.now() < deadline) {
              await new Promise((resolve) => setTimeout(resolve, 50));
            }
            assert.equal(await sleeping(), "0", "pg_sleep(10) still runs: the cancel was lost");
            // The cancel reached the server: the session is free at once, not after 10 s.
            const next = performance.now();
            assert.equal(await db.fetchValue("SELECT 7"), 7);
            const nextTook = performance.now() - next;
            assert.ok(nextTook < 5000, `the next query waited ${Math.round(nextTook)} ms`);
          });
        },
      );
    } catch (error) {
      console.error(await cluster.logTail());
      throw error;
    } finally {
      await cluster.stop();
    }
  },
});
