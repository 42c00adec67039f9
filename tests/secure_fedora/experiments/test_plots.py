"""The run plots (``run_dir/plots``): what each figure draws and how it is labelled."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from secure_fedora.experiments.plots import plot_per_client


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plots save, kept for inspection after they are closed."""
    saved: list[Figure] = []
    save = Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_per_client_plot_is_labelled_with_the_metric_not_a_method(tmp_path, figures):
    """The loop over methods reused the metric label's variable, so the axis and title named
    the last method ("test fedavg_ft", "Per-client fedavg_ft")."""
    methods = {"fedora": {"selected": {"per_client": [0.5, 0.75, 1.0]}},
               "fedavg_ft": {"selected": {"per_client": [0.25, 0.5, 0.5]}}}
    path = plot_per_client(methods, tmp_path / "per_client.png", "auc")
    assert path.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[-1].axes
    assert ax.get_title() == "Per-client ROC AUC"
    assert ax.get_ylabel() == "test ROC AUC (reported round's model)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fedora", "fedavg_ft"]
    assert all(float(t).is_integer() for t in ax.get_xticks())  # clients, not fractions
