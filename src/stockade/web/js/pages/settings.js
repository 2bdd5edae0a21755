// Display settings: theme and colour-vision-deficiency palette, with a live verdict sample.

import { h, add, uid, announce } from "../dom.js";
import { THEMES, CVD, loadSettings, saveSettings } from "../settings.js";
import { verdictBadge, VERDICTS } from "../verdicts.js";

export async function render(view) {
  const s = loadSettings();
  const group = (legend, name, options, value, onPick) => h("fieldset", {},
    h("legend", {}, legend),
    options.map(([v, text]) => {
      const id = uid("opt");
      const input = h("input", { type: "radio", name, id, value: v, checked: v === value });
      input.addEventListener("change", () => { onPick(v); announce(`${legend}: ${text}`); });
      return h("div", {}, h("label", { class: "check", for: id }, input, text));
    }));
  add(view, h("h1", {}, "Display settings"),
    h("p", { class: "muted" }, "Kept in this browser. Verdicts always show an icon and text, whatever the colours."),
    group("Theme", "theme", THEMES, s.theme, (v) => { s.theme = v; saveSettings(s); }),
    group("Colour vision", "cvd", CVD, s.cvd, (v) => { s.cvd = v; saveSettings(s); }),
    h("section", { class: "panel", "aria-labelledby": "sample-h" }, h("h2", { id: "sample-h" }, "Sample"),
      h("p", { class: "verdict-mix" }, VERDICTS.map((v) => verdictBadge(v))),
      h("div", { class: "map-legend" }, VERDICTS.map((v) => h("span", {}, h("span", { class: ["legend-line", `v-${v}`] }), " ", verdictBadge(v))))),
    h("section", { class: "panel", "aria-labelledby": "keys-h" }, h("h2", { id: "keys-h" }, "Keyboard"),
      h("dl", { class: "kv" },
        h("dt", {}, h("kbd", {}, "/")), h("dd", {}, "Search on the current page"),
        h("dt", {}, h("kbd", {}, "↑ ↓ Enter Esc")), h("dd", {}, "Move, pick and close in label and service pickers"),
        h("dt", {}, h("kbd", {}, "Backspace")), h("dd", {}, "In an empty picker: remove the last chip"),
        h("dt", {}, h("kbd", {}, "Arrows + − 0")), h("dd", {}, "On the map: pan, zoom in, zoom out, fit"),
        h("dt", {}, h("kbd", {}, "Tab")), h("dd", {}, "On the map: move between groups; Enter opens one"))));
}
