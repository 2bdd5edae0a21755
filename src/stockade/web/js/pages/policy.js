// Provision: the draft's changes against the active version, the impact preview (recorded
// flows replayed through the draft, newly blocked first), and provisioning with a message.
// When the controller refuses because recorded flows would be newly blocked, the operator
// sees why and may provision anyway, deliberately.

import { h, add, toast, replace, formatTime } from "../dom.js";
import * as api from "../api.js";
import { changeList } from "../diff.js";
import { textField, submitWith, showErrors } from "../forms.js";
import { loadImpact, impactView, impactWords } from "../visibility.js";

export async function render(view, ctx) {
  const [diff, versions] = await Promise.all([
    api.get("/policy/diff", { base: "active", target: "draft" }),
    api.get("/policy/versions", { limit: 1 }),
  ]);
  const active = versions.items[0];
  const changes = diff.changes;
  const impactBox = h("section", { class: "panel", "aria-labelledby": "impact-h", "data-role": "impact-panel" },
    h("h2", { id: "impact-h" }, "Impact preview"), h("p", { class: "muted", role: "status" }, "Replaying recorded flows through the draft…"));
  add(view,
    h("div", { class: "page-head" }, h("h1", {}, "Review and provision")),
    h("p", {}, active
      ? h("span", {}, `Active version: ${active.number}, provisioned ${formatTime(active.created_at)} by ${active.author}: “${active.message}”. `, h("a", { href: "#/versions" }, "All versions"))
      : "Nothing provisioned yet: every host enforces only its mode's default and the failsafe."),
    h("section", { class: "panel", "aria-labelledby": "draft-h" },
      h("h2", { id: "draft-h" }, `Draft changes (${changes.length})`),
      changeList(changes, "The draft is the same as the active version: nothing to provision.")),
    impactBox,
    provisionForm(ctx, changes));
  try {
    const impact = await loadImpact();
    replace(impactBox, h("h2", { id: "impact-h" }, "Impact preview"), impact
      ? impactView(impact)
      : h("p", { class: "notice" }, "The impact preview replays recorded flows through the draft; this controller does not serve the visibility API, so review the changes above."));
  } catch (err) {
    replace(impactBox, h("h2", { id: "impact-h" }, "Impact preview"), h("p", { class: "notice error" }, err.message));
  }
}

function provisionForm(ctx, changes) {
  const msg = textField({ label: "Message", name: "message", field: "message", hint: "What and why, e.g. “dev team may reach the new dev environment (TICKET-42)”.", attrs: { class: "wide" } });
  const button = h("button", { type: "submit", class: "primary", disabled: !changes.length || !ctx.can("write") }, "Provision");
  const result = h("div", { role: "status" });
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "prov-h" },
    h("h2", { id: "prov-h" }, "Provision"),
    h("p", { class: "muted" }, "Freezes the draft as a new version and pushes it to every affected host."),
    msg.el, h("div", { class: "form-actions" }, button), result);
  const done = (v) => {
    toast(`Version ${v.number} provisioned`);
    button.disabled = true;
    const hosts = v.affected_workloads;
    replace(result, h("div", { class: "notice", "data-role": "provisioned" },
      h("strong", {}, `Version ${v.number} provisioned. `),
      `${hosts.length} workload${hosts.length === 1 ? " gets" : "s get"} new policy`,
      hosts.length ? `: ${hosts.slice(0, 12).join(", ")}${hosts.length > 12 ? "…" : ""}` : "",
      ". ", h("a", { href: `#/versions/${v.number}` }, "See the version"), " · ", h("a", { href: "#/map?window=version" }, "Watch the map"),
      " · ", h("a", { href: "#/agents" }, "Watch the agents converge")));
  };
  const provision = (proceed) => api.request("POST", "/policy/provision", { body: { message: msg.input.value }, params: proceed ? { proceed: "true" } : undefined });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    replace(result);
    button.disabled = true;
    try {
      done((await provision(false)).data);
    } catch (err) {
      button.disabled = false;
      const refused = err.status === 409 && err.kind === "ImpactRefusedError";
      if (!refused) { showErrors(form, err); return; }
      let impact = null;
      try { impact = await loadImpact(); } catch (_e) { impact = null; }
      const confirmed = await confirmProvision(err.message, impact);
      if (!confirmed) {
        replace(result, h("div", { class: "notice warn", "data-role": "not-provisioned" }, "Not provisioned: nothing changed on any host."));
        return;
      }
      const v = await submitWith(form, button, async () => (await provision(true)).data, { busy: "Provisioning…" });
      if (v) done(v);
    }
  });
  return form;
}

/**
 * Ask before a version that blocks or widens: a modal dialog listing, in words, what would be
 * newly blocked, newly allowed, and which rules reach more workloads. Resolves true to proceed.
 */
function confirmProvision(summary, impact) {
  return new Promise((resolve) => {
    const titleId = "confirm-prov-h";
    const proceed = h("button", { type: "button", class: "danger", "data-role": "confirm-provision" }, "Provision anyway");
    const cancel = h("button", { type: "button", class: "primary" }, "Cancel");
    const dialog = h("dialog", { class: "confirm", "aria-labelledby": titleId, "data-role": "provision-confirm" },
      h("h2", { id: titleId }, "Provision this version?"),
      h("p", {}, summary),
      impact ? impactWords(impact) : null,
      h("p", { class: "muted" }, "Provisioning pushes this to every affected host at once. Cancel to review the draft first."),
      h("div", { class: "form-actions" }, cancel, proceed));
    const finish = (answer) => { dialog.close(); dialog.remove(); resolve(answer); };
    proceed.addEventListener("click", () => finish(true));
    cancel.addEventListener("click", () => finish(false));
    dialog.addEventListener("cancel", (ev) => { ev.preventDefault(); finish(false); }); // Escape
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}
