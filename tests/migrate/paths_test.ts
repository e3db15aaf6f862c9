/**
 * The migration sources' own path functions (src/migrate/_paths.ts), checked against
 * `node:path`'s `resolve()` for POSIX and Windows paths.
 */
import assert from "node:assert/strict";
import { posix, win32 } from "node:path";
import { absolutePath, pathIn } from "../../src/migrate/_paths.ts";

Deno.test("absolutePath() resolves POSIX paths as node:path does", () => {
  const cwds = ["/", "/work/app", "/work/app/", "/a b/ü"];
  const paths = [
    "migrations",
    "./migrations/",
    "../shared/migrations",
    "a//b/./c/..",
    "/",
    "/srv/migrations/",
    "/srv/../etc/./x",
    "..",
    "../../../..",
    ".",
    "",
    "dir with space/ünïcode",
  ];
  for (const cwd of cwds) {
    for (const path of paths) {
      assert.equal(absolutePath(path, cwd, false), posix.resolve(cwd, path), `${cwd} + ${path}`);
    }
  }
});

Deno.test("absolutePath() resolves Windows paths as node:path does", () => {
  // Not compared: a drive-relative path on another drive (`D:x`), which node:path takes
  // from that drive's current directory (off Windows, from the process's own).
  const cwds = ["C:\\", "C:\\work\\app", "c:/work/app/", "\\\\server\\share\\app"];
  const paths = [
    "migrations",
    ".\\migrations\\",
    "../shared/migrations",
    "a\\\\b/.\\c\\..",
    "\\root\\dir",
    "/root/dir/",
    "C:\\srv\\migrations\\",
    "D:/data/../x",
    "\\\\other\\share\\x\\..\\y",
    "..\\..\\..",
    ".",
  ];
  for (const cwd of cwds) {
    for (const path of paths) {
      assert.equal(absolutePath(path, cwd, true), win32.resolve(cwd, path), `${cwd} + ${path}`);
    }
  }
});

Deno.test("pathIn() joins a plain file name to a folder", () => {
  assert.equal(pathIn("/srv/m", "001.sql", false), "/srv/m/001.sql");
  assert.equal(pathIn("/srv/m/", "001.sql", false), "/srv/m/001.sql");
  assert.equal(pathIn("C:\\m", "001.sql", true), "C:\\m\\001.sql");
  assert.equal(pathIn("C:\\m\\", "001.sql", true), "C:\\m\\001.sql");
});
