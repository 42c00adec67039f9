import dataclasses
import logging

import pytest
import torch

from privacy.envelope import (
    BadSignatureError,
    Envelope,
    EnvelopeError,
    EnvelopeStateError,
    EnvelopeVerifier,
    FutureRoundError,
    MalformedEnvelopeError,
    NonceMemoryLostError,
    NonFiniteTensorError,
    PayloadHashMismatchError,
    ReplayedNonceError,
    StaleRoundError,
    TensorShapeError,
    UnexpectedKindError,
    UnknownSenderError,
    WrongRecipientError,
    check_nonce_memory,
    check_tensor,
    decode_message,
    encode_message,
    make_envelope,
)
from privacy.identity import Identity

LOGGER = "secure_fedora.security"


@pytest.fixture(scope="module")
def parties():
    return {p: Identity.generate(p) for p in ("server", "client-000", "client-001")}


@pytest.fixture()
def verifier(parties):
    allow = {p: i.public for p, i in parties.items()}
    return EnvelopeVerifier(allow, "server")


def _events(caplog):
    return [r.security_event for r in caplog.records if r.name == LOGGER and hasattr(r, "security_event")]


def _assert_rejected(caplog, exc_info, cls, reason, sender="client-000", rnd=3):
    err = exc_info.value
    assert type(err) is cls
    assert isinstance(err, EnvelopeError)
    assert err.sender == sender and err.round == rnd
    assert sender in str(err) and f"round {rnd}" in str(err)
    events = [e for e in _events(caplog) if e.get("event") == "message_rejected"]
    assert events and events[-1]["reason"] == reason
    assert events[-1]["sender"] == sender and events[-1]["round"] == rnd


def test_valid_message_accepted_and_wire_roundtrip(parties, verifier):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"payload")
    assert verifier.verify(env, b"payload", 3) is env
    env2, payload = decode_message(encode_message(make_envelope(parties["client-001"], "server", 3, "model", b"p2"), b"p2"))
    assert verifier.verify(env2, payload, 3).sender == "client-001"
    assert Envelope.from_dict(env.to_dict()) == env


def test_unknown_sender(parties, caplog):
    verifier = EnvelopeVerifier({"server": parties["server"].public}, "server")
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(UnknownSenderError) as ei:
        verifier.verify(env, b"x", 3)
    _assert_rejected(caplog, ei, UnknownSenderError, "unknown_sender")


def test_impostor_key_bad_signature(parties, verifier, caplog):
    impostor = Identity.generate("client-000")  # right name, wrong key
    env = make_envelope(impostor, "server", 3, "model", b"x")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(BadSignatureError) as ei:
        verifier.verify(env, b"x", 3)
    _assert_rejected(caplog, ei, BadSignatureError, "bad_signature")


@pytest.mark.parametrize("field,value", [("round", 4), ("kind", "summary"), ("recipient", "client-001"), ("nonce", "0" * 32)])
def test_tampered_header_bad_signature(parties, verifier, caplog, field, value):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    forged = dataclasses.replace(env, **{field: value})
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(BadSignatureError) as ei:
        verifier.verify(forged, b"x", 4 if field == "round" else 3)
    _assert_rejected(caplog, ei, BadSignatureError, "bad_signature", rnd=forged.round)


def test_tampered_payload_hash_mismatch(parties, verifier, caplog):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"original")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(PayloadHashMismatchError) as ei:
        verifier.verify(env, b"originaL", 3)
    _assert_rejected(caplog, ei, PayloadHashMismatchError, "payload_hash_mismatch")


def test_wrong_recipient(parties, caplog):
    allow = {p: i.public for p, i in parties.items()}
    v = EnvelopeVerifier(allow, "client-001")
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(WrongRecipientError) as ei:
        v.verify(env, b"x", 3)
    _assert_rejected(caplog, ei, WrongRecipientError, "wrong_recipient")


def test_unexpected_kind(parties, verifier, caplog):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(UnexpectedKindError) as ei:
        verifier.verify(env, b"x", 3, expected_kind="summary")
    _assert_rejected(caplog, ei, UnexpectedKindError, "unexpected_kind")
    assert verifier.verify(env, b"x", 3, expected_kind={"summary", "model"}) is env


def test_replay_rejected(parties, verifier, caplog):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    verifier.verify(env, b"x", 3)
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(ReplayedNonceError) as ei:
        verifier.verify(env, b"x", 3)
    _assert_rejected(caplog, ei, ReplayedNonceError, "replayed_nonce")


