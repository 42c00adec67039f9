"""``[training] engine = "batched"``: every method's batched client half equals its per-client
loop (the reference) within float rounding, with and without DP, and says what ran."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.runtimes.inprocess import Simulation, build_clients
from tests.secure_fedora.algorithms.baseline_regression import eval_rows

METHODS = ("fedora", "local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca")


def _config(name: str, engine: str, dp: bool, **training: Any) -> Any:
    data: dict[str, Any] = {
        "name": "batched", "seed": 5, "methods": [name],
        # unequal client sizes: padded batches and clients finishing at different steps
        "data": {"num_clients": 4, "train_per_client": 24, "val_per_client": 12,
                 "test_per_client": 12, "groups": 2},
        "training": {"rounds": 2, "local_epochs": 2, "batch_size": 8, "lr": 0.1,
                     "participation": 0.75, "engine": engine, **training},
        "baselines": {"ifca": {"num_clusters": 2, "selection_split": "val" if dp else "train"},
                      "apfl": {"alpha": 0.4, "adaptive": True}},
        "evaluation": {"every": 1},
    }
    if name == "fedora" and dp:
        data["fedora"] = {"relatedness": "noised", "k": 1}
    elif name == "fedora":
        data["fedora"] = {"k": 1}
    if dp:
        data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "noise": "reproducible"}
    return parse_config(data)


def _run(name: str, engine: str, dp: bool, run_dir: Path, clients: Any) -> tuple[Any, dict[str, Any]]:
    cfg = _config(name, engine, dp)
    sim = Simulation(cfg, run_dir, clients=clients)
    results = sim.run()
    return sim, results


@pytest.fixture(scope="module")
def clients() -> Any:
    torch.manual_seed(0)
    made = build_clients(_config("local", "loop", False))
    # one client with fewer training samples than the others
    first = made[0]
    made[0] = type(first)(**{**first.__dict__, "train_x": first.train_x[:13], "train_y": first.train_y[:13]})
    return made


# Local releases nothing, so it runs non-private only.
CASES = [(name, dp) for name in METHODS for dp in (False, True) if not (dp and name == "local")]


@pytest.mark.parametrize(("name", "dp"), CASES,
                         ids=[f"{name}-{'dp' if dp else 'plain'}" for name, dp in CASES])
def test_batched_engine_equals_the_loop(name: str, dp: bool, clients: Any, tmp_path: Path) -> None:
    loop_sim, loop_results = _run(name, "loop", dp, tmp_path / "loop", clients)
    batch_sim, batch_results = _run(name, "batched", dp, tmp_path / "batched", clients)
    for a, b in zip(eval_rows(loop_sim.methods[name]), eval_rows(batch_sim.methods[name]), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    loop_hist = [r for r in loop_sim.history]
    batch_hist = [r for r in batch_sim.history]
    assert [r["steps"] for r in batch_hist] == [r["steps"] for r in loop_hist]
    if name == "fedora":
        assert [r["mean_lambda"] for r in batch_hist] == pytest.approx([r["mean_lambda"] for r in loop_hist])
    if name == "apfl" and not dp:
        assert batch_results["methods"][name]["extra"]["alpha"] == pytest.approx(
            loop_results["methods"][name]["extra"]["alpha"], abs=1e-5)
    engine = batch_results["methods"][name]["extra"]["training_engine"]
    assert engine["setting"] == "batched" and engine["fallbacks"] == []
    assert set(engine["runs"]) == {"linear"}
    assert "training_engine" not in loop_results["methods"][name]["extra"]
    if dp:  # the same DP-SGD steps executed and accounted (the step check passed every round)
        assert _accounting(batch_results, name) == _accounting(loop_results, name)


def _accounting(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Each client's privacy record without its ledger head (signatures differ per run)."""
    return [{k: v for k, v in c.items() if k != "ledger_head"} for c in results["privacy"][name]["clients"]]


