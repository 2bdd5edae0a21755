// Policy versions: the history (who, when, why, what changed, which hosts) and rollback,
// which provisions an old version's content again as a new version.

import { h, add, table, toast, formatTime, replace } from "../dom.js";
import * as api from "../api.js";
import { changeList } from "../diff.js";
import { textField, submitWith } from "../forms.js";

export async function render(view, ctx) {
  if (ctx.parts[1]) return renderVersion(view, ctx, Number(ctx.parts[1]));
  const box = h("div", {});
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Policy versions")), box);
  let items = [];
  const load = async (cursor) => {
    const page = await api.get("/policy/versions", { limit: 50, cursor });
    items = items.concat(page.items);
    replace(box, table([
      { title: "Version", cell: (v) => h("a", { href: `#/versions/${v.number}` }, `#${v.number}`) },
      { title: "When", cell: (v) => formatTime(v.created_at) },
      { title: "Who", cell: (v) => v.author },
      { title: "Message", cell: (v) => h("span", {}, v.message, v.rollback_of ? h("span", { class: "muted" }, ` (rollback to #${v.rollback_of})`) : "") },
      { title: "Changes", class: "num", cell: (v) => String(v.diff.length) },
      { title: "Hosts", class: "num", cell: (v) => String(v.affected_workloads.length) },
    ], items, { caption: "Policy versions", empty: "Nothing provisioned yet." }),
    page.next_cursor ? h("div", { class: "pager" }, h("button", { type: "button", onclick: () => load(page.next_cursor) }, "Older versions")) : null);
  };
  await load(undefined);
}

async function renderVersion(view, ctx, number) {
  const [v, latest] = await Promise.all([api.get(`/policy/versions/${number}`), api.get("/policy/versions", { limit: 1 })]);
  const isActive = latest.items.length && latest.items[0].number === number;
  const msg = textField({ label: "Message", name: "message", field: "message", value: `Roll back to version ${number}`, attrs: { class: "wide" } });
  const button = h("button", { type: "submit", class: "danger" }, `Roll back to version ${number}`);
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "rb-h" },
    h("h2", { id: "rb-h" }, "Roll back"),
    h("p", { class: "muted" }, `Provisions the content of version ${number} again, as a new version. The draft is not changed.`),
    msg.el, h("div", { class: "form-actions" }, button));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await submitWith(form, button, () => api.post("/policy/rollback", { version: number, message: msg.input.value }));
    if (!res) return;
    toast(`Version ${res.number} provisioned (rollback to ${number})`);
    ctx.go(`versions/${res.number}`);
  });
  add(view, h("p", {}, h("a", { href: "#/versions" }, "← Versions")),
    h("h1", {}, `Version ${v.number}${isActive ? " (active)" : ""}`),
    h("dl", { class: "kv" },
      h("dt", {}, "Provisioned"), h("dd", {}, formatTime(v.created_at)),
      h("dt", {}, "By"), h("dd", {}, v.author),
      h("dt", {}, "Message"), h("dd", {}, v.message),
      v.rollback_of ? h("dt", {}, "Rollback of") : null, v.rollback_of ? h("dd", {}, h("a", { href: `#/versions/${v.rollback_of}` }, `#${v.rollback_of}`)) : null,
      h("dt", {}, "Hosts with new policy"), h("dd", {}, v.affected_workloads.length ? v.affected_workloads.join(", ") : "none")),
    h("h2", {}, `Changes (${v.diff.length})`), changeList(v.diff),
    !isActive && ctx.can("write") ? form : null);
}
