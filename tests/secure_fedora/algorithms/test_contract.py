"""The method contract in use: a new method is one plug-in file, run unchanged in process with
and without DP and envelopes; the ported methods' server halves never read client data; the
privacy plan and the admission follow each method's declared releases."""

from __future__ import annotations

import re
import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from privacy.accounting import PrivacyBudget
from privacy.ledger import read_ledger
from secure_fedora.algorithms.contract import (
    ROUND,
    SETUP,
    ContractError,
    ReleaseSpec,
    build_method,
    method_class,
    method_releases,
)
from secure_fedora.algorithms.messages import KIND_GLOBAL
from secure_fedora.algorithms.methods import FedAvg, Fedora, Local
from secure_fedora.core import registry
from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context
from secure_fedora.secure.private import privacy_plan

# A whole new method, in the one file a user writes: FedAvg with an unweighted mean and a
# server-side step size, declared releases (the default: one DP-SGD model per round).
TOY_METHOD = textwrap.dedent('''
    import torch
    from pydantic import BaseModel, ConfigDict, Field

    from secure_fedora.algorithms.methods import FederatedMethod
    from secure_fedora.core.registry import METHODS


    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        step: float = Field(0.5, gt=0, le=1)


    @METHODS.register("{name}")
    class ToyMean(FederatedMethod):
        """Participants train from the global model; the server moves it halfway to the
        unweighted mean of the accepted models."""

        name = "{name}"
        params = Params  # validates [baselines.{name}] when the config is read

        def __init__(self, ctx, step=0.5):
            super().__init__(ctx)
            self.global_params = ctx.init.clone()
            self.step = step

        @classmethod
        def from_config(cls, ctx, cfg):
            return cls(ctx, **Params.model_validate(cfg.baselines.get("{name}", {{}})).model_dump())

        def message_state(self):
            n = self.ctx.num_clients
            return {{"theta": self.theta}}, {{"global": self.global_params.expand(n, -1)}}

        def configure(self, rnd, participants):
            return {{i: {{"global": self.global_params}} for i in participants}}

        def client_update(self, i, rnd, message):
            self.theta[i].copy_(message["global"])
            steps = self.ctx.train_client(i, self.theta[i])
            return {{"theta": self.theta[i], "steps": torch.tensor(steps)}}

        def aggregate(self, rnd, replies):
            if replies:
                mean = torch.stack([r["theta"] for r in replies.values()]).mean(0)
                self.global_params.add_(self.step * (mean - self.global_params))
            return {{"accepted": float(len(replies))}}

        def evaluation_messages(self, rnd, clients):
            return {{i: {{"global": self.global_params}} for i in clients}}

        def client_eval_row(self, i, message=None):
            return message["global"]

        def server_state_dict(self):
            return {{"global": self.global_params}}

        def load_server_state_dict(self, state):
            self.global_params.copy_(state["global"])
''')

SMALL = {"data": {"num_clients": 3, "train_per_client": 40, "val_per_client": 10,
                  "test_per_client": 10, "groups": 3},
         "training": {"rounds": 2, "local_epochs": 1, "batch_size": 20, "lr": 0.05}}
DP = {"enabled": True, "epsilon": 50.0, "delta": 1e-3, "noise_multiplier": 1.0,
      "noise": "reproducible"}


@pytest.fixture
def toy_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A plug-in package in ``tmp_path`` holding only the toy method's file, found through
    the registry's drop-in package (as ``secure_fedora.contrib`` is)."""
    package = f"contrib_{uuid.uuid4().hex[:8]}"
    name = f"toy_{uuid.uuid4().hex[:6]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "toy.py").write_text(TOY_METHOD.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "CONTRIB_PACKAGE", package)
    monkeypatch.setattr(registry, "_contrib_loaded", False)
    try:
        yield name
    finally:
        METHODS.unregister(name)
        for mod in [m for m in sys.modules if m.startswith(package)]:
            sys.modules.pop(mod)


def _config(method: str, **sections: dict) -> object:
    doc = {"methods": [method], **SMALL}
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return parse_config(doc)


def test_a_new_method_is_one_file_and_runs_with_and_without_dp(tmp_path, toy_method):
    assert method_class(toy_method).__name__ == "ToyMean"
    with pytest.raises(ConfigError, match=f"baselines.{toy_method}: step"):
        _config(toy_method, baselines={toy_method: {"step": 2.0}})
    plain_cfg = _config(toy_method, baselines={toy_method: {"step": 1.0}})
    clients = build_clients(plain_cfg)
    sim = Simulation(plain_cfg, tmp_path / "plain", clients=clients)
    plain = sim.run()["methods"][toy_method]
    assert len(plain["selected"]["per_client"]) == 3
    toy = sim.methods[toy_method]
    # step 1.0: the global model is exactly the mean of the last round's models
    assert torch.allclose(toy.global_params, toy.theta.mean(0))
    assert sim.history[-1]["accepted"] == 3.0

    # the same file under DP: planned from its declared releases, admitted and ledgered
    dp_cfg = _config(toy_method, privacy=DP)
    dp = Simulation(dp_cfg, tmp_path / "dp", clients=clients, keystore=tmp_path / "ks")
    body = dp.run()
    assert body["assumptions"]["differential_privacy"] is True
    rows = body["privacy"][toy_method]["clients"]
    assert all(0 < r["epsilon_spent"] <= 50.0 for r in rows)
    ledger = read_ledger(tmp_path / "dp" / "ledgers" / toy_method / f"{rows[0]['client']}.jsonl")
    releases = [e["mechanism"] for e in ledger if e["mechanism"] != "close"]
    assert releases == ["dpsgd", "dpsgd"]  # one model release per round, nothing else

    # and with signed envelopes: every download, upload, evaluation message and evaluation
    # reply is an accepted envelope (per round and client)
    env = Simulation(_config(toy_method, security={"envelopes": True}), tmp_path / "env",
                     clients=clients)
    signed = env.run()["methods"][toy_method]
    assert signed["selected"]["per_client"] == pytest.approx(
        Simulation(_config(toy_method), tmp_path / "ref", clients=clients)
        .run()["methods"][toy_method]["selected"]["per_client"], abs=1e-4)
    stats = signed["extra"]["security"]["transport"]
    evaluated = sum(1 for row in env.history if "test_mean" in row)  # + each client's reply
    assert stats["messages_accepted"] == 2 * 3 * 3 + 3 * evaluated and evaluated >= 1
    assert stats["messages_rejected"] == 0


