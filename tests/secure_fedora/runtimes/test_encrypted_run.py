"""Full FEDORA runs in the secure modes reach the plaintext results for the same seed.

- encrypted relatedness (and noised+encrypted) through the runtime's own configuration;
- encrypted propagation (``fedora.propagation = "encrypted"``) and signed envelopes
  (``[security] envelopes = true``), as the runtime wires them.
"""

import logging

import pytest
import torch

from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import Simulation, build_clients, make_method
from secure_fedora.secure.transport import Rejection, SecureExchange


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
                           "summary_noise_multiplier": 2.0,
                           # the same noise in both runs, so that they can be compared
                           "noise": "reproducible"})


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


@pytest.mark.parametrize("envelopes", [False, True])
def test_encrypted_propagation_run_matches_plaintext(tmp_path, clients, plain_run, envelopes):
    cfg = config(fedora={"propagation": "encrypted"}, security={"envelopes": envelopes})
    plain, m_plain = plain_run
    secure, m_secure = run(cfg, tmp_path / "secure", clients)
    store = {"propagator": m_secure.propagator, "exchange": m_secure.exchange}
    assert store["propagator"].stats.rounds == cfg.training.rounds
    assert abs(secure["selected"]["mean"] - plain["selected"]["mean"]) <= 0.002
    assert abs(secure["final"]["mean"] - plain["final"]["mean"]) <= 0.002
    assert (m_secure.phi - m_plain.phi).abs().max().item() < 1e-4
    if envelopes:
        stats = store["exchange"].transport.stats
        # per client and round: theta up and phi down (ciphertexts), the (empty, signed)
        # evaluation message, which went unsigned with encrypted propagation, and the signed
        # evaluation reply
        assert stats.messages_accepted == 4 * 6 * cfg.training.rounds and stats.messages_rejected == 0


REAL_EXCHANGE_INIT = SecureExchange.__init__


def enveloped(monkeypatch, store, channel=None):
    """Run with ``[security] envelopes = true``; record the exchange the runtime builds, inject
    a fault ``channel`` and snapshot theta after each round's upload."""
    store["theta_after_upload"] = {}

    def init(self, transport, **kwargs):
        REAL_EXCHANGE_INIT(self, transport, **{**kwargs, "channel": channel})
        store["exchange"] = self
        upload = self.upload_rows

        def upload_and_snapshot(rnd, matrix, participants, **kwargs):
            accepted = upload(rnd, matrix, participants, **kwargs)
            store["theta_after_upload"][rnd] = matrix.clone()
            return accepted

        self.upload_rows = upload_and_snapshot

    monkeypatch.setattr(SecureExchange, "__init__", init)
    return config(security={"envelopes": True})


def test_enveloped_run_is_identical_and_survives_tampering(tmp_path, clients, plain_run, caplog,
                                                          monkeypatch):
    plain, m_plain = plain_run
    store = {}
    cfg = enveloped(monkeypatch, store)
    signed, m_signed = run(cfg, tmp_path / "signed", clients)
    assert signed["selected"] == plain["selected"]
    # summaries travel as float32, so P differs from the float64 plaintext path by ~1e-7
    assert (m_signed.theta - m_plain.theta).abs().max().item() < 1e-4
    assert (m_signed.phi - m_plain.phi).abs().max().item() < 1e-4
    stats = store["exchange"].transport.stats
    # per client and round: phi down, theta up, the (empty, signed) evaluation message and
    # the signed evaluation reply
    assert stats.messages_accepted == 4 * 6 * cfg.training.rounds and stats.messages_rejected == 0
    assert (tmp_path / "signed" / "transport" / "fedora" / "server.nonces.jsonl").exists()

    def tamper(kind, rnd, client, message):
        if kind == "theta" and rnd == 2 and client == 4:
            data = bytearray(message)
            data[-1] ^= 0x40
            return bytes(data)
        return message

    store = {}
    with caplog.at_level(logging.WARNING, logger="secure_fedora.security"):
        cfg = enveloped(monkeypatch, store, tamper)
        attacked, m_attacked = run(cfg, tmp_path / "attacked", clients)
    rejections = store["exchange"].rejections
    assert [(r.client, r.round, r.reason) for r in rejections] == [(4, 2, "payload_hash_mismatch")]
    assert isinstance(rejections[0], Rejection)
    assert any(getattr(rec, "security_event", {}).get("reason") == "payload_hash_mismatch"
               for rec in caplog.records)
    after = store["theta_after_upload"]
    assert torch.equal(after[2][4], after[1][4])  # client 4 was a non-participant of round 2
    assert not torch.equal(after[2][3], after[1][3])
    assert len(attacked["selected"]["per_client"]) == 6  # the federation finished
    recorded = attacked["extra"]["security"]["rejections"]
    assert [(r["client"], r["round"], r["direction"]) for r in recorded] == [(4, 2, "upload")]


