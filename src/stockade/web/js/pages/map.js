// The application map: app groups and their observed connections, "reported" (what the hosts
// decided) or "draft" (how the draft would decide each flow). Click a group for its workloads,
// an edge for its flows and the deciding rule. Reloads itself when the inventory or policy
// changes (it watches the audit event feed), keeping every group where it was.

import { h, add, icon, replace, announce, table } from "../dom.js";
import * as api from "../api.js";
import { labelChips } from "../labels.js";
import { MapView } from "../mapview.js";
import { loadMap, edgeFlows, flowsTable, canShowDraft } from "../visibility.js";
import { VERDICTS, verdictBadge, mixBadges, mixWorst } from "../verdicts.js";

const POLL_MS = 700;

export async function render(view, ctx) {
  let current = ctx.query.get("view") === "draft" ? "draft" : "reported";
  const draftOk = await canShowDraft();
  const side = h("aside", { class: "panel map-side", "aria-labelledby": "side-h", "aria-live": "polite" },
    h("h2", { id: "side-h" }, "Details"), h("p", { class: "muted" }, "Select a group or a connection."));
  const notice = h("div", {});
  const wrap = h("div", { class: "map-wrap" });
  const status = h("span", { class: "muted", role: "status", "data-role": "map-status" });
  const seg = h("div", { class: "seg", role: "group", "aria-label": "Decisions shown" },
    ["reported", "draft"].map((v) => h("button", { type: "button", "aria-pressed": String(v === current), "data-view": v, disabled: v === "draft" && !draftOk,
      title: v === "draft" && !draftOk ? "Needs the visibility API" : null,
      onclick: () => { current = v; seg.querySelectorAll("button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.view === v))); refresh(true); } },
    v === "reported" ? "Reported" : "Draft")));
  const controls = h("div", { class: "map-controls" },
    h("button", { type: "button", class: "icon-only", "aria-label": "Zoom in", onclick: () => mv.zoom(1.25) }, "+"),
    h("button", { type: "button", class: "icon-only", "aria-label": "Zoom out", onclick: () => mv.zoom(0.8) }, "−"),
    h("button", { type: "button", class: "icon-only", "aria-label": "Fit to screen", onclick: () => mv.fit() }, "⤢"));
  const edgeTable = h("details", { class: "panel" }, h("summary", {}, "All connections as a table"));
  add(view, 
    h("div", { class: "page-head" }, h("h1", {}, "Application map"),
      h("div", { class: "actions" }, h("span", { class: "muted" }, "Decisions:"), seg)),
    h("div", { class: "map-legend", "aria-label": "Legend" }, VERDICTS.map((v) => h("span", {}, h("span", { class: ["legend-line", `v-${v}`], "aria-hidden": "true" }), " ", verdictBadge(v))), status),
    notice,
    h("div", { class: "map-layout" }, wrap, side),
    edgeTable);
  wrap.append(controls);

  const showNode = (n) => {
    if (!n) return;
    const edges = lastMap.edges.filter((e) => e.src === n.id || e.dst === n.id);
    replace(side, h("h2", { id: "side-h" }, icon(n.kind === "app-group" ? "app" : "iplist"), " ", n.name),
      labelChips(n.labels, { empty: n.kind === "app-group" ? "no grouping labels" : "unmanaged addresses" }),
      n.kind === "app-group" ? h("p", {}, h("a", { href: `#/workloads?labels=${encodeURIComponent(Object.entries(n.labels).map(([k, v]) => `${k}=${v}`).join(","))}` }, "Open in workloads →")) : null,
      h("h3", {}, `Workloads (${(n.workloads || []).length})`),
      (n.workloads || []).length ? h("ul", { "data-role": "group-workloads" }, n.workloads.slice(0, 300).map((w) => h("li", {}, h("a", { href: `#/workloads/${encodeURIComponent(w)}` }, w)))) : h("p", { class: "muted" }, "—"),
      h("h3", {}, `Connections (${edges.length})`),
      edges.length ? h("ul", {}, edges.slice(0, 200).map((e) => h("li", {},
        h("button", { type: "button", class: "link", onclick: () => mv.selectEdge(e) }, `${mv.nodeName(e.src)} → ${mv.nodeName(e.dst)}`), " ", verdictBadge(mixWorst(e.mix))))) : h("p", { class: "muted" }, "No recorded connection."));
  };

  const showEdge = async (e) => {
    const flowsBox = h("div", { "data-role": "edge-flows" }, h("p", { class: "muted" }, "Loading flows…"));
    replace(side, h("h2", { id: "side-h" }, `${mv.nodeName(e.src)} → ${mv.nodeName(e.dst)}`),
      h("p", {}, mixBadges(e.mix)),
      h("p", {}, "Services: ", h("span", { class: "mono" }, (e.services || []).join(", ") || "—")),
      h("p", { class: "muted" }, `${e.connections} distinct connection${e.connections === 1 ? "" : "s"}, seen ${e.count} times. ${current === "draft" ? "Verdicts as the draft would decide." : "Verdicts as the hosts reported."}`),
      h("h3", {}, "Flows and deciding rules"), flowsBox);
    try {
      const flows = await edgeFlows(e, current);
      replace(flowsBox, flows ? flowsTable(flows, { showDraft: current === "draft" }) : h("p", { class: "muted" }, "Flow drill-down needs the visibility API."));
    } catch (err) { replace(flowsBox, h("p", { class: "notice error" }, err.message)); }
  };

  const mv = new MapView(wrap, { onSelectNode: showNode, onSelectEdge: showEdge });
  let lastMap = { nodes: [], edges: [] };
  let loading = false;
  const refresh = async (announceIt = false) => {
    if (loading) return;
    loading = true;
    try {
      const map = await loadMap(current);
      if (!ctx.isCurrent()) return;
      lastMap = map;
      mv.render(map);
      wrap.dataset.view = map.view;
      wrap.dataset.source = map.source;
      status.textContent = `${map.nodes.length} groups, ${map.edges.length} connections`;
      replace(notice, map.source === "inventory"
        ? h("p", { class: "notice" }, "No traffic yet: this controller does not serve the visibility API, so the map shows the app groups from the inventory only.")
        : null);
      replace(edgeTable, h("summary", {}, "All connections as a table"),
        table([
          { title: "From", cell: (e) => mv.nodeName(e.src) },
          { title: "To", cell: (e) => mv.nodeName(e.dst) },
          { title: "Verdicts", cell: (e) => mixBadges(e.mix) },
          { title: "Services", cell: (e) => h("span", { class: "mono" }, (e.services || []).slice(0, 6).join(", ")) },
          { title: "", cell: (e) => h("button", { type: "button", onclick: () => { mv.selectEdge(e); side.scrollIntoView(); } }, "Details") },
        ], [...map.edges].sort((a, b) => b.count - a.count).slice(0, 300), { caption: "Connections", empty: "No connection recorded." }));
      if (announceIt) announce(`Map: ${current} view, ${map.nodes.length} groups`);
      const focus = ctx.query.get("focus");
      if (focus && !mv.focused) {
        const n = map.nodes.find((x) => (x.workloads || []).includes(focus));
        if (n) { mv.selectNode(n.id); mv.centerOn(n.id); }
        mv.focused = true;
      }
    } finally { loading = false; }
  };
  await refresh();

  // watch the audit feed: any change (relabel, provision, new workload) reloads the map
  let head = null;
  try { head = ((await api.get("/events", { limit: 1 })).items[0] || {}).id ?? null; } catch (_e) { head = null; }
  let stopped = false;
  const poll = async () => {
    if (stopped || !ctx.isCurrent()) return;
    try {
      const top = ((await api.get("/events", { limit: 1 })).items[0] || {}).id ?? null;
      if (top !== head) { head = top; await refresh(); }
    } catch (_e) { /* keep polling */ }
    if (!stopped) timer = window.setTimeout(poll, POLL_MS);
  };
  let timer = window.setTimeout(poll, POLL_MS);
  ctx.onLeave(() => { stopped = true; window.clearTimeout(timer); });
}
