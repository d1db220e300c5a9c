// Hardening, round two: what a hostile client, a broken upstream and bad luck did to TokenWatch, one
// test per defect, each through the surface that exposed it (an SDK or raw HTTP in front, a scripted
// upstream behind). The upstreams here are small node:http servers that misbehave on purpose; the
// well-behaved providers are the mocks of test/mocks.ts.

import { describe, it } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { once } from "node:events";
import { DatabaseSync } from "node:sqlite";
import OpenAI from "openai";
import { buildConfig, start, classify, Store, PROVIDERS } from "../tokenwatch.ts";
import type { Running, Row } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Mock } from "./mocks.ts";

// ---- a scripted upstream: each request gets the next handler (the last one repeats) ----

type Handler = (req: http.IncomingMessage, res: http.ServerResponse, body: string) => void;
type Upstream = { url: string; root: string; calls: number; bodies: string[]; close(): Promise<void> };

async function upstream(...handlers: Handler[]): Promise<Upstream> {
  const sockets = new Set<net.Socket>();
  const up: Upstream = { url: "", root: "", calls: 0, bodies: [], close: async () => {} };
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString();
      up.bodies.push(body);
      const h = handlers[Math.min(up.calls++, handlers.length - 1)];
      h(req, res, body);
    });
  });
  server.on("connection", (s) => { sockets.add(s); s.on("close", () => sockets.delete(s)); s.on("error", () => {}); });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as net.AddressInfo).port;
  up.root = `http://127.0.0.1:${port}`;
  up.url = `${up.root}/v1`;
  up.close = () => { for (const s of sockets) s.destroy(); return new Promise<void>((r) => server.close(() => r())); };
  return up;
}

