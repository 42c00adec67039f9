"""Each party makes its own identity on its own host (`keys party`), the operator assembles
the allowlist from the public key files (`keys allowlist`) and each party installs it (`keys
install`): the Flower apps run with such identity directories as with `deploy local`'s, and
an allowlist lacking a party or listing another key fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from audits.verify import verify_run
from privacy.identity import client_ids, load_identity
from privacy.ledger import verify_ledger_file
from secure_fedora.cli import main
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import DeployError, RunSettings, make_run_config
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    audit_folder,
    dp_config,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)

PARTIES = ["server", *client_ids(3)]


def _own_identities(root: Path, capsys: pytest.CaptureFixture[str]) -> list[Path]:
    """Every party's identity made as on its own host; returns the public key files."""
    public = []
    for party in PARTIES:
        assert main(["keys", "party", str(root / party), "--party", party]) == 0
        out = capsys.readouterr().out
        public.append(root / party / f"{party}.public.json")
        assert json.loads(out[out.index("{"):]) == json.loads(public[-1].read_text())
        # only this party's keys, private ones 0600 in a 0700 directory, no allowlist yet
        assert (root / party).stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in (root / party).iterdir()) == sorted(
            f"{party}.{s}" for s in ("ed25519.key", "x25519.key", "ed25519.pub", "x25519.pub",
                                     "public.json"))
        assert (root / party / f"{party}.ed25519.key").stat().st_mode & 0o777 == 0o600
    return public


def _run_config(tmp_path: Path, connect_timeout: float = 300.0,
                round_timeout: float = 30.0) -> dict:
    cfg = dp_config()
    return make_run_config(cfg, None, identity_dir=tmp_path / "ids" / "server",
                           server_state_dir=tmp_path / "server", round_timeout=round_timeout,
                           poll_interval=0.01, connect_timeout=connect_timeout
                           ) | {"result-dir": str(tmp_path / "res")}


@pytest.mark.usefixtures("task_identity")
def test_a_dp_run_with_identities_each_party_made_itself_verifies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The server and every client sign with the keys their own `keys party` made; each
    client's ledger verifies under its own key, and the audit under the assembled allowlist."""
    ids = tmp_path / "ids"
    public = _own_identities(ids, capsys)
    allowlist = tmp_path / "operator" / "allowlist.json"
    allowlist.parent.mkdir()
    assert main(["keys", "allowlist", str(allowlist), *map(str, public), "--clients", "3"]) == 0
    for party in PARTIES:
        assert main(["keys", "install", str(ids / party), str(allowlist)]) == 0
    rc = _run_config(tmp_path)
    results = server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                        RunSettings.from_run_config(rc), 42)
    assert results["events"] == []
    for c, cid in enumerate(client_ids(3)):
        ledger = tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / "fedora" / f"{cid}.jsonl"
        key = load_identity(ids / cid, cid).signing_key.public_key()
        assert verify_ledger_file(ledger, key) == []
    report = verify_run(audit_folder(tmp_path), allowlist=allowlist,
                        anchor=tmp_path / "res" / "anchor.json")
    assert report.errors == [], report.errors


