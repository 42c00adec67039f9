"""verify_run on real ledgers: clean runs pass; every kind of tampering is caught and located."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audits.verify import (
    AuditError,
    Finding,
    check_anchor,
    check_ledger_lines,
    independent_epsilons,
    verified_ledger_entries,
    verify_run,
)
from privacy.accounting import Accountant
from privacy.identity import load_allowlist, load_identity
from privacy.ledger import LedgerWriter, canonical_json, line_hash, signing_payload
from secure_fedora.core.config import ConfigError, load_config

from .conftest import bad_allowlists, build_run_dir, keystore_of, reanchor

CID = "client-001"
METHOD = "fedora"


def ledger_path(run: Path, cid: str = CID, method: str = METHOD) -> Path:
    return run / "ledgers" / method / f"{cid}.jsonl"


def lines_of(run: Path, cid: str = CID, method: str = METHOD) -> list[str]:
    return ledger_path(run, cid, method).read_text().splitlines()


def write_lines(run: Path, lines: list[str], cid: str = CID, method: str = METHOD) -> None:
    ledger_path(run, cid, method).write_text("".join(line + "\n" for line in lines))


def errors_at(report, cid: str = CID, method: str = METHOD) -> dict[int | None, set[str]]:
    out: dict[int | None, set[str]] = {}
    for f in report.errors:
        if f.client_id == cid and f.method == method:
            out.setdefault(f.entry, set()).add(f.check)
    return out


def first_error_entry(report, cid: str = CID) -> int | None:
    entries = [f.entry for f in report.errors if f.client_id == cid and f.entry is not None]
    return min(entries) if entries else None


def results_row(run: Path, cid: str = CID, method: str = METHOD) -> tuple[dict, dict]:
    doc = json.loads((run / "results.json").read_text())
    row = next(r for r in doc["privacy"][method]["clients"] if r["client"] == cid)
    return doc, row


def drop_anchor(run: Path, cid: str = CID, method: str = METHOD, *, resign: bool = True) -> None:
    """Make results.json agree with a rewritten ledger (as a forger controlling it would) and,
    with ``resign``, re-sign anchor.json (a forger who also holds the operator key)."""
    doc, row = results_row(run, cid, method)
    lines = ledger_path(run, cid, method).read_text().splitlines()
    row["ledger_entries"] = len(lines)
    row["ledger_head"] = line_hash(lines[-1])
    row["epsilon_spent"] = round(max(json.loads(line)["epsilon_after"] for line in lines), 6)
    (run / "results.json").write_text(json.dumps(doc))
    if resign:
        reanchor(run)


def test_clean_run_verifies(pristine_run):
    report = verify_run(pristine_run)
    assert report.ok, [str(f) for f in report.errors]
    ids = ["client-000", "client-001", "client-002"]
    assert [(c.method, c.client_id) for c in report.clients] == \
        [("fedora", i) for i in ids] + [("local", i) for i in ids]
    for c in report.clients:
        assert c.ok
        assert c.entries == len(lines_of(pristine_run, c.client_id)) or c.method == "local"
        assert c.independent_final_epsilon == pytest.approx(c.final_epsilon, rel=0.02)
        # every accounted entry was recomputed independently
        assert all(e.independent_epsilon is not None for e in c.series
                   if e.mechanism not in ("refusal", "close"))
        # a finished run: every ledger ends with its close entry (final index, epsilon spent)
        assert c.series[-1].mechanism == "close"
        assert c.series[-1].params == {"final_index": c.entries - 1,
                                       "epsilon_spent": c.final_epsilon}
        expected = {"dpsgd", "gaussian_summary", "gaussian_lambda"} if c.method == "fedora" \
            else {"dpsgd"}
        assert set(c.mechanisms) == expected
    refused = {(c.method, c.client_id): c.refused for c in report.clients}
    assert refused[("fedora", "client-002")] and not refused[("fedora", "client-001")]
    # warnings: keys from the run directory itself, its own anchor.json (no copy kept apart),
    # two methods spend the same clients' data (the private keys are in a key store outside
    # the run directory)
    assert sorted(w.check for w in report.warnings) == ["allowlist", "anchor_copy", "coverage"]
    json.dumps(report.to_json())


def test_independent_allowlist_removes_the_key_warning(pristine_run, tmp_path):
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(pristine_run / "keys" / "allowlist.json", trusted)
    report = verify_run(pristine_run, allowlist=trusted)
    assert report.ok and sorted(w.check for w in report.warnings) == ["anchor_copy", "coverage"]


def test_a_deleted_keys_directory_is_a_warning_with_an_allowlist_and_strict_fails_it(
        run_copy, tmp_path):
    """With --allowlist given and the run's keys/ deleted entirely, nothing said so, though a
    missing public key file (or keys/allowlist.json) is a warning. Now one unchecked warning
    names keys/ and what it publishes; --strict makes it an error. A Flower result directory,
    which holds no keys/, gets none."""
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    shutil.rmtree(run_copy / "keys")
    report = verify_run(run_copy, allowlist=trusted)
    missing = [w for w in report.warnings if w.check == "key_file"]
    assert report.ok and len(missing) == 1 and missing[0].unchecked
    assert missing[0].message.startswith(f"{run_copy / 'keys'} is missing: the run directory"
                                         " publishes none of its public keys (keys/allowlist.json,")
    assert str(trusted) in missing[0].message
    strict = verify_run(run_copy, allowlist=trusted, strict=True)
    assert not strict.ok and "key_file" in {f.check for f in strict.errors}
    doc = json.loads((run_copy / "results.json").read_text())
    (run_copy / "results.json").write_text(json.dumps({**doc, "runtime": "flower"}))
    flower = verify_run(run_copy, allowlist=trusted)
    assert "key_file" not in {f.check for f in flower.findings}


def test_no_private_key_warning_when_the_run_holds_public_keys_only(run_copy):
    for key in (run_copy / "keys").glob("*.key"):
        key.unlink()
    report = verify_run(run_copy)
    assert report.ok and "private_keys" not in {w.check for w in report.warnings}


def _flip(data: bytes, pos: int, mask: int) -> tuple[list[str], bool]:
    flipped = bytearray(data)
    flipped[pos] ^= mask
    torn = not flipped.endswith(b"\n")
    raw = bytes(flipped).split(b"\n")
    if not torn:
        raw = raw[:-1]
    return [c.decode("utf-8", errors="replace") for c in raw], torn


def test_every_byte_flip_of_the_last_entry_is_caught_at_that_entry(pristine_run):
    """Exhaustive over the last entry (no successor whose chain link could reveal it): XOR
    every byte with 0x01, and flip the case of every hex letter of its signature and
    prev_hash (uppercase hex decodes to the same bytes); plus a sample of earlier bytes."""
    cid = "client-002"
    key = load_allowlist(pristine_run / "keys" / "allowlist.json")[cid].verify_key
    data = ledger_path(pristine_run, cid).read_bytes()
    lines = data.decode().splitlines()
    assert check_ledger_lines(lines, key, cid)[1] == []
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A][:-1]
    last_start = starts[-1]
    rng = random.Random(0)
    flips = [(pos, 0x01) for pos in range(last_start, len(data))]
    flips += [(pos, 0x01) for pos in rng.sample(range(last_start), 40)]
    last = json.loads(lines[-1])
    for field_name in ("signature", "prev_hash"):
        offset = last_start + data[last_start:].index(last[field_name].encode())
        flips += [(offset + i, 0x20) for i, ch in enumerate(last[field_name]) if ch.isalpha()]
    assert len(flips) > 500
    for pos, mask in flips:
        entry = max(k for k, s in enumerate(starts) if s <= pos)
        new_lines, torn = _flip(data, pos, mask)
        _, findings = check_ledger_lines(new_lines, key, cid, torn)
        assert findings, f"flip of byte {pos} (mask {mask:#x}) went undetected"
        assert min(f.entry for f in findings) == entry, (pos, mask, findings[:2])


@pytest.mark.parametrize("entry", [0, 3, -1])
def test_byte_flip_fails_run_verification_and_names_entry(run_copy, entry):
    lines = lines_of(run_copy)
    k = entry % len(lines)
    line = lines[k]
    rng = random.Random(k)
    pos = rng.randrange(len(line))
    flipped = line[:pos] + chr(ord(line[pos]) ^ 0x01) + line[pos + 1:]
    lines[k] = flipped
    write_lines(run_copy, lines)
    report = verify_run(run_copy)
    assert not report.ok
    assert first_error_entry(report) == k
    assert any(f"entry {k}" in str(f) and CID in str(f) for f in report.errors)


def test_edited_epsilon_breaks_signature_and_chain(run_copy):
    lines = lines_of(run_copy)
    entry = json.loads(lines[2])
    entry["epsilon_after"] = entry["epsilon_after"] / 2
    lines[2] = canonical_json(entry)
    write_lines(run_copy, lines)
    report = verify_run(run_copy)
    errs = errors_at(report)
    assert "signature" in errs[2]
    assert "chain" in errs[3]


@pytest.mark.parametrize("removed", [0, 2, 4])
def test_deleted_entry_is_named(run_copy, removed):
    lines = lines_of(run_copy)
    del lines[removed]
    write_lines(run_copy, lines)
    report = verify_run(run_copy)
    assert not report.ok
    errs = errors_at(report)
    assert first_error_entry(report) == removed
    assert {"index", "chain"} <= errs[removed]


def test_deleting_the_last_entry_is_caught_by_close_and_anchors(run_copy):
    lines = lines_of(run_copy)
    write_lines(run_copy, lines[:-1])
    report = verify_run(run_copy)
    assert {(f.check, f.entry) for f in report.errors} == {
        ("results_ledger", len(lines) - 2), ("not_closed", len(lines) - 2),
        ("anchor_behind", len(lines) - 2)}
    assert all(f.client_id == CID and f.method == METHOD for f in report.errors)
    # A forger who also rewrites results.json is still caught: the close entry is missing
    # and anchor.json records the ledger's head and the digest of results.json.
    drop_anchor(run_copy, resign=False)
    checks = {f.check for f in verify_run(run_copy).errors}
    assert checks == {"not_closed", "anchor_behind", "anchor_file"}


def test_a_run_checked_against_its_own_anchor_says_who_could_have_re_signed_it(run_copy,
                                                                              tmp_path):
    """The operator holds the key store (its own key and every client's ledger key): it cuts
    the last round from a ledger, re-signs it with a close entry, results.json and the anchor.
    Against the run's own anchor that passed with no word that nothing ruled it out; now a
    warning says so (an error under strict), and the anchor copy kept apart catches it."""
    trusted, kept = tmp_path / "trusted.json", tmp_path / "anchor-kept.json"
    shutil.copyfile(keystore_of(run_copy) / "allowlist.json", trusted)
    shutil.copyfile(run_copy / "anchor.json", kept)
    honest = verify_run(run_copy, allowlist=trusted, anchor=kept, strict=True)
    assert honest.ok and "anchor_copy" not in {f.check for f in honest.findings}
    lines = lines_of(run_copy)
    entries = [json.loads(line) for line in lines]
    cut = next(i for i, e in enumerate(entries) if e["round"] == entries[-1]["round"])
    spent = entries[cut - 1]["epsilon_after"]

    def close_here(entry):
        entry.update(index=cut, epsilon_after=spent,
                     params={"final_index": cut, "epsilon_spent": spent})

    key = load_identity(keystore_of(run_copy), CID).signing_key
    write_lines(run_copy, _resign(lines[:cut] + lines[-1:], cut, key, close_here))
    drop_anchor(run_copy)  # results.json and the anchor re-signed by the operator key
    report = verify_run(run_copy, allowlist=trusted)
    assert report.ok and report.clients[1].final_epsilon == spent < entries[-1]["epsilon_after"]
    (said,) = [f for f in report.findings if f.check == "anchor_copy"]
    assert said.severity == "warning" and said.unchecked and said.client_id is None
    assert "not a copy kept apart" in said.message and "re-sign" in said.message
    assert "every client's ledger key" in said.message and "anchor=" in said.message
    strict = verify_run(run_copy, allowlist=trusted, strict=True)
    assert [f.check for f in strict.errors] == ["anchor_copy"]
    against_copy = verify_run(run_copy, allowlist=trusted, anchor=kept)
    assert {"anchor", "anchor_behind", "anchor_file"} <= {f.check for f in against_copy.errors}
    assert "anchor_copy" not in {f.check for f in against_copy.findings}


def test_per_ledger_findings_name_the_ledger_file(run_copy):
    """A per-ledger error said "client client-001, method fedora" but not which file: the
    finding, its line, its JSON record and the report's table now name it (run-relative)."""
    from audits.report import build_report, render_html

    write_lines(run_copy, lines_of(run_copy)[:-1])
    report = verify_run(run_copy)
    rel = f"ledgers/{METHOD}/{CID}.jsonl"
    checks = {"results_ledger", "not_closed", "anchor_behind"}
    assert {f.check for f in report.errors} == checks
    assert all(f.ledger == rel for f in report.errors)
    assert all(f"client {CID}, method {METHOD}, ledger {rel}, entry" in str(f)
               for f in report.errors)
    assert {f["ledger"] for f in report.to_json()["findings"] if f["check"] in checks} == {rel}
    assert f"<td class=\"l\">{rel}</td>" in render_html(build_report(run_copy, verification=report),
                                                         {})
    # a finding of the run (no ledger) names none
    assert all(f.ledger is None for f in report.findings if f.client_id is None)


def test_ledger_head_anchor_catches_a_replaced_last_line(run_copy):
    lines = lines_of(run_copy)
    doc, row = results_row(run_copy)
    row["ledger_head"] = line_hash(lines[-1])
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    assert verify_run(run_copy).ok
    row["ledger_head"] = line_hash(lines[-2])
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    report = verify_run(run_copy)
    # results.json, not anchor.json, records the head compared here: the tag says so
    assert [(f.check, f.entry) for f in report.errors] == [("results_ledger", len(lines) - 1)]
    assert "results.json recorded the head" in report.errors[0].message


def test_reordered_entries_are_named(run_copy):
    lines = lines_of(run_copy)
    lines[3], lines[5] = lines[5], lines[3]
    write_lines(run_copy, lines)
    report = verify_run(run_copy)
    errs = errors_at(report)
    assert first_error_entry(report) == 3
    assert {"index", "chain"} <= errs[3]
    assert "index" in errs[5]


def _resign(lines: list[str], start: int, key: Ed25519PrivateKey, edit=None) -> list[str]:
    """Rewrite lines[start:] signed by ``key``, re-chained, with ``edit`` applied to ``start``."""
    out = list(lines[:start])
    prev = line_hash(out[-1]) if out else "0" * 64
    for k, line in enumerate(lines[start:]):
        entry = json.loads(line)
        if k == 0 and edit is not None:
            edit(entry)
        entry["prev_hash"] = prev
        entry.pop("signature")
        entry["signature"] = key.sign(signing_payload(entry)).hex()
        new = canonical_json(entry)
        out.append(new)
        prev = line_hash(new)
    return out


def test_forged_signature_is_named(run_copy):
    lines = lines_of(run_copy)
    forger = Ed25519PrivateKey.generate()

    def cheaper(entry):
        entry["epsilon_after"] = 0.01

    write_lines(run_copy, _resign(lines, 2, forger, cheaper))
    report = verify_run(run_copy)
    errs = errors_at(report)
    assert first_error_entry(report) == 2
    assert all("signature" in errs[k] for k in range(2, len(lines)))
    assert "chain" not in errs.get(2, set())  # the forger re-chained correctly


def test_reforged_ledger_and_swapped_allowlist_caught_by_trusted_keys(run_copy, tmp_path):
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    # The attacker rewrites client-001's ledgers and replaces its key in the run's
    # allowlist (and removes the .pub files that would contradict it).
    forger = Ed25519PrivateKey.generate()
    for method in ("fedora", "local"):
        write_lines(run_copy, _resign(lines_of(run_copy, CID, method), 0, forger), CID, method)
    doc = json.loads((run_copy / "keys" / "allowlist.json").read_text())
    from cryptography.hazmat.primitives import serialization

    doc["parties"][CID]["ed25519"] = forger.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    (run_copy / "keys" / "allowlist.json").write_text(json.dumps(doc))
    drop_anchor(run_copy, CID, "local")
    drop_anchor(run_copy)
    pub = run_copy / "keys" / f"{CID}.ed25519.pub"
    assert not verify_run(run_copy).ok  # the .pub file still contradicts the allowlist
    assert any(f.check == "key" for f in verify_run(run_copy).errors)
    pub.unlink()
    assert verify_run(run_copy).ok  # self-consistent directory: hence the warning
    report = verify_run(run_copy, allowlist=trusted)
    assert not report.ok and first_error_entry(report) == 0
    assert errors_at(report)[0] == {"signature"}


def _rewrite_ledger(run: Path, cid: str, scale: float, budget: float | None = None) -> None:
    """Replace a client's ledger by a validly signed one whose epsilons are scaled."""
    entries = [json.loads(line) for line in lines_of(run, cid)]
    ident = load_identity(keystore_of(run), cid)
    ledger_path(run, cid).unlink()
    acc = Accountant("rdp")
    with LedgerWriter(ledger_path(run, cid), cid, ident.signing_key) as w:
        for e in entries:
            if e["mechanism"] in ("refusal", "close"):
                continue
            p = e["params"]
            acc.record(p["noise_multiplier"], p["sample_rate"], p["steps"])
            w.append(round=e["round"], mechanism=e["mechanism"], params=p,
                     epsilon_after=acc.epsilon(e["delta"]) * scale, delta=e["delta"],
                     budget_epsilon=budget if budget is not None else e["budget_epsilon"],
                     accountant="rdp")
        w.close_run(round=entries[-1]["round"], delta=entries[-1]["delta"],
                    budget_epsilon=budget if budget is not None else entries[-1]["budget_epsilon"],
                    accountant="rdp")
    drop_anchor(run, cid)


def test_under_reported_epsilon_is_caught_by_independent_accountant(run_copy):
    _rewrite_ledger(run_copy, CID, scale=0.9)
    report = verify_run(run_copy)
    errs = errors_at(report)
    assert not report.ok
    # signatures and chain are valid: only the accounting check fails, on every entry
    assert set().union(*errs.values()) == {"epsilon_under_reported"}
    assert sorted(errs) == list(range(len(lines_of(run_copy)) - 1))  # all but the close
    msg = next(str(f) for f in report.errors if f.entry == 1)
    assert CID in msg and "entry 1" in msg and "independent" in msg


def test_a_tolerance_under_one_percent_is_named_as_it_is(run_copy):
    """At rel_tol 0.001 the under-reporting error read "by more than 0%" (``:.0%``)."""
    _rewrite_ledger(run_copy, CID, scale=0.99)
    under = [str(f) for f in verify_run(run_copy, rel_tol=0.001).errors
             if f.check == "epsilon_under_reported"]
    assert under and all("by more than 0.1%" in m for m in under)


def test_over_reported_epsilon_is_only_a_warning(run_copy):
    _rewrite_ledger(run_copy, CID, scale=1.2, budget=100.0)
    cfg = (run_copy / "config.toml").read_text()
    report = verify_run(run_copy)
    # budget 100 is not the configured 8, not results.json's client row's, in no plan row
    assert {f.check for f in report.errors} == {"config", "results_budget", "plan_coverage"}
    assert any(w.check == "epsilon_over_reported" for w in report.warnings)
    assert "epsilon = 8.0" in cfg


def test_budget_exceeded_is_caught(run_copy):
    _rewrite_ledger(run_copy, CID, scale=1.0, budget=2.0)
    report = verify_run(run_copy)
    checks = {f.check for f in report.errors if f.client_id == CID}
    assert "budget_exceeded" in checks
    over = [f for f in report.errors if f.check == "budget_exceeded"]
    assert all(f.entry is not None for f in over)


def test_changed_config_is_caught(run_copy):
    path = run_copy / "config.toml"
    path.write_text(path.read_text().replace("epsilon = 8.0", "epsilon = 9.0"))
    report = verify_run(run_copy)
    assert any(f.check == "config" and "config_hash" not in f.message and "hashes" in f.message
               for f in report.errors)


def test_missing_ledger_and_unknown_client(run_copy):
    ledger_path(run_copy, "client-000").unlink()
    shutil.copyfile(ledger_path(run_copy, CID), run_copy / "ledgers" / METHOD / "client-999.jsonl")
    report = verify_run(run_copy)
    by_check = {(f.check, f.client_id) for f in report.errors}
    assert ("missing_ledger", "client-000") in by_check
    assert ("key", "client-999") in by_check
    assert ("client_id", "client-999") in by_check


def _swap_method_folders(run: Path, a: str, b: str) -> None:
    """Swap ``ledgers/<a>/`` and ``ledgers/<b>/`` and, as whoever writes results.json and
    signs the anchor can, their results.json client rows, then re-sign the anchor."""
    ledgers = run / "ledgers"
    (ledgers / a).rename(ledgers / "swapping")
    (ledgers / b).rename(ledgers / a)
    (ledgers / "swapping").rename(ledgers / b)
    doc = json.loads((run / "results.json").read_text())
    p = doc["privacy"]
    p[a]["clients"], p[b]["clients"] = p[b]["clients"], p[a]["clients"]
    (run / "results.json").write_text(json.dumps(doc, indent=2))
    reanchor(run)


def _method_errors(report) -> set[tuple[str, int, str]]:  # type: ignore[no-untyped-def]
    return {(f.ledger, f.entry, f.message) for f in report.errors if f.check == "method_folder"}


def test_swapped_method_folders_of_a_real_run_are_named(tmp_path):
    """A real in-process DP run of Local and FedAvg (the same noise plan for both) whose
    ledger folders were swapped, results.json's client rows and the anchor made to match
    (what a Flower server, which cannot re-sign its clients' entries, can do), verified
    clean: only the method each DP-SGD entry records, signed by its client, differs. Each
    such entry is now an error naming the ledger file, the entry and both methods."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation

    cfg = parse_config({"name": "swap", "methods": ["local", "fedavg"],
                        "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 8},
                        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8},
                        "privacy": {"enabled": True, "epsilon": 8.0}})
    run = tmp_path / "run"
    Simulation(cfg, run, keystore=keystore_of(run)).run()
    assert verify_run(run).errors == []
    _swap_method_folders(run, "local", "fedavg")
    report = verify_run(run)
    assert {f.check for f in report.errors} == {"method_folder"}
    assert _method_errors(report) == {
        (f"ledgers/{folder}/{cid}.jsonl", 0,
         f"the dpsgd entry records method {recorded!r}, but the ledger is in the folder of"
         f" method {folder!r} (ledgers/{folder}/): ledgers of different methods were swapped"
         " or misplaced")
        for folder, recorded in (("local", "fedavg"), ("fedavg", "local"))
        for cid in ("client-000", "client-001")}


def test_only_entries_recording_a_method_are_held_to_their_folder(tmp_path):
    """Summary, lambda and close entries record no method and are never flagged; a refusal
    names the method of the DP-SGD record it refused and is held to its folder like the
    DP-SGD entries (client 2's budget refuses it in round 3)."""
    run = build_run_dir(tmp_path / "run", overrides={"2": 3.0}, record_method=True)
    assert verify_run(run).errors == []
    _swap_method_folders(run, "fedora", "local")
    flagged = {(ledger, entry) for ledger, entry, _ in _method_errors(verify_run(run))}
    expected = set()
    for path in sorted((run / "ledgers").glob("*/*.jsonl")):
        for i, line in enumerate(path.read_text().splitlines()):
            mechanism = json.loads(line)["mechanism"]
            assert mechanism in ("dpsgd", "refusal", "gaussian_summary", "gaussian_lambda",
                                 "close")
            if mechanism in ("dpsgd", "refusal"):
                expected.add((path.relative_to(run).as_posix(), i))
    assert any("refusal" in json.loads(line)["mechanism"] for line in
               (run / "ledgers" / "local" / "client-002.jsonl").read_text().splitlines())
    assert flagged == expected


@contextlib.contextmanager
def _fifo_in_place(path):  # type: ignore[no-untyped-def]
    """A FIFO at ``path`` whose writer end is opened again and again while the block runs,
    so that a reader blocked on it sees end of file: the test cannot hang."""
    os.mkfifo(path)
    done = threading.Event()

    def open_the_writer_end() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.01)

    threading.Thread(target=open_the_writer_end, daemon=True).start()
    try:
        yield path
    finally:
        done.set()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_ledger_that_is_no_regular_file_is_refused_naming_it(run_copy, kind):
    """A FIFO in a ledger's place blocked verify forever, and a link to a device read it
    (/dev/zero: until memory ran out); either is now one error naming the ledger."""
    path = ledger_path(run_copy, CID)
    path.unlink()
    with contextlib.ExitStack() as stack:
        if kind == "device":
            path.symlink_to("/dev/null")
        else:
            stack.enter_context(_fifo_in_place(path))
        with pytest.raises(AuditError, match=f"cannot read ledger {re.escape(str(path))}: not"
                                             " a regular file"):
            verify_run(run_copy)


@pytest.mark.parametrize(("name", "given"), [
    ("anchor.json", None), ("anchor.json", "anchor"), ("keys/allowlist.json", None),
    ("keys/allowlist.json", "allowlist"), ("keys/client-000.ed25519.pub", None),
    (f"ledgers/{METHOD}/model.json", None), ("config.toml", None)])
def test_a_run_file_that_is_no_regular_file_is_said_to_be_one(run_copy, tmp_path, name, given):
    """A FIFO in place of anchor.json, the allowlist, a public key or model.json was reported
    as "missing" (the run's own allowlist, read as the run's keys, blocked on it); the
    finding now says what is there, as a ledger's refusal does."""
    kept = {"anchor": tmp_path / "anchor.json", "allowlist": tmp_path / "allowlist.json"}
    shutil.copyfile(run_copy / "anchor.json", kept["anchor"])
    shutil.copyfile(run_copy / "keys" / "allowlist.json", kept["allowlist"])
    path = run_copy / name
    path.unlink()
    with _fifo_in_place(path):
        report = verify_run(run_copy, **({given: kept[given]} if given else {}))
    said = [f.message for f in report.findings]
    assert any(f"{name} is not a regular file (a FIFO, device or directory in its place)" in m
               for m in said), said
    assert not any(f"{name} is missing" in m for m in said), said


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_replayed_ledger_that_is_no_regular_file_is_named_as_such(run_copy, kind):
    """verified_ledger_entries (audit replay, canary, whitebox) said a FIFO or a link to a
    device in a ledger's place was no ledger at all ("was it run with privacy enabled?")."""
    path = ledger_path(run_copy, CID)
    path.unlink()
    if kind == "device":
        path.symlink_to("/dev/zero")
    else:
        os.mkfifo(path)  # opened without blocking: no writer needed
    with pytest.raises(AuditError, match=f"cannot read ledger {re.escape(str(path))}: not"
                                         " a regular file"):
        verified_ledger_entries(run_copy, METHOD, CID, missing="no ledger")


def test_sensitivity_mismatch_is_caught(run_copy):
    entries = [json.loads(line) for line in lines_of(run_copy)]
    ident = load_identity(keystore_of(run_copy), CID)
    ledger_path(run_copy, CID).unlink()
    acc = Accountant("rdp")
    with LedgerWriter(ledger_path(run_copy, CID), CID, ident.signing_key) as w:
        for e in entries[:-1]:  # the close entry is written by close_run below
            p = dict(e["params"])
            if e["mechanism"] == "gaussian_summary":
                p["sensitivity"] = p["sensitivity"] / 10  # claims 10x less noise was needed
            acc.record(p["noise_multiplier"], p["sample_rate"], p["steps"])
            w.append(round=e["round"], mechanism=e["mechanism"], params=p,
                     epsilon_after=acc.epsilon(e["delta"]), delta=e["delta"],
                     budget_epsilon=e["budget_epsilon"], accountant="rdp")
        w.close_run(round=entries[-1]["round"], delta=entries[-1]["delta"],
                    budget_epsilon=entries[-1]["budget_epsilon"], accountant="rdp")
    drop_anchor(run_copy)
    report = verify_run(run_copy)
    assert [(f.check, f.entry) for f in report.errors] == [("sensitivity", 0)]


@pytest.mark.parametrize("clip_norm", [1e308, 10**400])
def test_a_resigned_clip_norm_beyond_float64_is_a_sensitivity_error(run_copy, clip_norm):
    """A summary entry re-signed with the client's key with clip_norm 1e308 (or an integer
    beyond float64) made verify raise OverflowError while computing the implied sensitivity
    (found by random damage of run directories). It is a sensitivity error at that entry."""
    key = load_identity(keystore_of(run_copy), CID).signing_key

    def huge(entry):
        entry["params"]["clip_norm"] = clip_norm

    lines = lines_of(run_copy)
    assert json.loads(lines[0])["mechanism"] == "gaussian_summary"
    write_lines(run_copy, _resign(lines, 0, key, huge))
    report = verify_run(run_copy)
    assert not report.ok
    assert "sensitivity" in errors_at(report)[0]


def test_a_public_key_of_an_unknown_algorithm_is_a_key_error(run_copy):
    """One bit flipped in the algorithm OID of keys/<client>.ed25519.pub (1.3.101.112 ->
    0.11.101.112) made verify raise cryptography's UnsupportedAlgorithm, a traceback (found
    by random damage of run directories). It is a key error naming the file."""
    import base64

    pub = run_copy / "keys" / f"{CID}.ed25519.pub"
    body = "".join(line for line in pub.read_text().splitlines() if "-----" not in line)
    der = base64.b64decode(body)
    assert b"\x2b\x65\x70" in der  # the Ed25519 OID
    der = der.replace(b"\x2b\x65\x70", b"\x0b\x65\x70")
    pub.write_text("-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode()
                   + "\n-----END PUBLIC KEY-----\n")
    report = verify_run(run_copy)
    assert not report.ok
    assert any(f.check == "key" and str(pub) in f.message for f in report.errors)


def test_torn_last_line_is_caught(run_copy):
    data = ledger_path(run_copy).read_bytes()
    ledger_path(run_copy).write_bytes(data[:-1])
    report = verify_run(run_copy)
    assert ("truncated" in errors_at(report)[len(lines_of(run_copy)) - 1])


def test_non_private_run_has_no_claim_to_verify(tmp_path):
    """A directory whose results.json says DP was off (nothing else) makes no claim: it is
    not a failure (it was one: 'verification FAILED'), and not a pass of a claim either."""
    (tmp_path / "results.json").write_text(json.dumps(
        {"assumptions": {"differential_privacy": False}}))
    report = verify_run(tmp_path)
    assert report.ok and not report.dp_claimed and report.verdict == "no_dp_claim"
    assert any(f.check == "no_ledgers" and "makes no differential-privacy claim" in f.message
               for f in report.warnings)
    doc = report.to_json()
    assert doc["verdict"] == "no_dp_claim" and doc["dp_claimed"] is False
    assert doc["verdict_text"].startswith("no differential-privacy claim: nothing to verify")


def test_strict_keeps_a_run_without_a_claim_at_no_dp_claim(tmp_path):
    """--strict fails what was not checked; the unsigned "no DP claim" statement is no such
    warning (exit 3 is already no pass), so a non-private run still exits 3, and one whose
    results.json is missing (its identity unchecked) fails."""
    from audits.cli import main

    (tmp_path / "results.json").write_text(json.dumps(
        {"assumptions": {"differential_privacy": False}}))
    report = verify_run(tmp_path, strict=True)
    assert report.verdict == "no_dp_claim" and report.to_json()["strict"] is True
    assert main(["audit", "verify", str(tmp_path), "--strict"]) == 3
    (tmp_path / "results.json").unlink()
    (tmp_path / "config.toml").write_text('methods = ["local"]\n')
    assert verify_run(tmp_path).verdict == "no_dp_claim"
    strict = verify_run(tmp_path, strict=True)
    assert strict.verdict == "failed" and [f.check for f in strict.errors] == ["results"]


def test_a_non_private_run_without_keys_claims_no_key_check(tmp_path, pristine_run):
    """With --allowlist, a non-DP run without keys/ was said to have had its keys/*.pub
    checked against it: nothing was checked, and the report now says so."""
    (tmp_path / "results.json").write_text(json.dumps(
        {"assumptions": {"differential_privacy": False}}))
    given = pristine_run / "keys" / "allowlist.json"
    report = verify_run(tmp_path, allowlist=given)
    assert report.verdict == "no_dp_claim" and report.checks == []
    assert "nothing held to it: the run has no keys/" in report.allowlist
    assert "nothing else of the run could be checked" in report.verdict_text


def test_a_non_private_run_whose_results_json_is_no_file_fails(tmp_path):
    """A results.json replaced by a directory or a dangling link read as 'missing' (a
    warning), and a non-DP run then got 'the checks that apply passed': it is an error."""
    import os

    (tmp_path / "config.toml").write_text('methods = ["local"]\n')
    (tmp_path / "results.json").mkdir()
    report = verify_run(tmp_path)
    assert report.verdict == "failed"
    assert any(f.check == "results" and "not a regular file" in f.message for f in report.errors)
    (tmp_path / "results.json").rmdir()
    os.symlink(tmp_path / "gone.json", tmp_path / "results.json")
    report = verify_run(tmp_path)
    assert report.verdict == "failed"
    assert any(f.check == "results" and "a link to nothing" in f.message for f in report.errors)


def test_a_finished_non_private_run_is_said_to_make_no_claim(tmp_path):
    """Verifying (and so reporting) a finished non-DP run gave three errors that describe a DP
    run, then one error 'the run is not differentially private' (verification FAILED): it now
    says once, plainly, that the run makes no DP claim and has no ledgers, keys or anchor; the
    report's verdict says so too."""
    from audits.report import build_report, render_html
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    cfg = parse_config({"name": "plain-verify", "methods": ["local"],
                        "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 8},
                        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8}})
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    report = verify_run(run)
    assert report.ok and not report.errors and report.verdict == "no_dp_claim"
    [warning] = report.warnings
    assert warning.check == "no_ledgers"
    assert "(results.json says that it is not differentially private)" in warning.message
    assert "no privacy ledgers, keys or anchor.json" in warning.message
    assert report.checks == [] and "nothing else of the run could be checked" \
        in report.verdict_text
    page = render_html(build_report(run, verification=report), {})
    assert "writes its anchor" not in page and "allowlist file" not in page
    assert "Verification: no differential-privacy claim" in page and "FAILED" not in page
    (run / "anchor.json").write_text("{}")  # anything of a DP run there is checked as usual
    again = verify_run(run)
    assert again.verdict == "failed" and any(f.check == "anchor" for f in again.errors)
    assert any(f.check == "no_ledgers" and "claims differential privacy" in f.message
               and "anchor.json is present" in f.message for f in again.errors)


