"""cancel_and_wait stops a task whose first cancel is lost, and says so when it can't."""

from __future__ import annotations

import asyncio

from sandboxer.tasks import cancel_and_wait


async def test_a_task_that_lost_its_first_cancel_is_cancelled_again() -> None:
    lost = 0

    async def swallows_one() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1  # as a cancel lost in a generator chain: it goes on waiting

    task = asyncio.create_task(swallows_one())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, each=0.05) is True
    assert task.cancelled() and lost == 1


async def test_a_task_that_never_stops_is_reported() -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await stop.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, attempts=3, each=0.02) is False
    stop.set()
    await task


async def test_a_finished_task_is_left_as_it_is() -> None:
    async def fails() -> None:
        raise ValueError("done")

    task = asyncio.create_task(fails())
    await asyncio.wait({task})
    assert await cancel_and_wait(task) is True