def test_rejected_message_does_not_burn_nonce(parties, verifier):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    with pytest.raises(PayloadHashMismatchError):
        verifier.verify(env, b"y", 3)
    assert verifier.verify(env, b"x", 3) is env


def test_stale_and_future_rounds(parties, verifier, caplog):
    old = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(StaleRoundError) as ei:
        verifier.verify(old, b"x", 4)
    _assert_rejected(caplog, ei, StaleRoundError, "stale_round")
    future = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(FutureRoundError) as ei:
        verifier.verify(future, b"x", 2)
    _assert_rejected(caplog, ei, FutureRoundError, "future_round")


def test_round_lag_window_and_floor_never_moves_back(parties):
    allow = {p: i.public for p, i in parties.items()}
    v = EnvelopeVerifier(allow, "server", max_round_lag=1)
    v.verify(make_envelope(parties["client-000"], "server", 4, "model", b"x"), b"x", 5)
    v.verify(make_envelope(parties["client-000"], "server", 6, "model", b"x"), b"x", 6)
    assert v.round_floor == 5
    # A caller passing an older expected round cannot reopen pruned rounds.
    with pytest.raises(StaleRoundError):
        v.verify(make_envelope(parties["client-000"], "server", 4, "model", b"x"), b"x", 4)


def test_persisted_nonce_state_catches_replay_after_restart(parties, tmp_path):
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v1 = EnvelopeVerifier(allow, "server", state_path=state)
    env = make_envelope(parties["client-001"], "server", 2, "model", b"x")
    v1.verify(env, b"x", 2)
    v2 = EnvelopeVerifier(allow, "server", state_path=state)
    with pytest.raises(ReplayedNonceError):
        v2.verify(env, b"x", 2)
    # Without persistence a fresh verifier would accept it: the state file is what catches it.
    assert EnvelopeVerifier(allow, "server").verify(env, b"x", 2) is env


def test_advance_floor_drops_older_nonces_durably_and_refuses_their_rounds(parties, tmp_path):
    """A private file is rewritten to what is kept (bounded by the memory); a shared journal
    gets a floor line; older rounds are stale, also after a restart; the floor never drops."""
    from privacy.envelope import NonceJournal

    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "server", state_path=state)
    old = make_envelope(parties["client-001"], "server", 1, "model", b"x")
    v.verify(old, b"x", 1)
    for rnd in range(2, 50):
        v.advance_floor(rnd)
        v.verify(make_envelope(parties["client-000"], "server", rnd, "model", b"x"), b"x", rnd)
    assert len(state.read_text().splitlines()) == 2  # the floor and round 49's nonce
    v.advance_floor(3)  # lower: no change
    assert v.round_floor == 49
    with pytest.raises(StaleRoundError):
        EnvelopeVerifier(allow, "server", state_path=state).verify(old, b"x", 49)
    with pytest.raises(ValueError, match="non-negative"):
        v.advance_floor(-1)
    journal = NonceJournal(tmp_path / "journal.jsonl")
    shared = EnvelopeVerifier(allow, "server", journal=journal)
    shared.advance_floor(5)
    assert '"floor": 5' in (tmp_path / "journal.jsonl").read_text()
    assert EnvelopeVerifier(allow, "server", journal=NonceJournal(
        tmp_path / "journal.jsonl")).round_floor == 5


def test_persisted_state_torn_line_dropped_corrupt_line_fails(parties, tmp_path):
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "server", state_path=state)
    v.verify(make_envelope(parties["client-001"], "server", 2, "model", b"x"), b"x", 2)
    with open(state, "a") as fh:
        fh.write('{"s": "client-001", "r": 2, "n"')  # crash mid-write
    EnvelopeVerifier(allow, "server", state_path=state)
    state.write_text('{"floor": 0}\nnot json\n{"floor": 1}\n')
    with pytest.raises(EnvelopeStateError, match="line 2"):
        EnvelopeVerifier(allow, "server", state_path=state)


def _cut_last_line(path):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def _edit_last_nonce(path):
    lines = path.read_text().splitlines(keepends=True)
    last = lines[-1]
    nonce = last.split('"n": "')[1][:32]
    flipped = ("0" if nonce[0] != "0" else "1") + nonce[1:]
    lines[-1] = last.replace(nonce, flipped)
    path.write_text("".join(lines))


