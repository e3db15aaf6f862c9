/**
 * The migration sources' own path functions (src/migrate/_paths.ts), checked against
 * `node:path`'s `resolve()` for POSIX and Windows paths.
 */
import assert from "node:assert/strict";
import { posix, win32 } from "node:path";
import { absolutePath, pathIn } from "../../src/migrate/_paths.ts";

/** Checks absolutePath() against node:path's resolve() for every `cwd` and `path`. */
function assertResolvesLikeNode(
  windows: boolean,
  cwds: readonly string[],
  paths: readonly string[],
): void {
  const resolve = windows ? win32.resolve : posix.resolve;
  for (const cwd of cwds) {
    for (const path of paths) {
      assert.equal(absolutePath(path, cwd, windows), resolve(cwd, path), `${cwd} + ${path}`);
    }
  }
}

Deno.test("absolutePath() resolves POSIX paths as node:path does", () => {
  assertResolvesLikeNode(false, ["/", "/work/app", "/work/app/", "/a b/ü"], [
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
  ]);
});

Deno.test("absolutePath() resolves Windows paths as node:path does", () => {
  // Not compared: a drive-relative path on another drive (`D:x`), which node:path takes
  // from that drive's current directory (off Windows, from the process's own).
  assertResolvesLikeNode(
    true,
    ["C:\\", "C:\\work\\app", "c:/work/app/", "\\\\server\\share\\app"],
    [
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
    ],
  );
});

Deno.test("pathIn() joins a plain file name to a folder", () => {
  assert.equal(pathIn("/srv/m", "001.sql", false), "/srv/m/001.sql");
  assert.equal(pathIn("/srv/m/", "001.sql", false), "/srv/m/001.sql");
  assert.equal(pathIn("C:\\m", "001.sql", true), "C:\\m\\001.sql");
  assert.equal(pathIn("C:\\m\\", "001.sql", true), "C:\\m\\001.sql");
});
