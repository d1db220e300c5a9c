// TokenWatch's overhead, measured against the limit of its design.
//
//   npm run bench              full run: about six minutes
//   npm run bench -- --quick   a short run for a first look (its verdicts are noisier)
//   add --no-rate-headers      the mock's answers carry no rate-limit headers (to see what reading them costs)
//   npm run bench -- --redis-only   only what sharing the limits through Redis adds (needs /usr/bin/redis-server)
//
// On loopback: a mock OpenAI-compatible upstream (bench/mock.ts: instant, or 50 ms late), TokenWatch in
// front of it with SQLite logging to a real file, and the bare reference proxy (bench/bare.ts: the least
// a fetch-based Node proxy can do). TokenWatch and the bare proxy each run in their own process; under
// load they are pinned to core 1 and this process (mock and load generator) to core 0, when taskset and
// a second core exist. Every figure is measured direct-to-mock, through the bare proxy and through
// TokenWatch: latency in rounds that alternate which proxy goes first (nothing pinned), throughput alone
// in short slices that alternate bare/TokenWatch/TokenWatch/bare, then with both proxies loaded at once
// on core 1 (the ratio the verdict uses: a slowdown of the host hits both in the same instant). The
// table prints medians and a verdict per target.

import http from "node:http";
import { fork, spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import process from "node:process";
import { startBenchMock } from "./mock.ts";
import type { BenchMock } from "./mock.ts";
import type { Sample } from "./child.ts";

const QUICK = process.argv.includes("--quick");
/** Answers without rate-limit headers: run once with, once without, to see what reading them costs. */
const NO_RATE_HEADERS = process.argv.includes("--no-rate-headers");
const PLAN = QUICK
  ? { rounds: 1, latencyN: 600, slowN: 20, pairs: 3, sliceMs: 800, windows: 2, windowMs: 2000 }
  : { rounds: 4, latencyN: 1000, slowN: 30, pairs: 8, sliceMs: 1000, windows: 8, windowMs: 3000 };
const CONNECTIONS = 50;
const OPEN_STREAMS = 1000;
const RAMP_MS = 150;      // each throughput slice starts with this much load that is not counted

// ---- the request an agent sends: a system prompt, a tool call and its result, two tools (about 4 KB) ----

const SYSTEM = "You are a careful coding agent working in a large TypeScript repository. ".repeat(20);
const TOOLS = [
  { type: "function", function: { name: "read_file", description: "Read a file of the repository", parameters: { type: "object", properties: { path: { type: "string" } }, required: ["path"] } } },
  { type: "function", function: { name: "run", description: "Run a shell command and return its output", parameters: { type: "object", properties: { command: { type: "string" } }, required: ["command"] } } },
];
function body(model: string, stream: boolean): string {
  return JSON.stringify({
    model, max_tokens: 1024, tools: TOOLS,
    messages: [
      { role: "system", content: SYSTEM },
      { role: "user", content: "The tests in src/limiter.test.ts fail since the last change; find out why and fix it." },
      { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function", function: { name: "read_file", arguments: "{\"path\":\"src/limiter.ts\"}" } }] },
      { role: "tool", tool_call_id: "call_1", content: "export class Limiter {\n  // sliding window of 60 one-second buckets\n}\n".repeat(12) },
      { role: "user", content: "Go on." },
    ],
    ...(stream ? { stream: true, stream_options: { include_usage: true } } : {}),
  });
}
/** The same conversation as Claude Code sends it (Anthropic Messages): system on top, tool_use and tool_result blocks, a cache mark. */
function messagesBody(model: string, stream: boolean): string {
  return JSON.stringify({
    model, max_tokens: 1024, system: [{ type: "text", text: SYSTEM, cache_control: { type: "ephemeral" } }],
    tools: TOOLS.map((t) => ({ name: t.function.name, description: t.function.description, input_schema: t.function.parameters })),
    messages: [
      { role: "user", content: "The tests in src/limiter.test.ts fail since the last change; find out why and fix it." },
      { role: "assistant", content: [{ type: "tool_use", id: "toolu_1", name: "read_file", input: { path: "src/limiter.ts" } }] },
      { role: "user", content: [{ type: "tool_result", tool_use_id: "toolu_1", content: "export class Limiter {\n  // sliding window of 60 one-second buckets\n}\n".repeat(12) }, { type: "text", text: "Go on." }] },
    ],
    ...(stream ? { stream: true } : {}),
  });
}

/** What a client sends, and where: Chat Completions, or Messages passed through to Anthropic ("msg-" models) or translated for OpenAI. */
type Scenario = { label: string; path: string; model: string; body(model: string, stream: boolean): string };
const CHAT: Scenario = { label: "Chat Completions → OpenAI kind (passthrough)", path: "/v1/chat/completions", model: "fast", body };
const MESSAGES_NATIVE: Scenario = { label: "Messages → Anthropic kind (passthrough)", path: "/v1/messages", model: "msg-fast", body: messagesBody };
const MESSAGES_TRANSLATED: Scenario = { label: "Messages → OpenAI kind (translated)", path: "/v1/messages", model: "fast", body: messagesBody };

