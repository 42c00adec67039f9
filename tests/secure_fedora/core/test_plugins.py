"""``"module:function"`` specs, imported from the config's folder, then ``sys.path``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from secure_fedora.core.plugins import PluginError, import_object

MODULE = "sf_twin_plugin_module"


def _folder(root: Path, name: str, width: int) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(f"def width():\n    return {width}\n")
    return folder


def test_a_module_of_the_same_name_in_another_config_folder_is_refused_not_reused(
        tmp_path: Path) -> None:
    """Two configs in two folders, each with its own net.py, run in one process (a notebook):
    the second imported the first folder's module from sys.modules and built its model,
    silently."""
    first, second = _folder(tmp_path, "a", 4), _folder(tmp_path, "b", 32)
    try:
        assert import_object(f"{MODULE}:width", "model.factory", first)() == 4
        assert import_object(f"{MODULE}:width", "model.factory", first)() == 4  # same file
        with pytest.raises(PluginError, match=(
                rf"model.factory = '{MODULE}:width': module '{MODULE}' is already imported in "
                rf"this process from {first / (MODULE + '.py')}, not from the config's folder "
                rf"{second}, which holds another one: give the modules different names, or "
                rf"run each config in its own process$")):
            import_object(f"{MODULE}:width", "model.factory", second)
    finally:
        sys.modules.pop(MODULE, None)


def test_a_package_of_that_name_is_refused_too_and_a_data_folder_is_not_a_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check for a package (``net/__init__.py``); a folder of that name without
    ``__init__.py`` (data, say) loses to the module on sys.path, so it is no conflict."""
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    first = _folder(tmp_path, "a", 4)
    package = tmp_path / "b" / MODULE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def width():\n    return 32\n")
    data_only = tmp_path / "c" / MODULE
    data_only.mkdir(parents=True)
    try:
        assert import_object(f"{MODULE}:width", "model.factory", first)() == 4
        with pytest.raises(PluginError, match="holds another one"):
            import_object(f"{MODULE}:width", "model.factory", tmp_path / "b")
        assert import_object(f"{MODULE}:width", "model.factory", tmp_path / "c")() == 4
    finally:
        sys.modules.pop(MODULE, None)


def test_a_module_edited_since_its_import_is_refused_not_run_as_it_was(tmp_path: Path) -> None:
    """A notebook edits the config folder's net.py and loads the config again: the process
    ran the module it had imported, the code as it was, silently. A file touched but not
    changed is no edit; once forgotten (``del sys.modules[...]``) the edited file runs."""
    folder = _folder(tmp_path, "a", 4)
    source = folder / f"{MODULE}.py"
    try:
        assert import_object(f"{MODULE}:width", "model.factory", folder)() == 4
        source.touch()
        assert import_object(f"{MODULE}:width", "model.factory", folder)() == 4
        source.write_text("def width():\n    return 8\n")
        with pytest.raises(PluginError, match=(
                rf"model.factory = '{MODULE}:width': {source} changed since this process "
                rf"imported module '{MODULE}', which still runs the code read then: restart the "
                rf"process \(a notebook's kernel\), or forget it with "
                rf"del sys.modules\['{MODULE}'\] first$")):
            import_object(f"{MODULE}:width", "model.factory", folder)
        del sys.modules[MODULE]
        assert import_object(f"{MODULE}:width", "model.factory", folder)() == 8
        assert import_object(f"{MODULE}:width", "model.factory", folder)() == 8
    finally:
        sys.modules.pop(MODULE, None)


