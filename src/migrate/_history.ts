/**
 * The history table (pgdbm's columns, so a Python pgdbm service shares it): creating it,
 * reading and writing its rows, and planning a run from it — what is pending, what drifted
 * and what is missing.
 *
 * @module
 */

import { QueryError } from "../errors.ts";
import type { Queries } from "../queries.ts";
import { quoteIdentifier } from "../template.ts";
import type { Transactional } from "../transaction.ts";
import type { AppliedMigration, DriftedMigration, Migration } from "./types.ts";

/** The history table's name unless `migrationsTable` says otherwise. */
export const DEFAULT_HISTORY_TABLE = "schema_migrations";

/**
 * Errors of two processes creating the schema or table at the same moment, when one of
 * them does not take {@link ENSURE_LOCK_SQL} (another tool sharing the table): PostgreSQL's
 * `IF NOT EXISTS` checks do not keep a concurrent creator out, so the loser fails on a
 * catalog index (23505) or on the name the winner committed a moment before (42P07, 42P06,
 * and 42710 for the table's row type).
 */
const CREATE_RACE = new Set(["23505", "42P07", "42P06", "42710"]);

/**
 * The first statement of the transaction creating a history table: a transaction advisory
 * lock on the table's name, so that pgdbm processes create it one after another, and each
 * `IF NOT EXISTS` sees what the one before committed.
 */
const ENSURE_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('pgdbm_history'), hashtext($1))";

/** What a run has to do, from the source's files and the history. */
export interface Plan {
  /** Files not applied yet, in order. */
  pending: Migration[];
  /** Applied files whose content changed. */
  drifted: DriftedMigration[];
  /** Applied migrations of this module whose file is gone. */
  missing: AppliedMigration[];
}

/** The history table of one module in one schema. */
export class History {
  readonly #schema?: string;
  readonly #module: string;
  readonly #table: string;

  /**
   * @param schema The manager's schema (`undefined`: `public`).
   * @param module The module whose rows are read and written.
   * @param table The table's name (an identifier, checked by the migrator).
   */
  constructor(schema: string | undefined, module: string, table: string) {
    this.#schema = schema;
    this.#module = module;
    this.#table = table;
  }

  /**
   * The table, always schema-qualified (`public` for a manager without a schema): the
   * migrator's own SQL must not depend on a `search_path` a migration changed.
   */
  get ref(): string {
    return `${quoteIdentifier(this.#schema ?? "public")}.${this.#table}`;
  }

  /**
   * Whether the table exists, asked of the catalog: reading a missing table would fail a
   * query (counted in the pool's errors, seen by `onQuery`, logged by the server).
   */
  async exists(q: Queries): Promise<boolean> {
    return await q.fetchValue<boolean>(
      "SELECT to_regclass($1) IS NOT NULL",
      [q.prepareQuery(this.ref)],
    ) === true;
  }

  /**
   * The rows that count for this module (its own and pgdbm's module-less rows), oldest
   * first; `undefined` while the table does not exist.
   */
  applied(q: Queries): Promise<AppliedMigration[] | undefined> {
    return this.#select(q, "ORDER BY id");
  }

  /**
   * As {@link History.applied}, for a table just made sure of: without asking the catalog
   * first (one statement, which a caller can pipeline).
   */
  appliedInEnsured(q: Queries): Promise<AppliedMigration[] | undefined> {
    return this.#select(q, "ORDER BY id", false);
  }

