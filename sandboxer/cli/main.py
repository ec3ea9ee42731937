"""`sandboxer`: the command line. Talks to the HTTP API with the standard library only,
so it starts fast and needs nothing the service does not."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sandboxer.cli.term import Progress, Table, paint, styled, tone

DEFAULT_URL = "http://127.0.0.1:8080"
TERMINAL = {"destroyed", "failed", "rejected"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_API, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5


class CliError(Exception):
    """A failure the user should read, carrying the exit code scripts branch on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """JSON over urllib: the API's answers as plain dicts, its failures as CliErrors."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """One call. HTTP errors become exit 3 with the API's message; a server that
        cannot be reached becomes exit 4 with a hint, never a traceback."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        req.add_header("Accept", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CliError(_api_error(exc), EXIT_API) from exc
        except (
            urllib.error.URLError,
            ConnectionError,
            TimeoutError,
            http.client.HTTPException,
        ) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(
                f"cannot reach the sandboxer API at {self.base_url}: {reason}\n"
                "hint: start it with `sandboxer serve`, or set SANDBOXER_URL / --url",
                EXIT_UNREACHABLE,
            ) from exc
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise CliError(
                f"{self.base_url} answered {method} {path} with something that is not JSON; "
                "is it a sandboxer API?",
                EXIT_API,
            ) from exc


def check_url(url: str) -> str:
    """Fail fast on a mistyped --url/SANDBOXER_URL (exit 2) instead of a traceback, and
    keep urllib to http(s): it would otherwise open file:// and friends."""
    parts = urllib.parse.urlsplit(url)
    try:
        _ = parts.port  # raises on a port that is not a number or out of range
    except ValueError as exc:
        raise CliError(f"invalid API URL {url!r}: {exc}", EXIT_USAGE) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(
            f"invalid API URL {url!r}: expected http(s)://host[:port] (--url or SANDBOXER_URL)",
            EXIT_USAGE,
        )
    return url


