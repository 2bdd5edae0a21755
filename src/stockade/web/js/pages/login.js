// Login: POST /auth/login sets the HttpOnly session cookie. A failure says what went wrong in
// login terms (wrong credentials, too many attempts and when to retry, controller unreachable),
// never the editing forms' "Could not save".

import { h, add } from "../dom.js";
import * as api from "../api.js";
import { textField, submitWith } from "../forms.js";

/** {title, message} for a failed login. */
export function loginFailure(err) {
  if (err.status === 401) return { title: "Wrong user name or password", message: "Check both and try again. Passwords are case-sensitive." };
  if (err.status === 429) {
    const m = /(\d+)\s*s\b/.exec(err.message || "");
    const wait = m ? `try again in ${m[1]} s` : "try again in a minute";
    return { title: `Too many attempts, ${wait}`, message: "Login is paused for this address after repeated failures." };
  }
  if (err.status === 0) return { title: "The controller is unreachable", message: err.message };
  if (err.status === 422) return { title: "Enter a user name and a password", message: "Both fields are needed." };
  return { title: "Could not log in", message: err.message };
}

export async function render(view, ctx) {
  const user = textField({ label: "Username", name: "username", field: "username", attrs: { autocomplete: "username", autofocus: true } });
  const pass = textField({ label: "Password", name: "password", field: "password", type: "password", attrs: { autocomplete: "current-password" } });
  const button = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h("form", { class: "panel", "aria-labelledby": "login-title", novalidate: true }, user.el, pass.el, h("div", { class: "form-actions" }, button));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const who = await submitWith(form, button, async () => {
      try {
        return (await api.request("POST", "/auth/login", { body: { username: user.input.value, password: pass.input.value }, quiet401: true })).data;
      } catch (err) {
        const f = loginFailure(err);
        // the form shows the summary only: no field is "wrong" on its own
        throw Object.assign(new Error(f.message), { status: err.status, loginTitle: f.title, issues: [] });
      }
    }, { busy: "Logging in…", errorTitle: (err) => err.loginTitle });
    if (!who) return;
    await ctx.setUser(who);
    const next = ctx.query.get("next");
    if (next && next.startsWith("#/") && !next.startsWith("#/login")) window.location.hash = next;
    else ctx.go("workloads");
  });
  add(view, h("div", { style: null, class: "login-box" },
    h("h1", { id: "login-title" }, "Log in to Stockade"),
    h("p", { class: "muted" }, "On first run the controller prints the owner's password once."),
    form));
}
