/**
 * The named prepared statements of one session, bounded: a session that runs ever new
 * statement texts (a schema per tenant makes one per tenant and query) would otherwise keep
 * every one of them on the server, each with its plans, for as long as it lives.
 *
 * @module
 */

/**
 * How many named statements a session keeps prepared. The least recently run is closed when
 * one more is prepared; running it again prepares it again.
 */
export const MAX_PREPARED_STATEMENTS = 1000;

/** What the session knows of one named statement: at least its name. */
export interface NamedStatement {
  /** The name the statement is prepared under. */
  readonly name: string;
}

/**
 * A session's named statements by key (declared parameter types and text), most recently
 * used last.
 */
export class PreparedStatements<D extends NamedStatement> {
  readonly #byKey = new Map<string, D>();
  #evicted: string[] = [];

  /** The statement prepared under `key`, now the most recently used; `undefined` if none. */
  use(key: string): D | undefined {
    const description = this.#byKey.get(key);
    if (description !== undefined) {
      this.#byKey.delete(key);
      this.#byKey.set(key, description);
    }
    return description;
  }

  /** Whether a statement is prepared under `key` (without marking it used). */
  has(key: string): boolean {
    return this.#byKey.has(key);
  }

  /**
   * Notes a statement the server has prepared; beyond {@link MAX_PREPARED_STATEMENTS}, the
   * least recently used one is forgotten and its name kept for {@link takeEvicted}.
   */
  add(key: string, description: D): void {
    this.#byKey.set(key, description);
    if (this.#byKey.size <= MAX_PREPARED_STATEMENTS) return;
    const [oldestKey, oldest] = this.#byKey.entries().next().value!;
    this.#byKey.delete(oldestKey);
    this.#evicted.push(oldest.name);
  }

  /** Forgets the statement under `key` (the caller closes it). */
  delete(key: string): void {
    this.#byKey.delete(key);
  }

  /** The statements kept. */
  values(): MapIterator<D> {
    return this.#byKey.values();
  }

  /**
   * Names of forgotten statements the server still has, once: the statement written next
   * closes them before its own messages, so every Bind written earlier still finds its
   * statement, and none written later can name them.
   */
  takeEvicted(): string[] {
    const names = this.#evicted;
    if (names.length > 0) this.#evicted = [];
    return names;
  }
}
