"""Seeded mutations of real encrypted-mode messages, driven through the CKKS protocol steps
both runtimes run (:mod:`secure_fedora.secure.relatedness`, :mod:`.encrypted_propagation`):
client uploads (``Enc(U_i)`` columns, propagation rows), the key holder's public context, the
sealed secret contexts, the server's encrypted Gram rows and propagation results. Every case
ends in the genuine result or a named refusal (the step's own error, naming the client,
vector or entry); nothing raises anything else, crashes the process or decrypts to garbage
that is released."""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
import torch

from privacy import ckks
from privacy.ckks import (
    EncryptedRow,
    EncryptedVector,
    InnerProductUpload,
    create_secret_context,
    public_context_bytes,
)
from privacy.identity import Identity
from secure_fedora.secure.encrypted_propagation import (
    EncryptedPropagationError,
    PropagationClient,
    PropagationServer,
)
from secure_fedora.secure.relatedness import (
    CorruptUploadsError,
    InvalidUploadsError,
    RowValuesError,
    SecureRelatednessError,
    blame_uploads,
    create_keys,
    decrypt_rows,
    encrypt_summary,
    encrypted_overlaps,
    gram_rows,
    isolated_rows,
    open_keys,
    open_server_context,
    parse_upload,
    plan_layout,
    public_keys,
    run_key_ceremony,
    seal_keys,
    summary_encryption,
)
from secure_fedora.secure.transport import UnaccountedReleases

N, Q, D = 3, 1, 20
P = 9000  # two ciphertexts per propagation row (8192 parameters each)
SEED = 20261206
LAST_BITS_SCALE = 2.0**40 * (1 + 2.0**-40)  # within 1e-9 of the scale 2^40, not equal to it


class World:
    """Real keys and messages of one tiny run: relatedness under ``ctx`` (and the same
    summaries under ``other``, another key holder's keys), propagation under ``pctx``."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.layout = plan_layout(N, Q, D)
        self.ctx, self.other = create_keys(), create_keys()
        self.pub, self.other_pub = public_keys(self.ctx), public_keys(self.other)
        self.server_ctx = open_server_context(self.pub)
        self.u = [
            torch.linalg.qr(torch.randn(D, Q, generator=g, dtype=torch.float64))[0]
            for _ in range(N)
        ]
        full = torch.cat(self.u, 1)
        self.gram = full.T @ full
        self.columns = {c: encrypt_summary(self.ctx, self.layout, c, self.u[c]) for c in range(N)}
        self.foreign = {c: encrypt_summary(self.other, self.layout, c, self.u[c]) for c in range(N)}
        self.uploads = {c: parse_upload(self.layout, c, Q, self.columns[c]) for c in range(N)}
        self.rows, self.vectors = gram_rows(self.server_ctx, self.layout, N, Q, self.uploads)
        other_server = open_server_context(self.other_pub)
        self.foreign_rows, _ = gram_rows(
            other_server,
            self.layout,
            N,
            Q,
            {c: parse_upload(self.layout, c, Q, self.foreign[c]) for c in range(N)},
        )
        self.ids = [Identity.generate(f"client-{i:03d}") for i in range(N)]
        keys = {i.party_id: i.agreement_key.public_key() for i in self.ids}
        self.sealed = seal_keys(self.ctx, keys, self.ids[0].party_id)
        self.other_sealed = seal_keys(self.other, keys, self.ids[0].party_id)
        pctx, pother = (
            create_secret_context(galois_keys=False),
            create_secret_context(galois_keys=False),
        )
        self.prop_client, self.prop_other = PropagationClient(pctx), PropagationClient(pother)
        self.prop_server = PropagationServer(
            public_context_bytes(pctx, galois_keys=False, relin_keys=False)
        )
        other_server_p = PropagationServer(
            public_context_bytes(pother, galois_keys=False, relin_keys=False)
        )
        self.theta = torch.randn(N, P, generator=g, dtype=torch.float64) * 0.1
        self.weights = torch.softmax(torch.randn(N, N, generator=g, dtype=torch.float64), 1)
        self.prop_up = [self.prop_client.encrypt(self.theta[j]) for j in range(N)]
        self.prop_down = self.prop_server.combine(self.weights, self.prop_up, P)
        self.foreign_up = [self.prop_other.encrypt(self.theta[j]) for j in range(N)]
        self.foreign_down = other_server_p.combine(self.weights, self.foreign_up, P)
        self.phi = self.weights @ self.theta


@pytest.fixture(scope="module")
def world() -> World:
    return World()


# --------------------------------------------------------------------------- byte surgery


def _flip(rng: random.Random, blob: bytes, within: int | None = None) -> bytes:
    out = bytearray(blob)
    i = rng.randrange(min(within or len(out), len(out)))
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _upload(
    blob: bytes, index: int | None = None, packed: Any = None, broadcast: Any = None
) -> bytes:
    up = InnerProductUpload.deserialize(blob)
    return InnerProductUpload(
        up.index if index is None else index,
        tuple(up.packed if packed is None else packed),
        tuple(up.broadcast if broadcast is None else broadcast),
    ).serialize()


def _edit_seal_header(rng: random.Random, blob: bytes) -> bytes:
    """The upload with its first SEAL ciphertext's header (magic, version, compression, size)
    changed."""
    up = InnerProductUpload.deserialize(blob)
    ct = bytearray(up.packed[0])
    field = rng.choice(["byte", "compression", "size"])
    if field == "byte":
        ct[rng.randrange(8)] = rng.randrange(256)
    elif field == "compression":
        ct[5] = rng.choice([0, 1, 2, 3, 255])
    else:
        ct[8:16] = struct.pack(
            "<Q", rng.choice([0, 16, len(ct) - 1, len(ct) + 1, 2**40, 2**64 - 1])
        )
    return _upload(blob, packed=[bytes(ct), *up.packed[1:]])


def _rescaled(ctx: ts.Context, blob: bytes, scale: float) -> bytes:
    ct = ckks._engine(ctx).load(blob, "ciphertext")
    ct.scale = scale
    return ckks._save(ct)


def _transparent(ctx: ts.Context, blob: bytes) -> bytes:
    """``blob``'s ciphertext with all-zero polynomials (same parameters, level and scale),
    written by hand: SEAL's own evaluator never produces a transparent ciphertext."""
    ct = ckks._engine(ctx).load(blob, "ciphertext")
    n, moduli = ct.poly_modulus_degree(), ct.coeff_modulus_size()
    head = blob[:5] + b"\x00" + blob[6:8]  # SEAL header: no compression

    def framed(body: bytes) -> bytes:
        return head + struct.pack("<Q", 16 + len(body)) + body

    data = framed(struct.pack("<Q", 2 * n * moduli) + bytes(8 * 2 * n * moduli))
    return framed(
        struct.pack("<4Q", *ct.parms_id())
        + b"\x01"  # NTT form
        + struct.pack("<QQQdQ", 2, n, moduli, ct.scale, 1)
        + data
    )


