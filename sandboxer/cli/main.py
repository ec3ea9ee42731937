"""`sandboxer`: the command line, on the project's client library (sandboxer.client):
every API call goes through `sandboxer.client.Client`, its failures become exit codes."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from sandboxer.cli.term import Progress, Table, paint, styled, tone
from sandboxer.client import (
    ApiError,
    Client,
    ConnectionFailed,
    SandboxerClientError,
    WaitTimedOut,
)
from sandboxer.client.errors import InvalidResponse

DEFAULT_URL = "http://127.0.0.1:8080"
TERMINAL = {"destroyed", "failed", "rejected"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_API, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_COMMAND_TIMEOUT = 124  # `sandboxer exec`: the command ran out of time, as timeout(1)


class CliError(Exception):
    """A failure the user should read, carrying the exit code scripts branch on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _plain(value: Any) -> Any:
    """A wire Struct (or a list of them) as the API's JSON values: dicts, lists, str."""
    return msgspec.to_builtins(value)


@contextmanager
def api_errors(base_url: str) -> Iterator[None]:
    """The client's errors as the CLI's: an API error exits 3 with its message (and the
    field to fix), an unreachable server 4 with a hint, a wait that ran out of time 5."""
    try:
        yield
    except ApiError as exc:
        raise CliError(str(exc), EXIT_API) from None
    except ConnectionFailed as exc:
        raise CliError(
            f"{exc}\nhint: start it with `sandboxer serve`, or set SANDBOXER_URL / --url",
            EXIT_UNREACHABLE,
        ) from None
    except WaitTimedOut as exc:
        raise CliError(str(exc), EXIT_TIMEOUT) from None
    except InvalidResponse as exc:
        raise CliError(f"{base_url}: {exc}", EXIT_API) from None
    except SandboxerClientError as exc:
        raise CliError(str(exc), EXIT_FAILED) from None


def check_url(url: str) -> str:
    """Fail fast on a mistyped --url/SANDBOXER_URL (exit 2) instead of a traceback; only
    http(s) URLs."""
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
    seen = [sandbox]

    def update(out: Any) -> None:
        row = _plain(out)
        seen.append(row)
        progress.show(row["id"], row["state"], _step(row))

    progress.show(sandbox["id"], sandbox["state"], _step(sandbox))
    if done(sandbox) or sandbox["state"] in TERMINAL:
        return sandbox
    # Long-polls return at once on a new event; the 1 s cap refreshes the step's
    # progress message (it changes without an event: "compose up", "pulling 3/5").
    client.wait(
        sandbox["id"],
        until=lambda s: done(_plain(s)),
        timeout=timeout,
        poll=1.0,
        on_update=update,
    )
    return seen[-1]


def _wait(
    client: Client, sandbox: dict[str, Any], until: set[str], timeout: float
) -> dict[str, Any]:
    """Wait for a state in `until` (or a terminal one) behind a progress line on stderr."""
    with Progress() as progress:
        return _poll(client, sandbox, lambda s: s["state"] in until, timeout, progress)


