// npm run train:routing: fit the `"model": "auto"` classifier's weights on the TRAINING part of the labelled set
// (never the held-out part), choose its regularisation and threshold by 5-fold cross-validation within that part,
// and write the weights into tokenwatch.ts between its `<weights>` markers. Logistic regression, L2, full batch.
//
//   npm run train:routing            cross-validate, fit, write
//   npm run train:routing -- --dry   cross-validate and print, write nothing
//   npm run train:routing -- --ids '^(agent|app|mixed)2?-'   only the ids that match (here: the first two rounds)

import { readFileSync, writeFileSync } from "node:fs";
import { classifierFeatures } from "../../tokenwatch.ts";
import { load, splitOf } from "./data.ts";

const HASH_BUCKETS = 1024; // as in tokenwatch.ts
const FILE = new URL("../../tokenwatch.ts", import.meta.url);

type Row = { named: Record<string, number>; hashed: number[]; y: number };
const only = process.argv.includes("--ids") ? new RegExp(process.argv[process.argv.indexOf("--ids") + 1]) : undefined;
const training = () => load().filter((i) => splitOf(i.id) === "train" && (!only || only.test(i.id)));
const rows: Row[] = training().map((i) => ({ ...classifierFeatures(i.request), y: i.label === "complex" ? 1 : 0 }));
const names = [...new Set(rows.flatMap((r) => Object.keys(r.named)))].sort();
const index = new Map(names.map((n, i) => [n, i]));
const N = names.length;

/** A sparse row: indices into [bias, named…, hashed…] with their values. */
const sparse = (r: Row): [number[], number[]] => {
  const idx = [0], val = [1];
  for (const [k, v] of Object.entries(r.named)) { const i = index.get(k); if (i !== undefined) { idx.push(1 + i); val.push(v); } }
  for (const h of r.hashed) { idx.push(1 + N + h); val.push(1); }
  return [idx, val];
};
const X = rows.map(sparse);

/** Fit weights by full-batch Adam on the mean log-loss plus L2 (lambdaNamed on named signals, lambdaWords on words). */
function fit(train: number[], lambdaNamed: number, lambdaWords: number, steps = 1500): Float64Array {
  const D = 1 + N + HASH_BUCKETS, w = new Float64Array(D), m = new Float64Array(D), v = new Float64Array(D);
  const lr = 0.05, b1 = 0.9, b2 = 0.999;
  for (let t = 1; t <= steps; t++) {
    const g = new Float64Array(D);
    for (const j of train) {
      const [idx, val] = X[j];
      let z = 0;
      for (let k = 0; k < idx.length; k++) z += w[idx[k]] * val[k];
      const err = 1 / (1 + Math.exp(-z)) - rows[j].y;
      for (let k = 0; k < idx.length; k++) g[idx[k]] += (err * val[k]) / train.length;
    }
    for (let d = 1; d < D; d++) g[d] += (d <= N ? lambdaNamed : lambdaWords) * w[d];
    for (let d = 0; d < D; d++) {
      m[d] = b1 * m[d] + (1 - b1) * g[d];
      v[d] = b2 * v[d] + (1 - b2) * g[d] * g[d];
      w[d] -= (lr * (m[d] / (1 - b1 ** t))) / (Math.sqrt(v[d] / (1 - b2 ** t)) + 1e-8);
    }
  }
  return w;
}

const prob = (w: Float64Array, j: number) => { const [idx, val] = X[j]; let z = 0; for (let k = 0; k < idx.length; k++) z += w[idx[k]] * val[k]; return 1 / (1 + Math.exp(-z)); };

/** Out-of-fold probabilities: each training row scored by a model fitted without its fold (folds drawn by `seed`). */
function crossValidate(lambdaNamed: number, lambdaWords: number, seed = 0): number[] {
  const out = new Array<number>(rows.length);
  const foldOf = rows.map((_, j) => (j * 7919 + seed * 104729) % 997 % 5);
  for (let fold = 0; fold < 5; fold++) {
    const train = rows.map((_, j) => j).filter((j) => foldOf[j] !== fold);
    const w = fit(train, lambdaNamed, lambdaWords, 800);
    rows.forEach((_, j) => { if (foldOf[j] === fold) out[j] = prob(w, j); });
  }
  return out;
}

