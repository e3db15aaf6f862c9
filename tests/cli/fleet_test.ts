/**
 * Tenant fleets on the command line: `migrate apply` and `migrate status` with
 * `--schemas`, `--schema-pattern` and `--schemas-query`, run as the real command against
 * the test server (the progress bar in process, where a terminal can be simulated).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/mod.ts";
import { observe, serverTest, TEST_URL, uniqueName } from "../_support/server.ts";
import { cli, dropSchemas, inTempDir, parseJson } from "./_cli.ts";

/** Writes the tenant module's migrations into `dir/migrations/tenant`. */
async function tenantMigrations(dir: string): Promise<string[]> {
  const folder = join(dir, "migrations", "tenant");
  await Deno.mkdir(folder, { recursive: true });
  await Deno.writeTextFile(
    join(folder, "001_items.sql"),
    "CREATE TABLE IF NOT EXISTS {{tables.items}} (id int);\n",
  );
  await Deno.writeTextFile(
    join(folder, "002_name.sql"),
    "-- the name of an item\nALTER TABLE {{tables.items}} ADD COLUMN name text;\n",
  );
  return ["--path", "migrations/tenant", "--module", "tenant"];
}

async function createSchemas(...schemas: string[]): Promise<void> {
  await observe(async (sql) => {
    for (const schema of schemas) await sql.unsafe(`CREATE SCHEMA "${schema}"`);
  });
}

async function history(schema: string): Promise<string[]> {
  return await observe(async (sql) =>
    (await sql.unsafe(`SELECT filename FROM "${schema}".schema_migrations ORDER BY id`)).map(
      (row) => row.filename as string,
    )
  );
}