class ForbiddenClients(Sequence):
    """Client data the server half must not touch: only the number of clients is public."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):  # type: ignore[override]
        raise AssertionError("the server half read client data")

    def __iter__(self):
        raise AssertionError("the server half read client data")


@pytest.mark.parametrize("name", ["local", "fedavg", "fedora"])
def test_server_half_never_reads_client_data(name):
    cfg = _config(name, fedavg={"finetune_epochs": 1}, fedora={"k": 1})
    clients = build_clients(cfg)
    ctx = build_context(cfg, clients)
    method = build_method(name, ctx, cfg)
    setup_replies = method.client_setup_many(method.setup_messages())
    real = ctx.clients
    ctx.clients = ForbiddenClients(len(real))
    method.server_setup(setup_replies)  # the server builds from the replies alone
    if name == "fedora":
        assert method.relatedness is not None
    for rnd in (1, 2):
        messages = method.configure(rnd, [0, 2])
        ctx.clients = real
        replies = method.client_update_many(rnd, messages)
        ctx.clients = ForbiddenClients(len(real))
        method.aggregate(rnd, replies)
    method.evaluation_messages(2, range(3))
    method.server_state_dict()
    final = method.finalize_messages()
    ctx.clients = real
    final_replies = {i: method.client_finalize(i, m) for i, m in final.items()}
    ctx.clients = ForbiddenClients(len(real))
    results = method.server_finalize(final_replies)
    if name == "fedavg":
        assert len(results["finetuned_test_accuracy"]) == 3


def test_fedavg_weights_come_from_the_replies():
    cfg = _config("fedavg")
    ctx = build_context(cfg, build_clients(cfg))
    method = FedAvg(ctx)
    rows = torch.stack([torch.full_like(ctx.init, 1.0), torch.full_like(ctx.init, 4.0)])
    method.aggregate(1, {0: {"theta": rows[0], "num_examples": torch.tensor(30)},
                         2: {"theta": rows[1], "num_examples": torch.tensor(10)}})
    assert torch.allclose(method.global_params, torch.full_like(ctx.init, 1.75))
    before = method.global_params.clone()
    method.aggregate(2, {})  # nobody's reply accepted: the global model stays
    assert torch.equal(method.global_params, before)


def test_releases_drive_the_privacy_plan_and_admission(tmp_path):
    cfg = _config("fedora", privacy=DP, fedora={"relatedness": "noised", "k": 1},
                  data={"validation": "private"})
    assert method_releases("fedora", cfg) == (
        ReleaseSpec("summary", ("gaussian_summary",), SETUP),
        ReleaseSpec("model", ("dpsgd", "gaussian_lambda"), ROUND))
    plan = privacy_plan(cfg, "fedora", PrivacyBudget(50.0, 1e-3))
    assert [r.mechanism for r in plan.releases] == ["dpsgd", "gaussian_summary", "gaussian_lambda"]
    assert plan.summary_noise is not None and plan.lambda_noise is not None
    assert method_releases("local", cfg) == (ReleaseSpec("model", ("dpsgd",), ROUND),)
    assert [r.mechanism for r in privacy_plan(cfg, "local", PrivacyBudget(50.0, 1e-3)).releases] \
        == ["dpsgd"]


def test_undeclared_or_unknown_releases_are_refused(monkeypatch):
    cfg = _config("fedavg", privacy=DP)

    def anonymous(ctx, cfg):  # a factory that does not name its class
        return FedAvg(ctx)

    class Exotic(Local):
        @classmethod
        def releases(cls, cfg):
            return (ReleaseSpec("model", ("dpsgd", "laplace_histogram"), ROUND),)

    try:
        METHODS.register("anon_factory", anonymous)
        METHODS.register("exotic_release", Exotic)
        with pytest.raises(ConfigError, match="does not name its algorithm class"):
            privacy_plan(cfg, "anon_factory", PrivacyBudget(50.0, 1e-3))
        with pytest.raises(ConfigError, match=r"'model' of \['dpsgd', 'laplace_histogram'\], which the runtimes cannot admit"):
            privacy_plan(cfg, "exotic_release", PrivacyBudget(50.0, 1e-3))
        anonymous.algorithm = FedAvg  # naming the class is enough
        assert privacy_plan(cfg, "anon_factory", PrivacyBudget(50.0, 1e-3)).releases
    finally:
        METHODS.unregister("anon_factory")
        METHODS.unregister("exotic_release")



def test_a_factory_naming_another_class_than_it_builds_is_refused_under_dp():
    """Under DP results.json states the reply entries of the class a factory names
    (``factory.algorithm``), the runtimes enforced those of the class it built: a factory
    naming FedAvg but building a subclass whose replies add ``mean_x`` ran, and results.json
    left ``mean_x`` out. Refused now when the two classes' reply rules differ."""
    class AddsX(FedAvg):
        finetunes = True  # as FedAvg: only the reply entries differ

        @classmethod
        def reply_entries(cls, cfg, stage):  # type: ignore[no-untyped-def]
            entries = super().reply_entries(cfg, stage)
            return {**entries, "mean_x": "a public value"} if stage == ROUND else entries

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]
        return AddsX.from_config(ctx, cfg)

    factory.algorithm = FedAvg
    cfg = _config("fedavg", privacy=DP)
    ctx = build_context(cfg, build_clients(cfg))
    METHODS.register("adds_x", factory)
    try:
        with pytest.raises(ContractError, match="names FedAvg as its algorithm but built AddsX"):
            build_method("adds_x", ctx, cfg)
        plain = _config("fedavg")  # without DP nothing is stated: it builds as before
        built = build_method("adds_x", build_context(plain, build_clients(plain)), plain)
        assert type(built) is AddsX
        factory.algorithm = AddsX
        assert "mean_x" in build_method("adds_x", ctx, cfg).reply_rules.entries[ROUND]
        factory.algorithm = FedAvg
        AddsX.reply_entries = FedAvg.reply_entries  # the same rules as the named class: built
        assert type(build_method("adds_x", ctx, cfg)) is AddsX
    finally:
        METHODS.unregister("adds_x")

