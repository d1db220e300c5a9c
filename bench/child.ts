// One proxy under test, in its own process so that its CPU time and memory are its own:
//   node bench/child.ts tokenwatch|ackfirst|redis|bare <upstream base URL> <db file> [redis URL]
// ("ackfirst": TokenWatch with `durable: false`, answering before its row is written, for the group-commit figures;
// "redis": TokenWatch with its limits shared through Redis at that URL)
// It says {type: "ready", url} over IPC, answers {type: "sample"} with its CPU time and memory
// (after a forced GC when run with --expose-gc), and exits on {type: "close"}.

import process from "node:process";
import type { Config } from "../tokenwatch.ts";

export type Sample = {
  type: "sample"; cpuUs: number; rss: number; maxRss: number; heapUsed: number;
  written: number; pending: number; inflight: number; shared?: string;
};

const BENCH_MODELS = ["fast", "slow", "hold"];

/** A config with two local providers whose limits never get in the way: OpenAI-compatible with the Responses API ("fast"…) and Anthropic-kind ("msg-fast"…). */
export async function benchConfig(upstream: string, redis?: string): Promise<Config> {
  const { buildConfig } = await import("../tokenwatch.ts"); // imported only where used: the bare proxy's memory is its own
  const model = { input: 0.15, output: 0.6, limit: 1e12, rpm: 1e9, tier: "simple" };
  const models = (prefix: string) => Object.fromEntries(BENCH_MODELS.map((m) => [`${prefix}${m}`, model]));
  return buildConfig({ env: {}, file: { providers: {
    bench: { kind: "openai", base_url: `${upstream}/v1`, responses: true, models: models("") },
    benchmsg: { kind: "anthropic", base_url: upstream, priority: 20, models: models("msg-") },
  }, ...(redis ? { redis: { url: redis, timeout_ms: 250 } } : {}), // a saturated core answers late whatever Redis does: measure Redis, not the fallback
  loop_guard: { max_repeats: 0 }, // the load repeats one agent request thousands of times: exactly what the loop guard stops
  } });
}

async function main(): Promise<void> {
  const [role, upstream, db, redis] = process.argv.slice(2);
  let url: string, sample: () => Omit<Sample, "type" | "cpuUs" | "rss" | "maxRss" | "heapUsed">, close: () => Promise<void>;
  if (role === "tokenwatch" || role === "ackfirst" || role === "redis") {
    const { start } = await import("../tokenwatch.ts");
    const tw = await start({ config: await benchConfig(upstream, role === "redis" ? redis : undefined), db, durable: role !== "ackfirst" });
    url = tw.url;
    sample = () => { tw.store.flush(); return { written: tw.store.written, pending: tw.store.pending, inflight: tw.router.inflight, shared: tw.router.shared && `${tw.router.shared.status.mode}, ${tw.router.shared.status.fallbacks} fallback(s)` }; };
    close = () => tw.close(1000);
  } else {
    const { startBare } = await import("./bare.ts");
    const bare = await startBare({ upstream: `${upstream}/v1`, db });
    url = bare.url;
    sample = () => ({ written: bare.written(), pending: bare.pending(), inflight: 0 });
    close = bare.close;
  }
  process.on("message", (msg: { type: string; gc?: boolean }) => {
    if (msg.type === "close") { void close().then(() => process.exit(0)); return; }
    if (msg.type !== "sample") return;
    const gc = (globalThis as { gc?: () => void }).gc;
    if (msg.gc && gc) gc();
    const cpu = process.cpuUsage(), mem = process.memoryUsage();
    const out: Sample = { type: "sample", cpuUs: cpu.user + cpu.system, rss: mem.rss, maxRss: process.resourceUsage().maxRSS * 1024, heapUsed: mem.heapUsed, ...sample() };
    process.send!(out);
  });
  process.send!({ type: "ready", url });
}

if (import.meta.main) void main();
