"""The metric series: each one documented, each service's on a registry of its own,
the read model's read at the scrape."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sandboxer.app.read_model import ProjectionRunner
from sandboxer.metrics import Metrics
from sandboxer.store.memory_store import InMemoryEventStore
from tests.paths import ROOT


def families(metrics: Metrics) -> dict[str, tuple[str, list[Sample]]]:
    """Family name -> (type, samples), as a Prometheus scrape parses them."""
    text = metrics.exposition().decode()
    return {f.name: (f.type, list(f.samples)) for f in text_string_to_metric_families(text)}


@dataclass(frozen=True)
class Pool:
    profile: str
    size: int
    ready: int
    provisioning: int
    claimed: int


class Pools:
    """What a PoolKeeper counts, as the pool collector reads it."""

    def __init__(self, *pools: Pool) -> None:
        self.pools = list(pools)

    def status(self) -> list[Pool]:
        return self.pools


def watched(pools: Pools | None = None) -> Metrics:
    metrics = Metrics()
    metrics.watch_read_model(ProjectionRunner(InMemoryEventStore()))
    metrics.watch_pools(pools or Pools(Pool("profile.warm", 2, 1, 1, 3)))
    return metrics


def test_every_series_is_in_operations_md() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    found = families(watched())
    assert "sandboxer_sandboxes" in found and "sandboxer_events_appended" in found
    for name, (kind, _) in found.items():
        if name.endswith("_created"):
            continue  # the start time prometheus_client adds to a counter (documented once)
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"| `{exposed}` | {kind} |" in doc, f"{exposed} ({kind}) is not documented"


def test_each_metrics_counts_on_its_own_registry() -> None:
    one, other = Metrics(), Metrics()
    one.appended("sandbox", 3, 0.002)
    assert one.registry is not other.registry

    def appended(metrics: Metrics) -> float:
        _, samples = families(metrics)["sandboxer_events_appended"]
        return sum(s.value for s in samples if s.name.endswith("_total"))

    assert appended(one) == 3
    assert appended(other) == 0


def test_the_read_model_is_read_at_the_scrape() -> None:
    found = families(watched())
    _, lag = found["sandboxer_projection_lag_events"]
    assert [s.value for s in lag] == [0]
    _, snapshot = found["sandboxer_read_model_snapshot_age_seconds"]
    assert snapshot == [], "no snapshot yet: no sample"
    _, sandboxes = found["sandboxer_sandboxes"]
    assert sandboxes == []


def test_watching_another_read_model_replaces_the_first() -> None:
    metrics = watched()
    metrics.watch_read_model(ProjectionRunner(InMemoryEventStore()))  # a restart
    _, lag = families(metrics)["sandboxer_projection_lag_events"]
    assert len(lag) == 1


def test_a_sweep_sets_the_orphans_of_each_inventoried_extension() -> None:
    metrics = Metrics()
    metrics.sweep(["saas-stub", "compose-ssh"], [("saas-stub", "unknown")], ["vm-packer"])
    metrics.sweep(["saas-stub"], [], [])
    _, orphans = families(metrics)["sandboxer_reconcile_orphans"]
    assert {s.labels["extension"]: s.value for s in orphans} == {"saas-stub": 0, "compose-ssh": 0}
    _, found = families(metrics)["sandboxer_reconcile_orphans_found"]
    totals = [s for s in found if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in totals] == [
        ({"extension": "saas-stub", "why": "unknown"}, 1)
    ]


def test_the_pools_are_read_at_the_scrape() -> None:
    pools = Pools(Pool("profile.warm", 2, 1, 1, 3))
    metrics = watched(pools)
    _, members = families(metrics)["sandboxer_pool_members"]
    assert {s.labels["status"]: s.value for s in members} == {
        "ready": 1,
        "provisioning": 1,
        "claimed": 3,
    }
    pools.pools = [Pool("profile.warm", 2, 2, 0, 3), Pool("profile.other", 1, 0, 1, 0)]
    _, size = families(metrics)["sandboxer_pool_size"]
    assert {s.labels["profile"]: s.value for s in size} == {"profile.warm": 2, "profile.other": 1}
    _, members = families(metrics)["sandboxer_pool_members"]
    assert len(members) == 6
