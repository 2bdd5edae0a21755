// The console's side of the visibility API: the application map, edge drill-down with the
// deciding rules, the Explorer's flow search and CSV export, the impact preview and rule
// suggestions. Routes are found in the controller's OpenAPI document, so the pages also work
// against a controller without that API (the map then shows the inventory's app groups, without
// traffic). Everything is normalised here:
//   map:  {nodes: [{id, kind, name, labels, workloads, clusterKey}], edges: [{src, dst, connections, count, mix, services}]}
//   flow: {id, src, dst, srcName, dstName, service, verdict, active, draft, count, rules, firstSeen, lastSeen}

import { h, icon, table, formatTime } from "./dom.js";
import * as api from "./api.js";
import { normVerdict, verdictBadge } from "./verdicts.js";
import { ipListChip } from "./labels.js";

export const GROUP_KEYS = ["app", "env"];

const ROUTES = {
  map: ["/flows/map", "/map"],
  edge: ["/flows/map/edge", "/map/edge"],
  flows: ["/flows"],
  export: ["/flows/export"],
  impact: ["/policy/impact"],
  suggestions: ["/flows/suggestions"],
};

const found = {};
export async function route(name) {
  if (!(name in found)) found[name] = await api.findRoute("GET", ROUTES[name]);
  return found[name];
}

function clusterKeyOf(labels) { return labels.env || ""; }

function normNode(n) {
  const labels = { ...(n.labels || {}) };
  return { id: n.id, kind: String(n.kind || "app-group"), name: n.name || n.id, labels, workloads: n.workloads || [], clusterKey: clusterKeyOf(labels) };
}

function normEdge(e) {
  const mix = e.mix || { allowed: e.allowed || 0, "potentially-blocked": e.potentially_blocked || 0, blocked: e.blocked || 0 };
  return { src: e.src, dst: e.dst, connections: e.connections ?? 0, count: e.count ?? 0, mix: { ...mix }, services: e.services || [],
    encrypted: e.encrypted ?? 0 };
}

// ---- time windows -------------------------------------------------------------------------
/** {since} for a window name: "24h", "1h", "15m" or "version" (since the active version). */
export async function windowParams(name) {
  if (name === "version") {
    const v = (await api.get("/policy/versions", { limit: 1 })).items[0];
    return v ? { since: v.created_at } : {};
  }
  const minutes = { "15m": 15, "1h": 60, "24h": 1440 }[name];
  return minutes ? { since: new Date(Date.now() - minutes * 60000).toISOString() } : {};
}

// ---- addresses -> workloads -------------------------------------------------------------------
export async function addressBook() {
  const workloads = await api.listAll("/workloads");
  const byIp = new Map();
  for (const w of workloads) for (const i of w.body.interfaces || []) for (const a of i.addresses) byIp.set(a, w.name);
  return byIp;
}

// ---- the map ------------------------------------------------------------------------------------
/**
 * The map for ``view`` "reported" (what the hosts reported) or "draft" (the same connections,
 * those the draft decides differently from the active policy moved to the draft's verdict).
 */
export async function loadMap(view = "reported", windowName = "24h") {
  const path = await route("map");
  if (!path) return inventoryMap(view);
  const params = { keys: GROUP_KEYS.join(","), ...(await windowParams(windowName)) };
  const data = await api.get(path, params);
  const map = { nodes: (data.nodes || []).map(normNode), edges: (data.edges || []).map(normEdge), source: "api", view, changed: 0 };
  if (view === "draft") await applyDraft(map, params);
  return map;
}

async function applyDraft(map, params) {
  const impactPath = await route("impact");
  if (!impactPath) return;
  const [impact, byIp] = await Promise.all([api.get(impactPath, { since: params.since, limit: 10000 }), addressBook()]);
  const nodeOfWorkload = new Map();
  for (const n of map.nodes) for (const w of n.workloads) nodeOfWorkload.set(w, n.id);
  const edges = new Map(map.edges.map((e) => [`${e.src}\u0000${e.dst}`, e]));
  for (const item of impact.items || []) {
    const s = nodeOfWorkload.get(byIp.get(item.src));
    const d = nodeOfWorkload.get(byIp.get(item.dst));
    const e = s && d ? edges.get(`${s}\u0000${d}`) : null;
    if (!e) continue;
    const from = normVerdict(item.reported); const to = normVerdict(item.after);
    if (e.mix[from] > 0) { e.mix[from] -= 1; e.mix[to] = (e.mix[to] || 0) + 1; map.changed += 1; }
  }
}

