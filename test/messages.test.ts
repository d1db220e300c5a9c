// The Anthropic Messages entry (POST /v1/messages, /v1/messages/count_tokens): Claude Code and the Anthropic SDKs
// through TokenWatch to each provider's mock. The real @anthropic-ai/sdk is the client; a request shaped like Claude
// Code's (test/fixtures/claude-code-messages.json) is sent as Claude Code sends it. Routed to Anthropic it passes
// through untouched but for `model`; routed to Kimi or OpenAI it is translated both ways, streams included.

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import Anthropic from "@anthropic-ai/sdk";
import { buildConfig, start, PROVIDERS, pointsAtSelf, withModel, estimateMessagesTokens, route } from "../tokenwatch.ts";
import type { Running, Row } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Flavor, Mock } from "./mocks.ts";

type Env = { tw: Running; mocks: Record<Flavor, Mock>; client: Anthropic; close(): Promise<void> };

async function setup(opts: { file?: Record<string, unknown>; env?: Record<string, string>; only?: Flavor[] } = {}): Promise<Env> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  const mocks = { openai, kimi, anthropic };
  const env: Record<string, string> = { ...opts.env };
  for (const [name, m] of Object.entries(mocks)) {
    if (opts.only && !opts.only.includes(name as Flavor)) continue;
    env[`${name.toUpperCase()}_API_KEY`] = m.key;
    env[`${name.toUpperCase()}_BASE_URL`] = m.url;
  }
  const tw = await start({ config: buildConfig({ env, file: opts.file ?? {} }), env });
  const client = new Anthropic({ baseURL: tw.url, apiKey: env.TOKENWATCH_API_KEY ?? "unused", maxRetries: 0 });
  return { tw, mocks, client, close: async () => { await tw.close(1000); await Promise.all(Object.values(mocks).map((m) => m.close())); } };
}

const rows = (e: Env): Row[] => { e.tw.store.flush(); return e.tw.store.recent(1000).reverse(); };
const last = <T>(xs: T[]) => xs[xs.length - 1];
const hello = [{ role: "user" as const, content: "Say hello." }];
const post = (e: Env, path: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${e.tw.url}${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: typeof body === "string" ? body : JSON.stringify(body) });

/** The Claude Code request of the fixture, its thinking re-signed by this Anthropic mock (the fixture's signatures are made up). */
function claudeCode(anthropic: Mock, model?: string): { headers: Record<string, string>; text: string; body: any } {
  const f = JSON.parse(readFileSync(new URL("./fixtures/claude-code-messages.json", import.meta.url), "utf8"));
  for (const m of f.body.messages) if (Array.isArray(m.content)) for (const b of m.content) if (b.type === "thinking") b.signature = anthropic.sign(b.thinking);
  if (model) f.body.model = model;
  const { authorization: _, ...headers } = f.headers;
  return { headers, text: JSON.stringify(f.body, null, 1), body: f.body }; // spaced like no encoder of TokenWatch's: the bytes must go up as they are
}

