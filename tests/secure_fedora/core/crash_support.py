"""Crash injection for tests: a block that must crash at an armed crash point."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from secure_fedora.core import crashpoints


@contextlib.contextmanager
def crashes_at(spec: str) -> Iterator[None]:
    """Arm the in-process crash point ``spec`` (``"<point>[@<n>]"``) for the block, which
    must end there in :class:`~secure_fedora.core.crashpoints.InjectedCrash` (the test fails
    otherwise); the point is disarmed afterwards, whatever happened."""
    crashpoints.arm(spec)
    try:
        with pytest.raises(crashpoints.InjectedCrash):
            yield
    finally:
        crashpoints.disarm()
