// Verdicts: never by colour alone. Each has an icon of its own shape (circle with a tick,
// warning triangle, octagon with a bar) and a text; colours come from the theme's palette.

import { h, icon } from "./dom.js";

export const VERDICTS = ["allowed", "potentially-blocked", "blocked"];
export const VERDICT_TEXT = { allowed: "Allowed", "potentially-blocked": "Potentially blocked", blocked: "Blocked", unknown: "Unknown" };
const SEVERITY = { allowed: 0, "potentially-blocked": 1, blocked: 2 };

/** "potentially_blocked" / "POTENTIALLY_BLOCKED" / "potentially-blocked" -> "potentially-blocked" */
export function normVerdict(v) {
  const s = String(v || "").toLowerCase().replace(/_/g, "-").replace(/\s+/g, "-");
  return VERDICT_TEXT[s] ? s : "unknown";
}

export function worst(verdicts) {
  let out = null;
  for (const v of verdicts) if (v in SEVERITY && (out === null || SEVERITY[v] > SEVERITY[out])) out = v;
  return out || "unknown";
}

export function verdictBadge(v, suffix = "") {
  const n = normVerdict(v);
  return h("span", { class: ["verdict", `v-${n}`], "data-verdict": n }, icon(n), VERDICT_TEXT[n], suffix ? h("span", { class: "muted" }, ` ${suffix}`) : null);
}

/** A verdict mix {allowed, potentially_blocked, blocked} -> badges with counts. */
export function mixBadges(mix) {
  const counts = normMix(mix);
  const parts = VERDICTS.filter((v) => counts[v]).map((v) => verdictBadge(v, `× ${counts[v]}`));
  return parts.length ? h("span", { class: "verdict-mix" }, parts) : h("span", { class: "muted" }, "no flows");
}

export function normMix(mix) {
  const out = { allowed: 0, "potentially-blocked": 0, blocked: 0 };
  for (const [k, v] of Object.entries(mix || {})) {
    const n = normVerdict(k);
    if (n in out) out[n] += Number(v) || 0;
  }
  return out;
}

export function mixWorst(mix) {
  const m = normMix(mix);
  return worst(VERDICTS.filter((v) => m[v] > 0));
}
