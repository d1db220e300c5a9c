// Tests of the mock providers themselves (test/mocks.ts), driven by the real SDKs pointed straight at them (no TokenWatch):
// if the official clients accept what the mocks send and the mocks refuse what the real APIs refuse, tests built on them
// say something about the real providers.

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";
import { Agent, OpenAIResponsesModel, run, setTracingDisabled, tool } from "@openai/agents";
import { startMock, goDuration, anthropicTokenCount } from "./mocks.ts";
import type { Mock } from "./mocks.ts";

const anthropicClient = (m: Mock) => new Anthropic({ apiKey: m.key, baseURL: m.url, maxRetries: 0 });
const openaiClient = (m: Mock) => new OpenAI({ apiKey: m.key, baseURL: m.url, maxRetries: 0 });
const haiku = "claude-haiku-4-5-20251001";
const hi = [{ role: "user" as const, content: "hi" }];

/** The API error a call rejects with (status and body), for assertions on the real wording. */
async function rejection(p: Promise<unknown>): Promise<{ status: number; body: any; headers: Headers }> {
  try {
    await p;
  } catch (e) {
    const err = e as { status?: number; error?: unknown; headers?: Headers };
    if (typeof err.status === "number") return { status: err.status, body: err.error, headers: err.headers ?? new Headers() };
    throw e;
  }
  assert.fail("expected the call to be rejected");
}

/** POST JSON straight at a mock and read the SSE events back (for grammar checks the SDKs would smooth over). */
async function sse(url: string, headers: Record<string, string>, body: unknown): Promise<{ event: string; data: any }[]> {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });
  assert.equal(res.status, 200);
  const out: { event: string; data: any }[] = [];
  for (const block of (await res.text()).split("\n\n")) {
    const event = /^event: (.*)$/m.exec(block)?.[1] ?? "";
    const data = /^data: (.*)$/m.exec(block)?.[1];
    if (data !== undefined) out.push({ event, data: data === "[DONE]" ? data : JSON.parse(data) });
  }
  return out;
}

