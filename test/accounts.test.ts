// Who spent what, and what stops a runaway agent, through HTTP with the real SDKs: per-agent keys and headers
// attributed in the log, /stats and the dashboard's data; budgets whose soft cap moves traffic to the cheap tier and
// whose hard cap refuses (429 budget_exceeded, Retry-After to the period's end), counted from the log so that a
// restart forgets nothing, and reserved so that 200 requests at once cannot overshoot; the loop guard; /metrics
// checked by Prometheus' own promtool and against /stats. Unit tests of the pure parts use an injected clock.

import { describe, it, before } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";
import Anthropic from "@anthropic-ai/sdk";
import { buildConfig, start, PROVIDERS, identify, periodOf, Budgets, LoopGuard } from "../tokenwatch.ts";
import type { Running, Row, Budget, Identity, ChatRequest, ConfigFile, Ticket } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Flavor, Mock } from "./mocks.ts";

const PROMTOOL = "/usr/bin/promtool";
const NO_PROMTOOL = !existsSync(PROMTOOL) && !process.env.CI ? `promtool is not installed at ${PROMTOOL} (apt-get install prometheus; CI installs it)` : false;

const ADMIN = "tw-admin-0123456789abcdef";
const CI_KEY = "tw-ci-bot-9f8e7d6c5b4a3921";
const NIGHTLY_KEY = "tw-nightly-5a4b3c2d1e0f9988";

type Env = { tw: Running; mocks: Record<Flavor, Mock>; env: Record<string, string>; file: ConfigFile; db: string; close(): Promise<void> };

const MODELS = {
  openai: { "gpt-4o": PROVIDERS.openai.models["gpt-4o"], "gpt-4o-mini": PROVIDERS.openai.models["gpt-4o-mini"] },
  kimi: { "kimi-k2.5": PROVIDERS.kimi.models["kimi-k2.5"] },
  anthropic: { "claude-sonnet-5": PROVIDERS.anthropic.models["claude-sonnet-5"], "claude-haiku-4-5": PROVIDERS.anthropic.models["claude-haiku-4-5"] },
};

/** TokenWatch in front of the three mocks with this config (keys, budgets, loop_guard), on a database file that outlives it. */
async function setup(file: ConfigFile = {}, opts: { db?: string; now?: () => number; apiKey?: string } = {}): Promise<Env> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  const mocks = { openai, kimi, anthropic };
  const env: Record<string, string> = opts.apiKey ? { TOKENWATCH_API_KEY: opts.apiKey } : {};
  for (const [name, m] of Object.entries(mocks)) {
    env[`${name.toUpperCase()}_API_KEY`] = m.key;
    env[`${name.toUpperCase()}_BASE_URL`] = m.url;
  }
  const full = { max_wait_ms: 0, providers: Object.fromEntries(Object.entries(MODELS).map(([p, models]) => [p, { models }])), ...file };
  const db = opts.db ?? join(mkdtempSync(join(tmpdir(), "tw-accounts-")), "tw.db");
  const tw = await start({ config: buildConfig({ env, file: full }), env, db, now: opts.now });
  return { tw, mocks, env, file: full, db, close: async () => { await tw.close(1000); await Promise.all(Object.values(mocks).map((m) => m.close())); } };
}

const openai = (e: Env, apiKey = "unused", headers: Record<string, string> = {}) => new OpenAI({ baseURL: `${e.tw.url}/v1`, apiKey, maxRetries: 0, defaultHeaders: headers });
const anthropic = (e: Env, apiKey = "unused", headers: Record<string, string> = {}) => new Anthropic({ baseURL: e.tw.url, apiKey, maxRetries: 0, defaultHeaders: headers });
const rows = (e: Env): Row[] => { e.tw.store.flush(); return e.tw.store.recent(1000).reverse(); };
const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const hi = (text = "hi") => [{ role: "user" as const, content: text }];

async function stats(e: Env, key?: string): Promise<any> {
  const r = await fetch(`${e.tw.url}/stats`, { headers: key ? { authorization: `Bearer ${key}` } : {} });
  assert.equal(r.status, 200);
  return r.json();
}

