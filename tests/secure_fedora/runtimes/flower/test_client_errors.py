"""What a client's error texts tell the server (``[security] client_errors``): by default the
error's class name and a fixed sentence; the full text only in the client's own log."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.common.constant import ErrorCode

from secure_fedora.algorithms.contract import ClientHalfError
from secure_fedora.algorithms.methods import FedAvg
from secure_fedora.core.config import config_hash, parse_config
from secure_fedora.core.registry import PARTITIONERS
from secure_fedora.data.partition import iid_partition
from secure_fedora.data.sources import DataError
from secure_fedora.learning.client import ClientUpdateError
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.certs import CertificatePaths, NodeKeyPaths
from secure_fedora.runtimes.flower.client_app import CLIENT_ERRORS_LOG
from secure_fedora.runtimes.flower.local import LocalFederation, _Node, deploy_local
from secure_fedora.runtimes.flower.protocol import DeployError, NodeSettings, RunSettings
from secure_fedora.runtimes.inprocess import Simulation
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    run_config,
    task_identity,  # noqa: F401 - a fixture
)

#: The data fact the bad client's DataError names (its largest training label).
STRAY_LABEL_FACT = "found 0..17"
#: The data fact a failing client half names (a loss that diverged at some step).
DIVERGED_FACT = "loss 3.25e+08 at step 7 on label 17"
WITHHELD = "details withheld; see the client's own log"


def _stray_label(dataset: Any, d: Any, seed: int) -> list[Any]:
    """IID clients, client 1 holding a training label (17) beyond the dataset's classes."""
    clients = iid_partition(dataset, d.num_clients, d.train_per_client, d.val_per_client,
                            d.test_per_client, seed)
    bad = clients[1].train_y.clone()
    bad[0] = 17
    clients[1] = dataclasses.replace(clients[1], train_y=bad)
    return clients


@pytest.fixture()
def stray_label() -> Any:
    PARTITIONERS.register("test-stray-label", _stray_label)
    yield
    PARTITIONERS.unregister("test-stray-label")


def _config(mode: str | None, **data: Any) -> Any:
    doc = json.loads(json.dumps(TINY))
    doc["methods"] = ["fedavg"]
    doc["data"].update(data)
    if mode is not None:
        doc["security"] = {"client_errors": mode}
    return parse_config(doc)


def _allow(mode: str | None) -> dict[int, str]:
    """Every node's ``client-errors`` (of 3): "full" where the run asks for "full" (the nodes
    agree), the default otherwise."""
    return dict.fromkeys(range(3), "full") if mode == "full" else {}


def _client_log(tmp_path: Path, client: int) -> str:
    return (tmp_path / "nodes" / f"node-{client}" / "runs" / "42" / CLIENT_ERRORS_LOG).read_text()


def _files_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.usefixtures("task_identity", "stray_label")
@pytest.mark.parametrize("mode", [None, "withheld", "full"])
def test_a_refusal_at_first_contact_names_only_the_error_class_unless_full_is_chosen(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str | None) -> None:
    """Client 1's training labels go beyond the classes. Its signed refusal carried the
    DataError's text, which names its largest label ("found 0..17"), into the server's stop
    message and log. By default (and with "withheld") the server now learns only the class
    name, and the full text is in the client's own log; "full" sends it whole. The stop
    message states the client's ``client-errors`` as its refusal does (it said nothing; the
    server could tell it only from the text's shape)."""
    cfg = _config(mode, partition="test-stray-label")
    result_dir = tmp_path / "res"
    result_dir.mkdir()
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=_allow(mode))
    with pytest.raises(DeployError, match=r"^client 1 \(node 1001\) refused the run at first "
                       r"contact: DataError") as err:
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    server_saw = str(err.value) + capsys.readouterr().out
    assert STRAY_LABEL_FACT in _client_log(tmp_path, 1)
    if mode == "full":
        assert f"DataError: client 1: train labels must lie in 0..9; {STRAY_LABEL_FACT}" \
            in str(err.value)
        assert str(err.value).endswith("[client-errors: full]; the run stops before any "
                                       "method message or release")
    else:
        assert f"first contact: DataError ({WITHHELD}) [client-errors: withheld]; the run " \
            "stops" in str(err.value)
        assert STRAY_LABEL_FACT not in server_saw and "train labels" not in server_saw
    assert list(result_dir.iterdir()) == []


