"""Command-line interface: ``secure-fedora run CONFIG`` and friends."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from privacy.errors import ToolkitError
from privacy.paths import read_regular_file
from secure_fedora.core.config import (
    ConfigError,
    check_path_argument,
    check_settings_used,
    config_from_bytes,
)
from secure_fedora.core.errors import (
    INTERRUPTED_EXIT_CODE,
    add_debug_flag,
    interrupt_on,
    one_line,
    run_command,
    split_debug_flag,
)
from secure_fedora.runtimes.summary import print_run_summary, results_table

__all__ = ["main", "results_table"]

console = Console(stderr=True)


def privacy_plan_table(rows: list[dict[str, Any]]) -> Table:
    """The DP plan of one method, per distinct client budget, printed before training: the
    planned epsilon rounded up and the DP-SGD noise multiplier rounded down to 4 decimals (no
    shown figure claims more privacy than the plan holds; the planned epsilon at the budget's
    decimals where it has more, so it reads above the budget exactly when it is); budget, delta and sample rate, and
    the releases in the caption, exactly as results.json states them (one line per row, in
    the rows' order and labelled with its budget, where the rows' releases differ); the
    caption's last line says that the planned epsilon is rounded up, the spent one exact."""
    from privacy.accounting import format_down, format_spent

    table = Table(title=f"privacy plan: {rows[0]['method']}" if rows else "privacy plan")
    for col in ("clients", "epsilon", "delta", "DP-SGD sigma", "q", "steps/round", "rounds", "planned eps"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["clients"]), repr(r["epsilon_budget"]), repr(r["delta"]),
                      format_down(r["noise_multiplier"], 4), repr(r["sample_rate"]), str(r["steps_per_round"]),
                      str(r["rounds"]), format_spent(r["planned_epsilon"], r["epsilon_budget"]))
    releases = ["; ".join(r["releases"]) for r in rows]
    if len(set(releases)) <= 1:
        table.caption = "releases per client: " + "".join(releases[:1])
    else:  # each budget's own noise, labelled and in the rows' order
        table.caption = "\n".join(
            f"releases per client at epsilon {r['epsilon_budget']!r}, delta {r['delta']!r}: {text}"
            for r, text in zip(rows, releases, strict=True))
    noise = rows[0].get("noise") if rows else None
    if noise:
        table.caption += f"\nnoise: {noise}"
        if rows[0].get("noise_warning"):
            table.caption += f" -- WARNING: {rows[0]['noise_warning']}"
    if rows and "accountant" in rows[0]:
        table.caption += f"\naccountant: {rows[0].get('accountant_reason', rows[0]['accountant'])}"
    for kind, stages in (rows[0].get("release_stages") or {}).items() if rows else ():
        table.caption += f"\n{kind} release: {' -> '.join(stages)}"
    table.caption += f"\n{PLANNED_EPS_NOTE}"
    return table


#: The plan table's last caption line: how its "planned eps" relates to the spend a run
#: reports (results.json ``epsilon_spent``, the ledgers' ``epsilon_after``).
PLANNED_EPS_NOTE = ("planned eps: the plan's epsilon rounded up; the epsilon a client spends"
                    " (results.json epsilon_spent, its ledger) is exact")


