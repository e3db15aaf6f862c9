import assert from "node:assert/strict";
import { SchemaError } from "../src/errors.ts";
import { assertIdentifier, expandTemplate, quoteIdentifier } from "../src/template.ts";

/** pgdbm's own expansion, step by step, as the reference the library must match byte for byte. */
function pgdbmExpand(sql: string, schema: string | undefined): string {
  const twoPart = /\{\{tables\.(\w+)\.(\w+)\}\}/g;
  const onePart = /\{\{tables\.(\w+)\}\}/g;
  if (schema === undefined) {
    return sql
      .replaceAll("{{schema}}.", "")
      .replaceAll("{{schema}}", "public")
      .replace(twoPart, '"$1".$2')
      .replace(onePart, "$1");
  }
  return sql
    .replaceAll("{{schema}}", `"${schema}"`)
    .replace(twoPart, '"$1".$2')
    .replace(onePart, `"${schema}".$1`);
}

const MIGRATION = `-- 001_create_users.sql
CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE TABLE IF NOT EXISTS {{tables.users}} (
    id SERIAL PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE {{schema}}.sessions (
    id BIGSERIAL PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES {{tables.users}}(id) ON DELETE CASCADE,
    token TEXT NOT NULL
);

CREATE INDEX idx_sessions_user ON {{tables.sessions}} (user_id);
CREATE INDEX idx_users_email ON {{schema}}.{{tables.users}} (lower(email));

CREATE OR REPLACE FUNCTION {{schema}}.touch() RETURNS trigger AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

INSERT INTO {{tables.audit.events}} (kind, payload)
VALUES ('migrated', '{"tags": {"a": [1, 2]}, "note": "{{ not a placeholder }}"}');

SELECT {{tables.users}}.id FROM {{tables.users}};
SET search_path TO {{schema}};
COMMENT ON TABLE {{tables.users}} IS 'Users of {{schema}}';
`;

const MIGRATION_APP = `-- 001_create_users.sql
CREATE SCHEMA IF NOT EXISTS "app";

CREATE TABLE IF NOT EXISTS "app".users (
    id SERIAL PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE "app".sessions (
    id BIGSERIAL PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES "app".users(id) ON DELETE CASCADE,
    token TEXT NOT NULL
);

CREATE INDEX idx_sessions_user ON "app".sessions (user_id);
CREATE INDEX idx_users_email ON "app"."app".users (lower(email));

CREATE OR REPLACE FUNCTION "app".touch() RETURNS trigger AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

INSERT INTO "audit".events (kind, payload)
VALUES ('migrated', '{"tags": {"a": [1, 2]}, "note": "{{ not a placeholder }}"}');

SELECT "app".users.id FROM "app".users;
SET search_path TO "app";
COMMENT ON TABLE "app".users IS 'Users of "app"';
`;

const MIGRATION_NO_SCHEMA = `-- 001_create_users.sql
CREATE SCHEMA IF NOT EXISTS public;

CREATE TABLE IF NOT EXISTS users (
    id SERIAL PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id BIGSERIAL PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token TEXT NOT NULL
);

CREATE INDEX idx_sessions_user ON sessions (user_id);
CREATE INDEX idx_users_email ON users (lower(email));

CREATE OR REPLACE FUNCTION touch() RETURNS trigger AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

INSERT INTO "audit".events (kind, payload)
VALUES ('migrated', '{"tags": {"a": [1, 2]}, "note": "{{ not a placeholder }}"}');

SELECT users.id FROM users;
SET search_path TO public;
COMMENT ON TABLE users IS 'Users of public';
`;

const NAME_63 = "t" + "x".repeat(62);
const NAME_64 = "t" + "x".repeat(63);

/** Names that must never reach SQL: each is refused as a table name and as a schema. */
const HOSTILE_NAMES: ReadonlyArray<readonly [string, string]> = [
  ["a double quote", 'app"; DROP TABLE users; --'],
  ["a lone double quote", '"'],
  ["a single quote", "app'"],
  ["a semicolon", "app;"],
  ["a space", "my app"],
  ["a tab", "my\tapp"],
  ["a newline", "app\n"],
  ["a hyphen", "my-app"],
  ["a Cyrillic look-alike", "\u0430pp"],
  ["fullwidth letters", "\uff41\uff50\uff50"],
  ["an accented letter", "caf\u00e9"],
  ["a leading digit", "1app"],
  ["64 characters", NAME_64],
  ["a parenthesis", "users()"],
  ["a dollar sign", "app$1"],
  ["a NUL character", "app\u0000"],
];

