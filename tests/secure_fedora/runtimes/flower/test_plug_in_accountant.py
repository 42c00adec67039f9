"""A plug-in accountant (``privacy.accounting.register_accountant``) on Flower: the apps know
one a ``secure_fedora/contrib/`` module registers; a run under it accounts, reports, checks
and audits every epsilon with it, bit for bit as in process; a node or server that lacks it
refuses the run before any release, naming it, and ``deploy local`` refuses one only its own
process registered before anything starts."""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from audits.verify import verify_run
from privacy.accounting import ACCOUNTANT_REGISTRY, Accountant
from privacy.identity import client_ids
from privacy.ledger import read_ledger, replay_accountant
from secure_fedora.core import registry
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.protocol import DeployError, RunSettings
from tests.privacy import accountant_plugin
from tests.privacy.accountant_plugin import MARGIN, NAME, unregistered
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    TINY,
    InMemoryGrid,
    audit_folder,
    in_process,
    run_config,
    task_identity,
)

#: What a ledger entry states apart from when it was written and how it is chained/signed.
_VOLATILE = {"timestamp", "signature", "prev_hash"}
MODULE = accountant_plugin.__name__


def _config() -> Any:
    data = json.loads(json.dumps(TINY))
    data["methods"] = ["fedavg"]
    data["training"]["local_epochs"] = 1
    data["data"]["validation"] = "private"
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible",
                       "accountant": NAME}
    return parse_config(data)




def _strip(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in _VOLATILE}


@pytest.mark.usefixtures("task_identity")
def test_a_plug_in_accountant_runs_alike_on_the_grid_and_in_process(tmp_path: Path) -> None:
    """FedAvg under the plug-in on 3 nodes, reproducible noise: the plan, each client's
    reported spend and every ledger entry (its ``epsilon_after``, accountant and parameters)
    are the in-process run's, bit for bit, and the plug-in's padded figures, not the built-in
    RDP's (the server checked every report and plan against its own calibration with the
    plug-in on the way); the audit, importing the plug-in, recomputes every one with it."""
    cfg = _config()
    res = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True, "result-dir": str(res)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == [] and results["events"] == []
    sim, _ = in_process(cfg, tmp_path, "fedavg")
    mine, theirs = results["privacy"]["fedavg"], sim.privacy["fedavg"]
    assert mine["accountant"] == theirs["accountant"] == NAME
    assert [{**r, "release_stages": None} for r in mine["plan"]] == \
        [{**r, "release_stages": None} for r in theirs["plan"]]
    for c, cid in enumerate(client_ids(3)):
        grid_ledger = read_ledger(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedavg"
                                  / f"{cid}.jsonl")
        ours = read_ledger(tmp_path / "inproc" / "ledgers" / "fedavg" / f"{cid}.jsonl")
        assert [e["mechanism"] for e in grid_ledger] == ["dpsgd", "dpsgd", "close"]
        assert [_strip(e) for e in grid_ledger] == [_strip(e) for e in ours]
        assert {e["accountant"] for e in grid_ledger} == {NAME}
        row = mine["clients"][c]
        assert row["accountant"] == NAME and row["plan_reported"]
        spent = row["epsilon_spent"]
        assert spent == theirs["clients"][c]["epsilon_spent"] == grid_ledger[-1]["epsilon_after"]
        rdp = Accountant("rdp")
        for e in grid_ledger[:2]:
            rdp.record(e["params"]["noise_multiplier"], e["params"]["sample_rate"],
                       e["params"]["steps"])
        assert spent == pytest.approx(rdp.epsilon(1e-3) * (1 + MARGIN), rel=1e-12)
        assert spent == replay_accountant(grid_ledger).epsilon(1e-3) <= 8.0
    with unregistered():
        report = verify_run(audit_folder(tmp_path, "fedavg"),
                            allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                            anchor=res / "anchor.json", imports=[MODULE])
    assert report.ok, [str(f) for f in report.errors]
    assert not [f for f in report.findings if f.check == "plug_in_accountant"]
    (imported,) = report.imported
    assert imported.module == MODULE and f"accountant {NAME!r}" in imported.entries
    assert all(c.accountant == NAME and c.independent_final_epsilon is not None
               for c in report.clients) and len(report.clients) == 3


