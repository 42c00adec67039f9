"""Registries: names validate against them, lookups list what is available, and a new
method is one module that registers itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from secure_fedora.api import Experiment
from secure_fedora.core import registry
from secure_fedora.core.config import ConfigError, parse_config
from secure_fedora.core.registry import (
    DATASETS,
    METHODS,
    MODELS,
    PARTITIONERS,
    Registry,
    RegistryError,
)
from secure_fedora.runtimes.inprocess import make_method


def test_builtin_names_are_registered() -> None:
    assert {"fedora", "local", "fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca"} <= set(METHODS)
    assert {"mnist", "fashion_mnist"} <= set(DATASETS.names())
    assert {"iid", "rotation", "dirichlet", "pathological"} <= set(PARTITIONERS.names())
    assert {"mlp", "cnn"} <= set(MODELS.names())


@pytest.mark.parametrize(("section", "message"), [
    ({"methods": ["fedora", "fedsgd"]}, "methods.1: .*unknown method 'fedsgd'; available: apfl, ditto"),
    ({"data": {"dataset": "cifar"}}, "data.dataset: .*unknown dataset 'cifar'; available: fashion_mnist, mnist"),
    ({"data": {"partition": "shards"}}, "unknown partition 'shards'; available: dirichlet, iid, pathological, rotation"),
    ({"model": {"name": "resnet"}}, "unknown model 'resnet'; available: cnn, mlp"),
])
def test_unknown_names_list_what_is_available(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(section)


def test_registry_refuses_duplicates_and_bad_names() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(RegistryError, match="thing 'a' is already registered"):
        reg.register("a", 2)
    for bad in ("pkg.mod:f", "../../escaped", "..", ".hidden", "a/b", "fedora ", "tab\tname",
                "x" * 65, "", 7):
        with pytest.raises(RegistryError, match="names must be 1-64 characters"):
            reg.register(bad, 3)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="differs from the registered 'a' only in letter case"):
        reg.register("A", 4)
    reg.register("fedavg.v2+dp-1_x", 5)
    with pytest.raises(RegistryError, match="unknown thing 'b'; available: a"):
        reg.get("b")
    # a researcher's method named in a config the CLI runs is told where a plug-in goes
    with pytest.raises(RegistryError, match=r"available: a, fedavg.v2\+dp-1_x \(a plug-in .* put its module in "
                                            r"secure_fedora/contrib/, .* or register it from "
                                            "Python before loading the config"):
        reg.get("b")


def test_a_builtin_name_is_taken_before_the_first_lookup() -> None:
    script = textwrap.dedent('''
        from secure_fedora.core.registry import METHODS, RegistryError
        for name in ("fedora", "FEDORA"):
            try:
                METHODS.register(name, object())
            except RegistryError as err:
                print("refused", name, err)
        print(METHODS.get("fedora").__name__, len(METHODS.names()) >= 8)
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert "refused fedora method 'fedora' is built in: it cannot be replaced" in out
    assert "refused FEDORA method 'FEDORA' differs from the registered 'fedora'" in out
    assert out.strip().endswith("Fedora True")


NEW_METHOD = textwrap.dedent('''
    from pydantic import BaseModel, ConfigDict, Field

    from secure_fedora.algorithms.methods import FedAvg
    from secure_fedora.core.registry import METHODS

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        finetune_epochs: int = Field(0, ge=0)

    @METHODS.register("{name}")
    def build(ctx, cfg):
        params = Params.model_validate(cfg.baselines.get("{name}", {{}}))
        return FedAvg(ctx, finetune_epochs=params.finetune_epochs)

    build.params = Params  # validates [baselines.{name}] when the config is read
''')


def _small_config(method: str) -> dict:
    return {"methods": [method], "data": {"partition": "iid", "num_clients": 2,
            "train_per_client": 20, "val_per_client": 10, "test_per_client": 10},
            "training": {"rounds": 1, "local_epochs": 1, "batch_size": 10}}


def _contrib_method_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           source: str = NEW_METHOD) -> tuple[str, str]:
    """A fresh contrib package (its name, first) under ``tmp_path`` whose one module
    (``source``, its ``{name}`` filled in) registers a new method (its name, second) when the
    registry discovers it."""
    package = f"contrib_{uuid.uuid4().hex[:8]}"
    name = f"avg_{uuid.uuid4().hex[:6]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "my_method.py").write_text(source.format(name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "CONTRIB_PACKAGE", package)
    monkeypatch.setattr(registry, "_contrib_loaded", False)
    return package, name


def test_a_new_method_is_one_module_in_the_contrib_package(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    package, name = _contrib_method_module(tmp_path, monkeypatch)
    try:
        assert name in METHODS  # discovered on lookup, no other file edited
        cfg = parse_config(_small_config(name))
        exp = Experiment(cfg, data=_tiny_data())
        method = make_method(name, exp.context_factory(cfg, exp.clients), cfg)
        assert type(method).__name__ == "FedAvg" and method.finetune_epochs == 0
        assert exp.run().selected(name)["round"] == 1
        tuned = parse_config({**_small_config(name), "baselines": {name: {"finetune_epochs": 2}}})
        assert make_method(name, exp.context_factory(tuned, exp.clients), tuned).finetune_epochs == 2
        with pytest.raises(ConfigError, match=f"baselines.{name}: finetune_epochs: .*greater than or equal"):
            parse_config({**_small_config(name), "baselines": {name: {"finetune_epochs": -1}}})
        with pytest.raises(ConfigError, match=f"baselines.{name}: lr: unknown key"):
            parse_config({**_small_config(name), "baselines": {name: {"lr": 1}}})
    finally:
        METHODS.unregister(name)
        for mod in [m for m in sys.modules if m.startswith(package)]:
            sys.modules.pop(mod)


def test_unregistered_method_name_fails_at_lookup() -> None:
    with pytest.raises(RegistryError, match="unknown method 'nope'"):
        make_method("nope", None, None)  # type: ignore[arg-type]


def _tiny_data() -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=gen)
    y = (x[:, 0] > 0).long()
    return {"x_train": x[:60], "y_train": y[:60], "x_test": x[60:], "y_test": y[60:]}


def test_sweep_validates_cells_with_registered_method_names() -> None:
    from secure_fedora.experiments.sweep import _literal_methods

    assert set(_literal_methods()) == set(METHODS.names())


def test_a_contrib_module_importing_the_config_module_loads_in_a_fresh_process(
        tmp_path: Path) -> None:
    """The CLI's first import is the config module. A contrib module importing it (as one
    importing a built-in method does, through the method's module) is not imported while that
    module is half-made, so `secure-fedora run` of a config naming its method works as a
    notebook that imported the package first does."""
    package = f"contrib_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "my_method.py").write_text(textwrap.dedent("""
        from secure_fedora.core.config import ExperimentConfig
        from secure_fedora.core.registry import METHODS

        def build(ctx, cfg: ExperimentConfig):
            raise AssertionError("not built: the config is only read")

        METHODS.register("avg_m", build)
    """))
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from secure_fedora.core import registry
        registry.CONTRIB_PACKAGE = {package!r}
        from secure_fedora.core.config import parse_config
        print(parse_config({_small_config("avg_m")!r}).methods)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['avg_m']"


def test_a_config_error_is_found_without_importing_torch() -> None:
    """Checking names against the registries imports none of the built-in modules (they
    import torch, about 2 s): a malformed config naming built-ins fails fast."""
    code = textwrap.dedent("""
        import sys
        from secure_fedora.core.config import ConfigError, parse_config
        try:
            parse_config({"methods": ["fedora", "fedprox"], "data": {"dataset": "mnist",
                          "partition": "iid", "bogus": 1}, "model": {"name": "cnn"},
                          "training": {"loss": "bce", "rounds": 0}})
        except ConfigError as err:
            print(err)
        dp = {"methods": ["fedora", "ifca", "local"], "privacy": {"enabled": True}}
        for bad in ({**dp, "data": {"num_clients": 4}, "fedora": {"k": 4}}, dp,
                    {**dp, "fedora": {"relatedness": "noised"}},
                    {"methods": ["fedprox"], "baselines": {"fedprox": {"mu": -1}}},
                    {"baselines": {"fedora": {"x": 1}}}):
            try:
                parse_config(bad)
            except ConfigError as err:
                print(str(err).splitlines()[-1])
        print("torch" in sys.modules, "secure_fedora.algorithms.methods" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[1:3] == ["  data.bogus: unknown key", "  training.rounds: Input should be greater than 0"]
    assert "fedora.k = 4 must be smaller than data.num_clients = 4" in lines[3]
    assert "fedora.relatedness 'plain' releases summary information" in lines[4]
    assert "baselines.ifca.selection_split='train' picks clusters by training loss" in lines[5]
    assert "  baselines.fedprox.mu: Input should be greater than or equal to 0" == lines[6]
    assert "baselines.fedora: unknown baseline 'fedora'; expected one of ['fedprox', 'ditto', " \
           "'apfl', 'fedamp', 'ifca']" in lines[7]
    assert lines[8:] == ["False False"]


def test_the_builtin_methods_declare_their_config_hooks_without_importing_them() -> None:
    """The config asks a built-in method's hooks from its declarations: each is the very
    function the registered class has."""
    from secure_fedora.algorithms.config_checks import BUILTIN_DECLARATIONS

    assert set(BUILTIN_DECLARATIONS) == METHODS._builtins
    for name, declaration in BUILTIN_DECLARATIONS.items():
        cls = METHODS.get(name)
        assert cls.name == name and getattr(declaration, "name", name) == name  # hooks read it
        for attribute in ("check_config", "check_hyperparameters", "params", "takes_validation",
                          "cuda_supported", "uses_relatedness", "proximal_weights",
                          "derived_row_names", "unreleased_client_state"):
            ours, theirs = registry.declared(declaration, attribute), registry.declared(cls, attribute)
            assert getattr(ours, "__func__", ours) is getattr(theirs, "__func__", theirs)


def test_the_listed_builtin_names_are_what_the_builtin_modules_register() -> None:
    for reg in (DATASETS, PARTITIONERS, MODELS, registry.LOSSES, METHODS):
        reg._load_builtins()
        registered = {n for n, e in reg._entries.items() if getattr(e, "__module__", None) in reg._modules}
        assert reg._loaded and registered == reg._builtins


def test_a_builtin_name_listed_but_not_registered_is_an_error() -> None:
    reg: Registry[int] = Registry("thing", ("secure_fedora.core.tensors",), ("ghost",))
    assert "ghost" in reg and reg.check("ghost") == "ghost"  # answered from the list
    with pytest.raises(RegistryError, match=r"built-in thing \['ghost'\] declared but not registered"):
        reg.get("ghost")


def test_an_entry_records_the_module_that_registered_it(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What another process (a Flower app) knows depends on the registering module: the
    built-in modules' and contrib's entries, not a script's."""
    assert METHODS.origin("fedavg") == "secure_fedora.algorithms.methods"
    assert DATASETS.origin("mnist") == "secure_fedora.data.partition"
    assert METHODS.known_everywhere("fedavg") and DATASETS.known_everywhere("mnist")
    DATASETS.register("origin-x", lambda seed: None)
    try:
        assert DATASETS.origin("origin-x") == __name__
        assert not DATASETS.known_everywhere("origin-x")
    finally:
        DATASETS.unregister("origin-x")
    with pytest.raises(RegistryError, match="unknown dataset 'origin-x'"):
        DATASETS.origin("origin-x")
    package, name = _contrib_method_module(tmp_path, monkeypatch)
    try:
        assert METHODS.origin(name) == f"{package}.my_method" and METHODS.known_everywhere(name)
    finally:
        METHODS.unregister(name)
        for mod in [m for m in sys.modules if m.startswith(package)]:
            sys.modules.pop(mod)


def test_an_entry_a_contrib_module_imports_from_elsewhere_is_known_everywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A contrib module that only imports a user's package (outside contrib) which registers
    a method: every process that loads contrib registers it too, so the Flower apps know it
    (the same package imported outside contrib loading stays this process's only)."""
    pkg = f"userpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    package, name = _contrib_method_module(tmp_path, monkeypatch)
    (tmp_path / pkg / "method.py").write_text(NEW_METHOD.format(name=name))
    (tmp_path / package / "my_method.py").write_text(f"import {pkg}.method  # noqa: F401\n")
    try:
        assert METHODS.origin(name) == f"{pkg}.method"
        assert METHODS.known_everywhere(name)
        METHODS.unregister(name)
        assert name not in METHODS
        METHODS.register(name, object())  # this process only, as a script's registration
        assert not METHODS.known_everywhere(name)
    finally:
        METHODS.unregister(name)
        for mod in [m for m in sys.modules if m.startswith((package, pkg))]:
            sys.modules.pop(mod)


def test_accepting_unregistered_accepts_names_only_and_records_them() -> None:
    """How the audits read a run's config.toml naming an entry the run's own process
    registered: inside the block a well-formed unknown name passes the check, declares nothing
    and is recorded once; it is still refused by ``get`` (nothing is built from it), a
    malformed name is still refused, and outside the block the check refuses it as before."""
    from secure_fedora.core.registry import DATASETS, METHODS, RegistryError, accepting_unregistered

    with accepting_unregistered() as accepted:
        assert METHODS.check("byo_avg_a") == "byo_avg_a" == METHODS.check("byo_avg_a")
        assert METHODS.declared("byo_avg_a", "check_config") is None
        assert METHODS.check("fedavg") == "fedavg" and DATASETS.check("mnist") == "mnist"
        with pytest.raises(RegistryError, match="unknown method 'byo_avg_a'"):
            METHODS.get("byo_avg_a")
        with pytest.raises(RegistryError, match="unknown dataset '../x'"):
            DATASETS.check("../x")
        assert DATASETS.check("byo-data-a") == "byo-data-a"
    assert accepted == [("method", "byo_avg_a"), ("dataset", "byo-data-a")]
    with pytest.raises(RegistryError, match="unknown method 'byo_avg_a'"):
        METHODS.check("byo_avg_a")


def test_registering_a_name_again_says_how_to_replace_it_and_built_ins_stay() -> None:
    """A notebook cell run again registers its plug-in's name a second time: the error says
    how to replace it; a built-in entry can be neither replaced nor removed (its name would
    then label another implementation's results)."""
    reg: Registry[int] = Registry("thing", (), ("core",))
    reg._entries["core"] = 0  # as its module would register it
    reg._loaded = True
    reg.register("mine", 1)
    with pytest.raises(RegistryError, match=r"thing 'mine' is already registered; to replace it "
                                            r"\(e\.g\. a notebook cell run again\), call "
                                            r"unregister\('mine'\) on its registry first"):
        reg.register("mine", 2)
    reg.unregister("mine")
    assert reg.register("mine", 2) == 2 and reg.get("mine") == 2
    with pytest.raises(RegistryError, match="thing 'core' is built in: it cannot be replaced; "
                                            "register yours under another name"):
        reg.register("core", 3)
    with pytest.raises(RegistryError, match="thing 'core' is built in: it cannot be removed"):
        reg.unregister("core")
    assert reg.get("core") == 0
    reg.unregister("never-registered")  # nothing to remove: no error (a test's cleanup)
