// ChipPicker: an accessible multi-select combobox (WAI-ARIA combobox + listbox pattern).
// Chosen items show as chips; typing filters suggestions; ArrowUp/ArrowDown move, Enter or Tab
// picks, Escape closes, Backspace on an empty input removes the last chip. Free text is never
// taken as a value: only suggestions can be picked (the caller decides what is suggested).
// Text left unfinished in the input is never dropped either: the picker's element carries a
// ``validate()`` (see forms.js submitWith) that turns it into an error beside the field, with the
// reason the suggestions give ("billing is not an allowed value of app"). A suggestion may be an
// action ({action: async () => item | null}), e.g. "add this value to the key", run when picked.

import { h, clear, uid, announce } from "./dom.js";

export class ChipPicker {
  /**
   * @param {object} o
   * @param {string} o.labelId        id of the visible label element
   * @param {(text: string, chosen: any[]) => Promise<{items: any[], note?: string}>|{items: any[], note?: string}} o.suggest
   *        items: {key, value, render: () => Node, text, hint?}
   * @param {(value: any, remove: () => void) => Node} o.chip
   * @param {(value: any) => string} o.keyOf
   * @param {any[]} [o.values]
   * @param {(values: any[]) => void} [o.onChange]
   * @param {number} [o.max]           at most this many values (1: single choice)
   * @param {string} [o.placeholder]
   * @param {string} [o.field]         data-field for API error placement
   */
  constructor(o) {
    this.o = o;
    this.values = [...(o.values || [])];
    this.items = [];
    this.active = -1;
    this.listId = uid("lb");
    this.el = h("div", { class: "picker", "data-field": o.field || null });
    this.chips = h("span", { class: "chips" });
    this.input = h("input", {
      type: "text", role: "combobox", "aria-autocomplete": "list", "aria-expanded": "false",
      "aria-controls": this.listId, "aria-labelledby": o.labelId, autocomplete: "off", spellcheck: "false",
      placeholder: o.placeholder || "Type to search…", "data-field": o.field || null,
    });
    this.list = h("ul", { class: "listbox", role: "listbox", id: this.listId, hidden: true, "aria-labelledby": o.labelId });
    this.el.append(this.chips, this.input, this.list);
    this.input.addEventListener("input", () => this.refresh());
    this.input.addEventListener("focus", () => { if (!this.picking) this.refresh(); });
    this.input.addEventListener("keydown", (e) => this.onKey(e));
    this.input.addEventListener("blur", () => window.setTimeout(() => this.close(), 150));
    this.el.addEventListener("click", (e) => { if (e.target === this.el || e.target === this.chips) this.input.focus(); });
    this.el.dataset.validate = "";
    this.el.validate = () => this.pendingIssues();
    this.renderChips();
  }

  /** Unfinished text in the input as form issues ([] when there is none). */
  async pendingIssues() {
    const text = this.input.value.trim();
    if (!text) return [];
    const res = await this.o.suggest(text, this.values);
    const exact = (res.items || []).find((i) => !i.action && (i.text === text || i.key.endsWith(`:${text}`) || i.key === text));
    const why = exact
      ? "it is not added yet: pick it from the list (Enter), or clear the text"
      : `${res.reason || "it is not one of the suggestions"}. Pick a suggestion, or clear the text`;
    return [{ field: this.input.dataset.field || this.o.field || "", message: `“${text}” was not saved: ${why}.` }];
  }

  setValues(values) { this.values = [...values]; this.renderChips(); }

  renderChips() {
    clear(this.chips);
    for (const v of this.values) this.chips.append(this.o.chip(v, () => this.remove(v)));
    const full = this.o.max && this.values.length >= this.o.max;
    this.input.placeholder = full ? "" : (this.o.placeholder || "Type to search…");
  }

  remove(v) {
    const key = this.o.keyOf(v);
    this.values = this.values.filter((x) => this.o.keyOf(x) !== key);
    this.renderChips();
    this.changed();
    announce(`Removed ${key}`);
    this.input.focus();
  }

