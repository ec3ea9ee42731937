// The dashboard's entry: learn who the token is, load the sandboxes, follow the live
// event stream, and show the view the URL's hash names (#/, #/sandboxes/<id>,
// #/accounts).

import { api, onUnauthorized, token } from "./api.js";
import { loadAccounts, mountAccounts } from "./accounts.js";
import { clearError, h, showError } from "./dom.js";
import { LiveRows } from "./live.js";
import { mountPools } from "./pools.js";
import { mountSandbox } from "./sandbox.js";
import { mountSandboxes } from "./sandboxes.js";
import { EventStream, parseSubject } from "./stream.js";

async function sandboxAt(id, seq) {
  try {
    return await api.sandbox(id, { wait: 10, after_seq: seq - 1 });
  } catch (err) {
    if (err.status !== 404) throw err;
    // Its first event is not in the projection yet: wait until it is.
    return api.sandbox(id, { wait: 1, after_seq: seq });
  }
}

const ctx = {
  identity: null,
  stream: new EventStream(),
  sandboxes: new LiveRows((s) => s.id, sandboxAt),
  accounts: new LiveRows((a) => a.account, (name, seq) => api.account(name, { wait: 10, after_seq: seq - 1 })),
};

let unmount = () => {};

function route() {
  unmount();
  clearError();
  const view = document.getElementById("view");
  const hash = location.hash.replace(/^#\/?/, "");
  const [section, id] = hash.split("/").map(decodeURIComponent);
  for (const link of document.querySelectorAll("[data-nav]")) {
    const active = link.dataset.nav === (section || "sandboxes");
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!ctx.identity) {
    unmount = () => {};
    view.replaceChildren(h("p", { class: "muted" }, "Sign in to see the sandboxes."));
  } else if (section === "sandboxes" && id) {
    unmount = mountSandbox(view, ctx, id);
  } else if (section === "accounts") {
    unmount = mountAccounts(view, ctx);
  } else {
    const pools = h("div");
    const list = h("div");
    view.replaceChildren(pools, list);
    const unmountPools = mountPools(pools, ctx);
    const unmountList = mountSandboxes(list, ctx);
    unmount = () => {
      unmountPools();
      unmountList();
    };
  }
}

function showIdentity() {
  const who = document.getElementById("who");
  const { auth, name, role, account } = ctx.identity;
  who.textContent = auth ? `${name} · ${role} · ${account}` : "open server (no tokens)";
  document.body.dataset.role = role;
  document.getElementById("signout").hidden = !auth;
}

// Ask for a token; `problem` says why (none yet, or the last one was refused).
function askToken(problem) {
  ctx.identity = null;
  ctx.stream.stop();
  ctx.sandboxes.reset();
  ctx.accounts.reset();
  const dialog = document.getElementById("login");
  const message = document.getElementById("login-error");
  message.textContent = problem ?? "";
  message.hidden = !problem;
  if (!dialog.open) dialog.showModal();
  document.getElementById("login-token").focus();
  route();
}

async function start() {
  let identity;
  try {
    identity = await api.whoami();
  } catch (err) {
    if (err.status !== 401) showError(err);
    return; // a 401 has opened the token dialog
  }
  ctx.identity = identity;
  showIdentity();
  document.getElementById("login").close();
  try {
    const { last_seq: after } = await api.health();
    const [list] = await Promise.all([api.sandboxes(), loadAccounts(ctx.accounts, identity)]);
    list.sandboxes.forEach((s) => ctx.sandboxes.put(s));
    ctx.stream.start(after);
  } catch (err) {
    showError(err);
  }
  route();
}

function wire() {
  onUnauthorized((err) => askToken(token.get() ? err.message : null));

  ctx.stream.subscribe(({ seq, subject }) => {
    const { kind, id } = parseSubject(subject);
    if (kind === "sandbox" || kind === "validation") ctx.sandboxes.hint(id, seq);
    else if (kind === "ledger") ctx.accounts.hint(id, seq);
  });
  ctx.stream.onStatus((state, detail) => {
    const live = document.getElementById("live");
    live.dataset.status = state;
    live.textContent = detail || state;
  });

  const dialog = document.getElementById("login");
  dialog.addEventListener("cancel", (e) => e.preventDefault()); // no data without a token
  document.getElementById("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token.set(document.getElementById("login-token").value.trim());
    document.getElementById("login-token").value = "";
    start();
  });
  document.getElementById("signout").addEventListener("click", () => {
    token.clear();
    location.reload();
  });
  document.getElementById("error-close").addEventListener("click", clearError);
  window.addEventListener("hashchange", route);
}

wire();
start();
