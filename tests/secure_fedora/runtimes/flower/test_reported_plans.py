"""Each client reports its plan (noise multipliers, accountant) with its signed ledger record;
the server states it in results.json, stops the run on a plan the config does not admit, and
states the config's calibration, marked, for a client that reports none (an older ClientApp)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.protocol import DeployError, RunSettings
from secure_fedora.runtimes.inprocess import load_checkpoint
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)


def _run(tmp_path: Path) -> dict[str, Any]:
    cfg = dp_config(rounds=1)
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True,
                                      "result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir()
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    return server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


def _reporting(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Client 1's ledger records pass through ``change`` (a dict -> dict) before signing."""
    real = client_app._ledger_record

    def record(privacy: Any, **kwargs: Any) -> ConfigRecord | None:
        out = real(privacy, **kwargs)
        if out is None or privacy.sole.index != 1:
            return out
        return ConfigRecord(change(dict(out)))
    monkeypatch.setattr(client_app, "_ledger_record", record)


@pytest.mark.usefixtures("task_identity")
def test_every_client_row_states_the_plan_the_client_reported(tmp_path: Path) -> None:
    results = _run(tmp_path)
    rows = results["privacy"]["fedora"]["clients"]
    (plan,) = results["privacy"]["fedora"]["plan"]
    assert all(r["plan_reported"] and r["accountant"] == plan["accountant"] for r in rows)
    # the plan states the noise the clients drew exactly (it was rounded to 6 decimals: more)
    assert plan["figures"] == "exact" and round(plan["noise_multiplier"], 6) != plan["noise_multiplier"]
    assert all(r["noise_multiplier"] == plan["noise_multiplier"] for r in rows)
    assert all(f"sigma={r[k]!r})" in " ".join(plan["releases"])
               for r in rows for k in ("summary_noise", "lambda_noise"))
    assert all(r["summary_noise"] > 0 and r["lambda_noise"] > 0 for r in rows)
    assert "prv_refine" not in plan


@pytest.mark.usefixtures("task_identity")
def test_a_client_reporting_no_plan_is_stated_with_the_config_calibration_marked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older ClientApp's ledger record holds only entries and head: its row states the
    config's calibration (as every row did before), every mechanism's noise and the
    accountant included, the keys of every other row, and says so (plan_reported false)."""
    _reporting(monkeypatch, lambda r: {"entries": r["entries"], "head": r["head"]})
    section = _run(tmp_path)["privacy"]["fedora"]
    rows = section["clients"]
    assert [r["plan_reported"] for r in rows] == [True, False, True]
    assert list(rows[1]) == list(rows[0])
    for key in ("noise_multiplier", "summary_noise", "lambda_noise", "mechanism_noise"):
        assert rows[1][key] == rows[0][key], key
    assert rows[1]["accountant"] == section["accountant"]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("key", "value", "named"), [
    ("noise-multiplier", 0.5, "reports noise multiplier 0.5"),
    ("accountant", "gdp", "reports its releases accounted under 'gdp'")])
def test_a_client_plan_the_config_does_not_admit_stops_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: Any,
        named: str) -> None:
    """A client on another version (other noise or accountant) would have results.json state
    a plan it did not use, or a figure the config does not imply: the run stops naming it."""
    _reporting(monkeypatch, lambda r: {**r, key: value})
    with pytest.raises(DeployError, match=f"fedora: client client-001 {named}"):
        _run(tmp_path)
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_client_noise_off_the_calibration_in_its_last_bit_stops_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reported noise multiplier within 1e-9 of the config's calibration was taken as it,
    and results.json's plan stated a float that client's ledger does not hold."""
    _reporting(monkeypatch, lambda r: {**r, "noise-multiplier":
                                       math.nextafter(r["noise-multiplier"], math.inf)})
    with pytest.raises(DeployError, match="fedora: client client-001 reports noise multiplier"):
        _run(tmp_path)
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_plan_differing_only_in_its_summary_noise_is_refused_naming_both_figures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose summary noise alone differs was refused with the config's DP-SGD
    noise only, the same figure the client reported: the error did not say what differs.
    Both sides now state every mechanism's noise."""
    _reporting(monkeypatch, lambda r: {**r, "summary-noise": r["summary-noise"] * 1.01})
    with pytest.raises(DeployError) as refused:
        _run(tmp_path)
    text = str(refused.value)
    said, stated = text.split(" reports ")[1].split(", the config calibrates ")
    assert said.split(" (")[0] == stated.split(" (")[0]  # the same DP-SGD noise
    summary = [float(part.split("summary ")[1].split(",")[0]) for part in (said, stated)]
    assert math.isclose(summary[0], summary[1] * 1.01), text
    assert not (tmp_path / "res" / "results.json").exists()



