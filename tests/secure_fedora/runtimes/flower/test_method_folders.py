"""On Flower each client signs the method of its DP-SGD entries (``params.method``) and the
server, which writes results.json and signs the anchor, cannot re-sign them: a server that
swaps two methods' ledgers (results.json and anchor made to match) is caught by `audit
verify` only through that field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from audits.verify import verify_run
from privacy.identity import client_ids, load_identity
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import RunSettings
from secure_fedora.secure.anchor import build_anchor, write_anchor
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)

N = 3


@pytest.mark.usefixtures("task_identity")
def test_a_server_that_swaps_two_methods_ledgers_is_caught(tmp_path: Path) -> None:
    """Local and FedAvg under DP (one round, the same noise plan): the server swaps the two
    methods' client rows in results.json and re-signs its anchor over them, and the auditor
    is handed each method's ledgers in the other's folder. Everything the server can sign
    agrees; each DP-SGD entry is an error naming its file, entry and both methods."""
    data = json.loads(json.dumps(TINY))
    data["methods"] = ["local", "fedavg"]
    data["training"]["rounds"] = 1
    data["data"]["validation"] = "private"
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible"}
    cfg = parse_config(data)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": True, "compare-methods": True})
    server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, N),  # type: ignore[arg-type]
                              RunSettings.from_run_config(rc), 42)
    res, allowlist = tmp_path / "res", tmp_path / "ids" / "server" / "allowlist.json"

    def audit(swap: dict[str, str]) -> Path:
        folder = tmp_path / f"audit-{len(list(tmp_path.glob('audit-*')))}"
        folder.mkdir()
        shutil.copyfile(res / "results.json", folder / "results.json")
        for method, source in swap.items():
            (folder / "ledgers" / method).mkdir(parents=True)
            for c, cid in enumerate(client_ids(N)):
                shutil.copyfile(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / source
                                / f"{cid}.jsonl", folder / "ledgers" / method / f"{cid}.jsonl")
        return folder

    assert verify_run(audit({"local": "local", "fedavg": "fedavg"}), allowlist=allowlist,
                      anchor=res / "anchor.json").errors == []
    doc = json.loads((res / "results.json").read_text())
    rows = doc["privacy"]
    rows["local"]["clients"], rows["fedavg"]["clients"] = \
        rows["fedavg"]["clients"], rows["local"]["clients"]
    (res / "results.json").write_text(json.dumps(doc, indent=2))
    old = json.loads((res / "anchor.json").read_text())
    swapped = {"local": "fedavg", "fedavg": "local"}
    ledgers = {f"{swapped[k.split('/')[0]]}/{k.split('/')[1]}":
               {f: v[f] for f in ("entries", "head", "epsilon_spent")}
               for k, v in old["ledgers"].items()}
    write_anchor(res, build_anchor(res, run_name=cfg.name, config_hash=doc["config_hash"],
                                   methods=list(cfg.methods), ledgers=ledgers,
                                   signer=load_identity(tmp_path / "ids" / "server", "server"),
                                   runtime="flower", files=("results.json",)))
    report = verify_run(audit(swapped), allowlist=allowlist, anchor=res / "anchor.json")
    assert {f.check for f in report.errors} == {"method_folder"}, report.errors
    assert {(f.ledger, f.entry) for f in report.errors} == {
        (f"ledgers/{m}/{cid}.jsonl", 0) for m in swapped for cid in client_ids(N)}
    for f in report.errors:
        folder = f.ledger.split("/")[1]
        assert f"records method {swapped[folder]!r}" in f.message
        assert f"folder of method {folder!r}" in f.message
