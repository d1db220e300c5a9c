// The dashboard (section 9) in a real browser: Debian's headless Chromium, driven by playwright-core, loads GET /
// while traffic goes through TokenWatch to the mock providers of test/mocks.ts.
//
// Without /usr/bin/chromium these tests are skipped, except under CI (`CI` set), where that is a failure: .ci/run
// installs it. The last test renders the page with a day of realistic traffic and takes the README's screenshot; it
// writes the PNG only when asked, so a CI run leaves the tree as it found it:
//
//   TOKENWATCH_SCREENSHOT=docs/dashboard.png node --test test/browser.test.ts

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import type { Browser, BrowserContext, BrowserContextOptions, Page } from "playwright-core";
import { buildConfig, start } from "../tokenwatch.ts";
import type { Running, ConfigFile } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Flavor, Mock, Script } from "./mocks.ts";

const CHROMIUM = "/usr/bin/chromium";
const ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const SKIP = !existsSync(CHROMIUM) && !process.env.CI ? `Chromium is not installed at ${CHROMIUM} (apt-get install chromium; CI installs it)` : false;
const WAIT = { timeout: 10_000 };

// Injected markup: it must reach the page as text. Run as markup, it would set window.__pwned.
const EVIL_MODEL = "<img/src=x/onerror=window.__pwned=1>"; // model names take no spaces: "/" separates the attributes
const EVIL_ERROR = "<img src=y onerror=window.__pwned=2> is not a valid stop sequence";

type Mocks = Record<Flavor, Mock>;

async function startMocks(): Promise<Mocks> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  return { openai, kimi, anthropic };
}

/** TokenWatch on a fresh in-memory store, routing to the mocks. */
async function startTw(mocks: Mocks, env: Record<string, string> = {}, now?: () => number, file?: ConfigFile): Promise<Running> {
  const all: Record<string, string> = {
    OPENAI_API_KEY: mocks.openai.key, OPENAI_BASE_URL: mocks.openai.url, KIMI_API_KEY: mocks.kimi.key, KIMI_BASE_URL: mocks.kimi.url,
    ANTHROPIC_API_KEY: mocks.anthropic.key, ANTHROPIC_BASE_URL: mocks.anthropic.url, ...env,
  };
  return start({ config: buildConfig({ env: all, file }), env: all, db: ":memory:", now });
}

