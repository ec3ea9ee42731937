// Rows (sandboxes, accounts) kept fresh from the event stream. An event is only a
// hint that a row moved to a sequence: the row itself is read from the API, whose
// long-poll (?wait&after_seq) answers once its projection has applied that event, so
// the page never re-implements the state machine.

import { showError } from "./dom.js";

export class LiveRows {
  // keyOf(row) -> key; fetchAt(key, seq) -> the row once it has applied `seq`.
  constructor(keyOf, fetchAt) {
    this.keyOf = keyOf;
    this.fetchAt = fetchAt;
    this.rows = new Map();
    this.want = new Map();
    this.running = new Map();
    this.listeners = new Set();
  }

  // fn(row, isNew) on every change; returns the unsubscribe function.
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  // Forget every row (another token may see other rows).
  reset() {
    this.rows.clear();
    this.want.clear();
  }

  get(key) {
    return this.rows.get(key);
  }

  all() {
    return [...this.rows.values()];
  }

  // Keep a row read from the API, unless a newer one is already here.
  put(row) {
    const key = this.keyOf(row);
    const old = this.rows.get(key);
    if (old && old.last_seq > row.last_seq) return;
    this.rows.set(key, row);
    for (const fn of this.listeners) fn(row, !old);
  }

  // The row `key` changed at `seq`: read it once its projection has that event.
  // Hints that arrive meanwhile are folded into one more read, not one each.
  hint(key, seq) {
    this.want.set(key, Math.max(this.want.get(key) ?? 0, seq));
    let running = this.running.get(key);
    if (!running) {
      running = this.catchUp(key);
      this.running.set(key, running);
    }
    return running;
  }

  async catchUp(key) {
    await Promise.resolve(); // start after hint() has registered this loop
    try {
      for (;;) {
        const want = this.want.get(key);
        const have = this.rows.get(key)?.last_seq ?? 0;
        if (have >= want) return;
        const row = await this.fetchAt(key, want);
        if (!row || row.last_seq <= have) return; // no progress: the next hint retries
        this.put(row);
      }
    } catch (err) {
      showError(err);
    } finally {
      // In the same step as the last check, so a hint never joins a loop that ended.
      this.running.delete(key);
    }
  }
}
