// The sandboxes table: one row per sandbox, newest first, updated in place as the
// event stream moves them; age and TTL left tick every second.

import { api } from "./api.js";
import { DASH, act, age, badge, h, labelChips, ttlLeft } from "./dom.js";

let liveOnly = false; // "hide finished", kept while the tab lives

// The running step and what it last said, e.g. "provision: creating instance".
export function progress({ step, message }) {
  return message ? `${step}: ${message}` : step;
}

// Under the state: the running step, or why a sandbox ended failed or rejected.
function note(s) {
  if (s.progress) return h("div", { class: "step" }, progress(s.progress));
  if (s.reason && (s.state === "failed" || s.state === "rejected")) {
    return h("div", { class: "step reason", title: s.reason }, s.reason);
  }
  return null;
}

export function validation(sandbox) {
  const status = sandbox.validation;
  if (!status) return h("span", { class: "muted" }, DASH);
  return h("span", { class: `validation validation-${status}`, title: sandbox.validation_reason ?? "" }, status);
}

// Destroy asks first; the API decides (409 when it already ended, 403 for another account).
export function destroyButton(sandboxes, sandbox) {
  const button = h("button", { type: "button", class: "danger", disabled: sandbox.terminal }, "Destroy");
  button.addEventListener("click", () => {
    if (!confirm(`Destroy ${sandbox.id}?`)) return;
    act(button, async () => sandboxes.put(await api.destroy(sandbox.id)));
  });
  return button;
}

export function mountSandboxes(root, { sandboxes }) {
  const tbody = h("tbody");
  const summary = h("span", { class: "muted" });
  const empty = h("p", { class: "empty" }, "No sandboxes yet. Create one with ", h("code", {}, "sandboxer create"), " or POST /v1/sandboxes.");
  const toggle = h("input", { type: "checkbox", id: "live-only", checked: liveOnly });
  toggle.addEventListener("change", () => {
    liveOnly = toggle.checked;
    render();
  });

  function row(s) {
    return h(
      "tr",
      { dataset: { id: s.id }, class: s.terminal ? "finished" : null, hidden: liveOnly && s.terminal },
      h("td", {}, h("a", { href: `#/sandboxes/${s.id}`, class: "mono" }, s.id)),
      h("td", {}, badge(s.state), note(s)),
      h("td", {}, s.profile),
      h("td", {}, s.extension),
      h("td", {}, s.account),
      h("td", {}, labelChips(s.labels)),
      h("td", {}, s.host ?? DASH),
      h("td", { dataset: { col: "age" } }, age(s.created_at)),
      h("td", { dataset: { col: "ttl" } }, ttlLeft(s)),
      h("td", { dataset: { col: "validation" } }, validation(s)),
      h("td", { class: "actions" }, destroyButton(sandboxes, s)),
    );
  }

  const newestFirst = (a, b) => b.created_at.localeCompare(a.created_at) || b.id.localeCompare(a.id);

  function count() {
    const all = sandboxes.all();
    const live = all.filter((s) => !s.terminal).length;
    summary.textContent = `${all.length} sandboxes, ${live} live`;
    empty.hidden = all.length > 0;
  }

  function render() {
    tbody.replaceChildren(...sandboxes.all().sort(newestFirst).map(row));
    count();
  }

  function changed(sandbox, isNew) {
    const old = tbody.querySelector(`tr[data-id="${CSS.escape(sandbox.id)}"]`);
    if (old && !isNew) old.replaceWith(row(sandbox));
    else render();
    count();
  }

  function tick() {
    const now = Date.now();
    for (const tr of tbody.rows) {
      const s = sandboxes.get(tr.dataset.id);
      if (!s) continue;
      tr.querySelector('[data-col="age"]').textContent = age(s.created_at, now);
      tr.querySelector('[data-col="ttl"]').textContent = ttlLeft(s, now);
    }
  }

  root.replaceChildren(
    h("div", { class: "bar" }, h("h1", {}, "Sandboxes"), summary, h("span", { class: "spacer" }),
      h("label", { class: "check" }, toggle, " hide finished")),
    h(
      "table",
      { id: "sandboxes" },
      h("thead", {}, h("tr", {}, ["Sandbox", "State", "Profile", "Extension", "Account", "Labels", "Host", "Age", "TTL left", "Validation", ""].map((t) => h("th", {}, t)))),
      tbody,
    ),
    empty,
  );
  render();
  const unsubscribe = sandboxes.subscribe(changed);
  const timer = setInterval(tick, 1000);
  return () => {
    unsubscribe();
    clearInterval(timer);
  };
}
