"""The suite's collection order (tests/conftest.py): long tests first, so that xdist does not
start one of them when the other worker has nothing left to run."""

from __future__ import annotations

import pytest


def _long(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker("slow") or item.get_closest_marker("deploy"))


def test_slow_and_deploy_tests_are_collected_before_every_other(request: pytest.FixtureRequest
                                                                 ) -> None:
    """Every test marked ``slow`` or ``deploy`` in this session's collection comes before
    every other test (this one among them)."""
    items = request.session.items
    flags = [_long(item) for item in items]
    if not any(flags):
        pytest.skip("no slow or deploy test selected in this session")
    assert flags == sorted(flags, reverse=True), [
        item.nodeid for item, long in zip(items, flags, strict=True) if long][:5]
