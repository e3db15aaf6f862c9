import assert from "node:assert/strict";
import { editDistance, suggest } from "../src/_suggest.ts";

Deno.test("editDistance() counts insertions, deletions, substitutions and swaps as 1 each", () => {
  assert.equal(editDistance("apply", "apply"), 0);
  assert.equal(editDistance("aply", "apply"), 1);
  assert.equal(editDistance("applyy", "apply"), 1);
  assert.equal(editDistance("appla", "apply"), 1);
  assert.equal(editDistance("aplpy", "apply"), 1);
  assert.equal(editDistance("", "abc"), 3);
  assert.equal(editDistance("ca", "abc"), 3);
});

Deno.test("suggest() finds the choice a typo meant", () => {
  assert.equal(suggest("aply", ["status", "apply", "create"]), "apply");
  assert.equal(suggest("--dryrun", ["--dry-run", "--json"]), "--dry-run");
  assert.equal(suggest("prd", ["dev", "prod"]), "prod");
  assert.equal(suggest("hots", ["host", "port"]), "host");
  assert.equal(suggest("maxConection", ["minConnections", "maxConnections"]), "maxConnections");
});

Deno.test("suggest() compares without case, and counts a prefix of two or more as 1", () => {
  assert.equal(suggest("MAXCONNECTIONS", ["minConnections", "maxConnections"]), "maxConnections");
  assert.equal(suggest("maxConnection", ["minConnections", "maxConnections"]), "maxConnections");
  assert.equal(suggest("sta", ["apply", "status"]), "status");
  assert.equal(suggest("s", ["apply", "status"]), undefined);
});

Deno.test("suggest() allows a third of the choice's length, 1 to 3, and picks the first of equals", () => {
  assert.equal(suggest("xost", ["host"]), "host");
  assert.equal(suggest("xxst", ["host"]), undefined);
  assert.equal(suggest("statementTimeoutXxx", ["statementTimeoutMs"]), "statementTimeoutMs");
  assert.equal(suggest("statementXxxxxxxMs", ["statementTimeoutMs"]), undefined);
  assert.equal(suggest("ab", ["a", "b"]), undefined);
  assert.equal(suggest("cat", ["bat", "hat"]), "bat");
  assert.equal(suggest("anything", []), undefined);
});