def test_a_module_the_plug_in_imports_from_the_config_folder_is_checked_too(
        tmp_path: Path) -> None:
    """A notebook runs a config whose net.py imports layers.py beside it, edits layers.py
    and runs again: net.py unchanged, the process ran layers.py as first imported, silently.
    Refused now, naming both modules to forget; once forgotten the edited file runs."""
    folder = tmp_path / "a"
    folder.mkdir()
    layers, net = f"{MODULE}_layers", f"{MODULE}_net"
    (folder / f"{layers}.py").write_text("WIDTH = 4\n")
    (folder / f"{net}.py").write_text(f"from {layers} import WIDTH\n\n\n"
                                      "def width():\n    return WIDTH\n")
    source = folder / f"{layers}.py"
    try:
        assert import_object(f"{net}:width", "model.factory", folder)() == 4
        source.touch()
        assert import_object(f"{net}:width", "model.factory", folder)() == 4
        source.write_text("WIDTH = 8\n")
        with pytest.raises(PluginError, match=(
                rf"model.factory = '{net}:width': {source} \(imported by module '{net}'\) "
                rf"changed since this process imported module '{layers}', which still runs the "
                rf"code read then: restart the process \(a notebook's kernel\), or forget it "
                rf"with del sys.modules\['{layers}'\] and del sys.modules\['{net}'\] first$")):
            import_object(f"{net}:width", "model.factory", folder)
        del sys.modules[layers], sys.modules[net]
        assert import_object(f"{net}:width", "model.factory", folder)() == 8
        assert import_object(f"{net}:width", "model.factory", folder)() == 8
    finally:
        sys.modules.pop(layers, None)
        sys.modules.pop(net, None)


def test_a_companion_module_forgotten_alone_is_refused_not_run_as_first_imported(
        tmp_path: Path) -> None:
    """layers.py beside net.py edited, then only ``del sys.modules["layers"]``: net.py,
    unchanged and still imported, kept the layers code it bound first and ran it, silently.
    Refused, naming the plug-in to forget too; once it is, the edited file runs."""
    folder = tmp_path / "a"
    folder.mkdir()
    layers, net = f"{MODULE}_layers2", f"{MODULE}_net2"
    (folder / f"{layers}.py").write_text("WIDTH = 4\n")
    (folder / f"{net}.py").write_text(f"from {layers} import WIDTH\n\n\n"
                                      "def width():\n    return WIDTH\n")
    try:
        assert import_object(f"{net}:width", "model.factory", folder)() == 4
        (folder / f"{layers}.py").write_text("WIDTH = 8\n")
        del sys.modules[layers]
        with pytest.raises(PluginError, match=(
                rf"model.factory = '{net}:width': module '{net}' still runs module '{layers}' "
                rf"\({folder / (layers + '.py')}\) as this process first imported it, since "
                rf"forgotten or imported anew: .* del sys.modules\['{net}'\] first$")):
            import_object(f"{net}:width", "model.factory", folder)
        sys.path.insert(0, str(folder))  # a notebook's folder: reload finds the module
        try:
            importlib.reload(sys.modules[net])  # binds the layers imported anew: runs the edit
        finally:
            sys.path.remove(str(folder))
        assert import_object(f"{net}:width", "model.factory", folder)() == 8
        (folder / f"{layers}.py").write_text("WIDTH = 12\n")
        del sys.modules[layers]
        with pytest.raises(PluginError, match=rf"module '{net}' still runs module '{layers}'"):
            import_object(f"{net}:width", "model.factory", folder)
        del sys.modules[net]
        assert import_object(f"{net}:width", "model.factory", folder)() == 12
        assert import_object(f"{net}:width", "model.factory", folder)() == 12
        # net imported anew while layers stayed imported: it binds that layers, still checked
        del sys.modules[net]
        assert import_object(f"{net}:width", "model.factory", folder)() == 12
        (folder / f"{layers}.py").write_text("WIDTH = 16\n")
        with pytest.raises(PluginError, match=rf"changed since this process imported module "
                                              rf"'{layers}'"):
            import_object(f"{net}:width", "model.factory", folder)
    finally:
        sys.modules.pop(layers, None)
        sys.modules.pop(net, None)


