// The application map renderer (SVG): stable layout, pan and zoom, selection, keyboard.
// Nodes are app groups (and unmanaged peers), edges aggregate connections. An edge's line says
// its worst verdict by colour AND dash pattern (solid: allowed, dashed: potentially blocked,
// dotted: blocked); its label says every verdict with a count, each by icon shape, colour and
// number (3 allowed + 1 blocked shows both), and the services; a connection the policy encrypts
// (WireGuard) gets a lock in its label and a heavier line. Positions are remembered in this
// browser, so a group that appears never moves the others (not even after a reload).
// Keyboard: Tab reaches every group, then every connection label; on a group or a connection
// the arrow keys move to the previous/next one and Enter opens it; on the map itself arrows pan,
// + and - zoom, 0 fits. The map says when it is ready for keys (data-ready="true", aria-busy).

import { svg } from "./dom.js";
import { mixWorst, normMix, VERDICTS, VERDICT_TEXT } from "./verdicts.js";

const NODE_W = 150;
const NODE_H = 46;
const DENSE_EDGES = 120;

function hashString(s) {
  let x = 2166136261;
  for (let i = 0; i < s.length; i += 1) { x ^= s.charCodeAt(i); x = Math.imul(x, 16777619); }
  return (x >>> 0) / 4294967296;
}

/** Positions {id: [x, y]}: clusters by the second grouping label (env), then a force refinement. */
export function layout(nodes, edges, previous = new Map()) {
  const pos = new Map();
  const fresh = nodes.filter((n) => !previous.has(n.id));
  const clusterOf = (n) => (n.kind === "app-group" ? (n.clusterKey || "") : "~unmanaged");
  const clusters = [...new Set(fresh.map(clusterOf))].sort();
  const total = Math.max(nodes.length, 1);
  const R = 140 + 46 * Math.sqrt(total) * 2.2;
  clusters.forEach((c, ci) => {
    const members = fresh.filter((n) => clusterOf(n) === c).sort((a, b) => a.id.localeCompare(b.id));
    const angle = (2 * Math.PI * ci) / Math.max(clusters.length, 1) - Math.PI / 2;
    const cr = clusters.length > 1 ? R : 0;
    const cx = Math.cos(angle) * cr; const cy = Math.sin(angle) * cr;
    const r = 60 + 30 * Math.sqrt(members.length) * 2;
    members.forEach((n, i) => {
      const a = (2 * Math.PI * i) / Math.max(members.length, 1) + hashString(n.id) * 0.3;
      pos.set(n.id, [cx + Math.cos(a) * (members.length > 1 ? r : 0), cy + Math.sin(a) * (members.length > 1 ? r : 0)]);
    });
  });
  for (const n of nodes) if (previous.has(n.id)) pos.set(n.id, previous.get(n.id).slice());
  if (!fresh.length) return pos;
  // Fruchterman–Reingold refinement; nodes kept from before stay pinned (a stable picture)
  const ids = nodes.map((n) => n.id);
  const index = new Map(ids.map((id, i) => [id, i]));
  const pinned = ids.map((id) => previous.has(id));
  const xy = ids.map((id) => pos.get(id));
  const k = 210;
  const links = [];
  const seen = new Set();
  for (const e of edges) {
    const a = index.get(e.src); const b = index.get(e.dst);
    if (a === undefined || b === undefined || a === b) continue;
    const key = a < b ? `${a},${b}` : `${b},${a}`;
    if (seen.has(key)) continue;
    seen.add(key);
    links.push([a, b]);
  }
  const n = ids.length;
  const pull = 0.35 / Math.max(1, Math.sqrt(links.length / Math.max(n, 1)));
  const iterations = n > 400 ? 40 : 120;
  let temp = k * 1.5;
  const dx = new Float64Array(n); const dy = new Float64Array(n);
  for (let it = 0; it < iterations; it += 1) {
    dx.fill(0); dy.fill(0);
    for (let i = 0; i < n; i += 1) {
      for (let j = i + 1; j < n; j += 1) {
        let ddx = xy[i][0] - xy[j][0]; let ddy = xy[i][1] - xy[j][1];
        let d2 = ddx * ddx + ddy * ddy;
        if (d2 < 0.01) { ddx = 0.1 * (i - j); ddy = 0.1; d2 = ddx * ddx + ddy * ddy; }
        const f = (k * k) / d2;
        dx[i] += ddx * f; dy[i] += ddy * f; dx[j] -= ddx * f; dy[j] -= ddy * f;
      }
    }
    for (const [a, b] of links) {
      const ddx = xy[a][0] - xy[b][0]; const ddy = xy[a][1] - xy[b][1];
      const d = Math.sqrt(ddx * ddx + ddy * ddy) || 0.01;
      const f = (d * pull) / k;
      dx[a] -= ddx * f; dy[a] -= ddy * f; dx[b] += ddx * f; dy[b] += ddy * f;
    }
    for (let i = 0; i < n; i += 1) {
      if (pinned[i]) continue;
      dx[i] -= xy[i][0]; dy[i] -= xy[i][1]; // gravity
      const d = Math.sqrt(dx[i] * dx[i] + dy[i] * dy[i]) || 1;
      const step = Math.min(d, temp);
      xy[i][0] += (dx[i] / d) * step; xy[i][1] += (dy[i] / d) * step;
    }
    temp *= 0.95;
  }
  separate(xy, pinned);
  return pos;
}

