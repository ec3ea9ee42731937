// The API client. Every call carries the operator's bearer token (when there is one)
// and turns the API's JSON errors into ApiError, whose message the page shows.

const TOKEN_KEY = "sandboxer.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  toString() {
    return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
  }
}

// Kept in sessionStorage: gone when the tab closes, never shared with other tabs.
export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

let unauthorized = () => {};

// Called on every 401: the app asks for a (new) token.
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const value = token.get();
  if (value) headers.Authorization = `Bearer ${value}`;
  return headers;
}

// The ApiError of a failed answer: the API's {"error": {...}} if it sent one.
export async function errorOf(response) {
  const data = await response.json().catch(() => null);
  const detail = data?.error;
  const error = new ApiError(
    response.status,
    detail?.code ?? "http_error",
    detail?.message ?? (response.statusText || "request failed"),
  );
  if (response.status === 401) unauthorized(error);
  return error;
}

export async function call(method, path, { body, params, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params ?? {})) {
    url.searchParams.set(name, String(value));
  }
  const init = { method, signal, headers: authHeaders(), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

const sandbox = (id) => `/v1/sandboxes/${encodeURIComponent(id)}`;
const account = (name) => `/v1/accounts/${encodeURIComponent(name)}`;

// The routes the dashboard uses, by what they do.
export const api = {
  whoami: () => call("GET", "/v1/whoami"),
  health: () => call("GET", "/healthz"),
  // The newest 500: live rows arrive through the event stream from then on.
  sandboxes: () => call("GET", "/v1/sandboxes?order=newest&limit=500"),
  sandbox: (id, params) => call("GET", sandbox(id), { params }),
  sandboxEvents: (id) => call("GET", `${sandbox(id)}/events`),
  checkpoints: (id) => call("GET", `${sandbox(id)}/checkpoints`),
  destroy: (id) => call("DELETE", sandbox(id)),
  checkpoint: (id) => call("POST", `${sandbox(id)}/checkpoints`),
  restore: (id, checkpoint) => call("POST", `${sandbox(id)}/restore`, { body: { checkpoint } }),
  pause: (id) => call("POST", `${sandbox(id)}/pause`),
  resume: (id) => call("POST", `${sandbox(id)}/resume`),
  accounts: () => call("GET", "/v1/accounts"),
  account: (name, params) => call("GET", account(name), { params }),
  ledger: (name, params) => call("GET", `${account(name)}/ledger`, { params }),
  grant: (name, amount, reason) =>
    call("POST", `${account(name)}/credits`, { body: { amount, reason } }),
  audit: () => call("POST", "/v1/ledger/audit"),
  pools: () => call("GET", "/v1/pools"),
};