def add_keystore_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--keystore DIR`` to the parser of a command that runs a DP federation (``run``,
    ``audit canary``): the one spelling and help of the flag; check its value with
    :func:`keystore_flag`."""
    parser.add_argument("--keystore", help="key store of a DP run's private keys (default:"
                        " [security] keystore, else HOME/<name> with HOME"
                        " $SECURE_FEDORA_KEYSTORE_HOME, else $XDG_DATA_HOME/secure-fedora/"
                        "keystore, else ~/.local/share/secure-fedora/keystore; see `keys"
                        " init`); an error when the config has [privacy] enabled = false (such"
                        " a run reads no key store)")


def keystore_flag(value: str | None) -> str | None:
    """``--keystore``'s value, checked before anything runs: ConfigError naming the flag when
    it is empty or only spaces (it would mean the current directory) or holds NUL."""
    if value is not None and not value.strip():
        raise ConfigError("--keystore is empty: name the key store directory, or leave "
                          "--keystore out for the default")
    if value is not None:
        check_path_argument(value, "--keystore")
    return value


def _run_with_progress(args: argparse.Namespace, cfg: Any, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Build the simulation for ``run_dir`` and run it with a progress bar per method; returns
    the simulation and its results."""
    from secure_fedora.api import Experiment
    from secure_fedora.runtimes.summary import progress_bars
    from secure_fedora.secure.keystore import CLI_KEYSTORE_OPTION

    with progress_bars(console, args.quiet) as progress:
        tasks = {m: progress.add_task(m, total=cfg.training.rounds) for m in cfg.methods}

        def on_round(method: str, rnd: int, total: int) -> None:
            progress.update(tasks[method], completed=rnd)

        sim = Experiment(cfg, run_dir=run_dir).simulation(progress=on_round, keystore=args.keystore)
        sim.keystore_option = CLI_KEYSTORE_OPTION  # key-store errors name the flag
        if cfg.privacy.enabled:
            for name in cfg.methods:  # a plan over budget refuses the run before a key is made
                sim.budget_plans(name)
            sim.check_model_sizes()  # so does a method that cannot run on the model
            sim.check_data()  # or on the data
            sim.check_context()  # or by the data and model checks of the run's context
            _ = sim.key_dir  # resolves (or creates, with a note) the key store before the plan
        sim.on_privacy_plan = lambda rows: progress.console.print(privacy_plan_table(rows))
        results = sim.run(resume=args.resume)
        for m in cfg.methods:
            progress.update(tasks[m], completed=cfg.training.rounds)
    return sim, results


def _resume_command(config: str, run_dir: Path) -> str:
    return f"secure-fedora run {shlex.quote(config)} --out {shlex.quote(str(run_dir))} --resume"


def _name_resume_command(err: ToolkitError, config: str, run_dir: Path) -> None:
    """Put this run's config path and run directory into the resume command that ``err``
    names (a diverged FEDORA pull: :data:`~secure_fedora.learning.client.PULL_RESUME_COMMAND`)."""
    from secure_fedora.learning.client import name_resume_command

    name_resume_command(err, _resume_command(config, run_dir))


def _chained(err: BaseException) -> BaseException | None:
    """The exception ``err`` names as its reason, as a traceback shows it: ``raise ... from
    cause``, else the one it was raised while handling, unless ``raise ... from None``."""
    if err.__cause__ is not None:
        return err.__cause__
    return None if err.__suppress_context__ else err.__context__


def _caused_by_os_error(err: BaseException) -> bool:
    """Whether ``err`` was raised from, or while handling, an ``OSError`` (a full disk, an I/O
    error): the run stopped for its environment, not for its config, data or budget. An error
    raised ``from None`` disowns what it was handling (a deliberate refusal, such as a file
    found with other content), and so does one raised from a cause that is no OSError."""
    seen: set[int] = set()
    cause = _chained(err)
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return True
        seen.add(id(cause))
        cause = _chained(cause)
    return False


def _stopped_message(err: BaseException, config: str, run_dir: Path) -> str:
    return (f"{one_line(err)}; the run in {run_dir} stopped and can be continued once that is "
            f"fixed: {_resume_command(config, run_dir)}")


