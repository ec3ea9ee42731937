"""What the sync and async clients share: configuration, request bodies and queries,
decoding answers with the wire Structs, error mapping and the SSE parser."""

from __future__ import annotations

import codecs
import os
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import msgspec

from sandboxer.client.errors import ConnectionFailed, InvalidResponse, api_error
from sandboxer.wire import AnyExecFrame, EventOut, LogLine

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 30.0  # seconds for one ordinary request
CONNECT_TIMEOUT = 10.0
LONG_POLL = 30.0  # seconds one long-poll asks the server to hold (it allows 60)
MAX_PAGE = 500
TERMINAL = frozenset({"destroyed", "failed", "rejected"})
FAILED = frozenset({"failed", "rejected"})
PAUSE_STEPS = {"paused": "pausing", "ready": "resuming"}  # wanted state: the one waited out
CHUNK = 64 * 1024

T = TypeVar("T")
Query = list[tuple[str, str | int | float | bool | None]]

frame_decoder: msgspec.json.Decoder[AnyExecFrame] = msgspec.json.Decoder(AnyExecFrame)
log_decoder = msgspec.json.Decoder(LogLine)
event_decoder = msgspec.json.Decoder(EventOut)


def resolve_url(url: str | None) -> str:
    """`url`, else SANDBOXER_URL, else http://127.0.0.1:8080; http(s) only."""
    base = (url or os.environ.get("SANDBOXER_URL") or DEFAULT_URL).rstrip("/")
    parts = urllib.parse.urlsplit(base)
    try:
        _ = parts.port  # raises on a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"invalid API URL {base!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid API URL {base!r}: expected http(s)://host[:port]")
    return base


def resolve_token(token: str | None) -> str | None:
    """`token`, else SANDBOXER_TOKEN; None: no Authorization header."""
    return token if token is not None else (os.environ.get("SANDBOXER_TOKEN") or None)


def headers(token: str | None) -> dict[str, str]:
    out = {"Accept": "application/json", "User-Agent": "sandboxer-client"}
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


def timeout(seconds: float | None) -> httpx.Timeout:
    """`seconds` for reading (None: no limit, for followed streams); connecting is bounded."""
    return httpx.Timeout(seconds, connect=CONNECT_TIMEOUT)


def check(response: httpx.Response, content: bytes) -> None:
    """Raises the mapped ApiError for an error answer (its body already read)."""
    if response.status_code >= 400:
        raise api_error(response.status_code, response.reason_phrase, content)


def decode(content: bytes, type_: type[T], what: str) -> T:
    try:
        return msgspec.json.decode(content, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidResponse(f"{what}: not the sandboxer API's answer ({exc})") from None


def decode_any(content: bytes, what: str) -> Any:
    if not content:
        return None
    try:
        return msgspec.json.decode(content)
    except msgspec.DecodeError:
        raise InvalidResponse(
            f"{what}: answered with something that is not JSON; is it a sandboxer API?"
        ) from None


def connection_failed(base_url: str, exc: Exception) -> ConnectionFailed:
    return ConnectionFailed(base_url, exc)


def label_params(label: str | Sequence[str] | None) -> Query:
    if label is None:
        return []
    labels = [label] if isinstance(label, str) else list(label)
    return [("label", item) for item in labels]


def clean(params: Mapping[str, Any]) -> Query:
    """Query parameters without the unset ones; booleans as `1`/`0`."""
    out: Query = []
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        out.append((key, str(value)))
    return out


def create_body(
    profile: str | None,
    inputs: Mapping[str, Any] | None,
    labels: Mapping[str, str] | None,
    ttl_seconds: int | None,
    account: str | None,
    from_checkpoint: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": dict(inputs or {})}
    if profile:
        body["profile"] = profile
    if labels:
        body["labels"] = dict(labels)
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    if account is not None:
        body["account"] = account
    if from_checkpoint is not None:
        body["from_checkpoint"] = from_checkpoint
    return body


def exec_body(
    command: str | Sequence[str],
    service: str | None,
    env: Mapping[str, str] | None,
    workdir: str | None,
    timeout_seconds: float | None,
) -> dict[str, Any]:
    """A str is a shell script (`shell`, run by `sh -c`); a list is argv, never a shell."""
    body: dict[str, Any] = {}
    if isinstance(command, str):
        body["shell"] = command
    else:
        body["argv"] = list(command)
    if service is not None:
        body["service"] = service
    if env:
        body["env"] = dict(env)
    if workdir is not None:
        body["workdir"] = workdir
    if timeout_seconds is not None:
        body["timeout_seconds"] = timeout_seconds
    return body


def exec_read_timeout(timeout_seconds: float | None) -> float:
    """A command may be silent for its whole timeout: wait that long, plus a margin."""
    return (timeout_seconds if timeout_seconds is not None else 60.0) + DEFAULT_TIMEOUT


def utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def decode_frame(line: bytes) -> AnyExecFrame:
    try:
        return frame_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidResponse(f"exec: a line that is not an exec frame ({exc})") from None


def decode_log(line: bytes) -> LogLine:
    try:
        return log_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidResponse(f"logs: a line that is not a log line ({exc})") from None


class SSEParser:
    """Server-Sent Events, line by line: `feed` returns (id, data) when an event ends."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> EventOut | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self.data:
                return None
            raw, self.data = "\n".join(self.data), []
            try:
                return event_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise InvalidResponse(f"events stream: not an event ({exc})") from None
        if line.startswith(":"):
            return None  # a comment: the keepalive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self.last_id = value
        elif name == "data":
            self.data.append(value)
        return None


def ndjson_lines(buffer: bytearray, chunk: bytes) -> Iterable[bytes]:
    """Splits what has arrived into whole lines; the rest stays in `buffer`."""
    buffer.extend(chunk)
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            return
        line = bytes(buffer[:end]).strip()
        del buffer[: end + 1]
        if line:
            yield line


def file_params(path: str, service: str | None) -> Query:
    return clean({"path": path, "service": service})


def ids_of(value: object) -> str:
    """A sandbox id from an id or anything with an `id` (SandboxOut, Sandbox)."""
    return value if isinstance(value, str) else str(value.id)  # type: ignore[attr-defined]
