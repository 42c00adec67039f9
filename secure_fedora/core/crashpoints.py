"""Named crash points for crash-injection tests (inert unless armed).

The runtime calls :func:`crash_point` at the places where a crash matters for exactly-once
releases (see ``POINTS``). Nothing happens unless a point is armed, either

- in a subprocess, by the environment variable ``SECURE_FEDORA_CRASH_AT="<point>[@<n>]"``:
  the process kills itself with SIGKILL (as ``kill -9`` would: no ``finally`` blocks, no
  flushing, no lock release) at the n-th time (default 1) it reaches ``<point>``; or
- in process, by :func:`arm`: :class:`InjectedCrash` (a BaseException, so no ``except
  Exception`` swallows it) is raised there instead.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV_VAR", "POINTS", "InjectedCrash", "arm", "crash_point", "disarm"]

ENV_VAR = "SECURE_FEDORA_CRASH_AT"

POINTS: dict[str, str] = {
    "ledger_staged": "after one client's empty ledger is created in the hidden folder that"
                     " becomes its method's ledger folder (a Flower node: in its method"
                     " folder, before its model record), before the next",
    "ledgers_created": "after a method's ledger folder is renamed into place (a Flower node:"
                       " its model record written), before its ledgers are opened",
    "keys_published": "after a DP method's ledgers are opened and its public keys published",
    "summary": "after one client's relatedness summary left it, before the next client's",
    "gate": "after a release's ledger entries are fsynced, before its journal record",
    "release": "after a release's journal record is fsynced (inside a round's admission"
               " batch: written, its fsync issued), before the release leaves",
    "train": "after one client's local training in a round, before the next",
    "evaluate": "after evaluating one client, before the next",
    "checkpoint": "after a round, before its checkpoint is written (a Flower ServerApp: also"
                  " after its first contact, a method's setup and a method)",
    "checkpoint_written": "right after a round's checkpoint is written (a Flower ServerApp:"
                          " any of its checkpoints)",
    "between_methods": "after a method finished (outcome checkpointed), before the next one",
    "results": "after every method finished, before results.json is written",
}

_armed: tuple[str, int] | None = None
_hits: dict[str, int] = {}


class InjectedCrash(BaseException):
    """Raised at an armed crash point in process (tests only)."""


def _parse(spec: str) -> tuple[str, int]:
    name, _, count = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV_VAR}: unknown crash point {name!r}; known: {sorted(POINTS)}")
    n = int(count) if count else 1
    if n < 1:
        raise ValueError(f"{ENV_VAR}: the hit count must be >= 1, got {count!r}")
    return name, n


def arm(spec: str) -> None:
    """Raise :class:`InjectedCrash` at the n-th hit of a point (``"<point>[@<n>]"``)."""
    global _armed
    _armed = _parse(spec)
    _hits.clear()


def disarm() -> None:
    """Disarm the in-process crash point and reset the hit counters."""
    global _armed
    _armed = None
    _hits.clear()


def crash_point(name: str) -> None:
    """Crash here if ``name`` is armed and reached for the armed time; otherwise nothing."""
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    spec = os.environ.get(ENV_VAR)
    armed = _parse(spec) if spec else _armed
    if armed is None or armed[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != armed[1]:
        return
    if spec:
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedCrash(f"injected crash at {name!r} (hit {armed[1]})")
