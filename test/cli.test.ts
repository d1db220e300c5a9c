// The command line: tokenwatch.ts spawned as a process, as a user runs it, under every runtime the design
// card promises: the Node running this suite, the oldest supported Node (22.18) and Deno 2. .ci/run installs
// the last two (`npm ci --prefix .ci/node22`, and `deno` as a devDependency); in CI a missing one fails
// the suite instead of skipping, so a runtime-specific break cannot land. Every server here listens on
// 127.0.0.1 (or on 0.0.0.0, reached through 127.0.0.1) and every database lives in a temp folder.

import { describe, it, before, after } from "node:test";
import type { TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { DatabaseSync } from "node:sqlite";
import { VERSION } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Mock } from "./mocks.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const FILE = join(ROOT, "tokenwatch.ts");
const SLOW = { timeout: 30_000 };

// ============================================================================================
// Runtimes: where each binary is, how to run a file and evaluate a snippet with it.

type Runtime = {
  name: string; bin: string | undefined; looked: string[]; install: string; version: RegExp;
  run: string[]; evaluate(code: string): string[];
};

/** The first of these paths (relative to the repo) that exists. */
function firstExisting(paths: string[]): string | undefined {
  return paths.map((p) => join(ROOT, p)).find((p) => existsSync(p));
}

const nodeEval = (code: string) => ["--input-type=module", "-e", code];
const NODE22 = [".ci/node22/node_modules/node/bin/node"];
// The native binary, not node_modules/.bin/deno: when deno's postinstall is skipped that is a Node
// wrapper that would not pass our signals on.
const DENO = ["node_modules/deno/deno", `node_modules/@deno/${process.platform}-${process.arch}-glibc/deno`];

const RUNTIMES: Runtime[] = [
  { name: `Node ${process.version} (this suite's)`, bin: process.execPath, looked: [], install: "", version: new RegExp(`^${process.version}$`), run: [], evaluate: nodeEval },
  { name: "Node 22.18 (the oldest supported)", bin: firstExisting(NODE22), looked: NODE22, install: "npm ci --prefix .ci/node22", version: /^v22\.18\.\d+$/, run: [], evaluate: nodeEval },
  { name: "Deno 2", bin: firstExisting(DENO), looked: DENO, install: "npm ci (deno is a devDependency)", version: /^deno 2\./, run: ["run", "-A"], evaluate: (code) => ["eval", code] },
];

/** The runtime's binary; a missing one skips locally but fails in CI, where a smoke test must really run. */
function need(t: TestContext, rt: Runtime): string | undefined {
  if (rt.bin) return rt.bin;
  const why = `${rt.name} is not installed (looked for ${rt.looked.join(", ")}; install it with \`${rt.install}\`)`;
  if (process.env.CI) assert.fail(`${why}: CI must run every runtime's smoke test`);
  t.skip(why);
  return undefined;
}

// ============================================================================================
// Processes: spawn, collect output, wait for a line or the exit.

type Proc = { child: ChildProcess; out(): string; err(): string; closed: Promise<{ code: number | null; signal: string | null }> };

let home: string; // HOME (and Deno's cache) for every child, so nothing touches the user's ~/.tokenwatch
before(() => { home = mkdtempSync(join(tmpdir(), "tw-cli-home-")); });
after(() => rmSync(home, { recursive: true, force: true }));

