/** `copyRecordsToTable()` with records as objects. */
import assert from "node:assert/strict";
import { serverTest, withManager } from "./_support/server.ts";

serverTest("copyRecordsToTable() takes objects: columns from the first object's keys", async () => {
  await withManager(async (db) => {
    await db.execute(
      "CREATE TABLE {{tables.orders}} (id int PRIMARY KEY, total numeric, note text)",
    );
    const copied = await db.copyRecordsToTable("orders", [
      { id: 1, total: "9.99", note: "tab\there" },
      { total: "5.00", id: 2, note: null },
    ]);
    assert.equal(copied, 2);
    assert.deepEqual(await db.fetchAll("SELECT * FROM {{tables.orders}} ORDER BY id"), [
      { id: 1, total: "9.99", note: "tab\there" },
      { id: 2, total: "5.00", note: null },
    ]);
    // `columns` chooses the keys to load; others are left out on purpose.
    async function* more() {
      yield { id: 3, total: "1.00", ignored: "x" };
    }
    assert.equal(await db.copyRecordsToTable("orders", more(), { columns: ["id", "total"] }), 1);
    assert.deepEqual(await db.fetchOne("SELECT * FROM {{tables.orders}} WHERE id = 3"), {
      id: 3,
      total: "1.00",
      note: null,
    });
  });
});

serverTest("copyRecordsToTable() refuses objects that would lose or misplace a value", async () => {
  await withManager(async (db) => {
    await db.execute("CREATE TABLE {{tables.orders}} (id int PRIMARY KEY, total numeric)");
    await assert.rejects(
      db.copyRecordsToTable("orders", [{ id: 1, total: "1" }, { id: 2, totl: "2" }]),
      (error) => error instanceof RangeError && /record 1: it has no 'total'/.test(error.message),
    );
    await assert.rejects(
      db.copyRecordsToTable("orders", [{ id: 1, total: "1" }, { id: 2, total: "2", extra: 1 }]),
      (error) =>
        error instanceof RangeError && /'extra' is not one of the columns/.test(error.message),
    );
    await assert.rejects(
      db.copyRecordsToTable("orders", [{ id: 1, total: "1" }, [2, "2"]] as never),
      (error) => error instanceof RangeError && /not both/.test(error.message),
    );
    assert.equal(
      await db.fetchValue("SELECT count(*)::int FROM {{tables.orders}}"),
      0,
      "nothing copied",
    );
  });
});