def _api_error(exc: urllib.error.HTTPError) -> str:
    """The API's `error.message` and `error.field`: the field tells the user what to fix."""
    try:
        error = json.loads(exc.read())["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code}: {exc.reason}"
    field = f" (field: {error['field']})" if error.get("field") else ""
    return f"error {error.get('status', exc.code)}: {error.get('message')}{field}"


# ---- output -----------------------------------------------------------------------


def _print_json(value: Any) -> None:
    """Exactly the API's JSON, for scripts (jq) rather than eyes."""
    print(json.dumps(value, indent=2, sort_keys=False))


def _age(iso: str) -> str:
    """Coarse age for the table: a human wants "3m", not a timestamp."""
    then = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    # Clamped: a server clock slightly ahead of ours must not print "-1s".
    seconds = max(0, int((dt.datetime.now(dt.UTC) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _print_sandboxes(rows: list[dict[str, Any]]) -> None:
    """One row per sandbox; long reasons are cut so a row stays one line."""
    if not rows:
        print("no sandboxes")
        return
    table = Table(
        ["ID", "STATE", "PROFILE", "EXTENSION", "ACCOUNT", "AGE", "REASON"], tone_column=1
    )
    table.write(
        [
            [
                r["id"],
                r["state"],
                r["profile"],
                r["extension"],
                r["account"],
                _age(r["created_at"]),
                _cut(r.get("reason") or "", 50),
            ]
            for r in rows
        ]
    )


def _cut(text: str, width: int) -> str:
    """Long free text is cut so a table row stays one line; --json has all of it."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_sandbox(s: dict[str, Any]) -> None:
    """`key: value` lines for one sandbox, empty fields left out."""
    colour = styled(sys.stdout)
    fields = [
        "id",
        "state",
        "profile",
        "extension",
        "account",
        "host",
        "created_at",
        "expires_at",
        "reason",
        "route_reason",
        "services",
        "handle",
        "inputs",
    ]
    for key in fields:
        value = s.get(key)
        if value in (None, {}, [], ""):
            continue
        if key == "services" and s.get("service_states"):
            value = ", ".join(_service(st) for st in s["service_states"])
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        elif key == "state":
            value = paint(value, tone(value), colour)
        print(f"{key + ':':<14}{value}")
    for port in s.get("endpoints") or []:
        where = f"{port['host']}:{port['host_port']}"
        port_name = f"{port['container_port']}/{port['protocol']}"
        print(f"{'endpoint:':<14}{port['service']} {port_name} -> {where}")
    if s.get("progress"):
        print(f"{'step:':<14}{_step(s).strip('[]')}")


def _service(state: dict[str, Any]) -> str:
    """`web running`, `db running (healthy)`, `job exited 1`."""
    text = f"{state['service']} {state['state']}"
    if state.get("health") not in (None, "none"):
        text += f" ({state['health']})"
    if state.get("exit_code") is not None and state["state"] != "running":
        text += f" {state['exit_code']}"
    return text


def _events_table() -> Table:
    """Widths that fit the usual ids and types, so a followed stream rarely shifts."""
    return Table(
        ["SEQ", "TIME", "TYPE", "AGGREGATE", "ACTOR"],
        right={0},
        tone_column=2,
        min_widths=[6, 27, 19, 17],
    )


def _event_row(e: dict[str, Any]) -> list[object]:
    """seq, time, type, aggregate, actor: enough to follow a lifecycle by eye."""
    ev = e["event"]
    return [e["seq"], ev["occurred_at"], ev["type"], ev["aggregate_id"], ev["actor"]]


def _step(sandbox: dict[str, Any]) -> str:
    """The running hook and its latest message, e.g. `[provision: creating instance]`."""
    p = sandbox.get("progress")
    if not p:
        return ""
    return f"[{p['step']}{': ' + p['message'] if p.get('message') else ''}]"


def _poll(
    client: Client,
    sandbox: dict[str, Any],
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
    progress: Progress,
) -> dict[str, Any]:
    """Long-poll the sandbox until `done` or a terminal state, showing its state and step;
    exit 5 when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        progress.show(sandbox["id"], sandbox["state"], _step(sandbox))
        if done(sandbox) or sandbox["state"] in TERMINAL:
            return sandbox
        left = deadline - time.monotonic()
        if left <= 0:
            raise CliError(
                f"timed out after {timeout:g}s: {sandbox['id']} is {sandbox['state']}",
                EXIT_TIMEOUT,
            )
        # Long-polls return at once on a new event; the 1 s cap refreshes the step's
        # progress message (it changes without an event: "compose up", "pulling 3/5").
        wait = min(1.0, left)
        sandbox = client.request(
            "GET",
            f"/v1/sandboxes/{sandbox['id']}",
            query={"wait": f"{wait:.1f}", "after_seq": str(sandbox["last_seq"])},
            timeout=wait + 30,
        )


def _wait(
    client: Client, sandbox: dict[str, Any], until: set[str], timeout: float
) -> dict[str, Any]:
    """Wait for a state in `until` (or a terminal one) behind a progress line on stderr."""
    with Progress() as progress:
        return _poll(client, sandbox, lambda s: s["state"] in until, timeout, progress)


# ---- commands -----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Imports the service lazily: every other command stays a fast, light client."""
    from sandboxer.bootstrap import serve
    from sandboxer.config import Settings
    from sandboxer.http.auth import AuthConfigError
    from sandboxer.store.event_store import MutableStream
    from sandboxer.store.nats_server import NatsPortInUse

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    settings = Settings.from_env(host=args.host, port=args.port, worker_name=args.worker_name)
    try:
        asyncio.run(serve(settings, http=not args.worker))
    except AuthConfigError as exc:  # a bad tokens file: one line (never a token), no trace
        raise CliError(f"serve: {exc}", EXIT_USAGE) from None
    except (NatsPortInUse, MutableStream) as exc:  # the event store's: one line, no trace
        raise CliError(f"serve: {exc}", EXIT_FAILED) from None
    return EXIT_OK


def cmd_nats_info(args: argparse.Namespace) -> int:
    """Where the event store is, from the environment and the data dir alone."""
    from sandboxer.config import default_data_dir
    from sandboxer.store.nats_auth import credentials_dir, redact
    from sandboxer.store.nats_server import STREAM, Credentials, _pid_alive

    env = os.environ
    external = env.get("SANDBOXER_NATS_URL")
    info: dict[str, Any]
    if external:
        info = {
            "embedded": False,
            "url": redact(external),
            "stream": STREAM,
            "credentials": "the operator's (the URL's user, or SANDBOXER_NATS_USER)",
        }
    else:
        data_dir = Path(env.get("SANDBOXER_DATA_DIR") or default_data_dir(env)).expanduser()
        folder = credentials_dir(data_dir)
        reader, service = folder / "reader.json", folder / "service.json"
        try:
            url = Credentials.load(reader).url
        except FileNotFoundError:
            raise CliError(
                f"nats-info: no embedded NATS server configured under {data_dir} yet: "
                "start `sandboxer serve` once (or set SANDBOXER_DATA_DIR)",
                EXIT_FAILED,
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise CliError(f"nats-info: cannot read {reader}: {exc}", EXIT_FAILED) from None
        try:
            pid: int | None = int((data_dir / "nats" / "nats-server.pid").read_text().strip())
        except (OSError, ValueError):
            pid = None
        info = {
            "embedded": True,
            "url": url,
            "stream": STREAM,
            "reader_credentials": str(reader),
            "service_credentials": str(service),
            "running": pid is not None and _pid_alive(pid),
        }
    if args.json:
        _print_json(info)
        return EXIT_OK
    print(f"url:     {info['url']}")
    print(f"stream:  {info['stream']}")
    if info["embedded"]:
        print(f"reader:  {info['reader_credentials']}  (read-only: validators, auditors)")
        print(f"service: {info['service_credentials']}  (the service's own: keep it)")
        print(f"server:  {'running' if info['running'] else 'not running'} (embedded)")
    else:
        print(f"credentials: {info['credentials']}")
    return EXIT_OK


PATH_INPUTS = {"repo"}


def cmd_validate(args: argparse.Namespace) -> int:
    from sandboxer.app.validator import serve_validator
    from sandboxer.config import Settings

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from sandboxer.store.event_store import MutableStream

    try:
        asyncio.run(serve_validator(Settings.from_env(), ack_wait=args.ack_wait))
    except MutableStream as exc:  # an operator's stream that allows deletes: one line
        raise CliError(f"validate serve: {exc}", EXIT_FAILED) from None
    return EXIT_OK


def cmd_e2e(args: argparse.Namespace, client: Client) -> int:
    """Legacy `make e2e` in one step: create, wait ready, wait for the validator's
    result, tear down (also on failure or Ctrl-C), exit with the test's exit code."""
    inputs = _parse_inputs(args.input)
    if args.test_command:
        inputs["test_command"] = args.test_command
    body: dict[str, Any] = {"profile": args.profile, "inputs": inputs}
    sandbox = client.request("POST", "/v1/sandboxes", body)
    sid = sandbox["id"]
    print(f"e2e: created {sid}", file=sys.stderr)
    code = EXIT_FAILED
    try:
        sandbox = _wait(client, sandbox, {"ready"}, args.timeout)
        if sandbox["state"] != "ready":
            print(f"e2e: {sid} ended {sandbox['state']}: {sandbox.get('reason')}", file=sys.stderr)
            return EXIT_FAILED
        print("e2e: ready; waiting for the validator", file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        while sandbox.get("validation") not in ("passed", "failed"):
            if time.monotonic() > deadline:
                raise CliError(f"timed out waiting for the validation of {sid}", EXIT_TIMEOUT)
            sandbox = client.request(
                "GET",
                f"/v1/sandboxes/{sid}",
                query={"wait": "10", "after_seq": str(sandbox["last_seq"])},
                timeout=40,
            )
            if sandbox["state"] not in ("ready", "checkpointing", "restoring"):
                raise CliError(
                    f"{sid} is {sandbox['state']} before its validation ended", EXIT_FAILED
                )
        if sandbox.get("validation_output"):
            sys.stdout.write(sandbox["validation_output"])
            sys.stdout.flush()
        passed = sandbox["validation"] == "passed"
        exit_code = sandbox.get("validation_exit_code")
        code = (
            EXIT_OK
            if passed
            else (exit_code if isinstance(exit_code, int) and exit_code else EXIT_FAILED)
        )
        why = "" if passed else f": {sandbox.get('validation_reason')}"
        print(
            f"e2e: validation {sandbox['validation']} (exit code {exit_code}){why}", file=sys.stderr
        )
        return code
    finally:
        print(f"e2e: tearing down {sid}", file=sys.stderr)
        try:
            gone = client.request("DELETE", f"/v1/sandboxes/{sid}")
            _wait(client, gone, TERMINAL, args.timeout)
        except CliError as exc:
            if "already" not in str(exc):
                print(f"e2e: teardown: {exc}", file=sys.stderr)


def _parse_inputs(pairs: Sequence[str]) -> dict[str, str]:
    """key=value pairs. `repo` is a local path: made absolute here, where the user is,
    because the server resolves paths from its own working directory."""
    inputs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--input {pair!r}: expected key=value", EXIT_USAGE)
        if key in PATH_INPUTS and value and os.path.exists(value):
            value = os.path.abspath(value)
        inputs[key] = value
    return inputs


def cmd_create(args: argparse.Namespace, client: Client) -> int:
    """Exit 1 under --wait when it ends failed/rejected, so `create --wait && test` works."""
    body: dict[str, Any] = {"inputs": _parse_inputs(args.input)}
    if args.profile:
        body["profile"] = args.profile
    if args.from_checkpoint:
        body["from_checkpoint"] = args.from_checkpoint
    elif not args.profile:
        raise CliError("create needs --profile (or --from-checkpoint)", EXIT_USAGE)
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl
    if args.account is not None:
        body["account"] = args.account
    sandbox = client.request("POST", "/v1/sandboxes", body)
    if args.wait:
        sandbox = _wait(client, sandbox, {"ready"}, args.timeout)
    _emit(args, sandbox)
    return EXIT_FAILED if args.wait and sandbox["state"] in ("failed", "rejected") else EXIT_OK


def _wait_settled(client: Client, sandbox: dict[str, Any], timeout: float) -> None:
    """A metered sandbox is billed right after it ends: wait for its debit too."""
    if not sandbox.get("metered") or not sandbox.get("credits_held"):
        return
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        account = client.request(
            "GET",
            f"/v1/accounts/{sandbox['account']}",
            query={"wait": "5", "after_seq": str(seq)},
            timeout=35,
        )
        if sandbox["id"] not in account["open_reservations"]:
            return
        seq = account["last_seq"]
    raise CliError(f"timed out waiting for the debit of {sandbox['id']}", EXIT_TIMEOUT)


def cmd_destroy(args: argparse.Namespace, client: Client) -> int:
    """With --wait, returns once it is gone (and billed), or exit 1 if teardown failed."""
    sandbox = client.request("DELETE", f"/v1/sandboxes/{args.id}")
    if args.wait:
        sandbox = _wait(client, sandbox, TERMINAL, args.timeout)
        _wait_settled(client, sandbox, args.timeout)
    _emit(args, sandbox)
    return EXIT_FAILED if args.wait and sandbox["state"] == "failed" else EXIT_OK


def _emit(args: argparse.Namespace, sandbox: dict[str, Any]) -> None:
    if args.json:
        _print_json(sandbox)
    else:
        _print_sandbox(sandbox)


def cmd_get(args: argparse.Namespace, client: Client) -> int:
    _emit(args, client.request("GET", f"/v1/sandboxes/{args.id}"))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    """--json prints a bare array, so scripts can `jq '.[].id'`."""
    query = {k: v for k, v in (("state", args.state), ("account", args.account)) if v}
    rows = client.request("GET", "/v1/sandboxes", query=query)["sandboxes"]
    if args.json:
        _print_json(rows)
    else:
        _print_sandboxes(rows)
    return EXIT_OK


def _follow_stream(args: argparse.Namespace, client: Client) -> int:
    """Follow the Server-Sent Events stream, resuming with Last-Event-ID on a drop."""
    last = "0"
    query = {"sandbox": args.sandbox} if args.sandbox else {}
    table = _events_table()
    while True:
        url = client.base_url + "/v1/events/stream"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Last-Event-ID": last}
        if client.token:
            headers["Authorization"] = f"Bearer {client.token}"
        req = urllib.request.Request(url, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                data = b""
                for raw in resp:
                    line = raw.rstrip(b"\r\n")
                    if line.startswith(b"id: "):
                        last = line[4:].decode()
                    elif line.startswith(b"data: "):
                        data = line[6:]
                    elif not line and data:
                        entry = json.loads(data)
                        if args.json:
                            print(json.dumps(entry), flush=True)
                        else:
                            table.write([_event_row(entry)])
                        data = b""
        except urllib.error.HTTPError as exc:
            raise CliError(_api_error(exc), EXIT_API) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if last == "0":
                raise CliError(
                    f"cannot reach the sandboxer API at {client.base_url}: {exc}", EXIT_UNREACHABLE
                ) from exc
            time.sleep(1)  # reconnect, resuming after the last event seen


def cmd_events(args: argparse.Namespace, client: Client) -> int:
    """Page through what is recorded; --follow then stays on the live stream until Ctrl-C,
    which is how one stops following, so it exits 0."""
    if args.follow:
        try:
            return _follow_stream(args, client)
        except KeyboardInterrupt:
            return EXIT_OK
    after = 0
    table = _events_table()
    try:
        while True:
            query = {"after_seq": str(after), "limit": "500"}
            if args.sandbox:
                query["sandbox"] = args.sandbox
            page = client.request("GET", "/v1/events", query=query, timeout=60)
            if args.json:
                for e in page["events"]:
                    print(json.dumps(e), flush=True)
            else:
                table.write([_event_row(e) for e in page["events"]])
            if page["events"]:
                after = page["events"][-1]["seq"]
            elif page["last_seq"] > after:
                after = page["last_seq"]  # filtered: nothing of ours up to here
            if len(page["events"]) < 500:
                return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_replay(args: argparse.Namespace, client: Client) -> int:
    """Exit 1 when the rebuilt projection differs: a check CI can run."""
    report = client.request("POST", "/v1/replay", timeout=600)
    if args.json:
        _print_json(report)
    else:
        verdict = "equal" if report["equal"] else "DIFFERENT"
        print(
            f"replayed to seq {report['seq']}: {report['sandboxes']} sandboxes; "
            f"fresh projection {verdict} to the live one"
        )
        for key in report["differences"]:
            print(f"  differs: {key}")
    return EXIT_OK if report["equal"] else EXIT_FAILED


def cmd_reconcile(args: argparse.Namespace, client: Client) -> int:
    """Exit 1 when orphans are left (found and not removed): a check cron can run."""
    query = {"remove": "true" if args.remove else "false"}
    report = client.request("POST", "/v1/reconcile", query=query, timeout=900)
    if args.json:
        _print_json(report)
    else:
        checked = ", ".join(f"{k} {v}" for k, v in sorted(report["checked"].items()))
        print(f"sweep {report['sweep_id']}: checked {checked or 'nothing'}")
        for o in report["orphans"]:
            state = "removed" if o["removed"] else "left"
            if o["error"]:
                state = f"FAILED: {o['error']}"
            print(
                f"  {o['extension']} {o['host']} {o['kind']} {o['detail']} "
                f"(sandbox {o['sandbox_id']} {o['why']}): {state}"
            )
        for extension, error in sorted(report["errors"].items()):
            print(f"  {extension}: inventory failed: {error}")
    left = [o for o in report["orphans"] if not o["removed"]]
    return EXIT_FAILED if left or report["errors"] else EXIT_OK


def cmd_profiles(args: argparse.Namespace, client: Client) -> int:
    """Profiles with their inputs, written the way `create --input` takes them."""
    profiles = client.request("GET", "/v1/profiles")["profiles"]
    if args.json:
        _print_json(profiles)
        return EXIT_OK
    rows: list[list[object]] = []
    for p in profiles:
        # One row per input; the profile's own cells only on its first row.
        first = [p["name"], p["extension"] or "(routed)", f"{p['ttl_seconds']}s"]
        summary = _cut(p["description"].split(". ")[0].strip().rstrip("."), 60)
        for n, i in enumerate(p["inputs"] or [None]):
            head = first if n == 0 else ["", "", ""]
            if i is None:
                rows.append([*head, "-", "", summary])
                continue
            default = i["default"] if i.get("default") is not None else "..."
            notes = [f for f, on in (("required", i["required"]), ("secret", i["secret"])) if on]
            if i.get("choices"):
                notes.append(f"one of {','.join(i['choices'])}")
            rows.append(
                [*head, f"{i['name']}={default}", ", ".join(notes), summary if n == 0 else ""]
            )
    Table(["PROFILE", "EXTENSION", "TTL", "INPUT", "NOTES", "DESCRIPTION"], right={2}).write(rows)
    return EXIT_OK


def cmd_ledger(args: argparse.Namespace, client: Client) -> int:
    return int(LEDGER_COMMANDS[args.ledger_command](args, client))


def _print_account(a: dict[str, Any]) -> None:
    print(
        f"{a['account']}: available {a['available']}  (granted {a['granted']}, reserved "
        f"{a['reserved']}, debited {a['debited']}, released {a['released']})"
    )


def cmd_ledger_grant(args: argparse.Namespace, client: Client) -> int:
    account = client.request(
        "POST",
        f"/v1/accounts/{args.account}/credits",
        {"amount": args.amount, "reason": args.reason},
    )
    if args.json:
        _print_json(account)
    else:
        _print_account(account)
    return EXIT_OK


def cmd_ledger_balance(args: argparse.Namespace, client: Client) -> int:
    if args.account:
        accounts = [client.request("GET", f"/v1/accounts/{args.account}")]
    else:
        accounts = client.request("GET", "/v1/accounts")["accounts"]
    if args.json:
        _print_json(accounts[0] if args.account else accounts)
        return EXIT_OK
    if args.account:
        _print_account(accounts[0])
    elif not accounts:
        print("no accounts")
    else:
        columns = ["available", "granted", "reserved", "debited", "released"]
        Table(["ACCOUNT", *(c.upper() for c in columns)], right=range(1, 6)).write(
            [[a["account"], *(a[c] for c in columns)] for a in accounts]
        )
    return EXIT_OK


def cmd_ledger_history(args: argparse.Namespace, client: Client) -> int:
    after = 0
    table = Table(
        ["SEQ", "TIME", "TYPE", "AMOUNT", "SANDBOX/REASON"],
        right={0, 3},
        tone_column=2,
        min_widths=[6, 27, 16, 6],
    )
    while True:
        page = client.request(
            "GET",
            f"/v1/accounts/{args.account}/ledger",
            query={"after_seq": str(after), "limit": "500"},
        )
        if args.json:
            for entry in page["entries"]:
                print(json.dumps(entry))
        else:
            table.write([_ledger_row(entry) for entry in page["entries"]])
        if page["next_after_seq"] is None:
            return EXIT_OK
        after = page["next_after_seq"]


def _ledger_row(entry: dict[str, Any]) -> list[object]:
    ev = entry["event"]
    amount = ev.get("amount", ev.get("requested", ""))
    detail = ev.get("sandbox_id", ev.get("reason", ""))
    return [entry["seq"], ev["occurred_at"], ev["type"], amount, detail]


def cmd_ledger_audit(args: argparse.Namespace, client: Client) -> int:
    query = {"account": args.account} if args.account else {}
    if args.ttl_grace is not None:
        query["ttl_grace"] = str(args.ttl_grace)
    report = client.request("POST", "/v1/ledger/audit", query=query or None, timeout=600)
    if args.json:
        _print_json(report)
    else:
        for d in report["debits"]:
            basis = ", ".join(f"{k}={v}" for k, v in sorted(d["basis"].items()))
            print(
                f"debit seq {d['seq']}: {d['account']} {d['amount']} credits for "
                f"{d['sandbox_id']} ({basis})"
            )
        for name, a in sorted(report["accounts"].items()):
            print(
                f"account {name}: granted {a['granted']}, reserved {a['reserved']}, "
                f"debited {a['debited']}, available "
                f"{a['granted'] - a['reserved'] - a['debited']}"
            )
        if report["ok"]:
            print(f"ok: {report['events']} ledger events replayed, every rule holds")
        else:
            print(f"VIOLATION: {report['violations'][0]}")
            for more in report["violations"][1:]:
                print(f"  also: {more}")
    return EXIT_OK if report["ok"] else EXIT_FAILED


def cmd_checkpoint(args: argparse.Namespace, client: Client) -> int:
    return int(CHECKPOINT_COMMANDS[args.checkpoint_command](args, client))


def _size(c: dict[str, Any]) -> str:
    return f"{c['size']} bytes" if c.get("size") is not None else ""


def _checkpoint_detail(c: dict[str, Any]) -> str:
    return str(c.get("error") or c.get("deleted_reason") or c.get("digest") or "")


def _print_checkpoint(c: dict[str, Any]) -> None:
    status = paint(f"{c['status']:<9}", tone(c["status"]), styled(sys.stdout))
    print(f"{c['id']}  {status} {c['sandbox_id']}  {_size(c)}  {_checkpoint_detail(c)}".rstrip())


def _wait_checkpoint(client: Client, checkpoint: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Follows the sandbox while it checkpoints, so the progress line shows the running
    step, then the checkpoint itself until it is created or failed."""
    with Progress() as progress:
        sandbox = client.request("GET", f"/v1/sandboxes/{checkpoint['sandbox_id']}")
        _poll(client, sandbox, lambda s: s["state"] != "checkpointing", timeout, progress)
        deadline = time.monotonic() + timeout
        while checkpoint["status"] == "requested":
            if time.monotonic() > deadline:
                raise CliError(
                    f"timed out: checkpoint {checkpoint['id']} is still being made", EXIT_TIMEOUT
                )
            checkpoint = client.request(
                "GET",
                f"/v1/checkpoints/{checkpoint['id']}",
                query={"wait": "10", "after_seq": str(checkpoint["last_seq"])},
                timeout=40,
            )
            progress.show(checkpoint["id"], checkpoint["status"])
        progress.show(checkpoint["id"], checkpoint["status"])
    return checkpoint


def cmd_checkpoint_create(args: argparse.Namespace, client: Client) -> int:
    checkpoint = client.request("POST", f"/v1/sandboxes/{args.id}/checkpoints")
    if args.wait:
        checkpoint = _wait_checkpoint(client, checkpoint, args.timeout)
    if args.json:
        _print_json(checkpoint)
    else:
        _print_checkpoint(checkpoint)
    return EXIT_FAILED if checkpoint["status"] == "failed" else EXIT_OK


def cmd_checkpoint_list(args: argparse.Namespace, client: Client) -> int:
    rows = client.request("GET", f"/v1/sandboxes/{args.id}/checkpoints")["checkpoints"]
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no checkpoints")
    else:
        table = Table(["ID", "STATUS", "SANDBOX", "SIZE", "DETAIL"], right={3}, tone_column=1)
        table.write(
            [[c["id"], c["status"], c["sandbox_id"], _size(c), _checkpoint_detail(c)] for c in rows]
        )
    return EXIT_OK


def cmd_checkpoint_restore(args: argparse.Namespace, client: Client) -> int:
    sandbox = client.request(
        "POST", f"/v1/sandboxes/{args.id}/restore", {"checkpoint": args.checkpoint}
    )
    if args.wait:
        sandbox = _wait(client, sandbox, {"ready"}, args.timeout)
        events = client.request("GET", f"/v1/sandboxes/{args.id}/events")["events"]
        outcome = [
            e["event"] for e in events if e["event"]["type"] in ("Restored", "RestoreFailed")
        ]
        if outcome and outcome[-1]["type"] == "RestoreFailed":
            print(f"sandboxer: restore failed: {outcome[-1]['error']}", file=sys.stderr)
            _emit(args, sandbox)
            return EXIT_FAILED
    _emit(args, sandbox)
    return EXIT_OK


def cmd_checkpoint_delete(args: argparse.Namespace, client: Client) -> int:
    checkpoint = client.request("DELETE", f"/v1/checkpoints/{args.checkpoint}")
    if args.json:
        _print_json(checkpoint)
    else:
        _print_checkpoint(checkpoint)
    return EXIT_OK


CHECKPOINT_COMMANDS = {
    "create": cmd_checkpoint_create,
    "list": cmd_checkpoint_list,
    "restore": cmd_checkpoint_restore,
    "delete": cmd_checkpoint_delete,
}


LEDGER_COMMANDS = {
    "grant": cmd_ledger_grant,
    "balance": cmd_ledger_balance,
    "history": cmd_ledger_history,
    "audit": cmd_ledger_audit,
}


# ---- parser ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors go through CliError (exit 2) like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        where = self.prog.removeprefix("sandboxer").strip()
        raise CliError(f"{where}: {message}" if where else message, EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandboxer", description="Isolated sandboxes, every step an event.")
    parser.add_argument(
        "--url",
        default=os.environ.get("SANDBOXER_URL", DEFAULT_URL),
        help="API base URL (env SANDBOXER_URL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the service (embedded NATS unless SANDBOXER_NATS_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--worker",
        action="store_true",
        help="drive sandboxes only, no HTTP API (several share one NATS cluster)",
    )
    p.add_argument(
        "--worker-name",
        help="this worker's name in the lease bucket (env SANDBOXER_WORKER_NAME; "
        "default: host and data directory)",
    )

    p = sub.add_parser("create", help="create a sandbox from a profile")
    p.add_argument("--profile")
    p.add_argument("--from-checkpoint", metavar="CID", help="clone a checkpoint")
    p.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ttl", type=int, metavar="SECONDS")
    p.add_argument("--account")
    p.add_argument("--wait", action="store_true", help="wait until ready (or it fails)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("list", help="list sandboxes")
    p.add_argument("--state")
    p.add_argument("--account")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("get", help="show one sandbox")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("destroy", help="destroy a sandbox")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until it is gone")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("events", help="show events (all, or one sandbox's)")
    p.add_argument("--sandbox")
    p.add_argument("--follow", action="store_true")
    p.add_argument("--json", action="store_true", help="JSON Lines")

    p = sub.add_parser("replay", help="rebuild the projection from sequence 1 and compare")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "reconcile", help="find what no live sandbox owns on the hosts (and remove it)"
    )
    p.add_argument("--remove", action="store_true", help="remove the orphans (else report)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("profiles", help="list profiles and their inputs")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "nats-info", help="the event store's NATS URL, stream and reader credentials file"
    )
    p.add_argument("--json", action="store_true")

    validate = sub.add_parser("validate", help="the reference validator")
    vsub = validate.add_subparsers(dest="validate_command", required=True, parser_class=_Parser)
    p = vsub.add_parser("serve", help="run health checks and test_command on ready sandboxes")
    p.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        help="seconds before an unacknowledged ready event is redelivered",
    )

    p = sub.add_parser("e2e", help="legacy make e2e: create, validate, tear down, exit code")
    p.add_argument("--profile", default="profile.compose-e2e")
    p.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--test-command", help="overrides the profile's test_command")
    p.add_argument("--timeout", type=float, default=3600.0)

    ckpt = sub.add_parser("checkpoint", help="checkpoints: create, list, restore, delete")
    csub = ckpt.add_subparsers(dest="checkpoint_command", required=True, parser_class=_Parser)
    p = csub.add_parser("create", help="checkpoint a ready sandbox")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until it is created or failed")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", action="store_true")
    p = csub.add_parser("list", help="a sandbox's checkpoints")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = csub.add_parser("restore", help="restore a sandbox to one of its checkpoints")
    p.add_argument("id")
    p.add_argument("checkpoint")
    p.add_argument("--wait", action="store_true", help="wait until it is ready again")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", action="store_true")
    p = csub.add_parser("delete", help="delete a checkpoint's artifact")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")

    ledger = sub.add_parser("ledger", help="credits: grant, balance, history, audit")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True, parser_class=_Parser)
    p = lsub.add_parser("grant", help="grant credits to an account (admin)")
    p.add_argument("account")
    p.add_argument("amount", type=int)
    p.add_argument("--reason", default="")
    p.add_argument("--json", action="store_true")
    p = lsub.add_parser("balance", help="an account's balance (all accounts without one)")
    p.add_argument("account", nargs="?")
    p.add_argument("--json", action="store_true")
    p = lsub.add_parser("history", help="an account's ledger entries")
    p.add_argument("account")
    p.add_argument("--json", action="store_true", help="JSON Lines")
    p = lsub.add_parser("audit", help="replay the ledger from sequence 1 and check its rules")
    p.add_argument("--account")
    p.add_argument(
        "--ttl-grace",
        type=float,
        metavar="S",
        help="seconds a reservation may stay open after its sandbox's TTL (default 300)",
    )
    p.add_argument("--json", action="store_true")
    return parser


COMMANDS = {
    "create": cmd_create,
    "list": cmd_list,
    "get": cmd_get,
    "destroy": cmd_destroy,
    "events": cmd_events,
    "replay": cmd_replay,
    "reconcile": cmd_reconcile,
    "profiles": cmd_profiles,
    "ledger": cmd_ledger,
    "checkpoint": cmd_checkpoint,
    "e2e": cmd_e2e,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sandboxer` and `python -m sandboxer`: returns the exit code."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help: an int, not an exception, for callers of main
            if exc.code is None:
                return EXIT_OK
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "nats-info":
            return cmd_nats_info(args)
        client = Client(check_url(args.url), os.environ.get("SANDBOXER_TOKEN"))
        return COMMANDS[args.command](args, client)
    except CliError as exc:
        print(f"sandboxer: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `sandboxer events | head`: the reader left, which is not an error. Point stdout
        # at /dev/null so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
