"""Shared set-up for the benchmarks that run the reference setting (imported by sibling scripts)."""

from __future__ import annotations

import shutil
from pathlib import Path

from secure_fedora.core.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def reference_config(seed: int, rounds: int) -> ExperimentConfig:
    """``configs/reference.toml`` with the given seed and number of rounds."""
    cfg = load_config(ROOT / "configs" / "reference.toml")
    return cfg.model_copy(update={
        "seed": seed,
        "training": cfg.training.model_copy(update={"rounds": rounds}),
    })


def fresh_directory(path: str | Path) -> Path:
    """``path`` emptied of any previous benchmark output (it is recreated by the run)."""
    out = Path(path)
    shutil.rmtree(out, ignore_errors=True)
    return out