// ============================================================================================
describe("accounts: who is asking (pure)", () => {
  const hub = (system: string, first: string, more: ChatRequest["messages"] = []): ChatRequest => ({ messages: [{ role: "system", content: system }, { role: "user", content: first }, ...more] });

  it("names the agent from the key first, then x-tokenwatch-agent, Claude Code's sub-agent id, the client's own name", () => {
    const h = { "x-tokenwatch-agent": "reviewer", "user-agent": "claude-cli/2.1.200 (external, cli)" };
    assert.equal(identify(h, {}, hub("s", "q"), "ci-bot").agent, "ci-bot", "a key's agent cannot be overridden by a header");
    assert.equal(identify(h, {}, hub("s", "q")).agent, "reviewer");
    assert.equal(identify({ "x-claude-code-agent-id": "a1b2", "user-agent": "claude-cli/2.1" }, {}, hub("s", "q")).agent, "claude-code/a1b2");
    assert.equal(identify({ "user-agent": "claude-cli/2.1.200 (external, cli)" }, {}, hub("s", "q")).agent, "claude-code");
    assert.equal(identify({ originator: "codex_cli_rs" }, {}, hub("s", "q")).agent, "codex");
    assert.equal(identify({ "user-agent": "OpenAI/JS 7.0" }, {}, hub("s", "q")).agent, null);
  });

  it("takes the session from headers, then prompt_cache_key, metadata.user_id, safety_identifier, user; else fingerprints the conversation", () => {
    const s = (h: Record<string, string>, b: Record<string, unknown>) => identify(h, b, hub("sys", "first"));
    assert.equal(s({ "x-tokenwatch-session": "mine", "x-claude-code-session-id": "cc" }, { prompt_cache_key: "k" }).session, "mine");
    assert.equal(s({ "x-claude-code-session-id": "cc-1" }, { prompt_cache_key: "k" }).session, "cc-1");
    assert.equal(s({}, { prompt_cache_key: "019a-codex", user: "u" }).session, "019a-codex");
    assert.equal(s({}, { metadata: { user_id: "user_abc_account_def_session_0e1d2c3b-aaaa-bbbb-cccc-0123456789ab" } }).session, "0e1d2c3b-aaaa-bbbb-cccc-0123456789ab");
    assert.equal(s({}, { metadata: { user_id: JSON.stringify({ device_id: "d", session_id: "s-42" }) } }).session, "s-42");
    assert.equal(s({}, { safety_identifier: "sid", user: "u" }).session, "sid");
    assert.equal(s({}, { user: "u-7" }).session, "u-7");
    const a = s({}, {}), b = identify({}, {}, hub("sys", "first", [{ role: "assistant", content: "x" }, { role: "user", content: "next turn" }]));
    assert.equal(a.named, false);
    assert.equal(a.session, b.session, "a later turn of the same conversation is the same session");
    assert.notEqual(a.session, identify({}, {}, hub("sys", "another first")).session);
    assert.match(s({ "x-tokenwatch-session": "x".repeat(500) }, {}).session, /^h:[0-9a-f]{16}$/, "an overlong id is stored as a short hash");
  });

  it("places a period in UTC days and months; a total never ends", () => {
    const t = Date.UTC(2026, 11, 31, 23, 59, 30);
    assert.deepEqual(periodOf("day", t), { start: Date.UTC(2026, 11, 31), end: Date.UTC(2027, 0, 1) });
    assert.deepEqual(periodOf("month", t), { start: Date.UTC(2026, 11, 1), end: Date.UTC(2027, 0, 1) });
    assert.deepEqual(periodOf("total", t), { start: 0, end: Infinity });
  });
});

