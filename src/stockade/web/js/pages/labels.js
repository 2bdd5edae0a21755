// Labels: declared label keys (with their allowed values and the values in use) and label groups.

import { h, add, icon, table, toast, uid, replace } from "../dom.js";
import * as api from "../api.js";
import { labelChip, groupChip, keyIcon, keyTitle } from "../labels.js";
import { refdata, invalidate, valuesOf, addAllowedValue, NAME_RE } from "../refdata.js";
import { textField, submitWith, lines } from "../forms.js";

export async function render(view, ctx) {
  const data = await refdata(true);
  const keysBox = h("section", { "aria-labelledby": "keys-h" });
  const groupsBox = h("section", { "aria-labelledby": "groups-h" });
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Labels")),
    h("p", { class: "muted" }, "Workloads carry at most one label per key. Rules select workloads by label, never by address."),
    h("div", { class: "cols" }, keysBox, groupsBox));
  renderKeys(keysBox, data, ctx);
  renderGroups(groupsBox, data, ctx);
}

function renderKeys(box, data, ctx) {
  const rows = data.keys.map((k) => ({ k, values: valuesOf(data, k.name) }));
  replace(box, h("h2", { id: "keys-h" }, "Label keys"),
    table([
      { title: "Key", cell: (r) => h("span", { class: "inline" }, h("span", { class: `chip k-${["role", "app", "env", "loc"].includes(r.k.name) ? r.k.name : "other"}` }, icon(keyIcon(r.k.name)), h("span", { class: "chip-val" }, r.k.name)), h("span", { class: "muted" }, keyTitle(r.k.name) !== r.k.name ? keyTitle(r.k.name) : "")) },
      { title: "Values (workloads)", cell: (r) => r.values.length
        ? h("span", { class: "chips" }, r.values.map((v) => h("a", { href: `#/workloads?labels=${encodeURIComponent(`${r.k.name}=${v.value}`)}`, class: "chip-link", title: `Workloads with ${r.k.name}=${v.value}` },
          labelChip(r.k.name, v.value), h("span", { class: "muted count" }, String(v.count), h("span", { class: "visually-hidden" }, v.count === 1 ? " workload" : " workloads")))))
        : h("span", { class: "muted" }, "none yet") },
      { title: "Allowed", cell: (r) => h("div", { "data-allowed": r.k.name },
        r.k.values.length ? h("span", {}, `only: ${r.k.values.join(", ")}`) : "any value",
        r.k.values.length && ctx.can("write") ? addValueForm(box, r.k, ctx) : null) },
    ], rows, { caption: "Label keys" }),
    ctx.can("write") ? null : h("p", { class: "muted" }, "Only owners and admins can declare keys or add allowed values."),
    ctx.can("write") ? keyForm(box, data, ctx) : null);
}

/** Add one allowed value to a key that lists them (owner, admin; the API checks the role). */
function addValueForm(box, key, ctx) {
  const id = uid("f");
  const input = h("input", { id, type: "text", name: "value", "data-field": "values", size: 12, autocomplete: "off" });
  const save = h("button", { type: "submit" }, "Add value");
  const form = h("form", { class: "inline add-value", novalidate: true, "aria-label": `Add an allowed value to ${key.name}` },
    h("label", { for: id, class: "visually-hidden" }, `New allowed value of ${key.name}`), input, save);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const value = input.value.trim();
    const res = await submitWith(form, save, () => {
      if (!NAME_RE.test(value)) {
        throw Object.assign(new Error("not saved"), { status: 0, issues: [{ field: "values", message: `“${value}” is not a valid label value (letters, digits, . _ -)` }] });
      }
      return addAllowedValue(key.name, value);
    });
    if (!res) return;
    toast(`${value} is now an allowed value of ${key.name}`);
    renderKeys(box, await refdata(true), ctx);
  });
  return form;
}

function keyForm(box, data, ctx) {
  const name = textField({ label: "New key", name: "name", field: "name", hint: "e.g. team, tier, compliance" });
  const values = textField({ label: "Allowed values (optional, comma separated)", name: "values", field: "values", hint: "Leave empty to accept any value." });
  const save = h("button", { type: "submit" }, "Add key");
  const form = h("form", { class: "panel", novalidate: true }, h("h3", {}, "Declare a label key"), name.el, values.el, h("div", { class: "form-actions" }, save));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await submitWith(form, save, () => api.post("/label-keys", { name: name.input.value.trim(), values: lines(values.input.value) }));
    if (!res) return;
    invalidate();
    toast(`Label key ${res.name} added`);
    renderKeys(box, await refdata(true), ctx);
  });
  return form;
}

function renderGroups(box, data, ctx) {
  replace(box, h("h2", { id: "groups-h" }, "Label groups"),
    h("p", { class: "muted" }, "A label group names several values of one key (e.g. every non-production env), usable wherever a label is."),
    table([
      { title: "Group", cell: (g) => groupChip(g.name) },
      { title: "Matches", cell: (g) => h("span", { class: "chips" }, g.values.map((v) => labelChip(g.key, v))) },
      { title: "", cell: (g) => (ctx.can("write") ? h("button", { type: "button", class: "danger", onclick: async () => {
        try { await api.del(`/label-groups/${api.enc(g.name)}`); invalidate(); toast(`Label group ${g.name} deleted from the draft`); renderGroups(box, await refdata(true), ctx); }
        catch (err) { toast(err.message, "error", 9000); }
      } }, "Delete") : null) },
    ], data.groups, { caption: "Label groups", empty: "No label groups yet." }),
    ctx.can("write") ? groupForm(box, data, ctx) : null);
}

function groupForm(box, data, ctx) {
  const name = textField({ label: "Group name", name: "name", field: "name" });
  const keyId = uid("f");
  const keySel = h("select", { id: keyId, "data-field": "key" }, data.keys.map((k) => h("option", { value: k.name }, k.name)));
  const valuesBox = h("fieldset", { "data-field": "values" });
  const renderValues = () => {
    const vals = valuesOf(data, keySel.value);
    replace(valuesBox, h("legend", {}, "Values"), vals.length
      ? vals.map((v) => h("label", { class: "check" }, h("input", { type: "checkbox", value: v.value }), labelChip(keySel.value, v.value)))
      : h("p", { class: "muted" }, "This key has no values yet."));
  };
  keySel.addEventListener("change", renderValues);
  renderValues();
  const save = h("button", { type: "submit" }, "Add group");
  const form = h("form", { class: "panel", novalidate: true }, h("h3", {}, "New label group (draft)"), name.el,
    h("div", { class: "field" }, h("label", { for: keyId }, "Key"), keySel), valuesBox, h("div", { class: "form-actions" }, save));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const values = [...valuesBox.querySelectorAll("input:checked")].map((i) => i.value);
    const res = await submitWith(form, save, () => api.post("/label-groups", { name: name.input.value.trim(), key: keySel.value, values }));
    if (!res) return;
    invalidate();
    toast(`Label group ${res.name} added to the draft`);
    renderGroups(box, await refdata(true), ctx);
  });
  return form;
}
