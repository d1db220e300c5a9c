// Several instances, one set of limits: the RESP client against a real redis-server (started here on a free loopback
// port), then three TokenWatch processes sharing one Redis under a burst against a provider that answers 429 past its
// limit (measured beside the same three instances without Redis), budgets counted once, and Redis killed and
// restarted mid-burst. Without /usr/bin/redis-server these tests are skipped, except under CI (`CI` set), where that
// is a failure: .ci/run installs Debian's redis-server.

import { describe, it, before } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { createServer } from "node:net";
import { once } from "node:events";
import OpenAI from "openai";
import { PROVIDERS, Redis, RedisError, parseReply, encodeCommand, script, Limiter, SharedLimiter } from "../tokenwatch.ts";
import type { Row } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Flavor, Mock } from "./mocks.ts";

const REDIS = "/usr/bin/redis-server";
const SKIP = !existsSync(REDIS) && !process.env.CI ? `redis-server is not installed at ${REDIS} (apt-get install redis-server; CI installs it)` : false;

async function freePort(): Promise<number> {
  const s = createServer().listen(0, "127.0.0.1");
  await once(s, "listening");
  const port = (s.address() as { port: number }).port;
  s.close();
  return port;
}

/** A redis-server of our own on a loopback port, no persistence; `kill()` and `restart()` on the same port. */
async function startRedis(args: string[] = []) {
  const port = await freePort();
  let proc: ChildProcess | undefined;
  const up = async () => {
    proc = spawn(REDIS, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", ...args], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    await new Promise<void>((done) => proc!.stdout!.on("data", (chunk) => { out += chunk; if (out.includes("Ready to accept connections")) done(); }));
  };
  await up();
  return {
    port, url: `redis://127.0.0.1:${port}`,
    kill: async () => { const p = proc!; p.kill("SIGKILL"); await once(p, "exit"); },
    restart: up,
    stop: async () => { if (proc && proc.exitCode === null && proc.signalCode === null) { proc.kill("SIGKILL"); await once(proc, "exit"); } },
  };
}

// ============================================================================================
describe("RESP client (pure)", () => {
  it("parses each reply type, and nothing until a reply is whole, wherever the bytes are cut", () => {
    const wire = Buffer.from("*4\r\n$5\r\nhello\r\n:42\r\n*2\r\n+OK\r\n$-1\r\n$-1\r\n-ERR wrong type\r\n");
    const first = wire.indexOf("-ERR");
    for (let k = 0; k < first; k++) assert.equal(parseReply(wire.subarray(0, k)), undefined, `cut at byte ${k}`);
    const r = parseReply(wire)!;
    assert.deepEqual(r.value, ["hello", 42, ["OK", null], null]);
    assert.equal(r.next, first);
    const err = parseReply(wire, first)!;
    assert.ok(err.value instanceof RedisError && err.value.message === "ERR wrong type");
    assert.deepEqual(parseReply(Buffer.from("$3\r\nélan\r\n".replace("élan", "ab\u00e9").slice(0, 0) + "$3\r\nabc\r\n"))!.value, "abc");
  });

  it("survives a server that does not speak RESP, and replaces a connection that stopped answering", async () => {
    let connections = 0;
    const server = createServer((sock) => {
      const n = ++connections;
      sock.on("data", () => { if (n === 1) sock.write("HTTP/1.1 400 Bad Request\r\n\r\n"); else if (n === 3) sock.write("+PONG\r\n"); }); // the 2nd: silent
    }).listen(0, "127.0.0.1");
    await once(server, "listening");
    const r = new Redis(`redis://127.0.0.1:${(server.address() as { port: number }).port}`);
    try {
      await assert.rejects(r.call(["PING"], 1000), RedisError, "garbage fails the command, not the process");
      await new Promise((done) => setTimeout(done, 120)); // the reconnect backoff
      await assert.rejects(r.call(["PING"], 1000), /did not answer PING within 1000 ms/);
      await new Promise((done) => setTimeout(done, 120));
      assert.equal(await r.call(["PING"], 1000), "PONG", "a new connection replaced the silent one");
      assert.equal(connections, 3);
    } finally { r.close(); server.close(); }
  });

  it("encodes a command as an array of bulk strings, by bytes", () => {
    assert.equal(encodeCommand(["SET", "k", "é", 7]).toString(), "*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\né\r\n$1\r\n7\r\n");
  });
});

describe("RESP client against a real redis-server", { skip: SKIP }, () => {
  before(() => { if (!existsSync(REDIS)) throw new Error(`Cannot run the Redis tests: ${REDIS} is missing. Install it with "apt-get install redis-server" (.ci/run does).`); });

  it("authenticates and selects its database from the URL; a wrong password is a clear error", async () => {
    const server = await startRedis(["--requirepass", "s3cret"]);
    const db3 = new Redis(`redis://:s3cret@127.0.0.1:${server.port}/3`), db0 = new Redis(`redis://:s3cret@127.0.0.1:${server.port}`);
    try {
      assert.equal(await db3.call(["SET", "where", "three"], 1000), "OK");
      assert.equal(await db0.call(["GET", "where"], 1000), null, "database 0 does not have it");
      assert.equal(await db0.call(["SELECT", 3], 1000), "OK");
      assert.equal(await db0.call(["GET", "where"], 1000), "three");
      const wrong = new Redis(`redis://:nope@127.0.0.1:${server.port}`);
      await assert.rejects(wrong.call(["PING"], 1000), (e: Error) => e instanceof RedisError && /WRONGPASS|invalid password/i.test(e.message));
      wrong.close();
    } finally { db3.close(); db0.close(); await server.stop(); }
  });

  it("pipelines: 2,000 commands at once and a 2 MB reply that arrives in many packets, each reply to its command", async () => {
    const server = await startRedis(), r = new Redis(server.url);
    try {
      const big = "x".repeat(2_000_000);
      const replies = await Promise.all([r.call(["SET", "big", big], 2000), ...Array.from({ length: 2000 }, (_, i) => r.call(["RPUSH", "list", i], 2000)), r.call(["GET", "big"], 2000), r.call(["LRANGE", "list", 0, 2], 2000)]);
      assert.equal(replies[0], "OK");
      assert.deepEqual(replies.slice(1, 2001), Array.from({ length: 2000 }, (_, i) => i + 1));
      assert.equal((replies[2001] as string).length, big.length);
      assert.deepEqual(replies[2002], ["0", "1", "2"]);
      await assert.rejects(r.call(["INCR", "big"], 1000), (e: Error) => e instanceof RedisError && /not an integer/.test(e.message));
      assert.equal(await r.call(["PING"], 1000), "PONG", "an error reply does not break the connection");
    } finally { r.close(); await server.stop(); }
  });

  it("loads a script on NOSCRIPT, and reconnects after the server went away", async () => {
    const server = await startRedis(), r = new Redis(server.url);
    const add = script("return tonumber(ARGV[1]) + tonumber(ARGV[2])");
    try {
      assert.equal(await r.eval(add, [], [2, 3], 1000), 5);
      await r.call(["SCRIPT", "FLUSH"], 1000);
      assert.equal(await r.eval(add, [], [4, 5], 1000), 9, "loaded again after the flush");
      await server.kill();
      await assert.rejects(r.call(["PING"], 500), RedisError);
      await server.restart();
      let answer: unknown;
      for (let i = 0; i < 50 && answer === undefined; i++) { // the backoff lets a new try through within 2 s
        answer = await r.call(["PING"], 500).catch(() => undefined);
        if (answer === undefined) await new Promise((done) => setTimeout(done, 100));
      }
      assert.equal(answer, "PONG");
      assert.equal(await r.eval(add, [], [1, 1], 1000), 2, "a restarted server knows no script: loaded again");
    } finally { r.close(); await server.stop(); }
  });
});

// ============================================================================================
/** A TokenWatch process (`node tokenwatch.ts`, as users run it) and its database file. */
type Instance = { url: string; db: string; proc: ChildProcess };
type Fleet = { instances: Instance[]; mocks: Record<Flavor, Mock>; close(): Promise<void> };

const NODE = process.execPath, FILE = new URL("../tokenwatch.ts", import.meta.url).pathname;

async function spawnInstance(env: Record<string, string>, config: string, db: string): Promise<Instance> {
  const proc = spawn(NODE, ["--disable-warning=ExperimentalWarning", FILE, "--port", "0", "--db", db, "--config", config], { env: { PATH: process.env.PATH ?? "", ...env }, stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  const [url] = await new Promise<string[]>((done, fail) => {
    proc.stdout!.on("data", (chunk) => { out += chunk; const m = /listening on (http:\/\/[^\s]+)\/v1\n/.exec(out); if (m) done([m[1]]); }); // read on to the end: its stdout stays open
    proc.once("exit", () => fail(new Error(`TokenWatch did not start: ${out}`)));
  });
  return { url, db, proc };
}

/** Three TokenWatch processes (each its own limiter, log and Redis connection) before one set of mocks. */
async function fleet(redisUrl: string | undefined, extra: Record<string, unknown> = {}): Promise<Fleet> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  const mocks = { openai, kimi, anthropic };
  const env: Record<string, string> = redisUrl ? { TOKENWATCH_REDIS_URL: redisUrl } : {};
  for (const [name, m] of Object.entries(mocks)) { env[`${name.toUpperCase()}_API_KEY`] = m.key; env[`${name.toUpperCase()}_BASE_URL`] = m.url; }
  const dir = mkdtempSync(join(tmpdir(), "tw-fleet-"));
  const file = {
    max_wait_ms: 0, redis: { timeout_ms: 250, instances: 3 }, loop_guard: { max_repeats: 0 }, session_ttl_ms: 0,
    // Kimi sends no rate-limit headers (as the real one): only a shared count keeps instances from overshooting it.
    // Anthropic's model takes what Kimi cannot.
    providers: {
      kimi: { models: { "kimi-k2.5": { ...PROVIDERS.kimi.models["kimi-k2.5"], rpm: 600, concurrency: 10_000 } } },
      anthropic: { models: { "claude-haiku-4-5": { ...PROVIDERS.anthropic.models["claude-haiku-4-5"], rpm: 100_000, itpm: 1e9, otpm: 1e9 } } },
      openai: { models: {} },
    },
    ...extra,
  };
  writeFileSync(join(dir, "config.json"), JSON.stringify(file));
  const instances = await Promise.all([0, 1, 2].map((i) => spawnInstance(env, join(dir, "config.json"), join(dir, `tw-${i}.db`))));
  return {
    instances, mocks,
    close: async () => {
      await Promise.all(instances.map(async (x) => { if (x.proc.exitCode === null) { x.proc.kill("SIGTERM"); await once(x.proc, "exit"); } }));
      await Promise.all(Object.values(mocks).map((m) => m.close()));
    },
  };
}

/** `n` simple requests spread over the instances, `width` at a time; the statuses the clients saw. */
async function burst(f: Fleet, n: number, width = 60, during?: (done: number) => Promise<void>): Promise<number[]> {
  const clients = f.instances.map((tw) => new OpenAI({ baseURL: `${tw.url}/v1`, apiKey: "unused", maxRetries: 0 }));
  const statuses: number[] = [];
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      const status = await clients[i % 3].chat.completions.create({ model: "auto", complexity: "simple", messages: [{ role: "user", content: `ping ${i}` }], max_tokens: 5 } as OpenAI.ChatCompletionCreateParamsNonStreaming)
        .then(() => 200, (e: { status?: number }) => e.status ?? 0);
      statuses.push(status);
      await during?.(statuses.length);
    }
  };
  await Promise.all(Array.from({ length: width }, worker));
  return statuses;
}

