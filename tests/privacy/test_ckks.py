import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy import ckks
from privacy.ckks import (
    CkksError,
    CkksParameters,
    EncryptedRow,
    EncryptedVector,
    InnerProductLayout,
    InnerProductUpload,
    context_from_bytes,
    context_to_bytes,
    decrypt_inner_product_rows,
    decrypt_vector,
    encrypt_for_inner_products,
    encrypt_rows,
    encrypt_vector,
    inner_product_rows,
    open_secret_context,
    public_context,
    public_context_bytes,
    seal_secret_context,
    weighted_sums,
)

D = 794


@pytest.fixture(scope="module")
def secret():
    return ckks.create_secret_context(galois_keys=True)


@pytest.fixture(scope="module")
def server_bytes(secret):
    return public_context_bytes(secret, galois_keys=True)


@pytest.fixture(scope="module")
def server(server_bytes):
    """What the server receives: the serialized public context, parsed."""
    return context_from_bytes(server_bytes, expect_secret_key=False)


@pytest.fixture(scope="module")
def plain_server(secret):
    return public_context(secret, galois_keys=False, relin_keys=False)


def _orthonormal(n, d, q, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, d, q, generator=g, dtype=torch.float64)).Q


def _gram(secret, server, vecs, **kw):
    lay = InnerProductLayout.plan(vecs.shape[0], vecs.shape[1])
    ups = [encrypt_for_inner_products(secret, lay, v, vecs[v], **kw) for v in range(vecs.shape[0])]
    rows = inner_product_rows(server, lay, ups)
    return lay, ups, rows, decrypt_inner_product_rows(secret, lay, rows)


# ---- contexts and key ceremony ------------------------------------------------------------


