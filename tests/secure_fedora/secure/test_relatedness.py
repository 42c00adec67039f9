import numpy as np
import pytest
import torch

from privacy import ckks
from privacy.ckks import EncryptedRow, InnerProductUpload, context_to_bytes, public_context_bytes
from privacy.identity import Identity
from secure_fedora.secure.relatedness import (
    InvalidUploadsError,
    RowValuesError,
    SecureRelatednessError,
    ceremony_summary,
    decrypt_rows,
    encrypt_summary,
    encrypted_newcomer_overlaps,
    encrypted_overlaps,
    gram_rows,
    open_keys,
    open_server_context,
    open_signed_keys,
    overlaps_from_rows,
    parse_upload,
    plan_layout,
    public_keys,
    run_key_ceremony,
    seal_keys,
    sign_sealed_keys,
)

N, D = 7, 794


def _summaries(n, q, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, D, q, generator=g, dtype=torch.float64)).Q


@pytest.fixture(scope="module")
def ceremony():
    identities = [Identity.generate(f"client-{i:03d}") for i in range(N)]
    return run_key_ceremony(N, key_holder=2, identities=identities)


def test_ceremony_roles(ceremony):
    assert ceremony.server_context.is_public()
    assert not ceremony.server_context.has_secret_key()
    assert ceremony.server_context.has_galois_keys()
    assert ceremony.client_context.has_secret_key()
    assert not ceremony.client_context.has_galois_keys()
    assert not ceremony.client_public_context.has_secret_key()
    assert len(ceremony.sealed_context_bytes) == N
    summary = ceremony_summary(ceremony)
    assert summary["server_context_bytes"] > summary["sealed_context_bytes_per_client"] > 0


@pytest.mark.parametrize("q", [1, 2])
def test_encrypted_overlaps_match_plaintext_einsum(ceremony, q):
    u = _summaries(N, q, seed=q)
    res = encrypted_overlaps(u, key_holder=2, ceremony=ceremony)
    expected = torch.einsum("idq,jdr->ijqr", u, u)
    assert res.overlaps.shape == (N, N, q, q)
    assert (res.overlaps - expected).abs().max().item() < 1e-4
    # Similarities derive from singular values of each block: they agree too.
    cos_enc = torch.linalg.svdvals(res.overlaps).clamp(0, 1).sum(-1)
    cos_plain = torch.linalg.svdvals(expected).clamp(0, 1).sum(-1)
    off = ~torch.eye(N, dtype=torch.bool)
    sim_enc, sim_plain = torch.exp(10 * cos_enc[off]), torch.exp(10 * cos_plain[off])
    assert ((sim_enc - sim_plain).abs() / sim_plain).max().item() < 1e-3


def test_traffic_accounting(ceremony):
    u = _summaries(N, 1, seed=7)
    res = encrypted_overlaps(u, key_holder=2, ceremony=ceremony)
    assert len(res.client_bytes_sent) == N
    assert all(b > 100_000 for b in res.client_bytes_sent)
    assert res.server_bytes_received == sum(res.client_bytes_sent)
    assert res.key_holder_bytes_received > 0
    assert res.released_bytes == N * N * 8
    phases = ("clients_encrypt", "server_compute", "key_holder_decrypt", "total")
    assert set(res.timings) == {f"{p}{s}" for p in phases for s in ("_s", "_cpu_s")}
    assert res.timings["total_cpu_s"] > 0
    # Public-key client encryption: same result, full-size (unseeded) ciphertexts.
    pub = encrypted_overlaps(u, key_holder=2, ceremony=ceremony, client_encryption="public")
    assert (pub.overlaps - res.overlaps).abs().max().item() < 1e-4
    assert min(pub.client_bytes_sent) > 1.5 * max(res.client_bytes_sent)


def test_noised_summaries_work(ceremony):
    """Noised + encrypted: non-orthonormal summaries are handled exactly the same way."""
    u = _summaries(N, 1, seed=9) + 0.01 * torch.randn(N, D, 1, dtype=torch.float64)
    res = encrypted_overlaps(u, key_holder=2, ceremony=ceremony)
    assert (res.overlaps - torch.einsum("idq,jdr->ijqr", u, u)).abs().max().item() < 1e-4


def test_newcomer_overlaps(ceremony):
    u = _summaries(N - 1, 2, seed=3)  # N - 1 existing clients, the ceremony covers N
    new = _summaries(1, 2, seed=4)[0]
    res = encrypted_newcomer_overlaps(u, new, key_holder=2, ceremony=ceremony)
    expected = torch.einsum("dq,jdr->jqr", new, u)
    assert res.overlaps.shape == (N - 1, 2, 2)
    assert (res.overlaps - expected).abs().max().item() < 1e-4
    # Only the newcomer's two rows (of 2N) were computed and sent to the key holder.
    full = encrypted_overlaps(torch.cat([u, new[None]]), key_holder=2, ceremony=ceremony)
    assert res.key_holder_bytes_received * N < full.key_holder_bytes_received * 1.01


