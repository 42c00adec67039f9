"""The generic Flower runtime: payload encoding, the shared results schema, data isolation
of the method halves, and every method on the in-memory grid against the in-process runtime."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from privacy.envelope import Envelope, EnvelopeError
from secure_fedora.algorithms.contract import ContractError, ReplySchema, method_class
from secure_fedora.core.config import config_hash, parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.contexts import ClientDataSlots, DataAccessError
from secure_fedora.runtimes.flower.payloads import (
    PayloadLimits,
    payload_to_record,
    record_to_payload,
)
from secure_fedora.runtimes.flower.protocol import DeployError, RunSettings, check_supported
from secure_fedora.runtimes.flower.state import ClientRunState, NodeStateError
from secure_fedora.runtimes.inprocess import build_clients, load_checkpoint
from secure_fedora.runtimes.results import RESERVED_KEYS, build_results
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    dp_config,
    in_process,
    run_config,
    task_identity,  # noqa: F401 - a fixture
    tiny_config,
    with_methods,
)

ALL_METHODS = ("fedora", "local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca")
ENVELOPE = Envelope(sender="client-001", recipient="server", round=3, nonce="00" * 16,
                    kind="train.round.reply", payload_sha256="00" * 32, signature="00" * 64)


# --------------------------------------------------------------------------- payloads


def test_payload_round_trip_keeps_dtype_shape_and_values() -> None:
    payload = {"theta": torch.randn(5), "u": torch.randn(4, 2, dtype=torch.float64),
               "steps": torch.tensor(7), "flag": torch.tensor([True, False]),
               "blob": torch.arange(6, dtype=torch.uint8)}
    back = record_to_payload(payload_to_record(payload), ENVELOPE, "reply")
    assert list(back) == list(payload)
    for name, tensor in payload.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    assert record_to_payload(payload_to_record({}), ENVELOPE, "reply") == {}


@pytest.mark.parametrize(("payload", "match"), [
    ({"bad name!": torch.zeros(1)}, "plain identifier"),
    ({"x": torch.tensor([1.0, float("nan")])}, "non-finite"),
    ({"x": torch.zeros(1, 1, 1, 1, 1)}, "5 dimensions"),
    ({"x": torch.zeros(2, dtype=torch.complex64)}, "dtype"),
    ({"x": [1.0]}, "not a tensor"),
])
def test_payload_encoding_refuses_what_it_would_not_accept(payload: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        payload_to_record(payload)


def test_payload_decoding_refuses_malformed_records_naming_the_sender() -> None:
    limits = PayloadLimits(max_tensors=2, max_bytes=400)
    cases = [
        (ConfigRecord({"x": 1}), "not an ArrayRecord"),
        (ArrayRecord({"a": Array(np.zeros(1)), "b": Array(np.zeros(1)),
                      "c": Array(np.zeros(1))}), "3 tensors"),
        (ArrayRecord({"a": Array(np.zeros(100))}), "more than 400 bytes"),
        (ArrayRecord({"a": Array(np.array([np.inf]))}), "non-finite"),
        (ArrayRecord({"a": Array(np.zeros(2, dtype=np.complex64))}), "dtype complex64"),
        (ArrayRecord({"a": Array(np.array(["x"]))}), "dtype"),
    ]
    for record, match in cases:
        with pytest.raises(EnvelopeError, match=match) as info:
            record_to_payload(record, ENVELOPE, "round reply", limits)
        assert info.value.sender == "client-001" and info.value.round == 3


def test_reply_schema_refuses_a_differently_shaped_tensor_of_the_same_exchange() -> None:
    schema = ReplySchema()
    schema.check("m", "round", 0, {"theta": torch.zeros(5), "steps": torch.tensor(1)})
    schema.check("m", "round", 1, {"theta": torch.ones(5)})
    schema.check("m", "setup", 0, {"theta": torch.zeros(3)})  # another exchange: its own pins
    with pytest.raises(ContractError, match=r"method 'm': client 2's round reply entry 'theta' "
                                            r"is torch.float32 \(6,\)"):
        schema.check("m", "round", 2, {"theta": torch.zeros(6)})
    with pytest.raises(ContractError, match="float64"):
        schema.check("m", "round", 2, {"steps": torch.tensor(1.0, dtype=torch.float64)})
    # what Flower's ClientApp cannot encode is refused alike in process
    with pytest.raises(ContractError, match="'bad name' has a name that is not a plain"):
        schema.check("m", "round", 2, {"bad name": torch.zeros(1)})
    with pytest.raises(ContractError, match="'u' has dtype torch.bfloat16"):
        schema.check("m", "round", 2, {"u": torch.zeros(1, dtype=torch.bfloat16)})


# --------------------------------------------------------------------------- data isolation, state


def test_client_data_slots_refuse_every_read_but_the_held_client() -> None:
    client = build_clients(tiny_config())[1]
    server = ClientDataSlots(3)
    assert len(server) == 3
    with pytest.raises(DataAccessError, match="the server read client 0"):
        server[0]
    with pytest.raises(DataAccessError):
        list(server)
    mine = ClientDataSlots(3, 1, client, party="client 1")
    assert mine[1] is client and mine[-2] is client
    with pytest.raises(DataAccessError, match="client 1 read client 2"):
        mine[2]
    with pytest.raises(IndexError):
        mine[3]


def test_client_run_state_round_trips_and_refuses_foreign_or_bad_files(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1).get_state()
    state = ClientRunState(1, 7, "hash", "fedavg", gen, algorithm={"theta": torch.ones(4)},
                           answered={"round": 2}, replies={"round": {"theta": torch.ones(4)}},
                           metrics={"round": {}}, refusals={})
    path = tmp_path / "client.pt"
    state.save(path)
    back = ClientRunState.load(path, 1, 7, "hash", "fedavg")
    assert torch.equal(back.algorithm["theta"], torch.ones(4)) and back.answered == {"round": 2}
    for args, match in (((2, 7, "hash", "fedavg"), "client_id"), ((1, 8, "hash", "fedavg"), "run_id"),
                        ((1, 7, "other", "fedavg"), "config_hash"),
                        ((1, 7, "hash", "local"), "method")):
        with pytest.raises(NodeStateError, match=match):
            ClientRunState.load(path, *args)
    state.algorithm = {"theta": torch.tensor([float("nan")])}
    with pytest.raises(NodeStateError, match="non-finite"):
        state.save(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(NodeStateError, match="corrupt"):
        ClientRunState.load(path, 1, 7, "hash", "fedavg")


def test_check_supported_refuses_a_method_without_a_client_half() -> None:
    def legacy(ctx, cfg):  # a factory that names no contract class
        raise AssertionError("never built")

    METHODS.register("legacy_x", legacy)
    try:
        from secure_fedora.core.config import parse_config

        data = tiny_config().model_dump(mode="json", exclude_none=True)
        cfg = parse_config({**data, "methods": ["legacy_x", "local"]})
        with pytest.raises(DeployError, match="'legacy_x' does not implement the method contract"):
            check_supported(cfg)
    finally:
        METHODS.unregister("legacy_x")


def test_check_supported_names_a_method_whose_distributed_unsupported_raises() -> None:
    """A plug-in's ``distributed_unsupported`` that raised surfaced as a bare traceback from
    the deployment's checks; now a PluginError names the method and the hook."""
    from secure_fedora.algorithms.methods import Local
    from secure_fedora.core.plugins import PluginError

    def unsupported(cls, cfg):  # type: ignore[no-untyped-def]
        raise AttributeError("no such key")

    METHODS.register("raising_flower_x",
                     type("RaisingFlower", (Local,),
                          {"distributed_unsupported": classmethod(unsupported)}))
    try:
        data = tiny_config().model_dump(mode="json", exclude_none=True)
        cfg = parse_config({**data, "methods": ["raising_flower_x"]})
        with pytest.raises(PluginError, match=r"^method 'raising_flower_x': its "
                                              r"distributed_unsupported\(cfg\) raised "
                                              r"AttributeError: no such key \(at .*"
                                              r"test_generic_runtime.py:\d+ in unsupported\)$"):
            check_supported(cfg)
    finally:
        METHODS.unregister("raising_flower_x")