class _Branching(torch.nn.Module):
    """A model the batched engines cannot reproduce (a data-dependent Python branch, which
    vmap cannot trace; not a Sequential of Linear layers), so methods fall back to the loop."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        width = int(torch.tensor(input_shape).prod())
        self.first = torch.nn.Linear(width, 16)
        self.last = torch.nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x.flatten(1))
        if float(h.detach().mean()) > 0:
            h = torch.relu(h)
        return self.last(h)


def test_a_model_the_engine_cannot_reproduce_runs_the_loop_and_says_why(
        clients: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from secure_fedora.runtimes.inprocess import build_context

    def context(cfg: Any, data: Any) -> Any:
        return build_context(cfg, data, model_factory=_Branching)

    rows = {}
    for engine in ("loop", "batched"):
        sim = Simulation(_config("fedavg", engine, False), tmp_path / engine, clients=clients,
                         context_factory=context)
        with caplog.at_level(logging.WARNING, logger="secure_fedora.algorithms.methods"):
            results = sim.run()
        rows[engine] = eval_rows(sim.methods["fedavg"])
    for a, b in zip(rows["loop"], rows["batched"], strict=True):
        assert torch.equal(a, b)  # the same per-client loop ran
    record = results["methods"]["fedavg"]["extra"]["training_engine"]
    assert record["runs"] == {"loop": 2}
    assert len(record["fallbacks"]) == 1 and "vmap engine" in record["fallbacks"][0]["reason"]
    assert record["fallbacks"][0]["count"] == 2
    on_disk = json.loads((tmp_path / "batched" / "results.json").read_text())
    assert on_disk["methods"]["fedavg"]["extra"]["training_engine"] == record
    logged = [r for r in caplog.records if "falls back to the per-client loop" in r.getMessage()]
    assert len(logged) == 1  # once per reason, not once per round


class _ShowsItsInput(torch.nn.Module):
    """A model that cannot run under vmap and says so with its input in the error's text."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.last = torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            float(x.detach().sum())
        except RuntimeError:  # under vmap: no Python number of a batched tensor
            raise ValueError(f"cannot read the input {x.detach()}") from None
        return self.last(x.flatten(1))