def test_server_context_is_public_and_cannot_decrypt(secret, server, plain_server):
    assert server.is_public() and not server.has_secret_key()
    assert server.has_galois_keys() and server.has_relin_keys()
    assert not plain_server.has_galois_keys()
    # TenSEAL itself refuses to decrypt with the server's context.
    vec = ts.ckks_vector(server, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    with pytest.raises(ValueError):
        server.secret_key()
    # And so does our API, on both kinds of results.
    enc = encrypt_vector(secret, torch.arange(5, dtype=torch.float64))
    with pytest.raises(CkksError, match="cannot decrypt"):
        decrypt_vector(server, enc)
    vecs = _orthonormal(3, D, 1, 0)[:, :, 0]
    lay, _, rows, _ = _gram(secret, server, vecs)
    with pytest.raises(CkksError, match="cannot decrypt"):
        decrypt_inner_product_rows(server, lay, rows)


def test_public_context_sizes_galois_only_when_asked(server_bytes, plain_server):
    with_galois = len(server_bytes)
    without = len(context_to_bytes(plain_server, include_secret_key=False))
    assert with_galois > 10 * without
    assert without < 3_000_000


def test_sealed_secret_context_ceremony(secret):
    keys = {p: X25519PrivateKey.generate() for p in ("client-000", "client-001")}
    blobs = seal_secret_context(secret, {p: k.public_key() for p, k in keys.items()})
    x = torch.linspace(-1, 1, 10, dtype=torch.float64)
    enc = encrypt_vector(secret, x)
    for party, key in keys.items():
        ctx = open_secret_context(blobs[party], key, party)
        assert ctx.has_secret_key() and not ctx.has_galois_keys()
        assert torch.allclose(decrypt_vector(ctx, enc), x, atol=1e-6)
    # Wrong key, wrong party binding, tampering: all refused.
    with pytest.raises(CkksError, match="cannot be opened"):
        open_secret_context(blobs["client-000"], keys["client-001"], "client-000")
    with pytest.raises(CkksError, match="cannot be opened"):
        open_secret_context(blobs["client-000"], keys["client-000"], "client-001")
    tampered = bytearray(blobs["client-000"])
    tampered[-100] ^= 1
    with pytest.raises(CkksError, match="cannot be opened"):
        open_secret_context(bytes(tampered), keys["client-000"], "client-000")


def test_context_from_bytes_errors(secret, plain_server):
    with pytest.raises(CkksError, match="cannot parse"):
        context_from_bytes(b"garbage", expect_secret_key=False)
    with pytest.raises(CkksError, match="expected a secret context"):
        context_from_bytes(context_to_bytes(plain_server, include_secret_key=False), expect_secret_key=True)
    with pytest.raises(CkksError, match="holds a secret key"):
        context_from_bytes(context_to_bytes(secret, include_secret_key=True), expect_secret_key=False)
    other = ckks.create_secret_context(CkksParameters(4096, (40, 20, 40), 20), galois_keys=False)
    with pytest.raises(CkksError, match="poly_modulus_degree"):
        context_from_bytes(context_to_bytes(other, include_secret_key=True), expect_secret_key=True)
    with pytest.raises(CkksError, match="no secret key"):
        context_to_bytes(plain_server, include_secret_key=True)
    with pytest.raises(CkksError, match="no Galois keys"):
        public_context(ckks.create_secret_context(galois_keys=False), galois_keys=True)


# ---- encrypted inner products ---------------------------------------------------------------


def test_layout_plan():
    lay = InnerProductLayout.plan(100, D)
    assert (lay.lanes, lay.positions, lay.chunks, lay.packs) == (128, 32, 13, 1)
    assert lay.ciphertexts_per_vector == 14
    lay = InnerProductLayout.plan(36, D)
    assert (lay.lanes, lay.positions, lay.chunks) == (64, 64, 7)
    assert InnerProductLayout.plan(1, D).lanes == 1
    # More chunks than lanes: several compact ciphertexts per vector.
    lay = InnerProductLayout.plan(3, 70_000)
    assert lay.chunks > lay.lanes and lay.packs == -(-lay.chunks // lay.lanes)
    with pytest.raises(CkksError, match="at most 4096"):
        InnerProductLayout.plan(5000, D)
    with pytest.raises(CkksError):
        InnerProductLayout.plan(0, D)
    with pytest.raises(CkksError):
        InnerProductLayout.plan(3, 0)


@pytest.mark.parametrize("n,q", [(6, 1), (3, 2)])
def test_gram_equals_plaintext(secret, server, n, q):
    u = _orthonormal(n, D, q, seed=n + q)
    vecs = u.permute(0, 2, 1).reshape(n * q, D)
    _, _, rows, gram = _gram(secret, server, vecs)
    assert gram.shape == (n * q, n * q)
    assert (gram - vecs @ vecs.T).abs().max().item() < 1e-4
    assert [r.index for r in rows] == list(range(n * q))


def test_gram_unnormalized_and_public_key_encryption(secret, server):
    g = torch.Generator().manual_seed(5)
    vecs = torch.randn(5, 300, generator=g, dtype=torch.float64) * 0.3
    _, _, _, gram = _gram(secret, server, vecs, encryption="public")
    assert (gram - vecs @ vecs.T).abs().max().item() < 1e-4


def test_many_chunks_several_packs(secret, server):
    g = torch.Generator().manual_seed(6)
    vecs = torch.nn.functional.normalize(torch.randn(2, 20_000, generator=g, dtype=torch.float64), dim=1)
    lay, _, _, gram = _gram(secret, server, vecs)
    assert lay.packs > 1
    assert (gram - vecs @ vecs.T).abs().max().item() < 1e-4


def test_decrypted_row_holds_only_inner_products(secret, server):
    """Every slot of a row decrypts to the inner product of its lane: no partial sums, no cross terms."""
    vecs = _orthonormal(5, D, 1, 11)[:, :, 0]
    lay, _, rows, _ = _gram(secret, server, vecs)
    eng = ckks._engine(secret)
    truth = (vecs @ vecs.T).numpy()
    for row in rows:
        slots = eng.decrypt(eng.load(row.data, "row")).reshape(lay.positions, lay.lanes)
        expected = np.zeros(lay.lanes)
        expected[: lay.num_vectors] = truth[row.index]
        assert np.abs(slots.real - expected[None, :]).max() < 1e-4
        assert np.abs(slots.imag).max() < 1e-4


def test_selected_rows_only(secret, server):
    vecs = _orthonormal(4, D, 1, 3)[:, :, 0]
    lay = InnerProductLayout.plan(4, D)
    ups = [encrypt_for_inner_products(secret, lay, v, vecs[v]) for v in range(4)]
    rows = inner_product_rows(server, lay, ups, rows=[3])
    assert [r.index for r in rows] == [3]
    got = decrypt_inner_product_rows(secret, lay, rows)
    assert (got[0] - vecs @ vecs[3]).abs().max() < 1e-4


def test_release_rounding(secret, server):
    vecs = _orthonormal(2, D, 1, 4)[:, :, 0]
    lay = InnerProductLayout.plan(2, D)
    ups = [encrypt_for_inner_products(secret, lay, v, vecs[v]) for v in range(2)]
    rows = inner_product_rows(server, lay, ups)
    q = 2.0**-10
    got = decrypt_inner_product_rows(secret, lay, rows, release_quantum=q)
    assert torch.equal(got, torch.round(got / q) * q)
    raw = decrypt_inner_product_rows(secret, lay, rows, release_quantum=None)
    assert (raw - vecs @ vecs.T).abs().max() < 1e-5
    with pytest.raises(CkksError, match="release_quantum"):
        decrypt_inner_product_rows(secret, lay, rows, release_quantum=0.0)


def test_upload_and_row_wire_roundtrip(secret, server):
    vecs = _orthonormal(3, D, 1, 8)[:, :, 0]
    lay = InnerProductLayout.plan(3, D)
    ups = [InnerProductUpload.deserialize(
        encrypt_for_inner_products(secret, lay, v, vecs[v]).serialize()) for v in range(3)]
    rows = [EncryptedRow.deserialize(r.serialize()) for r in inner_product_rows(server, lay, ups)]
    got = decrypt_inner_product_rows(secret, lay, rows)
    assert (got - vecs @ vecs.T).abs().max() < 1e-4
    assert ups[0].nbytes == len(ups[0].serialize())
    with pytest.raises(CkksError, match="magic"):
        InnerProductUpload.deserialize(b"XXXX" + bytes(20))
    with pytest.raises(CkksError, match="truncated"):
        InnerProductUpload.deserialize(ups[0].serialize()[:-10])
    with pytest.raises(CkksError, match="magic"):
        EncryptedRow.deserialize(b"nope")


def test_server_rejects_bad_uploads(secret, server):
    vecs = _orthonormal(3, D, 1, 9)[:, :, 0]
    lay = InnerProductLayout.plan(3, D)
    ups = [encrypt_for_inner_products(secret, lay, v, vecs[v]) for v in range(3)]
    with pytest.raises(CkksError, match=r"missing uploads for vectors \[2\]"):
        inner_product_rows(server, lay, ups[:2])
    with pytest.raises(CkksError, match="two uploads for vector 1"):
        inner_product_rows(server, lay, [*ups, ups[1]])
    truncated = InnerProductUpload(1, (ups[1].packed[0][:-50],), ups[1].broadcast)
    with pytest.raises(CkksError, match="packed ciphertext 0 of vector 1: not a valid ciphertext"):
        inner_product_rows(server, lay, [ups[0], truncated, ups[2]])
    garbled = bytearray(ups[2].broadcast[0])
    garbled[:16] = bytes(16)
    bad = InnerProductUpload(2, ups[2].packed, (bytes(garbled),))
    with pytest.raises(CkksError, match="broadcast ciphertext 0 of vector 2"):
        inner_product_rows(server, lay, [ups[0], ups[1], bad])
    # Ciphertexts swapped between roles sit at the wrong level.
    swapped = InnerProductUpload(0, ups[0].broadcast, ups[0].packed)
    with pytest.raises(CkksError, match="vector 0: ciphertext at level 1, expected level 2"):
        inner_product_rows(server, lay, [swapped, ups[1], ups[2]])
    with pytest.raises(CkksError, match="row 7"):
        inner_product_rows(server, lay, ups, rows=[7])
    with pytest.raises(CkksError, match="Galois"):
        inner_product_rows(public_context(secret, galois_keys=False), lay, ups)


def test_client_input_errors(secret, plain_server):
    lay = InnerProductLayout.plan(3, D)
    v = torch.zeros(D, dtype=torch.float64)
    with pytest.raises(CkksError, match="dimension 10"):
        encrypt_for_inner_products(secret, lay, 0, torch.zeros(10))
    with pytest.raises(CkksError, match="index 3"):
        encrypt_for_inner_products(secret, lay, 3, v)
    bad = v.clone()
    bad[4] = float("nan")
    with pytest.raises(CkksError, match="NaN"):
        encrypt_for_inner_products(secret, lay, 0, bad)
    with pytest.raises(CkksError, match="MAX_VECTOR_NORM"):
        encrypt_for_inner_products(secret, lay, 0, torch.full((D,), 100.0))
    with pytest.raises(CkksError, match="symmetric encryption needs the secret key"):
        encrypt_for_inner_products(plain_server, lay, 0, v)
    with pytest.raises(CkksError, match="encryption must be"):
        encrypt_for_inner_products(secret, lay, 0, v, encryption="none")  # type: ignore[arg-type]


# ---- encrypted propagation ---------------------------------------------------------------


def test_weighted_sums_match_plaintext(secret, plain_server, capfd):
    g = torch.Generator().manual_seed(0)
    n, p = 4, 9000  # three ciphertexts per row, the last one partial
    theta = torch.randn(n, p, generator=g, dtype=torch.float64) * 0.5
    w = torch.rand(n, n, generator=g, dtype=torch.float64)
    w = w / w.sum(1, keepdim=True)
    enc = encrypt_rows(secret, theta)
    assert all(e.num_ciphertexts == 3 for e in enc)
    out = weighted_sums(plain_server, enc, w)
    got = torch.stack([decrypt_vector(secret, o) for o in out])
    expected = w @ theta
    assert (got - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())
    # Never more values than slots per ciphertext: TenSEAL's oversize warning never printed.
    assert "WARNING" not in capfd.readouterr().out


def test_weighted_sums_wire_roundtrip_and_public_encryption(secret, plain_server):
    theta = torch.linspace(-3, 3, 100, dtype=torch.float64).reshape(2, 50)
    enc = [EncryptedVector.deserialize(e.serialize()) for e in encrypt_rows(secret, theta, encryption="public")]
    w = torch.tensor([[0.25, 0.75], [-1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    out = [EncryptedVector.deserialize(o.serialize()) for o in weighted_sums(plain_server, enc, w)]
    got = torch.stack([decrypt_vector(secret, o) for o in out])
    assert (got - w @ theta).abs().max() < 1e-5
    assert out[0].level == enc[0].level - 1 == 0
    assert out[0].nbytes == len(out[0].serialize())
    # Fresh top-level inputs work as well (one level left afterwards).
    top = encrypt_rows(secret, theta, rescales=2)
    out_top = weighted_sums(plain_server, top, w)
    assert out_top[0].level == 1
    got_top = torch.stack([decrypt_vector(secret, o) for o in out_top])
    assert (got_top - w @ theta).abs().max() < 1e-5
    # Fewer primes, fewer bytes: level 1 is about 2/3 of the fresh top level.
    lvl1, lvl2 = encrypt_vector(secret, theta[0]), encrypt_vector(secret, theta[0], rescales=2)
    assert lvl1.nbytes < 0.8 * lvl2.nbytes


def test_weighted_sums_errors(secret, plain_server):
    enc = encrypt_rows(secret, torch.zeros(2, 10, dtype=torch.float64))
    with pytest.raises(CkksError, match="3 columns for 2"):
        weighted_sums(plain_server, enc, torch.ones(2, 3))
    with pytest.raises(CkksError, match="MAX_WEIGHT_L1"):
        weighted_sums(plain_server, enc, torch.full((1, 2), 1000.0))
    with pytest.raises(CkksError, match="NaN"):
        weighted_sums(plain_server, enc, torch.tensor([[float("nan"), 0.0]]))
    short = encrypt_vector(secret, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(CkksError, match="length 5"):
        weighted_sums(plain_server, [enc[0], short], torch.ones(1, 2))
    once = weighted_sums(plain_server, enc, torch.eye(2))
    with pytest.raises(CkksError, match="level"):
        weighted_sums(plain_server, once, torch.eye(2))
    with pytest.raises(CkksError, match="MAX_ABS_VALUE"):
        encrypt_vector(secret, torch.full((3,), 5000.0))
    with pytest.raises(CkksError, match="rescales"):
        encrypt_vector(secret, torch.zeros(3), rescales=3)
    with pytest.raises(CkksError, match="empty"):
        encrypt_vector(secret, torch.zeros(0))
    with pytest.raises(CkksError, match="1 dimension"):
        encrypt_vector(secret, torch.zeros(2, 2))
    with pytest.raises(CkksError, match="bad magic"):
        EncryptedVector.deserialize(b"XXXX" + bytes(30))
    data = enc[0].serialize()
    with pytest.raises(CkksError, match="trailing"):
        EncryptedVector.deserialize(data + b"x")
    # A vector claiming more values than its ciphertexts hold is refused, not half-decrypted.
    liar = EncryptedVector(length=5000, level=enc[0].level, parts=enc[0].part_bytes())
    with pytest.raises(CkksError, match="length 5000 holds 1 ciphertexts, expected 2"):
        decrypt_vector(secret, liar)
    with pytest.raises(CkksError, match="encrypted row 1 of length 5000"):
        weighted_sums(plain_server, [enc[0], liar], torch.ones(1, 2))


def test_decrypting_under_another_key_is_an_error_not_garbage(secret, server, plain_server):
    """CKKS does not authenticate: rows or vectors decrypted with another secret key gave
    values around 1e7 without an error. Decryption now checks the values against what the
    encrypted inputs' limits allow (|<u, v>| <= MAX_VECTOR_NORM^2; |sum_j w_j x_j| <=
    MAX_ABS_VALUE * MAX_WEIGHT_L1)."""
    other = ckks.create_secret_context(galois_keys=True)
    vecs = _orthonormal(3, D, 1, seed=1).permute(0, 2, 1).reshape(3, D)
    lay, _, rows, gram = _gram(secret, server, vecs)
    assert (gram - vecs @ vecs.T).abs().max().item() < 1e-4  # the right key: as before
    with pytest.raises(CkksError, match="decrypted inner products reach .* another key"):
        decrypt_inner_product_rows(other, lay, rows)
    theta = torch.linspace(-3, 3, 100, dtype=torch.float64).reshape(2, 50)
    out = weighted_sums(plain_server, encrypt_rows(secret, theta), torch.eye(2, dtype=torch.float64))
    assert torch.allclose(decrypt_vector(secret, out[0]), theta[0], atol=1e-5)
    with pytest.raises(CkksError, match="decrypted values reach .* another key"):
        decrypt_vector(other, out[0])


def test_he_standard_security_is_seals_table_and_says_unknown_beyond_it():
    """The level results.json states for CKKS parameters is the HE standard's (the table SEAL
    enforces), the highest one their total coefficient bits allow; none where the table gives
    none (an unknown degree, more bits than the 128-bit bound, not integers)."""
    levels = {128: sealapi.SEC_LEVEL_TYPE.TC128, 192: sealapi.SEC_LEVEL_TYPE.TC192,
              256: sealapi.SEC_LEVEL_TYPE.TC256}
    for level, bounds in ckks.HE_STANDARD_MAX_COEFF_BITS.items():
        for degree, bits in bounds.items():
            assert sealapi.CoeffModulus.MaxBitCount(degree, levels[level]) == bits
    assert ckks.he_standard_security(8192, 200) == 128
    assert ckks.he_standard_security(8192, 152) == 192
    assert ckks.he_standard_security(8192, 118) == 256
    assert ckks.he_standard_security(8192, 219) is None
    assert ckks.he_standard_security(8000, 100) is None
    assert ckks.he_standard_security(True, 100) is None
    assert ckks.he_standard_security(8192, 200.0) is None


def test_context_parameters_are_read_from_the_context_built():
    """Not the defaults: a context of other parameters reports its own, and the level they
    give (16384 / 240 bits: 192-bit)."""
    params = ckks.CkksParameters(16384, (60, 40, 40, 40, 60), 40)
    ctx = ckks.create_secret_context(params, galois_keys=False)
    got = ckks.context_parameters(ctx)
    assert got == {"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": [60, 40, 40, 40, 60],
                   "coeff_modulus_bits": 240, "global_scale": 2.0**40, "global_scale_bits": 40.0,
                   "security_level": "192-bit", "security_basis": ckks.HE_STANDARD_BASIS}
    server = ckks.public_context(ckks.create_secret_context(galois_keys=False), galois_keys=False)
    assert ckks.context_parameters(server)["security_level"] == "128-bit"


def test_a_row_under_another_scale_or_another_rows_data_is_refused_not_decrypted(secret, server):
    """A final-level row whose scale was changed decoded to the inner products times the
    ratio of scales (within every bound: 2^59 gave zeros); a row whose ciphertext is another
    row's, or an encryption of zero, decrypted without an error. The key holder now checks a
    row's scale and that the rows agree as rows of one symmetric Gram matrix."""
    vecs = _orthonormal(3, D, 1, seed=3).permute(0, 2, 1).reshape(3, D)
    lay, _, rows, gram = _gram(secret, server, vecs)
    assert (gram - vecs @ vecs.T).abs().max().item() < 1e-4
    eng = ckks._engine(server)
    ct = eng.load(rows[1].data, "row")
    ct.scale = 2.0**59
    rescaled = [rows[0], EncryptedRow(1, ckks._save(ct)), rows[2]]
    with pytest.raises(CkksError, match="encrypted row 1: ciphertext scale 5.764607523034235e\\+17, expected 1099512"):
        decrypt_inner_product_rows(secret, lay, rescaled)
    copied = [rows[0], EncryptedRow(1, rows[2].data), rows[2]]
    with pytest.raises(CkksError, match="row 1 gives <u_1, u_1> = .* < 0: not a row of a Gram"):
        decrypt_inner_product_rows(secret, lay, copied)
    zero = eng.new_ciphertext()
    eng.encryptor("public").encrypt_zero(eng.parms_by_level[0], zero)
    zero.scale = ct.scale = eng.scale**2 / eng.rescale_prime[eng.top_level - 1]
    zeroed = [rows[0], rows[1], EncryptedRow(2, ckks._save(zero))]
    with pytest.raises(CkksError, match="rows 2 and 0 disagree on <u_2, u_0>"):
        decrypt_inner_product_rows(secret, lay, zeroed)


def test_an_upload_replayed_under_another_vector_index_is_refused_at_decryption(secret, server):
    """A client's ciphertexts relabelled with another vector's index put its values in the
    wrong lanes: the rows decrypted within every bound and were released as overlaps."""
    vecs = _orthonormal(3, D, 1, seed=4).permute(0, 2, 1).reshape(3, D)
    lay = InnerProductLayout.plan(3, D)
    ups = [encrypt_for_inner_products(secret, lay, v, vecs[v]) for v in range(3)]
    ups[2] = InnerProductUpload(2, ups[1].packed, ups[1].broadcast)
    rows = inner_product_rows(server, lay, ups)
    with pytest.raises(CkksError, match="not rows of one Gram matrix"):
        decrypt_inner_product_rows(secret, lay, rows)


def test_a_ciphertext_with_bytes_after_its_end_is_refused(secret, server, plain_server):
    """SEAL reads a ciphertext as far as its header's size field says: bytes appended to a
    row, an upload's ciphertext or an encrypted vector's part were accepted unread."""
    vecs = _orthonormal(2, D, 1, seed=5).permute(0, 2, 1).reshape(2, D)
    lay, ups, rows, _ = _gram(secret, server, vecs)
    longer = [rows[0], EncryptedRow(1, rows[1].data + b"\x00" * 8)]
    with pytest.raises(CkksError, match="encrypted row 1: .* header states .* bytes, it has"):
        decrypt_inner_product_rows(secret, lay, longer)
    padded = InnerProductUpload(1, ups[1].packed, (ups[1].broadcast[0] + b"junk",))
    with pytest.raises(CkksError, match="broadcast ciphertext 0 of vector 1: .* header states"):
        ckks.check_inner_product_upload(server, lay, padded)
    enc = encrypt_vector(secret, torch.ones(10, dtype=torch.float64))
    with pytest.raises(CkksError, match="encrypted vector part 0: .* header states"):
        decrypt_vector(secret, EncryptedVector(enc.length, enc.level, [enc.parts[0] + b"\x01"]))


def test_a_ciphertext_whose_scale_is_off_in_its_last_bits_is_refused_naming_it(secret, server,
                                                                              plain_server):
    """A scale within 1e-9 of 2^40 passed the upload checks, then SEAL refused to add it to
    the others inside the server's sums: "scale mismatch", a ValueError naming no ciphertext
    (out of weighted_sums; from inner_product_rows for every upload alike)."""
    eng = ckks._engine(secret)
    vecs = _orthonormal(3, D, 1, seed=6).permute(0, 2, 1).reshape(3, D)
    lay = InnerProductLayout.plan(3, D)
    ups = [encrypt_for_inner_products(secret, lay, v, vecs[v]) for v in range(3)]
    ct = eng.load(ups[1].packed[0], "packed")
    ct.scale = ct.scale * (1 + 2.0**-40)
    ups[1] = InnerProductUpload(1, (ckks._save(ct),), ups[1].broadcast)
    with pytest.raises(CkksError, match="packed ciphertext 0 of vector 1: ciphertext scale"):
        ckks.check_inner_product_upload(server, lay, ups[1])
    with pytest.raises(CkksError, match="packed ciphertext 0 of vector 1: ciphertext scale"):
        inner_product_rows(server, lay, ups)
    rows = encrypt_rows(secret, torch.ones(2, 10, dtype=torch.float64))
    ct = eng.load(rows[1].part_bytes()[0], "part")
    ct.scale = ct.scale * (1 - 2.0**-45)
    rows[1] = EncryptedVector(rows[1].length, rows[1].level, [ckks._save(ct)])
    with pytest.raises(CkksError, match="encrypted vector part 0: ciphertext scale"):
        weighted_sums(plain_server, rows, torch.full((2, 2), 0.5, dtype=torch.float64))