def test_enveloped_summaries_give_the_same_graph_and_a_forged_one_excludes_the_client(
        tmp_path, clients, plain_run, monkeypatch, caplog):
    plain, m_plain = plain_run
    signed, m_signed = run(config(security={"envelopes": True}), tmp_path / "signed", clients)
    assert torch.equal(m_plain.relatedness.graph != 0, m_signed.relatedness.graph != 0)
    assert torch.allclose(m_plain.relatedness.graph, m_signed.relatedness.graph, atol=1e-5)
    assert (tmp_path / "signed" / "transport" / "fedora-summary" / "server.nonces.jsonl").exists()
    assert m_signed.relatedness.details["excluded"] == []
    assert signed["extra"]["security"]["rejections"] == []

    from secure_fedora.secure import transport as transport_module
    real_upload = transport_module.SecureTransport.client_upload

    def forged(self, rnd, client, row, kind="theta", **kwargs):
        message = real_upload(self, rnd, client, row, kind, **kwargs)
        if kind == "summary" and client == 3:
            data = bytearray(message)
            data[-5] ^= 0x01
            return bytes(data)
        return message

    monkeypatch.setattr(transport_module.SecureTransport, "client_upload", forged)
    with caplog.at_level(logging.WARNING, logger="secure_fedora.security"):
        body, m = run(config(security={"envelopes": True}), tmp_path / "forged", clients)
    assert any(getattr(rec, "security_event", {}).get("kind") == "summary" for rec in caplog.records)
    r = m.relatedness
    unit = torch.zeros(6, dtype=torch.float64)
    unit[3] = 1.0
    assert torch.equal(r.propagation[3], unit)  # client 3 keeps its own model only ...
    assert torch.equal(r.propagation[:, 3], unit)  # ... and nobody weighs it
    assert r.similarity[3].abs().sum() == 0 and r.similarity[:, 3].abs().sum() == 0
    assert torch.allclose(r.propagation.sum(dim=1), torch.ones(6, dtype=torch.float64))
    security = body["extra"]["security"]
    assert security["excluded_from_relatedness"] == [3]
    assert [(x["client"], x["round"], x["reason"]) for x in security["rejections"]] == [
        (3, 0, "payload_hash_mismatch")]
    assert len(body["selected"]["per_client"]) == 6  # the federation finished
    # The excluded client trained exactly as it would under Local.
    sim = Simulation(config().model_copy(update={"methods": ["local"]}), tmp_path / "local",
                     clients=clients)
    sim.run()
    m_local = sim.methods["local"]
    assert torch.equal(m.theta[3], m_local.theta[3])
    assert torch.equal(m.phi[3], m.theta[3])


def test_results_state_the_ckks_parameters_of_the_contexts_the_run_built(tmp_path, monkeypatch):
    """results.json stated who holds the CKKS keys but not the parameters the encryption's
    security rests on: it now records, per encrypted step, those read from the context the
    run built (ring degree, coefficient moduli, scale) and the HE standard's level for them,
    and the audit report shows them."""
    from audits.report import build_report
    from privacy import ckks

    built = []
    make = ckks.create_secret_context

    def spy(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr("secure_fedora.secure.relatedness.create_secret_context", spy)
    monkeypatch.setattr("secure_fedora.secure.encrypted_propagation.create_secret_context", spy)
    cfg = config("encrypted", data={"num_clients": 3, "groups": 1}, training={"rounds": 1},
                 fedora={"propagation": "encrypted", "k": 1})
    results = Simulation(cfg, tmp_path / "run").run()
    stated = results["assumptions"]["ckks_parameters"]
    assert len(built) == 2 and set(stated) == {"relatedness", "propagation"}
    # the propagator's keys are made when the method is built, the relatedness's in setup
    for params, ctx in zip((stated["propagation"], stated["relatedness"]), built, strict=True):
        assert params == ckks.context_parameters(ctx)
        assert params["poly_modulus_degree"] == 8192 and params["coeff_modulus_bits"] == 200
        assert params["security_level"] == "128-bit"
    assert results["methods"]["fedora"]["extra"]["ckks_parameters"] == stated
    notes = build_report(tmp_path / "run")["assumptions"]["notes"]
    assert ("CKKS parameters (propagation): polynomial modulus degree 8192, coefficient modulus "
            "60 + 40 + 40 + 60 = 200 bits, global scale 2^40: 128-bit security per the HE "
            "security standard") in " ".join(notes)
