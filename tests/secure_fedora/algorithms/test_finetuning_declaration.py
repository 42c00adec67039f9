"""FedAvg's fine-tuning (its finalize reply, its ``<name>_ft`` row) belongs to FedAvg and to the
classes that declare ``finetunes = True``: a class built on FedAvg does not inherit it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secure_fedora.algorithms.baselines import FedProx
from secure_fedora.algorithms.contract import (
    FINALIZE,
    ContractError,
    build_method,
    declared_reply_entries,
)
from secure_fedora.algorithms.methods import FedAvg
from secure_fedora.core.config import parse_config
from secure_fedora.core.registry import METHODS
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context

SMALL = {
    "data": {
        "num_clients": 3,
        "train_per_client": 40,
        "val_per_client": 10,
        "test_per_client": 10,
        "groups": 3,
    },
    "training": {"rounds": 1, "local_epochs": 1, "batch_size": 20, "lr": 0.05},
    "fedavg": {"finetune_epochs": 2},
}
DP = {
    "enabled": True,
    "epsilon": 50.0,
    "delta": 1e-3,
    "noise_multiplier": 1.0,
    "noise": "reproducible",
}


class ServerMomentum(FedAvg):
    """A researcher's FedAvg with server momentum: no fine-tuning declared."""

    def aggregate(self, rnd, replies):  # type: ignore[no-untyped-def]
        return super().aggregate(rnd, replies)


class TunedAvg(FedAvg):
    finetunes = True


class TunedMomentum(TunedAvg):
    pass


def _config(methods: list[str], dp: bool = False) -> object:
    return parse_config({"methods": methods, **SMALL, **({"privacy": DP} if dp else {})})


@pytest.fixture
def registered():  # type: ignore[no-untyped-def]
    names = {
        "momentum_ftd": ServerMomentum,
        "tuned_ftd": TunedAvg,
        "tuned_momentum_ftd": TunedMomentum,
    }
    for name, cls in names.items():
        METHODS.register(name, cls)
    try:
        yield names
    finally:
        for name in names:
            METHODS.unregister(name)


def test_a_class_built_on_fedavg_declares_fine_tuning_only_where_it_says_so(registered):
    """A FedAvg subclass (server momentum) declared FedAvg's finalize reply
    ``finetuned_test_metric`` (stated in results.json as leaving its clients outside DP) and
    reserved a ``<name>_ft`` row, and read ``[fedavg] finetune_epochs``; FedProx, which never
    fine-tunes, declared the same reply."""
    cfg = _config(["fedavg", *registered], dp=True)
    finalize = {
        name: declared_reply_entries(name, cfg)[FINALIZE]
        for name in ["fedavg", "fedprox", *registered]
    }
    assert finalize["momentum_ftd"] == {} and finalize["fedprox"] == {}
    for name in ("fedavg", "tuned_ftd", "tuned_momentum_ftd"):
        assert list(finalize[name]) == ["finetuned_test_metric"]
        assert finalize[name]["finetuned_test_metric"]["built_in"]
    assert ServerMomentum.derived_row_names("momentum_ftd", cfg) == ()
    assert TunedMomentum.derived_row_names("tuned_momentum_ftd", cfg) == ("tuned_momentum_ftd_ft",)
    assert FedAvg.derived_row_names("fedavg", cfg) == ("fedavg_ft",)
    ctx = build_context(cfg, build_clients(cfg))
    assert build_method("momentum_ftd", ctx, cfg).finetune_epochs == 0
    assert build_method("tuned_momentum_ftd", ctx, cfg).finetune_epochs == 2
    assert build_method("fedavg", ctx, cfg).finetune_epochs == 2


def test_a_class_fine_tuning_without_declaring_it_is_refused_when_built():
    """A class built on FedAvg that passes its own ``finetune_epochs`` without declaring
    ``finetunes`` would send replies its declarations do not state: refused when built."""
    cfg = _config(["fedavg"])
    ctx = build_context(cfg, build_clients(cfg))
    with pytest.raises(
        ContractError,
        match=r"ServerMomentum is built on FedAvg with "
        r"finetune_epochs = 1 but does not declare.*"
        r"'finetunes = True'",
    ):
        ServerMomentum(ctx, finetune_epochs=1)
    assert TunedMomentum(ctx, finetune_epochs=1).finetune_epochs == 1
    # unset: FedAvg's default for a class that fine-tunes, none for another
    assert (FedAvg(ctx).finetune_epochs, TunedMomentum(ctx).finetune_epochs) == (5, 5)
    assert ServerMomentum(ctx).finetune_epochs == 0
    assert FedProx(ctx).finetune_epochs == 0


def test_a_dp_run_of_a_fedavg_subclass_reports_no_fine_tuning_it_did_not_do(
    tmp_path: Path, registered
):
    """Run beside fine-tuning FedAvg under DP, the server-momentum subclass sends no finalize
    reply and results.json states none, nor a row or assumption of its fine-tuning; FedAvg's
    and the declaring subclass's are as before."""
    cfg = _config(["momentum_ftd", "tuned_ftd", "fedavg"], dp=True)
    body = Simulation(cfg, tmp_path / "run", keystore=tmp_path / "ks").run()
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["privacy"]["momentum_ftd"]["reply_entries"][FINALIZE] == {}
    assert list(on_disk["privacy"]["fedavg"]["reply_entries"][FINALIZE]) == [
        "finetuned_test_metric"
    ]
    assert "finetuned_test_accuracy" not in body["methods"]["momentum_ftd"]["extra"]
    assert {"fedavg_ft", "tuned_ftd_ft"} <= set(on_disk["methods"])
    assert "momentum_ftd_ft" not in on_disk["methods"]
    assert "momentum_ftd_finetuning" not in on_disk["assumptions"]
    assert "tuned_ftd_finetuning" in on_disk["assumptions"]
    assert torch.isfinite(torch.tensor(on_disk["methods"]["fedavg_ft"]["selected"]["mean"]))
