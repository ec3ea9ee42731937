// The live event stream (GET /v1/events/stream). Read with fetch() and a streaming
// body reader, because EventSource cannot send the Authorization header. Every
// (re)connect sends Last-Event-ID, the last sequence seen, so a dropped connection
// loses no event.

import { ApiError, authHeaders, errorOf } from "./api.js";

const MAX_DELAY_MS = 10_000;

const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// One SSE block ("id: ...\nevent: ...\ndata: ...") -> {id, data}; comments are skipped.
function parseBlock(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { id, data: data.join("\n") } : null;
}

export class EventStream {
  constructor() {
    this.listeners = new Set();
    this.statusListeners = new Set();
    this.lastId = 0;
    this.generation = 0;
    this.controller = null;
  }

  // fn({seq, subject, event}) for every event; returns the unsubscribe function.
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  onStatus(fn) {
    this.statusListeners.add(fn);
  }

  status(state, detail = "") {
    for (const fn of this.statusListeners) fn(state, detail);
  }

  // Follow every event after `afterSeq` (by default: where it stopped) until stop().
  start(afterSeq = this.lastId) {
    this.stop();
    this.lastId = afterSeq;
    this.loop(this.generation);
  }

  stop() {
    this.generation += 1; // a loop of an older generation ends at its next step
    this.controller?.abort();
  }

  async loop(generation) {
    const alive = () => generation === this.generation;
    let delay = 0;
    while (alive()) {
      try {
        await this.connect();
        delay = 250; // the server ended the stream (a restart): come straight back
      } catch (err) {
        if (!alive()) break;
        if (err instanceof ApiError && err.status >= 400 && err.status < 500) {
          this.status("error", err.toString()); // a token problem: retrying cannot help
          break;
        }
        delay = Math.min(Math.max(delay * 2, 500), MAX_DELAY_MS);
      }
      if (!alive()) break;
      this.status("reconnecting", `reconnecting in ${Math.round(delay / 100) / 10} s`);
      await pause(delay);
    }
  }

  async connect() {
    this.controller = new AbortController();
    this.status("connecting");
    const headers = authHeaders({
      Accept: "text/event-stream",
      "Last-Event-ID": String(this.lastId),
    });
    let response;
    try {
      response = await fetch("/v1/events/stream", {
        headers,
        cache: "no-store",
        signal: this.controller.signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "network", err.message);
    }
    if (!response.ok) throw await errorOf(response);
    this.status("live");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = parseBlock(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (block) this.dispatch(block);
      }
    }
  }

  dispatch(block) {
    let message;
    try {
      message = JSON.parse(block.data);
    } catch {
      return; // not an event of ours
    }
    const seq = Number(block.id ?? message.seq);
    if (Number.isFinite(seq) && seq > this.lastId) this.lastId = seq;
    for (const fn of this.listeners) {
      try {
        fn(message);
      } catch (err) {
        console.error("event listener failed", err);
      }
    }
  }
}

// "sandboxer.<kind>.<id>.<Type>" -> {kind, id, type}
export function parseSubject(subject) {
  const [, kind, id, type] = subject.split(".");
  return { kind, id, type };
}
