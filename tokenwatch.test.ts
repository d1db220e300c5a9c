// Tests for tokenwatch.ts: one describe per banner section, in the same order. The pure parts are
// tested as functions (with a fake clock); everything else through the HTTP surface a user has, with
// the official `openai` client, against mock providers that validate like the real APIs (test/mocks.ts).

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { spawn } from "node:child_process";
import { once } from "node:events";
import OpenAI from "openai";
import { askText, classifierFeatures,
  PROVIDERS, ALIASES, DEFAULTS, TwError, ConfigError, promptEstimate, costUsd, openAIUsage, usageFromOpenAI, usageFromAnthropic,
  parseSseEvent, SseSplitter, parseDuration, coolUntil, scrub, validateChatRequest, jsonShapeProblem, windowTokens, mergeConfig, buildConfig,
  SlidingWindow, Limiter, configuredLimit, countedOf, classify, route, openAIBody, openAIRequest, anthropicBody, toAnthropicMessages, answerFromMessage, completionOf, Translation,
  ADAPTERS, ENTRIES, Store, bodyText, parseBody, upstreamMessages, start, parseOptions, loadConfig, UsageError,
} from "./tokenwatch.ts";
import type { ChatRequest, Config, Model, Parsed, Row, Running, Tap } from "./tokenwatch.ts";
import { startMock } from "./test/mocks.ts";
import type { Mock, Flavor } from "./test/mocks.ts";

const user = (content: string): ChatRequest => ({ messages: [{ role: "user", content }] });
/** A request as an entry hands it to the dispatcher (for the translators that read a client's options). */
const parsed = (hub: ChatRequest): Parsed => ({ hub, body: hub, text: JSON.stringify(hub), stream: hub.stream === true, forward: {} });
const ALL_KEYS = { ANTHROPIC_API_KEY: "sk-ant-x", KIMI_API_KEY: "sk-kimi-x", OPENAI_API_KEY: "sk-openai-x" };
const cfg = (env: Record<string, string> = ALL_KEYS, file: unknown = {}) => buildConfig({ env, file });
const model = (c: Config, key: string): Model => c.models.find((m) => m.key === key)!;
const ids = (ms: Model[]) => ms.map((m) => m.id);

// ============================================================================================
describe("1. PROVIDERS", () => {
  it("keeps every model name of the seed working, directly or as an alias of a current model", () => {
    const c = cfg();
    for (const name of ["claude-opus-4-5", "claude-sonnet-4-5", "claude-haiku-4-5", "kimi-k2.5", "kimi-k1.5", "gpt-4o", "gpt-4o-mini"]) {
      const r = route({ ...user("hi"), model: name }, c);
      const target = ALIASES[name] ?? name;
      assert.equal(r.candidates[0].id, target, name);
    }
  });

  it("prices models in dollars per million tokens (gpt-4o-mini: $0.15 in, $0.60 out)", () => {
    const m = PROVIDERS.openai.models["gpt-4o-mini"];
    assert.equal(costUsd(m, { input: 1_000_000, cached: 0, cache_write: 0, output: 1_000_000 }), 0.75);
  });

  it("gives every built-in model token and request limits, a tier and a price, and the table validates", () => {
    for (const [pid, p] of Object.entries(PROVIDERS))
      for (const [id, m] of Object.entries(p.models)) {
        assert.ok((m.tpm ?? m.itpm ?? 0) > 0 && (m.rpm ?? 0) > 0 && m.input > 0 && m.output > 0, `${pid}/${id}`);
        assert.ok(m.tier === "simple" || m.tier === "complex");
      }
    assert.doesNotThrow(() => mergeConfig(PROVIDERS, { providers: structuredClone(PROVIDERS) }));
  });

  it("maps every alias to a model that is in the table", () => {
    const all = Object.values(PROVIDERS).flatMap((p) => Object.keys(p.models));
    for (const [alias, target] of Object.entries(ALIASES)) assert.ok(all.includes(target), `${alias} -> ${target}`);
  });
});