const attempts = (m: Mock) => m.requests.filter((r) => r.path.endsWith("/chat/completions")).length;
/** Every row the instances logged, read from their database files once they have stopped (SIGTERM writes every row). */
async function rowsOf(f: Fleet): Promise<Pick<Row, "cost_usd" | "failover">[]> {
  await f.close();
  return f.instances.flatMap((x) => { const d = new DatabaseSync(x.db); try { return d.prepare("SELECT cost_usd, failover FROM requests").all() as never[]; } finally { d.close(); } });
}

describe("the shared limiter in one process, with a real Redis", { skip: SKIP }, () => {
  it("gives every instance back the output tokens Anthropic charged up front and did not write", async () => {
    const server = await startRedis(), r = new Redis(server.url);
    const a = new SharedLimiter({ url: server.url, timeout_ms: 1000 }, 0.8, new Limiter(0.8));
    const haiku = { key: "anthropic/claude-haiku-4-5", pool: "anthropic/claude-haiku-4-5", otpm: 10_000 };
    const seen = async () => String(await r.call(["HGET", `tw:{${haiku.pool}}:seen`, "otpm"], 1000) ?? "").split(",")[0];
    try {
      const now = Date.now();
      const v = await a.reserve(haiku, { input: 100, output: 4000 }, now);
      assert.ok(v.ok);
      // the answer's headers: max_tokens (4,000) charged up front, 4,000 more taken by another client
      const h: Record<string, string> = { "anthropic-ratelimit-output-tokens-limit": "10000", "anthropic-ratelimit-output-tokens-remaining": "2000", "anthropic-ratelimit-output-tokens-reset": new Date(now + 60_000).toISOString() };
      a.observe(haiku.pool, "anthropic", (n) => h[n] ?? null, now, v.reservation, 4000);
      for (let i = 0; i < 50 && (await seen()) !== "8000"; i++) await new Promise((done) => setTimeout(done, 20));
      assert.equal(await seen(), "8000", "every instance sees what the headers said");
      // it wrote 500: Anthropic gives back 3,500, and so does the view every instance decides with
      a.settle(v.reservation, { requests: 0, tokens: 600, input: 100, output: 500 }, now + 1000);
      for (let i = 0; i < 50 && (await seen()) !== "4500"; i++) await new Promise((done) => setTimeout(done, 20));
      assert.equal(await seen(), "4500");
    } finally { a.stop(); r.close(); await server.stop(); }
  });
});