def test_results_builder_refuses_runtime_keys_that_replace_shared_ones() -> None:
    cfg = tiny_config()
    entry = {"name": "local", "selected": {"mean": 0.5, "per_client": [0.5], "round": 1},
             "final": {"mean": 0.5}, "rounds": 1, "seconds_training": 0.0,
             "seconds_evaluation": 0.0, "extra": {}}
    doc = build_results(cfg, runtime="flower", config_hash="h", metric="accuracy",
                        outcomes={"local": entry}, privacy=None, clients=[],
                        runtime_keys={"run_id": 3})
    assert doc["methods"]["local"]["metric"] == "accuracy" and doc["run_id"] == 3
    # compute: where the runtime knows it; non_finite_values: where a figure was NaN or inf
    assert RESERVED_KEYS - {"compute", "non_finite_values"} <= set(doc)
    with pytest.raises(ValueError, match="methods"):
        build_results(cfg, runtime="flower", config_hash="h", metric="accuracy", outcomes={},
                      privacy=None, clients=[], runtime_keys={"methods": {}})


# --------------------------------------------------------------------------- every method


def _ported(name: str) -> bool:
    from secure_fedora.runtimes.flower.protocol import _implements_halves

    cls = method_class(name)
    return cls is not None and _implements_halves(cls)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_on_the_grid_equals_the_in_process_runtime(tmp_path: Path, method: str) -> None:
    """Each client half runs with only its own data (any other read raises); per-client
    metrics and every client's final state equal the in-process run within 1e-4."""
    if not _ported(method):
        pytest.skip(f"{method} is not ported to the method contract on this branch yet")
    cfg = with_methods(tiny_config(rounds=3, participation=0.5), method)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == [] and results["events"] == []
    sim, outcome = in_process(cfg, tmp_path, method)
    ours = results["methods"][method]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], outcome.to_json()[part]["per_client"],
                           atol=1e-4, rtol=0), part
    assert ours["selected"]["round"] == outcome.selected["round"]
    assert [r["participants"] for r in results["rounds"]] == [2, 2, 2]
    reference = sim.methods[method]
    for c in range(3):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / method
                                    / "client.pt", c, 42, config_hash(cfg), method)
        expected = reference.client_state_dict(c)
        assert sorted(state.algorithm) == sorted(expected)
        for key, value in expected.items():
            assert torch.allclose(state.algorithm[key], value.cpu(), atol=1e-4, rtol=0), (c, key)
    on_disk = json.loads((tmp_path / "res" / "results.json").read_text())
    assert on_disk["runtime"] == "flower" and on_disk["methods"][method] == json.loads(
        json.dumps(ours))
    for extra_key, value in outcome.extra.items():
        if extra_key != "security" and isinstance(value, list):
            assert np.allclose(ours["extra"][extra_key], value, atol=1e-4, rtol=0)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("propagation", ["sparse", "factored"])
