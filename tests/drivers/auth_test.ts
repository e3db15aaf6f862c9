/**
 * Password authentication of the wire driver (src/drivers/_auth.ts): the MD5 PasswordMessage
 * body and SCRAM-SHA-256 against the RFC 7677 test vector.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createHash, createHmac } from "node:crypto";
import { md5Password, ScramSha256 } from "../../src/drivers/_auth.ts";

const RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_FIRST =
  "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CLIENT_FINAL =
  "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
// RFC 7677 section 3 (ServerSignature in base64).
const RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

Deno.test("md5Password: md5 of the stored md5 hex followed by the raw salt", async () => {
  const salt = new Uint8Array([1, 2, 3, 4]);
  // What pg_authid stores for role "postgres" with password "secret" (minus the "md5" prefix).
  const stored = createHash("md5").update("secretpostgres").digest("hex");
  assert.equal(stored, "53f48b7c4b76a86ce72276c5755f217d");
  const expected = "md5" +
    createHash("md5").update(Buffer.concat([Buffer.from(stored, "ascii"), Buffer.from(salt)]))
      .digest("hex");
  assert.equal(await md5Password("postgres", "secret", salt), expected);
  // Computed independently (Python hashlib) when this test was written.
  assert.equal(
    await md5Password("postgres", "secret", salt),
    "md5bb41a296aab6baccb36ff243a562abff",
  );
});

Deno.test("md5Password: the salt changes the answer", async () => {
  assert.notEqual(
    await md5Password("postgres", "secret", new Uint8Array([1, 2, 3, 4])),
    await md5Password("postgres", "secret", new Uint8Array([4, 3, 2, 1])),
  );
});

Deno.test("ScramSha256: the RFC 7677 test vector", async () => {
  // RFC 7677 signs a client-first of n=user; PostgreSQL ignores the name, so the default is n=*.
  const scram = new ScramSha256("pencil", RFC_CLIENT_NONCE, "user");
  assert.equal(scram.mechanism, "SCRAM-SHA-256");
  assert.equal(scram.clientFirstMessage(), `n,,n=user,r=${RFC_CLIENT_NONCE}`);
  assert.equal(await scram.clientFinalMessage(RFC_SERVER_FIRST), RFC_CLIENT_FINAL);
  scram.verifyServerFinal(RFC_SERVER_FINAL);
});

/**
 * What PostgreSQL's pg_authid stores for a role with password "secret" under
 * password_encryption = 'scram-sha-256': `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
 * Taken from a real server when this test was written.
 */
const PG_SCRAM_SECRET =
  "SCRAM-SHA-256$4096:lXDZ98aPEg6ZAaFun6J9Vw==$HgNVkIGBXa1Rgr1lhdZAcXBr0MkI3mleosJ84+vLqc4=:k2FkbOK3XEiUo9/PCDgGXuDHLwxas4d40fyLA7SESXE=";

Deno.test("ScramSha256: the server side of PostgreSQL, played from a stored secret, accepts n=*", async () => {
  const [, iterationsAndSalt, keys] = PG_SCRAM_SECRET.split("$");
  const [iterations, salt] = iterationsAndSalt.split(":");
  const [storedKey, serverKey] = keys.split(":").map((key) => Buffer.from(key, "base64"));

  const scram = new ScramSha256("secret");
  const clientFirst = scram.clientFirstMessage();
  assert.ok(clientFirst.startsWith("n,,n=*,r="));
  const serverNonce = clientFirst.slice("n,,n=*,r=".length) + "serverpart";
  const serverFirst = `r=${serverNonce},s=${salt},i=${iterations}`;
  const clientFinal = await scram.clientFinalMessage(serverFirst);

  // What the server does (src/backend/libpq/auth-scram.c, verify_client_proof).
  const match = /^(c=biws,r=([^,]+)),p=(.+)$/.exec(clientFinal);
  assert.ok(match, clientFinal);
  assert.equal(match[2], serverNonce);
  const authMessage = `${clientFirst.slice(3)},${serverFirst},${match[1]}`;
  const clientSignature = createHmac("sha256", storedKey).update(authMessage).digest();
  const proof = Buffer.from(match[3], "base64");
  const clientKey = Buffer.from(proof.map((byte, i) => byte ^ clientSignature[i]));
  assert.deepEqual(createHash("sha256").update(clientKey).digest(), storedKey);

  const serverSignature = createHmac("sha256", serverKey).update(authMessage).digest("base64");
  scram.verifyServerFinal(`v=${serverSignature}`);
});

