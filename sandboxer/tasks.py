"""Stopping a task for sure.

A cancel can be lost: Python 3.11 drops a cancel that lands while a task's wake-up
is already scheduled under some async-generator chains (seen with a stream's pump
inside `follow`: the task stayed "cancelling" on a pending future, and held the
server's shutdown, then `asyncio.run`'s exit). So cancel, wait a little, and cancel
again until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


async def cancel_and_wait(
    task: asyncio.Task[object], *, attempts: int = 10, each: float = 0.5
) -> bool:
    """Cancel `task` and wait until it is done; True if it ended. Its result or
    exception is retrieved (and dropped): the caller is stopping it."""
    for _ in range(attempts):
        if task.done():
            break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait({task}, timeout=each)
    if not task.done():
        log.error("task %s did not stop after %d cancels", task.get_name(), attempts)
        return False
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.result()
    return True
