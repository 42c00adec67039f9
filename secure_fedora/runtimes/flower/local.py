"""A complete, secured Flower deployment on this machine (127.0.0.1 only).

:func:`deploy_local` creates certificates and node keys, starts ``flower-superlink`` with TLS
and SuperNode authentication, registers every node's public key with ``flwr supernode
register``, starts one ``flower-supernode`` per client, submits the secure-fedora app with ``flwr
run``, follows it to the end and stops everything it started, also on errors and Ctrl-C.
:class:`LocalFederation` is the same machinery as a context manager, for tests and tools that
need to act during a run (stop or restart a SuperNode). :func:`local_commands` (``deploy local
--print-commands``) writes what those commands read and returns them as shell lines, starting
none: each is built by the same method that runs it.

Layout of ``workdir``::

    certs/               ca.crt, ca.key, server.crt, server.key (keys 0600)
    keys/                node-<i> (OpenSSH private, 0600), node-<i>.pub
    identities/<party>/  one directory per party (server, client-000, ...): that party's Ed25519
                         and X25519 private keys (0600) and the federation's allowlist.json;
                         they sign every message envelope and the clients' privacy ledgers
    server/              the ServerApp's envelope nonce memory (runs/<run_id>/<scope>/)
    flwr/cli/            FLWR_HOME of the flwr CLI (config.toml with the connection)
    flwr/superlink/      FLWR_HOME of the SuperLink (its installed FABs)
    flwr/node-<i>/       FLWR_HOME of SuperNode i
    nodes/node-<i>/      state-dir of client i (partition, per-method client state
                         runs/<run_id>/<method>/client.pt, release journal and, with DP, the
                         signed ledger runs/<run_id>/<method>/client-<i>.jsonl)
    logs/                one log per process; serverapp.log is the run's log stream
    results/             results.json, rounds.csv, plots/, progress.json (and, with DP,
                         anchor.json) written by the ServerApp, and its checkpoint
                         checkpoints/flower-server.pt (``deploy local --resume``)
    run.toml             the run-config overrides passed to ``flwr run``
    processes.json       while the deployment runs: every process it started or saw started
                         under them (pid, start time, command; :data:`PROCESS_RECORD`)

Every process gets ``FLWR_TELEMETRY_ENABLED=0`` and ``FLWR_DISABLE_UPDATE_CHECK=1``; the
SuperLink always runs with ``--disable-runtime-dependency-installation`` (and so do the
SuperNodes, whose default is off), so Flower never installs packages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w
import tomllib

from privacy.envelope import NONCE_FILE_SUFFIX
from privacy.errors import ToolkitError
from privacy.identity import (
    ALLOWLIST_FILENAME,
    SERVER_ID,
    PublicIdentity,
    allowlist_bytes,
    client_ids,
    default_party_ids,
    init_keys,
)
from privacy.paths import path_problem
from secure_fedora.core.config import (
    ExperimentConfig,
    check_settings_used,
    config_document,
    load_config,
    parse_config,
    with_written,
    written_keys,
)
from secure_fedora.runtimes.flower.certs import (
    CertificatePaths,
    NodeKeyPaths,
    check_certificates,
    check_node_keys,
    make_certificates,
    make_node_keys,
)
from secure_fedora.runtimes.flower.processes import (
    ManagedProcess,
    ProcessError,
    RecordedProcess,
    descendants_running,
    describe_wait_status,
    exit_status,
    live_recorded,
    read_process_record,
    recorded,
    start_time,
    stop_all,
    stop_recorded,
    write_process_record,
)
from secure_fedora.runtimes.flower.protocol import (
    DeployError,
    check_apps_know_entries,
    check_supported,
    make_run_config,
    parse_round_line,
    with_reproducible_noise,
)

__all__ = [
    "APP_DIR",
    "CONNECTION_NAME",
    "DeployResult",
    "LocalFederation",
    "NODE_IDENTITY_DIR",
    "PROCESS_RECORD",
    "RoundLines",
    "RunTimeouts",
    "SERVERAPP_PROGRAM",
    "ServerAppExited",
    "check_new_party_identities",
    "check_party_identities",
    "check_server_identity",
    "check_stale_processes",
    "default_max_in_flight",
    "deploy_local",
    "flower_env",
    "free_ports",
    "init_party_identities",
    "init_server_identity",
    "local_commands",
    "with_num_clients",
]

log = logging.getLogger("secure_fedora.runtimes.flower.local")

#: The Flower app directory (holds the app's pyproject.toml).
APP_DIR = Path(__file__).resolve().parent / "flwr_app"
#: Name of the SuperLink connection written to the CLI's config.toml.
CONNECTION_NAME = "secure-fedora-local"
LOOPBACK = "127.0.0.1"
#: What flower-superlink logs once it serves on its port (Flower 1.42's Uvicorn server).
SUPERLINK_SERVING = "Uvicorn running on"
#: What a Flower server logs when its port is held by another process.
PORT_TAKEN = "address already in use"
#: The workdir's record of the running deployment's processes (removed on a clean stop).
PROCESS_RECORD = "processes.json"
#: How long ``--stop-stale`` gives a leftover process after SIGTERM before SIGKILL (seconds).
STALE_GRACE = 5.0
#: The program the SuperLink runs a run's ServerApp in (Flower's subprocess isolation, through
#: its ``flower-superexec`` child).
SERVERAPP_PROGRAM = "flwr-serverapp"
#: How long after its ServerApp exited a run's log stream is given to end on its own (it
#: ends within Flower's 0.5 s log interval once the run is finished) before the SuperLink is
#: asked whether the run finished (seconds).
SERVERAPP_EXIT_GRACE = 1.5
#: The status Flower gives a run ended by ``flwr stop``.
STOPPED_STATUS = "finished:stopped"


class ServerAppExited(DeployError):
    """The ServerApp process of run ``run_id`` exited (``how``: its signal or exit code where
    it was seen, :func:`~secure_fedora.runtimes.flower.processes.describe_wait_status`) while
    the SuperLink still had the run unfinished (killed, out of memory, a crash that reported
    nothing), and the run was stopped with ``flwr stop`` at once; ``status`` is the run's
    status afterwards."""

    def __init__(self, run_id: int, status: str, how: str, note: str = "") -> None:
        self.run_id = run_id
        self.status = status
        self.how = how
        super().__init__(
            f"the ServerApp process of run {run_id} exited ({how}) while the run "
            f"was unfinished; the run was stopped (status {status!r}){note}"
        )


class _ServerAppWatch:
    """The ServerApp processes of one run: those under the SuperLink ``superlink_pid`` that
    run :data:`SERVERAPP_PROGRAM` and are not in ``before`` (pid -> start time, taken before
    the run was submitted; a LocalFederation runs one run at a time)."""

    def __init__(self, superlink_pid: int, before: Mapping[int, int]) -> None:
        self.superlink_pid = superlink_pid
        self.before = set(before.items())
        self.seen: dict[int, int] = {}
        self.exits: dict[int, int | None] = {}

    def exited(self) -> str | None:
        """None while no ServerApp of the run was seen yet or one of them still runs; once
        every one seen has exited, how the last one ended (its signal or exit code, read while
        its parent had not reaped it yet)."""
        for pid, began in descendants_running(self.superlink_pid, SERVERAPP_PROGRAM).items():
            if (pid, began) not in self.before:
                self.seen.setdefault(pid, began)
        for pid, began in self.seen.items():
            if pid not in self.exits and start_time(pid) != began:
                self.exits[pid] = exit_status(pid, began)
        if not self.seen or len(self.exits) < len(self.seen):
            return None
        return describe_wait_status(list(self.exits.values())[-1])


def _port_taken(port: int, who: str) -> DeployError:
    """The one-line error of a port that another process took between :func:`free_ports`
    choosing it and ``who`` binding it (on a shared host)."""
    return DeployError(f"port {port} on {LOOPBACK} was taken by another process before {who} "
                       "could bind it; start the deployment again (it picks free ports each time)")


def flower_env(flwr_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process: no telemetry, no update check, its own FLWR_HOME."""
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(flwr_home),
        PYTHONUNBUFFERED="1",
    )
    return env


