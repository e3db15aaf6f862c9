/**
 * Output of the pgdbm CLI: human text or one JSON document on stdout, messages and the
 * progress line on stderr, and every password scrubbed from both.
 *
 * @module
 */

/** The process's streams and surroundings, replaceable for tests. */
export interface ResolvedIo {
  /** Writes text to stdout as is. */
  stdout(text: string): void;
  /** Writes text to stderr as is. */
  stderr(text: string): void;
  /** Reads one line from stdin (without its line break); `null` at its end. */
  readLine(): Promise<string | null>;
  /** True when stdin is a terminal (a person can answer a question). */
  stdinIsTerminal: boolean;
  /** True when stderr is a terminal (the progress line is shown). */
  stderrIsTerminal: boolean;
  /** Reads an environment variable. */
  env(name: string): string | undefined;
  /** The working directory. */
  cwd: string;
}

/** Where a command writes; `json` decides between the table and the document. */
export class Output {
  readonly #io: ResolvedIo;
  readonly #secrets: string[] = [];
  readonly json: boolean;
  readonly #progress: boolean;
  #progressShown = false;

  constructor(io: ResolvedIo, options: { json: boolean; progress: boolean }) {
    this.#io = io;
    this.json = options.json;
    this.#progress = options.progress || io.stderrIsTerminal;
  }

  /** Adds strings (passwords) that must never be written. */
  addSecrets(secrets: readonly string[]): void {
    for (const secret of secrets) {
      if (!this.#secrets.includes(secret)) this.#secrets.push(secret);
    }
    this.#secrets.sort((a, b) => b.length - a.length);
  }

  #scrub(text: string): string {
    let clean = text;
    for (const secret of this.#secrets) clean = clean.replaceAll(secret, "****");
    return clean;
  }

  /** A line of human output on stdout (nothing in JSON mode). */
  print(text = ""): void {
    if (this.json) return;
    this.#clearProgress();
    this.#io.stdout(this.#scrub(text) + "\n");
  }

  /** The JSON document on stdout (JSON mode only). */
  document(value: unknown): void {
    if (!this.json) return;
    this.#clearProgress();
    this.#io.stdout(this.#scrub(JSON.stringify(value, null, 2)) + "\n");
  }

  /** A line on stderr. */
  error(text: string): void {
    this.#clearProgress();
    this.#io.stderr(this.#scrub(text) + "\n");
  }

  /** True when progress lines are shown. */
  get showsProgress(): boolean {
    return this.#progress;
  }

  /** Shows the progress line (rewritten in place on a terminal). */
  progress(text: string): void {
    if (!this.#progress) return;
    const line = this.#scrub(text);
    if (this.#io.stderrIsTerminal) {
      this.#io.stderr(`\r\x1b[2K${line}`);
      this.#progressShown = true;
    } else this.#io.stderr(`${line}\n`);
  }

  /** Removes the progress line from the terminal. */
  endProgress(): void {
    this.#clearProgress();
  }

  #clearProgress(): void {
    if (!this.#progressShown) return;
    this.#progressShown = false;
    this.#io.stderr("\r\x1b[2K");
  }

  /** Asks a question on stderr and reads the answer. */
  async ask(question: string): Promise<string | null> {
    this.#clearProgress();
    this.#io.stderr(this.#scrub(question));
    return await this.#io.readLine();
  }
}

/** Lays out rows as a table with a header; numbers are aligned right. */
export function table(header: readonly string[], rows: readonly (readonly string[])[]): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const numeric = header.map((_, i) => rows.length > 0 && rows.every((r) => /^\d+$/.test(r[i])));
  const line = (cells: readonly string[]): string =>
    cells.map((cell, i) => numeric[i] ? cell.padStart(widths[i]) : cell.padEnd(widths[i]))
      .join("  ").trimEnd();
  return [line(header), ...rows.map(line)];
}

/** `12 ms`, `1.4 s`. */
export function duration(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

/** `1 migration`, `2 migrations`. */
export function plural(count: number, word: string): string {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}