def _other_parameters(rng: random.Random) -> bytes:
    """A ciphertext under other CKKS parameters (ring degree, moduli or scale)."""
    degree, bits, scale = rng.choice(
        [
            (4096, [40, 20, 40], 2.0**20),
            (8192, [60, 40, 40, 60], 2.0**30),
            (16384, [60, 40, 40, 60], 2.0**40),
            (8192, [50, 30, 30, 50], 2.0**30),
        ]
    )
    other = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=degree, coeff_mod_bit_sizes=bits)
    seal = other.data.seal_context()
    pt, ct = sealapi.Plaintext(), sealapi.Ciphertext(seal)
    sealapi.CKKSEncoder(seal).encode([0.1] * 4, seal.first_parms_id(), scale, pt)
    sealapi.Encryptor(seal, other.data.public_key()).encrypt(pt, ct)
    return ckks._save(ct)


# --------------------------------------------------------------------------- the four flows


def upload_case(w: World, rng: random.Random, kind: str) -> tuple[str, str]:
    """Client ``c``'s encrypted summary column mutated; the server parses every upload,
    computes the rows, the key holder decrypts them."""
    c = rng.randrange(N)
    blob = w.columns[c][0]
    columns: Any = [blob]
    if kind == "truncated":
        columns = [blob[: rng.randrange(len(blob))]]
    elif kind == "bit-flip":
        columns = [_flip(rng, blob)]
    elif kind == "bit-flip-header":
        columns = [_flip(rng, blob, 64)]
    elif kind == "seal-header":
        columns = [_edit_seal_header(rng, blob)]
    elif kind == "empty":
        columns = rng.choice([[b""], []])
    elif kind == "huge":
        columns = [blob + bytes(rng.randrange(1, 2**20))]
    elif kind == "huge-count":
        head = 4 + struct.calcsize(">BIII")
        columns = [
            blob[:4]
            + struct.pack(
                ">BIII", 1, c * Q, rng.choice([0, 2, 2**31]), rng.choice([0, 5, 2**32 - 1])
            )
            + blob[head:]
        ]
    elif kind == "other-client":
        columns = [w.columns[(c + 1) % N][0]]
    elif kind == "other-client-reindexed":  # a replay of another client's ciphertexts
        columns = [_upload(w.columns[(c + 1) % N][0], index=c * Q)]
    elif kind == "other-key":
        columns = [w.foreign[c][0]]
    elif kind == "resent":  # the same summary encrypted again (a retry): genuine
        columns = encrypt_summary(w.ctx, w.layout, c, w.u[c])
    elif kind == "levels-swapped":
        up = InnerProductUpload.deserialize(blob)
        columns = [
            _upload(blob, packed=up.broadcast[:1], broadcast=[*up.packed, *up.broadcast[1:]])
        ]
    elif kind in ("scale", "scale-last-bits"):  # the last: SEAL's sums refuse it, unnamed
        up = InnerProductUpload.deserialize(blob)
        scale = rng.choice([2.0**20, 2.0**41, 2.0**59, 1.0, float("nan")])
        scale = LAST_BITS_SCALE if kind == "scale-last-bits" else scale
        columns = [_upload(blob, packed=[_rescaled(w.server_ctx, up.packed[0], scale)])]
    elif kind == "parameters":
        up = InnerProductUpload.deserialize(blob)
        columns = [_upload(blob, packed=[_other_parameters(rng)] * len(up.packed))]
    elif kind == "count":
        columns = rng.choice([[], [blob, blob]])
    elif kind == "not-bytes":
        columns = rng.choice([None, [None], [1], ["x"], blob])
    elif kind == "transparent":  # all-zero polynomials: SEAL's products refuse it, unnamed
        up = InnerProductUpload.deserialize(blob)
        if rng.random() < 0.5:
            columns = [_upload(blob, packed=[_transparent(w.server_ctx, up.packed[0])])]
        else:
            zero = _transparent(w.server_ctx, up.broadcast[-1])
            columns = [_upload(blob, broadcast=[*up.broadcast[:-1], zero])]
    else:
        raise AssertionError(kind)
    sent = {k: w.columns[k] for k in range(N)}
    sent[c] = columns
    try:
        uploads = {k: parse_upload(w.layout, k, Q, sent[k]) for k in range(N)}
    except SecureRelatednessError as err:
        assert f"client {c}" in str(err), err
        return "refused: upload", str(err)
    try:
        rows, vectors = gram_rows(w.server_ctx, w.layout, N, Q, uploads)
    except InvalidUploadsError as err:
        assert set(err.invalid) == {c}, err
        return "refused: ciphertexts", str(err)
    try:
        gram = decrypt_rows(w.ctx, w.layout, rows, vectors)
    except RowValuesError as err:
        # garbage decrypts to values beyond every bound, in no telling which entries (the
        # products wrap modulo q), so no client can be named from them; a relocated
        # ciphertext breaks the Gram matrix's symmetry
        assert "beyond the" in str(err) or "not rows of one Gram matrix" in str(err), err
        # each client's rows computed alone name the client whose ciphertexts are garbage; a
        # relocated one passes alone, and every client is named as possibly at fault
        alone, order = isolated_rows(w.server_ctx, w.layout, N, Q, uploads)
        blame = blame_uploads(w.ctx, w.layout, alone, order, Q, str(err))
        assert blame.clients == ([c] if blame.certain else list(range(N))), blame
        assert blame.certain or kind == "other-client-reindexed", blame
        return "refused: decryption, blamed", str(blame)
    assert float((gram - w.gram).abs().max()) < 1e-4, kind
    return "genuine", ""


def rows_case(w: World, rng: random.Random, kind: str) -> tuple[str, str]:
    """The server's encrypted Gram rows mutated on their way to the key holder."""
    rows: Any = list(w.rows)
    k = rng.randrange(len(rows))
    data = [EncryptedRow.deserialize(r).data for r in w.rows]
    if kind == "truncated":
        rows[k] = rows[k][: rng.randrange(len(rows[k]))]
    elif kind == "bit-flip":
        rows[k] = _flip(rng, rows[k])
    elif kind == "bit-flip-header":
        rows[k] = _flip(rng, rows[k], 40)
    elif kind == "swapped":
        rows[0], rows[1] = rows[1], rows[0]
    elif kind == "dropped":
        rows.pop(k)
    elif kind == "repeated":
        rows.append(rows[k])
    elif kind == "other-key":
        rows[k] = w.foreign_rows[k]
    elif kind == "upload-as-row":  # a client's ciphertext presented for decryption
        up = w.uploads[k][0]
        rows[k] = EncryptedRow(k, rng.choice([up.packed[0], up.broadcast[0]])).serialize()
    elif kind == "scale":
        scale = rng.choice([2.0**20, 2.0**39, 2.0**41, 2.0**59, 1.0])
        rows[k] = EncryptedRow(k, _rescaled(w.ctx, data[k], scale)).serialize()
    elif kind == "other-row-data":
        rows[k] = EncryptedRow(k, data[(k + 1) % N]).serialize()
    elif kind == "zero-row":
        eng = ckks._engine(w.server_ctx)
        ct = eng.new_ciphertext()
        eng.encryptor("public").encrypt_zero(eng.parms_by_level[0], ct)
        ct.scale = eng.scale * eng.scale / eng.rescale_prime[eng.top_level - 1]
        rows[k] = EncryptedRow(k, ckks._save(ct)).serialize()
    elif kind == "huge":
        rows[k] = rows[k] + bytes(rng.randrange(1, 2**20))
    elif kind == "empty":
        rows = []
    elif kind == "not-a-list":
        rows = rng.choice([None, b"x", w.rows[0], 3, [None]])
    elif kind == "transparent":
        rows[k] = EncryptedRow(k, _transparent(w.ctx, data[k])).serialize()
    else:
        raise AssertionError(kind)
    try:
        gram = decrypt_rows(w.ctx, w.layout, rows, w.vectors)
    except SecureRelatednessError as err:
        return "refused: decryption", str(err)
    assert float((gram - w.gram).abs().max()) < 1e-4, kind
    return "genuine", ""


