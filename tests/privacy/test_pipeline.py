"""Release pipeline: postprocessors, budget gate refusal, ledger written before release."""

from __future__ import annotations

import os

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.accounting import Accountant, BudgetExceededError, MechanismRecord, PrivacyBudget
from privacy.ledger import (
    LedgerError,
    LedgerWriter,
    read_ledger,
    replay_accountant,
    verify_ledger_file,
)
from privacy.mechanisms import second_moment_sensitivity, top_eigenvectors
from privacy.noise import ReproducibleNoise
from privacy.pipeline import (
    BudgetGate,
    ClipRows,
    GaussianNoise,
    PipelineError,
    Postprocessor,
    Release,
    ReleasePipeline,
    Transform,
)

KEY = Ed25519PrivateKey.generate()
DELTA = 1e-5


def _gate(tmp_path, budget_eps: float = 5.0, accountant: Accountant | None = None) -> BudgetGate:
    ledger = LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY)
    return BudgetGate(accountant or Accountant(), PrivacyBudget(budget_eps, DELTA), ledger, "c1")


def _dpsgd(steps: int = 20, nm: float = 1.0) -> MechanismRecord:
    return MechanismRecord("dpsgd", nm, 0.1, steps, {"clip_norm": 1.0})


def test_summary_pipeline_releases_and_ledgers(tmp_path):
    gate = _gate(tmp_path)
    n, r, sigma = 100, 1.0, 4.0
    second_moment = Transform(lambda z: z.T @ z / n, "second_moment")
    pipe = ReleasePipeline([
        ClipRows(r), second_moment,
        GaussianNoise(sigma, second_moment_sensitivity(r, n), ReproducibleNoise(0),
                      mechanism="gaussian_summary", params={"clip_norm": r, "n": n}),
        Transform(lambda m: top_eigenvectors(m, 1), "top_eigenvectors"),
        gate,
    ])
    z = torch.randn(n, 6, generator=torch.Generator().manual_seed(1)) * 3
    out = pipe.run(Release("summary", z, round=0))
    assert out.payload.shape == (6, 1) and out.metadata["row_clip_norm"] == r
    assert [rec.mechanism for rec in out.records] == ["gaussian_summary"]
    entries = read_ledger(tmp_path / "c1.jsonl")
    assert len(entries) == 1 and entries[0]["mechanism"] == "gaussian_summary"
    assert entries[0]["params"]["noise_multiplier"] == sigma
    assert entries[0]["params"]["sensitivity"] == r**2 / n
    assert gate.accountant.history == [(sigma, 1.0, 1)]
    assert entries[0]["epsilon_after"] == gate.accountant.epsilon(DELTA)
    assert out.metadata["ledger_index"] == 0 and out.metadata["ledger_head"] == gate.ledger.head[1]
    assert verify_ledger_file(tmp_path / "c1.jsonl", KEY.public_key()) == []


def test_several_records_get_cumulative_entries(tmp_path):
    gate = _gate(tmp_path)
    lam = MechanismRecord("gaussian_lambda", 5.0, 1.0, 1, {"clip": 1.0})
    out = ReleasePipeline([gate]).run(Release("model", torch.zeros(3), 2, [_dpsgd(), lam]))
    entries = read_ledger(tmp_path / "c1.jsonl")
    assert [e["mechanism"] for e in entries] == ["dpsgd", "gaussian_lambda"]
    assert 0 < entries[0]["epsilon_after"] < entries[1]["epsilon_after"]
    assert entries[1]["epsilon_after"] == gate.accountant.epsilon(DELTA)
    assert out.metadata["epsilon_after"] == entries[1]["epsilon_after"]
    assert all(e["round"] == 2 and e["params"]["release_kind"] == "model" for e in entries)


