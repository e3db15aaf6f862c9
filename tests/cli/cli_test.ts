/**
 * The pgdbm CLI, run as the real command (`deno run -A src/cli/mod.ts …`) in temporary
 * directories, against the test server; plus the confirmation of `db drop` in process,
 * where a terminal can be simulated.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { main } from "../../src/cli/mod.ts";
import { observe, serverTest, TEST_URL, uniqueName } from "../_support/server.ts";
import {
  cli,
  copyFixtures,
  databaseExists,
  dropDatabase,
  dropSchemas,
  FIXTURES,
  inTempDir,
  parseJson,
  urlOf,
} from "./_cli.ts";

// ------------------------------------------------------------------ usage (no server)

Deno.test("cli --help prints the help of every level and exits 0", async () => {
  await inTempDir(async (dir) => {
    const top = await cli(dir, ["--help"]);
    assert.equal(top.code, 0, top.stderr);
    assert.match(top.stdout, /migrate apply/);
    assert.match(top.stdout, /db test-connection/);
    assert.match(top.stdout, /schema drop/);
    const group = await cli(dir, ["migrate", "--help"]);
    assert.equal(group.code, 0, group.stderr);
    assert.match(group.stdout, /Usage: pgdbm migrate <command>/);
    assert.match(group.stdout, /rollback/);
    const command = await cli(dir, ["migrate", "apply", "-h"]);
    assert.equal(command.code, 0, command.stderr);
    assert.match(command.stdout, /--dry-run/);
    assert.match(command.stdout, /--module NAME/);
    const drop = await cli(dir, ["db", "drop", "--help"]);
    assert.match(drop.stdout, /--yes/);
  });
});

Deno.test("cli exits 2 with a suggestion on an unknown command", async () => {
  await inTempDir(async (dir) => {
    const run = await cli(dir, ["migrate", "aply"]);
    assert.equal(run.code, 2);
    assert.equal(run.stdout, "");
    assert.match(run.stderr, /Unknown command 'aply'\. Did you mean 'apply'\?/);
    assert.match(run.stderr, /pgdbm migrate --help/);
    const group = await cli(dir, ["status"]);
    assert.equal(group.code, 2);
    assert.match(group.stderr, /Did you mean 'migrate status'\?/);
  });
});

Deno.test("cli exits 2 on an unknown flag, a missing argument and a missing command", async () => {
  await inTempDir(async (dir) => {
    const flag = await cli(dir, ["migrate", "apply", "--dryrun"]);
    assert.equal(flag.code, 2);
    assert.match(
      flag.stderr,
      /Unknown flag '--dryrun' for 'migrate apply'\. Did you mean '--dry-run'\?/,
    );
    const missing = await cli(dir, ["migrate", "create"]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /Missing the migration name: type 'pgdbm migrate create NAME'/);
    const value = await cli(dir, ["migrate", "status", "--module"]);
    assert.equal(value.code, 2);
    assert.match(value.stderr, /'--module' needs a value/);
    const nothing = await cli(dir, ["db"]);
    assert.equal(nothing.code, 2);
    assert.match(nothing.stderr, /Missing the command after 'db'/);
  });
});

Deno.test("cli exits 2 and says what to set when there is no database URL", async () => {
  await inTempDir(async (dir) => {
    const run = await cli(dir, ["migrate", "status"], {});
    assert.equal(run.code, 2);
    assert.match(run.stderr, /set DATABASE_URL/);
    const json = await cli(dir, ["db", "info", "--json"], {});
    assert.equal(json.code, 2);
    const document = parseJson(json);
    assert.equal(document.ok, false);
    assert.match((document.error as { message: string }).message, /DATABASE_URL/);
  });
});

Deno.test("cli refuses a dependency cycle with exit 2, naming the modules", async () => {
  const run = await cli(join(FIXTURES, "cycle"), ["migrate", "apply"]);
  assert.equal(run.code, 2);
  assert.match(run.stderr, /cycle: 'users' → 'billing' → 'orders' → 'users'/);
});

Deno.test("cli refuses an unknown dependency with exit 2, naming it", async () => {
  const run = await cli(join(FIXTURES, "unknown_dependency"), ["migrate", "status"]);
  assert.equal(run.code, 2);
  assert.match(run.stderr, /module 'orders' depends on 'user', which is not a module/);
  assert.match(run.stderr, /did you mean 'users'\?/);
});

Deno.test("cli refuses an unknown --env and reads env: URLs", async () => {
  await inTempDir(async (dir) => {
    await Deno.writeTextFile(
      join(dir, "pgdbm.json"),
      JSON.stringify({ environments: { prod: { url: "env:PROD_URL" } } }),
    );
    const unknown = await cli(dir, ["db", "info", "--env", "prd"], { DATABASE_URL: TEST_URL });
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /Unknown environment 'prd'\. Did you mean 'prod'\?/);
    const unset = await cli(dir, ["db", "info", "--env", "prod"], {});
    assert.equal(unset.code, 2);
    assert.match(unset.stderr, /variable PROD_URL, which is not set/);
  });
});

// ------------------------------------------------------------------ migrations

serverTest("cli migrate apply, status and --dry-run on a --path module", async () => {
  const schema = uniqueName("cli");
  await inTempDir(async (dir) => {
    await copyFixtures(dir, "users");
    const flags = ["--path", "migrations/users", "--schema", schema, "--module", "users"];
    try {
      const dry = await cli(dir, ["migrate", "apply", "--dry-run", ...flags]);
      assert.equal(dry.code, 0, dry.stderr);
      assert.match(dry.stdout, /would apply 2 migrations/);
      assert.match(dry.stdout, /001_users\.sql/);
      assert.equal(
        await observe(async (sql) => (await sql`SELECT to_regnamespace(${schema}) AS s`)[0].s),
        null,
        "a dry run creates nothing",
      );

      const check = await cli(dir, ["migrate", "status", "--check", ...flags]);
      assert.equal(check.code, 1, "--check fails while migrations are pending");
      assert.match(check.stdout, /Pending in users:\n {2}001_users\.sql\n {2}002_users_name\.sql/);

      const applied = await cli(dir, ["migrate", "apply", ...flags]);
      assert.equal(applied.code, 0, applied.stderr);
      assert.match(applied.stdout, /applied 2 migrations/);
      assert.doesNotMatch(applied.stderr, /\[1\/2\]/, "no progress when stderr is not a terminal");

      const again = await cli(dir, ["migrate", "apply", ...flags]);
      assert.equal(again.code, 0, again.stderr);
      assert.match(again.stdout, /up to date/);

      const status = await cli(dir, ["migrate", "status", "--check", ...flags]);
      assert.equal(status.code, 0, status.stderr);
      assert.match(status.stdout, /MODULE\s+SCHEMA\s+APPLIED\s+PENDING\s+DRIFTED\s+MISSING/);
      assert.match(
        status.stdout,
        new RegExp(`users\\s+${schema}\\s+2\\s+0\\s+0\\s+0\\s+up to date`),
      );
      assert.doesNotMatch(status.stdout + status.stderr, /Sekr/);
    } finally {
      await dropSchemas(schema);
    }
  });
});

serverTest(
  "cli migrate status says when Python pgdbm would apply the files in another order",
  async () => {
    const schema = uniqueName("cli_order");
    await inTempDir(async (dir) => {
      const folder = join(dir, "migrations", "orders");
      await Deno.mkdir(folder, { recursive: true });
      await Deno.writeTextFile(join(folder, "0001_a.sql"), "CREATE TABLE {{tables.a}} (id int);");
      await Deno.writeTextFile(join(folder, "00010_b.sql"), "CREATE TABLE {{tables.b}} (id int);");
      const flags = ["--path", "migrations/orders", "--schema", schema, "--module", "orders"];
      try {
        const status = await cli(dir, ["migrate", "status", ...flags]);
        assert.equal(status.code, 0, status.stderr);
        assert.match(status.stdout, /Python pgdbm would apply orders's files in another order/);
        assert.match(status.stdout, / {2}00010_b\.sql\n {2}0001_a\.sql/);
        const json = parseJson(await cli(dir, ["migrate", "status", "--json", ...flags]));
        const [module] = json.modules as Array<Record<string, unknown>>;
        assert.deepEqual(module.pgdbmOrder, ["00010_b.sql", "0001_a.sql"]);
      } finally {
        await dropSchemas(schema);
      }
    });
  },
);

serverTest("cli migrate --json prints one JSON document and nothing else on stdout", async () => {
  const schema = uniqueName("cli");
  await inTempDir(async (dir) => {
    await copyFixtures(dir, "users");
    const flags = ["--path", "migrations/users", "--schema", schema];
    try {
      const applied = await cli(dir, ["migrate", "apply", "--json", ...flags]);
      assert.equal(applied.code, 0, applied.stderr);
      const result = parseJson(applied);
      assert.equal(result.ok, true);
      const [module] = result.modules as {
        module: string;
        schema: string;
        status: string;
        applied: { filename: string }[];
      }[];
      assert.equal(module.module, "default");
      assert.equal(module.schema, schema);
      assert.equal(module.status, "success");
      assert.deepEqual(module.applied.map((a) => a.filename), [
        "001_users.sql",
        "002_users_name.sql",
      ]);

      const status = await cli(dir, ["migrate", "status", "--json", ...flags]);
      assert.equal(status.code, 0, status.stderr);
      const document = parseJson(status);
      const [entry] = document.modules as {
        applied: unknown[];
        pending: unknown[];
        upToDate: boolean;
      }[];
      assert.equal(entry.applied.length, 2);
      assert.equal(entry.pending.length, 0);
      assert.equal(entry.upToDate, true);
    } finally {
      await dropSchemas(schema);
    }
  });
});

serverTest("cli migrate apply --progress shows '[i/n] module: file' on stderr", async () => {
  const schema = uniqueName("cli");
  await inTempDir(async (dir) => {
    await copyFixtures(dir, "users");
    try {
      const run = await cli(dir, [
        "migrate",
        "apply",
        "--progress",
        "--path",
        "migrations/users",
        "--schema",
        schema,
        "--module",
        "users",
      ]);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stderr, /\[1\/2\] users: 001_users\.sql/);
      assert.match(run.stderr, /\[2\/2\] users: 002_users_name\.sql/);
      assert.doesNotMatch(run.stdout, /\[1\/2\]/);
    } finally {
      await dropSchemas(schema);
    }
  });
});

serverTest(
  "cli migrate create writes a file that apply then runs; rollback re-opens it",
  async () => {
    const schema = uniqueName("cli");
    await inTempDir(async (dir) => {
      const flags = ["--schema", schema];
      try {
        const created = await cli(dir, [
          "migrate",
          "create",
          "add_notes",
          "--sql",
          "CREATE TABLE {{tables.notes}} (id serial PRIMARY KEY, body text);",
          "--json",
          ...flags,
        ], {});
        assert.equal(created.code, 0, created.stderr);
        const { filename, path } = parseJson(created) as { filename: string; path: string };
        assert.match(filename, /^\d{14}_add_notes\.sql$/);
        assert.equal(path, join(dir, "migrations", filename));
        assert.match(await Deno.readTextFile(path), /CREATE TABLE \{\{tables\.notes\}\}/);

        const applied = await cli(dir, ["migrate", "apply", ...flags]);
        assert.equal(applied.code, 0, applied.stderr);
        assert.match(applied.stdout, new RegExp(`applied 1 migration in`));

        const rollback = await cli(dir, [
          "migrate",
          "rollback",
          `migrations/${filename}`,
          ...flags,
        ]);
        assert.equal(rollback.code, 0, rollback.stderr);
        assert.match(rollback.stdout, new RegExp(`Removed '${filename}' from the history`));
        const status = await cli(dir, ["migrate", "status", "--json", ...flags]);
        const [entry] = parseJson(status).modules as { pending: { filename: string }[] }[];
        assert.deepEqual(entry.pending.map((p) => p.filename), [filename]);

        const twice = await cli(dir, ["migrate", "rollback", filename, ...flags]);
        assert.equal(twice.code, 1);
        assert.match(twice.stderr, /it is not applied/);
      } finally {
        await dropSchemas(schema);
      }
    });
  },
);

serverTest(
  "cli migrate apply runs modules in dependsOn order, whatever the file's order",
  async () => {
    const schema = uniqueName("cli");
    await inTempDir(async (dir) => {
      await copyFixtures(dir, "users", "orders");
      await Deno.writeTextFile(
        join(dir, "pgdbm.json"),
        JSON.stringify({
          environments: { default: { url: "env:APP_URL" } },
          modules: {
            orders: { migrationsPath: "migrations/orders", schema, dependsOn: ["users"] },
            users: { migrationsPath: "migrations/users", schema },
          },
        }),
      );
      try {
        const dry = await cli(dir, ["migrate", "apply", "--dry-run", "--module", "orders"], {
          APP_URL: TEST_URL,
        });
        assert.equal(dry.code, 0, dry.stderr);
        assert.ok(
          dry.stdout.indexOf("users (") < dry.stdout.indexOf("orders ("),
          `users is listed before orders:\n${dry.stdout}`,
        );

        const run = await cli(dir, ["migrate", "apply", "--json"], { APP_URL: TEST_URL });
        assert.equal(run.code, 0, run.stderr);
        const modules = parseJson(run).modules as { module: string; applied: unknown[] }[];
        assert.deepEqual(modules.map((m) => [m.module, m.applied.length]), [
          ["users", 2],
          ["orders", 1],
        ]);
        const history = await observe((sql) =>
          sql.unsafe(`SELECT module_name, filename FROM "${schema}".schema_migrations ORDER BY id`)
        );
        assert.deepEqual(history.map((r) => `${r.module_name}/${r.filename}`), [
          "users/001_users.sql",
          "users/002_users_name.sql",
          "orders/001_orders.sql",
        ]);

        const status = await cli(dir, ["migrate", "status"], { APP_URL: TEST_URL });
        assert.equal(status.code, 0, status.stderr);
        assert.match(status.stdout, /users\s+\S+\s+2\s+0\s+0\s+0\s+up to date/);
        assert.match(status.stdout, /orders\s+\S+\s+1\s+0\s+0\s+0\s+up to date/);
      } finally {
        await dropSchemas(schema);
      }
    });
  },
);

serverTest(
  "cli migrate apply exits 1 on a failing migration, naming its file and line",
  async () => {
    const schema = uniqueName("cli");
    await inTempDir(async (dir) => {
      await copyFixtures(dir, "failing");
      const flags = ["--path", "migrations/failing", "--schema", schema, "--module", "shop"];
      try {
        const run = await cli(dir, ["migrate", "apply", ...flags]);
        assert.equal(run.code, 1);
        assert.match(run.stderr, /Cannot apply migration '002_broken\.sql' of module 'shop'/);
        assert.match(run.stderr, /file:\s+002_broken\.sql/);
        assert.match(run.stderr, /module:\s+shop/);
        assert.match(run.stderr, /line:\s+4/);
        assert.match(run.stderr, /Applied by this run before the failure: 001_ok\.sql/);

        const json = await cli(dir, ["migrate", "apply", "--json", ...flags]);
        assert.equal(json.code, 1);
        const document = parseJson(json);
        assert.equal(document.ok, false);
        const error = document.error as Record<string, unknown>;
        assert.equal(error.filename, "002_broken.sql");
        assert.equal(error.module, "shop");
        assert.equal(error.exitCode, 1);
        const tables = await observe((sql) =>
          sql`SELECT table_name FROM information_schema.tables WHERE table_schema = ${schema}
            ORDER BY table_name`
        );
        assert.deepEqual(tables.map((t) => t.table_name), ["kept", "schema_migrations"]);
      } finally {
        await dropSchemas(schema);
      }
    });
  },
);

// ------------------------------------------------------------------ databases

serverTest("cli db create and db drop --yes create and drop a database", async () => {
  const name = uniqueName("cli_db");
  await inTempDir(async (dir) => {
    try {
      const created = await cli(dir, ["db", "create", name]);
      assert.equal(created.code, 0, created.stderr);
      assert.ok(await databaseExists(name));
      const again = await cli(dir, ["db", "create", name]);
      assert.equal(again.code, 1);
      assert.match(again.stderr, /already exists/);

      const refused = await cli(dir, ["db", "drop", name]);
      assert.equal(refused.code, 2);
      assert.match(refused.stderr, /Pass --yes/);
      assert.ok(await databaseExists(name), "not dropped without --yes");

      const dropped = await cli(dir, ["db", "drop", name, "--yes", "--json"]);
      assert.equal(dropped.code, 0, dropped.stderr);
      assert.deepEqual(parseJson(dropped), {
        ok: true,
        command: "db drop",
        database: name,
        dropped: true,
      });
      assert.ok(!await databaseExists(name));
    } finally {
      await dropDatabase(name);
    }
  });
});

serverTest("cli db create without NAME creates the database the URL names", async () => {
  const name = uniqueName("cli_db");
  await inTempDir(async (dir) => {
    const env = { DATABASE_URL: urlOf(name) };
    try {
      const created = await cli(dir, ["db", "create"], env);
      assert.equal(created.code, 0, created.stderr);
      assert.ok(await databaseExists(name));
      const info = await cli(dir, ["db", "info", "--json"], env);
      assert.equal(info.code, 0, info.stderr);
      const document = parseJson(info);
      assert.equal(document.database, name);
      assert.match(String(document.version), /^\d+/);
      assert.equal(typeof document.sizeBytes, "number");
      assert.equal(typeof document.connections, "number");
      const dropped = await cli(dir, ["db", "drop", "-y"], env);
      assert.equal(dropped.code, 0, dropped.stderr);
      assert.ok(!await databaseExists(name));
    } finally {
      await dropDatabase(name);
    }
  });
});

serverTest("cli db create refuses a name that is not an identifier with exit 2", async () => {
  await inTempDir(async (dir) => {
    const run = await cli(dir, ["db", "create", 'x"; DROP DATABASE test; --']);
    assert.equal(run.code, 2);
    assert.match(run.stderr, /as a database name/);
  });
});

serverTest("cli db test-connection reports ok and masks the password", async () => {
  await inTempDir(async (dir) => {
    const url = new URL(TEST_URL);
    url.password = "Visible_Pw_42";
    const run = await cli(dir, ["db", "test-connection"], { DATABASE_URL: url.toString() });
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /^ok {2}postgres:\/\/[^:]+:\*\*\*\*@/);
    assert.doesNotMatch(run.stdout + run.stderr, /Visible_Pw_42/);
  });
});

serverTest(
  "cli db test-connection exits 1 on a bad login and never prints the password",
  async () => {
    await inTempDir(async (dir) => {
      const url = new URL(TEST_URL);
      url.username = uniqueName("nobody");
      url.password = "Hidden_Pw_1234";
      for (const json of [[], ["--json"]]) {
        const run = await cli(dir, ["db", "test-connection", ...json], {
          DATABASE_URL: url.toString(),
        });
        assert.equal(run.code, 1);
        assert.match(run.stderr, /Cannot connect to/);
        assert.doesNotMatch(run.stdout + run.stderr, /Hidden_Pw_1234/);
      }
    });
  },
);

serverTest("main() db drop asks to type the name when stdin is a terminal", async () => {
  const name = uniqueName("cli_db");
  let stderr = "";
  const io = (answer: string) => ({
    env: { DATABASE_URL: TEST_URL },
    stdinIsTerminal: true,
    stderrIsTerminal: false,
    readLine: () => Promise.resolve(answer),
    stdout: () => {},
    stderr: (text: string) => stderr += text,
  });
  try {
    assert.equal(await main(["db", "create", name], io("")), 0, stderr);
    assert.equal(await main(["db", "drop", name], io("wrong")), 1);
    assert.match(stderr, new RegExp(`Type its name to confirm`));
    assert.match(stderr, /Not dropped/);
    assert.ok(await databaseExists(name));
    assert.equal(await main(["db", "drop", name], io(name)), 0, stderr);
    assert.ok(!await databaseExists(name));
  } finally {
    await dropDatabase(name);
  }
});

// ------------------------------------------------------------------ schemas

serverTest("cli schema create, list and drop", async () => {
  const schema = uniqueName("cli");
  await inTempDir(async (dir) => {
    try {
      const created = await cli(dir, ["schema", "create", schema]);
      assert.equal(created.code, 0, created.stderr);
      await observe((sql) => sql.unsafe(`CREATE TABLE "${schema}".t (id int)`));

      const listed = await cli(dir, ["schema", "list", "--json"]);
      assert.equal(listed.code, 0, listed.stderr);
      const schemas = parseJson(listed).schemas as { name: string; tables: number }[];
      assert.equal(schemas.find((s) => s.name === schema)?.tables, 1);
      assert.ok(schemas.every((s) => !s.name.startsWith("pg_") && s.name !== "information_schema"));
      const text = await cli(dir, ["schema", "list"]);
      assert.match(text.stdout, /^SCHEMA\s+OWNER\s+TABLES\s+SIZE/);
      assert.match(text.stdout, new RegExp(`\\n${schema}\\s`));

      const refused = await cli(dir, ["schema", "drop", schema]);
      assert.equal(refused.code, 2);
      assert.match(refused.stderr, /--yes/);
      const notEmpty = await cli(dir, ["schema", "drop", schema, "--yes"]);
      assert.equal(notEmpty.code, 1);
      assert.match(notEmpty.stderr, /not empty.*--cascade/);
      const dropped = await cli(dir, ["schema", "drop", schema, "--cascade", "--yes"]);
      assert.equal(dropped.code, 0, dropped.stderr);
      assert.equal(
        await observe(async (sql) => (await sql`SELECT to_regnamespace(${schema}) AS s`)[0].s),
        null,
      );
    } finally {
      await dropSchemas(schema);
    }
  });
});
