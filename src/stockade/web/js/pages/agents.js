// Agents (state, convergence, revoke) and pairing profiles (preset labels and mode, activation
// codes shown once with the install command to copy).

import { h, add, icon, table, toast, formatTime, replace, uid, copyText, announce } from "../dom.js";
import * as api from "../api.js";
import { labelChips } from "../labels.js";
import { refdata } from "../refdata.js";
import { ChipPicker } from "../picker.js";
import { labelSuggestions, selectorValueKey, selectorValueChip } from "../selectors.js";
import { textField, submitWith } from "../forms.js";
import { agentStatus, convergence, MODES } from "./workloads.js";

export async function render(view, ctx) {
  const agentsBox = h("section", { "aria-labelledby": "agents-h" });
  const profilesBox = h("section", { "aria-labelledby": "profiles-h" });
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Agents and pairing")), agentsBox, profilesBox);
  await Promise.all([renderAgents(agentsBox, ctx), renderProfiles(profilesBox, ctx)]);
  const timer = window.setInterval(() => { if (ctx.isCurrent()) renderAgents(agentsBox, ctx).catch(() => {}); }, 5000);
  ctx.onLeave(() => window.clearInterval(timer));
}

async function renderAgents(box, ctx) {
  const [agents, conv] = await Promise.all([api.get("/agents"), api.get("/convergence")]);
  replace(box, h("h2", { id: "agents-h" }, "Agents"),
    h("p", {}, `${conv.agents} agent${conv.agents === 1 ? "" : "s"}: ${conv.online} online, ${conv.offline} offline; ${conv.converged} converged`,
      conv.lagging.length ? `, applying: ${conv.lagging.slice(0, 10).join(", ")}${conv.lagging.length > 10 ? "…" : ""}` : "", "."),
    table([
      { title: "Workload", cell: (a) => h("a", { href: `#/workloads/${encodeURIComponent(a.workload)}` }, a.workload) },
      { title: "State", cell: (a) => agentStatus(a) },
      { title: "Policy", cell: (a) => convergence(a) },
      { title: "Last heartbeat", cell: (a) => formatTime(a.last_heartbeat) },
      { title: "Profile", cell: (a) => a.profile },
      { title: "Enrolled", cell: (a) => formatTime(a.created_at) },
      { title: "", cell: (a) => (ctx.can("write") && !a.revoked ? h("button", { type: "button", class: "danger", "aria-label": `Revoke the agent of ${a.workload}`, onclick: async () => {
        try { await api.post(`/agents/${api.enc(a.id)}/revoke`); toast(`Agent of ${a.workload} revoked`); renderAgents(box, ctx); }
        catch (err) { toast(err.message, "error"); }
      } }, "Revoke") : null) },
    ], agents, { caption: "Agents", empty: "No agent has enrolled yet. Create an activation code below and run the install command on a host." }));
}

function installCommand(code) {
  const origin = window.location.origin;
  const ca = window.location.protocol === "https:" ? " --ca-cert ca.pem" : "";
  // the code goes through standard input (echo is a shell builtin): never an argument, which ps shows
  return `echo ${code} | sudo stockade agent install --controller ${origin} --activation-code-file -${ca} --start`;
}

function codeDialog(profile, code) {
  const cmd = installCommand(code.code);
  const copyBtn = h("button", { type: "button", onclick: async () => {
    const ok = await copyText(cmd);
    copyBtn.lastChild.textContent = ok ? " Copied" : " Select and copy";
    announce(ok ? "Install command copied" : "Copy failed: select the command and copy it");
  } }, icon("copy"), " Copy");
  const titleId = uid("dlg");
  const dlg = h("dialog", { "aria-labelledby": titleId, "data-role": "activation-code" },
    h("h2", { id: titleId }, `Activation code for ${profile.name}`),
    h("p", {}, "Shown once: only its hash is kept. Run this on the host (as root):"),
    h("div", { class: "copy-box" }, h("code", { "data-role": "install-command" }, cmd), copyBtn),
    window.location.protocol === "https:" ? h("p", { class: "muted" }, "Copy the controller's CA certificate (<data-dir>/tls/ca.pem) to the host as ca.pem first: the agent pins it.") : null,
    h("p", {}, "Code only: ", h("code", { "data-role": "code" }, code.code)),
    h("form", { method: "dialog" }, h("button", { type: "submit", class: "primary" }, "Done")));
  dlg.addEventListener("close", () => dlg.remove());
  document.body.append(dlg);
  dlg.showModal();
  copyBtn.focus();
}

