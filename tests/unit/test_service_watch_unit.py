"""What the service watch records for a change (sandboxer/app/watch.py `change`), and
how the sandbox view folds the service events, without a server."""

from __future__ import annotations

import pytest

from events import (
    BecameReady,
    EventMeta,
    Provisioned,
    PublishedPort,
    RouteChosen,
    SandboxRequested,
    ServiceExited,
    ServiceRecovered,
    ServiceState,
    ServiceUnhealthy,
    envelope,
)
from events.base import Envelope
from extensions import ServiceStatus
from projections.sandboxes import SandboxView, evolve
from sandboxer.app.watch import change

META = EventMeta(actor="system:service-watch", correlation_id="c-1")
SID = "sbx-0123456789ab"


def env() -> Envelope:
    return envelope(SID, META)


EXITED = ServiceState(service="db", state="exited")


def running(health: str = "none") -> ServiceState:
    return ServiceState(service="db", state="running", health=health)


@pytest.mark.parametrize(
    ("before", "now", "recorded"),
    [
        (running(), ServiceStatus("db", "running"), None),
        (running(), ServiceStatus("db", "exited", exit_code=3), ServiceExited),
        (None, ServiceStatus("db", "exited", exit_code=3), ServiceExited),
        (EXITED, ServiceStatus("db", "exited"), None),
        (running("healthy"), ServiceStatus("db", "running", "unhealthy"), ServiceUnhealthy),
        (running("unhealthy"), ServiceStatus("db", "running", "unhealthy"), None),
        (running("unhealthy"), ServiceStatus("db", "running", "healthy"), ServiceRecovered),
        (running("unhealthy"), ServiceStatus("db", "running", "starting"), None),
        (
            ServiceState(service="db", state="exited"),
            ServiceStatus("db", "running"),
            ServiceRecovered,
        ),
        (None, ServiceStatus("db", "running", "healthy"), None),
        (running(), ServiceStatus("db", "missing"), ServiceExited),
    ],
)
def test_change_records_what_differs_once(
    before: ServiceState | None, now: ServiceStatus, recorded: type | None
) -> None:
    build = change(before, now)
    if recorded is None:
        assert build is None
    else:
        assert build is not None
        event = build(env())
        assert type(event) is recorded
        assert isinstance(event, (ServiceExited, ServiceUnhealthy, ServiceRecovered))
        assert event.service == "db"


def test_the_view_folds_the_reported_services() -> None:
    requested = SandboxRequested(
        **env(), profile="profile.x", extension="compose-ssh", inputs={}, ttl_seconds=60
    )
    view: SandboxView | None = evolve(None, 1, requested)
    view = evolve(view, 2, RouteChosen(**env(), extension="compose-ssh", reason="test"))
    view = evolve(view, 3, Provisioned(**env(), handle={}))
    port = PublishedPort(service="web", container_port=8080, host="10.0.0.5", host_port=40123)
    view = evolve(
        view,
        4,
        BecameReady(
            **env(),
            services=["db", "web"],
            service_states=[running("healthy"), ServiceState(service="web", state="running")],
            endpoints=[port],
        ),
    )
    assert view is not None and view.state == "ready" and view.endpoints == [port]
    view = evolve(view, 5, ServiceExited(**env(), service="web", exit_code=1))
    assert view is not None
    assert [(s.service, s.state, s.exit_code) for s in view.service_states] == [
        ("db", "running", None),
        ("web", "exited", 1),
    ]
    view = evolve(view, 6, ServiceUnhealthy(**env(), service="db", output="no"))
    view = evolve(view, 7, ServiceRecovered(**env(), service="web", state="running"))
    assert view is not None and view.state == "ready"
    assert [(s.service, s.state, s.health) for s in view.service_states] == [
        ("db", "running", "unhealthy"),
        ("web", "running", "none"),
    ]
