"""Signed envelopes for everything a client sends or receives, and the federation going on
without a client whose message is rejected:

- encrypted relatedness: uploads, encrypted rows to the key holder, released blocks;
- a rejected relatedness upload excludes the client (P row = unit vector);
- every baseline: identical results with and without envelopes, a rejected upload makes that
  client a non-participant of the round.
"""

import logging

import pytest
import torch

from privacy.ckks import InnerProductUpload
from privacy.envelope import decode_message, encode_message, make_envelope
from privacy.identity import Identity, init_keys
from secure_fedora.algorithms.fedora import RelatednessError
from secure_fedora.algorithms.methods import FedAvg, FinalizeRejectedError, _enveloped_summaries
from secure_fedora.core.config import parse_config
from secure_fedora.runtimes.inprocess import (
    Simulation,
    build_clients,
    build_context,
    make_method,
)
from secure_fedora.secure.relatedness import (
    SecureRelatednessError,
    _pack_parts,
    _unpack_parts,
    encrypted_overlaps,
    run_key_ceremony,
)
from secure_fedora.secure.transport import SecureExchange, SecureTransport

LOGGER = "secure_fedora.security"
N, D, KEY_HOLDER = 6, 60, 1


def _summaries(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(N, D, 1, generator=g, dtype=torch.float64)).Q


def _events(caplog):
    return [r.security_event for r in caplog.records
            if r.name == LOGGER and hasattr(r, "security_event")]


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    init_keys(d, ["server", *[f"client-{i:03d}" for i in range(N)]])
    return d


@pytest.fixture(scope="module")
def ceremony(key_dir, tmp_path_factory):
    tr = SecureTransport(key_dir, tmp_path_factory.mktemp("ceremony"), N)
    return run_key_ceremony(N, KEY_HOLDER, identities=[tr.identities[c] for c in tr.client_ids])


@pytest.fixture()
def transport(key_dir, tmp_path):
    return SecureTransport(key_dir, tmp_path / "state", N)


# --------------------------------------------------------------------------- encrypted relatedness


def test_enveloped_encrypted_relatedness_matches_plaintext_and_counts_envelopes(transport, ceremony):
    u = _summaries()
    plain = encrypted_overlaps(u, KEY_HOLDER, ceremony=ceremony)
    seen = {}

    def record(kind, rnd, client, message):
        env, payload = decode_message(message)
        assert (env.round, rnd) == (0, 0)
        seen.setdefault(kind, {})[client] = (len(message), len(payload))
        return message

    res = encrypted_overlaps(u, KEY_HOLDER, ceremony=ceremony, transport=transport, channel=record)
    assert res.accepted == list(range(N)) and res.excluded == [] and res.rejections == []
    assert (res.overlaps - torch.einsum("idq,jdr->ijqr", u, u)).abs().max().item() < 1e-4
    assert (res.overlaps - plain.overlaps).abs().max().item() < 1e-4
    # All three message kinds are enveloped, and the counted bytes are the envelopes'.
    assert sorted(seen) == ["enc_gram_rows", "enc_summary", "gram_release"]
    assert res.client_bytes_sent == [seen["enc_summary"][i][0] for i in range(N)]
    assert all(whole > payload for whole, payload in seen["enc_summary"].values())
    assert res.key_holder_bytes_received == seen["enc_gram_rows"][KEY_HOLDER][0]
    assert res.released_bytes == seen["gram_release"][KEY_HOLDER][0]
    assert seen["gram_release"][KEY_HOLDER][1] == 8 + 2 * 8 + N * N * 8  # exact float64 blocks
    stats = transport.stats
    assert stats.messages_sent == N + 2 and stats.messages_accepted == N + 2
    assert (transport.state_dir / "server.nonces.jsonl").exists()


def _forge(transport, client, payload):
    return transport.client_upload_bytes(0, client, payload, "enc_summary")