Deno.test("expandTemplate() expands {{tables.users}} to the quoted schema and the table", () => {
  assert.equal(
    expandTemplate("SELECT * FROM {{tables.users}}", "app"),
    'SELECT * FROM "app".users',
  );
});

Deno.test("expandTemplate() expands {{tables.users}} to the bare table with no schema", () => {
  assert.equal(expandTemplate("SELECT * FROM {{tables.users}}"), "SELECT * FROM users");
});

Deno.test("expandTemplate() keeps a dot after {{tables.users}}", () => {
  assert.equal(expandTemplate("SELECT {{tables.users}}.id", "app"), 'SELECT "app".users.id');
  assert.equal(expandTemplate("SELECT {{tables.users}}.id"), "SELECT users.id");
});

Deno.test("expandTemplate() expands {{tables.other.users}} to that schema in both modes", () => {
  const sql = "SELECT * FROM {{tables.other.users}} JOIN {{tables.orders}} USING (id)";
  assert.equal(
    expandTemplate(sql, "app"),
    'SELECT * FROM "other".users JOIN "app".orders USING (id)',
  );
  assert.equal(expandTemplate(sql), 'SELECT * FROM "other".users JOIN orders USING (id)');
});

Deno.test("expandTemplate() expands {{schema}} to the quoted schema", () => {
  assert.equal(expandTemplate("CREATE SCHEMA {{schema}}", "app"), 'CREATE SCHEMA "app"');
  assert.equal(
    expandTemplate("CREATE TABLE {{schema}}.t (id int)", "app"),
    'CREATE TABLE "app".t (id int)',
  );
});

Deno.test("expandTemplate() expands {{schema}} to public and drops '{{schema}}.' with no schema", () => {
  assert.equal(expandTemplate("SET search_path TO {{schema}}"), "SET search_path TO public");
  assert.equal(expandTemplate("CREATE TABLE {{schema}}.t (id int)"), "CREATE TABLE t (id int)");
  assert.equal(
    expandTemplate("SELECT '{{schema}}' AS s FROM {{schema}}.t"),
    "SELECT 'public' AS s FROM t",
  );
});

Deno.test("expandTemplate() treats null and undefined as no schema", () => {
  const sql = "SELECT * FROM {{schema}}.a, {{tables.b}} WHERE s = '{{schema}}'";
  const expected = "SELECT * FROM a, b WHERE s = 'public'";
  assert.equal(expandTemplate(sql), expected);
  assert.equal(expandTemplate(sql, undefined), expected);
  assert.equal(expandTemplate(sql, null), expected);
});

Deno.test("expandTemplate() refuses an empty schema with SchemaError", () => {
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.users}}", ""), SchemaError);
  assert.throws(() => expandTemplate("SELECT 1", ""), SchemaError);
});

Deno.test("expandTemplate() expands a migration byte for byte as pgdbm does, with a schema", () => {
  const expanded = expandTemplate(MIGRATION, "app");
  assert.equal(expanded, MIGRATION_APP);
  assert.equal(expanded, pgdbmExpand(MIGRATION, "app"));
});

Deno.test("expandTemplate() expands a migration byte for byte as pgdbm does, with no schema", () => {
  const expanded = expandTemplate(MIGRATION);
  assert.equal(expanded, MIGRATION_NO_SCHEMA);
  assert.equal(expanded, pgdbmExpand(MIGRATION, undefined));
});

Deno.test("expandTemplate() keeps CRLF line endings and other bytes as they are", () => {
  const crlf = MIGRATION.replaceAll("\n", "\r\n");
  assert.equal(expandTemplate(crlf, "app"), MIGRATION_APP.replaceAll("\n", "\r\n"));
  assert.equal(expandTemplate(crlf), MIGRATION_NO_SCHEMA.replaceAll("\n", "\r\n"));
});

for (const [label, name] of HOSTILE_NAMES) {
  Deno.test(`expandTemplate() refuses a table name with ${label}`, () => {
    for (const schema of ["app", undefined]) {
      assert.throws(() => expandTemplate(`SELECT * FROM {{tables.${name}}}`, schema), SchemaError);
      assert.throws(
        () => expandTemplate(`SELECT * FROM {{tables.other.${name}}}`, schema),
        SchemaError,
      );
      assert.throws(
        () => expandTemplate(`SELECT * FROM {{tables.${name}.users}}`, schema),
        SchemaError,
      );
    }
  });

  Deno.test(`expandTemplate() refuses a schema with ${label}`, () => {
    assert.throws(() => expandTemplate("SELECT * FROM {{tables.users}}", name), SchemaError);
    assert.throws(() => expandTemplate("SELECT 1", name), SchemaError);
  });
}

Deno.test("expandTemplate() refuses a schema with a dot", () => {
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.users}}", "app.x"), SchemaError);
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.users}}", "."), SchemaError);
});

Deno.test("expandTemplate() refuses an invalid schema even when the text is cached for no schema", () => {
  const sql = "SELECT * FROM {{tables.cached_users}}";
  assert.equal(expandTemplate(sql), "SELECT * FROM cached_users");
  assert.throws(() => expandTemplate(sql, "\u0000"), SchemaError);
});

Deno.test("expandTemplate() accepts identifiers of 63 characters", () => {
  assert.equal(
    expandTemplate(`SELECT * FROM {{tables.${NAME_63}}}`, NAME_63),
    `SELECT * FROM "${NAME_63}".${NAME_63}`,
  );
  assert.equal(
    expandTemplate(`SELECT * FROM {{tables.${NAME_63}.${NAME_63}}}`),
    `SELECT * FROM "${NAME_63}".${NAME_63}`,
  );
});

Deno.test("expandTemplate() accepts underscores, digits after the first character and mixed case", () => {
  assert.equal(
    expandTemplate("SELECT * FROM {{tables._Users_2}}", "Tenant_42"),
    'SELECT * FROM "Tenant_42"._Users_2',
  );
});

Deno.test("expandTemplate() refuses an empty {{tables.}}", () => {
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.}}", "app"), SchemaError);
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.}}"), SchemaError);
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.other.}}"), SchemaError);
  assert.throws(() => expandTemplate("SELECT * FROM {{tables..users}}"), SchemaError);
});

Deno.test("expandTemplate() refuses a three-part {{tables.a.b.c}}", () => {
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.a.b.c}}", "app"), SchemaError);
  assert.throws(() => expandTemplate("SELECT * FROM {{tables.a.b.c}}"), SchemaError);
});

Deno.test("expandTemplate() reports a bad name with SchemaError code SCHEMA_ERROR and the name", () => {
  assert.throws(
    () => expandTemplate("SELECT * FROM {{tables.us;ers}}", "app"),
    (error: unknown) => {
      assert.ok(error instanceof SchemaError);
      assert.equal(error.code, "SCHEMA_ERROR");
      assert.match(error.message, /"us;ers"/);
      return true;
    },
  );
});

Deno.test("expandTemplate() returns SQL without placeholders unchanged", () => {
  const sql = "SELECT id, email FROM users WHERE id = $1 AND note = 'a {b} c'";
  assert.equal(expandTemplate(sql, "app"), sql);
  assert.equal(expandTemplate(sql), sql);
  assert.equal(expandTemplate("", "app"), "");
});

Deno.test("expandTemplate() leaves '{{' that is not a placeholder untouched", () => {
  const literals = "SELECT '{{1,2},{3,4}}'::int[][], '{{not_a_placeholder}}', '{{ schema }}', " +
    "'{{SCHEMA}}', '{{tables}}', '{{tables users}}', '{{schema}' , '{{'";
  assert.equal(expandTemplate(literals, "app"), literals);
  assert.equal(expandTemplate(literals), literals);
  assert.equal(
    expandTemplate(`${literals} FROM {{tables.users}}`, "app"),
    `${literals} FROM "app".users`,
  );
  assert.equal(expandTemplate(`${literals} FROM {{tables.users}}`), `${literals} FROM users`);
});

