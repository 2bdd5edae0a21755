// Rendering of the API's structured policy diff (object-level changes with before/after bodies):
// one card per change, a line diff of the bodies (longest common subsequence, own code).

import { h } from "./dom.js";

const KIND_TITLES = {
  ruleset: "Ruleset", deny_rule: "Deny rule", label_group: "Label group", ip_list: "IP list",
  service: "Service", failsafe: "Failsafe", workload: "Workload", label_key: "Label key",
};

export function kindTitle(kind) { return KIND_TITLES[kind] || kind; }

/** Line diff: [{op: " "|"+"|"-", text}] */
export function lineDiff(a, b) {
  const n = a.length; const m = b.length;
  if (n * m > 4e6) return [...a.map((t) => ({ op: "-", text: t })), ...b.map((t) => ({ op: "+", text: t }))];
  const dp = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i -= 1) {
    for (let j = m - 1; j >= 0; j -= 1) {
      dp[i][j] = a[i] === b[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
    }
  }
  const out = [];
  let i = 0; let j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) { out.push({ op: " ", text: a[i] }); i += 1; j += 1; }
    else if (dp[i + 1][j] >= dp[i][j + 1]) { out.push({ op: "-", text: a[i] }); i += 1; }
    else { out.push({ op: "+", text: b[j] }); j += 1; }
  }
  while (i < n) { out.push({ op: "-", text: a[i] }); i += 1; }
  while (j < m) { out.push({ op: "+", text: b[j] }); j += 1; }
  return out;
}

function bodyLines(body) {
  return body ? JSON.stringify(body, null, 2).split("\n") : [];
}

function hrefOf(change) {
  const name = encodeURIComponent(change.name);
  if (change.change === "removed") return null;
  if (change.kind === "ruleset") return `#/rulesets/${name}`;
  if (change.kind === "deny_rule") return `#/deny-rules/${name}`;
  if (change.kind === "workload") return `#/workloads/${name}`;
  return null;
}

export function changeCard(change) {
  const diff = lineDiff(bodyLines(change.before), bodyLines(change.after));
  const href = hrefOf(change);
  return h("article", { class: "change", "data-change": `${change.kind}:${change.name}` },
    h("header", {},
      h("span", { class: ["tag", change.change] }, change.change),
      h("strong", {}, kindTitle(change.kind), " "),
      href ? h("a", { href }, change.name) : h("span", {}, change.name),
      change.fields && change.fields.length ? h("span", { class: "muted" }, `fields: ${change.fields.join(", ")}`) : null),
    h("details", {}, h("summary", {}, "Show the change"),
      h("pre", { class: "mono" }, diff.map((d) => h("div", { class: ["diff-line", d.op === "+" ? "add" : d.op === "-" ? "del" : ""] }, d.text)))));
}

export function changeList(changes, empty = "No change.") {
  if (!changes.length) return h("p", { class: "empty" }, empty);
  return h("div", {}, changes.map(changeCard));
}
