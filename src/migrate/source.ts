/**
 * Where migration files come from. Three sources sit behind one interface,
 * {@link MigrationSource}:
 *
 * - a directory on disk ({@link createDirectorySource}): every `*.sql` file directly in it;
 *   hidden files and sub-folders are ignored;
 * - a `file:` or `https:` URL of a folder ({@link createUrlSource}), so a library published
 *   on JSR ships its migrations and reads them relative to `import.meta.url`;
 * - an in-memory record of file name → SQL ({@link createRecordSource}), which works on Deno
 *   Deploy and in `deno compile` binaries, e.g. filled from `import sql from "../001.sql"
 *   with { type: "text" }`.
 *
 * ## The manifest: `migrations.json`
 *
 * An `https:` folder cannot be listed, so it carries a manifest named `migrations.json`
 * next to the files:
 *
 * ```json
 * { "migrations": ["001_create_users.sql", "002_add_email.sql"] }
 * ```
 *
 * `migrations` lists plain file names (letters, digits, `_`, `.`, `-`; ending in `.sql`;
 * no folders); their order does not matter, the migrator orders by version. Write it
 * with {@link writeMigrationManifest} (or `deno task` a script that calls it) before
 * `deno publish`. A `file:` folder uses the manifest when it has one, and then refuses a
 * manifest that is out of date with the folder; without one, the folder is listed.
 *
 * @module
 */

import { ConfigurationError, MigrationError } from "../errors.ts";
import { absolutePath, pathIn, pathOfFileUrl } from "./_paths.ts";
import type { MigrationFile, MigrationSource, MigrationSourceOptions } from "./types.ts";
import {
  isMigrationFilename,
  isSafeMigrationFilename,
  parseMigrationFiles,
  timestampVersion,
} from "./_files.ts";

/** The name of the manifest file of a migrations folder served by URL. */
export const MIGRATION_MANIFEST = "migrations.json";

/** Options of {@link createUrlSource}. */
export interface UrlSourceOptions {
  /**
   * The `fetch` used for `https:` URLs.
   * @default {globalThis.fetch}
   */
  fetch?: typeof fetch;
}

const DECODER = new TextDecoder("utf-8", { ignoreBOM: true, fatal: true });
const LOOPBACK = new Set(["localhost", "127.0.0.1", "[::1]"]);

/** Options of {@link createMigrationFile}. */
export interface CreateMigrationFileOptions {
  /** The moment whose timestamp names the file (default now). */
  now?: Date;
  /** The module, for errors. */
  module?: string;
}

const MIGRATION_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]*$/;

/**
 * Writes a new migration `<YYYYMMDDHHMMSS>_<name>.sql` into a writable source, one second
 * later than any file of the same second, and lists it in the folder's manifest when there
 * is one. Needs no database.
 *
 * @param source A directory (or `file:` URL) source.
 * @param name What the migration does (letters, digits, `_`, `-`).
 * @param content The SQL.
 * @param options The moment, and the module for errors.
 * @returns The path of the new file.
 * @throws {MigrationError} When the source cannot be written or the file exists
 *   (`write_failed`), or the name is invalid (`invalid_filename`).
 */
export async function createMigrationFile(
  source: MigrationSource,
  name: string,
  content: string,
  options: CreateMigrationFileOptions = {},
): Promise<string> {
  const write = source.write;
  if (write === undefined) {
    throw new MigrationError(
      `Cannot create a migration in '${source.location}': only a directory (or a ` +
        `file: URL) can be written; pass 'migrationsPath' as a local folder`,
      { reason: "write_failed", module: options.module },
    );
  }
  if (typeof name !== "string" || !MIGRATION_NAME.test(name)) {
    throw new MigrationError(
      `Cannot create a migration named '${String(name)}': use letters, digits, '_' and '-' ` +
        `(such as 'add_user_email')`,
      { reason: "invalid_filename", module: options.module },
    );
  }
  const existing = (await source.read().catch((error: unknown) => {
    // A folder that does not exist yet is created by write().
    if (error instanceof MigrationError && error.cause instanceof Deno.errors.NotFound) return [];
    throw error;
  })).map((f) => f.filename);
  let moment = (options.now ?? new Date()).getTime();
  let filename = `${timestampVersion(new Date(moment))}_${name}.sql`;
  while (existing.some((f) => f.startsWith(filename.slice(0, 15)))) {
    moment += 1000;
    filename = `${timestampVersion(new Date(moment))}_${name}.sql`;
  }
  return await write.call(source, filename, content);
}

