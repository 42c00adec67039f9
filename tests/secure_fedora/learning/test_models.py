"""Tests for secure_fedora.learning.models: architectures, deterministic init, Opacus compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from secure_fedora.learning.models import ModelError, count_parameters, make_model


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_mlp_architecture_and_parameter_count() -> None:
    model = make_model("mlp", seed=0)
    assert count_parameters(model) == 118_282
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 128), (128, 128), (128, 10)]
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_cnn_architecture_and_parameter_count() -> None:
    model = make_model("cnn", seed=0)
    assert count_parameters(model) == 46_730
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_num_classes_sets_output_width(name: str) -> None:
    assert make_model(name, num_classes=5, seed=1)(torch.rand(2, 1, 28, 28)).shape == (2, 5)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_seeded_init_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    torch_state = torch.random.get_rng_state().clone()
    np_state = np.random.get_state()[1].copy()
    a = params(make_model(name, seed=11))  # type: ignore[arg-type]
    b = params(make_model(name, seed=11))  # type: ignore[arg-type]
    c = params(make_model(name, seed=12))  # type: ignore[arg-type]
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_seeded_init_matches_pytorch_default_init(name: str) -> None:
    seeded = params(make_model(name, seed=5))  # type: ignore[arg-type]
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(5)
        default = params(make_model(name))  # type: ignore[arg-type]
    finally:
        torch.random.set_rng_state(torch_state)
    assert all(torch.equal(x, y) for x, y in zip(seeded, default, strict=True))
    # The default bound for a layer with fan-in f is 1/sqrt(f): weights and biases stay inside.
    first_weight, first_bias = seeded[0], seeded[1]
    fan_in = first_weight[0].numel()
    assert float(first_weight.abs().max()) <= 1 / fan_in**0.5
    assert float(first_bias.abs().max()) <= 1 / fan_in**0.5
    assert float(first_weight.std()) > 0.5 / (3 * fan_in) ** 0.5


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_are_valid_for_opacus(name: str) -> None:
    model = make_model(name, seed=0)  # type: ignore[arg-type]
    assert ModuleValidator.validate(model, strict=True) == []
    wrapped = GradSampleModule(model)
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(wrapped(x), y).backward()
    for p in model.parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (4, *p.shape)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet"}, "unknown model 'resnet'"),
        ({"name": "mlp", "num_classes": 0}, r"num_classes \(the output width\) must be >= 1"),
        ({"name": "mlp", "num_classes": 2.0}, "num_classes must be an integer"),
        ({"name": "cnn", "seed": -3}, "seed must be a non-negative integer"),
        ({"name": "cnn", "seed": "7"}, "seed must be a non-negative integer"),
        ({"name": "cnn", "seed": True}, "seed must be a non-negative integer"),
    ],
)
def test_make_model_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        make_model(**kwargs)


def test_a_registered_model_with_other_layers_is_initialized_and_checked() -> None:
    """A model registered in MODELS was built on the meta device and materialized with
    to_empty, and only nn.Linear / nn.Conv2d were initialized: a LayerNorm's or a Conv1d's
    values were whatever memory held (non-finite outputs, or a silently wrong, irreproducible
    start), and BatchNorm's running statistics, which every client would share, were accepted.
    Now such a model is built under the seeded global RNG and gets the model factory's checks."""
    from secure_fedora.core.registry import MODELS

    def layernorm_conv(shape, num_classes, device):
        return nn.Sequential(nn.Unflatten(1, (1, shape[0])),
                             nn.Conv1d(1, 2, 3, padding=1, device=device), nn.Flatten(),
                             nn.LayerNorm(2 * shape[0], device=device),
                             nn.Linear(2 * shape[0], num_classes, device=device))

    def batchnorm(shape, num_classes, device):
        return nn.Sequential(nn.Linear(shape[0], 8, device=device), nn.BatchNorm1d(8, device=device),
                             nn.Linear(8, num_classes, device=device))

    MODELS.register("test-layernorm-conv", layernorm_conv)
    MODELS.register("test-batchnorm", batchnorm)
    try:
        before = torch.random.get_rng_state()
        model = make_model("test-layernorm-conv", 3, seed=4, input_shape=(6,))
        assert torch.equal(torch.random.get_rng_state(), before)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            expected = layernorm_conv((6,), 3, None)
        for (name, got), want in zip(model.named_parameters(), expected.parameters(), strict=True):
            assert torch.equal(got, want), name
        assert torch.equal(model[3].weight, torch.ones(12)) and torch.equal(model[3].bias, torch.zeros(12))
        with pytest.raises(ModelError, match="model 'test-batchnorm': buffer '1.running_mean'"):
            make_model("test-batchnorm", 3, seed=0, input_shape=(5,))
    finally:
        MODELS.unregister("test-layernorm-conv")
        MODELS.unregister("test-batchnorm")