/** One chat completion through TokenWatch, read to the end (a stream too); resolves to the status. */
async function chat(tw: Running, body: Record<string, unknown>, key?: string, headers: Record<string, string> = {}): Promise<number> {
  const stream = body.stream ? { stream_options: { include_usage: true } } : {};
  const res = await fetch(`${tw.url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}), ...headers },
    body: JSON.stringify({ messages: [{ role: "user", content: "Summarize the release notes in three bullet points." }], ...stream, ...body }),
  });
  await res.text();
  while (tw.router.inflight > 0) await new Promise(setImmediate); // the row is complete (latency too) once the handler returns
  return res.status;
}

const stats = async (tw: Running) => (await fetch(`${tw.url}/stats`)).json();

// ============================================================================================
describe("9. Dashboard in a real browser", { skip: SKIP }, () => {
  let browser: Browser, mocks: Mocks, live: Running, page: Page;
  const requested: string[] = [];
  const problems: string[] = [];
  const opened: Running[] = [];

  /** A page in a new context that records every request and every console error or uncaught exception. */
  async function open(url: string, opts: BrowserContextOptions = {}): Promise<{ context: BrowserContext; page: Page }> {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 }, ...opts });
    ctx.on("request", (r) => requested.push(r.url()));
    const p = await ctx.newPage();
    p.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") problems.push(`${url}: console.${m.type()}: ${m.text()}`); });
    p.on("pageerror", (e) => problems.push(`${url}: uncaught: ${e.message}`));
    return { context: ctx, page: p };
  }

  before(async () => {
    if (!existsSync(CHROMIUM)) throw new Error(`Cannot run the dashboard's browser test: ${CHROMIUM} is missing. Install it with "apt-get install chromium" (.ci/run does).`);
    [browser, mocks] = await Promise.all([chromium.launch({ executablePath: CHROMIUM, args: ARGS }), startMocks()]);
    live = await startTw(mocks);
    opened.push(live);
    ({ page } = await open(live.url));
    await page.clock.install(); // the page's 3-second refresh runs when the test says so, not after a sleep
    await page.goto(`${live.url}/`);
  });

  after(async () => {
    await browser?.close();
    await Promise.all(opened.map((tw) => tw.close(1000)));
    if (mocks) await Promise.all(Object.values(mocks).map((m) => m.close()));
  });

  it("shows a first-time user how to send a first request", async () => {
    await page.locator("#empty-state").waitFor(WAIT);
    const curl = await page.locator("#empty-curl").textContent();
    assert.match(curl ?? "", new RegExp(`^curl ${live.url}/v1/chat/completions`));
    assert.equal(await page.locator("#total-requests").getAttribute("data-value"), "0");
    assert.ok(await page.locator("#busy").isHidden());
  });

  it("follows traffic without a reload: requests, errors, failovers, tokens and cost", async () => {
    await page.evaluate(() => { (window as { __sameDocument?: boolean }).__sameDocument = true; });
    const { openai } = mocks;
    assert.equal(await chat(live, { model: "openai/gpt-4o-mini" }), 200);
    assert.equal(await chat(live, { model: "kimi-k2.5", stream: true }), 200);
    assert.equal(await chat(live, { model: "claude-haiku-4-5" }), 200);
    assert.equal(await chat(live, { model: "claude-sonnet-5", stream: true }), 200);
    assert.equal(await chat(live, { model: `openai/${EVIL_MODEL}` }), 200);
    openai.queue({ type: "error", status: 400, body: { error: { message: EVIL_ERROR, type: "invalid_request_error", param: "stop", code: null } } });
    assert.equal(await chat(live, { model: "openai/gpt-4o" }), 400);
    openai.queue({ type: "error", status: 429, headers: { "retry-after": "1" } });
    assert.equal(await chat(live, { model: "gpt-4o-mini" }), 200); // fails over to the next simple model

    await page.clock.runFor(3000);
    await page.locator('#total-requests[data-value="7"]').waitFor(WAIT);
    const s = await stats(live);
    assert.equal(s.totals.requests, 7);
    assert.ok(s.totals.cost_usd > 0);
    assert.equal(Number(await page.locator("#total-cost").getAttribute("data-value")), s.totals.cost_usd);
    assert.equal(Number(await page.locator("#total-output").getAttribute("data-value")), s.totals.output_tokens);
    assert.equal(await page.locator("#total-errors").getAttribute("data-value"), "1");
    assert.equal(Number(await page.locator("#failovers").getAttribute("data-value")), s.routing.failovers);
    assert.ok(s.routing.failovers >= 1);
    assert.ok(await page.locator("#empty-state").count() === 0 && await page.locator("#busy").isVisible());
    assert.equal(await page.locator("#recent tr").count(), 7);
    assert.equal(await page.locator('#models tr[data-model="anthropic/claude-sonnet-5"] td').nth(2).textContent(), "1");
    assert.equal(await page.evaluate(() => (window as { __sameDocument?: boolean }).__sameDocument), true, "the page was reloaded");

    assert.equal(await chat(live, { model: "claude-haiku-4-5", stream: true }), 200);
    await page.clock.runFor(3000);
    await page.locator('#total-requests[data-value="8"]').waitFor(WAIT);
    assert.match(await page.locator("#sum-minute").textContent() ?? "", /^8 req/);
    assert.match(await page.locator("#sum-hour").textContent() ?? "", /^8 req/);

    // a Claude Code-style request: the page tells the client formats apart
    const messages = await fetch(`${live.url}/v1/messages`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "claude-haiku-4-5", max_tokens: 50, messages: [{ role: "user", content: "hi" }] }) });
    assert.equal(messages.status, 200);
    await messages.text();
    while (live.router.inflight > 0) await new Promise(setImmediate);
    await page.clock.runFor(3000);
    await page.locator('#total-requests[data-value="9"]').waitFor(WAIT);
    assert.match(await page.locator("#entries").textContent() ?? "", /Chat Completions.*8.*Anthropic Messages.*1|Anthropic Messages.*1.*Chat Completions.*8/s);
    assert.equal(await page.locator("#recent tr").first().locator(".tag", { hasText: "messages" }).count(), 1);
  });

  it("keeps markup in a model name and an upstream error message as text", async () => {
    assert.ok(await page.getByText(EVIL_MODEL).count() >= 2, "the model name is shown (models table, recent requests)");
    assert.ok(await page.getByText(EVIL_ERROR).count() >= 1, "the error message is shown");
    assert.equal(await page.locator("main img, main [onerror]").count(), 0);
    assert.equal(await page.evaluate(() => (window as { __pwned?: number }).__pwned), undefined);
  });

  it("switches the per-model window without reloading", async () => {
    const asked = page.waitForRequest((r) => r.url().endsWith("/stats?window=1h"), WAIT);
    await page.locator('#window button[data-window="1h"]').click();
    await asked;
    await page.locator('#window button[data-window="1h"][aria-pressed="true"]').waitFor(WAIT);
    assert.equal(await page.locator(".win-label").first().textContent(), "last hour");
    assert.match(page.url(), /\?window=1h$/);
    await page.locator('#window button[data-window="all"]').click();
    await page.waitForFunction(() => document.querySelector(".win-label")?.textContent === "all time", null, WAIT);
    assert.equal(await page.evaluate(() => (window as { __sameDocument?: boolean }).__sameDocument), true);
  });

  it("renders in dark mode, with dark colours and the same numbers", async () => {
    const dark = await open(live.url, { colorScheme: "dark" });
    await dark.page.goto(`${live.url}/`);
    await dark.page.locator('#total-requests[data-value="9"]').waitFor(WAIT);
    const bg = await dark.page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    const [r, g, b] = (bg.match(/\d+/g) ?? []).map(Number);
    assert.ok(r + g + b < 3 * 60, `dark background, got ${bg}`);
    await dark.context.close();
  });

  it("reads on a phone: one column, nothing wider than the screen", async () => {
    const phone = await open(live.url, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
    await phone.page.goto(`${live.url}/`);
    await phone.page.locator('#total-requests[data-value="9"]').waitFor(WAIT);
    await phone.page.locator("#chart-hour svg").waitFor(WAIT);
    const width = await phone.page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 390, `page is ${width}px wide on a 390px screen`);
    await phone.context.close();
  });

  it("says when a provider asked for a longer rest than max_cooldown_ms, and when the database file was deleted", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tw-browser-"));
    const db = join(dir, "tw.db");
    const all: Record<string, string> = { OPENAI_API_KEY: mocks.openai.key, OPENAI_BASE_URL: mocks.openai.url, KIMI_API_KEY: mocks.kimi.key, KIMI_BASE_URL: mocks.kimi.url };
    const tw = await start({ config: buildConfig({ env: all }), env: all, db });
    opened.push(tw);
    const { context, page: p } = await open(tw.url);
    try {
      mocks.openai.queue({ type: "error", status: 429, headers: { "retry-after": "999999" } });
      assert.equal(await chat(tw, { model: "gpt-4o-mini" }), 200); // fails over to kimi
      for (const f of [db, `${db}-wal`, `${db}-shm`]) rmSync(f, { force: true });
      await p.goto(`${tw.url}/`);
      const note = p.locator('[data-model="openai/gpt-4o-mini"] .capped');
      await note.waitFor(WAIT);
      assert.match(await note.textContent() ?? "", /provider asked .+; capped at max_cooldown_ms/);
      await p.locator("#store-banner").waitFor(WAIT);
      assert.match(await p.locator("#store-banner").textContent() ?? "", /was deleted .* rewrote it/);
    } finally { await context.close(); rmSync(dir, { recursive: true, force: true }); }
  });

  it("shows each limit of a model, the one that binds highlighted with when it frees, and a learned limit beside the table's", async () => {
    const [openai, anthropic] = await Promise.all([startMock("openai"), startMock("anthropic")]);
    const all: Record<string, string> = { OPENAI_API_KEY: openai.key, OPENAI_BASE_URL: openai.url, ANTHROPIC_API_KEY: anthropic.key, ANTHROPIC_BASE_URL: anthropic.url };
    const tw = await start({ config: buildConfig({ env: all }), env: all, db: ":memory:" });
    opened.push(tw);
    const { context, page: p } = await open(tw.url);
    try {
      openai.rateLimits({ limits: { requests: 500, tokens: 30_000 }, others: { tokens: 27_000 } }); // another client fills gpt-4o's minute
      anthropic.rateLimits({ limits: { requests: 1000, input_tokens: 450_000, output_tokens: 90_000 } }); // a Tier 2 account
      assert.equal(await chat(tw, { model: "gpt-4o" }), 200);
      assert.equal(await chat(tw, { model: "claude-sonnet-5", max_tokens: 100 }), 200);
      await p.goto(`${tw.url}/`);
      const gpt = p.locator('.hr-row[data-model="openai/gpt-4o"]');
      await gpt.locator('.meter[data-kind="tpm"].binding').waitFor(WAIT);
      assert.equal(await gpt.getAttribute("data-saturated"), "true");
      assert.match(await gpt.locator('.meter[data-kind="tpm"] .free-in').textContent() ?? "", /frees in (\d+ ?s|1m 00s)/);
      assert.equal(await gpt.locator(".meter.binding").count(), 1, "one limit binds");
      assert.deepEqual(await gpt.locator(".meter").evaluateAll((ms) => ms.map((m) => m.getAttribute("data-kind"))), ["rpm", "tpm"]);
      const sonnet = p.locator('.hr-row[data-model="anthropic/claude-sonnet-5"]');
      assert.deepEqual(await sonnet.locator(".meter").evaluateAll((ms) => ms.map((m) => m.getAttribute("data-kind"))), ["rpm", "tpm", "itpm", "otpm"]);
      assert.match(await sonnet.locator('.meter[data-kind="itpm"] .m-val').textContent() ?? "", /\/ 450k$/);
      assert.equal(await sonnet.locator('.meter[data-kind="itpm"] .learned').textContent(), "table says 30k");
      assert.equal(await gpt.locator(".learned").count(), 0, "limits as the table says them: nothing more to show");
      assert.equal(await sonnet.getAttribute("data-saturated"), "false");
    } finally { await context.close(); await Promise.all([openai.close(), anthropic.close()]); }
  });

  it("asks for the API key when TOKENWATCH_API_KEY is set, and shows the numbers once it is given", async () => {
    const KEY = "tw-browser-test-key";
    const locked = await startTw(mocks, { TOKENWATCH_API_KEY: KEY });
    opened.push(locked);
    assert.equal(await chat(locked, { model: "openai/gpt-4o-mini" }, KEY), 200);
    const before = problems.length;
    const { page: p, context: c } = await open(locked.url);
    await p.goto(`${locked.url}/`);
    await p.locator("#auth").waitFor(WAIT);
    assert.ok(await p.locator("#kpis").isHidden(), "no numbers before the key");
    await p.locator("#auth-key").fill("not-the-key");
    await p.locator("#auth button[type=submit]").click();
    await p.getByText("That key was not accepted").waitFor(WAIT);
    await p.locator("#auth-key").fill(KEY);
    await p.locator("#auth button[type=submit]").click();
    await p.locator('#total-requests[data-value="1"]').waitFor(WAIT);
    assert.ok(await p.locator("#auth").isHidden());
    // Chromium logs every 401 answer as "Failed to load resource"; those are the key being asked for, nothing else may appear
    const rest = problems.splice(before).filter((x) => !/Failed to load resource: the server responded with a status of 401/.test(x));
    problems.push(...rest);
    await c.close();
  });

  it("shows each budget's spend against its caps with a projection, spend by agent and the top sessions, filtered, and never a key", async () => {
    const KEY = "tw-admin-browser-000000000000", CI = "tw-ci-browser-0000000000000000";
    const tw = await startTw(mocks, { TOKENWATCH_API_KEY: KEY }, undefined, {
      keys: { [CI]: { agent: "ci-bot", budget: { name: "ci daily", period: "day", soft: 0.000001, hard: 1 } } },
      budgets: [{ name: "team", period: "month", soft: 50, hard: 100 }],
    });
    opened.push(tw);
    const send = (key: string, headers: Record<string, string>) => fetch(`${tw.url}/v1/chat/completions`, {
      method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${key}`, ...headers },
      body: JSON.stringify({ model: "claude-sonnet-5", messages: [{ role: "user", content: "Plan the migration." }] }),
    }).then((r) => r.text());
    await send(CI, { "x-tokenwatch-session": "ci-run-1" });
    await send(CI, { "x-tokenwatch-session": "ci-run-1" }); // past its soft cap: the cheap tier
    await send(KEY, { "x-tokenwatch-agent": "reviewer", "x-tokenwatch-session": "pr-42" });
    while (tw.router.inflight > 0) await new Promise(setImmediate);
    const s = await (await fetch(`${tw.url}/stats`, { headers: { authorization: `Bearer ${KEY}` } })).json();

    const { context, page: p } = await open(tw.url);
    await context.addInitScript((k) => sessionStorage.setItem("tokenwatch_api_key", k), KEY);
    await p.goto(`${tw.url}/`);
    const ci = p.locator('#budget-body [data-budget="ci daily"] .brow[data-subject="ci-bot"]');
    await ci.waitFor(WAIT);
    const spent = s.budgets.find((b: { name: string }) => b.name === "ci daily").spends[0];
    assert.equal(Number(await ci.getAttribute("data-spent")), spent.spent_usd);
    assert.equal(await ci.locator(".state").textContent(), "Cheap tier");
    assert.match(await ci.locator(".spent").textContent() ?? "", /of \$1\.00.*projected .* by the end of the day.*resets in/);
    assert.equal(await p.locator('#budget-body [data-budget="team"] .brow[data-subject=""] .state').textContent(), "OK");
    assert.equal(await p.locator("#agents tr").count(), 2);
    assert.equal(await p.locator('#agents tr[data-agent="ci-bot"] td').nth(1).textContent(), "2");
    assert.equal(await p.locator('#sessions tr[data-session="pr-42"] td').nth(1).textContent(), "reviewer");
    await p.locator("#agent-filter").fill("review");
    assert.equal(await p.locator("#agents tr").count(), 1);
    assert.equal(await p.locator("#sessions tr").count(), 1);
    assert.equal(await p.locator("#sessions tr").getAttribute("data-session"), "pr-42");
    const html = await p.content();
    assert.ok(!html.includes(CI) && !html.includes(KEY), "no key on the page");
    await context.close();
  });

  it("says when limits are shared through Redis, and how many instances are live", async () => {
    if (!existsSync("/usr/bin/redis-server")) throw new Error("Cannot check the shared-limits tag: /usr/bin/redis-server is missing. Install it with \"apt-get install redis-server\" (.ci/run does).");
    const port = await new Promise<number>((done) => { const s = createServer().listen(0, "127.0.0.1", () => { const p = (s.address() as { port: number }).port; s.close(() => done(p)); }); });
    const server = spawn("/usr/bin/redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    for await (const c of server.stdout!) { out += c; if (out.includes("Ready to accept connections")) break; }
    try {
      const tw = await startTw(mocks, { TOKENWATCH_REDIS_URL: `redis://127.0.0.1:${port}` });
      opened.push(tw);
      const { context, page: p } = await open(tw.url);
      await p.goto(`${tw.url}/`);
      await p.locator('#shared[data-mode="redis"]').waitFor(WAIT);
      assert.match(await p.locator("#shared").textContent() ?? "", /Shared through Redis · 1 instance live/);
      await context.close();
    } finally { server.kill("SIGKILL"); }
  });

  it("made no request to any other host, and logged no console error or exception", () => {
    assert.ok(requested.length > 5);
    const origins = new Set(opened.map((tw) => tw.url));
    const foreign = requested.filter((u) => !u.startsWith("data:") && !origins.has(new URL(u).origin));
    assert.deepEqual(foreign, []);
    assert.deepEqual(problems, []);
  });

  it("renders a day of real-looking traffic for the README screenshot", async () => {
    const clock = fastClock(Date.now() - 24 * 3_600_000);
    const demo = await startTw(mocks, {}, clock.now, { budgets: [{ name: "team", period: "month", soft: 40, hard: 60 }, { per: "agent", period: "day", hard: 5 }] });
    opened.push(demo);
    await playDay(demo, mocks, clock);
    const shot = await open(demo.url, { viewport: { width: 1280, height: 900 }, colorScheme: "light" });
    await shot.page.goto(`${demo.url}/`);
    const total = (await stats(demo)).totals.requests;
    await shot.page.locator(`#total-requests[data-value="${total}"]`).waitFor(WAIT);
    await shot.page.locator("#chart-hour svg rect.b-in").first().waitFor(WAIT);
    assert.ok(total > 100, `${total} requests`);
    assert.ok(await shot.page.locator("#errors tr[data-kind]").count() >= 2);
    const png = await shot.page.screenshot({ fullPage: true, animations: "disabled" });
    assert.equal(png.subarray(1, 4).toString(), "PNG");
    const out = process.env.TOKENWATCH_SCREENSHOT;
    if (out) { mkdirSync(dirname(resolve(out)), { recursive: true }); writeFileSync(out, png); }
    assert.equal(await shot.page.locator("#recent tr").count(), 15);
    await shot.page.locator("#recent-more").click();
    assert.equal(await shot.page.locator("#recent tr").count(), 50);
    await shot.context.close();
    assert.deepEqual(problems, []);
  });
});