describe("accounts: budgets and the loop guard (pure, injected clock)", () => {
  const who = (agent: string | null, session = "s1"): Identity => ({ agent, session, named: true });

  it("reserves an estimate, settles the real cost, refuses past the hard cap, and starts each period from the log", () => {
    const asked: string[] = [];
    const list: Budget[] = [{ name: "team", period: "day", soft: 0.5, hard: 1 }, { name: "each agent", per: "agent", period: "day", hard: 0.3 }];
    const b = new Budgets(list, (scope, since) => { asked.push(`${JSON.stringify(scope)}@${since}`); return scope.agent === "bot" ? 0.25 : scope.agent ? 0 : 0.2; });
    const admit = (w: Identity, estimate: number, at: number) => b.admit(w, estimate, at) as Ticket; // local budgets answer at once
    const t = Date.UTC(2026, 11, 1, 12);
    assert.equal(b.softCap(who("bot"), t), undefined);
    assert.deepEqual(asked, [`{}@${Date.UTC(2026, 11, 1)}`, `{"agent":"bot"}@${Date.UTC(2026, 11, 1)}`], "the log is read once per budget and subject");
    const ticket = admit(who("bot"), 0.04, t);
    assert.throws(() => admit(who("bot"), 0.02, t), (e: any) => e.status === 429 && e.code === "budget_exceeded" && e.headers["retry-after"] === "43200" && /each agent.*agent bot/.test(e.message));
    b.settle(ticket, 0.01); // the real cost was below the estimate: room again
    const again = admit(who("bot"), 0.02, t);
    b.settle(again, 0.02);
    b.settle(again, 5); // settling twice changes nothing
    assert.equal(admit(who("other"), 0.28, t).estimate, 0.28, "another agent has its own cap");
    assert.match(b.softCap(who(null), t) ?? "", /budget "team" is past its soft cap/, "0.2 + 0.03 + 0.28 in flight passes 0.5");
    assert.equal(asked.length, 3);
    admit(who("bot"), 0.01, t + 86_400_000); // the next day: read from the log again
    assert.equal(asked.length, 5);
  });

  it("shared through Redis: what was spent while Redis was away is added to Redis' spend on its return", async () => {
    const calls: { add: number; seed: number }[] = [];
    let up = true, redisSpent = 0.1;
    const b = new Budgets([{ name: "team", period: "day", hard: 1 }], () => 0);
    b.share({
      up: () => up,
      admit: async (spends, estimate) => { calls.push({ add: spends[0].add, seed: spends[0].seed }); redisSpent += spends[0].add; return { ok: redisSpent + estimate <= 1, over: 0, figures: [[redisSpent, 0]] }; },
      settle: async () => true,
    });
    const t = Date.UTC(2026, 11, 1, 12), who: Identity = { agent: null, session: "s", named: true };
    b.settle(await b.admit(who, 0.1, t), 0);            // through Redis: its spend, 0.1, becomes ours
    up = false;
    for (let i = 0; i < 8; i++) b.settle(b.admit(who, 0.1, t) as Ticket, 0.1); // Redis away: decided here, 0.8 spent
    up = true;
    await assert.rejects(async () => b.admit(who, 0.2, t), (e: any) => e.code === "budget_exceeded", "0.1 + 0.8 + 0.2 passes the cap of 1");
    assert.ok(Math.abs(calls[1].add - 0.8) < 1e-9, `the 0.8 spent alone went to Redis with the next admit: ${calls[1].add}`);
    assert.equal(calls.length, 2);
    const ticket = await b.admit(who, 0.05, t); // 0.95: fits, and nothing is added twice
    assert.equal(calls[2].add, 0);
    b.settle(ticket, 0.05);
  });

  it("the loop guard refuses the same body from one session past max_repeats in the window, and forgets it after", () => {
    const g = new LoopGuard({ max_repeats: 3, window_s: 60 });
    const turn: ChatRequest = { messages: [{ role: "user", content: "fix it" }, { role: "assistant", content: "trying" }, { role: "user", content: "again" }] };
    for (let i = 0; i < 3; i++) g.check(who("a"), turn, "same", 1000 + i * 1000);
    assert.throws(() => g.check(who("a"), turn, "same", 4000), (e: any) => e.status === 429 && e.code === "loop_detected" && e.headers["retry-after"] === "58");
    g.check(who("a", "s2"), turn, "same", 4000); // another session
    g.check(who("a"), turn, "different", 4500);  // a new body starts over
    for (let i = 0; i < 3; i++) g.check(who("a"), turn, "same", 70_000 + i);
    const first: ChatRequest = { messages: [{ role: "user", content: "hi" }] };
    for (let i = 0; i < 10; i++) g.check({ agent: null, session: "h:fp", named: false }, first, "hi", 100_000 + i); // no session named, first turn: sampling, not a loop
    new LoopGuard({ max_repeats: 0, window_s: 60 }).check(who("a"), turn, "x", 0); // 0: off
  });
});

