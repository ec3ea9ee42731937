// How a sandbox is used: its services with their health, the endpoints they publish,
// and the commands run in it. Each is drawn from the sandbox row (GET /v1/sandboxes/<id>),
// which the page reads back on every event of the sandbox, so ServiceExited,
// ServiceUnhealthy, ServiceRecovered, CommandStarted and CommandFinished show live.

import { DASH, h, table, time } from "./dom.js";

const COMMAND_TEXT = 80; // characters shown; the whole command is in the title

// green, amber or red for a service's engine state and its health.
function stateTone(state, health) {
  if (state === "running") return health === "unhealthy" ? "bad" : "ok";
  if (state === "starting" || state === "created" || state === "restarting") return "warn";
  return "bad"; // exited, stopped, dead, ...
}

function healthTone(health) {
  if (health === "healthy") return "ok";
  if (health === "starting") return "warn";
  if (health === "unhealthy") return "bad";
  return null;
}

const pill = (tone, text, col) => h("span", { class: `pill${tone ? ` pill-${tone}` : ""}`, dataset: { col } }, text);

export function servicesTable(s) {
  const states = s.service_states?.length
    ? s.service_states
    : (s.services ?? []).map((service) => ({ service, state: null, health: null, exit_code: null }));
  const rows = states.map((st) => h("tr", { dataset: { service: st.service } },
    h("td", { class: "mono" }, st.service),
    h("td", {}, st.state ? pill(stateTone(st.state, st.health), st.state, "state") : DASH),
    h("td", {}, st.health && st.health !== "none" ? pill(healthTone(st.health), st.health, "health") : h("span", { class: "muted" }, "no check")),
    h("td", { class: "num", dataset: { col: "exit" } }, st.exit_code ?? DASH)));
  return table(["service", "state", "health", "exit code"], rows, "no services reported");
}

const bracketed = (host) => (String(host).includes(":") ? `[${host}]` : String(host));

// "http://host:port" for an endpoint, an IPv6 host in brackets; null when a field is
// not what it should be (the link is made from these fields only, never from text).
export function endpointUrl(p) {
  const port = Number(p.host_port);
  if (!Number.isInteger(port) || port < 1 || port > 65535) return null;
  const host = String(p.host ?? "");
  if (!/^[A-Za-z0-9.:%-]+$/.test(host)) return null;
  const text = `http://${bracketed(host)}:${port}`;
  try {
    const url = new URL(text);
    return url.protocol === "http:" ? text : null;
  } catch {
    return null;
  }
}

export function endpointList(s) {
  const ports = s.endpoints ?? [];
  if (!ports.length) return h("p", { class: "muted" }, "no published ports");
  return h("ul", { class: "endpoints" }, ports.map((p) => {
    const where = `${p.service}:${p.container_port}`;
    const url = endpointUrl(p);
    const protocol = String(p.protocol ?? "tcp").toLowerCase();
    const target = url && protocol === "tcp"
      ? h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, url)
      : h("span", {}, `${bracketed(p.host)}:${p.host_port}/${protocol}`);
    return h("li", { class: "mono", dataset: { endpoint: where } }, `${where} → `, target);
  }));
}

export function commandText(c) {
  return c.shell ?? (c.argv ?? []).join(" ");
}

function seconds(value) {
  if (value === null || value === undefined) return DASH;
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
}

// The end of a command: its exit code (0 green, else red), "running…", or how it ended.
function ending(c) {
  if (!c.finished_at) return pill("warn", "running…", "exit");
  if (c.outcome === "exited" && c.exit_code !== null && c.exit_code !== undefined) {
    return pill(c.exit_code === 0 ? "ok" : "bad", String(c.exit_code), "exit");
  }
  return pill("bad", c.outcome ?? "unknown", "exit");
}

export function commandsTable(s) {
  const commands = [...(s.commands ?? [])].reverse(); // newest first
  const rows = commands.map((c) => {
    const full = commandText(c);
    const shown = full.length > COMMAND_TEXT ? `${full.slice(0, COMMAND_TEXT - 1)}…` : full;
    return h("tr", { dataset: { command: c.command_id } },
      h("td", { class: "mono command", title: full, dataset: { col: "command" } }, shown),
      h("td", {}, c.service ?? DASH),
      h("td", {}, c.actor),
      h("td", {}, time(c.started_at)),
      h("td", { class: "num" }, seconds(c.duration_seconds)),
      h("td", {}, ending(c)));
  });
  return table(["command", "service", "who", "when", "duration", "exit"], rows, "no commands run");
}