@pytest.mark.parametrize("damage", ["deleted", "cut", "edited"])
def test_a_recorded_nonce_head_catches_a_lost_nonce_memory(parties, tmp_path, damage):
    """A nonce file deleted, cut or edited after its owner recorded ``nonce_head`` was
    reopened without a word, and the replay of an accepted message went through; with the
    recorded head the reopening is refused (the file left as it was) instead."""
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "client-000", state_path=state)
    first = make_envelope(parties["server"], "client-000", 1, "round", b"a")
    v.verify(first, b"a", 1)
    second = make_envelope(parties["server"], "client-000", 2, "round", b"b")
    v.verify(second, b"b", 2)
    head = v.nonce_head()
    if damage == "deleted":
        state.unlink()
    elif damage == "cut":
        _cut_last_line(state)
    else:
        _edit_last_nonce(state)
    # without the head the damage goes unnoticed: the accepted message is accepted again
    unaware = EnvelopeVerifier(allow, "client-000", state_path=tmp_path / "copy.jsonl")
    if state.exists():
        (tmp_path / "copy.jsonl").write_bytes(state.read_bytes())
        unaware = EnvelopeVerifier(allow, "client-000", state_path=tmp_path / "copy.jsonl")
    assert unaware.verify(second, b"b", 2) is second
    before = state.read_bytes() if state.exists() else None
    with pytest.raises(NonceMemoryLostError, match="accepted again") as err:
        EnvelopeVerifier(allow, "client-000", state_path=state, expect_nonces=head)
    assert str(state) in str(err.value)
    assert ("is missing" if damage == "deleted" else "cut or edited") in str(err.value)
    assert (state.read_bytes() if state.exists() else None) == before


def test_a_nonce_accepted_after_the_recorded_head_is_not_damage(parties, tmp_path):
    """The owner records the head after the nonce is durable: a crash in between leaves
    more nonces than recorded (same round or a later one), which is accepted, and every
    nonce, recorded or not, is still a replay."""
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "client-000", state_path=state, expect_nonces=None)
    first = make_envelope(parties["server"], "client-000", 1, "round", b"a")
    v.verify(first, b"a", 1)
    head = v.nonce_head()
    same_round = make_envelope(parties["server"], "client-000", 1, "evaluate", b"c")
    v.verify(same_round, b"c", 1)  # crash: never recorded
    again = EnvelopeVerifier(allow, "client-000", state_path=state, expect_nonces=head)
    for env, payload in ((first, b"a"), (same_round, b"c")):
        with pytest.raises(ReplayedNonceError):
            again.verify(env, payload, 1)
    later = make_envelope(parties["server"], "client-000", 2, "round", b"d")
    again.verify(later, b"d", 2)  # the floor moves up: round 1's nonces are pruned
    reopened = EnvelopeVerifier(allow, "client-000", state_path=state, expect_nonces=head)
    with pytest.raises(StaleRoundError):
        reopened.verify(first, b"a", 1)
    # a fresh owner (nothing recorded yet) and an empty head accept a missing file
    EnvelopeVerifier(allow, "client-000", state_path=tmp_path / "new.jsonl",
                     expect_nonces={"floor": 0, "nonces": []})
    with pytest.raises(ValueError, match="state_path"):
        EnvelopeVerifier(allow, "client-000", expect_nonces=head)


@pytest.mark.parametrize("damage", [None, "deleted", "cut", "edited"])
def test_check_nonce_memory_reads_only(parties, tmp_path, damage):
    """check_nonce_memory refuses a nonce file that lost a recorded head as reopening with
    ``expect_nonces`` does, accepts one holding more than recorded, and writes nothing
    either way (an owner of several files checks them all before it opens any)."""
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "client-000", state_path=state)
    v.verify(make_envelope(parties["server"], "client-000", 1, "round", b"a"), b"a", 1)
    head = v.nonce_head()
    v.verify(make_envelope(parties["server"], "client-000", 1, "evaluate", b"b"), b"b", 1)
    if damage == "deleted":
        state.unlink()
    elif damage == "cut":  # the extra line and the recorded one
        state.write_text("".join(state.read_text().splitlines(keepends=True)[:-2]))
    elif damage == "edited":
        lines = state.read_text().splitlines(keepends=True)
        state.write_text("".join(lines[:-1]))  # the extra nonce gone: no loss yet
        check_nonce_memory(state, head)
        _edit_last_nonce(state)
    before = state.read_bytes() if state.exists() else None
    if damage is None:
        check_nonce_memory(state, head)
    else:
        with pytest.raises(NonceMemoryLostError, match="accepted again") as err:
            check_nonce_memory(state, head)
        assert str(state) in str(err.value)
    assert (state.read_bytes() if state.exists() else None) == before