// ============================================================================================
describe("accounts: attribution through HTTP", () => {
  it("logs each request's agent and session from per-agent keys and headers; /stats sums spend by agent; agent keys cannot read /stats", async () => {
    const e = await setup({ keys: { [CI_KEY]: "ci-bot", [NIGHTLY_KEY]: { agent: "nightly" } } }, { apiKey: ADMIN });
    try {
      await openai(e, CI_KEY).chat.completions.create({ model: "gpt-4o-mini", messages: hi() });
      await openai(e, CI_KEY, { "x-tokenwatch-agent": "impostor" }).chat.completions.create({ model: "gpt-4o", messages: hi("again"), user: "run-17" });
      await anthropic(e, NIGHTLY_KEY).messages.create({ model: "claude-haiku-4-5", max_tokens: 50, messages: hi(), metadata: { user_id: "user_x_account_y_session_11111111-2222-3333-4444-555555555555" } });
      await anthropic(e, ADMIN, { "x-tokenwatch-agent": "reviewer", "x-tokenwatch-session": "pr-42" }).messages.create({ model: "claude-sonnet-5", max_tokens: 50, messages: hi() });
      await openai(e, ADMIN).responses.create({ model: "gpt-4o-mini", input: "hi", prompt_cache_key: "codex-thread-9" });

      await assert.rejects(openai(e, "tw-wrong-key-000000000000").chat.completions.create({ model: "gpt-4o-mini", messages: hi() }), (err: any) => err.status === 401);
      const asAgent = await fetch(`${e.tw.url}/stats`, { headers: { authorization: `Bearer ${CI_KEY}` } });
      assert.equal(asAgent.status, 403);
      assert.match((await asAgent.json()).error.message, /agent "ci-bot".*TOKENWATCH_API_KEY/);
      assert.equal((await fetch(`${e.tw.url}/metrics`, { headers: { authorization: `Bearer ${NIGHTLY_KEY}` } })).status, 403);

      const logged = rows(e).filter((r) => r.status === 200).map((r) => [r.agent, r.session]);
      assert.deepEqual(logged.slice(0, 5), [
        ["ci-bot", logged[0][1]], ["ci-bot", "run-17"], ["nightly", "11111111-2222-3333-4444-555555555555"], ["reviewer", "pr-42"], [null, "codex-thread-9"],
      ]);
      assert.match(logged[0][1]!, /^h:/, "no session named: the conversation's fingerprint");

      const s = await stats(e, ADMIN);
      const byAgent = Object.fromEntries(s.agents.map((a: any) => [a.agent, a]));
      for (const [agent, n] of [["ci-bot", 2], ["nightly", 1], ["reviewer", 1], [null, 1]] as const) {
        const mine = rows(e).filter((r) => r.status === 200 && r.agent === agent);
        assert.equal(byAgent[String(agent)].requests, n, `${agent}: ${n} requests`);
        assert.ok(Math.abs(byAgent[String(agent)].cost_usd - sum(mine.map((r) => r.cost_usd))) < 1e-12, `${agent}'s spend is its rows' cost`);
      }
      assert.ok(s.sessions.some((x: any) => x.session === "pr-42" && x.agent === "reviewer" && x.requests === 1));
      const page = JSON.stringify(s) + (await (await fetch(`${e.tw.url}/`)).text());
      for (const k of [CI_KEY, NIGHTLY_KEY, ADMIN]) assert.ok(!page.includes(k), "no key in /stats or the page");
    } finally { await e.close(); }
  });

  it("migrates a database written before agents were logged: every old row kept, counted as unattributed", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-migrate-")), db = join(dir, "old.db");
    try {
      // the schema of version 1 (entry logged, no agent or session), with two rows
      execFileSync(process.execPath, ["-e", `
        const { DatabaseSync } = require("node:sqlite");
        const d = new DatabaseSync(${JSON.stringify(db)});
        d.exec("CREATE TABLE requests (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, provider TEXT, model TEXT, requested_model TEXT, complexity TEXT, status INTEGER NOT NULL, stream INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0, cache_write_tokens INTEGER NOT NULL DEFAULT 0, cost_usd REAL NOT NULL DEFAULT 0, latency_ms INTEGER, ttft_ms INTEGER, attempts INTEGER NOT NULL DEFAULT 0, failover TEXT, error TEXT, error_kind TEXT, entry TEXT NOT NULL DEFAULT 'chat')");
        const now = Date.now();
        d.exec("INSERT INTO requests (ts, provider, model, status, cost_usd) VALUES (" + (now - 1000) + ", 'openai', 'gpt-4o', 200, 0.5), (" + (now - 500) + ", 'kimi', 'kimi-k2.5', 200, 0.25)");
        d.exec("PRAGMA user_version = 1");
        d.close();`]);
      const e = await setup({}, { db });
      try {
        await openai(e, "unused", { "x-tokenwatch-agent": "new-agent" }).chat.completions.create({ model: "gpt-4o-mini", messages: hi() });
        const s = await stats(e);
        assert.equal(rows(e).length, 3);
        const unknown = s.agents.find((a: any) => a.agent === null);
        assert.deepEqual([unknown.requests, unknown.cost_usd], [2, 0.75], "the old rows, as unattributed spend");
        assert.equal(s.agents.find((a: any) => a.agent === "new-agent").requests, 1);
      } finally { await e.close(); }
    } finally { rmSync(dir, { recursive: true, force: true }); }
  });
});