def test_a_factory_must_build_a_class_declaring_what_the_named_class_declares():
    """The plan, the ledgers' accounting (``method_releases``) and results.json's assumptions
    read the class a factory names; a factory naming Local but building a class that also
    releases a noised lambda each round (same reply entries) was built, and its run would be
    planned and accounted for DP-SGD alone. Refused now, naming both classes and what
    differs; a subclass declaring the same still builds."""
    class WithLambda(Local):
        @classmethod
        def releases(cls, cfg):  # type: ignore[no-untyped-def]
            return (ReleaseSpec("model", ("dpsgd", "gaussian_lambda"), ROUND),)

    class Assumes(Local):
        @classmethod
        def assumptions(cls, cfg):  # type: ignore[no-untyped-def]
            return {"held_out": "a public reference set"}

    class Same(Local):
        pass

    built: list[type] = [WithLambda]

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]
        return built[0].from_config(ctx, cfg)

    factory.algorithm = Local
    cfg = _config("local", privacy=DP)
    plain = _config("local")
    ctx = build_context(cfg, build_clients(cfg))
    plain_ctx = build_context(plain, build_clients(plain))
    METHODS.register("named_local", factory)
    try:
        with pytest.raises(ContractError, match=re.escape(
                "names Local as its algorithm but built WithLambda, which declares other "
                "releases (Local: round model ['dpsgd'], WithLambda: round model "
                "['dpsgd', 'gaussian_lambda'])")) as err:
            build_method("named_local", ctx, cfg)
        assert "set the factory's 'algorithm' attribute to WithLambda" in str(err.value)
        assert type(build_method("named_local", plain_ctx, plain)) is WithLambda  # no DP
        built[0] = Assumes  # results.json would leave its assumption out, DP or not
        for c, x in ((cfg, ctx), (plain, plain_ctx)):
            with pytest.raises(ContractError, match=r"built Assumes, which declares other "
                               r"assumptions \(Local: \{\}, Assumes: \{'held_out'"):
                build_method("named_local", x, c)
        built[0] = Same  # a subclass declaring the same builds, as the named class does
        assert type(build_method("named_local", ctx, cfg)) is Same
        built[0] = Local
        assert type(build_method("named_local", ctx, cfg)) is Local
        factory.algorithm = WithLambda
        built[0] = WithLambda
        assert type(build_method("named_local", ctx, cfg)) is WithLambda
    finally:
        METHODS.unregister("named_local")


def _classmethod(body):  # type: ignore[no-untyped-def]
    return classmethod(body)


# One override per declaration the toolkit reads from a factory's named class (beside the
# releases, reply entries and assumptions compared before): each was read from the named
# class and never compared with the class the factory built.
NAMED_CLASS_OVERRIDES = {
    "derived_rows": _classmethod(lambda cls, name, outcome: {f"{name}_x": [0.0]}),
    "derived_assumptions": _classmethod(lambda cls, name, outcome, cfg: {"x": "y"}),
    "comparisons": _classmethod(lambda cls, name, outcomes: {"x": 1}),
    "check_model_size": _classmethod(lambda cls, cfg, num_params, dtype: None),
    "check_data": _classmethod(lambda cls, cfg, facts: None),
    "distributed_unsupported": _classmethod(lambda cls, cfg: "model.x (not on Flower)"),
    "sends_messages": True,  # Local keeps everything on its clients
    "amendable_keys": ("fedora.max_pull",),
    "cuda_supported": False,  # Local runs on CUDA
    "uses_relatedness": True,  # Local computes no relatedness
    "proximal_weights": ("mu",),
    "fine_tunes": _classmethod(lambda cls: True),  # Local reads no [fedavg]
    "config_section": _classmethod(lambda cls: "fedprox"),  # nor [baselines.fedprox]
    "unreleased_client_state": "its personal models",  # Local's model is trained with DP-SGD
    "check_config": _classmethod(lambda cls, cfg: None),
    "derived_row_names": _classmethod(lambda cls, name, cfg: (f"{name}_x",)),
    "params": object,
    "check_hyperparameters": _classmethod(lambda cls, section: None),
}


@pytest.mark.parametrize("declaration", sorted(NAMED_CLASS_OVERRIDES))
def test_a_factory_must_build_a_class_with_the_named_classs_every_declaration(declaration):
    """A factory naming Local but building a subclass that overrides ``declaration`` (its
    data check, the rows it derives, whether Flower can run it, ...) was built, and the
    runtimes asked Local's instead. Refused now, naming the declaration, with or without DP."""
    built = type("Overrides", (Local,), {declaration: NAMED_CLASS_OVERRIDES[declaration]})

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]
        return built.from_config(ctx, cfg)

    factory.algorithm = Local
    METHODS.register("named_local_x", factory)
    try:
        for cfg in (_config("local"), _config("local", privacy=DP)):
            ctx = build_context(cfg, build_clients(cfg))
            with pytest.raises(ContractError, match=rf"names Local as its algorithm but built "
                                                    rf"Overrides, which declares other "
                                                    rf"{declaration} \(Local: "):
                build_method("named_local_x", ctx, cfg)
        factory.algorithm = built  # naming the class it builds: built
        assert type(build_method("named_local_x", ctx, cfg)) is built
    finally:
        METHODS.unregister("named_local_x")


def test_every_declaration_read_from_a_method_class_is_compared():
    """The declarations build_method compares are every class method of FederatedAlgorithm,
    every config hook of MethodChecks and each attribute the package reads with
    ``METHODS.declared`` or ``getattr`` on a method's class; one added without being
    listed would be read from a factory's named class unchecked."""
    from secure_fedora.algorithms.config_checks import MethodChecks
    from secure_fedora.algorithms.contract import FederatedAlgorithm, named_class_declarations

    listed = set(named_class_declarations())
    assert listed == set(NAMED_CLASS_OVERRIDES) | {"releases", "reply_entries", "assumptions"}
    assert {k for k, v in vars(FederatedAlgorithm).items() if isinstance(v, classmethod)} <= listed
    assert {k for k in vars(MethodChecks) if not k.startswith("_")} <= listed
    package = Path(__file__).resolve().parents[3] / "secure_fedora"
    read = set()
    for path in package.rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"METHODS\.declare[dr]\(\w+, \"(\w+)\"\)", text))
        read |= set(re.findall(r"getattr\((?:method_class\(\w+\)|cls), \"(\w+)\"", text))
    assert read and read <= listed, read - listed


def test_a_factorys_own_config_hook_is_not_compared_with_the_built_class():
    """``METHODS.declared`` reads a config hook (here ``params``) from the factory itself when
    it declares one: the built class's own is never read, so it is not compared."""
    from pydantic import BaseModel

    class Params(BaseModel):
        pass

    built = type("OwnParams", (Local,), {"params": Params})

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]
        return built.from_config(ctx, cfg)

    factory.algorithm = Local
    factory.params = Params
    METHODS.register("own_params_x", factory)
    try:
        cfg = _config("local")
        assert type(build_method("own_params_x", build_context(cfg, build_clients(cfg)), cfg)) \
            is built
    finally:
        METHODS.unregister("own_params_x")


def test_a_factorys_named_class_with_malformed_reply_entries_is_named_by_the_method():
    """The comparison of a factory's named and built classes read the named class's
    reply_entries under an empty method name: its refusal said "method ''"."""
    class Malformed(Local):
        @classmethod
        def reply_entries(cls, cfg, stage):  # type: ignore[no-untyped-def]
            return ["theta"]

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]
        return Local.from_config(ctx, cfg)

    factory.algorithm = Malformed
    cfg = _config("local", privacy=DP)
    ctx = build_context(cfg, build_clients(cfg))
    METHODS.register("named_malformed", factory)
    try:
        with pytest.raises(ContractError, match=r"^method 'named_malformed': reply_entries\(cfg, "
                                                r"'setup'\) must return a dict"):
            build_method("named_malformed", ctx, cfg)
    finally:
        METHODS.unregister("named_malformed")