describe("several instances share one Redis", { skip: SKIP }, () => {
  before(() => { if (!existsSync(REDIS)) throw new Error(`Cannot run the Redis tests: ${REDIS} is missing. Install it with "apt-get install redis-server" (.ci/run does).`); });

  it("3 instances, 3,000 requests: a provider's limit holds within 5% with Redis (far over without), no 429 reaches a client, budgets counted once", async () => {
    const server = await startRedis();
    const budget = { budgets: [{ name: "everything", period: "day", hard: 1000 }] };
    const limit = 600, line = (what: string, n: number, refused: number) => `${what}: ${n} sent (${(n / limit).toFixed(2)}x the limit)${refused ? `, ${refused} refused with 429` : ""}`;
    const refused = (rows: Pick<Row, "failover">[]) => rows.filter((r) => /429/.test(r.failover ?? "")).length;
    // 1. the provider answers 429 past its limit, as the issue's mock does
    const alone = await fleet(undefined, budget), shared = await fleet(server.url, budget);
    try {
      for (const f of [alone, shared]) f.mocks.kimi.rateLimits({ limits: { requests: limit }, enforce: true });
      const [a, s] = [await burst(alone, 3000), await burst(shared, 3000)];
      const sentAlone = attempts(alone.mocks.kimi), sentShared = attempts(shared.mocks.kimi);
      await burst(shared, 3, 1); // one more verdict, so that instance 0's view is Redis' latest
      const view = await (await fetch(`${shared.instances[0].url}/stats`)).json();
      const [rowsAlone, rowsShared] = [await rowsOf(alone), await rowsOf(shared)];
      console.log(`kimi-k2.5, ${limit} requests a minute, enforced: ${line("without Redis", sentAlone, refused(rowsAlone))}; ${line("with Redis", sentShared, refused(rowsShared))}`);
      assert.ok(sentShared <= limit * 1.05, `with Redis: ${sentShared} sent against a limit of ${limit}`);
      assert.equal(refused(rowsShared), 0, "with Redis no request met a 429 at all");
      assert.ok(refused(rowsAlone) > 0, "without Redis the instances ran into the provider's 429s (then cooled the model down and failed over)");
      assert.deepEqual([...new Set(s)], [200], "every request answered, with Redis");
      assert.deepEqual([...new Set(a)], [200], "and without (the 429s were failed over to the other model)");

      const redis = new Redis(server.url);
      const keys = (await redis.call(["KEYS", "tw:{budgets}:*"], 1000)) as string[];
      assert.equal(keys.length, 1);
      const spent = Number(await redis.call(["HGET", keys[0], "spent"], 1000));
      const total = rowsShared.reduce((x, r) => x + r.cost_usd, 0);
      assert.ok(total > 0 && Math.abs(spent - total) < 1e-9, `Redis holds the three instances' spend once: ${spent} against ${total} in their logs`);
      const pool = "tw:{anthropic/haiku}"; // Anthropic counts its limits per model class: the table's pool "haiku"
      assert.ok(Number(await redis.call(["HLEN", `${pool}:seen`], 1000)) >= 3, "what Anthropic's rate-limit headers said is shared (requests, input and output tokens)");
      assert.match(String(await redis.call(["HGET", `${pool}:learned`, "rpm"], 1000)), /^\d+$/, "and the limits they taught");
      redis.close();
      assert.equal(view.shared.mode, "redis");
      assert.equal(view.shared.instances.length, 3, "each instance's heartbeat is live");
      assert.ok(view.budgets[0].spends[0].spent_usd > (total / 3) * 1.5, "an instance's view of the budget includes the others' spend");
    } catch (e) { await server.stop(); throw e; } finally { await alone.close(); await shared.close(); }
    // 2. a provider that only counts (the share each instance would take if nothing refused it)
    const alone2 = await fleet(undefined), shared2 = await fleet(server.url);
    try {
      const redis = new Redis(server.url); // a clean count: the first run's windows are still in Redis
      await redis.call(["FLUSHALL"], 1000);
      redis.close();
      for (const f of [alone2, shared2]) f.mocks.kimi.rateLimits({ limits: { requests: 100_000 } });
      await burst(alone2, 3000);
      await burst(shared2, 3000);
      const sentAlone = attempts(alone2.mocks.kimi), sentShared = attempts(shared2.mocks.kimi);
      console.log(`kimi-k2.5, ${limit} requests a minute in the table, counted only: ${line("without Redis", sentAlone, 0)}; ${line("with Redis", sentShared, 0)}`);
      assert.ok(sentAlone >= limit * 2, `without Redis each instance takes 80% of the whole limit: ${sentAlone}`);
      assert.ok(sentShared <= limit * 0.85, `with Redis the three take 80% of it together: ${sentShared}`);
    } finally { await alone2.close(); await shared2.close(); await server.stop(); }
  });

  it("Redis killed mid-burst and restarted: every request answered, the fallback and the recovery in /stats", async () => {
    const server = await startRedis();
    const f = await fleet(server.url);
    const stats = async () => (await fetch(`${f.instances[0].url}/stats`)).json();
    const seen: string[] = [];
    try {
      const statuses = await burst(f, 1500, 30, async (done) => {
        if (done === 400) await server.kill();
        if (done === 900) { seen.push((await stats()).shared.mode); await server.restart(); }
      });
      assert.deepEqual([...new Set(statuses)], [200], "no request failed because Redis did");
      assert.deepEqual(seen, ["local"], "while Redis was down the instance said it decided alone");
      const down = await stats();
      let mode = down.shared.mode;
      for (let i = 0; i < 60 && mode !== "redis"; i++) { await new Promise((r) => setTimeout(r, 100)); mode = (await stats()).shared.mode; }
      assert.equal(mode, "redis", "back on Redis once its heartbeat answered");
      const metrics = await (await fetch(`${f.instances[0].url}/metrics`)).text();
      assert.match(metrics, /^tokenwatch_shared_limits 1$/m);
    } finally { await f.close(); await server.stop(); }
  });
});
