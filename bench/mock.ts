// The benchmark's upstream: the cheapest server node:http allows, so that the router, not the mock, is
// what the benchmark measures. It speaks OpenAI Chat Completions on /v1/chat/completions, Anthropic
// Messages on /v1/messages and OpenAI Responses on /v1/responses. The model name picks the behaviour
// (a "msg-" prefix is ignored):
//   "fast"  answers at once        "slow"  answers after a fixed 50 ms
//   "hold"  streams one chunk, then holds the stream open until release() (the open-streams test)
// Every stream is 20 content events and the format's closing events (Chat: finish, usage chunk and
// [DONE]; Messages: block stop, message_delta with usage, message_stop), each written in its own turn of
// the event loop so that they leave as separate writes, the way providers send them. Every answer carries
// its provider's rate-limit headers (OpenAI's six, Anthropic's twelve), which TokenWatch reads.

import http from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";

export const DELAY_MS = 50;
export const CHUNKS = 20;

export type BenchMock = { url: string; port: number; held(): number; release(): void; connections(): number; close(): Promise<void> };

const USAGE = { prompt_tokens: 1200, completion_tokens: 40, total_tokens: 1240, prompt_tokens_details: { cached_tokens: 0 } };

function completion(model: string): string {
  return JSON.stringify({
    id: "chatcmpl-bench", object: "chat.completion", created: 1_700_000_000, model,
    choices: [{ index: 0, message: { role: "assistant", content: "The answer is forty-two, and here is a short reason why it holds." }, finish_reason: "stop", logprobs: null }],
    usage: USAGE,
  });
}

/** The whole stream as separate `data:` events, computed once per model. */
function streamEvents(model: string): string[] {
  const head = { id: "chatcmpl-bench", object: "chat.completion.chunk", created: 1_700_000_000, model };
  const out: string[] = [];
  for (let i = 0; i < CHUNKS; i++)
    out.push(`data: ${JSON.stringify({ ...head, choices: [{ index: 0, delta: i ? { content: ` word${i}` } : { role: "assistant", content: "word0" }, finish_reason: null }] })}\n\n`);
  out.push(`data: ${JSON.stringify({ ...head, choices: [{ index: 0, delta: {}, finish_reason: "stop" }] })}\n\n`);
  out.push(`data: ${JSON.stringify({ ...head, choices: [], usage: USAGE })}\n\n`);
  out.push("data: [DONE]\n\n");
  return out;
}

/** The same answer as an Anthropic message. */
function message(model: string): string {
  return JSON.stringify({
    id: "msg_bench", type: "message", role: "assistant", model, content: [{ type: "text", text: "The answer is forty-two, and here is a short reason why it holds." }],
    stop_reason: "end_turn", stop_sequence: null, usage: { input_tokens: 1200, cache_creation_input_tokens: 0, cache_read_input_tokens: 0, output_tokens: 40 },
  });
}