def test_method_config_checks_come_from_the_method_class():
    with pytest.raises(ConfigError, match="fedora.k = 3 must be smaller"):
        _config("fedora", fedora={"k": 3})
    _config("local", fedora={"k": 3})  # not FEDORA's concern when it does not run
    with pytest.raises(ConfigError, match="releases summary information"):
        _config("fedora", privacy=DP, fedora={"k": 1})
    assert issubclass(method_class("fedora"), Fedora)


def test_a_plug_in_methods_parameters_keep_the_built_in_bounds():
    """A plug-in's own ``params`` model need not bound its numbers: the config still refuses
    an integer beyond int64 and a float that is not finite or beyond MAX_SCALE (unless the
    field declares that bound itself), naming the key, instead of failing mid-run; nor does a
    lax model's coercion (``true`` as 1, ``"0.5"`` as 0.5) pass."""
    from pydantic import BaseModel, ConfigDict, Field

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        count: int = 3
        weight: float = 1.0
        scale: float = Field(1.0, gt=0, le=1e30)
        schedule: list[float] = []

    def build(ctx: object, cfg: object) -> FedAvg:
        return FedAvg(ctx)

    build.params = Params  # type: ignore[attr-defined]
    build.algorithm = FedAvg  # type: ignore[attr-defined]
    METHODS.register("unbounded_params", build)
    try:
        for section, key in (({"count": 10**400}, "count"), ({"count": -2**63 - 1}, "count"),
                             ({"weight": 1e300}, "weight"), ({"weight": -1e300}, "weight"),
                             ({"weight": float("inf")}, "weight"),
                             ({"schedule": [0.1, 1e300]}, "schedule.1"),
                             # a lax model coerces; config values never are
                             ({"count": True}, "count"), ({"count": 3.0}, "count"),
                             ({"weight": "0.5"}, "weight")):
            with pytest.raises(ConfigError, match=f"baselines.unbounded_params.{key}: "):
                _config("unbounded_params", baselines={"unbounded_params": section})
        cfg = _config("unbounded_params", baselines={"unbounded_params": {
            "count": 2**63 - 1, "weight": -1e6, "scale": 1e29, "schedule": [0.5]}})
        assert _config("unbounded_params", baselines={"unbounded_params": {"weight": 2}})
        assert cfg.baselines["unbounded_params"]["scale"] == 1e29  # its own bound applies
    finally:
        METHODS.unregister("unbounded_params")


def test_enveloped_fedora_resumes_with_the_clients_held_downloads(tmp_path, monkeypatch):
    """A client that rejected phi keeps its last accepted copy across a checkpoint resume."""
    from secure_fedora.secure import transport as transport_module

    real_init = transport_module.SecureExchange.__init__

    def tamper(kind, rnd, client, message):
        if kind == "phi" and client == 1 and rnd in (2, 3):
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):
        real_init(self, transport, **{**kwargs, "channel": tamper})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    cfg = _config("fedora", fedora={"k": 1}, security={"envelopes": True},
                  training={"rounds": 3, "checkpoint_every": 1})
    clients = build_clients(cfg)
    full = Simulation(cfg, tmp_path / "full", clients=clients)
    full.run()
    rejected = [(r.client, r.round, r.direction) for r in full.methods["fedora"].exchange.rejections]
    assert rejected == [(1, 2, "download"), (1, 3, "download")]

    class Stop(Exception):
        pass

    def stop(method, rnd, total):
        if rnd == 2:
            raise Stop

    cut = Simulation(cfg, tmp_path / "cut", clients=clients, progress=stop)
    with pytest.raises(Stop):
        cut.run()
    resumed = Simulation(cfg, tmp_path / "cut", clients=clients)
    resumed.run(resume=True)
    held, reference = (sim.methods["fedora"].exchange.client_rows["phi"] for sim in (resumed, full))
    assert torch.equal(held, reference)  # client 1 still holds its round-1 phi
    assert torch.equal(resumed.methods["fedora"].theta, full.methods["fedora"].theta)



@pytest.mark.parametrize("propagation", ["dense", "sparse"])
def test_a_client_whose_upload_was_rejected_keeps_its_row_across_a_resume(
        tmp_path, monkeypatch, propagation):
    """Client 0's round-1 upload and every round-2 upload are rejected: the server keeps its
    last accepted rows, each client its trained row (as on Flower). A sparse operator's
    pending phi rows after the round nobody was accepted in used to raise RuntimeError
    ('requested after theta changed') in round 3; a resume from either round's checkpoint
    restores both views and ends as the uninterrupted run."""
    from secure_fedora.secure import transport as transport_module

    real_init = transport_module.SecureExchange.__init__

    def tamper(kind, rnd, client, message):
        if kind == "theta" and (rnd == 2 or (client, rnd) == (0, 1)):
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):
        real_init(self, transport, **{**kwargs, "channel": tamper})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    cfg = _config("fedora", fedora={"k": 1, "propagation": propagation},
                  security={"envelopes": True},
                  training={"rounds": 4, "checkpoint_every": 1, "participation": 0.5})
    clients = build_clients(cfg)
    same: list[bool] = []  # after each round: client 0's own row is the server's
    views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the clients' and the server's

    def watch(name, rnd, total):
        m = full.methods["fedora"]
        same.append(torch.equal(m.theta[0], m.exchange.server_theta[0]))
        views[rnd] = (m.theta.clone(), m.exchange.server_theta.clone())

    full = Simulation(cfg, tmp_path / "full", clients=clients, progress=watch)
    full.run()
    method = full.methods["fedora"]
    rejected = sorted((r.round, r.client) for r in method.exchange.rejections)
    assert rejected == [(1, 0), (2, 1), (2, 2)]  # participants: [0, 2], [1, 2], [0, 2], [0, 1]
    assert [row["replied"] for row in full.history] == [1, 0, 2, 2]
    # client 0 keeps its round-1 row (not the server's) until its round-3 upload is accepted
    assert same == [False, False, True, True]

    class Stop(Exception):
        pass

    for stop_at in (1, 2):
        def stop(method_name, rnd, total, stop_at=stop_at):
            if rnd == stop_at:
                raise Stop

        cut = Simulation(cfg, tmp_path / f"cut{stop_at}", clients=clients, progress=stop)
        with pytest.raises(Stop):
            cut.run()
        resumed = Simulation(cfg, tmp_path / f"cut{stop_at}", clients=clients)

        def check(name, rnd, total, sim=resumed):  # every resumed round's views are the run's
            m = sim.methods["fedora"]
            assert torch.equal(m.theta, views[rnd][0]), rnd
            assert torch.equal(m.exchange.server_theta, views[rnd][1]), rnd

        resumed.progress = check
        resumed.run(resume=True)
        ours = resumed.methods["fedora"]
        assert torch.equal(ours.theta, method.theta), stop_at
        assert torch.equal(ours.exchange.server_theta, method.exchange.server_theta), stop_at
        assert torch.equal(ours.phi, method.phi), stop_at


