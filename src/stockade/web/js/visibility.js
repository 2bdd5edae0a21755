// The console's side of the visibility API (flows, application map, impact preview). The
// routes are discovered from the controller's OpenAPI document, so the pages work before that
// API exists (the map then shows the app groups from the inventory, without traffic) and pick it
// up as soon as the controller serves it. Everything is normalised here into one shape:
//   map:  {nodes: [{id, kind, name, labels, workloads, clusterKey}], edges: [{src, dst, connections, count, mix, services}], source}
//   flow: {src, dst, srcName, dstName, service, verdict, count, firstSeen, lastSeen, rule, inboundRule, outboundRule}

import { h, add, replace, table } from "./dom.js";
import * as api from "./api.js";
import { labelChips } from "./labels.js";
import { verdictBadge, normVerdict } from "./verdicts.js";

export const GROUP_KEYS = ["app", "env"];

const ROUTES = {
  map: ["/map", "/visibility/map", "/flows/map", "/app-map"],
  flows: ["/flows", "/visibility/flows"],
  flowsCsv: ["/flows.csv", "/flows/export", "/flows/csv", "/visibility/flows.csv"],
  impact: ["/policy/impact", "/impact", "/visibility/impact"],
  edge: ["/map/edge", "/map/edges", "/visibility/map/edge", "/flows/map/edge"],
};

const found = {};
export async function route(name) {
  if (!(name in found)) found[name] = await api.findRoute("GET", ROUTES[name]);
  return found[name];
}

export async function available() {
  return Boolean(await route("map")) || Boolean(await route("flows"));
}

// ---- labels in any of the shapes an API may use -------------------------------------
export function labelsObject(labels) {
  if (!labels) return {};
  if (Array.isArray(labels)) {
    const out = {};
    for (const l of labels) {
      if (typeof l === "string") { const [k, v] = l.split("="); out[k] = v; }
      else if (l && l.key) out[l.key] = l.value;
    }
    return out;
  }
  return { ...labels };
}

function clusterKeyOf(labels) { return labels.env || ""; }

function normNode(n) {
  const labels = labelsObject(n.labels);
  const kind = String(n.kind || "app-group").replace(/_/g, "-").toLowerCase();
  return { id: n.id, kind, name: n.name || n.id, labels, workloads: n.workloads || [], clusterKey: clusterKeyOf(labels) };
}

function normEdge(e) {
  return {
    src: e.src ?? e.source, dst: e.dst ?? e.target, connections: e.connections ?? 0, count: e.count ?? 0,
    mix: e.mix || e.verdicts || {}, services: e.services || [],
  };
}

// ---- the map -------------------------------------------------------------------------
/** Params of the map route that select the draft view, from its OpenAPI parameters. */
async function draftParam(path) {
  const op = await api.operation("GET", path);
  const names = (op && op.parameters ? op.parameters : []).map((p) => p.name);
  for (const n of ["policy", "view", "version", "decide_with", "against"]) if (names.includes(n)) return n;
  return null;
}

export async function canShowDraft() {
  const path = await route("map");
  return Boolean(path && (await draftParam(path)));
}

/** The map for view "reported" or "draft"; falls back to app groups from the inventory. */
export async function loadMap(view = "reported") {
  const path = await route("map");
  if (path) {
    const params = {};
    if (view === "draft") {
      const p = await draftParam(path);
      if (p) params[p] = "draft";
    }
    const data = await api.get(path, params);
    return { nodes: (data.nodes || []).map(normNode), edges: (data.edges || []).map(normEdge), source: "api", view };
  }
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
  return { nodes: [...groups.values()].sort((a, b) => a.id.localeCompare(b.id)), edges: [], source: "inventory", view };
}

// ---- flows -----------------------------------------------------------------------------
function normFlow(f) {
  const key = f.key || f;
  const src = f.src || {};
  const dst = f.dst || {};
  const proto = key.proto || f.proto;
  const port = key.port ?? f.port;
  const service = f.service || (proto ? (port == null ? proto : /icmp/.test(proto) ? `${proto}:${port}` : `${port}/${proto}`) : "");
  const side = (x) => (x ? (x.rule_id || x.rule || "") : "");
  return {
    src: typeof src === "string" ? src : (src.address || src.ip || key.src || f.src_ip || ""),
    dst: typeof dst === "string" ? dst : (dst.address || dst.ip || key.dst || f.dst_ip || ""),
    srcName: f.src_workload || (src && src.name) || "",
    dstName: f.dst_workload || (dst && dst.name) || "",
    srcLabels: labelsObject(f.src_labels || (src && src.labels)),
    dstLabels: labelsObject(f.dst_labels || (dst && dst.labels)),
    service,
    verdict: normVerdict(f.verdict),
    draftVerdict: f.draft_verdict ? normVerdict(f.draft_verdict) : null,
    count: f.count ?? 0,
    firstSeen: f.first_seen || "", lastSeen: f.last_seen || "",
    rule: f.rule_id || f.rule || "",
    outboundRule: side(f.outbound), inboundRule: side(f.inbound),
  };
}

