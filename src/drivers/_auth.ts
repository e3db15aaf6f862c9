/**
 * Password authentication for the wire-protocol driver: the body of the PasswordMessage that
 * answers AuthenticationMD5Password, and the client side of SCRAM-SHA-256 (RFC 5802, RFC 7677)
 * without channel binding, as PostgreSQL speaks it in AuthenticationSASL exchanges.
 *
 * Nothing here reads a socket: the driver passes the server's messages in and sends back the
 * strings returned. No error message includes the password.
 *
 * @module
 */

const ENCODER = new TextEncoder();

/** The GS2 header for "no channel binding, no authorization identity". */
const GS2_HEADER = "n,,";

/** `c=` of the client-final message: the GS2 header in base64 ("n,," → "biws"). */
const CHANNEL_BINDING = btoa(GS2_HEADER);

/** Lowercase hex MD5 of `data` (Web Crypto has no MD5). */
async function md5Hex(data: Uint8Array): Promise<string> {
  // Loaded only for md5 authentication: node:crypto takes about 24 ms to load.
  const { createHash } = await import("node:crypto");
  return createHash("md5").update(data).digest("hex");
}

/**
 * The body of PostgreSQL's PasswordMessage in answer to AuthenticationMD5Password:
 * `"md5" + md5hex(md5hex(password + user) + salt)`, where the inner hex digest is taken as ASCII
 * bytes and followed by the 4 raw salt bytes.
 *
 * @param user The role name sent in the startup message.
 * @param password The role's password in clear text.
 * @param salt The 4 salt bytes of the AuthenticationMD5Password message.
 * @returns `"md5"` followed by 32 lowercase hex digits.
 */
export async function md5Password(
  user: string,
  password: string,
  salt: Uint8Array,
): Promise<string> {
  const inner = ENCODER.encode(await md5Hex(ENCODER.encode(password + user)));
  const salted = new Uint8Array(inner.length + salt.length);
  salted.set(inner, 0);
  salted.set(salt, inner.length);
  return "md5" + await md5Hex(salted);
}

