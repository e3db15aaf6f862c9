/**
 * `listen()` / `notify()`: one listening session per pool, re-listening after a lost
 * session, on the server and on the embedded engine (PGlite).
 */
import assert from "node:assert/strict";
import { trace } from "@opentelemetry/api";
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
} from "@opentelemetry/sdk-trace-base";
import {
  createSharedPool,
  type DatabaseConfig,
  DatabaseManager,
  type Pool,
  PoolError,
  type QueryEvent,
} from "../mod.ts";
import { observe, serverTest, TEST_URL, uniqueName, withManager } from "./_support/server.ts";
import { settlesWithin } from "./_support/settle.ts";
import { faultClusterUnavailable, startFaultCluster } from "./_support/fault_cluster.ts";
import {
  IGNORED_STARTUP_PARAMETERS,
  pgbouncerSkipReason,
  startPgBouncer,
} from "./_support/pgbouncer.ts";

const WAIT_MS = 10_000;

/** Payloads as a handler received them, and a way to wait for the n-th. */
class Inbox {
  readonly payloads: string[] = [];
  #waiters: Array<() => void> = [];

  readonly handler = (payload: string): void => {
    this.payloads.push(payload);
    for (const wake of this.#waiters.splice(0)) wake();
  };

  /** Waits until `n` payloads have arrived (a hang detector bounds it). */
  async count(n: number, what = `${n} notification(s)`): Promise<string[]> {
    const reached = (async () => {
      while (this.payloads.length < n) {
        await new Promise<void>((resolve) => this.#waiters.push(resolve));
      }
    })();
    await settlesWithin(reached, WAIT_MS, what);
    return this.payloads;
  }
}

/** Logger that keeps its warnings. */
function recordingLogger(): { warnings: string[]; warn(message: string): void } {
  const warnings: string[] = [];
  return { warnings, warn: (message: string) => warnings.push(message) };
}

const AWKWARD = [
  "",
  'it\'s a "quoted" value; DROP TABLE x; --',
  "line one\nline two\ttab\\backslash",
  "ünïcödé ✓ 🐘 日本語",
  "$1 {{tables.x}} %s ${x}",
  JSON.stringify({ id: 42, note: "a'b\"c" }),
];

/** The checks that run the same on the server and on PGlite. */
async function deliversPayloads(db: DatabaseManager): Promise<void> {
  const channel = `Awkward "chan" é ${crypto.randomUUID().slice(0, 8)}`;
  const inbox = new Inbox();
  const sub = await db.listen(channel, inbox.handler);
  try {
    assert.equal(sub.channel, channel);
    for (const payload of AWKWARD) await db.notify(channel, payload);
    assert.deepEqual(await inbox.count(AWKWARD.length), AWKWARD);
  } finally {
    await sub.unlisten();
  }
}

async function deliversOnCommitOnly(db: DatabaseManager, oneSession = false): Promise<void> {
  const channel = uniqueName("tx");
  const probe = uniqueName("probe");
  const inbox = new Inbox();
  const probes = new Inbox();
  const sub = await db.listen(channel, inbox.handler);
  const probeSub = await db.listen(probe, probes.handler);
  try {
    await assert.rejects(
      db.transaction(async (tx) => {
        await tx.notify(channel, "rolled back");
        throw new Error("roll back");
      }),
      /roll back/,
    );
    await db.transaction(async (tx) => {
      await tx.notify(channel, "committed");
      // A notification sent after it arrives first: the transaction's waits for its commit.
      // (With one session, as on PGlite, it is sent inside the transaction, once more.)
      await (oneSession ? tx : db).notify(probe, "outside");
      if (oneSession) await tx.notify(probe, "outside");
      if (!oneSession) await probes.count(1, "the probe sent outside the transaction");
      assert.deepEqual(inbox.payloads, [], "nothing is delivered before the commit");
    });
    await db.notify(channel, "after");
    assert.deepEqual(await inbox.count(2), ["committed", "after"]);
  } finally {
    await sub.unlisten();
    await probeSub.unlisten();
  }
}

async function unlistenStopsDelivery(db: DatabaseManager): Promise<void> {
  const channel = uniqueName("un");
  const marker = uniqueName("marker");
  const first = new Inbox();
  const second = new Inbox();
  const markers = new Inbox();
  const a = await db.listen(channel, first.handler);
  const b = await db.listen(channel, second.handler);
  const m = await db.listen(marker, markers.handler);
  try {
    await db.notify(channel, "both");
    await first.count(1);
    await second.count(1);
    await a.unlisten();
    await a.unlisten();
    await db.notify(channel, "second only");
    await db.notify(marker, "1");
    await markers.count(1);
    await second.count(2);
    assert.deepEqual(first.payloads, ["both"]);
    await b.unlisten();
    await db.notify(channel, "nobody");
    await db.notify(marker, "2");
    await markers.count(2);
    assert.deepEqual(second.payloads, ["both", "second only"]);
  } finally {
    await m.unlisten();
  }
}

async function throwingHandlerIsReported(
  db: DatabaseManager,
  warnings: string[],
): Promise<void> {
  const channel = uniqueName("throws");
  const inbox = new Inbox();
  const throwing = await db.listen(channel, () => {
    throw new Error("handler broke");
  });
  const rejecting = await db.listen(channel, () => Promise.reject(new Error("async broke")));
  const fine = await db.listen(channel, inbox.handler);
  try {
    await db.notify(channel, "one");
    await db.notify(channel, "two");
    assert.deepEqual(await inbox.count(2), ["one", "two"]);
    await settlesWithin(
      (async () => {
        while (warnings.filter((w) => w.includes(channel)).length < 4) {
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
      })(),
      WAIT_MS,
      "the handler errors reaching the logger",
    );
    assert.ok(warnings.some((w) => w.includes(channel) && w.includes("handler broke")));
    assert.ok(warnings.some((w) => w.includes(channel) && w.includes("async broke")));
  } finally {
    await throwing.unlisten();
    await rejecting.unlisten();
    await fine.unlisten();
  }
}

/** Two managers in their own schemas; a trigger notifies `<schema>_events`. */
async function perSchemaChannels(pool: Pool): Promise<void> {
  const schemas = [uniqueName("ta"), uniqueName("tb")];
  const managers = schemas.map((schema) => new DatabaseManager({ pool, schema }));
  const inboxes = schemas.map(() => new Inbox());
  const subs = [];
  try {
    for (const db of managers) {
      await db.ensureSchema();
      await db.execute("CREATE TABLE {{tables.orders}} (id int PRIMARY KEY)");
      await db.execute(`CREATE FUNCTION {{tables.notify_order}}() RETURNS trigger AS $$
        BEGIN
          PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', NEW.id::text);
          RETURN NEW;
        END $$ LANGUAGE plpgsql`);
      await db.execute(`CREATE TRIGGER orders_notify AFTER INSERT ON {{tables.orders}}
        FOR EACH ROW EXECUTE FUNCTION {{tables.notify_order}}()`);
    }
    for (const [i, db] of managers.entries()) {
      subs.push(await db.listen(`${db.schema}_events`, inboxes[i].handler));
    }
    await managers[0].execute("INSERT INTO {{tables.orders}} VALUES (1), (2)");
    await managers[1].execute("INSERT INTO {{tables.orders}} VALUES (10)");
    await managers[0].execute("INSERT INTO {{tables.orders}} VALUES (3)");
    assert.deepEqual(await inboxes[0].count(3), ["1", "2", "3"]);
    assert.deepEqual(await inboxes[1].count(1), ["10"]);
    // A later notification to the second schema proves nothing more was on the way to it.
    await managers[1].execute("INSERT INTO {{tables.orders}} VALUES (11)");
    assert.deepEqual(await inboxes[1].count(2), ["10", "11"]);
    assert.deepEqual(inboxes[0].payloads, ["1", "2", "3"]);
  } finally {
    for (const sub of subs) await sub.unlisten();
    for (const db of managers) await db.dropSchema({ cascade: true });
  }
}

async function validatesChannels(db: DatabaseManager): Promise<void> {
  const noop = () => {};
  await assert.rejects(
    db.listen("", noop),
    (e) => e instanceof RangeError && /1 to 63/.test(e.message),
  );
  await assert.rejects(
    db.listen("x".repeat(64), noop),
    (e) => e instanceof RangeError && /got 64/.test(e.message) && /shorter name/.test(e.message),
  );
  // 32 two-byte characters: 64 bytes although 32 characters.
  await assert.rejects(db.listen("é".repeat(32), noop), RangeError);
  await assert.rejects(db.listen(42 as unknown as string, noop), TypeError);
  await assert.rejects(db.listen("a\0b", noop), TypeError);
  await assert.rejects(
    db.listen("fine", "nope" as unknown as () => void),
    (e) => e instanceof TypeError && /must be a function/.test(e.message),
  );
  await assert.rejects(db.notify("", "x"), RangeError);
  await assert.rejects(db.notify("x".repeat(64), "x"), RangeError);
  await assert.rejects(
    db.notify("fine", { id: 1 } as unknown as string),
    (e) => e instanceof TypeError && /JSON.stringify/.test(e.message),
  );
  const longest = "é".repeat(31) + "x";
  const inbox = new Inbox();
  const sub = await db.listen(longest, inbox.handler);
  await db.notify(longest, "63 bytes");
  assert.deepEqual(await inbox.count(1), ["63 bytes"]);
  await sub.unlisten();
}

/** The backend of the pool's listening session (its last statement was a LISTEN). */
function listenerPid(application: string): Promise<number | undefined> {
  return observe(async (sql) => {
    const rows = await sql`SELECT pid FROM pg_stat_activity
      WHERE application_name = ${application} AND query LIKE 'LISTEN %'`;
    return rows.length === 1 ? rows[0].pid as number : undefined;
  });
}

async function backends(application: string): Promise<number[]> {
  return await observe(async (sql) =>
    (await sql`SELECT pid FROM pg_stat_activity WHERE application_name = ${application}`).map(
      (row) => row.pid as number,
    )
  );
}

async function until<T>(what: string, probe: () => Promise<T | undefined>): Promise<T> {
  return await settlesWithin(
    (async () => {
      while (true) {
        const value = await probe();
        if (value !== undefined) return value;
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
    })(),
    WAIT_MS,
    what,
  );
}

function appConfig(extra: DatabaseConfig = {}): { application: string; config: DatabaseConfig } {
  const application = uniqueName("listen");
  return {
    application,
    config: { serverSettings: { application_name: application }, ...extra },
  };
}

serverTest("listen() delivers payloads with awkward characters on an awkward channel", async () => {
  await withManager((db) => deliversPayloads(db));
});

serverTest("notify() in a transaction is delivered on commit, never on rollback", async () => {
  await withManager((db) => deliversOnCommitOnly(db));
});

serverTest(
  "unlisten() stops delivery, is idempotent, and the last one sends UNLISTEN",
  async () => {
    await withManager((db) => unlistenStopsDelivery(db));
  },
);

serverTest("a handler that throws is logged and the others still get the message", async () => {
  const logger = recordingLogger();
  await withManager((db) => throwingHandlerIsReported(db, logger.warnings), { logger });
});

serverTest("two managers in their own schemas see only their own schema's channel", async () => {
  await withManager((_db, pool) => perSchemaChannels(pool));
});

serverTest("listen() and notify() refuse bad channel names with what to do", async () => {
  await withManager((db) => validatesChannels(db));
});

serverTest(
  "after the listening backend is terminated the pool listens again and calls onReconnect",
  async () => {
    const { application, config } = appConfig({
      retry: { attempts: 5, delayMs: 20, maxDelayMs: 100 },
    });
    const logger = recordingLogger();
    await withManager(async (db) => {
      const channel = uniqueName("re");
      const other = uniqueName("re2");
      const inbox = new Inbox();
      const others = new Inbox();
      let reconnects = 0;
      await db.listen(channel, inbox.handler, { onReconnect: () => void reconnects++ });
      await db.listen(other, others.handler);
      await db.notify(channel, "before");
      await inbox.count(1);
      const pid = await until("the listening backend", () => listenerPid(application));
      await observe((sql) => sql`SELECT pg_terminate_backend(${pid})`);
      await until("onReconnect", () => Promise.resolve(reconnects > 0 ? true : undefined));
      assert.equal(reconnects, 1);
      const again = await until("the new listening backend", () => listenerPid(application));
      assert.notEqual(again, pid);
      await db.notify(channel, "after");
      await db.notify(other, "other after");
      assert.deepEqual(await inbox.count(2), ["before", "after"]);
      assert.deepEqual(await others.count(1), ["other after"]);
    }, { ...config, logger });
  },
);

serverTest("pool.close() ends the listening session on the server", async () => {
  const { application, config } = appConfig();
  const pool = await createSharedPool({ connectionString: TEST_URL, ...config });
  let pid: number;
  try {
    const db = new DatabaseManager({ pool });
    await db.listen(uniqueName("close"), () => {});
    pid = await until("the listening backend", () => listenerPid(application));
  } finally {
    await pool.close();
  }
  await until("the backend gone", async () => {
    const pids = await backends(application);
    return pids.includes(pid) ? undefined : true;
  });
  assert.deepEqual(await backends(application), []);
});

serverTest("the listening connection counts against maxConnections", async () => {
  const { application, config } = appConfig({ minConnections: 1, maxConnections: 2 });
  await withManager(async (db, pool) => {
    const sub = await db.listen(uniqueName("cap"), () => {});
    assert.equal(pool.getStats().size, 2);
    let releaseFirst!: () => void;
    const held = new Promise<void>((resolve) => releaseFirst = resolve);
    let entered!: () => void;
    const inside = new Promise<void>((resolve) => entered = resolve);
    const first = db.transaction(async (tx) => {
      await tx.execute("SELECT 1");
      entered();
      await held;
    });
    await inside;
    const second = db.transaction((tx) => tx.fetchValue("SELECT 2"));
    await until(
      "the second transaction waiting",
      () => Promise.resolve(pool.getStats().waiting === 1 ? true : undefined),
    );
    const stats = pool.getStats();
    assert.deepEqual([stats.size, stats.used, stats.maxSize], [2, 2, 2]);
    assert.equal((await backends(application)).length, 2, "listener + one pool connection");
    releaseFirst();
    await first;
    assert.equal(await second, 2);
    await sub.unlisten();
    assert.equal(pool.getStats().size, 1, "the session closes with the last subscription");
    await until(
      "the listening backend gone",
      async () => (await backends(application)).length === 1 ? true : undefined,
    );
  }, config);
  const full = appConfig({ minConnections: 2, maxConnections: 2 });
  await withManager(async (db, pool) => {
    assert.equal((await backends(full.application)).length, 2, "the pool is at its cap");
    const inbox = new Inbox();
    const channel = uniqueName("full");
    await db.listen(channel, inbox.handler);
    await until(
      "one pool connection closed for the listener",
      async () =>
        (await backends(full.application)).length === 2 &&
          await listenerPid(full.application) !== undefined
          ? true
          : undefined,
    );
    assert.equal(pool.getStats().size, 2);
    await db.notify(channel, "room made");
    assert.deepEqual(await inbox.count(1), ["room made"]);
  }, full.config);
  await withManager(async (db) => {
    await assert.rejects(
      db.listen("one", () => {}),
      (e) => e instanceof PoolError && /maxConnections/.test(e.message),
    );
  }, { minConnections: 1, maxConnections: 1 });
});

serverTest("listen() before connect() and after close() rejects with PoolError", async () => {
  const db = new DatabaseManager({ connectionString: TEST_URL, minConnections: 1 });
  await assert.rejects(db.listen("early", () => {}), PoolError);
  await db.connect();
  const inbox = new Inbox();
  try {
    await db.listen("standalone_events", inbox.handler);
    await db.notify("standalone_events", "ok");
    assert.deepEqual(await inbox.count(1), ["ok"]);
  } finally {
    await db.close();
  }
  await assert.rejects(
    db.listen("late", () => {}),
    (e) => e instanceof PoolError && e.code === "POOL_CLOSED",
  );
});

serverTest("LISTEN, UNLISTEN and pg_notify reach the onQuery hook", async () => {
  const events: QueryEvent[] = [];
  await withManager(async (db) => {
    const channel = uniqueName("hook");
    const inbox = new Inbox();
    const sub = await db.listen(channel, inbox.handler);
    await db.notify(channel, "x");
    await inbox.count(1);
    await sub.unlisten();
    const sqls = events.map((e) => e.sql);
    assert.ok(sqls.includes(`LISTEN "${channel}"`), sqls.join("\n"));
    assert.ok(sqls.includes(`UNLISTEN "${channel}"`), sqls.join("\n"));
    assert.ok(sqls.includes("SELECT pg_notify($1, $2)"), sqls.join("\n"));
    assert.ok(events.every((e) => e.schema === db.schema));
  }, { onQuery: (event) => events.push(event) });
});

serverTest("LISTEN, UNLISTEN and pg_notify are OpenTelemetry spans", async () => {
  const exporter = new InMemorySpanExporter();
  const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  trace.setGlobalTracerProvider(provider);
  try {
    await withManager(async (db) => {
      const channel = uniqueName("span");
      const inbox = new Inbox();
      const sub = await db.listen(channel, inbox.handler);
      await db.notify(channel, "x");
      await inbox.count(1);
      await sub.unlisten();
      const texts = exporter.getFinishedSpans()
        .filter((span) => span.instrumentationScope.name === "@pgdbm/pgdbm")
        .map((span) => span.attributes["db.query.text"]);
      // The first is withManager's CREATE SCHEMA.
      assert.deepEqual(texts.slice(1), [
        `LISTEN "${channel}"`,
        "SELECT pg_notify($1, $2)",
        `UNLISTEN "${channel}"`,
      ]);
    });
  } finally {
    trace.disable();
    await provider.shutdown();
  }
});

const bouncerSkip = await pgbouncerSkipReason();

Deno.test({
  name: bouncerSkip === undefined
    ? "listen() through PgBouncer in transaction mode is refused, naming a direct URL"
    : `listen() through PgBouncer is refused (skipped: ${bouncerSkip})`,
  ignore: bouncerSkip !== undefined,
  fn: async () => {
    const bouncer = await startPgBouncer(TEST_URL, {
      settings: { ignore_startup_parameters: IGNORED_STARTUP_PARAMETERS.join(", ") },
    });
    try {
      const pool = await createSharedPool({ connectionString: bouncer.url(), prepare: false });
      try {
        const db = new DatabaseManager({ pool });
        const size = pool.getStats().size;
        await assert.rejects(
          db.listen("orders_changed", () => {}),
          (e) => e instanceof PoolError && /direct URL/.test(e.message),
        );
        assert.equal(pool.getStats().size, size, "no listening session was opened");
      } finally {
        await pool.close();
      }
    } finally {
      await bouncer.stop();
    }
  },
});

Deno.test("listen() and notify() on the embedded engine (PGlite)", async (t) => {
  const logger = recordingLogger();
  const pool = await createSharedPool({
    connectionString: "pglite:memory",
    logger,
    maxQueries: 20,
  });
  try {
    const db = new DatabaseManager({ pool, schema: "embedded" });
    await db.ensureSchema();
    await t.step("delivers awkward payloads", () => deliversPayloads(db));
    await t.step(
      "delivers a transaction's notification on commit only",
      () => deliversOnCommitOnly(db, true),
    );
    await t.step("unlisten() stops delivery", () => unlistenStopsDelivery(db));
    await t.step(
      "a throwing handler is logged",
      () => throwingHandlerIsReported(db, logger.warnings),
    );
    await t.step("per-schema channels", () => perSchemaChannels(pool));
    await t.step("channel validation", () => validatesChannels(db));
    await t.step("a replaced session listens before its first statement", async () => {
      const channel = "embedded_replaced";
      const inbox = new Inbox();
      let reconnects = 0;
      const sub = await db.listen(channel, inbox.handler, { onReconnect: () => void reconnects++ });
      // maxQueries (20) retires the session on the way; each notify may land on a new one.
      for (let i = 0; i < 45; i++) await db.notify(channel, String(i));
      assert.deepEqual(
        await inbox.count(45),
        Array.from({ length: 45 }, (_, i) => String(i)),
      );
      assert.equal(reconnects, 0, "nothing was missed, so there is nothing to resync");
      await sub.unlisten();
    });
    await t.step("the shared session takes no extra connection", async () => {
      const sub = await db.listen("embedded_events", () => {});
      assert.equal(pool.getStats().size, 1);
      await sub.unlisten();
    });
  } finally {
    await pool.close();
  }
});

const clusterSkip = faultClusterUnavailable();

Deno.test({
  name: clusterSkip === undefined
    ? "after a server restart the pool listens again, and unlisten() during an outage settles"
    : `listen() across a server restart (skipped: ${clusterSkip})`,
  ignore: clusterSkip !== undefined,
  fn: async () => {
    const cluster = await startFaultCluster({ maxConnections: 20 });
    const logger = recordingLogger();
    const pool = await createSharedPool({
      connectionString: cluster.url,
      retry: { attempts: 10, delayMs: 50, maxDelayMs: 200 },
      logger,
    });
    try {
      const db = new DatabaseManager({ pool });
      const channel = uniqueName("restart");
      const inbox = new Inbox();
      let reconnects = 0;
      const sub = await db.listen(channel, inbox.handler, {
        onReconnect: () => void reconnects++,
      });
      await db.notify(channel, "before");
      await inbox.count(1);
      await cluster.restart(500);
      await until(
        "onReconnect after the restart",
        () => Promise.resolve(reconnects > 0 ? true : undefined),
      );
      await db.notify(channel, "after");
      assert.deepEqual(await inbox.count(2), ["before", "after"]);

      // The server goes away for longer; the last unlisten() does not wait for it.
      const other = await db.listen(uniqueName("outage"), () => {});
      await sub.unlisten();
      const restarted = cluster.restart(4000);
      await until(
        "the server down",
        () => cluster.psql("SELECT 1", 1000).then(() => undefined, () => true),
      );
      await settlesWithin(other.unlisten(), 3000, "unlisten() while the server is down");
      await restarted;
      assert.equal(reconnects, 1, "no onReconnect for a subscription that was dropped");
    } finally {
      await pool.close();
      await cluster.stop();
    }
  },
});
