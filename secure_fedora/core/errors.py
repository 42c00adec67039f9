"""How the command-line entry points report errors: one line, exit code 2.

Every deliberate error of the toolkit derives from :class:`privacy.errors.ToolkitError`
(``ConfigError``, ``DataError``, ``LedgerError``, ``CheckpointError``, ...). Those, ``OSError``
and any other exception class defined in the toolkit's packages reach the user as
``error: <message>`` on stderr with exit code 2; ``--debug`` adds the traceback. Any other
exception is a bug and propagates with its traceback; a plug-in method's own code raising is
turned into a toolkit error where the toolkit calls it (``contract.client_half``,
``method_hook``, ``server_half``), naming the method and the hook.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from privacy.errors import ToolkitError

__all__ = [
    "DEBUG_FLAG",
    "ERROR_EXIT_CODE",
    "INTERRUPTED_EXIT_CODE",
    "TOOLKIT_PACKAGES",
    "ToolkitError",
    "interrupt_on",
    "is_user_error",
    "one_line",
    "run_command",
    "run_standalone",
    "split_debug_flag",
]

ERROR_EXIT_CODE = 2
#: exit code of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED_EXIT_CODE = 130
DEBUG_FLAG = "--debug"
#: The toolkit's own top-level packages (exceptions defined there are deliberate errors).
TOOLKIT_PACKAGES = ("privacy", "secure_fedora", "audits")


def is_user_error(err: BaseException) -> bool:
    """True for errors caused by input, files or the environment: toolkit errors (by base
    class, or by being defined in one of the toolkit's packages) and ``OSError``."""
    if isinstance(err, (ToolkitError, OSError)):
        return True
    module = type(err).__module__ or ""
    return isinstance(err, Exception) and module.split(".")[0] in TOOLKIT_PACKAGES


def one_line(err: BaseException) -> str:
    """The error's message on one line; an ``OSError`` names its file(s)."""
    if isinstance(err, OSError) and err.strerror:
        files = [str(f) for f in (err.filename, err.filename2) if f is not None]
        text = err.strerror + (f": {' -> '.join(files)}" if files else "")
    else:
        text = str(err) or type(err).__name__
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    joined = ""
    for part in parts:
        if joined:
            joined += " " if joined.endswith(":") else "; "
        joined += part
    return joined


def split_debug_flag(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` (``sys.argv[1:]`` when None) without ``--debug``, and whether it was there;
    ``--debug`` is accepted anywhere on the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    return [a for a in args if a != DEBUG_FLAG], debug


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Document ``--debug`` in ``parser``'s help (it is taken out of argv before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the traceback of an error (anywhere on the command line)")


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                debug: bool = False, stream: TextIO | None = None) -> int:
    """Run a command handler; a user error (:func:`is_user_error`) is printed as
    ``error: <message>`` (after its traceback with ``debug``) and gives exit code 2; Ctrl-C
    that the command did not report itself prints ``interrupted`` (exit code 130)."""
    try:
        return int(func(args))
    except KeyboardInterrupt:  # e.g. a second Ctrl-C while a command cleans up after the first
        print("interrupted", file=stream if stream is not None else sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as err:
        if not is_user_error(err):
            raise
        out = stream if stream is not None else sys.stderr
        if debug:
            traceback.print_exc(file=out)
        print(f"error: {one_line(err)}", file=out)
        return ERROR_EXIT_CODE



def run_standalone(register: Callable[[Any], object], argv: Sequence[str] | None) -> int:
    """A sub-command group's stand-alone entry point (``python -m <module> ...``): the
    commands ``register`` adds to a ``secure-fedora`` parser, run on ``argv`` with errors
    reported as by the main CLI (one line, exit code 2, ``--debug`` for the traceback)."""
    argv, debug = split_debug_flag(argv)
    parser = argparse.ArgumentParser(prog="secure-fedora")
    add_debug_flag(parser)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.func, args, debug=debug)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on(*signums: int) -> Callable[[], None]:
    """Make each signal of ``signums`` raise KeyboardInterrupt, as Ctrl-C does; returns the
    function that puts the previous handlers back. Only on the main thread (elsewhere nothing
    changes), and only for a signal whose handler Python knows: where ``signal.getsignal`` is
    None (a handler an embedding application installed outside Python) the handler is left
    as it is, since Python could not put it back, and so is an ignored signal (``nohup``
    ignores SIGHUP so that the command outlives its terminal: that choice is the caller's)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) not in (None, signal.SIG_IGN):
                previous[signum] = signal.signal(signum, _raise_interrupt)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore
