"""The synchronous client: `Client` (the API) and `Sandbox` (one sandbox's handle)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx

import sandboxer.client._common as c
from sandboxer.client.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    NotPaused,
    SandboxerClientError,
    SandboxFailed,
    WaitTimedOut,
)
from sandboxer.client.result import ExecCollector, ExecResult
from sandboxer.wire import (
    AccountList,
    AccountOut,
    AnyExecFrame,
    CheckpointList,
    CheckpointOut,
    EventList,
    EventOut,
    ExecStdout,
    FileOut,
    Health,
    Identity,
    LedgerPage,
    LogLine,
    PoolOut,
    ProfileList,
    ProfileOut,
    SandboxList,
    SandboxOut,
)

T = TypeVar("T")
Output = Callable[[bytes], None] | Callable[[str], None]
FileSource = bytes | str | Path | IO[bytes]


class Client:
    """The sandboxer API over HTTP. `url` defaults to SANDBOXER_URL (else
    http://127.0.0.1:8080), `token` to SANDBOXER_TOKEN; `timeout` bounds every ordinary
    request (long-polls and streams get their own bounds). Use it as a context manager,
    or call `close()`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = c.DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = c.resolve_url(url)
        self.token = c.resolve_token(token)
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.url,
            headers=c.headers(self.token),
            timeout=c.timeout(timeout),
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- plumbing --------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: c.Query | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        try:
            response = self._http.request(
                method,
                path,
                json=json,
                params=params,
                headers=headers,
                timeout=c.timeout(timeout or self.timeout),
            )
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc
        c.check(response, response.content)
        return response.content

    def _typed(self, type_: type[T], method: str, path: str, **kwargs: Any) -> T:
        return c.decode(self._send(method, path, **kwargs), type_, f"{method} {path}")

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | c.Query | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Any API call, its JSON answer as plain Python values (the typed methods are
        built on the same plumbing and raise the same errors)."""
        query = c.clean(params) if isinstance(params, Mapping) else params
        content = self._send(method, path, json=json, params=query, timeout=timeout)
        return c.decode_any(content, f"{method} {path}")

    # ---- sandboxes -------------------------------------------------------------------

    def create(
        self,
        profile: str | None = None,
        *,
        inputs: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl_seconds: int | None = None,
        account: str | None = None,
        from_checkpoint: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        wait_timeout: float = 600.0,
    ) -> Sandbox:
        """Asks for a sandbox; with `wait`, returns once it is ready (SandboxFailed if it
        ends rejected/failed, WaitTimedOut after `wait_timeout` seconds). The returned
        Sandbox is a context manager that destroys it on leaving."""
        body = c.create_body(profile, inputs, labels, ttl_seconds, account, from_checkpoint)
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        out = self._typed(SandboxOut, "POST", "/v1/sandboxes", json=body, headers=extra)
        if wait:
            out = self.wait_ready(out, timeout=wait_timeout)
        return Sandbox(self, out)

    def get(
        self,
        sandbox: str | SandboxOut | Sandbox,
        *,
        wait: float | None = None,
        after_seq: int | None = None,
    ) -> SandboxOut:
        """The sandbox; with `wait` (a long-poll, at most 60 s), once it has an event
        after `after_seq`, or as it is after `wait` seconds."""
        params = c.clean({"wait": wait, "after_seq": after_seq})
        return self._typed(
            SandboxOut,
            "GET",
            f"/v1/sandboxes/{c.ids_of(sandbox)}",
            params=params,
            timeout=(wait or 0) + self.timeout,
        )

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle on an existing sandbox (fetched once)."""
        return Sandbox(self, self.get(sandbox_id))

    def list(
        self,
        *,
        state: str | None = None,
        account: str | None = None,
        live: bool | None = None,
        label: str | Sequence[str] | None = None,
    ) -> builtins.list[SandboxOut]:
        """`label`: "k=v" or a list of them (all must match)."""
        params = c.clean({"state": state, "account": account, "live": live})
        params += c.label_params(label)
        rows: builtins.list[SandboxOut] = []
        cursor: str | None = None
        while True:  # every page, by creation time
            page = self._typed(
                SandboxList, "GET", "/v1/sandboxes", params=params + c.clean({"cursor": cursor})
            )
            rows += page.sandboxes
            if page.next_cursor is None or not page.sandboxes:
                return rows
            cursor = page.next_cursor

    def destroy(
        self, sandbox: str | SandboxOut | Sandbox, *, wait: bool = False, timeout: float = 600.0
    ) -> SandboxOut:
        """Asks for teardown; with `wait`, returns once it is terminal."""
        out = self._typed(SandboxOut, "DELETE", f"/v1/sandboxes/{c.ids_of(sandbox)}")
        if wait:
            out = self.wait(out, until=c.TERMINAL, timeout=timeout)
        return out

    def extend(self, sandbox: str | SandboxOut | Sandbox, ttl_seconds: int) -> SandboxOut:
        """The sandbox ends `ttl_seconds` from now (within its profile's
        max_ttl_seconds; a metered one's reservation is topped up, or a 402)."""
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}"
        return self._typed(SandboxOut, "PATCH", path, json={"ttl_seconds": ttl_seconds})

    def pause(
        self, sandbox: str | SandboxOut | Sandbox, *, wait: bool = False, timeout: float = 600.0
    ) -> SandboxOut:
        """Pauses a ready sandbox; with `wait`, returns once it is paused (NotPaused
        if the pause failed and it is ready again)."""
        out = self._typed(SandboxOut, "POST", f"/v1/sandboxes/{c.ids_of(sandbox)}/pause")
        return self._settle(out, "paused", timeout) if wait else out

    def resume(
        self, sandbox: str | SandboxOut | Sandbox, *, wait: bool = False, timeout: float = 600.0
    ) -> SandboxOut:
        """Resumes a paused sandbox; with `wait`, returns once it is ready again."""
        out = self._typed(SandboxOut, "POST", f"/v1/sandboxes/{c.ids_of(sandbox)}/resume")
        return self._settle(out, "ready", timeout) if wait else out

    def keepalive(self, sandbox: str | SandboxOut | Sandbox) -> SandboxOut:
        """Says the sandbox is in use: its idle timeout starts again."""
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}/keepalive"
        return self._typed(SandboxOut, "POST", path)

    def _settle(self, out: SandboxOut, wanted: str, timeout: float) -> SandboxOut:
        step = c.PAUSE_STEPS[wanted]
        out = self.wait(out, until=lambda s: s.state != step, timeout=timeout)
        if out.state != wanted:
            raise NotPaused(out, wanted)
        return out

    def poll(self, sandbox: SandboxOut, wait: float) -> SandboxOut:
        """One long-poll: the sandbox once it has an event after `sandbox.last_seq`, or
        as it is after `wait` seconds."""
        return self.get(sandbox.id, wait=max(0.1, round(wait, 1)), after_seq=sandbox.last_seq)

    def wait(
        self,
        sandbox: str | SandboxOut | Sandbox,
        *,
        until: Callable[[SandboxOut], bool] | frozenset[str] | set[str] = c.TERMINAL,
        timeout: float = 600.0,
        poll: float = c.LONG_POLL,
        on_update: Callable[[SandboxOut], None] | None = None,
    ) -> SandboxOut:
        """Long-polls until `until` (states, or a test) holds or the sandbox is terminal;
        `on_update` sees every state on the way. WaitTimedOut after `timeout` seconds."""
        out = sandbox if isinstance(sandbox, SandboxOut) else self.get(sandbox)
        done = until if callable(until) else (lambda s, states=until: s.state in states)
        deadline = time.monotonic() + timeout
        while True:
            if on_update is not None:
                on_update(out)
            if done(out) or out.terminal or out.state in c.TERMINAL:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimedOut(
                    f"timed out after {timeout:g}s: {out.id} is {out.state}", sandbox=out
                )
            out = self.poll(out, min(poll, left))

    def wait_ready(
        self, sandbox: str | SandboxOut | Sandbox, *, timeout: float = 600.0
    ) -> SandboxOut:
        """Until ready; SandboxFailed when it ends rejected/failed instead."""
        out = self.wait(sandbox, until={"ready"}, timeout=timeout)
        if out.state != "ready":
            raise SandboxFailed(out)
        return out

    # ---- events ----------------------------------------------------------------------

    def sandbox_events(self, sandbox: str | SandboxOut | Sandbox) -> builtins.list[EventOut]:
        return self._typed(EventList, "GET", f"/v1/sandboxes/{c.ids_of(sandbox)}/events").events

    def events_page(
        self,
        *,
        after_seq: int = 0,
        limit: int = c.MAX_PAGE,
        sandbox: str | None = None,
        wait: float | None = None,
    ) -> EventList:
        params = c.clean({"after_seq": after_seq, "limit": limit, "sandbox": sandbox, "wait": wait})
        extra = (wait or 0) + self.timeout
        return self._typed(EventList, "GET", "/v1/events", params=params, timeout=extra)

    def events(
        self,
        *,
        sandbox: str | None = None,
        after_seq: int = 0,
        follow: bool = False,
        types: Sequence[str] | None = None,
    ) -> Iterator[EventOut]:
        """Every event after `after_seq` (paged); with `follow`, then the live stream
        (`GET /v1/events/stream`), resumed with Last-Event-ID when the connection drops,
        until the caller stops iterating."""
        after = after_seq
        while True:
            page = self.events_page(after_seq=after, sandbox=sandbox)
            for event in page.events:
                if not types or event.event.get("type") in types:
                    yield event
                after = event.seq
            if not page.events and page.last_seq > after:
                after = page.last_seq  # filtered: nothing of ours up to here
            if len(page.events) < c.MAX_PAGE:
                break
        if follow:
            yield from self.event_stream(
                sandbox=sandbox, after_seq=after, types=types, reconnect=True
            )

    def event_stream(
        self,
        *,
        sandbox: str | None = None,
        after_seq: int = 0,
        types: Sequence[str] | None = None,
        reconnect: bool = False,
    ) -> Iterator[EventOut]:
        """The live Server-Sent Events stream after `after_seq`, reconnecting (with
        Last-Event-ID) when it drops, until the caller stops iterating. The first
        connection's failure is raised, unless `reconnect` (then it is retried too:
        `events(follow=True)` has reached the server already)."""
        last = str(after_seq)
        params = c.clean({"sandbox": sandbox, "type": ",".join(types) if types else None})
        connected = reconnect
        while True:
            parser = c.SSEParser()
            try:
                with self._http.stream(
                    "GET",
                    "/v1/events/stream",
                    params=params,
                    headers={"Last-Event-ID": last, "Accept": "text/event-stream"},
                    timeout=c.timeout(60.0),  # the server sends a keepalive well within
                ) as response:
                    if response.status_code >= 400:
                        c.check(response, response.read())
                    connected = True
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if parser.last_id:
                            last = parser.last_id
                        if event is not None:
                            yield event
            except httpx.TransportError as exc:
                if not connected:
                    raise c.connection_failed(self.url, exc) from exc
                time.sleep(0.5)  # back off before reconnecting, not a synchronisation

    # ---- exec, files, logs -----------------------------------------------------------

    @contextmanager
    def _exec_response(self, sandbox_id: str, body: dict[str, Any]) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(
                "POST",
                f"/v1/sandboxes/{sandbox_id}/exec",
                json=body,
                headers={"Accept": "application/x-ndjson"},
                timeout=c.timeout(c.exec_read_timeout(body.get("timeout_seconds"))),
            ) as response:
                if response.status_code >= 400:
                    c.check(response, response.read())
                yield response
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc

    def exec_stream(
        self,
        sandbox: str | SandboxOut | Sandbox,
        command: str | Sequence[str],
        *,
        service: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Iterator[AnyExecFrame]:
        """The command's frames as they come: ExecStarted, ExecStdout/ExecStderr chunks,
        one ExecExit. Closing the iterator early closes the stream, which stops the
        command on the server."""
        body = c.exec_body(command, service, env, workdir, timeout_seconds)
        with self._exec_response(c.ids_of(sandbox), body) as response:
            buffer = bytearray()
            try:
                for chunk in response.iter_bytes():
                    for line in c.ndjson_lines(buffer, chunk):
                        yield c.decode_frame(line)
                if buffer.strip():
                    yield c.decode_frame(bytes(buffer))
            except httpx.TransportError as exc:
                raise c.connection_failed(self.url, exc) from exc

    def exec(
        self,
        sandbox: str | SandboxOut | Sandbox,
        command: str | Sequence[str],
        *,
        service: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout_seconds: float | None = None,
        on_stdout: Output | None = None,
        on_stderr: Output | None = None,
        text: bool = True,
    ) -> ExecResult:
        """Runs one command to its end. `command`: a str is a shell script, a list argv.
        `on_stdout`/`on_stderr` get each chunk as it arrives: str (decoded, invalid
        bytes replaced) or, with `text=False`, bytes."""
        collector = ExecCollector()
        frames = self.exec_stream(
            sandbox,
            command,
            service=service,
            env=env,
            workdir=workdir,
            timeout_seconds=timeout_seconds,
        )
        # text: decoded incrementally, so a character split across chunks stays whole
        decoders = {"out": c.utf8_decoder(), "err": c.utf8_decoder()}
        for frame in frames:
            data = collector.feed(frame)
            if data is None:
                continue
            out = isinstance(frame, ExecStdout)
            callback = on_stdout if out else on_stderr
            if callback is not None:
                chunk = decoders["out" if out else "err"].decode(data) if text else data
                if chunk:
                    callback(chunk)  # type: ignore[arg-type]
        if text:
            for key, callback in (("out", on_stdout), ("err", on_stderr)):
                rest = decoders[key].decode(b"", final=True)
                if rest and callback is not None:
                    callback(rest)  # type: ignore[arg-type]
        return collector.result()

    def put_file(
        self,
        sandbox: str | SandboxOut | Sandbox,
        path: str,
        source: FileSource,
        *,
        service: str | None = None,
        timeout: float | None = None,
    ) -> FileOut:
        """Writes a file into the sandbox: `source` is the bytes, a local path (str or
        Path, streamed) or a binary file object (streamed)."""
        url = f"/v1/sandboxes/{c.ids_of(sandbox)}/files"
        params = c.file_params(path, service)
        limit = c.timeout(timeout or max(self.timeout, 300.0))
        extra = {"Content-Type": "application/octet-stream"}
        try:
            if isinstance(source, bytes):
                response = self._http.put(
                    url, content=source, params=params, headers=extra, timeout=limit
                )
            elif isinstance(source, (str, Path)):
                with open(source, "rb") as handle:
                    response = self._http.put(
                        url, content=_chunks(handle), params=params, headers=extra, timeout=limit
                    )
            else:
                response = self._http.put(
                    url, content=_chunks(source), params=params, headers=extra, timeout=limit
                )
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc
        c.check(response, response.content)
        return c.decode(response.content, FileOut, f"PUT {url}")

    @contextmanager
    def open_file(
        self,
        sandbox: str | SandboxOut | Sandbox,
        path: str,
        *,
        service: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[httpx.Response]:
        """The download's response, streaming: iterate `.iter_bytes()`."""
        try:
            with self._http.stream(
                "GET",
                f"/v1/sandboxes/{c.ids_of(sandbox)}/files",
                params=c.file_params(path, service),
                headers={"Accept": "application/octet-stream"},
                timeout=c.timeout(timeout or max(self.timeout, 300.0)),
            ) as response:
                if response.status_code >= 400:
                    c.check(response, response.read())
                yield response
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc

    def get_file(
        self, sandbox: str | SandboxOut | Sandbox, path: str, *, service: str | None = None
    ) -> bytes:
        with self.open_file(sandbox, path, service=service) as response:
            return response.read()

    def download(
        self,
        sandbox: str | SandboxOut | Sandbox,
        path: str,
        dest: str | Path | IO[bytes],
        *,
        service: str | None = None,
    ) -> int:
        """Streams the file to `dest` (a local path or a binary file object); the size."""
        size = 0
        with self.open_file(sandbox, path, service=service) as response:
            if isinstance(dest, (str, Path)):
                with open(dest, "wb") as handle:
                    for chunk in response.iter_bytes(c.CHUNK):
                        handle.write(chunk)
                        size += len(chunk)
            else:
                for chunk in response.iter_bytes(c.CHUNK):
                    dest.write(chunk)
                    size += len(chunk)
        return size

    def logs(
        self,
        sandbox: str | SandboxOut | Sandbox,
        *,
        service: str | None = None,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
    ) -> Iterator[LogLine]:
        """The services' log lines (`since`: unix seconds); with `follow`, as they come
        until the services stop or the caller stops iterating."""
        params = c.clean(
            {"service": service, "follow": True if follow else None, "tail": tail, "since": since}
        )
        try:
            with self._http.stream(
                "GET",
                f"/v1/sandboxes/{c.ids_of(sandbox)}/logs",
                params=params,
                headers={"Accept": "application/x-ndjson"},
                timeout=c.timeout(None if follow else max(self.timeout, 120.0)),
            ) as response:
                if response.status_code >= 400:
                    c.check(response, response.read())
                buffer = bytearray()
                for chunk in response.iter_bytes():
                    for line in c.ndjson_lines(buffer, chunk):
                        yield c.decode_log(line)
                if buffer.strip():
                    yield c.decode_log(bytes(buffer))
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc

    # ---- checkpoints -----------------------------------------------------------------

    def create_checkpoint(
        self, sandbox: str | SandboxOut | Sandbox, *, wait: bool = False, timeout: float = 3600.0
    ) -> CheckpointOut:
        """Checkpoints a ready sandbox; with `wait`, returns once `created` or `failed`."""
        out = self._typed(CheckpointOut, "POST", f"/v1/sandboxes/{c.ids_of(sandbox)}/checkpoints")
        return self.wait_checkpoint(out, timeout=timeout) if wait else out

    def list_checkpoints(self, sandbox: str | SandboxOut | Sandbox) -> builtins.list[CheckpointOut]:
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}/checkpoints"
        return self._typed(CheckpointList, "GET", path).checkpoints

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointOut:
        return self._typed(CheckpointOut, "GET", f"/v1/checkpoints/{checkpoint_id}")

    def wait_checkpoint(
        self,
        checkpoint: str | CheckpointOut,
        *,
        timeout: float = 3600.0,
        poll: float = c.LONG_POLL,
        on_update: Callable[[CheckpointOut], None] | None = None,
    ) -> CheckpointOut:
        """Long-polls the checkpoint until it is no longer `requested`."""
        out = (
            checkpoint if isinstance(checkpoint, CheckpointOut) else self.get_checkpoint(checkpoint)
        )
        deadline = time.monotonic() + timeout
        while out.status == "requested":
            if on_update is not None:
                on_update(out)
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimedOut(
                    f"timed out: checkpoint {out.id} is still being made", checkpoint=out
                )
            wait = min(poll, left)
            out = self._typed(
                CheckpointOut,
                "GET",
                f"/v1/checkpoints/{out.id}",
                params=[("wait", f"{wait:.1f}"), ("after_seq", str(out.last_seq))],
                timeout=wait + self.timeout,
            )
        if on_update is not None:
            on_update(out)
        return out

    def restore(
        self,
        sandbox: str | SandboxOut | Sandbox,
        checkpoint_id: str,
        *,
        wait: bool = False,
        timeout: float = 3600.0,
    ) -> SandboxOut:
        """Restores the sandbox to one of its checkpoints; with `wait`, until ready."""
        out = self._typed(
            SandboxOut,
            "POST",
            f"/v1/sandboxes/{c.ids_of(sandbox)}/restore",
            json={"checkpoint": checkpoint_id},
        )
        return self.wait(out, until={"ready"}, timeout=timeout) if wait else out

    def delete_checkpoint(self, checkpoint_id: str) -> CheckpointOut:
        return self._typed(CheckpointOut, "DELETE", f"/v1/checkpoints/{checkpoint_id}")

    # ---- ledger, profiles, identity --------------------------------------------------

    def grant(self, account: str, amount: int, reason: str = "") -> AccountOut:
        body = {"amount": amount, "reason": reason}
        return self._typed(AccountOut, "POST", f"/v1/accounts/{account}/credits", json=body)

    def balance(
        self, account: str, *, wait: float | None = None, after_seq: int | None = None
    ) -> AccountOut:
        params = c.clean({"wait": wait, "after_seq": after_seq})
        return self._typed(
            AccountOut,
            "GET",
            f"/v1/accounts/{account}",
            params=params,
            timeout=(wait or 0) + self.timeout,
        )

    def accounts(self) -> builtins.list[AccountOut]:
        return self._typed(AccountList, "GET", "/v1/accounts").accounts

    def history_page(
        self, account: str, *, after_seq: int = 0, limit: int = c.MAX_PAGE
    ) -> LedgerPage:
        params = c.clean({"after_seq": after_seq, "limit": limit})
        return self._typed(LedgerPage, "GET", f"/v1/accounts/{account}/ledger", params=params)

    def history(self, account: str, *, after_seq: int = 0) -> Iterator[EventOut]:
        """Every ledger entry of the account, oldest first (paged)."""
        after: int | None = after_seq
        while after is not None:
            page = self.history_page(account, after_seq=after)
            yield from page.entries
            after = page.next_after_seq

    def audit(self, *, account: str | None = None, ttl_grace: float | None = None) -> Any:
        """Replays the ledger and checks its rules: the report as plain values."""
        params = c.clean({"account": account, "ttl_grace": ttl_grace})
        return self.request("POST", "/v1/ledger/audit", params=params, timeout=600)

    def profiles(self) -> builtins.list[ProfileOut]:
        return self._typed(ProfileList, "GET", "/v1/profiles").profiles

    def whoami(self) -> Identity:
        return self._typed(Identity, "GET", "/v1/whoami")

    def health(self) -> Health:
        return self._typed(Health, "GET", "/healthz")

    def openapi(self) -> Any:
        return self.request("GET", "/openapi.json")

    def pools(self) -> builtins.list[PoolOut]:
        """The warm pools (docs/pools.md)."""
        return self._typed(builtins.list[PoolOut], "GET", "/v1/pools")


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(c.CHUNK):
        yield chunk


class Sandbox:
    """One sandbox: its last seen state (`.info`, a SandboxOut) and what one does with
    it. As a context manager, leaving the block destroys it and waits until terminal."""

    def __init__(self, client: Client, info: SandboxOut) -> None:
        self.client = client
        self.info = info
        self.id = info.id

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, state={self.info.state!r})"

    @property
    def state(self) -> str:
        return self.info.state

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.destroy(wait=True)
        except (NotFound, InvalidRequest):
            pass
        except SandboxerClientError:
            if kind is None:
                raise

    def refresh(self) -> SandboxOut:
        self.info = self.client.get(self.id)
        return self.info

    def wait(
        self, until: frozenset[str] | set[str] = frozenset({"ready"}), timeout: float = 600.0
    ) -> SandboxOut:
        self.info = self.client.wait(self.info, until=until, timeout=timeout)
        return self.info

    def destroy(self, *, wait: bool = True, timeout: float = 600.0) -> SandboxOut:
        """Destroys it (a sandbox already terminal is left as it is)."""
        if self.info.terminal:
            return self.info
        try:
            self.info = self.client.destroy(self.id, wait=wait, timeout=timeout)
        except Conflict as exc:  # already being torn down: wait for the end
            if not wait:
                raise
            self.info = self.client.wait(self.id, timeout=timeout)
            if not self.info.terminal:
                raise exc
        return self.info

    def extend(self, ttl_seconds: int) -> SandboxOut:
        self.info = self.client.extend(self.id, ttl_seconds)
        return self.info

    def pause(self, *, wait: bool = True, timeout: float = 600.0) -> SandboxOut:
        self.info = self.client.pause(self.id, wait=wait, timeout=timeout)
        return self.info

    def resume(self, *, wait: bool = True, timeout: float = 600.0) -> SandboxOut:
        self.info = self.client.resume(self.id, wait=wait, timeout=timeout)
        return self.info

    def keepalive(self) -> SandboxOut:
        self.info = self.client.keepalive(self.id)
        return self.info

    def exec(self, command: str | Sequence[str], **kwargs: Any) -> ExecResult:
        return self.client.exec(self.id, command, **kwargs)

    def exec_stream(self, command: str | Sequence[str], **kwargs: Any) -> Iterator[AnyExecFrame]:
        return self.client.exec_stream(self.id, command, **kwargs)

    def put_file(self, path: str, source: FileSource, *, service: str | None = None) -> FileOut:
        return self.client.put_file(self.id, path, source, service=service)

    def get_file(self, path: str, *, service: str | None = None) -> bytes:
        return self.client.get_file(self.id, path, service=service)

    def download(
        self, path: str, dest: str | Path | IO[bytes], *, service: str | None = None
    ) -> int:
        return self.client.download(self.id, path, dest, service=service)

    def logs(self, **kwargs: Any) -> Iterator[LogLine]:
        return self.client.logs(self.id, **kwargs)

    def events(self) -> builtins.list[EventOut]:
        return self.client.sandbox_events(self.id)

    def checkpoint(self, *, wait: bool = True, timeout: float = 3600.0) -> CheckpointOut:
        return self.client.create_checkpoint(self.id, wait=wait, timeout=timeout)

    def checkpoints(self) -> builtins.list[CheckpointOut]:
        return self.client.list_checkpoints(self.id)

    def restore(
        self, checkpoint_id: str, *, wait: bool = True, timeout: float = 3600.0
    ) -> SandboxOut:
        self.info = self.client.restore(self.id, checkpoint_id, wait=wait, timeout=timeout)
        return self.info