/** Push overlapping node boxes apart (along the axis of least overlap) until none overlap. */
function separate(xy, pinned) {
  const gapX = NODE_W + 16; const gapY = NODE_H + 14;
  for (let round = 0; round < 60; round += 1) {
    let moved = false;
    for (let i = 0; i < xy.length; i += 1) {
      for (let j = i + 1; j < xy.length; j += 1) {
        const dx = xy[j][0] - xy[i][0]; const dy = xy[j][1] - xy[i][1];
        const ox = gapX - Math.abs(dx); const oy = gapY - Math.abs(dy);
        if (ox <= 0 || oy <= 0) continue;
        moved = true;
        const share = pinned[i] === pinned[j] ? 0.5 : 1;
        if (ox / gapX < oy / gapY) {
          const s = (dx >= 0 ? 1 : -1) * (ox + 0.5) * share;
          if (!pinned[j]) xy[j][0] += s;
          if (!pinned[i]) xy[i][0] -= s;
        } else {
          const s = (dy >= 0 ? 1 : -1) * (oy + 0.5) * share;
          if (!pinned[j]) xy[j][1] += s;
          if (!pinned[i]) xy[i][1] -= s;
        }
      }
    }
    if (!moved) break;
  }
}

function clipToBox(cx, cy, tx, ty, pad = 4) {
  const dx = tx - cx; const dy = ty - cy;
  const hw = NODE_W / 2 + pad; const hh = NODE_H / 2 + pad;
  const t = Math.min(dx ? hw / Math.abs(dx) : Infinity, dy ? hh / Math.abs(dy) : Infinity);
  return t >= 1 ? [tx, ty] : [cx + dx * t, cy + dy * t];
}

function truncate(text, max) { return text.length > max ? `${text.slice(0, max - 1)}…` : text; }

// ---- remembered positions: a group keeps its place across reloads ------------------------------
const POSITIONS_KEY = "stockade.map.positions";
const POSITIONS_MAX = 5000;

function loadPositions() {
  try {
    const raw = JSON.parse(window.localStorage.getItem(POSITIONS_KEY) || "{}");
    const out = new Map();
    for (const [id, p] of Object.entries(raw)) {
      if (Array.isArray(p) && p.length === 2 && p.every(Number.isFinite)) out.set(id, [p[0], p[1]]);
    }
    return out;
  } catch (_e) {
    return new Map();
  }
}

function savePositions(remembered) {
  const entries = [...remembered.entries()].slice(-POSITIONS_MAX); // insertion order: oldest dropped first
  try {
    window.localStorage.setItem(POSITIONS_KEY, JSON.stringify(Object.fromEntries(entries.map(([id, [x, y]]) => [id, [Math.round(x * 10) / 10, Math.round(y * 10) / 10]]))));
  } catch (_e) { /* storage full or disabled: positions then last for this page only */ }
}

const SYMBOL = { allowed: "allowed", "potentially-blocked": "potentially blocked", blocked: "blocked" };

/** "3 allowed, 1 blocked" for a mix. */
export function mixWords(mix) {
  const m = normMix(mix);
  return VERDICTS.filter((v) => m[v]).map((v) => `${m[v]} ${SYMBOL[v]}`).join(", ") || "no flows";
}

/** The services shown on an edge's label: the first two, then "+N". */
function servicesText(services) {
  const list = services || [];
  return list.length > 2 ? `${list.slice(0, 2).join(", ")} +${list.length - 2}` : list.join(", ");
}

