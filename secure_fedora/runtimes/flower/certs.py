"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Everything is generated locally with the ``cryptography`` package; nothing is fetched.

- ``make_certificates`` creates a self-signed certificate authority and a server certificate
  signed by it, valid for the given host names / IP addresses (``localhost`` and
  ``127.0.0.1`` are always included). The SuperLink serves its Fleet, Control and Runtime
  APIs with the server certificate; SuperNodes, the ``flwr`` CLI and the SuperExec verify it
  against the CA certificate.
- ``make_node_keys`` creates one SuperNode authentication key pair per client. Flower 1.42
  requires EC keys on a NIST curve: the private key in OpenSSH format (read by
  ``flower-supernode --auth-supernode-private-key``), the public key in OpenSSH format (read
  by ``flwr supernode register <public key>``, which registers it with a SuperLink started
  with ``--enable-supernode-auth``). A node whose key was not registered is refused.

All private keys are written with mode 0600 and atomically (temporary file + rename), so a
crash never leaves a half-written key behind.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.errors import ToolkitError
from privacy.paths import path_problem

__all__ = [
    "CertificateError",
    "CertificatePaths",
    "NodeKeyPaths",
    "DEFAULT_HOSTS",
    "check_certificates",
    "check_node_keys",
    "make_certificates",
    "make_node_keys",
]

#: Hosts always present in the server certificate's subjectAltName.
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class CertificateError(ToolkitError, ValueError):
    """Raised for an invalid host name, node name, validity period or output directory."""


