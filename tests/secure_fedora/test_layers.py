"""The folder of a module tells what it may import: layers point one way.

``experiments -> runtimes -> secure -> algorithms -> learning -> data -> core``: a module under
``secure_fedora/<layer>/`` imports (at module level or inside a function) only its own layer,
the layers below it and ``privacy``; the top-level modules (``api``, ``cli``) may import all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import secure_fedora

LAYERS = ["core", "data", "learning", "algorithms", "secure", "runtimes", "experiments"]
PACKAGE = Path(secure_fedora.__file__).parent

# No exceptions: where a lower layer needs something a higher one implements, the lower layer
# defines the interface and the higher layer's implementation is passed in (e.g. the
# encryption backend a runtime puts into the MethodContext: docs/design.md, "Layout").


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "secure_fedora":
                out += [(node.lineno, f"secure_fedora.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m.split(".")[0] in ("secure_fedora", "audits")]


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """Every import of a higher layer (or of ``audits``) by a module of a lower one."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        if len(parts) < 2 or parts[0] not in rank:
            continue
        own = rank[parts[0]]
        for line, module in _imported_modules(ast.parse(path.read_text())):
            segments = module.split(".")
            if segments[0] == "audits":
                found.append(f"{path.relative_to(package)}:{line} imports {module} (audits is above secure_fedora)")
                continue
            target = segments[1] if len(segments) > 1 else ""
            if target == "__version__":
                continue
            if target not in rank:
                found.append(f"{path.relative_to(package)}:{line} imports {module} (not in a layer)")
            elif rank[target] > own:
                found.append(f"{path.relative_to(package)}:{line} imports {module} "
                             f"({parts[0]} is below {target})")
    return found


def test_every_import_points_down_the_layers() -> None:
    assert layer_violations() == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    tree = ast.parse("def f():\n    from secure_fedora.runtimes.inprocess import Simulation\n")
    assert _imported_modules(tree) == [(2, "secure_fedora.runtimes.inprocess")]


def test_the_check_reports_an_upward_import_in_a_package_tree(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "algorithms").mkdir()
    (tmp_path / "core" / "config.py").write_text(
        "def check():\n    from secure_fedora.algorithms.baselines import BASELINE_NAMES\n")
    (tmp_path / "algorithms" / "methods.py").write_text("from secure_fedora.core import registry\n")
    assert layer_violations(tmp_path) == [
        "core/config.py:2 imports secure_fedora.algorithms.baselines (core is below algorithms)"]


def test_every_module_lives_in_a_layer_or_is_a_front_door() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "api.py", "cli.py"]
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert folders == sorted([*LAYERS, "contrib"])


def test_names_moved_down_a_layer_stay_importable_from_their_old_homes() -> None:
    from secure_fedora.algorithms import messages
    from secure_fedora.learning import dp
    from secure_fedora.secure import private, transport

    assert private.DPGradient is dp.DPGradient
    assert private.check_per_sample_gradients is dp.check_per_sample_gradients
    assert transport.ValueCheck is messages.ValueCheck
    for name in messages.__all__:
        assert getattr(transport, name) is getattr(messages, name)