def test_encrypted_propagation_leaves_a_rejected_client_its_trained_row(tmp_path, monkeypatch):
    """With CKKS propagation a rejected ciphertext upload leaves the views as a rejected
    plaintext upload does: the client keeps its trained row (starts its next round from it,
    checkpoints it), the server its last accepted row, and the reply is not counted. The
    propagator used to write the server's row into the client's ``theta``."""
    from secure_fedora.secure import transport as transport_module

    real_init = transport_module.SecureExchange.__init__
    wanted = {"kind": "theta"}

    def tamper(kind, rnd, client, message):
        if kind == wanted["kind"] and (client, rnd) == (1, 2):
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):
        real_init(self, transport, **{**kwargs, "channel": tamper})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)

    def configure(propagation):
        return _config("fedora", fedora={"k": 1, "propagation": propagation},
                       security={"envelopes": True},
                       training={"rounds": 4, "checkpoint_every": 1, "participation": 0.5})

    clients = build_clients(configure("dense"))
    views: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def run(propagation, kind):
        wanted["kind"] = kind
        seen = views[propagation] = {}

        def watch(name, rnd, total):
            m = sim.methods["fedora"]
            seen[rnd] = (m.theta.clone(), m.exchange.server_theta.clone())

        sim = Simulation(configure(propagation), tmp_path / propagation, clients=clients,
                         progress=watch)
        sim.run()
        return sim

    plain, encrypted = run("dense", "theta"), run("encrypted", "enc_theta")
    for sim in (plain, encrypted):
        m = sim.methods["fedora"]
        assert [(r.client, r.round, r.direction) for r in m.exchange.rejections] == [(1, 2, "upload")]
        # participants: [0, 2], [1, 2], [0, 2], [0, 1]
        assert [row["replied"] for row in sim.history] == [2, 1, 2, 2]
    mine, reference = views["encrypted"], views["dense"]
    for rnd in (2, 3):  # until client 1's round-4 upload is accepted
        own, server = mine[rnd]
        assert torch.equal(server[1], mine[1][1][1])  # the server keeps its initial row
        assert not torch.equal(own[1], server[1]), rnd  # ... the client its trained row
    assert torch.equal(mine[4][0][1], mine[4][1][1])
    for rnd in (1, 2, 3, 4):  # as plaintext propagation, up to CKKS precision
        assert torch.allclose(mine[rnd][0], reference[rnd][0], atol=1e-5), rnd
        assert torch.allclose(mine[rnd][1], reference[rnd][1], atol=1e-5), rnd

    class Stop(Exception):
        pass

    def stop(name, rnd, total):
        if rnd == 2:
            raise Stop

    cfg = configure("encrypted")
    cut = Simulation(cfg, tmp_path / "cut", clients=clients, progress=stop)
    with pytest.raises(Stop):
        cut.run()
    resumed = Simulation(cfg, tmp_path / "cut", clients=clients)

    def check(name, rnd, total):
        # fresh CKKS keys after the resume, and every client uploads again in round 3 (client
        # 1, sitting it out, the server's row): the run's views to CKKS precision
        m = resumed.methods["fedora"]
        assert torch.allclose(m.theta, mine[rnd][0], atol=1e-5), rnd
        assert torch.allclose(m.exchange.server_theta, mine[rnd][1], atol=1e-5), rnd
        checked.append(rnd)

    checked: list[int] = []
    resumed.progress = check
    resumed.run(resume=True)
    assert checked == [3, 4]

class _Sealed(torch.Tensor):
    """A tensor whose values no torch operation may read (its shape is public): reading them
    fails the test."""

    # the version counter says how often a tensor was written in place, nothing of its values
    PUBLIC = (torch.Tensor.shape.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.__len__,
              torch.Tensor._version.__get__)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in cls.PUBLIC:
            return super().__torch_function__(func, types, args, kwargs or {})
        raise AssertionError(f"private validation data was read ({func})")


def test_encrypted_propagation_runs_no_ciphertext_round_when_nobody_trained(tmp_path):
    """A round in which no participant trained (none admitted) is not aggregated: with CKKS
    propagation and envelopes no ciphertext round runs either (before: the uploads hook ran a
    whole propagation, every client's phi signed and sent, for a round nobody took part in)."""
    from secure_fedora.secure.transport import SecureExchange, SecureTransport

    cfg = _config("fedora", fedora={"k": 1, "propagation": "encrypted"},
                  security={"envelopes": True})
    method = Fedora.from_config(build_context(cfg, build_clients(cfg)), cfg)
    uploads, downloads = method.message_state()
    method.exchange = SecureExchange(SecureTransport.for_simulation(tmp_path, 3, "fedora"),
                                     uploads=uploads, downloads=downloads)
    method.setup()
    method.train_round(1, [0, 1])
    calls = []
    real = method.propagator.propagate
    method.propagator.propagate = lambda *a, **k: calls.append(k.get("changed")) or real(*a, **k)
    phi, theta = method.phi.clone(), method.theta.clone()
    assert method.train_round(2, [0, 2], admit=lambda i: False) == {"steps": 0.0}
    assert calls == [] and method.round_replied == 0
    assert torch.equal(method.phi, phi) and torch.equal(method.theta, theta)


def test_a_fedora_subclass_that_never_propagates_keeps_its_phi_in_a_round_nobody_trained(
        tmp_path):
    """A FEDORA plug-in whose ``aggregate`` takes the accepted rows but never propagates
    keeps its ``phi`` (dense propagation: unchanged). With CKKS propagation and envelopes the
    uploads' ciphertext round left its combination in ``_exchanged_phi``, which only
    ``propagate`` consumed: a later round nobody trained in (``round_discarded``) copied that
    stale combination into ``phi``, sent in the next round. Each uploads hook now starts
    with none. On Flower encrypted
    propagation is refused (``distributed_unsupported``), so it never arises there."""
    from secure_fedora.algorithms.messages import KIND_THETA
    from secure_fedora.algorithms.methods import _absorb
    from secure_fedora.secure.transport import SecureExchange, SecureTransport

    class FrozenPhi(Fedora):
        def aggregate(self, rnd, replies):  # type: ignore[no-untyped-def]
            _absorb(self.theta, replies, KIND_THETA)
            return {}

    def phis(propagation: str) -> list[torch.Tensor]:
        cfg = _config("fedora", fedora={"k": 1, "propagation": propagation},
                      security={"envelopes": True})
        method = FrozenPhi.from_config(build_context(cfg, build_clients(cfg)), cfg)
        uploads, downloads = method.message_state()
        method.exchange = SecureExchange(
            SecureTransport.for_simulation(tmp_path / propagation, 3, "fedora"),
            uploads=uploads, downloads=downloads)
        method.setup()
        seen = [method.phi.clone()]
        method.train_round(1, [0, 1])
        seen.append(method.phi.clone())
        method.train_round(2, [0, 2], admit=lambda i: False)  # nobody trains
        seen.append(method.phi.clone())
        return seen

    assert Fedora.distributed_unsupported(_config("fedora", fedora={"propagation": "encrypted"}))
    dense, encrypted = phis("dense"), phis("encrypted")
    for name, seen in (("dense", dense), ("encrypted", encrypted)):
        assert torch.equal(seen[0], seen[1]), name
        assert torch.equal(seen[1], seen[2]), name
    assert torch.allclose(encrypted[2], dense[2], atol=1e-5)