// ============================================================================================
describe("accounts: budgets through HTTP", () => {
  it("a soft cap moves the agent's traffic to the cheap tier and says so; a hard cap refuses with 429, Retry-After to the period's end, in each client's shape", async () => {
    const e = await setup({ keys: { [CI_KEY]: { agent: "ci-bot", budget: { name: "ci daily", period: "day", soft: 0.00001, hard: 0.0004 } } } }, { apiKey: ADMIN });
    const ci = openai(e, CI_KEY);
    try {
      // within the soft cap: the capable model it names
      const first = await ci.chat.completions.create({ model: "claude-sonnet-5", messages: hi(), max_tokens: 20 }).withResponse();
      assert.equal(first.response.headers.get("x-tokenwatch-model"), "claude-sonnet-5");
      assert.equal(first.response.headers.get("x-tokenwatch-budget"), null);
      // past it: the cheap tier, whatever it names, and the reason says which budget
      const next = await ci.chat.completions.create({ model: "claude-sonnet-5", messages: hi(), max_tokens: 20 }).withResponse();
      assert.equal(next.response.headers.get("x-tokenwatch-complexity"), "simple");
      assert.equal(next.response.headers.get("x-tokenwatch-model"), "gpt-4o-mini", "the cheapest model");
      assert.match(next.response.headers.get("x-tokenwatch-budget") ?? "", /budget "ci daily" \(ci-bot\) is past its soft cap/);
      assert.match((next.data as any).routing.reason, /soft cap/);
      // other agents are not covered by this budget
      const admin = await openai(e, ADMIN).chat.completions.create({ model: "claude-sonnet-5", messages: hi(), max_tokens: 20 }).withResponse();
      assert.equal(admin.response.headers.get("x-tokenwatch-model"), "claude-sonnet-5");

      // the hard cap: a request whose estimate would pass it is refused before any upstream is called
      const served = e.mocks.anthropic.requests.length + e.mocks.openai.requests.length;
      const big = "x".repeat(8000); // ~2,000 tokens of prompt: more than the cap leaves, even at the cheap tier's price
      await assert.rejects(ci.chat.completions.create({ model: "gpt-4o-mini", messages: hi(big), max_tokens: 500 }), (err: any) => {
        const endOfDay = periodOf("day", Date.now()).end, retry = Number(err.headers.get("retry-after"));
        assert.equal(err.status, 429);
        assert.equal(err.code, "budget_exceeded");
        assert.ok(Math.abs(retry - (endOfDay - Date.now()) / 1000) < 5, `retry-after ${retry} s: the end of the UTC day`);
        assert.match(err.message, /Budget "ci daily" for agent ci-bot is spent.*raise "hard"/);
        return true;
      });
      await assert.rejects(anthropic(e, CI_KEY).messages.create({ model: "claude-haiku-4-5", max_tokens: 500, messages: hi(big) }), (err: any) => {
        assert.equal(err.status, 429);
        assert.equal(err.error?.error?.type, "rate_limit_error", "Anthropic's own error shape");
        assert.match(err.error?.error?.message, /budget/i);
        return true;
      });
      assert.equal(e.mocks.anthropic.requests.length + e.mocks.openai.requests.length, served, "no upstream was called");
      const refused = rows(e).filter((r) => r.status === 429);
      assert.deepEqual(refused.map((r) => [r.error_kind, r.agent]), [["budget", "ci-bot"], ["budget", "ci-bot"]]);

      const b = (await stats(e, ADMIN)).budgets.find((x: any) => x.name === "ci daily");
      const spent = sum(rows(e).filter((r) => r.agent === "ci-bot").map((r) => r.cost_usd));
      assert.deepEqual([b.scope, b.period, b.soft, b.hard, b.spends[0].subject], ["agent ci-bot", "day", 0.00001, 0.0004, "ci-bot"]);
      assert.ok(Math.abs(b.spends[0].spent_usd - spent) < 1e-12, "the budget's spend is the agent's rows' cost");
      assert.ok(b.spends[0].projected_usd >= spent, "projected to the end of the day");
    } finally { await e.close(); }
  });

  it("pays for no second opinion on a request that a spent hard cap will refuse", async () => {
    const e = await setup({ classifier: "model", keys: { [CI_KEY]: { agent: "ci-bot", budget: { name: "ci", period: "day", hard: 0.001 } } } }, { apiKey: ADMIN });
    const ci = openai(e, CI_KEY);
    try {
      // admitted on its estimate, it answers at length and spends past the cap ($0.03 of output against $0.001)
      e.mocks.anthropic.queue({ type: "reply", text: "a long answer", usage: { input: 10, output: 2000 } });
      await ci.chat.completions.create({ model: "claude-sonnet-5", messages: hi(), max_tokens: 20 });
      const unsure = "speed up the dashboard for users with many projects"; // one the classifier asks about (test/routing.test.ts)
      const before = e.mocks.openai.requests.length;
      await assert.rejects(ci.chat.completions.create({ model: "auto", messages: hi(unsure) }), (err: any) => err.status === 429 && err.code === "budget_exceeded");
      assert.equal(e.mocks.openai.requests.length, before, "no verdict was asked of the cheapest model");
      assert.equal(rows(e).at(-1)!.cost_usd, 0, "and none is on the refused request's row");
    } finally { await e.close(); }
  });

  it("keeps counting after a restart: the spend is the log's", async () => {
    // each request costs about $0.0000525 and is estimated at about $0.00008: three fit under $0.0002, a fourth does not
    const file = { budgets: [{ name: "all", period: "month" as const, hard: 0.0002 }] };
    const e = await setup(file);
    let db: string;
    try {
      db = e.db;
      for (let i = 0; i < 3; i++) await openai(e).chat.completions.create({ model: "gpt-4o", messages: hi(), max_tokens: 3 });
    } finally { await e.close(); }
    const again = await setup(file, { db });
    try {
      const before = (await stats(again)).budgets[0].spends[0].spent_usd;
      const logged = sum(rows(again).map((r) => r.cost_usd));
      assert.equal(rows(again).length, 3);
      assert.ok(logged > 0.00014 && Math.abs(before - logged) < 1e-12, `the three earlier requests' spend (${before}) is known at once`);
      await assert.rejects(openai(again).chat.completions.create({ model: "gpt-4o", messages: hi(), max_tokens: 3 }), (err: any) => err.status === 429 && err.code === "budget_exceeded");
    } finally { await again.close(); }
  });

  it("200 requests at once at the edge of a hard cap: the spend never passes the cap, and the cap is used", async () => {
    // every answer costs the same: 10 input and 20 output tokens of gpt-4o-mini = $0.0000135
    const each = (10 * 0.15 + 20 * 0.6) / 1e6, cap = 100 * each;
    const e = await setup({ providers: { openai: { models: { "gpt-4o-mini": MODELS.openai["gpt-4o-mini"] } }, kimi: { models: {} }, anthropic: { models: {} } }, budgets: [{ name: "edge", period: "day", hard: cap }] });
    e.mocks.openai.setDefault({ type: "reply", text: "twenty words ".repeat(10).trim(), usage: { input: 10, output: 20 }, delayMs: 20 });
    try {
      const client = openai(e);
      const results = await Promise.allSettled(Array.from({ length: 200 }, () => client.chat.completions.create({ model: "gpt-4o-mini", messages: hi("How many legs does a spider have?"), max_tokens: 20 })));
      const ok = results.filter((r) => r.status === "fulfilled").length;
      const refused = results.filter((r) => r.status === "rejected" && (r.reason as any).code === "budget_exceeded").length;
      assert.equal(ok + refused, 200, "each request either answered or was refused by the budget");
      const spent = sum(rows(e).map((r) => r.cost_usd));
      assert.ok(spent <= cap + 1e-12, `spent ${spent} of a ${cap} cap`);
      assert.ok(ok >= 85, `${ok} answered: the estimates are close to the real cost, so the cap is used (at most 100 fit)`);
    } finally { await e.close(); }
  });
});

