import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { ConfigurationError, MigrationError } from "../../src/errors.ts";
import {
  createDirectorySource,
  createRecordSource,
  createUrlSource,
  MIGRATION_MANIFEST,
  resolveMigrationSource,
  writeMigrationManifest,
} from "../../src/migrate/source.ts";
import type { MigrationFile } from "../../src/migrate/types.ts";

const FIXTURES = new URL("../fixtures/migrations/", import.meta.url);
const fixture = (name: string): string => fileURLToPath(new URL(`${name}/`, FIXTURES));

function names(files: MigrationFile[]): string[] {
  return files.map((f) => f.filename).sort();
}

Deno.test("createDirectorySource() reads *.sql files and ignores hidden files and folders", async () => {
  const files = await createDirectorySource(fixture("basic")).read();
  assert.deepEqual(names(files), ["10_function.sql", "1_users.sql", "2_posts.sql"]);
  const users = files.find((f) => f.filename === "1_users.sql")!;
  assert.equal(users.content, await Deno.readTextFile(join(fixture("basic"), "1_users.sql")));
});

Deno.test("createDirectorySource() rejects a missing directory with MigrationError", async () => {
  await assert.rejects(
    createDirectorySource(fixture("does_not_exist")).read(),
    (error: unknown) =>
      error instanceof MigrationError && /does not exist/.test(error.message) &&
      error.message.includes("does_not_exist"),
  );
});