def test_a_flower_result_directory_without_ledgers_says_where_they_are(tmp_path):
    """`audit verify` of a DP deployment's WORKDIR/results (results.json, anchor.json; the
    ledgers stay on the nodes) failed with 'no ledgers in .../ledgers' and no word of what to
    do; the error now says where a Flower run's ledgers are and how to collect them. The run
    still fails."""
    (tmp_path / "results.json").write_text(json.dumps(
        {"runtime": "flower", "run_id": 4711, "assumptions": {"differential_privacy": True}}))
    report = verify_run(tmp_path)
    assert report.verdict == "failed"
    [finding] = [f for f in report.errors if f.check == "no_ledgers"]
    assert "nodes/node-<i>/runs/4711/<method>/client-<i>.jsonl" in finding.message
    assert "copy them into ledgers/<method>/" in finding.message
    (tmp_path / "results.json").write_text(json.dumps(
        {"runtime": "in-process", "assumptions": {"differential_privacy": True}}))
    [finding] = [f for f in verify_run(tmp_path).errors if f.check == "no_ledgers"]
    assert "Flower" not in finding.message


def test_a_flower_result_directory_without_allowlist_names_the_copy_to_give(run_copy):
    """A Flower run's collected ledgers verified without --allowlist: a warning said the keys
    were "taken from the run directory itself (keys/allowlist.json)" and an error that the
    same file "does not exist", naming neither what was missing by design nor what to give.
    Now one error says a Flower result directory holds no keys/ and names the allowlist copy
    and the flag; an in-process run without keys/ is reported as before."""
    shutil.rmtree(run_copy / "keys")
    doc = json.loads((run_copy / "results.json").read_text())
    (run_copy / "results.json").write_text(json.dumps({**doc, "runtime": "flower"}))
    report = verify_run(run_copy)
    assert not report.ok
    found = [f for f in report.findings if f.check == "allowlist"]
    assert len(found) == 1 and found[0].severity == "error"
    assert "a Flower result directory holds no keys/" in found[0].message
    assert "identities/server/allowlist.json" in found[0].message
    assert "taken from the run directory itself" not in found[0].message
    (run_copy / "results.json").write_text(json.dumps(doc))
    messages = [f.message for f in verify_run(run_copy).findings if f.check == "allowlist"]
    assert any("taken from the run directory itself" in m for m in messages)


