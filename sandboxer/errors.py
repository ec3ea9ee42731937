"""One tree for the errors a caller sees, and how each one is answered.

Every such error derives from `SandboxerError` and carries its answer: the HTTP
`status`, the machine-readable `code` and the `field` at fault (class attributes,
which an instance may override). The HTTP error middleware answers any of them as
`ErrorBody`; cross-worker forwarding sends them as `to_wire` and raises them again
with `from_wire`, so a forwarded command fails with the very exception (and so the
very answer) a local one does.

The classes stay beside the code that raises them (`NotFound` in the manager,
`InvalidTransition` in the lifecycle, ...); the kinds below are their bases.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SandboxerError(Exception):
    """An error with its answer: `status`, `code` and (optionally) `field`."""

    status: int = 500
    code: str = "internal_error"
    field: str | None = None
    # The name on the control channel between workers; None: not forwarded.
    wire: ClassVar[str | None] = None
    _by_wire: ClassVar[dict[str, type[SandboxerError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "wire" in cls.__dict__ and cls.wire is not None:
            SandboxerError._by_wire[cls.wire] = cls

    def to_wire(self) -> dict[str, Any]:
        """The answer a worker sends for this error (see `from_wire`)."""
        assert self.wire is not None, f"{type(self).__name__} is not forwarded"
        return {
            "error": self.wire,
            "message": str(self),
            "status": self.status,
            "code": self.code,
            "field": self.field,
            **self.wire_args(),
        }

    def wire_args(self) -> dict[str, Any]:
        """What `from_wire` needs beyond the message."""
        return {}

    @classmethod
    def from_wire(cls, answer: dict[str, Any]) -> SandboxerError:
        return cls(str(answer.get("message", "")))

    @staticmethod
    def decode(answer: dict[str, Any]) -> SandboxerError | None:
        """The error a worker's answer carries, as the exception it raised; None when
        the answer is no error of this tree (a result, or an internal failure)."""
        kind = SandboxerError._by_wire.get(str(answer.get("error")))
        return None if kind is None else kind.from_wire(answer)


class InvalidInput(SandboxerError):
    """The request is malformed: a body field, a query parameter or a header."""

    status = 400
    code = "invalid_request"


class Forbidden(SandboxerError):
    status = 403
    code = "forbidden"


class NotFoundError(SandboxerError):
    """No such resource (also: an id that does not have the id format)."""

    status = 404
    code = "not_found"


class Conflict(SandboxerError):
    """The resource is not in a state that allows this."""

    status = 409
    code = "conflict"


class Unprocessable(SandboxerError):
    status = 422
    code = "unprocessable"


class Unavailable(SandboxerError):
    """Not now: retry (every 503 answer says when, in Retry-After)."""

    status = 503
    code = "unavailable"


class ApiError(SandboxerError):
    """An answer stated where it is raised (status, code and field given)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field


class SettingsError(ValueError):
    """A bad setting (an environment variable, a flag): serve stops before it starts,
    with one line naming the variable and the problem."""