/** The same conversation as Codex sends it (OpenAI Responses): instructions, items, a function call and its output. */
function responsesBody(model: string, stream: boolean): string {
  return JSON.stringify({
    model, instructions: SYSTEM, max_output_tokens: 1024, store: false,
    tools: TOOLS.map((t) => ({ type: "function", name: t.function.name, description: t.function.description, parameters: t.function.parameters, strict: false })),
    input: [
      { type: "message", role: "user", content: [{ type: "input_text", text: "The tests in src/limiter.test.ts fail since the last change; find out why and fix it." }] },
      { type: "function_call", call_id: "call_1", name: "read_file", arguments: "{\"path\":\"src/limiter.ts\"}" },
      { type: "function_call_output", call_id: "call_1", output: "export class Limiter {\n  // sliding window of 60 one-second buckets\n}\n".repeat(12) },
      { type: "message", role: "user", content: [{ type: "input_text", text: "Go on." }] },
    ],
    ...(stream ? { stream: true } : {}),
  });
}
const RESPONSES_NATIVE: Scenario = { label: "Responses → OpenAI with Responses (passthrough)", path: "/v1/responses", model: "fast", body: responsesBody };
const RESPONSES_TRANSLATED: Scenario = { label: "Responses → Anthropic kind (translated)", path: "/v1/responses", model: "msg-fast", body: responsesBody };

const BODIES = new Map<string, string>();
const bodyFor = (s: Scenario, model: string, stream: boolean) => {
  const k = `${s.path}:${model}:${stream}`;
  if (!BODIES.has(k)) BODIES.set(k, s.body(model, stream));
  return BODIES.get(k)!;
};

// ---- the load generator: node:http with keep-alive agents ----

type Name = "direct" | "bare" | "tokenwatch" | "ackfirst";
type Target = { name: Name; url: URL; child?: Proc };
type Timing = { ttfb: number; total: number; status: number };

function once(target: Target, agent: http.Agent, model: string, stream: boolean, s: Scenario = CHAT): Promise<Timing> {
  const payload = bodyFor(s, model, stream);
  const path = s.path;
  return new Promise((done, fail) => {
    const t0 = performance.now();
    let ttfb = -1;
    const req = http.request({ host: target.url.hostname, port: target.url.port, path, method: "POST", agent,
      headers: { "content-type": "application/json", "content-length": Buffer.byteLength(payload) } }, (res) => {
      res.on("data", () => { if (ttfb < 0) ttfb = performance.now() - t0; });
      res.on("end", () => done({ ttfb, total: performance.now() - t0, status: res.statusCode ?? 0 }));
      res.on("error", fail);
    });
    req.on("error", fail);
    req.end(payload);
  });
}

const agentFor = (n: number) => new http.Agent({ keepAlive: true, maxSockets: n, keepAliveMsecs: 60_000 });

/** One client, one request after the other: the latency an agent sees. */
async function latency(target: Target, model: string, stream: boolean, n: number, s: Scenario = CHAT): Promise<{ total: number[]; ttfb: number[] }> {
  const agent = agentFor(1);
  for (let i = 0; i < (model === "slow" ? 5 : 200); i++) await once(target, agent, model, stream, s); // warm the path and the JIT
  const total: number[] = [], ttfb: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = await once(target, agent, model, stream, s);
    if (t.status !== 200) throw new Error(`${target.name} answered ${t.status}`);
    total.push(t.total);
    ttfb.push(t.ttfb);
  }
  agent.destroy();
  return { total, ttfb };
}

type Slice = { rps: number; cpuUs: number | undefined; busy: number | undefined };

/** CONNECTIONS clients in a loop for `ms` (after a ramp): requests per second, and the router's CPU time per request. */
async function slice(target: Target, agent: http.Agent, stream: boolean, ms: number): Promise<Slice> {
  let phase: "ramp" | "measure" | "stop" = "ramp", count = 0, errors = 0;
  const worker = async () => {
    while (phase !== "stop") {
      const t = await once(target, agent, "fast", stream);
      if (t.status !== 200) errors++;
      if (phase === "measure") count++;
    }
  };
  const workers = Array.from({ length: CONNECTIONS }, worker);
  await sleep(RAMP_MS);
  const before = await sampleOf(target);
  phase = "measure";
  const t0 = performance.now();
  await sleep(ms);
  const n = count, seconds = (performance.now() - t0) / 1000;
  const after = await sampleOf(target);
  phase = "stop";
  await Promise.all(workers);
  if (errors) throw new Error(`${target.name}: ${errors} requests failed under load`);
  const cpu = before && after ? after.cpuUs - before.cpuUs : undefined;
  return { rps: n / seconds, cpuUs: cpu === undefined ? undefined : cpu / n, busy: cpu === undefined ? undefined : cpu / 1e6 / seconds };
}