def test_a_module_only_another_configs_folder_holds_is_refused_not_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Config A's folder holds net.py, config B's none: in one process B built A's model from
    sys.modules, silently, where a fresh process would not find the module at all. Refused;
    with A's folder on sys.path a fresh process finds it too, so it is reused."""
    first = _folder(tmp_path, "a", 4)
    bare = tmp_path / "b"
    bare.mkdir()
    try:
        assert import_object(f"{MODULE}:width", "model.factory", first)() == 4
        with pytest.raises(PluginError, match=(
                rf"model.factory = '{MODULE}:width': module '{MODULE}' is imported in this "
                rf"process only from another config's folder \({first / (MODULE + '.py')}\); "
                rf"the config's folder {bare} holds no such module, so a fresh process would "
                rf"not find it: put the module beside this config, add its folder to "
                rf"PYTHONPATH, or run each config in its own process$")):
            import_object(f"{MODULE}:width", "model.factory", bare)
        assert import_object(f"{MODULE}:width", "model.factory", first)() == 4
        monkeypatch.syspath_prepend(str(first))
        assert import_object(f"{MODULE}:width", "model.factory", bare)() == 4
    finally:
        sys.modules.pop(MODULE, None)


def test_a_config_module_named_like_a_built_in_module_is_refused_naming_it(
        tmp_path: Path) -> None:
    """A config folder's ``sys.py``: the process's own ``sys`` has no file, and the refusal said
    "imported in this process from None"."""
    (tmp_path / "sys.py").write_text("def width():\n    return 4\n")
    with pytest.raises(PluginError, match=(
            r"module 'sys' is already imported in this process from no file \(built in, or a "
            r"namespace package\), not from the config's folder")):
        import_object("sys:width", "model.factory", tmp_path)


def test_raised_at_skips_frames_of_packages_installed_in_the_user_site(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch installed with ``pip install --user`` (or a distribution's dist-packages) lies
    outside sysconfig's scheme: an error torch raised was located in torch's own file, not
    in the user's line that called it."""
    import site

    from secure_fedora.core.plugins import raised_at

    user_site = tmp_path / "user-site"
    (user_site / "somelib").mkdir(parents=True)
    lib = user_site / "somelib" / "ops.py"
    lib.write_text("def linear(x):\n    raise ValueError(f'bad shape {x}')\n")
    namespace: dict = {}
    exec(compile(lib.read_text(), str(lib), "exec"), namespace)  # noqa: S102 - the test's own file
    monkeypatch.setattr(site, "ENABLE_USER_SITE", True)
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(user_site))

    def forward() -> None:
        namespace["linear"](3)

    with pytest.raises(ValueError) as err:
        forward()
    assert raised_at(err.value) == (f" (at {__file__}:{forward.__code__.co_firstlineno + 1} "
                                    "in forward)")


def test_raised_at_names_a_method_of_the_contrib_folder() -> None:
    """A user's new method goes into secure_fedora/contrib/ (the only plug-ins the Flower
    apps import), which lay among the toolkit's folders: its client code raising was named
    at the caller's line, or nowhere, not where it raised."""
    import secure_fedora.contrib
    from secure_fedora.core.plugins import raised_at

    file = Path(secure_fedora.contrib.__file__).resolve().parent / "sf_not_a_file_method.py"
    namespace: dict = {}
    exec(compile("def client_update(i):\n    raise ValueError(i)\n", str(file), "exec"),  # noqa: S102
         namespace)
    with pytest.raises(ValueError) as err:
        namespace["client_update"](3)
    assert raised_at(err.value) == f" (at {file}:2 in client_update)"


def test_no_message_quotes_a_name_with_a_possessive() -> None:
    """Messages read "mechanism 'label_hist''s record_params raised ...": a quoted name (a
    repr) followed by 's. They say "mechanism 'label_hist': its ..." now; none is left in the
    toolkit's packages."""
    import re

    root = Path(__file__).resolve().parents[3]
    found = [f"{path.relative_to(root)}:{n}"
             for package in ("secure_fedora", "privacy", "audits")
             for path in sorted((root / package).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"![rs]\}'s\b|'\{\w+\}'s\b", line)]
    assert found == []
