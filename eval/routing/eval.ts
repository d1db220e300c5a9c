// npm run eval:routing: how well `"model": "auto"` judges a request, on the held-out part of the labelled set
// (eval/routing/*.jsonl, labelled by RUBRIC.md). Prints accuracy, recall and precision for complex, the confusion
// matrix, results per kind of request, and the cost saved against sending everything to the capable tier.
//
//   npm run eval:routing                      the held-out part: the figures the README reports
//   npm run eval:routing -- --split train     the part the classifier was designed and trained on
//   npm run eval:routing -- --split all --misses   every part, and list each miss with its reason
//   npm run eval:routing -- --ids '2-'        only the ids that match (here: the second round of the set)

import { classify, PROVIDERS, costUsd, promptEstimate } from "../../tokenwatch.ts";
import { load, splitOf } from "./data.ts";
import type { Item } from "./data.ts";

const args = process.argv.slice(2);
const split = args.includes("--split") ? args[args.indexOf("--split") + 1] : "heldout";
if (!["train", "heldout", "all"].includes(split)) throw new Error(`--split must be train, heldout or all; got ${split}`);
const only = args.includes("--ids") ? new RegExp(args[args.indexOf("--ids") + 1]) : undefined; // e.g. --ids '2-' for the second round
const items = load().filter((i) => (split === "all" || splitOf(i.id) === split) && (!only || only.test(i.id)));

// What each tier costs: the cheapest simple model of the table and the first complex one, at a typical output
// (a simple answer 400 tokens, a complex one 1,200), the prompt at a token per four characters of the body.
const CHEAP = PROVIDERS.openai.models["gpt-4o-mini"], CAPABLE = PROVIDERS.anthropic.models["claude-sonnet-5"];
const costOf = (i: Item, m: typeof CHEAP) => costUsd(m, { input: promptEstimate(JSON.stringify(i.request).length), cached: 0, cache_write: 0, output: i.label === "complex" ? 1200 : 400 });

type Tally = { n: number; right: number; tp: number; fp: number; fn: number; tn: number };
const tally = (): Tally => ({ n: 0, right: 0, tp: 0, fp: 0, fn: 0, tn: 0 });
const perKind = new Map<string, Tally>(), perFile = new Map<string, Tally>(), all = tally();
let routed = 0, capable = 0, unsure = 0;
const misses: string[] = [];

for (const i of items) {
  const v = classify(i.request);
  const said = v.tier, truth = i.label;
  for (const t of [all, get(perKind, i.kind), get(perFile, i.file.replace(".jsonl", ""))]) {
    t.n++;
    if (said === truth) t.right++;
    if (said === "complex" && truth === "complex") t.tp++;
    if (said === "complex" && truth === "simple") t.fp++;
    if (said === "simple" && truth === "complex") t.fn++;
    if (said === "simple" && truth === "simple") t.tn++;
  }
  if (v.unsure) unsure++;
  routed += costOf(i, said === "complex" ? CAPABLE : CHEAP);
  capable += costOf(i, CAPABLE);
  if (said !== truth) misses.push(`${i.id} [${i.kind}, ${truth}] said ${said}: ${v.signals.join(", ")}`);
}

function get(m: Map<string, Tally>, k: string): Tally {
  let t = m.get(k);
  if (!t) m.set(k, (t = tally()));
  return t;
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
const ratio = (a: number, b: number) => (b ? a / b : 0);
console.log(`Routing classifier on the ${split === "all" ? "whole" : split === "train" ? "training" : "held-out"} set: ${all.n} requests (${all.tp + all.fn} complex, ${all.tn + all.fp} simple)\n`);
console.log(`accuracy           ${ratio(all.right, all.n).toFixed(3)}   (target >= 0.85)`);
console.log(`complex recall     ${ratio(all.tp, all.tp + all.fn).toFixed(3)}   (target >= 0.85: complex requests sent to a capable model)`);
console.log(`complex precision  ${ratio(all.tp, all.tp + all.fp).toFixed(3)}   (requests sent capable that needed it)`);
console.log(`unsure             ${pct(ratio(unsure, all.n))}   (what "classifier": "model" would ask the cheapest model about)\n`);
console.log("confusion matrix   said simple   said complex");
console.log(`  truly simple     ${String(all.tn).padStart(11)}   ${String(all.fp).padStart(12)}`);
console.log(`  truly complex    ${String(all.fn).padStart(11)}   ${String(all.tp).padStart(12)}\n`);
console.log(`cost against always-capable (${"claude-sonnet-5"}): $${routed.toFixed(4)} instead of $${capable.toFixed(4)}, ${pct(1 - ratio(routed, capable))} saved\n`);

const table = (title: string, m: Map<string, Tally>) => {
  console.log(`${title.padEnd(20)} n     accuracy  complex recall`);
  for (const [k, t] of [...m].sort((a, b) => a[0].localeCompare(b[0])))
    console.log(`  ${k.padEnd(18)} ${String(t.n).padStart(3)}   ${ratio(t.right, t.n).toFixed(2).padStart(8)}  ${t.tp + t.fn ? ratio(t.tp, t.tp + t.fn).toFixed(2).padStart(14) : "             -"}`);
  console.log();
};
table("by kind", perKind);
table("by source", perFile);
if (args.includes("--misses")) for (const m of misses) console.log(m);
