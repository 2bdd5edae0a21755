// Console entry point: settings (theme, colour-vision setting), session, navigation and the
// hash router. Each page is an ES module exporting render(view, ctx) and loaded on demand.

import { h, add, replace, icon, announce, toast } from "./dom.js";
import * as api from "./api.js";
import { applySettings, loadSettings } from "./settings.js";
import { setMayEditKeys } from "./refdata.js";

const NAV = [
  ["workloads", "Workloads"],
  ["labels", "Labels"],
  ["rulesets", "Rulesets"],
  ["deny-rules", "Deny rules"],
  ["objects", "Services & IP lists"],
  ["map", "Map"],
  ["explorer", "Explorer"],
  ["policy", "Provision"],
  ["versions", "Versions"],
  ["agents", "Agents"],
  ["events", "Events"],
  ["users", "Users", "manage-users"],
  ["keys", "API keys", "manage-users"],
  ["settings", "Settings"],
];

const PAGES = {
  login: () => import("./pages/login.js"),
  workloads: () => import("./pages/workloads.js"),
  labels: () => import("./pages/labels.js"),
  rulesets: () => import("./pages/rulesets.js"),
  "deny-rules": () => import("./pages/deny.js"),
  objects: () => import("./pages/objects.js"),
  map: () => import("./pages/map.js"),
  explorer: () => import("./pages/explorer.js"),
  policy: () => import("./pages/policy.js"),
  versions: () => import("./pages/versions.js"),
  agents: () => import("./pages/agents.js"),
  events: () => import("./pages/events.js"),
  users: () => import("./pages/users.js"),
  keys: () => import("./pages/keys.js"),
  settings: () => import("./pages/settings.js"),
};

const state = { user: null, cleanup: null, renderToken: 0 };

export function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, "");
  const [path, qs] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(qs || "") };
}

export function go(path, query) {
  const qs = query ? new URLSearchParams(query).toString() : "";
  const next = `#/${path}${qs ? `?${qs}` : ""}`;
  if (window.location.hash === next) route();
  else window.location.hash = next;
}

function can(permission) {
  const role = state.user && state.user.role;
  if (permission === "read") return Boolean(role);
  if (permission === "write-rulesets") return ["owner", "admin", "ruleset-manager"].includes(role);
  if (permission === "write") return ["owner", "admin"].includes(role);
  if (permission === "manage-users") return role === "owner";
  return false;
}

function renderNav(current) {
  const nav = document.getElementById("nav");
  if (!state.user) { replace(nav); return; }
  const shown = NAV.filter(([, , permission]) => !permission || can(permission)); // owners only: users, keys
  replace(nav, h("ul", {}, shown.map(([path, title]) => h("li", {},
    h("a", { href: `#/${path}`, "aria-current": path === current ? "page" : null }, title)))));
}

function renderSession() {
  const box = document.getElementById("session");
  if (!state.user) { replace(box); return; }
  replace(box,
    h("span", { class: "muted" }, h("span", { class: "visually-hidden" }, "Signed in as "), state.user.name, ` (${state.user.role || state.user.kind})`),
    h("button", { type: "button", onclick: logout }, "Log out"));
}

async function logout() {
  try { await api.post("/auth/logout"); } catch (_e) { /* already gone */ }
  state.user = null;
  go("login");
}

export async function setUser(user) {
  state.user = user;
  renderSession();
}

async function route() {
  const token = ++state.renderToken;
  const { parts, query } = parseHash();
  let page = parts[0] || "workloads";
  if (!state.user && page !== "login") {
    try {
      state.user = await api.get("/auth/whoami");
      renderSession();
    } catch (_e) {
      const back = window.location.hash && !window.location.hash.startsWith("#/login") ? window.location.hash : "";
      go("login", back ? { next: back } : undefined);
      return;
    }
  }
  if (!PAGES[page]) page = "workloads";
  if (state.cleanup) { try { state.cleanup(); } catch (_e) { /* ignore */ } state.cleanup = null; }
  renderNav(page);
  const view = document.getElementById("view");
  view.classList.toggle("wide", page === "map");
  view.setAttribute("aria-busy", "true"); // until the page has its data (tests wait on this too)
  replace(view, h("p", { class: "muted" }, "Loading…"));
  let mod;
  try {
    mod = await PAGES[page]();
  } catch (err) {
    view.removeAttribute("aria-busy");
    replace(view, h("div", { class: "notice error" }, `Could not load this page: ${err.message}`));
    return;
  }
  if (token !== state.renderToken) return;
  // Each render gets its own element: a page left before its data arrived (its awaits resolve
  // later) writes into a detached element, never into the page that replaced it.
  const pageEl = h("div", { class: "page" });
  replace(view, pageEl);
  setMayEditKeys(can("write"));
  const ctx = {
    parts, query, user: state.user, can, go, setUser,
    onLeave: (fn) => { state.cleanup = fn; },
    isCurrent: () => token === state.renderToken,
  };
  try {
    await mod.render(pageEl, ctx);
  } catch (err) {
    if (token !== state.renderToken) return;
    if (err instanceof api.ApiError && err.status === 401) return;
    add(pageEl, h("div", { class: "notice error", role: "alert" }, `Something went wrong: ${err.message}`));
  }
  if (token !== state.renderToken) return;
  view.removeAttribute("aria-busy");
  const heading = view.querySelector("h1");
  document.title = heading ? `${heading.textContent} · Stockade` : "Stockade";
  const focusTarget = view.querySelector("[autofocus]") || heading;
  if (focusTarget) {
    if (focusTarget === heading) heading.setAttribute("tabindex", "-1");
    focusTarget.focus({ preventScroll: false });
  }
  announce(document.title);
}

function keyboardShortcuts(e) {
  if (e.defaultPrevented || e.altKey || e.ctrlKey || e.metaKey) return;
  const t = e.target;
  const typing = t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
  if (e.key === "/" && !typing) {
    const search = document.querySelector("#view input[type=search]");
    if (search) { e.preventDefault(); search.focus(); }
  }
}

function boot() {
  applySettings(loadSettings());
  api.setUnauthenticatedHandler(() => {
    if (state.user) toast("Your session has ended. Log in again.", "error");
    state.user = null;
    renderSession();
    if (!window.location.hash.startsWith("#/login")) go("login", { next: window.location.hash });
  });
  window.addEventListener("hashchange", route);
  document.addEventListener("keydown", keyboardShortcuts);
  route();
}

boot();
export { icon };
