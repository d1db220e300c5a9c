// The OpenAI Responses entry (POST /v1/responses): Codex, the OpenAI Agents SDK and the openai package's
// responses API through TokenWatch to each provider's mock. Routed to OpenAI it passes through to OpenAI's own
// Responses API; routed to Anthropic or Kimi it is translated both ways, the event stream synthesized in the order
// the clients enforce. A small response store resolves previous_response_id and item_reference across providers.

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import net from "node:net";
import { once } from "node:events";
import OpenAI from "openai";
import { Agent, run, tool, setDefaultOpenAIClient, setOpenAIAPI, setTracingDisabled } from "@openai/agents";
import { buildConfig, start, PROVIDERS, costUsd } from "../tokenwatch.ts";
import type { Running, Row } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Flavor, Mock } from "./mocks.ts";

type Env = { tw: Running; mocks: Record<Flavor, Mock>; client: OpenAI; close(): Promise<void> };

/** gpt-5.4 next to the built-in models: the kind of model Codex asks for (it takes reasoning effort, gpt-4o does not). */
const GPT54 = { input: 2.5, output: 15, cached_input: 0.25, limit: 500_000, rpm: 500, tier: "complex", fixed_sampling: true };

async function setup(opts: { file?: Record<string, any>; only?: Flavor[] } = {}): Promise<Env> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  const mocks = { openai, kimi, anthropic };
  const env: Record<string, string> = {};
  for (const [name, m] of Object.entries(mocks)) {
    if (opts.only && !opts.only.includes(name as Flavor)) continue;
    env[`${name.toUpperCase()}_API_KEY`] = m.key;
    env[`${name.toUpperCase()}_BASE_URL`] = m.url;
  }
  const file = { ...opts.file, providers: { openai: { models: { ...PROVIDERS.openai.models, "gpt-5.4": GPT54 } }, ...opts.file?.providers } };
  const tw = await start({ config: buildConfig({ env, file }), env });
  const client = new OpenAI({ baseURL: `${tw.url}/v1`, apiKey: "unused", maxRetries: 0 });
  return { tw, mocks, client, close: async () => { await tw.close(1000); await Promise.all(Object.values(mocks).map((m) => m.close())); } };
}