// ============================================================================================
describe("messages: the Anthropic SDK through TokenWatch to each provider", () => {
  let e: Env;
  before(async () => { e = await setup(); });
  after(() => e.close());

  for (const [model, provider] of [["claude-haiku-4-5", "anthropic"], ["kimi-k2.5", "kimi"], ["gpt-4o-mini", "openai"]] as const) {
    it(`messages.create() and messages.stream().finalMessage() to ${provider} (${model})`, async () => {
      const a = await e.client.messages.create({ model, max_tokens: 200, messages: hello });
      assert.equal(a.type, "message");
      assert.equal(a.role, "assistant");
      assert.equal(a.model, model, "the model that answered");
      assert.match((a.content[0] as { text: string }).text, new RegExp(`Hello from ${model}`));
      assert.equal(a.stop_reason, "end_turn");
      assert.ok(a.usage.input_tokens > 0 && a.usage.output_tokens > 0);
      const s = await e.client.messages.stream({ model, max_tokens: 200, messages: hello }).finalMessage();
      assert.match((s.content[0] as { text: string }).text, new RegExp(`Hello from ${model}`));
      assert.equal(s.stop_reason, "end_turn");
      assert.ok(s.usage.output_tokens > 0);
      const [r1, r2] = rows(e).slice(-2);
      for (const r of [r1, r2]) assert.deepEqual([r.entry, r.provider, r.model, r.status], ["messages", provider, model, 200]);
      assert.equal(r2.stream, 1 as never);
      assert.ok(r1.cost_usd > 0);
    });

    it(`a tool round trip to ${provider}: tool_use, then tool_result, then text`, async () => {
      const mock = e.mocks[provider];
      mock.queue({ type: "reply", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Paris\"}" }] }, { type: "reply", text: "It is sunny in Paris." });
      const tools = [{ name: "get_weather", description: "Weather of a city", input_schema: { type: "object" as const, properties: { city: { type: "string" } }, required: ["city"] } }];
      const ask = { role: "user" as const, content: "Weather in Paris?" };
      const first = await e.client.messages.stream({ model, max_tokens: 300, tools, messages: [ask] }).finalMessage();
      assert.equal(first.stop_reason, "tool_use");
      const use = first.content.find((b) => b.type === "tool_use") as { id: string; name: string; input: unknown };
      assert.deepEqual([use.name, use.input], ["get_weather", { city: "Paris" }]);
      assert.match(use.id, /^[a-zA-Z0-9_-]+$/, "an id Anthropic would take back");
      const second = await e.client.messages.create({ model, max_tokens: 300, tools, messages: [ask, { role: "assistant", content: first.content }, { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "sunny, 24 °C" }] }] });
      assert.equal((second.content[0] as { text: string }).text, "It is sunny in Paris.");
      const sent = last(mock.requests).body;
      if (provider === "anthropic") assert.equal(sent.messages[2].content[0].type, "tool_result");
      else assert.deepEqual(sent.messages.slice(-1)[0], { role: "tool", tool_call_id: use.id, content: "sunny, 24 °C" });
    });
  }

  it("thinking blocks and their signatures survive a passthrough round trip", async () => {
    const { anthropic } = e.mocks;
    anthropic.queue({ type: "reply", thinking: "The user wants the weather; call the tool.", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Oslo\"}" }] }, { type: "reply", text: "Cold." });
    const tools = [{ name: "get_weather", input_schema: { type: "object" as const, properties: { city: { type: "string" } } } }];
    const thinking = { type: "enabled" as const, budget_tokens: 1024 };
    const ask = { role: "user" as const, content: "Weather in Oslo?" };
    const first = await e.client.messages.stream({ model: "claude-sonnet-5", max_tokens: 2000, thinking, tools, messages: [ask] }).finalMessage();
    const block = first.content[0] as { type: string; thinking: string; signature: string };
    assert.equal(block.type, "thinking");
    assert.equal(block.signature, anthropic.sign(block.thinking), "the signature came through byte for byte");
    const use = first.content.find((b) => b.type === "tool_use") as { id: string };
    const second = await e.client.messages.create({ model: "claude-sonnet-5", max_tokens: 2000, thinking, tools, messages: [ask, { role: "assistant", content: first.content }, { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "-3 °C" }] }] });
    assert.equal((second.content[0] as { text: string }).text, "Cold.", "the mock checked the signature and took it");
  });

  it("Kimi's reasoning comes back as a thinking block TokenWatch signed; sent back, Kimi gets it again and Anthropic never sees it", async () => {
    const { kimi, anthropic } = e.mocks;
    kimi.queue({ type: "reply", reasoning: "Look it up first.", tool_calls: [{ name: "lookup", arguments: "{\"q\":\"x\"}" }] }, { type: "reply", text: "Found." });
    const tools = [{ name: "lookup", input_schema: { type: "object" as const, properties: { q: { type: "string" } } } }];
    const ask = { role: "user" as const, content: "Find x." };
    const first = await e.client.messages.stream({ model: "kimi-k2.5", max_tokens: 500, tools, messages: [ask] }).finalMessage();
    const t = first.content[0] as { type: string; thinking: string; signature: string };
    assert.deepEqual([t.type, t.thinking], ["thinking", "Look it up first."]);
    assert.match(t.signature, /^tw:kimi/);
    const use = first.content.find((b) => b.type === "tool_use") as { id: string };
    const history = [ask, { role: "assistant" as const, content: first.content }, { role: "user" as const, content: [{ type: "tool_result" as const, tool_use_id: use.id, content: "x = 42" }] }];
    await e.client.messages.create({ model: "kimi-k2.5", max_tokens: 500, tools, messages: history });
    assert.equal(last(kimi.requests).body.messages[1].reasoning_content, "Look it up first.", "Kimi gets its reasoning back");
    const fromAnthropic = await e.client.messages.create({ model: "claude-haiku-4-5", max_tokens: 500, thinking: { type: "enabled", budget_tokens: 1024 }, tools, messages: history });
    assert.equal(fromAnthropic.type, "message");
    const sent = last(anthropic.requests).body;
    assert.ok(!JSON.stringify(sent).includes("tw:kimi"), "TokenWatch's own thinking is not sent to Anthropic");
    assert.equal(sent.thinking, undefined, "thinking is off for a tool turn that lost its thinking");
  });

  it("countTokens(): Anthropic's own count when Anthropic is enabled, and it spends no rate-limit window", async () => {
    const before = e.tw.router.limiter.headroom(e.tw.config.models.find((m) => m.id === "claude-haiku-4-5")!, Date.now()).requests;
    const body = { model: "claude-haiku-4-5", system: "Be brief.", messages: hello };
    const n = await e.client.messages.countTokens(body);
    const res = await post(e, "/v1/messages/count_tokens", body);
    assert.equal(res.headers.get("x-tokenwatch-count"), "anthropic");
    assert.deepEqual(await res.json(), { input_tokens: n.input_tokens });
    assert.equal(last(e.mocks.anthropic.requests).path, "/v1/messages/count_tokens");
    assert.equal(e.tw.router.limiter.headroom(e.tw.config.models.find((m) => m.id === "claude-haiku-4-5")!, Date.now()).requests, before);
  });

  it("countTokens(): when Anthropic cannot count (404, 500) a local estimate over every block, marked as such", async () => {
    const body = { model: "claude-sonnet-5", system: "s", tools: [{ name: "f", input_schema: { type: "object" } }], messages: [{ role: "user", content: [{ type: "text", text: "hello world" }, { type: "image", source: { type: "base64", media_type: "image/png", data: "iVBORw0KGgo=" } }] }] };
    for (const status of [404, 500]) {
      e.mocks.anthropic.queueCount({ type: "error", status });
      const res = await post(e, "/v1/messages/count_tokens", body);
      assert.equal(res.headers.get("x-tokenwatch-count"), "estimate", String(status));
      const { input_tokens } = await res.json() as { input_tokens: number };
      assert.equal(input_tokens, estimateMessagesTokens(body));
      assert.ok(input_tokens > 1600, "the image counts");
    }
  });

  it("names the model that really answered a Claude model id the table lacks, priced by its family, and a dated id by its base", async () => {
    for (const [asked, base] of [["claude-opus-5-5", "claude-opus-5"], ["claude-haiku-4-5-20251001", "claude-haiku-4-5"], ["claude-sonnet-5-5", "claude-sonnet-5"]]) {
      const r = await post(e, "/v1/messages", { model: asked, max_tokens: 100, messages: hello });
      assert.equal(r.status, 200, asked);
      assert.equal(r.headers.get("x-tokenwatch-model"), asked);
      const answer = await r.json() as { model: string; usage: { input_tokens: number; output_tokens: number } };
      assert.equal(answer.model, asked);
      assert.equal(last(e.mocks.anthropic.requests).body.model, asked, "sent to Anthropic as it is");
      const row = last(rows(e));
      assert.equal(row.model, asked);
      const price = PROVIDERS.anthropic.models[base];
      assert.equal(row.cost_usd, Math.round((answer.usage.input_tokens * price.input + answer.usage.output_tokens * price.output) / 1e6 * 1e12) / 1e12);
    }
  });

  it("takes the complexity hint from x-tokenwatch-complexity and routes \"model\": \"auto\"", async () => {
    const a = await post(e, "/v1/messages", { model: "claude-opus-5", max_tokens: 50, messages: hello }, { "x-tokenwatch-complexity": "simple" });
    assert.equal(a.headers.get("x-tokenwatch-model"), "gpt-4o-mini", "cheapest first");
    const b = await post(e, "/v1/messages", { model: "auto", max_tokens: 50, messages: [{ role: "user", content: "Refactor and debug this architecture step by step: ```function f(){}```" }] });
    assert.equal(b.headers.get("x-tokenwatch-complexity"), "complex");
    assert.equal(last(rows(e)).requested_model, "auto");
  });

  it("keeps a request with Anthropic server tools on Anthropic", async () => {
    const r = await post(e, "/v1/messages", { model: "gpt-4o", max_tokens: 100, tools: [{ type: "web_search_20250305", name: "web_search", max_uses: 3 }], messages: hello });
    assert.equal(r.status, 200);
    assert.equal(r.headers.get("x-tokenwatch-provider"), "anthropic");
    assert.equal(last(rows(e)).failover, null, "no other provider was tried");
  });

  it("refuses with 508 a request that came back into TokenWatch, on both routes", async () => {
    for (const path of ["/v1/messages", "/v1/messages/count_tokens"]) {
      const r = await post(e, path, { model: "claude-haiku-4-5", max_tokens: 10, messages: hello }, { "x-tokenwatch-hop": "1" });
      assert.equal(r.status, 508, path);
      assert.equal((await r.json() as { type: string }).type, "error");
    }
  });
});