def test_malformed_envelopes(parties, caplog):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    d = env.to_dict()
    for mutate, match in [
        (lambda x: x.pop("nonce"), "missing"),
        (lambda x: x.update(extra=1), "unexpected"),
        (lambda x: x.update(version=1), "version"),  # v1 had no context field
        (lambda x: x.update(round=-1), "round"),
        (lambda x: x.update(sender="../x"), "sender"),
        (lambda x: x.update(signature="ab"), "signature"),
        (lambda x: x.update(payload_sha256="g" * 64), "payload_sha256"),
    ]:
        bad = dict(d)
        mutate(bad)
        with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(MalformedEnvelopeError, match=match):
            Envelope.from_dict(bad)
    with pytest.raises(MalformedEnvelopeError, match="magic"):
        decode_message(b"nope" + b"\0" * 10)
    with pytest.raises(MalformedEnvelopeError, match="truncated"):
        decode_message(encode_message(env, b"x")[:20])
    assert any(e["reason"] == "malformed_envelope" for e in _events(caplog))


def test_make_envelope_argument_errors(parties):
    with pytest.raises(ValueError):
        make_envelope(parties["client-000"], "server", -1, "model", b"x")
    with pytest.raises(ValueError):
        make_envelope(parties["client-000"], "server", 1, "", b"x")
    with pytest.raises(TypeError):
        make_envelope(parties["client-000"], "server", 1, "model", "text")  # type: ignore[arg-type]


def test_tensor_checks(parties, verifier, caplog):
    env = make_envelope(parties["client-000"], "server", 3, "model", b"x")
    good = torch.zeros(4, 5)
    assert verifier.check_tensor(good, (4, 5), env) is good
    assert check_tensor(good, (-1, 5), sender="client-000", round=3) is good
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(TensorShapeError) as ei:
        verifier.check_tensor(torch.zeros(4, 6), (4, 5), env, name="theta")
    _assert_rejected(caplog, ei, TensorShapeError, "wrong_shape")
    assert "theta" in str(ei.value) and "(4, 6)" in str(ei.value)
    with pytest.raises(TensorShapeError, match="not a tensor"):
        verifier.check_tensor([1.0], (1,), env)
    bad = good.clone()
    bad[1, 2] = float("nan")
    bad[0, 0] = float("inf")
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(NonFiniteTensorError) as ei:
        verifier.check_tensor(bad, (4, 5), env)
    _assert_rejected(caplog, ei, NonFiniteTensorError, "non_finite_values")
    assert "2 non-finite" in str(ei.value)
    assert check_tensor(torch.arange(3), (3,), sender="c", round=0).dtype == torch.int64


def test_federation_continues_with_remaining_clients(parties, verifier):
    """A rejected client is dropped; the others' messages are still accepted."""
    good = make_envelope(parties["client-001"], "server", 7, "model", b"ok")
    forged = dataclasses.replace(make_envelope(parties["client-000"], "server", 7, "model", b"a"), kind="x")
    accepted, rejected = [], []
    for env, payload in [(forged, b"a"), (good, b"ok")]:
        try:
            verifier.verify(env, payload, 7)
            accepted.append(env.sender)
        except EnvelopeError as exc:
            rejected.append(exc.sender)
    assert accepted == ["client-001"] and rejected == ["client-000"]


# --------------------------------------------------------------------------- batched persistence


