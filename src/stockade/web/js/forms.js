// Form errors from the API, next to the field they concern. Elements declare the API path of
// their value with data-field ("name", "rules.0.consumers", "interfaces.1.addresses.0"); an issue
// goes to the element with the longest matching path, the rest to a summary at the top of the
// form. The form itself is never re-rendered on a failed save, so nothing typed is lost.

import { h, clear, announce, uid } from "./dom.js";

/** API field paths come as "rules[0].consumers[1]", "rules.0.consumers.1" or "Ruleset web.rules[0]...". */
export function normaliseField(field) {
  let f = String(field || "").trim();
  f = f.replace(/^(Ruleset|DenyRule|Workload|LabelGroup|IPList|Service)\s+[^.\s]+\.?/, "");
  f = f.replace(/\[(\d+)\]/g, ".$1").replace(/^\./, "");
  return f;
}

export function clearErrors(form) {
  form.querySelectorAll(".field-error[data-generated]").forEach((el) => el.remove());
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  const summary = form.querySelector(".form-errors");
  if (summary) summary.remove();
}

function anchorFor(form, field) {
  const nodes = [...form.querySelectorAll("[data-field]")];
  let best = null;
  let bestLen = -1;
  for (const el of nodes) {
    const f = el.dataset.field;
    if (field === f || field.startsWith(`${f}.`)) {
      if (f.length > bestLen) { best = el; bestLen = f.length; }
    }
  }
  return best;
}

/**
 * Issues the form's own fields report before anything is sent: every element marked
 * ``data-validate`` exposes ``validate()`` -> [{field, message}] (a picker with unfinished text,
 * a rule side left empty). Nothing is ever silently dropped or widened on the way to the API.
 */
export async function clientIssues(form) {
  const out = [];
  for (const el of form.querySelectorAll("[data-validate]")) {
    if (typeof el.validate === "function") out.push(...(await el.validate()));
  }
  return out;
}

/** Show an ApiError on ``form``; returns the number of issues placed next to a field. */
export function showErrors(form, err, { title } = {}) {
  clearErrors(form);
  const issues = err.issues && err.issues.length ? err.issues : [];
  const unplaced = [];
  let placed = 0;
  let firstInvalid = null;
  for (const issue of issues) {
    const field = normaliseField(issue.field);
    const anchor = field ? anchorFor(form, field) : null;
    if (!anchor) { unplaced.push(issue); continue; }
    const id = uid("err");
    const msg = h("div", { class: "field-error", id, "data-generated": "1", "data-for": field }, issue.message);
    const target = anchor.matches("input, select, textarea") ? anchor : (anchor.querySelector("input, select, textarea") || anchor);
    target.setAttribute("aria-invalid", "true");
    anchor.setAttribute("aria-invalid", "true");
    const described = new Set((target.getAttribute("aria-describedby") || "").split(/\s+/).filter(Boolean));
    described.add(id);
    target.setAttribute("aria-describedby", [...described].join(" "));
    const container = anchor.closest(".field, .selector-row, .rule-grid > div, fieldset") || anchor;
    if (container === anchor) anchor.insertAdjacentElement("afterend", msg);
    else container.append(msg);
    placed += 1;
    if (!firstInvalid) firstInvalid = target;
  }
  if (unplaced.length || !issues.length) {
    const titleId = uid("errs");
    const summary = h("div", { class: "form-errors", role: "alert", "aria-labelledby": titleId },
      h("h2", { id: titleId }, title || (err.status === 409 ? "Conflict" : err.status === 412 ? "Changed by someone else" : "Could not save")),
      h("p", {}, err.status === 412
        ? "This object was changed since you opened it. Your edits are still here: reload it in another tab, compare, then save again."
        : err.message),
      unplaced.length ? h("ul", {}, unplaced.map((i) => h("li", {}, i.field ? h("code", {}, i.field) : null, i.field ? ": " : "", i.message))) : null);
    form.prepend(summary);
    if (!firstInvalid) summary.setAttribute("tabindex", "-1");
    firstInvalid = firstInvalid || summary;
  }
  announce(title || `Not saved: ${issues.length || 1} problem${issues.length > 1 ? "s" : ""}`);
  if (firstInvalid) firstInvalid.focus();
  return placed;
}

/** A labelled text field. */
export function textField({ label, name, value = "", field, hint, type = "text", required = false, attrs = {} }) {
  const id = uid("f");
  const hintId = hint ? uid("hint") : null;
  const input = h("input", { id, name, type, value, "data-field": field || name, "aria-describedby": hintId, required, ...attrs });
  return {
    el: h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("div", { class: "hint", id: hintId }, hint) : null),
    input,
  };
}

export function selectField({ label, name, options, value, field }) {
  const id = uid("f");
  const select = h("select", { id, name, "data-field": field || name },
    options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)));
  return { el: h("div", { class: "field" }, h("label", { for: id }, label), select), select };
}

/** Run ``save`` from a submit handler with a busy button and error placement. */
export async function submitWith(form, button, save, { busy = "Saving…", errorTitle } = {}) {
  clearErrors(form);
  button.disabled = true;
  const old = button.textContent;
  button.textContent = busy;
  try {
    const issues = await clientIssues(form);
    if (issues.length) {
      showErrors(form, { status: 0, message: "Nothing was saved: fix the fields marked below.", issues });
      return undefined;
    }
    return await save();
  } catch (err) {
    showErrors(form, err, { title: errorTitle ? errorTitle(err) : undefined });
    return undefined;
  } finally {
    button.disabled = false;
    button.textContent = old;
  }
}

export function lines(text) {
  return String(text || "").split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
}

export { clear };
