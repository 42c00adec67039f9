"""Privacy ledger: chain + signatures, tamper detection naming the entry, reopen, crash safety."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.accounting import Accountant
from privacy.ledger import (
    ENTRY_FIELDS,
    GENESIS_HASH,
    LedgerError,
    LedgerWriter,
    canonical_json,
    line_hash,
    read_ledger,
    replay_accountant,
    signing_payload,
    verify_ledger,
    verify_ledger_file,
)
from tests.fifo_support import NOT_REGULAR_KINDS, not_a_regular_file

KEY = Ed25519PrivateKey.generate()
DELTA = 1e-5


def _append(writer: LedgerWriter, rnd: int, eps: float, mechanism: str = "dpsgd",
            nm: float = 1.0, q: float = 0.1, steps: int = 10) -> dict:
    params = {} if mechanism == "refusal" else {"noise_multiplier": nm, "sample_rate": q,
                                                "steps": steps, "clip_norm": 1.0}
    return writer.append(round=rnd, mechanism=mechanism, params=params, epsilon_after=eps,
                         delta=DELTA, budget_epsilon=8.0, accountant="rdp")


def _ledger(tmp_path: Path, n: int = 4) -> Path:
    path = tmp_path / "c1.ledger.jsonl"
    with LedgerWriter(path, "c1", KEY) as w:
        for i in range(n):
            _append(w, i, 0.5 * (i + 1))
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_chain_and_signatures_verify(tmp_path):
    path = _ledger(tmp_path)
    entries = read_ledger(path)
    assert [e["index"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    lines = _lines(path)
    for prev, entry in zip(lines, entries[1:], strict=False):
        assert entry["prev_hash"] == line_hash(prev)
    assert all(canonical_json(e) == line for e, line in zip(entries, lines, strict=True))
    assert set(entries[0]) == {"index", "client_id", "round", "mechanism", "params",
                               "epsilon_after", "delta", "budget_epsilon", "accountant",
                               "timestamp", "prev_hash", "signature"}
    KEY.public_key().verify(bytes.fromhex(entries[2]["signature"]), signing_payload(entries[2]))
    assert verify_ledger_file(path, KEY.public_key()) == []
    assert verify_ledger(entries, KEY.public_key(), client_id="c1") == []


def test_flipped_byte_is_detected_at_that_entry(tmp_path):
    path = _ledger(tmp_path)
    data = bytearray(path.read_bytes())
    lines = _lines(path)
    start = len(lines[0]) + 1  # entry 1
    pos = start + lines[1].index('"epsilon_after":') + len('"epsilon_after":')
    data[pos] = ord("9") if data[pos] != ord("9") else ord("8")
    path.write_bytes(bytes(data))
    problems = verify_ledger_file(path, KEY.public_key())
    assert problems and problems[0].index == 1
    kinds = {(p.index, p.kind) for p in problems}
    assert (1, "bad_signature") in kinds and (2, "broken_chain") in kinds
    with pytest.raises(LedgerError, match="entry 1"):
        LedgerWriter(path, "c1", KEY)


def test_deleted_entry_is_detected(tmp_path):
    path = _ledger(tmp_path)
    lines = _lines(path)
    _write_lines(path, [lines[0], lines[2], lines[3]])
    problems = verify_ledger_file(path, KEY.public_key())
    assert {(p.index, p.kind) for p in problems} >= {(1, "bad_index"), (1, "broken_chain")}
    assert min(p.index for p in problems) == 1


def test_reordered_entries_are_detected(tmp_path):
    path = _ledger(tmp_path)
    lines = _lines(path)
    _write_lines(path, [lines[0], lines[2], lines[1], lines[3]])
    problems = verify_ledger_file(path, KEY.public_key())
    assert min(p.index for p in problems) == 1
    assert {p.kind for p in problems if p.index == 1} >= {"bad_index", "broken_chain"}


def test_forged_signatures_are_detected(tmp_path):
    path = _ledger(tmp_path)
    entries = read_ledger(path)
    forger = Ed25519PrivateKey.generate()
    # Forge entry 2 (lower its epsilon, re-sign with another key, keep the chain shape).
    e2 = dict(entries[2])
    e2["params"] = {**e2["params"], "steps": 1}
    e2["signature"] = forger.sign(signing_payload(e2)).hex()
    lines = _lines(path)
    lines[2] = canonical_json(e2)
    _write_lines(path, lines)
    problems = verify_ledger_file(path, KEY.public_key())
    assert (2, "bad_signature") in {(p.index, p.kind) for p in problems}
    # A whole ledger re-signed by the forger verifies under the forger's key only.
    forged_path = tmp_path / "forged.jsonl"
    with LedgerWriter(forged_path, "c1", forger) as w:
        _append(w, 0, 0.5)
        _append(w, 1, 1.0)
    assert verify_ledger_file(forged_path, forger.public_key()) == []
    bad = verify_ledger_file(forged_path, KEY.public_key())
    assert [(p.index, p.kind) for p in bad] == [(0, "bad_signature"), (1, "bad_signature")]
    with pytest.raises(LedgerError, match="signature"):
        LedgerWriter(forged_path, "c1", KEY)


def _signed_chain(entries: list[dict]) -> list[dict]:
    """Build a correctly chained and signed list from bodies (to test semantic checks)."""
    out, prev = [], GENESIS_HASH
    for i, body in enumerate(entries):
        e = {"index": i, "client_id": "c1", "round": i, "mechanism": "dpsgd",
             "params": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1},
             "epsilon_after": 1.0, "delta": DELTA, "budget_epsilon": 8.0, "accountant": "rdp",
             "timestamp": "2026-01-01T00:00:00.000000Z", "prev_hash": prev, **body}
        e["signature"] = KEY.sign(signing_payload(e)).hex()
        out.append(e)
        prev = line_hash(canonical_json(e))
    return out


def test_semantic_problems_signed_by_the_right_key_are_still_reported():
    entries = _signed_chain([{"epsilon_after": 2.0}, {"epsilon_after": 1.5},
                             {"client_id": "c2", "epsilon_after": 2.5},
                             {"mechanism": "refusal", "params": {}, "epsilon_after": 3.0},
                             {"params": {"noise_multiplier": 1.0}, "epsilon_after": 3.0}])
    kinds = {(p.index, p.kind) for p in verify_ledger(entries, KEY.public_key())}
    assert kinds == {(1, "epsilon_decreased"), (2, "wrong_client"), (3, "refusal_spent"),
                     (4, "bad_fields")}
    named = verify_ledger(entries[:1], KEY.public_key(), client_id="other")
    assert [(p.index, p.kind) for p in named] == [(0, "wrong_client")]


def test_bad_json_and_torn_lines(tmp_path):
    path = _ledger(tmp_path, 2)
    with open(path, "a") as f:
        f.write('{"index": 2, "broken"\n')
    problems = verify_ledger_file(path, KEY.public_key())
    assert [(p.index, p.kind) for p in problems] == [(2, "bad_json")]
    with pytest.raises(LedgerError, match="line 2 is not valid JSON"):
        read_ledger(path)
    (tmp_path / "t").mkdir()
    torn = _ledger(tmp_path / "t", 2)
    with open(torn, "a") as f:
        f.write('{"index":2,"client')
    assert [(p.index, p.kind) for p in verify_ledger_file(torn, KEY.public_key())][-1] == \
        (2, "torn_line")
    with pytest.raises(LedgerError, match="incomplete"):
        read_ledger(torn)
    with pytest.raises(LedgerError, match="incomplete"):
        LedgerWriter(torn, "c1", KEY)


def test_reopen_continues_the_chain(tmp_path):
    path = _ledger(tmp_path, 2)
    with LedgerWriter(path, "c1", KEY) as w:
        assert w.head == (2, line_hash(_lines(path)[-1]))
        assert w.last_epsilon == 1.0
        entry = _append(w, 2, 1.7)
        assert entry["index"] == 2 and entry["prev_hash"] == line_hash(_lines(path)[1])
    assert verify_ledger_file(path, KEY.public_key()) == []
    with pytest.raises(LedgerError, match="client_id is 'c1', expected 'c9'"):
        LedgerWriter(path, "c9", KEY)


def test_writer_locks_and_validates_appends(tmp_path):
    path = tmp_path / "l.jsonl"
    with LedgerWriter(path, "c1", KEY) as w:
        with pytest.raises(LedgerError, match="locked"):
            LedgerWriter(path, "c1", KEY)
        _append(w, 0, 1.0)
        with pytest.raises(LedgerError, match="below the ledger's last"):
            _append(w, 1, 0.5)
        with pytest.raises(LedgerError, match="refusal spends nothing"):
            _append(w, 1, 2.0, mechanism="refusal")
        _append(w, 1, 1.0, mechanism="refusal")
        with pytest.raises(LedgerError, match="lacks 'steps'"):
            w.append(round=2, mechanism="dpsgd", params={"noise_multiplier": 1.0,
                                                         "sample_rate": 0.1},
                     epsilon_after=1.0, delta=DELTA, budget_epsilon=8.0, accountant="rdp")
        with pytest.raises(LedgerError, match="JSON"):
            w.append(round=2, mechanism="x", params={"noise_multiplier": 1.0, "sample_rate": 0.1,
                                                     "steps": 1, "bad": float("nan")},
                     epsilon_after=1.0, delta=DELTA, budget_epsilon=8.0, accountant="rdp")
        with pytest.raises(LedgerError, match="accountant"):
            w.append(round=2, mechanism="x", params={"noise_multiplier": 1.0, "sample_rate": 0.1,
                                                     "steps": 1},
                     epsilon_after=1.0, delta=DELTA, budget_epsilon=8.0, accountant="gdp")
    assert len(read_ledger(path)) == 2
    with pytest.raises(LedgerError, match="does not exist"):
        LedgerWriter(tmp_path / "missing" / "l.jsonl", "c1", KEY)
    with pytest.raises(LedgerError, match="Ed25519PrivateKey"):
        LedgerWriter(tmp_path / "k.jsonl", "c1", KEY.public_key())


def test_append_fsyncs_file_and_directory_before_returning(tmp_path, monkeypatch):
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    path = tmp_path / "f.jsonl"
    w = LedgerWriter(path, "c1", KEY)
    assert len(calls) == 2  # new file, then its directory
    calls.clear()
    _append(w, 0, 1.0)
    assert calls == [w._fd]
    # A failed fsync is an error, not a silent success, and the writer stops appending.
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(LedgerError, match="disk gone"):
        _append(w, 1, 2.0)
    monkeypatch.setattr(os, "fsync", real)
    with pytest.raises(LedgerError, match="earlier write failed"):
        _append(w, 1, 2.0)
    w.close()


def test_killed_after_ledger_write_over_counts_never_under_counts(tmp_path):
    """Child writes the ledger entry of a release, then is SIGKILLed before sending it."""
    path = tmp_path / "crash.jsonl"
    acc = Accountant()
    released_eps = acc.epsilon(DELTA)  # nothing was ever released
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the client process
        try:
            os.close(read_fd)
            w = LedgerWriter(path, "c1", KEY)
            eps = acc.epsilon_after(DELTA, 1.0, 0.1, 10)
            _append(w, 0, eps)
            os.write(write_fd, b"written")  # ... release would be sent now
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(write_fd)
    assert os.read(read_fd, 16) == b"written"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_fd)
    assert verify_ledger_file(path, KEY.public_key()) == []
    entries = read_ledger(path)
    recovered = replay_accountant(entries)
    assert recovered.history == [(1.0, 0.1, 10)]
    assert recovered.epsilon(DELTA) == entries[-1]["epsilon_after"] > released_eps
    with LedgerWriter(path, "c1", KEY) as w:  # the lock died with the child
        _append(w, 1, recovered.epsilon_after(DELTA, 1.0, 0.1, 10))
    assert replay_accountant(read_ledger(path)).epsilon(DELTA) == pytest.approx(
        read_ledger(path)[-1]["epsilon_after"])


def test_replay_skips_refusals_and_rejects_mixed_accountants():
    entries = _signed_chain([{"epsilon_after": 1.0},
                             {"mechanism": "refusal", "params": {}, "epsilon_after": 1.0},
                             {"params": {"noise_multiplier": 2.0, "sample_rate": 1.0,
                                         "steps": 1}, "epsilon_after": 1.2}])
    acc = replay_accountant(entries)
    assert acc.kind == "rdp" and acc.history == [(1.0, 0.1, 1), (2.0, 1.0, 1)]
    entries[2]["accountant"] = "prv"
    with pytest.raises(LedgerError, match="several accountants"):
        replay_accountant(entries)
    assert json.loads(canonical_json(entries[0])) == entries[0]


def test_torn_final_line_is_quarantined_with_a_signed_repair_entry(tmp_path):
    from privacy.ledger import REPAIR, repair_torn_tail

    path = _ledger(tmp_path, 3)
    intact = path.read_bytes()
    torn = b'{"accountant":"rdp","client_id":"c1","del'
    path.write_bytes(intact + torn)
    with pytest.raises(LedgerError, match="incomplete"):
        LedgerWriter(path, "c1", KEY)  # never silently: the writer still refuses it
    repairs = repair_torn_tail(path, "c1", KEY, delta=DELTA, budget_epsilon=8.0, accountant="rdp")
    assert len(repairs) == 1
    repair = repairs[0]
    assert repair.quarantine.parent == path.parent and repair.quarantine.read_bytes() == torn
    assert repair.torn_bytes == len(torn)
    entries = read_ledger(path)
    assert path.read_bytes().startswith(intact) and len(entries) == 4
    last = entries[-1]
    assert last["mechanism"] == REPAIR and last["params"]["quarantine"] == repair.quarantine.name
    assert last["epsilon_after"] == entries[-2]["epsilon_after"]  # spends nothing
    assert verify_ledger_file(path, KEY.public_key(), client_id="c1") == []
    assert replay_accountant(entries).history == replay_accountant(entries[:3]).history
    # idempotent: nothing more to repair
    assert repair_torn_tail(path, "c1", KEY, delta=DELTA, budget_epsilon=8.0, accountant="rdp") == []


def test_quarantine_without_its_repair_entry_gets_one(tmp_path):
    """A crash after quarantining and truncating, before the repair entry: the next repair
    appends the entry, so a recovery never goes unrecorded."""
    from privacy.ledger import repair_torn_tail

    path = _ledger(tmp_path, 2)
    leftover = path.with_name(path.name + ".torn-2-abcdef012345")
    leftover.write_bytes(b'{"index":2')
    repairs = repair_torn_tail(path, "c1", KEY, delta=DELTA, budget_epsilon=8.0, accountant="rdp")
    assert [r.quarantine for r in repairs] == [leftover]
    assert read_ledger(path)[-1]["params"]["quarantine"] == leftover.name


def test_torn_line_after_a_damaged_middle_is_not_repaired(tmp_path):
    from privacy.ledger import repair_torn_tail

    path = _ledger(tmp_path, 3)
    lines = _lines(path)
    lines[1] = lines[1].replace('"round":1', '"round":7')
    path.write_bytes(("".join(line + "\n" for line in lines) + '{"ind').encode())
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="fails verification"):
        repair_torn_tail(path, "c1", KEY, delta=DELTA, budget_epsilon=8.0, accountant="rdp")
    assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))


def test_a_torn_line_at_an_entry_known_complete_is_refused_by_the_repair_itself(tmp_path):
    """The callers checked a cut before each repair (one check per runtime); the repair now
    takes how many entries were complete once and refuses a torn line below that itself,
    writing nothing, and repairs a torn line past them as before."""
    from privacy.ledger import LedgerCutError, repair_torn_tail

    path = _ledger(tmp_path, 3)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + lines[2][:30])  # torn at entry 2
    before = path.read_bytes()
    for complete in (3, 4):
        with pytest.raises(LedgerCutError, match=f"entry 2, but {complete} entries were complete"
                                                 r" once \(the journal\)"):
            repair_torn_tail(path, "c1", KEY, delta=DELTA, budget_epsilon=8.0, accountant="rdp",
                             complete=complete, known_by="the journal")
        assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))
    repairs = repair_torn_tail(path, "c1", KEY, delta=DELTA, budget_epsilon=8.0,
                               accountant="rdp", complete=2)
    assert [r.entry["index"] for r in repairs] == [2]


def test_entries_cut_off_a_ledger_are_restored_from_their_lines(tmp_path):
    """A cut inside or after entries whose lines are kept elsewhere (the release journal
    keeps refusals, closes and repairs) is written back bit for bit, at every cut offset."""
    from privacy.ledger import restore_cut_tail

    path = _ledger(tmp_path, 2)
    with LedgerWriter(path, "c1", KEY) as w:
        w.close_run(round=1, delta=DELTA, budget_epsilon=8.0, accountant="rdp")
    intact = path.read_bytes()
    lines = _lines(path)
    known = {2: lines[2]}
    start = len(intact) - len(lines[2]) - 1
    for cut in range(start, len(intact) + 1):
        path.write_bytes(intact[:cut])
        assert restore_cut_tail(path, "c1", KEY.public_key(), known, write=False) == \
            ([2] if cut < len(intact) else [])
        assert path.read_bytes() == intact[:cut]  # write=False writes nothing
        restore_cut_tail(path, "c1", KEY.public_key(), known)
        assert path.read_bytes() == intact
    # bytes that are not the start of the kept line, or a line of another key: nothing restored
    path.write_bytes(intact[:start] + b'{"x')
    assert restore_cut_tail(path, "c1", KEY.public_key(), known) == []
    path.write_bytes(intact[:start])
    other = Ed25519PrivateKey.generate().public_key()
    assert restore_cut_tail(path, "c1", other, known) == []
    assert path.read_bytes() == intact[:start]


def test_repair_entries_must_spend_nothing(tmp_path):
    path = _ledger(tmp_path, 1)
    with LedgerWriter(path, "c1", KEY) as w, pytest.raises(LedgerError, match="spends nothing"):
        w.append(round=0, mechanism="repair", params={}, epsilon_after=9.0, delta=DELTA,
                 budget_epsilon=8.0, accountant="rdp")


# --------------------------------------------------------------------- close entry (issue 14)


def _close(writer: LedgerWriter, rnd: int = 4) -> dict:
    return writer.close_run(round=rnd, delta=DELTA, budget_epsilon=8.0, accountant="rdp")


def _resigned(entries: list[dict]) -> list[str]:
    """Re-chain and re-sign ``entries`` under KEY (as the ledger's own key holder could)."""
    out, prev = [], GENESIS_HASH
    for i, e in enumerate(entries):
        e = {**e, "index": i, "prev_hash": prev}
        e.pop("signature", None)
        e["signature"] = KEY.sign(signing_payload(e)).hex()
        out.append(canonical_json(e))
        prev = line_hash(out[-1])
    return out


def test_close_entry_ends_the_ledger_and_spends_nothing(tmp_path):
    path = _ledger(tmp_path)
    with LedgerWriter(path, "c1", KEY) as w:
        assert not w.is_closed
        close = _close(w)
        assert close["mechanism"] == "close" and close["index"] == 4
        assert close["params"] == {"final_index": 4, "epsilon_spent": 2.0}
        assert close["epsilon_after"] == 2.0
        assert w.is_closed and w.head == (5, line_hash(_lines(path)[-1]))
        assert _close(w) == close  # idempotent: nothing new is written
        with pytest.raises(LedgerError, match="closed"):
            _append(w, 5, 2.5)
        with pytest.raises(LedgerError, match="close_run"):
            w.append(round=5, mechanism="close", params={}, epsilon_after=2.0, delta=DELTA,
                     budget_epsilon=8.0, accountant="rdp")
    assert len(_lines(path)) == 5
    assert verify_ledger_file(path, KEY.public_key()) == []
    # reopening a closed ledger verifies it and keeps it closed; the accountant ignores it
    with LedgerWriter(path, "c1", KEY) as w:
        assert w.is_closed
        assert replay_accountant(w.entries).history == replay_accountant(w.entries[:-1]).history
    # an empty ledger can be closed too (a client that never released anything)
    with LedgerWriter(tmp_path / "empty.jsonl", "c1", KEY) as w:
        assert _close(w, 0)["params"] == {"final_index": 0, "epsilon_spent": 0.0}


def test_entries_after_close_and_dishonest_closes_are_named(tmp_path):
    path = _ledger(tmp_path)
    with LedgerWriter(path, "c1", KEY) as w:
        _close(w)
    entries = read_ledger(path)
    # a release signed after the close (reordered and re-signed by the key holder)
    moved = _resigned([*entries[:3], entries[4], entries[3]])
    problems = verify_ledger(moved, KEY.public_key())
    kinds = {(p.index, p.kind) for p in problems}
    assert (4, "after_close") in kinds and (3, "bad_close") in kinds
    # a close that claims another index, spends, or states another epsilon
    for edit in (lambda e: e["params"].update(final_index=2),
                 lambda e: e.update(epsilon_after=3.0),
                 lambda e: e["params"].update(epsilon_spent=1.0),
                 lambda e: e.update(params={"final_index": 4})):
        bad = json.loads(json.dumps(entries))
        edit(bad[4])
        problems = verify_ledger(_resigned(bad), KEY.public_key())
        assert [(p.index, p.kind) for p in problems] == [(4, "bad_close")], problems


def test_a_number_too_large_for_a_float_is_a_ledger_error_not_an_overflow(tmp_path):
    path = _ledger(tmp_path, 2)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["epsilon_after"] = 10 ** 400
    lines[1] = json.dumps(entry)
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(LedgerError):
        LedgerWriter(path, "c1", KEY)


def _release_fields(eps: float) -> list[dict]:
    """The two entries of one model release with private validation (DP-SGD, then lambda)."""
    common = {"round": 1, "delta": DELTA, "budget_epsilon": 8.0, "accountant": "rdp"}
    return [
        {**common, "mechanism": "dpsgd", "epsilon_after": eps,
         "params": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "clip_norm": 1.0}},
        {**common, "mechanism": "gaussian_lambda", "epsilon_after": eps + 0.25,
         "params": {"noise_multiplier": 5.0, "sample_rate": 1.0, "steps": 1}},
    ]