def init_party_identities(root: Path, num_clients: int) -> dict[str, Path]:
    """One identity directory per party under ``root``: ``root/<party>/`` holds only that
    party's private keys (0600, directory 0700) plus the federation's full ``allowlist.json``.

    Parties are ``server`` and ``client-000`` ... for ``num_clients`` clients. Identities that
    are all there and agree are kept (a restarted deployment keeps its identities); where
    there are none they are made; anything in between is refused
    (:func:`check_new_party_identities`, before anything is written). Returns the directory of
    each party.
    """
    dirs = {party: root / party for party in default_party_ids(num_clients)}
    if check_new_party_identities(root, num_clients):
        return dirs
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    public = {}
    for party, directory in dirs.items():
        public.update(init_keys(directory, [party]))
    document = allowlist_bytes(public)
    for directory in dirs.values():
        tmp = directory / f".{ALLOWLIST_FILENAME}.tmp"
        tmp.write_bytes(document)
        os.replace(tmp, directory / ALLOWLIST_FILENAME)
    return dirs


def _party_identity_problems(root: Path, dirs: Mapping[str, Path]) -> list[str]:
    """What is missing or inconsistent in the parties' identity directories ``dirs`` under
    ``root``, each naming the directory or file (empty: every party's private keys load and
    every allowlist lists exactly the parties with the public keys of those keys)."""
    from privacy.identity import IdentityError, load_allowlist, load_identity

    def absent(path: Path) -> str:
        return f"{path} {'is not a directory' if path.exists() else 'does not exist'}"

    problems: list[str] = []
    keys: dict[str, PublicIdentity] = {}
    if not root.is_dir():
        return [absent(root)]
    for party, directory in dirs.items():
        if not directory.is_dir():
            problems.append(absent(directory))
            continue
        missing = [name for name in (f"{party}.ed25519.key", f"{party}.x25519.key",
                                     ALLOWLIST_FILENAME)
                   if not (directory / name).exists()]
        if missing:
            problems.append(f"{directory} lacks {', '.join(missing)}")
            continue
        try:
            keys[party] = load_identity(directory, party).public
        except IdentityError as err:
            problems.append(str(err))
    if problems:
        return problems
    for directory in dirs.values():
        try:
            listed = load_allowlist(directory / ALLOWLIST_FILENAME)
        except IdentityError as err:
            problems.append(str(err))
            continue
        others = sorted(set(listed) - set(dirs))
        if others:
            problems.append(
                f"{directory / ALLOWLIST_FILENAME} lists parties this deployment does not "
                f"have: {_first(others)} (identities made for another number of clients)")
        differ = sorted(p for p in set(keys) if listed.get(p) != keys[p])
        if differ:
            problems.append(
                f"{directory / ALLOWLIST_FILENAME} does not list the keys on disk for "
                f"{_first(differ)}")
    return problems


def _first(names: Sequence[str]) -> str:
    """The first three names, then an ellipsis."""
    return f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"


def _shown(problems: Sequence[str]) -> str:
    """The first problems, and how many more."""
    more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    return "; ".join(problems[:4]) + more


def check_new_party_identities(root: Path, num_clients: int) -> bool:
    """What :func:`init_party_identities` does with ``root``, every check made and nothing
    written: True when every party's identity is there and agrees (kept; as
    :func:`check_party_identities` checks them), False when there is none (``root`` missing,
    or a directory holding no party's directory: they are made). Anything in between (a
    party's directory, private key or allowlist missing, keys no allowlist lists, ``root`` or
    a party's directory that is a file) is refused (:class:`DeployError`) naming each party's
    directory or file: keeping them would run with keys the allowlists do not name, and
    making new ones would replace keys that may have signed envelopes and ledgers."""
    dirs = {party: root / party for party in default_party_ids(num_clients)}
    if not (root.exists() or root.is_symlink()):
        return False
    if root.is_dir() and not any(d.exists() or d.is_symlink() for d in dirs.values()):
        return False
    problems = _party_identity_problems(root, dirs)
    if not problems:
        return True
    raise DeployError(
        f"the identities under {root} are incomplete ({_shown(problems)}); a deployment keeps "
        "a workdir's identities only when every party's keys and allowlist are there and "
        "agree, and makes new ones only where there are none: restore the directory from a "
        f"backup of this workdir, or delete {root} (no run may use those keys then) or use a "
        "fresh workdir; nothing was written")


def check_party_identities(root: Path, num_clients: int) -> dict[str, Path]:
    """The identity directory of each party under ``root`` (as :func:`init_party_identities`
    makes them) for a resumed run, every check made and nothing written: each party's
    directory holds its Ed25519 and X25519 private keys (loadable) and ``allowlist.json``,
    and every allowlist lists exactly the federation's parties with the public keys of the
    private keys on disk. Anything missing or inconsistent is refused
    (:class:`~secure_fedora.runtimes.flower.server_app.ResumeRefused`, a DeployError) naming
    it: the run's envelopes and its clients' ledgers are signed with those keys, so a resume
    never makes new ones."""
    from secure_fedora.runtimes.flower.server_app import ResumeRefused

    dirs = {party: root / party for party in default_party_ids(num_clients)}
    problems = _party_identity_problems(root, dirs)
    if problems:
        raise ResumeRefused(
            f"--resume: the run's identities under {root} are missing or incomplete "
            f"({_shown(problems)}); the run's envelopes and its clients' ledgers are signed "
            "with those keys, and a resume never makes new ones: restore the directory from a "
            "backup of this workdir (a fresh run needs a fresh workdir, without --resume); "
            "nothing was written")
    return dirs


#: The identity directory the SuperNode lines of ``--print-commands --client-public-keys``
#: name: each client's own, made on its host by ``keys party`` (README, "Real machines").
NODE_IDENTITY_DIR = "NODE_IDENTITY_DIR"


def check_server_identity(directory: Path, client_public_keys: Sequence[Path],
                          num_clients: int, *, resume: bool = False
                          ) -> tuple[dict[str, PublicIdentity], bool]:
    """What :func:`init_server_identity` would write, every check made and nothing written:
    the allowlist's parties, assembled (:func:`privacy.identity.assemble_allowlist`) from the
    server's keys ``directory`` holds or, when it holds none (returned False), a stand-in for
    keys made later (fresh random keys, which no file can hold), and the clients' public key
    files. With ``resume`` the run of this workdir goes on: its envelopes and its clients'
    ledgers are signed with the keys ``directory/allowlist.json`` lists, so the assembled
    allowlist must equal that one (else ResumeRefused)."""
    from privacy.identity import (
        Identity,
        IdentityError,
        assemble_allowlist,
        check_key_directory,
        load_allowlist,
        load_identity,
    )

    kept = (directory / f"{SERVER_ID}.ed25519.key").exists()
    if not kept and (directory.exists() or directory.is_symlink()):
        # what init_party refuses, refused before the certificates are written
        if not directory.is_dir():
            raise IdentityError(f"identity directory {directory} exists and is not a directory; "
                                "move it away or use a new workdir; nothing was written")
        check_key_directory(directory)
        held = sorted(p.name for p in directory.iterdir())
        if held:
            raise IdentityError(
                f"{directory} holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''} but "
                f"no {SERVER_ID}.ed25519.key: not a server identity to keep; move it away or "
                "use a new workdir; nothing was written")
    server = (load_identity(directory, SERVER_ID).public if kept
              else Identity.generate(SERVER_ID).public)
    parties = assemble_allowlist(client_public_keys, num_clients, server=server)
    if resume:
        from secure_fedora.runtimes.flower.server_app import ResumeRefused

        allowlist = directory / ALLOWLIST_FILENAME
        if not kept or not allowlist.exists():
            raise ResumeRefused(
                f"--resume: {allowlist if kept else directory / (SERVER_ID + '.ed25519.key')} "
                "does not exist, so the keys the run was started with are unknown; resume in "
                "the workdir that started the run; nothing was written")
        run_parties = load_allowlist(allowlist)
        changed = sorted(p for p in set(run_parties) | set(parties)
                         if run_parties.get(p) != parties.get(p))
        if changed:
            raise ResumeRefused(
                f"--resume: the allowlist of these public key files differs from {allowlist}, "
                f"the run's, for {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}: "
                "the run's envelopes and ledgers are signed with the keys it lists; give the "
                "public key files the run started with (a party with new keys joins a new run, "
                "in a new workdir); nothing was written")
    return parties, kept


def init_server_identity(directory: Path, client_public_keys: Sequence[Path],
                         num_clients: int, *, resume: bool = False) -> Path:
    """The server's identity directory of a federation whose clients made their own
    identities (``secure-fedora keys party``): the server's keys (made now, or kept when
    ``directory`` holds them) and ``allowlist.json`` (0644: public) assembled from them and
    the clients' public key files, which must be exactly ``client-000`` ... of
    ``num_clients``; returns the allowlist's path. Refused, nothing written, as
    :func:`check_server_identity` refuses (every check comes before the first write)."""
    from privacy.identity import init_party
    from secure_fedora.core.files import atomic_write_bytes

    parties, kept = check_server_identity(directory, client_public_keys, num_clients,
                                          resume=resume)
    if not kept:
        parties[SERVER_ID], _ = init_party(directory, SERVER_ID)
    allowlist = directory / ALLOWLIST_FILENAME
    atomic_write_bytes(allowlist, allowlist_bytes(parties), mode=0o644)
    return allowlist


