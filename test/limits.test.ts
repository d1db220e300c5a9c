// Headroom as the providers count it, through HTTP: the mocks count what they serve in a sliding minute, add
// "another client" on the same key, send their provider's real rate-limit headers and answer 429 past a limit
// (`rateLimits({limits, others, enforce})`). TokenWatch must see that traffic in the headers, route around it
// before any 429, learn the account's real limits, size a request's output as the provider will count it, and
// say the same in /stats as it decides when routing. Clients are the real SDKs.

import { describe, it } from "node:test";
import assert from "node:assert/strict";
import OpenAI from "openai";
import Anthropic from "@anthropic-ai/sdk";
import { buildConfig, start, PROVIDERS } from "../tokenwatch.ts";
import type { Running, Row } from "../tokenwatch.ts";
import { startMock } from "./mocks.ts";
import type { Flavor, Mock } from "./mocks.ts";

type Env = { tw: Running; mocks: Record<Flavor, Mock>; openai: OpenAI; anthropic: Anthropic; close(): Promise<void> };

/** TokenWatch in front of the three mocks, with only the models of `models` (provider → model → its table entry). */
async function setup(models: Partial<Record<Flavor, Record<string, unknown>>>): Promise<Env> {
  const [openai, kimi, anthropic] = await Promise.all([startMock("openai"), startMock("kimi"), startMock("anthropic")]);
  const mocks = { openai, kimi, anthropic };
  const env: Record<string, string> = {};
  for (const [name, m] of Object.entries(mocks)) {
    env[`${name.toUpperCase()}_API_KEY`] = m.key;
    env[`${name.toUpperCase()}_BASE_URL`] = m.url;
  }
  const providers = Object.fromEntries((["openai", "kimi", "anthropic"] as const).map((p) => [p, { models: models[p] ?? {} }]));
  const tw = await start({ config: buildConfig({ env, file: { max_wait_ms: 0, providers } }), env });
  return {
    tw, mocks,
    openai: new OpenAI({ baseURL: `${tw.url}/v1`, apiKey: "unused", maxRetries: 0 }),
    anthropic: new Anthropic({ baseURL: tw.url, apiKey: "unused", maxRetries: 0 }),
    close: async () => { await tw.close(1000); await Promise.all(Object.values(mocks).map((m) => m.close())); },
  };
}

type DimensionStat = { dimension: string; used: number; limit: number; configured_limit: number | null; learned_limit: number | null; percent: number; blocks: boolean; free_in_s: number };
type ModelStat = { model: string; saturated: boolean; binding: string | null; free_in_s: number; percent_used: number; dimensions: DimensionStat[] };

async function modelStat(e: Env, model: string): Promise<ModelStat> {
  const stats = await (await fetch(`${e.tw.url}/stats`)).json();
  return stats.models.find((m: ModelStat) => m.model === model);
}
const dim = (m: ModelStat, d: string): DimensionStat => m.dimensions.find((x) => x.dimension === d)!;
/** Would routing take a request that adds `take` to this dimension, by the figures /stats shows? */
const fits = (d: DimensionStat, take: number, threshold = 0.8) => d.used + take <= threshold * d.limit;

const rows = (e: Env): Row[] => { e.tw.store.flush(); return e.tw.store.recent(1000).reverse(); };
const hi = [{ role: "user" as const, content: "hi" }];

/** A chat completion through the OpenAI SDK: which provider answered, and the mock's own status codes seen. */
async function chat(e: Env, body: Omit<OpenAI.ChatCompletionCreateParamsNonStreaming, "messages"> & { complexity?: string }) {
  const { data, response } = await e.openai.chat.completions.create({ messages: hi, ...body } as OpenAI.ChatCompletionCreateParamsNonStreaming).withResponse();
  return { provider: response.headers.get("x-tokenwatch-provider"), model: data.model };
}

const served = (m: Mock) => m.requests.filter((r) => r.path.endsWith("/completions") || r.path.endsWith("/messages")).length;

