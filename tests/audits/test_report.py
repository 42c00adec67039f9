"""The compliance report: content, self-containment, and rendering in a real browser."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from audits.report import ReportError, build_report, render_html, write_report
from audits.verify import verify_run
from privacy.accounting import format_down, format_up

from .conftest import reanchor

CHROMIUM = Path("/usr/bin/chromium")


class _Refs(HTMLParser):
    """Collects every src/href and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def written(pristine_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(pristine_run, out), pristine_run


def test_report_json_has_every_section_and_client(written):
    paths, run = written
    doc = json.loads(paths.json.read_text())
    results = json.loads((run / "results.json").read_text())
    assert doc["identity"]["config_hash"] == results["config_hash"]
    assert doc["identity"]["data_fingerprint"] == results["data_fingerprint"]
    assert doc["identity"]["code_version"] == results["version"]
    assert doc["assumptions"]["server"] == "honest-but-curious"
    assert doc["assumptions"]["validation_data"] == "private"
    assert doc["assumptions"]["relatedness"] == "noised"
    ids = ["client-000", "client-001", "client-002"]
    assert [(r["method"], r["client_id"]) for r in doc["budgets"]] == \
        [("fedora", i) for i in ids] + [("local", i) for i in ids]
    assert set(doc["epsilon_series"]) == {"fedora", "local"}
    for method in ("fedora", "local"):
        assert set(doc["epsilon_series"][method]) == set(ids)
        for points in doc["epsilon_series"][method].values():
            eps = [p["epsilon"] for p in points]
            assert eps == sorted(eps) and all(p["budget"] for p in points)
    refused = {r["client_id"]: r["refused"] for r in doc["budgets"] if r["method"] == "fedora"}
    assert refused == {"client-000": False, "client-001": False, "client-002": True}
    mech = {(m["method"], m["mechanism"]) for m in doc["mechanisms"]}
    assert mech == {("fedora", "dpsgd"), ("fedora", "gaussian_lambda"),
                    ("fedora", "gaussian_summary"), ("local", "dpsgd")}
    assert doc["verification"]["ok"] is True
    assert doc["repeated_releases"] == []  # no client released more than the plan holds
    assert [m["method"] for m in doc["accuracy"]["methods"]] == ["fedora", "local"]
    assert [r["client_id"] for r in doc["accuracy"]["per_client"]] == ids


def test_html_is_self_contained_and_names_every_client(written):
    paths, _ = written
    page = paths.html.read_text()
    parser = _Refs()
    parser.feed(page)
    assert parser.refs, "expected embedded plots"
    for ref in parser.refs:
        assert ref.startswith("data:image/png;base64,") or ref.startswith("#"), ref
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not re.search(r"url\(|@import|https?://", page)
    for ref in parser.refs:
        png = base64.b64decode(ref.split(",", 1)[1])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    text = " ".join(parser.text)
    for cid in ("client-000", "client-001", "client-002"):
        assert cid in text
    for heading in ("Run identity", "Threat model", "Per-client budgets", "Epsilon over rounds",
                    "Mechanisms", "Verification", "Accuracy"):
        assert heading in text
    assert "Verification: PASSED" in text


def test_the_report_states_that_a_dp_runs_timings_are_outside_the_ledgers(tmp_path):
    """A DP run's results.json states what its timings reveal (``assumptions.timing``): the
    report's assumptions in force show it, in its JSON and on its page."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    cfg = parse_config({"name": "timing-report", "methods": ["local"],
                        "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 8},
                        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8},
                        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3}})
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg), keystore=tmp_path / "keys").run()
    stated = json.loads((run / "results.json").read_text())["assumptions"]["timing"]
    assert stated.startswith("timing is outside the ledgers")
    paths = write_report(run, tmp_path / "report")
    assert json.loads(paths.json.read_text())["assumptions"]["timing"] == stated
    parser = _Refs()
    parser.feed(paths.html.read_text())
    assert stated in parser.text


def test_failed_verification_is_shown_and_values_are_escaped(run_copy, tmp_path):
    path = run_copy / "ledgers" / "fedora" / "client-001.jsonl"
    lines = path.read_text().splitlines()
    del lines[1]
    path.write_text("".join(line + "\n" for line in lines))
    doc = json.loads((run_copy / "results.json").read_text())
    doc["name"] = "<script>alert(1)</script>"
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    page = paths.html.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "Verification: FAILED" in page
    report = json.loads(paths.json.read_text())
    assert report["verification"]["ok"] is False
    assert any(f["client_id"] == "client-001" and f["entry"] == 1 and f["check"] == "chain"
               for f in report["verification"]["findings"])


def test_a_resumed_run_is_shown_with_the_rounds_remade_from_the_journals(run_copy, tmp_path):
    """After a crash and ``--resume`` the report said nothing of it (round 2 was re-made from
    the journals, so the ledgers hold no second entry): results.json's anchored ``resumes``
    are now shown, in report.json and on the page."""
    assert build_report(run_copy)["resumes"] == []
    doc = json.loads((run_copy / "results.json").read_text())
    doc["privacy"]["fedora"]["resumes"] = [
        {"after_round": 1, "remade_from_journal": [
            {"round": 2, "clients": ["client-000", "client-001", "client-002"]}]},
        {"after_round": None, "remade_from_journal": []},
        {"after_round": 3, "remade_from_journal": []}]
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    paths = write_report(run_copy, tmp_path / "out")
    assert json.loads(paths.json.read_text())["verification"]["ok"] is True
    rows = json.loads(paths.json.read_text())["resumes"]
    assert [(r["method"], r["after_round"], r["trained_anew"]) for r in rows] == [
        ("fedora", 1, [3, 4]), ("fedora", None, [0, 1, 2, 3, 4]), ("fedora", 3, [4])]
    assert rows[2]["text"].endswith("from round 4 on was made anew (fresh noise), round 4 entirely")
    assert rows[0]["remade_from_journal"] == [
        {"round": 2, "clients": ["client-000", "client-001", "client-002"]}]
    assert rows[0]["text"] == (
        "fedora: interrupted and resumed after round 1's checkpoint; releases re-made from the"
        " release journals (recorded before the interruption, accounted once): round 2"
        " (client-000, client-001, client-002); every other release from round 2 on was made"
        " anew (fresh noise), rounds 3, 4 entirely")
    page = html.unescape(paths.html.read_text())
    assert "the run was resumed" in page and rows[0]["text"] in page and rows[1]["text"] in page
    assert "resumed from the start (no checkpoint)" in rows[1]["text"]


def test_build_report_accepts_a_given_verification(pristine_run):
    ver = verify_run(pristine_run)
    doc = build_report(pristine_run, verification=ver)
    assert doc["verification"] == json.loads(json.dumps(ver.to_json()))


def test_report_errors(tmp_path, pristine_run):
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "missing")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="cannot create report directory"):
        write_report(pristine_run, blocker / "sub")


@pytest.mark.parametrize("edit", [
    lambda d: d["methods"][next(iter(d["methods"]))]["selected"].__setitem__("per_client", 5),
    lambda d: d["privacy"][next(iter(d["privacy"]))].__setitem__("plan", 5),
    lambda d: d["privacy"][next(iter(d["privacy"]))].__setitem__("events", 5),
    lambda d: d.__setitem__("assumptions", [1]),
], ids=["per_client", "plan", "events", "assumptions"])
def test_a_wrongly_typed_results_field_is_reported_not_a_traceback(run_copy, tmp_path, edit):
    """A number where results.json holds a list (or a list for the assumptions object) raised
    TypeError while the report was built: nothing was written. The report is written, and
    verification fails on the edited results.json."""
    doc = json.loads((run_copy / "results.json").read_text())
    edit(doc)
    (run_copy / "results.json").write_text(json.dumps(doc))
    (run_copy / "audit").mkdir(exist_ok=True)
    (run_copy / "audit" / "canary.json").write_text('{"x": ' + "9" * 5000 + "}")  # unreadable
    paths = write_report(run_copy, tmp_path / "out")
    assert paths.html.exists() and not json.loads(paths.json.read_text())["verification"]["ok"]


@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="headless Chromium (Debian package 'chromium') is not installed")
def test_report_renders_in_headless_chromium(written, tmp_path):
    paths, _ = written
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", paths.html.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for needle in ("Privacy compliance report", "Verification: PASSED", "client-000",
                   "client-001", "client-002", "Per-client budgets"):
        assert needle in dom
    assert dom.count("data:image/png;base64,") == 2
    shot = tmp_path / "report.png"
    subprocess.run([*base, "--window-size=1200,1600", f"--screenshot={shot}",
                    paths.html.as_uri()], capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def _text_of(page: str) -> str:
    parser = _Refs()
    parser.feed(page)
    return " ".join("".join(parser.text).split())


def _spent(run: Path, method: str, client: str) -> float:
    """The verified final epsilon of a ledger of ``run`` (a valid audit's claim)."""
    return next(c.final_epsilon for c in verify_run(run).clients
                if c.method == method and c.client_id == client)


def test_report_shows_the_three_empirical_audits(run_copy, tmp_path):
    from audits.verdict import audit_document, write_audit_json

    empty = json.loads(write_report(run_copy, tmp_path / "a").json.read_text())
    assert [a["audit"] for a in empty["empirical_audits"]] == ["canary", "whitebox", "replay"]
    assert all(a["status"] == "not run" for a in empty["empirical_audits"])

    local = _spent(run_copy, "local", "client-000")
    fedora = _fedora_dpsgd_claim()
    write_audit_json(run_copy, audit_document(
        "canary", claim_epsilon=local, certifiable_max=0.5 * local, lower_bound=0.4,
        confidence=0.95, setup={"num_canaries": 300, "method": "local",
                                "client_id": "client-000"}))
    # white-box on FEDORA: DP-SGD alone, below the ledger's epsilon (summary and lambda too)
    assert fedora < 0.9 * _spent(run_copy, "fedora", "client-001")
    write_audit_json(run_copy, audit_document(
        "whitebox", claim_epsilon=fedora, certifiable_max=2 * fedora, lower_bound=0.1,
        confidence=0.95, setup={"canaries": 20000, "method": "fedora", "client": "client-001",
                                "config": "audit-fixture"}))
    paths = write_report(run_copy, tmp_path / "b")
    rows = {a["audit"]: a for a in json.loads(paths.json.read_text())["empirical_audits"]}
    assert rows["canary"]["verdict"] == "inconclusive"
    assert rows["canary"]["certifiable_max"] == 0.5 * local
    assert rows["whitebox"]["verdict"] == "consistent" and rows["whitebox"]["status"] == "run"
    assert rows["whitebox"]["lower_bound"] == 0.1
    assert rows["whitebox"]["claim_epsilon"] == fedora
    assert rows["replay"]["status"] == "not run"
    # each audit picks its own method and client (their claims differ): the rows name them
    assert rows["canary"]["attacked"] == "local/client-000"
    assert rows["whitebox"]["attacked"] == "fedora/client-001"
    assert rows["replay"]["attacked"] is None
    text = _text_of(paths.html.read_text())
    assert "Empirical privacy audits" in text
    assert "attacked (method/client)" in text
    html = paths.html.read_text()
    assert '<td class="l">local/client-000</td>' in html
    assert '<td class="l">fedora/client-001</td>' in html
    assert f"inconclusive: the audit cannot certify epsilon above {format_down(0.5 * local, 4)}" \
        in text
    assert f"consistent: lower bound 0.1000 <= claim {format_up(fedora, 4)}" in text
    assert "not run (secure-fedora audit replay RUN_DIR)" in text

    (run_copy / "audit" / "replay.json").write_text('{"audit": "canary"}')
    rows = {a["audit"]: a for a in build_report(run_copy)["empirical_audits"]}
    assert rows["replay"]["status"] == "unreadable"


def _fedora_dpsgd_claim() -> float:
    """The white-box claim for a FEDORA client of the audit fixture: the epsilon of its plan's
    DP-SGD releases alone (4 rounds x 5 steps at q 0.1, sigma 1.2, RDP, delta 1e-5)."""
    from privacy.accounting import PlannedRelease, plan_epsilon

    return plan_epsilon([PlannedRelease("dpsgd", 0.1, 20)], 1e-5, 1.2, "rdp")


def test_an_audits_claimed_epsilon_is_shown_rounded_up(run_copy, tmp_path):
    """The empirical audits' table showed the claimed epsilon with 4 significant digits
    rounded to nearest (2.81249 as 2.812: below the claim); now rounded up like every epsilon
    the report shows."""
    from audits.verdict import audit_document, write_audit_json
    from privacy.accounting import format_up

    dpsgd = _fedora_dpsgd_claim()
    write_audit_json(run_copy, audit_document(
        "whitebox", claim_epsilon=dpsgd, certifiable_max=3 * dpsgd, lower_bound=0.05,
        confidence=0.95, setup={"canaries": 20000, "method": "fedora", "client": "client-001",
                                "config": "audit-fixture"}))
    html_text = write_report(run_copy, tmp_path / "out").html.read_text()
    row = html_text[html_text.index("<td class=\"l\">whitebox</td>"):]
    row = row[:row.index("</tr>")]
    assert f"<td class=\"\">{format_up(dpsgd, 4)}</td>" in row, row
    assert f">{dpsgd:.4g}<" not in row


def test_a_whitebox_claim_below_the_ledgers_dpsgd_epsilon_is_invalid(run_copy):
    """A FEDORA white-box claim was only checked to be at most the ledger's whole epsilon, so
    audit/whitebox.json claiming half the epsilon of the DP-SGD releases the ledger records
    (an easier claim to pass as 'consistent') was shown as the audit's verdict."""
    from audits.verdict import audit_document, write_audit_json

    dpsgd = _fedora_dpsgd_claim()

    def row(claim: float) -> dict:
        write_audit_json(run_copy, audit_document(
            "whitebox", claim_epsilon=claim, certifiable_max=3 * dpsgd, lower_bound=0.05,
            confidence=0.95, setup={"canaries": 20000, "method": "fedora",
                                    "client": "client-001", "config": "audit-fixture"}))
        return {a["audit"]: a for a in build_report(run_copy)["empirical_audits"]}["whitebox"]

    assert row(dpsgd)["status"] == "run"
    forged = row(0.5 * dpsgd)
    assert forged["status"] == "invalid" and forged["verdict"] is None
    assert f"claim {0.5 * dpsgd:.6g} is below the epsilon" in forged["verdict_text"]
    assert "ledger fedora/client-001: the claim" in forged["verdict_text"]
    assert "of the DP-SGD releases it records" in forged["verdict_text"]
    assert row(1.5 * dpsgd)["status"] == "invalid"  # above it (still below the whole epsilon)


def _replay_doc(run: Path, **changes) -> dict:
    claim = _spent(run, "local", "client-000")
    doc = {"audit": "replay", "claim_epsilon": claim, "certifiable_max": 2 * claim,
           "lower_bound": 0.2, "verdict": "consistent", "trials": 400, "correct": 210,
           "confidence": 0.95, "setup": {"run_dir": str(run), "method": "local",
                                         "client": "client-000"}}
    for key, value in changes.items():
        if key in doc["setup"]:
            doc["setup"][key] = value
        else:
            doc[key] = value
    return doc


def test_forged_audit_documents_are_shown_invalid_never_passing(run_copy, pristine_run, tmp_path):
    """audit/*.json verdicts were shown as written: "consistent" with a lower bound 50 above
    the claim 3, NaN figures, a replay.json of another run, a claim far below the ledger's."""
    (run_copy / "audit").mkdir(exist_ok=True)
    target = run_copy / "audit" / "replay.json"

    def row(text: str) -> dict:
        target.write_text(text)
        return {a["audit"]: a for a in build_report(run_copy)["empirical_audits"]}["replay"]

    valid = row(json.dumps(_replay_doc(run_copy)))
    assert valid["status"] == "run" and valid["verdict"] == "consistent"
    cases = {
        "its own numbers give 'refuted'": _replay_doc(run_copy, claim_epsilon=3.0,
                                                      lower_bound=50.0, certifiable_max=60.0),
        "not a finite number": _replay_doc(run_copy, lower_bound=float("nan")),
        "names another run": _replay_doc(run_copy, run_dir=str(pristine_run)),
        "differs from the verified epsilon": _replay_doc(
            run_copy, claim_epsilon=0.01, lower_bound=0.0, certifiable_max=0.5),
        "setup names no ledger of this run": _replay_doc(run_copy, client="client-009"),
    }
    cases["not a finite number (inf)"] = _replay_doc(run_copy, certifiable_max=float("inf"))
    for needle, doc in cases.items():
        got = row(json.dumps(doc))
        assert got["status"] in ("invalid", "unverified"), needle
        assert got["verdict"] is None and got["recorded_verdict"] == doc["verdict"]
        assert needle.split(" (")[0] in got["verdict_text"], (needle, got["verdict_text"])
    paths = write_report(run_copy, tmp_path / "out")
    text = _text_of(paths.html.read_text())
    assert "invalid: replay.json is not a valid replay result for this run: certifiable_max" \
        " is inf, not a finite number (it records verdict 'consistent')" in text
    assert "consistent:" not in text
    json.loads(paths.json.read_text())  # report.json stays strict JSON too


def test_a_non_numeric_per_client_figure_does_not_stop_the_report(run_copy, tmp_path):
    """A dict or a nested list among results.json's per_client values crashed matplotlib:
    nothing was written."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["methods"]["fedora"]["selected"]["per_client"] = [{"a": 1}, [0.5, [0.2]], "x", 0.7]
    doc["methods"]["local"]["selected"]["mean"] = {"a": 1}
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    acc = json.loads(paths.json.read_text())["accuracy"]
    assert [r["fedora"] for r in acc["per_client"]] == [None, None, None, 0.7]
    assert next(m for m in acc["methods"] if m["method"] == "local")["mean"] is None
    assert paths.html.read_text().count("data:image/png;base64,") == 2
    assert not json.loads(paths.json.read_text())["verification"]["ok"]


def test_the_metric_section_is_named_after_results_metric(run_copy, tmp_path):
    """A binary (BCE) task's results hold ROC AUC: the section, plot and JSON say so."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["metric"] = "auc"
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    page = paths.html.read_text()
    assert '<h2 id="accuracy">ROC AUC</h2>' in page and 'alt="per-client ROC AUC"' in page
    assert json.loads(paths.json.read_text())["accuracy"]["metric"] == "auc"


def test_the_encrypted_relatedness_note_states_the_shared_secret_key_and_the_overlap_blocks():
    """The report's note on encrypted relatedness says what the code does: the server learns the
    overlap blocks (not only similarities) and every client holds the secret key."""
    from audits.report import _assumptions

    notes = " ".join(_assumptions({"assumptions": {"relatedness": "noised+encrypted"}}, None)["notes"])
    assert "overlap blocks U_i^T U_j" in notes and "similarity blocks" not in notes
    assert "Every client holds the secret key" in notes and "colludes with no client" in notes


def test_epsilons_and_budget_shares_are_shown_rounded_up(pristine_run):
    """The budget and plan tables showed epsilons to four significant digits rounded to
    nearest (2.98341 as "2.983") and the share of the budget to nearest (99.447% as
    "99.4%"): below what the ledger recorded."""
    from audits.report import render_html

    report = build_report(pristine_run)
    row = report["budgets"][0]
    row.update(budget_epsilon=3.0, recorded_epsilon=2.98341, independent_epsilon=2.98341,
               budget_used=2.98341 / 3.0)
    report["privacy_plan"]["plan"] = [{"method": "fedora", "clients": 3, "epsilon_budget": 3.0,
                                       "planned_epsilon": 2.98341}]
    page = render_html(report, {})
    # recorded and independent epsilon in the budget table, planned epsilon in the plan's
    assert page.count(">2.9835</td>") == 3 and ">99.5%</td>" in page
    assert ">2.983</td>" not in page and ">99.4%</td>" not in page


def test_budgets_deltas_and_noise_parameters_are_shown_exactly(pristine_run):
    """The budget, plan and mechanism tables showed a client's delta 1.23449e-05 as
    "1.234e-05" (a smaller delta than its ledger records: a stronger claim than the ledger
    backs), its budget 2.71828 as "2.718", a noise multiplier 2.383979233789939 as "2.384" or
    "2.38398" (more noise than was drawn) and a sample rate of 1/3 as "0.3333" (fewer records
    per step): every parameter of the claim is shown as the ledger and results.json hold it."""
    from audits.report import render_html

    report = build_report(pristine_run)
    sigma, q = 2.383979233789939, 1 / 3
    report["budgets"][0].update(budget_epsilon=2.71828, delta=1.23449e-05)
    report["privacy_plan"]["plan"] = [{"method": "fedora", "clients": 3, "epsilon_budget": 2.71828,
                                       "delta": 1.23449e-05, "noise_multiplier": sigma,
                                       "sample_rate": q, "planned_epsilon": 2.5}]
    report["mechanisms"] = [{"method": "fedora", "mechanism": "dpsgd", "clients": 3,
                             "entries": 6, "steps": 30, "noise_multipliers": [sigma],
                             "sample_rates": [q], "clip_norms": [1.0]}]
    page = render_html(report, {})
    assert page.count(">2.71828</td>") == 2 and page.count(">1.23449e-05</td>") == 2
    assert page.count(f">{sigma!r}</td>") == 2 and page.count(f">{q!r}</td>") == 2
    for rounded in (">2.718</td>", ">1.234e-05</td>", ">2.384</td>", ">2.38398</td>",
                    ">0.3333</td>", ">0.333333</td>"):
        assert rounded not in page


def test_an_epsilon_beside_its_budget_and_an_audits_bounds_read_on_the_right_side(pristine_run):
    """The budget and plan tables rounded an epsilon up at four decimals beside a budget of
    more: 0.03124 spent of 0.03125 read "0.0313", above the budget it stays under (0.0078124
    planned of 0.0078125: "0.0079"). The
    audits table showed a lower bound 1.00004 over a claim of 1.0 (refuted) as "1" beside
    the claim "1.0000", and its verdict text as "the lower bound 1 exceeds the claimed epsilon
    1"."""
    from audits.verdict import verdict_text

    report = build_report(pristine_run)
    report["budgets"][0].update(budget_epsilon=0.03125, recorded_epsilon=0.03124,
                                independent_epsilon=0.03124, budget_used=0.03124 / 0.03125)
    report["privacy_plan"]["plan"] = [{"method": "fedora", "clients": 3, "epsilon_budget": 0.0078125,
                                       "planned_epsilon": 0.0078124}]
    audit = report["empirical_audits"][0]
    audit.update(status="run", claim_epsilon=1.0, certifiable_max=8.1, lower_bound=1.00004,
                 confidence=0.95, verdict="refuted",
                 verdict_text=verdict_text("refuted", 1.0, 8.1, 1.00004))
    page = render_html(report, {})
    assert page.count(">0.03124</td>") == 2 and ">0.03125</td>" in page
    assert ">0.0078124</td>" in page and ">0.0078125</td>" in page
    assert ">0.0313</td>" not in page and ">0.0079</td>" not in page
    text = _text_of(page)
    assert "refuted: the lower bound 1.00004 exceeds the claimed epsilon 1.00000" in text
    assert '>1.00000</td><td class="">8.10000</td><td class="">1.00004</td>' in page


def test_the_share_of_an_exactly_spent_budget_is_shown_exactly(pristine_run):
    """The budget table showed 2.0363 spent of a budget of 2.909 (exactly 70%) as "70.1%"
    (format_up of the float share 70.00000000000001); an exact share shows exactly, an
    inexact one still rounds up."""
    from audits.report import render_html

    report = build_report(pristine_run)
    exact, inexact = report["budgets"][0], report["budgets"][1]
    exact.update(budget_epsilon=2.909, recorded_epsilon=2.0363, budget_used=2.0363 / 2.909)
    inexact.update(budget_epsilon=3.0, recorded_epsilon=2.98341, budget_used=2.98341 / 3.0)
    page = render_html(report, {})
    assert ">70.0%</td>" in page and ">70.1%</td>" not in page and ">99.5%</td>" in page


def test_a_share_under_a_tenth_of_a_percent_and_a_tolerance_under_one_percent_read_naturally(
        pristine_run):
    """A budget share taken from the report's budget_used (where the recorded epsilon is no
    finite number) of 0.04% read "4.0e-2%" (format_up's scientific notation); a verifier's
    relative tolerance 0.001 read "0%" (``:.0%``), as if no difference were tolerated."""
    from audits.report import render_html

    report = build_report(pristine_run)
    report["budgets"][0].update(recorded_epsilon=None, budget_used=0.0004)
    report["verification"]["rel_tol"] = 0.001
    page = render_html(report, {})
    assert ">0.1%</td>" in page and "e-2%" not in page
    assert "relative tolerance 0.1% (under-reporting" in _text_of(page)


def test_a_non_private_run_is_not_described_with_budgets_and_ledgers(tmp_path, pristine_run):
    """The threat model of every report said each client enforces its budget and writes every
    release to its signed ledger, also for a run without DP, which has neither."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    cfg = parse_config({"name": "plain-report", "methods": ["local"],
                        "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 8},
                        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8}})
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    doc = build_report(run)
    assert doc["assumptions"]["differential_privacy"] is False
    threat = " ".join(doc["threat_model"])
    assert "budget" in threat and "Differential privacy is off" in threat
    assert "refuses any release" not in threat and "written to its signed" not in threat
    private = " ".join(build_report(pristine_run)["threat_model"])
    assert "refuses any release" in private and "written to its signed" in private


def test_an_integer_beyond_float_range_is_no_figure_not_a_traceback(run_copy, tmp_path):
    """A JSON integer too large for a float (valid JSON, e.g. 10**400) as an audit's lower
    bound or a per-client figure raised OverflowError: no report was written."""
    (run_copy / "audit").mkdir(exist_ok=True)
    text = json.dumps(_replay_doc(run_copy))
    assert '"lower_bound": 0.2,' in text
    (run_copy / "audit" / "replay.json").write_text(
        text.replace('"lower_bound": 0.2,', '"lower_bound": 1' + "0" * 400 + ","))
    doc = json.loads((run_copy / "results.json").read_text())
    doc["methods"]["fedora"]["selected"]["per_client"][0] = -10 ** 400
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    report = json.loads(paths.json.read_text())
    replay = {a["audit"]: a for a in report["empirical_audits"]}["replay"]
    assert replay["status"] == "invalid" and replay["verdict"] is None
    assert "lower_bound is 1000" in replay["verdict_text"] and "not a finite number" in \
        replay["verdict_text"]
    assert report["accuracy"]["per_client"][0]["fedora"] is None


def test_a_whitebox_step_count_that_is_not_an_integer_is_invalid(run_copy):
    """setup.steps True passed report.py's isinstance(steps, int) as a plan of one step, and a
    string or float step count was silently read as 'unknown'; each is now an invalid document
    naming the field, while an integer (or no) step count still gives the audit's verdict."""
    from audits.verdict import audit_document, write_audit_json

    dpsgd = _fedora_dpsgd_claim()

    def row(**setup) -> dict:
        write_audit_json(run_copy, audit_document(
            "whitebox", claim_epsilon=dpsgd, certifiable_max=3 * dpsgd, lower_bound=0.05,
            confidence=0.95, setup={"canaries": 20000, "method": "fedora",
                                    "client": "client-001", "config": "audit-fixture",
                                    **setup}))
        return {a["audit"]: a for a in build_report(run_copy)["empirical_audits"]}["whitebox"]

    assert row()["status"] == "run"
    assert row(steps=40)["status"] == "run"  # the fixture's config plans 4 rounds x 10 steps
    for bad in (True, False, "40", 40.0, -1):
        got = row(steps=bad)
        assert got["status"] == "invalid" and got["verdict"] is None, bad
        assert f"setup.steps is {bad!r}, not a step count" in got["verdict_text"], bad



def test_a_whitebox_claim_cannot_be_inflated_by_its_own_step_count(run_copy):
    """The white-box check let a claim exceed the epsilon of the DP-SGD releases a ledger
    records whenever the document's own setup.steps was larger than the steps recorded, by any
    amount: steps 10**9 passed a claim ten times the ledger's (and a lower bound five times
    it, which refutes the real guarantee) as "consistent". setup.steps must now be the
    steps config.toml plans, and the claim at most the epsilon of those steps at the recorded
    noise and sample rate."""
    from audits.verdict import audit_document, write_audit_json
    from privacy.accounting import PlannedRelease, plan_epsilon

    recorded = _fedora_dpsgd_claim()  # the 20 DP-SGD steps the ledger records
    planned = plan_epsilon([PlannedRelease("dpsgd", 0.1, 40)], 1e-5, 1.2, "rdp")

    def row(claim: float, steps: int) -> dict:
        write_audit_json(run_copy, audit_document(
            "whitebox", claim_epsilon=claim, certifiable_max=30 * recorded,
            lower_bound=min(5 * recorded, 0.9 * claim), confidence=0.95,
            setup={"canaries": 20000, "method": "fedora", "client": "client-001",
                   "config": "audit-fixture", "steps": steps}))
        return {a["audit"]: a for a in build_report(run_copy)["empirical_audits"]}["whitebox"]

    inflated = row(10 * recorded, 10**9)
    assert inflated["status"] == "invalid" and inflated["verdict"] is None
    assert "setup.steps 1000000000 is not the 40 DP-SGD steps config.toml plans" \
        in inflated["verdict_text"]
    assert row(planned, 40)["status"] == "run"  # the plan's own claim
    above = row(1.5 * recorded, 40)
    assert above["status"] == "invalid"
    assert f"exceeds the epsilon {planned:.6g} of all 40 planned DP-SGD steps" \
        in above["verdict_text"]


def test_a_stale_selected_metric_is_named_in_the_report(run_copy, tmp_path):
    """A Flower client that missed the selected round's evaluation keeps an earlier round's
    metric (results.json names it under selected.stale_clients): the report showed it as the
    selected round's without a word."""
    doc = json.loads((run_copy / "results.json").read_text())
    selected = doc["methods"]["fedora"]["selected"]
    selected["stale_clients"] = [{"client": 1, "round": selected["round"] - 1}]
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    stale = json.loads(paths.json.read_text())["accuracy"]["stale"]
    assert stale == [{"method": "fedora", "client": 1, "round": selected["round"] - 1,
                      "selected_round": selected["round"]}]
    assert (f"fedora: client 1's accuracy is from round {selected['round'] - 1}, not the "
            f"selected round {selected['round']}'s") in paths.html.read_text()


def test_rounds_not_considered_for_selection_are_named_in_the_report(run_copy, tmp_path):
    """results.json names the evaluated rounds model selection skipped, as some client had no
    measured metric yet (selected.unmeasured_rounds); the report says so."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["methods"]["fedora"]["selected"]["unmeasured_rounds"] = [1, 2]
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    assert json.loads(paths.json.read_text())["accuracy"]["unmeasured"] == [
        {"method": "fedora", "rounds": [1, 2]}]
    assert ("fedora: rounds 1, 2 were not considered for selection: some client had no "
            "measured accuracy yet") in paths.html.read_text()


def test_a_stale_final_metric_is_named_in_the_report(run_copy, tmp_path):
    """results.json names a client whose final metric is from an earlier round under
    final.stale_clients: the report showed only the selected round's stale clients, so a
    final figure of round 3 passed as the last round's without a word."""
    doc = json.loads((run_copy / "results.json").read_text())
    body = doc["methods"]["local"]
    body["final"] = {**body["selected"], "stale_clients": [
        {"client": 2, "round": body["rounds"] - 1}, {"client": 0, "round": None}]}
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    accuracy = json.loads(paths.json.read_text())["accuracy"]
    assert accuracy["stale"] == []
    assert accuracy["final_stale"] == [
        {"method": "local", "client": 2, "round": body["rounds"] - 1,
         "final_round": body["rounds"]},
        {"method": "local", "client": 0, "round": None, "final_round": body["rounds"]}]
    page = paths.html.read_text()
    assert (f"local: client 2's final accuracy is from round {body['rounds'] - 1}, not the "
            f"last round {body['rounds']}'s") in page
    assert "local: client 0's final accuracy is a placeholder 0 (no figure yet)" in page


def _ckks(degree, bits, level):
    return {"poly_modulus_degree": degree, "coeff_mod_bit_sizes": bits,
            "coeff_modulus_bits": sum(bits), "global_scale": 2.0**40, "global_scale_bits": 40.0,
            "security_level": level}


@pytest.mark.parametrize("parameters, shown", [
    ({"relatedness": _ckks(8192, [60, 40, 40, 60], "128-bit")},
     ["CKKS parameters (relatedness): polynomial modulus degree 8192, coefficient modulus 60 +"
      " 40 + 40 + 60 = 200 bits, global scale 2^40: 128-bit security per the HE security"
      " standard (homomorphicencryption.org, 2018; classical attacks, ternary secret)."]),
    ({"relatedness": _ckks(8192, [60, 40, 40, 60], "256-bit"),
      "propagation": _ckks(8192, [60, 60, 60, 60], "128-bit")},
     ["CKKS parameters (relatedness): polynomial modulus degree 8192, coefficient modulus 60 +"
      " 40 + 40 + 60 = 200 bits, global scale 2^40: 128-bit security per the HE security"
      " standard (homomorphicencryption.org, 2018; classical attacks, ternary secret)"
      " (results.json states '256-bit', which these parameters do not give).",
      "CKKS parameters (propagation): polynomial modulus degree 8192, coefficient modulus 60 +"
      " 60 + 60 + 60 = 240 bits, global scale 2^40: security level unknown (the HE security"
      " standard's table gives no level for these parameters) (results.json states '128-bit',"
      " which these parameters do not give)."]),
    ({"relatedness": _ckks(12000, [50, 50], "unknown")},
     ["CKKS parameters (relatedness): polynomial modulus degree 12000, coefficient modulus 50 +"
      " 50 = 100 bits, global scale 2^40: security level unknown (the HE security standard's"
      " table gives no level for these parameters)."]),
    (None, ["CKKS parameters: not recorded in results.json, so no security level can be"
            " stated for the encryption."]),
], ids=["default", "overstated", "unknown-degree", "missing"])
def test_the_report_states_the_ckks_parameters_and_only_the_level_they_give(
        run_copy, tmp_path, parameters, shown):
    """An encrypted run's results.json states who holds the CKKS keys; the report did not say
    which parameters the encryption used nor what security they give. It now names them and
    the HE standard's level recomputed from the degree and coefficient bits (never a level
    results.json claims beyond it; "unknown" off the table)."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["assumptions"].update(relatedness="noised+encrypted", ckks_keys="every client holds it")
    if parameters is not None:
        doc["assumptions"]["ckks_parameters"] = parameters
    (run_copy / "results.json").write_text(json.dumps(doc))
    paths = write_report(run_copy, tmp_path / "out")
    notes = json.loads(paths.json.read_text())["assumptions"]["notes"]
    assert [n for n in notes if n.startswith("CKKS parameters")] == shown
    page = paths.html.read_text()
    assert all(html.escape(line, quote=True) in page for line in shown)


def test_no_ckks_note_for_a_run_whose_methods_encrypted_nothing(run_copy, tmp_path):
    """fedora.relatedness names an encrypted mode, but no method of the run used it (no
    ckks_keys stated): the report states no CKKS parameters and no missing ones."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["assumptions"]["relatedness"] = "noised+encrypted"
    (run_copy / "results.json").write_text(json.dumps(doc))
    notes = build_report(run_copy)["assumptions"]["notes"]
    assert not [n for n in notes if n.startswith("CKKS parameters")]


@pytest.mark.parametrize("where", ["run_dir", "out_dir"])
@pytest.mark.parametrize("path, why", [("", "is empty: name a directory"),
                                       ("  ", "is empty: name a directory"),
                                       ("r\x00", "holds a NUL character")])
def test_write_report_refuses_an_empty_or_blank_directory(tmp_path, monkeypatch, pristine_run,
                                                          where, path, why):
    """``write_report(run, out_dir="")`` wrote report.json and report.html into the current
    directory (``"  "``: a directory of spaces), as ``audit report --out ""`` no longer does."""
    monkeypatch.chdir(tmp_path)
    args = {"run_dir": pristine_run, "out_dir": None, where: path}
    with pytest.raises(ReportError, match=f"{where}.* {why}"):
        write_report(**args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("clip", [[1.0], "1.0", {"norm": 1.0}], ids=["list", "text", "object"])
def test_a_clip_norm_that_is_not_a_number_fails_verification_not_the_report(run_copy, tmp_path,
                                                                              clip):
    """A ledger entry whose clip norm is a list or an object stopped 'audit report' with a raw
    TypeError (unhashable in the mechanisms table), and a text beside the other ledgers'
    numbers one too (unorderable): nothing was written. The report is written, verification
    fails on the edited entry, and the mechanisms table lists only numeric clip norms."""
    path = run_copy / "ledgers" / "fedora" / "client-001.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    assert "clip_norm" in entry["params"]
    entry["params"]["clip_norm"] = clip
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("".join(line + "\n" for line in lines))
    paths = write_report(run_copy, tmp_path / "out")
    report = json.loads(paths.json.read_text())
    assert report["verification"]["ok"] is False
    assert any(f["client_id"] == "client-001" and f["method"] == "fedora" and f["entry"] == 1
               for f in report["verification"]["findings"] if f["severity"] == "error")
    dpsgd = next(m for m in report["mechanisms"]
                 if m["method"] == "fedora" and m["mechanism"] == "dpsgd")
    assert all(isinstance(c, int | float) for c in dpsgd["clip_norms"])
    assert "Verification: FAILED" in paths.html.read_text()


def test_a_runtimes_run_level_events_are_shown(run_copy, tmp_path):
    """A Flower run records its refusals, error replies and missed exchanges in results.json's
    run-level ``events`` (no ``privacy.<method>.events``): the report showed none of them, so
    a client that refused a release or never answered the setup exchange went unexplained."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["events"] = [
        {"method": "fedora", "round": 0, "client": 1, "node": 1001,
         "event": "error reply (1: SystemError: ClientApp killed): counts as not taking part"
                  " in the setup exchange"},
        {"method": "fedora", "round": 1, "client": 1, "node": 1001,
         "event": "refused its release (over budget): counts as not taking part in the round"
                  " exchange"}]
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    paths = write_report(run_copy, tmp_path / "out")
    report = json.loads(paths.json.read_text())
    assert report["verification"]["ok"] is True
    shown = [e["event"] for e in report["privacy_plan"]["events"]]
    assert all(e["event"] in shown for e in doc["events"])
    page = paths.html.read_text()
    assert "ClientApp killed" in page and "refused its release (over budget)" in page


@pytest.mark.parametrize("bad", [3, b"run", ["run"], "", "a\x00b"])
def test_build_report_names_a_path_argument_that_is_not_a_text_path(pristine_run, bad):
    with pytest.raises(ReportError, match="^run_dir "):
        build_report(bad)
    with pytest.raises(ReportError, match="^allowlist "):
        build_report(pristine_run, allowlist=bad)


def test_audit_report_with_an_allowlist_compares_the_published_allowlist(run_copy, tmp_path,
                                                                        capsys):
    """`audit report --allowlist` runs the check of `audit verify --allowlist`: a run whose
    keys/allowlist.json lists a party the given allowlist does not register fails."""
    from audits.cli import main
    from privacy.identity import Identity, allowlist_bytes, load_allowlist

    published = run_copy / "keys" / "allowlist.json"
    trusted = tmp_path / "trusted.json"
    trusted.write_bytes(published.read_bytes())
    out = tmp_path / "out"
    assert main(["audit", "report", str(run_copy), "--allowlist", str(trusted),
                 "--out", str(out)]) == 0
    keys = load_allowlist(published)
    published.write_bytes(allowlist_bytes({**keys, "auditor": Identity.generate("auditor").public}))
    capsys.readouterr()
    assert main(["audit", "report", str(run_copy), "--allowlist", str(trusted),
                 "--out", str(out)]) == 1
    assert "lists 1 parties the given allowlist" in capsys.readouterr().out
    doc = json.loads((out / "report.json").read_text())
    assert "lists 1 parties the given allowlist" in json.dumps(doc)
    report = build_report(run_copy, allowlist=trusted)
    assert "lists 1 parties the given allowlist" in json.dumps(report)


def test_without_config_the_noise_note_follows_results_json(run_copy):
    """Found by a hunt: a Flower result folder has no config.toml; its results.json states
    noise = reproducible (the assumptions table showed it), but the report's notes carried
    the "NOT private against anyone who knows the config" warning only from config.toml."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["assumptions"]["noise"] = "reproducible"
    (run_copy / "results.json").write_text(json.dumps(doc))
    (run_copy / "config.toml").unlink()
    notes = build_report(run_copy)["assumptions"]["notes"]
    assert [n for n in notes if n.startswith("noise = reproducible: NOT private")]
    doc["assumptions"]["noise"] = "csprng"
    (run_copy / "results.json").write_text(json.dumps(doc))
    notes = build_report(run_copy)["assumptions"]["notes"]
    assert [n for n in notes if n.startswith("noise = csprng")]
    assert not [n for n in notes if n.startswith("noise = reproducible")]


def test_without_results_json_every_assumption_config_implies_is_stated(tmp_path):
    """Without results.json the report's assumptions were four keys read from config.toml:
    methods_compared, accountant and fedavg_finetuning, which config.toml implies, were
    missing. They are now stated as a run of that config states them, and what only
    results.json can say is named unknown."""
    from secure_fedora.algorithms.methods import FINETUNING_UNDER_DP
    from secure_fedora.core.config import load_config
    from secure_fedora.runtimes.results import METHODS_COMPARED

    from .conftest import build_run_dir

    run = build_run_dir(tmp_path / "run", num_clients=2, rounds=1, methods=("local", "fedavg"))
    assert "beyond_config" not in build_report(run)["assumptions"]
    (run / "results.json").unlink()
    doc = build_report(run)["assumptions"]
    assert doc["methods_compared"] == METHODS_COMPARED and doc["accountant"] == "rdp"
    assert doc["fedavg_finetuning"] == FINETUNING_UNDER_DP
    assert doc["beyond_config"].startswith("unknown: results.json missing")
    from secure_fedora.runtimes.results import config_assumptions

    implied = config_assumptions(load_config(run / "config.toml"))
    assert {k: doc[k] for k in implied} == implied  # exactly as a run of the config states


def test_the_privacy_config_states_the_delta_an_override_without_one_has(pristine_run):
    """An override without its own delta was shown with delta None in the privacy
    configuration line; it has the default delta, which is now shown."""
    doc = build_report(pristine_run)
    assert doc["privacy_config"]["overrides"] == {"2": {"epsilon": 3.0, "delta": 1e-5}}
    line = render_html(doc, {}).split("per-client overrides:")[1].split("</p>")[0]
    assert line == " {&#x27;2&#x27;: {&#x27;epsilon&#x27;: 3.0, &#x27;delta&#x27;: 1e-05}}"


def test_the_declared_reply_entries_are_shown_a_methods_own_claim_marked(run_copy, tmp_path):
    """results.json states what each method's client replies carry beyond the accounted
    releases, and why (``privacy.<method>.reply_entries``); the report showed none of it, so
    a plug-in's "a public value" went unseen. It now lists every entry with its reason per
    method, marks an entry no built-in method declares with that reason as an assumption to
    review, and says that these are declared, not verified (audit verify does not check them)."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["privacy"]["local"]["reply_entries"]["round"]["mean_x"] = {
        "reason": "a public value", "built_in": False}
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    paths = write_report(run_copy, tmp_path / "out")
    report = json.loads(paths.json.read_text())
    assert report["verification"]["ok"] is True  # claims, not figures: nothing to verify
    declared = report["reply_entries"]
    assert declared["status"] == "declared, not verified" and declared["not_stated"] == []
    rows = {(r["method"], r["stage"], r["entry"]): r for r in declared["entries"]}
    assert set(rows) == {("fedora", "setup", "summary"), ("fedora", "round", "theta"),
                         ("fedora", "round", "steps"), ("fedora", "round", "lambda"),
                         ("local", "round", "steps"), ("local", "round", "mean_x")}
    assert [k for k, r in rows.items() if r["review"]] == [("local", "round", "mean_x")]
    assert rows[("local", "round", "mean_x")]["reason"] == "a public value"
    assert rows[("fedora", "setup", "summary")]["reason"] == \
        doc["privacy"]["fedora"]["reply_entries"]["setup"]["summary"]["reason"]
    page = paths.html.read_text()
    section = page[page.index('id="reply-entries"'):page.index('id="mechanisms"')]
    assert "declared, not verified" in section and "audit verify does not check" in section
    assert section.count("assumption to review (the method's own claim)") == 1
    mean_row = section[section.index("mean_x"):]
    assert mean_row.index("a public value") < mean_row.index("assumption to review") \
        < mean_row.index("</tr>")
    assert section.count("built-in") >= 5


def test_a_results_json_without_declared_reply_entries_says_so(run_copy, tmp_path):
    """A DP run an older version wrote states no reply entries: the report says so for each
    method rather than showing an empty table."""
    doc = json.loads((run_copy / "results.json").read_text())
    for body in doc["privacy"].values():
        del body["reply_entries"]
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    report = build_report(run_copy)
    assert report["reply_entries"]["entries"] == []
    assert report["reply_entries"]["not_stated"] == ["fedora", "local"]
    page = render_html(report, {})
    assert "fedora: results.json does not state what its replies carry" in page


def test_report_json_bytes_are_those_of_the_dump_parse_dump_path(pristine_run, tmp_path,
                                                                 monkeypatch):
    """report.json is serialised once (it was dumped with the indent, parsed and dumped again:
    seconds at thousands of clients) to the very bytes the old path wrote, for a document
    holding what JSON cannot (NaN, infinity, a Path, a tuple) too."""
    import audits.report as report_module
    from audits.output import seal_report
    from secure_fedora.core.files import strict_json

    built: list[dict] = []
    original = report_module.build_report

    def capture(*args, **kwargs):
        doc = original(*args, **kwargs)
        doc["probe"] = {"nan": float("nan"), "inf": [1.5, float("-inf")], "path": tmp_path,
                        "tuple": (1, 2.25), "text": "\u00e9\u2013"}
        built.append(doc)
        return doc
    monkeypatch.setattr(report_module, "build_report", capture)
    paths = write_report(pristine_run, tmp_path / "out")
    old = seal_report(strict_json(json.loads(json.dumps(built[0], default=str))), "report")
    assert paths.json.read_bytes() == old.encode()
    assert json.loads(paths.json.read_text())["probe"]["nan"] is None


def _figures(monkeypatch) -> list:
    """The figures the report draws, in order (each closed unrendered: the PNG is a stub)."""
    import audits.report as report_module

    figures: list = []

    def keep(fig) -> str:
        figures.append(fig)
        return base64.b64encode(b"png").decode()
    monkeypatch.setattr(report_module, "_png_base64", keep)
    return figures


def _client_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_marker() == "o"]


def test_plots_of_many_clients_are_summaries_with_captions(pristine_run, tmp_path,
                                                           monkeypatch):
    """Above PLOT_CLIENTS_MAX clients the epsilon plot draws each method's median with the
    5-95% and min-max bands (and the budgets) instead of a line per client, the metric plot
    each method's sorted values instead of a bar per client, and the page says so; the
    tables and report.json keep every client."""
    import audits.report as report_module

    verification = verify_run(pristine_run)
    figures = _figures(monkeypatch)
    monkeypatch.setattr(report_module, "PLOT_CLIENTS_MAX", 2)  # the run has 3 clients
    paths = write_report(pristine_run, tmp_path / "many", verification=verification)
    epsilon, accuracy = figures
    for ax in epsilon.axes:
        assert len(_client_lines(ax)) == 1  # the median
        assert len(ax.collections) == 2  # the two bands
        assert "3 clients" in ax.get_title() and "summary" in ax.get_title()
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # a budget
    (ax,) = accuracy.axes
    assert not ax.patches and len(ax.get_lines()) == 2  # fedora, local: sorted values
    assert [line.get_label() for line in ax.get_lines()] == ["fedora (3 clients)",
                                                             "local (3 clients)"]
    assert list(ax.get_lines()[0].get_ydata()) == sorted(ax.get_lines()[0].get_ydata())
    page = paths.html.read_text()
    assert "Summary of many clients (fedora: 3 clients; local: 3 clients)" in page
    assert "Summary of 3 clients: each method's accuracy values, sorted" in page
    for cid in ("client-000", "client-001", "client-002"):
        assert page.count(f">{cid}<") >= 3  # the budget and both accuracy tables
    doc = json.loads(paths.json.read_text())
    assert all(len(s) == 3 for s in doc["epsilon_series"].values())
    assert len(doc["accuracy"]["per_client"]) == 3


def test_plots_of_few_clients_draw_every_client(pristine_run, tmp_path, monkeypatch):
    """At most PLOT_CLIENTS_MAX clients: a line per client and a bar per client and method,
    no summary caption."""
    verification = verify_run(pristine_run)
    figures = _figures(monkeypatch)
    paths = write_report(pristine_run, tmp_path / "few", verification=verification)
    epsilon, accuracy = figures
    for ax in epsilon.axes:
        assert len(_client_lines(ax)) == 3 and not ax.collections
    assert len(accuracy.axes[0].patches) == 6
    assert "Summary of" not in paths.html.read_text()


def test_epsilon_summary_carries_a_clients_spent_epsilon_over_rounds_it_sat_out():
    """A client without a point in a round has spent what it had by then; one that has not
    released yet is not counted."""
    from audits.report import _epsilon_bands

    rounds, stats = _epsilon_bands({
        "a": [{"round": 1, "epsilon": 1.0}, {"round": 3, "epsilon": 3.0}],
        "b": [{"round": 2, "epsilon": 5.0}],
    })
    assert rounds == [1, 2, 3]
    assert stats["min"] == [1.0, 1.0, 3.0] and stats["max"] == [1.0, 5.0, 5.0]
    assert stats["median"] == [1.0, 3.0, 4.0]


def test_a_run_without_fedora_states_no_fedora_assumption(tmp_path):
    """Every results.json stated ``assumptions.relatedness`` (the ``[fedora]`` mode), and the
    report of a run of Local and FedAvg only said that "lambda_i is computed from the
    validation split in the clear" and how relatedness summaries are sent: FEDORA's, false of
    that run. They are now stated only where a method computes them (FEDORA, or a method
    built on it); a FEDORA run states them as before."""
    import tomli_w

    from audits.report import _assumptions
    from secure_fedora.core.config import parse_config
    from secure_fedora.core.registry import METHODS
    from secure_fedora.runtimes.inprocess import Simulation, build_clients
    from secure_fedora.runtimes.results import config_assumptions

    doc = {"name": "no-fedora", "methods": ["local", "fedavg"], "seed": 0,
           "data": {"num_clients": 2, "train_per_client": 32, "val_per_client": 8,
                    "test_per_client": 8},
           "training": {"rounds": 1, "batch_size": 16}}
    cfg = parse_config(doc)
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    (run / "config.toml").write_text(tomli_w.dumps(doc))  # what `secure-fedora run` keeps
    stated = json.loads((run / "results.json").read_text())["assumptions"]
    assert "relatedness" not in stated and stated["validation_data"] == "public"
    for _ in range(2):  # with results.json, then from config.toml alone
        shown = build_report(run)["assumptions"]
        assert "relatedness" not in shown and shown["validation_data"] == "public"
        assert not [n for n in shown["notes"] if "lambda_i" in n or "relatedness" in n]
        (run / "results.json").unlink(missing_ok=True)

    fedora = parse_config({**doc, "methods": ["fedora", "local"], "fedora": {"k": 1}})
    implied = config_assumptions(fedora)
    assert implied["relatedness"] == "plain" and list(implied)[:3] == \
        ["validation_data", "model_selection", "relatedness"]  # where it always was
    assert _assumptions({"assumptions": implied}, fedora)["notes"][:2] == [
        "lambda_i is computed from the validation split in the clear: private only if that"
        " split is public data (declared public in the config).",
        "relatedness: summaries are sent in the clear (no privacy for the summary)."]
    from secure_fedora.runtimes.results import uses_relatedness

    METHODS.register("fedora_built_on", METHODS.get("fedora"))
    try:
        assert uses_relatedness(parse_config({**doc, "methods": ["fedora_built_on"],
                                              "fedora": {"k": 1}}))
    finally:
        METHODS.unregister("fedora_built_on")


def test_the_report_says_which_key_signed_each_ledger_and_the_anchor(run_copy, tmp_path):
    """Found by a hunt: the report named only the allowlist file, so a reviewer could not
    tell from it which key signed which ledger or the anchor, nor compare them with keys
    registered elsewhere. report.json's ``signers`` (and the page) now give, per party, its
    Ed25519 key, what it signed and whether those signatures verify under it; two swapped
    ledgers show as not verifying under their clients' keys."""
    from privacy.identity import load_allowlist

    keys = load_allowlist(run_copy / "keys" / "allowlist.json")
    anchor = json.loads((run_copy / "anchor.json").read_text())["signer"]
    rows = build_report(run_copy)["signers"]
    assert [(r["party_id"], r["ed25519"], r["signed"], r["verified"], r["registered"])
            for r in rows] == [
        *((cid, keys[cid].verify_key_hex(), [f"ledger fedora/{cid}", f"ledger local/{cid}"],
           True, True) for cid in ("client-000", "client-001", "client-002")),
        ("operator", keys["operator"].verify_key_hex(),
         [f"anchor {run_copy / 'anchor.json'}"], True, True)]
    assert anchor == {"party_id": "operator", "ed25519": keys["operator"].verify_key_hex()}
    ledgers = run_copy / "ledgers" / "fedora"
    first, second = (ledgers / "client-000.jsonl"), (ledgers / "client-001.jsonl")
    texts = first.read_bytes(), second.read_bytes()
    first.write_bytes(texts[1])
    second.write_bytes(texts[0])
    paths = write_report(run_copy, tmp_path / "out")
    rows = json.loads(paths.json.read_text())["signers"]
    assert [r["verified"] for r in rows] == [False, False, True, True]
    page = html.unescape(paths.html.read_text())
    assert "Who signed what" in page and keys["client-002"].verify_key_hex() in page


def test_the_report_names_the_runs_methods_and_runtime(run_copy, tmp_path):
    """Found by a hunt: the run identity named no methods and no runtime, so a reviewer read
    them off the tables (or results.json). Now config.toml's methods (without it, those with
    ledgers) and results.json's runtime are in report.json's identity and on the page."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["runtime"] = "in-process"
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    paths = write_report(run_copy, tmp_path / "out")
    ident = json.loads(paths.json.read_text())["identity"]
    assert (ident["methods"], ident["runtime"]) == (["fedora", "local"], "in-process")
    page = html.unescape(paths.html.read_text())
    assert re.search(r">methods</td><td[^>]*>fedora, local</td>", page)
    assert re.search(r">runtime</td><td[^>]*>in-process</td>", page)
    (run_copy / "config.toml").unlink()
    (run_copy / "ledgers" / "fedora" / "client-000.jsonl").unlink()
    assert build_report(run_copy)["identity"]["methods"] == ["fedora", "local"]


def test_the_budget_table_says_when_a_budget_ran_out_and_what_it_refused(pristine_run):
    """Found by a hunt: the budget table said only "refused: yes", so a reviewer had to read
    the ledger for when a client's budget ran out. Each row's ``refusal`` (and the page) now
    give the round, the mechanisms refused and the epsilon they would have reached, as the
    signed refusal entry records them; a row without a refusal has none."""
    doc = build_report(pristine_run)
    rows = {(r["method"], r["client_id"]): r for r in doc["budgets"]}
    refusal = rows["fedora", "client-002"]["refusal"]  # the fixture's budget-3 client
    entry = next(json.loads(line) for line in
                 (pristine_run / "ledgers" / "fedora" / "client-002.jsonl").read_text().splitlines()
                 if json.loads(line)["mechanism"] == "refusal")
    assert refusal == {"round": entry["round"], "release_kind": "model",
                       "epsilon_would_be": entry["params"]["epsilon_would_be"],
                       "mechanisms": ["dpsgd", "gaussian_lambda"]}
    assert rows["fedora", "client-000"]["refusal"] is None
    page = html.unescape(render_html(doc, {}))
    assert (f"yes: round {entry['round']} (dpsgd, gaussian_lambda, would reach epsilon"
            f" {format_up(entry['params']['epsilon_would_be'], 4)})") in page


def test_a_nonce_file_among_the_ledgers_is_one_line_of_the_report(run_copy, tmp_path):
    """A client's ``.nonces.jsonl`` copied into ``ledgers/fedora/`` made the report list a
    client 'client-001.nonces' in its budget table with a dozen errors; the report now shows
    one warning saying what the file is, and its budget table holds the real ledgers only."""
    from tests.audits.test_verify import _real_nonce_file

    _real_nonce_file(run_copy / "ledgers" / "fedora" / "client-001.nonces.jsonl")
    paths = write_report(run_copy, tmp_path / "report")
    doc = json.loads(paths.json.read_text())
    assert doc["verification"]["ok"]
    assert not any(r["client_id"].endswith(".nonces") for r in doc["budgets"])
    [noted] = [f for f in doc["verification"]["findings"] if f["check"] == "nonce_file"]
    assert noted["severity"] == "warning"
    page = html.unescape(paths.html.read_text())
    assert "ledgers/fedora/client-001.nonces.jsonl is a nonce state file" in page


def test_the_report_says_the_planned_epsilon_is_rounded_up_and_the_recorded_one_exact(
        pristine_run, tmp_path):
    """The report's privacy plan (planned epsilon, rounded up) and its per-client budgets
    (each ledger's exact epsilon) showed two figures for "the same" spend with nothing saying
    which is which; the plan now says it, in the page and in report.json."""
    paths = write_report(pristine_run, tmp_path / "report")  # its plan rows, as a run's
    note = json.loads(paths.json.read_text())["privacy_plan"]["note"]
    assert note.startswith("planned \u03b5 is the plan's epsilon rounded up")
    assert "the recorded \u03b5 of the per-client budgets is the ledger's exact epsilon" in note
    assert note in html.unescape(paths.html.read_text())
    doc = json.loads((pristine_run / "results.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(pristine_run, run)
    shutil.copytree(pristine_run.parent / f"{pristine_run.name}-keystore",
                    tmp_path / "run-keystore")
    for section in doc["privacy"].values():
        del section["plan"]  # a run written before the plan
    (run / "results.json").write_text(json.dumps(doc, indent=2))
    reanchor(run)
    assert "note" not in build_report(run)["privacy_plan"]  # no plan rows: no note


def test_the_threat_model_names_lambda_only_for_a_run_whose_methods_release_it(
        tmp_path, pristine_run):
    """Every DP report's threat model said FEDORA's lambda leaves each client, also for a run
    of methods that release none. It now names lambda only where a method of the run
    declares it (results.json's reply_entries, else config.toml's methods), keeping it where
    that cannot be told; the rest of the text is unchanged."""
    from .conftest import build_run_dir

    lam = "FEDORA's lambda (every round it takes part in; noised with private validation data)"
    fedora = build_report(pristine_run)["threat_model"]
    assert lam in " ".join(fedora) and "noised lambda" in " ".join(fedora)
    prox = build_run_dir(tmp_path / "fedprox", methods=("fedprox",))
    threat = build_report(prox)["threat_model"]
    assert "lambda" not in " ".join(threat)
    assert len(threat) == len(fedora) and [threat[0], *threat[2:]] == [fedora[0], *fedora[2:]]
    assert "its model (every round it takes part in) and its public training-set size" \
        in threat[1] and "(DP-SGD for models)." in threat[1]
    config = (prox / "config.toml").read_bytes()
    (prox / "config.toml").unlink()  # a Flower result directory: results.json tells
    assert build_report(prox)["threat_model"] == threat
    results = json.loads((prox / "results.json").read_text())
    del results["privacy"]["fedprox"]["reply_entries"]  # an older run's results.json
    (prox / "results.json").write_text(json.dumps(results))
    assert lam in " ".join(build_report(prox)["threat_model"])  # cannot tell: named
    (prox / "config.toml").write_bytes(config)  # config.toml's methods tell
    assert build_report(prox)["threat_model"] == threat


def test_the_threat_model_does_not_call_a_public_validation_lambda_noised(tmp_path):
    """A DP FEDORA run with public validation data releases its lambda in the clear (no
    ledger entry accounts it); the threat model said it was "noised with private validation
    data" and named a Gaussian mechanism for a "noised lambda" that the ledgers do not hold."""
    from privacy.ledger import read_ledger
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    cfg = parse_config({"name": "public-lambda", "methods": ["fedora"],
                        "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 8, "validation": "public"},
                        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8},
                        "fedora": {"relatedness": "noised", "k": 1},
                        # fixed noise: no calibration to wait for
                        "privacy": {"enabled": True, "epsilon": 50.0, "delta": 1e-3,
                                    "accountant": "rdp", "noise_multiplier": 2.0,
                                    "summary_noise_multiplier": 4.0}})
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg), keystore=tmp_path / "keys").run()
    mechanisms = {e["mechanism"] for path in (run / "ledgers" / "fedora").glob("*.jsonl")
                  for e in read_ledger(path)}
    assert "gaussian_lambda" not in mechanisms and "gaussian_summary" in mechanisms
    threat = " ".join(build_report(run)["threat_model"])
    assert "noised lambda" not in threat and "noised with private validation" not in threat
    assert ("FEDORA's lambda (every round it takes part in; computed in the clear from"
            " validation data declared public, not accounted)") in threat
    assert "the Gaussian mechanism for noised summaries)" in threat


@pytest.mark.parametrize("method", ["local", "fedavg", "fedprox", "ditto", "apfl", "fedamp"])
def test_the_threat_model_names_the_relatedness_summary_only_for_a_run_that_releases_one(
        tmp_path, pristine_run, method):
    """Every DP report's threat model said each client's relatedness summary (FEDORA, once)
    leaves it, also for a run of methods that release none; it now names the summary only
    where a method of the run declares it among its setup reply's entries (results.json,
    else config.toml), and where that cannot be told."""
    from .conftest import build_run_dir

    summary = "its relatedness summary (FEDORA, once)"
    fedora = " ".join(build_report(pristine_run)["threat_model"])
    assert summary in fedora and "noised summaries" in fedora
    run = build_run_dir(tmp_path / method, methods=(method,))
    threat = " ".join(build_report(run)["threat_model"])
    assert "relatedness summary" not in threat and "noised summaries" not in threat
    results = json.loads((run / "results.json").read_text())
    del results["privacy"][method]["reply_entries"]
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.toml").unlink()  # neither tells: named
    assert summary in " ".join(build_report(run)["threat_model"])


def test_the_threat_model_names_a_model_only_for_a_run_whose_clients_send_one(
        tmp_path, pristine_run):
    """A Local run's clients send only their step counts (the model never leaves), yet its
    report said each client's model leaves every round, accounted by DP-SGD."""
    from .conftest import build_run_dir

    assert "its model (every round it takes part in)" in build_report(pristine_run)[
        "threat_model"][1]
    threat = build_report(build_run_dir(tmp_path / "local", methods=("local",)))["threat_model"]
    assert threat[1].startswith("What leaves client i: its public training-set size and step"
                                " count; with DP on, nothing else leaves it")
    assert "model" not in threat[1] and "DP-SGD" not in threat[1]


def test_the_threat_model_names_further_declared_entries_of_a_plug_in(tmp_path, pristine_run):
    """A plug-in method registered under its own name whose round reply declares an entry of
    its own: the threat model says further declared entries leave (none for FEDORA and
    Local); one built on FEDORA under its own name releases FEDORA's summary and lambda."""
    from secure_fedora.algorithms.baselines import FedProx
    from secure_fedora.core.registry import METHODS

    from .conftest import build_run_dir

    class ScoredProx(FedProx):
        @classmethod
        def reply_entries(cls, cfg, stage):
            declared = super().reply_entries(cfg, stage)
            return {**declared, "score": "a public score"} if stage == "round" else declared

    further = "the further entries its methods declare for their replies"
    assert further not in " ".join(build_report(pristine_run)["threat_model"])
    METHODS.register("scored_prox", ScoredProx)
    METHODS.register("fedora_own_name", METHODS.get("fedora"))
    try:
        scored = build_report(build_run_dir(tmp_path / "s", methods=("scored_prox",)))
        own = build_report(build_run_dir(tmp_path / "f", methods=("fedora_own_name",)))
    finally:
        METHODS.unregister("scored_prox")
        METHODS.unregister("fedora_own_name")
    assert further in scored["threat_model"][1] and "lambda" not in scored["threat_model"][1]
    assert "or leaves for its declared reason" in scored["threat_model"][1]
    assert own["threat_model"] == build_report(pristine_run)["threat_model"]


@pytest.mark.parametrize(("method", "named"), [
    ("fedora", {"relatedness summary": True, "FEDORA's lambda": True}),
    ("fedprox", {"relatedness summary": False, "FEDORA's lambda": False})])
def test_a_non_private_threat_model_names_what_the_run_s_methods_send(tmp_path, method, named):
    """Without DP the threat model named FEDORA's summary for every run and never its lambda,
    which a FEDORA client sends every round; it now names each where a method declares it."""
    import tomli_w

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(tomli_w.dumps({
        "name": "plain", "methods": [method],
        "data": {"num_clients": 3, "train_per_client": 16, "val_per_client": 8,
                 "test_per_client": 8, "validation": "public"},
        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8}, "fedora": {"k": 1}}))
    leaves = build_report(run)["threat_model"][1]
    assert "Differential privacy is off" in leaves
    assert {text: text in leaves for text in named} == named


