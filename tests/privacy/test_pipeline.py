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
from privacy.mechanisms import (
    MechanismError,
    noised_scalar,
    noised_second_moment,
    scalar_record,
    second_moment_sensitivity,
    summary_record,
    top_eigenvectors,
)
from privacy.noise import ReproducibleNoise
from privacy.pipeline import (
    NOISE_STATE,
    AccountedWith,
    AfterGate,
    BudgetGate,
    CheckExecutedSteps,
    ClampValues,
    ClipRows,
    EncryptPayload,
    GaussianNoise,
    JournalRelease,
    PipelineError,
    Postprocessor,
    RecordParams,
    Release,
    ReleasePipeline,
    SignEnvelope,
    StepCounter,
    StepCountMismatchError,
    Transform,
    noised_mean_stages,
    second_moment_stages,
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


def test_a_release_s_ledger_entries_are_durable_with_one_fsync_and_the_lines_of_two_appends(
        tmp_path, monkeypatch):
    """A model release with private validation (DP-SGD + lambda) wrote and fsynced each entry
    on its own (two fsyncs); the gate now writes them as one batch, with the same lines."""
    monkeypatch.setattr("privacy.ledger._utc_now", lambda: "2026-01-01T00:00:00.000000Z")
    lam = MechanismRecord("gaussian_lambda", 5.0, 1.0, 1)
    gate = _gate(tmp_path)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    out = ReleasePipeline([gate]).run(Release("model", torch.zeros(2), 0, [_dpsgd(), lam]))
    assert len(calls) == 1
    assert out.metadata["ledger_indices"] == [0, 1]
    assert gate.accountant.history == [(1.0, 0.1, 20), (5.0, 1.0, 1)]
    single = tmp_path / "single"
    single.mkdir()
    with LedgerWriter(single / "c1.jsonl", "c1", KEY) as ledger:
        for entry in read_ledger(tmp_path / "c1.jsonl"):
            ledger.append(**{k: entry[k] for k in ("round", "mechanism", "params",
                                                   "epsilon_after", "delta", "budget_epsilon",
                                                   "accountant")})
    assert (single / "c1.jsonl").read_bytes() == (tmp_path / "c1.jsonl").read_bytes()


def test_a_failed_ledger_write_records_nothing_and_passes_nothing_more(tmp_path, monkeypatch):
    """The write of a release's entries dies after its first line: nothing is recorded in the
    accountant, the error propagates and the gate passes nothing more; reopened, repaired and
    replayed, the ledger over-counts the unreleased line, never under-counts."""
    import privacy.ledger as ledger_module
    from privacy.ledger import repair_torn_tail
    acc = Accountant()
    gate = _gate(tmp_path, accountant=acc)
    real_write = ledger_module.write_all_and_fsync

    def dies_inside(fd: int, data: bytes) -> None:
        real_write(fd, data[:data.index(b"\n") + 30])
        raise OSError("simulated: disk full inside the second line")

    monkeypatch.setattr(ledger_module, "write_all_and_fsync", dies_inside)
    lam = MechanismRecord("gaussian_lambda", 5.0, 1.0, 1)
    with pytest.raises(LedgerError, match="disk full"):
        ReleasePipeline([gate]).run(Release("model", torch.zeros(2), 0, [_dpsgd(), lam]))
    assert acc.history == []
    monkeypatch.setattr(ledger_module, "write_all_and_fsync", real_write)
    with pytest.raises(LedgerError, match="an earlier write failed"):
        ReleasePipeline([gate]).run(Release("model", torch.zeros(2), 1, [_dpsgd()]))
    gate.ledger.close()
    repair_torn_tail(tmp_path / "c1.jsonl", "c1", KEY, delta=DELTA, budget_epsilon=5.0,
                     accountant="rdp")
    assert replay_accountant(read_ledger(tmp_path / "c1.jsonl")).history == [(1.0, 0.1, 20)]


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


def test_replay_under_other_accountant_parameters_names_them(tmp_path):
    """A run resumed by a toolkit whose accountant writes other parameters (PRV's error term
    changed between versions) is refused, and the error says that the accountant changed,
    not that the inputs did."""
    gate = _gate(tmp_path, budget_eps=50.0, accountant=Accountant("prv", prv_eps_error=0.01))
    gate.process(Release("model", torch.zeros(3), 1, [_dpsgd()]))
    gate.ledger.close()
    ledger = LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY)
    other = Accountant("prv", prv_eps_error=0.02)
    other.record(1.0, 0.1, 20)  # the ledger's history, under other parameters
    resumed = BudgetGate(other, PrivacyBudget(50.0, DELTA), ledger, "c1")
    resumed.replay_from(0)
    with pytest.raises(LedgerError, match=r"entry 0 was accounted with accountant parameters .*"
                                          r"\"eps_error\":0\.01.*this run's accountant has .*"
                                          r"\"eps_error\":0\.02.*resume with the version that"):
        resumed.process(Release("model", torch.zeros(3), 1, [_dpsgd()]))
    assert len(read_ledger(tmp_path / "c1.jsonl")) == 1


