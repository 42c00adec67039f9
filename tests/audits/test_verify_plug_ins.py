"""``audit verify`` of a run whose ledgers record a plug-in Gaussian mechanism registered
outside ``secure_fedora/contrib/``: by default its sensitivities are not recomputed (a
warning), ``--strict`` makes that an error, ``--import MODULE`` (a module the reviewer trusts,
never one inside the run directory) recomputes them and names the code that did."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from audits.cli import main
from audits.options import CLI_AUDIT_OPTIONS
from audits.verify import AuditError, verify_run
from privacy.identity import load_identity
from privacy.ledger import canonical_json, line_hash, signing_payload
from privacy.mechanisms import MECHANISMS
from secure_fedora.core import registry
from secure_fedora.runtimes.inprocess import Simulation
from tests.secure_fedora.secure import mechanism_plugin
from tests.secure_fedora.secure.mechanism_plugin import MECHANISM, LabelShareFedAvg
from tests.secure_fedora.secure.test_plug_in_mechanisms import _config, _register

MODULE = mechanism_plugin.__name__


@pytest.fixture(scope="module")
def plug_in_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A finished DP run (1 round, 3 clients) releasing ``label_share_test`` each round;
    its key store beside it; and the method's name (registered while the module's tests run)."""
    base = tmp_path_factory.mktemp("plug_in_run")
    for method in _register(LabelShareFedAvg):
        cfg = _config(method, rounds=1, **{MECHANISM: {"noise_multiplier": 5.0}})
        Simulation(cfg, base / "run", keystore=base / "keys").run()
        yield base / "run", method


@pytest.fixture
def run(plug_in_run: tuple[Path, str], tmp_path: Path) -> Path:
    """A copy of the plug-in run (its key store at ``tmp_path / "keys"``)."""
    src, _ = plug_in_run
    shutil.copytree(src, tmp_path / "run")
    shutil.copytree(src.parent / "keys", tmp_path / "keys")
    shutil.copyfile(src / "anchor.json", tmp_path / "anchor.json")  # the copy kept apart
    return tmp_path / "run"


@pytest.fixture
def fresh_auditor() -> Iterator[None]:
    """This process as an auditor's that never imported the plug-in module: its mechanism
    unregistered and the module unimported; both put back afterwards."""
    spec = MECHANISMS.get(MECHANISM)
    MECHANISMS.unregister(MECHANISM)
    package = sys.modules[MODULE.rpartition(".")[0]]
    sys.modules.pop(MODULE)
    try:
        yield
    finally:
        MECHANISMS.unregister(MECHANISM)
        MECHANISMS._specs[MECHANISM] = spec
        sys.modules[MODULE] = mechanism_plugin
        package.mechanism_plugin = mechanism_plugin  # type: ignore[attr-defined]


def _trusted(run: Path) -> Path:
    """The key store's allowlist: keys registered apart from the run directory."""
    return run.parent / "keys" / "allowlist.json"


def _kept(run: Path) -> Path:
    """The run's anchor.json as kept apart since the run (without it --strict fails)."""
    return run.parent / "anchor.json"


def test_an_unregistered_plug_in_passes_with_a_warning_and_fails_strict(run: Path,
                                                                        fresh_auditor: None):
    report = verify_run(run, allowlist=_trusted(run))
    unchecked = [f for f in report.findings if f.check == "sensitivity"]
    assert report.ok and len(unchecked) == 3
    assert all(f.severity == "warning" and f.unchecked for f in unchecked)
    assert all("the imports= argument of audits.verify.verify_run" in f.message
               for f in unchecked)
    strict = verify_run(run, allowlist=_trusted(run), anchor=_kept(run), strict=True)
    assert not strict.ok and strict.verdict == "failed" and strict.to_json()["strict"] is True
    assert sorted((f.check, f.client_id) for f in strict.errors) == \
        [("sensitivity", c) for c in ("client-000", "client-001", "client-002")]
    assert all("strict=True" in f.message for f in strict.errors)
    assert not any(c.ok for c in strict.clients)