/**
 * A source reading the `*.sql` files directly in a directory. Hidden files, other files and
 * sub-folders are ignored; a symbolic link to a file counts.
 *
 * @param path The directory, absolute or relative to the working directory.
 * @returns The source; it can also write new files ({@link MigrationSource.write}).
 *
 * @example Read a project's migrations
 * ```ts ignore
 * import { createDirectorySource } from "@pgdbm/pgdbm";
 * const files = await createDirectorySource("./migrations").read();
 * ```
 */
export function createDirectorySource(path: string): MigrationSource {
  const directory = absolutePath(path);
  return {
    location: directory,
    read: () => readDirectory(directory),
    write: (filename, content) => writeFile(directory, filename, content),
  };
}

/**
 * A source reading a folder by URL: `https:` (and `http:` on the loopback host) through
 * its `migrations.json` manifest; `file:` through the manifest when there is one, else by
 * listing the folder. The URL names the folder (a trailing `/` is added) or the manifest
 * itself (a URL ending in `.json`).
 *
 * @param url The folder or manifest URL.
 * @param options A `fetch` of your own.
 * @returns The source (a `file:` source can also write new files).
 * @throws {ConfigurationError} When the URL is not `file:` or `https:`.
 *
 * @example Migrations shipped inside a JSR package
 * ```ts ignore
 * import { createUrlSource } from "@pgdbm/pgdbm";
 * const source = createUrlSource(new URL("../migrations/", import.meta.url));
 * ```
 */
export function createUrlSource(
  url: string | URL,
  options: UrlSourceOptions = {},
): MigrationSource {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (cause) {
    throw new ConfigurationError(
      "migrationsPath",
      `Cannot read migrations from '${String(url)}': it is not a URL; pass a directory path ` +
        `or a file:/https: URL`,
      { cause },
    );
  }
  const protocol = parsed.protocol;
  if (
    protocol !== "file:" && protocol !== "https:" &&
    !(protocol === "http:" && LOOPBACK.has(parsed.hostname))
  ) {
    throw new ConfigurationError(
      "migrationsPath",
      `Cannot read migrations from '${parsed.href}': use a file: or https: URL ` +
        `(plain http: only on the loopback host); got '${protocol}'`,
    );
  }
  parsed.search = "";
  parsed.hash = "";
  let manifest: URL;
  let base: URL;
  if (parsed.pathname.endsWith(".json")) {
    manifest = parsed;
    base = new URL(".", parsed);
  } else {
    if (!parsed.pathname.endsWith("/")) parsed.pathname += "/";
    base = parsed;
    manifest = new URL(MIGRATION_MANIFEST, base);
  }
  if (protocol === "file:") {
    return {
      location: base.href,
      read: async () => readFileUrl(await pathOfFileUrl(base), await pathOfFileUrl(manifest)),
      write: async (filename, content) => writeFile(await pathOfFileUrl(base), filename, content),
    };
  }
  const fetcher = options.fetch ?? globalThis.fetch;
  return { location: base.href, read: () => readHttp(base, manifest, fetcher) };
}

/**
 * A source over an in-memory record of file name → SQL. Keys that are not `*.sql` names,
 * or are hidden, are ignored like other files of a directory; the record is read afresh on
 * every call, so later changes to it are seen.
 *
 * @param migrations File name → SQL text.
 * @returns The source.
 *
 * @example Migrations compiled into the program
 * ```ts ignore
 * import { createRecordSource } from "@pgdbm/pgdbm";
 * import createUsers from "../migrations/001_create_users.sql" with { type: "text" };
 * const source = createRecordSource({ "001_create_users.sql": createUsers });
 * ```
 */