def test_built_in_models_take_bces_single_output_for_binary_labels(tmp_path) -> None:
    """training.loss = "bce" on binary labels has one output; the built-in models refused it
    ('num_classes must be >= 2, got 1'), so only a model factory could train it."""
    from secure_fedora.api import Experiment

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    data = {"x_train": x[:120], "y_train": y[:120], "x_test": x[120:], "y_test": y[120:]}
    config = {"methods": ["local"], "training": {"rounds": 1, "loss": "bce", "batch_size": 8},
              "data": {"partition": "iid", "num_clients": 2, "train_per_client": 30,
                       "val_per_client": 10, "test_per_client": 10}}
    for name in ("mlp", "cnn"):
        assert make_model(name, 1, seed=0)(torch.rand(2, 1, 28, 28)).shape == (2, 1)
    results = Experiment(config, data=data, run_dir=tmp_path / "run").run()
    assert results.metric == "auc" and 0.0 <= results.mean("local") <= 1.0


def test_model_fingerprint_is_the_architecture_and_equal_across_processes() -> None:
    """The fingerprint that binds a checkpoint to its model: independent of the parameter
    values and of the process (no addresses), different for a swapped activation or another
    layer setting of the same parameter shapes."""
    import subprocess
    import sys

    from secure_fedora.learning.models import model_fingerprint

    code = ("from secure_fedora.learning.models import make_model, model_fingerprint;"
            "print(model_fingerprint(make_model('cnn', 10, seed=3)))")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout.strip()
    assert other_process == model_fingerprint(make_model("cnn", 10, seed=0))
    relu = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    assert model_fingerprint(relu) != model_fingerprint(
        nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)))
    assert model_fingerprint(relu) != model_fingerprint(
        nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.2), nn.Linear(3, 2)))
    assert model_fingerprint(nn.LeakyReLU(0.1)) != model_fingerprint(nn.LeakyReLU(0.2))


def test_a_constant_buffer_is_accepted_and_its_values_are_in_the_fingerprint() -> None:
    """Every floating-point buffer was refused ("would be shared by every client"), also a
    constant one that forward only reads (a fixed scale, a seed-drawn projection). It is now
    accepted, and its values enter the fingerprint: builds that disagree on them differ."""
    from secure_fedora.learning.models import (
        buffer_digest,
        build_user_model,
        check_buffers_constant,
        model_architecture,
        model_fingerprint,
    )
    from tests.secure_fedora.runtimes.buffer_models import constant_buffers

    model = build_user_model(constant_buffers, (6,), 3, seed=1)
    sample = torch.randn(4, 6)
    before = torch.random.get_rng_state()
    check_buffers_constant(model, sample, "model")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    assert model_architecture(model)[-1] == f"buffer values sha256 {buffer_digest(model)}"
    assert model_fingerprint(model) == model_fingerprint(build_user_model(constant_buffers, (6,), 3, seed=1))
    assert model_fingerprint(model) != model_fingerprint(build_user_model(constant_buffers, (6,), 3, seed=2))
    plain = nn.Sequential(nn.Linear(3, 2))  # no buffers: no extra line, fingerprints unchanged
    assert len(model_architecture(plain)) == 2


class _TrainingAverage(nn.Module):
    """Keeps a running mean of its inputs in training mode (as BatchNorm does)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.linear(x - self.mean)


class _EvalCache(nn.Module):
    """Replaces its buffer with the last input's mean in eval mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.zeros(4))
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.last = x.mean(0).detach()
        return self.linear(x)


@pytest.mark.parametrize(("model", "message"), [
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2)),
     r"buffer '1.running_mean' holds BatchNorm1d's running statistics"),
    (lambda: nn.Sequential(nn.Unflatten(1, (1, 4)), nn.InstanceNorm1d(1, track_running_stats=True),
                           nn.Flatten(), nn.Linear(4, 2)),
     r"buffer '1.running_mean' holds InstanceNorm1d's running statistics"),
    (lambda: __import__("tests.secure_fedora.runtimes.buffer_models", fromlist=["x"]).counter((4,), 2),
     r"buffer 'calls' changed in a training step \(forward writes it\)"),
    (_TrainingAverage, r"buffer 'mean' changed in a training step"),
    (_EvalCache, r"buffer 'last' changed in an evaluation"),
])
def test_a_buffer_that_forward_writes_is_refused(model, message) -> None:
    """Running statistics (by type) and any buffer a training step or an evaluation writes
    would carry one client's data to the others outside DP-SGD's accounting: refused, naming
    the buffer and what to do instead."""
    from secure_fedora.learning.models import build_user_model, check_buffers_constant

    with pytest.raises(ModelError, match=message) as err:
        check_buffers_constant(build_user_model(lambda s, c: model(), (4,), 2, seed=0, source="m"),
                               torch.randn(3, 4), "m")
    assert "GroupNorm" in str(err.value) and "per client" in str(err.value)


