// Small DOM and formatting helpers. Text always goes in as text nodes, never as HTML,
// so nothing the API returns can become markup.

// h("a", {href: "#/", class: "x", onclick: fn}, "text", child) -> element
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export const DASH = "—";

export function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const hours = Math.floor(m / 60);
  if (hours < 24) return `${hours}h ${m % 60}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

export function age(iso, now = Date.now()) {
  return duration(now - Date.parse(iso));
}

export function ttlLeft(sandbox, now = Date.now()) {
  if (sandbox.terminal) return DASH;
  const left = Date.parse(sandbox.expires_at) - now;
  return left > 0 ? duration(left) : "expired";
}

// Local time as "2025-06-01 14:03:07": sortable, the same in every locale.
export function time(iso) {
  if (!iso) return DASH;
  const d = new Date(iso);
  const two = (n) => String(n).padStart(2, "0");
  const day = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())}`;
  return `${day} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

export function badge(state) {
  return h("span", { class: `badge state-${state}`, dataset: { col: "state" } }, state);
}

export function table(headers, rows, empty = "nothing yet") {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headers.map((title) => h("th", {}, title)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "empty" }, empty))),
  );
}

// The error banner: the API's message, until dismissed or the next view.
export function showError(err) {
  const banner = document.getElementById("error");
  document.getElementById("error-text").textContent = String(err);
  banner.hidden = false;
}

export function clearError() {
  document.getElementById("error").hidden = true;
}

// Run an action from a button: disabled while it runs, errors shown in the banner.
export async function act(button, action) {
  button.disabled = true;
  try {
    await action();
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// A sandbox's labels ({key: value}) as "key=value" chips, or null when it has none.
export function labelChips(labels) {
  const pairs = Object.entries(labels ?? {}).sort(([a], [b]) => a.localeCompare(b));
  if (!pairs.length) return null;
  return h("span", { class: "chips", dataset: { col: "labels" } },
    pairs.map(([key, value]) => h("span", { class: "chip", dataset: { label: key } }, `${key}=${value}`)));
}