export function createRecordSource(migrations: Record<string, string>): MigrationSource {
  if (typeof migrations !== "object" || migrations === null || Array.isArray(migrations)) {
    throw new ConfigurationError(
      "migrations",
      `Cannot use 'migrations': expected an object of file name to SQL; got ` +
        (Array.isArray(migrations) ? "an array" : String(migrations)),
    );
  }
  return {
    location: "<in-memory>",
    // The executor's throw becomes the rejection.
    read: () => new Promise((done) => done(readRecord(migrations))),
  };
}

function readRecord(migrations: Record<string, string>): MigrationFile[] {
  const files: MigrationFile[] = [];
  for (const [filename, content] of Object.entries(migrations)) {
    if (/[/\\]/.test(filename)) {
      throw new MigrationError(
        `Cannot read in-memory migration '${filename}': use the bare file name as the ` +
          `key (such as '001_create_users.sql'), without folders`,
        { reason: "invalid_filename", filename },
      );
    }
    if (!isMigrationFilename(filename)) continue;
    if (typeof content !== "string") {
      throw new MigrationError(
        `Cannot read in-memory migration '${filename}': its value must be the SQL text; ` +
          `got ${typeof content}`,
        { reason: "source_unreadable", filename },
      );
    }
    files.push({ filename, content });
  }
  return files;
}

/**
 * Picks the source named by exactly one of `migrationsPath`, `migrations` or `source`.
 * A `migrationsPath` that starts with a URL scheme (`file:`, `https:`) is a URL; anything
 * else is a directory path.
 *
 * @param options The options naming the source.
 * @returns The source.
 * @throws {ConfigurationError} When none or more than one is given, or a value is invalid.
 */
export function resolveMigrationSource(options: MigrationSourceOptions): MigrationSource {
  const given = [
    options.migrationsPath !== undefined ? "migrationsPath" : undefined,
    options.migrations !== undefined ? "migrations" : undefined,
    options.source !== undefined ? "source" : undefined,
  ].filter((name) => name !== undefined);
  if (given.length !== 1) {
    throw new ConfigurationError(
      "migrationsPath",
      given.length === 0
        ? "Cannot find migrations: pass 'migrationsPath' (a directory or file:/https: URL) " +
          "or 'migrations' (a record of file name to SQL)"
        : `Cannot choose where migrations come from: pass only one of ${given.join(", ")}`,
    );
  }
  if (options.source !== undefined) return options.source;
  if (options.migrations !== undefined) return createRecordSource(options.migrations);
  const path = options.migrationsPath!;
  if (path instanceof URL) return createUrlSource(path);
  if (typeof path !== "string" || path === "") {
    throw new ConfigurationError(
      "migrationsPath",
      `Cannot use 'migrationsPath': expected a directory path or URL; got ${
        path === "" ? "an empty string" : typeof path
      }`,
    );
  }
  return /^[A-Za-z][A-Za-z0-9+.-]+:/.test(path)
    ? createUrlSource(path)
    : createDirectorySource(path);
}

/**
 * Writes (or rewrites) the `migrations.json` manifest of a folder, listing its migration
 * files in version order. Run it before publishing a package that ships migrations.
 *
 * @param directory The folder, as a path or `file:` URL.
 * @returns The file names listed.
 * @throws {MigrationError} When the folder cannot be read or its files are invalid
 *   (no version, a repeated version, an empty file).
 *
 * @example Before `deno publish`
 * ```ts ignore
 * import { writeMigrationManifest } from "@pgdbm/pgdbm";
 * await writeMigrationManifest(new URL("../migrations/", import.meta.url));
 * ```
 */