def test_grid_fedora_with_a_sparse_operator_equals_the_in_process_runtime(tmp_path: Path,
                                                                          propagation: str) -> None:
    """The sparse (or factored) operator's per-round phi rows (computed for each round's
    participants when the server sends them) reach the Flower clients with the in-process
    run's values."""
    base = with_methods(tiny_config(rounds=3, participation=0.5), "fedora")
    cfg = parse_config({**base.model_dump(mode="json", exclude_none=True),
                        "fedora": {**base.fedora.model_dump(mode="json"), "propagation": propagation}})
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == [] and results["events"] == []
    sim, outcome = in_process(cfg, tmp_path, "fedora")
    assert sim.methods["fedora"].relatedness.operator.kind == propagation
    ours = results["methods"]["fedora"]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], outcome.to_json()[part]["per_client"],
                           atol=1e-4, rtol=0), part
    assert [r["participants"] for r in results["rounds"]] == [2, 2, 2]
    for c in range(3):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora"
                                    / "client.pt", c, 42, config_hash(cfg), "fedora")
        assert torch.allclose(state.algorithm["theta"], sim.methods["fedora"].theta[c],
                              atol=1e-4, rtol=0), c


@pytest.mark.usefixtures("task_identity")
def test_grid_dp_methods_equal_in_process_and_anchor_every_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and, the validation data being private, no client evaluates (or reports to the
    server) a validation metric: not in evaluation rounds, not in FedAvg's fine-tuning."""
    import shutil

    import secure_fedora.algorithms.methods as methods_module
    from audits.verify import verify_run
    from privacy.identity import client_ids, load_identity
    from privacy.ledger import line_hash, read_ledger, verify_ledger_file
    from secure_fedora.runtimes.flower import client_app

    evaluated: list[int] = []
    for module in (client_app, methods_module):
        def spy(flat, row, x, y, *args, _real=module.evaluate, **kwargs):  # type: ignore[no-untyped-def]
            evaluated.append(int(x.shape[0]))
            return _real(flat, row, x, y, *args, **kwargs)
        monkeypatch.setattr(module, "evaluate", spy)
    cfg = with_methods(dp_config(noise="reproducible"), "fedavg", "ditto")
    assert (cfg.data.val_per_client, cfg.data.test_per_client) == (32, 64)
    result_dir = tmp_path / "result"
    result_dir.mkdir()
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True, "compare-methods": True,
                                      "result-dir": str(result_dir)})
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    assert evaluated and set(evaluated) == {64}  # test splits only
    assert "val-metric" not in json.dumps(results) and "evaluation_reports" in results["assumptions"]
    assert "composition" in results["assumptions"]["methods_on_one_server"]
    audit = tmp_path / "audit"
    shutil.copyfile(result_dir / "results.json", audit.mkdir() or audit / "results.json")
    for method in ("fedavg", "ditto"):
        sim, outcome = in_process(cfg, tmp_path / method, method)
        ours = results["methods"][method]
        assert np.allclose(ours["selected"]["per_client"], outcome.selected["per_client"],
                           atol=1e-4, rtol=0)
        spent = {r["client"]: r["epsilon_spent"] for r in sim.privacy[method]["clients"]}
        theirs, mine = sim.privacy[method], results["privacy"][method]
        # the same calibration and the same model (its fingerprint), in both runtimes
        for key in ("accountant", "accountant_choice", "sample_rate", "steps_per_round",
                    "model_fingerprint"):
            assert mine[key] == theirs[key], key
        # the same plan; only the stages differ (a node signs its replies, journaled apart)
        assert [{**r, "release_stages": None} for r in mine["plan"]] == \
            [{**r, "release_stages": None} for r in theirs["plan"]]
        assert mine["plan"][0]["release_stages"] == mine["release_stages"]
        for row, twin in zip(mine["clients"], theirs["clients"], strict=True):
            for key in ("epsilon_budget", "delta", "noise_multiplier"):
                assert row[key] == twin[key], key
        (audit / "ledgers" / method).mkdir(parents=True)
        for c, cid in enumerate(client_ids(3)):
            row = results["privacy"][method]["clients"][c]
            assert row["client"] == cid and not row["refused"]
            assert row["epsilon_spent"] == pytest.approx(spent[cid], abs=1e-6)
            ledger = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / method / f"{cid}.jsonl"
            key = load_identity(tmp_path / "ids" / cid, cid).signing_key.public_key()
            assert verify_ledger_file(ledger, key) == []
            assert [e["mechanism"] for e in read_ledger(ledger)] == ["dpsgd", "dpsgd", "close"]
            assert row["ledger_head"] == line_hash(ledger.read_text().splitlines()[-1])
            shutil.copyfile(ledger, audit / "ledgers" / method / f"{cid}.jsonl")
    anchor = json.loads((result_dir / "anchor.json").read_text())
    assert sorted(anchor["ledgers"]) == [f"{m}/{cid}" for m in ("ditto", "fedavg")
                                         for cid in client_ids(3)]
    report = verify_run(audit, allowlist=tmp_path / "ids" / "server" / "allowlist.json",
                        anchor=result_dir / "anchor.json")
    assert not [f for f in report.errors if f.check.startswith("anchor")], report.errors


@pytest.mark.usefixtures("task_identity")
def test_a_plug_in_s_declared_reply_entries_and_reasons_are_in_both_runtimes_results(
        tmp_path: Path) -> None:
    """Under DP a plug-in's reply may carry an entry it declares with its own reason ("a
    public value"); both runtimes accepted it, and neither results.json said so. Both now
    state every method's declared reply entries and reasons, identically, under
    ``privacy.<method>.reply_entries``, the plug-in's own claim marked ``built_in`` false."""
    from secure_fedora.algorithms.contract import ROUND
    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.runtimes.inprocess import Simulation

    class DeclaresAPublicValue(FedAvg):
        @classmethod
        def reply_entries(cls, cfg, stage):  # type: ignore[no-untyped-def]
            entries = super().reply_entries(cfg, stage)
            return {**entries, "mean_x": "a public value"} if stage == ROUND else entries

        def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
            return {**super().client_update(i, rnd, message), "mean_x": torch.zeros(1)}

    name = "declares_public_x"
    METHODS.register(name, DeclaresAPublicValue)
    try:
        cfg = with_methods(dp_config(rounds=1), name)
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        assert grid.errors == [] and results["events"] == []
        inproc = Simulation(cfg, tmp_path / "inproc", keystore=tmp_path / "keystore").run()
    finally:
        METHODS.unregister(name)
    on_disk = json.loads((tmp_path / "res" / "results.json").read_text())
    declared = on_disk["privacy"][name]["reply_entries"]
    assert declared == json.loads((tmp_path / "inproc" / "results.json").read_text())[
        "privacy"][name]["reply_entries"] == inproc["privacy"][name]["reply_entries"]
    assert set(declared) == {"setup", "round", "finalize"} and declared["setup"] == {}
    assert declared["round"]["mean_x"] == {"reason": "a public value", "built_in": False}
    assert {e for e, d in declared["round"].items() if d["built_in"]} == {
        "theta", "steps", "num_examples"}
    assert declared["round"]["theta"]["reason"].startswith("the round's model, trained with DP-SGD")
    assert declared["finalize"] == {}  # a class built on FedAvg fine-tunes only if it declares it


