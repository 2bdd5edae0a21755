// Deny and override-deny rules. Precedence: override deny > allow > deny > the mode's default.

import { h, add, icon, table, toast } from "../dom.js";
import * as api from "../api.js";
import { selectorList, serviceChip } from "../labels.js";
import { refdata, invalidate } from "../refdata.js";
import { ruleEditor } from "../ruleeditor.js";
import { textField, submitWith } from "../forms.js";

function kindOf(r) {
  return r.override
    ? h("span", { class: "verdict v-blocked", "data-verdict": "blocked" }, icon("blocked"), "Override deny")
    : h("span", { class: "verdict v-potentially-blocked", "data-verdict": "potentially-blocked" }, icon("potentially-blocked"), "Deny");
}

export async function render(view, ctx) {
  if (ctx.parts[1]) return renderEditor(view, ctx, ctx.parts[1] === "new" ? null : ctx.parts[1]);
  const items = await api.listAll("/deny-rules");
  add(view, 
    h("div", { class: "page-head" }, h("h1", {}, "Deny rules"),
      h("div", { class: "actions" }, ctx.can("write") ? h("a", { class: "button primary", href: "#/deny-rules/new" }, icon("plus"), "New deny rule") : null)),
    h("p", {}, "Order of precedence: ", h("strong", {}, "override deny"), " > allow > ", h("strong", {}, "deny"),
      " > the mode's default. A deny is a boundary a more specific allow may cross; an override deny is absolute."),
    table([
      { title: "Name", cell: (r) => h("a", { href: `#/deny-rules/${encodeURIComponent(r.name)}` }, r.name) },
      { title: "Kind", cell: (r) => kindOf(r.body) },
      { title: "Consumers", cell: (r) => selectorList(r.body.consumers) },
      { title: "Providers", cell: (r) => selectorList(r.body.providers) },
      { title: "Services", cell: (r) => h("span", { class: "chips" }, r.body.services.map((s) => serviceChip(s))) },
    ], items, { caption: "Deny rules", empty: "No deny rule in the draft." }));
}

async function renderEditor(view, ctx, name) {
  const data = await refdata(true);
  let etag = null;
  let body = { name: "", consumers: [], providers: [], services: [], override: false, description: "" };
  if (name) {
    const res = await api.request("GET", `/deny-rules/${api.enc(name)}`);
    etag = res.etag;
    body = res.data.body;
  }
  const nameF = textField({ label: "Name", name: "name", field: "name", value: body.name, attrs: name ? { readonly: true } : { autofocus: true } });
  const rule = ruleEditor({ data, rule: body, base: "", title: "", kind: "deny" });
  const save = h("button", { type: "submit", class: "primary" }, name ? "Save to draft" : "Create in draft");
  const status = h("span", { class: "muted", role: "status" });
  const form = h("form", { novalidate: true, "aria-label": "Deny rule" }, h("div", { class: "panel" }, nameF.el, rule.el),
    h("div", { class: "form-actions" }, save, status, h("a", { href: "#/deny-rules" }, "Back to deny rules")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = { name: nameF.input.value.trim(), ...rule.value() };
    const res = await submitWith(form, save, () => (name
      ? api.request("PUT", `/deny-rules/${api.enc(name)}`, { body: out, etag })
      : api.request("POST", "/deny-rules", { body: out })));
    if (!res) return;
    etag = res.etag;
    invalidate();
    toast(`Deny rule ${res.data.name} saved to the draft`);
    status.replaceChildren(`Saved. `, h("a", { href: "#/policy" }, "Review the draft and provision →"));
    if (!name) {
      name = res.data.name;
      nameF.input.readOnly = true;
      window.history.replaceState(null, "", `#/deny-rules/${encodeURIComponent(name)}`);
    }
  });
  const del = name && ctx.can("write") ? h("button", { type: "button", class: "danger", onclick: async () => {
    try { await api.del(`/deny-rules/${api.enc(name)}`, etag); toast(`Deny rule ${name} removed from the draft`); ctx.go("deny-rules"); }
    catch (err) { toast(err.message, "error", 9000); }
  } }, "Delete") : null;
  add(view, h("p", {}, h("a", { href: "#/deny-rules" }, "← Deny rules")),
    h("div", { class: "page-head" }, h("h1", {}, name ? `Deny rule ${name}` : "New deny rule"), h("div", { class: "actions" }, del)), form);
}