// ============================================================================================
describe("3. Pure helpers", () => {
  it("windowTokens() counts cache reads against the limit except at Anthropic, which does not", () => {
    const u = { input: 10, cached: 1000, cache_write: 100, output: 5 };
    assert.equal(windowTokens("openai", u), 1115);
    assert.equal(windowTokens("anthropic", u), 115);
  });

  it("costUsd() charges cache reads and writes at their own price", () => {
    const sonnet = PROVIDERS.anthropic.models["claude-sonnet-5"];
    // 1000 uncached in at $2, 2000 cache reads at $0.2, 500 cache writes at $2.5, 100 out at $10 (per million)
    assert.equal(costUsd(sonnet, { input: 1000, cached: 2000, cache_write: 500, output: 100 }), 0.00465); // 0.002 + 0.0004 + 0.00125 + 0.001, rounded like money
  });

  it("costUsd() falls back to the input price when no cache price is given", () => {
    assert.equal(costUsd({ input: 1, output: 2 }, { input: 10, cached: 10, cache_write: 10, output: 10 }), 0.00005);
  });

  it("openAIUsage() counts the whole prompt, cached part included", () => {
    assert.deepEqual(openAIUsage({ input: 5, cached: 7, cache_write: 3, output: 2 }, 0.5), { prompt_tokens: 15, completion_tokens: 2, total_tokens: 17, prompt_tokens_details: { cached_tokens: 7, cache_write_tokens: 3 }, cost_usd: 0.5 });
    assert.deepEqual(openAIUsage({ input: 5, cached: 0, cache_write: 0, output: 2 }, 0).prompt_tokens_details, { cached_tokens: 0 });
  });

  it("usageFromOpenAI() reads OpenAI's details and Kimi's top-level cached_tokens", () => {
    assert.deepEqual(usageFromOpenAI({ prompt_tokens: 100, completion_tokens: 9, prompt_tokens_details: { cached_tokens: 40 } }), { input: 60, cached: 40, cache_write: 0, output: 9 });
    assert.deepEqual(usageFromOpenAI({ prompt_tokens: 100, completion_tokens: 9, cached_tokens: 30 }), { input: 70, cached: 30, cache_write: 0, output: 9 });
    assert.equal(usageFromOpenAI(null), undefined);
  });

  it("usageFromAnthropic() keeps the four numbers apart", () => {
    assert.deepEqual(usageFromAnthropic({ input_tokens: 3, cache_read_input_tokens: 100, cache_creation_input_tokens: 20, output_tokens: 7 }), { input: 3, cached: 100, cache_write: 20, output: 7 });
  });

  it("promptEstimate() counts a token per four characters of the body", () => {
    assert.equal(promptEstimate(401), 101);
    assert.equal(promptEstimate(0), 0);
  });

  it("parseSseEvent() reads event names, joins data lines and skips comments", () => {
    assert.deepEqual(parseSseEvent("event: ping\ndata: {\"a\":1}\n\n"), { event: "ping", data: "{\"a\":1}" });
    assert.deepEqual(parseSseEvent(": keep-alive\ndata: a\ndata: b\r\n\r\n"), { event: undefined, data: "a\nb" });
    assert.equal(parseSseEvent(": only a comment\n\n"), undefined);
  });

  it("SseSplitter cuts whole events out of chunks split anywhere, LF or CRLF", () => {
    const text = "data: one\n\nevent: x\r\ndata: two\r\n\r\ndata: three\n\n";
    for (let cut = 1; cut < text.length; cut++) {
      const s = new SseSplitter();
      const out = [...s.push(Buffer.from(text.slice(0, cut))), ...s.push(Buffer.from(text.slice(cut)))].map(String);
      assert.deepEqual(out, ["data: one\n\n", "event: x\r\ndata: two\r\n\r\n", "data: three\n\n"], `cut at ${cut}`);
      assert.equal(s.pending, 0);
    }
  });

  it("parseDuration() reads OpenAI's Go-style reset durations", () => {
    assert.equal(parseDuration("6m0s"), 360_000);
    assert.equal(parseDuration("1h2m3s"), 3_723_000);
    assert.equal(parseDuration("17.5ms"), 17.5);
    assert.equal(parseDuration("1.5s"), 1500);
    assert.equal(parseDuration("soon"), undefined);
  });

  describe("coolUntil()", () => {
    const now = 1_000_000;
    const h = (o: Record<string, string>) => (n: string) => o[n] ?? null;
    const cases: [string, Record<string, string>, number, number | undefined][] = [
      ["retry-after in seconds", { "retry-after": "7" }, 429, now + 7000],
      ["retry-after-ms first", { "retry-after-ms": "250", "retry-after": "7" }, 429, now + 250],
      ["retry-after as an HTTP date", { "retry-after": new Date(now + 30_000).toUTCString() }, 429, Math.floor((now + 30_000) / 1000) * 1000],
      ["OpenAI's exhausted token limit", { "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "1s" }, 429, now + 360_000],
      ["Anthropic's RFC 3339 reset", { "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": new Date(now + 12_000).toISOString() }, 429, now + 12_000],
      ["a 429 with no header at all", {}, 429, now + DEFAULTS.cooldown_ms],
      ["a 200 that used the last request", { "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s" }, 200, now + 2000],
      ["a 200 with room left", { "x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s" }, 200, undefined],
    ];
    for (const [name, headers, status, want] of cases)
      it(`reads ${name}`, () => assert.equal(coolUntil(h(headers), status, now, DEFAULTS.cooldown_ms), want));
    it("reads only the rate-limit headers of the provider's kind, and retry-after only on an error", () => {
      const anthropicReset = h({ "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": new Date(now + 9000).toISOString(), "retry-after": "3" });
      assert.equal(coolUntil(anthropicReset, 200, now, 5000, "openai"), undefined);
      assert.equal(coolUntil(anthropicReset, 200, now, 5000, "anthropic"), now + 9000);
      assert.equal(coolUntil(anthropicReset, 429, now, 5000, "anthropic"), now + 3000);
    });
  });

  it("scrub() removes configured keys and anything shaped like a key", () => {
    const out = scrub("Incorrect API key provided: sk-proj-abcdef123456 and my-secret-key-0001", ["my-secret-key-0001"]);
    assert.equal(out, "Incorrect API key provided: [redacted] and [redacted]");
  });

  describe("validateChatRequest()", () => {
    const cases: [string, unknown, RegExp][] = [
      ["a non-object body", [1, 2], /JSON object/],
      ["missing messages", { model: "auto" }, /"messages" must be a non-empty array/],
      ["empty messages", { messages: [] }, /non-empty array/],
      ["an unknown role", { messages: [{ role: "robot", content: "x" }] }, /role "robot" is not one of/],
      ["content of the wrong type", { messages: [{ role: "user", content: 5 }] }, /must be a string or an array/],
      ["a user message without content", { messages: [{ role: "user" }] }, /content is missing/],
      ["a tool message without tool_call_id", { messages: [{ role: "tool", content: "42" }] }, /tool_call_id/],
      ["a bad tool call", { messages: [{ role: "assistant", tool_calls: [{ id: "1", function: { name: "f" } }] }] }, /tool_calls\[0\] must be/],
      ["a model that is not a string", { model: 4, messages: [{ role: "user", content: "x" }] }, /"model" must be/],
      ["stream that is not boolean", { stream: "yes", messages: [{ role: "user", content: "x" }] }, /"stream" must be true or false/],
      ["stream_options without stream", { stream_options: { include_usage: true }, messages: [{ role: "user", content: "x" }] }, /only allowed with "stream": true/],
      ["an unknown complexity", { complexity: "medium", messages: [{ role: "user", content: "x" }] }, /"complexity" must be "simple" or "complex"/],
      ["a negative max_tokens", { max_tokens: -1, messages: [{ role: "user", content: "x" }] }, /"max_tokens" must be an integer/],
      ["a temperature of 3", { temperature: 3, messages: [{ role: "user", content: "x" }] }, /"temperature" must be a number from 0 to 2/],
      ["five stop sequences", { stop: ["a", "b", "c", "d", "e"], messages: [{ role: "user", content: "x" }] }, /at most 4/],
      ["tools that are not an array", { tools: {}, messages: [{ role: "user", content: "x" }] }, /"tools" must be an array/],
      ["an image part without a url", { messages: [{ role: "user", content: [{ type: "image_url", image_url: {} }] }] }, /image_url.url must be a string/],
    ];
    for (const [name, body, re] of cases)
      it(`refuses ${name} with a 400 that says what to fix`, () => {
        assert.throws(() => validateChatRequest(body), (e: unknown) => e instanceof TwError && e.status === 400 && re.test(e.message));
      });
    it("accepts a full tool-calling conversation", () => {
      const body = { model: "auto", messages: [{ role: "system", content: "s" }, { role: "user", content: [{ type: "text", text: "hi" }] }, { role: "assistant", content: null, tool_calls: [{ id: "c1", type: "function", function: { name: "f", arguments: "{}" } }] }, { role: "tool", tool_call_id: "c1", content: "42" }] };
      assert.equal(validateChatRequest(body), body);
    });
  });

  it("bodyText() and parseBody() refuse invalid UTF-8, empty bodies, deep nesting and bad JSON with distinct messages", () => {
    const msg = (b: Buffer) => { try { parseBody(bodyText(b)); return ""; } catch (e) { return (e as TwError).message; } };
    assert.match(msg(Buffer.from([0x7b, 0xff, 0x7d])), /not valid UTF-8/);
    assert.match(msg(Buffer.from("  ")), /body is empty/);
    assert.match(msg(Buffer.from("[".repeat(100) + "]".repeat(100))), /nested more than 64/);
    assert.match(msg(Buffer.from("{\"a\":")), /not valid JSON/);
    assert.deepEqual(parseBody(bodyText(Buffer.from("{\"a\":\"[{\\\"\"}"))), { a: "[{\"" });
  });

  it("jsonShapeProblem() ignores brackets inside strings", () => {
    assert.equal(jsonShapeProblem(JSON.stringify({ a: "[[[[[[[[[[" }), 3) === "depth", false);
    assert.equal(jsonShapeProblem("[[[[1]]]]", 3) === "depth", true);
  });

  describe("config validation", () => {
    const cases: [string, unknown, RegExp][] = [
      ["a file that is not an object", [], /^config must be a JSON object/],
      ["an unknown top-level key", { treshold: 0.8 }, /^treshold is not a known key/],
      ["a threshold above 1", { threshold: 80 }, /^threshold must be a number above 0 and at most 1/],
      ["a model price that is a string", { providers: { openai: { models: { "gpt-4o": { input: "2.5", output: 10, limit: 1, tier: "complex" } } } } }, /^providers\.openai\.models\.gpt-4o\.input must be a number/],
      ["an unknown model key", { providers: { openai: { models: { "gpt-4o": { input: 1, output: 1, tpm: 1, tier: "complex", tpn: 5 } } } } }, /^providers\.openai\.models\.gpt-4o\.tpn is not a known key/],
      ["a bad tier", { providers: { openai: { models: { x: { input: 1, output: 1, limit: 1, tier: "cheap" } } } } }, /tier must be "simple" or "complex"/],
      ["a new provider without kind", { providers: { local: { base_url: "http://127.0.0.1:1/v1", models: {} } } }, /^providers\.local\.kind is required for a new provider/],
      ["a bad kind", { providers: { local: { kind: "gemini", base_url: "http://127.0.0.1:1/v1" } } }, /^providers\.local\.kind must be "openai" or "anthropic"/],
      ["a base_url that is not a URL", { providers: { openai: { base_url: "api.openai.com" } } }, /^providers\.openai\.base_url must be an http\(s\) URL/],
    ];
    for (const [name, file, re] of cases)
      it(`stops on ${name} with one line naming the key`, () => {
        assert.throws(() => buildConfig({ file }), (e: unknown) => e instanceof ConfigError && re.test(e.message) && !e.message.includes("\n"));
      });

    it("merges a provider over the built-in one, and its models replace the list", () => {
      const c = buildConfig({ env: ALL_KEYS, file: { providers: { openai: { priority: 0, models: { "gpt-5": { input: 1.25, output: 10, limit: 500000, rpm: 500, tier: "complex" } } } } } });
      const openai = c.models.filter((m) => m.provider.id === "openai");
      assert.deepEqual(ids(openai), ["gpt-5"]);
      assert.equal(openai[0].provider.priority, 0);
      assert.equal(openai[0].provider.baseUrl, "https://api.openai.com/v1");
      assert.ok(c.models.some((m) => m.id === "claude-sonnet-5"));
    });

    it("adds a new provider; one on a local URL needs no key", () => {
      const c = buildConfig({ file: { providers: { local: { kind: "openai", base_url: "http://127.0.0.1:11434/v1", models: { llama: { input: 0, output: 0, limit: 1e9, tier: "simple" } } } } } });
      const p = c.providers.find((x) => x.id === "local")!;
      assert.equal(p.enabled, true);
      assert.equal(p.name, "local");
      assert.equal(c.providers.find((x) => x.id === "openai")!.enabled, false);
    });

    it("reads keys from the environment, KIMI_API_KEY or MOONSHOT_API_KEY, and base URLs", () => {
      const c = buildConfig({ env: { MOONSHOT_API_KEY: "m-key", ANTHROPIC_BASE_URL: "https://proxy.example/" } });
      assert.equal(c.providers.find((p) => p.id === "kimi")!.apiKey, "m-key");
      assert.equal(c.providers.find((p) => p.id === "anthropic")!.baseUrl, "https://proxy.example");
      assert.match(c.providers.find((p) => p.id === "openai")!.why, /no key \(set OPENAI_API_KEY\)/);
    });

    it("TOKENWATCH_MAX_WAIT_MS overrides the config file", () => {
      assert.equal(buildConfig({ env: { TOKENWATCH_MAX_WAIT_MS: "1234" }, file: { max_wait_ms: 5 } }).max_wait_ms, 1234);
      assert.throws(() => buildConfig({ env: { TOKENWATCH_MAX_WAIT_MS: "soon" } }), /TOKENWATCH_MAX_WAIT_MS must be a number/);
    });
  });
});

// ============================================================================================
describe("4. Limiter", () => {
  const m = { key: "p/m", pool: "p/m", tpm: 1000, rpm: 10 };
  const est = (input: number, output = 0) => ({ input, output });
  const counted = (tokens: number, input = tokens, output = 0) => ({ requests: 0, tokens, input, output });
  /** Headers as fetch's Headers.get reads them. */
  const headers = (h: Record<string, string>) => (n: string) => h[n] ?? null;

  it("SlidingWindow forgets usage older than its span, and says when a part of it will have left", () => {
    const w = new SlidingWindow();
    w.add(0, { tokens: 100, requests: 1 });
    w.add(30_000, { tokens: 50, requests: 1, input: 40, output: 10 });
    assert.deepEqual(w.totals(59_999), { requests: 2, tokens: 150, input: 40, output: 10 });
    assert.equal(w.freeAt(59_999, "tokens", 100), 61_000, "the first 100 tokens leave with their second");
    assert.equal(w.freeAt(59_999, "tokens", 120), 91_000);
    assert.equal(w.freeAt(59_999, "tokens", 500), undefined, "the window never held that much");
    assert.deepEqual(w.totals(60_500), { requests: 1, tokens: 50, input: 40, output: 10 });
    w.add(45_000, { tokens: 7 }); // a clock a little behind: still inside the window, so it counts
    w.add(500, { tokens: 1000 }); // one far behind: that second has left the window already
    assert.equal(w.totals(60_500).tokens, 57);
    assert.equal(w.totals(91_000).tokens, 7);
    assert.equal(w.totals(106_000).tokens, 0);
    assert.ok(w.empty(200_000));
    const day = new SlidingWindow(24, 3_600_000);
    day.add(0, { requests: 1 });
    assert.equal(day.totals(23 * 3_600_000).requests, 1);
    assert.equal(day.totals(25 * 3_600_000).requests, 0);
  });

  it("reserve() admits requests while tokens stay under threshold x tpm, counting those in flight", () => {
    const l = new Limiter(0.8);
    assert.ok(l.reserve(m, est(500), 0).ok);
    assert.ok(l.reserve(m, est(300), 0).ok);             // 800 = 0.8 x 1000: still allowed
    const v = l.reserve(m, est(1), 0);
    assert.equal(!v.ok && v.why, "tpm");
  });

  it("models of one pool share one window (Kimi counts per account, Anthropic per model class), OpenAI's keep their own", () => {
    const c = cfg();
    const [k25, k26, gpt, opus, sonnet] = [model(c, "kimi/kimi-k2.5"), model(c, "kimi/kimi-k2.6"), model(c, "openai/gpt-4o"), model(c, "anthropic/claude-opus-5"), model(c, "anthropic/claude-sonnet-5")];
    assert.deepEqual([k25.pool, k26.pool, gpt.pool, opus.pool, sonnet.pool], ["kimi/account", "kimi/account", "openai/gpt-4o", "anthropic/opus", "anthropic/sonnet"]);
    const l = new Limiter(0.8);
    assert.ok(l.reserve(k25, est(1_000_000), 0).ok);
    assert.equal(l.headroom(k26, 0).tokens, 1_000_000);
    assert.equal(l.reserve(k26, est(700_000), 0).ok, false, "the account's 80% is taken through the other model");
    assert.ok(l.reserve(gpt, est(1000), 0).ok);
    l.cool(k25.pool, 5000, 0);
    assert.equal(l.headroom(k26, 1).coolUntil, 5000, "a 429 on one model of the account cools the account");
    const own = model(cfg(ALL_KEYS, { providers: { kimi: { models: { a: { input: 1, output: 1, tpm: 10, tier: "simple" }, b: { input: 1, output: 1, tpm: 10, tier: "simple", pool: "x" } } } } }), "kimi/a");
    assert.equal(own.pool, "kimi/a");
    assert.throws(() => cfg(ALL_KEYS, { providers: { kimi: { models: { a: { input: 1, output: 1, tpm: 10, tier: "simple", pool: "a b" } } } } }), /providers\.kimi\.models\.a\.pool must be a name/);
  });

  it("settle() replaces the estimate with what the provider counted", () => {
    const l = new Limiter(0.8);
    const r = l.reserve(m, est(700), 0);
    assert.ok(r.ok);
    assert.equal(l.reserve(m, est(200), 0).ok, false);
    l.settle(r.reservation, counted(100), 10);
    assert.equal(l.headroom(m, 10).tokens, 100);
    assert.ok(l.reserve(m, est(200), 10).ok);
  });

  it("frees capacity when the window slides past old usage (fake clock), and says when", () => {
    const l = new Limiter(0.8);
    const r = l.reserve(m, est(800), 0);
    assert.ok(r.ok);
    l.settle(r.reservation, counted(800), 0);
    const v = l.reserve(m, est(10), 30_000);
    assert.deepEqual(!v.ok && [v.why, v.until], ["tpm", 61_000]);
    assert.ok(l.reserve(m, est(10), 61_000).ok);
  });

  it("limits requests per minute at threshold x rpm", () => {
    const l = new Limiter(0.8);
    for (let i = 0; i < 8; i++) assert.ok(l.reserve(m, est(1), i).ok, `request ${i}`);
    const v = l.reserve(m, est(1), 9);
    assert.equal(!v.ok && v.why, "rpm");
    assert.ok(l.reserve(m, est(1), 61_000).ok);
  });

  it("lets an idle model take one request larger than its threshold", () => {
    const l = new Limiter(0.8);
    assert.ok(l.reserve(m, est(5000), 0).ok);
    assert.equal(l.reserve(m, est(1), 0).ok, false);
  });

  it("checks each dimension apart: Anthropic's output tokens bind for a large max_tokens while its input tokens are free", () => {
    const sonnet = model(cfg(), "anthropic/claude-sonnet-5"); // 50 rpm, 30,000 itpm, 8,000 otpm
    const l = new Limiter(0.8);
    assert.ok(l.reserve(sonnet, est(1000, 4000), 0).ok);
    const big = l.reserve(sonnet, est(1000, 3000), 0);
    assert.deepEqual(!big.ok && big.why, "otpm", "4,000 + 3,000 output tokens pass 80% of 8,000");
    assert.equal(big.dimensions.find((d) => d.dimension === "itpm")!.blocks, false, "the input tokens are free");
    assert.ok(l.reserve(sonnet, est(1000, 2000), 0).ok, "a smaller max_tokens fits");
  });

  it("counts what each provider counts: Anthropic's input leaves out cache reads, OpenAI's keeps them", () => {
    const u = { input: 100, cached: 5000, cache_write: 300, output: 40 };
    assert.deepEqual(countedOf("anthropic", u), { requests: 0, tokens: 440, input: 400, output: 40 });
    assert.deepEqual(countedOf("openai", u), { requests: 0, tokens: 5440, input: 5400, output: 40 });
  });

  it("counts requests in flight against concurrency, and requests and tokens over a sliding day", () => {
    const l = new Limiter(1);
    const k = { key: "kimi/x", pool: "kimi/x", concurrency: 2, rpd: 3, tpd: 1000 };
    const a = l.reserve(k, est(10), 0), b = l.reserve(k, est(10), 0);
    assert.ok(a.ok && b.ok);
    const c = l.reserve(k, est(10), 0);
    assert.deepEqual(!c.ok && [c.why, c.until], ["concurrency", undefined], "only an end frees it");
    l.settle(a.reservation, counted(10), 1);
    l.settle(b.reservation, counted(10), 1);
    assert.ok(l.reserve(k, est(10), 2).ok);
    const d = l.reserve(k, est(10), 3_000_000);
    assert.equal(!d.ok && d.why, "rpd", "three requests in the day");
    assert.ok(l.reserve(k, est(10), 25 * 3_600_000).ok, "a day later");
  });

  it("learns from OpenAI's headers what other clients of the key used, until the reset (a duration)", () => {
    const l = new Limiter(0.8);
    const gpt = { key: "openai/gpt-4o", pool: "openai/gpt-4o", tpm: 30_000, rpm: 500 };
    l.observe(gpt.pool, "openai", headers({ "x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "6000", "x-ratelimit-reset-tokens": "1m0s", "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499", "x-ratelimit-reset-requests": "120ms" }), 0);
    const v = l.reserve(gpt, est(100), 0);
    assert.deepEqual(!v.ok && [v.why, v.until], ["tpm", 60_000], "24,000 used by others: 80% is gone until the reset");
    assert.equal(l.headroom(gpt, 0).saturated, true);
    assert.ok(l.reserve(gpt, est(100), 30_000).ok, "half refilled by then");
  });

  it("learns from Anthropic's headers per dimension, with RFC 3339 resets", () => {
    const l = new Limiter(0.8);
    const haiku = model(cfg(), "anthropic/claude-haiku-4-5"); // 50,000 itpm, 10,000 otpm
    const at = (s: number) => new Date(s * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
    l.observe(haiku.pool, "anthropic", headers({
      "anthropic-ratelimit-input-tokens-limit": "50000", "anthropic-ratelimit-input-tokens-remaining": "49000", "anthropic-ratelimit-input-tokens-reset": at(60),
      "anthropic-ratelimit-output-tokens-limit": "10000", "anthropic-ratelimit-output-tokens-remaining": "1000", "anthropic-ratelimit-output-tokens-reset": at(60),
    }), 0);
    const v = l.reserve(haiku, est(1000, 500), 0);
    assert.deepEqual(!v.ok && [v.why, v.until], ["otpm", 60_000]);
    assert.ok(l.reserve(haiku, est(1000, 500), 60_000).ok);
  });

  it("takes the limit a provider reports over the configured one, higher or lower, and shows both", () => {
    const l = new Limiter(0.8);
    const gpt = { key: "openai/gpt-4o", pool: "openai/gpt-4o", tpm: 30_000 };
    l.observe(gpt.pool, "openai", headers({ "x-ratelimit-limit-tokens": "450000", "x-ratelimit-remaining-tokens": "450000", "x-ratelimit-reset-tokens": "0s" }), 0);
    assert.ok(l.reserve(gpt, est(100_000), 0).ok && l.reserve(gpt, est(100_000), 0).ok, "a higher tier gets its capacity without a config edit");
    const tpm = l.headroom(gpt, 0).dimensions.find((d) => d.dimension === "tpm")!;
    assert.deepEqual([tpm.configured, tpm.learned, tpm.limit], [30_000, 450_000, 450_000]);
    const low = new Limiter(0.8);
    low.observe(gpt.pool, "openai", headers({ "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "0s" }), 0);
    assert.ok(low.reserve(gpt, est(500), 0).ok);
    assert.equal(low.reserve(gpt, est(500), 0).ok, false, "and a lower one is kept to");
  });

  it("estimates the output as the client's cap, else from the model's recent answers (bounded), not a fixed worst case", () => {
    const l = new Limiter(0.8);
    const m = { key: "p/m", pool: "p/m" }; // no limits: only the estimate is looked at
    assert.equal(l.outputEstimate("p/m", 500, 4096), 500);
    assert.equal(l.outputEstimate("p/m", undefined, 4096), 1024, "before any answer");
    for (const out of [300, 700, 100]) {
      const r = l.reserve(m, est(1), 0);
      assert.ok(r.ok);
      l.settle(r.reservation, counted(out, 0, out), 0);
    }
    assert.equal(l.outputEstimate("p/m", undefined, 4096), 700, "the largest of the recent answers");
    assert.equal(l.outputEstimate("p/m", undefined, 500), 500, "never more than the fallback cap");
  });

  it("headroom() and reserve() agree: saturated exactly when a typical request would be refused", () => {
    const l = new Limiter(0.8);
    const typical = est(100, 100);
    for (let used = 0; used < 1000; used += 50) {
      const fresh = new Limiter(0.8);
      if (used) { const r = fresh.reserve(m, est(used), 0); assert.ok(r.ok); fresh.settle(r.reservation, counted(used), 0); }
      const h = fresh.headroom(m, 1, typical);
      assert.equal(h.saturated, !fresh.reserve(m, typical, 1).ok, `at ${used} tokens`);
    }
    assert.equal(l.headroom(m, 0).saturated, false);
  });

  it("cool() blocks a model until the time given", () => {
    const l = new Limiter(0.8);
    l.cool(m.pool, 5000, 0);
    const v = l.reserve(m, est(1), 4999);
    assert.deepEqual(!v.ok && [v.why, v.until], ["cooling", 5000]);
    assert.ok(l.reserve(m, est(1), 5000).ok);
    assert.equal(l.headroom(m, 4000).coolUntil, 5000);
  });

  it("headroom() reports use against the full limit, the dimension that binds, and saturation against the threshold", () => {
    const l = new Limiter(0.8);
    l.reserve(m, est(850), 0);
    const h = l.headroom(m, 0);
    assert.equal(h.percent, 85);
    assert.equal(h.binding, "tpm");
    assert.equal(h.saturated, true);
    assert.equal(h.inflight, 1);
  });

  it("onNextChange() fires once, on the next settle", () => {
    const l = new Limiter(0.8);
    let fired = 0;
    l.onNextChange(() => fired++);
    const r = l.reserve(m, est(10), 0);
    assert.ok(r.ok);
    l.release(r.reservation, 0);
    l.release(r.reservation, 0); // a second release is a no-op
    assert.equal(fired, 1);
    assert.equal(l.headroom(m, 0).inflight, 0);
  });

  it("refuses a config that names a dimension its provider does not limit, in one line", () => {
    assert.throws(() => cfg(ALL_KEYS, { providers: { anthropic: { models: { x: { input: 1, output: 1, rpd: 10, tier: "simple" } } } } }), /providers\.anthropic\.models\.x\.rpd is not a limit Anthropic has \(its dimensions: rpm, itpm, otpm, tpm\)/);
    assert.throws(() => cfg(ALL_KEYS, { providers: { openai: { models: { x: { input: 1, output: 1, limit: 10, tpm: 10, tier: "simple" } } } } }), /limit is the older name of tpm/);
    const old = model(cfg(ALL_KEYS, { providers: { openai: { models: { x: { input: 1, output: 1, limit: 10, tier: "simple" } } } } }), "openai/x");
    assert.equal(configuredLimit(old, "tpm"), 10, "an old config's limit is its tpm");
  });
});

// ============================================================================================
describe("5. Selector", () => {
  const c = cfg();

  it("route() with complexity simple orders every candidate cheapest first", () => {
    const r = route({ ...user("hi"), complexity: "simple" }, c);
    assert.deepEqual(ids(r.candidates), ["gpt-4o-mini", "kimi-k2.5", "kimi-k2.6", "claude-haiku-4-5", "claude-sonnet-5", "gpt-4o", "claude-opus-5"]);
    assert.equal(r.complexity, "simple");
  });

  it("route() with complexity complex puts complex models by priority, then the simple ones", () => {
    const r = route({ ...user("hi"), complexity: "complex" }, c);
    assert.deepEqual(ids(r.candidates), ["claude-sonnet-5", "claude-opus-5", "gpt-4o", "claude-haiku-4-5", "kimi-k2.5", "kimi-k2.6", "gpt-4o-mini"]);
  });

  it("route() takes the hint from the x-tokenwatch-complexity header and refuses a bad one", () => {
    assert.equal(route(user("hi"), c, "complex").candidates[0].id, "claude-sonnet-5");
    assert.throws(() => route(user("hi"), c, "hard"), /x-tokenwatch-complexity must be "simple" or "complex"/);
  });

  it("route() ranks a named model by the hint when both are given (the seed's example)", () => {
    const r = route({ ...user("hi"), model: "claude-opus-4-5", complexity: "simple" }, c);
    assert.equal(r.candidates[0].id, "gpt-4o-mini");
    assert.match(r.reason, /requested claude-opus-4-5 is ranked by the hint/);
  });

  it("route() puts the requested model first, then the others of its tier in that tier's order", () => {
    assert.deepEqual(ids(route({ ...user("hi"), model: "gpt-4o" }, c).candidates), ["gpt-4o", "claude-sonnet-5", "claude-opus-5"]);
    assert.deepEqual(ids(route({ ...user("hi"), model: "kimi-k2.6" }, c).candidates), ["kimi-k2.6", "gpt-4o-mini", "kimi-k2.5", "claude-haiku-4-5"]);
  });

  it("route() resolves aliases and says so", () => {
    const r = route({ ...user("hi"), model: "kimi-k1.5" }, c);
    assert.equal(r.candidates[0].key, "kimi/kimi-k2.5");
    assert.match(r.reason, /alias of kimi-k2.5/);
  });

  it("route() skips a requested model whose provider has no key, and says why", () => {
    const r = route({ ...user("hi"), model: "claude-opus-5" }, cfg({ OPENAI_API_KEY: "k" }));
    assert.deepEqual(ids(r.candidates), ["gpt-4o"]);
    assert.match(r.reason, /unavailable: Anthropic has no key \(set ANTHROPIC_API_KEY\)/);
  });

  it("route() falls back to the other tier when no model of the requested tier is enabled", () => {
    const r = route({ ...user("hi"), model: "claude-opus-5" }, cfg({ KIMI_API_KEY: "k" }));
    assert.deepEqual(ids(r.candidates), ["kimi-k2.5", "kimi-k2.6"]);
    assert.match(r.reason, /no complex model is enabled/);
  });

  it("route() answers an unknown model with 404 model_not_found listing what exists", () => {
    assert.throws(() => route({ ...user("hi"), model: "gpt-9" }, c), (e: unknown) =>
      e instanceof TwError && e.status === 404 && e.code === "model_not_found" && /gpt-4o-mini/.test(e.message) && /kimi-k1.5/.test(e.message));
    assert.throws(() => route({ ...user("hi"), model: "gpt-9", complexity: "simple" }, c), /does not exist here/);
  });

  it("route() sends provider/model exactly there, unpriced when not in the table", () => {
    const r = route({ ...user("hi"), model: "openai/gpt-5" }, c);
    assert.equal(r.candidates.length, 1);
    assert.deepEqual([r.candidates[0].key, r.candidates[0].priced, r.candidates[0].input], ["openai/gpt-5", false, 0]);
    assert.match(r.reason, /unpriced/);
    const known = route({ ...user("hi"), model: "openai/gpt-4o" }, c).candidates[0];
    assert.equal(known.priced, true);
    assert.throws(() => route({ ...user("hi"), model: "openai/gpt-5" }, cfg({ KIMI_API_KEY: "k" })), /Provider "openai" is not enabled: no key \(set OPENAI_API_KEY\)/);
  });

  it("route() leaves out candidates that cannot give n > 1 choices, and refuses when none can", () => {
    const r = route({ ...user("hi"), complexity: "complex", n: 2 }, c);
    assert.deepEqual(ids(r.candidates), ["gpt-4o", "gpt-4o-mini"]);
    assert.throws(() => route({ ...user("hi"), model: "claude-opus-5", n: 3 }, cfg({ ANTHROPIC_API_KEY: "k" })), /"n": 3 is not supported/);
  });

  it("route() answers 503 when no provider is enabled at all", () => {
    assert.throws(() => route(user("hi"), cfg({})), (e: unknown) => e instanceof TwError && e.status === 503 && /set ANTHROPIC_API_KEY/.test(e.message));
  });

  describe("classify() and auto routing", () => {
    const log = "2025-11-17T14:31:40.433Z INFO  [api] req_id=f6d6bc64e5a2 method=GET path=/v2/orders status=200 ms=41\n".repeat(300);
    const agent = (task: string, result: string, edited: boolean): ChatRequest => ({
      messages: [
        { role: "system", content: "You are a coding agent. ".repeat(400) }, { role: "user", content: task },
        ...(edited ? [{ role: "assistant" as const, content: null, tool_calls: [{ id: "e", type: "function" as const, function: { name: "Edit", arguments: "{\"file_path\":\"src/a.ts\"}" } }] }, { role: "tool" as const, tool_call_id: "e", content: "ok" }] : []),
        { role: "assistant", content: null, tool_calls: [{ id: "t", type: "function", function: { name: "Bash", arguments: "{\"command\":\"npm test\"}" } }] },
        { role: "tool", tool_call_id: "t", content: result },
      ],
      tools: [{ type: "function", function: { name: "Bash" } }, { type: "function", function: { name: "Edit" } }],
    });
    const cases: [string, ChatRequest, "simple" | "complex", RegExp][] = [
      ["a greeting", user("Hello there, thanks!"), "simple", /small talk/],
      ["a translation", user("Translate 'the cat sleeps' to French"), "simple", /translation/],
      ["a huge pasted log with a trivial ask", user(`what's the request id of the 500 in this?\n\n${log}`), "simple", /.*/],
      ["a one-line hard question", user("Why would adding a mutex make this service slower on 2 cores than on 1?"), "complex", /cause/],
      ["an agent step: the tests passed", agent("add a --dry-run flag and run the tests", "PASS src/cleanup.test.ts\nTests: 12 passed, 12 total", true), "simple", /run passed/],
      ["a follow-up approving a proof", { messages: [{ role: "user", content: "Prove that every planar graph is 5-colourable." }, { role: "assistant", content: "Here is the plan:\n1. Euler's formula\n2. a vertex of degree at most 5\n3. induction on the vertices\nShall I write it out?" }, { role: "user", content: "yes" }] }, "complex", /.*/],
      ["a follow-up approving a rename", { messages: [{ role: "user", content: "Rename getUser to fetchUser in api.ts" }, { role: "assistant", content: "Done in api.ts. Rename the tests too?" }, { role: "user", content: "yes" }] }, "simple", /.*/],
    ];
    for (const [name, req, tier, re] of cases)
      it(`classifies ${name} as ${tier} and names its signals`, () => {
        const v = classify(req);
        assert.equal(v.tier, tier, `p = ${v.p}, ${v.signals.join("; ")}`);
        assert.ok(v.p >= 0 && v.p <= 1);
        const r = route({ ...req, model: "auto" }, c);
        assert.equal(r.complexity, tier);
        assert.match(r.reason, re);
        assert.match(r.reason, new RegExp(`^auto: ${tier} \\(`));
      });

    it("reads a nine-word bug report as a cause and a symptom, and is complex about it or unsure (what a second opinion is for)", () => {
      // short "why does X" asks are lookups as often as bug hunts in the labelled set, so a short one sits near the threshold
      const req = user("Please debug this, it returns the wrong total sometimes:\n```js\nfunction f(x) { return x.y }\n```");
      const { named } = classifierFeatures(req), v = classify(req);
      assert.deepEqual([named.cause, named.symptom], [1, 1]);
      assert.ok(v.tier === "complex" || v.unsure, `p = ${v.p}`);
    });

    it("reads an agent step whose tests still fail after its edit as such, and is complex about it or unsure", () => {
      // a five-word ask with a two-call run: the labelled set's agent steps carry longer asks and runs, so this one sits near the threshold
      const req = agent("fix the failing invoice tests", "FAIL src/invoice.test.ts\n  × totals include tax\nTests: 1 failed, 11 passed", true);
      const { named } = classifierFeatures(req), v = classify(req);
      assert.equal(named["failed after an edit"], 1);
      assert.ok(v.tier === "complex" || v.unsure, `p = ${v.p}`);
    });

    it("reads the ask, not what was pasted into it: the same document with a trivial and a hard question", () => {
      const doc = "Section 4.2 Termination. Either party may terminate this Agreement for convenience with ninety (90) days written notice. ".repeat(60);
      assert.equal(askText(`Summarise this:\n\n${doc}`), "Summarise this:");
      assert.equal(askText(`${doc}\n\nWhat is the notice period?`).endsWith("What is the notice period?"), true);
      assert.equal(askText("Fix this:\n```ts\nconst a = 1\n```\nplease").includes("const a"), false);
    });

    it("tells pasted tables, lists and documents from the sentences around them", () => {
      const rows = Array.from({ length: 40 }, (_, i) => ` 2025-10-${String(i % 28 + 1).padStart(2, "0")} | NO      | NOK      | ${1000 + i} | 3883${i}.43`).join("\n");
      // a table under a question: the question is the ask, even when it starts like Python ("from this export…")
      assert.equal(askText(`from this export, what was Norway's revenue on 14 Oct?\n\n    day     | country | currency | invoices | revenue\n${rows}\n(40 rows)`), "from this export, what was Norway's revenue on 14 Oct?");
      // one line with pipes in it is a sentence, not a table
      assert.equal(askText("run the tests and give me a markdown table: file | test | error"), "run the tests and give me a markdown table: file | test | error");
      // a sentence that mentions a time of day or ends in a brace is still a sentence
      const spec = "must not run twice if the pod restarts at 18:00:30, and it should only run on the last business day of every month";
      assert.equal(askText(spec), spec);
      // the items of a list after an instruction are its material
      assert.equal(askText("Classify each review as positive, negative or neutral:\n1. \"Arrived broken, never again\"\n2. \"Fine\"\n3. \"Crashes every time I open it\""), "Classify each review as positive, negative or neutral:");
      // a document first and a short question at its end: the question is the ask
      const policy = "3.1 Meals while travelling: up to USD 75 per person per day, USD 95 in New York City and London. ".repeat(8);
      assert.equal(askText(`Travel & Expense Policy\n${policy}\n\nI had a client dinner for three at $318. Is that within policy?`), "I had a client dinner for three at $318. Is that within policy?");
    });

    it("reads an instruction before the text it points at, a question before a paste, and what the ask says not to do", () => {
      const notice = "Sie suchen ein neues Fahrrad. Dann sind Sie bei uns genau richtig. Seit 1987 beraten wir Sie persönlich.\nWir freuen uns auf Ihren Besuch!\n".repeat(3);
      assert.equal(askText(`Kannst du diesen Text von Sie auf du umstellen? Sonst bitte nix ändern.\n\n${notice}`), "Kannst du diesen Text von Sie auf du umstellen? Sonst bitte nix ändern.");
      const news = "国家医保局日前发布通知，明确自2026年1月1日起推进门诊共济保障机制改革的后续措施。".repeat(4);
      assert.equal(askText(`用三句话帮我概括一下这篇新闻，给我爸妈看的\n\n${news}\n\n${news}`), "用三句话帮我概括一下这篇新闻，给我爸妈看的");
      const contract = "CONTRAT DE TRAVAIL À DURÉE INDÉTERMINÉE. Le salarié est engagé à compter du 1er mars. ".repeat(8);
      assert.equal(askText(`c'est quoi la durée de la période d'essai ?\n\n${contract}`), "c'est quoi la durée de la période d'essai ?");
      const named = (ask: string) => classifierFeatures(user(ask)).named;
      assert.equal(named("format my notes into the issue template. don't try to debug it").cause, undefined);
      assert.equal(named("why does the upload fail on Android?").cause, 1);
      // names from the code are what the work is on, not what it is
      assert.equal(named("El test de formatPrice falla en CI pero en mi máquina pasa. Arréglalo.").reformat, undefined);
      assert.equal(named("format the prices as a table").reformat, 1);
    });

    it("keeps the ask after a header, a first sentence or a question that points at no paste, and reads times and curly quotes as prose", () => {
      const etl = "Our nightly ETL job sometimes takes 6 hours instead of 40 minutes, only on Mondays. Find the root cause and propose a fix that keeps the run under an hour.";
      assert.equal(askText(`Problem:\n${etl}`), `Problem:\n${etl}`, "a one-word header is not an instruction whose material follows");
      const report = "Customers are sometimes charged twice when the provider times out and our retry fires. Design a fix that charges at most once, without a distributed lock.";
      assert.equal(askText(`This is for the billing service.\n\n${report}`), `This is for the billing service.\n\n${report}`, "what follows asks for the task: it is the ask");
      assert.equal(askText(`Can you help me with something?\n\n${report}`).includes("Design a fix"), true);
      assert.equal(askText("at 03:12:45 every night the backup job hangs for exactly ten minutes, why?"), "at 03:12:45 every night the backup job hangs for exactly ten minutes, why?");
      assert.equal(askText("why?\n    at async run (node:internal/modules/run_main:123:5)\nat /app/src/x.js:10:5"), "why?", "stack frames are still material");
      assert.equal(classifierFeatures(user("format my notes into the issue template, don’t debug it")).named.cause, undefined, "a curly apostrophe negates too");
    });

    it("reads full-width punctuation in follow-ups, needs a pause after an opening approval, and knows more failed runs and constraints", () => {
      const plan = (last: string): ChatRequest => ({ messages: [{ role: "user", content: "Build the invoice export with background jobs and retries" }, { role: "assistant", content: "Plan:\n1. schema\n2. api\n3. ui\n4. db migration" }, { role: "user", content: last }] });
      assert.equal(classifierFeatures(plan("好的，继续。不过第四步先跳过，数据库迁移等下周再做，先把前端部分做完")).named["approval with more"], 1);
      assert.equal(classifierFeatures(plan("はい。")).named.approval, 1);
      assert.equal(classifierFeatures(plan("B-tree inserts got ten times slower after the upgrade, and only for the largest tenants")).named["approval with more"], undefined);
      const run = (out: string) => classifierFeatures({ messages: [{ role: "user", content: "run the importer" }, { role: "assistant", content: null, tool_calls: [{ id: "t", type: "function", function: { name: "Bash", arguments: "{}" } }] }, { role: "tool", tool_call_id: "t", content: out }] }).named;
      assert.equal(run("panic: runtime error: index out of range [3] with length 3")["a run failed"], 1);
      assert.equal(run("importer stopped\nexit code 137")["a run failed"], 1);
      assert.equal(classifierFeatures(user("keep the error rate within 5% and the bill under 300€")).named.constraints, 0.8, "within, under, 5%, 300€");
    });

    it("takes a longer turn that opens by approving the last answer as a follow-up of that work", () => {
      const conv = (last: string): ChatRequest => ({ messages: [
        { role: "user", content: "Design the retry policy for our payment webhooks, with side effects at most once" },
        { role: "assistant", content: "A design:\n1. idempotency keys\n2. an outbox table\n3. backoff with jitter\nShall I implement it?" },
        { role: "user", content: last },
      ] });
      for (const last of ["looks good, go ahead. skip the outbox for now, the session table stays until the rest is out", "а если вебхук придёт дважды через неделю, после очистки ключей?"]) {
        const f = classifierFeatures(conv(last)).named;
        assert.equal(f["approval with more"], 1, last);
        assert.equal(f.design, 0.8, `${last}: it continues the design`);
      }
      assert.equal(classifierFeatures(conv("Completely new question: which logging levels does pino have by default and in what order")).named.design, undefined);
      // "yes" is as long an ask as the work it approves
      assert.ok(classifierFeatures(conv("yes")).named["ask length"] > classifierFeatures(user("yes")).named["ask length"]);
    });

    it("counts a program asked for with requirements, in any language's word order", () => {
      const spec = (ask: string) => classifierFeatures(user(ask)).named;
      assert.equal(spec("Écris une fonction Python pour partager une addition, avec ces règles :\n- chaque plat à une ou plusieurs personnes\n- le pourboire au prorata\n- arrondi au centime")["a program with requirements"], 1);
      assert.equal(spec("用 Go 写一个 worker pool：最多 N 个并发，支持取消；不能有 goroutine 泄漏。不要用 errgroup。")["a program with requirements"], 1);
      assert.equal(spec("write a python function that adds two numbers")["a program with requirements"], undefined);
      assert.equal(spec("what is a function?").code, undefined);
    });
  });
});

// ============================================================================================
describe("6. Adapters", () => {
  const c = cfg();
  const sonnet = model(c, "anthropic/claude-sonnet-5"), haiku = model(c, "anthropic/claude-haiku-4-5");
  const kimi = model(c, "kimi/kimi-k2.5"), gpt = model(c, "openai/gpt-4o");

  describe("kind openai", () => {
    it("forwards only fields OpenAI knows; complexity never leaves", () => {
      const body = openAIBody({ ...user("hi"), complexity: "simple", thinking: { type: "enabled" }, top_k: 3, temperature: 0.5, seed: 1 }, gpt, false);
      assert.deepEqual(body, { messages: [{ role: "user", content: "hi" }], temperature: 0.5, seed: 1, model: "gpt-4o" });
    });

    it("upstreamMessages() drops unknown message keys, adds reasoning_content where required, and copies nothing otherwise", () => {
      const clean: ChatRequest["messages"] = [{ role: "user", content: "hi" }];
      assert.equal(upstreamMessages(clean, false), clean);
      const msgs: ChatRequest["messages"] = [{ role: "user", content: "hi", id: "m1" }, { role: "assistant", content: null, tool_calls: [{ id: "c", type: "function", function: { name: "f", arguments: "{}" } }] }];
      assert.deepEqual(upstreamMessages(msgs, false), [{ role: "user", content: "hi" }, msgs[1]]);
      assert.deepEqual(upstreamMessages(msgs, true)[1], { ...msgs[1], reasoning_content: " " });
      assert.equal(msgs[0].id, "m1"); // the client's request is not changed
    });

    it("sends the output cap under the name each provider wants", () => {
      assert.equal(openAIBody({ ...user("hi"), max_tokens: 10 }, gpt, false).max_completion_tokens, 10);
      assert.equal(openAIBody({ ...user("hi"), max_completion_tokens: 10 }, kimi, false).max_tokens, 10);
      assert.equal(openAIBody({ ...user("hi"), max_completion_tokens: 10 }, kimi, false).max_completion_tokens, undefined);
    });

    it("drops sampling for fixed-sampling models and clamps Kimi's temperature to [0, 1]", () => {
      assert.equal(openAIBody({ ...user("hi"), temperature: 1.7, top_p: 0.5 }, kimi, false).temperature, undefined);
      const k26 = { ...model(c, "kimi/kimi-k2.6"), fixed_sampling: false };
      assert.equal(openAIBody({ ...user("hi"), temperature: 1.7 }, k26, false).temperature, 1);
    });

    it("always asks a stream for usage, keeping the client's other stream options", () => {
      assert.deepEqual(openAIBody({ ...user("hi"), stream: true }, gpt, true).stream_options, { include_usage: true });
      assert.deepEqual(openAIBody({ ...user("hi"), stream: true, stream_options: { include_usage: false, include_obfuscation: false } }, gpt, true).stream_options, { include_usage: true, include_obfuscation: false });
    });

    it("sends the client's own bytes when they need no change, and otherwise exactly what openAIBody() builds", () => {
      const k26 = { ...model(c, "kimi/kimi-k2.6"), fixed_sampling: false };
      const cases: [ChatRequest, Model, boolean][] = [
        [{ ...user("hi"), model: "gpt-4o", max_completion_tokens: 5, temperature: 0.2 }, gpt, true],
        [{ ...user("hi"), model: "gpt-4o", stream: true, stream_options: { include_usage: true } }, gpt, true],
        [{ ...user("hi"), model: "kimi-k2.5", max_tokens: 5 }, kimi, true],
        [{ ...user("hi"), model: "gpt-4o", max_tokens: 5 }, gpt, false],                      // renamed to max_completion_tokens
        [{ ...user("hi"), model: "gpt-4o", max_tokens: 5, max_completion_tokens: 6 }, gpt, false],
        [{ ...user("hi"), model: "auto" }, gpt, false],                                         // the router picked the model
        [{ ...user("hi"), model: "gpt-4o", complexity: "simple" }, gpt, false],                // TokenWatch's own hint
        [{ ...user("hi"), model: "gpt-4o", seed: null }, gpt, false],                          // nulls are dropped
        [{ ...user("hi"), model: "gpt-4o", stream: true }, gpt, false],                        // usage must be asked for
        [{ ...user("hi"), model: "gpt-4o", stream: false }, gpt, false],
        [{ ...user("hi"), model: "kimi-k2.5", temperature: 0.3 }, kimi, false],                // fixed sampling
        [{ ...user("hi"), model: "kimi-k2.6", temperature: 1.5 }, k26, false],                 // clamped to 1
        [{ ...user("hi"), model: "kimi-k2.6", temperature: 0.5 }, k26, true],
        [{ model: "gpt-4o", messages: [{ role: "user", content: "hi", id: "m1" }] }, gpt, false], // unknown message key
      ];
      for (const [req, m, same] of cases) {
        const text = ` ${JSON.stringify(req)}`; // a leading space: only the client's own text has one
        const job = { p: { hub: req, body: req, text, stream: req.stream === true, forward: {} } } as never;
        const { body } = ENTRIES.chat!.nativeRequest(job, m);
        assert.equal(body === text, same, JSON.stringify(req));
        assert.equal(openAIRequest(req, m, req.stream === true).changed, !same);
        const sent = JSON.parse(body);
        assert.deepEqual(sent, JSON.parse(JSON.stringify(openAIBody(req, m, req.stream === true))), JSON.stringify(req));
      }
    });

    it("turns any error body into a readable message: JSON, HTML or text", () => {
      const e = ADAPTERS.openai.error;
      assert.deepEqual(e(400, JSON.stringify({ error: { message: "bad", type: "invalid_request_error", code: "x" } })), { message: "bad", type: "invalid_request_error", code: "x" });
      assert.match(e(502, "<html><body>Bad gateway</body></html>").message, /502 with an HTML page/);
      assert.match(e(500, "").message, /an empty body/);
    });

    const chunk = (o: object) => Buffer.from(`data: ${JSON.stringify(o)}\n\n`);
    const base = { id: "c1", object: "chat.completion.chunk", created: 1, model: "gpt-4o" };
    /** The Chat Completions passthrough of a stream, as the dispatcher drives it: events, then `end` with the usage and its cost. */
    const tap = (m: Model, includeUsage: boolean) => {
      const t = ENTRIES.chat!.nativeTap(parsed({ messages: [], stream: true, stream_options: { include_usage: includeUsage } }), m);
      return Object.assign(t, { finish: () => String(t.end(t.usage!, costUsd(m, t.usage!))) });
    };

    it("passes stream events through byte for byte and adds cost_usd to the usage chunk asked for, sent once before [DONE]", () => {
      const tr = tap(gpt, true);
      const first = chunk({ ...base, choices: [{ index: 0, delta: { content: "Hi" }, finish_reason: null }], usage: null });
      assert.equal(tr.feed(first), first);
      assert.equal(tr.feed(chunk({ ...base, choices: [], usage: { prompt_tokens: 100, completion_tokens: 10, total_tokens: 110 } })), null, "held until [DONE]");
      assert.equal(tr.feed(Buffer.from("data: [DONE]\n\n")), null, "[DONE] goes out after the row is committed");
      const [usage, done] = tr.finish().split("\n\n");
      assert.equal(JSON.parse(usage.slice(6)).usage.cost_usd, costUsd(gpt, { input: 100, cached: 0, cache_write: 0, output: 10 }));
      assert.equal(done, "data: [DONE]");
      assert.equal(tr.done, true);
    });

    it("drops the usage chunk when the client did not ask, but still counts it", () => {
      const tr = tap(gpt, false);
      assert.equal(tr.feed(chunk({ ...base, choices: [], usage: { prompt_tokens: 5, completion_tokens: 1, total_tokens: 6 } })), null);
      assert.deepEqual(tr.usage, { input: 5, cached: 0, cache_write: 0, output: 1 });
      tr.feed(Buffer.from("data: [DONE]\n\n"));
      assert.equal(tr.finish(), "data: [DONE]\n\n");
    });

    it("uses the last usage an upstream sends for the client's usage chunk and for the log alike", () => {
      const tr = tap(gpt, true);
      tr.feed(chunk({ ...base, choices: [], usage: { prompt_tokens: 10, completion_tokens: 1, total_tokens: 11 } }));
      tr.feed(chunk({ ...base, choices: [], usage: { prompt_tokens: 1000, completion_tokens: 100, total_tokens: 1100 } }));
      tr.feed(Buffer.from("data: [DONE]\n\n"));
      const sent = tr.finish().split("\n\n").filter((e) => e.includes("usage"));
      assert.equal(sent.length, 1, "one usage chunk");
      assert.deepEqual(tr.usage, { input: 1000, cached: 0, cache_write: 0, output: 100 });
      assert.equal(JSON.parse(sent[0].slice(6)).usage.cost_usd, costUsd(gpt, tr.usage!));
    });

    it("reads Kimi's usage inside choices[0] and gives the client a usage chunk before [DONE]", () => {
      const tr = tap(kimi, true);
      tr.feed(chunk({ ...base, choices: [{ index: 0, delta: { content: "x" }, finish_reason: null }] }));
      tr.feed(chunk({ ...base, choices: [{ index: 0, delta: {}, finish_reason: "stop", usage: { prompt_tokens: 9, completion_tokens: 2, total_tokens: 11, cached_tokens: 4 } }] }));
      tr.feed(Buffer.from("data: [DONE]\n\n"));
      const tail = tr.finish();
      const [usageEvent, done] = tail.split("\n\n");
      assert.deepEqual(JSON.parse(usageEvent.slice(6)).usage, { prompt_tokens: 9, completion_tokens: 2, total_tokens: 11, prompt_tokens_details: { cached_tokens: 4 }, cost_usd: costUsd(kimi, { input: 5, cached: 4, cache_write: 0, output: 2 }) });
      assert.equal(done, "data: [DONE]");
    });

    it("decodes a text chunk the same on its fast path (OpenAI's field order) as by a full parse: escapes, quotes, unicode", () => {
      const texts = ["plain", "a \"quoted\" word", "back\\slash\nnew line", "é 😀 \u2028", ""];
      for (const text of texts) {
        const fast = ADAPTERS.openai.decoder(gpt, 0), slow = ADAPTERS.openai.decoder(gpt, 0);
        for (const d of [fast, slow]) d.feed(chunk({ ...base, choices: [{ index: 0, delta: { role: "assistant", content: "" }, finish_reason: null }] }));
        const a = fast.feed(chunk({ ...base, choices: [{ index: 0, delta: { content: text }, logprobs: null, finish_reason: null }], usage: null }));
        const b = slow.feed(chunk({ choices: [{ delta: { content: text }, index: 0, finish_reason: null }], ...base })); // another field order: the full parse
        assert.deepEqual(a, b, JSON.stringify(text));
        assert.deepEqual(a, text ? [{ type: "text", text }] : []);
      }
      const anthropic = (text: string, order: boolean) => ADAPTERS.anthropic.decoder(haiku, 0).feed(Buffer.from(`event: content_block_delta\ndata: ${JSON.stringify(order ? { type: "content_block_delta", index: 0, delta: { type: "text_delta", text } } : { index: 0, type: "content_block_delta", delta: { text, type: "text_delta" } })}\n\n`));
      for (const text of texts) assert.deepEqual(anthropic(text, true), anthropic(text, false), JSON.stringify(text));
    });

    it("turns a mid-stream error event into an error, not content", () => {
      const tr = tap(gpt, false);
      assert.equal(tr.feed(chunk({ error: { message: "boom", type: "server_error" } })), null);
      assert.equal(tr.error?.message, "boom");
    });
  });

  describe("kind anthropic: request", () => {
    it("moves system and developer messages to `system`, in order", () => {
      const { system, turns } = toAnthropicMessages([{ role: "system", content: "A" }, { role: "user", content: "hi" }, { role: "developer", content: [{ type: "text", text: "B" }] }]);
      assert.deepEqual(system, [{ type: "text", text: "A" }, { type: "text", text: "B" }]);
      assert.deepEqual(turns, [{ role: "user", content: [{ type: "text", text: "hi" }] }]);
    });

    it("translates images from data URLs and http URLs, and PDFs to documents", () => {
      const { turns } = toAnthropicMessages([{ role: "user", content: [
        { type: "text", text: "look" },
        { type: "image_url", image_url: { url: "data:image/png;base64,AAAA" } },
        { type: "image_url", image_url: { url: "https://example.com/cat.jpg" } },
        { type: "file", file: { file_data: "data:application/pdf;base64,JVBE" } },
      ] }]);
      assert.deepEqual(turns[0].content, [
        { type: "text", text: "look" },
        { type: "image", source: { type: "base64", media_type: "image/png", data: "AAAA" } },
        { type: "image", source: { type: "url", url: "https://example.com/cat.jpg" } },
        { type: "document", source: { type: "base64", media_type: "application/pdf", data: "JVBE" } },
      ]);
    });

    it("refuses content parts Anthropic cannot take, saying what to send instead", () => {
      assert.throws(() => toAnthropicMessages([{ role: "user", content: [{ type: "input_audio" }] }]), /"input_audio" part, which Anthropic models cannot take/);
    });

    it("turns tool calls into tool_use and tool messages into tool_result blocks at the start of one user turn", () => {
      const { turns } = toAnthropicMessages([
        { role: "user", content: "weather?" },
        { role: "assistant", content: "", tool_calls: [{ id: "c1", type: "function", function: { name: "w", arguments: "{\"city\":\"Paris\"}" } }, { id: "c2", type: "function", function: { name: "w", arguments: "" } }] },
        { role: "tool", tool_call_id: "c1", content: "sunny" },
        { role: "tool", tool_call_id: "c2", content: [{ type: "text", text: "rain" }] },
        { role: "user", content: "thanks" },
      ]);
      assert.deepEqual(turns, [
        { role: "user", content: [{ type: "text", text: "weather?" }] },
        { role: "assistant", content: [{ type: "tool_use", id: "c1", name: "w", input: { city: "Paris" } }, { type: "tool_use", id: "c2", name: "w", input: {} }] },
        { role: "user", content: [{ type: "tool_result", tool_use_id: "c1", content: "sunny" }, { type: "tool_result", tool_use_id: "c2", content: "rain" }, { type: "text", text: "thanks" }] },
      ]);
    });

    it("maps tool ids Anthropic refuses (Kimi's \"functions.f:0\") the same way on both sides", () => {
    const { turns } = toAnthropicMessages([
      { role: "assistant", tool_calls: [{ id: "functions.get_weather:0", type: "function", function: { name: "get_weather", arguments: "{}" } }] },
      { role: "tool", tool_call_id: "functions.get_weather:0", content: "sunny" },
    ]);
    assert.equal(turns[0].content[0].id, "functions_get_weather_0");
    assert.equal(turns[1].content[0].tool_use_id, "functions_get_weather_0");
  });

  it("drops empty text and merges same-role turns", () => {
      const { turns } = toAnthropicMessages([{ role: "user", content: "a" }, { role: "user", content: "  " }, { role: "user", content: [{ type: "text", text: "" }, { type: "text", text: "b" }] }]);
      assert.deepEqual(turns, [{ role: "user", content: [{ type: "text", text: "a" }, { type: "text", text: "b" }] }]);
    });

    it("refuses tool call arguments that are not a JSON object", () => {
      assert.throws(() => toAnthropicMessages([{ role: "assistant", tool_calls: [{ id: "c", type: "function", function: { name: "f", arguments: "[1]" } }] }]), /must be a JSON object string/);
    });

    it("always sends max_tokens, maps stop, tools, tool_choice and user, and clamps temperature", () => {
      const body = anthropicBody({ ...user("hi"), temperature: 1.5, top_p: 0.9, stop: "END", user: "u1", tools: [{ type: "function", function: { name: "f", description: "d", parameters: { type: "object", properties: { a: { type: "string" } } } } }], tool_choice: { type: "function", function: { name: "f" } }, parallel_tool_calls: false }, haiku, 4096);
      const cached = { cache_control: { type: "ephemeral" } };
      assert.deepEqual(body, {
        model: "claude-haiku-4-5", max_tokens: 4096, messages: [{ role: "user", content: [{ type: "text", text: "hi", ...cached }] }],
        temperature: 1, top_p: 0.9, stop_sequences: ["END"], metadata: { user_id: "u1" },
        tools: [{ name: "f", description: "d", input_schema: { type: "object", properties: { a: { type: "string" } } }, ...cached }],
        tool_choice: { type: "tool", name: "f", disable_parallel_tool_use: true },
      });
    });

    it("marks prompt-cache breakpoints after the tools, the system prompt and the last message, unless prompt_cache is off", () => {
      const req: ChatRequest = {
        messages: [{ role: "system", content: "rules" }, { role: "developer", content: "more rules" }, { role: "user", content: "q1" }, { role: "assistant", content: "a1" }, { role: "user", content: [{ type: "text", text: "q2" }, { type: "text", text: "q3" }] }],
        tools: [{ type: "function", function: { name: "f" } }, { type: "function", function: { name: "g" } }],
      };
      const marked = (body: Record<string, any>) => JSON.stringify(body).split("cache_control").length - 1;
      const body = anthropicBody(req, haiku, 10) as Record<string, any>;
      assert.equal(marked(body), 3);
      assert.deepEqual([body.tools[1].cache_control, body.system[1].cache_control, body.messages[2].content[1].cache_control], [{ type: "ephemeral" }, { type: "ephemeral" }, { type: "ephemeral" }]);
      assert.equal(marked(anthropicBody({ messages: [{ role: "user", content: "hi" }] }, haiku, 10)), 1);
      const off = model(cfg(ALL_KEYS, { providers: { anthropic: { prompt_cache: false } } }), "anthropic/claude-haiku-4-5");
      assert.equal(marked(anthropicBody(req, off, 10)), 0);
      assert.throws(() => cfg(ALL_KEYS, { providers: { anthropic: { prompt_cache: "yes" } } }), /providers\.anthropic\.prompt_cache must be true or false/);
    });

    it("maps every tool_choice", () => {
      const tc = (tool_choice: ChatRequest["tool_choice"]) => anthropicBody({ ...user("hi"), tools: [{ type: "function", function: { name: "f" } }], tool_choice }, haiku, 10).tool_choice;
      assert.deepEqual(tc("auto"), { type: "auto" });
      assert.deepEqual(tc("required"), { type: "any" });
      assert.deepEqual(tc("none"), { type: "none" });
      assert.equal(tc(undefined), undefined);
    });

    it("takes max_completion_tokens over max_tokens, and leaves sampling out for fixed-sampling models", () => {
      const body = anthropicBody({ ...user("hi"), max_tokens: 5, max_completion_tokens: 7, temperature: 0.2 }, sonnet, 4096);
      assert.equal(body.max_tokens, 7);
      assert.equal(body.temperature, undefined);
    });

    it("maps a json_schema response_format to output_config", () => {
      const body = anthropicBody({ ...user("hi"), response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "object" } } } }, haiku, 10);
      assert.deepEqual(body.output_config, { format: { type: "json_schema", schema: { type: "object" } } });
    });

    it("turns JSON mode (json_object), which Anthropic lacks, into an instruction after the client's own", () => {
      const body = anthropicBody({ messages: [{ role: "system", content: "Be terse." }, { role: "user", content: "List two colours as JSON." }], response_format: { type: "json_object" } }, haiku, 10) as Record<string, any>;
      assert.deepEqual(body.system.map((b: { text: string }) => b.text), ["Be terse.", "Reply with one valid JSON object and nothing else: no prose before or after it, no code fences."]);
      assert.equal(body.output_config, undefined);
      assert.equal((anthropicBody({ ...user("hi"), response_format: { type: "text" } }, haiku, 10) as Record<string, any>).system, undefined);
    });

    it("refuses a conversation with nothing left to send", () => {
      assert.throws(() => anthropicBody({ messages: [{ role: "system", content: "s" }, { role: "user", content: " " }] }, haiku, 10), /no user or assistant content/);
    });
  });

  describe("kind anthropic: response", () => {
    const stops: [string, string][] = [["end_turn", "stop"], ["stop_sequence", "stop"], ["max_tokens", "length"], ["tool_use", "tool_calls"], ["refusal", "content_filter"], ["pause_turn", "stop"], ["model_context_window_exceeded", "length"]];
    for (const [stop, finish] of stops)
      it(`maps stop_reason ${stop} to finish_reason ${finish}`, () => {
        assert.equal(completionOf(answerFromMessage({ content: [{ type: "text", text: "x" }], stop_reason: stop }, haiku, 0)).choices[0].finish_reason, finish);
      });

    it("joins text blocks, turns tool_use into tool_calls, drops thinking, keeps usage apart", () => {
      const answer = answerFromMessage({
        id: "msg_1", model: "claude-haiku-4-5-20251001", stop_reason: "tool_use",
        content: [{ type: "thinking", thinking: "hmm" }, { type: "text", text: "I'll " }, { type: "text", text: "check." }, { type: "tool_use", id: "toolu_1", name: "w", input: { city: "Paris" } }],
        usage: { input_tokens: 10, output_tokens: 5, cache_read_input_tokens: 100, cache_creation_input_tokens: 20 },
      }, haiku, 1_700_000_000_000);
      const completion = completionOf(answer), usage = answer.usage;
      assert.deepEqual(completion, {
        id: "msg_1", object: "chat.completion", created: 1_700_000_000, model: "claude-haiku-4-5-20251001",
        choices: [{ index: 0, finish_reason: "tool_calls", logprobs: null, message: { role: "assistant", content: "I'll check.", tool_calls: [{ id: "toolu_1", type: "function", function: { name: "w", arguments: "{\"city\":\"Paris\"}" } }] } }],
      });
      assert.deepEqual(usage, { input: 10, cached: 100, cache_write: 20, output: 5 });
    });

    it("gives null content when there are only tool calls", () => {
      const completion = completionOf(answerFromMessage({ content: [{ type: "tool_use", id: "t", name: "f", input: {} }], stop_reason: "tool_use" }, haiku, 0));
      assert.equal(completion.choices[0].message.content, null);
    });
  });

  describe("kind anthropic: stream events", () => {
    const ev = (name: string, data: object) => Buffer.from(`event: ${name}\ndata: ${JSON.stringify(data)}\n\n`);
    const payload = (b: string | Buffer | null) => { const s = b === null ? null : String(b); return s ? s.split("\n\n").filter(Boolean).map((l) => (l === "data: [DONE]" ? "[DONE]" : JSON.parse(l.slice(6)))) : []; };
    const deltas = (s: string | Buffer | null) => payload(s).map((p) => (p === "[DONE]" ? p : { delta: p.choices[0]?.delta, finish: p.choices[0]?.finish_reason, usage: p.usage }));
    /** Anthropic's events decoded, then encoded for a Chat Completions client: what the dispatcher does with such a stream. */
    const fresh = (includeUsage = true): Tap & { finish(): string } => {
      const t = new Translation(ADAPTERS.anthropic.decoder(haiku, 1_700_000_000_000), ENTRIES.chat!.encoder(parsed({ messages: [], stream: true, stream_options: { include_usage: includeUsage } }), haiku, 1_700_000_000_000));
      return Object.assign(t, { finish: () => String(t.end(t.usage!, costUsd(haiku, t.usage!))) });
    };
    const started = () => { const t = fresh(); t.feed(ev("message_start", { type: "message_start", message: { id: "msg_1", model: "claude-haiku-4-5-20251001", usage: { input_tokens: 10, cache_read_input_tokens: 5, output_tokens: 1 } } })); return t; };

    it("message_start gives the role chunk with the message id and model", () => {
      const out = payload(fresh().feed(ev("message_start", { type: "message_start", message: { id: "msg_1", model: "m-1", usage: { input_tokens: 3 } } })));
      assert.deepEqual(out, [{ id: "msg_1", object: "chat.completion.chunk", created: 1_700_000_000, model: "m-1", choices: [{ index: 0, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }] }]);
    });

    it("text_delta gives content; ping, thinking, signature and block stops give nothing", () => {
      const t = started();
      assert.deepEqual(deltas(t.feed(ev("content_block_delta", { type: "content_block_delta", index: 0, delta: { type: "text_delta", text: "Hel" } }))), [{ delta: { content: "Hel" }, finish: null, usage: undefined }]);
      for (const [name, data] of [["ping", { type: "ping" }], ["content_block_start", { type: "content_block_start", index: 1, content_block: { type: "thinking", thinking: "" } }], ["content_block_delta", { type: "content_block_delta", index: 1, delta: { type: "thinking_delta", thinking: "secret" } }], ["content_block_delta", { type: "content_block_delta", index: 1, delta: { type: "signature_delta", signature: "sig" } }], ["content_block_stop", { type: "content_block_stop", index: 1 }]] as const)
        assert.equal(t.feed(ev(name, data)), null, name);
    });

    it("tool_use blocks get their own tool index, id and name first, then argument fragments", () => {
      const t = started();
      t.feed(ev("content_block_start", { type: "content_block_start", index: 0, content_block: { type: "text", text: "" } }));
      const a = deltas(t.feed(ev("content_block_start", { type: "content_block_start", index: 1, content_block: { type: "tool_use", id: "toolu_1", name: "w", input: {} } })));
      assert.deepEqual(a[0].delta, { tool_calls: [{ index: 0, id: "toolu_1", type: "function", function: { name: "w", arguments: "" } }] });
      assert.equal(t.feed(ev("content_block_delta", { type: "content_block_delta", index: 1, delta: { type: "input_json_delta", partial_json: "" } })), null);
      assert.deepEqual(deltas(t.feed(ev("content_block_delta", { type: "content_block_delta", index: 1, delta: { type: "input_json_delta", partial_json: "{\"city\":" } })))[0].delta, { tool_calls: [{ index: 0, function: { arguments: "{\"city\":" } }] });
      const b = deltas(t.feed(ev("content_block_start", { type: "content_block_start", index: 2, content_block: { type: "tool_use", id: "toolu_2", name: "x", input: {} } })));
      assert.equal((b[0].delta as { tool_calls: { index: number }[] }).tool_calls[0].index, 1);
    });

    it("message_delta gives the mapped finish_reason; message_stop gives usage (when asked) then [DONE]", () => {
      const t = started();
      assert.deepEqual(deltas(t.feed(ev("message_delta", { type: "message_delta", delta: { stop_reason: "max_tokens" }, usage: { output_tokens: 42 } }))), [{ delta: {}, finish: "length", usage: undefined }]);
      assert.equal(t.feed(ev("message_stop", { type: "message_stop" })), null);
      const end = payload(t.finish());
      const usage = { input: 10, cached: 5, cache_write: 0, output: 42 };
      assert.deepEqual(end, [{ id: "msg_1", object: "chat.completion.chunk", created: 1_700_000_000, model: "claude-haiku-4-5-20251001", choices: [], usage: openAIUsage(usage, costUsd(haiku, usage)) }, "[DONE]"]);
      assert.equal(t.done, true);
      assert.deepEqual(t.usage, usage);
    });

    it("message_stop without include_usage sends only [DONE] but the usage is still known", () => {
      const t = fresh(false);
      t.feed(ev("message_start", { type: "message_start", message: { id: "m", usage: { input_tokens: 4 } } }));
      t.feed(ev("message_delta", { type: "message_delta", delta: { stop_reason: "end_turn" }, usage: { output_tokens: 3 } }));
      t.feed(ev("message_stop", { type: "message_stop" }));
      assert.equal(t.finish(), "data: [DONE]\n\n");
      assert.deepEqual(t.usage, { input: 4, cached: 0, cache_write: 0, output: 3 });
    });

    it("an error event becomes an error, not content", () => {
      const t = started();
      assert.equal(t.feed(ev("error", { type: "error", error: { type: "overloaded_error", message: "Overloaded" } })), null);
      assert.deepEqual(t.error, { message: "Overloaded", type: "overloaded_error", code: "overloaded_error" });
    });
  });
});

// ============================================================================================
describe("7. Store", () => {
  const row = (o: Partial<Row> = {}): Row => ({ ts: Date.now(), entry: "chat", provider: "openai", model: "gpt-4o", requested_model: "auto", complexity: "simple", status: 200, stream: false, input_tokens: 10, output_tokens: 5, cached_tokens: 0, cache_write_tokens: 0, cost_usd: 0.001, latency_ms: 12, ttft_ms: null, attempts: 1, failover: null, error: null, error_kind: null, agent: null, session: null, ...o });
  let dir: string;
  before(() => { dir = mkdtempSync(join(tmpdir(), "tw-store-")); });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it("writes queued rows in one batch and keeps totals across a reopen", () => {
    const path = join(dir, "a.db");
    const s = new Store(path);
    for (let i = 0; i < 100; i++) s.add(row({ status: i < 10 ? 502 : 200 }));
    assert.equal(s.pending, 100);
    assert.equal(s.flush(), true);
    assert.equal(s.pending, 0);
    s.close();
    const again = new Store(path);
    const t = again.totals(0);
    assert.deepEqual([t.requests, t.errors, t.input_tokens, t.output_tokens], [100, 10, 1000, 500]);
    assert.ok(Math.abs(t.cost_usd - 0.1) < 1e-9);
    assert.equal(again.count(), 100);
    again.close();
  });

  it("spend() counts the rows still queued, without committing them, and the same after they are written", () => {
    const s = new Store(join(dir, "spend.db"));
    const t0 = Date.UTC(2026, 11, 1, 10, 0, 30);
    s.add(row({ ts: t0 - 120_000, agent: "a", session: "s1", cost_usd: 0.5 })); // before the period
    s.add(row({ ts: t0, agent: "a", session: "s1", cost_usd: 0.25 }));
    s.add(row({ ts: t0 + 1000, agent: "b", session: "s2", cost_usd: 0.125 }));
    const read = () => [s.spend({}, t0), s.spend({ agent: "a" }, t0), s.spend({ session: "s2" }, t0), s.spend({ agent: "nobody" }, t0)];
    assert.deepEqual(read(), [0.375, 0.25, 0.125, 0]);
    assert.equal(s.pending, 3, "nothing was committed to read it");
    s.flush();
    assert.deepEqual(read(), [0.375, 0.25, 0.125, 0]);
    s.close();
  });

  it("close() waits for a lock held briefly by another process instead of losing the last rows", async () => {
    const path = join(dir, "closing.db");
    const s = new Store(path);
    s.add(row());
    const holder = spawn(process.execPath, ["-e", `const { DatabaseSync } = require("node:sqlite"); const db = new DatabaseSync(${JSON.stringify(path)}); db.exec("BEGIN EXCLUSIVE"); console.log("locked"); setTimeout(() => { db.exec("COMMIT"); db.close(); }, 300);`], { stdio: ["ignore", "pipe", "inherit"] });
    await once(holder.stdout, "data");
    s.close();
    const again = new Store(path);
    assert.equal(again.count(), 1);
    again.close();
    await once(holder, "exit");
  });

  it("brings a database written before client formats were told apart to the new schema, every row counted as chat", () => {
    const path = join(dir, "old.db");
    const old = new DatabaseSync(path);
    old.exec(`CREATE TABLE requests (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, provider TEXT, model TEXT, requested_model TEXT, complexity TEXT,
      status INTEGER NOT NULL, stream INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
      cached_tokens INTEGER NOT NULL DEFAULT 0, cache_write_tokens INTEGER NOT NULL DEFAULT 0, cost_usd REAL NOT NULL DEFAULT 0, latency_ms INTEGER,
      ttft_ms INTEGER, attempts INTEGER NOT NULL DEFAULT 0, failover TEXT, error TEXT, error_kind TEXT);
      CREATE TABLE rollup (minute INTEGER NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL, complexity TEXT NOT NULL, requests INTEGER NOT NULL,
      errors INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
      failovers INTEGER NOT NULL, PRIMARY KEY (minute, provider, model, complexity)) WITHOUT ROWID;
      CREATE TABLE rollup_hour (hour INTEGER NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL, complexity TEXT NOT NULL, requests INTEGER NOT NULL,
      errors INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
      failovers INTEGER NOT NULL, PRIMARY KEY (hour, provider, model, complexity)) WITHOUT ROWID;`);
    const minute = Math.floor(Date.now() / 60_000);
    old.prepare("INSERT INTO requests (ts, provider, model, status) VALUES (?, 'openai', 'gpt-4o', 200)").run(Date.now());
    old.prepare("INSERT INTO rollup VALUES (?, 'openai', 'gpt-4o', 'simple', 1, 0, 10, 5, 0, 0.5, 0)").run(minute);
    old.prepare("INSERT INTO rollup_hour VALUES (?, 'openai', 'gpt-4o', 'simple', 1, 0, 10, 5, 0, 0.5, 0)").run(Math.floor(minute / 60));
    old.close();
    const s = new Store(path);
    void s.add(row({ entry: "messages" }));
    s.flush();
    assert.deepEqual(s.entries(0).map((e) => [e.entry, e.requests]).sort(), [["chat", 1], ["messages", 1]]);
    assert.deepEqual(s.recent(10).map((r) => r.entry).sort(), ["chat", "messages"]);
    assert.equal(s.totals(0).requests, 2);
    s.close();
    const again = new Store(path); // a second open finds the schema current and changes nothing
    assert.equal(again.totals(0).requests, 2);
    again.close();
  });

  it("uses WAL mode", () => {
    const path = join(dir, "wal.db");
    new Store(path).close();
    const db = new DatabaseSync(path);
    assert.equal((db.prepare("PRAGMA journal_mode").get() as { journal_mode: string }).journal_mode, "wal");
    db.close();
  });

  it("keeps rows queued while the database is locked, says so, and writes them once it frees", () => {
    const path = join(dir, "locked.db");
    const s = new Store(path);
    const other = new DatabaseSync(path);
    other.exec("BEGIN EXCLUSIVE");
    s.add(row());
    assert.equal(s.flush(), false);
    assert.match(s.lastError ?? "", /Cannot write to .*locked/);
    assert.equal(s.pending, 1);
    other.exec("COMMIT");
    other.close();
    assert.equal(s.flush(), true);
    assert.equal(s.lastError, null);
    assert.equal(s.count(), 1);
    s.close();
  });
});

// ============================================================================================
// 8. HTTP edge, against mock providers, with the official openai client.

type Env = { tw: Running; mocks: Record<Flavor, Mock>; client: OpenAI; close(): Promise<void> };

async function setup(opts: { file?: Record<string, unknown>; env?: Record<string, string>; db?: string } = {}): Promise<Env> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  const env: Record<string, string> = {
    OPENAI_API_KEY: openai.key, OPENAI_BASE_URL: openai.url, KIMI_API_KEY: kimi.key, KIMI_BASE_URL: kimi.url,
    ANTHROPIC_API_KEY: anthropic.key, ANTHROPIC_BASE_URL: anthropic.url, ...opts.env,
  };
  const config = buildConfig({ env, file: opts.file ?? {} });
  const tw = await start({ config, env, db: opts.db });
  const client = new OpenAI({ baseURL: `${tw.url}/v1`, apiKey: env.TOKENWATCH_API_KEY ?? "unused", maxRetries: 0 });
  return { tw, mocks: { openai, kimi, anthropic }, client, close: async () => { await tw.close(1000); await Promise.all([openai.close(), kimi.close(), anthropic.close()]); } };
}

const rows = (e: Env) => { e.tw.store.flush(); return e.tw.store.recent(1000).reverse() as Row[]; };
const post = (e: Env, body: unknown, headers: Record<string, string> = {}, signal?: AbortSignal) =>
  fetch(`${e.tw.url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: typeof body === "string" ? body : JSON.stringify(body), signal });

describe("8. HTTP edge: chat completions", () => {
  let e: Env;
  before(async () => { e = await setup(); });
  after(() => e.close());

  for (const [provider, id] of [["openai", "gpt-4o-mini"], ["kimi", "kimi-k2.5"], ["anthropic", "claude-haiku-4-5"]] as const)
    it(`answers through ${provider} with routing headers, the routing object and the exact cost`, async () => {
      const before = e.mocks[provider].requests.length;
      const res = await e.client.chat.completions.create({ model: `${provider}/${id}`, messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Hello" }] }).withResponse();
      const body = res.data as OpenAI.ChatCompletion & { routing: { provider: string; model: string; attempts: unknown[] }; usage: { cost_usd: number } };
      assert.equal(res.response.headers.get("x-tokenwatch-provider"), provider);
      assert.equal(res.response.headers.get("x-tokenwatch-model"), id);
      assert.equal(res.response.headers.get("x-tokenwatch-complexity"), "simple");
      assert.equal(body.choices[0].message.content, `Hello from ${id}`);
      assert.deepEqual([body.routing.provider, body.routing.model, body.routing.attempts.length], [provider, id, 1]);
      const sent = e.mocks[provider].requests[before].body;
      assert.equal(sent.model, id);
      if (provider === "openai") assert.equal((body.usage as unknown as { prompt_tokens_details: { audio_tokens?: number } }).prompt_tokens_details.audio_tokens, 0, "OpenAI's other usage details stay");
      const u = body.usage!;
      const expect = costUsd(PROVIDERS[provider].models[id], { input: u.prompt_tokens - (u.prompt_tokens_details?.cached_tokens ?? 0), cached: u.prompt_tokens_details?.cached_tokens ?? 0, cache_write: 0, output: u.completion_tokens });
      assert.equal(body.usage.cost_usd, expect);
      assert.ok(expect > 0);
      const last = rows(e).at(-1)!;
      assert.deepEqual([last.provider, last.model, last.status, last.input_tokens, last.output_tokens, last.cost_usd], [provider, id, 200, u.prompt_tokens, u.completion_tokens, expect]);
    });

  it("never forwards complexity and always adds x-tokenwatch-hop upstream", async () => {
    await post(e, { model: "openai/gpt-4o-mini", complexity: "simple", messages: [{ role: "user", content: "hi" }] });
    const sent = e.mocks.openai.requests.at(-1)!;
    assert.equal(sent.body.complexity, undefined);
    assert.equal(sent.headers["x-tokenwatch-hop"], "1");
  });

  it("sends a body that needs no change upstream byte for byte (spacing, key order, escapes kept)", async () => {
    const text = `{ "messages" : [ {"content":"caf\\u00e9 \\ud83d\\ude00\\n", "role":"user"} ],\n  "model":"gpt-4o-mini", "max_completion_tokens": 7 }`;
    const res = await post(e, text);
    assert.equal(res.status, 200);
    assert.equal(e.mocks.openai.requests.at(-1)!.raw, text);
    await post(e, text.replace("\"max_completion_tokens\"", "\"complexity\": \"simple\", \"max_completion_tokens\""));
    assert.equal(e.mocks.openai.requests.at(-1)!.raw, JSON.stringify({ messages: [{ content: "caf\u00e9 \ud83d\ude00\n", role: "user" }], model: "gpt-4o-mini", max_completion_tokens: 7 }));
  });

  it("translates a tool-calling round trip to Anthropic and back", async () => {
    e.mocks.anthropic.queue({ type: "reply", text: "", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Paris\"}" }] });
    const tools = [{ type: "function" as const, function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } } }];
    const first = await e.client.chat.completions.create({ model: "anthropic/claude-haiku-4-5", tools, messages: [{ role: "user", content: "Weather in Paris?" }] });
    const call = first.choices[0].message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall;
    assert.equal(first.choices[0].finish_reason, "tool_calls");
    assert.deepEqual([call.function.name, JSON.parse(call.function.arguments)], ["get_weather", { city: "Paris" }]);
    const second = await e.client.chat.completions.create({ model: "anthropic/claude-haiku-4-5", tools, messages: [{ role: "user", content: "Weather in Paris?" }, first.choices[0].message, { role: "tool", tool_call_id: call.id, content: "sunny" }] });
    assert.equal(second.choices[0].finish_reason, "stop");
    const sent = e.mocks.anthropic.requests.at(-1)!.body;
    assert.deepEqual(sent.messages.at(-1), { role: "user", content: [{ type: "tool_result", tool_use_id: call.id, content: "sunny", cache_control: { type: "ephemeral" } }] });
  });

  it("has Anthropic cache an agent's prompt, and bills the cache write and the cache read at their own prices", async () => {
    const env = await setup();
    try {
      const rules = "Follow the repository's conventions and explain every change you make. ".repeat(300); // ~5,400 tokens: over Haiku's 4,096 minimum
      const turn1: OpenAI.ChatCompletionMessageParam[] = [{ role: "system", content: rules }, { role: "user", content: "Fix the failing test." }];
      const first = await env.client.chat.completions.create({ model: "anthropic/claude-haiku-4-5", messages: turn1 });
      const second = await env.client.chat.completions.create({ model: "anthropic/claude-haiku-4-5", messages: [...turn1, first.choices[0].message, { role: "user", content: "Now run it." }] });
      const [r1, r2] = rows(env).slice(-2);
      assert.ok(r1.cache_write_tokens > 4096 && r1.cached_tokens === 0, `first turn writes the cache: ${JSON.stringify(r1)}`);
      assert.ok(r2.cached_tokens >= r1.cache_write_tokens && r2.cache_write_tokens < 100, `second turn reads it: ${JSON.stringify(r2)}`);
      assert.equal(second.usage!.prompt_tokens_details!.cached_tokens, r2.cached_tokens);
      const haiku = PROVIDERS.anthropic.models["claude-haiku-4-5"];
      for (const [r, res] of [[r1, first], [r2, second]] as const) {
        const u = { input: r.input_tokens - r.cached_tokens - r.cache_write_tokens, cached: r.cached_tokens, cache_write: r.cache_write_tokens, output: r.output_tokens };
        assert.equal(r.cost_usd, costUsd(haiku, u));
        assert.equal((res.usage as unknown as { cost_usd: number }).cost_usd, r.cost_usd);
      }
      assert.ok(r2.cost_usd < r1.cost_usd / 3, `the longer second turn costs less: ${r1.cost_usd} then ${r2.cost_usd}`);
      const window = env.tw.router.limiter.headroom(model(env.tw.config, "anthropic/claude-haiku-4-5"), Date.now()).tokens;
      assert.equal(window, [r1, r2].reduce((n, r) => n + r.input_tokens - r.cached_tokens + r.output_tokens, 0), "cache reads do not count against Anthropic's limit");
    } finally { await env.close(); }
  });

  it("the Anthropic mock refuses more than four cache breakpoints, as the API does", async () => {
    const cc = { cache_control: { type: "ephemeral" } };
    const res = await fetch(`${e.mocks.anthropic.url}/v1/messages`, {
      method: "POST", headers: { "content-type": "application/json", "x-api-key": e.mocks.anthropic.key, "anthropic-version": "2023-06-01" },
      body: JSON.stringify({ model: "claude-haiku-4-5", max_tokens: 10, system: [{ type: "text", text: "a", ...cc }, { type: "text", text: "b", ...cc }], messages: [{ role: "user", content: [1, 2, 3].map((i) => ({ type: "text", text: `q${i}`, ...cc })) }] }),
    });
    assert.equal(res.status, 400);
    assert.match(((await res.json()) as { error: { message: string } }).error.message, /A maximum of 4 blocks with cache_control may be provided\. Found 5\./);
  });

  it("carries a tool-calling conversation across providers, as failover does", async () => {
    const tools = [{ type: "function" as const, function: { name: "get_weather", parameters: { type: "object", properties: {} } } }];
    e.mocks.anthropic.queue({ type: "reply", text: "", tool_calls: [{ name: "get_weather", arguments: "{}" }] });
    const first = await e.client.chat.completions.create({ model: "anthropic/claude-haiku-4-5", tools, messages: [{ role: "user", content: "Weather?" }] });
    const call = first.choices[0].message.tool_calls![0];
    // Kimi with thinking on refuses tool-call turns without reasoning_content: a placeholder is added
    const history: OpenAI.ChatCompletionMessageParam[] = [{ role: "user", content: "Weather?" }, first.choices[0].message, { role: "tool", tool_call_id: call.id, content: "sunny" }];
    const onKimi = await e.client.chat.completions.create({ model: "kimi/kimi-k2.5", tools, messages: history });
    assert.equal(onKimi.choices[0].finish_reason, "stop");
    assert.equal(e.mocks.kimi.requests.at(-1)!.body.messages[1].reasoning_content, " ");
    // OpenAI refuses message keys it does not know, such as Kimi's reasoning_content: they are dropped
    const withReasoning = [history[0], { ...first.choices[0].message, reasoning_content: "I should call the tool." }, history[2]] as OpenAI.ChatCompletionMessageParam[];
    const onOpenAI = await e.client.chat.completions.create({ model: "openai/gpt-4o-mini", tools, messages: withReasoning });
    assert.equal(onOpenAI.choices[0].finish_reason, "stop");
    assert.equal("reasoning_content" in e.mocks.openai.requests.at(-1)!.body.messages[1], false);
  });

  it("passes a plain upstream 4xx back to the client as it is, without failing over", async () => {
    e.mocks.openai.queue({ type: "error", status: 400, body: { error: { message: "Invalid 'messages[0].name': string too long.", type: "invalid_request_error", param: "messages", code: "string_above_max_length" } } });
    const res = await post(e, { model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] });
    assert.equal(res.status, 400);
    const body = await res.json();
    assert.equal(body.error.message, "Invalid 'messages[0].name': string too long.");
    assert.equal(body.error.code, "string_above_max_length");
    assert.equal(body.error.attempts.length, 1);
    assert.equal(rows(e).at(-1)!.failover, null); // nothing else was tried: not a failover
  });

  it("answers an unknown model with 404 model_not_found and routes nothing", async () => {
    const n = e.mocks.openai.requests.length;
    const res = await post(e, { model: "gpt-9", messages: [{ role: "user", content: "hi" }] });
    assert.equal(res.status, 404);
    assert.equal((await res.json()).error.code, "model_not_found");
    assert.equal(e.mocks.openai.requests.length, n);
  });

  it("lists enabled models and aliases at /v1/models", async () => {
    const list = await e.client.models.list();
    const byId = Object.fromEntries(list.data.map((m) => [m.id, m.owned_by]));
    assert.equal(byId["gpt-4o-mini"], "openai");
    assert.equal(byId["claude-sonnet-4-5"], "anthropic");
    assert.equal(byId["kimi-k1.5"], "kimi");
  });

  it("answers /health", async () => {
    const res = await fetch(`${e.tw.url}/health`);
    assert.deepEqual([res.status, await res.json()], [200, { status: "ok" }]);
  });

  it("refuses a request that comes back into TokenWatch with 508", async () => {
    const res = await post(e, { messages: [{ role: "user", content: "hi" }] }, { "x-tokenwatch-hop": "1" });
    assert.equal(res.status, 508);
    assert.equal((await res.json()).error.code, "loop_detected");
  });

  it("answers bad input with OpenAI-shaped 4xx errors that reach no upstream", async () => {
    const before = e.mocks.openai.requests.length + e.mocks.kimi.requests.length + e.mocks.anthropic.requests.length;
    const cases: [BodyInit, Record<string, string>, number, RegExp][] = [
      ["{not json", {}, 400, /not valid JSON/],
      [JSON.stringify({ messages: [] }), {}, 400, /non-empty array/],
      [JSON.stringify({ messages: [{ role: "user", content: "x" }] }), { "content-type": "text/plain" }, 415, /application\/json/],
      [JSON.stringify({ messages: [{ role: "user", content: "x" }], n: 2, model: "anthropic/claude-haiku-4-5" }), {}, 400, /"n": 2 is not supported/],
    ];
    for (const [body, headers, status, re] of cases) {
      const res = await fetch(`${e.tw.url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body });
      const json = await res.json();
      assert.equal(res.status, status);
      assert.match(json.error.message, re);
      assert.equal(typeof json.error.type, "string");
      assert.equal(typeof json.error.code, "string");
    }
    assert.equal(e.mocks.openai.requests.length + e.mocks.kimi.requests.length + e.mocks.anthropic.requests.length, before);
  });

  it("answers unknown routes with 404 and wrong methods with 405", async () => {
    const a = await fetch(`${e.tw.url}/v2/nothing`);
    assert.equal(a.status, 404);
    const b = await fetch(`${e.tw.url}/v1/chat/completions`);
    assert.equal(b.status, 405);
    assert.equal(b.headers.get("allow"), "POST");
  });
});