def context_case(w: World, rng: random.Random, kind: str) -> tuple[str, str]:
    """The key holder's public context mutated on its way to the server."""
    blob = w.pub
    if kind == "truncated":
        blob = blob[: rng.randrange(len(blob))]
    elif kind == "bit-flip":
        blob = _flip(rng, blob)
    elif kind == "bit-flip-header":
        blob = _flip(rng, blob, 200)
    elif kind == "with-secret-key":
        blob = w.ctx.serialize(save_secret_key=True)
    elif kind == "no-galois-keys":
        blob = public_context_bytes(w.ctx, galois_keys=False)
    elif kind == "parameters":
        degree, bits = rng.choice(
            [
                (4096, [40, 20, 40]),
                (16384, [60, 40, 40, 60]),
                (8192, [60, 40, 60]),
                (8192, [60, 40, 40, 60]),
            ]
        )
        other = ts.context(
            ts.SCHEME_TYPE.CKKS, poly_modulus_degree=degree, coeff_mod_bit_sizes=bits
        )
        other.global_scale = rng.choice([2.0**40, 2.0**20]) if bits[1] == 40 else 2.0**20
        other.generate_galois_keys()
        blob = other.serialize(save_secret_key=False)
    elif kind == "bfv":
        blob = ts.context(
            ts.SCHEME_TYPE.BFV, poly_modulus_degree=8192, plain_modulus=1032193
        ).serialize(save_secret_key=False)
    elif kind == "garbage":
        blob = rng.randbytes(rng.randrange(0, 5000))
    elif kind == "other-key":
        blob = w.other_pub
    else:
        raise AssertionError(kind)
    try:
        server_ctx = open_server_context(blob)
    except SecureRelatednessError as err:
        return "refused: context", str(err)
    try:
        rows, vectors = gram_rows(server_ctx, w.layout, N, Q, w.uploads)
    except SecureRelatednessError as err:  # InvalidUploadsError included
        return "refused: ciphertexts", str(err)
    try:
        gram = decrypt_rows(w.ctx, w.layout, rows, vectors)
    except SecureRelatednessError as err:
        return "refused: decryption", str(err)
    assert float((gram - w.gram).abs().max()) < 1e-4, kind
    return "genuine", ""


