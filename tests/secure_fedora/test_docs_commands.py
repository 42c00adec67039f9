"""The command lines README.md and docs/ show name sub-commands and flags that exist, and
every `--help` states the default of each option that has one; the config keys, Python names,
paths and links they show exist; README's multi-host recipe's file-writing steps run as
written (the main job, the suite and the Flower processes are run elsewhere: too long here)."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure_fedora.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/design.md", "docs/performance.md")
TOP_COMMANDS = ("run", "audit", "keys", "deploy", "sweep")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _code_spans(text: str) -> Iterator[tuple[int, str]]:
    """(line, command text) of every inline code span and every line of a fenced block (a
    shell continuation, `\\` at the end of a line, joins the next line)."""
    for block in re.finditer(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        first = text.count("\n", 0, block.start()) + 2
        for offset, line in enumerate(block.group(1).replace("\\\n", " \n").split("\n")):
            yield first + offset, line
    inline = re.sub(r"```[a-z]*\n.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for span in re.finditer(r"`([^`]+)`", inline):
        yield inline.count("\n", 0, span.start()) + 1, span.group(1).replace("\n", " ")


def _documented_commands(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line, words after `secure-fedora`) of each command a doc shows, also the short forms
    README uses in lists (`run CONFIG --out DIR`, `audit replay RUN`)."""
    for line, span in _code_spans(text):
        for part in re.split(r"&&|;|\|\|", span):
            found = re.search(r"(?:secure-fedora|secure_fedora\.cli)\s+(.*)", part) or re.match(
                rf"\s*((?:{'|'.join(TOP_COMMANDS)})\s.*)", part
            )
            if found:
                yield line, found.group(1).split()


def _check_command(root: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """What a documented command names that the parser lacks (a sub-command, a flag); for
    alternatives (`deploy certs|local`) a flag of either is accepted."""
    parsers, path = [root], []
    while words and len(parsers) == 1 and _subparsers(parsers[0]):
        names = words[0].split("|")
        if not all(n in _subparsers(parsers[0]) for n in names):
            break
        words = words[1:]
        path.append("|".join(names))
        parsers = [_subparsers(parsers[0])[n] for n in names]
    problems = []
    if (
        len(parsers) == 1
        and _subparsers(parsers[0])
        and words
        and re.fullmatch(r"[a-z][a-z-]*", words[0])
    ):
        problems.append(f"`{' '.join(path)}` has no sub-command {words[0]!r}")
    known = set().union(*(_options(p) for p in parsers)) | {"--debug"}
    for word in words:
        flag = re.match(r"--[a-z0-9][a-z0-9-]*", word)
        if flag and flag.group(0) not in known:
            problems.append(f"`secure-fedora {' '.join(path)}` has no option {flag.group(0)}")
    return problems


def test_documented_secure_fedora_commands_exist_with_their_flags():
    """Every `secure-fedora ...` line of README.md and docs/ names a sub-command that exists
    and only flags of that sub-command (not another's: `audit replay --json` would fail)."""
    root = build_parser()
    checked, problems = 0, []
    for name in DOCS:
        for line, words in _documented_commands((ROOT / name).read_text()):
            checked += 1
            problems += [f"{name}:{line}: {p}" for p in _check_command(root, words)]
    assert checked >= 100, f"only {checked} commands found: the extraction broke"
    assert not problems, "\n".join(problems)


def test_documented_benchmark_commands_exist_with_their_flags():
    """Every `python benchmarks/NAME.py --flag ...` of README.md and docs/design.md names a
    script that exists and flags it defines."""
    checked, problems = 0, []
    for name in DOCS[:2]:
        for line, span in _code_spans((ROOT / name).read_text()):
            for part in re.split(r"&&|;", span):
                found = re.search(r"benchmarks/([a-z_]+)\.py((?:\s+\S+)*)", part)
                if not found:
                    continue
                checked += 1
                script = ROOT / "benchmarks" / f"{found.group(1)}.py"
                if not script.is_file():
                    problems.append(f"{name}:{line}: no {script.relative_to(ROOT)}")
                    continue
                defined = set(
                    re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text())
                )
                problems += [
                    f"{name}:{line}: {script.name} has no option {flag}"
                    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", found.group(2))
                    if flag not in defined
                ]
    assert checked >= 15, f"only {checked} benchmark commands found: the extraction broke"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "words, problem",
    [
        (["audit", "replay", "RUN", "--canaries", "F"], "has no option --canaries"),
        (["keys", "inti", "DIR"], "has no sub-command 'inti'"),
        (["deploy", "certs|local", "--print-commands", "--days", "9"], None),
        (["deploy", "certs|local", "--trials", "9"], "has no option --trials"),
    ],
)
def test_the_command_check_catches_a_wrong_flag_or_sub_command(words, problem):
    """The check above is not vacuous: a flag of another sub-command, or a misspelt
    sub-command, is reported."""
    found = _check_command(build_parser(), words)
    if problem is None:
        assert not found
    else:
        assert any(problem in p for p in found), found


