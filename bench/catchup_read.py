"""`python -m bench.catchup_read [--events N] [--runs R] [--data DIR]`: the catch-up
reader alone, on a stream of N events (kept in DIR between runs when given).

The figures of `python -m bench replay` without the projection rebuild: the new
reader (`read_batches`, decoded, no fold) against the old one (`read(1)` through the
ordered consumer), and both without decoding. Filling a million events takes minutes,
so the data directory is kept: a second run on the same DIR only reads.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import line_for, nats_server
from bench.replay import SEGMENTS, _append_all, read_new, read_old, reader_figures


async def measure(events: int, runs: int, data: Path) -> None:
    async with nats_server(data, "default") as (_server, _nc, store):
        held = await store.last_seq()
        if held not in (0, events):
            raise SystemExit(f"{data} holds {held:,} events, not {events:,}: use another --data")
        if held == 0:
            print(f"  appending {events:,} events through the event store ...", flush=True)
            await _append_all(store, events, SEGMENTS)
        for figure in await reader_figures(store, events, runs):
            print(f"  {line_for(figure)}")
            print(f"    ours {[round(r) for r in figure.ours]}")
            print(f"    baseline {[round(r) for r in figure.baseline]}")
        # CPU time of this process per event: what a busy machine does not change much.
        for name, reader in (("catch-up", read_new), ("old", read_old)):
            cpu = time.process_time()
            await reader(store, events)
            per_event = (time.process_time() - cpu) / events * 1e6
            print(f"  {name} reader: {per_event:.2f} µs of this process's CPU per event")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup_read")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=None, help="kept data directory")
    args = parser.parse_args()
    data = args.data or Path(tempfile.gettempdir()) / f"sbx-catchup-{args.events}"
    try:
        asyncio.run(measure(args.events, args.runs, data))
    finally:
        if args.data is None:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
