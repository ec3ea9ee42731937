// Accounts and their balances, following ledger events. Admins also grant credits
// and audit the ledger; a member sees its own account and no admin actions.

import { api } from "./api.js";
import { act, h, showError, table } from "./dom.js";

const COLUMNS = ["account", "available", "granted", "reserved", "debited", "released", "rejected", "open reservations"];

function row(a) {
  const open = Object.keys(a.open_reservations).length;
  return h("tr", { dataset: { account: a.account } },
    h("td", { class: "mono" }, a.account),
    h("td", { class: "num strong", dataset: { col: "available" } }, a.available),
    h("td", { class: "num" }, a.granted),
    h("td", { class: "num" }, a.reserved),
    h("td", { class: "num" }, a.debited),
    h("td", { class: "num" }, a.released),
    h("td", { class: "num" }, a.rejected),
    h("td", { class: "num" }, open));
}

function grantForm(accounts) {
  const name = h("input", { name: "account", required: true, pattern: "[a-z0-9][a-z0-9_\\-]{0,62}", placeholder: "account", value: "default" });
  const amount = h("input", { name: "amount", type: "number", min: 1, required: true, placeholder: "credits", value: 100 });
  const reason = h("input", { name: "reason", maxlength: 500, placeholder: "reason (optional)" });
  const submit = h("button", { type: "submit" }, "Grant");
  const form = h("form", { class: "inline", id: "grant" }, h("strong", {}, "Grant credits"), name, amount, reason, submit);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(submit, async () => accounts.put(await api.grant(name.value, Number(amount.value), reason.value)));
  });
  return form;
}

function auditButton(output) {
  const button = h("button", { type: "button", id: "audit" }, "Audit ledger");
  button.addEventListener("click", () =>
    act(button, async () => {
      const report = await api.audit();
      const verdict = report.ok
        ? `Audit ok: ${report.events} ledger events replayed, every rule holds.`
        : "Audit found violations:";
      output.replaceChildren(
        h("p", { class: report.ok ? "ok" : "bad" }, verdict),
        h("ul", {}, report.violations.map((v) => h("li", {}, v))),
      );
    }),
  );
  return button;
}

export function mountAccounts(root, { accounts, identity }) {
  const admin = identity.role === "admin";
  const body = h("div");
  const auditOutput = h("div");

  function render() {
    const rows = accounts.all().sort((a, b) => a.account.localeCompare(b.account)).map(row);
    const empty = admin ? "no accounts yet" : `no credits granted to ${identity.account} yet`;
    body.replaceChildren(table(COLUMNS, rows, empty));
  }

  root.replaceChildren(
    h("div", { class: "bar" }, h("h1", {}, "Accounts"), h("span", { class: "spacer" }), admin ? auditButton(auditOutput) : null),
    body,
    admin ? grantForm(accounts) : h("p", { class: "muted" }, `This token acts for account ${identity.account}.`),
    auditOutput,
  );
  render();
  loadAccounts(accounts, identity).then(render, showError);
  return accounts.subscribe(render);
}

// Admins read every account; a member its own (404 until it is granted credits).
export async function loadAccounts(accounts, identity) {
  if (identity.role === "admin") {
    (await api.accounts()).accounts.forEach((a) => accounts.put(a));
    return;
  }
  try {
    accounts.put(await api.account(identity.account));
  } catch (err) {
    if (err.status !== 404) throw err;
  }
}
