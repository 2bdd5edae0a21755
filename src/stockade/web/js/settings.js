// Display settings, kept in this browser: theme (light, dark, high contrast, or follow the
// system: high contrast when it asks for more contrast, else dark or light as its colour scheme)
// and the colour-vision-deficiency palette.

const KEY = "stockade.display";
export const THEMES = [["system", "Follow the system (its colour scheme; high contrast when it asks for more contrast)"], ["light", "Light"], ["dark", "Dark"], ["high-contrast", "High contrast (dark)"]];
export const CVD = [["standard", "Standard Okabe–Ito palette"], ["enhanced", "Enhanced for colour-vision deficiency (protanopia, deuteranopia, tritanopia)"]];

export function loadSettings() {
  try {
    const s = JSON.parse(window.localStorage.getItem(KEY) || "{}");
    return { theme: s.theme || "system", cvd: s.cvd || "standard" };
  } catch (_e) {
    return { theme: "system", cvd: "standard" };
  }
}

export function saveSettings(s) {
  window.localStorage.setItem(KEY, JSON.stringify(s));
  applySettings(s);
}

let following = false;

export function applySettings(s) {
  if (!following && window.matchMedia) { // the system switches scheme or contrast: follow at once
    following = true;
    for (const q of ["(prefers-color-scheme: dark)", "(prefers-contrast: more)"]) {
      window.matchMedia(q).addEventListener("change", () => applySettings(loadSettings()));
    }
  }
  const root = document.documentElement;
  let theme = s.theme;
  if (theme === "system") {
    const media = (q) => Boolean(window.matchMedia && window.matchMedia(q).matches);
    theme = media("(prefers-contrast: more)") ? "high-contrast" : media("(prefers-color-scheme: dark)") ? "dark" : "light";
  }
  root.dataset.theme = theme;
  root.dataset.cvd = s.cvd;
}
