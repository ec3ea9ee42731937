// The logs panel of a ready sandbox: GET /v1/sandboxes/<id>/logs?service=S&tail=200&follow=1,
// an application/x-ndjson answer ({"service", "stream", "line"} a line) read with fetch()
// and a streaming body reader as it comes. Log text only ever goes in as text nodes.

import { ApiError, authHeaders, errorOf } from "./api.js";
import { h, showError } from "./dom.js";

const TAIL = 200;
const MAX_LINES = 2000; // kept in the page; older lines are dropped
const ALL = ""; // the selector's value for every service (no service parameter)

export class LogsPanel {
  constructor(sandboxId) {
    this.id = sandboxId;
    this.controller = null;
    this.generation = 0;
    this.services = [];
    this.select = h("select", { name: "service", "aria-label": "service" });
    this.follow = h("input", { type: "checkbox", name: "follow", checked: true });
    this.status = h("span", { class: "muted", dataset: { col: "log-status" } });
    this.pre = h("pre", { class: "logs", tabindex: 0, "aria-label": "log lines" });
    this.note = h("p", { class: "muted", hidden: true, dataset: { col: "log-note" } });
    this.controls = h("div", { class: "bar" },
      h("label", { class: "check" }, "service ", this.select),
      h("label", { class: "check" }, this.follow, " Follow"),
      this.status);
    this.element = h("section", { class: "logs-panel" }, h("h2", {}, "Logs"), this.controls, this.note, this.pre);
    this.select.addEventListener("change", () => { // another service: its lines, followed
      this.follow.checked = true;
      this.start();
    });
    this.follow.addEventListener("change", () => (this.follow.checked ? this.start() : this.stop("stopped")));
  }

  // The sandbox's services as the selector's options ("all" first); keeps the choice.
  setServices(services) {
    const names = [...(services ?? [])];
    if (names.join("\n") === this.services.join("\n")) return;
    this.services = names;
    const chosen = this.select.value;
    this.select.replaceChildren(h("option", { value: ALL }, "all"), ...names.map((name) => h("option", { value: name }, name)));
    this.select.value = names.includes(chosen) ? chosen : ALL;
  }

  stop(why) {
    this.generation += 1; // a read of an older generation stops at its next step
    this.controller?.abort();
    this.controller = null;
    if (why) this.status.textContent = why;
  }

  start() {
    this.stop();
    this.pre.replaceChildren();
    this.note.hidden = true;
    this.controls.hidden = false;
    this.pre.hidden = false;
    const generation = this.generation;
    this.controller = new AbortController();
    this.read(generation, this.controller.signal).catch((err) => {
      if (generation !== this.generation || err.name === "AbortError") return;
      this.status.textContent = "stopped";
      this.follow.checked = false;
      showError(err instanceof ApiError ? err : new ApiError(0, "network", `logs: cannot read from the server (${err.message})`));
    });
  }

  url() {
    const url = new URL(`/v1/sandboxes/${encodeURIComponent(this.id)}/logs`, location.origin);
    if (this.select.value !== ALL) url.searchParams.set("service", this.select.value);
    url.searchParams.set("tail", String(TAIL));
    url.searchParams.set("follow", "1");
    return url;
  }

  async read(generation, signal) {
    this.status.textContent = "connecting";
    const all = this.select.value === ALL;
    const response = await fetch(this.url(), {
      headers: authHeaders({ Accept: "application/x-ndjson" }),
      cache: "no-store",
      signal,
    });
    if (generation !== this.generation) return;
    if (!response.ok) {
      const error = await errorOf(response);
      if (error.status === 409 && error.code === "not_capable") {
        this.stop();
        this.controls.hidden = true;
        this.pre.hidden = true;
        this.note.textContent = "this sandbox's extension has no logs";
        this.note.hidden = false;
        return;
      }
      throw error;
    }
    this.status.textContent = "following";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (generation !== this.generation) return;
      buffer += decoder.decode(value ?? new Uint8Array(), { stream: !done });
      const lines = buffer.split("\n");
      buffer = done ? "" : lines.pop();
      this.append(lines, all);
      if (done) break;
    }
    this.status.textContent = "ended";
    this.follow.checked = false;
    this.controller = null;
  }

  append(lines, all) {
    const items = [];
    for (const raw of lines) {
      if (!raw.trim()) continue;
      let entry;
      try {
        entry = JSON.parse(raw);
      } catch {
        continue; // not a log line
      }
      const text = String(entry.line ?? "");
      const stream = entry.stream === "stderr" ? "stderr" : "stdout";
      items.push(h("span", { class: `log-line log-${stream}`, dataset: { service: String(entry.service ?? "") } },
        all ? `${entry.service} | ${text}\n` : `${text}\n`));
    }
    if (!items.length) return;
    const pre = this.pre;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(...items);
    while (pre.childElementCount > MAX_LINES) pre.firstElementChild.remove();
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }
}