@pytest.fixture()
def diverging_client(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """FedAvg's client 1 fails in round 2 with an error naming facts of its data (while the
    returned ``["on"]`` holds)."""
    real = FedAvg.client_update
    switch = {"on": True}

    def client_update(self: FedAvg, i: int, rnd: int, message: Any) -> Any:
        if switch["on"] and i == 1 and rnd == 2:
            raise RuntimeError(DIVERGED_FACT)
        return real(self, i, rnd, message)

    monkeypatch.setattr(FedAvg, "client_update", client_update)
    return switch


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("mode", [None, "full"])
def test_an_error_in_a_later_stage_reaches_the_server_as_its_class_name_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], diverging_client: dict[str, bool],
        mode: str | None) -> None:
    """Client 1's client half raises in round 2. Flower's error reply carried the exception's
    text ("... loss 3.25e+08 at step 7 on label 17") into the server's log and results.json's
    events. By default the reply, the event and every result file now name only the error's
    classes (ClientHalfError, from RuntimeError); the client's own log has the text and its
    traceback. With "full" the event carries the text. The run goes on without client 1 in
    round 2 either way, and results.json states the setting as the in-process run does (in
    process the same error stops the run in the caller's own process, its text whole)."""
    cfg = _config(mode)
    result_dir = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=_allow(mode))
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert [r["replied"] for r in results["rounds"]] == [3, 2]
    [event] = [e["event"] for e in results["events"]]
    assert event.startswith("error reply (") and "ClientHalfError" in event
    server_saw = _files_text(result_dir) + capsys.readouterr().out
    log = _client_log(tmp_path, 1)
    assert DIVERGED_FACT in log and "Traceback" in log
    if mode == "full":
        assert DIVERGED_FACT in event
    else:
        assert f"ClientHalfError (from RuntimeError) ({WITHHELD})" in event
        assert DIVERGED_FACT not in server_saw and "label 17" not in server_saw
    with pytest.raises(ClientHalfError, match=re.escape(DIVERGED_FACT)):
        Simulation(cfg, tmp_path / "failed").run()
    assert DIVERGED_FACT not in _files_text(tmp_path / "failed")
    diverging_client["on"] = False
    in_process = Simulation(cfg, tmp_path / "inproc").run()
    assert results["assumptions"]["client_errors"] == in_process["assumptions"]["client_errors"]
    assert results["assumptions"]["client_errors"].startswith(mode or "withheld")


@pytest.mark.usefixtures("stray_label")
@pytest.mark.parametrize("mode", [None, "full"])
def test_in_process_a_client_error_stays_in_the_callers_process(
        tmp_path: Path, mode: str | None) -> None:
    """In process every client runs in the caller's own process: the bad client's DataError
    reaches the caller whole, whatever the setting, and nothing of it is written into the run
    directory (no results.json, no event), as no server outside the process exists."""
    cfg = _config(mode, partition="test-stray-label")
    run_dir = tmp_path / "inproc"
    with pytest.raises(ValueError, match=f"client 1: train labels must lie in 0..9; "
                       f"{STRAY_LABEL_FACT}"):
        Simulation(cfg, run_dir).run()
    assert not run_dir.exists() or STRAY_LABEL_FACT not in _files_text(run_dir)


def test_the_setting_is_validated_and_its_default_keeps_the_config_hash() -> None:
    """``client_errors`` takes "withheld" or "full" only; the default hashes as configs
    written before the key existed (their checkpoints and sweep cells stay valid)."""
    with pytest.raises(ValueError, match="client_errors"):
        _config("none")
    assert config_hash(_config(None)) == config_hash(_config("withheld"))
    assert config_hash(_config("full")) != config_hash(_config(None))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("node", [None, "withheld", "full"])
def test_a_node_withholds_its_error_texts_unless_it_agrees_whatever_the_run_says(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], diverging_client: dict[str, bool],
        node: str | None) -> None:
    """The run asks for "full". The run config was the only say: a server that chose "full"
    received client 1's error text ("... on label 17"). Client 1's node now decides too: by
    default (no ``client-errors``) or with "withheld" it sends only the error's classes; with
    "full" the text. results.json states what each client's node did."""
    cfg = _config("full")
    result_dir = tmp_path / "res"
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors={} if node is None else {1: node})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    [event] = [e["event"] for e in results["events"]]
    assert DIVERGED_FACT in _client_log(tmp_path, 1)
    stated = results["assumptions"]["client_errors_by_client"]
    if node == "full":
        assert "ClientHalfError: method 'fedavg'" in event and DIVERGED_FACT in event
        assert stated.endswith("withheld: clients [0, 2]; full: clients [1]")
    else:
        assert event.startswith(f"error reply (2: ClientHalfError (from RuntimeError) ({WITHHELD}))")
        assert DIVERGED_FACT not in _files_text(result_dir) + capsys.readouterr().out
        assert stated.endswith("withheld: clients [0, 1, 2]")


