/**
 * The test helpers (`@pgdbm/pgdbm/testing`) against the real server; their embedded engine
 * is tested in embedded_engine_test.ts. The fixture, snapshot and row-count tests need no
 * server of their own, so they follow the suite's rule (tests/_support/server.ts): on the
 * server when it answers, on the embedded PostgreSQL only when none does. Each test uses a
 * name prefix of its own, so what it creates and cleans up never meets another test's (or
 * another run's) databases.
 */
import assert from "node:assert/strict";
import { AssertionError } from "node:assert";
import { ConfigurationError, MigrationError, QueryError, SchemaError } from "../../mod.ts";
import {
  assertTableUnchanged,
  cleanupTestDatabases,
  countRows,
  createTestDatabase,
  loadFixtures,
  snapshotTable,
  truncateTable,
  withTestDatabase,
  withTestSchema,
} from "../../src/testing/mod.ts";
import { observe, serverTest, targetTest, TEST_TARGET, TEST_URL } from "../_support/server.ts";

/** A prefix no other test or run uses (the helpers allow 20 characters). */
function prefix(): string {
  return `tt${crypto.randomUUID().replaceAll("-", "").slice(0, 10)}`;
}

async function databasesLike(start: string): Promise<{ name: string; comment: string | null }[]> {
  return await observe(async (sql) => [
    ...await sql<{ name: string; comment: string | null }[]>`
      SELECT datname AS name, shobj_description(oid, 'pg_database') AS comment
      FROM pg_database WHERE left(datname, length(${start})) = ${start} ORDER BY datname`,
  ]);
}

async function schemaExists(schema: string): Promise<boolean> {
  const rows = await observe((sql) =>
    sql`SELECT 1 FROM information_schema.schemata WHERE schema_name = ${schema}`
  );
  return rows.length === 1;
}