def _output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` resolved; CertificateError when it is a file, a symbolic link loop or
    cannot be reached (what :func:`privacy.paths.path_problem` says of it)."""
    problem = path_problem(Path(out_dir).expanduser(), missing_ok=True)
    if problem == "is not a directory":
        raise CertificateError(f"output path {Path(out_dir).expanduser().resolve()} exists and "
                               "is not a directory")
    if problem is not None:
        raise CertificateError(f"output path {out_dir} {problem}; name a directory")
    return Path(out_dir).expanduser().resolve()


@dataclass(frozen=True)
class CertificatePaths:
    """Files written by :func:`make_certificates` (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class NodeKeyPaths:
    """One SuperNode's authentication key pair (OpenSSH formats)."""

    name: str
    private_key: Path
    public_key: Path


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _san_entries(hosts: list[str]) -> tuple[list[x509.GeneralName], tuple[str, ...]]:
    """Validate hosts and turn them into subjectAltName entries (IPs as IP, names as DNS)."""
    entries: list[x509.GeneralName] = []
    seen: list[str] = []
    for raw in [*hosts, *DEFAULT_HOSTS]:
        if not isinstance(raw, str) or not raw.strip():
            raise CertificateError(f"host {raw!r} is not a non-empty string")
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME_RE.match(host):
                raise CertificateError(f"host {raw!r} is neither an IP address nor a DNS name") from None
            if host.rstrip(".").rsplit(".", 1)[-1].isdigit():
                # An all-numeric top label is no DNS name (RFC 1123 2.1): '999.1.1.1' is a
                # mistyped address, and a certificate naming it matches no host.
                raise CertificateError(
                    f"host {raw!r} is not a valid IP address, and a DNS name cannot end in an "
                    "all-numeric label") from None
            key = host.lower()
            if key not in seen:
                seen.append(key)
                entries.append(x509.DNSName(key))
        else:
            key = str(ip)
            if key not in seen:
                seen.append(key)
                entries.append(x509.IPAddress(ip))
    return entries, tuple(seen)


def _check_targets(paths: list[Path], overwrite: bool) -> None:
    """Refuse (CertificateError) what writing ``paths`` would fail on or replace unasked:
    without ``overwrite`` a path that exists; with it, one that exists and is not a regular
    file (a directory: writing the others first would leave them half replaced)."""
    for path in paths:
        if path.exists() and not overwrite:
            raise CertificateError(f"{path} already exists (--force on the command line, overwrite=True in Python, replaces it)")
        if path.exists() and not path.is_file():
            raise CertificateError(f"{path} exists and is not a regular file; move it away; "
                                   "nothing was written")


def _planned_certificates(
    out_dir: str | os.PathLike[str], hosts: list[str] | tuple[str, ...], valid_days: int,
    overwrite: bool,
) -> tuple[CertificatePaths, list[x509.GeneralName]]:
    """The files :func:`make_certificates` writes and the server certificate's
    subjectAltName entries, every check made and nothing written."""
    if valid_days < 1:
        raise CertificateError(f"valid_days must be at least 1; got {valid_days}")
    last = (_dt.datetime(9999, 12, 31, tzinfo=_dt.timezone.utc)
            - _dt.datetime.now(_dt.timezone.utc)).days
    if valid_days > last:
        raise CertificateError(f"valid_days must be at most {last:,} (X.509 dates end in the"
                               f" year 9999); got {valid_days:,}")
    sans, host_names = _san_entries(list(hosts))
    out = _output_dir(out_dir)
    paths = CertificatePaths(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        hosts=host_names,
    )
    _check_targets([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], overwrite)
    return paths, sans


def check_certificates(
    out_dir: str | os.PathLike[str],
    hosts: list[str] | tuple[str, ...] = (),
    *,
    valid_days: int = 365,
    overwrite: bool = False,
) -> CertificatePaths:
    """The files :func:`make_certificates` with the same arguments writes, each of its
    refusals made here and nothing written."""
    return _planned_certificates(out_dir, hosts, valid_days, overwrite)[0]


def make_certificates(
    out_dir: str | os.PathLike[str],
    hosts: list[str] | tuple[str, ...] = (),
    *,
    valid_days: int = 365,
    common_name: str = "secure-fedora",
    overwrite: bool = False,
) -> CertificatePaths:
    """Create a CA and a CA-signed server certificate for ``hosts`` in ``out_dir``.

    Refused (:func:`check_certificates`) before anything is written. Guarantees: the server
    certificate's subjectAltName holds every given host (IP addresses
    as iPAddress entries, names as dNSName entries) plus ``localhost`` and ``127.0.0.1``; it
    carries ``serverAuth`` extended key usage and is signed by the CA (ECDSA P-384, SHA-384);
    the CA is marked ``CA:TRUE, pathlen:0``. Private keys are unencrypted PEM (PKCS#8) with
    mode 0600; certificates have mode 0644. Existing files are never silently replaced:
    without ``overwrite=True`` a :class:`CertificateError` names the file that exists.
    """
    paths, sans = _planned_certificates(out_dir, hosts, valid_days, overwrite)
    out, host_names = paths.ca_cert.parent, paths.hosts
    out.mkdir(parents=True, exist_ok=True)

    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _dt.timedelta(minutes=5)
    not_after = now + _dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, common_name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, common_name),
            x509.NameAttribute(NameOID.COMMON_NAME, host_names[0]),
        ]
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(server_name)
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    _write_atomic(paths.ca_key, _key_pem(ca_key), 0o600)
    _write_atomic(paths.server_key, _key_pem(server_key), 0o600)
    _write_atomic(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_atomic(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def check_node_keys(
    out_dir: str | os.PathLike[str],
    names: list[str] | tuple[str, ...],
    *,
    overwrite: bool = False,
) -> list[NodeKeyPaths]:
    """The key pairs :func:`make_node_keys` with the same arguments writes, each of its
    refusals made here and nothing written."""
    if len(set(names)) != len(names):
        raise CertificateError(f"node names must be unique; got {list(names)}")
    out = _output_dir(out_dir)
    result: list[NodeKeyPaths] = []
    for name in names:
        if not isinstance(name, str) or not _NODE_NAME_RE.match(name) or name in {".", ".."}:
            raise CertificateError(f"node name {name!r} must match [A-Za-z0-9_.-]{{1,64}}")
        result.append(NodeKeyPaths(name=name, private_key=out / name, public_key=out / f"{name}.pub"))
    _check_targets([path for paths in result for path in (paths.private_key, paths.public_key)],
                   overwrite)
    return result


def make_node_keys(
    out_dir: str | os.PathLike[str],
    names: list[str] | tuple[str, ...],
    *,
    overwrite: bool = False,
) -> list[NodeKeyPaths]:
    """Create one SuperNode authentication key pair per name in ``out_dir``.

    Each key is ECDSA on NIST P-384 (Flower 1.42 accepts NIST EC curves only). Files:
    ``<name>`` (OpenSSH private key, mode 0600, unencrypted so the SuperNode can start
    unattended) and ``<name>.pub`` (OpenSSH public key, mode 0644). Names must be unique and
    match ``[A-Za-z0-9_.-]{1,64}``; existing files are only replaced with ``overwrite=True``.
    Refused (:func:`check_node_keys`) before anything is written.
    """
    result = check_node_keys(out_dir, names, overwrite=overwrite)
    out = _output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for paths in result:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write_atomic(paths.private_key, private, 0o600)
        _write_atomic(paths.public_key, public + f" {paths.name}\n".encode(), 0o644)
    return result
