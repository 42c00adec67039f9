"""A method declares the proximal weights its local objective adds (``proximal_weights``), and
the config holds every declared weight to the local step's stability bound, as FedProx's.

Before, the bound was checked through a table keyed by the built-in baselines' names, so a
registered user method with a proximal term was never checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from secure_fedora.algorithms.baselines import FedProx
from secure_fedora.algorithms.config_checks import PROXIMAL_WEIGHTS
from secure_fedora.algorithms.methods import FedAvg
from secure_fedora.core.config import ConfigError, method_proximal_terms, parse_config
from secure_fedora.core.registry import METHODS

# lr 0.5 with momentum 0.5: bound 2 (1 + 0.5) = 3, so weight_decay 1 + weight 5 sits on it
TRAINING = {"lr": 0.5, "momentum": 0.5, "weight_decay": 1.0}
BOUND_MESSAGE = ("training.lr * (training.weight_decay + baselines.{name}.{key}) = 0.5 * (1 + 5) "
                 "= 3 reaches the local step's stability bound 2 (1 + training.momentum) = 3")


def _config(name: str, section: dict[str, Any]) -> Any:
    return parse_config({"methods": [name], "training": TRAINING,
                         "data": {"num_clients": 2, "train_per_client": 8},
                         "baselines": {name: section}})


class NuParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nu: float = 0.1


@pytest.fixture
def registered() -> Iterator[Any]:
    """Register classes for one test (``registered(name, cls)``), unregistered after it."""
    names: list[str] = []

    def register(name: str, cls: Any) -> None:
        METHODS.register(name, cls)
        names.append(name)

    yield register
    for name in names:
        METHODS.unregister(name)


def test_a_user_method_declaring_a_proximal_weight_is_refused_at_fedproxs_bound(registered):
    """A plug-in whose objective adds ``nu/2 ||theta - anchor||^2`` (declared as
    ``proximal_weights = ("nu",)``) is refused where FedProx is, the message naming its own
    key; just below, both are accepted."""

    class Anchored(FedAvg):
        params = NuParams
        proximal_weights = ("nu",)

    registered("anchored", Anchored)
    for name, key in (("fedprox", "mu"), ("anchored", "nu")):
        with pytest.raises(ConfigError) as err:
            _config(name, {key: 5.0})
        text = str(err.value)
        assert BOUND_MESSAGE.format(name=name, key=key) in text
        assert f"lower training.lr or training.weight_decay or baselines.{name}.{key}" in text
        assert _config(name, {key: 5.0 - 1e-9}).baselines[name][key] == 5.0 - 1e-9
    # the default section (nu 0.1) is checked too: at lr 30 it reaches 2 (1 + 0.5)
    with pytest.raises(ConfigError, match=r"baselines.anchored.nu\) = 30 \* \(0 \+ 0.1\) = 3 "):
        parse_config({"methods": ["anchored"],
                      "training": {"lr": 30.0, "momentum": 0.5, "weight_decay": 0.0}})


def test_a_user_method_declaring_no_proximal_weight_is_not_checked(registered):
    class Unanchored(FedAvg):
        params = NuParams

    registered("unanchored", Unanchored)
    assert method_proximal_terms("unanchored", _config("unanchored", {"nu": 0.0})) == {}
    assert _config("unanchored", {"nu": 1e6}).baselines["unanchored"]["nu"] == 1e6


def test_a_function_declares_several_weights_and_a_subclass_inherits_its_parents(registered):
    """``proximal_weights`` may be a function of the config (config key -> weight, summed
    with the weight decay); a subclass of FedProx registered under its own name is checked on
    its own section's ``mu``."""

    class TwoParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        a: float = 1.0
        b: float = 1.0

    class TwoTerms(FedAvg):
        params = TwoParams

        @classmethod
        def proximal_weights(cls, cfg: Any) -> dict[str, float]:
            section = cfg.baselines.get("twoterms", {})
            return {"baselines.twoterms.a": section.get("a", 1.0),
                    "baselines.twoterms.b": section.get("b", 1.0)}

    class MyProx(FedProx):
        pass

    registered("twoterms", TwoTerms)
    registered("myprox", MyProx)
    with pytest.raises(ConfigError, match=r"training.lr \* \(training.weight_decay \+ "
                       r"baselines.twoterms.a \+ baselines.twoterms.b\) = 0.5 \* \(1 \+ 2 \+ 3\)"):
        _config("twoterms", {"a": 2.0, "b": 3.0})
    assert _config("twoterms", {"a": 2.0, "b": 2.9}).baselines["twoterms"]["b"] == 2.9
    with pytest.raises(ConfigError) as err:
        _config("myprox", {"mu": 5.0})
    assert BOUND_MESSAGE.format(name="myprox", key="mu") in str(err.value)


