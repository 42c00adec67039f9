"""What the runtimes enforce on a method's messages, replies, statistics and declared
releases: a plug-in that breaks the contract stops the run with an error naming it, before
an unaccounted value leaves a client or a runtime record is overwritten."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from privacy.accounting import PrivacyBudget
from privacy.ledger import read_ledger
from privacy.pipeline import StepCountMismatchError
from secure_fedora.algorithms.contract import (
    NUM_EXAMPLES_REASON,
    ROUND,
    SAT_OUT_PULL_DIVERGED,
    SETUP,
    ClientHalfError,
    ContractError,
    FederatedAlgorithm,
    ReleaseSpec,
    build_method,
    check_round_statistics,
    declared_reply_entries,
    with_sat_out_statistics,
)
from secure_fedora.algorithms.methods import FederatedMethod, Fedora
from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context
from secure_fedora.secure.private import check_budget_plans, privacy_plan

SMALL = {"data": {"num_clients": 3, "train_per_client": 40, "val_per_client": 10,
                  "test_per_client": 10, "groups": 3},
         "training": {"rounds": 2, "local_epochs": 1, "batch_size": 20, "lr": 0.05}}
DP = {"enabled": True, "epsilon": 50.0, "delta": 1e-3, "noise_multiplier": 1.0,
      "noise": "reproducible"}


class Toy(FederatedMethod):
    """FedAvg's shape in a few lines: participants train the global model, the server
    averages the replies."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.global_params = ctx.init.clone()

    def configure(self, rnd, participants):
        return {i: {"global": self.global_params} for i in participants}

    def client_update(self, i, rnd, message):
        self.theta[i].copy_(message["global"])
        return {"theta": self.theta[i], "steps": torch.tensor(self.ctx.train_client(i, self.theta[i]))}

    def aggregate(self, rnd, replies):
        if replies:
            self.global_params.copy_(torch.stack([r["theta"] for r in replies.values()]).mean(0))
        return {"accepted": float(len(replies))}

    def evaluation_messages(self, rnd, clients):
        return {i: {"global": self.global_params} for i in clients}

    def client_eval_row(self, i, message=None):
        return message["global"]


@pytest.fixture
def register() -> Iterator:
    names: list[str] = []

    def add(name: str, cls: type) -> str:
        METHODS.register(name, cls)
        names.append(name)
        return name

    yield add
    for name in names:
        METHODS.unregister(name)


def _config(method: str, dp: bool = True, **sections: dict) -> object:
    doc = {"methods": [method], **SMALL}
    if dp:
        doc["privacy"] = DP
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return parse_config(doc)


def _run(tmp_path: Path, cfg) -> tuple[Simulation, Path]:
    run = tmp_path / "run"
    sim = Simulation(cfg, run, clients=build_clients(cfg), keystore=tmp_path / "ks")
    return sim, run


def _ledger_mechanisms(run: Path, method: str) -> list[list[str]]:
    return [[e["mechanism"] for e in read_ledger(p)]
            for p in sorted((run / "ledgers" / method).glob("*.jsonl"))]


def test_a_message_to_a_client_outside_the_participants_is_refused(tmp_path, register):
    class AllClients(Toy):
        def configure(self, rnd, participants):
            return {i: {"global": self.global_params} for i in range(self.ctx.num_clients)}

    name = register("all_clients_x", AllClients)
    sim, run = _run(tmp_path, _config(name, training={"participation": 0.5}))
    with pytest.raises(ContractError, match=r"address client\(s\) \[\d\] outside the round's "
                                            "participants"):
        sim.run()
    # nobody trained unaccounted: every ledger entry is an admitted round's dpsgd, no client
    # trained past its admission
    for mechanisms in _ledger_mechanisms(run, name):
        assert set(mechanisms) <= {"dpsgd"}


@pytest.mark.parametrize("dp", [True, False])
def test_a_round_message_entry_that_is_not_a_tensor_is_refused(tmp_path, register, dp):
    """A float message entry ran in process (the client half copied it as if a tensor) where
    the Flower runtime, which moves only tensors, cannot send it."""
    class FloatMessage(Toy):
        def configure(self, rnd, participants):
            return {i: {"global": 3.0} for i in participants}

    name = register(f"float_message_x_{dp}", FloatMessage)
    sim, _ = _run(tmp_path, _config(name, dp=dp))
    with pytest.raises(ContractError, match=r"round message to client 0 must be a dict of "
                                            r"tensors; entry 'global' is a float"):
        sim.run()


def test_an_undeclared_reply_entry_never_reaches_the_server_in_a_private_run(tmp_path, register):
    seen: list[dict] = []

    class Leaky(Toy):
        def client_update(self, i, rnd, message):
            reply = super().client_update(i, rnd, message)
            reply["leak"] = self.ctx.clients[i].train_x.mean().reshape(())
            return reply

        def aggregate(self, rnd, replies):
            seen.append(dict(replies))
            return super().aggregate(rnd, replies)

    name = register("leaky_x", Leaky)
    sim, _ = _run(tmp_path, _config(name))
    with pytest.raises(ContractError, match=r"reply carries \['leak'\], which the method does "
                                            "not declare"):
        sim.run()
    assert seen == []  # aggregate never saw a reply
    # without DP nothing is claimed, but a server (in process as on Flower) takes exactly the
    # declared entries
    plain, _ = _run(tmp_path / "plain", _config(name, dp=False))
    with pytest.raises(ContractError, match=r"client 0's round reply carries \['leak', 'steps', "
                                            r"'theta'\], the method's round replies carry"):
        plain.run()
    assert seen == []