# ---- commands -----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Imports the service lazily: every other command stays a fast, light client.
    The embedded NATS server is spawned before the service is imported: it recovers
    its streams from disk (most of a start on a long history) meanwhile."""
    from sandboxer.config import Settings
    from sandboxer.store.nats_server import NatsPortInUse

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    settings = Settings.from_env(host=args.host, port=args.port, worker_name=args.worker_name)
    embedded = settings.embedded_server()
    try:
        if embedded is not None:
            embedded.spawn()
        from sandboxer.bootstrap import serve
        from sandboxer.http.auth import AuthConfigError
        from sandboxer.store.event_store import MutableStream

        try:
            asyncio.run(serve(settings, http=not args.worker, embedded=embedded))
        except AuthConfigError as exc:  # a bad tokens file: one line (never a token), no trace
            raise CliError(f"serve: {exc}", EXIT_USAGE) from None
        except MutableStream as exc:  # the event store's: one line, no trace
            raise CliError(f"serve: {exc}", EXIT_FAILED) from None
    except NatsPortInUse as exc:
        raise CliError(f"serve: {exc}", EXIT_FAILED) from None
    finally:
        if embedded is not None:
            embedded.stop()  # stopped already unless serve failed before it began
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
    sandbox = _plain(client.create(args.profile, inputs=inputs).info)
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
            sandbox = _plain(client.get(sid, wait=10, after_seq=sandbox["last_seq"]))
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
            with api_errors(client.url):
                gone = _plain(client.destroy(sid))
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
    if not args.profile and not args.from_checkpoint:
        raise CliError("create needs --profile (or --from-checkpoint)", EXIT_USAGE)
    created = client.create(
        args.profile,
        inputs=_parse_inputs(args.input),
        labels=_parse_labels(args.label),
        ttl_seconds=args.ttl,
        account=args.account,
        from_checkpoint=args.from_checkpoint,
    )
    sandbox = _plain(created.info)
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
        account = client.balance(sandbox["account"], wait=5, after_seq=seq)
        if sandbox["id"] not in account.open_reservations:
            return
        seq = account.last_seq
    raise CliError(f"timed out waiting for the debit of {sandbox['id']}", EXIT_TIMEOUT)


def _parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--label {pair!r}: expected key=value", EXIT_USAGE)
        labels[key] = value
    return labels


def _write_bytes(stream: Any, data: bytes) -> None:
    """Raw bytes to stdout/stderr as they come, flushed."""
    target = getattr(stream, "buffer", None)
    if target is None:
        stream.write(data.decode(errors="replace"))
    else:
        stream.flush()
        target.write(data)
    (target or stream).flush()


def cmd_exec(args: argparse.Namespace, client: Client) -> int:
    """Runs one command: its output passed through as it comes, its exit code ours
    (124 when it timed out, 1 with a message when it did not exit)."""
    command: str | list[str]
    argv = list(args.cmd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if args.shell is not None:
        if argv:
            raise CliError("exec: give --shell SCRIPT or -- CMD ARGS..., not both", EXIT_USAGE)
        command = args.shell
    elif argv:
        command = argv
    else:
        raise CliError("exec: no command (-- CMD ARGS... or --shell SCRIPT)", EXIT_USAGE)
    env: dict[str, str] = {}
    for pair in args.env:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--env {pair!r}: expected KEY=VALUE", EXIT_USAGE)
        env[key] = value
    result = client.exec(
        args.id,
        command,
        service=args.service,
        env=env,
        workdir=args.workdir,
        timeout_seconds=args.timeout,
        on_stdout=None if args.json else lambda b: _write_bytes(sys.stdout, b),
        on_stderr=None if args.json else lambda b: _write_bytes(sys.stderr, b),
        text=False,
    )
    if args.json:
        _print_json(
            {
                "command_id": result.command_id,
                "outcome": result.outcome,
                "exit_code": result.exit_code,
                "duration_seconds": result.duration_seconds,
                "stdout": result.stdout,
                "stderr": result.stderr,
                "stdout_bytes": result.stdout_bytes,
                "stdout_sha256": result.stdout_sha256,
                "stderr_bytes": result.stderr_bytes,
                "stderr_sha256": result.stderr_sha256,
                "message": result.message,
                "seq": result.seq,
            }
        )
    if result.outcome == "exited" and result.exit_code is not None:
        return result.exit_code
    if not args.json:
        why = f": {result.message}" if result.message else ""
        print(f"sandboxer: exec: command {result.outcome}{why}", file=sys.stderr)
    return EXIT_COMMAND_TIMEOUT if result.outcome == "timeout" else EXIT_FAILED


def _remote(spec: str) -> tuple[str, str] | None:
    """`ID:PATH` (a sandbox id has no slash) or None for a local path."""
    head, sep, tail = spec.partition(":")
    if sep and head.startswith("sbx-") and "/" not in head and tail:
        return head, tail
    return None


def cmd_cp(args: argparse.Namespace, client: Client) -> int:
    """Copies one file: upload when DST is ID:PATH, download when SRC is; `-`: stdin/out."""
    src, dst = _remote(args.src), _remote(args.dst)
    if (src is None) == (dst is None):
        raise CliError("cp: exactly one of SRC and DST is ID:PATH", EXIT_USAGE)
    if dst is not None:
        sid, path = dst
        if args.src == "-":
            out = client.put_file(sid, path, sys.stdin.buffer, service=args.service)
        else:
            if not os.path.isfile(args.src):
                raise CliError(f"cp: {args.src}: no such file", EXIT_USAGE)
            out = client.put_file(sid, path, Path(args.src), service=args.service)
        if args.json:
            _print_json(_plain(out))
        else:
            print(f"{sid}:{out.path}  {out.size} bytes  sha256:{out.sha256}", file=sys.stderr)
        return EXIT_OK
    assert src is not None
    sid, path = src
    if args.dst == "-":
        sys.stdout.flush()
        size = client.download(sid, path, sys.stdout.buffer, service=args.service)
        sys.stdout.buffer.flush()
    else:
        dest = Path(args.dst)
        if dest.is_dir():
            dest = dest / Path(path).name
        size = client.download(sid, path, dest, service=args.service)
    if args.json:
        _print_json({"path": path, "size": size})
    return EXIT_OK


def _since(value: str | None) -> float | None:
    """--since: seconds ago (small numbers) or a unix time."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise CliError(
            f"--since {value!r}: expected seconds ago or a unix time", EXIT_USAGE
        ) from None
    return number if number > 10**9 else time.time() - number


