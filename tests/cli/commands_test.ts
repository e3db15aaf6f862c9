/**
 * The CLI commands and flags a Python pgdbm user reaches for: `--version`, `PGDBM_CONFIG`,
 * `migrate status --all-modules`, `db reset`, `schema dump`; and usage errors (exit 2).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { serverTest, TEST_URL, uniqueName } from "../_support/server.ts";
import { main } from "../../src/cli/mod.ts";
import { VERSION } from "../../src/cli/_version.ts";
import denoJson from "../../deno.json" with { type: "json" };
import {
  cli,
  copyFixtures,
  databaseExists,
  dropDatabase,
  dropSchemas,
  inTempDir,
  parseJson,
  urlOf,
} from "./_cli.ts";

Deno.test("cli --version prints the version of deno.json and exits 0", async () => {
  assert.equal(VERSION, denoJson.version, "src/cli/_version.ts follows deno.json");
  await inTempDir(async (dir) => {
    for (const flag of ["--version", "-V"]) {
      const run = await cli(dir, [flag], {});
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stdout, new RegExp(`^pgdbm ${denoJson.version.replaceAll(".", "\\.")} `));
      assert.equal(run.stderr, "");
    }
    const help = await cli(dir, ["--help"], {});
    assert.match(help.stdout, /--version/);
  });
});

Deno.test("cli migrate create with a bad name is a usage error: exit 2, no file", async () => {
  await inTempDir(async (dir) => {
    const run = await cli(dir, ["migrate", "create", "bad name!"], {});
    assert.equal(run.code, 2, run.stderr);
    assert.match(
      run.stderr,
      /Cannot create a migration named 'bad name!': use letters, digits, '_' and '-'/,
    );
    const json = await cli(dir, ["migrate", "create", "bad name!", "--json"], {});
    assert.equal(json.code, 2);
    assert.equal((parseJson(json).error as { exitCode: number }).exitCode, 2);
    const entries = await Array.fromAsync(Deno.readDir(dir));
    assert.deepEqual(entries, [], "nothing was written");
  });
});

Deno.test("cli reads the configuration named by PGDBM_CONFIG; --config wins over it", async () => {
  await inTempDir(async (dir) => {
    await Deno.mkdir(join(dir, "conf"));
    await Deno.writeTextFile(
      join(dir, "conf", "app.json"),
      JSON.stringify({ modules: { billing: { migrationsPath: "../db/billing" } } }),
    );
    const created = await cli(dir, ["migrate", "create", "start", "--json"], {
      PGDBM_CONFIG: "conf/app.json",
    });
    assert.equal(created.code, 0, created.stderr);
    const { path, module } = parseJson(created) as { path: string; module: string };
    assert.equal(module, "billing");
    assert.ok(path.startsWith(join(dir, "db", "billing")), path);

    const missing = await cli(dir, ["migrate", "status"], {
      PGDBM_CONFIG: "conf/nope.json",
      DATABASE_URL: TEST_URL,
    });
    assert.equal(missing.code, 2);
    assert.match(
      missing.stderr,
      /nope\.json': the file does not exist; check the path given to PGDBM_CONFIG/,
    );

    const flag = await cli(dir, ["migrate", "create", "other", "--config", "conf/app.json"], {
      PGDBM_CONFIG: "conf/nope.json",
    });
    assert.equal(flag.code, 0, flag.stderr);
  });
});

serverTest("cli migrate status --all-modules is what status does without --module", async () => {
  const schema = uniqueName("cli_all");
  await inTempDir(async (dir) => {
    await copyFixtures(dir, "users", "orders");
    await Deno.writeTextFile(
      join(dir, "pgdbm.json"),
      JSON.stringify({
        modules: {
          users: { migrationsPath: "migrations/users", schema },
          orders: { migrationsPath: "migrations/orders", schema, dependsOn: ["users"] },
        },
      }),
    );
    try {
      const plain = parseJson(await cli(dir, ["migrate", "status", "--json"]));
      const all = await cli(dir, ["migrate", "status", "--all-modules", "--json"]);
      assert.equal(all.code, 0, all.stderr);
      const names = (document: Record<string, unknown>) =>
        (document.modules as { module: string }[]).map((m) => m.module);
      assert.deepEqual(names(parseJson(all)), ["users", "orders"]);
      assert.deepEqual(names(parseJson(all)), names(plain));
      const both = await cli(dir, ["migrate", "status", "--all-modules", "--module", "users"]);
      assert.equal(both.code, 2);
      assert.match(both.stderr, /Cannot combine --all-modules with --module/);
    } finally {
      await dropSchemas(schema);
    }
  });
});

serverTest(
  "cli db reset drops, creates and migrates the database, after the same confirmation as db drop",
  async () => {
    const name = uniqueName("cli_reset");
    await inTempDir(async (dir) => {
      await copyFixtures(dir, "users");
      const env = { DATABASE_URL: urlOf(name) };
      const flags = ["--path", "migrations/users", "--schema", "app", "--module", "users"];
      try {
        const refused = await cli(dir, ["db", "reset", ...flags], env);
        assert.equal(refused.code, 2);
        assert.match(refused.stderr, /Refusing to drop database '.*' without confirmation.*--yes/);
        assert.equal(await databaseExists(name), false, "nothing was done without --yes");

        const first = await cli(dir, ["db", "reset", "--yes", ...flags], env);
        assert.equal(first.code, 0, first.stderr);
        assert.match(first.stdout, new RegExp(`Created database '${name}'`));
        assert.match(first.stdout, /Reset database '.*': 2 migrations applied in 1 module/);
        assert.equal((await cli(dir, ["schema", "create", "extra"], env)).code, 0);

        const again = await cli(dir, ["db", "reset", "-y", "--json", ...flags], env);
        assert.equal(again.code, 0, again.stderr);
        const document = parseJson(again);
        assert.equal(document.dropped, true);
        const [module] = document.modules as { module: string; applied: unknown[] }[];
        assert.equal(module.applied.length, 2);
        const schemas = parseJson(await cli(dir, ["schema", "list", "--json"], env))
          .schemas as { name: string }[];
        assert.deepEqual(schemas.map((s) => s.name).filter((s) => s !== "public"), ["app"]);

        let stderr = "";
        const asked = await main(["db", "reset", ...flags], {
          env,
          cwd: dir,
          stdinIsTerminal: true,
          stderrIsTerminal: false,
          readLine: () => Promise.resolve("not it"),
          stdout: () => {},
          stderr: (text) => stderr += text,
        });
        assert.equal(asked, 1);
        assert.match(stderr, /Type its name to confirm/);
        assert.match(stderr, /Not dropped/);
        assert.ok(await databaseExists(name));
      } finally {
        await dropDatabase(name);
      }
    });
  },
);

serverTest("cli schema dump prints the DDL through pg_dump, one schema with --schema", async () => {
  const schema = uniqueName("cli_dump");
  await inTempDir(async (dir) => {
    try {
      assert.equal((await cli(dir, ["schema", "create", schema])).code, 0);
      const folder = join(dir, "migrations");
      await Deno.mkdir(folder);
      await Deno.writeTextFile(
        join(folder, "001_t.sql"),
        "CREATE TABLE {{tables.things}} (id int);",
      );
      assert.equal((await cli(dir, ["migrate", "apply", "--schema", schema])).code, 0);

      const run = await cli(dir, ["schema", "dump", "--schema", schema]);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stdout, /PostgreSQL database dump/);
      assert.match(run.stdout, new RegExp(`CREATE TABLE ${schema}\\.things`));
      assert.doesNotMatch(run.stdout, /INSERT INTO|COPY .* FROM stdin/, "schema only");

      // One schema: a dump of the whole shared database would race with the other tests' DDL.
      const file = await cli(dir, ["schema", "dump", "--schema", schema, "--output", "out.sql"]);
      assert.equal(file.code, 0, file.stderr);
      assert.equal(file.stdout, "");
      assert.match(await Deno.readTextFile(join(dir, "out.sql")), new RegExp(`${schema}\\.things`));
    } finally {
      await dropSchemas(schema);
    }
  });
});

Deno.test("cli schema dump without pg_dump says what to install (exit 1)", async () => {
  await inTempDir(async (dir) => {
    const run = await cli(dir, ["schema", "dump"], { DATABASE_URL: TEST_URL, PATH: dir });
    assert.equal(run.code, 1);
    assert.match(run.stderr, /pg_dump is not installed \(not found on PATH\)/);
    assert.match(run.stderr, /apt-get install postgresql-client/);
    const other = await cli(dir, ["schema", "dump", "--pg-dump", join(dir, "nope")]);
    assert.equal(other.code, 1);
    assert.match(other.stderr, /'.*nope' does not exist/);
  });
});

Deno.test({
  name: "cli schema dump gives pg_dump the password in PGPASSWORD, never in its arguments",
  ignore: Deno.build.os === "windows",
  fn: async () => {
    await inTempDir(async (dir) => {
      // A stand-in for pg_dump that records its arguments and PGPASSWORD (it connects nowhere).
      const fake = join(dir, "fake_pg_dump");
      await Deno.writeTextFile(
        fake,
        `#!/bin/sh\nprintf '%s\\n' "$@" > "${dir}/args"\nprintf '%s' "$PGPASSWORD" > "${dir}/env"\necho "-- dump"\n`,
      );
      await Deno.chmod(fake, 0o755);
      const url = new URL(TEST_URL);
      url.password = "Dump_Pw_77";
      const run = await cli(dir, ["schema", "dump", "--pg-dump", fake, "--schema", "s1"], {
        DATABASE_URL: url.toString(),
      });
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout, "-- dump\n");
      const args = await Deno.readTextFile(join(dir, "args"));
      assert.doesNotMatch(args, /Dump_Pw_77/);
      assert.match(args, /^--schema-only\n--dbname=postgres:\/\/[^:@]+@/);
      assert.match(args, /--schema=s1/);
      assert.equal(await Deno.readTextFile(join(dir, "env")), "Dump_Pw_77");
    });
  },
});
