"""``secure-fedora deploy ...``: certificates and a local secured Flower deployment.

``register(subparsers)`` adds the ``deploy`` command group to the main argparse parser:

- ``deploy certs --out DIR --host H [--host H ...] [--nodes N] [--days D] [--force]``
- ``deploy local [--config CONFIG] [--clients N] [--workdir DIR] [--round-timeout S]
  [--run-timeout S] [--threads T] [--key-holder K] [--reproducible-dp-noise]
  [--compare-methods] [--full-client-errors K ...] [--resume] [--stop-stale] [--print-commands]
  [--quiet]``

``deploy local`` without ``--config`` deploys the smoke config the package ships
(:data:`DEFAULT_CONFIG`, a copy of ``configs/smoke.toml``), and without ``--workdir`` works in
``runs/<name>-deploy`` (:func:`~secure_fedora.runtimes.rundir.default_deploy_dir`).

Every command sets ``func`` (returning the exit code), as the main CLI expects. Failures
raise the toolkit's errors, which the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID

from secure_fedora.core.config import MAX_THREADS
from secure_fedora.core.errors import interrupt_on
from secure_fedora.runtimes.summary import progress_bars

__all__ = ["DEFAULT_CONFIG", "cmd_certs", "cmd_local", "default_config_path", "register",
           "round_bars"]

console = Console(stderr=True)

#: The config ``deploy local`` runs without ``--config``: the package's copy of
#: ``configs/smoke.toml`` (8 rotated-MNIST clients, 3 rounds, FEDORA, Local and FedAvg
#: without privacy), shipped as package data so an installed package finds it.
DEFAULT_CONFIG = "runtimes/flower/smoke.toml"


def default_config_path() -> Path:
    """The path of :data:`DEFAULT_CONFIG` inside the installed ``secure_fedora`` package."""
    return Path(str(resources.files("secure_fedora").joinpath(DEFAULT_CONFIG)))


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; the error says ``expected ...``."""

    def parse(value: str) -> int:
        try:
            parsed = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if parsed < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return parsed

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _thread_count(value: str) -> int:
    """An argparse type for ``--threads``: an integer in [1, 1024], the bound of
    ``training.threads`` (2**70 passed here and stopped every ClientApp in
    ``torch.set_num_threads``; OpenMP allocates per thread up front)."""
    parsed = _positive_int(value)
    if parsed > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected a number of threads from 1 to {MAX_THREADS} "
                                         f"(as training.threads), got {value!r}")
    return parsed


def _positive_float(value: str) -> float:
    """An argparse type for a timeout in seconds: a finite number > 0 that a thread can wait
    (at most ``threading.TIMEOUT_MAX``); nan, inf and larger are refused (a wait of inf
    raised OverflowError inside the deployment instead of at the command line)."""
    expected = f"expected a positive number of seconds (at most {threading.TIMEOUT_MAX:.0f})"
    try:
        parsed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {value!r}") from None
    if not (parsed > 0 and math.isfinite(parsed) and parsed <= threading.TIMEOUT_MAX):
        raise argparse.ArgumentTypeError(f"{expected}, got {value!r}")
    return parsed


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a CA, a server certificate for ``--host`` and optionally ``--nodes`` node keys."""
    from privacy.identity import MAX_CLIENT_IDS
    from secure_fedora.core.config import check_path_argument
    from secure_fedora.runtimes.flower.certs import (
        check_certificates,
        check_node_keys,
        make_certificates,
        make_node_keys,
    )
    from secure_fedora.runtimes.flower.protocol import DeployError

    if args.nodes > MAX_CLIENT_IDS:
        raise DeployError(f"--nodes must be at most {MAX_CLIENT_IDS:,}, got {args.nodes}")
    # an empty --out would be the current directory, which then receives the CA's private key
    out = check_path_argument(args.out, "--out")
    # every refusal before the first write: node keys refused after the CA was written
    # would leave a CA no key was made for
    check_certificates(out, args.host, valid_days=args.days, overwrite=args.force)
    names = [f"node-{i}" for i in range(args.nodes)]
    if names:
        check_node_keys(out / "keys", names, overwrite=args.force)
    paths = make_certificates(out, args.host, valid_days=args.days, overwrite=args.force)
    keys = make_node_keys(out / "keys", names, overwrite=args.force) if names else []
    report = {
        "ca_cert": str(paths.ca_cert),
        "server_cert": str(paths.server_cert),
        "server_key": str(paths.server_key),
        "subject_alt_names": list(paths.hosts),
        "node_keys": [{"private": str(k.private_key), "public": str(k.public_key)} for k in keys],
    }
    print(json.dumps(report, indent=2))
    return 0


def _interrupt_on_termination() -> Callable[[], None]:
    """Make SIGTERM and SIGHUP interrupt like Ctrl-C (KeyboardInterrupt), so that the
    deployment stops every process it started (they run in sessions of their own and would
    outlive this one); returns the function that restores the previous handlers (see
    :func:`~secure_fedora.core.errors.interrupt_on`)."""
    return interrupt_on(signal.SIGTERM, signal.SIGHUP)


def _resume_hint(workdir: str, resumed: bool) -> str:
    """What an interrupted ``deploy local`` adds to its last line: the resume it allows when
    ``workdir`` holds an unfinished run's ServerApp checkpoint, else nothing."""
    from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT

    results = Path(workdir).expanduser() / "results"
    if not (results / SERVER_CHECKPOINT).is_file() or (results / "results.json").exists():
        return ""
    how = "the same command" if resumed else "the same command with --resume"
    return escape(f"; {how} continues the run from its checkpoint {results / SERVER_CHECKPOINT}")


