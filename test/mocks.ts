// Mock upstream LLM providers (OpenAI Chat Completions and Responses, Kimi/Moonshot, Anthropic Messages) for TokenWatch tests.
// Wire formats follow /work/shared/reference/providers.md (§1 OpenAI, §2 Anthropic, §3 Kimi, §6 pitfalls) and
// /work/shared/reference/ingress.md (§1 Claude Code's Messages traffic, §3 OpenAI Responses).
// Only node: built-ins; runs under Node's type stripping (erasable syntax only).
//
// Behaviour summary:
// - Every request that reaches the handler is recorded (parsed JSON body, or the raw string) before anything is validated.
// - Each request to a chat endpoint (POST /v1/chat/completions, POST /v1/responses (openai flavor), POST /v1/messages) takes
//   the next queued Script (or the default) on arrival, valid or not: chat completions and responses share one queue.
//   Authentication and request validation then run first: an invalid request gets the provider's real 4xx answer and its
//   script is spent. Scripts are only played for requests the real API would accept. Routes match the path only, so
//   Claude Code's `POST /v1/messages?beta=true` works.
// - GET /v1/models (and /v1/models/{id}) answers after auth and never consumes a script.
// - Anthropic: body fields that travel with a beta need its `anthropic-beta` value (context_management,
//   output_config.effort, tool defer_loading; system messages inside `messages`, for the models that take them), else 400
//   "<field>: Extra inputs are not permitted". `reply.thinking` answers
//   with a thinking block signed by this mock (see `mock.sign`); thinking blocks sent back must carry a signature this mock
//   issued for exactly that text. With thinking on, the last assistant turn that holds tool_use must start with thinking.
//   POST /v1/messages/count_tokens answers {"input_tokens": anthropicTokenCount(body)} and takes its scripts from its own
//   queue (`queueCount`), never from the chat queue. The key may come as x-api-key or `Authorization: Bearer` (x-api-key
//   wins); anthropic-version 2026-10-21 (what @anthropic-ai/sdk 1.x sends) applies that version's rules (no sampling fields).
// - OpenAI Responses: validated like the real API (unknown parameters, item shapes, tool-call pairing); responses with
//   `store` not false are remembered, so `previous_response_id` and `item_reference` resolve (or fail like the real API).
//   Streams follow ingress.md §3.4 (`event:` lines, sequence_number 0,1,2…); `stream-error` ends with `response.failed`.
// - Kimi: `reply.reasoning` becomes `reasoning_content` (JSON) and `delta.reasoning_content` chunks before the content.
// - Rate limits: fixed, generous headers by default. `mock.rateLimits({limits, others, enforce})` counts what the mock served
//   in a sliding 60 s window (plus `others`, a steady load from another client on the same key) and sends the provider's
//   headers computed from it; with `enforce`, a request that would exceed a limit gets the provider's real 429 and is not
//   counted. Every other request that passes validation counts, whatever its script. OpenAI and Kimi charge prompt tokens
//   (the usage estimate) + the request's max output tokens on arrival (when it names none, the real output is added when
//   the answer is made); Anthropic charges input tokens without cache reads on arrival and output tokens up front from
//   max_tokens, corrected to the real output when the answer is made. Real providers refill continuously (token bucket);
//   the sliding window is the simpler, stricter model. Kimi's header format is unknown (providers.md §3.1 #10), so Kimi
//   sends no rate-limit headers, only its 429s when enforcing.

import { createServer } from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { createHash, createHmac, randomBytes, randomUUID } from "node:crypto";

export type Flavor = "openai" | "kimi" | "anthropic";
export type Script =
  | {
      type: "reply"; text?: string; tool_calls?: { name: string; arguments: string }[]; usage?: Partial<MockUsage>; delayMs?: number; gapMs?: number; chunks?: number; finish?: string; headers?: Record<string, string>;
      /** Anthropic: a signed `thinking` block first (JSON and stream). */
      thinking?: string;
      /** Anthropic: a `redacted_thinking` block (after the thinking block, if any). */
      redactedThinking?: boolean;
      /** Kimi: `reasoning_content`; OpenAI Responses: a `reasoning` item first with this summary text. */
      reasoning?: string;
      /** OpenAI Responses: custom tool calls (`custom_tool_call` items, raw `input`). */
      custom_calls?: { name: string; input: string }[];
    }
  | { type: "error"; status: number; body?: unknown; headers?: Record<string, string> }
  | { type: "raw"; status: number; body: string; headers?: Record<string, string> }
  | { type: "hang" }
  | { type: "reset" }
  | { type: "stream-break"; afterChunks: number }
  | { type: "stream-error"; afterChunks: number; message?: string }
  | { type: "stall"; afterChunks: number };
export type MockUsage = { input: number; output: number; cached: number; cache_write: number };
export type RateLimitDims = { requests?: number; tokens?: number; input_tokens?: number; output_tokens?: number };
export type RateLimitOpts = { limits: RateLimitDims; others?: RateLimitDims; enforce?: boolean };
export type Recorded = { method: string; path: string; headers: Record<string, string | string[] | undefined>; body: any; raw: string; at: number };
export interface Mock {
  url: string;
  flavor: Flavor;
  key: string;
  requests: Recorded[];
  queue(...s: Script[]): void;
  setDefault(s: Script): void;
  /** Anthropic: scripts for POST /v1/messages/count_tokens (default: answer the count). */
  queueCount(...s: Script[]): void;
  /** Rate-limit accounting and headers; undefined restores the fixed default headers. */
  rateLimits(opts?: RateLimitOpts): void;
  /** Anthropic: the signature this mock issues for a thinking text (to build valid history by hand). */
  sign(thinking: string): string;
  openConnections(): number;
  closedRequests(): number;
  waitForClosedRequest(): Promise<void>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------------------------
// small helpers

type Json = Record<string, unknown>;
type Fail = { status?: number; message: string; param?: string | null; code?: string | null; type?: string };
type Frame = { lines: string[]; kind: "start" | "content" | "other" };
type ToolCall = { name: string; arguments: string };
type AnswerScript = Extract<Script, { type: "reply" | "stream-break" | "stream-error" | "stall" }>;

const DEFAULT_KEYS: Record<Flavor, string> = { openai: "sk-test-openai", kimi: "sk-test-kimi", anthropic: "sk-ant-test" };
const B62 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const noop = (): void => {};

function rand62(n: number): string {
  const b = randomBytes(n);
  let s = "";
  for (let i = 0; i < n; i++) s += B62[b[i] % 62];
  return s;
}
const hex = (n: number): string => randomBytes(Math.ceil(n / 2)).toString("hex").slice(0, n);
const isObj = (v: unknown): v is Json => typeof v === "object" && v !== null && !Array.isArray(v);
const isInt = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v);
const isNum = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);
const has = (o: Json, k: string): boolean => Object.prototype.hasOwnProperty.call(o, k) && o[k] !== undefined;

/** OpenAI-style type names used in its validation messages. */
function oaiType(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "string") return "a string";
  if (typeof v === "boolean") return "a boolean";
  if (typeof v === "number") return Number.isInteger(v) ? "an integer" : "a decimal";
  return "an object";
}

/** Split text into content pieces: one per word by default (leading whitespace kept with its word), or `chunks` pieces. */
function splitText(text: string, chunks?: number): string[] {
  if (text === "") return [];
  const words = text.match(/\s*\S+/g) ?? [text];
  const joined = words.join("");
  if (joined.length < text.length) words[words.length - 1] += text.slice(joined.length);
  if (chunks === undefined || !(chunks >= 1)) return words;
  let k = Math.floor(chunks);
  if (k <= words.length) {
    const out: string[] = [];
    for (let i = 0; i < k; i++) out.push(words.slice(Math.floor((i * words.length) / k), Math.floor(((i + 1) * words.length) / k)).join(""));
    return out;
  }
  const cps = Array.from(text);
  k = Math.min(k, cps.length);
  const out: string[] = [];
  for (let i = 0; i < k; i++) out.push(cps.slice(Math.floor((i * cps.length) / k), Math.floor(((i + 1) * cps.length) / k)).join(""));
  return out;
}

/** Split a tool-argument string in about two fragments. */
function halves(s: string): string[] {
  const cps = Array.from(s);
  if (cps.length === 0) return [];
  if (cps.length < 2) return [s];
  const m = Math.ceil(cps.length / 2);
  return [cps.slice(0, m).join(""), cps.slice(m).join("")];
}

const wordCount = (t: string): number => t.split(/\s+/).filter(Boolean).length;

function maskKey(k: string): string {
  if (k.length <= 8) return "*".repeat(Math.max(k.length, 4));
  const head = k.slice(0, Math.min(8, Math.floor(k.length / 3)));
  const tail = k.length >= 16 ? k.slice(-4) : "";
  return head + "*".repeat(k.length - head.length - tail.length) + tail;
}

// ---------------------------------------------------------------------------------------------------------------
// error bodies

function anthropicErrorType(status: number): string {
  switch (status) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 402: return "billing_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 500: return "api_error";
    case 504: return "timeout_error";
    case 529: return "overloaded_error";
    default: return status >= 500 ? "api_error" : "invalid_request_error";
  }
}

function errorPayload(flavor: Flavor, status: number, f: Fail, requestId: string): unknown {
  if (flavor === "anthropic") return { type: "error", error: { type: f.type ?? anthropicErrorType(status), message: f.message }, request_id: requestId };
  if (flavor === "kimi") return { error: { type: f.type ?? (status >= 500 ? "server_error" : "invalid_request_error"), message: f.message } };
  return { error: { message: f.message, type: f.type ?? (status >= 500 ? "server_error" : "invalid_request_error"), param: f.param ?? null, code: f.code ?? null } };
}

