/**
 * The CLI commands and flags a Python pgdbm user reaches for: `--version`, `PGDBM_CONFIG`,
 * `migrate status --all-modules`, `db reset`, `schema dump`; and usage errors (exit 2).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { serverTest, TEST_URL, uniqueName } from "../_support/server.ts";
import { VERSION } from "../../src/cli/_version.ts";
import denoJson from "../../deno.json" with { type: "json" };
import { cli, copyFixtures, dropSchemas, inTempDir, parseJson } from "./_cli.ts";

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
