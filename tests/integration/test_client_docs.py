"""docs/client.md's examples run: every ```python block whose first line is
`# runs against: <profile>` is executed, as a user would run it (its own Python
process, SANDBOXER_URL pointing at a real serve). A `# needs: <route>` line skips the
block, saying so, while the server's OpenAPI document does not list that route."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest
import yaml

from sandboxer.client import AsyncClient
from tests.conftest import StartService
from tests.paths import ROOT

DOC = ROOT / "docs" / "client.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
RUNS = re.compile(r"^# runs against: (\S+)")
NEEDS = re.compile(r"^# needs: (\S+)", re.MULTILINE)


def runnable() -> list[tuple[str, str]]:
    blocks = []
    for n, match in enumerate(BLOCK.finditer(DOC.read_text()), 1):
        code = match.group(1)
        if RUNS.match(code):
            line = DOC.read_text()[: match.start()].count("\n") + 1
            blocks.append((f"block{n}-line{line}", code))
    return blocks


BLOCKS = runnable()
# The examples run as an admin of a server with tokens configured (ledger grants need it).
ADMIN = {"name": "docs", "token": "docs-admin-token-0123456789", "role": "admin"}


def test_the_doc_has_runnable_examples() -> None:
    assert len(BLOCKS) >= 8
    assert {RUNS.match(code).group(1) for _, code in BLOCKS} == {"profile.saas-stub"}  # type: ignore[union-attr]


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[n for n, _ in BLOCKS])
async def test_example_runs(start_service: StartService, code: str) -> None:
    api = await start_service(SANDBOXER_TOKENS=yaml.safe_dump([{**ADMIN, "account": "default"}]))
    for route in NEEDS.findall(code):
        async with AsyncClient(api.url, token=ADMIN["token"]) as client:
            if route not in (await client.openapi())["paths"]:
                pytest.skip(f"the server does not publish {route} yet (OpenAPI document)")
    env = {**os.environ, "SANDBOXER_URL": api.url, "SANDBOXER_TOKEN": ADMIN["token"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, f"{code}\n--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}"