@pytest.mark.usefixtures("task_identity", "stray_label")
def test_a_node_that_withholds_refuses_with_the_class_name_under_a_full_run(
        tmp_path: Path) -> None:
    """First contact under a run of "full": client 1's node (default) refuses with only the
    DataError's class; the fact of its data stays in its own log."""
    cfg = _config("full", partition="test-stray-label")
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res")})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors={0: "full", 2: "full"})
    with pytest.raises(DeployError, match=re.escape(
            f"first contact: DataError ({WITHHELD}) [client-errors: withheld]")):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert STRAY_LABEL_FACT in _client_log(tmp_path, 1)


def _older_client_app(monkeypatch: pytest.MonkeyPatch, client: int, record: str) -> None:
    """Client ``client``'s first-contact replies as a ClientApp older than the protocol sends
    them: its ``record`` ("client" or "refusal") without ``client-errors`` (still signed)."""
    from flwr.app import ConfigRecord

    honest = client_app._reply

    def older(security: Any, message: Message, content: Any, rnd: int,
              release: Any = None) -> Message:
        if message.metadata.message_type == "query.hello" and record in content \
                and message.metadata.dst_node_id == 1000 + client:
            content[record] = ConfigRecord(
                {k: v for k, v in content[record].items() if k != "client-errors"})
        return honest(security, message, content, rnd, release)

    monkeypatch.setattr(client_app, "_reply", older)


@pytest.mark.usefixtures("task_identity")
def test_a_hello_from_an_older_client_app_stops_the_run_saying_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Client 1's ClientApp predates ``client-errors``: its hello was rejected as "hello reply
    malformed ('client-errors')" and the run stopped with "missing clients [1]", after the
    retry. The run now stops at once saying what it is (an older ClientApp: update the node),
    neither taking its error texts for withheld nor writing any result."""
    _older_client_app(monkeypatch, 1, "client")
    cfg = _config(None)
    result_dir = tmp_path / "res"
    result_dir.mkdir()
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    with pytest.raises(DeployError, match=re.escape(
            "clients [1] (nodes [1001]) answered the first contact without client-errors: a "
            "ClientApp older than this server's protocol (the field is missing; its error texts "
            "cannot be taken for withheld). Update secure-fedora on those SuperNodes")):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert "malformed" not in capsys.readouterr().out
    assert list(result_dir.iterdir()) == []
    assert not [m for m in grid.sent if m.metadata.message_type != "query.hello"]


@pytest.mark.usefixtures("task_identity", "stray_label")
def test_a_refusal_from_an_older_client_app_says_its_setting_is_not_stated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal without ``client-errors`` (an older ClientApp) still stops the run with its
    reason, and says the setting was not stated rather than taking it for withheld."""
    _older_client_app(monkeypatch, 1, "refusal")
    cfg = _config(None, partition="test-stray-label")
    rc = run_config(cfg, tmp_path)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    with pytest.raises(DeployError, match=re.escape(
            f"first contact: DataError ({WITHHELD}) [client-errors: not stated; a ClientApp "
            "older than this server's protocol")):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["none", 1, True, ""])
def test_a_node_config_client_errors_other_than_withheld_or_full_is_refused(value: Any) -> None:
    node_config = {"partition-id": 0, "state-dir": "/tmp/node-errors-scratch/s",
                   "identity-dir": "/tmp/node-errors-scratch/k", "client-errors": value}
    with pytest.raises(DeployError, match="node config client-errors must be one of"):
        NodeSettings.from_node_config(node_config, 3)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("run", "node", "sent"), [
    ("withheld", "full", f"DataError ({WITHHELD})"), ("full", None, f"DataError ({WITHHELD})"),
    ("full", "full", "DataError: label 17 found")])