describe("8. HTTP edge: failover, cooldown and saturation", () => {
  let e: Env;
  const file = { max_wait_ms: 300, timeout_ms: 300, providers: { openai: { models: { "gpt-4o-mini": PROVIDERS.openai.models["gpt-4o-mini"] } }, kimi: { models: { "kimi-k2.5": PROVIDERS.kimi.models["kimi-k2.5"] } }, anthropic: { models: {} } } };
  // with complexity "simple": gpt-4o-mini first, then kimi-k2.5
  const ask = () => post(e, { complexity: "simple", messages: [{ role: "user", content: "hi" }] });
  before(async () => { e = await setup({ file }); });
  after(() => e.close());

  for (const [name, script] of [
    ["a 500", { type: "error", status: 500 }],
    ["a 529", { type: "error", status: 529 }],
    ["a 408", { type: "error", status: 408 }],
    ["an HTML error page", { type: "raw", status: 502, body: "<html><body>Bad Gateway</body></html>", headers: { "content-type": "text/html" } }],
    ["malformed JSON", { type: "raw", status: 200, body: "{\"choices\": [", headers: { "content-type": "application/json" } }],
    ["a connection reset", { type: "reset" }],
    ["no answer at all", { type: "hang" }],
  ] as const)
    it(`fails over to the next candidate on ${name}`, async () => {
      e.mocks.openai.queue(script);
      const res = await ask();
      assert.equal(res.status, 200);
      assert.equal(res.headers.get("x-tokenwatch-provider"), "kimi");
      const body = await res.json();
      assert.deepEqual(body.routing.attempts.map((a: { provider: string }) => a.provider), ["openai", "kimi"]);
      const last = rows(e).at(-1)!;
      assert.equal(last.attempts, 2);
      assert.ok(last.failover);
    });

  it("cools a model down after a 429 until its retry-after has passed", async () => {
    e.mocks.openai.queue({ type: "error", status: 429, headers: { "retry-after": "20" } });
    assert.equal((await ask()).headers.get("x-tokenwatch-provider"), "kimi");
    const n = e.mocks.openai.requests.length;
    assert.equal((await ask()).headers.get("x-tokenwatch-provider"), "kimi"); // openai is still cooling
    assert.equal(e.mocks.openai.requests.length, n);
    const stats = await (await fetch(`${e.tw.url}/stats`)).json();
    const m = stats.models.find((x: { model: string }) => x.model === "gpt-4o-mini");
    assert.equal(m.cooling, true);
    assert.ok(m.free_in_s > 15 && m.free_in_s <= 20);
  });

  it("answers 502 with every attempt when all candidates fail, and 504 when the last timed out", async () => {
    const fresh = await setup({ file });
    try {
      fresh.mocks.openai.queue({ type: "error", status: 500 });
      fresh.mocks.kimi.queue({ type: "error", status: 503 });
      const res = await post(fresh, { complexity: "simple", messages: [{ role: "user", content: "hi" }] });
      assert.equal(res.status, 502);
      const body = await res.json();
      assert.equal(body.error.code, "upstream_failed");
      assert.equal(body.error.attempts.length, 2);
      assert.equal(rows(fresh).at(-1)!.failover, "500 upstream error"); // kimi's 503 ended the request: no failover after it
      fresh.mocks.openai.queue({ type: "error", status: 500 });
      fresh.mocks.kimi.queue({ type: "hang" });
      const slow = await post(fresh, { complexity: "simple", messages: [{ role: "user", content: "hi" }] });
      assert.equal(slow.status, 504);
    } finally { await fresh.close(); }
  });

  it("rests a provider whose key is refused and moves on", async () => {
    const fresh = await setup({ file, env: { OPENAI_API_KEY: "sk-wrong-key-123456" } });
    try {
      const res = await post(fresh, { complexity: "simple", messages: [{ role: "user", content: "hi" }] });
      assert.equal(res.headers.get("x-tokenwatch-provider"), "kimi");
      const body = await res.json();
      assert.equal(body.routing.attempts[0].status, 401);
      assert.ok(!JSON.stringify(body).includes("sk-wrong-key-123456"));
      const n = fresh.mocks.openai.requests.length;
      await post(fresh, { complexity: "simple", messages: [{ role: "user", content: "hi" }] });
      assert.equal(fresh.mocks.openai.requests.length, n); // not tried again while resting
      const stats = await (await fetch(`${fresh.tw.url}/stats`)).json();
      assert.ok(stats.providers.find((p: { provider: string }) => p.provider === "openai").disabled_for_s > 0);
      assert.ok(!JSON.stringify(stats).includes("sk-wrong-key-123456"));
    } finally { await fresh.close(); }
  });

  it("answers 429 all_providers_saturated with Retry-After when every candidate is over its threshold", async () => {
    const tiny = { max_wait_ms: 200, providers: { openai: { models: { "gpt-4o-mini": { input: 0.15, output: 0.6, limit: 1_000_000, rpm: 2, tier: "simple" } } }, kimi: { models: {} }, anthropic: { models: {} } } };
    const fresh = await setup({ file: tiny });
    fresh.mocks.openai.rateLimits({ limits: { requests: 2, tokens: 1_000_000 } }); // the account's limits, as its headers say them
    try {
      const ok = await post(fresh, { messages: [{ role: "user", content: "hi" }] });
      assert.equal(ok.status, 200); // 1 request of rpm 2: at 0.8 x 2 = 1.6, the next one would pass it
      const res = await post(fresh, { messages: [{ role: "user", content: "hi" }] });
      assert.equal(res.status, 429);
      const retry = Number(res.headers.get("retry-after"));
      assert.ok(Number.isInteger(retry) && retry >= 1 && retry <= 61, `retry-after ${retry}`);
      assert.equal((await res.json()).error.code, "all_providers_saturated");
      assert.equal(rows(fresh).at(-1)!.status, 429);
    } finally { await fresh.close(); }
  });

  it("makes a request wait for capacity and go through when a request in flight finishes", async () => {
    const tiny = { max_wait_ms: 5000, providers: { openai: { models: { "gpt-4o-mini": { input: 0.15, output: 0.6, limit: 5000, rpm: 1000, tier: "simple" } } }, kimi: { models: {} }, anthropic: { models: {} } } };
    const fresh = await setup({ file: tiny });
    try {
      // each request reserves ~3000 tokens of 0.8 x 5000 = 4000: the second must wait until the first
      // settles with its real (small) usage
      fresh.mocks.openai.queue({ type: "reply", delayMs: 150, usage: { input: 5, output: 5 } });
      const first = post(fresh, { max_tokens: 3000, messages: [{ role: "user", content: "one" }] });
      await new Promise((r) => setTimeout(r, 30));
      const second = post(fresh, { max_tokens: 3000, messages: [{ role: "user", content: "two" }] });
      const [a, b] = await Promise.all([first, second]);
      assert.deepEqual([a.status, b.status], [200, 200]);
      const [ra, rb] = rows(fresh).slice(-2);
      assert.ok(rb.latency_ms >= 100, `the second waited ${rb.latency_ms} ms`);
      void ra;
    } finally { await fresh.close(); }
  });

  it("stops waiting for capacity as soon as the waiting client goes away, and logs it as 499", async () => {
    const tiny = { max_wait_ms: 20_000, providers: { openai: { models: { "gpt-4o-mini": { input: 0.15, output: 0.6, limit: 5000, rpm: 1000, tier: "simple" } } }, kimi: { models: {} }, anthropic: { models: {} } } };
    const fresh = await setup({ file: tiny });
    try {
      fresh.mocks.openai.queue({ type: "hang" }); // holds the capacity for as long as the test needs
      const first = post(fresh, { max_tokens: 3000, messages: [{ role: "user", content: "one" }] }).catch(() => undefined);
      await new Promise((r) => setTimeout(r, 50));
      const leaving = new AbortController();
      const second = post(fresh, { max_tokens: 3000, messages: [{ role: "user", content: "two" }] }, {}, leaving.signal).catch((err: Error) => err);
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(fresh.tw.router.inflight, 2, "the second request is waiting");
      const left = Date.now();
      leaving.abort();
      await second;
      while (fresh.tw.router.inflight > 1 && Date.now() - left < 500) await new Promise((r) => setTimeout(r, 5));
      assert.equal(fresh.tw.router.inflight, 1, "the waiting request ended with its client, long before max_wait_ms");
      const row = rows(fresh).at(-1)!;
      assert.deepEqual([row.status, row.error_kind, row.attempts], [499, "client_closed", 0]);
      void first;
    } finally { await fresh.close(); }
  });
});