export async function writeMigrationManifest(directory: string | URL): Promise<string[]> {
  const path = directory instanceof URL || directory.startsWith("file:")
    ? await pathOfFileUrl(directory)
    : absolutePath(directory);
  const files = await parseMigrationFiles(await readDirectory(path), path);
  const names = files.map((f) => f.filename);
  await Deno.writeTextFile(
    pathIn(path, MIGRATION_MANIFEST),
    JSON.stringify({ migrations: names }, null, 2) + "\n",
  );
  return names;
}

async function readDirectory(directory: string): Promise<MigrationFile[]> {
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(directory)) {
      if (!isMigrationFilename(entry.name)) continue;
      if (entry.isFile) names.push(entry.name);
      else if (entry.isSymlink && (await Deno.stat(pathIn(directory, entry.name))).isFile) {
        names.push(entry.name);
      }
    }
  } catch (cause) {
    if (cause instanceof Deno.errors.NotFound) {
      throw new MigrationError(
        `Cannot read migrations: the directory '${directory}' does not exist; create it or ` +
          `fix 'migrationsPath'`,
        { reason: "missing_file" },
        { cause },
      );
    }
    throw new MigrationError(
      `Cannot read migrations from '${directory}': ${messageOf(cause)}`,
      { reason: "source_unreadable" },
      { cause },
    );
  }
  return await Promise.all(
    names.map(async (filename) => ({
      filename,
      content: await readLocal(pathIn(directory, filename), filename),
    })),
  );
}

async function readLocal(path: string, filename: string): Promise<string> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (cause) {
    throw new MigrationError(
      `Cannot read migration '${path}': ${messageOf(cause)}`,
      {
        reason: cause instanceof Deno.errors.NotFound ? "missing_file" : "source_unreadable",
        filename,
      },
      { cause },
    );
  }
  return decode(bytes, path, filename);
}

async function readFileUrl(directory: string, manifestPath: string): Promise<MigrationFile[]> {
  let manifestText: string;
  try {
    manifestText = await Deno.readTextFile(manifestPath);
  } catch (cause) {
    if (cause instanceof Deno.errors.NotFound) return await readDirectory(directory);
    throw new MigrationError(
      `Cannot read the migrations manifest '${manifestPath}': ${messageOf(cause)}`,
      { reason: "source_unreadable" },
      { cause },
    );
  }
  const names = parseManifest(manifestText, manifestPath);
  const listed = new Set(names);
  let onDisk: string[] | undefined;
  try {
    onDisk = [];
    for await (const entry of Deno.readDir(directory)) {
      if (isMigrationFilename(entry.name) && !entry.isDirectory) onDisk.push(entry.name);
    }
  } catch {
    onDisk = undefined; // Not listable (an embedded folder, say): trust the manifest.
  }
  const unlisted = onDisk?.filter((name) => !listed.has(name)) ?? [];
  if (unlisted.length > 0) {
    throw new MigrationError(
      `Cannot read migrations from '${directory}': the manifest '${manifestPath}' does not ` +
        `list ${unlisted.map((n) => `'${n}'`).join(", ")}; run writeMigrationManifest() ` +
        `to update it, or delete it to read the folder directly`,
      { reason: "invalid_manifest", filename: unlisted[0] },
    );
  }
  return await Promise.all(
    names.map(async (filename) => ({
      filename,
      content: await readLocal(pathIn(directory, filename), filename),
    })),
  );
}

async function readHttp(base: URL, manifest: URL, fetcher: typeof fetch): Promise<MigrationFile[]> {
  const manifestText = await fetchText(
    fetcher,
    manifest,
    undefined,
    (status) =>
      status === 404
        ? `Cannot read migrations from '${base.href}': it has no manifest '${manifest.href}'; ` +
          `generate it with writeMigrationManifest() before publishing`
        : undefined,
  );
  const names = parseManifest(manifestText, manifest.href);
  return await Promise.all(names.map(async (filename) => ({
    filename,
    content: await fetchText(fetcher, new URL(filename, base), filename),
  })));
}

