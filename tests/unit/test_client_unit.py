"""sandboxer.client's pieces that need no server: the error table, the exec frames
gathered into an ExecResult, the SSE and NDJSON parsers, configuration, layering."""

from __future__ import annotations

import ast
import base64
import hashlib

import msgspec
import pytest

from sandboxer.client import (
    STATUS_ERRORS,
    ApiError,
    CommandFailed,
    CommandTimedOut,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    SandboxerClientError,
    Unauthorized,
    Unavailable,
)
from sandboxer.client import _common as c
from sandboxer.client.errors import Forbidden, api_error
from sandboxer.client.result import ExecCollector
from sandboxer.wire import ErrorBody, ErrorDetail, ExecExit, ExecStarted, ExecStderr, ExecStdout
from tests.paths import ROOT


def test_error_table_maps_every_status_and_keeps_the_field() -> None:
    expected = {
        400: InvalidRequest,
        401: Unauthorized,
        403: Forbidden,
        404: NotFound,
        409: Conflict,
        413: PayloadTooLarge,
        422: InvalidRequest,
        503: Unavailable,
    }
    assert expected == STATUS_ERRORS
    for status, cls in expected.items():
        body = msgspec.json.encode(ErrorBody(ErrorDetail(status, "code", "msg", "inputs.x")))
        exc = api_error(status, "Reason", body)
        assert type(exc) is cls and isinstance(exc, ApiError)
        assert isinstance(exc, SandboxerClientError)
        assert (exc.status, exc.code, exc.message, exc.field) == (status, "code", "msg", "inputs.x")
        assert str(exc) == f"error {status}: msg (field: inputs.x)"
    other = api_error(502, "Bad Gateway", b"<html>")
    assert type(other) is ApiError and str(other) == "HTTP 502: Bad Gateway"


def test_frames_become_an_exec_result() -> None:
    raw = b"\xff\xfe not utf-8"
    collector = ExecCollector()
    frames = [
        ExecStarted(command_id="cmd-1", seq=3),
        ExecStdout(data="hello "),
        ExecStdout(data="", b64=base64.b64encode(raw).decode()),
        ExecStderr(data="warn\n"),
        ExecExit(
            command_id="cmd-1",
            outcome="exited",
            exit_code=0,
            duration_seconds=0.5,
            stdout_bytes=6 + len(raw),
            stdout_sha256=hashlib.sha256(b"hello " + raw).hexdigest(),
            stderr_bytes=5,
            stderr_sha256=hashlib.sha256(b"warn\n").hexdigest(),
            seq=4,
        ),
    ]
    lines = b"".join(msgspec.json.encode(f) + b"\n" for f in frames)
    buffer = bytearray()
    decoded = [
        c.decode_frame(line)
        for part in (lines[:7], lines[7:])
        for line in c.ndjson_lines(buffer, part)
    ]
    assert decoded == frames and not buffer
    for frame in decoded:
        collector.feed(frame)
    result = collector.result()
    assert result.ok and result.stdout_raw == b"hello " + raw
    assert result.stdout == (b"hello " + raw).decode(errors="replace")
    assert result.stderr == "warn\n" and result.started_seq == 3 and result.seq == 4
    assert hashlib.sha256(result.stdout_raw).hexdigest() == result.stdout_sha256
    assert result.check() is result


def test_check_raises_for_failures_and_timeouts() -> None:
    def ended(outcome: str, code: int | None) -> ExecCollector:
        collector = ExecCollector()
        collector.feed(
            ExecExit(
                command_id="cmd-2",
                outcome=outcome,  # type: ignore[arg-type]
                exit_code=code,
                duration_seconds=1.0,
                stdout_bytes=0,
                stdout_sha256="",
                stderr_bytes=0,
                stderr_sha256="",
                message=None if code is not None else "ran out of time",
            )
        )
        return collector

    with pytest.raises(CommandTimedOut):
        ended("timeout", None).result().check()
    with pytest.raises(CommandFailed) as failed:
        ended("exited", 2).result().check()
    assert "exited 2" in str(failed.value) and not isinstance(failed.value, CommandTimedOut)
    with pytest.raises(SandboxerClientError):
        ExecCollector().result()  # no exit frame


def test_sse_parser() -> None:
    parser = c.SSEParser()
    event = '{"seq": 7, "subject": "s", "event": {"type": "BecameReady"}}'
    got = [
        parser.feed(line)
        for line in [": keepalive", "", "id: 7", "event: BecameReady", f"data: {event}", ""]
    ]
    assert got[:5] == [None] * 5 and got[5] is not None
    assert got[5].seq == 7 and parser.last_id == "7"


def test_bodies_and_queries() -> None:
    assert c.exec_body("echo $HOME", None, None, None, None) == {"shell": "echo $HOME"}
    assert c.exec_body(["ls", "-l"], "app", {"A": "1"}, "/w", 5) == {
        "argv": ["ls", "-l"],
        "service": "app",
        "env": {"A": "1"},
        "workdir": "/w",
        "timeout_seconds": 5,
    }
    assert c.label_params("a=b") == [("label", "a=b")]
    assert c.label_params(["a=b", "c=d"]) == [("label", "a=b"), ("label", "c=d")]
    assert c.clean({"a": None, "b": True, "c": 3}) == [("b", "1"), ("c", "3")]


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOXER_URL", raising=False)
    monkeypatch.delenv("SANDBOXER_TOKEN", raising=False)
    assert c.resolve_url(None) == "http://127.0.0.1:8080"
    assert c.resolve_token(None) is None
    monkeypatch.setenv("SANDBOXER_URL", "http://example.test:9000/")
    monkeypatch.setenv("SANDBOXER_TOKEN", "t")
    assert c.resolve_url(None) == "http://example.test:9000"
    assert c.resolve_token(None) == "t" and c.resolve_token("") == ""
    assert "Authorization" not in c.headers("")
    for bad in ("file:///etc", "not-a-url", "http://h:99999"):
        with pytest.raises(ValueError):
            c.resolve_url(bad)


def test_the_client_imports_neither_aiohttp_nor_the_service() -> None:
    forbidden = ("aiohttp", "sandboxer.app", "sandboxer.http", "sandboxer.store")
    for path in sorted((ROOT / "sandboxer" / "client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
