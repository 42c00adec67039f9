"""The verdict shared by the audits and their common JSON document."""

from __future__ import annotations

import json
import math

import pytest

from audits.verdict import (
    audit_document,
    audit_verdict,
    config_rebuild_problem,
    verdict_text,
    write_audit_json,
)
from audits.verify import AuditError


def test_inconclusive_when_the_design_cannot_reach_the_claim():
    # 300 canaries certify at most about 3.0: a claim of 8 can be neither refuted nor confirmed
    assert audit_verdict(8.0, 3.05, 0.4) == "inconclusive"
    assert audit_verdict(3.05, 3.05, 0.4) == "inconclusive"  # cannot exceed the claim either
    text = verdict_text("inconclusive", 8.0, 3.05, 0.4)
    assert text.startswith("inconclusive: the audit cannot certify epsilon above 3.05")


def test_refuted_when_the_lower_bound_exceeds_the_claim():
    assert audit_verdict(1.0, 8.1, 2.5) == "refuted"
    assert audit_verdict(1.0, 8.1, 1.0) == "consistent"  # equal is not a refutation
    assert "exceeds the claimed epsilon 1" in verdict_text("refuted", 1.0, 8.1, 2.5)


def test_consistent_only_with_power_and_no_claim_is_inconclusive():
    assert audit_verdict(3.0, 8.1, 0.7) == "consistent"
    assert audit_verdict(None, 8.1, 8.0) == "inconclusive"
    assert audit_verdict(math.inf, 8.1, 8.0) == "inconclusive"
    assert "no finite privacy claim" in verdict_text("inconclusive", None, 8.1, 8.0)
    with pytest.raises(ValueError, match="lower_bound"):
        audit_verdict(1.0, 2.0, math.nan)
    with pytest.raises(ValueError, match="claimed epsilon"):
        audit_verdict(-1.0, 2.0, 0.0)


def test_document_schema_and_atomic_write(tmp_path):
    doc = audit_document("whitebox", claim_epsilon=7.96, certifiable_max=8.11, lower_bound=2.9,
                         confidence=0.95, setup={"canaries": 20000}, guesses=513)
    assert {k: doc[k] for k in ("audit", "claim_epsilon", "certifiable_max", "lower_bound",
                                "verdict", "confidence")} == {
        "audit": "whitebox", "claim_epsilon": 7.96, "certifiable_max": 8.11,
        "lower_bound": 2.9, "verdict": "consistent", "confidence": 0.95}
    assert doc["setup"] == {"canaries": 20000} and doc["guesses"] == 513
    path = write_audit_json(tmp_path / "run", doc)
    assert path == tmp_path / "run" / "audit" / "whitebox.json"
    assert json.loads(path.read_text()) == doc
    assert [p.name for p in path.parent.iterdir()] == ["whitebox.json"]
    nonprivate = audit_document("canary", claim_epsilon=math.inf, certifiable_max=3.0,
                                lower_bound=2.5, confidence=0.95, setup={})
    assert nonprivate["claim_epsilon"] is None and nonprivate["verdict"] == "inconclusive"


def test_document_errors(tmp_path):
    with pytest.raises(ValueError, match="audit must be one of"):
        audit_document("other", claim_epsilon=1.0, certifiable_max=2.0, lower_bound=0.0,
                       confidence=0.95, setup={})
    with pytest.raises(ValueError, match="reuse schema keys"):
        audit_document("canary", claim_epsilon=1.0, certifiable_max=2.0, lower_bound=0.0,
                       confidence=0.95, setup={}, verdict="consistent")
    bad = audit_document("canary", claim_epsilon=1.0, certifiable_max=2.0, lower_bound=0.0,
                         confidence=0.95, setup={}, score=math.nan)
    with pytest.raises(ValueError):
        write_audit_json(tmp_path, bad)
    assert not (tmp_path / "audit" / "canary.json").exists()
    with pytest.raises(ValueError, match="not an audit document"):
        write_audit_json(tmp_path, {"audit": "x"})


@pytest.mark.parametrize("run_dir", ["", "  ", "r\x00"])
def test_write_audit_json_refuses_an_empty_or_blank_run_directory(tmp_path, monkeypatch, run_dir):
    """An empty ``run_dir`` wrote ``audit/<name>.json`` into the current directory."""
    from audits.verify import AuditError

    monkeypatch.chdir(tmp_path)
    doc = audit_document("canary", claim_epsilon=1.0, certifiable_max=2.0, lower_bound=0.0,
                         confidence=0.95, setup={})
    with pytest.raises(AuditError, match="run_dir .*(is empty|NUL)"):
        write_audit_json(run_dir, doc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [3, b"run", "", "a\x00b"])
def test_config_rebuild_problem_refuses_what_is_not_a_text_path(bad):
    with pytest.raises(AuditError, match="^run_dir "):
        config_rebuild_problem(bad, "canary")


