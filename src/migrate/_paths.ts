/**
 * Paths of migration folders, without `node:path`. The first `node:` module a program loads
 * starts Deno's Node layer, about 15 ms, and the library's import paid it for two path
 * functions; now a program that never reads a `file:` URL source does not load it at all
 * (those still go through `node:url`, loaded when they are read).
 *
 * @module
 */

const WINDOWS = Deno.build.os === "windows";

/**
 * `path` made absolute against `cwd` and normalized, as `node:path`'s `resolve()` does: no
 * `.` or `..` segments, no repeated or trailing separators. On Windows both `\` and `/`
 * separate, a path is absolute with a drive (`C:\`) or as a UNC share (`\\server\share`), a
 * path from the root (`\dir`) takes the drive of `cwd`, and the result uses `\`.
 *
 * @param path The path, absolute or relative.
 * @param cwd The directory a relative path is taken from.
 * @param windows Whether the path is a Windows one (the platform's own by default).
 * @returns The absolute path.
 */
export function absolutePath(path: string, cwd: string = Deno.cwd(), windows = WINDOWS): string {
  if (!windows) {
    const full = path.startsWith("/") ? path : `${cwd}/${path}`;
    return `/${normalized(full.split("/")).join("/")}`;
  }
  const unc = /^[\\/]{2}[^\\/]+[\\/]+[^\\/]+/;
  const drive = /^[A-Za-z]:/;
  let full = path;
  if (!unc.test(path) && !/^[A-Za-z]:[\\/]/.test(path)) {
    const own = drive.exec(path)?.[0];
    if (own !== undefined && own.toUpperCase() !== drive.exec(cwd)?.[0].toUpperCase()) {
      // A path on another drive, relative to it: taken from that drive's root.
      full = `${own}\\${path.slice(2)}`;
    } else if (/^[\\/]/.test(path)) {
      full = `${(unc.exec(cwd) ?? drive.exec(cwd) ?? [""])[0]}${path}`;
    } else full = `${cwd}\\${path.replace(drive, "")}`;
  }
  const root = unc.exec(full)?.[0] ?? drive.exec(full)?.[0] ?? "";
  const segments = normalized(full.slice(root.length).split(/[\\/]/));
  return `${root.replaceAll("/", "\\")}\\${segments.join("\\")}`;
}

/**
 * `file` in `directory`, for a plain file name (migration names and the manifest's have no
 * separators).
 */
export function pathIn(directory: string, file: string, windows = WINDOWS): string {
  const separator = windows ? "\\" : "/";
  return /[\\/]$/.test(directory) ? directory + file : directory + separator + file;
}

/** The path of a `file:` URL, through `node:url`, loaded on the first call. */
export async function pathOfFileUrl(url: URL | string): Promise<string> {
  const { fileURLToPath } = await import("node:url");
  return fileURLToPath(url);
}

function normalized(segments: readonly string[]): string[] {
  const out: string[] = [];
  for (const segment of segments) {
    if (segment === "" || segment === ".") continue;
    if (segment === "..") out.pop();
    else out.push(segment);
  }
  return out;
}