def test_the_flower_client_app_answers_with_the_text_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: str, node: str | None, sent: str) -> None:
    """Flower wrapped the withheld text as ``<class '...WithheldError'>:<'DataError (...)'>``
    and logged the traceback a second time; the ClientApp now answers the error itself, its
    reason starting with the original error's class name."""
    def fails(message: Message, context: Context) -> Message:
        raise DataError("label 17 found")

    monkeypatch.setitem(client_app.app._registered_funcs, "query.hello",
                        client_app._error_reply(client_app._withholding(fails)))
    monkeypatch.setattr(client_app, "_record_client_error", lambda *args: None)
    cfg = _config(run)
    conf = {"partition-id": 0, **({"client-errors": node} if node else {})}
    rc = run_config(cfg, tmp_path)
    message = Message(RecordDict(), dst_node_id=1, message_type="query.hello")
    reply = client_app.app(message, Context(42, 1, conf, RecordDict(), rc))
    assert reply.has_error() and reply.error.reason == sent
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def test_deploy_local_gives_the_listed_nodes_client_errors_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``deploy local --full-client-errors K`` sets ``client-errors="full"`` in node K's node
    config alone (as Flower parses it); the others keep the default (withheld). A client index
    outside the run is refused before anything starts."""
    fed = LocalFederation(tmp_path / "work", 3, full_client_errors=[1])
    fed.certs = CertificatePaths(*(tmp_path / n for n in ("ca", "cak", "c", "k")), ("localhost",))
    fed.nodes = [_Node(i, NodeKeyPaths(f"n{i}", tmp_path / "a", tmp_path / "b"), 0,
                       tmp_path / f"node-{i}", tmp_path / "h") for i in range(3)]
    commands: list[list[str]] = []
    monkeypatch.setattr(fed, "_spawn", lambda name, command, home: commands.append(command))
    for i in range(3):
        fed.start_node(i, wait=False)
    configs = [parse_config_args([c[c.index("--node-config") + 1]]) for c in commands]
    assert [c.get("client-errors") for c in configs] == [None, "full", None]
    assert [NodeSettings.from_node_config(c, 3).client_errors for c in configs] == [
        "withheld", "full", "withheld"]
    with pytest.raises(DeployError, match=r"full client errors name clients \[3\]"):
        deploy_local(_config("full"), 3, tmp_path / "unused", full_client_errors=[3])
    assert not (tmp_path / "unused").exists()


def test_the_withheld_statement_names_every_fixed_text_a_withheld_client_sends() -> None:
    """results.json's ``assumptions.client_errors`` said a withheld text names "only the
    error's class, with a fixed sentence", but a client whose FEDORA pull diverged also sends
    a tag saying so (the server stops the run on it), which tells that lr * lambda reached the
    pull's limit and that training started from a finite loss on the client's data. Every
    fixed fragment a withheld text can carry beside class names is now quoted by the
    statement, which also says that whether a client errs, and with which class, is outside
    the ledgers."""
    from secure_fedora.learning.client import PULL_DIVERGED, ClientUpdateError
    from secure_fedora.runtimes.flower.protocol import client_error_text, reports_pull_divergence
    from secure_fedora.runtimes.results import config_assumptions

    pulled = ClientUpdateError(
        f"client 1: non-finite parameters ({PULL_DIVERGED}: lr * "
        "lambda = 2.5 >= 2, lambda = 25 from the validation losses)"
    )
    wrapped = ClientUpdateError("client 1's update failed")
    wrapped.__cause__ = pulled
    texts = [
        client_error_text(err, "withheld") for err in (DataError("found 0..17"), wrapped, pulled)
    ]
    assert reports_pull_divergence(texts[1]) and reports_pull_divergence(texts[2])
    # what each text says beside class names: its parenthesised parts but "(from <class>)"
    fixed = {text.partition(" (")[2] for text in texts}
    assert fixed == {
        f"{WITHHELD})",
        f"{PULL_DIVERGED}; {WITHHELD})",
        f"from ClientUpdateError) ({PULL_DIVERGED}; {WITHHELD})",
    }
    def fedora(mode: str | None) -> Any:  # the pull's tag: stated where a method has a pull
        doc = json.loads(json.dumps(TINY))
        doc["methods"] = ["fedora"]
        if mode is not None:
            doc["security"] = {"client_errors": mode}
        return parse_config(doc)

    stated = config_assumptions(fedora(None))["client_errors"]
    assert stated == config_assumptions(fedora("withheld"))["client_errors"]
    for part in (WITHHELD, PULL_DIVERGED):
        assert f'"{part}"' in stated
    assert "direct cause's" in stated and "outside the ledgers" in stated
    full = config_assumptions(fedora("full"))["client_errors"]
    assert "for a diverged pull, its fixed tag" in full
    assert PULL_DIVERGED not in config_assumptions(_config(None))["client_errors"]


#: What the plug-in below raises with: a fact its client's data could hold.
SECRET = "secret 42"


class _Escapes(BaseException):
    """A plug-in's own error that is not an ``Exception``."""