/** The threshold with the best accuracy among those that keep complex recall >= 0.88 (a complex task sent cheap costs quality). */
function bestThreshold(p: number[]): { threshold: number; accuracy: number; recall: number } {
  let best = { threshold: 0.5, accuracy: 0, recall: 0 };
  for (let th = 0.2; th <= 0.7; th += 0.01) {
    let right = 0, tp = 0, pos = 0;
    p.forEach((x, k) => { const y = rows[k % rows.length].y, said = x >= th ? 1 : 0; if (said === y) right++; if (y) { pos++; if (said) tp++; } });
    const accuracy = right / p.length, recall = tp / pos;
    if (recall >= 0.88 && accuracy > best.accuracy) best = { threshold: Math.round(th * 100) / 100, accuracy, recall };
  }
  return best;
}

console.log(`training part: ${rows.length} requests, ${rows.filter((r) => r.y).length} complex; ${N} named signals, ${HASH_BUCKETS} word buckets`);
let chosen = { lambdaNamed: 0, lambdaWords: 0, threshold: 0.5, accuracy: 0, recall: 0 };
for (const lambdaNamed of [0.0001, 0.0003, 0.001, 0.003]) {
  for (const lambdaWords of [0.03, 0.1, 0.3, Infinity]) {
    // three draws of the folds, pooled: a choice that wins on one draw's noise does not win here
    const p = [0, 1, 2].flatMap((seed) => crossValidate(lambdaNamed, lambdaWords === Infinity ? 1e6 : lambdaWords, seed));
    const b = bestThreshold(p);
    console.log(`  λ named ${lambdaNamed}, λ words ${lambdaWords}: 5-fold accuracy ${b.accuracy.toFixed(3)}, complex recall ${b.recall.toFixed(3)} at threshold ${b.threshold}`);
    if (b.accuracy > chosen.accuracy) chosen = { lambdaNamed, lambdaWords, ...b };
  }
}
console.log(`chosen: λ named ${chosen.lambdaNamed}, λ words ${chosen.lambdaWords}, threshold ${chosen.threshold} (5-fold accuracy ${chosen.accuracy.toFixed(3)})`);

const w = fit(rows.map((_, j) => j), chosen.lambdaNamed, chosen.lambdaWords === Infinity ? 1e6 : chosen.lambdaWords);
const named = Object.fromEntries(names.map((n, i) => [n, Math.round(w[1 + i] * 1000) / 1000]).filter(([, x]) => x !== 0));
const words = w.slice(1 + N);
const scale = Math.max(1e-9, ...words.map(Math.abs)) / 127;
const packed = Buffer.from(Int8Array.from(words, (x) => Math.round(x / scale)).buffer).toString("base64");
const block = `const WEIGHTS = {\n  bias: ${Math.round(w[0] * 1000) / 1000}, threshold: ${chosen.threshold}, scale: ${scale.toPrecision(6)},\n  named: {\n${Object.entries(named).map(([k, x]) => `    ${JSON.stringify(k)}: ${x},`).join("\n")}\n  } as Record<string, number>,\n  hashed:\n    ${(packed.match(/.{1,100}/g) ?? [""]).map((c) => JSON.stringify(c)).join(" +\n    ")},\n};`;
for (const [k, x] of Object.entries(named).sort((a, b) => b[1] - a[1])) console.log(`  ${x.toFixed(3).padStart(7)}  ${k}`);
if (!process.argv.includes("--dry")) {
  const text = readFileSync(FILE, "utf8");
  const re = /(\/\/ <weights>[^\n]*\n)[\s\S]*?(\n\/\/ <\/weights>)/;
  if (!re.test(text)) throw new Error("tokenwatch.ts has no <weights> markers");
  writeFileSync(FILE, text.replace(re, (_, a, b) => `${a}${block}${b}`));
  console.log("weights written to tokenwatch.ts");
}

if (process.argv.includes("--misses")) { // the training part's out-of-fold misses, to design signals on (never the held-out part)
  const p = crossValidate(chosen.lambdaNamed, chosen.lambdaWords === Infinity ? 1e6 : chosen.lambdaWords);
  const items = training();
  p.forEach((x, j) => {
    if ((x >= chosen.threshold ? 1 : 0) === rows[j].y) return;
    const i = items[j], last = i.request.messages.findLast((m) => m.role === "user");
    const text = typeof last?.content === "string" ? last.content : JSON.stringify(last?.content ?? "");
    console.log(`${i.id} ${i.label} ${i.kind} p=${x.toFixed(2)} [${Object.keys(rows[j].named).join(",")}] | ${text.slice(0, 150).replace(/\n/g, " ⏎ ")}`);
  });
}
