// Entry point: tabs, the model name, and a visible message for any error the page did not expect
// (the page never goes blank).

import { initChat } from "./chat.js";
import { initTranscribe } from "./transcribe.js";

const $ = (id) => document.getElementById(id);

function showBanner(message) {
  const banner = $("banner");
  banner.textContent = `Something went wrong: ${message}. The page keeps working; reload it if it does not.`;
  banner.hidden = false;
}

window.addEventListener("error", (e) => showBanner(e.message || "a script error"));
window.addEventListener("unhandledrejection", (e) => showBanner(e.reason?.message || String(e.reason)));

function initTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    tab.focus();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      // Arrow keys move between tabs, as in the WAI-ARIA tabs pattern.
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) select(tabs[(i + step + tabs.length) % tabs.length]);
    });
  });
}

initTabs();
initChat();
initTranscribe();
// The model name, when the server answers without a key; with --api-key it shows after the first request.
fetch("/v1/models").then((r) => (r.ok ? r.json() : null)).then((body) => {
  if (body) $("model-name").textContent = body.data[0].id;
}).catch(() => {});
