"""The operator dashboard: static HTML, CSS and JS modules served at `/`.

The page holds no data, so serving it needs no token: every data call it makes goes
to the API with the bearer token the operator typed, through the API's own auth. The
files ship inside the package (sandboxer/http/static/), so the page works with no network
and no build step. A strict Content-Security-Policy allows this origin only, and no
inline script or style.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")
PREFIX = "/ui/"
# The dashboard's routes: not part of the API, so not in its OpenAPI document.
ROUTES = frozenset({"/", PREFIX + "{name}"})
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgrade shows at once
}


def _files() -> dict[str, tuple[bytes, str]]:
    """The servable files by name, read once: a fixed list, so no request reaches
    another path, and serving does no file I/O."""
    return {
        path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
        for path in sorted(STATIC_DIR.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


def is_public(path: str) -> bool:
    """The page and its assets need no token (they hold no data)."""
    return path == "/" or path.startswith(PREFIX)


def add_routes(app: web.Application) -> None:
    files = _files()

    def serve(name: str) -> web.Response:
        found = files.get(name)
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers=HEADERS,
        )

    async def index(request: web.Request) -> web.Response:
        return serve("index.html")

    async def asset(request: web.Request) -> web.Response:
        return serve(request.match_info["name"])

    app.router.add_get("/", index)
    app.router.add_get(PREFIX + "{name}", asset)
