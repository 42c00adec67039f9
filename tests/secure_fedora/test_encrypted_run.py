"""Full FEDORA runs in the secure modes reach the plaintext results for the same seed.

- encrypted relatedness (and noised+encrypted) through the runtime's own configuration;
- encrypted propagation and signed envelopes through a method factory that wraps FEDORA the
  way the runtime is meant to wire them (``propagate`` computed by the
  :class:`EncryptedPropagator`; uploads and downloads through a :class:`SecureExchange`).
"""

import logging

import pytest
import torch

from secure_fedora.config import parse_config
from secure_fedora.encrypted_propagation import EncryptedPropagator
from secure_fedora.runtime import Simulation, build_clients, make_method
from secure_fedora.transport import Rejection, SecureExchange, SecureTransport


def config(relatedness="plain", **overrides):
    data = {
        "seed": 2,
        "methods": ["fedora"],
        "data": {"num_clients": 6, "train_per_client": 64, "val_per_client": 32,
                 "test_per_client": 32, "groups": 3},
        "training": {"rounds": 3, "local_epochs": 2, "batch_size": 16, "lr": 0.1},
        "fedora": {"relatedness": relatedness},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


def dp_config(relatedness):
    # Fixed noise multipliers (checked against the budget, no calibration search): fast.
    return config(relatedness, data={"train_per_client": 100},
                  privacy={"enabled": True, "epsilon": 8, "delta": 1e-3, "noise_multiplier": 1.0,
                           "summary_noise_multiplier": 2.0})


@pytest.fixture(scope="module")
def clients():
    return build_clients(config())


@pytest.fixture(scope="module")
def dp_clients():
    return build_clients(dp_config("noised"))


def run(cfg, run_dir, clients, factory=make_method):
    sim = Simulation(cfg, run_dir, clients=clients, method_factory=factory)
    results = sim.run()
    return results["methods"]["fedora"], sim.methods["fedora"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, clients):
    """The plaintext reference run (shared by the comparisons)."""
    return run(config(), tmp_path_factory.mktemp("plain"), clients)


def test_plain_run_learns(plain_run):
    body, _ = plain_run
    assert body["selected"]["mean"] > 0.3  # well above chance (0.1): the comparisons below mean something


@pytest.mark.parametrize("plain_mode,secure_mode", [("plain", "encrypted"), ("noised", "noised+encrypted")])
def test_encrypted_relatedness_matches_plaintext(tmp_path, clients, dp_clients, plain_run,
                                                 plain_mode, secure_mode):
    if plain_mode == "noised":
        plain, m_plain = run(dp_config(plain_mode), tmp_path / "plain", dp_clients)
        secure, m_secure = run(dp_config(secure_mode), tmp_path / "secure", dp_clients)
    else:
        plain, m_plain = plain_run
        secure, m_secure = run(config(secure_mode), tmp_path / "secure", clients)
    # Same neighbours (the graph's support); edge weights agree to CKKS precision.
    assert torch.equal(m_plain.relatedness.graph != 0, m_secure.relatedness.graph != 0)
    assert torch.allclose(m_plain.relatedness.graph, m_secure.relatedness.graph, atol=1e-4)
    assert torch.allclose(m_plain.relatedness.overlaps.double(), m_secure.relatedness.overlaps.double(),
                          atol=1e-4)
    assert m_secure.relatedness.mode == secure_mode
    assert m_secure.relatedness.details["server_bytes_received"] > 0
    assert secure["selected"]["per_client"] == plain["selected"]["per_client"]
    assert secure["selected"]["round"] == plain["selected"]["round"]
    # P differs at CKKS precision, so the trained models agree closely but not bitwise.
    assert (m_plain.theta - m_secure.theta).abs().max().item() < 1e-3


def encrypted_propagation_factory(store, run_dir=None):
    """FEDORA whose server step is ``phi = P @ theta`` under CKKS (what
    ``fedora.propagation = "encrypted"`` is to do once the runtime wires it); with ``run_dir``
    the ciphertexts also travel in signed envelopes (``[security] envelopes = true``)."""

    def factory(name, ctx, cfg):
        method = make_method(name, ctx, cfg)
        propagator = EncryptedPropagator(ctx.num_clients)
        store["propagator"] = propagator
        exchange = None
        if run_dir is not None:
            transport = SecureTransport.for_simulation(run_dir, ctx.num_clients, name)
            exchange = SecureExchange.start(transport, method.theta, method.phi)
            store["exchange"] = exchange
        current = {}
        train_round = method.train_round

        def round_with_participants(rnd, participants):
            current["round"], current["participants"] = rnd, list(participants)
            return train_round(rnd, participants)

        def propagate():
            method.phi.copy_(propagator.propagate(
                method.relatedness.propagation, method.theta, changed=current["participants"],
                rnd=current["round"], exchange=exchange))

        method.train_round = round_with_participants
        method.propagate = propagate
        return method

    return factory


@pytest.mark.parametrize("envelopes", [False, True])
def test_encrypted_propagation_run_matches_plaintext(tmp_path, clients, plain_run, envelopes):
    cfg = config()
    plain, m_plain = plain_run
    store = {}
    factory = encrypted_propagation_factory(store, tmp_path / "secure" if envelopes else None)
    secure, m_secure = run(cfg, tmp_path / "secure", clients, factory)
    assert store["propagator"].stats.rounds == cfg.training.rounds
    assert abs(secure["selected"]["mean"] - plain["selected"]["mean"]) <= 0.002
    assert abs(secure["final"]["mean"] - plain["final"]["mean"]) <= 0.002
    assert (m_secure.phi - m_plain.phi).abs().max().item() < 1e-4
    if envelopes:
        stats = store["exchange"].transport.stats
        assert stats.messages_accepted == 2 * 6 * cfg.training.rounds and stats.messages_rejected == 0


def enveloped_factory(run_dir, store, channel=None):
    """FEDORA with every theta upload and phi download signed and verified (the wiring the
    runtime is to do for ``[security] envelopes = true``)."""

    def factory(name, ctx, cfg):
        method = make_method(name, ctx, cfg)
        transport = SecureTransport.for_simulation(run_dir, ctx.num_clients, name)
        exchange = SecureExchange.start(transport, method.theta, method.phi, channel=channel)
        store["exchange"] = exchange
        store["theta_after_upload"] = {}
        current = {}
        train_round, plain_propagate = method.train_round, method.propagate

        def round_with_participants(rnd, participants):
            current["round"], current["participants"] = rnd, list(participants)
            return train_round(rnd, participants)

        def propagate():
            rnd = current["round"]
            exchange.upload_theta(rnd, method.theta, current["participants"])
            store["theta_after_upload"][rnd] = method.theta.clone()
            plain_propagate()
            exchange.download_phi(rnd, method.phi)

        method.train_round = round_with_participants
        method.propagate = propagate
        return method

    return factory


def test_enveloped_run_is_identical_and_survives_tampering(tmp_path, clients, plain_run, caplog):
    cfg = config()
    plain, m_plain = plain_run
    store = {}
    signed, m_signed = run(cfg, tmp_path / "signed", clients, enveloped_factory(tmp_path / "signed", store))
    assert signed["selected"] == plain["selected"]
    assert torch.equal(m_signed.theta, m_plain.theta) and torch.equal(m_signed.phi, m_plain.phi)
    stats = store["exchange"].transport.stats
    assert stats.messages_accepted == 2 * 6 * cfg.training.rounds and stats.messages_rejected == 0
    assert (tmp_path / "signed" / "transport" / "fedora" / "server.nonces.jsonl").exists()

    def tamper(kind, rnd, client, message):
        if kind == "theta" and rnd == 2 and client == 4:
            data = bytearray(message)
            data[-1] ^= 0x40
            return bytes(data)
        return message

    store = {}
    with caplog.at_level(logging.WARNING, logger="secure_fedora.security"):
        attacked, m_attacked = run(cfg, tmp_path / "attacked", clients,
                                   enveloped_factory(tmp_path / "attacked", store, tamper))
    rejections = store["exchange"].rejections
    assert [(r.client, r.round, r.reason) for r in rejections] == [(4, 2, "payload_hash_mismatch")]
    assert isinstance(rejections[0], Rejection)
    assert any(getattr(rec, "security_event", {}).get("reason") == "payload_hash_mismatch"
               for rec in caplog.records)
    after = store["theta_after_upload"]
    assert torch.equal(after[2][4], after[1][4])  # client 4 was a non-participant of round 2
    assert not torch.equal(after[2][3], after[1][3])
    assert len(attacked["selected"]["per_client"]) == 6  # the federation finished