// ============================================================================================
describe("accounts: the loop guard through HTTP", () => {
  it("refuses the ninth identical request of a session within a minute, passes ordinary retries and a growing conversation, and forgets after the window", async () => {
    let clock = Date.now();
    const e = await setup({}, { now: () => clock });
    const session = { "x-tokenwatch-session": "agent-run-1" };
    const turn = [{ role: "user" as const, content: "run the tests" }, { role: "assistant" as const, content: "3 failed" }, { role: "user" as const, content: "fix them" }];
    try {
      const client = openai(e, "unused", session);
      for (let i = 0; i < 8; i++) { clock += 1000; await client.chat.completions.create({ model: "gpt-4o-mini", messages: turn }); }
      clock += 1000;
      await assert.rejects(client.chat.completions.create({ model: "gpt-4o-mini", messages: turn }), (err: any) => {
        assert.equal(err.status, 429);
        assert.equal(err.code, "loop_detected");
        assert.match(err.message, /same request 9 times in 60 s.*loop_guard/);
        assert.ok(Number(err.headers.get("retry-after")) >= 1);
        return true;
      });
      assert.equal(rows(e).at(-1)!.error_kind, "loop_guard");

      // the SDK's own retries of a failing request: the same body three times, then an answer
      e.mocks.openai.queue({ type: "error", status: 503 }, { type: "error", status: 503 });
      const retrying = new OpenAI({ baseURL: `${e.tw.url}/v1`, apiKey: "unused", maxRetries: 2, defaultHeaders: { "x-tokenwatch-session": "agent-run-2" } });
      await retrying.chat.completions.create({ model: "gpt-4o-mini", messages: turn });

      // a conversation that grows every turn is never a loop
      const grow = [...turn];
      for (let i = 0; i < 20; i++) { grow.push({ role: "assistant", content: `step ${i}` }, { role: "user", content: "next" }); await client.chat.completions.create({ model: "gpt-4o-mini", messages: grow }); }

      clock += 61_000; // the window has passed
      await client.chat.completions.create({ model: "gpt-4o-mini", messages: turn });
    } finally { await e.close(); }
  });
});

