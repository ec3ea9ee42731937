"""The HTTP API (aiohttp). Bodies are msgspec Structs; every error is JSON naming its field."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import msgspec.inspect
from aiohttp import web

import events.schema as events_schema
from events import Event, EventMeta
from events.subjects import (
    LEDGER_SUBJECTS,
    SANDBOX_SUBJECTS,
    VALIDATION_SUBJECTS,
    Aggregate,
)
from projections.checkpoints import CheckpointView
from projections.ledger import AccountView
from projections.paging import MAX_PAGE, Cursor
from projections.sandboxes import SandboxView
from sandboxer.app.access import Target
from sandboxer.app.audit import DEFAULT_TTL_GRACE, AuditReport, audit
from sandboxer.app.bus import MessageBus
from sandboxer.app.commands import (
    AnyCommand,
    CreateSandbox,
    DeleteCheckpoint,
    DestroySandbox,
    ExtendTtl,
    GrantCredits,
    NoteActivity,
    PauseSandbox,
    RequestCheckpoint,
    RestoreCheckpoint,
    ResumeSandbox,
)
from sandboxer.app.files import FILE_CHUNK
from sandboxer.app.lifecycle import TERMINAL, State
from sandboxer.app.logs import MAX_TAIL
from sandboxer.app.manager import (
    AlreadyCreated,
    CreateInProgress,
    NotFound,
    SandboxManager,
)
from sandboxer.app.read_model import ProjectionRunner, VerifyReport
from sandboxer.app.reconcile import Reconciler, SweepReport
from sandboxer.app.use import SandboxUse
from sandboxer.app.webhooks import WebhookOut, Webhooks
from sandboxer.errors import ApiError, SandboxerError
from sandboxer.http import dashboard
from sandboxer.http.auth import Principal, TokenBook
from sandboxer.http.routes import (
    Access,
    Answer,
    Param,
    Route,
    component_types,
    openapi_paths,
    path_param,
    query,
)
from sandboxer.ids import (
    ACCOUNT_RE,
    IDEMPOTENCY_KEY_RE,
    LABEL_KEY_RE,
    LABEL_VALUE_RE,
    SANDBOX_ID_RE,
    InvalidId,
    check_account,
    check_labels,
    check_sandbox_id,
    idempotent_sandbox_id,
    new_correlation_id,
)
from sandboxer.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sandboxer.metrics import Metrics
from sandboxer.profiles import (
    INPUT_NAME_RE,
    MAX_INPUT_LENGTH,
    ProfileCatalog,
)
from sandboxer.store.event_store import EventRecorder, RecordedEvent, is_transient
from sandboxer.tasks import cancel_and_wait
from sandboxer.wire import (
    CHECKPOINT_ID_RE,
    MAX_EXEC_BODY,
    PLAIN_TEXT,
    SERVICE_NAME_RE,
    AccountList,
    AccountOut,
    CheckpointList,
    CheckpointOut,
    CreateBody,
    ErrorBody,
    ErrorDetail,
    EventList,
    EventOut,
    ExecBody,
    ExecExit,
    ExecFrame,
    ExecStarted,
    ExecStderr,
    ExecStdout,
    ExtendBody,
    FileOut,
    GrantBody,
    Health,
    Identity,
    InputOut,
    LedgerPage,
    LogLine,
    PoolOut,
    ProfileList,
    ProfileOut,
    Progress,
    RestoreBody,
    SandboxList,
    SandboxOut,
)

MAX_BODY_BYTES = 64 * 1024
PRINCIPAL = web.RequestKey("principal", Principal)
SSE_KEEPALIVE = 15.0
MAX_INPUTS = 64
MAX_WAIT_SECONDS = 60.0
# A file path in a query: at most this many characters, so that the request line stays
# under MAX_HEADER_BYTES however each is percent-encoded (12 bytes for 4-byte UTF-8).
MAX_FILE_PATH = 512
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
PROJECTION_WAIT = 10.0
# Limits of what a request may carry (the OpenAPI document states each one).
MAX_SEQ = 2**63 - 1  # stream sequences are compared as signed 64-bit numbers
MAX_TTL_GRACE = 30 * 24 * 3600.0
MAX_URL = 2000
MAX_HEADER_BYTES = 8190  # one request line or header line (431 above: http_server.py)
MAX_HEADERS = 64
WEBHOOK_ID_RE = re.compile(r"^wh-[a-f0-9]{12}$")
# Text fields and input values: no NUL and no control characters but tab and newline.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
URL_PATTERN = r"^https?://[^\s/?#\x00-\x1f\x7f]+([/?#][^\s\x00-\x1f\x7f]*)?$"
LIVE_VALUES = ("0", "1", "true", "false")

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The bodies and answers are sandboxer/wire.py's (the client library shares them).


class WebhookBody(msgspec.Struct, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(max_length=MAX_URL, pattern=URL_PATTERN)]
    event_types: Annotated[list[str], msgspec.Meta(min_length=1, max_length=64)]
    # "new": only events after the registration; "beginning": the account's history too.
    from_: Literal["new", "beginning"] = msgspec.field(default="new", name="from")


class WebhookList(msgspec.Struct):
    webhooks: list[WebhookOut]


_encoder = msgspec.json.Encoder()
ORDERS = ("oldest", "newest")  # of a list of sandboxes, by creation time
MAX_CACHED_LISTS = 64  # list bodies kept per projection position (filters differ)
_create_decoder = msgspec.json.Decoder(CreateBody)
_exec_decoder = msgspec.json.Decoder(ExecBody)
_grant_decoder = msgspec.json.Decoder(GrantBody)
_restore_decoder = msgspec.json.Decoder(RestoreBody)
_extend_decoder = msgspec.json.Decoder(ExtendBody)
_webhook_decoder = msgspec.json.Decoder(WebhookBody)
_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN_RE = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(body), status=status, content_type="application/json")


def _validation_field(message: str) -> str | None:
    unknown = _UNKNOWN_RE.search(message)
    if unknown:
        return unknown.group(1)
    located = _FIELD_RE.search(message)
    if located:
        return located.group(1) or None
    return None


# Nesting allowed in a body: msgspec decodes `inputs` (dict[str, Any]) recursively and
# ends in RecursionError near 1,000 levels; no field of ours needs more than 3.
MAX_JSON_DEPTH = 32
_JSON_TOKEN_RE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def _too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> tuple[bool, str | None]:
    """Whether `raw` nests arrays or objects deeper than `limit`, and the field where
    (the first two object keys on the way: `inputs.<name>`, or a top-level field).
    Counting brackets first keeps this free for every body a client really sends;
    only a body with more than `limit` brackets is scanned, outside strings."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False, None
    stack: list[str | None] = []  # per open container: its current key (objects only)
    last: bytes = b""
    for token in _JSON_TOKEN_RE.finditer(raw):
        text = token.group()
        if text in (b"{", b"["):
            stack.append(None)
            if len(stack) > limit:
                keys = [k for k in stack if k is not None][:2]
                return True, ".".join(keys) or None
        elif text in (b"}", b"]"):
            if stack:
                stack.pop()
        elif text == b":":
            if stack:
                try:
                    stack[-1] = str(msgspec.json.decode(last))
                except (msgspec.DecodeError, UnicodeDecodeError):
                    stack[-1] = "?"
        else:
            last = text
    return False, None


class _FieldRules(msgspec.Struct, frozen=True):
    """What msgspec does not check the way the published schema means it."""

    integers: tuple[str, ...]  # integer fields: JSON Schema counts 1882.0 as an integer
    patterns: tuple[tuple[str, re.Pattern[str]], ...]  # string fields, matched whole


_RULES: dict[Any, _FieldRules] = {}


def _field_rules(body_type: Any) -> _FieldRules:
    rules = _RULES.get(body_type)
    if rules is None:
        integers: list[str] = []
        patterns: list[tuple[str, re.Pattern[str]]] = []
        info = msgspec.inspect.type_info(body_type)
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            kind = field.type
            options = kind.types if isinstance(kind, msgspec.inspect.UnionType) else (kind,)
            for option in options:
                if isinstance(option, msgspec.inspect.Metadata):
                    option = option.type
                if isinstance(option, msgspec.inspect.IntType):
                    integers.append(field.encode_name)
                elif isinstance(option, msgspec.inspect.StrType) and option.pattern:
                    patterns.append((field.encode_name, re.compile(option.pattern)))
        rules = _RULES[body_type] = _FieldRules(tuple(integers), tuple(patterns))
    return rules


def _whole_match(body: Any, rules: _FieldRules) -> None:
    """msgspec checks a `pattern` with `re.search`, where `$` also matches before a
    final newline (`"acme\\n"` would pass as an account): each patterned field is
    matched whole again, and the error names it."""
    for name, pattern in rules.patterns:
        value = getattr(body, name, None)
        if isinstance(value, str) and pattern.fullmatch(value) is None:
            raise ApiError(
                400, "invalid_body", f"{name} {value[:80]!r} must match {pattern.pattern}", name
            )


def _integral(raw: bytes, body_type: Any, rules: _FieldRules) -> Any:
    """The body again, with integer fields sent as integral floats (1882.0) made ints:
    JSON Schema, and so the OpenAPI document, counts them as integers. 1882.5 stays a
    float and fails as msgspec says, naming the field."""
    obj = msgspec.json.decode(raw)
    if isinstance(obj, dict):
        for name in rules.integers:
            value = obj.get(name)
            if isinstance(value, float) and value.is_integer():
                obj[name] = int(value)
    return msgspec.convert(obj, body_type)


