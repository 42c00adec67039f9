"""A plug-in accountant, as a privacy researcher would add one without editing the package
(used by the plug-in accountant tests).

``rdp_padded_test``: Opacus's RDP analysis (the built-in ``rdp``'s) of the whole history, plus
a relative margin of :data:`MARGIN`: a valid upper bound (it only adds to one), and one whose
epsilons differ from every built-in accountant's, so a test can tell which analysis ran.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from privacy.accounting import ACCOUNTANT_REGISTRY, AccountingMethod, register_accountant

NAME = "rdp_padded_test"
MARGIN = 1e-3
#: How often this process computed an epsilon with it.
CALLS = [0]


def _compute(history: Any, delta: float, options: dict[str, float]) -> float:
    CALLS[0] += 1
    return ACCOUNTANT_REGISTRY["rdp"].compute(history, delta, options) * (1.0 + MARGIN)


if NAME not in ACCOUNTANT_REGISTRY:
    register_accountant(AccountingMethod(
        NAME, "Opacus's RDP analysis plus a relative margin", _compute,
        lambda o: {"library": "opacus", "orders": "opacus_default_alphas",
                   "relative_margin": MARGIN}))


@contextmanager
def unregistered() -> Iterator[None]:
    """This process as one that never imported this module (an auditor's, or a Flower node's
    or server's without it in ``secure_fedora/contrib/``): its accountant unregistered and the
    module unimported; both put back afterwards."""
    this, method = sys.modules[__name__], ACCOUNTANT_REGISTRY.pop(NAME)
    package = sys.modules[__name__.rpartition(".")[0]]
    sys.modules.pop(__name__)
    try:
        yield
    finally:
        ACCOUNTANT_REGISTRY[NAME] = method
        sys.modules[__name__] = this
        package.accountant_plugin = this  # type: ignore[attr-defined]
