"""Seeded mutations of the signed messages of noised+encrypted relatedness in process
(:func:`secure_fedora.secure.relatedness.encrypted_overlaps` with a transport and the run's
privacy state): each client's DP summary is admitted by its gate and written to its ledger
once, then every run encrypts and signs it through the summary pipeline; the ``channel``
damages one message on its way (with the byte surgery of :mod:`.test_encrypted_mutations`).
Every case ends in the genuine overlaps, the damaged client excluded by name, or a
SecureRelatednessError naming the key holder; no ledger changes (nothing admitted twice, no
entry for a release never made) and every ledger verifies
(:func:`audits.verify.check_ledger_lines`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from audits.verify import check_ledger_lines
from privacy.noise import ReproducibleNoise
from secure_fedora.algorithms.messages import KIND_RELATEDNESS_ROWS, KIND_RELATEDNESS_UPLOAD
from secure_fedora.runtimes.inprocess import build_clients
from secure_fedora.secure.private import FederationPrivacy
from secure_fedora.secure.relatedness import (
    SecureRelatednessError,
    encrypted_overlaps,
    run_key_ceremony,
)
from secure_fedora.secure.transport import SecureTransport
from tests.secure_fedora.secure.test_encrypted_mutations import _flip
from tests.secure_fedora.secure.test_release_path import config

N = 4
SEED = 20261209


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The run's privacy state with every client's noised summary admitted, a transport, a
    key ceremony, the genuine overlaps and every message of one genuine run."""
    tmp: Path = tmp_path_factory.mktemp("noised-encrypted")
    cfg = config(True, methods=["fedora"], fedora={"relatedness": "noised+encrypted"})
    privacy = FederationPrivacy.open(cfg, "fedora", N, tmp / "ledgers", tmp / "keys")
    transport = SecureTransport.for_simulation(tmp, N, "fedora", key_dir=tmp / "keys")
    transport.attach_releases(privacy)
    clients = build_clients(config(False))
    noise = [ReproducibleNoise(i) for i in range(N)]
    summaries = privacy.noised_summaries(clients, 1, 10, noise)
    ceremony = run_key_ceremony(
        N, 0, identities=[transport.identities[c] for c in transport.client_ids]
    )
    sent: dict[tuple[str, int], bytes] = {}

    def keep(kind: str, _rnd: int, client: int, message: bytes) -> bytes:
        sent[kind, client] = message
        return message

    genuine = encrypted_overlaps(summaries, transport=transport, ceremony=ceremony, channel=keep)
    assert genuine.accepted == list(range(N))
    w = {
        "privacy": privacy,
        "transport": transport,
        "summaries": summaries,
        "ceremony": ceremony,
        "overlaps": genuine.overlaps,
        "sent": sent,
    }
    w["ledgers"] = _ledgers(w)
    assert [len(lines) for lines in w["ledgers"]] == [1] * N  # the summary, admitted once
    yield w
    privacy.close()


def _ledgers(w: dict[str, Any]) -> list[list[str]]:
    """Every client's ledger lines, checked to verify under its own key."""
    out = []
    for c in w["privacy"].clients:
        text = Path(c.ledger.path).read_text()
        _, findings = check_ledger_lines(
            text.splitlines(), c.ledger.public_key, c.client_id, torn=not text.endswith("\n")
        )
        assert findings == [], findings
        out.append(text.splitlines())
    return out


def _mutate(w: dict[str, Any], rng: random.Random, kind: str, message: bytes, key: Any) -> bytes:
    if kind == "truncated":
        return message[: rng.randrange(len(message))]
    if kind == "bit-flip":
        return _flip(rng, message)
    if kind == "bit-flip-tail":  # inside the payload's last ciphertext
        tail = bytes(_flip(rng, message[-64:]))
        return message[:-64] + tail
    if kind == "empty":
        return b""
    if kind == "huge":
        return message + bytes(rng.randrange(1, 2**20))
    if kind == "replayed":  # the same kind of message of the genuine run, delivered again
        return w["sent"][key]
    if kind == "other-client":  # another client's authentic upload of the genuine run
        return w["sent"][key[0], (key[1] + 1) % N]
    if kind == "genuine":
        return message
    raise AssertionError(kind)


def case(w: dict[str, Any], rng: random.Random, flow: str, kind: str) -> str:
    """One run of the protocol with one message of ``flow`` damaged by ``kind``."""
    target = rng.randrange(N) if flow == "upload" else 0
    wanted = KIND_RELATEDNESS_UPLOAD if flow == "upload" else KIND_RELATEDNESS_ROWS

    def channel(k: str, _rnd: int, client: int, message: bytes) -> bytes:
        if (k, client) == (wanted, target):
            return _mutate(w, rng, kind, message, (k, client))
        return message

    try:
        result = encrypted_overlaps(
            w["summaries"], transport=w["transport"], ceremony=w["ceremony"], channel=channel
        )
    except SecureRelatednessError as err:
        assert flow == "rows" and "key holder client 0" in str(err), err
        outcome = "refused: key holder"
    else:
        if result.accepted == list(range(N)):
            assert float((result.overlaps - w["overlaps"]).abs().max()) < 1e-4, kind
            outcome = "genuine"
        else:
            assert flow == "upload" and result.excluded == [target], (kind, result.excluded)
            assert [r.client for r in result.rejections] == [target]
            assert torch.all(result.overlaps[target] == 0)
            outcome = f"excluded: {result.rejections[0].reason}"
    assert _ledgers(w) == w["ledgers"], kind
    return outcome


KINDS = {
    "upload": [
        "truncated",
        "bit-flip",
        "bit-flip-tail",
        "empty",
        "huge",
        "replayed",
        "other-client",
        "genuine",
    ],
    "rows": ["truncated", "bit-flip", "bit-flip-tail", "empty", "huge", "replayed", "genuine"],
}
CASES = {"upload": 40, "rows": 21}


@pytest.mark.parametrize("flow", sorted(KINDS))
def test_damaged_noised_encrypted_messages_end_genuine_or_named_with_the_ledgers_unchanged(
    world: dict[str, Any], flow: str
) -> None:
    rng = random.Random(f"{SEED}-{flow}")
    kinds = KINDS[flow]
    outcomes: Counter[tuple[str, str]] = Counter()
    for n in range(CASES[flow]):
        kind = kinds[n % len(kinds)]
        outcome = case(world, rng, flow, kind)
        assert (outcome == "genuine") == (kind == "genuine"), (flow, kind, outcome)
        outcomes[kind, outcome] += 1
    assert sum(outcomes.values()) == CASES[flow]