/** Throughput of each target: direct alone, then bare and TokenWatch in alternating slices (ABBA), so a passing slowdown hits both. */
async function throughput(targets: Target[], stream: boolean): Promise<Record<Name, Slice[]>> {
  const out: Record<Name, Slice[]> = { direct: [], bare: [], tokenwatch: [], ackfirst: [] };
  const agents = new Map(targets.map((t) => [t.name, agentFor(CONNECTIONS)]));
  for (const t of targets) await slice(t, agents.get(t.name)!, stream, 1000); // warm: connections, JIT, the heap's size
  for (let i = 0; i < 2; i++) out.direct.push(await slice(targets[0], agents.get("direct")!, stream, PLAN.sliceMs));
  for (let i = 0; i < PLAN.pairs; i++) {
    const order = i % 2 ? [targets[2], targets[1]] : [targets[1], targets[2]];
    for (const t of order) out[t.name].push(await slice(t, agents.get(t.name)!, stream, PLAN.sliceMs));
  }
  for (const a of agents.values()) a.destroy();
  return out;
}

/**
 * Bare and TokenWatch under load at the same time, each with its own CONNECTIONS clients, sharing core 1:
 * the scheduler splits the core between them, so their ratio of requests per second is their ratio of
 * efficiency, measured in the same instants. On a noisy VM this is the steadiest figure: a slowdown of
 * the host hits both alike, where alternating slices only take turns with it.
 */
async function sideBySide(targets: Target[], stream: boolean, s: Scenario = CHAT, windows = PLAN.windows): Promise<{ ratios: number[]; cpu: Record<"bare" | "tokenwatch", number[]> }> {
  const pair = [targets[1], targets[2]];
  const counts = new Map(pair.map((t) => [t.name, 0]));
  let stop = false, errors = 0;
  const agents = pair.map(() => agentFor(CONNECTIONS));
  const workers = pair.flatMap((t, k) => Array.from({ length: CONNECTIONS }, async () => {
    while (!stop) {
      const r = await once(t, agents[k], s.model, stream, s);
      if (r.status !== 200) errors++;
      counts.set(t.name, counts.get(t.name)! + 1);
    }
  }));
  await sleep(1000);
  const ratios: number[] = [], cpu = { bare: [] as number[], tokenwatch: [] as number[] };
  for (let w = 0; w < windows; w++) {
    const before = await Promise.all(pair.map((t) => sampleOf(t)));
    const n0 = pair.map((t) => counts.get(t.name)!);
    await sleep(PLAN.windowMs);
    const after = await Promise.all(pair.map((t) => sampleOf(t)));
    const n = pair.map((t, k) => counts.get(t.name)! - n0[k]);
    ratios.push(n[1] / n[0]);
    pair.forEach((t, k) => cpu[k ? "tokenwatch" : "bare"].push((after[k]!.cpuUs - before[k]!.cpuUs) / n[k]));
  }
  stop = true;
  await Promise.all(workers);
  for (const a of agents) a.destroy();
  if (errors) throw new Error(`${errors} requests failed under load`);
  return { ratios, cpu };
}

/** 1,000 streams held open at once: the router's resident memory while they are all open. */
async function openStreams(target: Target, mock: BenchMock): Promise<number> {
  const agent = agentFor(OPEN_STREAMS);
  let firstBytes = 0;
  const all = Array.from({ length: OPEN_STREAMS }, () => new Promise<void>((done, fail) => {
    const payload = bodyFor(CHAT, "hold", true);
    const req = http.request({ host: target.url.hostname, port: target.url.port, path: CHAT.path, method: "POST", agent,
      headers: { "content-type": "application/json", "content-length": Buffer.byteLength(payload) } }, (res) => {
      let seen = false;
      res.on("data", () => { if (!seen) { seen = true; firstBytes++; } });
      res.on("end", done);
      res.on("error", fail);
    });
    req.on("error", fail);
    req.end(payload);
  }));
  while (firstBytes < OPEN_STREAMS) await sleep(20);
  await sleep(200);
  const s = await sampleOf(target);
  mock.release();
  await Promise.all(all);
  agent.destroy();
  return s!.rss;
}

// ---- the proxies under test, each in its own process ----

type Proc = { child: ChildProcess; url: string; samples: ((s: Sample) => void)[] };

const CORES = availableParallelism();
const pinning = CORES >= 2 && spawnSync("taskset", ["-V"]).status === 0;
const pin = (pid: number, cores: string) => { if (pinning) spawnSync("taskset", ["-a", "-p", "-c", cores, String(pid)], { stdio: "ignore" }); };
const ALL_CORES = `0-${CORES - 1}`;

/**
 * "split": proxies on core 1, this process on core 0, so that load and router never share a core
 * (throughput, CPU). "float": nothing pinned (latency): on a VM a wake-up across two pinned cores
 * costs tens of microseconds at p50 and milliseconds at p99 (a bare TCP ping-pong shows it), which
 * would be the machine's figure, not the router's.
 */
