"""``deploy local --print-commands``: the commands it prints are the ones ``deploy local`` runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from privacy.identity import IdentityError, allowlist_bytes, load_allowlist
from secure_fedora.core.config import config_document
from secure_fedora.runtimes import summary
from secure_fedora.runtimes.flower import local, server_app
from secure_fedora.runtimes.flower.certs import CertificateError
from secure_fedora.runtimes.flower.cli import register
from secure_fedora.runtimes.flower.processes import ManagedProcess
from secure_fedora.runtimes.flower.protocol import DeployError
from tests.secure_fedora.runtimes.flower.deploy_support import dp_config, file_tree


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser


RUN_ID = 77


def _record_instead_of_running(monkeypatch: pytest.MonkeyPatch, ran: list[str]) -> None:
    """Every process `deploy local` starts and every flwr call it makes is recorded as the
    shell line a process's log records, and answered as Flower would, without running it."""

    class Recorded(ManagedProcess):
        def start(self) -> ManagedProcess:
            ran.append(self.shell_line())
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # what the SuperLink and a SuperNode log once ready
            self.log_path.write_text(f"=== start {self.name}\n{local.SUPERLINK_SERVING}\n"
                                     "SuperNode ID: 1\n")
            return self

        def running(self) -> bool:
            return self.name != "serverapp"  # the run's log stream ends: the run is over

        def refresh_descendants(self) -> list[int]:
            return []

        def stop(self, grace: float = 5.0, hard: bool = False) -> None:
            pass

    def flwr_call(command: list[str], *, env: dict[str, str], cwd: Path,
                  **_: Any) -> subprocess.CompletedProcess[str]:
        ran.append(ManagedProcess("flwr", command, cwd / "unused", env, cwd).shell_line())
        doc: dict[str, Any] = {"success": True, "node-id": 1, "run-id": str(RUN_ID),
                               "runs": [{"status": "finished:completed"}]}
        if command[1] == "run":
            (cwd / "results" / "results.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0, json.dumps(doc), "")

    # the same ports each time (a deployment chooses free ones at each start)
    monkeypatch.setattr(local, "free_ports", lambda n: list(range(30000, 30000 + n)))
    monkeypatch.setattr(local, "ManagedProcess", Recorded)
    monkeypatch.setattr(local.subprocess, "run", flwr_call)
    monkeypatch.setattr(local.socket, "create_connection", lambda *a, **k: contextlib.nullcontext())


def test_printed_commands_are_the_ones_deploy_local_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`deploy local --print-commands` starts nothing, writes what the commands read
    (certificates, node keys, identities, the CLI's connection, run.toml) and prints, in
    order, exactly the commands `deploy local` with the same flags runs (the run id, known
    once submitted, written RUN_ID); run.toml is the one the deployment submits."""
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(config_document(dp_config())))
    work = tmp_path / "w"
    flags = ["--config", str(config), "--workdir", str(work), "--max-in-flight", "2",
             "--full-client-errors", "1", "--threads", "2"]
    ran: list[str] = []
    _record_instead_of_running(monkeypatch, ran)

    args = _parser().parse_args(["deploy", "local", *flags, "--print-commands"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert ran == [], "--print-commands started or called something"
    for path in ("certs/ca.crt", "certs/server.crt", "certs/server.key", "keys/node-2",
                 "keys/node-2.pub", "identities/server/allowlist.json",
                 "identities/client-002/client-002.ed25519.key", "flwr/cli/config.toml",
                 "run.toml"):
        assert (work / path).is_file(), path
    submitted = (work / "run.toml").read_bytes()
    assert len(printed) == 1 + 3 + 3 + 3
    assert "flower-superlink" in printed[0] and "--enable-supernode-auth" in printed[0]
    assert all(" supernode register " in line for line in printed[1:4])
    assert all("flower-supernode" in line for line in printed[4:7])
    assert "client-errors=\"full\"" in printed[5] and "client-errors" not in printed[4]
    assert " run " in printed[7] and " log RUN_ID " in printed[8] and "--run-id RUN_ID" in printed[9]

    args = _parser().parse_args(["deploy", "local", *flags])
    monkeypatch.setattr(summary, "print_run_summary", lambda *a: None)  # no results to show
    assert args.func(args) == 0
    executed = [line.replace(f" {RUN_ID} ", " RUN_ID ") for line in ran]
    # the three SuperNode registrations run concurrently: in any order among themselves
    assert executed[:1] + sorted(executed[1:4]) + executed[4:] \
        == printed[:1] + sorted(printed[1:4]) + printed[4:]
    assert (work / "run.toml").read_bytes() == submitted


def test_print_commands_refuses_what_deploy_local_refuses(tmp_path: Path) -> None:
    """The checks of `deploy local` come first: a used workdir or a client index outside the
    run is refused, naming it, and nothing is written."""
    cfg = dp_config()
    with pytest.raises(DeployError, match=r"full client errors name clients \[3\]"):
        local.local_commands(cfg, 3, tmp_path / "fresh", full_client_errors=[3])
    assert not (tmp_path / "fresh").exists()
    used = tmp_path / "used"
    (used / "results").mkdir(parents=True)
    (used / "results" / "results.json").write_text("{}")
    with pytest.raises(DeployError, match="holds an earlier deployment"):
        local.local_commands(cfg, 3, used)
    assert sorted(p.name for p in used.iterdir()) == ["results"]


def test_print_commands_with_client_public_keys_writes_no_client_private_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--client-public-keys`: the clients made their identities on their own hosts; the
    workdir receives the server's identity only, with the allowlist of it and the clients'
    public keys, which each client installs (with encrypted relatedness: checking the key
    holder's entry against its file, as the printed advice says); a missing client's file is
    refused before anything is written, and the flag without --print-commands is refused."""
    from privacy.identity import client_ids, init_party, install_allowlist, load_allowlist

    config = tmp_path / "c.toml"
    document = config_document(dp_config())
    document["fedora"].update(relatedness="noised+encrypted", k=1)
    config.write_text(tomli_w.dumps(document))
    hosts = tmp_path / "hosts"
    pubs = {cid: init_party(hosts / cid, cid) for cid in client_ids(3)}
    files = [str(f) for _, f in pubs.values()]
    work = tmp_path / "w"
    flags = ["deploy", "local", "--config", str(config), "--workdir", str(work)]
    args = _parser().parse_args([*flags, "--print-commands", "--client-public-keys", *files[:2]])
    with pytest.raises(IdentityError, match="no public key file of client-002"):
        args.func(args)
    assert not work.exists()
    args = _parser().parse_args([*flags, "--client-public-keys", *files])
    with pytest.raises(DeployError, match="goes with --print-commands"):
        args.func(args)
    assert not work.exists()
    args = _parser().parse_args([*flags, "--print-commands", "--key-holder", "1",
                                 "--client-public-keys", *files])
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert len(printed.out.splitlines()) == 1 + 3 + 3 + 3
    assert "keys install DIR ALLOWLIST --key-holder client-001.public.json" in " ".join(
        printed.err.split())
    assert sorted(p.name for p in (work / "identities").iterdir()) == ["server"]
    assert not list(work.rglob("client-*.key"))
    allowlist = work / "identities" / "server" / "allowlist.json"
    listed = load_allowlist(allowlist)
    assert sorted(listed) == [*client_ids(3), "server"]
    assert all(listed[cid] == pub for cid, (pub, _) in pubs.items())
    for cid in client_ids(3):
        assert install_allowlist(hosts / cid, allowlist, files[1]) == (cid, False)
    run_toml = (work / "run.toml").read_text()
    assert str(work / "identities" / "server") in run_toml


def _own_public_files(tmp_path: Path, n: int = 3) -> tuple[Path, list[str]]:
    """A config of ``n`` clients and the public key files of identities each client made
    itself (`keys party` on its own host, here under tmp_path/hosts)."""
    from privacy.identity import client_ids, init_party

    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps(config_document(dp_config())))
    return config, [str(init_party(tmp_path / "hosts" / cid, cid)[1]) for cid in client_ids(n)]


def test_client_public_keys_supernode_lines_name_the_nodes_own_identity_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --client-public-keys the SuperNode lines named WORKDIR/identities/client-NNN,
    which that mode does not write, while every line is said to run as printed: they name
    NODE_IDENTITY_DIR, the directory each client made on its own host (README step 5)."""
    config, files = _own_public_files(tmp_path)
    work = tmp_path / "w"
    args = _parser().parse_args(["deploy", "local", "--config", str(config), "--workdir",
                                 str(work), "--print-commands", "--client-public-keys", *files])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.splitlines()
    nodes = [line for line in printed if "flower-supernode" in line]
    assert len(nodes) == 3
    assert all(f'identity-dir="{local.NODE_IDENTITY_DIR}"' in line for line in nodes)
    assert "identities/client-" not in "\n".join(printed)
    assert str(work / "identities" / "server") in (work / "run.toml").read_text()


def test_print_commands_help_names_each_placeholder_of_the_printed_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The help of --print-commands said each printed line "runs as printed", while with
    --client-public-keys the SuperNode lines hold NODE_IDENTITY_DIR and the flwr log / ls
    lines RUN_ID, both to be replaced: it names each placeholder the lines hold and where
    its value comes from."""
    config, files = _own_public_files(tmp_path)
    args = _parser().parse_args(["deploy", "local", "--config", str(config), "--workdir",
                                 str(tmp_path / "w"), "--print-commands",
                                 "--client-public-keys", *files])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    with pytest.raises(SystemExit):
        _parser().parse_args(["deploy", "local", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "each line runs as printed" not in help_text
    assert "Two placeholders must be replaced before a line runs" in help_text
    for placeholder, where in ((local.NODE_IDENTITY_DIR, "flower-supernode"),
                               ("RUN_ID", "flwr log")):
        assert any(placeholder in line for line in printed.splitlines() if where in line)
        assert f"{placeholder}, in " in help_text


def test_client_public_keys_refuses_a_workdir_holding_client_private_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier --print-commands without --client-public-keys wrote every client's private
    keys under identities/; a later one with it left them there beside the server's
    identity: refused, naming them and what to do, nothing written; once they are deleted it
    goes on (the server's identity kept)."""
    config, files = _own_public_files(tmp_path)
    flags, work = _printed_workdir(tmp_path, config)
    before = file_tree(work)
    args = _parser().parse_args([*flags, "--client-public-keys", *files])
    with pytest.raises(DeployError, match=r"holds client-000, client-001, client-002 beside "
                                          r"the server's identity.*delete those directories"):
        args.func(args)
    assert file_tree(work) == before
    server_key = (work / "identities" / "server" / "server.ed25519.key").read_bytes()
    for cid in ("client-000", "client-001", "client-002"):
        shutil.rmtree(work / "identities" / cid)
    assert args.func(args) == 0
    capsys.readouterr()
    assert (work / "identities" / "server" / "server.ed25519.key").read_bytes() == server_key
    assert not list(work.rglob("client-*.key"))


def test_client_public_keys_on_resume_refuses_another_allowlist(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--print-commands --resume --client-public-keys rewrote the server's allowlist.json
    without a word, with whatever client keys were given, while the resumed run's envelopes
    and ledgers are signed with the keys it started with: another client key (client-001
    made new keys) is refused naming the client, nothing written; the run's own files
    resume; a workdir without the run's allowlist is refused."""
    from privacy.identity import init_party

    config, files = _own_public_files(tmp_path)
    flags, work = _printed_workdir(tmp_path, config, files)
    # a resumable run of this workdir (its checkpoint checks are deploy local's, tested apart)
    monkeypatch.setattr(local, "_resumed_run", lambda work, cfg: (7, cfg, []))
    allowlist = work / "identities" / "server" / "allowlist.json"
    run_allowlist = allowlist.read_bytes()
    init_party(tmp_path / "hosts" / "client-001", "client-001", overwrite=True)
    before = file_tree(work)
    args = _parser().parse_args([*flags, *files, "--resume"])
    with pytest.raises(server_app.ResumeRefused,
                       match=r"differs from .*allowlist.json, the run's, for client-001:"):
        args.func(args)
    assert file_tree(work) == before
    # the run's own keys: resumed, its allowlist as it was
    (tmp_path / "run-keys").mkdir()
    old = tmp_path / "run-keys" / "client-001.public.json"
    old.write_bytes(allowlist_bytes({"client-001": load_allowlist(allowlist)["client-001"]}))
    args = _parser().parse_args([*flags, files[0], str(old), files[2], "--resume"])
    assert args.func(args) == 0
    capsys.readouterr()
    assert allowlist.read_bytes() == run_allowlist
    allowlist.unlink()
    with pytest.raises(server_app.ResumeRefused, match="allowlist.json does not exist"):
        args.func(args)
    assert not allowlist.exists()


def test_client_public_keys_checks_everything_before_writing_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The allowlist was checked with a stand-in for the server's key before the certificates
    and node keys were rewritten, and with the kept key only after: a client file holding the
    server's public key, or a server directory holding files but no key, was refused once the
    workdir's certificates had been replaced. Both are refused with every file as it was."""
    from privacy.identity import PublicIdentity, load_identity

    config, files = _own_public_files(tmp_path)
    flags, work = _printed_workdir(tmp_path, config, files)
    capsys.readouterr()
    server = load_identity(work / "identities" / "server", "server").public
    copied = tmp_path / "copied" / "client-002.public.json"
    copied.parent.mkdir()
    copied.write_bytes(allowlist_bytes({"client-002": PublicIdentity(
        "client-002", server.verify_key, server.agreement_key)}))
    before = file_tree(work)
    args = _parser().parse_args([*flags, *files[:2], str(copied)])
    with pytest.raises(IdentityError, match="hold the same public key"):
        args.func(args)
    assert file_tree(work) == before

    for key in (work / "identities" / "server").glob("server.*.key"):
        key.unlink()  # a server directory left with public files only
    before = file_tree(work)
    args = _parser().parse_args([*flags, *files])
    with pytest.raises(IdentityError, match=r"holds allowlist.json, server.ed25519.pub.* but "
                                            r"no server.ed25519.key"):
        args.func(args)
    assert file_tree(work) == before


def test_the_server_allowlist_is_public(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The server's allowlist.json, copied to every host, is written 0644 as every other
    allowlist.json (it was 0600)."""
    config, files = _own_public_files(tmp_path)
    work = tmp_path / "w"
    args = _parser().parse_args(["deploy", "local", "--config", str(config), "--workdir",
                                 str(work), "--print-commands", "--client-public-keys", *files])
    assert args.func(args) == 0
    capsys.readouterr()
    assert (work / "identities" / "server" / "allowlist.json").stat().st_mode & 0o777 == 0o644



def _printed_workdir(tmp_path: Path, config: Path | None = None,
                     client_files: list[str] | None = None) -> tuple[list[str], Path]:
    """The workdir ``tmp_path/w`` after a first `deploy local --print-commands` of ``config``
    (a DP config written by default), with `--client-public-keys CLIENT_FILES` when given: the
    command's arguments (the files left out) and the workdir."""
    if config is None:
        config = tmp_path / "c.toml"
        config.write_text(tomli_w.dumps(config_document(dp_config())))
    work = tmp_path / "w"
    flags = ["deploy", "local", "--config", str(config), "--workdir", str(work),
             "--print-commands", *(["--client-public-keys"] if client_files is not None else [])]
    args = _parser().parse_args([*flags, *(client_files or [])])
    assert args.func(args) == 0
    return flags, work


def _damage_identities(ids: Path, damage: str) -> str:
    """Damage the identities of a workdir as ``damage`` names; returns what the refusal names."""
    from privacy.identity import init_keys

    if damage == "moved away":
        shutil.move(ids, ids.with_name("identities.bak"))
        return f"{ids} does not exist"
    if damage == "party directory":
        shutil.rmtree(ids / "client-001")
        return f"{ids / 'client-001'} does not exist"
    if damage == "private key":
        (ids / "client-002" / "client-002.x25519.key").unlink()
        return f"{ids / 'client-002'} lacks client-002.x25519.key"
    if damage == "allowlist":
        (ids / "server" / "allowlist.json").unlink()
        return f"{ids / 'server'} lacks allowlist.json"
    assert damage == "new keys"  # a party's keys made again: the allowlists name the old ones
    init_keys(ids / "client-000", ["client-000"], overwrite=True)
    return f"{ids / 'client-001' / 'allowlist.json'} does not list the keys on disk for client-000"


@pytest.mark.parametrize("damage", ["moved away", "party directory", "private key",
                                    "allowlist", "new keys"])
def test_print_commands_resume_never_makes_new_identities(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        damage: str) -> None:
    """`--print-commands --resume` in a workdir whose identities/ was moved away, or lost a
    party's directory, a private key or an allowlist, made new party keys (or kept keys no
    allowlist lists), while the run's envelopes and ledgers are signed with the old ones:
    refused, naming what is missing and the remedy, with the workdir byte for byte as it
    was; the run's own identities resume, kept as they are."""
    flags, work = _printed_workdir(tmp_path)
    # a resumable run of this workdir (its checkpoint checks are deploy local's, tested apart)
    monkeypatch.setattr(local, "_resumed_run", lambda work, cfg: (7, cfg, []))
    args = _parser().parse_args([*flags, "--resume"])
    ids = work / "identities"
    identities = file_tree(ids)
    assert args.func(args) == 0
    capsys.readouterr()
    assert file_tree(ids) == identities

    named = _damage_identities(ids, damage)
    before = file_tree(tmp_path)
    with pytest.raises(DeployError, match="--resume: the run's identities under") as err:
        args.func(args)
    assert named in str(err.value)
    assert "restore the directory from a backup" in str(err.value)
    assert "fresh workdir, without --resume" in str(err.value)
    assert file_tree(tmp_path) == before


def test_print_commands_resume_with_client_public_keys_refuses_a_lost_server_identity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--print-commands --resume --client-public-keys` in a workdir whose server identity
    is gone would make a new server key: refused, naming it, the workdir byte for byte as it
    was."""
    config, files = _own_public_files(tmp_path)
    flags, work = _printed_workdir(tmp_path, config, files)
    capsys.readouterr()
    monkeypatch.setattr(local, "_resumed_run", lambda work, cfg: (7, cfg, []))
    shutil.rmtree(work / "identities" / "server")
    before = file_tree(tmp_path)
    args = _parser().parse_args([*flags, *files, "--resume"])
    with pytest.raises(DeployError, match=r"server\.ed25519\.key does not exist"):
        args.func(args)
    assert file_tree(tmp_path) == before


def test_print_commands_resume_refuses_a_workdir_without_a_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--print-commands --resume` in a workdir that holds no run (here only what an earlier
    --print-commands wrote, no checkpoint) is refused, saying so, with nothing written."""
    flags, work = _printed_workdir(tmp_path)
    capsys.readouterr()
    before = file_tree(tmp_path)
    args = _parser().parse_args([*flags, "--resume"])
    with pytest.raises(DeployError, match="holds no run to resume"):
        args.func(args)
    assert file_tree(tmp_path) == before


def _break_identities(ids: Path, damage: str) -> str:
    """Leave the identities of a workdir partly there as ``damage`` names; returns what the
    refusal names (the party's directory or file)."""
    if damage == "allowlist":
        (ids / "client-001" / "allowlist.json").unlink()
        return f"{ids / 'client-001'} lacks allowlist.json"
    if damage == "party directory":
        shutil.rmtree(ids / "client-002")
        return f"{ids / 'client-002'} does not exist"
    if damage == "private key":
        (ids / "server" / "server.ed25519.key").unlink()
        return f"{ids / 'server'} lacks server.ed25519.key"
    assert damage == "a file"
    shutil.rmtree(ids)
    ids.write_text("not identities")
    return f"{ids} is not a directory"


@pytest.mark.parametrize("damage", ["allowlist", "party directory", "private key", "a file"])
def test_a_new_deployment_refuses_partial_identities_before_writing_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    """Without --resume, identity directories lacking an allowlist were refused only after the
    certificates, node keys and the CLI's connection had been rewritten; a party's missing
    private key was not noticed (the identities were kept by their allowlists alone), and
    identities/ that is a file ended in a FileExistsError. Each is refused naming the party's
    directory or file, the workdir byte for byte as it was; intact identities are kept."""
    flags, work = _printed_workdir(tmp_path)
    ids = work / "identities"
    identities = file_tree(ids)
    args = _parser().parse_args(flags)
    assert args.func(args) == 0  # all there: kept as they are
    capsys.readouterr()
    assert file_tree(ids) == identities

    named = _break_identities(ids, damage)
    before = file_tree(tmp_path)
    with pytest.raises(DeployError, match=r"the identities under .* are incomplete") as err:
        args.func(args)
    assert named in str(err.value)
    assert "nothing was written" in str(err.value)
    assert file_tree(tmp_path) == before


def _misplace(work: Path, damage: str) -> str:
    """Put a file where the deployment writes a folder (or a folder where it writes a file);
    returns what the refusal names."""
    if damage == "node key a directory":
        (work / "keys" / "node-2.pub").unlink()
        (work / "keys" / "node-2.pub").mkdir()
        return f"{work / 'keys' / 'node-2.pub'} exists and is not a regular file"
    if damage == "keys a file":
        shutil.rmtree(work / "keys")
        (work / "keys").write_text("not keys")
        return "is not a directory"
    if damage == "flwr/cli a file":
        shutil.rmtree(work / "flwr" / "cli")
        (work / "flwr" / "cli").write_text("not a folder")
        return f"{work / 'flwr' / 'cli'} (of the workdir) exists and is not a directory"
    if damage == "results a file":
        shutil.rmtree(work / "results")
        (work / "results").write_text("not a folder")
        return f"{work / 'results'} (of the workdir) exists and is not a directory"
    assert damage == "run.toml a directory"
    (work / "run.toml").unlink()
    (work / "run.toml").mkdir()
    return f"{work / 'run.toml'} (of the workdir) exists and is not a regular file"


@pytest.mark.parametrize("damage", ["node key a directory", "keys a file", "flwr/cli a file",
                                    "results a file", "run.toml a directory"])
def test_print_commands_refuses_a_misplaced_file_before_writing_anything(
        tmp_path: Path, damage: str) -> None:
    """A node key that is a directory, keys/ or flwr/cli/ that is a file, or results/ or
    run.toml of the wrong kind was met only once the certificates (and node keys, the CLI's
    connection) had been rewritten, some as an OSError; each is refused first, naming the
    path, the workdir byte for byte as it was."""
    flags, work = _printed_workdir(tmp_path)
    named = _misplace(work.resolve(), damage)
    before = file_tree(tmp_path)
    args = _parser().parse_args(flags)
    with pytest.raises((DeployError, CertificateError)) as err:
        args.func(args)
    assert named in str(err.value)
    assert file_tree(tmp_path) == before


def test_identities_made_for_more_clients_are_refused_naming_the_extra_parties(
        tmp_path: Path) -> None:
    """Identities made for three clients, deployed with two: every allowlist names a party the
    deployment does not have (it would accept that party's key). Refused naming the extra party
    and why, not as keys the allowlist "does not list", with nothing written; with three
    clients again they are kept."""
    ids = tmp_path / "identities"
    local.init_party_identities(ids, 3)
    before = file_tree(tmp_path)
    with pytest.raises(DeployError, match="lists parties this deployment does not have: "
                                          r"client-002 \(identities made for another number"):
        local.check_new_party_identities(ids, 2)
    assert file_tree(tmp_path) == before
    assert local.check_new_party_identities(ids, 3)


@pytest.mark.parametrize("flag", ["--config", "--client-public-keys"])
def test_a_missing_file_given_to_deploy_local_names_its_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """`deploy local --config FILE` / `--client-public-keys FILE` with FILE missing: one line
    naming the flag and the path (exit 2), before any workdir is made."""
    from secure_fedora.cli import main

    missing, work = tmp_path / "missing.toml", tmp_path / "work"
    argv = ["deploy", "local", "--print-commands", "--workdir", str(work), flag, str(missing)]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{flag}: " in err[0] and f"{missing} does not exist" in err[0]
    assert not work.exists()
