"""Model architectures shared by every client: an MLP (any input shape) and a small CNN
(images ``(C, H, W)`` of at least 16x16; 1x28x28 by default), registered in
:data:`secure_fedora.core.registry.MODELS`.

Both are plain ``nn.Sequential`` stacks of Linear / Conv2d / ReLU / MaxPool2d / Flatten with
no normalization layers, so they are valid for Opacus DP-SGD (per-sample gradients) as is.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import numbers
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from privacy.errors import ToolkitError
from secure_fedora.core.plugins import raised_at
from secure_fedora.core.registry import MODELS
from secure_fedora.learning.devices import float32_default

ModelName = Literal["mlp", "cnn"]
MNIST_SHAPE = (1, 28, 28)


class ModelError(ToolkitError, ValueError):
    """An unknown architecture or invalid model argument."""


@MODELS.register("mlp")
def _mlp(input_shape: tuple[int, ...], num_classes: int,
         device: torch.device | str | None) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 128, device=device),
        nn.ReLU(),
        nn.Linear(128, 128, device=device),
        nn.ReLU(),
        nn.Linear(128, num_classes, device=device),
    )


@MODELS.register("cnn")
def _cnn(input_shape: tuple[int, ...], num_classes: int,
         device: torch.device | str | None) -> nn.Sequential:
    if len(input_shape) not in (2, 3):
        raise ModelError(f"model 'cnn' needs image inputs (C, H, W), got {tuple(input_shape)}; "
                         "use model 'mlp' or a [model] factory")
    height, width = input_shape[-2:]
    h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
    if h < 1 or w < 1:
        raise ModelError(f"model 'cnn' needs images of at least 16x16, got {height}x{width}; "
                         "use a [model] factory with a smaller network")
    if len(input_shape) == 2:  # usually single-channel images given without their channel axis
        raise ModelError(f"model 'cnn' needs image inputs (C, H, W), got {tuple(input_shape)}; "
                         "give the images as (n, 1, H, W), or use model 'mlp' or a [model] factory")
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=5, device=device),  # 16 x 24 x 24
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 12 x 12
        nn.Conv2d(16, 32, kernel_size=5, device=device),  # 32 x 8 x 8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32 x 4 x 4
        nn.Flatten(),
        nn.Linear(32 * h * w, 64, device=device),
        nn.ReLU(),
        nn.Linear(64, num_classes, device=device),
    )


@torch.no_grad()
def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear / Conv2d initialization, drawn from ``generator``."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def make_model(name: ModelName | str, num_classes: int = 10, seed: int | None = None,
               input_shape: Sequence[int] = MNIST_SHAPE) -> nn.Module:
    """Build a fresh registered model for inputs ``(n, *input_shape)`` (default 1x28x28),
    returning logits ``(n, C)``.

    ``"mlp"``: Flatten, Linear(784, 128), ReLU, Linear(128, 128), ReLU, Linear(128, C)
    (118,282 parameters for C = 10). ``"cnn"``: Conv(1, 16, 5), ReLU, MaxPool(2),
    Conv(16, 32, 5), ReLU, MaxPool(2), Flatten, Linear(512, 64), ReLU, Linear(64, C)
    (46,730 parameters for C = 10); other input shapes change the first Linear's width.

    With ``seed`` given, parameters follow PyTorch's default initialization drawn from a local
    ``torch.Generator`` seeded with it: equal seeds give bit-identical parameters and the global
    RNG state is neither read nor advanced. With ``seed=None`` the layers initialize from the
    global RNG, as plain PyTorch modules do. A registered model with other layers or buffers
    is built, as a model factory is, under the global RNG seeded with ``seed`` (restored
    afterwards). Every model gets :func:`check_model_state`'s checks (ModelError).
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; expected one of {MODELS.names()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ModelError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:  # the output width: 1 for binary labels under BCE (one logit)
        raise ModelError(f"num_classes (the output width) must be >= 1, got {num_classes}")
    builder = MODELS.get(name)
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ModelError(f"input_shape must be positive dimensions, got {tuple(input_shape)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or seed < 0):
        raise ModelError(f"seed must be a non-negative integer or None, got {seed!r}")
    if not _takes_device(builder):  # a factory's signature, (input_shape, num_classes)
        if seed is None:
            return check_model_state(_build(builder, name, shape, int(num_classes)),
                                     f"model {name!r}")
        return build_user_model(builder, shape, int(num_classes), int(seed),
                                source=f"model {name!r}")
    if seed is None:
        return check_model_state(_build(builder, name, shape, int(num_classes), None),
                                 f"model {name!r}")
    # Built on the meta device so construction consumes no random numbers, then materialized.
    model = _build(builder, name, shape, int(num_classes), "meta")
    if _set_by_init_parameters(model):
        model = model.to_empty(device="cpu")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
        init_parameters(model, generator)
        return check_model_state(model, f"model {name!r}")
    # A registered model with other layers or buffers: materialized, their values would be
    # uninitialized memory; built again under the seeded global RNG, as a model factory is.
    return build_user_model(lambda s, c: builder(s, c, None), shape, int(num_classes), int(seed),
                            source=f"model {name!r}")


def _takes_device(builder: object) -> bool:
    """Whether a registered model builder takes ``(input_shape, num_classes, device)``; one
    taking only ``(input_shape, num_classes)`` (a ``[model] factory``'s signature) is built as
    a factory is."""
    try:
        inspect.signature(builder).bind(None, None, None)  # type: ignore[arg-type]
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): call it as documented
        return True
    return True


def _build(builder: object, name: str, *args: object) -> nn.Module:
    """Call a registered model's builder; an exception it raises that is not a toolkit error
    becomes a :class:`ModelError` naming the model."""
    try:
        with float32_default():
            return builder(*args)  # type: ignore[operator]
    except ToolkitError:
        raise
    except Exception as err:  # user code: report whatever it raised
        raise ModelError(f"model {name!r} failed for input_shape={args[0]}, "
                         f"num_classes={args[1]}: {type(err).__name__}: {err}{raised_at(err)}") from err


def _has_lazy_parameters(model: nn.Module) -> bool:
    """Whether a parameter of ``model`` is still uninitialized (a lazy layer, e.g.
    ``nn.LazyLinear``, before its first forward pass)."""
    return any(nn.parameter.is_lazy(p) for p in model.parameters())


def _set_by_init_parameters(model: nn.Module) -> bool:
    """Whether :func:`init_parameters` sets every value of ``model``: no buffers, and every
    parameter is the weight or bias of an nn.Linear or nn.Conv2d."""
    if any(True for _ in model.buffers()) or _has_lazy_parameters(model):
        return False
    return all(isinstance(m, nn.Linear | nn.Conv2d) and {n for n, _ in own} <= {"weight", "bias"}
               for m in model.modules() if (own := list(m.named_parameters(recurse=False))))


# Addresses in a repr (e.g. "<function f at 0x7f...>") differ between processes.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def model_architecture(model: nn.Module) -> list[str]:
    """One line per module of ``model``'s tree, in ``named_modules`` order: its name, its
    class's qualified name, its ``extra_repr()``, and its own parameters' and buffers' names,
    dtypes and shapes; a model with buffers gets one more line, the SHA-256 of their values
    (:func:`buffer_digest`: constant buffers are part of the architecture, so two builds that
    disagree on them are different models). Independent of the parameters' values and the
    device, and equal across processes (memory addresses are dropped); it does not cover the
    code of ``forward``."""
    lines = []
    for name, module in model.named_modules():
        cls = type(module)
        extra = _ADDRESS.sub("", module.extra_repr())
        tensors = [f"{kind} {n} {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
                   for kind, named in (("parameter", module.named_parameters(recurse=False)),
                                       ("buffer", module.named_buffers(recurse=False)))
                   for n, t in named]
        lines.append("; ".join([f"{name or '(root)'}: {cls.__module__}.{cls.__qualname__}({extra})",
                                *tensors]))
    if any(True for _ in model.buffers()):
        lines.append(f"buffer values sha256 {buffer_digest(model)}")
    return lines


def buffer_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of ``model``'s buffers: each one's name, dtype, shape and bytes, in
    ``named_buffers`` order (read on the CPU: equal on every device). Equal digests mean
    bit-identical buffers."""
    h = hashlib.sha256()
    for name, b in model.named_buffers():
        t = b.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {list(b.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of :func:`model_architecture`: equal for models of one architecture,
    different when a module's class, order, settings or a parameter's name, shape or dtype
    differ (e.g. ReLU swapped for Tanh between layers of equal shapes)."""
    return hashlib.sha256("\n".join(model_architecture(model)).encode()).hexdigest()


def architecture_difference(recorded: Sequence[str], current: Sequence[str]) -> str:
    """The first line where two :func:`model_architecture` listings differ, as text for an
    error message ("" when they are equal)."""
    for a, b in zip(recorded, current, strict=False):
        if a != b:
            return f"{a!r} there and {b!r} here"
    if len(recorded) != len(current):
        return f"{len(recorded)} modules there and {len(current)} here"
    return ""


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_factory(factory: object, source: str) -> None:
    """ModelError unless ``factory`` can be a model factory: a callable that is not itself a
    built ``nn.Module`` (one is callable, and called as a factory it failed in its forward)."""
    if isinstance(factory, nn.Module):
        raise ModelError(f"{source} is a built {type(factory).__name__}, not a factory: pass a "
                         "function(input_shape, num_classes) that builds a new module (its class, "
                         "or a function calling it); each run builds its model under the "
                         "experiment seed")
    if not callable(factory):
        raise ModelError(f"{source} is a {type(factory).__name__}, not a factory: pass a "
                         "function(input_shape, num_classes) returning an nn.Module")


def build_user_model(factory: object, input_shape: Sequence[int], num_classes: int,
                     seed: int, source: str = "model factory") -> nn.Module:
    """Call a user ``factory(input_shape, num_classes)`` with the global RNG seeded by ``seed``
    (restored afterwards, so equal seeds give equal initial parameters; lazy layers are
    initialized there too, by a forward pass of one row of zeros) and torch's default dtype
    float32 (the caller's restored afterwards), and check the result:
    an ``nn.Module`` with float32 trainable parameters and no layer tracking running statistics
    (per-client state must live in parameters, which are the rows the federation moves;
    BatchNorm's running statistics would be shared silently; constant buffers are accepted:
    :func:`check_model_state`). Raises :class:`ModelError` naming the problem.
    """
    check_factory(factory, source)
    shape = tuple(int(d) for d in input_shape)
    with torch.random.fork_rng(devices=[]), float32_default():
        torch.manual_seed(seed)
        try:
            model = factory(shape, int(num_classes))
        except Exception as err:  # user code: report whatever it raised
            raise ModelError(f"{source} failed for input_shape={shape}, num_classes={num_classes}: "
                             f"{type(err).__name__}: {err}{raised_at(err)}") from err
        if isinstance(model, nn.Module) and _has_lazy_parameters(model):
            # a lazy layer draws its initial values at its first forward pass: here, under the
            # seed, not from whatever state the global RNG has when the model is first probed
            try:
                with torch.no_grad():
                    model(torch.zeros((1, *shape)))
            except Exception as err:
                raise ModelError(f"{source}: its lazy layers could not be initialized by a "
                                 f"forward pass of one row of zeros of shape {shape}: "
                                 f"{type(err).__name__}: {err}{raised_at(err)}") from err
    return check_model_state(model, source)


def check_model_state(model: object, source: str) -> nn.Module:
    """``model`` if it is an ``nn.Module`` whose state the federation can hold per client:
    trainable float32 CPU parameters (none frozen) and no normalization layer that tracks
    running statistics (BatchNorm, InstanceNorm with ``track_running_stats=True``); else
    :class:`ModelError` naming the problem (``source`` names where the model came from).
    Other buffers are checked by behaviour: :func:`check_buffers_constant`."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"{source} returned a {type(model).__name__}, expected a torch.nn.Module")
    # an integer or boolean parameter cannot require a gradient, so it would read as frozen,
    # and "unfreeze it" cannot be done: name its dtype first
    for n, p in model.named_parameters():
        if not (p.dtype.is_floating_point or p.dtype.is_complex):
            raise ModelError(
                f"{source}: parameter {n!r} is {p.dtype}, which cannot be trained (no gradient "
                "flows to an integer or boolean tensor); the federation trains float32 "
                "parameters: make it a float32 nn.Parameter, or keep a constant as a buffer "
                "(register_buffer)")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ModelError(
            f"{source}: parameter {frozen[0]!r} is frozen (requires_grad=False); every parameter "
            "is a client's to train (weight decay, DP noise, propagation between clients would "
            "change it): unfreeze it, or compute the frozen part outside the model (e.g. its "
            "features in the data source)")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ModelError(f"{source} returned a model without trainable parameters")
    for n, p in params:
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ModelError(f"{source}: parameter {n!r} is {p.dtype} on {p.device}; the federation "
                             "stores parameters as float32 on the CPU")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            stat = next((f"{name}.{n}" if name else n for n, _ in module.named_buffers(recurse=False)),
                        name)
            raise ModelError(
                f"{source}: buffer {stat!r} holds {type(module).__name__}'s running statistics, "
                "which forward updates from each client's data: every client would share them "
                "(only parameters are per client) and DP-SGD would not account for them; use "
                "GroupNorm or LayerNorm, or, without DP (which refuses a layer mixing the rows "
                "of a batch), track_running_stats=False (the batch's own statistics)")
    return model


@torch.no_grad()
def check_output_width(model: nn.Module, sample: torch.Tensor, width: int,
                       source: str = "model") -> None:
    """Run ``model`` on a few inputs, and on the first alone (a batch of one arises at a
    split's or an epoch's end), and check it returns ``(n, width)`` finite outputs."""
    for batch in (sample, sample[:1]) if sample.shape[0] > 1 else (sample,):
        _check_outputs(model, batch, width, source,
                       rows_passed=int(sample.shape[0]) if batch is not sample else 0)


def _check_outputs(model: nn.Module, sample: torch.Tensor, width: int, source: str,
                   rows_passed: int = 0) -> None:
    """``rows_passed``: the size of a batch of the same inputs the model already ran on (the
    failure is then the batch size's, not the inputs' dtype)."""
    was_training = model.training
    model.eval()
    try:
        out = model(sample)
    except Exception as err:  # user code: report whatever it raised
        if rows_passed:
            raise ModelError(
                f"{source} fails on a batch of one row (inputs of shape {tuple(sample.shape)}), "
                f"which it runs on a batch of {rows_passed} rows: a batch of one arises at a "
                "split's or an epoch's end, so the model must accept it (e.g. BatchNorm1d on "
                "(n, features) needs two rows for its batch statistics; GroupNorm and LayerNorm "
                f"do not): "
                f"{type(err).__name__}: {err}{raised_at(err)}") from err
        hint = ""
        if sample.dtype == torch.float32:
            hint = ("; data given as arrays are converted to float32, so a layer that needs "
                    "integer inputs (e.g. nn.Embedding) must cast them in forward, e.g. x.long()")
        raise ModelError(f"{source} fails on inputs of shape {tuple(sample.shape)} and dtype "
                         f"{sample.dtype}: {type(err).__name__}: {err}{raised_at(err)}{hint}") from err
    finally:
        model.train(was_training)
    n = int(sample.shape[0])
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{source} returns a {type(out).__name__} for {n} inputs, not a tensor; "
                         f"expected outputs of shape ({n}, {width}) (output width = num_classes "
                         "for this loss)")
    if tuple(out.shape) != (n, width):
        shape = tuple(out.shape)
        raise ModelError(f"{source} returns outputs of shape {shape} for {n} inputs; expected "
                         f"({n}, {width}) (output width = num_classes for this loss)")
    if not torch.isfinite(out).all():
        raise ModelError(f"{source} returns non-finite outputs at initialization")


@torch.no_grad()
def check_inputs_unchanged(model: nn.Module, sample: torch.Tensor, source: str = "model") -> None:
    """Raise :class:`ModelError` when an eval-mode forward writes its input batch in place
    (``x.mul_(...)``, ``x -= ...``), whether or not the values change: any in-place operation
    on the batch or a view of it (``x.clamp_(min=-1e9)``, ``x[x > 1e6] = 0`` matching no row)
    bumps the tensor's version counter, and values changed another way (through ``.data``)
    are compared. Evaluation runs the model on a client's whole split, which would change with
    every evaluation (training batches are copies). The error names the first write (torch's
    operation and the line of the model's code) where a second probe finds it. Probed on
    copies of ``sample``; torch's global generator and the model's mode are left as they were."""
    batch = sample.clone()
    version = batch._version
    _eval_forward(model, batch)
    if batch._version == version and torch.equal(batch, sample):
        return
    raise ModelError(
        f"{source} writes its inputs in place in eval mode{_first_input_write(model, sample)}; "
        "any in-place write counts, even of equal values or of no row (x.mul_(...), x -= ..., "
        "x[mask] = ..., nn.ReLU(inplace=True) on the input): evaluation runs the model on a "
        "client's whole validation and test split, so the data itself would change with "
        "every evaluation; compute on new tensors (x = x * 1.5, or x = x.clone() first)")


def _eval_forward(model: nn.Module, batch: torch.Tensor) -> None:
    """``model(batch)`` in eval mode, leaving torch's global generator and the mode as they were."""
    was_training = model.training
    devices = [batch.device] if batch.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            model(batch)
    finally:
        model.train(was_training)


class _InputWritten(ModelError):
    """Raised inside the model's forward at its first in-place write to the probed batch
    (caught by :func:`_first_input_write`, which names the write)."""


def _first_input_write(model: nn.Module, sample: torch.Tensor) -> str:
    """`` " (aten::OP at FILE:LINE in FUNCTION)"``: the first operation of an eval-mode forward
    on a copy of ``sample`` that writes that copy's memory, stopped there; ``""`` when none
    does (a write that bypasses torch's dispatcher, or one that forward makes only sometimes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    batch = sample.clone()
    storage = batch.untyped_storage().data_ptr()

    class _StopAtWrite(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            schema = func._schema.arguments
            values = [*args, *(kwargs.get(a.name) for a in schema[len(args):])]
            for arg, value in zip(schema, values, strict=False):
                if (arg.alias_info is not None and arg.alias_info.is_write
                        and isinstance(value, torch.Tensor)
                        and value.untyped_storage().data_ptr() == storage):
                    raise _InputWritten(func._schema.name)
            return func(*args, **kwargs)

    try:
        with _StopAtWrite():
            _eval_forward(model, batch)
    except _InputWritten as err:
        at = raised_at(err).removeprefix(" (").removesuffix(")")
        return f" ({err.args[0]}{' ' + at if at else ''})"
    except Exception:  # user code under the probe: the first probe ran, so only name nothing
        return ""
    return ""


def _first_written(held: Sequence[tuple[str, torch.Tensor, int]]) -> str | None:
    """The name of the first tensor of ``held`` (name, tensor, version counter when taken)
    written in place since; None when none was."""
    return next((name for name, tensor, version in held if tensor._version != version), None)


class BufferGuard:
    """The digest of a model's buffers, taken when it passed :func:`check_buffers_constant`,
    and the version counters of ``inputs`` (named tensors: the clients' splits), taken when
    the model passed :func:`check_inputs_unchanged`, and of ``targets`` (the splits' labels,
    which the loss ``loss`` receives as views in evaluation); :meth:`check` raises
    :class:`ModelError` when a buffer has changed since, or an input or target was written in
    place (a forward or loss that writes one only under conditions the probes did not meet).
    Reading a version counter costs nothing: the splits are not copied or hashed."""

    def __init__(self, model: nn.Module, source: str,
                 inputs: Sequence[tuple[str, torch.Tensor]] = (),
                 targets: Sequence[tuple[str, torch.Tensor]] = (),
                 loss: str = "the loss") -> None:
        self.model = model
        self.source = source
        self.loss = loss
        self.names = [n for n, _ in model.named_buffers()]
        self.digest = buffer_digest(model) if self.names else ""
        self.inputs = [(name, t, t._version) for name, t in inputs]
        self.targets = [(name, t, t._version) for name, t in targets]

    def check(self, when: str) -> None:
        """Nothing when the buffers are bit-identical to the checked ones and no input or
        target was written in place since (any in-place operation on it or a view of it),
        else ModelError."""
        if self.names and buffer_digest(self.model) != self.digest:
            raise ModelError(
                f"{self.source}: a buffer ({', '.join(map(repr, self.names))}) changed {when}; "
                f"{_WRITTEN_BUFFER}")
        name = _first_written(self.inputs)
        if name is not None:
            raise ModelError(
                f"{self.source} wrote {name} in place {when} (a forward on it: an "
                "evaluation, a lambda or a selection pass; the check before training saw "
                "no write on its probe rows, so the write depends on the values or the "
                "parameters): the split has changed in this process, and the run stops "
                "here; compute on new tensors (x = x * 1.5, or x = x.clone() first)")
        name = _first_written(self.targets)
        if name is not None:
            raise ModelError(
                f"{name} were written in place {when}: {self.loss} receives them as its "
                "targets (an evaluation, a lambda or a selection pass; the check before "
                "training saw no write on its probe rows, so the write depends on the "
                "values or the outputs): the labels have changed in this process, and the "
                "run stops here; compute on new tensors (t = targets.float(), or "
                "targets.clone() first)")


_WRITTEN_BUFFER = (
    "a buffer is shared by every client (only parameters are per client), so it must be a "
    "constant that forward only reads: one that forward writes (running statistics, a counter) "
    "would carry clients' data between them outside DP-SGD's accounting; make it a parameter, "
    "compute it in forward, or use layers without running statistics (GroupNorm, LayerNorm)")


def check_buffers_constant(model: nn.Module, sample: torch.Tensor, source: str = "model") -> None:
    """Raise :class:`ModelError` naming the first buffer that a train-mode forward and backward
    on ``sample`` or an eval-mode forward on it changes (bit for bit, or replaces, adds or
    removes). The global RNG is restored and the parameters' gradients are left as they were."""
    if not any(True for _ in model.buffers()):
        return
    before = {n: b.detach().clone() for n, b in model.named_buffers()}
    grads = [(p, p.grad) for p in model.parameters()]
    was_training = model.training
    devices = [sample.device] if sample.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            out = model(sample)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.float().sum().backward()
            _compare_buffers(model, before, source, "a training step")
            model.eval()
            with torch.no_grad():
                model(sample)
            _compare_buffers(model, before, source, "an evaluation")
    finally:
        model.train(was_training)
        for p, g in grads:
            p.grad = g


def _compare_buffers(model: nn.Module, before: dict[str, torch.Tensor], source: str,
                     step: str) -> None:
    after = dict(model.named_buffers())
    for name in [*before, *(n for n in after if n not in before)]:
        a, b = before.get(name), after.get(name)
        same = a is not None and b is not None and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a.reshape(-1).view(torch.uint8), b.detach().contiguous().reshape(-1).view(torch.uint8))
        if not same:
            raise ModelError(f"{source}: buffer {name!r} changed in {step} (forward writes it); "
                             f"{_WRITTEN_BUFFER}")
