// Auto routing beyond one request's words. Sessions and the warm prompt cache: an agent session sends the same prefix
// every turn, and moving it to another model throws that cache away. Unit tests of the rules with an injected clock
// (keep the warm model while it is the cheaper choice, never drop a session's tier on the classifier's say-so, expire
// with the cache), then a ten-turn agent session through the Anthropic mock, compared with the same turns routed one
// by one. And the optional second opinion ("classifier": "model") through HTTP with the OpenAI SDK.

import { describe, it } from "node:test";
import assert from "node:assert/strict";
import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";
import { buildConfig, start, PROVIDERS, route, keepWarm, Sessions, classify } from "../tokenwatch.ts";
import type { Running, Row, ChatRequest, Model, SessionState } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Flavor, Mock } from "./mocks.ts";

const env = { ANTHROPIC_API_KEY: "a", KIMI_API_KEY: "k", OPENAI_API_KEY: "o" };
const config = buildConfig({ env });
const model = (key: string): Model => config.models.find((m) => m.key === key)!;
const state = (key: string, prefix: number, capable = false): SessionState => ({ model: key, prefix, capable, at: 0 });
const ask = (text: string, extra: Partial<ChatRequest> = {}): ChatRequest => ({ model: "auto", messages: [{ role: "user", content: text }], ...extra });