def _raising_plug_in(error: type[BaseException]) -> type:
    """A plug-in method whose client 1 raises ``error(SECRET)`` in round 1's training hook."""
    from tests.secure_fedora.algorithms.test_contract_checks import Toy

    class RaisesBeyondException(Toy):
        def client_update(self, i, rnd, message):  # type: ignore[no-untyped-def]
            if (i, rnd) == (1, 1):
                raise error(SECRET)
            return super().client_update(i, rnd, message)

    return RaisesBeyondException


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, _Escapes])
def test_an_error_beyond_exception_in_a_handler_is_withheld_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], error: type[BaseException]) -> None:
    """A plug-in's training hook raises ``SystemExit("secret 42")`` (or a KeyboardInterrupt,
    or its own BaseException) on client 1. The wrapper that withholds error texts caught only
    Exception: the error left the handler with its text whole, for whatever runs the ClientApp
    to send on. Now a SystemExit or KeyboardInterrupt still stops it, as one of the same kind
    carrying only the withheld text; any other is an error reply of that text and the run goes
    on without client 1 in round 1. The text is in the client's own log only."""
    from secure_fedora.core.registry import METHODS
    from tests.secure_fedora.runtimes.flower.deploy_support import tiny_config, with_methods

    METHODS.register("escapes_x", _raising_plug_in(error))
    try:
        cfg = with_methods(tiny_config(rounds=2), "escapes_x")
        result_dir = tmp_path / "res"
        rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        settings = RunSettings.from_run_config(rc)
        if error is _Escapes:
            results = server_app.run_federation(grid, settings, 42)  # type: ignore[arg-type]
            [event] = [e["event"] for e in results["events"]]
            assert f"_Escapes ({WITHHELD})" in event
            assert [r["replied"] for r in results["rounds"]] == [2, 3]
        else:
            with pytest.raises(error) as stopped:
                server_app.run_federation(grid, settings, 42)  # type: ignore[arg-type]
            assert type(stopped.value) is error
            assert stopped.value.args == (f"{error.__name__} ({WITHHELD})",)
            assert stopped.value.__suppress_context__ and stopped.value.__cause__ is None
    finally:
        METHODS.unregister("escapes_x")
    log = _client_log(tmp_path, 1)
    assert SECRET in log and "Traceback" in log
    assert SECRET not in _files_text(tmp_path / "res") + capsys.readouterr().out


def _duplicated_rows(dataset: Any, d: Any, seed: int) -> list[Any]:
    """IID clients, client 1's training rows all copies of its first row (rank 1)."""
    clients = iid_partition(dataset, d.num_clients, d.train_per_client, d.val_per_client,
                            d.test_per_client, seed)
    c = clients[1]
    rows = c.train_x.shape[0]
    clients[1] = dataclasses.replace(
        c, train_x=c.train_x[:1].expand(rows, *c.train_x.shape[1:]).clone(),
        train_y=c.train_y[:1].expand(rows).clone())
    return clients


@pytest.fixture()
def duplicated_rows() -> Any:
    PARTITIONERS.register("test-duplicated-rows", _duplicated_rows)
    yield
    PARTITIONERS.unregister("test-duplicated-rows")


RANK_FACT = "span only 1 direction"


@pytest.mark.usefixtures("task_identity", "duplicated_rows")
@pytest.mark.parametrize("mode", [None, "full"])
def test_a_client_whose_rows_span_fewer_than_q_directions_stops_a_flower_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str | None) -> None:
    """fedora.q = 2 with client 1's training rows of rank 1: its summary's second direction
    was whichever null-space vector LAPACK returned, and the run went on with similarities
    that are no function of the data. The node now refuses its summary (a RelatednessError,
    its text sent only under "full") and the run stops before any round, writing no results.
    The refusal, which asking again would only repeat, stopped the run only after asking the
    client twice, advising to "raise the timeouts"; it now stops it at once with the client's
    text (as its client-errors allows) and no timeout advice."""
    doc = json.loads(json.dumps(TINY))
    doc["data"]["partition"] = "test-duplicated-rows"
    doc["fedora"]["q"] = 2
    if mode is not None:
        doc["security"] = {"client_errors": mode}
    cfg = parse_config(doc)
    result_dir = tmp_path / "res"
    result_dir.mkdir()
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3, node_errors=_allow(mode))
    shown = (r"RelatednessError: fedora\.q = 2: client 1's summary rows .* span only 1 "
             r"direction.* \[client-errors: full\]" if mode == "full" else
             r"RelatednessError \(details withheld; see the client's own log\) "
             r"\[client-errors: withheld\]")
    with pytest.raises(DeployError, match=r"^fedora: client 1 \(node 1001\) refused its setup "
                       rf"reply: {shown}; asked again it would refuse again") as err:
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "timeouts" not in str(err.value)
    assert "sent again" not in out and out.count("error reply") == 1
    assert RANK_FACT in _client_log(tmp_path, 1)
    assert (RANK_FACT in str(err.value)) == (mode == "full")
    assert not (result_dir / "results.json").exists()


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("fails", [1, 2])
def test_a_setup_error_that_may_pass_is_asked_again_without_timeout_advice(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        fails: int) -> None:
    """Client 1's FEDORA setup raises a RuntimeError (not a refusal of its data) ``fails``
    times. It is still asked again: once, the run goes on; twice, the run stops naming both
    tries. That stop message advised to "raise the timeouts" though every try was answered
    with an error; the advice is now given only for a client offline or late."""
    from secure_fedora.algorithms.methods import Fedora

    real = Fedora.client_setup
    left = {"fails": fails}

    def client_setup(self: Fedora, i: int, message: Any) -> Any:
        if i == 1 and left["fails"] > 0:
            left["fails"] -= 1
            raise RuntimeError("setup failed (test)")
        return real(self, i, message)

    monkeypatch.setattr(Fedora, "client_setup", client_setup)
    cfg = parse_config(json.loads(json.dumps(TINY)))
    result_dir = tmp_path / "res"
    result_dir.mkdir()
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    if fails == 1:
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        assert "setup sent again to clients [1]" in capsys.readouterr().out
        assert (result_dir / "results.json").exists()
        return
    with pytest.raises(DeployError, match=r"clients \[1\] gave no accepted setup reply \(asked "
                       r"twice\).*check those SuperNodes' logs \(last events: client 1: error "
                       r"reply \(.*RuntimeError") as err:
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert "timeouts" not in str(err.value)


