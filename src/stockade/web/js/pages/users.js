// Users (owners only, as the API requires): list, create, change role / scope / password,
// disable or enable, delete. Every edit sends the ETag the list showed (If-Match), so a change
// made meanwhile by someone else is refused (412) instead of overwritten. The API refuses to
// demote, disable or delete the last enabled owner; its message is shown as it comes.

import { h, add, replace, table, toast, formatTime, uid, announce } from "../dom.js";
import * as api from "../api.js";
import { textField, selectField, submitWith, lines } from "../forms.js";

export const ROLES = [
  ["read-only", "Read-only: sees everything, changes nothing"],
  ["ruleset-manager", "Ruleset manager: edits rulesets within a label scope"],
  ["admin", "Admin: edits everything but users and API keys"],
  ["owner", "Owner: everything, users and API keys included"],
];

export function ownersOnly(view, what) {
  add(view, h("div", { class: "page-head" }, h("h1", {}, what)),
    h("p", { class: "notice", role: "status" }, `Only owners manage ${what.toLowerCase()}. Ask an owner of this controller.`));
}

/** Scope: labels as key=value, comma or newline separated (for ruleset managers). */
export function scopeField(value = []) {
  return textField({
    label: "Scope (labels, for ruleset managers)", name: "scope", field: "scope", value: value.join(", "),
    hint: "key=value labels, comma separated, e.g. app=shop, env=prod. Empty: every workload.",
  });
}

/** A modal "are you sure" dialog; resolves true when the danger button is pressed. */
export function confirmDialog(title, text, action) {
  return new Promise((resolve) => {
    const titleId = uid("dlg");
    const proceed = h("button", { type: "button", class: "danger", "data-role": "confirm" }, action);
    const cancel = h("button", { type: "button", class: "primary" }, "Cancel");
    const dialog = h("dialog", { class: "confirm", "aria-labelledby": titleId },
      h("h2", { id: titleId }, title), h("p", {}, text), h("div", { class: "form-actions" }, cancel, proceed));
    const finish = (answer) => { dialog.close(); dialog.remove(); resolve(answer); };
    proceed.addEventListener("click", () => finish(true));
    cancel.addEventListener("click", () => finish(false));
    dialog.addEventListener("cancel", (ev) => { ev.preventDefault(); finish(false); });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

export async function render(view, ctx) {
  if (!ctx.can("manage-users")) { ownersOnly(view, "Users"); return; }
  const listBox = h("section", { "aria-labelledby": "users-h" });
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Users")),
    h("p", { class: "muted" }, "People who log in to the console and the CLI (", h("code", {}, "stockade login"), "). API keys for scripts are on the ",
      h("a", { href: "#/keys" }, "API keys"), " page."),
    listBox, createForm(listBox, ctx));
  await renderList(listBox, ctx);
}

async function renderList(box, ctx) {
  const users = await api.get("/users");
  replace(box, h("h2", { id: "users-h" }, "Users"),
    table([
      { title: "User", cell: (u) => h("strong", {}, u.username, u.username === ctx.user.name ? " (you)" : "") },
      { title: "Role", cell: (u) => u.role },
      { title: "Scope", cell: (u) => (u.scope.length ? u.scope.join(", ") : "—") },
      { title: "State", cell: (u) => (u.disabled ? h("span", { class: "badge" }, "disabled") : "enabled") },
      { title: "Created", cell: (u) => formatTime(u.created_at) },
      { title: "", cell: (u) => h("div", { class: "row-actions" },
        h("button", { type: "button", "aria-label": `Edit ${u.username}`, onclick: () => editDialog(u, box, ctx) }, "Edit"),
        h("button", { type: "button", "aria-label": `${u.disabled ? "Enable" : "Disable"} ${u.username}`,
          onclick: () => setDisabled(u, !u.disabled, box, ctx) }, u.disabled ? "Enable" : "Disable"),
        h("button", { type: "button", class: "danger", "aria-label": `Delete ${u.username}`,
          onclick: () => remove(u, box, ctx) }, "Delete")) },
    ], users, { caption: "Users", empty: "No users.", rowAttrs: (u) => ({ "data-user": u.username }) }));
}

async function setDisabled(u, disabled, box, ctx) {
  if (disabled && !(await confirmDialog(`Disable ${u.username}?`,
    `${u.username} can no longer log in; sessions and API keys stay until you delete the user.`, "Disable"))) return;
  try {
    await api.put(`/users/${api.enc(u.username)}`, { disabled }, u.etag);
    toast(`${u.username} ${disabled ? "disabled" : "enabled"}`);
  } catch (err) {
    toast(err.status === 412 ? `${u.username} was changed meanwhile: the list is reloaded, try again` : err.message, "error");
  }
  await renderList(box, ctx);
}

async function remove(u, box, ctx) {
  if (!(await confirmDialog(`Delete ${u.username}?`,
    `${u.username}'s sessions end and every API key they own is revoked. This cannot be undone.`, "Delete user"))) return;
  try {
    await api.del(`/users/${api.enc(u.username)}`, u.etag);
    toast(`${u.username} deleted`);
  } catch (err) {
    toast(err.status === 412 ? `${u.username} was changed meanwhile: the list is reloaded, try again` : err.message, "error");
  }
  await renderList(box, ctx);
}

function createForm(listBox, ctx) {
  const name = textField({ label: "Username", name: "username", field: "username", required: true, attrs: { autocomplete: "off" } });
  const password = textField({ label: "Password", name: "password", field: "password", type: "password", required: true,
    hint: "At least 12 characters. Give it to the person over a safe channel.", attrs: { autocomplete: "new-password" } });
  const role = selectField({ label: "Role", name: "role", options: ROLES, value: "read-only" });
  const scope = scopeField();
  const save = h("button", { type: "submit", class: "primary" }, "Create user");
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "new-user-h" },
    h("h2", { id: "new-user-h" }, "New user"), name.el, password.el, role.el, scope.el, h("div", { class: "form-actions" }, save));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = { username: name.input.value.trim(), password: password.input.value, role: role.select.value,
      scope: lines(scope.input.value) };
    const res = await submitWith(form, save, () => api.post("/users", body), { errorTitle: () => "User not created" });
    if (!res) return;
    form.reset();
    toast(`User ${res.username} created`);
    announce(`User ${res.username} created`);
    await renderList(listBox, ctx);
  });
  return form;
}