@pytest.mark.usefixtures("task_identity")
def test_a_node_or_server_without_the_plug_in_refuses_before_any_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 1 lacks the plug-in (its module is not in its secure_fedora/contrib/): it refuses
    every message, its log naming the accountant and where a plug-in goes (not a KeyError,
    nor another accountant), and the run stops at first contact, naming the client: no ledger
    entry on any node, no results. A ServerApp without it refuses the run config so too."""
    cfg = _config()
    res = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True, "result-dir": str(res),
                                      "connect-timeout": 0.1, "round-timeout": 0.3})

    def lacking(handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def handle(message: Any, context: Any) -> Any:
            if context.node_config["partition-id"] != 1:
                return handler(message, context)
            with unregistered():
                return handler(message, context)
        return handle
    for kind, handler in list(client_app.HANDLERS.items()):
        monkeypatch.setitem(client_app.HANDLERS, kind, lacking(handler))
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    with pytest.raises(DeployError, match=r"missing clients \[1\] .*query.hello failed: 2: "
                       r"DeployError \(details withheld; see the client's own log\)"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    named = rf"privacy.accountant must be .*got '{NAME}' .*secure_fedora/contrib/"
    assert {(c, kind) for c, kind, _ in grid.errors} == {(1, "query.hello")}
    assert all(type(e) is DeployError and re.search(named, str(e)) for _, _, e in grid.errors)
    assert not list((tmp_path / "nodes").glob("node-*/runs/42/fedavg"))  # no ledger
    assert not (res / "results.json").exists()
    with unregistered(), pytest.raises(DeployError, match=named):
        RunSettings.from_run_config(rc)


def test_deploy_local_takes_a_contrib_accountant_and_refuses_one_of_its_own_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An accountant a script or notebook registered passed `deploy local`'s checks and every
    app then failed on its first message, after the deployment started; it is refused by name
    before anything starts. One a contrib module registers, which every app registers too,
    passes."""
    from secure_fedora.runtimes.flower.local import deploy_local
    from secure_fedora.runtimes.flower.protocol import check_apps_know_entries

    with pytest.raises(DeployError, match=rf"privacy.accountant: accountant '{NAME}' is "
                       rf"registered by module '{MODULE}' of this process only.*"
                       "secure_fedora/contrib/"):
        deploy_local(_config(), 3, tmp_path / "w", max_in_flight=0, reproducible_dp_noise=True)
    # one this process does not know either read "is not registered in this process only"
    cfg = _config()
    with unregistered(), pytest.raises(DeployError) as unknown:
        check_apps_know_entries(cfg)
    assert f"accountant '{NAME}' is not registered at all, in this process or another," in str(
        unknown.value)
    assert "this process only" not in str(unknown.value)
    assert not (tmp_path / "w").exists()  # nothing was started
    package, name = f"contrib_{uuid.uuid4().hex[:8]}", f"padded_{uuid.uuid4().hex[:6]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "padded.py").write_text(
        "from privacy.accounting import ACCOUNTANT_REGISTRY, AccountingMethod,"
        " register_accountant\n"
        f"register_accountant(AccountingMethod({name!r}, 'RDP', ACCOUNTANT_REGISTRY['rdp']"
        ".compute, lambda o: {}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "CONTRIB_PACKAGE", package)
    monkeypatch.setattr(registry, "_contrib_loaded", False)
    try:
        doc = _config().model_dump(mode="json", exclude_none=True)
        doc["privacy"]["accountant"] = name
        check_apps_know_entries(parse_config(doc))
    finally:
        ACCOUNTANT_REGISTRY.pop(name, None)
        for mod in [m for m in sys.modules if m.startswith(package)]:
            sys.modules.pop(mod)
