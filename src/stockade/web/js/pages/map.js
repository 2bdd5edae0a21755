// The application map: app groups and their observed connections, "reported" (what the hosts
// decided) or "draft" (how the draft would decide them). Click a group for its workloads and
// rule suggestions, an edge for its flows and the deciding rules. A time window narrows the
// traffic (e.g. "since the active version", to see what changed after a provision). The map
// reloads itself when the inventory or policy changes (it watches the audit event feed),
// keeping every group where it was. A connection's flows and deciding rules open in a
// full-width panel under the map (a wide table, never clipped by the side panel). The map
// announces when it is ready for the keyboard: data-ready="true" and aria-busy="false" on
// svg.map once the first drawing is done and every handler is attached.

import { h, add, icon, replace, announce, table, uid, toast } from "../dom.js";
import * as api from "../api.js";
import { labelChips, selectorList, serviceChip } from "../labels.js";
import { MapView } from "../mapview.js";
import { loadMap, edgeFlows, flowsTable, route, loadSuggestions, acceptSuggestions, encryptedBadge } from "../visibility.js";
import { VERDICTS, verdictBadge, mixBadges, mixWorst } from "../verdicts.js";
import { invalidate } from "../refdata.js";

const POLL_MS = 700;
const WINDOWS = [["24h", "Last 24 hours"], ["1h", "Last hour"], ["15m", "Last 15 minutes"], ["version", "Since the active version"]];