describe("sessions: the rules (pure, injected clock)", () => {
  it("keeps the warm model first while its cached prefix makes it the cheaper choice, and says so", () => {
    const r = route(ask("thanks, that works"), config); // simple: gpt-4o-mini first, the cheapest
    assert.equal(r.candidates[0].id, "gpt-4o-mini");
    // 40,000 of 42,000 prompt tokens cached on kimi-k2.5: $0.1/M cached beats gpt-4o-mini's $0.15/M at full price
    const kept = keepWarm(r, { state: state("kimi/kimi-k2.5", 40_000), prompt: 42_000, output: 300 });
    assert.equal(kept.candidates[0].key, "kimi/kimi-k2.5");
    assert.deepEqual(new Set(kept.candidates), new Set(r.candidates), "the same candidates, reordered");
    assert.match(kept.reason, /kept for cache on kimi-k2\.5: about \$0\.0061 with 40,000 tokens cached, against \$0\.0065 on gpt-4o-mini/);
    // with little cached, full price elsewhere is cheaper: it moves
    const moved = keepWarm(r, { state: state("kimi/kimi-k2.5", 1_000), prompt: 42_000, output: 300 });
    assert.equal(moved.candidates[0].id, "gpt-4o-mini");
    assert.match(moved.reason, /moved: gpt-4o-mini at full price \(about \$0\.0065\) is cheaper than kimi-k2\.5 with its cache \(about \$0\.0256\)/);
    assert.match(keepWarm(r, { state: state("openai/gpt-4o-mini", 10), prompt: 500, output: 10 }).reason, /kept for cache on gpt-4o-mini$/);
    const mini = { complexity: "simple" as const, reason: "x", candidates: [model("openai/gpt-4o-mini")] }; // as when only OpenAI can serve a request
    assert.match(keepWarm(mini, { state: state("anthropic/claude-opus-5", 9_000), prompt: 10_000, output: 10 }).reason, /moved: anthropic\/claude-opus-5, which holds this session's cache, is not a candidate/);
  });

  it("never lowers a session's tier once a turn needed the capable one, unless the client asks", () => {
    const warm = { state: state("anthropic/claude-sonnet-5", 20_000, true), prompt: 21_000, output: 500 };
    const r = route(ask("thanks, that works"), config, undefined, { warm });
    assert.equal(r.complexity, "complex");
    assert.equal(r.candidates[0].id, "claude-sonnet-5");
    assert.match(r.reason, /^auto: complex, as an earlier turn of this session needed the capable tier; this turn alone would be simple.*kept for cache on claude-sonnet-5/);
    const asked = route(ask("thanks, that works", { complexity: "simple" }), config, undefined, { warm });
    assert.equal(asked.complexity, "simple", "the client's own hint is obeyed");
    const fresh = route(ask("thanks, that works"), config, undefined, { warm: { ...warm, state: { ...warm.state, capable: false } } });
    assert.equal(fresh.complexity, "simple");
    assert.equal(route(ask("thanks", { model: "gpt-4o" }), config, undefined, { warm }).candidates[0].id, "gpt-4o", "a named model is not moved");
    const cheapWarm = { ...warm, state: state("openai/gpt-4o-mini", 20_000) };
    const hard = route(ask("thanks", { complexity: "complex" }), config, undefined, { warm: cheapWarm });
    assert.equal(hard.candidates[0].id, "claude-sonnet-5", "a cheap model's cache does not jump ahead of the capable tier");
    assert.match(hard.reason, /moved: gpt-4o-mini, which holds this session's cache, is not a capable model/);
  });

  it("forgets a session once the cache would have expired, and holds a bounded number", () => {
    const s = new Sessions(300_000, 3);
    const m = model("anthropic/claude-sonnet-5");
    s.remember("a", m, 10_000, true, 0);
    assert.equal(s.get("a", 299_000)?.prefix, 10_000);
    assert.equal(s.get("a", 300_001), undefined);
    for (const id of ["b", "c", "d", "e"]) s.remember(id, m, 1, false, 1000);
    assert.equal(s.size, 3);
    assert.equal(s.get("b", 1000), undefined, "the oldest went first");
    s.remember("c", model("kimi/kimi-k2.5"), 5, false, 2000);
    assert.deepEqual(s.get("c", 2000), { model: "kimi/kimi-k2.5", prefix: 5, capable: false, at: 2000 });
    new Sessions(0).remember("x", m, 1, false, 0); // 0: sessions off
  });
});

// ============================================================================================
const SYSTEM = `You are an autonomous coding agent working in the repository at /home/dev/app. ${"Follow the repository's conventions, run the tests after every change, and explain what you changed. ".repeat(420)}`;
const TURNS = [
  "The integration tests fail only on CI with a timeout in the orders suite, never locally. Find out why.",
  "ok, rename the helper waitForOrders to awaitOrders",
  "Why does the retry in fetchOrders still time out after your change? It should back off.",
  "thanks",
  "add a log line when the retry gives up",
  "Design a way to make the orders suite independent of the shared database so this cannot happen again.",
  "yes",
  "fix the typo in the README heading",
  "continue",
  "thanks, commit it",
];

type Env = { tw: Running; mocks: Record<Flavor, Mock>; close(): Promise<void> };
async function setup(file: Record<string, unknown> = {}, tables = true): Promise<Env> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  const mocks = { openai, kimi, anthropic };
  const e: Record<string, string> = {};
  for (const [name, m] of Object.entries(mocks)) { e[`${name.toUpperCase()}_API_KEY`] = m.key; e[`${name.toUpperCase()}_BASE_URL`] = m.url; }
  const providers = {
    anthropic: { models: { "claude-sonnet-5": PROVIDERS.anthropic.models["claude-sonnet-5"] } },
    kimi: { models: { "kimi-k2.5": PROVIDERS.kimi.models["kimi-k2.5"] } },
    openai: { models: {} },
  };
  const tw = await start({ config: buildConfig({ env: e, file: { ...(tables ? { providers } : {}), ...file } }), env: e });
  return { tw, mocks, close: async () => { await tw.close(1000); await Promise.all(Object.values(mocks).map((m) => m.close())); } };
}

/** Ten turns of one agent conversation through the Anthropic SDK, as Claude Code sends them (cache marks included); `session` per turn. */
async function play(e: Env, session: (turn: number) => string): Promise<{ rows: Row[]; reasons: string[] }> {
  const client = new Anthropic({ baseURL: e.tw.url, apiKey: "unused", maxRetries: 0 });
  const history: Anthropic.MessageParam[] = [];
  const reasons: string[] = [];
  for (const [i, text] of TURNS.entries()) {
    history.push({ role: "user", content: [{ type: "text", text, cache_control: { type: "ephemeral" } }] });
    const { data, response } = await client.messages.create({ model: "auto", max_tokens: 200, system: [{ type: "text", text: SYSTEM, cache_control: { type: "ephemeral" } }], messages: history },
      { headers: { "x-claude-code-session-id": session(i) } }).withResponse();
    reasons.push(`${response.headers.get("x-tokenwatch-model")}: ${response.headers.get("x-tokenwatch-reason")}`);
    const last = history[history.length - 1];
    last.content = [{ type: "text", text }]; // Claude Code moves its cache mark to the newest message
    history.push({ role: "assistant", content: data.content.filter((b) => b.type === "text").map((b) => ({ type: "text" as const, text: (b as Anthropic.TextBlock).text })) });
  }
  e.tw.store.flush();
  return { rows: e.tw.store.recent(100).reverse(), reasons };
}

describe("sessions: a ten-turn agent session keeps its warm cache", () => {
  it("stays on the model that holds its cache, reading it every turn, and costs less than routing each turn alone", async () => {
    const kept = await setup(), alone = await setup();
    try {
      const a = await play(kept, () => "cc-session-1");
      const b = await play(alone, (i) => `turn-${i}`); // a new session each turn: per-turn routing
      const cost = (rows: Row[]) => rows.reduce((s, r) => s + r.cost_usd, 0);

      assert.ok(a.rows.every((r) => r.status === 200 && r.model === "claude-sonnet-5"), `one model all session: ${a.rows.map((r) => r.model)}`);
      assert.ok(a.rows.slice(1).every((r) => r.cached_tokens > 10_000), "every later turn read the cached prefix");
      assert.ok(a.rows.every((r) => r.complexity === "complex"), "the first turn needed the capable tier: the session stays there");
      assert.ok(a.reasons.slice(1).every((x) => /kept for cache on claude-sonnet-5/.test(x)), a.reasons.join("\n"));
      assert.ok(a.reasons.some((x) => /earlier turn of this session needed the capable tier/.test(x)));

      const models = new Set(b.rows.map((r) => r.model));
      assert.deepEqual(models, new Set(["claude-sonnet-5", "kimi-k2.5"]), "routed alone, the simple turns go to the cheap model");
      const saved = 1 - cost(a.rows) / cost(b.rows);
      console.log(`ten turns: $${cost(a.rows).toFixed(5)} kept for cache, $${cost(b.rows).toFixed(5)} routed turn by turn: ${(100 * saved).toFixed(1)}% saved`);
      assert.ok(saved > 0.1, `kept for cache costs less: ${cost(a.rows)} against ${cost(b.rows)}`);
    } finally { await kept.close(); await alone.close(); }
  });
});

// ============================================================================================
describe("auto routing: a second opinion when the classifier is unsure", () => {
  const unsure = "speed up the dashboard for users with many projects";
  const sure = "Translate 'good morning' into German";

  it("asks the cheapest model for a one-word verdict, follows it, and logs its cost against the request", async () => {
    assert.equal(classify({ messages: [{ role: "user", content: unsure }] }).unsure, true, "the request the test needs: one the classifier is unsure about");
    const e = await setup({ classifier: "model" }, false);
    e.mocks.openai.queue({ type: "reply", text: "complex", usage: { input: 300, output: 1 } });
    try {
      const client = new OpenAI({ baseURL: `${e.tw.url}/v1`, apiKey: "unused", maxRetries: 0 });
      const pasted = "SECRET-PASTED-MATERIAL ".repeat(20);
      const { data, response } = await client.chat.completions.create({ model: "auto", messages: [{ role: "user", content: `${unsure}:\n\n\`\`\`\n${pasted}\n\`\`\`` }] }).withResponse();
      assert.equal(response.headers.get("x-tokenwatch-complexity"), "complex");
      assert.equal(response.headers.get("x-tokenwatch-model"), "claude-sonnet-5");
      assert.match(response.headers.get("x-tokenwatch-reason") ?? "", /^auto: complex \(second opinion of gpt-4o-mini: complex; the classifier was unsure \(simple, p = 0\.\d\d/);
      const asked = e.mocks.openai.requests.find((r) => r.path.endsWith("/chat/completions"))!;
      assert.equal(asked.body.model, "gpt-4o-mini");
      assert.equal(asked.body.max_completion_tokens, 5);
      assert.match(asked.body.messages[0].content, /Answer with one word/);
      assert.ok(!JSON.stringify(asked.body).includes("SECRET-PASTED-MATERIAL"), "the verdict sees the ask, not what was pasted");
      e.tw.store.flush();
      const row = e.tw.store.recent(1)[0];
      const verdict = (300 * 0.15 + 1 * 0.6) / 1e6;
      assert.ok(Math.abs(row.cost_usd - ((data.usage as unknown as { cost_usd: number }).cost_usd + verdict)) < 1e-12, "the row's cost: the answer's and the verdict's");
    } finally { await e.close(); }
  });

  it("keeps the classifier's verdict when the verdict does not come in time, and asks nothing when the classifier is sure", async () => {
    const e = await setup({ classifier: "model", classifier_timeout_ms: 300 }, false);
    e.mocks.openai.queue({ type: "hang" });
    try {
      const client = new OpenAI({ baseURL: `${e.tw.url}/v1`, apiKey: "unused", maxRetries: 0 });
      const slow = await client.chat.completions.create({ model: "auto", messages: [{ role: "user", content: unsure }] }).withResponse();
      assert.equal(slow.response.headers.get("x-tokenwatch-complexity"), "simple", "the heuristic's verdict stands");
      assert.doesNotMatch(slow.response.headers.get("x-tokenwatch-reason") ?? "", /second opinion/);
      const before = e.mocks.openai.requests.length + e.mocks.kimi.requests.length + e.mocks.anthropic.requests.length;
      await client.chat.completions.create({ model: "auto", messages: [{ role: "user", content: sure }] });
      assert.equal(e.mocks.openai.requests.length + e.mocks.kimi.requests.length + e.mocks.anthropic.requests.length, before + 1, "a sure verdict asks no one");
      await client.chat.completions.create({ model: "auto", complexity: "simple", messages: [{ role: "user", content: unsure }] } as OpenAI.ChatCompletionCreateParamsNonStreaming);
      assert.equal(e.mocks.openai.requests.length + e.mocks.kimi.requests.length + e.mocks.anthropic.requests.length, before + 2, "nor does a hint");
    } finally { await e.close(); }
  });
});