def _attack(name, transport, captured):
    """A channel that attacks client 2's upload, and the reason it must be rejected with."""

    def channel(kind, rnd, client, message):
        if kind != "enc_summary" or client != 2:
            return message
        env, payload = decode_message(message)
        if name == "tampered_ciphertext":  # bytes of the ciphertext changed in transit
            data = bytearray(message)
            data[-100] ^= 0x01
            return bytes(data)
        if name == "tampered_envelope":
            return encode_message(env.__class__(**{**env.__dict__, "round": 1}), payload)
        if name == "replayed_envelope":
            return captured["message"]
        if name == "unknown_key":
            stranger = Identity.generate("client-042")
            return encode_message(make_envelope(stranger, "server", 0, kind, payload), payload)
        if name == "impostor_key":
            impostor = Identity.generate("client-002")
            return encode_message(make_envelope(impostor, "server", 0, kind, payload), payload)
        parts = _unpack_parts(payload)
        up = InnerProductUpload.deserialize(parts[0])
        if name == "authentic_garbage":  # signed by the client, not a ciphertext container
            return _forge(transport, 2, b"not ciphertexts")
        if name == "authentic_truncated_ciphertext":
            bad = InnerProductUpload(up.index, (up.packed[0][:500],), up.broadcast)
            return _forge(transport, 2, _pack_parts([bad.serialize()]))
        if name == "authentic_wrong_level":  # a broadcast ciphertext where a packed one belongs
            bad = InnerProductUpload(up.index, (up.broadcast[0],), up.broadcast)
            return _forge(transport, 2, _pack_parts([bad.serialize()]))
        if name == "authentic_wrong_vector":
            bad = InnerProductUpload(3, up.packed, up.broadcast)
            return _forge(transport, 2, _pack_parts([bad.serialize()]))
        raise AssertionError(name)

    return channel