def test_a_claim_read_from_a_folder_without_keys_names_the_allowlist_to_give(run_copy):
    """audit replay and whitebox of a Flower run's collected folder (no keys/ by design) said
    "allowlist file .../keys/allowlist.json does not exist", naming no remedy. Now the error
    says the folder holds no keys/ and how to give the allowlist; with it the claim is read."""
    trusted = run_copy.parent / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    shutil.rmtree(run_copy / "keys")
    with pytest.raises(AuditError) as refused:
        verified_ledger_entries(run_copy, METHOD, CID)
    message = str(refused.value)
    assert "holds no keys/ (a Flower run's collected folder holds none)" in message
    assert "identities/server/allowlist.json) with the allowlist= argument" in message
    assert "does not exist" not in message
    assert verified_ledger_entries(run_copy, METHOD, CID, allowlist=trusted)


def _envelope_run(tmp_path: Path, *, keep_private_keys: bool = False) -> Path:
    """A finished non-DP run with [security] envelopes: keys/ holds its envelope keys (the
    private ones deleted, as before sharing it, unless ``keep_private_keys``)."""
    from secure_fedora.core.config import parse_config
    from secure_fedora.runtimes.inprocess import Simulation, build_clients

    cfg = parse_config({"name": "plain-envelopes", "methods": ["fedavg"],
                        "data": {"num_clients": 2, "train_per_client": 16, "val_per_client": 8,
                                 "test_per_client": 8},
                        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8},
                        "security": {"envelopes": True}})
    run = tmp_path / "run"
    Simulation(cfg, run, clients=build_clients(cfg)).run()
    assert (run / "keys").is_dir()
    if not keep_private_keys:
        for key in (run / "keys").glob("*.key"):
            key.unlink()
    return run


def test_a_non_private_run_s_own_envelope_keys_are_flagged_and_strict_fails_them(tmp_path):
    """A run without privacy keeps its envelope keys in RUN/keys (for a resume): its audit
    said "no DP claim" (exit 3) without a word on them. They are now an unchecked warning
    naming them and saying to delete keys/*.key before sharing the run (--strict: an error);
    a key anywhere else in such a run is an error; without them it is a plain no-claim run."""
    from audits.cli import main

    run = _envelope_run(tmp_path, keep_private_keys=True)
    report = verify_run(run)
    assert report.verdict == "no_dp_claim" and not report.errors
    [finding] = [f for f in report.warnings if f.check == "private_keys"]
    assert finding.unchecked and "6 files hold" in finding.message
    assert "keys/server.ed25519.key" in finding.message
    assert "delete keys/*.key before sharing it" in finding.message
    assert main(["audit", "verify", str(run)]) == 3
    strict = verify_run(run, strict=True)
    assert strict.verdict == "failed" and "private_keys" in [f.check for f in strict.errors]
    moved = run / "extra" / "server.pem"
    moved.parent.mkdir()
    moved.write_bytes((run / "keys" / "server.ed25519.key").read_bytes())
    [error] = verify_run(run).errors
    assert error.check == "private_keys" and "extra/server.pem" in error.message
    moved.unlink()
    for key in (run / "keys").glob("*.key"):
        key.unlink()
    clean = verify_run(run)
    assert clean.verdict == "no_dp_claim"
    assert not [f for f in clean.warnings if f.check == "private_keys"]


def test_a_non_private_run_with_envelopes_has_its_envelope_keys_checked(tmp_path):
    """A non-DP run with [security] envelopes holds keys/ (its envelope keys): they are what
    can be checked of it (each .pub against keys/allowlist.json, and that against an
    --allowlist given); a replaced .pub fails the verification."""
    run = _envelope_run(tmp_path)
    report = verify_run(run)
    assert report.verdict == "no_dp_claim" and not report.errors
    [warning] = [f for f in report.warnings if f.check == "no_ledgers"]
    assert "no privacy ledgers or anchor.json" in warning.message
    assert any("envelope keys" in c for c in report.checks)
    given = tmp_path / "registered.json"
    given.write_bytes((run / "keys" / "allowlist.json").read_bytes())
    assert verify_run(run, allowlist=given).verdict == "no_dp_claim"
    keys = run / "keys"
    (keys / "client-000.ed25519.pub").write_bytes((keys / "client-001.ed25519.pub").read_bytes())
    broken = verify_run(run)
    assert broken.verdict == "failed"
    assert any(f.check == "key" and "client-000.ed25519.pub" in f.message for f in broken.errors)


def test_a_non_private_run_s_envelope_keys_held_to_its_own_allowlist_are_unchecked(tmp_path):
    """Without --allowlist, a non-DP run's envelope keys were checked against the run's own
    keys/allowlist.json with no warning, so --strict passed it while a DP run whose keys were
    taken from the run failed: the same unchecked warning now says so. Without --strict the
    run keeps its verdict (no_dp_claim, exit 3); with --strict it fails (exit 1) unless an
    independently registered allowlist is given."""
    from audits.cli import main

    run = _envelope_run(tmp_path)
    report = verify_run(run)
    [own] = [f for f in report.warnings if f.check == "allowlist"]
    assert own.unchecked and "only against the run's own" in own.message
    assert "--allowlist" not in own.message and "allowlist=" in own.message
    assert report.verdict == "no_dp_claim"
    assert main(["audit", "verify", str(run)]) == 3
    strict = verify_run(run, strict=True)
    assert strict.verdict == "failed" and [f.check for f in strict.errors] == ["allowlist"]
    assert main(["audit", "verify", str(run), "--strict"]) == 1
    assert main(["audit", "report", str(run), "--strict"]) == 1  # as verify, stated
    doc = json.loads((run / "audit" / "report.json").read_text())["verification"]
    assert doc["verdict"] == "failed" and doc["strict"] is True
    given = tmp_path / "registered.json"
    given.write_bytes((run / "keys" / "allowlist.json").read_bytes())
    held = verify_run(run, allowlist=given, strict=True)
    assert held.verdict == "no_dp_claim" and not held.errors
    assert main(["audit", "verify", str(run), "--strict", "--allowlist", str(given)]) == 3


def _stripped_of_dp(run: Path) -> None:
    """Edit a DP run's config.toml to disable privacy (and noised relatedness and private
    validation, which need it), as someone hiding its ledgers' absence would."""
    import tomli_w
    import tomllib

    doc = tomllib.loads((run / "config.toml").read_text())
    doc["privacy"]["enabled"] = False
    doc["fedora"]["relatedness"] = "plain"
    doc["data"]["validation"] = "public"
    (run / "config.toml").write_text(tomli_w.dumps(doc))


def test_a_dp_run_without_its_ledgers_fails_whatever_its_config_says(run_copy, tmp_path):
    """A DP run whose ledgers were deleted fails; editing config.toml to privacy.enabled =
    false does not turn that into 'no claim': the signed anchor and results.json (whose digest
    the anchor signs) still claim DP, and with those edited too the config hash, or an anchor
    kept apart, still fails it."""
    kept = tmp_path / "anchor-kept.json"
    kept.write_bytes((run_copy / "anchor.json").read_bytes())
    shutil.rmtree(run_copy / "ledgers")
    gone = verify_run(run_copy)
    assert gone.verdict == "failed" and gone.dp_claimed
    assert any(f.check == "no_ledgers" and "config.toml enables privacy" in f.message
               for f in gone.errors)
    _stripped_of_dp(run_copy)
    edited = verify_run(run_copy)
    assert edited.verdict == "failed" and edited.dp_claimed
    [missing] = [f for f in edited.errors if f.check == "no_ledgers"]
    assert "anchor.json is present" in missing.message
    assert "results.json assumptions.differential_privacy is True" in missing.message
    doc = json.loads((run_copy / "results.json").read_text())
    doc["assumptions"]["differential_privacy"] = False
    doc["privacy"] = {}
    (run_copy / "results.json").write_text(json.dumps(doc))
    still = verify_run(run_copy)  # the anchor is signed: its presence is the claim
    assert still.verdict == "failed" and any(f.check == "anchor_file" for f in still.errors)
    (run_copy / "anchor.json").unlink()
    unsigned = verify_run(run_copy)  # results.json's config hash is the run's, not the edit's
    assert unsigned.verdict == "failed"
    assert any(f.check == "config" and "changed after the run" in f.message
               for f in unsigned.errors)
    kept_apart = verify_run(run_copy, anchor=kept)
    assert kept_apart.verdict == "failed" and kept_apart.dp_claimed
    assert any(f.check == "anchor_missing_ledger" for f in kept_apart.errors)


def test_bad_arguments_raise(tmp_path, pristine_run):
    with pytest.raises(AuditError, match="does not exist"):
        verify_run(tmp_path / "nope")
    with pytest.raises(AuditError, match="rel_tol"):
        verify_run(pristine_run, rel_tol=1.5)
    with pytest.raises(AuditError, match="pld_checkpoints"):
        verify_run(pristine_run, pld_checkpoints=0)
    with pytest.raises(AuditError, match="allowlist"):
        verify_run(pristine_run, allowlist=tmp_path / "missing.json")
    with pytest.raises(AuditError, match="anchor .* does not exist"):
        verify_run(pristine_run, anchor=tmp_path / "missing.json")
    with pytest.raises(AuditError, match="anchor .* is a directory, not a file"):
        verify_run(pristine_run, anchor=tmp_path)
    with pytest.raises(AuditError, match="allowlist .* is a directory, not a file"):
        verify_run(pristine_run, allowlist=tmp_path)
    with pytest.raises(AuditError, match="accountant"):
        independent_epsilons([(1.0, 0.1, 3)], 1e-5, "moments")


