"""The JetStream event store, counting what it appends (sandboxer_events_appended,
sandboxer_event_append_duration_seconds, sandboxer_event_append_conflicts).

Every append of the service goes through `append`, so wrapping it here counts them
all without touching the store itself: tests, benchmarks and the validator keep
building a plain `JetStreamEventStore`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from nats.aio.client import Client as NatsClient

from events import Event
from sandboxer.metrics import Metrics
from sandboxer.store.event_store import ConcurrencyConflict, JetStreamEventStore


class MeteredEventStore(JetStreamEventStore):
    """A JetStreamEventStore whose appends are counted and timed in `metrics`."""

    def __init__(self, nc: NatsClient, metrics: Metrics, *, replicas: int = 1) -> None:
        super().__init__(nc, replicas=replicas)
        self.metrics = metrics

    async def append(self, events: Sequence[Event], expected_version: int) -> list[int]:
        if not events:
            return []
        kind = events[0].KIND  # the aggregate kind: sandbox, ledger, webhook, ...
        started = time.perf_counter()
        try:
            seqs = await super().append(events, expected_version)
        except ConcurrencyConflict:
            self.metrics.append_conflicts.labels(kind).inc()
            raise
        self.metrics.appended(kind, len(seqs), time.perf_counter() - started)
        return seqs