def test_a_prv_ledger_written_before_the_refined_pass_resumes_under_its_parameters(tmp_path):
    """Entries written the way versions before PRV's refining pass wrote them (their
    accountant_params lack refined_eps_error, their epsilon is Opacus's single pass): the
    replayed accountant keeps those parameters, the replayed release is consumed, and a new
    one records the old parameters with the old analysis's epsilon, never a lower one."""
    from opacus.accountants import PRVAccountant

    old_params = {"name": "prv", "library": "opacus", "eps_error": 0.01,
                  "delta_error": "delta/1000"}

    def old_epsilon(history):
        acc = PRVAccountant()
        acc.history = list(history)
        return acc.get_epsilon(DELTA, eps_error=0.01, delta_error=DELTA / 1000)

    record = _dpsgd(nm=8.0)
    ledger = LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY)
    for rnd in (1, 2):
        ledger.append(round=rnd, mechanism="dpsgd",
                      params={"release_kind": "model", **record.ledger_params(),
                              "accountant_params": old_params},
                      epsilon_after=old_epsilon([(8.0, 0.1, 20 * rnd)]), delta=DELTA,
                      budget_epsilon=50.0, accountant="prv")
    ledger.close()
    ledger = LedgerWriter(tmp_path / "c1.jsonl", "c1", KEY)
    accountant = replay_accountant(ledger.entries)
    assert accountant.parameters == old_params
    resumed = BudgetGate(accountant, PrivacyBudget(50.0, DELTA), ledger, "c1")
    resumed.replay_from(1)
    out = resumed.process(Release("model", torch.zeros(3), 2, [_dpsgd(nm=8.0)]))
    assert out.metadata["replayed_entries"] == 1
    resumed.process(Release("model", torch.zeros(3), 3, [_dpsgd(nm=8.0)]))
    entries = read_ledger(tmp_path / "c1.jsonl")
    assert [e["params"]["accountant_params"] for e in entries] == [old_params] * 3
    assert entries[2]["epsilon_after"] == old_epsilon([(8.0, 0.1, 60)])
    assert entries[2]["epsilon_after"] > Accountant("prv").epsilon_after(DELTA, 8.0, 0.1, 60)


def test_replay_refuses_a_release_other_than_the_recorded_one(tmp_path):
    gate = _gate(tmp_path)
    gate.process(Release("model", torch.zeros(3), 1, [_dpsgd()]))
    gate.replay_from(0)
    with pytest.raises(LedgerError, match="resume diverged"):
        gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(nm=2.0)]))
    with pytest.raises(LedgerError, match="resume diverged"):
        gate.process(Release("summary", torch.zeros(3), 1, [_dpsgd()]))
    assert len(gate.ledger.entries) == 1


def test_a_release_diverging_in_its_second_record_consumes_no_recorded_entry(tmp_path):
    """A resumed two-record release whose first record matches the ledger and whose second
    does not was refused after the first entry was consumed: the cursor moved, so the right
    release presented next was matched against the wrong entry. Now nothing is consumed."""
    lam = MechanismRecord("gaussian_lambda", 5.0, 1.0, 1, {"clip_norm": 1.0})
    gate = _gate(tmp_path)
    admitted = gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(), lam]))
    gate.replay_from(0)
    other = MechanismRecord("gaussian_lambda", 4.0, 1.0, 1, {"clip_norm": 1.0})
    with pytest.raises(LedgerError, match="resume diverged"):
        gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(), other]))
    assert gate.replaying == 2
    out = gate.process(Release("model", torch.zeros(3), 1, [_dpsgd(), lam]))
    assert out.metadata["replayed_entries"] == 2 and gate.replaying == 0
    assert out.metadata["ledger_indices"] == admitted.metadata["ledger_indices"]
    assert len(gate.ledger.entries) == 2


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


