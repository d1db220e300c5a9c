// Measure GET /stats on a large log: fill a temp SQLite file through the Store (the way TokenWatch writes it),
// start the real server on it, and time /stats?window= for each window. The dashboard asks every 3 seconds.
//
//   node bench/stats.ts                 # 1,000,000 rows over the last 7 days, 9 calls per window
//   node bench/stats.ts --rows 200000   # fewer rows
//   node bench/stats.ts --db /tmp/tw.db # keep (or reuse, when it exists) the filled file
//
// Rows are generated from a fixed seed: several models and providers, ~3% errors, ~2% failovers, 40% streams.

import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { PROVIDERS, Store, buildConfig, costUsd, start } from "../tokenwatch.ts";
import type { Row } from "../tokenwatch.ts";

const { values: flags } = parseArgs({ options: { rows: { type: "string", default: "1000000" }, db: { type: "string" }, calls: { type: "string", default: "9" } } });
const ROWS = Number(flags.rows), CALLS = Number(flags.calls), DAYS = 7, BATCH = 20_000;
const WINDOWS = ["1h", "24h", "7d", "all"] as const;

/** mulberry32: a small seeded generator, so two runs fill the same log. */
function rng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// [provider, model, share of traffic]: cheap models take most of it, like real agent traffic
const MIX: [string, string, number][] = [
  ["openai", "gpt-4o-mini", 0.3], ["kimi", "kimi-k2.5", 0.2], ["anthropic", "claude-haiku-4-5", 0.15], ["anthropic", "claude-sonnet-5", 0.15],
  ["openai", "gpt-4o", 0.1], ["kimi", "kimi-k2.6", 0.06], ["anthropic", "claude-opus-5", 0.04],
];
const ERRORS: [number, string, string][] = [[429, "saturated", "All candidates are saturated: retry after 4 s."], [502, "upstream", "Anthropic answered 529: Overloaded"], [499, "client_closed", "The client closed the connection."], [400, "bad_request", "messages[0].content is required."]];
const FAILOVERS = ["429 rate limited", "529 overloaded", "timeout", "503 upstream error"];

function pick<T>(r: () => number, xs: T[]): T { return xs[Math.floor(r() * xs.length)]; }

function makeRow(r: () => number, ts: number): Row {
  let x = r(), i = 0;
  while (i < MIX.length - 1 && (x -= MIX[i][2]) > 0) i++;
  const [provider, model] = MIX[i], price = PROVIDERS[provider].models[model];
  const stream = r() < 0.4, failed = r() < 0.03, err = failed ? pick(r, ERRORS) : undefined;
  const input = 200 + Math.floor(r() * 6000), cached = r() < 0.3 ? Math.floor(input * 0.6) : 0, output = failed ? 0 : 20 + Math.floor(r() * 900);
  const latency = 300 + Math.floor(r() * 4000);
  return {
    ts, entry: r() < 0.5 ? "chat" : r() < 0.6 ? "responses" : "messages", provider, model, requested_model: r() < 0.5 ? "auto" : model, complexity: price.tier, status: err?.[0] ?? 200, stream,
    input_tokens: input, output_tokens: output, cached_tokens: cached, cache_write_tokens: 0,
    cost_usd: failed ? 0 : costUsd(price, { input: input - cached, cached, cache_write: 0, output }),
    latency_ms: latency, ttft_ms: stream && !failed ? 150 + Math.floor(r() * 900) : null,
    attempts: 1, failover: r() < 0.02 ? pick(r, FAILOVERS) : null, error: err?.[2] ?? null, error_kind: err?.[1] ?? null,
    agent: pick(r, ["claude-code", "codex", "ci-bot", null]), session: `s-${Math.floor(r() * 200)}`,
  };
}

/** Write ROWS rows, oldest first, spread evenly over the last DAYS days, in transactions of BATCH rows. */
function fill(path: string): number {
  const store = new Store(path), r = rng(42), t0 = performance.now();
  const end = Date.now(), step = (DAYS * 86_400_000) / ROWS;
  for (let i = 0; i < ROWS; i++) {
    store.add(makeRow(r, Math.floor(end - DAYS * 86_400_000 + i * step)));
    if ((i + 1) % BATCH === 0) store.flush();
  }
  store.close();
  return performance.now() - t0;
}

const median = (xs: number[]) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function main(): Promise<void> {
  const dir = flags.db ? undefined : mkdtempSync(join(tmpdir(), "tw-bench-"));
  const path = flags.db ?? join(dir!, "stats.db");
  if (existsSync(path)) console.log(`Reusing ${path}`);
  else console.log(`Filled ${ROWS.toLocaleString("en-US")} rows into ${path} in ${(fill(path) / 1000).toFixed(1)} s`);
  const config = buildConfig({ env: { OPENAI_API_KEY: "x", KIMI_API_KEY: "x", ANTHROPIC_API_KEY: "x" } });
  const tw = await start({ config, db: path });
  try {
    console.log(`Node ${process.version}, SQLite ${process.versions.sqlite}, ${cpus().length} x ${cpus()[0]?.model ?? "unknown CPU"}`);
    console.log(`${tw.store.count().toLocaleString("en-US")} rows; GET /stats?window=, ${CALLS} calls each\n\nwindow  median ms  min ms  max ms  bytes`);
    for (const w of WINDOWS) {
      const times: number[] = [];
      let bytes = 0;
      for (let i = 0; i < CALLS; i++) {
        const t0 = performance.now();
        const res = await fetch(`${tw.url}/stats?window=${w}`);
        bytes = (await res.arrayBuffer()).byteLength;
        times.push(performance.now() - t0);
        if (!res.ok) throw new Error(`GET /stats?window=${w} answered ${res.status}`);
      }
      console.log(`${w.padEnd(6)}  ${median(times).toFixed(1).padStart(9)}  ${Math.min(...times).toFixed(1).padStart(6)}  ${Math.max(...times).toFixed(1).padStart(6)}  ${bytes}`);
    }
  } finally {
    await tw.close(1000);
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
}

await main();
