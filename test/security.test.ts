// Safe by default and hard to break: who may talk to TokenWatch, what never leaves it (provider keys),
// how it answers bad input (a generated flood of it included), and how it survives upstream and
// database faults. Everything goes through the HTTP surface a user (or an attacker) has.

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { buildConfig, start, allowedHosts, PROVIDERS } from "../tokenwatch.ts";
import type { Running } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Mock } from "./mocks.ts";

type Env = { tw: Running; openai: Mock; kimi: Mock; logs: string[]; close(): Promise<void> };

/** TokenWatch in front of an OpenAI and a Kimi mock (gpt-4o-mini first for simple work, then kimi-k2.5). */
async function setup(opts: { env?: Record<string, string>; file?: Record<string, unknown>; db?: string; host?: string } = {}): Promise<Env> {
  const [openai, kimi] = await Promise.all([startMock("openai"), startMock("kimi")]);
  const env = { OPENAI_API_KEY: openai.key, OPENAI_BASE_URL: openai.url, KIMI_API_KEY: kimi.key, KIMI_BASE_URL: kimi.url, ...opts.env };
  const file = { providers: { anthropic: { models: {} }, openai: { models: { "gpt-4o-mini": PROVIDERS.openai.models["gpt-4o-mini"] } }, kimi: { models: { "kimi-k2.5": PROVIDERS.kimi.models["kimi-k2.5"] } } }, ...opts.file };
  const logs: string[] = [];
  const tw = await start({ config: buildConfig({ env, file }), env, db: opts.db, host: opts.host, log: (l) => logs.push(l) });
  return { tw, openai, kimi, logs, close: async () => { await tw.close(1000); await Promise.all([openai.close(), kimi.close()]); } };
}

/** A raw HTTP request (fetch cannot set Host, and hides some failures). */
function raw(port: number, opts: { method?: string; path?: string; headers?: Record<string, string | number>; body?: string | Buffer }): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((done, fail) => {
    const req = http.request({ host: "127.0.0.1", port, method: opts.method ?? "GET", path: opts.path ?? "/", headers: opts.headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => done({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks).toString() }));
    });
    req.on("error", fail);
    req.end(opts.body);
  });
}

const chatBody = JSON.stringify({ complexity: "simple", messages: [{ role: "user", content: "hi" }] });
const upstreamCalls = (e: Env) => e.openai.requests.length + e.kimi.requests.length;

/** An OpenAI-shaped error: what every refusal must look like. */
function assertErrorShape(text: string, status: number): void {
  const body = JSON.parse(text);
  assert.ok(body.error && typeof body.error.message === "string" && body.error.message.length > 10, `status ${status}: ${text}`);
  assert.equal(typeof body.error.type, "string");
  assert.equal(typeof body.error.code, "string");
}