def _refuse_client_identities(root: Path) -> None:
    """Refuse (DeployError) an identities folder holding more than the server's directory
    when the clients made their own identities: an earlier ``--print-commands`` without
    ``--client-public-keys`` wrote every client's private keys there."""
    others = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    others = [name for name in others if name != SERVER_ID]
    if others:
        raise DeployError(
            f"{root} holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} beside "
            "the server's identity (an earlier --print-commands without --client-public-keys "
            "wrote every client's private keys there), while with --client-public-keys each "
            "client's private keys stay on its own host: delete those directories (no run may "
            "use them) or use a new workdir; nothing was written")


#: Where Linux keeps the range of ports it hands out on its own (``bind`` to port 0 and the
#: local end of every outgoing connection).
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: The lowest port :func:`free_ports` chooses below the ephemeral range.
LOWEST_CHOSEN_PORT = 20000


def _ports_outside_ephemeral_range() -> list[range]:
    """The port ranges the kernel never hands out on its own (above :data:`LOWEST_CHOSEN_PORT`);
    empty where the ephemeral range cannot be read (not Linux) or leaves none."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return []
    spans = [range(LOWEST_CHOSEN_PORT, low), range(high + 1, 65536)]
    return [r for r in spans if len(r) > 0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago.

    Chosen at random outside the kernel's ephemeral range where it can be read (Linux): a port
    in that range may be given to any outgoing connection (another node's, another program's)
    between this choice and the server binding it, which then fails ("address already in
    use"). Elsewhere the kernel chooses (``bind`` to port 0)."""
    spans = _ports_outside_ephemeral_range()
    rng = random.SystemRandom()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            for _attempt in range(200 if spans else 0):
                span = rng.choices(spans, weights=[len(r) for r in spans])[0]
                try:
                    sock.bind((LOOPBACK, rng.choice(span)))
                    break
                except OSError:
                    continue  # in use (or held by a socket of this call): another one
            else:
                sock.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def with_num_clients(cfg: ExperimentConfig, num_clients: int | None) -> ExperimentConfig:
    """``cfg`` with ``data.num_clients`` replaced (re-validated); unchanged for ``None``."""
    if num_clients is None or num_clients == cfg.data.num_clients:
        return cfg
    data = config_document(cfg)
    data["data"]["num_clients"] = num_clients
    # what the user wrote stays the record of it (unused_settings), not the full document
    return with_written(parse_config(data, f"(config with data.num_clients = {num_clients})"),
                        written_keys(cfg))


