"""Party identities: an Ed25519 signing key and an X25519 key-agreement key per party.

Every party of a federation (clients such as ``"client-003"`` and the ``"server"``) owns

- an Ed25519 key pair, used to sign message envelopes and privacy-ledger entries;
- an X25519 key pair, used to receive sealed messages (e.g. the CKKS secret context).

:func:`init_keys` writes, for each party, into one directory::

    <party>.ed25519.key   PEM PKCS8 private key, file mode 0600 (created so, never chmod-ed)
    <party>.x25519.key    PEM PKCS8 private key, file mode 0600
    <party>.ed25519.pub   PEM SubjectPublicKeyInfo public key
    <party>.x25519.pub    PEM SubjectPublicKeyInfo public key
    allowlist.json        party id -> raw public keys in hex (what the server loads)

Assumption (stated, not enforced by cryptography): private key files are not
password-encrypted; they are protected only by their file permissions and by the
operating system's access control. :func:`load_identity` refuses private key files that
are readable or writable by group or others, or that are symbolic links.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from privacy.errors import ToolkitError
from privacy.paths import NotRegularFileError, check_path, read_regular_bytes

__all__ = [
    "ALLOWLIST_FILENAME",
    "Identity",
    "IdentityError",
    "PUBLIC_FILE_SUFFIX",
    "PublicIdentity",
    "SERVER_ID",
    "assemble_allowlist",
    "check_key_directory",
    "client_ids",
    "default_party_ids",
    "init_keys",
    "init_party",
    "install_allowlist",
    "load_allowlist",
    "load_identity",
    "load_public_file",
    "load_public_identity",
    "validate_federation_party",
    "validate_party_id",
]

SERVER_ID = "server"
ALLOWLIST_FILENAME = "allowlist.json"
ALLOWLIST_VERSION = 1

_PARTY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PRIVATE_MODE = 0o600
_DIR_MODE = 0o700


class IdentityError(ToolkitError):
    """A key file or allowlist is missing, unsafe, of the wrong type, or corrupt."""


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of a party's identity: what others need to verify and seal to it."""

    party_id: str
    verify_key: Ed25519PublicKey
    agreement_key: X25519PublicKey

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Return True iff ``signature`` is a valid Ed25519 signature of ``message`` by this party."""
        try:
            self.verify_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def verify_key_hex(self) -> str:
        """The raw 32-byte Ed25519 public key, hex encoded."""
        return self.verify_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ).hex()

    def agreement_key_hex(self) -> str:
        """The raw 32-byte X25519 public key, hex encoded."""
        return self.agreement_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ).hex()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicIdentity):
            return NotImplemented
        return (
            self.party_id == other.party_id
            and self.verify_key_hex() == other.verify_key_hex()
            and self.agreement_key_hex() == other.agreement_key_hex()
        )

    def __hash__(self) -> int:
        return hash((self.party_id, self.verify_key_hex(), self.agreement_key_hex()))


@dataclass(frozen=True)
class Identity:
    """A party's private identity: its Ed25519 signing key and X25519 key-agreement key."""

    party_id: str
    signing_key: Ed25519PrivateKey
    agreement_key: X25519PrivateKey

    @property
    def public(self) -> PublicIdentity:
        """The matching :class:`PublicIdentity`."""
        return PublicIdentity(
            party_id=self.party_id,
            verify_key=self.signing_key.public_key(),
            agreement_key=self.agreement_key.public_key(),
        )

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``message``."""
        return self.signing_key.sign(message)

    @classmethod
    def generate(cls, party_id: str) -> Identity:
        """A fresh in-memory identity (for tests and in-process simulations; nothing is written)."""
        validate_party_id(party_id)
        return cls(party_id, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def validate_party_id(party_id: str) -> str:
    """Return ``party_id`` if it is a safe file-name component, else raise :class:`IdentityError`.

    Allowed: 1-64 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit (so
    no path separators, no ``..`` traversal, no hidden files).
    """
    if not isinstance(party_id, str) or not _PARTY_ID_RE.match(party_id):
        raise IdentityError(
            f"invalid party id {party_id!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return party_id


#: Most client ids one federation may have (a key pair per client: millions of files).
MAX_CLIENT_IDS = 1_000_000


def client_ids(num_clients: int) -> list[str]:
    """Canonical client ids ``client-000`` ... (zero padded to at least three digits)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) \
            or not 0 <= num_clients <= MAX_CLIENT_IDS:
        raise IdentityError(f"num_clients must be an integer in [0, {MAX_CLIENT_IDS:,}], got "
                            f"{num_clients!r}")
    width = max(3, len(str(max(num_clients - 1, 0))))
    return [f"client-{i:0{width}d}" for i in range(num_clients)]