def test_verdict_text_names_a_wrong_argument():
    """verdict_text formatted what it was given: a str bound raised 'Unknown format code',
    a verdict the numbers do not give with no claim 'unsupported format string passed to
    NoneType', and a True bound or a str claim got through audit_verdict's check."""
    with pytest.raises(ValueError, match="^lower_bound must be a number"):
        verdict_text("consistent", 1.0, 3.0, "0.5")
    with pytest.raises(ValueError, match="^certifiable_max must be a number"):
        audit_verdict(1.0, True, 0.5)
    with pytest.raises(ValueError, match="^claim_epsilon must be a number"):
        audit_verdict("1.0", 3.0, 0.5)
    with pytest.raises(ValueError, match="^verdict 'consistent' is not what these numbers give"):
        verdict_text("consistent", None, 3.0, 0.5)


def test_ints_beyond_floats_range_are_judged_not_overflowed():
    """A claim, maximum or bound that is an int beyond float's range raised math's
    OverflowError: the claim is now no finite claim, the bounds compare as numbers."""
    assert audit_verdict(10**400, 1.0, 0.5) == "inconclusive"
    assert audit_verdict(1.0, 10**400, 0.5) == "consistent"
    assert audit_verdict(1.0, 1.0, 10**400) == "refuted"
    for bad in (math.nan, -1):
        with pytest.raises(ValueError, match="must be"):
            audit_verdict(bad, 1.0, 0.5)
        with pytest.raises(ValueError, match="^lower_bound must be a number >= 0"):
            audit_verdict(1.0, 1.0, bad)


def test_verdict_argument_errors_are_toolkit_errors_naming_the_argument(tmp_path):
    """audit_verdict and the document raised a bare ValueError (not a ToolkitError, so the CLI
    printed a traceback); a NaN claim said 'a claimed epsilon', a str confidence raised
    float()'s 'could not convert', a setup list dict()'s TypeError, a document that is not a
    dict an AttributeError."""
    from audits.verdict import VerdictError
    from privacy.errors import ToolkitError

    assert issubclass(VerdictError, ToolkitError) and issubclass(VerdictError, ValueError)
    with pytest.raises(VerdictError, match="^claim_epsilon .*must be >= 0"):
        audit_verdict(math.nan, 1.0, 0.5)
    with pytest.raises(VerdictError, match="^lower_bound must be a number"):
        audit_verdict(1.0, 1.0, -0.1)
    with pytest.raises(VerdictError, match="^verdict 'refuted' is not"):
        verdict_text("refuted", 1.0, 3.0, 0.5)
    good = {"claim_epsilon": 1.0, "certifiable_max": 2.0, "lower_bound": 0.0, "setup": {}}
    for confidence in ("0.95", math.nan, 1.0, 0, True):
        with pytest.raises(VerdictError, match="^confidence must be in \\(0, 1\\)"):
            audit_document("canary", confidence=confidence, **good)
    with pytest.raises(VerdictError, match="^setup must be a mapping"):
        audit_document("canary", confidence=0.95, **{**good, "setup": [1, 2]})
    with pytest.raises(VerdictError, match="^audit must be one of"):
        audit_document(["canary"], confidence=0.95, **good)
    for doc in (["canary"], None, {"audit": "canary", "x": object()}):
        with pytest.raises(VerdictError, match="not an audit document|not strict JSON"):
            write_audit_json(tmp_path, doc)
    assert not (tmp_path / "audit" / "canary.json").exists()


def test_the_verdict_text_reads_its_figures_in_the_order_the_verdict_compares_them():
    """verdict_text showed every figure at three significant digits to nearest: a lower bound
    1.00004 over a claim 1.0 read "the lower bound 1 exceeds the claimed epsilon 1", and a
    lower bound 2.9996 under a claim 2.9999 read "lower bound 3 <= claim 3" with the certifiable
    maximum 3.0004 "up to 3"; a claim is now rounded up, the bounds down, at four decimals or
    as many more as keep them apart."""
    assert verdict_text("refuted", 1.0, 8.1, 1.00004) == \
        "refuted: the lower bound 1.00004 exceeds the claimed epsilon 1.00000"
    assert verdict_text("consistent", 2.9999, 3.0004, 2.9996) == \
        "consistent: lower bound 2.9996 <= claim 2.9999, and the audit could certify up to 3.0004"
    assert verdict_text("inconclusive", 1.0, 0.99999, 0.5) == \
        "inconclusive: the audit cannot certify epsilon above 0.9999 (claim 1.0000; measured" \
        " lower bound 0.5000)"


def test_the_verification_line_counts_in_the_singular_where_it_is_one():
    """`audit verify --strict` ended "verification FAILED (strict): 9 ledgers, 1 errors,
    1 warnings"; a count of one is now singular, every other count plural."""
    from audits.verdict import verification_verdict_text

    assert verification_verdict_text("failed", 9, 1, 1, strict=True) == \
        "verification FAILED (strict): 9 ledgers, 1 error, 1 warning"
    assert verification_verdict_text("passed", 1, 0, 3) == \
        "verification PASSED: 1 ledger, 0 errors, 3 warnings"
    assert verification_verdict_text("no_dp_claim", 0, 0, 1).startswith(
        "no differential-privacy claim: nothing to verify (0 ledgers, 0 errors, 1 warning;")
