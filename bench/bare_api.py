"""The API benchmark's baseline: a bare aiohttp server answering with fixed bytes.

`python -m bench.bare_api --port P --one FILE --list FILE`: `GET /v1/sandboxes/{id}`
answers with the bytes of FILE given as --one, `GET /v1/sandboxes` with --list's:
what our API answered for the same requests, without any of our code in the way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web


def app(one: bytes, listing: bytes) -> web.Application:
    async def get_one(_request: web.Request) -> web.Response:
        return web.Response(body=one, content_type="application/json")

    async def get_list(_request: web.Request) -> web.Response:
        return web.Response(body=listing, content_type="application/json")

    application = web.Application()
    application.router.add_get("/v1/sandboxes/{id}", get_one)
    application.router.add_get("/v1/sandboxes", get_list)
    return application


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--one", type=Path, required=True)
    parser.add_argument("--list", type=Path, required=True)
    args = parser.parse_args()
    web.run_app(
        app(args.one.read_bytes(), args.list.read_bytes()),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=lambda _text: print("bare api ready", flush=True),
    )


if __name__ == "__main__":
    main()