/** The label's visible text ("3 1 22/tcp, 5432/tcp"): its accessible name starts with it (WCAG 2.5.3). */
function labelText(e) {
  const mix = normMix(e.mix);
  return [...VERDICTS.filter((v) => mix[v]).map((v) => String(mix[v])), servicesText(e.services)].filter(Boolean).join(" ");
}

/**
 * An edge's label: an icon, colour and count per verdict present, then its services. A dense map
 * gets the focusable shell only (its name says it all) and draws the inside when it is needed.
 */
function edgeLabel(e, key, name, mid, dense) {
  const g = svg("g", { class: ["edge-label", `v-${mixWorst(e.mix)}`], tabindex: "0", role: "button", "data-edge-label": key, "aria-label": name });
  g.labelData = { e, mid };
  if (!dense) drawLabel(g);
  return g;
}

function drawLabel(g) {
  if (g.firstChild || !g.labelData) return;
  const { e, mid: [x, y] } = g.labelData;
  const mix = normMix(e.mix);
  const parts = [];
  let w = 6;
  if (e.encrypted) { // a lock first: the policy sends (some of) these connections through WireGuard
    parts.push(svg("use", { href: "#i-lock", x: w, y: 3, width: 14, height: 14, class: "edge-lock", "data-role": "edge-lock" }));
    w += 18;
  }
  for (const v of VERDICTS) {
    if (!mix[v]) continue;
    const digits = String(mix[v]).length;
    parts.push(svg("g", { class: ["mix", `v-${v}`], "data-mix": v, transform: `translate(${w} 3)` },
      svg("use", { href: `#i-${v}`, width: 14, height: 14, class: "mix-icon" }),
      svg("text", { x: 17, y: 11.5 }, `${mix[v]} `))); // the space keeps the counts apart in the text content
    w += 17 + digits * 7 + 7;
  }
  const services = servicesText(e.services);
  if (services) {
    parts.push(svg("text", { x: w, y: 14.5, class: "edge-services" }, services));
    w += services.length * 6.1 + 6;
  }
  const width = Math.max(w, 20);
  g.setAttribute("transform", `translate(${(x - width / 2).toFixed(1)} ${(y - 10).toFixed(1)})`);
  g.append(svg("rect", { width: width.toFixed(1), height: 20, rx: 4, class: "edge-label-bg" }), ...parts);
}

