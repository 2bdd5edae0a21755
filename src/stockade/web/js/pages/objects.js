// Policy objects the rules refer to by name: services (ports and protocols) and IP lists
// (the only place addresses are typed in; rules pick them by name).

import { h, add, table, toast, replace } from "../dom.js";
import * as api from "../api.js";
import { serviceChip, ipListChip } from "../labels.js";
import { invalidate } from "../refdata.js";
import { textField, submitWith, lines } from "../forms.js";

export async function render(view, ctx) {
  const svcBox = h("section", { "aria-labelledby": "svc-h" });
  const ipBox = h("section", { "aria-labelledby": "ip-h" });
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Services & IP lists")),
    h("p", { class: "muted" }, "Objects the rules refer to by name. Changes go to the draft."),
    h("div", { class: "cols" }, svcBox, ipBox));
  await Promise.all([renderServices(svcBox, ctx), renderIpLists(ipBox, ctx)]);
}

function deleteButton(ctx, path, name, reload) {
  if (!ctx.can("write")) return null;
  return h("button", { type: "button", class: "danger", "aria-label": `Delete ${name}`, onclick: async () => {
    try { await api.del(`${path}/${api.enc(name)}`); invalidate(); toast(`${name} removed from the draft`); reload(); }
    catch (err) { toast(err.message, "error", 9000); }
  } }, "Delete");
}

async function renderServices(box, ctx) {
  const items = await api.listAll("/services");
  const reload = () => renderServices(box, ctx);
  const name = textField({ label: "Name", name: "name", field: "name" });
  const ports = textField({ label: "Ports", name: "ports", field: "ports", hint: "Comma separated: 443/tcp, 8000-8080/tcp, 53/udp, icmp:8, icmpv6, any" });
  const desc = textField({ label: "Description", name: "description", field: "description" });
  const save = h("button", { type: "submit" }, "Add service");
  const form = h("form", { class: "panel", novalidate: true }, h("h3", {}, "New service"), name.el, ports.el, desc.el, h("div", { class: "form-actions" }, save));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await submitWith(form, save, () => api.post("/services", { name: name.input.value.trim(), ports: lines(ports.input.value), description: desc.input.value }));
    if (!res) return;
    invalidate();
    toast(`Service ${res.name} added to the draft`);
    reload();
  });
  replace(box, h("h2", { id: "svc-h" }, "Services"),
    table([
      { title: "Service", cell: (s) => serviceChip(s.name) },
      { title: "Ports", cell: (s) => h("span", { class: "mono" }, s.body.ports.join(", ")) },
      { title: "", cell: (s) => deleteButton(ctx, "/services", s.name, reload) },
    ], items, { caption: "Services", empty: "No services yet (the built-in service any is always there)." }),
    ctx.can("write") ? form : null);
}

async function renderIpLists(box, ctx) {
  const items = await api.listAll("/ip-lists");
  const reload = () => renderIpLists(box, ctx);
  const name = textField({ label: "Name", name: "name", field: "name" });
  const include = textField({ label: "Include", name: "include", field: "include", hint: "CIDRs or addresses, comma separated: 203.0.113.0/24, 2001:db8::/32" });
  const exclude = textField({ label: "Exclude", name: "exclude", field: "exclude" });
  const save = h("button", { type: "submit" }, "Add IP list");
  const form = h("form", { class: "panel", novalidate: true }, h("h3", {}, "New IP list"), name.el, include.el, exclude.el, h("div", { class: "form-actions" }, save));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const res = await submitWith(form, save, () => api.post("/ip-lists", { name: name.input.value.trim(), include: lines(include.input.value), exclude: lines(exclude.input.value) }));
    if (!res) return;
    invalidate();
    toast(`IP list ${res.name} added to the draft`);
    reload();
  });
  replace(box, h("h2", { id: "ip-h" }, "IP lists"),
    table([
      { title: "IP list", cell: (x) => ipListChip(x.name) },
      { title: "Include", cell: (x) => h("span", { class: "mono" }, x.body.include.join(", ")) },
      { title: "Exclude", cell: (x) => h("span", { class: "mono" }, x.body.exclude.join(", ") || "—") },
      { title: "", cell: (x) => deleteButton(ctx, "/ip-lists", x.name, reload) },
    ], items, { caption: "IP lists", empty: "No IP lists yet." }),
    ctx.can("write") ? form : null);
}