@pytest.mark.usefixtures("task_identity")
def test_grid_refused_release_is_a_refusal_reply_and_the_client_takes_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose gate refuses its round-2 release answers with a refusal record (no
    payload); the server records the event, aggregates without it and reports it refused;
    the client releases nothing afterwards."""
    from secure_fedora.runtimes.flower import client_app

    original = client_app.ClientSidePrivacy.admit

    def admit(self, i, rnd, theta, with_lambda, noise=None):  # type: ignore[no-untyped-def]
        if i == 1 and rnd == 2:  # what the gate does on a refusal
            self.sole.refused_at, self.sole.refusal = rnd, "budget exhausted (test)"
            return False
        return original(self, i, rnd, theta, with_lambda, noise=noise)

    monkeypatch.setattr(client_app.ClientSidePrivacy, "admit", admit)
    cfg = with_methods(dp_config(rounds=2, noise="reproducible"), "fedavg")
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True})
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    events = {(e["round"], e["client"]): e["event"] for e in results["events"]}
    assert list(events) == [(2, 1)] and "budget exhausted (test)" in events[2, 1]
    assert [r["replied"] for r in results["rounds"]] == [3, 2]
    rows = results["privacy"]["fedavg"]["clients"]
    assert [r["refused"] for r in rows] == [False, True, False]
    state = ClientRunState.load(tmp_path / "nodes" / "node-1" / "runs" / "42" / "fedavg"
                                / "client.pt", 1, 42, config_hash(cfg), "fedavg")
    assert state.refusals == {"round": "budget exhausted (test)"} and state.replies["round"] == {}


@pytest.mark.usefixtures("task_identity")
def test_both_runtimes_write_the_same_client_rows_for_a_refused_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower wrote ``refused`` with ``accountant``, ``index``, ``plan_reported`` and the
    summary and lambda noise per client, in process ``refused_at_round`` instead: the same
    DP run with client 1's round-2 release refused now writes the same keys in both
    runtimes, with the same values (the refusal's round included)."""
    from secure_fedora.secure.private import FederationPrivacy

    original = FederationPrivacy.admit

    def admit(self, i, rnd, theta, with_lambda, noise=None):  # type: ignore[no-untyped-def]
        if i == 1 and rnd == 2:  # what the gate does on a refusal (in both runtimes)
            self.clients[i].refused_at, self.clients[i].refusal = rnd, "budget exhausted (test)"
            return False
        return original(self, i, rnd, theta, with_lambda, noise=noise)

    monkeypatch.setattr(FederationPrivacy, "admit", admit)
    cfg = with_methods(dp_config(rounds=2, noise="reproducible"), "fedora")
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True})
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    sim, _ = in_process(cfg, tmp_path, "fedora")
    grid_rows = results["privacy"]["fedora"]["clients"]
    local_rows = sim.privacy["fedora"]["clients"]
    assert [list(r) for r in grid_rows] == [list(r) for r in local_rows]
    from secure_fedora.secure.private import CLIENT_ROW_KEYS

    assert [list(r) for r in grid_rows] == [list(CLIENT_ROW_KEYS)] * 3
    assert [(r["refused"], r["refused_at_round"]) for r in grid_rows] == \
        [(False, None), (True, 2), (False, None)]
    for row, twin in zip(grid_rows, local_rows, strict=True):
        for key in ("client", "index", "epsilon_budget", "delta", "noise_multiplier",
                    "accountant", "summary_noise", "lambda_noise", "mechanism_noise",
                    "plan_reported", "refused", "refused_at_round", "ledger_entries"):
            assert row[key] == twin[key], key
        assert row["epsilon_spent"] == pytest.approx(twin["epsilon_spent"], rel=1e-9)
        assert row["summary_noise"] > 0 and row["lambda_noise"] > 0
        assert len(row["ledger_head"]) == len(twin["ledger_head"]) == 64  # each its own ledger's