def default_party_ids(num_clients: int) -> list[str]:
    """``["server", "client-000", ..., "client-<N-1>"]``: the parties of an N-client federation."""
    return [SERVER_ID, *client_ids(num_clients)]


def _paths(directory: Path, party_id: str) -> dict[str, Path]:
    return {
        "ed25519_key": directory / f"{party_id}.ed25519.key",
        "x25519_key": directory / f"{party_id}.x25519.key",
        "ed25519_pub": directory / f"{party_id}.ed25519.pub",
        "x25519_pub": directory / f"{party_id}.x25519.pub",
    }


def _write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path``; the file is created with ``mode`` and never widened later.

    With ``overwrite`` the data goes to a fresh temporary file (created ``O_EXCL`` with
    ``mode``) that atomically replaces ``path``.
    """
    if not overwrite:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        target = path
    else:
        target = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(
            target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode
        )
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if overwrite:
        os.replace(target, path)


def _write_identity(directory: Path, party_id: str, overwrite: bool) -> PublicIdentity:
    """Generate ``party_id``'s identity and write its four key files into ``directory``."""
    ident = Identity.generate(party_id)
    paths = _paths(directory, party_id)
    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    no_enc = serialization.NoEncryption()
    _write_file(paths["ed25519_key"], ident.signing_key.private_bytes(pem, pkcs8, no_enc),
                _PRIVATE_MODE, overwrite)
    _write_file(paths["x25519_key"], ident.agreement_key.private_bytes(pem, pkcs8, no_enc),
                _PRIVATE_MODE, overwrite)
    _write_file(paths["ed25519_pub"], ident.signing_key.public_key().public_bytes(pem, spki),
                0o644, overwrite)
    _write_file(paths["x25519_pub"], ident.agreement_key.public_key().public_bytes(pem, spki),
                0o644, overwrite)
    return ident.public


def init_keys(
    directory: str | os.PathLike[str], party_ids: Iterable[str], overwrite: bool = False
) -> dict[str, PublicIdentity]:
    """Create identities for ``party_ids`` in ``directory`` and write ``allowlist.json``.

    Guarantees: every private key file is created with mode 0600 by ``os.open`` (never
    chmod-ed afterwards; a restrictive umask can only narrow it further); the directory is
    created with mode 0700 if missing, and an existing one writable by group or others or owned
    by another user is refused (:func:`check_key_directory`). Without ``overwrite``, any existing key or allowlist
    file makes the call fail before anything is written (no partial overwrite). An empty
    ``directory`` (the current one), one of spaces or one holding NUL is refused. Returns the
    public identities by party id, in the order given.
    """
    directory = check_path(directory, "the key directory", IdentityError)
    ids = [validate_party_id(p) for p in party_ids]
    if not ids:
        raise IdentityError("init_keys needs at least one party id")
    duplicates = sorted({p for p in ids if ids.count(p) > 1})
    if duplicates:
        raise IdentityError(f"duplicate party ids: {', '.join(duplicates)}")
    if directory.exists() and not directory.is_dir():
        raise IdentityError(f"key directory {directory} exists and is not a directory")
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    check_key_directory(directory)
    allowlist_path = directory / ALLOWLIST_FILENAME
    if not overwrite:
        existing = [
            str(path)
            for p in ids
            for path in _paths(directory, p).values()
            if path.exists() or path.is_symlink()
        ]
        if allowlist_path.exists():
            existing.append(str(allowlist_path))
        if existing:
            raise IdentityError(
                f"refusing to overwrite existing key files (--force on the command line, overwrite=True in Python, replaces them): {', '.join(existing)}"
            )

    # an allowlist to merge into is read (and so validated) before any key is replaced
    previous = load_allowlist(allowlist_path) if overwrite and allowlist_path.exists() else {}
    identities = {party_id: _write_identity(directory, party_id, overwrite) for party_id in ids}

    # Keep the parties of an existing allowlist that were not regenerated now.
    merged = {p: pub for p, pub in previous.items() if p not in identities}
    merged.update(identities)
    _write_file(allowlist_path, allowlist_bytes(merged), 0o644, overwrite)
    return identities