// ---- the screenshot's day of traffic ----

/** A server clock that starts in the past and runs 80 times fast, so a day of traffic with realistic latencies takes seconds. */
function fastClock(startAt: number) {
  let base = startAt, real = Date.now(), speed = SPEED;
  const now = () => base + (Date.now() - real) * speed;
  return {
    now,
    /** Jump ahead to `at` (never back: the limiter's windows only move forward); speed 1 is real time. */
    jump(at: number, newSpeed = SPEED) { base = Math.max(at, now()); real = Date.now(); speed = newSpeed; },
  };
}

/** mulberry32: the same "random" day on every run. */
function seeded(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// [flavor, model, share of traffic, prompt size]: cheap models take most of the work, like a real agent's day
const SPEED = 80;
const MIX: [Flavor, string, number, number][] = [
  ["openai", "gpt-4o-mini", 0.28, 2500], ["kimi", "kimi-k2.5", 0.2, 3500], ["anthropic", "claude-haiku-4-5", 0.14, 3000],
  ["anthropic", "claude-sonnet-5", 0.18, 9000], ["openai", "gpt-4o", 0.08, 6000], ["kimi", "kimi-k2.6", 0.07, 5000], ["anthropic", "claude-opus-5", 0.05, 12000],
];

/** One ordinary request: a model by share, a stream two times in five, a cached prompt prefix one time in three.
 *  (Requests of one moment run together, so two to the same mock may swap scripts: the day differs in details only.) */
async function ordinary(tw: Running, mocks: Mocks, r: () => number): Promise<void> {
  let x = r(), i = 0;
  while (i < MIX.length - 1 && (x -= MIX[i][2]) > 0) i++;
  const [flavor, model, , size] = MIX[i];
  const input = Math.round(size * (0.4 + r())), cached = r() < 0.33 ? Math.round(input * 0.7) : 0;
  const script: Script = { type: "reply", text: "Here is what changed, in three points.", usage: { input: input - cached, cached, output: Math.round(120 + r() * 900) }, delayMs: 3 + Math.round(r() * 15) };
  mocks[flavor].queue(script);
  const agent = AGENTS[Math.floor(r() * AGENTS.length)], session = `${agent}-${1 + Math.floor(r() * 6)}`;
  await chat(tw, { model, stream: r() < 0.4 }, undefined, { "x-tokenwatch-agent": agent, "x-tokenwatch-session": session });
}
const AGENTS = ["claude-code", "claude-code", "codex", "ci-bot", "docs-writer"];

/** The incidents of the day, at fixed times (minutes before now): failovers, an outage, a bad request, a broken stream. */
const INCIDENTS: [number, (tw: Running, m: Mocks) => Promise<unknown>][] = [
  [1150, (tw, m) => { m.openai.queue({ type: "error", status: 429, headers: { "retry-after": "20" } }); m.anthropic.queue({ type: "reply", usage: { input: 5200, output: 640 }, delayMs: 25 }); return chat(tw, { model: "gpt-4o" }); }],
  [560, (tw, m) => { m.anthropic.queue({ type: "error", status: 529 }); return chat(tw, { model: "anthropic/claude-opus-5" }); }],
  [555, (tw, m) => { m.anthropic.queue({ type: "error", status: 529 }, { type: "reply", usage: { input: 7400, output: 910 }, delayMs: 30 }); return chat(tw, { model: "claude-sonnet-5", stream: true }); }],
  [190, (tw, m) => { m.kimi.queue({ type: "error", status: 400 }); return chat(tw, { model: "kimi-k2.6", temperature: 1.5 }); }],
  [34, (tw, m) => { m.anthropic.queue({ type: "stream-error", afterChunks: 3 }); return chat(tw, { model: "claude-sonnet-5", stream: true }); }],
];

/** A day of traffic, busier in working hours, then a last minute in real time that leaves the limiter busy. */
async function playDay(tw: Running, mocks: Mocks, clock: ReturnType<typeof fastClock>): Promise<void> {
  const r = seeded(7), end = Date.now() - 2 * 60_000, incidents = [...INCIDENTS];
  for (let ago = 23 * 60; ago > 0; ago -= ago > 60 ? 20 : 2) {
    while (incidents.length && incidents[0][0] >= ago) {
      const [at, run] = incidents.shift()!;
      clock.jump(end - at * 60_000);
      await run(tw, mocks);
    }
    clock.jump(end - ago * 60_000);
    const hour = new Date(clock.now()).getHours(), busy = hour >= 8 && hour <= 19 ? 3 : 1;
    await Promise.all(Array.from({ length: 1 + Math.floor(r() * busy) }, () => ordinary(tw, mocks, r)));
  }
  clock.jump(Date.now(), 1);
  mocks.openai.queue({ type: "error", status: 429, headers: { "retry-after": "40" } });
  mocks.kimi.queue({ type: "reply", usage: { input: 2900, output: 310 }, delayMs: 380 });
  mocks.anthropic.queue({ type: "reply", usage: { input: 8200, output: 1100 }, delayMs: 420 }, { type: "reply", usage: { input: 6900, output: 800 }, delayMs: 450 });
  await Promise.all([
    chat(tw, { model: "gpt-4o-mini", stream: true }), // cools gpt-4o-mini down, fails over to Kimi
    chat(tw, { model: "claude-sonnet-5", stream: true }),
    chat(tw, { model: "claude-sonnet-5", stream: true }),
  ]);
}