@pytest.mark.usefixtures("task_identity")
def test_a_resumed_flower_run_keeps_the_refusal_round_and_reads_an_older_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp checkpoints the round of each client's first refused release; a
    checkpoint of an older ServerApp lists the refused clients alone: a resume of it states
    them refused with ``refused_at_round`` -1 (round not recorded), as in process for a client
    refused before a restart."""
    from secure_fedora.core import crashpoints
    from secure_fedora.runtimes.flower.protocol import MSG_ROUND
    from secure_fedora.runtimes.inprocess import save_checkpoint
    from secure_fedora.secure.private import FederationPrivacy

    original = FederationPrivacy.admit

    def admit(self, i, rnd, theta, with_lambda, noise=None):  # type: ignore[no-untyped-def]
        if i == 1 and (rnd == 1 or self.clients[i].refused_at is not None):
            self.clients[i].refused_at, self.clients[i].refusal = rnd, "budget exhausted (test)"
            return False
        return original(self, i, rnd, theta, with_lambda, noise=noise)

    def die(_request, _reply):  # type: ignore[no-untyped-def]
        raise crashpoints.InjectedCrash("server killed in round 2")

    monkeypatch.setattr(FederationPrivacy, "admit", admit)
    cfg = with_methods(dp_config(rounds=2, noise="reproducible"), "fedavg")
    (tmp_path / "res").mkdir()
    rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True,
                                      "result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    grid.tamper_reply = {(0, 2, MSG_ROUND): die}
    with pytest.raises(crashpoints.InjectedCrash):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    path = tmp_path / "res" / server_app.SERVER_CHECKPOINT
    state = load_checkpoint(path)
    assert state["refused"] == {"fedavg": {1: 1}}
    assert [(r["round"], r["client"]) for r in state["refusals"]["fedavg"]] == [(1, 1)]
    older = {k: v for k, v in state.items() if k != "refusals"}  # an older ServerApp's
    save_checkpoint(path, {**older, "refused": {"fedavg": [1]}})
    rc = {**rc, "resume": "42"}
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3, run_id=777),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 777)
    rows = results["privacy"]["fedavg"]["clients"]
    assert [(r["refused"], r["refused_at_round"]) for r in rows] == \
        [(False, None), (True, -1), (False, None)]
    # the refusal before the resume, read from that checkpoint's run-level events: a privacy
    # event of its method, as in process
    assert [{k: e[k] for k in ("round", "client", "event")} for e in results["events"]
            if "refused" in e["event"]] == [{"round": 1, "client": 1, "event": (
                "refused its release (budget exhausted (test)): counts as not taking part in "
                "the round exchange")}]
    assert results["privacy"]["fedavg"]["events"] == [
        {"round": 1, "client": "client-001", "event": "refused",
         "detail": "budget exhausted (test)"}]


@pytest.mark.usefixtures("task_identity")
def test_a_flower_run_asking_for_the_batched_engine_states_the_loop_trained(
    tmp_path: Path
) -> None:
    """``[training] engine = "batched"`` on Flower: each ClientApp trains its one client with
    the per-client loop; results.json stated no engine (a user asking for batched was not
    told). It now states the loop, what was asked and why, per method; the default loop
    states nothing, as in process."""
    for engine in ("batched", "auto", "loop"):
        cfg = with_methods(tiny_config(rounds=1, engine=engine), "fedavg")
        root = tmp_path / engine
        rc = run_config(cfg, root)
        results = server_app.run_federation(InMemoryGrid(root / "nodes", rc, 3),  # type: ignore[arg-type]
                                            RunSettings.from_run_config(rc), 42)
        extra = results["methods"]["fedavg"]["extra"]
        if engine == "loop":
            assert "training_engine" not in extra
            continue
        stated = extra["training_engine"]
        assert stated["setting"] == "loop" and f"training.engine = {engine!r}" in stated["choice"]
        assert "Flower ClientApp trains its one client" in stated["reason"]
        # the in-process counts too: the loop trained the one round, never a fallback
        assert stated["runs"] == {"loop": 1} and stated["fallbacks"] == []


@pytest.mark.usefixtures("task_identity")
def test_grid_refuses_dp_sgd_training_in_the_setup_exchange(tmp_path: Path) -> None:
    """A ClientApp whose method trains with DP-SGD in its setup exchange (which no ledger
    records) answers with an error, not the model: the server half sees no setup reply, and
    the run stops (as in process) naming every client's error, asked twice."""
    from secure_fedora.algorithms.contract import SETUP
    from tests.secure_fedora.algorithms.test_contract_checks import Toy

    seen: list[dict] = []

    class WarmStart(Toy):
        @classmethod
        def reply_entries(cls, cfg, stage):  # type: ignore[no-untyped-def]
            return {"theta": "a warm start trained with DP-SGD"} if stage == SETUP else \
                super().reply_entries(cfg, stage)

        def setup_messages(self):  # type: ignore[no-untyped-def]
            return {i: {} for i in range(self.ctx.num_clients)}

        def client_setup(self, i, message):  # type: ignore[no-untyped-def]
            self.ctx.train_client(i, self.theta[i])
            return {"theta": self.theta[i].clone()}

        def server_setup(self, replies):  # type: ignore[no-untyped-def]
            seen.append(dict(replies))

    METHODS.register("warm_start_grid_x", WarmStart)
    try:
        cfg = with_methods(dp_config(rounds=1, noise="reproducible"), "warm_start_grid_x")
        rc = run_config(cfg, tmp_path, **{"reproducible-dp-noise": True})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        # the server learns each client's error class; its text stays with the client
        with pytest.raises(DeployError, match=r"clients \[0, 1, 2\] gave no accepted setup reply "
                                              r"\(asked twice\).*client 2: error reply "
                                              r".*ContractError \(details withheld") as caught:
            server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    finally:
        METHODS.unregister("warm_start_grid_x")
    assert seen == []  # every setup reply was refused in its client's process
    assert str(caught.value).count("ContractError (details withheld") == 3
    assert {c for c, _, e in grid.errors
            if "executed DP-SGD steps in its setup exchange" in str(e)} == {0, 1, 2}