const json = (status: number, body: unknown, headers: Record<string, string> = {}): Handler => (_q, res) => {
  const text = typeof body === "string" ? body : JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": String(Buffer.byteLength(text)), ...headers });
  res.end(text);
};
const sse = (events: string[], headers: Record<string, string> = {}): Handler => (_q, res) => {
  res.writeHead(200, { "content-type": "text/event-stream", ...headers });
  for (const e of events) res.write(e);
  res.end();
};
const data = (x: unknown) => `data: ${JSON.stringify(x)}\n\n`;
const ev = (name: string, x: unknown) => `event: ${name}\ndata: ${JSON.stringify(x)}\n\n`;
const chunk = (delta: Record<string, unknown>, extra: Record<string, unknown> = {}) =>
  data({ id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o-mini", choices: [{ index: 0, delta, finish_reason: null }], ...extra });
const completion = (text: string) => ({ id: "c1", object: "chat.completion", created: 1, model: "gpt-4o-mini", choices: [{ index: 0, message: { role: "assistant", content: text }, finish_reason: "stop" }], usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 } });

/** An Anthropic stream whose message_delta reports `output` as its output_tokens (whatever that is). */
const anthropicStream = (output: unknown, input: unknown = 10): string[] => [
  ev("message_start", { type: "message_start", message: { id: "msg_1", type: "message", role: "assistant", model: "claude-haiku-4-5", content: [], stop_reason: null, stop_sequence: null, usage: { input_tokens: input, output_tokens: 1 } } }),
  ev("content_block_start", { type: "content_block_start", index: 0, content_block: { type: "text", text: "" } }),
  ev("content_block_delta", { type: "content_block_delta", index: 0, delta: { type: "text_delta", text: "Hello" } }),
  ev("content_block_stop", { type: "content_block_stop", index: 0 }),
  ev("message_delta", { type: "message_delta", delta: { stop_reason: "end_turn", stop_sequence: null }, usage: { output_tokens: output } }),
  ev("message_stop", { type: "message_stop" }),
];

// ---- TokenWatch in front: gpt-4o-mini at `openai` first for simple work, then kimi-k2.5 at `kimi` ----

const KEY = "sk-hostile-test-key-0123456789abcdef";
const ONLY = (models: Record<string, unknown>) => ({ models });
const mini = PROVIDERS.openai.models["gpt-4o-mini"], k25 = PROVIDERS.kimi.models["kimi-k2.5"], haiku = PROVIDERS.anthropic.models["claude-haiku-4-5"];

type Env = { tw: Running; kimi: Mock; client: OpenAI; close(): Promise<void> };

async function setup(opts: { openai?: string; anthropic?: string; file?: Record<string, unknown>; db?: string; env?: Record<string, string>; tw?: Partial<Parameters<typeof start>[0]> } = {}): Promise<Env> {
  const kimi = await startMock("kimi");
  const env: Record<string, string> = { KIMI_API_KEY: kimi.key, KIMI_BASE_URL: kimi.url, ...opts.env };
  if (opts.openai) Object.assign(env, { OPENAI_API_KEY: KEY, OPENAI_BASE_URL: opts.openai });
  if (opts.anthropic) Object.assign(env, { ANTHROPIC_API_KEY: KEY, ANTHROPIC_BASE_URL: opts.anthropic });
  const providers = { openai: ONLY(opts.openai ? { "gpt-4o-mini": mini } : {}), anthropic: ONLY(opts.anthropic ? { "claude-haiku-4-5": haiku } : {}), kimi: ONLY({ "kimi-k2.5": k25 }) };
  const file = { ...opts.file, providers: { ...providers, ...(opts.file?.providers as object) } };
  const tw = await start({ config: buildConfig({ env, file }), env, db: opts.db, ...opts.tw });
  const client = new OpenAI({ baseURL: `${tw.url}/v1`, apiKey: "unused", maxRetries: 0 });
  return { tw, kimi, client, close: async () => { await tw.close(1000); await kimi.close(); } };
}

const hi = { model: "gpt-4o-mini", messages: [{ role: "user" as const, content: "hi" }] };
const simple = { complexity: "simple", messages: [{ role: "user", content: "hi" }] };
const post = (e: Env, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${e.tw.url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: typeof body === "string" ? body : JSON.stringify(body) });
const rows = (e: Env): Row[] => { e.tw.store.flush(); return e.tw.store.recent(10_000).reverse(); };
const stats = async (e: Env, q = "") => (await fetch(`${e.tw.url}/stats${q}`)).json() as Promise<any>;

// ============================================================================================
describe("hardening: one request or one upstream answer takes everything down", () => {
  it("#1 a malformed usage number (\"n/a\", negative, 1e308) neither stops logging nor reaches the client as text", async () => {
    const outputs: unknown[] = ["n/a", -500, 1e308, ...Array.from({ length: 17 }, () => "n/a")];
    const up = await upstream(...outputs.map((o) => sse(anthropicStream(o, o === -500 ? -1000 : 10))));
    const e = await setup({ anthropic: up.root, file: { providers: { kimi: ONLY({}), anthropic: ONLY({ "claude-haiku-4-5": { ...haiku, itpm: 1e12, otpm: 1e12 } }) } } }); // a huge count is not what this checks
    try {
      for (let i = 0; i < outputs.length; i++) {
        const stream = await e.client.chat.completions.create({ model: "claude-haiku-4-5", stream: true, stream_options: { include_usage: true }, messages: [{ role: "user", content: "hi" }] });
        let usage: any;
        for await (const c of stream) if (c.usage) usage = c.usage;
        assert.equal(typeof usage.total_tokens, "number", `answer ${i}: ${JSON.stringify(usage)}`);
        assert.ok(Number.isFinite(usage.cost_usd) && usage.cost_usd >= 0, `answer ${i}: cost ${usage.cost_usd}`);
      }
      const logged = rows(e);
      assert.equal(logged.length, 20, "every answered request is stored");
      for (const r of logged) assert.ok(Number.isFinite(r.cost_usd) && r.cost_usd >= 0 && r.output_tokens >= 0 && r.input_tokens >= 0);
      const s = await stats(e, "?window=all");
      assert.equal(typeof s.totals.cost_usd, "number", "the all-time cost stays a number");
      assert.equal(s.totals.requests, 20);
    } finally { await e.close(); await up.close(); }
  });

  it("#1 a row that cannot be written even alone is set aside with the reason, and the others are written", () => {
    const s = new Store(":memory:");
    const row = (status: number): Row => ({ ts: Date.now(), entry: "chat", provider: "openai", model: "gpt-4o-mini", requested_model: "gpt-4o-mini", complexity: "simple", status, stream: false, input_tokens: 1, output_tokens: 1, cached_tokens: 0, cache_write_tokens: 0, cost_usd: 0.1, latency_ms: 1, ttft_ms: null, attempts: 1, failover: null, error: null, error_kind: null, agent: null, session: null });
    for (const st of [200, 200, Number.NaN, 200]) void s.add(row(st)); // NaN binds as NULL: status is NOT NULL
    assert.equal(s.flush(), true);
    assert.equal(s.count(), 3);
    assert.equal(s.setAsideCount, 1);
    assert.match(s.setAside[0].reason, /NOT NULL/i);
    assert.equal(s.pending, 0, "nothing is retried forever");
    void s.add(row(200));
    assert.equal(s.flush(), true);
    assert.equal(s.count(), 4);
    s.close();
  });

  it("#2 an upstream JSON answer larger than max_answer_bytes is refused (502 or failover), declared or chunked, without reading it", async () => {
    const big = "x".repeat(3 * 1024 * 1024);
    const up = await upstream(
      (_q, res) => { res.writeHead(200, { "content-type": "application/json", "content-length": String(512 * 1024 * 1024) }); res.write("{"); }, // declares 512 MB
      (_q, res) => { res.writeHead(200, { "content-type": "application/json" }); res.write(`{"id":"${big}`); res.end(`"}`); }, // chunked, 3 MB
    );
    const e = await setup({ openai: up.url, file: { max_answer_bytes: 1024 * 1024 } });
    try {
      for (let i = 0; i < 2; i++) {
        const r = await e.client.chat.completions.create(simple as never);
        assert.equal((r as any).routing.provider, "kimi", "failed over");
        assert.match((r as any).routing.attempts[0].error, /larger than 1048576 bytes .*max_answer_bytes/);
      }
      assert.match(rows(e)[1].failover ?? "", /502/);
    } finally { await e.close(); await up.close(); }
  });

  it("#3 bodies held at once are bounded: past max_inflight_body_bytes a new one gets 503 with Retry-After, and room comes back", async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => { release = r; });
    const up = await upstream(async (_q, res) => { await gate; json(200, completion("ok"))(_q, res, ""); });
    const roomy = { openai: ONLY({ "gpt-4o-mini": { ...mini, tpm: 1e9 } }) }; // the limiter is not what holds the second body back
    const e = await setup({ openai: up.url, file: { max_body_bytes: 2 * 1024 * 1024, max_inflight_body_bytes: 3 * 1024 * 1024, providers: roomy } });
    try {
      const body = JSON.stringify({ ...hi, messages: [{ role: "user", content: "y".repeat(1400 * 1024) }] });
      const held = [post(e, body), post(e, body)];
      while (up.calls < 2) await new Promise((r) => setTimeout(r, 5));
      const third = await post(e, body);
      assert.equal(third.status, 503);
      assert.equal(third.headers.get("retry-after"), "1");
      assert.match((await third.json()).error.message, /max_inflight_body_bytes/);
      release();
      for (const r of await Promise.all(held)) assert.equal(r.status, 200);
      assert.equal((await post(e, body)).status, 200, "the budget was given back");
    } finally { await e.close(); await up.close(); }
  });

  it("#3 a body of a million empty objects is refused by a cheap scan before it is parsed", async () => {
    const e = await setup();
    try {
      const r = await post(e, `{"messages":[${Array(600_000).fill("{}").join(",")}]}`);
      assert.equal(r.status, 400);
      assert.match((await r.json()).error.message, /more than 500,000 JSON objects and arrays/);
    } finally { await e.close(); }
  });

  it("#4 the auto classifier reads a bounded window with linear patterns: a megabyte of SELECT without FROM is classified at once", { timeout: 5000 }, async () => {
    const selects = "SELECT ".repeat(150_000); // a quadratic pattern would take minutes here
    assert.equal(classify({ messages: [{ role: "user", content: selects }] }).tier, "simple");
    assert.equal(classify({ messages: [{ role: "user", content: `why is this query slow on 10M rows when it was fast last week?\n${selects}` }] }).tier, "complex");
    const e = await setup();
    try {
      const r = await post(e, { model: "auto", messages: [{ role: "user", content: selects }] });
      assert.equal(r.status, 200);
      assert.equal((await fetch(`${e.tw.url}/health`)).status, 200);
    } finally { await e.close(); }
  });

  it("#4 and no turn can make its patterns backtrack: repeated approvals, a 40 KB line of tabs or of one declaration, many such messages", () => {
    // Before a review mended them, these took from seconds (the long lines) to days (40 approvals in a row: the match
    // could split them two ways each). A child process classifies them all; it is stopped if it has not finished in
    // 20 s, where they now take a few milliseconds.
    const script = `
      import { classify } from ${JSON.stringify(new URL("../tokenwatch.ts", import.meta.url).href)};
      const after = (last) => ({ messages: [{ role: "user", content: "add dark mode" }, { role: "assistant", content: "Plan: 1. tokens 2. toggle 3. tests" }, { role: "user", content: last }] });
      const one = (content) => ({ messages: [{ role: "user", content }] });
      const tabs = "a" + "\\t".repeat(39999);
      const reqs = [after("sounds good ".repeat(40) + "x"), after("ja passt ".repeat(40) + "x"), after("go ahead, ".repeat(40) + "x"),
        one(tabs), one("const " + "a".repeat(39994)), one("var " + "{".repeat(39996)),
        { messages: Array.from({ length: 50 }, () => [{ role: "user", content: tabs }, { role: "assistant", content: "ok" }]).flat().concat([{ role: "user", content: "yes" }]) }];
      console.log(reqs.map((r) => classify(r).tier).join(","));`;
    const r = spawnSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8", timeout: 20_000 });
    assert.equal(r.signal, null, "the classifier did not finish: one of its patterns backtracks");
    assert.match(r.stdout, /^((simple|complex),){6}(simple|complex)\n$/, r.stderr);
  });

  it("#5 a model name past 256 characters is refused, and /stats stays readable on a database that holds 5 MB names", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-names-"));
    const db = join(dir, "tw.db");
    new Store(db).close();
    const old = new DatabaseSync(db);
    const long = "m".repeat(5 * 1024 * 1024);
    for (let i = 0; i < 8; i++) old.prepare("INSERT INTO requests (ts, provider, model, requested_model, status, error) VALUES (?, 'kimi', ?, ?, 404, ?)").run(Date.now(), long + i, long + i, `Model "${long}" does not exist`);
    old.prepare("INSERT INTO rollup VALUES (?, 'kimi', ?, 'simple', 'chat', 1, 1, 0, 0, 0, 1e308, 0)").run(Math.floor(Date.now() / 60_000), long);
    old.close();
    const e = await setup({ db });
    try {
      const r = await post(e, { model: "x".repeat(300), messages: [{ role: "user", content: "hi" }] });
      assert.equal(r.status, 400);
      assert.ok((await r.text()).length < 1000, "the refusal does not echo the whole name");
      const s = await fetch(`${e.tw.url}/stats?window=all`);
      assert.equal(s.status, 200);
      const body = await s.json() as any;
      for (const row of body.recent) assert.ok(String(row.model).length <= 256 && String(row.error).length <= 1000);
      for (const m of body.models) assert.ok(m.model.length <= 256);
      assert.equal(typeof body.totals.cost_usd, "number");
    } finally { await e.close(); rmSync(dir, { recursive: true, force: true }); }
  });
});

