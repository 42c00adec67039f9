"""The common base of every error this toolkit raises on purpose.

An error that derives from :class:`ToolkitError` is caused by input, files or the environment
(a bad config key, a corrupt file, a refused release), never by a bug, and its message names
the key or file at fault. The command-line entry points print such errors (and ``OSError``)
as one line, ``error: <message>``, and exit with code 2; any other exception is a bug and
keeps its traceback. It lives in ``privacy`` because that package depends on nothing else of
the toolkit, so ``secure_fedora`` and ``audits`` can share it.
"""

from __future__ import annotations

__all__ = ["ToolkitError"]


class ToolkitError(Exception):
    """Base of the toolkit's deliberate errors: the message is meant for the user as is."""
