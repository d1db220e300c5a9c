// The routing evaluation set: its items with their shorthands expanded, and the fixed split by a hash of
// each id. `train`: what the classifier was designed and trained on. `heldout`: what it is judged on.

import { readFileSync, readdirSync } from "node:fs";
import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { ChatRequest, Tier } from "../../tokenwatch.ts";

export type Item = { id: string; kind: string; label: Tier; lang: string; why: string; request: ChatRequest; file: string };
export type Split = "train" | "heldout";

const DIR = dirname(fileURLToPath(import.meta.url));

/** The split an id falls in: the first byte of its SHA-256, even or odd. Fixed forever: ids never change. */
export const splitOf = (id: string): Split => (createHash("sha256").update(id).digest()[0] % 2 === 0 ? "train" : "heldout");

/** Every item of every *.jsonl here, with `$system:<name>` and `$tools:<name>` replaced by shared.json's text. */
export function load(): Item[] {
  const shared = JSON.parse(readFileSync(join(DIR, "shared.json"), "utf8")) as { systems: Record<string, string>; toolsets: Record<string, unknown[]> };
  const items: Item[] = [];
  for (const file of readdirSync(DIR).filter((f) => f.endsWith(".jsonl")).sort()) {
    for (const line of readFileSync(join(DIR, file), "utf8").split("\n")) {
      if (!line.trim()) continue;
      const x = JSON.parse(line);
      const req = x.request;
      for (const m of req.messages) {
        if (typeof m.content === "string" && m.content.startsWith("$system:")) m.content = shared.systems[m.content.slice(8)] ?? fail(`${x.id}: no system ${m.content}`);
      }
      if (typeof req.tools === "string") req.tools = shared.toolsets[req.tools.replace(/^\$tools:/, "")] ?? fail(`${x.id}: no tools ${req.tools}`);
      items.push({ ...x, request: { model: "auto", ...req }, file });
    }
  }
  const ids = new Set<string>();
  for (const i of items) { if (ids.has(i.id)) fail(`id ${i.id} twice`); ids.add(i.id); }
  return items;
}

function fail(msg: string): never { throw new Error(`eval/routing: ${msg}`); }