async function fetchText(
  fetcher: typeof fetch,
  url: URL,
  filename: string | undefined,
  explain: (status: number) => string | undefined = () => undefined,
): Promise<string> {
  let response: Response;
  try {
    response = await fetcher(url);
  } catch (cause) {
    throw new MigrationError(
      `Cannot fetch '${url.href}': ${messageOf(cause)}`,
      { reason: "source_unreadable", filename },
      { cause },
    );
  }
  if (!response.ok) {
    await response.body?.cancel();
    throw new MigrationError(
      explain(response.status) ??
        `Cannot fetch '${url.href}': the server answered ${response.status} ` +
          `${response.statusText}`.trimEnd(),
      {
        reason: response.status === 404 || response.status === 410
          ? "missing_file"
          : "source_unreadable",
        filename,
      },
    );
  }
  return decode(new Uint8Array(await response.arrayBuffer()), url.href, filename);
}

function parseManifest(text: string, where: string): string[] {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (cause) {
    throw new MigrationError(
      `Cannot read the migrations manifest '${where}': it is not JSON (${messageOf(cause)}); ` +
        `write it as { "migrations": ["001_name.sql", …] }`,
      { reason: "invalid_manifest" },
      { cause },
    );
  }
  const list = (value as { migrations?: unknown } | null)?.migrations;
  if (!Array.isArray(list)) {
    throw new MigrationError(
      `Cannot read the migrations manifest '${where}': expected { "migrations": [file names] }`,
      { reason: "invalid_manifest" },
    );
  }
  const seen = new Set<string>();
  for (const name of list) {
    if (typeof name !== "string" || !isSafeMigrationFilename(name)) {
      throw new MigrationError(
        `Cannot read the migrations manifest '${where}': ${JSON.stringify(name)} is not a ` +
          `plain '*.sql' file name (letters, digits, '_', '.', '-'; no folders)`,
        { reason: "invalid_manifest" },
      );
    }
    if (seen.has(name)) {
      throw new MigrationError(
        `Cannot read the migrations manifest '${where}': '${name}' is listed twice`,
        { reason: "invalid_manifest", filename: name },
      );
    }
    seen.add(name);
  }
  return list as string[];
}

function decode(bytes: Uint8Array, where: string, filename: string | undefined): string {
  try {
    return DECODER.decode(bytes);
  } catch (cause) {
    throw new MigrationError(
      `Cannot read migration '${where}': it is not valid UTF-8; save it as UTF-8`,
      { reason: "source_unreadable", filename },
      { cause },
    );
  }
}

async function writeFile(directory: string, filename: string, content: string): Promise<string> {
  if (!isSafeMigrationFilename(filename)) {
    throw new MigrationError(
      `Cannot create migration '${filename}': use a plain '*.sql' file name of letters, ` +
        `digits, '_', '.' and '-'`,
      { reason: "invalid_filename", filename },
    );
  }
  const path = pathIn(directory, filename);
  // The manifest is read (and refused when broken) before the file is made, so a failed
  // write leaves nothing behind.
  const manifestPath = pathIn(directory, MIGRATION_MANIFEST);
  let names: string[] | undefined;
  try {
    names = parseManifest(await Deno.readTextFile(manifestPath), manifestPath);
  } catch (error) {
    if (error instanceof MigrationError) throw error;
    names = undefined;
  }
  try {
    await Deno.mkdir(directory, { recursive: true });
    await Deno.writeTextFile(path, content, { createNew: true });
  } catch (cause) {
    throw new MigrationError(
      cause instanceof Deno.errors.AlreadyExists
        ? `Cannot create migration '${path}': the file exists; choose another name`
        : `Cannot create migration '${path}': ${messageOf(cause)}`,
      { reason: "write_failed", filename },
      { cause },
    );
  }
  if (names !== undefined) {
    names.push(filename);
    await Deno.writeTextFile(manifestPath, JSON.stringify({ migrations: names }, null, 2) + "\n");
  }
  return path;
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
