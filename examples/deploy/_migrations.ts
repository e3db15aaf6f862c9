/**
 * The tenant migrations, bundled into the module graph as text imports: Deno Deploy (and
 * `deno compile`) ship them with the code, so nothing is read from a filesystem at run time.
 * Deno 2.9 needs no flag for `with { type: "text" }`; Deno 2.4 to 2.8 need
 * `--unstable-raw-imports`.
 *
 * @module
 */

import createNotes from "./migrations/001_create_notes.sql" with { type: "text" };
import createAudit from "./migrations/002_create_audit.sql" with { type: "text" };

/** The module name the tenant migrations are recorded under in `schema_migrations`. */
export const TENANT_MODULE = "notes";

/** File name → SQL of every tenant migration, for `new Migrator(db, { migrations })`. */
export const TENANT_MIGRATIONS: Readonly<Record<string, string>> = Object.freeze({
  "001_create_notes.sql": createNotes,
  "002_create_audit.sql": createAudit,
});
