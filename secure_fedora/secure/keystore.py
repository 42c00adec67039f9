"""Where a DP run's private keys live: a key store outside the run directory.

A DP run signs every ledger entry with its clients' Ed25519 keys and its ``anchor.json`` with
the ``operator`` key. If those private keys sat in the run directory, anyone holding the
directory could re-sign a shortened ledger; so they live in a *key store* elsewhere and the
run directory receives only the public half (``keys/allowlist.json`` and ``*.pub``).

Which key store a run uses, first match wins:

1. the ``--keystore`` flag of ``secure-fedora run`` (``Simulation(keystore=...)``);
2. ``[security] keystore = "PATH"`` in the config (a relative path is taken from the current
   working directory);
3. the default ``<home>/<config name>``, where ``<home>`` is ``$SECURE_FEDORA_KEYSTORE_HOME``,
   else ``$XDG_DATA_HOME/secure-fedora/keystore``, else
   ``~/.local/share/secure-fedora/keystore``.

``secure-fedora keys init DIR --clients N`` creates a key store (server, operator and N
clients). A missing store is created on first use (directory 0700, private keys 0600),
atomically: written in full into a temporary sibling directory, then renamed into place, so
a process killed meanwhile leaves no half-made store (at most an unused
``.<name>.creating-*`` directory beside it, removed when the store is next created or
opened). A store lacking some
parties of the run gets keys for exactly those parties, nothing else is touched (the run
says so in one line, :func:`extension_notice`, its run directory records them at once in
``keystore_extended.json`` and its results.json lists them under ``keystore_extended``); an existing directory without an allowlist is filled the same way. Both write a
``.creating`` marker naming the parties first and remove it after the allowlist, so that a
kill in between is recognised and completed (see :func:`ensure_keystore`). A store directory writable by group or others, or owned by another user, is refused
(someone else could swap its allowlist or key files). Assumption (stated): key files are
protected by file permissions only (see :mod:`privacy.identity`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from privacy.identity import (
    ALLOWLIST_FILENAME,
    SERVER_ID,
    IdentityError,
    PublicIdentity,
    allowlist_bytes,
    check_key_directory,
    client_ids,
    init_keys,
    load_allowlist,
    load_identity,
    validate_party_id,
)
from privacy.paths import path_problem, read_regular_bytes

__all__ = [
    "API_KEYSTORE_OPTION",
    "CLI_KEYSTORE_OPTION",
    "CONFIG_KEYSTORE_OPTION",
    "KEYSTORE_HOME_ENV",
    "OPERATOR_ID",
    "KeyStore",
    "check_keystore",
    "check_keystore_used",
    "refuse_run_directory",
    "check_public_keys",
    "default_keystore_home",
    "ensure_keystore",
    "extension_notice",
    "keystore_choices",
    "publish_public_keys",
    "resolve_keystore",
    "run_party_ids",
]

OPERATOR_ID = "operator"
KEYSTORE_HOME_ENV = "SECURE_FEDORA_KEYSTORE_HOME"
LOCK_FILENAME = ".lock"
#: How errors name the caller's choice of key store: ``secure-fedora run``'s flag, or the
#: argument of ``Simulation`` / ``Experiment.simulation`` (the default: a Python caller).
CLI_KEYSTORE_OPTION = "--keystore"
API_KEYSTORE_OPTION = "the keystore= argument"
#: A caller whose only way to choose a key store is the config (a sweep's cells).
CONFIG_KEYSTORE_OPTION = "[security] keystore"

log = logging.getLogger("secure_fedora.secure.keystore")


def default_keystore_home() -> Path:
    """The folder that holds the default key stores (see the module docstring)."""
    env = os.environ.get(KEYSTORE_HOME_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "secure-fedora" / "keystore"


def run_party_ids(num_clients: int) -> list[str]:
    """The parties of an in-process DP run: ``server``, ``operator`` and every client."""
    return [SERVER_ID, OPERATOR_ID, *client_ids(num_clients)]


@dataclass(frozen=True)
class KeyStore:
    """A resolved key store: its directory, whether this call created it, and the parties
    this call added to a store that existed (``added``; empty when it created the store or
    the store already held every party)."""

    path: Path
    created: bool
    source: str
    added: tuple[str, ...] = ()


def resolve_keystore(name: str, configured: str | None = None,
                     override: str | os.PathLike[str] | None = None,
                     option: str = CLI_KEYSTORE_OPTION) -> tuple[Path, str]:
    """The key store directory a run uses and where that choice came from
    (``option``, how the caller named ``override``: ``"--keystore"`` by default; ``"config"``
    or ``"default"``). Nothing is created."""
    if override is not None:
        return Path(override).expanduser().absolute(), option
    if configured is not None:
        return Path(configured).expanduser().absolute(), "config"
    return (default_keystore_home() / name).absolute(), "default"


def check_keystore_used(private: bool, configured: str | None,
                        override: str | os.PathLike[str] | None = None,
                        option: str = CLI_KEYSTORE_OPTION, resume: bool = False) -> None:
    """ConfigError, before anything is built or written, when a run without privacy is given
    a key store, by ``override`` (the caller's ``option``: ``--keystore`` or the ``keystore=``
    argument) or by ``[security] keystore`` (``configured``): such a run reads no key store
    (its envelope keys, if any, are made in ``RUN_DIR/keys``), so the choice would be
    ignored. A resume, or an audit of a run directory (``resume``), only warns about
    ``[security] keystore``: a run started before this check holds that key in its
    config.toml, and removing it would change the config its checkpoints are bound to. A sweep checks its cells itself: its base config's
    key store serves its DP cells."""
    from secure_fedora.core.config import ConfigError

    if private:
        return
    why = ("the config has [privacy] enabled = false, and a run without privacy reads no key "
           "store (its envelope keys, if any, are in RUN_DIR/keys)")
    if override is not None:
        raise ConfigError(f"{option} is unused: {why}; leave {option} out, or enable [privacy]")
    if configured is not None and resume:
        log.warning("[security] keystore = %s is unused: %s", json.dumps(configured), why)
    elif configured is not None:
        raise ConfigError(f"[security] keystore = {json.dumps(configured)} is unused: {why}; "
                          "remove the key, or enable [privacy]")


def keystore_choices(option: str, joiner: str = " or ") -> str:
    """The ways a message names to choose a key store: the caller's ``option`` and ``[security]
    keystore``, or that key alone when it is the caller's only way
    (:data:`CONFIG_KEYSTORE_OPTION`), so no message names a flag the caller does not have."""
    if option == CONFIG_KEYSTORE_OPTION:
        return CONFIG_KEYSTORE_OPTION
    return f"{option}{joiner}{CONFIG_KEYSTORE_OPTION}"


def creation_notice(path: Path, source: str, option: str) -> str:
    """The one-line notice a run gives when it created the key store ``path`` (chosen by
    ``source``; ``option`` names the flag or argument that chooses another, which the notice
    suggests only when ``source`` is not that option already)."""
    note = (f"note: created the key store {path} ({source}; 0700, private keys 0600): the run's "
            "private signing keys, kept outside the run directory so that its ledgers cannot be "
            "re-signed by whoever holds it")
    return note if source == option else \
        f"{note}; choose another with {keystore_choices(option)}"


def extension_notice(path: Path, source: str, added: Sequence[str]) -> str:
    """The one-line notice a run gives when it added ``added`` parties' keys to the existing
    key store ``path`` (chosen by ``source``): how many, which, where, and what it means for an
    allowlist copied from the store before."""
    shown = ", ".join(added[:4]) + (" ..." if len(added) > 4 else "")
    them = "it" if len(added) == 1 else "them"
    return (f"note: extended the key store {path} ({source}) with {len(added)} "
            f"{'identity' if len(added) == 1 else 'identities'} ({shown}): it held fewer "
            f"parties than this run; its allowlist.json now lists {them} too, so a copy of it "
            f"taken before this run lacks {them} (copy it again for `audit verify --allowlist`)")


# what a run's or a sweep's directory holds once it started and a key store never does
# (config.toml alone is not one: a project folder holds one too)
CONFIG_FILENAME = "config.toml"
RUN_RECORD_NAMES = ("results.json", "anchor.json", "ledgers", "checkpoints", "rounds.csv",
                    "stopped.json", "amendments.json", "keystore_extended.json", "sweep.json",
                    "cell.json")
# of those, the names a project folder may hold for its own use (and a sweep's top level)
PROJECT_NAMES = frozenset({"results.json", "checkpoints", "sweep.json"})


def _run_record(directory: str | os.PathLike[str], names: Sequence[str]) -> list[str]:
    """Which of ``names`` ``directory`` holds (none where it cannot be read)."""
    return sorted(name for name in names if os.path.lexists(os.path.join(directory, name)))


def refuse_run_directory(path: Path, source: str) -> None:
    """IdentityError, writing nothing, when the directory ``path`` (a key store chosen by
    ``source``, existing or not) holds a run's or sweep's record (:data:`RUN_RECORD_NAMES`),
    or lies below a run's directory (a parent, ``..`` and links resolved, that holds
    ``config.toml`` and a record only a run writes: ledgers, anchor, rounds, stop or amendment
    records): that is a directory auditors receive, and private
    keys written in it would go with it, beside that run's own."""
    record = _run_record(path, RUN_RECORD_NAMES)
    if record:
        raise IdentityError(
            f"key store {path} ({source}) holds a run's record ({', '.join(record)}): it is "
            "another run's (or sweep's) directory, which auditors receive, and its private "
            "keys and allowlist.json would be written beside that run's own; give the key "
            "store a directory of its own (a new path is created on first use); nothing was "
            "written")
    # a parent needs config.toml and a name only a run writes: an ML project folder may hold
    # config.toml beside results.json or checkpoints/ of its own; a sweep's top level
    # (sweep.json) may hold its cells' shared key store
    run_names = [name for name in RUN_RECORD_NAMES if name not in PROJECT_NAMES]
    for parent in Path(path).resolve().parents:
        if not os.path.isfile(parent / CONFIG_FILENAME):
            continue
        record = _run_record(parent, run_names)
        if record:
            raise IdentityError(
                f"key store {path} ({source}) lies inside {parent}, another run's directory "
                f"(it holds {', '.join([CONFIG_FILENAME, *record])}), which auditors receive: "
                "its private keys and allowlist.json would go with it; give the key store a "
                "directory of its own outside any run directory (a new path is created on "
                "first use); nothing was written")


