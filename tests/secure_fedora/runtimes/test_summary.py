"""`secure-fedora run` and `secure-fedora deploy local` print one summary of a finished run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from secure_fedora import cli
from secure_fedora.runtimes.flower import local as local_module
from secure_fedora.runtimes.flower.local import DeployResult

RESULTS = {
    "name": "summary-test", "metric": "accuracy",
    "assumptions": {"model_selection": "validation"},
    "methods": {"local": {"selected": {"mean": 0.5, "min": 0.25, "max": 0.75, "std": 0.125}},
                "fedora": {"selected": {"mean": 0.625, "min": 0.5, "max": 0.75, "std": None}}},
    "comparison": {"fedora_below_local": 1},
}


def _block(text: str) -> list[str]:
    """The summary's lines, from the table's title to the end (a long path wraps: the last
    line is the run directory's, rejoined)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "personalized test" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("run directory:"))
    return lines[start:end] + ["".join(line.strip() for line in lines[end:])]


def test_run_and_deploy_local_print_the_same_summary(tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """deploy local printed one line per method (mean, min, max), without the std, the
    FEDORA-below-Local count or the table `run` prints; both now print the same summary, and a
    null figure (a NaN or infinity in results.json) is n/a, where `run` raised a TypeError."""
    import secure_fedora.runtimes.plots as plots

    workdir = tmp_path / "w"
    config = tmp_path / "c.toml"
    config.write_text('name = "summary-test"\nmethods = ["local", "fedora"]\n')
    monkeypatch.setattr(cli, "_run_with_progress",
                        lambda args, cfg, run_dir: (SimpleNamespace(history=[], methods={}),
                                                    RESULTS))
    monkeypatch.setattr(plots, "write_plots", lambda *args: [])
    assert cli.main(["run", str(config), "--out", str(workdir / "results"), "--quiet"]) == 0
    ran = _block(capsys.readouterr().out)

    deployed = {**RESULTS, "events": [{"method": "fedora", "round": 2, "client": 1,
                                       "event": "no reply in time"}]}
    monkeypatch.setattr(local_module, "deploy_local", lambda *args, **kwargs: DeployResult(
        7, "completed", deployed, workdir, 1.0))
    assert cli.main(["deploy", "local", "--config", str(config), "--workdir", str(workdir)]) == 0
    captured = capsys.readouterr()
    block = _block(captured.err)
    assert block == ran[:-1] + ["  fedora round 2: client 1: no reply in time", ran[-1]]
    assert any("0.1250" in line for line in ran) and any("n/a" in line for line in ran)
    assert "clients where FEDORA is below Local: 1" in ran
    assert ran[-1] == f"run directory:{workdir / 'results'}"
    assert '"run_id": "7"' in captured.out  # the machine-readable line stays on stdout