describe("security: who may talk to TokenWatch", () => {
  let e: Env;
  const key = "tw-local-secret-0123456789";
  before(async () => { e = await setup({ env: { TOKENWATCH_API_KEY: key } }); });
  after(() => e.close());

  const guarded: [string, string][] = [["POST", "/v1/chat/completions"], ["GET", "/v1/models"], ["GET", "/stats"], ["GET", "/api/stats"], ["GET", "/api/limits"]];
  for (const [method, path] of guarded)
    it(`TOKENWATCH_API_KEY guards ${method} ${path}: none or a wrong key is 401, Bearer or x-api-key passes`, async () => {
      const headers = { "content-type": "application/json" };
      const body = method === "POST" ? chatBody : undefined;
      const wrong: Record<string, string>[] = [{}, { authorization: "Bearer wrong" }, { "x-api-key": key.slice(0, -1) }, { authorization: key }];
      for (const extra of wrong) {
        const r = await raw(e.tw.port, { method, path, headers: { ...headers, ...extra }, body });
        assert.equal(r.status, 401, JSON.stringify(extra));
        assertErrorShape(r.body, 401);
      }
      const right: Record<string, string>[] = [{ authorization: `Bearer ${key}` }, { "x-api-key": key }];
      for (const extra of right)
        assert.equal((await raw(e.tw.port, { method, path, headers: { ...headers, ...extra }, body })).status, 200);
    });

  it("keeps /health open, and serves the dashboard page (which holds no data) without the key", async () => {
    assert.equal((await raw(e.tw.port, { path: "/health" })).status, 200);
    const page = await raw(e.tw.port, { path: "/" });
    assert.equal(page.status, 200);
    assert.match(String(page.headers["content-type"]), /text\/html/);
    assert.match(String(page.headers["content-security-policy"]), /default-src 'none'/);
  });

  it("sends no CORS headers, so a page on another origin can neither read answers nor preflight a JSON post", async () => {
    const pre = await raw(e.tw.port, { method: "OPTIONS", path: "/v1/chat/completions", headers: { origin: "https://evil.example", "access-control-request-method": "POST", "access-control-request-headers": "content-type" } });
    assert.notEqual(pre.status, 204);
    const get = await raw(e.tw.port, { path: "/health", headers: { origin: "https://evil.example" } });
    for (const r of [pre, get]) assert.deepEqual(Object.keys(r.headers).filter((h) => h.startsWith("access-control-")), []);
  });

  for (const type of ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
    it(`refuses a ${type.split(";")[0]} post (what a web form can send) with 415, before any upstream`, async () => {
      const before = upstreamCalls(e);
      const r = await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": type, authorization: `Bearer ${key}` }, body: chatBody });
      assert.equal(r.status, 415);
      assertErrorShape(r.body, 415);
      assert.equal(upstreamCalls(e), before);
    });

  it("refuses a Host that is not the address it serves (DNS rebinding)", async () => {
    for (const host of ["evil.example", `evil.example:${e.tw.port}`, `127.0.0.1.nip.io:${e.tw.port}`]) {
      const r = await raw(e.tw.port, { path: "/health", headers: { host } });
      assert.equal(r.status, 403, host);
      assert.equal(JSON.parse(r.body).error.code, "host_not_allowed");
    }
    for (const host of [`127.0.0.1:${e.tw.port}`, `localhost:${e.tw.port}`, "localhost"])
      assert.equal((await raw(e.tw.port, { path: "/health", headers: { host } })).status, 200, host);
  });

  it("allowedHosts() knows loopback names, a specific address, wildcards and TOKENWATCH_ALLOWED_HOSTS", () => {
    assert.deepEqual([...allowedHosts("127.0.0.1", 8080)!].sort(), ["127.0.0.1", "127.0.0.1:8080", "[::1]", "[::1]:8080", "localhost", "localhost:8080"]);
    assert.deepEqual([...allowedHosts("192.168.1.5", 80)!].sort(), ["192.168.1.5", "192.168.1.5:80"]);
    assert.equal(allowedHosts("0.0.0.0", 8080), undefined);
    assert.deepEqual([...allowedHosts("0.0.0.0", 8080, "Router.lan, box:9000")!].sort(), ["box:9000", "router.lan", "router.lan:8080"]);
  });

  it("never turns TLS verification off", () => {
    const source = readFileSync(new URL("../tokenwatch.ts", import.meta.url), "utf8");
    assert.doesNotMatch(source, /rejectUnauthorized|NODE_TLS_REJECT_UNAUTHORIZED|checkServerIdentity/);
  });
});

describe("security: provider keys never leave", () => {
  it("scrubs a key an upstream echoes from the answer, the attempts, the log, the store and /stats", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-sec-"));
    const db = join(dir, "tw.db");
    const e = await setup({ db });
    try {
      const leak = (k: string) => ({ error: { message: `Incorrect API key provided: ${k}. You can find your API key at …`, type: "invalid_request_error", param: null, code: "invalid_api_key" } });
      e.openai.queue({ type: "error", status: 500, body: leak(e.openai.key) });        // fails over, lands in routing.attempts
      const a = await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: chatBody });
      assert.equal(a.status, 200);
      e.openai.queue({ type: "error", status: 400, body: leak(e.openai.key) });        // goes back to the client as it is
      const b = await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] }) });
      assert.equal(b.status, 400);
      e.kimi.queue({ type: "stream-error", afterChunks: 1, message: `bad key ${e.kimi.key}` }); // mid-stream error event
      const c = await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "kimi-k2.5", stream: true, messages: [{ role: "user", content: "one two" }] }) });
      const stats = await raw(e.tw.port, { path: "/stats?window=all" });
      await e.close();
      const dbText = JSON.stringify(new DatabaseSync(db).prepare("SELECT * FROM requests").all());
      for (const [where, text] of [["answer", a.body], ["4xx", b.body], ["stream", c.body], ["stats", stats.body], ["store", dbText], ["log", e.logs.join("\n")]] as const)
        for (const k of [e.openai.key, e.kimi.key]) assert.ok(!text.includes(k), `${where} leaks a key`);
      assert.match(b.body, /\[redacted\]/);
      assert.match(a.body, /"attempts"/);
      assert.match(dbText, /\[redacted\]/);
    } finally { rmSync(dir, { recursive: true, force: true }); }
  });
});

