"""Terminal output for the CLI: aligned tables, colours and the --wait progress line.

Plain ANSI and the standard library, so `sandboxer` stays a fast, light client. Escape
codes (colours, the spinner, rewriting a line) are written only to a terminal and never
under NO_COLOR (https://no-color.org) or TERM=dumb: pipes, CI logs and scripts get plain
text."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import TextIO

RESET, BOLD, DIM = "\033[0m", "\033[1m", "\033[2m"
RED, GREEN, YELLOW, CYAN = "\033[31m", "\033[32m", "\033[33m", "\033[36m"

_TONES = {
    "ready": GREEN,
    "created": GREEN,
    "failed": RED,
    "rejected": RED,
    "destroyed": DIM,
    "deleted": DIM,
    **dict.fromkeys(
        (
            "requested",
            "reserving",
            "provisioning",
            "starting",
            "checkpointing",
            "restoring",
            "tearing_down",
        ),
        YELLOW,
    ),
}
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def styled(stream: TextIO) -> bool:
    """Whether `stream` gets escape codes: a person at a terminal who has not opted out."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # closed
        return False


def tone(value: str) -> str:
    """The colour of a state, checkpoint status or event type: failures stand out in red."""
    if value.endswith(("Failed", "Rejected")):
        return RED
    return _TONES.get(value, "")


def paint(text: str, code: str, on: bool) -> str:
    return f"{code}{text}{RESET}" if on and code and text else text


def elapsed(seconds: float) -> str:
    """Tenths while it is short (steps take seconds), minutes once it is not."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Table:
    """Rows padded to the widest cell seen so far and printed as they come: a whole list
    aligns; a stream (events page by page, or followed live) only shifts when a longer
    cell arrives. `min_widths` keeps a live stream from shifting on its usual cells."""

    def __init__(
        self,
        header: Sequence[str],
        *,
        right: Collection[int] = (),
        tone_column: int | None = None,
        min_widths: Sequence[int] = (),
        stream: TextIO | None = None,
    ) -> None:
        self.header = list(header)
        self.widths = [len(h) for h in header]
        for i, width in enumerate(min_widths):
            self.widths[i] = max(self.widths[i], width)
        self.right = right
        self.tone_column = tone_column
        self.stream = stream or sys.stdout
        self.colour = styled(self.stream)
        self.started = False

    def write(self, rows: Sequence[Sequence[object]]) -> None:
        cells = [[str(c) for c in row] for row in rows]
        if not cells:
            return
        for row in cells:
            self.widths = [max(w, len(c)) for w, c in zip(self.widths, row, strict=True)]
        lines = [] if self.started else [self._line(self.header, BOLD)]
        self.started = True
        lines += [self._line(row) for row in cells]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def _line(self, cells: list[str], code: str | None = None) -> str:
        last = len(cells) - 1
        parts = []
        for i, (cell, width) in enumerate(zip(cells, self.widths, strict=True)):
            if i in self.right:
                text = cell.rjust(width)
            else:
                text = cell if i == last else cell.ljust(width)
            colour = code if code is not None else tone(cell) if i == self.tone_column else ""
            parts.append(paint(text, colour, self.colour))
        return "  ".join(parts).rstrip()


class Progress:
    """The line a --wait shows on stderr: what it waits for, the running step, the elapsed
    time. On a terminal it is one line rewritten in place, with a spinner that a thread
    keeps turning while a long-poll blocks; elsewhere one plain line per change, so a CI
    log reads top to bottom. Leaving the `with` ends it on the last state shown."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = styled(self.stream)
        self.started = time.monotonic()
        self.shown: tuple[str, str, str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._frames = _SPINNER if _encodes(self.stream, _SPINNER) else "|/-\\"
        self._spinner = threading.Thread(target=self._spin, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        if self.live:
            self._spinner.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live:
            self._stop.set()
            self._spinner.join()
            with self._lock:
                if self.shown:
                    self.stream.write(f"\r\033[K{self._text(self._width())}\n")
                    self.stream.flush()

    def show(self, subject: str, state: str, step: str = "") -> None:
        """`subject: state [step]`; a plain stream gets a line only when that changes."""
        with self._lock:
            if (subject, state, step) == self.shown:
                return
            self.shown = (subject, state, step)
            if self.live:
                self._draw()
            else:
                self.stream.write(f"{self._text()}\n")
                self.stream.flush()

    def _spin(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                self._draw()

    def _draw(self) -> None:
        if not self.shown:
            return
        frame = self._frames[int((time.monotonic() - self.started) * 10) % len(self._frames)]
        text = self._text(self._width() - 2)
        self.stream.write(f"\r\033[K{paint(frame, CYAN, True)} {text}")
        self.stream.flush()

    def _text(self, width: int | None = None) -> str:
        """The line without escapes cut to `width` (a wrapped line cannot be rewritten),
        then coloured."""
        assert self.shown is not None
        subject, state, step = self.shown
        clock = f"({elapsed(time.monotonic() - self.started)})"
        head = f"{subject}: "
        tail = f" {step}" if step else ""
        if width is not None:
            room = max(0, width - len(head) - len(state) - len(clock) - 1)
            if len(tail) > room:
                tail = tail[: room - 3] + "..." if room > 8 else ""
        return f"{head}{paint(state, tone(state), self.live)}{tail} {paint(clock, DIM, self.live)}"

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return columns - 1 if columns > 0 else 79  # 0: a pseudo-terminal without a size


def _encodes(stream: TextIO, text: str) -> bool:
    """A terminal in an ASCII locale gets an ASCII spinner rather than an exception."""
    try:
        text.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True