def cmd_run(args: argparse.Namespace) -> int:
    """``secure-fedora run``: run (or ``--resume``) an experiment into its run directory and print
    its summary; 0 on success, 130 when stopped by Ctrl-C or SIGTERM."""
    from secure_fedora.runtimes.rundir import (
        RunDirError,
        default_run_dir,
        hold_run_dir,
        prepare_run_dir,
        withdraw_unstarted_run,
    )
    from secure_fedora.secure.keystore import check_keystore_used

    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty: name the run directory, or leave --out out for "
                          "runs/<name>-<timestamp>")
    keystore_flag(args.keystore)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out, the run directory to continue")
    # an empty path would read the current directory ("Is a directory"), as load_config refuses
    config_path = check_path_argument(args.config, "the config path", "file")
    config_bytes = read_regular_file(config_path, "config", ConfigError)
    cfg = config_from_bytes(config_bytes, args.config)  # the bytes copied into the run
    check_keystore_used(cfg.privacy.enabled, cfg.security.keystore, args.keystore,
                        resume=args.resume)
    check_settings_used(cfg, resume=args.resume)
    run_dir = Path(args.out) if args.out else default_run_dir(cfg)
    created = not run_dir.exists()
    # the signal handler set below is put back when the command ends, after the summary
    with contextlib.ExitStack() as on_exit:
        # held from the checks to the last write: a second run or resume of this --out is refused
        with hold_run_dir(run_dir, create=not args.resume):
            prepare_run_dir(run_dir, cfg, config_bytes, resume=args.resume)
            # SIGTERM stops the run as Ctrl-C does (its files closed, a message naming the
            # resume), up to the command's end: while the plots are drawn too
            on_exit.callback(interrupt_on(signal.SIGTERM))
            try:
                sim, results = _run_with_progress(args, cfg, run_dir)
            except ToolkitError as err:
                if not args.resume and withdraw_unstarted_run(run_dir, created):
                    raise
                _name_resume_command(err, args.config, run_dir)
                # e.g. a ledger write that failed with EIO: kept and resumable like a bare
                # OSError; a refusal for the config, data or budget would only be repeated by a
                # resume
                if (_caused_by_os_error(err) and err.args and isinstance(err.args[0], str)
                        and _resume_command(args.config, run_dir) not in err.args[0]):
                    err.args = (_stopped_message(err, args.config, run_dir), *err.args[1:])
                raise
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (above)
                if not args.resume and withdraw_unstarted_run(run_dir, created):
                    print(f"interrupted before the run started; {run_dir} holds nothing of it",
                          file=sys.stderr)
                else:
                    print(f"interrupted; the run in {run_dir} stopped and can be continued: "
                          f"{_resume_command(args.config, run_dir)}", file=sys.stderr)
                return INTERRUPTED_EXIT_CODE
            except OSError as err:  # a full disk, an I/O error: what was written stays resumable
                if not args.resume and withdraw_unstarted_run(run_dir, created):
                    raise
                raise RunDirError(_stopped_message(err, args.config, run_dir)) from err
            except BaseException:
                if not args.resume:
                    withdraw_unstarted_run(run_dir, created)
                raise
            try:
                # imported here: refusing a bad config or run directory needs no matplotlib
                from secure_fedora.runtimes.plots import relatedness_matrix, write_plots

                write_plots(run_dir, sim.history, results,
                            relatedness_matrix(sim.methods.values()))
            except KeyboardInterrupt:  # the run is complete; only its plots are not
                print(f"interrupted while drawing the plots; the run in {run_dir} finished (its "
                      "results.json, rounds.csv and, under DP, ledgers and anchor.json are "
                      "complete), its plots were skipped and are drawn by "
                      f"{_resume_command(args.config, run_dir)}", file=sys.stderr)
                return INTERRUPTED_EXIT_CODE
        try:
            print_run_summary(Console(), results, run_dir)
        except KeyboardInterrupt:
            print(f"interrupted while printing the summary; the run in {run_dir} finished and "
                  "its files are complete", file=sys.stderr)
            return INTERRUPTED_EXIT_CODE
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    """``secure-fedora keys init``: a key store (0700, private keys 0600) with the server's, the
    operator's and N clients' keys and their ``allowlist.json``; refuses existing keys without
    ``--force`` and a run directory."""
    from privacy.identity import MAX_CLIENT_IDS, init_keys
    from secure_fedora.secure.keystore import refuse_run_directory, run_party_ids

    # an empty directory would be the current one, which then receives every private key
    check_path_argument(args.directory, "the key directory")
    refuse_run_directory(Path(args.directory), "keys init")
    if not 1 <= args.clients <= MAX_CLIENT_IDS:
        console.print(f"[red]error:[/red] --clients must be between 1 and {MAX_CLIENT_IDS:,}, "
                      f"got {args.clients}")
        return 2
    identities = init_keys(args.directory, run_party_ids(args.clients), overwrite=args.force)
    Console().print(f"wrote {len(identities)} identities (private keys 0600) and allowlist.json "
                    f"to {args.directory}", markup=False)
    return 0