export async function queryFlows(params) {
  const path = await route("flows");
  if (!path) return null;
  const data = await api.get(path, params);
  const items = Array.isArray(data) ? data : (data.items || data.flows || []);
  return { items: items.map(normFlow), next: data.next_cursor || null, raw: data };
}

export async function edgeFlows(edge, view) {
  const path = await route("edge");
  if (path) {
    const data = await api.get(path, { src: edge.src, dst: edge.dst, view: view === "draft" ? "draft" : undefined });
    const items = Array.isArray(data) ? data : (data.items || data.connections || []);
    return items.map(normFlow);
  }
  const res = await queryFlows({ src_node: edge.src, dst_node: edge.dst, limit: 200 });
  return res ? res.items : null;
}

export function flowsTable(flows, { showDraft = false } = {}) {
  return table([
    { title: "From", cell: (f) => h("span", {}, f.srcName ? h("a", { href: `#/workloads/${encodeURIComponent(f.srcName)}` }, f.srcName) : "", " ", h("span", { class: "mono muted" }, f.src)) },
    { title: "To", cell: (f) => h("span", {}, f.dstName ? h("a", { href: `#/workloads/${encodeURIComponent(f.dstName)}` }, f.dstName) : "", " ", h("span", { class: "mono muted" }, f.dst)) },
    { title: "Service", cell: (f) => h("span", { class: "mono" }, f.service) },
    { title: "Verdict", cell: (f) => verdictBadge(f.verdict) },
    showDraft ? { title: "Draft", cell: (f) => (f.draftVerdict ? verdictBadge(f.draftVerdict) : "—") } : null,
    { title: "Deciding rule", cell: (f) => h("span", { class: "mono" }, [f.outboundRule && `out: ${f.outboundRule}`, f.inboundRule && `in: ${f.inboundRule}`, !f.outboundRule && !f.inboundRule && f.rule].filter(Boolean).join(" · ") || "—") },
    { title: "Seen", class: "num", cell: (f) => String(f.count) },
  ].filter(Boolean), flows, { caption: "Flows", empty: "No recorded flow." });
}

// ---- impact preview --------------------------------------------------------------------
export async function impactPanel(box, { changes }) {
  const path = await route("impact");
  if (!path) {
    add(box, h("p", { class: "notice" }, "The impact preview replays recorded flows through the draft. This controller does not serve the visibility API yet, so no flows can be replayed; review the changes above."));
    return;
  }
  const status = h("p", { class: "muted", role: "status" }, "Replaying recorded flows through the draft…");
  add(box, status);
  const data = await api.get(path);
  const items = (data.items || data.changes || []).map((i) => ({ ...normFlow(i.connection || i.flow || i), change: i.change || i.kind, before: normVerdict(i.before?.verdict || i.before), after: normVerdict(i.after?.verdict || i.after), afterRule: i.after?.inbound?.rule_id || i.after?.outbound?.rule_id || "" }));
  const evaluated = data.evaluated ?? data.replayed ?? "?";
  const counts = {};
  for (const i of items) counts[i.change] = (counts[i.change] || 0) + 1;
  replace(status, `${evaluated} recorded connection${evaluated === 1 ? "" : "s"} replayed; ${items.length} would change.`);
  add(box, 
    h("p", { class: "verdict-mix", "data-role": "impact-summary" },
      verdictBadge("blocked", `newly blocked: ${counts["newly-blocked"] || 0}`),
      verdictBadge("potentially-blocked", `newly potentially blocked: ${counts["newly-potentially-blocked"] || 0}`),
      verdictBadge("allowed", `newly allowed: ${counts["newly-allowed"] || 0}`)),
    table([
      { title: "Change", cell: (i) => h("strong", {}, String(i.change || "").replace(/-/g, " ")) },
      { title: "From", cell: (i) => h("span", {}, i.srcName || i.src) },
      { title: "To", cell: (i) => h("span", {}, i.dstName || i.dst) },
      { title: "Service", cell: (i) => h("span", { class: "mono" }, i.service) },
      { title: "Now", cell: (i) => verdictBadge(i.before) },
      { title: "With the draft", cell: (i) => verdictBadge(i.after) },
      { title: "Seen", class: "num", cell: (i) => String(i.count) },
    ], items.slice(0, 500), { caption: "Impact preview", empty: "No recorded flow changes verdict with this draft." }));
  void changes; void labelChips;
}
