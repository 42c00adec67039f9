"""The baselines keep the method contract: the server half never reads client data, client
``i``'s half reads only client ``i``'s data and its own state, and running the halves apart
(one object per message, state carried only by ``client_state_dict``) gives exactly the
in-process results."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch

from secure_fedora.algorithms.baselines import BASELINE_NAMES, make_baseline
from secure_fedora.algorithms.contract import method_class, method_releases
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import build_clients, build_context

N = 5
PARAMS = {"ifca": {"num_clusters": 3}, "apfl": {"alpha": 0.4}}
ROUNDS = [(1, [0, 2, 3]), (2, [1, 2, 4]), (3, [0, 1, 2, 3, 4])]


class ClientDataRead(AssertionError):
    """A half read client data it must not read."""


class NoClientData(Sequence):
    """Stands for ``ctx.clients`` on the server: its length (the number of clients, public)
    and nothing else."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        raise ClientDataRead(f"the server half read client {i}'s data")

    def __iter__(self):
        raise ClientDataRead("the server half iterated over the clients' data")


class OnlyClient(NoClientData):
    """Stands for ``ctx.clients`` in client ``i``'s process: client ``i``'s data only."""

    def __init__(self, clients, i: int) -> None:
        super().__init__(len(clients))
        self.client, self.i = clients[i], i

    def __getitem__(self, j):
        if j != self.i:
            raise ClientDataRead(f"client {self.i}'s half read client {j}'s data")
        return self.client


