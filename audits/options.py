"""How audit errors and findings name the caller's choices: the ``secure-fedora audit`` flags
on the command line, the audit functions' arguments in Python (the default), as key-store
errors name ``--keystore`` or ``keystore=``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["API_AUDIT_OPTIONS", "CLI_AUDIT_OPTIONS", "DEFAULT_PLD_CHECKPOINTS", "DEFAULT_REL_TOL"]

#: ``audit verify``'s default relative tolerance between the recorded epsilon and the
#: independent accountant's (``--rel-tol``, ``rel_tol=``); kept here, not in
#: :mod:`audits.verify`, so that the audit command's parser imports no torch.
DEFAULT_REL_TOL = 0.02
#: ``audit verify``'s default number of ledger positions re-accounted with PLD
#: (``--pld-checkpoints``, ``pld_checkpoints=``).
DEFAULT_PLD_CHECKPOINTS = 8

#: What the ``audit`` commands' errors name: their flags.
CLI_AUDIT_OPTIONS: Mapping[str, str] = MappingProxyType({
    "records": "--records",
    "num_canaries": "--canaries",
    "seed": "--seed",
    "anchor": "--anchor",
    "allowlist": "--allowlist",
    "keystore": "--keystore",
    "client": "--client",
    "client_index": "--client",
    "method": "--method",
    "confidence": "--confidence",
    "delta": "--delta",
    "calibration_fraction": "--calibration-fraction",
    "trials": "--trials",
    "rel_tol": "--rel-tol",
    "pld_checkpoints": "--pld-checkpoints",
    "verify_anchor": "run `audit verify --anchor` for all",
    "imports": "--import",
    "strict": "--strict",
    "out_dir": "--out",
})
#: What the audit functions' errors name by default: their arguments.
API_AUDIT_OPTIONS: Mapping[str, str] = MappingProxyType({
    **{key: f"the {key}= argument" for key in CLI_AUDIT_OPTIONS if key != "verify_anchor"},
    "verify_anchor": "verify_run(run_dir, anchor=...) lists all",
    "imports": "the imports= argument of audits.verify.verify_run",
    "strict": "strict=True",
})
