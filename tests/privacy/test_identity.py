import contextlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy.identity import (
    ALLOWLIST_FILENAME,
    Identity,
    IdentityError,
    PublicIdentity,
    allowlist_bytes,
    check_key_directory,
    client_ids,
    default_party_ids,
    init_keys,
    load_allowlist,
    load_identity,
    load_public_file,
    load_public_identity,
    validate_party_id,
)


@pytest.fixture()
def keydir(tmp_path):
    d = tmp_path / "keys"
    pubs = init_keys(d, default_party_ids(3))
    return d, pubs


def test_default_party_ids_and_client_ids():
    assert default_party_ids(2) == ["server", "client-000", "client-001"]
    assert client_ids(1001)[-1] == "client-1000"
    assert client_ids(0) == []
    with pytest.raises(IdentityError):
        client_ids(-1)


def test_init_keys_writes_private_keys_0600_and_allowlist(keydir):
    d, pubs = keydir
    assert set(pubs) == {"server", "client-000", "client-001", "client-002"}
    for party in pubs:
        for suffix in ("ed25519.key", "x25519.key"):
            mode = stat.S_IMODE(os.stat(d / f"{party}.{suffix}").st_mode)
            assert mode == 0o600, (party, suffix, oct(mode))
        assert (d / f"{party}.ed25519.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    allow = load_allowlist(d / ALLOWLIST_FILENAME)
    assert allow == pubs
    doc = json.loads((d / ALLOWLIST_FILENAME).read_text())
    assert len(bytes.fromhex(doc["parties"]["server"]["ed25519"])) == 32


def test_private_key_created_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        init_keys(tmp_path / "k", ["client-000"])
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "k" / "client-000.ed25519.key").st_mode)
    assert mode == 0o600


def test_load_identity_roundtrip_signs_verifiably(keydir):
    d, pubs = keydir
    ident = load_identity(d, "client-001")
    assert isinstance(ident.signing_key, Ed25519PrivateKey)
    assert isinstance(ident.agreement_key, X25519PrivateKey)
    assert ident.public == pubs["client-001"]
    sig = ident.sign(b"hello")
    assert pubs["client-001"].verify(sig, b"hello")
    assert not pubs["client-001"].verify(sig, b"hellO")
    assert not pubs["client-000"].verify(sig, b"hello")
    assert isinstance(load_public_identity(d, "client-001").verify_key, Ed25519PublicKey)
    assert load_public_identity(d, "client-001") == pubs["client-001"]


def test_refuses_overwrite_without_flag(keydir):
    d, pubs = keydir
    before = (d / "server.ed25519.key").read_bytes()
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        init_keys(d, ["server"])
    assert (d / "server.ed25519.key").read_bytes() == before


def test_overwrite_regenerates_and_keeps_other_parties_in_allowlist(keydir):
    d, pubs = keydir
    new = init_keys(d, ["client-000"], overwrite=True)
    assert new["client-000"] != pubs["client-000"]
    mode = stat.S_IMODE(os.stat(d / "client-000.x25519.key").st_mode)
    assert mode == 0o600
    allow = load_allowlist(d / ALLOWLIST_FILENAME)
    assert allow["client-000"] == new["client-000"]
    assert allow["server"] == pubs["server"]


def test_missing_key_file(keydir):
    d, _ = keydir
    os.unlink(d / "client-002.x25519.key")
    with pytest.raises(IdentityError, match="does not exist"):
        load_identity(d, "client-002")
    with pytest.raises(IdentityError, match="does not exist"):
        load_identity(d, "client-999")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_refuses_group_or_other_readable_private_key(keydir, mode):
    d, _ = keydir
    os.chmod(d / "client-000.ed25519.key", mode)
    with pytest.raises(IdentityError, match="group or others"):
        load_identity(d, "client-000")


@pytest.mark.parametrize("mode", [0o720, 0o702, 0o777, 0o1777])
def test_refuses_key_directory_writable_by_group_or_others(keydir, mode):
    d, _ = keydir
    os.chmod(d, mode)
    with pytest.raises(IdentityError, match="group or others"):
        load_identity(d, "client-000")
    with pytest.raises(IdentityError, match="group or others"):
        init_keys(d, ["client-009"])
    assert not (d / "client-009.ed25519.key").exists()
    os.chmod(d, 0o755)  # readable by others is fine: the private key files are 0600
    load_identity(d, "client-000")
    init_keys(d, ["client-009"], overwrite=True)