// ============================================================================================
describe("hardening: keys and trust", () => {
  it("#6 never follows a redirect: the key and the prompt do not reach the other origin", async () => {
    const elsewhere = await upstream(json(200, completion("stolen")));
    const up = await upstream((_q, res) => { res.writeHead(307, { location: `${elsewhere.url}/chat/completions` }); res.end(); });
    const e = await setup({ openai: up.url });
    try {
      const r = await e.client.chat.completions.create(simple as never) as any;
      assert.equal(r.routing.provider, "kimi");
      assert.equal(r.routing.attempts[0].status, 307);
      assert.match(r.routing.attempts[0].error, /does not follow redirects/);
      assert.equal(elsewhere.calls, 0, "nothing reached the other origin");
    } finally { await e.close(); await up.close(); await elsewhere.close(); }
  });

  it("#7 scrubs keys from every field of an upstream error (type, code, a vLLM-style event, a long text body) before cutting it", async () => {
    const up = await upstream(
      json(400, { error: { message: "bad request", type: `type ${KEY}`, code: `code-${KEY}` } }),
      sse([chunk({ role: "assistant", content: "" }), data({ object: "error", message: `engine failed for ${KEY}`, type: KEY, code: 500 })]),
      sse([chunk({ role: "assistant", content: "Hi" }), data({ error: { message: "boom", type: KEY, code: KEY } })]),
      (_q, res) => { res.writeHead(500, { "content-type": "text/plain" }); res.end(`${"e".repeat(190)}${KEY} and more`); },
    );
    const e = await setup({ openai: up.url });
    const prefix = KEY.slice(0, 10); // "sk-hostile": what a cut before the scrub would leave
    try {
      const seen: string[] = [];
      const a = await post(e, hi);
      assert.equal(a.status, 400);
      seen.push(await a.text());
      for (let i = 0; i < 2; i++) seen.push(await (await post(e, { ...hi, stream: true })).text());
      const d = await post(e, simple);
      seen.push(await d.text());
      seen.push(JSON.stringify(await stats(e, "?window=all")), JSON.stringify(rows(e)));
      for (const text of seen) assert.ok(!text.includes(prefix), `a key prefix leaks: ${text.slice(0, 300)}`);
      assert.match(seen[1], /"error"/, "the vLLM-style error is an error event, not relayed raw");
      assert.doesNotMatch(seen[1], /"object":"error"/);
    } finally { await e.close(); await up.close(); }
  });

  it("#8 a 403 for one model rests that model only: the provider's other models keep serving", async () => {
    const refuse = json(403, { error: { message: "Project proj_1 does not have access to model gpt-4o", type: "invalid_request_error", param: null, code: "model_not_found" } });
    const up = await upstream((q, res, body) => (JSON.parse(body).model === "gpt-4o" ? refuse : json(200, completion("ok")))(q, res, body));
    const e = await setup({ openai: up.url, file: { providers: { openai: ONLY({ "gpt-4o-mini": mini, "gpt-4o": PROVIDERS.openai.models["gpt-4o"] }) } } });
    const complex = { complexity: "complex", messages: [{ role: "user", content: "hi" }] } as never; // gpt-4o first, then kimi-k2.5, gpt-4o-mini
    try {
      const first = await e.client.chat.completions.create(complex) as any;
      assert.deepEqual([first.routing.attempts[0].model, first.routing.attempts[0].status, first.routing.model], ["gpt-4o", 403, "kimi-k2.5"]);
      const other = await e.client.chat.completions.create(hi) as any;
      assert.equal(other.routing.provider, "openai", "OpenAI still serves gpt-4o-mini");
      const calls = up.calls;
      const again = await e.client.chat.completions.create(complex) as any;
      assert.equal(again.routing.attempts.length, 1, "gpt-4o itself is not tried while it rests");
      assert.equal(up.calls, calls);
      const s = await stats(e);
      assert.equal(s.providers.find((p: any) => p.provider === "openai").disabled_for_s, 0);
      assert.ok(s.models.find((m: any) => m.model === "gpt-4o").refused_for_s > 0);
    } finally { await e.close(); await up.close(); }
  });
});