export class MapView {
  constructor(container, { onSelectNode, onSelectEdge }) {
    this.container = container;
    this.onSelectNode = onSelectNode;
    this.onSelectEdge = onSelectEdge;
    this.positions = new Map();
    this.remembered = loadPositions();
    this.view = { x: 0, y: 0, k: 1 };
    this.selected = null;
    this.svg = svg("svg", { class: "map", role: "group", tabindex: "0", "aria-roledescription": "application map",
      "aria-label": "Application map. Tab to a group or a connection and press Enter to open it; on a group or a connection the arrows move to the next one; on the map arrows pan, plus and minus zoom, 0 fits.",
      "aria-busy": "true", "data-ready": "false" });
    const defs = svg("defs", {}, ["allowed", "potentially-blocked", "blocked", "unknown"].map((v) =>
      svg("marker", { id: `arrow-${v}`, viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse", class: `marker v-${v}` },
        svg("path", { d: "M0 0 10 5 0 10z", class: `arrow-${v}` }))));
    this.root = svg("g", { class: "viewport" });
    this.edgeLayer = svg("g", { class: "edges" });
    this.nodeLayer = svg("g", { class: "nodes" });
    this.labelLayer = svg("g", { class: "edge-labels" }); // after the groups: Tab reaches groups first
    this.root.append(this.edgeLayer, this.nodeLayer, this.labelLayer);
    this.svg.append(defs, this.root);
    container.append(this.svg);
    this.bindPanZoom();
  }

  /** Draw ``map`` ({nodes, edges}); nodes seen before (in this page or remembered) keep their place. */
  render(map) {
    const t0 = performance.now();
    this.map = map;
    const focusedKey = this.focusedKey();
    const previous = new Map(this.positions);
    for (const n of map.nodes) {
      // a remembered place (from another visit) taken by a group already placed: lay it out afresh
      const r = !previous.has(n.id) && this.remembered.get(n.id);
      if (r && ![...previous.values()].some(([x, y]) => Math.abs(x - r[0]) < NODE_W + 16 && Math.abs(y - r[1]) < NODE_H + 14)) previous.set(n.id, r);
    }
    this.positions = layout(map.nodes, map.edges, previous);
    let changed = false;
    for (const [id, p] of this.positions) {
      const r = this.remembered.get(id);
      if (!r || r[0] !== p[0] || r[1] !== p[1]) { this.remembered.delete(id); this.remembered.set(id, p.slice()); changed = true; }
    }
    if (changed) savePositions(this.remembered);
    const nodeFrag = document.createDocumentFragment();
    const edgeFrag = document.createDocumentFragment();
    const labelFrag = document.createDocumentFragment();
    this.nodeEls = new Map();
    this.edgeEls = [];
    const pairCount = new Set(map.edges.map((e) => `${e.src}\u0000${e.dst}`));
    const dense = map.edges.length > DENSE_EDGES;
    for (const e of map.edges) {
      const a = this.positions.get(e.src); const b = this.positions.get(e.dst);
      if (!a || !b) continue;
      const verdict = mixWorst(e.mix);
      let d;
      let mid;
      if (e.src === e.dst) {
        const [x, y] = a;
        d = `M${x + NODE_W / 2 - 20} ${y - NODE_H / 2} c 30 -50, 70 -10, 20 ${NODE_H / 2 + 4}`;
        mid = [x + NODE_W / 2 + 22, y - NODE_H / 2 - 26];
      } else {
        const mx = (a[0] + b[0]) / 2; const my = (a[1] + b[1]) / 2;
        const len = Math.hypot(b[0] - a[0], b[1] - a[1]) || 1;
        const bend = pairCount.has(`${e.dst}\u0000${e.src}`) ? 0.16 : 0.08;
        const cx = mx + ((b[1] - a[1]) / len) * len * bend; const cy = my - ((b[0] - a[0]) / len) * len * bend;
        const [sx, sy] = clipToBox(a[0], a[1], cx, cy);
        const [ex, ey] = clipToBox(b[0], b[1], cx, cy, 7);
        d = `M${sx.toFixed(1)} ${sy.toFixed(1)} Q${cx.toFixed(1)} ${cy.toFixed(1)} ${ex.toFixed(1)} ${ey.toFixed(1)}`;
        mid = [0.25 * sx + 0.5 * cx + 0.25 * ex, 0.25 * sy + 0.5 * cy + 0.25 * ey]; // the curve at t = 1/2
      }
      const words = mixWords(e.mix);
      const services = (e.services || []).join(", ");
      const encrypted = e.encrypted ? `; encrypted (WireGuard): ${e.encrypted} of ${e.connections} connection${e.connections === 1 ? "" : "s"}` : "";
      const title = `${this.nodeName(e.src)} → ${this.nodeName(e.dst)}: ${VERDICT_TEXT[verdict]} at worst (${words}); ${services || "no service"}${encrypted}`;
      const key = `${e.src}->${e.dst}`;
      const hit = svg("path", { d, class: ["edge-hit", `v-${verdict}`], "data-edge-hit": key });
      const line = svg("path", { d, class: ["edge", `v-${verdict}`, ...(e.encrypted ? ["encrypted"] : [])], "marker-end": `url(#arrow-${verdict})`,
        "data-edge": key, "data-verdict": verdict, ...(e.encrypted ? { "data-encrypted": String(e.encrypted) } : {}) },
        svg("title", {}, title));
      hit.append(svg("title", {}, title));
      hit.addEventListener("click", (ev) => { ev.stopPropagation(); this.selectEdge(e); });
      const label = edgeLabel(e, key, `${labelText(e)}: connection ${title}`, mid, dense);
      if (dense) label.addEventListener("focus", () => drawLabel(label));
      label.addEventListener("click", (ev) => { ev.stopPropagation(); this.selectEdge(e); });
      label.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); this.selectEdge(e); } });
      edgeFrag.append(hit, line);
      labelFrag.append(label);
      this.edgeEls.push({ edge: e, line, label, key });
    }
    for (const n of map.nodes) {
      const [x, y] = this.positions.get(n.id);
      const count = (n.workloads || []).length;
      const shown = truncate(n.name, 17);
      const sub = n.kind === "app-group" ? `${count} workload${count === 1 ? "" : "s"}` : n.kind === "ip-list" ? "IP list" : "unmanaged";
      const kind = n.kind === "app-group" ? "app group" : n.kind === "ip-list" ? "IP list" : "internet";
      // the accessible name starts with the visible text (WCAG 2.5.3), then says what it is
      const name = `${shown} ${sub}${shown !== n.name ? `, ${n.name}` : ""}, ${kind}`;
      const g = svg("g", { class: ["node", n.kind !== "app-group" ? "external" : ""], transform: `translate(${(x - NODE_W / 2).toFixed(1)} ${(y - NODE_H / 2).toFixed(1)})`,
        tabindex: "0", role: "button", "data-node": n.id, "aria-label": name },
        svg("rect", { width: NODE_W, height: NODE_H, rx: 8 }),
        svg("use", { href: n.kind === "app-group" ? "#i-app" : "#i-iplist", x: 8, y: 8, width: 16, height: 16, class: "node-icon" }),
        svg("text", { x: 30, y: 20 }, `${shown} `), // the space keeps the two lines apart in the text content
        svg("text", { x: 30, y: 36, class: "node-count" }, sub));
      g.addEventListener("click", (ev) => { ev.stopPropagation(); this.selectNode(n.id); });
      g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); this.selectNode(n.id); } });
      nodeFrag.append(g);
      this.nodeEls.set(n.id, g);
    }
    this.edgeLayer.replaceChildren(edgeFrag);
    this.nodeLayer.replaceChildren(nodeFrag);
    this.labelLayer.replaceChildren(labelFrag);
    // a dense map shows a label when its connection is focused, selected or meets the selected group
    this.svg.classList.toggle("dense", dense);
    if (!this.fitted) { this.fit(); this.fitted = true; }
    this.restoreSelection();
    if (focusedKey) this.refocus(focusedKey);
    this.svg.dataset.nodes = String(map.nodes.length);
    this.svg.dataset.edges = String(this.edgeEls.length);
    this.svg.dataset.renderMs = (performance.now() - t0).toFixed(1);
    this.svg.dataset.drawnAt = performance.now().toFixed(1); // ms since navigation start (bench/console.py)
    this.svg.dataset.rendered = String((Number(this.svg.dataset.rendered) || 0) + 1);
  }

  /** The group or connection that has the focus ({node} or {edge}), kept across a redraw. */
  focusedKey() {
    const el = document.activeElement;
    if (!el || !this.svg.contains(el)) return null;
    if (el.dataset && el.dataset.node) return { node: el.dataset.node };
    if (el.dataset && el.dataset.edgeLabel) return { edge: el.dataset.edgeLabel };
    return null;
  }

  refocus(key) {
    const el = key.node ? this.nodeEls.get(key.node) : (this.edgeEls.find((x) => x.key === key.edge) || {}).label;
    (el || this.svg).focus({ preventScroll: true });
  }

  /** Loading (aria-busy) and, once the first drawing and the key handlers are in place, ready. */
  setBusy(busy) {
    this.svg.setAttribute("aria-busy", String(busy));
    if (!busy) this.svg.dataset.ready = "true";
  }

  /** Groups then connections, in Tab order. */
  focusables() {
    return [...this.nodeLayer.querySelectorAll("[data-node]"), ...this.labelLayer.querySelectorAll("[data-edge-label]")];
  }

  nodeName(id) {
    const n = this.map.nodes.find((x) => x.id === id);
    return n ? n.name : id;
  }

  restoreSelection() {
    if (!this.selected) return;
    if (this.selected.type === "node" && this.nodeEls.has(this.selected.id)) this.highlightNode(this.selected.id);
    else if (this.selected.type === "edge") {
      const found = this.edgeEls.find((x) => x.key === this.selected.key);
      if (found) { found.line.classList.add("selected"); found.label.classList.add("selected"); drawLabel(found.label); }
    }
  }

  clearHighlight() {
    this.svg.classList.remove("has-selection");
    this.nodeLayer.querySelectorAll(".selected").forEach((el) => el.classList.remove("selected"));
    this.edgeLayer.querySelectorAll(".selected, .related").forEach((el) => el.classList.remove("selected", "related"));
    this.labelLayer.querySelectorAll(".selected, .related").forEach((el) => el.classList.remove("selected", "related"));
  }

  highlightNode(id) {
    this.clearHighlight();
    const el = this.nodeEls.get(id);
    if (el) el.classList.add("selected");
    this.svg.classList.add("has-selection");
    for (const { edge, line, label } of this.edgeEls) {
      if (edge.src === id || edge.dst === id) { line.classList.add("related"); label.classList.add("related"); drawLabel(label); }
    }
  }

  selectNode(id) {
    this.selected = { type: "node", id };
    this.highlightNode(id);
    if (this.onSelectNode) this.onSelectNode(this.map.nodes.find((n) => n.id === id));
  }

  selectEdge(edge) {
    const key = `${edge.src}->${edge.dst}`;
    this.selected = { type: "edge", key };
    this.clearHighlight();
    const found = this.edgeEls.find((x) => x.key === key);
    if (found) { found.line.classList.add("selected"); found.label.classList.add("selected"); drawLabel(found.label); }
    if (this.onSelectEdge) this.onSelectEdge(edge);
  }

  centerOn(id) {
    const p = this.positions.get(id);
    if (!p) return;
    const r = this.svg.getBoundingClientRect();
    this.view.k = Math.max(this.view.k, 1);
    this.view.x = r.width / 2 - p[0] * this.view.k;
    this.view.y = r.height / 2 - p[1] * this.view.k;
    this.apply();
  }

  // ---- pan & zoom ----
  apply() {
    const { x, y, k } = this.view;
    this.root.setAttribute("transform", `translate(${x.toFixed(1)} ${y.toFixed(1)}) scale(${k.toFixed(4)})`);
  }

  fit() {
    const r = this.svg.getBoundingClientRect();
    const w = r.width || 800; const hgt = r.height || 500;
    let minX = Infinity; let minY = Infinity; let maxX = -Infinity; let maxY = -Infinity;
    for (const [x, y] of this.positions.values()) {
      minX = Math.min(minX, x - NODE_W / 2); maxX = Math.max(maxX, x + NODE_W / 2);
      minY = Math.min(minY, y - NODE_H / 2); maxY = Math.max(maxY, y + NODE_H / 2);
    }
    if (!Number.isFinite(minX)) { this.view = { x: w / 2, y: hgt / 2, k: 1 }; this.apply(); return; }
    const k = Math.min(2, 0.92 * Math.min(w / (maxX - minX || 1), hgt / (maxY - minY || 1)));
    this.view = { k, x: w / 2 - ((minX + maxX) / 2) * k, y: hgt / 2 - ((minY + maxY) / 2) * k };
    this.apply();
  }

  zoom(factor, cx, cy) {
    const r = this.svg.getBoundingClientRect();
    const px = cx ?? r.width / 2; const py = cy ?? r.height / 2;
    const k = Math.min(8, Math.max(0.05, this.view.k * factor));
    const f = k / this.view.k;
    this.view.x = px - (px - this.view.x) * f;
    this.view.y = py - (py - this.view.y) * f;
    this.view.k = k;
    this.apply();
  }

  pan(dx, dy) { this.view.x += dx; this.view.y += dy; this.apply(); }

  bindPanZoom() {
    let drag = null;
    this.svg.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = this.svg.getBoundingClientRect();
      this.zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    this.svg.addEventListener("pointerdown", (e) => {
      if (e.target.closest && (e.target.closest(".node") || e.target.closest(".edge-hit") || e.target.closest(".edge-label"))) return;
      drag = { x: e.clientX, y: e.clientY, moved: false };
      this.svg.setPointerCapture(e.pointerId);
      this.svg.classList.add("dragging");
    });
    this.svg.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x; const dy = e.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
      drag.x = e.clientX; drag.y = e.clientY;
      this.pan(dx, dy);
    });
    const end = () => { drag = null; this.svg.classList.remove("dragging"); };
    this.svg.addEventListener("pointerup", end);
    this.svg.addEventListener("pointercancel", end);
    this.svg.addEventListener("keydown", (e) => {
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      const item = e.target !== this.svg && e.target.closest && e.target.closest("[data-node], [data-edge-label]");
      const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
      if (item && moves[e.key]) {
        e.preventDefault();
        const all = this.focusables();
        const next = all[(all.indexOf(item) + moves[e.key] + all.length) % all.length];
        if (next) next.focus();
        return;
      }
      const step = 60;
      const keys = { ArrowLeft: [step, 0], ArrowRight: [-step, 0], ArrowUp: [0, step], ArrowDown: [0, -step] };
      if (keys[e.key]) { e.preventDefault(); this.pan(...keys[e.key]); }
      else if (e.key === "+" || e.key === "=") { e.preventDefault(); this.zoom(1.25); }
      else if (e.key === "-" || e.key === "_") { e.preventDefault(); this.zoom(1 / 1.25); }
      else if (e.key === "0") { e.preventDefault(); this.fit(); }
    });
  }
}