def cmd_keys_party(args: argparse.Namespace) -> int:
    """``secure-fedora keys party``: one party's identity made on its own host; prints its public
    key file, the only file to send to the operator."""
    from privacy.identity import init_party
    from secure_fedora.secure.keystore import refuse_run_directory

    # an empty directory would be the current one, which then receives the private keys
    check_path_argument(args.directory, "the identity directory")
    refuse_run_directory(Path(args.directory), "keys party")
    replaced = args.force and (Path(args.directory) / f"{args.party}.ed25519.key").exists()
    identity, public_file = init_party(args.directory, args.party, overwrite=args.force)
    if replaced:  # its old key signed ledgers and envelopes that only the old allowlist verifies
        Console(stderr=True).print(
            f"warning: replaced the identity of {identity.party_id} in {args.directory}: a run "
            "this node is part of cannot go on with the new keys, and ledgers its old key signed "
            "verify only against an allowlist copy that lists the old key (keep it); the "
            "operator must allowlist the new public key", markup=False)
    Console().print(f"wrote the identity of {identity.party_id} to {args.directory} (private keys "
                    f"0600, directory 0700); send its public key file {public_file} to the "
                    "operator over a channel that keeps it intact (it is public), then install "
                    f"the allowlist you receive with `secure-fedora keys install {args.directory} "
                    "ALLOWLIST`", markup=False)
    print(public_file.read_text(), end="")
    return 0


def cmd_keys_allowlist(args: argparse.Namespace) -> int:
    """``secure-fedora keys allowlist``: the federation's ``allowlist.json`` assembled from the
    parties' public key files, written atomically; an existing OUT is replaced only with
    ``--force``."""
    from privacy.identity import IdentityError, allowlist_bytes, assemble_allowlist
    from secure_fedora.core.files import atomic_write_bytes

    out = check_path_argument(args.out, "the allowlist file", "file")
    if out.is_dir():
        raise IdentityError(f"{out} is a directory; name the allowlist file to write")
    if out.exists() and not args.force:
        raise IdentityError(f"{out} exists; pass --force to replace it")
    parties = assemble_allowlist(args.public_files, args.clients)
    # public, copied to every host: 0644, as the allowlist.json of an identity directory
    atomic_write_bytes(out, allowlist_bytes(parties), mode=0o644)
    Console().print(f"wrote {out}: {len(parties)} parties ({', '.join(parties)}); send it to "
                    "every party (`secure-fedora keys install DIR ALLOWLIST` on its host) and "
                    "keep a copy for `audit verify --allowlist`", markup=False)
    return 0


def cmd_keys_install(args: argparse.Namespace) -> int:
    """``secure-fedora keys install``: install the operator's allowlist into a party's identity
    directory (refused when it lists other keys for that party or, with ``--key-holder``,
    lacks the key holder's keys or lists other ones)."""
    from privacy.identity import install_allowlist

    party, replaced = install_allowlist(args.directory, args.allowlist, args.key_holder)
    checked = f", key holder checked against {args.key_holder}" if args.key_holder else ""
    Console().print(f"installed {args.allowlist} as {Path(args.directory) / 'allowlist.json'} "
                    f"for {party}{' (replacing another allowlist)' if replaced else ''}{checked}",
                    markup=False)
    return 0


# Sub-commands whose modules are heavy (torch, matplotlib, flwr): imported only when the
# command line names them, so ``secure-fedora --help`` starts without torch.
_SUBSYSTEMS: dict[str, tuple[str, str]] = {
    "sweep": ("secure_fedora.experiments.sweep_cli", "run methods x epsilon x seeds and write a table and plots"),
    "deploy": ("secure_fedora.runtimes.flower.cli", "secure deployment on Flower (TLS, node auth)"),
}

# Packages layered above secure_fedora (the audits package) add their commands through this
# entry-point group (``name = "module:register"``), so this module never imports them by name.
COMMAND_ENTRY_POINTS = "secure_fedora.commands"