@pytest.mark.usefixtures("task_identity")
def test_a_plug_in_evaluating_every_client_runs_alike_in_both_runtimes(tmp_path: Path) -> None:
    """The in-process runtime asked evaluation_messages one client at a time, Flower once for
    every client: a plug-in whose evaluation_messages ignores ``clients`` (a message for every
    client) was refused in process only. Both now ask once per evaluated round for every
    client and give the same per-client metrics."""
    from secure_fedora.algorithms.messages import KIND_GLOBAL
    from secure_fedora.algorithms.methods import FedAvg

    asked: list[tuple[int, list[int]]] = []

    class EveryoneEvaluated(FedAvg):
        def evaluation_messages(self, rnd, clients):  # type: ignore[no-untyped-def]
            asked.append((rnd, list(clients)))
            return {i: {KIND_GLOBAL: self.global_params} for i in range(self.ctx.num_clients)}

    name = "everyone_evaluated_x"
    METHODS.register(name, EveryoneEvaluated)
    try:
        base = with_methods(tiny_config(rounds=3), name)
        cfg = parse_config({**base.model_dump(mode="json", exclude_none=True),
                            "evaluation": {"every": 2}})
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        assert grid.errors == [] and results["events"] == []
        on_flower, asked[:] = list(asked), []
        _, outcome = in_process(cfg, tmp_path, name)
    finally:
        METHODS.unregister(name)
    assert asked == on_flower == [(2, [0, 1, 2]), (3, [0, 1, 2])]
    ours = results["methods"][name]
    for part in ("selected", "final"):
        assert np.allclose(ours[part]["per_client"], outcome.to_json()[part]["per_client"],
                           atol=1e-4, rtol=0), part


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("wrapped", [False, True], ids=["override", "override-under-a-loop"])
def test_a_fedora_subclass_overriding_client_update_trains_alike_in_both_runtimes(
        tmp_path: Path, wrapped: bool) -> None:
    """The Flower client calls ``client_update``; in process, a subclass whose
    ``client_update_loop`` wraps FEDORA's (``super()``) below the override reached FEDORA's
    shortcut, which skipped the override: client rows 0.27 apart. Now both runtimes train
    every client's row bit for bit alike."""
    from secure_fedora.algorithms.messages import KIND_THETA
    from secure_fedora.algorithms.methods import Fedora

    class Halving(Fedora):
        def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
            reply = super().client_update(i, rnd, message)
            self.theta[i].mul_(0.5)  # the client's own row, which the reply carries
            return reply

    class Wrapping(Halving):
        def client_update_loop(self, rnd, messages):  # type: ignore[no-untyped-def]
            return super().client_update_loop(rnd, messages)

    name = "halving_grid_x"
    METHODS.register(name, Wrapping if wrapped else Halving)
    try:
        cfg = with_methods(tiny_config(rounds=2), name)
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        assert grid.errors == [] and results["events"] == []
        sim, outcome = in_process(cfg, tmp_path, name)
    finally:
        METHODS.unregister(name)
    assert results["methods"][name]["final"]["per_client"] == \
        outcome.to_json()["final"]["per_client"]
    for c in range(3):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / name
                                    / "client.pt", c, 42, config_hash(cfg), name)
        assert torch.equal(state.algorithm[KIND_THETA], sim.methods[name].client_state_dict(c)[
            KIND_THETA].cpu()), c


FINALIZING_METHOD = """
from secure_fedora.algorithms.methods import FedAvg
from secure_fedora.core.registry import METHODS


@METHODS.register("{name}")
class Finalizing(FedAvg):
    def server_finalize(self, replies):
        return {result}
"""


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("result", "problem"), [
    ('{{**super().server_finalize(replies), "training_engine": 1}}',
     r"server_finalize result\(s\) \['training_engine'\] would overwrite the runtime's own "
     "entries"),
    ("[1.0]", "server_finalize must return a dict of results, got list"),
], ids=["runtime-key", "not-a-dict"])
def test_a_plug_in_finalize_result_breaking_the_contract_stops_both_runtimes_alike(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, result: str, problem: str) -> None:
    """A contrib-package method whose server_finalize result breaks the contract (a runtime
    key of results.json's extra, or no dict): both runtimes stop with the same ContractError
    naming the method, and write no results.json."""
    import sys

    from tests.secure_fedora.core.test_registry import _contrib_method_module

    source = FINALIZING_METHOD.replace("{result}", result)
    package, name = _contrib_method_module(tmp_path, monkeypatch, source)
    try:
        cfg = with_methods(tiny_config(rounds=1), name)
        with pytest.raises(ContractError) as in_proc:
            in_process(cfg, tmp_path, name)
        rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
        with pytest.raises(ContractError) as on_grid:
            server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                      RunSettings.from_run_config(rc), 42)
    finally:
        METHODS.unregister(name)
        for module in [m for m in sys.modules if m.startswith(package)]:
            sys.modules.pop(module)
    assert str(on_grid.value) == str(in_proc.value)
    assert re.match(f"method '{name}': {problem}", str(on_grid.value)), on_grid.value
    assert not (tmp_path / "res" / "results.json").exists()


def _releasing_half(base: type) -> type:
    """``base`` whose client_update releases half of the row it trained (its release is not
    its state, as a compressing or output-perturbing plug-in's)."""
    from secure_fedora.algorithms.messages import KIND_THETA

    class ReleasingHalf(base):  # type: ignore[misc, valid-type]
        def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
            reply = super().client_update(i, rnd, message)
            return {**reply, KIND_THETA: reply[KIND_THETA] * 0.5}

    return ReleasingHalf


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("base", ["fedora", "fedavg", "ditto"])
@pytest.mark.parametrize("setting", ["plain", "envelopes", "dp"])
def test_a_reply_that_is_not_the_clients_row_trains_alike_in_both_runtimes(
        tmp_path: Path, base: str, setting: str) -> None:
    """A reply whose ``theta`` is not the client's own row (half of it): in process FEDORA's
    aggregate (and, with envelopes, the upload exchange) copied it into the client's row, so
    the client trained on, was evaluated on and checkpointed the server's copy (client rows
    0.31 apart from Flower's, selected accuracy 0.59 vs 0.11). Now, as on Flower, the client
    keeps what it trained and the server holds the reply: both runtimes agree bit for bit."""
    from secure_fedora.algorithms.messages import KIND_THETA

    name = f"half_{base}_x"
    METHODS.register(name, _releasing_half(method_class(base)))
    try:
        over: dict = {"result-dir": str(tmp_path / "res")}
        if setting == "dp":
            cfg = with_methods(dp_config(rounds=3, noise="reproducible"), name)
            over["reproducible-dp-noise"] = True
        else:
            cfg = with_methods(tiny_config(rounds=3, participation=0.5), name)
        if setting == "envelopes":
            cfg = parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                                "security": {"envelopes": True}})
        rc = run_config(cfg, tmp_path, **over)
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        assert grid.errors == [] and results["events"] == []
        sim, outcome = in_process(cfg, tmp_path, name)
    finally:
        METHODS.unregister(name)
    ours = results["methods"][name]
    for part in ("selected", "final"):
        assert ours[part]["per_client"] == outcome.to_json()[part]["per_client"], part
    for c in range(3):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / name
                                    / "client.pt", c, 42, config_hash(cfg), name)
        assert torch.equal(state.algorithm[KIND_THETA], sim.methods[name].client_state_dict(c)[
            KIND_THETA].cpu()), c


