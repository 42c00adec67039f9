"""PNG plots of a run: the test metric (accuracy or ROC AUC) per round per method and per client,
relatedness heat map. Both runtimes write them through :func:`write_plots` (in process: the
CLI; on Flower: the ServerApp into its result directory); every file is replaced atomically."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

from secure_fedora.core.files import atomic_write_with  # noqa: E402
from secure_fedora.runtimes.results import metric_label  # noqa: E402
from secure_fedora.runtimes.rundir import PLOT_FILES, PLOTS_FOLDER  # noqa: E402

__all__ = ["PLOTS_FOLDER", "PLOT_FILES", "plot_accuracy_per_round", "plot_per_client", "plot_relatedness",
           "relatedness_matrix", "write_plots"]


def _save(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically (a run killed while saving leaves the old
    file or none, never a truncated one) and close it."""
    try:
        atomic_write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot_accuracy_per_round(history: Sequence[dict[str, Any]], path: Path,
                            metric: str = "accuracy") -> Path:
    """Mean test ``metric`` per round for each method, with the min-max band across clients.

    Every evaluated round is a marker, so a method evaluated once (one round, or
    ``evaluation.every`` beyond the rounds) is drawn too, its band as a vertical bar."""
    name = metric_label(metric)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in dict.fromkeys(row["method"] for row in history):
        # rounds between evaluations (evaluation.every) have no test columns
        rows = [r for r in history if r["method"] == method and r.get("test_mean") is not None]
        x = [r["round"] for r in rows]
        lows, highs = [r["test_min"] for r in rows], [r["test_max"] for r in rows]
        (line,) = ax.plot(x, [r["test_mean"] for r in rows], marker="o", markersize=3, label=method)
        if len(x) > 1:
            ax.fill_between(x, lows, highs, alpha=0.12)
        else:  # a band over one round has no width
            ax.vlines(x, lows, highs, color=line.get_color(), alpha=0.3, linewidth=6)
    return _save_series(fig, ax, path, "round", f"test {name} (band: min-max across clients)",
                        f"Personalized test {name} per round")


def _save_series(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Finish a figure of one series per method over an integer axis (labels, title, grid,
    legend) and save it at ``path``."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_per_client(methods: dict[str, dict[str, Any]], path: Path, metric: str = "accuracy") -> Path:
    """Test ``metric`` of every client at the reported round (best mean validation, or the
    final round), one marker series per method."""
    name = metric_label(metric)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for method, body in methods.items():
        acc = body["selected"]["per_client"]
        ax.plot(range(len(acc)), acc, marker="o", markersize=3, linewidth=0.8, label=method)
    return _save_series(fig, ax, path, "client", f"test {name} (reported round's model)",
                        f"Per-client {name}")


def plot_relatedness(matrix: Tensor, path: Path, title: str = "Propagation matrix P") -> Path:
    """Heat map of an N x N relatedness matrix (e.g. P or the top-k graph)."""
    fig, ax = plt.subplots(figsize=(5.6, 5))
    im = ax.imshow(matrix.detach().cpu().numpy(), cmap="viridis")
    ax.set_xlabel("client j")
    ax.set_ylabel("client i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    return path


def relatedness_matrix(methods: Iterable[Any]) -> Tensor | None:
    """The relatedness (propagation) matrix to draw: that of the first method holding one
    (``relatedness.propagation``, FEDORA's ``P``), or None (no such method, or a federation too
    large for a dense view)."""
    for method in methods:
        matrix = getattr(getattr(method, "relatedness", None), "propagation", None)
        if matrix is not None:
            return matrix
    return None


def write_plots(run_dir: Path, history: Sequence[dict[str, Any]], results: dict[str, Any],
                propagation: Tensor | None) -> list[Path]:
    """Write every plot of a run into ``run_dir/plots``, labelled with results.json's
    ``metric`` (the file names stay ``*accuracy*`` for any metric); returns the paths written."""
    out = run_dir / PLOTS_FOLDER
    out.mkdir(parents=True, exist_ok=True)
    metric = results.get("metric", "accuracy")
    per_round, per_client, relatedness = PLOT_FILES
    paths = []
    if history:
        paths.append(plot_accuracy_per_round(history, out / per_round, metric))
    paths.append(plot_per_client(results["methods"], out / per_client, metric))
    if propagation is not None:
        paths.append(plot_relatedness(propagation, out / relatedness))
    return paths