def test_fedavg_finetuning_under_private_validation_never_reads_validation_data():
    """With private validation data under DP the reported fine-tuned metric is the last
    epoch's; no epoch is chosen on (or computed from) validation rows."""
    private = _config("fedavg", fedavg={"finetune_epochs": 2}, privacy=DP,
                      data={"validation": "private"})
    ctx = build_context(private, build_clients(private))
    method = FedAvg.from_config(ctx, private)
    assert not method.select_on_validation
    for c in ctx.clients:
        c.val_x = c.val_x.as_subclass(_Sealed)
    reply = method.client_finalize(0, {KIND_GLOBAL: ctx.init})
    assert 0.0 <= float(reply["finetuned_test_metric"]) <= 1.0
    public = _config("fedavg", fedavg={"finetune_epochs": 2}, privacy=DP)
    assert FedAvg.from_config(build_context(public, build_clients(public)), public).select_on_validation


def test_a_dp_run_on_private_validation_data_never_reads_it_outside_accounted_releases(tmp_path):
    """Local and FedAvg (with fine-tuning) under DP with private validation data: the round
    reported is the final one, so neither training, evaluation, fine-tuning nor the results
    read a validation value (the data fingerprint, computed before, binds the run to it)."""
    cfg = _config("local", fedavg={"finetune_epochs": 1}, privacy=DP,
                  data={"validation": "private"}).model_copy(update={"methods": ["local", "fedavg"]})
    clients = build_clients(cfg)
    sim = Simulation(cfg, tmp_path / "run", clients=clients)
    for c in clients:
        c.val_x = c.val_x.as_subclass(_Sealed)
    results = sim.run()
    assert results["assumptions"]["model_selection"] == "final_round"
    assert len(results["methods"]["fedavg_ft"]["selected"]["per_client"]) == 3


def _crashed_and_resumed(name: str, cls: type, tmp_path: Path) -> tuple[dict, dict, Simulation]:
    """Plug-in ``cls`` registered as ``name``: its uninterrupted run's results, those of a run
    killed in round 2 (after its first client trained) and resumed, and the resumed
    Simulation."""
    from tests.secure_fedora.core.crash_support import crashes_at

    METHODS.register(name, cls)
    try:
        cfg = _config(name, training={"checkpoint_every": 1})
        clients = build_clients(cfg)
        reference = Simulation(cfg, tmp_path / "ref", clients=clients).run()["methods"][name]
        with crashes_at("train@4"):
            Simulation(cfg, tmp_path / "run", clients=clients).run()
        sim = Simulation(cfg, tmp_path / "run", clients=clients)
        resumed = sim.run(resume=True)["methods"][name]
    finally:
        METHODS.unregister(name)
    return reference, resumed, sim


class _Remembering(FedAvg):
    """FedAvg whose clients keep state beyond their row: a float64 count of the rounds they
    trained in, reported at the end, and a running mean of their models, evaluated on."""

    def __init__(self, ctx, finetune_epochs=0):  # type: ignore[no-untyped-def]
        super().__init__(ctx, finetune_epochs=0)
        self.mean = self.theta.clone()
        self.count = torch.zeros(ctx.num_clients, dtype=torch.float64)

    @classmethod
    def from_config(cls, ctx, cfg):  # type: ignore[no-untyped-def]
        return cls(ctx)

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        reply = super().client_update(i, rnd, message)
        self.count[i] += 1
        self.mean[i].mul_(0.5).add_(self.theta[i], alpha=0.5)
        return reply

    def client_eval_row(self, i, message=None):  # type: ignore[no-untyped-def]
        return self.mean[i]

    def finalize_messages(self):  # type: ignore[no-untyped-def]
        return {}

    def server_finalize(self, replies):  # type: ignore[no-untyped-def]
        return {"count": self.count.tolist(), "mean_sum": float(self.mean.double().sum())}

    def client_state_dict(self, i):  # type: ignore[no-untyped-def]
        return {"theta": self.theta[i], "mean": self.mean[i], "count": self.count[i]}

    def load_client_state_dict(self, i, state):  # type: ignore[no-untyped-def]
        super().load_client_state_dict(i, state)
        self.mean[i].copy_(state["mean"])
        self.count[i] = float(state["count"])


def test_a_plug_ins_client_state_beyond_its_row_survives_an_in_process_resume(tmp_path):
    """The in-process checkpoint held only theta and the server state, so a plug-in's client
    state beyond its row (what client_state_dict returns and a Flower node persists) restarted
    from its initial value on resume: the count below ended at 1 instead of 2 and the
    evaluated running mean differed. It now holds every client's client_state_dict fields."""
    name = "remembering_x"
    reference, resumed, sim = _crashed_and_resumed(name, _Remembering, tmp_path)
    assert reference["extra"]["count"] == [2.0, 2.0, 2.0]
    assert resumed["extra"] == reference["extra"]
    for part in ("selected", "final"):
        assert resumed[part]["per_client"] == reference[part]["per_client"]
    restored = sim.methods[name]
    fresh = _Remembering(build_context(sim.cfg, sim.clients))
    fresh.load_state_dict(restored.state_dict())
    for i in range(3):
        for key, value in restored.client_state_dict(i).items():
            assert torch.equal(fresh.client_state_dict(i)[key], value)
    with pytest.raises(ValueError, match="'client_states' must hold one tensor per client"):
        fresh.load_state_dict({**restored.state_dict(), "client_states": {"count": []}})