def round_bars(quiet: bool) -> tuple[Progress, Callable[[str, int, int], None]]:
    """The progress bars ``deploy local`` shows (one per method, as ``run`` shows them; none
    when ``quiet``) and the ``on_round(method, round, rounds)`` that advances them."""
    bars = progress_bars(console, quiet)
    tasks: dict[str, TaskID] = {}

    def on_round(method: str, rnd: int, rounds: int) -> None:
        if method not in tasks:
            tasks[method] = bars.add_task(escape(method), total=rounds)
        bars.update(tasks[method], completed=rnd, total=rounds)

    return bars, on_round


def cmd_local(args: argparse.Namespace) -> int:
    """Run every method of the config on a local TLS + node-authenticated Flower deployment,
    then stop it."""
    from privacy.identity import client_ids
    from privacy.paths import check_given_file
    from secure_fedora.core.config import check_path_argument, load_config
    from secure_fedora.runtimes.flower.local import RunTimeouts, deploy_local, local_commands
    from secure_fedora.runtimes.flower.protocol import DeployError
    from secure_fedora.runtimes.rundir import default_deploy_dir
    from secure_fedora.runtimes.summary import print_run_summary

    if args.client_public_keys is not None and not args.print_commands:
        raise DeployError(
            "--client-public-keys goes with --print-commands (the clients keep "
            "their private keys on their own hosts); deploy local runs every "
            "party on this host, with identities it makes itself"
        )
    if args.workdir is not None:
        # an empty --workdir would be the current directory: certificates, keys, node state
        check_path_argument(args.workdir, "--workdir")
    if args.config is not None:
        check_given_file(args.config, "config", DeployError, "--config")
    for public_file in args.client_public_keys or ():
        check_given_file(public_file, "public key file", DeployError, "--client-public-keys")
    config = args.config
    if config is None:
        config = str(default_config_path())
        console.print(f"[bold]deploy:[/bold] config {escape(config)} (the package's smoke "
                      "config; --config chooses another)")
    workdir = args.workdir
    if workdir is None:
        config = load_config(config)  # its name names the workdir; deployed as loaded here
        workdir = str(default_deploy_dir(config))
        console.print(f"[bold]deploy:[/bold] workdir {escape(workdir)} (the default for this "
                      "config's name; one that holds an earlier run is refused, --resume "
                      "continues a run whose ServerApp died, --workdir chooses another)")
    timeouts = RunTimeouts(round=args.round_timeout, run=args.run_timeout, connect=args.connect_timeout)
    if args.print_commands:
        for line in local_commands(
                config, args.clients, workdir, timeouts=timeouts, num_threads=args.threads,
                reproducible_dp_noise=args.reproducible_dp_noise, key_holder=args.key_holder,
                max_in_flight=args.max_in_flight, compare_methods=args.compare_methods,
                full_client_errors=args.full_client_errors, resume=args.resume,
                client_public_keys=args.client_public_keys, stop_stale=args.stop_stale):
            print(line)
        if args.client_public_keys is not None:
            allowlist = Path(workdir).expanduser().resolve() / "identities" / "server" / \
                "allowlist.json"
            cfg = load_config(config) if isinstance(config, str) else config
            holder = ""
            if "encrypted" in cfg.fedora.relatedness:
                num_clients = args.clients if args.clients is not None else cfg.data.num_clients
                party = client_ids(num_clients)[args.key_holder]
                holder = (f" --key-holder {party}.public.json`, the key holder's file as it "
                          "sent it: the clients open only CKKS contexts signed by the key the "
                          "allowlist lists for it")
            console.print(f"[bold]deploy:[/bold] the federation's allowlist is "
                          f"{escape(str(allowlist))}: install it on every client's host (`secure-"
                          f"fedora keys install DIR ALLOWLIST{holder or '`'}), whose identity "
                          "directory DIR each SuperNode line names NODE_IDENTITY_DIR, and keep a "
                          "copy for `audit verify --allowlist`")
        return 0
    restore = _interrupt_on_termination()
    bars, on_round = round_bars(args.quiet)
    try:
        with bars:
            result = deploy_local(
                config,
                args.clients,
                workdir,
                timeouts=timeouts,
                num_threads=args.threads,
                reproducible_dp_noise=args.reproducible_dp_noise,
                key_holder=args.key_holder,
                max_in_flight=args.max_in_flight,
                compare_methods=args.compare_methods,
                full_client_errors=args.full_client_errors,
                resume=args.resume,
                stop_stale=args.stop_stale,
                progress=lambda msg: console.print(f"[bold]deploy:[/bold] {escape(msg)}"),
                on_round=on_round,
            )
    except KeyboardInterrupt:
        console.print(f"[red]interrupted:[/red] every started process was stopped{_resume_hint(workdir, args.resume)}")
        return 130
    finally:
        restore()
    console.print(f"run {result.run_id} {result.status} in {result.seconds:.1f} s")
    # the summary `secure-fedora run` prints (on stderr: stdout holds the JSON line below)
    print_run_summary(console, result.results, result.workdir / "results")
    print(json.dumps({"run_id": str(result.run_id), "status": result.status,
                      "results": str(result.workdir / "results" / "results.json")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``deploy`` command group (``certs``, ``local``) to ``subparsers``."""
    deploy = subparsers.add_parser("deploy", help="secure deployment on Flower (TLS, node auth)")
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    certs = sub.add_parser("certs", help="create a CA and a server certificate (and node keys)")
    certs.add_argument("--out", required=True, help="output directory")
    certs.add_argument(
        "--host", action="append", default=[], metavar="H",
        help="host name or IP the SuperLink is reached at (repeatable; localhost and "
        "127.0.0.1 are always included)",
    )
    certs.add_argument("--nodes", type=_non_negative_int, default=0,
                       help="also create N SuperNode key pairs (in OUT/keys; default %(default)s)")
    certs.add_argument("--days", type=_positive_int, default=365,
                       help="validity in days (default %(default)s)")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(func=cmd_certs)

    local = sub.add_parser(
        "local", help="run the config's methods on a local SuperLink + N SuperNodes (127.0.0.1, "
        "TLS, node auth)"
    )
    local.add_argument("--config", default=None,
                       help="experiment config (TOML; default: the smoke config the package "
                       "ships, a copy of configs/smoke.toml: 8 rotated-MNIST clients, 3 rounds, "
                       "FEDORA, Local and FedAvg without privacy)")
    local.add_argument(
        "--clients", type=_positive_int, default=None,
        help="number of clients = SuperNodes (replaces data.num_clients of the config)",
    )
    local.add_argument("--workdir", default=None,
                       help="directory for certificates, state, logs and results (default: "
                       "runs/<name>-deploy, <name> the config's name, no timestamp: a workdir "
                       "that holds an earlier run is refused, --resume continues one whose "
                       "ServerApp died)")
    local.add_argument("--round-timeout", type=_positive_float, default=600.0,
                       help="seconds to wait for one round's replies (default 600)")
    local.add_argument("--connect-timeout", type=_positive_float, default=120.0,
                       help="seconds to wait for all SuperNodes to be online (default 120)")
    local.add_argument("--run-timeout", type=_positive_float, default=24 * 3600.0,
                       help="seconds before the whole run is stopped (default 86400)")
    local.add_argument("--threads", type=_thread_count, default=1,
                       help="torch threads per ServerApp / ClientApp process (default 1)")
    local.add_argument(
        "--reproducible-dp-noise", action="store_true",
        help="run with privacy.noise = 'reproducible' (DP noise seeded from the experiment seed; "
        "test deployments only: the server knows the seed, so there is no DP guarantee against "
        "it; the results say so)",
    )
    local.add_argument(
        "--compare-methods", action="store_true",
        help="let a DP config of several methods run in one deployment (a comparison: the server "
        "then receives every method's releases of the same clients' data, and each epsilon covers "
        "one method's; the results say so)",
    )
    local.add_argument(
        "--key-holder", type=_non_negative_int, default=0,
        help="client index that runs the CKKS key ceremony and decrypts the overlap blocks "
        "(fedora.relatedness = encrypted or noised+encrypted; default 0)",
    )
    local.add_argument(
        "--max-in-flight", type=_non_negative_int, default=None, metavar="N",
        help="messages the ServerApp keeps outstanding at once; each starts a ClientApp process "
        "on this host (0: all at once; default: twice the CPU cores)",
    )
    local.add_argument(
        "--full-client-errors", type=_non_negative_int, action="append", default=[],
        metavar="K",
        help="client index whose SuperNode agrees to send its error texts whole (node config "
        "client-errors=\"full\"; repeatable): only when [security] client_errors is \"full\" "
        "too. Every other node sends only an error's class name (the default)",
    )
    local.add_argument(
        "--resume", action="store_true",
        help="continue the run of this workdir whose ServerApp died, from its checkpoint in "
        "WORKDIR/results (same config and flags; the nodes answer the round in flight from their "
        "saved state; under DP a node that died with the server before saving its answer re-makes "
        "that round's release from its journal, the same noise, its ledger entry consumed, not "
        "appended); refused before anything is written when the checkpoint is another run's, configuration's or "
        "method list's, or when WORKDIR/identities lacks a key or allowlist of the run (a resume "
        "never makes new identities)",
    )
    local.add_argument(
        "--stop-stale", action="store_true",
        help="stop the processes of an earlier deployment in this workdir that still run "
        "(WORKDIR/processes.json names them; `deploy local` killed with SIGKILL leaves its "
        "ServerApp running) with SIGTERM, then SIGKILL after 5 s, before going on; without "
        "it such a workdir is refused, naming their pids",
    )
    local.add_argument(
        "--print-commands", action="store_true",
        help="start nothing: write into the workdir what the deployment's processes read "
        "(certificates, node keys, identities, run.toml) and print, one per line, every "
        "command the deployment would run, in order, to run by hand. Two placeholders must "
        "be replaced before a line runs: RUN_ID, in the flwr log and flwr ls lines, by the run "
        "id that the flwr run line prints once it submitted the run; and, with "
        "--client-public-keys, NODE_IDENTITY_DIR, in each SuperNode line, by the identity "
        "directory that client made on its own host (`secure-fedora keys party`). Otherwise "
        "the lines run as printed on this host; on other machines change the hosts and the "
        "nodes' paths (README, \"Real machines (Flower)\")",
    )
    local.add_argument("--quiet", action="store_true",
                       help="no progress bars (one per method, advanced as the ServerApp logs "
                       "each round; its log is logs/serverapp.log)")
    local.add_argument(
        "--client-public-keys", nargs="+", default=None, metavar="PUBLIC_FILE",
        help="with --print-commands: the clients' public key files client-NNN.public.json "
        "(`secure-fedora keys party` on each client's host); only the server's identity is "
        "written, with an allowlist of it and these keys: no client's private key is made here")
    local.set_defaults(func=cmd_local)
