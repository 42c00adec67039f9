"""``deploy local`` shows per-round progress on the console (a bar per method, as ``run``
shows them; none with ``--quiet``): it follows the ServerApp's round lines in
``logs/serverapp.log``, which it keeps writing as before."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from secure_fedora import cli
from secure_fedora.runtimes.flower import local as local_module
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.local import DeployResult, LocalFederation, RoundLines
from secure_fedora.runtimes.flower.protocol import parse_round_line, round_line
from tests.secure_fedora.runtimes.test_summary import RESULTS


def test_round_lines_reads_each_completed_round_line_the_serverapp_logs_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The lines the ServerApp writes are the ones read back: a line still being written is
    read once it ends, other lines are skipped, and so is what the log held before ``start``
    (an earlier run's, as a resume appends to the same log)."""
    server_app._say(round_line("fedora", 1, 3, "3/3 replied, 0.20 s"))
    server_app._say("fedora: resumed after round 1")
    server_app._say(round_line("ditto", 2, 3, "2/3 replied, 0.20 s, mean test metric 0.5000"))
    written = capsys.readouterr().out
    log = tmp_path / "serverapp.log"
    log.write_text("[secure-fedora] fedora round 1/3: earlier run\n")
    lines = RoundLines(log, log.stat().st_size)
    assert lines.poll() == []
    cut = written.index("ditto") + 4
    with log.open("a") as f:
        f.write(written[:cut])
    assert lines.poll() == [("fedora", 1, 3)]
    assert lines.poll() == []
    with log.open("a") as f:
        f.write(written[cut:])
    assert lines.poll() == [("ditto", 2, 3)]
    assert RoundLines(tmp_path / "missing.log").poll() == []
    assert parse_round_line("[secure-fedora] run 42: fedora round 1/3: x") is None


def test_follow_reports_each_round_of_the_streamed_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``follow`` streams the run's log to serverapp.log (unchanged) and calls ``on_round``
    for each round line as it arrives, the last ones after the stream ended too."""
    fake = tmp_path / "flwr"
    fake.write_text("#!/bin/sh\n"
                    "echo '[secure-fedora] run 42: waiting for 3 SuperNodes'\n"
                    "echo '[secure-fedora] fedora round 1/2: 3/3 replied, 0.10 s'\n"
                    "sleep 0.5\n"
                    "echo '[secure-fedora] fedora round 2/2: 3/3 replied, 0.10 s'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(local_module, "_flower_bin", lambda name: str(fake))
    fed = LocalFederation(tmp_path / "w", 3)
    monkeypatch.setattr(fed, "run_status", lambda run_id: "finished:completed")
    seen: list[tuple[str, int, int]] = []
    assert fed.follow(42, timeout=30, on_round=lambda *r: seen.append(r)) == "finished:completed"
    assert seen == [("fedora", 1, 2), ("fedora", 2, 2)]
    log = (tmp_path / "w" / "logs" / "serverapp.log").read_text()
    assert "run 42: waiting for 3 SuperNodes" in log and "fedora round 2/2" in log


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_deploy_local_shows_a_bar_per_method_unless_quiet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        quiet: bool) -> None:
    """deploy local printed nothing per round (only the ServerApp log had it); it now shows
    a bar per method as the rounds are done, as ``run`` does, and none with --quiet."""
    def deploy(*args: object, **kwargs: object) -> DeployResult:
        on_round = kwargs["on_round"]
        assert callable(on_round)
        for rnd in (1, 2, 3):
            on_round("fedora", rnd, 3)
        on_round("local", 1, 3)
        return DeployResult(7, "finished:completed", RESULTS, tmp_path / "w", 1.0)

    monkeypatch.setattr(local_module, "deploy_local", deploy)
    config = tmp_path / "c.toml"
    config.write_text('name = "progress-test"\nmethods = ["local", "fedora"]\n')
    argv = ["deploy", "local", "--config", str(config), "--workdir", str(tmp_path / "w")]
    assert cli.main(argv + (["--quiet"] if quiet else [])) == 0
    err = capsys.readouterr().err
    bars = [line for line in err.splitlines() if "3/3" in line or "1/3" in line]
    if quiet:
        assert bars == []
    else:
        assert any("fedora" in line and "3/3" in line for line in bars), err
        assert any("local" in line and "1/3" in line for line in bars), err