// ============================================================================================
describe("messages: a request shaped like Claude Code's", () => {
  let e: Env;
  before(async () => { e = await setup(); });
  after(() => e.close());

  it("goes to Anthropic byte for byte (the model aside), with anthropic-beta and anthropic-version as they came", async () => {
    const { anthropic } = e.mocks;
    const cc = claudeCode(anthropic);
    const r = await post(e, "/v1/messages?beta=true", cc.text, cc.headers);
    assert.equal(r.status, 200, await r.clone().text());
    await r.text();
    const got = last(anthropic.requests);
    assert.equal(got.raw, cc.text, "the body is the client's own bytes");
    assert.equal(got.headers["anthropic-beta"], cc.headers["anthropic-beta"]);
    assert.equal(got.headers["anthropic-version"], cc.headers["anthropic-version"]);
    assert.equal(got.headers["x-api-key"], anthropic.key);
    assert.equal(got.headers.authorization, undefined, "the client's own credentials are not forwarded");
    // an alias of a table model: only the model changes
    const old = claudeCode(anthropic, "claude-opus-4-5");
    assert.equal((await post(e, "/v1/messages?beta=true", old.text, old.headers).then((x) => x.text()), last(anthropic.requests).raw), withModel(old.text, "claude-opus-5"));
    assert.equal(last(anthropic.requests).raw.replace('"model": "claude-opus-5"', '"model": "claude-opus-4-5"'), old.text);
  });

  for (const [model, flavor] of [["kimi-k2.5", "kimi"], ["gpt-4o", "openai"]] as const)
    it(`is accepted by ${flavor}'s strict mock when routed there, and streams back in Anthropic's order`, async () => {
      const mock = e.mocks[flavor];
      const cc = claudeCode(e.mocks.anthropic, model);
      mock.queue({ type: "reply", text: "On it.", tool_calls: [{ name: "Bash", arguments: "{\"command\":\"ls\"}" }], ...(flavor === "kimi" ? { reasoning: "List the files." } : {}) });
      const r = await post(e, "/v1/messages?beta=true", cc.text, cc.headers);
      const text = await r.text();
      assert.equal(r.status, 200, text);
      assert.equal(r.headers.get("x-tokenwatch-provider"), flavor);
      const sent = last(mock.requests).body;
      assert.equal(sent.tools.length, 12);
      assert.ok(sent.messages.some((m: { role: string }) => m.role === "system"));
      const events = text.split("\n\n").filter(Boolean).map((b) => ({ name: /^event: (.+)$/m.exec(b)?.[1], data: JSON.parse(/^data: (.+)$/m.exec(b)![1]) }));
      for (const ev of events) assert.equal(ev.name, ev.data.type, "every event has its event: line");
      assert.equal(events[0].name, "message_start");
      assert.equal(events.filter((x) => x.name === "message_start").length, 1);
      const starts = events.filter((x) => x.name === "content_block_start").map((x) => x.data.index);
      assert.deepEqual(starts, starts.map((_, i) => i), "blocks indexed 0, 1, 2… in start order");
      let open = -1;
      for (const ev of events) {
        if (ev.name === "content_block_start") { assert.equal(open, -1, "one block open at a time"); open = ev.data.index; }
        if (ev.name === "content_block_delta") assert.equal(ev.data.index, open);
        if (ev.name === "content_block_stop") { assert.equal(ev.data.index, open); open = -1; }
      }
      const delta = events.find((x) => x.name === "message_delta")!.data;
      assert.equal(delta.delta.stop_reason, "tool_use");
      assert.ok(delta.usage.output_tokens > 0);
      assert.equal(last(events).name, "message_stop");
      assert.ok(events.some((x) => x.data.delta?.type === "input_json_delta"));
    });

  it("fails over from Anthropic (529) to Kimi in the middle of a session, before the first byte, and comes back", async () => {
    const f = await setup({ file: { providers: { openai: { models: {} }, anthropic: { models: { "claude-opus-5": PROVIDERS.anthropic.models["claude-opus-5"] } }, kimi: { models: { "kimi-k2.5": { ...PROVIDERS.kimi.models["kimi-k2.5"], tier: "complex" } } } } } });
    try {
      const { anthropic, kimi } = f.mocks;
      const cc = claudeCode(anthropic);
      anthropic.queue({ type: "reply", thinking: "Read the file.", tool_calls: [{ name: "Read", arguments: "{\"file_path\":\"/a.ts\"}" }] });
      const turn1 = await f.client.messages.stream({ ...cc.body }, { headers: { "anthropic-beta": cc.headers["anthropic-beta"] } }).finalMessage();
      assert.equal(turn1.content[0].type, "thinking");
      const use1 = turn1.content.find((b) => b.type === "tool_use") as { id: string };
      const history = [...cc.body.messages, { role: "assistant", content: turn1.content }, { role: "user", content: [{ type: "tool_result", tool_use_id: use1.id, content: "export const a = 1;" }] }];
      anthropic.queue({ type: "error", status: 529 });
      kimi.queue({ type: "reply", reasoning: "Now edit it.", tool_calls: [{ name: "Edit", arguments: "{\"file_path\":\"/a.ts\",\"old_string\":\"1\",\"new_string\":\"2\"}" }] });
      const turn2 = await f.client.messages.stream({ ...cc.body, messages: history }, { headers: { "anthropic-beta": cc.headers["anthropic-beta"] } }).finalMessage();
      assert.equal(last(rows(f)).provider, "kimi");
      assert.match(last(rows(f)).failover ?? "", /529/);
      assert.equal((turn2.content.find((b) => b.type === "tool_use") as { name: string }).name, "Edit");
      const use2 = turn2.content.find((b) => b.type === "tool_use") as { id: string };
      const back = [...history, { role: "assistant", content: turn2.content }, { role: "user", content: [{ type: "tool_result", tool_use_id: use2.id, content: "ok" }] }];
      anthropic.queue({ type: "reply", text: "Done." });
      const turn3 = await f.client.messages.stream({ ...cc.body, messages: back }, { headers: { "anthropic-beta": cc.headers["anthropic-beta"] } }).finalMessage();
      assert.equal((turn3.content[0] as { text: string }).text, "Done.", "Anthropic took the history, Kimi's turn included");
    } finally { await f.close(); }
  });
});

