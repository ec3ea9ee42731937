// The warm pools panel above the sandboxes (docs/pools.md): each pool's size, its
// members ready and coming up, and the claimed ones still live. Read again when the
// event stream moves a sandbox (at most twice a second), and every 5 s.

import { api } from "./api.js";
import { h } from "./dom.js";

const COLUMNS = ["Pool", "Size", "Ready", "Provisioning", "Claimed", "Max age"];

function row(p) {
  const short = p.ready < p.size;
  return h("tr", { dataset: { pool: p.profile } },
    h("td", {}, p.profile),
    h("td", { class: "num", dataset: { col: "size" } }, p.size),
    h("td", { class: short ? "num pool-short" : "num strong", dataset: { col: "ready" } }, p.ready),
    h("td", { class: "num", dataset: { col: "provisioning" } }, p.provisioning),
    h("td", { class: "num", dataset: { col: "claimed" } }, p.claimed),
    h("td", { class: "num" }, `${p.max_age_seconds} s`));
}

export function mountPools(root, { stream }) {
  const tbody = h("tbody");
  const panel = h("section", { id: "pools", class: "pools", hidden: true },
    h("h2", {}, "Warm pools"),
    h("table", {}, h("thead", {}, h("tr", {}, COLUMNS.map((t) => h("th", {}, t)))), tbody));
  root.replaceChildren(panel);
  let stopped = false;
  let pending = null;

  async function load() {
    pending = null;
    try {
      const pools = await api.pools();
      if (stopped) return;
      tbody.replaceChildren(...pools.map(row));
      panel.hidden = pools.length === 0;
    } catch {
      // the sandboxes view shows errors; a missed refresh is read again soon
    }
  }

  const soon = () => {
    if (!pending) pending = setTimeout(load, 500);
  };
  const unsubscribe = stream.subscribe(({ subject }) => {
    if (subject.startsWith("sandboxer.sandbox.")) soon();
  });
  const timer = setInterval(load, 5000);
  load();
  return () => {
    stopped = true;
    unsubscribe();
    clearInterval(timer);
    if (pending) clearTimeout(pending);
  };
}