def _options_with_help(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options_with_help(sub, (*path, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def _shown(default: object) -> set[str]:
    """The ways a help text may write ``default`` (600.0 as 600, [None] as none)."""
    if isinstance(default, list) and len(default) == 1:
        return _shown(default[0])
    shown = {str(default), str(default).lower()}
    if isinstance(default, float):
        shown.add(format(default, "g"))
    return shown


def test_every_option_has_help_and_states_its_default():
    """Every option of every sub-command has a help text, and one with a default value (not
    None, False or an empty list) states it: `default` and the value itself, as argparse
    prints it (``--rel-tol``, ``--days``, ``--confidence`` ... said nothing)."""
    missing = []
    for command, action in _options_with_help(build_parser()):
        text = (action.help or "") % dict(vars(action), prog="secure-fedora")
        flag = action.option_strings[-1]
        if not text.strip():
            missing.append(f"{command} {flag}: no help")
        elif action.default not in (None, False, [], argparse.SUPPRESS) and (
            "default" not in text or not any(v in text for v in _shown(action.default))
        ):
            missing.append(f"{command} {flag}: default {action.default!r} not stated")
    assert not missing, "\n".join(missing)


_SECTIONS = ("data", "model", "training", "evaluation", "fedora", "fedavg", "privacy", "security")
# Names shaped like `section.key` that the docs use for something else, each said there.
_NOT_CONFIG_KEYS = {
    "fedora.attach_new_client",  # the function of secure_fedora/algorithms/fedora.py
    "security.rejections",  # a results.json entry
    "privacy.noise_seed",  # documented as removed (the config refuses it)
}


def _config_fields() -> dict[str, set[str]]:
    from secure_fedora.core.config import ExperimentConfig

    return {
        name: set(ExperimentConfig.model_fields[name].annotation.model_fields) for name in _SECTIONS
    }


def _documented_config_keys(text: str) -> Iterator[tuple[int, str, str]]:
    """(line, section, key) of each `section.key` and `[section] key` a code span shows; not
    a file name (`fedora.py`, `model.json`) nor a longer dotted name's tail."""
    for line, span in _code_spans(text):
        for found in re.finditer(
            rf"(?<![\w./<\[-])({'|'.join(_SECTIONS)})\.([a-z_]+)(?![\w(])", span
        ):
            if found.group(2) not in ("py", "json", "toml"):
                yield line, found.group(1), found.group(2)
        for found in re.finditer(rf"\[({'|'.join(_SECTIONS)})\]\s+([a-z_]+)", span):
            yield line, found.group(1), found.group(2)


def test_documented_config_keys_exist():
    """Every `section.key` and `[section] key` README.md and docs/ show is a key of that
    section of the config schema (a renamed key left in the docs would mislead a user), or
    a privacy module (`privacy.accounting`)."""
    import importlib.util

    fields, checked, problems = _config_fields(), 0, []
    for name in DOCS:
        for line, section, key in _documented_config_keys((ROOT / name).read_text()):
            checked += 1
            dotted = f"{section}.{key}"
            if key in fields[section] or dotted in _NOT_CONFIG_KEYS:
                continue
            if section == "privacy" and importlib.util.find_spec(dotted) is not None:
                continue
            problems.append(f"{name}:{line}: {dotted} is no config key")
    assert checked >= 100, f"only {checked} config keys found: the extraction broke"
    assert not problems, "\n".join(problems)


def test_the_config_key_check_catches_a_misspelt_key():
    """The check above is not vacuous: a key the schema lacks is found, a file name is not."""
    found = {
        (s, k)
        for _, s, k in _documented_config_keys(
            "`fedora.propagation_tol`, `[privacy] noise_multipler`, `fedora.py`, `model.json`"
        )
    }
    assert found == {("fedora", "propagation_tol"), ("privacy", "noise_multipler")}
    fields = _config_fields()
    assert all(k not in fields[s] for s, k in found)
    from secure_fedora.core.config import ConfigError, ExperimentConfig

    with pytest.raises(ValueError, match="noise_seed was removed"):
        ExperimentConfig.model_validate({"privacy": {"noise_seed": 1}})
    assert issubclass(ConfigError, ValueError)


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is an importable module or an attribute path below one."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def _parameters(dotted: str) -> list[str]:
    """The parameter names of the callable ``dotted`` names (``self`` left out)."""
    import importlib
    import inspect

    module, _, attribute = dotted.rpartition(".")
    while True:
        try:
            obj = importlib.import_module(module)
            break
        except ImportError:
            module, _, head = module.rpartition(".")
            attribute = f"{head}.{attribute}"
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]


def test_documented_python_names_exist():
    """Every dotted Python name of the toolkit README.md and docs/ show
    (`secure_fedora.learning.tasks.Task`, `audits.report.PLOT_CLIENTS_MAX`,
    `privacy.mechanisms.MECHANISMS`) imports: a module or an attribute of one; one shown
    called with plain names (`Task(name, per_sample, metric_name)`) takes those parameters
    first, in that order (README named `Task`'s third `metric`: a keyword call failed)."""
    privacy_keys = _config_fields()["privacy"]
    checked, problems = 0, []
    for name in DOCS:
        for line, span in _code_spans((ROOT / name).read_text()):
            for found in re.finditer(
                r"(?<![\w.\[/-])((?:secure_fedora|privacy|audits)(?:\.[A-Za-z_]\w*)+)"
                r"(?:\(([a-z_]\w*(?:, [a-z_]\w*)*)\))?",
                span,
            ):
                dotted = found.group(1)
                parts = dotted.split(".")
                if parts[0] == "privacy" and (
                    parts[1] in privacy_keys or dotted in _NOT_CONFIG_KEYS
                ):
                    continue  # a config key, checked above
                if parts[-1] in ("py", "json", "toml", "md"):
                    continue  # a file name
                checked += 1
                if not _resolves(dotted):
                    problems.append(f"{name}:{line}: {dotted} does not import")
                elif found.group(2):
                    shown = found.group(2).split(", ")
                    taken = _parameters(dotted)[: len(shown)]
                    if taken != shown:
                        problems.append(f"{name}:{line}: {dotted} takes {taken}, not {shown}")
    assert checked >= 30, f"only {checked} names found: the extraction broke"
    assert not problems, "\n".join(problems)


def _heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+\s+(.*)$", text, flags=re.M)
    }


def test_documented_repository_paths_and_links_exist():
    """Every repository path README.md and docs/ show in a code span (`tests/...`,
    `docs/results/...`, `audits/output.py`) and every relative link exists, and every
    link to a heading (`#audits`, `docs/performance.md#main-job-runs`) names one."""
    roots = (
        "docs",
        "tests",
        "secure_fedora",
        "configs",
        "benchmarks",
        "examples",
        "privacy",
        "audits",
        ".ci",
    )
    checked, problems = 0, []
    for name in DOCS:
        text = (ROOT / name).read_text()
        for line, span in _code_spans(text):
            if span.lstrip().startswith("# "):
                continue  # a code block's comment naming a file to create
            for path in re.findall(rf"(?<![\w/.-])((?:{'|'.join(roots)})/[\w./-]*)", span):
                path = path.rstrip(".")
                checked += 1
                if not (ROOT / path).exists():
                    problems.append(f"{name}:{line}: no {path}")
        for found in re.finditer(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            target, anchor = found.group(1), found.group(2)
            line = text.count("\n", 0, found.start()) + 1
            if target.startswith(("http://", "https://")):
                continue
            checked += 1
            file = (ROOT / name).parent / target if target else ROOT / name
            if not file.exists():
                problems.append(f"{name}:{line}: link to missing {target}")
            elif (
                anchor and file.suffix == ".md" and anchor not in _heading_anchors(file.read_text())
            ):
                problems.append(f"{name}:{line}: {target}#{anchor} names no heading")
    assert checked >= 100, f"only {checked} paths found: the extraction broke"
    assert not problems, "\n".join(problems)


def _real_machine_steps(text: str) -> dict[int, list[str]]:
    """The shell blocks of README's "Real machines (Flower)" steps, by step number."""
    section = text.split("## Real machines (Flower)", 1)[1].split("\n## ", 1)[0]
    steps: dict[int, list[str]] = {}
    for step in re.finditer(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", section, flags=re.M | re.S):
        blocks = re.findall(r"```sh\n(.*?)```", step.group(2), flags=re.S)
        steps[int(step.group(1))] = [textwrap.dedent(b) for b in blocks]
    return steps


@pytest.mark.slow
def test_readmes_real_machine_steps_1_to_3_run_as_written(tmp_path: Path) -> None:
    """README's multi-host recipe, steps 1-3 (each client's `keys party`, the operator's
    `deploy local --print-commands --client-public-keys` and `deploy certs`, each node's
    `keys install`), run as written with its placeholders filled in for 3 clients on this
    host, and write the files the steps name: node keys, the server's identity and
    allowlist, run.toml, the flwr CLI's config, and no client's private key on the server."""
    steps = _real_machine_steps((ROOT / "README.md").read_text())
    assert [len(steps[n]) for n in (1, 2, 3)] == [1, 1, 1], steps
    cli = f"{sys.executable} -m secure_fedora.cli "
    config = tmp_path / "config.toml"
    smoke = (ROOT / "configs" / "smoke.toml").read_text()
    config.write_text(smoke.replace("num_clients = 8", "num_clients = 3"))
    fed = tmp_path / "fed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(block: str, node: int | None = None) -> None:
        script = block.replace("secure-fedora ", cli)
        if node is not None:
            script = script.replace("/srv/fed-node", str(tmp_path / f"node-{node}"))
            script = re.sub(r"\bCID\b", f"client-{node:03d}", script)
        script = script.replace("/srv/fed", str(fed)).replace("LINK_HOST", "localhost")
        script = re.sub(r"\bCONFIG\b", str(config), script)
        out = subprocess.run(
            ["bash", "-euc", script],
            cwd=tmp_path,
            env=env,
            text=True,
            capture_output=True,
            timeout=300,
        )
        assert out.returncode == 0, f"{script}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"

    (tmp_path / "PUB").mkdir()
    for i in range(3):  # step 1, on each node host; its public file sent to the operator
        run(steps[1][0], node=i)
        public = tmp_path / f"node-{i}" / "identity" / f"client-{i:03d}.public.json"
        shutil.copy(public, tmp_path / "PUB")
    run(steps[2][0])  # step 2, on LINK_HOST
    for i in range(3):
        assert (fed / "keys" / f"node-{i}").is_file() and (fed / "keys" / f"node-{i}.pub").is_file()
    assert (fed / "identities" / "server" / "allowlist.json").is_file()
    assert sorted(p.name for p in (fed / "identities").iterdir()) == ["server"]
    assert f'result-dir = "{fed}/results"' in (fed / "run.toml").read_text()
    assert "address = " in (fed / "flwr" / "cli" / "config.toml").read_text()
    assert {"ca.crt", "server.crt", "server.key"} <= {p.name for p in (fed / "certs").iterdir()}
    allowlist = json.loads((fed / "identities" / "server" / "allowlist.json").read_text())
    assert sorted(allowlist["parties"]) == ["client-000", "client-001", "client-002", "server"]
    for i in range(3):  # step 3: the allowlist copied to node host I, then installed there
        shutil.copy(
            fed / "identities" / "server" / "allowlist.json",
            tmp_path / f"node-{i}" / "allowlist.json",
        )
        run(steps[3][0], node=i)
        installed = tmp_path / f"node-{i}" / "identity" / "allowlist.json"
        assert json.loads(installed.read_text()) == allowlist
