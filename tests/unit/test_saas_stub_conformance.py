"""ext.saas-stub runs the shared extension conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from extensions import ExtensionRegistry, LoadedExtension, RuntimeInfo, StepContext
from extensions.conformance import ExtensionConformance, Leftovers


class TestSaasStubConformance(ExtensionConformance):
    failing_config: ClassVar[dict[str, Any] | None] = {"fail_hook": "provision"}

    @pytest.fixture
    def extension(self, tmp_path: Path) -> LoadedExtension:
        registry = ExtensionRegistry.discover(RuntimeInfo(tmp_path), entry_points=False)
        return registry.get("saas-stub")

    @pytest.fixture
    def make_context(
        self, extension: LoadedExtension
    ) -> Callable[[str, dict[str, Any]], StepContext]:
        def make(sandbox_id: str, overrides: dict[str, Any]) -> StepContext:
            return StepContext(
                sandbox_id=sandbox_id,
                profile="profile.saas-stub",
                inputs={"size": "small"},
                config=extension.config_for(overrides),
            )

        return make

    @pytest.fixture
    def leftovers(self, extension: LoadedExtension) -> Leftovers:
        async def left(sandbox_id: str) -> list[str]:
            stub = extension.adapter
            return [i for i in stub.instances() if i == sandbox_id]  # type: ignore[attr-defined]

        return left