@pytest.mark.usefixtures("task_identity", "duplicated_rows")
def test_an_encrypted_summary_refusal_stops_the_run_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under encrypted relatedness client 1 (training rows of rank 1, fedora.q = 2) refuses
    its encrypted summary. The server asked it again before stopping; it now stops at once,
    naming the client's (withheld) error, without asking again."""
    doc = json.loads(json.dumps(TINY))
    doc["data"]["partition"] = "test-duplicated-rows"
    doc["fedora"].update(q=2, k=1, relatedness="encrypted")
    cfg = parse_config(doc)
    rc = run_config(cfg, tmp_path)
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    with pytest.raises(DeployError, match=r"client 1 \(node 1001\) refused its encrypted summary: "
                       r"RelatednessError \(details withheld; see the client's own log\) "
                       r"\[client-errors: withheld\]; asked again") as err:
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert "asked again of clients" not in capsys.readouterr().out
    assert "timeouts" not in str(err.value) and RANK_FACT not in str(err.value)
    assert RANK_FACT in _client_log(tmp_path, 1)


class _PluginDataError(DataError):
    """A plug-in's own data error (a subclass of the toolkit's)."""


def _wrapped_data_error() -> BaseException:
    try:
        try:
            raise _PluginDataError("rows of client 1 are bad")
        except _PluginDataError as inner:
            raise RuntimeError("plug-in dataset failed") from inner
    except RuntimeError as outer:
        err = ClientHalfError("method 'fedora': client 1's client_setup failed")
        err.__cause__ = outer
        return err


def _config_error_from_timeout() -> BaseException:
    from secure_fedora.core.config import ConfigError

    err = ConfigError("privacy: mechanism 'x': its record_params raised TimeoutError")
    err.__cause__ = TimeoutError("server did not answer")
    return err


def _plug_in_error_from_os_error() -> BaseException:
    from secure_fedora.core.plugins import PluginError

    err = PluginError("method 'x': its assumptions(cfg) raised OSError")
    err.__cause__ = OSError("disk not mounted")
    return err


def _data_error_from(cause: OSError) -> BaseException:
    err = DataError("data/x.gz: cannot read file")
    err.__cause__ = cause
    return err


def _read_error(content: bytes | None) -> BaseException:
    """The DataError the data sources' own read raises for a missing file (``None``) or one
    holding ``content``."""
    import tempfile

    from secure_fedora.data.sources import _read_bytes

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train-images-idx3-ubyte.gz"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(DataError) as caught:
            _read_bytes(path)
    return caught.value


@pytest.mark.parametrize("make, verdict", [
    (lambda: _read_error(None), "DataError"),
    (lambda: _read_error(b"\x1f\x8bnot gzip"), "DataError"),
    (lambda: _data_error_from(PermissionError(errno.EACCES, "Permission denied")), "DataError"),
    (lambda: _data_error_from(IsADirectoryError(errno.EISDIR, "Is a directory")), "DataError"),
    (lambda: _data_error_from(OSError(errno.EIO, "Input/output error")), None),
    (lambda: _data_error_from(BlockingIOError(errno.EAGAIN, "Try again")), None),
    (lambda: DataError("labels 0..17"), "DataError"),
    (lambda: _PluginDataError("bad"), "DataError"),
    (_wrapped_data_error, "DataError"),
    (_config_error_from_timeout, None),
    (_plug_in_error_from_os_error, None),
    (lambda: RuntimeError("DataError: a message that only names the class"), None),
    (lambda: MemoryError(), None),
])
@pytest.mark.parametrize("mode", ["withheld", "full"])
def test_the_server_follows_the_clients_verdict_through_wrapped_errors(
        make: Any, verdict: str | None, mode: str) -> None:
    """A plug-in's error of a subclass of DataError, RelatednessError, ConfigError or
    ModelError, or one wrapping such an error (a ClientHalfError around it), was asked again
    as if it might pass, its class name not being one of those; one of those classes wrapping
    a timeout or an OSError must still be asked again, unless the OSError says the file is
    missing, unreadable or of the wrong kind (ENOENT, EACCES, EISDIR; a corrupt gzip stream),
    which a second read finds alike (was: asked again once), while EIO or EAGAIN may pass. The
    client's text now carries its verdict where the class name alone would misstate it, and
    the server follows it."""
    from secure_fedora.runtimes.flower.protocol import (
        client_error_text,
        deterministic_class,
        deterministic_client_error,
    )

    err = make()
    assert deterministic_class(err) == verdict
    text = client_error_text(err, mode)
    assert (deterministic_client_error(f"2: {text}") is not None) == (verdict is not None)
    assert (deterministic_client_error(text) == text) == (verdict is not None)
    if mode == "full":
        assert str(err) in text  # the message is sent whole after the class name and tag


