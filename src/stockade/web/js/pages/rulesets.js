// Rulesets: list, and the editor (scope + allow rules built with label and service pickers).
// Saving writes the draft; nothing reaches a host until it is provisioned.

import { h, add, icon, table, toast, uid } from "../dom.js";
import * as api from "../api.js";
import { selectorList } from "../labels.js";
import { refdata, invalidate } from "../refdata.js";
import { SelectorListEditor } from "../selectors.js";
import { ruleEditor } from "../ruleeditor.js";
import { textField, submitWith } from "../forms.js";

export async function render(view, ctx) {
  if (ctx.parts[1]) return renderEditor(view, ctx, ctx.parts[1] === "new" ? null : ctx.parts[1]);
  const items = await api.listAll("/rulesets");
  add(view, 
    h("div", { class: "page-head" }, h("h1", {}, "Rulesets"),
      h("div", { class: "actions" }, ctx.can("write-rulesets") ? h("a", { class: "button primary", href: "#/rulesets/new" }, icon("plus"), "New ruleset") : null)),
    h("p", { class: "muted" }, "Allow rules, grouped by the workloads they govern (the scope). Edits go to the draft; provision to enforce them."),
    table([
      { title: "Ruleset", cell: (r) => h("a", { href: `#/rulesets/${encodeURIComponent(r.name)}` }, r.name) },
      { title: "Scope", cell: (r) => selectorList(r.body.scope, "(no scope)") },
      { title: "Rules", class: "num", cell: (r) => String(r.body.rules.length) },
      { title: "Encryption", cell: encryptionCell },
      { title: "Description", cell: (r) => r.body.description || "" },
    ], items, { caption: "Rulesets", empty: "No ruleset in the draft yet." }));
}

/** Which rules of a ruleset say encrypt: "every rule", "rules 1, 3", or nothing. */
function encryptionCell(r) {
  const rules = r.body.rules || [];
  const which = rules.map((x, i) => (r.body.encrypt || x.encrypt ? i + 1 : 0)).filter(Boolean);
  if (!which.length) return h("span", { class: "muted" }, "—");
  const text = r.body.encrypt ? "every rule" : `rule${which.length === 1 ? "" : "s"} ${which.join(", ")}`;
  return h("span", { class: "encrypted", "data-role": "ruleset-encrypted" }, icon("lock"), ` WireGuard: ${text}`);
}

async function renderEditor(view, ctx, name) {
  const data = await refdata(true);
  let etag = null;
  let body = { name: "", scope: [], rules: [{}], description: "" };
  if (name) {
    const res = await api.request("GET", `/rulesets/${api.enc(name)}`);
    etag = res.etag;
    body = res.data.body;
  }
  const nameF = textField({ label: "Name", name: "name", field: "name", value: body.name,
    attrs: name ? { readonly: true } : { autofocus: true }, hint: name ? "Renaming is not supported: create a new ruleset instead." : "Letters, digits, . _ -" });
  const descF = textField({ label: "Description", name: "description", field: "description", value: body.description });
  const scopeLabel = uid("lbl");
  const scope = new SelectorListEditor({ data, labelText: "Scope", field: "scope", selectors: body.scope, kinds: ["labels", "all"], scope: true,
    allowEmpty: true, emptyText: "Pick the labels of the workloads this ruleset governs (e.g. app=shop, env=dev). To govern every workload, choose “All workloads” in the list: an empty scope is not saved.",
    allWarning: "All workloads: this ruleset governs every workload, including workloads enrolled later, in every app and environment." });
  scope.el.setAttribute("aria-labelledby", scopeLabel);

  const encryptAll = h("input", { type: "checkbox", checked: Boolean(body.encrypt), "data-field": "encrypt" });
  const rulesBox = h("div", {});
  const rules = [];
  const title = (i) => `Rule ${i + 1}`;
  const renumber = () => rules.forEach((r, i) => r.setIndex(i, title(i)));
  const addRule = (rule) => {
    const i = rules.length;
    const ed = ruleEditor({ data, rule, base: `rules.${i}`, title: title(i), kind: "allow", rulesetEncrypts: () => encryptAll.checked,
      onRemove: () => { rules.splice(rules.indexOf(ed), 1); ed.el.remove(); renumber(); } });
    rules.push(ed);
    rulesBox.append(ed.el);
    return ed;
  };
  body.rules.forEach(addRule);
  encryptAll.addEventListener("change", () => rules.forEach((r) => r.refresh()));

  const save = h("button", { type: "submit", class: "primary" }, name ? "Save to draft" : "Create in draft");
  const after = h("span", { class: "muted", role: "status" });
  const form = h("form", { novalidate: true, "aria-label": "Ruleset" },
    h("div", { class: "panel" }, nameF.el, descF.el,
      h("div", { class: "field" }, h("span", { id: scopeLabel, class: "label" }, h("strong", {}, "Scope")), scope.el),
      h("div", { class: "field" }, h("label", { class: "check" }, encryptAll,
        "Encrypt every rule of this ruleset (WireGuard between the two workloads; the same traffic in the clear is dropped)"))),
    h("h2", {}, "Allow rules"),
    rulesBox,
    h("button", { type: "button", onclick: () => addRule({}).focus() }, icon("plus"), "Add a rule"),
    h("div", { class: "form-actions" }, save, after, h("a", { href: "#/rulesets" }, "Back to rulesets")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = {
      name: nameF.input.value.trim(),
      scope: scope.value(),
      rules: rules.map((r) => r.value()),
      description: descF.input.value,
      ...(encryptAll.checked ? { encrypt: true } : {}),
    };
    const res = await submitWith(form, save, () => (name
      ? api.request("PUT", `/rulesets/${api.enc(name)}`, { body: out, etag })
      : api.request("POST", "/rulesets", { body: out })));
    if (!res) return;
    etag = res.etag;
    invalidate();
    toast(`Ruleset ${res.data.name} saved to the draft`);
    after.replaceChildren(`Saved (revision ${res.data.revision}). `, h("a", { href: "#/policy" }, "Review the draft and provision →"));
    if (!name) {
      window.history.replaceState(null, "", `#/rulesets/${encodeURIComponent(res.data.name)}`);
      name = res.data.name;
      nameF.input.readOnly = true;
      save.textContent = "Save to draft";
    }
  });
  const del = name && ctx.can("write-rulesets") ? h("button", { type: "button", class: "danger", onclick: async () => {
    try { await api.del(`/rulesets/${api.enc(name)}`, etag); toast(`Ruleset ${name} removed from the draft`); ctx.go("rulesets"); }
    catch (err) { toast(err.message, "error", 9000); }
  } }, "Delete ruleset") : null;
  add(view, h("p", {}, h("a", { href: "#/rulesets" }, "← Rulesets")),
    h("div", { class: "page-head" }, h("h1", {}, name ? `Ruleset ${name}` : "New ruleset"), h("div", { class: "actions" }, del)),
    form);
}
