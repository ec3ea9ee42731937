"""Profile the lifecycle benchmark's run: `python -m bench.profile_lifecycle [always|default]
[N] [--pyinstrument OUT.html]`.

The same service and driver as `python -m bench lifecycle` (bench/lifecycle.py), one
run of N lifecycles at once after 50 warm-up ones. Prints the rate, the Python
process's CPU time beside the wall time, the NATS requests per lifecycle on the
service's connection (by kind: sandbox and ledger appends, KV, JetStream API), and
the time the ledger's writer spent appending. With `--pyinstrument`, writes the
profile of the run as HTML (bench/PROFILING.md, round 4).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lifecycle import ESTIMATE, META, Lifecycles, service_settings
from events import Event
from sandboxer.bootstrap import Service


def kind(subject: str) -> str:
    tokens = subject.split(".")
    if subject.startswith("$KV."):
        return f"KV {tokens[1]}"
    if subject.startswith("$JS.API."):
        return "JetStream API " + ".".join(tokens[2:4])
    if subject.startswith("sandboxer."):
        return f"append {tokens[1]}"
    return tokens[0]


async def profile(sync: str, n: int, html: bool) -> str | None:
    """The run's figures printed; the pyinstrument profile as HTML if `html`."""
    with tempfile.TemporaryDirectory() as folder:
        service = Service(service_settings(folder, sync, SANDBOXER_RECONCILE="off"))
        await service.start()
        try:
            assert service.manager is not None and service.nc is not None
            await service.manager.ledger.grant("default", n * ESTIMATE * 2, META)
            driver = Lifecycles(service)
            await driver.run(50)
            nc = service.nc
            requests: collections.Counter[str] = collections.Counter()
            request = nc.request

            async def counted(subject: str, *args: Any, **kwargs: Any) -> Any:
                requests[kind(subject)] += 1
                return await request(subject, *args, **kwargs)

            book = service.manager.ledger
            store = book.store
            appending = 0.0

            class TimedStore:
                """The ledger's store, timing its appends (the account's chain)."""

                def __getattr__(self, name: str) -> Any:
                    return getattr(store, name)

                async def append(self, events: Sequence[Event], expected: int) -> list[int]:
                    nonlocal appending
                    started = time.perf_counter()
                    try:
                        return await store.append(events, expected)
                    finally:
                        appending += time.perf_counter() - started

            nc.request = counted  # type: ignore[method-assign]
            book.store = TimedStore()
            profiler = None
            if html:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="disabled")
                profiler.start()
            cpu = time.process_time()
            started = time.perf_counter()
            try:
                await driver.run(n)
            finally:
                seconds = time.perf_counter() - started
                cpu = time.process_time() - cpu
                if profiler is not None:
                    profiler.stop()
                nc.request = request  # type: ignore[method-assign]
                book.store = store
            print(f"{sync}: {n} lifecycles in {seconds:.2f} s = {n / seconds:.0f} lifecycles/s")
            print(f"  Python CPU {cpu:.2f} s ({cpu / seconds:.0%} of the wall time)")
            print(f"  ledger appending {appending:.2f} s ({appending / seconds:.0%} of it)")
            for name, count in sorted(requests.items()):
                print(f"  {count / n:6.2f} requests per lifecycle: {name}")
            print(f"  {sum(requests.values()) / n:6.2f} in all")
            return profiler.output_html() if profiler is not None else None
        finally:
            await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_lifecycle")
    parser.add_argument("sync", nargs="?", default="always", choices=["always", "default"])
    parser.add_argument("n", nargs="?", type=int, default=1000)
    parser.add_argument("--pyinstrument", metavar="OUT.html")
    args = parser.parse_args()
    html = asyncio.run(profile(args.sync, args.n, args.pyinstrument is not None))
    if html is not None:
        Path(args.pyinstrument).write_text(html)


if __name__ == "__main__":
    main()
