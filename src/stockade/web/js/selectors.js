// Selector editing: label pickers with autocomplete for rule consumers, providers and scopes,
// a services picker, and the label filter of the workload search.
//
// A rule side is a list of selectors (any may match); each selector is exactly one of
//   labels (all required) + label groups + excluded labels | an IP list | all workloads,
// chosen per row. Addresses are never typed in: they live in IP lists, picked by name.

import { h, icon, uid } from "./dom.js";
import { ChipPicker, rank } from "./picker.js";
import { labelChip, groupChip, ipListChip, serviceChip, keyIcon } from "./labels.js";
import { valuesOf, accepts, IP_LIKE_RE, NAME_RE } from "./refdata.js";

const ADDRESS_NOTE = "Addresses are not labels: choose “IP list” for this row and pick an IP list.";

// ---- label suggestions --------------------------------------------------------------

/** Label, group and exclusion suggestions for ``text``; value objects are {t, key, value} / {t, name}. */
export function labelSuggestions(data, text, { groups = true, exclusions = true } = {}) {
  const raw = text.trim();
  if (IP_LIKE_RE.test(raw) && /[.:]/.test(raw)) return { items: [], note: ADDRESS_NOTE };
  let negate = false;
  let q = raw;
  if (exclusions && /^(not\s+|!|-)/i.test(q)) { negate = true; q = q.replace(/^(not\s+|!|-)/i, ""); }
  const cands = [];
  for (const k of data.keys) {
    for (const { value, count } of valuesOf(data, k.name)) {
      const hint = `${count} workload${count === 1 ? "" : "s"}`;
      cands.push({ text: `${k.name}=${value}`, t: "label", key: k.name, value, hint });
    }
  }
  const ranked = rank(cands, q.replace(/\s*[:]\s*/, "="));
  // a new value for a key that takes any value, "key=value" typed in full: offered last
  const m = /^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*[=:]\s*(\S+)$/.exec(q);
  const t = negate ? "exclude" : "label";
  const itemOf = (c) => ({
    key: `${t}:${c.key}=${c.value}`, text: `${negate ? "not " : ""}${c.text}`, hint: c.hint,
    value: { t, key: c.key, value: c.value },
    render: () => labelChip(c.key, c.value, { excluded: negate }),
  });
  let reason = "";
  let addAction = null;
  if (m && !cands.some((c) => c.key === m[1] && c.value === m[2])) {
    const [, key, value] = m;
    const declared = data.keys.find((k) => k.name === key);
    if (!declared) reason = `${key} is not a declared label key (declared: ${data.keys.map((k) => k.name).join(", ")})`;
    else if (!NAME_RE.test(value)) reason = `${value} is not a valid label value (letters, digits, . _ -)`;
    else if (!accepts(data, key, value)) {
      reason = `${value} is not an allowed value of ${key}`;
      if (data.addValue) {
        addAction = {
          key: `add-value:${key}=${value}`, text: `Add ${value} to the allowed values of ${key}`,
          hint: "changes the label key for every workload",
          render: () => h("span", { class: "add-action" }, icon("plus"), `Add “${value}” to the allowed values of ${key}`),
          action: async () => { await data.addValue(key, value); return itemOf({ key, value, text: `${key}=${value}` }); },
        };
      }
    } else ranked.push({ text: `${key}=${value}`, t: "label", key, value, hint: "new value" });
  }
  let items = ranked.map(itemOf);
  if (addAction) items.push(addAction);
  if (groups && !negate) {
    const gs = rank(data.groups.map((g) => ({ text: `group ${g.name}`, g })), q).map(({ g }) => ({
      key: `group:${g.name}`, text: `label group ${g.name}`, hint: `${g.key} ∈ {${g.values.join(", ")}}`,
      value: { t: "group", name: g.name }, render: () => groupChip(g.name),
    }));
    items = items.concat(gs);
  }
  if (reason) {
    const who = addAction || !reason.includes("allowed value") ? "" : " An owner or admin can add it on the Labels page.";
    return { items, reason, note: `${m[1]}=${m[2]}: ${reason}.${who}` };
  }
  const note = exclusions && !negate && !raw ? "Tip: type “not ” before a label to exclude it." : "";
  return { items, note: items.length ? note : (raw ? "No matching label. Declared keys: " + data.keys.map((k) => k.name).join(", ") : "") };
}

export function selectorValueKey(v) {
  if (v.t === "group") return `group:${v.name}`;
  if (v.t === "iplist") return `iplist:${v.name}`;
  return `${v.t}:${v.key}=${v.value}`;
}

export function selectorValueChip(v, remove) {
  if (v.t === "group") return groupChip(v.name, { onRemove: remove });
  if (v.t === "iplist") return ipListChip(v.name, { onRemove: remove });
  return labelChip(v.key, v.value, { onRemove: remove, excluded: v.t === "exclude" });
}