// ============================================================================================
describe("messages: errors in Anthropic's shape", () => {
  let e: Env;
  before(async () => { e = await setup({ file: { max_wait_ms: 0 } }); });
  after(() => e.close());

  const shape = async (r: Response, status: number, type: string) => {
    assert.equal(r.status, status);
    const body = await r.json() as { type: string; error: { type: string; message: string } };
    assert.equal(body.type, "error");
    assert.equal(body.error.type, type);
    assert.ok(body.error.message.length > 10);
    return body;
  };

  it("answers bad input, an unknown model and an unknown route in Anthropic's shape", async () => {
    await shape(await post(e, "/v1/messages", { model: "claude-haiku-4-5", messages: hello }), 400, "invalid_request_error");
    const unknown = await shape(await post(e, "/v1/messages", { model: "no-such-model", max_tokens: 5, messages: hello }), 404, "not_found_error");
    assert.match(unknown.error.message, /does not exist here/);
    await shape(await post(e, "/v1/messages/batches", {}), 404, "not_found_error");
    await shape(await post(e, "/v1/messages", "{not json", {}), 400, "invalid_request_error");
    await assert.rejects(e.client.messages.create({ model: "no-such-model", max_tokens: 5, messages: hello }), (err: InstanceType<typeof Anthropic.NotFoundError>) => err.status === 404 && err.type === "not_found_error");
  });

  it("forwards an upstream Anthropic error unchanged (Claude Code's recovery reads its words)", async () => {
    const body = { type: "error", error: { type: "invalid_request_error", message: "messages.1.content.0: Invalid `signature` in `thinking` block" }, request_id: "req_011CX" };
    e.mocks.anthropic.queue({ type: "error", status: 400, body });
    const r = await post(e, "/v1/messages", { model: "claude-haiku-4-5", max_tokens: 5, messages: hello });
    assert.equal(r.status, 400);
    assert.deepEqual(await r.json(), body);
  });

  it("says 429 with retry-after when every candidate is saturated, and 529 overloaded_error when every one is overloaded", async () => {
    const hot = await setup({ file: { max_wait_ms: 0, providers: { openai: { models: {} }, kimi: { models: {} }, anthropic: { models: { "claude-haiku-4-5": { ...PROVIDERS.anthropic.models["claude-haiku-4-5"], rpm: 1 } } } } } });
    hot.mocks.anthropic.rateLimits({ limits: { requests: 1 } }); // the account's own limit, as its headers say it
    try {
      await post(hot, "/v1/messages", { model: "claude-haiku-4-5", max_tokens: 5, messages: hello }).then((x) => x.text());
      const saturated = await post(hot, "/v1/messages", { model: "claude-haiku-4-5", max_tokens: 5, messages: hello });
      assert.ok(Number(saturated.headers.get("retry-after")) >= 1);
      await shape(saturated, 429, "rate_limit_error");
    } finally { await hot.close(); }
    const busy = await setup({ file: { providers: { openai: { models: {} }, kimi: { models: {} }, anthropic: { models: { "claude-haiku-4-5": PROVIDERS.anthropic.models["claude-haiku-4-5"] } } } } });
    try {
      busy.mocks.anthropic.setDefault({ type: "error", status: 529 });
      const overloaded = await post(busy, "/v1/messages", { model: "claude-haiku-4-5", max_tokens: 5, messages: hello });
      await shape(overloaded, 529, "overloaded_error");
    } finally { await busy.close(); }
  });

  it("ends a stream that breaks after its first byte with an Anthropic error event", async () => {
    e.mocks.kimi.queue({ type: "stream-error", afterChunks: 1, message: "engine crashed" });
    const r = await post(e, "/v1/messages", { model: "kimi-k2.5", max_tokens: 50, stream: true, messages: hello });
    const text = await r.text();
    assert.match(text, /event: error\ndata: \{"type":"error","error":\{"type":"api_error","message":"engine crashed"\}\}/);
    await assert.rejects(async () => {
      e.mocks.kimi.queue({ type: "stream-error", afterChunks: 1, message: "engine crashed" });
      await e.client.messages.stream({ model: "kimi-k2.5", max_tokens: 50, messages: hello }).finalMessage();
    }, /engine crashed/);
  });

  it("asks for TOKENWATCH_API_KEY in Anthropic's shape, and takes it as x-api-key or Bearer", async () => {
    const guarded = await setup({ env: { TOKENWATCH_API_KEY: "tw-key-0123456789" } });
    try {
      await shape(await post(guarded, "/v1/messages", { model: "claude-haiku-4-5", max_tokens: 5, messages: hello }), 401, "authentication_error");
      for (const h of [{ "x-api-key": "tw-key-0123456789" }, { authorization: "Bearer tw-key-0123456789" }] as Record<string, string>[])
        assert.equal((await post(guarded, "/v1/messages", { model: "claude-haiku-4-5", max_tokens: 5, messages: hello }, h)).status, 200);
      const sdk = await guarded.client.messages.create({ model: "claude-haiku-4-5", max_tokens: 5, messages: hello });
      assert.equal(sdk.type, "message");
    } finally { await guarded.close(); }
  });
});

