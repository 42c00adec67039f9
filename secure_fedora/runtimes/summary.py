"""The summary a finished run prints, the same for ``secure-fedora run`` (in process) and
``secure-fedora deploy local`` (Flower): one function reads it from results.json's document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["print_run_summary", "progress_bars", "results_table"]


def progress_bars(console: Console, quiet: bool) -> Any:
    """The progress bars every command shows the same way (``run``, ``sweep``, ``deploy
    local``): description, bar, done/total and elapsed time on ``console``; none when
    ``quiet``. A ``rich.progress.Progress``, to use as a context manager."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=quiet)


def _figure(value: Any) -> str:
    # a null figure (NaN or infinite, named under non_finite_values) is no number to show
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) \
        else "n/a"


def results_table(results: dict[str, Any]) -> Table:
    """A rich table of each method's selected test metric (accuracy or AUC) across clients;
    a null figure shows as ``n/a``."""
    metric = results.get("metric", "accuracy")
    selection = results.get("assumptions", {}).get("model_selection", "validation")
    which = "final-round model" if selection == "final_round" else "best-validation model"
    table = Table(title=f"{results['name']}: personalized test {metric} ({which})")
    for col in ("method", "mean", "min", "max", "std"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, body in results["methods"].items():
        s = body["selected"]
        table.add_row(name, *(_figure(s.get(k)) for k in ("mean", "min", "max", "std")))
    return table


def print_run_summary(console: Console, results: dict[str, Any], run_dir: Path | str) -> None:
    """Print a finished run's summary on ``console``: :func:`results_table`, FEDORA's
    comparison with Local where the results hold it, each client whose selected or final
    metric is from an earlier round (``stale_clients``: a client that missed that
    evaluation or, with envelopes, rejected its evaluation message), the rounds model
    selection did not consider (``selected.unmeasured_rounds``), every event the runtime recorded (Flower: a client that failed or was
    rejected in a round; none in process) and the directory holding results.json."""
    console.print(results_table(results))
    comparison = results.get("comparison") or {}
    if "fedora_below_local" in comparison:
        console.print(f"clients where FEDORA is below Local: {comparison['fedora_below_local']}")
    for name, body in results["methods"].items():
        for part in ("selected", "final"):
            entry = body.get(part) or {}
            reported = entry.get("round", body.get("rounds"))
            for stale in entry.get("stale_clients") or []:
                source = "is a placeholder 0 (no metric yet)" if stale["round"] is None \
                    else f"is from round {stale['round']}"
                console.print(f"  {name} {part}: client {stale['client']}'s metric {source}, "
                              f"not round {reported}'s (it missed that round's evaluation)",
                              markup=False)
        skipped = (body.get("selected") or {}).get("unmeasured_rounds")
        if skipped:
            console.print(f"  {name}: rounds {skipped} were not considered for selection (some "
                          "client had no measured metric yet)", markup=False)
    for event in results.get("events") or []:
        where = f"{event['method']} " if event.get("method") else ""
        console.print(f"  {where}round {event['round']}: client {event['client']}: "
                      f"{event['event']}", markup=False)
    console.print(f"run directory: {run_dir}", markup=False)
