// One sandbox: its facts and labels, its services with their health and endpoints, the
// commands run in it, its logs (followed), its event timeline, checkpoints and ledger
// entries, all following the event stream; actions destroy, checkpoint and restore,
// pause and resume.

import { api } from "./api.js";
import { DASH, act, age, badge, h, labelChips, showError, table, time, ttlLeft } from "./dom.js";
import { LogsPanel } from "./logs.js";
import { destroyButton, progress, validation } from "./sandboxes.js";
import { parseSubject } from "./stream.js";
import { commandsTable, endpointList, servicesTable } from "./usage.js";

const ENVELOPE = new Set([
  "type", "event_id", "aggregate_id", "occurred_at", "actor",
  "correlation_id", "causation_id", "schema_version",
]);
const LEDGER_PAGES = 20; // at most 20,000 entries are read for one sandbox

function isEmpty(value) {
  if (value === null || value === undefined || value === "") return true;
  return typeof value === "object" && Object.keys(value).length === 0;
}

function text(value) {
  if (value === null || value === undefined) return DASH;
  if (Array.isArray(value)) return value.map(text).join(", ");
  if (typeof value === "object") {
    const inner = Object.entries(value).filter(([, v]) => !isEmpty(v)).map(([name, v]) => `${name}: ${text(v)}`).join(", ");
    return `{${inner}}`;
  }
  return String(value);
}

// An event's own fields (not the envelope), as "name=value" text.
function details(event) {
  return Object.entries(event)
    .filter(([name, value]) => !ENVELOPE.has(name) && !isEmpty(value))
    .map(([name, value]) => `${name}=${text(value)}`)
    .join("  ");
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, value ?? DASH)]));
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return DASH;
  const units = ["B", "KiB", "MiB", "GiB"];
  let n = bytes;
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return `${unit ? n.toFixed(1) : n} ${units[unit]}`;
}