def allowlist_bytes(identities: Mapping[str, PublicIdentity]) -> bytes:
    """Serialize public identities into the allowlist JSON format (sorted, stable)."""
    parties = {}
    for party_id in sorted(identities):
        pub = identities[party_id]
        if pub.party_id != party_id:
            raise IdentityError(f"allowlist key {party_id!r} holds identity of {pub.party_id!r}")
        parties[party_id] = {"ed25519": pub.verify_key_hex(), "x25519": pub.agreement_key_hex()}
    doc = {"version": ALLOWLIST_VERSION, "parties": parties}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def check_key_directory(directory: str | os.PathLike[str]) -> None:
    """Refuse (IdentityError) a key directory that another user could change.

    The private key files are checked one by one (0600, owned by this user), but the
    directory decides which files those are: in a directory writable by group or others, or
    owned by another user, someone else could replace the allowlist or swap in key files.
    """
    directory = Path(directory)
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise IdentityError(f"cannot read the key directory {directory}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise IdentityError(f"key directory {directory} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise IdentityError(f"key directory {directory} is owned by uid {st.st_uid}, not by "
                            "this user")
    if st.st_mode & 0o022:
        raise IdentityError(
            f"key directory {directory} has permissions {stat.S_IMODE(st.st_mode):04o}: group or "
            "others could replace its keys or allowlist; restrict it (chmod go-w, or 0700)")


def _read_private_pem(path: Path) -> bytes:
    """Read a private key file, refusing symlinks and group/other-accessible modes."""
    if path.is_symlink():
        raise IdentityError(f"private key {path} is a symbolic link; refusing to follow it")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise IdentityError(f"private key file {path} does not exist") from exc
    except OSError as exc:
        raise IdentityError(f"cannot open private key file {path}: {exc}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory by fd number
        os.close(fd)
        raise IdentityError(f"private key {path} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if st.st_mode & 0o077:
            raise IdentityError(
                f"private key {path} has permissions {stat.S_IMODE(st.st_mode):04o}; it must not "
                "be accessible by group or others (expected 0600)"
            )
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise IdentityError(f"private key {path} is owned by uid {st.st_uid}, not by this user")
        return fh.read()


def _load_private(path: Path, expected: type, label: str) -> object:
    data = _read_private_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"private key {path} is not a valid unencrypted PEM key: {exc}") from exc
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for odd key types
        raise IdentityError(f"private key {path} could not be parsed: {exc}") from exc
    if not isinstance(key, expected):
        raise IdentityError(
            f"private key {path} is a {type(key).__name__}, expected an {label} private key"
        )
    return key


def _load_public(path: Path, expected: type, label: str) -> object:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"public key file {path} does not exist") from exc
    except OSError as exc:
        raise IdentityError(f"cannot read public key file {path}: {exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"public key {path} is not a valid PEM key: {exc}") from exc
    except Exception as exc:
        raise IdentityError(f"public key {path} could not be parsed: {exc}") from exc
    if not isinstance(key, expected):
        raise IdentityError(
            f"public key {path} is a {type(key).__name__}, expected an {label} public key"
        )
    return key


def load_identity(directory: str | os.PathLike[str], party_id: str) -> Identity:
    """Load ``party_id``'s private identity from ``directory``.

    Raises :class:`IdentityError` when ``directory`` is writable by group or others or owned
    by another user, or a key file is missing, is a symlink, is accessible by group or others,
    is owned by another user, is corrupt PEM, or holds the wrong key type.
    """
    validate_party_id(party_id)
    check_key_directory(directory)
    paths = _paths(Path(directory), party_id)
    signing = _load_private(paths["ed25519_key"], Ed25519PrivateKey, "Ed25519")
    agreement = _load_private(paths["x25519_key"], X25519PrivateKey, "X25519")
    assert isinstance(signing, Ed25519PrivateKey) and isinstance(agreement, X25519PrivateKey)
    return Identity(party_id, signing, agreement)


def load_public_identity(directory: str | os.PathLike[str], party_id: str) -> PublicIdentity:
    """Load ``party_id``'s public identity from its ``.pub`` PEM files in ``directory``."""
    validate_party_id(party_id)
    paths = _paths(Path(directory), party_id)
    verify = _load_public(paths["ed25519_pub"], Ed25519PublicKey, "Ed25519")
    agreement = _load_public(paths["x25519_pub"], X25519PublicKey, "X25519")
    assert isinstance(verify, Ed25519PublicKey) and isinstance(agreement, X25519PublicKey)
    return PublicIdentity(party_id, verify, agreement)


def _raw_key(hex_value: object, party_id: str, field: str, path: Path) -> bytes:
    if not isinstance(hex_value, str):
        raise IdentityError(f"allowlist {path}: party {party_id!r} field {field!r} must be a hex string")
    try:
        raw = bytes.fromhex(hex_value)
    except ValueError:
        raise IdentityError(
            f"allowlist {path}: party {party_id!r} field {field!r} is not valid hex"
        ) from None
    if len(raw) != 32:
        raise IdentityError(
            f"allowlist {path}: party {party_id!r} field {field!r} must be 32 bytes, got {len(raw)}"
        )
    return raw


def _read_regular_file(path: Path, what: str, give: str, give_in_dir: str | None = None,
                       limit: int = -1) -> bytes:
    """The bytes of ``path`` (at most ``limit``), never waiting on it
    (:func:`privacy.paths.read_regular_bytes`): IdentityError naming ``what`` and ``path`` for
    a directory (saying to give ``give_in_dir``, else ``give``), a missing or unreadable file,
    and anything but a regular file (a FIFO, device or socket)."""
    try:
        return read_regular_bytes(path, limit)
    except IsADirectoryError:
        raise IdentityError(f"{what} {path} is a directory; give {give_in_dir or give}") from None
    except FileNotFoundError as exc:
        raise IdentityError(f"{what} {path} does not exist") from exc
    except NotRegularFileError:
        raise IdentityError(f"{what} {path} is not a regular file (a FIFO, device or "
                            f"socket); give {give}") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc}") from None


def load_allowlist(path: str | os.PathLike[str]) -> dict[str, PublicIdentity]:
    """Load the allowlist JSON written by :func:`init_keys`: party id -> :class:`PublicIdentity`.

    Raises :class:`IdentityError` for a missing file, invalid JSON, an unknown version, an
    invalid party id, or a key that is not 32 bytes of hex.
    """
    path = Path(path)
    data = _read_regular_file(path, "allowlist file", "the allowlist.json file itself")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # incl. JSONDecodeError, huge integers
        raise IdentityError(f"allowlist file {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != ALLOWLIST_VERSION:
        raise IdentityError(f"allowlist {path}: expected a JSON object with version {ALLOWLIST_VERSION}")
    parties = doc.get("parties")
    if not isinstance(parties, dict):
        raise IdentityError(f"allowlist {path}: 'parties' must be an object")
    result: dict[str, PublicIdentity] = {}
    for party_id, entry in parties.items():
        try:
            validate_party_id(party_id)
        except IdentityError as exc:
            raise IdentityError(f"allowlist {path}: {exc}") from None
        if not isinstance(entry, dict):
            raise IdentityError(f"allowlist {path}: entry for {party_id!r} must be an object")
        ed = _raw_key(entry.get("ed25519"), party_id, "ed25519", path)
        x = _raw_key(entry.get("x25519"), party_id, "x25519", path)
        try:
            verify = Ed25519PublicKey.from_public_bytes(ed)
            agreement = X25519PublicKey.from_public_bytes(x)
        except ValueError as exc:
            raise IdentityError(f"allowlist {path}: invalid key for {party_id!r}: {exc}") from exc
        result[party_id] = PublicIdentity(party_id, verify, agreement)
    return result


# --------------------------------------------------------------------------- one party's keys
#: The file a party sends the operator: its public keys, an allowlist of that party alone,
#: named ``<party>.public.json``.
PUBLIC_FILE_SUFFIX = ".public.json"
_FEDERATION_PARTY_RE = re.compile(r"^(server|client-[0-9]{3,})$")
_KEY_FILE_SUFFIXES = (".ed25519.key", ".x25519.key", ".ed25519.pub", ".x25519.pub")
_PUBLIC_FILE_LIMIT = 64 * 1024  # a one-party allowlist is about 200 bytes


def validate_federation_party(party_id: str) -> str:
    """Return ``party_id`` if it names a party of a Flower federation (``server`` or
    ``client-NNN``, the client's index zero padded to at least three digits), else raise
    :class:`IdentityError` saying which ids exist."""
    if not isinstance(party_id, str) or not _FEDERATION_PARTY_RE.match(party_id):
        raise IdentityError(
            f"invalid party id {party_id!r}: a federation's parties are 'server' and "
            "'client-NNN', the client's index zero padded to three digits (client-000, "
            "client-001, ...; to four for every client of a federation of over 1,000)")
    return party_id


def _parties_with_keys(directory: Path) -> list[str]:
    """The parties some key file in ``directory`` belongs to."""
    parties = set()
    for path in directory.iterdir():
        for suffix in _KEY_FILE_SUFFIXES:
            if path.name.endswith(suffix) and len(path.name) > len(suffix):
                parties.add(path.name[: -len(suffix)])
    return sorted(parties)


def init_party(directory: str | os.PathLike[str], party_id: str,
               overwrite: bool = False) -> tuple[PublicIdentity, Path]:
    """Create one party's identity in its own ``directory`` (created 0700; an existing one must
    pass :func:`check_key_directory`): its private keys (0600, as :func:`init_keys` writes
    them), their ``.pub`` files and ``<party>.public.json``, the public keys it sends to the
    operator (returned with its path). No ``allowlist.json`` is written: the operator's is
    installed by :func:`install_allowlist`. Refused (IdentityError, nothing written): a
    party id that is not ``server`` or ``client-NNN``; a directory holding another party's
    key files; without ``overwrite``, one holding this party's key files, public file or an
    allowlist. With ``overwrite`` the party's keys are replaced and an ``allowlist.json``
    (which lists the old public key) is removed."""
    directory = check_path(directory, "the identity directory", IdentityError)
    validate_federation_party(party_id)
    if directory.exists() and not directory.is_dir():
        raise IdentityError(f"identity directory {directory} exists and is not a directory")
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    check_key_directory(directory)
    others = [p for p in _parties_with_keys(directory) if p != party_id]
    if others:
        raise IdentityError(
            f"{directory} holds key files of {', '.join(others[:3])}: an identity directory "
            "holds one party's keys; choose a new directory for this party; nothing was written")
    public_file = directory / f"{party_id}{PUBLIC_FILE_SUFFIX}"
    allowlist = directory / ALLOWLIST_FILENAME
    existing = [str(path) for path in (*_paths(directory, party_id).values(), public_file,
                                       allowlist) if path.exists() or path.is_symlink()]
    if existing and not overwrite:
        raise IdentityError(
            f"{directory} already holds an identity of {party_id} ({', '.join(existing[:3])}"
            f"{' ...' if len(existing) > 3 else ''}): refusing to replace it (its keys may "
            "have signed ledgers and envelopes already); pass --force to replace it (in "
            "Python overwrite=True), and then have the operator allowlist the new public key")
    identity = _write_identity(directory, party_id, overwrite)
    _write_file(public_file, allowlist_bytes({party_id: identity}), 0o644, overwrite)
    if overwrite:
        allowlist.unlink(missing_ok=True)  # it lists the replaced key
    return identity, public_file


def load_public_file(path: str | os.PathLike[str]) -> PublicIdentity:
    """The public identity in a party's ``<party>.public.json`` (:func:`init_party`).

    Refused (IdentityError naming the file, never waiting on it): one that is not a regular
    file (a FIFO, device or socket), a file holding a private key, one not named
    ``<party>.public.json`` (a ``.key`` file is named as a private key), one that is not a
    one-party allowlist, and one whose party is not the party its name gives."""
    path = Path(path)
    data = _read_regular_file(path, "public key file",
                              f"the <party>{PUBLIC_FILE_SUFFIX} file itself",
                              f"the <party>{PUBLIC_FILE_SUFFIX} file it holds",
                              limit=_PUBLIC_FILE_LIMIT + 1)
    if b"PRIVATE KEY" in data or path.name.endswith(".key"):
        raise IdentityError(
            f"{path} is a private key: a party's private keys never leave its host; give its "
            f"public key file <party>{PUBLIC_FILE_SUFFIX} (written by `secure-fedora keys "
            "party`), and treat this private key as exposed if it was copied")
    if not path.name.endswith(PUBLIC_FILE_SUFFIX) or path.name == PUBLIC_FILE_SUFFIX:
        raise IdentityError(f"{path} is not a public key file: expected <party>"
                            f"{PUBLIC_FILE_SUFFIX}, as `secure-fedora keys party` writes it")
    if len(data) > _PUBLIC_FILE_LIMIT:
        raise IdentityError(f"public key file {path} is larger than {_PUBLIC_FILE_LIMIT} "
                            "bytes: not a party's public keys")
    named = path.name[: -len(PUBLIC_FILE_SUFFIX)]
    parties = load_allowlist(path)
    if len(parties) != 1:
        raise IdentityError(f"public key file {path} lists {len(parties)} parties "
                            f"({', '.join(sorted(parties)[:3])}); a party's file lists itself only")
    (party,) = parties
    if party != named:
        raise IdentityError(f"public key file {path} is named for {named!r} but holds the keys "
                            f"of {party!r}: renamed, or sent by the wrong party")
    validate_federation_party(party)
    return parties[party]


def assemble_allowlist(paths: Iterable[str | os.PathLike[str]],
                       num_clients: int | None = None,
                       server: PublicIdentity | None = None) -> dict[str, PublicIdentity]:
    """The federation's allowlist from its parties' public key files (:func:`load_public_file`)
    and, given as ``server``, the server's own public identity (the operator's host holds it).

    Refused (IdentityError): no file, a file given twice, two files of one party, one key in
    two parties' files, no ``server`` (every client accepts only the allowlisted server) or a
    server file beside ``server``, a ``num_clients`` below 1, and with ``num_clients`` a
    party missing or one that is not
    ``server`` or ``client-000`` ... ``client-<num_clients - 1>``. Without ``num_clients``
    the federation is the one the highest client given implies (``client-004``: 5 clients),
    refused in the same way: a gap (``client-001`` without ``client-000``) is named as missing,
    and at least one client's file is required."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise IdentityError("no public key files given")
    if num_clients is not None and (isinstance(num_clients, bool) or not isinstance(num_clients, int)
                                    or num_clients < 1):
        raise IdentityError(f"a federation has at least one client: the number of clients must "
                            f"be an integer of at least 1, got {num_clients!r}")
    seen: dict[Path, Path] = {}
    by_party: dict[str, tuple[Path, PublicIdentity]] = {}
    if server is not None:
        by_party[SERVER_ID] = (Path(f"this host's {SERVER_ID} identity"), server)
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            raise IdentityError(f"public key file {path} is given twice")
        seen[resolved] = path
        pub = load_public_file(path)
        if pub.party_id in by_party:
            raise IdentityError(f"two public key files of {pub.party_id}: "
                                f"{by_party[pub.party_id][0]} and {path}; give one")
        for other, (other_path, known) in by_party.items():
            if (known.verify_key_hex() == pub.verify_key_hex()
                    or known.agreement_key_hex() == pub.agreement_key_hex()):
                raise IdentityError(
                    f"{other_path} ({other}) and {path} ({pub.party_id}) hold the same public "
                    "key: one party's keys copied for another; each party makes its own")
        by_party[pub.party_id] = (path, pub)
    parties = {party: pub for party, (_, pub) in by_party.items()}
    if SERVER_ID not in parties:
        raise IdentityError(f"no public key file of the server ({SERVER_ID}"
                            f"{PUBLIC_FILE_SUFFIX}): every client accepts only the "
                            "allowlisted server")
    stated = num_clients is not None
    if num_clients is None:
        num_clients = _implied_clients(parties)
    expected = default_party_ids(num_clients)
    missing = [p for p in expected if p not in parties]
    extra = sorted(p for p in parties if p not in expected)
    missing_text = (
        f"no public key file of {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
    )
    if extra:
        # Named first: a file of a party outside the federation is the likelier mistake
        # (a wrong client count or a misnamed party), and the missing party follows from it.
        raise IdentityError(
            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} is "
            f"not a party of a federation of {num_clients} clients "
            f"({expected[1]} ... {expected[-1]})"
            + (f"; and {missing_text} was given" if missing else "")
        )
    if missing:
        raise IdentityError(
            f"{missing_text} ({num_clients} clients)" if stated else
            f"{missing_text} was given, though {expected[-1]}'s was: a federation's clients are"
            f" client-000 ... client-<N-1> (give the number of clients, --clients N, to check"
            " that none is missing)")
    return {party: parties[party] for party in sorted(parties)}


def _implied_clients(parties: Mapping[str, PublicIdentity]) -> int:
    """The number of clients of the federation whose highest client is among ``parties``
    (``client-004``: 5); IdentityError when no party is a client."""
    indices = [int(p[len("client-"):]) for p in parties if _FEDERATION_PARTY_RE.match(p)
               and p != SERVER_ID]
    indices = [i for i in indices if i < MAX_CLIENT_IDS]  # beyond: named as no party
    if not indices:
        raise IdentityError("no client's public key file given: a federation has at least one "
                            "client (client-000)")
    return max(indices) + 1


def _check_key_holder_entry(allowlist: str | os.PathLike[str],
                            listed: Mapping[str, PublicIdentity],
                            key_holder: str | os.PathLike[str]) -> None:
    """IdentityError unless ``listed`` (read from ``allowlist``) lists the keys of the client
    whose public key file is ``key_holder``."""
    holder = load_public_file(key_holder)
    if holder.party_id == SERVER_ID:
        raise IdentityError(f"{key_holder} is the server's public key file: the key holder is "
                            f"a client; give its client-XYZ{PUBLIC_FILE_SUFFIX}")
    if holder.party_id not in listed:
        raise IdentityError(
            f"allowlist {allowlist} lacks the key holder {holder.party_id} ({key_holder}): this "
            "node could not check that its CKKS context was made by the key holder; nothing "
            "was written")
    if listed[holder.party_id] != holder:
        raise IdentityError(
            f"allowlist {allowlist} lists other public keys for the key holder "
            f"{holder.party_id} than {key_holder}: this node would open CKKS contexts signed "
            "by a key the key holder does not hold; assemble the allowlist from the key "
            "holder's current public key file; nothing was written")


def install_allowlist(directory: str | os.PathLike[str],
                      allowlist: str | os.PathLike[str],
                      key_holder: str | os.PathLike[str] | None = None) -> tuple[str, bool]:
    """Install the federation's ``allowlist`` into a party's identity ``directory`` (the one
    :func:`init_party` made): written as ``directory/allowlist.json``, the file a Flower
    party reads. Returns the party and whether an allowlist with other content was replaced.

    Refused (IdentityError, nothing written): a directory holding no identity or several
    parties' keys, keys that do not load, an allowlist that does not load, lacks ``server``
    or this party, or lists another public key for this party (assembled from another
    public key file than this directory's); with ``key_holder``, the CKKS key holder's public
    key file (:func:`load_public_file`, a client's), an allowlist that lacks that client or
    lists other keys for it (a client opens only CKKS contexts signed by the key its
    allowlist lists for the key holder)."""
    directory = Path(directory)
    check_key_directory(directory)
    parties = _parties_with_keys(directory)
    if not parties:
        raise IdentityError(f"{directory} holds no identity; create one with `secure-fedora "
                            "keys party DIR --party PARTY`")
    if len(parties) > 1:
        raise IdentityError(f"{directory} holds keys of several parties ({', '.join(parties[:3])}"
                            "): install the allowlist into one party's identity directory")
    (party,) = parties
    identity = load_identity(directory, party)
    listed = load_allowlist(allowlist)
    if SERVER_ID not in listed:
        raise IdentityError(f"allowlist {allowlist} lacks {SERVER_ID}: every client accepts "
                            "only the allowlisted server")
    if party not in listed:
        raise IdentityError(f"allowlist {allowlist} lacks {party}, the party of {directory}: "
                            f"assemble it with {party}{PUBLIC_FILE_SUFFIX}")
    if listed[party] != identity.public:
        raise IdentityError(
            f"allowlist {allowlist} lists other public keys for {party} than {directory} "
            f"holds: it was assembled from another {party}{PUBLIC_FILE_SUFFIX} (an older one, "
            "or another host's); nothing was written")
    if key_holder is not None:
        _check_key_holder_entry(allowlist, listed, key_holder)
    data = allowlist_bytes(listed)
    dest = directory / ALLOWLIST_FILENAME
    replaced = dest.exists() and dest.read_bytes() != data
    _write_file(dest, data, 0o644, overwrite=True)
    return party, replaced