function placement(mode: "split" | "float", procs: Proc[]): void {
  pin(process.pid, mode === "split" ? "0" : ALL_CORES);
  for (const p of procs) pin(p.child.pid!, mode === "split" ? "1" : ALL_CORES);
}

async function spawnProxy(role: "tokenwatch" | "bare" | "ackfirst" | "redis", upstream: string, db: string, redis?: string): Promise<Proc> {
  const child = fork(new URL("./child.ts", import.meta.url), [role, upstream, db, ...(redis ? [redis] : [])], { execArgv: ["--expose-gc", "--no-warnings"], stdio: ["ignore", "inherit", "inherit", "ipc"] });
  const proc: Proc = { child, url: "", samples: [] };
  await new Promise<void>((done, fail) => {
    child.once("exit", (code) => fail(new Error(`${role} exited with ${code}`)));
    child.on("message", (m: { type: string; url?: string }) => {
      if (m.type === "ready") { proc.url = m.url!; done(); }
      else if (m.type === "sample") proc.samples.shift()?.(m as Sample);
    });
  });
  return proc;
}

function sampleOf(target: Target, gc = false): Promise<Sample | undefined> {
  const p = target.child;
  if (!p) return Promise.resolve(undefined);
  return new Promise((done) => { p.samples.push(done); p.child.send({ type: "sample", gc }); });
}

/**
 * What Node's TypeScript stripper holds once it has read a proxy's source: every `.ts` file is stripped
 * by a WebAssembly module whose memory grows with the largest file and is never given back. Measured
 * in a fresh process, so that the memory figures can say how much of them is the runtime's, not the proxy's.
 */
function stripperMB(files: string[]): number {
  const code = `const { stripTypeScriptTypes } = require("node:module"); const { readFileSync } = require("node:fs");
    const before = process.memoryUsage().rss;
    for (const f of ${JSON.stringify(files)}) stripTypeScriptTypes(readFileSync(f, "utf8"));
    process.stdout.write(String(process.memoryUsage().rss - before));`;
  const out = spawnSync(process.execPath, ["--no-warnings", "-e", code], { encoding: "utf8" });
  return out.status === 0 ? MB(Number(out.stdout)) : NaN;
}

// ---- figures, medians and the table ----

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const pct = (xs: number[], p: number) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]; };
const median = (xs: number[]) => pct(xs, 50);
const MB = (b: number) => b / 1024 / 1024;
const log = (s: string) => process.stderr.write(`${s}\n`);
const ms = (x: number) => x.toFixed(2);