def check_keystore(path: Path, source: str, run_dir: Path) -> None:
    """Refuse (IdentityError), writing nothing, a key store ``path`` (chosen by ``source``)
    that a DP run in ``run_dir`` cannot use: one inside the run directory (``..`` and links
    resolved: the run directory is what auditors receive), one holding another run's or
    sweep's record (:data:`RUN_RECORD_NAMES`), a path that exists and is not a directory, a
    directory another user owns or group or others can write
    (:func:`privacy.identity.check_key_directory`), or one whose ``allowlist.json`` does not
    load. A store that does not exist yet passes (the run creates it)."""
    run = Path(run_dir).expanduser().resolve()
    resolved = Path(path).resolve()
    if resolved == run or run in resolved.parents:
        raise IdentityError(
            f"key store {path} ({source}) lies inside the run directory {run}: a DP "
            "run's private keys must live outside it (the run directory is what "
            "auditors receive); choose a key store elsewhere")
    refuse_run_directory(path, source)
    if not path.exists():
        return
    if not path.is_dir():
        raise IdentityError(f"key store {path} exists and is not a directory")
    check_key_directory(path)
    if (path / ALLOWLIST_FILENAME).exists():
        load_allowlist(path / ALLOWLIST_FILENAME)


CREATING_FILENAME = ".creating"
CREATING_INFIX = ".creating-"
_MKDTEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkdtemp's random part
_CREATION_GRACE_S = 60.0