def test_an_imported_plug_in_recomputes_and_is_named_with_its_file_and_digest(
        run: Path, fresh_auditor: None):
    report = verify_run(run, allowlist=_trusted(run), anchor=_kept(run), imports=[MODULE],
                        strict=True)
    assert report.ok, [str(f) for f in report.errors]
    assert not [f for f in report.findings if f.check in ("sensitivity", "import")]
    (imported,) = report.imported
    source = Path(mechanism_plugin.__file__)
    assert (imported.module, Path(imported.file), imported.mechanisms) == \
        (MODULE, source, [MECHANISM])
    assert imported.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert report.to_json()["imported"] == [imported.to_json()]


def test_an_imported_plug_in_catches_a_resigned_sensitivity(run: Path, fresh_auditor: None):
    cid = "client-001"
    path = next((run / "ledgers").glob(f"*/{cid}.jsonl"))
    key = load_identity(run.parent / "keys", cid).signing_key
    lines = path.read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        entry = json.loads(line)
        if entry["mechanism"] == MECHANISM:
            entry["params"]["sensitivity"] /= 10
        entry["prev_hash"] = line_hash(out[-1])
        entry.pop("signature")
        entry["signature"] = key.sign(signing_payload(entry)).hex()
        out.append(canonical_json(entry))
    path.write_text("\n".join(out) + "\n")
    # without the plug-in the edit goes unseen (a warning); with it, an error at that entry
    assert not [f for f in verify_run(run).errors if f.check == "sensitivity"]
    report = verify_run(run, imports=[MODULE])
    assert ("sensitivity", 1) in {(f.check, f.entry) for f in report.errors
                                  if f.client_id == cid}