def test_a_run_of_a_factory_that_names_no_class_is_stated_alike_in_results_and_report(tmp_path):
    """A method registered as a factory that names no class: its replies are not declared
    where a statement can read them. The report's threat model names every entry its replies
    may carry (FEDORA's lambda among them), and results.json's ``assumptions.client_errors``,
    read through the same reader, names FEDORA's pull tag as possible and the method, where it
    said nothing of it (as for a run whose replies carry no lambda)."""
    from secure_fedora.algorithms.baselines import FedAvg
    from secure_fedora.core.config import parse_config
    from secure_fedora.core.registry import METHODS
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    def factory(ctx, cfg):  # names no class (no .algorithm)
        return FedAvg.from_config(ctx, cfg)

    run = tmp_path / "run"
    METHODS.register("classless_r", factory)
    try:
        cfg = parse_config({"name": "classless", "methods": ["classless_r"],
                            "data": {"num_clients": 2, "train_per_client": 16,
                                     "val_per_client": 8, "test_per_client": 8},
                            "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8}})
        results = Simulation(cfg, run, clients=build_clients(cfg)).run()
        threat = build_report(run)["threat_model"][1]
    finally:
        METHODS.unregister("classless_r")
    stated = results["assumptions"]["client_errors"]
    assert "What the replies of classless_r carry is not declared" in stated
    assert "FEDORA's pull diverged" in stated
    assert "FEDORA's lambda (every round it takes part in)" in threat
    assert "its relatedness summary" in threat and "the further entries its methods declare" \
        in threat


def test_a_run_identity_value_results_json_does_not_record_is_not_shown_as_none(pristine_run):
    """A Flower DP run records data_fingerprint null (no client sends a hash of its data): the
    run identity showed "None" as if it were the fingerprint."""
    report = build_report(pristine_run)
    report["identity"].update(data_fingerprint=None, code_version=None)
    report["assumptions"]["data_fingerprint"] = "data_fingerprint is null: under DP ..."
    text = _text_of(render_html(report, {}))
    identity = text.split("Run identity")[1].split("Threat model")[0]
    assert "None" not in identity
    assert "(SHA-256)not recorded (see the data_fingerprint assumption below)" in identity
    assert "code versionnot recorded in results.json" in identity
    fingerprint = build_report(pristine_run)["identity"]["data_fingerprint"]
    assert fingerprint and fingerprint in _text_of(render_html(build_report(pristine_run), {}))


def test_the_privacy_config_states_what_the_run_used_for_keys_left_unset(tmp_path):
    """The privacy configuration line printed the keys config.toml left unset as
    ``sample_rate=None, model_selection=None`` (also ``noise_multiplier=None``), while the run
    used a sample rate, chose its rounds by validation (its assumptions say so) and calibrated
    its noise. Each is now stated as ``default (<what the run used>)`` and report.json holds
    the value the run used, naming the keys in ``defaults``; "None" is shown for no value the
    run had (a non-DP run does not sample or noise: "unused")."""
    import tomli_w

    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    d = {"name": "report-defaults", "methods": ["local"], "seed": 0,
         "data": {"num_clients": 2, "train_per_client": 32, "val_per_client": 8,
                  "test_per_client": 8, "validation": "public"},
         "training": {"rounds": 1, "local_epochs": 1, "batch_size": 16},
         "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-3, "accountant": "rdp"}}
    cfg = parse_config(d)
    run = tmp_path / "run"
    results = Simulation(cfg, run, clients=build_clients(cfg)).run()
    doc = build_report(run)
    pc = doc["privacy_config"]
    (row,) = results["privacy"]["local"]["plan"]
    assert pc["sample_rate"] == row["sample_rate"] == 0.5
    assert pc["model_selection"] == results["assumptions"]["model_selection"] == "validation"
    assert pc["noise_multiplier"] == "calibrated"
    assert set(pc["defaults"]) == {"sample_rate", "model_selection", "noise_multiplier",
                                   "summary_noise_multiplier", "lambda_noise_multiplier"}
    line = render_html(doc, {}).split("privacy configuration: ")[1].split("</p>")[0]
    assert "None" not in line
    assert "sample_rate=default (0.5)" in line and "model_selection=default (validation)" in line
    assert "noise_multiplier=default (calibrated per budget: see the privacy plan)" in line
    assert "epsilon=8.0" in line and "accountant=rdp" in line  # set values as configured

    d["privacy"] = {"enabled": False, "model_selection": "final_round"}
    plain = tmp_path / "plain"
    Simulation(parse_config(d), plain, clients=build_clients(parse_config(d))).run()
    (plain / "config.toml").write_text(tomli_w.dumps(d))  # a run without privacy writes none
    doc = build_report(plain)
    assert doc["privacy_config"]["defaults"] == []
    line = render_html(doc, {}).split("privacy configuration: ")[1].split("</p>")[0]
    assert "None" not in line and "model_selection=final_round" in line
    assert "sample_rate=unset (unused: privacy off)" in line


def test_the_verdict_line_counts_in_the_singular_for_one(pristine_run):
    """The page's verdict line said "1 warnings" and "1 client ledgers": each count is
    worded as ``audit verify`` words it."""
    from audits.report import render_html

    report = build_report(pristine_run)
    ver = report["verification"]
    ver["findings"] = [next(f for f in ver["findings"] if f["severity"] == "warning")]
    report["budgets"] = report["budgets"][:1]
    line = render_html(report, {}).split('id="verdict">')[1].split("</div>")[0]
    assert "1 client ledger, 0 errors, 1 warning" in line