@pytest.mark.usefixtures("task_identity")
def test_noised_summaries_in_envelopes_keep_their_bits_as_on_flower(tmp_path: Path) -> None:
    """Found by a hunt: with ``[security] envelopes`` the in-process runtime sent each
    client's (float64) summary as float32, so its relatedness differed from the Flower
    server's (overlaps 6e-9 apart under noised summaries) and so did FEDORA's lambdas and
    trained rows from round 2 on. The summaries now keep their float64 bits on the wire, as
    in a Flower reply: every client's row and lambda are the grid's, bit for bit."""
    cfg = dp_config(rounds=2, noise="reproducible")
    cfg = parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                        "security": {"envelopes": True}})
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": True})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == [] and results["events"] == []
    sim, outcome = in_process(cfg, tmp_path)
    assert results["methods"]["fedora"]["final"]["per_client"] == outcome.final["per_client"]
    lambdas = [r["mean_lambda"] for r in results["rounds"]]
    assert lambdas == [r["mean_lambda"] for r in sim.history if r["method"] == "fedora"]
    for c in range(3):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora"
                                    / "client.pt", c, 42, config_hash(cfg), "fedora")
        assert torch.equal(state.algorithm["theta"], sim.methods["fedora"].theta[c]), c


#: ``assumptions.evaluation_reports`` of a Flower run in which FedAvg fine-tuned (as it was).
REPORTS_WITH_FEDAVG = (
    "after each evaluated round every client sends the server its test metric (and its "
    "validation metric only when that chooses the reported round), and FedAvg's fine-tuned "
    "test metric at the end; these reports are outside the ledgers")
REPORTS_WITHOUT = (
    "after each evaluated round every client sends the server its test metric (and its "
    "validation metric only when that chooses the reported round); these reports are outside "
    "the ledgers")


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("methods", "finetune_epochs", "stated"), [
    (["local"], 5, REPORTS_WITHOUT),
    (["fedavg"], 0, REPORTS_WITHOUT),
    (["fedavg"], 5, REPORTS_WITH_FEDAVG),
    (["local", "tuned_x"], 5, REPORTS_WITH_FEDAVG.replace("FedAvg's",
                                                          "tuned_x's (built on FedAvg)")),
    (["fedavg", "tuned_x"], 1, REPORTS_WITH_FEDAVG.replace(
        "FedAvg's fine-tuned test metric",
        "FedAvg's and tuned_x's (built on FedAvg) fine-tuned test metrics")),
], ids=["local", "fedavg-untuned", "fedavg", "built-on-fedavg", "both"])
def test_evaluation_reports_name_a_fine_tuned_metric_only_of_a_method_that_fine_tuned(
        tmp_path: Path, methods: list[str], finetune_epochs: int, stated: str) -> None:
    """``assumptions.evaluation_reports`` said every client sends "FedAvg's fine-tuned test
    metric at the end" in every Flower run, also without FedAvg or its fine-tuning. It now
    names the fine-tuned metric of each method that fine-tuned in the run (FedAvg, or a method
    registered on FedAvg), and nothing else where none did; a run with FedAvg's keeps its
    text."""
    from secure_fedora.algorithms.methods import FedAvg

    class TunedX(FedAvg):
        name = "tuned_x"
        finetunes = True  # FedAvg's fine-tuning is not inherited: declared

    METHODS.register("tuned_x", TunedX)
    try:
        cfg = with_methods(tiny_config(rounds=1), *methods)
        cfg = parse_config({**cfg.model_dump(mode="json", exclude_none=True),
                            "fedavg": {"finetune_epochs": finetune_epochs}})
        rc = run_config(cfg, tmp_path)
        results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                            RunSettings.from_run_config(rc), 42)
    finally:
        METHODS.unregister("tuned_x")
    assert results["assumptions"]["evaluation_reports"] == stated
    assert ("fedavg_ft" in results["methods"]) == ("FedAvg's" in stated)