def test_declared_reply_entries_pass(tmp_path, register):
    class Declared(Toy):
        @classmethod
        def reply_entries(cls, cfg, stage):
            entries = super().reply_entries(cfg, stage)
            return {**entries, "size": "the training-set size (public)"} if stage == ROUND \
                else entries

        def client_update(self, i, rnd, message):
            return {**super().client_update(i, rnd, message),
                    "size": torch.tensor(self.ctx.clients[i].train_x.shape[0])}

    name = register("declared_x", Declared)
    sim, run = _run(tmp_path, _config(name))
    results = sim.run()
    assert results["methods"][name]["selected"]["per_client"]
    # what leaves each client, and why, is in results.json: the plug-in's reason its own claim
    declared = json.loads((run / "results.json").read_text())["privacy"][name]["reply_entries"]
    assert declared == results["privacy"][name]["reply_entries"]
    assert declared["round"]["size"] == {"reason": "the training-set size (public)",
                                         "built_in": False}
    assert [e for e, d in declared["round"].items() if d["built_in"]] == ["theta", "steps"]
    assert declared["setup"] == declared["finalize"] == {}


def test_a_run_without_dp_states_no_reply_entries(tmp_path, register) -> None:
    """Without DP nothing is refused and no release is claimed accounted: results.json keeps
    its layout, an empty ``privacy`` (no declared reply entries)."""
    class Declared(Toy):
        @classmethod
        def reply_entries(cls, cfg, stage):
            entries = super().reply_entries(cfg, stage)
            return {**entries, "mean_x": "a public value"} if stage == ROUND else entries

        def client_update(self, i, rnd, message):
            return {**super().client_update(i, rnd, message), "mean_x": torch.zeros(1)}

    name = register("declared_no_dp_x", Declared)
    sim, run = _run(tmp_path, _config(name, dp=False))
    assert sim.run()["privacy"] == {}
    assert "reply_entries" not in (run / "results.json").read_text()


def test_declared_reply_entries_mark_what_no_built_in_method_declares(register) -> None:
    """``built_in`` holds exactly for an entry a shipped method declares with the same reason
    for the same exchange under the run's config: FEDORA's are, under either validation; an
    entry or a reason of a plug-in's own is not, nor is a built-in entry moved to another
    exchange or given another reason."""
    for validation in ("private", "public"):
        cfg = _config("fedora", data={"validation": validation}, fedora={"relatedness": "noised"})
        declared = declared_reply_entries("fedora", cfg)
        assert {s: list(e) for s, e in declared.items()} == {
            "setup": ["summary"], "round": ["theta", "steps", "lambda"], "finalize": []}
        assert all(d["built_in"] for e in declared.values() for d in e.values())
        assert declared["round"]["lambda"]["reason"] == Fedora.reply_entries(cfg, ROUND)["lambda"]

    class OwnClaims(Toy):
        @classmethod
        def reply_entries(cls, cfg, stage):
            if stage == SETUP:
                return {"steps": "the number of local steps (fixed by the plan, "
                                 "data-independent)"}
            return {**super().reply_entries(cfg, stage), "theta": "a model (trust me)",
                    "num_examples": NUM_EXAMPLES_REASON}

    name = register("own_claims_x", OwnClaims)
    declared = declared_reply_entries(name, _config(name))
    assert declared["setup"]["steps"]["built_in"] is False  # a round entry, not a setup one
    assert declared["round"]["theta"] == {"reason": "a model (trust me)", "built_in": False}
    assert declared["round"]["num_examples"]["built_in"]  # FedAvg's entry and reason

    def factory(ctx, cfg):
        return Toy(ctx)

    name = register("nameless_factory_x", factory)
    with pytest.raises(ValueError, match="does not name its algorithm class"):
        declared_reply_entries(name, _config(name, dp=False))


def test_a_model_trained_without_admission_is_refused_before_aggregate(tmp_path, register):
    seen: list[int] = []

    class ReplyFromNowhere(Toy):
        def client_update_many(self, rnd, messages):
            replies = super().client_update_many(rnd, messages)
            return replies

        def client_update(self, i, rnd, message):
            reply = super().client_update(i, rnd, message)
            self.ctx.train_client(i, self.theta[i])  # a second, unaccounted local run
            return reply

        def aggregate(self, rnd, replies):
            seen.append(rnd)
            return super().aggregate(rnd, replies)

    name = register("twice_x", ReplyFromNowhere)
    sim, _ = _run(tmp_path, _config(name))
    with pytest.raises(StepCountMismatchError):
        sim.run()
    assert seen == []  # refused before the server half used any reply


@pytest.mark.parametrize("specs, message", [
    ((ReleaseSpec("model", ("dpsgd",), SETUP), ReleaseSpec("model", ("dpsgd",), ROUND)),
     r"setup release 'model' of \['dpsgd'\], which the runtimes cannot admit"),
    ((ReleaseSpec("model", ("dpsgd",), ROUND),) * 2, r"2 round release\(s\)"),
    ((), r"0 round release\(s\)"),
    ((ReleaseSpec("model", ("gaussian_lambda",), ROUND),),
     r"round release 'model' of \['gaussian_lambda'\]"),
    ((ReleaseSpec("model", ("dpsgd",), ROUND), ReleaseSpec("summary", ("gaussian_summary",), ROUND)),
     r"round release 'summary'"),
    ((ReleaseSpec("model", ("dpsgd", "laplace"), ROUND),), r"\['dpsgd', 'laplace'\]"),
])
def test_releases_the_runtimes_cannot_record_are_refused_before_planning(register, specs, message):
    class Declares(Toy):
        @classmethod
        def releases(cls, cfg):
            return specs

    name = register(f"declares_{abs(hash(specs)) % 10**8}", Declares)
    cfg = _config(name)
    with pytest.raises(ConfigError, match=message) as err:
        check_budget_plans(cfg, name, 3)
    assert "over budget" not in str(err.value)  # not mistaken for a budget problem
    with pytest.raises(ConfigError, match=message):
        privacy_plan(cfg, name, PrivacyBudget(50.0, 1e-3))