def sealed_case(w: World, rng: random.Random, kind: str) -> tuple[str, str]:
    """Client ``c``'s sealed secret context mutated on its way from the server."""
    c = rng.randrange(N)
    blob: Any = w.sealed[w.ids[c].party_id]
    if kind == "truncated":
        blob = blob[: rng.randrange(len(blob))]
    elif kind == "bit-flip":
        blob = _flip(rng, blob)
    elif kind == "other-client":
        blob = w.sealed[w.ids[(c + 1) % N].party_id]
    elif kind == "empty":
        blob = b""
    elif kind == "not-bytes":
        blob = rng.choice([None, "x", 3])
    else:
        raise AssertionError(kind)
    try:
        opened = open_keys(blob, w.ids[c])
    except SecureRelatednessError as err:
        assert w.ids[c].party_id in str(err), err
        return "refused: sealed context", str(err)
    assert opened.serialize(save_secret_key=True) == w.ctx.serialize(save_secret_key=True)
    return "genuine", ""


def _vector(blob: bytes, edit: Callable[[list[bytes]], None], level: int | None = None) -> bytes:
    v = EncryptedVector.deserialize(blob)
    parts = list(v.part_bytes())
    edit(parts)
    return EncryptedVector(
        length=v.length, level=v.level if level is None else level, parts=parts
    ).serialize()


def propagation_case(w: World, rng: random.Random, kind: str) -> tuple[str, str]:
    """Client ``j``'s encrypted model row (up) or its encrypted result (down) mutated."""
    j, side = rng.randrange(N), rng.choice(["up", "down"])
    up, down = list(w.prop_up), list(w.prop_down)
    msgs = up if side == "up" else down
    blob = msgs[j]
    client = w.prop_client
    if kind == "truncated":
        msgs[j] = blob[: rng.randrange(len(blob))]
    elif kind == "bit-flip":
        msgs[j] = _flip(rng, blob)
    elif kind == "bit-flip-header":
        msgs[j] = _flip(rng, blob, 40)
    elif kind == "other-key":
        msgs[j] = (w.foreign_up if side == "up" else w.foreign_down)[j]
    elif kind == "empty":
        msgs[j] = b""
    elif kind == "huge":
        msgs[j] = blob + bytes(rng.randrange(1, 2**20))
    elif kind == "header":
        head = bytearray(blob)
        head[4:18] = struct.pack(
            ">BQBI",
            rng.choice([1, 2]),
            rng.choice([0, 1, 4500, 2**40, 2**63]),
            rng.choice([0, 1, 2, 255]),
            rng.choice([0, 1, 2, 2**32 - 1]),
        )
        msgs[j] = bytes(head)
    elif kind in ("scale", "scale-last-bits"):
        scale = rng.choice([2.0**20, 2.0**41, 2.0**59])
        scale = LAST_BITS_SCALE if kind == "scale-last-bits" else scale

        def rescale(parts: list[bytes]) -> None:
            parts[0] = _rescaled(client.keys.ctx, parts[0], scale)

        msgs[j] = _vector(blob, rescale)
    elif kind == "level":
        msgs[j] = _vector(blob, lambda parts: None, level=rng.choice([0, 1, 2, 7]))
    elif kind == "part-in-seal-header-size":

        def trailing(parts: list[bytes]) -> None:
            parts[0] = parts[0] + b"\x00" * rng.randrange(1, 64)

        msgs[j] = _vector(blob, trailing)
    elif kind == "transparent":

        def zero(parts: list[bytes]) -> None:
            parts[-1] = _transparent(client.keys.ctx, parts[-1])

        msgs[j] = _vector(blob, zero)
    else:
        raise AssertionError(kind)
    try:
        results = w.prop_server.combine(w.weights, up, P) if side == "up" else down
    except EncryptedPropagationError as err:
        assert f"client {j}" in str(err), err
        return "refused: upload", str(err)
    try:
        phi = torch.stack([client.decrypt(results[i], P) for i in range(N)])
    except EncryptedPropagationError as err:
        return "refused: result", str(err)
    assert float((phi - w.phi).abs().max()) < 1e-6, kind
    return "genuine", ""