def test_a_fifo_anchor_or_allowlist_is_named_as_one_not_as_missing(tmp_path, pristine_run, capsys):
    """--anchor/--allowlist naming a FIFO said "does not exist" (it exists); it is named as
    not a regular file, never opened, in one line, and the run is left as it was."""
    import os

    from audits.cli import main as audit_main

    fifo = tmp_path / "kept.json"
    os.mkfifo(fifo)
    with pytest.raises(AuditError, match=r"anchor .* is not a regular file \(a FIFO"):
        verify_run(pristine_run, anchor=fifo)
    with pytest.raises(AuditError, match=r"allowlist .* is not a regular file \(a FIFO"):
        verify_run(pristine_run, allowlist=fifo)
    before = {p: p.read_bytes() for p in pristine_run.rglob("*") if p.is_file()}
    for flag in ("--anchor", "--allowlist"):
        assert audit_main(["audit", "verify", str(pristine_run), flag, str(fifo)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "is not a regular file (a FIFO, device or socket)" in err[0]
    assert {p: p.read_bytes() for p in pristine_run.rglob("*") if p.is_file()} == before


def test_independent_rdp_matches_opacus_within_tolerance():
    history = [(5.0, 1.0, 1), (1.1, 0.05, 200), (5.0, 1.0, 1), (1.1, 0.05, 200)]
    ind = independent_epsilons(history, 1e-5, "rdp")
    acc = Accountant("rdp")
    for k, (nm, q, steps) in enumerate(history):
        acc.record(nm, q, steps)
        assert ind[k] == pytest.approx(acc.epsilon(1e-5), rel=0.01)
    assert independent_epsilons([None, None], 1e-5, "rdp") == [None, None]


def test_independent_pld_is_dp_accountings_pld_accountant_bit_for_bit():
    """The audit's PLD epsilon (built from one cached single-release PLD per sigma, q and
    discretization) equals dp_accounting's PLDAccountant composing the same events, at the
    default and at a finer discretization, with a Gaussian (q = 1) group beside it."""
    import dp_accounting
    from dp_accounting import pld

    from audits import verify as v

    for disc in (v.PLD_VALUE_DISCRETIZATION, v.PLD_RECHECK_DISCRETIZATIONS[0]):
        for counts in ({(1.2, 0.1): 7}, {(1.2, 0.1): 20, (5.0, 1.0): 5},
                       {(0.9, 0.05): 3, (1.2, 0.1): 1, (5.0, 1.0): 2}):
            acc = pld.PLDAccountant(value_discretization_interval=disc)
            for (nm, q), steps in sorted(counts.items()):
                event = dp_accounting.GaussianDpEvent(nm)
                acc.compose(event if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, event),
                            steps)
            assert v._pld_epsilon(counts, 1e-5, disc) == acc.get_epsilon(1e-5), (disc, counts)


def test_verify_builds_each_subsampled_gaussian_pld_once_per_discretization(tmp_path,
                                                                             monkeypatch):
    """An under-reporting PLD ledger is rechecked at every checkpoint and at the end, at each
    finer discretization, for every client: the single-release PLD of its (sigma, q) is
    built once per discretization for all of them (it is most of the cost of a recheck)."""
    from dp_accounting.pld import privacy_loss_distribution as pld_module

    from audits import verify as v
    from privacy.accounting import _subsampled_gaussian_pld

    run = build_run_dir(tmp_path / "run", num_clients=2, rounds=3, accountant="pld",
                        steps_per_round=2, methods=("local",), noise_multiplier=3.37)
    for cid in ("client-000", "client-001"):
        key = load_identity(keystore_of(run), cid).signing_key
        lines = lines_of(run, cid, "local")
        for i in range(len(lines)):

            def lower(entry):
                entry["epsilon_after"] *= 0.5
                if entry["mechanism"] == "close":
                    entry["params"]["epsilon_spent"] *= 0.5

            lines = _resign(lines, i, key, lower)
        write_lines(run, lines, cid, "local")
        drop_anchor(run, cid, "local")
    built: list[tuple[float, float]] = []
    real = pld_module.from_gaussian_mechanism

    def counting(*args, **kwargs):
        if kwargs.get("sampling_prob", 1.0) < 1.0:
            built.append((kwargs["standard_deviation"], kwargs["value_discretization_interval"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pld_module, "from_gaussian_mechanism", counting)
    v._pld_epsilon_cached.cache_clear()  # a noise no other test uses: no PLD of it is cached
    _subsampled_gaussian_pld.cache_clear()  # (building the run cached its own at 1e-3)
    report = verify_run(run, pld_checkpoints=3)
    under = {f.client_id for f in report.errors if f.check == "epsilon_under_reported"}
    assert under == {"client-000", "client-001"}
    # rechecked at every finer discretization; built once at each: the audit composes the
    # one the accounting layer's size guard built (and caches)
    assert {d for _, d in built} == {v.PLD_VALUE_DISCRETIZATION, *v.PLD_RECHECK_DISCRETIZATIONS}
    assert max(collections.Counter(built).values()) == 1, built


def test_a_tiny_epsilon_prv_ledger_verifies_without_findings(tmp_path):
    """Local DP-SGD at noise 100 (100 steps at q = 0.1, epsilon ~0.03). PRV recorded its
    estimate + 0.01, which `audit verify` warned about at every entry (0.0373 recorded vs
    0.0297 independent at the end); PRV now records estimate + 0.001, which the PLD at 1e-3
    overstated (0.0297 > 0.0283): the audit rechecks it at finer discretizations (0.0273)
    before calling it under-reported. The ledger and the audit now agree."""
    run = build_run_dir(tmp_path / "prv", num_clients=2, rounds=20, accountant="prv",
                        epsilon=1.0, noise_multiplier=100.0, steps_per_round=5,
                        methods=("local",))
    report = verify_run(run, pld_checkpoints=20)
    assert report.ok, [str(f) for f in report.errors]
    assert not [str(f) for f in report.warnings if f.check.startswith("epsilon_")]
    for c in report.clients:
        assert all(e.independent_epsilon <= e.recorded_epsilon <= 1.05 * e.independent_epsilon
                   for e in c.series if e.independent_epsilon is not None)
        assert 0.02 < c.final_epsilon < 0.03
    # an under-report is still caught at that scale: 0.8 x the PLD at 1e-3 (0.0238) is 13%
    # below the finer PLD (0.0273)
    cid, method = "client-000", "local"
    key = load_identity(keystore_of(run), cid).signing_key
    lines = lines_of(run, cid, method)
    last = len(lines) - 2
    lowered = independent_epsilons([(100.0, 0.1, 100)], 1e-5, "pld")[0] * 0.8

    def lower(entry):
        entry["epsilon_after"] = lowered

    def close_at_lowered(entry):
        entry["epsilon_after"] = entry["params"]["epsilon_spent"] = lowered

    write_lines(run, _resign(_resign(lines, last, key, lower), last + 1, key, close_at_lowered),
                cid, method)
    drop_anchor(run, cid, method)
    report = verify_run(run, pld_checkpoints=20)
    assert (cid, last, "epsilon_under_reported") in [(f.client_id, f.entry, f.check)
                                                      for f in report.errors]


def test_prv_ledger_verified_with_pld(tmp_path):
    # noise 3.0: its PLD at the finest recheck (1e-5) builds in a fifth of the time of 1.2's
    run = build_run_dir(tmp_path / "prv", num_clients=2, rounds=1, accountant="prv",
                        steps_per_round=3, methods=("fedora",), noise_multiplier=3.0)
    report = verify_run(run, pld_checkpoints=2)  # PLD at entry 0 and at the last (2)
    assert report.ok, [str(f) for f in report.errors]
    for c in report.clients:
        checked = [e.index for e in c.series if e.independent_epsilon is not None]
        assert checked == [0, 2]
        assert c.independent_final_epsilon == pytest.approx(c.final_epsilon, rel=0.02)
    # Under-report the last entry, validly signed by the client's own key: PLD catches it.
    cid = "client-000"
    key = load_identity(keystore_of(run), cid).signing_key
    lines = lines_of(run, cid)

    def lower(entry):
        entry["epsilon_after"] = entry["epsilon_after"] * 0.95

    last = len(lines) - 2  # the last release; the close entry follows it
    lowered = _resign(lines, last, key, lower)
    spent = json.loads(lowered[last])["epsilon_after"]

    def close_at_lowered(entry):
        entry["epsilon_after"] = spent
        entry["params"]["epsilon_spent"] = spent

    write_lines(run, _resign(lowered, last + 1, key, close_at_lowered), cid)
    drop_anchor(run, cid)
    report = verify_run(run, pld_checkpoints=2)
    assert [(f.client_id, f.entry, f.check) for f in report.errors] == [
        (cid, last, "epsilon_under_reported")]


def test_finding_text_names_client_method_entry_and_check():
    f = Finding("error", "chain", "broken", "client-007", 4, "fedora")
    assert str(f) == "ERROR client client-007, method fedora, entry 4: [chain] broken"


def test_config_releasing_unaccounted_summaries_is_an_error(run_copy):
    path = run_copy / "config.toml"
    path.write_text(path.read_text().replace('relatedness = "noised"', 'relatedness = "plain"'))
    report = verify_run(run_copy)
    assert [f.check for f in report.errors] == ["config", "anchor_file"]
    assert "not a valid config" in report.errors[0].message
    assert "config.toml" in report.errors[1].message


def _write_custom(run: Path, cid: str, rows: list[dict], accountant: str = "rdp") -> None:
    """A validly signed ledger with the given rows (round, mechanism, params, eps, budget, delta)."""
    ident = load_identity(keystore_of(run), cid)
    ledger_path(run, cid).unlink()
    with LedgerWriter(ledger_path(run, cid), cid, ident.signing_key) as w:
        for r in rows:
            w.append(round=r["round"], mechanism=r["mechanism"], params=r["params"],
                     epsilon_after=r["eps"], delta=r.get("delta", 1e-5),
                     budget_epsilon=r.get("budget", 8.0), accountant=accountant)
        w.close_run(round=rows[-1]["round"], delta=rows[0].get("delta", 1e-5),
                    budget_epsilon=rows[0].get("budget", 8.0), accountant=accountant)
    drop_anchor(run, cid)


@pytest.mark.parametrize("accountant, severity", [("rdp", "warning"), ("pld", "error")])
def test_a_history_too_large_for_pld_is_named_not_computed(run_copy, accountant, severity):
    """A ledger whose PLD would need gigabytes (a tiny noise multiplier) is named, and the
    auditor allocates nothing large: the PLD cross-check of an RDP ledger is skipped with a
    warning (the RDP check still runs), a PLD ledger cannot be verified (an error)."""
    import tracemalloc

    dpsgd = {"noise_multiplier": 0.005, "sample_rate": 0.5, "steps": 3, "clip_norm": 1.0}
    acc = Accountant("rdp")
    acc.record(0.005, 0.5, 3)
    _write_custom(run_copy, CID, [{"round": 1, "mechanism": "dpsgd", "params": dpsgd,
                                   "eps": acc.epsilon(1e-5), "budget": 1e9}], accountant)
    tracemalloc.start()
    try:
        report = verify_run(run_copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20
    named = [f for f in report.findings if f.check == "pld_too_large"]
    assert [(f.severity, f.client_id) for f in named] == [(severity, CID)]
    assert "points" in named[0].message and "limit" in named[0].message
    client = next(c for c in report.clients if c.client_id == CID and c.method == METHOD)
    assert client.pld_final_epsilon is None
    if accountant == "rdp":
        assert client.independent_final_epsilon == pytest.approx(acc.epsilon(1e-5), rel=0.01)


def test_release_after_refusal_and_changed_budget_are_caught(run_copy):
    dpsgd = {"noise_multiplier": 1.2, "sample_rate": 0.1, "steps": 5, "clip_norm": 1.0}
    acc = Accountant("rdp")
    acc.record(1.2, 0.1, 5)
    e1 = acc.epsilon(1e-5)
    acc.record(1.2, 0.1, 5)
    e2 = acc.epsilon(1e-5)
    _write_custom(run_copy, CID, [
        {"round": 1, "mechanism": "dpsgd", "params": dpsgd, "eps": e1},
        {"round": 2, "mechanism": "refusal", "params": {"reason": "over budget"}, "eps": e1},
        {"round": 3, "mechanism": "dpsgd", "params": dpsgd, "eps": e2, "budget": 9.0},
    ])
    errs = errors_at(verify_run(run_copy))
    assert errs == {2: {"after_refusal", "budget_epsilon_changed"}}


def test_decreasing_epsilon_and_spending_refusal_are_caught(run_copy):
    key = load_identity(keystore_of(run_copy), CID).signing_key
    lines = lines_of(run_copy)

    def spend(entry):
        entry["mechanism"] = "refusal"
        entry["params"] = {"reason": "over budget"}

    # entry 1 becomes a refusal that claims to have spent (its epsilon_after > entry 0's)
    write_lines(run_copy, _resign(lines, 1, key, spend))
    errs = errors_at(verify_run(run_copy))
    assert "refusal_spent" in errs[1]

    def lower(entry):
        entry["epsilon_after"] = 0.0

    write_lines(run_copy, _resign(lines, 3, key, lower))
    errs = errors_at(verify_run(run_copy))
    assert {"epsilon_decreased", "epsilon_under_reported"} <= errs[3]


def test_empty_ledger_and_bad_public_key_file(run_copy):
    ledger_path(run_copy).write_bytes(b"")
    (run_copy / "keys" / "client-000.ed25519.pub").write_text("not a key")
    report = verify_run(run_copy)
    assert ("empty", CID) in {(f.check, f.client_id) for f in report.errors}
    assert any(f.check == "key" and f.client_id == "client-000" and "PEM" in f.message
               for f in report.errors)


def test_ledgers_alone_verify_with_warnings(run_copy):
    (run_copy / "results.json").unlink()
    (run_copy / "config.toml").unlink()
    # anchor.json names both files: their absence is an error while it is there
    report = verify_run(run_copy)
    assert sorted(f.check for f in report.errors) == ["anchor_file", "anchor_file"]
    (run_copy / "anchor.json").unlink()
    report = verify_run(run_copy)
    assert report.ok
    checks = {w.check for w in report.warnings}
    assert {"results", "config", "anchor"} <= checks


def test_unexpected_dp_accounting_layout_is_an_error(monkeypatch):
    import audits.verify as v

    class NoState:
        def __init__(self, orders):
            pass

        def compose(self, event):
            pass

    v._rdp_curve.cache_clear()
    monkeypatch.setattr(v.rdp, "RdpAccountant", NoState)
    try:
        with pytest.raises(AuditError, match="internal layout"):
            independent_epsilons([(1.3, 0.2, 1)], 1e-5, "rdp")
    finally:
        v._rdp_curve.cache_clear()


# --------------------------------------------------------------------------- PLD ledgers


def test_pld_ledgers_verify_and_report_the_difference_to_rdp(tmp_path):
    run = build_run_dir(tmp_path / "run", accountant="pld")
    report = verify_run(run)
    assert report.ok, [str(f) for f in report.errors]
    for c in report.clients:
        assert c.accountant == "pld" and c.cross_method == "rdp"
        # PLD is tighter than RDP for the same releases: the recorder is below the other method
        assert c.cross_difference is not None and c.cross_difference < -0.02
        assert c.final_epsilon == pytest.approx(c.pld_final_epsilon, rel=0.02)
    rdp_run = verify_run(build_run_dir(tmp_path / "rdp", accountant="rdp"))
    assert rdp_run.ok
    assert all(c.cross_method == "pld" and c.cross_difference > 0 for c in rdp_run.clients)


def test_a_recorder_below_the_pessimistic_pld_is_an_error(tmp_path, monkeypatch):
    from privacy import accounting

    honest = accounting.ACCOUNTANT_REGISTRY["pld"]
    optimistic = dataclasses.replace(
        honest, compute=lambda history, delta, options: 0.8 * honest.compute(history, delta,
                                                                              options))
    monkeypatch.setitem(accounting.ACCOUNTANT_REGISTRY, "pld", optimistic)
    accounting._epsilon.cache_clear()
    try:
        # two rounds: few entries, each of them checked (and rechecked at the finer PLDs);
        # noise 3.0: its PLD at the finest discretization is a fifth of the cost of 1.2's
        run = build_run_dir(tmp_path / "run", accountant="pld", rounds=2, noise_multiplier=3.0)
    finally:
        accounting._epsilon.cache_clear()
    report = verify_run(run)
    assert not report.ok
    under = [f for f in report.errors if f.check == "epsilon_under_reported"]
    assert {f.client_id for f in under} == {c.client_id for c in report.clients}


# --------------------------------------------------------------------- anchored ledgers (issue 14)


def _drop_last_round(run: Path, method: str = METHOD) -> None:
    """Cut the last round (and the close entry after it) from every ledger of ``method``, as
    someone without any key can, and make results.json agree (issue 14, "Why" 1)."""
    for path in sorted((run / "ledgers" / method).glob("*.jsonl")):
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        last_round = max(e["round"] for e in entries if e["mechanism"] != "close")
        kept = [canonical_json(e) for e in entries
                if e["mechanism"] != "close" and e["round"] != last_round]
        path.write_text("".join(line + "\n" for line in kept))
        drop_anchor(run, path.stem, method, resign=False)


def test_dropping_the_last_round_everywhere_fails_verification(run_copy, tmp_path):
    """Regression for issue 14, "Why" 1: cut the last round from every FEDORA ledger and
    patch results.json (or delete it): verification fails, with or without the anchor copy."""
    kept = tmp_path / "anchor-copy.json"
    shutil.copyfile(run_copy / "anchor.json", kept)
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    _drop_last_round(run_copy)
    for kwargs in ({}, {"anchor": kept}, {"allowlist": trusted, "anchor": kept}):
        report = verify_run(run_copy, **kwargs)
        assert not report.ok
        checks = {(f.check, f.client_id) for f in report.errors}
        for cid in ("client-000", "client-001", "client-002"):
            assert ("not_closed", cid) in checks and ("anchor_behind", cid) in checks
        assert ("anchor_file", None) in checks  # results.json no longer has its digest
    (run_copy / "results.json").unlink()
    report = verify_run(run_copy, anchor=kept)
    assert any(f.check == "anchor_file" and "results.json is missing" in f.message
               for f in report.errors)
    # Even with the run's own anchor.json deleted as well, the cut ledgers have no close.
    (run_copy / "anchor.json").unlink()
    report = verify_run(run_copy)
    assert {f.check for f in report.errors} == {"not_closed"}
    assert not verify_run(run_copy, anchor=kept).ok


def test_deleted_method_or_config_and_ledger_fail_against_the_anchor(run_copy, tmp_path):
    kept = tmp_path / "anchor-copy.json"
    shutil.copyfile(run_copy / "anchor.json", kept)
    shutil.rmtree(run_copy / "ledgers" / "local")
    doc = json.loads((run_copy / "results.json").read_text())
    del doc["privacy"]["local"], doc["methods"]["local"]
    (run_copy / "results.json").write_text(json.dumps(doc))
    report = verify_run(run_copy, anchor=kept)
    missing = {(f.method, f.client_id) for f in report.errors
               if f.check == "anchor_missing_ledger"}
    assert missing == {("local", c) for c in ("client-000", "client-001", "client-002")}
    (run_copy / "config.toml").unlink()
    ledger_path(run_copy, "client-002").unlink()
    report = verify_run(run_copy, anchor=kept)
    checks = {(f.check, f.client_id) for f in report.errors}
    assert ("anchor_missing_ledger", "client-002") in checks
    assert any(f.check == "anchor_file" and "config.toml is missing" in f.message
               for f in report.errors)


def _resigned_anchor(run: Path, identity) -> None:
    """anchor.json re-built from the run as it is now and signed by ``identity``."""
    from secure_fedora.secure.anchor import build_anchor, write_anchor

    old = json.loads((run / "anchor.json").read_text())
    results = json.loads((run / "results.json").read_text())
    write_anchor(run, build_anchor(
        run, run_name=results["name"], config_hash=results["config_hash"],
        methods=old["methods"], signer=identity,
        ledgers={k: {"entries": v["entries"], "head": v["head"],
                     "epsilon_spent": v["epsilon_spent"]} for k, v in old["ledgers"].items()}))


def test_replaced_or_edited_anchor_is_caught(run_copy, tmp_path):
    kept = tmp_path / "anchor-copy.json"
    shutil.copyfile(run_copy / "anchor.json", kept)
    doc = json.loads((run_copy / "anchor.json").read_text())
    doc["ledgers"][f"{METHOD}/{CID}"]["final_index"] -= 1
    (run_copy / "anchor.json").write_text(canonical_json(doc) + "\n")
    report = verify_run(run_copy)
    assert [f.check for f in report.errors] == ["anchor_signature"]
    report = verify_run(run_copy, anchor=kept)
    assert [f.check for f in report.errors] == ["anchor"]  # the run's copy was replaced
    assert "differs from the given anchor" in report.errors[0].message
    # A forger re-signs a new anchor with a key of their own: the allowlist refuses it.
    from privacy.identity import Identity

    _resigned_anchor(run_copy, Identity.generate("operator"))
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    report = verify_run(run_copy, allowlist=trusted)
    assert [f.check for f in report.errors] == ["anchor_signature"]
    assert "not the allowlisted key of 'operator'" in report.errors[0].message
    with pytest.raises(AuditError, match="anchor"):
        verify_run(run_copy, anchor=tmp_path / "nope.json")


def test_private_keys_inside_the_run_fail_an_allowlisted_audit(run_copy, tmp_path):
    """Regression for issue 14, "Why" 2: keys in the run directory let anyone re-sign; with an
    allowlist that is an error, not a warning."""
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    assert verify_run(run_copy, allowlist=trusted).ok
    shutil.copyfile(keystore_of(run_copy) / f"{CID}.ed25519.key",
                    run_copy / "keys" / f"{CID}.ed25519.key")
    report = verify_run(run_copy, allowlist=trusted)
    assert [f.check for f in report.errors] == ["private_keys"]
    assert f"keys/{CID}.ed25519.key" in report.errors[0].message
    assert "private_keys" in {e.check for e in verify_run(run_copy).errors}


def _key_bodies(key_file: Path) -> list[str]:
    """The base64 lines of a PEM key file: what no finding may print."""
    return [line for line in key_file.read_text().splitlines() if not line.startswith("-----")]


def _assert_keys_flagged(report, names: list[str], bodies: list[str]) -> None:
    [finding] = [f for f in report.errors if f.check == "private_keys"]
    assert report.verdict == "failed"
    assert f"{len(names)} file" in finding.message
    for name in names:
        assert name in finding.message
    assert "prove nothing to someone who holds the signing key" in finding.message
    assert "remove the keys before sharing a run" in finding.message
    for text in (finding.message, json.dumps(report.to_json())):
        assert "BEGIN" not in text and not any(b in text for b in bodies)


def test_private_keys_inside_a_run_are_an_error_found_by_name_and_content(run_copy, tmp_path,
                                                                          capsys):
    """A run directory holding private keys: whoever receives it for audit receives them.
    Without an allowlist it was only a warning, a key under another name (or in DER) was not
    found, and `audit verify`/`audit report` passed; each is now an error naming the files by
    their paths inside the run, with why, and never printing a key."""
    from cryptography.hazmat.primitives import serialization

    from audits.cli import main
    from audits.report import write_report

    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    ed_key = keystore_of(run_copy) / f"{CID}.ed25519.key"
    x_key = keystore_of(run_copy) / f"{CID}.x25519.key"
    bodies = _key_bodies(ed_key) + _key_bodies(x_key)
    assert not [f for f in verify_run(run_copy).findings if f.check == "private_keys"]
    # by content only: a PEM key renamed, a key pasted into a text file, a DER key
    (run_copy / "notes").mkdir()
    shutil.copyfile(ed_key, run_copy / "notes" / "backup.txt")
    (run_copy / "notes" / "readme.md").write_text("keys:\n" + x_key.read_text() + "done\n")
    der = serialization.load_pem_private_key(ed_key.read_bytes(), None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (run_copy / "notes" / "blob.bin").write_bytes(der)
    os.mkfifo(run_copy / "notes" / "pipe")  # never opened for a blocking read, not a key
    # by name only (whatever it now holds)
    (run_copy / "keys" / "operator.x25519.key").write_text("not a key any more")
    names = ["keys/operator.x25519.key", "notes/backup.txt", "notes/blob.bin",
             "notes/readme.md"]
    for allowlist in (None, trusted):
        _assert_keys_flagged(verify_run(run_copy, allowlist=allowlist), names, bodies)
    paths = write_report(run_copy, tmp_path / "out")
    _assert_keys_flagged(paths.verification, names, bodies)
    for written in (paths.json, paths.html):
        text = written.read_text()
        assert "notes/blob.bin" in text and not any(b in text for b in bodies)
    capsys.readouterr()
    assert main(["audit", "verify", str(run_copy)]) == 1
    assert main(["audit", "report", str(run_copy), "--out", str(tmp_path / "cli")]) == 1
    out = capsys.readouterr().out
    assert out.count("notes/backup.txt") == 2 and not any(b in out for b in bodies)


def test_private_keys_inside_a_run_without_a_dp_claim_are_an_error(tmp_path, pristine_run,
                                                                   capsys):
    """A run that makes no DP claim was not looked at for private keys (verdict no_dp_claim,
    exit 3, in verify and report alike): a key copied into it is now an error (exit 1); the
    same run without the key keeps its verdict."""
    from audits.cli import main
    from audits.report import build_report

    (tmp_path / "results.json").write_text(json.dumps(
        {"assumptions": {"differential_privacy": False}}))
    assert verify_run(tmp_path).verdict == "no_dp_claim"
    assert main(["audit", "verify", str(tmp_path)]) == 3
    assert main(["audit", "report", str(tmp_path)]) == 3
    key = keystore_of(pristine_run) / "operator.ed25519.key"
    (tmp_path / "party").mkdir()
    shutil.copyfile(key, tmp_path / "party" / "operator.ed25519.key")
    report = verify_run(tmp_path)
    _assert_keys_flagged(report, ["party/operator.ed25519.key"], _key_bodies(key))
    doc = build_report(tmp_path)["verification"]
    assert doc["verdict"] == "failed"
    assert [f["check"] for f in doc["findings"] if f["severity"] == "error"] == ["private_keys"]
    assert main(["audit", "verify", str(tmp_path)]) == 1
    assert main(["audit", "report", str(tmp_path)]) == 1
    capsys.readouterr()


def test_entry_after_close_and_bad_close_are_caught(run_copy):
    key = load_identity(keystore_of(run_copy), CID).signing_key
    lines = lines_of(run_copy)

    def bad_close(entry):
        entry["params"]["final_index"] = 0

    write_lines(run_copy, _resign(lines, len(lines) - 1, key, bad_close))
    assert errors_at(verify_run(run_copy))[len(lines) - 1] >= {"close"}
    # Move the close before the last release and re-chain: a release after a close.
    reordered = lines[:-2] + [lines[-1], lines[-2]]
    entries = [json.loads(x) for x in reordered]
    entries[-2]["params"]["final_index"] = len(lines) - 2
    entries[-1]["index"], entries[-2]["index"] = len(lines) - 1, len(lines) - 2
    relinked = _resign([canonical_json(e) for e in entries], len(lines) - 2, key)
    write_lines(run_copy, relinked)
    errs = errors_at(verify_run(run_copy))
    assert "close" in errs[len(lines) - 2] and "not_closed" not in set().union(*errs.values())


def test_a_noise_multiplier_beyond_the_analyses_range_is_a_finding_not_an_overflow(run_copy):
    """A ledger claiming noise 1e300 made the auditor's accountants raise OverflowError."""
    key = load_identity(keystore_of(run_copy), CID).signing_key

    def huge(entry):
        entry["params"]["noise_multiplier"] = 1e300

    write_lines(run_copy, _resign(lines_of(run_copy), 0, key, huge))
    drop_anchor(run_copy, CID)
    report = verify_run(run_copy)
    assert not report.ok
    messages = [f.message for f in report.errors if f.client_id == CID]
    assert any("noise_multiplier must be a finite number in (0, 1e+06]" in m for m in messages)


def test_results_without_an_anchor_fail(run_copy):
    """Deleting anchor.json and editing results.json (accuracy 0.99) passed with a warning."""
    doc = json.loads((run_copy / "results.json").read_text())
    for entry in doc["methods"].values():
        entry["selected"]["mean"] = 0.99
    (run_copy / "results.json").write_text(json.dumps(doc))
    (run_copy / "anchor.json").unlink()
    report = verify_run(run_copy)
    assert not report.ok
    assert [f.check for f in report.errors] == ["anchor"]
    assert "missing although results.json is there" in report.errors[0].message


def test_an_anchor_signed_by_anyone_but_the_operator_is_refused(run_copy, tmp_path):
    """A client's own (allowlisted) key, or a fresh key under a party of its own, re-signed the
    anchor over an edited results.json and passed (with --allowlist, and without it)."""
    from privacy.identity import Identity

    doc = json.loads((run_copy / "results.json").read_text())
    for entry in doc["methods"].values():
        entry["selected"]["mean"] = 0.99
    (run_copy / "results.json").write_text(json.dumps(doc))
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    for signer in (load_identity(keystore_of(run_copy), "client-000"), Identity.generate("auditor")):
        _resigned_anchor(run_copy, signer)
        for allowlist in (None, trusted):
            report = verify_run(run_copy, allowlist=allowlist)
            assert not report.ok
            assert [f.check for f in report.errors] == ["anchor_signature"]
            assert (f"signed by {signer.party_id!r}; the anchor of an in-process run is signed by"
                    " the 'operator' key") in report.errors[0].message


def test_huge_integers_and_wrongly_typed_fields_are_findings_not_crashes(run_copy):
    """A 400-digit integer (OverflowError) or a list where a string or object belongs
    (TypeError) crashed the verifier with a traceback."""
    key = load_identity(keystore_of(run_copy), CID).signing_key

    def tamper(entry):
        entry["epsilon_after"] = 10 ** 400
        entry["params"]["steps"] = 10 ** 400

    write_lines(run_copy, _resign(lines_of(run_copy), 1, key, tamper))
    other = "client-002"
    okey = load_identity(keystore_of(run_copy), other).signing_key
    write_lines(run_copy, _resign(lines_of(run_copy, other), 0, okey,
                                  lambda e: e.__setitem__("mechanism", ["dpsgd"])), other)
    report = verify_run(run_copy)
    assert not report.ok
    messages = [f.message for f in report.errors if f.client_id == CID]
    assert any("epsilon_after must be a finite number" in m for m in messages)
    assert any("params.steps must be an int in [1, 1e+15], got 'an int of 401 digits'" in m
               for m in messages)
    assert any("mechanism must be a non-empty string" in f.message
               for f in report.errors if f.client_id == other)
    doc = json.loads((run_copy / "results.json").read_text())
    doc["methods"] = 5
    (run_copy / "results.json").write_text(json.dumps(doc))
    report = verify_run(run_copy)
    assert any(f.check == "results" and "'methods' must be an object, got int" in f.message
               for f in report.errors)
    anchor = json.loads((run_copy / "anchor.json").read_text())
    anchor["methods"] = [["fedora"]]
    (run_copy / "anchor.json").write_text(canonical_json(anchor) + "\n")
    report = verify_run(run_copy)
    assert any(f.check == "anchor" and "malformed" in f.message for f in report.errors)


def test_a_configured_method_missing_from_an_in_process_results_json_is_an_error(run_copy):
    doc = json.loads((run_copy / "results.json").read_text())
    doc["runtime"] = "in-process"
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    assert verify_run(run_copy).ok
    del doc["methods"]["local"]
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    report = verify_run(run_copy)
    assert [(f.check, f.method) for f in report.errors] == [("results", "local")]
    assert "config.toml lists method 'local' but results.json reports nothing of it" in \
        report.errors[0].message


def test_integers_past_pythons_digit_limit_are_findings_not_tracebacks(run_copy):
    """A JSON integer of 5,000 digits raises ValueError (not JSONDecodeError) in json.loads:
    in results.json, a ledger line or the run's allowlist it crashed `audit verify`."""
    huge = "9" * 5000
    results = (run_copy / "results.json").read_text()
    (run_copy / "results.json").write_text(results.replace('"version"', f'"huge": {huge}, "version"', 1))
    report = verify_run(run_copy)
    assert any(f.check == "results" and "not readable JSON" in f.message for f in report.errors)
    (run_copy / "results.json").write_text(results)
    lines = lines_of(run_copy)
    write_lines(run_copy, [lines[0].replace("{", f'{{"huge": {huge}, ', 1), *lines[1:]])
    report = verify_run(run_copy)
    assert any(f.client_id == CID and f.check == "json" for f in report.errors)
    write_lines(run_copy, lines)
    allowlist = run_copy / "keys" / "allowlist.json"
    allowlist.write_text(allowlist.read_text().replace("{", f'{{"huge": {huge}, ', 1))
    assert not verify_run(run_copy).ok


@pytest.mark.parametrize("runtime", [[], {}, None, 3])
def test_an_anchor_runtime_of_the_wrong_type_is_a_finding(run_copy, runtime, tmp_path, capsys):
    """``"runtime": []`` or ``{}`` in anchor.json was an unhashable-type TypeError traceback
    (``doc["runtime"] not in ANCHOR_SIGNERS``) in verify and report."""
    from audits.cli import main

    doc = json.loads((run_copy / "anchor.json").read_text())
    doc["runtime"] = runtime
    (run_copy / "anchor.json").write_text(canonical_json(doc) + "\n")
    report = verify_run(run_copy)
    assert [f.check for f in report.errors] == ["anchor"]
    assert "runtime must be one of" in report.errors[0].message
    assert main(["audit", "verify", str(run_copy)]) == 1
    assert main(["audit", "report", str(run_copy), "--out", str(tmp_path / "out")]) == 1
    assert (tmp_path / "out" / "report.html").is_file()
    capsys.readouterr()


def test_a_configured_methods_deleted_ledgers_fail_without_results_and_anchor(run_copy):
    """With results.json and anchor.json deleted, ``rm -r ledgers/fedora`` passed: the methods
    expected were taken from results.json alone. config.toml names them too."""
    (run_copy / "results.json").unlink()
    (run_copy / "anchor.json").unlink()
    report = verify_run(run_copy)
    assert report.ok  # a run without results.json and anchor: warnings only (documented)
    assert {"results", "anchor"} <= {w.check for w in report.warnings}
    shutil.rmtree(run_copy / "ledgers" / "fedora")
    report = verify_run(run_copy)
    assert not report.ok
    assert {(f.check, f.method, f.client_id) for f in report.errors} == {
        ("missing_ledger", "fedora", c) for c in ("client-000", "client-001", "client-002")}



def test_a_folder_without_anything_naming_its_ledgers_says_its_completeness_is_unanchored(
        run_copy):
    """A Flower result folder (no config.toml) with results.json and anchor.json deleted
    passed with no word that a whole method's ledgers could be gone: `rm -r ledgers/fedora`
    passes too (nothing names the ledgers expected). It still passes, now with a warning
    saying so and how to anchor it; with config.toml the warning names what binds it."""
    (run_copy / "results.json").unlink()
    (run_copy / "anchor.json").unlink()
    report = verify_run(run_copy)
    [warning] = [w for w in report.warnings if w.check == "completeness"]
    assert report.ok and "config.toml names" in warning.message
    (run_copy / "config.toml").unlink()
    shutil.rmtree(run_copy / "ledgers" / "fedora")
    report = verify_run(run_copy)
    assert report.ok
    [warning] = [w for w in report.warnings if w.check == "completeness"]
    assert warning.message.startswith("the folder's completeness is unanchored: nothing in ")
    assert "every ledger of a method deleted, is not detected" in warning.message
    assert "(the anchor= argument) to prove that no ledger is missing" in warning.message


@pytest.mark.parametrize("written", [False, True])
def test_a_leftover_ledger_creation_is_noted_not_verified_as_a_method(run_copy, written):
    """A creation of a method's ledgers killed before its rename leaves
    ``ledgers/.<method>.creating-<8 hex>``: it was listed as a method of its own (a coverage
    warning, errors for its empty ledgers, a missing ledger and ledgers the anchor does not
    name), failing a run that is intact. A staging folder holding entries is still an error."""
    staging = run_copy / "ledgers" / ".fedora.creating-0123abcd"
    staging.mkdir()
    for cid in ("client-000", "client-001"):
        (staging / f"{cid}.jsonl").write_bytes(b"")
    (staging / "model.json").write_text("{}")
    if written:
        shutil.copy(ledger_path(run_copy, "client-000"), staging / "client-000.jsonl")
    report = verify_run(run_copy)
    assert all(not c.method.startswith(".") for c in report.clients if c.method)
    assert not any(f.method and f.method.startswith(".") for f in report.findings)
    noted = [f for f in report.findings if f.check == "interrupted_creation"]
    assert len(noted) == 1 and noted[0].method == "fedora"
    assert ".fedora.creating-0123abcd" in noted[0].message
    assert report.ok is not written
    assert noted[0].severity == ("error" if written else "warning")
    if written:
        assert "client-000.jsonl" in noted[0].message
        assert [f.check for f in report.errors] == ["interrupted_creation"]
    coverage = [f.message for f in report.warnings if f.check == "coverage"]
    assert coverage and ".fedora" not in coverage[0]


def test_findings_name_the_callers_arguments_in_python_and_flags_on_the_cli(
        run_copy, tmp_path, capsys):
    """verify_run's findings and check_anchor's error told a Python caller to pass --anchor
    and --allowlist, the CLI's flags; they now name the anchor= and allowlist= arguments,
    and `audit verify` still names its flags."""
    from audits.cli import main
    from audits.options import CLI_AUDIT_OPTIONS
    from audits.verify import check_anchor

    kept = tmp_path / "anchor-copy.json"
    shutil.copyfile(run_copy / "anchor.json", kept)
    (run_copy / "anchor.json").unlink()
    text = " ".join(f.message for f in verify_run(run_copy).findings)
    assert "pass the copy kept apart (the anchor= argument;" in text
    assert "(the allowlist= argument) to rule out a re-signed ledger" in text
    assert "--anchor" not in text and "--allowlist" not in text
    assert main(["audit", "verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert "pass the copy kept apart (--anchor;" in out
    assert "(--allowlist) to rule out a re-signed ledger" in out
    shutil.rmtree(run_copy / "ledgers" / "local")  # three ledgers missing: one error and more
    with pytest.raises(AuditError, match=r"\(\+2 more; verify_run\(run_dir, anchor=\.\.\.\) "
                                         r"lists all\)$"):
        check_anchor(run_copy, kept)
    with pytest.raises(AuditError, match=r"\(\+2 more; run `audit verify --anchor` for all\)$"):
        check_anchor(run_copy, kept, options=CLI_AUDIT_OPTIONS)


@pytest.mark.parametrize("bad", [3, b"run", 1.5, ["run"], "", "a\x00b"])
def test_path_arguments_that_are_not_text_paths_are_audit_errors_naming_them(pristine_run, bad):
    anchor = pristine_run / "anchor.json"
    calls = {
        "run_dir": [lambda: verify_run(bad), lambda: check_anchor(bad, anchor),
                    lambda: verified_ledger_entries(bad, "fedora", "client-000")],
        "allowlist": [lambda: verify_run(pristine_run, allowlist=bad),
                      lambda: check_anchor(pristine_run, anchor, allowlist=bad),
                      lambda: verified_ledger_entries(pristine_run, "fedora", "client-000",
                                                      allowlist=bad)],
        "anchor": [lambda: verify_run(pristine_run, anchor=bad),
                   lambda: check_anchor(pristine_run, bad)],
    }
    for name, funcs in calls.items():
        for call in funcs:
            with pytest.raises(AuditError, match=f"^{name} "):
                call()


def test_the_checks_name_the_anchor_and_allowlist_as_the_caller_gives_them(pristine_run):
    from audits.options import CLI_AUDIT_OPTIONS

    api_checks = " ".join(verify_run(pristine_run).checks)
    assert "--" not in api_checks
    assert "the anchor= argument" in api_checks and "the allowlist= argument" in api_checks
    cli_checks = " ".join(verify_run(pristine_run, options=CLI_AUDIT_OPTIONS).checks)
    assert "(or --anchor)" in cli_checks and "with --allowlist: keys/allowlist.json" in cli_checks


def test_wrong_independent_epsilons_arguments_are_audit_errors_naming_them():
    """A releases that is no list raised a bare TypeError ('object of type int has no len()'),
    a str one or a release of two values a ValueError from unpacking, a str delta a '<' or
    numpy TypeError."""
    for releases, shown in ((5, "^releases must be a sequence"), ("abc", "^releases must be a sequence"),
                            ([(1.0, 0.1)], r"^releases\[0\] must be"),
                            ([None, "1.0, 0.1, 3"], r"^releases\[1\] must be"),
                            ([(1.0, 2.0, 3)], r"^releases\[0\]: params.sample_rate must be in"),
                            ([(1.0, 5e-324, 3)], r"^releases\[0\]: params.sample_rate must be at least"),
                            ([(1.0, 0.1, 10**30)], r"^releases\[0\]: params.steps must be")):
        for accountant in ("rdp", "pld"):
            with pytest.raises(AuditError, match=shown):
                independent_epsilons(releases, 1e-5, accountant)
    for delta in ("1e-5", None, 0.0, 1.0, float("nan")):
        with pytest.raises(AuditError, match="^delta must be in"):
            independent_epsilons([(1.0, 0.1, 3)], delta, "pld")
    for checkpoints in ("8", 0, 2**63, True):
        with pytest.raises(AuditError, match=r"^checkpoints must be an int in \[1, 2\*\*63\)"):
            independent_epsilons([(1.0, 0.1, 3)], 1e-5, "pld", checkpoints)


def test_a_pld_checkpoints_beyond_int64_is_refused(pristine_run, capsys):
    """--pld-checkpoints 99999999999999999999 was taken (every entry PLD-checked, as any count
    from the ledger's length up does); counts are ints in int64 like the config's."""
    from audits.cli import main

    with pytest.raises(AuditError, match=r"^pld_checkpoints must be an int in \[1, 2\*\*63\)"):
        verify_run(pristine_run, pld_checkpoints=10**20)
    assert main(["audit", "verify", str(pristine_run),
                 "--pld-checkpoints", "99999999999999999999"]) == 2
    assert "pld_checkpoints must be an int in [1, 2**63)" in capsys.readouterr().err


def test_a_noise_multiplier_whose_square_underflows_has_unbounded_epsilon():
    """A ledger release with noise_multiplier 1e-200 (in (0, 1e6], so accepted) made
    independent_epsilons raise dp_accounting's ZeroDivisionError (sigma**2 == 0), so
    `audit verify` stopped with a traceback; the run's own accountant gives +inf there."""
    import math

    from audits.verify import mechanism_epsilon

    acc = Accountant("rdp")
    acc.record(1e-200, 0.5, 3)
    assert acc.epsilon(1e-5) == math.inf
    assert independent_epsilons([(1e-200, 0.5, 3), None, (1.0, 0.1, 2)], 1e-5, "rdp") \
        == [math.inf, None, math.inf]
    entry = {"mechanism": "dpsgd", "params": {"noise_multiplier": 1e-200, "sample_rate": 0.5,
                                              "steps": 2}}
    assert mechanism_epsilon([entry], "dpsgd", 1e-5, "rdp") == math.inf
    assert independent_epsilons([(1e-150, 0.5, 3)], 1e-5, "rdp")[0] > 1e20  # still finite


def test_dpsgd_claim_problem_names_a_wrong_argument():
    """dpsgd_claim_problem compared whatever it was given: a str or None claim, a str
    planned_steps, a list rel_tol raised TypeError (or numpy's truth-value ValueError for an
    array), a list of non-dicts AttributeError, a NaN claim passed every comparison (no
    problem found: a NaN claim accepted)."""
    import math

    from audits.verify import AuditError, dpsgd_claim_problem, mechanism_epsilon

    entry = {"mechanism": "dpsgd", "params": {"noise_multiplier": 1.0, "sample_rate": 0.1,
                                              "steps": 10}}
    recorded = mechanism_epsilon([entry], "dpsgd", 1e-5, "rdp")
    assert dpsgd_claim_problem(recorded, [entry], 1e-5, "rdp", 10) is None
    assert "below" in dpsgd_claim_problem(recorded / 2, [entry], 1e-5, "rdp", 10)
    assert "exceeds" in dpsgd_claim_problem(10**400, [entry], 1e-5, "rdp", 10)
    for bad in ("1.0", None, math.nan, -1.0, True, [1.0]):
        with pytest.raises(AuditError, match="^claim must be a number >= 0"):
            dpsgd_claim_problem(bad, [entry], 1e-5, "rdp", 10)
    for bad in ("10", 1.5, -1, True):
        with pytest.raises(AuditError, match="^planned_steps must be None or an int"):
            dpsgd_claim_problem(recorded, [entry], 1e-5, "rdp", bad)
    for bad in ([0.02], "0.02", 1.0, math.nan):
        with pytest.raises(AuditError, match="^rel_tol must be in"):
            dpsgd_claim_problem(recorded, [entry], 1e-5, "rdp", 10, bad)
    for bad in ([1, 2], "entries", entry):
        with pytest.raises(AuditError, match="^entries must be a sequence"):
            dpsgd_claim_problem(recorded, bad, 1e-5, "rdp", 10)
        with pytest.raises(AuditError, match="^entries must be a sequence"):
            mechanism_epsilon(bad, "dpsgd", 1e-5, "rdp")


def _edit_anchor_row(run: Path, edit, name: str = f"{METHOD}/{CID}") -> None:
    """anchor.json with ledger row ``name`` edited by ``edit`` and re-signed with the run's
    own operator key (as a forger holding the key store would)."""
    from secure_fedora.secure.anchor import anchor_signing_bytes, write_anchor
    from secure_fedora.secure.keystore import OPERATOR_ID

    doc = json.loads((run / "anchor.json").read_text())
    edit(doc["ledgers"][name])
    doc["signature"] = load_identity(keystore_of(run), OPERATOR_ID).sign(
        anchor_signing_bytes(doc)).hex()
    write_anchor(run, doc)


def test_anchored_entries_and_epsilon_spent_are_checked_against_the_ledger(run_copy, tmp_path):
    """An operator-signed anchor recording 12 entries instead of the ledger's, or
    epsilon_spent 1.0 instead of the ledger's final epsilon, verified clean: only final_index
    and head were compared."""
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    n = len(lines_of(run_copy))
    final = max(json.loads(x)["epsilon_after"] for x in lines_of(run_copy))
    assert final > 1.5
    _edit_anchor_row(run_copy, lambda r: r.__setitem__("entries", 2 * n))
    for kwargs in ({}, {"allowlist": trusted}, {"anchor": run_copy / "anchor.json"}):
        report = verify_run(run_copy, **kwargs)
        assert [(f.check, f.client_id, f.method) for f in report.errors] == \
            [("anchor_entries", CID, METHOD)]
        assert f"records {2 * n} entries but final index {n - 1}" in report.errors[0].message
    with pytest.raises(AuditError, match="anchor_entries|records .* entries but final index"):
        check_anchor(run_copy, run_copy / "anchor.json", allowlist=trusted)
    reanchor(run_copy)
    assert verify_run(run_copy).ok
    _edit_anchor_row(run_copy, lambda r: r.__setitem__("epsilon_spent", 1.0))
    report = verify_run(run_copy, allowlist=trusted)
    assert [(f.check, f.client_id) for f in report.errors] == [("anchor_epsilon", CID)]
    assert f"epsilon_spent 1.0 for ledger {METHOD}/{CID}.jsonl, whose final epsilon_after is" \
        f" {final!r}" in report.errors[0].message
    # what the runtime writes: the final epsilon rounded up to 6 decimals, within tolerance
    reanchor(run_copy)
    _edit_anchor_row(run_copy, lambda r: r.__setitem__("epsilon_spent", final + 1e-6))
    assert verify_run(run_copy, allowlist=trusted).ok
    _edit_anchor_row(run_copy, lambda r: r.__setitem__("epsilon_spent", final * (1 + 1e-4)))
    assert [f.check for f in verify_run(run_copy).errors] == ["anchor_epsilon"]


@pytest.mark.parametrize("edit", [lambda r: r.pop("epsilon_spent"),
                                  lambda r: r.__setitem__("epsilon_spent", "7.9"),
                                  lambda r: r.__setitem__("epsilon_spent", -1.0),
                                  lambda r: r.__setitem__("note", "extra")])
def test_an_anchor_ledger_row_of_other_fields_is_malformed(run_copy, edit):
    _edit_anchor_row(run_copy, edit)
    report = verify_run(run_copy)
    assert [f.check for f in report.errors] == ["anchor"]
    assert "ledgers are malformed" in report.errors[0].message


def test_a_published_allowlist_other_than_the_given_one_is_an_error(run_copy, tmp_path):
    """With --allowlist, a run directory whose keys/allowlist.json lists a party the trust
    root does not register, or another key for a party, verified clean: the published
    allowlist was never compared with the given one."""
    from privacy.identity import Identity, allowlist_bytes

    published = run_copy / "keys" / "allowlist.json"
    original = published.read_bytes()
    trusted = tmp_path / "trusted.json"
    trusted.write_bytes(original)
    assert verify_run(run_copy, allowlist=trusted).ok
    keys = load_allowlist(published)
    # a registered party the run does not publish (the key store holds more) is no finding
    wider = tmp_path / "wider.json"
    wider.write_bytes(allowlist_bytes({**keys, "client-009": Identity.generate("client-009").public}))
    assert verify_run(run_copy, allowlist=wider).ok
    published.write_bytes(allowlist_bytes({**keys, "auditor": Identity.generate("auditor").public}))
    report = verify_run(run_copy, allowlist=trusted)
    assert [f.check for f in report.errors] == ["allowlist"]
    assert "lists 1 parties the given allowlist" in report.errors[0].message
    assert "(auditor)" in report.errors[0].message
    assert verify_run(run_copy).ok  # without a trust root there is nothing to compare with
    published.write_bytes(allowlist_bytes({**keys, CID: Identity.generate(CID).public}))
    report = verify_run(run_copy, allowlist=trusted)
    assert [(f.check, f.client_id) for f in report.errors] == [("allowlist", CID)]
    assert f"lists other keys for {CID!r}" in report.errors[0].message
    published.write_text("{not json")
    report = verify_run(run_copy, allowlist=trusted)
    assert [f.check for f in report.errors] == ["allowlist"]
    assert "cannot be compared" in report.errors[0].message
    published.unlink()
    report = verify_run(run_copy, allowlist=trusted)
    assert report.ok
    assert any(w.check == "allowlist" and "does not state who could sign" in w.message
               for w in report.warnings)


def _edit_anchor(run: Path, edit, signer: str = "operator") -> None:
    """anchor.json with its top-level fields edited by ``edit`` and re-signed with the run's
    own ``signer`` key (as a forger holding the key store would)."""
    from secure_fedora.secure.anchor import anchor_signing_bytes, write_anchor

    doc = json.loads((run / "anchor.json").read_text())
    edit(doc)
    ident = load_identity(keystore_of(run), signer)
    doc["signer"]["party_id"] = signer
    doc["signer"]["ed25519"] = ident.public.verify_key_hex()
    doc["signature"] = ident.sign(anchor_signing_bytes(doc)).hex()
    write_anchor(run, doc)


@pytest.mark.parametrize(("field", "value", "sources"), [
    ("run_name", "another-run", ["results.json records name", "config.toml gives name"]),
    ("config_hash", "ab" * 32, ["results.json records config_hash"]),
    ("methods", ["fedora"], ["config.toml gives methods"]),
    ("methods", ["local", "fedora"], ["config.toml gives methods"]),
])
def test_the_anchors_run_identity_is_checked_against_the_run(run_copy, tmp_path, field, value,
                                                             sources):
    """An operator-signed anchor naming another run, config hash or method list verified
    clean: only its files and ledger rows were compared with the run."""
    trusted = tmp_path / "trusted.json"
    shutil.copyfile(run_copy / "keys" / "allowlist.json", trusted)
    _edit_anchor(run_copy, lambda d: d.__setitem__(field, value))
    for kwargs in ({}, {"allowlist": trusted}, {"anchor": run_copy / "anchor.json"}):
        report = verify_run(run_copy, **kwargs)
        assert [f.check for f in report.errors] == ["anchor_identity"] * len(sources)
        for finding, source in zip(report.errors, sources, strict=True):
            assert f"records {field} {value!r}, {source}" in finding.message
            assert "the anchor is not this run's" in finding.message
    with pytest.raises(AuditError, match=rf"\[anchor_identity\] .*records {field}"):
        check_anchor(run_copy, run_copy / "anchor.json", allowlist=trusted)


def test_the_anchors_runtime_is_checked_against_results_json(run_copy):
    doc = json.loads((run_copy / "results.json").read_text())
    doc["runtime"] = "in-process"
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    assert verify_run(run_copy).ok
    doc["runtime"] = "flower"
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)  # the in-process anchor of a results.json that says flower
    report = verify_run(run_copy)
    assert [f.check for f in report.errors] == ["anchor_identity"]
    assert "records runtime 'in-process', results.json records runtime 'flower'" in \
        report.errors[0].message
    with pytest.raises(AuditError, match="anchor_identity"):
        check_anchor(run_copy, run_copy / "anchor.json")


def test_a_flower_anchors_methods_are_checked_against_results_json(run_copy):
    """A Flower result directory has no config.toml: each anchored method must be one
    results.json reports."""
    doc = json.loads((run_copy / "results.json").read_text())
    doc["runtime"] = "flower"
    (run_copy / "results.json").write_text(json.dumps(doc))
    (run_copy / "config.toml").unlink()

    def as_flower(methods):
        def edit(d):
            d.update(runtime="flower", methods=methods,
                     files={"results.json": d["files"]["results.json"]})
            d["files"]["results.json"] = hashlib.sha256(
                (run_copy / "results.json").read_bytes()).hexdigest()
        return edit

    _edit_anchor(run_copy, as_flower(["fedora", "local"]), signer="server")
    assert not [f for f in verify_run(run_copy).errors if f.check.startswith("anchor")]
    _edit_anchor(run_copy, as_flower(["fedora", "local", "fedavg"]), signer="server")
    errors = [f for f in verify_run(run_copy).errors if f.check.startswith("anchor")]
    assert [f.check for f in errors] == ["anchor_missing_ledger", "anchor_identity"]
    assert "records methods ['fedora', 'local', 'fedavg'], results.json reports methods" \
        " ['fedora', 'local']" in errors[1].message


def test_check_anchor_with_an_allowlist_compares_the_published_allowlist(run_copy, tmp_path):
    """check_anchor(allowlist=...) (audit replay --anchor --allowlist) passed a run whose
    keys/allowlist.json lists a party, or a key, the given allowlist does not register, or
    that holds a private key: only verify_run compared them."""
    from privacy.identity import Identity, allowlist_bytes

    published = run_copy / "keys" / "allowlist.json"
    trusted = tmp_path / "trusted.json"
    trusted.write_bytes(published.read_bytes())
    anchor = run_copy / "anchor.json"
    check_anchor(run_copy, anchor, allowlist=trusted)
    keys = load_allowlist(published)
    published.write_bytes(allowlist_bytes({**keys, "auditor": Identity.generate("auditor").public}))
    check_anchor(run_copy, anchor)  # without a trust root there is nothing to compare with
    with pytest.raises(AuditError, match=r"against the allowlist .*trusted\.json: .*lists 1"
                       r" parties the given allowlist .* \(auditor\)"):
        check_anchor(run_copy, anchor, allowlist=trusted)
    published.write_bytes(allowlist_bytes({**keys, CID: Identity.generate(CID).public}))
    with pytest.raises(AuditError, match=f"lists other keys for {CID!r}"):
        check_anchor(run_copy, anchor, allowlist=trusted)
    published.write_bytes(trusted.read_bytes())
    shutil.copyfile(keystore_of(run_copy) / f"{CID}.ed25519.key",
                    run_copy / "keys" / f"{CID}.ed25519.key")
    with pytest.raises(AuditError, match=f"keys/{CID}.ed25519.key"):
        check_anchor(run_copy, anchor, allowlist=trusted)


def test_a_run_stating_exact_figures_must_state_the_ledgers_noise_float(run_copy: Path) -> None:
    """results.json of a run whose plan rows state their figures exactly ("figures":
    "exact") must state each client's noise multiplier as the very float its ledger records;
    a figure off in the last bit (or rounded to 6 decimals) verified, as it must for a run
    written before the exact figures (no such mark)."""
    import math

    doc = json.loads((run_copy / "results.json").read_text())
    row = next(r for r in doc["privacy"][METHOD]["clients"] if r["client"] == CID)
    row["noise_multiplier"] = math.nextafter(1.2, 2.0)  # the fixture's ledgers record 1.2
    for plan_row in doc["privacy"][METHOD]["plan"]:  # a run written before the mark
        del plan_row["figures"]
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    assert not [f for f in verify_run(run_copy).errors if f.check == "results_plan"]  # older run
    doc["privacy"][METHOD]["plan"] = [{"epsilon_budget": 3.0, "delta": 1e-5,
                                       "noise_multiplier": 1.2, "figures": "exact"}]
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    found = [f for f in verify_run(run_copy).errors if f.check == "results_plan"]
    assert [(f.method, f.client_id) for f in found] == [(METHOD, CID)]
    assert "records noise_multiplier 1.2, results.json states its noise_multiplier" \
        f" {math.nextafter(1.2, 2.0)!r}" in found[0].message


def test_an_exact_plan_row_must_state_the_ledgers_noise_float(run_copy: Path) -> None:
    """A plan row stating its figures exactly is what a report shows as the run's DP-SGD
    noise: one off in the last bit (more noise than drawn) verified, re-anchored, while every
    client row stated the ledgers' float. Now each client of that row's budget gets a
    results_plan error; a client of another budget, or a row without the mark, is not held
    to it."""
    import math

    doc = json.loads((run_copy / "results.json").read_text())
    off = math.nextafter(1.2, 2.0)  # the fixture's ledgers (and client rows) record 1.2
    exact = {"noise_multiplier": 1.2, "figures": "exact"}
    unmarked = [{"epsilon_budget": 8.0, "delta": 1e-5, "noise_multiplier": off},
                {"epsilon_budget": 3.0, "delta": 1e-5, **exact}]
    marked = [{"epsilon_budget": 8.0, "delta": 1e-5, **exact, "noise_multiplier": off},
              {"epsilon_budget": 3.0, "delta": 1e-5, **exact}]
    for plan, flagged in ((unmarked, []), (marked, ["client-000", "client-001"])):
        doc["privacy"][METHOD]["plan"] = plan
        (run_copy / "results.json").write_text(json.dumps(doc))
        reanchor(run_copy)
        found = [f for f in verify_run(run_copy).errors if f.check == "results_plan"]
        assert sorted((f.method, f.client_id) for f in found) == [(METHOD, c) for c in flagged]
    assert "records noise_multiplier 1.2, results.json's plan for its budget (epsilon 8.0," \
        f" delta 1e-05) states {off!r}" in found[0].message


def test_without_config_a_ledger_accountant_other_than_results_json_says_is_refused(
        run_copy: Path) -> None:
    """Found by a hunt: a Flower audit folder (results.json, anchor and ledgers; a Flower
    result directory holds no config.toml) whose results.json said RDP while the ledgers
    were written under PLD (each client chose "auto" over its own budget) verified: the
    accountant was compared with results.json only when config.toml was there."""
    (run_copy / "config.toml").unlink()
    assert not [f for f in verify_run(run_copy).errors if f.check == "results_accountant"]
    doc = json.loads((run_copy / "results.json").read_text())
    doc["privacy"][METHOD]["accountant"] = "pld"  # the fixture's ledgers are RDP
    (run_copy / "results.json").write_text(json.dumps(doc))
    report = verify_run(run_copy)
    found = {(f.method, f.client_id) for f in report.errors if f.check == "results_accountant"}
    assert (METHOD, CID) in found and not report.ok
    assert "ledger accountant 'rdp' differs from the one results.json says the run used" \
        " ('pld')" in next(f.message for f in report.errors if f.check == "results_accountant")


def test_a_dpsgd_release_other_than_results_json_states_is_refused(run_copy: Path) -> None:
    """Found by a hunt: results.json states each client's planned DP-SGD noise multiplier and
    the method's sample rate and steps per round, but verify never compared them with what
    the ledgers record, so a client that released with less noise than results.json states
    (a recalibrated plan; a client choosing "auto" over its own budget) verified."""
    assert not [f for f in verify_run(run_copy).errors if f.check == "results_plan"]
    doc = json.loads((run_copy / "results.json").read_text())
    row = next(r for r in doc["privacy"][METHOD]["clients"] if r["client"] == CID)
    row["noise_multiplier"] = 1.3  # the fixture's ledgers record 1.2
    doc["privacy"]["local"]["steps_per_round"] = 6  # and 5 steps per release
    (run_copy / "results.json").write_text(json.dumps(doc))
    reanchor(run_copy)
    report = verify_run(run_copy)
    found = [f for f in report.errors if f.check == "results_plan"]
    assert {(f.method, f.client_id) for f in found if "noise_multiplier" in f.message} \
        == {(METHOD, CID)}
    assert "the dpsgd release records noise_multiplier 1.2, results.json states its" \
        " noise_multiplier 1.3" in next(f.message for f in found if f.method == METHOD)
    assert {f.method for f in found if "steps_per_round 6" in f.message} == {"local"}
    assert not report.ok


def test_an_rdp_order_dp_accounting_drops_is_integrated_so_a_correct_ledger_is_not_under_reported():
    """dp_accounting stops its fractional-order series after 1,000 terms and drops orders
    1.1-1.4 at sigma 0.33, q 0.25; the run's RDP (Opacus) takes order 1.4 there. Without those
    orders the audit put 8 steps at epsilon 40.67 where the ledger correctly says 39.76, more
    than the 2% tolerance: a correct ledger with budget 40 failed as under-reported."""
    sigma, q, steps, delta = 0.33145167001509634, 0.25, 8, 1e-4
    acc = Accountant("rdp")
    acc.record(sigma, q, steps)
    ind = independent_epsilons([(sigma, q, steps)], delta, "rdp")[0]
    assert ind == pytest.approx(acc.epsilon(delta), rel=1e-4)
    assert ind >= acc.epsilon(delta) * (1 - 1e-9)  # never below the run's own exact value


def test_a_malformed_given_allowlist_is_bad_input_and_a_damaged_own_one_a_failure(
        run_copy, tmp_path, capsys):
    """`audit verify --allowlist FILE` with FILE not an allowlist (not JSON, wrong version, a bad
    party id) exited 1, "verification FAILED" (and `audit report` wrote a failed report),
    while a missing FILE exited 2: the auditor's own registration is input to the audit, not
    evidence against the run. Now one error line, exit 2, nothing written; the run's own
    damaged keys/allowlist.json stays a verification failure (exit 1)."""
    from audits.cli import main

    for bad in bad_allowlists(run_copy, tmp_path).values():
        with pytest.raises(AuditError, match=r"^the allowlist= argument: allowlist (file )?\S+.*; give the "
                                             r"allowlist.json registered for the run's parties$"):
            verify_run(run_copy, allowlist=bad)
        for command in (["verify"], ["report", "--out", str(tmp_path / "report")]):
            capsys.readouterr()
            assert main(["audit", *command, str(run_copy), "--allowlist", str(bad)]) == 2
            captured = capsys.readouterr()
            assert captured.out == "" and captured.err.count("\n") == 1
            assert captured.err.startswith(f"error: --allowlist: allowlist {'file ' if 'not-JSON' in bad.name else ''}{bad}")
        assert not (tmp_path / "report").exists()
    trusted = tmp_path / "trusted.json"
    trusted.write_bytes((run_copy / "keys" / "allowlist.json").read_bytes())
    (run_copy / "keys" / "allowlist.json").write_text("{bad")
    for given in ([], ["--allowlist", str(trusted)]):
        capsys.readouterr()
        assert main(["audit", "verify", str(run_copy), *given]) == 1
        assert "[allowlist]" in capsys.readouterr().out


def test_a_missing_or_directory_given_allowlist_names_the_flag_and_what_to_give(
        run_copy, tmp_path, capsys):
    """`audit verify|report|replay --allowlist FILE` with FILE missing or a directory said
    "error: allowlist FILE does not exist", naming neither `--allowlist` nor what to give,
    unlike a FILE that is no allowlist. Now the same line for both: the flag (the argument
    in Python), what is wrong with FILE, what to give; exit 2, nothing written."""
    from audits.cli import main

    give = "; give the allowlist.json registered for the run's parties"
    for bad, problem in ((tmp_path / "missing.json", "does not exist"),
                         (tmp_path, "is a directory")):
        with pytest.raises(AuditError, match=rf"^the allowlist= argument: allowlist "
                                             rf"{re.escape(str(bad))} {problem}.*{give}$"):
            verify_run(run_copy, allowlist=bad)
        for command in (["verify"], ["report", "--out", str(tmp_path / "report")],
                        ["replay"]):
            capsys.readouterr()
            assert main(["audit", *command, str(run_copy), "--allowlist", str(bad)]) == 2
            captured = capsys.readouterr()
            assert captured.out == "" and captured.err.count("\n") == 1, captured
            assert captured.err.startswith(f"error: --allowlist: allowlist {bad} {problem}")
            assert captured.err.endswith(f"{give}\n")
        assert not (tmp_path / "report").exists() and not (run_copy / "audit").exists()


def test_a_run_of_a_method_its_own_process_registered_verifies_in_another(tmp_path, capsys):
    """A method registered by a user's script or notebook (not a module of
    secure_fedora/contrib/) ran in that process, but `audit verify RUN_DIR`, a process that
    never registered it, failed: "config.toml is not a valid config: unknown method", the
    ledgers unverified and no hint. The ledgers, signatures and budgets need only the config's
    names and privacy keys: the run now verifies, with a warning naming the entry and what
    to do to run the checks it declares; `audit report` reads the same config."""
    from audits.cli import main
    from secure_fedora.core.registry import METHODS

    METHODS.register("byo_local_x", METHODS.get("local"))
    try:
        run = build_run_dir(tmp_path / "run", methods=("fedora", "byo_local_x"))
    finally:
        METHODS.unregister("byo_local_x")  # now as in a new process
    report = verify_run(run)
    assert report.ok and not report.errors
    notes = [f.message for f in report.warnings if f.check == "config"]
    assert len(notes) == 1 and "method 'byo_local_x'" in notes[0]
    assert "secure_fedora/contrib/" in notes[0] and "audits.verify.verify_run" in notes[0]
    assert {c.method for c in report.clients} == {"fedora", "byo_local_x"}
    assert all(c.ok for c in report.clients)
    assert main(["audit", "verify", str(run)]) == 0
    out = tmp_path / "report"
    assert main(["audit", "report", str(run), "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["privacy_config"] is not None  # config.toml was read, not skipped
    # an unknown name is still refused where the config is loaded to run it
    with pytest.raises(ConfigError, match="unknown method 'byo_local_x'"):
        load_config(run / "config.toml")


def test_an_unregistered_config_entry_hint_names_import_and_import_runs_its_checks(
        tmp_path, capsys, monkeypatch):
    """verify and report take --import, which registers a method before config.toml is read,
    but the warning said only "put its module in secure_fedora/contrib/ ... or call
    audits.verify.verify_run from the process that registered it"."""
    import sys

    from audits.cli import main
    from secure_fedora.core.registry import METHODS

    METHODS.register("byo_local_y", METHODS.get("local"))
    try:
        run = build_run_dir(tmp_path / "run", methods=("fedora", "byo_local_y"))
    finally:
        METHODS.unregister("byo_local_y")  # now as in a new process
    (note,) = [f.message for f in verify_run(run).warnings if f.check == "config"]
    assert "the imports= argument of audits.verify.verify_run" in note
    assert main(["audit", "verify", str(run)]) == 0
    assert "or import its module first with --import (one you trust" in \
        " ".join(capsys.readouterr().out.split())
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "byo_local_y_module.py").write_text(
        "from secure_fedora.core.registry import METHODS\n"
        "METHODS.register('byo_local_y', METHODS.get('local'))\n")
    monkeypatch.syspath_prepend(str(trusted))
    try:  # imported first, the method is known and its config checks run, which is said
        report = verify_run(run, imports=["byo_local_y_module"])
        assert not [f for f in report.warnings if f.check in ("config", "import")]
        assert report.imported[0].entries == ["method 'byo_local_y'"]
    finally:
        METHODS.unregister("byo_local_y")
        sys.modules.pop("byo_local_y_module", None)


def test_a_claim_problem_reads_its_two_epsilons_in_their_order():
    """At rel_tol 0 a claim one part in a billion below (or above) the recorded epsilon was
    named at six significant digits: "the claim 2.93 is below the epsilon 2.93"."""
    import re

    from audits.verify import dpsgd_claim_problem, mechanism_epsilon

    entry = {"mechanism": "dpsgd", "params": {"noise_multiplier": 1.0, "sample_rate": 0.1,
                                              "steps": 10}}
    recorded = mechanism_epsilon([entry], "dpsgd", 1e-5, "rdp")
    for claim, word in ((recorded * (1 - 1e-9), "below"), (recorded * (1 + 1e-9), "exceeds")):
        text = dpsgd_claim_problem(claim, [entry], 1e-5, "rdp", 10, 0.0)
        shown, by = re.search(rf"the claim (\S+) (?:is )?{word} the epsilon (\S+) ", text).groups()
        assert (float(shown) < float(by)) if word == "below" else (float(shown) > float(by))
    # apart at six digits: as before
    assert f"the claim {recorded / 2:.6g} is below the epsilon {recorded:.6g} " in \
        dpsgd_claim_problem(recorded / 2, [entry], 1e-5, "rdp", 10)


def test_verify_reads_the_client_ids_and_summary_rows_once_not_per_ledger(pristine_run,
                                                                        monkeypatch):
    """Each ledger's check rebuilt the N-client id list (its configured budget) and scanned
    results.json's N summary rows for its own: N^2 work, about a minute at 10,000 clients per
    method. The ids and rows are read once per run and method now; the report is the same."""
    import audits.verify as verify

    before = verify_run(pristine_run)
    calls = {"ids": 0, "rows": 0}
    real_ids, real_rows = verify.client_ids, verify._anchor_rows

    def counted_ids(n):
        calls["ids"] += 1
        return real_ids(n)

    def counted_rows(results, method):
        calls["rows"] += 1
        return real_rows(results, method)

    verify._client_indices.cache_clear()
    monkeypatch.setattr(verify, "client_ids", counted_ids)
    monkeypatch.setattr(verify, "_anchor_rows", counted_rows)
    after = verify_run(pristine_run)
    assert len(after.clients) == 6  # 3 clients x 2 methods
    assert calls["ids"] <= 1 and calls["rows"] <= 2
    assert after.to_json() == before.to_json()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def absl_at_info():
    """The absl logger at INFO with a handler collecting what it lets through; its own level
    and handlers put back after the test."""
    logger = logging.getLogger("absl")
    level, handler = logger.level, _Records()
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_dp_accounting_logs_are_quiet_for_the_whole_verify(pristine_run, absl_at_info,
                                                           monkeypatch):
    """dp_accounting's absl warnings (an RDP order dropped) stay out of the audit's output, and
    the absl logger stays at ERROR from the first ledger to the last: it was set and reset
    around each accounting call, ~10 times a ledger, and each setLevel clears every logger's
    cache. Its own level is back after verify, and after a verify that raised."""
    import audits.verify as verify

    logger, handler = absl_at_info
    levels: list[int] = []
    original = verify._verify_client

    def spy(*args, **kwargs):
        levels.append(logger.level)
        logger.warning("dropping an RDP order")  # what dp_accounting logs via absl
        client = original(*args, **kwargs)
        levels.append(logger.level)
        return client
    monkeypatch.setattr(verify, "_verify_client", spy)
    report = verify_run(pristine_run)
    assert report.ok and len(levels) == 2 * len(report.clients) == 12
    assert set(levels) == {logging.ERROR}
    assert not handler.records
    assert logger.level == logging.INFO
    logger.warning("after verify")
    assert [r.getMessage() for r in handler.records] == ["after verify"]

    def boom(*args, **kwargs):
        raise RuntimeError("disk gone")
    monkeypatch.setattr(verify, "_verify_client", boom)
    with pytest.raises(RuntimeError, match="disk gone"):
        verify_run(pristine_run)
    assert logger.level == logging.INFO


def test_accounting_alone_still_quiets_and_restores_the_absl_logger(absl_at_info):
    """Outside a verify, the public accounting functions quiet absl themselves and restore it,
    nested or not."""
    import audits.verify as verify

    logger, handler = absl_at_info
    releases = [(1.2, 0.1, 5)] * 3
    with verify._quiet_dp_accounting():
        assert logger.level == logging.ERROR
        independent_epsilons(releases, 1e-5, "pld")
        assert logger.level == logging.ERROR  # the inner use does not restore INFO early
    assert logger.level == logging.INFO
    independent_epsilons(releases, 1e-5, "rdp")
    assert logger.level == logging.INFO and not handler.records


def test_a_tenseal_secret_context_inside_a_run_is_private_key_material(tmp_path, monkeypatch):
    """A CKKS secret context (TenSEAL's serialized context with its secret key) decrypts
    every ciphertext of the run's encrypted relatedness or propagation, but the scan for
    private keys inside a run knew only PEM and DER keys: such a file, under any name, passed.
    It is now found by its content; a public context is not, a file that only begins like a
    context is not. The audited files are untrusted: their protobuf fields are walked, and
    nothing of them reaches TenSEAL's deserializer (here one that would fail the test)."""
    import tenseal

    from audits.verify import private_key_files
    from privacy.ckks import context_to_bytes, create_secret_context, public_context_bytes

    secret = create_secret_context(galois_keys=False)
    found = tmp_path / "found"
    (found / "notes").mkdir(parents=True)
    (found / "notes" / "ckks.bin").write_bytes(context_to_bytes(secret, include_secret_key=True))
    (found / "notes" / "full.bin").write_bytes(secret.serialize(save_secret_key=True))
    (found / "public.bin").write_bytes(public_context_bytes(secret, galois_keys=False))
    head = context_to_bytes(secret, include_secret_key=True)[:64]
    (found / "truncated.bin").write_bytes(head)  # begins like a context, is none
    (found / "random.bin").write_bytes(os.urandom(32))  # a raw key's size: found by name only

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("an audited file was handed to TenSEAL's deserializer")

    monkeypatch.setattr(tenseal, "context_from", never)
    assert private_key_files(found) == (["notes/ckks.bin", "notes/full.bin"], [])


def test_an_exact_plan_row_must_state_the_summary_and_lambda_noise_the_ledgers_record(
        run_copy: Path) -> None:
    """Found by a hunt: results.json's plan rows state each fixed-noise release's noise
    (``"gaussian_lambda x3 (q=1.0, sigma=...)"``), which the report shows as the run's plan,
    but verify compared only DP-SGD's with the ledgers: a plan stating more lambda or summary
    noise than the ledgers record verified, re-anchored. Now each FEDORA client of that
    budget gets a results_plan error naming the mechanism; the ledgers' floats pass."""
    doc = json.loads((run_copy / "results.json").read_text())

    def plan(summary: float, lam: float) -> list[dict]:
        return [{"epsilon_budget": eps, "delta": 1e-5, "noise_multiplier": 1.2,
                 "figures": "exact",
                 "releases": ["dpsgd x20 (q=0.1)", f"gaussian_summary x1 (q=1.0, sigma={summary!r})",
                              f"gaussian_lambda x4 (q=1.0, sigma={lam!r})"]}
                for eps in (8.0, 3.0)]

    for summary, lam, flagged in ((5.0, 5.0, []), (5.0, 5.5, ["gaussian_lambda"]),
                                  (4.0, 5.0, ["gaussian_summary"])):
        doc["privacy"]["fedora"]["plan"] = plan(summary, lam)  # the fixture's ledgers: 5.0
        (run_copy / "results.json").write_text(json.dumps(doc))
        reanchor(run_copy)
        found = [f for f in verify_run(run_copy).errors if f.check == "results_plan"]
        assert sorted({f.message.split()[1] for f in found}) == flagged
        assert sorted(f.client_id for f in found) == (
            ["client-000", "client-001", "client-002"] if flagged else [])
    assert "the gaussian_summary release records noise_multiplier 5.0, results.json's plan" \
        " for its budget (epsilon 8.0, delta 1e-05) states noise_multiplier 4.0" \
        in next(f.message for f in found if f.client_id == "client-000")


def _with_choice(run: Path, edit=None) -> dict:  # type: ignore[no-untyped-def]
    """Write into ``run``'s results.json (re-anchored) the accountant choice that
    ``privacy.accountant = "auto"`` makes for FEDORA under ``run``'s config with calibrated
    noise (DP-SGD, summary and lambda: each candidate's plan differs in all three), passed
    through ``edit`` (a function of the choice's JSON, in place); return what was written."""
    import tomllib

    from privacy.accounting import PrivacyBudget
    from secure_fedora.core.config import parse_config
    from secure_fedora.secure.private import choose_accountant

    data = tomllib.loads((run / "config.toml").read_text())
    data["privacy"] = {**data["privacy"], "accountant": "auto"}
    data["privacy"].pop("noise_multiplier")
    budgets = [PrivacyBudget(8.0, 1e-5), PrivacyBudget(3.0, 1e-5)]
    choice = choose_accountant(parse_config(data), METHOD, budgets).to_json()
    if edit is not None:
        edit(choice)
    doc = json.loads((run / "results.json").read_text())
    doc["privacy"][METHOD]["accountant_choice"] = choice
    # the choice's calibrated noise is not the fixed noise the fixture's ledgers and plan
    # state: without a plan the chosen candidate's noise is held to none (a plan_coverage
    # warning says so), and the comparison rows are checked on their own
    doc["privacy"][METHOD].pop("plan")
    (run / "results.json").write_text(json.dumps(doc))
    reanchor(run)
    return choice


def _choice_findings(run: Path) -> list:  # type: ignore[type-arg]
    return [f for f in verify_run(run).findings if f.check == "accountant_choice"]


def test_the_auto_accountant_comparison_rows_recompute_from_what_results_json_records(
        run_copy: Path) -> None:
    """Found by a reviewer hunt: the comparison rows of ``accountant = "auto"`` state each
    candidate's epsilon of the plan, computed over DP-SGD, the summary and the lambda, but
    recorded only DP-SGD's noise, so no one could recompute them from results.json. Each row
    now states the plan's releases and every calibrated noise of both candidates; verify
    recomputes both epsilons with dp_accounting and they agree."""
    choice = _with_choice(run_copy)
    for row in choice["comparison"]:
        assert [r["mechanism"] for r in row["plan_releases"]] == \
            ["dpsgd", "gaussian_summary", "gaussian_lambda"]
        # 4 rounds of ceil(1 epoch / q 0.1) DP-SGD steps; one summary; a lambda per round
        assert [r["steps"] for r in row["plan_releases"]] == [40, 1, 4]
        for name in ("rdp", "pld"):
            noise = row[f"{name}_noise_by_mechanism"]
            assert sorted(noise) == ["dpsgd", "gaussian_lambda", "gaussian_summary"]
            assert noise["dpsgd"] == row[f"{name}_noise_multiplier"]  # the key scripts read
    assert _choice_findings(run_copy) == []


# Row 0 (epsilon 3.0) has more noise than row 1 (epsilon 8.0): the edits whose PLD epsilon
# no longer agrees (rechecked at the finer discretizations before the error) are made there,
# as their rechecks of row 1 take about three times as long; each row's index is named.
@pytest.mark.parametrize(("edit", "named", "index"), [
    (lambda row: row.update(pld_epsilon_of_plan=row["pld_epsilon_of_plan"] * 0.9),
     "pld_epsilon_of_plan is", 0),
    (lambda row: row.update(rdp_epsilon_of_plan=row["rdp_epsilon_of_plan"] * 1.1),
     "rdp_epsilon_of_plan is", 1),
    # more summary noise than the plan held, stated coherently: the epsilons no longer follow
    (lambda row: [r.update(noise_multiplier=r["noise_multiplier"] * 4)
                  for r in row["plan_releases"] if r["mechanism"] == "gaussian_summary"]
     and row["rdp_noise_by_mechanism"].update(
         gaussian_summary=row["rdp_noise_by_mechanism"]["gaussian_summary"] * 4),
     "rdp_epsilon_of_plan is", 0),
    # the plan's lambda noise is not the RDP-calibrated plan's it names
    (lambda row: row["plan_releases"][2].update(noise_multiplier=1.0),
     "plan_releases' gaussian_lambda noise_multiplier 1.0 is not the rdp-calibrated plan's", 1),
    (lambda row: row["plan_releases"][0].update(steps=0), "plan_releases[0] (dpsgd): steps", 1),
])
def test_a_tampered_auto_accountant_comparison_row_is_an_error_naming_row_and_key(
        run_copy: Path, edit, named: str, index: int) -> None:  # type: ignore[no-untyped-def]
    choice = _with_choice(run_copy, lambda choice: edit(choice["comparison"][index]))
    budget = choice["comparison"][index]["epsilon_budget"]
    assert budget == (3.0, 8.0)[index]
    found = _choice_findings(run_copy)
    assert found and {(f.severity, f.method) for f in found} == {("error", METHOD)}, found
    assert all(f.message.startswith(f"accountant_choice.comparison[{index}] (epsilon {budget},"
                                    " delta 1e-05): ") for f in found), found
    assert any(named in f.message for f in found), found


def test_an_auto_accountant_choice_its_rows_do_not_make_is_an_error(run_copy: Path) -> None:
    """The rows say PLD is tighter for every budget; a choice naming RDP is refused."""
    _with_choice(run_copy, lambda choice: choice.update(accountant="rdp"))
    (found,) = _choice_findings(run_copy)
    assert found.severity == "error"
    assert "accountant_choice names 'rdp', but its comparison rows choose 'pld'" in found.message


def test_comparison_rows_written_before_they_stated_their_plan_still_verify_unchecked(
        run_copy: Path) -> None:
    """A results.json written before the rows stated their releases and noises (the earlier
    keys only) still verifies: one unchecked warning says the epsilons were not recomputed
    (an error under strict)."""
    def older(choice: dict) -> None:
        for row in choice["comparison"]:
            for key in ("plan_releases", "rdp_noise_by_mechanism", "pld_noise_by_mechanism"):
                del row[key]
    _with_choice(run_copy, older)
    report = verify_run(run_copy)
    (found,) = [f for f in report.findings if f.check == "accountant_choice"]
    assert found.severity == "warning" and found.unchecked and found.method == METHOD
    assert "row(s) 0, 1 state no plan_releases" in found.message
    assert report.ok
    assert any(f.check == "accountant_choice"
               for f in verify_run(run_copy, strict=True).errors)


def _real_nonce_file(path: Path) -> None:
    """A client's replay-protection memory as a Flower node writes it: a verifier that kept
    its accepted nonces in ``path`` accepted two of the server's messages."""
    from privacy.envelope import EnvelopeVerifier, make_envelope
    from privacy.identity import Identity

    server = Identity.generate("server")
    verifier = EnvelopeVerifier({"server": server.public}, "client-001", state_path=path)
    for rnd in (1, 2):
        verifier.verify(make_envelope(server, "client-001", rnd, "model", b"w"), b"w", rnd)


@pytest.mark.parametrize("where", ["fedora", None])
def test_a_nonce_file_among_the_ledgers_is_one_clear_warning_not_a_ledger(run_copy, where):
    """A client's ``.nonces.jsonl`` copied into ``ledgers/`` was verified as the ledger of a
    client 'client-001.nonces': about a dozen generic errors (not in the allowlist, not
    canonical, missing fields, no close entry, not in the anchor) and a failed run. It is now
    one warning saying what the file is and why it does not belong there; the run's own
    ledgers verify as before."""
    folder = run_copy / "ledgers" / where if where else run_copy / "ledgers"
    _real_nonce_file(folder / "client-001.nonces.jsonl")
    report = verify_run(run_copy, allowlist=run_copy / "keys" / "allowlist.json")
    assert report.ok
    assert not any(c.client_id.endswith(".nonces") for c in report.clients)
    assert not any(f.client_id and f.client_id.endswith(".nonces") for f in report.findings)
    [noted] = [f for f in report.findings if f.check == "nonce_file"]
    assert noted.severity == "warning" and noted.method == where
    rel = f"ledgers/{where + '/' if where else ''}client-001.nonces.jsonl"
    assert noted.message.startswith(f"{rel} is a nonce state file (the replay-protection")
    assert "not a privacy ledger: it records no release" in noted.message
    assert "it does not belong in ledgers/" in noted.message


def test_a_file_named_as_a_nonce_file_that_holds_ledger_entries_is_an_error(run_copy):
    """A real ledger renamed ``<client>.nonces.jsonl`` is no nonce file: one error naming
    the line that is not a nonce record (and the ledger it replaced is missing)."""
    folder = run_copy / "ledgers" / "fedora"
    (folder / "client-001.jsonl").rename(folder / "client-001.nonces.jsonl")
    report = verify_run(run_copy)
    assert not report.ok
    [noted] = [f for f in report.findings if f.check == "nonce_file"]
    assert noted.severity == "error"
    assert "but line 1 is not a nonce record" in noted.message
    assert "find out what wrote it" in noted.message
    assert any(f.check == "missing_ledger" and f.client_id == "client-001"
               for f in report.errors)


@pytest.mark.parametrize("name,content", [("client-001.jsonl.tmp", "half a line"),
                                          ("README", "notes\n"), ("empty", "")])
def test_a_stray_file_that_is_not_jsonl_is_not_read_as_a_ledger(run_copy, name, content):
    """Only ``*.jsonl`` files in ``ledgers/`` are ledgers: a ``.tmp``, a README or an empty
    file beside them is not read and changes no finding (an empty ``*.jsonl`` is an empty
    ledger, an error)."""
    clean = [str(f) for f in verify_run(run_copy).findings]
    (run_copy / "ledgers" / "fedora" / name).write_text(content)
    assert [str(f) for f in verify_run(run_copy).findings] == clean


def test_a_nonce_file_with_a_torn_last_line_is_still_a_nonce_file(run_copy):
    """A node killed while appending to its nonce file leaves a last line without its
    newline, which the node drops when it reads the file: a copy of it is the same warning,
    and a line that is no nonce record (here: nested past JSON's recursion limit) an error."""
    path = run_copy / "ledgers" / "fedora" / "client-001.nonces.jsonl"
    _real_nonce_file(path)
    with path.open("a") as fh:
        fh.write('{"s": "server", "r": 3, "n"')
    [noted] = [f for f in verify_run(run_copy).findings if f.check == "nonce_file"]
    assert noted.severity == "warning"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    [noted] = [f for f in verify_run(run_copy).findings if f.check == "nonce_file"]
    assert noted.severity == "error" and "line 1 is not a nonce record" in noted.message