/** The same stream as Anthropic's events. */
function messageEvents(model: string): string[] {
  const ev = (name: string, data: unknown) => `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
  const out = [
    ev("message_start", { type: "message_start", message: { id: "msg_bench", type: "message", role: "assistant", model, content: [], stop_reason: null, stop_sequence: null, usage: { input_tokens: 1200, cache_creation_input_tokens: 0, cache_read_input_tokens: 0, output_tokens: 1 } } })
      + ev("content_block_start", { type: "content_block_start", index: 0, content_block: { type: "text", text: "" } }),
  ];
  for (let i = 0; i < CHUNKS; i++) out.push(ev("content_block_delta", { type: "content_block_delta", index: 0, delta: { type: "text_delta", text: i ? ` word${i}` : "word0" } }));
  out.push(ev("content_block_stop", { type: "content_block_stop", index: 0 }));
  out.push(ev("message_delta", { type: "message_delta", delta: { stop_reason: "end_turn", stop_sequence: null }, usage: { output_tokens: 40 } }));
  out.push(ev("message_stop", { type: "message_stop" }));
  return out;
}

/** The same answer as a Responses object, and its stream (sequence numbers in order). */
const RESPONSE_USAGE = { input_tokens: 1200, input_tokens_details: { cached_tokens: 0 }, output_tokens: 40, output_tokens_details: { reasoning_tokens: 0 }, total_tokens: 1240 };
function responseBody(model: string, text = "The answer is forty-two, and here is a short reason why it holds.", status = "completed"): Record<string, unknown> {
  return { id: "resp_bench", object: "response", created_at: 1_700_000_000, status, error: null, incomplete_details: null, model,
    output: status === "completed" ? [{ id: "msg_bench", type: "message", status: "completed", role: "assistant", content: [{ type: "output_text", text, annotations: [] }] }] : [],
    usage: status === "completed" ? RESPONSE_USAGE : null };
}
function responseEvents(model: string): string[] {
  let seq = 0;
  const ev = (type: string, data: Record<string, unknown>) => `event: ${type}\ndata: ${JSON.stringify({ type, ...data, sequence_number: seq++ })}\n\n`;
  const at = { item_id: "msg_bench", output_index: 0 };
  const out = [ev("response.created", { response: responseBody(model, "", "in_progress") }) + ev("response.in_progress", { response: responseBody(model, "", "in_progress") })
    + ev("response.output_item.added", { output_index: 0, item: { id: "msg_bench", type: "message", status: "in_progress", role: "assistant", content: [] } })
    + ev("response.content_part.added", { ...at, content_index: 0, part: { type: "output_text", text: "", annotations: [] } })];
  let text = "";
  for (let i = 0; i < CHUNKS; i++) { const d = i ? ` word${i}` : "word0"; text += d; out.push(ev("response.output_text.delta", { ...at, content_index: 0, delta: d, logprobs: [] })); }
  out.push(ev("response.output_text.done", { ...at, content_index: 0, text, logprobs: [] }) + ev("response.content_part.done", { ...at, content_index: 0, part: { type: "output_text", text, annotations: [] } }));
  out.push(ev("response.output_item.done", { output_index: 0, item: { id: "msg_bench", type: "message", status: "completed", role: "assistant", content: [{ type: "output_text", text, annotations: [] }] } }));
  out.push(ev("response.completed", { response: responseBody(model, text) }));
  return out;
}

type Format = "chat" | "messages" | "responses";
const MODELS = ["fast", "slow", "hold"];
const JSON_BODIES: Record<Format, Map<string, string>> = {
  chat: new Map(MODELS.map((m) => [m, completion(m)])), messages: new Map(MODELS.map((m) => [m, message(m)])), responses: new Map(MODELS.map((m) => [m, JSON.stringify(responseBody(m))])),
};
const STREAMS: Record<Format, Map<string, string[]>> = {
  chat: new Map(MODELS.map((m) => [m, streamEvents(m)])), messages: new Map(MODELS.map((m) => [m, messageEvents(m)])), responses: new Map(MODELS.map((m) => [m, responseEvents(m)])),
};

/** Pull `"model"` and `"stream"` out of the body without a full parse: the mock must stay cheap. */
function peek(body: string): { model: string; stream: boolean } {
  const m = /"model"\s*:\s*"(?:msg-)?([^"]*)"/.exec(body);
  return { model: m?.[1] ?? "fast", stream: /"stream"\s*:\s*true/.test(body) };
}

/**
 * The provider's rate-limit headers, as real answers carry them (so that TokenWatch reads and reconciles
 * them on every answer, as it does in production): limits far above what a benchmark can use, the
 * remaining counts falling with every answer, the resets a second away.
 */
let served = 0;
function rateHeaders(format: Format): Record<string, string> {
  served++;
  if (format !== "messages") {
    return {
      "x-ratelimit-limit-requests": "100000000", "x-ratelimit-remaining-requests": String(100_000_000 - served), "x-ratelimit-reset-requests": "1s",
      "x-ratelimit-limit-tokens": "10000000000", "x-ratelimit-remaining-tokens": String(10_000_000_000 - served * 1240), "x-ratelimit-reset-tokens": "1s",
    };
  }
  const reset = new Date(Math.ceil(Date.now() / 1000) * 1000 + 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
  const h: Record<string, string> = {};
  for (const [dim, limit, used] of [["requests", 100_000_000, served], ["input-tokens", 10_000_000_000, served * 1200], ["output-tokens", 1_000_000_000, served * 40], ["tokens", 11_000_000_000, served * 1240]] as const) {
    h[`anthropic-ratelimit-${dim}-limit`] = String(limit);
    h[`anthropic-ratelimit-${dim}-remaining`] = String(dim === "requests" ? limit - used : Math.round((limit - used) / 1000) * 1000);
    h[`anthropic-ratelimit-${dim}-reset`] = reset;
  }
  return h;
}

export async function startBenchMock(opts: { rateHeaders?: boolean } = {}): Promise<BenchMock> {
  const limits = (format: Format): Record<string, string> => (opts.rateHeaders === false ? {} : rateHeaders(format));
  const held = new Set<() => void>();

  function writeStream(res: ServerResponse, events: string[], from: number): void {
    let i = from;
    const next = () => {
      if (res.destroyed) return;
      if (i === events.length) { res.end(); return; }
      res.write(events[i++]);
      setImmediate(next);
    };
    next();
  }

  function answer(res: ServerResponse, format: Format, model: string, stream: boolean): void {
    if (!stream) {
      const body = JSON_BODIES[format].get(model) ?? JSON_BODIES[format].get("fast")!;
      res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body), ...limits(format) });
      res.end(body);
      return;
    }
    const events = STREAMS[format].get(model) ?? STREAMS[format].get("fast")!;
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache", ...limits(format) });
    if (model !== "hold") return writeStream(res, events, 0);
    res.write(events[0]);
    const go = () => { held.delete(go); writeStream(res, events, 1); };
    held.add(go);
    res.on("close", () => held.delete(go));
  }

  const server = http.createServer({ keepAliveTimeout: 65_000 }, (req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const { model, stream } = peek(Buffer.concat(chunks).toString());
      const format: Format = req.url?.startsWith("/v1/messages") ? "messages" : req.url?.startsWith("/v1/responses") ? "responses" : "chat";
      if (model === "slow") setTimeout(() => answer(res, format, model, stream), DELAY_MS);
      else answer(res, format, model, stream);
    });
  });
  let connections = 0;
  server.on("connection", () => connections++);
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const port = (server.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}`, port,
    held: () => held.size,
    connections: () => connections,
    release: () => { for (const go of [...held]) go(); },
    close: () => new Promise((done) => { server.closeAllConnections(); server.close(() => done()); }),
  };
}