Deno.test("createDirectorySource() reads the file afresh on every call", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const source = createDirectorySource(dir);
    assert.deepEqual(await source.read(), []);
    await Deno.writeTextFile(join(dir, "001_a.sql"), "SELECT 1;");
    assert.deepEqual(await source.read(), [{ filename: "001_a.sql", content: "SELECT 1;" }]);
    await Deno.writeTextFile(join(dir, "001_a.sql"), "SELECT 2;");
    assert.equal((await source.read())[0].content, "SELECT 2;");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("createDirectorySource() keeps a byte order mark and refuses invalid UTF-8", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(join(dir, "001_bom.sql"), "\ufeffSELECT 1;");
    assert.equal((await createDirectorySource(dir).read())[0].content, "\ufeffSELECT 1;");
    await Deno.writeFile(join(dir, "002_bad.sql"), new Uint8Array([0x53, 0xff, 0xfe]));
    await assert.rejects(
      createDirectorySource(dir).read(),
      (error: unknown) =>
        error instanceof MigrationError && error.filename === "002_bad.sql" &&
        /not valid UTF-8/.test(error.message),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("MigrationSource.write() creates a file only inside the directory", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const source = createDirectorySource(join(dir, "new"));
    const path = await source.write!("20250101000000_add.sql", "SELECT 1;");
    assert.equal(path, join(dir, "new", "20250101000000_add.sql"));
    assert.equal(await Deno.readTextFile(path), "SELECT 1;");
    for (const bad of ["../escape.sql", "/abs.sql", "sub/x.sql", ".hidden.sql", "x.txt"]) {
      await assert.rejects(source.write!(bad, "SELECT 1;"), MigrationError, bad);
    }
    await assert.rejects(source.write!("20250101000000_add.sql", "x"), /the file exists/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("createUrlSource() reads a file: folder through its manifest", async () => {
  const source = createUrlSource(new URL("with_manifest/", FIXTURES));
  assert.equal(source.location, new URL("with_manifest/", FIXTURES).href);
  assert.deepEqual(names(await source.read()), ["001_a.sql", "002_b.sql"]);
  // The manifest URL itself names the same folder; a missing trailing slash is added.
  const byManifest = createUrlSource(new URL(`with_manifest/${MIGRATION_MANIFEST}`, FIXTURES));
  assert.deepEqual(names(await byManifest.read()), ["001_a.sql", "002_b.sql"]);
  const noSlash = createUrlSource(new URL("with_manifest", FIXTURES).href);
  assert.deepEqual(names(await noSlash.read()), ["001_a.sql", "002_b.sql"]);
});

Deno.test("createUrlSource() lists a file: folder that has no manifest", async () => {
  const files = await createUrlSource(new URL("basic/", FIXTURES)).read();
  assert.deepEqual(names(files), ["10_function.sql", "1_users.sql", "2_posts.sql"]);
});

Deno.test("createUrlSource() refuses a file: manifest that misses a file of the folder", async () => {
  await assert.rejects(
    createUrlSource(new URL("stale_manifest/", FIXTURES)).read(),
    (error: unknown) =>
      error instanceof MigrationError && error.filename === "002_b.sql" &&
      /does not list '002_b\.sql'/.test(error.message),
  );
});

/** A source over one of the folders with a broken manifest (fixtures/migrations/broken_manifest/). */
function brokenManifest(
  name: string,
): { source: ReturnType<typeof createUrlSource>; path: string } {
  const folder = new URL(`broken_manifest/${name}/`, FIXTURES);
  return {
    source: createUrlSource(folder),
    path: fileURLToPath(new URL(MIGRATION_MANIFEST, folder)),
  };
}

/** Matches a MigrationError whose message starts with the manifest's path and says `why`. */
function manifestError(path: string, why: RegExp): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof MigrationError, `expected MigrationError, got ${error}`);
    assert.equal(error.reason, "invalid_manifest");
    assert.ok(
      error.message.startsWith(`Cannot read the migrations manifest '${path}': `),
      error.message,
    );
    assert.match(error.message, why);
    return true;
  };
}

Deno.test("createUrlSource() refuses a manifest that is not JSON and shows the expected form", async () => {
  const { source, path } = brokenManifest("not_json");
  await assert.rejects(
    source.read(),
    manifestError(path, /it is not JSON \(.+\); write it as \{ "migrations": \["001_name\.sql"/s),
  );
});

Deno.test('createUrlSource() refuses a manifest without a "migrations" list', async () => {
  const { source, path } = brokenManifest("not_a_list");
  await assert.rejects(
    source.read(),
    manifestError(path, /expected \{ "migrations": \[file names\] \}/),
  );
});

Deno.test("createUrlSource() refuses manifest entries that are not plain *.sql file names", async () => {
  for (
    const [folder, shown] of [
      ["not_sql", '"002_notes.txt"'],
      ["not_a_string", "2"],
      ["in_a_folder", '"sub/002_b.sql"'],
    ]
  ) {
    const { source, path } = brokenManifest(folder);
    await assert.rejects(
      source.read(),
      manifestError(
        path,
        new RegExp(`: ${shown.replaceAll(".", "\\.")} is not a plain '\\*\\.sql' file name`),
      ),
      folder,
    );
  }
});

Deno.test("createUrlSource() refuses a manifest that lists a file twice, naming it", async () => {
  const { source, path } = brokenManifest("listed_twice");
  await assert.rejects(source.read(), (error: unknown) => {
    manifestError(path, /'001_a\.sql' is listed twice/)(error);
    assert.equal((error as MigrationError).filename, "001_a.sql");
    return true;
  });
});

Deno.test("createUrlSource() rejects a manifest that lists a missing file, naming the file", async () => {
  const { source } = brokenManifest("missing_file");
  const missing = fileURLToPath(new URL("broken_manifest/missing_file/002_missing.sql", FIXTURES));
  await assert.rejects(source.read(), (error: unknown) => {
    assert.ok(error instanceof MigrationError, `expected MigrationError, got ${error}`);
    assert.equal(error.filename, "002_missing.sql");
    assert.equal(error.reason, "missing_file");
    assert.ok(error.message.startsWith(`Cannot read migration '${missing}': `), error.message);
    assert.ok(error.cause instanceof Deno.errors.NotFound, `cause: ${error.cause}`);
    return true;
  });
});

Deno.test("createUrlSource() reads an http: folder on the loopback host through its manifest", async () => {
  const files: Record<string, string> = {
    "/pkg/migrations/migrations.json": JSON.stringify({
      migrations: ["002_b.sql", "001_a.sql"],
    }),
    "/pkg/migrations/001_a.sql": "CREATE TABLE a (id int);",
    "/pkg/migrations/002_b.sql": "CREATE TABLE b (id int);",
    "/bad/migrations.json": JSON.stringify({ migrations: ["../secret.sql"] }),
    "/gone/migrations.json": JSON.stringify({ migrations: ["001_gone.sql"] }),
  };
  const requested: string[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const path = new URL(req.url).pathname;
    requested.push(path);
    const body = files[path];
    return body === undefined ? new Response("nope", { status: 404 }) : new Response(body);
  });
  try {
    const base = `http://127.0.0.1:${server.addr.port}`;
    const read = await createUrlSource(`${base}/pkg/migrations/`).read();
    assert.deepEqual(read, [
      { filename: "002_b.sql", content: "CREATE TABLE b (id int);" },
      { filename: "001_a.sql", content: "CREATE TABLE a (id int);" },
    ]);
    await assert.rejects(
      createUrlSource(`${base}/empty/`).read(),
      (error: unknown) =>
        error instanceof MigrationError && /has no manifest/.test(error.message) &&
        /writeMigrationManifest/.test(error.message),
    );
    await assert.rejects(createUrlSource(`${base}/bad/`).read(), /not a\s+plain '\*\.sql'/);
    await assert.rejects(
      createUrlSource(`${base}/gone/`).read(),
      (error: unknown) =>
        error instanceof MigrationError && error.filename === "001_gone.sql" &&
        /answered 404/.test(error.message),
    );
    assert.ok(!requested.some((p) => p.includes("secret")));
  } finally {
    await server.shutdown();
  }
});

Deno.test("createUrlSource() refuses other schemes and plain http: to another host", () => {
  assert.throws(() => createUrlSource("ftp://example.com/m/"), ConfigurationError);
  assert.throws(() => createUrlSource("http://example.com/m/"), ConfigurationError);
  assert.throws(() => createUrlSource("not a url"), ConfigurationError);
});

Deno.test("createRecordSource() reads a record afresh and ignores non-SQL keys", async () => {
  const record: Record<string, string> = {
    "001_a.sql": "SELECT 1;",
    "README.md": "ignored",
    ".hidden.sql": "ignored",
  };
  const source = createRecordSource(record);
  assert.deepEqual(await source.read(), [{ filename: "001_a.sql", content: "SELECT 1;" }]);
  record["002_b.sql"] = "SELECT 2;";
  assert.deepEqual(names(await source.read()), ["001_a.sql", "002_b.sql"]);
  assert.equal(source.write, undefined);
});

Deno.test("createRecordSource() refuses keys with folders and values that are not text", async () => {
  await assert.rejects(
    createRecordSource({ "migrations/001_a.sql": "SELECT 1;" }).read(),
    /use the bare file name/,
  );
  await assert.rejects(
    createRecordSource({ "001_a.sql": 42 as unknown as string }).read(),
    /must be the SQL text/,
  );
  assert.throws(
    () => createRecordSource(null as unknown as Record<string, string>),
    ConfigurationError,
  );
});

Deno.test("resolveMigrationSource() picks exactly one source", () => {
  assert.equal(
    resolveMigrationSource({ migrationsPath: fixture("basic") }).location,
    fixture("basic").replace(/\/$/, ""),
  );
  assert.equal(
    resolveMigrationSource({ migrationsPath: new URL("basic/", FIXTURES).href }).location,
    new URL("basic/", FIXTURES).href,
  );
  assert.equal(resolveMigrationSource({ migrations: {} }).location, "<in-memory>");
  assert.throws(
    () => resolveMigrationSource({}),
    (error: unknown) => error instanceof ConfigurationError && error.field === "migrationsPath",
  );
  assert.throws(
    () => resolveMigrationSource({ migrationsPath: "x", migrations: {} }),
    /pass only one of migrationsPath, migrations/,
  );
  assert.throws(() => resolveMigrationSource({ migrationsPath: "" }), ConfigurationError);
});

Deno.test("writeMigrationManifest() lists the folder in version order and keeps it current", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(join(dir, "10_c.sql"), "SELECT 10;");
    await Deno.writeTextFile(join(dir, "2_b.sql"), "SELECT 2;");
    await Deno.writeTextFile(join(dir, ".hidden.sql"), "x");
    assert.deepEqual(await writeMigrationManifest(dir), ["2_b.sql", "10_c.sql"]);
    const manifestPath = join(dir, MIGRATION_MANIFEST);
    assert.deepEqual(JSON.parse(await Deno.readTextFile(manifestPath)), {
      migrations: ["2_b.sql", "10_c.sql"],
    });
    // Creating a file through a file: URL source adds it to the manifest.
    const source = createUrlSource(new URL(`file://${dir}/`));
    await source.write!("11_d.sql", "SELECT 11;");
    assert.deepEqual(JSON.parse(await Deno.readTextFile(manifestPath)).migrations, [
      "2_b.sql",
      "10_c.sql",
      "11_d.sql",
    ]);
    assert.deepEqual(names(await source.read()), ["10_c.sql", "11_d.sql", "2_b.sql"]);
    await Deno.writeTextFile(join(dir, "12_dup.sql"), "SELECT 12;");
    await Deno.writeTextFile(join(dir, "012_dup.sql"), "SELECT 12;");
    await assert.rejects(writeMigrationManifest(dir), /same version 12/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("MigrationSource.write() on a folder with a broken manifest creates no file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(join(dir, MIGRATION_MANIFEST), '{ "migrations": ["001_a.sql", }');
    await Deno.writeTextFile(join(dir, "001_a.sql"), "SELECT 1;");
    const source = createUrlSource(new URL(`${pathToFileURL(dir).href}/`));
    await assert.rejects(source.write!("002_b.sql", "SELECT 2;"), MigrationError);
    assert.deepEqual(
      [...Deno.readDirSync(dir)].map((entry) => entry.name).sort(),
      ["001_a.sql", MIGRATION_MANIFEST],
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
