/**
 * SHA-256 as lowercase hex: migration checksums and the names of test templates.
 *
 * @module
 */

const ENCODER = new TextEncoder();

/**
 * The SHA-256 digest of `data` (a string is hashed as its UTF-8 bytes) in lowercase hex.
 *
 * @param data The text or bytes to hash.
 * @returns 64 lowercase hex digits.
 */
export async function sha256Hex(data: string | Uint8Array<ArrayBuffer>): Promise<string> {
  const bytes = typeof data === "string" ? ENCODER.encode(data) : data;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  let hex = "";
  for (const byte of digest) hex += byte.toString(16).padStart(2, "0");
  return hex;
}