ATTACKS = {
    "tampered_ciphertext": "payload_hash_mismatch",
    "tampered_envelope": "bad_signature",
    "replayed_envelope": "replayed_nonce",
    "unknown_key": "unknown_sender",
    "impostor_key": "bad_signature",
    "authentic_garbage": "malformed_payload",
    "authentic_truncated_ciphertext": "malformed_payload",
    "authentic_wrong_level": "malformed_payload",
    "authentic_wrong_vector": "malformed_payload",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_rejected_upload_excludes_only_that_client(attack, transport, ceremony, caplog):
    u = _summaries(1)
    captured = {}
    if attack == "replayed_envelope":  # an earlier computation's message, captured on the wire
        def capture(kind, rnd, client, message):
            if kind == "enc_summary" and client == 2:
                captured["message"] = message
            return message

        encrypted_overlaps(u, KEY_HOLDER, ceremony=ceremony, transport=transport, channel=capture)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = encrypted_overlaps(u, KEY_HOLDER, ceremony=ceremony, transport=transport,
                                 channel=_attack(attack, transport, captured))
    assert res.excluded == [2] and res.accepted == [0, 1, 3, 4, 5]
    assert [(r.client, r.round, r.reason) for r in res.rejections] == [(2, 0, ATTACKS[attack])]
    assert ATTACKS[attack] in [e["reason"] for e in _events(caplog)]
    keep = torch.tensor(res.accepted)
    expected = torch.einsum("idq,jdr->ijqr", u, u)
    assert (res.overlaps[keep][:, keep] - expected[keep][:, keep]).abs().max().item() < 1e-4
    assert res.overlaps[2].abs().sum() == 0 and res.overlaps[:, 2].abs().sum() == 0


@pytest.mark.parametrize("kind", ["enc_gram_rows", "gram_release"])
def test_rejected_key_holder_message_is_a_clear_error(kind, transport, ceremony, caplog):
    def tamper(k, rnd, client, message):
        if k == kind:
            data = bytearray(message)
            data[-3] ^= 0x10
            return bytes(data)
        return message

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with pytest.raises(SecureRelatednessError, match=f"key holder client {KEY_HOLDER}"):
            encrypted_overlaps(_summaries(), KEY_HOLDER, ceremony=ceremony, transport=transport,
                               channel=tamper)
    assert [e["reason"] for e in _events(caplog)] == ["payload_hash_mismatch"]


def test_transport_argument_errors(transport, key_dir, tmp_path, ceremony):
    u = _summaries()
    with pytest.raises(SecureRelatednessError, match="needs a transport"):
        encrypted_overlaps(u, KEY_HOLDER, ceremony=ceremony, channel=lambda *a: a[-1])
    with pytest.raises(SecureRelatednessError, match="for 6 clients"):
        encrypted_overlaps(u[:4], 0, transport=transport)
    server_only = SecureTransport(key_dir, tmp_path / "other", N, parties=["server"])
    with pytest.raises(SecureRelatednessError, match="acting as the server and every client"):
        encrypted_overlaps(u, KEY_HOLDER, ceremony=ceremony, transport=server_only)

    def drop_all(kind, rnd, client, message):
        return b"garbage" if kind == "enc_summary" else message

    with pytest.raises(SecureRelatednessError, match="no encrypted summary upload was accepted"):
        encrypted_overlaps(u, KEY_HOLDER, ceremony=ceremony, transport=transport, channel=drop_all)


# --------------------------------------------------------------------------- runs


def run_config(relatedness="plain", **overrides):
    data = {
        "seed": 2,
        "methods": ["fedora"],
        "data": {"num_clients": 6, "train_per_client": 64, "val_per_client": 32,
                 "test_per_client": 32, "groups": 3},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.1},
        "fedora": {"relatedness": relatedness},
        "security": {"envelopes": True},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


@pytest.fixture(scope="module")
def run_clients():
    return build_clients(run_config())


def test_encrypted_run_continues_without_a_client_whose_upload_is_rejected(
        tmp_path, run_clients, monkeypatch, caplog):
    from privacy.pipeline import EncryptPayload
    from secure_fedora.secure import transport as transport_module
    real = transport_module.SecureTransport.client_release

    def faulty(self, rnd, client, kind, payload, *, dtype=torch.float32, encrypt=None,
               releases=None):
        if kind == "enc_summary" and client == 4:  # the client signs a broken upload
            good = encrypt.encrypt

            def broken(u):
                data = good(u)
                return data[: len(data) // 2]

            encrypt = EncryptPayload(broken, encrypt.scheme)
        return real(self, rnd, client, kind, payload, dtype=dtype, encrypt=encrypt,
                    releases=releases)

    monkeypatch.setattr(transport_module.SecureTransport, "client_release", faulty)
    sim = Simulation(run_config("encrypted"), tmp_path / "run", clients=run_clients)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = sim.run()
    body = results["methods"]["fedora"]
    assert len(body["selected"]["per_client"]) == 6  # the federation finished
    r = sim.methods["fedora"].relatedness
    unit = torch.zeros(6, dtype=torch.float64)
    unit[4] = 1.0
    assert torch.equal(r.propagation[4], unit) and torch.equal(r.propagation[:, 4], unit)
    security = body["extra"]["security"]
    assert security["excluded_from_relatedness"] == [4]
    assert [(x["client"], x["reason"]) for x in security["rejections"]] == [(4, "malformed_payload")]
    assert r.details["server_bytes_received"] > 0
    assert any(e.get("kind") == "enc_summary" for e in _events(caplog))


def test_fewer_than_two_accepted_summaries_is_a_clear_error(key_dir, tmp_path, monkeypatch):
    transport = SecureTransport(key_dir, tmp_path / "s", N)
    real = SecureTransport.client_upload

    def forged(self, rnd, client, row, kind="theta", **kwargs):
        message = real(self, rnd, client, row, kind, **kwargs)
        return message[:-1] + bytes([message[-1] ^ 1]) if client != 0 else message

    monkeypatch.setattr(SecureTransport, "client_upload", forged)
    with pytest.raises(RelatednessError, match="at least two clients, 1 remain"):
        _enveloped_summaries(transport, _summaries())
    ctx = build_context(run_config(), build_clients(run_config())[:3])
    from secure_fedora.algorithms.methods import Fedora

    fed = Fedora(ctx, k=1, relatedness_fn=lambda: (torch.zeros(3, 3, 1, 1), {"excluded": [0, 2]}))
    with pytest.raises(RelatednessError, match="only 1 remain"):
        fed.setup()


# --------------------------------------------------------------------------- baselines

BASELINES = ["fedavg", "fedprox", "ditto", "apfl", "fedamp", "ifca"]


def tiny(name, envelopes):
    return parse_config({
        "name": "tiny", "seed": 1, "methods": [name],
        "data": {"num_clients": 5, "train_per_client": 32, "val_per_client": 16,
                 "test_per_client": 32, "groups": 2},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.05,
                     "participation": 0.6},
        "fedavg": {"finetune_epochs": 1},
        "baselines": {"ifca": {"num_clusters": 2}},
        "security": {"envelopes": envelopes},
    })


@pytest.fixture(scope="module")
def tiny_clients():
    return build_clients(tiny("fedavg", False))


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_with_envelopes_equals_without(tmp_path, tiny_clients, name):
    out = {}
    for envelopes in (False, True):
        sim = Simulation(tiny(name, envelopes), tmp_path / str(envelopes), clients=tiny_clients)
        out[envelopes] = (sim.run()["methods"][name], sim.methods[name])
    (plain, m_plain), (signed, m_signed) = out[False], out[True]
    # float32 matrices cross the wire as float32: bit-identical, tolerance 0
    assert signed["selected"] == plain["selected"] and signed["final"] == plain["final"]
    for key, value in m_plain.state_dict().items():
        theirs = m_signed.state_dict()[key]
        if isinstance(value, dict):  # client_states: each field's rows, one per client
            assert theirs.keys() == value.keys(), key
            assert all(torch.equal(a, b) for f in value for a, b in
                       zip(theirs[f], value[f], strict=True)), key
        else:
            assert torch.equal(theirs, value), key
    security = signed["extra"].pop("security")
    assert signed["extra"] == plain["extra"]  # e.g. FedAvg's fine-tuned accuracies
    assert "security" not in plain["extra"]
    assert security["rejections"] == []
    assert security["transport"]["messages_rejected"] == 0
    assert security["transport"]["messages_accepted"] > 0
    assert (tmp_path / "True" / "transport" / name / "server.nonces.jsonl").exists()


def test_local_signs_its_empty_messages_and_step_counts(tmp_path, tiny_clients):
    """Local sends no model, but as on Flower its round message, its reply (the step count),
    its evaluation message and that one's reply (the metrics) are signed envelopes (it used to send nothing in process, so
    a tampered Local message could not be rejected); its results are those without
    envelopes."""
    sim = Simulation(tiny("local", True), tmp_path / "signed", clients=tiny_clients)
    body = sim.run()["methods"]["local"]
    plain = Simulation(tiny("local", False), tmp_path / "plain", clients=tiny_clients)
    plain_body = plain.run()["methods"]["local"]
    assert plain.methods["local"].exchange is None and "security" not in plain_body["extra"]
    assert body["selected"] == plain_body["selected"] and body["final"] == plain_body["final"]
    assert torch.equal(sim.methods["local"].theta, plain.methods["local"].theta)
    transport = body["extra"]["security"]["transport"]
    # per round: each participant's round message and reply; every client's evaluation
    # message and reply
    participants = sum(row["participants"] for row in sim.history)
    evaluated = 5 * sum(1 for row in sim.history if "test_mean" in row)
    assert transport["messages_accepted"] == transport["messages_sent"] \
        == 2 * participants + 2 * evaluated
    assert transport["messages_rejected"] == 0 and body["extra"]["security"]["rejections"] == []


@pytest.mark.parametrize("propagation", ["dense", "sparse", "factored"])
def test_fedora_with_envelopes_under_partial_participation(tmp_path, tiny_clients, propagation):
    # sparse and factored operators compute a round's phi rows when they are sent, so the rows
    # of clients that did not take part are still pending while the participants train and
    # upload their theta rows: the upload check must not compute them from the trained theta
    cfg = parse_config({
        "name": "tiny", "seed": 1, "methods": ["fedora"],
        "data": {"num_clients": 5, "train_per_client": 32, "val_per_client": 16,
                 "test_per_client": 32, "groups": 2},
        "training": {"rounds": 3, "local_epochs": 1, "batch_size": 16, "lr": 0.05,
                     "participation": 0.6},
        "fedora": {"k": 2, "propagation": propagation},
        "security": {"envelopes": True},
    })
    sim = Simulation(cfg, tmp_path, clients=tiny_clients)
    body = sim.run()["methods"]["fedora"]
    fed = sim.methods["fedora"]
    security = body["extra"]["security"]
    assert security["rejections"] == [] and security["transport"]["messages_rejected"] == 0
    assert security["transport"]["messages_accepted"] > 0
    assert body["rounds"] == 3
    # every phi row, pending or sent, is the last propagation's product of the final theta
    assert torch.equal(fed.phi, fed.relatedness.operator.apply(fed.theta))


def _exchange_for(method, tmp_path, channel):
    transport = SecureTransport.for_simulation(tmp_path, method.ctx.num_clients, method.name)
    uploads, downloads = method.message_state()
    method.exchange = SecureExchange(transport, uploads=uploads, downloads=downloads,
                                     channel=channel)
    return method


def _tamper(target_kind, target_client, target_round=1):
    def channel(kind, rnd, client, message):
        if (kind, client, rnd) == (target_kind, target_client, target_round):
            data = bytearray(message)
            data[-2] ^= 0x04
            return bytes(data)
        return message
    return channel


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "ditto", "apfl"])
def test_rejected_baseline_upload_makes_the_client_a_non_participant(tmp_path, tiny_clients, name, caplog):
    cfg = tiny(name, True)
    attacked = make_method(name, build_context(cfg, tiny_clients), cfg)
    _exchange_for(attacked, tmp_path, _tamper("theta", 1))
    reference = make_method(name, build_context(cfg, tiny_clients), cfg)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        attacked.train_round(1, [0, 1, 2])
    reference.train_round(1, [0, 2])  # what the server does when client 1 did not take part
    assert torch.equal(attacked.global_params, reference.global_params)
    assert [(r.client, r.round, r.reason) for r in attacked.exchange.rejections] == [
        (1, 1, "payload_hash_mismatch")]
    # the server keeps its last accepted row; the client keeps the row it trained (its
    # state, as a Flower client's)
    assert torch.equal(attacked.exchange.server_rows["theta"][1], attacked.ctx.init)
    assert not torch.equal(attacked.message_state()[0]["theta"][1], attacked.ctx.init)
    assert attacked.extra_results()["security"]["rejections"][0]["client"] == 1