function editDialog(u, box, ctx) {
  const titleId = uid("dlg");
  const role = selectField({ label: "Role", name: "role", options: ROLES, value: u.role });
  const scope = scopeField(u.scope);
  const password = textField({ label: "New password (optional)", name: "password", field: "password", type: "password",
    hint: "At least 12 characters. Changing it ends the user's other sessions.", attrs: { autocomplete: "new-password" } });
  const save = h("button", { type: "submit", class: "primary" }, "Save");
  const cancel = h("button", { type: "button" }, "Cancel");
  const form = h("form", { novalidate: true }, role.el, scope.el, password.el, h("div", { class: "form-actions" }, cancel, save));
  const dialog = h("dialog", { "aria-labelledby": titleId, "data-role": "edit-user" }, h("h2", { id: titleId }, `Edit ${u.username}`), form);
  const close = () => { dialog.close(); dialog.remove(); };
  cancel.addEventListener("click", close);
  dialog.addEventListener("cancel", (ev) => { ev.preventDefault(); close(); });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {};
    if (role.select.value !== u.role) body.role = role.select.value;
    const newScope = lines(scope.input.value);
    if (newScope.join(",") !== u.scope.join(",")) body.scope = newScope;
    if (password.input.value) body.password = password.input.value;
    if (!Object.keys(body).length) { close(); return; }
    const res = await submitWith(form, save, () => api.put(`/users/${api.enc(u.username)}`, body, u.etag),
      { errorTitle: (err) => (err.status === 412 ? undefined : "Not saved") });
    if (!res) return;
    close();
    toast(`${u.username} saved`);
    await renderList(box, ctx);
  });
  document.body.append(dialog);
  dialog.showModal();
  role.select.focus();
}