def tiny():
    return parse_config({
        "name": "contract", "seed": 5, "methods": ["local"],
        "data": {"num_clients": N, "train_per_client": 32, "val_per_client": 16,
                 "test_per_client": 32, "groups": 2},
        "training": {"rounds": 3, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
    })


@pytest.fixture(scope="module")
def clients():
    return build_clients(tiny())


def clone(payload):
    return {k: v.clone() for k, v in payload.items()}


def in_process(name, clients):
    """The in-process reference: the generic round on one object."""
    method = make_baseline(name, build_context(tiny(), clients), PARAMS.get(name, {}))
    method.setup()
    stats = [method.train_round(rnd, parts) for rnd, parts in ROUNDS]
    rows = [method.eval_row(i).clone() for i in range(N)]
    return stats, rows, method.extra_results()


def apart(name, clients):
    """The same run with the halves apart: a server object whose context holds no client
    data, and a fresh object per client message whose context holds only that client's data,
    its state carried between messages only by client_state_dict/load_client_state_dict."""
    ctx = build_context(tiny(), clients)
    params = PARAMS.get(name, {})
    server = make_baseline(name, dataclasses.replace(ctx, clients=NoClientData(N)), params)
    states: dict[int, dict] = {}

    def client(i):
        obj = make_baseline(name, dataclasses.replace(ctx, clients=OnlyClient(clients, i)), params)
        if i in states:
            obj.load_client_state_dict(i, states[i])
        return obj

    def exchange(messages, call):
        replies = {}
        for i, message in messages.items():
            obj = client(i)
            replies[i] = clone(call(obj, i, message))
            states[i] = clone(obj.client_state_dict(i))
        return replies

    setup = server.setup_messages()
    if setup:
        server.server_setup(exchange(setup, lambda o, i, m: o.client_setup(i, m)))
    stats = []
    for rnd, parts in ROUNDS:
        replies = exchange(server.configure(rnd, parts),
                           lambda o, i, m, rnd=rnd: o.client_update(i, rnd, m))
        stats.append({**server.round_statistics(rnd, replies), **server.aggregate(rnd, replies)})
    messages = server.evaluation_messages(ROUNDS[-1][0], list(range(N)))
    rows = [client(i).client_eval_row(i, messages.get(i)).clone() for i in range(N)]
    final = server.finalize_messages()
    extra = server.server_finalize(exchange(final, lambda o, i, m: o.client_finalize(i, m))) \
        if final else {}
    return stats, rows, extra


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_halves_apart_equal_the_in_process_run(clients, name):
    ref_stats, ref_rows, ref_extra = in_process(name, clients)
    stats, rows, extra = apart(name, clients)
    assert stats == ref_stats
    for i in range(N):
        assert torch.equal(rows[i], ref_rows[i]), i
    assert extra == ref_extra


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_the_guards_catch_a_half_that_reads_other_data(clients, name):
    """The guards above can fail: a client half run on the server's context, or on another
    client's, raises."""
    ctx = build_context(tiny(), clients)
    params = PARAMS.get(name, {})
    reference = make_baseline(name, ctx, params)
    message = reference.configure(1, [0])[0]
    on_server = make_baseline(name, dataclasses.replace(ctx, clients=NoClientData(N)), params)
    with pytest.raises(ClientDataRead):
        on_server.client_update(0, 1, message)
    elsewhere = make_baseline(name, dataclasses.replace(ctx, clients=OnlyClient(clients, 1)),
                              params)
    with pytest.raises(ClientDataRead):
        elsewhere.client_update(0, 1, message)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_registered_as_classes_with_one_dpsgd_model_release(name):
    cls = method_class(name)
    assert cls is not None and cls.name == name
    cfg = tiny().model_copy(update={"methods": [name]})
    assert [(s.kind, s.mechanisms, s.when) for s in method_releases(name, cfg)] == [
        ("model", ("dpsgd",), "round")]
    cls.check_config(cfg)


def test_client_state_is_validated(clients):
    ctx = build_context(tiny(), clients)
    apfl = make_baseline("apfl", ctx, {})
    state = clone(apfl.client_state_dict(2))
    assert set(state) == {"theta", "alpha"}
    with pytest.raises(ValueError, match="alpha"):
        apfl.load_client_state_dict(2, {**state, "alpha": torch.tensor(1.5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="theta"):
        apfl.load_client_state_dict(2, {**state, "theta": torch.full_like(state["theta"], float("nan"))})
    ifca = make_baseline("ifca", ctx, {})
    assert ifca.client_state_dict(0) == {}
    with pytest.raises(ValueError, match="empty"):
        ifca.load_client_state_dict(0, {"theta": state["theta"]})
    for name in ("fedprox", "ditto", "fedamp"):
        method = make_baseline(name, ctx, {})
        assert set(method.client_state_dict(0)) == {"theta"}


def test_ifca_config_check_refuses_unaccounted_cluster_choices():
    from secure_fedora.algorithms.baselines import IFCA, BaselineConfigError

    dp = tiny().model_copy(update={
        "privacy": tiny().privacy.model_copy(update={"enabled": True}),
        "baselines": {"ifca": {"selection_split": "train"}}})
    with pytest.raises(BaselineConfigError, match="selection_split='val'"):
        IFCA.check_config(dp)
    private_val = tiny().model_copy(update={
        "data": tiny().data.model_copy(update={"validation": "private"}),
        "baselines": {"ifca": {"selection_split": "val"}}})
    with pytest.raises(BaselineConfigError, match="data.validation is 'private'.*set "
                                                  "data.validation='public'.*leave 'ifca' out"):
        IFCA.check_config(private_val)
    both = dp.model_copy(update={"data": private_val.data})
    with pytest.raises(BaselineConfigError, match="selection_split='val' with data.validation='public'"):
        IFCA.check_config(both)
    with pytest.raises(BaselineConfigError, match=r"baselines\.ifca\.num_clusters"):
        IFCA.check_config(tiny().model_copy(update={"baselines": {"ifca": {"num_clusters": 0}}}))


def test_ifca_server_leaves_out_a_reply_with_an_invalid_cluster_choice(clients, caplog):
    ctx = build_context(tiny(), clients)
    method = make_baseline("ifca", ctx, {"num_clusters": 2})
    replies = method.client_update_many(1, method.configure(1, [0, 1, 2]))
    good = {i: clone(r) for i, r in replies.items() if i != 1}
    reference = make_baseline("ifca", build_context(tiny(), clients), {"num_clusters": 2})
    reference.aggregate(1, good)
    replies[1]["cluster_choice"] = torch.tensor([2.5])
    with caplog.at_level("WARNING", logger="secure_fedora.algorithms.baselines"):
        method.aggregate(1, replies)
    assert "client 1" in caplog.text and "not an integer" in caplog.text
    assert torch.equal(method.clusters, reference.clusters)
    assert method.assignment[1] == -1


def test_config_validation_runs_the_baseline_checks():
    """The config refuses an unaccounted IFCA choice when it is parsed, before anything runs."""
    body = {"name": "contract", "methods": ["ifca"],
            "data": {"num_clients": N, "train_per_client": 32},
            "privacy": {"enabled": True, "epsilon": 4.0, "delta": 1e-3}}
    with pytest.raises(ValueError, match="selection_split='val'"):
        parse_config(body)
    parse_config({**body, "baselines": {"ifca": {"selection_split": "val"}}})


def test_ifca_reuses_a_choice_only_for_the_same_cluster_models(clients, monkeypatch):
    method = make_baseline("ifca", build_context(tiny(), clients), {"num_clusters": 3})
    calls = []
    choose = method.choose
    monkeypatch.setattr(method, "choose", lambda i, c: calls.append(i) or choose(i, c))
    method.train_round(1, [0, 1])
    assert calls == [0, 1] and method.version == 1
    for i in range(N):  # the clusters changed: every evaluated client chooses again
        method.eval_row(i)
    assert calls == [0, 1, 0, 1, 2, 3, 4]
    method.train_round(2, [0, 1])  # the same cluster models as evaluated: no new choice
    assert calls == [0, 1, 0, 1, 2, 3, 4] and method.version == 2
    method.eval_row(0)
    assert calls[-1] == 0 and len(calls) == 8
    state = {k: v.clone() for k, v in method.state_dict().items()}
    state["clusters_version"] = torch.tensor(-1)
    with pytest.raises(ValueError, match="clusters_version"):
        method.load_state_dict(state)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_eval_rows_asks_for_every_client_once_and_equals_eval_row(clients, name, monkeypatch):
    """The in-process evaluation asked evaluation_messages once per client; eval_rows asks
    once for all the clients it evaluates (as Flower does) and gives eval_row's rows."""
    method = make_baseline(name, build_context(tiny(), clients), PARAMS.get(name, {}))
    method.setup()
    for rnd, parts in ROUNDS:
        method.train_round(rnd, parts)
    asked = []
    messages = method.evaluation_messages
    monkeypatch.setattr(method, "evaluation_messages",
                        lambda rnd, ids: asked.append((rnd, list(ids))) or messages(rnd, ids))
    rows = [row.clone() for row in method.eval_rows(range(N))]
    assert asked == [(ROUNDS[-1][0], list(range(N)))]
    for i in range(N):
        assert torch.equal(method.eval_row(i), rows[i]), i
    assert asked[1:] == [(ROUNDS[-1][0], [i]) for i in range(N)]