def test_key_directory_created_0700_under_a_group_writable_umask(tmp_path):
    old = os.umask(0o002)
    try:
        init_keys(tmp_path / "a" / "k", ["client-000"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "k").st_mode) == 0o700
    load_identity(tmp_path / "a" / "k", "client-000")


def test_check_key_directory_refuses_a_file_and_a_missing_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(IdentityError, match="not a directory"):
        check_key_directory(tmp_path / "f")
    with pytest.raises(IdentityError, match="cannot read"):
        check_key_directory(tmp_path / "missing")


def test_refuses_symlinked_private_key(keydir):
    d, _ = keydir
    target = d / "client-001.ed25519.key"
    link = d / "client-000.ed25519.key"
    os.unlink(link)
    os.symlink(target, link)
    with pytest.raises(IdentityError, match="symbolic link"):
        load_identity(d, "client-000")


def test_wrong_key_type(keydir):
    d, _ = keydir
    # An X25519 key where the Ed25519 signing key should be.
    x = (d / "client-000.x25519.key").read_bytes()
    p = d / "client-000.ed25519.key"
    os.unlink(p)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(x)
    with pytest.raises(IdentityError, match="expected an Ed25519 private key"):
        load_identity(d, "client-000")


def test_corrupt_pem(keydir):
    d, _ = keydir
    p = d / "client-000.x25519.key"
    data = bytearray(p.read_bytes())
    data[40:60] = b"!" * 20
    with open(p, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(IdentityError, match="not a valid unencrypted PEM key|could not be parsed"):
        load_identity(d, "client-000")


def test_encrypted_pem_rejected(tmp_path):
    d = tmp_path / "k"
    init_keys(d, ["client-000"])
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    p = d / "client-000.ed25519.key"
    with open(p, "wb") as fh:
        fh.write(pem)
    with pytest.raises(IdentityError):
        load_identity(d, "client-000")


@pytest.mark.parametrize("bad", ["", "../server", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_invalid_party_ids(tmp_path, bad):
    with pytest.raises(IdentityError, match="invalid party id"):
        validate_party_id(bad)
    with pytest.raises(IdentityError):
        init_keys(tmp_path / "k", [bad])


def test_duplicate_and_empty_party_ids(tmp_path):
    with pytest.raises(IdentityError, match="duplicate"):
        init_keys(tmp_path / "k", ["a", "a"])
    with pytest.raises(IdentityError, match="at least one"):
        init_keys(tmp_path / "k", [])


def test_allowlist_errors(tmp_path, keydir):
    d, _ = keydir
    with pytest.raises(IdentityError, match="does not exist"):
        load_allowlist(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(IdentityError, match="not valid JSON"):
        load_allowlist(bad)
    doc = json.loads((d / ALLOWLIST_FILENAME).read_text())
    doc["parties"]["server"]["ed25519"] = "abcd"
    bad.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="32 bytes"):
        load_allowlist(bad)
    doc["parties"]["server"]["ed25519"] = "zz" * 32
    bad.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="not valid hex"):
        load_allowlist(bad)
    bad.write_text(json.dumps({"version": 99, "parties": {}}))
    with pytest.raises(IdentityError, match="version"):
        load_allowlist(bad)


def test_generated_identity_public_half():
    ident = Identity.generate("client-007")
    pub = ident.public
    assert isinstance(pub, PublicIdentity)
    assert pub.verify(ident.sign(b"m"), b"m")
    assert len(pub.agreement_key_hex()) == 64


def test_overwrite_refuses_a_corrupt_allowlist_before_replacing_any_key(keydir):
    """With --force, every key was replaced and then the corrupt allowlist.json raised: the
    old keys were lost and the store unusable."""
    d, _ = keydir
    (d / ALLOWLIST_FILENAME).write_text("{not json")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(IdentityError, match="allowlist"):
        init_keys(d, ["client-000", "server"], overwrite=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


@pytest.mark.parametrize("directory, why", [("", "is empty"), ("  ", "is empty"),
                                            ("k\x00s", "holds a NUL character")])
def test_init_keys_refuses_an_empty_or_blank_directory(tmp_path, monkeypatch, directory, why):
    """``init_keys("")`` wrote every private key and the allowlist into the current directory
    (and ``"  "`` into a directory of spaces); the CLI's ``keys init ""`` is refused."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IdentityError, match=f"the key directory.* {why}"):
        init_keys(directory, default_party_ids(1))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- one party's own identity
def test_init_party_writes_one_identity_and_refuses_what_it_would_replace(tmp_path):
    from privacy.identity import PUBLIC_FILE_SUFFIX, init_party, load_public_file

    d = tmp_path / "id"
    pub, public_file = init_party(d, "client-004")
    assert public_file == d / f"client-004{PUBLIC_FILE_SUFFIX}"
    assert load_public_file(public_file) == pub == load_identity(d, "client-004").public
    assert not (d / ALLOWLIST_FILENAME).exists()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(IdentityError, match="already holds an identity of client-004.*--force"):
        init_party(d, "client-004")
    with pytest.raises(IdentityError, match="holds key files of client-004"):
        init_party(d, "server", overwrite=True)
    for bad in ("client-4", "client-04", "operator", "../server", "client-004/x", ""):
        with pytest.raises(IdentityError):
            init_party(tmp_path / "other", bad)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    (d / ALLOWLIST_FILENAME).write_bytes(b"{}")
    new, _ = init_party(d, "client-004", overwrite=True)
    assert new != pub and load_identity(d, "client-004").public == new
    assert not (d / ALLOWLIST_FILENAME).exists()  # it listed the replaced key


def test_assemble_allowlist_names_a_party_outside_the_federation_before_a_missing_one(tmp_path):
    """Files of client-000, client-001 and client-005 for 3 clients: the refusal named only the
    missing client-002, never the file given for client-005, the likelier mistake."""
    from privacy.identity import assemble_allowlist, init_party

    files = [
        init_party(tmp_path / p, p)[1] for p in ("server", "client-000", "client-001", "client-005")
    ]
    with pytest.raises(IdentityError) as refused:
        assemble_allowlist(files, num_clients=3)
    assert str(refused.value) == (
        "client-005 is not a party of a federation of 3 clients (client-000 ... client-002); "
        "and no public key file of client-002 was given"
    )


def test_assemble_allowlist_refuses_private_misnamed_duplicate_or_missing_files(tmp_path):
    import shutil

    from privacy.identity import assemble_allowlist, init_party, install_allowlist

    files = {p: init_party(tmp_path / p, p)[1] for p in ("server", "client-000", "client-001")}
    listed = assemble_allowlist(files.values(), num_clients=2)
    assert sorted(listed) == ["client-000", "client-001", "server"]
    server, c0, c1 = files["server"], files["client-000"], files["client-001"]
    cases = [
        ([server, tmp_path / "client-000" / "client-000.ed25519.key"], "is a private key"),
        ([server, tmp_path / "client-000" / "client-000.ed25519.pub"], "not a public key file"),
        ([server, c0, c0], "given twice"),
        ([c0, c1], "no public key file of the server"),
        ([server, c0], None),
        ([server, tmp_path / "client-000"], "is a directory"),
    ]
    for paths, match in cases:
        if match is None:
            with pytest.raises(IdentityError, match="no public key file of client-001"):
                assemble_allowlist(paths, num_clients=2)
            with pytest.raises(IdentityError, match="client-001 is not a party of a federation"):
                assemble_allowlist([server, c0, c1], num_clients=1)
            continue
        with pytest.raises(IdentityError, match=match):
            assemble_allowlist(paths)
    renamed = tmp_path / "client-002.public.json"
    shutil.copyfile(c1, renamed)
    with pytest.raises(IdentityError, match="named for 'client-002' but holds the keys of "
                                            "'client-001'"):
        assemble_allowlist([server, renamed])
    again = tmp_path / "again"
    again.mkdir()
    shutil.copyfile(c1, again / "client-001.public.json")
    with pytest.raises(IdentityError, match="two public key files of client-001"):
        assemble_allowlist([server, c1, again / "client-001.public.json"])
    # install: the party's own keys must be listed as they are
    allowlist = tmp_path / "allowlist.json"
    allowlist.write_bytes(allowlist_bytes(listed))
    assert install_allowlist(tmp_path / "client-000", allowlist) == ("client-000", False)
    assert load_allowlist(tmp_path / "client-000" / ALLOWLIST_FILENAME) == listed
    init_party(tmp_path / "client-001", "client-001", overwrite=True)
    with pytest.raises(IdentityError, match="lists other public keys for client-001"):
        install_allowlist(tmp_path / "client-001", allowlist)
    assert not (tmp_path / "client-001" / ALLOWLIST_FILENAME).exists()
    with pytest.raises(IdentityError, match="holds no identity"):
        install_allowlist(again, allowlist)


def test_install_with_key_holder_refuses_an_allowlist_without_its_genuine_keys(tmp_path):
    """keys install --key-holder: the key holder's entry (what a node checks its CKKS
    context's signature against) must be the key holder's own public key file's, or nothing
    is written."""
    from privacy.identity import assemble_allowlist, init_party, install_allowlist

    files = {p: init_party(tmp_path / p, p)[1] for p in ("server", "client-000", "client-001")}
    holder = files["client-000"]
    other = init_party(tmp_path / "elsewhere", "client-000")[1]  # another host's client-000
    cases = {
        "lacks the key holder client-000": [files["server"], files["client-001"]],
        "other public keys for the key holder client-000": [files["server"], other,
                                                            files["client-001"]],
    }
    node = tmp_path / "client-001"
    for match, public_files in cases.items():
        allowlist = tmp_path / "allowlist.json"
        # a damaged allowlist, as no one assembles it (a gap, or another client-000)
        allowlist.write_bytes(allowlist_bytes(
            {pub.party_id: pub for pub in map(load_public_file, public_files)}))
        install_allowlist(node, allowlist)  # without --key-holder: only its own entry checked
        installed = (node / ALLOWLIST_FILENAME).read_bytes()
        with pytest.raises(IdentityError, match=match):
            install_allowlist(node, allowlist, key_holder=holder)
        assert (node / ALLOWLIST_FILENAME).read_bytes() == installed
    with pytest.raises(IdentityError, match="the key holder is a client"):
        install_allowlist(node, allowlist, key_holder=files["server"])
    genuine = tmp_path / "genuine.json"
    genuine.write_bytes(allowlist_bytes(assemble_allowlist(files.values(), num_clients=2)))
    assert install_allowlist(node, genuine, key_holder=holder) == ("client-001", True)
    assert load_allowlist(node / ALLOWLIST_FILENAME)["client-000"] == load_public_file(holder)


def test_assemble_allowlist_refuses_one_key_under_two_parties(tmp_path):
    from privacy.identity import assemble_allowlist, init_party

    server = init_party(tmp_path / "server", "server")[1]
    pub, _ = init_party(tmp_path / "client-000", "client-000")
    copied = tmp_path / "client-001.public.json"  # client-000's keys under client-001's name
    copied.write_bytes(allowlist_bytes({"client-001": PublicIdentity(
        "client-001", pub.verify_key, pub.agreement_key)}))
    with pytest.raises(IdentityError, match="hold the same public key"):
        assemble_allowlist([server, tmp_path / "client-000" / "client-000.public.json", copied])


def test_assemble_allowlist_refuses_a_federation_without_clients(tmp_path):
    """num_clients 0 (or less) is refused naming it, not an IndexError from the message."""
    from privacy.identity import assemble_allowlist, init_party

    server = init_party(tmp_path / "server", "server")[1]
    c0 = init_party(tmp_path / "client-000", "client-000")[1]
    for n in (0, -3):
        with pytest.raises(IdentityError, match=f"at least one client.*got {n}"):
            assemble_allowlist([server, c0], num_clients=n)


@contextlib.contextmanager
def _fifo(path: Path) -> Iterator[Path]:
    """A FIFO at ``path``; a reader still waiting on it after 3 s is let go by a watchdog (and
    then fails its test's match instead of hanging the suite)."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        while not done.wait(3.0):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=unblock, daemon=True).start()
    try:
        yield path
    finally:
        done.set()


def test_a_public_key_file_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    """A FIFO in a public key file's place is refused at once (reading it would wait for a
    writer forever), naming the file."""
    from privacy.identity import assemble_allowlist, init_party, load_public_file

    server = init_party(tmp_path / "server", "server")[1]
    with _fifo(tmp_path / "client-000.public.json") as fifo:
        with pytest.raises(IdentityError, match=f"{fifo} is not a regular file"):
            load_public_file(fifo)
        with pytest.raises(IdentityError, match="not a regular file"):
            assemble_allowlist([server, fifo], num_clients=1)


def test_an_allowlist_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    """`keys install DIR FIFO` and `audit verify --allowlist FIFO` read the allowlist with
    read_text, which waited for a writer forever; a directory read as "not valid JSON"."""
    from privacy.identity import load_allowlist

    with _fifo(tmp_path / "allowlist.json") as fifo:
        with pytest.raises(IdentityError, match=f"{fifo} is not a regular file"):
            load_allowlist(fifo)
    with pytest.raises(IdentityError, match="is a directory"):
        load_allowlist(tmp_path)
    with pytest.raises(IdentityError, match="does not exist"):
        load_allowlist(tmp_path / "missing.json")