serverTest(
  "cli fleet: apply --schema-pattern migrates the matching schemas; one tenant's failure is " +
    "reported (exit 1) without stopping the others; status shows it behind; a rerun resumes",
  async () => {
    const prefix = uniqueName("fleet");
    const schemas = [1, 2, 3].map((i) => `${prefix}_t${i}`);
    const other = `${prefix}x`;
    await inTempDir(async (dir) => {
      const module = await tenantMigrations(dir);
      await createSchemas(...schemas, other);
      // t2 already has an 'items' table with a 'name' column: its 002 fails there.
      await observe((sql) => sql.unsafe(`CREATE TABLE "${schemas[1]}".items (name text)`));
      const pattern = ["--schema-pattern", `${prefix}_t*`];
      try {
        const status = await cli(dir, ["migrate", "status", ...module, ...pattern]);
        assert.equal(status.code, 0, status.stderr);
        assert.match(status.stdout, /Module 'tenant' in 3 schemas \(schemas matching/);
        assert.match(status.stdout, new RegExp(`${schemas[0]}\\s+behind\\s+0\\s+2\\s+0\\s+0`));
        assert.match(status.stdout, /3 schemas: 0 up to date, 3 behind, 0 drifted/);

        const run = await cli(dir, [
          "migrate",
          "apply",
          ...module,
          ...pattern,
          "--concurrency",
          "2",
        ]);
        assert.equal(run.code, 1, run.stderr);
        assert.match(run.stdout, /SCHEMA\s+STATUS\s+APPLIED\s+TIME/);
        assert.match(run.stdout, new RegExp(`${schemas[0]}\\s+migrated\\s+2\\s`));
        assert.match(run.stdout, new RegExp(`${schemas[1]}\\s+FAILED\\s+1\\s`));
        assert.match(run.stdout, new RegExp(`${schemas[2]}\\s+migrated\\s+2\\s`));
        assert.match(
          run.stdout,
          new RegExp(
            `Failures:\\n {2}${schemas[1]}: .*002_name\\.sql.*the statement at line 2 failed`,
          ),
        );
        assert.match(
          run.stderr,
          new RegExp(`Error: 1 of 3 schemas failed in module 'tenant': ${schemas[1]}`),
        );
        assert.match(
          run.stderr,
          /Summary: 3 schemas \(2 migrated, 1 failed\); 5 migrations applied/,
        );
        assert.deepEqual(await history(schemas[2]), ["001_items.sql", "002_name.sql"]);
        const json = await cli(dir, ["migrate", "apply", "--json", ...module, ...pattern]);
        assert.equal(json.code, 1, json.stderr);
        const failed = parseJson(json);
        assert.equal(failed.ok, false);
        assert.equal((failed.error as { exitCode: number }).exitCode, 1);
        assert.deepEqual(failed.failed, [schemas[1]]);
        const entry = (failed.schemas as { schema: string; error?: Record<string, unknown> }[])
          .find((s) => s.schema === schemas[1])!;
        assert.equal(entry.error?.filename, "002_name.sql");
        assert.equal(entry.error?.line, 2);
        assert.equal(
          await observe(async (sql) =>
            (await sql`SELECT to_regclass(${`"${other}".items`}) AS t`)[0].t
          ),
          null,
          "a schema the pattern does not match is untouched",
        );

        const behind = await cli(dir, [
          "migrate",
          "status",
          "--check",
          "--json",
          ...module,
          ...pattern,
        ]);
        assert.equal(behind.code, 1, behind.stderr);
        const report = parseJson(behind);
        assert.equal(report.ok, false);
        assert.deepEqual(report.behind, [schemas[1]]);
        assert.deepEqual(report.upToDate, [schemas[0], schemas[2]]);

        await observe((sql) => sql.unsafe(`ALTER TABLE "${schemas[1]}".items DROP COLUMN name`));
        const resumed = await cli(dir, ["migrate", "apply", "--json", ...module, ...pattern]);
        assert.equal(resumed.code, 0, resumed.stderr);
        const document = parseJson(resumed);
        assert.equal(document.ok, true);
        assert.equal(document.appliedCount, 1);
        assert.deepEqual(
          (document.schemas as { schema: string; status: string }[]).map((s) => s.status),
          ["up_to_date", "success", "up_to_date"],
        );
        const text = await cli(dir, ["migrate", "apply", ...module, ...pattern]);
        assert.equal(text.code, 0, text.stderr);
        assert.match(text.stdout, /3 schemas already up to date/);
        assert.match(text.stdout, /Done: 3 schemas \(3 up to date\); 0 migrations applied/);
      } finally {
        await dropSchemas(...schemas, other);
      }
    });
  },
);

serverTest(
  "cli fleet: --schemas and --schemas-query choose the schemas; --dry-run changes nothing; " +
    "status reports a drifted schema",
  async () => {
    const prefix = uniqueName("fleet");
    const schemas = [1, 2].map((i) => `${prefix}_s${i}`);
    await inTempDir(async (dir) => {
      const module = await tenantMigrations(dir);
      try {
        const dry = await cli(dir, [
          "migrate",
          "apply",
          "--dry-run",
          ...module,
          "--schemas",
          schemas.join(","),
        ]);
        assert.equal(dry.code, 0, dry.stderr);
        assert.match(dry.stdout, /SCHEMA\s+STATUS\s+PENDING/);
        assert.match(dry.stdout, new RegExp(`${schemas[1]}\\s+would apply\\s+2`));
        assert.match(dry.stdout, /dry run: nothing was applied/);
        assert.equal(
          await observe(async (sql) =>
            (await sql`SELECT to_regnamespace(${schemas[0]}) AS s`)[0].s
          ),
          null,
        );

        // --schemas creates the schemas it names (the Migrator creates its schema).
        const listed = await cli(dir, [
          "migrate",
          "apply",
          ...module,
          "--schemas",
          schemas[0],
          "--schemas",
          schemas[1],
        ]);
        assert.equal(listed.code, 0, listed.stderr);
        assert.match(listed.stdout, /Done: 2 schemas \(2 migrated\); 4 migrations applied/);

        await Deno.writeTextFile(
          join(dir, "migrations", "tenant", "002_name.sql"),
          "ALTER TABLE {{tables.items}} ADD COLUMN title text;\n",
        );
        const query = `SELECT nspname FROM pg_namespace WHERE nspname LIKE '${prefix}%' ORDER BY 1`;
        const status = await cli(dir, [
          "migrate",
          "status",
          "--json",
          ...module,
          "--schemas-query",
          query,
        ]);
        assert.equal(status.code, 0, status.stderr);
        const report = parseJson(status);
        assert.deepEqual(report.drifted, schemas);
        const [first] = report.schemas as { state: string; drifted: { filename: string }[] }[];
        assert.equal(first.state, "drifted");
        assert.equal(first.drifted[0].filename, "002_name.sql");
        const text = await cli(dir, ["migrate", "status", ...module, "--schemas-query", query]);
        assert.match(text.stdout, new RegExp(`${schemas[0]}\\s+DRIFTED\\s+2\\s+0\\s+1\\s+0`));
        assert.match(text.stdout, /Drifted: a migration file changed after it was applied/);

        const bad = await cli(dir, [
          "migrate",
          "status",
          ...module,
          "--schemas-query",
          "SELECT 42",
        ]);
        assert.equal(bad.code, 1);
        assert.match(
          bad.stderr,
          /--schemas-query: its first column must hold schema names \(text\); got 42/,
        );
        const broken = await cli(dir, [
          "migrate",
          "apply",
          ...module,
          "--schemas-query",
          "SELEC 1",
        ]);
        assert.equal(broken.code, 1);
        assert.match(broken.stderr, /Cannot run --schemas-query: .*syntax error/);
      } finally {
        await dropSchemas(...schemas);
      }
    });
  },
);

Deno.test("cli fleet: bad selections are usage errors (exit 2) saying what to type", async () => {
  await inTempDir(async (dir) => {
    const module = ["--path", "migrations", "--module", "tenant"];
    const env = { DATABASE_URL: TEST_URL };
    const cases: [string[], RegExp][] = [
      [
        ["--schemas", "a", "--schema-pattern", "t_*"],
        /Choose the fleet's schemas one way: --schemas and --schema-pattern/,
      ],
      [["--schemas", "a", "--schema", "b"], /Cannot combine --schema with --schemas/],
      [
        ["--schemas", "a", "--concurrency", "0"],
        /--concurrency must be a whole number from 1 to 64; got '0'/,
      ],
      [["--concurrency", "2"], /--concurrency applies to a tenant fleet: add --schemas LIST/],
      [
        ["--schema-pattern", "t-*;"],
        /Cannot use --schema-pattern 't-\*;': write a schema name with \*/,
      ],
      [["--schemas", "ok,bad name"], /Cannot use 'bad name' from --schemas/],
    ];
    for (const [flags, message] of cases) {
      const run = await cli(dir, ["migrate", "apply", ...module, ...flags], env);
      assert.equal(run.code, 2, `${flags.join(" ")}: ${run.stderr}`);
      assert.match(run.stderr, message);
    }
  });
});

serverTest(
  "main() fleet: a progress bar on a terminal (done/total, failures, rate), none otherwise",
  async () => {
    const prefix = uniqueName("fleet");
    const schemas = [1, 2, 3].map((i) => `${prefix}_p${i}`);
    await inTempDir(async (dir) => {
      const module = await tenantMigrations(dir);
      const run = async (terminal: boolean): Promise<string> => {
        let stderr = "";
        const code = await main(["migrate", "apply", ...module, "--schemas", schemas.join(",")], {
          env: { DATABASE_URL: TEST_URL },
          cwd: dir,
          stdinIsTerminal: false,
          stderrIsTerminal: terminal,
          stdout: () => {},
          stderr: (text) => stderr += text,
        });
        assert.equal(code, 0, stderr);
        return stderr;
      };
      try {
        const bar = await run(true);
        const redraw = "\r\x1b[2K";
        assert.ok(bar.includes(`${redraw}[${"#".repeat(24)}] 3/3 schemas  0 failed  `), bar);
        assert.match(bar, /\] 3\/3 schemas {2}0 failed {2}[\d.]+\/s/);
        assert.match(bar, /\[-{24}\] 0\/3 schemas {2}0 failed/);
        const plain = await run(false);
        assert.doesNotMatch(plain, /schemas {2}0 failed|\r/);
      } finally {
        await dropSchemas(...schemas);
      }
    });
  },
);
