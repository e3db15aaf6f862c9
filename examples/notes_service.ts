/**
 * A small service built on pgdbm: a repository of notes over a {@link DatabaseManager},
 * with its own migrations (`./notes_migrations`). `notes_service_test.ts` tests it with
 * `@pgdbm/pgdbm/testing`.
 *
 *   deno test -A examples/notes_service_test.ts
 *
 * @module
 */
import { type DatabaseManager, type MigrationResult, Migrator } from "../mod.ts";

/** The migrations of the notes service. */
export const NOTES_MIGRATIONS: URL = new URL("./notes_migrations/", import.meta.url);

/** The module name of the notes service's migrations. */
export const NOTES_MODULE = "notes";

/** A stored note. */
export interface Note {
  /** The note's id. */
  id: number;
  /** Who wrote it. */
  author: string;
  /** Its text. */
  body: string;
  /** Whether it is pinned to the top. */
  pinned: boolean;
}

/** Notes stored in the schema of a manager. */
export class NotesRepository {
  readonly #db: DatabaseManager;

  /**
   * Makes the repository.
   *
   * @param db The manager whose schema holds the notes tables.
   */
  constructor(db: DatabaseManager) {
    this.#db = db;
  }

  /**
   * Applies the service's migrations to the manager's schema.
   *
   * @returns The migrator's result.
   */
  migrate(): Promise<MigrationResult> {
    return new Migrator(this.#db, { migrationsPath: NOTES_MIGRATIONS, moduleName: NOTES_MODULE })
      .applyPending();
  }

  /**
   * Adds a note, creating its author when new.
   *
   * @param author The author's name.
   * @param body The note's text.
   * @returns The new note's id.
   */
  async add(author: string, body: string): Promise<number> {
    if (body.trim() === "") throw new RangeError("Cannot add a note: its body is empty");
    return await this.#db.transaction(async (tx) => {
      const authorId = await tx.fetchValue<number>(
        `INSERT INTO {{tables.authors}} (name) VALUES ($1)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id`,
        [author],
      );
      const id = await tx.executeAndReturnId<number>(
        "INSERT INTO {{tables.notes}} (author_id, body) VALUES ($1, $2)",
        [authorId, body],
      );
      return id!;
    });
  }

  /**
   * Pins a note to the top of its author's list.
   *
   * @param id The note's id.
   * @returns False when there is no such note.
   */
  async pin(id: number): Promise<boolean> {
    const result = await this.#db.execute(
      "UPDATE {{tables.notes}} SET pinned = true WHERE id = $1",
      [id],
    );
    return result.rowCount === 1;
  }

  /**
   * An author's notes, pinned first, then newest first.
   *
   * @param author The author's name.
   * @returns The notes.
   */
  async byAuthor(author: string): Promise<Note[]> {
    return await this.#db.fetchAll<Note>(
      `SELECT n.id, a.name AS author, n.body, n.pinned
         FROM {{tables.notes}} n JOIN {{tables.authors}} a ON a.id = n.author_id
        WHERE a.name = $1
        ORDER BY n.pinned DESC, n.created_at DESC, n.id DESC`,
      [author],
    );
  }

  /**
   * Notes whose text contains a word (case-insensitive).
   *
   * @param word The word.
   * @returns The matching notes' ids, in order.
   */
  async search(word: string): Promise<number[]> {
    const rows = await this.#db.fetchAll<{ id: number }>(
      "SELECT id FROM {{tables.notes}} WHERE body ILIKE '%' || $1 || '%' ORDER BY id",
      [word.replaceAll(/[\\%_]/g, (c) => `\\${c}`)],
    );
    return rows.map((row) => row.id);
  }
}