async function inventoryMap(view) {
  const workloads = await api.listAll("/workloads");
  const groups = new Map();
  for (const w of workloads) {
    const values = GROUP_KEYS.map((k) => (w.body.labels || {})[k] || "");
    const id = `group:${GROUP_KEYS.map((k, i) => `${k}=${values[i]}`).join(",")}`;
    if (!groups.has(id)) {
      const labels = {};
      GROUP_KEYS.forEach((k, i) => { if (values[i]) labels[k] = values[i]; });
      groups.set(id, { id, kind: "app-group", name: values.map((v) => v || "-").join("/"), labels, workloads: [], clusterKey: clusterKeyOf(labels) });
    }
    groups.get(id).workloads.push(w.name);
  }
  return { nodes: [...groups.values()].sort((a, b) => a.id.localeCompare(b.id)), edges: [], source: "inventory", view, changed: 0 };
}

// ---- flows ----------------------------------------------------------------------------------------
function rulesOf(x) {
  const out = [];
  if (x.outbound) out.push({ side: "out", workload: x.outbound.workload, action: x.outbound.action, rule: x.outbound.rule_id, encrypted: Boolean(x.outbound.encrypted) });
  if (x.inbound) out.push({ side: "in", workload: x.inbound.workload, action: x.inbound.action, rule: x.inbound.rule_id, encrypted: Boolean(x.inbound.encrypted) });
  return out;
}

/** An explained connection (edge drill-down) -> flow. */
function explainedFlow(x) {
  return {
    id: "", src: x.flow.src.ip, dst: x.flow.dst.ip, srcName: x.flow.src.workload || "", dstName: x.flow.dst.workload || "",
    srcList: x.flow.src.ip_list || "", dstList: x.flow.dst.ip_list || "", service: x.flow.service,
    verdict: normVerdict(x.reported || x.verdict), active: normVerdict(x.verdict), draft: null,
    count: x.count, rules: rulesOf(x), encrypted: Boolean(x.encrypted), encryptedBy: x.encrypted_by || "",
  };
}

/** "Encrypted (WireGuard) by <rule>": what the policy says about an allowed connection. */
export function encryptedBadge(by = "") {
  return h("span", { class: "encrypted", "data-role": "encrypted" }, icon("lock"), " encrypted (WireGuard)",
    by ? h("span", { class: "muted" }, " by ") : null, by ? ruleLink(by) : null);
}

/** A recorded flow summary (Explorer) -> flow. */
function recordedFlow(f) {
  return {
    id: f.id, src: f.src.ip, dst: f.dst.ip, srcName: f.src.workload || "", dstName: f.dst.workload || "",
    srcList: f.src.ip_list || "", dstList: f.dst.ip_list || "",
    srcLabels: f.src.labels || {}, dstLabels: f.dst.labels || {}, service: f.service, verdict: normVerdict(f.verdict),
    active: null, draft: null, count: f.count, side: f.side, reporter: f.reporter,
    rules: [{ side: f.side === "in" || f.side === "inbound" ? "in" : "out", workload: f.reporter, action: "", rule: f.rule_id }],
    firstSeen: f.first_seen, lastSeen: f.last_seen,
  };
}

export async function queryFlows(params) {
  const path = await route("flows");
  if (!path) return null;
  const data = await api.get(path, params);
  return { items: (data.items || []).map(recordedFlow), next: data.next_cursor || null };
}

export async function exportHref(params) {
  const path = await route("export");
  if (!path) return null;
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== "") (Array.isArray(v) ? v : [v]).forEach((x) => q.append(k, x));
  return `${api.BASE}${path}${q.toString() ? `?${q}` : ""}`;
}

export async function explainFlow(id) {
  return explainedFlow(await api.get(`/flows/${api.enc(id)}/explain`));
}

