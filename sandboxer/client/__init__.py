"""sandboxer.client: the sandboxer API from Python, sync (`Client`, `Sandbox`) and async
(`AsyncClient`, `AsyncSandbox`), typed with the server's own Structs (sandboxer.wire).
docs/client.md has the guide; the errors are one tree under SandboxerClientError."""

from sandboxer.client.aio import AsyncClient, AsyncSandbox
from sandboxer.client.errors import (
    STATUS_ERRORS,
    ApiError,
    CommandFailed,
    CommandTimedOut,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidRequest,
    InvalidResponse,
    NotFound,
    NotPaused,
    PayloadTooLarge,
    SandboxerClientError,
    SandboxFailed,
    Unauthorized,
    Unavailable,
    WaitTimedOut,
)
from sandboxer.client.result import ExecResult
from sandboxer.client.sync import Client, Sandbox

__all__ = [
    "STATUS_ERRORS",
    "ApiError",
    "AsyncClient",
    "AsyncSandbox",
    "Client",
    "CommandFailed",
    "CommandTimedOut",
    "Conflict",
    "ConnectionFailed",
    "ExecResult",
    "Forbidden",
    "InvalidRequest",
    "InvalidResponse",
    "NotFound",
    "NotPaused",
    "PayloadTooLarge",
    "Sandbox",
    "SandboxFailed",
    "SandboxerClientError",
    "Unauthorized",
    "Unavailable",
    "WaitTimedOut",
]
