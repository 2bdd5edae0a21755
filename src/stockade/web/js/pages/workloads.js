// Workloads: search by name, filter by labels; detail with interfaces, mode, agent state and
// convergence; relabel (PUT with If-Match) and mode switch.

import { h, add, icon, table, formatTime, toast, replace, debounce, uid, announce } from "../dom.js";
import * as api from "../api.js";
import { labelChips } from "../labels.js";
import { refdata, invalidate } from "../refdata.js";
import { labelFilterPicker, selectorValueKey, selectorValueChip, labelSuggestions } from "../selectors.js";
import { ChipPicker } from "../picker.js";
import { submitWith, textField } from "../forms.js";

export const MODES = [
  ["idle", "Idle — the agent touches nothing"],
  ["visibility", "Visibility — nothing blocked, would-be blocks reported"],
  ["selective", "Selective — only deny rules enforced"],
  ["full", "Full — default deny, only allowed traffic passes"],
];

export function agentStatus(agent) {
  if (!agent) return h("span", { class: "muted" }, "no agent (unmanaged)");
  return h("span", { class: ["status", agent.status] }, agent.status);
}

export function convergence(agent) {
  if (!agent) return h("span", { class: "muted" }, "—");
  if (agent.revoked) return h("span", { class: "muted" }, "revoked");
  return agent.converged
    ? h("span", {}, "✓ converged ", h("span", { class: "muted" }, `(rev ${agent.applied_revision})`), proof(agent))
    : h("span", {}, "… applying ", h("span", { class: "muted" }, `(${agent.applied_revision} of ${agent.desired_revision})`));
}

// The last proof the agent reported: kernel == policy for every packet (stockade verify).
function proof(agent) {
  if (agent.enforcement === "proven") return h("span", { title: agent.proof_detail || "" }, " · ∀ proven");
  if (agent.enforcement === "differs") return h("strong", { title: agent.proof_detail || "" }, " · ⚠ differs: ", agent.proof_detail || "");
  return h("span", { class: "muted" }, " · not proven");
}

function addresses(body) {
  const all = (body.interfaces || []).flatMap((i) => i.addresses);
  if (!all.length) return h("span", { class: "muted" }, "none reported");
  return h("span", { class: "mono" }, all.slice(0, 3).join(", ") + (all.length > 3 ? ` +${all.length - 3}` : ""));
}

export async function render(view, ctx) {
  if (ctx.parts[1] === "new") return renderNew(view, ctx);
  if (ctx.parts[1]) return renderDetail(view, ctx, ctx.parts[1]);
  return renderList(view, ctx);
}

function labelsParam(values) {
  return values.filter((v) => v.t === "label").map((v) => `${v.key}=${v.value}`).join(",");
}

async function renderList(view, ctx) {
  const data = await refdata();
  const q = ctx.query.get("q") || "";
  const initialLabels = (ctx.query.get("labels") || "").split(",").filter((s) => s.includes("="))
    .map((s) => { const [key, value] = s.split("="); return { t: "label", key, value }; });
  const searchId = uid("f");
  const filterLabelId = uid("lbl");
  const search = h("input", { type: "search", id: searchId, value: q, placeholder: "Name contains…", "aria-keyshortcuts": "/" });
  const filter = labelFilterPicker({ data, labelId: filterLabelId, values: initialLabels, onChange: () => reload() });
  const results = h("div", { "aria-live": "polite" });
  const count = h("p", { class: "muted" });
  add(view, 
    h("div", { class: "page-head" }, h("h1", {}, "Workloads"),
      h("div", { class: "actions" }, ctx.can("write") ? h("a", { class: "button", href: "#/workloads/new" }, icon("plus"), "New workload") : null)),
    h("div", { class: "toolbar", role: "search" },
      h("div", {}, h("label", { for: searchId }, icon("search"), " Search"), search),
      h("div", { style: null }, h("label", { id: filterLabelId }, "Labels (all must match)"), filter.el)),
    count, results);

  let cursor = null;
  let rows = [];
  let agents = new Map();
  const load = async (more) => {
    const labels = labelsParam(filter.values);
    const params = { limit: 100, name: search.value.trim() || undefined, labels: labels || undefined, cursor: more ? cursor : undefined };
    const [page, agentList] = await Promise.all([api.get("/workloads", params), more ? null : api.get("/agents")]);
    if (agentList) agents = new Map(agentList.filter((a) => !a.revoked).map((a) => [a.workload, a]));
    rows = more ? rows.concat(page.items) : page.items;
    cursor = page.next_cursor;
    const hash = new URLSearchParams();
    if (search.value.trim()) hash.set("q", search.value.trim());
    if (labels) hash.set("labels", labels);
    const next = `#/workloads${hash.toString() ? `?${hash}` : ""}`;
    if (window.location.hash !== next) window.history.replaceState(null, "", next);
    count.textContent = `${rows.length}${cursor ? "+" : ""} workload${rows.length === 1 ? "" : "s"}`;
    replace(results,
      table([
        { title: "Name", cell: (w) => h("a", { href: `#/workloads/${encodeURIComponent(w.name)}` }, w.name) },
        { title: "Labels", cell: (w) => labelChips(w.body.labels) },
        { title: "Mode", cell: (w) => w.body.mode },
        { title: "Agent", cell: (w) => agentStatus(agents.get(w.name)) },
        { title: "Policy", cell: (w) => convergence(agents.get(w.name)) },
        { title: "Addresses", cell: (w) => addresses(w.body) },
      ], rows, { caption: "Workloads", empty: "No workload matches." }),
      cursor ? h("div", { class: "pager" }, h("button", { type: "button", onclick: () => load(true) }, "Load more")) : null);
    announce(count.textContent);
  };
  const reload = debounce(() => load(false).catch((e) => toast(e.message, "error")), 200);
  search.addEventListener("input", reload);
  await load(false);
}