/** The connections behind an edge, each with the active policy's deciding rules (and the draft's verdict). */
export async function edgeFlows(edge, view, windowName) {
  const path = await route("edge");
  if (!path) return null;
  const params = { src: edge.src, dst: edge.dst, keys: GROUP_KEYS.join(","), ...(await windowParams(windowName)) };
  const flows = (await api.get(path, params)).map(explainedFlow);
  if (view === "draft") {
    const impactPath = await route("impact");
    if (impactPath) {
      const impact = await api.get(impactPath, { since: params.since, limit: 10000 });
      const after = new Map((impact.items || []).map((i) => [`${i.src} ${i.dst} ${i.service}`, i]));
      for (const f of flows) {
        const i = after.get(`${f.src} ${f.dst} ${f.service}`);
        f.draft = i ? normVerdict(i.after) : f.active; // no impact item: the draft decides as the active policy
        f.draftRules = i ? i.after_rules : null;
      }
    }
  }
  return flows;
}

/**
 * A rule id in words, numbered from 1 as the editor shows rules ("ruleset shop-prod rule 1" for
 * the stored id ruleset/shop-prod/0); the same words as the CLI and the API's impact texts.
 */
export function ruleTitle(ruleId) {
  const m = /^ruleset\/(.+)\/(\d+)$/.exec(ruleId || "");
  if (m) return `ruleset ${m[1]} rule ${Number(m[2]) + 1}`;
  const d = /^deny\/(.+)$/.exec(ruleId || "");
  if (d) return `deny rule ${d[1]}`;
  if (ruleId === "default") return "default (no rule matched: the mode's default)";
  const f = /^failsafe:(.+)$/.exec(ruleId || "");
  if (f) return `the failsafe (${f[1]})`;
  return ruleId || "—";
}

export function ruleLink(ruleId) {
  const m = /^ruleset\/([^/]+)\/(\d+)$/.exec(ruleId || "");
  if (m) return h("a", { href: `#/rulesets/${encodeURIComponent(m[1])}`, class: "mono" }, ruleTitle(ruleId));
  const d = /^deny\/(.+)$/.exec(ruleId || "");
  if (d) return h("a", { href: `#/deny-rules/${encodeURIComponent(d[1])}`, class: "mono" }, `deny rule ${d[1]}`);
  return h("span", { class: "mono" }, ruleTitle(ruleId));
}

function rulesCell(f) {
  if (!f.rules || !f.rules.length) return h("span", { class: "muted" }, "—");
  return h("ul", { class: "plain" }, f.rules.map((r) => h("li", {}, h("span", { class: "muted" }, r.side === "out" ? "at source: " : "at destination: "),
    ruleLink(r.rule), r.action ? h("span", { class: "muted" }, ` (${r.action}${r.encrypted ? ", encrypted" : ""})`) : null)));
}

/** A workload (linked), or the IP list an unmanaged address falls in, then the address. */
function endpointCell(name, ip, list = "") {
  return h("span", {},
    name ? h("a", { href: `#/workloads/${encodeURIComponent(name)}` }, name) : list ? ipListChip(list) : null,
    name || list ? " " : null, h("span", { class: "mono muted" }, ip));
}

/** Flows as a table: reported verdict, the active policy's (and the draft's) with the deciding rules. */
export function flowsTable(flows, { draft = false, explorer = false, onExplain } = {}) {
  return table([
    { title: "From", cell: (f) => endpointCell(f.srcName, f.src, f.srcList) },
    { title: "To", cell: (f) => endpointCell(f.dstName, f.dst, f.dstList) },
    { title: "Service", cell: (f) => h("span", { class: "mono" }, f.service) },
    { title: "Reported", cell: (f) => verdictBadge(f.verdict) },
    explorer ? null : { title: "Active policy", cell: (f) => (f.active ? h("span", {}, verdictBadge(f.active), f.encrypted ? " " : null, f.encrypted ? encryptedBadge() : null) : "—") },
    draft ? { title: "Draft", cell: (f) => (f.draft ? verdictBadge(f.draft) : "—") } : null,
    { title: explorer ? "Rule (as reported)" : "Deciding rules (active policy)", cell: rulesCell },
    { title: "Seen", class: "num", cell: (f) => String(f.count) },
    explorer ? { title: "Last seen", cell: (f) => formatTime(f.lastSeen) } : null,
    onExplain ? { title: "", cell: (f) => h("button", { type: "button", "aria-label": `Why? Explain the flow from ${f.srcName || f.src} to ${f.dstName || f.dst} on ${f.service}`, onclick: () => onExplain(f) }, "Why?") } : null,
  ].filter(Boolean), flows, { caption: "Flows", empty: "No recorded flow." });
}

