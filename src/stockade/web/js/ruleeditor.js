// The rule editor shared by rulesets (allow rules) and deny rules: consumers and providers
// as label pickers, a services picker, the allow's encryption (WireGuard), and a
// plain-language summary of what the rule allows.

import { h, icon, uid, replace } from "./dom.js";
import { SelectorListEditor, servicesPicker } from "./selectors.js";
import { selectorList, serviceChip } from "./labels.js";

/** Rewrite "rules.<n>" prefixes of every data-field inside ``el``. */
export function reindex(el, prefix, index) {
  const re = new RegExp(`^${prefix}\\.\\d+`);
  el.querySelectorAll("[data-field]").forEach((node) => {
    node.dataset.field = node.dataset.field.replace(re, `${prefix}.${index}`);
  });
}

/**
 * One rule. ``base`` is its API path ("rules.0" for a ruleset's rule, "" for a deny rule).
 * Returns {el, value(), setIndex(i), focus()}.
 */
export function ruleEditor({ data, rule = {}, base, title, kind = "allow", onRemove, rulesetEncrypts = () => false }) {
  const p = (f) => (base ? `${base}.${f}` : f);
  const sentence = h("p", { class: "rule-sentence", "aria-live": "polite" });
  const update = () => {
    const c = consumers.value();
    const pr = providers.value();
    const s = services.values;
    const verb = kind === "allow" ? "may reach" : (override.checked ? "can never reach (override deny)" : "may not reach (deny, unless an allow crosses it)");
    replace(sentence, h("span", { class: "muted" }, "In words: "), selectorList(c, "(no consumer yet)"),
      kind === "allow" && scopeSel.value === "intra" && c.length ? h("span", { class: "muted" }, " within the scope") : null,
      ` ${verb} `, selectorList(pr, "(no provider yet)"), " on ",
      s.length ? h("span", { class: "chips" }, s.map((n) => serviceChip(n))) : h("span", { class: "muted" }, "(no service yet)"),
      kind === "allow" && (encrypt.checked || rulesetEncrypts())
        ? h("span", { class: "encrypted", "data-role": "rule-encrypted" }, ", ", icon("lock"), " encrypted (WireGuard): the same traffic in the clear is dropped")
        : null);
  };
  const consumersId = uid("lbl");
  const providersId = uid("lbl");
  const servicesId = uid("lbl");
  const consumers = new SelectorListEditor({ data, labelText: "Consumers", field: p("consumers"), selectors: rule.consumers || [], onChange: update });
  const providers = new SelectorListEditor({ data, labelText: "Providers", field: p("providers"), selectors: rule.providers || [], onChange: update });
  const services = servicesPicker({ data, labelId: servicesId, field: p("services"), values: rule.services || [], onChange: update });
  const scopeSel = h("select", { "data-field": p("consumers_scope"), "aria-label": "Where consumers may be" },
    h("option", { value: "intra", selected: (rule.consumers_scope || "intra") === "intra" }, "inside the ruleset's scope"),
    h("option", { value: "global", selected: rule.consumers_scope === "global" }, "anywhere (extra-scope)"));
  scopeSel.addEventListener("change", update);
  const encrypt = h("input", { type: "checkbox", checked: Boolean(rule.encrypt), "data-field": p("encrypt") });
  encrypt.addEventListener("change", update);
  const override = h("input", { type: "checkbox", checked: Boolean(rule.override), "data-field": p("override") });
  override.addEventListener("change", update);
  const descId = uid("f");
  const desc = h("input", { id: descId, type: "text", value: rule.description || "", "data-field": p("description") });
  const grid = h("div", { class: "rule-grid" },
    h("div", { class: "rg-label", id: consumersId }, "Consumers"),
    h("div", {}, consumers.el, kind === "allow" ? h("div", { class: "inline" }, h("span", { class: "muted" }, "Consumers are"), scopeSel) : null),
    h("div", { class: "rg-label", id: providersId }, "Providers"), h("div", {}, providers.el),
    h("div", { class: "rg-label", id: servicesId }, "Services"), h("div", { "data-field": p("services") }, services.el),
    kind === "allow" ? h("div", { class: "rg-label" }, "Encryption") : null,
    kind === "allow" ? h("div", {}, h("label", { class: "check" }, encrypt,
      "Encrypt: only through WireGuard between the two workloads (both need a registered key); the same traffic in the clear is dropped")) : null,
    kind === "deny" ? h("div", { class: "rg-label" }, "Override") : null,
    kind === "deny" ? h("div", {}, h("label", { class: "check" }, override, "Override deny: absolute, no allow rule can cross it")) : null,
    h("label", { class: "rg-label", for: descId }, "Note"), h("div", {}, desc));
  consumers.el.setAttribute("aria-labelledby", consumersId);
  providers.el.setAttribute("aria-labelledby", providersId);
  const el = h("section", { class: "rule-card", "data-rule": "", "aria-label": title },
    title ? h("header", {}, h("h3", {}, title),
      onRemove ? h("button", { type: "button", class: "danger", style: null, onclick: () => onRemove(), "aria-label": `Remove ${title}` }, icon("close"), "Remove") : null) : null,
    sentence, grid);
  update();
  return {
    el,
    value() {
      const out = { consumers: consumers.value(), providers: providers.value(), services: [...services.values], description: desc.value };
      if (kind === "allow") { out.consumers_scope = scopeSel.value; if (encrypt.checked) out.encrypt = true; }
      else out.override = override.checked;
      return out;
    },
    setIndex(i, newTitle) {
      if (!base) return;
      const prefix = base.replace(/\.\d+$/, "");
      reindex(el, prefix, i);
      consumers.setField(`${prefix}.${i}.consumers`);
      providers.setField(`${prefix}.${i}.providers`);
      if (newTitle) { el.setAttribute("aria-label", newTitle); const t = el.querySelector("h3"); if (t) t.textContent = newTitle; }
    },
    focus() { consumers.focus(); },
    refresh: update,
  };
}