// ============================================================================================
describe("Anthropic mock with @anthropic-ai/sdk", () => {
  let mock: Mock;
  let client: Anthropic;
  before(async () => {
    mock = await startMock("anthropic");
    client = anthropicClient(mock);
  });
  after(() => mock.close());

  it("answers messages.create and the beta client, and Claude Code's POST /v1/messages?beta=true, with betas recorded", async () => {
    const msg = await client.messages.create({ model: haiku, max_tokens: 64, messages: hi });
    assert.deepEqual(msg.content, [{ type: "text", text: `Hello from ${haiku}` }]);
    mock.queue({ type: "reply", text: "beta hi" });
    const beta = await client.beta.messages.create({ model: haiku, max_tokens: 64, messages: hi, betas: ["context-1m-2025-08-07", "claude-code-20250219"] });
    assert.equal(beta.content[0].type === "text" && beta.content[0].text, "beta hi");
    assert.equal(mock.requests.at(-1)!.headers["anthropic-beta"], "context-1m-2025-08-07,claude-code-20250219");
    // Claude Code (SDK 0.x, API version 2023-06-01, x-api-key) posts with ?beta=true: the route matches the path only
    const cc = { "x-api-key": mock.key, "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14" };
    const events = await sse(`${mock.url}/v1/messages?beta=true`, cc, { model: haiku, max_tokens: 32000, stream: true, messages: hi });
    assert.deepEqual([events[0].event, events.at(-1)!.event], ["message_start", "message_stop"]);
    assert.equal(mock.requests.at(-1)!.path, "/v1/messages?beta=true");
  });

  it("streams a signed thinking block before the text and tool_use, and the SDK's finalMessage() accepts it", async () => {
    mock.queue({ type: "reply", thinking: "The user wants the weather. I should call the tool.", text: "Checking.", tool_calls: [{ name: "get_weather", arguments: '{"city":"Paris"}' }] });
    const tools = [{ name: "get_weather", input_schema: { type: "object" as const, properties: { city: { type: "string" } } } }];
    const stream = client.messages.stream({ model: haiku, max_tokens: 4096, thinking: { type: "enabled", budget_tokens: 1024 }, tools, messages: [{ role: "user", content: "weather in Paris?" }] });
    const deltas: string[] = [];
    stream.on("streamEvent", (e) => {
      if (e.type === "content_block_delta") deltas.push(e.delta.type);
    });
    const msg = await stream.finalMessage();
    assert.deepEqual(msg.content.map((b) => b.type), ["thinking", "text", "tool_use"]);
    const th = msg.content[0] as Anthropic.ThinkingBlock;
    assert.equal(th.thinking, "The user wants the weather. I should call the tool.");
    assert.equal(th.signature, mock.sign(th.thinking));
    assert.ok(th.signature.length > 300, "as long as a real signature");
    assert.equal(deltas.filter((d) => d === "signature_delta").length, 1);
    assert.equal(deltas.indexOf("signature_delta"), deltas.lastIndexOf("thinking_delta") + 1, "one signature_delta just before the thinking block stops");
    assert.deepEqual((msg.content[2] as Anthropic.ToolUseBlock).input, { city: "Paris" });
    assert.equal(msg.stop_reason, "tool_use");

    // the signed history comes back fine; a tampered signature or a missing thinking block does not
    const use = msg.content[2] as Anthropic.ToolUseBlock;
    const turn = (content: Anthropic.ContentBlockParam[]): Anthropic.MessageCreateParamsNonStreaming => ({
      model: haiku, max_tokens: 4096, thinking: { type: "enabled", budget_tokens: 1024 }, tools,
      messages: [{ role: "user", content: "weather in Paris?" }, { role: "assistant", content }, { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "sunny" }] }],
    });
    const ok = await client.messages.create(turn(msg.content as Anthropic.ContentBlockParam[]));
    assert.equal(ok.type, "message");
    const forged = await rejection(client.messages.create(turn([{ ...th, thinking: th.thinking + " (edited)" }, use])));
    assert.equal(forged.status, 400);
    assert.equal(forged.body.error.message, "messages.1.content.0: Invalid `signature` in `thinking` block");
    const unsigned = await rejection(client.messages.create(turn([{ type: "thinking", thinking: "x" } as Anthropic.ThinkingBlockParam, use])));
    assert.equal(unsigned.body.error.message, "messages.1.content.0.thinking.signature: Field required");
    const prefill = await rejection(client.messages.create({ model: haiku, max_tokens: 64, messages: [...hi, { role: "assistant", content: [th] }] }));
    assert.equal(prefill.body.error.message, "messages.1.content.0: When thinking is disabled, an `assistant` message in the final position cannot contain `thinking`. To use thinking blocks, enable `thinking` in your request.");
    const stripped = await rejection(client.messages.create(turn([use])));
    assert.match(stripped.body.error.message, /^messages\.1\.content\.0\.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`\. When `thinking` is enabled, a final `assistant` message must start with a thinking block/);
  });

  it("answers JSON with thinking and redacted_thinking blocks first", async () => {
    mock.queue({ type: "reply", thinking: "hmm", redactedThinking: true, text: "Done." });
    const msg = await client.messages.create({ model: haiku, max_tokens: 2048, thinking: { type: "adaptive", display: "summarized" }, messages: hi });
    assert.deepEqual(msg.content.map((b) => b.type), ["thinking", "redacted_thinking", "text"]);
    assert.equal((msg.content[0] as Anthropic.ThinkingBlock).signature, mock.sign("hmm"));
    assert.ok((msg.content[1] as Anthropic.RedactedThinkingBlock).data.length > 100);
  });

  it("accepts what Claude Code sends, and still refuses role system inside messages", async () => {
    const body = {
      model: haiku,
      max_tokens: 32000,
      system: [{ type: "text", text: "x-anthropic-billing-header: cc_version=2.1.200;" }, { type: "text", text: "You are Claude Code.", cache_control: { type: "ephemeral" } }],
      tools: [
        { name: "Bash", description: "run", input_schema: { $schema: "https://json-schema.org/draft/2020-12/schema", type: "object", properties: { command: { type: "string" } }, required: ["command"], additionalProperties: false }, strict: true },
        { type: "web_search_20250305", name: "web_search", max_uses: 5 },
      ],
      thinking: { type: "adaptive", display: "omitted" },
      output_config: { format: { type: "json_schema", schema: { type: "object" } } },
      metadata: { user_id: "user_abc_account_def_session_ghi" },
      messages: [{ role: "user", content: [{ type: "text", text: "hi", cache_control: { type: "ephemeral", ttl: "1h" } }] }],
    };
    const msg = await client.beta.messages.stream(body as never).finalMessage();
    assert.equal(msg.type, "message");
    assert.equal(mock.requests.at(-1)!.body.stream, true);
    const sys = await rejection(client.messages.create({ model: haiku, max_tokens: 8, messages: [{ role: "system", content: "be nice" } as never, ...hi] }));
    assert.equal(sys.body.error.message, 'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, not "system" as an input message role.');
  });

  it("speaks the SDK's API version 2026-10-21 with a Bearer key, and applies that version's rules", async () => {
    const rec = () => mock.requests.at(-1)!.headers;
    await client.messages.create({ model: haiku, max_tokens: 8, messages: hi });
    assert.deepEqual([rec()["anthropic-version"], rec().authorization, rec()["x-api-key"]], ["2026-10-21", `Bearer ${mock.key}`, undefined]);
    const sampled = await rejection(client.messages.create({ model: haiku, max_tokens: 8, messages: hi, temperature: 1 } as never));
    assert.equal(sampled.body.error.message, "temperature: Extra inputs are not permitted");
    const old = await client.messages.create({ model: haiku, max_tokens: 8, messages: hi, temperature: 0.5 } as never, { headers: { "anthropic-version": "2023-06-01" } });
    assert.equal(old.type, "message");
    const wrongKey = await rejection(client.messages.create({ model: haiku, max_tokens: 8, messages: hi }, { headers: { "x-api-key": "sk-ant-wrong" } }));
    assert.deepEqual([wrongKey.status, wrongKey.body.error.message], [401, "invalid x-api-key"], "x-api-key wins over the Bearer key");
  });

  it("accepts beta body fields only with their anthropic-beta value", async () => {
    const cases: [string, Record<string, unknown>, string][] = [
      ["context-management-2025-06-27", { context_management: { edits: [{ type: "clear_tool_uses_20250919" }] } }, "context_management: Extra inputs are not permitted"],
      ["effort-2025-11-24", { output_config: { effort: "low" } }, "output_config.effort: Extra inputs are not permitted"],
      ["advanced-tool-use-2025-11-20", { tools: [{ name: "Read", input_schema: { type: "object" }, defer_loading: true }] }, "tools.0.custom.defer_loading: Extra inputs are not permitted"],
    ];
    for (const [beta, extra, message] of cases) {
      const body = { model: haiku, max_tokens: 64, messages: hi, ...extra } as unknown as Anthropic.MessageCreateParamsNonStreaming;
      const refused = await rejection(client.messages.create(body));
      assert.deepEqual([refused.status, refused.body.error.type, refused.body.error.message], [400, "invalid_request_error", message], beta);
      const ok = await client.messages.create(body, { headers: { "anthropic-beta": `claude-code-20250219, ${beta}` } });
      assert.equal(ok.type, "message", beta);
    }
  });

  it("counts tokens on its own route and queue, and refuses messages-only fields", async () => {
    mock.queue({ type: "error", status: 529 }); // for the chat route: count_tokens must not take it
    const params = { model: haiku, system: "s", messages: [{ role: "user" as const, content: "hello world" }] };
    const counted = await client.messages.countTokens(params);
    assert.deepEqual(counted, { input_tokens: anthropicTokenCount(params) });
    const viaBeta = await client.beta.messages.countTokens({ ...params, betas: ["context-management-2025-06-27"] });
    assert.equal(viaBeta.input_tokens, counted.input_tokens);
    const raw = await fetch(`${mock.url}/v1/messages/count_tokens?beta=true`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": mock.key, "anthropic-version": "2023-06-01" },
      body: JSON.stringify(params),
    });
    assert.deepEqual(await raw.json(), counted);
    for (const field of ["max_tokens", "stream", "temperature", "metadata", "service_tier"]) {
      const value = field === "metadata" ? { user_id: "u" } : field === "stream" ? false : field === "service_tier" ? "auto" : 1;
      const bad = await rejection(client.messages.countTokens({ ...params, [field]: value } as never));
      assert.equal(bad.body.error.message, `${field}: Extra inputs are not permitted`);
    }
    assert.equal((await rejection(client.messages.create({ model: haiku, max_tokens: 8, messages: hi }))).status, 529);

    mock.queueCount({ type: "error", status: 500, body: { type: "error", error: { type: "api_error", message: "boom" }, request_id: "req_1" } }, { type: "error", status: 404 });
    const boom = await rejection(client.messages.countTokens(params));
    assert.deepEqual([boom.status, boom.body.error.message], [500, "boom"]);
    const missing = await rejection(client.messages.countTokens(params));
    assert.deepEqual([missing.status, missing.body.error.type], [404, "not_found_error"]);
  });

  it("sends anthropic-ratelimit headers computed from what it served, plus others, and enforces with a real 429", async () => {
    const m = await startMock("anthropic");
    const c = anthropicClient(m);
    try {
      m.rateLimits({ limits: { requests: 3, input_tokens: 30000, output_tokens: 8000 }, others: { input_tokens: 4000 }, enforce: true });
      const h = async () => (await c.messages.create({ model: haiku, max_tokens: 1000, messages: hi }).withResponse()).response.headers;
      const first = await h();
      assert.equal(first.get("anthropic-ratelimit-requests-limit"), "3");
      assert.equal(first.get("anthropic-ratelimit-requests-remaining"), "2");
      assert.equal(first.get("anthropic-ratelimit-input-tokens-remaining"), "26000", "others' 4000 input tokens, rounded to the thousand");
      assert.equal(first.get("anthropic-ratelimit-output-tokens-remaining"), "8000", "max_tokens charged up front, corrected to the real output");
      assert.equal(first.get("anthropic-ratelimit-tokens-limit"), "38000");
      assert.match(first.get("anthropic-ratelimit-requests-reset")!, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
      const second = await h();
      assert.equal(second.get("anthropic-ratelimit-requests-remaining"), "1");
      await h();
      const limited = await rejection(c.messages.create({ model: haiku, max_tokens: 1000, messages: hi }));
      assert.equal(limited.status, 429);
      assert.equal(limited.body.error.type, "rate_limit_error");
      assert.match(limited.body.error.message, /^This request would exceed your organization's rate limit of 3 requests per minute \(org: [0-9a-f-]{36}, model: claude-haiku-4-5-20251001\)\./);
      assert.ok(Number(limited.headers.get("retry-after")) >= 1);
      assert.equal(limited.headers.get("anthropic-ratelimit-requests-remaining"), "0");
      m.rateLimits(); // back to the fixed defaults
      assert.equal((await h()).get("anthropic-ratelimit-requests-remaining"), "3999");
    } finally {
      await m.close();
    }
  });
});

// ============================================================================================
describe("OpenAI Responses mock with the openai SDK", () => {
  let mock: Mock;
  let client: OpenAI;
  before(async () => {
    mock = await startMock("openai");
    client = openaiClient(mock);
  });
  after(() => mock.close());

  const weather = { type: "function" as const, name: "get_weather", description: "weather", parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"], additionalProperties: false }, strict: true };
  const patch = { type: "custom" as const, name: "apply_patch", description: "patch", format: { type: "grammar" as const, syntax: "lark" as const, definition: "start: /.+/" } };

  it("answers responses.create with a response object that echoes the request", async () => {
    mock.queue({ type: "reply", text: "Hello there", usage: { input: 20, cached: 100, output: 2 } });
    const r = await client.responses.create({ model: "gpt-4o-mini", instructions: "be brief", input: "hi", metadata: { k: "v" }, max_output_tokens: 64 });
    assert.match(r.id, /^resp_[0-9a-f]{48}$/);
    assert.deepEqual([r.object, r.status, r.output_text, r.instructions, r.max_output_tokens, (r as unknown as { store: boolean }).store, r.previous_response_id], ["response", "completed", "Hello there", "be brief", 64, true, null]);
    assert.deepEqual(r.metadata, { k: "v" });
    assert.deepEqual(r.usage, { input_tokens: 120, input_tokens_details: { cached_tokens: 100 }, output_tokens: 2, output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 122 });
    assert.match(r.output[0].id!, /^msg_/);
  });

  it("streams reasoning, a function call and a custom tool call in the §3.4 grammar, and finalResponse() accepts it", async () => {
    mock.queue({ type: "reply", reasoning: "Need weather, then a patch.", tool_calls: [{ name: "get_weather", arguments: '{"city":"Paris"}' }], custom_calls: [{ name: "apply_patch", input: "*** Begin Patch\n*** End Patch" }] });
    const stream = client.responses.stream({ model: "gpt-5", input: [{ role: "user", content: "go" }], tools: [weather, patch], include: ["reasoning.encrypted_content"], reasoning: { effort: "low", summary: "auto" } });
    const seen: { type: string; seq: number }[] = [];
    stream.on("event", (e) => seen.push({ type: e.type, seq: e.sequence_number }));
    const r = await stream.finalResponse();
    assert.deepEqual(r.output.map((o) => o.type), ["reasoning", "function_call", "custom_tool_call"]);
    const [rs, fc, ctc] = r.output as [OpenAI.Responses.ResponseReasoningItem, OpenAI.Responses.ResponseFunctionToolCall, OpenAI.Responses.ResponseCustomToolCall];
    assert.match(rs.id, /^rs_/);
    assert.deepEqual(rs.summary, [{ type: "summary_text", text: "Need weather, then a patch." }]);
    assert.match(rs.encrypted_content ?? "", /^gAAAAAB/);
    assert.deepEqual([fc.name, fc.arguments], ["get_weather", '{"city":"Paris"}']);
    assert.match(fc.id!, /^fc_/);
    assert.match(fc.call_id, /^call_/);
    assert.deepEqual([ctc.name, ctc.input], ["apply_patch", "*** Begin Patch\n*** End Patch"]);
    assert.match(ctc.id!, /^ctc_/);
    assert.equal(r.usage!.output_tokens_details.reasoning_tokens, 5);
    assert.deepEqual(seen.map((e) => e.seq), seen.map((_, i) => i), "sequence_number 0, 1, 2, …");
    assert.deepEqual(seen.slice(0, 4).map((e) => e.type), ["response.created", "response.in_progress", "response.output_item.added", "response.reasoning_summary_part.added"]);
    assert.equal(seen.at(-1)!.type, "response.completed");
    for (const t of ["response.reasoning_summary_text.delta", "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done"]) {
      assert.ok(seen.some((e) => e.type === t), t);
    }
    assert.equal(seen.filter((e) => e.type === "response.output_item.done").length, 3);
  });

  it("sends event: lines and ends a cut answer with response.incomplete", async () => {
    mock.queue({ type: "reply", text: "one two three", finish: "length" });
    const events = await sse(`${mock.url}/responses`, { authorization: `Bearer ${mock.key}` }, { model: "gpt-4o-mini", input: "hi", stream: true });
    assert.ok(events.every((e) => e.event === e.data.type), "every event has its event: line");
    assert.deepEqual(events.map((e) => e.data.type), [
      "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
      "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
      "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete",
    ]);
    const last = events.at(-1)!.data.response;
    assert.deepEqual([last.status, last.incomplete_details, last.output[0].content[0].text], ["incomplete", { reason: "max_output_tokens" }, "one two three"]);
  });

  it("remembers stored responses for previous_response_id and item_reference, and refuses unknown ones like the API", async () => {
    mock.queue({ type: "reply", text: "Let me check.", tool_calls: [{ name: "get_weather", arguments: '{"city":"Paris"}' }] });
    const first = await client.responses.create({ model: "gpt-4o-mini", input: "weather in Paris?", tools: [weather] });
    const [msg, call] = first.output as [OpenAI.Responses.ResponseOutputMessage, OpenAI.Responses.ResponseFunctionToolCall];
    const next = await client.responses.create({ model: "gpt-4o-mini", previous_response_id: first.id, input: [{ type: "function_call_output", call_id: call.call_id, output: "sunny" }], tools: [weather] });
    assert.equal(next.previous_response_id, first.id);
    // the same history as item references (what the AI SDK sends with store on)
    await client.responses.create({ model: "gpt-4o-mini", input: [{ role: "user", content: "weather in Paris?" }, { type: "item_reference", id: msg.id }, { type: "item_reference", id: call.id! }, { type: "function_call_output", call_id: call.call_id, output: "sunny" }] });

    const unknownPrev = await rejection(client.responses.create({ model: "gpt-4o-mini", previous_response_id: "resp_nope", input: "hi" }));
    assert.equal(unknownPrev.status, 400);
    assert.deepEqual(unknownPrev.body, { message: "Previous response with id 'resp_nope' not found.", type: "invalid_request_error", param: "previous_response_id", code: "previous_response_not_found" });
    const unknownItem = await rejection(client.responses.create({ model: "gpt-4o-mini", input: [{ type: "item_reference", id: "msg_nope" }] }));
    assert.equal(unknownItem.status, 404);
    assert.deepEqual(unknownItem.body, { message: "Item with id 'msg_nope' not found. Items are not persisted when `store` is set to false. Try again with `store` set to true, or remove this item from your input.", type: "invalid_request_error", param: "input", code: null });
    const noOutput = await rejection(client.responses.create({ model: "gpt-4o-mini", previous_response_id: first.id, input: "and tomorrow?" }));
    assert.equal(noOutput.body.message, `No tool output found for function call ${call.call_id}.`);

    const unstored = await client.responses.create({ model: "gpt-4o-mini", input: "hi", store: false });
    const gone = await rejection(client.responses.create({ model: "gpt-4o-mini", previous_response_id: unstored.id, input: "again" }));
    assert.equal(gone.body.code, "previous_response_not_found");
    const goneItem = await rejection(client.responses.create({ model: "gpt-4o-mini", input: [{ type: "item_reference", id: unstored.output[0].id! }] }));
    assert.equal(goneItem.status, 404);
  });

  it("validates requests with the real wordings", async () => {
    const cases: [Record<string, unknown>, Record<string, unknown>][] = [
      [{ foo: 1 }, { message: "Unknown parameter: 'foo'.", type: "invalid_request_error", param: "foo", code: "unknown_parameter" }],
      [{ tools: [{ type: "function", function: { name: "f", parameters: { type: "object" } } }] }, { message: "Missing required parameter: 'tools[0].name'.", type: "invalid_request_error", param: "tools[0].name", code: "missing_required_parameter" }],
      [{ reasoning: { effort: "low" } }, { message: "Unsupported parameter: 'reasoning.effort' is not supported with this model.", type: "invalid_request_error", param: "reasoning.effort", code: "unsupported_parameter" }],
      [{ input: [{ type: "function_call_output", call_id: "call_x", output: "ok" }] }, { message: "No tool call found for function call output with call_id call_x.", type: "invalid_request_error", param: "input", code: null }],
      [{ input: [{ type: "function_call", call_id: "call_1", name: "f", arguments: { a: 1 } }] }, { message: "Invalid type for 'input[0].arguments': expected a string, but got an object instead.", type: "invalid_request_error", param: "input[0].arguments", code: "invalid_type" }],
      [{ input: [{ type: "reasoning", id: "rs_1", summary: [], encrypted_content: "x", status: "completed" }] }, { message: "Unknown parameter: 'input[0].status'.", type: "invalid_request_error", param: "input[0].status", code: "unknown_parameter" }],
    ];
    for (const [extra, error] of cases) {
      const res = await rejection(client.responses.create({ model: "gpt-4o-mini", input: "hi", ...extra } as never));
      assert.deepEqual([res.status, res.body], [400, error], JSON.stringify(extra));
    }
    const unknownItem = await rejection(client.responses.create({ model: "gpt-4o-mini", input: [{ type: "bogus" }] } as never));
    assert.equal(unknownItem.body.param, "input[0].type");
    // accepted: built-in tools, flat json_schema, every input part and item kind
    await client.responses.create({
      model: "gpt-5",
      input: [
        { role: "developer", content: "be terse" },
        { type: "message", role: "user", content: [{ type: "input_text", text: "look" }, { type: "input_image", image_url: "data:image/png;base64,AAAA", detail: "auto" }, { type: "input_file", file_data: "data:application/pdf;base64,AAAA", filename: "a.pdf" }] },
        { type: "message", role: "assistant", content: [{ type: "output_text", text: "ok", annotations: [] }] },
        { type: "custom_tool_call", call_id: "call_p", name: "apply_patch", input: "*** Begin Patch" },
        { type: "custom_tool_call_output", call_id: "call_p", output: "done" },
        { type: "reasoning", id: "rs_x", summary: [], encrypted_content: "gAAAAABxyz" },
        { type: "web_search_call", id: "ws_1", status: "completed", action: { type: "search", query: "q" } },
      ],
      tools: [weather, patch, { type: "web_search" }, { type: "tool_search" } as never, { type: "local_shell" }],
      text: { format: { type: "json_schema", name: "out", schema: { type: "object" }, strict: true }, verbosity: "low" },
      reasoning: { effort: "high" },
      prompt_cache_key: "k",
      store: false,
      include: ["reasoning.encrypted_content"],
    } as never);
  });

  it("plays error, stream-error and raw scripts from the queue it shares with chat completions", async () => {
    mock.queue({ type: "error", status: 429 }, { type: "reply", text: "chat gets this" });
    const limited = await rejection(client.responses.create({ model: "gpt-4o-mini", input: "hi" }));
    assert.deepEqual([limited.status, limited.body.code], [429, "rate_limit_exceeded"]);
    const chat = await client.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] });
    assert.equal(chat.choices[0].message.content, "chat gets this");

    mock.queue({ type: "stream-error", afterChunks: 1, message: "boom" });
    const events = await sse(`${mock.url}/responses`, { authorization: `Bearer ${mock.key}` }, { model: "gpt-4o-mini", input: "hi", stream: true });
    const last = events.at(-1)!.data;
    assert.equal(last.type, "response.failed");
    assert.deepEqual(last.response.error, { code: "server_error", message: "boom" });
    assert.deepEqual(events.map((e) => e.data.sequence_number), events.map((_, i) => i));
    assert.equal(events.filter((e) => e.data.type === "response.output_text.delta").length, 1);

    mock.queue({ type: "stream-error", afterChunks: 0 });
    const failed = await client.responses.stream({ model: "gpt-4o-mini", input: "hi" }).finalResponse(); // the SDK resolves with the failed response
    assert.equal(failed.status, "failed");
    assert.equal(failed.error!.code, "server_error");
    assert.match(failed.error!.message, /^An error occurred while processing your request\. .* Please include the request ID req_[0-9a-f]{32} in your message\.$/);
  });

  it("breaks, stalls, hangs, resets and answers raw on the Responses route too", async () => {
    const params = { model: "gpt-4o-mini", input: "one two three" };
    mock.queue({ type: "stream-break", afterChunks: 1 });
    await assert.rejects(client.responses.stream(params).finalResponse());
    mock.queue({ type: "reset" });
    await assert.rejects(client.responses.create(params));
    mock.queue({ type: "hang" });
    await assert.rejects(client.responses.create(params, { signal: AbortSignal.timeout(150) }));
    await mock.waitForClosedRequest();
    mock.queue({ type: "stall", afterChunks: 1 });
    const seen: string[] = [];
    const stalled = client.responses.stream(params, { signal: AbortSignal.timeout(300) });
    stalled.on("event", (e) => seen.push(e.type));
    await assert.rejects(stalled.finalResponse());
    assert.equal(seen.filter((t) => t === "response.output_text.delta").length, 1);
    mock.queue({ type: "raw", status: 502, body: "<html>bad gateway</html>" });
    assert.equal((await rejection(client.responses.create(params))).status, 502);
  });

  it("serves an @openai/agents run: a function call, the tool's output, then the answer", async () => {
    setTracingDisabled(true);
    mock.queue({ type: "reply", tool_calls: [{ name: "get_weather", arguments: '{"city":"Paris"}' }] }, { type: "reply", text: "Sunny in Paris." });
    const getWeather = tool({
      name: "get_weather",
      description: "weather for a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"], additionalProperties: false },
      strict: true,
      execute: async (input) => `sunny in ${(input as { city: string }).city}`,
    });
    const agent = new Agent({ name: "w", instructions: "help", model: new OpenAIResponsesModel(client, "gpt-5"), tools: [getWeather] });
    const before = mock.requests.length;
    const result = await run(agent, "weather in Paris?");
    assert.equal(result.finalOutput, "Sunny in Paris.");
    const second = mock.requests[before + 1].body;
    const output = second.input.find((i: { type?: string }) => i.type === "function_call_output");
    assert.equal(output.output, "sunny in Paris");
  });

  it("sends x-ratelimit headers computed from what it served, plus others, and enforces with a real 429", async () => {
    const m = await startMock("openai");
    const c = openaiClient(m);
    try {
      m.rateLimits({ limits: { requests: 4, tokens: 2000 }, others: { requests: 1, tokens: 500 }, enforce: true });
      const h = async () => (await c.responses.create({ model: "gpt-4o-mini", input: "hi", max_output_tokens: 100 }).withResponse()).response.headers;
      const first = await h();
      assert.equal(first.get("x-ratelimit-limit-requests"), "4");
      assert.equal(first.get("x-ratelimit-remaining-requests"), "2", "one served, one from the other client");
      const tokensLeft = Number(first.get("x-ratelimit-remaining-tokens"));
      assert.ok(tokensLeft < 2000 - 500 - 100, "prompt + max_output_tokens charged");
      assert.match(first.get("x-ratelimit-reset-requests")!, /^(\d+m)?[\d.]+s$|^\d+ms$/);
      const second = await h();
      assert.equal(second.get("x-ratelimit-remaining-requests"), "1");
      assert.ok(Number(second.get("x-ratelimit-remaining-tokens")) < tokensLeft);
      await h();
      const limited = await rejection(c.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] }));
      assert.equal(limited.status, 429);
      assert.deepEqual([limited.body.type, limited.body.code], ["requests", "rate_limit_exceeded"]);
      assert.match(limited.body.message, /^Rate limit reached for gpt-4o-mini in organization org-mock on requests per min \(RPM\): Limit 4, Used 4, Requested 1\. Please try again in [\d.]+s\. Visit https:\/\/platform\.openai\.com\/account\/rate-limits to learn more\.$/);
      assert.equal(limited.headers.get("x-ratelimit-remaining-requests"), "0", "the refused request is not counted");

      m.rateLimits({ limits: { tokens: 300 }, enforce: true });
      const big = await rejection(c.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }], max_completion_tokens: 1000 }));
      assert.match(big.body.message, /^Request too large for gpt-4o-mini in organization org-mock on tokens per min \(TPM\): Limit 300, Requested \d+\./);
    } finally {
      await m.close();
    }
  });
});

// ============================================================================================
describe("Kimi mock", () => {
  let mock: Mock;
  let client: OpenAI;
  before(async () => {
    mock = await startMock("kimi");
    client = openaiClient(mock);
  });
  after(() => mock.close());

  it("streams reasoning_content before the content, as kimi-k2.5 thinking does, and puts it on the JSON message", async () => {
    mock.queue({ type: "reply", reasoning: "Think first.", text: "Answer." });
    const stream = await client.chat.completions.create({ model: "kimi-k2.5", messages: [{ role: "user", content: "hi" }], stream: true });
    const kinds: string[] = [];
    let reasoning = "", content = "";
    for await (const chunk of stream) {
      const d = (chunk.choices[0]?.delta ?? {}) as { content?: string | null; reasoning_content?: string };
      if (d.reasoning_content) (kinds.push("reasoning"), (reasoning += d.reasoning_content));
      if (d.content) (kinds.push("content"), (content += d.content));
    }
    assert.deepEqual([reasoning, content], ["Think first.", "Answer."]);
    assert.equal(kinds.lastIndexOf("reasoning") < kinds.indexOf("content"), true);

    mock.queue({ type: "reply", reasoning: "Hmm.", tool_calls: [{ name: "f", arguments: "{}" }] });
    const json = await client.chat.completions.create({ model: "kimi-k2.5", messages: [{ role: "user", content: "hi" }] });
    assert.equal((json.choices[0].message as unknown as { reasoning_content: string }).reasoning_content, "Hmm.");
  });

  it("sends no rate-limit headers, even when counting, and answers Kimi's 429 when enforcing", async () => {
    mock.rateLimits({ limits: { requests: 1 }, enforce: true });
    const { response } = await client.chat.completions.create({ model: "kimi-k2.5", messages: [{ role: "user", content: "hi" }] }).withResponse();
    assert.equal([...response.headers.keys()].some((k) => /ratelimit/i.test(k)), false);
    const limited = await rejection(client.chat.completions.create({ model: "kimi-k2.5", messages: [{ role: "user", content: "hi" }] }));
    assert.equal(limited.status, 429);
    assert.deepEqual(limited.body, { type: "rate_limit_reached_error", message: "Your account org-mock<ak-mock> request reached organization max RPM: 1, please try again after 60 seconds" });
    mock.rateLimits();
  });
});

describe("mock helpers", () => {
  it("goDuration() writes Go durations like OpenAI's reset headers", () => {
    assert.deepEqual([0, 17, 1000, 18642, 360_000, 86_400, 3_723_000].map(goDuration), ["0s", "17ms", "1s", "18.642s", "6m0s", "1m26.4s", "1h2m3s"]);
  });
});