def test_a_declared_setup_summary_must_be_recorded(tmp_path, register):
    class SetupWithoutAdmission(Toy):
        @classmethod
        def releases(cls, cfg):
            return (ReleaseSpec("summary", ("gaussian_summary",), SETUP),
                    ReleaseSpec("model", ("dpsgd",), ROUND))

        @classmethod
        def reply_entries(cls, cfg, stage):
            return {"summary": "claimed noised"} if stage == SETUP else \
                super().reply_entries(cfg, stage)

        def setup_messages(self):
            return {i: {} for i in range(self.ctx.num_clients)}

        def client_setup(self, i, message):
            return {"summary": self.ctx.clients[i].train_x.mean(0)}  # raw, never admitted

        def server_setup(self, replies):
            raise AssertionError("the server half saw unrecorded setup replies")

    name = register("setup_raw_x", SetupWithoutAdmission)
    sim, _ = _run(tmp_path, _config(name))
    with pytest.raises(ContractError, match=r"declares a setup release \['summary'\], but "
                                            r"client\(s\) \[0, 1, 2\] replied without it"):
        sim.run()


def test_dp_sgd_training_in_the_setup_exchange_is_refused(tmp_path, register):
    """A setup DP-SGD run cannot be declared (no ledger records one), so one made without a
    declaration must not leave either: its model would reach the server with no ledger entry,
    and every epsilon (ledger, report, white-box claim) would be below what was spent."""
    seen: list[dict] = []

    class WarmStart(Toy):
        @classmethod
        def reply_entries(cls, cfg, stage):
            return {"theta": "a warm start trained with DP-SGD"} if stage == SETUP else \
                super().reply_entries(cfg, stage)

        def setup_messages(self):
            return {i: {} for i in range(self.ctx.num_clients)}

        def client_setup(self, i, message):
            self.ctx.train_client(i, self.theta[i])
            return {"theta": self.theta[i].clone()}

        def server_setup(self, replies):
            seen.append(dict(replies))
            self.global_params.copy_(torch.stack([r["theta"] for r in replies.values()]).mean(0))

    name = register("warm_start_x", WarmStart)
    sim, run = _run(tmp_path, _config(name))
    with pytest.raises(ContractError, match=r"'warm_start_x' executed DP-SGD steps in its setup "
                                            r"exchange \(client 0: 2, client 1: 2, client 2: 2\)"):
        sim.run()
    assert seen == []  # the server half never saw the unaccounted models
    assert all(m == [] for m in _ledger_mechanisms(run, name))
    # without DP nothing is claimed: the same method runs
    plain, _ = _run(tmp_path / "plain", _config(name, dp=False))
    plain.run()
    assert len(seen) == 1


@pytest.mark.parametrize("stats, message", [
    ({"method": "fedora"}, "would overwrite the runtime's own column"),
    ({"round": 99}, "would overwrite"),
    ({"x": float("nan")}, "'x' must be a finite number"),
    ({"x": "text"}, "'x' must be a finite number"),
    ({"x": torch.tensor([1.0, 2.0])}, "'x' must be a finite number"),
    ({"x": True}, "'x' must be a finite number"),
    (None, "must return the round's statistics as a dict"),
])
def test_round_statistics_are_numbers_under_their_own_names(tmp_path, register, stats, message):
    class Stats(Toy):
        def aggregate(self, rnd, replies):
            super().aggregate(rnd, replies)
            return stats

    name = register(f"stats_{abs(hash(message + repr(stats))) % 10**8}", Stats)
    sim, _ = _run(tmp_path, _config(name, dp=False))
    with pytest.raises(ContractError, match=message):
        sim.run()
    assert check_round_statistics("m", 1, {"ok": torch.tensor(2), "n": 3}) == {"ok": 2.0, "n": 3.0}


def test_a_method_says_which_statistic_a_client_that_sat_out_affects():
    """A runtime reports who sat a round out and why (``sat_out_statistics``) and adds the
    method's answer, checked as round statistics are: summed under a name the statistics have,
    appended otherwise. FEDORA counts a diverged pull in ``unstable_pulls``; the default
    method, and FEDORA for another reason, add nothing."""
    reasons = {1: SAT_OUT_PULL_DIVERGED, 3: "another reason", 4: SAT_OUT_PULL_DIVERGED}
    assert Fedora.sat_out_statistics(None, 2, reasons) == {"unstable_pulls": 2.0}  # type: ignore[arg-type]
    assert Fedora.sat_out_statistics(None, 2, {3: "another reason"}) == {}  # type: ignore[arg-type]
    assert FederatedMethod.sat_out_statistics(None, 2, reasons) == {}  # type: ignore[arg-type]
    stats = {"steps": 8.0, "unstable_pulls": 1.0}
    assert with_sat_out_statistics("fedora", 2, stats, {"unstable_pulls": 2.0}) == \
        {"steps": 8.0, "unstable_pulls": 3.0}
    assert list(with_sat_out_statistics("m", 2, {"steps": 0.0}, {"sat": torch.tensor(1)}).items()) \
        == [("steps", 0.0), ("sat", 1.0)]
    assert stats == {"steps": 8.0, "unstable_pulls": 1.0}  # not changed in place
    for bad, message in (({"x": float("nan")}, "'x' must be a finite number"),
                         ({"replied": 1.0}, "would overwrite the runtime's own column"),
                         ([1.0], "must be a dict name -> number")):
        with pytest.raises(ContractError, match=message):
            with_sat_out_statistics("m", 2, stats, bad)