def test_a_model_with_lazy_layers_is_initialized_under_the_seed() -> None:
    """A lazy layer (nn.LazyLinear) draws its initial values at its first forward pass. A
    model factory's was then initialized from whatever state the global RNG had when the
    model was first probed (equal seeds, different starts), and a registered model stopped
    with torch's bare ValueError on its uninitialized parameter. Both are now initialized
    under the seed, by a forward pass of one row of zeros."""
    from secure_fedora.core.registry import MODELS
    from secure_fedora.learning.models import build_user_model

    def lazy(shape, num_classes, device=None):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(5, device=device), nn.ReLU(),
                             nn.Linear(5, num_classes, device=device))

    built = []
    for noise in (1, 2):  # the global RNG's state differs between the two builds
        torch.manual_seed(noise)
        built.append(params(build_user_model(lambda s, c: lazy(s, c), (2, 3), 4, seed=7)))
    assert [p.shape for p in built[0]] == [(5, 6), (5,), (4, 5), (4,)]
    assert all(torch.equal(a, b) for a, b in zip(*built, strict=True))

    MODELS.register("test-lazy", lazy)
    try:
        first, second = (params(make_model("test-lazy", 4, seed=7, input_shape=(2, 3)))
                         for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(first, built[0], strict=True))
    finally:
        MODELS.unregister("test-lazy")


def test_a_registered_model_may_take_the_factory_signature() -> None:
    """A model registered with a ``[model] factory``'s signature, ``(input_shape,
    num_classes)``, is built as that factory would be (same seeded parameters); a builder
    that raises is a ModelError naming the model, not a bare TypeError."""
    from secure_fedora.core.registry import MODELS
    from secure_fedora.learning.models import build_user_model

    def two_args(shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 4), nn.LayerNorm(4),
                             nn.Linear(4, num_classes))

    def broken(shape, num_classes, device=None):
        raise ValueError("no such width")

    MODELS.register("test-two-args", two_args)
    MODELS.register("test-broken", broken)
    try:
        model = make_model("test-two-args", 3, seed=5, input_shape=(6,))
        expected = build_user_model(two_args, (6,), 3, seed=5)
        assert all(torch.equal(a, b) for a, b in zip(params(model), params(expected), strict=True))
        assert make_model("test-two-args", 3, input_shape=(6,))(torch.rand(2, 6)).shape == (2, 3)
        for seed in (5, None):
            with pytest.raises(ModelError, match="model 'test-broken' failed .*ValueError: no such"):
                make_model("test-broken", 3, seed=seed, input_shape=(6,))
    finally:
        MODELS.unregister("test-two-args")
        MODELS.unregister("test-broken")


def test_the_cnn_refuses_channel_less_images_saying_to_add_the_channel_axis() -> None:
    """Images given as (n, H, W) reach the CNN as (H, W): the refusal says to pass them as
    (n, 1, H, W), not only to change the model."""
    with pytest.raises(ModelError, match=r"got \(20, 20\).*\(n, 1, H, W\)"):
        make_model("cnn", input_shape=(20, 20), seed=0)
    with pytest.raises(ModelError, match=r"at least 16x16, got 8x8"):  # the axis would not help
        make_model("cnn", input_shape=(8, 8), seed=0)


class _WritesInput(nn.Module):
    """Reads its input (``write=None``) or writes it in place without changing any value."""

    def __init__(self, c: int, write: str | None) -> None:
        super().__init__()
        self.linear = nn.Linear(5, c)
        self.write = write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write == "clamp":
            x.clamp_(min=-1e9)  # every probe value is above: the same values, written
        elif self.write == "mask":
            x[x > 1e6] = 0  # no probe value is that large: no row written
        return self.linear(x)


@pytest.mark.parametrize(("write", "op"), [("clamp", "aten::clamp_"),
                                           ("mask", "aten::index_put_")])
def test_a_model_writing_its_input_in_place_without_changing_a_value_is_refused(write, op):
    """The check compared values before and after a forward: a write of equal values, or of
    no row on the probe, passed, and the same write changed a client's split later."""
    from secure_fedora.learning.models import check_inputs_unchanged

    sample = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    held = sample.clone()
    model = _WritesInput(3, write)
    with pytest.raises(ModelError, match=rf"^model 'writer' writes its inputs in place in eval "
                                         rf"mode \({op} at .*test_models.py:\d+ in forward\); any "
                                         r"in-place write counts"):
        check_inputs_unchanged(model, sample, "model 'writer'")
    assert torch.equal(sample, held) and model.training  # probed on copies; its mode kept
    check_inputs_unchanged(_WritesInput(3, None), sample, "model 'reader'")
