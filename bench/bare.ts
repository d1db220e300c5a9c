// The bare reference proxy: the least a fetch-based Node proxy can do and still be a logging LLM
// proxy. node:http in, JSON.parse of the request, fetch upstream (undici, keep-alive), the answer
// passed through as it comes, usage read from the JSON or from the stream's usage events, and one
// row per request written to node:sqlite in batches. It passes Chat Completions to the upstream's
// /v1/chat/completions, Anthropic Messages to its /v1/messages and Responses to its /v1/responses, as they came. No routing,
// limits, validation, translation or failover: the gap between it and TokenWatch is what
// TokenWatch's features cost.

import http from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";
import { DatabaseSync } from "node:sqlite";

type BareRow = [ts: number, model: string, status: number, stream: number, input: number, output: number, latency: number];

export type Bare = { url: string; port: number; server: http.Server; written(): number; pending(): number; close(): Promise<void> };

export async function startBare(opts: { upstream: string; db: string }): Promise<Bare> {
  const db = new DatabaseSync(opts.db);
  db.exec(`PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
    CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, ts INTEGER, model TEXT, status INTEGER, stream INTEGER,
      input_tokens INTEGER, output_tokens INTEGER, latency_ms INTEGER);
    CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);`);
  const insert = db.prepare("INSERT INTO requests (ts, model, status, stream, input_tokens, output_tokens, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?)");
  let queue: BareRow[] = [], timer: NodeJS.Timeout | undefined, written = 0;

  const flush = () => {
    timer = undefined;
    const rows = queue;
    queue = [];
    db.exec("BEGIN");
    for (const r of rows) insert.run(...r);
    db.exec("COMMIT");
    written += rows.length;
  };
  const log = (r: BareRow) => { queue.push(r); timer ??= setTimeout(flush, 50); };

  async function relayStream(resp: Response, res: ServerResponse): Promise<Record<string, number>> {
    res.writeHead(resp.status, { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache" });
    const dec = new TextDecoder();
    let text = "", usage = {};
    for await (const c of resp.body as unknown as AsyncIterable<Uint8Array>) {
      if (!res.write(c)) await new Promise((done) => res.once("drain", done));
      text += dec.decode(c, { stream: true });
      for (let end = text.indexOf("\n\n"); end >= 0; end = text.indexOf("\n\n")) {
        const ev = text.slice(0, end);
        text = text.slice(end + 2);
        const data = ev.indexOf("data: {");
        if (ev.includes("\"usage\"") && data >= 0) { const j = JSON.parse(ev.slice(data + 6)); usage = { ...usage, ...j.usage, ...j.message?.usage, ...j.response?.usage }; }
      }
    }
    res.end();
    return usage;
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const ts = Date.now();
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const text = Buffer.concat(chunks).toString();
    const body = JSON.parse(text) as { model: string; stream?: boolean };
    const path = req.url?.startsWith("/v1/messages") ? "/messages" : req.url?.startsWith("/v1/responses") ? "/responses" : "/chat/completions";
    const resp = await fetch(`${opts.upstream}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: text });
    let usage: { prompt_tokens?: number; completion_tokens?: number; input_tokens?: number; output_tokens?: number };
    if (body.stream) usage = await relayStream(resp, res);
    else {
      const answer = await resp.text();
      usage = JSON.parse(answer).usage ?? {};
      res.writeHead(resp.status, { "content-type": "application/json", "content-length": Buffer.byteLength(answer) });
      res.end(answer);
    }
    log([ts, body.model, resp.status, body.stream ? 1 : 0, usage.prompt_tokens ?? usage.input_tokens ?? 0, usage.completion_tokens ?? usage.output_tokens ?? 0, Date.now() - ts]);
  }

  const server = http.createServer({ keepAliveTimeout: 65_000, requestTimeout: 0 }, (req, res) => {
    handle(req, res).catch((e: Error) => { if (!res.headersSent) res.writeHead(502); res.end(e.message); });
  });
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const port = (server.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}`, port, server,
    written: () => written, pending: () => queue.length,
    close: async () => { server.closeAllConnections(); server.close(); clearTimeout(timer); flush(); db.close(); },
  };
}
