import pytest
import torch

from privacy.identity import Identity
from secure_fedora.secure.relatedness import (
    SecureRelatednessError,
    ceremony_summary,
    encrypted_newcomer_overlaps,
    encrypted_overlaps,
    run_key_ceremony,
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