def test_refusal_at_budget_returns_nothing_records_refusal_and_spends_nothing(tmp_path):
    acc = Accountant()
    gate = _gate(tmp_path, budget_eps=1.0, accountant=acc)
    pipe = ReleasePipeline([gate])
    pipe.run(Release("model", torch.zeros(2), 0, [_dpsgd(steps=5, nm=2.0)]))
    history, spent = acc.history, acc.epsilon(DELTA)
    assert spent < 1.0
    out = None
    with pytest.raises(BudgetExceededError) as info:
        out = pipe.run(Release("model", torch.zeros(2), 1, [_dpsgd(steps=500, nm=1.0)]))
    assert out is None
    err = info.value
    assert err.client_id == "c1" and err.round == 1 and err.mechanism == "dpsgd"
    assert err.epsilon_would_be > 1.0 and "'c1'" in str(err) and "round 1" in str(err)
    assert acc.history == history and acc.epsilon(DELTA) == spent
    entries = read_ledger(tmp_path / "c1.jsonl")
    assert [e["mechanism"] for e in entries] == ["dpsgd", "refusal"]
    refusal = entries[1]
    assert refusal["epsilon_after"] == spent and refusal["round"] == 1
    assert refusal["params"]["epsilon_would_be"] == err.epsilon_would_be
    assert refusal["params"]["refused"][0]["steps"] == 500
    # Closed: even a release that would fit is refused now, and that is recorded too.
    with pytest.raises(BudgetExceededError, match="earlier release was refused"):
        pipe.run(Release("model", torch.zeros(2), 2, [_dpsgd(steps=1, nm=50.0)]))
    assert acc.history == history
    assert [e["mechanism"] for e in read_ledger(tmp_path / "c1.jsonl")][-1] == "refusal"
    assert verify_ledger_file(tmp_path / "c1.jsonl", KEY.public_key()) == []
    # After a restart the gate is still closed.
    gate.ledger.close()
    reopened = BudgetGate(acc, PrivacyBudget(1.0, DELTA),
                          LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY), "c1")
    assert reopened.closed


def test_ledger_is_durable_before_the_release_is_returned(tmp_path, monkeypatch):
    acc = Accountant()
    gate = _gate(tmp_path, accountant=acc)
    pipe = ReleasePipeline([gate])
    seen_on_disk: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        real(fd)
        seen_on_disk.append(len(read_ledger(tmp_path / "c1.jsonl")))

    monkeypatch.setattr(os, "fsync", spy)
    out = pipe.run(Release("model", torch.zeros(2), 0, [_dpsgd()]))
    assert seen_on_disk == [1] and out.metadata["ledger_index"] == 0
    # If the ledger cannot be made durable, nothing is returned and nothing is recorded.
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    history = acc.history
    with pytest.raises(LedgerError, match="io error"):
        pipe.run(Release("model", torch.zeros(2), 1, [_dpsgd()]))
    assert acc.history == history


def test_partial_failure_keeps_accountant_equal_to_ledger(tmp_path, monkeypatch):
    acc = Accountant()
    gate = _gate(tmp_path, accountant=acc)
    real_append = LedgerWriter.append
    calls = []

    def flaky(self, **kw):
        calls.append(kw["mechanism"])
        if len(calls) == 2:
            raise LedgerError("simulated failure on the second entry")
        return real_append(self, **kw)

    monkeypatch.setattr(LedgerWriter, "append", flaky)
    lam = MechanismRecord("gaussian_lambda", 5.0, 1.0, 1)
    with pytest.raises(LedgerError, match="simulated"):
        ReleasePipeline([gate]).run(Release("model", torch.zeros(2), 0, [_dpsgd(), lam]))
    assert replay_accountant(read_ledger(tmp_path / "c1.jsonl")).history == acc.history
    assert acc.history == [(1.0, 0.1, 20)]


def test_gate_refuses_an_accountant_that_lags_the_ledger(tmp_path):
    gate = _gate(tmp_path)
    ReleasePipeline([gate]).run(Release("model", torch.zeros(2), 0, [_dpsgd()]))
    gate.ledger.close()
    stale = Accountant()  # e.g. state saved before the crash
    with pytest.raises(LedgerError, match="replay_accountant"):
        BudgetGate(stale, PrivacyBudget(5.0, DELTA), LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY),
                   "c1")
    fixed = replay_accountant(read_ledger(tmp_path / "c1.jsonl"))
    with LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY) as ledger:
        BudgetGate(fixed, PrivacyBudget(5.0, DELTA), ledger, "c1")
        with pytest.raises(LedgerError, match="accountant"):
            BudgetGate(Accountant("prv"), PrivacyBudget(5.0, DELTA), ledger, "c1")
        with pytest.raises(PipelineError, match="client"):
            BudgetGate(fixed, PrivacyBudget(5.0, DELTA), ledger, "c2")


