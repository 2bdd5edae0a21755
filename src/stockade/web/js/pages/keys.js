// API keys (owners only, as the API requires): list, create, revoke. A key's secret is in the
// creation answer only: it is shown once, in a dialog with a copy button and how to use it
// (STOCKADE_API_KEY for the CLI, a Bearer header for scripts); afterwards only its id and
// metadata exist. Revoking takes effect at the next request made with the key.

import { h, add, icon, replace, table, toast, formatTime, uid, copyText, announce } from "../dom.js";
import * as api from "../api.js";
import { textField, selectField, submitWith, lines } from "../forms.js";
import { ROLES, ownersOnly, scopeField, confirmDialog } from "./users.js";

export async function render(view, ctx) {
  if (!ctx.can("manage-users")) { ownersOnly(view, "API keys"); return; }
  const listBox = h("section", { "aria-labelledby": "keys-h" });
  add(view, h("div", { class: "page-head" }, h("h1", {}, "API keys")),
    h("p", { class: "muted" }, "Keys for scripts, CI and the CLI (", h("code", {}, "STOCKADE_API_KEY"),
      "). A key acts with its own role and scope, never more than its owner may."),
    listBox, createForm(listBox, ctx));
  await renderList(listBox, ctx);
}

function state(k) {
  return k.revoked_at ? h("span", { class: "badge" }, `revoked ${formatTime(k.revoked_at)}`) : "active";
}

async function renderList(box, ctx) {
  const keys = await api.get("/api-keys");
  keys.sort((a, b) => Number(Boolean(a.revoked_at)) - Number(Boolean(b.revoked_at)));
  replace(box, h("h2", { id: "keys-h" }, "Keys"),
    table([
      { title: "Name", cell: (k) => h("strong", {}, k.name) },
      { title: "Id", cell: (k) => h("code", {}, k.id) },
      { title: "Owner", cell: (k) => k.owner },
      { title: "Role", cell: (k) => k.role },
      { title: "Scope", cell: (k) => (k.scope.length ? k.scope.join(", ") : "—") },
      { title: "Created", cell: (k) => formatTime(k.created_at) },
      { title: "State", cell: state },
      { title: "", cell: (k) => (k.revoked_at ? null : h("button", { type: "button", class: "danger",
        "aria-label": `Revoke the key ${k.name} (${k.id})`, onclick: () => revoke(k, box, ctx) }, "Revoke")) },
    ], keys, { caption: "API keys", empty: "No API key yet.", rowAttrs: (k) => ({ "data-key": k.id }) }));
}

async function revoke(k, box, ctx) {
  if (!(await confirmDialog(`Revoke ${k.name}?`,
    `Every script or CLI using the key ${k.id} is refused from its next request. This cannot be undone.`, "Revoke key"))) return;
  try {
    await api.del(`/api-keys/${api.enc(k.id)}`);
    toast(`Key ${k.name} revoked`);
  } catch (err) {
    toast(err.message, "error");
  }
  await renderList(box, ctx);
}

function createForm(listBox, ctx) {
  const name = textField({ label: "Name", name: "name", field: "name", required: true,
    hint: "What uses it, e.g. ci-deploy", attrs: { autocomplete: "off" } });
  const role = selectField({ label: "Role", name: "role", options: ROLES, value: "read-only" });
  const scope = scopeField();
  const save = h("button", { type: "submit", class: "primary" }, "Create key");
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "new-key-h" },
    h("h2", { id: "new-key-h" }, "New API key"), name.el, role.el, scope.el, h("div", { class: "form-actions" }, save));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = { name: name.input.value.trim(), role: role.select.value, scope: lines(scope.input.value) };
    const res = await submitWith(form, save, () => api.post("/api-keys", body), { errorTitle: () => "Key not created" });
    if (!res) return;
    form.reset();
    await renderList(listBox, ctx);
    secretDialog(res);
  });
  return form;
}

function secretDialog(key) {
  const titleId = uid("dlg");
  const copyBtn = h("button", { type: "button", "data-role": "copy-key", onclick: async () => {
    const ok = await copyText(key.key);
    copyBtn.lastChild.textContent = ok ? " Copied" : " Select and copy";
    announce(ok ? "API key copied" : "Copy failed: select the key and copy it");
  } }, icon("copy"), " Copy");
  const dialog = h("dialog", { "aria-labelledby": titleId, "data-role": "api-key-secret" },
    h("h2", { id: titleId }, `API key ${key.name}`),
    h("p", {}, h("strong", {}, "Shown once."), " Only its hash is kept: copy it now."),
    h("div", { class: "copy-box" }, h("code", { "data-role": "api-key" }, key.key), copyBtn),
    h("p", {}, "For the CLI: ", h("code", {}, "export STOCKADE_API_KEY=<the key>"), "; for scripts: the header ",
      h("code", {}, "Authorization: Bearer <the key>"), "."),
    h("form", { method: "dialog" }, h("button", { type: "submit", class: "primary" }, "Done")));
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  copyBtn.focus();
  announce(`API key ${key.name} created; it is shown once`);
}