def ensure_keystore(path: Path, parties: Sequence[str], source: str = "default",
                    option: str = API_KEYSTORE_OPTION) -> KeyStore:
    """Make ``path`` a key store holding every party of ``parties`` and return it.

    A missing store is created atomically (a complete store in a temporary sibling
    directory, renamed into place); such siblings that killed creations left are removed
    first (:func:`_remove_interrupted_creations`). An existing one gets keys only for parties its allowlist
    lacks, under the store's lock, between a ``.creating`` marker (naming those parties,
    written first) and the removal of that marker (after the allowlist is written).

    Why key files may then be discarded: a run uses a store's keys only through its
    ``allowlist.json`` (:func:`publish_public_keys` refuses a party the allowlist lacks, and
    only then are private keys loaded to sign ledgers or anchors), and the allowlist is
    written after every key file of the parties it adds. So key files of a party that a
    ``.creating`` marker names and the allowlist lacks were left by a creation killed
    before its allowlist: no run, ledger or anchor can use them, and they are replaced.
    Without that marker nothing proves so (an earlier version's kill, or an allowlist
    removed by hand from a store runs did use), so such files are never overwritten:
    IdentityError naming them and the remedies (recreating the store: ``secure-fedora keys
    init ... --force`` when ``option`` is the CLI's flag, else
    :func:`privacy.identity.init_keys` with ``overwrite=True``; another store: ``[security]
    keystore`` or ``option``, how the caller chooses one).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IdentityError(f"key store {path} exists and is not a directory")
    _remove_interrupted_creations(path)
    if not path.exists():
        created = _create_atomically(path, parties)
        if created:
            return KeyStore(path, True, source)
    if path.is_dir() and not (path / LOCK_FILENAME).exists() \
            and not (path / CREATING_FILENAME).exists():
        # a store no extension has locked (an earlier version's, or made by hand) is
        # checked before its lock file is made, so that a refusal leaves it as it was
        _refuse_stray_key_files(path, parties, _known_parties(path), option)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(path / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise IdentityError(f"cannot create or open the key store {path}: {exc}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs extending one store wait for each other
        known = _known_parties(path)
        _discard_interrupted(path, known)
        missing = [p for p in parties if p not in known]
        if not missing:
            return KeyStore(path, False, source)
        _refuse_stray_key_files(path, parties, known, option)
        marker = path / CREATING_FILENAME
        _write_marker(marker, missing)
        init_keys(path, missing, overwrite=bool(known))
        marker.unlink()
        return KeyStore(path, not known, source, tuple(missing) if known else ())
    finally:
        os.close(lock)


def _known_parties(path: Path) -> dict[str, PublicIdentity]:
    """The parties the store's allowlist lists (none without one)."""
    allowlist = path / ALLOWLIST_FILENAME
    return load_allowlist(allowlist) if allowlist.exists() else {}


