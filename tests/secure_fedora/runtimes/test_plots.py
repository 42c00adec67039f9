"""The run plots (``run_dir/plots``): what each figure draws and how it is labelled."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from secure_fedora.runtimes.plots import plot_accuracy_per_round, plot_per_client


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


def test_a_method_evaluated_once_is_drawn(tmp_path, figures):
    """One evaluated round (rounds = 1, or evaluation.every beyond the rounds) gave a line of
    one point without a marker and a band of no width: the figure showed only the legend."""
    history = [{"method": "fedora", "round": 1, "test_mean": 0.6, "test_min": 0.4,
                "test_max": 0.8},
               *({"method": "local", "round": r, "test_mean": m, "test_min": m - 0.1,
                  "test_max": m + 0.1} for r, m in ((2, 0.5), (4, 0.7)))]
    path = plot_accuracy_per_round(history, tmp_path / "per_round.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[-1].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines.get("fedora").get_xydata().tolist()) == [[1.0, 0.6]]
    assert all(line.get_marker() not in (None, "", "None") for line in lines.values())
    # the one round's min-max band is drawn (as a bar), the other method's as an area
    segments = [seg.tolist() for coll in ax.collections if hasattr(coll, "get_segments")
                for seg in coll.get_segments()]
    assert [[1.0, 0.4], [1.0, 0.8]] in segments
    assert len(ax.collections) == 2
    assert all(float(t).is_integer() for t in ax.get_xticks())  # rounds, not fractions


def test_rounds_between_evaluations_are_skipped(tmp_path, figures):
    """rounds.csv's rows of rounds that were not evaluated have no test columns."""
    history = [{"method": "local", "round": 1, "participants": 3, "steps": 4.0},
               {"method": "local", "round": 2, "participants": 3, "steps": 4.0,
                "test_mean": 0.5, "test_min": 0.25, "test_max": 0.75}]
    plot_accuracy_per_round(history, tmp_path / "per_round.png")
    (ax,) = figures[-1].axes
    assert [line.get_xydata().tolist() for line in ax.get_lines()] == [[[2.0, 0.5]]]


def test_a_plot_cut_while_saving_leaves_the_previous_file(tmp_path, monkeypatch):
    """Plots were saved straight to their path: a run killed (or failing) while saving one
    left a truncated PNG under the plot's name. It is now replaced atomically: the previous
    file stays whole, and no partial copy is left beside it."""
    import io

    path = tmp_path / "per_client.png"
    methods = {"local": {"selected": {"per_client": [0.5, 0.75]}}}
    plot_per_client(methods, path)
    before = path.read_bytes()
    save = Figure.savefig

    def cut(self, fname, *args, **kwargs):
        buf = io.BytesIO()
        save(self, buf, *args, **{**kwargs, "format": "png"})
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(fname, "write"):
            fname.write(half)
        else:
            with open(fname, "wb") as fh:
                fh.write(half)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", cut)
    with pytest.raises(OSError, match="disk full"):
        plot_per_client({"local": {"selected": {"per_client": [0.25, 1.0]}}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_client.png"]
