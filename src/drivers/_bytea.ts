/**
 * bytea in PostgreSQL's hex format (`\x0aff…`), both ways. Private to pgdbm.
 *
 * @module
 */

const HEX_BYTES: readonly string[] = Array.from(
  { length: 256 },
  (_, byte) => byte.toString(16).padStart(2, "0"),
);

/**
 * Writes bytes as bytea hex text.
 *
 * @param bytes The bytes.
 * @returns `\x` followed by two lowercase hex digits per byte.
 */
export function byteaToHex(bytes: Uint8Array): string {
  let hex = "\\x";
  for (let i = 0; i < bytes.length; i++) hex += HEX_BYTES[bytes[i]];
  return hex;
}

/**
 * Reads bytea hex text (as the server sends it) into a plain `Uint8Array`.
 *
 * @param text `\x` followed by hex digits.
 * @returns The bytes.
 */
export function byteaFromHex(text: string): Uint8Array {
  const bytes = new Uint8Array((text.length - 2) / 2);
  for (let i = 0; i < bytes.length; i++) {
    bytes[i] = parseInt(text.substr(2 + i * 2, 2), 16);
  }
  return bytes;
}