// ============================================================================================
describe("messages: routing rules and the log", () => {
  it("a base URL that points at TokenWatch's own address is ignored, and the banner says why", () => {
    assert.equal(pointsAtSelf("http://127.0.0.1:8080", { host: "127.0.0.1", port: 8080 }), true);
    assert.equal(pointsAtSelf("http://localhost:8080/", { host: "127.0.0.1", port: 8080 }), true);
    assert.equal(pointsAtSelf("http://127.0.0.1:9000", { host: "127.0.0.1", port: 8080 }), false);
    assert.equal(pointsAtSelf("https://api.anthropic.com", { host: "127.0.0.1", port: 443 }), false);
    const c = buildConfig({ env: { ANTHROPIC_API_KEY: "k", ANTHROPIC_BASE_URL: "http://localhost:8080" }, listen: { host: "127.0.0.1", port: 8080 } });
    const p = c.providers.find((x) => x.id === "anthropic")!;
    assert.equal(p.baseUrl, "https://api.anthropic.com");
    assert.match(p.note ?? "", /ANTHROPIC_BASE_URL \(http:\/\/localhost:8080\) points at TokenWatch itself: ignored/);
  });

  it("refuses, naming the tools, a request with server tools when Anthropic is not enabled", async () => {
    const e = await setup({ only: ["kimi", "openai"] });
    try {
      const r = await post(e, "/v1/messages", { model: "claude-sonnet-5", max_tokens: 5, tools: [{ type: "web_search_20250305", name: "web_search" }], messages: hello });
      assert.equal(r.status, 400);
      assert.match((await r.json() as { error: { message: string } }).error.message, /server tools only Anthropic can run \(web_search\)/);
    } finally { await e.close(); }
  });

  it("a Claude Code user without an Anthropic key is served by the other providers, in Anthropic's format", async () => {
    const e = await setup({ only: ["kimi", "openai"] });
    try {
      const a = await e.client.messages.create({ model: "claude-sonnet-5-5", max_tokens: 50, messages: hello });
      assert.match((a.content[0] as { text: string }).text, /Hello from (gpt-4o|kimi)/);
      assert.match(route({ model: "claude-sonnet-5-5", messages: [] }, e.tw.config).reason, /unavailable/);
    } finally { await e.close(); }
  });

  it("/stats counts requests per client format, and the recent ones say which", async () => {
    const e = await setup();
    try {
      await e.client.messages.create({ model: "claude-haiku-4-5", max_tokens: 5, messages: hello });
      await post(e, "/v1/chat/completions", { model: "gpt-4o-mini", messages: hello }).then((r) => r.text());
      const s = await (await fetch(`${e.tw.url}/stats`)).json() as { entries: Record<string, number>; recent: { entry: string }[] };
      assert.deepEqual(s.entries, { chat: 1, messages: 1, responses: 0 });
      assert.deepEqual(s.recent.map((r) => r.entry).sort(), ["chat", "messages"]);
    } finally { await e.close(); }
  });

  it("prices Anthropic's 5-minute and 1-hour cache writes apart, and cache reads at their own price", async () => {
    const e = await setup();
    try {
      e.mocks.anthropic.queue({ type: "reply", usage: { input: 100, output: 10, cached: 2000, cache_write: 1000 } });
      const a = await e.client.messages.create({ model: "claude-sonnet-5", max_tokens: 50, messages: hello });
      assert.equal(a.usage.cache_read_input_tokens, 2000);
      const s = PROVIDERS.anthropic.models["claude-sonnet-5"];
      assert.equal(last(rows(e)).cost_usd, Math.round((100 * s.input + 2000 * s.cached_input! + 1000 * s.cache_write! + 10 * s.output) / 1e6 * 1e12) / 1e12);
    } finally { await e.close(); }
  });
});
