// Load: thousands of concurrent requests, a share of them streamed, while every mock provider fails a
// fifth of the time. Bounded in count and time, loopback only. Every request must get a well-formed
// answer, the store must hold exactly one row per request after a restart, and memory must stay flat.
// A second test sends SIGTERM to a real TokenWatch process in the middle of such a load.

import { describe, it } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { DatabaseSync } from "node:sqlite";
import { buildConfig, start, Store } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Mock, Script } from "./mocks.ts";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

const agent = new http.Agent({ keepAlive: true, maxSockets: 400 });
const MODELS = { input: 1, output: 2, limit: 1e12, rpm: 1e9 };
const FILE = {
  max_wait_ms: 3000, timeout_ms: 3000,
  providers: {
    openai: { models: { "gpt-4o-mini": { ...MODELS, tier: "simple" }, "gpt-4o": { ...MODELS, tier: "complex" } } },
    kimi: { models: { "kimi-k2.5": { ...MODELS, tier: "simple" } } },
    anthropic: { models: { "claude-haiku-4-5": { ...MODELS, tier: "simple" } } },
  },
};

/** A fifth of the scripts fail, in every way an upstream can fail quickly. */
function flakyScripts(n: number, rand: () => number): Script[] {
  const failures: Script[] = [
    { type: "error", status: 500 }, { type: "error", status: 529 }, { type: "error", status: 503 },
    { type: "error", status: 429, headers: { "retry-after-ms": "20" } }, { type: "reset" },
    { type: "raw", status: 502, body: "<html>Bad Gateway</html>", headers: { "content-type": "text/html" } },
    { type: "stream-break", afterChunks: 1 }, { type: "stream-error", afterChunks: 1 },
  ];
  return Array.from({ length: n }, () => (rand() < 0.2 ? failures[Math.floor(rand() * failures.length)] : { type: "reply", usage: { input: 20, output: 5 } }));
}

type Answer = { status: number; ok: boolean; why: string };

/** One request, streamed or not, and whether its answer is well formed. */
function request(port: number, i: number): Promise<Answer> {
  const stream = i % 3 === 0;
  const body = JSON.stringify({ complexity: i % 2 ? "simple" : "complex", stream, messages: [{ role: "user", content: `request ${i}` }] });
  return new Promise((done) => {
    const req = http.request({ host: "127.0.0.1", port, method: "POST", path: "/v1/chat/completions", agent, headers: { "content-type": "application/json" } }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => done(judge(res.statusCode!, String(res.headers["content-type"]), Buffer.concat(chunks).toString())));
      res.on("error", (e) => done({ status: res.statusCode!, ok: false, why: e.message }));
    });
    req.on("error", (e) => done({ status: 0, ok: false, why: e.message }));
    req.end(body);
  });
}

function judge(status: number, type: string, text: string): Answer {
  try {
    if (type.startsWith("text/event-stream")) {
      const events = text.split("\n\n").filter(Boolean);
      const last = events.at(-1) ?? "";
      const data = events.map((e) => e.slice(6)).filter((d) => d !== "[DONE]").map((d) => JSON.parse(d));
      const ok = status === 200 && (last === "data: [DONE]" || (data.at(-1)?.error && typeof data.at(-1).error.message === "string"));
      return { status: data.at(-1)?.error ? 502 : status, ok, why: ok ? "" : `stream ended with ${last.slice(0, 100)}` };
    }
    const body = JSON.parse(text);
    const ok = status === 200 ? Array.isArray(body.choices) && typeof body.usage?.cost_usd === "number" : typeof body.error?.message === "string" && [429, 502, 504].includes(status);
    return { status, ok, why: ok ? "" : text.slice(0, 200) };
  } catch (e) {
    return { status, ok: false, why: `${(e as Error).message}: ${text.slice(0, 200)}` };
  }
}