@pytest.mark.parametrize("reply, message", [
    ({"theta": [0.0], "steps": torch.tensor(2)}, "entry 'theta' must be a tensor"),
    ({"steps": torch.tensor([1, 2])}, "'steps' must be one integer >= 0"),
    ({"steps": torch.tensor(2.5)}, "'steps' must be one integer >= 0"),
    ({"steps": torch.tensor(3.0)}, "'steps' must be one integer >= 0"),
    ({"steps": torch.tensor(True)}, "'steps' must be one integer >= 0"),
    ({"steps": torch.tensor(-1)}, "'steps' must be one integer >= 0"),
    ({"steps": torch.tensor(1), "num_examples": torch.tensor(0)},
     "'num_examples' must be one integer >= 1"),
    ([1, 2], "reply must be a dict of tensors"),
])
def test_malformed_replies_name_the_method(tmp_path, register, reply, message):
    class Malformed(Toy):
        def client_update(self, i, rnd, message):
            super().client_update(i, rnd, message)
            return reply

    name = register(f"malformed_{abs(hash(message)) % 10**8}", Malformed)
    sim, _ = _run(tmp_path, _config(name, dp=False))
    with pytest.raises(ContractError, match=f"method '{name}': client 0's round {message}"
                       if "reply must" in message else message):
        sim.run()


def test_replies_must_answer_exactly_the_clients_messaged(tmp_path, register):
    class Extra(Toy):
        def client_update_many(self, rnd, messages):
            replies = super().client_update_many(rnd, messages)
            return {**replies, 99: {"steps": torch.tensor(0)}}

    name = register("extra_reply_x", Extra)
    sim, _ = _run(tmp_path, _config(name, dp=False))
    with pytest.raises(ContractError, match=r"replies from unmessaged client\(s\) \[99\]"):
        sim.run()


def test_only_federated_methods_run_and_bad_registrations_are_named(register):
    class Pure(FederatedAlgorithm):
        @classmethod
        def from_config(cls, ctx, cfg):
            return cls()

        def configure(self, rnd, participants):
            return {}

        def client_update(self, i, rnd, message):
            return {}

        def aggregate(self, rnd, replies):
            return {}

        def client_eval_row(self, i, message=None):
            return torch.zeros(1)

        def server_state_dict(self):
            return {}

        def load_server_state_dict(self, state):
            pass

        def client_state_dict(self, i):
            return {}

        def load_client_state_dict(self, i, state):
            pass

    cfg = _config("local", dp=False)
    ctx = build_context(cfg, build_clients(cfg))
    from secure_fedora.runtimes.inprocess import make_method

    register("pure_x", Pure)
    with pytest.raises(ContractError, match="a FederatedAlgorithm but not a FederatedMethod"):
        make_method("pure_x", ctx, cfg)
    register("none_factory_x", lambda ctx, cfg: None)
    with pytest.raises(ContractError, match="returned NoneType, not a FederatedAlgorithm"):
        build_method("none_factory_x", ctx, cfg)
    register("string_x", "not a method")
    with pytest.raises(ContractError, match="neither a FederatedAlgorithm class nor a factory"):
        build_method("string_x", ctx, cfg)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "model", "mechanisms": "dpsgd"}, "must be a tuple of mechanism names"),
    ({"kind": "", "mechanisms": ("dpsgd",)}, "needs a kind"),
    ({"kind": "model", "mechanisms": ("dpsgd", 3)}, "must be a tuple of mechanism names"),
    ({"kind": "model", "mechanisms": ("dpsgd",), "encrypted": "yes"}, "'encrypted' must be a bool"),
])
def test_release_specs_check_their_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReleaseSpec(**kwargs)
    assert ReleaseSpec("model", ["dpsgd"]).mechanisms == ("dpsgd",)


def test_releases_must_return_release_specs(register):
    class NoneReleases(Toy):
        @classmethod
        def releases(cls, cfg):
            return None

    name = register("none_releases_x", NoneReleases)
    with pytest.raises(ConfigError, match="releases\\(cfg\\) must return a tuple of ReleaseSpec"):
        check_budget_plans(_config(name), name, 3)


def test_a_round_of_its_own_is_refused_under_dp_and_its_statistics_still_checked(tmp_path, register):
    """Overriding train_round skipped every check of the generic round (a data mean in the
    replies, a 'round' statistic overwriting the runtime's column)."""
    class OwnRound(Toy):
        def train_round(self, rnd, participants):
            return {"round": 999.0}

    name = register("own_round_x", OwnRound)
    sim, _ = _run(tmp_path, _config(name))
    with pytest.raises(ContractError, match="overrides train_round: its exchanges would bypass"):
        sim.run()
    plain, _ = _run(tmp_path / "plain", _config(name, dp=False))
    with pytest.raises(ContractError, match="'round' would overwrite the runtime's own column"):
        plain.run()


