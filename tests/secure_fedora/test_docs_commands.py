"""The command lines README.md and docs/ show name sub-commands and flags that exist, and
every `--help` states the default of each option that has one."""

import argparse
import re
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