type Fig = Record<Name, number[]>;
const fig = (): Fig => ({ direct: [], bare: [], tokenwatch: [], ackfirst: [] });

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "tokenwatch-bench-"));
  const mock = await startBenchMock({ rateHeaders: !NO_RATE_HEADERS });
  const [bare, tw] = [await spawnProxy("bare", mock.url, join(dir, "bare.db")), await spawnProxy("tokenwatch", mock.url, join(dir, "tokenwatch.db"))];
  const targets: Target[] = [
    { name: "direct", url: new URL(mock.url) },
    { name: "bare", url: new URL(bare.url), child: bare },
    { name: "tokenwatch", url: new URL(tw.url), child: tw },
  ];
  const proxies = targets.slice(1);
  const f = { p50: fig(), p99: fig(), sp50: fig(), sp99: fig(), slow50: fig(), slow99: fig(), ttfb50: fig(), ttfb99: fig(), sttfb50: fig(), heap: fig() };
  const started = performance.now();
  const elapsed = () => `${Math.round((performance.now() - started) / 1000)} s`;
  log(`machine: ${CORES} cores, ${cpus()[0]?.model ?? "unknown CPU"}, Node ${process.version}; upstream answers ${NO_RATE_HEADERS ? "without" : "with"} rate-limit headers; ${pinning ? "under load the proxies run on core 1, mock and load generator on core 0" : "nothing pinned (taskset or a second core missing)"}`);

  if (process.argv.includes("--redis-only")) {
    const r = await redisPhase(targets, mock.url, dir, [bare, tw], elapsed);
    if (r) process.stdout.write(`\n${redisTable(r)}\n`);
    for (const p of [bare, tw]) p.child.send({ type: "close" });
    await Promise.all([bare, tw].map((p) => new Promise((res) => p.child.once("exit", res))));
    await mock.close();
    rmSync(dir, { recursive: true, force: true });
    return;
  }
  placement("split", [bare, tw]);
  const open: Record<string, number> = {};
  for (const t of proxies) { await latency(t, "fast", true, 300); open[t.name] = await openStreams(t, mock); } // fresh processes, warmed
  log(`${OPEN_STREAMS} open streams: bare ${MB(open.bare).toFixed(0)} MB, TokenWatch ${MB(open.tokenwatch).toFixed(0)} MB resident, ${elapsed()}`);

  placement("float", [bare, tw]);
  for (let round = 0; round < PLAN.rounds; round++) {
    const order = round % 2 ? [targets[0], targets[2], targets[1]] : targets;
    for (const t of order) {
      const j = await latency(t, "fast", false, PLAN.latencyN);
      f.p50[t.name].push(pct(j.total, 50)); f.p99[t.name].push(pct(j.total, 99));
      const s = await latency(t, "fast", true, PLAN.latencyN);
      f.sp50[t.name].push(pct(s.total, 50)); f.sp99[t.name].push(pct(s.total, 99));
      f.ttfb50[t.name].push(pct(s.ttfb, 50)); f.ttfb99[t.name].push(pct(s.ttfb, 99));
      const slow = await latency(t, "slow", false, PLAN.slowN);
      f.slow50[t.name].push(pct(slow.total, 50)); f.slow99[t.name].push(pct(slow.total, 99));
      const slowStream = await latency(t, "slow", true, PLAN.slowN);
      f.sttfb50[t.name].push(pct(slowStream.ttfb, 50));
    }
    for (const t of proxies) f.heap[t.name].push((await sampleOf(t, true))!.heapUsed);
    const add = (n: "bare" | "tokenwatch") => ms(f.p50[n].at(-1)! - f.p50.direct.at(-1)!);
    log(`latency round ${round + 1}/${PLAN.rounds}: JSON p50 added bare +${add("bare")} ms, TokenWatch +${add("tokenwatch")} ms, ${elapsed()}`);
  }

  placement("split", [bare, tw]);
  const json = await throughput(targets, false);
  log(`throughput, JSON: bare ${Math.round(median(json.bare.map((s) => s.rps)))}, TokenWatch ${Math.round(median(json.tokenwatch.map((s) => s.rps)))} req/s, ${elapsed()}`);
  const stream = await throughput(targets, true);
  log(`throughput, stream: bare ${Math.round(median(stream.bare.map((s) => s.rps)))}, TokenWatch ${Math.round(median(stream.tokenwatch.map((s) => s.rps)))} req/s, ${elapsed()}`);
  const shared = { json: await sideBySide(targets, false), stream: await sideBySide(targets, true) };
  log(`side by side on one core: TokenWatch/bare ${median(shared.json.ratios).toFixed(2)} (JSON), ${median(shared.stream.ratios).toFixed(2)} (stream), ${elapsed()}`);
  for (const t of proxies) f.heap[t.name].push((await sampleOf(t, true))!.heapUsed);

  const formats = await formatsPhase(targets, [bare, tw], elapsed);
  const commit = await groupCommitPhase(targets, mock.url, dir, [bare, tw], elapsed);
  const redis = await redisPhase(targets, mock.url, dir, [bare, tw], elapsed);

  const end = { bare: (await sampleOf(proxies[0], true))!, tokenwatch: (await sampleOf(proxies[1], true))! };
  const here = (f: string) => new URL(f, import.meta.url).pathname;
  const strip = { bare: stripperMB([here("./child.ts"), here("./bare.ts")]), tokenwatch: stripperMB([here("./child.ts"), here("../tokenwatch.ts")]) };
  log(`done in ${elapsed()}; rows written: bare ${end.bare.written}, TokenWatch ${end.tokenwatch.written}; TokenWatch in flight ${end.tokenwatch.inflight}, rows pending ${end.tokenwatch.pending}`);
  process.stdout.write(`\n${table(f, json, stream, shared, { bare: end.bare.maxRss, tokenwatch: end.tokenwatch.maxRss }, { bare: open.bare, tokenwatch: open.tokenwatch }, end.tokenwatch, strip)}\n`);
  process.stdout.write(`\n${formatsTable(formats, shared)}\n\n${commitTable(commit)}\n`);
  process.stdout.write(redis ? `\n${redisTable(redis)}\n` : "\nRedis: not measured (no /usr/bin/redis-server)\n");
  for (const p of [bare, tw]) p.child.send({ type: "close" });
  await Promise.all([bare, tw].map((p) => new Promise((r) => p.child.once("exit", r))));
  await mock.close();
  rmSync(dir, { recursive: true, force: true });
}

// ---- client formats, and what group commit costs ----

type FormatFigures = { s: Scenario; p50: Fig; sp50: Fig; json: Shared; stream: Shared };

/**
 * The Messages and Responses entries against the bare proxy passing the same format through: each
 * one's passthrough lane and its translation for the other kind of upstream. Latency in rounds that
 * alternate the order, throughput side by side on one core, as for Chat Completions (half the windows).
 */