def test_a_factory_declaring_a_weight_reads_its_own_params(registered):
    """A factory's own ``proximal_weights`` is read with the factory's ``params`` on its own
    section; one naming FedProx as its class is checked on FedProx's section, as FedProx's
    other config checks are."""

    def build(ctx: Any, cfg: Any) -> FedAvg:
        return FedAvg(ctx)

    build.params = NuParams  # type: ignore[attr-defined]
    build.algorithm = FedAvg  # type: ignore[attr-defined]
    build.proximal_weights = ("nu",)  # type: ignore[attr-defined]

    def build_prox(ctx: Any, cfg: Any) -> FedProx:
        return FedProx(ctx)

    build_prox.algorithm = FedProx  # type: ignore[attr-defined]
    registered("nufactory", build)
    registered("proxfactory", build_prox)
    with pytest.raises(ConfigError) as err:
        _config("nufactory", {"nu": 5.0})
    assert BOUND_MESSAGE.format(name="nufactory", key="nu") in str(err.value)
    cfg = parse_config({"methods": ["proxfactory"], "training": TRAINING,
                        "baselines": {"fedprox": {"mu": 1.0}}})
    assert method_proximal_terms("proxfactory", cfg) == {"baselines.fedprox.mu": 1.0}


class StrParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nu: str = "high"


def _proxy(params: Any, declaration: Any) -> type:
    return type("Declared", (FedAvg,), {"params": params, "proximal_weights": declaration})


@pytest.mark.parametrize("params, declaration, problem", [
    (NuParams, ("mu",), r"\('mu',\), but \[baselines.bad\] has no "
                        r"key 'mu' \(its keys: \['nu'\]\)"),
    (StrParams, ("nu",), r"whose weight baselines.bad.nu is 'high', not a finite number >= 0"),
    (NuParams, 5, r"= 5;"),
    (NuParams, ("nu", 3), r"= \('nu', 3\);"),
    (None, ("nu",), r"\('nu',\) but has no hyper-parameters"),
    (NuParams, classmethod(lambda cls, cfg: [("baselines.bad.nu", 1.0)]),
     r"as a function that returned \[\('baselines.bad.nu', 1.0\)\], not a dict"),
    (NuParams, classmethod(lambda cls, cfg: {"baselines.bad.nu": -1.0}),
     r"whose weight baselines.bad.nu is -1.0, not a finite number >= 0"),
    (NuParams, classmethod(lambda cls, cfg: {"baselines.bad.nu": True}),
     r"whose weight baselines.bad.nu is True, not a finite number >= 0"),
])
def test_a_malformed_declaration_is_a_config_error_naming_the_method(registered, params,
                                                                    declaration, problem):
    registered("bad", _proxy(params, declaration))
    with pytest.raises(ConfigError, match=f"method 'bad' declares proximal_weights {problem}") as err:
        parse_config({"methods": ["bad"]})
    assert "declare a tuple of keys of its [baselines.<name>] section" in str(err.value)


def test_a_declaration_function_that_raises_is_a_config_error_naming_the_method(registered):
    """A ``proximal_weights(cfg)`` that raised (say, a KeyError reading a section it expects)
    was a bare traceback out of the config's validation; now the config error names the
    method, the hook and where it raised."""
    def weights(cls, cfg):  # type: ignore[no-untyped-def]
        return {"baselines.bad.nu": cfg.baselines["bad"]["nu"]}

    registered("bad", _proxy(NuParams, classmethod(weights)))
    with pytest.raises(ConfigError, match=r"method 'bad': its proximal_weights\(cfg\) raised "
                                          r"KeyError: 'bad' \(at .*test_proximal_declaration.py:"
                                          r"\d+ in weights\)"):
        parse_config({"methods": ["bad"]})


def test_the_builtins_declare_their_weights_on_their_classes():
    """PROXIMAL_WEIGHTS, still importable, is read from the classes."""
    assert PROXIMAL_WEIGHTS == {"fedprox": "mu", "ditto": "lam", "fedamp": "lam"}
    for name, key in PROXIMAL_WEIGHTS.items():
        assert METHODS.get(name).proximal_weights == (key,)
    for name in ("local", "fedavg", "fedora", "apfl", "ifca"):
        assert METHODS.get(name).proximal_weights == ()
