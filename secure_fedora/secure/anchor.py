"""The signed run anchor: ``anchor.json`` at the root of a finished DP run directory.

A hash chain cannot show that entries were cut from its end. The anchor fixes what a finished
run produced, so that an auditor who copies it apart can later refuse a run directory that
was shortened or edited (``secure-fedora audit verify RUN_DIR --anchor FILE``).

Document (canonical JSON, one line, then a newline)::

    {"format": "secure-fedora-anchor", "version": 1,
     "run_name": ..., "config_hash": ..., "created": "<UTC ISO 8601>",
     "runtime": "in-process" | "flower",
     "methods": ["fedora", ...],
     "files": {"config.toml": "<sha256 hex>", "results.json": "<sha256 hex>"},
     "ledgers": {"<method>/<client>": {"final_index": i, "entries": i + 1, "head": "<sha256>",
                                       "epsilon_spent": e}, ...},
     "signer": {"party_id": "operator", "ed25519": "<raw public key hex>"},
     "signature": "<Ed25519 signature hex>"}

The signature covers ``ANCHOR_DOMAIN`` followed by the canonical JSON of every other field.
``head`` is the SHA-256 of the ledger's last line (its close entry), as in
:mod:`privacy.ledger`. For the Flower runtime (``"runtime": "flower"``) the ServerApp signs
the anchor with the server key and writes it to its ``result-dir``: ``ledgers`` holds the
heads the clients reported (signed) with their last round replies, as
``"<method>/<client>"``, and ``files`` only ``results.json``. To audit, collect each node's
ledger ``<state-dir>/runs/<run id>/<method>/<client>.jsonl`` into ``RUN/ledgers/<method>/``
next to the result-dir's files and run ``audit verify RUN --anchor <result-dir>/anchor.json``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from privacy.identity import Identity
from privacy.ledger import canonical_json

__all__ = [
    "ANCHOR_DOMAIN",
    "ANCHOR_FILENAME",
    "ANCHOR_FORMAT",
    "anchor_signing_bytes",
    "anchors_the_same",
    "build_anchor",
    "file_sha256",
    "write_anchor",
]

ANCHOR_FILENAME = "anchor.json"
ANCHOR_FORMAT = "secure-fedora-anchor"
ANCHOR_VERSION = 1
ANCHOR_DOMAIN = b"secure-fedora/anchor/v1\n"
ANCHORED_FILES: tuple[str, ...] = ("config.toml", "results.json")


def file_sha256(path: Path) -> str:
    """SHA-256 hex of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def anchor_signing_bytes(doc: Mapping[str, Any]) -> bytes:
    """The bytes an anchor's signature covers: the domain, then the canonical JSON of every
    field except ``signature``."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return ANCHOR_DOMAIN + canonical_json(body).encode("utf-8")


def build_anchor(run_dir: Path, *, run_name: str, config_hash: str, methods: Sequence[str],
                 ledgers: Mapping[str, Mapping[str, Any]], signer: Identity,
                 runtime: str = "in-process",
                 files: Sequence[str] = ANCHORED_FILES) -> dict[str, Any]:
    """The signed anchor document of ``run_dir`` (the ``files``, by default config.toml and
    results.json, must exist in it).

    ``ledgers`` maps ``"<method>/<client>"`` to ``{"entries", "head", "epsilon_spent"}``;
    ``final_index`` is derived (``entries - 1``). Raises FileNotFoundError for a missing
    anchored file.
    """
    rows = {}
    for name in sorted(ledgers):
        row = ledgers[name]
        entries = int(row["entries"])
        rows[name] = {"final_index": entries - 1, "entries": entries, "head": str(row["head"]),
                      "epsilon_spent": float(row["epsilon_spent"])}
    doc: dict[str, Any] = {
        "format": ANCHOR_FORMAT,
        "version": ANCHOR_VERSION,
        "run_name": run_name,
        "config_hash": config_hash,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "runtime": runtime,
        "methods": list(methods),
        "files": {name: file_sha256(run_dir / name) for name in files},
        "ledgers": rows,
        "signer": {
            "party_id": signer.party_id,
            "ed25519": signer.signing_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex(),
        },
    }
    doc["signature"] = signer.sign(anchor_signing_bytes(doc)).hex()
    return doc


def anchors_the_same(path: Path, doc: Mapping[str, Any]) -> bool:
    """Whether ``path`` holds an anchor of exactly what ``doc`` anchors (every field but
    ``created`` and ``signature`` equal) with a valid signature under ``doc``'s signer."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        held = json.loads(path.read_bytes())
        if not isinstance(held, dict):
            return False
        moving = ("created", "signature")
        if {k: v for k, v in held.items() if k not in moving} != \
                {k: v for k, v in doc.items() if k not in moving}:
            return False
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(doc["signer"]["ed25519"]))
        key.verify(bytes.fromhex(held["signature"]), anchor_signing_bytes(held))
    except (OSError, ValueError, TypeError, KeyError, InvalidSignature):
        return False
    return True


def write_anchor(run_dir: Path, doc: Mapping[str, Any]) -> bool:
    """Write ``doc`` durably (atomic replace) as ``run_dir/anchor.json``; True when it did.

    An anchor already there that anchors the same run (a finished run resumed again) is kept
    byte for byte (False): a copy an auditor took of it still verifies the directory."""
    from secure_fedora.core.files import atomic_write_bytes

    path = run_dir / ANCHOR_FILENAME
    if anchors_the_same(path, doc):
        return False
    atomic_write_bytes(path, (canonical_json(dict(doc)) + "\n").encode("utf-8"))
    return True

