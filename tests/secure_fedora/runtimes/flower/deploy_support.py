"""Shared helpers of the Flower deployment tests: tiny configs, run configs with identities,
and an in-memory grid that hands the ServerApp's messages straight to the ClientApp handlers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from secure_fedora.algorithms.methods import FederatedMethod
from secure_fedora.core.config import ExperimentConfig, parse_config
from secure_fedora.runtimes.flower import client_app
from secure_fedora.runtimes.flower.envelopes import MessageSecurity
from secure_fedora.runtimes.flower.local import init_party_identities
from secure_fedora.runtimes.flower.protocol import RunSettings, make_run_config
from secure_fedora.runtimes.inprocess import Simulation

# A tiny setting that learns in two rounds (chance is 0.1) and exercises the proximal pull.
TINY: dict[str, Any] = {
    "name": "deploy-tiny",
    "seed": 0,
    "methods": ["fedora"],
    "data": {"num_clients": 3, "train_per_client": 64, "val_per_client": 32, "test_per_client": 64},
    "training": {"rounds": 2, "local_epochs": 3, "lr": 0.1, "batch_size": 16},
    "fedora": {"k": 2},
}


def tiny_config(**training: Any) -> ExperimentConfig:
    """TINY with training overrides."""
    data = json.loads(json.dumps(TINY))
    data["training"].update(training)
    return parse_config(data)


def dp_config(rounds: int = 2, **privacy: Any) -> ExperimentConfig:
    """TINY with DP, private validation and noised summaries."""
    data = json.loads(json.dumps(TINY))
    data["training"]["rounds"] = rounds
    data["data"]["validation"] = "private"
    data["fedora"]["relatedness"] = "noised"
    data["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3, **privacy}
    return parse_config(data)


def run_config(cfg: ExperimentConfig, root: Path, **over: Any) -> dict[str, Any]:
    """A run config with per-party identities in ``root/ids`` and server state in
    ``root/server`` (created once per root)."""
    ids = init_party_identities(root / "ids", cfg.data.num_clients)
    rc = make_run_config(cfg, None, identity_dir=ids["server"], server_state_dir=root / "server",
                         round_timeout=30.0, poll_interval=0.01)
    rc.update(over)
    return rc


Tamper = Callable[[Message], Message | None]
TamperReply = Callable[[Message, Message], Message | None]


class InMemoryGrid:
    """Delivers the ServerApp's messages straight to the ClientApp handlers (no Flower
    processes), so the protocol logic is tested fast and deterministically.

    ``fail`` maps (client, round) to an error text; ``drop`` lists (client, round) left
    unanswered; ``offline`` maps a round to clients offline in it. A handler that raises is
    answered with an error reply, as the ClientApp answers it (its text: the error's class name
    and a fixed sentence or its message; ``errors`` lists the client's own error).
    ``node_errors`` maps a client to its node config's ``client-errors``. A message's round is the last part of its
    group id (``<scope>:<exchange>:<round>``; 0 for the first contact and setup exchanges). ``tamper_reply`` maps (client, round, message
    type) to a function of (request, reply) whose result the server pulls instead of the reply
    (None drops it); ``tamper_request`` maps to a function of the request whose result the
    client handles instead.
    Every node's identity directory is ``identities/<client id>`` next to the server's."""

    def __init__(self, state_root: Path, run_config: dict[str, Any], num_clients: int,
                 run_id: int = 42, fail: dict[tuple[int, int], str] | None = None,
                 drop: set[tuple[int, int]] | None = None,
                 offline: dict[int, set[int]] | None = None,
                 tamper_reply: dict[tuple[int, int, str], TamperReply] | None = None,
                 tamper_request: dict[tuple[int, int, str], Tamper] | None = None,
                 node_errors: dict[int, str] | None = None) -> None:
        self.run_id = run_id
        self.run_config = run_config
        ids = Path(run_config["identity-dir"]).parent
        self.node_config: dict[int, dict[str, Any]] = {
            1000 + c: {"partition-id": c, "state-dir": str(state_root / f"node-{c}"),
                       "identity-dir": str(ids / f"client-{c:03d}"),
                       **({"client-errors": (node_errors or {})[c]}
                          if c in (node_errors or {}) else {})}
            for c in range(num_clients)
        }
        self.fail = fail or {}
        self.drop = drop or set()
        self.offline = offline or {}
        self.tamper_reply = tamper_reply or {}
        self.tamper_request = tamper_request or {}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.errors: list[tuple[int, str, BaseException]] = []
        self.counter = 0
        self.current_round = 0
        self.pending_sizes: list[int] = []  # how many replies the server awaited at each pull

    def get_node_ids(self) -> list[int]:
        off = self.offline.get(self.current_round + 1, set())
        return [n for n, c in self.node_config.items() if c["partition-id"] not in off]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.counter += 1
            mid = f"msg-{self.counter}"
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node not in self.node_config:  # as the SuperLink answers for a node gone
                self.replies[mid] = Message(Error(code=0, reason="node offline"), reply_to=msg)
                continue
            conf = self.node_config[node]
            client = int(conf["partition-id"])
            kind = msg.metadata.message_type
            last = msg.metadata.group_id.rsplit(":", 1)[-1]  # "<scope>:<exchange>:<round>"
            rnd = int(last) if last.isdigit() else 0
            self.current_round = max(self.current_round, rnd)
            if (client, rnd) in self.drop:
                continue
            ctx = Context(self.run_id, node, dict(conf), RecordDict(), dict(self.run_config))
            if (client, rnd) in self.fail:
                error = Error(code=0, reason=self.fail[client, rnd])
                self.replies[mid] = Message(error, reply_to=msg)
                continue
            request = msg
            if (client, rnd, kind) in self.tamper_request:
                request = self.tamper_request[client, rnd, kind](msg)
                if request is None:
                    continue
            try:
                reply = client_app.HANDLERS[kind](request, ctx)
            except client_app.WithheldError as err:  # the ClientApp's error reply: its text
                self.errors.append((client, kind, err.original))  # the client's own error
                self.replies[mid] = Message(Error(code=2, reason=str(err)), reply_to=msg)
                continue
            except Exception as err:  # what Flower turns into an error reply
                self.errors.append((client, kind, err))
                self.replies[mid] = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"),
                                            reply_to=msg)
                continue
            if (client, rnd, kind) in self.tamper_reply:
                reply = self.tamper_reply[client, rnd, kind](msg, reply)
                if reply is None:
                    continue
            self.replies[mid] = reply
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.pending_sizes.append(len(ids))
        return [self.replies.pop(i) for i in ids if i in self.replies]


@pytest.fixture()
def task_identity() -> Iterator[None]:
    """Flower's task identity, which Message construction outside a Flower process needs."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def server_security(rc: dict[str, Any], state_dir: Path, run_id: int = 42) -> MessageSecurity:
    """The server's signing identity from a run config (nonces in ``state_dir``)."""
    settings = RunSettings.from_run_config(rc)
    return MessageSecurity.for_server(settings.identity_dir, state_dir, run_id,
                                      settings.config_hash, settings.experiment.data.num_clients)


def signed_request(security: MessageSecurity, content: RecordDict, message_type: str,
                   recipient: str, rnd: int, node: int = 1000, message_id: str = "m") -> Message:
    """A request from the server to ``recipient``, signed as the ServerApp signs it."""
    security.sign(content, message_type, [recipient], rnd, reply=False)
    msg = Message(content, dst_node_id=node, message_type=message_type, group_id=str(rnd))
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def in_process(cfg: ExperimentConfig, tmp_path: Path, method: str = "fedora",
               keystore: Path | None = None) -> tuple[Simulation, Any]:
    """The in-process runtime's run of ``method`` under ``cfg`` (a DP run keeps its keys in
    ``keystore``, default ``tmp_path/keystore``), on the torch threads a Flower run of ``cfg``
    uses (``training.threads``, else the run config's default ``num-threads`` of 1) whatever
    an earlier test left set: the agreement is bit for bit in any test order."""
    from secure_fedora.learning.devices import threads_applied

    with threads_applied(cfg, default=1):
        sim = Simulation(cfg, tmp_path / "inproc", keystore=keystore or tmp_path / "keystore")
        return sim, sim.run_method(method)


def with_evaluation_every(cfg: ExperimentConfig, every: int) -> ExperimentConfig:
    """``cfg`` evaluating every ``every`` rounds (and after the last; validated again)."""
    return parse_config(
        {**cfg.model_dump(mode="json", exclude_none=True), "evaluation": {"every": every}}
    )


def with_methods(cfg: ExperimentConfig, *methods: str) -> ExperimentConfig:
    """``cfg`` running ``methods`` (validated again)."""
    return parse_config({**cfg.model_dump(mode="json", exclude_none=True), "methods": list(methods)})


def audit_folder(tmp_path: Path, method: str = "fedora", clients: int = 3) -> Path:
    """An audit folder (``tmp_path/audit``) of a grid run under ``tmp_path``: the server's
    ``results.json`` and every node's ledger of ``method``, as an auditor collects them."""
    from privacy.identity import client_ids

    audit = tmp_path / "audit"
    (audit / "ledgers" / method).mkdir(parents=True)
    shutil.copyfile(tmp_path / "res" / "results.json", audit / "results.json")
    for c, cid in enumerate(client_ids(clients)):
        shutil.copyfile(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / method / f"{cid}.jsonl",
                        audit / "ledgers" / method / f"{cid}.jsonl")
    return audit


def assert_client_states_match(tmp_path: Path, cfg: ExperimentConfig, sim: Simulation,
                               method: str, clients: int = 3) -> None:
    """Every grid node's saved client state of ``method`` equals the in-process client's
    (``sim``'s ``client_state_dict``) within float tolerance."""
    import torch

    from secure_fedora.core.config import config_hash
    from secure_fedora.runtimes.flower.state import ClientRunState

    reference = sim.methods[method]
    for c in range(clients):
        state = ClientRunState.load(tmp_path / "nodes" / f"node-{c}" / "runs" / "42" / method
                                    / "client.pt", c, 42, config_hash(cfg), method)
        for key, value in reference.client_state_dict(c).items():
            assert torch.allclose(state.algorithm[key], value.cpu(), atol=1e-4, rtol=0), (c, key)


class UntrackedMean(FederatedMethod):
    """A plug-in that keeps the inherited ``message_state`` (None): participants train from
    the global model and upload it; the server averages the accepted uploads."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.global_params = ctx.init.clone()

    def configure(self, rnd: int, participants: Any) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {"global": self.global_params} for i in participants}

    def client_update(self, i: int, rnd: int, message: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        self.theta[i].copy_(message["global"])
        steps = self.ctx.train_client(i, self.theta[i])
        return {"theta": self.theta[i].clone(), "steps": torch.tensor(steps)}

    def aggregate(self, rnd: int, replies: Any) -> dict[str, float]:
        self.global_params.copy_(torch.stack([r["theta"] for r in replies.values()]).mean(0))
        return {"accepted": float(len(replies))}

    def server_state_dict(self) -> dict[str, Any]:
        return {"global": self.global_params}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        self.global_params.copy_(state["global"])


def damage_nonce_file(path: Path, damage: str) -> None:
    """Damage an envelope nonce memory file as a lost or tampered copy would be: ``deleted``,
    ``cut`` (its last line dropped) or ``edited`` (one hex digit of its last nonce changed)."""
    if damage == "deleted":
        path.unlink()
        return
    lines = path.read_text().splitlines(keepends=True)
    if damage == "cut":
        path.write_text("".join(lines[:-1]))
        return
    record = json.loads(lines[-1])  # the last accepted nonce, one hex digit changed
    record["n"] = ("0" if record["n"][0] != "0" else "1") + record["n"][1:]
    lines[-1] = json.dumps(record) + "\n"
    path.write_text("".join(lines))


def file_tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``root`` (directories too) with its mode and content (a link's
    target): what a refused resume must leave byte for byte as it was."""
    import os

    def content(p: Path) -> bytes:
        if p.is_symlink():
            return os.readlink(p).encode()
        return p.read_bytes() if p.is_file() else b""

    return {str(p.relative_to(root)): (p.lstat().st_mode, content(p))
            for p in sorted(root.rglob("*"))}


class CheckpointedStandIn:
    """A stand-in for ``LocalFederation`` in ``deploy_local``: starts no process; its one run
    (id 7) writes the ServerApp checkpoint, with no failure record, and then ends as
    ``outcome`` says (``follow`` returns that status, or raises that exception)."""

    outcome: str | BaseException = "finished:failed"

    def __init__(self, work: Path, *args: Any, **kwargs: Any) -> None:
        self.work, self.phases, self.address = work, {}, "127.0.0.1:1"
        self.logs = work / "logs"

    def __enter__(self) -> CheckpointedStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, *args: Any, **kwargs: Any) -> int:
        from secure_fedora.runtimes.flower.server_app import SERVER_CHECKPOINT

        (self.work / "results" / SERVER_CHECKPOINT).parent.mkdir(parents=True)
        (self.work / "results" / SERVER_CHECKPOINT).write_bytes(b"checkpoint")
        return 7

    def follow(self, run_id: int, **_: Any) -> str:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome
