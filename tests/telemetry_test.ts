/**
 * OpenTelemetry: with a tracer provider registered through `@opentelemetry/api`, every
 * statement is a client span with PostgreSQL's attributes, inside the caller's span, with
 * no parameter values; without one, nothing is recorded.
 */
import assert from "node:assert/strict";
import { context, trace } from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from "@opentelemetry/sdk-trace-base";
import { Migrator } from "../mod.ts";
import { activeTracer, operationName } from "../src/_telemetry.ts";
import { serverTest, TEST_URL, withManager } from "./_support/server.ts";

const SECRET = "s3cret-never-in-a-span";

/** Registers an in-memory tracer for the length of `fn`. */
async function withTracing(fn: (spans: () => ReadableSpan[]) => Promise<void>): Promise<void> {
  const exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  const contextManager = new AsyncLocalStorageContextManager().enable();
  context.setGlobalContextManager(contextManager);
  trace.setGlobalTracerProvider(provider);
  try {
    await fn(() => exporter.getFinishedSpans());
  } finally {
    trace.disable();
    context.disable();
    await provider.shutdown();
  }
}

Deno.test("operationName() reads the first keyword past comments", () => {
  assert.equal(operationName("select 1"), "SELECT");
  assert.equal(operationName("  -- note\n/* x */ INSERT INTO t VALUES (1)"), "INSERT");
  assert.equal(operationName("(SELECT 1)"), "QUERY");
  assert.equal(operationName(""), "QUERY");
});

serverTest("queries are OpenTelemetry client spans inside the caller's span", async () => {
  await withTracing(async (spans) => {
    const tracer = trace.getTracer("app");
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.users}} (id int PRIMARY KEY, password text)");
      await tracer.startActiveSpan("request", async (request) => {
        await db.execute("INSERT INTO {{tables.users}} VALUES ($1, $2)", [1, SECRET]);
        await db.transaction((tx) =>
          tx.fetchOne("SELECT * FROM {{tables.users}} WHERE password = $1", [SECRET])
        );
        await assert.rejects(db.fetchAll("SELECT * FROM {{tables.missing}}"));
        await db.executeMany("INSERT INTO {{tables.users}} VALUES ($1, 'x')", [[2], [3]]);
        await db.copyRecordsToTable("users", [[4, "y"]]);
        request.end();
      });
      const schema = db.schema!;
      const database = new URL(TEST_URL).pathname.slice(1);
      const all = spans();
      const request = all.find((span) => span.name === "request")!;
      const queries = all.filter((span) => span.instrumentationScope.name === "@pgdbm/pgdbm");
      assert.deepEqual(queries.map((span) => span.name), [
        `CREATE ${database}.${schema}`, // withManager's ensureSchema()
        `CREATE ${database}.${schema}`,
        `INSERT ${database}.${schema}`,
        `SELECT ${database}.${schema}`,
        `SELECT ${database}.${schema}`,
        `INSERT ${database}.${schema}`,
        `COPY ${database}.${schema}`,
      ]);
      for (const span of queries.slice(2)) {
        assert.equal(span.parentSpanContext?.spanId, request.spanContext().spanId, span.name);
        assert.equal(span.spanContext().traceId, request.spanContext().traceId);
      }
      const select = queries[3];
      assert.equal(select.kind, 2, "CLIENT");
      assert.equal(select.attributes["db.system.name"], "postgresql");
      assert.equal(select.attributes["db.namespace"], `${database}.${schema}`);
      assert.equal(select.attributes["db.operation.name"], "SELECT");
      assert.equal(
        select.attributes["db.query.text"],
        `SELECT * FROM "${schema}".users WHERE password = $1`,
      );
      assert.equal(select.attributes["db.response.returned_rows"], 1);
      assert.equal(select.attributes["server.port"], Number(new URL(TEST_URL).port || 5432));
      const failed = queries[4];
      assert.equal(failed.status.code, 2, "ERROR");
      assert.equal(failed.attributes["db.response.status_code"], "42P01");
      assert.equal(failed.attributes["error.type"], "42P01");
      assert.ok(failed.events.some((event) => event.name === "exception"));
      assert.equal(queries[5].attributes["db.response.returned_rows"], 2, "executeMany total");
      assert.equal(queries[6].attributes["db.response.returned_rows"], 1, "COPY rows");
      assert.ok(!JSON.stringify(all.map((s) => [s.attributes, s.events])).includes(SECRET));
    });
  });
});

serverTest("Migrator.applyPending() is a span with each migration as an event", async () => {
  await withTracing(async (spans) => {
    await withManager(async (db) => {
      const migrator = new Migrator(db, {
        moduleName: "shop",
        migrations: {
          "001_items.sql": "CREATE TABLE {{tables.items}} (id int)",
          "002_more.sql": "ALTER TABLE {{tables.items}} ADD COLUMN name text",
        },
      });
      const result = await migrator.applyPending();
      assert.equal(result.applied.length, 2);
      const run = spans().find((span) => span.name === "migrate shop")!;
      assert.ok(run, `no migration span among ${spans().map((s) => s.name)}`);
      assert.equal(run.attributes["pgdbm.migration.status"], "success");
      assert.equal(run.attributes["pgdbm.migration.applied"], 2);
      const applied = run.events.filter((e) => e.name === "pgdbm.migration.applied");
      assert.deepEqual(applied.map((e) => e.attributes?.["pgdbm.filename"]), [
        "001_items.sql",
        "002_more.sql",
      ]);
      const statements = spans().filter((s) =>
        s.parentSpanContext?.spanId === run.spanContext().spanId
      );
      assert.ok(statements.length > 0, "the migration's statements are spans inside the run");
    });
  });
});

serverTest("a stream and a COPY out are spans too, without parameter values", async () => {
  await withTracing(async (spans) => {
    await withManager(async (db) => {
      await db.execute("CREATE TABLE {{tables.users}} (id int, password text)");
      await db.execute("INSERT INTO {{tables.users}} VALUES (1, $1), (2, $1)", [SECRET]);
      for await (
        const _ of db.stream("SELECT * FROM {{tables.users}} WHERE password = $1", [SECRET])
      ) {
        /* rows */
      }
      for await (
        const _ of db.copyFromQuery("SELECT * FROM {{tables.users}} WHERE password = $1", [SECRET])
      ) { /* chunks */ }
      const database = new URL(TEST_URL).pathname.slice(1);
      const names = spans().map((span) => span.name).slice(3);
      const at = `${database}.${db.schema}`;
      assert.deepEqual(names, [`SELECT ${at}`, `COPY ${at}`]);
      assert.equal(spans().at(-2)!.attributes["db.response.returned_rows"], 2);
      const copy = spans().at(-1)!;
      assert.equal(copy.attributes["db.response.returned_rows"], 2);
      assert.ok(!JSON.stringify(spans().map((s) => s.attributes)).includes(SECRET));
    });
  });
});

serverTest("once the tracer provider is unregistered, queries make no span", async () => {
  const exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  try {
    await withManager(async (db) => {
      trace.setGlobalTracerProvider(provider);
      assert.equal(await db.fetchValue("SELECT 1"), 1);
      assert.equal(exporter.getFinishedSpans().length, 1, "a span while registered");
      trace.disable();
      assert.equal(activeTracer(), undefined);
      assert.equal(await db.fetchValue("SELECT 2"), 2);
      assert.equal(exporter.getFinishedSpans().length, 1, "no span after trace.disable()");
    });
  } finally {
    trace.disable();
    await provider.shutdown();
  }
});