describe("load", () => {
  it("answers thousands of concurrent requests well while providers fail a fifth of the time, and logs each exactly once", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-load-"));
    const db = join(dir, "tw.db");
    let seed = 42;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    const mocks: Mock[] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
    const [openai, kimi, anthropic] = mocks;
    const env = { OPENAI_API_KEY: openai.key, OPENAI_BASE_URL: openai.url, KIMI_API_KEY: kimi.key, KIMI_BASE_URL: kimi.url, ANTHROPIC_API_KEY: anthropic.key, ANTHROPIC_BASE_URL: anthropic.url };
    const tw = await start({ config: buildConfig({ env, file: FILE }), env, db });
    const WAVE = 1000, WAVES = 3;
    for (const m of mocks) m.queue(...flakyScripts(WAVE * WAVES * 2, rand));
    const heap: number[] = [];
    const statuses = new Map<number, number>();
    try {
      for (let w = 0; w < WAVES; w++) {
        const answers = await Promise.all(Array.from({ length: WAVE }, (_, i) => request(tw.port, w * WAVE + i)));
        const bad = answers.filter((a) => !a.ok);
        assert.deepEqual(bad.slice(0, 3), [], `${bad.length} malformed answers in wave ${w}`);
        for (const a of answers) statuses.set(a.status, (statuses.get(a.status) ?? 0) + 1);
        gc();
        heap.push(process.memoryUsage().heapUsed);
      }
      assert.equal(tw.router.inflight, 0);
      assert.ok((statuses.get(200) ?? 0) > WAVE * WAVES * 0.8, `statuses ${JSON.stringify([...statuses])}`);
      // flat: the third wave leaves the heap where the first left it (rows are flushed, nothing is kept per request)
      const growth = heap[2] - heap[0];
      assert.ok(growth < 16 * 1024 * 1024, `heap grew ${(growth / 1048576).toFixed(1)} MB over ${WAVE * 2} requests: ${heap.map((h) => (h / 1048576).toFixed(1)).join(", ")} MB`);
    } finally {
      await tw.close(5000);
      await Promise.all(mocks.map((m) => m.close()));
    }
    const reopened = new Store(db);
    try {
      assert.equal(reopened.count(), WAVE * WAVES);
      assert.equal(reopened.totals(0).requests, WAVE * WAVES);
    } finally {
      reopened.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("finishes in-flight requests on SIGTERM under load, writes every row, and exits 0", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-term-"));
    const db = join(dir, "tw.db");
    const openai = await startMock("openai");
    openai.setDefault({ type: "reply", delayMs: 300 });
    const child = spawn(process.execPath, ["tokenwatch.ts", "--port", "0", "--db", db], {
      cwd: new URL("..", import.meta.url).pathname,
      env: { PATH: process.env.PATH, HOME: dir, OPENAI_API_KEY: openai.key, OPENAI_BASE_URL: openai.url },
      stdio: ["ignore", "pipe", "pipe"],
    });
    try {
      let out = "";
      child.stdout.setEncoding("utf8");
      const port = await new Promise<number>((done, fail) => {
        child.stdout.on("data", (d: string) => { out += d; const m = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(out); if (m) done(Number(m[1])); });
        child.once("exit", (code) => fail(new Error(`exited ${code} before listening: ${out}`)));
      });
      const answers = Array.from({ length: 300 }, (_, i) => request(port, i));
      while (openai.requests.length < 250) await new Promise((r) => setTimeout(r, 10)); // most are in flight upstream
      child.kill("SIGTERM");
      const [code] = await once(child, "exit");
      const done = await Promise.all(answers);
      const answered = done.filter((a) => a.status !== 0);
      assert.equal(code, 0);
      assert.deepEqual(answered.filter((a) => !a.ok).slice(0, 3), []);
      assert.ok(answered.length >= 250, `only ${answered.length} answered`);
      const rows = (new DatabaseSync(db).prepare("SELECT COUNT(*) AS n FROM requests").get() as { n: number }).n;
      assert.equal(rows, answered.length, "one row per answered request");
    } finally {
      child.kill("SIGKILL");
      await openai.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
