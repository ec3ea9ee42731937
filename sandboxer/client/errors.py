"""One exception tree for everything the client raises.

SandboxerClientError
├── ConnectionFailed       the API could not be reached (or the connection broke)
├── InvalidResponse        an answer that is not the API's (not JSON, wrong shape)
├── WaitTimedOut           a wait ran out of time (`.sandbox`/`.checkpoint`: the last seen)
├── SandboxFailed          a wait saw the sandbox end rejected/failed (`.sandbox`, `.reason`)
├── CommandFailed          ExecResult.check(): not exited, or a non-zero exit (`.result`)
│   └── CommandTimedOut    ... because the command ran out of time (outcome `timeout`)
└── ApiError               the API answered with an ErrorBody (status, code, message, field)
    ├── InvalidRequest     400, 422
    ├── Unauthorized       401
    ├── Forbidden          403
    ├── NotFound           404
    ├── Conflict           409
    ├── PayloadTooLarge    413
    └── Unavailable        503
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sandboxer.wire import CheckpointOut, SandboxOut


class FinishedCommand(Protocol):
    """What CommandFailed tells of its command: an ExecResult (sandboxer.client.result)."""

    @property
    def command_id(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def message(self) -> str | None: ...


class SandboxerClientError(Exception):
    """The base of every error the client raises."""


class ConnectionFailed(SandboxerClientError):
    """The API could not be reached, or the connection broke before an answer."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"cannot reach the sandboxer API at {url}: {reason}")
        self.url = url
        self.reason = reason


class InvalidResponse(SandboxerClientError):
    """The server answered, but not as the sandboxer API does."""


class WaitTimedOut(SandboxerClientError):
    """A wait (`wait=True`, `Client.wait`) ran out of time; the last state seen is kept."""

    def __init__(
        self,
        message: str,
        sandbox: SandboxOut | None = None,
        checkpoint: CheckpointOut | None = None,
    ) -> None:
        super().__init__(message)
        self.sandbox = sandbox
        self.checkpoint = checkpoint


class SandboxFailed(SandboxerClientError):
    """While waiting for it to be ready, the sandbox ended `rejected` or `failed`."""

    def __init__(self, sandbox: SandboxOut) -> None:
        super().__init__(f"sandbox {sandbox.id} ended {sandbox.state}: {sandbox.reason}")
        self.sandbox = sandbox
        self.state = sandbox.state
        self.reason = sandbox.reason


class NotPaused(SandboxerClientError):
    """A pause or resume waited for did not happen (the extension failed it, or the
    sandbox ended meanwhile): the sandbox is as `sandbox` shows."""

    def __init__(self, sandbox: SandboxOut, wanted: str) -> None:
        super().__init__(f"sandbox {sandbox.id} is {sandbox.state}, not {wanted}")
        self.sandbox = sandbox
        self.state = sandbox.state


class CommandFailed(SandboxerClientError):
    """Raised by `ExecResult.check()`: the command did not exit 0."""

    def __init__(self, result: FinishedCommand) -> None:
        if result.outcome == "exited":
            what = f"exited {result.exit_code}"
        else:
            what = f"ended {result.outcome}" + (f": {result.message}" if result.message else "")
        super().__init__(f"command {result.command_id} {what}")
        self.result = result


class CommandTimedOut(CommandFailed):
    """Raised by `ExecResult.check()` when the command ran out of its timeout_seconds."""


class ApiError(SandboxerClientError):
    """The API's ErrorBody: `status`, `code` (e.g. `not_found`), `message`, `field` (the
    request field to fix, when the API names one)."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, body: Any = None
    ) -> None:
        text = f"error {status}: {message}" + (f" (field: {field})" if field else "")
        if code == "http_error":  # no ErrorBody: the status line is all there is
            text = message
        super().__init__(text)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.body = body


class InvalidRequest(ApiError):
    """400 or 422: the request was refused as it is; `field` names what to fix."""


class Unauthorized(ApiError):
    """401: no token, or one the API does not know."""


class Forbidden(ApiError):
    """403: the token may not do this (another account's, or an admin's call)."""


class NotFound(ApiError):
    """404: no such sandbox, checkpoint, account or profile."""


class Conflict(ApiError):
    """409: not now (the sandbox is not ready, already gone, not capable of it...)."""


class PayloadTooLarge(ApiError):
    """413: over the server's limit for a body or a file."""


class Unavailable(ApiError):
    """503: the service cannot do it right now (its event store is unreachable...)."""


# The one table from HTTP status to exception class.
STATUS_ERRORS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    503: Unavailable,
}


def api_error(status: int, reason: str, content: bytes) -> ApiError:
    """The exception for an error answer: its ErrorBody when it has one, else the status."""
    import msgspec

    from sandboxer.wire import ErrorBody

    cls = STATUS_ERRORS.get(status, ApiError)
    try:
        detail = msgspec.json.decode(content, type=ErrorBody).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return cls(status, "http_error", f"HTTP {status}: {reason}".rstrip(": "))
    return cls(detail.status or status, detail.code, detail.message, detail.field)