Deno.test("ScramSha256: the default client-first message is n,,n=*,r=<random nonce>", () => {
  const a = new ScramSha256("pencil").clientFirstMessage();
  const b = new ScramSha256("pencil").clientFirstMessage();
  assert.match(a, /^n,,n=\*,r=[A-Za-z0-9+/]{24}$/);
  assert.notEqual(a, b);
  assert.equal(new ScramSha256("pencil", "abc").clientFirstMessage(), "n,,n=*,r=abc");
});

Deno.test("ScramSha256: a wrong server signature throws", async () => {
  const scram = new ScramSha256("pencil", RFC_CLIENT_NONCE, "user");
  await scram.clientFinalMessage(RFC_SERVER_FIRST);
  assert.throws(
    // Shares its first 18 characters with the real signature.
    () => scram.verifyServerFinal("v=6rriTRBi23WpRR/wt/ov2LNn0WwTyI9ku/ivN84aOc4="),
    (error: Error) => {
      assert.match(error.message, /could not prove it knows the password/);
      assert.match(error.message, /impersonat/);
      assert.doesNotMatch(error.message, /pencil/);
      return true;
    },
  );
  assert.throws(() => scram.verifyServerFinal("v=not base64!"), /could not prove/);
  assert.throws(() => scram.verifyServerFinal("x=1"), /no signature/);
});

Deno.test("ScramSha256: a server error (e=) throws with the server's text", async () => {
  const scram = new ScramSha256("pencil", RFC_CLIENT_NONCE, "user");
  await scram.clientFinalMessage(RFC_SERVER_FIRST);
  assert.throws(() => scram.verifyServerFinal("e=invalid-proof"), /invalid-proof/);
});

Deno.test("ScramSha256: verifying before the client-final message throws", () => {
  const scram = new ScramSha256("pencil", RFC_CLIENT_NONCE);
  assert.throws(() => scram.verifyServerFinal(RFC_SERVER_FINAL), /before clientFinalMessage/);
});

Deno.test("ScramSha256: a server nonce that does not extend the client's throws", async () => {
  const scram = new ScramSha256("pencil", RFC_CLIENT_NONCE, "user");
  await assert.rejects(
    scram.clientFinalMessage("r=somethingElse123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"),
    (error: Error) => {
      assert.match(error.message, /server nonce does not extend the client nonce/);
      assert.doesNotMatch(error.message, /pencil/);
      return true;
    },
  );
  // The server must add to the nonce, not just echo it.
  await assert.rejects(
    scram.clientFinalMessage(`r=${RFC_CLIENT_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096`),
    /does not extend/,
  );
});

Deno.test("ScramSha256: malformed server-first messages throw", async () => {
  const scram = new ScramSha256("pencil", RFC_CLIENT_NONCE);
  const nonce = `${RFC_CLIENT_NONCE}xyz`;
  await assert.rejects(scram.clientFinalMessage(`r=${nonce},i=4096`), /lacks/);
  await assert.rejects(scram.clientFinalMessage(`r=${nonce},s=AAAA,i=0`), /iteration/);
  await assert.rejects(scram.clientFinalMessage(`r=${nonce},s=AAAA,i=4k`), /iteration/);
  await assert.rejects(scram.clientFinalMessage(`r=${nonce},s=!!,i=4096`), /base64/);
  await assert.rejects(scram.clientFinalMessage(`m=ext,r=${nonce},s=AAAA,i=1`), /extension/);
});