/** Drops every database of a test's prefix (templates included). */
async function dropAll(start: string): Promise<void> {
  await cleanupTestDatabases({ url: TEST_URL, prefix: start, olderThanMs: 0, templates: true });
  for (const { name } of await databasesLike(`${start}_`)) {
    await observe((sql) => sql.unsafe(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`));
  }
}

const NOTES = {
  "001_notes.sql": "CREATE TABLE {{tables.notes}} (id serial PRIMARY KEY, body text NOT NULL);",
  "002_tags.sql":
    "CREATE TABLE {{tables.tags}} (note_id int REFERENCES {{tables.notes}} (id), tag text);",
};

serverTest("createTestDatabase() creates a marked database and drop() removes it", async () => {
  const start = prefix();
  try {
    const test = await createTestDatabase({ url: TEST_URL, prefix: start });
    try {
      assert.equal(test.embedded, false);
      assert.equal(test.fromTemplate, false);
      assert.ok(test.name.startsWith(`${start}_`));
      const [row] = await databasesLike(test.name);
      assert.match(row.comment ?? "", /^pgdbm-testing database created=\d{4}-/);
      assert.equal(await test.db.fetchValue("SELECT current_database()"), test.name);
    } finally {
      await test[Symbol.asyncDispose]();
    }
    assert.deepEqual(await databasesLike(test.name), []);
    await test.drop();
  } finally {
    await dropAll(start);
  }
});

serverTest(
  "createTestDatabase() migrates a template once and clones it on later calls",
  async () => {
    const start = prefix();
    try {
      const migrations = { moduleName: "notes", migrations: NOTES, schema: "notes" };
      const first = await createTestDatabase({ url: TEST_URL, prefix: start, migrations });
      const second = await createTestDatabase({ url: TEST_URL, prefix: start, migrations });
      try {
        assert.equal(first.fromTemplate, true);
        assert.equal(first.templateBuilt, true);
        assert.equal(second.fromTemplate, true);
        assert.equal(second.templateBuilt, false, "the second call clones without migrating");
        assert.equal(second.template, first.template);
        assert.equal(second.db.schema, "notes");
        assert.equal(await second.db.tableExists("tags"), true);
        const applied = await second.db.fetchValue<string>(
          "SELECT count(*)::text FROM {{tables.schema_migrations}} WHERE module_name = 'notes'",
        );
        assert.equal(applied, "2");
        await first.db.execute("INSERT INTO {{tables.notes}} (body) VALUES ('only in first')");
        assert.equal(await countRows(second.db, "notes"), 0, "clones share no rows");
        const allow = await observe((sql) =>
          sql`SELECT datallowconn FROM pg_database WHERE datname = ${first.template!}`
        );
        assert.equal(allow[0].datallowconn, false, "the template refuses connections");
      } finally {
        await first.drop();
        await second.drop();
      }

      const changed = {
        moduleName: "notes",
        migrations: { ...NOTES, "003_more.sql": "ALTER TABLE {{tables.notes}} ADD pinned bool;" },
        schema: "notes",
      };
      await using third = await createTestDatabase({
        url: TEST_URL,
        prefix: start,
        migrations: changed,
      });
      assert.equal(third.templateBuilt, true, "changed files build a new template");
      assert.notEqual(third.template, first.template);
      assert.deepEqual(await databasesLike(first.template!), [], "the old template is dropped");
      const templates = (await databasesLike(`${start}_tpl_`)).map((d) => d.name);
      assert.deepEqual(templates, [third.template]);
    } finally {
      await dropAll(start);
    }
  },
);

serverTest("createTestDatabase() builds a template once when calls race for it", async () => {
  const start = prefix();
  try {
    const migrations = { moduleName: "notes", migrations: NOTES };
    const tests = await Promise.all(
      [1, 2, 3].map(() => createTestDatabase({ url: TEST_URL, prefix: start, migrations })),
    );
    try {
      assert.equal(tests.filter((t) => t.templateBuilt).length, 1);
      assert.ok(tests.every((t) => t.fromTemplate));
      for (const test of tests) assert.equal(await test.db.tableExists("notes"), true);
    } finally {
      for (const test of tests) await test.drop();
    }
    assert.equal((await databasesLike(`${start}_`)).length, 1, "only the template is left");
  } finally {
    await dropAll(start);
  }
});

serverTest(
  "createTestDatabase({ template: false }) migrates a new database each time",
  async () => {
    const start = prefix();
    try {
      await using test = await createTestDatabase({
        url: TEST_URL,
        prefix: start,
        template: false,
        migrations: { moduleName: "notes", migrations: NOTES },
      });
      assert.equal(test.fromTemplate, false);
      assert.equal(await test.db.tableExists("notes"), true);
      assert.deepEqual(await databasesLike(`${start}_tpl_`), []);
    } finally {
      await dropAll(start);
    }
  },
);

serverTest("createTestDatabase() with a failing migration leaves no database behind", async () => {
  const start = prefix();
  try {
    const error = await createTestDatabase({
      url: TEST_URL,
      prefix: start,
      migrations: {
        moduleName: "broken",
        migrations: { "001_ok.sql": "CREATE TABLE {{tables.a}} (id int);", "002_bad.sql": "NOPE;" },
      },
    }).then(() => undefined, (e) => e);
    assert.ok(error instanceof MigrationError);
    assert.equal(error.filename, "002_bad.sql");
    assert.deepEqual(await databasesLike(`${start}_`), []);
  } finally {
    await dropAll(start);
  }
});

serverTest("createTestDatabase() refuses bad options with a clear error", async () => {
  await assert.rejects(createTestDatabase({ url: TEST_URL, prefix: "Bad-Prefix" }), {
    name: "ConfigurationError",
    message: /prefix: use 1 to 20 lowercase/,
  });
  await assert.rejects(
    createTestDatabase({ url: TEST_URL, embedded: true }),
    ConfigurationError,
  );
  await assert.rejects(
    createTestDatabase({ url: TEST_URL, migrations: { moduleName: "x" } }),
    ConfigurationError,
  );
});

serverTest("withTestDatabase() drops the database when the body throws", async () => {
  const start = prefix();
  try {
    let name = "";
    await assert.rejects(
      withTestDatabase(async (db, test) => {
        name = test.name;
        await db.execute("CREATE TABLE t (id int)");
        throw new Error("test body failed");
      }, { url: TEST_URL, prefix: start }),
      { message: "test body failed" },
    );
    assert.ok(name.startsWith(start));
    assert.deepEqual(await databasesLike(name), []);
    const value = await withTestDatabase(
      (db) => db.fetchValue<number>("SELECT 41 + 1"),
      { url: TEST_URL, prefix: start },
    );
    assert.equal(value, 42);
    assert.deepEqual(await databasesLike(`${start}_`), []);
  } finally {
    await dropAll(start);
  }
});

serverTest(
  "withTestSchema() migrates a throwaway schema and drops it when the body throws",
  async () => {
    let seen = "";
    await assert.rejects(
      withTestSchema(async (db, { schema, embedded }) => {
        seen = schema;
        assert.equal(embedded, false);
        assert.equal(await schemaExists(schema), true);
        assert.equal(await db.tableExists("tags"), true);
        throw new Error("schema body failed");
      }, { url: TEST_URL, migrations: { moduleName: "notes", migrations: NOTES } }),
      { message: "schema body failed" },
    );
    assert.ok(seen.startsWith("pgdbm_test_"));
    assert.equal(await schemaExists(seen), false);
  },
);

serverTest("withTestSchema() leaves a pool it was given open", async () => {
  const test = await createTestDatabase({ url: TEST_URL });
  try {
    const pool = test.db.pool;
    const schema = await withTestSchema(async (db, context) => {
      assert.equal(context.pool, pool);
      await db.execute("CREATE TABLE {{tables.x}} (id int)");
      return context.schema;
    }, { pool });
    assert.equal(pool.closed, false);
    assert.equal(
      await test.db.fetchValue("SELECT count(*)::int FROM pg_namespace WHERE nspname = $1", [
        schema,
      ]),
      0,
    );
    await assert.rejects(
      withTestSchema(() => Promise.resolve(), {
        pool,
        migrations: { moduleName: "notes", migrations: NOTES, schema: "notes" },
      }),
      { name: "ConfigurationError", message: /names schema 'notes'/ },
    );
  } finally {
    await test.drop();
  }
});

targetTest("loadFixtures() loads rows in foreign-key order, in one transaction", async (t) => {
  await withTestSchema(async (db) => {
    await db.execute(`
      CREATE TABLE {{tables.users}} (id serial PRIMARY KEY, name text NOT NULL);
      CREATE TABLE {{tables.notes}} (id serial PRIMARY KEY,
        user_id int NOT NULL REFERENCES {{tables.users}} (id), body text NOT NULL,
        created timestamptz NOT NULL DEFAULT now());
      CREATE TABLE {{tables.tags}} (note_id int NOT NULL REFERENCES {{tables.notes}} (id),
        tag text NOT NULL, meta jsonb);`);

    await t.step("children listed before parents still load", async () => {
      const counts = await loadFixtures(db, {
        tags: [{ note_id: 10, tag: "a", meta: { x: 1 } }, { note_id: 11, tag: "b" }],
        notes: [{ id: 10, user_id: 1, body: "one" }, { id: 11, user_id: 2, body: "two" }],
        users: [{ id: 1, name: "Ann" }, { id: 2, name: "Bob" }],
      });
      assert.deepEqual(Object.keys(counts), ["users", "notes", "tags"]);
      assert.deepEqual(counts, { users: 2, notes: 2, tags: 2 });
      const tag = await db.fetchOne("SELECT * FROM {{tables.tags}} WHERE tag = 'a'");
      assert.deepEqual(tag, { note_id: 10, tag: "a", meta: { x: 1 } });
      const missing = await db.fetchValue("SELECT meta FROM {{tables.tags}} WHERE tag = 'b'");
      assert.equal(missing, null);
      assert.ok(
        await db.fetchValue("SELECT created FROM {{tables.notes}} LIMIT 1") instanceof Date,
      );
    });

    await t.step("sequences continue after the loaded ids", async () => {
      const id = await db.executeAndReturnId(
        "INSERT INTO {{tables.users}} (name) VALUES ('Cy')",
      );
      assert.equal(id, 3);
    });

    await t.step("an unknown column is refused and nothing is loaded", async () => {
      const before = await countRows(db, "users");
      await assert.rejects(
        loadFixtures(db, {
          users: [{ id: 50, name: "Dee" }],
          notes: [{ id: 50, user_id: 50, bdy: "typo" }],
        }),
        (error: unknown) =>
          error instanceof SchemaError &&
          /column 'bdy'.*it has id, user_id, body/.test(error.message),
      );
      assert.equal(await countRows(db, "users"), before);
    });

    await t.step("an unknown table is refused", async () => {
      await assert.rejects(
        loadFixtures(db, { users: [{ id: 60, name: "Eve" }], nope: [{ a: 1 }] }),
        { name: "SchemaError", message: /'nope': no such table in schema/ },
      );
      await assert.rejects(loadFixtures(db, { "users; DROP": [] }), SchemaError);
      assert.equal(await countRows(db, "users", "id = $1", [60]), 0);
    });

    await t.step("a row the server rejects rolls back every table", async () => {
      const before = await countRows(db, "users");
      await assert.rejects(
        loadFixtures(db, {
          users: [{ id: 70, name: "Fay" }],
          notes: [{ id: 70, user_id: 999, body: "orphan" }],
        }),
        QueryError,
      );
      assert.equal(await countRows(db, "users"), before);
    });
  }, TEST_TARGET);
});

targetTest("snapshotTable() and assertTableUnchanged() show what changed", async () => {
  await withTestSchema(async (db) => {
    await db.execute(
      "CREATE TABLE {{tables.items}} (id int PRIMARY KEY, name text, data bytea)",
    );
    await loadFixtures(db, {
      items: [
        { id: 2, name: "b", data: new Uint8Array([1, 2]) },
        { id: 1, name: "a" },
        { id: 3, name: "c" },
      ],
    });
    const snapshot = await snapshotTable(db, "items");
    assert.deepEqual(snapshot.rows.map((r) => r.id), [1, 2, 3]);
    assert.deepEqual(snapshot.key, ["id"]);
    await assertTableUnchanged(db, "items", snapshot);

    await db.execute("UPDATE {{tables.items}} SET name = 'bb' WHERE id = 2");
    await db.execute("DELETE FROM {{tables.items}} WHERE id = 3");
    await db.execute("INSERT INTO {{tables.items}} (id, name) VALUES (4, 'd')");
    const error = await assertTableUnchanged(db, "items", snapshot).then(() => undefined, (e) => e);
    assert.ok(error instanceof AssertionError);
    assert.match(error.message, /1 row\(s\) added, 1 removed, 1 changed/);
    assert.match(error.message, /\+ \{ id: 4, name: "d"/);
    assert.match(error.message, /- \{ id: 3, name: "c"/);
    assert.match(error.message, /~ \{ id: 2, name: "b".*\n {2}→ \{ id: 2, name: "bb"/);

    const byName = await snapshotTable(db, "items", { orderBy: "name" });
    assert.deepEqual(byName.rows.map((r) => r.name), ["a", "bb", "d"]);
    await assert.rejects(snapshotTable(db, "items", { orderBy: "nope" }), SchemaError);
    await assert.rejects(snapshotTable(db, "missing"), SchemaError);
    await assert.rejects(snapshotTable(db, "items x"), SchemaError);
  }, TEST_TARGET);
});

targetTest("countRows() filters with parameters and truncateTable() empties tables", async () => {
  await withTestSchema(async (db, { schema }) => {
    await db.execute(`
      CREATE TABLE {{tables.parents}} (id serial PRIMARY KEY);
      CREATE TABLE {{tables.kids}} (parent_id int REFERENCES {{tables.parents}} (id));`);
    await loadFixtures(db, {
      parents: [{ id: 1 }, { id: 2 }],
      kids: [{ parent_id: 1 }, { parent_id: 1 }, { parent_id: 2 }],
    });
    assert.equal(await countRows(db, "kids"), 3);
    assert.equal(await countRows(db, "kids", "parent_id = $1", [1]), 2);
    assert.equal(await countRows(db.withSchema("public"), `${schema}.kids`), 3);
    await assert.rejects(truncateTable(db, "parents"), QueryError);
    await truncateTable(db, "parents", { cascade: true });
    assert.equal(await countRows(db, "kids"), 0);
    const id = await db.executeAndReturnId("INSERT INTO {{tables.parents}} DEFAULT VALUES");
    assert.equal(id, 1, "identity restarts");
  }, TEST_TARGET);
});

serverTest("cleanupTestDatabases() drops only old marked databases", async () => {
  const start = prefix();
  const decoy = `${start}_decoy`;
  const old = `${start}_old`;
  const oldTemplate = `${start}_tpl_old`;
  try {
    await observe(async (sql) => {
      await sql.unsafe(`CREATE DATABASE "${decoy}"`);
      await sql.unsafe(`CREATE DATABASE "${old}"`);
      await sql.unsafe(`CREATE DATABASE "${oldTemplate}"`);
      await sql.unsafe(
        `COMMENT ON DATABASE "${old}" IS 'pgdbm-testing database created=2020-01-01T00:00:00.000Z'`,
      );
      await sql.unsafe(
        `COMMENT ON DATABASE "${oldTemplate}" IS ` +
          `'pgdbm-testing template created=2020-01-01T00:00:00.000Z'`,
      );
    });
    await using young = await createTestDatabase({ url: TEST_URL, prefix: start });

    const dry = await cleanupTestDatabases({
      url: TEST_URL,
      prefix: start,
      olderThanMs: 60_000,
      dryRun: true,
    });
    assert.deepEqual(dry.dropped, [old]);
    assert.equal((await databasesLike(old)).length, 1);

    const result = await cleanupTestDatabases({
      url: TEST_URL,
      prefix: start,
      olderThanMs: 60_000,
    });
    assert.deepEqual(result.dropped, [old]);
    assert.deepEqual(result.kept.sort(), [young.name, oldTemplate].sort());
    const left = (await databasesLike(`${start}_`)).map((d) => d.name);
    assert.deepEqual(left.sort(), [decoy, young.name, oldTemplate].sort());

    const templates = await cleanupTestDatabases({
      url: TEST_URL,
      prefix: start,
      olderThanMs: 60_000,
      templates: true,
    });
    assert.deepEqual(templates.dropped, [oldTemplate]);
    assert.equal((await databasesLike(decoy)).length, 1, "the unmarked decoy is untouched");
    await assert.rejects(cleanupTestDatabases({ url: TEST_URL, olderThanMs: -1 }), RangeError);
  } finally {
    await observe((sql) => sql.unsafe(`DROP DATABASE IF EXISTS "${decoy}"`));
    await dropAll(start);
  }
});