def test_a_resumed_run_reports_the_signed_messages_rejected_before_its_checkpoint(
        tmp_path, monkeypatch):
    """With envelopes, results.json's security record (every rejected message, the traffic)
    came from the exchange of the process that finished the run: after a resume the round-1
    rejection of a tampered upload was gone and the traffic counted only the resumed rounds.
    The checkpoint now carries the record so far, and the resumed run reports the whole run's."""
    from secure_fedora.secure import transport as transport_module

    real_init = transport_module.SecureExchange.__init__

    def tamper(kind, rnd, client, message):
        if kind == "theta" and (client, rnd) == (0, 1):
            return message[:-1] + bytes([message[-1] ^ 0x01])
        return message

    def init(self, transport, **kwargs):
        real_init(self, transport, **{**kwargs, "channel": tamper})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)
    cfg = _config("fedavg", security={"envelopes": True}, fedavg={"finetune_epochs": 0},
                  training={"rounds": 3, "checkpoint_every": 1})
    clients = build_clients(cfg)

    def record(body):
        security = body["methods"]["fedavg"]["extra"]["security"]
        counts = {k: v for k, v in security["transport"].items() if not k.endswith("seconds")}
        return [(r["round"], r["client"], r["direction"]) for r in security["rejections"]], counts

    full = record(Simulation(cfg, tmp_path / "full", clients=clients).run())
    assert full[0] == [(1, 0, "upload")] and full[1]["messages_rejected"] == 1

    class Stop(Exception):
        pass

    def stop(name, rnd, total):
        if rnd == 2:
            raise Stop

    with pytest.raises(Stop):
        Simulation(cfg, tmp_path / "cut", clients=clients, progress=stop).run()
    assert record(Simulation(cfg, tmp_path / "cut", clients=clients).run(resume=True)) == full


class _Tagged(torch.Tensor):
    """A user's torch.Tensor subclass, which a checkpoint's safe loader refuses."""


@pytest.mark.parametrize(("field", "value", "match"), [
    ("count", 1.0, r"field 'count' holds a float, not a tensor"),
    ("mean", torch.tensor([float("nan")]), r"field 'mean' holds non-finite values"),
    ("tagged", torch.ones(2).as_subclass(_Tagged),
     r"field 'tagged' holds a _Tagged \(a torch.Tensor subclass\), which a checkpoint cannot "
     "load back"),
])
def test_a_client_state_a_checkpoint_cannot_keep_is_a_contract_error(field, value, match):
    """A client state a Flower node refuses to persist (not a tensor, non-finite) is refused
    when the in-process checkpoint takes it, naming the method, the client and the field
    (not an AttributeError, nor a checkpoint that cannot be resumed)."""
    from secure_fedora.algorithms.contract import ContractError

    class Broken(_Remembering):
        def client_state_dict(self, i):  # type: ignore[no-untyped-def]
            return {**super().client_state_dict(i), field: value}

    cfg = _config("fedavg")
    method = Broken(build_context(cfg, build_clients(cfg)))
    with pytest.raises(ContractError, match=rf"^method 'fedavg': client 0's client state {match}"):
        method.state_dict()


@pytest.mark.parametrize("key", ["theta", "client_states", "held_downloads", "message_security",
                                 "training_engine"])
def test_a_server_state_key_the_checkpoint_writes_itself_is_a_contract_error(key):
    """The in-process checkpoint merged server_state_dict's keys with its own fields, so a
    plug-in's server key named like one (a server copy 'theta', say) silently replaced the
    clients' rows or was replaced, and the run resumed wrong. It is refused when the
    checkpoint is written, naming the method and the key."""
    from secure_fedora.algorithms.contract import ContractError

    class Clashing(_Remembering):
        def server_state_dict(self):  # type: ignore[no-untyped-def]
            return {**super().server_state_dict(), key: self.global_params.clone()}

    cfg = _config("fedavg")
    method = Clashing(build_context(cfg, build_clients(cfg)))
    with pytest.raises(ContractError, match=rf"^method 'fedavg': server_state_dict key\(s\) "
                                            rf"\['{key}'\] are fields the in-process checkpoint"):
        method.state_dict()
    assert set(_Remembering(method.ctx).state_dict()) >= {"theta", "global", "client_states"}


def test_an_apfl_plug_ins_server_key_alpha_is_a_contract_error():
    """APFL's checkpoint also writes every client's 'alpha': a subclass's server key of that
    name was overwritten by it."""
    from secure_fedora.algorithms.baselines import APFL
    from secure_fedora.algorithms.contract import ContractError

    class Clashing(APFL):
        def server_state_dict(self):  # type: ignore[no-untyped-def]
            return {**super().server_state_dict(), "alpha": torch.tensor(0.5)}

    cfg = _config("apfl")
    method = Clashing.from_config(build_context(cfg, build_clients(cfg)), cfg)
    with pytest.raises(ContractError, match=r"server_state_dict key\(s\) \['alpha'\]"):
        method.state_dict()


class _Partial(_Remembering):
    """_Remembering whose odd clients keep no count (a field only some clients' states hold,
    as a Flower node persists whatever its client's state has)."""

    def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
        reply = super().client_update(i, rnd, message)
        if i % 2:
            self.count[i] = 0.0
        return reply

    def client_state_dict(self, i):  # type: ignore[no-untyped-def]
        state = super().client_state_dict(i)
        if i % 2:
            del state["count"]
        return state

    def load_client_state_dict(self, i, state):  # type: ignore[no-untyped-def]
        assert ("count" in state) == (i % 2 == 0)
        FedAvg.load_client_state_dict(self, i, state)
        self.mean[i].copy_(state["mean"])
        if "count" in state:
            self.count[i] = float(state["count"])


def test_a_client_state_field_only_some_clients_hold_survives_an_in_process_resume(tmp_path):
    """A client state field held by some clients only was written into the checkpoint as a
    list shorter than the clients, which the resume refused ('must hold one tensor per
    client'): the run could not be resumed. Each client now resumes with exactly its fields."""
    name = "partial_x"
    reference, resumed, sim = _crashed_and_resumed(name, _Partial, tmp_path)
    assert reference["extra"]["count"] == [2.0, 0.0, 2.0]
    assert resumed["extra"] == reference["extra"]
    for part in ("selected", "final"):
        assert resumed[part]["per_client"] == reference[part]["per_client"]
    state = sim.methods[name].state_dict()
    fresh = _Partial(build_context(sim.cfg, sim.clients))
    for holders in (torch.tensor([0, 0]), torch.tensor([0, 3]), torch.tensor([2, 0]),
                    torch.tensor([0.0, 2.0])):
        with pytest.raises(ValueError, match="'client_states' must hold one tensor per client"):
            fresh.load_state_dict({**state, "client_state_holders": {"count": holders}})