describe("bad input", () => {
  let e: Env;
  before(async () => { e = await setup({ file: { max_body_bytes: 64 * 1024 } }); });
  after(() => e.close());
  const send = (body: string | Buffer, headers: Record<string, string | number> = {}) => raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json", ...headers }, body });

  it("answers a body over the limit with 413 without reading it all, declared or chunked", async () => {
    // declares 50 MB and sends none of it: the answer can only come from the header
    const declared = await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json", "content-length": 50 * 1024 * 1024 } });
    assert.equal(declared.status, 413);
    assert.match(declared.body, /larger than 65536 bytes/);
    const chunked = await send(Buffer.alloc(5 * 1024 * 1024, 0x20), { "transfer-encoding": "chunked" });
    assert.equal(chunked.status, 413);
    assertErrorShape(chunked.body, 413);
    assert.equal((await send(chatBody)).status, 200); // still serving
  });

  it("refuses absurd sizes: max_tokens of a trillion, a hundred thousand and one messages", async () => {
    assert.equal((await send(JSON.stringify({ max_tokens: 1e12, messages: [{ role: "user", content: "x" }] }))).status, 400);
    const big = await setup({});
    try {
      const many = JSON.stringify({ messages: Array.from({ length: 100_001 }, () => ({ role: "user", content: "" })) });
      const r = await raw(big.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: many });
      assert.equal(r.status, 400);
      assert.match(r.body, /more than 100,000/);
    } finally { await big.close(); }
  });

  it("survives thousands of generated bad bodies: each gets a well-formed 4xx, none reaches an upstream", async () => {
    const seed = Number(process.env.FUZZ_SEED ?? Date.now() % 1e9);
    const rand = mulberry32(seed);
    const before = upstreamCalls(e);
    const statuses = new Map<number, number>();
    const bodies = Array.from({ length: 3000 }, () => badBody(rand));
    for (let i = 0; i < bodies.length; i += 50) {
      const batch = await Promise.all(bodies.slice(i, i + 50).map((b) => send(b.body, b.headers)));
      batch.forEach((r, j) => {
        const what = `seed ${seed}, body ${JSON.stringify(bodies[i + j].body.toString().slice(0, 200))}`;
        assert.ok(r.status >= 400 && r.status < 500, `${what} got ${r.status}: ${r.body.slice(0, 200)}`);
        assert.doesNotThrow(() => assertErrorShape(r.body, r.status), what);
        statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
      });
    }
    assert.equal(upstreamCalls(e), before, `seed ${seed}: a bad body reached an upstream`);
    assert.ok((statuses.get(400) ?? 0) > 1000, JSON.stringify([...statuses]));
    const good = await send(chatBody);
    assert.equal(good.status, 200);
    assert.match(JSON.parse(good.body).choices[0].message.content, /Hello from/);
  });
});

