"""New-client generalization: newcomers attach to a trained federation without retraining it."""

import json

import pytest
import torch

from secure_fedora.algorithms import fedora
from secure_fedora.core.config import parse_config
from secure_fedora.experiments.newclients import (
    NEWCOMER_METHODS,
    NewClientError,
    format_table,
    newcomer_indices,
    run_new_client_experiment,
    split_newcomers,
)
from secure_fedora.learning.client import evaluate
from secure_fedora.learning.models import ModelError
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context


def tiny(**overrides):
    base = {
        "name": "tiny-new",
        "seed": 2,
        "data": {"num_clients": 7, "train_per_client": 32, "val_per_client": 16,
                 "test_per_client": 32, "groups": 2},
        "training": {"rounds": 3, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "fedavg": {"finetune_epochs": 1},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(base)


@pytest.fixture(scope="module")
def clients():
    return build_clients(tiny())


@pytest.fixture(scope="module")
def report(tmp_path_factory, clients):
    return run_new_client_experiment(tiny(), tmp_path_factory.mktemp("fed"), held_out=2,
                                     epochs=[0, 2], clients=clients)


def test_split_newcomers(clients):
    trained, newcomers = split_newcomers(clients, 2)
    assert [c.client_id for c in trained] == [0, 1, 2, 3, 4]
    assert [c.client_id for c in newcomers] == [5, 6]
    trained, newcomers = split_newcomers(clients, 2, "spread")
    assert [c.client_id for c in newcomers] == [3, 6]
    assert [c.client_id for c in trained] == [0, 1, 2, 4, 5]
    assert newcomer_indices(36, 6, "spread") == [5, 11, 17, 23, 29, 35]
    for bad in (0, 6, 2.0, True):
        with pytest.raises(NewClientError, match="held_out"):
            split_newcomers(clients, bad)
    with pytest.raises(NewClientError, match="selection"):
        split_newcomers(clients, 2, "random")


def test_spread_newcomers_link_to_trained_client_ids(tmp_path, clients):
    report = run_new_client_experiment(tiny(training={"rounds": 1}), tmp_path, held_out=2,
                                       epochs=[0], clients=clients, selection="spread")
    assert report.newcomers == [3, 6] and report.setup["selection"] == "spread"
    trained_ids = {0, 1, 2, 4, 5}
    # groups=2: newcomer 3 (group 1) links to odd ids, newcomer 6 (group 0) to even ids
    assert set(report.neighbours[0]) <= trained_ids and all(j % 2 == 1 for j in report.neighbours[0])
    assert set(report.neighbours[1]) <= trained_ids and all(j % 2 == 0 for j in report.neighbours[1])


def test_report_shape_and_table(report):
    assert report.newcomers == [5, 6] and report.trained == 5 and report.epochs == [0, 2]
    assert set(report.accuracy) == set(NEWCOMER_METHODS)
    for by_epoch in report.accuracy.values():
        assert set(by_epoch) == {0, 2}
        assert all(len(v) == 2 and all(0.0 <= a <= 1.0 for a in v) for v in by_epoch.values())
    # groups=2: newcomers 5 (odd, group 1) and 6 (even, group 0) link to their own group
    assert all(j % 2 == 1 for j in report.neighbours[0])
    assert all(j % 2 == 0 for j in report.neighbours[1])
    table = format_table(report)
    assert table.splitlines()[0] == "| method | 0 ep mean | 0 ep min | 2 ep mean | 2 ep min |"
    assert f"| fedora | {report.mean('fedora', 0):.4f} | {report.minimum('fedora', 0):.4f}" in table
    json.dumps(report.to_json())
    assert set(report.federation) >= {"fedora", "fedavg", "fedavg_ft"}


def test_zero_epoch_accuracies_are_what_each_newcomer_receives(tmp_path, clients, report):
    # Rebuild the federation from its checkpoints (the run directory is reused, not retrained)
    cfg = tiny().model_copy(update={"methods": ["fedora", "fedavg"]})
    trained, newcomers = split_newcomers(clients, 2)
    ctx = build_context(tiny(), clients)
    # Local at 0 epochs: the common initialization
    for k, c in enumerate(newcomers):
        assert report.accuracy["local"][0][k] == evaluate(ctx.flat, ctx.init, c.test_x, c.test_y).accuracy
    sim = Simulation(cfg, tmp_path, clients=trained)
    sim.run()
    fed, avg = sim.methods["fedora"], sim.methods["fedavg"]
    summaries = torch.stack([fedora.client_summary(c.train_x, c.train_y, 10, 1) for c in trained])
    for k, c in enumerate(newcomers):
        w = fedora.attach_new_client(
            fedora.client_summary(c.train_x, c.train_y, 10, 1), summaries,
            fed.relatedness.propagation, tau=10.0, k=2)
        phi = w.float() @ fed.theta
        assert report.accuracy["fedora"][0][k] == pytest.approx(
            evaluate(ctx.flat, phi, c.test_x, c.test_y).accuracy, abs=1e-9)
        assert report.accuracy["fedavg_ft"][0][k] == pytest.approx(
            evaluate(ctx.flat, avg.global_params, c.test_x, c.test_y).accuracy, abs=1e-9)


def test_local_epochs_change_the_newcomers_models(report):
    changed = sum(report.accuracy[m][0] != report.accuracy[m][2] for m in NEWCOMER_METHODS)
    assert changed >= 2


def test_rerun_reuses_the_trained_federation(tmp_path, clients):
    calls = []

    def count(method, rnd, total):
        calls.append((method, rnd))

    first = run_new_client_experiment(tiny(), tmp_path, held_out=2, epochs=[0, 1], clients=clients,
                                      progress=count)
    assert len(calls) == 2 * 3
    calls.clear()
    second = run_new_client_experiment(tiny(), tmp_path, held_out=2, epochs=[0, 1], clients=clients,
                                       progress=count)
    assert calls == []
    assert second.accuracy == first.accuracy


def test_bad_arguments(tmp_path, clients):
    with pytest.raises(NewClientError, match="epochs"):
        run_new_client_experiment(tiny(), tmp_path, held_out=2, epochs=[], clients=clients)
    with pytest.raises(NewClientError, match="non-negative"):
        run_new_client_experiment(tiny(), tmp_path, held_out=2, epochs=[0, -1], clients=clients)
    with pytest.raises(NewClientError, match="held_out"):
        run_new_client_experiment(tiny(), tmp_path, held_out=9, clients=clients)


def test_non_plain_relatedness_is_refused(tmp_path, clients):
    try:
        cfg = tiny(fedora={"relatedness": "encrypted"})
    except ValueError:
        pytest.skip("this build's config admits only plain relatedness")
    with pytest.raises(NewClientError, match="supports only 'plain'"):
        run_new_client_experiment(cfg, tmp_path, held_out=2, clients=clients)


def test_envelopes_are_refused_rather_than_silently_skipped(tmp_path, clients):
    cfg = tiny(security={"envelopes": True})
    with pytest.raises(NewClientError, match="security.envelopes"):
        run_new_client_experiment(cfg, tmp_path, held_out=2, clients=clients)
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_encrypted_propagation_is_refused_rather_than_run_in_the_clear(tmp_path, clients):
    """The federation ran CKKS propagation, but the newcomers' phi rows were computed from
    every trained client's plain parameters, and the report did not say so."""
    cfg = tiny(fedora={"propagation": "encrypted"})
    with pytest.raises(NewClientError, match="fedora.propagation = 'encrypted'"):
        run_new_client_experiment(cfg, tmp_path, held_out=2, clients=clients)
    assert not any(tmp_path.iterdir())


def test_dp_is_refused_rather_than_run_outside_the_privacy_plan(tmp_path, clients):
    """A private config of Local only passes validation; the experiment used to train FEDORA
    and FedAvg under it with plain summaries, lambda in the clear and newcomers outside any plan."""
    cfg = tiny(methods=["local"], privacy={"enabled": True, "epsilon": 4.0, "delta": 1e-3},
               data={"train_per_client": 32})
    with pytest.raises(NewClientError, match="privacy.enabled = true"):
        run_new_client_experiment(cfg, tmp_path, held_out=2, epochs=[0, 1], clients=clients)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_clients_for_a_late_joiner_is_said_plainly(n):
    """With fewer than 3 clients the allowed range of held_out is empty ("[1, 0]"): the error
    says what is needed instead."""
    with pytest.raises(NewClientError, match="at least 3 clients"):
        newcomer_indices(n, 1)


def test_k_not_below_the_trained_clients_is_refused_before_anything_trains(tmp_path):
    """4 clients, k = 3, 1 held out: the config accepted k = 3 < 4 = data.num_clients, and
    the federation trained its 3 clients at k = 3, each graph row silently keeping only the 2
    others, where a run refuses k >= data.num_clients. Now refused like a run's, naming the
    keys, before anything is trained or written; k = 2 still trains."""
    cfg = tiny(data={"num_clients": 4}, training={"rounds": 1}, fedora={"k": 3})
    four = build_clients(cfg)
    with pytest.raises(NewClientError, match=r"fedora\.k = 3 must be smaller than the 3 clients "
                                             r"the federation trains \(4 clients less held_out = 1"):
        run_new_client_experiment(cfg, tmp_path / "k3", held_out=1, epochs=[0], clients=four)
    assert not any(tmp_path.iterdir())
    report = run_new_client_experiment(tiny(data={"num_clients": 4}, training={"rounds": 1},
                                            fedora={"k": 2}),
                                       tmp_path / "k2", held_out=1, epochs=[0], clients=four)
    assert report.trained == 3 and len(report.neighbours[0]) == 2


def test_a_rerun_with_other_arguments_says_to_pass_another_run_dir(tmp_path, clients):
    """Rerunning in a folder whose federation was trained with other arguments was refused by
    the resume's checkpoint check ("refuse to resume"), which named no next step: the
    experiment has no resume option, so the message now says to pass another run_dir."""
    from secure_fedora.runtimes.inprocess import CheckpointError

    run_new_client_experiment(tiny(), tmp_path, held_out=2, epochs=[0], clients=clients)
    with pytest.raises(CheckpointError, match=r"another data fingerprint .*; this experiment "
                                              r"reuses the federation in .* pass another run_dir"):
        run_new_client_experiment(tiny(), tmp_path, held_out=1, epochs=[0], clients=clients)


def test_a_busy_or_unreadable_run_dir_is_not_told_to_pass_other_arguments(tmp_path, clients,
                                                                          monkeypatch):
    """A run_dir another process held got "... in use by another process ...; this experiment
    reuses the federation in ... only when rerun with the config ...: pass another run_dir",
    advice about arguments that had nothing to do with it; it now gets the run's own message,
    and so does one that cannot be opened."""
    import fcntl
    import os

    from secure_fedora.runtimes.rundir import RunDirUnavailableError
    from tests.secure_fedora.runtimes.test_rundir import unreadable

    busy = tmp_path / "busy"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)  # another open of the directory: its flock conflicts
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirUnavailableError) as info:
            run_new_client_experiment(tiny(), busy, held_out=2, epochs=[0], clients=clients)
    finally:
        os.close(fd)
    assert str(info.value) == (f"run directory {busy} is in use by another process (a run or "
                               "resume writing it); wait until it ends, or stop it, then try again")
    assert list(busy.iterdir()) == []
    closed = tmp_path / "closed"
    closed.mkdir()
    unreadable(monkeypatch, closed)
    with pytest.raises(RunDirUnavailableError, match=r"cannot open run directory .*; nothing "
                                                     r"was written$"):
        run_new_client_experiment(tiny(), closed, held_out=2, epochs=[0], clients=clients)
    closed.chmod(0o700)


