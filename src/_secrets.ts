/**
 * Passwords in connection strings: where they are, to mask them before a URL is shown
 * (configuration errors, the command line's output) and to scrub them from any text.
 *
 * A password is what follows the first `:` of the user part (`user:password@`), the
 * `password=` and `sslpassword=` parameters, and, in a URL with `//` and no `@`, what
 * follows the last `:` of the host part when it is not a port number nor inside an IPv6
 * address's brackets (`postgres://user:password/db`, a typo for `user:password@host/db`).
 * The text is read as written: it need not be a valid URL.
 *
 * @module
 */

const PASSWORD_PARAMETER = /([?&](?:ssl)?password=)([^&#]*)/gi;

/**
 * `url` with each password replaced by `mask`.
 *
 * @param url A connection string, valid or not.
 * @param mask What stands for a password: `***` in errors, `****` in the CLI's output.
 * @returns The text, safe to show.
 */
export function maskPasswords(url: string, mask = "***"): string {
  const span = userInfoPassword(url);
  const masked = span === undefined
    ? url
    : `${url.slice(0, span.start)}${mask}${url.slice(span.end)}`;
  return masked.replace(PASSWORD_PARAMETER, (_match, name: string) => name + mask);
}

/**
 * The passwords in `url`, as written and percent-decoded, to scrub from any output;
 * those shorter than 3 characters are left out (scrubbing them would garble the text).
 *
 * @param url A connection string, valid or not.
 * @returns The distinct passwords.
 */
export function passwordsOf(url: string): string[] {
  const secrets: string[] = [];
  const span = userInfoPassword(url);
  if (span !== undefined) secrets.push(url.slice(span.start, span.end));
  for (const match of url.matchAll(PASSWORD_PARAMETER)) secrets.push(match[2]);
  const decoded = secrets.map((s) => {
    try {
      return decodeURIComponent(s);
    } catch {
      return s;
    }
  });
  return [...new Set([...secrets, ...decoded])].filter((s) => s.length >= 3);
}

/** Where the password of the user part (or the mistyped host part) stands in `url`. */
function userInfoPassword(url: string): { start: number; end: number } | undefined {
  const slashes = url.indexOf("//");
  const start = slashes < 0 ? 0 : slashes + 2;
  const at = url.lastIndexOf("@");
  if (at >= start) {
    const colon = url.slice(start, at).indexOf(":");
    return colon < 0 ? undefined : { start: start + colon + 1, end: at };
  }
  if (slashes < 0) return undefined;
  const length = url.slice(start).search(/[/?#]/);
  const end = length < 0 ? url.length : start + length;
  const colon = url.slice(start, end).lastIndexOf(":");
  const after = url.slice(start + colon + 1, end);
  if (colon < 0 || /^\d*$/.test(after) || after.includes("]")) return undefined;
  return { start: start + colon + 1, end };
}
