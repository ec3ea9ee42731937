"""The asynchronous client: `AsyncClient` and `AsyncSandbox`, the same methods as the
synchronous ones, awaited (and async iterators where those return iterators)."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
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
from sandboxer.client.sync import FileSource, Output
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


class AsyncClient:
    """The sandboxer API over HTTP, async: `async with AsyncClient() as client: ...`.
    Configuration as Client's (SANDBOXER_URL, SANDBOXER_TOKEN)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = c.DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = c.resolve_url(url)
        self.token = c.resolve_token(token)
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=c.headers(self.token),
            timeout=c.timeout(timeout),
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # ---- plumbing --------------------------------------------------------------------

    async def _send(
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
            response = await self._http.request(
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

    async def _typed(self, type_: type[T], method: str, path: str, **kwargs: Any) -> T:
        content = await self._send(method, path, **kwargs)
        return c.decode(content, type_, f"{method} {path}")

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | c.Query | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Any API call, its JSON answer as plain Python values."""
        query = c.clean(params) if isinstance(params, Mapping) else params
        content = await self._send(method, path, json=json, params=query, timeout=timeout)
        return c.decode_any(content, f"{method} {path}")

    # ---- sandboxes -------------------------------------------------------------------

    async def create(
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
    ) -> AsyncSandbox:
        body = c.create_body(profile, inputs, labels, ttl_seconds, account, from_checkpoint)
        extra = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        out = await self._typed(SandboxOut, "POST", "/v1/sandboxes", json=body, headers=extra)
        if wait:
            out = await self.wait_ready(out, timeout=wait_timeout)
        return AsyncSandbox(self, out)

    async def get(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        *,
        wait: float | None = None,
        after_seq: int | None = None,
    ) -> SandboxOut:
        """The sandbox; with `wait` (a long-poll, at most 60 s), once it has an event
        after `after_seq`, or as it is after `wait` seconds."""
        params = c.clean({"wait": wait, "after_seq": after_seq})
        return await self._typed(
            SandboxOut,
            "GET",
            f"/v1/sandboxes/{c.ids_of(sandbox)}",
            params=params,
            timeout=(wait or 0) + self.timeout,
        )

    async def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(self, await self.get(sandbox_id))

    async def list(
        self,
        *,
        state: str | None = None,
        account: str | None = None,
        live: bool | None = None,
        label: str | Sequence[str] | None = None,
    ) -> builtins.list[SandboxOut]:
        params = c.clean({"state": state, "account": account, "live": live})
        params += c.label_params(label)
        rows: builtins.list[SandboxOut] = []
        cursor: str | None = None
        while True:  # every page, by creation time
            page = await self._typed(
                SandboxList, "GET", "/v1/sandboxes", params=params + c.clean({"cursor": cursor})
            )
            rows += page.sandboxes
            if page.next_cursor is None or not page.sandboxes:
                return rows
            cursor = page.next_cursor

    async def destroy(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        *,
        wait: bool = False,
        timeout: float = 600.0,
    ) -> SandboxOut:
        out = await self._typed(SandboxOut, "DELETE", f"/v1/sandboxes/{c.ids_of(sandbox)}")
        if wait:
            out = await self.wait(out, until=c.TERMINAL, timeout=timeout)
        return out

    async def extend(
        self, sandbox: str | SandboxOut | AsyncSandbox, ttl_seconds: int
    ) -> SandboxOut:
        """The sandbox ends `ttl_seconds` from now (within its profile's
        max_ttl_seconds; a metered one's reservation is topped up, or a 402)."""
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}"
        return await self._typed(SandboxOut, "PATCH", path, json={"ttl_seconds": ttl_seconds})

    async def pause(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        *,
        wait: bool = False,
        timeout: float = 600.0,
    ) -> SandboxOut:
        """Pauses a ready sandbox; with `wait`, returns once it is paused (NotPaused
        if the pause failed and it is ready again)."""
        out = await self._typed(SandboxOut, "POST", f"/v1/sandboxes/{c.ids_of(sandbox)}/pause")
        return await self._settle(out, "paused", timeout) if wait else out

    async def resume(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        *,
        wait: bool = False,
        timeout: float = 600.0,
    ) -> SandboxOut:
        """Resumes a paused sandbox; with `wait`, returns once it is ready again."""
        out = await self._typed(SandboxOut, "POST", f"/v1/sandboxes/{c.ids_of(sandbox)}/resume")
        return await self._settle(out, "ready", timeout) if wait else out

    async def keepalive(self, sandbox: str | SandboxOut | AsyncSandbox) -> SandboxOut:
        """Says the sandbox is in use: its idle timeout starts again."""
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}/keepalive"
        return await self._typed(SandboxOut, "POST", path)

    async def _settle(self, out: SandboxOut, wanted: str, timeout: float) -> SandboxOut:
        step = c.PAUSE_STEPS[wanted]
        out = await self.wait(out, until=lambda s: s.state != step, timeout=timeout)
        if out.state != wanted:
            raise NotPaused(out, wanted)
        return out

    async def poll(self, sandbox: SandboxOut, wait: float) -> SandboxOut:
        """One long-poll: the sandbox once it has an event after `sandbox.last_seq`, or
        as it is after `wait` seconds."""
        return await self.get(sandbox.id, wait=max(0.1, round(wait, 1)), after_seq=sandbox.last_seq)

    async def wait(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        *,
        until: Callable[[SandboxOut], bool] | frozenset[str] | set[str] = c.TERMINAL,
        timeout: float = 600.0,
        poll: float = c.LONG_POLL,
        on_update: Callable[[SandboxOut], None] | None = None,
    ) -> SandboxOut:
        out = sandbox if isinstance(sandbox, SandboxOut) else await self.get(sandbox)
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
            out = await self.poll(out, min(poll, left))

    async def wait_ready(
        self, sandbox: str | SandboxOut | AsyncSandbox, *, timeout: float = 600.0
    ) -> SandboxOut:
        out = await self.wait(sandbox, until={"ready"}, timeout=timeout)
        if out.state != "ready":
            raise SandboxFailed(out)
        return out

    # ---- events ----------------------------------------------------------------------

    async def sandbox_events(
        self, sandbox: str | SandboxOut | AsyncSandbox
    ) -> builtins.list[EventOut]:
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}/events"
        return (await self._typed(EventList, "GET", path)).events

    async def events_page(
        self,
        *,
        after_seq: int = 0,
        limit: int = c.MAX_PAGE,
        sandbox: str | None = None,
        wait: float | None = None,
    ) -> EventList:
        params = c.clean({"after_seq": after_seq, "limit": limit, "sandbox": sandbox, "wait": wait})
        extra = (wait or 0) + self.timeout
        return await self._typed(EventList, "GET", "/v1/events", params=params, timeout=extra)

    async def events(
        self,
        *,
        sandbox: str | None = None,
        after_seq: int = 0,
        follow: bool = False,
        types: Sequence[str] | None = None,
    ) -> AsyncIterator[EventOut]:
        after = after_seq
        while True:
            page = await self.events_page(after_seq=after, sandbox=sandbox)
            for event in page.events:
                if not types or event.event.get("type") in types:
                    yield event
                after = event.seq
            if not page.events and page.last_seq > after:
                after = page.last_seq
            if len(page.events) < c.MAX_PAGE:
                break
        if follow:
            async for event in self.event_stream(
                sandbox=sandbox, after_seq=after, types=types, reconnect=True
            ):
                yield event

    async def event_stream(
        self,
        *,
        sandbox: str | None = None,
        after_seq: int = 0,
        types: Sequence[str] | None = None,
        reconnect: bool = False,
    ) -> AsyncIterator[EventOut]:
        last = str(after_seq)
        params = c.clean({"sandbox": sandbox, "type": ",".join(types) if types else None})
        connected = reconnect
        while True:
            parser = c.SSEParser()
            try:
                async with self._http.stream(
                    "GET",
                    "/v1/events/stream",
                    params=params,
                    headers={"Last-Event-ID": last, "Accept": "text/event-stream"},
                    timeout=c.timeout(60.0),
                ) as response:
                    if response.status_code >= 400:
                        c.check(response, await response.aread())
                    connected = True
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if parser.last_id:
                            last = parser.last_id
                        if event is not None:
                            yield event
            except httpx.TransportError as exc:
                if not connected:
                    raise c.connection_failed(self.url, exc) from exc
                await asyncio.sleep(0.5)  # back off before reconnecting

    # ---- exec, files, logs -----------------------------------------------------------

    @asynccontextmanager
    async def _exec_response(
        self, sandbox_id: str, body: dict[str, Any]
    ) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(
                "POST",
                f"/v1/sandboxes/{sandbox_id}/exec",
                json=body,
                headers={"Accept": "application/x-ndjson"},
                timeout=c.timeout(c.exec_read_timeout(body.get("timeout_seconds"))),
            ) as response:
                if response.status_code >= 400:
                    c.check(response, await response.aread())
                yield response
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc

    async def exec_stream(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        command: str | Sequence[str],
        *,
        service: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        timeout_seconds: float | None = None,
    ) -> AsyncIterator[AnyExecFrame]:
        body = c.exec_body(command, service, env, workdir, timeout_seconds)
        async with self._exec_response(c.ids_of(sandbox), body) as response:
            buffer = bytearray()
            try:
                async for chunk in response.aiter_bytes():
                    for line in c.ndjson_lines(buffer, chunk):
                        yield c.decode_frame(line)
                if buffer.strip():
                    yield c.decode_frame(bytes(buffer))
            except httpx.TransportError as exc:
                raise c.connection_failed(self.url, exc) from exc

    async def exec(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
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
        async for frame in frames:
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

    async def put_file(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        path: str,
        source: FileSource,
        *,
        service: str | None = None,
        timeout: float | None = None,
    ) -> FileOut:
        url = f"/v1/sandboxes/{c.ids_of(sandbox)}/files"
        params = c.file_params(path, service)
        limit = c.timeout(timeout or max(self.timeout, 300.0))
        extra = {"Content-Type": "application/octet-stream"}
        try:
            if isinstance(source, bytes):
                response = await self._http.put(
                    url, content=source, params=params, headers=extra, timeout=limit
                )
            elif isinstance(source, (str, Path)):
                with open(source, "rb") as handle:  # noqa: ASYNC230 - read in chunks
                    response = await self._http.put(
                        url, content=_achunks(handle), params=params, headers=extra, timeout=limit
                    )
            else:
                response = await self._http.put(
                    url, content=_achunks(source), params=params, headers=extra, timeout=limit
                )
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc
        c.check(response, response.content)
        return c.decode(response.content, FileOut, f"PUT {url}")

    @asynccontextmanager
    async def open_file(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        path: str,
        *,
        service: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(
                "GET",
                f"/v1/sandboxes/{c.ids_of(sandbox)}/files",
                params=c.file_params(path, service),
                headers={"Accept": "application/octet-stream"},
                timeout=c.timeout(timeout or max(self.timeout, 300.0)),
            ) as response:
                if response.status_code >= 400:
                    c.check(response, await response.aread())
                yield response
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc

    async def get_file(
        self, sandbox: str | SandboxOut | AsyncSandbox, path: str, *, service: str | None = None
    ) -> bytes:
        async with self.open_file(sandbox, path, service=service) as response:
            return await response.aread()

    async def download(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        path: str,
        dest: str | Path | IO[bytes],
        *,
        service: str | None = None,
    ) -> int:
        size = 0
        async with self.open_file(sandbox, path, service=service) as response:
            if isinstance(dest, (str, Path)):
                with open(dest, "wb") as handle:  # noqa: ASYNC230 - written chunk by chunk
                    async for chunk in response.aiter_bytes(c.CHUNK):
                        handle.write(chunk)
                        size += len(chunk)
            else:
                async for chunk in response.aiter_bytes(c.CHUNK):
                    dest.write(chunk)  # noqa: ASYNC240 - the caller's file object
                    size += len(chunk)
        return size

    async def logs(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        *,
        service: str | None = None,
        follow: bool = False,
        tail: int | None = None,
        since: float | None = None,
    ) -> AsyncIterator[LogLine]:
        params = c.clean(
            {"service": service, "follow": True if follow else None, "tail": tail, "since": since}
        )
        try:
            async with self._http.stream(
                "GET",
                f"/v1/sandboxes/{c.ids_of(sandbox)}/logs",
                params=params,
                headers={"Accept": "application/x-ndjson"},
                timeout=c.timeout(None if follow else max(self.timeout, 120.0)),
            ) as response:
                if response.status_code >= 400:
                    c.check(response, await response.aread())
                buffer = bytearray()
                async for chunk in response.aiter_bytes():
                    for line in c.ndjson_lines(buffer, chunk):
                        yield c.decode_log(line)
                if buffer.strip():
                    yield c.decode_log(bytes(buffer))
        except httpx.TransportError as exc:
            raise c.connection_failed(self.url, exc) from exc

    # ---- checkpoints -----------------------------------------------------------------

    async def create_checkpoint(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        *,
        wait: bool = False,
        timeout: float = 3600.0,
    ) -> CheckpointOut:
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}/checkpoints"
        out = await self._typed(CheckpointOut, "POST", path)
        return await self.wait_checkpoint(out, timeout=timeout) if wait else out

    async def list_checkpoints(
        self, sandbox: str | SandboxOut | AsyncSandbox
    ) -> builtins.list[CheckpointOut]:
        path = f"/v1/sandboxes/{c.ids_of(sandbox)}/checkpoints"
        return (await self._typed(CheckpointList, "GET", path)).checkpoints

    async def get_checkpoint(self, checkpoint_id: str) -> CheckpointOut:
        return await self._typed(CheckpointOut, "GET", f"/v1/checkpoints/{checkpoint_id}")

    async def wait_checkpoint(
        self,
        checkpoint: str | CheckpointOut,
        *,
        timeout: float = 3600.0,
        poll: float = c.LONG_POLL,
        on_update: Callable[[CheckpointOut], None] | None = None,
    ) -> CheckpointOut:
        out = (
            checkpoint
            if isinstance(checkpoint, CheckpointOut)
            else await self.get_checkpoint(checkpoint)
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
            out = await self._typed(
                CheckpointOut,
                "GET",
                f"/v1/checkpoints/{out.id}",
                params=[("wait", f"{wait:.1f}"), ("after_seq", str(out.last_seq))],
                timeout=wait + self.timeout,
            )
        if on_update is not None:
            on_update(out)
        return out

    async def restore(
        self,
        sandbox: str | SandboxOut | AsyncSandbox,
        checkpoint_id: str,
        *,
        wait: bool = False,
        timeout: float = 3600.0,
    ) -> SandboxOut:
        out = await self._typed(
            SandboxOut,
            "POST",
            f"/v1/sandboxes/{c.ids_of(sandbox)}/restore",
            json={"checkpoint": checkpoint_id},
        )
        return await self.wait(out, until={"ready"}, timeout=timeout) if wait else out

    async def delete_checkpoint(self, checkpoint_id: str) -> CheckpointOut:
        return await self._typed(CheckpointOut, "DELETE", f"/v1/checkpoints/{checkpoint_id}")

    # ---- ledger, profiles, identity --------------------------------------------------

    async def grant(self, account: str, amount: int, reason: str = "") -> AccountOut:
        body = {"amount": amount, "reason": reason}
        return await self._typed(AccountOut, "POST", f"/v1/accounts/{account}/credits", json=body)

    async def balance(
        self, account: str, *, wait: float | None = None, after_seq: int | None = None
    ) -> AccountOut:
        params = c.clean({"wait": wait, "after_seq": after_seq})
        return await self._typed(
            AccountOut,
            "GET",
            f"/v1/accounts/{account}",
            params=params,
            timeout=(wait or 0) + self.timeout,
        )

    async def accounts(self) -> builtins.list[AccountOut]:
        return (await self._typed(AccountList, "GET", "/v1/accounts")).accounts

    async def history_page(
        self, account: str, *, after_seq: int = 0, limit: int = c.MAX_PAGE
    ) -> LedgerPage:
        params = c.clean({"after_seq": after_seq, "limit": limit})
        path = f"/v1/accounts/{account}/ledger"
        return await self._typed(LedgerPage, "GET", path, params=params)

    async def history(self, account: str, *, after_seq: int = 0) -> AsyncIterator[EventOut]:
        after: int | None = after_seq
        while after is not None:
            page = await self.history_page(account, after_seq=after)
            for entry in page.entries:
                yield entry
            after = page.next_after_seq

    async def audit(self, *, account: str | None = None, ttl_grace: float | None = None) -> Any:
        params = c.clean({"account": account, "ttl_grace": ttl_grace})
        return await self.request("POST", "/v1/ledger/audit", params=params, timeout=600)

    async def profiles(self) -> builtins.list[ProfileOut]:
        return (await self._typed(ProfileList, "GET", "/v1/profiles")).profiles

    async def whoami(self) -> Identity:
        return await self._typed(Identity, "GET", "/v1/whoami")

    async def health(self) -> Health:
        return await self._typed(Health, "GET", "/healthz")

    async def openapi(self) -> Any:
        return await self.request("GET", "/openapi.json")

    async def pools(self) -> builtins.list[PoolOut]:
        """The warm pools (docs/pools.md)."""
        return await self._typed(builtins.list[PoolOut], "GET", "/v1/pools")


async def _achunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := handle.read(c.CHUNK):
        yield chunk


class AsyncSandbox:
    """One sandbox, async: `async with await client.create(...) as sbx:` destroys it
    (and waits until terminal) on leaving."""

    def __init__(self, client: AsyncClient, info: SandboxOut) -> None:
        self.client = client
        self.info = info
        self.id = info.id

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.id!r}, state={self.info.state!r})"

    @property
    def state(self) -> str:
        return self.info.state

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.destroy(wait=True)
        except (NotFound, InvalidRequest):
            pass
        except SandboxerClientError:
            if kind is None:
                raise

    async def refresh(self) -> SandboxOut:
        self.info = await self.client.get(self.id)
        return self.info

    async def wait(
        self, until: frozenset[str] | set[str] = frozenset({"ready"}), timeout: float = 600.0
    ) -> SandboxOut:
        self.info = await self.client.wait(self.info, until=until, timeout=timeout)
        return self.info

    async def destroy(self, *, wait: bool = True, timeout: float = 600.0) -> SandboxOut:
        if self.info.terminal:
            return self.info
        try:
            self.info = await self.client.destroy(self.id, wait=wait, timeout=timeout)
        except Conflict:
            if not wait:
                raise
            self.info = await self.client.wait(self.id, timeout=timeout)
            if not self.info.terminal:
                raise
        return self.info

    async def extend(self, ttl_seconds: int) -> SandboxOut:
        self.info = await self.client.extend(self.id, ttl_seconds)
        return self.info

    async def pause(self, *, wait: bool = True, timeout: float = 600.0) -> SandboxOut:
        self.info = await self.client.pause(self.id, wait=wait, timeout=timeout)
        return self.info

    async def resume(self, *, wait: bool = True, timeout: float = 600.0) -> SandboxOut:
        self.info = await self.client.resume(self.id, wait=wait, timeout=timeout)
        return self.info

    async def keepalive(self) -> SandboxOut:
        self.info = await self.client.keepalive(self.id)
        return self.info

    async def exec(self, command: str | Sequence[str], **kwargs: Any) -> ExecResult:
        return await self.client.exec(self.id, command, **kwargs)

    def exec_stream(
        self, command: str | Sequence[str], **kwargs: Any
    ) -> AsyncIterator[AnyExecFrame]:
        return self.client.exec_stream(self.id, command, **kwargs)

    async def put_file(
        self, path: str, source: FileSource, *, service: str | None = None
    ) -> FileOut:
        return await self.client.put_file(self.id, path, source, service=service)

    async def get_file(self, path: str, *, service: str | None = None) -> bytes:
        return await self.client.get_file(self.id, path, service=service)

    async def download(
        self, path: str, dest: str | Path | IO[bytes], *, service: str | None = None
    ) -> int:
        return await self.client.download(self.id, path, dest, service=service)

    def logs(self, **kwargs: Any) -> AsyncIterator[LogLine]:
        return self.client.logs(self.id, **kwargs)

    async def events(self) -> builtins.list[EventOut]:
        return await self.client.sandbox_events(self.id)

    async def checkpoint(self, *, wait: bool = True, timeout: float = 3600.0) -> CheckpointOut:
        return await self.client.create_checkpoint(self.id, wait=wait, timeout=timeout)

    async def checkpoints(self) -> builtins.list[CheckpointOut]:
        return await self.client.list_checkpoints(self.id)

    async def restore(
        self, checkpoint_id: str, *, wait: bool = True, timeout: float = 3600.0
    ) -> SandboxOut:
        self.info = await self.client.restore(self.id, checkpoint_id, wait=wait, timeout=timeout)
        return self.info