def test_an_exception_in_a_client_half_names_the_method_and_the_client(tmp_path, register):
    """A plug-in's client_update raising (here a ZeroDivisionError) propagated raw, naming
    neither the method nor the client; it is now a one-line error saying both (exit code 2),
    with the original as its cause and its traceback under --debug."""
    import io

    from secure_fedora.algorithms.contract import ClientHalfError
    from secure_fedora.core.errors import run_command

    class Broken(Toy):
        def client_update(self, i, rnd, message):
            if i == 1:
                return {"steps": torch.tensor(1 // 0)}
            return super().client_update(i, rnd, message)

    name = register("broken_x", Broken)
    sim, _ = _run(tmp_path, _config(name, dp=False))
    with pytest.raises(ClientHalfError, match=rf"method '{name}': client 1's client_update of "
                                              "round 1 failed: ZeroDivisionError") as info:
        sim.run()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    for debug in (False, True):
        again, _ = _run(tmp_path / f"cli{debug}", _config(name, dp=False))
        out = io.StringIO()
        assert run_command(lambda _args, s=again: s.run(), None, debug=debug, stream=out) == 2
        lines = out.getvalue().splitlines()
        assert lines[-1].startswith(f"error: method '{name}': client 1's client_update")
        assert ("Traceback" in out.getvalue()) == debug
        assert ("1 // 0" in out.getvalue()) == debug  # the original's frame, with --debug



def test_a_private_lambda_the_method_does_not_declare_is_a_pipeline_error(tmp_path, register):
    """A method calling ctx.privacy.private_lambda without declaring the lambda release hit
    a bare ``assert`` (an AssertionError, and no check at all under ``python -O``); it is now
    a PipelineError naming the method, before any validation data is read or noise drawn."""
    from privacy.pipeline import PipelineError

    class UndeclaredLambda(Toy):
        def client_update(self, i, rnd, message):
            reply = super().client_update(i, rnd, message)
            c = self.ctx.clients[i]
            self.ctx.privacy.private_lambda(i, self.theta[i], message["global"], c.val_x,
                                            c.val_y, self.ctx.noise[i], self.ctx.flat.bind)
            return reply

    name = register("undeclared_lambda_x", UndeclaredLambda)
    sim, run = _run(tmp_path, _config(name, data={"validation": "private"}))
    with pytest.raises(PipelineError, match=rf"method '{name}': client 0's private lambda has "
                                            "no planned noise: the method does not declare"):
        sim.run()
    assert not any("gaussian_lambda" in m for m in _ledger_mechanisms(run, name))


def test_a_noised_summary_the_method_does_not_declare_is_a_pipeline_error(tmp_path, register):
    """The same for ctx.privacy.noised_summaries without a declared setup summary release."""
    from privacy.pipeline import PipelineError

    class UndeclaredSummary(Toy):
        def setup_messages(self):
            return {i: {} for i in range(self.ctx.num_clients)}

        def client_setup(self, i, message):
            ctx = self.ctx
            return {"summary": ctx.privacy.noised_summary(i, ctx.clients[i], 2, ctx.num_classes,
                                                          ctx.noise[i])}

    name = register("undeclared_summary_x", UndeclaredSummary)
    sim, _ = _run(tmp_path, _config(name))
    with pytest.raises(PipelineError, match=rf"method '{name}': client 0's noised summary has "
                                            "no planned noise"):
        sim.run()


def _facts(train: tuple[int, ...] = (40, 40, 40), **over) -> object:
    from secure_fedora.algorithms.contract import DataFacts

    fields = {"input_shape": (2, 3), "num_classes": 4, "multilabel": False,
              "train_sizes": train, "val_sizes": (5,) * len(train),
              "test_sizes": (5,) * len(train), **over}
    return DataFacts(**fields)


@pytest.mark.parametrize("relatedness, q, train, message", [
    ("noised", 10, (40, 40, 40), None),
    ("noised", 10, (3, 3, 3), None),  # the noised second moment is width x width
    ("noised", 11, (40, 40, 40), r"fedora\.q = 11 is above the summary width 10 \(6 input "
                                 r"features \+ 4 classes\).*use fedora\.q <= 10$"),
    ("plain", 11, (40, 40, 40), r"fedora\.q = 11 is above the summary width 10"),
    ("plain", 5, (40, 4, 40), r"fedora\.q = 5 is above client 1's 4 training rows \(fedora\."
                              r"relatedness 'plain'.*use fedora\.q <= 4$"),
    ("encrypted", 5, (40, 40, 5), None),
])
def test_fedora_q_is_checked_against_the_data_facts(relatedness, q, train, message):
    """FEDORA's summary has at most (input features + classes) directions, and a plain one
    (the SVD of a client's training rows) at most that client's number of rows: a larger
    fedora.q is a ConfigError naming the key and the bound, from the data's facts alone."""
    from secure_fedora.algorithms.contract import check_data_facts

    cfg = _config("fedora", dp=relatedness == "noised",
                  fedora={"q": q, "k": 1, "relatedness": relatedness})
    if message is None:
        check_data_facts(["fedora"], cfg, _facts(train))
    else:
        with pytest.raises(ConfigError, match=r"^method 'fedora' cannot run on this data: "
                           + message):
            check_data_facts(["fedora"], cfg, _facts(train))


@pytest.mark.parametrize("q, k, train, warned", [
    (10, 1, (40, 40, 40), True),  # q = width 10: every summary is all of R^10
    (10, 2, (40, 40, 40), False),  # k = N - 1 keeps every other client: no tie to break
    (9, 1, (40, 40, 40), False),
    (10, 2, (40, 40, 40, 40), True),
])
def test_fedora_q_at_the_summary_width_warns_that_the_graph_is_a_tie_break(caplog, q, k, train,
                                                                          warned):
    """With fedora.q equal to the summary width every client's summary spans the whole space:
    all similarities are equal, so with k < N - 1 the neighbours are picked by tie-breaking,
    not by the data. The run goes on (the graph is still a valid top-k graph) but says so."""
    from secure_fedora.algorithms.contract import check_data_facts

    cfg = _config("fedora", dp=False, fedora={"q": q, "k": k})
    with caplog.at_level("WARNING", logger="secure_fedora.algorithms.methods"):
        check_data_facts(["fedora"], cfg, _facts(train))
    hits = [r.getMessage() for r in caplog.records if "equals the summary width" in r.getMessage()]
    if warned:
        assert hits == [f"fedora.q = 10 equals the summary width 10 (6 input features + 4 "
                        f"classes): every client's summary spans the whole space, so all "
                        f"similarities are equal and each client's fedora.k = {k} neighbours "
                        f"among the other {len(train) - 1} are picked by tie-breaking (or "
                        f"rounding), not by its data; use fedora.q < 10, or fedora.k = "
                        f"{len(train) - 1} to keep every other client"]
    else:
        assert hits == []


def test_fedora_q_at_the_summary_width_runs_and_warns_once(tmp_path, caplog):
    """A run with fedora.q at the summary width (2 features + 2 classes) and k < N - 1 trains
    and says once that its neighbours are a tie-break (its data checks run once per run)."""
    from secure_fedora.api import Experiment

    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 2, generator=gen), torch.arange(n) % 2

    data = [{"train": split(8), "val": split(4), "test": split(4)} for _ in range(3)]
    cfg = {"methods": ["fedora", "local"], "fedora": {"q": 4, "k": 1},
           "data": {"num_clients": 3},
           "training": {"rounds": 1, "local_epochs": 1, "batch_size": 4}}
    with caplog.at_level("WARNING", logger="secure_fedora.algorithms.methods"):
        results = Experiment(cfg, data=data, run_dir=tmp_path / "run").run()
    hits = [r for r in caplog.records if "equals the summary width 4" in r.getMessage()]
    assert len(hits) == 1
    assert [len(n) for n in results["methods"]["fedora"]["extra"]["graph_neighbours"]] == [1] * 3


def test_a_plug_in_refusing_the_data_is_refused_before_anything_is_written(tmp_path, register):
    """A method's check_data hook is asked with the data's facts before any method runs or any
    ledger, key or run directory is made; a plain ValueError is a ConfigError naming it."""

    class Narrow(Toy):
        @classmethod
        def check_data(cls, cfg, facts):  # type: ignore[no-untyped-def]
            if facts.input_size + facts.num_classes > 3:
                raise ValueError(f"narrow.width: {facts.input_shape} inputs, "
                                 f"{facts.num_classes} classes, train {facts.train_sizes}")

    name = register("narrow_data_x", Narrow)
    sim, run = _run(tmp_path, _config(name))
    with pytest.raises(ConfigError, match=rf"^method '{name}' cannot run on this data: "
                       r"narrow\.width: \(1, 28, 28\) inputs, 10 classes, train \(40, 40, 40\)$"):
        sim.run()
    assert not run.exists() and not (tmp_path / "ks").exists()


class ServerBreaks(Toy):
    """Toy whose server half raises in the hook named ``breaks`` (in round 2 where the hook
    is a round's or an evaluation's; at round 2's checkpoint for a state hook)."""

    breaks: str | None = None
    configured = 0  # the last round configured (what a state hook's checkpoint comes after)

    def _fail(self, hook: str, rnd: int = 2) -> None:
        if type(self).breaks == hook and rnd == 2:
            raise RuntimeError(f"{hook} broke")

    def setup_messages(self):
        self._fail("setup_messages")
        return super().setup_messages()

    def configure(self, rnd, participants):
        self._fail("configure", rnd)
        self.configured = rnd
        return super().configure(rnd, participants)

    def aggregate(self, rnd, replies):
        self._fail("aggregate", rnd)
        return super().aggregate(rnd, replies)

    def evaluation_messages(self, rnd, clients):
        self._fail("evaluation_messages", rnd)
        return super().evaluation_messages(rnd, clients)

    def finalize_messages(self):
        self._fail("finalize_messages")
        return super().finalize_messages()

    def server_finalize(self, replies):
        self._fail("server_finalize")
        return super().server_finalize(replies)

    def server_state_dict(self):
        self._fail("server_state_dict", self.configured)
        return {**super().server_state_dict(), "global_params": self.global_params}

    def load_server_state_dict(self, state):
        super().load_server_state_dict(state)
        self.global_params.copy_(state["global_params"])

    def client_state_dict(self, i):
        self._fail("client_state_dict", self.configured)
        return super().client_state_dict(i)


#: Each server-side hook of the contract a plug-in's ServerBreaks raises in, with the words
#: the error names it by.
SERVER_HOOKS = {
    "setup_messages": "setup_messages()",
    "configure": "configure(rnd, participants) of round 2",
    "aggregate": "aggregate(rnd, replies) of round 2",
    "evaluation_messages": "evaluation_messages(rnd, clients) of round 2",
    "finalize_messages": "finalize_messages()",
    "server_finalize": "server_finalize(replies)",
    "server_state_dict": "server_state_dict() for the checkpoint",
    "client_state_dict": "client_state_dict(0) for the checkpoint",
}


@pytest.mark.parametrize("hook", sorted(SERVER_HOOKS))
def test_a_plugins_server_half_that_raises_is_a_one_line_error_and_the_run_resumes(
        tmp_path, register, monkeypatch, hook):
    """A plug-in's server half raising (configure, aggregate, ...) propagated raw, a traceback
    naming neither the method nor the hook. Now a PluginError names the method, the hook and
    where it raised, the original kept as its cause; as after a client half's error, the run
    directory resumes from the last completed round's checkpoint, every release accounted
    once in the ledgers."""
    from secure_fedora.core.plugins import PluginError

    name = register(f"server_breaks_{hook}", ServerBreaks)
    cfg = _config(name, training={"rounds": 3, "checkpoint_every": 1})
    monkeypatch.setattr(ServerBreaks, "breaks", hook)
    sim, run = _run(tmp_path, cfg)
    with pytest.raises(PluginError) as info:
        sim.run()
    message = str(info.value)
    assert message.startswith(f"method '{name}': its server half's {SERVER_HOOKS[hook]} raised "
                              f"RuntimeError: {hook} broke (at {__file__}:")
    assert message.endswith(" in _fail)") and "\n" not in message
    assert isinstance(info.value.__cause__, RuntimeError)
    monkeypatch.setattr(ServerBreaks, "breaks", None)  # the plug-in fixed
    resumed, _ = _run(tmp_path, cfg)
    results = resumed.run(resume=True)
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    assert results["methods"][name]["rounds"] == 3
    for mechanisms in _ledger_mechanisms(run, name):
        assert mechanisms == ["dpsgd", "dpsgd", "dpsgd", "close"]


class DiscardBreaks(Toy):
    """Toy that rejects every upload of round 2 (an uploads override that can reject a
    reply), so round 2 is discarded, and whose ``round_discarded`` raises while ``breaks``,
    first copying the bytes of every file under ``watch`` into ``seen``."""

    breaks = False
    watch: Path | None = None
    seen: dict[Path, bytes] = {}

    def _own_uploads(self, rnd, replies):
        return {} if rnd == 2 else super()._own_uploads(rnd, replies)

    def round_discarded(self, rnd):
        if type(self).breaks:
            assert type(self).watch is not None
            type(self).seen = {p: p.read_bytes() for p in sorted(type(self).watch.rglob("*"))
                               if p.is_file()}
            raise RuntimeError("round_discarded broke")


def test_a_plugins_round_discarded_that_raises_is_a_one_line_error_and_the_run_resumes(
        tmp_path, register, monkeypatch):
    """``round_discarded`` (called instead of ``aggregate`` for a round with no accepted
    reply) raising in a plug-in is a PluginError naming the method, the hook and the round,
    as the other server-side hooks; no file is written after it (round 1's checkpoint stays
    the last), and the run resumes, every release accounted once."""
    from secure_fedora.core.plugins import PluginError
    from secure_fedora.runtimes.inprocess import load_checkpoint

    name = register("discard_breaks_x", DiscardBreaks)
    cfg = _config(name, training={"rounds": 3, "checkpoint_every": 1})
    sim, run = _run(tmp_path, cfg)
    monkeypatch.setattr(DiscardBreaks, "breaks", True)
    monkeypatch.setattr(DiscardBreaks, "watch", tmp_path)
    with pytest.raises(PluginError) as info:
        sim.run()
    message = str(info.value)
    assert message.startswith(f"method '{name}': its server half's round_discarded(rnd) of "
                              f"round 2 raised RuntimeError: round_discarded broke (at "
                              f"{__file__}:")
    assert message.endswith(" in round_discarded)") and "\n" not in message
    assert isinstance(info.value.__cause__, RuntimeError)
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert DiscardBreaks.seen and after == DiscardBreaks.seen
    assert load_checkpoint(sim.checkpoint_path(name))["round"] == 1
    assert not (run / "results.json").exists()
    monkeypatch.setattr(DiscardBreaks, "breaks", False)  # the plug-in fixed
    resumed, _ = _run(tmp_path, cfg)
    resumed.run(resume=True)
    assert [(r["round"], r["replied"]) for r in resumed.history] == [(1, 3), (2, 0), (3, 3)]
    for mechanisms in _ledger_mechanisms(run, name):
        assert mechanisms == ["dpsgd", "dpsgd", "dpsgd", "close"]


class ClonesReply(ServerBreaks):
    """ServerBreaks whose reply is a copy of the client's row: the server asks whether the
    row is the client's state (its ``client_state_dict``) while taking the uploads."""

    def message_state(self):
        return {"theta": self.theta}, {}

    def client_update(self, i, rnd, message):
        reply = super().client_update(i, rnd, message)
        return {**reply, "theta": reply["theta"].clone()}


def test_a_client_state_dict_raising_while_the_uploads_are_taken_is_a_client_half_error(
        tmp_path, register, monkeypatch):
    """Taking round 2's uploads asks each client's ``client_state_dict`` (is the reply's row
    the client's own?): a plug-in raising there propagated raw. Now a ClientHalfError naming
    the method, the client and the hook, as on a Flower node; the run resumes from round 1's
    checkpoint, every release accounted once."""
    name = register("clones_reply_x", ClonesReply)
    cfg = _config(name, training={"rounds": 3, "checkpoint_every": 1})
    monkeypatch.setattr(ServerBreaks, "breaks", "client_state_dict")
    sim, run = _run(tmp_path, cfg)
    with pytest.raises(ClientHalfError) as info:
        sim.run()
    assert str(info.value).startswith(
        f"method '{name}': client 0's client_state_dict failed: RuntimeError: client_state_dict "
        f"broke (at {__file__}:")
    assert isinstance(info.value.__cause__, RuntimeError)
    monkeypatch.setattr(ServerBreaks, "breaks", None)
    resumed, _ = _run(tmp_path, cfg)
    resumed.run(resume=True)
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    for mechanisms in _ledger_mechanisms(run, name):
        assert mechanisms == ["dpsgd", "dpsgd", "dpsgd", "close"]


class LoadBreaks(ServerBreaks):
    """ServerBreaks with a client state beyond its row, whose state hook named ``loading``
    raises ``failure`` when a checkpoint is loaded."""

    loading: str | None = None
    failure: type[Exception] = ZeroDivisionError

    def _load_fails(self, hook: str) -> None:
        if type(self).loading == hook:
            raise type(self).failure(f"{hook} cannot load")

    def load_server_state_dict(self, state):
        self._load_fails("load_server_state_dict")
        super().load_server_state_dict(state)

    def client_state_dict(self, i):
        return {**super().client_state_dict(i), "seen": torch.tensor(float(i))}

    def load_client_state_dict(self, i, state):
        self._load_fails("load_client_state_dict")
        super().load_client_state_dict(i, state)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("failure", [ZeroDivisionError, ValueError])
@pytest.mark.parametrize("hook", ["load_server_state_dict", "load_client_state_dict"])
def test_a_plugins_load_state_hook_that_raises_is_a_checkpoint_error_changing_nothing(
        tmp_path, register, monkeypatch, hook, failure):
    """A plug-in's load hook raising what a resume expects of a bad state (ValueError) was a
    CheckpointError naming neither method nor hook; anything else (ZeroDivisionError)
    propagated raw. Now both are a CheckpointError naming the checkpoint, the method, the
    hook and where it raised (the PluginError its cause); the checkpoint, the ledgers and
    every other file of the run are left as they were, and the plug-in fixed resumes."""
    from secure_fedora.core.plugins import PluginError
    from secure_fedora.runtimes.inprocess import CheckpointError

    name = register(f"load_breaks_{hook}_{failure.__name__}", LoadBreaks)
    cfg = _config(name, training={"rounds": 3, "checkpoint_every": 1})
    monkeypatch.setattr(ServerBreaks, "breaks", "configure")  # stops after round 1
    sim, run = _run(tmp_path, cfg)
    with pytest.raises(PluginError):
        sim.run()
    monkeypatch.setattr(ServerBreaks, "breaks", None)
    monkeypatch.setattr(LoadBreaks, "loading", hook)
    monkeypatch.setattr(LoadBreaks, "failure", failure)
    before = _files(run)
    resumed, _ = _run(tmp_path, cfg)
    with pytest.raises(CheckpointError) as info:
        resumed.run(resume=True)
    words = "load_server_state_dict(state)" if hook == "load_server_state_dict" else \
        "load_client_state_dict(0, state)"
    message = str(info.value)
    assert message.startswith(
        f"checkpoint {run / 'checkpoints' / f'{name}.pt'} cannot be restored: method '{name}': "
        f"its server half's {words} for the resume raised {failure.__name__}: {hook} cannot "
        f"load (at {__file__}:")
    assert message.endswith(" in _load_fails)") and "\n" not in message
    assert isinstance(info.value.__cause__, PluginError)
    assert _files(run) == before
    monkeypatch.setattr(LoadBreaks, "loading", None)  # the plug-in fixed
    again, _ = _run(tmp_path, cfg)
    again.run(resume=True)
    assert [r["round"] for r in again.history] == [1, 2, 3]
    for mechanisms in _ledger_mechanisms(run, name):
        assert mechanisms == ["dpsgd", "dpsgd", "dpsgd", "close"]


def test_a_builtin_methods_server_half_that_raises_keeps_its_traceback(tmp_path, monkeypatch):
    """A built-in method is the toolkit's own code: an exception in its server half is a bug,
    shown with its traceback (not a one-line error blaming a plug-in)."""
    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.errors import run_command

    def aggregate(self, rnd, replies):
        raise RuntimeError("a toolkit bug")

    monkeypatch.setattr(FedAvg, "aggregate", aggregate)
    sim, _ = _run(tmp_path, _config("fedavg", dp=False))
    with pytest.raises(RuntimeError, match="^a toolkit bug$"):
        run_command(lambda _args: sim.run(), None)


def test_a_plugins_server_half_error_is_one_line_on_the_command_line(tmp_path, register,
                                                                       monkeypatch):
    """Exit code 2 and ``error: <one line>``; ``--debug`` adds the original's traceback."""
    import io

    from secure_fedora.core.errors import run_command

    name = register("server_breaks_cli", ServerBreaks)
    monkeypatch.setattr(ServerBreaks, "breaks", "aggregate")
    for debug in (False, True):
        sim, _ = _run(tmp_path / f"cli{debug}", _config(name, dp=False))
        out = io.StringIO()
        assert run_command(lambda _args, s=sim: s.run(), None, debug=debug, stream=out) == 2
        lines = out.getvalue().splitlines()
        assert lines[-1].startswith(f"error: method '{name}': its server half's aggregate")
        assert ('raise RuntimeError(f"{hook} broke")' in out.getvalue()) == debug


def test_two_methods_stating_one_assumption_differently_is_a_config_error(tmp_path, register):
    """Was a plain ValueError naming one method and 'another method'; now a ConfigError
    naming both and the key, before any round."""
    def stating(value: str) -> type:
        return type(f"States{value}", (Toy,), {
            "assumptions": classmethod(lambda cls, cfg: {"reference_set": value})})

    first = register("states_a", stating("a"))
    second = register("states_b", stating("b"))
    cfg = parse_config({"methods": [first, second], **SMALL})
    sim, _ = _run(tmp_path, cfg)
    with pytest.raises(ConfigError, match=re.escape(
            "methods 'states_a' and 'states_b' state results.json assumption 'reference_set' "
            "differently ('a' vs 'b')")):
        sim.run()
    assert sim.history == []


@pytest.mark.parametrize(("hook", "instead"), [("extra_results", "server_finalize"),
                                                ("eval_row", "client_eval_row")])
def test_a_plug_in_overriding_an_in_process_only_hook_is_refused(tmp_path, register, hook, instead):
    """``extra_results`` and ``eval_row`` are the in-process runtime's, never called on Flower:
    a plug-in's override gave results the Flower runtime would not (an extra entry missing
    there, another evaluated row); now refused when the method is built, naming the hook to
    implement instead. Its own server_finalize entry reaches results.json."""
    overrides = {"extra_results": lambda self: {**FederatedMethod.extra_results(self), "n": 1},
                 "eval_row": lambda self, i: self.global_params}
    name = register(f"toy_{hook}", type(f"Toy_{hook}", (Toy,), {hook: overrides[hook]}))
    sim, _ = _run(tmp_path, _config(name, dp=False))
    with pytest.raises(ContractError, match=rf"method '{name}': Toy_{hook} overrides {hook}, "
                                            rf"which only the in-process runtime calls.*{instead}"):
        sim.run()

    class Counted(Toy):
        def server_finalize(self, replies):
            return {**super().server_finalize(replies), "n": 1}

    counted = register("toy_counted", Counted)
    sim, run = _run(tmp_path / "ok", _config(counted, dp=False))
    assert sim.run()["methods"][counted]["extra"]["n"] == 1
