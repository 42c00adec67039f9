"""Checks of the audit functions' own arguments: one wording for each kind, an error of the
caller's class naming the argument, before anything is built or trained."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MAX_COUNT", "MAX_SEED", "check_config", "check_count", "check_open_fraction",
           "check_seed"]

#: Seeds are ints in [0, MAX_SEED): torch's and numpy's generators take every one of them.
MAX_SEED = 2**63
#: Counts (canaries, guesses, successes) are ints below MAX_COUNT, the int64 range the config
#: keeps its integers in: scipy's distributions refuse Python ints beyond it.
MAX_COUNT = 2**63


def check_seed(
    value: Any, error: type[Exception], name: str = "seed", flag: str | None = None
) -> int:
    """``value`` unless it is not an int (a bool included) in [0, :data:`MAX_SEED`): then
    ``error`` naming ``name`` (and ``flag``, the option that gave it, when given)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_SEED:
        given = f" ({flag})" if flag else ""
        raise error(f"{name} must be an integer in [0, 2**63){given}, got {value!r:.80}")
    return value


def check_count(value: Any, name: str, error: type[Exception]) -> int:
    """``value`` as an int unless it is not an integer (a bool included; a numpy integer is
    one) in [0, :data:`MAX_COUNT`): then ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) \
            or not 0 <= value < MAX_COUNT:
        raise error(f"{name} must be an integer in [0, 2**63), got {value!r:.80}")
    return int(value)


def check_open_fraction(value: Any, name: str, error: type[Exception]) -> float:
    """``value`` as a float unless it is not a number (a bool included) strictly between 0
    and 1: then ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not (0 < value < 1 and math.isfinite(value)):  # an int beyond float: no overflow
        raise error(f"{name} must be in (0, 1), got {value!r:.80}")
    return float(value)


def check_config(cfg: Any, error: type[Exception], name: str = "cfg") -> None:
    """``error`` naming ``name`` unless ``cfg`` is an ExperimentConfig (a dict or a path is
    not read here: the audits take what ``load_config``/``parse_config`` return)."""
    from secure_fedora.core.config import ExperimentConfig

    if not isinstance(cfg, ExperimentConfig):
        raise error(f"{name} must be an ExperimentConfig (secure_fedora.core.config.load_config"
                    f" or parse_config), got {type(cfg).__name__}")