def _refuse_stray_key_files(path: Path, parties: Sequence[str],
                            known: Mapping[str, PublicIdentity], option: str) -> None:
    """IdentityError (see :func:`ensure_keystore`) when the store holds key files of a party
    of ``parties`` that its allowlist (``known``) lacks; writes nothing."""
    stray = sorted(str(f) for p in parties if p not in known for f in path.glob(f"{p}.*"))
    if not stray:
        return
    n_clients = sum(1 for p in parties if p.startswith("client-"))
    why = ("holds no allowlist.json but key files" if not known else
           "holds key files of parties missing from its allowlist")
    recreate = (f"`secure-fedora keys init {path} --clients {n_clients} --force`"
                if option == CLI_KEYSTORE_OPTION else
                f"privacy.identity.init_keys({str(path)!r}, "
                f"secure_fedora.secure.keystore.run_party_ids({n_clients}), "
                "overwrite=True)")
    raise IdentityError(
        f"key store {path} {why}: {', '.join(stray[:6])}"
        f"{' ...' if len(stray) > 6 else ''}; refusing to overwrite them (left by an "
        "interrupted key-store creation of an earlier version, or the allowlist was "
        "edited or removed by hand, in which case runs may have used these keys). If "
        f"no run used them, recreate the store with {recreate}; otherwise restore its "
        "allowlist.json, or use another key store ([security] keystore in the config"
        f"{'' if option == CONFIG_KEYSTORE_OPTION else f', or {option}'})")


