"""What the idle watch counts as the backend's use: a counter present in two samples
that moved by more than the extension's noise."""

from __future__ import annotations

from sandboxer.app.idle import moved


def test_a_counter_that_moved_is_use() -> None:
    assert moved({"web.cpu": 10, "web.net": 3}, {"web.cpu": 11, "web.net": 3})


def test_counters_that_stayed_are_not() -> None:
    assert not moved({"web.cpu": 10, "web.net": 3}, {"web.cpu": 10, "web.net": 3})


def test_a_counter_appearing_or_disappearing_is_not_use_by_itself() -> None:
    assert not moved({"web.cpu": 10}, {"web.cpu": 10, "job.cpu": 99})
    assert not moved({"web.cpu": 10, "job.cpu": 99}, {"web.cpu": 10})


def test_moves_within_the_noise_are_not_use() -> None:
    assert not moved({"web.net": 3}, {"web.net": 5}, noise=2)
    assert moved({"web.net": 3}, {"web.net": 6}, noise=2)
    assert moved({"web.net": 30}, {"web.net": 0}, noise=2)  # a restart: from 0 again
