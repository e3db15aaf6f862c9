/**
 * The one place that chooses a driver: the network driver (pgdbm's own protocol client) for a server, the
 * embedded one (PGlite, loaded only when used) for a `pglite:` target. Nothing above the
 * seam imports a driver.
 *
 * @module
 */

import type { ResolvedConfig } from "../config.ts";
import type { Driver } from "./driver.ts";
import { createWireDriver } from "./wire.ts";

/**
 * Creates the driver for a resolved configuration.
 *
 * @param config The resolved configuration; `kind` chooses the driver.
 * @returns The driver, not yet connected.
 */
export async function createDriver(config: ResolvedConfig): Promise<Driver> {
  if (config.kind !== "embedded") return createWireDriver(config);
  const { createPgliteDriver } = await import("./pglite.ts");
  return createPgliteDriver({
    dataDir: config.embeddedDataDir,
    serverSettings: config.serverSettings,
  });
}
