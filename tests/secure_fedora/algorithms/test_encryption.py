"""The encryption injection point: FEDORA's encrypted modes use the backend the runtime puts
into the MethodContext, and refuse (never compute in the clear) when there is none."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from torch import Tensor

from secure_fedora.algorithms import fedora
from secure_fedora.algorithms.encryption import (
    CKKS_SUMMARY_VECTORS,
    EncryptionBackend,
    EncryptionUnavailableError,
)
from secure_fedora.api import Experiment
from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.runtimes.inprocess import build_context, make_method
from secure_fedora.secure.backends import CkksBackend


def _config(**fedora_keys: Any) -> Any:
    return parse_config({
        "methods": ["fedora"],
        "data": {"partition": "iid", "num_clients": 3, "train_per_client": 20,
                 "val_per_client": 10, "test_per_client": 10},
        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 10},
        "fedora": {"k": 1, **fedora_keys},
    })


@pytest.fixture(scope="module")
def clients() -> list:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    data = {"x_train": x[:90], "y_train": y[:90], "x_test": x[90:], "y_test": y[90:]}
    return Experiment(_config(), data=data).clients


def test_the_runtimes_context_carries_the_secure_layers_backend(clients: list) -> None:
    ctx = build_context(_config(), clients)
    assert isinstance(ctx.encryption, CkksBackend)
    assert isinstance(ctx.encryption, EncryptionBackend)  # implements the protocol


@pytest.mark.parametrize(("keys", "named"), [
    ({"relatedness": "encrypted"}, "fedora.relatedness = 'encrypted'"),
    ({"propagation": "encrypted"}, "fedora.propagation = 'encrypted'"),
])
def test_an_encrypted_mode_without_a_backend_is_refused(clients: list, keys: dict, named: str) -> None:
    cfg = _config(**keys)
    ctx = replace(build_context(cfg, clients), encryption=None)
    with pytest.raises(EncryptionUnavailableError, match=f"{named} needs encrypted computation.*"
                                                         "nothing is computed in the clear"):
        make_method("fedora", ctx, cfg)


def test_plain_modes_need_no_backend(clients: list) -> None:
    cfg = _config()
    method = make_method("fedora", replace(build_context(cfg, clients), encryption=None), cfg)
    method.setup()
    assert method.relatedness is not None and method.relatedness.mode == "plain"


@dataclass
class _Overlaps:
    overlaps: Tensor
    client_bytes_sent: list[int]
    server_bytes_received: int = 0
    released_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    rejections: list[Any] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)


class _RecordingBackend:
    """A stand-in backend: computes the overlaps in the clear and records the call."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def encrypted_overlaps(self, summaries: Tensor, transport: Any = None,
                           releases: Any = None) -> _Overlaps:
        self.calls.append(tuple(summaries.shape))
        return _Overlaps(fedora.subspace_overlaps(summaries), [7] * summaries.shape[0],
                         released_bytes=11)

    def propagator(self, num_clients: int) -> Any:
        raise AssertionError("not asked for")


def test_encrypted_relatedness_goes_through_the_injected_backend(clients: list) -> None:
    cfg = _config(relatedness="encrypted")
    backend = _RecordingBackend()
    method = make_method("fedora", replace(build_context(cfg, clients), encryption=backend), cfg)
    method.setup()
    assert len(backend.calls) == 1 and backend.calls[0][0] == 3
    plain_cfg = _config()
    plain = make_method("fedora", build_context(plain_cfg, clients), plain_cfg)
    plain.setup()
    assert torch.equal(method.relatedness.graph, plain.relatedness.graph)
    assert method.relatedness.details["released_bytes"] == 11
    assert method.relatedness.details["client_bytes_sent"] == [7, 7, 7]


@pytest.mark.parametrize("relatedness", ["encrypted", "noised+encrypted"])
def test_encrypted_relatedness_beyond_the_ckks_slots_is_refused_when_the_config_is_read(
    relatedness: str,
) -> None:
    """6 clients x q = 700 summary columns do not fit CKKS's 4096 slots: refused by the config,
    naming the keys (it failed after every client had released, under DP paid for, its
    summary)."""
    from privacy.ckks import DEFAULT_PARAMETERS

    assert CKKS_SUMMARY_VECTORS == DEFAULT_PARAMETERS.slot_count
    doc: dict[str, Any] = {"data": {"num_clients": 6}, "fedora": {"q": 700, "relatedness": relatedness}}
    if "noised" in relatedness:
        doc["privacy"] = {"enabled": True}
    with pytest.raises(ConfigError, match=r"data.num_clients x fedora.q = 6 x 700 = 4200 .* 4096"):
        parse_config(doc)
    assert parse_config({**doc, "fedora": {"q": 682, "relatedness": relatedness}}).fedora.q == 682
    assert parse_config({**doc, "fedora": {"q": 700, "relatedness": "plain"},
                         "privacy": {"enabled": False}}).fedora.q == 700


@pytest.mark.parametrize("keys, stated", [
    ({"relatedness": "encrypted"}, {"ckks_keys", "encrypted_relatedness"}),
    ({"propagation": "encrypted"}, {"ckks_keys"}),
    ({}, set()),
])
def test_results_state_who_holds_the_ckks_secret_key_and_what_the_server_learns(
    keys: dict, stated: set,
) -> None:
    """Every client holds the secret key (sealed to each of them) and the server learns every
    overlap block: results.json says both (it said neither in process; on Flower only that
    the key holder held the key)."""
    from secure_fedora.runtimes.results import build_results

    cfg = _config(**keys)
    assumptions = build_results(cfg, runtime="inprocess", config_hash="h", metric="accuracy",
                                outcomes={}, privacy=None, clients=[])["assumptions"]
    assert {"ckks_keys", "encrypted_relatedness"} & set(assumptions) == stated
    if stated:
        assert "every client holds the CKKS secret key" in assumptions["ckks_keys"]
        assert "colludes with no client" in assumptions["ckks_keys"]
    if "encrypted_relatedness" in stated:
        assert "every overlap block U_i^T U_j" in assumptions["encrypted_relatedness"]