@pytest.mark.parametrize(("value", "where", "kind"), [
    (np.array([1.0]), "['x']", "ndarray"),
    (np.float64(0.5), "['x']", "float64"),
    ({"nested": [1, Path("p")]}, "['x']['nested'][1]", "PosixPath"),
    (frozenset({1}), "['x']", "frozenset"),
    ({np.int64(1): 1.0}, "['x'] (a key)", "int64"),
])
def test_a_server_state_the_resume_cannot_load_is_a_contract_error(tmp_path, value, where, kind):
    """A server state value the checkpoint's safe loader refuses (a numpy array or scalar, a
    Path, ...) was written, and the resume then refused the checkpoint as 'corrupt or holds
    objects other than tensors and plain values': the run could not be resumed. It is refused
    when the checkpoint is written, naming the method and where the value is."""
    from secure_fedora.algorithms.contract import ContractError
    from secure_fedora.runtimes.inprocess import load_checkpoint, save_checkpoint

    class Keeping(_Remembering):
        extra: object = None

        def server_state_dict(self):  # type: ignore[no-untyped-def]
            return {**super().server_state_dict(), "x": self.extra}

    cfg = _config("fedavg")
    method = Keeping(build_context(cfg, build_clients(cfg)))
    method.extra = value
    with pytest.raises(ContractError, match=rf"^method 'fedavg': server_state_dict\(\)"
                                            rf"{re.escape(where)} holds a {kind}, which a "
                                            "checkpoint cannot load back"):
        method.state_dict()
    # what it accepts, the resume loads
    method.extra = {"a": [1, 2.5, "s", None, (True, b"b")], 3: {torch.float64, 1 + 2j},
                    "t": torch.ones(2), ("k", 1): 0}
    save_checkpoint(tmp_path / "c.pt", {"round": 1, "method": method.state_dict()})
    loaded = load_checkpoint(tmp_path / "c.pt")["method"]["x"]
    assert loaded["a"] == method.extra["a"] and torch.equal(loaded["t"], torch.ones(2))


def test_a_finalize_result_named_like_the_runtimes_own_entry_is_a_contract_error(tmp_path):
    """In process a method's results.json extra takes the signed messages' record
    ('security') and the engine counts ('training_engine') after server_finalize's results,
    so a plug-in's result of either name was silently replaced (on Flower it was kept). Both
    runtimes now refuse it, naming the method and the key."""
    from secure_fedora.algorithms.contract import ContractError, check_finalize_results

    class Clashing(_Remembering):
        def server_finalize(self, replies):  # type: ignore[no-untyped-def]
            return {**super().server_finalize(replies), "security": "mine"}

    name = "clashing_x"
    METHODS.register(name, Clashing)
    try:
        cfg = _config(name, security={"envelopes": True}, training={"rounds": 1})
        with pytest.raises(ContractError, match=rf"^method '{name}': server_finalize result\(s\) "
                                                r"\['security'\] would overwrite"):
            Simulation(cfg, tmp_path / "run", clients=build_clients(cfg)).run()
    finally:
        METHODS.unregister(name)
    with pytest.raises(ContractError, match="must return a dict of results, got NoneType"):
        check_finalize_results("m", None)
    assert check_finalize_results("m", {"count": [1.0]}) == {"count": [1.0]}


def _raises(*args):  # type: ignore[no-untyped-def]
    raise KeyError("not in the table")


# Each declaration hook a runtime, the config or the results ask a method's class, with the
# arguments it is asked with (as the message names them).
RAISING_HOOKS = {
    "check_config": "check_config(cfg)",
    "derived_row_names": "derived_row_names(name, cfg)",
    "releases": "releases(cfg)",
    "reply_entries": "reply_entries(cfg, 'setup')",
    "check_model_size": "check_model_size(cfg, num_params, dtype)",
    "check_data": "check_data(cfg, facts)",
    "assumptions": "assumptions(cfg)",
    "comparisons": "comparisons(name, outcomes)",
    "derived_assumptions": "derived_assumptions(name, outcome, cfg)",
    "derived_rows": "derived_rows(name, outcome)",
}


@pytest.mark.parametrize("hook", sorted(RAISING_HOOKS))
def test_a_declaration_hook_that_raises_is_a_one_line_error_naming_the_method(hook, tmp_path):
    """A plug-in method whose ``assumptions`` (or any other declaration the toolkit asks its
    class) raised surfaced as a bare traceback (a KeyError from deep in the runtime), and
    ``assumptions`` only when results.json was written, after training. Now a PluginError
    names the method, the hook and the exception; ``assumptions`` is asked before any round."""
    from secure_fedora.core.plugins import PluginError

    cls = type("Raising", (FedAvg,), {hook: classmethod(_raises)})
    METHODS.register("raising_x", cls)
    try:
        message = (rf"method 'raising_x': its {re.escape(RAISING_HOOKS[hook])} raised "
                   r"KeyError: 'not in the table'")
        with pytest.raises(ConfigError, match=message) as err:
            cfg = _config("raising_x", training={"rounds": 1})
            sim = Simulation(cfg, tmp_path / "run", clients=build_clients(cfg))
            sim.run()
        if hook not in ("check_config", "derived_row_names"):  # these: in the config's check
            assert isinstance(err.value, PluginError)
            assert isinstance(err.value.__cause__, KeyError)
        if hook == "assumptions":
            assert sim.history == []  # refused before the first round
    finally:
        METHODS.unregister("raising_x")


def test_a_factorys_named_class_whose_declaration_raises_is_named():
    """Comparing a factory's named and built classes asks both their declarations: one that
    raises is a PluginError naming the method and the class."""
    from secure_fedora.core.plugins import PluginError

    cls = type("RaisingRows", (Local,), {"derived_row_names": classmethod(_raises)})

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]
        return Local.from_config(ctx, cfg)

    factory.algorithm = cls
    cfg = _config("local")
    ctx = build_context(cfg, build_clients(cfg))
    METHODS.register("raising_named_x", factory)
    try:
        with pytest.raises(PluginError, match=r"^method 'raising_named_x': its derived_row_names"
                                              r"\(name, cfg\) \(RaisingRows\) raised KeyError"):
            build_method("raising_named_x", ctx, cfg)
    finally:
        METHODS.unregister("raising_named_x")


def test_reply_declarations_names_the_methods_whose_replies_it_cannot_read():
    """The one reader of what a run's replies may carry (results.json's statements and the
    audit report): every declared (stage, entry), and the methods it cannot read (a factory
    that names no class, a name this process has not registered) instead of reading them as
    carrying nothing."""
    from secure_fedora.algorithms.contract import reply_declarations

    def factory(ctx, cfg):  # type: ignore[no-untyped-def]  # names no class
        return Fedora.from_config(ctx, cfg)

    cfg = _config("fedora")
    fedora = reply_declarations(["fedora"], cfg)
    assert fedora.complete and ("round", "lambda") in fedora.entries
    assert ("setup", "summary") in fedora.entries and fedora.may_carry("round", "lambda")
    local = reply_declarations(["local"], cfg)
    assert local.complete and not local.may_carry("round", "lambda")
    METHODS.register("classless_d", factory)
    try:
        mixed = reply_declarations(["local", "classless_d", "not_registered_d", "local"], cfg)
    finally:
        METHODS.unregister("classless_d")
    assert mixed.undeclared == ("classless_d", "not_registered_d") and not mixed.complete
    assert mixed.entries == local.entries and mixed.may_carry("round", "lambda")
