// Explorer: search recorded flows by labels (picked, never typed free), workload, address,
// port, protocol, verdict and time; "Why?" explains a flow with the active policy's deciding
// rules; CSV export of the same search.

import { h, add, replace, uid, toast, table } from "../dom.js";
import { refdata } from "../refdata.js";
import { labelFilterPicker } from "../selectors.js";
import { queryFlows, flowsTable, route, exportHref, explainFlow, ruleLink, windowParams, encryptedBadge } from "../visibility.js";
import { VERDICTS, verdictBadge } from "../verdicts.js";

const WINDOWS = [["1h", "Last hour"], ["24h", "Last 24 hours"], ["version", "Since the active version"], ["all", "Everything stored"]];

export async function render(view, ctx) {
  add(view, h("div", { class: "page-head" }, h("h1", {}, "Explorer")));
  if (!(await route("flows"))) {
    add(view, h("p", { class: "notice" }, "Flow search needs the visibility API, which this controller does not serve yet."));
    return;
  }
  const data = await refdata();
  const q = ctx.query;
  const labelValues = (text) => (text || "").split(",").filter((s) => s.includes("=")).map((s) => { const [key, value] = s.split("="); return { t: "label", key, value }; });
  const srcId = uid("lbl"); const dstId = uid("lbl");
  const src = labelFilterPicker({ data, labelId: srcId, values: labelValues(q.get("src_labels")) });
  const dst = labelFilterPicker({ data, labelId: dstId, values: labelValues(q.get("dst_labels")) });
  src.el.dataset.field = "src_labels"; dst.el.dataset.field = "dst_labels";
  const field = (label, input) => { input.id = input.id || uid("f"); return h("div", { class: "field" }, h("label", { for: input.id }, label), input); };
  const workload = h("input", { type: "search", value: q.get("workload") || "", "data-field": "workload", placeholder: "either end" });
  const ip = h("input", { type: "search", value: q.get("ip") || "", "data-field": "ip", placeholder: "either end" });
  const port = h("input", { type: "number", min: 0, max: 65535, value: q.get("port") || "", "data-field": "port" });
  const proto = h("select", { "data-field": "proto" }, [["", "any"], ["tcp", "tcp"], ["udp", "udp"], ["icmp", "icmp"], ["icmpv6", "icmpv6"]]
    .map(([v, t]) => h("option", { value: v, selected: q.get("proto") === v }, t)));
  const wanted = new Set(q.getAll("verdict"));
  const verdicts = VERDICTS.map((v) => h("input", { type: "checkbox", value: v, checked: wanted.has(v) }));
  const windowSel = h("select", {}, WINDOWS.map(([w, t]) => h("option", { value: w, selected: (q.get("window") || "24h") === w }, t)));
  const form = h("form", { class: "panel", role: "search", novalidate: true, "aria-label": "Flow search" },
    h("div", { class: "cols" },
      h("div", { class: "field" }, h("label", { id: srcId }, "Source labels"), src.el),
      h("div", { class: "field" }, h("label", { id: dstId }, "Destination labels"), dst.el)),
    h("div", { class: "toolbar" }, field("Workload", workload), field("Address", ip), field("Port", port), field("Protocol", proto), field("Time", windowSel),
      h("fieldset", { "data-field": "verdict" }, h("legend", {}, "Verdict"),
        VERDICTS.map((v, i) => h("label", { class: "check" }, verdicts[i], verdictBadge(v))))),
    h("div", { class: "form-actions" }, h("button", { type: "submit", class: "primary" }, "Search"), h("a", { class: "button", href: "#", "data-role": "csv" }, "Export CSV")));
  const csv = form.querySelector("[data-role=csv]");
  const why = h("div", { "aria-live": "polite" });
  const out = h("div", { "aria-live": "polite" });
  add(view, form, why, out);

  const params = async () => {
    const p = {};
    const labels = (picker) => picker.values.map((v) => `${v.key}=${v.value}`).join(",");
    if (src.values.length) p.src_labels = labels(src);
    if (dst.values.length) p.dst_labels = labels(dst);
    if (workload.value.trim()) p.workload = workload.value.trim();
    if (ip.value.trim()) p.ip = ip.value.trim();
    if (port.value) p.port = port.value;
    if (proto.value) p.proto = proto.value;
    const vs = verdicts.filter((c) => c.checked).map((c) => c.value);
    if (vs.length) p.verdict = vs;
    const w = windowSel.value;
    const since = w === "all" ? {} : await windowParams(w);
    return { p, since, w };
  };
  const explain = async (f) => {
    try {
      const x = await explainFlow(f.id);
      replace(why, h("section", { class: "panel", "aria-labelledby": "why-h" },
        h("h2", { id: "why-h" }, `Why: ${f.srcName || f.src} → ${f.dstName || f.dst} on ${f.service}`),
        h("p", {}, "Reported: ", verdictBadge(x.verdict), " · the active policy now: ", verdictBadge(x.active),
          x.encrypted ? " · " : null, x.encrypted ? encryptedBadge(x.encryptedBy) : null),
        table([
          { title: "Side", cell: (r) => (r.side === "out" ? "at the source" : "at the destination") },
          { title: "Workload", cell: (r) => r.workload },
          { title: "Action", cell: (r) => r.action + (r.encrypted ? ", encrypted (WireGuard)" : "") },
          { title: "Deciding rule", cell: (r) => ruleLink(r.rule) },
        ], x.rules, { caption: "Deciding rules", empty: "Neither end is a managed workload." })));
      why.querySelector("h2").setAttribute("tabindex", "-1");
      why.querySelector("h2").focus();
    } catch (err) { toast(err.message, "error"); }
  };
  const load = async () => {
    try {
      const { p, since, w } = await params();
      const all = { ...p, ...since };
      const res = await queryFlows({ ...all, limit: 500 });
      csv.href = (await exportHref(all)) || "#";
      csv.setAttribute("download", "flows.csv");
      const qs = new URLSearchParams();
      for (const [k, v] of Object.entries(p)) (Array.isArray(v) ? v : [v]).forEach((x) => qs.append(k, x));
      if (w !== "24h") qs.set("window", w);
      window.history.replaceState(null, "", `#/explorer${qs.toString() ? `?${qs}` : ""}`);
      replace(out, h("p", { class: "muted", "data-role": "flow-count" }, `${res.items.length}${res.next ? "+" : ""} flow summar${res.items.length === 1 ? "y" : "ies"}`),
        flowsTable(res.items, { explorer: true, onExplain: explain }));
    } catch (err) { toast(err.message, "error"); }
  };
  form.addEventListener("submit", (e) => { e.preventDefault(); load(); });
  await load();
}
