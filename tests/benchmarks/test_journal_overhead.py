"""The journal-overhead benchmark README cites runs as written and times the journal."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_journal_overhead_runs_and_times_the_journal(tmp_path: Path) -> None:
    """Its keys go to a key store under ``tmp_path``, never the user's."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "journal_overhead.py"),
         "--rounds", "1", "--clients", "4"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
             "SECURE_FEDORA_KEYSTORE_HOME": str(tmp_path / "keystore")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any((tmp_path / "keystore").iterdir())
    journal = re.search(r"journal \(state \+ seal \+ fsync\)\s+([0-9.]+) ms total", proc.stdout)
    gate = re.search(r"ledger gate \(account \+ sign \+ fsync\)\s+([0-9.]+) ms total", proc.stdout)
    assert journal and gate, proc.stdout
    assert float(journal.group(1)) > 0 and float(gate.group(1)) > 0
    assert re.search(r"journal bytes\s+[1-9]\d* total", proc.stdout), proc.stdout