/** The flavor's real-looking error for a scripted status. */
function defaultError(flavor: Flavor, status: number, model: string, key: string): Fail {
  if (flavor === "anthropic") {
    const type = anthropicErrorType(status);
    const messages: Record<string, string> = {
      invalid_request_error: "Invalid request",
      authentication_error: "invalid x-api-key",
      billing_error: "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
      permission_error: "Your API key does not have permission to use the specified resource.",
      not_found_error: `model: ${model}`,
      request_too_large: "Request exceeds the maximum allowed number of bytes.",
      rate_limit_error: "This request would exceed the rate limit for your organization of 30,000 input tokens per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.",
      api_error: "Internal server error",
      timeout_error: "Request timed out",
      overloaded_error: "Overloaded",
    };
    return { type, message: messages[type] ?? "Error" };
  }
  if (flavor === "kimi") {
    switch (status) {
      case 400: return { type: "invalid_request_error", message: "Invalid request: the request is invalid" };
      case 401: return { type: "invalid_authentication_error", message: "Invalid Authentication" };
      case 403: return { type: "exceeded_current_quota_error", message: "Your account org-mock is suspended, please check your plan and billing details" };
      case 404: return { type: "resource_not_found_error", message: `Not found the model ${model} or Permission denied` };
      case 429: return { type: "rate_limit_reached_error", message: "Your account org-mock request reached organization max RPM: 3, please try again after 1 seconds" };
      default: return status >= 500 ? { type: "server_error", message: "Unexpected server error, please try again later" } : { type: "invalid_request_error", message: "Invalid request" };
    }
  }
  switch (status) {
    case 400: return { message: "Invalid request.", type: "invalid_request_error" };
    case 401: return { message: `Incorrect API key provided: ${maskKey(key)}. You can find your API key at https://platform.openai.com/account/api-keys.`, type: "invalid_request_error", code: "invalid_api_key" };
    case 403: return { message: "Country, region, or territory not supported", type: "request_forbidden", code: "unsupported_country_region_territory" };
    case 404: return { message: `The model \`${model}\` does not exist or you do not have access to it.`, type: "invalid_request_error", code: "model_not_found" };
    case 408: return { message: "Request timed out.", type: "invalid_request_error" };
    case 409: return { message: "The request could not be completed due to a conflict. Please retry.", type: "invalid_request_error" };
    case 422: return { message: "Unprocessable request.", type: "invalid_request_error" };
    case 429: return { message: `Rate limit reached for ${model} in organization org-mock on tokens per min (TPM): Limit 30000, Used 29937, Requested 385. Please try again in 644ms. Visit https://platform.openai.com/account/rate-limits to learn more.`, type: "tokens", code: "rate_limit_exceeded" };
    case 500: return { message: "The server had an error while processing your request. Sorry about that!", type: "server_error" };
    case 502: return { message: "Bad gateway.", type: "server_error" };
    case 503: return { message: "The server is overloaded or not ready yet.", type: "server_error" };
    default: return status >= 500 ? { message: "The server had an error while processing your request. Sorry about that!", type: "server_error" } : { message: "Invalid request.", type: "invalid_request_error" };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// OpenAI / Kimi request validation (§1.1, §3.1, §6)

const OPENAI_FIELDS = [
  "model", "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format", "max_tokens", "max_completion_tokens",
  "temperature", "top_p", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "stop", "n", "stream",
  "stream_options", "user", "seed", "reasoning_effort", "metadata", "store", "service_tier", "modalities", "audio", "prediction",
  "verbosity", "web_search_options", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
];
const OPENAI_ALLOWED = new Set(OPENAI_FIELDS);
// Kimi: no max_completion_tokens; accepts `thinking` ({type:"enabled"|"disabled"}, kimi-k2.5+; reference §3.1.5).
const KIMI_ALLOWED = new Set([...OPENAI_FIELDS.filter((f) => f !== "max_completion_tokens"), "thinking"]);
const OPENAI_ROLES = ["system", "developer", "user", "assistant", "tool", "function"];
// Keys a message may carry. OpenAI refuses others ("Additional properties are not allowed ('id' was unexpected) - 'messages.0'");
// Kimi also takes `reasoning_content` and, with thinking on (k2.5+ by default), requires it on assistant tool-call turns.
const MESSAGE_KEYS = new Set(["role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"]);
const thinksByDefault = (model: string) => /^kimi-k2\.[5-9]|^kimi-k[3-9]/.test(model);

/** OpenAI's check of a numeric field (type, then range), in its real words; shared by Chat Completions and Responses. */
function openAIRange(body: Json, bad: (message: string, param: string, code: string) => Fail, wrongType: (p: string, want: string, v: unknown) => Fail) {
  return (name: string, lo: number, hi: number, integer = false): Fail | null => {
    if (!has(body, name) || body[name] === null) return null;
    const v = body[name];
    if (integer ? !isInt(v) : !isNum(v)) return wrongType(name, integer ? "an integer" : "a decimal", v);
    const kind = integer ? "integer" : "decimal";
    if ((v as number) < lo) return bad(`Invalid '${name}': ${kind} below minimum value. Expected a value >= ${lo}, but got ${String(v)} instead.`, name, `${kind}_below_min_value`);
    if ((v as number) > hi) return bad(`Invalid '${name}': ${kind} above maximum value. Expected a value <= ${hi}, but got ${String(v)} instead.`, name, `${kind}_above_max_value`);
    return null;
  };
}

function validateOpenAI(flavor: "openai" | "kimi", body: unknown): Fail | null {
  const kimi = flavor === "kimi";
  // Kimi errors carry no param/code; its messages are prefixed "Invalid request: ".
  const bad = (message: string, param: string | null = null, code: string | null = null): Fail =>
    kimi ? { message: `Invalid request: ${message}` } : { message, param, code };
  const missing = (p: string): Fail => bad(`Missing required parameter: '${p}'.`, p, "missing_required_parameter");
  const wrongType = (p: string, want: string, v: unknown): Fail => bad(`Invalid type for '${p}': expected ${want}, but got ${oaiType(v)} instead.`, p, "invalid_type");

  if (!isObj(body)) return bad("Invalid type for request body: expected an object.", null, "invalid_type");
  const allowed = kimi ? KIMI_ALLOWED : OPENAI_ALLOWED;
  for (const k of Object.keys(body)) {
    if (!allowed.has(k)) return kimi ? { message: `Unrecognized request argument supplied: ${k}` } : { message: `Unrecognized request argument supplied: ${k}`, param: null, code: null };
  }
  if (typeof body.model !== "string" || body.model === "") return kimi ? { message: "Invalid request: model is required" } : { message: "you must provide a model parameter" };
  const model = body.model;

  // messages
  if (!has(body, "messages")) return missing("messages");
  const msgs = body.messages;
  if (!Array.isArray(msgs)) return wrongType("messages", "an array", msgs);
  if (msgs.length === 0) return bad("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.", "messages", "empty_array");
  for (let i = 0; i < msgs.length; i++) {
    const m: unknown = msgs[i];
    const p = `messages[${i}]`;
    if (!isObj(m)) return wrongType(p, "an object", m);
    if (!has(m, "role")) return missing(`${p}.role`);
    if (typeof m.role !== "string" || !OPENAI_ROLES.includes(m.role)) {
      return bad(`Invalid value: '${String(m.role)}'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'.`, `${p}.role`, "invalid_value");
    }
    const role = m.role;
    const c = m.content;
    const extra = Object.keys(m).find((k) => !MESSAGE_KEYS.has(k) && !(kimi && k === "reasoning_content"));
    if (extra !== undefined) {
      return kimi ? { message: `Invalid request: unknown field ${extra} in messages[${i}]` } : { message: `Additional properties are not allowed ('${extra}' was unexpected) - 'messages.${i}'`, param: null, code: null };
    }
    const thinking = !(isObj(body.thinking) && body.thinking.type === "disabled") && thinksByDefault(model);
    if (kimi && thinking && role === "assistant" && Array.isArray(m.tool_calls) && m.tool_calls.length > 0 && typeof m.reasoning_content !== "string") {
      return { message: `thinking is enabled but reasoning_content is missing in assistant tool call message at index ${i}` };
    }
    if (role === "assistant") {
      const tc = m.tool_calls;
      const hasCalls = Array.isArray(tc) && tc.length > 0;
      if (tc !== undefined && tc !== null && !Array.isArray(tc)) return wrongType(`${p}.tool_calls`, "an array", tc);
      if ((c === undefined || c === null) && !hasCalls && !has(m, "function_call")) {
        return bad("Invalid value for 'content': expected a string, got null.", `messages.[${i}].content`);
      }
      if (c !== undefined && c !== null && typeof c !== "string" && !Array.isArray(c)) return wrongType(`${p}.content`, "one of a string or array of objects", c);
      if (Array.isArray(tc)) {
        for (let j = 0; j < tc.length; j++) {
          const call: unknown = tc[j];
          const q = `${p}.tool_calls[${j}]`;
          if (!isObj(call)) return wrongType(q, "an object", call);
          if (typeof call.id !== "string") return missing(`${q}.id`);
          if (call.type !== "function") return call.type === undefined ? missing(`${q}.type`) : bad(`Invalid value: '${String(call.type)}'. Supported values are: 'function'.`, `${q}.type`, "invalid_value");
          if (!isObj(call.function)) return missing(`${q}.function`);
          if (typeof call.function.name !== "string") return missing(`${q}.function.name`);
          if (typeof call.function.arguments !== "string") return call.function.arguments === undefined ? missing(`${q}.function.arguments`) : wrongType(`${q}.function.arguments`, "a string", call.function.arguments);
        }
      }
    } else {
      if (c === undefined) return missing(`${p}.content`);
      if (c === null || (typeof c !== "string" && !Array.isArray(c))) {
        return bad(`Invalid value for 'content': expected a string, got ${c === null ? "null" : oaiType(c).replace(/^an? /, "")}.`, `messages.[${i}].content`);
      }
      if (Array.isArray(c)) {
        if (c.length === 0 && role !== "assistant") return bad(`Invalid '${p}.content': empty array. Expected an array with minimum length 1, but got an empty array instead.`, `${p}.content`, "empty_array");
        const partTypes = role === "user" ? ["text", "image_url", "input_audio", "file"] : ["text"];
        for (let j = 0; j < c.length; j++) {
          const part: unknown = c[j];
          const q = `${p}.content[${j}]`;
          if (!isObj(part)) return wrongType(q, "an object", part);
          if (typeof part.type !== "string" || !partTypes.includes(part.type)) {
            return bad(`Invalid value: '${String(part.type)}'. Supported values are: ${partTypes.map((t) => `'${t}'`).join(", ")}.`, `${q}.type`, "invalid_value");
          }
          if (part.type === "text" && typeof part.text !== "string") return part.text === undefined ? missing(`${q}.text`) : wrongType(`${q}.text`, "a string", part.text);
          if (part.type === "image_url") {
            if (!isObj(part.image_url)) return missing(`${q}.image_url`);
            if (typeof part.image_url.url !== "string") return missing(`${q}.image_url.url`);
          }
        }
      }
      if (role === "tool" && typeof m.tool_call_id !== "string") {
        return bad("Missing parameter 'tool_call_id': messages with role 'tool' must have a 'tool_call_id'.", `messages.[${i}].tool_call_id`);
      }
      if (role === "function" && typeof m.name !== "string") {
        return bad("Missing parameter 'name': messages with role 'function' must have a 'name'.", `messages.[${i}].name`);
      }
    }
  }

  // tool-call pairing (§6): tool messages must answer the immediately preceding assistant tool_calls
  for (let i = 0; i < msgs.length; i++) {
    const m = msgs[i] as Json;
    if (m.role === "tool") {
      let j = i - 1;
      while (j >= 0 && (msgs[j] as Json).role === "tool") j--;
      const prev = j >= 0 ? (msgs[j] as Json) : undefined;
      const calls = prev && prev.role === "assistant" && Array.isArray(prev.tool_calls) ? (prev.tool_calls as Json[]) : [];
      if (calls.length === 0) {
        return kimi
          ? { message: `Invalid request: tool_call_id ${String(m.tool_call_id)} is not found` }
          : bad("Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.", `messages.[${i}].role`);
      }
      if (!calls.some((c) => c.id === m.tool_call_id)) {
        return kimi
          ? { message: `Invalid request: tool_call_id ${String(m.tool_call_id)} is not found` }
          : bad(`Invalid parameter: 'tool_call_id' of '${String(m.tool_call_id)}' not found in 'tool_calls' of previous message.`, `messages.[${i}].tool_call_id`);
      }
    } else if (!kimi && m.role === "assistant" && Array.isArray(m.tool_calls) && m.tool_calls.length > 0) {
      const answered = new Set<unknown>();
      let j = i + 1;
      for (; j < msgs.length && (msgs[j] as Json).role === "tool"; j++) answered.add((msgs[j] as Json).tool_call_id);
      const unanswered = (m.tool_calls as Json[]).map((c) => c.id).filter((id) => !answered.has(id));
      if (unanswered.length > 0) {
        return bad(`An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: ${unanswered.join(", ")}`, `messages.[${j}].role`);
      }
    }
  }

  // tools / tool_choice
  const hasTools = Array.isArray(body.tools) && body.tools.length > 0;
  if (has(body, "tools") && body.tools !== null) {
    const tools = body.tools;
    if (!Array.isArray(tools)) return wrongType("tools", "an array", tools);
    if (tools.length === 0 && !kimi) return bad("Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array instead.", "tools", "empty_array");
    for (let i = 0; i < tools.length; i++) {
      const t: unknown = tools[i];
      const p = `tools[${i}]`;
      if (!isObj(t)) return wrongType(p, "an object", t);
      if (t.type === "custom" && !kimi) {
        if (!isObj(t.custom) || typeof t.custom.name !== "string") return missing(`${p}.custom.name`);
        continue;
      }
      if (t.type !== "function") return t.type === undefined ? missing(`${p}.type`) : bad(`Invalid value: '${String(t.type)}'. Supported values are: 'function' and 'custom'.`, `${p}.type`, "invalid_value");
      if (!isObj(t.function)) return missing(`${p}.function`);
      if (typeof t.function.name !== "string") return missing(`${p}.function.name`);
      if (!/^[a-zA-Z0-9_-]{1,64}$/.test(t.function.name)) {
        return bad(`Invalid '${p}.function.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.`, `${p}.function.name`, "invalid_value");
      }
      if (has(t.function, "parameters") && !isObj(t.function.parameters)) return wrongType(`${p}.function.parameters`, "an object", t.function.parameters);
    }
  }
  if (has(body, "tool_choice") && body.tool_choice !== null) {
    const tc = body.tool_choice;
    if (typeof tc === "string") {
      if (!["none", "auto", "required"].includes(tc)) return bad(`Invalid value: '${tc}'. Supported values are: 'none', 'auto', and 'required'.`, "tool_choice", "invalid_value");
      if (kimi && tc === "required") return { message: "Invalid request: tool_choice 'required' is not supported" };
    } else if (isObj(tc)) {
      if (tc.type === "function") {
        if (!isObj(tc.function) || typeof tc.function.name !== "string") return missing("tool_choice.function.name");
      } else if (kimi || (tc.type !== "allowed_tools" && tc.type !== "custom")) {
        return bad(`Invalid value: '${String(tc.type)}'. Supported values are: 'function', 'allowed_tools' and 'custom'.`, "tool_choice.type", "invalid_value");
      }
    } else return wrongType("tool_choice", "one of a string or object", tc);
    if (!hasTools && !kimi) return bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.", "tool_choice");
  }
  if (has(body, "parallel_tool_calls") && body.parallel_tool_calls !== null) {
    if (typeof body.parallel_tool_calls !== "boolean") return wrongType("parallel_tool_calls", "a boolean", body.parallel_tool_calls);
    if (!hasTools && !kimi) return bad("Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' are specified.", "parallel_tool_calls");
  }

  // stream / stream_options
  if (has(body, "stream") && body.stream !== null && typeof body.stream !== "boolean") return wrongType("stream", "a boolean", body.stream);
  if (has(body, "stream_options") && body.stream_options !== null) {
    if (body.stream !== true) return bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options");
    if (!isObj(body.stream_options)) return wrongType("stream_options", "an object", body.stream_options);
  }

  // stop
  if (has(body, "stop") && body.stop !== null) {
    const s = body.stop;
    if (Array.isArray(s)) {
      if (s.length > 4) return bad(`Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length ${s.length} instead.`, "stop", "array_above_max_length");
      if (s.some((x) => typeof x !== "string")) return wrongType("stop", "an array of strings", s);
    } else if (typeof s !== "string") return wrongType("stop", "one of a string or array of strings", s);
  }

  // numeric ranges
  const range = openAIRange(body, bad, wrongType);
  if (kimi && has(body, "temperature") && body.temperature !== null) {
    const t = body.temperature;
    if (!isNum(t) || t < 0 || t > 1) return { type: "invalid_request_error", message: "Invalid request: temperature must be in [0, 1]" };
  }
  const numeric =
    range("temperature", 0, 2) ?? range("top_p", 0, 1) ?? range("frequency_penalty", -2, 2) ?? range("presence_penalty", -2, 2) ??
    range("top_logprobs", 0, 20, true) ?? range("n", 1, kimi ? 5 : 128, true) ?? range("max_tokens", 1, Number.MAX_SAFE_INTEGER, true) ??
    range("max_completion_tokens", 1, Number.MAX_SAFE_INTEGER, true) ?? range("seed", Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, true);
  if (numeric) return numeric;
  if (has(body, "logprobs") && body.logprobs !== null && typeof body.logprobs !== "boolean") return wrongType("logprobs", "a boolean", body.logprobs);
  if (has(body, "response_format") && body.response_format !== null) {
    const rf = body.response_format;
    if (!isObj(rf)) return wrongType("response_format", "an object", rf);
    if (!["text", "json_object", "json_schema"].includes(String(rf.type))) {
      return bad(`Invalid value: '${String(rf.type)}'. Supported values are: 'text', 'json_object', and 'json_schema'.`, "response_format.type", "invalid_value");
    }
    if (rf.type === "json_schema" && (!isObj(rf.json_schema) || typeof rf.json_schema.name !== "string")) return missing("response_format.json_schema.name");
  }

  // model-specific rules (§1.5, §3.1.4, §6)
  if (!kimi) {
    const reasoning = /^(o\d|gpt-5)/.test(model) && !model.includes("chat");
    const classic = /^(gpt-4|gpt-3\.5|chatgpt-)/.test(model) || (/^gpt-5/.test(model) && model.includes("chat"));
    if (reasoning && has(body, "max_tokens") && body.max_tokens !== null) {
      return { message: "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", param: "max_tokens", code: "unsupported_parameter" };
    }
    if (reasoning && isNum(body.temperature) && body.temperature !== 1) {
      return { message: `Unsupported value: 'temperature' does not support ${String(body.temperature)} with this model. Only the default (1) value is supported.`, param: "temperature", code: "unsupported_value" };
    }
    if (classic && has(body, "reasoning_effort") && body.reasoning_effort !== null) {
      return { message: "Unsupported parameter: 'reasoning_effort' is not supported with this model.", param: "reasoning_effort", code: "unsupported_parameter" };
    }
  } else if (/^kimi-k(2\.[5-9]|[3-9])/.test(model)) {
    if (isNum(body.temperature) && body.temperature !== 1) return { message: "invalid temperature: only 1 is allowed for this model" };
    if (isNum(body.top_p) && body.top_p !== 0.95) return { message: "invalid top_p: only 0.95 is allowed for this model" };
  }
  return null;
}

// ---------------------------------------------------------------------------------------------------------------
// Anthropic request validation (§2.1, §6)

const ANTHROPIC_ALLOWED = new Set([
  "model", "max_tokens", "messages", "system", "tools", "tool_choice", "stop_sequences", "temperature", "top_p", "top_k", "stream",
  "metadata", "thinking", "service_tier", "output_config", "container", "mcp_servers", "context_management", "inference_geo",
  "cache_control", "speed",
]);
// POST /v1/messages/count_tokens (SDK MessageCountTokensParams, beta: + context_management, mcp_servers): no max_tokens,
// stream, sampling, stop_sequences, metadata or service_tier.
const COUNT_ALLOWED = new Set([
  "model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "cache_control", "speed", "context_management", "mcp_servers",
]);
// Body fields that travel with a beta (Claude Code gateway protocol, "Feature pass-through"): without the header the API
// answers 400 "<field>: Extra inputs are not permitted". `output_config.format` and tool `strict` (structured outputs) are
// GA in the SDK's non-beta types, so they need no header.
const BETA_CONTEXT_MANAGEMENT = "context-management-2025-06-27";
const BETA_EFFORT = "effort-2025-11-24";
const BETA_ADVANCED_TOOL_USE = "advanced-tool-use-2025-11-20";
// anthropic-version values. 2026-10-21 (SDK majors of that day: TypeScript 1.0.0, Python 2.0.0) removes temperature, top_p
// and top_k ("temperature: Extra inputs are not permitted", even at 1.0) and refuses document blocks in assistant messages
// and non-empty citations on user text blocks (platform.claude.com/docs/en/api/versioning).
const ANTHROPIC_VERSIONS = ["2023-01-01", "2023-06-01", "2026-10-21"];
const NEW_VERSION = "2026-10-21";
const EFFORTS = ["low", "medium", "high", "xhigh", "max"];
const THINKING_ON = (body: Json): boolean => isObj(body.thinking) && (body.thinking.type === "enabled" || body.thinking.type === "adaptive");
/** What a Messages request is checked against besides its body: its betas, the route, and the mock's thinking signatures. */
type AnthropicCheck = { betas?: ReadonlySet<string>; count?: boolean; version?: string; signed?: (thinking: string, signature: string) => boolean };
const ANTHROPIC_BLOCK_TYPES = [
  "text", "image", "document", "search_result", "tool_use", "tool_result", "thinking", "redacted_thinking", "server_tool_use",
  "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result", "bash_code_execution_tool_result",
  "text_editor_code_execution_tool_result", "tool_search_tool_result", "mcp_tool_use", "mcp_tool_result", "container_upload",
];
const IMAGE_TYPES = ["image/jpeg", "image/png", "image/gif", "image/webp"];
const TOOL_ID = /^[a-zA-Z0-9_-]+$/;

const BETA_MID_CONVERSATION_SYSTEM = "mid-conversation-system-2026-04-07";
// models that take system messages inside `messages` (Opus 4.8 and 5, Fable, Mythos; not Sonnet 5): test/fixtures/README.md
const MID_SYSTEM_MODELS = /^claude-(opus-(4-8|5)|fable|mythos)/;

function validateAnthropic(body: unknown, check: AnthropicCheck = {}): Fail | null {
  const bad = (message: string): Fail => ({ message });
  const betas = check.betas ?? new Set<string>();
  if (!isObj(body)) return bad("Input should be a valid dictionary");
  const allowed = check.count ? COUNT_ALLOWED : ANTHROPIC_ALLOWED;
  const removed = check.version === NEW_VERSION ? ["temperature", "top_p", "top_k"] : [];
  for (const k of Object.keys(body)) if (!allowed.has(k) || removed.includes(k)) return bad(`${k}: Extra inputs are not permitted`);
  if (has(body, "context_management") && !betas.has(BETA_CONTEXT_MANAGEMENT)) return bad("context_management: Extra inputs are not permitted");
  if (!has(body, "model")) return bad("model: Field required");
  if (typeof body.model !== "string") return bad("model: Input should be a valid string");
  if (!check.count) {
    if (!has(body, "max_tokens")) return bad("max_tokens: Field required");
    if (!isInt(body.max_tokens)) return bad("max_tokens: Input should be a valid integer");
    if (body.max_tokens < 0) return bad("max_tokens: Input should be greater than or equal to 0");
  }
  if (!has(body, "messages")) return bad("messages: Field required");
  const msgs = body.messages;
  if (!Array.isArray(msgs)) return bad("messages: Input should be a valid list");
  if (msgs.length === 0) return bad("messages: at least one message is required");

  // per-message shape; normalised copy for the pairing check
  type Norm = { role: string; blocks: Json[]; index: number };
  const norm: Norm[] = [];
  for (let i = 0; i < msgs.length; i++) {
    const m: unknown = msgs[i];
    const p = `messages.${i}`;
    if (!isObj(m)) return bad(`${p}: Input should be a valid dictionary`);
    for (const k of Object.keys(m)) if (k !== "role" && k !== "content") return bad(`${p}.${k}: Extra inputs are not permitted`);
    if (!has(m, "role")) return bad(`${p}.role: Field required`);
    if (m.role === "system") {
      // mid-conversation system messages (what Claude Code 2.1.154+ sends) need their beta and a model that takes them
      if (!betas.has(BETA_MID_CONVERSATION_SYSTEM) || !MID_SYSTEM_MODELS.test(String(body.model)))
        return bad('messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, not "system" as an input message role.');
      const text = typeof m.content === "string" ? m.content : Array.isArray(m.content) && m.content.every((b) => isObj(b) && b.type === "text" && typeof b.text === "string") ? "ok" : "";
      if (!text) return bad(`${p}.content: a system message holds text only`);
      if (i === 0 || (msgs[i - 1] as Json)?.role !== "user") return bad(`${p}: a system message must follow a user message`);
      continue;
    }
    if (m.role !== "user" && m.role !== "assistant") return bad(`${p}.role: Input should be 'user' or 'assistant'`);
    const role = m.role;
    const isFinalAssistant = role === "assistant" && i === msgs.length - 1;
    if (!has(m, "content")) return bad(`${p}.content: Field required`);
    const c = m.content;
    let blocks: Json[];
    if (typeof c === "string") {
      if (c === "") {
        if (!isFinalAssistant) return bad("messages: all messages must have non-empty content except for the optional final assistant message");
      } else if (c.trim() === "") {
        return bad("messages: text content blocks must contain non-whitespace text");
      }
      blocks = c === "" ? [] : [{ type: "text", text: c }];
    } else if (Array.isArray(c)) {
      if (c.length === 0 && !isFinalAssistant) return bad("messages: all messages must have non-empty content except for the optional final assistant message");
      blocks = [];
      for (let j = 0; j < c.length; j++) {
        const b: unknown = c[j];
        const q = `${p}.content.${j}`;
        if (!isObj(b)) return bad(`${q}: Input should be a valid dictionary`);
        if (typeof b.type !== "string") return bad(`${q}: Unable to extract tag using discriminator 'type'`);
        if (!ANTHROPIC_BLOCK_TYPES.includes(b.type)) {
          return bad(`${q}: Input tag '${b.type}' found using 'type' does not match any of the expected tags: ${ANTHROPIC_BLOCK_TYPES.map((t) => `'${t}'`).join(", ")}`);
        }
        const f = validateAnthropicBlock(b, q, role);
        if (f) return f;
        if (check.version === NEW_VERSION) {
          // the refusals are documented; their wordings are not (these follow the tool_use/tool_result ones)
          if (role === "assistant" && b.type === "document") return bad(`${q}: \`document\` blocks can only appear in user messages`);
          if (role === "user" && b.type === "text" && Array.isArray(b.citations) && b.citations.length > 0) return bad(`${q}.text.citations: Extra inputs are not permitted`);
        }
        if (b.type === "thinking" && check.signed && !check.signed(String(b.thinking), String(b.signature))) {
          return bad(`${q}: Invalid \`signature\` in \`thinking\` block`);
        }
        blocks.push(b);
      }
      const firstType = blocks.length > 0 ? String(blocks[0].type) : "";
      if (blocks.some((b) => b.type === "thinking" || b.type === "redacted_thinking") && firstType !== "thinking" && firstType !== "redacted_thinking") {
        return bad(`${p}.content.0: If an assistant message contains any thinking blocks, the first block must be thinking or redacted_thinking. Found ${firstType}.`);
      }
    } else {
      return bad(`${p}.content: Input should be a valid list`);
    }
    if (isFinalAssistant) {
      const last = blocks[blocks.length - 1];
      if (last && last.type === "text" && typeof last.text === "string" && /\s$/.test(last.text)) {
        return bad("messages: final assistant content cannot end with trailing whitespace");
      }
    }
    norm.push({ role, blocks, index: i });
  }

  // merge consecutive same-role turns (the API combines them), then check tool_use / tool_result pairing
  const turns: Norm[] = [];
  for (const n of norm) {
    const prev = turns[turns.length - 1];
    if (prev && prev.role === n.role) prev.blocks = [...prev.blocks, ...n.blocks];
    else turns.push({ role: n.role, blocks: [...n.blocks], index: n.index });
  }
  for (let t = 0; t < turns.length; t++) {
    const turn = turns[t];
    if (turn.role !== "user") continue;
    const prev = t > 0 ? turns[t - 1] : undefined;
    const useIds = new Set(prev ? prev.blocks.filter((b) => b.type === "tool_use").map((b) => b.id) : []);
    const results = turn.blocks.map((b, j) => ({ b, j })).filter((x) => x.b.type === "tool_result");
    for (const r of results) {
      if (!useIds.has(r.b.tool_use_id)) {
        return bad(`messages.${turn.index}.content.${r.j}: unexpected \`tool_use_id\` found in \`tool_result\` blocks: ${String(r.b.tool_use_id)}. Each \`tool_result\` block must have a corresponding \`tool_use\` block in the previous message.`);
      }
    }
  }
  for (let t = 0; t < turns.length; t++) {
    const turn = turns[t];
    if (turn.role !== "assistant") continue;
    const ids = turn.blocks.filter((b) => b.type === "tool_use").map((b) => String(b.id));
    if (ids.length === 0 || t === turns.length - 1) continue;
    const next = turns[t + 1];
    const resultIds = new Set(next.blocks.filter((b) => b.type === "tool_result").map((b) => String(b.tool_use_id)));
    const missingIds = ids.filter((id) => !resultIds.has(id));
    if (missingIds.length > 0) {
      return bad(`messages.${next.index}: \`tool_use\` ids were found without \`tool_result\` blocks immediately after: ${missingIds.join(", ")}. Each \`tool_use\` block must have a corresponding \`tool_result\` block in the next message.`);
    }
    let leading = 0;
    while (leading < next.blocks.length && next.blocks[leading].type === "tool_result") leading++;
    if (leading < resultIds.size) {
      const notAtStart = next.blocks.slice(leading).filter((b) => b.type === "tool_result").length;
      return bad(`messages.${next.index}.content: Did not find ${notAtStart} \`tool_result\` block(s) at the beginning of this message. Messages following \`tool_use\` blocks must begin with \`tool_result\` blocks.`);
    }
  }

  // system
  if (has(body, "system")) {
    const s = body.system;
    if (Array.isArray(s)) {
      for (let j = 0; j < s.length; j++) {
        const b: unknown = s[j];
        if (!isObj(b) || b.type !== "text") return bad(`system.${j}.type: Input should be 'text'`);
        if (typeof b.text !== "string") return bad(`system.${j}.text: Field required`);
        if (b.text === "") return bad("system: text content blocks must be non-empty");
        if (b.text.trim() === "") return bad("system: text content blocks must contain non-whitespace text");
      }
    } else if (typeof s !== "string") return bad("system: Input should be a valid string");
  }

  // sampling
  const bounded = (name: string, lo: number, hi: number): Fail | null => {
    if (!has(body, name)) return null;
    const v = body[name];
    if (!isNum(v)) return bad(`${name}: Input should be a valid number`);
    if (v < lo) return bad(`${name}: Input should be greater than or equal to ${lo}`);
    if (v > hi) return bad(`${name}: Input should be less than or equal to ${hi}`);
    return null;
  };
  const sampling = bounded("temperature", 0, 1) ?? bounded("top_p", 0, 1);
  if (sampling) return sampling;
  if (has(body, "top_k") && (!isInt(body.top_k) || body.top_k < 0)) return bad("top_k: Input should be greater than or equal to 0");
  if (has(body, "stream") && typeof body.stream !== "boolean") return bad("stream: Input should be a valid boolean");
  if (has(body, "stop_sequences") && (!Array.isArray(body.stop_sequences) || body.stop_sequences.some((x) => typeof x !== "string"))) {
    return bad("stop_sequences: Input should be a valid list");
  }
  if (has(body, "metadata")) {
    if (!isObj(body.metadata)) return bad("metadata: Input should be a valid dictionary");
    for (const k of Object.keys(body.metadata)) if (k !== "user_id") return bad(`metadata.${k}: Extra inputs are not permitted`);
  }

  // tools
  if (has(body, "tools")) {
    const tools = body.tools;
    if (!Array.isArray(tools)) return bad("tools: Input should be a valid list");
    const names = new Set<string>();
    for (let i = 0; i < tools.length; i++) {
      const t: unknown = tools[i];
      const p = `tools.${i}`;
      if (!isObj(t)) return bad(`${p}: Input should be a valid dictionary`);
      const tag = typeof t.type === "string" ? t.type : "custom";
      if (has(t, "defer_loading") && !betas.has(BETA_ADVANCED_TOOL_USE)) return bad(`${p}.${tag}.defer_loading: Extra inputs are not permitted`);
      if (typeof t.type === "string" && t.type !== "custom") {
        // server / versioned tools (web_search_20250305, bash_20250124, ...)
        if (typeof t.name !== "string") return bad(`${p}.${t.type}.name: Field required`);
      } else {
        if (!has(t, "name")) return bad(`${p}.custom.name: Field required`);
        if (typeof t.name !== "string" || !/^[a-zA-Z0-9_-]{1,128}$/.test(t.name)) return bad(`${p}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,128}$'`);
        if (!has(t, "input_schema")) return bad(`${p}.custom.input_schema: Field required`);
        if (!isObj(t.input_schema)) return bad(`${p}.custom.input_schema: Input should be a valid dictionary`);
        if (t.input_schema.type !== "object") return bad(`${p}.custom.input_schema.type: Input should be 'object'`);
      }
      if (names.has(String(t.name))) return bad("tools: Tool names must be unique.");
      names.add(String(t.name));
    }
  }
  if (has(body, "tool_choice")) {
    const tc = body.tool_choice;
    if (!isObj(tc)) return bad("tool_choice: Input should be a valid dictionary");
    if (!["auto", "any", "tool", "none"].includes(String(tc.type))) {
      return bad(`tool_choice: Input tag '${String(tc.type)}' found using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'`);
    }
    if (tc.type === "tool" && typeof tc.name !== "string") return bad("tool_choice.tool.name: Field required");
    if (has(tc, "disable_parallel_tool_use") && typeof tc.disable_parallel_tool_use !== "boolean") {
      return bad(`tool_choice.${String(tc.type)}.disable_parallel_tool_use: Input should be a valid boolean`);
    }
  }

  // extended thinking
  if (has(body, "thinking")) {
    const th = body.thinking;
    if (!isObj(th) || !["enabled", "disabled", "adaptive"].includes(String(th.type))) {
      return bad(`thinking: Input tag '${isObj(th) ? String(th.type) : ""}' found using 'type' does not match any of the expected tags: 'enabled', 'disabled', 'adaptive'`);
    }
    const keys = th.type === "enabled" ? ["type", "budget_tokens", "display"] : th.type === "adaptive" ? ["type", "display"] : ["type"];
    const extra = Object.keys(th).find((k) => !keys.includes(k));
    if (extra !== undefined) return bad(`thinking.${String(th.type)}.${extra}: Extra inputs are not permitted`);
    if (has(th, "display") && th.display !== null && th.display !== "summarized" && th.display !== "omitted") {
      return bad(`thinking.${String(th.type)}.display: Input should be 'summarized' or 'omitted'`);
    }
    if (th.type === "enabled") {
      if (!isInt(th.budget_tokens)) return bad("thinking.enabled.budget_tokens: Field required");
      if (th.budget_tokens < 1024) return bad("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024");
      if (!check.count && (body.max_tokens as number) <= th.budget_tokens) {
        return bad("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size");
      }
    }
  }
  const thinkingRule = finalAssistantThinking(body, msgs as Json[]);
  if (thinkingRule) return thinkingRule;

  // output_config: {effort?, format?}; effort rides with its beta
  if (has(body, "output_config") && body.output_config !== null) {
    const oc = body.output_config;
    if (!isObj(oc)) return bad("output_config: Input should be a valid dictionary");
    for (const k of Object.keys(oc)) if (k !== "effort" && k !== "format") return bad(`output_config.${k}: Extra inputs are not permitted`);
    if (has(oc, "effort") && oc.effort !== null) {
      if (!betas.has(BETA_EFFORT)) return bad("output_config.effort: Extra inputs are not permitted");
      if (!EFFORTS.includes(String(oc.effort))) return bad("output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'");
    }
    if (has(oc, "format") && oc.format !== null) {
      const f = oc.format;
      if (!isObj(f) || f.type !== "json_schema") return bad(`output_config.format.type: Input should be 'json_schema'`);
      if (!has(f, "schema")) return bad("output_config.format.schema: Field required");
      if (!isObj(f.schema)) return bad("output_config.format.schema: Input should be a valid dictionary");
    }
  }

  // prompt-cache breakpoints: {"type": "ephemeral", "ttl"?: "5m" | "1h"}, four at most in one request
  const marks = cacheMarks(body);
  for (const { where, value } of marks) {
    const at = where ? `${where}.cache_control` : "cache_control";
    if (!isObj(value) || value.type !== "ephemeral") return bad(`${at}.type: Input should be 'ephemeral'`);
    if (has(value, "ttl") && value.ttl !== "5m" && value.ttl !== "1h") return bad(`${at}.ephemeral.ttl: Input should be '5m' or '1h'`);
  }
  if (marks.length > 4) return bad(`A maximum of 4 blocks with cache_control may be provided. Found ${marks.length}.`);

  // newest models only take default sampling (§2.1: models released after Opus 4.6)
  if (/^claude-[a-z]+-(4-[7-9]|[5-9])(\b|-|$)/.test(body.model)) {
    if (has(body, "temperature") && body.temperature !== 1) return bad(`temperature: only the default value 1.0 is supported for ${body.model}`);
    if (has(body, "top_p") && (body.top_p as number) < 0.99) return bad(`top_p: values below 0.99 are not supported for ${body.model}`);
    if (has(body, "top_k")) return bad(`top_k: not supported for ${body.model}`);
  }
  return null;
}

/**
 * Thinking rules on the assistant turns (real wordings: Kilo-Org/kilocode #5219, tailcallhq/forgecode #1853): with thinking
 * on, the last assistant turn that holds tool_use must start with a thinking block; with it off, an assistant message in
 * the final position (a prefill) cannot contain thinking.
 */
function finalAssistantThinking(body: Json, msgs: Json[]): Fail | null {
  const blocksOf = (m: Json): Json[] => (Array.isArray(m.content) ? (m.content as Json[]) : []);
  if (THINKING_ON(body)) {
    let a = msgs.length - 1;
    while (a >= 0 && msgs[a].role !== "assistant") a--;
    if (a < 0) return null;
    const blocks = blocksOf(msgs[a]);
    const first = blocks.length > 0 ? String(blocks[0].type) : "text";
    if (blocks.some((b) => b.type === "tool_use") && first !== "thinking" && first !== "redacted_thinking") {
      return {
        message: `messages.${a}.content.0.type: Expected \`thinking\` or \`redacted_thinking\`, but found \`${first}\`. When \`thinking\` is enabled, a final \`assistant\` message must start with a thinking block (preceeding the lastmost set of \`tool_use\` and \`tool_result\` blocks). We recommend you include thinking blocks from previous turns. To avoid this requirement, disable \`thinking\`. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking`,
      };
    }
    return null;
  }
  const last = msgs.length - 1;
  if (last < 0 || msgs[last].role !== "assistant") return null;
  const j = blocksOf(msgs[last]).findIndex((b) => b.type === "thinking" || b.type === "redacted_thinking");
  if (j < 0) return null;
  return { message: `messages.${last}.content.${j}: When thinking is disabled, an \`assistant\` message in the final position cannot contain \`thinking\`. To use thinking blocks, enable \`thinking\` in your request.` };
}

/** Every `cache_control` in a Messages request, in the order the API reads a prompt: tools, system, messages (then the top-level one). */
function cacheMarks(body: Json): { where: string; value: unknown }[] {
  const out: { where: string; value: unknown }[] = [];
  const look = (b: unknown, where: string) => { if (isObj(b) && has(b, "cache_control")) out.push({ where, value: b.cache_control }); };
  (Array.isArray(body.tools) ? body.tools : []).forEach((t, i) => look(t, `tools.${i}`));
  (Array.isArray(body.system) ? body.system : []).forEach((b, i) => look(b, `system.${i}`));
  (Array.isArray(body.messages) ? body.messages : []).forEach((m, i) => {
    const c = isObj(m) ? m.content : undefined;
    (Array.isArray(c) ? c : []).forEach((b, j) => {
      look(b, `messages.${i}.content.${j}`);
      if (isObj(b) && Array.isArray(b.content)) b.content.forEach((inner, k) => look(inner, `messages.${i}.content.${j}.content.${k}`));
    });
  });
  if (has(body, "cache_control") && body.cache_control !== null) out.push({ where: "", value: body.cache_control }); // automatic: marks the last block
  return out;
}

/**
 * Anthropic's prompt cache, as the API bills it: a request caches its prompt up to its last
 * `cache_control` mark when that prefix reaches the model's minimum; a later request whose prompt
 * starts with a cached prefix (looked up at block boundaries, up to 20 blocks before each mark)
 * reads it. Entries live five minutes from their last use. `undefined`: the request asked for no caching.
 * A top-level `cache_control` marks the last block. `record: false` only looks (rate-limit estimates), changing nothing.
 */
class PromptCache {
  #seen = new Map<string, number>();

  usage(body: Json, now: number, record = true): { input: number; cached: number; cache_write: number } | undefined {
    const blocks: string[] = [], marks: number[] = [];
    const add = (b: unknown) => {
      const { cache_control, ...rest } = (isObj(b) ? b : { text: b }) as Json;
      blocks.push(JSON.stringify(rest));
      if (cache_control) marks.push(blocks.length);
    };
    (Array.isArray(body.tools) ? body.tools : []).forEach(add);
    if (typeof body.system === "string") add(body.system);
    else (Array.isArray(body.system) ? body.system : []).forEach(add);
    for (const m of Array.isArray(body.messages) ? body.messages : []) {
      if (!isObj(m)) continue;
      if (typeof m.content === "string") add({ role: m.role, text: m.content });
      else (Array.isArray(m.content) ? m.content : []).forEach((b) => add(isObj(b) ? { role: m.role, ...b } : b));
    }
    if (isObj(body.cache_control) && blocks.length > 0) marks.push(blocks.length);
    if (!marks.length) return undefined;
    const tokens = (k: number) => Math.ceil(blocks.slice(0, k).join("").length / 4);
    const key = (k: number) => createHash("sha256").update(blocks.slice(0, k).join("\u0000")).digest("hex");
    const total = tokens(blocks.length), last = Math.max(...marks);
    const minimum = /haiku|opus/.test(String(body.model)) ? 4096 : 1024;
    if (tokens(last) < minimum) return { input: total, cached: 0, cache_write: 0 };
    let hit = 0;
    for (const mark of marks) {
      for (let k = mark; k > 0 && k > mark - 20; k--) {
        const until = this.#seen.get(key(k));
        if (until !== undefined && until > now) { hit = Math.max(hit, k); break; }
      }
    }
    if (hit && record) this.#seen.set(key(hit), now + 300_000);
    if (record) for (const mark of marks) if (tokens(mark) >= minimum) this.#seen.set(key(mark), now + 300_000);
    const cached = hit ? tokens(hit) : 0;
    return { input: total - tokens(last), cached, cache_write: tokens(last) - cached };
  }
}

function validateAnthropicBlock(b: Json, q: string, role: string): Fail | null {
  const bad = (message: string): Fail => ({ message });
  switch (b.type) {
    case "text":
      if (typeof b.text !== "string") return bad(`${q}.text.text: Field required`);
      if (b.text === "") return bad("messages: text content blocks must be non-empty");
      if (b.text.trim() === "") return bad("messages: text content blocks must contain non-whitespace text");
      return null;
    case "image": {
      const s = b.source;
      if (!isObj(s)) return bad(`${q}.image.source: Field required`);
      if (s.type === "base64") {
        if (!IMAGE_TYPES.includes(String(s.media_type))) return bad(`${q}.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'`);
        if (typeof s.data !== "string") return bad(`${q}.image.source.base64.data: Field required`);
        return null;
      }
      if (s.type === "url") return typeof s.url === "string" ? null : bad(`${q}.image.source.url.url: Field required`);
      return bad(`${q}.image.source: Input tag '${String(s.type)}' found using 'type' does not match any of the expected tags: 'base64', 'url'`);
    }
    case "document":
      return isObj(b.source) ? null : bad(`${q}.document.source: Field required`);
    case "tool_use":
      if (role !== "assistant") return bad(`${q}: \`tool_use\` blocks can only appear in assistant messages`);
      if (typeof b.id !== "string") return bad(`${q}.tool_use.id: Field required`);
      if (!TOOL_ID.test(b.id)) return bad(`${q}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'`);
      if (typeof b.name !== "string") return bad(`${q}.tool_use.name: Field required`);
      if (!has(b, "input")) return bad(`${q}.tool_use.input: Field required`);
      if (!isObj(b.input)) return bad(`${q}.tool_use.input: Input should be a valid dictionary`);
      return null;
    case "tool_result":
      if (role !== "user") return bad(`${q}: \`tool_result\` blocks can only appear in user messages`);
      if (typeof b.tool_use_id !== "string") return bad(`${q}.tool_result.tool_use_id: Field required`);
      if (!TOOL_ID.test(b.tool_use_id)) return bad(`${q}.tool_result.tool_use_id: String should match pattern '^[a-zA-Z0-9_-]+$'`);
      if (has(b, "content") && typeof b.content !== "string") {
        if (!Array.isArray(b.content)) return bad(`${q}.tool_result.content: Input should be a valid list`);
        for (let k = 0; k < b.content.length; k++) {
          const inner: unknown = b.content[k];
          if (!isObj(inner) || typeof inner.type !== "string") return bad(`${q}.tool_result.content.${k}: Input should be a valid dictionary`);
          if (inner.type === "text") {
            if (typeof inner.text !== "string") return bad(`${q}.tool_result.content.${k}.text.text: Field required`);
            if (inner.text === "") return bad("messages: text content blocks must be non-empty");
          }
        }
      }
      if (has(b, "is_error") && typeof b.is_error !== "boolean") return bad(`${q}.tool_result.is_error: Input should be a valid boolean`);
      return null;
    case "thinking":
      if (role !== "assistant") return bad(`${q}: \`thinking\` blocks can only appear in assistant messages`);
      if (typeof b.thinking !== "string") return bad(`${q}.thinking.thinking: Field required`);
      if (typeof b.signature !== "string") return bad(`${q}.thinking.signature: Field required`);
      return null;
    case "redacted_thinking":
      if (role !== "assistant") return bad(`${q}: \`redacted_thinking\` blocks can only appear in assistant messages`);
      return typeof b.data === "string" ? null : bad(`${q}.redacted_thinking.data: Field required`);
    default:
      return null;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// OpenAI Responses request validation (ingress.md §3.2; openai-node ResponseCreateParamsBase, ResponseInputItem)

const RESPONSES_ALLOWED = new Set([
  "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning", "max_output_tokens", "metadata",
  "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "store", "stream", "stream_options", "include", "previous_response_id",
  "conversation", "truncation", "temperature", "top_p", "top_logprobs", "service_tier", "user", "safety_identifier", "background",
  "background_options", "max_tool_calls", "context_management", "prompt", "access_programs", "image", "moderation",
  "client_metadata", // Codex sends it on every request (openai/codex codex-rs/codex-api/src/common.rs ResponsesApiRequest)
]);
// Keys each input item may carry; others get "Unknown parameter: 'input[i].key'." (a replayed reasoning item with the
// output-only `status` is refused that way: 1jehuang/jcode #1028). Built-in call items are accepted loosely.
const ITEM_KEYS: Record<string, string[]> = {
  message: ["type", "role", "content", "id", "status", "phase"],
  function_call: ["type", "id", "call_id", "name", "arguments", "status", "namespace", "caller"],
  function_call_output: ["type", "id", "call_id", "output", "status"],
  custom_tool_call: ["type", "id", "call_id", "name", "input", "status", "namespace", "caller"], // status: Codex replays it (openai/codex models.rs CustomToolCall)
  custom_tool_call_output: ["type", "id", "call_id", "output"],
  reasoning: ["type", "id", "summary", "content", "encrypted_content"],
  item_reference: ["type", "id"],
};
const BUILTIN_ITEMS = [
  "web_search_call", "file_search_call", "computer_call", "computer_call_output", "code_interpreter_call", "image_generation_call",
  "local_shell_call", "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call", "apply_patch_call_output",
  "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "mcp_call", "tool_search_call", "tool_search_output", "compaction",
];
const BUILTIN_TOOLS = [
  "web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11", "file_search", "code_interpreter",
  "image_generation", "mcp", "local_shell", "shell", "apply_patch", "computer_use_preview", "computer", "tool_search", "namespace",
];
const REASONING_EFFORTS = ["none", "minimal", "low", "medium", "high", "xhigh", "max"];
const quoteList = (xs: string[]): string => xs.map((x) => `'${x}'`).join(", ").replace(/, ([^,]*)$/, ", and $1");
/** Models without reasoning: `reasoning.effort` is refused (same split as Chat's reasoning_effort rule). */
const classicModel = (model: string): boolean => /^(gpt-4|gpt-3\.5|chatgpt-)/.test(model) || (/^gpt-5/.test(model) && model.includes("chat"));
const reasoningModel = (model: string): boolean => /^(o\d|gpt-5)/.test(model) && !model.includes("chat");

/** Shape checks of a Responses request; state (previous_response_id, item_reference, call pairing) is checked by the mock. */
function validateResponses(body: unknown): Fail | null {
  const bad = (message: string, param: string | null = null, code: string | null = null): Fail => ({ message, param, code });
  const missing = (p: string): Fail => bad(`Missing required parameter: '${p}'.`, p, "missing_required_parameter");
  const wrongType = (p: string, want: string, v: unknown): Fail => bad(`Invalid type for '${p}': expected ${want}, but got ${oaiType(v)} instead.`, p, "invalid_type");
  const badValue = (p: string, v: unknown, allowed: string[]): Fail => bad(`Invalid value: '${String(v)}'. Supported values are: ${quoteList(allowed)}.`, p, "invalid_value");

  if (!isObj(body)) return bad("Invalid type for request body: expected an object.", null, "invalid_type");
  for (const k of Object.keys(body)) {
    if (k === "reasoning_effort") {
      // openai/OpenHands software-agent-sdk #755
      return bad("Unsupported parameter: 'reasoning_effort'. In the Responses API, this parameter has moved to 'reasoning.effort'. Try again with the new parameter. See the API documentation for more information: https://platform.openai.com/docs/api-reference/responses/create.", null, "unsupported_parameter");
    }
    if (!RESPONSES_ALLOWED.has(k)) return bad(`Unknown parameter: '${k}'.`, k, "unknown_parameter");
  }
  if (!has(body, "model")) return missing("model");
  if (typeof body.model !== "string" || body.model === "") return wrongType("model", "a string", body.model);
  const model = body.model;

  const input = body.input;
  if (has(body, "input") && typeof input !== "string") {
    if (!Array.isArray(input)) return wrongType("input", "one of a string or array of input items", input);
    for (let i = 0; i < input.length; i++) {
      const f = validateInputItem(input[i], `input[${i}]`);
      if (f) return f;
    }
  }
  if (has(body, "instructions") && body.instructions !== null && typeof body.instructions !== "string" && !Array.isArray(body.instructions)) {
    return wrongType("instructions", "a string", body.instructions);
  }

  // tools / tool_choice
  if (has(body, "tools") && body.tools !== null) {
    if (!Array.isArray(body.tools)) return wrongType("tools", "an array", body.tools);
    for (let i = 0; i < body.tools.length; i++) {
      const f = validateResponsesTool(body.tools[i], `tools[${i}]`);
      if (f) return f;
    }
  }
  if (has(body, "tool_choice") && body.tool_choice !== null) {
    const tc = body.tool_choice;
    if (typeof tc === "string") {
      if (!["none", "auto", "required"].includes(tc)) return badValue("tool_choice", tc, ["none", "auto", "required"]);
    } else if (isObj(tc)) {
      if ((tc.type === "function" || tc.type === "custom") && typeof tc.name !== "string") return missing("tool_choice.name");
      const types = ["function", "custom", "allowed_tools", "mcp", "apply_patch", "shell", ...BUILTIN_TOOLS];
      if (!types.includes(String(tc.type))) return badValue("tool_choice.type", tc.type, ["function", "custom", "allowed_tools", "mcp", "web_search_preview", "file_search", "code_interpreter", "image_generation", "computer_use_preview"]);
    } else return wrongType("tool_choice", "one of a string or object", tc);
  }
  for (const k of ["parallel_tool_calls", "store", "stream", "background"]) {
    if (has(body, k) && body[k] !== null && typeof body[k] !== "boolean") return wrongType(k, "a boolean", body[k]);
  }
  if (has(body, "stream_options") && body.stream_options !== null && body.stream !== true) {
    return bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options");
  }
  if (has(body, "previous_response_id") && body.previous_response_id !== null && typeof body.previous_response_id !== "string") {
    return wrongType("previous_response_id", "a string", body.previous_response_id);
  }
  if (has(body, "include") && body.include !== null && (!Array.isArray(body.include) || body.include.some((x) => typeof x !== "string"))) {
    return wrongType("include", "an array of strings", body.include);
  }
  if (has(body, "metadata") && body.metadata !== null && !isObj(body.metadata)) return wrongType("metadata", "an object", body.metadata);

  // text.format (flat json_schema, unlike Chat's nested one)
  if (has(body, "text") && body.text !== null) {
    const t = body.text;
    if (!isObj(t)) return wrongType("text", "an object", t);
    if (has(t, "format") && t.format !== null) {
      const f = t.format;
      if (!isObj(f)) return wrongType("text.format", "an object", f);
      if (!["text", "json_object", "json_schema"].includes(String(f.type))) return badValue("text.format.type", f.type, ["text", "json_object", "json_schema"]);
      if (f.type === "json_schema") {
        if (typeof f.name !== "string") return missing("text.format.name");
        if (!has(f, "schema")) return missing("text.format.schema");
        if (!isObj(f.schema)) return wrongType("text.format.schema", "an object", f.schema);
      }
    }
    if (has(t, "verbosity") && t.verbosity !== null && !["low", "medium", "high"].includes(String(t.verbosity))) return badValue("text.verbosity", t.verbosity, ["low", "medium", "high"]);
  }

  // reasoning
  if (has(body, "reasoning") && body.reasoning !== null) {
    const r = body.reasoning;
    if (!isObj(r)) return wrongType("reasoning", "an object", r);
    if (has(r, "effort") && r.effort !== null) {
      if (!REASONING_EFFORTS.includes(String(r.effort))) return badValue("reasoning.effort", r.effort, REASONING_EFFORTS);
      // Laisky/one-api #120
      if (classicModel(model)) return bad("Unsupported parameter: 'reasoning.effort' is not supported with this model.", "reasoning.effort", "unsupported_parameter");
    }
    if (has(r, "summary") && r.summary !== null && !["auto", "concise", "detailed"].includes(String(r.summary))) return badValue("reasoning.summary", r.summary, ["auto", "concise", "detailed"]);
  }

  // numbers
  const range = openAIRange(body, bad, wrongType);
  const numeric = range("temperature", 0, 2) ?? range("top_p", 0, 1) ?? range("top_logprobs", 0, 20, true) ??
    range("max_output_tokens", 16, Number.MAX_SAFE_INTEGER, true) ?? range("max_tool_calls", 1, Number.MAX_SAFE_INTEGER, true);
  if (numeric) return numeric;
  // reasoning models take only the default sampling (OpenHands software-agent-sdk #1837: code null on this route)
  if (reasoningModel(model)) {
    for (const k of ["temperature", "top_p"]) {
      if (isNum(body[k]) && body[k] !== 1) return bad(`Unsupported parameter: '${k}' is not supported with this model.`, k, null);
    }
  }
  return null;
}

function validateInputItem(item: unknown, p: string): Fail | null {
  const bad = (message: string, param: string | null = null, code: string | null = null): Fail => ({ message, param, code });
  const missing = (q: string): Fail => bad(`Missing required parameter: '${q}'.`, q, "missing_required_parameter");
  const wrongType = (q: string, want: string, v: unknown): Fail => bad(`Invalid type for '${q}': expected ${want}, but got ${oaiType(v)} instead.`, q, "invalid_type");
  if (!isObj(item)) return wrongType(p, "an object", item);
  const type = has(item, "type") ? item.type : "message"; // an easy input message may omit `type`
  if (typeof type !== "string") return wrongType(`${p}.type`, "a string", type);
  if (BUILTIN_ITEMS.includes(type)) return null;
  const keys = ITEM_KEYS[type];
  if (!keys) return bad(`Invalid value: '${type}'. Supported values are: ${quoteList([...Object.keys(ITEM_KEYS), ...BUILTIN_ITEMS])}.`, `${p}.type`, "invalid_value");
  const extra = Object.keys(item).find((k) => !keys.includes(k));
  if (extra !== undefined) return bad(`Unknown parameter: '${p}.${extra}'.`, `${p}.${extra}`, "unknown_parameter");
  const str = (k: string): Fail | null => (typeof item[k] === "string" ? null : has(item, k) ? wrongType(`${p}.${k}`, "a string", item[k]) : missing(`${p}.${k}`));
  switch (type) {
    case "message":
      return validateInputMessage(item, p);
    case "function_call":
      return str("call_id") ?? str("name") ?? str("arguments");
    case "custom_tool_call":
      return str("call_id") ?? str("name") ?? str("input");
    case "function_call_output":
    case "custom_tool_call_output":
      if (typeof item.output !== "string" && !Array.isArray(item.output)) {
        return has(item, "output") ? wrongType(`${p}.output`, "one of a string or array of objects", item.output) : missing(`${p}.output`);
      }
      return str("call_id");
    case "reasoning":
      if (!Array.isArray(item.summary)) return has(item, "summary") ? wrongType(`${p}.summary`, "an array", item.summary) : missing(`${p}.summary`);
      // Codex replays reasoning without its id (serde skip_serializing on ResponseItem::Reasoning.id, openai/codex
      // codex-rs/protocol/src/models.rs), carried by encrypted_content instead: the API takes that
      return typeof item.encrypted_content === "string" ? null : str("id");
    default: // item_reference
      return str("id");
  }
}

function validateInputMessage(m: Json, p: string): Fail | null {
  const bad = (message: string, param: string | null = null, code: string | null = null): Fail => ({ message, param, code });
  const missing = (q: string): Fail => bad(`Missing required parameter: '${q}'.`, q, "missing_required_parameter");
  const wrongType = (q: string, want: string, v: unknown): Fail => bad(`Invalid type for '${q}': expected ${want}, but got ${oaiType(v)} instead.`, q, "invalid_type");
  if (!has(m, "role")) return missing(`${p}.role`);
  const roles = ["assistant", "system", "developer", "user"];
  if (!roles.includes(String(m.role))) return bad(`Invalid value: '${String(m.role)}'. Supported values are: ${quoteList(roles)}.`, `${p}.role`, "invalid_value");
  if (!has(m, "content")) return missing(`${p}.content`);
  const c = m.content;
  if (typeof c === "string") return null;
  if (!Array.isArray(c)) return wrongType(`${p}.content`, "one of a string or array of objects", c);
  const partTypes = m.role === "assistant" ? ["output_text", "refusal"] : ["input_text", "input_image", "input_file"];
  for (let j = 0; j < c.length; j++) {
    const part: unknown = c[j];
    const q = `${p}.content[${j}]`;
    if (!isObj(part)) return wrongType(q, "an object", part);
    if (!partTypes.includes(String(part.type))) return bad(`Invalid value: '${String(part.type)}'. Supported values are: ${quoteList(partTypes)}.`, q, "invalid_value");
    if ((part.type === "input_text" || part.type === "output_text") && typeof part.text !== "string") {
      return has(part, "text") ? wrongType(`${q}.text`, "a string", part.text) : missing(`${q}.text`);
    }
    if (part.type === "refusal" && typeof part.refusal !== "string") return missing(`${q}.refusal`);
    if (part.type === "input_image" && typeof part.image_url !== "string" && typeof part.file_id !== "string") return missing(`${q}.image_url`);
    if (part.type === "input_image" && has(part, "detail") && !["auto", "low", "high", "original"].includes(String(part.detail))) {
      return bad(`Invalid value: '${String(part.detail)}'. Supported values are: 'auto', 'low', 'high', and 'original'.`, `${q}.detail`, "invalid_value");
    }
    if (part.type === "input_file" && !["file_data", "file_url", "file_id"].some((k) => typeof part[k] === "string")) return missing(`${q}.file_id`);
  }
  return null;
}

function validateResponsesTool(t: unknown, p: string): Fail | null {
  const bad = (message: string, param: string | null = null, code: string | null = null): Fail => ({ message, param, code });
  const missing = (q: string): Fail => bad(`Missing required parameter: '${q}'.`, q, "missing_required_parameter");
  const wrongType = (q: string, want: string, v: unknown): Fail => bad(`Invalid type for '${q}': expected ${want}, but got ${oaiType(v)} instead.`, q, "invalid_type");
  if (!isObj(t)) return wrongType(p, "an object", t);
  if (!has(t, "type")) return missing(`${p}.type`);
  if (t.type === "function" || t.type === "custom") {
    // a Chat-style {type:"function", function:{name,…}} lands here too: "Missing required parameter: 'tools[0].name'." (stanfordnlp/dspy #9943)
    if (!has(t, "name")) return missing(`${p}.name`);
    if (typeof t.name !== "string") return wrongType(`${p}.name`, "a string", t.name);
    if (!/^[a-zA-Z0-9_-]{1,64}$/.test(t.name)) {
      return bad(`Invalid '${p}.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.`, `${p}.name`, "invalid_value");
    }
    if (t.type === "function") {
      if (has(t, "parameters") && t.parameters !== null && !isObj(t.parameters)) return wrongType(`${p}.parameters`, "an object", t.parameters);
      if (has(t, "strict") && t.strict !== null && typeof t.strict !== "boolean") return wrongType(`${p}.strict`, "a boolean", t.strict);
      return null;
    }
    if (has(t, "format") && t.format !== null) {
      const f = t.format;
      if (!isObj(f) || (f.type !== "text" && f.type !== "grammar")) return bad(`Invalid value: '${isObj(f) ? String(f.type) : ""}'. Supported values are: 'text' and 'grammar'.`, `${p}.format.type`, "invalid_value");
      if (f.type === "grammar") {
        if (f.syntax !== "lark" && f.syntax !== "regex") return bad(`Invalid value: '${String(f.syntax)}'. Supported values are: 'lark' and 'regex'.`, `${p}.format.syntax`, "invalid_value");
        if (typeof f.definition !== "string") return missing(`${p}.format.definition`);
      }
    }
    return null;
  }
  if (BUILTIN_TOOLS.includes(String(t.type))) return null;
  return bad(`Invalid value: '${String(t.type)}'. Supported values are: ${quoteList(["function", "custom", ...BUILTIN_TOOLS])}.`, `${p}.type`, "invalid_value");
}

// ---------------------------------------------------------------------------------------------------------------
// rate limits: a sliding 60-second window per mock (see the header comment for what is charged)

type Dim = "requests" | "tokens" | "input_tokens" | "output_tokens";
type Charge = { at: number; input: number; output: number };
const WINDOW_MS = 60_000;
// Dimensions each provider limits and reports; limits not given in `rateLimits({limits})` keep the default headers' values.
const DIMS: Record<Flavor, Dim[]> = { openai: ["requests", "tokens"], kimi: ["requests", "tokens"], anthropic: ["requests", "input_tokens", "output_tokens", "tokens"] };
const DEFAULT_LIMITS: Record<Flavor, RateLimitDims> = {
  openai: { requests: 10000, tokens: 30000000 },
  kimi: { requests: 200, tokens: 2000000 }, // Tier1 (providers.md §3.3)
  anthropic: { requests: 4000, input_tokens: 2000000, output_tokens: 400000 }, // tokens: input + output
};

const partOf = (c: { input: number; output: number }, dim: Dim): number =>
  dim === "requests" ? 1 : dim === "input_tokens" ? c.input : dim === "output_tokens" ? c.output : c.input + c.output;

class RateWindow {
  opts: RateLimitOpts;
  flavor: Flavor;
  #events: Charge[] = [];

  constructor(flavor: Flavor, opts: RateLimitOpts) {
    this.flavor = flavor;
    this.opts = opts;
  }

  limit(dim: Dim): number {
    const own = this.opts.limits[dim];
    if (own !== undefined) return own;
    if (dim === "tokens" && this.flavor === "anthropic") return this.limit("input_tokens") + this.limit("output_tokens");
    return DEFAULT_LIMITS[this.flavor][dim] ?? 0;
  }

  /** The steady load of "another client" on the same key. */
  others(dim: Dim): number {
    const o = this.opts.others ?? {};
    return dim === "tokens" ? (o.tokens ?? (o.input_tokens ?? 0) + (o.output_tokens ?? 0)) : (o[dim] ?? 0);
  }

  #live(now: number): Charge[] {
    this.#events = this.#events.filter((e) => e.at > now - WINDOW_MS);
    return this.#events;
  }

  used(now: number, dim: Dim): number {
    return this.#live(now).reduce((n, e) => n + partOf(e, dim), this.others(dim));
  }

  add(now: number, input: number, output: number): Charge {
    const c = { at: now, input, output };
    this.#events.push(c);
    return c;
  }

  /** Time until the window is back to its initial state; `others` is taken to leave within a full minute. */
  resetMs(now: number, dim: Dim): number {
    let ms = this.others(dim) > 0 ? WINDOW_MS : 0;
    for (const e of this.#live(now)) if (partOf(e, dim) > 0) ms = Math.max(ms, e.at + WINDOW_MS - now);
    return ms;
  }

  /** Time until `need` units have left the window (the oldest charges leave first). */
  waitMs(now: number, dim: Dim, need: number): number {
    let freed = 0;
    for (const e of this.#live(now)) {
      freed += partOf(e, dim);
      if (freed >= need) return Math.max(1, e.at + WINDOW_MS - now);
    }
    return WINDOW_MS;
  }
}

/** Go's time.Duration formatting, to the millisecond, as OpenAI sends in x-ratelimit-reset-* ("6m0s", "1s", "17ms", "18.642s"). */
export function goDuration(ms: number): string {
  const t = Math.max(0, Math.round(ms));
  if (t === 0) return "0s";
  if (t < 1000) return `${t}ms`;
  const h = Math.floor(t / 3_600_000), m = Math.floor((t % 3_600_000) / 60_000);
  const s = `${Number(((t % 60_000) / 1000).toFixed(3))}s`;
  return h > 0 ? `${h}h${m}m${s}` : m > 0 ? `${m}m${s}` : s;
}

/** RFC 3339 to the second, as Anthropic sends in anthropic-ratelimit-*-reset ("2025-08-21T12:40:59Z"), rounded up. */
const rfc3339 = (ms: number): string => new Date(Math.ceil(ms / 1000) * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");

/** What the Anthropic mock's count_tokens answers: ceil(chars / 4) of the JSON of system + tools + messages. */
export function anthropicTokenCount(body: { system?: unknown; tools?: unknown; messages?: unknown }): number {
  return Math.ceil((JSON.stringify(body.system ?? "") + JSON.stringify(body.tools ?? []) + JSON.stringify(body.messages ?? [])).length / 4);
}

// ---------------------------------------------------------------------------------------------------------------
// the mock server

type Ctx = {
  req: IncomingMessage;
  res: ServerResponse;
  gone: boolean; // the response's connection is closed (client abort, or we destroyed it)
  self: boolean; // we destroyed the socket on purpose (reset / stream-break)
  onGone?: () => void;
  charge?: { c: Charge; max: number | undefined }; // what this request counts in the rate-limit window, and the max output it named
};
type Route = "chat" | "responses";
/** A stored Responses answer: its full (expanded) input and its output, for previous_response_id. */
type StoredResponse = { input: Json[]; output: Json[] };

export function startMock(flavor: Flavor, opts: { key?: string; model?: string } = {}): Promise<Mock> {
  const key = opts.key ?? DEFAULT_KEYS[flavor];
  const scripts: Script[] = [];
  let fallback: Script = { type: "reply" };
  const countScripts: Script[] = [];
  const requests: Recorded[] = [];
  const promptCache = new PromptCache();
  const secret = randomBytes(32); // signs this mock's thinking blocks and reasoning items
  let rates: RateWindow | undefined;
  const responses = new Map<string, StoredResponse>();
  const storedItems = new Map<string, Json>(); // stored Responses output items by id
  const orgId = randomUUID(); // named in Anthropic's 429 bodies
  const sockets = new Set<Socket>();
  const timers = new Set<ReturnType<typeof setTimeout>>();
  let closing = false;
  let closedCount = 0;
  let closedSeen = 0;
  let waiters: (() => void)[] = [];
  let closePromise: Promise<void> | undefined;

  const server = createServer((req, res) => handle(req, res));
  server.on("connection", (s: Socket) => {
    if (closing) {
      s.destroy();
      return;
    }
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", noop);
  });
  server.on("clientError", (_err: Error, s: Socket) => s.destroy());

  // ---- timing / writing helpers bound to a request -----------------------------------------------------------

  const wait = (ctx: Ctx, ms: number): Promise<boolean> =>
    new Promise((resolve) => {
      if (!(ms > 0) || ctx.gone) {
        resolve(!ctx.gone);
        return;
      }
      const t = setTimeout(() => {
        timers.delete(t);
        ctx.onGone = undefined;
        resolve(!ctx.gone);
      }, ms);
      timers.add(t);
      ctx.onGone = () => {
        clearTimeout(t);
        timers.delete(t);
        resolve(false);
      };
    });

  /** Write one SSE chunk and let it reach the socket before the next one (so clients see chunks one by one). */
  const write = (ctx: Ctx, data: string): Promise<boolean> =>
    new Promise((resolve) => {
      if (ctx.gone || ctx.res.destroyed) {
        resolve(false);
        return;
      }
      ctx.onGone = () => resolve(false);
      ctx.res.write(data, (err) => {
        ctx.onGone = undefined;
        if (err) resolve(false);
        else setImmediate(() => resolve(!ctx.gone));
      });
    });

  const destroySocket = (ctx: Ctx): void => {
    ctx.self = true;
    ctx.req.socket.destroy();
  };

  const requestId = (): string => (flavor === "anthropic" ? `req_011C${rand62(20)}` : `req_${hex(32)}`);

  /** The provider's rate-limit headers computed from the window (`rateLimits(opts)` set). */
  const rateHeaders = (win: RateWindow): Record<string, string> => {
    const now = Date.now();
    const out: Record<string, string> = {};
    for (const dim of DIMS[flavor]) {
      const limit = win.limit(dim);
      const remaining = Math.max(0, limit - win.used(now, dim));
      const reset = win.resetMs(now, dim);
      if (flavor === "openai") {
        out[`x-ratelimit-limit-${dim}`] = String(limit);
        out[`x-ratelimit-remaining-${dim}`] = String(remaining);
        out[`x-ratelimit-reset-${dim}`] = goDuration(reset);
      } else {
        const name = dim.replace("_", "-");
        out[`anthropic-ratelimit-${name}-limit`] = String(limit);
        out[`anthropic-ratelimit-${name}-remaining`] = String(dim === "requests" ? remaining : Math.round(remaining / 1000) * 1000); // tokens: nearest thousand (§2.5)
        out[`anthropic-ratelimit-${name}-reset`] = rfc3339(now + reset);
      }
    }
    return out;
  };

  const providerHeaders = (reqId: string): Record<string, string> => {
    if (rates && flavor === "openai") return { "x-request-id": reqId, "openai-version": "2020-10-01", "openai-organization": "user-mock", "openai-processing-ms": "12", ...rateHeaders(rates) };
    if (rates && flavor === "anthropic") return { "request-id": reqId, "anthropic-organization-id": randomUUID(), ...rateHeaders(rates) };
    if (flavor === "openai") {
      return {
        "x-request-id": reqId,
        "openai-version": "2020-10-01",
        "openai-organization": "user-mock",
        "openai-processing-ms": "12",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-limit-tokens": "30000000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-remaining-tokens": "29999950",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-reset-tokens": "0s",
      };
    }
    if (flavor === "anthropic") {
      const reset = new Date(Date.now() + 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
      return {
        "request-id": reqId,
        "anthropic-organization-id": randomUUID(),
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "3999",
        "anthropic-ratelimit-requests-reset": reset,
        "anthropic-ratelimit-tokens-limit": "2400000",
        "anthropic-ratelimit-tokens-remaining": "2400000",
        "anthropic-ratelimit-tokens-reset": reset,
        "anthropic-ratelimit-input-tokens-limit": "2000000",
        "anthropic-ratelimit-input-tokens-remaining": "2000000",
        "anthropic-ratelimit-input-tokens-reset": reset,
        "anthropic-ratelimit-output-tokens-limit": "400000",
        "anthropic-ratelimit-output-tokens-remaining": "400000",
        "anthropic-ratelimit-output-tokens-reset": reset,
      };
    }
    return {};
  };

  const sendJson = (ctx: Ctx, status: number, payload: unknown, reqId: string, extra?: Record<string, string>): void => {
    if (ctx.gone) return;
    const text = JSON.stringify(payload);
    const headers: Record<string, string> = {
      "content-type": "application/json",
      ...providerHeaders(reqId),
      ...(extra ?? {}),
      "content-length": String(Buffer.byteLength(text)),
    };
    ctx.res.writeHead(status, headers);
    ctx.res.end(text);
  };

  const sendFail = (ctx: Ctx, status: number, f: Fail, extra?: Record<string, string>): void => {
    const reqId = requestId();
    sendJson(ctx, status, errorPayload(flavor, status, f, reqId), reqId, extra);
  };

  // ---- request entry -----------------------------------------------------------------------------------------

  function handle(req: IncomingMessage, res: ServerResponse): void {
    const rec: Recorded = { method: req.method ?? "", path: req.url ?? "/", headers: { ...req.headers }, body: undefined, raw: "", at: Date.now() };
    requests.push(rec);
    const ctx: Ctx = { req, res, gone: false, self: false };
    req.on("error", noop);
    res.on("error", noop);
    res.on("close", () => {
      ctx.gone = true;
      const cb = ctx.onGone;
      ctx.onGone = undefined;
      cb?.();
      if (!res.writableFinished && !ctx.self && !closing) {
        closedCount++;
        if (waiters.length > 0) {
          closedSeen = closedCount;
          const ws = waiters;
          waiters = [];
          for (const w of ws) w();
        }
      }
    });
    const parts: Buffer[] = [];
    req.on("data", (c: Buffer) => parts.push(c));
    req.on("end", () => {
      const raw = Buffer.concat(parts).toString("utf8");
      let parsed: unknown = raw;
      let ok = false;
      try {
        parsed = JSON.parse(raw);
        ok = true;
      } catch {
        // keep the raw string
      }
      rec.body = parsed;
      rec.raw = raw;
      try {
        route(ctx, ok, parsed);
      } catch {
        if (!ctx.gone) res.destroy();
      }
    });
  }

  function route(ctx: Ctx, parsedOk: boolean, body: unknown): void {
    const method = ctx.req.method ?? "GET";
    const path = (ctx.req.url ?? "/").split("?")[0];
    const chatPath = flavor === "anthropic" ? "/v1/messages" : "/v1/chat/completions";
    if (method === "POST" && (path === chatPath || (flavor === "openai" && path === "/v1/responses"))) {
      const script = scripts.length > 0 ? (scripts.shift() as Script) : fallback;
      chat(ctx, parsedOk, body, script, path === chatPath ? "chat" : "responses");
      return;
    }
    if (method === "POST" && flavor === "anthropic" && path === "/v1/messages/count_tokens") {
      countTokens(ctx, parsedOk, body, countScripts.length > 0 ? (countScripts.shift() as Script) : { type: "reply" });
      return;
    }
    if (method === "GET" && (path === "/v1/models" || path.startsWith("/v1/models/"))) {
      const authFail = checkAuth(ctx);
      if (authFail) return sendFail(ctx, authFail.status ?? 401, authFail);
      return models(ctx, path === "/v1/models" ? undefined : decodeURIComponent(path.slice("/v1/models/".length)));
    }
    if (flavor === "anthropic") return sendFail(ctx, 404, { message: "Not Found" });
    return sendFail(ctx, 404, { message: `Invalid URL (${method} ${path})`, type: "invalid_request_error" });
  }

  function checkAuth(ctx: Ctx): Fail | null {
    const h = ctx.req.headers;
    if (flavor === "anthropic") {
      // The SDK majors of 2026-10-21 send the key as `Authorization: Bearer`; with both headers the API reads x-api-key.
      const bearer = typeof h.authorization === "string" ? /^Bearer\s+(.+)$/i.exec(h.authorization.trim())?.[1] : undefined;
      const k = h["x-api-key"] !== undefined && h["x-api-key"] !== "" ? h["x-api-key"] : bearer;
      if (k === undefined || k === "") return { status: 401, message: "x-api-key header is required" };
      if (k !== key) return { status: 401, message: "invalid x-api-key" };
      const v = h["anthropic-version"];
      if (v === undefined || v === "") return { status: 400, message: "anthropic-version: header is required" };
      if (!ANTHROPIC_VERSIONS.includes(String(v))) return { status: 400, message: `anthropic-version: invalid version '${String(v)}'` };
      return null;
    }
    const auth = h.authorization;
    const m = typeof auth === "string" ? /^Bearer\s+(.+)$/i.exec(auth.trim()) : null;
    if (flavor === "kimi") {
      if (!m || m[1] !== key) return { status: 401, type: "invalid_authentication_error", message: "Invalid Authentication" };
      return null;
    }
    if (!m) {
      return {
        status: 401,
        message: "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username. You can obtain an API key from https://platform.openai.com/account/api-keys.",
        type: "invalid_request_error",
      };
    }
    if (m[1] !== key) {
      return { status: 401, message: `Incorrect API key provided: ${maskKey(m[1])}. You can find your API key at https://platform.openai.com/account/api-keys.`, type: "invalid_request_error", code: "invalid_api_key" };
    }
    return null;
  }

  function models(ctx: Ctx, one: string | undefined): void {
    const reqId = requestId();
    const ids =
      flavor === "openai" ? ["gpt-4o-mini", "gpt-4o"] : flavor === "kimi" ? ["kimi-k2.5", "kimi-k2-0905-preview", "moonshot-v1-8k"] : ["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929", "claude-opus-4-5-20251101"];
    if (opts.model && !ids.includes(opts.model)) ids.unshift(opts.model);
    const created = 1721172741;
    const entry = (id: string): Json =>
      flavor === "anthropic"
        ? { type: "model", id, display_name: id, created_at: "2025-10-01T00:00:00Z" }
        : { id, object: "model", created, owned_by: flavor === "kimi" ? "moonshot" : "system" };
    if (one !== undefined) {
      if (!ids.includes(one)) return sendFail(ctx, 404, defaultError(flavor, 404, one, key));
      return sendJson(ctx, 200, entry(one), reqId);
    }
    const payload =
      flavor === "anthropic"
        ? { data: ids.map(entry), has_more: false, first_id: ids[0], last_id: ids[ids.length - 1] }
        : { object: "list", data: ids.map(entry) };
    sendJson(ctx, 200, payload, reqId);
  }

  /** Auth, then a JSON body; false when the request was already answered with the provider's error. */
  function checkRequest(ctx: Ctx, parsedOk: boolean): boolean {
    const authFail = checkAuth(ctx);
    if (authFail) {
      sendFail(ctx, authFail.status ?? 401, authFail);
      return false;
    }
    const ct = ctx.req.headers["content-type"];
    const jsonCt = typeof ct === "string" && /^application\/json\b/i.test(ct.trim());
    if (jsonCt && parsedOk) return true;
    if (flavor === "anthropic") sendFail(ctx, 400, { message: jsonCt ? "There was an issue with your request body: invalid JSON" : "Invalid content-type header: expected application/json" });
    else if (flavor === "kimi") sendFail(ctx, 400, { message: "Invalid request: failed to parse the request body as JSON" });
    else {
      sendFail(ctx, 400, {
        message: "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
        type: "invalid_request_error",
      });
    }
    return false;
  }

  /** The `anthropic-beta` values of a request (a comma list, possibly over several headers). */
  const betasOf = (ctx: Ctx): Set<string> => {
    const h = ctx.req.headers["anthropic-beta"];
    const raw = Array.isArray(h) ? h.join(",") : (h ?? "");
    return new Set(raw.split(",").map((b) => b.trim()).filter(Boolean));
  };

  /** A thinking signature: base64 of HMACs of the text under this mock's secret, about as long as a real one. */
  const sign = (thinking: string): string => {
    const macs = Array.from({ length: 10 }, (_, i) => createHmac("sha256", secret).update(`${i}:${thinking}`).digest());
    return Buffer.concat([Buffer.from([0x12, 0xa8, 0x02, 0x0a, 0x01, 0x18]), ...macs]).toString("base64");
  };
  const anthropicCheck = (ctx: Ctx, count = false): AnthropicCheck => ({
    betas: betasOf(ctx),
    count,
    version: String(ctx.req.headers["anthropic-version"] ?? ""),
    signed: (t, s) => s === sign(t),
  });

  function chat(ctx: Ctx, parsedOk: boolean, body: unknown, script: Script, route: Route = "chat"): void {
    if (!checkRequest(ctx, parsedOk)) return;
    const invalid =
      route === "responses" ? validateResponses(body) : flavor === "anthropic" ? validateAnthropic(body, anthropicCheck(ctx)) : validateOpenAI(flavor, body);
    if (invalid) return sendFail(ctx, invalid.status ?? 400, invalid);
    const req = body as Json;
    let history: Json[] = [];
    if (route === "responses") {
      const expanded = expandResponses(req);
      if (!Array.isArray(expanded)) return sendFail(ctx, expanded.status ?? 400, expanded);
      history = expanded;
    }
    const reqModel = String(req.model);
    if (!admit(ctx, req, reqModel, route, history)) return;
    if (playFixed(ctx, reqModel, script)) return;
    answer(ctx, req, reqModel, script as AnswerScript, route, history).catch(() => {
      if (!ctx.gone) ctx.res.destroy();
    });
  }

  /** The scripts that answer the same way on every route (error, raw, hang, reset); false for the others. */
  function playFixed(ctx: Ctx, reqModel: string, script: Script): boolean {
    switch (script.type) {
      case "error": {
        settle(ctx, 0);
        const reqId = requestId();
        const payload = script.body !== undefined ? script.body : errorPayload(flavor, script.status, defaultError(flavor, script.status, reqModel, key), reqId);
        sendJson(ctx, script.status, payload, reqId, script.headers);
        return true;
      }
      case "raw": {
        settle(ctx, 0);
        const type = script.body.trimStart().startsWith("<") ? "text/html; charset=utf-8" : "application/json";
        ctx.res.writeHead(script.status, { "content-type": type, ...(script.headers ?? {}), "content-length": String(Buffer.byteLength(script.body)) });
        ctx.res.end(script.body);
        return true;
      }
      case "hang":
        return true; // never answer; close() or the client ends it
      case "reset":
        settle(ctx, 0);
        destroySocket(ctx);
        return true;
      default:
        return false;
    }
  }

  // ---- count_tokens (Anthropic) -------------------------------------------------------------------------------

  function countTokens(ctx: Ctx, parsedOk: boolean, body: unknown, script: Script): void {
    if (!checkRequest(ctx, parsedOk)) return;
    const invalid = validateAnthropic(body, anthropicCheck(ctx, true));
    if (invalid) return sendFail(ctx, invalid.status ?? 400, invalid);
    const req = body as Json;
    if (playFixed(ctx, String(req.model), script)) return;
    if (script.type === "stream-error") {
      const f = defaultError(flavor, 529, String(req.model), key);
      return sendFail(ctx, 529, script.message ? { ...f, message: script.message } : f);
    }
    const reply = script.type === "reply" ? script : undefined;
    const payload = { input_tokens: typeof reply?.usage?.input === "number" ? reply.usage.input : anthropicTokenCount(req) };
    const reqId = requestId();
    if (script.type === "stall") {
      ctx.res.writeHead(200, { "content-type": "application/json", ...providerHeaders(reqId) });
      ctx.res.flushHeaders();
      return;
    }
    if (script.type === "stream-break") {
      const text = JSON.stringify(payload);
      ctx.res.writeHead(200, { "content-type": "application/json", ...providerHeaders(reqId), "content-length": String(Buffer.byteLength(text)) });
      write(ctx, text.slice(0, Math.floor(text.length / 2))).then((ok) => ok && destroySocket(ctx), noop);
      return;
    }
    wait(ctx, reply?.delayMs ?? 0).then((ok) => ok && sendJson(ctx, 200, payload, reqId, reply?.headers), noop);
  }

  // ---- OpenAI Responses state ---------------------------------------------------------------------------------

  /**
   * The full input a Responses request stands for: the stored history of `previous_response_id`, then its own items with
   * `item_reference`s (and reasoning items sent by id alone) replaced by the stored items; then tool calls must pair.
   */
  function expandResponses(req: Json): Json[] | Fail {
    let history: Json[] = [];
    if (typeof req.previous_response_id === "string") {
      const prev = responses.get(req.previous_response_id);
      if (!prev) {
        return { message: `Previous response with id '${req.previous_response_id}' not found.`, param: "previous_response_id", code: "previous_response_not_found" };
      }
      history = [...prev.input, ...prev.output];
    }
    const own: Json[] = typeof req.input === "string" ? [{ role: "user", content: req.input }] : Array.isArray(req.input) ? (req.input as Json[]) : [];
    const out = [...history];
    for (const item of own) {
      const byId = item.type === "item_reference" || (item.type === "reasoning" && typeof item.encrypted_content !== "string");
      if (!byId) {
        out.push(item);
        continue;
      }
      const found = storedItems.get(String(item.id));
      if (!found) {
        // the real wording and status: router-for-me/CLIProxyAPI #2381, Wei-Shaw/claude-relay-service #323 (404)
        return {
          status: 404,
          message: `Item with id '${String(item.id)}' not found. Items are not persisted when \`store\` is set to false. Try again with \`store\` set to true, or remove this item from your input.`,
          param: "input",
          code: null,
        };
      }
      out.push(item.type === "item_reference" ? found : item);
    }
    return pairCalls(out) ?? out;
  }

  /** Every tool output answers an earlier call, and every call gets its output (continuedev/continue #10092, tjardoo/openai-client #124). */
  function pairCalls(all: Json[]): Fail | null {
    const label: Record<string, string> = { function_call: "function call", custom_tool_call: "custom tool call" };
    const calls = new Map<string, string>();
    const answered = new Set<string>();
    for (const item of all) {
      const t = String(item.type);
      if (t === "function_call" || t === "custom_tool_call") calls.set(String(item.call_id), t);
      if (t === "function_call_output" || t === "custom_tool_call_output") {
        const want = t.replace(/_output$/, "");
        if (calls.get(String(item.call_id)) !== want) return { message: `No tool call found for ${label[want]} output with call_id ${String(item.call_id)}.`, param: "input", code: null };
        answered.add(String(item.call_id));
      }
    }
    for (const [id, t] of calls) if (!answered.has(id)) return { message: `No tool output found for ${label[t]} ${id}.`, param: "input", code: null };
    return null;
  }

  /** Responses usage default: ceil(chars / 4) of the JSON of instructions + the full input. */
  const responsesInput = (req: Json, history: Json[]): number => Math.ceil((JSON.stringify(req.instructions ?? "") + JSON.stringify(history)).length / 4);

  // ---- rate limits ----------------------------------------------------------------------------------------------

  /** Charge a request to the window; with `enforce`, answer the provider's 429 instead when it would not fit (and charge nothing). */
  function admit(ctx: Ctx, req: Json, reqModel: string, route: Route, history: Json[]): boolean {
    if (!rates) return true;
    const now = Date.now();
    let input: number;
    if (route === "responses") input = responsesInput(req, history);
    else if (flavor === "anthropic") {
      const u = promptCache.usage(req, now, false);
      input = u ? u.input + u.cache_write : Math.ceil(JSON.stringify(req.messages ?? []).length / 4); // cache reads don't count (§5)
    } else input = Math.ceil(JSON.stringify(req.messages ?? []).length / 4);
    const named = route === "responses" ? req.max_output_tokens : (req.max_completion_tokens ?? req.max_tokens);
    const max = isInt(named) ? named : undefined;
    const output = max ?? 0;
    if (rates.opts.enforce) {
      for (const dim of DIMS[flavor]) {
        const limit = rates.limit(dim), used = rates.used(now, dim), want = partOf({ input, output }, dim);
        if (used + want > limit) {
          rateLimited(ctx, reqModel, dim, { limit, used, want, waitMs: rates.waitMs(now, dim, used + want - limit) });
          return false;
        }
      }
    }
    ctx.charge = { c: rates.add(now, input, output), max };
    return true;
  }

  /** The answer is made: Anthropic's output charge becomes the real output; OpenAI/Kimi keep a named max, else the real output. */
  const settle = (ctx: Ctx, output: number, input?: number): void => {
    const ch = ctx.charge;
    if (!ch) return;
    if (input !== undefined) ch.c.input = input;
    ch.c.output = flavor === "anthropic" || ch.max === undefined ? output : ch.max;
  };

  function rateLimited(ctx: Ctx, model: string, dim: Dim, n: { limit: number; used: number; want: number; waitMs: number }): void {
    const seconds = Math.max(1, Math.ceil(n.waitMs / 1000));
    if (flavor === "anthropic") {
      // wording: anthropics/claude-code #55132 (2026); older bodies said "for your organization (<org>) of N input tokens per minute"
      const what: Record<Dim, string> = { requests: "requests", input_tokens: "input tokens", output_tokens: "output tokens", tokens: "tokens" };
      const message = `This request would exceed your organization's rate limit of ${n.limit.toLocaleString("en-US")} ${what[dim]} per minute (org: ${orgId}, model: ${model}). For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at https://claude.com/contact-sales to discuss your options for a rate limit increase.`;
      return sendFail(ctx, 429, { message }, { "retry-after": String(seconds) });
    }
    if (flavor === "kimi") {
      // MoonshotAI/kimi-cli #1599, LLM-Red-Team/kimi-cc #41
      const message = dim === "requests"
        ? `Your account org-mock<ak-mock> request reached organization max RPM: ${n.limit}, please try again after ${seconds} seconds`
        : `Your account org-mock<ak-mock> request reached organization TPM rate limit, current: ${n.used}, limit: ${n.limit}`;
      return sendFail(ctx, 429, { type: "rate_limit_reached_error", message });
    }
    // OpenAI: BuilderIO/micro-agent #86 (TPM), feder-cr/invisible_playwright_mcp #249 (RPM, type "requests")
    const per = dim === "requests" ? "requests per min (RPM)" : "tokens per min (TPM)";
    const message = n.want > n.limit
      ? `Request too large for ${model} in organization org-mock on ${per}: Limit ${n.limit}, Requested ${n.want}. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.`
      : `Rate limit reached for ${model} in organization org-mock on ${per}: Limit ${n.limit}, Used ${n.used}, Requested ${n.want}. Please try again in ${goDuration(n.waitMs)}. Visit https://platform.openai.com/account/rate-limits to learn more.`;
    sendFail(ctx, 429, { message, type: dim, code: "rate_limit_exceeded" });
  }

  // ---- answering (reply / stream-break / stream-error / stall) -----------------------------------------------

  async function answer(ctx: Ctx, req: Json, reqModel: string, script: AnswerScript, route: Route = "chat", history: Json[] = []): Promise<void> {
    const reply = script.type === "reply" ? script : undefined;
    const toolCalls: ToolCall[] = reply?.tool_calls ?? [];
    const customCalls = route === "responses" ? (reply?.custom_calls ?? []) : [];
    const text = reply?.text !== undefined ? reply.text : toolCalls.length + customCalls.length > 0 ? "" : `Hello from ${reqModel}`;
    const thinking = flavor === "anthropic" ? (reply?.thinking ?? "") : "";
    const reasoning = route === "responses" || flavor === "kimi" ? (reply?.reasoning ?? "") : "";
    const usage: MockUsage = {
      input: route === "responses" ? responsesInput(req, history) : Math.ceil(JSON.stringify(req.messages ?? []).length / 4),
      output: Math.max(1, wordCount(text) + wordCount(thinking) + wordCount(reasoning)),
      cached: 0,
      cache_write: 0,
    };
    const fromCache = flavor === "anthropic" ? promptCache.usage(req, Date.now()) : undefined;
    if (fromCache) Object.assign(usage, fromCache);
    for (const k of ["input", "output", "cached", "cache_write"] as const) {
      const v = reply?.usage?.[k];
      if (typeof v === "number") usage[k] = v;
    }
    settle(ctx, usage.output, flavor === "anthropic" ? usage.input + usage.cache_write : usage.input + usage.cached + usage.cache_write);
    const model = opts.model ?? reqModel;
    const stream = req.stream === true;
    const reqId = requestId();
    const extra = reply?.headers ?? {};
    const resp = route === "responses" ? responsesBody(req, model, { text, calls: toolCalls, custom: customCalls, reasoning }, usage, reply) : undefined;
    if (resp && script.type === "reply" && req.store !== false) {
      responses.set(String(resp.response.id), { input: history, output: resp.items });
      for (const item of resp.items) storedItems.set(String(item.id), item);
    }

    if (!stream) {
      if (script.type === "stream-error") {
        // a non-streamed request has no mid-stream: the failure surfaces as the flavor's 5xx
        const status = flavor === "anthropic" ? 529 : 500;
        const f = defaultError(flavor, status, reqModel, key);
        return sendFail(ctx, status, script.message ? { ...f, message: script.message } : f);
      }
      const payload =
        resp ? resp.response : flavor === "anthropic" ? anthropicJson(model, text, toolCalls, usage, reply) : openaiJson(req, model, text, toolCalls, usage, reply);
      const bodyText = JSON.stringify(payload);
      if (ctx.gone) return;
      if (script.type === "stall") {
        ctx.res.writeHead(200, { "content-type": "application/json", ...providerHeaders(reqId) });
        ctx.res.flushHeaders();
        return;
      }
      if (script.type === "stream-break") {
        ctx.res.writeHead(200, { "content-type": "application/json", ...providerHeaders(reqId), "content-length": String(Buffer.byteLength(bodyText)) });
        if (await write(ctx, bodyText.slice(0, Math.floor(bodyText.length / 2)))) destroySocket(ctx);
        return;
      }
      if (reply?.delayMs && !(await wait(ctx, reply.delayMs))) return;
      return sendJson(ctx, 200, payload, reqId, extra);
    }

    const frames = resp ? resp.frames : flavor === "anthropic" ? anthropicFrames(model, text, toolCalls, usage, reply) : openaiFrames(req, model, text, toolCalls, usage, reply);
    const errMessage = script.type === "stream-error" ? script.message : undefined;
    const errorFrame = (seq: number): string =>
      resp
        ? resp.failed(seq, errMessage ?? `An error occurred while processing your request. You can retry your request, or contact us through our help center at help.openai.com if the error persists. Please include the request ID ${reqId} in your message.`)
        : flavor === "anthropic"
          ? `event: error\ndata: ${JSON.stringify({ type: "error", error: { type: "overloaded_error", message: errMessage ?? "Overloaded" } })}\n\n`
          : flavor === "kimi"
            ? `data: ${JSON.stringify({ error: { type: "server_error", message: errMessage ?? "The server had an error while processing your request. Sorry about that!" } })}\n\n`
            : `data: ${JSON.stringify({ error: { message: errMessage ?? "The server had an error while processing your request. Sorry about that!", type: "server_error", param: null, code: null } })}\n\n`;

    if (ctx.gone) return;
    ctx.res.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      ...providerHeaders(reqId),
      ...extra,
    });
    ctx.res.flushHeaders();
    if (reply?.delayMs && !(await wait(ctx, reply.delayMs))) return;

    const limit = script.type === "reply" ? Infinity : Math.max(0, script.afterChunks);
    let sent = 0;
    let written = 0; // frames written: a Responses stream numbers its events, the failure event included
    for (const f of frames) {
      if (f.kind !== "start" && sent >= limit) {
        if (script.type === "stream-break") destroySocket(ctx);
        else if (script.type === "stream-error") {
          if (await write(ctx, errorFrame(written))) ctx.res.end();
        }
        return; // stall: send nothing more
      }
      if (reply?.gapMs && f.kind === "content" && sent > 0 && !(await wait(ctx, reply.gapMs))) return; // a slow model: a pause before each further chunk
      for (const line of f.lines) if (!(await write(ctx, line))) return;
      written++;
      if (f.kind === "content") sent++;
    }
    if (!ctx.gone) ctx.res.end();
  }

  // ---- OpenAI Responses bodies --------------------------------------------------------------------------------

  type ResponsesParts = { text: string; calls: ToolCall[]; custom: { name: string; input: string }[]; reasoning: string };
  type ResponsesBody = { response: Json; items: Json[]; frames: Frame[]; failed: (seq: number, message: string) => string };

  /** One answer as the final response object, its stream (ingress.md §3.4) and its failure event, all with the same ids. */
  function responsesBody(req: Json, model: string, parts: ResponsesParts, u: MockUsage, reply?: Extract<Script, { type: "reply" }>): ResponsesBody {
    const id = `resp_${hex(48)}`;
    const createdAt = Math.floor(Date.now() / 1000);
    const include = Array.isArray(req.include) ? req.include : [];
    const cut = reply?.finish === "length" ? "max_output_tokens" : reply?.finish === "content_filter" ? "content_filter" : undefined;
    const items: Json[] = [];
    if (parts.reasoning !== "") {
      const r: Json = { id: `rs_${hex(48)}`, type: "reasoning", summary: [{ type: "summary_text", text: parts.reasoning }] };
      if (include.includes("reasoning.encrypted_content")) {
        r.encrypted_content = `gAAAAAB${Buffer.concat([randomBytes(24), createHmac("sha256", secret).update(parts.reasoning).digest(), Buffer.from(parts.reasoning)]).toString("base64url")}`;
      }
      items.push(r);
    }
    if (parts.text !== "" || parts.calls.length + parts.custom.length === 0) {
      items.push({ id: `msg_${hex(48)}`, type: "message", status: cut ? "incomplete" : "completed", content: [{ type: "output_text", annotations: [], logprobs: [], text: parts.text }], role: "assistant" });
    }
    for (const c of parts.calls) items.push({ id: `fc_${hex(48)}`, type: "function_call", status: "completed", arguments: c.arguments, call_id: `call_${rand62(24)}`, name: c.name });
    for (const c of parts.custom) items.push({ id: `ctc_${hex(48)}`, type: "custom_tool_call", call_id: `call_${rand62(24)}`, input: c.input, name: c.name });

    const prompt = u.input + u.cached + u.cache_write;
    const inputDetails: Json = { cached_tokens: u.cached };
    if (u.cache_write > 0) inputDetails.cache_write_tokens = u.cache_write;
    const usage = {
      input_tokens: prompt,
      input_tokens_details: inputDetails,
      output_tokens: u.output,
      output_tokens_details: { reasoning_tokens: Math.min(u.output, wordCount(parts.reasoning)) },
      total_tokens: prompt + u.output,
    };
    const reasoningIn = isObj(req.reasoning) ? req.reasoning : {};
    const textIn = isObj(req.text) ? req.text : {};
    const object = (status: string, output: Json[], withUsage: boolean): Json => ({
      id,
      object: "response",
      created_at: createdAt,
      status,
      background: req.background ?? false,
      completed_at: status === "completed" ? Math.floor(Date.now() / 1000) : null,
      error: null,
      incomplete_details: status === "incomplete" ? { reason: cut } : null,
      instructions: req.instructions ?? null,
      max_output_tokens: req.max_output_tokens ?? null,
      max_tool_calls: req.max_tool_calls ?? null,
      model,
      output,
      parallel_tool_calls: req.parallel_tool_calls ?? true,
      previous_response_id: req.previous_response_id ?? null,
      prompt_cache_key: req.prompt_cache_key ?? null,
      prompt_cache_retention: req.prompt_cache_retention ?? null,
      reasoning: { effort: reasoningIn.effort ?? (reasoningModel(model) ? "medium" : null), summary: reasoningIn.summary ?? null },
      safety_identifier: req.safety_identifier ?? null,
      service_tier: status === "in_progress" ? (req.service_tier ?? "auto") : "default",
      store: req.store ?? true,
      temperature: req.temperature ?? 1,
      text: { format: textIn.format ?? { type: "text" }, verbosity: textIn.verbosity ?? "medium" },
      tool_choice: req.tool_choice ?? "auto",
      tools: req.tools ?? [],
      top_logprobs: req.top_logprobs ?? 0,
      top_p: req.top_p ?? 1,
      truncation: req.truncation ?? "disabled",
      usage: withUsage ? usage : null,
      user: req.user ?? null,
      metadata: req.metadata ?? {},
    });
    const final = object(cut ? "incomplete" : "completed", items, true);

    const frames: Frame[] = [];
    let seq = 0;
    let started = false; // "start" frames become "other" once a content delta went out (see answer())
    const push = (kind: Frame["kind"], data: Json): void => {
      if (kind === "content") started = true;
      frames.push({ kind: kind === "start" && started ? "other" : kind, lines: [`event: ${String(data.type)}\ndata: ${JSON.stringify({ ...data, sequence_number: seq++ })}\n\n`] });
    };
    push("start", { type: "response.created", response: object("in_progress", [], false) });
    push("start", { type: "response.in_progress", response: object("in_progress", [], false) });
    items.forEach((item, output_index) => {
      const item_id = item.id;
      if (item.type === "reasoning") {
        const text = parts.reasoning;
        push("start", { type: "response.output_item.added", output_index, item: { id: item_id, type: "reasoning", summary: [] } });
        push("start", { type: "response.reasoning_summary_part.added", item_id, output_index, summary_index: 0, part: { type: "summary_text", text: "" } });
        for (const delta of splitText(text)) push("content", { type: "response.reasoning_summary_text.delta", item_id, output_index, summary_index: 0, delta });
        push("other", { type: "response.reasoning_summary_text.done", item_id, output_index, summary_index: 0, text });
        push("other", { type: "response.reasoning_summary_part.done", item_id, output_index, summary_index: 0, part: { type: "summary_text", text } });
      } else if (item.type === "message") {
        const part = { type: "output_text", annotations: [], logprobs: [], text: parts.text };
        push("start", { type: "response.output_item.added", output_index, item: { id: item_id, type: "message", status: "in_progress", content: [], role: "assistant" } });
        push("start", { type: "response.content_part.added", item_id, output_index, content_index: 0, part: { ...part, text: "" } });
        for (const delta of splitText(parts.text, reply?.chunks)) push("content", { type: "response.output_text.delta", item_id, output_index, content_index: 0, delta, logprobs: [] });
        push("other", { type: "response.output_text.done", item_id, output_index, content_index: 0, text: parts.text, logprobs: [] });
        push("other", { type: "response.content_part.done", item_id, output_index, content_index: 0, part });
      } else if (item.type === "function_call") {
        const args = String(item.arguments);
        push("start", { type: "response.output_item.added", output_index, item: { ...item, status: "in_progress", arguments: "" } });
        for (const delta of halves(args)) push("content", { type: "response.function_call_arguments.delta", item_id, output_index, delta });
        push("other", { type: "response.function_call_arguments.done", item_id, output_index, name: item.name, arguments: args });
      } else {
        const input = String(item.input);
        push("start", { type: "response.output_item.added", output_index, item: { ...item, input: "" } });
        for (const delta of halves(input)) push("content", { type: "response.custom_tool_call_input.delta", item_id, output_index, delta });
        push("other", { type: "response.custom_tool_call_input.done", item_id, output_index, input });
      }
      push("other", { type: "response.output_item.done", output_index, item });
    });
    push("other", { type: cut ? "response.incomplete" : "response.completed", response: final });

    const failed = (at: number, message: string): string => {
      const response = { ...object("failed", [], false), error: { code: "server_error", message } };
      return `event: response.failed\ndata: ${JSON.stringify({ type: "response.failed", response, sequence_number: at })}\n\n`;
    };
    return { response: final, items, frames, failed };
  }

  // ---- OpenAI / Kimi bodies -----------------------------------------------------------------------------------

  function toolId(i: number, name: string): string {
    return flavor === "kimi" ? `functions.${name}:${i}` : `call_${rand62(24)}`;
  }

  function openaiUsage(u: MockUsage, streamed: boolean): Json {
    const prompt = u.input + u.cached + u.cache_write;
    if (flavor === "kimi") return { prompt_tokens: prompt, completion_tokens: u.output, total_tokens: prompt + u.output, cached_tokens: u.cached };
    const details: Json = streamed ? { cached_tokens: u.cached } : { cached_tokens: u.cached, audio_tokens: 0 };
    if (u.cache_write > 0) details.cache_write_tokens = u.cache_write;
    return {
      prompt_tokens: prompt,
      completion_tokens: u.output,
      total_tokens: prompt + u.output,
      prompt_tokens_details: details,
      completion_tokens_details: streamed ? { reasoning_tokens: 0 } : { reasoning_tokens: 0, audio_tokens: 0 },
    };
  }

  function openaiJson(req: Json, model: string, text: string, calls: ToolCall[], u: MockUsage, reply?: Extract<Script, { type: "reply" }>): Json {
    const kimi = flavor === "kimi";
    const finish = reply?.finish;
    const n = isInt(req.n) ? req.n : 1;
    const toolCalls = calls.map((c, i) => (kimi ? { index: i, id: toolId(i, c.name), type: "function", function: { name: c.name, arguments: c.arguments } } : { id: toolId(i, c.name), type: "function", function: { name: c.name, arguments: c.arguments } }));
    const finishReason = finish ?? (calls.length > 0 ? "tool_calls" : "stop");
    const choices = Array.from({ length: n }, (_, index) => {
      const message: Json = kimi
        ? reply?.reasoning
          ? { role: "assistant", reasoning_content: reply.reasoning, content: text } // kimi-k2.5 thinking (providers.md §3.1 #5)
          : { role: "assistant", content: text }
        : { role: "assistant", content: text === "" && calls.length > 0 ? null : text, refusal: null };
      if (toolCalls.length > 0) message.tool_calls = toolCalls;
      return kimi ? { index, message, finish_reason: finishReason } : { index, message, logprobs: null, finish_reason: finishReason };
    });
    const out: Json = { id: `chatcmpl-${rand62(29)}`, object: "chat.completion", created: Math.floor(Date.now() / 1000), model, choices, usage: openaiUsage(u, false) };
    if (!kimi) {
      out.service_tier = "default";
      out.system_fingerprint = `fp_${hex(10)}`;
    }
    return out;
  }

  function openaiFrames(req: Json, model: string, text: string, calls: ToolCall[], u: MockUsage, reply?: Extract<Script, { type: "reply" }>): Frame[] {
    const kimi = flavor === "kimi";
    const so = isObj(req.stream_options) ? req.stream_options : {};
    const includeUsage = !kimi && so.include_usage === true;
    const obfuscate = !kimi && so.include_obfuscation !== false;
    const n = isInt(req.n) ? req.n : 1;
    const id = `chatcmpl-${rand62(29)}`;
    const created = Math.floor(Date.now() / 1000);
    const fp = `fp_${hex(10)}`;
    const line = (choices: unknown[], usage: unknown = null): string => {
      const o: Json = { id, object: "chat.completion.chunk", created, model };
      if (!kimi) {
        o.service_tier = "default";
        o.system_fingerprint = fp;
      }
      o.choices = choices;
      if (includeUsage) o.usage = usage;
      if (obfuscate) o.obfuscation = rand62(1 + (randomBytes(1)[0] % 12));
      return `data: ${JSON.stringify(o)}\n\n`;
    };
    const choice = (index: number, delta: Json, finish: string | null = null): Json =>
      kimi ? { index, delta, finish_reason: finish } : { index, delta, logprobs: null, finish_reason: finish };
    const each = (delta: Json, kind: Frame["kind"]): Frame => ({ kind, lines: Array.from({ length: n }, (_, i) => line([choice(i, delta)])) });

    const frames: Frame[] = [];
    const ids = calls.map((c, i) => toolId(i, c.name));
    const head = (k: number): Json => ({ index: k, id: ids[k], type: "function", function: { name: calls[k].name, arguments: "" } });
    let firstTool = 0;
    if (kimi && reply?.reasoning) {
      // kimi-k2.5 thinking: reasoning_content chunks before any content or tool call
      frames.push(each({ role: "assistant", content: "" }, "start"));
      for (const piece of splitText(reply.reasoning)) frames.push(each({ reasoning_content: piece }, "content"));
      for (const piece of splitText(text, reply.chunks)) frames.push(each({ content: piece }, "content"));
    } else if (text !== "" || calls.length === 0) {
      frames.push(each(kimi ? { role: "assistant", content: "" } : { role: "assistant", content: "", refusal: null }, "start"));
      for (const piece of splitText(text, reply?.chunks)) frames.push(each({ content: piece }, "content"));
    } else {
      // tool-only answer: the role rides on the first tool-call fragment (§1.3 example)
      frames.push(each({ role: "assistant", content: null, tool_calls: [head(0)] }, "content"));
      for (const frag of halves(calls[0].arguments)) frames.push(each({ tool_calls: [{ index: 0, function: { arguments: frag } }] }, "content"));
      firstTool = 1;
    }
    for (let k = firstTool; k < calls.length; k++) {
      frames.push(each({ tool_calls: [head(k)] }, "content"));
      for (const frag of halves(calls[k].arguments)) frames.push(each({ tool_calls: [{ index: k, function: { arguments: frag } }] }, "content"));
    }
    const finish = reply?.finish ?? (calls.length > 0 ? "tool_calls" : "stop");
    frames.push({
      kind: "other",
      lines: Array.from({ length: n }, (_, i) => {
        const c = choice(i, {}, finish);
        if (kimi && i === 0) c.usage = openaiUsage(u, true); // Kimi: usage inside choices[0] of the finish chunk, always
        return line([c]);
      }),
    });
    if (includeUsage) frames.push({ kind: "other", lines: [line([], openaiUsage(u, true))] });
    frames.push({ kind: "other", lines: ["data: [DONE]\n\n"] });
    return frames;
  }

  // ---- Anthropic bodies ---------------------------------------------------------------------------------------

  function anthropicUsage(u: MockUsage, outputTokens: number): Json {
    return {
      input_tokens: u.input,
      cache_creation_input_tokens: u.cache_write,
      cache_read_input_tokens: u.cached,
      cache_creation: { ephemeral_5m_input_tokens: u.cache_write, ephemeral_1h_input_tokens: 0 },
      output_tokens: outputTokens,
      service_tier: "standard",
    };
  }

  function parseInput(args: string): Json {
    try {
      const v: unknown = JSON.parse(args);
      return isObj(v) ? v : {};
    } catch {
      return {};
    }
  }

  /** The blocks a reply opens with: a signed thinking block and/or a redacted one. */
  function thinkingBlocks(reply?: Extract<Script, { type: "reply" }>): Json[] {
    const out: Json[] = [];
    if (reply?.thinking !== undefined) out.push({ type: "thinking", thinking: reply.thinking, signature: sign(reply.thinking) });
    if (reply?.redactedThinking) out.push({ type: "redacted_thinking", data: Buffer.concat([Buffer.from([0x12, 0x96, 0x01]), randomBytes(240)]).toString("base64") });
    return out;
  }

  function anthropicJson(model: string, text: string, calls: ToolCall[], u: MockUsage, reply?: Extract<Script, { type: "reply" }>): Json {
    const finish = reply?.finish;
    const content: Json[] = thinkingBlocks(reply);
    if (text !== "") content.push({ type: "text", text });
    for (const c of calls) content.push({ type: "tool_use", id: `toolu_01${rand62(22)}`, name: c.name, input: parseInput(c.arguments) });
    return {
      id: `msg_01${rand62(22)}`,
      type: "message",
      role: "assistant",
      model,
      content,
      stop_reason: finish ?? (calls.length > 0 ? "tool_use" : "end_turn"),
      stop_sequence: null,
      usage: anthropicUsage(u, u.output),
    };
  }

  function anthropicFrames(model: string, text: string, calls: ToolCall[], u: MockUsage, reply?: Extract<Script, { type: "reply" }>): Frame[] {
    const ev = (name: string, data: Json): string => `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
    const frames: Frame[] = [];
    let started = false; // still in the leading "start" frames until the first content delta
    const push = (kind: Frame["kind"], name: string, data: Json): void => {
      if (kind === "content") started = true;
      frames.push({ kind: kind === "start" && started ? "other" : kind, lines: [ev(name, data)] });
    };
    const ping = (): void => push("start", "ping", { type: "ping" });
    push("start", "message_start", {
      type: "message_start",
      message: { id: `msg_01${rand62(22)}`, type: "message", role: "assistant", model, content: [], stop_reason: null, stop_sequence: null, usage: anthropicUsage(u, 1) },
    });
    let index = 0;
    for (const b of thinkingBlocks(reply)) {
      // thinking: starts empty (signature "" too), thinking_delta pieces, one signature_delta just before its stop
      const open = b.type === "thinking" ? { type: "thinking", thinking: "", signature: "" } : b;
      push("start", "content_block_start", { type: "content_block_start", index, content_block: open });
      if (index === 0) ping();
      if (b.type === "thinking") {
        for (const piece of splitText(String(b.thinking))) push("content", "content_block_delta", { type: "content_block_delta", index, delta: { type: "thinking_delta", thinking: piece } });
        push("other", "content_block_delta", { type: "content_block_delta", index, delta: { type: "signature_delta", signature: b.signature } });
      }
      push("other", "content_block_stop", { type: "content_block_stop", index });
      index++;
    }
    if (text !== "") {
      push("start", "content_block_start", { type: "content_block_start", index, content_block: { type: "text", text: "" } });
      if (index === 0) ping();
      for (const piece of splitText(text, reply?.chunks)) push("content", "content_block_delta", { type: "content_block_delta", index, delta: { type: "text_delta", text: piece } });
      push("other", "content_block_stop", { type: "content_block_stop", index });
      index++;
    }
    for (const c of calls) {
      push("start", "content_block_start", { type: "content_block_start", index, content_block: { type: "tool_use", id: `toolu_01${rand62(22)}`, name: c.name, input: {} } });
      if (index === 0) ping();
      for (const frag of ["", ...halves(c.arguments)]) push("content", "content_block_delta", { type: "content_block_delta", index, delta: { type: "input_json_delta", partial_json: frag } });
      push("other", "content_block_stop", { type: "content_block_stop", index });
      index++;
    }
    if (index === 0) ping();
    push("other", "message_delta", { type: "message_delta", delta: { stop_reason: reply?.finish ?? (calls.length > 0 ? "tool_use" : "end_turn"), stop_sequence: null }, usage: { output_tokens: u.output } });
    push("other", "message_stop", { type: "message_stop" });
    return frames;
  }

  // ---- lifecycle ----------------------------------------------------------------------------------------------

  return new Promise<Mock>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      server.off("error", reject);
      const port = (server.address() as AddressInfo).port;
      const mock: Mock = {
        url: flavor === "anthropic" ? `http://127.0.0.1:${port}` : `http://127.0.0.1:${port}/v1`,
        flavor,
        key,
        requests,
        queue: (...s: Script[]) => {
          scripts.push(...s);
        },
        setDefault: (s: Script) => {
          fallback = s;
        },
        queueCount: (...s: Script[]) => {
          countScripts.push(...s);
        },
        rateLimits: (o?: RateLimitOpts) => {
          rates = o ? new RateWindow(flavor, o) : undefined;
        },
        sign,
        openConnections: () => sockets.size,
        closedRequests: () => closedCount,
        waitForClosedRequest: () =>
          new Promise<void>((res) => {
            if (closedCount > closedSeen) {
              closedSeen = closedCount;
              res();
            } else waiters.push(res);
          }),
        close: () => {
          if (closePromise) return closePromise;
          closing = true;
          for (const t of timers) clearTimeout(t);
          timers.clear();
          const socketsClosed = [...sockets].map((s) => new Promise<void>((res) => s.once("close", () => res())));
          const serverClosed = new Promise<void>((res) => server.close(() => res()));
          for (const s of sockets) s.destroy();
          server.closeAllConnections();
          closePromise = Promise.all([serverClosed, ...socketsClosed]).then(() => {
            sockets.clear();
          });
          return closePromise;
        },
      };
      resolve(mock);
    });
  });
}