async function renderProfiles(box, ctx) {
  const profiles = await api.listAll("/pairing-profiles");
  replace(box, h("h2", { id: "profiles-h" }, "Pairing profiles"),
    h("p", { class: "muted" }, "A profile presets the labels and mode of the workloads its activation codes enrol."),
    table([
      { title: "Profile", cell: (p) => h("strong", {}, p.name) },
      { title: "Labels", cell: (p) => labelChips(p.labels) },
      { title: "Mode", cell: (p) => p.mode },
      { title: "Uses", class: "num", cell: (p) => `${p.uses}${p.max_uses ? ` of ${p.max_uses}` : ""}` },
      { title: "Expires", cell: (p) => (p.expires_at ? formatTime(p.expires_at) : "never") },
      { title: "Enabled", cell: (p) => (p.enabled ? "yes" : "no") },
      { title: "", cell: (p) => (ctx.can("write") ? h("button", { type: "button", "aria-label": `Create an activation code for ${p.name}`, onclick: async () => {
        try { codeDialog(p, await api.post(`/pairing-profiles/${api.enc(p.name)}/codes`)); }
        catch (err) { toast(err.message, "error"); }
      } }, icon("plus"), "Activation code") : null) },
    ], profiles, { caption: "Pairing profiles", empty: "No pairing profile yet." }),
    ctx.can("write") ? await profileForm(box, ctx) : null);
}

async function profileForm(box, ctx) {
  const data = await refdata();
  const name = textField({ label: "Name", name: "name", field: "name" });
  const labelsId = uid("lbl");
  const picker = new ChipPicker({
    labelId: labelsId, field: "labels", values: [], keyOf: selectorValueKey, chip: selectorValueChip,
    replaces: (n, o) => n.key === o.key, placeholder: "e.g. env=dev",
    suggest: (text) => labelSuggestions(data, text, { groups: false, exclusions: false }),
  });
  const modeId = uid("f");
  const mode = h("select", { id: modeId, "data-field": "mode" }, MODES.map(([v, t]) => h("option", { value: v, selected: v === "visibility" }, t)));
  const maxUses = textField({ label: "Maximum uses (optional)", name: "max_uses", field: "max_uses", type: "number", attrs: { min: 1 } });
  const expId = uid("f");
  const expires = h("input", { id: expId, type: "datetime-local", "data-field": "expires_at" });
  const save = h("button", { type: "submit" }, "Create profile");
  const form = h("form", { class: "panel", novalidate: true }, h("h3", {}, "New pairing profile"), name.el,
    h("div", { class: "field" }, h("label", { id: labelsId }, "Labels for enrolled workloads"), picker.el),
    h("div", { class: "field" }, h("label", { for: modeId }, "Mode"), mode), maxUses.el,
    h("div", { class: "field" }, h("label", { for: expId }, "Expires (optional)"), expires),
    h("div", { class: "form-actions" }, save));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {
      name: name.input.value.trim(),
      labels: Object.fromEntries(picker.values.map((v) => [v.key, v.value])),
      mode: mode.value,
      max_uses: maxUses.input.value ? Number(maxUses.input.value) : null,
      expires_at: expires.value ? new Date(expires.value).toISOString() : null,
    };
    const res = await submitWith(form, save, () => api.post("/pairing-profiles", body));
    if (!res) return;
    toast(`Pairing profile ${res.name} created`);
    renderProfiles(box, ctx);
  });
  return form;
}