describe("8. HTTP edge: streaming", () => {
  let e: Env;
  before(async () => { e = await setup({ file: { timeout_ms: 400 } }); });
  after(() => e.close());

  for (const [provider, id] of [["openai", "gpt-4o-mini"], ["kimi", "kimi-k2.5"], ["anthropic", "claude-haiku-4-5"]] as const) {
    it(`streams text through ${provider} to the SDK, with usage and cost when asked`, async () => {
      const stream = await e.client.chat.completions.create({ model: `${provider}/${id}`, stream: true, stream_options: { include_usage: true }, messages: [{ role: "user", content: "Hello" }] });
      let text = "", usage: (OpenAI.CompletionUsage & { cost_usd?: number }) | undefined, finish: string | null = null;
      for await (const chunk of stream) {
        text += chunk.choices[0]?.delta?.content ?? "";
        finish = chunk.choices[0]?.finish_reason ?? finish;
        if (chunk.usage) usage = chunk.usage;
      }
      assert.equal(text, `Hello from ${id}`);
      assert.equal(finish, "stop");
      assert.ok(usage && usage.completion_tokens > 0);
      const last = rows(e).at(-1)!;
      assert.equal(usage!.cost_usd, last.cost_usd);
      assert.deepEqual([last.status, Boolean(last.stream), last.output_tokens], [200, true, usage!.completion_tokens]);
      assert.ok(last.ttft_ms !== null && last.ttft_ms >= 0);
    });

    it(`counts every token of a ${provider} stream even when the client did not ask for usage`, async () => {
      const stream = await e.client.chat.completions.create({ model: `${provider}/${id}`, stream: true, messages: [{ role: "user", content: "Hello" }] });
      let usageChunks = 0;
      for await (const chunk of stream) if (chunk.usage && chunk.choices.length === 0) usageChunks++;
      assert.equal(usageChunks, 0);
      const last = rows(e).at(-1)!;
      assert.ok(last.output_tokens > 0 && last.input_tokens > 0 && last.cost_usd > 0);
    });

    it(`assembles ${provider} tool calls with the SDK's own stream helper`, async () => {
      e.mocks[provider].queue({ type: "reply", text: "", tool_calls: [{ name: "get_weather", arguments: "{\"city\":\"Paris\"}" }, { name: "get_time", arguments: "{\"tz\":\"CET\"}" }] });
      const runner = e.client.chat.completions.stream({ model: `${provider}/${id}`, messages: [{ role: "user", content: "Weather and time in Paris?" }], tools: [{ type: "function", function: { name: "get_weather", parameters: { type: "object", properties: {} } } }, { type: "function", function: { name: "get_time", parameters: { type: "object", properties: {} } } }] });
      const final = await runner.finalChatCompletion();
      const calls = final.choices[0].message.tool_calls as OpenAI.ChatCompletionMessageFunctionToolCall[];
      assert.deepEqual(calls.map((c) => [c.function.name, JSON.parse(c.function.arguments)]), [["get_weather", { city: "Paris" }], ["get_time", { tz: "CET" }]]);
      assert.equal(final.choices[0].finish_reason, "tool_calls");
    });
  }

  it("fails over a stream before its first byte", async () => {
    e.mocks.openai.queue({ type: "error", status: 503 });
    const res = await post(e, { complexity: "simple", stream: true, messages: [{ role: "user", content: "Hello" }] });
    assert.equal(res.headers.get("x-tokenwatch-provider"), "kimi");
    const events = (await res.text()).split("\n\n").filter(Boolean);
    assert.equal(events.at(-1), "data: [DONE]");
    const text = events.slice(0, -1).map((ev) => JSON.parse(ev.slice(6)).choices[0]?.delta?.content ?? "").join("");
    assert.equal(text, "Hello from kimi-k2.5");
  });

  it("fails over when a 200 stream opens with an error event, before anything reaches the client", async () => {
    e.mocks.openai.queue({ type: "raw", status: 200, headers: { "content-type": "text/event-stream" }, body: "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n" });
    const res = await post(e, { model: "gpt-4o-mini", stream: true, messages: [{ role: "user", content: "Hello" }] });
    assert.equal(res.headers.get("x-tokenwatch-provider"), "kimi");
    assert.match(await res.text(), /data: \[DONE\]/);
    assert.match(rows(e).at(-1)!.failover ?? "", /502/);
  });

  for (const provider of ["openai", "anthropic"] as const)
    it(`ends a ${provider} stream that breaks in the middle with an error event and records it`, async () => {
      e.mocks[provider].queue({ type: "stream-break", afterChunks: 2 });
      const stream = await e.client.chat.completions.create({ model: provider === "openai" ? "openai/gpt-4o-mini" : "anthropic/claude-haiku-4-5", stream: true, messages: [{ role: "user", content: "one two three four five" }] });
      let text = "";
      await assert.rejects(async () => { for await (const c of stream) text += c.choices[0]?.delta?.content ?? ""; });
      assert.ok(text.length > 0);
      const last = rows(e).at(-1)!;
      assert.equal(last.status, 502);
      assert.equal(last.error_kind, "stream_broken");
    });

  it("cuts a stalled stream after timeout_ms between chunks", async () => {
    e.mocks.openai.queue({ type: "stall", afterChunks: 2 });
    const res = await post(e, { model: "openai/gpt-4o-mini", stream: true, messages: [{ role: "user", content: "one two three" }] });
    const text = await res.text();
    assert.match(text, /"error":\{"message":"The stream stalled for 400 ms"/);
    assert.equal(rows(e).at(-1)!.status, 504);
  });

  it("lets a slow stream run past timeout_ms in all, as long as no gap between chunks reaches it", async () => {
    e.mocks.openai.queue({ type: "reply", text: "one two three four five six", chunks: 6, gapMs: 150 });
    const started = Date.now();
    const res = await post(e, { model: "openai/gpt-4o-mini", stream: true, messages: [{ role: "user", content: "count" }] });
    const text = await res.text();
    assert.ok(Date.now() - started >= 700, "the stream took longer than timeout_ms (400 ms)");
    assert.match(text, /data: \[DONE\]/);
    assert.doesNotMatch(text, /stalled/);
    assert.equal(rows(e).at(-1)!.status, 200);
  });

  it("forwards the first chunk before the upstream has finished", async () => {
    e.mocks.openai.queue({ type: "stall", afterChunks: 1 });
    const ac = new AbortController();
    const res = await post(e, { model: "openai/gpt-4o-mini", stream: true, messages: [{ role: "user", content: "one two three" }] });
    const reader = res.body!.getReader();
    const { value } = await reader.read(); // the upstream is stalled: this can only come from an unbuffered relay
    assert.match(Buffer.from(value!).toString(), /"role":"assistant"/);
    await reader.cancel();
    ac.abort();
  });

  it("aborts the upstream at once when the client goes away, and records status 499", async () => {
    e.mocks.anthropic.queue({ type: "stall", afterChunks: 2 });
    const closed = e.mocks.anthropic.waitForClosedRequest();
    const ac = new AbortController();
    const res = await fetch(`${e.tw.url}/v1/chat/completions`, { method: "POST", signal: ac.signal, headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "anthropic/claude-haiku-4-5", stream: true, messages: [{ role: "user", content: "one two three" }] }) });
    const reader = res.body!.getReader();
    await reader.read();
    ac.abort();
    await closed; // the upstream connection closes because TokenWatch aborted it, long before timeout_ms
    await new Promise((r) => setTimeout(r, 20));
    const last = rows(e).at(-1)!;
    assert.equal(last.status, 499);
    assert.equal(last.error_kind, "client_closed");
    assert.ok(last.input_tokens > 0);
  });
});

