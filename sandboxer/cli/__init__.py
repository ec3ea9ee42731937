"""The `sandboxer` command line: a client of the HTTP API (and `serve`)."""

from sandboxer.cli.main import main

__all__ = ["main"]
