"""Cost of homomorphic encryption in secure-fedora: encrypted vs plaintext, measured in one run.

1. Relatedness: overlaps U_i^T U_j of N random unit summaries (d = 794, q = 1) at
   N = 36 and 100, plaintext (one einsum) vs the encrypted protocol of
   :mod:`secure_fedora.secure.relatedness` (client encryption + server computation on the
   public context + key-holder decryption, every message serialized).
2. Propagation, one round at the reference setting: N = 36 clients, P = 118,282
   parameters, a random row-stochastic propagation matrix; plaintext ``W @ Theta`` vs
   clients encrypting their rows, the server forming every sum_j W_ij Enc(theta_j), and
   every client decrypting its own phi_i -- once with the primitives of
   :mod:`privacy.ckks` (one real value per slot) and once with
   :class:`secure_fedora.secure.encrypted_propagation.EncryptedPropagator` (two values per complex
   slot; what the runtime uses).
3. Signed envelopes (:mod:`secure_fedora.secure.transport`), one round at the reference setting:
   every client signs its theta row, the server verifies all of them, signs every phi row,
   and every client verifies its own (nonce state fsync-ed to a temporary directory).

Prints timings, ratios and bytes per client. Single thread (torch.set_num_threads(1)); the
CKKS work is single-threaded SEAL. Ratios use process CPU seconds on both sides, which
stay meaningful on a shared machine; wall seconds are printed too, with the load average.
Client-side times are the sum over all clients run one after another in this process.

Usage: python benchmarks/he_cost.py [--sizes 36 100] [--modes symmetric public] [--params 118282]
                                   [--skip-relatedness] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from privacy.ckks import (
    EncryptedVector,
    context_from_bytes,
    decrypt_vector,
    encrypt_rows,
    public_context_bytes,
    weighted_sums,
)
from secure_fedora.secure.encrypted_propagation import EncryptedPropagator
from secure_fedora.secure.relatedness import encrypted_overlaps, run_key_ceremony
from secure_fedora.secure.transport import SecureExchange, SecureTransport

D = 794
REPEATS_PLAIN = 20


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _timed_plain(fn, repeats: int = REPEATS_PLAIN) -> float:
    """Process CPU seconds per call (comparable with the CPU seconds of the encrypted runs)."""
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def bench_relatedness(sizes: list[int], modes: list[str]) -> None:
    print("\n== Relatedness: overlaps of N unit summaries, d = 794, q = 1 ==")
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        u = torch.nn.functional.normalize(torch.randn(n, D, 1, generator=g, dtype=torch.float64), dim=1)
        plain_s = _timed_plain(lambda u=u: torch.einsum("idq,jdr->ijqr", u, u))
        expected = torch.einsum("idq,jdr->ijqr", u, u)
        ceremony = run_key_ceremony(n, key_holder=0)
        print(
            f"\nN = {n}: key ceremony {ceremony.seconds:.2f} s (one-off); public context to server "
            f"{_mb(ceremony.server_context_bytes)}, sealed secret context per client "
            f"{_mb(sum(ceremony.sealed_context_bytes) / n)}"
        )
        print(f"  plaintext einsum: {plain_s * 1e3:.3f} ms")
        for mode in modes:
            res = encrypted_overlaps(u, key_holder=0, ceremony=ceremony, client_encryption=mode)
            t = res.timings
            err = (res.overlaps - expected).abs().max().item()
            lay = res.layout
            print(
                f"  encrypted ({mode} client encryption), CPU seconds: total {t['total_cpu_s']:.2f} s"
                f" = clients {t['clients_encrypt_cpu_s']:.2f} s (all {n};"
                f" {t['clients_encrypt_cpu_s'] / n * 1e3:.1f} ms each)"
                f" + server {t['server_compute_cpu_s']:.2f} s + key holder {t['key_holder_decrypt_cpu_s']:.2f} s;"
                f" ratio {t['total_cpu_s'] / plain_s:,.0f}x plaintext; max |error| {err:.2e}"
            )
            print(
                f"    wall seconds (shared machine): total {t['total_s']:.2f} s = clients"
                f" {t['clients_encrypt_s']:.2f} s + server {t['server_compute_s']:.2f} s"
                f" + key holder {t['key_holder_decrypt_s']:.2f} s"
            )
            print(
                f"    layout: {lay.lanes} lanes x {lay.positions} positions, {lay.chunks} chunks,"
                f" {lay.ciphertexts_per_vector} ciphertexts per client;"
                f" bytes sent per client {_mb(sum(res.client_bytes_sent) / n)},"
                f" server received {_mb(res.server_bytes_received)},"
                f" key holder received {_mb(res.key_holder_bytes_received)},"
                f" released overlaps {res.released_bytes} B"
            )


def bench_propagation(n: int, p: int, mode: str) -> None:
    print(f"\n== Propagation: one round, N = {n} clients, P = {p:,} parameters ==")
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(n, p, generator=g, dtype=torch.float32) * 0.05
    w = torch.rand(n, n, generator=g, dtype=torch.float64)
    w = w / w.sum(dim=1, keepdim=True)
    w32 = w.to(torch.float32)
    plain_s = _timed_plain(lambda: w32 @ theta, repeats=5)  # CPU-bound, one thread
    expected = (w @ theta.double())
    print(f"  plaintext W @ Theta (float32): {plain_s * 1e3:.2f} ms")

    ceremony = run_key_ceremony(1, key_holder=0)
    secret = ceremony.client_context
    server_ctx_bytes = public_context_bytes(ceremony.key_holder_context, galois_keys=False, relin_keys=False)
    server_ctx = context_from_bytes(server_ctx_bytes, expect_secret_key=False)

    w0, t0 = time.perf_counter(), time.process_time()
    uploads = [e.serialize() for e in encrypt_rows(secret, theta, encryption=mode)]
    t1 = time.process_time()
    received = [EncryptedVector.deserialize(b) for b in uploads]
    outs = weighted_sums(server_ctx, received, w)
    downloads = [o.serialize() for o in outs]
    t2 = time.process_time()
    phis = [decrypt_vector(secret, EncryptedVector.deserialize(b)) for b in downloads]
    t3, w3 = time.process_time(), time.perf_counter()
    got = torch.stack(phis)
    err = (got - expected).abs().max().item()
    rel = err / expected.abs().max().item()
    total = t3 - t0
    print(
        f"  encrypted ({mode} client encryption), CPU seconds: total {total:.2f} s = clients encrypt"
        f" {t1 - t0:.2f} s ({(t1 - t0) / n:.2f} s each) + server {t2 - t1:.2f} s + clients decrypt"
        f" {t3 - t2:.2f} s ({(t3 - t2) / n * 1e3:.0f} ms each); ratio {total / plain_s:,.0f}x plaintext"
        f" (wall on the shared machine {w3 - w0:.2f} s)"
    )
    print(
        f"    {outs[0].num_ciphertexts} ciphertexts per model; bytes sent per client {_mb(len(uploads[0]))},"
        f" received per client {_mb(len(downloads[0]))} (plaintext model {_mb(p * 4)});"
        f" server context {_mb(len(server_ctx_bytes))}"
    )
    print(f"    max |error| {err:.2e} (relative to max |phi| {rel:.2e})")


def _reference_case(n: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(n, p, generator=g, dtype=torch.float32) * 0.05
    w = torch.rand(n, n, generator=g, dtype=torch.float64)
    return w / w.sum(dim=1, keepdim=True), theta


def bench_propagator(n: int, p: int, rounds: int) -> None:
    print(f"\n== Propagation with EncryptedPropagator (complex packing), N = {n}, P = {p:,} ==")
    w, theta = _reference_case(n, p)
    w32 = w.to(torch.float32)
    plain_s = _timed_plain(lambda: w32 @ theta, repeats=5)
    expected = w @ theta.double()
    prop = EncryptedPropagator(n)
    st = prop.stats
    print(
        f"  key ceremony {st.ceremony_seconds:.2f} s (one-off, once per run); public context to the"
        f" server {_mb(st.server_context_bytes)} (public key only); sealed secret context per client"
        f" {_mb(st.sealed_context_bytes)}; {prop.ciphertexts_per_row(p)} ciphertexts per model"
    )
    print(f"  plaintext W @ Theta (float32): {plain_s * 1e3:.2f} ms")
    for r in range(1, rounds + 1):
        phi = prop.propagate(w, theta)
        last = st.last_round
        err = (phi.double() - expected).abs().max().item()
        total = last["total_cpu_s"]
        print(
            f"  round {r}, CPU seconds: total {total:.2f} s = clients encrypt"
            f" {last['clients_encrypt_cpu_s']:.2f} s ({last['clients_encrypt_cpu_s'] / n * 1e3:.0f} ms each)"
            f" + server {last['server_combine_cpu_s']:.2f} s + clients decrypt"
            f" {last['clients_decrypt_cpu_s']:.2f} s ({last['clients_decrypt_cpu_s'] / n * 1e3:.0f} ms each);"
            f" ratio {total / plain_s:,.0f}x plaintext (wall {last['total_s']:.2f} s); max |error| {err:.2e}"
        )
    print(
        f"    bytes per client per round: sent {_mb(sum(st.last_round['bytes_sent']) / n)},"
        f" received {_mb(sum(st.last_round['bytes_received']) / n)} (plaintext model {_mb(p * 4)})"
    )


def bench_envelopes(n: int, p: int, rounds: int) -> None:
    print(f"\n== Signed envelopes (SecureTransport), N = {n}, P = {p:,}: theta up + phi down ==")
    _, theta = _reference_case(n, p)
    phi = theta.clone()
    with tempfile.TemporaryDirectory(prefix="he-cost-transport-") as tmp:
        start = time.perf_counter()
        transport = SecureTransport.for_simulation(tmp, n, "fedora")
        print(f"  setup (keys for {n + 1} parties, verifiers): {time.perf_counter() - start:.2f} s (one-off)")
        exchange = SecureExchange.start(transport, theta, phi)
        for r in range(1, rounds + 1):
            w0, c0 = time.perf_counter(), time.process_time()
            exchange.upload_theta(r, theta, range(n))
            w1, c1 = time.perf_counter(), time.process_time()
            exchange.download_phi(r, phi)
            w2, c2 = time.perf_counter(), time.process_time()
            print(
                f"  round {r}: uploads {1e3 * (w1 - w0):.0f} ms wall / {1e3 * (c1 - c0):.0f} ms CPU,"
                f" downloads {1e3 * (w2 - w1):.0f} ms wall / {1e3 * (c2 - c1):.0f} ms CPU"
                f" (wall includes the fsync-ed nonce state writes)"
            )
        s = transport.stats
        per_msg = s.bytes_sent / max(s.messages_sent, 1)
        print(
            f"    {s.messages_sent} messages, {per_msg / 1e6:.3f} MB each (payload {p * 4 / 1e6:.3f} MB +"
            f" {per_msg - p * 4 - 24:.0f} B envelope and tensor header); rejected {s.messages_rejected}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[36, 100])
    parser.add_argument("--modes", nargs="+", default=["symmetric", "public"], choices=["symmetric", "public"])
    parser.add_argument("--params", type=int, default=118_282)
    parser.add_argument("--prop-clients", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=2, help="propagation/envelope rounds to time")
    parser.add_argument("--skip-relatedness", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    print("secure-fedora HE cost benchmark")
    print(
        f"setup: CKKS N=8192, coeff moduli [60, 40, 40, 60], scale 2^40 (TenSEAL/SEAL);"
        f" torch threads 1; python {platform.python_version()}; {os.cpu_count()} CPUs;"
        f" load average at start {load}"
    )
    if not args.skip_relatedness:
        bench_relatedness(args.sizes, args.modes)
    bench_propagation(args.prop_clients, args.params, "symmetric")
    bench_propagator(args.prop_clients, args.params, args.rounds)
    bench_envelopes(args.prop_clients, args.params, args.rounds)
    print(f"\nload average at end {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")


if __name__ == "__main__":
    main()