@pytest.mark.usefixtures("task_identity")
def test_an_allowlist_lacking_a_party_or_listing_another_key_fails_clearly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An allowlist assembled without client-002 stops the ServerApp before any message,
    naming client-002; a client whose allowlist lists an older key of its own (it made new
    keys after the allowlist was assembled, and the old allowlist was copied over by hand)
    stops the run at the first contact, naming the client, instead of its messages being
    rejected one by one."""
    ids = tmp_path / "ids"
    public = _own_identities(ids, capsys)
    partial = tmp_path / "partial.json"
    assert main(["keys", "allowlist", str(partial), *map(str, public[:-1])]) == 0
    assert main(["keys", "allowlist", str(tmp_path / "x.json"), *map(str, public[:-1]),
                 "--clients", "3"]) == 2
    assert "no public key file of client-002 (3 clients)" in capsys.readouterr().err
    for party in PARTIES[:-1]:
        assert main(["keys", "install", str(ids / party), str(partial)]) == 0
    rc = _run_config(tmp_path)
    with pytest.raises(DeployError, match="lacks parties of this federation: client-002"):
        server_app.run_federation(InMemoryGrid(tmp_path / "nodes", rc, 3),  # type: ignore[arg-type]
                                  RunSettings.from_run_config(rc), 42)

    full = tmp_path / "full.json"
    assert main(["keys", "allowlist", str(full), *map(str, public)]) == 0
    capsys.readouterr()
    # client-001 makes new keys: its allowlist is removed, and installing the old one refused
    assert main(["keys", "party", str(ids / "client-001"), "--party", "client-001",
                 "--force"]) == 0
    assert not (ids / "client-001" / "allowlist.json").exists()
    for party in PARTIES:
        assert main(["keys", "install", str(ids / party), str(full)]) == (
            2 if party == "client-001" else 0)
    assert "lists other public keys for client-001" in capsys.readouterr().err
    shutil.copyfile(full, ids / "client-001" / "allowlist.json")  # copied by hand anyway
    rc = _run_config(tmp_path / "second", connect_timeout=0.5, round_timeout=1.0)
    rc["identity-dir"] = str(ids / "server")
    grid = InMemoryGrid(tmp_path / "nodes2", rc, 3)
    with pytest.raises(DeployError, match=r"missing clients \[1\].*query.hello failed"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    # the client's own log says why (the server is sent the error's class only)
    assert {c for c, _, _ in grid.errors} == {1}
    assert "lists other public keys for client-001 than its identity directory holds" in str(
        grid.errors[0][2])


def test_keys_allowlist_without_clients_refuses_a_gap_naming_the_missing_client(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --clients, the server's and client-001's files made an allowlist: a federation
    whose client-000 no allowlist could list. Now refused, naming client-000, nothing
    written; a set without gaps still needs no --clients."""
    from privacy.identity import init_party, load_allowlist

    public = {p: init_party(tmp_path / p, p)[1] for p in ("server", "client-000", "client-001")}
    out = tmp_path / "allowlist.json"
    assert main(["keys", "allowlist", str(out), str(public["server"]),
                 str(public["client-001"])]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no public key file of client-000 was given, though client-001's was" in err
    assert not out.exists()
    assert main(["keys", "allowlist", str(out), *map(str, public.values())]) == 0
    assert sorted(load_allowlist(out)) == sorted(public)


def test_keys_party_force_warns_that_the_old_identity_is_gone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keys party --force` replaced a party's keys and deleted its allowlist, printing only
    "wrote the identity": a run in progress on that node cannot go on, and its old ledgers
    verify only against the old allowlist."""
    directory = tmp_path / "client-000"
    assert main(["keys", "party", str(directory), "--party", "client-000"]) == 0
    assert "warning" not in capsys.readouterr().err
    old = (directory / "client-000.ed25519.pub").read_bytes()
    assert main(["keys", "party", str(directory), "--party", "client-000", "--force"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: replaced the identity of client-000" in err
    assert "verify only against an allowlist copy that lists the old key" in err
    assert (directory / "client-000.ed25519.pub").read_bytes() != old


def test_keys_allowlist_writes_a_public_file_readable_by_all(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`keys allowlist OUT` wrote OUT 0600 (the atomic writer's temporary file), though it is
    public and copied to every host: 0644, as `keys install` and `keys party` write public
    files; replacing it with --force keeps 0644."""
    public = _own_identities(tmp_path / "ids", capsys)
    out = tmp_path / "allowlist.json"
    assert main(["keys", "allowlist", str(out), *map(str, public)]) == 0
    assert out.stat().st_mode & 0o777 == 0o644
    assert main(["keys", "allowlist", str(out), *map(str, public), "--force"]) == 0
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.usefixtures("task_identity")
def test_a_node_given_another_partys_identity_directory_names_whose_it_holds(
    tmp_path: Path,
) -> None:
    """A SuperNode started with client-001's identity directory for partition 0 (a pasted
    command) stops the run at its first contact, and its own log names the identity the
    directory holds and the one the node needs, not only a missing key file."""
    rc = run_config(dp_config(), tmp_path, **{"connect-timeout": 0.5, "round-timeout": 1.0})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    ids = Path(rc["identity-dir"]).parent
    grid.node_config[1000]["identity-dir"] = str(ids / "client-001")
    with pytest.raises(DeployError, match=r"missing clients \[0\].*query.hello failed"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert {c for c, _, _ in grid.errors} == {0}
    message = str(grid.errors[0][2])
    assert "holds the identity of client-001, not of client-000 (partition-id=0)" in message
    assert "point identity-dir at client-000's own identity directory" in message