describe("8. HTTP edge: stats and persistence", () => {
  it("/stats totals come from the store and survive a restart", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-stats-"));
    const db = join(dir, "tw.db");
    try {
      const a = await setup({ db });
      await a.client.chat.completions.create({ model: "openai/gpt-4o-mini", messages: [{ role: "user", content: "one" }] });
      await a.client.chat.completions.create({ model: "anthropic/claude-haiku-4-5", messages: [{ role: "user", content: "two" }] });
      await post(a, { model: "nope", messages: [{ role: "user", content: "x" }] });
      const before = await (await fetch(`${a.tw.url}/stats`)).json();
      await a.close();
      assert.equal(before.totals.requests, 3);
      assert.equal(before.totals.errors, 1);
      assert.ok(before.totals.cost_usd > 0);
      const b = await setup({ db });
      const after = await (await fetch(`${b.tw.url}/stats`)).json();
      assert.deepEqual(after.totals, before.totals);
      const m = after.models.find((x: { model: string }) => x.model === "gpt-4o-mini");
      assert.equal(m.requests, 1);
      assert.ok(m.p50_ms !== null);
      assert.equal(after.recent.length, 3);
      assert.equal(after.series.minute.length, 60);
      assert.equal(after.series.hour.length, 24);
      await b.close();
    } finally { rmSync(dir, { recursive: true, force: true }); }
  });

  it("/stats shows the live limiter view, and /api/stats and /api/limits stay as aliases", async () => {
    const e = await setup();
    try {
      await e.client.chat.completions.create({ model: "openai/gpt-4o-mini", messages: [{ role: "user", content: "one" }] });
      const s = await (await fetch(`${e.tw.url}/api/stats?window=1h`)).json();
      const m = s.models.find((x: { model: string }) => x.model === "gpt-4o-mini");
      assert.ok(m.window_tokens > 0 && m.window_requests === 1 && m.limit === 200000 && m.rpm === 500 && m.saturated === false);
      const l = await (await fetch(`${e.tw.url}/api/limits`)).json();
      assert.equal(l.models.find((x: { model: string }) => x.model === "gpt-4o-mini").window_requests, 1);
      await e.client.chat.completions.create({ model: "kimi/kimi-k2.5", messages: [{ role: "user", content: "two" }] });
      const kimi = (await (await fetch(`${e.tw.url}/stats`)).json()).models.filter((x: { provider: string }) => x.provider === "kimi");
      assert.deepEqual(kimi.map((x: { pool: string; window_requests: number }) => [x.pool, x.window_requests]), [["kimi/account", 1], ["kimi/account", 1]], "Kimi's models show their one account window");
      assert.equal((await fetch(`${e.tw.url}/stats?window=2y`)).status, 400);
    } finally { await e.close(); }
  });
});