def test_input_errors(ceremony):
    u = _summaries(N, 1, seed=1)
    with pytest.raises(SecureRelatednessError, match="key_holder"):
        encrypted_overlaps(u, key_holder=N, ceremony=ceremony)
    with pytest.raises(SecureRelatednessError, match="key holder is client 2"):
        encrypted_overlaps(u, key_holder=0, ceremony=ceremony)
    with pytest.raises(SecureRelatednessError, match="run for 7 clients"):
        encrypted_overlaps(u[:4], key_holder=2, ceremony=ceremony)
    with pytest.raises(SecureRelatednessError, match=r"\(N, d, q\)"):
        encrypted_overlaps(u[:, :, 0], key_holder=2, ceremony=ceremony)
    bad = u.clone()
    bad[1, 5, 0] = float("inf")
    with pytest.raises(SecureRelatednessError, match="NaN or infinite"):
        encrypted_overlaps(bad, key_holder=2, ceremony=ceremony)
    with pytest.raises(SecureRelatednessError, match="client 3: .*MAX_VECTOR_NORM"):
        big = u.clone()
        big[3] *= 1000
        encrypted_overlaps(big, key_holder=2, ceremony=ceremony)
    with pytest.raises(SecureRelatednessError, match="client_encryption"):
        encrypted_overlaps(u, key_holder=2, ceremony=ceremony, client_encryption="none")  # type: ignore[arg-type]
    with pytest.raises(SecureRelatednessError, match="new_summary"):
        encrypted_newcomer_overlaps(u, torch.zeros(D, 2, dtype=torch.float64), key_holder=2)
    with pytest.raises(SecureRelatednessError, match="identities"):
        run_key_ceremony(3, identities=[Identity.generate("client-000")])


# ----------------------------------------------------------------- the protocol's steps
# Both runtimes run these functions (the in-process driver above, the Flower apps in each
# party's process), so every check of the protocol is tested here once.

SMALL_D = 60


@pytest.fixture(scope="module")
def steps(ceremony):
    """A layout of N clients x q = 1 over d = 60, the summaries and every client's uploads."""
    layout = plan_layout(N, 1, SMALL_D)
    g = torch.Generator().manual_seed(11)
    u = torch.linalg.qr(torch.randn(N, SMALL_D, 1, generator=g, dtype=torch.float64)).Q
    columns = [encrypt_summary(ceremony.client_context, layout, i, u[i]) for i in range(N)]
    uploads = {i: parse_upload(layout, i, 1, columns[i]) for i in range(N)}
    return layout, u, columns, uploads