def _count_fsyncs(monkeypatch):
    import os

    calls = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_batch_persists_once_rejects_in_batch_duplicate_and_survives_restart(parties, tmp_path,
                                                                             monkeypatch, caplog):
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "server", state_path=state)
    envs = [make_envelope(parties[c], "server", 4, "model", b"x")
            for c in ("client-000", "client-001", "client-000")]
    items = [(e, b"x") for e in envs] + [(envs[1], b"x")]  # the last one replays envs[1]
    fsyncs = _count_fsyncs(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = v.verify_batch(items, 4)
    assert results[:3] == envs
    assert isinstance(results[3], ReplayedNonceError) and "twice in one batch" in str(results[3])
    assert [e["reason"] for e in _events(caplog)] == ["replayed_nonce"]
    assert len(fsyncs) == 1  # one append + one fsync for the whole batch (new floor included)
    lines = state.read_text().splitlines()
    assert len(lines) == 1 + 1 + 3  # compaction's floor, the new floor, three nonces
    # A restarted verifier (same state file) rejects each accepted message as a replay.
    again = EnvelopeVerifier(allow, "server", state_path=state)
    for env in envs:
        with pytest.raises(ReplayedNonceError):
            again.verify(env, b"x", 4)
    assert again.round_floor == 4


def test_batch_write_ahead_and_discard(parties, tmp_path, monkeypatch):
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "server", state_path=state)
    env = make_envelope(parties["client-000"], "server", 1, "model", b"x")
    batch = v.batch()
    batch.verify(env, b"x", 1)
    assert batch.pending == 1
    with pytest.raises(EnvelopeStateError, match="open batch"):
        v.batch()
    # Not committed yet: nothing durable, nothing remembered.
    assert "n" not in state.read_text()
    batch.discard()
    assert v.verify(env, b"x", 1) is env  # a discarded batch did not burn the nonce
    with pytest.raises(EnvelopeStateError, match="already committed"):
        batch.verify(env, b"x", 1)
    # A failed write accepts nothing (write-ahead): the nonce is neither in memory nor on disk.
    other = make_envelope(parties["client-001"], "server", 1, "model", b"y")

    def broken(fd):
        raise OSError("disk full")

    import os

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        v.verify_batch([(other, b"y")], 1)
    monkeypatch.undo()
    assert v.verify(other, b"y", 1) is other  # usable again, and the message still acceptable


def test_shared_journal_one_fsync_for_many_receivers_and_restart(parties, tmp_path, monkeypatch):
    from privacy.envelope import NonceJournal, commit_batches

    allow = {"server": parties["server"].public}
    path = tmp_path / "clients.nonces.jsonl"
    journal = NonceJournal(path)
    v0 = EnvelopeVerifier(allow, "client-000", journal=journal)
    v1 = EnvelopeVerifier(allow, "client-001", journal=journal)
    e0 = make_envelope(parties["server"], "client-000", 2, "phi", b"a")
    e1 = make_envelope(parties["server"], "client-001", 2, "phi", b"b")
    b0, b1 = v0.batch(), v1.batch()
    b0.verify(e0, b"a", 2)
    b1.verify(e1, b"b", 2)
    fsyncs = _count_fsyncs(monkeypatch)
    commit_batches([b0, b1])
    assert len(fsyncs) == 1
    monkeypatch.undo()
    reopened = NonceJournal(path)
    w0 = EnvelopeVerifier(allow, "client-000", journal=reopened)
    w1 = EnvelopeVerifier(allow, "client-001", journal=reopened)
    with pytest.raises(ReplayedNonceError):
        w0.verify(e0, b"a", 2)
    with pytest.raises(ReplayedNonceError):
        w1.verify(e1, b"b", 2)
    # Each receiver's memory is its own: client-001 never saw client-000's nonce.
    assert not w1._nonces.contains("server", e0.nonce) and w0._nonces.contains("server", e0.nonce)
    with pytest.raises(ValueError, match="either"):
        EnvelopeVerifier(allow, "client-000", journal=reopened, state_path=tmp_path / "x")
    path.write_text('{"floor": 1}\n')
    with pytest.raises(EnvelopeStateError, match="without 'to'"):
        NonceJournal(path)


def test_journal_merges_per_party_files_of_the_older_layout(parties, tmp_path):
    from privacy.envelope import NonceJournal

    allow = {"server": parties["server"].public}
    old = tmp_path / "client-000.nonces.jsonl"
    env = make_envelope(parties["server"], "client-000", 3, "phi", b"a")
    EnvelopeVerifier(allow, "client-000", state_path=old).verify(env, b"a", 3)
    journal = NonceJournal(tmp_path / "clients.nonces.jsonl", legacy={"client-000": old})
    assert not old.exists()
    with pytest.raises(ReplayedNonceError):
        EnvelopeVerifier(allow, "client-000", journal=journal).verify(env, b"a", 3)