// ============================================================================================
describe("limits: other clients of the same key, seen in the providers' headers", () => {
  it("fails over before any 429 when the headers show another client using most of the minute, and /stats says why", async () => {
    const e = await setup({ openai: { "gpt-4o": PROVIDERS.openai.models["gpt-4o"] }, kimi: { "kimi-k2.5": PROVIDERS.kimi.models["kimi-k2.5"] } });
    // 26,000 of gpt-4o's 30,000 tokens are taken by someone else: TokenWatch's own window holds none of it
    e.mocks.openai.rateLimits({ limits: { requests: 500, tokens: 30_000 }, others: { tokens: 26_000 }, enforce: true });
    try {
      // complex work: gpt-4o first, Kimi after it
      assert.equal((await chat(e, { model: "auto", complexity: "complex", max_tokens: 1000 })).provider, "openai"); // nothing known yet: it goes
      const stat = await modelStat(e, "gpt-4o");
      const tpm = dim(stat, "tpm");
      // 26,000 + the request (1,000 and its prompt); the view drains as the window moves, so a slow machine reads a few tokens less
      assert.ok(tpm.used >= 26_500 && tpm.used <= 27_100, `the headers' view: ${tpm.used} used`);
      assert.deepEqual([stat.saturated, stat.binding, tpm.blocks, tpm.learned_limit, tpm.configured_limit], [true, "tpm", true, 30_000, 30_000]);
      assert.ok(stat.free_in_s >= 1 && stat.free_in_s <= 60, `frees in ${stat.free_in_s} s, from the header's reset`);

      // this one would pass 30,000 at the provider: TokenWatch sends it to Kimi without trying
      const next = await chat(e, { model: "auto", complexity: "complex", max_tokens: 3500 });
      assert.equal(next.provider, "kimi");
      assert.equal(served(e.mocks.openai), 1, "OpenAI saw only the first request");
      const row = rows(e).at(-1)!;
      assert.match(row.failover ?? "", /gpt-4o.*tpm/, `the row says why: ${row.failover}`);
      assert.ok(!rows(e).some((r) => r.status === 429 || /429/.test(r.failover ?? "")), "no 429 anywhere");
    } finally { await e.close(); }
  });

  it("answers 429 with the provider's own reset as Retry-After when every candidate is saturated", async () => {
    const e = await setup({ openai: { "gpt-4o": PROVIDERS.openai.models["gpt-4o"] } });
    try {
      // the account is at 29,000 of 30,000 tokens and whole again in 7 s, as OpenAI says it
      e.mocks.openai.queue({ type: "reply", headers: { "x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "7s", "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499", "x-ratelimit-reset-requests": "120ms" } });
      await chat(e, { model: "gpt-4o" });
      const stat = await modelStat(e, "gpt-4o");
      assert.deepEqual([stat.saturated, stat.binding], [true, "tpm"]);
      assert.ok(stat.free_in_s >= 6 && stat.free_in_s <= 7, `frees in ${stat.free_in_s} s`);
      await assert.rejects(chat(e, { model: "gpt-4o" }), (err: InstanceType<typeof OpenAI.RateLimitError>) => {
        const retry = Number(err.headers?.get("retry-after"));
        assert.equal(err.status, 429);
        assert.ok(retry >= 6 && retry <= 7, `retry-after ${retry}: the header's 7 s, not a minute`);
        return true;
      });
      assert.equal(served(e.mocks.openai), 1);
    } finally { await e.close(); }
  });

  it("learns a higher tier's limits from the headers: the capacity is used without editing the table, and /stats shows both figures", async () => {
    const e = await setup({ openai: { "gpt-4o": PROVIDERS.openai.models["gpt-4o"] }, kimi: { "kimi-k2.5": PROVIDERS.kimi.models["kimi-k2.5"] } });
    // a Tier 2 account: 150,000 tokens a minute where the table says 30,000; another client uses 60,000 of them
    e.mocks.openai.rateLimits({ limits: { requests: 5000, tokens: 150_000 }, others: { tokens: 60_000 }, enforce: true });
    try {
      await chat(e, { model: "gpt-4o", max_tokens: 100 });
      const tpm = dim(await modelStat(e, "gpt-4o"), "tpm");
      assert.deepEqual([tpm.configured_limit, tpm.learned_limit, tpm.limit, tpm.blocks], [30_000, 150_000, 150_000, false]);
      assert.ok(tpm.used >= 60_000 && tpm.percent >= 40 && tpm.percent < 50, `${tpm.used} used, ${tpm.percent}%`);
      const rpm = dim(await modelStat(e, "gpt-4o"), "rpm");
      assert.deepEqual([rpm.configured_limit, rpm.learned_limit], [500, 5000]);
      for (let i = 0; i < 3; i++) assert.equal((await chat(e, { model: "gpt-4o", max_tokens: 8000 })).provider, "openai"); // past the table's 30,000
    } finally { await e.close(); }
  });
});

describe("limits: each dimension apart", () => {
  it("skips an Anthropic model whose output tokens bind for a large max_tokens, takes it for a small one, its input tokens free", async () => {
    const e = await setup({ anthropic: { "claude-sonnet-5": PROVIDERS.anthropic.models["claude-sonnet-5"] }, openai: { "gpt-4o": PROVIDERS.openai.models["gpt-4o"] } });
    // another client has written 4,000 of the 8,000 output tokens a minute; input tokens are all but unused
    e.mocks.anthropic.rateLimits({ limits: { requests: 50, input_tokens: 30_000, output_tokens: 8_000 }, others: { output_tokens: 4_000 }, enforce: true });
    const ask = (max_tokens: number) => e.anthropic.messages.create({ model: "claude-sonnet-5", max_tokens, messages: hi }).withResponse().then((r) => r.response.headers.get("x-tokenwatch-provider"));
    try {
      assert.equal(await ask(100), "anthropic");
      const stat = await modelStat(e, "claude-sonnet-5");
      const otpm = dim(stat, "otpm"), itpm = dim(stat, "itpm");
      assert.equal(stat.binding, "otpm");
      assert.ok(otpm.percent >= 45 && otpm.percent <= 55, `otpm at ${otpm.percent}%`);
      assert.ok(itpm.percent < 5, `itpm at ${itpm.percent}%`);
      assert.equal(stat.saturated, false, "a typical request (small output) still fits");

      // /stats' figures and routing agree: 3,000 more output tokens do not fit under 80% of 8,000, 1,000 do
      assert.equal(fits(otpm, 3000), false);
      assert.equal(await ask(3000), "openai");
      assert.equal(fits(dim(await modelStat(e, "claude-sonnet-5"), "otpm"), 1000), true);
      assert.equal(await ask(1000), "anthropic");
      assert.equal(served(e.mocks.anthropic), 2);
      assert.ok(!rows(e).some((r) => r.status === 429), "no 429");
    } finally { await e.close(); }
  });

  it("takes a request without max_tokens on a model at 30% of every dimension, as /stats says it would", async () => {
    // a small account: 20 requests and 6,000 tokens a minute; another client holds 30% of both
    const small = { ...PROVIDERS.openai.models["gpt-4o-mini"], rpm: 20, tpm: 6_000 };
    const e = await setup({ openai: { "gpt-4o-mini": small }, kimi: { "kimi-k2.5": PROVIDERS.kimi.models["kimi-k2.5"] } });
    e.mocks.openai.rateLimits({ limits: { requests: 20, tokens: 6_000 }, others: { requests: 5, tokens: 1_750 }, enforce: true });
    try {
      assert.equal((await chat(e, { model: "gpt-4o-mini" })).provider, "openai");
      const stat = await modelStat(e, "gpt-4o-mini");
      for (const d of ["rpm", "tpm"]) {
        const x = dim(stat, d);
        assert.ok(x.percent >= 29 && x.percent <= 32, `${d} at ${x.percent}%`);
      }
      assert.deepEqual([stat.saturated, stat.free_in_s], [false, 0]);
      // a fixed 4,096-token output estimate would not fit (1,800 + 4,096 > 4,800): the learned one does
      for (let i = 0; i < 3; i++) assert.equal((await chat(e, { model: "gpt-4o-mini" })).provider, "openai");
      assert.equal(served(e.mocks.kimi), 0);
    } finally { await e.close(); }
  });
});
