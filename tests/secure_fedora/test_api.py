"""The Python API's results helpers."""

from __future__ import annotations

from secure_fedora.api import Results


def _results(selection: str) -> Results:
    selected = {"mean": 0.5, "min": 0.25, "max": 0.75, "std": 0.25, "per_client": [0.25, 0.75],
                "round": 3}
    return Results({"name": "run", "metric": "accuracy",
                    "assumptions": {"model_selection": selection},
                    "methods": {"fedora": {"selected": selected},
                                "fedavg_ft": {"selected": {k: v for k, v in selected.items()
                                                           if k != "round"}}}})


def test_summary_names_how_the_reported_round_was_chosen():
    """Under DP with private validation data the final round is reported, but the summary
    said "at the best-validation round" for every run."""
    final = _results("final_round").summary()
    assert final.splitlines()[0] == "run: test accuracy at the final round"
    assert "best-validation" not in final
    best = _results("validation").summary()
    assert best.splitlines()[0] == "run: test accuracy at the best-validation round"
    assert best.splitlines()[2].split() == ["fedora", "0.5000", "0.2500", "0.7500", "0.2500", "3"]
