// Provision: the draft's changes against the active version, the impact preview (recorded
// flows replayed through the draft, newly blocked first), and provisioning with a message.
// When the controller refuses because recorded flows would be newly blocked, the operator
// sees why and may provision anyway, deliberately.

import { h, add, toast, replace, formatTime } from "../dom.js";
import * as api from "../api.js";
import { changeList } from "../diff.js";
import { textField, submitWith, showErrors } from "../forms.js";
import { loadImpact, impactView } from "../visibility.js";

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
      showErrors(form, err);
      if (!refused) return;
      const anyway = h("button", { type: "button", class: "danger", onclick: async () => {
        const v = await submitWith(form, anyway, async () => (await provision(true)).data);
        if (v) done(v);
      } }, "Provision anyway");
      replace(result, h("div", { class: "notice warn" }, "Recorded connections would be newly blocked (see the impact preview above). ", anyway));
    }
  });
  return form;
}