def test_the_report_names_the_file_that_holds_each_sensitivity_formula(
        run: Path, tmp_path: Path, fresh_auditor: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    """A trusted module (or its package's ``__init__``) that registers the mechanism by
    importing another module: the report named only the imported file and its SHA-256 (for
    ``wrap_pkg.mech``, "mechanisms none" and a warning that nothing was recomputed with it),
    not the file whose formula recomputed the sensitivities."""
    trusted = tmp_path / "trusted"
    (trusted / "wrap_pkg").mkdir(parents=True)
    (trusted / "wrap_pkg" / "__init__.py").write_text(f"import {MODULE}  # noqa\n")
    (trusted / "wrap_pkg" / "mech.py").write_text("")
    monkeypatch.syspath_prepend(str(trusted))
    source = Path(mechanism_plugin.__file__)
    formula = {"module": MODULE, "file": str(source),
               "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    try:
        report = verify_run(run, allowlist=_trusted(run), anchor=_kept(run),
                            imports=["wrap_pkg.mech"], strict=True)
        (imported,) = report.imported
        assert report.ok and not [f for f in report.findings if f.check == "import"]
        assert imported.mechanisms == [MECHANISM]
        assert imported.sensitivity_code == {MECHANISM: formula}
        assert main(["audit", "verify", str(run), "--allowlist", str(_trusted(run)),
                     "--import", "wrap_pkg.mech"]) == 0
        out = capsys.readouterr().out
        assert (f"mechanisms {MECHANISM} (sensitivity in {MODULE}: {source}, sha256"
                f" {formula['sha256']})") in out
    finally:
        for name in ("wrap_pkg", "wrap_pkg.mech"):
            sys.modules.pop(name, None)


def test_a_module_inside_the_run_directory_is_refused_before_it_runs(
        run: Path, monkeypatch: pytest.MonkeyPatch):
    marker = run.parent / "ran"
    (run / "run_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (run / "run_package").mkdir()
    (run / "run_package" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (run / "run_package" / "mech.py").write_text("")
    monkeypatch.syspath_prepend(str(run))
    for name in ("run_plugin", "run_package.mech"):
        with pytest.raises(AuditError, match=f"{name.split('.')[0]} resolves inside the run"
                                             " directory"):
            verify_run(run, imports=[name])
        assert not marker.exists()
    # a trusted module that imports one of the run's in turn: the run is taken off sys.path
    # while it is imported, so that module never runs (it did, and the audit failed after)
    (run.parent / "outside").mkdir()
    (run.parent / "outside" / "pulls_run_plugin.py").write_text("import run_plugin  # noqa\n")
    monkeypatch.syspath_prepend(str(run.parent / "outside"))
    monkeypatch.chdir(run)
    monkeypatch.syspath_prepend("")  # as when the audit runs from inside the run
    with pytest.raises(AuditError, match="--import pulls_run_plugin: importing it raised"
                                         " ModuleNotFoundError: No module named 'run_plugin'"
                                         r" \(sys.path's '', '.*', inside the run directory"):
        verify_run(run, imports=["pulls_run_plugin"], options=CLI_AUDIT_OPTIONS)
    assert not marker.exists() and str(run) in sys.path and "" in sys.path
    sys.modules.pop("pulls_run_plugin", None)
    # a link from outside to a module inside counts as inside
    (run.parent / "linked").mkdir()
    (run.parent / "linked" / "linked_plugin.py").symlink_to(run / "run_plugin.py")
    monkeypatch.syspath_prepend(str(run.parent / "linked"))
    with pytest.raises(AuditError, match="linked_plugin resolves inside the run directory"):
        verify_run(run, imports=["linked_plugin"])
    assert not marker.exists()


def test_only_sys_path_entries_that_find_files_inside_the_run_are_taken_off(
        run: Path, monkeypatch: pytest.MonkeyPatch):
    """From inside the run, a ``sys.path`` entry that names no file or folder (a path hook's
    marker, as an editable install's ``__editable__...__path_hook__``) was taken off too and
    named as lying inside the run directory: it finds nothing there. ``""`` and a relative
    folder that exists there are still taken off."""
    from audits.verify import _run_off_sys_path

    (run / "sub").mkdir()
    marker = "__editable__.some_pkg-0.1.finder.__path_hook__"
    monkeypatch.chdir(run)
    for entry in (marker, "sub", ""):
        monkeypatch.syspath_prepend(entry)
    with _run_off_sys_path(run) as removed:
        assert set(removed) == {"", "sub"} and marker in sys.path
    assert {"", "sub", marker} <= set(sys.path)


def test_a_trusted_package_whose_init_imports_a_module_of_the_run_fails(
        run: Path, monkeypatch: pytest.MonkeyPatch):
    """``--import trusted_pkg.mech``: resolving ``trusted_pkg.mech`` runs ``trusted_pkg``'s
    ``__init__``, which put the run directory on sys.path and imported ``run_plugin_init``
    from it before the modules were listed: the audit passed."""
    marker = run.parent / "ran"
    (run / "run_plugin_init.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    package = run.parent / "outside_pkg" / "trusted_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"import sys\nsys.path.insert(0, {str(run)!r})\n"
                                         "import run_plugin_init  # noqa\n")
    (package / "mech.py").write_text("")
    monkeypatch.syspath_prepend(str(package.parent))
    try:
        with pytest.raises(AuditError, match="it imported run_plugin_init from inside the run"):
            verify_run(run, imports=["trusted_pkg.mech"])
        # a second audit in this process (a notebook's retry) found it imported and passed
        with pytest.raises(AuditError, match="it imported run_plugin_init from inside the run"):
            verify_run(run, imports=["trusted_pkg.mech"])
    finally:
        for name in ("run_plugin_init", "trusted_pkg", "trusted_pkg.mech"):
            sys.modules.pop(name, None)


def test_a_module_that_raises_or_registers_nothing_used(run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "raising_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "trusted"))
    with pytest.raises(AuditError, match="--import raising_plugin: importing it raised"
                                         " RuntimeError: boom"):
        verify_run(run, imports=["raising_plugin"], options=CLI_AUDIT_OPTIONS)
    with pytest.raises(AuditError, match="is not a dotted module name"):
        verify_run(run, imports=["../x"])
    with pytest.raises(AuditError, match="strict must be True or False, got 'no'"):
        verify_run(run, strict="no")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="takes a list of module names"):
        verify_run(run, imports=MODULE)  # type: ignore[arg-type]
    # a module that registers no mechanism these ledgers record: said, and no error
    report = verify_run(run, imports=["json"])
    (warning,) = [f for f in report.findings if f.check == "import"]
    assert report.ok and warning.severity == "warning" and not warning.unchecked
    assert "json" in warning.message and "registered none" in warning.message
    assert verify_run(run, imports=["json"], strict=True).findings.count(warning) == 1


def test_strict_fails_what_was_not_checked_and_leaves_the_rest(run: Path):
    for name in ("anchor.json", "results.json", "config.toml"):  # the ledgers alone
        (run / name).unlink()
    report = verify_run(run)
    unchecked = {f.check for f in report.warnings if f.unchecked}
    assert report.ok and {"anchor", "completeness", "allowlist", "results", "config",
                          "results_ledger"} <= unchecked
    strict = verify_run(run, strict=True)
    assert {f.check for f in strict.errors} == unchecked
    # a warning that is no unchecked claim stays one
    assert {f.check for f in strict.warnings} == {f.check for f in report.warnings
                                                   if not f.unchecked}


def test_a_contrib_mechanism_is_recomputed_from_the_ledgers_alone(
        run: Path, fresh_auditor: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A mechanism whose module is in the drop-in package is registered in every auditing
    process, also for a folder without config.toml, whose reading would look a name up."""
    for name in ("anchor.json", "results.json", "config.toml"):
        (run / name).unlink()
    package = f"contrib_{uuid.uuid4().hex[:8]}"
    (tmp_path / "src" / package).mkdir(parents=True)
    (tmp_path / "src" / package / "__init__.py").write_text("")
    (tmp_path / "src" / package / "label_share.py").write_text(f"import {MODULE}  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(registry, "CONTRIB_PACKAGE", package)
    monkeypatch.setattr(registry, "_contrib_loaded", False)
    try:
        report = verify_run(run)
    finally:
        for mod in [m for m in sys.modules if m.startswith(package)]:
            sys.modules.pop(mod)
    assert report.ok and not [f for f in report.findings if f.check == "sensitivity"]


def test_cli_import_strict_and_a_missing_module(run: Path, fresh_auditor: None,
                                                capsys: pytest.CaptureFixture[str]):
    base = ["audit", "verify", str(run), "--allowlist", str(_trusted(run)),
            "--anchor", str(_kept(run))]
    assert main(base) == 0
    assert "'label_share_test' is not a registered mechanism" in capsys.readouterr().out
    assert main([*base, "--strict"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "--import" in out and "--strict" in out
    out_json = run.parent / "v.json"
    assert main([*base, "--strict", "--import", MODULE, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"imported {MODULE} ({mechanism_plugin.__file__}, sha256 " in out
    doc = json.loads(out_json.read_text())
    assert doc["strict"] is True and [m["module"] for m in doc["imported"]] == [MODULE]
    assert main([*base, "--import", "no_such_plugin_module"]) == 2
    err = capsys.readouterr().err
    assert "--import no_such_plugin_module: no module 'no_such_plugin_module'" in err
    assert len(err.strip().splitlines()) == 1
    # audit report takes both, and its report.json and HTML name the module
    assert main(["audit", "report", str(run), "--import", MODULE, "--strict",
                 "--allowlist", str(_trusted(run)), "--anchor", str(_kept(run))]) == 0
    report = json.loads((run / "audit" / "report.json").read_text())
    assert report["verification"]["imported"][0]["module"] == MODULE
    assert MODULE in (run / "audit" / "report.html").read_text()


def test_replay_needs_no_import_and_says_what_its_claim_spans(run: Path, fresh_auditor: None,
                                                              capsys: pytest.CaptureFixture[str]):
    """`audit replay` of a run whose ledgers record a plug-in mechanism the process has not
    registered: it replays a DP-SGD step only and verifies the plug-in's entries with the
    ledger (chain, signatures), so it needs no --import; its claim, the ledger's last
    epsilon_after, spans the plug-in's releases too, which replay.json and the output said
    nowhere (a reader took the claim for DP-SGD's alone): both now name them."""
    from audits.replay import run_replay_audit

    [ledger] = [p for p in (run / "ledgers").iterdir() if p.is_dir()]
    last = json.loads((ledger / "client-000.jsonl").read_text().splitlines()[-1])
    result = run_replay_audit(run, trials=40, allowlist=_trusted(run))
    assert result.claim_epsilon == last["epsilon_after"]
    assert result.setup["claim_mechanisms"] == ["dpsgd", MECHANISM]
    # 0 when consistent, 3 when 40 trials cannot certify the claim (as canary and whitebox)
    assert main(["audit", "replay", str(run), "--trials", "40"]) \
        == {"consistent": 0, "inconclusive": 3}[result.verdict]
    out = capsys.readouterr().out
    assert f"the claim also spans the ledger's {MECHANISM} releases" in out
    doc = json.loads((run / "audit" / "replay.json").read_text())
    assert doc["setup"]["claim_mechanisms"] == ["dpsgd", MECHANISM]


def test_report_strict_states_it_and_exits_as_verify_does(run: Path, fresh_auditor: None,
                                                          capsys: pytest.CaptureFixture[str]):
    """`audit report --strict` end to end: it exits as `audit verify` with the same flags
    does, and report.json and the HTML state strict with the verdict. The verdict line
    (printed, report.json's verdict_text, the HTML's verdict box) said "FAILED" with no word
    of --strict, though without it the same run passes."""
    from audits.verdict import VERIFICATION_EXIT

    base = [str(run), "--allowlist", str(_trusted(run)), "--anchor", str(_kept(run))]
    for n, (flags, code) in enumerate((([], 0), (["--strict"], 1),
                                       (["--strict", "--import", MODULE], 0))):
        strict = "--strict" in flags
        assert main(["audit", "verify", *base, *flags]) == code
        printed = capsys.readouterr().out.splitlines()[-1]
        out = run.parent / f"report-{n}"
        assert main(["audit", "report", *base, *flags, "--out", str(out)]) == code
        verification = json.loads((out / "report.json").read_text())["verification"]
        assert verification["strict"] is strict
        assert VERIFICATION_EXIT[verification["verdict"]] == code
        assert verification["verdict_text"] == printed
        assert printed.startswith(f"verification {'FAILED' if code else 'PASSED'}"
                                  + (" (strict): " if strict else ": "))
        page = (out / "report.html").read_text()
        assert (f"Verification{' (strict)' if strict else ''}: "
                f"{'FAILED' if code else 'PASSED'} &mdash;") in page
        assert ("Strict: every warning saying that a check was not made" in page) is strict


def _same_verification(cli: dict, py: dict) -> None:
    """The verdict and every finding (its text included) of two report.json verifications."""
    for key in ("verdict", "verdict_text", "strict", "ok", "imported", "findings", "checks"):
        assert cli[key] == py[key], key


def test_the_python_report_takes_strict_and_imports_as_the_cli(
        run: Path, fresh_auditor: None, capsys: pytest.CaptureFixture[str]):
    """`build_report`/`write_report` took neither `strict` nor `imports` (a caller had to run
    `verify_run` first and pass `verification=`): they now take both, and the CLI's `audit
    report` calls `write_report` with its flags, so the Python call and the CLI give the same
    verdict and findings for a strict run and for an import run (with the API's wording of
    the options by default)."""
    from audits.report import build_report, write_report
    from audits.verdict import VERIFICATION_EXIT

    trusted = _trusted(run)
    cases = ((["--strict"], {"strict": True}),  # first: before the module is imported
             (["--strict", "--import", MODULE], {"strict": True, "imports": [MODULE]}),
             (["--import", MODULE], {"imports": (MODULE,)}))
    for n, (flags, kwargs) in enumerate(cases):
        code = main(["audit", "report", str(run), "--allowlist", str(trusted), "--anchor",
                     str(_kept(run)), *flags, "--out", str(run.parent / f"cli-{n}")])
        cli = json.loads((run.parent / f"cli-{n}" / "report.json").read_text())["verification"]
        paths = write_report(run, run.parent / f"py-{n}", allowlist=trusted,
                             anchor=_kept(run), options=CLI_AUDIT_OPTIONS, **kwargs)
        py = json.loads(paths.json.read_text())["verification"]
        _same_verification(cli, py)
        assert VERIFICATION_EXIT[paths.verification.verdict] == code == (1 if n == 0 else 0)
        assert paths.verification.to_json()["findings"] == py["findings"]
        _same_verification(cli, build_report(run, allowlist=trusted, anchor=_kept(run),
                                             options=CLI_AUDIT_OPTIONS, **kwargs)["verification"])
        api = build_report(run, allowlist=trusted, anchor=_kept(run),
                           **kwargs)["verification"]  # API wording
        assert (api["verdict"], api["strict"], api["imported"]) == \
            (cli["verdict"], cli["strict"], cli["imported"])
        assert [(f["severity"], f["check"], f["client_id"]) for f in api["findings"]] == \
            [(f["severity"], f["check"], f["client_id"]) for f in cli["findings"]]
    assert cli["imported"][0]["module"] == MODULE and not cli["findings"]
    capsys.readouterr()


def test_the_python_report_refuses_modules_as_the_cli(run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]):
    """An unknown module, one inside the run directory, a bad `strict`, or `strict`/`imports`
    next to a `verification=` they could not change: refused before anything is written,
    with the CLI's words when given its options."""
    from audits.report import ReportError, build_report, write_report

    marker = run.parent / "ran"
    (run / "run_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(run))
    for name, why in (("no_such_plugin_module", "no module 'no_such_plugin_module'"),
                      ("run_plugin", "run_plugin resolves inside the run directory")):
        out = tmp_path / f"out-{name}"
        assert main(["audit", "report", str(run), "--import", name, "--out", str(out)]) == 2
        cli_error = capsys.readouterr().err.strip()
        assert f"--import {name}: {why}" in cli_error and not out.exists()
        with pytest.raises(AuditError) as caught:
            write_report(run, out, imports=[name], options=CLI_AUDIT_OPTIONS)
        assert str(caught.value) in cli_error and not out.exists()
        with pytest.raises(AuditError, match=f"the imports= argument of .*: {why}"):
            build_report(run, imports=[name])
    assert not marker.exists()
    with pytest.raises(AuditError, match="strict must be True or False, got 'no'"):
        write_report(run, tmp_path / "o", strict="no")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="takes a list of module names"):
        build_report(run, imports=MODULE)  # type: ignore[arg-type]
    report = verify_run(run)
    for kwargs in ({"strict": True}, {"imports": [MODULE]}, {"allowlist": _trusted(run)}):
        with pytest.raises(ReportError, match=f"verification= was given together with"
                                              f" {next(iter(kwargs))}="):
            write_report(run, tmp_path / "o", verification=report, **kwargs)
    assert not (tmp_path / "o").exists()
    assert build_report(run, verification=report, imports=[], strict=False)["verification"] \
        == build_report(run, verification=report)["verification"]


def _resigned(run: Path, cid: str, edit: Callable[[list[dict]], list[dict]]) -> None:
    """Client ``cid``'s ledger with ``edit`` applied to its entries, then re-indexed,
    re-chained and re-signed with the client's own key (its close entry's final_index too):
    only the checks of what the entries say can tell."""
    path = next((run / "ledgers").glob(f"*/{cid}.jsonl"))
    key = load_identity(run.parent / "keys", cid).signing_key
    entries = edit([json.loads(line) for line in path.read_text().splitlines()])
    out: list[str] = []
    for index, entry in enumerate(entries):
        entry["index"] = index
        if entry["mechanism"] == "close":
            entry["params"]["final_index"] = index
        entry["prev_hash"] = line_hash(out[-1]) if out else "0" * 64
        entry.pop("signature")
        entry["signature"] = key.sign(signing_payload(entry)).hex()
        out.append(canonical_json(entry))
    path.write_text("\n".join(out) + "\n")


def _nested(run: Path, cid: str) -> set[int | None]:
    return {f.entry for f in verify_run(run, imports=[MODULE]).errors
            if f.check == "nested_release" and f.client_id == cid}


@pytest.mark.parametrize("tamper", ["other_round", "dpsgd_dropped", "before_dpsgd"])
def test_a_plug_in_release_not_linked_to_its_model_release_fails_verify(run: Path,
                                                                         tamper: str):
    """A plug-in mechanism's entry is accounted within the round's model release (written with
    its DP-SGD entry, the same round and release_kind): a ledger whose plug-in entry names
    another round, lost its DP-SGD entry, or precedes it, verified without a word about it."""
    cid = "client-001"
    assert not _nested(run, cid)

    def edit(entries: list[dict]) -> list[dict]:
        dpsgd, plug_in = entries[0], entries[1]
        assert (dpsgd["mechanism"], plug_in["mechanism"]) == ("dpsgd", MECHANISM)
        if tamper == "other_round":
            plug_in["round"] += 1
            return entries
        if tamper == "dpsgd_dropped":
            return entries[1:]
        return [plug_in, dpsgd, *entries[2:]]

    _resigned(run, cid, edit)
    assert _nested(run, cid) == {1 if tamper == "other_round" else 0}