def cmd_logs(args: argparse.Namespace, client: Client) -> int:
    """Lines as they come, prefixed with the service when the sandbox has several."""
    prefix = args.service is None and len(client.get(args.id).services) > 1
    for line in client.logs(
        args.id, service=args.service, follow=args.follow, tail=args.tail, since=_since(args.since)
    ):
        stream = sys.stderr if line.stream == "stderr" else sys.stdout
        stream.write(f"{line.service} | {line.line}\n" if prefix else f"{line.line}\n")
        stream.flush()
    return EXIT_OK


def cmd_destroy(args: argparse.Namespace, client: Client) -> int:
    """With --wait, returns once it is gone (and billed), or exit 1 if teardown failed."""
    sandbox = _plain(client.destroy(args.id))
    if args.wait:
        sandbox = _wait(client, sandbox, TERMINAL, args.timeout)
        _wait_settled(client, sandbox, args.timeout)
    _emit(args, sandbox)
    return EXIT_FAILED if args.wait and sandbox["state"] == "failed" else EXIT_OK


def cmd_extend(args: argparse.Namespace, client: Client) -> int:
    """The sandbox ends --ttl seconds from now (exit 3 naming the bound or the
    credits when refused)."""
    _emit(args, _plain(client.extend(args.id, args.ttl)))
    return EXIT_OK


def cmd_pause(args: argparse.Namespace, client: Client) -> int:
    """With --wait, returns once it is paused, or exit 1 if the pause failed."""
    return _pause_or_resume(args, client, client.pause, "paused", "pausing")


def cmd_resume(args: argparse.Namespace, client: Client) -> int:
    """With --wait, returns once it is ready again, or exit 1 if the resume failed."""
    return _pause_or_resume(args, client, client.resume, "ready", "resuming")


def _pause_or_resume(
    args: argparse.Namespace,
    client: Client,
    ask: Callable[[str], Any],
    wanted: str,
    step: str,
) -> int:
    sandbox = _plain(ask(args.id))
    if args.wait:
        with Progress() as progress:
            sandbox = _poll(client, sandbox, lambda s: s["state"] != step, args.timeout, progress)
    _emit(args, sandbox)
    return EXIT_FAILED if args.wait and sandbox["state"] != wanted else EXIT_OK


def cmd_keepalive(args: argparse.Namespace, client: Client) -> int:
    _emit(args, _plain(client.keepalive(args.id)))
    return EXIT_OK


def _emit(args: argparse.Namespace, sandbox: dict[str, Any]) -> None:
    if args.json:
        _print_json(sandbox)
    else:
        _print_sandbox(sandbox)


def cmd_get(args: argparse.Namespace, client: Client) -> int:
    _emit(args, _plain(client.get(args.id)))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, client: Client) -> int:
    """--json prints a bare array, so scripts can `jq '.[].id'`."""
    rows = _plain(
        client.list(state=args.state or None, account=args.account or None, label=args.label)
    )
    if args.json:
        _print_json(rows)
    else:
        _print_sandboxes(rows)
    return EXIT_OK


def _follow_stream(args: argparse.Namespace, client: Client) -> int:
    """Follow the Server-Sent Events stream (the client resumes it with Last-Event-ID
    when it drops)."""
    table = _events_table()
    for event in client.event_stream(sandbox=args.sandbox):
        entry = _plain(event)
        if args.json:
            print(json.dumps(entry), flush=True)
        else:
            table.write([_event_row(entry)])
    return EXIT_OK


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
            page = _plain(client.events_page(after_seq=after, limit=500, sandbox=args.sandbox))
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
    report = client.request("POST", "/v1/replay", timeout=600)  # untyped: plain values
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
    report = client.request("POST", "/v1/reconcile", params=query, timeout=900)
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
    profiles = _plain(client.profiles())
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


def cmd_pools(args: argparse.Namespace, client: Client) -> int:
    """The warm pools: members ready and coming up against each pool's size."""
    pools = _plain(client.pools())
    if args.json:
        _print_json(pools)
        return EXIT_OK
    rows = [
        [p["profile"], p["size"], p["ready"], p["provisioning"], p["claimed"], p["max_age_seconds"]]
        for p in pools
    ]
    Table(
        ["PROFILE", "SIZE", "READY", "PROVISIONING", "CLAIMED", "MAX AGE"], right={1, 2, 3, 4, 5}
    ).write(rows)
    return EXIT_OK


def cmd_ledger(args: argparse.Namespace, client: Client) -> int:
    return int(LEDGER_COMMANDS[args.ledger_command](args, client))


def _print_account(a: dict[str, Any]) -> None:
    print(
        f"{a['account']}: available {a['available']}  (granted {a['granted']}, reserved "
        f"{a['reserved']}, debited {a['debited']}, released {a['released']})"
    )