// ---- detail ----------------------------------------------------------------------------

async function renderDetail(view, ctx, name) {
  const [{ data: obj, etag }, agentList, data] = await Promise.all([
    api.request("GET", `/workloads/${api.enc(name)}`), api.get("/agents", { workload: name }), refdata(),
  ]);
  let current = obj;
  let currentEtag = etag;
  const agent = agentList.find((a) => !a.revoked) || agentList[0];
  const body = obj.body;

  const labelsId = uid("lbl");
  const picker = new ChipPicker({
    labelId: labelsId, field: "labels",
    values: Object.entries(body.labels || {}).map(([key, value]) => ({ t: "label", key, value })),
    keyOf: selectorValueKey, chip: selectorValueChip,
    replaces: (n, o) => n.key === o.key,
    placeholder: "Add or change a label, e.g. env=dev",
    suggest: (text) => labelSuggestions(data, text, { groups: false, exclusions: false }),
  });
  const saveLabels = h("button", { type: "submit", class: "primary" }, "Save labels");
  const labelForm = h("form", { class: "panel", "aria-labelledby": labelsId, novalidate: true },
    h("h2", { id: labelsId }, "Labels"),
    h("div", { class: "field" }, picker.el, h("div", { class: "hint" }, "One value per key. Picking env=prod replaces env=dev. Saving takes effect at once: peers' address sets are updated.")),
    h("div", { class: "form-actions" }, saveLabels, h("span", { class: "muted", "data-role": "label-status" })));
  labelForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const labels = Object.fromEntries(picker.values.map((v) => [v.key, v.value]));
    const res = await submitWith(labelForm, saveLabels, () => api.request("PUT", `/workloads/${api.enc(name)}`, { body: { ...current.body, labels }, etag: currentEtag }));
    if (!res) return;
    current = res.data;
    currentEtag = res.etag;
    invalidate();
    labelForm.querySelector("[data-role=label-status]").textContent = `Saved (revision ${current.revision}).`;
    toast(`Labels of ${name} saved`);
  });

  const modeSelect = h("select", { id: uid("f"), "data-field": "mode" }, MODES.map(([v, t]) => h("option", { value: v, selected: v === body.mode }, t)));
  const saveMode = h("button", { type: "submit" }, "Change mode");
  const modeForm = h("form", { class: "panel", novalidate: true },
    h("h2", {}, "Enforcement mode"),
    h("div", { class: "field" }, h("label", { for: modeSelect.id }, "Mode"), modeSelect),
    h("div", { class: "form-actions" }, saveMode));
  modeForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await submitWith(modeForm, saveMode, () => api.request("PUT", `/workloads/${api.enc(name)}/mode`, { body: { mode: modeSelect.value }, etag: currentEtag }));
    if (!res) return;
    current = res.data;
    currentEtag = res.etag;
    toast(`${name} is now in ${current.body.mode} mode`);
  });

  const hostPolicy = h("div", {}, h("button", { type: "button", onclick: async () => {
    try {
      const hp = await api.get(`/workloads/${api.enc(name)}/host-policy`);
      const rules = hp.policy.rules || [];
      replace(hostPolicy, h("p", {}, `Revision ${hp.revision}: ${rules.length} rule${rules.length === 1 ? "" : "s"}, mode ${hp.policy.mode}.`),
        h("details", {}, h("summary", {}, "Compiled host policy (JSON)"), h("pre", { class: "mono" }, JSON.stringify(hp.policy, null, 2))));
    } catch (err) { replace(hostPolicy, h("p", { class: "notice error" }, err.message)); }
  } }, "Show the compiled host policy"));

  add(view, 
    h("p", {}, h("a", { href: "#/workloads" }, "← Workloads")),
    h("div", { class: "page-head" }, h("h1", {}, icon("workload", "icon icon-lg"), " ", name),
      h("div", { class: "actions" }, h("a", { class: "button", href: `#/map?focus=${encodeURIComponent(name)}` }, "Show on the map"),
        h("a", { class: "button", href: `#/explorer?workload=${encodeURIComponent(name)}` }, "Flows"))),
    body.description ? h("p", {}, body.description) : null,
    h("div", { class: "cols" },
      h("div", {}, labelForm, modeForm),
      h("div", {},
        h("section", { class: "panel", "aria-labelledby": "agent-h" }, h("h2", { id: "agent-h" }, "Agent"),
          agent ? h("dl", { class: "kv" },
            h("dt", {}, "State"), h("dd", {}, agentStatus(agent)),
            h("dt", {}, "Policy"), h("dd", {}, convergence(agent)),
            h("dt", {}, "Desired revision"), h("dd", {}, String(agent.desired_revision)),
            h("dt", {}, "Applied revision"), h("dd", {}, String(agent.applied_revision)),
            h("dt", {}, "Last heartbeat"), h("dd", {}, formatTime(agent.last_heartbeat)),
            h("dt", {}, "Agent id"), h("dd", { class: "mono" }, agent.id),
            h("dt", {}, "Pairing profile"), h("dd", {}, agent.profile),
            h("dt", {}, "Backend setting"), h("dd", {}, body.backend || "the agent's own (--backend)"),
            h("dt", {}, "Backend in force"), h("dd", {}, agent.backend || "not reported yet"))
            : h("p", { class: "muted" }, "No agent: this workload is unmanaged (its addresses still count in peers' rules).")),
        h("section", { class: "panel", "aria-labelledby": "if-h" }, h("h2", { id: "if-h" }, "Interfaces"),
          table([
            { title: "Interface", cell: (i) => h("span", { class: "mono" }, i.name) },
            { title: "Addresses", cell: (i) => h("span", { class: "mono" }, i.addresses.join(", ") || "—") },
          ], body.interfaces || [], { caption: "Interfaces", empty: "No interface reported." })),
        h("section", { class: "panel", "aria-labelledby": "hp-h" }, h("h2", { id: "hp-h" }, "Host policy"), hostPolicy))));
}

