import assert from "node:assert/strict";
import { maskPasswords, passwordsOf } from "../src/_secrets.ts";

Deno.test("maskPasswords() masks the password of the user part, with *** by default", () => {
  assert.equal(
    maskPasswords("postgres://ann:s3cret@db:5432/app"),
    "postgres://ann:***@db:5432/app",
  );
  assert.equal(maskPasswords("postgres://ann:a:b@c@db/app"), "postgres://ann:***@db/app");
  assert.equal(maskPasswords("postgres://ann:s3cret@db/app", "****"), "postgres://ann:****@db/app");
  assert.equal(maskPasswords("ann:s3cret@db/app"), "ann:***@db/app");
});

Deno.test("maskPasswords() masks password= and sslpassword= parameters, in any case", () => {
  assert.equal(
    maskPasswords("postgres://ann@db/app?sslmode=require&PASSWORD=x1&sslpassword=y2#f"),
    "postgres://ann@db/app?sslmode=require&PASSWORD=***&sslpassword=***#f",
  );
});

Deno.test("maskPasswords() masks a password mistyped as a port, but not a port or IPv6", () => {
  assert.equal(maskPasswords("postgres://ann:s3cret/app"), "postgres://ann:***/app");
  assert.equal(maskPasswords("postgres://db:5432/app"), "postgres://db:5432/app");
  assert.equal(maskPasswords("postgres://[::1]/app"), "postgres://[::1]/app");
  assert.equal(maskPasswords("postgres://[::1]:5432/app"), "postgres://[::1]:5432/app");
});

Deno.test("maskPasswords() leaves a URL without a password as it is", () => {
  for (const url of ["postgres://ann@db/app", "postgres://db/app", "postgres:///app", "env:X"]) {
    assert.equal(maskPasswords(url), url);
  }
});

Deno.test("passwordsOf() lists what maskPasswords() masks, as written and decoded", () => {
  assert.deepEqual(passwordsOf("postgres://ann:p%40ss@db/app?password=other"), [
    "p%40ss",
    "other",
    "p@ss",
  ]);
  assert.deepEqual(passwordsOf("postgres://ann:s3cret/app"), ["s3cret"]);
  assert.deepEqual(passwordsOf("postgres://ann:%zz9@db/app"), ["%zz9"]);
});

Deno.test("passwordsOf() leaves out passwords shorter than 3 characters", () => {
  assert.deepEqual(passwordsOf("postgres://ann:pw@db/app"), []);
  assert.deepEqual(passwordsOf("postgres://ann@db/app"), []);
});
