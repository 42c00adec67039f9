"""Both runtimes write results.json in one shape: a run of one tiny setting on each gives the
same key paths everywhere but in the parts each runtime owns (``results.RUNTIME_KEYS``,
``RUNTIME_STATEMENTS``), with and without DP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from secure_fedora.core.config import ExperimentConfig
from secure_fedora.learning.devices import threads_applied
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import RunSettings
from secure_fedora.runtimes.inprocess import Simulation
from secure_fedora.runtimes.results import RUNTIME_KEYS, shared_key_paths
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    audit_folder,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)


def _both_runtimes(cfg: ExperimentConfig, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """results.json of ``cfg`` run in process and on Flower (an in-memory grid), as written."""
    dp = cfg.privacy.enabled
    rc = run_config(
        cfg, tmp_path, **{"result-dir": str(tmp_path / "res"), "reproducible-dp-noise": dp}
    )
    grid = InMemoryGrid(tmp_path / "nodes", rc, cfg.data.num_clients)
    server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    with threads_applied(cfg, default=1):
        Simulation(cfg, tmp_path / "inproc", keystore=tmp_path / "keystore").run()
    return (
        json.loads((tmp_path / "inproc" / "results.json").read_text()),
        json.loads((tmp_path / "res" / "results.json").read_text()),
    )


def _refuse_client_1_in_round_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 1's budget refuses its round-2 model release, in both runtimes (the refusal
    raised where a real one is: its release pipeline)."""
    from privacy.accounting import BudgetExceededError
    from secure_fedora.secure.private import FederationPrivacy

    original = FederationPrivacy._release

    def release(self, i, rel, pipeline, stop=None):  # type: ignore[no-untyped-def]
        c = self.clients[i]
        if c.index == 1 and rel.kind == "model" and rel.round == 2:

            def refuse(*_a: Any, **_k: Any) -> Any:
                raise BudgetExceededError(
                    client_id=c.client_id,
                    round=2,
                    mechanism="dpsgd",
                    epsilon_would_be=99.0,
                    budget=c.budget,
                    reason="budget exhausted (test)",
                )

            pipeline.run = refuse
        return original(self, i, rel, pipeline, stop=stop)

    monkeypatch.setattr(FederationPrivacy, "_release", release)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("dp", [True, False], ids=["dp", "plain"])
def test_both_runtimes_write_results_json_in_one_shape(
    tmp_path: Path, dp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``privacy.<method>`` held ``events`` (and ``recoveries``) in process and ``note`` on
    Flower, whose refusals were only run-level events; Flower's
    ``methods.<m>.extra.training_engine`` had ``reason`` but no ``runs``/``fallbacks``. Now
    every key path outside each runtime's own parts is in both: a DP run with a refused
    release and a run asking for the batched engine, each on both runtimes."""
    if dp:
        _refuse_client_1_in_round_2(monkeypatch)
        cfg = with_methods(dp_config(rounds=2, noise="reproducible"), "fedora")
    else:
        cfg = with_methods(tiny_config(rounds=2, engine="batched"), "fedora")
    local, grid = _both_runtimes(cfg, tmp_path)
    mine, theirs = shared_key_paths(local), shared_key_paths(grid)
    assert sorted(mine - theirs) == [] and sorted(theirs - mine) == []
    # what the runtimes own is what they declare
    for doc in (local, grid):
        shared = set(local) & set(grid)
        assert set(doc) - shared <= RUNTIME_KEYS[doc["runtime"]]
    engines = [doc["methods"]["fedora"]["extra"].get("training_engine") for doc in (local, grid)]
    if dp:
        assert local["privacy"] and grid["privacy"]
        sections = [doc["privacy"]["fedora"] for doc in (local, grid)]
        assert list(sections[0]) == list(sections[1])
        # the same refusal, in the same row shape, in both
        for section in sections:
            assert [(e["round"], e["client"], e["event"]) for e in section["events"]] == [
                (2, "client-001", "refused")
            ]
            assert "budget exhausted (test)" in section["events"][0]["detail"]
            assert section["model_fingerprint"] == sections[0]["model_fingerprint"]
            assert section["note"]
        # in process the run repairs its own ledgers; on Flower each node does: not stated
        assert sections[0]["recoveries"] == [] and sections[1]["recoveries"] is None
        assert engines == [None, None]  # the default loop: nothing asked, nothing to report
        # the audit reads both, and shows the refusal once in each (Flower's run-level event
        # of it is the same refusal)
        from audits.report import build_report

        reports = [
            build_report(tmp_path / "inproc"),
            build_report(
                audit_folder(tmp_path),
                allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                anchor=tmp_path / "res" / "anchor.json",
            ),
        ]
        for report in reports:
            assert report["verification"]["ok"] is True, report["verification"]
            refusals = [e for e in report["privacy_plan"]["events"] if "refused" in e["event"]]
            assert len(refusals) == 1 and refusals[0]["event"] == "refused"
    else:
        assert local["privacy"] == grid["privacy"] == {}
        assert [e["setting"] for e in engines] == ["batched", "loop"]
        assert (
            engines[0]["reason"] is None and "only the in-process runtime" in engines[1]["reason"]
        )
        # one training pass a round in each, whichever engine ran it
        assert [sum(e["runs"].values()) for e in engines] == [2, 2]
        assert engines[1]["runs"] == {"loop": 2} and engines[1]["fallbacks"] == []