// ============================================================================================
describe("10. main", () => {
  it("parseOptions() lets flags override the environment", () => {
    const o = parseOptions(["--port", "9000", "--db=/tmp/x.db"], { TOKENWATCH_PORT: "7000", TOKENWATCH_HOST: "0.0.0.0" });
    assert.deepEqual([o.port, o.host, o.db], [9000, "0.0.0.0", "/tmp/x.db"]);
  });

  it("parseOptions() refuses unknown flags and bad values with a UsageError", () => {
    assert.throws(() => parseOptions(["--prot", "1"], {}), (e: unknown) => e instanceof UsageError && /Unknown flag "--prot"/.test((e as Error).message));
    assert.throws(() => parseOptions(["--port", "http"], {}), /Port "http" is not a port number/);
    assert.throws(() => parseOptions(["--db"], {}), /Flag --db needs a value/);
  });

  it("loadConfig() names the file and the problem in one line", () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-cfg-"));
    try {
      const p = join(dir, "c.json");
      writeFileSync(p, "{ \"threshold\": 0.8, }");
      assert.throws(() => loadConfig(p, {}), (e: unknown) => e instanceof ConfigError && e.message.startsWith(`Cannot read config "${p}": not valid JSON`));
      writeFileSync(p, JSON.stringify({ providers: { openai: { models: { "gpt-4o": { input: 1 } } } } }));
      assert.throws(() => loadConfig(p, {}), (e: unknown) => e instanceof ConfigError && e.message === `Invalid config "${p}": providers.openai.models.gpt-4o.output must be a number >= 0`);
      assert.throws(() => loadConfig(join(dir, "missing.json"), {}), /Cannot read config ".*missing.json": ENOENT/);
    } finally { rmSync(dir, { recursive: true, force: true }); }
  });
});