def _flower_bin(name: str) -> str:
    """Path of a Flower console script next to this interpreter (else from PATH)."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"the Flower command {name!r} is not installed (pip install flwr==1.42.0)")
    return found


@dataclass(frozen=True)
class RunTimeouts:
    """Bounded waits of a local deployment (seconds)."""

    startup: float = 60.0  # SuperLink listening, each SuperNode activated
    connect: float = 120.0  # ServerApp waiting for all SuperNodes to be online
    round: float = 600.0  # ServerApp waiting for one round's replies
    run: float = 3600.0  # the whole run, from submission to finish
    poll: float = 0.2  # ServerApp pull interval
    cli: float = 120.0  # one flwr CLI call


@dataclass
class DeployResult:
    """What a finished local deployment produced."""

    run_id: int  # the run's id (a resumed run's: the id it continues, results.json's run_id)
    status: str
    results: dict[str, Any]
    workdir: Path
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class _Node:
    index: int
    key: NodeKeyPaths
    port: int
    state_dir: Path
    flwr_home: Path
    process: ManagedProcess | None = None
    node_id: int | None = None


class LocalFederation:
    """SuperLink + N SuperNodes on 127.0.0.1 with TLS and node authentication.

    Use as a context manager: on exit (normal, exception or KeyboardInterrupt) every process
    it started, and their descendants, are stopped (SIGTERM, then SIGKILL after a grace
    period). ``register`` controls which node keys are registered: an unregistered node is
    started like the others but the SuperLink refuses it. The nodes in ``full_client_errors``
    get ``client-errors="full"`` in their node config (their error texts reach the server whole
    when the run asks for it too); the others withhold them. With ``client_public_keys`` (the
    clients' ``<party>.public.json`` files, each client having made its identity on its own
    host) only the server's identity is made here, and its allowlist assembled from those
    files (:func:`init_server_identity`; with ``resume``, the run of this workdir goes on, it
    must be the allowlist the run has): no client's private key is written, and the SuperNode
    commands name each client's identity directory :data:`NODE_IDENTITY_DIR`. With
    ``resume`` (the run of this workdir goes on) no identity is ever made: the workdir's must
    all be there (:meth:`check_identities`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        num_nodes: int,
        *,
        timeouts: RunTimeouts | None = None,
        register: Sequence[int] | None = None,
        full_client_errors: Sequence[int] = (),
        client_public_keys: Sequence[str | os.PathLike[str]] | None = None,
        resume: bool = False,
    ) -> None:
        if num_nodes < 1:
            raise DeployError(f"num_nodes must be at least 1; got {num_nodes}")
        self.workdir = Path(workdir).expanduser().resolve()
        self.num_nodes = num_nodes
        self.timeouts = timeouts or RunTimeouts()
        self.register_indices = list(range(num_nodes)) if register is None else list(register)
        self.full_client_errors = set(full_client_errors)
        self.client_public_keys = (None if client_public_keys is None
                                   else [Path(f) for f in client_public_keys])
        self.resume = resume
        self.processes: list[ManagedProcess] = []
        self.nodes: list[_Node] = []
        self.certs: CertificatePaths | None = None
        self.port: int = 0
        self.superlink: ManagedProcess | None = None
        self.cli_home = self.workdir / "flwr" / "cli"
        self.identity_dir = self.workdir / "identities"
        self.server_state_dir = self.workdir / "server"
        self.logs = self.workdir / "logs"
        self.phases: dict[str, float] = {}
        self.record_path = self.workdir / PROCESS_RECORD
        self._recorded: dict[int, RecordedProcess] = {}
        self._record_written = False
        self._record_lock = threading.Lock()  # a SuperNode may be restarted from a thread
        # per submitted run: the ServerApps that ran under the SuperLink before it was submitted
        self._serverapps_before: dict[int, dict[int, int]] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create credentials, start the SuperLink, register keys, start every SuperNode."""
        t0 = time.perf_counter()
        self.prepare()
        self.phases["credentials"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._start_superlink()
        self.phases["superlink"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # one `flwr supernode register` process per key, all at once: each call spends its
        # seconds starting the CLI, not at the SuperLink
        with ThreadPoolExecutor(max_workers=max(len(self.register_indices), 1)) as pool:
            ids = list(pool.map(self.register_node, self.register_indices))
        for i, node_id in zip(self.register_indices, ids, strict=True):
            self.nodes[i].node_id = node_id
        self.phases["register"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for node in self.nodes:
            self.start_node(node.index, wait=False)
        for i in self.register_indices:
            self.wait_node_active(i)
        self.phases["supernodes"] = time.perf_counter() - t0

    def check_identities(self) -> None:
        """What :meth:`prepare` refuses about the identities, checked before it writes
        anything: with ``resume``, identities that are not all there (:func:`check_party_identities`;
        with ``client_public_keys``, :func:`check_server_identity`), which a resume only loads;
        without ``resume`` or ``client_public_keys``, identities partly there
        (:func:`check_new_party_identities`), which would be neither kept nor made;
        with ``client_public_keys``, clients' directories under ``identities/``
        (:func:`_refuse_client_identities`). Writes nothing."""
        if self.client_public_keys is None:
            if self.resume:
                check_party_identities(self.identity_dir, self.num_nodes)
            else:
                check_new_party_identities(self.identity_dir, self.num_nodes)
            return
        _refuse_client_identities(self.identity_dir)
        check_server_identity(self.party_identity_dir(None), self.client_public_keys,
                              self.num_nodes, resume=self.resume)

    def check_layout(self) -> None:
        """Refuse, before anything is written, a workdir where a file the deployment writes
        (certificates, node keys, the CLI's connection, ``run.toml``) is a directory, or a
        folder it writes into is a file: writing the others first would leave the workdir
        half rewritten (:class:`DeployError` or
        :class:`~secure_fedora.runtimes.flower.certs.CertificateError`, naming the path).
        Writes nothing."""
        check_certificates(self.workdir / "certs", [LOOPBACK], overwrite=True)
        check_node_keys(self.workdir / "keys", [f"node-{i}" for i in range(self.num_nodes)],
                        overwrite=True)
        homes = ["superlink", "cli", *(f"node-{i}" for i in range(self.num_nodes))]
        folders = [self.workdir / "flwr" / home for home in homes]
        folders += [self.workdir / "nodes" / f"node-{i}" for i in range(self.num_nodes)]
        folders += [self.server_state_dir, self.logs, self.workdir / "results"]
        for path in folders:
            for part in (path.parent, path):
                if part != self.workdir and part.exists() and not part.is_dir():
                    raise DeployError(
                        f"{part} (of the workdir) exists and is not a directory, where the "
                        "deployment writes into a folder of that name: move it away or use a "
                        "fresh workdir; nothing was written")
        for path in (self.cli_home / "config.toml", self.workdir / "run.toml"):
            if path.exists() and not path.is_file():
                raise DeployError(
                    f"{path} (of the workdir) exists and is not a regular file, where the "
                    "deployment writes a file of that name: move it away or use a fresh "
                    "workdir; nothing was written")

    def prepare(self) -> None:
        """Write what the processes read, starting none: the TLS certificates (for
        127.0.0.1), the SuperNode keys, the flwr CLI's connection and every party's identity
        directory; choose the ports. With ``resume`` the identities are only loaded, never
        made. Every refusal (:meth:`check_identities`, :meth:`check_layout`,
        :func:`check_stale_processes`) comes before anything is written."""
        check_stale_processes(self.workdir)
        self.check_identities()
        self.check_layout()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs = make_certificates(self.workdir / "certs", [LOOPBACK], overwrite=True)
        keys = make_node_keys(
            self.workdir / "keys", [f"node-{i}" for i in range(self.num_nodes)], overwrite=True
        )
        ports = free_ports(self.num_nodes + 1)
        self.port = ports[0]
        for i, key in enumerate(keys):
            self.nodes.append(
                _Node(
                    index=i,
                    key=key,
                    port=ports[i + 1],
                    state_dir=self.workdir / "nodes" / f"node-{i}",
                    flwr_home=self.workdir / "flwr" / f"node-{i}",
                )
            )
        self._write_cli_config()
        # Every party's Ed25519 / X25519 identity, one directory each: they sign every message
        # envelope (and the clients' privacy ledgers), and receive the sealed CKKS context.
        if self.client_public_keys is None:
            if not self.resume:  # a resume's were checked above, and are only loaded
                init_party_identities(self.identity_dir, self.num_nodes)
        else:
            init_server_identity(self.identity_dir / SERVER_ID, self.client_public_keys,
                                 self.num_nodes, resume=self.resume)

    def planned_commands(self, run_toml: Path) -> list[str]:
        """Every command :meth:`start`, :meth:`submit` and :meth:`follow` run, in order, each
        as a shell line (as a process's log records its start: a ``cd`` into the workdir, the
        environment it sets, the shell-quoted command): the SuperLink, each node key's
        registration, each SuperNode, ``flwr run`` with ``run_toml``, then ``flwr log`` and
        ``flwr ls`` of the run (its id, known only once submitted, written ``RUN_ID``).
        Needs :meth:`prepare` first; starts nothing."""
        cli = self._flwr_command
        commands = [(self.workdir / "flwr" / "superlink", self._superlink_command())]
        commands += [(self.cli_home, cli(*self._register_args(i))) for i in self.register_indices]
        commands += [(node.flwr_home, self._node_command(node.index)) for node in self.nodes]
        commands += [(self.cli_home, cli(*args)) for args in (
            self._run_args(run_toml), self._log_args("RUN_ID"), self._status_args("RUN_ID"))]
        return [ManagedProcess(name="", command=command, log_path=self.logs / "unused",
                               env=flower_env(home), cwd=self.workdir).shell_line()
                for home, command in commands]

    def stop(self) -> None:
        """Stop every process started here and their descendants, all together
        (:func:`~secure_fedora.runtimes.flower.processes.stop_all`): one grace period of 5 s
        for all of them, then SIGKILL to what is left. The process record is removed once no
        process it names runs."""
        stop_all(self.processes)
        with self._record_lock:
            if self._record_written and not any(p.alive() for p in self._recorded.values()):
                with contextlib.suppress(FileNotFoundError):
                    self.record_path.unlink()
                self._record_written = False

    def refresh(self) -> None:
        """Record the current descendants of every started process (for a complete stop),
        and in the process record (:data:`PROCESS_RECORD`) those it does not name yet."""
        seen = [(f"{proc.name} child", pid)
                for proc in self.processes for pid in proc.refresh_descendants()]
        self._write_record(seen)

    def _write_record(self, seen: Sequence[tuple[str, int]] = ()) -> None:
        """Rewrite :data:`PROCESS_RECORD` (atomically) when it does not name every live
        process started here, seen under one of them now (``seen``: role and pid) or named
        before and still running: a deployment killed without stopping them leaves the next
        one in this workdir their pids and start times. Only a process seen under one of
        ours now is added (a pid remembered from earlier may have been given again)."""
        with self._record_lock:
            current = {pid: entry for pid, entry in self._recorded.items() if entry.alive()}
            wanted = [(p.name, p.pid, p.command) for p in self.processes
                      if p.popen is not None and p.running()]
            for name, pid, command in [*wanted, *((name, pid, None) for name, pid in seen)]:
                if pid not in current:
                    entry = recorded(name, pid, command)
                    if entry is not None:
                        current[pid] = entry
            if self._record_written and current == self._recorded:
                return
            owner = recorded("deploy", os.getpid())
            assert owner is not None  # this very process
            write_process_record(self.record_path, owner, list(current.values()))
            self._recorded = current
            self._record_written = True

    # -- pieces ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The SuperLink's ``host:port`` (Fleet, Control and Runtime APIs share it)."""
        return f"{LOOPBACK}:{self.port}"

    def _write_cli_config(self) -> None:
        assert self.certs is not None
        self.cli_home.mkdir(parents=True, exist_ok=True)
        doc = {
            "superlink": {
                "default": CONNECTION_NAME,
                CONNECTION_NAME: {
                    "address": self.address,
                    "root-certificates": str(self.certs.ca_cert),
                },
            }
        }
        (self.cli_home / "config.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")

    def _spawn(self, name: str, command: list[str], flwr_home: Path) -> ManagedProcess:
        flwr_home.mkdir(parents=True, exist_ok=True)
        proc = ManagedProcess(
            name=name,
            command=command,
            log_path=self.logs / f"{name}.log",
            env=flower_env(flwr_home),
            cwd=self.workdir,
        )
        proc.start()
        self.processes.append(proc)
        self._write_record()
        return proc

    def _superlink_command(self) -> list[str]:
        assert self.certs is not None
        return [
            _flower_bin("flower-superlink"),
            "--ssl-ca-certfile", str(self.certs.ca_cert),
            "--ssl-certfile", str(self.certs.server_cert),
            "--ssl-keyfile", str(self.certs.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", LOOPBACK,
            "--port", str(self.port),
        ]

    def _start_superlink(self) -> None:
        self.superlink = self._spawn("superlink", self._superlink_command(),
                                     self.workdir / "flwr" / "superlink")
        deadline = time.monotonic() + self.timeouts.startup
        while time.monotonic() < deadline:
            # A connection alone is not enough: another process may hold the port, and the
            # SuperLink then fails to bind while the port still answers. Its log must say it
            # is serving since this start.
            log = self.superlink.log_path.read_text(encoding="utf-8", errors="replace")
            log = log[log.rfind("=== start"):]
            if PORT_TAKEN in log:
                raise _port_taken(self.port, "the SuperLink")
            if not self.superlink.running():
                raise DeployError(
                    f"flower-superlink exited with code {self.superlink.returncode()}:\n"
                    + self.superlink.log_tail()
                )
            if SUPERLINK_SERVING in log:
                with contextlib.suppress(OSError), \
                        socket.create_connection((LOOPBACK, self.port), 0.5):
                    return
            time.sleep(0.2)
        raise DeployError(
            f"flower-superlink did not listen on {self.address} within "
            f"{self.timeouts.startup:.0f} s:\n{self.superlink.log_tail()}"
        )

    @staticmethod
    def _flwr_command(*args: str) -> list[str]:
        return [_flower_bin("flwr"), *args]

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command against this federation (bounded by ``timeout``)."""
        command = self._flwr_command(*args)
        try:
            return subprocess.run(  # noqa: S603 - fixed argument list
                command,
                env=flower_env(self.cli_home),
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeouts.cli,
                check=False,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as err:
            raise DeployError(f"`flwr {' '.join(args)}` did not finish in {err.timeout:.0f} s") from None

    @staticmethod
    def _json_output(proc: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
        start = proc.stdout.find("{")
        try:
            doc = json.loads(proc.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            doc = None
        if proc.returncode != 0 or not isinstance(doc, dict) or not doc.get("success", False):
            raise DeployError(
                f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return doc

    def _register_args(self, index: int) -> list[str]:
        key = self.nodes[index].key.public_key
        return ["supernode", "register", str(key), CONNECTION_NAME, "--format", "json"]

    def register_node(self, index: int) -> int:
        """Register node ``index``'s public key with the SuperLink; returns its node id."""
        node = self.nodes[index]
        proc = self.flwr(*self._register_args(index))
        doc = self._json_output(proc, f"registering {node.key.public_key.name}")
        return int(doc["node-id"])

    def start_node(
        self, index: int, wait: bool = True, activation_retry: float = 0.0
    ) -> ManagedProcess:
        """Start (or restart) SuperNode ``index`` with its key, port and node config.

        After a crash the SuperLink keeps the node "online" until its heartbeat expires
        (Flower 1.42: up to 2 x 30 s) and refuses to activate it again before that; a
        SuperNode started in that window exits with "Failed to activate SuperNode". With
        ``activation_retry > 0`` such a start is retried every 2 s for up to that many seconds
        (implies ``wait``).
        """
        if activation_retry > 0:
            deadline = time.monotonic() + activation_retry
            while True:
                proc = self.start_node(index, wait=False)
                try:
                    self.wait_node_active(index)
                    return proc
                except DeployError:
                    refused = "Failed to activate SuperNode" in proc.log_tail(200)
                    if proc.running() or not refused or time.monotonic() > deadline:
                        raise
                time.sleep(2.0)
        node = self.nodes[index]
        if node.process is not None and node.process.running():
            raise DeployError(f"SuperNode {index} is already running")
        node.state_dir.mkdir(parents=True, exist_ok=True)
        node.process = self._spawn(f"supernode-{index}", self._node_command(index), node.flwr_home)
        if wait:
            self.wait_node_active(index)
        return node.process

    def _node_command(self, index: int) -> list[str]:
        assert self.certs is not None
        node = self.nodes[index]
        # the clients that made their own identities keep them on their own hosts
        identity = (NODE_IDENTITY_DIR if self.client_public_keys is not None
                    else self.party_identity_dir(index))
        node_config = (
            f'partition-id={index} state-dir="{node.state_dir}" '
            f'identity-dir="{identity}"'
            + (' client-errors="full"' if index in self.full_client_errors else "")
        )
        return [
            _flower_bin("flower-supernode"),
            "--root-certificates", str(self.certs.ca_cert),
            "--superlink", self.address,
            "--auth-supernode-private-key", str(node.key.private_key),
            "--host", LOOPBACK,
            "--port", str(node.port),
            "--node-config", node_config,
        ]

    def party_identity_dir(self, index: int | None) -> Path:
        """The identity directory of client ``index`` (``None``: the server)."""
        party = SERVER_ID if index is None else client_ids(self.num_nodes)[index]
        return self.identity_dir / party

    def wait_node_active(self, index: int) -> None:
        """Wait until SuperNode ``index`` logged its activation (bounded)."""
        node = self.nodes[index]
        assert node.process is not None
        deadline = time.monotonic() + self.timeouts.startup
        marker = "SuperNode ID:"
        while time.monotonic() < deadline:
            log = node.process.log_path.read_text(encoding="utf-8", errors="replace")
            last_start = log.rfind("=== start")
            if marker in log[last_start:]:
                node.process.refresh_descendants()
                return
            if not node.process.running():
                if PORT_TAKEN in log[last_start:]:
                    raise _port_taken(node.port, f"SuperNode {index}")
                raise DeployError(
                    f"SuperNode {index} exited with code {node.process.returncode()}:\n"
                    + node.process.log_tail()
                )
            time.sleep(0.2)
        raise DeployError(
            f"SuperNode {index} was not activated within {self.timeouts.startup:.0f} s:\n"
            + node.process.log_tail()
        )

    def stop_node(self, index: int, hard: bool = True) -> None:
        """Stop SuperNode ``index`` (SIGKILL by default: a crash) and its descendants."""
        node = self.nodes[index]
        if node.process is None:
            raise DeployError(f"SuperNode {index} was never started")
        node.process.stop(hard=hard)

    # -- runs -----------------------------------------------------------------------------
    def submit(
        self,
        cfg: ExperimentConfig,
        result_dir: Path,
        *,
        num_threads: int = 1,
        round_timeout: float | None = None,
        reproducible_dp_noise: bool = False,
        key_holder: int = 0,
        max_in_flight: int = 0,
        compare_methods: bool = False,
        resume: int = 0,
        amendments: Sequence[Mapping[str, Any]] = (),
    ) -> int:
        """Submit the secure-fedora app with ``cfg`` via ``flwr run``; returns the run id.

        The run config is :meth:`write_run_config`'s (the same arguments).
        """
        run_toml = self.write_run_config(
            cfg, result_dir, num_threads=num_threads, round_timeout=round_timeout,
            reproducible_dp_noise=reproducible_dp_noise, key_holder=key_holder,
            max_in_flight=max_in_flight, compare_methods=compare_methods, resume=resume,
            amendments=amendments)
        before = self._serverapps()
        doc = self._json_output(self.flwr(*self._run_args(run_toml)), "flwr run")
        run_id = int(doc["run-id"])
        self._serverapps_before[run_id] = before
        return run_id

    def _serverapps(self) -> dict[int, int] | None:
        """The ServerApp processes under the SuperLink now (pid -> start time; exited ones
        its parent has not reaped included); None while no SuperLink process runs."""
        if self.superlink is None or not self.superlink.running():
            return None
        try:
            pid = self.superlink.pid
        except ProcessError:  # never started
            return None
        return descendants_running(pid, SERVERAPP_PROGRAM)

    def write_run_config(
        self,
        cfg: ExperimentConfig,
        result_dir: Path,
        *,
        num_threads: int = 1,
        round_timeout: float | None = None,
        reproducible_dp_noise: bool = False,
        key_holder: int = 0,
        max_in_flight: int = 0,
        compare_methods: bool = False,
        resume: int = 0,
        amendments: Sequence[Mapping[str, Any]] = (),
    ) -> Path:
        """Write ``WORKDIR/run.toml``, the run-config overrides ``flwr run`` is given, and
        return its path (``result_dir`` is created).

        ``round_timeout`` overrides ``timeouts.round`` for this run only; ``key_holder`` is the
        client that runs the CKKS key ceremony in the encrypted relatedness modes;
        ``max_in_flight`` caps the messages the ServerApp keeps outstanding (0: all at once);
        ``compare_methods`` lets a DP config of several methods run (a comparison);
        ``resume`` (0: a new run) continues that run from the ServerApp's checkpoint in
        ``result_dir``, under its config ``amendments`` (``cfg`` is then the run's original
        configuration).
        """
        result_dir.mkdir(parents=True, exist_ok=True)
        overrides = make_run_config(
            cfg,
            result_dir,
            identity_dir=self.party_identity_dir(None),
            server_state_dir=self.server_state_dir,
            key_holder=key_holder,
            connect_timeout=self.timeouts.connect,
            round_timeout=self.timeouts.round if round_timeout is None else round_timeout,
            poll_interval=self.timeouts.poll,
            num_threads=num_threads,
            reproducible_dp_noise=reproducible_dp_noise,
            max_in_flight=max_in_flight,
            compare_methods=compare_methods,
            resume=resume,
            amendments=amendments,
        )
        run_toml = self.workdir / "run.toml"
        run_toml.write_text(tomli_w.dumps(overrides), encoding="utf-8")
        return run_toml

    @staticmethod
    def _run_args(run_toml: Path) -> list[str]:
        return ["run", str(APP_DIR), CONNECTION_NAME, "--run-config", str(run_toml),
                "--format", "json"]

    @staticmethod
    def _log_args(run_id: int | str) -> list[str]:
        return ["log", str(run_id), CONNECTION_NAME, "--stream"]

    @staticmethod
    def _status_args(run_id: int | str) -> list[str]:
        return ["ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json"]

    def run_status(self, run_id: int) -> str:
        """The run's status string as the SuperLink reports it (e.g. ``finished:completed``)."""
        proc = self.flwr(*self._status_args(run_id))
        doc = self._json_output(proc, f"flwr ls --run-id {run_id}")
        runs = doc.get("runs") or []
        if not runs:
            raise DeployError(f"the SuperLink does not know run {run_id}")
        return str(runs[0]["status"])

    def follow(
        self,
        run_id: int,
        timeout: float | None = None,
        on_tick: Callable[[], None] | None = None,
        on_round: Callable[[str, int, int], None] | None = None,
    ) -> str:
        """Stream the run's log to ``logs/serverapp.log`` until it finishes; returns its status.

        Bounded by ``timeout`` (default ``timeouts.run``): on expiry the run is stopped with
        ``flwr stop`` and :class:`DeployError` is raised. ``on_tick`` is called about every
        0.2 s while waiting (tests use it to act during a run); ``on_round(method, round,
        rounds)`` once for each round line this run's log gains (:class:`RoundLines`).
        Once the run's ServerApp process (:data:`SERVERAPP_PROGRAM` under the SuperLink,
        started after :meth:`submit` began, or for a run not submitted here after this call
        began) has exited and the run is not finished, the run is stopped and
        :class:`ServerAppExited` raised (:meth:`_end_run_of_dead_serverapp`), within
        :data:`SERVERAPP_EXIT_GRACE` s and three ``flwr`` calls, where Flower would mark it
        failed only once the ServerApp's heartbeat ran out (about 60 s); a run that finished on
        its own is returned with its status.
        """
        limit = self.timeouts.run if timeout is None else timeout
        log_path = self.logs / "serverapp.log"
        rounds = RoundLines(log_path, log_path.stat().st_size if log_path.exists() else 0)

        def report() -> None:
            if on_round is not None:
                for method, rnd, total in rounds.poll():
                    on_round(method, rnd, total)

        stream = self._spawn(
            "serverapp", self._flwr_command(*self._log_args(run_id)), self.cli_home,
        )
        deadline = time.monotonic() + limit
        before = self._serverapps_before.pop(run_id, None)
        if before is None:
            before = self._serverapps()
        watch = (
            None
            if before is None or self.superlink is None
            else _ServerAppWatch(self.superlink.pid, before)
        )
        exited: tuple[str, float] | None = None  # how the ServerApp ended, and when seen
        try:
            while stream.running():
                if time.monotonic() > deadline:
                    self.flwr("stop", str(run_id), CONNECTION_NAME)
                    raise DeployError(
                        f"run {run_id} did not finish within {limit:.0f} s; stopped it. "
                        f"Last log lines:\n{stream.log_tail()}"
                    )
                if self.superlink is not None and not self.superlink.running():
                    raise DeployError(
                        f"the SuperLink died during run {run_id}{_resume_note(self.workdir)}"
                    )
                how = None if watch is None else watch.exited()
                if how is None:
                    exited = None
                elif exited is None:
                    exited = how, time.monotonic()
                elif time.monotonic() - exited[1] >= SERVERAPP_EXIT_GRACE:
                    # the stream did not end as a finished run's does: ask the SuperLink (once)
                    watch, exited = None, None
                    self._end_run_of_dead_serverapp(run_id, how)
                if on_tick is not None:
                    on_tick()
                report()
                self.refresh()
                time.sleep(0.2)
        finally:
            stream.stop(grace=2.0)
        report()  # the lines written since the last poll
        status = self.run_status(run_id)
        return status

    def _end_run_of_dead_serverapp(self, run_id: int, how: str) -> None:
        """The ServerApp of ``run_id`` exited (``how``): return if the run is finished (a
        ServerApp reports its end before it exits), else stop it with ``flwr stop`` and raise
        :class:`ServerAppExited`, unless the run turns out finished on its own after all (the
        stop then fails, and the status it finished with is the true one)."""
        try:
            if self.run_status(run_id).startswith("finished:"):
                return
            self.flwr("stop", str(run_id), CONNECTION_NAME)
            status = self.run_status(run_id)
        except DeployError:
            if self.superlink is not None and not self.superlink.running():
                raise DeployError(
                    f"the SuperLink died during run {run_id}{_resume_note(self.workdir)}"
                ) from None
            raise
        if status.startswith("finished:") and status != STOPPED_STATUS:
            return
        raise ServerAppExited(run_id, status, how, _resume_note(self.workdir))

    def node_state_dir(self, index: int) -> Path:
        """SuperNode ``index``'s state-dir (partition, per-run state, journal, ledger)."""
        return self.nodes[index].state_dir


class RoundLines:
    """Reads, as the ServerApp's log grows, the round lines it gains past byte ``start``
    (:func:`~secure_fedora.runtimes.flower.protocol.parse_round_line`): each complete line
    once, in order; a line still being written is read once it ends."""

    def __init__(self, path: Path, start: int = 0) -> None:
        self.path = path
        self.offset = start

    def poll(self) -> list[tuple[str, int, int]]:
        """The round lines completed since the last poll (none while the log is missing)."""
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return []
        done = data.rfind(b"\n") + 1
        self.offset += done
        lines = data[:done].decode("utf-8", errors="replace").splitlines()
        return [r for r in map(parse_round_line, lines) if r is not None]


def default_max_in_flight() -> int:
    """The in-flight window of a single-host deployment: two ClientApp processes per CPU core.

    Client work (process start-up, training) is CPU-bound, so more concurrent processes than
    about twice the cores only add memory (0.3-0.5 GB each) without finishing a round sooner.
    """
    return 2 * (os.cpu_count() or 1)


def _named(processes: Sequence[RecordedProcess]) -> str:
    """``superlink child (pid 12: flwr-serverapp), ...``: each process's role, pid and
    program (the script an interpreter runs)."""
    def program(command: Sequence[str]) -> str:
        names = [Path(part).name for part in command[:2]]
        return names[1] if len(names) > 1 and names[0].startswith("python") else names[0]

    return ", ".join(f"{proc.name} (pid {proc.pid}"
                     + (f": {program(proc.command)})" if proc.command else ")")
                     for proc in processes)


def check_stale_processes(work: Path, stop: bool = False,
                          say: Callable[[str], None] | None = None) -> None:
    """Refuse a workdir whose process record (:data:`PROCESS_RECORD`) names a process still
    running (the same pid with the same start time: a pid the kernel gave again to another
    process is not taken for it), as a deployment killed without stopping them leaves them
    (a ServerApp there would go on writing the run's results and checkpoint beside a new
    deployment's): :class:`DeployError` naming their pids. With ``stop``, they and their
    descendants are stopped instead (SIGTERM, :data:`STALE_GRACE` s, SIGKILL) and the record
    removed, unless the deployment that started them still runs, which is refused either way.
    A record that cannot be read is refused
    (:class:`~secure_fedora.runtimes.flower.processes.ProcessRecordError`) and left as it is.
    Writes nothing but the removal of a record whose processes were all stopped."""
    path = work / PROCESS_RECORD
    record = read_process_record(path)
    if record is None:
        return
    owner, processes = record
    if owner.alive() and owner.pid != os.getpid():
        raise DeployError(
            f"the workdir {str(work)!r} is in use by a running deployment (pid {owner.pid}; "
            f"its record {path}): stop it (Ctrl-C where it runs, or `kill {owner.pid}`: it "
            "stops every process it started) or use another workdir; nothing was written")
    live = live_recorded(processes)
    if not live:
        return
    pids = " ".join(str(proc.pid) for proc in live)
    if not stop:
        raise DeployError(
            f"the workdir {str(work)!r} has processes of an earlier deployment still running "
            f"(its record {path}): {_named(live)}; a deployment beside them would share the "
            f"nodes' state and the run's results: stop them (`kill {pids}`) or run again with "
            f"--stop-stale, which stops them (SIGTERM, then SIGKILL after {STALE_GRACE:.0f} s); "
            "nothing was written")
    if say is not None:
        say(f"stopping the earlier deployment's processes still running: {_named(live)}")
    left = stop_recorded(processes, grace=STALE_GRACE)
    if left:
        raise DeployError(f"the earlier deployment's processes {_named(left)} did not stop "
                          "after SIGKILL; nothing was written")
    path.unlink()


def _refuse_used_workdir(work: Path) -> None:
    """Refuse a workdir that holds an earlier deployment's runs: its clients' releases are in
    the ledgers under ``nodes/``, and a new run there would start fresh ledgers at epsilon 0
    beside them (the same clients' data released again, the earlier loss in no account)."""
    from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT

    def nonempty(pattern: str) -> list[Path]:
        # a node's nonce state (``*.nonces.jsonl``, beside its ledger) records no release
        return [f for f in work.glob(pattern) if f.is_file() and f.stat().st_size > 0
                and not f.name.endswith(NONCE_FILE_SUFFIX)]

    # releases on record: a node's journal or ledger with a line, or a finished run's results
    released = nonempty("nodes/node-*/runs/*/releases.jsonl") \
        + nonempty("nodes/node-*/runs/*/*/client-*.jsonl")
    runs = sorted({f.relative_to(work / "nodes").parts[2] for f in released})
    results = nonempty("results/results.json")
    # a ServerApp checkpoint: the run can be resumed, and a new run would overwrite it
    checkpoint = (work / "results" / SERVER_CHECKPOINT).exists()
    if runs or results or checkpoint:
        held = ", ".join(filter(None, [
            f"releases of run(s) {', '.join(runs[:3])} on its nodes" if runs else "",
            "results/results.json" if results else "",
            f"the ServerApp checkpoint results/{SERVER_CHECKPOINT}"
            # a finished run's checkpoint stays, but --resume refuses it: nothing to continue
            + ("" if results else " (--resume continues that run)")
            if checkpoint else ""]))
        raise DeployError(
            f"the workdir {str(work)!r} holds an earlier deployment ({held}); its clients' "
            "releases are recorded there, and a new run would start new ledgers at epsilon 0 "
            "beside them; use a new workdir (`deploy local --workdir DIR`) or move this one away")


def _submitted_experiment(work: Path) -> ExperimentConfig | None:
    """The experiment config ``work/run.toml`` (the run config of the workdir's last
    submission) holds, None when it holds none that can be read."""
    try:
        doc = tomllib.loads((work / "run.toml").read_text(encoding="utf-8"))
        return parse_config(json.loads(doc["experiment"]), "(run.toml 'experiment')")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError,
            json.JSONDecodeError, ToolkitError):
        return None


def _resumed_run(work: Path, cfg: ExperimentConfig
                 ) -> tuple[int, ExperimentConfig, list[dict[str, Any]]]:
    """The id of the run whose ServerApp checkpoint ``work/results`` holds, once
    :func:`~secure_fedora.runtimes.flower.server_app.check_resumable` accepts it for ``cfg``,
    the run's configuration and its config amendments (reads only). A ``cfg`` that differs
    from the run's (amended) configuration only in ``rundir.AMENDABLE_KEYS`` resumes it under
    the run's original configuration (``work/run.toml``'s, which the checkpoint's config hash
    names), with the change added to the amendments, made at
    :func:`~secure_fedora.runtimes.flower.server_app.amendment_point`."""
    from secure_fedora.core.config import config_hash
    from secure_fedora.runtimes.flower.server_app import (
        SERVER_CHECKPOINT,
        ResumeRefused,
        amendment_point,
        check_resumable,
    )
    from secure_fedora.runtimes.inprocess import CheckpointError, checkpoint_binding
    from secure_fedora.runtimes.rundir import (
        RunDirError,
        amended_config,
        amendment_applies_to,
        amendment_has_rounds,
        config_changes,
        recorded_amendments,
    )

    results = work / "results"
    path = results / SERVER_CHECKPOINT
    if not path.is_file():
        missing = f"--resume: {path} does not exist, so {work} holds no run to resume"
        try:  # what a new run in this workdir is refused for (releases or results on record)
            _refuse_used_workdir(work)
        except DeployError as err:
            raise ResumeRefused(f"{missing}, and a new run cannot start there either: {err}; "
                                "nothing was written") from None
        # e.g. a deployment killed before the ServerApp's first checkpoint: nothing released
        raise ResumeRefused(f"{missing} (no run there reached its first checkpoint or released "
                            "anything): run the same command without --resume, which starts "
                            "the run anew in this workdir; nothing was written")
    try:
        binding = checkpoint_binding(path)
    except CheckpointError as err:
        raise ResumeRefused(f"--resume: {err}; nothing was written") from None
    run_id = binding.get("run_id")
    if not isinstance(run_id, int):
        raise ResumeRefused(f"--resume: {path} names no run id; nothing was written")
    original = _submitted_experiment(work)
    if original is None or config_hash(original) != binding.get("config_hash") \
            or config_hash(cfg) == binding.get("config_hash"):
        original = cfg  # the checkpoint's own config, or none to amend: refused as before
    try:
        recorded = recorded_amendments(results)
    except RunDirError as err:
        raise ResumeRefused(f"--resume: {err}; nothing was written") from None
    changes = config_changes(amended_config(original, recorded), cfg)
    if changes is None:  # anything else changed: refused as before (another configuration)
        original, changes = cfg, []
    state = check_resumable(results, run_id, original, config_hash(original), work / "server",
                            recorded)
    if not changes:
        return run_id, original, recorded
    method, resumed, effective = amendment_point(state, original)
    applies_to = {c["key"]: amendment_applies_to(original, c["key"], method, effective)
                  for c in changes}
    for c in changes:
        if not amendment_has_rounds(original, applies_to[c["key"]]):
            # as in process: recorded, it would bound no round
            raise ResumeRefused(
                f"--resume: no round of the run left from {method!r} round {effective} on (the "
                f"round in flight is re-made as it was) reads {c['key']}, so "
                f"{c['key']} = {c['to']} (the run has {c['from']}) has no round to apply to; "
                "resume with the run's own config (a new run applies the value); nothing was "
                "written")
    amendments = recorded + [{**c, "method": method, "resumed_at_round": resumed,
                              "effective_from_round": effective,
                              "applies_to": applies_to[c["key"]]} for c in changes]
    check_resumable(results, run_id, original, config_hash(original), work / "server",
                    amendments)
    return run_id, original, amendments


def _resume_note(workdir: Path) -> str:
    """What the error of a deployment whose ServerApp or SuperLink died adds: the resume that
    continues the run when ``workdir/results`` holds its ServerApp checkpoint and no
    ``results.json``, else nothing."""
    from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT

    checkpoint = workdir / "results" / SERVER_CHECKPOINT
    if not checkpoint.is_file() or (workdir / "results" / "results.json").exists():
        return ""
    return f"; the same command with --resume continues the run from its checkpoint {checkpoint}"


def deploy_local(
    config: str | os.PathLike[str] | ExperimentConfig,
    num_clients: int | None,
    workdir: str | os.PathLike[str],
    *,
    timeouts: RunTimeouts | None = None,
    num_threads: int = 1,
    progress: Callable[[str], None] | None = None,
    on_round: Callable[[str, int, int], None] | None = None,
    reproducible_dp_noise: bool = False,
    key_holder: int = 0,
    max_in_flight: int | None = None,
    compare_methods: bool = False,
    full_client_errors: Sequence[int] = (),
    resume: bool = False,
    stop_stale: bool = False,
) -> DeployResult:
    """Run every method of the config on a local, secured Flower deployment and stop everything afterwards.

    ``config`` is a TOML path or a validated config; ``num_clients`` (if given) replaces
    ``data.num_clients``, and one SuperNode is started per client; ``key_holder`` is the client
    that runs the CKKS key ceremony in the encrypted relatedness modes. ``max_in_flight`` caps
    the messages the ServerApp keeps outstanding at once (0: all); each starts a ClientApp
    process with torch loaded, and here every process shares this host, so the default (None)
    is :func:`default_max_in_flight`. ``compare_methods`` lets a DP config of several methods
    run in one deployment (:func:`~secure_fedora.runtimes.flower.protocol.check_supported`).
    ``full_client_errors`` lists the clients whose SuperNodes agree to send their error texts
    whole (node config ``client-errors="full"``): only they do, and only when the config's
    ``[security] client_errors`` is "full" too; every other node withholds them.
    ``resume`` continues the run of this workdir whose ServerApp died: its checkpoint in
    ``workdir/results`` must be this configuration's (else
    :class:`~secure_fedora.runtimes.flower.server_app.ResumeRefused`, before any process
    starts or anything is written); the deployment starts again on the nodes' kept state and
    the run goes on under its own id. ``on_round(method, round, rounds)`` is called as the
    ServerApp logs each round done (``logs/serverapp.log``; a resume's from its first round
    trained). Returns the ServerApp's
    ``results.json`` and the run status. Raises :class:`DeployError` if any process fails to
    start, the run does not finish in ``timeouts.run`` seconds, or it ends in another state
    than ``finished:completed``. All processes are stopped before returning or raising,
    including on KeyboardInterrupt. While they run, ``workdir/processes.json`` names them
    (:data:`PROCESS_RECORD`); a workdir whose record names processes still running (a
    deployment killed with SIGKILL leaves its ServerApp) is refused before anything is
    written, or with ``stop_stale`` they are stopped first (:func:`check_stale_processes`).
    """
    cfg, work, max_in_flight, resumed, amendments = _checked_deployment(
        config, num_clients, workdir, reproducible_dp_noise=reproducible_dp_noise,
        key_holder=key_holder, max_in_flight=max_in_flight, compare_methods=compare_methods,
        full_client_errors=full_client_errors, resume=resume, stop_stale=stop_stale,
        say=progress)
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    fed = LocalFederation(work, cfg.data.num_clients, timeouts=timeouts,
                          full_client_errors=full_client_errors, resume=bool(resumed))
    say(f"starting SuperLink and {cfg.data.num_clients} SuperNodes in {work}")
    try:
        with fed:
            say(f"SuperLink on {fed.address} (TLS, node authentication); submitting the run")
            t0 = time.perf_counter()
            run_id = fed.submit(cfg, work / "results", num_threads=num_threads,
                                reproducible_dp_noise=reproducible_dp_noise,
                                key_holder=key_holder, max_in_flight=max_in_flight,
                                compare_methods=compare_methods, resume=resumed,
                                amendments=amendments)
            window = f"at most {max_in_flight}" if max_in_flight else "all"
            say(f"run {run_id} submitted ({window} messages in flight at once); following it "
                f"(log: {fed.logs / 'serverapp.log'})")
            exited: str | None = None
            try:
                status = fed.follow(run_id, on_round=on_round)
            except ServerAppExited as died:
                status, exited = died.status, died.how
            fed.phases["run"] = time.perf_counter() - t0
            phases = dict(fed.phases)
    except ProcessError as err:
        raise DeployError(str(err)) from err
    results_path = work / "results" / "results.json"
    if status != "finished:completed" or not results_path.exists():
        failure = work / "results" / "failure.json"
        detail = failure.read_text(encoding="utf-8") if failure.exists() else ""
        from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT

        if not detail and exited is not None:
            detail = (
                f"without a failure record (its ServerApp process exited, {exited}, while "
                f"the run was unfinished; the run was stopped at once){_resume_note(work)}"
            )
        elif not detail and (work / "results" / SERVER_CHECKPOINT).is_file():
            # no failure record: the ServerApp process died (killed, out of memory) mid-run
            detail = f"without a failure record (its ServerApp process died){_resume_note(work)}"
        raise DeployError(
            f"run {run_id} ended with status {status!r}{' ' + detail if detail else ''}; "
            f"see {work / 'logs'}"
        )
    results = json.loads(results_path.read_text(encoding="utf-8"))
    return DeployResult(
        run_id=resumed or run_id,
        status=status,
        results=results,
        workdir=work,
        seconds=time.perf_counter() - started,
        phases=phases,
    )


def local_commands(
    config: str | os.PathLike[str] | ExperimentConfig,
    num_clients: int | None,
    workdir: str | os.PathLike[str],
    *,
    timeouts: RunTimeouts | None = None,
    num_threads: int = 1,
    reproducible_dp_noise: bool = False,
    key_holder: int = 0,
    max_in_flight: int | None = None,
    compare_methods: bool = False,
    full_client_errors: Sequence[int] = (),
    resume: bool = False,
    client_public_keys: Sequence[str | os.PathLike[str]] | None = None,
    stop_stale: bool = False,
) -> list[str]:
    """The commands :func:`deploy_local` with the same arguments runs, in order, as shell
    lines (:meth:`LocalFederation.planned_commands`), starting none of them.

    Checks and refuses what :func:`deploy_local` does, then writes into ``workdir`` what
    the commands read (certificates for 127.0.0.1, node keys, identities, the flwr CLI's
    connection, ``run.toml``), so they can be run by hand from the lines in order. With
    ``client_public_keys`` (each client's ``<party>.public.json``) the only identity written
    is the server's, its ``allowlist.json`` assembled from those files
    (:func:`init_server_identity`); the SuperNode lines then name each client's identity
    directory, kept on its own host, :data:`NODE_IDENTITY_DIR`. Refused then, before anything
    is written: a workdir whose ``identities/`` holds clients' directories (private keys an
    earlier call without ``client_public_keys`` wrote) and, with ``resume``, public key files
    whose allowlist is not the run's, and as by :func:`deploy_local`, a workdir whose
    process record names processes still running (stopped first with ``stop_stale``)."""
    cfg, work, max_in_flight, resumed, amendments = _checked_deployment(
        config, num_clients, workdir, reproducible_dp_noise=reproducible_dp_noise,
        key_holder=key_holder, max_in_flight=max_in_flight, compare_methods=compare_methods,
        full_client_errors=full_client_errors, resume=resume, stop_stale=stop_stale)
    fed = LocalFederation(work, cfg.data.num_clients, timeouts=timeouts,
                          full_client_errors=full_client_errors,
                          client_public_keys=client_public_keys, resume=bool(resumed))
    fed.prepare()  # its identity checks come before it writes anything
    run_toml = fed.write_run_config(cfg, work / "results", num_threads=num_threads,
                                    reproducible_dp_noise=reproducible_dp_noise,
                                    key_holder=key_holder, max_in_flight=max_in_flight,
                                    compare_methods=compare_methods, resume=resumed,
                                    amendments=amendments)
    return fed.planned_commands(run_toml)


def _checked_deployment(
    config: str | os.PathLike[str] | ExperimentConfig,
    num_clients: int | None,
    workdir: str | os.PathLike[str],
    *,
    reproducible_dp_noise: bool,
    key_holder: int,
    max_in_flight: int | None,
    compare_methods: bool,
    full_client_errors: Sequence[int],
    resume: bool,
    stop_stale: bool = False,
    say: Callable[[str], None] | None = None,
) -> tuple[ExperimentConfig, Path, int, int, list[dict[str, Any]]]:
    """What :func:`deploy_local` checks before it writes anything: the config to deploy, the
    resolved workdir, the in-flight window, the resumed run's id (0: none) and its config
    amendments; raises as :func:`deploy_local` documents."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    cfg = with_reproducible_noise(with_num_clients(cfg, num_clients), reproducible_dp_noise)
    check_supported(cfg, reproducible_dp_noise, compare_methods)
    check_apps_know_entries(cfg)
    if not 0 <= key_holder < cfg.data.num_clients:
        raise DeployError(
            f"key holder {key_holder} is not a client index in [0, {cfg.data.num_clients})"
        )
    outside = sorted(set(full_client_errors) - set(range(cfg.data.num_clients)))
    if outside:
        raise DeployError(f"full client errors name clients {outside}, not client indexes in "
                          f"[0, {cfg.data.num_clients})")
    if max_in_flight is None:
        max_in_flight = default_max_in_flight()
    if max_in_flight < 0:
        raise DeployError(f"max_in_flight must be >= 0 (0: all at once); got {max_in_flight}")
    problem = path_problem(Path(workdir).expanduser())
    if problem not in (None, "does not exist", "is not a directory"):
        # resolve() would raise RuntimeError on a loop, and a run could not be written there
        raise DeployError(f"the workdir {str(workdir)!r} {problem}; name a directory (a new "
                          "one for a new run)")
    work = Path(workdir).expanduser().resolve()
    if any(ch in str(work) for ch in '"\\\n'):
        # the SuperNodes' node config quotes its paths; a quote or backslash in them would
        # end the value early and point a node at another directory
        raise DeployError(f"the workdir {str(work)!r} contains a quote, a backslash or a line"
                          " break, which Flower's node config cannot carry; choose another path")
    if work.exists() and not work.is_dir():
        # checked before anything starts: creating its subfolders failed with a bare OSError
        raise DeployError(f"the workdir {str(work)!r} exists and is not a directory; name a "
                          "directory (a new one for a new run)")
    check_settings_used(cfg, resume=resume)
    if cfg.security.keystore is not None:
        # the config is used as given (its hash binds the run), so the key is only named
        log.warning("[security] keystore = %s is unused by the Flower runtime: each party's "
                    "keys are in its identity directory %s/<party>",
                    json.dumps(cfg.security.keystore), work / "identities")
    # before the checkpoint is read: a leftover ServerApp may still be writing it
    check_stale_processes(work, stop=stop_stale, say=say)
    resumed: int = 0
    amendments: list[dict[str, Any]] = []
    if resume:
        resumed, cfg, amendments = _resumed_run(work, cfg)
    if not resume:
        _refuse_used_workdir(work)
    return cfg, work, max_in_flight, resumed, amendments
