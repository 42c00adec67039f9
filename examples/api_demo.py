"""The two examples through the Python API instead of the config keys.

    python examples/api_demo.py [OUT_DIR]

Runs the digits CNN (rotation partition) and the breast-cancer MLP under DP-SGD, each from a
config dict, user arrays and a model factory, and prints each result table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import breast_cancer  # noqa: E402
import digits  # noqa: E402

from secure_fedora import Experiment, Results  # noqa: E402

SMALL = {"rounds": 3, "local_epochs": 1, "lr": 0.05, "batch_size": 16}


def run_digits(out: Path) -> Results:
    """Digits: data from ``digits.load`` (already in memory), the CNN factory, no DP."""
    config = {
        "name": "digits-api", "methods": ["fedora", "local"],
        "data": {"partition": "rotation", "num_clients": 4, "groups": 2,
                 "train_per_client": 128, "val_per_client": 64},
        "training": {**SMALL, "rounds": 5, "local_epochs": 2},
    }
    return Experiment(config, data=digits.load(0), model=digits.cnn, run_dir=out / "digits").run()


def run_breast_cancer(out: Path) -> Results:
    """Breast cancer: BCE (AUC), the MLP factory, DP-SGD with noised FEDORA summaries."""
    config = {
        "name": "breast-cancer-api", "methods": ["fedora", "fedavg"],
        "data": {"partition": "iid", "num_clients": 4, "train_per_client": 64,
                 "val_per_client": 32, "test_per_client": 28},
        "training": {**SMALL, "loss": "bce"},
        "fedora": {"relatedness": "noised"},
        "fedavg": {"finetune_epochs": 1},
        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3},
    }
    return Experiment(config, data=breast_cancer.load, model=breast_cancer.mlp,
                      run_dir=out / "breast_cancer").run()


def main(out: Path) -> dict[str, Results]:
    """Run both; return their results by example name."""
    results = {"digits": run_digits(out), "breast_cancer": run_breast_cancer(out)}
    for r in results.values():
        print(r.summary())
    return results


if __name__ == "__main__":
    import tempfile

    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="api-demo-")))