Deno.test("expandTemplate() returns the identical string for the same schema and text", () => {
  const sql = "SELECT id FROM {{tables.cache_same}} WHERE id = $1";
  const first = expandTemplate(sql, "app");
  const second = expandTemplate(sql, "app");
  assert.ok(Object.is(first, second));
  assert.equal(second, 'SELECT id FROM "app".cache_same WHERE id = $1');
});

Deno.test("expandTemplate() keeps the cache of each schema apart", () => {
  const sql = "SELECT * FROM {{tables.bleed}} WHERE s = '{{schema}}'";
  for (let round = 0; round < 3; round++) {
    assert.equal(
      expandTemplate(sql, "tenant_a"),
      `SELECT * FROM "tenant_a".bleed WHERE s = '"tenant_a"'`,
    );
    assert.equal(
      expandTemplate(sql, "tenant_b"),
      `SELECT * FROM "tenant_b".bleed WHERE s = '"tenant_b"'`,
    );
    assert.equal(expandTemplate(sql), "SELECT * FROM bleed WHERE s = 'public'");
    assert.equal(expandTemplate(sql, null), "SELECT * FROM bleed WHERE s = 'public'");
    assert.equal(
      expandTemplate(sql, "Tenant_A"),
      `SELECT * FROM "Tenant_A".bleed WHERE s = '"Tenant_A"'`,
    );
  }
});

Deno.test("expandTemplate() still expands correctly after its cache evicts", () => {
  for (let i = 0; i < 2500; i++) {
    assert.equal(
      expandTemplate(`SELECT ${i} FROM {{tables.evict}}`, "evict_s"),
      `SELECT ${i} FROM "evict_s".evict`,
    );
  }
  assert.equal(
    expandTemplate("SELECT 0 FROM {{tables.evict}}", "evict_s"),
    'SELECT 0 FROM "evict_s".evict',
  );
  assert.equal(
    expandTemplate("SELECT 2499 FROM {{tables.evict}}", "evict_s"),
    'SELECT 2499 FROM "evict_s".evict',
  );
});

Deno.test("expandTemplate() throws TypeError when sql is not a string", () => {
  expandTemplate("SELECT 1", "app");
  expandTemplate("SELECT 1");
  for (const sql of [42, null, undefined, {}, ["SELECT 1"], new String("SELECT 1")]) {
    assert.throws(() => expandTemplate(sql as unknown as string, "app"), TypeError);
    assert.throws(() => expandTemplate(sql as unknown as string), TypeError);
  }
});

Deno.test("assertIdentifier() accepts plain identifiers", () => {
  for (const name of ["a", "_", "users", "Users", "user_2", "_private", NAME_63]) {
    assertIdentifier(name, "table");
  }
});

Deno.test("assertIdentifier() throws SchemaError naming the value and what it names", () => {
  assert.throws(() => assertIdentifier("bad name", "schema"), (error: unknown) => {
    assert.ok(error instanceof SchemaError);
    assert.match(error.message, /"bad name"/);
    assert.match(error.message, /schema name/);
    return true;
  });
  for (const [, name] of HOSTILE_NAMES) {
    assert.throws(() => assertIdentifier(name, "table"), SchemaError);
  }
  for (const name of ["", "a.b", 42, undefined, null, {}, Symbol("x")]) {
    assert.throws(() => assertIdentifier(name, "table"), SchemaError);
  }
});

Deno.test("quoteIdentifier() double-quotes a valid identifier and keeps its case", () => {
  assert.equal(quoteIdentifier("users"), '"users"');
  assert.equal(quoteIdentifier("Tenant_42"), '"Tenant_42"');
  assert.equal(quoteIdentifier(NAME_63), `"${NAME_63}"`);
});

Deno.test("quoteIdentifier() refuses what is not an identifier with SchemaError", () => {
  for (const [, name] of HOSTILE_NAMES) {
    assert.throws(() => quoteIdentifier(name), SchemaError);
  }
  assert.throws(() => quoteIdentifier(""), SchemaError);
  assert.throws(() => quoteIdentifier("a.b"), SchemaError);
});
