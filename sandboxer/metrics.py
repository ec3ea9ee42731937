"""The service's metric series, exposed at GET /metrics in the Prometheus text format.

One `Metrics` per `Service`, each on its own `CollectorRegistry` (never the global
default one): tests and a cluster's in-process workers start several services in one
process, and each must count only its own work. The parts that count (event store,
leases, steps, webhooks, reconciler) take a `Metrics` as an optional argument; without
one they get a fresh, unscraped instance, so a store or a manager built by a test or a
benchmark counts into nothing anyone reads and needs no change.

What the read model knows (sandboxes by state, projection lag, snapshot age) is read
at scrape time by a collector (`watch_read_model`), never pushed: a scrape costs one
pass over the sandbox views, and nothing on the event path pays for it.
docs/operations.md describes every series.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: a hook runs from milliseconds (the stub) to many minutes (compose up, a VM).
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Seconds: an append is a JetStream publish acknowledged after an fsync.
APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class SandboxCounts(Protocol):
    def state_counts(self) -> dict[tuple[str, str], int]: ...


class ReadModel(Protocol):
    """What the scrape-time collector reads of the ProjectionRunner."""

    @property
    def projection(self) -> SandboxCounts: ...

    @property
    def last_seq(self) -> int: ...

    @property
    def stream_seq(self) -> int: ...

    def snapshot_age(self) -> float | None: ...


class PoolCount(Protocol):
    @property
    def profile(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def ready(self) -> int: ...
    @property
    def provisioning(self) -> int: ...
    @property
    def claimed(self) -> int: ...


class PoolCounts(Protocol):
    """What the scrape-time pool collector reads of the PoolKeeper."""

    def status(self) -> Iterable[PoolCount]: ...


class Metrics:
    """Every series of one service, on one registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._read_model: ReadModelCollector | None = None
        self._pools: PoolCollector | None = None
        self.events_appended = Counter(
            "sandboxer_events_appended",
            "Events appended to the event stream, by aggregate kind",
            ["kind"],
            registry=registry,
        )
        self.append_seconds = Histogram(
            "sandboxer_event_append_duration_seconds",
            "Time of one successful append (all its events acknowledged), by aggregate kind",
            ["kind"],
            buckets=APPEND_BUCKETS,
            registry=registry,
        )
        self.append_conflicts = Counter(
            "sandboxer_event_append_conflicts",
            "Appends refused because another writer appended to the aggregate first",
            ["kind"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "sandboxer_step_duration_seconds",
            "Time of one extension hook call under its manifest policy (retries included), "
            "by hook and outcome (ok, failed)",
            ["step", "outcome"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.lease_renewals = Counter(
            "sandboxer_lease_renewals",
            "Renewals of this worker's session key (its leases stay valid)",
            registry=registry,
        )
        self.lease_renewal_failures = Counter(
            "sandboxer_lease_renewal_failures",
            "Renewals that failed: error (timeout or NATS error), expired (the session "
            "key was gone or changed)",
            ["reason"],
            registry=registry,
        )
        self.leases_lost = Counter(
            "sandboxer_lease_sessions_lost",
            "Times this worker gave up every lease (its session expired or was not "
            "renewed in time)",
            registry=registry,
        )
        self.webhook_deliveries = Counter(
            "sandboxer_webhook_deliveries",
            "Webhook delivery attempts: ok, failed (a retry follows), final (the last "
            "attempt failed: dead-lettered)",
            ["outcome"],
            registry=registry,
        )
        self.reconcile_sweeps = Counter(
            "sandboxer_reconcile_sweeps",
            "Reconciliation sweeps run (periodic and on demand)",
            registry=registry,
        )
        self.orphans_found = Counter(
            "sandboxer_reconcile_orphans_found",
            "Orphans found by reconciliation sweeps, by extension and why (finished, unknown)",
            ["extension", "why"],
            registry=registry,
        )
        self.orphans_last_sweep = Gauge(
            "sandboxer_reconcile_orphans",
            "Orphans the last sweep found, by extension (set for each extension inventoried)",
            ["extension"],
            registry=registry,
        )
        self.inventory_errors = Counter(
            "sandboxer_reconcile_inventory_errors",
            "Sweeps in which an extension's inventory failed, by extension",
            ["extension"],
            registry=registry,
        )
        self.pool_creates = Counter(
            "sandboxer_pool_creates",
            "Creates of a profile with a pool handled here, by profile and outcome: "
            "warm (claimed a member) or cold",
            ["profile", "outcome"],
            registry=registry,
        )
        build = Gauge(
            "sandboxer_build_info",
            "Always 1: the running version of sand-boxer and Python",
            ["version", "python"],
            registry=registry,
        )
        build.labels(_version(), platform.python_version()).set(1)

    def watch_read_model(self, runner: ReadModel) -> None:
        """Expose what `runner` knows, read at each scrape: one read model per service,
        so a second call (a service started again) replaces the first."""
        if self._read_model is not None:
            self.registry.unregister(self._read_model)
        self._read_model = ReadModelCollector(runner)
        self.registry.register(self._read_model)

    def watch_pools(self, pools: PoolCounts) -> None:
        """Expose each pool's members as `pools` counts them, read at each scrape."""
        if self._pools is not None:
            self.registry.unregister(self._pools)
        self._pools = PoolCollector(pools)
        self.registry.register(self._pools)

    def exposition(self) -> bytes:
        """Every series in the Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)

    def step(self, step: str, ok: bool, seconds: float) -> None:
        self.step_seconds.labels(step, "ok" if ok else "failed").observe(seconds)

    def appended(self, kind: str, events: int, seconds: float) -> None:
        self.events_appended.labels(kind).inc(events)
        self.append_seconds.labels(kind).observe(seconds)

    def sweep(
        self,
        checked: Iterable[str],
        orphans: Iterable[tuple[str, str]],
        errors: Iterable[str],
    ) -> None:
        """One sweep's findings: the extensions inventoried, (extension, why) of each
        orphan, and the extensions whose inventory failed."""
        self.reconcile_sweeps.inc()
        per_extension: dict[str, int] = dict.fromkeys(checked, 0)
        for extension, why in orphans:
            self.orphans_found.labels(extension, why).inc()
            per_extension[extension] = per_extension.get(extension, 0) + 1
        for extension, count in per_extension.items():
            self.orphans_last_sweep.labels(extension).set(count)
        for extension in errors:
            self.inventory_errors.labels(extension).inc()


class ReadModelCollector(Collector):
    """Sandboxes by state and extension, the projection's position and lag, and the
    snapshot's age, as the read model has them at the moment of the scrape."""

    def __init__(self, runner: ReadModel) -> None:
        self.runner = runner

    def describe(self) -> Iterable[Metric]:
        return self._families({}, 0, 0, None)

    def collect(self) -> Iterable[Metric]:
        runner = self.runner
        return self._families(
            runner.projection.state_counts(),
            runner.last_seq,
            runner.stream_seq,
            runner.snapshot_age(),
        )

    @staticmethod
    def _families(
        counts: Mapping[tuple[str, str], int],
        applied: int,
        known: int,
        snapshot_age: float | None,
    ) -> list[Metric]:
        sandboxes = GaugeMetricFamily(
            "sandboxer_sandboxes",
            "Sandboxes in the read model by state and extension (finished ones included)",
            labels=["state", "extension"],
        )
        for (state, extension), count in sorted(counts.items()):
            sandboxes.add_metric([state, extension], count)
        snapshot = GaugeMetricFamily(
            "sandboxer_read_model_snapshot_age_seconds",
            "Seconds since the newest read-model snapshot was written or loaded "
            "(no sample before the first one)",
        )
        if snapshot_age is not None:
            snapshot.add_metric([], snapshot_age)
        return [
            sandboxes,
            GaugeMetricFamily(
                "sandboxer_projection_lag_events",
                "Events written to the stream that the projection has not applied yet",
                value=max(known - applied, 0),
            ),
            GaugeMetricFamily(
                "sandboxer_projection_applied_seq",
                "Stream sequence of the last event the projection applied",
                value=applied,
            ),
            GaugeMetricFamily(
                "sandboxer_stream_seq",
                "Highest stream sequence the read model knows was written",
                value=known,
            ),
            snapshot,
        ]


class PoolCollector(Collector):
    """Each pool's size and its members by status, as the keeper counts them at the
    moment of the scrape."""

    def __init__(self, pools: PoolCounts) -> None:
        self.pools = pools

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families(list(self.pools.status()))

    @staticmethod
    def _families(pools: list[PoolCount]) -> list[Metric]:
        size = GaugeMetricFamily(
            "sandboxer_pool_size", "Members each pool is kept at, by profile", labels=["profile"]
        )
        members = GaugeMetricFamily(
            "sandboxer_pool_members",
            "Live members of each pool by status: ready or provisioning (unclaimed), "
            "claimed (taken by a create, still live)",
            labels=["profile", "status"],
        )
        for pool in pools:
            size.add_metric([pool.profile], pool.size)
            members.add_metric([pool.profile, "ready"], pool.ready)
            members.add_metric([pool.profile, "provisioning"], pool.provisioning)
            members.add_metric([pool.profile, "claimed"], pool.claimed)
        return [size, members]


def _version() -> str:
    try:
        return metadata.version("sand-boxer")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"