/** Start a runtime on argv with a clean environment: no provider key of the caller leaks in. */
function launch(bin: string, argv: string[], env: Record<string, string> = {}): Proc {
  const child = spawn(bin, argv, {
    cwd: home,
    env: { PATH: process.env.PATH ?? "", HOME: home, DENO_DIR: join(home, "deno"), DENO_NO_UPDATE_CHECK: "1", NO_COLOR: "1", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "", err = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => { out += d; });
  child.stderr!.setEncoding("utf8").on("data", (d: string) => { err += d; });
  const closed = once(child, "close").then(([code, signal]) => ({ code: code as number | null, signal: signal as string | null }));
  return { child, out: () => out, err: () => err, closed };
}

const runFile = (rt: Runtime, bin: string, args: string[], env?: Record<string, string>, file = FILE) => launch(bin, [...rt.run, file, ...args], env);

/** Fail with a readable message instead of hanging the suite when something never happens. */
function within<T>(ms: number, p: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, fail) => { timer = setTimeout(() => fail(new Error(`${what} did not happen within ${ms} ms`)), ms); });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** Resolve with the first match of pattern on stdout; reject if the process ends before printing it. */
function waitForOutput(p: Proc, pattern: RegExp): Promise<RegExpExecArray> {
  return within(20_000, new Promise((done, fail) => {
    const check = () => { const m = pattern.exec(p.out()); if (m) { off(); done(m); } };
    const early = () => { off(); fail(new Error(`exited before printing ${pattern}:\n${p.out()}${p.err()}`)); };
    const off = () => { p.child.stdout!.off("data", check); p.child.off("close", early); };
    p.child.stdout!.on("data", check);
    p.child.once("close", early);
    check();
  }), `output ${pattern}`);
}

/** Wait for the start banner and return the port it listens on. */
async function listening(p: Proc): Promise<number> {
  const [, port] = await waitForOutput(p, /listening on http:\/\/[^\s]+:(\d+)\/v1\n/);
  return Number(port);
}

/** Stop a process that a failed assertion left running. */
function reap(p: Proc | undefined): void {
  if (p && p.child.exitCode === null && p.child.signalCode === null) p.child.kill("SIGKILL");
}

/** stderr's lines, without Node 22's one-time notice that node:sqlite is experimental. */
function errLines(p: Proc): string[] {
  return p.err().split("\n").filter((l) => l && !/ExperimentalWarning: SQLite|--trace-warnings/.test(l));
}

/** The mock offers no event for "a request arrived", so look every few milliseconds (bounded). */
async function until(cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${what} did not happen within 10 s`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

function rowsIn(db: string): number {
  const d = new DatabaseSync(db, { readOnly: true });
  try { return (d.prepare("SELECT COUNT(*) AS n FROM requests").get() as { n: number }).n; } finally { d.close(); }
}

const chat = (port: number, model = "gpt-4o-mini") => fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
  method: "POST", headers: { "content-type": "application/json" },
  body: JSON.stringify({ model, messages: [{ role: "user", content: "Say hi" }] }),
});

/** A temp folder with a database path and an OpenAI mock the child routes to. */
async function upstream(): Promise<{ dir: string; db: string; mock: Mock; env: Record<string, string>; done(): Promise<void> }> {
  const dir = mkdtempSync(join(tmpdir(), "tw-cli-"));
  const mock = await startMock("openai");
  return { dir, db: join(dir, "tw.db"), mock, env: { OPENAI_API_KEY: mock.key, OPENAI_BASE_URL: mock.url }, done: async () => { await mock.close(); rmSync(dir, { recursive: true, force: true }); } };
}

type Upstream = Awaited<ReturnType<typeof upstream>>;

/**
 * One test's mock upstream: `body` starts the file through `start` (with the upstream's environment);
 * afterwards, pass or fail, every process it started is reaped and the upstream closed.
 */
async function withUpstream(rt: Runtime, bin: string, body: (up: Upstream, start: (args: string[]) => Proc) => Promise<void>): Promise<void> {
  const up = await upstream();
  const started: Proc[] = [];
  try { await body(up, (args) => { const p = runFile(rt, bin, args, up.env); started.push(p); return p; }); }
  finally { for (const p of started) reap(p); await up.done(); }
}

/** A port that something else holds for as long as the callback runs. */
async function withBusyPort(fn: (port: number) => Promise<void>): Promise<void> {
  const holder = createServer();
  await new Promise<void>((done) => holder.listen(0, "127.0.0.1", done));
  try { await fn((holder.address() as { port: number }).port); } finally { holder.close(); }
}

const FLAGS = ["--port", "--host", "--db", "--config", "--help", "--version"];
const VARIABLES = ["ANTHROPIC_API_KEY", "KIMI_API_KEY", "MOONSHOT_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "KIMI_BASE_URL", "OPENAI_BASE_URL",
  "TOKENWATCH_PORT", "TOKENWATCH_HOST", "TOKENWATCH_DB", "TOKENWATCH_CONFIG", "TOKENWATCH_API_KEY", "TOKENWATCH_MAX_WAIT_MS"];
const ROUTES = ["POST /v1/chat/completions", "GET  /v1/models", "GET  /", "GET  /stats", "GET  /health", "GET  /api/stats", "GET  /api/limits"];

// ============================================================================================

for (const rt of RUNTIMES) {
  describe(`tokenwatch.ts under ${rt.name}`, () => {
    it("is the runtime the suite expects", async (t) => {
      const bin = need(t, rt); if (!bin) return;
      const p = launch(bin, ["--version"]);
      assert.equal((await p.closed).code, 0);
      assert.match(p.out().split("\n")[0], rt.version);
    });

    describe("flags", () => {
      it("--version prints the version alone and exits 0", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const p = runFile(rt, bin, ["--version"]);
        assert.equal((await p.closed).code, 0);
        assert.equal(p.out(), `${VERSION}\n`);
        assert.deepEqual(errLines(p), []);
      });

      it("--help exits 0 and lists every flag, variable and route", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const p = runFile(rt, bin, ["--help"]);
        assert.equal((await p.closed).code, 0);
        for (const word of [...FLAGS, ...VARIABLES, ...ROUTES]) assert.ok(p.out().includes(word), `--help does not mention ${word}`);
        assert.match(p.out(), /Exit status/);
      });

      it("an unknown flag exits 2 with one line that names it", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const p = runFile(rt, bin, ["--prot", "9000"]);
        assert.equal((await p.closed).code, 2);
        assert.deepEqual(errLines(p), ['tokenwatch: Unknown flag "--prot": see --help.']);
        assert.equal(p.out(), "");
      });

      it("a bad port, from the flag or the environment, exits 2 with one line", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const flag = runFile(rt, bin, ["--port", "99999"]);
        assert.equal((await flag.closed).code, 2);
        assert.deepEqual(errLines(flag), ['tokenwatch: Port "99999" is not a port number from 0 to 65535.']);
        const env = runFile(rt, bin, [], { TOKENWATCH_PORT: "http" });
        assert.equal((await env.closed).code, 2);
        assert.deepEqual(errLines(env), ['tokenwatch: Port "http" is not a port number from 0 to 65535 (from TOKENWATCH_PORT).']);
      });

      it("a flag without a value exits 2 rather than taking the next flag as its value", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const p = runFile(rt, bin, ["--db", "--port", "0"]);
        assert.equal((await p.closed).code, 2);
        assert.deepEqual(errLines(p), ["tokenwatch: Flag --db needs a value: see --help."]);
      });
    });

    describe("start errors", () => {
      it("a bad config exits 1 with one line naming the file and the key", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const dir = mkdtempSync(join(tmpdir(), "tw-cli-cfg-"));
        try {
          const path = join(dir, "tw.json");
          writeFileSync(path, JSON.stringify({ providers: { openai: { models: { "gpt-4o": { input: 1, output: 1, tpm: 1000, tier: "simple", tpn: 5 } } } } }));
          const typo = runFile(rt, bin, ["--config", path, "--db", join(dir, "tw.db")]);
          assert.equal((await typo.closed).code, 1);
          const [line, ...more] = errLines(typo);
          assert.deepEqual(more, []);
          assert.ok(line.startsWith(`tokenwatch: Invalid config "${path}": providers.openai.models.gpt-4o.tpn is not a known key`), line);
          writeFileSync(path, "{ \"threshold\": 0.8, }");
          const json = runFile(rt, bin, [], { TOKENWATCH_CONFIG: path, TOKENWATCH_DB: join(dir, "tw.db") });
          assert.equal((await json.closed).code, 1);
          assert.equal(errLines(json).length, 1);
          assert.ok(errLines(json)[0].startsWith(`tokenwatch: Cannot read config "${path}": not valid JSON`), errLines(json)[0]);
          assert.equal(existsSync(join(dir, "tw.db")), false, "a failed start creates no database");
        } finally { rmSync(dir, { recursive: true, force: true }); }
      });

      it("a port already in use says so and suggests --port", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withBusyPort(async (port) => {
          const p = runFile(rt, bin, ["--port", String(port), "--db", ":memory:"]);
          assert.equal((await p.closed).code, 1);
          const lines = errLines(p);
          assert.equal(lines.length, 1, lines.join("\n"));
          assert.match(lines[0], new RegExp(`^tokenwatch: Cannot listen on 127\\.0\\.0\\.1:${port}: the port is already in use`));
          assert.match(lines[0], /--port/);
        });
      });

      it("a database that cannot be opened says which file and suggests --db", async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const dir = mkdtempSync(join(tmpdir(), "tw-cli-db-"));
        try {
          const file = join(dir, "a-file");
          writeFileSync(file, "");
          const p = runFile(rt, bin, ["--port", "0", "--db", join(file, "tw.db")]);
          assert.equal((await p.closed).code, 1);
          const lines = errLines(p);
          assert.equal(lines.length, 1, lines.join("\n"));
          assert.ok(lines[0].startsWith(`tokenwatch: Cannot open database "${join(file, "tw.db")}": `), lines[0]);
          assert.match(lines[0], /--db/);
        } finally { rmSync(dir, { recursive: true, force: true }); }
      });
    });

    describe("the start banner", () => {
      it("says where it listens, the dashboard, the database, and which providers are on and why the others are off", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withUpstream(rt, bin, async (up, start) => {
          const p = start(["--port", "0", "--db", up.db]);
          const port = await listening(p);
          assert.equal((await fetch(`http://127.0.0.1:${port}/health`)).status, 200); // the whole banner is out by now
          const lines = p.out().split("\n");
          assert.equal(lines[0], `TokenWatch ${VERSION} listening on http://127.0.0.1:${port}/v1`);
          assert.ok(lines.includes(`  dashboard  http://127.0.0.1:${port}/`), p.out());
          assert.ok(lines.includes(`  database   ${up.db}`), p.out());
          assert.ok(lines.includes("  enabled    openai"), p.out());
          assert.ok(lines.includes("  disabled   anthropic: no key (set ANTHROPIC_API_KEY); kimi: no key (set KIMI_API_KEY or MOONSHOT_API_KEY)"), p.out());
          assert.doesNotMatch(p.out(), /warning/);
          assert.ok(!p.out().includes(up.mock.key), "the banner never shows a key");
          assert.deepEqual(errLines(p), [], "no runtime prints a warning of its own");
          p.child.kill("SIGTERM");
          assert.equal((await p.closed).code, 0);
        });
      });

      it("warns about a configured model past its end of life, and not about one still current", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withUpstream(rt, bin, async (up, start) => {
          const config = join(up.dir, "tw.json");
          const model = { input: 0.15, output: 0.6, limit: 200000, tier: "simple" };
          writeFileSync(config, JSON.stringify({ providers: { openai: { models: { "gpt-old": { ...model, eol: "2020-01-31" }, "gpt-new": { ...model, eol: "2999-01-01" } } } } }));
          const p = start(["--port", "0", "--db", up.db, "--config", config]);
          const port = await listening(p);
          assert.equal((await fetch(`http://127.0.0.1:${port}/health`)).status, 200);
          const warnings = p.out().split("\n").filter((l) => l.startsWith("  warning"));
          assert.equal(warnings.length, 1, p.out());
          assert.match(warnings[0], /openai\/gpt-old reached its end of life on 2020-01-31/);
          p.child.kill("SIGTERM");
          assert.equal((await p.closed).code, 0);
        });
      });

      it("warns when it listens beyond loopback without TOKENWATCH_API_KEY", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withUpstream(rt, bin, async (up, start) => {
          // 0.0.0.0 on a random port; this test only ever connects through 127.0.0.1
          const p = start(["--host", "0.0.0.0", "--port", "0", "--db", up.db]);
          const started = await Promise.race([listening(p), p.closed.then(() => undefined)]);
          if (started === undefined) return t.skip(`cannot bind 0.0.0.0 here: ${p.err().trim()}`);
          assert.equal((await fetch(`http://127.0.0.1:${started}/health`)).status, 200);
          assert.match(p.out(), /warning +listening on 0\.0\.0\.0 without TOKENWATCH_API_KEY/);
          assert.ok(p.out().includes(`  dashboard  http://127.0.0.1:${started}/`), "a wildcard listener shows a dashboard address that opens");
          p.child.kill("SIGTERM");
          assert.equal((await p.closed).code, 0);
        });
      });
    });

    describe("import and run", () => {
      it("importing the file starts nothing", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        // A server would keep the process alive, so a prompt exit is the proof.
        const code = `const m = await import(${JSON.stringify(pathToFileURL(FILE).href)}); console.log("imported", m.VERSION, typeof m.start);`;
        const p = launch(bin, rt.evaluate(code), { TOKENWATCH_DB: join(home, "never.db") });
        const { code: exit } = await within(15_000, p.closed, "the importing process's exit");
        assert.equal(exit, 0, p.err());
        assert.equal(p.out(), `imported ${VERSION} function\n`);
        assert.equal(existsSync(join(home, "never.db")), false);
      });

      it("running it through a symlink starts it", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        const dir = mkdtempSync(join(tmpdir(), "tw-cli-link-"));
        let p: Proc | undefined;
        try {
          const link = join(dir, "tw.ts");
          symlinkSync(FILE, link);
          p = runFile(rt, bin, ["--port", "0", "--db", ":memory:"], {}, link);
          const port = await listening(p);
          assert.deepEqual(await (await fetch(`http://127.0.0.1:${port}/health`)).json(), { status: "ok" });
          p.child.kill("SIGTERM");
          assert.equal((await p.closed).code, 0);
        } finally { reap(p); rmSync(dir, { recursive: true, force: true }); }
      });

      it("answers /health and a chat completion through a provider, then exits 0 on SIGTERM with the row written", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withUpstream(rt, bin, async (up, start) => {
          const p = start(["--port", "0", "--db", up.db]);
          const port = await listening(p);
          assert.deepEqual(await (await fetch(`http://127.0.0.1:${port}/health`)).json(), { status: "ok" });
          const res = await chat(port);
          assert.equal(res.status, 200);
          const body = await res.json() as { routing: { provider: string }; choices: { message: { content: string } }[] };
          assert.equal(body.routing.provider, "openai");
          assert.equal(typeof body.choices[0].message.content, "string");
          p.child.kill("SIGTERM");
          assert.deepEqual(await p.closed, { code: 0, signal: null });
          assert.equal(rowsIn(up.db), 1);
        });
      });
    });

    describe("signals", () => {
      it("a closed stdout and stderr (a pipe into head, a closed terminal) do not keep SIGTERM from writing the rows and exiting 0", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withUpstream(rt, bin, async (up, start) => {
          const p = start(["--port", "0", "--db", up.db]);
          const port = await listening(p);
          assert.equal((await chat(port)).status, 200);
          p.child.stdout!.destroy();
          p.child.stderr!.destroy();
          p.child.kill("SIGTERM");
          assert.deepEqual(await p.closed, { code: 0, signal: null });
          assert.equal(rowsIn(up.db), 1);
        });
      });

      it("SIGTERM lets a request in flight finish with 200, writes its row and exits 0", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withUpstream(rt, bin, async (up, start) => {
          const p = start(["--port", "0", "--db", up.db]);
          const port = await listening(p);
          up.mock.queue({ type: "reply", delayMs: 500 });
          const answer = chat(port);
          await until(() => up.mock.requests.length === 1, "the request reaching the provider");
          p.child.kill("SIGTERM");
          await waitForOutput(p, /SIGTERM: finishing 1 request\(s\) in flight/);
          const res = await answer;
          assert.equal(res.status, 200);
          assert.equal((await res.json() as { model: string }).model, "gpt-4o-mini");
          assert.deepEqual(await p.closed, { code: 0, signal: null });
          assert.equal(rowsIn(up.db), 1);
          assert.match(p.out(), /stopped: 1 row\(s\) written to /);
        });
      });

      it("a second SIGINT exits at once, while a request still hangs", SLOW, async (t) => {
        const bin = need(t, rt); if (!bin) return;
        await withUpstream(rt, bin, async (up, start) => {
          const p = start(["--port", "0", "--db", up.db]);
          const port = await listening(p);
          up.mock.queue({ type: "hang" });
          const answer = chat(port).then((r) => r.status, () => "cut off");
          await until(() => up.mock.requests.length === 1, "the request reaching the provider");
          p.child.kill("SIGINT");
          await waitForOutput(p, /SIGINT: finishing 1 request\(s\) in flight/);
          const second = Date.now();
          p.child.kill("SIGINT");
          const { code } = await p.closed;
          assert.equal(code, 130);
          assert.ok(Date.now() - second < 5_000, "it did not wait for the request to drain");
          assert.match(errLines(p).join("\n"), /SIGINT again: exiting now/);
          assert.equal(await answer, "cut off");
        });
      });
    });
  });
}
