// Label chips: an icon per label key and the text always shown (never colour alone),
// plus chips for label groups, IP lists, "all workloads" and services.

import { h, icon } from "./dom.js";

const KEY_ICONS = { role: "role", app: "app", env: "env", loc: "loc" };
const KEY_NAMES = { role: "Role", app: "Application", env: "Environment", loc: "Location" };

export function keyIcon(key) { return KEY_ICONS[key] || "label"; }
export function keyTitle(key) { return KEY_NAMES[key] || key; }
function keyClass(key) { return KEY_ICONS[key] ? `k-${key}` : "k-other"; }

/** A removable chip when ``onRemove`` is given. */
function withRemove(chipEl, name, onRemove) {
  if (!onRemove) return chipEl;
  chipEl.append(h("button", { type: "button", class: "icon-only", "aria-label": `Remove ${name}`, title: `Remove ${name}`,
    onclick: (e) => { e.stopPropagation(); onRemove(); } }, icon("close")));
  return chipEl;
}

export function labelChip(key, value, { onRemove, excluded = false } = {}) {
  const text = `${excluded ? "not " : ""}${key}=${value}`;
  const el = h("span", { class: ["chip", keyClass(key), excluded ? "excluded" : ""], title: `${keyTitle(key)}: ${excluded ? "not " : ""}${value}`, "data-label": `${key}=${value}` },
    icon(excluded ? "except" : keyIcon(key)),
    h("span", { class: "chip-key" }, key),
    h("span", { class: "chip-val" }, value),
    h("span", { class: "visually-hidden" }, excluded ? " (excluded)" : ""));
  return withRemove(el, text, onRemove);
}

export function groupChip(name, { onRemove, detail } = {}) {
  const el = h("span", { class: "chip k-group", title: detail ? `Label group ${name}: ${detail}` : `Label group ${name}`, "data-group": name },
    icon("group"), h("span", { class: "chip-key" }, "group"), h("span", { class: "chip-val" }, name));
  return withRemove(el, `group ${name}`, onRemove);
}

export function ipListChip(name, { onRemove } = {}) {
  const el = h("span", { class: "chip k-iplist", title: `IP list ${name}`, "data-iplist": name },
    icon("iplist"), h("span", { class: "chip-key" }, "IP list"), h("span", { class: "chip-val" }, name));
  return withRemove(el, `IP list ${name}`, onRemove);
}

export function allChip({ onRemove } = {}) {
  const el = h("span", { class: "chip k-all", title: "Every workload" }, icon("all"), h("span", { class: "chip-val" }, "All workloads"));
  return withRemove(el, "all workloads", onRemove);
}

export function serviceChip(name, ports, { onRemove } = {}) {
  const el = h("span", { class: "chip service", title: ports ? `${name}: ${ports}` : name, "data-service": name },
    h("span", { class: "chip-val" }, name), ports ? h("span", { class: "muted" }, ports) : null);
  return withRemove(el, `service ${name}`, onRemove);
}

/** Chips for a {key: value} map, sorted by the usual key order. */
export function labelChips(labels, opts = {}) {
  const order = ["role", "app", "env", "loc"];
  const keys = Object.keys(labels || {}).sort((a, b) => {
    const ia = order.indexOf(a); const ib = order.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
  if (!keys.length) return h("span", { class: "muted" }, opts.empty || "no labels");
  return h("span", { class: "chips" }, keys.map((k) => labelChip(k, labels[k], opts.removable ? { onRemove: () => opts.onRemove(k) } : {})));
}

/** Chips for one selector body ({labels, label_groups, exclude} | {ip_list} | {all}). */
export function selectorChips(sel) {
  if (!sel) return h("span", { class: "muted" }, "—");
  if (sel.all) return h("span", { class: "chips" }, allChip());
  if (sel.ip_list) return h("span", { class: "chips" }, ipListChip(sel.ip_list));
  const parts = [];
  for (const [k, v] of Object.entries(sel.labels || {})) parts.push(labelChip(k, v));
  for (const g of sel.label_groups || []) parts.push(groupChip(g));
  for (const [k, v] of Object.entries(sel.exclude || {})) {
    for (const x of Array.isArray(v) ? v : [v]) parts.push(labelChip(k, x, { excluded: true }));
  }
  return h("span", { class: "chips" }, parts);
}

/** "a OR b" rendering of a selector list. */
export function selectorList(sels, empty = "inside the ruleset scope") {
  if (sels === "all") return h("span", { class: "chips" }, allChip());
  if (!sels || !sels.length) return h("span", { class: "muted" }, empty);
  const out = [];
  sels.forEach((s, i) => {
    if (i) out.push(h("span", { class: "or-sep" }, " or "));
    out.push(selectorChips(s));
  });
  return h("span", { class: "chips" }, out);
}