// ---- new (unmanaged) workload ------------------------------------------------------------

async function renderNew(view, ctx) {
  const data = await refdata();
  const nameF = textField({ label: "Name", name: "name", field: "name", attrs: { autofocus: true } });
  const labelsId = uid("lbl");
  const picker = new ChipPicker({
    labelId: labelsId, field: "labels", values: [],
    keyOf: selectorValueKey, chip: selectorValueChip, replaces: (n, o) => n.key === o.key,
    placeholder: "e.g. role=web", suggest: (text) => labelSuggestions(data, text, { groups: false, exclusions: false }),
  });
  const ifName = textField({ label: "Interface name", name: "ifname", field: "interfaces.0.name", value: "eth0" });
  const addrs = textField({ label: "Addresses (comma separated)", name: "addresses", field: "interfaces.0.addresses",
    hint: "IPv4 or IPv6 addresses of this interface, e.g. 10.0.0.5, fd00::5" });
  const mode = h("select", { id: uid("f"), "data-field": "mode" }, MODES.map(([v, t]) => h("option", { value: v, selected: v === "visibility" }, t)));
  const save = h("button", { type: "submit", class: "primary" }, "Create workload");
  const form = h("form", { class: "panel", novalidate: true }, nameF.el,
    h("div", { class: "field" }, h("label", { id: labelsId }, "Labels"), picker.el),
    ifName.el, addrs.el,
    h("div", { class: "field" }, h("label", { for: mode.id }, "Mode"), mode),
    h("div", { class: "form-actions" }, save, h("a", { href: "#/workloads" }, "Cancel")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const addresses = addrs.input.value.split(/[\s,]+/).filter(Boolean);
    const body = {
      name: nameF.input.value.trim(),
      labels: Object.fromEntries(picker.values.map((v) => [v.key, v.value])),
      interfaces: addresses.length ? [{ name: ifName.input.value.trim(), addresses }] : [],
      mode: mode.value,
    };
    const res = await submitWith(form, save, () => api.post("/workloads", body));
    if (!res) return;
    invalidate();
    toast(`Workload ${res.name} created`);
    ctx.go(`workloads/${encodeURIComponent(res.name)}`);
  });
  add(view, h("p", {}, h("a", { href: "#/workloads" }, "← Workloads")), h("h1", {}, "New workload"),
    h("p", { class: "muted" }, "Workloads with an agent are created at enrolment (see Agents → pairing profiles). Create one here for a host without an agent."), form);
}