def test_pipeline_and_release_validation(tmp_path):
    gate = _gate(tmp_path)
    with pytest.raises(PipelineError, match="no mechanism record"):
        ReleasePipeline([gate]).run(Release("model", torch.zeros(2), 0))
    with pytest.raises(PipelineError, match="last stage"):
        ReleasePipeline([ClipRows(1.0)])
    with pytest.raises(PipelineError, match="last stage"):
        ReleasePipeline([gate, ClipRows(1.0)])
    with pytest.raises(PipelineError, match="process"):
        ReleasePipeline([object(), gate])
    noise = GaussianNoise(1.0, 1.0, ReproducibleNoise(0))
    with pytest.raises(PipelineError, match="Tensor payload"):
        noise.process(Release("enc", b"ciphertext", 0))
    with pytest.raises(PipelineError, match="round"):
        Release("model", torch.zeros(1), -1)
    with pytest.raises(PipelineError, match="payload"):
        Release("model", [1.0], 0)
    assert isinstance(noise, Postprocessor) and isinstance(gate, Postprocessor)
    # bytes payloads (e.g. after an encryption stage) pass the gate untouched
    out = ReleasePipeline([gate]).run(Release("enc", b"\x01\x02", 0, [_dpsgd()]))
    assert out.payload == b"\x01\x02"
    # without a gate the pipeline still runs when explicitly allowed
    free = ReleasePipeline([ClipRows(1.0)], require_gate=False)
    assert free.run(Release("z", torch.full((2, 2), 5.0), 0)).payload.norm(dim=1).max() <= 1.0 + 1e-6


def test_replay_consumes_recorded_entries_instead_of_accounting_again(tmp_path):
    gate = _gate(tmp_path, budget_eps=50.0)
    for rnd in (1, 2):
        gate.process(Release("model", torch.zeros(3), rnd, [_dpsgd()]))
    gate.ledger.close()
    ledger = LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY)
    resumed = BudgetGate(replay_accountant(ledger.entries), PrivacyBudget(50.0, DELTA), ledger, "c1")
    resumed.replay_from(1)  # the checkpoint holds round 1; round 2 is computed again
    assert resumed.replaying == 1
    out = resumed.process(Release("model", torch.zeros(3), 2, [_dpsgd()]))
    assert out.metadata["replayed_entries"] == 1 and out.metadata["ledger_index"] == 1
    assert len(ledger.entries) == 2 and resumed.replaying == 0
    resumed.process(Release("model", torch.zeros(3), 3, [_dpsgd()]))  # past the end: appends
    assert [e["round"] for e in read_ledger(tmp_path / "c1.jsonl")] == [1, 2, 3]


def test_replay_refuses_a_release_other_than_the_recorded_one(tmp_path):
    gate = _gate(tmp_path)
    gate.process(Release("model", torch.zeros(3), 1, [_dpsgd()]))
    gate.replay_from(0)
    with pytest.raises(LedgerError, match="resume diverged"):
        gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(nm=2.0)]))
    with pytest.raises(LedgerError, match="resume diverged"):
        gate.process(Release("summary", torch.zeros(3), 1, [_dpsgd()]))
    assert len(gate.ledger.entries) == 1


def test_replay_raises_a_recorded_refusal_again_without_a_new_entry(tmp_path):
    gate = _gate(tmp_path, budget_eps=1.0)
    with pytest.raises(BudgetExceededError) as first:
        gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(steps=500, nm=0.5)]))
    gate.replay_from(0)
    assert not gate.closed
    with pytest.raises(BudgetExceededError) as again:
        gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(steps=500, nm=0.5)]))
    assert str(again.value) == str(first.value) and gate.closed
    assert len(gate.ledger.entries) == 1


def test_replay_finishes_a_release_cut_between_its_entries(tmp_path):
    gate = _gate(tmp_path)
    lam = MechanismRecord("gaussian_lambda", 5.0, 1.0, 1, {"clip_norm": 1.0})
    gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(), lam]))
    full = [(e["mechanism"], e["epsilon_after"]) for e in gate.ledger.entries]
    gate.ledger.close()
    lines = (tmp_path / "c1.jsonl").read_text().splitlines()
    (tmp_path / "c1.jsonl").write_text(lines[0] + "\n")  # killed after the first entry
    ledger = LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY)
    resumed = BudgetGate(replay_accountant(ledger.entries), PrivacyBudget(5.0, DELTA), ledger, "c1")
    resumed.replay_from(0)
    out = resumed.process(Release("model", torch.zeros(3), 1, [_dpsgd(), lam]))
    assert out.metadata["replayed_entries"] == 1
    got = [(e["mechanism"], e["epsilon_after"]) for e in ledger.entries]
    assert [m for m, _ in got] == [m for m, _ in full]
    assert got[1][1] == pytest.approx(full[1][1], rel=1e-12)
