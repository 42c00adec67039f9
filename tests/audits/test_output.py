"""Report files named by the user (`audit ... --json PATH`, `audit report --out DIR`): written
atomically, never through a link, never over a directory, device or an unrelated file unless
``--force``. Every path is under pytest's tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from audits.cli import main
from audits.output import is_previous_report, seal_report
from audits.report import ReportError, write_report


def _verify(run, path, *extra):
    return main(["audit", "verify", str(run), "--json", str(path), *extra])


def test_verify_json_refuses_to_overwrite_an_unrelated_file(pristine_run, tmp_path, capsys):
    """`audit verify RUN --json FILE` overwrote any FILE (a probe once overwrote a system
    file); an existing file that is not a previous verify report is now kept, before the
    verification runs."""
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert _verify(pristine_run, victim) == 2
    captured = capsys.readouterr()
    assert "not a previous `audit verify` JSON report" in captured.err and "--force" in captured.err
    assert captured.out == ""  # refused before verifying
    assert victim.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    assert _verify(pristine_run, victim, "--force") == 0
    assert json.loads(victim.read_text())["ok"] is True


def test_verify_json_replaces_its_own_previous_report(pristine_run, tmp_path, capsys):
    path = tmp_path / "v.json"
    assert _verify(pristine_run, path) == 0
    first = path.read_text()
    assert _verify(pristine_run, path) == 0  # no --force needed for its own report
    assert json.loads(path.read_text()) == json.loads(first)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # a normal file, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["v.json"]  # no temporary file left


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_writing_a_report_never_changes_the_process_umask(pristine_run, tmp_path, monkeypatch):
    """Reading the umask by setting it applied umask 0 for a moment to every file other
    threads of the process created; it is read from /proc/self/status instead."""
    mask = os.umask(0o027)
    try:
        def refuse(_: int) -> int:
            raise AssertionError("os.umask called while writing a report")

        monkeypatch.setattr(os, "umask", refuse)
        path = tmp_path / "v.json"
        assert _verify(pristine_run, path) == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        monkeypatch.undo()
        os.umask(mask)


@pytest.mark.parametrize("command", ["canary", "whitebox", "leakage", "replay"])
def test_another_commands_report_is_not_its_own(pristine_run, tmp_path, capsys, command):
    """A verify report is not a canary/white-box/leakage/replay report: refused without
    --force."""
    path = tmp_path / "v.json"
    assert _verify(pristine_run, path) == 0
    before = path.read_bytes()
    target = str(pristine_run) if command in ("whitebox", "replay") else "missing.toml"
    assert main(["audit", command, target, "--json", str(path)]) == 2
    assert f"not a previous `audit {command}` JSON report" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_link_is_refused_even_with_force(pristine_run, tmp_path, capsys, force):
    target = tmp_path / "target.txt"
    target.write_text("keep me\n")
    link = tmp_path / "v.json"
    link.symlink_to(target)
    assert _verify(pristine_run, link, *force) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "keep me\n" and link.is_symlink()
    dangling = tmp_path / "d.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    assert _verify(pristine_run, dangling, *force) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "nowhere.json").exists()


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_directory_or_fifo_is_refused_even_with_force(pristine_run, tmp_path, capsys, force):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert _verify(pristine_run, fifo, *force) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert _verify(pristine_run, tmp_path, *force) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_file_put_in_place_during_the_audit_is_kept(pristine_run, tmp_path, monkeypatch, capsys):
    """The path is checked again just before writing: a file created while the audit ran."""
    import audits.verify as verify  # audits.cli's handlers import verify_run when they run

    path = tmp_path / "v.json"
    real = verify.verify_run

    def verify_then_create(*args, **kwargs):
        report = real(*args, **kwargs)
        path.write_text("created meanwhile\n")
        return report

    monkeypatch.setattr(verify, "verify_run", verify_then_create)
    assert _verify(pristine_run, path) == 2
    assert "not a previous `audit verify` JSON report" in capsys.readouterr().err
    assert path.read_text() == "created meanwhile\n"


def test_recognising_a_previous_report(tmp_path):
    path = tmp_path / "r.json"
    for text in ("", "not json", "[]", '{"ok": true}', "\xff", "[" * 100_000):
        path.write_text(text)
        assert not is_previous_report(path, "verify")
    doc = {"audit": "canary", "claim_epsilon": 1.0, "certifiable_max": 2.0,
           "lower_bound": 0.0, "verdict": "consistent"}
    path.write_text(json.dumps(doc))  # a report's keys, but not written by the tool
    assert not is_previous_report(path, "canary")
    path.write_text(seal_report(json.dumps(doc), "canary"))
    assert is_previous_report(path, "canary") and not is_previous_report(path, "whitebox")
    assert not is_previous_report(tmp_path / "missing.json", "canary")


def test_a_hand_made_file_with_a_reports_keys_is_kept(pristine_run, tmp_path, capsys):
    """A JSON file that merely had a report's top-level keys was replaced without --force; now
    only a file the tool sealed and nobody edited is its own previous report."""
    path = tmp_path / "v.json"
    assert _verify(pristine_run, path) == 0
    doc = json.loads(path.read_text())
    assert doc["written_by"]["command"] == "verify"
    del doc["written_by"]
    hand_made = json.dumps({**doc, "notes": "my annotations"})  # the keys, no seal
    path.write_text(hand_made)
    assert _verify(pristine_run, path) == 2
    assert "not a previous `audit verify` JSON report" in capsys.readouterr().err
    assert path.read_text() == hand_made
    assert _verify(pristine_run, path, "--force") == 0
    sealed = json.loads(path.read_text())
    sealed["ok"] = False  # an edited report: the seal no longer matches
    path.write_text(json.dumps(sealed))
    assert _verify(pristine_run, path) == 2
    assert json.loads(path.read_text())["ok"] is False
    html = tmp_path / "rep" / "report.html"
    html.parent.mkdir()
    forged = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">\n<title>Privacy'
              " compliance report: mine</title></head><body>my notes</body></html>")
    html.write_text(forged)  # the report's HTML header, written by hand
    capsys.readouterr()
    assert main(["audit", "report", str(pristine_run), "--out", str(html.parent)]) == 2
    assert "not a previous HTML report" in capsys.readouterr().err
    assert html.read_text() == forged


def test_an_overwritten_report_keeps_the_files_mode(pristine_run, tmp_path, capsys):
    """An overwritten report took the umask's mode instead of the old file's."""
    path = tmp_path / "v.json"
    assert _verify(pristine_run, path) == 0
    os.chmod(path, 0o600)
    assert _verify(pristine_run, path) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o640)
    assert _verify(pristine_run, path, "--force") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    out = tmp_path / "rep"
    assert main(["audit", "report", str(pristine_run), "--out", str(out)]) == 0
    os.chmod(out / "report.json", 0o600)
    os.chmod(out / "report.html", 0o604)
    assert main(["audit", "report", str(pristine_run), "--out", str(out)]) == 0
    assert stat.S_IMODE((out / "report.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "report.html").stat().st_mode) == 0o604
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]


def test_report_out_keeps_unrelated_files(pristine_run, tmp_path, capsys):
    """`audit report RUN --out DIR` replaced DIR/report.html and DIR/report.json whatever they
    held; now only a previous report's (or with --force), and never a link."""
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.html").write_text("<html>my own page</html>")
    assert main(["audit", "report", str(pristine_run), "--out", str(out)]) == 2
    assert "not a previous HTML report" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "<html>my own page</html>"
    assert not (out / "report.json").exists()
    assert main(["audit", "report", str(pristine_run), "--out", str(out), "--force"]) == 0
    assert main(["audit", "report", str(pristine_run), "--out", str(out)]) == 0  # its own
    capsys.readouterr()
    (out / "report.json").unlink()
    (out / "report.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ReportError, match="is a symbolic link"):
        write_report(pristine_run, out, force=True)
    assert not (tmp_path / "elsewhere.json").exists()
    with pytest.raises(ReportError, match="force must be True or False"):
        write_report(pristine_run, out, force="no")


@pytest.mark.parametrize("name", ["results.json", "config.toml", "anchor.json", "rounds.csv",
                                  "ledgers/local/client-000.jsonl", "ledgers/local/new.json"])
def test_a_runs_own_files_are_refused_even_with_force(run_copy, capsys, name):
    """`audit verify RUN --json RUN/results.json --force` replaced the run's results.json (and
    so broke its anchor, losing the file): a run directory's record is never a report's
    target, force or not; RUN/audit/ is."""
    target = run_copy / name
    before = target.read_bytes() if target.exists() else None
    assert _verify(run_copy, target, "--force") == 2
    err = capsys.readouterr().err
    assert f"is part of run directory {run_copy}'s record" in err and "even with --force" in err
    assert (target.read_bytes() if target.exists() else None) == before
    (run_copy / "audit").mkdir(exist_ok=True)
    assert _verify(run_copy, run_copy / "audit" / "verify.json") == 0


def test_a_file_named_like_a_runs_outside_a_run_directory_is_written(pristine_run, tmp_path):
    assert _verify(pristine_run, tmp_path / "results.json") == 0
    assert json.loads((tmp_path / "results.json").read_text())["ok"] is True


def test_report_out_naming_a_file_is_refused_before_verifying(pristine_run, tmp_path, capsys):
    """`audit report RUN --out FILE` verified the run, then failed with "cannot create report
    directory FILE: [Errno 17] File exists"; it is now refused first, naming the flag."""
    victim = tmp_path / "notes.txt"
    victim.write_text("keep\n")
    assert main(["audit", "report", str(pristine_run), "--out", str(victim)]) == 2
    captured = capsys.readouterr()
    assert "--out" in captured.err and "is not a directory" in captured.err
    assert captured.out == "" and victim.read_text() == "keep\n"


def test_seal_document_is_seal_report_of_its_json():
    """A report given as its parsed document is sealed with one serialisation, to the same
    text as the report's JSON text; a non-object or an already sealed one is refused."""
    from audits.output import SEAL_KEY, seal_document

    doc = {"report_version": 1, "b": [1, 2.5, -0.0, 1e300, None, "\u00e9\ud800"],
           "a": {"z": True, "y": {}}, "empty": []}
    assert seal_document(doc, "report") == seal_report(json.dumps(doc), "report")
    assert seal_document({}, "verify") == seal_report("{}", "verify")
    for bad in ([1], {SEAL_KEY: {}}):
        with pytest.raises(ValueError, match="JSON object without"):
            seal_document(bad, "report")


def test_report_out_inside_the_audited_run_is_refused_but_its_audit_folder(pristine_run,
                                                                        tmp_path, capsys):
    """`audit report RUN --out RUN` (or a folder of it, RUN/ledgers: a new method folder to
    the verifier) wrote report.json and report.html among the run's record; such an --out is
    now refused before anything runs, naming the flag and RUN/audit, and RUN/audit works."""
    run = tmp_path / "run"
    shutil.copytree(pristine_run, run)
    (run / "via").symlink_to("ledgers")
    before = sorted(p for p in run.rglob("*"))
    for out in (run, run / ".", run / "ledgers", run / "ledgers" / "fedora", run / "keys",
                run / "mine", run / "via"):
        assert main(["audit", "report", str(run), "--out", str(out)]) == 2
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())
        assert f"--out {out} is " in err and f"the audited run directory {run}" in err, err
        assert f"leave --out out for {run / 'audit'}" in err and captured.out == ""
    assert sorted(p for p in run.rglob("*")) == before
    with pytest.raises(ReportError, match=r"^the out_dir= argument .* is the audited run "
                                          r"directory .* itself"):
        write_report(run, run)
    assert main(["audit", "report", str(run), "--out", str(run / "audit")]) == 0
    assert main(["audit", "report", str(run)]) == 0  # the default, RUN/audit
    assert (run / "audit" / "report.json").is_file()
