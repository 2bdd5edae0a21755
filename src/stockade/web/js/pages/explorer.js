// Explorer: search recorded flows (labels, workload, address, port, verdict, time) and export CSV.

import { h, add, replace, uid, toast } from "../dom.js";
import * as api from "../api.js";
import { queryFlows, flowsTable, route } from "../visibility.js";
import { VERDICTS, VERDICT_TEXT } from "../verdicts.js";

export async function render(view, ctx) {
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Explorer")));
  const flowsPath = await route("flows");
  if (!flowsPath) {
    add(view, h("p", { class: "notice" }, "Flow search needs the visibility API, which this controller does not serve yet. Agents in visibility mode will report flows once it does."));
    return;
  }
  const op = await api.operation("GET", flowsPath);
  const params = (op && op.parameters ? op.parameters : []).filter((p) => p.in === "query" && !["limit", "cursor"].includes(p.name));
  const inputs = {};
  const bar = h("form", { class: "toolbar", role: "search", novalidate: true },
    params.map((p) => {
      const id = uid("f");
      const isVerdict = p.name === "verdict";
      inputs[p.name] = isVerdict
        ? h("select", { id }, h("option", { value: "" }, "any"), VERDICTS.map((v) => h("option", { value: v, selected: ctx.query.get(p.name) === v }, VERDICT_TEXT[v])))
        : h("input", { id, type: "search", value: ctx.query.get(p.name) || "", "data-field": p.name });
      return h("div", { class: "field" }, h("label", { for: id }, p.name.replace(/_/g, " ")), inputs[p.name]);
    }),
    h("div", { class: "field" }, h("button", { type: "submit", class: "primary" }, "Search")));
  const out = h("div", { "aria-live": "polite" });
  const csvLink = h("a", { class: "button", href: "#", download: "flows.csv" }, "Export CSV");
  add(view, bar, h("div", { class: "inline" }, csvLink), out);
  const values = () => {
    const v = {};
    for (const [k, el] of Object.entries(inputs)) if (el.value.trim()) v[k] = el.value.trim();
    return v;
  };
  const load = async () => {
    try {
      const q = values();
      const res = await queryFlows({ ...q, limit: 500 });
      const qs = new URLSearchParams(q);
      csvLink.href = `${api.BASE}${flowsPath}?${new URLSearchParams({ ...q, format: "csv" })}`;
      window.history.replaceState(null, "", `#/explorer${qs.toString() ? `?${qs}` : ""}`);
      replace(out, h("p", { class: "muted" }, `${res.items.length}${res.next ? "+" : ""} flows`), flowsTable(res.items));
    } catch (err) { toast(err.message, "error"); }
  };
  bar.addEventListener("submit", (e) => { e.preventDefault(); load(); });
  await load();
}