# --------------------------------------------------------------------- bound and bounded (issue 14)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import privacy.envelope as envelope_module  # noqa: E402
from privacy.envelope import (  # noqa: E402
    DEFAULT_MAX_HEADER_BYTES,
    MessageTooLargeError,
    WrongContextError,
)


def test_context_is_signed_and_checked(parties, caplog):
    allow = {p: i.public for p, i in parties.items()}
    fedora = EnvelopeVerifier(allow, "server", context="run-1/fedora")
    fedavg = EnvelopeVerifier(allow, "server", context="run-1/fedavg")
    env = make_envelope(parties["client-000"], "server", 3, "theta", b"x", context="run-1/fedora")
    assert env.context == "run-1/fedora"
    assert Envelope.from_dict(env.to_dict()) == env
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(WrongContextError) as exc:
        fedavg.verify(env, b"x", 3)
    _assert_rejected(caplog, exc, WrongContextError, "wrong_context")
    # Rewriting the context breaks the signature: it is part of what is signed.
    relabelled = dataclasses.replace(env, context="run-1/fedavg")
    with pytest.raises(BadSignatureError):
        fedavg.verify(relabelled, b"x", 3)
    assert fedora.verify(env, b"x", 3) is env
    # An unbound envelope is refused by a bound receiver, too.
    with pytest.raises(WrongContextError):
        fedora.verify(make_envelope(parties["client-000"], "server", 3, "theta", b"y"), b"y", 3)
    with pytest.raises(ValueError, match="context"):
        make_envelope(parties["client-000"], "server", 3, "theta", b"x", context="a\nb")
    with pytest.raises(ValueError, match="context"):
        EnvelopeVerifier(allow, "server", context="x" * 129)


