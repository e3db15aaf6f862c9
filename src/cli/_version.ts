/**
 * The version `pgdbm --version` prints: the package's, as `deno.json` declares it (a test
 * keeps the two equal).
 *
 * @module
 */

/** The version of the pgdbm package this CLI belongs to. */
export const VERSION = "0.1.0";