FLOWS: dict[str, tuple[Callable[[World, random.Random, str], tuple[str, str]], list[str], int]] = {
    "upload": (
        upload_case,
        [
            "truncated",
            "bit-flip",
            "bit-flip-header",
            "seal-header",
            "empty",
            "huge",
            "huge-count",
            "other-client",
            "other-client-reindexed",
            "other-key",
            "resent",
            "levels-swapped",
            "scale",
            "scale-last-bits",
            "parameters",
            "count",
            "not-bytes",
            "transparent",
        ],
        108,
    ),
    "rows": (
        rows_case,
        [
            "truncated",
            "bit-flip",
            "bit-flip-header",
            "swapped",
            "dropped",
            "repeated",
            "other-key",
            "upload-as-row",
            "scale",
            "other-row-data",
            "zero-row",
            "huge",
            "empty",
            "not-a-list",
            "transparent",
        ],
        60,
    ),
    "context": (
        context_case,
        [
            "truncated",
            "bit-flip",
            "bit-flip-header",
            "with-secret-key",
            "no-galois-keys",
            "parameters",
            "bfv",
            "garbage",
            "other-key",
        ],
        27,
    ),
    "sealed": (sealed_case, ["truncated", "bit-flip", "other-client", "empty", "not-bytes"], 20),
    "propagation": (
        propagation_case,
        [
            "truncated",
            "bit-flip",
            "bit-flip-header",
            "other-key",
            "empty",
            "huge",
            "header",
            "scale",
            "scale-last-bits",
            "level",
            "part-in-seal-header-size",
            "transparent",
        ],
        60,
    ),
}

# Mutations that must never decrypt to a result: garbage, another key, other parameters, a
# replayed or relocated ciphertext (the rest may be harmless, e.g. a bit flip in an unused
# byte, and then must give the genuine result).
MUST_REFUSE = {
    "upload": {
        "truncated",
        "empty",
        "huge",
        "huge-count",
        "other-client",
        "other-client-reindexed",
        "other-key",
        "levels-swapped",
        "scale",
        "scale-last-bits",
        "parameters",
        "count",
        "not-bytes",
        "transparent",
    },
    "rows": {
        "truncated",
        "swapped",
        "dropped",
        "repeated",
        "other-key",
        "upload-as-row",
        "scale",
        "other-row-data",
        "zero-row",
        "huge",
        "empty",
        "not-a-list",
        "transparent",
    },
    "context": {
        "truncated",
        "with-secret-key",
        "no-galois-keys",
        "parameters",
        "bfv",
        "garbage",
        "other-key",
    },
    "sealed": {"truncated", "bit-flip", "other-client", "empty", "not-bytes"},
    "propagation": {
        "truncated",
        "other-key",
        "empty",
        "huge",
        "scale",
        "scale-last-bits",
        "part-in-seal-header-size",
        "transparent",
    },
}


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_mutated_encrypted_messages_give_the_genuine_result_or_a_named_refusal(
    world: World, flow: str
) -> None:
    make, kinds, cases = FLOWS[flow]
    rng = random.Random(f"{SEED}-{flow}")
    outcomes: Counter[tuple[str, str]] = Counter()
    for n in range(cases):
        kind = kinds[n % len(kinds)]
        outcome, why = make(world, rng, kind)
        assert not (kind in MUST_REFUSE[flow] and outcome == "genuine"), (flow, kind)
        assert outcome == "genuine" or why, (flow, kind)
        outcomes[kind, outcome] += 1
    assert sum(outcomes.values()) == cases
    refused = sum(n for (_, o), n in outcomes.items() if o != "genuine")
    assert refused > cases // 2, outcomes


class _UnderAnotherKey(UnaccountedReleases):
    """Client ``client``'s upload released encrypted under another key holder's context: an
    authentic upload (in process nothing is signed) of well-formed ciphertexts."""

    def __init__(self, client: int, layout: Any) -> None:
        self.client, self.layout, self.other = client, layout, create_keys()

    def release_upload(self, i: int, rnd: int, kind: str, payload: Any, **stages: Any) -> Any:
        if i == self.client:
            stages["encrypt"] = summary_encryption(self.other, self.layout, i)
        return super().release_upload(i, rnd, kind, payload, **stages)


@pytest.mark.parametrize("client", [0, 2])
def test_a_summary_under_another_key_is_refused_in_process_naming_its_client(
    world: World, client: int
) -> None:
    """The in-process runtime refused such an upload at decryption as the key holder's
    "encrypted rows refused: decrypted inner products reach |x| = ...", naming no client; it
    names the client (the key holder itself too) and releases nothing."""
    u = torch.stack(world.u)
    ceremony = run_key_ceremony(N, 0)
    with pytest.raises(CorruptUploadsError) as refused:
        encrypted_overlaps(u, 0, ceremony=ceremony,
                           releases=_UnderAnotherKey(client, world.layout))
    assert refused.value.clients == [client] and refused.value.certain
    assert str(refused.value).startswith(
        f"client {client}'s encrypted summary decrypts to values no honest upload gives")
    assert "beyond the 65536" in str(refused.value)
