// Audit events: who changed what, when, with before/after; filterable.

import { h, add, table, formatTime, replace, uid, debounce } from "../dom.js";
import * as api from "../api.js";

export async function render(view, ctx) {
  const fields = [["kind", "Kind"], ["name", "Object name"], ["action", "Action"], ["actor", "Actor"]];
  const inputs = {};
  const bar = h("div", { class: "toolbar", role: "search" }, fields.map(([f, label]) => {
    const id = uid("f");
    inputs[f] = h("input", { type: "search", id, value: ctx.query.get(f) || "" });
    return h("div", {}, h("label", { for: id }, label), inputs[f]);
  }));
  const box = h("div", { "aria-live": "polite" });
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Events")),
    h("p", { class: "muted" }, "Every change and agent state change, newest first."), bar, box);
  let items = [];
  const load = async (cursor) => {
    const params = { limit: 100, cursor };
    for (const [f] of fields) if (inputs[f].value.trim()) params[f] = inputs[f].value.trim();
    const page = await api.get("/events", params);
    items = cursor ? items.concat(page.items) : page.items;
    replace(box, table([
      { title: "When", cell: (e) => formatTime(e.time) },
      { title: "Actor", cell: (e) => e.actor },
      { title: "Action", cell: (e) => h("code", {}, e.action) },
      { title: "Object", cell: (e) => h("span", {}, h("span", { class: "muted" }, `${e.kind} `), e.name) },
      { title: "Details", cell: (e) => (e.before == null && e.after == null ? "" : h("details", {}, h("summary", {}, "before / after"),
        h("pre", { class: "mono" }, `before: ${JSON.stringify(e.before, null, 2)}\nafter: ${JSON.stringify(e.after, null, 2)}`))) },
    ], items, { caption: "Events", empty: "No event matches." }),
    page.next_cursor ? h("div", { class: "pager" }, h("button", { type: "button", onclick: () => load(page.next_cursor) }, "Older events")) : null);
  };
  const reload = debounce(() => load(undefined), 250);
  Object.values(inputs).forEach((i) => i.addEventListener("input", reload));
  await load(undefined);
}