/** Base64 of raw bytes. */
function toBase64(bytes: Uint8Array): string {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

/** Raw bytes of base64 text; throws with `what` in the message when it is not base64. */
function fromBase64(text: string, what: string): Uint8Array<ArrayBuffer> {
  let binary: string;
  try {
    binary = atob(text);
  } catch {
    throw new Error(`SCRAM-SHA-256: the server sent ${what} that is not valid base64`);
  }
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** HMAC-SHA-256 of `data` under `key`. */
async function hmac(
  key: Uint8Array<ArrayBuffer>,
  data: string | Uint8Array<ArrayBuffer>,
): Promise<Uint8Array<ArrayBuffer>> {
  const cryptoKey = await crypto.subtle.importKey(
    "raw",
    key,
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const bytes = typeof data === "string" ? ENCODER.encode(data) : data;
  return new Uint8Array(await crypto.subtle.sign("HMAC", cryptoKey, bytes));
}

/** Splits a SCRAM message `a=…,b=…` into its attributes (values may themselves contain `=`). */
function parseAttributes(message: string): Map<string, string> {
  const attributes = new Map<string, string>();
  for (const part of message.split(",")) {
    const eq = part.indexOf("=");
    if (eq !== 1) continue;
    const name = part[0];
    if (!attributes.has(name)) attributes.set(name, part.slice(eq + 1));
  }
  return attributes;
}

/** Compares two byte strings without stopping at the first difference. */
function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

/**
 * The client side of one SCRAM-SHA-256 exchange (RFC 5802, RFC 7677) without channel binding
 * (GS2 header `n,,`). Use one instance per authentication:
 *
 * 1. send {@linkcode ScramSha256.clientFirstMessage} in SASLInitialResponse with
 *    {@linkcode ScramSha256.mechanism};
 * 2. answer AuthenticationSASLContinue with {@linkcode ScramSha256.clientFinalMessage};
 * 3. check AuthenticationSASLFinal with {@linkcode ScramSha256.verifyServerFinal}.
 *
 * The password is used as given (no SASLprep), which is what PostgreSQL does for passwords that
 * SASLprep would leave unchanged, such as any ASCII password.
 */
export class ScramSha256 {
  /** The SASL mechanism name to send in SASLInitialResponse. */
  readonly mechanism = "SCRAM-SHA-256";

  readonly #password: string;
  readonly #clientNonce: string;
  readonly #user: string;
  #serverSignature: Uint8Array | undefined;

  /**
   * Starts an exchange.
   *
   * @param password The role's password in clear text.
   * @param nonce The client nonce; defaults to 18 random bytes in base64. Pass one only to
   *   reproduce a test vector.
   * @param user The user name of the client-first message; defaults to `*`. PostgreSQL ignores
   *   it (the role comes from the startup message), so pass one only to reproduce a test vector
   *   such as RFC 7677's, which signs `n=user`.
   */
  constructor(password: string, nonce?: string, user = "*") {
    this.#password = password;
    this.#user = user.replaceAll("=", "=3D").replaceAll(",", "=2C");
    this.#clientNonce = nonce ?? toBase64(crypto.getRandomValues(new Uint8Array(18)));
    if (this.#clientNonce.length === 0 || this.#clientNonce.includes(",")) {
      throw new Error("SCRAM-SHA-256: the client nonce must be non-empty and contain no comma");
    }
  }

  /** The client-first message without its GS2 header. PostgreSQL ignores the user name here. */
  get #clientFirstBare(): string {
    return `n=${this.#user},r=${this.#clientNonce}`;
  }

  /**
   * The client-first message, the data of SASLInitialResponse.
   *
   * @returns `n,,n=*,r=<client nonce>` (or `n=<user>` when a user was given).
   */
  clientFirstMessage(): string {
    return GS2_HEADER + this.#clientFirstBare;
  }

  /**
   * Answers the server-first message (the data of AuthenticationSASLContinue) with the
   * client-final message, and remembers the signature the server must send back.
   *
   * @param serverFirst The server-first message, `r=<nonce>,s=<base64 salt>,i=<iterations>`.
   * @returns `c=biws,r=<server nonce>,p=<base64 client proof>`.
   * @throws {Error} When the message is malformed, or its nonce does not extend the client's.
   */
  async clientFinalMessage(serverFirst: string): Promise<string> {
    const attributes = parseAttributes(serverFirst);
    if (attributes.has("m")) {
      throw new Error("SCRAM-SHA-256: the server requires an extension this client does not know");
    }
    const nonce = attributes.get("r");
    const salt = attributes.get("s");
    const iterationText = attributes.get("i");
    if (nonce === undefined || salt === undefined || iterationText === undefined) {
      throw new Error(
        "SCRAM-SHA-256: the server-first message lacks its nonce (r=), salt (s=) or " +
          "iteration count (i=)",
      );
    }
    if (!nonce.startsWith(this.#clientNonce) || nonce.length === this.#clientNonce.length) {
      throw new Error(
        "SCRAM-SHA-256: the server nonce does not extend the client nonce; the exchange was " +
          "tampered with or answered by another session",
      );
    }
    const iterations = Number(iterationText);
    if (!/^[1-9][0-9]*$/.test(iterationText) || !Number.isSafeInteger(iterations)) {
      throw new Error("SCRAM-SHA-256: the server sent an invalid iteration count");
    }
    const saltBytes = fromBase64(salt, "a salt");

    const passwordKey = await crypto.subtle.importKey(
      "raw",
      ENCODER.encode(this.#password),
      "PBKDF2",
      false,
      ["deriveBits"],
    );
    const saltedPassword = new Uint8Array(
      await crypto.subtle.deriveBits(
        { name: "PBKDF2", hash: "SHA-256", salt: saltBytes, iterations },
        passwordKey,
        256,
      ),
    );
    const clientKey = await hmac(saltedPassword, "Client Key");
    const storedKey = new Uint8Array(await crypto.subtle.digest("SHA-256", clientKey));
    const clientFinalWithoutProof = `c=${CHANNEL_BINDING},r=${nonce}`;
    const authMessage = `${this.#clientFirstBare},${serverFirst},${clientFinalWithoutProof}`;
    const clientSignature = await hmac(storedKey, authMessage);
    const proof = new Uint8Array(clientKey.length);
    for (let i = 0; i < proof.length; i++) proof[i] = clientKey[i] ^ clientSignature[i];

    const serverKey = await hmac(saltedPassword, "Server Key");
    this.#serverSignature = await hmac(serverKey, authMessage);
    return `${clientFinalWithoutProof},p=${toBase64(proof)}`;
  }

  /**
   * Checks the server-final message (the data of AuthenticationSASLFinal): the server proves it
   * knows the password by sending the signature computed in
   * {@linkcode ScramSha256.clientFinalMessage}.
   *
   * @param serverFinal The server-final message, `v=<base64 signature>` or `e=<error>`.
   * @throws {Error} When the server reports an error, the signature differs (the server may be
   *   impersonating the real one), or no client-final message was computed yet.
   */
  verifyServerFinal(serverFinal: string): void {
    const attributes = parseAttributes(serverFinal);
    const error = attributes.get("e");
    if (error !== undefined) {
      throw new Error(`SCRAM-SHA-256: the server rejected the authentication: ${error}`);
    }
    if (this.#serverSignature === undefined) {
      throw new Error(
        "SCRAM-SHA-256: verifyServerFinal() was called before clientFinalMessage()",
      );
    }
    const signature = attributes.get("v");
    if (signature === undefined) {
      throw new Error("SCRAM-SHA-256: the server-final message has no signature (v=)");
    }
    let received: Uint8Array;
    try {
      received = fromBase64(signature, "a signature");
    } catch {
      received = new Uint8Array(0);
    }
    if (!equalBytes(received, this.#serverSignature)) {
      throw new Error(
        "SCRAM-SHA-256: the server could not prove it knows the password; it may be " +
          "impersonating the real server",
      );
    }
  }
}