describe("faults", () => {
  it("cools a model down for 5 s after a 429 that names no reset time, and fails over meanwhile", async () => {
    const e = await setup();
    try {
      e.openai.queue({ type: "error", status: 429 });
      const r = await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: chatBody });
      assert.equal(JSON.parse(r.body).routing.provider, "kimi");
      const m = JSON.parse((await raw(e.tw.port, { path: "/stats" })).body).models.find((x: { model: string }) => x.model === "gpt-4o-mini");
      assert.equal(m.cooling, true);
      assert.ok(m.free_in_s >= 4 && m.free_in_s <= 5, `free in ${m.free_in_s}`);
    } finally { await e.close(); }
  });

  it("keeps serving while the database is locked, says so in /stats, and writes every row once it frees", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-lock-"));
    const db = join(dir, "tw.db");
    const e = await setup({ db });
    const other = new DatabaseSync(db);
    try {
      other.exec("BEGIN EXCLUSIVE");
      for (let i = 0; i < 5; i++) assert.equal((await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: chatBody })).status, 200);
      const locked = JSON.parse((await raw(e.tw.port, { path: "/stats" })).body);
      assert.match(locked.store.last_error, /Cannot write to .*locked/);
      assert.equal(locked.store.pending_rows, 5);
      other.exec("COMMIT");
      const freed = JSON.parse((await raw(e.tw.port, { path: "/stats" })).body);
      assert.equal(freed.store.last_error, null);
      assert.equal(freed.totals.requests, 5);
    } finally { other.close(); await e.close(); rmSync(dir, { recursive: true, force: true }); }
  });
});

describe("faults: a full disk", () => {
  // A real full disk: an 8 MiB tmpfs, nearly filled. Mounting needs root, which CI has; elsewhere the
  // test is skipped with the reason, but never under CI.
  const mnt = mkdtempSync(join(tmpdir(), "tw-full-"));
  const mounted = spawnSync("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt]).status === 0;
  if (!mounted && process.env.CI) throw new Error("Cannot mount a tmpfs for the full-disk test: CI must run as root");
  after(() => { if (mounted) spawnSync("umount", [mnt]); rmSync(mnt, { recursive: true, force: true }); });

  it("keeps serving on a full disk, says so in /stats, and writes every row once there is room", { skip: mounted ? false : "needs root to mount a tmpfs" }, async () => {
    const e = await setup({ db: join(mnt, "tw.db") });
    const filler = join(mnt, "filler");
    try {
      // leave ~40 KiB: the schema fits, a few hundred rows with their WAL frames do not
      const free = () => Number(spawnSync("df", ["-B1", "--output=avail", mnt], { encoding: "utf8" }).stdout.trim().split("\n")[1]);
      writeFileSync(filler, Buffer.alloc(Math.max(0, free() - 40 * 1024)));
      const long = "x".repeat(230); // a long model name (256 characters at most) makes each row big
      let answered = 0;
      for (let i = 0; i < 300; i++) {
        const r = await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: `no-such-model-${long}`, messages: [{ role: "user", content: "hi" }] }) });
        assert.equal(r.status, 404);
        answered++;
      }
      assert.equal((await raw(e.tw.port, { method: "POST", path: "/v1/chat/completions", headers: { "content-type": "application/json" }, body: chatBody })).status, 200);
      answered++;
      const full = JSON.parse((await raw(e.tw.port, { path: "/stats" })).body);
      assert.match(full.store.last_error, /full/i);
      assert.ok(full.store.pending_rows > 0);
      rmSync(filler);
      const freed = JSON.parse((await raw(e.tw.port, { path: "/stats" })).body);
      assert.equal(freed.store.last_error, null);
      assert.equal(freed.totals.requests, answered);
    } finally { await e.close(); }
  });
});