@pytest.mark.usefixtures("task_identity")
def test_a_dp_run_states_that_its_timings_are_outside_the_ledgers(tmp_path: Path) -> None:
    """Every reply of a DP run carries the client's process-start and handler times, whose
    averages results.json and progress.json keep with the run's seconds: times that can depend
    on a client's data through its Poisson-sampled batch sizes, which no ledger accounts, and
    results.json said nothing of them. It now states it (``assumptions.timing``), naming what
    the replies carry and where the run writes it, the ServerApp checkpoint too; the timings
    stay. It named ``relatedness_timing`` too, which a run without an encrypted relatedness
    ceremony leaves empty; it names only what the run holds."""
    cfg = with_methods(dp_config(rounds=1), "fedavg")
    result_dir = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    stated = results["assumptions"]["timing"]
    assert json.loads((result_dir / "results.json").read_text())["assumptions"]["timing"] == stated
    assert stated.startswith("timing is outside the ledgers")
    assert "Poisson sampling" in stated and "no ledger accounts them" in stated
    # what it names is what the replies carried and the run wrote
    for key in ("t-process-start", "t-handler-start", "t-handler-end"):
        assert key in stated
    [row] = json.loads((result_dir / "progress.json").read_text())["rows"]
    for key in ("timing", "evaluation_timing", "seconds"):
        assert key in stated and key in row and key in results["rounds"][0]
    for key in ("timings", "seconds_total"):
        assert key in stated and key in results
    # a FedAvg run has no relatedness ceremony: its relatedness_timing is empty, not named
    assert results["relatedness_timing"] == {} and "relatedness_timing" not in stated
    for key in ("seconds_training", "seconds_evaluation"):
        assert key in stated and key in results["methods"]["fedavg"]
    assert row["timing"]["replies"] == 3  # averages of what the clients' replies carried
    # the ServerApp checkpoint keeps them too, and the statement said nothing of it
    held = load_checkpoint(result_dir / server_app.SERVER_CHECKPOINT)
    assert "checkpoints/flower-server.pt" in stated
    for key in ("timings", "history", "elapsed"):
        assert key in stated and key in held
    assert not held["relatedness_timing"]
    for key in ("seconds", "timing", "evaluation_timing"):
        assert key in held["history"][0]
    assert held["outcomes"]["fedavg"]["seconds_training"] == \
        results["methods"]["fedavg"]["seconds_training"]
    plain = tmp_path / "plain"
    rc = run_config(with_methods(tiny_config(rounds=1), "fedavg"), plain)
    results = server_app.run_federation(InMemoryGrid(plain / "nodes", rc, 3),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    assert "timing" not in results["assumptions"]


#: Settings a hunt put to both runtimes beyond the ones above (each a few seconds here): the
#: sparsest graph with the most propagation, a richer summary and a sharp relatedness kernel
#: on partial last batches; an active ``max_pull``; one participant a round; DP with a
#: per-client budget, a fixed sample rate, sampled participants and evaluation every 2 rounds.
HUNTED_SETTINGS = {
    "k1-alpha099-q3-partial-batches": (
        ["fedora"], {"fedora": {"k": 1, "alpha": 0.99, "q": 3, "tau": 1000.0},
                     "data": {"train_per_client": 70, "val_per_client": 20, "test_per_client": 50},
                     "training": {"rounds": 3, "participation": 0.67, "batch_size": 32},
                     "evaluation": {"every": 2}}),
    "max-pull-active": (
        ["fedora"], {"fedora": {"max_pull": 0.2, "tau": 0.01},
                     "training": {"rounds": 3, "lr": 0.3, "local_epochs": 2}}),
    "two-clients-one-participant": (
        ["fedora", "fedavg", "apfl", "ifca"],
        {"data": {"num_clients": 2}, "fedora": {"k": 1},
         "training": {"rounds": 3, "participation": 0.5, "local_epochs": 1}}),
    "dp-override-sample-rate-every-2": (
        ["fedora"], {"privacy": {"overrides": {"1": {"epsilon": 3.0}}, "sample_rate": 0.3,
                                 "accountant": "rdp"},
                     "training": {"rounds": 3, "participation": 0.67, "local_epochs": 1},
                     "evaluation": {"every": 2}}),
}


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("setting", list(HUNTED_SETTINGS))
def test_hunted_settings_agree_bit_for_bit_between_the_runtimes(tmp_path: Path,
                                                                setting: str) -> None:
    """Per-client metrics, every round's statistics, every client's final state and (under
    DP) every ledger entry but its time stamp are the in-process run's, bit for bit."""
    from privacy.identity import client_ids
    from privacy.ledger import read_ledger

    methods, over = HUNTED_SETTINGS[setting]
    dp = setting.startswith("dp-")
    data = (dp_config(noise="reproducible") if dp else tiny_config()).model_dump(
        mode="json", exclude_none=True)
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values}
    cfg = parse_config({**data, "methods": methods})
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "compare-methods": True, "reproducible-dp-noise": dp})
    grid = InMemoryGrid(tmp_path / "nodes", rc, cfg.data.num_clients)
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert grid.errors == [] and results["events"] == []
    stamped = {"timestamp", "prev_hash", "signature"}
    for method in methods:
        sim, outcome = in_process(cfg, tmp_path / method, method)
        ours, theirs = results["methods"][method], outcome.to_json()
        for part in ("selected", "final"):
            assert ours[part] == theirs[part], (method, part)
        rows = [r for r in results["rounds"] if r["method"] == method]
        assert [{k: r[k] for k in twin} for r, twin in zip(rows, sim.history, strict=True)] \
            == sim.history, method
        for c, cid in enumerate(client_ids(cfg.data.num_clients)):
            node = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / method
            state = ClientRunState.load(node / "client.pt", c, 42, config_hash(cfg), method)
            expected = sim.methods[method].client_state_dict(c)
            assert sorted(state.algorithm) == sorted(expected)
            for key, value in expected.items():
                assert torch.equal(state.algorithm[key], value.cpu()), (method, c, key)
            if dp:
                mine = [{k: v for k, v in e.items() if k not in stamped}
                        for e in read_ledger(node / f"{cid}.jsonl")]
                twin = tmp_path / method / "inproc" / "ledgers" / method / f"{cid}.jsonl"
                assert mine == [{k: v for k, v in e.items() if k not in stamped}
                                for e in read_ledger(twin)], (method, cid)
    if setting == "max-pull-active":  # the bound capped the pulls of a round: lambda = 0.2 / lr
        assert any(r["pulled_fraction"] > 0 and r["mean_lambda"] == pytest.approx(
            r["pulled_fraction"] * 0.2 / 0.3) for r in results["rounds"])