def _fsync_counter(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_append_many_writes_the_lines_of_consecutive_appends_with_one_fsync(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr("privacy.ledger._utc_now", lambda: "2026-01-01T00:00:00.000000Z")
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    with LedgerWriter(one, "c1", KEY) as w:
        _append(w, 0, 0.5)
        singles = [w.append(**fields) for fields in _release_fields(1.0)]
    with LedgerWriter(many, "c1", KEY) as w:
        _append(w, 0, 0.5)
        calls = _fsync_counter(monkeypatch)
        batch = w.append_many(_release_fields(1.0))
        assert len(calls) == 1  # one fsync for the release's two lines
        head = w.head
        assert w.last_epsilon == 1.25 and len(w.entries) == 3
    assert many.read_bytes() == one.read_bytes()  # same lines, hashes, signatures
    assert batch == singles
    assert head == (3, line_hash(_lines(one)[-1]))
    assert verify_ledger_file(many, KEY.public_key(), client_id="c1") == []


def test_append_many_writes_nothing_when_one_entry_is_refused(tmp_path):
    path = _ledger(tmp_path, n=1)
    before = path.read_bytes()
    fields = _release_fields(1.0)
    fields[1]["epsilon_after"] = 0.9  # below the first entry of the same batch
    with LedgerWriter(path, "c1", KEY) as w:
        with pytest.raises(LedgerError, match="below the ledger's last 1.0"):
            w.append_many(fields)
        with pytest.raises(LedgerError, match="close_run"):
            w.append_many([{**fields[0], "mechanism": "close"}])
        with pytest.raises(LedgerError, match="at least one"):
            w.append_many([])
        assert path.read_bytes() == before
        w.append_many(_release_fields(1.0))  # the writer is still usable
    assert [e["mechanism"] for e in read_ledger(path)] == ["dpsgd", "dpsgd", "gaussian_lambda"]


@pytest.mark.parametrize("cut", ["first_torn", "second_lost", "second_torn"])
def test_a_crash_inside_a_batch_write_leaves_a_tail_the_repair_handles(tmp_path, cut):
    """A process killed inside append_many leaves a prefix of the release's lines: the first
    torn, the first complete and the second missing, or the second torn; each is what a crash
    inside or between two single appends left, and each reopens after the repair."""
    from privacy.ledger import REPAIR, repair_torn_tail
    path = _ledger(tmp_path, n=1)
    start = len(path.read_bytes())
    with LedgerWriter(path, "c1", KEY) as w:
        w.append_many(_release_fields(1.0))
    data = path.read_bytes()
    first_end = data.index(b"\n", start) + 1
    size = {"first_torn": start + 40, "second_lost": first_end,
            "second_torn": first_end + 40}[cut]
    path.write_bytes(data[:size])
    repairs = repair_torn_tail(path, "c1", KEY, delta=DELTA, budget_epsilon=8.0,
                               accountant="rdp")
    assert len(repairs) == (0 if cut == "second_lost" else 1)
    entries = read_ledger(path)
    kept = {"first_torn": ["dpsgd", REPAIR], "second_lost": ["dpsgd", "dpsgd"],
            "second_torn": ["dpsgd", "dpsgd", REPAIR]}[cut]
    assert [e["mechanism"] for e in entries] == kept
    assert verify_ledger_file(path, KEY.public_key(), client_id="c1") == []
    with LedgerWriter(path, "c1", KEY) as w:  # appends go on after the repair
        w.append_many(_release_fields(2.0))
    assert verify_ledger_file(path, KEY.public_key(), client_id="c1") == []


def test_readme_names_every_ledger_entry_field():
    """README's "Ledger files" paragraph lists exactly the fields an entry holds."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    paragraph = readme.split("**Ledger files.**", 1)[1].split("\n- ", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", paragraph))
    assert set(ENTRY_FIELDS) <= named


@pytest.mark.parametrize("kind", NOT_REGULAR_KINDS)
def test_a_ledger_path_that_is_no_regular_file_is_refused_by_every_reader(tmp_path, kind):
    """read_ledger and verify_ledger_file read a link to /dev/zero whole (out of memory) and
    waited forever on a FIFO (found by generated corruptions of a run's ledgers): each now
    raises LedgerError naming the file, at once."""
    with not_a_regular_file(tmp_path / "c1.jsonl", kind) as path:
        for reader in (read_ledger, lambda p: verify_ledger_file(p, KEY.public_key())):
            with pytest.raises(LedgerError, match=re.escape(str(path))):
                reader(path)