  /** The `limit` most recent rows that count for this module, newest first. */
  async recent(q: Queries, limit: number): Promise<AppliedMigration[]> {
    const rows = await this.#select(
      q,
      `ORDER BY applied_at DESC, id DESC LIMIT ${limit}`,
    );
    return rows ?? [];
  }

  /** The checksum recorded for `filename` (read in `tx`, under the transaction lock). */
  async checksumOf(tx: Queries, filename: string): Promise<string | undefined> {
    const row = await tx.fetchOne<{ checksum: string }>(
      `SELECT checksum FROM ${this.ref} WHERE filename = $1 ` +
        "AND (module_name = $2 OR module_name IS NULL) ORDER BY id DESC LIMIT 1",
      [filename, this.#module],
    );
    return row?.checksum;
  }

  /**
   * Records `migration` in the transaction that applied it; its run time is measured on
   * the server since the transaction began (`now()` is the transaction's start).
   */
  recordInTransaction(tx: Queries, migration: Migration): Promise<unknown> {
    // Literals, not parameters: the statement names the schema, so as a parameterized
    // statement each schema would cost a round trip to describe it and a prepared statement
    // kept on the connection; as a simple query it travels in the migration's pipeline.
    return tx.execute(
      `INSERT INTO ${this.ref} (filename, checksum, module_name, execution_time_ms) ` +
        `VALUES (${quoteLiteral(migration.filename)}, ${quoteLiteral(migration.checksum)}, ` +
        `${quoteLiteral(this.#module)}, greatest(1, pg_catalog.round(extract(epoch FROM ` +
        "pg_catalog.clock_timestamp() - pg_catalog.now()) * 1000))::int)",
    );
  }

  /** Records `migration` (a no-transaction file, after its last statement). */
  async record(q: Queries, migration: Migration, executionTimeMs: number): Promise<void> {
    await q.execute(
      `INSERT INTO ${this.ref} (filename, checksum, module_name, execution_time_ms) ` +
        `VALUES ($1, $2, $3, $4)`,
      [migration.filename, migration.checksum, this.#module, executionTimeMs],
    );
  }

  /** Removes this module's row of `filename`; `false` when there was none. */
  async remove(q: Queries, filename: string): Promise<boolean> {
    if (!await this.exists(q)) return false;
    try {
      const result = await q.execute(
        `DELETE FROM ${this.ref} WHERE filename = $1 AND module_name = $2`,
        [filename, this.#module],
      );
      return result.rowCount > 0;
    } catch (error) {
      if (isMissingTable(error)) return false;
      throw error;
    }
  }

  /**
   * Creates the schema (when missing) and the table with pgdbm's columns, if they do not
   * exist. Safe from many processes at once: they take turns under {@link ENSURE_LOCK_SQL}.
   */
  async ensure(q: Transactional): Promise<void> {
    const table = this.ref;
    const schema = q.schema;
    const exists = (): Promise<{ table: boolean; schema: boolean } | null> =>
      q.fetchOne<{ table: boolean; schema: boolean }>(
        "SELECT to_regclass($1) IS NOT NULL AS table, " +
          "($2::text IS NULL OR to_regnamespace($2) IS NOT NULL) AS schema",
        [q.prepareQuery(table), schema === undefined ? null : quoteIdentifier(schema)],
      );
    const found = await exists();
    if (found?.table === true) return;
    try {
      // The statements are pipelined (one round trip, then COMMIT): each waits on the server
      // for the one before, and after a failure the later ones fail with 25P02, so the
      // first rejection is the cause.
      await q.transaction(async (tx) => {
        const sent = [tx.execute(ENSURE_LOCK_SQL, [table])];
        // Only when missing: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even then.
        if (found?.schema === false) {
          sent.push(tx.execute(`CREATE SCHEMA IF NOT EXISTS ${quoteIdentifier(schema!)}`));
        }
        sent.push(tx.execute(
          `CREATE TABLE IF NOT EXISTS ${table} (
    id SERIAL PRIMARY KEY,
    filename VARCHAR(255) NOT NULL,
    checksum VARCHAR(64) NOT NULL,
    module_name VARCHAR(100),
    applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    applied_by VARCHAR(100) DEFAULT CURRENT_USER,
    execution_time_ms INTEGER,
    UNIQUE(filename, module_name)
)`,
        ));
        sent.push(tx.execute(
          `CREATE INDEX IF NOT EXISTS idx_${this.#table}_module ON ${table}(module_name, filename)`,
        ));
        await Promise.all(sent);
      });
    } catch (error) {
      // Another process created them at the same moment: its catalog rows won.
      if (!(error instanceof QueryError && CREATE_RACE.has(error.sqlstate ?? ""))) throw error;
      if ((await exists())?.table !== true) throw error;
    }
  }

  /** What the run has to do: `files` against the `applied` rows. */
  plan(files: Migration[], applied: AppliedMigration[]): Plan {
    const byName = new Map<string, AppliedMigration>();
    for (const row of applied) byName.set(row.filename, row);
    const pending: Migration[] = [];
    const drifted: DriftedMigration[] = [];
    const present = new Set<string>();
    for (const file of files) {
      present.add(file.filename);
      const row = byName.get(file.filename);
      if (row === undefined) pending.push(file);
      else if (row.checksum !== file.checksum) {
        drifted.push({
          filename: file.filename,
          appliedChecksum: row.checksum,
          currentChecksum: file.checksum,
        });
      }
    }
    const missing = applied.filter((row) =>
      row.moduleName === this.#module && !present.has(row.filename)
    );
    return { pending, drifted, missing };
  }

  async #select(q: Queries, order: string, check = true): Promise<AppliedMigration[] | undefined> {
    if (check && !await this.exists(q)) return undefined;
    let rows: Record<string, unknown>[];
    try {
      // A simple query (see recordInTransaction): no prepared statement per schema.
      rows = await q.fetchAll(
        `SELECT ${HISTORY_COLUMNS} FROM ${this.ref} WHERE module_name = ` +
          `${quoteLiteral(this.#module)} OR module_name IS NULL ${order}`,
      );
    } catch (error) {
      if (isMissingTable(error)) return undefined;
      throw error;
    }
    return rows.map(appliedMigration);
  }
}

/** The columns of a history row that {@link appliedMigration} reads. */
export const HISTORY_COLUMNS =
  "filename, checksum, module_name, applied_at, applied_by, execution_time_ms";

/** A history row (its {@link HISTORY_COLUMNS}) as an {@link AppliedMigration}. */
export function appliedMigration(row: Record<string, unknown>): AppliedMigration {
  return {
    filename: String(row.filename),
    checksum: String(row.checksum),
    moduleName: row.module_name === null ? null : String(row.module_name),
    appliedAt: row.applied_at as Date,
    appliedBy: row.applied_by === null ? null : String(row.applied_by),
    executionTimeMs: row.execution_time_ms === null ? null : Number(row.execution_time_ms),
  };
}

/**
 * `text` as an `E'…'` string constant, which reads the same whatever
 * `standard_conforming_strings` a migration set; `{` is written `\x7b`, so that no
 * `{{…}}` in a module or file name is taken for a template placeholder.
 */
export function quoteLiteral(text: string): string {
  const escaped = text.replace(/[\\'{]/g, (c) => c === "'" ? "''" : c === "{" ? "\\x7b" : "\\\\");
  return `E'${escaped}'`;
}

function isMissingTable(error: unknown): boolean {
  return error instanceof QueryError && (error.sqlstate === "42P01" || error.sqlstate === "3F000");
}