export function mountSandbox(root, { sandboxes, stream }, id) {
  const timeline = new Map(); // seq -> {seq, subject, event}
  const ledger = new Map();
  let checkpoints = [];
  let firstSeq = null;

  let logs = null; // the LogsPanel while the sandbox is ready

  const head = h("section", { class: "head" });
  const servicesBox = h("section", { class: "services" });
  const commandsBox = h("section", { class: "commands" });
  const logsBox = h("div", { hidden: true });
  const timelineBox = h("section");
  const checkpointBox = h("section");
  const ledgerBox = h("section");
  root.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← Sandboxes")),
    head,
    h("div", { class: "columns" }, servicesBox, commandsBox),
    logsBox,
    h("div", { class: "columns" }, h("div", {}, checkpointBox, ledgerBox), timelineBox),
  );

  function renderHead() {
    const s = sandboxes.get(id);
    if (!s) {
      head.replaceChildren(h("h1", { class: "mono" }, id), h("p", { class: "muted" }, "loading…"));
      return;
    }
    const checkpointButton = h("button", { type: "button", disabled: s.state !== "ready" }, "Checkpoint");
    checkpointButton.addEventListener("click", () =>
      act(checkpointButton, async () => {
        const made = await api.checkpoint(id);
        checkpoints = [...checkpoints.filter((c) => c.id !== made.id), made];
        renderCheckpoints();
      }),
    );
    const paused = s.state === "paused";
    const pauseButton = h("button", { type: "button", disabled: s.state !== "ready" && !paused }, paused ? "Resume" : "Pause");
    pauseButton.addEventListener("click", () =>
      act(pauseButton, async () => sandboxes.put(await (paused ? api.resume(id) : api.pause(id)))),
    );
    head.replaceChildren(
      h("div", { class: "bar" }, h("h1", { class: "mono", dataset: { id: s.id } }, s.id), badge(s.state),
        s.progress ? h("span", { class: "step" }, `${progress(s.progress)} (since ${time(s.progress.since)})`) : null,
        h("span", { class: "spacer" }), pauseButton, checkpointButton, destroyButton(sandboxes, s)),
      facts([
        ["profile", s.profile],
        ["extension", s.extension],
        ["account", h("a", { href: "#/accounts" }, s.account)],
        ["host", s.host],
        ["created", h("span", {}, `${time(s.created_at)} (`, h("span", { dataset: { col: "age" } }, age(s.created_at)), " ago)")],
        ["TTL left", h("span", { dataset: { col: "ttl" } }, ttlLeft(s))],
        ["validation", validation(s)],
        ["route", s.route_reason],
        ["reason", s.reason],
        ["labels", labelChips(s.labels)],
        ["handle", Object.keys(s.handle).length ? details(s.handle) : null],
        ["inputs", Object.keys(s.inputs).length ? details(s.inputs) : null],
        ["credits held", s.metered ? String(s.credits_held) : "not metered"],
        ["reconciliation", s.needs_reconciliation ? "needed: teardown gave up" : null],
      ]),
    );
  }

  function renderUsage() {
    const s = sandboxes.get(id);
    if (!s) return;
    servicesBox.replaceChildren(h("h2", {}, "Services"), servicesTable(s), h("h2", {}, "Endpoints"), endpointList(s));
    const shown = s.commands?.length ?? 0;
    const count = s.commands_run > shown ? `${s.commands_run} run, the last ${shown} shown` : `${s.commands_run ?? 0} run`;
    commandsBox.replaceChildren(
      h("h2", {}, "Recent commands ", h("span", { class: "muted", dataset: { col: "commands-run" } }, `(${count})`)),
      commandsTable(s));
  }

  // The logs panel is offered while the sandbox is ready, and gone once it ends.
  function syncLogs() {
    const s = sandboxes.get(id);
    if (s?.state === "ready" && !logs) {
      logs = new LogsPanel(id);
      logs.setServices(s.services);
      logsBox.replaceChildren(logs.element);
      logsBox.hidden = false;
      logs.start();
    } else if (logs && s && (s.terminal || s.state === "tearing_down")) {
      logs.stop("ended");
      logs = null;
      logsBox.replaceChildren();
      logsBox.hidden = true;
    } else if (logs && s) {
      logs.setServices(s.services);
    }
  }

  function tick() {
    const s = sandboxes.get(id);
    if (!s) return;
    const ttl = head.querySelector('[data-col="ttl"]');
    const since = head.querySelector('[data-col="age"]');
    if (ttl) ttl.textContent = ttlLeft(s);
    if (since) since.textContent = age(s.created_at);
  }

  function renderTimeline() {
    const rows = [...timeline.values()].sort((a, b) => a.seq - b.seq).map(({ seq, event }) =>
      h("tr", { dataset: { seq } },
        h("td", { class: "num" }, seq),
        h("td", {}, time(event.occurred_at)),
        h("td", {}, h("span", { class: "event-type" }, event.type)),
        h("td", {}, event.actor),
        h("td", { class: "details" }, details(event))));
    timelineBox.replaceChildren(h("h2", {}, "Events"), table(["seq", "when", "event", "actor", "details"], rows));
  }

  function renderCheckpoints() {
    const s = sandboxes.get(id);
    const rows = checkpoints.map((c) => {
      const restore = h("button", { type: "button", disabled: c.status !== "created" || s?.state !== "ready" }, "Restore");
      restore.addEventListener("click", () => act(restore, async () => sandboxes.put(await api.restore(id, c.id))));
      return h("tr", { dataset: { checkpoint: c.id } },
        h("td", { class: "mono" }, c.id),
        h("td", {}, c.status),
        h("td", {}, time(c.created_at ?? c.requested_at)),
        h("td", { class: "num" }, size(c.size)),
        h("td", {}, c.error ?? c.deleted_reason ?? ""),
        h("td", { class: "actions" }, restore));
    });
    checkpointBox.replaceChildren(h("h2", {}, "Checkpoints"), table(["checkpoint", "status", "when", "size", "note", ""], rows, "no checkpoints"));
  }

  function renderLedger() {
    const rows = [...ledger.values()].sort((a, b) => a.seq - b.seq).map(({ seq, event }) =>
      h("tr", {},
        h("td", { class: "num" }, seq),
        h("td", {}, time(event.occurred_at)),
        h("td", {}, event.type),
        h("td", { class: "num" }, event.amount ?? event.requested ?? DASH),
        h("td", { class: "details" }, details({ ...event, sandbox_id: null, amount: null }))));
    ledgerBox.replaceChildren(h("h2", {}, "Ledger"), table(["seq", "when", "entry", "credits", "details"], rows, "no ledger entries"));
  }

  const addEvent = (into) => (message) => into.set(message.seq, message);

  async function loadCheckpoints() {
    checkpoints = (await api.checkpoints(id)).checkpoints;
    renderCheckpoints();
  }

  // The account's ledger from this sandbox's first event on, its entries only.
  async function loadLedger(account) {
    let after = Math.max(0, (firstSeq ?? 1) - 1);
    for (let page = 0; page < LEDGER_PAGES; page += 1) {
      const answer = await api.ledger(account, { after_seq: after, limit: 1000 });
      answer.entries.filter((e) => e.event.sandbox_id === id).forEach(addEvent(ledger));
      if (answer.next_after_seq === null) break;
      after = answer.next_after_seq;
    }
    renderLedger();
  }

  async function load() {
    const [sandbox, events] = await Promise.all([api.sandbox(id), api.sandboxEvents(id)]);
    sandboxes.put(sandbox);
    events.events.forEach(addEvent(timeline));
    firstSeq = events.events[0]?.seq ?? null;
    renderHead();
    renderUsage();
    syncLogs();
    renderTimeline();
    await Promise.all([loadCheckpoints(), loadLedger(sandbox.account)]);
  }

  function onEvent(message) {
    const { kind, id: aggregate, type } = parseSubject(message.subject);
    if (kind === "sandbox" && aggregate === id) {
      addEvent(timeline)(message);
      renderTimeline();
      if (/^(Checkpoint|Restore)/.test(type)) {
        sandboxes.hint(id, message.seq).then(loadCheckpoints).catch(showError);
      }
    } else if (kind === "ledger" && message.event.sandbox_id === id) {
      addEvent(ledger)(message);
      renderLedger();
    }
  }

  renderHead();
  renderUsage();
  syncLogs();
  renderTimeline();
  renderCheckpoints();
  renderLedger();
  const unsubscribeStream = stream.subscribe(onEvent);
  const unsubscribeRows = sandboxes.subscribe((s) => {
    if (s.id !== id) return;
    renderHead();
    renderUsage();
    syncLogs();
    renderCheckpoints(); // restore buttons follow the sandbox's state
  });
  const timer = setInterval(tick, 1000);
  load().catch((err) => {
    showError(err);
    if (!sandboxes.get(id)) head.replaceChildren(h("h1", { class: "mono" }, id), h("p", { class: "muted" }, "not available"));
  });
  return () => {
    unsubscribeStream();
    unsubscribeRows();
    clearInterval(timer);
    logs?.stop();
  };
}
