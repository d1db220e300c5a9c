// The benchmark's upstream: the cheapest OpenAI-compatible server node:http allows, so that the
// router, not the mock, is what the benchmark measures. The model name picks the behaviour:
//   "fast"  answers at once        "slow"  answers after a fixed 50 ms
//   "hold"  streams one chunk, then holds the stream open until release() (the open-streams test)
// Every stream is 20 content chunks, a usage chunk (choices: []) and [DONE], each chunk written in
// its own turn of the event loop so that they leave as separate writes, the way providers send them.

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

const JSON_BODIES = new Map(["fast", "slow", "hold"].map((m) => [m, completion(m)]));
const STREAMS = new Map(["fast", "slow", "hold"].map((m) => [m, streamEvents(m)]));

/** Pull `"model"` and `"stream"` out of the body without a full parse: the mock must stay cheap. */
function peek(body: string): { model: string; stream: boolean } {
  const m = /"model"\s*:\s*"([^"]*)"/.exec(body);
  return { model: m?.[1] ?? "fast", stream: /"stream"\s*:\s*true/.test(body) };
}

export async function startBenchMock(): Promise<BenchMock> {
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

  function answer(res: ServerResponse, model: string, stream: boolean): void {
    if (!stream) {
      const body = JSON_BODIES.get(model) ?? JSON_BODIES.get("fast")!;
      res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    const events = STREAMS.get(model) ?? STREAMS.get("fast")!;
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
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
      if (model === "slow") setTimeout(() => answer(res, model, stream), DELAY_MS);
      else answer(res, model, stream);
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
