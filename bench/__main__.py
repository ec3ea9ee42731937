"""`python -m bench all|<name> [--quick] [--runs N]`: measure, print, write RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import replay
from bench.common import RESULTS_MD, Options, Section, save_sections

# name -> (module, what it measures); `all` runs them in this order.
BENCHMARKS: dict[str, str] = {
    "append": "append throughput: event store vs raw publish (and atomic batches)",
    "lifecycle": "1,000 saas-stub lifecycles at once vs raw publish of their events",
    "replay": "projection rebuild from 1,000,000 events vs a raw ordered consumer",
    "peer": "the same append and replay with the eventsourcing library (SQLite)",
    "api": "GET /v1/sandboxes[/{id}] under wrk vs a bare aiohttp handler",
    "compose": "compose-ssh provision (1 and 10 at once) vs ssh + rsync + compose up",
    "compose-local": "compose-local provision vs cp -a + compose up + poll (this machine)",
    "exec": "exec `true` and a file in and out through the API vs podman exec and rsync",
    "memory": "peak RSS of serve with 10,000 sandboxes and while streaming a checkpoint",
    "startup": "serve's start time and RSS on 0 to 10,000,000 events, before and after snapshots",
    "pool": "create -> ready from a warm compose-local pool vs a cold create; a burst of 20",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks against baselines measured in the same run; writes "
        "bench/RESULTS.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {name:10} {what}" for name, what in BENCHMARKS.items()),
    )
    parser.add_argument("benchmark", choices=["all", *BENCHMARKS], help="what to run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--runs", type=int, default=5, help="runs of each figure (median)")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="the RESULTS.md to write (default bench/RESULTS.md; with --quick a "
        "file in the temp folder, so a smoke run never overwrites the measurement)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where servers keep their data (temp)"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results = args.results or (
        Path(tempfile.gettempdir()) / "sandboxer-bench-quick" / "RESULTS.md"
        if args.quick
        else RESULTS_MD
    )
    options = Options(quick=args.quick, runs=args.runs)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        options.workdir = args.workdir
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    started = time.monotonic()
    try:
        run_all(names, options, results)
    finally:
        replay.forget_all()  # the stream that replay and peer share
    print(f"wrote {results} ({time.monotonic() - started:.0f} s)")
    return 0


def run_all(names: list[str], options: Options, results: Path) -> None:
    for name in names:
        print(f"== {name}: {BENCHMARKS[name]}", flush=True)
        module = importlib.import_module(f"bench.{name.replace('-', '_')}")
        run: Callable[[Options], Coroutine[Any, Any, Section]] = module.run
        began = time.monotonic()
        section = asyncio.run(run(options))
        section.seconds = time.monotonic() - began
        section.quick = options.quick
        section.runs = options.runs
        save_sections(results, [section], list(BENCHMARKS))
        print(f"   ({section.seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