# -- the stages of the release path -------------------------------------------------------


def test_second_moment_and_noised_mean_stages_equal_the_mechanisms_bit_for_bit():
    z = torch.randn(40, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    stages = second_moment_stages(2.0, 40, 2, 3.0, ReproducibleNoise(7))
    out = ReleasePipeline(stages, require_gate=False).run(Release("summary", z, 0))
    expected = top_eigenvectors(noised_second_moment(z, 2.0, 3.0, ReproducibleNoise(7), n=40), 2)
    assert torch.equal(out.payload, expected)
    assert out.records == [summary_record(2.0, 3.0, 40, 2)]
    v = torch.randn(25, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ReleasePipeline(noised_mean_stages(0.5, 30, 2.0, ReproducibleNoise(4)),
                          require_gate=False).run(Release("lambda", v, 1))
    assert torch.equal(out.payload, noised_scalar(v, 0.5, 2.0, ReproducibleNoise(4), m=30))
    assert out.records == [scalar_record(0.5, 2.0, 30)]
    with pytest.raises(MechanismError, match="q"):
        second_moment_stages(2.0, 40, 0, 3.0, ReproducibleNoise(7))
    with pytest.raises(PipelineError, match="1-D"):
        ClampValues(1.0).process(Release("lambda", torch.zeros(2, 2), 0))


def test_after_gate_stages_only_follow_the_gate_and_never_change_the_records(tmp_path):
    gate = _gate(tmp_path)
    counter = StepCounter()
    check = CheckExecutedSteps(gate, counter, 1.0, 0.1)
    with pytest.raises(PipelineError, match="last stage"):
        ReleasePipeline([check, gate])
    with pytest.raises(PipelineError, match="last stage"):
        ReleasePipeline([gate, check, ClipRows(1.0)])
    with pytest.raises(PipelineError, match="last stage"):
        ReleasePipeline([gate, gate])
    with pytest.raises(PipelineError, match="last stage"):
        ReleasePipeline([check], require_gate=False)

    class Sneaky(AfterGate):
        def process(self, release):
            return release.replace(records=[])

    pipe = ReleasePipeline([gate, Sneaky()])
    with pytest.raises(PipelineError, match="changed the release's records"):
        pipe.run(Release("model", torch.zeros(2), 0, [_dpsgd()]))
    # the after-gate stages' prechecks read the kind and round a call starts with
    renamed = ReleasePipeline([Transform(lambda p: p, "t")], require_gate=False)
    renamed.stages[0].process = lambda r: r.replace(kind="other")
    with pytest.raises(PipelineError, match="changed the release's kind or round"):
        renamed.run(Release("model", torch.zeros(2), 0))
    # a release that did not pass the gate cannot enter the stages after it
    pipe = ReleasePipeline([gate, check])
    with pytest.raises(PipelineError, match="did not pass"):
        pipe.run(Release("model", torch.zeros(2), 1, [_dpsgd()]), start=pipe.index(CheckExecutedSteps))
    with pytest.raises(PipelineError, match="no SignEnvelope"):
        pipe.index(SignEnvelope)


def test_a_model_release_runs_in_two_calls_and_the_step_check_refuses_a_skipped_step(tmp_path):
    gate = _gate(tmp_path)
    counter = StepCounter()
    signed = []
    pipe = ReleasePipeline([gate, CheckExecutedSteps(gate, counter, 1.0, 0.1),
                            SignEnvelope(lambda r: signed.append(r.round) or b"envelope")])
    check = pipe.index(CheckExecutedSteps)
    admitted = pipe.run(Release("model", torch.zeros(2), 1, [_dpsgd(steps=3)]), stop=check)
    assert read_ledger(tmp_path / "c1.jsonl")[-1]["params"]["steps"] == 3 and signed == []
    for _ in range(3):
        counter.count()  # the optimizer's step hook
    out = pipe.run(admitted.replace(payload=torch.ones(2)), start=check)
    assert out.payload == b"envelope" and out.metadata["signed"] and signed == [1]
    assert out.records == admitted.records
    # round 2: one step skipped (e.g. a wrapped oracle that drops a step)
    admitted = pipe.run(Release("model", torch.zeros(2), 2, [_dpsgd(steps=3)]), stop=check)
    counter.reset()
    counter.count()
    counter.count()
    spent = gate.accountant.epsilon(DELTA)
    with pytest.raises(StepCountMismatchError, match="executed 2 DP-SGD steps in round 2,"
                                                     " its ledger accounted 3") as info:
        pipe.run(admitted, start=check)
    assert isinstance(info.value.refusal, BudgetExceededError) and signed == [1]
    last = read_ledger(tmp_path / "c1.jsonl")[-1]
    assert last["mechanism"] == "refusal" and "step count mismatch" in last["params"]["reason"]
    assert last["params"]["epsilon_would_be"] == spent and gate.closed
    # a release the gate never admitted is unaccounted whatever was executed
    with pytest.raises(StepCountMismatchError, match="accounted None"):
        CheckExecutedSteps(gate, counter, 1.0, 0.1).process(Release("model", torch.zeros(1), 3))


def test_journal_stage_records_once_strips_the_noise_state_and_catches_divergence(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from privacy.journal import JournalError, ReleaseJournal, payload_digest

    gate = _gate(tmp_path, budget_eps=10.0)
    journal = ReleaseJournal(tmp_path / "c1.journal", "c1", "m", X25519PrivateKey.generate())
    stage = JournalRelease(journal, "c1", keep_noise_state=True)
    pipe = ReleasePipeline([gate, stage])
    payload = torch.arange(4.0)
    out = pipe.run(Release("model", payload, 1, [_dpsgd()], {NOISE_STATE: b"state"}))
    assert NOISE_STATE not in out.metadata and out.metadata["journal_bytes"] > 0
    record = journal.get(1, "model")
    assert record.noise_state == b"state" and record.ledger_index == 0
    assert record.payload_sha256 == payload_digest(payload.numpy().tobytes())
    # the same (round, kind) again without a resume: an earlier run's journal
    with pytest.raises(JournalError, match="earlier run"):
        stage.process(out)
    stage.conflict = " known to this runtime"  # a runtime's own reading of the record
    with pytest.raises(JournalError, match="round-1 'model' release known to this runtime$"):
        stage.process(out)
    stage.resumed = True
    assert stage.process(out).metadata["journal_bytes"] == 0  # the re-made release matches
    with pytest.raises(LedgerError, match="resume diverged"):
        stage.process(out.replace(payload=torch.zeros(4)))
    # an encrypted (bytes) payload passes the gate and is journaled by its bytes
    encrypted = ReleasePipeline([EncryptPayload(lambda t: b"ct" + t.numpy().tobytes(), "test"),
                                 gate, stage]).run(Release("upload", payload, 2, [_dpsgd()]))
    assert encrypted.metadata["encryption"] == "test" and isinstance(encrypted.payload, bytes)
    assert journal.get(2, "upload").payload_sha256 == payload_digest(encrypted.payload)
    with pytest.raises(PipelineError, match="not bytes"):
        EncryptPayload(lambda t: t, "bad").process(Release("upload", payload, 2))


def test_a_release_its_journal_already_records_is_refused_before_noise_or_ledger(tmp_path):
    """A release the journal already records, in a run that is not resumed, is refused
    before the noise stage draws and before the gate writes the ledger (it was refused
    after the gate: a ledger entry for a release that never left, and a ledger past its
    journal). Ledger, journal, accountant and noise source are as they were; the run's next
    release then equals that of a twin that never made the refused attempt."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from privacy.journal import JournalError, ReleaseJournal

    def client(path):
        path.mkdir()
        gate = _gate(path, budget_eps=10.0)
        noise = ReproducibleNoise(3)
        journal = ReleaseJournal(path / "c1.journal", "c1", "m", X25519PrivateKey.generate())
        pipe = ReleasePipeline([GaussianNoise(1.0, 1.0, noise, "gaussian_summary"), gate,
                                JournalRelease(journal, "c1", keep_noise_state=False)])
        return pipe, gate, noise, path

    def files(path):
        return (path / "c1.jsonl").read_bytes(), (path / "c1.journal").read_bytes()

    def entries(path):
        clock = ("timestamp", "prev_hash", "signature")
        return [{k: v for k, v in e.items() if k not in clock}
                for e in read_ledger(path / "c1.jsonl")]

    pipe, gate, noise, path = client(tmp_path / "refused")
    twin, twin_gate, _, twin_path = client(tmp_path / "twin")
    for p in (pipe, twin):
        p.run(Release("summary", torch.zeros(3), 1))
    before, history = files(path), list(gate.accountant.history)
    state = noise.checkpoint_state().clone()
    with pytest.raises(JournalError, match="already records the round-1 'summary' release"):
        pipe.run(Release("summary", torch.zeros(3), 1))
    assert files(path) == before and gate.accountant.history == history
    assert torch.equal(noise.checkpoint_state(), state)
    out = pipe.run(Release("summary", torch.zeros(3), 2))
    expected = twin.run(Release("summary", torch.zeros(3), 2))
    assert torch.equal(out.payload, expected.payload)
    assert entries(path) == entries(twin_path)
    assert gate.accountant.history == twin_gate.accountant.history


def test_the_journal_pins_a_tensor_payload_by_the_digest_of_its_bytes_without_copying_them(
        tmp_path):
    import tracemalloc

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from privacy.journal import ReleaseJournal, payload_digest
    from privacy.pipeline import payload_bytes, release_digest

    # the digest is that of the payload's bytes (C order), whatever its layout or dtype
    for payload in [torch.tensor(1.5), torch.empty(0), torch.arange(12.0).reshape(3, 4).T,
                    torch.arange(6, dtype=torch.int64)[::2], torch.tensor([True, False]),
                    torch.ones(3, dtype=torch.float64, requires_grad=True), b"ciphertext"]:
        assert release_digest(payload) == payload_digest(payload_bytes(payload))
    gate = _gate(tmp_path, budget_eps=10.0)
    journal = ReleaseJournal(tmp_path / "c1.journal", "c1", "m", X25519PrivateKey.generate())
    stage = JournalRelease(journal, "c1", keep_noise_state=False)
    model = torch.randn(2_000_000)  # 8 MB, a model of 2M float32 parameters
    admitted = gate.process(Release("model", model, 1, [_dpsgd()]))
    tracemalloc.start()
    try:
        stage.process(admitted)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert journal.get(1, "model").payload_sha256 == payload_digest(model.numpy().tobytes())
    assert peak < 1_000_000, f"journaling the release copied its payload ({peak} bytes)"


def test_a_release_accounted_with_an_admitted_one_is_matched_to_its_entry_once(tmp_path):
    gate = _gate(tmp_path)
    lam = scalar_record(0.5, 4.0, 20)
    admitted = ReleasePipeline([RecordParams({"noise": "test"}), gate]).run(
        Release("model", torch.zeros(2), 1, [_dpsgd(), lam]))
    used: set[int] = set()
    stages = [*noised_mean_stages(0.5, 20, 4.0, ReproducibleNoise(0)), RecordParams({"noise": "test"})]
    pipe = ReleasePipeline([*stages, AccountedWith(admitted, gate.ledger, used)], require_gate=False)
    out = pipe.run(Release("lambda", torch.zeros(20, dtype=torch.float64), 1))
    assert used == {1} and out.metadata["ledger_index"] == 1
    with pytest.raises(PipelineError, match="already used"):
        pipe.run(Release("lambda", torch.zeros(20, dtype=torch.float64), 1))
    other_m = ReleasePipeline([*noised_mean_stages(0.5, 19, 4.0, ReproducibleNoise(0)),
                               RecordParams({"noise": "test"}),
                               AccountedWith(admitted, gate.ledger, set())], require_gate=False)
    with pytest.raises(PipelineError, match="does not account it"):
        other_m.run(Release("lambda", torch.zeros(19, dtype=torch.float64), 1))
    with pytest.raises(PipelineError, match="no admitted release"):
        AccountedWith(None, gate.ledger, set()).process(Release("lambda", torch.zeros(1), 1, [lam]))


def test_a_release_refused_by_its_accounting_marks_no_entry_used(tmp_path):
    """AccountedWith is all or nothing: a release of two records whose second the admitted
    release does not account is refused with no entry marked used, so the first record's
    entry still accounts a later, correct release."""
    gate = _gate(tmp_path)
    lam = scalar_record(0.5, 4.0, 20)
    admitted = ReleasePipeline([gate]).run(Release("model", torch.zeros(2), 1, [_dpsgd(), lam]))
    used: set[int] = set()
    accounted = AccountedWith(admitted, gate.ledger, used)
    unaccounted = scalar_record(0.5, 4.0, 19)
    with pytest.raises(PipelineError, match="does not account it"):
        accounted.process(Release("lambda", torch.zeros(()), 1, [lam, unaccounted]))
    assert used == set()
    # two records of one mechanism still take two distinct entries (here: only one exists)
    with pytest.raises(PipelineError, match="already used"):
        accounted.process(Release("lambda", torch.zeros(()), 1, [lam, lam]))
    assert used == set()
    out = accounted.process(Release("lambda", torch.zeros(()), 1, [lam]))
    assert used == {1} and out.metadata["ledger_index"] == 1


# -- the summary path, bit for bit ---------------------------------------------------------


def _exact_rows(n: int, d: int) -> torch.Tensor:
    """Small integers (row norms below the clip 32, n a power of two): clipping, ``Z^T Z`` and
    ``/ n`` are exact in any summation order, so the noised matrix depends only on the noise."""
    g = torch.Generator().manual_seed(11)
    return torch.randint(-3, 4, (n, d), generator=g).to(torch.float64)


def _old_top_eigenvectors(m: torch.Tensor, q: int) -> torch.Tensor:
    """top_eigenvectors as written before the summary path skipped its repeated work:
    symmetrize, a Fortran-order copy, ?syevr on one BLAS thread, signs fixed."""
    import numpy as np
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    d = m.shape[0]
    sym = (m + m.T) / 2
    with threadpool_limits(limits=1, user_api="blas"):
        _, vecs = scipy.linalg.eigh(
            np.array(sym.numpy(), order="F"),
            subset_by_index=[d - q, d - 1],
            driver="evr",
            overwrite_a=True,
            check_finite=False,
        )
    top = torch.from_numpy(vecs[:, ::-1].copy())
    signs = torch.sign(top[top.abs().argmax(dim=0), torch.arange(q)])
    signs[signs == 0] = 1
    return (top * signs).contiguous()


# sha256 of the noised second moment's bytes, computed with the code before the summary path
# skipped its repeated checks and symmetrizations (ReproducibleNoise(5), the rows above).
_NOISED_SECOND_MOMENT = {
    1: "1d587dd4c210b5a9eb30105d2481a04b2389a7443468378a66de4e78bae8b524",
    2: "52c3c5a74ab52edef8100d923e4a067d4dc50c3afd8bb52c0d442f9d02afbe33",
    60: "5d78b72621589008c30ffac26d14429987cab72376c2c33c024add65d2dc78a8",
}


@pytest.mark.parametrize("d", [1, 2, 60])
def test_summary_release_and_its_ledger_entry_are_bit_identical_to_the_pinned_ones(tmp_path, d):
    import hashlib

    n, q, sigma = 32, min(2, d), 2.0
    z = _exact_rows(n, d)
    stages = second_moment_stages(32.0, n, q, sigma, ReproducibleNoise(5))
    noised = ReleasePipeline(stages[:3], require_gate=False).run(Release("summary", z, 0))
    assert hashlib.sha256(noised.payload.numpy().tobytes()).hexdigest() == _NOISED_SECOND_MOMENT[d]
    gate = _gate(tmp_path)
    stages = second_moment_stages(32.0, n, q, sigma, ReproducibleNoise(5))
    out = ReleasePipeline([*stages, gate]).run(Release("summary", z, 0))
    assert torch.equal(out.payload, _old_top_eigenvectors(noised.payload, q))
    (entry,) = read_ledger(tmp_path / "c1.jsonl")
    assert {k: v for k, v in entry.items() if k not in ("timestamp", "signature")} == {
        "accountant": "rdp",
        "budget_epsilon": 5.0,
        "client_id": "c1",
        "delta": DELTA,
        "epsilon_after": Accountant().epsilon_after(DELTA, sigma, 1.0, 1),
        "index": 0,
        "mechanism": "gaussian_summary",
        "prev_hash": "0" * 64,
        "round": 0,
        "params": {
            "accountant_params": gate.accountant.parameters,
            "clip_norm": 32.0,
            "n": n,
            "neighbouring": "add/remove one row, n public",
            "noise_multiplier": sigma,
            "q": q,
            "release_kind": "summary",
            "sample_rate": 1.0,
            "sensitivity": 32.0,
            "steps": 1,
        },
    }