// ---- the bad-body generator: every body it makes must be refused by the rules of the contract ----

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Bad = { body: string | Buffer; headers?: Record<string, string> };

function badBody(rand: () => number): Bad {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)];
  const junk = () => pick<unknown>([null, true, 0, -1, 1.5, "", "x", [], {}, [1, "a"], { a: 1 }, 1e308, "\u0000", "<script>"]);
  const good = () => ({ model: "auto", messages: [{ role: "user", content: "hi" }] as unknown[] });
  const kinds: (() => Bad)[] = [
    () => ({ body: JSON.stringify(good()).slice(0, 1 + Math.floor(rand() * 40)) }),                      // truncated JSON
    () => ({ body: pick(["", " ", "null", "[]", "42", "\"str\"", "{", "}", "{\"messages\":}", "{'a':1}", "NaN"]) }),
    () => ({ body: Buffer.concat([Buffer.from("{\"messages\":[{\"role\":\"user\",\"content\":\""), Buffer.from([0xc3 + Math.floor(rand() * 3), 0x28, 0xff, 0xfe]), Buffer.from("\"}]}")]) }), // invalid UTF-8
    () => { const d = 65 + Math.floor(rand() * 200); return { body: `{"messages":${"[".repeat(d)}${"]".repeat(d)}}` }; },   // too deep
    () => ({ body: JSON.stringify({ ...good(), messages: pick([undefined, null, [], {}, "hi", 5, junk()]) }) }),
    () => { const b = good(); b.messages[0] = junk(); return { body: JSON.stringify(b) }; },
    () => ({ body: JSON.stringify({ ...good(), messages: [{ role: pick(["robot", "", "USER", null, 1, "System", "model"]), content: "hi" }] }) }),
    () => ({ body: JSON.stringify({ ...good(), messages: [{ role: "user", content: pick([5, true, {}, { text: "x" }, [1], [{ type: "text", text: 5 }], [{ type: "image_url" }], [null]]) }] }) }),
    () => ({ body: JSON.stringify({ ...good(), messages: [{ role: "tool", content: "42" }] }) }),
    () => ({ body: JSON.stringify({ ...good(), messages: [{ role: "assistant", tool_calls: pick([{}, [{}], [{ id: 1 }], "x"]) }] }) }),
    () => ({ body: JSON.stringify({ ...good(), [pick(["max_tokens", "max_completion_tokens", "n"])]: pick([0, -5, 1.5, "10", 1e12, true, []]) }) }),
    () => ({ body: JSON.stringify({ ...good(), [pick(["temperature", "top_p"])]: pick([-1, 3, "hot", [], {}]) }) }),
    () => ({ body: JSON.stringify({ ...good(), stream: pick(["true", 1, [], {}]) }) }),
    () => ({ body: JSON.stringify({ ...good(), stream_options: { include_usage: true } }) }),
    () => ({ body: JSON.stringify({ ...good(), complexity: pick(["medium", "", 1, "SIMPLE", null, []]) }) }),
    () => ({ body: JSON.stringify({ ...good(), model: pick(["", 5, [], {}, true, "gpt-9", "nope/model", "claude-opus-9", "../../etc/passwd"]) }) }),
    () => ({ body: JSON.stringify({ ...good(), tools: pick([{}, "x", [1], [{ type: "function" }], [{ type: "function", function: { name: 5 } }]]) }) }),
    () => ({ body: JSON.stringify({ ...good(), stop: pick([5, ["a", "b", "c", "d", "e"], [1], {}]) }) }),
    () => ({ body: JSON.stringify(good()), headers: { "content-type": pick(["text/plain", "application/x-www-form-urlencoded", "text/html", "application/jsonx", "json"]) } }),
    () => ({ body: JSON.stringify(good()), headers: { "x-tokenwatch-complexity": pick(["hard", "1", "SIMPLE"]) } }),
  ];
  return pick(kinds)();
}