def _encrypted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, servers: list[Any],
                   seen: dict[int, dict[str, Any]] | None = None) -> None:
    """A DP run whose relatedness is FEDORA's noised summaries under CKKS: each client's
    first ledger record reaches the server with its encrypted summary. ``seen`` is put as the
    ledger states the server received before (client -> state); the server is appended to
    ``servers``."""
    data = dp_config(rounds=1).model_dump(mode="json", exclude_none=True)
    data["fedora"].update(relatedness="noised+encrypted", k=1)
    cfg = parse_config(data)
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True,
                                      "result-dir": str(tmp_path / "res")})
    (tmp_path / "res").mkdir()
    real = server_app._encrypted_overlaps

    def overlaps(grid: Any, server: Any, *args: Any) -> Any:
        servers.append(server)
        server.privacy.setdefault(server.scope, {}).update(seen or {})
        return real(grid, server, *args)
    monkeypatch.setattr(server_app, "_encrypted_overlaps", overlaps)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_an_encrypted_summary_reply_whose_ledger_went_back_stops_the_run_naming_the_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round replies are checked against the ledger state the server last received from the
    client; the encrypted summary's reply was not, and its record replaced the older one."""
    seen = {"epsilon_spent": 0.5, "epsilon_budget": 8.0, "ledger_entries": 50,
            "ledger_head": "a" * 64}
    servers: list[Any] = []
    with pytest.raises(DeployError, match=r"fedora: client client-001 \(node 1001\) reported a "
                                          r"ledger that went back \(\d+ entries after 50\) in "
                                          r"its encrypted summary reply: .*the run stops"):
        _encrypted_run(tmp_path, monkeypatch, servers, {1: seen})
    assert servers[0].privacy["fedora"][1] == seen
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_plan_the_config_does_not_admit_in_an_encrypted_summary_reply_is_not_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encrypted summary's reply recorded the client's plan, then refused it: the server's
    state held a plan the config does not imply. It is now refused before it is recorded."""
    _reporting(monkeypatch, lambda r: {**r, "noise-multiplier": 0.5})
    servers: list[Any] = []
    with pytest.raises(DeployError, match="fedora: client client-001 reports noise multiplier "
                                          "0.5"):
        _encrypted_run(tmp_path, monkeypatch, servers)
    assert 1 not in servers[0].privacy.get("fedora", {})
    assert not (tmp_path / "res" / "results.json").exists()
    assert load_checkpoint(tmp_path / "res" / server_app.SERVER_CHECKPOINT)["privacy"] == {}


@pytest.mark.usefixtures("task_identity")
def test_a_round_reply_whose_ledger_went_back_stops_the_run_with_the_same_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The round replies' path, which shares its check with the encrypted summary's (the
    server's record changed while round 1's messages were out: a client checks the head
    its request states, so this is the server's own second line)."""
    seen = {"epsilon_spent": 0.5, "epsilon_budget": 8.0, "ledger_entries": 50,
            "ledger_head": "a" * 64}
    real_payloads, real_exchange = server_app._exchange_payloads, server_app._exchange
    exchanging: list[Any] = []

    def payloads(grid: Any, server: Any, run: Any, stage: str, rnd: int, *args: Any) -> Any:
        exchanging[:] = [server] if (stage, rnd) == ("round", 1) else []
        return real_payloads(grid, server, run, stage, rnd, *args)

    def exchange(*args: Any) -> Any:
        out = real_exchange(*args)
        for server in exchanging:
            server.privacy.setdefault("fedora", {})[1] = dict(seen)
        return out
    monkeypatch.setattr(server_app, "_exchange_payloads", payloads)
    monkeypatch.setattr(server_app, "_exchange", exchange)
    with pytest.raises(DeployError, match=r"fedora: client client-001 \(node 1001\) reported a "
                                          r"ledger that went back \(\d+ entries after 50\) in "
                                          r"its round reply of round 1: "):
        _run(tmp_path)
    assert not (tmp_path / "res" / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
def test_the_privacy_section_says_the_planned_epsilon_is_rounded_up_the_spent_one_exact(
        tmp_path: Path) -> None:
    """results.json put the plan's planned_epsilon (rounded up to 6 decimals) beside each
    client's exact epsilon_spent with nothing saying why "the same" figure differs; the
    section now says so (``epsilon_figures``, as the in-process runtime's), values unchanged."""
    from privacy.accounting import round_up
    from secure_fedora.secure.private import EPSILON_FIGURES

    section = _run(tmp_path)["privacy"]["fedora"]
    assert section["epsilon_figures"] == EPSILON_FIGURES
    assert "planned_epsilon is the plan's epsilon rounded up" in EPSILON_FIGURES
    assert "epsilon_spent is the exact epsilon spent" in EPSILON_FIGURES
    (plan,) = section["plan"]
    assert all(round_up(r["epsilon_spent"]) <= plan["planned_epsilon"] for r in section["clients"])
