"""``secure-fedora sweep``'s command line: its parser and handler.

Kept apart from :mod:`secure_fedora.experiments.sweep` (which imports torch and matplotlib) so
that ``secure-fedora sweep --help`` starts without them; the handler imports the sweep itself.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

# The command-line spellings of a non-private cell (None): an infinite budget means the same.
NON_PRIVATE_WORDS = ("none", "nonprivate", "non-private", "inf", "+inf", "infinity", "+infinity")


def parse_epsilon(text: str) -> float | None:
    """Parse a command-line epsilon: None (non-private) for one of :data:`NON_PRIVATE_WORDS`,
    else a positive finite number; ArgumentTypeError for anything else (a number too large
    for a float, e.g. 1e400, too: it is no spelling of infinity)."""
    if text.strip().lower() in NON_PRIVATE_WORDS:
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"epsilon must be 'none' or a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"epsilon must be positive and finite, got {text!r}")
    return value


def _flag_of(message: str) -> str:
    """The flag a sweep argument's error is about: the first of seed, epsilon and method
    it mentions (:func:`~secure_fedora.experiments.sweep.plan_cells` names the argument)."""
    found = {message.find(word): flag for word, flag in
             (("seed", "--seeds"), ("epsilon", "--epsilons"), ("method", "--methods"))
             if word in message}
    return found[min(found)] if found else "--methods, --seeds or --epsilons"


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run ``secure-fedora sweep``; returns 0, or raises :class:`SweepError` (or another
    toolkit error) for a sweep that cannot run (the entry point prints it, exit code 2)."""
    from rich.console import Console

    from privacy.errors import ToolkitError
    from secure_fedora.core.config import check_path_argument, load_config
    from secure_fedora.core.errors import one_line
    from secure_fedora.experiments.sweep import (
        Cell,
        SweepError,
        check_sweep,
        plan_cells,
        run_sweep,
    )
    from secure_fedora.runtimes.summary import progress_bars

    if args.out is not None:
        check_path_argument(args.out, "--out")  # named as the command line names it
    cfg = load_config(args.config)
    if args.out is None:
        from secure_fedora.runtimes.rundir import default_sweep_dir

        args.out = str(default_sweep_dir(cfg))
    methods = args.methods or list(_literal_methods())
    seeds = args.seeds if args.seeds is not None else [cfg.seed]
    try:  # a bad argument is named by its flag, as every command names it
        plan_cells(methods, args.epsilons, seeds)
    except SweepError as err:
        raise SweepError(f"{err} ({_flag_of(str(err))})") from None
    check_sweep(cfg, args.out, methods, seeds, args.epsilons)  # before any progress bar
    err_console = Console(stderr=True)
    with progress_bars(err_console, args.quiet) as progress:
        overall = progress.add_task("cells", total=None)
        rounds = progress.add_task("rounds", total=cfg.training.rounds)

        running: list[str] = []  # the cell being trained, if any

        def on_cell(cell: Cell, index: int, total: int, skipped: bool) -> None:
            progress.update(overall, total=total, completed=index + (1 if skipped else 0))
            progress.update(rounds, description=cell.key, completed=0)
            running[:] = [] if skipped else [cell.key]

        def on_round(cell: Cell, rnd: int, total: int) -> None:
            progress.update(rounds, completed=rnd, total=total)
            if rnd == total:
                progress.advance(overall)

        try:
            result = run_sweep(cfg, args.out, methods, seeds, args.epsilons,
                               on_cell=on_cell, on_round=on_round)
        except ToolkitError as err:
            if not running or isinstance(err, SweepError):  # a SweepError names its cell
                raise
            # a run's own error (e.g. a relatedness or training failure) named no cell
            raise SweepError(f"cell {running[0]}: {one_line(err)} (finished cells are kept; "
                             "the same command continues the sweep)") from err
    console = Console()
    console.print((Path(args.out) / "sweep.md").read_text(), markup=False)
    console.print(f"cells run: {len(result.ran)}, skipped (already finished): {len(result.skipped)}")
    console.print(f"sweep directory: {args.out}", markup=False)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sweep`` command to a ``secure-fedora`` sub-command parser; returns it."""
    p = subparsers.add_parser(
        "sweep", help="run methods x epsilon x seeds and write a table and plots",
        description="Run every method at every epsilon and seed of a config; resumable: a "
                    "rerun with the same --out (or none: runs/<name>-sweep) skips finished cells.",
    )
    p.add_argument("config", help="path to a TOML config (see configs/)")
    p.add_argument("--out", default=None,
                   help="sweep directory (created; reused to resume; default: runs/<name>-sweep)")
    p.add_argument("--methods", nargs="+", choices=_literal_methods(), default=None,
                   help="registered methods to run (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds (default: the config's seed)")
    p.add_argument("--epsilons", nargs="+", type=parse_epsilon, default=[None],
                   help="privacy budgets: positive numbers, and 'none' (or 'inf', "
                        "'non-private') for non-private (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m secure_fedora.experiments.sweep``); errors are reported as by
    the main CLI (one line, exit code 2, ``--debug`` for the traceback)."""
    from secure_fedora.core.errors import run_standalone

    return run_standalone(register, argv)


def _literal_methods() -> tuple[str, ...]:
    """The method names the config schema's ``methods`` admits (the method registry)."""
    from secure_fedora.core.registry import METHODS

    return tuple(METHODS.names())