const rows = (e: Env): Row[] => { e.tw.store.flush(); return e.tw.store.recent(1000).reverse(); };
const last = <T>(xs: T[]) => xs[xs.length - 1];
const post = (e: Env, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${e.tw.url}/v1/responses`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: typeof body === "string" ? body : JSON.stringify(body) });

/** The Responses events of a stream, each checked for its event: line and sequence number 0, 1, 2… */
function events(text: string): { type: string; data: any }[] {
  const out = text.split("\n\n").filter(Boolean).map((b) => ({ type: /^event: (.+)$/m.exec(b)?.[1] ?? "", data: JSON.parse(/^data: (.+)$/m.exec(b)![1]) }));
  out.forEach((ev, i) => { assert.equal(ev.type, ev.data.type); assert.equal(ev.data.sequence_number, i); });
  return out;
}

const PATCH = "*** Begin Patch\n*** Update File: src/a.ts\n@@\n-export const a = 1;\n+export const a = 2;\n*** End Patch";
const tools = [
  { type: "function" as const, name: "get_weather", description: "Weather of a city", parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"], additionalProperties: false }, strict: false },
  { type: "custom" as const, name: "apply_patch", description: "Apply a patch to the repository" },
];

// ============================================================================================
describe("responses: the openai package's responses API through TokenWatch to each provider", () => {
  let e: Env;
  before(async () => { e = await setup(); });
  after(() => e.close());

  for (const [model, provider] of [["gpt-4o-mini", "openai"], ["claude-haiku-4-5", "anthropic"], ["kimi-k2.5", "kimi"]] as const) {
    it(`responses.create() and responses.stream().finalResponse() to ${provider} (${model})`, async () => {
      const a = await e.client.responses.create({ model, instructions: "Be brief.", input: "Say hello." });
      assert.equal(a.object, "response");
      assert.equal(a.status, "completed");
      assert.match(a.output_text, new RegExp(`Hello from ${model}`));
      assert.ok(a.usage!.input_tokens > 0 && a.usage!.output_tokens > 0 && a.usage!.total_tokens === a.usage!.input_tokens + a.usage!.output_tokens);
      const s = await e.client.responses.stream({ model, input: [{ role: "user", content: [{ type: "input_text", text: "Say hello." }] }] }).finalResponse();
      assert.equal(s.status, "completed");
      assert.match(s.output_text, new RegExp(`Hello from ${model}`));
      const [r1, r2] = rows(e).slice(-2);
      for (const r of [r1, r2]) assert.deepEqual([r.entry, r.provider, r.model, r.status], ["responses", provider, model, 200]);
      const price = provider === "openai" ? PROVIDERS.openai.models[model] : provider === "anthropic" ? PROVIDERS.anthropic.models[model] : PROVIDERS.kimi.models[model];
      assert.equal(r1.cost_usd, costUsd(price, { input: a.usage!.input_tokens - a.usage!.input_tokens_details.cached_tokens, cached: a.usage!.input_tokens_details.cached_tokens, cache_write: 0, output: a.usage!.output_tokens }));
      if (provider === "openai") assert.equal(last(e.mocks.openai.requests).path, "/v1/responses", "passed through to OpenAI's own Responses API");
    });

    it(`a function tool round trip and a custom tool (raw text in) through ${provider}`, async () => {
      const mock = e.mocks[provider];
      if (provider === "openai") mock.queue({ type: "reply", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Paris\"}" }], custom_calls: [{ name: "apply_patch", input: PATCH }] });
      else mock.queue({ type: "reply", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Paris\"}" }, { name: "apply_patch", arguments: JSON.stringify({ input: PATCH }) }] });
      mock.queue({ type: "reply", text: "Sunny, and patched." });
      const ask = [{ role: "user" as const, content: "Weather in Paris, then bump a." }];
      const first = await e.client.responses.stream({ model, tools, input: ask }).finalResponse();
      const call = first.output.find((x) => x.type === "function_call") as { call_id: string; name: string; arguments: string };
      const custom = first.output.find((x) => x.type === "custom_tool_call") as { call_id: string; name: string; input: string };
      assert.deepEqual([call.name, JSON.parse(call.arguments)], ["get_weather", { city: "Paris" }]);
      assert.equal(custom?.name, "apply_patch", "the custom tool's call is a custom_tool_call");
      assert.equal(custom.input, PATCH, "its raw input intact");
      const history = (first.output as unknown as Record<string, unknown>[]).map(({ parsed_arguments: _, ...item }) => item); // the SDK's own addition, not wire data
      const second = await e.client.responses.create({ model, tools, input: [...ask, ...history, { type: "function_call_output", call_id: call.call_id, output: "sunny" }, { type: "custom_tool_call_output", call_id: custom.call_id, output: "Done!" }] as never });
      assert.equal(second.output_text, "Sunny, and patched.");
      const sent = last(mock.requests).body;
      if (provider === "anthropic") {
        assert.deepEqual(sent.tools.find((t: { name: string }) => t.name === "apply_patch").input_schema.required, ["input"]);
        assert.deepEqual(sent.messages[1].content.find((b: { type: string; name?: string }) => b.type === "tool_use" && b.name === "apply_patch")?.input, { input: PATCH });
      }
      if (provider === "kimi") assert.equal(JSON.parse(sent.messages[1].tool_calls[1].function.arguments).input, PATCH);
    });

    it(`previous_response_id and item_reference resolve through ${provider}`, async () => {
      const mock = e.mocks[provider];
      const first = await e.client.responses.create({ model, input: "My name is Ada." });
      await e.client.responses.create({ model, input: "What is my name?", previous_response_id: first.id });
      const sent = last(mock.requests).body;
      if (provider === "openai") assert.equal(sent.previous_response_id, first.id, "OpenAI resolves its own");
      else assert.match(JSON.stringify(sent.messages), /My name is Ada\..*Hello from .*What is my name\?/s, "the whole conversation went up");
      const msg = first.output.find((x) => x.type === "message")!;
      await e.client.responses.create({ model, input: [{ role: "user", content: "My name is Ada." }, { type: "item_reference", id: msg.id! }, { role: "user", content: "Again?" }] as never });
      if (provider !== "openai") assert.match(JSON.stringify(last(mock.requests).body.messages), /Hello from/, "the reference was replaced by the item");
    });
  }

  it("a function call streams in the order the SDK enforces, with the whole output in response.completed", async () => {
    e.mocks.anthropic.queue({ type: "reply", text: "Checking.", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Oslo\"}" }] });
    const r = await post(e, { model: "claude-haiku-4-5", tools, stream: true, input: "Weather in Oslo?" });
    const evs = events(await r.text());
    assert.deepEqual(evs.slice(0, 2).map((x) => x.type), ["response.created", "response.in_progress"]);
    const types = evs.map((x) => x.type);
    for (const want of ["response.output_item.added", "response.content_part.added", "response.output_text.delta", "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.function_call_arguments.delta", "response.function_call_arguments.done"]) assert.ok(types.includes(want), want);
    const final = last(evs);
    assert.equal(final.type, "response.completed");
    assert.deepEqual(final.data.response.output.map((x: { type: string }) => x.type), ["message", "function_call"]);
    assert.equal(JSON.parse(final.data.response.output[1].arguments).city, "Oslo");
    assert.ok(final.data.response.usage.output_tokens > 0);
    const ids = final.data.response.output.map((x: { id: string }) => x.id);
    assert.equal(new Set(ids).size, ids.length, "unique ids");
  });

  it("an answer cut at max_output_tokens ends as response.incomplete", async () => {
    e.mocks.kimi.queue({ type: "reply", text: "Long answer", finish: "length" });
    const r = await e.client.responses.create({ model: "kimi-k2.5", max_output_tokens: 16, input: "Tell me everything." });
    assert.equal(r.status, "incomplete");
    assert.equal(r.incomplete_details?.reason, "max_output_tokens");
    e.mocks.anthropic.queue({ type: "reply", text: "Long answer", finish: "max_tokens" });
    const s = events(await (await post(e, { model: "claude-haiku-4-5", stream: true, max_output_tokens: 16, input: "Tell me everything." })).text());
    assert.equal(last(s).type, "response.incomplete");
  });

  it("reasoning effort becomes Anthropic thinking, and the signed thinking goes back and forth as encrypted reasoning", async () => {
    const { anthropic } = e.mocks;
    anthropic.queue({ type: "reply", thinking: "Weather needs the tool.", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Rome\"}" }] }, { type: "reply", text: "Warm." });
    const ask = [{ role: "user" as const, content: "Weather in Rome?" }];
    const first = await e.client.responses.stream({ model: "claude-sonnet-5", tools, reasoning: { effort: "medium" }, include: ["reasoning.encrypted_content"], store: false, input: ask }).finalResponse();
    assert.deepEqual(last(anthropic.requests).body.thinking, { type: "enabled", budget_tokens: 8192 });
    const reasoning = first.output[0] as { type: string; summary: { text: string }[]; encrypted_content: string };
    assert.equal(reasoning.type, "reasoning");
    assert.equal(reasoning.summary[0].text, "Weather needs the tool.");
    assert.ok(reasoning.encrypted_content.startsWith("twa:"));
    const call = first.output.find((x) => x.type === "function_call") as { call_id: string };
    const second = await e.client.responses.create({ model: "claude-sonnet-5", tools, reasoning: { effort: "medium" }, include: ["reasoning.encrypted_content"], store: false, input: [...ask, ...first.output, { type: "function_call_output", call_id: call.call_id, output: "28 °C" }] as never });
    assert.equal(second.output_text, "Warm.", "Anthropic checked the thinking's signature and took it");
  });
});

// ============================================================================================
describe("responses: Codex, the Agents SDK, state across providers", () => {
  let e: Env;
  before(async () => { e = await setup(); });
  after(() => e.close());

  function codex(model: string): { headers: Record<string, string>; body: any } {
    const f = JSON.parse(readFileSync(new URL("./fixtures/codex-responses.json", import.meta.url), "utf8"));
    const { authorization: _, ...headers } = f.headers;
    return { headers, body: { ...f.body, model } };
  }

  for (const [model, flavor] of [["gpt-5.4", "openai"], ["claude-sonnet-5", "anthropic"], ["kimi-k2.5", "kimi"]] as const)
    it(`a Codex request (~40 KB, apply_patch as a custom tool, web_search) is accepted by ${flavor}'s strict mock, and the patch comes back intact`, async () => {
      const mock = e.mocks[flavor];
      const cx = codex(model);
      assert.ok(JSON.stringify(cx.body).length > 30_000);
      if (flavor === "openai") mock.queue({ type: "reply", reasoning: "Patch it.", custom_calls: [{ name: "apply_patch", input: PATCH }] });
      else mock.queue({ type: "reply", tool_calls: [{ name: "apply_patch", arguments: JSON.stringify({ input: PATCH }) }] });
      const r = await post(e, cx.body, cx.headers);
      const evs = events(await r.text());
      assert.equal(r.status, 200);
      assert.equal(r.headers.get("x-tokenwatch-provider"), flavor);
      const done = last(evs);
      assert.equal(done.type, "response.completed", JSON.stringify(done.data).slice(0, 300));
      const patch = done.data.response.output.find((x: { type: string }) => x.type === "custom_tool_call");
      assert.equal(patch.input, PATCH);
      const sent = last(mock.requests);
      if (flavor === "openai") assert.equal(sent.raw, JSON.stringify(cx.body), "passed through untouched");
      else assert.ok(!JSON.stringify(sent.body).includes("web_search"), "Codex's web_search is dropped where it cannot run");
    });

  it("the OpenAI Agents SDK, default API, runs an agent with one tool to completion through each provider", async () => {
    setTracingDisabled(true);
    setOpenAIAPI("responses");
    setDefaultOpenAIClient(e.client);
    const weather = tool({ name: "get_weather", description: "Weather of a city", parameters: { type: "object" as const, properties: { city: { type: "string" } }, required: ["city"], additionalProperties: false as const }, execute: async (input: unknown) => `sunny in ${(input as { city: string }).city}` });
    for (const [model, flavor] of [["gpt-4o-mini", "openai"], ["claude-haiku-4-5", "anthropic"], ["kimi-k2.5", "kimi"]] as const) {
      e.mocks[flavor].queue({ type: "reply", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Lima\"}" }] }, { type: "reply", text: "It is sunny in Lima." });
      const agent = new Agent({ name: "forecaster", instructions: "Answer with the tool.", model, tools: [weather] });
      const result = await run(agent, "Weather in Lima?");
      assert.equal(result.finalOutput, "It is sunny in Lima.", flavor);
      assert.match(JSON.stringify(last(e.mocks[flavor].requests).body), /sunny in Lima/, "the tool's output went back up");
    }
  });

  it("a conversation carried by previous_response_id survives a change of provider (Anthropic, then OpenAI, then Kimi)", async () => {
    const a = await e.client.responses.create({ model: "claude-haiku-4-5", input: "Remember: the code is 7." });
    const b = await e.client.responses.create({ model: "gpt-4o-mini", input: "What is the code?", previous_response_id: a.id });
    const toOpenAI = last(e.mocks.openai.requests).body;
    assert.equal(toOpenAI.previous_response_id, undefined, "OpenAI cannot know a response Anthropic gave: the conversation is sent instead");
    assert.match(JSON.stringify(toOpenAI.input), /the code is 7/);
    assert.ok(!JSON.stringify(toOpenAI.input).includes("_tw"), "TokenWatch's own item ids are not sent to OpenAI");
    await e.client.responses.create({ model: "kimi-k2.5", input: "And now?", previous_response_id: b.id });
    assert.match(JSON.stringify(last(e.mocks.kimi.requests).body.messages), /the code is 7.*Hello from claude-haiku-4-5.*What is the code\?.*Hello from gpt-4o-mini.*And now\?/s);
  });

  it("keeps a request with built-in tools on OpenAI, and refuses it, naming the tool, when OpenAI is not enabled", async () => {
    const r = await post(e, { model: "claude-sonnet-5", tools: [{ type: "file_search", vector_store_ids: ["vs_1"] }], input: "Find the contract." });
    assert.equal(r.status, 200);
    assert.equal(r.headers.get("x-tokenwatch-provider"), "openai");
    const off = await setup({ only: ["anthropic", "kimi"] });
    try {
      const refused = await post(off, { model: "claude-sonnet-5", tools: [{ type: "file_search", vector_store_ids: ["vs_1"] }], input: "Find the contract." });
      assert.equal(refused.status, 400);
      assert.match((await refused.json() as { error: { message: string } }).error.message, /built-in tools only OpenAI runs \(file_search\)/);
    } finally { await off.close(); }
  });

  it("answers an unknown previous_response_id or item_reference with 400 previous_response_not_found that says what to do", async () => {
    const off = await setup({ only: ["anthropic", "kimi"] });
    try {
      for (const body of [{ model: "claude-haiku-4-5", input: "hi", previous_response_id: "resp_nope" }, { model: "claude-haiku-4-5", input: [{ type: "item_reference", id: "msg_nope" }] }]) {
        const r = await post(off, body);
        assert.equal(r.status, 400);
        const err = (await r.json() as { error: { code: string; message: string; param: string } }).error;
        assert.equal(err.code, "previous_response_not_found");
        assert.match(err.message, /not found.*Send the whole conversation/);
      }
      await assert.rejects(off.client.responses.create({ model: "claude-haiku-4-5", input: "hi", previous_response_id: "resp_nope" }), (err: InstanceType<typeof OpenAI.BadRequestError>) => err.status === 400 && err.code === "previous_response_not_found");
    } finally { await off.close(); }
  });

  it("keeps nothing of a request that says \"store\": false (a later reference to it goes to OpenAI, which does not know it either)", async () => {
    const r = await e.client.responses.create({ model: "claude-haiku-4-5", input: "Secret.", store: false });
    const again = await post(e, { model: "claude-haiku-4-5", input: "hi", previous_response_id: r.id });
    assert.equal(last(e.mocks.openai.requests).body.previous_response_id, r.id, "kept on OpenAI, the only provider that might know it");
    assert.equal(again.status, 400);
    assert.equal((await again.json() as { error: { code: string } }).error.code, "previous_response_not_found", "OpenAI's own answer, relayed");
  });

  it("answers a WebSocket upgrade on /v1/responses with 426 at once (Codex then uses HTTP)", async () => {
    const socket = net.connect(e.tw.port, "127.0.0.1");
    await once(socket, "connect");
    socket.write(`GET /v1/responses HTTP/1.1\r\nHost: 127.0.0.1:${e.tw.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOpenAI-Beta: responses_websockets=2026-02-06\r\n\r\n`);
    const chunks: Buffer[] = [];
    socket.on("data", (c) => chunks.push(c));
    await once(socket, "close");
    const text = Buffer.concat(chunks).toString();
    assert.match(text, /^HTTP\/1\.1 426 /);
    assert.match(text, /supports_websockets = false/);
  });

  it("ends a stream that fails after its first byte with response.failed, and keeps context_length_exceeded", async () => {
    e.mocks.kimi.queue({ type: "stream-error", afterChunks: 1, message: "Input token length too long" });
    const evs = events(await (await post(e, { model: "kimi-k2.5", stream: true, input: "hi" })).text());
    const failed = last(evs);
    assert.equal(failed.type, "response.failed");
    assert.equal(failed.data.response.error.code, "context_length_exceeded");
    assert.equal(last(rows(e)).status, 502);
  });
});
