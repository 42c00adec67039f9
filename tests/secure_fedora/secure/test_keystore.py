"""Key stores: a DP run's private keys live outside its run directory."""

import re
from pathlib import Path

import pytest

from privacy.identity import IdentityError, load_allowlist, load_identity
from secure_fedora.secure.keystore import (
    CLI_KEYSTORE_OPTION,
    KEYSTORE_HOME_ENV,
    check_public_keys,
    ensure_keystore,
    publish_public_keys,
    resolve_keystore,
    run_party_ids,
)
from tests.fifo_support import NOT_REGULAR_KINDS, not_a_regular_file


def test_store_is_created_private_and_extended_without_touching_existing_keys(tmp_path):
    store = tmp_path / "home" / "exp"
    first = ensure_keystore(store, run_party_ids(2))
    assert first.created and store.stat().st_mode & 0o777 == 0o700
    assert (store / "operator.ed25519.key").stat().st_mode & 0o777 == 0o600
    before = (store / "client-001.ed25519.key").read_bytes()
    assert first.added == ()  # created, not extended
    again = ensure_keystore(store, run_party_ids(4))
    assert not again.created and again.added == ("client-002", "client-003")
    assert ensure_keystore(store, run_party_ids(3)).added == ()  # held every party
    assert (store / "client-001.ed25519.key").read_bytes() == before  # kept, not regenerated
    assert set(load_allowlist(store / "allowlist.json")) == set(run_party_ids(4))
    load_identity(store, "client-003")
    # key files of a party the allowlist does not know are never overwritten
    (store / "client-005.ed25519.key").write_text("stray")
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        ensure_keystore(store, run_party_ids(6))
    (tmp_path / "file").write_text("x")
    with pytest.raises(IdentityError, match="not a directory"):
        ensure_keystore(tmp_path / "file", run_party_ids(1))


def test_a_refused_store_is_left_as_it_was(tmp_path):
    """A store made without a lock file (by an earlier version, or by hand) holding a stray
    key file was refused only after its .lock was created: the refusal left a file behind.
    Refused now before anything is made; the same store without the stray file extends."""
    from privacy.identity import init_keys

    store = tmp_path / "store"
    init_keys(store, run_party_ids(2))
    (store / "client-002.ed25519.key").write_text("stray")
    before = {f.name: f.read_bytes() for f in store.iterdir()}
    with pytest.raises(IdentityError, match="client-002.ed25519.key; refusing to overwrite"):
        ensure_keystore(store, run_party_ids(3))
    assert {f.name: f.read_bytes() for f in store.iterdir()} == before
    (store / "client-002.ed25519.key").unlink()
    assert ensure_keystore(store, run_party_ids(3)).added == ("client-002",)


