/**
 * Every fenced TypeScript block of README.md runs as written: each is written to a file in
 * the repository's root (so `jsr:@pgdbm/pgdbm` resolves to this workspace, and relative
 * paths such as `./migrations/users` are the repository's) and run with
 * `deno run -A` (`deno test -A` for a block that calls `Deno.test`), after one `deno check`
 * of them all, against a database of its own on the test server, named by `DATABASE_URL`, `PGDBM_TEST_URL` and
 * `REPLICA_URL` (the same database stands in for a replica). A block passes when it exits
 * with 0 twice in a row on its database (snippets must be re-runnable). Blocks run two at a
 * time.
 *
 * A block that cannot run here is marked ```` ```ts ignore: <why> ````, and the reason is
 * required: a bare `ignore` fails this test.
 */
import assert from "node:assert/strict";
import { observe, serverTest, TEST_URL, uniqueName } from "./_support/server.ts";

const ROOT = new URL("../", import.meta.url);
const README = new URL("README.md", ROOT);
const FENCE = /^```([^\n]*)\n([\s\S]*?)^```$/gm;
const TYPESCRIPT = new Set(["ts", "typescript"]);
const CONCURRENCY = 2;
const BLOCK_TIMEOUT_MS = 180_000;

/** One fenced TypeScript block of the README. */
interface Block {
  /** 1-based line of its opening fence. */
  line: number;
  /** Its info string after the language (`ignore: …`), trimmed. */
  attributes: string;
  /** Its code. */
  code: string;
}

/** The fenced TypeScript blocks of `markdown`, in order. */
function typescriptBlocks(markdown: string): Block[] {
  const blocks: Block[] = [];
  for (const match of markdown.matchAll(FENCE)) {
    const [language, ...rest] = match[1].trim().split(/\s+/);
    if (!TYPESCRIPT.has(language)) continue;
    const line = markdown.slice(0, match.index).split("\n").length;
    blocks.push({ line, attributes: rest.join(" "), code: match[2] });
  }
  return blocks;
}

/** The block's file: in the repository's root, so it resolves as the README's reader's would. */
function blockFile(block: Block, tag: string): URL {
  return new URL(`.readme_block_${block.line}_${tag}.ts`, ROOT);
}

/** Type-checks every block's file in one `deno check`; returns its output on failure. */
async function typeCheck(files: URL[]): Promise<string | undefined> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["check", "--quiet", ...files.map((file) => file.pathname)],
    cwd: ROOT.pathname,
    env: { NO_COLOR: "1" },
    stdin: "null",
  }).output();
  if (code === 0) return undefined;
  const decoder = new TextDecoder();
  return `${decoder.decode(stdout)}\n${decoder.decode(stderr)}`.trim();
}

/**
 * Runs one block twice against a database of its own (a reader runs a snippet again, and
 * it must not fail then on what its first run left); returns what went wrong, or undefined.
 */
async function runBlock(block: Block, file: URL): Promise<string | undefined> {
  const database = uniqueName("readme");
  await observe((sql) => sql.unsafe(`CREATE DATABASE "${database}"`));
  const url = new URL(TEST_URL);
  url.pathname = `/${database}`;
  try {
    for (const run of ["first", "second"]) {
      const failure = await runOnce(block, file, url);
      if (failure !== undefined) return `README.md:${block.line}, ${run} run: ${failure}`;
    }
    return undefined;
  } finally {
    await observe((sql) => sql.unsafe(`DROP DATABASE IF EXISTS "${database}" WITH (FORCE)`));
  }
}

/** Runs a block's file once with `url` as its database; returns what went wrong, or undefined. */
async function runOnce(block: Block, file: URL, url: URL): Promise<string | undefined> {
  const isTest = /\bDeno\.test\s*\(/.test(block.code);
  const child = new Deno.Command(Deno.execPath(), {
    args: [isTest ? "test" : "run", "--no-check", "-A", "--quiet", file.pathname],
    cwd: ROOT.pathname,
    env: {
      DATABASE_URL: url.href,
      PGDBM_TEST_URL: url.href,
      REPLICA_URL: url.href,
      NO_COLOR: "1",
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), BLOCK_TIMEOUT_MS);
  const { code, stdout, stderr } = await child.output().finally(() => clearTimeout(timer));
  if (code === 0) return undefined;
  const decoder = new TextDecoder();
  return `exited with ${code}\n${decoder.decode(stdout)}\n${decoder.decode(stderr)}`.trim();
}

Deno.test("README blocks marked ignore say why", async () => {
  const blocks = typescriptBlocks(await Deno.readTextFile(README));
  assert.ok(blocks.length > 0, "README.md has no ```ts block");
  for (const block of blocks) {
    if (!/^ignore\b/.test(block.attributes)) continue;
    assert.match(
      block.attributes,
      /^ignore:\s*\S/,
      `README.md:${block.line}: write \`\`\`ts ignore: <why it cannot run as written>`,
    );
  }
});

serverTest("every ```ts block of README.md runs as written", async () => {
  const blocks = typescriptBlocks(await Deno.readTextFile(README))
    .filter((block) => !/^ignore\b/.test(block.attributes));
  const tag = uniqueName("b");
  const files = blocks.map((block) => blockFile(block, tag));
  try {
    for (let i = 0; i < blocks.length; i++) await Deno.writeTextFile(files[i], blocks[i].code);
    const checked = await typeCheck(files);
    if (checked !== undefined) assert.fail(`README blocks do not type-check:\n${checked}`);
    const failures: string[] = [];
    let next = 0;
    const worker = async () => {
      while (next < blocks.length) {
        const i = next++;
        const failure = await runBlock(blocks[i], files[i]);
        if (failure !== undefined) failures.push(failure);
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    if (failures.length > 0) assert.fail(failures.join("\n\n"));
  } finally {
    for (const file of files) await Deno.remove(file).catch(() => {});
  }
});
