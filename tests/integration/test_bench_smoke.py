"""Each benchmark of bench/ runs end to end at tiny sizes (`--quick`, one run) against
the real components and writes its section of a RESULTS.md. Not a measurement: the
figures of a smoke run mean nothing, only that every benchmark still works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from tests.infra import Podman
from tests.paths import ROOT

WORKING_DIR = "com.docker.compose.project.working_dir"


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_runs_quick(name: str, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    argv = [sys.executable, "-m", "bench", name, "--quick", "--runs", "1"]
    argv += ["--results", str(results), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sections = json.loads(results.with_suffix(".json").read_text())
    figures = sections[name]["figures"]
    assert figures, f"{name} measured nothing"
    for figure in figures:
        assert figure["ours"] and figure["baseline"], figure
        assert all(v > 0 for v in figure["ours"] + figure["baseline"]), figure
    text = results.read_text()
    assert f"## {name}:" in text and "quick run" in text
    if name in ("compose", "compose-local", "memory", "exec"):  # nothing of the run may stay up
        listed = Podman.prepare(tmp_path / "podman")("ps", "-a", "--format", "json")
        left = [
            c["Names"]
            for c in json.loads(listed.stdout or "[]")
            if str(tmp_path) in (c.get("Labels") or {}).get(WORKING_DIR, "")
        ]
        assert not left, f"{name} left containers running: {left}"