def test_resolution_order_and_default_outside_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(KEYSTORE_HOME_ENV, str(tmp_path / "stores"))
    assert resolve_keystore("exp") == ((tmp_path / "stores" / "exp").absolute(), "default")
    assert resolve_keystore("exp", "cfg/ks") == (Path("cfg/ks").absolute(), "config")
    assert resolve_keystore("exp", "cfg/ks", tmp_path / "flag") == (tmp_path / "flag", "--keystore")
    monkeypatch.delenv(KEYSTORE_HOME_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_keystore("exp")[0] == tmp_path / "xdg" / "secure-fedora" / "keystore" / "exp"


def test_publish_copies_public_keys_only(tmp_path):
    store = tmp_path / "store"
    ensure_keystore(store, run_party_ids(3))
    run_keys = tmp_path / "run" / "keys"
    published = publish_public_keys(store, run_keys, run_party_ids(2))
    assert set(published) == set(run_party_ids(2))
    assert not list(run_keys.glob("*.key"))
    assert set(load_allowlist(run_keys / "allowlist.json")) == set(run_party_ids(2))
    assert (run_keys / "operator.ed25519.pub").read_bytes() == \
        (store / "operator.ed25519.pub").read_bytes()
    with pytest.raises(IdentityError, match="lacks parties"):
        publish_public_keys(store, run_keys, run_party_ids(5))


def test_publishing_another_stores_keys_over_a_runs_keys_is_refused(tmp_path):
    """A resume given another key store used to overwrite the run's public keys (and then
    fail on its own ledgers' signatures, leaving a run that no longer verifies)."""
    run_keys = tmp_path / "run" / "keys"
    ensure_keystore(tmp_path / "store", run_party_ids(2))
    publish_public_keys(tmp_path / "store", run_keys, run_party_ids(2))
    before = {p.name: p.read_bytes() for p in run_keys.iterdir()}
    publish_public_keys(tmp_path / "store", run_keys, run_party_ids(2))  # the same store: fine
    ensure_keystore(tmp_path / "other", run_party_ids(2))
    with pytest.raises(IdentityError, match="does not hold this run's keys.*nothing was written"):
        publish_public_keys(tmp_path / "other", run_keys, run_party_ids(2))
    assert {p.name: p.read_bytes() for p in run_keys.iterdir()} == before


def test_a_damaged_published_key_file_is_written_again_with_a_warning(tmp_path, caplog):
    """A resumed run's keys/*.pub that no longer holds the key store's bytes used to be
    replaced without a word; an intact one is left as it is (not even replaced by a copy)."""
    store, run_keys = tmp_path / "store", tmp_path / "run" / "keys"
    ensure_keystore(store, run_party_ids(2))
    publish_public_keys(store, run_keys, run_party_ids(2))
    damaged = run_keys / "client-000.ed25519.pub"
    damaged.write_bytes(damaged.read_bytes()[:20])
    inodes = {p.name: p.stat().st_ino for p in run_keys.iterdir() if p != damaged}
    with caplog.at_level("WARNING", logger="secure_fedora.secure.keystore"):
        publish_public_keys(store, run_keys, run_party_ids(2))
    assert damaged.read_bytes() == (store / damaged.name).read_bytes()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(damaged) in warned[0] and "written again" in warned[0]
    assert {p.name: p.stat().st_ino for p in run_keys.iterdir() if p != damaged} == inodes


def test_missing_key_files_are_no_problem_and_other_paths_in_their_way_are(tmp_path):
    """check_public_keys accepts key files that are not there yet (a first run, or a resume
    that lost some) and writes nothing; what is there of another kind, or cannot be looked
    at, is refused by name."""
    store, run_keys = tmp_path / "store", tmp_path / "run" / "keys"
    ensure_keystore(store, run_party_ids(2))
    assert set(check_public_keys(store, run_keys, run_party_ids(2))) == set(run_party_ids(2))
    assert not run_keys.exists()
    publish_public_keys(store, run_keys, run_party_ids(2))
    (run_keys / "client-001.x25519.pub").unlink()
    assert set(check_public_keys(store, run_keys, run_party_ids(2))) == set(run_party_ids(2))
    (run_keys / "client-001.x25519.pub").symlink_to("client-001.x25519.pub")
    with pytest.raises(IdentityError, match="client-001.x25519.pub is a symbolic link loop"):
        check_public_keys(store, run_keys, run_party_ids(2))


@pytest.mark.parametrize("kind", NOT_REGULAR_KINDS)
def test_a_published_key_file_that_is_no_regular_file_is_refused_before_anything_is_written(
        tmp_path, kind):
    """A resumed run's keys/*.pub replaced by a link to /dev/zero was read whole (the resume
    ran out of memory with a traceback), a FIFO blocked it forever, a directory stopped it
    halfway with OSError: now refused, naming the file, before any key file is written."""
    store, run_keys = tmp_path / "store", tmp_path / "run" / "keys"
    ensure_keystore(store, run_party_ids(2))
    publish_public_keys(store, run_keys, run_party_ids(2))
    odd = run_keys / "client-000.x25519.pub"
    (run_keys / "client-000.ed25519.pub").write_bytes(b"damaged")  # would be written again
    odd.unlink()
    with not_a_regular_file(odd, kind):
        before = {p.name: (p.is_symlink(), p.is_dir()) for p in run_keys.iterdir()}
        with pytest.raises(IdentityError, match=re.escape(str(odd))
                           + " (is a directory|is not a regular file).*nothing was written"):
            publish_public_keys(store, run_keys, run_party_ids(2))
        assert {p.name: (p.is_symlink(), p.is_dir()) for p in run_keys.iterdir()} == before
    assert (run_keys / "client-000.ed25519.pub").read_bytes() == b"damaged"


def _tiny_dp_config():  # type: ignore[no-untyped-def]
    from secure_fedora.core.config import parse_config

    return parse_config({"methods": ["local"], "data": {"num_clients": 2, "train_per_client": 20,
                         "val_per_client": 8, "test_per_client": 8, "groups": 2},
                         "training": {"rounds": 1},
                         "privacy": {"enabled": True, "epsilon": 4.0, "delta": 1e-3}})


@pytest.mark.parametrize("inside", [".", "keys", "deep/store"])
def test_a_key_store_inside_the_run_directory_is_refused(tmp_path, inside):
    """It was accepted, with a note claiming the keys were outside the run directory."""
    from secure_fedora.runtimes.inprocess import Simulation

    cfg = _tiny_dp_config()
    run = tmp_path / "run"
    with pytest.raises(IdentityError, match="lies inside the run directory"):
        Simulation(cfg, run, keystore=run / inside).run()
    assert not (run / inside / "allowlist.json").exists()



def test_an_old_layout_run_resumes_once_its_keys_are_moved_out_as_readme_says(tmp_path):
    """README's migration of a run with its private keys in ``RUN/keys``: ``--keystore
    RUN/keys`` is refused (inside the run directory); the keys moved to a store outside
    (with the public keys and allowlist copied) resume the run, which keeps no private key."""
    import shutil

    from secure_fedora.runtimes.inprocess import Simulation

    run, store = tmp_path / "run", tmp_path / "store"
    Simulation(_tiny_dp_config(), run, keystore=store).run()
    for key in store.glob("*.key"):  # the old layout: private keys beside the public ones
        shutil.move(str(key), str(run / "keys" / key.name))
    shutil.rmtree(store)
    with pytest.raises(IdentityError, match="lies inside the run directory"):
        Simulation(_tiny_dp_config(), run, keystore=run / "keys").run(resume=True)
    moved = tmp_path / "moved"
    moved.mkdir(mode=0o700)
    for key in (run / "keys").glob("*.key"):
        shutil.move(str(key), str(moved / key.name))
    for public in [*(run / "keys").glob("*.pub"), run / "keys" / "allowlist.json"]:
        shutil.copy(public, moved / public.name)
    results = Simulation(_tiny_dp_config(), run, keystore=moved).run(resume=True)
    assert results["methods"]["local"]["selected"]["per_client"]
    assert not list(run.rglob("*.key"))


def test_a_resume_with_a_key_store_that_does_not_exist_creates_none(tmp_path):
    """A resume given a new store path first created that store (fresh private keys no run
    can use), then was refused for its keys."""
    from secure_fedora.runtimes.inprocess import Simulation

    run = tmp_path / "run"
    Simulation(_tiny_dp_config(), run, keystore=tmp_path / "store").run()
    with pytest.raises(IdentityError, match="does not exist, but this run's ledgers are signed"):
        Simulation(_tiny_dp_config(), run, keystore=tmp_path / "fresh").run(resume=True)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_a_key_store_reaching_into_the_run_directory_by_dotdot_or_symlink_is_refused(tmp_path, how):
    """``runs/y/../x/ks`` and a symlink to the run directory compared unresolved: the private
    keys were written inside the run directory auditors receive."""
    from secure_fedora.runtimes.inprocess import Simulation

    run = tmp_path / "runs" / "x"
    if how == "dotdot":
        store = tmp_path / "runs" / "y" / ".." / "x" / "ks"
    else:
        run.mkdir(parents=True)
        (tmp_path / "link").symlink_to(run)
        store = tmp_path / "link" / "ks"
    with pytest.raises(IdentityError, match="lies inside the run directory"):
        Simulation(_tiny_dp_config(), run, keystore=store).run()
    assert not list(run.rglob("*.key"))


def test_a_private_key_that_does_not_match_the_allowlist_is_refused_before_publishing(tmp_path):
    """A key file copied from another store signed the run's ledgers with a key the
    published allowlist does not list: the run finished and only `audit verify` failed."""
    import shutil

    parties = run_party_ids(2)
    ensure_keystore(tmp_path / "store", parties)
    ensure_keystore(tmp_path / "other", parties)
    for suffix in ("ed25519.key", "x25519.key"):
        shutil.copyfile(tmp_path / "other" / f"client-001.{suffix}",
                        tmp_path / "store" / f"client-001.{suffix}")
    run_keys = tmp_path / "run" / "keys"
    with pytest.raises(IdentityError, match="'client-001' do not match its entry in allowlist.json"):
        publish_public_keys(tmp_path / "store", run_keys, parties)
    assert not run_keys.exists()


def test_a_run_refuses_a_key_store_others_can_write_before_writing_anything(tmp_path):
    """A 0777 key store was accepted: another user could replace its allowlist or key files."""
    import os

    from secure_fedora.runtimes.inprocess import Simulation

    store = tmp_path / "store"
    ensure_keystore(store, run_party_ids(2))
    os.chmod(store, 0o777)
    cfg = _tiny_dp_config()
    run = tmp_path / "run"
    with pytest.raises(IdentityError, match="0777: group or others"):
        Simulation(cfg, run, keystore=store).run()
    assert not (run / "keys").exists() and not (run / "ledgers").exists()


KILL_AFTER = """
import os, sys, tempfile
from pathlib import Path
import privacy.identity as identity
from secure_fedora.secure import keystore

real, done = identity.init_keys, []

def dying(directory, party_ids, overwrite=False):
    for party in party_ids:  # key files party by party (as init_keys), killed before the allowlist
        if len(done) == int(sys.argv[3]):
            os._exit(9)
        scratch = Path(tempfile.mkdtemp())
        real(scratch, [party])
        for f in scratch.glob(party + ".*"):
            os.replace(f, Path(directory, f.name))
        done.append(party)
    raise AssertionError("not killed")

keystore.init_keys = dying
keystore.ensure_keystore(Path(sys.argv[1]), keystore.run_party_ids(int(sys.argv[2])))
"""


def _killed_while_creating(store: Path, clients: int, after: int) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER, str(store), str(clients), str(after)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr


def test_a_kill_during_first_creation_leaves_no_half_made_store(tmp_path):
    """Killed during first-time creation, the store kept some key files and no allowlist;
    every later DP run or sweep then failed ("refusing to overwrite existing key files
    (--force on the command line ...)", an option run and sweep do not have)."""
    store = tmp_path / "home" / "exp"
    _killed_while_creating(store, 2, after=3)
    assert not store.exists()  # the half-made store is a temporary sibling, never the store
    made = ensure_keystore(store, run_party_ids(2))
    assert made.created and set(load_allowlist(store / "allowlist.json")) == set(run_party_ids(2))
    for party in run_party_ids(2):
        assert load_identity(store, party).public == load_allowlist(store / "allowlist.json")[party]


def test_a_kill_while_adding_parties_is_completed(tmp_path):
    """Killed while keys of new parties were written (before the allowlist named them): the
    marker proves those files were never usable, so the next run replaces them; the keys
    the allowlist already held are kept."""
    store = tmp_path / "store"
    ensure_keystore(store, run_party_ids(2))
    kept = (store / "client-000.ed25519.key").read_bytes()
    _killed_while_creating(store, 4, after=1)
    assert (store / "client-002.ed25519.key").exists() and (store / ".creating").exists()
    assert set(load_allowlist(store / "allowlist.json")) == set(run_party_ids(2))
    ensure_keystore(store, run_party_ids(4))
    allowed = load_allowlist(store / "allowlist.json")
    assert set(allowed) == set(run_party_ids(4)) and not (store / ".creating").exists()
    assert (store / "client-000.ed25519.key").read_bytes() == kept
    assert load_identity(store, "client-002").public == allowed["client-002"]


def test_key_files_without_an_allowlist_name_a_remedy_that_exists(tmp_path):
    """Key files but no allowlist and no marker (an earlier version's kill, or an allowlist
    removed by hand after runs used the keys): never overwritten, and the message names a
    command that exists instead of a --force that run and sweep do not have; a Python caller
    (told to run that command before) is given the init_keys call, which recreates it."""
    store = tmp_path / "store"
    ensure_keystore(store, run_party_ids(2))
    (store / "allowlist.json").unlink()
    key = (store / "client-001.ed25519.key").read_bytes()
    with pytest.raises(IdentityError, match=r"no allowlist.json .*`secure-fedora keys init "
                       r".*store --clients 2 --force`.*or --keystore\)$"):
        ensure_keystore(store, run_party_ids(2), option=CLI_KEYSTORE_OPTION)
    assert (store / "client-001.ed25519.key").read_bytes() == key
    # a Python caller is given the Python remedy, which works
    with pytest.raises(IdentityError) as err:
        ensure_keystore(store, run_party_ids(2))
    assert "--force" not in str(err.value) and "keys init" not in str(err.value)
    remedy = re.search(r"recreate the store with (privacy\.identity\.init_keys\(.*\)); ",
                       str(err.value))
    assert remedy is not None and str(err.value).endswith("or the keystore= argument)")
    import privacy.identity
    import secure_fedora.secure.keystore

    namespace = {"privacy": privacy, "secure_fedora": secure_fedora}
    eval(remedy.group(1), namespace)  # what the message tells a Python caller to run
    assert not ensure_keystore(store, run_party_ids(2)).created
    assert (store / "client-001.ed25519.key").read_bytes() != key
    # an empty directory (made by hand) is filled
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    assert ensure_keystore(empty, run_party_ids(1)).created
    assert set(load_allowlist(empty / "allowlist.json")) == set(run_party_ids(1))


def test_the_leftovers_of_a_killed_creation_are_removed_when_the_store_is_next_used(tmp_path):
    """A creation killed before its rename left its temporary sibling (private keys no run
    used) beside the store for good; the next creation or opening of that store removes it,
    and only it: not a live creation's (locked, or younger than a minute even with an
    unlocked .lock: between its open and its flock), not a complete store's, not another
    store's."""
    import fcntl
    import os

    home = tmp_path / "home"
    store = home / "exp"
    _killed_while_creating(store, 2, after=3)
    (killed,) = home.glob(".exp.creating-*")
    assert list(killed.glob("*.key"))
    os.utime(killed, (1e9, 1e9))  # killed a while ago (a younger one may be a live creation)
    old = home / ".exp.creating-abc_1234"  # an earlier version's kill: no .lock
    old.mkdir()
    (old / "server.ed25519.key").write_bytes(b"k")
    os.utime(old, (1e9, 1e9))
    recent = home / ".exp.creating-recent00"  # a creation between its mkdtemp and its lock
    recent.mkdir()
    opening = home / ".exp.creating-opening0"  # between opening its .lock and locking it
    opening.mkdir()
    (opening / ".lock").touch()
    live = home / ".exp.creating-live0000"
    live.mkdir()
    held = os.open(live / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    complete = home / ".exp.creating-complete"  # killed just before its rename: kept
    ensure_keystore(home / "made", run_party_ids(1))
    (home / "made").rename(complete)
    os.utime(complete, (1e9, 1e9))
    others = [home / ".exp2.creating-abcdefgh", home / ".exp.creating-toolong123"]
    for other in others:
        other.mkdir()
        os.utime(other, (1e9, 1e9))
    try:
        assert ensure_keystore(store, run_party_ids(2)).created
        assert not killed.exists() and not old.exists()
        assert recent.is_dir() and opening.is_dir() and live.is_dir()
        assert all(o.is_dir() for o in others)
        assert (complete / "allowlist.json").is_file()
        ensure_keystore(store, run_party_ids(2))  # opening the store: the same, the store kept
        assert recent.is_dir() and live.is_dir() and (store / "allowlist.json").is_file()
    finally:
        os.close(held)
    for gone in (recent, opening, live):
        os.utime(gone, (1e9, 1e9))
    ensure_keystore(store, run_party_ids(2))
    assert not recent.exists() and not opening.exists() and not live.exists()
    assert sorted(p.name for p in home.iterdir()) == sorted(
        ["exp", complete.name, *(o.name for o in others)])


def test_key_store_errors_name_the_python_apis_argument_not_the_cli_flag(tmp_path):
    """Raised through the Python API they told the caller to pass ``--keystore``, a flag a
    Python caller never typed; they now name ``the keystore= argument``."""
    from secure_fedora.runtimes.inprocess import Simulation

    run = tmp_path / "run"
    with pytest.raises(IdentityError, match=r"\(the keystore= argument\) lies inside") as inside:
        Simulation(_tiny_dp_config(), run, keystore=run / "ks").run()
    Simulation(_tiny_dp_config(), run, keystore=tmp_path / "store").run()
    with pytest.raises(IdentityError, match=r"pass the run's key store \(the keystore= argument,"
                       ) as missing:
        Simulation(_tiny_dp_config(), run, keystore=tmp_path / "fresh").run(resume=True)
    ensure_keystore(tmp_path / "other", run_party_ids(2))
    with pytest.raises(IdentityError, match=r"\(the keystore= argument, or \[security\]") as other:
        publish_public_keys(tmp_path / "other", run / "keys", run_party_ids(2))
    (tmp_path / "other" / "client-005.ed25519.key").write_text("stray")
    with pytest.raises(IdentityError, match=r"keystore in the config, or the keystore= argument\)"
                       ) as stray:
        ensure_keystore(tmp_path / "other", run_party_ids(6))
    for err in (inside, missing, other, stray):
        assert "--keystore" not in str(err.value)


def test_check_keystore_refuses_what_a_dp_run_would_and_writes_nothing(tmp_path):
    """The check a sweep makes for its DP cells before any cell runs: a store inside the
    run directory, a file, a directory others can write or an unreadable allowlist."""
    from secure_fedora.secure.keystore import check_keystore

    run = tmp_path / "run"
    check_keystore(tmp_path / "fresh", "config", run)  # created by the run: passes
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(IdentityError, match="lies inside the run directory"):
        check_keystore(run / "sub" / ".." / "keys", "config", run)
    (tmp_path / "file").write_text("")
    with pytest.raises(IdentityError, match="exists and is not a directory"):
        check_keystore(tmp_path / "file", "config", run)
    store = tmp_path / "store"
    ensure_keystore(store, run_party_ids(2))
    check_keystore(store, "config", run)
    (store / "allowlist.json").write_text("{")
    with pytest.raises(IdentityError, match="not valid JSON"):
        check_keystore(store, "config", run)
    store.chmod(0o770)
    with pytest.raises(IdentityError, match="permissions 0770"):
        check_keystore(store, "config", run)


def test_another_runs_directory_is_refused_as_a_key_store(tmp_path):
    """``--keystore OTHER_RUN`` was accepted: private keys, allowlist.json and .lock were
    written into that run's top level, after which its ``audit verify --allowlist`` failed."""
    from secure_fedora.runtimes.inprocess import Simulation

    other, store = tmp_path / "other", tmp_path / "store"
    Simulation(_tiny_dp_config(), other, keystore=store).run()
    before = {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()}
    with pytest.raises(IdentityError, match="holds a run's record.*directory of its own"):
        Simulation(_tiny_dp_config(), tmp_path / "run", keystore=other).run()
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} \
        == before
    assert not (tmp_path / "run" / "ledgers").exists()
    # a key store, even one that runs used, stays accepted
    Simulation(_tiny_dp_config(), tmp_path / "run2", keystore=store).run()


def test_a_key_store_below_another_runs_directory_is_refused(tmp_path, capsys):
    """``OTHER_RUN/sub/keys`` was accepted (its private keys written inside that run's
    directory, which auditors receive), though ``OTHER_RUN`` itself was refused."""
    from secure_fedora.cli import main
    from secure_fedora.runtimes.inprocess import Simulation

    other, store = tmp_path / "other", tmp_path / "store"
    Simulation(_tiny_dp_config(), other, keystore=store).run()
    before = {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()}
    for inside in (other / "sub" / "keys", other / "ledgers" / "keys",
                   tmp_path / "elsewhere" / ".." / "other" / "sub"):
        with pytest.raises(IdentityError, match=(
                rf"key store {re.escape(str(inside))} \(the keystore= argument\) lies inside "
                rf"{re.escape(str(other))}, another run's directory \(it holds config.toml, "
                r"anchor.json, ledgers, rounds.csv\).*outside any run directory.*nothing was "
                r"written")):
            Simulation(_tiny_dp_config(), tmp_path / "run", keystore=inside).run()
        assert main(["keys", "init", str(inside), "--clients", "2"]) == 2
        assert f"lies inside {other}, another run's directory" in capsys.readouterr().err
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} \
        == before
    assert not (other / "sub").exists() and not (tmp_path / "run" / "ledgers").exists()
    # a folder that holds a record's name but no config.toml (a project's own results.json),
    # an ML project folder holding config.toml beside results.json and checkpoints/ of its own
    # (names a run writes too, but not only a run), or a sweep's top level (its cells share a
    # key store there), stays a place for one
    for holder, names in (("project", ("results.json",)),
                          ("ml-project", ("config.toml", "results.json", "checkpoints")),
                          ("sweep", ("config.toml", "sweep.json"))):
        (tmp_path / holder).mkdir()
        for name in names:
            (tmp_path / holder / name).write_text("{}")
        Simulation(_tiny_dp_config(), tmp_path / f"run-{holder}",
                   keystore=tmp_path / holder / "keys").run()


