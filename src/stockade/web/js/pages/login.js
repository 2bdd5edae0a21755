// Login: POST /auth/login sets the HttpOnly session cookie.

import { h, add } from "../dom.js";
import * as api from "../api.js";
import { textField, submitWith } from "../forms.js";

export async function render(view, ctx) {
  const user = textField({ label: "Username", name: "username", field: "username", attrs: { autocomplete: "username", autofocus: true } });
  const pass = textField({ label: "Password", name: "password", field: "password", type: "password", attrs: { autocomplete: "current-password" } });
  const button = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h("form", { class: "panel", "aria-labelledby": "login-title", novalidate: true }, user.el, pass.el, h("div", { class: "form-actions" }, button));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const who = await submitWith(form, button, () => api.post("/auth/login", { username: user.input.value, password: pass.input.value }));
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