// ============================================================================================
describe("accounts: /metrics", { skip: NO_PROMTOOL }, () => {
  before(() => { if (!existsSync(PROMTOOL)) throw new Error(`Cannot check /metrics: ${PROMTOOL} is missing. Install it with "apt-get install prometheus" (.ci/run does).`); });

  it("is valid for promtool after traffic through every provider and format, and agrees with /stats", async () => {
    const e = await setup({ keys: { [CI_KEY]: "ci-bot" }, budgets: [{ name: "team", period: "month", soft: 10, hard: 20 }, { per: "session", period: "day", hard: 1 }] }, { apiKey: ADMIN });
    try {
      const admin = openai(e, ADMIN);
      await openai(e, CI_KEY).chat.completions.create({ model: "gpt-4o", messages: hi() });
      await admin.chat.completions.create({ model: "kimi-k2.5", messages: hi(), stream: true, stream_options: { include_usage: true } }).then(async (s) => { for await (const _ of s); });
      await anthropic(e, ADMIN).messages.create({ model: "claude-sonnet-5", max_tokens: 30, messages: hi() });
      await admin.responses.create({ model: "gpt-4o-mini", input: "hi" });
      await assert.rejects(admin.chat.completions.create({ model: "no-such-model", messages: hi() }));

      const res = await fetch(`${e.tw.url}/metrics`, { headers: { authorization: `Bearer ${ADMIN}` } });
      assert.equal(res.status, 200);
      assert.match(res.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
      const text = await res.text();
      const check = spawnSync(PROMTOOL, ["check", "metrics"], { input: text, encoding: "utf8" });
      assert.equal(check.status, 0, `promtool: ${check.stdout}${check.stderr}`);
      assert.equal((check.stdout + check.stderr).trim(), "", "no lint problems either");

      const samples = (name: string) => text.split("\n").filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `)).map((l) => ({ labels: l.slice(name.length, l.lastIndexOf(" ")), value: Number(l.slice(l.lastIndexOf(" ") + 1)) }));
      const s = await stats(e, ADMIN);
      assert.equal(sum(samples("tokenwatch_requests_total").map((x) => x.value)), s.totals.requests, "requests: /metrics = /stats");
      assert.equal(sum(samples("tokenwatch_errors_total").map((x) => x.value)), s.totals.errors);
      assert.ok(Math.abs(sum(samples("tokenwatch_cost_usd_total").map((x) => x.value)) - s.totals.cost_usd) < 1e-9, "cost: /metrics = /stats");
      const tokens = (kind: string) => sum(samples("tokenwatch_tokens_total").filter((x) => x.labels.includes(`kind="${kind}"`)).map((x) => x.value));
      assert.equal(tokens("output"), s.totals.output_tokens);
      assert.equal(tokens("input") + tokens("cache_read") + tokens("cache_write"), s.totals.input_tokens);
      for (const p of ["openai", "kimi", "anthropic"]) assert.ok(samples("tokenwatch_requests_total").some((x) => x.labels.includes(`provider="${p}"`)), `${p} has its series`);
      assert.ok(samples("tokenwatch_requests_total").some((x) => x.labels.includes('provider="none"') && x.labels.includes('status="404"')));
      assert.equal(samples("tokenwatch_agent_requests_total").find((x) => x.labels === '{agent="ci-bot"}')?.value, 1);
      assert.ok(samples("tokenwatch_request_duration_seconds_count").length >= 4);
      assert.equal(samples("tokenwatch_time_to_first_token_seconds_count").length, 1, "one streamed request");
      const used = samples("tokenwatch_ratelimit_used").find((x) => x.labels === '{provider="openai",model="gpt-4o",dimension="rpm"}');
      const gpt4o = s.models.find((m: any) => m.model === "gpt-4o").dimensions.find((d: any) => d.dimension === "rpm");
      assert.equal(used?.value, gpt4o.used, "a limit dimension's use: /metrics = /stats");
      assert.deepEqual(samples("tokenwatch_budget_cap_usd").map((x) => [x.labels, x.value]), [['{budget="team",level="soft"}', 10], ['{budget="team",level="hard"}', 20], ['{budget="each session per day",level="hard"}', 1]]);
      assert.ok(!/session="|agent-run|h:[0-9a-f]/.test(text), "no session id as a label");
      assert.ok(!text.includes(CI_KEY) && !text.includes(ADMIN));
    } finally { await e.close(); }
  });
});