def test_step_keys_refuse_a_missing_key_holder_a_foreign_blob_and_a_server_context_that_decrypts(ceremony):
    secret = ceremony.key_holder_context
    a, b = Identity.generate("client-000"), Identity.generate("client-001")
    recipients = {i.party_id: i.agreement_key.public_key() for i in (a, b)}
    with pytest.raises(SecureRelatednessError, match="key holder client-002 is not among the recipients"):
        seal_keys(secret, recipients, "client-002")
    sealed = seal_keys(secret, recipients, "client-000")
    assert open_keys(sealed["client-001"], b).has_secret_key()
    with pytest.raises(SecureRelatednessError, match="client-001"):
        open_keys(sealed["client-000"], b)  # sealed to someone else
    public = public_keys(secret)
    server = open_server_context(public)
    assert not server.has_secret_key() and server.has_galois_keys() and server.has_relin_keys()
    with pytest.raises(SecureRelatednessError, match="secret key"):
        open_server_context(context_to_bytes(secret, include_secret_key=True))
    with pytest.raises(SecureRelatednessError, match="refused"):
        open_server_context(public[: len(public) // 2])
    with pytest.raises(SecureRelatednessError, match="lacks Galois"):
        open_server_context(public_context_bytes(secret, galois_keys=False))
    with pytest.raises(SecureRelatednessError, match="cannot publish"):
        public_keys(ceremony.client_context)  # a client's copy carries no evaluation keys


def test_signed_keys_open_only_as_the_key_holder_signed_them(ceremony):
    """A client opens a sealed context only with the key holder's signature binding it to the
    run (id, config hash), the client and the public context; a context anyone else sealed to
    the client's real key, or a genuine one re-bound, is refused naming the key holder."""
    secret = ceremony.key_holder_context
    holder, b = Identity.generate("client-000"), Identity.generate("client-001")
    recipients = {i.party_id: i.agreement_key.public_key() for i in (holder, b)}
    digest = "a" * 64
    sealed = seal_keys(secret, recipients, "client-000")
    signed = sign_sealed_keys(holder, sealed, digest, run_id=7, config_hash="c" * 64)
    run = {"run_id": 7, "config_hash": "c" * 64}
    assert open_signed_keys(
        sealed["client-001"], signed["client-001"], digest, b, holder.public, **run
    ).has_secret_key()
    forger = Identity.generate("client-000")  # the server, claiming the key holder's id
    forged = seal_keys(secret, {"client-001": recipients["client-001"]}, "client-001")
    forged_sig = sign_sealed_keys(forger, forged, digest, **run)["client-001"]
    refused = r"not signed by the key holder client-000 for run \d, client-001"
    for blob, sig, pub, where in [
        (forged["client-001"], forged_sig, digest, run),
        (forged["client-001"], signed["client-001"], digest, run),
        (forged["client-001"], None, digest, run),
        (sealed["client-001"], signed["client-000"], digest, run),
        (sealed["client-001"], signed["client-001"], "b" * 64, run),
        (sealed["client-001"], signed["client-001"], digest, {**run, "run_id": 8}),
        (sealed["client-001"], signed["client-001"], digest, {**run, "config_hash": "d" * 64}),
        (sealed["client-001"], signed["client-001"], None, run),
    ]:
        with pytest.raises(SecureRelatednessError, match=refused):
            open_signed_keys(blob, sig, pub, b, holder.public, **where)


def test_step_layout_and_client_encryption_errors(ceremony, steps):
    layout, u, _, _ = steps
    assert (layout.num_vectors, layout.dim) == (N, SMALL_D)
    with pytest.raises(SecureRelatednessError, match="q must be a positive integer"):
        plan_layout(N, 0, SMALL_D)
    with pytest.raises(SecureRelatednessError, match="no CKKS layout"):
        plan_layout(5000, 1, SMALL_D)
    with pytest.raises(SecureRelatednessError, match=r"client 1: summary has shape \(61, 1\)"):
        encrypt_summary(ceremony.client_context, layout, 1, torch.zeros(SMALL_D + 1, 1))
    with pytest.raises(SecureRelatednessError, match="client 7 .* no place"):
        encrypt_summary(ceremony.client_context, layout, N, u[0])
    with pytest.raises(SecureRelatednessError, match="client True .* no place"):  # not client 1
        encrypt_summary(ceremony.client_context, layout, True, u[0])
    with pytest.raises(SecureRelatednessError, match="client 0: vector 0 holds NaN"):
        encrypt_summary(ceremony.client_context, layout, 0, torch.full((SMALL_D, 1), float("nan")))


def test_step_parse_upload_refuses_malformed_columns(ceremony, steps):
    layout, _, columns, uploads = steps
    cases = [
        (None, "client 1 sent no list"),
        (columns[1] * 2, "2 encrypted columns, expected 1"),
        (["text"], "column 0 is not bytes"),
        ([b"not a ciphertext"], "column 0: not a serialized InnerProductUpload"),
        (columns[0], "for vector 0, expected 1"),
    ]
    good = uploads[1][0]
    extra = InnerProductUpload(1, good.packed * 2, good.broadcast).serialize()
    cases.append(([extra], r"has 2 \+ 1 ciphertexts, the layout needs 1 \+ 1"))
    for sent, message in cases:
        with pytest.raises(SecureRelatednessError, match=message):
            parse_upload(layout, 1, 1, sent)


def test_step_gram_rows_with_absent_and_unusable_clients(ceremony, steps):
    layout, u, _, uploads = steps
    server, secret = ceremony.server_context, ceremony.key_holder_context
    expected = torch.einsum("idq,jdr->ijqr", u, u)
    rows, vectors = gram_rows(server, layout, N, 1, uploads)
    assert vectors == list(range(N))
    got = overlaps_from_rows(decrypt_rows(secret, layout, rows, vectors), vectors, N, 1)
    assert (got - expected).abs().max().item() < 1e-4
    # An absent client: an encryption of zero stands in for it, its overlaps are exactly zero.
    present = {i: ups for i, ups in uploads.items() if i != 3}
    rows, vectors = gram_rows(server, layout, N, 1, present, rows=[0, 3, 5])
    assert vectors == [0, 5]
    got = overlaps_from_rows(decrypt_rows(secret, layout, rows, vectors), vectors, N, 1, excluded=[3])
    assert got[3].abs().sum() == 0 and got[:, 3].abs().sum() == 0
    assert (got[[0, 5]][:, [0, 1, 2, 4, 5, 6]] - expected[[0, 5]][:, [0, 1, 2, 4, 5, 6]]).abs().max() < 1e-4
    # Authentic but unusable ciphertexts: every culprit is named, with its reason.
    bad = dict(uploads)
    up2, up4 = uploads[2][0], uploads[4][0]
    bad[2] = [InnerProductUpload(2, (up2.packed[0][:500],), up2.broadcast)]
    bad[4] = [InnerProductUpload(4, (up4.broadcast[0],), up4.broadcast)]  # one level too low
    with pytest.raises(InvalidUploadsError, match="client 2: .*client 4: .*level") as caught:
        gram_rows(server, layout, N, 1, bad)
    assert sorted(caught.value.invalid) == [2, 4]
    with pytest.raises(SecureRelatednessError, match="holds a secret key"):
        gram_rows(secret, layout, N, 1, uploads)
    with pytest.raises(SecureRelatednessError, match="no client's encrypted summary"):
        gram_rows(server, layout, N, 1, {})


def test_step_decrypt_rows_takes_exactly_the_requested_rows(ceremony, steps):
    layout, _, _, uploads = steps
    secret = ceremony.key_holder_context
    rows, vectors = gram_rows(ceremony.server_context, layout, N, 1, uploads)
    upload_as_row = EncryptedRow(0, uploads[0][0].broadcast[0]).serialize()
    cases = [
        (ceremony.server_context, rows, "cannot decrypt"),
        (secret, "rows", "not a list of bytes"),
        (secret, rows[:-1], f"{N - 1} encrypted rows, expected {N}"),
        (secret, list(reversed(rows)), "not the requested"),
        (secret, [b"garbage", *rows[1:]], "not a serialized EncryptedRow"),
        (secret, [upload_as_row, *rows[1:]], "level"),  # a client's upload is never decrypted
    ]
    for ctx, sent, message in cases:
        with pytest.raises(SecureRelatednessError, match=message):
            decrypt_rows(ctx, layout, sent, vectors)
    gram = decrypt_rows(secret, layout, rows, vectors)
    assert gram.shape == (N, N) and gram.dtype == torch.float64
    assert torch.equal(gram, torch.round(gram * 2**16) / 2**16)  # released on the 2^-16 grid
    with pytest.raises(SecureRelatednessError, match="for 6 clients with q = 1"):
        overlaps_from_rows(gram, vectors, N - 1, 1)  # a wrong client count


def test_overlaps_refuse_non_finite_decrypted_rows():
    """NaN decrypted rows passed through into the overlaps (and the graph)."""
    with pytest.raises(SecureRelatednessError, match="NaN or infinite"):
        overlaps_from_rows(torch.full((3, 3), float("nan"), dtype=torch.float64), [0, 1, 2], 3, 1)


def test_a_client_cannot_move_two_honest_clients_overlap_through_the_lane_masks(ceremony, steps):
    """The server keeps each client's lane of its packed ciphertext with a plaintext mask whose
    CKKS encoding is off by about 2^-39 in the other lanes: a client that fills another
    client's lane with values of 2^27 moves every row's overlap with that client by about
    2e-4 (20 times the stated accuracy) and only that row's, so the rows no longer agree as
    one symmetric Gram matrix. They were released within the former fixed tolerance 2^-10."""
    layout, u, columns, _ = steps
    secret = ceremony.client_context  # every client holds the secret key
    eng = ckks._engine(secret)
    G, P = layout.lanes, layout.positions
    slots = np.zeros(layout.slot_count, dtype=np.complex128)
    slots[np.arange(P) * G + 2] = np.conj(layout.chunk_values(u[2, :, 0].numpy())[0])
    rng = np.random.default_rng(0)
    slots[np.arange(P) * G + 0] = 2.0**27 * (rng.standard_normal(P) + 1j * rng.standard_normal(P))
    honest = InnerProductUpload.deserialize(columns[2][0])
    packed = eng.encrypt_to_bytes(slots, eng.top_level, "symmetric")
    sent = list(columns)
    sent[2] = [InnerProductUpload(2, (packed,), honest.broadcast).serialize()]
    uploads = {i: parse_upload(layout, i, 1, sent[i]) for i in range(N)}
    rows, vectors = gram_rows(ceremony.server_context, layout, N, 1, uploads)
    with pytest.raises(RowValuesError, match="disagree on <u_"):
        decrypt_rows(ceremony.key_holder_context, layout, rows, vectors)