def test_rejected_fedamp_upload_keeps_the_servers_row(tmp_path, tiny_clients):
    cfg = tiny("fedamp", True)
    method = _exchange_for(make_method("fedamp", build_context(cfg, tiny_clients), cfg),
                           tmp_path, _tamper("theta", 3))
    method.train_round(1, [0, 3])
    # the server keeps its last accepted row; client 3 keeps the model it trained (a client
    # does not learn that its upload was rejected, as in a deployment)
    assert torch.equal(method.models[3], method.ctx.init)
    assert not torch.equal(method.theta[3], method.ctx.init)
    assert torch.equal(method.models[0], method.theta[0])
    assert not torch.equal(method.models[0], method.ctx.init)
    assert torch.equal(method.exchange.server_theta, method.models)


def test_ifca_rejections_leave_the_client_out_of_the_cluster_averages(tmp_path, tiny_clients, caplog):
    cfg = tiny("ifca", True)
    clients = [0, 1, 2, 4]

    def fresh():
        m = make_method("ifca", build_context(cfg, tiny_clients), cfg)
        m.setup()
        return m

    def forge(kind, rnd, client, message):
        if kind == "cluster_choice" and client == 2:  # authentic, but an impossible index
            return transport.client_upload(rnd, client, torch.tensor([7.0]), kind=kind)
        return _tamper("clusters", 4)(kind, rnd, client, message)

    attacked = fresh()
    _exchange_for(attacked, tmp_path, forge)
    transport = attacked.exchange.transport
    reference = fresh()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        attacked.train_round(1, clients)
    reference.train_round(1, [0, 1])  # client 2's index and client 4's download were rejected
    assert torch.equal(attacked.clusters, reference.clusters)
    got = {(r.client, r.reason, r.direction) for r in attacked.exchange.rejections}
    assert got == {(2, "invalid_value", "upload"), (4, "payload_hash_mismatch", "download")}
    assert torch.equal(attacked.theta[4], attacked.ctx.init)  # client 4 never trained


