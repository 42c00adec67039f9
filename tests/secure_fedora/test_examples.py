"""examples/ runs: both config files through the CLI and the Python API script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from secure_fedora.cli import main

pytest.importorskip("sklearn")

# whole example runs: started first (tests/conftest.py), not left to the end of the suite
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(toml: str, out: Path) -> dict:
    assert main(["run", str(EXAMPLES / toml), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "results.json").read_text())


def test_breast_cancer_mlp_under_dp(tmp_path: Path) -> None:
    results = _run("breast_cancer.toml", tmp_path / "bc")
    assert results["metric"] == "auc" and results["assumptions"]["differential_privacy"]
    for name in ("fedora", "local", "fedavg", "fedavg_ft"):
        assert 0.8 < results["methods"][name]["selected"]["mean"] <= 1.0
    for method in ("fedora", "local", "fedavg"):
        clients = results["privacy"][method]["clients"]
        assert all(0 < c["epsilon_spent"] <= c["epsilon_budget"] for c in clients)


def test_digits_cnn_with_rotation(tmp_path: Path) -> None:
    results = _run("digits.toml", tmp_path / "dg")
    assert results["metric"] == "accuracy"
    assert [c["rotation_degrees"] for c in results["clients"]] == [0.0, 180.0, 0.0, 180.0]
    assert results["methods"]["fedora"]["selected"]["mean"] > 0.4  # chance is 0.1


def test_python_api_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("api_demo", EXAMPLES / "api_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(tmp_path)
    assert results["digits"].metric == "accuracy" and results["digits"].mean("fedora") > 0.4
    assert results["breast_cancer"].metric == "auc" and results["breast_cancer"].mean("fedora") > 0.8
    assert (tmp_path / "digits" / "results.json").is_file()
    assert "fedora" in results["breast_cancer"].summary()