def _plugin_commands() -> dict[str, tuple[str, str]]:
    """Commands contributed by installed packages: name -> (module, help)."""
    from importlib.metadata import entry_points

    return {ep.name: (ep.module, f"commands of the {ep.module.split('.')[0]!r} package"
                      f" (see `secure-fedora {ep.name} --help`)")
            for ep in entry_points(group=COMMAND_ENTRY_POINTS)}


def _requested_command(argv: Sequence[str] | None) -> str | None:
    """The sub-command named on the command line (its first non-option word), if any."""
    words = list(sys.argv[1:] if argv is None else argv)
    return next((w for w in words if not w.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = ()) -> argparse.ArgumentParser:
    """The full parser; with ``argv`` given, only the sub-system it names is imported (the
    others appear in the help as names only). ``argv=()`` (the default) imports all."""
    parser = argparse.ArgumentParser(prog="secure-fedora", description=__doc__)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment from a TOML config")
    run.add_argument("config", help="path to a TOML config (see configs/)")
    run.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoints")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_keystore_flag(run)
    run.set_defaults(func=cmd_run)

    keys = sub.add_parser("keys", help="identity keys (Ed25519 signing, X25519 key agreement)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create a key store: keys for the server, the run"
                               " operator (signs anchor.json) and N clients + allowlist")
    init.add_argument("directory", help="key directory (created 0700; private keys 0600)")
    init.add_argument("--clients", type=int, required=True, help="number of clients")
    init.add_argument("--force", action="store_true", help="overwrite existing keys")
    init.set_defaults(func=cmd_keys_init)
    party = keys_sub.add_parser(
        "party", help="create ONE party's identity on its own host (a Flower deployment on "
        "several machines); writes its public key file PARTY.public.json for the operator")
    party.add_argument("directory", help="the party's identity directory (created 0700; private "
                       "keys 0600); a SuperNode's identity-dir")
    party.add_argument("--party", required=True,
                       help="party id: server or client-NNN (client-000, client-001, ...)")
    party.add_argument("--force", action="store_true",
                       help="replace the party's existing identity (its new public key must be "
                       "allowlisted again)")
    party.set_defaults(func=cmd_keys_party)
    allow = keys_sub.add_parser(
        "allowlist", help="assemble the federation's allowlist.json from the parties' public "
                          "key files (PARTY.public.json)")
    allow.add_argument("out", help="allowlist file to write")
    allow.add_argument("public_files", nargs="+", metavar="PUBLIC_FILE",
                       help="the parties' public key files, the server's among them")
    allow.add_argument("--clients", type=int, default=None,
                       help="require exactly the server and clients client-000 ... of N clients "
                            "(without it: client-000 ... up to the highest client given)")
    allow.add_argument("--force", action="store_true", help="replace an existing OUT")
    allow.set_defaults(func=cmd_keys_allowlist)
    install = keys_sub.add_parser(
        "install", help="install the federation's allowlist into a party's identity directory "
                        "(checks that it lists this party's own public keys)")
    install.add_argument("directory", help="the party's identity directory (keys party)")
    install.add_argument("allowlist", help="the allowlist.json the operator sent")
    install.add_argument(
        "--key-holder", metavar="PUBLIC_FILE", default=None,
        help="the CKKS key holder's public key file (client-XYZ.public.json, from the key "
             "holder over a channel that keeps it intact; fedora.relatedness = encrypted or "
             "noised+encrypted): refused unless the allowlist lists exactly these keys for it")
    install.set_defaults(func=cmd_keys_install)

    import importlib

    wanted = _requested_command(argv) if argv != () else None
    for name, (module, help_text) in {**_SUBSYSTEMS, **_plugin_commands()}.items():
        if argv == () or name == wanted:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``secure-fedora`` console script; returns the exit code.

    Every error of the toolkit (and ``OSError``) is printed as one line ``error: ...`` with
    exit code 2; ``--debug`` (anywhere on the command line) also prints its traceback. Only
    the sub-system the command names is imported (``--help`` imports no torch)."""
    argv, debug = split_debug_flag(argv)
    args = build_parser(argv).parse_args(argv)
    return run_command(args.func, args, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