// ============================================================================================
describe("hardening: hangs and storms", () => {
  for (const ra of ["0", "-5", new Date(Date.now() - 60_000).toUTCString()])
    it(`#9 a 429 with retry-after ${JSON.stringify(ra)} still cools the model (floor): no retry storm`, async () => {
      const up = await upstream(json(429, { error: { message: "slow down", type: "requests", code: "rate_limit_exceeded" } }, { "retry-after": ra }));
      const e = await setup({ openai: up.url, file: { min_cooldown_ms: 60_000 } });
      try {
        for (let i = 0; i < 8; i++) assert.equal((await e.client.chat.completions.create(simple as never) as any).routing.provider, "kimi");
        assert.equal(up.calls, 1, "one call, then the model rests at least min_cooldown_ms");
      } finally { await e.close(); await up.close(); }
    });

  it("#10 cooldowns have a ceiling (max_cooldown_ms), and /stats says what the provider asked for", async () => {
    const reset = new Date(Date.now() + 99_999 * 3_600_000).toISOString();
    const up = await upstream(
      json(429, { error: { message: "slow down", type: "requests", code: "rate_limit_exceeded" } }, { "retry-after": "999999999" }),
    );
    const anthropic = await upstream(json(200, { id: "msg_1", type: "message", role: "assistant", model: "claude-haiku-4-5", content: [{ type: "text", text: "hi" }], stop_reason: "end_turn", stop_sequence: null, usage: { input_tokens: 3, output_tokens: 1 } },
      { "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset }));
    const e = await setup({ openai: up.url, anthropic: anthropic.root, file: { max_cooldown_ms: 120_000 } });
    try {
      await e.client.chat.completions.create(simple as never);
      await e.client.chat.completions.create({ model: "claude-haiku-4-5", messages: [{ role: "user", content: "hi" }] });
      const s = await stats(e);
      for (const name of ["gpt-4o-mini", "claude-haiku-4-5"]) {
        const m = s.models.find((x: any) => x.model === name);
        assert.equal(m.cooling, true, name);
        assert.ok(m.free_in_s <= 120, `${name} rests ${m.free_in_s} s`);
        assert.ok(m.cooldown_asked_s > 1_000_000, `${name}: the ask is shown`);
      }
    } finally { await e.close(); await up.close(); await anthropic.close(); }
  });

  it("#11 an error body that drips a byte at a time gets timeout_ms in all, then fails over", async () => {
    const drip: Handler = (_q, res) => {
      res.writeHead(500, { "content-type": "application/json" });
      const t = setInterval(() => { if (res.destroyed) clearInterval(t); else res.write("x"); }, 20);
      res.on("close", () => clearInterval(t));
    };
    const up = await upstream(drip);
    const e = await setup({ openai: up.url, file: { timeout_ms: 400 } });
    try {
      const r = await e.client.chat.completions.create(simple as never) as any;
      assert.equal(r.routing.provider, "kimi");
    } finally { await e.close(); await up.close(); }
  });

  it("#11 a stream that drips bytes but never completes an event stalls and fails over before the first byte", async () => {
    const drip: Handler = (_q, res) => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.write("data: {\"id\":\"");
      const t = setInterval(() => { if (res.destroyed) clearInterval(t); else res.write("x"); }, 20);
      res.on("close", () => clearInterval(t));
    };
    const up = await upstream(drip);
    const e = await setup({ openai: up.url, file: { timeout_ms: 400 } });
    try {
      const r = await post(e, { ...simple, stream: true });
      const text = await r.text();
      assert.equal(r.headers.get("x-tokenwatch-provider"), "kimi");
      assert.match(text, /\[DONE\]/);
      assert.match(rows(e)[0].failover ?? "", /timeout/);
    } finally { await e.close(); await up.close(); }
  });

  it("#12 an event that never ends is bounded: before the first byte it fails over, after it the stream ends with an error event", async () => {
    const endless = (first: boolean): Handler => (_q, res) => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      if (first) res.write(chunk({ role: "assistant", content: "Hi" }));
      res.write("data: {\"content\":\"");
      const piece = "a".repeat(64 * 1024);
      const t = setInterval(() => { if (res.destroyed) clearInterval(t); else res.write(piece); }, 1);
      res.on("close", () => clearInterval(t));
    };
    const up = await upstream(endless(false), endless(true));
    const e = await setup({ openai: up.url, file: { max_answer_bytes: 512 * 1024 } });
    try {
      const a = await post(e, { ...simple, stream: true });
      assert.equal(a.headers.get("x-tokenwatch-provider"), "kimi");
      await a.text();
      const b = await post(e, { ...hi, stream: true });
      const text = await b.text();
      assert.match(text, /"content":"Hi"/);
      assert.match(text, /grew past 524288 bytes/);
      assert.equal(rows(e)[1].status, 502);
    } finally { await e.close(); await up.close(); }
  });

  it("#13 a 200 text/html answer to a stream request fails over instead of being relayed as events", async () => {
    const up = await upstream((_q, res) => { res.writeHead(200, { "content-type": "text/html" }); res.end("<html><body>Sign in</body></html>\n\n"); });
    const e = await setup({ openai: up.url });
    try {
      const r = await post(e, { ...simple, stream: true });
      const text = await r.text();
      assert.equal(r.headers.get("x-tokenwatch-provider"), "kimi");
      assert.doesNotMatch(text, /html/i);
      assert.match(rows(e)[0].failover ?? "", /502/);
    } finally { await e.close(); await up.close(); }
  });

  it("#14 a client that pauses reading is not blamed on the upstream: the stream completes", async () => {
    const piece = "z".repeat(16 * 1024);
    const events = [chunk({ role: "assistant", content: "" }), ...Array.from({ length: 400 }, () => chunk({ content: piece })), data({ id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o-mini", choices: [{ index: 0, delta: {}, finish_reason: "stop" }] }), data({ id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o-mini", choices: [], usage: { prompt_tokens: 3, completion_tokens: 400, total_tokens: 403 } }), "data: [DONE]\n\n"];
    const up = await upstream(sse(events));
    const e = await setup({ openai: up.url, file: { timeout_ms: 300 } });
    try {
      const body = JSON.stringify({ ...hi, stream: true });
      const text = await new Promise<string>((done, fail) => {
        const req = http.request(`${e.tw.url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" } }, (res) => {
          res.pause(); // the client reads nothing for well past timeout_ms
          const parts: Buffer[] = [];
          setTimeout(() => { res.on("data", (c) => parts.push(c)); res.on("end", () => done(Buffer.concat(parts).toString())); res.resume(); }, 1000); // > timeout_ms, < 5 × timeout_ms
        });
        req.on("error", fail);
        req.end(body);
      });
      assert.match(text, /\[DONE\]/);
      const row = rows(e)[0];
      assert.equal(row.status, 200);
      assert.equal(row.output_tokens, 400);
    } finally { await e.close(); await up.close(); }
  });
});

// ============================================================================================
describe("hardening: data and edges", () => {
  it("#15 SIGKILL loses no row of an answered request: each is committed before its last byte", async () => {
    const mock = await startMock("openai");
    const dir = mkdtempSync(join(tmpdir(), "tw-kill-"));
    const db = join(dir, "tw.db");
    const child = spawn(process.execPath, ["tokenwatch.ts", "--port", "0", "--db", db], {
      cwd: new URL("..", import.meta.url).pathname, stdio: ["ignore", "pipe", "pipe"],
      env: { PATH: process.env.PATH, HOME: dir, OPENAI_API_KEY: mock.key, OPENAI_BASE_URL: mock.url, KIMI_API_KEY: "", ANTHROPIC_API_KEY: "" },
    });
    try {
      let out = "";
      child.stdout.on("data", (c) => { out += c; });
      while (!/listening on (\S+)\/v1/.test(out)) await once(child.stdout, "data");
      const url = /listening on (\S+)\/v1/.exec(out)![1];
      let answered = 0;
      const one = async (i: number) => {
        const stream = i % 2 === 1;
        const r = await fetch(`${url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "gpt-4o-mini", stream, messages: [{ role: "user", content: `hi ${i}` }] }) });
        const text = await r.text();
        if (r.status === 200 && (stream ? text.includes("[DONE]") : text.includes("choices"))) answered++;
      };
      await Promise.all(Array.from({ length: 200 }, (_, i) => one(i)));
      child.kill("SIGKILL");
      await once(child, "exit");
      assert.equal(answered, 200);
      const stored = (new DatabaseSync(db).prepare("SELECT COUNT(*) AS n FROM requests WHERE status = 200").get() as { n: number }).n;
      assert.equal(stored, answered, "every answered request has its row");
    } finally { if (child.exitCode === null) child.kill("SIGKILL"); await mock.close(); rmSync(dir, { recursive: true, force: true }); }
  });

  it("#16 a deleted database file is noticed, rewritten with every row, and reported in /stats", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-gone-"));
    const db = join(dir, "tw.db");
    const e = await setup({ db });
    try {
      for (let i = 0; i < 3; i++) assert.equal((await post(e, simple)).status, 200);
      for (const f of [db, `${db}-wal`, `${db}-shm`]) rmSync(f, { force: true });
      for (let i = 0; i < 2; i++) assert.equal((await post(e, simple)).status, 200);
      const s = await stats(e, "?window=all");
      assert.match(s.store.file_event, /was deleted .* rewrote it/);
      assert.ok(existsSync(db));
      assert.equal((await post(e, simple)).status, 200);
      await e.close();
      const n = (new DatabaseSync(db).prepare("SELECT COUNT(*) AS n FROM requests").get() as { n: number }).n;
      assert.equal(n, 6, "rows from before and after the deletion");
    } finally { await e.close(); rmSync(dir, { recursive: true, force: true }); }
  });

  it("#17 a usage chunk sent twice: the client's cost_usd and the log agree", async () => {
    const done = (u: number) => data({ id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o-mini", choices: [], usage: { prompt_tokens: u, completion_tokens: u, total_tokens: 2 * u } });
    const up = await upstream(sse([chunk({ role: "assistant", content: "Hi" }), done(10), done(1000), "data: [DONE]\n\n"]));
    const e = await setup({ openai: up.url });
    try {
      const stream = await e.client.chat.completions.create({ ...hi, stream: true, stream_options: { include_usage: true } });
      const usages: any[] = [];
      for await (const c of stream) if (c.usage) usages.push(c.usage);
      assert.equal(usages.length, 1, "one usage chunk reaches the client");
      assert.equal(usages[0].cost_usd, rows(e)[0].cost_usd);
      assert.equal(rows(e)[0].output_tokens, usages[0].completion_tokens);
    } finally { await e.close(); await up.close(); }
  });

  it("#18 a provider/model name that could not be a header is refused before any upstream is paid", async () => {
    const up = await upstream(json(200, completion("paid")));
    const e = await setup({ openai: up.url });
    try {
      for (const model of ["openai/gpt-\u00e9t\u00e9", "openai/gpt-4o\r\nx-evil: 1", "openai/gpt 4o", "openai/\u{1F600}"]) {
        const r = await post(e, { model, messages: [{ role: "user", content: "hi" }] });
        assert.equal(r.status, 400, model);
        assert.equal((await r.json()).error.param, "model");
      }
      assert.equal(up.calls, 0);
    } finally { await e.close(); await up.close(); }
  });

  it("#19 the 413 reaches every client, even one that reads nothing until its 40 MB upload is sent: no reset, declared or chunked", async () => {
    const e = await setup({ file: { max_body_bytes: 1024 * 1024 } });
    const big = Buffer.alloc(40 * 1024 * 1024, 0x20);
    /** A plain client: it sends the whole request, and only then reads what came back. */
    const send = (chunked: boolean) => new Promise<string>((done) => {
      const socket = net.connect(e.tw.port, "127.0.0.1");
      socket.pause();
      const head = `POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:${e.tw.port}\r\ncontent-type: application/json\r\n${chunked ? "transfer-encoding: chunked" : `content-length: ${big.length}`}\r\n\r\n`;
      const parts: Buffer[] = [];
      socket.on("error", (err: NodeJS.ErrnoException) => done(`error ${err.code}`));
      socket.on("data", (c) => parts.push(c)).on("end", () => done(Buffer.concat(parts).toString("latin1")));
      const body = chunked ? Buffer.concat([Buffer.from(`${big.length.toString(16)}\r\n`), big, Buffer.from("\r\n0\r\n\r\n")]) : big;
      socket.write(head);
      socket.write(body, () => socket.resume());
    });
    try {
      const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => send(i === 19)));
      for (const a of answers) assert.match(a.slice(0, 40), /^HTTP\/1\.1 413 /, a.slice(0, 80));
      assert.equal((await post(e, simple)).status, 200);
    } finally { await e.close(); }
  });

  it("#20 slow-loris limits hold to about a second: headers that never finish are cut soon after headersTimeout", async () => {
    const e = await setup({ tw: { receiveTimeouts: { headersTimeout: 500, requestTimeout: 1000 } } });
    try {
      const socket = net.connect(e.tw.port, "127.0.0.1");
      await once(socket, "connect");
      const t0 = Date.now();
      socket.write("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n");
      const drip = setInterval(() => socket.write("x-slow: 1\r\n"), 100);
      socket.on("error", () => {}); // writes after the cut fail: expected
      await new Promise((r) => socket.once("close", r));
      clearInterval(drip);
      assert.ok(Date.now() - t0 < 3000, `cut after ${Date.now() - t0} ms (node's default check would take up to 30 s)`);
    } finally { await e.close(); }
  });

  it("#21 /stats?window= accepts only its own windows, not names from Object.prototype", async () => {
    const e = await setup();
    try {
      for (const w of ["constructor", "__proto__", "toString", "hasOwnProperty"]) assert.equal((await fetch(`${e.tw.url}/stats?window=${w}`)).status, 400, w);
      assert.equal((await post(e, { model: "constructor", messages: [{ role: "user", content: "hi" }] })).status, 404);
    } finally { await e.close(); }
  });

  it("#22 many distinct model names: the limiter's state stays bounded and /stats lists the busiest", async () => {
    const up = await upstream(json(200, completion("ok")));
    const e = await setup({ openai: up.url });
    try {
      for (let i = 0; i < 1500; i += 50) await Promise.all(Array.from({ length: 50 }, (_, j) => post(e, { model: `openai/model-${i + j}`, messages: [{ role: "user", content: "hi" }] }).then((r) => r.arrayBuffer())));
      assert.ok(e.tw.router.limiter.size <= 4, `limiter pools: ${e.tw.router.limiter.size}`);
      const s = await stats(e);
      assert.ok(s.models.length <= e.tw.config.models.length + 30);
      assert.ok(s.models_not_shown >= 1400);
      assert.equal(s.providers.find((p: any) => p.provider === "openai").requests, 1500);
    } finally { await e.close(); await up.close(); }
  });

  it("#23 a model the config defines beats a built-in alias of the same name", async () => {
    const e = await setup({ file: { providers: { kimi: ONLY({ "claude-sonnet-4-5": k25 }) } } });
    try {
      const r = await post(e, { model: "claude-sonnet-4-5", messages: [{ role: "user", content: "hi" }] });
      assert.equal(r.status, 200);
      assert.equal(r.headers.get("x-tokenwatch-model"), "claude-sonnet-4-5");
    } finally { await e.close(); }
  });

  it("#24 the bearer scheme is case-insensitive", async () => {
    const e = await setup({ env: { TOKENWATCH_API_KEY: "tw-secret-key-123" } });
    try {
      for (const scheme of ["bearer", "BEARER", "Bearer"]) assert.equal((await fetch(`${e.tw.url}/stats`, { headers: { authorization: `${scheme} tw-secret-key-123` } })).status, 200, scheme);
      assert.equal((await fetch(`${e.tw.url}/stats`, { headers: { authorization: "bearer wrong" } })).status, 401);
    } finally { await e.close(); }
  });
});