def error_detail(exc: SandboxerError) -> ErrorDetail:
    return ErrorDetail(status=exc.status, code=exc.code, message=str(exc), field=exc.field)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SandboxerError as exc:  # its status, code and field are the answer
        detail = error_detail(exc)
        if detail.status == 503:
            return _unavailable(detail)  # every 503 says when to retry
        return json_response(ErrorBody(detail), detail.status)
    except web.HTTPRequestEntityTooLarge:
        detail = ErrorDetail(413, "body_too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
        return json_response(ErrorBody(detail), 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
        detail = ErrorDetail(exc.status, code, f"{exc.reason}: {request.method} {path}")
        response = json_response(ErrorBody(detail), exc.status)
        if "Allow" in exc.headers:  # a 405 says which methods the resource has
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:
        if is_transient(exc):
            # NATS is failing over (a node lost, a leader being elected): say so, not 500.
            message = f"the event store is unavailable for the moment ({type(exc).__name__})"
            return _unavailable(ErrorDetail(503, "store_unavailable", message))
        # A bug, never the caller's fault: logged with its traceback, answered in the
        # same JSON shape as every other error (and without internals).
        log.exception("unhandled error in %s %s", request.method, request.path[:200])
        detail = ErrorDetail(500, "internal_error", "internal error; the server log has details")
        return json_response(ErrorBody(detail), 500)


def _unavailable(detail: ErrorDetail) -> web.Response:
    response = json_response(ErrorBody(detail), 503)
    response.headers["Retry-After"] = "1"
    return response


class Api:
    def __init__(
        self,
        manager: SandboxManager,
        runner: ProjectionRunner,
        store: EventRecorder,
        profiles: ProfileCatalog,
        webhooks: Webhooks | None = None,
        tokens: TokenBook | None = None,
        reconciler: Reconciler | None = None,
        bus: MessageBus | None = None,
        use: SandboxUse | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.bus = bus or MessageBus(manager)  # every command goes through it
        if metrics is None:  # an Api on its own still tells what its read model knows
            metrics = Metrics()
            metrics.watch_read_model(runner)
        self.metrics = metrics
        # exec, files, logs: what they record goes through the same bus
        self.use = use or SandboxUse.build(
            manager, self.bus.handle, manager.checkpoints.spool.parent / "transfers"
        )
        self.reconciler = reconciler
        self.webhooks = webhooks
        self.tokens = tokens or TokenBook([])
        self.manager = manager
        self.runner = runner
        self.store = store
        self.profiles = profiles
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False
        # sandbox id -> (the view, its encoded row): see `_row`
        self._rows: dict[str, tuple[SandboxView, bytes]] = {}
        # whole list bodies by filter, while the projection stays at `_lists_seq`
        self._lists: dict[tuple[Any, ...], bytes] = {}
        self._lists_seq = -1

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[error_middleware, self.auth_middleware],
            client_max_size=MAX_BODY_BYTES,
            # Oversized request lines or headers are refused by the HTTP parser before
            # any handler runs (sandboxer.http.server answers them in JSON: 431).
            handler_args={
                "max_line_size": MAX_HEADER_BYTES,
                "max_field_size": MAX_HEADER_BYTES,
                "max_headers": MAX_HEADERS,
            },
        )
        for route in ROUTES:
            handler = getattr(self, route.handler)
            if route.method == "GET":
                app.router.add_get(route.path, handler)  # HEAD too
            else:
                app.router.add_route(route.method, route.path, handler)
        dashboard.add_routes(app)
        app.on_shutdown.append(self._close_streams)
        return app

    async def _close_streams(self, app: web.Application) -> None:
        """Open streams (events, exec, logs) would hold shutdown until they end; one
        that starts after this is refused (`_streaming`)."""
        self._closing = True
        self.end_streams()

    def end_streams(self) -> int:
        """End every open streaming answer now (as a restart would); new ones may
        start. How many were open."""
        streams = list(self._streams)
        for task in streams:
            task.cancel()
        return len(streams)

    @contextlib.contextmanager
    def _streaming(self) -> Iterator[None]:
        """Around a streaming answer: shutdown cancels it. Enter before `prepare`: once
        the server is stopping, the request is a 503."""
        if self._closing:
            raise ApiError(503, "shutting_down", "the server is stopping; retry on another")
        me = asyncio.current_task()
        assert me is not None
        self._streams.add(me)
        try:
            yield
        finally:
            self._streams.discard(me)

    # ---- auth ---------------------------------------------------------------------

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With tokens configured, every route but health and the OpenAPI document needs
        a bearer token; members reach their own account's resources only."""
        if (
            not self.tokens.enabled
            or request.path in PUBLIC_PATHS
            or dashboard.is_public(request.path)
        ):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        principal = self.tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            raise ApiError(
                401,
                "unauthorized",
                "a valid bearer token is required"
                if header
                else "missing Authorization: Bearer <token>",
            )
        request[PRINCIPAL] = principal
        if not principal.admin:
            self._authorize_member(request, principal)
        return await handler(request)

    @staticmethod
    def _route(request: web.Request) -> Route | None:
        """The listed route a request matched (a HEAD request: its GET route); None
        when it matched none (a 404 or 405 follows) or a dashboard route."""
        resource = request.match_info.route.resource
        if resource is None:
            return None
        method = "GET" if request.method == "HEAD" else request.method
        return ROUTE_INDEX.get((method, resource.canonical))

    def _authorize_member(self, request: web.Request, principal: Principal) -> None:
        """The route's `access` rule for a member (admins may do everything)."""
        route = self._route(request)
        if route is None:
            return
        info = request.match_info
        access = route.access
        if access is Access.ADMIN:
            raise ApiError(403, "forbidden", f"{route.path} needs an admin token")
        owner: str | None = None
        if access is Access.ACCOUNT:
            owner = self._account(request)  # a malformed account: 404, as for an admin
        elif access is Access.SANDBOX:
            view = self.runner.projection.get(info["id"])
            owner = view.account if view else principal.account  # 404 follows
        elif access is Access.CHECKPOINT:
            checkpoint = self.runner.checkpoints.get(info["cid"])
            view = self.runner.projection.get(checkpoint.sandbox_id) if checkpoint else None
            owner = view.account if view else principal.account
        elif access is Access.WEBHOOK and self.webhooks is not None:
            registration = self.webhooks.registrations.get(info["wid"])
            owner = registration.account if registration else principal.account
        elif access is Access.EVENTS:
            sandbox = self._sandbox_query(request)  # a malformed id: 400, as for an admin
            view = self.runner.projection.get(sandbox) if sandbox else None
            if view is None:
                raise ApiError(
                    403,
                    "forbidden",
                    "members read events of their own sandboxes (?sandbox=<id>) or the stream",
                )
            owner = view.account
        if owner is not None and not principal.may_see(owner):
            raise ApiError(
                403, "forbidden", f"this token acts for account {principal.account} only"
            )

    @staticmethod
    def _principal(request: web.Request) -> Principal | None:
        return request.get(PRINCIPAL)

    # ---- helpers -----------------------------------------------------------------

    def _meta(self, request: web.Request) -> EventMeta:
        request_id = request.headers.get("X-Request-Id")
        if request_id is not None and not REQUEST_ID_RE.fullmatch(request_id):
            raise ApiError(
                400,
                "invalid_header",
                "X-Request-Id must match [A-Za-z0-9._:-]{1,64}",
                "X-Request-Id",
            )
        principal = self._principal(request)
        actor = f"api:{principal.name}" if principal else "api:anonymous"
        return EventMeta(actor=actor, correlation_id=request_id or new_correlation_id())

    def _sandbox_id(self, request: web.Request) -> str:
        raw = request.match_info["id"]
        try:
            return check_sandbox_id(raw)
        except InvalidId as exc:
            raise ApiError(404, "not_found", str(exc), "id") from exc

    def _view(self, sandbox_id: str) -> SandboxView:
        view = self.runner.projection.get(sandbox_id)
        if view is None:
            raise ApiError(404, "not_found", f"no sandbox {sandbox_id!r}", "id")
        return view

    def _row(self, view: SandboxView) -> bytes:
        """A sandbox's encoded list row. Views are immutable and a state without a step
        shows no progress, so such a row is encoded once per view, not per request
        (building and encoding rows was 95 % of listing 1,000 sandboxes)."""
        cached = self._rows.get(view.id)
        if cached is not None and cached[0] is view:
            return cached[1]
        row = _encoder.encode(self._out(view))
        if not self.manager.runs_step(view.state):
            self._rows[view.id] = (view, row)
        return row

    def _out(self, view: SandboxView) -> SandboxOut:
        progress = None
        step = self.manager.progress(view.id)
        if step is not None and step.state == view.state:
            progress = Progress(step=step.step, since=step.since, message=step.message)
        return SandboxOut(
            id=view.id,
            state=view.state,
            profile=view.profile,
            extension=view.extension,
            account=view.account,
            inputs=view.inputs,
            ttl_seconds=view.ttl_seconds,
            created_at=view.created_at,
            updated_at=view.updated_at,
            expires_at=view.expires_at,
            last_seq=view.last_seq,
            events=view.events,
            host=view.host,
            handle=view.handle,
            services=view.services,
            service_states=view.service_states,
            endpoints=view.endpoints,
            route_reason=view.route_reason,
            reason=view.reason,
            needs_reconciliation=view.needs_reconciliation,
            terminal=view.state in TERMINAL,
            metered=view.metered,
            credits_held=view.credits_held,
            validation=view.validation,
            validation_exit_code=view.validation_exit_code,
            validation_output=view.validation_output,
            validation_reason=view.validation_reason,
            progress=progress,
            labels=view.labels,
            commands=view.commands,
            commands_run=view.commands_run,
            files_uploaded=view.files_uploaded,
            files_downloaded=view.files_downloaded,
            pool=view.pool,
            claimed_at=view.claimed_at,
            paused_at=view.paused_at,
            paused_seconds=round(view.paused_seconds, 3),
            last_activity_at=view.last_activity_at,
        )

    async def _caught_up(self, seq: int) -> None:
        if not await self.runner.wait_for(seq, PROJECTION_WAIT):
            raise ApiError(503, "projection_lagging", f"projection has not reached seq {seq}")

    def _float_query(self, request: web.Request, name: str, default: float, top: float) -> float:
        raw = request.query.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ApiError(400, "invalid_query", f"{name} must be a number", name) from None
        if not 0 <= value <= top:
            raise ApiError(400, "invalid_query", f"{name} must be between 0 and {top:g}", name)
        return value

    def _int_query(self, request: web.Request, name: str, default: int, top: int) -> int:
        raw = request.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, "invalid_query", f"{name} must be an integer", name) from None
        if not 0 <= value <= top:
            raise ApiError(400, "invalid_query", f"{name} must be between 0 and {top}", name)
        return value

    # ---- handlers ----------------------------------------------------------------

    @staticmethod
    async def _body(
        request: web.Request, decoder: msgspec.json.Decoder[T], limit: int = MAX_BODY_BYTES
    ) -> T:
        raw = await request.read() if limit == MAX_BODY_BYTES else await _read(request, limit)
        if not raw:
            raise ApiError(400, "invalid_body", "request body is empty; expected a JSON object")
        deep, where = _too_deep(raw)
        if deep:
            raise ApiError(
                400, "invalid_body", f"nested deeper than {MAX_JSON_DEPTH} levels", where
            )
        rules = _field_rules(decoder.type)
        try:
            try:
                body = decoder.decode(raw)
            except msgspec.ValidationError as exc:
                if "got `float`" not in str(exc) or not rules.integers:
                    raise
                body = _integral(raw, decoder.type, rules)
        except msgspec.ValidationError as exc:
            raise ApiError(400, "invalid_body", str(exc), _validation_field(str(exc))) from exc
        except RecursionError:  # the scan above should make this unreachable
            raise ApiError(
                400, "invalid_body", f"nested deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from exc
        except UnicodeDecodeError as exc:  # msgspec checks UTF-8 inside strings this way
            raise ApiError(
                400, "malformed_json", f"body is not valid UTF-8 (byte {exc.start})"
            ) from exc
        _whole_match(body, rules)
        return body

    @staticmethod
    def _account_query(request: web.Request) -> str | None:
        """`?account=`, if given, as a whole account name (400 naming it otherwise)."""
        account = request.query.get("account")
        if account is not None:
            try:
                check_account(account)
            except InvalidId as exc:
                raise ApiError(400, "invalid_query", str(exc), "account") from exc
        return account

    @staticmethod
    def _sandbox_query(request: web.Request) -> str | None:
        """`?sandbox=`, if given, as a whole sandbox id (400 naming it otherwise)."""
        sandbox = request.query.get("sandbox")
        if sandbox is not None:
            try:
                check_sandbox_id(sandbox)
            except InvalidId as exc:
                raise ApiError(400, "invalid_query", str(exc), "sandbox") from exc
        return sandbox

    def _account(self, request: web.Request) -> str:
        raw = request.match_info["account"]
        try:
            return check_account(raw)
        except InvalidId as exc:
            raise ApiError(404, "not_found", str(exc), "account") from exc

    @staticmethod
    def _account_out(view: AccountView) -> AccountOut:
        return AccountOut(
            account=view.account,
            last_seq=view.last_seq,
            granted=view.granted,
            reserved=view.reserved,
            debited=view.debited,
            released=view.released,
            available=view.available,
            rejected=view.rejected,
            entries=view.entries,
            open_reservations=view.open,
        )

    # ---- checkpoints ----------------------------------------------------------------

    @staticmethod
    def _checkpoint_out(view: CheckpointView) -> CheckpointOut:
        return CheckpointOut(
            id=view.id,
            sandbox_id=view.sandbox_id,
            status=view.status,
            requested_at=view.requested_at,
            created_at=view.created_at,
            size=view.size,
            digest=view.digest,
            store_key=view.store_key,
            error=view.error,
            deleted_reason=view.deleted_reason,
            last_seq=view.last_seq,
        )

    def _checkpoint_view(self, checkpoint_id: str, field: str = "cid") -> CheckpointView:
        if not CHECKPOINT_ID_RE.fullmatch(checkpoint_id):
            raise ApiError(
                404,
                "not_found",
                f"no checkpoint {checkpoint_id[:80]!r}: ids match {CHECKPOINT_ID_RE.pattern}",
                field,
            )
        view = self.runner.checkpoints.get(checkpoint_id)
        if view is None:
            raise ApiError(404, "not_found", f"no checkpoint {checkpoint_id!r}", field)
        return view

    async def create_checkpoint(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        view = self._view(sandbox_id)
        if view.state in TERMINAL:
            raise ApiError(409, "conflict", f"sandbox {sandbox_id} is {view.state}", "state")
        done = await self.bus.handle(
            RequestCheckpoint(sandbox_id=sandbox_id, meta=self._meta(request))
        )
        assert done.checkpoint_id is not None
        await self._caught_up(done.seq)
        return json_response(self._checkpoint_out(self._checkpoint_view(done.checkpoint_id)), 202)

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        self._view(sandbox_id)
        rows = [self._checkpoint_out(v) for v in self.runner.checkpoints.for_sandbox(sandbox_id)]
        return json_response(CheckpointList(rows))

    async def get_checkpoint(self, request: web.Request) -> web.Response:
        checkpoint_id = request.match_info["cid"]
        wait = self._float_query(request, "wait", 0.0, MAX_WAIT_SECONDS)
        after = self._int_query(request, "after_seq", 0, MAX_SEQ)
        view = self._checkpoint_view(checkpoint_id)
        if wait > 0 and view.last_seq <= after:
            await self.runner.wait_checkpoint(checkpoint_id, after, wait)
            view = self._checkpoint_view(checkpoint_id)
        return json_response(self._checkpoint_out(view))

    async def extend(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        view = self._view(sandbox_id)
        body = await self._body(request, _extend_decoder)
        self._live(view)
        await self._command(
            ExtendTtl(sandbox_id=sandbox_id, ttl_seconds=body.ttl_seconds, meta=self._meta(request))
        )
        return json_response(self._out(self._view(sandbox_id)))

    async def pause(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        self._live(self._view(sandbox_id))
        await self._command(PauseSandbox(sandbox_id=sandbox_id, meta=self._meta(request)))
        return json_response(self._out(self._view(sandbox_id)), 202)

    async def resume(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        self._live(self._view(sandbox_id))
        await self._command(ResumeSandbox(sandbox_id=sandbox_id, meta=self._meta(request)))
        return json_response(self._out(self._view(sandbox_id)), 202)

    async def keepalive(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        view = self._view(sandbox_id)
        if view.state not in (State.READY, State.CHECKPOINTING, State.RESTORING):
            raise ApiError(
                409,
                "not_ready",
                f"sandbox {sandbox_id} is {view.state}; keepalive needs it ready",
                "state",
            )
        await self._command(
            NoteActivity(sandbox_id=sandbox_id, kind="keepalive", meta=self._meta(request))
        )
        return json_response(self._out(self._view(sandbox_id)))

    @staticmethod
    def _live(view: SandboxView) -> None:
        if view.state in TERMINAL:
            raise ApiError(409, "conflict", f"sandbox {view.id} is already {view.state}", "state")

    async def _command(self, command: AnyCommand) -> None:
        """Hand a sandbox command to the bus; answer once this node has seen its event."""
        done = await self.bus.handle(command)
        if done.seq:
            await self._caught_up(done.seq)

    async def restore(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        view = self._view(sandbox_id)
        body = await self._body(request, _restore_decoder)
        checkpoint = self._checkpoint_view(body.checkpoint, "checkpoint")
        if checkpoint.status != "created":
            raise ApiError(
                409, "conflict", f"checkpoint {checkpoint.id} is {checkpoint.status}", "checkpoint"
            )
        if view.state in TERMINAL:
            raise ApiError(409, "conflict", f"sandbox {sandbox_id} is {view.state}", "state")
        done = await self.bus.handle(
            RestoreCheckpoint(
                sandbox_id=sandbox_id, checkpoint_id=checkpoint.id, meta=self._meta(request)
            )
        )
        await self._caught_up(done.seq)
        return json_response(self._out(self._view(sandbox_id)), 202)

    async def delete_checkpoint(self, request: web.Request) -> web.Response:
        view = self._checkpoint_view(request.match_info["cid"])
        if view.status in ("requested",):
            raise ApiError(409, "conflict", f"checkpoint {view.id} is still being made", "status")
        meta = self._meta(request)
        done = await self.bus.handle(
            DeleteCheckpoint(checkpoint_id=view.id, reason=f"deleted by {meta.actor}", meta=meta)
        )
        if done.seq:
            await self._caught_up(done.seq)
        return json_response(self._checkpoint_out(self._checkpoint_view(view.id)))

    # ---- webhooks -------------------------------------------------------------------

    def _hooks(self) -> Webhooks:
        if self.webhooks is None:
            raise ApiError(503, "unavailable", "webhooks are not running")
        return self.webhooks

    async def register_webhook(self, request: web.Request) -> web.Response:
        account = self._account(request)
        body = await self._body(request, _webhook_decoder)
        out = await self._hooks().register(
            account, body.url, body.event_types, self._meta(request), body.from_
        )
        return json_response(out, 201)

    async def list_webhooks(self, request: web.Request) -> web.Response:
        account = self._account(request)
        return json_response(WebhookList(self._hooks().list(account)))

    async def remove_webhook(self, request: web.Request) -> web.Response:
        webhook_id = request.match_info["wid"]
        if not WEBHOOK_ID_RE.fullmatch(webhook_id):
            raise ApiError(
                404,
                "not_found",
                f"no webhook {webhook_id[:80]!r}: ids match {WEBHOOK_ID_RE.pattern}",
                "wid",
            )
        if not await self._hooks().remove(webhook_id, self._meta(request)):
            raise ApiError(404, "not_found", f"no webhook {webhook_id!r}", "wid")
        return web.Response(status=204)

    async def list_accounts(self, request: web.Request) -> web.Response:
        views = sorted(self.runner.ledger.accounts.values(), key=lambda v: v.account)
        return json_response(AccountList([self._account_out(v) for v in views]))

    async def get_account(self, request: web.Request) -> web.Response:
        account = self._account(request)
        wait = self._float_query(request, "wait", 0.0, MAX_WAIT_SECONDS)
        after = self._int_query(request, "after_seq", 0, MAX_SEQ)
        view = self.runner.ledger.accounts.get(account)
        if wait > 0 and (view is None or view.last_seq <= after):
            await self.runner.wait_account(account, after, wait)
            view = self.runner.ledger.accounts.get(account)
        if view is None:
            raise ApiError(
                404, "not_found", f"no account {account!r} (no credits granted)", "account"
            )
        return json_response(self._account_out(view))

    async def grant(self, request: web.Request) -> web.Response:
        account = self._account(request)
        body = await self._body(request, _grant_decoder)  # amount and reason: see GrantBody
        done = await self.bus.handle(
            GrantCredits(
                account=account, amount=body.amount, reason=body.reason, meta=self._meta(request)
            )
        )
        await self._caught_up(done.seq)
        return json_response(self._account_out(self.runner.ledger.account(account)), 201)

    async def account_ledger(self, request: web.Request) -> web.Response:
        account = self._account(request)
        after = self._int_query(request, "after_seq", 0, MAX_SEQ)
        limit = self._int_query(request, "limit", 100, 1000)
        entries: list[EventOut] = []
        more = False
        if self.runner.last_seq > after:
            async for recorded in self.store.read(
                after + 1, aggregate=Aggregate("ledger", account)
            ):
                if len(entries) == limit:
                    more = True
                    break
                entries.append(_event_out(recorded))
        next_after = entries[-1].seq if more and entries else None
        return json_response(
            LedgerPage(account=account, entries=entries, next_after_seq=next_after)
        )

    async def ledger_audit(self, request: web.Request) -> web.Response:
        account = self._account_query(request)
        grace = self._float_query(request, "ttl_grace", DEFAULT_TTL_GRACE, MAX_TTL_GRACE)
        live = self.runner.ledger.snapshot()  # the follower moves on while we replay
        target = live.last_seq

        async def history() -> AsyncIterator[RecordedEvent]:
            if target > 0:
                async for batch in self.store.read_batches(1, upto=target):
                    for recorded in batch:
                        yield recorded

        return json_response(await audit(history(), live, account, ttl_grace=grace))

    async def create(self, request: web.Request) -> web.Response:
        body = await self._body(request, _create_decoder)
        _check_inputs(body.inputs)
        labels = check_labels(body.labels)
        meta = self._meta(request)
        profile = body.profile
        if body.from_checkpoint is not None:
            checkpoint = self._checkpoint_view(body.from_checkpoint, "from_checkpoint")
            if not profile:
                source = self.runner.projection.get(checkpoint.sandbox_id)
                profile = source.profile if source else ""
        if not profile:
            raise ApiError(400, "invalid_body", "profile is required", "profile")
        account = body.account
        principal = self._principal(request)
        if principal is not None and not principal.admin:
            if account == "default":
                account = principal.account
            elif account != principal.account:
                raise ApiError(
                    403,
                    "forbidden",
                    f"this token acts for account {principal.account} only",
                    "account",
                )
        sandbox_id = None
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            try:
                sandbox_id = idempotent_sandbox_id(account, key)
            except InvalidId as exc:
                raise ApiError(400, "invalid_header", str(exc), "Idempotency-Key") from exc
        create = CreateSandbox(
            profile=profile,
            inputs=body.inputs,
            ttl_seconds=body.ttl_seconds,
            account=account,
            from_checkpoint=body.from_checkpoint,
            sandbox_id=sandbox_id,
            labels=labels,
            meta=meta,
        )
        if sandbox_id is not None and self.runner.projection.get(sandbox_id) is not None:
            return await self._retried(create, sandbox_id)
        try:
            done = await self.bus.handle(create)
        except AlreadyCreated as exc:
            # The same key raced us (here or on another node): once its create is
            # recorded, this request is a retry of it.
            await self.runner.wait_sandbox(exc.sandbox_id, 0, PROJECTION_WAIT)
            if self.runner.projection.get(exc.sandbox_id) is None:
                # Not recorded yet (or its worker died before it was): transient.
                raise CreateInProgress(exc.sandbox_id) from exc
            return await self._retried(create, exc.sandbox_id)
        assert done.sandbox_id is not None
        await self._caught_up(done.seq)
        return self._created(done.sandbox_id, 202)

    async def _retried(self, create: CreateSandbox, sandbox_id: str) -> web.Response:
        """A create repeated with its Idempotency-Key: the sandbox it made, if the
        request is the same one (422 naming the first difference otherwise)."""
        await self.bus.check_retry(sandbox_id, create)
        return self._created(sandbox_id, 200)

    def _created(self, sandbox_id: str, status: int) -> web.Response:
        response = json_response(self._out(self._view(sandbox_id)), status)
        response.headers["Location"] = f"/v1/sandboxes/{sandbox_id}"
        return response

    async def list_sandboxes(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in {s.value for s in State if s != State.NEW}:
            raise ApiError(400, "invalid_query", f"unknown state {state[:80]!r}", "state")
        account = self._account_query(request)
        live = request.query.get("live")
        if live is not None and live not in LIVE_VALUES:
            raise ApiError(
                400, "invalid_query", f"live must be one of {', '.join(LIVE_VALUES)}", "live"
            )
        labels = _label_query(request)
        principal = self._principal(request)
        if principal is not None and not principal.admin:
            account = principal.account
        limit = self._int_query(request, "limit", MAX_PAGE, MAX_PAGE)
        if limit < 1:
            raise ApiError(400, "invalid_query", f"limit must be between 1 and {MAX_PAGE}", "limit")
        order = request.query.get("order", "oldest")
        if order not in ORDERS:
            raise ApiError(
                400, "invalid_query", f"order must be one of {', '.join(ORDERS)}", "order"
            )
        raw_cursor = request.query.get("cursor")
        try:
            cursor = Cursor.decode(raw_cursor) if raw_cursor is not None else None
        except ValueError as exc:
            raise ApiError(400, "invalid_query", str(exc), "cursor") from None
        key = (
            state,
            account,
            live in ("1", "true"),
            tuple(sorted(labels.items())),
            raw_cursor,
            limit,
            order,
        )
        if self._lists_seq != self.runner.last_seq or len(self._lists) >= MAX_CACHED_LISTS:
            self._lists.clear()
            self._lists_seq = self.runner.last_seq
        body = self._lists.get(key)
        if body is None:
            rows = self.runner.projection.page(
                state=state,
                account=account,
                live_only=key[2],
                labels=labels,
                after=cursor,
                limit=limit,
                newest_first=order == "newest",
            )
            following = (
                b'"%s"' % Cursor.of(rows[-1]).encode().encode() if len(rows) == limit else b"null"
            )
            body = b"".join(
                (
                    b'{"sandboxes":[',
                    b",".join(map(self._row, rows)),
                    b'],"count":%d,"next_cursor":%s}' % (len(rows), following),
                )
            )
            # Until the next event the same filter lists the same bytes, unless a row
            # shows a running step, whose progress moves without events.
            if not any(self.manager.runs_step(v.state) for v in rows):
                self._lists[key] = body
        return web.Response(body=body, content_type="application/json")

    async def get(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        wait = self._float_query(request, "wait", 0.0, MAX_WAIT_SECONDS)
        after = self._int_query(request, "after_seq", 0, MAX_SEQ)
        if wait > 0 and after > self.runner.last_seq:
            # Read-your-writes across API nodes: this one may not have seen the event
            # that another node answered with yet.
            await self.runner.wait_for(after, wait)
        view = self._view(sandbox_id)
        if wait > 0 and view.last_seq <= after and view.state not in TERMINAL:
            await self.runner.wait_sandbox(sandbox_id, after, wait)
            view = self._view(sandbox_id)
        return json_response(self._out(view))

    async def destroy(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        view = self._view(sandbox_id)
        if view.state in TERMINAL:
            raise ApiError(
                409, "conflict", f"sandbox {sandbox_id} is already {view.state}", "state"
            )
        try:
            seq = (
                await self.bus.handle(
                    DestroySandbox(sandbox_id=sandbox_id, meta=self._meta(request))
                )
            ).seq
        except NotFound as exc:
            # Nobody drives it: it finished meanwhile (a concurrent destroy, perhaps
            # on another node). Say so once this node has seen the end.
            now = await self._settled_view(sandbox_id, PROJECTION_WAIT)
            if now.state in TERMINAL:
                raise ApiError(
                    409, "conflict", f"sandbox {sandbox_id} is already {now.state}", "state"
                ) from exc
            raise ApiError(
                503, "owner_unavailable", f"sandbox {sandbox_id} is between workers", "id"
            ) from exc
        if seq:
            await self._caught_up(seq)
        return json_response(self._out(self._view(sandbox_id)), 202)

    async def _settled_view(self, sandbox_id: str, timeout: float) -> SandboxView:
        """The sandbox once this node's projection shows it terminal (or at the
        deadline, as it is then)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        view = self._view(sandbox_id)
        while view.state not in TERMINAL and (left := deadline - loop.time()) > 0:
            await self.runner.wait_sandbox(sandbox_id, view.last_seq, left)
            view = self._view(sandbox_id)
        return view

    async def sandbox_events(self, request: web.Request) -> web.Response:
        sandbox_id = self._sandbox_id(request)
        self._view(sandbox_id)
        recorded = await self.store.read_aggregate(Aggregate("sandbox", sandbox_id))
        return json_response(
            EventList(events=[_event_out(r) for r in recorded], last_seq=self.runner.last_seq)
        )

    # ---- using a sandbox: exec, files, logs -----------------------------------------

    async def exec_command(self, request: web.Request) -> web.StreamResponse:
        """Run one command; the answer streams its output as NDJSON frames (started,
        stdout/stderr chunks, exit). Errors before it starts are plain JSON."""
        sandbox_id = self._sandbox_id(request)
        body = await self._body(request, _exec_decoder, MAX_EXEC_BODY)
        meta = self._meta(request)
        prepared = await self.use.commands.prepare(sandbox_id, body)
        with self._streaming():
            started = await self.use.commands.start(prepared, meta)
            response = await _ndjson(request)

            async def send(frame: ExecFrame) -> None:
                await response.write(_encoder.encode(frame) + b"\n")

            await self.use.commands.run(prepared, started, meta, send, _connected(request))
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        return response

    def _file_query(self, request: web.Request) -> tuple[str, str | None]:
        path = request.query.get("path")
        if not path:
            raise ApiError(400, "invalid_query", "path is required", "path")
        if len(path) > MAX_FILE_PATH:
            raise ApiError(
                400, "invalid_query", f"path is longer than {MAX_FILE_PATH} characters", "path"
            )
        return path, self._service_query(request)

    @staticmethod
    def _service_query(request: web.Request) -> str | None:
        service = request.query.get("service")
        if service is not None and not SERVICE_NAME_RE.fullmatch(service):
            raise ApiError(
                400, "invalid_query", f"service must match {SERVICE_NAME_RE.pattern}", "service"
            )
        return service

    async def put_file(self, request: web.Request) -> web.Response:
        """Write the body (raw bytes, streamed) to `path` in the sandbox."""
        sandbox_id = self._sandbox_id(request)
        path, service = self._file_query(request)
        meta = self._meta(request)
        file = await self.use.files.prepare(sandbox_id, path, service, "put_file")
        out = await self.use.files.upload(
            file, request.content.iter_chunked(FILE_CHUNK), request.content_length, meta
        )
        return json_response(out, 201)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        """The file at `path`, streamed (Content-Length set)."""
        sandbox_id = self._sandbox_id(request)
        path, service = self._file_query(request)
        meta = self._meta(request)
        file = await self.use.files.prepare(sandbox_id, path, service, "get_file")
        stream = await self.use.files.open(file)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = stream.size
        with self._streaming():
            try:
                await response.prepare(request)
            except BaseException:
                await stream.aclose()
                raise
            await self.use.files.send(file, stream, response.write, _connected(request), meta)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """The services' log lines as NDJSON; `follow` keeps the answer open."""
        sandbox_id = self._sandbox_id(request)
        service = self._service_query(request)
        follow = request.query.get("follow", "0")
        if follow not in LIVE_VALUES:
            raise ApiError(
                400, "invalid_query", f"follow must be one of {', '.join(LIVE_VALUES)}", "follow"
            )
        tail = self._int_query(request, "tail", -1, MAX_TAIL) if "tail" in request.query else None
        since = self._float_query(request, "since", 0.0, 1e11) if "since" in request.query else None
        target = await self.use.logs.prepare(sandbox_id, service)
        with self._streaming():
            return await self._send_logs(request, target, follow, tail, since)

    async def _send_logs(
        self,
        request: web.Request,
        target: Target,
        follow: str,
        tail: int | None,
        since: float | None,
    ) -> web.StreamResponse:
        response = await _ndjson(request)

        async def send(line: LogLine) -> None:
            await response.write(_encoder.encode(line) + b"\n")

        await self.use.logs.read(
            target,
            send,
            _connected(request),
            follow=follow in ("1", "true"),
            tail=tail,
            since=since,
        )
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def events(self, request: web.Request) -> web.Response:
        """Events after `after_seq` (long-polls up to `wait` seconds when there are none)."""
        after = self._int_query(request, "after_seq", 0, MAX_SEQ)
        limit = self._int_query(request, "limit", 500, 5000)
        wait = self._float_query(request, "wait", 0.0, MAX_WAIT_SECONDS)
        sandbox = self._sandbox_query(request)
        aggregate = None if sandbox is None else Aggregate("sandbox", sandbox)
        if wait > 0 and self.runner.last_seq <= after:
            await self.runner.wait_change(after, wait)
        events: list[EventOut] = []
        if limit > 0 and self.runner.last_seq > after:
            async for recorded in self.store.read(after + 1, aggregate=aggregate):
                events.append(_event_out(recorded))
                if len(events) >= limit:
                    break
        return json_response(EventList(events=events, last_seq=self.runner.last_seq))

    async def event_schema(self, request: web.Request) -> web.Response:
        return json_response(event_schema())

    async def event_subjects(self, request: web.Request) -> web.Response:
        return json_response(event_subjects())

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: every event after `Last-Event-ID` (the stream sequence),
        filtered by sandbox, type and account; a comment line every 15 s keeps proxies
        from closing an idle stream."""
        header = request.headers.get("Last-Event-ID")
        source = "Last-Event-ID" if header else "after_seq"
        raw_last = header or request.query.get("after_seq", "0")
        try:
            after = int(raw_last) if len(raw_last) <= 20 else -1
            if not 0 <= after <= MAX_SEQ:
                raise ValueError(raw_last)
        except ValueError:
            raise ApiError(
                400,
                "invalid_header" if header else "invalid_query",
                f"{source} must be a stream sequence, 0 to {MAX_SEQ}",
                source,
            ) from None
        sandbox = self._sandbox_query(request)
        account = self._account_query(request)
        principal = self._principal(request)
        if principal is not None and not principal.admin:
            account = principal.account  # members follow their own account only
        types = {t for t in request.query.get("type", "").split(",") if t}
        known = {t.type_name() for t in _event_schema_types()}
        if types - known:
            raise ApiError(
                400,
                "invalid_query",
                f"unknown event type {sorted(types - known)[0][:80]!r}",
                "type",
            )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        with self._streaming():
            await response.prepare(request)
            await self._follow_events(response, after, types, sandbox, account)
        return response

    async def _follow_events(
        self,
        response: web.StreamResponse,
        after: int,
        types: set[str],
        sandbox: str | None,
        account: str | None,
    ) -> None:
        queue: asyncio.Queue[RecordedEvent] = asyncio.Queue(maxsize=1000)

        async def pump() -> None:
            async for recorded in self.store.follow(after + 1):
                await queue.put(recorded)

        pumping = asyncio.create_task(pump())
        try:
            while True:
                try:
                    async with asyncio.timeout(SSE_KEEPALIVE):  # not wait_for: see _ordered
                        recorded = await queue.get()
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                event = recorded.event
                if types and event.type_name() not in types:
                    continue
                if sandbox is not None and not _concerns(recorded.subject, event, sandbox):
                    continue
                if (
                    account is not None
                    and self.runner.account_of(recorded.subject, event) != account
                ):
                    continue
                payload = _encoder.encode(_event_out(recorded))
                await response.write(
                    f"id: {recorded.seq}\nevent: {event.type_name()}\n".encode()
                    + b"data: "
                    + payload
                    + b"\n\n"
                )
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            await cancel_and_wait(pumping)

    async def list_profiles(self, request: web.Request) -> web.Response:
        out = []
        for name in self.profiles.names():
            p = self.profiles.get(name)
            out.append(
                ProfileOut(
                    name=p.name,
                    description=p.description,
                    extension=p.extension,
                    ttl_seconds=p.ttl_seconds,
                    max_ttl_seconds=p.max_ttl_seconds,
                    inputs=[
                        InputOut(k, s.description, s.required, s.default, s.secret, s.choices)
                        for k, s in p.inputs.items()
                    ],
                )
            )
        return json_response(ProfileList(profiles=out))

    async def list_pools(self, request: web.Request) -> web.Response:
        pools = self.bus.pools
        found = pools.status() if pools is not None else []
        # A bare array, as the issue that introduced pools gave the answer.
        return json_response([PoolOut(**msgspec.structs.asdict(p)) for p in found])

    async def replay(self, request: web.Request) -> web.Response:
        return json_response(await self.runner.verify())

    async def reconcile(self, request: web.Request) -> web.Response:
        """One reconciliation sweep now; `remove` overrides the configured mode."""
        if self.reconciler is None:
            raise ApiError(503, "unavailable", "reconciliation is not running")
        raw = request.query.get("remove")
        if raw is not None and raw not in LIVE_VALUES:
            raise ApiError(
                400, "invalid_query", f"remove must be one of {', '.join(LIVE_VALUES)}", "remove"
            )
        remove = None if raw is None else raw in ("1", "true")
        principal = self._principal(request)
        actor = f"user:{principal.name}" if principal is not None else "user:local"
        return json_response(await self.reconciler.sweep(remove, actor=actor))

    async def health(self, request: web.Request) -> web.Response:
        return json_response(
            Health(
                status="ok", last_seq=self.runner.last_seq, live_sandboxes=len(self.manager.live())
            )
        )

    async def whoami(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        if principal is None:
            return json_response(Identity(auth=False, name="anonymous", account=None, role="admin"))
        return json_response(
            Identity(auth=True, name=principal.name, account=principal.account, role=principal.role)
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document(auth=self.tokens.enabled, profiles=self.profiles))

    async def metrics_text(self, request: web.Request) -> web.Response:
        """The service's series for a Prometheus scrape (docs/operations.md)."""
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )


async def _read(request: web.Request, limit: int) -> bytes:
    """The whole body, refused past `limit` (a route whose body may be larger than
    the app's `client_max_size`)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def _ndjson(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/x-ndjson",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


def _connected(request: web.Request) -> Callable[[], bool]:
    """Whether the caller of a streaming answer is still there."""

    def connected() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    return connected


def _label_query(request: web.Request) -> dict[str, str]:
    """`?label=k=v`, repeatable: the sandboxes carrying every one of them."""
    wanted: dict[str, str] = {}
    for raw in request.query.getall("label", []):
        key, sep, value = raw.partition("=")
        if not sep:
            raise ApiError(400, "invalid_query", "label must be key=value", "label")
        wanted[key] = value
    try:
        return check_labels(wanted)
    except ApiError as exc:
        raise ApiError(400, "invalid_query", str(exc), "label") from None


def _check_inputs(inputs: dict[str, Any]) -> None:
    """Input names and values, before the profile sees them: names are identifiers,
    values are strings of at most MAX_INPUT_LENGTH characters with no control
    characters but tab and newline. Every error names the input."""
    if len(inputs) > MAX_INPUTS:
        raise ApiError(400, "invalid_body", f"at most {MAX_INPUTS} inputs", "inputs")
    for key, value in inputs.items():
        if not INPUT_NAME_RE.fullmatch(key):
            raise ApiError(
                400,
                "invalid_body",
                f"input name {key[:80]!r} must match {INPUT_NAME_RE.pattern}",
                "inputs",
            )
        field = f"inputs.{key}"
        if not isinstance(value, str):
            raise ApiError(
                400,
                "invalid_body",
                f"input {key!r} must be a string, got {type(value).__name__}",
                field,
            )
        if len(value) > MAX_INPUT_LENGTH:
            raise ApiError(
                400,
                "invalid_body",
                f"input {key!r} is longer than {MAX_INPUT_LENGTH} characters",
                field,
            )
        bad = CONTROL_RE.search(value)
        if bad:
            raise ApiError(
                400,
                "invalid_body",
                f"input {key!r} contains the control character U+{ord(bad.group()):04X} "
                "(only tab and newline are allowed)",
                field,
            )


def _concerns(subject: str, event: Event, sandbox: str) -> bool:
    """What `?sandbox=` streams: the sandbox's own events, the validation results
    about it, and the ledger events of its charge (`sandbox_id`)."""
    if subject.startswith((SANDBOX_SUBJECTS, VALIDATION_SUBJECTS)):
        return event.aggregate_id == sandbox
    if subject.startswith(LEDGER_SUBJECTS):
        return getattr(event, "sandbox_id", None) == sandbox
    return False


def _event_out(recorded: RecordedEvent) -> EventOut:
    return EventOut(
        seq=recorded.seq, subject=recorded.subject, event=msgspec.to_builtins(recorded.event)
    )


def _event_schema_types() -> tuple[type[Event], ...]:
    from events import ALL_EVENTS

    return ALL_EVENTS


def event_schema() -> dict[str, Any]:
    """JSON Schema of every event type (events.schema); docs/events.schema.json is
    this, checked in."""
    return events_schema.event_schema(_event_schema_types())


def event_subjects() -> dict[str, Any]:
    """The subject of each event type and the rule of each subject token, beside the
    schema (a strict validator refuses unknown schema keywords); checked in as
    docs/events.subjects.json."""
    return events_schema.event_subjects(_event_schema_types())


# ---- the routes -------------------------------------------------------------------
# Every API route, once: Api.app() registers them, openapi_document() describes them
# and the auth middleware applies their `access` (see sandboxer.http.routes).

ACCOUNT_PARAM = path_param("account", ACCOUNT_RE.pattern, "account name")
CHECKPOINT_PARAM = path_param("cid", CHECKPOINT_ID_RE.pattern, "checkpoint id")
SANDBOX_PARAM = path_param("id", SANDBOX_ID_RE.pattern, "sandbox id")
WEBHOOK_PARAM = path_param("wid", WEBHOOK_ID_RE.pattern, "webhook id")
REQUEST_ID = Param(
    "X-Request-Id",
    "header",
    {"type": "string", "pattern": REQUEST_ID_RE.pattern},
    "correlation id recorded on the events this request causes",
)
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    "header",
    {"type": "string", "pattern": IDEMPOTENCY_KEY_RE.pattern},
    "retry-safe create: the same key (per account) names the same "
    "sandbox; a retry with the same request answers 200 with it instead of creating "
    "another, also while the first is in flight on any node; another request with "
    "the key answers 422",
)
FILE_PATH = Param(
    "path",
    "query",
    {"type": "string", "minLength": 1, "maxLength": MAX_FILE_PATH},
    "the file: absolute inside the service's container, or in the workspace (its root "
    "is /); no `..` part",
    required=True,
)
FILE_SERVICE = query(
    "service",
    {"type": "string", "pattern": SERVICE_NAME_RE.pattern},
    "the service whose container holds the file (default: the only one)",
)
WAIT = query(
    "wait",
    {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
    "long-poll: seconds to wait for a change",
)
AFTER = query(
    "after_seq",
    {"type": "integer", "minimum": 0, "maximum": MAX_SEQ},
    "stream sequence the caller has already seen",
)
ACCOUNT_SCHEMA = {"type": "string", "pattern": ACCOUNT_RE.pattern}
SANDBOX_SCHEMA = {"type": "string", "pattern": SANDBOX_ID_RE.pattern}
ANY_OBJECT = {"type": "object"}
_SANDBOX_LINK = {"parameters": {"id": "$response.body#/id"}}
_CHECKPOINT_LINK = {"parameters": {"cid": "$response.body#/id"}}
_ACCOUNT_LINK = {"parameters": {"account": "$response.body#/account"}}

# What each error status means, in the OpenAPI document.
ERROR_STATUSES = {
    400: "bad input: the error names the field (parameter, body field or header)",
    401: "no bearer token, or an unknown one",
    402: "the account's credits do not cover what the request would reserve (a "
    "metered sandbox's TTL extension)",
    403: "the token may not act on this account, or needs the admin role",
    404: "no such resource (also: an id that does not have the id format)",
    409: "the resource is not in a state that allows this (or the account has as "
    "many webhooks as allowed)",
    413: f"the body is larger than allowed: {MAX_BODY_BYTES} bytes of JSON ({MAX_EXEC_BODY} "
    "for exec), a file "
    "SANDBOXER_MAX_FILE_BYTES (default 1 GiB)",
    422: "the Idempotency-Key was used before with another request (the field "
    "names the first difference)",
    503: "not ready: the projection lags, the sandbox's worker does not answer, or "
    "webhooks are not running; retry",
}

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/sandboxes",
        "create",
        "createSandbox",
        "Create a sandbox from a profile",
        Access.MEMBER,
        params=(REQUEST_ID, IDEMPOTENCY_KEY),
        body=CreateBody,
        answers=(
            Answer(
                202,
                "Accepted",
                SandboxOut,
                links={
                    "getSandbox": _SANDBOX_LINK,
                    "destroySandbox": _SANDBOX_LINK,
                    "sandboxEvents": _SANDBOX_LINK,
                    "checkpointSandbox": _SANDBOX_LINK,
                    "listCheckpoints": _SANDBOX_LINK,
                },
            ),
            Answer(200, "Created before with this Idempotency-Key", SandboxOut),
        ),
        errors=(400, 403, 404, 409, 413, 422, 503),
    ),
    Route(
        "GET",
        "/v1/sandboxes",
        "list_sandboxes",
        "listSandboxes",
        "List sandboxes (a member: its own account's)",
        Access.MEMBER,
        params=(
            query(
                "state",
                {"type": "string", "enum": [s.value for s in State if s != State.NEW]},
                "filter by state",
            ),
            query("account", ACCOUNT_SCHEMA, "filter by account"),
            query(
                "live",
                {"type": "string", "enum": list(LIVE_VALUES)},
                "1 or true: only sandboxes that are not terminal",
            ),
            query(
                "label",
                {
                    "type": "string",
                    "pattern": f"^{LABEL_KEY_RE.pattern[1:-1]}={LABEL_VALUE_RE.pattern[1:-1]}$",
                },
                "key=value: only sandboxes with this label (repeat the parameter for several)",
            ),
            query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                f"rows per page (default and most: {MAX_PAGE}), by creation time",
            ),
            query(
                "cursor",
                {"type": "string", "maxLength": 400},
                "the next_cursor of the page before: the page after it",
            ),
            query(
                "order",
                {"type": "string", "enum": list(ORDERS)},
                "oldest (default) or newest first, by creation time",
            ),
        ),
        answers=(Answer(200, body=SandboxList),),
        errors=(400,),
    ),
    Route(
        "GET",
        "/v1/sandboxes/{id}",
        "get",
        "getSandbox",
        "One sandbox",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, WAIT, AFTER),
        answers=(Answer(200, body=SandboxOut),),
        errors=(400, 403, 404),
    ),
    Route(
        "DELETE",
        "/v1/sandboxes/{id}",
        "destroy",
        "destroySandbox",
        "Destroy a sandbox",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        answers=(Answer(202, "Accepted", SandboxOut),),
        errors=(400, 403, 404, 409, 503),
    ),
    Route(
        "PATCH",
        "/v1/sandboxes/{id}",
        "extend",
        "extendSandbox",
        "Change a sandbox's TTL: it ends ttl_seconds from now (within the profile's "
        "max_ttl_seconds; a metered sandbox's reservation is topped up)",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        body=ExtendBody,
        answers=(Answer(200, body=SandboxOut),),
        errors=(400, 402, 403, 404, 409, 413, 503),
    ),
    Route(
        "POST",
        "/v1/sandboxes/{id}/pause",
        "pause",
        "pauseSandbox",
        "Pause a ready sandbox (its files and volumes stay; metering stops while paused)",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        answers=(Answer(202, "Accepted", SandboxOut),),
        errors=(400, 403, 404, 409, 503),
    ),
    Route(
        "POST",
        "/v1/sandboxes/{id}/resume",
        "resume",
        "resumeSandbox",
        "Resume a paused sandbox",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        answers=(Answer(202, "Accepted", SandboxOut),),
        errors=(400, 403, 404, 409, 503),
    ),
    Route(
        "POST",
        "/v1/sandboxes/{id}/keepalive",
        "keepalive",
        "keepaliveSandbox",
        "Say the sandbox is in use (it is not idle)",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        answers=(Answer(200, body=SandboxOut),),
        errors=(400, 403, 404, 409, 503),
    ),
    Route(
        "GET",
        "/v1/sandboxes/{id}/events",
        "sandbox_events",
        "sandboxEvents",
        "A sandbox's events, in order",
        Access.SANDBOX,
        params=(SANDBOX_PARAM,),
        answers=(Answer(200, body=EventList),),
        errors=(403, 404),
    ),
    Route(
        "POST",
        "/v1/sandboxes/{id}/exec",
        "exec_command",
        "execCommand",
        "Run a command in a ready sandbox; its output streams back as it comes",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        body=ExecBody,
        answers=(
            Answer(
                200,
                "NDJSON, one frame per line: `started`, then `stdout`/`stderr` chunks as "
                "they come, then one `exit`. Closing the connection stops the command.",
                frames=(ExecStarted, ExecStdout, ExecStderr, ExecExit),
                content_type="application/x-ndjson",
            ),
        ),
        errors=(400, 403, 404, 409, 413, 422, 503),
    ),
    Route(
        "PUT",
        "/v1/sandboxes/{id}/files",
        "put_file",
        "putFile",
        "Write a file into a ready sandbox (the body, streamed; parents are created)",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, FILE_PATH, FILE_SERVICE, REQUEST_ID),
        raw_body="application/octet-stream",
        answers=(Answer(201, "Written", FileOut),),
        errors=(400, 403, 404, 409, 413, 503),
    ),
    Route(
        "GET",
        "/v1/sandboxes/{id}/files",
        "get_file",
        "getFile",
        "Read a file out of a ready sandbox, streamed",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, FILE_PATH, FILE_SERVICE, REQUEST_ID),
        answers=(
            Answer(
                200,
                "the file's bytes (Content-Length set)",
                schema={"type": "string", "format": "binary"},
                content_type="application/octet-stream",
            ),
        ),
        errors=(400, 403, 404, 409, 413, 503),
    ),
    Route(
        "GET",
        "/v1/sandboxes/{id}/logs",
        "logs",
        "sandboxLogs",
        "The services' logs, one line per frame; follow=1 keeps the answer open",
        Access.SANDBOX,
        params=(
            SANDBOX_PARAM,
            query(
                "service",
                {"type": "string", "pattern": SERVICE_NAME_RE.pattern},
                "one service (default: every service)",
            ),
            query(
                "follow", {"type": "string", "enum": list(LIVE_VALUES)}, "1 or true: keep following"
            ),
            query(
                "tail",
                {"type": "integer", "minimum": 0, "maximum": MAX_TAIL},
                "only the last N lines of each service",
            ),
            query(
                "since",
                {"type": "number", "minimum": 0, "maximum": 1e11},
                "only lines after this unix time",
            ),
        ),
        answers=(
            Answer(
                200,
                "NDJSON: one line of a service's log per frame",
                frames=(LogLine,),
                content_type="application/x-ndjson",
            ),
        ),
        errors=(400, 403, 404, 409),
    ),
    Route(
        "GET",
        "/v1/events",
        "events",
        "events",
        "Events after a stream sequence (long-poll); members name a sandbox",
        Access.EVENTS,
        params=(
            AFTER,
            WAIT,
            query("limit", {"type": "integer", "minimum": 0, "maximum": 5000}, "at most this many"),
            query("sandbox", SANDBOX_SCHEMA, "only this sandbox's events"),
        ),
        answers=(Answer(200, body=EventList),),
        errors=(400, 403),
    ),
    Route(
        "GET",
        "/v1/events/stream",
        "event_stream",
        "eventStream",
        "Server-Sent Events: every event after Last-Event-ID, live "
        "(without it nor after_seq: from sequence 1)",
        Access.MEMBER,
        params=(
            Param(
                "Last-Event-ID",
                "header",
                {"type": "string", "pattern": "^[0-9]{1,19}$"},
                "the last stream sequence seen (wins over after_seq)",
            ),
            AFTER,
            query(
                "sandbox",
                SANDBOX_SCHEMA,
                "only this sandbox's events, its validation results and the "
                "ledger events of its charge",
            ),
            query(
                "type",
                {"type": "string", "maxLength": 4096},
                "comma-separated event types (GET /v1/events/schema)",
            ),
            query(
                "account",
                ACCOUNT_SCHEMA,
                "only this account's events (a member: always its own)",
            ),
        ),
        answers=(
            Answer(
                200,
                "an endless stream: `id: <seq>`, `event: <type>`, "
                '`data: {"seq", "subject", "event"}`; a comment every 15 s',
                schema={"type": "string"},
                content_type="text/event-stream",
            ),
        ),
        errors=(400,),
    ),
    Route(
        "GET",
        "/v1/events/schema",
        "event_schema",
        "eventSchema",
        "JSON Schema of every event type",
        Access.MEMBER,
        answers=(Answer(200, "a JSON Schema (draft 2020-12)", schema=ANY_OBJECT),),
    ),
    Route(
        "GET",
        "/v1/events/subjects",
        "event_subjects",
        "eventSubjects",
        "The subject of each event type and each subject token's rule",
        Access.MEMBER,
        answers=(Answer(200, "the subject map (docs/events.subjects.json)", schema=ANY_OBJECT),),
    ),
    Route(
        "GET",
        "/v1/profiles",
        "list_profiles",
        "listProfiles",
        "Profiles",
        Access.MEMBER,
        answers=(Answer(200, body=ProfileList),),
    ),
    Route(
        "GET",
        "/v1/pools",
        "list_pools",
        "listPools",
        "Warm pools: size, members ready and coming up, claimed (docs/pools.md)",
        Access.MEMBER,
        answers=(Answer(200, "one entry per profile with a pool", items=PoolOut),),
    ),
    Route(
        "GET",
        "/v1/accounts",
        "list_accounts",
        "listAccounts",
        "Accounts and balances (admin)",
        Access.ADMIN,
        answers=(Answer(200, body=AccountList),),
        errors=(403,),
    ),
    Route(
        "GET",
        "/v1/accounts/{account}",
        "get_account",
        "getAccount",
        "One account's balance",
        Access.ACCOUNT,
        params=(ACCOUNT_PARAM, WAIT, AFTER),
        answers=(Answer(200, body=AccountOut),),
        errors=(400, 403, 404),
    ),
    Route(
        "POST",
        "/v1/accounts/{account}/credits",
        "grant",
        "grantCredits",
        "Grant credits (admin)",
        Access.ADMIN,
        params=(ACCOUNT_PARAM, REQUEST_ID),
        body=GrantBody,
        answers=(
            Answer(
                201,
                "Granted",
                AccountOut,
                links={"getAccount": _ACCOUNT_LINK, "accountLedger": _ACCOUNT_LINK},
            ),
        ),
        errors=(400, 403, 404, 413, 503),
    ),
    Route(
        "GET",
        "/v1/accounts/{account}/ledger",
        "account_ledger",
        "accountLedger",
        "The account's ledger entries, oldest first",
        Access.ACCOUNT,
        params=(
            ACCOUNT_PARAM,
            AFTER,
            query("limit", {"type": "integer", "minimum": 0, "maximum": 1000}, "page size"),
        ),
        answers=(Answer(200, body=LedgerPage),),
        errors=(400, 403, 404),
    ),
    Route(
        "POST",
        "/v1/sandboxes/{id}/checkpoints",
        "create_checkpoint",
        "checkpointSandbox",
        "Checkpoint a ready sandbox",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        answers=(
            Answer(
                202,
                "Accepted",
                CheckpointOut,
                links={
                    "getCheckpoint": _CHECKPOINT_LINK,
                    "deleteCheckpoint": _CHECKPOINT_LINK,
                    "restoreSandbox": {
                        "parameters": {"id": "$response.body#/sandbox_id"},
                        "requestBody": {"checkpoint": "$response.body#/id"},
                    },
                },
            ),
        ),
        errors=(400, 403, 404, 409, 503),
    ),
    Route(
        "GET",
        "/v1/sandboxes/{id}/checkpoints",
        "list_checkpoints",
        "listCheckpoints",
        "A sandbox's checkpoints",
        Access.SANDBOX,
        params=(SANDBOX_PARAM,),
        answers=(Answer(200, body=CheckpointList),),
        errors=(403, 404),
    ),
    Route(
        "POST",
        "/v1/sandboxes/{id}/restore",
        "restore",
        "restoreSandbox",
        "Restore a sandbox to one of its checkpoints",
        Access.SANDBOX,
        params=(SANDBOX_PARAM, REQUEST_ID),
        body=RestoreBody,
        answers=(Answer(202, "Accepted", SandboxOut),),
        errors=(400, 403, 404, 409, 413, 503),
    ),
    Route(
        "GET",
        "/v1/checkpoints/{cid}",
        "get_checkpoint",
        "getCheckpoint",
        "One checkpoint",
        Access.CHECKPOINT,
        params=(CHECKPOINT_PARAM, WAIT, AFTER),
        answers=(Answer(200, body=CheckpointOut),),
        errors=(400, 403, 404),
    ),
    Route(
        "DELETE",
        "/v1/checkpoints/{cid}",
        "delete_checkpoint",
        "deleteCheckpoint",
        "Delete a checkpoint's artifact",
        Access.CHECKPOINT,
        params=(CHECKPOINT_PARAM, REQUEST_ID),
        answers=(Answer(200, body=CheckpointOut),),
        errors=(400, 403, 404, 409, 503),
    ),
    Route(
        "POST",
        "/v1/accounts/{account}/webhooks",
        "register_webhook",
        "registerWebhook",
        "Register a webhook (signed, retried deliveries)",
        Access.ACCOUNT,
        params=(ACCOUNT_PARAM, REQUEST_ID),
        body=WebhookBody,
        answers=(
            Answer(
                201,
                "Registered; the secret is shown once",
                WebhookOut,
                links={
                    "removeWebhook": {"parameters": {"wid": "$response.body#/id"}},
                    "listWebhooks": _ACCOUNT_LINK,
                },
            ),
        ),
        errors=(400, 403, 404, 409, 413, 503),
    ),
    Route(
        "GET",
        "/v1/accounts/{account}/webhooks",
        "list_webhooks",
        "listWebhooks",
        "The account's webhooks",
        Access.ACCOUNT,
        params=(ACCOUNT_PARAM,),
        answers=(Answer(200, body=WebhookList),),
        errors=(403, 404, 503),
    ),
    Route(
        "DELETE",
        "/v1/webhooks/{wid}",
        "remove_webhook",
        "removeWebhook",
        "Remove a webhook",
        Access.WEBHOOK,
        params=(WEBHOOK_PARAM, REQUEST_ID),
        answers=(Answer(204, "Removed"),),
        errors=(400, 403, 404, 503),
    ),
    Route(
        "POST",
        "/v1/ledger/audit",
        "ledger_audit",
        "auditLedger",
        "Replay the ledger from sequence 1 and check its rules (admin)",
        Access.ADMIN,
        params=(
            query("account", ACCOUNT_SCHEMA, "only this account"),
            query(
                "ttl_grace",
                {"type": "number", "minimum": 0, "maximum": MAX_TTL_GRACE},
                "seconds a reservation may stay open after its sandbox's TTL "
                f"ended before it is a violation (default {DEFAULT_TTL_GRACE:g})",
            ),
        ),
        answers=(Answer(200, body=AuditReport),),
        errors=(400, 403),
    ),
    Route(
        "POST",
        "/v1/reconcile",
        "reconcile",
        "reconcile",
        "Sweep the hosts for what no live sandbox owns; report, or remove with remove=true (admin)",
        Access.ADMIN,
        params=(
            query(
                "remove",
                {"type": "string", "enum": list(LIVE_VALUES)},
                "1 or true: remove the orphans; 0 or false: only report; "
                "absent: the configured mode (SANDBOXER_RECONCILE)",
            ),
        ),
        answers=(Answer(200, body=SweepReport),),
        errors=(400, 403, 503),
    ),
    Route(
        "POST",
        "/v1/replay",
        "replay",
        "replay",
        "Rebuild the projection from sequence 1 and compare it with the live one (admin)",
        Access.ADMIN,
        answers=(Answer(200, body=VerifyReport),),
        errors=(403,),
    ),
    Route(
        "GET",
        "/v1/whoami",
        "whoami",
        "whoami",
        "The caller's token: name, account and role (open API: admin)",
        Access.MEMBER,
        answers=(Answer(200, body=Identity),),
    ),
    Route(
        "GET",
        "/metrics",
        "metrics_text",
        "metrics",
        "The service's metric series in the Prometheus text format (admin)",
        Access.ADMIN,
        answers=(
            Answer(
                200,
                "Prometheus text exposition format (docs/operations.md lists the series)",
                schema={"type": "string"},
                content_type="text/plain",
            ),
        ),
        errors=(403,),
    ),
    Route(
        "GET",
        "/healthz",
        "health",
        "health",
        "Health",
        Access.PUBLIC,
        answers=(Answer(200, body=Health),),
    ),
    Route(
        "GET",
        "/openapi.json",
        "openapi",
        "openapi",
        "This document",
        Access.PUBLIC,
        answers=(Answer(200, "OpenAPI 3.1", schema=ANY_OBJECT),),
    ),
)
# Routes by (method, path template); a HEAD request follows its GET route's rule.
ROUTE_INDEX: dict[tuple[str, str], Route] = {(r.method, r.path): r for r in ROUTES}
PUBLIC_PATHS = frozenset(r.path for r in ROUTES if r.access is Access.PUBLIC)
assert len(ROUTE_INDEX) == len(ROUTES), "a route is listed twice"


def openapi_document(
    *, auth: bool = True, profiles: ProfileCatalog | None = None
) -> dict[str, Any]:
    """OpenAPI 3.1: the paths generated from ROUTES (every route, parameter with its
    bounds, request body and answer, each error with the ErrorBody schema), the
    component schemas from the msgspec types they name.

    `auth` adds the bearer scheme with its 401/403 answers (as `serve` runs with
    tokens), `profiles` names the profiles and their largest TTL.
    tests/integration/test_fuzz_api.py holds the server to this document.
    """
    types: list[Any] = [*component_types(ROUTES), ErrorBody]
    (_, components) = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    # What msgspec cannot say: inputs are checked key by key (_check_inputs) so that
    # errors name the input; the profile list and webhook event types are known here.
    # A create names its profile, or a checkpoint whose profile it takes.
    components["CreateBody"]["anyOf"] = [
        {"required": ["profile"], "properties": {"profile": {"minLength": 1}}},
        {"required": ["from_checkpoint"], "properties": {"from_checkpoint": {"type": "string"}}},
    ]
    create = components["CreateBody"]["properties"]
    create["inputs"] = {
        "type": "object",
        "description": "the profile's inputs (GET /v1/profiles); values are strings",
        "maxProperties": MAX_INPUTS,
        "propertyNames": {"pattern": INPUT_NAME_RE.pattern},
        "additionalProperties": {
            "type": "string",
            "maxLength": MAX_INPUT_LENGTH,
            "pattern": PLAIN_TEXT,
        },
        "default": {},
    }
    create["ttl_seconds"] = {
        "anyOf": [
            {"type": "integer", "minimum": 1, "description": "at most the profile's max"},
            {"type": "null"},
        ],
        "default": None,
    }
    if profiles is not None:
        create["profile"]["enum"] = ["", *profiles.names()]
        tops = [profiles.get(name).max_ttl_seconds for name in profiles.names()]
        if tops:
            create["ttl_seconds"]["anyOf"][0]["maximum"] = max(tops)
    delivered = sorted(t.type_name() for t in _event_schema_types() if t.KIND != "webhook")
    webhook = components["WebhookBody"]["properties"]
    webhook["event_types"]["items"] = {"type": "string", "enum": delivered}
    webhook["event_types"]["maxItems"] = len(delivered)
    webhook["url"]["description"] = (
        "http(s) URL of a public address: loopback, private, link-local, multicast "
        "and reserved targets are refused unless an operator allows them "
        "(SANDBOXER_WEBHOOK_ALLOW_NETS)"
    )
    webhook["from"]["description"] = (
        "where deliveries start: `new` (default) the events after the registration, "
        "`beginning` the account's whole history"
    )
    out_props = components["WebhookOut"]["properties"]
    out_props["secret"]["description"] = (
        "the signing secret: only in the answer to the registration"
    )
    out_props["disabled"]["description"] = (
        "deliveries stopped after SANDBOXER_WEBHOOK_DISABLE_AFTER deliveries in a row "
        "failed; remove the webhook and register it again to resume"
    )

    paths = openapi_paths(ROUTES, ERROR_STATUSES, ErrorBody, auth=auth)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "sand-boxer",
            "version": "1",
            "description": "Errors are JSON: ErrorBody, naming the field at fault. Limits: "
            f"bodies {MAX_BODY_BYTES} bytes, nested at most {MAX_JSON_DEPTH} levels; "
            f"request line and each header {MAX_HEADER_BYTES} bytes, {MAX_HEADERS} "
            "headers (431 header_too_large above those, before routing); input values "
            f"{MAX_INPUT_LENGTH} characters without control characters but tab and "
            "newline. Patterns match the whole value; an integer field also takes an "
            "integral number such as 1882.0.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth:  # each operation states its own security (sandboxer.http.routes)
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