def _no_parsing_or_hashing(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an oversize message was parsed or hashed")

    monkeypatch.setattr(envelope_module.hashlib, "sha256", forbidden)
    monkeypatch.setattr(envelope_module.json, "loads", forbidden)


def test_oversize_message_and_header_rejected_before_parsing_or_hashing(parties, monkeypatch,
                                                                        caplog):
    payload = b"p" * 2048
    message = encode_message(make_envelope(parties["client-000"], "server", 3, "m", payload),
                             payload)
    # A huge header announced in the length prefix (as for a 200 MB header JSON): rejected on
    # the length alone, before the bytes behind it are even looked at.
    huge_header = b"SFEN" + (200 * 1024 * 1024).to_bytes(4, "big") + b"{" * 64
    _no_parsing_or_hashing(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with pytest.raises(MessageTooLargeError, match="exceeds the cap of 1024 bytes"):
            decode_message(message, max_bytes=1024)
        with pytest.raises(MessageTooLargeError, match="header of 209715200 bytes"):
            decode_message(huge_header)
        with pytest.raises(MessageTooLargeError, match="header"):
            decode_message(message, max_header_bytes=16)
    assert [e["reason"] for e in _events(caplog)][-3:] == ["message_too_large"] * 3


def test_payload_cap_is_checked_before_hashing(parties, monkeypatch):
    allow = {p: i.public for p, i in parties.items()}
    capped = EnvelopeVerifier(allow, "server", max_payload_bytes=100)
    payload = b"q" * 101
    env = make_envelope(parties["client-000"], "server", 3, "m", payload)
    message = encode_message(env, payload)
    _no_parsing_or_hashing(monkeypatch)
    with pytest.raises(MessageTooLargeError, match="payload of 101 bytes"):
        capped.verify(env, payload, 3)
    with pytest.raises(MessageTooLargeError):
        capped.verify_message(message + b"q" * DEFAULT_MAX_HEADER_BYTES, 3)
    with pytest.raises(ValueError, match="max_payload_bytes"):
        EnvelopeVerifier(allow, "server", max_payload_bytes=-1)


def test_non_bytes_and_non_canonical_headers_are_rejections(parties, verifier):
    for bad in ("text", None, 12, ["SFEN"]):
        with pytest.raises(MalformedEnvelopeError, match="must be bytes"):
            decode_message(bad)  # type: ignore[arg-type]
        with pytest.raises(MalformedEnvelopeError):
            verifier.verify_message(bad, 3)  # type: ignore[arg-type]
    env = make_envelope(parties["client-000"], "server", 3, "m", b"x")
    # The same fields spelled differently (spaces, upper-case hex) are not the signed bytes.
    import json as _json
    import struct as _struct

    for header in (_json.dumps(env.to_dict(), sort_keys=True).encode(),
                   _json.dumps({**env.to_dict(), "nonce": env.nonce.upper()}, sort_keys=True,
                               separators=(",", ":")).encode()):
        message = b"SFEN" + _struct.pack(">I", len(header)) + header + b"x"
        with pytest.raises(MalformedEnvelopeError):
            verifier.verify_message(message, 3)
    assert verifier.verify_message(encode_message(env, b"x"), 3)[1] == b"x"


_MUTATION = st.one_of(
    # 0x20 flips the case of a letter (upper-case hex decodes to the same bytes), 0x01 the
    # lowest bit: the spellings most likely to slip through a lenient parser.
    st.tuples(st.just("flip"), st.integers(0, 10_000),
              st.one_of(st.sampled_from([0x01, 0x20]), st.integers(1, 255))),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
)


def _mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for op, pos, value in mutations:
        if op == "flip" and out:
            out[pos % len(out)] ^= value
        elif op == "insert":
            out.insert(pos % (len(out) + 1), value)
        elif op == "delete" and out:
            del out[pos % len(out)]
        elif op == "truncate":
            del out[pos % (len(out) + 1):]
    return bytes(out)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_envelope_bytes_are_always_rejected(parties, mutations):
    """Property: any mutation of a valid message's bytes is rejected with an EnvelopeError
    (never another exception, never accepted) by a fresh verifier that accepts the original."""
    allow = {p: i.public for p, i in parties.items()}
    payload = b"\x00\x01payload bytes"
    env = make_envelope(parties["client-000"], "server", 3, "theta", payload, context="r/fedora")
    original = encode_message(env, payload)
    mutated = _mutate(original, mutations)
    if mutated == original:
        return
    receiver = EnvelopeVerifier(allow, "server", context="r/fedora", max_payload_bytes=4096)
    logging.getLogger(LOGGER).disabled = True
    try:
        with pytest.raises(EnvelopeError):
            receiver.verify_message(mutated, 3)
    finally:
        logging.getLogger(LOGGER).disabled = False
    assert EnvelopeVerifier(allow, "server", context="r/fedora").verify_message(original, 3)


def test_a_refused_or_withdrawn_message_leaves_the_state_file_unchanged(parties, tmp_path):
    """A message that its receiver refused after the envelope checks (its payload) could not
    be taken back out of its batch, so its nonce (and the round floor it raised) was written.
    A withdrawn message, like one the checks refused, writes nothing now; an accepted
    message's nonce is durable at the commit and its replay is refused."""
    allow = {p: i.public for p, i in parties.items()}
    state = tmp_path / "nonces.jsonl"
    v = EnvelopeVerifier(allow, "server", state_path=state)
    before = state.read_bytes()
    good = make_envelope(parties["client-000"], "server", 5, "model", b"x")
    results = v.verify_batch([(good, b"tampered")], 5)
    assert isinstance(results[0], PayloadHashMismatchError)
    assert state.read_bytes() == before and v.round_floor == 0
    with v.batch() as batch:
        batch.verify(good, b"x", 5)
        batch.withdraw(good)  # refused by a later check of its receiver
    assert state.read_bytes() == before
    v.verify(good, b"x", 5)  # still never accepted: it goes through once
    assert state.read_bytes() != before and v.round_floor == 5
    for receiver in (v, EnvelopeVerifier(allow, "server", state_path=state)):
        with pytest.raises(ReplayedNonceError):
            receiver.verify(good, b"x", 5)


def test_a_ledger_folder_splits_into_ledgers_and_nonce_state_files(tmp_path):
    """``ledger_files`` and ``nonce_files`` split a ledger folder's ``*.jsonl`` in one place:
    a ``<party>.nonces.jsonl`` (replay-protection memory) is never a ledger, and other files
    are neither."""
    from privacy.envelope import ledger_files, nonce_files

    for name in ("client-001.jsonl", "client-000.jsonl", "client-000.nonces.jsonl",
                 "model.json", "client-000.journal", "client-000.jsonl.tmp"):
        (tmp_path / name).write_text("")
    assert [p.name for p in ledger_files(tmp_path)] == ["client-000.jsonl", "client-001.jsonl"]
    assert [p.name for p in nonce_files(tmp_path)] == ["client-000.nonces.jsonl"]
    assert ledger_files(tmp_path / "missing") == [] == nonce_files(tmp_path / "missing")
