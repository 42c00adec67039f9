"""FedAvg's fine-tuning with a metric that is no number in [0, 1]: a NaN validation metric is
never the chosen epoch's, and a client without a fine-tuned test metric is left out of the
``<name>_ft`` row (null, listed, with a warning), never averaged into it nor stopping the run."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch

from secure_fedora.algorithms import methods
from secure_fedora.algorithms.messages import KIND_GLOBAL
from secure_fedora.algorithms.methods import NO_FINETUNED_METRIC, FedAvg
from secure_fedora.runtimes.inprocess import Simulation, build_clients, build_context
from tests.secure_fedora.algorithms.test_contract import _config

NAN = float("nan")


def test_fine_tuning_never_chooses_a_validation_metric_outside_0_1(monkeypatch):
    """Client 0's metrics are scripted per epoch (epoch 0 is the received model): an epoch
    whose validation metric is NaN or above 1 is never chosen, one with a number beats it,
    with none the reply is epoch 0's, and a chosen NaN test metric is replied as missing."""
    cfg = _config("fedavg", fedavg={"finetune_epochs": 3})
    ctx = build_context(cfg, build_clients(cfg))
    method = FedAvg.from_config(ctx, cfg)
    c = ctx.clients[0]
    real = methods.evaluate

    def reply(val: list[float], test: list[float]) -> float:
        epoch = [-1]

        def scripted(flat, row, x, y, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = real(flat, row, x, y, *args, **kwargs)
            if x is c.val_x:
                epoch[0] += 1
                return dataclasses.replace(out, metric=val[epoch[0]])
            return dataclasses.replace(out, metric=test[epoch[0]]) if x is c.test_x else out

        monkeypatch.setattr(methods, "evaluate", scripted)
        return float(method.client_finalize(0, {KIND_GLOBAL: ctx.init})["finetuned_test_metric"])

    test = [0.9, 0.5, 0.7, 0.3]
    assert reply([NAN, 0.2, NAN, 0.1], test) == 0.5  # a NaN at epoch 0 beat every epoch
    assert reply([0.2, NAN, 0.3, 1.5], test) == 0.7  # 1.5 "beat" 0.3
    assert reply([NAN] * 4, test) == 0.9
    assert reply([0.2, 0.3, 0.1, 0.1], [0.9, NAN, 0.7, 0.3]) == NO_FINETUNED_METRIC


def test_a_client_without_a_fine_tuned_metric_is_left_out_of_the_ft_row(tmp_path, monkeypatch,
                                                                         caplog):
    """In process: client 1's test metric is NaN in fine-tuning (its reply stopped the
    finished run as non-finite); it is null in ``fedavg_ft``, listed as missing and named in
    a warning, and the row's figures are the other clients'."""
    cfg = _config("fedavg", fedavg={"finetune_epochs": 1}, training={"rounds": 1})
    clients = build_clients(cfg)
    target = clients[1].test_x.clone()
    real = methods.evaluate

    def nan_for_client_1(flat, row, x, y, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(flat, row, x, y, *args, **kwargs)
        same = x.shape == target.shape and torch.equal(x.cpu(), target)
        return dataclasses.replace(out, metric=NAN) if same else out

    monkeypatch.setattr(methods, "evaluate", nan_for_client_1)
    with caplog.at_level(logging.WARNING, logger="secure_fedora.algorithms.methods"):
        results = Simulation(cfg, tmp_path / "run", clients=clients).run()
    tuned = results["methods"]["fedavg_ft"]["selected"]
    assert tuned["per_client"][1] is None and tuned["missing_clients"] == [1]
    others = [tuned["per_client"][0], tuned["per_client"][2]]
    assert all(0.0 <= v <= 1.0 for v in others)
    assert tuned["mean"] == pytest.approx(sum(others) / 2, abs=1e-6)
    assert results["methods"]["fedavg"]["extra"]["finetuned_left_out"] == [1]
    assert re.search(r"client 1: fine-tuned test metric .* left out of fedavg_ft", caplog.text)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["methods"]["fedavg_ft"]["selected"] == tuned
    assert "non_finite_values" not in written
