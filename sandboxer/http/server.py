"""The HTTP server around the API: errors of the HTTP parser answered like every other.

aiohttp's parser refuses a request line or header over its limit (and other malformed
requests) before any handler or middleware runs, with a plain-text 400 whose body is
the parser's message, and that message quotes up to 100 bytes of the offending line:
an `Authorization` header over the limit came back with its token. `ApiRunner` serves
the app with a protocol whose `handle_error` answers with the API's JSON error and
quotes nothing of the request, neither in the answer nor in the log.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from sandboxer.http.api import MAX_HEADER_BYTES, MAX_HEADERS, json_response
from sandboxer.wire import ErrorBody, ErrorDetail

log = logging.getLogger(__name__)


def parser_error(exc: BaseException | None, status: int) -> ErrorDetail:
    """The JSON error for what the HTTP parser refused, naming the limit, not the data."""
    if isinstance(exc, LineTooLong):
        return ErrorDetail(
            431,
            "header_too_large",
            f"the request line or a header is longer than {MAX_HEADER_BYTES} bytes",
        )
    if isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
        return ErrorDetail(431, "header_too_large", f"more than {MAX_HEADERS} headers")
    if status == HTTPStatus.INTERNAL_SERVER_ERROR:
        return ErrorDetail(500, "internal_error", "internal error; the server log has details")
    return ErrorDetail(status, "bad_request", "malformed HTTP request")


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's `handle_error`, minus the echo: the parser's message (which quotes
        the request) is neither sent nor logged; only the exception's class is logged."""
        if request.writer.output_size > 0:  # some of an answer went out: nothing to fix
            raise ConnectionError("response already started; cannot send an error")
        detail = parser_error(exc, status)
        if detail.status == HTTPStatus.INTERNAL_SERVER_ERROR:
            log.error("error handling request from %s", request.remote, exc_info=exc)
        else:
            log.info(
                "refused a malformed request from %s: %s (%s)",
                request.remote,
                detail.code,
                type(exc).__name__,
            )
        response = json_response(ErrorBody(detail), detail.status)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """An AppRunner whose connections answer parser errors in JSON (see above)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds a plain Server (with its handler_args); only the protocol
        # class it makes per connection differs, and the subclass adds no state.
        server.__class__ = _JsonErrorServer
        return server