async function formatsPhase(targets: Target[], procs: Proc[], elapsed: () => string): Promise<FormatFigures[]> {
  const out: FormatFigures[] = [];
  for (const s of [MESSAGES_NATIVE, MESSAGES_TRANSLATED, RESPONSES_NATIVE, RESPONSES_TRANSLATED]) {
    placement("float", procs);
    const p50 = fig(), sp50 = fig();
    for (let round = 0; round < Math.max(1, PLAN.rounds / 2); round++) {
      for (const t of round % 2 ? [targets[0], targets[2], targets[1]] : targets) {
        p50[t.name].push(pct((await latency(t, s.model, false, PLAN.latencyN / 2, s)).total, 50));
        sp50[t.name].push(pct((await latency(t, s.model, true, PLAN.latencyN / 2, s)).total, 50));
      }
    }
    placement("split", procs);
    const windows = Math.max(2, PLAN.windows / 2);
    const figures = { s, p50, sp50, json: await sideBySide(targets, false, s, windows), stream: await sideBySide(targets, true, s, windows) };
    log(`${s.label}: TokenWatch/bare ${median(figures.json.ratios).toFixed(2)} (JSON), ${median(figures.stream.ratios).toFixed(2)} (stream), ${elapsed()}`);
    out.push(figures);
  }
  return out;
}

type CommitFigures = { p50: Fig; sp50: Fig; json: Shared; stream: Shared };