  async add(item) {
    if (item.action) {
      this.close();
      let made = null;
      try { made = await item.action(); } catch (err) { announce(err.message); this.note = err.message; this.items = []; this.renderList(); return; }
      if (!made) return;
      item = made;
    }
    if (this.o.max === 1) this.values = [];
    if (this.o.max && this.values.length >= this.o.max) return;
    if (this.values.some((x) => this.o.keyOf(x) === item.key)) return;
    if (this.o.replaces) this.values = this.values.filter((x) => !this.o.replaces(item.value, x));
    this.values.push(item.value);
    this.input.value = "";
    this.renderChips();
    this.changed();
    announce(`Added ${item.text}`);
    this.close(); // typing or ArrowDown opens it again
  }

  changed() {
    this.el.removeAttribute("aria-invalid");
    if (this.o.onChange) this.o.onChange(this.values);
  }

  async refresh() {
    const text = this.input.value.trim();
    const token = Symbol("q");
    this.pending = token;
    const res = await this.o.suggest(text, this.values);
    if (this.pending !== token || document.activeElement !== this.input) return;
    const chosen = new Set(this.values.map((v) => this.o.keyOf(v)));
    this.items = res.items.filter((i) => !chosen.has(i.key)).slice(0, 60);
    this.active = this.items.length ? 0 : -1;
    this.note = res.note || (this.items.length ? "" : (text ? "No match" : ""));
    this.renderList();
  }

  renderList() {
    clear(this.list);
    this.items.forEach((item, i) => {
      const li = h("li", { role: "option", id: `${this.listId}-${i}`, "aria-selected": i === this.active ? "true" : "false", "data-key": item.key,
        class: item.action ? "listbox-action" : null },
        item.render(), item.hint ? h("span", { class: "muted" }, item.hint) : null);
      li.addEventListener("mousedown", (e) => { e.preventDefault(); this.add(item); });
      this.list.append(li);
    });
    if (this.note) this.list.append(h("li", { class: "listbox-note", role: "presentation" }, this.note));
    const open = this.items.length > 0 || Boolean(this.note);
    this.list.hidden = !open;
    this.input.setAttribute("aria-expanded", open ? "true" : "false");
    if (this.active >= 0) this.input.setAttribute("aria-activedescendant", `${this.listId}-${this.active}`);
    else this.input.removeAttribute("aria-activedescendant");
  }

  move(delta) {
    if (!this.items.length) return;
    this.active = (this.active + delta + this.items.length) % this.items.length;
    this.renderList();
    const el = document.getElementById(`${this.listId}-${this.active}`);
    if (el) el.scrollIntoView({ block: "nearest" });
  }

  close() {
    this.list.hidden = true;
    this.input.setAttribute("aria-expanded", "false");
    this.input.removeAttribute("aria-activedescendant");
  }

  onKey(e) {
    if (e.key === "ArrowDown") { e.preventDefault(); if (this.list.hidden) this.refresh(); else this.move(1); }
    else if (e.key === "ArrowUp") { e.preventDefault(); this.move(-1); }
    else if (e.key === "Enter") {
      if (!this.list.hidden && this.active >= 0) { e.preventDefault(); this.add(this.items[this.active]); }
      else if (this.input.value.trim()) e.preventDefault(); // never submit free text
    } else if (e.key === "Tab" && !e.shiftKey && !this.list.hidden && this.active >= 0 && this.input.value.trim()) {
      e.preventDefault();
      this.add(this.items[this.active]);
    } else if (e.key === "Escape") {
      if (!this.list.hidden) { e.preventDefault(); e.stopPropagation(); this.close(); }
    } else if (e.key === "Backspace" && !this.input.value && this.values.length) {
      this.remove(this.values[this.values.length - 1]);
    }
  }

  focus() { this.input.focus(); }
}

/** Rank ``candidates`` (with .text) against a query: prefix matches first, then substring. */
export function rank(candidates, text) {
  if (!text) return candidates;
  const q = text.toLowerCase();
  const scored = [];
  for (const c of candidates) {
    const t = c.text.toLowerCase();
    const parts = t.split(/[=:\s]/);
    let score = -1;
    if (t.startsWith(q)) score = 0;
    else if (parts.some((p) => p.startsWith(q))) score = 1;
    else if (t.includes(q)) score = 2;
    if (score >= 0) scored.push([score, c]);
  }
  scored.sort((a, b) => a[0] - b[0] || a[1].text.localeCompare(b[1].text));
  return scored.map((x) => x[1]);
}