def test_fedavg_finetuning_downloads_the_final_model(tmp_path, tiny_clients):
    cfg = tiny("fedavg", True)
    method = _exchange_for(make_method("fedavg", build_context(cfg, tiny_clients), cfg),
                           tmp_path, _tamper("global", 0, target_round=2))
    assert isinstance(method, FedAvg)
    method.train_round(1, [1, 2])
    sent = method.exchange.transport.stats.messages_sent
    # client 0 rejects the final model (round 2: finalize follows the last round, as on
    # Flower) each time it is
    # sent: it is asked once more, then the run stops (as on Flower) rather than fine-tune
    # its last accepted copy, the initialization
    with pytest.raises(FinalizeRejectedError, match=r"client\(s\) \[0\]"):
        method.extra_results()
    assert method.exchange.transport.stats.messages_sent == sent + 6
    assert [(r.client, r.direction) for r in method.exchange.rejections] == [(0, "download")] * 2


def test_enveloped_baseline_resumes_identically(tmp_path, tiny_clients):
    cfg = tiny("fedavg", True).model_copy(
        update={"training": tiny("fedavg", True).training.model_copy(update={"rounds": 3})})
    full = Simulation(cfg, tmp_path / "full", clients=tiny_clients).run()

    class Stop(Exception):
        pass

    def stop(method, rnd, total):
        if rnd == 2:
            raise Stop

    with pytest.raises(Stop):
        Simulation(cfg, tmp_path / "cut", clients=tiny_clients, progress=stop).run()
    resumed = Simulation(cfg, tmp_path / "cut", clients=tiny_clients).run(resume=True)
    body, again = full["methods"]["fedavg"], resumed["methods"]["fedavg"]
    assert again["selected"] == body["selected"]
    assert again["extra"]["finetuned_test_accuracy"] == body["extra"]["finetuned_test_accuracy"]
    assert again["extra"]["security"]["rejections"] == []