def cmd_ledger_grant(args: argparse.Namespace, client: Client) -> int:
    account = _plain(client.grant(args.account, args.amount, args.reason))
    if args.json:
        _print_json(account)
    else:
        _print_account(account)
    return EXIT_OK


def cmd_ledger_balance(args: argparse.Namespace, client: Client) -> int:
    if args.account:
        accounts = [_plain(client.balance(args.account))]
    else:
        accounts = _plain(client.accounts())
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
        page = _plain(client.history_page(args.account, after_seq=after, limit=500))
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
    report = client.audit(account=args.account or None, ttl_grace=args.ttl_grace)
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
        sandbox = _plain(client.get(checkpoint["sandbox_id"]))
        _poll(client, sandbox, lambda s: s["state"] != "checkpointing", timeout, progress)
        out = client.wait_checkpoint(
            checkpoint["id"],
            timeout=timeout,
            poll=10,
            on_update=lambda c: progress.show(c.id, c.status),
        )
        checkpoint = _plain(out)
    return checkpoint


def cmd_checkpoint_create(args: argparse.Namespace, client: Client) -> int:
    checkpoint = _plain(client.create_checkpoint(args.id))
    if args.wait:
        checkpoint = _wait_checkpoint(client, checkpoint, args.timeout)
    if args.json:
        _print_json(checkpoint)
    else:
        _print_checkpoint(checkpoint)
    return EXIT_FAILED if checkpoint["status"] == "failed" else EXIT_OK


def cmd_checkpoint_list(args: argparse.Namespace, client: Client) -> int:
    rows = _plain(client.list_checkpoints(args.id))
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
    sandbox = _plain(client.restore(args.id, args.checkpoint))
    if args.wait:
        sandbox = _wait(client, sandbox, {"ready"}, args.timeout)
        events = _plain(client.sandbox_events(args.id))
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
    checkpoint = _plain(client.delete_checkpoint(args.checkpoint))
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
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--wait", action="store_true", help="wait until ready (or it fails)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("list", help="list sandboxes")
    p.add_argument("--state")
    p.add_argument("--account")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="all must match"
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("get", help="show one sandbox")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("destroy", help="destroy a sandbox")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until it is gone")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("extend", help="change a sandbox's TTL: it ends --ttl seconds from now")
    p.add_argument("id")
    p.add_argument("--ttl", type=int, required=True, metavar="S", help="seconds from now")
    p.add_argument("--json", action="store_true")

    for name, what in (("pause", "pause a ready sandbox"), ("resume", "resume a paused one")):
        p = sub.add_parser(name, help=what)
        p.add_argument("id")
        p.add_argument("--wait", action="store_true", help="wait until it is done")
        p.add_argument("--timeout", type=float, default=600.0)
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("keepalive", help="say a sandbox is in use (not idle)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "exec", help="run a command in a sandbox: ID [options] -- CMD ARGS... (or --shell)"
    )
    p.add_argument("id")
    p.add_argument("--service")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="the command's (default 60)")
    p.add_argument("--shell", metavar="SCRIPT", help="a script for sh -c instead of CMD ARGS")
    p.add_argument("--json", action="store_true", help="print the exit record instead")
    p.add_argument("cmd", nargs="*", metavar="CMD ARGS", help="after --")

    p = sub.add_parser("cp", help="copy a file: SRC DST, one of them ID:PATH (- : stdin/stdout)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--service")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("logs", help="a sandbox's service logs")
    p.add_argument("id")
    p.add_argument("--service")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, metavar="N")
    p.add_argument("--since", metavar="SECONDS_AGO|UNIX_TIME")

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

    p = sub.add_parser("pools", help="the warm pools: members ready against each size")
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
    "extend": cmd_extend,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "keepalive": cmd_keepalive,
    "events": cmd_events,
    "exec": cmd_exec,
    "cp": cmd_cp,
    "logs": cmd_logs,
    "replay": cmd_replay,
    "reconcile": cmd_reconcile,
    "profiles": cmd_profiles,
    "pools": cmd_pools,
    "ledger": cmd_ledger,
    "checkpoint": cmd_checkpoint,
    "e2e": cmd_e2e,
}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`exec ID [options] -- CMD ARGS...`: what follows the first `--` is the command,
    as it is (options of its own included), never the CLI's options."""
    if "--" in argv:
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        if args.command == "exec":
            args.cmd = [*args.cmd, *argv[cut + 1 :]]
            return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sandboxer` and `python -m sandboxer`: returns the exit code."""
    try:
        try:
            args = _parse(build_parser(), sys.argv[1:] if argv is None else argv)
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
        url = check_url(args.url)
        with Client(url, os.environ.get("SANDBOXER_TOKEN")) as client, api_errors(url):
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