/** A selector body -> picker values. */
export function valuesOfSelector(sel) {
  const out = [];
  for (const [key, value] of Object.entries(sel.labels || {})) out.push({ t: "label", key, value });
  for (const name of sel.label_groups || []) out.push({ t: "group", name });
  for (const [key, v] of Object.entries(sel.exclude || {})) {
    for (const value of Array.isArray(v) ? v : [v]) out.push({ t: "exclude", key, value });
  }
  return out;
}

/** Picker values -> a selector body (labels form). */
export function selectorOfValues(values) {
  const sel = {};
  for (const v of values) {
    if (v.t === "label") (sel.labels ||= {})[v.key] = v.value;
    else if (v.t === "group") (sel.label_groups ||= []).push(v.name);
    else if (v.t === "exclude") {
      const ex = (sel.exclude ||= {});
      if (ex[v.key] === undefined) ex[v.key] = v.value;
      else ex[v.key] = [].concat(ex[v.key], v.value);
    }
  }
  return sel;
}

/** One label per key in a conjunction: picking env=prod replaces env=dev. */
function sameKey(newV, oldV) {
  return newV.t === "label" && oldV.t === "label" && newV.key === oldV.key;
}

// ---- one side of a rule ----------------------------------------------------------------

/**
 * Edits a list of selectors. ``kinds`` restricts the row modes ("labels", "ip_list", "all").
 * ``field`` is the API path of the list (e.g. "rules.0.consumers"), for error placement.
 */
export class SelectorListEditor {
  /**
   * ``selectors`` may be the string "all" (a scope governing every workload). An empty editor is
   * never "all": ``value()`` then gives [] and ``validate()`` an error beside the field, unless
   * ``required`` is false. "All workloads" is a row kind the user picks, shown with a warning.
   * ``scope``: the value is "all" (not [{all: true}]) when that kind is chosen.
   */
  constructor({ data, labelText, field, selectors = [], kinds = ["labels", "ip_list", "all"], allowEmpty = false, emptyText = "", onChange,
    required = true, scope = false, allWarning = "" }) {
    this.data = data;
    this.kinds = kinds;
    this.field = field;
    this.required = required;
    this.scope = scope;
    this.allWarning = allWarning || "All workloads: this matches every workload, including workloads added later. Pick labels instead to narrow it.";
    if (selectors === "all") selectors = [{ all: true }];
    this.onChange = onChange || (() => {});
    this.labelId = uid("sel");
    this.rows = [];
    this.rowsEl = h("div", { class: "selector-rows" });
    this.el = h("div", { class: "selector-list", "data-field": field, role: "group", "aria-labelledby": this.labelId },
      h("span", { id: this.labelId, class: "visually-hidden" }, labelText),
      this.rowsEl,
      h("button", { type: "button", class: "link", onclick: () => { this.addRow({}); this.rows[this.rows.length - 1].focus(); } },
        icon("plus"), this.rows.length ? "or…" : "Add a selector"),
      allowEmpty ? h("div", { class: "hint" }, emptyText) : null);
    this.addButton = this.el.querySelector("button.link");
    this.el.dataset.validate = "";
    this.el.validate = () => this.validate();
    const initial = selectors.length ? selectors : [{}]; // an empty row is skipped on save
    initial.forEach((s) => this.addRow(s));
    this.updateAddLabel();
  }

  updateAddLabel() {
    this.addButton.lastChild.textContent = this.rows.length ? " or another selector" : " Add a selector";
  }

  addRow(sel) {
    const index = this.rows.length;
    const mode = sel.ip_list ? "ip_list" : sel.all ? "all" : "labels";
    const row = { mode, el: h("div", { class: "selector-row" }) };
    const modeSelect = h("select", { "aria-label": `Selector ${index + 1} kind` },
      this.kinds.map((k) => h("option", { value: k, selected: k === mode }, { labels: "Labels", ip_list: "IP list", all: "All workloads" }[k])));
    const holder = h("div", { class: "selector-holder" });
    const build = () => {
      holder.replaceChildren();
      row.picker = null;
      if (row.mode === "labels") {
        row.picker = new ChipPicker({
          labelId: this.labelId, field: `${this.field}.${this.rows.indexOf(row)}`,
          values: valuesOfSelector(sel.ip_list || sel.all ? {} : sel),
          keyOf: selectorValueKey, chip: selectorValueChip, replaces: sameKey,
          placeholder: "Type a label, e.g. env=dev or role=web",
          suggest: (text) => labelSuggestions(this.data, text),
          onChange: () => this.onChange(),
        });
        holder.append(row.picker.el);
      } else if (row.mode === "ip_list") {
        row.picker = new ChipPicker({
          labelId: this.labelId, field: `${this.field}.${this.rows.indexOf(row)}`, max: 1,
          values: sel.ip_list ? [{ t: "iplist", name: sel.ip_list }] : [],
          keyOf: selectorValueKey, chip: selectorValueChip,
          placeholder: "Pick an IP list",
          suggest: (text) => ({
            items: rank(this.data.ipLists.map((x) => ({ text: x.name, x })), text).map(({ x }) => ({
              key: `iplist:${x.name}`, text: `IP list ${x.name}`, hint: x.include.slice(0, 3).join(", ") + (x.include.length > 3 ? "…" : ""),
              value: { t: "iplist", name: x.name }, render: () => ipListChip(x.name),
            })),
            note: this.data.ipLists.length ? "" : "No IP lists yet: create one under Policy objects → IP lists.",
          }),
          onChange: () => this.onChange(),
        });
        holder.append(row.picker.el);
      } else {
        holder.append(h("span", { class: "chips", "data-field": `${this.field}.${this.rows.indexOf(row)}` },
          h("span", { class: "chip k-all" }, icon("all"), h("span", { class: "chip-val" }, "All workloads"))),
        h("p", { class: "notice warn all-warning", role: "note", "data-role": "all-warning" }, icon("potentially-blocked"), " ", this.allWarning));
      }
    };
    modeSelect.addEventListener("change", () => { row.mode = modeSelect.value; sel = {}; build(); this.onChange(); row.focus(); });
    const removeBtn = h("button", { type: "button", class: "icon-only", "aria-label": `Remove selector ${index + 1}`, title: "Remove this selector",
      onclick: () => this.removeRow(row) }, icon("close"));
    row.focus = () => (row.picker ? row.picker.focus() : modeSelect.focus());
    if (this.kinds.length > 1) row.el.append(modeSelect);
    row.el.append(holder, removeBtn);
    this.rows.push(row);
    this.rowsEl.append(row.el);
    build();
    this.updateAddLabel();
  }