def _create_atomically(path: Path, parties: Sequence[str]) -> bool:
    """Create the store ``path`` complete or not at all: keys and allowlist are written into
    a fresh 0700 sibling directory, which is then renamed to ``path``. False when ``path``
    appeared meanwhile (another process created it; the caller uses that one). The sibling's
    ``.lock`` is held locked until after the rename, so that
    :func:`_remove_interrupted_creations` tells a live creation from a killed one."""
    lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{CREATING_INFIX}", dir=path.parent))
    except OSError as exc:
        raise IdentityError(f"cannot create the key store {path}: {exc}") from exc
    try:
        lock = os.open(tmp / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        init_keys(tmp, parties)
        try:
            os.rename(tmp, path)  # atomic; fails if path is now a non-empty directory or file
        except OSError:
            if path.exists():
                return False
            raise
    except OSError as exc:
        raise IdentityError(f"cannot create the key store {path}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    return True


def _remove_interrupted_creations(path: Path) -> list[Path]:
    """Remove the temporary siblings ``.<name>.creating-<8 characters>`` that creations of
    the store ``path`` killed before their rename left (private keys no run used: a run uses
    a store only at ``path``); return them. Kept: ``path`` itself, anything that is not a
    plain directory of that exact name, one whose ``.lock`` a live creation holds, one
    modified within the last minute whether or not its ``.lock`` exists (a creation between
    its ``mkdtemp`` and its ``flock``), and one holding an allowlist (a complete store:
    logged, never deleted)."""
    prefix = f".{path.name}{CREATING_INFIX}"
    try:
        siblings = sorted(path.parent.iterdir())
    except OSError:
        return []
    removed = []
    for tmp in siblings:
        rest = tmp.name[len(prefix):]
        if (not tmp.name.startswith(prefix) or not _MKDTEMP_SUFFIX.fullmatch(rest)
                or tmp.name == path.name or tmp.is_symlink() or not tmp.is_dir()):
            continue
        if (tmp / ALLOWLIST_FILENAME).exists():
            log.warning("%s holds a complete key store that was never renamed to %s; it was "
                        "left as it is (delete it if no run uses it)", tmp, path)
            continue
        try:
            lock = os.open(tmp / LOCK_FILENAME, os.O_RDWR)
        except FileNotFoundError:
            lock = None
        except OSError:
            continue
        try:
            # a creation between its mkdtemp and its lock file, or between opening the lock
            # file and locking it, holds no lock yet: a young directory is kept either way
            if time.time() - tmp.stat().st_mtime < _CREATION_GRACE_S:
                continue
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a creation in progress
            shutil.rmtree(tmp)
        except FileNotFoundError:
            continue  # renamed into place or removed meanwhile
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted key-store creation: %s", tmp, exc)
            continue
        finally:
            if lock is not None:
                os.close(lock)
        log.warning("removed %s, left by an interrupted creation of the key store %s", tmp, path)
        removed.append(tmp)
    return removed


def _write_marker(marker: Path, parties: Sequence[str]) -> None:
    from secure_fedora.core.files import atomic_write_bytes

    atomic_write_bytes(marker, json.dumps({"parties": list(parties)}).encode())


def _discard_interrupted(path: Path, known: Mapping[str, PublicIdentity]) -> None:
    """Remove the key files of a creation killed before its allowlist (see
    :func:`ensure_keystore`): those of the parties ``.creating`` names that the allowlist
    (``known``) lacks; then the marker. Called under the store's lock."""
    marker = path / CREATING_FILENAME
    if not marker.exists():
        return
    try:
        named = json.loads(marker.read_text())["parties"]
        if not isinstance(named, list):
            raise TypeError("parties is not a list")
        parties = [validate_party_id(str(p)) for p in named]
    except (OSError, ValueError, KeyError, TypeError, IdentityError) as err:
        raise IdentityError(f"key store {path}: {marker} is unreadable ({err}); an interrupted "
                            "key creation cannot be completed safely; inspect the store or "
                            "use another one") from None
    for party in parties:
        if party in known:
            continue  # its keys are in the allowlist: kept
        for f in [*path.glob(f"{party}.*"), *path.glob(f".{party}.*.tmp-*")]:
            f.unlink()  # its key files, and init_keys' temporary ones of an overwrite
    marker.unlink()


def check_public_keys(keystore: Path, dest: Path, parties: Sequence[str],
                      option: str = API_KEYSTORE_OPTION) -> dict[str, PublicIdentity]:
    """The identities :func:`publish_public_keys` would publish, checked without writing
    anything: IdentityError when ``keystore`` lacks one of ``parties``, holds a private key
    that does not match its allowlist, or ``dest`` already lists other keys for one of
    ``parties`` (a resume with another store; the message names ``option``, how the caller
    chooses a key store)."""
    known = load_allowlist(keystore / ALLOWLIST_FILENAME)
    missing = [p for p in parties if p not in known]
    if missing:
        raise IdentityError(f"key store {keystore} lacks parties {missing}")
    # every private key must load and match the public key published for it, before anything
    # is written: a mismatch would sign ledgers that no audit can verify
    for party in parties:
        if load_identity(keystore, party).public != known[party]:
            raise IdentityError(
                f"key store {keystore}: the private keys of {party!r} do not match its entry in "
                f"{ALLOWLIST_FILENAME} (a key file replaced or copied from another store); "
                "nothing was written")
    chosen = {p: known[p] for p in parties}
    # a key file of another kind would be read whole (a link to /dev/zero), waited on (a
    # FIFO) or fail halfway through the writes (a directory)
    for target in _key_files(dest, parties):
        problem = path_problem(target, "file", missing_ok=True)
        if problem is not None:
            raise IdentityError(f"{target} {problem}: not the public key file the run wrote; "
                                "move it away, then resume; nothing was written")
    published = dest / ALLOWLIST_FILENAME
    if published.exists():  # a resumed run: its ledgers are signed by the published keys
        try:
            before = load_allowlist(published)
        except IdentityError as err:
            raise IdentityError(f"{published} is unreadable ({err}); refusing to replace the "
                                "run's public keys") from None
        differ = sorted(p for p in chosen if p in before and before[p] != chosen[p])
        if differ:
            raise IdentityError(
                f"key store {keystore} does not hold this run's keys: {published} lists other "
                f"public keys for {', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}; "
                f"pass the run's key store ({keystore_choices(option, ', or ')}); nothing "
                "was written")
    return chosen


def _key_files(dest: Path, parties: Sequence[str]) -> list[Path]:
    """The public key files :func:`publish_public_keys` writes into ``dest``."""
    return [dest / f"{party}.{suffix}" for party in parties for suffix in ("ed25519.pub", "x25519.pub")]


def publish_public_keys(keystore: Path, dest: Path, parties: Sequence[str],
                        option: str = API_KEYSTORE_OPTION) -> dict[str, PublicIdentity]:
    """Write the public keys of ``parties`` from ``keystore`` into ``dest``: ``allowlist.json``
    (those parties only) and each party's ``.ed25519.pub``/``.x25519.pub``. No private key is
    copied. Returns the published identities. Refuses (IdentityError, nothing written) as
    :func:`check_public_keys` does. A file that already holds its bytes is left as it is; one
    that holds other bytes (a resumed run's key file damaged or replaced since) is written
    again with a warning naming it."""
    from secure_fedora.core.files import atomic_write_bytes

    chosen = check_public_keys(keystore, dest, parties, option)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = [(target, keystore / target.name) for target in _key_files(dest, parties)]
    published = [(target, src.read_bytes()) for target, src in files if src.is_file()]
    published.append((dest / ALLOWLIST_FILENAME, allowlist_bytes(chosen)))
    for target, data in published:
        try:  # one byte more than the key file tells a longer file from it
            held: bytes | None = read_regular_bytes(target, len(data) + 1)
        except FileNotFoundError:
            held = None
        if held == data:
            continue
        if held is not None:
            log.warning("%s did not hold the public key file the key store %s gives for it "
                        "(damaged or replaced since the run wrote it): written again from the "
                        "key store", target, keystore)
        atomic_write_bytes(target, data)
    return chosen
