"""A Flower client's method holds its own client's state only: its memory does not grow with
the number of clients, and a read of another client's row is an error."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from secure_fedora.core.config import parse_config
from secure_fedora.core.tensors import reachable_bytes
from secure_fedora.runtimes.flower.contexts import (
    DataAccessError,
    build_algorithm,
    client_context,
)
from secure_fedora.runtimes.inprocess import build_clients
from tests.secure_fedora.runtimes.flower.deploy_support import dp_config, tiny_config

ALL_METHODS = ("fedora", "local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca")


def _client_method(method: str, num_clients: int, dp: bool = False) -> tuple[Any, Any]:
    base = dp_config() if dp else tiny_config()
    data = base.model_dump(mode="json", exclude_none=True)
    data["methods"] = [method]
    data["data"]["num_clients"] = num_clients
    cfg = parse_config(data)
    client = build_clients(dp_config() if dp else tiny_config())[1]  # the same data for every N
    ctx = client_context(cfg, 1, client)
    return build_algorithm(method, ctx, cfg), ctx


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_client_method_holds_memory_independent_of_the_number_of_clients(method: str) -> None:
    small, ctx = _client_method(method, 3)
    large, ctx_large = _client_method(method, 200)
    p = ctx.flat.num_params
    assert ctx_large.num_clients == 200
    grown = reachable_bytes(large, ctx_large) - reachable_bytes(small, ctx)
    assert grown < 4 * p, f"{method}: {grown} bytes more at 200 clients than at 3 ({p} params)"


@pytest.mark.parametrize("method", ["fedora", "fedavg"])
def test_a_dp_client_method_holds_one_noise_source_and_generator(method: str) -> None:
    small, ctx = _client_method(method, 3, dp=True)
    large, ctx_large = _client_method(method, 200, dp=True)
    grown = reachable_bytes(large, ctx_large) - reachable_bytes(small, ctx)
    assert grown < 4 * ctx.flat.num_params, f"{method}: {grown} bytes more at 200 clients"
    assert ctx_large.noise[1] is not None
    with pytest.raises(DataAccessError, match="client 1 read client 0"):
        ctx_large.noise[0]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_client_method_refuses_another_clients_row(method: str) -> None:
    algo, ctx = _client_method(method, 4)
    with pytest.raises(DataAccessError, match="client 1 read client 2"):
        algo.theta[2]
    with pytest.raises(DataAccessError):
        algo.theta.sum()  # any whole-matrix computation
    with pytest.raises(DataAccessError, match="client 1 read client 0"):
        ctx.generators[0]
    assert algo.client_state_dict(1) is not None  # its own state is there
    own = algo.theta[1]
    assert own.shape == (ctx.flat.num_params,) and torch.equal(own, ctx.init)