  removeRow(row) {
    this.rows = this.rows.filter((r) => r !== row);
    row.el.remove();
    this.updateAddLabel();
    this.onChange();
  }

  /** The selector bodies; rows left empty are skipped. Error anchors follow the output index. */
  value() {
    const out = [];
    let unused = 0;
    let all = false;
    for (const r of this.rows) {
      let sel = null;
      if (r.mode === "all") { sel = { all: true }; all = true; }
      else if (r.mode === "ip_list") { if (r.picker.values.length) sel = { ip_list: r.picker.values[0].name }; }
      else if (r.picker.values.length) sel = selectorOfValues(r.picker.values);
      const field = sel ? `${this.field}.${out.length}` : `${this.field}.unused${unused++}`;
      r.el.querySelectorAll("[data-field]").forEach((el) => { el.dataset.field = field; });
      if (sel) out.push(sel);
    }
    if (this.scope && all) return "all";
    return out;
  }

  /** An empty side is an error, never "everything" (unfinished picker text is reported by the picker). */
  validate() {
    if (!this.required) return [];
    if (this.rows.some((r) => r.picker && r.picker.input.value.trim())) return [];
    const v = this.value();
    if (v === "all" || v.length) return [];
    const choices = this.kinds.includes("all") ? "pick labels, or choose “All workloads” in the list if you mean every workload" : "pick labels";
    return [{ field: this.field, message: `Nothing chosen: ${choices}.` }];
  }

  /** Move this editor to another API path (when rules are renumbered). */
  setField(field) {
    this.field = field;
    this.el.dataset.field = field;
    this.value();
  }

  focus() { if (this.rows.length) this.rows[0].focus(); else this.addButton.focus(); }
}

// ---- services ------------------------------------------------------------------------

export function servicesPicker({ data, labelId, field, values = [], onChange }) {
  const byName = new Map(data.services.map((s) => [s.name, s]));
  const portsOf = (name) => (name === "any" ? "every protocol" : (byName.get(name)?.ports || []).join(", "));
  return new ChipPicker({
    labelId, field, values,
    keyOf: (v) => v,
    chip: (v, remove) => serviceChip(v, portsOf(v), { onRemove: remove }),
    placeholder: "Type a service, e.g. https or 443",
    suggest: (text) => {
      const all = [...data.services.map((s) => s.name), ...(byName.has("any") ? [] : ["any"])];
      const cands = all.map((n) => ({ text: `${n} ${portsOf(n)}`, n }));
      return {
        items: rank(cands, text).map(({ n }) => ({ key: n, text: `service ${n}`, hint: portsOf(n), value: n,
          render: () => h("span", { class: "chip service" }, h("span", { class: "chip-val" }, n)) })),
        note: /^\d+(\/\w+)?$/.test(text.trim()) && !cands.some((c) => c.text.includes(text.trim()))
          ? "No service has this port yet: create one under Policy objects → Services." : "",
      };
    },
    onChange,
  });
}

// ---- workload label filter ---------------------------------------------------------------

export function labelFilterPicker({ data, labelId, values = [], onChange }) {
  return new ChipPicker({
    labelId, values, field: "labels",
    keyOf: selectorValueKey, chip: selectorValueChip, replaces: sameKey,
    placeholder: "Filter by label, e.g. app=shop",
    suggest: (text) => labelSuggestions(data, text, { groups: false, exclusions: false }),
    onChange,
  });
}

export { keyIcon };
