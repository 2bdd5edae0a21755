// Provision: the draft's changes against the active version, the impact preview (recorded
// flows replayed through the draft, when the controller has the visibility API), and
// provisioning with a message.

import { h, add, toast, replace, formatTime } from "../dom.js";
import * as api from "../api.js";
import { changeList } from "../diff.js";
import { textField, submitWith } from "../forms.js";
import { impactPanel } from "../visibility.js";

export async function render(view, ctx) {
  const [diff, versions] = await Promise.all([
    api.get("/policy/diff", { base: "active", target: "draft" }),
    api.get("/policy/versions", { limit: 1 }),
  ]);
  const active = versions.items[0];
  const changes = diff.changes;
  const impactBox = h("section", { class: "panel", "aria-labelledby": "impact-h" }, h("h2", { id: "impact-h" }, "Impact preview"));
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
  impactPanel(impactBox, { changes }).catch((err) => impactBox.append(h("p", { class: "notice error" }, err.message)));
}

function provisionForm(ctx, changes) {
  const msg = textField({ label: "Message", name: "message", field: "message", hint: "What and why, e.g. “dev team may reach the new dev environment (TICKET-42)”." });
  const button = h("button", { type: "submit", class: "primary", disabled: !changes.length }, "Provision");
  const result = h("div", { role: "status" });
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "prov-h" },
    h("h2", { id: "prov-h" }, "Provision"),
    h("p", { class: "muted" }, "Freezes the draft as a new version and pushes it to every affected host."),
    msg.el, h("div", { class: "form-actions" }, button), result);
  if (!ctx.can("write")) button.disabled = true;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const v = await submitWith(form, button, () => api.post("/policy/provision", { message: msg.input.value }));
    if (!v) return;
    toast(`Version ${v.number} provisioned`);
    button.disabled = true;
    replace(result, h("div", { class: "notice" },
      h("strong", {}, `Version ${v.number} provisioned. `),
      `${v.affected_workloads.length} workload${v.affected_workloads.length === 1 ? "" : "s"} get new policy`,
      v.affected_workloads.length ? `: ${v.affected_workloads.slice(0, 12).join(", ")}${v.affected_workloads.length > 12 ? "…" : ""}` : "",
      ". ", h("a", { href: `#/versions/${v.number}` }, "See the version"), " · ", h("a", { href: "#/agents" }, "Watch the agents converge")));
  });
  return form;
}
