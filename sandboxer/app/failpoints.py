"""Named crash points for recovery drills and tests.

`SANDBOXER_FAILPOINTS=before-settle` makes the process SIGKILL itself when it
reaches that point, exactly as a power cut would: no clean-up, no flush. Unset in
production; the cost of an unused point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(p for p in os.environ.get("SANDBOXER_FAILPOINTS", "").split(",") if p)


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