def test_the_creation_notice_suggests_another_store_only_when_the_option_did_not_choose_it(
        tmp_path: Path) -> None:
    """A store created where ``--keystore`` pointed said "(--keystore; ...) ...; choose
    another with --keystore": the option it had just been given."""
    from secure_fedora.secure.keystore import creation_notice

    chosen = creation_notice(tmp_path / "ks", "--keystore", "--keystore")
    assert chosen.count("--keystore") == 1 and "choose another" not in chosen
    default = creation_notice(tmp_path / "ks", "default", "--keystore")
    assert default.endswith("choose another with --keystore or [security] keystore")


def test_a_caller_without_a_key_store_option_is_pointed_at_the_config_key_alone(
        tmp_path: Path) -> None:
    """A sweep has no --keystore and no keystore= argument: its notices and refusals name
    ``[security] keystore`` alone (they named "the keystore= argument or [security] keystore")."""
    from secure_fedora.secure.keystore import (
        CONFIG_KEYSTORE_OPTION,
        creation_notice,
        keystore_choices,
    )

    notice = creation_notice(tmp_path / "ks", "default", CONFIG_KEYSTORE_OPTION)
    assert notice.endswith("choose another with [security] keystore")
    assert keystore_choices(CONFIG_KEYSTORE_OPTION, ", or ") == "[security] keystore"
    assert keystore_choices("--keystore", ", or ") == "--keystore, or [security] keystore"
