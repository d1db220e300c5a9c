// TokenWatch: a self-contained LLM router for AI agents, in one file with zero runtime dependencies.
//
// Point an agent at http://127.0.0.1:8080 in any of three dialects (OpenAI Chat Completions, Anthropic
// Messages as Claude Code speaks it, OpenAI Responses as Codex speaks it) and TokenWatch sends each
// request to Anthropic, Kimi (Moonshot) or OpenAI: by rate-limit headroom (a model is used only while
// under 80% of its limits in a sliding minute), by the task's complexity ("complexity": "simple" goes
// cheap, "complex" goes capable, no hint means it decides) and by cost. It fails over when a provider is
// saturated or failing, logs every request with its exact cost to SQLite, and serves a live dashboard.
// A request whose dialect is its upstream's own passes through untouched but for `model`.
//
// Run:      node tokenwatch.ts             (Node >= 22.18)
//           deno run -A tokenwatch.ts      (Deno 2)
// Flags:    --port N  --host H  --db PATH  --config PATH  --help  --version
// Env:      ANTHROPIC_API_KEY, KIMI_API_KEY (or MOONSHOT_API_KEY), OPENAI_API_KEY      provider keys
//           ANTHROPIC_BASE_URL (without /v1), KIMI_BASE_URL, OPENAI_BASE_URL (with /v1)
//           TOKENWATCH_PORT (8080), TOKENWATCH_HOST (127.0.0.1), TOKENWATCH_DB (~/.tokenwatch/tokenwatch.db)
//           TOKENWATCH_CONFIG (JSON config file), TOKENWATCH_API_KEY (guards every route but /health)
//           TOKENWATCH_MAX_WAIT_MS (30000: how long a request may wait for capacity)
//           TOKENWATCH_ALLOWED_HOSTS (extra Host names to answer, comma-separated)
//           TOKENWATCH_REDIS_URL (share limits and budgets with other instances through Redis)
// Routes:   POST /v1/chat/completions   POST /v1/messages (+ /count_tokens)   POST /v1/responses
//           GET /v1/models   GET /   GET /stats   GET /health
//
// The file reads top to bottom: 1 the table you edit, 2 types, 3 pure helpers, 4 limiter, 5 agents,
// budgets and the loop guard, 6 shared state in Redis, 7 selector, 8 provider adapters, 9 client entries,
// 10 store, 11 dispatcher, 12 HTTP edge, 13 stats view, /metrics and dashboard, 14 main.

import http from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Duplex } from "node:stream";
import { DatabaseSync } from "node:sqlite";
import type { StatementSync } from "node:sqlite";
import { mkdirSync, readFileSync, realpathSync, renameSync, statSync } from "node:fs";
import { homedir, hostname } from "node:os";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { timingSafeEqual, createHash, randomUUID } from "node:crypto";
import { connect as netConnect } from "node:net";
import type { Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import process from "node:process";

export const VERSION = "1.0.0";

// ============================================================================================
// 1. PROVIDERS and routing defaults: the table you edit.
//    Prices are US dollars per 1 MILLION tokens. Rate limits are per minute unless named per day:
//    rpm requests, tpm tokens, itpm/otpm input/output tokens, concurrency requests at once, rpd/tpd
//    requests/tokens a day. Defaults are the providers' entry-tier limits; a higher tier's limits are
//    learned from the providers' own rate-limit headers, or set them in a config file.
// ============================================================================================

export const PROVIDERS: Record<string, ProviderConfig> = {
  anthropic: {
    name: "Anthropic",
    kind: "anthropic",                  // which adapter speaks to it: "openai" or "anthropic"
    priority: 1,                        // lower is preferred for complex work
    base_url: "https://api.anthropic.com", // Anthropic's convention: no /v1
    api_key_env: "ANTHROPIC_API_KEY",   // variable(s) the key is read from; or give `api_key` literally
    prompt_cache: true,                 // mark cache breakpoints, so that an agent's next turn reads its prompt from the cache
    dimensions: ["rpm", "itpm", "otpm", "tpm"], // Anthropic limits input and output tokens apart (cache reads not counted)
    models: {
      // input/output: $ per 1M tokens; cached_input: $ per 1M cache-read tokens; cache_write: $ per 1M
      // tokens written to the 5-minute cache (1-hour writes: cache_write_1h, else twice the input);
      // tier: simple|complex; pool: Anthropic counts its limits per model class (all Opus together).
      // fixed_sampling: the model rejects temperature/top_p/top_k, so they are not sent.
      "claude-sonnet-5":  { input: 2, output: 10, cached_input: 0.2, cache_write: 2.5, rpm: 50, itpm: 30_000, otpm: 8_000, tier: "complex", pool: "sonnet", fixed_sampling: true },
      "claude-opus-5":    { input: 5, output: 25, cached_input: 0.5, cache_write: 6.25, rpm: 50, itpm: 30_000, otpm: 8_000, tier: "complex", pool: "opus", fixed_sampling: true },
      "claude-haiku-4-5": { input: 1, output: 5, cached_input: 0.1, cache_write: 1.25, rpm: 50, itpm: 50_000, otpm: 10_000, tier: "simple", pool: "haiku" },
    },
  },
  kimi: {
    name: "Kimi",
    kind: "openai",
    priority: 2,
    base_url: "https://api.moonshot.ai/v1",
    api_key_env: ["KIMI_API_KEY", "MOONSHOT_API_KEY"],
    max_tokens_field: "max_tokens",     // Kimi wants the output cap as max_tokens
    max_temperature: 1,                 // Kimi's temperature range is [0, 1]
    reasoning_content: true,            // thinking models refuse tool-call turns without reasoning_content
    dimensions: ["concurrency", "rpm", "tpm", "tpd"], // per account; Tier 1 ($10 recharged) below, Tier 0 is 1 / 3 / 500,000 / 1,500,000
    models: {
      // pool: models of one pool share one rate-limit window (Kimi counts its limits per account)
      "kimi-k2.5": { input: 0.6, output: 3, cached_input: 0.1, concurrency: 50, rpm: 200, tpm: 2_000_000, tier: "simple", pool: "account", fixed_sampling: true },
      "kimi-k2.6": { input: 0.95, output: 4, cached_input: 0.16, concurrency: 50, rpm: 200, tpm: 2_000_000, tier: "simple", pool: "account", fixed_sampling: true },
    },
  },
  openai: {
    name: "OpenAI",
    kind: "openai",
    priority: 3,
    base_url: "https://api.openai.com/v1",
    api_key_env: "OPENAI_API_KEY",
    max_tokens_field: "max_completion_tokens", // max_tokens is deprecated and refused by newer models
    responses: true,                    // serves the Responses API itself: Codex's requests go up untouched
    dimensions: ["rpm", "tpm", "rpd", "tpd"], // per model; Tier 1 ($5 paid) below
    models: {
      "gpt-4o":      { input: 2.5, output: 10, cached_input: 1.25, rpm: 500, tpm: 30_000, tier: "complex" },
      "gpt-4o-mini": { input: 0.15, output: 0.6, cached_input: 0.075, rpm: 500, tpm: 200_000, rpd: 10_000, tier: "simple" },
    },
  },
};

// Names people type that are not (or soon not) real API ids, mapped to the current model that replaces
// them. claude-sonnet-4-5 ends on 2026-11-30 and claude-opus-4-5 was due to retire from 2026-11-24;
// "kimi-k1.5" never was an API id.
export const ALIASES: Record<string, string> = {
  "claude-opus-4-5": "claude-opus-5",
  "claude-sonnet-4-5": "claude-sonnet-5",
  "kimi-k1.5": "kimi-k2.5",
};

export const DEFAULTS = {
  threshold: 0.8,            // a model is eligible while under this share of its limits
  max_wait_ms: 30_000,       // how long a request may wait for capacity when every candidate is saturated
  timeout_ms: 60_000,        // upstream first byte, a whole error body, and the gap between two stream events
  max_body_bytes: 32 * 1024 * 1024, // one request body (Anthropic's own request limit)
  max_inflight_body_bytes: 256 * 1024 * 1024, // all request bodies held at once; past it new ones get 503
  max_answer_bytes: 16 * 1024 * 1024,  // one upstream JSON answer, error body or stream event
  default_max_tokens: 4096,  // output cap sent to APIs that require one when the client gives none
  cooldown_ms: 5_000,        // rest after a 429 that names no reset time
  min_cooldown_ms: 1_000,    // the shortest rest after a 429, whatever its retry-after says (no retry storms)
  max_cooldown_ms: 300_000,  // the longest rest a provider's header can impose (a bad header cannot park a model for years)
  auth_cooldown_ms: 300_000, // rest for a provider whose key was refused (401), or a model refused to the key (403)
  response_ttl_ms: 86_400_000, // how long a Responses answer is kept for previous_response_id / item_reference (0: never kept)
  max_kept_responses: 10_000,  // the most Responses answers kept at once; the oldest go first
  loop_guard: { max_repeats: 8, window_s: 60 }, // the same request from one session more often than this is refused (0: off)
  classifier: "heuristic" as "heuristic" | "model", // "model": when the classifier is unsure, ask the cheapest model for a one-word verdict
  classifier_timeout_ms: 2_000, // how long that second opinion may take; past it the classifier's verdict stands
  session_ttl_ms: 300_000,   // how long a session keeps its warm model after its last turn (Anthropic's cache lasts 5 minutes; 0: no sessions)
};

/** The top-level settings a config file may change (the rest of DEFAULTS are fixed). */
const SETTINGS = ["threshold", "classifier_timeout_ms", "session_ttl_ms", "max_wait_ms", "timeout_ms", "max_body_bytes", "max_inflight_body_bytes", "max_answer_bytes", "cooldown_ms", "min_cooldown_ms", "max_cooldown_ms", "auth_cooldown_ms", "response_ttl_ms", "max_kept_responses"] as const;

// ============================================================================================
// 2. Types: the OpenAI-shaped hub every adapter translates to and from, the resolved config,
//    routing decisions and log rows.
// ============================================================================================

export type Tier = "simple" | "complex";
export type Kind = "openai" | "anthropic";

/**
 * A dimension of a rate limit: requests, tokens, input and output tokens per minute, requests at once,
 * requests and tokens per day. Each provider enforces some of them (its `dimensions`).
 */
export type Dimension = "rpm" | "tpm" | "itpm" | "otpm" | "concurrency" | "rpd" | "tpd";
export const DIMENSIONS: readonly Dimension[] = ["rpm", "tpm", "itpm", "otpm", "concurrency", "rpd", "tpd"];

export type ModelConfig = {
  input: number; output: number; cached_input?: number; cache_write?: number; cache_write_1h?: number;
  tier: Tier; pool?: string; max_tokens?: number; fixed_sampling?: boolean; eol?: string;
  limit?: number; // the older name of tpm
} & Partial<Record<Dimension, number>>;

export type ProviderConfig = {
  name: string; kind: Kind; priority: number; base_url: string;
  dimensions?: Dimension[]; // the limits this provider enforces: a model may set only these
  api_key_env?: string | string[]; api_key?: string;
  max_tokens_field?: "max_tokens" | "max_completion_tokens"; max_temperature?: number; reasoning_content?: boolean;
  prompt_cache?: boolean; responses?: boolean;
  models: Record<string, ModelConfig>;
};

export type ConfigFile = Partial<Record<(typeof SETTINGS)[number], number>> & {
  providers?: Record<string, Partial<ProviderConfig>>; aliases?: Record<string, string>;
  keys?: Record<string, KeyConfig>; budgets?: BudgetConfig[]; loop_guard?: Partial<LoopGuardConfig>; classifier?: "heuristic" | "model";
  redis?: Partial<SharedConfig>;
};

/** A TokenWatch key handed to one agent: its name, or its name and its own budget (section 5). */
export type KeyConfig = string | { agent: string; budget?: Omit<BudgetConfig, "agent" | "per"> };
/** A key as the HTTP edge checks it: only its digest is kept. */
export type AgentKey = { digest: Buffer; agent: string };

/** A provider as the router sees it: config resolved, key read, enabled or not and why. */
export type Provider = {
  id: string; name: string; kind: Kind; priority: number; baseUrl: string;
  apiKey: string | undefined; enabled: boolean; why: string;
  maxTokensField?: "max_tokens" | "max_completion_tokens"; maxTemperature?: number; reasoningContent?: boolean;
  promptCache: boolean;
  responses?: boolean; // it serves the OpenAI Responses API itself (the passthrough lane for Responses clients)
  note?: string;   // what the start banner should say about it (a base URL that pointed at TokenWatch itself)
};

/** One routable model: `key` is "provider/model"; `pool` names its limiter window (its own, or one it shares). */
export type Model = ModelConfig & { key: string; pool: string; id: string; provider: Provider; priced: boolean; order: number; family?: string };

export type Config = typeof DEFAULTS & {
  providers: Provider[]; models: Model[]; aliases: Map<string, string>;
  simpleOrder: Model[]; complexOrder: Model[]; keys: string[];
  agentKeys: AgentKey[]; budgets: Budget[];
  redis: SharedConfig | undefined; // limits and budgets shared with other instances (TOKENWATCH_REDIS_URL)
  named: Map<string, Route>;  // the route of each model name and alias, made once: most requests name a model
};

export type ContentPart = { type: string; text?: string; image_url?: { url: string; detail?: string }; file?: { file_data?: string; filename?: string }; [k: string]: unknown };
export type ToolCall = { id: string; type: "function"; function: { name: string; arguments: string } };
export type ChatMessage = {
  role: "system" | "developer" | "user" | "assistant" | "tool" | "function";
  content?: string | ContentPart[] | null; name?: string;
  tool_calls?: ToolCall[]; tool_call_id?: string; [k: string]: unknown;
};
/** A function tool (JSON arguments) or a custom tool (free text in, as Codex's apply_patch). */
export type Tool = { type: string; function?: { name: string; description?: string; parameters?: unknown }; custom?: { name: string; description?: string; format?: unknown } };

export type ChatRequest = {
  model?: string; messages: ChatMessage[]; stream?: boolean; stream_options?: { include_usage?: boolean; [k: string]: unknown };
  max_tokens?: number; max_completion_tokens?: number; temperature?: number; top_p?: number; n?: number;
  stop?: string | string[]; tools?: Tool[];
  tool_choice?: string | { type: string; function?: { name: string }; custom?: { name: string } }; parallel_tool_calls?: boolean;
  response_format?: { type: string; json_schema?: { name?: string; schema?: unknown } }; user?: string;
  complexity?: Tier; [k: string]: unknown;
};

/**
 * Token counts as billed: `input` is the uncached part of the prompt, `cached` what was read from the
 * provider's cache, `cache_write` what was written to it (Anthropic's 5-minute cache; `cache_write_1h`,
 * its 1-hour cache, costs more).
 */
export type Usage = { input: number; cached: number; cache_write: number; cache_write_1h?: number; output: number };

/** Every cache write of a usage, whatever its lifetime. */
const writes = (u: Usage) => u.cache_write + (u.cache_write_1h ?? 0);

/** The client formats TokenWatch serves: OpenAI Chat Completions, Anthropic Messages, OpenAI Responses. */
export type Format = "chat" | "messages" | "responses";

export type OpenAIUsage = {
  prompt_tokens: number; completion_tokens: number; total_tokens: number;
  prompt_tokens_details: { cached_tokens: number; cache_write_tokens?: number }; cost_usd: number; [k: string]: unknown;
};

export type Completion = {
  id: string; object: "chat.completion"; created: number; model: string;
  choices: { index: number; message: { role: "assistant"; content: string | null; tool_calls?: ToolCall[]; [k: string]: unknown }; finish_reason: string | null; logprobs?: null }[];
  usage?: OpenAIUsage; [k: string]: unknown;
};

/** Where a request is going and why: the selector's answer; `budget`, when a budget's soft cap sent it to the cheap tier, says which. */
export type Route = { complexity: Tier; reason: string; candidates: Model[]; budget?: string; warm?: boolean /* the session's warm model leads */ };

export type Attempt = { provider: string; model: string; status: number; error?: string; ms: number };

export type Row = {
  ts: number; entry: Format; provider: string | null; model: string | null; requested_model: string | null; complexity: string | null;
  status: number; stream: boolean; input_tokens: number; output_tokens: number; cached_tokens: number;
  cache_write_tokens: number; cost_usd: number; latency_ms: number; ttft_ms: number | null; attempts: number;
  failover: string | null; error: string | null; error_kind: string | null;
  agent: string | null; session: string | null; // who asked (section 5): an agent's name, its session's id
};

// ============================================================================================
// 3. Pure helpers: the one error type, token estimate, cost, SSE framing, header parsing,
//    request validation and config validation. Nothing here touches I/O or the clock.
// ============================================================================================

/**
 * The one error type: an HTTP status, an OpenAI error `type` and `code`, and a message that says what to
 * do; `attempts`, when the router tried upstreams first, goes out with it.
 */
export class TwError extends Error {
  status: number; code: string; type: string; param: string | null; headers: Record<string, string>; attempts?: Attempt[];
  /** An upstream's own error body (keys scrubbed), which an entry whose client speaks the upstream's format relays as it is. */
  raw?: string;
  constructor(status: number, code: string, message: string, opts: { type?: string; param?: string | null; headers?: Record<string, string> } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.type = opts.type ?? (status >= 500 ? "server_error" : status === 429 ? "rate_limit_error" : status === 401 ? "authentication_error" : "invalid_request_error");
    this.param = opts.param ?? null;
    this.headers = opts.headers ?? {};
  }
  body(): { error: { message: string; type: string; param: string | null; code: string; attempts?: Attempt[] } } {
    const error = { message: this.message, type: this.type, param: this.param, code: this.code };
    return { error: this.attempts ? { ...error, attempts: this.attempts } : error };
  }
}

const bad = (message: string, param: string | null = null) => new TwError(400, "invalid_request", message, { param });

/** The prompt of a request as the limiter reserves it before the real count is known: a token per four characters of the body (messages, tool schemas and JSON punctuation alike: a slight overestimate, known without walking the conversation). */
export const promptEstimate = (bodyChars: number) => Math.ceil(bodyChars / 4);

/** The output cap a client asked for, if any. */
export const askedOutput = (req: ChatRequest): number | undefined => req.max_completion_tokens ?? req.max_tokens;

/** What a provider counts of a usage against its limits: all tokens, input (Anthropic counts no cache reads), output. */
export function countedOf(kind: Kind, u: Usage): { requests: number; tokens: number; input: number; output: number } {
  return { requests: 0, tokens: windowTokens(kind, u), input: u.input + (kind === "anthropic" ? 0 : u.cached) + writes(u), output: u.output };
}

/** What an image or a document costs in a prompt, about (Anthropic: a 1,092 × 1,092 image is ~1,600 tokens). */
const IMAGE_TOKENS = 1_600;

/**
 * A local count of a Messages request's input tokens, for count_tokens when Anthropic cannot count:
 * every block is counted (system, tools, text, tool calls and their results, thinking), text at a
 * token per four characters, images at IMAGE_TOKENS, documents by their size. An estimate, never 0.
 */
export function estimateMessagesTokens(body: Record<string, unknown>): number {
  let chars = 0, media = 0;
  const walk = (x: unknown): void => {
    if (typeof x === "string") { chars += x.length; return; }
    if (Array.isArray(x)) { for (const v of x) walk(v); return; }
    if (!isObj(x)) return;
    if (x.type === "image" || x.type === "document") {
      const data = isObj(x.source) && typeof x.source.data === "string" ? x.source.data.length : 0;
      media += x.type === "document" ? Math.max(IMAGE_TOKENS, Math.ceil(data / 40)) : IMAGE_TOKENS;
      return;
    }
    for (const [k, v] of Object.entries(x)) if (k !== "cache_control" && k !== "signature") walk(k === "input" && isObj(v) ? JSON.stringify(v) : v);
  };
  walk(body.system);
  walk(body.tools === undefined ? undefined : JSON.stringify(body.tools));
  walk(body.messages);
  return Math.max(1, Math.ceil(chars / 4) + media);
}

const round12 = (x: number) => Math.round(x * 1e12) / 1e12;

/**
 * Exact cost in US dollars: prices are per million tokens; cache reads and writes have their own price
 * (a 1-hour cache write, when the model names no price for it, costs twice the input, as at Anthropic).
 */
export function costUsd(m: Pick<ModelConfig, "input" | "output" | "cached_input" | "cache_write" | "cache_write_1h">, u: Usage): number {
  const perMillion = u.input * m.input + u.cached * (m.cached_input ?? m.input) + u.cache_write * (m.cache_write ?? m.input)
    + (u.cache_write_1h ?? 0) * (m.cache_write_1h ?? 2 * m.input) + u.output * m.output;
  return round12(perMillion / 1e6);
}

/** The tokens a request counts against its model's per-minute limit: Anthropic does not count cache reads. */
export const windowTokens = (kind: Kind, u: Usage) => u.input + (kind === "anthropic" ? 0 : u.cached) + writes(u) + u.output;

export function openAIUsage(u: Usage, cost: number): OpenAIUsage {
  const prompt = u.input + u.cached + writes(u);
  const details = writes(u) ? { cached_tokens: u.cached, cache_write_tokens: writes(u) } : { cached_tokens: u.cached };
  return { prompt_tokens: prompt, completion_tokens: u.output, total_tokens: prompt + u.output, prompt_tokens_details: details, cost_usd: cost };
}

/** No single request counts more tokens than this: it bounds every cost and every sum of them. */
export const MAX_TOKEN_COUNT = 10_000_000;

/**
 * A token count as an upstream reported it, made safe to price and store: a whole number from 0 to
 * MAX_TOKEN_COUNT. Text ("n/a"), NaN or a negative number counts 0; `absent` is what a field that is not
 * a number at all becomes (so that a later event can tell "not said" from "said 0").
 */
export function tokenCount(x: unknown, absent = 0): number {
  if (typeof x !== "number" || Number.isNaN(x)) return absent;
  return x > 0 ? Math.min(Math.round(x), MAX_TOKEN_COUNT) : 0;
}

/** OpenAI usage (and Kimi's, which puts `cached_tokens` at the top) to billed counts. */
export function usageFromOpenAI(raw: unknown): Usage | undefined {
  if (!raw || typeof raw !== "object") return undefined;
  const u = raw as Record<string, any>;
  const cached = tokenCount(u.prompt_tokens_details?.cached_tokens) || tokenCount(u.cached_tokens);
  const write = tokenCount(u.prompt_tokens_details?.cache_write_tokens);
  return { input: Math.max(0, tokenCount(u.prompt_tokens) - cached - write), cached, cache_write: write, output: tokenCount(u.completion_tokens) };
}

/**
 * Anthropic usage: `input_tokens` is already only the uncached part; cache writes are split by lifetime
 * when `cache_creation` says how. Fields it leaves out keep `prev`'s value.
 */
export function usageFromAnthropic(raw: unknown, prev: Usage = { input: 0, cached: 0, cache_write: 0, output: 0 }): Usage {
  const u = (raw ?? {}) as Record<string, any>;
  const written = tokenCount(u.cache_creation_input_tokens, writes(prev));
  const hour = Math.min(written, tokenCount(u.cache_creation?.ephemeral_1h_input_tokens, prev.cache_write_1h ?? 0));
  const out: Usage = { input: tokenCount(u.input_tokens, prev.input), cached: tokenCount(u.cache_read_input_tokens, prev.cached), cache_write: written - hour, output: tokenCount(u.output_tokens, prev.output) };
  if (hour) out.cache_write_1h = hour;
  return out;
}

/** Usage as Anthropic reports it (all four counters, the writes split by lifetime). */
export function anthropicUsage(u: Usage): Record<string, unknown> {
  return {
    input_tokens: u.input, cache_creation_input_tokens: writes(u), cache_read_input_tokens: u.cached, output_tokens: u.output,
    cache_creation: { ephemeral_5m_input_tokens: u.cache_write, ephemeral_1h_input_tokens: u.cache_write_1h ?? 0 },
  };
}

/** One server-sent event. */
export type SseEvent = { event: string | undefined; data: string };

/** Parse one complete SSE event block (the text between blank lines). Comment lines are skipped. */
export function parseSseEvent(block: string): SseEvent | undefined {
  let event: string | undefined;
  const data: string[] = [];
  for (const line of block.split(/\r?\n/)) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length || event ? { event, data: data.join("\n") } : undefined;
}

/** Where the event that starts at `from` ends in `buf` (after its blank line: "\n\n", or "\n\r\n" with CRLF), or -1. */
function eventEnd(buf: Buffer, from: number): number {
  for (let nl = buf.indexOf(10, from); nl >= 0; nl = buf.indexOf(10, nl + 1)) {
    if (buf[nl + 1] === 10) return nl + 2;
    if (buf[nl + 1] === 13 && buf[nl + 2] === 10) return nl + 3;
  }
  return -1;
}

/**
 * Splits a byte stream into whole SSE events without copying more than it must: each call to `push`
 * returns the complete events (raw bytes, separator included) and keeps the unfinished tail. An event
 * that arrives in many chunks is joined once, when it ends (the unfinished tail is kept as a list, and
 * only the new bytes are searched), and one that grows past `max` bytes sets `overflow` and is dropped:
 * an upstream cannot make TokenWatch's memory or work grow without bound.
 */
export class SseSplitter {
  #parts: Buffer[] = [];
  #held = 0;
  #max: number;
  overflow = false;
  constructor(max = Infinity) { this.#max = max; }

  push(chunk: Buffer): Buffer[] {
    if (this.overflow) return [];
    const out: Buffer[] = [];
    let start = 0;
    if (this.#held) {
      const end = this.#straddle(chunk);
      if (end < 0) return this.#hold(chunk, 0);
      out.push(Buffer.concat([...this.#parts, chunk.subarray(0, end)]));
      this.#parts = []; this.#held = 0; start = end;
    }
    for (let end = eventEnd(chunk, start); end >= 0; end = eventEnd(chunk, start)) {
      out.push(start === 0 && end === chunk.length ? chunk : chunk.subarray(start, end)); // one whole event, the usual chunk: no new view
      start = end;
    }
    this.#hold(chunk, start);
    return out;
  }

  /** Where the held event ends in `chunk`, its blank line perhaps begun in the held bytes, or -1. */
  #straddle(chunk: Buffer): number {
    const n = this.#parts.length, last = this.#parts[n - 1], a = last[last.length - 1];
    const b = last.length > 1 ? last[last.length - 2] : n > 1 ? this.#parts[n - 2][this.#parts[n - 2].length - 1] : 0;
    if (a === 10 && chunk[0] === 10) return 1;
    if (a === 10 && chunk[0] === 13 && chunk[1] === 10) return 2;
    if (b === 10 && a === 13 && chunk[0] === 10) return 1;
    return eventEnd(chunk, 0);
  }

  #hold(chunk: Buffer, from: number): Buffer[] {
    if (from >= chunk.length) return [];
    this.#parts.push(Buffer.from(chunk.subarray(from))); // a copy: the caller's chunk may be reused
    this.#held += chunk.length - from;
    if (this.#held > this.#max) { this.overflow = true; this.#parts = []; this.#held = 0; }
    return [];
  }

  get pending(): number { return this.#held; }
}

export const sseData = (json: unknown) => `data: ${JSON.stringify(json)}\n\n`;
export const SSE_DONE = "data: [DONE]\n\n";

/** Go-style durations ("1s", "6m0s", "17.28ms") as OpenAI sends in x-ratelimit-reset-*. */
export function parseDuration(s: string): number | undefined {
  const re = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
  let ms = 0, seen = false;
  for (const [, n, unit] of s.matchAll(re)) {
    seen = true;
    ms += Number(n) * (unit === "h" ? 3_600_000 : unit === "m" ? 60_000 : unit === "s" ? 1000 : 1);
  }
  return seen ? ms : undefined;
}

type HeaderGet = (name: string) => string | null;

/** Each kind's rate-limit headers, named once (every answer is checked): OpenAI's reset is a duration, Anthropic's a timestamp. */
const RATE_LIMIT_HEADERS: Record<Kind, { dim: Dimension; limit: string; remaining: string; reset: string; duration: boolean }[]> = {
  openai: ([["requests", "rpm"], ["tokens", "tpm"]] as const).map(([what, dim]) => ({ dim, limit: `x-ratelimit-limit-${what}`, remaining: `x-ratelimit-remaining-${what}`, reset: `x-ratelimit-reset-${what}`, duration: true })),
  anthropic: ([["requests", "rpm"], ["tokens", "tpm"], ["input-tokens", "itpm"], ["output-tokens", "otpm"]] as const)
    .map(([what, dim]) => ({ dim, limit: `anthropic-ratelimit-${what}-limit`, remaining: `anthropic-ratelimit-${what}-remaining`, reset: `anthropic-ratelimit-${what}-reset`, duration: false })),
};

/** `retry-after-ms`, then `retry-after` (seconds or an HTTP date), as the SDKs read them. */
function retryAfter(get: HeaderGet, now: number): number | undefined {
  const msText = get("retry-after-ms"), ms = Number(msText);
  if (msText && Number.isFinite(ms)) return now + ms;
  const ra = get("retry-after");
  if (!ra) return undefined;
  const secs = Number(ra), date = Date.parse(ra);
  return Number.isFinite(secs) ? now + secs * 1000 : Number.isFinite(date) ? Math.max(now, date) : undefined;
}

/**
 * When a model may be used again, from a response's headers: on an error, its retry-after; then the
 * reset time of whichever rate limit is exhausted (only the headers of the provider's kind are read:
 * this runs on every answer). On a 429 without any of them, `fallbackMs`.
 */
export function coolUntil(get: HeaderGet, status: number, now: number, fallbackMs: number, kind?: Kind): number | undefined {
  const retry = status >= 400 ? retryAfter(get, now) : undefined;
  if (retry !== undefined) return retry;
  let until: number | undefined;
  for (const h of kind ? RATE_LIMIT_HEADERS[kind] : [...RATE_LIMIT_HEADERS.openai, ...RATE_LIMIT_HEADERS.anthropic]) {
    if (get(h.remaining) !== "0") continue; // a reset time matters only for an exhausted limit
    const reset = get(h.reset);
    if (!reset) continue;
    const at = h.duration ? now + (parseDuration(reset) ?? 0) : Date.parse(reset);
    if (Number.isFinite(at)) until = Math.max(until ?? 0, at);
  }
  if (until !== undefined) return until;
  return status === 429 ? now + fallbackMs : undefined;
}

/** SHA-256 of a text: how TokenWatch keys are held and compared. */
const digest = (s: string) => createHash("sha256").update(s).digest();

/** Replace every provider key, and anything shaped like one, before text leaves the process. */
export function scrub(text: string, keys: readonly string[]): string {
  let out = text;
  for (const k of keys) if (k.length >= 8) out = out.split(k).join("[redacted]");
  return out.replace(/\b(sk-(?:ant-)?[A-Za-z0-9_\-]{8,})/g, "[redacted]");
}

const ROLES = new Set(["system", "developer", "user", "assistant", "tool", "function"]);

/**
 * A model name: visible ASCII only, at most 256 characters. It goes into a header of the answer, into
 * the log and onto the dashboard, so it is checked before any upstream is called (a name that cannot be
 * a header would otherwise fail after the provider had answered, and been paid).
 */
export const MODEL_NAME = /^[\x21-\x7E]{1,256}$/;

/** A client's string as an error message may quote it: at most 80 characters. */
export const shown = (x: unknown): string => {
  const s = typeof x === "string" ? JSON.stringify(x.length > 80 ? `${x.slice(0, 80)}…` : x) : String(JSON.stringify(x));
  return s.length > 100 ? `${s.slice(0, 100)}…` : s;
};

function checkModelName(model: unknown): void {
  if (model === undefined) return;
  if (typeof model !== "string" || !MODEL_NAME.test(model))
    throw bad(`"model" must be "auto", a model name, or "provider/model": at most 256 visible ASCII characters, no spaces or line breaks; got ${typeof model === "string" ? shown(model) : typeof model}.`, "model");
}
const isObj = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

function checkNumber(body: Record<string, unknown>, field: string, min: number, max: number, integer = false): void {
  const v = body[field];
  if (v === undefined || v === null) return;
  if (typeof v !== "number" || !Number.isFinite(v) || (integer && !Number.isInteger(v)) || v < min || v > max)
    throw bad(`"${field}" must be ${integer ? "an integer" : "a number"} from ${min} to ${max}; got ${shown(v)}.`, field);
}

function checkContent(m: Record<string, unknown>, i: number): void {
  const c = m.content, where = `messages[${i}].content`;
  if (c === undefined || c === null) {
    if (m.role === "assistant" && Array.isArray(m.tool_calls) && m.tool_calls.length) return;
    throw bad(`${where} is missing: give the ${m.role} message a string or an array of content parts.`, where);
  }
  if (typeof c === "string") return;
  if (!Array.isArray(c)) throw bad(`${where} must be a string or an array of content parts; got ${typeof c}.`, where);
  c.forEach((p, j) => {
    if (!isObj(p) || typeof p.type !== "string") throw bad(`${where}[${j}] must be an object with a "type" such as "text" or "image_url".`, where);
    if (p.type === "text" && typeof p.text !== "string") throw bad(`${where}[${j}].text must be a string.`, where);
    if (p.type === "image_url" && !(isObj(p.image_url) && typeof p.image_url.url === "string")) throw bad(`${where}[${j}].image_url.url must be a string (an https URL or a data: URL).`, where);
  });
}

function checkMessage(m: unknown, i: number): void {
  if (!isObj(m)) throw bad(`messages[${i}] must be an object with "role" and "content".`, "messages");
  if (typeof m.role !== "string" || !ROLES.has(m.role))
    throw bad(`messages[${i}].role ${shown(m.role)} is not one of system, developer, user, assistant, tool.`, `messages[${i}].role`);
  checkContent(m, i);
  if (m.role === "tool" && typeof m.tool_call_id !== "string") throw bad(`messages[${i}] has role "tool" but no "tool_call_id": give the id of the tool call it answers.`, `messages[${i}].tool_call_id`);
  if (m.tool_calls !== undefined) {
    if (m.role !== "assistant" || !Array.isArray(m.tool_calls)) throw bad(`messages[${i}].tool_calls must be an array on an assistant message.`, `messages[${i}].tool_calls`);
    m.tool_calls.forEach((t, j) => {
      if (!isObj(t) || typeof t.id !== "string" || !isObj(t.function) || typeof t.function.name !== "string" || typeof t.function.arguments !== "string")
        throw bad(`messages[${i}].tool_calls[${j}] must be {"id", "type": "function", "function": {"name", "arguments": "<JSON string>"}}.`, `messages[${i}].tool_calls`);
    });
  }
}

/** Check a chat request the way OpenAI would, before anything reaches an upstream. */
export function validateChatRequest(body: unknown): ChatRequest {
  if (!isObj(body)) throw bad("The request body must be a JSON object with \"messages\".");
  if (!Array.isArray(body.messages) || body.messages.length === 0)
    throw bad("\"messages\" must be a non-empty array of {\"role\", \"content\"} objects.", "messages");
  if (body.messages.length > 100_000) throw bad("\"messages\" has more than 100,000 entries.", "messages");
  body.messages.forEach(checkMessage);
  checkModelName(body.model);
  if (body.stream !== undefined && typeof body.stream !== "boolean") throw bad("\"stream\" must be true or false.", "stream");
  if (body.stream_options !== undefined && body.stream_options !== null && (!isObj(body.stream_options) || body.stream !== true))
    throw bad("\"stream_options\" is only allowed with \"stream\": true, as an object such as {\"include_usage\": true}.", "stream_options");
  if (body.complexity !== undefined && body.complexity !== "simple" && body.complexity !== "complex")
    throw bad(`"complexity" must be "simple" or "complex"; got ${shown(body.complexity)}.`, "complexity");
  checkNumber(body, "max_tokens", 1, 10_000_000, true);
  checkNumber(body, "max_completion_tokens", 1, 10_000_000, true);
  checkNumber(body, "temperature", 0, 2);
  checkNumber(body, "top_p", 0, 1);
  checkNumber(body, "n", 1, 128, true);
  if (body.stop !== undefined && body.stop !== null && typeof body.stop !== "string" && !(Array.isArray(body.stop) && body.stop.length <= 4 && body.stop.every((s) => typeof s === "string")))
    throw bad("\"stop\" must be a string or an array of at most 4 strings.", "stop");
  if (body.tools !== undefined && body.tools !== null) {
    if (!Array.isArray(body.tools)) throw bad("\"tools\" must be an array of {\"type\": \"function\", \"function\": {\"name\", \"parameters\"}}.", "tools");
    body.tools.forEach((t, i) => {
      if (!isObj(t) || (t.type === "function" && !(isObj(t.function) && typeof t.function.name === "string")))
        throw bad(`tools[${i}] must be {"type": "function", "function": {"name", "description", "parameters"}}.`, "tools");
    });
  }
  return body as ChatRequest;
}

/**
 * What would make a JSON text costly to parse and walk, found by one cheap scan before any parsing:
 * nesting deeper than `maxDepth`, or more than `maxContainers` objects and arrays (ten million `{}` in
 * 30 MB take seconds to parse, where 30 MB of text take milliseconds). Strings are jumped over.
 */
export function jsonShapeProblem(text: string, maxDepth: number, maxContainers = Infinity): "depth" | "containers" | undefined {
  let depth = 0, containers = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 34) i = closingQuote(text, i); // most of a chat body is string content: jump over it
    else if (c === 123 || c === 91) {
      if (++depth > maxDepth) return "depth";
      if (++containers > maxContainers) return "containers";
    } else if (c === 125 || c === 93) depth--;
  }
  return undefined;
}


/** Where the string opened at `open` ends: the next quote not escaped by an odd run of backslashes (or the end). */
function closingQuote(text: string, open: number): number {
  for (let q = text.indexOf('"', open + 1); q >= 0; q = text.indexOf('"', q + 1)) {
    let b = q - 1;
    while (text.charCodeAt(b) === 92) b--;
    if ((q - 1 - b) % 2 === 0) return q;
  }
  return text.length;
}

// ---- config validation: every mistake stops the start with one line naming the key ----

const CONFIG_KEYS = new Set([...SETTINGS, "providers", "aliases", "keys", "budgets", "loop_guard", "classifier", "redis"]);
const BUDGET_KEYS = new Set(["name", "agent", "per", "period", "soft", "hard"]);
const PROVIDER_KEYS = new Set(["name", "kind", "priority", "base_url", "dimensions", "api_key_env", "api_key", "max_tokens_field", "max_temperature", "reasoning_content", "prompt_cache", "responses", "models"]);
const MODEL_KEYS = new Set(["input", "output", "cached_input", "cache_write", "cache_write_1h", "limit", ...DIMENSIONS, "tier", "pool", "max_tokens", "fixed_sampling", "eol"]);

export class ConfigError extends Error {}

function need(ok: boolean, where: string, what: string): void {
  if (!ok) throw new ConfigError(`${where} ${what}`);
}

const isNum = (x: unknown, min = 0) => typeof x === "number" && Number.isFinite(x) && x >= min;

function checkKeys(obj: Record<string, unknown>, allowed: Set<string>, where: string): void {
  for (const k of Object.keys(obj)) need(allowed.has(k), `${where}.${k}`.replace(/^\./, ""), `is not a known key (known: ${[...allowed].join(", ")})`);
}

function checkModel(m: unknown, where: string, dims: readonly Dimension[] | undefined, provider: string): void {
  need(isObj(m), where, "must be an object like {\"input\": 0.15, \"output\": 0.6, \"tpm\": 200000, \"rpm\": 500, \"tier\": \"simple\"}");
  const o = m as Record<string, unknown>;
  checkKeys(o, MODEL_KEYS, where);
  for (const k of ["input", "output"]) need(isNum(o[k]), `${where}.${k}`, "must be a number >= 0");
  for (const k of ["cached_input", "cache_write", "cache_write_1h", "max_tokens", "limit", ...DIMENSIONS]) need(o[k] === undefined || isNum(o[k]), `${where}.${k}`, "must be a number >= 0");
  need(o.limit === undefined || o.tpm === undefined, `${where}.limit`, "is the older name of tpm: give one of them");
  for (const d of DIMENSIONS) need(o[d] === undefined || !dims || dims.includes(d), `${where}.${d}`, `is not a limit ${provider} has (its dimensions: ${dims?.join(", ")})`);
  need(o.tier === "simple" || o.tier === "complex", `${where}.tier`, "must be \"simple\" or \"complex\"");
  need(o.pool === undefined || (typeof o.pool === "string" && /^[A-Za-z0-9_.-]+$/.test(o.pool)), `${where}.pool`, "must be a name of letters, digits, '_', '-' or '.'");
  need(o.fixed_sampling === undefined || typeof o.fixed_sampling === "boolean", `${where}.fixed_sampling`, "must be true or false");
  need(o.eol === undefined || (typeof o.eol === "string" && Number.isFinite(Date.parse(o.eol))), `${where}.eol`, "must be a date like \"2026-11-30\"");
}

function checkProvider(p: Record<string, unknown>, where: string): void {
  checkKeys(p, PROVIDER_KEYS, where);
  need(typeof p.name === "string", `${where}.name`, "must be a string");
  need(p.kind === "openai" || p.kind === "anthropic", `${where}.kind`, "must be \"openai\" or \"anthropic\"");
  need(isNum(p.priority, -Infinity), `${where}.priority`, "must be a number");
  need(typeof p.base_url === "string" && /^https?:\/\/[^/]/.test(p.base_url), `${where}.base_url`, "must be an http(s) URL");
  const env = p.api_key_env;
  need(env === undefined || typeof env === "string" || (Array.isArray(env) && env.every((e) => typeof e === "string")), `${where}.api_key_env`, "must be a variable name or a list of them");
  need(p.api_key === undefined || typeof p.api_key === "string", `${where}.api_key`, "must be a string");
  need(p.max_tokens_field === undefined || p.max_tokens_field === "max_tokens" || p.max_tokens_field === "max_completion_tokens", `${where}.max_tokens_field`, "must be \"max_tokens\" or \"max_completion_tokens\"");
  need(p.max_temperature === undefined || isNum(p.max_temperature), `${where}.max_temperature`, "must be a number >= 0");
  need(p.reasoning_content === undefined || typeof p.reasoning_content === "boolean", `${where}.reasoning_content`, "must be true or false");
  need(p.prompt_cache === undefined || typeof p.prompt_cache === "boolean", `${where}.prompt_cache`, "must be true or false");
  need(p.responses === undefined || (typeof p.responses === "boolean" && p.kind === "openai"), `${where}.responses`, "must be true or false, on a provider of kind \"openai\"");
  need(p.dimensions === undefined || (Array.isArray(p.dimensions) && p.dimensions.every((d) => DIMENSIONS.includes(d))), `${where}.dimensions`, `must list some of ${DIMENSIONS.join(", ")}`);
  need(isObj(p.models), `${where}.models`, "must be an object of models");
  for (const [name, m] of Object.entries(p.models as object)) {
    need(MODEL_NAME.test(name), `${where}.models.${name}`, "must be named with at most 256 visible ASCII characters (no spaces)");
    checkModel(m, `${where}.models.${name}`, p.dimensions as Dimension[] | undefined, String(p.name));
  }
}

/** A budget's or an agent's name: it goes into headers and messages, so printable ASCII. */
const SHORT_NAME = /^[\x20-\x7E]{1,64}$/;

/** A budget of the config (or of a key, for its agent): a period, and a soft cap, a hard cap or both. */
function checkBudget(b: unknown, where: string): void {
  need(isObj(b), where, "must be an object like {\"period\": \"month\", \"soft\": 40, \"hard\": 50}");
  const o = b as Record<string, unknown>;
  checkKeys(o, BUDGET_KEYS, where);
  need(o.period === "day" || o.period === "month" || o.period === "total", `${where}.period`, "must be \"day\", \"month\" or \"total\"");
  need(o.soft !== undefined || o.hard !== undefined, where, "needs \"soft\" (move to the cheap tier), \"hard\" (refuse), or both, in US dollars");
  for (const k of ["soft", "hard"]) need(o[k] === undefined || isNum(o[k]), `${where}.${k}`, "must be a number of US dollars >= 0");
  need(o.soft === undefined || o.hard === undefined || (o.soft as number) <= (o.hard as number), `${where}.soft`, "must not be above hard");
  need(o.per === undefined || o.per === "agent" || o.per === "session", `${where}.per`, "must be \"agent\" or \"session\" (a cap for each one apart)");
  need(o.per === undefined || o.agent === undefined, `${where}.agent`, "names one agent: give it or \"per\", not both");
  for (const k of ["name", "agent"]) need(o[k] === undefined || (typeof o[k] === "string" && SHORT_NAME.test(o[k] as string)), `${where}.${k}`, "must be 1 to 64 printable ASCII characters");
}

/** `keys`: a TokenWatch key for each agent, mapped to its name, or to its name and its own budget. */
function checkAgentKeys(keys: unknown): void {
  need(isObj(keys), "keys", "must map each key to an agent name, like {\"tw-ci-4f9a…\": \"ci-bot\"}");
  for (const [key, v] of Object.entries(keys as object)) {
    const where = `keys.${key.slice(0, 4)}…`; // never the whole key, even in an error
    need(key.length >= 16, where, "is too short to be a secret: use 16 characters or more (openssl rand -hex 24)");
    const agent = typeof v === "string" ? v : isObj(v) ? v.agent : undefined;
    need(typeof agent === "string" && SHORT_NAME.test(agent), where, "must name its agent (1 to 64 printable ASCII characters), or be {\"agent\": \"name\", \"budget\": {...}}");
    if (isObj(v)) { checkKeys(v, new Set(["agent", "budget"]), where); if (v.budget !== undefined) checkBudget(v.budget, `${where}.budget`); }
  }
}

function checkAccounts(f: Record<string, unknown>): void {
  if (f.keys !== undefined) checkAgentKeys(f.keys);
  need(f.budgets === undefined || Array.isArray(f.budgets), "budgets", "must be a list of budgets");
  ((f.budgets ?? []) as unknown[]).forEach((b, i) => checkBudget(b, `budgets[${i}]`));
  const lg = f.loop_guard;
  need(lg === undefined || (isObj(lg) && Object.keys(lg).every((k) => k === "max_repeats" || k === "window_s") && Object.values(lg).every((x) => isNum(x))),
    "loop_guard", "must be like {\"max_repeats\": 8, \"window_s\": 60} (0 turns it off)");
}

/** Redis, when TOKENWATCH_REDIS_URL or the config names one: its URL, how long a call may take (10 ms), how many instances share the limits. */
function redisOf(f: ConfigFile, env: Record<string, string | undefined>): SharedConfig | undefined {
  const url = env.TOKENWATCH_REDIS_URL || f.redis?.url;
  if (!url) return undefined;
  need(/^rediss?:\/\/[^/]/.test(url), "TOKENWATCH_REDIS_URL", "must be a redis:// or rediss:// URL");
  return { url, timeout_ms: f.redis?.timeout_ms ?? 10, instances: f.redis?.instances };
}

/** The budgets by name (each named after what it covers unless given one), a key's own budget among them. */
function budgetsOf(f: ConfigFile): Budget[] {
  const named = (b: BudgetConfig): Budget => ({ ...b, name: b.name ?? `${b.agent ? `agent ${b.agent}` : b.per ? `each ${b.per}` : "all"} per ${b.period}` });
  const list = (f.budgets ?? []).map(named);
  for (const v of Object.values(f.keys ?? {})) if (typeof v !== "string" && v.budget) list.push(named({ ...v.budget, agent: v.agent }));
  const names = list.map((b) => b.name);
  const twice = names.find((n, i) => names.indexOf(n) !== i);
  need(twice === undefined, "budgets", `name "${twice}" twice: give each budget its own "name"`);
  return list;
}

/**
 * Merge a config file over the built-in table: top-level numbers replace, a provider of the same
 * name is merged key by key (its `models`, when given, replace the list), a new name adds one.
 */
export function mergeConfig(base: Record<string, ProviderConfig>, file: unknown): { providers: Record<string, ProviderConfig>; settings: ConfigFile; aliases: Record<string, string> } {
  need(isObj(file), "config", "must be a JSON object like {\"providers\": {...}}");
  const f = file as Record<string, unknown>;
  checkKeys(f, CONFIG_KEYS, "");
  need(f.threshold === undefined || (isNum(f.threshold) && (f.threshold as number) > 0 && (f.threshold as number) <= 1), "threshold", "must be a number above 0 and at most 1 (0.8 means 80%)");
  for (const k of SETTINGS) if (k !== "threshold") need(f[k] === undefined || isNum(f[k]), k, "must be a number >= 0");
  need(f.providers === undefined || isObj(f.providers), "providers", "must be an object keyed by provider name");
  need(f.aliases === undefined || (isObj(f.aliases) && Object.values(f.aliases).every((v) => typeof v === "string")), "aliases", "must map names to model names");
  checkAccounts(f);
  const r = f.redis;
  need(r === undefined || (isObj(r) && Object.keys(r).every((k) => ["url", "timeout_ms", "instances"].includes(k))), "redis", "must be like {\"url\": \"redis://127.0.0.1:6379\", \"timeout_ms\": 10, \"instances\": 3}");
  if (isObj(r)) {
    need(r.url === undefined || (typeof r.url === "string" && /^rediss?:\/\/[^/]/.test(r.url)), "redis.url", "must be a redis:// or rediss:// URL");
    need(r.timeout_ms === undefined || (isNum(r.timeout_ms) && (r.timeout_ms as number) > 0), "redis.timeout_ms", "must be a number of milliseconds above 0");
    need(r.instances === undefined || (Number.isInteger(r.instances) && (r.instances as number) >= 1), "redis.instances", "must be a whole number >= 1: how many instances share the limits");
  }
  need(f.classifier === undefined || f.classifier === "heuristic" || f.classifier === "model", "classifier", "must be \"heuristic\" (the default) or \"model\" (ask the cheapest model when the heuristic is unsure)");
  const providers: Record<string, ProviderConfig> = structuredClone(base);
  for (const [id, over] of Object.entries((f.providers ?? {}) as Record<string, unknown>)) {
    need(isObj(over), `providers.${id}`, "must be an object");
    need(/^[A-Za-z0-9_.-]+$/.test(id), `providers.${id}`, "must be named with letters, digits, '_', '-' or '.'");
    const merged = { ...(providers[id] ?? {}), ...(over as object) } as Record<string, unknown>;
    if (!providers[id]) for (const k of ["kind", "base_url"]) need((over as Record<string, unknown>)[k] !== undefined, `providers.${id}.${k}`, "is required for a new provider");
    merged.name ??= id;
    merged.priority ??= 10;
    merged.models ??= {};
    checkProvider(merged, `providers.${id}`);
    providers[id] = merged as ProviderConfig;
  }
  return { providers, settings: f as ConfigFile, aliases: { ...ALIASES, ...((f.aliases ?? {}) as Record<string, string>) } };
}

const LOCAL_URL = /^https?:\/\/(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?(\/|$)/;

/** Read keys and base URLs from the environment and decide which providers are enabled. */
/** Where TokenWatch itself listens, to notice a base URL that would make it call itself. */
export type Listen = { host: string; port: number };

/** Whether a URL points at TokenWatch's own listen address (a loopback name or the listen host, and its port). */
export function pointsAtSelf(url: string, self: Listen | undefined): boolean {
  if (!self) return false;
  let u: URL;
  try { u = new URL(url); } catch { return false; }
  const host = u.hostname.replace(/^\[|\]$/g, ""), port = Number(u.port || (u.protocol === "https:" ? 443 : 80));
  return port === self.port && (host === self.host || /^(127\.\d+\.\d+\.\d+|localhost|::1|0\.0\.0\.0)$/.test(host));
}

/**
 * A provider's base URL: its variable (ANTHROPIC_BASE_URL…), else the config's, else the built-in one;
 * one that points at TokenWatch itself is passed over, with a note for the banner. Claude Code users
 * set ANTHROPIC_BASE_URL to TokenWatch in the same shell that starts it.
 */
function baseUrlOf(id: string, p: ProviderConfig, env: Record<string, string | undefined>, builtIn: string | undefined, self: Listen | undefined): { url: string; note?: string } {
  const variable = `${id.toUpperCase()}_BASE_URL`;
  const choices = [[env[variable], variable], [p.base_url, "its base_url"], [builtIn, "the built-in URL"]] as const;
  const skipped: string[] = [];
  for (const [url, from] of choices) {
    if (!url) continue;
    if (!pointsAtSelf(url, self)) return { url: url.replace(/\/+$/, ""), note: skipped.length ? `${skipped.join(" and ")} point${skipped.length > 1 ? "" : "s"} at TokenWatch itself: ignored, ${id} uses ${url}` : undefined };
    skipped.push(`${from} (${url})`);
  }
  return { url: p.base_url.replace(/\/+$/, ""), note: `${skipped.join(" and ")} point at TokenWatch itself, and there is no other: every request to ${id} will be refused as a loop (508)` };
}

function resolveProvider(id: string, p: ProviderConfig, env: Record<string, string | undefined>, builtIn: string | undefined, self: Listen | undefined): Provider {
  const vars = p.api_key_env === undefined ? [] : Array.isArray(p.api_key_env) ? p.api_key_env : [p.api_key_env];
  const apiKey = p.api_key || vars.map((v) => env[v]).find((v) => v);
  const { url: baseUrl, note } = baseUrlOf(id, p, env, builtIn, self);
  const local = LOCAL_URL.test(baseUrl);
  const enabled = Boolean(apiKey) || local;
  const why = enabled ? (apiKey ? "key set" : "local server, no key needed") : `no key (set ${vars.join(" or ") || "api_key"})`;
  return { id, name: p.name, kind: p.kind, priority: p.priority, baseUrl, apiKey: apiKey || undefined, enabled, why, maxTokensField: p.max_tokens_field, maxTemperature: p.max_temperature, reasoningContent: p.reasoning_content, promptCache: p.prompt_cache !== false, responses: p.responses === true, ...(note ? { note } : {}) };
}

const priceSum = (m: Model) => m.input + m.output;

/** Build the router's view of the config; candidate orders are computed once here, not per request. */
export function buildConfig(opts: { file?: unknown; env?: Record<string, string | undefined>; base?: Record<string, ProviderConfig>; listen?: Listen } = {}): Config {
  const env = opts.env ?? {}, base = opts.base ?? PROVIDERS;
  const { providers: table, settings, aliases } = mergeConfig(base, opts.file ?? {});
  const providers = Object.entries(table).map(([id, p]) => resolveProvider(id, p, env, Object.hasOwn(base, id) ? base[id].base_url : undefined, opts.listen));
  const models: Model[] = [];
  for (const p of providers)
    for (const [id, m] of Object.entries(table[p.id].models)) models.push({ ...m, id, key: `${p.id}/${id}`, pool: `${p.id}/${m.pool ?? id}`, provider: p, priced: true, order: models.length });
  const enabled = models.filter((m) => m.provider.enabled);
  const byPriority = (a: Model, b: Model) => a.provider.priority - b.provider.priority || a.order - b.order;
  const simpleOrder = [...enabled].sort((a, b) => priceSum(a) - priceSum(b) || a.order - b.order);
  const complexOrder = [...enabled.filter((m) => m.tier === "complex").sort(byPriority), ...enabled.filter((m) => m.tier === "simple").sort(byPriority)];
  const maxWait = env.TOKENWATCH_MAX_WAIT_MS !== undefined ? Number(env.TOKENWATCH_MAX_WAIT_MS) : settings.max_wait_ms;
  if (maxWait !== undefined) need(isNum(maxWait), "TOKENWATCH_MAX_WAIT_MS", "must be a number of milliseconds >= 0");
  const keys = providers.map((p) => p.apiKey).filter((k): k is string => Boolean(k));
  const given = Object.fromEntries(SETTINGS.filter((k) => settings[k] !== undefined).map((k) => [k, settings[k]]));
  // a model in the table always means that model: an alias of the same name (a built-in one) steps aside
  const names = new Set(models.map((m) => m.id));
  const aliasMap = new Map(Object.entries(aliases).filter(([name]) => !names.has(name)));
  const config: Config = {
    ...DEFAULTS, ...given, max_wait_ms: maxWait ?? settings.max_wait_ms ?? DEFAULTS.max_wait_ms,
    providers, models, aliases: aliasMap, simpleOrder, complexOrder, keys, named: new Map(),
    agentKeys: Object.entries(settings.keys ?? {}).map(([key, v]) => ({ digest: digest(key), agent: typeof v === "string" ? v : v.agent })),
    redis: redisOf(settings, env), budgets: budgetsOf(settings), loop_guard: { ...DEFAULTS.loop_guard, ...settings.loop_guard }, classifier: settings.classifier ?? DEFAULTS.classifier,
  };
  for (const name of new Set([...names, ...aliasMap.keys()])) {
    try { config.named.set(name, byModelName(config, name, aliasMap.get(name) ?? name)); } catch { /* an alias of nothing: route() answers 404 */ }
  }
  return config;
}

// ============================================================================================
// 4. Limiter: the rate limits providers enforce, per dimension (requests, tokens, input and output
//    tokens a minute, requests at once, requests and tokens a day), per model or per shared pool. Sliding
//    windows count what TokenWatch sends; the providers' rate-limit headers, read on every answer, add
//    what other clients of the same key send and the limits the account really has. One function gives
//    the verdict for a model and a request, for routing and for /stats alike. Checking and reserving
//    happen in one synchronous step, so two requests can never both take the last capacity.
// ============================================================================================

/** What a request counts: its input and output tokens (an estimate before the answer, the real usage after). */
export type Estimate = { input: number; output: number };

type Counts = { requests: number; tokens: number; input: number; output: number };

/**
 * A sliding window of `n` buckets of `width` ms, each holding the four counts, and their running sums:
 * bounded memory, and reading the totals costs nothing but retiring the buckets that left (it is read
 * for every dimension of every candidate of every request).
 */
export class SlidingWindow {
  #at: Float64Array; #c: Record<keyof Counts, Float64Array>; #n: number; #width: number;
  #sum: Counts = { requests: 0, tokens: 0, input: 0, output: 0 };
  #last = -Infinity; // the newest bucket the window has moved to
  constructor(n = 60, width = 1000) {
    this.#n = n; this.#width = width;
    this.#at = new Float64Array(n).fill(-1);
    this.#c = { requests: new Float64Array(n), tokens: new Float64Array(n), input: new Float64Array(n), output: new Float64Array(n) };
  }

  /** Move the window to `now`'s bucket: the buckets that left it give their counts back. */
  #roll(now: number): number {
    const b = Math.floor(now / this.#width);
    if (b <= this.#last) return b;
    const steps = Math.min(this.#n, b - this.#last);
    for (let s = steps - 1; s >= 0; s--) {
      const i = (b - s) % this.#n;
      if (this.#at[i] >= 0) for (const k of COUNT_KEYS) { this.#sum[k] -= this.#c[k][i]; this.#c[k][i] = 0; }
      this.#at[i] = b - s;
    }
    this.#last = b;
    return b;
  }

  add(now: number, c: Partial<Counts>): void {
    const b = this.#roll(now), i = b % this.#n;
    if (this.#at[i] !== b) return; // older than the window (a clock that went back): it has left already
    for (const k of COUNT_KEYS) { const v = c[k] ?? 0; this.#c[k][i] += v; this.#sum[k] += v; }
  }

  totals(now: number): Counts {
    this.#roll(now);
    return { ...this.#sum };
  }

  empty(now: number): boolean {
    this.#roll(now);
    return this.#sum.requests <= 0 && this.#sum.tokens <= 0;
  }

  /** When enough of `count` will have left the window for its sum to drop by `need`, or undefined if it never holds that much. */
  freeAt(now: number, count: keyof Counts, need: number): number | undefined {
    const oldest = Math.floor(now / this.#width) - this.#n;
    const live = [...this.#at.keys()].filter((i) => this.#at[i] > oldest && this.#c[count][i] > 0).sort((a, b) => this.#at[a] - this.#at[b]);
    let gone = 0;
    for (const i of live) {
      gone += this.#c[count][i];
      if (gone >= need) return (this.#at[i] + this.#n + 1) * this.#width;
    }
    return undefined;
  }
}

const COUNT_KEYS = ["requests", "tokens", "input", "output"] as const;

/** What each dimension counts, and whether over the sliding day (else the sliding minute). */
const MEASURES: Record<Dimension, { count: keyof Counts | "inflight"; day: boolean }> = {
  rpm: { count: "requests", day: false }, tpm: { count: "tokens", day: false }, itpm: { count: "input", day: false }, otpm: { count: "output", day: false },
  concurrency: { count: "inflight", day: false }, rpd: { count: "requests", day: true }, tpd: { count: "tokens", day: true },
};

/**
 * What the provider said of one dimension in its headers: how much was used then (of the limit), and
 * when it is whole again. `by` and `charged`: the request whose answer carried them, and the output it
 * was charged up front (its max_tokens), which the provider corrects to the real output when it ends.
 */
type Observation = { used: number; at: number; reset: number; by?: Reservation; charged: number };

/** `coolAsked`: the end of the rest the provider asked for, when that was past the ceiling (shown on the dashboard). */
type Pool = {
  minute: SlidingWindow; day: SlidingWindow | undefined; inflight: number; reserved: Estimate;
  coolUntil: number; coolAsked: number;
  seen: Partial<Record<Dimension, Observation>>; learned: Partial<Record<Dimension, number>>;
};

/** A model's share of capacity taken by one request; hand it back with `settle` or `release`. */
export type Reservation = { pool: string; key: string; estimate: Estimate; done: boolean; shared?: string /* its id in Redis */ };

/** One dimension of a model as routing sees it now: what is used (counted here, or seen by the provider), of which limit. */
export type DimensionView = {
  dimension: Dimension; used: number; limit: number; configured: number | null; learned: number | null;
  percent: number; blocks: boolean; free_at: number | null;
};

export type Verdict =
  | { ok: true; reservation: Reservation; dimensions: DimensionView[] }
  | { ok: false; why: "cooling" | Dimension; until: number | undefined; dimensions: DimensionView[] };

export type Headroom = { tokens: number; requests: number; inflight: number; percent: number; saturated: boolean; coolUntil: number; coolAsked: number; binding: Dimension | null; dimensions: DimensionView[] };

type Limits = Pick<Model, "key" | "pool" | Dimension | "limit">;

/** A model's configured limit in one dimension (`limit` is the older name of `tpm`). */
export const configuredLimit = (m: Limits, d: Dimension): number | undefined => (d === "tpm" ? m.tpm ?? m.limit : m[d]);

/** How many recent answers a model's output estimate looks at. */
const OUTPUTS_KEPT = 32;

export class Limiter implements Capacity {
  #pools = new Map<string, Pool>();
  #recent = new Map<string, { input: number[]; output: number[] }>(); // per model: its last answers' counted input and output
  #waiters = new Set<() => void>();
  #sweepAt = 64;
  threshold: number;
  #minCool: number;
  #maxCool: number;
  /** `cooldown`: the shortest and longest rest `cool()` may impose, whatever a provider's headers say. */
  constructor(threshold: number, cooldown: { min: number; max: number } = { min: 0, max: Infinity }) {
    this.threshold = threshold;
    this.#minCool = cooldown.min;
    this.#maxCool = cooldown.max;
  }

  #pool(name: string): Pool {
    let p = this.#pools.get(name);
    if (!p) this.#pools.set(name, (p = { minute: new SlidingWindow(60, 1000), day: undefined, inflight: 0, reserved: { input: 0, output: 0 }, coolUntil: 0, coolAsked: 0, seen: {}, learned: {} }));
    return p;
  }

  /** How many pools are held: the table's, plus the shared pool of each provider's models outside the table. */
  get size(): number { return this.#pools.size; }

  /** Forget the pools that hold nothing (an empty window, nothing in flight or seen, no cooldown): such a pool answers as a new one would. */
  #sweep(now: number): void {
    for (const [key, p] of this.#pools)
      if (p.inflight === 0 && p.coolUntil <= now && p.minute.empty(now) && (!p.day || p.day.empty(now)) && Object.keys(p.seen).length === 0) this.#pools.delete(key);
    this.#sweepAt = Math.max(64, 2 * this.#pools.size); // amortized: a sweep per doubling
  }

  /** What a dimension holds now: the larger of local counting and the provider's own view, plus what is in flight. */
  #used(p: Pool, d: Dimension, now: number): { used: number; local: number; seen: number } {
    const { count, day } = MEASURES[d];
    if (count === "inflight") return { used: p.inflight, local: 0, seen: 0 };
    const local = day ? p.day?.totals(now)[count] ?? 0 : p.minute.totals(now)[count];
    const o = p.seen[d], seen = o && o.reset > now ? o.used * Math.min(1, (o.reset - now) / Math.max(1, o.reset - o.at)) : 0; // the provider refills it until its reset
    const flying = count === "input" ? p.reserved.input : count === "output" ? p.reserved.output : count === "tokens" ? p.reserved.input + p.reserved.output : 0;
    return { used: Math.max(local, seen) + flying, local, seen };
  }

  /** How much of a dimension one request takes. */
  static #takes(d: Dimension, e: Estimate): number {
    const c = MEASURES[d].count;
    return c === "requests" || c === "inflight" ? 1 : c === "input" ? e.input : c === "output" ? e.output : e.input + e.output;
  }

  /**
   * When a blocked dimension can take the request: the provider's reset when its view is what binds;
   * else when enough of the window's usage has left it; undefined when only requests in flight can free
   * room (their end wakes the waiters).
   */
  #freeAt(p: Pool, d: Dimension, local: number, seen: number, need: number, now: number): number | undefined {
    const { count, day } = MEASURES[d];
    if (count === "inflight") return undefined;
    if (seen > local) return p.seen[d]!.reset;
    return need <= local ? (day ? p.day : p.minute)?.freeAt(now, count, need) : undefined;
  }

  /**
   * The one verdict: may a request of this size go to this model now, dimension by dimension, and if not,
   * which dimension binds and until when. A dimension blocks when what it holds plus the request would
   * pass threshold × its limit (the provider's own limit from its headers, else the configured one). A
   * pool idle here takes one request whatever its size (else a prompt above the threshold would wait
   * forever), unless the provider says others fill it.
   */
  assess(m: Limits, e: Estimate, now: number): { why: "cooling" | Dimension | undefined; until: number | undefined; dimensions: DimensionView[] } {
    const p = this.#pool(m.pool);
    const idle = p.inflight === 0 && p.minute.empty(now);
    const dimensions: DimensionView[] = [];
    let why: "cooling" | Dimension | undefined = p.coolUntil > now ? "cooling" : undefined, until = why ? p.coolUntil : undefined;
    for (const d of DIMENSIONS) {
      const configured = configuredLimit(m, d), learned = p.learned[d], limit = learned ?? configured;
      if (!limit || !Number.isFinite(limit)) continue;
      const { used, local, seen } = this.#used(p, d, now), need = used + Limiter.#takes(d, e) - this.threshold * limit;
      const blocks = need > 0 && (!idle || seen > 0);
      const free = blocks ? this.#freeAt(p, d, local, seen, need, now) : undefined;
      dimensions.push({ dimension: d, used, limit, configured: configured ?? null, learned: learned ?? null, percent: Math.round((used / limit) * 1000) / 10, blocks, free_at: free ?? null });
      if (blocks && !why) { why = d; until = free; }
    }
    return { why, until, dimensions };
  }

  /** The verdict, and when it is yes, the reservation: one synchronous step. */
  reserve(m: Limits, e: Estimate, now: number): Verdict {
    if (this.#pools.size >= this.#sweepAt && !this.#pools.has(m.pool)) this.#sweep(now);
    const v = this.assess(m, e, now);
    if (v.why) return { ok: false, why: v.why, until: v.until, dimensions: v.dimensions };
    const p = this.#pool(m.pool);
    p.minute.add(now, { requests: 1 });
    if (p.day || configuredLimit(m, "rpd") || configuredLimit(m, "tpd")) (p.day ??= new SlidingWindow(24, 3_600_000)).add(now, { requests: 1 });
    p.inflight++;
    p.reserved.input += e.input;
    p.reserved.output += e.output;
    return { ok: true, reservation: { pool: m.pool, key: m.key, estimate: e, done: false }, dimensions: v.dimensions };
  }

  /** Replace the reservation's estimate with what the provider counted (`counted`), and learn the model's output size. */
  settle(r: Reservation, counted: Counts | undefined, now: number): void {
    if (r.done) return;
    r.done = true;
    const p = this.#pool(r.pool);
    p.inflight--;
    p.reserved.input -= r.estimate.input;
    p.reserved.output -= r.estimate.output;
    if (counted) {
      this.#correct(p, r, counted.output);
      p.minute.add(now, { ...counted, requests: 0 });
      p.day?.add(now, { ...counted, requests: 0 });
    }
    this.learn(r.key, counted);
    this.#wake();
  }

  /** Keep a model's latest answer sizes: what its output estimate and its typical request come from. */
  learn(key: string, counted: Counts | undefined): void {
    if (!counted) return;
    let seen = this.#recent.get(key);
    if (!seen) {
      if (this.#recent.size >= 1024) this.#recent.clear(); // names outside the table come and go
      this.#recent.set(key, (seen = { input: [], output: [] }));
    }
    seen.input.push(counted.input);
    seen.output.push(counted.output);
    if (seen.output.length > OUTPUTS_KEPT) { seen.input.shift(); seen.output.shift(); }
  }

  /** Wake the requests waiting for capacity (another limiter's reservation ended). */
  nudge(): void { this.#wake(); }

  /** What a pool's providers headers said and taught, for sharing them; undefined for a pool never seen. */
  seenOf(pool: string): { seen: Partial<Record<Dimension, Observation>>; learned: Partial<Record<Dimension, number>> } | undefined {
    const p = this.#pools.get(pool);
    return p && { seen: p.seen, learned: p.learned };
  }

  /** Until when a pool rests (0: it does not). */
  coolEnd(pool: string): number { return this.#pools.get(pool)?.coolUntil ?? 0; }

  release(r: Reservation, now: number): void { this.settle(r, undefined, now); }

  /**
   * The output tokens to reserve for a request: what the client asks for as its cap, else the largest of
   * the model's recent answers (a figure learned, not a fixed worst case), within [256, fallback].
   */
  outputEstimate(key: string, asked: number | undefined, fallback: number): number {
    if (asked !== undefined) return asked;
    const seen = this.#recent.get(key)?.output;
    return seen?.length ? Math.min(fallback, Math.max(256, ...seen)) : Math.min(fallback, 1024);
  }

  /** A typical request of a model: the median prompt of its recent answers (1,000 tokens before any) and its output estimate. What /stats asks about. */
  typical(key: string, fallback: number): Estimate {
    const inputs = [...(this.#recent.get(key)?.input ?? [])].sort((a, b) => a - b);
    return { input: inputs.length ? inputs[inputs.length >> 1] : 1000, output: this.outputEstimate(key, undefined, fallback) };
  }

  /**
   * Learn from an answer's rate-limit headers: each dimension's limit (the account's real one, when it
   * differs from the table) and what the provider counts as used until its reset (other clients of the
   * same key included). A reset is kept within the ceiling, like a cooldown.
   */
  observe(pool: string, kind: Kind, get: HeaderGet, now: number, by?: Reservation, charged = 0): void {
    let p: Pool | undefined;
    for (const h of RATE_LIMIT_HEADERS[kind]) {
      const limit = Number(get(h.limit)), remaining = Number(get(h.remaining));
      if (!(limit > 0) || !Number.isFinite(remaining)) continue;
      const resetText = get(h.reset), at = resetText ? (h.duration ? now + (parseDuration(resetText) ?? 0) : Date.parse(resetText)) : NaN;
      p ??= this.#pool(pool);
      p.learned[h.dim] = limit;
      p.seen[h.dim] = { used: Math.max(0, limit - remaining), at: now, reset: Number.isFinite(at) ? Math.min(Math.max(at, now), now + this.#maxCool) : now + 60_000, by, charged };
    }
  }

  /** The provider has corrected its up-front charge for the output to the real output: so does what it said. True if it had. */
  #correct(p: Pool, r: Reservation, output: number): boolean {
    let changed = false;
    for (const d of ["otpm", "tpm", "tpd"] as const) {
      const o = p.seen[d];
      if (o?.by === r) { o.used = Math.max(0, o.used - Math.max(0, o.charged - output)); o.by = undefined; changed = true; }
    }
    return changed;
  }

  /** The same correction for a reservation settled elsewhere (the shared limiter's): true if the headers' view changed. */
  corrected(pool: string, r: Reservation, output: number): boolean { return this.#correct(this.#pool(pool), r, output); }

  /** The model's dimensions and cooldown now, for a typical request: what /stats and the dashboard show. */
  headroom(m: Limits, now: number, typical: Estimate = { input: 1000, output: 1024 }): Headroom {
    const p = this.#pool(m.pool), w = p.minute.totals(now), v = this.assess(m, typical, now);
    const cooling = p.coolUntil > now;
    const top = v.dimensions.reduce<DimensionView | undefined>((a, d) => (!a || d.percent > a.percent ? d : a), undefined);
    return {
      tokens: w.tokens + p.reserved.input + p.reserved.output, requests: w.requests, inflight: p.inflight, percent: top?.percent ?? 0,
      saturated: v.why !== undefined && v.why !== "cooling", coolUntil: cooling ? p.coolUntil : 0, coolAsked: cooling ? p.coolAsked : 0,
      binding: v.why && v.why !== "cooling" ? v.why : top && top.percent > 0 ? top.dimension : null, dimensions: v.dimensions,
    };
  }

  /**
   * Rest a pool until `until`, kept between the floor and the ceiling: a retry-after of 0 (or in the
   * past) must not let a model be retried at once, nor one of years park it for good.
   */
  cool(pool: string, until: number, now: number): void {
    const p = this.#pool(pool), end = Math.min(Math.max(until, now + this.#minCool), now + this.#maxCool);
    if (end > p.coolUntil) { p.coolUntil = end; p.coolAsked = until > end ? until : 0; }
  }

  /** Call `fn` once, at the next settle or release: capacity may have come back. */
  onNextChange(fn: () => void): () => void {
    this.#waiters.add(fn);
    return () => this.#waiters.delete(fn);
  }

  #wake(): void {
    if (!this.#waiters.size) return;
    const all = [...this.#waiters];
    this.#waiters.clear();
    for (const w of all) w();
  }
}

/**
 * What routing needs of a limiter: the local one decides in one synchronous step; the shared one
 * (section 6) asks Redis, so its verdict may come as a promise.
 */
export interface Capacity {
  reserve(m: Limits, e: Estimate, now: number): Verdict | Promise<Verdict>;
  settle(r: Reservation, counted: Counts | undefined, now: number): void;
  release(r: Reservation, now: number): void;
  observe(pool: string, kind: Kind, get: HeaderGet, now: number, by?: Reservation, charged?: number): void;
  cool(pool: string, until: number, now: number): void;
  outputEstimate(key: string, asked: number | undefined, fallback: number): number;
  typical(key: string, fallback: number): Estimate;
  assess(m: Limits, e: Estimate, now: number): { why: "cooling" | Dimension | undefined };
  headroom(m: Limits, now: number, typical?: Estimate): Headroom;
  onNextChange(fn: () => void): () => void;
}

// ============================================================================================
// 5. Accounts: who is asking (an agent, a session), what they may spend (budgets), and the loop guard.
//    Pure but for the spend already in the log, which a budget reads once per period and subject
//    (`SpendOf`): spend survives a restart because it is the log's, not a counter's.
// ============================================================================================

/**
 * Who sent a request: the agent (a key's name, a header, the client's own id) and its session; `named`
 * when the client named the session, rather than TokenWatch fingerprinting the conversation.
 */
export type Identity = { agent: string | null; session: string; named: boolean };

/** The agent names a client's user-agent (or Codex's originator) gives away, when nothing names the agent. */
const CLIENT_AGENTS: [RegExp, string][] = [[/^claude-cli\//i, "claude-code"], [/^codex/i, "codex"]];

/** A name or id from a client, made safe to store and show: printable ASCII up to `max`; anything else becomes a short hash. */
function idOf(x: unknown, max: number): string | undefined {
  if (typeof x !== "string" || !x) return undefined;
  return /^[\x20-\x7E]+$/.test(x) && x.length <= max ? x : `h:${createHash("sha256").update(x).digest("hex").slice(0, 16)}`;
}

/** Claude Code's metadata.user_id holds its session (`…_session_<uuid>`, or JSON with session_id since 2.1.92): the session, else the whole id. */
function sessionOfUserId(v: unknown): unknown {
  if (typeof v !== "string") return undefined;
  const plain = /_session_([0-9a-f-]{8,})/i.exec(v)?.[1];
  if (plain) return plain;
  try { const o = JSON.parse(v); if (isObj(o) && typeof o.session_id === "string") return o.session_id; } catch { /* an opaque id */ }
  return v;
}

/**
 * A conversation's own fingerprint, when nothing names its session: its system prompt and first user
 * message stay the same every turn. Their lengths and ends are enough to tell conversations apart, and
 * hashing those (FNV-1a, twice) costs a microsecond where a SHA of a 20 KB system prompt costs ten.
 */
function conversationHash(hub: ChatRequest): string {
  const system = textOf(hub.messages.find((m) => m.role === "system" || m.role === "developer")?.content);
  const first = textOf(hub.messages.find((m) => m.role === "user")?.content);
  return `h:${fnv64(`${system.length}:${system.slice(0, 256)}${system.slice(-256)}\0${first.length}:${first.slice(0, 384)}${first.slice(-128)}`)}`;
}

/** FNV-1a twice over, from two seeds, in one pass: 64 bits as 16 hex digits. A fingerprint, not a secret. */
function fnv64(s: string): string {
  let a = 0x811c9dc5, b = 0x01000193;
  for (let i = 0; i < s.length; i++) { const c = s.charCodeAt(i); a = Math.imul(a ^ c, 16777619); b = Math.imul(b ^ c, 0x5bd1e995); }
  return (a >>> 0).toString(16).padStart(8, "0") + (b >>> 0).toString(16).padStart(8, "0");
}

/**
 * Who is asking. The agent: the TokenWatch key's name (it cannot be overridden), else x-tokenwatch-agent,
 * else Claude Code's sub-agent id, else the client's own name (claude-code, codex). The session: the
 * first of x-tokenwatch-session, x-claude-code-session-id, prompt_cache_key, metadata.user_id,
 * safety_identifier, user, and failing those the conversation's fingerprint.
 */
export function identify(headers: IncomingMessage["headers"], body: Record<string, unknown>, hub: ChatRequest, keyAgent?: string): Identity {
  const h = (n: string) => { const v = headers[n]; return Array.isArray(v) ? v[0] : v; };
  const subAgent = h("x-claude-code-agent-id");
  const ua = h("originator") ?? h("user-agent") ?? "";
  const agent = keyAgent ?? idOf(h("x-tokenwatch-agent"), 64) ?? (subAgent ? idOf(`claude-code/${subAgent}`, 64) : undefined)
    ?? CLIENT_AGENTS.find(([re]) => re.test(ua))?.[1] ?? null;
  const meta = isObj(body.metadata) ? body.metadata.user_id : undefined;
  const named = [h("x-tokenwatch-session"), h("x-claude-code-session-id"), body.prompt_cache_key, sessionOfUserId(meta), body.safety_identifier, body.user]
    .map((x) => idOf(x, 128)).find((x) => x !== undefined);
  return { agent, session: named ?? conversationHash(hub), named: named !== undefined };
}

// ---- budgets ----

export type Period = "day" | "month" | "total";
/** A cap in US dollars per period: for everything, for one agent (`agent`), or for each agent or session apart (`per`). */
export type BudgetConfig = { name?: string; agent?: string; per?: "agent" | "session"; period: Period; soft?: number; hard?: number };
export type Budget = BudgetConfig & { name: string };

/** The spend the log holds since a time: everything, one agent's, or one session's. */
export type SpendOf = (scope: { agent?: string; session?: string }, since: number) => number;

/** When a period began and ends (UTC calendar days and months, as providers bill); `total` never ends. */
export function periodOf(period: Period, t: number): { start: number; end: number } {
  const d = new Date(t);
  if (period === "total") return { start: 0, end: Infinity };
  if (period === "day") { const start = Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()); return { start, end: start + 86_400_000 }; }
  return { start: Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), 1), end: Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 1) };
}

/** What one budget holds for one subject in one period: the spend settled, and the estimates of requests in flight. */
/** `unsynced`: costs settled here that Redis does not hold yet (spent while it was down), pushed with the next shared admit. */
type Spend = { budget: Budget; subject: string | null; start: number; end: number; spent: number; reserved: number; unsynced: number };

/** A request's hold on its budgets: the estimate it reserved on each, given back with its real cost at the end. */
export type Ticket = { spends: Spend[]; estimate: number; done: boolean; shared?: string /* its id in Redis */ };

/** Where budgets keep their spend when instances share them (section 6): a spend's key there, and the calls. */
export type BudgetLink = {
  up(): boolean;
  admit(spends: { key: string; hard: number; seed: number; expireAt: number; add: number }[], estimate: number, id: string): Promise<{ ok: boolean; over: number; figures: [number, number][] }>;
  /** Resolves false when Redis did not take the cost. */
  settle(keys: string[], id: string, cost: number): Promise<boolean>;
};

/** A spend's key in Redis: the budget, its subject and its period. */
const spendKey = (s: Spend) => `tw:{budgets}:${s.budget.name}:${s.subject ?? ""}:${s.start}`; // one hash tag: a request's budgets in one Cluster slot

/** The subject a budget counts a request under, or undefined when the budget does not cover it. */
function subjectOf(b: Budget, who: Identity): string | null | undefined {
  if (b.agent !== undefined) return who.agent === b.agent ? b.agent : undefined;
  if (b.per === "agent") return who.agent ?? undefined;
  if (b.per === "session") return who.session;
  return null;
}

const dollars = (x: number) => `$${x >= 10 ? x.toFixed(2) : x >= 0.01 || x === 0 ? x.toFixed(4) : x.toPrecision(2)}`;
const SPENDS_KEPT = 10_000;

/**
 * The budgets, their spend per subject and period, and the two caps. `soft`: the traffic it covers goes
 * to the cheap tier. `hard`: refused (429 budget_exceeded) when the spend, what is in flight and this
 * request's estimate would pass it, so concurrent requests cannot overshoot by more than their estimates
 * were short. A request admitted is never cut: it settles with its real cost, whatever it is.
 */
export class Budgets {
  readonly list: Budget[];
  #spends = new Map<string, Spend>();
  #spendOf: SpendOf;
  #link: BudgetLink | undefined;
  constructor(list: Budget[], spendOf: SpendOf) { this.list = list; this.#spendOf = spendOf; }

  /** The spend of a budget for a subject in the period of `t`: read from the log the first time, then kept up to date. */
  #spend(b: Budget, subject: string | null, t: number): Spend {
    const { start, end } = periodOf(b.period, t);
    const key = `${b.name}\0${subject ?? ""}\0${start}`;
    let s = this.#spends.get(key);
    if (s) return s;
    if (this.#spends.size >= SPENDS_KEPT) this.#evict();
    const scope = b.agent !== undefined || b.per === "agent" ? { agent: subject! } : b.per === "session" ? { session: subject! } : {};
    this.#spends.set(key, (s = { budget: b, subject, start, end, spent: this.#spendOf(scope, start), reserved: 0, unsynced: 0 }));
    return s;
  }

  /** Forget the oldest spends with nothing in flight: they are read from the log again when needed. */
  #evict(): void {
    for (const [k, s] of this.#spends) { if (this.#spends.size < SPENDS_KEPT / 2) break; if (s.reserved === 0) this.#spends.delete(k); }
  }

  #covering(who: Identity, t: number): Spend[] {
    const out: Spend[] = [];
    for (const b of this.list) { const subject = subjectOf(b, who); if (subject !== undefined) out.push(this.#spend(b, subject, t)); }
    return out;
  }

  /** The first soft cap this request's budgets have reached, in words (for routing.reason and a header), or undefined. */
  softCap(who: Identity, t: number): string | undefined {
    const s = this.#covering(who, t).find((x) => x.budget.soft !== undefined && x.spent + x.reserved >= x.budget.soft);
    return s && `budget "${s.budget.name}"${s.subject ? ` (${s.subject})` : ""} is past its soft cap: ${dollars(s.spent)} of ${dollars(s.budget.soft!)}${s.budget.period === "total" ? "" : ` this ${s.budget.period}`}, so the cheap tier`;
  }

  /** Has one of this request's budgets reached its hard cap already (spent and held)? Then nothing more is worth paying for it. */
  atHardCap(who: Identity, t: number): boolean {
    return this.#covering(who, t).some((x) => x.budget.hard !== undefined && x.spent + x.reserved >= x.budget.hard);
  }

  /** Admit a request of `estimate` dollars, or refuse it (429) when a hard cap would be passed. One synchronous step. */
  admit(who: Identity, estimate: number, t: number): Ticket | Promise<Ticket> {
    const spends = this.#covering(who, t);
    if (spends.length && this.#link?.up()) return this.#admitShared(spends, estimate, t);
    return this.#admitLocal(spends, estimate, t);
  }

  /** Share the spend with other instances through Redis (section 6). */
  share(link: BudgetLink): void { this.#link = link; }

  /**
   * The same check and hold, in Redis for every instance at once (one script). What Redis holds becomes this
   * instance's view of the spend (soft caps and /stats read it). If Redis fails, this instance decides alone.
   */
  async #admitShared(spends: Spend[], estimate: number, t: number): Promise<Ticket> {
    const id = randomUUID();
    const keys = spends.map((s) => ({ key: spendKey(s), hard: s.budget.hard ?? -1, seed: s.spent, expireAt: Number.isFinite(s.end) ? s.end + 86_400_000 : 0, add: s.unsynced }));
    let r: Awaited<ReturnType<BudgetLink["admit"]>>;
    try { r = await this.#link!.admit(keys, estimate, id); } catch { return this.#admitLocal(spends, estimate, t); }
    // Redis' spend is the one that counts now, the costs spent here while it was away added to it; holds stay this instance's own
    r.figures.forEach(([spent], i) => { spends[i].spent = spent; spends[i].unsynced = 0; });
    if (!r.ok) throw budgetExceeded(spends[r.over], estimate, t);
    for (const s of spends) s.reserved += estimate;
    return { spends, estimate, done: false, shared: id };
  }

  #admitLocal(spends: Spend[], estimate: number, t: number): Ticket {
    const over = spends.find((s) => s.budget.hard !== undefined && s.spent + s.reserved + estimate > s.budget.hard);
    if (over) throw budgetExceeded(over, estimate, t);
    for (const s of spends) s.reserved += estimate;
    return { spends, estimate, done: false };
  }

  /** The request is over: its estimate leaves, its real cost stays (in Redis too, when shared). */
  settle(ticket: Ticket, cost: number): void {
    if (ticket.done) return;
    ticket.done = true;
    for (const s of ticket.spends) { s.reserved -= ticket.estimate; s.spent += cost; }
    const unsynced = () => { for (const s of ticket.spends) s.unsynced += cost; };
    if (!this.#link || cost <= 0) return;
    if (!ticket.shared) return unsynced(); // admitted here alone: Redis gets the cost with the next shared admit
    void this.#link.settle(ticket.spends.map(spendKey), ticket.shared, cost).then((ok) => { if (!ok) unsynced(); });
  }

  /** Each budget's current spends (the subjects seen this period, busiest first), with the caps and a projection to the period's end. */
  view(t: number) {
    return this.list.map((b) => {
      const start = periodOf(b.period, t).start;
      const subjects = [...this.#spends.values()].filter((s) => s.budget === b && s.start === start);
      if (b.agent === undefined && b.per === undefined && !subjects.length) subjects.push(this.#spend(b, null, t));
      subjects.sort((x, y) => y.spent - x.spent);
      return {
        name: b.name, period: b.period, scope: b.agent !== undefined ? `agent ${b.agent}` : b.per ? `each ${b.per}` : "all", soft: b.soft ?? null, hard: b.hard ?? null,
        spends: subjects.slice(0, 20).map((s) => ({ subject: s.subject, spent_usd: round12(s.spent), in_flight_usd: round12(s.reserved), projected_usd: projection(s, t), resets_in_s: Number.isFinite(s.end) ? Math.ceil((s.end - t) / 1000) : null })),
      };
    });
  }
}

/** The spend at the end of the period if it goes on at its pace so far (none for `total`, which has no end). */
function projection(s: Spend, t: number): number | null {
  if (!Number.isFinite(s.end)) return null;
  const elapsed = Math.max(60_000, t - s.start);
  return round12(s.spent * ((s.end - s.start) / elapsed));
}

function budgetExceeded(s: Spend, estimate: number, t: number): TwError {
  const b = s.budget, resets = Number.isFinite(s.end);
  const secs = resets ? Math.max(1, Math.ceil((s.end - t) / 1000)) : undefined;
  const whose = s.subject ? ` for ${b.per === "session" ? "session" : "agent"} ${s.subject}` : "";
  const when = resets ? `It resets at ${new Date(s.end).toISOString()} (in ${secs} s)` : "It is a total, and never resets";
  const cap = `${dollars(b.hard!)}${b.period === "total" ? "" : ` per ${b.period}`}`;
  const message = `Budget "${b.name}"${whose} is spent: ${dollars(s.spent)} spent and ${dollars(s.reserved)} in flight of its hard cap of ${cap}, `
    + `and this request would cost about ${dollars(estimate)}. ${when}; to go on now, raise "hard" of budget "${b.name}" in the config and restart TokenWatch.`;
  return new TwError(429, "budget_exceeded", message, { headers: secs ? { "retry-after": String(secs) } : {} });
}

// ---- the loop guard ----

export type LoopGuardConfig = { max_repeats: number; window_s: number };
const LOOP_SESSIONS_KEPT = 10_000;

/**
 * An agent stuck in a loop sends the same request again and again. The same body from the same agent
 * and session more than `max_repeats` times in `window_s` is refused (429 loop_detected); ordinary
 * retries (a few, spaced by backoff) stay under it. Each session keeps only its last body's times.
 * It watches agents: a named session, or a conversation past its first turn. The same first question
 * sent many times over with no session named (sampling, a batch, a benchmark) is no agent's loop.
 */
export class LoopGuard {
  #seen = new Map<string, { hash: string; times: number[] }>();
  #cfg: LoopGuardConfig;
  constructor(cfg: LoopGuardConfig) { this.#cfg = cfg; }

  check(who: Identity, hub: ChatRequest, body: string, t: number): void {
    const { max_repeats: max, window_s } = this.#cfg;
    if (!max || !window_s || (!who.named && !hub.messages.some((m) => m.role === "assistant"))) return;
    const key = `${who.agent ?? ""}\0${who.session}`, hash = createHash("sha1").update(body).digest("base64");
    let s = this.#seen.get(key);
    if (!s || s.hash !== hash) {
      if (!s && this.#seen.size >= LOOP_SESSIONS_KEPT) this.#seen.delete(this.#seen.keys().next().value!);
      this.#seen.set(key, (s = { hash, times: [] }));
    }
    const from = t - window_s * 1000;
    s.times = s.times.filter((x) => x > from);
    s.times.push(t);
    if (s.times.length <= max) return;
    const secs = Math.max(1, Math.ceil((s.times[s.times.length - max] - from) / 1000));
    throw new TwError(429, "loop_detected", `This session sent the same request ${s.times.length} times in ${window_s} s (the loop guard allows ${max}): the agent looks stuck in a loop. Change the request, or retry in ${secs} s; to allow more, raise loop_guard.max_repeats in the config (0 turns it off).`, { headers: { "retry-after": String(secs) } });
  }
}

// ============================================================================================
// 6. Shared state: several TokenWatch instances with one set of provider limits and budgets, kept in
//    Redis (or Valkey). A small RESP client over node:net / node:tls (AUTH, SELECT, pipelining, EVALSHA
//    with SCRIPT LOAD on NOSCRIPT, reconnect with backoff), and Lua scripts that check and reserve in
//    one atomic step. When Redis is down or slow, each instance falls back to its local limiter.
// ============================================================================================

/** A reply as RESP2 gives it: a status or bulk string, an integer, nil, or an array of replies. An error reply is thrown. */
export type Reply = string | number | null | Reply[];

export class RedisError extends Error {}

/** One RESP value from `buf` at `at`, and where the next begins; undefined when the bytes are not all there yet. */
export function parseReply(buf: Buffer, at = 0): { value: Reply | RedisError; next: number } | undefined {
  if (at >= buf.length) return undefined;
  const eol = buf.indexOf("\r\n", at);
  if (eol < 0) return undefined;
  const type = buf[at], line = buf.toString("utf8", at + 1, eol), next = eol + 2;
  switch (type) {
    case 0x2b: return { value: line, next };                      // +OK
    case 0x2d: return { value: new RedisError(line), next };      // -ERR …
    case 0x3a: return { value: Number(line), next };              // :42
    case 0x24: {                                                  // $5\r\nhello
      const n = Number(line);
      if (n < 0) return { value: null, next };
      if (buf.length < next + n + 2) return undefined;
      return { value: buf.toString("utf8", next, next + n), next: next + n + 2 };
    }
    case 0x2a: {                                                  // *2\r\n…
      const n = Number(line);
      if (n < 0) return { value: null, next };
      const items: Reply[] = [];
      let p = next;
      for (let i = 0; i < n; i++) {
        const r = parseReply(buf, p);
        if (!r) return undefined;
        items.push(r.value instanceof RedisError ? r.value.message : r.value);
        p = r.next;
      }
      return { value: items, next: p };
    }
    default: throw new RedisError(`Unexpected byte ${type} in a Redis reply: the server does not speak RESP2`);
  }
}

/** A command in RESP: an array of bulk strings. */
export function encodeCommand(args: readonly (string | number)[]): Buffer {
  const parts: Buffer[] = [Buffer.from(`*${args.length}\r\n`)];
  for (const a of args) {
    const b = Buffer.from(String(a));
    parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from("\r\n"));
  }
  return Buffer.concat(parts);
}

/** A Lua script known by its SHA-1, loaded on the first NOSCRIPT. */
export type Script = { source: string; sha: string };
export const script = (source: string): Script => ({ source, sha: createHash("sha1").update(source).digest("hex") });

type Pending = { resolve: (r: Reply) => void; reject: (e: Error) => void; timer?: ReturnType<typeof setTimeout>; done: boolean };

/**
 * A Redis connection: commands are written as they come and their replies matched in order (pipelining
 * for free). `redis://[user:password@]host:port/db` or `rediss://` for TLS. A command that gets no reply
 * within its timeout is rejected (its reply, when it comes, is dropped). A broken connection fails what is
 * pending; the next command reconnects, no sooner than a backoff that doubles up to 2 s.
 */
export class Redis {
  #url: URL;
  #sock: Socket | undefined;
  #ready: Promise<void> | undefined;
  #pending: Pending[] = [];
  #buf: Buffer = Buffer.alloc(0);
  #backoff = 0;
  #retryAt = 0;
  #closed = false;
  constructor(url: string) {
    this.#url = new URL(url);
    if (!/^rediss?:$/.test(this.#url.protocol)) throw new ConfigError(`Redis URL ${shown(url)} must start with redis:// or rediss://`);
  }

  get connected(): boolean { return this.#sock !== undefined && this.#ready !== undefined; }

  /** Send a command; its reply, or a RedisError (an error reply, a timeout, a broken connection). */
  async call(args: readonly (string | number)[], timeoutMs: number): Promise<Reply> {
    await withTimeout(this.#connect(timeoutMs), timeoutMs, "connecting to Redis");
    return this.#send(args, timeoutMs);
  }

  /** Run a script by its SHA, loading it first when the server does not know it (a restart, a SCRIPT FLUSH). */
  async eval(s: Script, keys: readonly string[], args: readonly (string | number)[], timeoutMs: number): Promise<Reply> {
    const run = () => this.call(["EVALSHA", s.sha, keys.length, ...keys, ...args], timeoutMs);
    try { return await run(); } catch (e) {
      if (!(e instanceof RedisError) || !e.message.startsWith("NOSCRIPT")) throw e;
      await this.call(["SCRIPT", "LOAD", s.source], timeoutMs);
      return run();
    }
  }

  close(): void {
    this.#closed = true;
    this.#sock?.destroy();
  }

  #send(args: readonly (string | number)[], timeoutMs: number): Promise<Reply> {
    const sock = this.#sock;
    if (!sock) return Promise.reject(new RedisError("Redis is not connected"));
    return new Promise((resolve, reject) => {
      const p: Pending = { resolve, reject, done: false };
      p.timer = setTimeout(() => {
        p.done = true;
        reject(new RedisError(`Redis did not answer ${String(args[0])} within ${timeoutMs} ms`));
        if (timeoutMs >= 1000) sock.destroy(); // a second without an answer: a dead or half-open connection, open a new one
      }, timeoutMs);
      this.#pending.push(p);
      sock.write(encodeCommand(args));
    });
  }

  #connect(timeoutMs: number): Promise<void> {
    if (this.#ready) return this.#ready;
    if (this.#closed) return Promise.reject(new RedisError("Redis client closed"));
    if (Date.now() < this.#retryAt) return Promise.reject(new RedisError(`Redis is unreachable; next try in ${this.#retryAt - Date.now()} ms`));
    const u = this.#url, port = Number(u.port || 6379), host = u.hostname.replace(/^\[|\]$/g, "");
    const sock = u.protocol === "rediss:" ? tlsConnect({ host, port, servername: host }) : netConnect({ host, port });
    sock.setNoDelay(true);
    sock.setKeepAlive(true, 5000);
    this.#sock = sock;
    this.#buf = Buffer.alloc(0);
    sock.on("data", (d: Buffer) => this.#onData(d));
    sock.on("error", () => {}); // the close that follows says it
    sock.on("close", () => this.#onClose(sock));
    const ready = (async () => {
      await new Promise<void>((done, fail) => { sock.once(u.protocol === "rediss:" ? "secureConnect" : "connect", done); sock.once("close", () => fail(new RedisError(`Cannot connect to Redis at ${host}:${port}`))); });
      const user = decodeURIComponent(u.username), password = decodeURIComponent(u.password);
      if (password) await this.#send(user ? ["AUTH", user, password] : ["AUTH", password], timeoutMs);
      const db = u.pathname.replace(/^\//, "");
      if (db) await this.#send(["SELECT", db], timeoutMs);
      this.#backoff = 0;
    })();
    this.#ready = ready;
    ready.catch(() => { if (this.#sock === sock) sock.destroy(); });
    return ready;
  }

  #onData(d: Buffer): void {
    try { this.#read(d); } catch { this.#sock?.destroy(); } // not Redis on the other end: drop the connection, fail what is pending
  }

  #read(d: Buffer): void {
    this.#buf = this.#buf.length ? Buffer.concat([this.#buf, d]) : d;
    let at = 0;
    for (let r = parseReply(this.#buf, at); r; r = parseReply(this.#buf, at)) {
      at = r.next;
      const p = this.#pending.shift();
      if (!p || p.done) continue; // timed out already: its reply is dropped
      p.done = true;
      clearTimeout(p.timer);
      if (r.value instanceof RedisError) p.reject(r.value); else p.resolve(r.value);
    }
    this.#buf = at ? this.#buf.subarray(at) : this.#buf;
  }

  #onClose(sock: Socket): void {
    if (this.#sock !== sock) return;
    this.#sock = undefined;
    this.#ready = undefined;
    this.#backoff = Math.min(2000, Math.max(50, this.#backoff * 2));
    this.#retryAt = Date.now() + this.#backoff;
    for (const p of this.#pending.splice(0)) if (!p.done) { p.done = true; clearTimeout(p.timer); p.reject(new RedisError("The connection to Redis broke")); }
  }
}

/** A promise, or a RedisError after `ms`. */
function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout>;
  return Promise.race([p, new Promise<never>((_, fail) => { timer = setTimeout(() => fail(new RedisError(`Timed out ${what} (${ms} ms)`)), ms); })]).finally(() => clearTimeout(timer));
}

// ---- the limits in Redis ----

/**
 * Check every dimension of one pool and reserve in the same call. Keys: the minute window (a field per
 * second and count: `<sec>r`, `t`, `i`, `o`), the day window (per hour: `r`, `t`), the requests in flight
 * (id -> "input,output,expiry": a crashed instance's expire on their own), the cooldown, what the
 * provider's headers said (dimension -> "used,at,reset") and the limits they taught. ARGV: now, threshold,
 * input, output, id, ttl, dry (1: only look), then the seven limits in DIMENSIONS order (0: none).
 * Returns {1 or 0, the blocking dimension or "cooling", until (ms, -1 unknown), {dimension, used, limit, blocks}…}.
 */
const RESERVE = script(`
local now, th, ein, eout, id, ttl, dry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), ARGV[7] == '1'
local dims = {'rpm', 'tpm', 'itpm', 'otpm', 'concurrency', 'rpd', 'tpd'}
local limits = {}
for j = 1, 7 do limits[j] = tonumber(ARGV[7 + j]) end
local learned = redis.call('HGETALL', KEYS[6])
for i = 1, #learned, 2 do for j = 1, 7 do if dims[j] == learned[i] then limits[j] = tonumber(learned[i + 1]) end end end
local fin, fout, fcount = 0, 0, 0
local fly = redis.call('HGETALL', KEYS[3])
for i = 1, #fly, 2 do
  local a, b, e = string.match(fly[i + 1], '([^,]+),([^,]+),([^,]+)')
  if tonumber(e) < now then redis.call('HDEL', KEYS[3], fly[i]) else fin = fin + tonumber(a); fout = fout + tonumber(b); fcount = fcount + 1 end
end
local function window(key, unit, span)
  local at = math.floor(now / unit)
  local sums, list = {r = 0, t = 0, i = 0, o = 0}, {}
  local w = redis.call('HGETALL', key)
  for i = 1, #w, 2 do
    local s, k = string.match(w[i], '(%d+)(%a)')
    s = tonumber(s)
    if s <= at - span then redis.call('HDEL', key, w[i]) else
      local v = tonumber(w[i + 1]); sums[k] = sums[k] + v; list[#list + 1] = {s, k, v}
    end
  end
  table.sort(list, function(x, y) return x[1] < y[1] end)
  return sums, list, at
end
local m, mlist = window(KEYS[1], 1000, 60)
local d, dlist = window(KEYS[2], 3600000, 24)
local function freeAt(list, k, need, unit, span)
  local got = 0
  for _, x in ipairs(list) do if x[2] == k then got = got + x[3]; if got >= need then return (x[1] + span) * unit end end end
  return -1
end
local seen = {}
local sv = redis.call('HGETALL', KEYS[5])
for i = 1, #sv, 2 do
  local u, at, rs = string.match(sv[i + 1], '([^,]+),([^,]+),([^,]+)')
  u, at, rs = tonumber(u), tonumber(at), tonumber(rs)
  if rs > now then seen[sv[i]] = {u * math.min(1, (rs - now) / math.max(1, rs - at)), rs} end
end
local idle = fcount == 0 and m.r == 0 and m.t == 0
local cool = tonumber(redis.call('GET', KEYS[4]) or '0')
local why, untilv = nil, -1
if cool > now then why, untilv = 'cooling', cool end
local figures = {}
for j = 1, 7 do
  local lim = limits[j]
  if lim and lim > 0 then
    local name, here, take, flying, list, k, unit, span = dims[j], 0, 0, 0, mlist, 'r', 1000, 60
    if name == 'rpm' then here, take = m.r, 1
    elseif name == 'tpm' then here, take, flying, k = m.t, ein + eout, fin + fout, 't'
    elseif name == 'itpm' then here, take, flying, k = m.i, ein, fin, 'i'
    elseif name == 'otpm' then here, take, flying, k = m.o, eout, fout, 'o'
    elseif name == 'concurrency' then take, flying, list = 1, fcount, nil
    elseif name == 'rpd' then here, take, list, unit, span = d.r, 1, dlist, 3600000, 24
    else here, take, flying, k, list, unit, span = d.t, ein + eout, fin + fout, 't', dlist, 3600000, 24 end
    local s = seen[name]
    local sused = s and s[1] or 0
    local used = math.max(here, sused) + flying
    local need = used + take - th * lim
    local blocks = need > 0 and ((not idle) or sused > 0)
    figures[#figures + 1] = {name, tostring(used), tostring(lim), blocks and 1 or 0}
    if blocks and not why then
      why = name
      if sused > here then untilv = s[2] elseif list and need <= here then untilv = freeAt(list, k, need, unit, span) end
    end
  end
end
if why or dry then return {why and 0 or 1, why or '', tostring(untilv), figures} end
local sec, hour = math.floor(now / 1000), math.floor(now / 3600000)
redis.call('HINCRBY', KEYS[1], sec .. 'r', 1)
redis.call('PEXPIRE', KEYS[1], 120000)
if (limits[6] or 0) > 0 or (limits[7] or 0) > 0 then redis.call('HINCRBY', KEYS[2], hour .. 'r', 1); redis.call('PEXPIRE', KEYS[2], 90000000) end
redis.call('HSET', KEYS[3], id, ein .. ',' .. eout .. ',' .. (now + ttl))
redis.call('PEXPIRE', KEYS[3], ttl * 2)
return {1, '', '-1', figures}
`);

/** The request is over: its reservation leaves, what the provider counted goes into the windows. ARGV: now, id, tokens, input, output. */
const SETTLE = script(`
local now = tonumber(ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
local sec, hour = math.floor(now / 1000), math.floor(now / 3600000)
for i, k in ipairs({'t', 'i', 'o'}) do
  local v = tonumber(ARGV[2 + i])
  if v > 0 then redis.call('HINCRBY', KEYS[1], sec .. k, v) end
end
redis.call('PEXPIRE', KEYS[1], 120000)
if tonumber(ARGV[3]) > 0 and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HINCRBY', KEYS[2], hour .. 't', ARGV[3]) end
return 1
`);

/** What an answer's rate-limit headers said, for every instance: ARGV: how many views, then dimension and "used,at,reset" each, then dimension and limit each. */
const OBSERVE = script(`
local n = tonumber(ARGV[1])
for i = 2, 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 2 * n + 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], 86400000)
if #ARGV > 2 * n + 1 then redis.call('PEXPIRE', KEYS[2], 86400000) end
return 1
`);

/** Rest a pool until ARGV[2] (ms), unless it already rests longer. ARGV: now, until. */
const COOL = script(`
local now, u = tonumber(ARGV[1]), tonumber(ARGV[2])
if u > tonumber(redis.call('GET', KEYS[1]) or '0') and u > now then redis.call('SET', KEYS[1], ARGV[2], 'PX', math.floor(u - now)) end
return 1
`);

/**
 * Budgets: check every budget a request falls under and hold its estimate, in one call. Each key is a hash:
 * `spent` (seeded from the instance's view when Redis has none) and a field per request in flight (estimate
 * and expiry: a crashed instance's go on their own). ARGV: now, estimate, id, ttl, then per key: hard (-1:
 * none), seed, expire-at (0: never), and what the instance spent while Redis was away (added unless it seeded).
 * Returns {1 or 0, the index of the budget that refused, {spent, in flight} per key}.
 */
const BUDGET_ADMIT = script(`
local now, est, id, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local figures = {}
for i, key in ipairs(KEYS) do
  local hard, seed, add = tonumber(ARGV[1 + 4 * i]), ARGV[2 + 4 * i], tonumber(ARGV[4 + 4 * i])
  if redis.call('HSETNX', key, 'spent', seed) == 0 and add > 0 then redis.call('HINCRBYFLOAT', key, 'spent', add) end
  local all, spent, held = redis.call('HGETALL', key), 0, 0
  for j = 1, #all, 2 do
    if all[j] == 'spent' then spent = tonumber(all[j + 1]) else
      local e, x = string.match(all[j + 1], '([^,]+),([^,]+)')
      if tonumber(x) < now then redis.call('HDEL', key, all[j]) else held = held + tonumber(e) end
    end
  end
  figures[i] = {tostring(spent), tostring(held)}
  if hard >= 0 and spent + held + est > hard then return {0, i - 1, figures} end
end
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 't:' .. id, est .. ',' .. (now + ttl))
  local exp = tonumber(ARGV[3 + 4 * i])
  if exp > 0 then redis.call('PEXPIREAT', key, exp) end
end
return {1, -1, figures}
`);

/** A request's hold on its budgets ends: its estimate leaves, its cost is added. ARGV: id, cost. */
const BUDGET_SETTLE = script(`
for _, key in ipairs(KEYS) do
  redis.call('HDEL', key, 't:' .. ARGV[1])
  if tonumber(ARGV[2]) > 0 then redis.call('HINCRBYFLOAT', key, 'spent', ARGV[2]) end
end
return 1
`);

/** A model's limits as RESERVE reads them, in DIMENSIONS order: 0 for none (an unpriced model's are infinite). */
const sharedLimits = (m: Limits) => DIMENSIONS.map((d) => { const l = configuredLimit(m, d); return l !== undefined && Number.isFinite(l) ? l : 0; });

/** A pool's keys; the braces keep them in one Redis Cluster slot. */
const poolKeys = (pool: string) => ["min", "day", "fly", "cool", "seen", "learned"].map((k) => `tw:{${pool}}:${k}`);

export type SharedConfig = { url: string; timeout_ms: number; instances?: number };

/** Which limiter decides now, for /stats, /metrics and the dashboard. */
export type SharedStatus = { mode: "redis" | "local"; since: number; reason: string | null; fallbacks: number; instances: { id: string; host: string; pid: number; mode: string; seen_s: number }[]; share: string };

/**
 * The limiter when several instances share limits through Redis: each verdict is one Lua call, and while
 * Redis answers, the windows, reservations, cooldowns and learned limits are the shared ones. When a call
 * fails or takes longer than timeout_ms, this instance decides alone with its local limiter, on its share
 * of each limit (limit / instances when `instances` is set), and goes back to Redis once a ping answers.
 */
export class SharedLimiter implements Capacity {
  readonly local: Limiter;
  readonly status: SharedStatus;
  readonly id = randomUUID().slice(0, 8);
  #redis: Redis;
  #cfg: SharedConfig;
  #threshold: number;
  #snapshots = new Map<string, { at: number; dimensions: DimensionView[]; why: string; until: number }>();
  #shares = new Map<string, Limits>();
  #timer: ReturnType<typeof setInterval> | undefined;
  #models: Model[] = [];
  #failures = 0; // calls that failed in a row

  constructor(cfg: SharedConfig, threshold: number, local: Limiter) {
    this.#cfg = cfg;
    this.#threshold = threshold;
    this.local = local;
    this.#redis = new Redis(cfg.url);
    this.status = { mode: "redis", since: Date.now(), reason: null, fallbacks: 0, instances: [], share: cfg.instances ? `1/${cfg.instances} of each limit` : "the whole of each limit (set redis.instances to divide it)" };
  }

  /** Start the heartbeat (and the figures /stats reads) for these models; stop() ends it. */
  start(models: Model[]): void {
    this.#models = models;
    void this.#beat();
    this.#timer = setInterval(() => void this.#beat(), 2000);
    this.#timer.unref?.();
  }

  stop(): void { clearInterval(this.#timer); this.#redis.close(); }

  reserve(m: Limits, e: Estimate, now: number): Verdict | Promise<Verdict> {
    if (this.status.mode === "local") return this.local.reserve(this.#share(m), e, now);
    return this.#reserveShared(m, e, now);
  }

  async #reserveShared(m: Limits, e: Estimate, now: number): Promise<Verdict> {
    const id = `${this.id}:${randomUUID().slice(0, 12)}`;
    try {
      const r = await this.#redis.eval(RESERVE, poolKeys(m.pool), [now, this.#threshold, e.input, e.output, id, 10 * 60_000, 0, ...sharedLimits(m)], this.#cfg.timeout_ms) as Reply[];
      this.#failures = 0;
      const { dimensions, until } = this.#figures(m, r, now);
      if (r[0] === 1) return { ok: true, reservation: { pool: m.pool, key: m.key, estimate: e, done: false, shared: id }, dimensions };
      return { ok: false, why: r[1] as "cooling" | Dimension, until: until > 0 ? until : undefined, dimensions };
    } catch (err) {
      // Redis may still run the reservation (it was sent, its reply was late): the release, sent after it on the
      // same connection, runs after it. This request is decided here alone; a few failures in a row, and all are.
      this.#fireAndForget(SETTLE, poolKeys(m.pool), [now, id, 0, 0, 0]);
      this.#failed(err as Error);
      return this.local.reserve(this.#share(m), e, now);
    }
  }

  /** One call failed: three in a row, or a connection that broke, and this instance decides alone until its heartbeat reaches Redis. */
  #failed(e: Error): void {
    this.#failures++;
    if (this.#failures >= 3 || /connect|broke|unreachable|closed/i.test(e.message)) this.#fallBack(e);
  }

  /** RESERVE's figures as /stats shows them, kept as the pool's latest shared view. */
  #figures(m: Limits, r: Reply[], now: number): { dimensions: DimensionView[]; until: number } {
    const dimensions = (r[3] as string[][]).map(([dimension, used, limit, blocks]) => {
      const lim = Number(limit), u = Number(used), d = dimension as Dimension;
      return { dimension: d, used: u, limit: lim, configured: configuredLimit(m, d) ?? null, learned: lim !== configuredLimit(m, d) ? lim : null, percent: Math.round((u / lim) * 1000) / 10, blocks: Number(blocks) === 1, free_at: null };
    });
    const until = Number(r[2]);
    this.#snapshots.set(m.pool, { at: now, dimensions, why: String(r[1]), until });
    return { dimensions, until };
  }

  settle(r: Reservation, counted: Counts | undefined, now: number): void {
    if (!r.shared) return this.local.settle(r, counted, now);
    if (r.done) return;
    r.done = true;
    this.local.learn(r.key, counted);
    const c = counted ?? { tokens: 0, input: 0, output: 0 };
    this.#fireAndForget(SETTLE, poolKeys(r.pool), [now, r.shared, c.tokens, c.input, c.output]);
    // Anthropic charged max_tokens up front and gives back what was not written: every instance's view learns it
    if (counted && this.local.corrected(r.pool, r, counted.output)) this.#pushSeen(r.pool);
    this.local.nudge();
  }

  release(r: Reservation, now: number): void { this.settle(r, undefined, now); }

  observe(pool: string, kind: Kind, get: HeaderGet, now: number, by?: Reservation, charged = 0): void {
    this.local.observe(pool, kind, get, now, by, charged);
    this.#pushSeen(pool);
  }

  /** This instance's view of what a pool's headers said, for every instance. */
  #pushSeen(pool: string): void {
    if (this.status.mode === "local") return;
    const seen = this.local.seenOf(pool);
    if (!seen) return;
    const views = Object.entries(seen.seen), limits = Object.entries(seen.learned);
    if (!views.length && !limits.length) return;
    const [, , , , seenKey, learnedKey] = poolKeys(pool);
    this.#fireAndForget(OBSERVE, [seenKey, learnedKey], [views.length, ...views.flatMap(([d, o]) => [d, `${o.used},${o.at},${o.reset}`]), ...limits.flat()]);
  }

  cool(pool: string, until: number, now: number): void {
    this.local.cool(pool, until, now);
    const end = this.local.coolEnd(pool);
    if (this.status.mode === "redis" && end > now) this.#fireAndForget(COOL, [poolKeys(pool)[3]], [now, end]);
  }

  outputEstimate(key: string, asked: number | undefined, fallback: number): number { return this.local.outputEstimate(key, asked, fallback); }
  typical(key: string, fallback: number): Estimate { return this.local.typical(key, fallback); }
  assess(m: Limits, e: Estimate, now: number) { return this.local.assess(this.#share(m), e, now); }
  onNextChange(fn: () => void): () => void { return this.local.onNextChange(fn); }

  /** The shared figures while Redis answers (refreshed every 2 s and on every verdict), else this instance's own. */
  headroom(m: Limits, now: number, typical?: Estimate): Headroom {
    const s = this.#snapshots.get(m.pool), local = this.local.headroom(this.#share(m), now, typical);
    if (this.status.mode === "local" || !s || now - s.at > 5000) return local;
    const top = s.dimensions.reduce<DimensionView | undefined>((a, d) => (!a || d.percent > a.percent ? d : a), undefined);
    const blocked = s.why !== "" && s.why !== "cooling";
    return { ...local, percent: top?.percent ?? 0, saturated: blocked, binding: blocked ? (s.why as Dimension) : top && top.percent > 0 ? top.dimension : null, dimensions: s.dimensions.map((d) => ({ ...d, free_at: d.blocks && s.until > 0 ? s.until : null })) };
  }

  /** The budgets' way to Redis: the same connection, timeout and fallback as the limits. */
  budgetLink(): BudgetLink {
    return {
      up: () => this.status.mode === "redis",
      admit: async (spends, estimate, id) => {
        const args = [Date.now(), estimate, id, 10 * 60_000, ...spends.flatMap((s) => [s.hard, s.seed, s.expireAt, s.add])];
        try {
          const r = await this.#redis.eval(BUDGET_ADMIT, spends.map((s) => s.key), args, this.#cfg.timeout_ms) as Reply[];
          return { ok: r[0] === 1, over: Number(r[1]), figures: (r[2] as string[][]).map(([a, b]) => [Number(a), Number(b)] as [number, number]) };
        } catch (e) { this.#fireAndForget(BUDGET_SETTLE, spends.map((s) => s.key), [id, 0]); this.#failed(e as Error); throw e; } // a late hold, released after it
      },
      settle: (keys, id, cost) => this.#redis.eval(BUDGET_SETTLE, keys, [id, cost], Math.max(this.#cfg.timeout_ms, 1000)).then(() => true, (e: Error) => { this.#failed(e); return false; }),
    };
  }

  /** A model's limits divided by the number of instances, while this one decides alone. */
  #share(m: Limits): Limits {
    const n = this.#cfg.instances;
    if (!n || n <= 1) return m;
    let s = this.#shares.get(m.key);
    if (!s) {
      if (this.#shares.size >= 1024) this.#shares.clear(); // names outside the table come and go
      s = { ...m, limit: undefined };
      for (const d of DIMENSIONS) { const l = configuredLimit(m, d); if (l !== undefined) (s as Record<string, unknown>)[d] = Math.max(1, Math.floor(l / n)); }
      this.#shares.set(m.key, s);
    }
    return s;
  }

  #fireAndForget(s: Script, keys: string[], args: (string | number)[]): void {
    this.#redis.eval(s, keys, args, Math.max(this.#cfg.timeout_ms, 1000)).catch((e: Error) => this.#failed(e));
  }

  #fallBack(e: Error): void {
    if (this.status.mode === "local") return;
    Object.assign(this.status, { mode: "local", since: Date.now(), reason: e.message, fallbacks: this.status.fallbacks + 1 });
  }

  /** Every 2 s: this instance's heartbeat, the live instances, the shared figures of each model; a ping back to Redis when it decides alone. */
  async #beat(): Promise<void> {
    const t = Date.now(), ms = Math.max(this.#cfg.timeout_ms, 1000);
    try {
      const me = JSON.stringify({ host: hostname(), pid: process.pid, mode: this.status.mode });
      await Promise.all([this.#redis.call(["ZADD", "tw:instances", t, this.id], ms), this.#redis.call(["HSET", "tw:instance-info", this.id, me], ms), this.#redis.call(["ZREMRANGEBYSCORE", "tw:instances", "-inf", t - 6000], ms)]);
      this.#failures = 0;
      if (this.status.mode === "local") Object.assign(this.status, { mode: "redis", since: t, reason: null });
      const live = (await this.#redis.call(["ZRANGE", "tw:instances", 0, -1, "WITHSCORES"], ms)) as string[];
      const ids = live.filter((_, i) => i % 2 === 0), info = ids.length ? ((await this.#redis.call(["HMGET", "tw:instance-info", ...ids], ms)) as (string | null)[]) : [];
      const parsed = (x: string | null) => { try { return JSON.parse(x ?? "{}") as { host: string; pid: number; mode: string }; } catch { return { host: "?", pid: 0, mode: "?" }; } };
      this.status.instances = ids.map((id, i) => ({ id, ...parsed(info[i]), seen_s: Math.round((t - Number(live[2 * i + 1])) / 1000) }));
      for (const m of this.#models) {
        const e = this.local.typical(m.key, DEFAULTS.default_max_tokens);
        this.#figures(m, await this.#redis.eval(RESERVE, poolKeys(m.pool), [t, this.#threshold, e.input, e.output, "", 0, 1, ...sharedLimits(m)], ms) as Reply[], t);
      }
    } catch (e) { this.#fallBack(e as Error); }
  }
}

// ============================================================================================
// 7. Selector: from a request and the config to an ordered list of candidates with the reason.
//    Pure: headroom is checked later, candidate by candidate, as the router walks the list.
// ============================================================================================

const textOf = (c: ChatMessage["content"]) =>
  typeof c === "string" ? c : Array.isArray(c) ? c.map((p) => (p.type === "text" ? p.text ?? "" : "")).join("\n") : "";

// ---- the classifier: what the request asks, not how big it is ----
//
// Every coding agent declares tools and sends a long system prompt on every step, so size and structure
// say little. The classifier reads the ask instead: the last user message without the code, logs and
// documents pasted into it; for a short follow-up ("yes", "continue"), what it approves; for an agent
// step, what the tool run after it shows (a failure after an edit, or a pass that only needs reporting).
// Named signals (kinds of task, in the languages agents are used in) and hashed words of the ask are
// weighed by a linear model trained on the labelled set in eval/routing (train.ts writes the weights
// below); `npm run eval:routing` scores it on the part it never saw.

/** `words(...)`: any of these words or phrases, split on a top-level `|` (a trailing * takes any ending), not inside another word; CJK terms match anywhere. */
function words(latin: string, cjk = ""): RegExp {
  const list: string[] = [];
  let depth = 0, from = 0;
  for (let i = 0; i <= latin.length; i++) {
    const c = latin[i];
    if (c === "(") depth++;
    else if (c === ")") depth--;
    else if ((c === "|" && depth === 0) || i === latin.length) { list.push(latin.slice(from, i)); from = i + 1; }
  }
  const alt = list.map((w) => (w.endsWith("*") ? `${w.slice(0, -1)}[\\p{L}\\p{N}'-]*` : w)).join("|");
  return new RegExp(`(?<![\\p{L}\\p{N}])(?:${alt})(?![\\p{L}\\p{N}])${cjk ? `|${cjk}` : ""}`, "iu");
}

/** Both patterns somewhere in the text, in either order (a verb and its object, in any language's word order). */
const both = (a: RegExp, b: RegExp) => new RegExp(`^(?=[\\s\\S]*?(?:${a.source}))(?=[\\s\\S]*?(?:${b.source}))`, "iu");

/** Kinds of task, as words say them: each a signal the model weighs, with the words a reason shows. */
const TASK_SIGNALS: [name: string, shown: string, re: RegExp][] = [
  ["cause", "asks for a cause", words(
    "why|debug*|whats causing|what is causing|what's up with|what's going on|how come|causes?|caused|" +
    "root cause|figure out|find out|investigate|diagnos*|track down|what's wrong|warum|wieso|weshalb|" +
    "ursache|pourquoi|d'où vient|por qué|por que|porque|causa|perché|waarom|oorzaak|dlaczego|przyczyn*|" +
    "почему|причин*|neden|sebep*|qué está pasando|que se passe|o que está acontecendo|cosa succede|что происходит|" +
    "was ist (da )?los|woran liegt|wat is er aan de hand|co się dzieje|ne oluyor",
    "为什么|为何|原因|怎么回事|なぜ|どうして|왜|원인|何が起き|무슨 일")],
  ["symptom", "describes a symptom", words(
    "only when|only on|only for|sometimes|intermittent*|random*|flaky|flak*|occasional*|hangs?|hanging|" +
    "stuck|freez*|leak*|slow*|spik*|off by|drift*|twice|duplicat*|race|deadlock*|timeouts?|crash*|" +
    "doesn't work|does not work|not working|stopped working|broken|wrong|mismatch*|nondetermin*|sporadi*|" +
    "weird|strange|oom|out of memory|memory|grows|growing|fuite|fuga|plante|se bloque|failing|fails|broke|" +
    "falla|fallan|falha|falham|fallisce|schlägt fehl|échoue|échouent|nie działa|не работает|çalışmıyor|werkt niet|" +
    "breaks|regress*|started (failing|returning|throwing)|throws|throwing|returns the wrong|returns wrong|" +
    "düşük|manchmal|nur wenn|langsam*|häng*|parfois|seulement|lent|lente*|a veces|solo cuando|lent[oa]s?|às vezes|" +
    "p9[059]|latenc*|every \\d+ (seconds?|minutes?|hours?)|like clockwork|periodic*|" +
    "só quando|a volte|solo quando|иногда|только когда|медленн*|zawiesza*|soms|" +
    // the same symptoms in the other languages agents are used in: twice, only on, since, blank, hangs, wrong, random
    "doppelt|zweimal|nur bei|nur auf|seit dem|seitdem|leer|abstürz*|stürzt ab|friert|falsch*|sporadisch|gelegentlich|" +
    "deux fois|en double|uniquement|depuis|vide|bloqu*|faux|fausse|aléatoire*|de temps en temps|" +
    "dos veces|duplicad*|solo en|sólo en|desde que|en blanco|vací[ao]|se cuelga|se bloquea|incorrect*|aleatori*|" +
    "duas vezes|só no|só na|em branco|trava*|errad*|lent[ao]|" +
    "due volte|duplicat*|solo su|da quando|vuot[ao]|bianc[ao]|si blocca|sbagliat*|lent[io]|" +
    "дважды|дублир*|только в|только на|после того|пуст*|завис*|падает|неправильн*|случайн*|" +
    "czasami|czasem|tylko gdy|tylko w|dwa razy|podwójn*|pust[ya]|woln[oy]|błędn*|losow*|" +
    "bazen|sadece|iki kez|iki kere|yavaş*|donuyor|yanlış|çöküyor|alleen als|alleen bij|twee keer|dubbel|traag|hangt|verkeerd*",
    "有时|偶尔|只有在|很慢|卡住|時々|たまに|遅い|止まる|가끔|느려|멈춰|两次|重复|空白|崩溃|变慢|只在|二重|二回|2回|重複|真っ白|" +
    "クラッシュ|落ちる|두 번|중복|빈 화면|하얀 화면|느려|다른 사람|잘못된")],
  ["retry", "a fix did not work", words(
    "still|again|didn't work|did not work|doesn't help|same error|keeps failing|immer noch|schon wieder|" +
    "toujours|encore|sigue|todavía|ainda|ancora|всё ещё|все еще|снова|hâlâ|nadal",
    "还是|仍然|依然|まだ|また|여전히|아직")],
  ["design", "asks for a design", words(
    "design*|architect*|data model|model (it|this|that)|double-?book*|even when two|schema for|" +
    "how should we structure|scal*|shard*|partition*|consisten*|trade-?offs?|approach*|entw[uü]rf*|" +
    "best way to|better way to|instead of|versus|vs\\.?|mejor (forma|manera)|meilleure (façon|approche)|beste (weg|ansatz)|" +
    "melhor (forma|jeito)|il modo migliore|invece di|en lugar de|au lieu de|statt|anstatt|zamiast|вместо|yerine|in plaats van|" +
    "architektur|concevoir|conception|diseñ*|arquitectura|projetar|progett*|спроектир*|архитектур*|" +
    "tasarla*",
    "设计|架构|設計|アーキテクチャ|설계|아키텍처")],
  ["plan", "asks for a plan", words(
    "plan*|roadmap|migrat*|rollout|roll out|strateg*|phases?|cutover|zero-?downtime|sequence|planen|" +
    "migrier*|planifi*|planific*|planej*|pianific*|план*|миграц*|stratej*",
    "计划|迁移|規划|計画|移行|계획|마이그레이션")],
  ["proof", "asks for a proof or derivation", words(
    "prove|proof|show that|derive|an argument|rigorous*|derivation|lemma|theorem|invariant|induction|" +
    "big-?o|complexity|probabilit*|expected value|integral|converge*|beweis*|zeige|démontr*|preuve|" +
    "demuestr*|demostr*|prova|provar|dimostr*|докаж*|доказ*|kanıtla*|ispat*|udowodnij|wykaż|dowód|доведи*|bevisa|" +
    "bewijs|toon aan",
    "证明|推导|導出|証明|期待値|期望|概率|確率|확률|증명")],
  ["estimate", "asks for an estimate", words(
    "estimat*|how many [\\p{L} -]{0,40}(need|needed|would|will|could|should|to handle|to support|" +
    "to serve)|how much will|how much would|how long will|capacity|back-of-the-envelope|fermi|sizing|" +
    "forecast*|projection|will it finish|will it be done|done before|use more|cost more|save money|cheaper|more (water|" +
    "energy|power|money|time|memory|storage) than|would it take|how long would|how long will|schätz*|" +
    // "how many" alone is a lookup in any language; a rough figure is what makes it an estimate
    "roughly|ballpark|approximately|order of magnitude|schätz*|grob|ungefähr|überschlag*|environ|à peu près|" +
    "aproximadamente|más o menos|a ojo|por alto|circa|all'incirca|più o meno|оцени*|примерно|прикин*|szacun*|" +
    "mniej więcej|około|tahmin*|yaklaşık|kabaca|ongeveer|grofweg|ruwweg|" +
    "wie viele [\\p{L} -]{0,40}(brauch|benötig)*|combien [\\p{L}' -]{0,40}(faut|besoin)*|cuánt[oa]s [\\p{L} -]{0,40}(necesit|hace[n]? falta)*|" +
    "quant[oa]s [\\p{L} -]{0,40}(precis|necessit)*|quant[ie] [\\p{L}' -]{0,40}(serv|bisogn)*|сколько [\\p{L} -]{0,40}(нужн|надо|потреб)*|" +
    "ile [\\p{L} -]{0,40}potrzeb*|hoeveel [\\p{L} -]{0,40}nodig|enough|reicht das|reichen|suffi*|suficiente*|basta*|хватит|" +
    "wystarcz*|yeter mi|yeterli mi|genoeg",
    "估算|估计|预估|大概|大约|粗略|推定|推測|見積|ざっくり|くらい|ぐらい|概算|추정|예상|대략|정도|够不够|足够|足りる|충분")],
  ["judge", "asks for a judgement", words(
    "should (we|i)|can (i|we) (just )?(drop|approve|delete|remove|skip|use|ship|merge|change)|is it (ok|" +
    "okay|safe|legal|fine) to|what breaks|what would break|what happens if|decide|decision|recommend*|" +
    "pros and cons|worth it|risk*|legal*|liabil*|complian*|negotiat*|contract*|exception|weigh*|" +
    "best option|which is better|gdpr|dsgvo|rgpd|privacy|datenschutz*|zulässig|erlaubt|rechtens|légal|" +
    "am i allowed|are we allowed|can they|hinnehmen|sollen wir|sollte ich|" +
    "empfehl*|devrions|recommand*|deberíamos|debería|recomiend*|devemos|dovremmo|стоит ли|рекоменд*|" +
    "önerir*",
    "应该|建议|べき|おすすめ|추천|해야")],
  ["review", "asks to check correctness", words(
    "review*|audit*|correct|correctly|safe|thread-?safe|sound|subtle|edge cases?|race condition|" +
    "concurren*|lock-?free|vulnerab*|security|überprüf*|prüf*|korrekt|revis*|vérifi*|correcto|corretto|" +
    "ревью|провер*|doğru mu|take a look|look over|have a look|schau (mal )?drüber|jeter un (œil|oeil)|echa(r)? un vistazo|" +
    "dar uma olhada|d[aà] un'occhiata|dare un'occhiata|посмотри*|zerknij|rzuć okiem|bakar mısın|göz at*|kijk (eens )?naar|titta på",
    "审查|检查|正确|レビュー|正しい|리뷰|검토")],
  ["build", "asks for non-trivial code", words(
    "implement*|end to end|end-to-end|secure|securely|algorithm*|parser|compiler|interpreter|scheduler|" +
    "rate limiter|distributed|crdt|consensus|optimi[sz]*|faster|speed up|performance|refactor*|rewrite|" +
    "state machine|lock|cache invalidation|implementier*|implément*|implementa*|реализ*|uygula*",
    "实现|优化|実装|最適化|パーサ|구현|최적화|작성해")],
  ["code", "asks to write a program", both(words(
    "write|writing|create|build|make|implement|code up|generate|need|want|give me|schreib*|erstell*|bau|brauche|" +
    "écri*|écris|crée|créer|développe*|escrib*|crea|crear|necesito|hazme|escrev*|cri[ae]|criar|preciso|scriv*|" +
    "mi serve|napisz|stwórz|potrzebuję|напиши|создай|нужен|нужна|нужно|yaz*|oluştur*|schrijf|maak",
    "写|编写|实现|書いて|作って|作成|작성|만들어|짜줘"), words(
    "functions?|scripts?|modules?|class|classes|hooks?|services?|programs?|tools?|cli|workers?|jobs?|endpoints?|" +
    "sql|python|typescript|go|rust|java|query|queries|code|" +
    "components?|librar*|handlers?|middleware|daemon|bot|funktion*|skript*|modul*|klasse*|programm*|fonction*|" +
    "classe*|programme|función|funciones|módulo|clase|programa|função|funções|funzion*|funkcj*|skrypt*|moduł*|" +
    "klas*|функци*|скрипт*|модул*|класс*|программ*|fonksiyon*|betik|modül*|sınıf*",
    "函数|脚本|模块|程序|関数|スクリプト|モジュール|クラス|함수|스크립트|모듈|클래스|프로그램"))],
  ["research", "asks to weigh sources", words(
    "sources|papers|studies|study|literature|evidence|conflicting|contradict*|meta-?analys*|quellen|studie[n]?|" +
    "widersprech*|widersprüch*|belege|études|étude|contradictoire*|preuves|estudios|estudio|contradictori*|" +
    "estudos|evidências|fonti|studi|contraddittori*|источник*|исследовани*|противореч*|badania|badań|sprzeczn*|" +
    "araştırma*|çelişk*|kaynak*|onderzoek*|tegenstrijdig*|bronnen",
    "文献|论文|研究|論文|연구|综合|证据|矛盾|根拠|証拠|근거|모순|출처")],
  ["translate", "asks for a translation", words(
    "translat*|übersetz*|tradu*|vertaal*|przetłumacz*|переведи*|перевод*|çevir*|in english|into english|" +
    "auf deutsch|en français|en español|em português|in italiano",
    "翻译|翻訳|번역|英訳|和訳")],
  ["summarize", "asks for a summary", words(
    "summar*|tl;?dr|recap|gist|key points|in one sentence|in a sentence|in one paragraph|zusammenfass*|" +
    "fasse|résum*|resum*|riassum*|samenvat*|podsumuj*|кратко|резюм*|özetle*",
    "总结|概括|摘要|要約|まとめ|요약")],
  ["extract", "asks to pick out data", words(
    "extract*|pull out|list all|list the|list every|which line|what is the (value|id|name|date|total|" +
    "number)|find the (line|id|value|number|date)|fields?|get me the|look up|lookup|grep|extrahier*|" +
    "extrai*|extraire|estrai*|извлеки*|извлечь|çıkar*",
    "提取|抽出|추출")],
  ["reformat", "asks to reformat", words(
    "format*|convert*|turn (this|these|it) into|as a table|as json|as yaml|as csv|to json|to yaml|to csv|" +
    "markdown|pretty-?print|sort (this|these|by)|indent*|camel ?case|snake ?case|bullet*|umwandeln|" +
    "formatier*|convertir|converti*|converter|конверт*|преобраз*",
    "转换|格式|表格|変換|表に|변환|표로")],
  ["mechanical", "asks for a mechanical edit", words(
    "rename*|add (a |an )?(log|logging|comment|docstring|type|import|field|line|print)|remove (the|this|" +
    "unused)|delete (the|this)|bump|version|typo*|spelling|sort imports|move (this|the)|commit|push|" +
    "umbenenn*|renomm*|renombr*|renome*|rinomin*|переименуй*|tippfehler|faute de frappe|errata",
    "重命名|改名|名前を変更|이름을 바꿔|오타|誤字")],
  ["classify", "asks to classify or tag", words(
    "classif*|categori[sz]*|tag (these|each|them)|label (these|each|them)|sentiment|which category|" +
    "klassifizier*|clasific*|классифиц*|sınıflandır*|which (collection|bucket|team|label|tag|priority)|for each|" +
    "ordne|einordnen|zuordnen|kategorisier*|classe[rz]?|classe-les|trie[rz]? par|clasifica*|categoriz*|classific*|" +
    "sorteer|indeel*|rozdziel*|przypisz|kategoryzuj*|распредели*|рассортируй*|розклади|kategorilere ayır*|etiketle*",
    "分类|分類|분류|归类|仕分け|振り分け|분류해")],
  ["lookup", "asks a quick question", words(
    "what's a|what is a|what does|how do i|how to|how can i|which command|which flag|where is|is there a|" +
    "syntax for|default port|command for|one-?liner|was ist|wie kann ich|qu'est-ce|comment faire|qué es|" +
    "cómo|o que é|como faço|cos'è|come si|что такое|как сделать|nedir",
    "什么是|怎么|とは|どうやって|뭐야|어떻게")],
  ["thanks", "small talk", words(
    "thanks|thank you|thx|cheers|hi|hello|hey|good morning|danke|merci|gracias|obrigad[oa]|grazie|bedankt|" +
    "dziękuję|спасибо|teşekkür*|valeu|bye|goodbye|see you|that's all|that's it for today|done for today|tschüss|" +
    "bis morgen|schönen feierabend|à demain|bonne soirée|hasta mañana|nos vemos|até amanhã|até logo|a domani|" +
    "до завтра|пока|do jutra|görüşürüz|tot morgen|fijne avond|lol|haha|great job|nice work|perfect|awesome",
    "谢谢|ありがとう|감사|고마워|お疲れ|また明日|明天见|辛苦了|수고|내일 봐")],
];

/** A reply that only approves or continues what came before: it means what it approves. */
const APPROVALS = [
  "y", "yes", "yep", "yeah", "ok", "okay", "sure", "go", "go ahead", "do it", "please do", "proceed", "continue", "go on", "keep going", "next",
  "sounds good", "lgtm", "ship it", "approved", "option \\w", "[1-9abc]", "the (?:first|second|last) one", "sí", "si", "dale", "vale",
  "hazlo", "continúa", "adelante", "ja", "mach", "mach das", "weiter", "los", "oui", "vas-y", "d'accord", "sim", "pode", "continua", "vai", "sì",
  "procedi", "tak", "dalej", "да", "ок", "окей", "хорошо", "ладно", "давай", "продолжай", "evet", "devam", "はい", "うん", "続けて", "お願い", "どうぞ", "好", "好的", "继续", "可以", "네", "응", "계속",
];
const APPROVAL = new RegExp(`^\\s*(?:${APPROVALS.join("|")})[\\s.!,)，、。！]*(?:please|bitte|por favor|s'il te plaît|пожалуйста|お願いします|请)?[\\s.!。！]*$`, "iu");
/** What a turn may open with before it says more: the approvals and a few more (each once: two spellings of one phrase would make the match ambiguous). */
const LEADERS = [...new Set([...APPROVALS, "looks good", "perfect", "great", "passt", "mach so", "manda bala", "bora", "rób", "fais-le"])].join("|");
/**
 * A turn that opens by approving or by building on the last answer ("looks good, go ahead. skip 6 for now", "and if
 * we…"): a follow-up, however long. Read on its first 300 characters, with at most four approvals in a row, so that
 * no turn can make the match slow.
 */
const LEADS_ON = new RegExp(
  `^\\s*(?:(?:${LEADERS})(?:[\\s,，、]+(?:${LEADERS})){0,3}\\s*(?:[.!,;:—-](?=\\s|$)|[，、。！：；])` +
    `|(?:(?:and|but|ok(?:ay)?,? and|so) (?:if|what|the|now|for)|what (?:if|about)|how about|y si|et si|und wenn|e se|a jeśli|а если|peki)(?![\\p{L}\\p{N}]))`,
  "iu",
);

/** Text that is pasted material rather than words to the model: code, logs, stack frames, tables. */
const MATERIAL_LINE = /^\s{2,}\S|^\s*(?:at (?:async )?[\w.$<>]+ \(|at (?:async )?[^\s:]*[A-Za-z/][^\s:]*(?::[^\s:]+)*:\d+:\d+|File "|Traceback|\$ |>|#|\/\/|import [\w{*"'@]+(?: as \w+)?\s*[;,]?\s*$|import .* from |from [\w.]+ import |def \w+\(|class \w+[\s:(<{]|function\*? ?\w*\(|(?:const|let|var) [\w{[].*=|return\b.*[;)]\s*$|SELECT |INSERT |UPDATE |\||-{3}|\+{3}|@@|[{}[\]])|^\s*\[?\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}|^\s*\d{1,2}:\d{2}:\d{2}|^\s*[\w./-]+:\d+/;
/** A line that ends like code (`;`, `{`, `}`): pasted, unless it reads as a sentence. */
const CODE_END = /[;{}]\s*$/;
const FAILED_RUN = /\b(?:FAIL(?:ED|ING)?|ERROR|Error|Exception|Traceback|Assertion\w*|fatal|failed|failing|error TS\d+|undefined reference|Segmentation fault|Killed)\b|\bpanic:|\bexit (?:code|status) [1-9]\d*|✗|×/;
const PASSED_RUN = /\b(?:passed|PASS(?:ED)?|ok|success(?:ful(?:ly)?)?|succeeded|0 failed|0 errors|no errors|BUILD SUCCESSFUL|exit code 0|Done)\b|✓|✔/;
const EDIT_TOOL = /^(?:Edit|MultiEdit|Write|apply_patch|str_replace\w*|write_file|edit_file|patch|create_file|NotebookEdit)$/i;
/** A shell command that changes a file (Codex edits through its shell and apply_patch). */
const EDIT_COMMAND = /\*\*\* Begin Patch|\bsed -i|\bperl -pi|\bgit apply|\bapply_patch|\bcat > |\btee |\bpatch -p/;
const READ_TOOL = /^(?:Read|Glob|Grep|LS|ls|cat|read_file|list_files|search\w*|fetch\w*|describe_table|lookup\w*|WebFetch|WebSearch)$/i;
const CONSTRAINT = /\b(?:must|without|at most|at least|no more than|under|within|budget|deadline|by (?:monday|friday|tomorrow|eod)|ensure|guarantee|never|only if|unless|but|while keeping|compatible|backwards?)\b|≤|>=|<=|\d+\s?(?:ms|s|gb|mb|tb|%|k|m|rows|users|rps|qps|req\/s|writes\/s|\$|€)(?![\p{L}\p{N}])/giu;
/** The same constraints in the other languages agents are used in (counted with CONSTRAINT). */
const CONSTRAINT_WORDS = new RegExp(words(
  "muss|müssen|ohne|höchstens|mindestens|darf nicht|dürfen nicht|nicht mehr als|doit|doivent|sans|au plus|au moins|" +
  "jamais|sauf si|debe|deben|sin|como máximo|al menos|nunca|salvo que|deve|devem|sem|no máximo|pelo menos|senza|" +
  "al massimo|almeno|mai|должен|должна|должно|без|не более|не больше|минимум|никогда|musi|muszą|maksymalnie|" +
  "co najmniej|nigdy|olmalı|olmadan|en fazla|en az|asla|moet|moeten|zonder|maximaal|minstens|nooit",
  "不能|不要|不得|最多|至少|必须|以内|しないで|してはいけない|以内に|必ず|最大|最低|안 돼|안 되|반드시|최대|최소|이내").source, "giu");
const constraintCount = (s: string) => (s.match(CONSTRAINT)?.length ?? 0) + (s.match(CONSTRAINT_WORDS)?.length ?? 0);

/** The last `n` characters of a text that can be huge (a tool's output), or all of it. */
const tail = (s: string, n: number) => (s.length > n ? s.slice(-n) : s);

/** A line of a list: "1. ", "2) ", "- ", "* ", "• ". */
const LIST_ITEM = /^\s*(?:\d+[.)]|[-*•])\s/;
const listItems = (lines: string[]) => lines.filter((l) => LIST_ITEM.test(l)).length;

/** Words that point at pasted material: "this", "below", "the following", in the languages agents are used in. */
const POINTS_AT = words(
  "this|these|below|following|here's|here is|attached|pasted|diese[mnrs]?|folgende[mnrs]?|unten|ce|cet|cette|ces|" +
  "ci-dessous|suivant[es]*|este|esta|estos|estas|siguiente[s]?|abajo|isto|isso|seguinte[s]?|abaixo|questo|questa|questi|" +
  "seguente|sotto|это|этот|эту|эти|этого|ниже|следующ*|ten|tę|tego|poniższ*|bu|şu|aşağıdaki|deze|dit|hieronder|volgende",
  "この|これ|以下|下記|这|這|下面|이 |이거|아래|다음");

/** A character of a script written without spaces between words (Chinese, Japanese, Korean). */
const CJK = /[\p{Script=Han}\p{Script=Hiragana}\p{Script=Katakana}\p{Script=Hangul}]/u, CJK_ALL = new RegExp(CJK.source, "gu");

/** How long a text reads: CJK characters carry about a word each, so they count three. */
const size = (s: string) => s.length + 2 * (s.match(CJK_ALL)?.length ?? 0);

/** A row of a pasted table: columns split by pipes or tabs, or a psql footer. */
const TABLE_ROW = /\S[^\S\t]*[|\t]\s*\S.*[|\t]|^\s*\(\d+ rows?\)\s*$/;

/** A pasted line (code, a log): it starts like one, or ends like code and does not read as a sentence (many words, few symbols). */
function isMaterial(line: string): boolean {
  if (MATERIAL_LINE.test(line.slice(0, 1000))) return true;
  if (!CODE_END.test(tail(line, 100))) return false;
  const words = line.match(/\p{L}{3,}/gu)?.length ?? 0, symbols = line.match(/[{}[\]();=<>|]/g)?.length ?? 0;
  return !(words >= 12 && symbols / line.length < 0.08);
}

/** The lines of a message with what was pasted blanked out: code, logs, tables, and the items of a list (three or more). */
function proseLines(text: string): string[] {
  const unfenced = (text.length > 40_000 ? `${text.slice(0, 20_000)}\n${text.slice(-20_000)}` : text).replace(/```[^`]*```/g, "\n");
  const raw = unfenced.replace(/[‘’]/g, "'").split("\n"), row = raw.map((l) => TABLE_ROW.test(l.slice(0, 1000)));
  // a table has rows above or below; one line with pipes in it is a sentence ("give me file | test | error")
  const listy = listItems(raw) >= 3;
  return raw.map((l, i) => (l.trim() && !((row[i] && (row[i - 1] || row[i + 1])) || isMaterial(l) || (listy && LIST_ITEM.test(l))) ? l.trim() : ""));
}

/** Does a text ask for any kind of task (a word of TASK_SIGNALS)? */
const asksForTask = (s: string) => TASK_SIGNALS.some(([, , re]) => re.test(s));

/**
 * "Translate this into English." / "この請求書から…抜き出して" and then the text: a short first paragraph that points at
 * what follows (or asks a question before a longer paste), when nothing after it asks anything and it is the
 * instruction (it names a task, or what follows names none: a report that says "design a fix" is the ask).
 */
function pointsAtPaste(first: string, rest: string[]): boolean {
  if (!rest.length || size(first) > 300 || rest.some((x) => /[?？]/.test(x))) return false;
  if (!POINTS_AT.test(first) && !(/[?？]/.test(first) && size(rest.join("")) > 2 * size(first))) return false;
  return asksForTask(first) || !asksForTask(rest.join("\n").slice(0, 2000));
}

/** The words of an ask without what was pasted into it: prose lines only, its start and end when long. */
export function askText(text: string): string {
  const lines = proseLines(text), kept = lines.filter(Boolean);
  const prose = lines.join("\n").replace(/\n{3,}/g, "\n\n").trim();
  const paragraphs = prose.split(/\n\s*\n/).map((x) => x.trim()).filter(Boolean);
  // "label each of these:" / "summarise this:" near the start (an instruction, not a header such as "Problem:"):
  // what follows the colon is the material, not the ask
  const intro = kept.slice(0, 3).findIndex((x) => /[:：]$/.test(x) && wordCount(x) >= 3);
  if (intro >= 0 && intro < kept.length - 1) {
    const end = paragraphs[paragraphs.length - 1];
    return [...kept.slice(0, intro + 1), ...(end.length <= 300 && /[?？]/.test(end) ? [end] : [])].join("\n").slice(-800);
  }
  const [first, ...rest] = paragraphs;
  if (pointsAtPaste(first, rest)) return first;
  if (size(prose) <= 600 || paragraphs.length < 2) return prose.length > 1200 ? `${prose.slice(0, 500)}\n${prose.slice(-700)}` : prose;
  // a pasted document: the instruction is its first paragraph ("summarise this:"), its last when short ("what did
  // they decide?"), and short paragraphs that ask something
  const last = paragraphs[paragraphs.length - 1];
  const asking = paragraphs.slice(1, -1).filter((x) => x.length <= 300 && /[?？]/.test(x)).slice(-2);
  // a long first paragraph is the document itself when a short one at the end asks about it
  const document = first.length > 400 && last.length <= 400 && /[?？]/.test(last) && !/[?？]/.test(first);
  const opening = document ? [] : [first.slice(0, 400)];
  return [...opening, ...asking, ...(last.length <= 400 ? [last] : [])].join("\n");
}

/** How long an ask is in words: CJK text has no spaces, so two of its characters count as a word. */
const wordCount = (s: string) => (s.match(/[\p{L}\p{N}]+/gu) ?? []).reduce((n, w) => n + (CJK.test(w) ? Math.ceil(w.length / 2) : 1), 0);

/** How a follow-up reads: a bare approval, one that says more ("looks good, go ahead, skip step 6"), or a few words. */
type FollowUp = "approval" | "approval with more" | "short follow-up";

/** The request as the classifier sees it: the ask, what a short follow-up refers to, and the tool run since the ask. */
type Reading = { ask: string; listed: number; context: string; offer: string; followup: FollowUp | undefined; calls: string[]; last: string | undefined; fails: number };

/** The last substantive thing the user asked before message `at`: a follow-up's antecedent (approvals skipped). */
function askedBefore(ms: ChatMessage[], at: number): string {
  for (let i = at - 1, looked = 0; i >= 0 && looked < 10; i--) {
    if (ms[i].role !== "user") continue;
    looked++;
    const t = askText(textOf(ms[i].content));
    if (t && !APPROVAL.test(t) && wordCount(t) > 3) return t;
  }
  return "";
}

function readRequest(req: ChatRequest): Reading {
  const ms = req.messages;
  const at = ms.findLastIndex((m) => m.role === "user" && textOf(m.content).trim() !== "");
  const said = at >= 0 ? textOf(ms[at].content) : "", ask = askText(said);
  const listed = listItems(said.slice(0, 20_000).replace(/```[^`]*```/g, "\n").split("\n"));
  const calls: string[] = [];
  let fails = 0, last: string | undefined;
  for (const m of ms.slice(at + 1)) {
    for (const c of m.tool_calls ?? []) calls.push(EDIT_COMMAND.test(c.function?.arguments?.slice(0, 4000) ?? "") ? "apply_patch" : c.function?.name ?? "");
    if (m.role === "tool" || m.role === "user") { last = tail(textOf(m.content), 3000); if (FAILED_RUN.test(last)) fails++; }
  }
  const answered = ms.slice(0, Math.max(0, at)).some((m) => m.role === "assistant");
  const approval = APPROVAL.test(ask), leads = LEADS_ON.test(ask.slice(0, 300)), n = wordCount(ask);
  const followup: FollowUp | undefined = !answered ? undefined : approval ? "approval" : leads && n > 8 ? "approval with more" : leads || n <= 8 ? "short follow-up" : undefined;
  const offer = followup ? textOf(ms.slice(0, at).findLast((m) => m.role === "assistant" && textOf(m.content).trim() !== "")?.content) : "";
  return { ask, listed, context: followup ? askedBefore(ms, at) : "", offer: offer.slice(0, 6000), followup, calls, last, fails };
}

/** What the cheapest model is shown for a second opinion: the ask, what it follows up, the tool run's end; never the pasted material. */
export function verdictRequest(req: ChatRequest): ChatRequest {
  const r = readRequest(req);
  const parts = [`The request:\n${r.ask.slice(0, 2000)}`];
  if (r.followup && r.context) parts.push(`It follows up on:\n${r.context.slice(0, 1000)}`);
  if (r.last !== undefined) parts.push(`The last tool result ends with:\n${tail(r.last, 600)}`);
  return { messages: [{ role: "system", content: VERDICT_PROMPT }, { role: "user", content: parts.join("\n\n") }], max_tokens: 5 };
}

const VERDICT_PROMPT = [
  "You route requests to a cheap or a capable language model.",
  "Answer with one word.",
  "\"complex\": a small, cheap model would fail or be clearly worse at it (finding the cause of a bug or a symptom, design, planning, proofs, estimates, judgement under constraints, non-trivial code, reviewing for subtle defects, weighing sources).",
  "\"simple\": a cheap model does it as well (a lookup, reformatting, extraction, translation, a summary, a mechanical edit, small talk, reporting a passing run).",
].join(" ");

/** What an ask tells the model not to do ("don't debug it, just format it"): not the task, so not a signal. */
const NOT_ASKED = new RegExp(`(?:${words(
  "don'?t|do not|no need to|not asking (you )?to|never mind|without|ohne|nicht nötig|pas besoin d[e']|sans|no hace falta|" +
  "sin|não precisa|sem|senza|non serve|не надо|не нужно|без|nie trzeba|bez|niet nodig|zonder|gerek yok").source})(?:\\s+[\\p{L}'-]+){1,3}`, "giu");

/** Names from code in an ask (`formatPrice`, `retry_count`, `cache.get()`, docs/design/events.md): what the work is on, not what it is. */
const IDENTIFIER = /`[^`\n]*`|[\w.-]*(?:\/[\w.-]+)+|[\w$]*[a-z][A-Z][\w$]*|\w+_\w+|[\w$]+(?:\.[\w$]+)+(?:\(\))?|[\w$]+\(\)/g;

/** The named signals of a reading (each 0 to 1) and the hashed words of its ask. */
export function classifierFeatures(req: ChatRequest): { named: Record<string, number>; hashed: number[] } {
  const r = readRequest(req), f: Record<string, number> = {};
  const asked = r.ask.replace(NOT_ASKED, " ").replace(IDENTIFIER, " ");
  for (const [name, , re] of TASK_SIGNALS) {
    if (re.test(asked)) f[name] = 1;
    else if (r.followup && re.test(r.context)) f[name] = 0.8; // a follow-up continues what it follows
  }
  if (r.followup) {
    f[r.followup] = 1;
    // what the model said last, which a reply approves or continues: a long plan of steps, or code, is work
    f["follows a long answer"] = Math.min(1, Math.log10(1 + r.offer.length) / 4);
    if (listItems(r.offer.split("\n")) >= 3) f["follows a plan"] = 1;
    if (r.offer.includes("```")) f["follows code"] = 1;
    // "still not working, now 2 errors": the answer it follows did not fix it
    if (f.retry === 1 || f.symptom === 1 || FAILED_RUN.test(r.ask)) f["not fixed by the answer"] = 1;
  }
  const ran = r.last !== undefined && r.calls.length > 0;
  const failed = ran && FAILED_RUN.test(r.last!), edited = r.calls.some((c) => EDIT_TOOL.test(c));
  if (failed) f[edited ? "failed after an edit" : "a run failed"] = 1;
  if (ran && !failed && PASSED_RUN.test(r.last!)) f["a run passed"] = 1;
  if (ran && READ_TOOL.test(r.calls[r.calls.length - 1])) f["read a file"] = 1;
  if (r.fails >= 2) f["failed repeatedly"] = 1;
  if (r.calls.length) f["tool steps"] = Math.min(1, r.calls.length / 10);
  // a follow-up's ask is the one it continues: "続けて" is as long as the work it approves
  f["ask length"] = Math.min(1, Math.log10(1 + r.ask.length + (r.followup ? r.context.length : 0)) / 4);
  f["questions"] = Math.min(1, (r.ask.match(/[?？]/g)?.length ?? 0) / 3);
  f["constraints"] = Math.min(1, constraintCount(r.ask) / 5);
  // a program asked for with a list of requirements or several constraints is a spec, not a snippet
  if (f.code && (r.listed >= 3 || constraintCount(r.ask) >= 2)) f["a program with requirements"] = 1;
  if (req.tools?.length) f["tools declared"] = 1;
  return { named: f, hashed: hashedWords(`${r.ask}\n${r.followup ? r.context : ""}`) };
}

/** Words (and pairs of CJK characters, which have no spaces) hashed into HASH_BUCKETS: the model's vocabulary. */
const HASH_BUCKETS = 1024;
function hashedWords(text: string): number[] {
  const out = new Set<number>();
  const add = (w: string) => { let h = 2166136261; for (let i = 0; i < w.length; i++) h = Math.imul(h ^ w.charCodeAt(i), 16777619); out.add((h >>> 0) % HASH_BUCKETS); };
  for (const w of text.toLowerCase().match(/[\p{L}\p{N}']{2,}/gu) ?? []) {
    if (CJK.test(w)) for (let i = 0; i + 1 < w.length; i++) add(w.slice(i, i + 2));
    else add(w);
  }
  return [...out];
}

// <weights> written by eval/routing/train.ts from the training part of eval/routing (npm run train:routing): retrain, do not edit
const WEIGHTS = {
  bias: -8.102, threshold: 0.37, scale: 0.00116564,
  named: {
    "a program with requirements": 3.69,
    "a run failed": -0.825,
    "a run passed": -2.087,
    "approval": -1.909,
    "approval with more": -0.651,
    "ask length": 10.088,
    "build": 2.74,
    "cause": 2.167,
    "classify": -3.051,
    "code": 1.016,
    "constraints": 4.81,
    "design": 2.405,
    "estimate": 2.958,
    "extract": -1.465,
    "failed after an edit": 1.617,
    "failed repeatedly": 3.02,
    "follows a long answer": 3.328,
    "follows a plan": 2.155,
    "follows code": -0.243,
    "judge": 2.944,
    "lookup": -0.314,
    "mechanical": -1.738,
    "not fixed by the answer": 1.935,
    "plan": 1.322,
    "proof": 5.052,
    "questions": 1.273,
    "read a file": 0.145,
    "reformat": -2.443,
    "research": 3.76,
    "retry": 2.771,
    "review": 4.799,
    "short follow-up": -1.849,
    "summarize": -1.716,
    "symptom": 1.391,
    "thanks": -2.566,
    "tool steps": 5.505,
    "tools declared": -0.098,
    "translate": -4.707,
  } as Record<string, number>,
  hashed:
    "9gEKBOgJDBT/JwAe9h8IKyz9RA6h/BYc9h4JAy0BMTLiH/kCNGj4KPNEKAoaPwIqAOsx1vXtNgIH9OvnIyIJAuseGAz/8RTuAx75" +
    "6ACtLkTv3iAx/Q8N+hklBhzwCQ73Bv0VFgDW8kgNGPz6FwMEFOhI4e3tBAYb7joIICE3+PxU0wUPLAIUBggNBSAnHBAtCgf9+ysc" +
    "/UL3DBsl/TDs4AsR7xQH+wj6DDkeGxsNMAUDCAflIf4R4gMBEwgeDjEO8Az7FRU2BgAKEuvnBQz6+Av4EC4x7BDX8xUXG94MGuwG" +
    "AOHm8g4E8AsR9yoIDfIM9gw2CwHvFAD5CRgICPkTEAYmJP8aEAcS7wAjPeQQCx3vAg3FByMV5wZE2AgR6SD3OBgTEywL7CsuBxXy" +
    "GDDQBwwoKhD4/xQD9ygPB/4N7xDsLhkZKA4JMinz8e8K6sb57RRO/vILJuwVB/8C/NcRBy4NCBn7NPEWA+W8AAL+990CBwsE+Cn9" +
    "6w4V8yX7GQY5CgoCEM06BQBtFEEECSgV/wQPEwkT9A4W0CUTA+woDvQM+kr6LwUH8QBQBgNBGQfz2AAMGg/6E+ATFB3d//oCFQsK" +
    "7A4FAzUkEiH7CBHu2BruH/n+BQgdJwHlAQQ0E/0aEQ8CTPYq9Qk6GkAWADxD1Dz7JR0IHyz1NCMiChcgHiMAFRrb+yfZFSj1IfoK" +
    "FQzKGigXLBP9AAL2/hwf1ezkDxoUKtcnFiXXKvgPL+LkDhEDFfwQCwPsIigUER368RsyBgQHxycB+B72KOoqF1DyERf6DvUe4fso" +
    "7CAgKRz0FfoGJf4SfwQs+P4W5A0S+wMz1A3uCub/+jUABfQIQT/5BP7sCPYTEw5Q+R00JvUX9ej6ISUcCCsZCxMFINvoQeP/+u1H" +
    "5QsOJw4M7uAbDRUUEwwSBAQa+foO5wj59xInRP/1FNILMxcNGQ788/AFTBwK4QcXLgcm9gkyEQsT+RbY+hE22SnhGhAP/BMJGj4F" +
    "Ex3+7Svx+/MSGCsCCRsTDwn6CiAGFAX6DQEl/wQQHS39APQMAAwvPe3n+iUc5hP+QQcYHgr2CRjYBiAgDQTx/x3rFwv++ej09AgM" +
    "Zg/7Dw8RIPPXD+P0Ch4V2wQf/BEtTQ4WIRgT/RkNTwIH3Hoe+uUVB/USChT6PA789/sMDwkUEBYVBvYO7iP4NN3t+CwN//AxE+4A" +
    "KDT87dD9AAL8NyPv7jfyJz8l4wIs6+8pBvEB7RoLBy0S0QTvGXca+OcV+jwV4xwT8uoOHQETGPreFBX/5xgxChjq2wb76RL6CPsj" +
    "Az7WNwkR/ksALUYTLCgjFxsV/jrl5Q4C+ehU9uP2KwDl4x8r+fz2JeP/AyQAJfwlNQ==",
};
// </weights>

/** The hashed words' weights, unpacked once: a byte each, times `scale`. */
const HASHED_WEIGHTS = Float64Array.from(Buffer.from(WEIGHTS.hashed, "base64"), (b) => ((b << 24) >> 24) * WEIGHTS.scale);

/** How the measured (not word-matched) signals read in a reason; the others read as their own name. */
const SHOWN: Record<string, string> = { "ask length": "a detailed ask", constraints: "several constraints", questions: "several questions", "tool steps": "a long tool run" };

/** How a named signal reads in a reason. */
function shownSignal(name: string): string {
  return TASK_SIGNALS.find((s) => s[0] === name)?.[1] ?? SHOWN[name] ?? name;
}

/**
 * Decide "simple" or "complex" for a request without a hint, and say why: the signals that weighed most
 * toward the verdict. `p` is the model's probability of complex; `unsure` when it is close to the
 * threshold (what "classifier": "model" asks the cheapest model about).
 */
export function classify(req: ChatRequest): { tier: Tier; signals: string[]; p: number; unsure: boolean } {
  const { named, hashed } = classifierFeatures(req);
  let z = WEIGHTS.bias, vocabulary = 0;
  const parts: [string, number][] = [];
  for (const [k, v] of Object.entries(named)) { const c = (WEIGHTS.named[k] ?? 0) * v; z += c; parts.push([k, c]); }
  for (const h of hashed) vocabulary += HASHED_WEIGHTS[h] ?? 0;
  z += vocabulary;
  parts.push(["its wording", vocabulary]);
  const p = 1 / (1 + Math.exp(-z)), tier: Tier = p >= WEIGHTS.threshold ? "complex" : "simple";
  const toward = parts.filter(([, c]) => (tier === "complex" ? c > 0.25 : c < -0.25)).sort((a, b) => Math.abs(b[1]) - Math.abs(a[1]));
  return { tier, signals: toward.slice(0, 3).map(([k]) => shownSignal(k)), p, unsure: Math.abs(p - WEIGHTS.threshold) < 0.15 };
}

/** Can this model answer with `n` choices? Anthropic and fixed-sampling models give exactly one. */
export const supportsN = (m: Model, n: number) => n === 1 || (m.provider.kind === "openai" && !m.fixed_sampling);

/**
 * A model that is not in the table, reached by "provider/model": no price, no known limits. All such
 * models of a provider share one limiter pool, so that state does not grow with every name a client sends.
 */
function unpricedModel(p: Provider, id: string): Model {
  return { id, key: `${p.id}/${id}`, pool: `${p.id}/*`, provider: p, input: 0, output: 0, limit: Infinity, tier: "complex", priced: false, order: -1 };
}

function pinned(req: ChatRequest, config: Config, name: string, hint: Tier | undefined): Route | undefined {
  const slash = name.indexOf("/");
  const p = config.providers.find((x) => x.id === name.slice(0, slash));
  if (slash < 0 || !p) return undefined;
  if (!p.enabled) throw new TwError(400, "provider_not_enabled", `Provider "${p.id}" is not enabled: ${p.why}. Pick another model, or start TokenWatch with that key.`, { param: "model" });
  const id = name.slice(slash + 1);
  const known = config.models.find((m) => m.provider === p && m.id === id);
  const complexity = hint ?? known?.tier ?? classify(req).tier;
  return { complexity, reason: `pinned to ${p.id}/${id}${known ? "" : " (not in the table: unpriced, no limits known)"}`, candidates: [known ?? unpricedModel(p, id)] };
}

function tierOrder(config: Config, tier: Tier): Model[] {
  return tier === "simple" ? config.simpleOrder : config.complexOrder;
}

/**
 * A Claude model id the table does not have (a newer one, or a dated snapshot, as Claude Code sends):
 * sent to Anthropic as it is, priced and limited like the table's model of its family (a dated id's own
 * base model first, else the first of opus, sonnet, haiku… it names). Undefined for any other name.
 */
export function claudeModel(config: Config, name: string): Model | undefined {
  if (!name.startsWith("claude-")) return undefined;
  const dated = /^(.+)-\d{8}$/.exec(name)?.[1];
  const family = /\b(opus|sonnet|haiku|fable|mythos)\b/.exec(name)?.[1];
  const base = config.models.find((m) => m.provider.kind === "anthropic" && m.id === dated)
    ?? config.models.find((m) => m.provider.kind === "anthropic" && family !== undefined && m.id.includes(family));
  return base && { ...base, id: name, key: `${base.provider.id}/${name}`, family: base.id };
}

function byModelName(config: Config, name: string, resolved: string): Route {
  const named = config.models.filter((m) => m.id === resolved);
  const claude = named.length ? undefined : claudeModel(config, resolved);
  if (claude) named.push(claude);
  if (!named.length) {
    const names = [...new Set([...config.models.filter((m) => m.provider.enabled).map((m) => m.id), ...config.aliases.keys()])];
    throw new TwError(404, "model_not_found", `Model "${name}" does not exist here. Use "auto", one of: ${names.join(", ")}; or "provider/model" to reach a model that is not in the table.`, { param: "model" });
  }
  const tier = named[0].tier;
  const first = named.filter((m) => m.provider.enabled);
  const sameTier = tierOrder(config, tier).filter((m) => m.tier === tier && !first.includes(m));
  const alias = resolved !== name ? ` (alias of ${resolved})` : claude ? ` (not in the table: sent to Anthropic as it is, priced as ${claude.family})` : "";
  const down = first.length ? "" : `, unavailable: ${named[0].provider.name} has ${named[0].provider.why}`;
  if (first.length + sameTier.length === 0) {
    return { complexity: tier, reason: `requested ${name}${alias}${down}; no ${tier} model is enabled, so the ${tier === "simple" ? "complex" : "simple"} ones are tried`, candidates: tierOrder(config, tier === "simple" ? "complex" : "simple") };
  }
  return { complexity: tier, reason: `requested ${name}${alias}${down}, then the other ${tier} models`, candidates: [...first, ...sameTier] };
}

/**
 * The routing rules: a complexity hint orders every candidate (cheapest first, or capable first);
 * a named model goes first, then its tier; "auto" or no model is classified; "provider/model" is
 * sent exactly there. Candidates that cannot honour `n` are left out.
 */
export function route(req: ChatRequest, config: Config, headerHint?: string, opts: RouteOpts = {}): Route {
  if (headerHint !== undefined && headerHint !== "simple" && headerHint !== "complex")
    throw bad(`Header x-tokenwatch-complexity must be "simple" or "complex"; got ${shown(headerHint)}.`);
  const { only, cheap, warm } = opts;
  const hint = req.complexity ?? (headerHint as Tier | undefined);
  const name = req.model ?? "auto";
  let r = name.includes("/") ? pinned(req, config, name, hint) : undefined;
  if (!r && cheap) { // a budget past its soft cap: the cheap tier, whatever was asked (but an explicit provider/model)
    r = { complexity: "simple", reason: cheap, candidates: tierOrder(config, "simple"), budget: cheap };
    if (name !== "auto" && !config.named.has(name)) byModelName(config, name, config.aliases.get(name) ?? name); // still 404 an unknown name
  }
  if (!r && hint) {
    const named = name !== "auto" ? ` (requested ${name} is ranked by the hint)` : "";
    r = { complexity: hint, reason: `complexity "${hint}" given: ${hint === "simple" ? "cheapest first" : "most capable first"}${named}`, candidates: tierOrder(config, hint) };
    if (name !== "auto" && !config.named.has(name)) byModelName(config, name, config.aliases.get(name) ?? name); // still 404 an unknown name
  }
  if (!r && name === "auto") {
    const c = opts.verdict ?? classify(req);
    r = { complexity: c.tier, reason: `auto: ${c.tier} (${c.signals.join(", ") || (c.tier === "simple" ? "no sign of complex work" : "its wording")})`, candidates: tierOrder(config, c.tier) };
    if (warm) r = keepWarm(lockTier(r, warm.state, config), warm);
  } else if (r && warm && !name.includes("/") && (hint || cheap)) r = keepWarm(r, warm); // a hint orders a tier: the warm model may still lead it
  r ??= config.named.get(name) ?? byModelName(config, name, config.aliases.get(name) ?? name);
  return keepOnly(withN(r, req.n ?? 1), only);
}

/** What route() may also weigh: the providers that can serve it (`only`), a budget's soft cap (`cheap`), the session's warm cache (`warm`). */
export type RouteOpts = { only?: Only; cheap?: string; warm?: Warm; verdict?: { tier: Tier; signals: string[] } };

// ---- sessions: keep the model that holds the warm cache ----

/** A session's state: the model holding its prompt cache, the prompt it cached (tokens), whether a turn needed the capable tier. */
export type SessionState = { model: string; prefix: number; capable: boolean; at: number };
/** A session's state and this request's size, for keepWarm. */
export type Warm = { state: SessionState; prompt: number; output: number };

/** What a request would cost on a model, its first `cached` prompt tokens read from that model's cache. */
const turnCost = (m: Model, prompt: number, cached: number, output: number) =>
  costUsd(m, { input: prompt - Math.min(cached, prompt), cached: Math.min(cached, prompt), cache_write: 0, output });

/** Once a turn of a session needed the capable tier, the classifier's later "simple" does not take it back down. */
function lockTier(r: Route, s: SessionState, config: Config): Route {
  if (!s.capable || r.complexity === "complex") return r;
  return { complexity: "complex", reason: `${r.reason.replace(/^auto: simple/, "auto: complex, as an earlier turn of this session needed the capable tier; this turn alone would be simple")}`, candidates: tierOrder(config, "complex") };
}

/**
 * Keep the model that holds the session's cache at the head of the candidates while it is the cheaper
 * choice: its cached prefix priced at its cache-read rate, against the first candidate at full price. A
 * move happens only when the other is cheaper, or is forced later (saturated, failing). The reason says which.
 */
export function keepWarm(r: Route, w: Warm): Route {
  const m = r.candidates.find((c) => c.key === w.state.model);
  if (!m) return { ...r, reason: `${r.reason}; moved: ${w.state.model}, which holds this session's cache, is not a candidate for this turn` };
  if (r.complexity === "complex" && m.tier !== "complex") return { ...r, reason: `${r.reason}; moved: ${m.id}, which holds this session's cache, is not a capable model` };
  const first = r.candidates[0];
  const warmCost = turnCost(m, w.prompt, w.state.prefix, w.output);
  if (first === m) return { ...r, reason: `${r.reason}; kept for cache on ${m.id}`, warm: true };
  const coldCost = turnCost(first, w.prompt, 0, w.output);
  if (warmCost > coldCost) return { ...r, reason: `${r.reason}; moved: ${first.id} at full price (about ${dollars(coldCost)}) is cheaper than ${m.id} with its cache (about ${dollars(warmCost)})` };
  return { ...r, reason: `${r.reason}; kept for cache on ${m.id}: about ${dollars(warmCost)} with ${w.state.prefix.toLocaleString("en-US")} tokens cached, against ${dollars(coldCost)} on ${first.id}`, candidates: [m, ...r.candidates.filter((c) => c !== m)], warm: true };
}

/**
 * The sessions seen lately and their warm model, bounded (the oldest go first) and forgotten once the
 * providers' prompt cache would have expired (Anthropic's lasts 5 minutes from its last use).
 */
export class Sessions {
  #map = new Map<string, SessionState>();
  #ttl: number; #max: number;
  constructor(ttlMs: number, max = 10_000) { this.#ttl = ttlMs; this.#max = max; }

  get(id: string, t: number): SessionState | undefined {
    const s = this.#map.get(id);
    if (s && t - s.at > this.#ttl) { this.#map.delete(id); return undefined; }
    return s;
  }

  /** After an answer: the model that answered holds the cache now, of this turn's whole prompt. */
  remember(id: string, model: Model, prompt: number, capable: boolean, t: number): void {
    if (this.#ttl <= 0) return;
    const was = this.#map.get(id);
    this.#map.delete(id); // re-inserted last: the Map's order is the order of use
    if (this.#map.size >= this.#max) this.#map.delete(this.#map.keys().next().value!);
    this.#map.set(id, { model: model.key, prefix: prompt, capable: capable || (was?.capable ?? false), at: t });
  }

  get size(): number { return this.#map.size; }
}

/** A request only some providers can serve (Anthropic's server tools, OpenAI's built-in tools), and why. */
export type Only = { keep: (p: Provider) => boolean; why: string };

function keepOnly(r: Route, only: Only | undefined): Route {
  if (!only) return r;
  const able = r.candidates.filter((m) => only.keep(m.provider));
  if (!able.length) throw bad(`No candidate (${r.candidates.map((m) => m.id).join(", ")}) can serve this request: ${only.why}. Name a model of that provider, or remove those tools.`, "tools");
  return able.length === r.candidates.length ? r : { ...r, reason: `${r.reason}; only ${[...new Set(able.map((m) => m.provider.id))].join(", ")}, as ${only.why}`, candidates: able };
}

function withN(r: Route, n: number): Route {
  if (!r.candidates.length) throw new TwError(503, "no_providers", "No provider is enabled: set ANTHROPIC_API_KEY, KIMI_API_KEY or OPENAI_API_KEY (or a local base URL) and restart TokenWatch.");
  const able = r.candidates.filter((m) => supportsN(m, n));
  if (!able.length) throw bad(`"n": ${n} is not supported by ${r.candidates.map((m) => m.id).join(", ")}: send "n": 1, or name an OpenAI model.`, "n");
  return able.length === r.candidates.length ? r : { ...r, candidates: able };
}

// ============================================================================================
// 8. Adapters: one small object per upstream `kind`. Each builds the upstream request from the hub
//    request (OpenAI-shaped), and turns the upstream's answers, errors and stream events into hub
//    answers and hub events, which the entries (section 9) encode for their clients. No fetch here.
// ============================================================================================

export type UpstreamRequest = { url: string; headers: Record<string, string>; body: string };
export type ErrorInfo = { message: string; type: string; code: string | null };

/** Why an answer stopped, in the hub's (OpenAI's) words. */
export type Finish = "stop" | "length" | "tool_calls" | "content_filter";

/** An OpenAI finish_reason as the hub's (the deprecated function_call is a tool call; anything unknown, a plain stop). */
const finishOf = (r: unknown): Finish => (r === "length" || r === "tool_calls" || r === "content_filter" ? r : r === "function_call" ? "tool_calls" : "stop");

/** One part of an answer, in the order the model produced it. */
export type AnswerPart =
  | { type: "text"; text: string }
  | { type: "thinking"; text: string; signature: string } // Anthropic's signature, or TokenWatch's ("tw:…") on another provider's reasoning
  | { type: "redacted_thinking"; data: string }
  | { type: "tool_call"; id: string; name: string; arguments: string };

/** A whole answer in the hub's shape, whatever the upstream: what every entry encodes for its client. */
export type Answer = { id: string; model: string; created: number; parts: AnswerPart[]; finish: Finish; usage: Usage | undefined };

/** One step of a streamed answer in the hub's shape. */
export type HubEvent =
  | { type: "start"; id: string; model: string }
  | { type: "text"; text: string }
  | { type: "thinking"; text: string }
  | { type: "signature"; signature: string }
  | { type: "redacted"; data: string }
  | { type: "tool"; id: string; name: string }   // a tool call begins; its arguments follow as "args"
  | { type: "args"; tool: number; text: string } // arguments of tool call number `tool` (0, 1, … in the order they began)
  | { type: "finish"; reason: Finish };

/** Turns an upstream's event stream into hub events, one whole SSE event at a time. */
export interface Decoder {
  feed(raw: Buffer): HubEvent[];
  usage: Usage | undefined;
  done: boolean;
  error: ErrorInfo | undefined;
}

export type Adapter = {
  build(hub: ChatRequest, m: Model, defaultMaxTokens: number): UpstreamRequest;
  /** The output tokens the provider charges against its limits on arrival and takes back at the end (its headers include them). */
  upfrontOutput(hub: ChatRequest, m: Model, defaultMaxTokens: number): number;
  parse(body: unknown, m: Model, now: number): Answer;
  error(status: number, text: string): ErrorInfo;
  decoder(m: Model, now: number): Decoder;
};

/** The header TokenWatch adds to every upstream request: one that comes back in is a loop (508). */
const HOP = "x-tokenwatch-hop";

/** Reasoning another provider produced, carried in a thinking block: Anthropic must not see it (it checks signatures). */
export const OWN_SIGNATURE = "tw:";

function parseJson(text: string): unknown {
  try { return JSON.parse(text); } catch { return undefined; }
}

/** An upstream error body of any shape (JSON, HTML page, plain text) to a short readable message. */
function errorInfoFrom(status: number, text: string): ErrorInfo {
  const json = parseJson(text) as Record<string, any> | undefined;
  const e = json?.error;
  if (isObj(e) && typeof e.message === "string")
    return { message: e.message, type: typeof e.type === "string" ? e.type : "upstream_error", code: typeof e.code === "string" ? e.code : typeof e.type === "string" ? e.type : null };
  if (typeof e === "string") return { message: e, type: "upstream_error", code: null };
  if (json?.object === "error" && typeof json.message === "string") // vLLM and other OpenAI-compatible servers
    return { message: json.message, type: typeof json.type === "string" ? json.type : "upstream_error", code: typeof json.code === "string" ? json.code : null };
  const html = /^\s*</.test(text);
  const snippet = html ? "an HTML page" : text.trim().slice(0, 200) || "an empty body";
  return { message: `Upstream answered ${status} with ${snippet}`, type: "upstream_error", code: null };
}

/** The text parts of an answer joined, and its tool calls: what the OpenAI shapes carry. */
export const answerText = (a: Answer) => a.parts.map((p) => (p.type === "text" ? p.text : "")).join("");
const answerCalls = (a: Answer) => a.parts.filter((p): p is Extract<AnswerPart, { type: "tool_call" }> => p.type === "tool_call");

// ---- kind "openai": OpenAI, Kimi and any OpenAI-compatible server ----

const OPENAI_FIELDS = new Set([
  "model", "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format", "max_tokens", "max_completion_tokens",
  "temperature", "top_p", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "stop", "n",
  "stream", "stream_options", "user", "seed", "reasoning_effort", "metadata", "store", "service_tier", "modalities", "audio",
  "prediction", "verbosity", "web_search_options", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
]);
const SAMPLING = ["temperature", "top_p", "frequency_penalty", "presence_penalty", "logit_bias", "top_k"];
const MESSAGE_FIELDS = new Set(["role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"]);
/** Content parts an OpenAI-compatible upstream takes: thinking parts (from another provider) are not among them. */
const OPENAI_PARTS = new Set(["text", "image_url", "input_audio", "file", "refusal"]);

/** A message's thinking parts, as the text Kimi wants in `reasoning_content`. */
const thinkingOf = (m: ChatMessage) =>
  Array.isArray(m.content) ? m.content.filter((p) => p.type === "thinking" && typeof p.thinking === "string").map((p) => p.thinking as string).join("\n") : "";

/**
 * One message as this upstream takes it, or the message itself when it needs nothing: OpenAI refuses
 * message keys it does not know (another provider's `reasoning_content`, a client's `id`) and parts it
 * does not know (thinking); a provider that wants `reasoning_content` on assistant tool-call turns (Kimi
 * thinking) gets it from the thinking parts, keeps the one given, or gets a placeholder.
 */
function upstreamMessage(m: ChatMessage, reasoning: boolean): ChatMessage {
  const needsReasoning = reasoning && m.role === "assistant" && typeof m.reasoning_content !== "string" && (Boolean(m.tool_calls?.length) || thinkingOf(m) !== "");
  const foreignParts = Array.isArray(m.content) && m.content.some((p) => !OPENAI_PARTS.has(p.type) || "cache_control" in p);
  let extra = false;
  for (const k in m) if (!MESSAGE_FIELDS.has(k) && !(reasoning && k === "reasoning_content")) { extra = true; break; }
  if (!needsReasoning && !foreignParts && !extra) return m;
  const clean: ChatMessage = { role: m.role };
  for (const k in m) if (MESSAGE_FIELDS.has(k) || (reasoning && k === "reasoning_content")) clean[k] = m[k];
  if (foreignParts) {
    const parts = (m.content as ContentPart[]).filter((p) => OPENAI_PARTS.has(p.type)).map(({ cache_control: _, ...p }) => p as ContentPart);
    clean.content = parts.length ? parts : m.role === "assistant" && m.tool_calls?.length ? null : "";
  }
  if (needsReasoning) clean.reasoning_content = thinkingOf(m) || " ";
  return clean;
}

/** Messages as this upstream takes them; untouched messages are not copied, and nor is the list when none changed. */
export function upstreamMessages(messages: ChatMessage[], reasoning: boolean): ChatMessage[] {
  let out: ChatMessage[] | undefined;
  messages.forEach((m, i) => {
    const clean = upstreamMessage(m, reasoning);
    if (clean !== m) (out ??= [...messages])[i] = clean;
  });
  return out ?? messages;
}

/**
 * A custom tool (free text in, as Codex declares `apply_patch`) for an upstream that only takes
 * functions: one required string parameter `input`, which the answer's call is read back from.
 */
export const CUSTOM_INPUT = { type: "object", properties: { input: { type: "string", description: "The raw text input of the tool: write it as it is, not as JSON." } }, required: ["input"], additionalProperties: false };

function functionTools(tools: ChatRequest["tools"]): ChatRequest["tools"] {
  if (!tools?.some((t) => t.type === "custom")) return tools;
  return tools.map((t) => (t.type !== "custom" || !isObj(t.custom) ? t : {
    type: "function", function: { name: String(t.custom.name), description: `${t.custom.description ?? ""}\n(Raw text tool: put the whole input in "input".)`.trim(), parameters: CUSTOM_INPUT },
  }));
}

/**
 * The body an OpenAI-compatible upstream accepts (known fields only, its own model id, its quirks),
 * and whether that differs from what the client sent. When it does not, the client's own text goes
 * up, which saves encoding the whole conversation again on every request.
 */
export function openAIRequest(req: ChatRequest, m: Model, stream: boolean): { body: Record<string, unknown>; changed: boolean } {
  const body: Record<string, unknown> = {};
  let changed = req.model !== m.id;
  for (const k in req) {
    if (OPENAI_FIELDS.has(k) && req[k] !== undefined && req[k] !== null) body[k] = req[k];
    else changed = true;
  }
  body.model = m.id;
  body.messages = upstreamMessages(req.messages, m.provider.reasoningContent === true);
  if (body.messages !== req.messages) changed = true;
  const cap = req.max_completion_tokens ?? req.max_tokens;
  const field = m.provider.maxTokensField ?? (req.max_completion_tokens !== undefined ? "max_completion_tokens" : "max_tokens");
  delete body.max_tokens;
  delete body.max_completion_tokens;
  if (cap !== undefined) {
    body[field] = cap;
    if (req[field] !== cap || (req.max_tokens !== undefined && req.max_completion_tokens !== undefined)) changed = true;
  }
  if (m.fixed_sampling) {
    for (const k of SAMPLING) if (k in body) { delete body[k]; changed = true; }
  } else if (m.provider.maxTemperature !== undefined && typeof body.temperature === "number" && body.temperature > m.provider.maxTemperature) {
    body.temperature = m.provider.maxTemperature;
    changed = true;
  }
  if (stream) {
    if (req.stream_options?.include_usage !== true) changed = true;
    body.stream_options = { ...req.stream_options, include_usage: true }; // always, so every token is counted
  } else if ("stream" in body || "stream_options" in body) {
    delete body.stream;
    delete body.stream_options;
    changed = true;
  }
  return { body, changed };
}

export const openAIBody = (req: ChatRequest, m: Model, stream: boolean) => openAIRequest(req, m, stream).body;

function openAIHeaders(m: Model): Record<string, string> {
  const headers: Record<string, string> = { "content-type": "application/json", [HOP]: "1" };
  if (m.provider.apiKey) headers.authorization = `Bearer ${m.provider.apiKey}`;
  return headers;
}

/**
 * A chat completion to the hub's answer. Reasoning (Kimi's `reasoning_content`) becomes a thinking part
 * signed by TokenWatch, so that a client can send it back and Kimi gets it again, but Anthropic never.
 */
function answerFromCompletion(body: Record<string, any>, m: Model, now: number): Answer {
  const choice = Array.isArray(body.choices) ? body.choices[0] ?? {} : {};
  const msg = isObj(choice.message) ? choice.message as Record<string, any> : {};
  const parts: AnswerPart[] = [];
  if (typeof msg.reasoning_content === "string" && msg.reasoning_content) parts.push({ type: "thinking", text: msg.reasoning_content, signature: `${OWN_SIGNATURE}${m.provider.id}` });
  if (typeof msg.content === "string" && msg.content) parts.push({ type: "text", text: msg.content });
  for (const t of Array.isArray(msg.tool_calls) ? msg.tool_calls as Record<string, any>[] : [])
    if (isObj(t) && isObj(t.function)) parts.push({ type: "tool_call", id: String(t.id ?? ""), name: String(t.function.name ?? ""), arguments: typeof t.function.arguments === "string" ? t.function.arguments : "" });
  const finish = finishOf(choice.finish_reason);
  return { id: String(body.id ?? ""), model: typeof body.model === "string" ? body.model : m.id, created: typeof body.created === "number" ? body.created : Math.floor(now / 1000), parts, finish, usage: usageFromOpenAI(body.usage) };
}

/** A chunk that carries nothing but a piece of text, in OpenAI's own field order: the text's JSON string literal. */
const OPENAI_TEXT = /^data: \{[^{]*"choices":\[\{"index":0,"delta":\{"content":("(?:[^"\\]|\\.)*")\},(?:"logprobs":null,)?"finish_reason":null\}\](?:,"usage":null)?(?:,"obfuscation":"[^"]*")?\}\r?\n/;

/** An OpenAI (or Kimi) chat-completion stream to hub events: content, reasoning, tool calls, finish, usage. */
class OpenAIDecoder implements Decoder {
  usage: Usage | undefined;
  done = false;
  error: ErrorInfo | undefined;
  #m: Model; #started = false; #tools = new Map<number, number>(); #lastTool = -1; #now: number;
  constructor(m: Model, now: number) { this.#m = m; this.#now = now; }

  feed(raw: Buffer): HubEvent[] {
    const s = raw.toString();
    const text = this.#started ? OPENAI_TEXT.exec(s) : null; // most chunks are a piece of text: no parse of the whole chunk
    if (text && !s.includes('"usage":{')) { const t = JSON.parse(text[1]) as string; return t ? [{ type: "text", text: t }] : []; }
    const ev = parseSseEvent(s);
    if (!ev) return [];
    if (ev.data.trim() === "[DONE]") { this.done = true; return []; }
    const json = parseJson(ev.data) as Record<string, any> | undefined;
    if (!json || typeof json !== "object") return [];
    if (json.error || json.object === "error") { this.error = errorInfoFrom(500, ev.data); return []; }
    const out: HubEvent[] = [];
    if (!this.#started) { this.#started = true; out.push({ type: "start", id: String(json.id ?? ""), model: typeof json.model === "string" ? json.model : this.#m.id }); }
    const choice = Array.isArray(json.choices) ? json.choices[0] : undefined;
    const usage = json.usage ?? choice?.usage; // Kimi puts it inside the final choice
    if (isObj(usage)) this.usage = usageFromOpenAI(usage);
    if (!isObj(choice)) return out;
    const d = isObj(choice.delta) ? choice.delta as Record<string, any> : {};
    if (typeof d.reasoning_content === "string" && d.reasoning_content) out.push({ type: "thinking", text: d.reasoning_content });
    if (typeof d.content === "string" && d.content) out.push({ type: "text", text: d.content });
    for (const t of Array.isArray(d.tool_calls) ? d.tool_calls : []) this.#toolDelta(t, out);
    if (typeof choice.finish_reason === "string") out.push({ type: "finish", reason: finishOf(choice.finish_reason) });
    return out;
  }

  /** A tool-call fragment: the first of a call carries its id and name; Kimi may leave out `index` (then: the last call begun). */
  #toolDelta(t: Record<string, any>, out: HubEvent[]): void {
    if (!t || typeof t !== "object") return;
    const index = typeof t.index === "number" ? t.index : (t.id ? this.#tools.size : this.#lastIndex());
    if (!this.#tools.has(index)) {
      this.#tools.set(index, this.#tools.size);
      out.push({ type: "tool", id: String(t.id ?? `call_${this.#now}_${index}`), name: String(t.function?.name ?? "") });
    }
    this.#lastTool = index;
    const args = t.function?.arguments;
    if (typeof args === "string" && args) out.push({ type: "args", tool: this.#tools.get(index)!, text: args });
  }

  #lastIndex(): number { return this.#lastTool < 0 ? 0 : this.#lastTool; }
}

const openaiAdapter: Adapter = {
  /** A translated request (from Messages or Responses): custom tools as functions; reasoning effort only where a hint is known to be taken (not here). */
  build(hub, m) {
    const tc = hub.tool_choice;
    const choice = isObj(tc) && tc.type === "custom" && tc.custom ? { type: "function", function: { name: tc.custom.name } } : tc;
    const body = openAIBody({ ...hub, tools: functionTools(hub.tools), tool_choice: choice, reasoning_effort: undefined }, m, hub.stream === true);
    return { url: `${m.provider.baseUrl}/chat/completions`, headers: openAIHeaders(m), body: JSON.stringify(body) };
  },
  upfrontOutput: () => 0, // OpenAI and Kimi keep what they charged on arrival: nothing to take back
  parse(body, m, now) {
    if (!isObj(body) || !Array.isArray(body.choices)) throw new TwError(502, "bad_upstream_response", "Upstream answered 200 without a chat completion in its body.");
    return answerFromCompletion(body, m, now);
  },
  error: errorInfoFrom,
  decoder: (m, now) => new OpenAIDecoder(m, now),
};

// ---- kind "anthropic": the Messages API ----

type Block = Record<string, unknown> & { type: string };
type Turn = { role: "user" | "assistant"; content: Block[] };

const DATA_URL = /^data:([^;,]+)(?:;[^,]*)?;base64,(.*)$/s;

/** One hub content part to an Anthropic block; empty text and TokenWatch's own thinking become nothing. */
function partToBlock(p: ContentPart, where: string): Block | undefined {
  const mark = isObj(p.cache_control) ? { cache_control: p.cache_control } : {};
  if (p.type === "text") return p.text?.trim() ? { type: "text", text: p.text, ...mark } : undefined;
  if (p.type === "thinking") return typeof p.signature === "string" && p.signature && !p.signature.startsWith(OWN_SIGNATURE) ? { type: "thinking", thinking: p.thinking, signature: p.signature } : undefined;
  if (p.type === "redacted_thinking") return typeof p.data === "string" ? { type: "redacted_thinking", data: p.data } : undefined;
  if (p.type === "image_url" && p.image_url) {
    const data = DATA_URL.exec(p.image_url.url);
    if (data) return { type: data[1] === "application/pdf" ? "document" : "image", source: { type: "base64", media_type: data[1], data: data[2] }, ...mark };
    if (/^https?:\/\//.test(p.image_url.url)) return { type: "image", source: { type: "url", url: p.image_url.url }, ...mark };
    throw bad(`${where}.image_url.url must be an http(s) URL or a base64 data: URL.`, where);
  }
  if (p.type === "file" && p.file?.file_data) {
    const data = DATA_URL.exec(p.file.file_data);
    if (data) return { type: "document", source: { type: "base64", media_type: data[1], data: data[2] }, ...mark };
  }
  throw bad(`${where} has a "${p.type}" part, which Anthropic models cannot take: send text, image_url or a PDF file, or pick an OpenAI model.`, where);
}

function blocksOf(content: ChatMessage["content"], where: string): Block[] {
  if (typeof content === "string") return content.trim() ? [{ type: "text", text: content }] : [];
  return (content ?? []).map((p, j) => partToBlock(p, `${where}[${j}]`)).filter((b): b is Block => b !== undefined);
}

/** Anthropic accepts tool ids of [a-zA-Z0-9_-] only; other providers' ids (Kimi's "functions.f:0") are mapped the same way on both sides. */
export const toolId = (id: string) => id.replace(/[^a-zA-Z0-9_-]/g, "_");

function toolUses(m: ChatMessage, i: number): Block[] {
  return (m.tool_calls ?? []).map((t, j) => {
    const input = t.function.arguments.trim() ? parseJson(t.function.arguments) : {};
    if (!isObj(input)) throw bad(`messages[${i}].tool_calls[${j}].function.arguments must be a JSON object string, like "{\\"city\\": \\"Paris\\"}".`, "messages");
    return { type: "tool_use", id: toolId(t.id), name: t.function.name, input };
  });
}

function pushTurn(turns: Turn[], role: Turn["role"], blocks: Block[]): void {
  if (!blocks.length) return;
  const last = turns[turns.length - 1];
  if (last?.role === role) last.content.push(...blocks);
  else turns.push({ role, content: blocks });
}

/**
 * Hub messages to Anthropic's: system and developer text moves to `system`; tool results become
 * `tool_result` blocks at the start of one user turn; same-role turns merge; empty text is dropped;
 * thinking goes first in its assistant turn, as Anthropic wants it.
 */
export function toAnthropicMessages(messages: ChatMessage[]): { system: Block[]; turns: Turn[] } {
  const system: Block[] = [], turns: Turn[] = [];
  messages.forEach((m, i) => {
    const where = `messages[${i}].content`;
    if (m.role === "system" || m.role === "developer") system.push(...blocksOf(m.content, where).filter((b) => b.type === "text"));
    else if (m.role === "user") pushTurn(turns, "user", blocksOf(m.content, where));
    else if (m.role === "assistant") pushTurn(turns, "assistant", [...blocksOf(m.content, where), ...toolUses(m, i)]);
    else {
      const text = textOf(m.content);
      const result: Block = { type: "tool_result", tool_use_id: toolId(m.tool_call_id ?? m.name ?? "") };
      if (text.trim()) result.content = text;
      pushTurn(turns, "user", [result]);
    }
  });
  const first = (t: string) => (b: Block) => Number(b.type === t || (t === "thinking" && b.type === "redacted_thinking"));
  for (const t of turns) t.content.sort((a, b) => (t.role === "user" ? first("tool_result")(b) - first("tool_result")(a) : first("thinking")(b) - first("thinking")(a)));
  return { system, turns };
}

function anthropicToolChoice(req: ChatRequest): Record<string, unknown> | undefined {
  const tc = req.tool_choice;
  let out: Record<string, unknown> | undefined =
    tc === "auto" ? { type: "auto" } : tc === "required" ? { type: "any" } : tc === "none" ? { type: "none" }
    : isObj(tc) && tc.function?.name ? { type: "tool", name: tc.function.name } : isObj(tc) && isObj(tc.custom) && tc.custom.name ? { type: "tool", name: tc.custom.name } : undefined;
  if (req.parallel_tool_calls === false && req.tools?.length) out = { ...(out ?? { type: "auto" }), disable_parallel_tool_use: true };
  return out;
}

/** Function and custom tools as Anthropic declares them (a custom tool takes one string, `input`). */
function anthropicTools(tools: ChatRequest["tools"]): Record<string, unknown>[] {
  return (tools ?? []).flatMap((t) => {
    if (t.type === "function" && t.function) return [{ name: t.function.name, ...(t.function.description ? { description: t.function.description } : {}), input_schema: t.function.parameters ?? { type: "object", properties: {} } }];
    if (t.type === "custom" && isObj(t.custom)) return [{ name: String(t.custom.name), description: `${t.custom.description ?? ""}\n(Raw text tool: put the whole input in "input".)`.trim(), input_schema: CUSTOM_INPUT }];
    return [];
  });
}

/** How much Anthropic may think for a reasoning effort (a Responses client's `reasoning.effort`). */
const THINKING_BUDGET: Record<string, number> = { minimal: 1024, low: 2048, medium: 8192, high: 24_576, xhigh: 32_768 };

const JSON_MODE = "Reply with one valid JSON object and nothing else: no prose before or after it, no code fences.";

/** The output cap sent to Anthropic, which requires one: the client's, else the model's, else the default. */
const anthropicMaxTokens = (req: ChatRequest, m: Model, defaultMax: number) => askedOutput(req) ?? m.max_tokens ?? defaultMax;

/** The whole request in Anthropic's shape; `max_tokens` is always sent because Anthropic requires it. */
export function anthropicBody(req: ChatRequest, m: Model, defaultMax: number): Record<string, unknown> {
  const { system, turns } = toAnthropicMessages(req.messages);
  if (!turns.length) throw bad("The messages hold no user or assistant content once empty text is dropped: send at least one non-empty user message.", "messages");
  const body: Record<string, unknown> = { model: m.id, max_tokens: anthropicMaxTokens(req, m, defaultMax), messages: turns };
  if (system.length) body.system = system;
  if (!m.fixed_sampling) {
    if (typeof req.temperature === "number") body.temperature = Math.min(req.temperature, 1);
    if (typeof req.top_p === "number") body.top_p = req.top_p;
  }
  if (req.stop != null) body.stop_sequences = Array.isArray(req.stop) ? req.stop : [req.stop];
  const tools = anthropicTools(req.tools);
  if (tools.length) body.tools = tools;
  const choice = tools.length ? anthropicToolChoice(req) : undefined;
  if (choice) body.tool_choice = choice;
  if (typeof req.user === "string") body.metadata = { user_id: req.user };
  if (req.response_format?.type === "json_schema" && req.response_format.json_schema?.schema) body.output_config = { format: { type: "json_schema", schema: req.response_format.json_schema.schema } };
  // Anthropic has no JSON mode without a schema: ask for it in the instructions, as OpenAI's JSON mode also requires
  if (req.response_format?.type === "json_object") body.system = [...system, { type: "text", text: JSON_MODE }];
  addThinking(body, req.reasoning_effort, turns);
  if (req.stream) body.stream = true;
  if (m.provider.promptCache && !hasCacheMarks(body)) markCacheBreakpoints(body as AnthropicPrompt);
  return body;
}

/**
 * Thinking for a request that asks for reasoning effort, when Anthropic can take it: not with a forced
 * tool, and not when an assistant tool-use turn has no thinking to start with (Anthropic refuses that
 * with thinking on; reasoning from another provider cannot be sent to it).
 */
function addThinking(body: Record<string, unknown>, effort: unknown, turns: Turn[]): void {
  const budget = typeof effort === "string" && Object.hasOwn(THINKING_BUDGET, effort) ? THINKING_BUDGET[effort] : 0;
  if (!budget) return;
  const bare = turns.some((t) => t.role === "assistant" && t.content.some((b) => b.type === "tool_use") && t.content[0].type !== "thinking" && t.content[0].type !== "redacted_thinking");
  const forced = isObj(body.tool_choice) && (body.tool_choice.type === "any" || body.tool_choice.type === "tool");
  if (bare || forced) return;
  body.thinking = { type: "enabled", budget_tokens: budget };
  body.max_tokens = Math.max(Number(body.max_tokens), budget + 1024);
  delete body.temperature; delete body.top_p; // thinking takes the default sampling only
}

type AnthropicPrompt = { tools?: Record<string, unknown>[]; system?: Block[]; messages: Turn[] };

/** Whether a Messages body already marks cache breakpoints anywhere (TokenWatch then adds none: Anthropic allows four). */
const hasCacheMarks = (body: unknown) => JSON.stringify(body).includes('"cache_control"');

/**
 * Anthropic caches a prompt only up to the blocks marked `cache_control` (OpenAI and Kimi cache on
 * their own). Three marks of the four allowed, in the order Anthropic reads a prompt: the last tool,
 * the end of the system prompt, the last block of the last message. An agent's next turn then reads
 * its tools, instructions and history from the cache at a tenth of the input price (and cache reads
 * do not count against Anthropic's input-token limit); writing them costs 1.25× once. A prefix shorter
 * than the model's minimum (1,024 to 4,096 tokens) is simply not cached, at no extra cost.
 */
export function markCacheBreakpoints(body: AnthropicPrompt): void {
  const last = <T>(xs: T[] | undefined): T | undefined => xs?.[xs.length - 1];
  const lastTurn = last(body.messages);
  if (lastTurn && typeof lastTurn.content === "string") lastTurn.content = [{ type: "text", text: lastTurn.content }];
  if (typeof body.system === "string") body.system = [{ type: "text", text: body.system }];
  for (const b of [last(body.tools), last(body.system), last(lastTurn?.content)]) if (isObj(b)) b.cache_control = { type: "ephemeral" };
}

const STOP_REASONS: Record<string, Finish> = {
  end_turn: "stop", stop_sequence: "stop", pause_turn: "stop", max_tokens: "length",
  model_context_window_exceeded: "length", tool_use: "tool_calls", refusal: "content_filter",
};
const finishReason = (r: unknown): Finish => (typeof r === "string" && Object.hasOwn(STOP_REASONS, r) ? STOP_REASONS[r] : "stop");

/** An Anthropic message to the hub's answer: blocks in order, tool_use as tool calls, thinking with its signature. */
export function answerFromMessage(body: Record<string, any>, m: Model, now: number): Answer {
  const parts: AnswerPart[] = [];
  for (const b of Array.isArray(body.content) ? body.content : []) {
    if (!isObj(b)) continue;
    if (b.type === "text" && typeof b.text === "string") parts.push({ type: "text", text: b.text });
    else if (b.type === "thinking") parts.push({ type: "thinking", text: String(b.thinking ?? ""), signature: String(b.signature ?? "") });
    else if (b.type === "redacted_thinking") parts.push({ type: "redacted_thinking", data: String(b.data ?? "") });
    else if (b.type === "tool_use") parts.push({ type: "tool_call", id: String(b.id ?? ""), name: String(b.name ?? ""), arguments: JSON.stringify(b.input ?? {}) });
  }
  return { id: String(body.id ?? ""), model: typeof body.model === "string" ? body.model : m.id, created: Math.floor(now / 1000), parts, finish: finishReason(body.stop_reason), usage: usageFromAnthropic(body.usage) };
}

/** A text delta as Anthropic sends it: the text's JSON string literal. */
const ANTHROPIC_TEXT = /^event: content_block_delta\r?\ndata: \{"type":"content_block_delta","index":\d+,"delta":\{"type":"text_delta","text":("(?:[^"\\]|\\.)*")\}\}\r?\n/;

/** Anthropic's event stream to hub events, event by event; tool calls are numbered in the order they begin. */
class AnthropicDecoder implements Decoder {
  usage: Usage | undefined;
  done = false;
  error: ErrorInfo | undefined;
  #m: Model; #toolOf = new Map<number, number>();
  constructor(m: Model) { this.#m = m; }

  feed(raw: Buffer): HubEvent[] {
    const s = raw.toString();
    const text = ANTHROPIC_TEXT.exec(s); // most events are a piece of text: no parse of the whole event
    if (text) { const t = JSON.parse(text[1]) as string; return t ? [{ type: "text", text: t }] : []; }
    const ev = parseSseEvent(s);
    const data = ev && (parseJson(ev.data) as Record<string, any> | undefined);
    if (!data || typeof data !== "object") return [];
    switch (data.type) {
      case "message_start": {
        const msg = isObj(data.message) ? data.message as Record<string, any> : {};
        this.usage = usageFromAnthropic(msg.usage);
        return [{ type: "start", id: String(msg.id ?? ""), model: typeof msg.model === "string" ? msg.model : this.#m.id }];
      }
      case "content_block_start": return this.#blockStart(data.index, isObj(data.content_block) ? data.content_block : {});
      case "content_block_delta": return this.#delta(data.index, isObj(data.delta) ? data.delta : {});
      case "message_delta":
        // output_tokens is cumulative; input and cache counts, when repeated here, replace message_start's
        this.usage = usageFromAnthropic(data.usage, this.usage);
        return [{ type: "finish", reason: finishReason(data.delta?.stop_reason) }];
      case "message_stop": this.done = true; return [];
      case "error": this.error = { message: String(data.error?.message ?? "Upstream stream error"), type: String(data.error?.type ?? "api_error"), code: typeof data.error?.type === "string" ? data.error.type : null }; return [];
      default: return []; // ping, content_block_stop and anything newer carry nothing for the hub
    }
  }

  #blockStart(index: number, block: Record<string, any>): HubEvent[] {
    if (block.type === "text") return block.text ? [{ type: "text", text: block.text }] : [];
    if (block.type === "thinking") return block.thinking ? [{ type: "thinking", text: block.thinking }] : [];
    if (block.type === "redacted_thinking") return [{ type: "redacted", data: String(block.data ?? "") }];
    if (block.type !== "tool_use") return [];
    this.#toolOf.set(index, this.#toolOf.size);
    return [{ type: "tool", id: String(block.id ?? ""), name: String(block.name ?? "") }];
  }

  #delta(index: number, d: Record<string, any>): HubEvent[] {
    if (d.type === "text_delta" && d.text) return [{ type: "text", text: d.text }];
    if (d.type === "thinking_delta" && d.thinking) return [{ type: "thinking", text: d.thinking }];
    if (d.type === "signature_delta" && d.signature) return [{ type: "signature", signature: d.signature }];
    if (d.type === "input_json_delta" && d.partial_json && this.#toolOf.has(index)) return [{ type: "args", tool: this.#toolOf.get(index)!, text: d.partial_json }];
    return []; // citations and anything newer are not content the hub carries
  }
}

const anthropicAdapter: Adapter = {
  build(hub, m, defaultMax) {
    return { url: `${m.provider.baseUrl}/v1/messages`, headers: anthropicHeaders(m), body: JSON.stringify(anthropicBody(hub, m, defaultMax)) };
  },
  upfrontOutput: anthropicMaxTokens, // OTPM is charged from max_tokens, corrected to the real output at the end
  parse(body, m, now) {
    if (!isObj(body) || !Array.isArray(body.content)) throw new TwError(502, "bad_upstream_response", "Upstream answered 200 without a message in its body.");
    return answerFromMessage(body, m, now);
  },
  error: errorInfoFrom,
  decoder: (m) => new AnthropicDecoder(m),
};

/** What Anthropic wants with every request; a Messages client's own version and betas go up as they came. */
function anthropicHeaders(m: Model, client: { version?: string; beta?: string } = {}): Record<string, string> {
  const headers: Record<string, string> = { "content-type": "application/json", "anthropic-version": client.version ?? "2023-06-01", [HOP]: "1" };
  if (client.beta) headers["anthropic-beta"] = client.beta;
  if (m.provider.apiKey) headers["x-api-key"] = m.provider.apiKey;
  return headers;
}

export const ADAPTERS: Record<Kind, Adapter> = { openai: openaiAdapter, anthropic: anthropicAdapter };

// ============================================================================================
// 9. Entries: one small object per client format. Each reads its client's body into the hub request
//    and encodes hub answers, hub events and errors for its client. Its passthrough lane sends the
//    client's own body to an upstream that speaks the same format, and that upstream's bytes back.
// ============================================================================================

/** A client request once its entry has read it. */
export type Parsed = {
  hub: ChatRequest;              // OpenAI-shaped: what routing reads, and what a translating adapter builds from
  body: Record<string, unknown>; // the client's body, parsed: what the passthrough lane starts from
  text: string;                  // … and as it was sent
  stream: boolean;
  nativeOnly?: string;           // why only an upstream of the client's own format can serve it (its server tools, …)
  forward: Record<string, string>; // client headers the passthrough lane sends on as they came (anthropic-version, anthropic-beta)
  expanded?: Record<string, any>[];  // Responses: the input with its references resolved (what OpenAI gets when it cannot resolve them itself)
  keep?: { previous: string | null; input: Record<string, any>[] }; // Responses: what the response store keeps of this request
  final?: Record<string, any>;       // Responses: the answer as sent, once complete (its id and output are kept)
};

/** What an entry needs to answer: the job, the model that answered, the attempts before it. */
export type AnswerCtx = { job: Job; m: Model; attempts: Attempt[] };

/** What a stream relay feeds and asks: events in, bytes out; `end` gives the last bytes, sent once the row is committed. */
export interface Tap {
  feed(raw: Buffer): Buffer | string | null;
  end(u: Usage, cost: number): string | Buffer;
  fail(err: TwError): string;
  usage: Usage | undefined;
  done: boolean;
  error: ErrorInfo | undefined;
  /** The whole answer as the client received it, once `end` has run (Responses: what the response store keeps). */
  final?: Record<string, any>;
}

/** Hub events in, the client's events out: what an entry gives a translated stream. */
export interface Encoder {
  event(e: HubEvent): string;
  end(u: Usage, cost: number): string;
  fail(err: TwError): string;
  final?: Record<string, any>;
}

export type Entry = {
  format: Format;
  /** Read and check the client's body (errors in the client's shape come from `error`). */
  parse(body: unknown, text: string, headers: IncomingMessage["headers"]): Parsed;
  /** Whether an upstream speaks this entry's format: then the passthrough lane. */
  native(p: Provider): boolean;
  /** An upstream error on the passthrough lane goes back to the client unchanged (but for keys), not re-worded. */
  relaysErrors: boolean;
  nativeRequest(job: Job, m: Model): UpstreamRequest;
  nativeJson(text: string, ctx: AnswerCtx): { usage: Usage | undefined; outputChars: number; body(u: Usage, cost: number): string };
  nativeTap(p: Parsed, m: Model): Tap;
  encode(a: Answer, ctx: AnswerCtx, u: Usage, cost: number): unknown;
  encoder(p: Parsed, m: Model, now: number): Encoder;
  error(err: TwError): { status: number; body: unknown };
};

/** A translated stream: the upstream's decoder, then the client's encoder. */
export class Translation implements Tap {
  #dec: Decoder; #enc: Encoder;
  constructor(dec: Decoder, enc: Encoder) { this.#dec = dec; this.#enc = enc; }
  get usage() { return this.#dec.usage; }
  get done() { return this.#dec.done; }
  get error() { return this.#dec.error; }
  feed(raw: Buffer): string | null {
    let out = "";
    for (const e of this.#dec.feed(raw)) out += this.#enc.event(e);
    return out || null;
  }
  end(u: Usage, cost: number): string { return this.#enc.end(u, cost); }
  fail(err: TwError): string { return this.#enc.fail(err); }
  get final() { return this.#enc.final; }
}

/**
 * The client's JSON text with its top-level "model" replaced, every other byte as sent: a scan that
 * jumps over strings, no re-encoding. A body whose model is not a plain top-level string (or is given
 * twice) is re-encoded instead.
 */
export function withModel(text: string, model: string): string {
  let depth = 0, key = false, at: [number, number] | undefined, twice = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 34) {
      const end = closingQuote(text, i);
      if (depth === 1 && key && end - i === 6 && text.startsWith("model", i + 1)) {
        const v = valueAfterColon(text, end + 1);
        if (at || v < 0) twice = true;
        else at = [v, closingQuote(text, v)];
      }
      key = false;
      i = end;
    } else if (c === 123 || c === 91) { depth++; key = c === 123 && depth === 1; }
    else if (c === 125 || c === 93) depth--;
    else if (c === 44 && depth === 1) key = true;
  }
  if (at && !twice) return text.slice(0, at[0]) + JSON.stringify(model) + text.slice(at[1] + 1);
  return JSON.stringify({ ...(JSON.parse(text) as object), model });
}

/** Where the string value after a key starts (its opening quote), or -1 when the value is not a string. */
function valueAfterColon(text: string, from: number): number {
  let j = from;
  while (j < text.length && text.charCodeAt(j) <= 32) j++;
  if (text[j] !== ":") return -1;
  j++;
  while (j < text.length && text.charCodeAt(j) <= 32) j++;
  return text[j] === '"' ? j : -1;
}

/** Where an answer went and why: the Chat Completions body carries it as `routing`. */
function routingOf(ctx: AnswerCtx) {
  const { m, job } = ctx;
  return { provider: m.provider.id, model: m.id, complexity: job.route.complexity, reason: job.route.reason, attempts: ctx.attempts, ...(m.priced ? {} : { unpriced: true }), ...(m.family ? { priced_as: m.family } : {}) };
}

// ---- Chat Completions (the OpenAI SDKs, LangChain, most frameworks) ----

/** The usage chunk a stream ends with when the client asked for usage: the billed counts and the exact cost. */
const usageChunk = (id: unknown, created: unknown, model: unknown, u: Usage, cost: number) =>
  sseData({ id, object: "chat.completion.chunk", created, model, choices: [], usage: openAIUsage(u, cost) });

/** A completion with TokenWatch's additions: the billed usage with its cost (the upstream's other usage details stay) and `routing`. */
function withRouting(c: Completion, u: Usage, cost: number, ctx: AnswerCtx): Completion {
  const ours = openAIUsage(u, cost);
  c.usage = { ...c.usage, ...ours, prompt_tokens_details: { ...c.usage?.prompt_tokens_details, ...ours.prompt_tokens_details } };
  c.routing = routingOf(ctx);
  return c;
}

/** The hub's answer as a chat completion: text joined, tool calls, the finish reason (thinking is not part of this format). */
export function completionOf(a: Answer): Completion {
  const text = answerText(a);
  const calls: ToolCall[] = answerCalls(a).map((t) => ({ id: t.id, type: "function", function: { name: t.name, arguments: t.arguments } }));
  const message: Completion["choices"][0]["message"] = { role: "assistant", content: text || (calls.length ? null : "") };
  if (calls.length) message.tool_calls = calls;
  return { id: a.id, object: "chat.completion", created: a.created, model: a.model, choices: [{ index: 0, message, finish_reason: a.finish, logprobs: null }] };
}

/** Passes an OpenAI stream through byte for byte, parsing only the events that carry usage, an error or [DONE]. */
class ChatTap implements Tap {
  usage: Usage | undefined;
  done = false;
  error: ErrorInfo | undefined;
  #includeUsage: boolean;
  #meta: { id?: string; created?: number; model?: string } | undefined;
  constructor(includeUsage: boolean) { this.#includeUsage = includeUsage; }

  feed(raw: Buffer): Buffer | string | null {
    const s = raw.toString(); // decoding a short event and one regex cost ~0.1 µs: less than three Buffer.indexOf calls
    if (/"usage"\s*:\s*\{|"error"\s*:|"object"\s*:\s*"error"|\[DONE\]/.test(s)) return this.#inspect(s, raw);
    return raw;
  }

  #inspect(s: string, raw: Buffer): Buffer | string | null {
    const ev = parseSseEvent(s);
    if (!ev) return raw;
    if (ev.data.trim() === "[DONE]") { this.done = true; return null; }
    const json = parseJson(ev.data) as Record<string, any> | undefined;
    if (!json || typeof json !== "object") return raw;
    if (json.error || json.object === "error") { this.error = errorInfoFrom(500, ev.data); return null; }
    const usage = json.usage ?? json.choices?.[0]?.usage; // Kimi puts it inside the final choice
    if (!isObj(usage)) return raw;
    // one definition of the request's usage: the last the upstream sends, read by the log and by the client's usage chunk alike
    this.usage = usageFromOpenAI(usage);
    this.#meta = { id: json.id, created: json.created, model: json.model };
    if (!(Array.isArray(json.choices) && json.choices.length === 0)) return raw;
    return null; // the usage-only chunk goes out once, at [DONE], with the cost
  }

  /** The usage chunk the client asked for (once, at the end), with the exact cost, then [DONE]. */
  end(u: Usage, cost: number): string {
    const { id, created, model } = this.#meta ?? {};
    return (this.#includeUsage ? usageChunk(id, created, model, u, cost) : "") + SSE_DONE;
  }

  fail(err: TwError): string { return sseData(err.body()); }
}

/** Hub events to chat-completion chunks; tool calls are indexed in the order they began. */
class ChatEncoder implements Encoder {
  #includeUsage: boolean; #created: number; #id = ""; #model = ""; #tools = 0;
  constructor(includeUsage: boolean, m: Model, now: number) { this.#includeUsage = includeUsage; this.#created = Math.floor(now / 1000); this.#model = m.id; }

  #chunk(delta: Record<string, unknown>, finish: string | null = null): string {
    return sseData({ id: this.#id, object: "chat.completion.chunk", created: this.#created, model: this.#model, choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }] });
  }

  event(e: HubEvent): string {
    switch (e.type) {
      case "start": this.#id = e.id; this.#model = e.model; return this.#chunk({ role: "assistant", content: "" });
      case "text": return this.#chunk({ content: e.text });
      case "tool": return this.#chunk({ tool_calls: [{ index: this.#tools++, id: e.id, type: "function", function: { name: e.name, arguments: "" } }] });
      case "args": return this.#chunk({ tool_calls: [{ index: e.tool, function: { arguments: e.text } }] });
      case "finish": return this.#chunk({}, e.reason);
      default: return ""; // thinking, signatures: not part of this format
    }
  }

  end(u: Usage, cost: number): string { return (this.#includeUsage ? usageChunk(this.#id, this.#created, this.#model, u, cost) : "") + SSE_DONE; }
  fail(err: TwError): string { return sseData(err.body()); }
}

const chatEntry: Entry = {
  format: "chat",
  parse(body, text) {
    const hub = validateChatRequest(body);
    return { hub, body: hub, text, stream: hub.stream === true, forward: {} };
  },
  native: (p) => p.kind === "openai",
  relaysErrors: false,
  nativeRequest(job, m) {
    const { body, changed } = openAIRequest(job.p.hub, m, job.p.stream);
    return { url: `${m.provider.baseUrl}/chat/completions`, headers: openAIHeaders(m), body: changed ? JSON.stringify(body) : job.p.text };
  },
  nativeJson(text, ctx) {
    const c = parseJson(text) as Completion | undefined;
    if (!isObj(c) || !Array.isArray(c.choices)) throw new TwError(502, "bad_upstream_response", "Upstream answered 200 without a chat completion in its body.");
    const content = c.choices[0]?.message?.content;
    return { usage: usageFromOpenAI(c.usage), outputChars: typeof content === "string" ? content.length : 0, body: (u, cost) => JSON.stringify(withRouting(c, u, cost, ctx)) };
  },
  nativeTap: (p) => new ChatTap(p.hub.stream_options?.include_usage === true),
  encode: (a, ctx, u, cost) => withRouting(completionOf(a), u, cost, ctx),
  encoder: (p, m, now) => new ChatEncoder(p.hub.stream_options?.include_usage === true, m, now),
  error: (err) => ({ status: err.status, body: err.body() }),
};

// ---- Anthropic Messages (Claude Code, the Anthropic SDKs) ----

const ANTHROPIC_ERRORS: Record<number, string> = {
  400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error", 404: "not_found_error",
  405: "invalid_request_error", 413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error",
};

/** TokenWatch's own error in Anthropic's shape; every candidate overloaded (529, 503) is Anthropic's own 529, which its clients retry. */
export function anthropicError(err: TwError): { status: number; body: unknown } {
  const overloaded = err.code === "upstream_failed" && Boolean(err.attempts?.length) && err.attempts!.every((a) => a.status === 529 || a.status === 503);
  const status = overloaded ? 529 : err.status;
  const type = Object.hasOwn(ANTHROPIC_ERRORS, status) ? ANTHROPIC_ERRORS[status] : status >= 500 ? "api_error" : "invalid_request_error";
  return { status, body: { type: "error", error: { type, message: err.message } } };
}

const STOP_OF: Record<Finish, string> = { stop: "end_turn", length: "max_tokens", tool_calls: "tool_use", content_filter: "refusal" };

/** The hub's answer as an Anthropic message: blocks in order, tool ids Anthropic accepts, the four usage counters. */
export function messageOf(a: Answer, u: Usage): Record<string, unknown> {
  const content = a.parts.flatMap((p): Block[] => {
    if (p.type === "text") return p.text ? [{ type: "text", text: p.text }] : [];
    if (p.type === "thinking") return [{ type: "thinking", thinking: p.text, signature: p.signature }];
    if (p.type === "redacted_thinking") return [{ type: "redacted_thinking", data: p.data }];
    const input = parseJson(p.arguments);
    return [{ type: "tool_use", id: toolId(p.id), name: p.name, input: isObj(input) ? input : {} }];
  });
  return { id: a.id.startsWith("msg_") ? a.id : `msg_${toolId(a.id)}`, type: "message", role: "assistant", model: a.model, content, stop_reason: STOP_OF[a.finish], stop_sequence: null, usage: anthropicUsage(u) };
}

/** Passes an Anthropic stream through byte for byte, reading only the events that carry usage, the end or an error. */
class MessagesTap implements Tap {
  usage: Usage | undefined;
  done = false;
  error: ErrorInfo | undefined;
  #last: Buffer | undefined;

  feed(raw: Buffer): Buffer | null {
    // every Anthropic event names itself first: most are content deltas, which need no parse
    if (raw.toString("latin1", 0, 20).startsWith("event: content_block") || raw.toString("latin1", 0, 11) === "event: ping") return raw;
    const ev = parseSseEvent(raw.toString());
    const data = ev && (parseJson(ev.data) as Record<string, any> | undefined);
    if (!data || typeof data !== "object") return raw;
    if (data.type === "message_start") this.usage = usageFromAnthropic(data.message?.usage);
    else if (data.type === "message_delta") this.usage = usageFromAnthropic(data.usage, this.usage);
    else if (data.type === "message_stop") { this.done = true; this.#last = raw; return null; }
    else if (data.type === "error") { this.error = { message: String(data.error?.message ?? "Upstream stream error"), type: String(data.error?.type ?? "api_error"), code: null }; return null; }
    return raw;
  }

  end(): Buffer | string { return this.#last ?? ""; }
  fail(err: TwError): string { return anthropicEvent("error", anthropicError(err).body); }
}

const anthropicEvent = (name: string, data: unknown) => `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`;

/**
 * Hub events to Anthropic's stream, in the order its SDK enforces: message_start once; blocks indexed
 * 0, 1, 2… in start order, one open at a time; tool arguments as input_json_delta; the stop reason held
 * until message_delta, which carries the usage; message_stop.
 */
class MessagesEncoder implements Encoder {
  #m: Model; #open: "text" | "thinking" | "tool" | undefined; #index = -1; #tool = -1; #signature = ""; #stop: Finish = "stop";
  constructor(m: Model) { this.#m = m; }

  #block(block: Record<string, unknown>): string {
    const out = this.#close();
    this.#index++;
    this.#open = block.type === "tool_use" ? "tool" : block.type === "thinking" ? "thinking" : block.type === "text" ? "text" : undefined;
    const start = anthropicEvent("content_block_start", { type: "content_block_start", index: this.#index, content_block: block });
    return out + start + (this.#open ? "" : anthropicEvent("content_block_stop", { type: "content_block_stop", index: this.#index }));
  }

  #close(): string {
    if (!this.#open) return "";
    let out = "";
    if (this.#open === "thinking") out += anthropicEvent("content_block_delta", { type: "content_block_delta", index: this.#index, delta: { type: "signature_delta", signature: this.#signature || `${OWN_SIGNATURE}${this.#m.provider.id}` } });
    this.#open = undefined;
    this.#signature = "";
    return out + anthropicEvent("content_block_stop", { type: "content_block_stop", index: this.#index });
  }

  #delta(delta: Record<string, unknown>): string {
    return anthropicEvent("content_block_delta", { type: "content_block_delta", index: this.#index, delta });
  }

  event(e: HubEvent): string {
    switch (e.type) {
      case "start": return anthropicEvent("message_start", { type: "message_start", message: { id: e.id.startsWith("msg_") ? e.id : `msg_${toolId(e.id)}`, type: "message", role: "assistant", model: e.model, content: [], stop_reason: null, stop_sequence: null, usage: anthropicUsage({ input: 0, cached: 0, cache_write: 0, output: 0 }) } });
      case "text": return (this.#open === "text" ? "" : this.#block({ type: "text", text: "" })) + this.#delta({ type: "text_delta", text: e.text });
      case "thinking": return (this.#open === "thinking" ? "" : this.#block({ type: "thinking", thinking: "", signature: "" })) + this.#delta({ type: "thinking_delta", thinking: e.text });
      case "signature": this.#signature = e.signature; return "";
      case "redacted": return this.#block({ type: "redacted_thinking", data: e.data });
      case "tool": this.#tool++; return this.#block({ type: "tool_use", id: toolId(e.id), name: e.name, input: {} });
      // a fragment of a call that is no longer open (an upstream interleaving calls) cannot be placed: blocks cannot reopen
      case "args": return this.#open === "tool" && e.tool === this.#tool ? this.#delta({ type: "input_json_delta", partial_json: e.text }) : "";
      case "finish": this.#stop = e.reason; return this.#close();
    }
  }

  end(u: Usage): string {
    const { cache_creation: _, ...usage } = anthropicUsage(u);
    return this.#close() + anthropicEvent("message_delta", { type: "message_delta", delta: { stop_reason: STOP_OF[this.#stop], stop_sequence: null }, usage }) + anthropicEvent("message_stop", { type: "message_stop" });
  }

  fail(err: TwError): string { return this.#close() + anthropicEvent("error", anthropicError(err).body); }
}

/** Thinking blocks TokenWatch signed (another provider's reasoning) in a Messages body: Anthropic would refuse their signatures. */
const OWN_THINKING = /"signature"\s*:\s*"tw:/;

/**
 * Remove the thinking TokenWatch signed from a Messages body for Anthropic. Where that leaves an
 * assistant tool-use turn without thinking while thinking is on, thinking is turned off for this
 * request: Anthropic refuses such a turn ("a final assistant message must start with a thinking block").
 */
function dropOwnThinking(body: Record<string, any>): void {
  let bare = false;
  for (const m of Array.isArray(body.messages) ? body.messages : []) {
    if (m?.role !== "assistant" || !Array.isArray(m.content)) continue;
    m.content = m.content.filter((b: Record<string, unknown>) => !(b?.type === "thinking" && typeof b.signature === "string" && b.signature.startsWith(OWN_SIGNATURE)));
    if (m.content.some((b: Block) => b?.type === "tool_use") && !["thinking", "redacted_thinking"].includes(m.content[0]?.type)) bare = true;
  }
  if (bare && isObj(body.thinking) && body.thinking.type !== "disabled") delete body.thinking;
}

const messagesEntry: Entry = {
  format: "messages",
  parse: (body, text, headers) => parseMessages(body, text, headers),
  native: (p) => p.kind === "anthropic",
  relaysErrors: true,
  nativeRequest(job, m) {
    const { body, text, forward } = job.p;
    const mark = m.provider.promptCache && !text.includes('"cache_control"');
    let out: string;
    if (mark || "complexity" in body || OWN_THINKING.test(text)) {
      const b = JSON.parse(text) as Record<string, any>; // a fresh copy: a failover may send the original elsewhere
      delete b.complexity;
      dropOwnThinking(b);
      if (mark) markCacheBreakpoints(b as AnthropicPrompt);
      out = JSON.stringify({ ...b, model: m.id });
    } else out = body.model === m.id ? text : withModel(text, m.id);
    return { url: `${m.provider.baseUrl}/v1/messages`, headers: anthropicHeaders(m, forward), body: out };
  },
  nativeJson(text) {
    const json = parseJson(text) as Record<string, any> | undefined;
    if (!isObj(json) || !Array.isArray(json.content)) throw new TwError(502, "bad_upstream_response", "Upstream answered 200 without a message in its body.");
    const chars = json.content.reduce((n: number, b: Record<string, any>) => n + (typeof b?.text === "string" ? b.text.length : 0), 0);
    return { usage: usageFromAnthropic(json.usage), outputChars: chars, body: () => text };
  },
  nativeTap: () => new MessagesTap(),
  encode: (a, _ctx, u) => messageOf(a, u),
  encoder: (_p, m) => new MessagesEncoder(m),
  error: anthropicError,
};

// ---- reading a Messages request: checked like Anthropic checks it, then into the hub's shape ----

const bada = (message: string, param: string | null = null) => bad(message, param);

function checkMessagesBody(b: Record<string, any>, counting: boolean): void {
  if (typeof b.model !== "string" || !MODEL_NAME.test(b.model)) throw bada(`model: give a model name (at most 256 visible ASCII characters), such as "claude-sonnet-5" or "auto"; got ${shown(b.model)}.`, "model");
  if (!counting && !(Number.isInteger(b.max_tokens) && b.max_tokens >= 0 && b.max_tokens <= 10_000_000)) throw bada(`max_tokens: Field required, a whole number: the most tokens the answer may take, such as 4096; got ${shown(b.max_tokens)}.`, "max_tokens");
  if (!Array.isArray(b.messages) || b.messages.length === 0) throw bada("messages: give a non-empty list of {\"role\", \"content\"} turns.", "messages");
  if (b.messages.length > 100_000) throw bada("messages: more than 100,000 turns.", "messages");
  b.messages.forEach((m: unknown, i: number) => {
    if (!isObj(m) || !["user", "assistant", "system"].includes(String(m.role))) throw bada(`messages.${i}.role: must be "user" or "assistant"; got ${shown(isObj(m) ? m.role : m)}.`, "messages");
    if (typeof m.content !== "string" && !(Array.isArray(m.content) && m.content.every((x) => isObj(x) && typeof x.type === "string")))
      throw bada(`messages.${i}.content: give a string or a list of content blocks, each with a "type".`, "messages");
  });
  if (b.system !== undefined && typeof b.system !== "string" && !(Array.isArray(b.system) && b.system.every((x: unknown) => isObj(x) && x.type === "text" && typeof x.text === "string")))
    throw bada("system: give a string or a list of {\"type\": \"text\", \"text\"} blocks.", "system");
  if (b.tools !== undefined && !(Array.isArray(b.tools) && b.tools.every((t: unknown) => isObj(t) && typeof t.name === "string")))
    throw bada("tools: give a list of tools, each with a \"name\" (and an \"input_schema\", or the \"type\" of a server tool).", "tools");
  if (b.stream !== undefined && typeof b.stream !== "boolean") throw bada("stream: must be true or false.", "stream");
  if (b.complexity !== undefined && b.complexity !== "simple" && b.complexity !== "complex") throw bada(`complexity: must be "simple" or "complex"; got ${shown(b.complexity)}.`, "complexity");
  for (const k of ["temperature", "top_p"]) if (b[k] !== undefined && !(typeof b[k] === "number" && b[k] >= 0 && b[k] <= 1)) throw bada(`${k}: must be a number from 0 to 1; got ${shown(b[k])}.`, k);
  if (b.stop_sequences !== undefined && !(Array.isArray(b.stop_sequences) && b.stop_sequences.every((s: unknown) => typeof s === "string"))) throw bada("stop_sequences: give a list of strings.", "stop_sequences");
  if (b.tool_choice !== undefined && !(isObj(b.tool_choice) && ["auto", "any", "tool", "none"].includes(String(b.tool_choice.type)))) throw bada("tool_choice: give {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}.", "tool_choice");
}

/** A server tool (web search, code execution…) runs at Anthropic: only an Anthropic upstream can serve the request. */
const isServerTool = (t: Record<string, unknown>) => typeof t.type === "string" && t.type !== "custom";

/** A tool_result's content as text, and the images it holds (Chat tool messages take text only: images follow as a user message). */
function toolResultOf(b: Record<string, any>): { text: string; images: ContentPart[] } {
  const blocks: Record<string, any>[] = typeof b.content === "string" ? [{ type: "text", text: b.content }] : Array.isArray(b.content) ? b.content : [];
  const text = blocks.filter((x) => x?.type === "text").map((x) => String(x.text)).join("\n");
  const images = blocks.filter((x) => x?.type === "image").map((x) => imagePart(x)).filter((x): x is ContentPart => x !== undefined);
  return { text: (b.is_error ? "Error: " : "") + text, images };
}

/** An Anthropic image or document block as a hub part (a data URL, or the URL itself). */
function imagePart(b: Record<string, any>): ContentPart | undefined {
  const s = isObj(b.source) ? b.source as Record<string, any> : {};
  const url = s.type === "base64" ? `data:${s.media_type};base64,${s.data}` : s.type === "url" ? String(s.url) : undefined;
  if (!url) return undefined;
  if (b.type === "document") return { type: "file", file: { filename: String(b.title ?? "document.pdf"), file_data: url } };
  return { type: "image_url", image_url: { url } };
}

/** One Anthropic turn to hub messages: tool results become tool messages (first), the rest one user or assistant message. */
function hubTurn(m: Record<string, any>): ChatMessage[] {
  if (typeof m.content === "string") return [{ role: m.role, content: m.content }];
  const blocks = m.content as Record<string, any>[];
  const out: ChatMessage[] = [], parts: ContentPart[] = [], calls: ToolCall[] = [], after: ContentPart[] = [];
  for (const b of blocks) {
    if (b.type === "text" && typeof b.text === "string") parts.push({ type: "text", text: b.text });
    else if (b.type === "image" || b.type === "document") { const p = imagePart(b); if (p) parts.push(p); }
    else if (b.type === "thinking") parts.push({ type: "thinking", thinking: String(b.thinking ?? ""), signature: String(b.signature ?? "") });
    else if (b.type === "tool_use") calls.push({ id: String(b.id), type: "function", function: { name: String(b.name), arguments: JSON.stringify(b.input ?? {}) } });
    else if (b.type === "tool_result") {
      const r = toolResultOf(b);
      out.push({ role: "tool", tool_call_id: String(b.tool_use_id), content: r.text });
      after.push(...r.images);
    }
    // redacted thinking, server tool calls and their results only mean something to Anthropic, which gets the body as it came
  }
  if (m.role === "assistant") {
    if (parts.length || calls.length) out.push({ role: "assistant", content: parts.length ? parts : null, ...(calls.length ? { tool_calls: calls } : {}) });
  } else if (parts.length || after.length) out.push({ role: m.role === "system" ? "system" : "user", content: [...after, ...parts] });
  return out;
}

/** An Anthropic tool as a hub function tool (its schema as it is: OpenAI takes JSON Schema too). */
const hubTool = (t: Record<string, any>) => ({ type: "function", function: { name: t.name, ...(t.description ? { description: t.description } : {}), parameters: t.input_schema ?? { type: "object", properties: {} } } });

function hubToolChoice(tc: Record<string, any> | undefined): ChatRequest["tool_choice"] {
  if (!tc) return undefined;
  return tc.type === "any" ? "required" : tc.type === "none" ? "none" : tc.type === "tool" ? { type: "function", function: { name: String(tc.name) } } : "auto";
}

/** A Messages request in the hub's shape: what an OpenAI-compatible upstream is built from. */
export function messagesToHub(b: Record<string, any>): ChatRequest {
  const system = typeof b.system === "string" ? b.system : Array.isArray(b.system) ? b.system.map((x: { text: string }) => x.text).join("\n\n") : "";
  const messages: ChatMessage[] = system ? [{ role: "system", content: system }] : [];
  for (const m of b.messages) messages.push(...hubTurn(m));
  const tools = (b.tools ?? []).filter((t: Record<string, unknown>) => !isServerTool(t)).map(hubTool);
  const hub: ChatRequest = { model: b.model, messages, max_completion_tokens: b.max_tokens, stream: b.stream === true };
  if (tools.length) {
    hub.tools = tools;
    const choice = hubToolChoice(b.tool_choice);
    if (choice) hub.tool_choice = choice;
    if (b.tool_choice?.disable_parallel_tool_use === true) hub.parallel_tool_calls = false;
  }
  for (const k of ["temperature", "top_p"] as const) if (typeof b[k] === "number") hub[k] = b[k];
  if (b.stop_sequences?.length) hub.stop = b.stop_sequences.slice(0, 4);
  if (isObj(b.output_config?.format) && b.output_config.format.type === "json_schema") hub.response_format = { type: "json_schema", json_schema: { name: "answer", schema: b.output_config.format.schema } };
  if (b.complexity) hub.complexity = b.complexity;
  return hub;
}

function parseMessages(body: unknown, text: string, headers: IncomingMessage["headers"]): Parsed {
  if (!isObj(body)) throw bada("The request body must be a JSON object with \"model\", \"max_tokens\" and \"messages\".");
  checkMessagesBody(body, false);
  const server = (body.tools as Record<string, unknown>[] | undefined)?.filter(isServerTool).map((t) => String(t.name)) ?? [];
  const forward: Record<string, string> = {};
  for (const h of ["anthropic-version", "anthropic-beta"]) { const v = headers[h]; if (typeof v === "string" && v) forward[h === "anthropic-version" ? "version" : "beta"] = v; }
  return {
    hub: messagesToHub(body), body, text, stream: body.stream === true, forward,
    ...(server.length ? { nativeOnly: `it uses server tools only Anthropic can run (${server.join(", ")})` } : {}),
  };
}

// ---- OpenAI Responses (Codex, the OpenAI Agents SDK, the Vercel AI SDK) ----

/** A response TokenWatch keeps so that a later request may point at it (previous_response_id, item_reference). */
export type KeptResponse = { id: string; previous: string | null; input: Item[]; output: Item[]; native: boolean };
type Item = Record<string, any>;

/** What the Responses entry reads from the response store; the HTTP edge gives it the store. */
export type ResponseLookup = { response(id: string): KeptResponse | undefined; item(id: string): Item | undefined };

/** Built-in tools only OpenAI runs; Codex declares web_search (and tool_search) on every request, so those two are dropped elsewhere. */
const DROPPABLE_TOOLS = new Set(["web_search", "web_search_preview", "tool_search"]);

/** Ids TokenWatch gives the items it makes (a translated answer): OpenAI does not know them. */
const OWN_ID = "tw";
const ownId = (prefix: string) => `${prefix}_${OWN_ID}${randomUUID().replaceAll("-", "")}`;
const isOwn = (id: unknown) => typeof id === "string" && id.includes(`_${OWN_ID}`);

/**
 * Reasoning a client should send back, as a Responses reasoning item carries it: an Anthropic thinking
 * signature goes in `encrypted_content` behind "twa:" (Anthropic checks it); another provider's reasoning
 * gets TokenWatch's own mark.
 */
const encryptedOf = (signature: string) => (signature.startsWith(OWN_SIGNATURE) ? signature : `twa:${signature}`);
const signatureOf = (encrypted: unknown): string | undefined =>
  typeof encrypted !== "string" ? undefined : encrypted.startsWith("twa:") ? encrypted.slice(4) : encrypted.startsWith(OWN_SIGNATURE) ? encrypted : undefined;

function checkResponsesBody(b: Record<string, any>): void {
  if (typeof b.model !== "string" || !MODEL_NAME.test(b.model)) throw bad(`"model" must be "auto", a model name, or "provider/model" (at most 256 visible ASCII characters); got ${shown(b.model)}.`, "model");
  if (typeof b.input !== "string" && !(Array.isArray(b.input) && b.input.every((x: unknown) => isObj(x))))
    throw bad("\"input\" must be a string or a list of input items (messages, function_call, function_call_output, …).", "input");
  if (Array.isArray(b.input) && b.input.length > 100_000) throw bad("\"input\" has more than 100,000 items.", "input");
  if (b.instructions !== undefined && b.instructions !== null && typeof b.instructions !== "string") throw bad("\"instructions\" must be a string.", "instructions");
  if (b.tools !== undefined && !(Array.isArray(b.tools) && b.tools.every((t: unknown) => isObj(t) && typeof t.type === "string")))
    throw bad("\"tools\" must be a list of tools, each with a \"type\" (function, custom, or a built-in tool).", "tools");
  (b.tools ?? []).forEach((t: Item, i: number) => {
    if ((t.type === "function" || t.type === "custom") && typeof t.name !== "string") throw bad(`tools[${i}].name is missing: Responses tools are flat, {"type": "${t.type}", "name", …}, not nested as in Chat Completions.`, `tools[${i}].name`);
  });
  if (b.stream !== undefined && typeof b.stream !== "boolean") throw bad("\"stream\" must be true or false.", "stream");
  if (b.max_output_tokens !== undefined && b.max_output_tokens !== null && !(Number.isInteger(b.max_output_tokens) && b.max_output_tokens > 0 && b.max_output_tokens <= 10_000_000))
    throw bad(`"max_output_tokens" must be a whole number from 1; got ${shown(b.max_output_tokens)}.`, "max_output_tokens");
  if (b.previous_response_id !== undefined && b.previous_response_id !== null && typeof b.previous_response_id !== "string") throw bad("\"previous_response_id\" must be a response id string.", "previous_response_id");
  if (b.complexity !== undefined && b.complexity !== "simple" && b.complexity !== "complex") throw bad(`"complexity" must be "simple" or "complex"; got ${shown(b.complexity)}.`, "complexity");
  for (const k of ["temperature", "top_p"]) if (b[k] !== undefined && b[k] !== null && !(typeof b[k] === "number" && b[k] >= 0 && b[k] <= (k === "top_p" ? 1 : 2))) throw bad(`"${k}" is out of range; got ${shown(b[k])}.`, k);
}

const notFound = (what: string, id: string, param: string) => new TwError(400, "previous_response_not_found",
  `${what} with id '${id}' not found: TokenWatch keeps responses for a while only when the request did not say "store": false. Send the whole conversation in "input" instead (or set "store": false in the client, so that it sends it every turn).`, { param });

/** A response's whole conversation: the chain of earlier responses (their input, then their output), oldest first. */
function chainOf(lookup: ResponseLookup, id: string, param: string): Item[] {
  const parts: Item[][] = [];
  for (let cur: string | null = id, hops = 0; cur && hops < 10_000; hops++) {
    const r = lookup.response(cur);
    if (!r) throw notFound(cur === id ? "Previous response" : "A response earlier in the chain", cur, param);
    parts.unshift([...r.input, ...r.output]);
    cur = r.previous;
  }
  return parts.flat();
}

/**
 * The request's input with its state resolved: a string as one user message, item references replaced by
 * the items they name, and the earlier conversation first when it names a previous response. Throws a
 * clear 400 for what TokenWatch does not know, unless an OpenAI passthrough may still know it (`lenient`).
 */
function resolveInput(b: Record<string, any>, lookup: ResponseLookup, lenient: boolean): { items: Item[]; unknown: boolean } {
  let unknown = false;
  const items: Item[] = typeof b.input === "string" ? [{ type: "message", role: "user", content: b.input }] : b.input.map((x: Item, i: number) => {
    if (x.type !== "item_reference") return x;
    const found = typeof x.id === "string" ? lookup.item(x.id) : undefined;
    if (found) return found;
    if (lenient) { unknown = true; return x; }
    throw notFound("Item", String(x.id), `input[${i}]`);
  });
  if (typeof b.previous_response_id !== "string") return { items, unknown };
  try { return { items: [...chainOf(lookup, b.previous_response_id, "previous_response_id"), ...items], unknown }; } catch (e) {
    if (lenient) return { items, unknown: true };
    throw e;
  }
}

/** Text of a Responses content (a string, or parts of input_text / output_text / refusal). */
const itemText = (c: unknown): string => (typeof c === "string" ? c : Array.isArray(c) ? c.map((p: Item) => (typeof p?.text === "string" ? p.text : typeof p?.refusal === "string" ? p.refusal : "")).join("") : "");

/** A Responses content part as a hub part (image and file parts keep their data). */
function responsesPart(p: Item): ContentPart | undefined {
  if (p.type === "input_text" || p.type === "output_text") return { type: "text", text: String(p.text ?? "") };
  if (p.type === "input_image" && typeof p.image_url === "string") return { type: "image_url", image_url: { url: p.image_url, ...(p.detail ? { detail: p.detail } : {}) } };
  if (p.type === "input_file" && typeof p.file_data === "string") return { type: "file", file: { file_data: p.file_data, filename: String(p.filename ?? "file.pdf") } };
  return undefined;
}

/** Builds hub messages from Responses items: consecutive calls (and the text before them) merge into one assistant turn, reasoning goes with the turn it precedes. */
class HubMessages {
  out: ChatMessage[] = [];
  #assistant: ChatMessage | undefined;
  #thinking: ContentPart[] = [];

  #turn(): ChatMessage {
    if (!this.#assistant) {
      this.#assistant = { role: "assistant", content: [...this.#thinking] };
      this.#thinking = [];
      this.out.push(this.#assistant);
    }
    return this.#assistant;
  }

  #call(id: string, name: string, args: string): void {
    const t = this.#turn();
    (t.tool_calls ??= []).push({ id, type: "function", function: { name, arguments: args } });
  }

  add(x: Item): void {
    const type = x.type ?? "message";
    if (type === "reasoning") {
      const signature = signatureOf(x.encrypted_content);
      const text = (Array.isArray(x.summary) ? x.summary : []).map((s: Item) => String(s?.text ?? "")).join("\n");
      if (signature && text) this.#thinking.push({ type: "thinking", thinking: text, signature });
      return; // OpenAI's own encrypted reasoning means nothing elsewhere
    }
    if (type === "message" && x.role === "assistant") { (this.#turn().content as ContentPart[]).push({ type: "text", text: itemText(x.content) }); return; }
    if (type === "function_call") return this.#call(String(x.call_id), String(x.name), String(x.arguments ?? ""));
    if (type === "custom_tool_call") return this.#call(String(x.call_id), String(x.name), JSON.stringify({ input: String(x.input ?? "") }));
    this.#assistant = undefined;
    if (type === "function_call_output" || type === "custom_tool_call_output") this.out.push({ role: "tool", tool_call_id: String(x.call_id), content: itemText(x.output) });
    else if (type === "message") {
      const parts = typeof x.content === "string" ? [{ type: "text", text: x.content }] : (Array.isArray(x.content) ? x.content : []).map(responsesPart).filter((p: ContentPart | undefined): p is ContentPart => p !== undefined);
      this.out.push({ role: x.role === "developer" || x.role === "system" ? "system" : "user", content: parts });
    } // built-in tool calls and their results only mean something to OpenAI, which gets the body as it came
  }

  /** The messages, with empty assistant content made null (a turn of calls only) as OpenAI wants it. */
  done(): ChatMessage[] {
    for (const m of this.out) if (m.role === "assistant" && Array.isArray(m.content) && m.content.length === 0) m.content = null;
    return this.out;
  }
}

/** A Responses tool as a hub tool: functions flat → nested, custom tools as they are, built-ins dropped (or kept off by `nativeOnly`). */
function hubToolOf(t: Item): Tool | undefined {
  if (t.type === "function") return { type: "function", function: { name: t.name, ...(t.description ? { description: t.description } : {}), parameters: t.parameters ?? { type: "object", properties: {} } } };
  if (t.type === "custom") return { type: "custom", custom: { name: t.name, ...(t.description ? { description: t.description } : {}), ...(t.format ? { format: t.format } : {}) } };
  return undefined;
}

function hubChoiceOf(tc: unknown): ChatRequest["tool_choice"] {
  if (tc === "auto" || tc === "none" || tc === "required") return tc;
  if (isObj(tc) && tc.type === "function" && typeof tc.name === "string") return { type: "function", function: { name: tc.name } };
  if (isObj(tc) && tc.type === "custom" && typeof tc.name === "string") return { type: "custom", custom: { name: tc.name } };
  return undefined;
}

/** A Responses request (its input resolved) in the hub's shape: what Anthropic and Kimi requests are built from. */
export function responsesToHub(b: Record<string, any>, items: Item[]): ChatRequest {
  const msgs = new HubMessages();
  if (typeof b.instructions === "string" && b.instructions) msgs.out.push({ role: "system", content: b.instructions });
  for (const x of items) msgs.add(x);
  const hub: ChatRequest = { model: b.model, messages: msgs.done(), stream: b.stream === true };
  const tools = (b.tools ?? []).map(hubToolOf).filter((t: Tool | undefined): t is Tool => t !== undefined);
  if (tools.length) {
    hub.tools = tools;
    const choice = hubChoiceOf(b.tool_choice);
    if (choice) hub.tool_choice = choice;
    if (typeof b.parallel_tool_calls === "boolean") hub.parallel_tool_calls = b.parallel_tool_calls;
  }
  if (typeof b.max_output_tokens === "number") hub.max_completion_tokens = b.max_output_tokens;
  for (const k of ["temperature", "top_p", "prompt_cache_key"] as const) if (b[k] !== undefined && b[k] !== null) hub[k] = b[k];
  const format = b.text?.format;
  if (isObj(format) && format.type === "json_schema") hub.response_format = { type: "json_schema", json_schema: { name: String(format.name ?? "answer"), schema: format.schema, ...(format.strict !== undefined ? { strict: format.strict } : {}) } };
  else if (isObj(format) && format.type === "json_object") hub.response_format = { type: "json_object" };
  if (typeof b.reasoning?.effort === "string") hub.reasoning_effort = b.reasoning.effort;
  if (b.complexity) hub.complexity = b.complexity;
  return hub;
}

/** Usage as the Responses API reports it: input counts its cached part, output its reasoning. */
export function responsesUsage(u: Usage): Record<string, unknown> {
  const input = u.input + u.cached + writes(u);
  return {
    input_tokens: input, input_tokens_details: { cached_tokens: u.cached, ...(writes(u) ? { cache_write_tokens: writes(u) } : {}) },
    output_tokens: u.output, output_tokens_details: { reasoning_tokens: 0 }, total_tokens: input + u.output,
  };
}

export function usageFromResponses(raw: unknown): Usage | undefined {
  if (!isObj(raw)) return undefined;
  const cached = tokenCount((raw.input_tokens_details as Item | undefined)?.cached_tokens), write = tokenCount((raw.input_tokens_details as Item | undefined)?.cache_write_tokens);
  return { input: Math.max(0, tokenCount(raw.input_tokens) - cached - write), cached, cache_write: write, output: tokenCount(raw.output_tokens) };
}

/** The fields a Response object echoes back from its request. */
function echoOf(b: Record<string, any>): Record<string, unknown> {
  return {
    instructions: b.instructions ?? null, max_output_tokens: b.max_output_tokens ?? null, metadata: b.metadata ?? {}, parallel_tool_calls: b.parallel_tool_calls ?? true,
    previous_response_id: b.previous_response_id ?? null, reasoning: b.reasoning ?? null, store: b.store ?? true, temperature: b.temperature ?? 1,
    text: b.text ?? { format: { type: "text" } }, tool_choice: b.tool_choice ?? "auto", tools: b.tools ?? [], top_p: b.top_p ?? 1, truncation: b.truncation ?? "disabled",
  };
}

/** A Response object: the skeleton every event repeats, its status, output and usage when known. */
function responseObject(id: string, created: number, model: string, body: Record<string, any>, status: string, output: Item[], usage: unknown, extra: Record<string, unknown> = {}): Item {
  return { id, object: "response", created_at: created, status, error: null, incomplete_details: null, model, output, usage, ...echoOf(body), ...extra };
}

const INCOMPLETE: Partial<Record<Finish, string>> = { length: "max_output_tokens", content_filter: "content_filter" };

/** How a translated answer ended, in the terms of a Response (status and why it is incomplete). */
const endOf = (finish: Finish) => (INCOMPLETE[finish] ? { status: "incomplete", incomplete_details: { reason: INCOMPLETE[finish] } } : { status: "completed" });

/** The names of a request's custom tools: their calls come back as custom_tool_call, their raw input out of {"input": …}. */
const customNames = (b: Record<string, any>) => new Set<string>((b.tools ?? []).filter((t: Item) => t.type === "custom").map((t: Item) => String(t.name)));

/** A tool call as a Responses item: a function call, or a custom tool's call with its raw text input. */
function callItem(id: string, callId: string, name: string, args: string, custom: boolean, status = "completed"): Item {
  if (!custom) return { id, type: "function_call", status, arguments: args, call_id: callId, name };
  const parsed = parseJson(args);
  return { id, type: "custom_tool_call", status, call_id: callId, name, input: isObj(parsed) && typeof parsed.input === "string" ? parsed.input : args };
}

/** The hub's answer as a Response object (items in order; a reasoning item carries the signature when the client asked for it). */
export function responseOf(a: Answer, body: Record<string, any>, u: Usage): Item {
  const custom = customNames(body), encrypted = Array.isArray(body.include) && body.include.includes("reasoning.encrypted_content");
  const output: Item[] = [];
  let message: Item | undefined;
  for (const p of a.parts) {
    if (p.type === "thinking") output.push({ id: ownId("rs"), type: "reasoning", summary: [{ type: "summary_text", text: p.text }], ...(encrypted ? { encrypted_content: encryptedOf(p.signature) } : {}) });
    else if (p.type === "text" && p.text) {
      if (!message) output.push((message = { id: ownId("msg"), type: "message", status: "completed", role: "assistant", content: [] }));
      message.content.push({ type: "output_text", text: p.text, annotations: [], logprobs: [] });
    } else if (p.type === "tool_call") output.push(callItem(ownId(custom.has(p.name) ? "ctc" : "fc"), p.id, p.name, p.arguments, custom.has(p.name)));
  }
  return responseObject(ownId("resp"), a.created, a.model, body, "completed", output, responsesUsage(u), endOf(a.finish));
}

/**
 * Hub events to the Responses stream, in the order the clients enforce: response.created and
 * in_progress; per item output_item.added, then its content or argument deltas, their .done events
 * and output_item.done; one terminal event with the whole output and the usage; sequence_number 0, 1, 2…
 */
class ResponsesEncoder implements Encoder {
  #body: Record<string, any>; #custom: Set<string>; #encrypted: boolean; #m: Model;
  #seq = 0; #id = ownId("resp"); #created: number; #model: string;
  #output: Item[] = []; #open: Item | undefined; #text = ""; #signature = ""; #finish: Finish = "stop";
  /** The final Response once the stream ended: the response store keeps it. */
  final: Item | undefined;

  constructor(body: Record<string, any>, m: Model, now: number) {
    this.#body = body; this.#m = m; this.#model = m.id; this.#created = Math.floor(now / 1000);
    this.#custom = customNames(body);
    this.#encrypted = Array.isArray(body.include) && body.include.includes("reasoning.encrypted_content");
  }

  #ev(type: string, data: Record<string, unknown>): string {
    return `event: ${type}\ndata: ${JSON.stringify({ type, ...data, sequence_number: this.#seq++ })}\n\n`;
  }

  #response(status: string, extra: Record<string, unknown> = {}, usage: unknown = null): Item {
    return responseObject(this.#id, this.#created, this.#model, this.#body, status, this.#output, usage, extra);
  }

  #begin(item: Item): string {
    const out = this.#close();
    this.#open = item;
    this.#text = "";
    this.#output.push(item);
    const added = this.#ev("response.output_item.added", { output_index: this.#output.length - 1, item: { ...item, ...(item.type === "message" ? { content: [] } : {}), status: "in_progress" } });
    const at = { item_id: item.id, output_index: this.#output.length - 1 };
    if (item.type === "message") return out + added + this.#ev("response.content_part.added", { ...at, content_index: 0, part: { type: "output_text", text: "", annotations: [] } });
    if (item.type === "reasoning") return out + added + this.#ev("response.reasoning_summary_part.added", { ...at, summary_index: 0, part: { type: "summary_text", text: "" } });
    return out + added;
  }

  /** Close the open item: its .done events with the whole text, then output_item.done with the whole item. */
  #close(): string {
    const item = this.#open;
    if (!item) return "";
    this.#open = undefined;
    const at = { item_id: item.id, output_index: this.#output.indexOf(item) };
    let out = "";
    if (item.type === "message") {
      const part = { type: "output_text", text: this.#text, annotations: [], logprobs: [] };
      item.content = [part];
      out += this.#ev("response.output_text.done", { ...at, content_index: 0, text: this.#text, logprobs: [] }) + this.#ev("response.content_part.done", { ...at, content_index: 0, part });
    } else if (item.type === "reasoning") {
      item.summary = [{ type: "summary_text", text: this.#text }];
      if (this.#encrypted) item.encrypted_content = encryptedOf(this.#signature || `${OWN_SIGNATURE}${this.#m.provider.id}`);
      out += this.#ev("response.reasoning_summary_text.done", { ...at, summary_index: 0, text: this.#text }) + this.#ev("response.reasoning_summary_part.done", { ...at, summary_index: 0, part: item.summary[0] });
    } else {
      Object.assign(item, callItem(item.id, item.call_id, item.name, this.#text, item.type === "custom_tool_call"));
      out += item.type === "custom_tool_call"
        ? this.#ev("response.custom_tool_call_input.delta", { ...at, delta: item.input }) + this.#ev("response.custom_tool_call_input.done", { ...at, input: item.input })
        : this.#ev("response.function_call_arguments.done", { ...at, name: item.name, arguments: item.arguments });
    }
    item.status = "completed";
    return out + this.#ev("response.output_item.done", { output_index: at.output_index, item });
  }

  event(e: HubEvent): string {
    switch (e.type) {
      case "start": this.#model = e.model; return this.#ev("response.created", { response: this.#response("in_progress") }) + this.#ev("response.in_progress", { response: this.#response("in_progress") });
      case "thinking": return (this.#open?.type === "reasoning" ? "" : this.#begin({ id: ownId("rs"), type: "reasoning", summary: [] })) + this.#delta("response.reasoning_summary_text.delta", e.text, { summary_index: 0 });
      case "signature": this.#signature = e.signature; return "";
      case "text": return (this.#open?.type === "message" ? "" : this.#begin({ id: ownId("msg"), type: "message", status: "in_progress", role: "assistant", content: [] })) + this.#delta("response.output_text.delta", e.text, { content_index: 0, logprobs: [] });
      case "tool": {
        const custom = this.#custom.has(e.name);
        return this.#begin(custom ? { id: ownId("ctc"), type: "custom_tool_call", call_id: e.id, name: e.name, input: "" } : { id: ownId("fc"), type: "function_call", call_id: e.id, name: e.name, arguments: "" });
      }
      case "args":
        if (!this.#open || (this.#open.type !== "function_call" && this.#open.type !== "custom_tool_call")) return "";
        this.#text += e.text;
        // a custom tool's raw input is only known whole (the upstream streams it as JSON): it goes out when the call closes
        return this.#open.type === "function_call" ? this.#ev("response.function_call_arguments.delta", { item_id: this.#open.id, output_index: this.#output.length - 1, delta: e.text }) : "";
      case "finish": this.#finish = e.reason; return "";
      default: return ""; // redacted thinking has no place in this format
    }
  }

  #delta(type: string, text: string, extra: Record<string, unknown>): string {
    this.#text += text;
    return this.#ev(type, { item_id: this.#open!.id, output_index: this.#output.length - 1, ...extra, delta: text });
  }

  end(u: Usage): string {
    const close = this.#close();
    const end = endOf(this.#finish);
    this.final = this.#response(end.status, end.status === "incomplete" ? { incomplete_details: end.incomplete_details } : {}, responsesUsage(u));
    return close + this.#ev(end.status === "incomplete" ? "response.incomplete" : "response.completed", { response: this.final });
  }

  fail(err: TwError): string {
    const close = this.#close();
    return close + this.#ev("response.failed", { response: this.#response("failed", { error: { code: responsesCode(err), message: err.message } }) });
  }
}

/** The error code a Responses client acts on: a prompt too long for the model keeps context_length_exceeded (Codex reads it). */
function responsesCode(err: TwError): string {
  return /context.length|prompt is too long|input token length|token limit|maximum context/i.test(err.message) ? "context_length_exceeded" : err.code;
}

/** Passes an OpenAI Responses stream through byte for byte; reads the terminal event for usage and the output the store keeps. */
class ResponsesTap implements Tap {
  usage: Usage | undefined;
  done = false;
  error: ErrorInfo | undefined;
  final: Item | undefined;
  #last: Buffer | undefined; #seq = 0; #skeleton: Item | undefined;

  feed(raw: Buffer): Buffer | null {
    this.#seq++;
    const head = raw.toString("latin1", 0, 40);
    if (!/^event: (response\.(created|completed|incomplete|failed)|error)\b/.test(head)) return raw; // deltas and item events: no parse
    const ev = parseSseEvent(raw.toString());
    const data = ev && (parseJson(ev.data) as Item | undefined);
    if (!data || typeof data !== "object") return raw;
    if (data.type === "response.created") { this.#skeleton = data.response; return raw; }
    if (data.type === "error" || data.type === "response.failed") {
      const e = data.type === "error" ? data : data.response?.error ?? {};
      this.error = { message: String(e.message ?? "The upstream's response failed"), type: "upstream_error", code: typeof e.code === "string" ? e.code : null };
      return null;
    }
    this.done = true;
    this.#last = raw;
    this.final = data.response;
    this.usage = usageFromResponses(data.response?.usage);
    return null;
  }

  end(): Buffer | string { return this.#last ?? ""; }

  fail(err: TwError): string {
    const response = { ...(this.#skeleton ?? {}), status: "failed", error: { code: responsesCode(err), message: err.message } };
    return `event: response.failed\ndata: ${JSON.stringify({ type: "response.failed", response, sequence_number: this.#seq })}\n\n`;
  }
}

/** The Responses body for OpenAI itself: TokenWatch's own items and references it resolved replaced by what OpenAI can read. */
function responsesForOpenAI(p: Parsed, m: Model): string {
  const b = p.body;
  const own = p.text.includes(`_${OWN_ID}`) || p.text.includes('"twa:') || p.text.includes(`"${OWN_SIGNATURE}`);
  if (!own && !p.expanded && !("complexity" in b)) return b.model === m.id ? p.text : withModel(p.text, m.id);
  const { complexity: _, previous_response_id: previous, ...rest } = b;
  const input = (p.expanded ?? (typeof b.input === "string" ? [{ type: "message", role: "user", content: b.input }] : b.input)) as Item[];
  const clean = input.flatMap((x): Item[] => {
    if (x.type === "reasoning" && (isOwn(x.id) || signatureOf(x.encrypted_content))) return []; // another provider's reasoning: OpenAI cannot read it
    return isOwn(x.id) ? [(({ id: _id, ...item }) => item)(x)] : [x];
  });
  return JSON.stringify({ ...rest, ...(p.expanded || previous === undefined ? {} : { previous_response_id: previous }), model: m.id, input: clean });
}

function parseResponses(body: unknown, text: string, lookup: ResponseLookup, canPassthrough: boolean): Parsed {
  if (!isObj(body)) throw bad("The request body must be a JSON object with \"model\" and \"input\".");
  const b: Record<string, any> = body;
  checkResponsesBody(b);
  const { items, unknown } = resolveInput(b, lookup, canPassthrough);
  const builtIn = (b.tools ?? []).filter((t: Item) => t.type !== "function" && t.type !== "custom").map((t: Item) => String(t.type));
  const needsOpenAI = builtIn.filter((t: string) => !DROPPABLE_TOOLS.has(t));
  const why = needsOpenAI.length ? `it uses built-in tools only OpenAI runs (${needsOpenAI.join(", ")})` : unknown ? "it refers to responses or items TokenWatch does not keep, which OpenAI may" : undefined;
  // references to TokenWatch's own answers (translated ones) must be resolved for OpenAI too; OpenAI resolves its own
  const own = isOwn(b.previous_response_id) || (Array.isArray(b.input) && b.input.some((x: Item) => x.type === "item_reference" && isOwn(x.id)));
  return {
    hub: responsesToHub(b, items), body: b, text, stream: b.stream === true, forward: {},
    ...(why ? { nativeOnly: why } : {}),
    ...(own && !unknown ? { expanded: items } : {}),
    // the store keeps this request's own input (references resolved) and links to the response before it
    keep: b.store !== false ? { previous: typeof b.previous_response_id === "string" && !unknown ? b.previous_response_id : null, input: typeof b.input === "string" ? items.slice(-1) : items.slice(-b.input.length) } : undefined,
  };
}

/** OpenAI providers that answer the Responses API themselves (its passthrough lane). */
const speaksResponses = (p: Provider) => p.kind === "openai" && p.responses === true;

function responsesEntry(lookup: ResponseLookup, config: Config): Entry {
  const canPassthrough = config.providers.some((p) => p.enabled && speaksResponses(p));
  return {
    format: "responses",
    parse: (body, text) => parseResponses(body, text, lookup, canPassthrough),
    native: speaksResponses,
    relaysErrors: true,
    nativeRequest: (job, m) => ({ url: `${m.provider.baseUrl}/responses`, headers: openAIHeaders(m), body: responsesForOpenAI(job.p, m) }),
    nativeJson(text, ctx) {
      const r = parseJson(text) as Item | undefined;
      if (!isObj(r) || !Array.isArray(r.output)) throw new TwError(502, "bad_upstream_response", "Upstream answered 200 without a response object in its body.");
      ctx.job.p.final = r;
      return { usage: usageFromResponses(r.usage), outputChars: itemText((r.output as Item[]).flatMap((x) => x.content ?? [])).length, body: () => text };
    },
    nativeTap: () => new ResponsesTap(),
    encode(a, ctx, u) { return (ctx.job.p.final = responseOf(a, ctx.job.p.body, u)); },
    encoder: (p, m, now) => new ResponsesEncoder(p.body, m, now),
    error: (err) => ({ status: err.status, body: { error: { ...err.body().error, code: responsesCode(err) } } }),
  };
}

/** The entries that need nothing but their code; the Responses entry also reads the response store (the Router makes it). */
export const ENTRIES = { chat: chatEntry, messages: messagesEntry };
// ============================================================================================
// 10. Store: node:sqlite in WAL mode behind a small interface. Rows are queued and written in one
//    transaction per tick, so no request waits on the disk; a failed write keeps its rows and retries.
// ============================================================================================

function rollupTable(name: string, bucket: "minute" | "hour"): string {
  return `CREATE TABLE IF NOT EXISTS ${name} (
  ${bucket} INTEGER NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL, complexity TEXT NOT NULL, entry TEXT NOT NULL,
  requests INTEGER NOT NULL, errors INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
  cached_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, failovers INTEGER NOT NULL,
  PRIMARY KEY (${bucket}, provider, model, complexity, entry)
) WITHOUT ROWID;`;
}

/**
 * The schema's version (PRAGMA user_version): 1 added the client format (`entry`) to the log and the
 * roll-ups; 2 added who asked (`agent`, `session`) and the roll-up per agent and session.
 */
const SCHEMA_VERSION = 2;

const SCHEMA = `
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA busy_timeout = 50;
CREATE TABLE IF NOT EXISTS requests (
  id INTEGER PRIMARY KEY,
  ts INTEGER NOT NULL,                -- ms since the epoch, when the request arrived
  provider TEXT, model TEXT,          -- who answered (or was tried last); NULL when nothing was tried
  requested_model TEXT, complexity TEXT,
  status INTEGER NOT NULL,            -- HTTP status the client got; 499 when the client went away
  stream INTEGER NOT NULL DEFAULT 0,
  input_tokens INTEGER NOT NULL DEFAULT 0,   -- the whole prompt, cached tokens included
  output_tokens INTEGER NOT NULL DEFAULT 0,
  cached_tokens INTEGER NOT NULL DEFAULT 0,  -- prompt tokens read from the provider's cache
  cache_write_tokens INTEGER NOT NULL DEFAULT 0,
  cost_usd REAL NOT NULL DEFAULT 0,
  latency_ms INTEGER, ttft_ms INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
  failover TEXT,                      -- why earlier candidates were passed over
  error TEXT, error_kind TEXT,
  entry TEXT NOT NULL DEFAULT 'chat', -- the client's format: chat, messages or responses
  agent TEXT, session TEXT            -- who asked, where known (an older row has neither)
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
-- covering indexes: latency percentiles, error groups and failover reasons never read the rows themselves
CREATE INDEX IF NOT EXISTS requests_model_latency ON requests(provider, model, ts, status, latency_ms, ttft_ms);
CREATE INDEX IF NOT EXISTS requests_error_kinds ON requests(ts, provider, error_kind) WHERE status >= 400;
CREATE INDEX IF NOT EXISTS requests_failovers ON requests(ts, failover) WHERE failover IS NOT NULL;
-- the responses a Responses client may point back at (previous_response_id, item_reference): kept for a
-- while (DEFAULTS.response_ttl_ms), apart from the log; only requests that did not say "store": false
CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, previous TEXT, input TEXT NOT NULL, output TEXT NOT NULL, native INTEGER NOT NULL, expires INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS responses_expires ON responses(expires);
CREATE TABLE IF NOT EXISTS response_items (id TEXT PRIMARY KEY, response TEXT NOT NULL, item TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS response_items_response ON response_items(response);
-- one row per minute, and one per hour, for each model and complexity: totals and charts read these,
-- never the whole log (a 7-day window reads 168 hours, not 10,080 minutes)
${rollupTable("rollup", "minute")}
${rollupTable("rollup_hour", "hour")}
-- one row per minute for each agent and session: spend by agent and the top sessions read these ('' when unknown)
CREATE TABLE IF NOT EXISTS rollup_session (
  minute INTEGER NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, last_ts INTEGER NOT NULL,
  PRIMARY KEY (minute, agent, session)
) WITHOUT ROWID;
`;

/**
 * What a budget reads its spend through: the roll-up per agent and session, by agent or session and minute
 * (a period starts on a whole minute, so the sum is exact). Indexing the roll-up, not the log, costs an insert
 * nothing. The log's own indexes of an earlier build of version 2 are dropped.
 */
const INDEXES_V2 = `
DROP INDEX IF EXISTS requests_agent_spend;
DROP INDEX IF EXISTS requests_session_spend;
CREATE INDEX IF NOT EXISTS rollup_session_agent ON rollup_session(agent, minute, cost_usd);
CREATE INDEX IF NOT EXISTS rollup_session_session ON rollup_session(session, minute, cost_usd);
`;

const INSERT_ROW = `INSERT INTO requests (ts, provider, model, requested_model, complexity, status, stream, input_tokens, output_tokens,
  cached_tokens, cache_write_tokens, cost_usd, latency_ms, ttft_ms, attempts, failover, error, error_kind, entry, agent, session)
  VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`;
const UPSERT_SESSION = `INSERT INTO rollup_session VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
  ON CONFLICT (minute, agent, session) DO UPDATE SET requests = requests + excluded.requests, errors = errors + excluded.errors,
  input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens,
  cost_usd = cost_usd + excluded.cost_usd, last_ts = MAX(last_ts, excluded.last_ts)`;
const upsertRollup = (table: "rollup" | "rollup_hour", bucket: "minute" | "hour") => `INSERT INTO ${table} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
  ON CONFLICT (${bucket}, provider, model, complexity, entry) DO UPDATE SET requests = requests + excluded.requests, errors = errors + excluded.errors,
  input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens,
  cached_tokens = cached_tokens + excluded.cached_tokens, cost_usd = cost_usd + excluded.cost_usd, failovers = failovers + excluded.failovers`;

export type Totals = { requests: number; errors: number; input_tokens: number; output_tokens: number; cached_tokens: number; cost_usd: number };

// Sums guarded against what older versions could store (a negative or infinite cost from a broken usage number)
const COST_SUM = "COALESCE(SUM(MAX(0, MIN(cost_usd, 1e9))), 0)";
const TOTALS_SQL = `COALESCE(SUM(requests), 0) AS requests, COALESCE(SUM(errors), 0) AS errors, COALESCE(SUM(MAX(0, input_tokens)), 0) AS input_tokens,
  COALESCE(SUM(MAX(0, output_tokens)), 0) AS output_tokens, COALESCE(SUM(MAX(0, cached_tokens)), 0) AS cached_tokens, ${COST_SUM} AS cost_usd`;

// The roll-up rows since :minute, each counted once: minutes up to the first whole hour (:hour), whole hours from there.
// `minute` is the start of each row's bucket, so per-hour (or coarser) series can read this too.
const ROLLUP_SINCE = `(SELECT minute, provider, model, complexity, entry, requests, errors, input_tokens, output_tokens, cached_tokens, cost_usd, failovers
  FROM rollup WHERE minute >= :minute AND minute < :hour * 60
  UNION ALL SELECT hour * 60, provider, model, complexity, entry, requests, errors, input_tokens, output_tokens, cached_tokens, cost_usd, failovers
  FROM rollup_hour WHERE hour >= :hour)`;

/** ROLLUP_SINCE's parameters; `minutesOnly` (for buckets finer than an hour) puts the first whole hour out of reach. */
function rollupSince(sinceMs: number, minutesOnly = false): { minute: number; hour: number } {
  const minute = Math.floor(sinceMs / 60_000);
  return { minute, hour: minutesOnly ? Number.MAX_SAFE_INTEGER : Math.ceil(minute / 60) };
}

type RollupSums = { minute: number; provider: string; model: string; complexity: string; entry: string; requests: number; errors: number; input: number; output: number; cached: number; cost: number; failovers: number };

/** The longest text a log row keeps of each field: names are checked on the way in, older databases may hold more. */
const ROW_TEXT = { provider: 64, model: 256, requested_model: 256, complexity: 16, failover: 500, error: 1000, error_kind: 32, agent: 64, session: 128 } as const satisfies Partial<Record<keyof Row, number>>;

const clip = (s: string | null, n: number) => (s !== null && s.length > n ? s.slice(0, n) : s);
const finite = (x: number, max: number) => (Number.isFinite(x) && x > 0 ? Math.min(x, max) : 0);

/** A row as the store keeps it: every number finite and bounded, every text of bounded length. */
function cleanRow(r: Row): Row {
  for (const k of Object.keys(ROW_TEXT) as (keyof typeof ROW_TEXT)[]) r[k] = clip(r[k], ROW_TEXT[k]);
  for (const k of ["input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens"] as const) r[k] = tokenCount(r[k]);
  r.cost_usd = finite(r.cost_usd, 1e9);
  r.latency_ms = finite(r.latency_ms, 1e10);
  if (r.ttft_ms !== null) r.ttft_ms = finite(r.ttft_ms, 1e10);
  return r;
}

/** The columns a read returns, text cut to its bound even when an older version stored more. */
const ROW_SELECT = `id, ts, entry, provider, substr(model, 1, 256) AS model, substr(requested_model, 1, 256) AS requested_model, complexity, status, stream,
  input_tokens, output_tokens, cached_tokens, cache_write_tokens, cost_usd, latency_ms, ttft_ms, attempts, substr(failover, 1, 500) AS failover,
  substr(error, 1, 1000) AS error, error_kind, agent, session`;

/** The identity of a file (device and inode), or undefined when there is none at that path. */
function fileId(path: string): { dev: number; ino: number } | undefined {
  const s = statSync(path, { throwIfNoEntry: false });
  return s ? { dev: s.dev, ino: s.ino } : undefined;
}

/** One write's rows (and responses to keep) and the promise their requests wait on: every row of one event-loop turn is committed at once. */
type Batch = { rows: Row[]; responses: KeptResponse[]; done: Promise<void>; resolve: () => void };

function newBatch(): Batch {
  let resolve!: () => void;
  const done = new Promise<void>((r) => { resolve = r; });
  return { rows: [], responses: [], done, resolve };
}

export class Store {
  readonly path: string;
  #db!: DatabaseSync;
  #insert!: StatementSync;
  #rollup!: StatementSync;
  #rollupHour!: StatementSync;
  #session!: StatementSync;
  #statements = new Map<string, StatementSync>();
  #batch = newBatch();
  #scheduled = false;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #file: { dev: number; ino: number } | undefined;
  #checkedAt = 0;
  lastError: string | null = null;
  /** What happened to the database file while TokenWatch ran (deleted and rewritten, or replaced), for /stats. */
  fileEvent: string | null = null;
  written = 0;
  /** Writes that failed (the rows stayed queued for the retry): what /metrics counts. */
  writeErrors = 0;
  /** Rows that could not be written even alone, with why: kept out of the way so that they block no other row. */
  setAside: { ts: number; reason: string }[] = [];
  setAsideCount = 0;

  #durable: boolean;

  /**
   * `durable: false` (for the benchmark that measures what group commit costs): rows are written every
   * 50 ms and answers do not wait for them, as before group commit; a crash may then lose the last 50 ms.
   */
  #responseTtl: number;
  #maxResponses: number;
  #sweptAt = 0;

  constructor(path: string, opts: { durable?: boolean; responseTtlMs?: number; maxResponses?: number } = {}) {
    this.path = path;
    this.#durable = opts.durable ?? true;
    this.#responseTtl = opts.responseTtlMs ?? DEFAULTS.response_ttl_ms;
    this.#maxResponses = opts.maxResponses ?? DEFAULTS.max_kept_responses;
    if (path !== ":memory:") mkdirSync(dirname(resolve(path)), { recursive: true });
    this.#open();
  }

  #open(): void {
    this.#db = new DatabaseSync(this.path);
    this.#db.exec(SCHEMA);
    this.#migrate();
    this.#db.exec(INDEXES_V2);
    this.#insert = this.#db.prepare(INSERT_ROW);
    this.#session = this.#db.prepare(UPSERT_SESSION);
    this.#rollup = this.#db.prepare(upsertRollup("rollup", "minute"));
    this.#rollupHour = this.#db.prepare(upsertRollup("rollup_hour", "hour"));
    this.#statements.clear();
    this.#file = this.path === ":memory:" ? undefined : fileId(this.path);
  }

  /** Bring a database written by an older version to this schema, in one transaction. */
  #migrate(): void {
    const version = (this.#db.prepare("PRAGMA user_version").get() as { user_version: number }).user_version;
    if (version >= SCHEMA_VERSION) return;
    const has = (table: string, column: string) => (this.#db.prepare(`PRAGMA table_info(${table})`).all() as { name: string }[]).some((c) => c.name === column);
    this.#transaction(() => {
      if (!has("requests", "entry")) this.#db.exec("ALTER TABLE requests ADD COLUMN entry TEXT NOT NULL DEFAULT 'chat'");
      if (!has("requests", "agent")) {
        // rows from before agents were told apart: no agent, no session; their spend shows as unattributed
        this.#db.exec(`ALTER TABLE requests ADD COLUMN agent TEXT; ALTER TABLE requests ADD COLUMN session TEXT;
          INSERT INTO rollup_session SELECT ts / 60000, '', '', COUNT(*), SUM(status >= 400), SUM(MAX(0, input_tokens)), SUM(MAX(0, output_tokens)), ${COST_SUM}, MAX(ts) FROM requests GROUP BY ts / 60000;`);
      }
      for (const [table, bucket] of [["rollup", "minute"], ["rollup_hour", "hour"]] as const) {
        if (has(table, "entry")) continue; // everything logged before formats were told apart came through Chat Completions
        this.#db.exec(`ALTER TABLE ${table} RENAME TO ${table}_old; ${rollupTable(table, bucket)}
          INSERT INTO ${table} SELECT ${bucket}, provider, model, complexity, 'chat', requests, errors, input_tokens, output_tokens, cached_tokens, cost_usd, failovers FROM ${table}_old;
          DROP TABLE ${table}_old;`);
      }
      this.#db.exec(`PRAGMA user_version = ${SCHEMA_VERSION}`);
    });
  }

  /** A read statement, prepared on first use and kept: /stats runs the same dozen every 3 seconds. */
  #stmt(sql: string): StatementSync {
    let s = this.#statements.get(sql);
    if (!s) this.#statements.set(sql, (s = this.#db.prepare(sql)));
    return s;
  }

  /**
   * Queue a row. It is committed with every other row of this event-loop turn in one transaction (group
   * commit), and the promise resolves then: a request that awaits it before its last byte has its row on
   * disk before the client has its answer, so a crash of the process loses no answered request. While the
   * database fails (disk full, locked), rows stay queued for the retry and the promise resolves at once.
   */
  add(row: Row, keep?: KeptResponse): Promise<void> {
    this.#batch.rows.push(cleanRow(row));
    if (keep && this.#responseTtl > 0) this.#batch.responses.push(keep);
    if (!this.#durable) { this.#timer ??= setTimeout(() => this.flush(), 50); return Promise.resolve(); }
    if (this.#timer) return Promise.resolve();
    if (!this.#scheduled) { this.#scheduled = true; setImmediate(() => { this.#scheduled = false; this.flush(); }); }
    return this.#batch.done;
  }

  get pending(): number { return this.#batch.rows.length; }

  /** Write every queued row now. On failure (disk full, database locked) the rows stay queued and a retry is scheduled. */
  flush(): boolean {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const batch = this.#batch;
    if (!batch.rows.length) return true;
    this.checkFile();
    this.#batch = newBatch();
    const ok = this.#commit(batch.rows, batch.responses);
    if (!ok) {
      this.#batch.rows = batch.rows.concat(this.#batch.rows);
      this.#batch.responses = batch.responses.concat(this.#batch.responses);
      this.#timer = setTimeout(() => this.flush(), 1000);
    }
    batch.resolve();
    return ok;
  }

  /** One transaction for all the rows; if it fails, each row alone, so that one bad row never holds back the others. */
  #commit(rows: Row[], responses: KeptResponse[]): boolean {
    try {
      this.#transaction(() => { for (const r of rows) this.#write(r); this.#writeRollups(rows); this.#keep(responses); });
    } catch (e) {
      const good = this.#writable(rows);
      if (good) try { this.#transaction(() => this.#keep(responses)); } catch { /* a response too odd to keep: its next request gets a clear 400 */ }
      if (!good) { this.writeErrors++; this.lastError = `Cannot write to ${this.path}: ${(e as Error).message}`; return false; }
    }
    this.written += rows.length;
    this.lastError = null;
    return true;
  }

  /**
   * Write the rows one by one (each in a savepoint) and set aside those that fail alone. When not one
   * row can be written the fault is the database's, not the rows': false, and nothing is set aside.
   */
  #writable(rows: Row[]): boolean {
    const bad: { row: Row; reason: string }[] = [];
    try {
      this.#transaction(() => {
        for (const r of rows) {
          this.#db.exec("SAVEPOINT one");
          try { this.#write(r); this.#db.exec("RELEASE one"); } catch (e) { this.#db.exec("ROLLBACK TO one"); this.#db.exec("RELEASE one"); bad.push({ row: r, reason: (e as Error).message }); }
        }
        if (bad.length === rows.length) throw new Error("no row could be written");
        this.#writeRollups(rows.filter((r) => !bad.some((b) => b.row === r)));
      });
    } catch { return false; }
    for (const b of bad) this.#putAside(b.row, b.reason);
    this.written -= bad.length;
    return true;
  }

  #putAside(row: Row, reason: string): void {
    this.setAsideCount++;
    this.setAside = [...this.setAside.slice(-19), { ts: row.ts, reason: `Cannot store the row of the request at ${new Date(row.ts).toISOString()}: ${reason}` }];
  }

  #transaction(fn: () => void): void {
    this.#db.exec("BEGIN IMMEDIATE");
    try { fn(); this.#db.exec("COMMIT"); } catch (e) {
      try { this.#db.exec("ROLLBACK"); } catch { /* no transaction was open */ }
      throw e;
    }
  }

  /**
   * Notice that the database file was deleted (or replaced) under us: every write looks at most once a
   * second, /stats each time (`force`). A deleted file is rewritten at its path from the connection still
   * open on it (SQLite's VACUUM INTO), so no row is lost; a replaced one is left alone and reported.
   */
  checkFile(force = false): void {
    if (!this.#file || (!force && Date.now() - this.#checkedAt < 1000)) return;
    this.#checkedAt = Date.now();
    const now = fileId(this.path);
    if (now && now.dev === this.#file.dev && now.ino === this.#file.ino) return;
    const when = new Date().toISOString();
    if (now) { this.fileEvent = `${this.path} was replaced by another file at ${when}: rows still go to the old one; restart TokenWatch to use the new file`; this.#file = undefined; return; }
    try {
      mkdirSync(dirname(resolve(this.path)), { recursive: true });
      const tmp = `${this.path}.recovering-${process.pid}`;
      this.#db.exec(`VACUUM INTO '${tmp.replaceAll("'", "''")}'`);
      this.#db.close();
      renameSync(tmp, this.path);
      this.#open();
      this.fileEvent = `${this.path} was deleted at ${when}: TokenWatch rewrote it from its open connection, every row kept`;
    } catch (e) {
      this.fileEvent = `${this.path} was deleted at ${when} and cannot be rewritten (${(e as Error).message}): rows go to the deleted file until TokenWatch restarts`;
      this.#file = undefined;
    }
  }

  /** Keep responses for their clients' next turns, and forget the expired ones (at most once a minute) and any past the cap. */
  #keep(responses: KeptResponse[]): void {
    if (!responses.length) return;
    const now = Date.now();
    const put = this.#stmt("INSERT OR REPLACE INTO responses (id, previous, input, output, native, expires) VALUES (?, ?, ?, ?, ?, ?)");
    const item = this.#stmt("INSERT OR REPLACE INTO response_items (id, response, item) VALUES (?, ?, ?)");
    for (const r of responses) {
      put.run(r.id, r.previous, JSON.stringify(r.input), JSON.stringify(r.output), r.native ? 1 : 0, now + this.#responseTtl);
      for (const x of [...r.input, ...r.output]) if (typeof x.id === "string") item.run(x.id, r.id, JSON.stringify(x));
    }
    if (now - this.#sweptAt < 60_000) return;
    this.#sweptAt = now;
    this.#db.prepare(`DELETE FROM responses WHERE expires < ? OR id IN (SELECT id FROM responses ORDER BY expires DESC LIMIT -1 OFFSET ${this.#maxResponses})`).run(now);
    this.#db.exec("DELETE FROM response_items WHERE response NOT IN (SELECT id FROM responses)");
  }

  /** A kept response that has not expired, or undefined. */
  response(id: string): KeptResponse | undefined {
    const r = this.#stmt("SELECT id, previous, input, output, native FROM responses WHERE id = ? AND expires >= ?").get(id, Date.now()) as { id: string; previous: string | null; input: string; output: string; native: number } | undefined;
    return r && { id: r.id, previous: r.previous, input: JSON.parse(r.input), output: JSON.parse(r.output), native: r.native === 1 };
  }

  /** An item of a kept response, by its id (what an item_reference names). */
  item(id: string): Record<string, any> | undefined {
    const r = this.#stmt("SELECT i.item FROM response_items i JOIN responses r ON r.id = i.response WHERE i.id = ? AND r.expires >= ?").get(id, Date.now()) as { item: string } | undefined;
    return r && JSON.parse(r.item);
  }

  #write(r: Row): void {
    this.#insert.run(r.ts, r.provider, r.model, r.requested_model, r.complexity, r.status, r.stream ? 1 : 0, r.input_tokens, r.output_tokens,
      r.cached_tokens, r.cache_write_tokens, r.cost_usd, r.latency_ms, r.ttft_ms, r.attempts, r.failover, r.error, r.error_kind, r.entry ?? "chat", r.agent ?? null, r.session ?? null);
  }

  /** One upsert per minute, model and complexity in the batch, not one per row: a busy tick holds hundreds of rows of one model. */
  #writeRollups(rows: Row[]): void {
    const sums = new Map<string, RollupSums>();
    for (const r of rows) {
      const minute = Math.floor(r.ts / 60_000), provider = r.provider ?? "", model = r.model ?? "", complexity = r.complexity ?? "", entry = r.entry ?? "chat";
      const key = `${minute} ${provider} ${complexity} ${entry} ${model}`; // only the model name may hold a space: it comes last
      let s = sums.get(key);
      if (!s) sums.set(key, (s = { minute, provider, model, complexity, entry, requests: 0, errors: 0, input: 0, output: 0, cached: 0, cost: 0, failovers: 0 }));
      s.requests++;
      s.errors += r.status >= 400 ? 1 : 0;
      s.input += r.input_tokens;
      s.output += r.output_tokens;
      s.cached += r.cached_tokens;
      s.cost += r.cost_usd;
      s.failovers += r.failover ? 1 : 0;
    }
    for (const s of sums.values()) {
      const values = [s.provider, s.model, s.complexity, s.entry, s.requests, s.errors, s.input, s.output, s.cached, s.cost, s.failovers];
      this.#rollup.run(s.minute, ...values);
      this.#rollupHour.run(Math.floor(s.minute / 60), ...values);
    }
    this.#writeSessionRollups(rows);
  }

  /** One upsert per minute, agent and session in the batch: a tick holds many rows of few sessions. */
  #writeSessionRollups(rows: Row[]): void {
    const sums = new Map<string, [number, string, string, number, number, number, number, number, number]>();
    for (const r of rows) {
      const minute = Math.floor(r.ts / 60_000), agent = r.agent ?? "", session = r.session ?? "";
      const key = `${minute}\0${agent}\0${session}`;
      let x = sums.get(key);
      if (!x) sums.set(key, (x = [minute, agent, session, 0, 0, 0, 0, 0, 0]));
      x[3]++;
      x[4] += r.status >= 400 ? 1 : 0;
      x[5] += r.input_tokens;
      x[6] += r.output_tokens;
      x[7] += r.cost_usd;
      x[8] = Math.max(x[8], r.ts);
    }
    for (const x of sums.values()) this.#session.run(...x);
  }

  /**
   * What the log holds as spent since a time: everything, one agent's, or one session's (what a budget starts
   * from). The rows still queued count too, read where they wait: a budget's first look needs no commit.
   */
  spend(scope: { agent?: string; session?: string }, sinceMs: number): number {
    const [col, value] = scope.agent !== undefined ? ["agent", scope.agent] : scope.session !== undefined ? ["session", scope.session] : [undefined, undefined];
    const minute = Math.floor(sinceMs / 60_000);
    let queued = 0;
    for (const r of this.#batch.rows) if (r.ts >= minute * 60_000 && (!col || (r[col as "agent" | "session"] ?? "") === value)) queued += r.cost_usd;
    if (!col) return this.totals(sinceMs).cost_usd + queued;
    return (this.#stmt(`SELECT ${COST_SUM} AS c FROM rollup_session WHERE ${col} = ? AND minute >= ?`).get(value!, minute) as { c: number }).c + queued;
  }

  /** Requests, tokens and spend per agent since a time, busiest first ('' is the requests no agent was known for). */
  byAgent(sinceMs: number, limit = 50): { agent: string; requests: number; errors: number; input_tokens: number; output_tokens: number; cost_usd: number; sessions: number }[] {
    return this.#stmt(`SELECT agent, SUM(requests) AS requests, SUM(errors) AS errors, SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens,
      ${COST_SUM} AS cost_usd, COUNT(DISTINCT session) AS sessions FROM rollup_session WHERE minute >= ? GROUP BY agent ORDER BY cost_usd DESC, requests DESC LIMIT ?`).all(Math.floor(sinceMs / 60_000), limit) as never;
  }

  /** The sessions that spent most since a time, with their agent and when each was last seen. */
  topSessions(sinceMs: number, limit = 50): { session: string; agent: string; requests: number; errors: number; cost_usd: number; last_ts: number }[] {
    return this.#stmt(`SELECT session, agent, SUM(requests) AS requests, SUM(errors) AS errors, ${COST_SUM} AS cost_usd, MAX(last_ts) AS last_ts
      FROM rollup_session WHERE minute >= ? AND session != '' GROUP BY session, agent ORDER BY cost_usd DESC, requests DESC LIMIT ?`).all(Math.floor(sinceMs / 60_000), limit) as never;
  }

  totals(sinceMs = 0): Totals {
    return this.#stmt(`SELECT ${TOTALS_SQL} FROM ${ROLLUP_SINCE}`).get(rollupSince(sinceMs)) as Totals;
  }

  /** The `limit` busiest models since a time (the log may hold thousands of names: /stats shows the top ones). */
  byModel(sinceMs: number, limit = 50): (Totals & { provider: string; model: string })[] {
    return this.#stmt(`SELECT provider, substr(model, 1, 256) AS model, ${TOTALS_SQL} FROM ${ROLLUP_SINCE} GROUP BY 1, 2 ORDER BY requests DESC LIMIT :limit`)
      .all({ ...rollupSince(sinceMs), limit }) as never;
  }

  /** Sums per provider, and how many model names each answered under, since a time. */
  byProvider(sinceMs: number): (Totals & { provider: string; models: number })[] {
    return this.#stmt(`SELECT provider, COUNT(DISTINCT model) AS models, ${TOTALS_SQL} FROM ${ROLLUP_SINCE} GROUP BY provider`).all(rollupSince(sinceMs)) as never;
  }

  /** Requests per client format (chat, messages, responses) since a time. */
  entries(sinceMs: number): { entry: string; requests: number }[] {
    return this.#stmt(`SELECT entry, SUM(requests) AS requests FROM ${ROLLUP_SINCE} GROUP BY entry`).all(rollupSince(sinceMs)) as never;
  }

  routing(sinceMs: number): { complexity: string; requests: number; failovers: number }[] {
    return this.#stmt(`SELECT complexity, SUM(requests) AS requests, SUM(failovers) AS failovers FROM ${ROLLUP_SINCE} GROUP BY complexity`).all(rollupSince(sinceMs)) as never;
  }

  /** Per-minute (bucket 1) or per-hour (bucket 60) sums since a time, oldest first. */
  series(sinceMs: number, bucketMinutes: number): { b: number; requests: number; input_tokens: number; output_tokens: number; cost_usd: number }[] {
    // node:sqlite binds every JS number as REAL: without the cast, minute / 60 is a fraction and each minute its own bucket
    return this.#stmt(`SELECT minute / CAST(:bucket AS INTEGER) AS b, SUM(requests) AS requests, SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens,
      ${COST_SUM} AS cost_usd FROM ${ROLLUP_SINCE} GROUP BY b ORDER BY b`).all({ bucket: bucketMinutes, ...rollupSince(sinceMs, bucketMinutes % 60 !== 0) }) as never;
  }

  /** The latest latencies (and times to first token) of one model: percentiles read these, not the whole log. */
  latencies(provider: string, model: string, sinceMs: number, limit = 2000): { latency_ms: number; ttft_ms: number | null }[] {
    return this.#stmt("SELECT latency_ms, ttft_ms FROM requests WHERE provider = ? AND model = ? AND ts >= ? AND status < 400 ORDER BY ts DESC LIMIT ?").all(provider, model, sinceMs, limit) as never;
  }

  failoverReasons(sinceMs: number): { reason: string; count: number }[] {
    return this.#stmt("SELECT substr(failover, 1, 500) AS reason, COUNT(*) AS count FROM (SELECT failover FROM requests WHERE ts >= ? AND failover IS NOT NULL ORDER BY ts DESC LIMIT 5000) GROUP BY failover ORDER BY count DESC LIMIT 10").all(sinceMs) as never;
  }

  recent(limit = 50): Row[] {
    return this.#stmt(`SELECT ${ROW_SELECT} FROM requests ORDER BY id DESC LIMIT ?`).all(limit) as never;
  }

  errors(sinceMs: number, limit = 50): Row[] {
    return this.#stmt(`SELECT ${ROW_SELECT} FROM requests WHERE status >= 400 AND ts >= ? ORDER BY ts DESC LIMIT ?`).all(sinceMs, limit) as never;
  }

  errorGroups(sinceMs: number): { provider: string; kind: string; count: number; last_ts: number; last_message: string }[] {
    return this.#stmt(`SELECT substr(COALESCE(provider, ''), 1, 64) AS provider, substr(COALESCE(error_kind, 'error'), 1, 32) AS kind, COUNT(*) AS count, MAX(ts) AS last_ts,
      (SELECT substr(error, 1, 1000) FROM requests r2 WHERE r2.status >= 400 AND COALESCE(r2.provider, '') = COALESCE(r.provider, '') AND COALESCE(r2.error_kind, 'error') = COALESCE(r.error_kind, 'error') ORDER BY ts DESC LIMIT 1) AS last_message
      FROM (SELECT * FROM requests WHERE status >= 400 AND ts >= ? ORDER BY ts DESC LIMIT 5000) r GROUP BY 1, 2 ORDER BY last_ts DESC LIMIT 20`).all(sinceMs) as never;
  }

  count(): number {
    return (this.#stmt("SELECT COUNT(*) AS n FROM requests").get() as { n: number }).n;
  }

  /** Write what is left, then close. The last write may wait for a lock: SQLite itself retries it for 5 s. */
  close(): void {
    this.#db.exec("PRAGMA busy_timeout = 5000");
    this.flush();
    clearTimeout(this.#timer);
    this.#db.close();
  }
}

// ============================================================================================
// 11. Dispatcher: one request's way through its candidates, shared by every route that calls an
//    upstream. Reserve capacity, attempt, fail over, wait for capacity, settle the limiter with the
//    real usage. It calls upstreams with fetch and writes the answer into the client's response.
// ============================================================================================

/**
 * The client's connection: `gone` once it closed before its answer was done; `stop` is what to cancel
 * then (one thing at a time: the attempt in flight, or the wait for capacity). A plain slot rather than
 * an AbortSignal: this runs for every request, and the upstream fetch already carries one signal.
 */
export type Client = { gone: boolean; stop?: () => void };

/**
 * One client request on its way through the candidates; `attempts` are the ones that failed so far.
 * `commit` finishes its log row and resolves once the row is on disk: the dispatcher awaits it before
 * the answer's last byte, so no answered request's row can be lost to a crash.
 */
export type Job = { entry: Entry; p: Parsed; route: Route; row: Row; res: ServerResponse; client: Client; attempts: Attempt[]; commit: () => Promise<void>; overhead?: number };

export type DispatchDeps = { limiter: Capacity; fetch: typeof fetch; now: () => number };

const CLIENT_GONE = new TwError(499, "client_closed", "The client closed the connection.");

/** The routes, with what each does: the 404 text and --help are made from this list. */
export const ROUTE_DOCS: [string, string][] = [
  ["POST /v1/chat/completions", "OpenAI Chat Completions, streaming included"],
  ["POST /v1/messages", "Anthropic Messages (Claude Code, the Anthropic SDKs), streaming included"],
  ["POST /v1/messages/count_tokens", "Anthropic's token count (Anthropic's own when enabled, else an estimate)"],
  ["POST /v1/responses", "OpenAI Responses (Codex, the Agents SDK, the AI SDK), streaming included"],
  ["GET /v1/models", "the enabled models"],
  ["GET /", "the live dashboard"],
  ["GET /stats", "JSON for the dashboard and scripts (?window=1h|24h|7d|all)"],
  ["GET /health", "{\"status\":\"ok\"}"],
  ["GET /api/stats", "the same as /stats (the original tool's route)"],
  ["GET /api/limits", "the live limiter view alone (the original tool's route)"],
  ["GET /metrics", "Prometheus metrics: requests, tokens, cost, latency, limits, budgets"],
];
const OPEN_ROUTES = new Set(["GET /health", "GET /"]); // the page itself holds no data; it asks for the key
/** The routes that show everyone's traffic and spend: the admin key's alone when there is one (an agent's key opens the API routes). */
const ADMIN_ROUTES = new Set(["GET /stats", "GET /api/stats", "GET /api/limits", "GET /metrics"]);

/** Which client format a path belongs to, for errors raised before any entry read the request. */
const entryOfPath = (path: string): Entry => (path.startsWith("/v1/messages") ? messagesEntry : chatEntry);

const TIMED_OUT = Symbol("timeout");
const DRAINED = Symbol("drained");
const GAVE_UP = Symbol("gave up");   // the attempt failed before its body was read: free the connection

/** An upstream 4xx that is the client's to fix goes back as it is; 408 and 429 are the upstream's trouble. */
const passesThrough = (status: number) => status >= 400 && status < 500 && status !== 408 && status !== 429;

/** A short label for why a candidate was passed over: what the dashboard groups failovers by. */
function failLabel(status: number, timedOut = false): string {
  if (timedOut) return "timeout";
  if (status === 0) return "connection error";
  if (status === 429) return "429 rate limited";
  if (status === 529) return "529 overloaded";
  if (status === 401) return "401 key refused";
  if (status === 403) return "403 model refused";
  if (status === 408) return "408 upstream timeout";
  if (status >= 300 && status < 400) return `${status} redirect refused`;
  if (status >= 500) return `${status} upstream error`;
  return `${status} bad answer`;
}

/**
 * An attempt under watch: `refresh()` when the upstream shows life (its headers, a complete event).
 * Paused while the client is the one not reading: backpressure from the client is not an upstream stall.
 */
class Watch {
  last = Date.now();
  paused = false;
  ac: AbortController;
  constructor(ac: AbortController) { this.ac = ac; }
  refresh(): void { this.last = Date.now(); }
  pause(): void { this.paused = true; }
  resume(): void { this.paused = false; this.last = Date.now(); }
}

/**
 * One clock for every attempt's idle timeout: an attempt that shows no life for `ms` is aborted
 * (with TIMED_OUT). A stream refreshes it on every event, so this is a field write per event and one
 * sweep every ms/8 (at most a second) instead of re-arming a timer each time; the sweep stops when
 * nothing is watched. An attempt times out between `ms` and `ms` + one sweep.
 */
class Watchdog {
  #live = new Set<Watch>();
  #tick: ReturnType<typeof setInterval> | undefined;
  #ms: number;
  constructor(ms: number) { this.#ms = ms; }

  watch(ac: AbortController): Watch {
    const w = new Watch(ac);
    this.#live.add(w);
    this.#tick ??= setInterval(() => this.#sweep(), Math.min(1000, Math.max(5, this.#ms / 8)));
    return w;
  }

  done(w: Watch): void {
    this.#live.delete(w);
    if (this.#live.size === 0) { clearInterval(this.#tick); this.#tick = undefined; }
  }

  #sweep(): void {
    const t = Date.now();
    for (const w of this.#live) if (!w.paused && t - w.last >= this.#ms) { this.done(w); w.ac.abort(TIMED_OUT); }
  }
}

/** One candidate's answer being relayed to the client; `native`: on the passthrough lane (the upstream speaks the client's format). */
type Relay = { job: Job; m: Model; native: boolean; reservation: Reservation; prompt: number; resp: Response; ac: AbortController; timer: Watch; started: number };
type FailOpts = { spent?: boolean; timedOut?: boolean; code?: string; release?: boolean };
type Fail = (status: number, message: string, opts?: FailOpts) => Failure;

/** How one attempt at one candidate ended. */
type Outcome = { done: true } | Failure;
/** `spent`: not worth another try in this request; `final`: goes back to the client as it is (a plain 4xx). */
type Failure = { done: false; attempt: Attempt; spent: boolean; final?: boolean; error: TwError; timedOut: boolean };

function withAttempts(e: TwError, attempts: Attempt[]): TwError {
  e.attempts = attempts;
  return e;
}

/** Every candidate failed: 400 when none could take the request, 504 when the last timed out, else 502. */
function exhausted(fails: Failure[], attempts: Attempt[]): TwError {
  if (fails.length && fails.every((f) => f.error.status === 400)) return withAttempts(fails[0].error, attempts);
  const last = fails[fails.length - 1];
  const list = attempts.map((a) => `${a.provider}/${a.model}: ${a.status || "no answer"} ${a.error ?? ""}`.trim()).join("; ");
  return withAttempts(new TwError(last?.timedOut ? 504 : 502, last?.timedOut ? "upstream_timeout" : "upstream_failed", `Every candidate failed (${list || "none could be tried"}). Retry later, or check the providers' status.`), attempts);
}

function saturated(route: Route, until: number, t: number): TwError {
  const secs = Math.max(1, Math.ceil((until === Infinity ? 60_000 : until - t) / 1000));
  return new TwError(429, "all_providers_saturated", `Every candidate (${route.candidates.map((m) => m.id).join(", ")}) is at its rate limit: retry in ${secs} s, or raise the limits in the config.`, { headers: { "retry-after": String(secs) } });
}

function routingHeaders(m: Model, route: Route): Record<string, string> {
  // the reason too: the Anthropic and Responses formats have no place for it in their bodies (printable ASCII, as headers must be)
  const h: Record<string, string> = { "x-tokenwatch-provider": m.provider.id, "x-tokenwatch-model": m.id, "x-tokenwatch-complexity": route.complexity, "x-tokenwatch-reason": route.reason.replace(/[^\x20-\x7E]/g, "?").slice(0, 1000) };
  if (route.budget) h["x-tokenwatch-budget"] = route.budget;
  return h;
}

/** Resolve when the response may take more data or is gone (false), or after `ms` of neither (true: the client stopped reading). */
function drained(res: ServerResponse, ms: number): Promise<boolean> {
  return new Promise((done) => {
    const finish = (stalled: boolean) => { clearTimeout(timer); res.off("drain", ok); res.off("close", ok); done(stalled); };
    const ok = () => finish(false);
    const timer = setTimeout(() => finish(true), ms);
    res.on("drain", ok);
    res.on("close", ok);
  });
}

/** Every string of an upstream error, keys replaced, before anything cuts, logs or relays it. */
const scrubInfo = (e: ErrorInfo, keys: readonly string[]): ErrorInfo =>
  ({ message: scrub(e.message, keys), type: scrub(e.type, keys), code: e.code === null ? null : scrub(e.code, keys) });

export class Dispatcher {
  /** provider id -> until when its key is considered refused (a 401) */
  readonly authDown = new Map<string, number>();
  /** "provider/model" -> until when that model is refused to this key (a 403: no access to the model) */
  readonly refused = new Map<string, number>();
  #config: Config;
  #limiter: Capacity;
  #fetch: typeof fetch;
  #now: () => number;
  #watchdog: Watchdog;

  constructor(config: Config, deps: DispatchDeps) {
    this.#config = config;
    this.#limiter = deps.limiter;
    this.#fetch = deps.fetch;
    this.#now = deps.now;
    this.#watchdog = new Watchdog(config.timeout_ms);
  }

  #scrub(s: string): string { return scrub(s, this.#config.keys); }

  // ---- the routing loop: walk the candidates, wait for capacity, fail over ----

  /** Answer the job from the first candidate that can; throws a TwError when none can. */
  async dispatch(job: Job): Promise<void> {
    const { route, row, client, attempts } = job;
    const prompt = promptEstimate(job.p.text.length), asked = askedOutput(job.p.hub);
    const deadline = row.ts + this.#config.max_wait_ms;
    const spent = new Set<Model>();
    const failures: Failure[] = [];
    for (let tries = 0; tries < route.candidates.length * 4 + 4; ) {
      if (client.gone) throw CLIENT_GONE;
      const t = this.#now();
      const open = route.candidates.filter((m) => !spent.has(m) && !this.resting(m, t));
      if (!open.length) break;
      const pick = await this.#pick(open, prompt, asked, t);
      if (client.gone) { if ("model" in pick) this.#limiter.release(pick.reservation, this.#now()); throw CLIENT_GONE; } // it left while Redis decided
      if ("wait" in pick) {
        if (t >= deadline || (pick.allCooling && pick.wait > deadline)) throw saturated(route, pick.wait, t);
        await this.#capacityOrTimeout(Math.min(pick.wait, deadline) - t, client);
        continue;
      }
      tries++;
      // a failover is counted only when another attempt really follows a failure, or a candidate passed over
      const passed = [...failures.map((f) => failLabel(f.attempt.status, f.timedOut)), ...pick.passed];
      if (passed.length) row.failover = [...new Set(passed)].join(", ");
      row.provider = pick.model.provider.id;
      row.model = pick.model.id;
      row.attempts = attempts.length + 1;
      const out = await this.#attempt(job, pick.model, pick.reservation);
      if (out.done) return;
      attempts.push(out.attempt);
      if (out.final) throw withAttempts(out.error, attempts);
      failures.push(out);
      if (out.spent) spent.add(pick.model);
    }
    throw exhausted(failures, attempts);
  }

  /** A provider whose key was refused, or a model refused to the key, is not tried until its rest is over. */
  resting(m: Model, t: number): boolean {
    return (this.authDown.get(m.provider.id) ?? 0) > t || (this.refused.get(m.key) ?? 0) > t;
  }

  /**
   * Reserve the first candidate with room for this request (its prompt, and the output it asks for or
   * the model's recent answers suggest); otherwise say when to look again (and whether only cooldowns block).
   */
  async #pick(open: Model[], prompt: number, asked: number | undefined, t: number): Promise<{ model: Model; reservation: Reservation; passed: string[] } | { wait: number; allCooling: boolean }> {
    let wait = Infinity, allCooling = true;
    const passed: string[] = []; // the candidates before it without room, and which limit stopped each
    for (const m of open) {
      const asking = this.#limiter.reserve(m, { input: prompt, output: this.#limiter.outputEstimate(m.key, asked, this.#config.default_max_tokens) }, t);
      const v = asking instanceof Promise ? await asking : asking; // the local limiter answers at once: no turn of the event loop
      if (v.ok) return { model: m, reservation: v.reservation, passed };
      passed.push(v.why === "cooling" ? `${m.id} cooling down` : `${m.id} saturated (${v.why})`);
      if (v.why !== "cooling") allCooling = false;
      wait = Math.min(wait, v.until ?? t + 1000);
    }
    return { wait, allCooling };
  }

  /** Sleep until a reservation is settled somewhere (capacity may be back) or `ms` pass, whichever is first. */
  #capacityOrTimeout(ms: number, client: Client): Promise<void> {
    return new Promise((done) => {
      const finish = () => { clearTimeout(timer); stop(); client.stop = undefined; done(); };
      const timer = setTimeout(finish, Math.max(10, Math.min(ms, 1000)));
      const stop = this.#limiter.onNextChange(finish);
      client.stop = finish;
    });
  }

  // ---- a second opinion on routing ----

  /**
   * Ask the cheapest enabled model with room for a one-word verdict on a request ("classifier": "model").
   * Bounded by classifier_timeout_ms; on a timeout, an error or an answer that is neither word, no `tier`:
   * the classifier's own verdict stands. Its cost comes back to be logged against the request.
   */
  async opinion(req: ChatRequest): Promise<{ tier: Tier | undefined; model: Model; cost: number } | undefined> {
    const t = this.#now(), ask = verdictRequest(req);
    for (const m of this.#config.simpleOrder) {
      if (this.resting(m, t)) continue;
      const v = await this.#limiter.reserve(m, { input: promptEstimate(JSON.stringify(ask).length), output: 5 }, t);
      if (!v.ok) continue;
      let usage: Usage | undefined, tier: Tier | undefined;
      try {
        const up = ADAPTERS[m.provider.kind].build(ask, m, 5);
        const resp = await this.#fetch(up.url, { method: "POST", headers: up.headers, body: up.body, redirect: "manual", signal: AbortSignal.timeout(this.#config.classifier_timeout_ms) });
        if (resp.ok) {
          const a = ADAPTERS[m.provider.kind].parse(parseJson(await readCapped(resp, 65_536)), m, this.#now());
          usage = a.usage;
          const word = /\b(simple|complex)\b/i.exec(answerText(a))?.[1]?.toLowerCase();
          tier = word === "simple" || word === "complex" ? word : undefined;
        } else await resp.body?.cancel();
      } catch { /* too slow or unreachable: the classifier's verdict stands */ }
      this.#limiter.settle(v.reservation, usage && countedOf(m.provider.kind, usage), this.#now());
      const cost = usage && m.priced ? costUsd(m, usage) : 0;
      return { tier, model: m, cost };
    }
    return undefined;
  }

  // ---- one attempt at one candidate ----

  /** The failure of one attempt, its reservation handed back (unless told not to). */
  #failer(m: Model, reservation: Reservation, started: number): Fail {
    return (status, message, opts = {}) => {
      if (opts.release !== false) this.#limiter.release(reservation, this.#now());
      const msg = clip(this.#scrub(message), ROW_TEXT.error)!;
      const error = new TwError(opts.timedOut ? 504 : passesThrough(status) ? status : 502, opts.code ?? "upstream_error", msg);
      const attempt = { provider: m.provider.id, model: m.id, status, error: msg, ms: this.#now() - started };
      return { done: false, attempt, spent: opts.spent ?? true, error, timedOut: opts.timedOut ?? false };
    };
  }

  async #attempt(job: Job, m: Model, reservation: Reservation): Promise<Outcome> {
    const started = this.#now();
    const fail = this.#failer(m, reservation, started);
    const native = job.entry.native(m.provider);
    let up: UpstreamRequest;
    try { up = native ? job.entry.nativeRequest(job, m) : ADAPTERS[m.provider.kind].build(job.p.hub, m, this.#config.default_max_tokens); }
    catch (e) { if (e instanceof TwError) return { ...fail(400, e.message), error: e }; throw e; }

    const ac = new AbortController();
    job.client.stop = () => ac.abort(CLIENT_GONE);
    const timer = this.#watchdog.watch(ac);
    try {
      let resp: Response;
      // never follow a redirect: it could take the key and the prompt to another host
      try { resp = await this.#fetch(up.url, { method: "POST", headers: up.headers, body: up.body, signal: ac.signal, redirect: "manual" }); }
      catch (e) {
        if (ac.signal.reason === CLIENT_GONE) { this.#limiter.release(reservation, this.#now()); throw CLIENT_GONE; }
        const timedOut = ac.signal.reason === TIMED_OUT;
        return fail(0, timedOut ? `No answer within ${this.#config.timeout_ms} ms` : `Cannot reach ${m.provider.name}: ${((e as Error).cause as Error)?.message ?? (e as Error).message}`, { timedOut });
      }
      timer.refresh();
      const cool = coolUntil((n) => resp.headers.get(n), resp.status, this.#now(), this.#config.cooldown_ms, m.provider.kind);
      if (cool) this.#limiter.cool(m.pool, cool, this.#now());
      // the provider's own view of its limits, with what it will take back of this request's charge
      const upfront = ADAPTERS[m.provider.kind].upfrontOutput(job.p.hub, m, this.#config.default_max_tokens);
      this.#limiter.observe(m.pool, m.provider.kind, (n) => resp.headers.get(n), this.#now(), reservation, upfront);
      const relay: Relay = { job, m, native, reservation, prompt: reservation.estimate.input, resp, ac, timer, started };
      const out = await this.#answer(relay, fail);
      if (!out.done) ac.abort(GAVE_UP); // whatever is left of the body is not wanted: free the connection
      return out;
    } finally {
      this.#watchdog.done(timer);
      job.client.stop = undefined;
    }
  }

  /** What the upstream answered: an error, something that is not an answer, or an answer to relay. */
  async #answer(r: Relay, fail: Fail): Promise<Outcome> {
    const { resp, m } = r;
    if (resp.status >= 300 && resp.status < 400) {
      const to = resp.headers.get("location") ?? "";
      return fail(resp.status, `${m.provider.name} answered ${resp.status}, a redirect${to ? ` to ${shown(to)}` : ""}: TokenWatch does not follow redirects, which could carry the key elsewhere; set its base_url to the address that answers`);
    }
    if (!resp.ok) return await this.#upstreamError(r, fail);
    const type = resp.headers.get("content-type");
    if (r.job.p.stream && type && !/^text\/event-stream\b/i.test(type))
      return fail(502, `${m.provider.name} answered a stream request with ${shown(type)} instead of an event stream`);
    return r.job.p.stream ? await this.#relayStream(r, fail) : await this.#relayJson(r, fail);
  }

  /**
   * A non-2xx answer: 429 cools the model, 401 rests the provider (its key was refused), 403 rests the
   * model (refused to this key), 408/5xx move on, other 4xx go back to the client. The body is read
   * within timeout_ms in all and at most 64 KB of it kept; every string in it is scrubbed first.
   */
  async #upstreamError(r: Relay, fail: Fail): Promise<Failure> {
    const { resp, m } = r;
    const text = this.#scrub(await readText(resp, 65_536).catch(() => ""));
    const info = scrubInfo(ADAPTERS[m.provider.kind].error(resp.status, text), this.#config.keys);
    const s = resp.status, t = this.#now();
    if (s === 429) return fail(s, info.message, { spent: false });
    if (s === 401) { this.authDown.set(m.provider.id, t + this.#config.auth_cooldown_ms); return fail(s, `${m.provider.name} refused the key: ${info.message}`); }
    if (s === 403) { this.refused.set(m.key, t + this.#config.auth_cooldown_ms); return fail(s, `${m.provider.name} refused ${m.id} to this key: ${info.message}`); }
    if (s === 408 || s >= 500) return fail(s, info.message);
    const error = new TwError(s, clip(info.code, 100) ?? "upstream_error", clip(info.message, ROW_TEXT.error)!, { type: clip(info.type, 100)! });
    if (r.native && r.job.entry.relaysErrors) error.raw = text; // its own client reads the upstream's own words (Claude Code's recovery does)
    return { ...fail(s, info.message), final: true, error };
  }

  /** Settle the limiter with the real usage (or the estimate when the upstream gave none) and put it on the row. */
  #account(r: Relay, usage: Usage | undefined, fallback: Usage): { usage: Usage; cost: number } {
    const u = usage ?? fallback;
    this.#limiter.settle(r.reservation, countedOf(r.m.provider.kind, u), this.#now());
    const cost = r.m.priced ? costUsd(r.m, u) : 0;
    // the row's cost is the request's: its answer, and a second opinion on its routing if one was asked (already on the row)
    Object.assign(r.job.row, { provider: r.m.provider.id, model: r.m.id, input_tokens: u.input + u.cached + writes(u), output_tokens: u.output, cached_tokens: u.cached, cache_write_tokens: writes(u), cost_usd: cost + (r.job.overhead ?? 0) });
    return { usage: u, cost };
  }

  /** An aborted read: the client left (throws), the upstream stalled, or it broke off. */
  #readFailure(r: Relay, fail: Fail, e: unknown): Failure {
    if (r.ac.signal.reason === CLIENT_GONE) { this.#limiter.release(r.reservation, this.#now()); throw CLIENT_GONE; }
    if (r.ac.signal.reason === TIMED_OUT) return fail(0, `The answer stalled for ${this.#config.timeout_ms} ms`, { timedOut: true });
    return fail(502, e instanceof TwError ? e.message : `The answer broke off: ${(e as Error).message}`);
  }

  /** The answer in one piece: the passthrough lane reads it for its usage, a translation decodes and encodes it. */
  async #relayJson(r: Relay, fail: Fail): Promise<Outcome> {
    const { job, m } = r;
    const ctx: AnswerCtx = { job, m, attempts: [...job.attempts, { provider: m.provider.id, model: m.id, status: 200, ms: this.#now() - r.started }] };
    let read: { usage: Usage | undefined; outputChars: number; body(u: Usage, cost: number): string };
    try {
      const text = await readCapped(r.resp, this.#config.max_answer_bytes);
      if (r.native) read = job.entry.nativeJson(text, ctx);
      else {
        const a = ADAPTERS[m.provider.kind].parse(parseJson(text), m, this.#now());
        read = { usage: a.usage, outputChars: answerText(a).length, body: (u, cost) => JSON.stringify(job.entry.encode(a, ctx, u, cost)) };
      }
    } catch (e) { return this.#readFailure(r, fail, e); }
    const { usage, cost } = this.#account(r, read.usage, { input: r.prompt, cached: 0, cache_write: 0, output: Math.ceil(read.outputChars / 4) });
    const body = read.body(usage, cost);
    job.row.status = 200;
    await job.commit();
    sendText(job.res, 200, body, routingHeaders(m, job.route));
    return { done: true };
  }

  /**
   * Relay a stream event by event. The watchdog times complete events, not bytes (an upstream that
   * drips bytes without ever finishing an event stalls), one event may not outgrow max_answer_bytes,
   * and the last event is held back until the request's row is committed.
   */
  async #relayStream(r: Relay, fail: Fail): Promise<Outcome> {
    const { job, m } = r;
    const tr: Tap = r.native ? job.entry.nativeTap(job.p, m) : new Translation(ADAPTERS[m.provider.kind].decoder(m, this.#now()), job.entry.encoder(job.p, m, this.#now()));
    const split = new SseSplitter(this.#config.max_answer_bytes);
    let opened = false, sentChars = 0, last: Buffer | string | null = null;
    const open = () => {
      if (opened) return;
      opened = true;
      job.row.ttft_ms = this.#now() - job.row.ts;
      job.res.writeHead(200, { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", "x-accel-buffering": "no", ...routingHeaders(r.m, job.route) });
    };
    /** Write one event; false when the client's buffer is full. */
    const send = (out: Buffer | string): boolean => { open(); sentChars += out.length; return job.res.write(out); };
    let broke: Error | undefined;
    const body = (r.resp.body as unknown as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
    try {
      for (let c = await body.next(); !c.done; c = await body.next()) {
        const events = split.push(Buffer.from(c.value.buffer, c.value.byteOffset, c.value.byteLength));
        if (events.length) r.timer.refresh();
        for (const ev of events) {
          const out = tr.feed(ev);
          if (tr.error) break;
          if (tr.done) { last = out; break; }
          if (out && !send(out)) await this.#clientReady(r); // a turn of the event loop per event only when the client is slow
        }
        if (tr.error || tr.done || split.overflow) break;
      }
    } catch (e) { broke = e as Error; }
    // no usage from upstream (a local server, or a stream cut short): estimate, the events' JSON is ~4x their text
    const fallback = { input: r.prompt, cached: 0, cache_write: 0, output: Math.ceil(sentChars / 16) };
    if (r.ac.signal.reason === CLIENT_GONE) { this.#account(r, tr.usage, fallback); throw CLIENT_GONE; }
    const timedOut = r.ac.signal.reason === TIMED_OUT;
    const info = tr.error && scrubInfo(tr.error, this.#config.keys);
    const why = split.overflow ? `An event of the stream grew past ${this.#config.max_answer_bytes} bytes (max_answer_bytes)`
      : info ? info.message : timedOut ? `The stream stalled for ${this.#config.timeout_ms} ms` : broke ? `The stream broke off: ${(broke.cause as Error)?.message ?? broke.message}` : !tr.done ? "The stream ended before it finished" : "";
    if (!opened && why) {
      if (info?.type === "rate_limit_error") this.#limiter.cool(r.m.pool, this.#now() + this.#config.cooldown_ms, this.#now());
      return fail(info ? 502 : 0, why, { timedOut });
    }
    open();
    const { usage, cost } = this.#account(r, tr.usage, fallback);
    const err = why ? new TwError(timedOut ? 504 : 502, clip(info?.code ?? null, 100) ?? "upstream_stream_error", clip(this.#scrub(why), ROW_TEXT.error)!, { type: clip(info?.type ?? null, 100) ?? undefined }) : undefined;
    Object.assign(job.row, err ? { status: err.status, error: err.message, error_kind: timedOut ? "timeout" : "stream_broken" } : { status: 200 });
    const tail = err ? tr.fail(err) : tr.end(usage, cost);
    if (tr.final) job.p.final = tr.final;
    await job.commit();
    job.res.end(last ? Buffer.concat([toBuffer(last), toBuffer(tail)]) : tail);
    if (err) r.ac.abort(GAVE_UP); // the upstream may still be sending: stop it
    if (tr.done && !broke) void drainRest(body, r.ac);
    return { done: true };
  }

  /**
   * Wait for a client that reads slower than the upstream writes. The upstream's clock stops meanwhile
   * (this is not its stall); a client that reads nothing for 5 × timeout_ms is taken as gone.
   */
  async #clientReady(r: Relay): Promise<void> {
    r.timer.pause();
    const stalled = await drained(r.job.res, 5 * this.#config.timeout_ms);
    r.timer.resume();
    if (stalled) { r.job.client.gone = true; r.ac.abort(CLIENT_GONE); r.job.res.destroy(); }
  }
}

/**
 * Read an error body, keeping at most `max` bytes: past that the rest is not read at all. No refresh
 * of the watchdog here: a body that drips a byte at a time gets timeout_ms in all, not per byte.
 */
async function readText(resp: Response, max: number): Promise<string> {
  if (!resp.body) return "";
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of resp.body as unknown as AsyncIterable<Uint8Array>) {
    chunks.push(Buffer.from(c.buffer, c.byteOffset, c.byteLength));
    size += c.byteLength;
    if (size >= max) break; // leaving the loop cancels the body
  }
  return Buffer.concat(chunks).subarray(0, max).toString("utf8");
}

/** Read a whole answer, refusing (502) one larger than `max` bytes: by its content-length at once, or as it arrives. */
async function readCapped(resp: Response, max: number): Promise<string> {
  const tooBig = (n: string) => new TwError(502, "answer_too_large", `The upstream's answer is larger than ${max} bytes (${n}; max_answer_bytes): ask for a shorter answer, or raise max_answer_bytes in the config.`);
  const declared = Number(resp.headers.get("content-length") ?? NaN);
  if (declared > max) throw tooBig(`${declared} bytes`);
  if (Number.isFinite(declared) || !resp.body) return resp.text(); // known and small enough: read in one piece
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of resp.body as unknown as AsyncIterable<Uint8Array>) {
    size += c.byteLength;
    if (size > max) throw tooBig("and still growing");
    chunks.push(Buffer.from(c.buffer, c.byteOffset, c.byteLength));
  }
  return Buffer.concat(chunks, size).toString("utf8");
}

/**
 * After the last event, read the body to its end in the background: a body left unread makes undici
 * close the connection, and the next request pays a new TCP (and TLS) handshake. Cut after a second.
 */
async function drainRest(body: AsyncIterator<Uint8Array>, ac: AbortController): Promise<void> {
  const fuse = setTimeout(() => ac.abort(DRAINED), 1000).unref();
  try { while (!(await body.next()).done); } catch { /* cut, or broke after the answer was complete */ }
  finally { clearTimeout(fuse); }
}

// ============================================================================================
// 12. HTTP edge: the `Router`, with the routes as a table: auth, the Host check, reading bodies, one
//    thin handler per route, and `#record(row)`, the one step that finishes a log row.
// ============================================================================================

export type Deps = {
  store: Store;
  fetch?: typeof fetch;
  now?: () => number;
  apiKey?: string;                 // TOKENWATCH_API_KEY: required on every route but /health
  allowedHosts?: Set<string>;      // Host headers we answer (DNS rebinding); undefined: any
  log?: (line: string) => void;
};

/** A request on its route; `agent`: the name of the agent whose key it carries. */
type Ctx = { req: IncomingMessage; res: ServerResponse; url: URL; agent?: string };
type Handler = (ctx: Ctx) => Promise<void> | void;

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  sendText(res, status, JSON.stringify(body), headers);
}

/** A JSON answer already encoded (an upstream's own text goes out as it came). */
function sendText(res: ServerResponse, status: number, text: string, headers: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed) return;
  res.writeHead(status, { "content-type": "application/json; charset=utf-8", "content-length": String(Buffer.byteLength(text)), ...headers });
  res.end(text);
}

const toBuffer = (x: string | Buffer) => (typeof x === "string" ? Buffer.from(x) : x);

const header = (req: IncomingMessage, name: string) => {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
};

/** Who a request's key says it is: the admin (TOKENWATCH_API_KEY) or an agent (its key in `keys`). */
type Caller = { admin: boolean; agent?: string };

/** The admin key's digest, made once (the key does not change while TokenWatch runs). */
let adminDigested: [string, Buffer] | undefined;
const adminDigest = (key: string) => (adminDigested?.[0] === key ? adminDigested[1] : (adminDigested = [key, digest(key)])[1]);

/**
 * The caller a request's key names, or undefined when it names none. Keys are compared in constant time
 * (hashing first hides their length too), every one of them whichever matches, so that the time taken
 * tells nothing about which key came close.
 */
function callerOf(req: IncomingMessage, adminKey: string | undefined, agentKeys: readonly AgentKey[]): Caller | undefined {
  const bearer = /^bearer[ \t]+(.+)$/i.exec(header(req, "authorization") ?? ""); // auth schemes are case-insensitive
  const given = bearer ? bearer[1].trim() : header(req, "x-api-key");
  if (given === undefined) return undefined;
  const d = digest(given);
  let agent: string | undefined;
  for (const k of agentKeys) if (timingSafeEqual(d, k.digest)) agent ??= k.agent;
  if (adminKey !== undefined && timingSafeEqual(d, adminDigest(adminKey))) return { admin: true };
  return agent !== undefined ? { admin: false, agent } : undefined;
}

/**
 * The bytes of request bodies held at once, all requests together: each 30 MB body costs several times
 * that in memory until its answer is done, so past `max` a new body is refused (503) instead of read.
 */
class BodyBudget {
  held = 0;
  #max: number;
  constructor(max: number) { this.#max = max; }
  take(n: number): boolean {
    if (this.held + n > this.#max) return false;
    this.held += n;
    return true;
  }
  give(n: number): void { this.held -= n; }
  fits(n: number): boolean { return this.held + n <= this.#max; }
}

/**
 * Read a request body, refusing it as soon as it passes `limit` bytes (413) or would take the bodies
 * held at once past the budget (503). `held.bytes` counts what this request holds: give it back at the end.
 */
function readBody(req: IncomingMessage, limit: number, budget: BodyBudget, held: { bytes: number }): Promise<Buffer> {
  const tooBig = () => new TwError(413, "body_too_large", `The request body is larger than ${limit} bytes: send less (shrink images, trim history), or raise max_body_bytes in the config.`);
  const busy = () => new TwError(503, "busy", `TokenWatch holds ${Math.round(budget.held / 1048576)} MB of request bodies already (max_inflight_body_bytes): retry in a second.`, { headers: { "retry-after": "1" } });
  const declared = Number(header(req, "content-length"));
  if (declared > limit) return Promise.reject(tooBig());
  if (declared > 0 && !budget.fits(declared)) return Promise.reject(busy());
  return new Promise((done, fail) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const stop = (e: TwError) => { req.removeAllListeners("data"); req.pause(); fail(e); };
    req.on("data", (c: Buffer) => {
      size += c.length;
      if (size > limit) return stop(tooBig());
      if (!budget.take(c.length)) return stop(busy());
      held.bytes += c.length;
      chunks.push(c);
    });
    req.on("end", () => done(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size))); // one chunk, the usual body: no copy
    req.on("error", fail);
  });
}

/**
 * Answer a request whose upload was refused (413, 503) at once, but end the response (and, with
 * `connection: close`, the connection) only once the client has finished sending: the rest of the
 * upload is read and dropped meanwhile. Closing while the client still sends makes it see a reset
 * instead of the answer. A client that sends nothing more is cut after 10 s; it has its answer by then.
 */
function refuseUpload(req: IncomingMessage, res: ServerResponse, status: number, body: unknown, headers: Record<string, string>): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json; charset=utf-8", "content-length": String(Buffer.byteLength(text)), connection: "close", ...headers });
  res.write(text);
  const finish = () => { clearTimeout(fuse); res.end(); };
  const fuse = setTimeout(finish, 10_000).unref();
  if (req.readableEnded) return finish();
  req.removeAllListeners("data");
  req.on("data", () => {}).once("end", finish).once("close", finish);
  req.resume();
}

const UTF8 = new TextDecoder("utf-8", { fatal: true });

/** Bytes to text, refusing invalid UTF-8 and an empty body. The text is kept: it is what goes upstream when nothing in it needs changing. */
export function bodyText(buf: Buffer): string {
  let text: string;
  try { text = UTF8.decode(buf); } catch { throw bad("The request body is not valid UTF-8: encode it as UTF-8 JSON."); }
  if (!text.trim()) throw bad("The request body is empty: send a JSON object with \"model\" and \"messages\".");
  return text;
}

/** More objects and arrays than any agent's request holds (a conversation of 100,000 messages with parts). */
const MAX_JSON_CONTAINERS = 500_000;

/** Text to JSON, with an error that says what is wrong: too deep, too many parts, or where the syntax breaks. */
export function parseBody(text: string): unknown {
  const shape = jsonShapeProblem(text, 64, MAX_JSON_CONTAINERS);
  if (shape === "depth") throw bad("The request body is nested more than 64 levels deep: flatten it.");
  if (shape === "containers") throw bad(`The request body holds more than ${MAX_JSON_CONTAINERS.toLocaleString("en-US")} JSON objects and arrays: send a shorter conversation.`);
  try { return JSON.parse(text); } catch (e) { throw bad(`The request body is not valid JSON (${(e as Error).message}): check quotes, commas and brackets.`); }
}

function errorKind({ status, code }: TwError): string {
  if (code === "budget_exceeded") return "budget";
  if (code === "loop_detected" && status === 429) return "loop_guard";
  return status === 429 ? "saturated" : status === 499 ? "client_closed" : status === 504 ? "timeout" : status === 508 ? "loop"
    : status >= 500 ? "upstream" : status === 401 ? "auth" : status === 413 ? "too_large" : status === 404 ? "not_found" : "bad_request";
}

/** What the response store keeps of an answered Responses request (nothing for other formats, or with "store": false). */
function keptOf(p: Parsed | undefined): KeptResponse | undefined {
  if (!p?.keep || typeof p.final?.id !== "string") return undefined;
  return { id: p.final.id, previous: p.keep.previous, input: p.keep.input, output: Array.isArray(p.final.output) ? p.final.output : [], native: !isOwn(p.final.id) };
}

const newRow = (ts: number, entry: Format): Row => ({ ts, entry, provider: null, model: null, requested_model: null, complexity: null, status: 0, stream: false, input_tokens: 0, output_tokens: 0, cached_tokens: 0, cache_write_tokens: 0, cost_usd: 0, latency_ms: 0, ttft_ms: null, attempts: 0, failover: null, error: null, error_kind: null, agent: null, session: null });

/** GET /v1/models: the enabled models, then the aliases of enabled models, in OpenAI's list shape. */
function modelList(config: Config) {
  const data = config.models.filter((m) => m.provider.enabled).map((m) => ({ id: m.id, object: "model", created: 0, owned_by: m.provider.id }));
  for (const [alias, target] of config.aliases) {
    const m = config.models.find((x) => x.id === target && x.provider.enabled);
    if (m) data.push({ id: alias, object: "model", created: 0, owned_by: m.provider.id });
  }
  return { object: "list", data };
}

/** GET /api/limits: the live limiter view only (no store query, unlike /stats). */
const limitsView = (config: Config, limiter: Capacity, t: number) =>
  ({ threshold: config.threshold, models: config.models.map((m) => ({ provider: m.provider.id, model: m.id, ...headroomOf(limiter, m, t, config.default_max_tokens) })) });

/** What every route that may call an upstream checks first: no loop back into TokenWatch, a JSON body. */
function checkUpstreamRoute(req: IncomingMessage): void {
  if (header(req, HOP)) throw new TwError(508, "loop_detected", "This request came back into TokenWatch (x-tokenwatch-hop is set): a provider's base_url points at TokenWatch itself. Point it at the real API.");
  const type = header(req, "content-type") ?? "";
  if (!/^application\/json\b/i.test(type)) throw new TwError(415, "unsupported_media_type", `Send the body as JSON with "Content-Type: application/json" (got ${shown(type || "none")}).`);
}

/**
 * The HTTP side of TokenWatch: the route table, and what each route does with a request. Calling the
 * upstreams is the dispatcher's (section 11); this holds what is shared across requests: the limiter, the
 * body budget, the count of requests being answered.
 */
export class Router {
  readonly limiter: Limiter;
  /** What decides capacity: the local limiter, or with Redis the shared one around it. */
  readonly capacity: Capacity;
  readonly shared: SharedLimiter | undefined;
  #config: Config; #deps: Deps; #store: Store; #now: () => number;
  readonly budgets: Budgets;
  readonly metrics: Metrics;
  #dispatcher: Dispatcher; #budget: BodyBudget; #view: StatsSource; #loops: LoopGuard; #sessions: Sessions;
  #active = 0; // requests being answered: what a clean shutdown waits for
  #routes: Map<string, Handler>;

  constructor(config: Config, deps: Deps) {
    this.#config = config; this.#deps = deps; this.#store = deps.store; this.#now = deps.now ?? Date.now;
    this.limiter = new Limiter(config.threshold, { min: config.min_cooldown_ms, max: config.max_cooldown_ms });
    this.shared = config.redis && new SharedLimiter(config.redis, config.threshold, this.limiter);
    this.shared?.start(config.models.filter((m) => m.provider.enabled));
    this.capacity = this.shared ?? this.limiter;
    this.#dispatcher = new Dispatcher(config, { limiter: this.capacity, fetch: deps.fetch ?? fetch, now: this.#now });
    this.#budget = new BodyBudget(config.max_inflight_body_bytes);
    // a budget's spend is the log's, the rows still queued included
    this.budgets = new Budgets(config.budgets, (scope, since) => {
      try { return this.#store.spend(scope, since); } catch { return 0; } // an unreadable log fails no request: the spend counts from here
    });
    if (this.shared) this.budgets.share(this.shared.budgetLink());
    this.#loops = new LoopGuard(config.loop_guard);
    this.#sessions = new Sessions(config.session_ttl_ms);
    this.metrics = new Metrics(config);
    this.#view = { config, store: this.#store, limiter: this.capacity, shared: this.shared, authDown: this.#dispatcher.authDown, refused: this.#dispatcher.refused, started: this.#now(), budgets: this.budgets, metrics: this.metrics, inflight: () => this.#active };
    const stats: Handler = ({ res, url }) => {
      const w = url.searchParams.get("window") ?? "24h";
      if (!Object.hasOwn(STATS_WINDOWS, w)) throw bad(`?window= must be one of 1h, 24h, 7d, all; got ${shown(w)}.`, "window");
      sendJson(res, 200, statsView(this.#view, w, this.#now()), { "cache-control": "no-store" });
    };
    const handlers: Record<string, Handler> = {
      "POST /v1/chat/completions": this.#serve(chatEntry),
      "POST /v1/messages": this.#serve(messagesEntry),
      "POST /v1/responses": this.#serve(responsesEntry(this.#store, config)),
      "POST /v1/messages/count_tokens": (ctx) => this.#countTokens(ctx),
      "GET /v1/models": ({ res }) => sendJson(res, 200, modelList(config)),
      "GET /stats": stats,
      "GET /api/stats": stats,
      "GET /api/limits": ({ res }) => sendJson(res, 200, limitsView(config, this.capacity, this.#now())),
      "GET /metrics": ({ res }) => { const text = metricsText(this.#view, this.#now()); res.writeHead(200, { "content-type": "text/plain; version=0.0.4; charset=utf-8", "cache-control": "no-store", "content-length": String(Buffer.byteLength(text)) }); res.end(text); },
      "GET /health": ({ res }) => sendJson(res, 200, { status: "ok" }),
      "GET /": ({ res }) => { res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store", "content-security-policy": DASHBOARD_CSP }); res.end(DASHBOARD_HTML); },
    };
    this.#routes = new Map(ROUTE_DOCS.map(([key]) => [key, handlers[key]]));
  }

  get inflight(): number { return this.#active; }

  stats(w = "24h") { return statsView(this.#view, w, this.#now()); }

  #scrub(s: string): string { return scrub(s, this.#config.keys); }

  /**
   * Finish a log row and hand it to the store: the one place a row is completed, failed or not. The
   * promise resolves once the row is committed (with the others of its event-loop turn).
   */
  #record(row: Row, err?: TwError, p?: Parsed): Promise<void> {
    if (err) Object.assign(row, { status: err.status, error: this.#scrub(err.message), error_kind: errorKind(err) });
    row.latency_ms = this.#now() - row.ts;
    this.metrics.record(row);
    return this.#store.add(row, err ? undefined : keptOf(p));
  }

  /**
   * The answer to a failed request: the error in its client's shape (an upstream's own error body, when
   * the client speaks the upstream's format), or nothing when the client left.
   */
  #refuse(req: IncomingMessage, res: ServerResponse, err: TwError, entry: Entry): void {
    if (err === CLIENT_GONE) return;
    if (err.raw !== undefined) return sendText(res, err.status, err.raw, err.headers);
    const { status, body } = entry.error(err);
    if (err.status === 413 || err.code === "busy") refuseUpload(req, res, status, body, err.headers);
    else sendJson(res, status, body, err.headers);
  }

  #asTwError(e: unknown): TwError {
    if (e instanceof TwError) return e;
    this.#deps.log?.(this.#scrub(String((e as Error).stack ?? e)));
    return new TwError(500, "internal_error", `TokenWatch failed: ${(e as Error).message}. Please report this.`);
  }

  /** The request body as text, within the size limits; the bytes it holds are counted in `held` until given back. */
  async #bodyOf(req: IncomingMessage, held: { bytes: number }): Promise<string> {
    checkUpstreamRoute(req);
    return bodyText(await readBody(req, this.#config.max_body_bytes, this.#budget, held));
  }

  /**
   * The one handler of every client format: read and check the body, route, dispatch. Errors go back in
   * the client's own shape, after the request's row is committed.
   */
  #serve(entry: Entry): Handler {
    return async (ctx) => {
      const { req, res } = ctx;
      const row = newRow(this.#now(), entry.format);
      const client: Client = { gone: false };
      res.on("close", () => { if (!res.writableFinished) { client.gone = true; client.stop?.(); } });
      let recorded: Promise<void> | undefined, p: Parsed | undefined;
      const commit = () => (recorded ??= this.#record(row, undefined, p));
      const held = { bytes: 0 };
      let ticket: Ticket | undefined;
      try {
        const text = await this.#bodyOf(req, held);
        p = entry.parse(parseBody(text), text, req.headers);
        row.requested_model = p.hub.model ?? "auto";
        row.stream = p.stream;
        const r = await this.#admit(p, req, ctx.agent, row, entry, (t) => { ticket = t; });
        await this.#dispatcher.dispatch({ entry, p, route: r, row, res, client, attempts: [], commit, overhead: row.cost_usd });
        const m = r.candidates.find((c) => c.provider.id === row.provider && c.id === row.model);
        if (m && row.status === 200) this.#sessions.remember(row.session!, m, row.input_tokens, r.complexity === "complex", this.#now());
      } catch (e) {
        const err = this.#asTwError(e);
        recorded ??= this.#record(row, err);
        if (err !== CLIENT_GONE) await recorded; // the row is on disk before the client hears of the failure
        this.#refuse(req, res, err, entry);
      } finally {
        void commit();
        if (ticket) this.budgets.settle(ticket, row.cost_usd);
        this.#budget.give(held.bytes);
      }
    };
  }

  /**
   * Who is asking and may they: the agent and session go on the row, the loop guard looks at the body,
   * a soft cap routes to the cheap tier, a hard cap refuses. The route, and the budgets' hold (`held`), all
   * in one synchronous step: two requests cannot both take a budget's last dollars.
   */
  /**
   * With "classifier": "model", a request left to the classifier that it is unsure about gets the cheapest
   * model's verdict; its cost goes on the request's row. Otherwise the classifier's own verdict (made once),
   * or undefined when the classifier has no say.
   */
  async #secondOpinion(p: Parsed, req: IncomingMessage, row: Row): Promise<RouteOpts["verdict"]> {
    if (this.#config.classifier !== "model" || (p.hub.model ?? "auto") !== "auto" || p.hub.complexity || header(req, "x-tokenwatch-complexity")) return undefined;
    const own = classify(p.hub);
    if (!own.unsure) return own;
    const o = await this.#dispatcher.opinion(p.hub);
    row.cost_usd = o?.cost ?? 0;
    if (!o?.tier) return own;
    return { tier: o.tier, signals: [`second opinion of ${o.model.id}: ${o.tier}; the classifier was unsure (${own.tier}, p = ${own.p.toFixed(2)}${own.signals.length ? `: ${own.signals.join(", ")}` : ""})`] };
  }

  async #admit(p: Parsed, req: IncomingMessage, keyAgent: string | undefined, row: Row, entry: Entry, held: (t: Ticket) => void): Promise<Route> {
    const config = this.#config;
    const who = identify(req.headers, p.body, p.hub, keyAgent);
    row.agent = who.agent;
    row.session = who.session;
    this.#loops.check(who, p.hub, p.text, this.#now());
    // a second opinion is paid for: never for a loop, nor under a soft cap (which decides the tier itself), nor at a hard cap
    const cheap = this.budgets.softCap(who, this.#now());
    const verdict = cheap || this.budgets.atHardCap(who, this.#now()) ? undefined : await this.#secondOpinion(p, req, row);
    const t = this.#now();
    const only = p.nativeOnly ? { keep: entry.native, why: p.nativeOnly } : undefined;
    const prompt = promptEstimate(p.text.length), state = this.#sessions.get(who.session, t);
    const warm = state && { state, prompt, output: this.capacity.outputEstimate(state.model, askedOutput(p.hub), config.default_max_tokens) };
    let r = route(p.hub, config, header(req, "x-tokenwatch-complexity"), { only, cheap, warm, verdict });
    row.complexity = r.complexity;
    const m = r.candidates[0];
    if (r.warm) { // the warm model leads: say so now if it cannot take this turn (it will be passed over)
      const blocked = this.#dispatcher.resting(m, t) ? "resting" : this.capacity.assess(m, { input: prompt, output: warm!.output }, t).why;
      if (blocked) r = { ...r, reason: `${r.reason}; moved: ${m.id} holds the cache but is ${blocked === "cooling" || blocked === "resting" ? "cooling down" : `saturated (${blocked})`}` };
    }
    const output = this.capacity.outputEstimate(m.key, askedOutput(p.hub), config.default_max_tokens);
    const estimate = m.priced ? turnCost(m, prompt, state?.model === m.key ? state.prefix : 0, output) : 0;
    const ticket = this.budgets.admit(who, estimate, t);
    held(ticket instanceof Promise ? await ticket : ticket); // local budgets answer at once: check and hold in one step
    return r;
  }

  /**
   * POST /v1/messages/count_tokens: Anthropic's own count when Anthropic is enabled (it is free there),
   * else a local estimate over every block; the `x-tokenwatch-count` header says which. It spends no
   * rate-limit window and writes no log row.
   */
  async #countTokens({ req, res }: Ctx): Promise<void> {
    const held = { bytes: 0 };
    try {
      const body = parseBody(await this.#bodyOf(req, held));
      if (!isObj(body)) throw bad("The request body must be a JSON object with \"model\" and \"messages\".");
      checkMessagesBody(body, true);
      const counted = await this.#countAtAnthropic(body, req);
      if (counted) return sendText(res, counted.status, counted.text, { "x-tokenwatch-count": "anthropic" });
      sendJson(res, 200, { input_tokens: estimateMessagesTokens(body) }, { "x-tokenwatch-count": "estimate" });
    } catch (e) {
      this.#refuse(req, res, this.#asTwError(e), messagesEntry);
    } finally {
      this.#budget.give(held.bytes);
    }
  }

  /** Anthropic's count, or undefined when no Anthropic model is enabled or it did not answer with a count (then: the estimate). */
  async #countAtAnthropic(body: Record<string, unknown>, req: IncomingMessage): Promise<{ status: number; text: string } | undefined> {
    const t = this.#now(), config = this.#config;
    const m = config.models.find((x) => x.provider.kind === "anthropic" && x.provider.enabled && !this.#dispatcher.resting(x, t));
    if (!m) return undefined;
    const model = typeof body.model === "string" && body.model.startsWith("claude-") ? body.model : m.id;
    const { complexity: _, ...rest } = body;
    const forward = { version: header(req, "anthropic-version"), beta: header(req, "anthropic-beta") };
    try {
      const resp = await (this.#deps.fetch ?? fetch)(`${m.provider.baseUrl}/v1/messages/count_tokens`, {
        method: "POST", headers: anthropicHeaders(m, forward), body: JSON.stringify({ ...rest, model }), redirect: "manual", signal: AbortSignal.timeout(config.timeout_ms),
      });
      const text = this.#scrub(await readCapped(resp, 65_536));
      // a count, or the client's own mistake in Anthropic's words; anything else (no such route, overloaded): the estimate
      if (resp.ok || (resp.status >= 400 && resp.status < 500 && resp.status !== 404 && resp.status !== 429)) return { status: resp.status, text };
    } catch { /* unreachable, too slow or too large: the estimate */ }
    return undefined;
  }

  /** Which route a request is for, after the Host and key checks; a 404 or 405 that lists what exists otherwise. */
  #routeOf(req: IncomingMessage, url: URL, key: string): { fn: Handler; agent?: string } {
    const deps = this.#deps, fn = this.#routes.get(key);
    if (deps.allowedHosts && !deps.allowedHosts.has((header(req, "host") ?? "").toLowerCase()))
      throw new TwError(403, "host_not_allowed", `Host ${shown(header(req, "host") ?? "")} is not the address TokenWatch serves: use the URL printed at start.`);
    if (!fn) {
      const allowed = [...this.#routes.keys()].filter((r) => r.endsWith(` ${url.pathname}`)).map((r) => r.split(" ")[0]);
      if (allowed.length) throw new TwError(405, "method_not_allowed", `${req.method} is not allowed on ${url.pathname.slice(0, 200)}: use ${allowed.join(" or ")}.`, { headers: { allow: allowed.join(", ") } });
      throw new TwError(404, "not_found", `No route ${req.method} ${url.pathname.slice(0, 200)}. Routes: ${[...this.#routes.keys()].join(", ")}.`);
    }
    const agentKeys = this.#config.agentKeys;
    if ((!deps.apiKey && !agentKeys.length) || OPEN_ROUTES.has(key)) return { fn };
    const caller = callerOf(req, deps.apiKey, agentKeys);
    if (!caller) throw new TwError(401, "invalid_api_key", `This TokenWatch needs a key: send "Authorization: Bearer <key>" or "x-api-key" with ${deps.apiKey ? "TOKENWATCH_API_KEY" : ""}${deps.apiKey && agentKeys.length ? " or " : ""}${agentKeys.length ? "your agent's key from the config's \"keys\"" : ""}.`);
    if (ADMIN_ROUTES.has(key) && deps.apiKey && !caller.admin)
      throw new TwError(403, "admin_key_required", `The key of agent "${caller.agent}" opens the API routes only: ${url.pathname} shows every agent's traffic, so it needs TOKENWATCH_API_KEY.`);
    return { fn, agent: caller.agent };
  }

  /** The node:http request listener. The path alone picks the route (Claude Code adds ?beta=true). */
  handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    let url: URL;
    try { url = new URL(req.url ?? "/", "http://localhost"); } catch { return sendJson(res, 400, bad("The request URL cannot be parsed.").body()); }
    try {
      const { fn, agent } = this.#routeOf(req, url, `${req.method === "HEAD" ? "GET" : req.method} ${url.pathname}`);
      this.#active++;
      try { await fn({ req, res, url, agent }); } finally { this.#active--; }
    } catch (e) {
      const err = e instanceof TwError ? e : new TwError(500, "internal_error", `TokenWatch failed: ${(e as Error).message}`);
      const { status, body } = entryOfPath(url.pathname).error(err); // a Messages client reads errors in Anthropic's shape, a 404 too
      sendJson(res, status, body, err.headers);
    }
  };

  /** Stop what runs in the background (the shared limiter's heartbeat and its Redis connection). */
  stop(): void { this.shared?.stop(); }

  /** Wait (up to `ms`) for the requests in flight to finish: the first half of a clean shutdown. */
  async drain(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (this.#active && Date.now() < deadline) await new Promise((r) => setTimeout(r, Math.min(20, deadline - Date.now())));
    return this.#active === 0;
  }
}

/** The router for a config and its dependencies (the store, and for tests a clock and a fetch). */
export const createRouter = (config: Config, deps: Deps): Router => new Router(config, deps);

// ============================================================================================
// 13. Dashboard: the /stats view (what the page and scripts read) and one self-contained page (no
//     external assets) that refreshes itself from /stats.
// ============================================================================================

export const STATS_WINDOWS: Record<string, number> = { "1h": 3_600_000, "24h": 86_400_000, "7d": 604_800_000, all: Infinity };

/** What the stats view reads: the config, the log, the live limiter, the providers at rest. */
type StatsSource = {
  config: Config; store: Store; limiter: Capacity; shared?: SharedLimiter; authDown: Map<string, number>; refused: Map<string, number>; started: number;
  budgets: Budgets; metrics: Metrics; inflight: () => number;
};

/** The 50th and 95th percentiles, from one sort: a typed array sorts numbers without a comparator, and /stats sorts 14 lists. */
function p50p95(xs: number[]): (number | null)[] {
  const s = Float64Array.from(xs).sort();
  return [50, 95].map((p) => (s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : null));
}

/**
 * A model's live limiter view, what /stats and /api/limits show: each dimension it has (used, the
 * configured and the learned limit, percent, whether it blocks and when it frees), the one that binds,
 * and `saturated` exactly when routing would not send it a typical request now (the same verdict).
 */
export function headroomOf(limiter: Capacity, m: Model, t: number, defaultMax: number) {
  const h = limiter.headroom(m, t, limiter.typical(m.key, defaultMax));
  const secs = (at: number | null) => (at && at > t ? Math.ceil((at - t) / 1000) : 0);
  const binding = h.dimensions.find((d) => d.dimension === h.binding);
  const tpm = configuredLimit(m, "tpm");
  return {
    pool: m.pool, window_tokens: h.tokens, window_requests: h.requests, inflight: h.inflight, limit: tpm !== undefined && Number.isFinite(tpm) ? tpm : null, rpm: m.rpm ?? null,
    percent_used: Math.round(h.percent * 10) / 10, saturated: h.saturated, binding: h.binding, cooling: h.coolUntil > 0,
    free_in_s: h.coolUntil ? secs(h.coolUntil) : h.saturated ? secs(binding?.free_at ?? null) : 0,
    cooldown_asked_s: h.coolAsked ? Math.ceil((h.coolAsked - t) / 1000) : null, // set when the provider asked for longer than max_cooldown_ms
    dimensions: h.dimensions.map((d) => ({ dimension: d.dimension, used: Math.round(d.used), limit: d.limit, configured_limit: d.configured, learned_limit: d.learned, percent: d.percent, blocks: d.blocks, free_in_s: secs(d.free_at) })),
  };
}

/** How many models outside the table /stats lists: the busiest ones (the log may hold thousands of "provider/model" names). */
const OTHER_MODELS_SHOWN = 30;

/** The table's models and the busiest others, each with its totals, latencies and live limiter view: a fixed number of queries. */
function modelStats(src: StatsSource, t: number, since: number) {
  const { config, store } = src;
  const agg = new Map(store.byModel(since, config.models.length + OTHER_MODELS_SHOWN).map((r) => [`${r.provider}/${r.model}`, r]));
  const list = [...config.models], listed = new Set(list.map((m) => m.key));
  for (const [k, a] of agg) {
    const prov = config.providers.find((x) => x.id === a.provider);
    if (!listed.has(k) && prov && list.length < config.models.length + OTHER_MODELS_SHOWN) list.push(unpricedModel(prov, a.model));
  }
  return list.map((m) => {
    const a = agg.get(m.key);
    const lat = a ? store.latencies(m.provider.id, m.id, since) : [];
    const ttft = lat.map((l) => l.ttft_ms).filter((x): x is number => x !== null);
    const [p50, p95] = p50p95(lat.map((l) => l.latency_ms)), [t50, t95] = p50p95(ttft);
    return {
      provider: m.provider.id, provider_name: m.provider.name, model: m.id, tier: m.tier, enabled: m.provider.enabled,
      requests: a?.requests ?? 0, errors: a?.errors ?? 0, input_tokens: a?.input_tokens ?? 0, output_tokens: a?.output_tokens ?? 0, cost_usd: round12(a?.cost_usd ?? 0),
      p50_ms: p50, p95_ms: p95, ttft_p50_ms: t50, ttft_p95_ms: t95,
      ...headroomOf(src.limiter, m, t, config.default_max_tokens), price_in: m.input, price_out: m.output,
      refused_for_s: Math.max(0, Math.ceil(((src.refused.get(m.key) ?? 0) - t) / 1000)), // a 403: this key may not use the model
    };
  });
}

/** Requests, tokens and cost per minute (bucket 1) or hour (bucket 60) over the last `minutes`, oldest first, gaps as zeros. */
function seriesOf(store: Store, t: number, minutes: number, bucket: number) {
  const rows = new Map(store.series(t - minutes * 60_000, bucket).map((r) => [r.b, r]));
  const last = Math.floor(t / 60_000 / bucket);
  return Array.from({ length: minutes / bucket }, (_, i) => {
    const b = last - minutes / bucket + 1 + i, r = rows.get(b);
    return { t: b * bucket * 60_000, requests: r?.requests ?? 0, input_tokens: r?.input_tokens ?? 0, output_tokens: r?.output_tokens ?? 0, cost_usd: round12(r?.cost_usd ?? 0) };
  });
}

const rowOut = (r: Row) => ({ ts: r.ts, entry: r.entry, provider: r.provider, model: r.model, requested_model: r.requested_model, complexity: r.complexity, status: r.status, input_tokens: r.input_tokens, output_tokens: r.output_tokens, cached_tokens: r.cached_tokens, cost_usd: r.cost_usd, latency_ms: r.latency_ms, ttft_ms: r.ttft_ms, stream: Boolean(r.stream), attempts: r.attempts, error: r.error });

/** A Redis URL without its password, for /stats. */
const redactedUrl = (url: string) => url.replace(/\/\/([^@/]*)@/, (_, auth: string) => `//${auth.includes(":") ? `${auth.split(":")[0]}:***` : "***"}@`);

/** The whole /stats answer for a window ("1h", "24h", "7d", "all"): totals over all history, the rest over the window. */
export function statsView(src: StatsSource, w: string, t: number) {
  const { config, store } = src;
  store.checkFile(true);
  store.flush();
  const span = STATS_WINDOWS[w], since = Number.isFinite(span) ? t - span : 0;
  const midnight = new Date(t); midnight.setHours(0, 0, 0, 0);
  const fix = (x: Totals) => ({ ...x, cost_usd: round12(x.cost_usd) });
  const all = fix(store.totals(0));
  const byProv = new Map(store.byProvider(since).map((p) => [p.provider, { requests: p.requests, errors: p.errors, cost_usd: round12(p.cost_usd), models_used: p.models }]));
  const models = modelStats(src, t, since);
  const routing = store.routing(since), entries = store.entries(since);
  const count = (c: string) => routing.find((r) => r.complexity === c)?.requests ?? 0;
  return {
    uptime_s: Math.floor((t - src.started) / 1000), version: VERSION, window: w, now: t, threshold: config.threshold,
    totals: all,
    periods: { today: fix(store.totals(midnight.getTime())), "24h": fix(store.totals(t - 86_400_000)), all },
    models,
    providers: config.providers.map((p) => ({ provider: p.id, name: p.name, enabled: p.enabled, reason: p.enabled ? null : p.why, ...(byProv.get(p.id) ?? { requests: 0, errors: 0, cost_usd: 0, models_used: 0 }), disabled_for_s: Math.max(0, Math.ceil(((src.authDown.get(p.id) ?? 0) - t) / 1000)) })),
    routing: { simple: count("simple"), complex: count("complex"), failovers: routing.reduce((s, r) => s + r.failovers, 0), failover_reasons: store.failoverReasons(since) },
    entries: Object.fromEntries((["chat", "messages", "responses"] as const).map((f) => [f, entries.find((e) => e.entry === f)?.requests ?? 0])),
    agents: store.byAgent(since).map((a) => ({ ...a, agent: a.agent || null, cost_usd: round12(a.cost_usd) })),
    sessions: store.topSessions(since).map((x) => ({ ...x, agent: x.agent || null, cost_usd: round12(x.cost_usd) })),
    budgets: src.budgets.view(t),
    loop_guard: config.loop_guard,
    shared: src.shared ? { ...src.shared.status, redis: redactedUrl(config.redis!.url) } : null,
    series: { minute: seriesOf(store, t, 60, 1), hour: seriesOf(store, t, 24 * 60, 60) },
    recent: store.recent(50).map(rowOut),
    errors: store.errors(since, 50).map((r) => ({ ts: r.ts, provider: r.provider, model: r.model, status: r.status, kind: r.error_kind, message: r.error })),
    error_groups: store.errorGroups(since),
    models_not_shown: Math.max(0, [...byProv.values()].reduce((s, p) => s + p.models_used, 0) - models.filter((m) => m.requests > 0).length),
    store: { path: store.path, pending_rows: store.pending, last_error: store.lastError, file_event: store.fileEvent, set_aside_rows: store.setAsideCount, set_aside: store.setAside },
  };
}

// ---- /metrics: the same figures for Prometheus ----

/** Histogram buckets in seconds: a whole answer, and the first token of a stream. */
const DURATION_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
const TTFT_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30];
/** Agents named by a header, not a key, get a label of their own up to this many; later ones are "other" (label sets stay bounded). */
const AGENT_LABELS = 50;

type Histogram = { buckets: number[]; counts: number[]; sum: number; count: number };

/** One label set as Prometheus writes it: `{a="x",b="y"}`, values escaped. */
const labelText = (names: readonly string[], values: readonly string[]) =>
  `{${names.map((k, i) => `${k}="${values[i].replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")}"`).join(",")}}`;

/** A metric family: its label names, and per label set (values joined by \u0001, a byte no label holds) its value. */
type Family<T> = { labels: readonly string[]; series: Map<string, T> };

/**
 * Counters and histograms since this process started, fed by every finished log row. Labels are
 * bounded sets: providers and models of the table (anything else is "other"), formats, statuses, and
 * agents (those of keys, the first AGENT_LABELS others); never a session id or free text. Label text
 * is escaped when /metrics is read, not per request.
 */
export class Metrics {
  #counters = new Map<string, Family<number>>();
  #histograms = new Map<string, Family<Histogram>>();
  #agents = new Set<string>();
  #config: Config;
  constructor(config: Config) {
    this.#config = config;
    for (const k of config.agentKeys) this.#agents.add(k.agent);
  }

  /** Add to a counter; `key` is its label values joined by \u0001, in the order of `labels`. */
  #add(name: string, labels: readonly string[], key: string, by: number): void {
    let f = this.#counters.get(name);
    if (!f) this.#counters.set(name, (f = { labels, series: new Map() }));
    f.series.set(key, (f.series.get(key) ?? 0) + by);
  }

  #observe(name: string, buckets: number[], labels: readonly string[], key: string, x: number): void {
    let f = this.#histograms.get(name);
    if (!f) this.#histograms.set(name, (f = { labels, series: new Map() }));
    let h = f.series.get(key);
    if (!h) f.series.set(key, (h = { buckets, counts: buckets.map(() => 0), sum: 0, count: 0 }));
    for (let i = 0; i < buckets.length; i++) if (x <= buckets[i]) h.counts[i]++;
    h.sum += x;
    h.count++;
  }

  /** A model's label: its name in the table (a dated Claude id by its family), else "other". */
  #model(provider: string | null, model: string | null): string {
    if (!model) return "none";
    const m = this.#config.models.find((x) => x.provider.id === provider && x.id === model);
    return m ? m.id : (provider && this.#config.providers.find((p) => p.id === provider)?.kind === "anthropic" && claudeModel(this.#config, model)?.family) || "other";
  }

  #agent(agent: string | null): string {
    if (agent === null) return "none";
    if (this.#agents.has(agent)) return agent;
    if (this.#agents.size < AGENT_LABELS + this.#config.agentKeys.length) { this.#agents.add(agent); return agent; }
    return "other";
  }

  record(r: Row): void {
    const provider = r.provider ?? "none", model = this.#model(r.provider, r.model), entry = r.entry, agent = this.#agent(r.agent);
    const pm = `${provider}\u0001${model}`, pme = `${pm}\u0001${entry}`; // label values, joined once
    this.#add("tokenwatch_requests_total", ["provider", "model", "entry", "status"], `${pme}\u0001${r.status}`, 1);
    if (r.status >= 400) this.#add("tokenwatch_errors_total", ["provider", "entry", "kind"], `${provider}\u0001${entry}\u0001${r.error_kind ?? "error"}`, 1);
    if (r.failover) this.#add("tokenwatch_failovers_total", ["provider", "model", "entry"], pme, 1);
    const tokens: [string, number][] = [["input", r.input_tokens - r.cached_tokens - r.cache_write_tokens], ["output", r.output_tokens], ["cache_read", r.cached_tokens], ["cache_write", r.cache_write_tokens]];
    for (const [kind, n] of tokens) if (n > 0) this.#add("tokenwatch_tokens_total", ["provider", "model", "kind"], `${pm}\u0001${kind}`, n);
    if (r.cost_usd > 0) this.#add("tokenwatch_cost_usd_total", ["provider", "model"], pm, r.cost_usd);
    this.#add("tokenwatch_agent_requests_total", ["agent"], agent, 1);
    if (r.cost_usd > 0) this.#add("tokenwatch_agent_cost_usd_total", ["agent"], agent, r.cost_usd);
    if (r.status === 200) {
      this.#observe("tokenwatch_request_duration_seconds", DURATION_BUCKETS, ["provider", "model", "entry"], pme, r.latency_ms / 1000);
      if (r.ttft_ms !== null) this.#observe("tokenwatch_time_to_first_token_seconds", TTFT_BUCKETS, ["provider", "model"], pm, r.ttft_ms / 1000);
    }
  }

  /** The counters and histograms in Prometheus' text format, after `help` says what each is. */
  render(help: Record<string, string>): string[] {
    const out: string[] = [];
    for (const [name, f] of this.#counters) {
      out.push(`# HELP ${name} ${help[name]}`, `# TYPE ${name} counter`);
      for (const [key, v] of f.series) out.push(`${name}${labelText(f.labels, key.split("\u0001"))} ${round12(v)}`);
    }
    for (const [name, f] of this.#histograms) {
      out.push(`# HELP ${name} ${help[name]}`, `# TYPE ${name} histogram`);
      for (const [key, h] of f.series) {
        const labels = labelText(f.labels, key.split("\u0001")), inner = labels.slice(1, -1);
        h.buckets.forEach((b, i) => out.push(`${name}_bucket{${inner},le="${b}"} ${h.counts[i]}`));
        out.push(`${name}_bucket{${inner},le="+Inf"} ${h.count}`, `${name}_sum${labels} ${round12(h.sum)}`, `${name}_count${labels} ${h.count}`);
      }
    }
    return out;
  }
}

const METRIC_HELP: Record<string, string> = {
  tokenwatch_requests_total: "Requests finished, by the provider and model that answered (or none), client format and HTTP status.",
  tokenwatch_errors_total: "Requests that ended in an error, by provider, client format and kind of error.",
  tokenwatch_failovers_total: "Requests that passed over at least one candidate before their answer, by the model that answered.",
  tokenwatch_tokens_total: "Tokens billed, by kind: input (uncached), output, cache_read, cache_write.",
  tokenwatch_cost_usd_total: "Cost in US dollars, at the table's prices.",
  tokenwatch_agent_requests_total: "Requests by agent (none: no agent known; other: past the label limit).",
  tokenwatch_agent_cost_usd_total: "Cost in US dollars by agent.",
  tokenwatch_request_duration_seconds: "Time from a request's arrival to its last byte, for answered requests.",
  tokenwatch_time_to_first_token_seconds: "Time from a streamed request's arrival to its first event.",
};

/** One gauge family: its help, its type line, and a sample per label set. */
function gauge(name: string, help: string, samples: [Record<string, string>, number][]): string[] {
  return [`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, ...samples.map(([l, v]) => `${name}${Object.keys(l).length ? labelText(Object.keys(l), Object.values(l)) : ""} ${Number.isFinite(v) ? round12(v) : "+Inf"}`)];
}

/** GET /metrics: the counters since start, and the live figures (limits, budgets, the store) as gauges. */
export function metricsText(src: StatsSource, t: number): string {
  const { config, limiter, store, budgets } = src;
  const used: [Record<string, string>, number][] = [], limits: [Record<string, string>, number][] = [];
  for (const m of config.models.filter((x) => x.provider.enabled)) {
    for (const d of limiter.headroom(m, t, limiter.typical(m.key, config.default_max_tokens)).dimensions) {
      const labels = { provider: m.provider.id, model: m.id, dimension: d.dimension };
      used.push([labels, d.used]);
      limits.push([labels, d.limit]);
    }
  }
  const spent: [Record<string, string>, number][] = [], caps: [Record<string, string>, number][] = [];
  for (const b of budgets.view(t)) {
    spent.push([{ budget: b.name }, b.spends.reduce((x, s) => Math.max(x, s.spent_usd), 0)]);
    if (b.soft !== null) caps.push([{ budget: b.name, level: "soft" }, b.soft]);
    if (b.hard !== null) caps.push([{ budget: b.name, level: "hard" }, b.hard]);
  }
  return [
    ...gauge("tokenwatch_build_info", "TokenWatch's version.", [[{ version: VERSION }, 1]]),
    ...src.metrics.render(METRIC_HELP),
    ...gauge("tokenwatch_inflight_requests", "Requests being answered now.", [[{}, src.inflight()]]),
    ...gauge("tokenwatch_ratelimit_used", "What each limit dimension of a model holds now, in its own unit (requests or tokens), in flight included.", used),
    ...gauge("tokenwatch_ratelimit_limit", "Each limit dimension of a model: learned from the provider's headers, else the table's.", limits),
    ...gauge("tokenwatch_budget_spent_usd", "Spend in this period, in US dollars: the budget's own, or for a per-agent or per-session budget its largest subject's.", spent),
    ...gauge("tokenwatch_budget_cap_usd", "Each budget's caps in US dollars: soft moves to the cheap tier, hard refuses.", caps),
    ...gauge("tokenwatch_store_rows_pending", "Log rows waiting to be written.", [[{}, store.pending]]),
    ...(src.shared ? [
      ...gauge("tokenwatch_shared_limits", "1 while the limits and budgets shared through Redis decide, 0 while this instance decides alone (Redis down or slow).", [[{}, src.shared.status.mode === "redis" ? 1 : 0]]),
      ...gauge("tokenwatch_shared_instances", "Instances whose heartbeat Redis holds.", [[{}, src.shared.status.instances.length]]),
    ] : []),
    `# HELP tokenwatch_store_write_errors_total Failed writes to the SQLite log (their rows stayed queued for the retry).`, `# TYPE tokenwatch_store_write_errors_total counter`, `tokenwatch_store_write_errors_total ${store.writeErrors}`,
    `# HELP tokenwatch_store_rows_set_aside_total Log rows that could not be written even alone, and were set aside.`, `# TYPE tokenwatch_store_rows_set_aside_total counter`, `tokenwatch_store_rows_set_aside_total ${store.setAsideCount}`,
    "",
  ].join("\n");
}

const DASHBOARD_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

// The page below holds no backticks, "${" or backslashes, so it sits in this template literal unchanged.
const DASHBOARD_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>TokenWatch</title>
<link rel="icon" href="data:,">
<style>
:root{--bg:#f4f5f7;--card:#fff;--fg:#171a21;--muted:#667085;--line:#e4e7ec;--soft:#eef0f3;
--green:#16a34a;--amber:#d97706;--red:#dc2626;--green-bg:#dcfce7;--amber-bg:#fef3c7;--red-bg:#fee2e2;
--in:#4f46e5;--out:#a5b4fc;--cost:#0d9488;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#0d0f13;--card:#161920;--fg:#e6e8ee;--muted:#8f98aa;--line:#272c36;--soft:#20242d;
--green:#22c55e;--amber:#f59e0b;--red:#f87171;--green-bg:rgba(34,197,94,.14);--amber-bg:rgba(245,158,11,.15);--red-bg:rgba(248,113,113,.15);
--in:#818cf8;--out:#3f448f;--cost:#2dd4bf}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
[hidden]{display:none!important}
.top{position:sticky;top:0;z-index:5;display:flex;flex-wrap:wrap;align-items:center;justify-content:space-between;gap:8px 16px;padding:10px 20px;background:var(--card);border-bottom:1px solid var(--line)}
.brand{display:flex;align-items:center;gap:10px;min-width:0}
.logo{width:12px;height:12px;border-radius:3px;background:linear-gradient(135deg,var(--in),var(--cost))}
h1{font-size:17px;margin:0;letter-spacing:-.01em}
.controls{display:flex;align-items:center;gap:10px;flex-wrap:wrap}
.seg{display:inline-flex;border:1px solid var(--line);border-radius:8px;overflow:hidden;background:var(--bg)}
.seg button{font:inherit;font-size:13px;border:0;background:transparent;color:var(--muted);padding:4px 11px;cursor:pointer}
.seg button+button{border-left:1px solid var(--line)}
.seg button[aria-pressed=true]{background:var(--card);color:var(--fg);font-weight:600;box-shadow:inset 0 -2px 0 var(--in)}
#status{display:inline-flex;align-items:center;gap:6px;font-size:12.5px;padding:3px 10px;border-radius:999px;background:var(--soft);color:var(--muted);white-space:nowrap}
.dot{width:8px;height:8px;border-radius:50%;background:var(--muted)}
#status[data-state=live] .dot{background:var(--green);box-shadow:0 0 0 3px var(--green-bg)}
#status[data-state=down]{background:var(--red-bg);color:var(--red)}
#status[data-state=down] .dot{background:var(--red)}
#status[data-state=auth]{background:var(--amber-bg);color:var(--amber)}
#status[data-state=auth] .dot{background:var(--amber)}
.muted,.cap{color:var(--muted)}
.small,.cap{font-size:12.5px}
main{max-width:1280px;margin:0 auto;padding:16px 20px 40px;display:grid;grid-template-columns:minmax(0,1fr);gap:16px}
#empty-slot:empty{display:none}
.grid2{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:16px 18px;min-width:0}
h2{font-size:14.5px;margin:0;font-weight:650}
h3{font-size:12px;margin:0 0 8px;font-weight:600;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.hd{display:flex;align-items:baseline;justify-content:space-between;gap:4px 16px;flex-wrap:wrap;margin-bottom:12px}
.banner{border:1px solid var(--red);background:var(--red-bg);border-radius:10px;padding:10px 14px}
.banner b{color:var(--red)}
.kpis{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:16px}
.k-label{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);font-weight:600}
.k-val{font-size:28px;font-weight:650;letter-spacing:-.02em;font-variant-numeric:tabular-nums;line-height:1.25;margin-top:4px}
.k-sub{display:flex;gap:18px;margin:10px 0 0;padding-top:9px;border-top:1px solid var(--line);font-size:13px}
.k-sub dt{color:var(--muted);font-size:11.5px;white-space:nowrap}
.k-sub dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
.tag{display:inline-block;font-size:11px;font-weight:600;padding:0 7px;border-radius:999px;background:var(--soft);color:var(--muted);line-height:18px;white-space:nowrap}
.tag.red{background:var(--red-bg);color:var(--red)}
.tag.amber{background:var(--amber-bg);color:var(--amber)}
.tag.green{background:var(--green-bg);color:var(--green)}
.prov+.prov{margin-top:18px}
.prov-hd{display:flex;align-items:center;gap:8px;flex-wrap:wrap;padding-bottom:6px;border-bottom:1px solid var(--line)}
.prov-hd b{font-size:14px}
.prov-hd .right{margin-left:auto}
.prov.off .hr-row{opacity:.45}
.hr-row{display:grid;grid-template-columns:minmax(150px,1.1fr) minmax(0,4fr) 52px;gap:6px 22px;align-items:center;padding:10px 0 10px 10px;border-bottom:1px dashed var(--line);border-left:3px solid transparent}
.meters{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:6px 18px}.meter.binding .m-top span:first-child{font-weight:650}.meter.binding .m-top span:first-child::after{content:" · binds";color:var(--amber);font-weight:500}
.hr-row:last-child{border-bottom:0}
.hr-row.sat{border-left-color:var(--red)}
.hr-row.cool{border-left-color:var(--amber)}
.mname{font-weight:600;overflow-wrap:anywhere}
.tags{display:flex;gap:5px;flex-wrap:wrap;align-items:center;margin-top:3px;font-size:12px}
.m-top{display:flex;justify-content:space-between;gap:8px;font-size:12px;color:var(--muted);margin-bottom:5px}
.m-val{color:var(--fg);font-variant-numeric:tabular-nums}
.track{position:relative;height:8px;border-radius:4px;background:var(--soft)}
.fill{height:100%;border-radius:4px}
.green>.fill,.fill.green{background:var(--green)}.fill.amber{background:var(--amber)}.fill.red{background:var(--red)}
.mark{position:absolute;top:-4px;bottom:-4px;width:2px;margin-left:-1px;background:var(--fg);opacity:.5;border-radius:1px}
.pct{text-align:right;font-weight:650;font-size:15px;font-variant-numeric:tabular-nums}
.pct.amber{color:var(--amber)}.pct.red{color:var(--red)}
.lg{display:flex;gap:12px;flex-wrap:wrap;font-size:12px;color:var(--muted)}
.lg i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.lg i.ln{height:3px;vertical-align:2px}
.chart{width:100%;min-height:170px}
.chart svg{display:block;overflow:visible}
.ax{fill:var(--muted);font-size:11px;font-variant-numeric:tabular-nums}
.gl{stroke:var(--line);stroke-width:1}
.b-in{fill:var(--in)}.b-out{fill:var(--out)}
.cl-h{fill:none;stroke:var(--card);stroke-width:4;stroke-linejoin:round;opacity:.8}
.cl{fill:none;stroke:var(--cost);stroke-width:2;stroke-linejoin:round;stroke-linecap:round}
.hit{fill:transparent}.hit:hover{fill:var(--fg);fill-opacity:.07}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:0 -18px;padding:0 18px}
td .tags{flex-wrap:nowrap;margin:0}
.mc{display:inline-block;max-width:300px;overflow:hidden;text-overflow:ellipsis;vertical-align:bottom}
table{width:100%;border-collapse:collapse;font-size:13px;white-space:nowrap}
th{font-weight:600;color:var(--muted);font-size:11px;text-transform:uppercase;letter-spacing:.04em;text-align:left;padding:6px 10px;border-bottom:1px solid var(--line)}
td{padding:7px 10px;border-bottom:1px solid var(--line);vertical-align:middle}
tbody tr:last-child td{border-bottom:0}
th:first-child,td:first-child{padding-left:0}
th:last-child,td:last-child{padding-right:0}
.n{text-align:right;font-variant-numeric:tabular-nums}
.err{color:var(--red)}
.msg{max-width:340px;overflow:hidden;text-overflow:ellipsis}
.none{color:var(--muted);text-align:center;padding:16px 0}
.bl{display:grid;grid-template-columns:minmax(0,1.3fr) minmax(50px,1fr) auto;gap:6px 12px;align-items:center;font-size:13px}
.bl .lab{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bl .n{font-weight:600}
.bl .track{height:6px}
.bl .fill{background:var(--in)}
.split{display:flex;height:10px;border-radius:5px;overflow:hidden;background:var(--soft);margin:6px 0 8px}
.split span{display:block;height:100%}
.big{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums;letter-spacing:-.02em}
.sect+.sect{margin-top:16px;padding-top:14px;border-top:1px solid var(--line)}
pre{margin:6px 0 0;padding:12px 14px;background:var(--soft);border-radius:8px;overflow-x:auto;font:12.5px/1.55 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.empty h2{font-size:18px;margin-bottom:4px}
.empty p{margin:6px 0 14px;color:var(--muted)}
.code+.code{margin-top:18px}
.code-hd{display:flex;align-items:center;justify-content:space-between;gap:8px}.code-hd h3{margin:0}
.copy,.more{font:inherit;font-size:12px;padding:2px 10px;border:1px solid var(--line);border-radius:6px;background:var(--card);color:var(--fg);cursor:pointer}
.auth{max-width:440px;width:100%;justify-self:center}
.auth p{margin:6px 0 12px;color:var(--muted)}
.auth .row{display:flex;gap:8px}
.auth input{flex:1;min-width:0;font:inherit;padding:7px 10px;border:1px solid var(--line);border-radius:8px;background:var(--bg);color:var(--fg)}
.auth button{font:inherit;font-weight:600;padding:7px 14px;border:0;border-radius:8px;background:var(--in);color:#fff;cursor:pointer}
#auth-msg.bad{color:var(--red)}
.filter{font:inherit;font-size:12.5px;padding:3px 9px;border:1px solid var(--line);border-radius:6px;background:var(--bg);color:var(--fg);width:220px;max-width:100%}
.brow{display:grid;grid-template-columns:minmax(120px,1fr) minmax(0,3fr) auto;gap:6px 18px;align-items:center;padding:8px 0;border-bottom:1px dashed var(--line)}
.brow:last-child{border-bottom:0}.brow .track{height:8px}.brow .state{font-size:12px;font-weight:600}.state.amber{color:var(--amber)}.state.red{color:var(--red)}.state.green{color:var(--green)}
.budget+.budget{margin-top:12px;padding-top:10px;border-top:1px solid var(--line)}
@media (max-width:900px){.grid2{grid-template-columns:minmax(0,1fr)}.kpis{grid-template-columns:repeat(2,minmax(0,1fr))}}
@media (max-width:640px){.top{padding:10px 14px;position:static}main{padding:12px 12px 32px;gap:12px}.card{padding:14px}.scroll{margin:0 -14px;padding:0 14px}.mc{max-width:190px}
.kpis{gap:12px}.k-val{font-size:22px}.k-sub{gap:12px}
.hr-row{grid-template-columns:minmax(0,1fr) auto;padding-left:8px}.hr-row .meters{grid-column:1/-1;order:2}}
</style>
</head>
<body>
<header class="top">
  <div class="brand"><span class="logo" aria-hidden="true"></span><h1>TokenWatch</h1><span id="meta" class="small muted"></span></div>
  <div class="controls">
    <div class="seg" id="window" role="group" aria-label="Window for per-model tables">
      <button type="button" data-window="1h">1h</button><button type="button" data-window="24h">24h</button><button type="button" data-window="7d">7d</button><button type="button" data-window="all">All</button>
    </div>
    <span id="status" data-state="connecting" role="status"><i class="dot"></i><span id="status-text">Connecting&hellip;</span></span>
    <span id="updated" class="small muted"></span>
  </div>
</header>
<main>
  <div id="store-banner" class="banner" role="alert" hidden></div>
  <form id="auth" class="card auth" hidden>
    <h2>API key required</h2>
    <p id="auth-msg">This TokenWatch server requires an API key.</p>
    <div class="row"><input id="auth-key" type="password" autocomplete="off" placeholder="TokenWatch API key" aria-label="TokenWatch API key"><button type="submit">Connect</button></div>
  </form>
  <div id="loading" class="muted small">Loading&hellip;</div>
  <section class="kpis" id="kpis" hidden>
    <div class="card"><div class="k-label">Requests</div><div class="k-val" id="total-requests">0</div><dl class="k-sub"><div><dt>Today</dt><dd id="today-requests"></dd></div><div><dt>24h</dt><dd id="h24-requests"></dd></div><div><dt>Errors</dt><dd id="total-errors"></dd></div></dl></div>
    <div class="card"><div class="k-label">Cost</div><div class="k-val" id="total-cost">$0.00</div><dl class="k-sub"><div><dt>Today</dt><dd id="today-cost"></dd></div><div><dt>24h</dt><dd id="h24-cost"></dd></div></dl></div>
    <div class="card"><div class="k-label">Input tokens</div><div class="k-val" id="total-input">0</div><dl class="k-sub"><div><dt>Today</dt><dd id="today-input"></dd></div><div><dt>24h</dt><dd id="h24-input"></dd></div><div><dt>Cached</dt><dd id="total-cached"></dd></div></dl></div>
    <div class="card"><div class="k-label">Output tokens</div><div class="k-val" id="total-output">0</div><dl class="k-sub"><div><dt>Today</dt><dd id="today-output"></dd></div><div><dt>24h</dt><dd id="h24-output"></dd></div></dl></div>
  </section>
  <div id="empty-slot"></div>
  <section id="headroom" class="card" hidden>
    <div class="hd"><h2>Headroom now <span id="shared" class="tag" hidden></span></h2><span class="cap">Sliding minute &middot; bars show the full limit, marker at the <span id="hr-th">80%</span> routing threshold</span></div>
    <div id="hr-body"></div>
  </section>
  <section id="budgets" class="card" hidden>
    <div class="hd"><h2>Budgets</h2><span class="cap">Spend this period &middot; past the soft cap traffic goes to the cheap tier, past the hard cap it is refused</span></div>
    <div id="budget-body"></div>
  </section>
  <div id="busy" hidden>
    <div class="grid2">
      <section class="card"><div class="hd"><h2>Last hour <span class="cap">per minute</span></h2><span class="cap" id="sum-minute"></span></div><div class="chart" id="chart-minute"></div><div class="lg"><span><i style="background:var(--in)"></i>Input tokens</span><span><i style="background:var(--out)"></i>Output tokens</span><span><i class="ln" style="background:var(--cost)"></i>Cost</span></div></section>
      <section class="card"><div class="hd"><h2>Last 24 hours <span class="cap">per hour</span></h2><span class="cap" id="sum-hour"></span></div><div class="chart" id="chart-hour"></div><div class="lg"><span><i style="background:var(--in)"></i>Input tokens</span><span><i style="background:var(--out)"></i>Output tokens</span><span><i class="ln" style="background:var(--cost)"></i>Cost</span></div></section>
    </div>
    <section class="card" style="margin-top:16px"><div class="hd"><h2>Models</h2><span class="cap">Usage, cost and latency &middot; <span class="win-label">last 24 hours</span></span></div>
      <div class="scroll"><table><thead><tr><th>Model</th><th>Tier</th><th class="n">Requests</th><th class="n">Errors</th><th class="n">Input</th><th class="n">Output</th><th class="n">Cost</th><th class="n">p50</th><th class="n">p95</th><th class="n">TTFT p50</th><th class="n">TTFT p95</th></tr></thead><tbody id="models"></tbody></table></div>
    </section>
    <div class="grid2" style="margin-top:16px">
      <section class="card"><div class="hd"><h2>Spend breakdown</h2><span class="cap win-label">last 24 hours</span></div>
        <div class="sect"><h3>By provider</h3><div class="bl" id="cost-providers"></div></div>
        <div class="sect"><h3>By model</h3><div class="bl" id="cost-models"></div></div>
      </section>
      <section class="card" id="routing"><div class="hd"><h2>Routing</h2><span class="cap" id="route-total"></span></div>
        <div class="sect"><h3>Complexity</h3><div class="split" id="route-split"></div><div class="lg" id="route-legend"></div></div>
        <div class="sect"><h3>Failovers</h3><div><span class="big" id="failovers">0</span> <span class="cap" id="failover-share"></span></div><div class="bl" id="failover-reasons" style="margin-top:10px"></div></div>
        <div class="sect"><h3>Client formats</h3><div class="bl" id="entries"></div></div>
      </section>
    </div>
    <section class="card" style="margin-top:16px" id="agents-card"><div class="hd"><h2>Agents and sessions</h2><span class="cap"><input id="agent-filter" class="filter" type="search" placeholder="Filter agents and sessions" aria-label="Filter agents and sessions"> <span class="win-label">last 24 hours</span></span></div>
      <div class="grid2">
        <div><h3>Spend by agent</h3><div class="scroll"><table><thead><tr><th>Agent</th><th class="n">Requests</th><th class="n">Sessions</th><th class="n">Errors</th><th class="n">Cost</th><th class="n">Share</th></tr></thead><tbody id="agents"></tbody></table></div></div>
        <div><h3>Top sessions</h3><div class="scroll"><table><thead><tr><th>Session</th><th>Agent</th><th class="n">Requests</th><th class="n">Cost</th><th>Last seen</th></tr></thead><tbody id="sessions"></tbody></table></div></div>
      </div>
    </section>
    <section class="card" style="margin-top:16px"><div class="hd"><h2>Errors</h2><span class="cap">Latest, grouped by provider and kind</span></div>
      <div class="scroll"><table><thead><tr><th>Provider</th><th>Kind</th><th class="n">Count</th><th>Last seen</th><th>Last message</th></tr></thead><tbody id="errors"></tbody></table></div>
    </section>
    <section class="card" style="margin-top:16px"><div class="hd"><h2>Recent requests</h2><span class="cap"><span id="recent-count"></span> <button type="button" class="more" id="recent-more" hidden></button></span></div>
      <div class="scroll"><table><thead><tr><th>Time</th><th>Model</th><th>Route</th><th class="n">Tokens in / out</th><th class="n">Cost</th><th class="n">Latency</th><th class="n">TTFT</th><th>Status</th></tr></thead><tbody id="recent"></tbody></table></div>
    </section>
  </div>
</main>
<script>
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg", KEY = "tokenwatch_api_key", WINS = ["1h", "24h", "7d", "all"];
  var WIN_LABEL = { "1h": "last hour", "24h": "last 24 hours", "7d": "last 7 days", "all": "all time" };
  var C = String.fromCharCode, DASH = C(8212), DOT = " " + C(183) + " ", BS = C(92), NL = C(10);
  var win = "24h", last = null, timer = 0, seq = 0, emptyNode = null, emptySig = "", resizeT = 0;
  var RECENT_FEW = 15, recentAll = false; /* the table shows 15 rows until asked for all 50: the page stays short */

  function $(id) { return document.getElementById(id); }
  function add(p) {
    for (var i = 1; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      p.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return p;
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function sv(tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function setText(id, v, raw) { var e = $(id); if (!e) return; e.textContent = v; if (raw !== undefined) e.setAttribute("data-value", String(raw)); }
  function num(v) { v = Number(v); return isFinite(v) ? v : 0; }
  function has(v) { return v !== null && v !== undefined && v !== "" && isFinite(Number(v)); }
  function str(v) { return v === null || v === undefined ? "" : String(v); }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function round1(x) { return String(parseFloat(x.toFixed(1))); }
  function sfx(v, d, s) { var x = v / d; return (Math.abs(x) < 99.95 ? round1(x) : x.toFixed(0)) + s; }
  function fmtTok(v) {
    v = num(v); var a = Math.abs(v);
    if (a < 1000) return String(Math.round(v));
    if (a < 999500) return sfx(v, 1e3, "k");
    if (a < 999500000) return sfx(v, 1e6, "M");
    return sfx(v, 1e9, "B");
  }
  function fmtInt(v) { return Math.round(num(v)).toLocaleString("en-US"); }
  function fmtCost(v, short) {
    v = num(v); var a = Math.abs(v);
    if (a === 0) return short ? "$0" : "$0.00";
    if (a >= 1) return "$" + v.toLocaleString("en-US", { minimumFractionDigits: short ? 0 : 2, maximumFractionDigits: 2 });
    var d = Math.min(8, Math.max(2, 1 - Math.floor(Math.log10(a))));
    return "$" + (short ? String(parseFloat(v.toFixed(d))) : v.toFixed(d));
  }
  function fmtMs(v) {
    if (!has(v)) return DASH;
    v = num(v);
    if (v < 1000) return Math.round(v) + " ms";
    if (v < 60000) return (v / 1000).toFixed(v < 10000 ? 2 : 1) + " s";
    return fmtDur(v / 1000);
  }
  function fmtDur(s) {
    s = Math.max(0, Math.ceil(num(s)));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + pad(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + pad(Math.floor(s / 60) % 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor(s / 3600) % 24 + "h";
  }
  function hms(d) { return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()); }
  function fmtTime(ts) {
    if (!has(ts)) return DASH;
    var d = new Date(num(ts)), s = hms(d);
    if (d.toDateString() !== new Date().toDateString()) s = d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + " " + s;
    return s;
  }
  function pctOf(a, b) { return b > 0 ? Math.round(100 * a / b) + "%" : "0%"; }
  function tag(text, cls) { return el("span", "tag" + (cls ? " " + cls : ""), text); }
  function level(ratio, th) { return ratio >= th ? "red" : ratio >= th * 0.75 ? "amber" : "green"; }
  function getKey() { try { return sessionStorage.getItem(KEY) || ""; } catch (e) { return ""; } }
  function setKey(k) { try { if (k) sessionStorage.setItem(KEY, k); else sessionStorage.removeItem(KEY); } catch (e) { /* storage unavailable */ } }
  function row(cells) {
    var tr = el("tr");
    cells.forEach(function (c) {
      var td = el("td", c.cls || "");
      if (c.node) add(td, c.node); else td.textContent = str(c.t);
      if (c.title) td.title = c.title;
      tr.appendChild(td);
    });
    return tr;
  }
  function noneRow(tbody, cols, text) {
    var td = el("td", "none", text); td.colSpan = cols;
    tbody.replaceChildren(add(el("tr"), td));
  }

  /* ---------- connection ---------- */
  function setStatus(state, text) { var s = $("status"); s.setAttribute("data-state", state); $("status-text").textContent = text; }
  function schedule(ms) { clearTimeout(timer); timer = setTimeout(poll, ms); }
  function poll() {
    clearTimeout(timer);
    var my = ++seq, key = getKey(), headers = { Accept: "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    var ctl = typeof AbortController === "function" ? new AbortController() : null;
    var to = setTimeout(function () { if (ctl) ctl.abort(); }, 8000);
    fetch("/stats?window=" + encodeURIComponent(win), { headers: headers, cache: "no-store", signal: ctl ? ctl.signal : undefined })
      .then(function (r) {
        if (r.status === 401) return { auth: true };
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json().then(function (d) { return { data: d }; });
      })
      .then(function (res) {
        clearTimeout(to);
        if (my !== seq) return;
        if (res.auth) { askKey(key); return; }
        $("auth").hidden = true;
        setStatus("live", "Live");
        try { render(res.data); } catch (e) { if (window.console) console.warn("render failed", e); }
        setText("updated", "Updated " + hms(new Date()));
        schedule(3000);
      })
      .catch(function () {
        clearTimeout(to);
        if (my !== seq) return;
        setStatus("down", "Disconnected " + C(8212) + " retrying");
        schedule(3000);
      });
  }
  function askKey(sentKey) {
    clearTimeout(timer);
    setStatus("auth", "API key required");
    $("loading").hidden = true;
    var msg = $("auth-msg");
    if (sentKey) { setKey(""); msg.textContent = "That key was not accepted. Please check it and try again."; msg.className = "bad"; }
    else { msg.textContent = "This TokenWatch server requires an API key. It is kept in this tab only (sessionStorage)."; msg.className = ""; }
    var f = $("auth"), wasHidden = f.hidden;
    f.hidden = false;
    if (wasHidden || sentKey) { $("auth-key").value = ""; $("auth-key").focus(); }
  }
  $("auth").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var k = $("auth-key").value.trim();
    if (!k) { $("auth-key").focus(); return; }
    setKey(k);
    $("auth-msg").textContent = "Connecting" + C(8230); $("auth-msg").className = "";
    setStatus("connecting", "Connecting" + C(8230));
    poll();
  });

  /* ---------- window selector ---------- */
  function paintWindow() {
    Array.prototype.forEach.call(document.querySelectorAll("#window button"), function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-window") === win));
    });
    Array.prototype.forEach.call(document.querySelectorAll(".win-label"), function (e) { e.textContent = WIN_LABEL[win]; });
  }
  $("recent-more").addEventListener("click", function () { recentAll = !recentAll; if (last) renderRecent(last.recent || []); });
  $("window").addEventListener("click", function (ev) {
    var b = ev.target.closest ? ev.target.closest("button[data-window]") : null;
    if (!b) return;
    win = b.getAttribute("data-window");
    paintWindow();
    try { history.replaceState(null, "", "?window=" + win); } catch (e) { /* ignore */ }
    poll();
  });

  /* ---------- rendering ---------- */
  function render(d) {
    last = d;
    var t = d.totals || {}, per = d.periods || {}, all = per.all || t, today = per.today || {}, h24 = per["24h"] || {};
    var empty = !(num(t.requests) > 0);
    $("loading").hidden = true;
    $("kpis").hidden = false;
    $("headroom").hidden = false;
    $("busy").hidden = empty;
    $("meta").textContent = (d.version ? "v" + str(d.version) + DOT : "") + "up " + fmtDur(d.uptime_s);

    var st = d.store || {}, banner = $("store-banner");
    if (st.last_error !== null && st.last_error !== undefined) {
      banner.replaceChildren(add(el("b"), "Database writes are failing: "), str(st.last_error) + DOT + fmtInt(st.pending_rows) + " rows pending, retrying" + C(8230));
      banner.title = str(st.path);
      banner.hidden = false;
    } else if (st.file_event || num(st.set_aside_rows) > 0) {
      var aside = st.set_aside && st.set_aside.length ? st.set_aside[st.set_aside.length - 1].reason : "";
      banner.replaceChildren(add(el("b"), "Database: "), st.file_event ? str(st.file_event) : "",
        num(st.set_aside_rows) > 0 ? (st.file_event ? DOT : "") + fmtInt(st.set_aside_rows) + " row(s) could not be stored: " + str(aside) : "");
      banner.title = str(st.path);
      banner.hidden = false;
    } else banner.hidden = true;

    setText("total-requests", fmtInt(all.requests), num(all.requests));
    setText("total-cost", fmtCost(all.cost_usd), num(all.cost_usd));
    setText("total-input", fmtTok(all.input_tokens), num(all.input_tokens));
    setText("total-output", fmtTok(all.output_tokens), num(all.output_tokens));
    setText("total-errors", fmtInt(all.errors), num(all.errors));
    setText("total-cached", fmtTok(all.cached_tokens), num(all.cached_tokens));
    $("total-errors").className = num(all.errors) > 0 ? "err" : "";
    [["today", today], ["h24", h24]].forEach(function (p) {
      setText(p[0] + "-requests", fmtInt(p[1].requests), num(p[1].requests));
      setText(p[0] + "-cost", fmtCost(p[1].cost_usd), num(p[1].cost_usd));
      setText(p[0] + "-input", fmtTok(p[1].input_tokens), num(p[1].input_tokens));
      setText(p[0] + "-output", fmtTok(p[1].output_tokens), num(p[1].output_tokens));
    });
    document.title = "TokenWatch" + DOT + fmtCost(today.cost_usd) + " today";

    renderEmpty(empty);
    renderHeadroom(d);
    renderShared(d.shared);
    renderBudgets(d.budgets || []);
    if (empty) return;
    drawCharts();
    renderModels(d.models || []);
    renderBreakdown(d);
    renderRouting(d.routing || {});
    renderEntries(d.entries || {});
    renderErrors(d.error_groups || []);
    renderRecent(d.recent || []);
    renderAgents(d);
  }

  /* ---------- shared limits ---------- */
  function renderShared(sh) {
    var t = $("shared");
    t.hidden = !sh;
    if (!sh) return;
    var live = (sh.instances || []).length, redis = sh.mode === "redis";
    t.className = "tag" + (redis ? "" : " amber");
    t.setAttribute("data-mode", str(sh.mode));
    t.textContent = redis ? "Shared through Redis" + DOT + live + " instance" + (live === 1 ? "" : "s") + " live" : "Redis unreachable: this instance decides alone";
    t.title = (redis ? "Limits and budgets are shared with: " + (sh.instances || []).map(function (i) { return str(i.host) + " (pid " + str(i.pid) + ")"; }).join(", ")
      : "Since " + fmtTime(sh.since) + ": " + str(sh.reason) + DOT + "on " + str(sh.share)) + DOT + str(sh.redis);
  }

  /* ---------- budgets, agents and sessions ---------- */
  function renderBudgets(list) {
    $("budgets").hidden = !list.length;
    var frag = document.createDocumentFragment();
    list.forEach(function (b) {
      var box = el("div", "budget"), caps = [];
      box.setAttribute("data-budget", str(b.name));
      if (has(b.soft)) caps.push("soft " + fmtCost(b.soft));
      if (has(b.hard)) caps.push("hard " + fmtCost(b.hard));
      add(box, add(el("div", "prov-hd"), el("b", "", str(b.name)), tag(str(b.scope)), tag(b.period === "total" ? "in total" : "per " + str(b.period)), el("span", "right small muted", caps.join(DOT))));
      if (!(b.spends || []).length) add(box, el("div", "small muted", "Nothing spent in this period yet."));
      (b.spends || []).forEach(function (x) { box.appendChild(budgetRow(b, x)); });
      frag.appendChild(box);
    });
    $("budget-body").replaceChildren(frag);
  }
  function budgetRow(b, x) {
    var cap = has(b.hard) ? num(b.hard) : num(b.soft), spent = num(x.spent_usd), ratio = cap > 0 ? spent / cap : 0;
    var hardHit = has(b.hard) && spent >= num(b.hard), softHit = has(b.soft) && spent >= num(b.soft);
    var lv = hardHit ? "red" : softHit ? "amber" : "green", r = el("div", "brow");
    r.setAttribute("data-subject", x.subject === null ? "" : str(x.subject));
    r.setAttribute("data-spent", String(spent));
    var tr = el("div", "track"), f = el("div", "fill " + lv);
    f.style.width = (ratio > 0 ? Math.max(1, Math.min(100, ratio * 100)) : 0).toFixed(1) + "%";
    add(tr, f);
    if (has(b.soft) && has(b.hard) && num(b.hard) > 0) { var mk = el("div", "mark"); mk.style.left = (100 * num(b.soft) / num(b.hard)).toFixed(1) + "%"; add(tr, mk); }
    var line = fmtCost(spent) + " of " + fmtCost(cap) + (num(x.in_flight_usd) > 0 ? " (+" + fmtCost(x.in_flight_usd) + " in flight)" : "")
      + (has(x.projected_usd) ? DOT + "projected " + fmtCost(x.projected_usd) + " by the end of the " + str(b.period) : "")
      + (has(x.resets_in_s) ? DOT + "resets in " + fmtDur(x.resets_in_s) : "");
    var state = el("span", "state " + lv, hardHit ? "Refusing" : softHit ? "Cheap tier" : "OK");
    add(r, el("div", "mname", x.subject === null ? "everything" : str(x.subject)), add(el("div"), add(el("div", "m-top"), el("span", "m-val spent", line)), tr), state);
    return r;
  }
  var agentFilter = "";
  $("agent-filter").addEventListener("input", function () { agentFilter = this.value.trim().toLowerCase(); if (last) renderAgents(last); });
  function matches() {
    if (!agentFilter) return true;
    for (var i = 0; i < arguments.length; i++) if (str(arguments[i]).toLowerCase().indexOf(agentFilter) >= 0) return true;
    return false;
  }
  function agentName(a) { return a === null || a === undefined ? el("span", "muted", "(unknown)") : str(a); }
  function renderAgents(d) {
    var agents = d.agents || [], total = agents.reduce(function (s, a) { return s + num(a.cost_usd); }, 0);
    var ta = $("agents"), rows = agents.filter(function (a) { return matches(a.agent === null ? "(unknown)" : a.agent); });
    if (!rows.length) noneRow(ta, 6, agentFilter ? "No agent matches." : "No requests in this window.");
    else ta.replaceChildren.apply(ta, rows.map(function (a) {
      var r = row([{ node: agentName(a.agent) }, { t: fmtInt(a.requests), cls: "n" }, { t: fmtInt(a.sessions), cls: "n" }, { t: fmtInt(a.errors), cls: "n" + (num(a.errors) ? " err" : "") }, { t: fmtCost(a.cost_usd), cls: "n" }, { t: pctOf(num(a.cost_usd), total), cls: "n" }]);
      r.setAttribute("data-agent", str(a.agent));
      return r;
    }));
    var ts = $("sessions"), sess = (d.sessions || []).filter(function (x) { return matches(x.session, x.agent === null ? "(unknown)" : x.agent); }).slice(0, 10);
    if (!sess.length) noneRow(ts, 5, agentFilter ? "No session matches." : "No sessions in this window.");
    else ts.replaceChildren.apply(ts, sess.map(function (x) {
      var r = row([{ node: el("span", "mc", str(x.session)), title: str(x.session) }, { node: agentName(x.agent) }, { t: fmtInt(x.requests), cls: "n" }, { t: fmtCost(x.cost_usd), cls: "n" }, { t: fmtTime(x.last_ts) }]);
      r.setAttribute("data-session", str(x.session));
      return r;
    }));
  }

  function renderEmpty(empty) {
    var slot = $("empty-slot"), sig = location.origin + "|" + (getKey() ? 1 : 0);
    if (!empty) { slot.replaceChildren(); return; }
    if (slot.firstChild && sig === emptySig) return;
    emptySig = sig;
    var url = location.origin + "/v1/chat/completions", SQ = C(39);
    var authLine = getKey() ? '  -H "Authorization: Bearer $TOKENWATCH_API_KEY" ' + BS + NL : "";
    var curl = "curl " + url + " " + BS + NL + '  -H "Content-Type: application/json" ' + BS + NL + authLine +
      "  -d " + SQ + '{"model":"auto","messages":[{"role":"user","content":"Hello"}]}' + SQ;
    var sdk = 'import OpenAI from "openai";' + NL + NL + "const client = new OpenAI({" + NL +
      '  baseURL: "' + location.origin + '/v1",' + NL +
      '  apiKey: process.env.TOKENWATCH_API_KEY ?? "unused",' + NL + "});" + NL +
      'await client.chat.completions.create({ model: "auto", messages: [{ role: "user", content: "Hello" }] });';
    emptyNode = el("section", "card empty"); emptyNode.id = "empty-state";
    add(emptyNode, el("h2", "", "No requests yet"),
      el("p", "", 'TokenWatch is running and ready. Point any OpenAI-compatible client at it and this dashboard fills in live. Use model "auto" to let TokenWatch pick by complexity, cost and headroom.'),
      codeBlock("Send a first request", curl, "empty-curl"), codeBlock("Or use the OpenAI SDK", sdk, "empty-sdk"));
    slot.replaceChildren(emptyNode);
  }
  function codeBlock(title, text, id) {
    var box = el("div", "code"), hd = add(el("div", "code-hd"), el("h3", "", title)), pre = el("pre", "", text);
    pre.id = id;
    add(box, hd, pre);
    if (navigator.clipboard && window.isSecureContext) {
      var b = el("button", "copy", "Copy"); b.type = "button";
      b.addEventListener("click", function () {
        navigator.clipboard.writeText(text).then(function () { b.textContent = "Copied"; setTimeout(function () { b.textContent = "Copy"; }, 1500); }, function () { /* ignore */ });
      });
      hd.appendChild(b);
    }
    return box;
  }

  function meter(label, used, limit, th, unit) {
    var w = el("div", "meter"), ratio = limit > 0 ? used / limit : 0, lv = level(ratio, th);
    w.setAttribute("data-kind", label.toLowerCase());
    w.setAttribute("data-used", String(used)); w.setAttribute("data-limit", String(limit));
    var val = el("span", "m-val", fmtTok(used) + " / " + fmtTok(limit) + unit);
    add(w, add(el("div", "m-top"), el("span", "", label), val));
    var tr = el("div", "track"), f = el("div", "fill " + lv), mk = el("div", "mark");
    f.style.width = (ratio > 0 ? Math.max(1, Math.min(100, ratio * 100)) : 0).toFixed(1) + "%";
    mk.style.left = (th * 100).toFixed(1) + "%";
    add(w, add(tr, f, mk));
    w.title = label + ": " + fmtInt(used) + " of " + fmtInt(limit) + unit + " (" + pctOf(used, limit) + "), threshold " + fmtInt(limit * th);
    return w;
  }
  var DIM_NAMES = { rpm: "Requests/min", tpm: "Tokens/min", itpm: "Input tokens/min", otpm: "Output tokens/min", concurrency: "At once", rpd: "Requests/day", tpd: "Tokens/day" };
  /** One rate-limit dimension: used of its limit, the limit the provider reported when it differs, whether it binds and when it frees. */
  function dimMeter(x, th, binding) {
    var w = meter(DIM_NAMES[str(x.dimension)] || str(x.dimension), num(x.used), num(x.limit), th, "");
    w.setAttribute("data-kind", str(x.dimension));
    if (binding) w.classList.add("binding");
    if (has(x.learned_limit) && num(x.learned_limit) !== num(x.configured_limit)) {
      // the account's real limit, from the provider's headers: shown beside the table's figure
      add(w, el("div", "small muted learned", has(x.configured_limit) ? "table says " + fmtTok(num(x.configured_limit)) : "from the headers"));
      w.title += DOT + "the provider reports " + fmtInt(x.learned_limit) + (has(x.configured_limit) ? ", the table says " + fmtInt(x.configured_limit) : "");
    }
    if (x.blocks && num(x.free_in_s) > 0) add(w, el("div", "small muted free-in", "frees in " + fmtDur(x.free_in_s)));
    return w;
  }
  function renderHeadroom(d) {
    var th = num(d.threshold) > 0 ? num(d.threshold) : 0.8, groups = new Map();
    $("hr-th").textContent = Math.round(th * 100) + "%";
    (d.providers || []).forEach(function (p) { var k = str(p.provider); if (!groups.has(k)) groups.set(k, { p: p, m: [] }); });
    (d.models || []).forEach(function (m) {
      var k = str(m.provider);
      if (!groups.has(k)) groups.set(k, { p: { provider: m.provider, name: m.provider_name, enabled: true }, m: [] });
      groups.get(k).m.push(m);
    });
    var frag = document.createDocumentFragment();
    groups.forEach(function (g, k) {
      var p = g.p, off = p.enabled === false, box = el("div", "prov" + (off ? " off" : ""));
      box.setAttribute("data-provider", k);
      var hd = add(el("div", "prov-hd"), el("b", "", str(p.name || p.provider)));
      if (off) {
        add(hd, tag("Disabled", "red"), p.reason ? el("span", "small", str(p.reason)) : null,
          num(p.disabled_for_s) > 0 ? el("span", "small muted", "retry in " + fmtDur(p.disabled_for_s)) : null);
      }
      if (has(p.requests)) add(hd, el("span", "right small muted", fmtInt(p.requests) + " req" + DOT + fmtCost(p.cost_usd) + (num(p.errors) ? DOT + fmtInt(p.errors) + " err" : "")));
      box.appendChild(hd);
      if (!g.m.length) box.appendChild(el("div", "small muted", "No models configured."));
      g.m.forEach(function (m) {
        var r = el("div", "hr-row" + (m.saturated ? " sat" : m.cooling ? " cool" : "") + (m.enabled === false ? " off" : ""));
        r.setAttribute("data-model", k + "/" + str(m.model));
        r.setAttribute("data-saturated", String(!!m.saturated));
        r.setAttribute("data-cooling", String(!!m.cooling));
        var tags = add(el("div", "tags"), m.tier ? tag(str(m.tier)) : null,
          m.enabled === false ? tag("Disabled", "red") : null,
          m.saturated ? tag("Saturated", "red") : null, m.cooling ? tag("Cooling down", "amber") : null,
          num(m.refused_for_s) > 0 ? tag("Refused to this key", "red") : null,
          (m.saturated || m.cooling) && num(m.free_in_s) > 0 ? el("span", "muted free-in", "frees in " + fmtDur(m.free_in_s)) : null,
          num(m.cooldown_asked_s) > 0 ? el("span", "muted capped", "(provider asked " + fmtDur(m.cooldown_asked_s) + "; capped at max_cooldown_ms)") : null,
          num(m.inflight) > 0 ? tag(fmtInt(m.inflight) + " in flight") : null);
        add(r, add(el("div", "hr-name"), el("div", "mname", str(m.model)), tags));
        var dims = m.dimensions || [], meters = el("div", "meters");
        // the dimension that binds (or would first): marked once it blocks, or holds half the threshold
        dims.forEach(function (x) { add(meters, dimMeter(x, th, str(m.binding) === str(x.dimension) && (x.blocks || num(x.percent) >= th * 50))); });
        if (!dims.length) add(meters, el("div", "meter small muted", fmtInt(m.window_requests) + " requests" + DOT + "no limits known"));
        add(r, meters);
        var pu = num(m.percent_used), pc = el("div", "pct " + level(pu / 100, th), Math.round(pu) + "%");
        pc.title = "of full limit"; r.appendChild(pc);
        box.appendChild(r);
      });
      frag.appendChild(box);
    });
    if (!groups.size) frag.appendChild(el("div", "none", "No providers configured."));
    $("hr-body").replaceChildren(frag);
  }

  function niceStep(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10) * p;
  }
  function drawCharts() {
    if (!last || !last.series) return;
    chart($("chart-minute"), last.series.minute || [], "minute", $("sum-minute"));
    chart($("chart-hour"), last.series.hour || [], "hour", $("sum-hour"));
  }
  function chart(box, pts, kind, sumEl) {
    var W = Math.floor(box.clientWidth);
    if (W < 50) return;
    var H = W < 480 ? 170 : 200, L = 46, R = 52, T = 10, B = 24, pw = W - L - R, ph = H - T - B, n = Math.max(1, pts.length);
    var maxT = 0, maxC = 0, sumT = 0, sumC = 0, sumR = 0;
    pts.forEach(function (p) {
      var tk = num(p.input_tokens) + num(p.output_tokens);
      maxT = Math.max(maxT, tk); maxC = Math.max(maxC, num(p.cost_usd));
      sumT += tk; sumC += num(p.cost_usd); sumR += num(p.requests);
    });
    sumEl.textContent = fmtInt(sumR) + " req" + DOT + fmtTok(sumT) + " tokens" + DOT + fmtCost(sumC);
    var ts = niceStep(maxT / 2), tm = ts * 2, cs = niceStep(maxC / 2), cm = cs * 2;
    var s = sv("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "Tokens and cost per " + kind });
    for (var i = 0; i <= 2; i++) {
      var y = T + ph - (i / 2) * ph;
      s.appendChild(sv("line", { "class": "gl", x1: L, x2: W - R, y1: y + 0.5, y2: y + 0.5 }));
      if (i === 0 || maxT > 0) s.appendChild(sv("text", { "class": "ax", x: L - 6, y: y + 4, "text-anchor": "end" }, fmtTok(ts * i)));
      if (i > 0 && maxC > 0) s.appendChild(sv("text", { "class": "ax", x: W - R + 6, y: y + 4, "text-anchor": "start" }, fmtCost(cs * i, true)));
    }
    var bw = pw / n, gap = Math.min(3, bw * 0.25), line = [];
    pts.forEach(function (p, i) {
      var x = L + i * bw, inH = ph * num(p.input_tokens) / tm, outH = ph * num(p.output_tokens) / tm;
      if (inH > 0) s.appendChild(sv("rect", { "class": "b-in", x: x + gap / 2, y: T + ph - inH, width: Math.max(1, bw - gap), height: inH }));
      if (outH > 0) s.appendChild(sv("rect", { "class": "b-out", x: x + gap / 2, y: T + ph - inH - outH, width: Math.max(1, bw - gap), height: outH }));
      line.push((i ? "L" : "M") + (x + bw / 2).toFixed(1) + " " + (T + ph - ph * num(p.cost_usd) / cm).toFixed(1));
    });
    if (maxC > 0) { s.appendChild(sv("path", { "class": "cl-h", d: line.join(" ") })); s.appendChild(sv("path", { "class": "cl", d: line.join(" ") })); }
    if (maxT === 0 && maxC === 0) s.appendChild(sv("text", { "class": "ax", x: L + pw / 2, y: T + ph / 2, "text-anchor": "middle" }, "No traffic in this period"));
    var steps = kind === "minute" ? [1, 2, 5, 10, 15, 20, 30] : [1, 2, 3, 4, 6, 8, 12], maxLab = Math.max(2, Math.floor(pw / 58)), step = steps[steps.length - 1];
    for (var j = 0; j < steps.length; j++) if (n / steps[j] <= maxLab) { step = steps[j]; break; }
    pts.forEach(function (p, i) {
      var x = L + i * bw, d = new Date(num(p.t));
      var label = pad(d.getHours()) + ":" + pad(d.getMinutes());
      if ((n - 1 - i) % step === 0) s.appendChild(sv("text", { "class": "ax", x: x + bw / 2, y: H - 6, "text-anchor": "middle" }, label));
      var hit = sv("rect", { "class": "hit", x: x, y: T, width: bw, height: ph });
      hit.appendChild(sv("title", {}, label + (kind === "hour" ? " (hour)" : "") + NL + fmtInt(p.requests) + " requests" + NL + fmtTok(p.input_tokens) + " in / " + fmtTok(p.output_tokens) + " out" + NL + fmtCost(p.cost_usd)));
      s.appendChild(hit);
    });
    box.replaceChildren(s);
  }

  function modelCell(provider, model) { var c = add(el("span", "mc"), el("span", "muted", str(provider) + "/"), str(model)); c.title = str(provider) + "/" + str(model); return c; }
  function renderModels(models) {
    var tb = $("models");
    if (!models.length) { noneRow(tb, 11, "No models configured."); return; }
    tb.replaceChildren.apply(tb, models.map(function (m) {
      var tr = row([{ node: modelCell(m.provider, m.model) }, { node: m.tier ? tag(str(m.tier)) : "" },
        { t: fmtInt(m.requests), cls: "n" }, { t: fmtInt(m.errors), cls: "n" + (num(m.errors) ? " err" : "") },
        { t: fmtTok(m.input_tokens), cls: "n" }, { t: fmtTok(m.output_tokens), cls: "n" }, { t: fmtCost(m.cost_usd), cls: "n" },
        { t: fmtMs(m.p50_ms), cls: "n" }, { t: fmtMs(m.p95_ms), cls: "n" }, { t: fmtMs(m.ttft_p50_ms), cls: "n" }, { t: fmtMs(m.ttft_p95_ms), cls: "n" }]);
      tr.setAttribute("data-model", str(m.provider) + "/" + str(m.model));
      return tr;
    }));
  }
  function barList(box, items, fmt, emptyText) {
    items = items.filter(function (x) { return x.v > 0; }).sort(function (a, b) { return b.v - a.v; });
    var max = items.length ? items[0].v : 0, total = items.reduce(function (a, x) { return a + x.v; }, 0);
    if (!items.length) { box.replaceChildren(el("div", "muted small", emptyText)); return; }
    var frag = document.createDocumentFragment();
    items.forEach(function (x) {
      var lab = el("span", "lab", x.label); lab.title = x.title || x.label;
      var f = el("div", "fill"); f.style.width = (100 * x.v / max).toFixed(1) + "%";
      var v = el("span", "n", fmt(x.v)); v.title = pctOf(x.v, total) + " of total";
      add(frag, lab, add(el("div", "track"), f), v);
    });
    box.replaceChildren(frag);
  }
  function renderBreakdown(d) {
    barList($("cost-providers"), (d.providers || []).map(function (p) { return { label: str(p.name || p.provider), v: num(p.cost_usd) }; }), fmtCost, "No spend in this window.");
    barList($("cost-models"), (d.models || []).map(function (m) { return { label: str(m.model), title: str(m.provider) + "/" + str(m.model), v: num(m.cost_usd) }; }), fmtCost, "No spend in this window.");
  }
  var ENTRY_NAMES = { chat: "Chat Completions", messages: "Anthropic Messages", responses: "OpenAI Responses" };
  function renderEntries(e) {
    barList($("entries"), Object.keys(ENTRY_NAMES).map(function (k) { return { label: ENTRY_NAMES[k], title: k, v: num(e[k]) }; }).filter(function (x) { return x.v > 0; }), fmtInt, "No requests in this window.");
  }
  function renderRouting(r) {
    var si = num(r.simple), co = num(r.complex), tot = si + co, fo = num(r.failovers);
    $("route-total").textContent = fmtInt(tot) + " routed requests";
    var a = el("span"), b = el("span");
    a.style.width = (tot ? 100 * si / tot : 0) + "%"; a.style.background = "var(--out)";
    b.style.width = (tot ? 100 * co / tot : 0) + "%"; b.style.background = "var(--in)";
    $("route-split").replaceChildren(a, b);
    var sw = function (c) { var i = el("i"); i.style.background = c; return i; };
    $("route-legend").replaceChildren(
      add(el("span", "", ""), sw("var(--out)"), "Simple ", el("b", "", fmtInt(si)), " (" + pctOf(si, tot) + ")"),
      add(el("span", "", ""), sw("var(--in)"), "Complex ", el("b", "", fmtInt(co)), " (" + pctOf(co, tot) + ")"));
    $("failovers").textContent = fmtInt(fo); $("failovers").setAttribute("data-value", String(fo));
    $("failover-share").textContent = fo ? "requests failed over to another model" : "no failovers";
    barList($("failover-reasons"), (r.failover_reasons || []).map(function (x) { return { label: str(x.reason), v: num(x.count) }; }), fmtInt, "");
  }
  function renderErrors(groups) {
    var tb = $("errors");
    if (!groups.length) { noneRow(tb, 5, "No errors " + C(8212) + " all good."); return; }
    groups = groups.slice().sort(function (a, b) { return num(b.last_ts) - num(a.last_ts); });
    tb.replaceChildren.apply(tb, groups.map(function (g) {
      var tr = row([{ t: g.provider }, { node: tag(str(g.kind), "red") }, { t: fmtInt(g.count), cls: "n" },
        { t: fmtTime(g.last_ts), title: has(g.last_ts) ? new Date(num(g.last_ts)).toLocaleString() : "" },
        { t: g.last_message, cls: "msg", title: str(g.last_message) }]);
      tr.setAttribute("data-provider", str(g.provider)); tr.setAttribute("data-kind", str(g.kind));
      return tr;
    }));
  }
  function renderRecent(all) {
    var tb = $("recent"), more = $("recent-more");
    all = all.slice().sort(function (a, b) { return num(b.ts) - num(a.ts); }).slice(0, 50);
    var list = recentAll ? all : all.slice(0, RECENT_FEW);
    $("recent-count").textContent = all.length ? "latest " + list.length + (list.length < all.length ? " of " + all.length : "") : "";
    more.hidden = all.length <= RECENT_FEW;
    more.textContent = recentAll ? "Show fewer" : "Show all " + all.length;
    if (!list.length) { noneRow(tb, 8, "No requests yet."); return; }
    tb.replaceChildren.apply(tb, list.map(function (q) {
      var code = num(q.status), ok = code >= 200 && code < 300 && !q.error;
      var route = add(el("span", "tags"), q.entry ? tag(str(q.entry)) : null, q.complexity ? tag(str(q.complexity)) : null, q.stream ? tag("stream") : null,
        num(q.attempts) > 1 ? tag(fmtInt(q.attempts) + " attempts", "amber") : null);
      var stat = add(el("span"), tag(str(q.status), ok ? "green" : code === 429 ? "amber" : "red"), q.error ? el("span", "err small", " " + str(q.error)) : null);
      var model = modelCell(q.provider, q.model);
      if (q.requested_model && str(q.requested_model) !== str(q.model)) model.title = "requested: " + str(q.requested_model);
      var tr = row([{ t: fmtTime(q.ts) }, { node: model }, { node: route },
        { t: fmtTok(q.input_tokens) + " / " + fmtTok(q.output_tokens), cls: "n" }, { t: fmtCost(q.cost_usd), cls: "n" },
        { t: fmtMs(q.latency_ms), cls: "n" }, { t: q.stream ? fmtMs(q.ttft_ms) : DASH, cls: "n" },
        { node: stat, cls: "msg", title: q.error ? str(q.error) : "" }]);
      tr.setAttribute("data-status", str(q.status));
      return tr;
    }));
  }

  /* ---------- start ---------- */
  try { var q = new URLSearchParams(location.search).get("window"); if (WINS.indexOf(q) >= 0) win = q; } catch (e) { /* ignore */ }
  paintWindow();
  window.addEventListener("resize", function () { clearTimeout(resizeT); resizeT = setTimeout(function () { if (last && !$("busy").hidden) drawCharts(); }, 120); });
  document.addEventListener("visibilitychange", function () { if (!document.hidden && $("auth").hidden) poll(); });
  poll();
})();
</script>
</body>
</html>`;

// ============================================================================================
// 14. main(): flags and environment, validation, listen, banner, clean shutdown. Guarded so that
//     importing this file (the tests do) starts nothing.
// ============================================================================================

const HELP = `TokenWatch ${VERSION}: a self-contained LLM router for AI agents.

Usage: node tokenwatch.ts [flags]          (Node >= 22.18)
       deno run -A tokenwatch.ts [flags]   (Deno 2)

Point an agent at http://127.0.0.1:8080: OpenAI Chat Completions clients at /v1, Claude Code with
ANTHROPIC_BASE_URL, Codex with a Responses provider. Requests go to Anthropic, Kimi or OpenAI by
rate-limit headroom, task complexity and cost; every request is logged with its cost.

Flags (override the environment, which overrides the config file); "--port 9000" or "--port=9000":
  --port N         port to listen on, 0 for any free one  (TOKENWATCH_PORT, default 8080)
  --host H         address to listen on                   (TOKENWATCH_HOST, default 127.0.0.1)
  --db PATH        SQLite file, or :memory:               (TOKENWATCH_DB, default ~/.tokenwatch/tokenwatch.db)
  --config PATH    JSON config merged over PROVIDERS      (TOKENWATCH_CONFIG)
  -h, --help       show this help
  -v, --version    print the version

Environment:
  ANTHROPIC_API_KEY, KIMI_API_KEY (or MOONSHOT_API_KEY), OPENAI_API_KEY   provider keys
  ANTHROPIC_BASE_URL (without /v1), KIMI_BASE_URL, OPENAI_BASE_URL (with /v1)
  TOKENWATCH_API_KEY       require this key (Bearer or x-api-key) on every route but /health
  TOKENWATCH_MAX_WAIT_MS   how long a request may wait for capacity (default 30000)
  TOKENWATCH_ALLOWED_HOSTS extra Host names to answer besides the listen address (comma-separated)
  TOKENWATCH_REDIS_URL     share limits and budgets with other instances (redis:// or rediss://)

Routes:
${ROUTE_DOCS.map(([route, doc]) => `  ${route.replace(/^GET /, "GET  ").padEnd(32)} ${doc}`).join("\n")}

Signals:
  Ctrl-C or SIGTERM   finish the requests in flight (up to 10 s), write every row, exit 0
  a second Ctrl-C     exit at once, without waiting

Exit status: 0 stopped cleanly, 1 bad config or cannot start, 2 bad flag or value, 130 second Ctrl-C.
`;

export class UsageError extends Error {}

export type Options = { port: number; host: string; db: string; configPath: string | undefined; help: boolean; version: boolean };

const FLAGS = new Set(["--port", "--host", "--db", "--config"]);

/** Flags override the environment; the environment overrides the defaults. Bad values throw UsageError. */
export function parseOptions(argv: string[], env: Record<string, string | undefined>): Options {
  const flags: Record<string, string> = {};
  let help = false, version = false;
  for (let i = 0; i < argv.length; i++) {
    const [name, inline] = argv[i].split(/=(.*)/s, 2);
    if (name === "--help" || name === "-h") { help = true; continue; }
    if (name === "--version" || name === "-v") { version = true; continue; }
    if (!name.startsWith("-")) throw new UsageError(`Unexpected argument ${JSON.stringify(argv[i])}: TokenWatch takes flags only, see --help.`);
    if (!FLAGS.has(name)) throw new UsageError(`Unknown flag ${JSON.stringify(argv[i])}: see --help.`);
    const value = inline ?? argv[++i];
    // "--db --port 1" forgot the path: taking "--port" as the path would hide that
    if (value === undefined || value === "" || (inline === undefined && value.startsWith("--"))) throw new UsageError(`Flag ${name} needs a value: see --help.`);
    flags[name.slice(2)] = value;
  }
  const portText = flags.port ?? env.TOKENWATCH_PORT ?? "8080";
  const port = Number(portText);
  const from = flags.port === undefined && env.TOKENWATCH_PORT !== undefined ? " (from TOKENWATCH_PORT)" : "";
  if (!/^\d+$/.test(portText) || port > 65535) throw new UsageError(`Port ${JSON.stringify(portText)} is not a port number from 0 to 65535${from}.`);
  const db = flags.db ?? env.TOKENWATCH_DB ?? resolve(homedir(), ".tokenwatch", "tokenwatch.db");
  return { port, host: flags.host ?? env.TOKENWATCH_HOST ?? "127.0.0.1", db, configPath: flags.config ?? env.TOKENWATCH_CONFIG, help, version };
}

/** Read and validate the config file; every problem becomes one line naming the file and the key. */
export function loadConfig(path: string | undefined, env: Record<string, string | undefined>, listen?: Listen): Config {
  let file: unknown = {};
  if (path) {
    let text: string;
    try { text = readFileSync(path, "utf8"); } catch (e) { throw new ConfigError(`Cannot read config ${JSON.stringify(path)}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`); }
    try { file = JSON.parse(text); } catch (e) { throw new ConfigError(`Cannot read config ${JSON.stringify(path)}: not valid JSON (${(e as Error).message})`); }
  }
  try { return buildConfig({ file, env, listen }); } catch (e) {
    if (e instanceof ConfigError) throw new ConfigError(`Invalid config${path ? ` ${JSON.stringify(path)}` : ""}: ${e.message}`);
    throw e;
  }
}

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|localhost|::1)$/;
const WILDCARD = /^(0\.0\.0\.0|::|)$/;

/**
 * The Host headers we answer: the address we listen on and, for loopback, its usual names, plus
 * TOKENWATCH_ALLOWED_HOSTS. Any other name is a DNS-rebinding attempt. A wildcard listener
 * (0.0.0.0, ::) cannot know its names, so it checks none unless they are listed.
 */
export function allowedHosts(host: string, port: number, extra = ""): Set<string> | undefined {
  const listed = extra.split(",").map((h) => h.trim().toLowerCase()).filter(Boolean);
  const wildcard = WILDCARD.test(host);
  if (wildcard && !listed.length) return undefined;
  const names = [...listed, ...(wildcard ? [] : [host.includes(":") ? `[${host}]` : host]), ...(LOOPBACK.test(host) ? ["127.0.0.1", "localhost", "[::1]"] : [])];
  return new Set(names.flatMap((h) => (/:\d+$/.test(h) ? [h] : [h, `${h}:${port}`])).map((h) => h.toLowerCase()));
}

/**
 * A WebSocket upgrade (Codex tries one on /v1/responses first) gets 426 at once, so that the client falls
 * back to plain HTTP without retrying.
 */
function refuseWebSocket(_req: IncomingMessage, socket: Duplex): void {
  const body = JSON.stringify(new TwError(426, "websocket_not_supported", "TokenWatch serves the Responses API over HTTP, not WebSocket: in Codex's provider config set supports_websockets = false (it falls back to HTTP on its own meanwhile).").body());
  socket.on("error", () => {});
  socket.end(`HTTP/1.1 426 Upgrade Required\r\nconnection: close\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
}

/** Open the database, or fail with one line that names the file. */
function openStore(path: string, config: Config, durable?: boolean): Store {
  try { return new Store(path, { durable, responseTtlMs: config.response_ttl_ms, maxResponses: config.max_kept_responses }); } catch (e) {
    throw new Error(`Cannot open database ${JSON.stringify(path)}: ${(e as Error).message} (pick another file with --db)`);
  }
}

export type Running = { url: string; port: number; server: http.Server; store: Store; router: Router; config: Config; close(drainMs?: number): Promise<void> };

/** Open the store and listen: what main() does, and what the tests call to get a real server. */
export async function start(opts: {
  config: Config; port?: number; host?: string; db?: string; env?: Record<string, string | undefined>; fetch?: typeof fetch; now?: () => number; log?: (l: string) => void;
  receiveTimeouts?: { headersTimeout: number; requestTimeout: number }; // slow-loris limits on receiving a request (tests shorten them)
  durable?: boolean;                                                    // false: answers do not wait for their row (the benchmark's comparison)
}): Promise<Running> {
  const env = opts.env ?? {};
  const host = opts.host ?? "127.0.0.1";
  const store = openStore(opts.db ?? ":memory:", opts.config, opts.durable);
  const deps: Deps = { store, fetch: opts.fetch, now: opts.now, apiKey: env.TOKENWATCH_API_KEY || undefined, log: opts.log };
  const router = createRouter(opts.config, deps);
  // Time limits on *receiving* a request (slow-loris); answers, streams included, may take as long as they need.
  // connectionsCheckingInterval: how often node:http looks for a request past those limits (30 s by
  // default, which let a slow client keep its connection up to 30 s longer than the limit says)
  const limits = { headersTimeout: 20_000, requestTimeout: 120_000, ...opts.receiveTimeouts };
  const server = http.createServer({ keepAliveTimeout: 65_000, ...limits, connectionsCheckingInterval: Math.min(1000, limits.headersTimeout / 4) }, (req, res) => void router.handle(req, res));
  server.on("upgrade", refuseWebSocket);
  await new Promise<void>((done, fail) => { server.once("error", fail); server.listen(opts.port ?? 0, host, () => { server.off("error", fail); done(); }); })
    .catch((e: unknown) => { store.close(); throw e; });
  const port = (server.address() as { port: number }).port;
  deps.allowedHosts = allowedHosts(host, port, env.TOKENWATCH_ALLOWED_HOSTS);
  const shown = host.includes(":") ? `[${host}]` : host;
  let closing: Promise<void> | undefined;
  const close = (drainMs = 10_000) => (closing ??= (async () => {
    server.close();
    await router.drain(drainMs);
    server.closeAllConnections();
    await router.drain(1_000); // the requests just cut off log their rows before the store closes
    router.stop();
    store.close();
  })());
  return { url: `http://${shown}:${port}`, port, server, store, router, config: opts.config, close };
}

/** What the operator needs at start: where things are, what is on and off and why, what needs attention. */
function banner(r: Running, opts: Options, env: Record<string, string | undefined>): string {
  const on = r.config.providers.filter((p) => p.enabled), off = r.config.providers.filter((p) => !p.enabled);
  const local = WILDCARD.test(opts.host) ? `http://127.0.0.1:${r.port}` : r.url; // a browser cannot open 0.0.0.0
  const lines = [
    `TokenWatch ${VERSION} listening on ${r.url}/v1`,
    `  dashboard  ${local}/`,
    `  database   ${r.store.path}`,
    `  enabled    ${on.map((p) => (p.apiKey ? p.id : `${p.id} (${p.why})`)).join(", ") || "none: set a provider key (see --help) or every request fails"}`,
  ];
  if (off.length) lines.push(`  disabled   ${off.map((p) => `${p.id}: ${p.why}`).join("; ")}`);
  const redis = r.config.redis;
  if (redis) lines.push(`  shared     limits and budgets through ${redactedUrl(redis.url)}${redis.instances ? `; alone, this instance takes 1/${redis.instances} of each limit` : "; set redis.instances so that an instance alone takes only its share"}`);
  for (const p of r.config.providers) if (p.note) lines.push(`  note       ${p.note}`);
  for (const m of r.config.models) if (m.eol && Date.parse(m.eol) <= Date.now()) lines.push(`  warning    ${m.key} reached its end of life on ${m.eol}: requests to it will fail; remove it or alias it to a current model`);
  if (!LOOPBACK.test(opts.host) && !env.TOKENWATCH_API_KEY) lines.push(`  warning    listening on ${opts.host} without TOKENWATCH_API_KEY: anyone who can reach this port can spend your tokens`);
  return lines.join("\n");
}

/** Why listening failed, in words, with the flag that fixes it. */
function listenProblem(e: NodeJS.ErrnoException): string {
  switch (e.code) {
    case "EADDRINUSE": return "the port is already in use (another TokenWatch?): stop that process, or pick another port with --port";
    case "EACCES": return "permission denied (ports below 1024 need privileges): pick another port with --port";
    case "EADDRNOTAVAIL": case "EINVAL": case "ENOTFOUND": case "EAI_AGAIN": // Deno says EINVAL where Node says EADDRNOTAVAIL
      return "this machine has no such address: pick another with --host (127.0.0.1 for this machine only)";
    default: return e.message;
  }
}

/** Exit after a clean stop: 0 when every row reached the database, 1 (saying so) when some could not. */
function exitStopped(r: Running): never {
  if (r.store.pending) {
    process.stderr.write(`tokenwatch: ${r.store.lastError ?? `Cannot write to ${r.store.path}`}: ${r.store.pending} row(s) lost\n`);
    process.exit(1);
  }
  process.stdout.write(`tokenwatch: stopped: ${r.store.written} row(s) written to ${r.store.path}\n`);
  process.exit(0);
}

const SECOND_SIGNAL_EXIT = { SIGINT: 130, SIGTERM: 143 } as const; // 128 + the signal's number, as shells report it

async function main(argv: string[]): Promise<void> {
  const env = process.env as Record<string, string | undefined>;
  // a closed terminal or pipe (`… | head`) must not crash a running router, nor stop it before its rows are written
  for (const out of [process.stdout, process.stderr]) out.on("error", () => {});
  let opts: Options, config: Config;
  try {
    opts = parseOptions(argv, env);
    if (opts.help) { process.stdout.write(HELP); return; }
    if (opts.version) { process.stdout.write(`${VERSION}\n`); return; }
    config = loadConfig(opts.configPath, env, opts.port ? { host: opts.host, port: opts.port } : undefined);
  } catch (e) {
    process.stderr.write(`tokenwatch: ${(e as Error).message}\n`);
    process.exit(e instanceof UsageError ? 2 : 1);
  }
  let running: Running;
  try {
    running = await start({ config, port: opts.port, host: opts.host, db: opts.db, env, log: (l) => process.stderr.write(`${l}\n`) });
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const where = `${opts.host.includes(":") ? `[${opts.host}]` : opts.host}:${opts.port}`;
    const listening = err.syscall === "listen" || err.syscall === "getaddrinfo";
    process.stderr.write(`tokenwatch: ${listening ? `Cannot listen on ${where}: ${listenProblem(err)}` : err.message}\n`);
    process.exit(1);
  }
  process.stdout.write(`${banner(running, opts, env)}\n`);
  let stopping = false;
  const stop = (signal: keyof typeof SECOND_SIGNAL_EXIT) => {
    if (stopping) { process.stderr.write(`tokenwatch: ${signal} again: exiting now, without waiting for requests in flight\n`); process.exit(SECOND_SIGNAL_EXIT[signal]); }
    stopping = true;
    process.stdout.write(`tokenwatch: ${signal}: finishing ${running.router.inflight} request(s) in flight (up to 10 s; Ctrl-C again to exit now), then writing the log\n`);
    running.close(10_000).then(() => exitStopped(running), (e) => { process.stderr.write(`tokenwatch: Cannot stop cleanly: ${(e as Error).message}\n`); process.exit(1); });
  };
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
}

/** True when this file is the program being run (directly or through a symlink), not an import. */
function isMain(): boolean {
  const meta = import.meta as ImportMeta & { main?: boolean };
  if (typeof meta.main === "boolean") return meta.main;
  try { return Boolean(process.argv[1]) && realpathSync(process.argv[1]) === realpathSync(fileURLToPath(import.meta.url)); } catch { return false; }
}

if (isMain()) void main(process.argv.slice(2));