// ---- impact preview ---------------------------------------------------------------------------------
export async function loadImpact() {
  const path = await route("impact");
  if (!path) return null;
  const [impact, byIp] = await Promise.all([api.get(path, { limit: 500 }), addressBook()]);
  impact.items = (impact.items || []).map((i) => ({ ...i, srcName: byIp.get(i.src) || "", dstName: byIp.get(i.dst) || "" }));
  return impact;
}

export function impactView(impact) {
  const changeText = { "newly-blocked": "newly blocked", "newly-potentially-blocked": "newly potentially blocked", "newly-allowed": "newly allowed", "no-longer-blocked": "no longer blocked" };
  return h("div", { "data-role": "impact" },
    h("p", {}, `${impact.evaluated} recorded connection${impact.evaluated === 1 ? "" : "s"} replayed through the draft (since ${formatTime(impact.since)}).`),
    h("p", { class: "verdict-mix", "data-role": "impact-summary" },
      verdictBadge("blocked", `newly blocked: ${impact.newly_blocked}`),
      verdictBadge("potentially-blocked", `newly potentially blocked: ${impact.newly_potentially_blocked}`),
      verdictBadge("allowed", `newly allowed: ${impact.newly_allowed}`),
      impact.no_longer_blocked ? verdictBadge("potentially-blocked", `no longer blocked: ${impact.no_longer_blocked}`) : null),
    impactWords(impact),
    table([
      { title: "Change", cell: (i) => h("strong", {}, changeText[i.change] || i.change) },
      { title: "From", cell: (i) => endpointCell(i.srcName, i.src) },
      { title: "To", cell: (i) => endpointCell(i.dstName, i.dst) },
      { title: "Service", cell: (i) => h("span", { class: "mono" }, i.service) },
      { title: "Now", cell: (i) => verdictBadge(i.before) },
      { title: "With the draft", cell: (i) => verdictBadge(i.after) },
      { title: "Deciding rules with the draft", cell: (i) => h("ul", { class: "plain" }, (i.after_rules || []).map((r) => {
        const [workload, action, ...rest] = r.split(":");
        return h("li", {}, h("span", { class: "muted" }, `${workload} ${action}: `), ruleLink(rest.join(":")));
      })) },
      { title: "Seen", class: "num", cell: (i) => String(i.count) },
    ], impact.items, { caption: "Impact preview", empty: "No recorded connection changes verdict with this draft." }));
}

/**
 * What the draft changes, in words, both ways: recorded connections newly blocked or newly
 * allowed, and allow rules that reach more workloads ("ruleset billing rule 1 now reaches ...").
 */
export function impactWords(impact) {
  const blocked = (impact.items || []).filter((i) => i.change === "newly-blocked" || i.change === "newly-potentially-blocked");
  const allowed = (impact.items || []).filter((i) => i.change === "newly-allowed" || i.change === "no-longer-blocked");
  const widened = impact.widened || [];
  const list = (role, title, lines) => (lines.length
    ? h("section", { "data-role": role }, h("h3", {}, title), h("ul", {}, lines.map((t) => h("li", {}, t))))
    : null);
  return h("div", { class: "impact-words", "data-role": "impact-words" },
    list("impact-blocked", "Newly blocked", blocked.map((i) => i.sentence)),
    list("impact-allowed", "Newly allowed (widening)", allowed.map((i) => i.sentence)),
    list("impact-widened", "Rules reaching more workloads (widening)", widened.map((w) => w.sentence + (w.needs_confirmation ? "" : " (confined by the ruleset's scope)"))),
    !blocked.length && !allowed.length && !widened.length ? h("p", { class: "muted" }, "The draft neither blocks nor widens anything recorded.") : null);
}

// ---- suggestions -------------------------------------------------------------------------------------
export async function loadSuggestions(node) {
  const path = await route("suggestions");
  if (!path || node.kind !== "app-group") return null;
  const group = Object.entries(node.labels).map(([k, v]) => `${k}=${v}`).join(",");
  if (!group) return null;
  return { group, data: await api.get(path, { group, keys: GROUP_KEYS.join(",") }) };
}

export async function acceptSuggestions(group, ruleIds) {
  return api.post("/flows/suggestions/accept", { group, keys: GROUP_KEYS.join(","), rules: ruleIds });
}