def test_a_text_without_a_verdict_tag_is_judged_by_its_class_name() -> None:
    """What an older ClientApp sends (no tag): its leading class name decides, as before."""
    from secure_fedora.runtimes.flower.protocol import deterministic_client_error

    assert deterministic_client_error("2: DataError: found 0..17") == "DataError: found 0..17"
    assert deterministic_client_error(f"RelatednessError ({WITHHELD})") is not None
    assert deterministic_client_error("2: ClientHalfError (from DataError) (x)") is None
    assert deterministic_client_error("2: ConfigError [may pass if asked again]: t") is None
    assert deterministic_client_error("2: PluginError [refuses again: OSError]: t") is None


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("error", ["wrapped", "transient"])
def test_a_plug_in_error_wrapping_a_data_error_stops_the_run_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        error: str) -> None:
    """Client 1's FEDORA setup raises (once) a RuntimeError from a plug-in's DataError
    subclass: the run stops at once, not asking again; a ConfigError from a TimeoutError is
    asked again, and the run goes on."""
    from secure_fedora.algorithms.methods import Fedora

    real = Fedora.client_setup
    left = {"fails": 1}

    def client_setup(self: Fedora, i: int, message: Any) -> Any:
        if i == 1 and left["fails"] > 0:
            left["fails"] -= 1
            if error == "wrapped":
                try:
                    raise _PluginDataError("rows of client 1 are bad")
                except _PluginDataError as inner:
                    raise RuntimeError("plug-in dataset failed") from inner
            raise _config_error_from_timeout()
        return real(self, i, message)

    monkeypatch.setattr(Fedora, "client_setup", client_setup)
    cfg = parse_config(json.loads(json.dumps(TINY)))
    result_dir = tmp_path / "res"
    result_dir.mkdir()
    rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
    if error == "transient":
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
        assert "setup sent again to clients [1]" in capsys.readouterr().out
        assert (result_dir / "results.json").exists()
        return
    with pytest.raises(DeployError, match=r"^fedora: client 1 \(node 1001\) refused its setup "
                       r"reply: ClientHalfError \(from RuntimeError\) \[refuses again: "
                       r"DataError\] \(details withheld; see the client's own log\).*asked "
                       r"again it would refuse again"):
        server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    assert "sent again" not in capsys.readouterr().out
    assert not (result_dir / "results.json").exists()


#: A client's data file whose name is not UTF-8: Python reads it with its byte 0xff escaped as
#: the lone surrogate U+DCFF (os.fsdecode), which UTF-8 cannot encode.
UNENCODABLE = b"rows-4711-\xff.csv".decode("utf-8", "surrogateescape")