/** A redis-server of the benchmark's own on a free loopback port, no persistence; undefined when none is installed. */
async function startRedisServer(): Promise<{ url: string; stop(): void } | undefined> {
  if (!existsSync("/usr/bin/redis-server")) return undefined;
  const port = await new Promise<number>((done) => { const s = http.createServer().listen(0, "127.0.0.1", () => { const p = (s.address() as { port: number }).port; s.close(() => done(p)); }); });
  const proc = spawn("/usr/bin/redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  for await (const c of proc.stdout!) { out += c; if (out.includes("Ready to accept connections")) break; }
  return { url: `redis://127.0.0.1:${port}`, stop: () => proc.kill("SIGKILL") };
}

/**
 * What sharing the limits through Redis adds: TokenWatch with its local limiter side by side with the same
 * build whose every verdict is a Lua call to a local redis-server (and every settle another, not awaited),
 * both in fresh processes, warmed alike: latency one client at a time, then throughput side by side.
 */
async function redisPhase(targets: Target[], upstream: string, dir: string, procs: Proc[], elapsed: () => string): Promise<CommitFigures & { mode: string } | undefined> {
  const redis = await startRedisServer();
  if (!redis) { log("Redis: skipped (no /usr/bin/redis-server: apt-get install redis-server)"); return undefined; }
  const [local, shared] = [await spawnProxy("tokenwatch", upstream, join(dir, "local.db")), await spawnProxy("redis", upstream, join(dir, "shared.db"), redis.url)];
  const out = await comparePair(targets, procs, local, shared);
  const mode = (await sampleOf({ name: "tokenwatch", url: new URL(shared.url), child: shared }, false))?.shared ?? "unknown";
  log(`Redis: shared/local ${median(out.json.ratios).toFixed(2)} (JSON), ${median(out.stream.ratios).toFixed(2)} (stream); the shared instance ended in mode "${mode}", ${elapsed()}`);
  await closeAll([local, shared], procs);
  redis.stop();
  return { ...out, mode };
}

/**
 * Two fresh builds compared, warmed alike, while the main proxies sit out on the load generator's core:
 * latency one client at a time in rounds that alternate which goes first, then throughput side by side.
 * `base` is reported under "ackfirst" (and "bare" in the CPU figures), `other` under "tokenwatch".
 */
async function comparePair(targets: Target[], procs: Proc[], base: Proc, other: Proc): Promise<CommitFigures> {
  const pair: Target[] = [targets[0], { name: "ackfirst", url: new URL(base.url), child: base }, { name: "tokenwatch", url: new URL(other.url), child: other }];
  for (const p of procs) pin(p.child.pid!, "0");
  placement("float", [base, other]);
  for (const t of pair.slice(1)) await latency(t, "fast", false, 200);
  const p50 = fig(), sp50 = fig();
  for (let round = 0; round < Math.max(1, PLAN.rounds / 2); round++) {
    for (const t of round % 2 ? [pair[0], pair[2], pair[1]] : pair) {
      p50[t.name].push(pct((await latency(t, "fast", false, PLAN.latencyN / 2)).total, 50));
      sp50[t.name].push(pct((await latency(t, "fast", true, PLAN.latencyN / 2)).total, 50));
    }
  }
  placement("split", [base, other]);
  const windows = Math.max(2, PLAN.windows / 2);
  return { p50, sp50, json: await sideBySide(pair, false, CHAT, windows), stream: await sideBySide(pair, true, CHAT, windows) };
}

/** Close the compared pair and put the main proxies back where they were. */
async function closeAll(pair: Proc[], procs: Proc[]): Promise<void> {
  for (const p of pair) p.child.send({ type: "close" });
  await Promise.all(pair.map((p) => new Promise((r) => p.child.once("exit", r))));
  placement("split", procs);
}

function redisTable(c: CommitFigures & { mode: string }): string {
  const head = ["limits shared through Redis (one Lua call per verdict)", "JSON", "stream"];
  const lat = (x: Fig) => `+${ms(median(x.tokenwatch.map((v, i) => v - x.ackfirst[i])))} ms (${ms(median(x.tokenwatch))} vs ${ms(median(x.ackfirst))} with the local limiter)`;
  const rows = [
    ["latency p50, 1 client, added by Redis", lat(c.p50), lat(c.sp50)],
    ["throughput side by side, vs the local limiter", `${median(c.json.ratios).toFixed(2)} ×`, `${median(c.stream.ratios).toFixed(2)} ×`],
    ["CPU time per request (µs), Redis vs local", `${Math.round(median(c.json.cpu.tokenwatch))} vs ${Math.round(median(c.json.cpu.bare))}`, `${Math.round(median(c.stream.cpu.tokenwatch))} vs ${Math.round(median(c.stream.cpu.bare))}`],
    ["the shared instance at the end (redis.timeout_ms 250 here)", c.mode, ""],
  ];
  return [head, head.map(() => "---"), ...rows].map((x) => `| ${x.join(" | ")} |`).join("\n");
}

/**
 * What committing each row before the answer's last byte costs: TokenWatch as it is, side by side with
 * the same build started with `durable: false` (rows written every 50 ms, answers not waiting for them),
 * both in fresh processes with fresh databases, warmed alike.
 */
async function groupCommitPhase(targets: Target[], upstream: string, dir: string, procs: Proc[], elapsed: () => string): Promise<CommitFigures> {
  const [ack, durable] = [await spawnProxy("ackfirst", upstream, join(dir, "ackfirst.db")), await spawnProxy("tokenwatch", upstream, join(dir, "durable.db"))];
  const out = await comparePair(targets, procs, ack, durable);
  log(`group commit: TokenWatch/answer-first ${median(out.json.ratios).toFixed(2)} (JSON), ${median(out.stream.ratios).toFixed(2)} (stream), ${elapsed()}`);
  await closeAll([ack, durable], procs);
  return out;
}

function formatsTable(formats: FormatFigures[], chat: { json: Shared; stream: Shared }): string {
  const head = ["client format → upstream", "latency p50 added, JSON (ms)", "latency p50 added, stream (ms)", "throughput vs bare, JSON", "throughput vs bare, stream", "target", "verdict"];
  const r = (x: Shared) => median(x.ratios);
  const rows = [["Chat Completions → OpenAI kind (passthrough)", "see above", "see above", r(chat.json).toFixed(2), r(chat.stream).toFixed(2), "≥ 0.85 × bare", r(chat.json) >= 0.85 && r(chat.stream) >= 0.85 ? "**PASS**" : "**FAIL**"]];
  for (const f of formats) {
    const ok = r(f.json) >= 0.85 && r(f.stream) >= 0.85;
    rows.push([f.s.label, `+${ms(added(f.p50, "tokenwatch"))} (bare +${ms(added(f.p50, "bare"))})`, `+${ms(added(f.sp50, "tokenwatch"))} (bare +${ms(added(f.sp50, "bare"))})`,
      `${r(f.json).toFixed(2)} (${Math.min(...f.json.ratios).toFixed(2)}–${Math.max(...f.json.ratios).toFixed(2)})`, `${r(f.stream).toFixed(2)} (${Math.min(...f.stream.ratios).toFixed(2)}–${Math.max(...f.stream.ratios).toFixed(2)})`, "≥ 0.85 × bare", ok ? "**PASS**" : "**FAIL**"]);
  }
  return [head, head.map(() => "---"), ...rows].map((x) => `| ${x.join(" | ")} |`).join("\n");
}

function commitTable(c: CommitFigures): string {
  const head = ["group commit (each row committed before the answer's last byte)", "JSON", "stream"];
  const lat = (x: Fig) => `+${ms(median(x.tokenwatch.map((v, i) => v - x.ackfirst[i])))} ms (${ms(median(x.tokenwatch))} vs ${ms(median(x.ackfirst))})`;
  const rows = [
    ["latency p50, 1 client, vs the same build answering first", lat(c.p50), lat(c.sp50)],
    ["throughput side by side, vs the same build answering first", `${median(c.json.ratios).toFixed(2)} ×`, `${median(c.stream.ratios).toFixed(2)} ×`],
    ["CPU time per request (µs), durable vs answering first", `${Math.round(median(c.json.cpu.tokenwatch))} vs ${Math.round(median(c.json.cpu.bare))}`, `${Math.round(median(c.stream.cpu.tokenwatch))} vs ${Math.round(median(c.stream.cpu.bare))}`],
  ];
  return [head, head.map(() => "---"), ...rows].map((x) => `| ${x.join(" | ")} |`).join("\n");
}

/** Added over direct, per round, then the median: each round's pair shares the machine's mood. */
const added = (x: Fig, who: "bare" | "tokenwatch") => median(x[who].map((v, i) => v - x.direct[i]));

type Pair = { bare: number; tokenwatch: number };

type Shared = Awaited<ReturnType<typeof sideBySide>>;

function table(f: Record<string, Fig>, json: Record<Name, Slice[]>, stream: Record<Name, Slice[]>, shared: { json: Shared; stream: Shared }, peak: Pair, open: Pair, end: Sample, strip: Pair): string {
  const rows: string[][] = [];
  const verdict = (ok: boolean) => (ok ? "**PASS**" : "**FAIL**");
  const lat = (label: string, x: Fig, limit?: number) => {
    const a = added(x, "tokenwatch");
    rows.push([label, ms(median(x.direct)), ms(median(x.bare)), ms(median(x.tokenwatch)), `+${ms(a)} ms (bare +${ms(added(x, "bare"))})`, limit === undefined ? "" : `≤ +${limit} ms`, limit === undefined ? "" : verdict(a <= limit)]);
  };
  const range = (xs: number[]) => `${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)}`;
  const rps = (label: string, s: Record<Name, Slice[]>, sh: Shared) => {
    const alone = s.tokenwatch.map((t, i) => t.rps / s.bare[i].rps), r = median(sh.ratios);
    const m = (n: Name) => Math.round(median(s[n].map((x) => x.rps))).toString();
    rows.push([label, m("direct"), m("bare"), m("tokenwatch"), `${r.toFixed(2)} × bare side by side (${range(sh.ratios)}); alone ${median(alone).toFixed(2)} (${range(alone)})`, "≥ 0.85 × bare", verdict(r >= 0.85)]);
  };
  const cpu = (label: string, s: Record<Name, Slice[]>, sh: Shared) => {
    const c = (n: "bare" | "tokenwatch") => `${Math.round(median(sh.cpu[n]))} (alone ${Math.round(median(s[n].map((x) => x.cpuUs!)))}, core ${Math.round(median(s[n].map((x) => x.busy!)) * 100)}% busy)`;
    const r = median(sh.cpu.tokenwatch.map((t, i) => t / sh.cpu.bare[i]));
    rows.push([label, "—", c("bare"), c("tokenwatch"), `${r.toFixed(2)} × bare`, "", ""]);
  };
  lat("latency p50, JSON, 1 client (ms)", f.p50, 0.6);
  lat("latency p99, JSON, 1 client (ms)", f.p99, 3);
  lat("latency p50, stream to [DONE], 1 client (ms)", f.sp50, 0.6);
  lat("latency p99, stream to [DONE], 1 client (ms)", f.sp99, 3);
  lat("first streamed byte p50 (ms)", f.ttfb50, 1);
  lat("first streamed byte p99 (ms)", f.ttfb99);
  lat("latency p50, JSON, 50 ms upstream (ms)", f.slow50);
  lat("latency p99, JSON, 50 ms upstream (ms)", f.slow99);
  lat("first streamed byte p50, 50 ms upstream (ms)", f.sttfb50);
  rps(`throughput, JSON, ${CONNECTIONS} connections (req/s)`, json, shared.json);
  rps(`throughput, stream, ${CONNECTIONS} connections (req/s)`, stream, shared.stream);
  cpu("CPU time per request, JSON (µs)", json, shared.json);
  cpu("CPU time per request, stream (µs)", stream, shared.stream);
  rows.push(["peak memory, resident (MB)", "—", MB(peak.bare).toFixed(0), MB(peak.tokenwatch).toFixed(0), `${(peak.tokenwatch / peak.bare).toFixed(2)} × bare`, "", ""]);
  rows.push([`memory with ${OPEN_STREAMS} streams open, resident (MB)`, "—", MB(open.bare).toFixed(0), MB(open.tokenwatch).toFixed(0), `${(open.tokenwatch / open.bare).toFixed(2)} × bare`, "< 200 MB", verdict(MB(open.tokenwatch) < 200)]);
  rows.push([`… of it, Node's TypeScript stripper (MB)`, "—", strip.bare.toFixed(0), strip.tokenwatch.toFixed(0), `${(MB(open.tokenwatch) - strip.tokenwatch).toFixed(0)} MB without it (bare ${(MB(open.bare) - strip.bare).toFixed(0)})`, "", ""]);
  const grow = (who: "bare" | "tokenwatch") => MB(f.heap[who][f.heap[who].length - 1] - f.heap[who][0]);
  const g = grow("tokenwatch");
  rows.push(["heap after GC, growth from the first latency round to the end (MB)", "—", grow("bare").toFixed(2), g.toFixed(2), `${end.inflight} in flight, ${end.pending} rows pending at the end`, "< 1 MB, nothing left over", verdict(g < 1 && end.inflight === 0 && end.pending === 0)]);
  const head = ["figure", "direct", "bare proxy", "TokenWatch", "TokenWatch vs bare", "target", "verdict"];
  return [head, head.map(() => "---"), ...rows].map((r) => `| ${r.join(" | ")} |`).join("\n");
}

await main();