export async function render(view, ctx) {
  let current = ctx.query.get("view") === "draft" ? "draft" : "reported";
  let windowName = WINDOWS.some(([w]) => w === ctx.query.get("window")) ? ctx.query.get("window") : "24h";
  const hasFlows = Boolean(await route("map"));
  const draftOk = Boolean(await route("impact"));
  const side = h("aside", { class: "panel map-side", "aria-labelledby": "side-h" },
    h("h2", { id: "side-h" }, "Details"), h("p", { class: "muted" }, "Select a group or a connection (Tab to a group or a connection, Enter to open it)."));
  const edgeDetail = h("section", { class: "panel edge-detail", "aria-labelledby": "edge-detail-h", hidden: true });
  const notice = h("div", {});
  const wrap = h("div", { class: "map-wrap" });
  const status = h("span", { class: "muted", role: "status", "data-role": "map-status" });
  const setUrl = () => {
    const q = new URLSearchParams();
    if (current !== "reported") q.set("view", current);
    if (windowName !== "24h") q.set("window", windowName);
    window.history.replaceState(null, "", `#/map${q.toString() ? `?${q}` : ""}`);
  };
  const seg = h("div", { class: "seg", role: "group", "aria-label": "Decisions shown" },
    ["reported", "draft"].map((v) => h("button", {
      type: "button", "aria-pressed": String(v === current), "data-view": v, disabled: v === "draft" && !draftOk,
      title: v === "draft" ? "How the draft would decide the recorded connections" : "What the hosts reported",
      onclick: () => { current = v; seg.querySelectorAll("button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.view === v))); setUrl(); refresh(true); },
    }, v === "reported" ? "Reported" : "Draft")));
  const windowId = uid("f");
  const windowSel = h("select", { id: windowId, disabled: !hasFlows }, WINDOWS.map(([w, t]) => h("option", { value: w, selected: w === windowName }, t)));
  windowSel.addEventListener("change", () => { windowName = windowSel.value; setUrl(); refresh(true); });
  const controls = h("div", { class: "map-controls" },
    h("button", { type: "button", class: "icon-only", "aria-label": "Zoom in", title: "Zoom in (+)", onclick: () => mv.zoom(1.25) }, "+"),
    h("button", { type: "button", class: "icon-only", "aria-label": "Zoom out", title: "Zoom out (−)", onclick: () => mv.zoom(0.8) }, "−"),
    h("button", { type: "button", class: "icon-only", "aria-label": "Fit to screen", title: "Fit (0)", onclick: () => mv.fit() }, "⤢"));
  const edgeTable = h("details", { class: "panel" }, h("summary", {}, "All connections as a table"));
  add(view,
    h("div", { class: "page-head" }, h("h1", {}, "Application map"),
      h("div", { class: "actions" },
        h("span", { class: "window-select" }, h("label", { for: windowId }, "Traffic:"), windowSel),
        h("span", { class: "muted" }, "Decisions:"), seg)),
    h("div", { class: "map-legend", role: "group", "aria-label": "Legend: show or hide the connections of each verdict" },
      VERDICTS.map((v) => h("button", { type: "button", class: "legend-toggle", "aria-pressed": "true", "data-toggle": v,
        title: "Show or hide these connections",
        onclick: (e) => {
          const b = e.currentTarget;
          const shown = b.getAttribute("aria-pressed") !== "true";
          b.setAttribute("aria-pressed", String(shown));
          mv.svg.classList.toggle(`hide-${v}`, !shown);
          announce(`${v.replace("-", " ")} connections ${shown ? "shown" : "hidden"}`);
        } }, h("span", { class: ["legend-line", `v-${v}`], "aria-hidden": "true" }), " ", verdictBadge(v))), status),
    notice,
    h("div", { class: "map-layout" }, wrap, side),
    edgeDetail,
    edgeTable);
  wrap.append(controls);

  // ---- side panel ----
  const showNode = (n) => {
    if (!n) return;
    const edges = lastMap.edges.filter((e) => e.src === n.id || e.dst === n.id);
    const suggestBox = h("div", { "data-role": "suggestions" });
    const labelsQuery = Object.entries(n.labels).map(([k, v]) => `${k}=${v}`).join(",");
    replace(side, h("h2", { id: "side-h" }, icon(n.kind === "app-group" ? "app" : "iplist"), " ", n.name),
      labelChips(n.labels, { empty: n.kind === "app-group" ? "no grouping labels" : "unmanaged addresses" }),
      n.kind === "app-group" && labelsQuery ? h("p", {}, h("a", { href: `#/workloads?labels=${encodeURIComponent(labelsQuery)}` }, "Open in workloads →")) : null,
      h("h3", {}, `Workloads (${(n.workloads || []).length})`),
      (n.workloads || []).length ? h("ul", { "data-role": "group-workloads" }, n.workloads.slice(0, 300).map((w) => h("li", {}, h("a", { href: `#/workloads/${encodeURIComponent(w)}` }, w)))) : h("p", { class: "muted" }, "—"),
      h("h3", {}, `Connections (${edges.length})`),
      edges.length ? h("ul", { class: "plain" }, edges.slice(0, 200).map((e) => h("li", {},
        h("button", { type: "button", class: "link", onclick: () => mv.selectEdge(e) }, `${mv.nodeName(e.src)} → ${mv.nodeName(e.dst)}`), " ", verdictBadge(mixWorst(e.mix))))) : h("p", { class: "muted" }, "No recorded connection."),
      suggestBox);
    if (n.kind === "app-group" && hasFlows && labelsQuery) {
      suggestBox.append(h("button", { type: "button", onclick: () => showSuggestions(n, suggestBox) }, "Suggest rules from this traffic"));
    }
  };

  const showSuggestions = async (n, box) => {
    replace(box, h("p", { class: "muted" }, "Looking at the observed traffic…"));
    try {
      const res = await loadSuggestions(n);
      if (!res) { replace(box); return; }
      const s = res.data;
      if (!s.rules.length) {
        replace(box, h("h3", {}, "Suggested rules"), h("p", { class: "muted" }, `Nothing to suggest: ${s.already_allowed} of ${s.considered} connections are already allowed by the draft.`));
        return;
      }
      const checks = s.rules.map((r, i) => h("input", { type: "checkbox", checked: true, value: r.id, "aria-label": `Accept suggested rule ${i + 1}` }));
      const acceptBtn = h("button", { type: "button", class: "primary", onclick: async () => {
        const ids = checks.filter((c) => c.checked).map((c) => c.value);
        if (!ids.length) return;
        try {
          const out = await acceptSuggestions(res.group, ids);
          invalidate();
          replace(box, h("p", { class: "notice" }, `${out.rules} rule${out.rules === 1 ? "" : "s"} added to the draft in ruleset `,
            h("a", { href: `#/rulesets/${encodeURIComponent(out.ruleset)}` }, out.ruleset), ". ", h("a", { href: "#/policy" }, "Review and provision →")));
        } catch (err) { toast(err.message, "error", 9000); }
      } }, "Add the chosen rules to the draft");
      replace(box, h("h3", {}, "Suggested rules"),
        h("p", { class: "muted" }, `From ${s.considered} observed connections (${s.already_allowed} already allowed). Scope: `, selectorList([s.scope])),
        h("ul", { class: "plain" }, s.rules.map((r, i) => h("li", { class: "rule-card" },
          h("label", { class: "check" }, checks[i], h("strong", {}, `Rule ${i + 1} `), h("span", { class: "rule-summary" }, selectorList(r.consumers), h("span", { class: "arrow" }, " → "), selectorList(r.providers), " on ", serviceChip(r.service, r.ports.join(", ")))),
          h("span", { class: "muted" }, `${r.connections} connection${r.connections === 1 ? "" : "s"}, seen ${r.count} times${r.consumers_scope === "global" ? "; consumers from anywhere" : ""}`)))),
        acceptBtn);
    } catch (err) { replace(box, h("p", { class: "notice error" }, err.message)); }
  };

  const showEdge = async (e) => {
    const flowsBox = h("div", { "data-role": "edge-flows" }, h("p", { class: "muted" }, "Loading flows…"));
    const title = `${mv.nodeName(e.src)} → ${mv.nodeName(e.dst)}`;
    replace(side, h("h2", { id: "side-h" }, title),
      h("p", { "data-role": "edge-verdict" }, verdictBadge(mixWorst(e.mix)), h("span", { class: "muted" }, " at worst")),
      h("p", { "data-role": "edge-mix" }, mixBadges(e.mix)),
      h("p", { "data-role": "edge-services" }, "Services: ", h("span", { class: "mono" }, (e.services || []).join(", ") || "—")),
      h("p", { class: "muted" }, `${e.connections} distinct connection${e.connections === 1 ? "" : "s"}, seen ${e.count} times. ${current === "draft" ? "Verdicts as the draft would decide them." : "Verdicts as the hosts reported them."}`),
      h("p", {}, h("a", { href: "#edge-detail-h", onclick: (ev) => { ev.preventDefault(); edgeDetail.scrollIntoView(); } }, "Flows and deciding rules, below the map ↓")));
    replace(edgeDetail, h("h2", { id: "edge-detail-h" }, `Flows and deciding rules: ${title}`), flowsBox);
    edgeDetail.hidden = false;
    try {
      const flows = await edgeFlows(e, current, windowName);
      replace(flowsBox, flows ? flowsTable(flows, { draft: current === "draft" }) : h("p", { class: "muted" }, "Flow drill-down needs the visibility API."));
      const enc = (flows || []).filter((f) => f.encrypted).length;
      if (enc) side.append(h("p", { "data-role": "edge-encrypted" }, encryptedBadge(),
        h("span", { class: "muted" }, ` ${enc} of ${flows.length} connection${flows.length === 1 ? "" : "s"}: the policy says encrypt`)));
    } catch (err) { replace(flowsBox, h("p", { class: "notice error" }, err.message)); }
  };

  const mv = new MapView(wrap, { onSelectNode: showNode, onSelectEdge: showEdge });
  let lastMap = { nodes: [], edges: [] };
  let loading = false;
  let again = false;
  const refresh = async (announceIt = false) => {
    if (loading) { again = true; return; }
    loading = true;
    mv.setBusy(true);
    try {
      const map = await loadMap(current, windowName);
      if (!ctx.isCurrent()) return;
      lastMap = map;
      mv.render(map);
      wrap.dataset.view = map.view;
      wrap.dataset.source = map.source;
      status.textContent = `${map.nodes.length} groups, ${map.edges.length} connections${map.view === "draft" ? `; the draft changes ${map.changed}` : ""}`;
      replace(notice, map.source === "inventory"
        ? h("p", { class: "notice" }, "No traffic: this controller does not serve the visibility API, so the map shows the app groups from the inventory only.")
        : map.view === "draft" ? h("p", { class: "notice" }, "Draft view: the recorded connections, with those the draft would decide differently from the active policy shown with the draft's verdict.") : null);
      replace(edgeTable, h("summary", {}, "All connections as a table"),
        table([
          { title: "From", cell: (e) => mv.nodeName(e.src) },
          { title: "To", cell: (e) => mv.nodeName(e.dst) },
          { title: "Verdicts", cell: (e) => mixBadges(e.mix) },
          { title: "Services", cell: (e) => h("span", { class: "mono" }, (e.services || []).slice(0, 6).join(", ")) },
          { title: "", cell: (e) => h("button", { type: "button", "aria-label": `Details of ${mv.nodeName(e.src)} to ${mv.nodeName(e.dst)}`, onclick: () => { mv.selectEdge(e); side.scrollIntoView(); } }, "Details") },
        ], [...map.edges].sort((a, b) => b.count - a.count).slice(0, 300), { caption: "Connections", empty: "No connection recorded." }));
      if (announceIt) announce(`Map: ${current} view, ${map.nodes.length} groups, ${map.edges.length} connections`);
      const focus = ctx.query.get("focus");
      if (focus && !mv.focused) {
        const n = map.nodes.find((x) => (x.workloads || []).includes(focus));
        if (n) { mv.selectNode(n.id); mv.centerOn(n.id); }
        mv.focused = true;
      }
    } finally {
      loading = false;
      if (!firstLoad) mv.setBusy(false);
      if (again) { again = false; refresh(); }
    }
  };
  let firstLoad = true;
  await refresh();

  // watch the audit feed: any change (relabel, provision, new workload) reloads the map;
  // with traffic, reload at least every 15 s for new flows
  let head = null;
  try { head = ((await api.get("/events", { limit: 1 })).items[0] || {}).id ?? null; } catch (_e) { head = null; }
  let stopped = false;
  let lastLoad = Date.now();
  let timer = 0;
  const poll = async () => {
    if (stopped || !ctx.isCurrent()) return;
    try {
      const top = ((await api.get("/events", { limit: 1 })).items[0] || {}).id ?? null;
      if (top !== head || (hasFlows && Date.now() - lastLoad > 15000)) { head = top; lastLoad = Date.now(); await refresh(); }
    } catch (_e) { /* keep polling */ }
    if (!stopped) timer = window.setTimeout(poll, POLL_MS);
  };
  timer = window.setTimeout(poll, POLL_MS);
  ctx.onLeave(() => { stopped = true; window.clearTimeout(timer); });
  // drawn, handlers attached, nothing left to wait for: the keyboard may drive the map now
  firstLoad = false;
  mv.setBusy(false);
}