def _dp_config(mode: str | None, **data: Any) -> Any:
    doc = json.loads(_config(mode, **data).model_dump_json())
    doc["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3}
    return parse_config(doc)


@pytest.fixture()
def quiet_client_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ClientApp's logger off: a captured log line holding a lone surrogate cannot cross
    from a pytest-xdist worker (what is written to client-errors.log is what is checked)."""
    monkeypatch.setattr(client_app.log, "disabled", True)


def _hello_reply_of(handler: Callable[[Message, Context], Message], cfg: Any,
                    node: str | None, tmp_path: Path) -> tuple[Message, Path]:
    """The reply of ``handler`` under the ClientApp's withholding and error-reply wrappers to
    a first-contact message of run 42 under ``cfg``, the node's ``client-errors`` set to
    ``node`` (unset for None), and the node's state directory."""
    rc = run_config(cfg, tmp_path)
    state = tmp_path / "node-0"
    conf = {"partition-id": 0, "state-dir": str(state), **({"client-errors": node} if node else {})}
    wrapped = client_app._error_reply(client_app._withholding(handler))
    return wrapped(Message(RecordDict(), dst_node_id=1, message_type="query.hello"),
                   Context(42, 1, conf, RecordDict(), rc)), state


@pytest.mark.usefixtures("task_identity", "quiet_client_log")
@pytest.mark.parametrize(("node", "sent"), [
    (None, f"DataError ({WITHHELD})"),
    ("full", "DataError: label 17 at row 4711 of rows-4711-\\udcff.csv")], ids=["withheld", "full"])
def test_an_error_text_utf8_cannot_encode_is_answered_as_any_other(
        tmp_path: Path, node: str | None, sent: str) -> None:
    """Under DP, a client's error names a file whose name is not UTF-8 (a lone surrogate in
    its text). Appending it to the node's client-errors.log raised UnicodeEncodeError out of
    the wrapper that withholds texts, so Flower answered with its own reason,
    ``<class 'UnicodeEncodeError'>:<'... character '\\udcff' in position 5xx ...'>``: a byte
    of the name and the text's length reached the server, and the node's log lost the error;
    with "full" the reason held the surrogate, which Flower cannot serialize, so no reply
    left. Now the reply is the withheld text (or, with "full", the text with that character
    escaped) and the log holds the error, its character escaped."""
    from flwr.common.serde import error_to_proto

    def fails(message: Message, context: Context) -> Message:
        raise DataError(f"label 17 at row 4711 of {UNENCODABLE}")

    reply, state = _hello_reply_of(fails, _dp_config("full"), node, tmp_path)
    assert reply.has_error() and reply.error.reason == sent
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    error_to_proto(reply.error).SerializeToString()  # Flower can send it
    logged = (state / "runs" / "42" / CLIENT_ERRORS_LOG).read_text(encoding="utf-8")
    assert "DataError: label 17 at row 4711 of rows-4711-\\udcff.csv" in logged


def _unreadable_file(dataset: Any, d: Any, seed: int) -> list[Any]:
    raise DataError(f"cannot parse row 4711 of {UNENCODABLE}")


@pytest.mark.usefixtures("task_identity", "quiet_client_log")
def test_a_refusal_naming_a_file_utf8_cannot_encode_stops_a_dp_run_with_the_class_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every node's partitioner fails at first contact of a DP run naming a row of a file
    whose name is not UTF-8. Recording the refusal raised UnicodeEncodeError, whose text (a
    byte of the name, the length of the log entry) Flower sent instead of the refusal; the
    server now stops on the withheld refusal and learns no row, byte or length."""
    PARTITIONERS.register("test-unreadable-file", _unreadable_file)
    try:
        cfg = _dp_config(None, partition="test-unreadable-file")
        result_dir = tmp_path / "res"
        result_dir.mkdir()
        rc = run_config(cfg, tmp_path, **{"result-dir": str(result_dir)})
        grid = InMemoryGrid(tmp_path / "nodes", rc, 3)
        with pytest.raises(DeployError, match=r"refused the run at first contact: DataError "
                           r"\(details withheld; see the client's own log\) \[client-errors: "
                           r"withheld\]") as err:
            server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    finally:
        PARTITIONERS.unregister("test-unreadable-file")
    server_saw = str(err.value) + capsys.readouterr().out
    assert "4711" not in server_saw and "dcff" not in server_saw and "position" not in server_saw
    assert "row 4711 of rows-4711-\\udcff.csv" in _client_log(tmp_path, 0)
    assert list(result_dir.iterdir()) == []


class _TextFailsData(DataError):
    """A plug-in's DataError whose own ``__str__`` raises, naming a data fact."""

    def __str__(self) -> str:
        raise ValueError("cannot format row 4711 of the client's data")


class _TextFailsUpdate(ClientUpdateError):
    """A ClientUpdateError (whose text the withheld form reads) whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise ValueError("cannot format row 4711 of the client's data")


@pytest.mark.usefixtures("task_identity", "quiet_client_log")
@pytest.mark.parametrize(("error", "node", "sent"), [
    (_TextFailsData, "full", f"_TextFailsData [refuses again: DataError] ({WITHHELD})"),
    (_TextFailsUpdate, None, f"_TextFailsUpdate ({WITHHELD})"),
    (_TextFailsUpdate, "full", f"_TextFailsUpdate ({WITHHELD})")],
    ids=["data-full", "update-withheld", "update-full"])
def test_an_error_whose_own_text_raises_is_answered_with_the_withheld_text(
        tmp_path: Path, error: type[Exception], node: str | None, sent: str) -> None:
    """An error whose ``__str__`` raises (with "full", or a ClientUpdateError, whose text the
    withheld form reads for FEDORA's pull): building the reply's text raised, and Flower sent
    its own reason, the text of the ValueError ``__str__`` raised (a data fact). Now the
    reply is the withheld text; the node's log still records the error."""
    def fails(message: Message, context: Context) -> Message:
        raise error()

    reply, state = _hello_reply_of(fails, _config("full"), node, tmp_path)
    assert reply.has_error() and reply.error.reason == sent
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert error.__name__ in (state / "runs" / "42" / CLIENT_ERRORS_LOG).read_text(encoding="utf-8")