def test_a_dp_fallback_reason_holds_the_error_class_alone_and_the_log_its_text(
        clients: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A DP run on the batched engine whose model raises in the engine's probe with its input
    in the error's text: results.json's fallback reason held that text, so the first
    client's training rows (their value 98765.25 here) reached the published document. Now
    it holds the error's class and a fixed sentence, the process's log the full text; the
    same per-client loop trains."""
    from secure_fedora.learning.batched import DP_ERROR_TEXT_WITHHELD
    from secure_fedora.runtimes.inprocess import build_context

    marked = []
    for c in clients:
        x = c.train_x.clone()
        x.view(x.shape[0], -1)[:, 0] = 98765.25
        marked.append(type(c)(**{**c.__dict__, "train_x": x}))

    def context(cfg: Any, data: Any) -> Any:
        return build_context(cfg, data, model_factory=_ShowsItsInput)

    sim = Simulation(_config("fedavg", "batched", True), tmp_path, clients=marked,
                     context_factory=context)
    with caplog.at_level(logging.WARNING):
        results = sim.run()
    record = results["methods"]["fedavg"]["extra"]["training_engine"]
    assert record["runs"] == {"loop": 2}
    assert record["fallbacks"] == [{
        "reason": f"vmap engine cannot run the model (ValueError; {DP_ERROR_TEXT_WITHHELD}; "
                  "the linear engine does not apply: the model is not an nn.Sequential)",
        "count": 2}]
    on_disk = (tmp_path / "results.json").read_text()
    assert "cannot read the input" not in on_disk and "98765" not in on_disk
    assert any("ValueError: cannot read the input" in r.getMessage() for r in caplog.records)


def test_a_method_without_a_batched_client_half_runs_its_loop_and_says_so(
        clients: Any, tmp_path: Path) -> None:
    from secure_fedora.algorithms.methods import Local

    class OwnLoop(Local):
        name = "own_loop"

        def client_update_batched(self, rnd: int, messages: Any) -> Any:
            return super(Local, self).client_update_batched(rnd, messages)

    sim = Simulation(_config("local", "batched", False), tmp_path, clients=clients,
                     method_factory=lambda name, ctx, cfg: OwnLoop(ctx))
    results = sim.run()
    record = results["methods"]["local"]["extra"]["training_engine"]
    assert record["runs"] == {"loop": 2}
    assert record["fallbacks"] == [{"reason": "method 'own_loop' has no batched client half",
                                    "count": 2}]


def test_a_subclass_overriding_the_client_half_is_not_batched_past_its_override(
        clients: Any, tmp_path: Path) -> None:
    """A plug-in subclass of a built-in that overrides ``client_update`` only would inherit a
    batched half that never calls it: it runs the loop (equal to the loop engine), says why,
    and a subclass declaring ``batched_client_half = True`` is batched again."""
    from secure_fedora.algorithms.methods import FedAvg

    class Shrink(FedAvg):
        name = "shrink"

        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            reply = super().client_update(i, rnd, message)
            return {**reply, "theta": reply["theta"] * 0.5}

    class Declared(FedAvg):
        name = "declared"
        batched_client_half = True

        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            return super().client_update(i, rnd, message)

    thetas = {}
    for engine in ("loop", "batched"):
        sim = Simulation(_config("fedavg", engine, False), tmp_path / engine, clients=clients,
                         method_factory=lambda name, ctx, cfg: Shrink(ctx))
        results = sim.run()
        thetas[engine] = sim.methods["fedavg"].theta.clone()
    assert torch.allclose(thetas["batched"], thetas["loop"], atol=1e-6)
    record = results["methods"]["fedavg"]["extra"]["training_engine"]
    assert record["runs"] == {"loop": 2}
    assert record["fallbacks"][0]["reason"].startswith(
        "Shrink overrides client_update but not client_update_batched")
    sim = Simulation(_config("fedavg", "batched", False), tmp_path / "declared", clients=clients,
                     method_factory=lambda name, ctx, cfg: Declared(ctx))
    record = sim.run()["methods"]["fedavg"]["extra"]["training_engine"]
    assert record["fallbacks"] == [] and "loop" not in record["runs"]


def test_a_fedora_subclass_overriding_client_update_runs_its_override_on_both_engines(
        clients: Any, tmp_path: Path) -> None:
    """FEDORA's own ``client_update_loop`` never calls ``client_update``: a subclass overriding
    only ``client_update`` runs the per-client loop with its override (as the Flower client
    does), on the loop engine and on the batched engine's fallback alike."""
    from secure_fedora.algorithms.methods import Fedora

    calls: dict[str, int] = {}

    class Shrink(Fedora):
        name = "shrink"

        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            calls[self.ctx.engine] = calls.get(self.ctx.engine, 0) + 1
            reply = super().client_update(i, rnd, message)
            return {**reply, "theta": reply["theta"] * 0.5}

    thetas = {}
    for engine in ("loop", "batched"):
        cfg = _config("fedora", engine, False)
        sim = Simulation(cfg, tmp_path / engine, clients=clients,
                         method_factory=lambda name, ctx, c: Shrink.from_config(ctx, c))
        sim.run()
        thetas[engine] = sim.methods["fedora"].theta.clone()
    assert calls == {"loop": 6, "batched": 6}  # 2 rounds of 3 participants
    assert torch.allclose(thetas["batched"], thetas["loop"], atol=1e-6)


def test_a_loop_override_reaching_fedoras_own_loop_still_runs_client_update(
        clients: Any, tmp_path: Path) -> None:
    """A subclass whose ``client_update_loop`` wraps FEDORA's (``super()``), below a parent
    that overrides ``client_update``, reached FEDORA's shortcut, which trained without the
    override (no call, other thetas) while the Flower client called it; now FEDORA's loop
    runs the per-client loop for any ``client_update`` but its own: the same thetas, bit for
    bit, as the parent's."""
    from secure_fedora.algorithms.methods import Fedora

    calls: list[int] = []

    class Shrink(Fedora):
        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            calls.append(i)
            reply = super().client_update(i, rnd, message)
            return {**reply, "theta": reply["theta"] * 0.5}

    class Wrapped(Shrink):
        def client_update_loop(self, rnd: int, messages: Any) -> Any:
            return super().client_update_loop(rnd, messages)

    thetas = {}
    for cls in (Shrink, Wrapped):
        calls.clear()
        sim = Simulation(_config("fedora", "loop", False), tmp_path / cls.__name__,
                         clients=clients,
                         method_factory=lambda name, ctx, c, cls=cls: cls.from_config(ctx, c))
        sim.run()
        assert len(calls) == 6, cls.__name__  # 2 rounds of 3 participants
        thetas[cls.__name__] = sim.methods["fedora"].theta.clone()
    assert torch.equal(thetas["Wrapped"], thetas["Shrink"])


def test_a_fallback_names_the_registered_method_not_its_parent(
        clients: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FedAvg subclass registered under its own name, without a ``name`` of its own, is
    named by its registered name in the fallback's log line (not as 'fedavg')."""
    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.registry import METHODS as REGISTRY

    class Halved(FedAvg):
        def client_update(self, i: int, rnd: int, message: Any) -> Any:
            reply = super().client_update(i, rnd, message)
            return {**reply, "theta": reply["theta"] * 0.5}

    REGISTRY.register("halved_avg", Halved)
    try:
        with caplog.at_level(logging.WARNING):
            results = Simulation(_config("halved_avg", "batched", False), tmp_path,
                                 clients=clients).run()
    finally:
        REGISTRY.unregister("halved_avg")
    assert results["methods"]["halved_avg"]["extra"]["training_engine"]["runs"] == {"loop": 2}
    logged = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("halved_avg: ")


@pytest.mark.parametrize("value", ["fast", "", 1])
def test_the_engine_key_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError, match="training.engine"):
        _config("local", value, False)


def test_auto_resolves_per_device_and_the_default_loop_is_not_hashed() -> None:
    from secure_fedora.core.config import config_hash
    from secure_fedora.learning.devices import resolve_engine

    assert resolve_engine(_config("local", "loop", False), torch.device("cpu")) == ("loop", "")
    assert resolve_engine(_config("local", "batched", False), torch.device("cpu"))[0] == "batched"
    auto = _config("local", "auto", False)
    engine, why = resolve_engine(auto, torch.device("cpu"), threads=1)
    assert engine == "loop" and "auto" in why and "1 thread" in why
    assert resolve_engine(auto, torch.device("cpu"), threads=2)[0] == "batched"
    assert resolve_engine(_config("local", "auto", False, threads=2), torch.device("cpu"))[0] == "batched"
    assert resolve_engine(auto, torch.device("cuda"))[0] == "batched"
    # the default is left out of the hash (older checkpoints stay valid); any other value is in it
    plain = parse_config({k: v for k, v in _config("local", "loop", False).model_dump(mode="json").items()})
    assert config_hash(plain) == config_hash(_config("local", "loop", False))
    assert config_hash(_config("local", "batched", False)) != config_hash(_config("local", "loop", False))


@pytest.mark.parametrize(("name", "dp"), [("fedora", True), ("apfl", False), ("ditto", True)])
def test_a_batched_run_killed_mid_round_resumes_exactly(name: str, dp: bool, tmp_path: Path) -> None:
    """Killed after round 2's batched training (the runtime's 4th "train" crash point),
    resumed from the round-1 checkpoint: the same results, rounds and ledgers as a run that
    was never interrupted (the batched engine is deterministic, and DP releases are re-made
    from their journal)."""
    from tests.secure_fedora.runtimes.test_crash_resume import (
        assert_same_run,
        config_dict,
        run_until_crash,
    )

    data = config_dict([name], dp)
    data["training"]["engine"] = "batched"
    cfg = parse_config(data)
    made = build_clients(cfg)
    Simulation(cfg, tmp_path / "reference", clients=made).run()
    assert run_until_crash(cfg, tmp_path / "run", made, "train@4")
    Simulation(cfg, tmp_path / "run", clients=made).run(resume=True)
    assert_same_run(tmp_path / "run", tmp_path / "reference")


# ditto and apfl under DP: the client-held model trains without noise through the module
# that carries the DP oracle's Opacus hooks (they must neither fire nor leave state there)
@pytest.mark.parametrize(("name", "dp"), [("fedora", True), ("apfl", False), ("ditto", True),
                                          ("apfl", True)])
def test_a_cnn_trains_through_the_vmap_engine_and_equals_the_loop(
        name: str, dp: bool, clients: Any, tmp_path: Path) -> None:
    rows = {}
    for engine in ("loop", "batched"):
        data = _config(name, engine, dp).model_dump(mode="json", exclude_none=True)
        data["model"] = {"name": "cnn"}
        sim = Simulation(parse_config(data), tmp_path / engine, clients=clients)
        results = sim.run()
        rows[engine] = eval_rows(sim.methods[name])
    assert set(results["methods"][name]["extra"]["training_engine"]["runs"]) == {"vmap"}
    for a, b in zip(rows["loop"], rows["batched"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