def test_newcomers_train_on_the_configured_threads_and_the_process_gets_its_own_back(
        tmp_path, clients, monkeypatch):
    """The federation's run sets torch to training.threads only while it runs; the newcomers,
    trained after it, run on those threads too, and the process's own count is back after."""
    import secure_fedora.experiments.newclients as newclients

    before = torch.get_num_threads()
    assert before != 2  # tests/conftest.py runs each test process on one thread
    seen = []
    real = newclients.evaluate

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(newclients, "evaluate", recording)
    try:
        run_new_client_experiment(tiny(training={"threads": 2}), tmp_path, held_out=2,
                                  epochs=[0], clients=clients)
        assert seen and set(seen) == {2}
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


class _WritesOnceTrained(torch.nn.Module):
    """Reads its input; with ``write``, an eval-mode forward once its weights left their
    initial values writes the input in place (no value changes): the probe before training
    cannot see it."""

    def __init__(self, input_shape, num_classes, write):
        super().__init__()
        self.linear = torch.nn.Linear(int(torch.Size(input_shape).numel()), num_classes)
        self.initial = self.linear.weight.detach().clone()
        self.write = write

    def forward(self, x):
        if self.write and not self.training and not torch.equal(self.linear.weight, self.initial):
            x.mul_(1.0)
        return self.linear(x.flatten(1))


def test_a_model_writing_a_newcomers_split_only_in_its_evaluations_stops_the_experiment(
        tmp_path, clients):
    """The federation's runs check the splits after every round and the finalize exchange;
    the newcomers' training and evaluations came after, unchecked: a model writing a
    newcomer's split there went unnoticed and its accuracies were reported."""
    def context_factory(cfg, some):
        # the federation (the trained clients) reads; the newcomers' context (all) writes
        write = len(some) == len(clients)
        return build_context(cfg, some, model_factory=lambda shape, c: _WritesOnceTrained(
            shape, c, write))

    with pytest.raises(ModelError, match=r"^the model factory wrote client \d+'s (train|val|test) "
                                         r"split in place in newcomer client \d+'s training and "
                                         r"evaluation .* the run stops here"):
        run_new_client_experiment(tiny(), tmp_path, held_out=2, epochs=[0, 1], clients=clients,
                                  context_factory=context_factory)
