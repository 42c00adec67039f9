"""Seeded mutations of a real round reply, delivered to the ServerApp's reply check (the real
exchange and ``_exchange_payloads``, with the server and method state of a tiny run): every
mutation is rejected with a recorded reason, recorded as the client's refusal, or taken with
the valid reply's entries, dtypes and shapes; none raises out of the ServerApp, and a rejected
one changes none of the server's per-client state."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from privacy.envelope import make_envelope
from privacy.identity import Identity
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.envelopes import (
    ENVELOPE_RECORD,
    MessageSecurity,
    content_digest,
    reply_kind,
)
from secure_fedora.runtimes.flower.protocol import MSG_ROUND, RunSettings
from tests.secure_fedora.runtimes.flower.deploy_support import (
    InMemoryGrid,
    run_config,
    tiny_config,
    with_methods,
)

CASES = 160


class _Stop(Exception):
    pass


def capture_exchange(root: Path, cfg: Any, stage: str, rnd: int,
                     patches: Mapping[str, Callable[[dict[str, Any], Any], Any]] | None = None
                     ) -> dict[str, Any]:
    """A three-client in-memory run of ``cfg`` under ``root`` stopped at its ``stage``
    exchange of round ``rnd``: the server and method run (``server``, ``run``), client 0's
    message (``payload``) and real, unread reply (``reply``), client 0's signer (``signer``)
    and the config hash. ``patches`` maps other ``server_app`` functions to a maker
    ``(captured, real function) -> replacement``, in place while the run goes."""
    rc = run_config(cfg, root)
    settings = RunSettings.from_run_config(rc)
    cap: dict[str, Any] = {}
    real_payloads, real_exchange = server_app._exchange_payloads, server_app._exchange

    def payloads(grid, server, run, at, r, messages, *rest):  # type: ignore[no-untyped-def]
        if (at, r) == (stage, rnd):
            cap.update(server=server, run=run, payload=messages[0])
        return real_payloads(grid, server, run, at, r, messages, *rest)

    def exchange(grid, messages, *rest):  # type: ignore[no-untyped-def]
        out = real_exchange(grid, messages, *rest)
        if "server" in cap:
            cap["reply"] = out.replies[1000]
            raise _Stop
        return out

    replaced = {"_exchange_payloads": payloads, "_exchange": exchange}
    replaced.update({name: make(cap, getattr(server_app, name))
                     for name, make in (patches or {}).items()})
    saved = {name: getattr(server_app, name) for name in replaced}
    for name, function in replaced.items():
        setattr(server_app, name, function)
    try:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(_Stop):
            server_app.run_federation(InMemoryGrid(root / "nodes", rc, 3), settings, 42)
    finally:
        for name, function in saved.items():
            setattr(server_app, name, function)
    cap["signer"] = MessageSecurity.for_client(root / "ids" / "client-000", root / "sig", 42,
                                               settings.config_hash, 0, 3)
    cap["config_hash"] = settings.config_hash
    return cap


@contextlib.contextmanager
def task_identity_of_node_0() -> Iterator[None]:
    """Flower's task identity of node 0 of run 42 (task 1) while in the block."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server, method run and client 0's real (unread) reply of round 1 of a tiny run."""
    with task_identity_of_node_0():
        yield capture_exchange(tmp_path_factory.mktemp("mutations"),
                               with_methods(tiny_config(rounds=2), "fedavg"), "round", 1)

class _Grid:
    """Answers the one pushed message with ``content`` (through the real exchange)."""

    def __init__(self, content: RecordDict) -> None:
        self.content, self.replies = content, {}

    def get_node_ids(self) -> list[int]:
        return [1000, 1001, 1002]

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = "m"
            self.replies["m"] = Message(self.content, reply_to=m)
        return ["m"]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _records(message: Message) -> dict[str, tuple[str, dict[str, Any]]]:
    out = {}
    for name in message.content.keys():
        record = message.content[name]
        if name == ENVELOPE_RECORD:
            continue
        if isinstance(record, ArrayRecord):
            out[name] = ("A", {k: record[k].numpy().copy() for k in record.keys()})
        else:
            out[name] = ("M" if isinstance(record, MetricRecord) else "C", dict(record))
    return out


def _content(records: dict[str, tuple[str, dict[str, Any]]]) -> RecordDict:
    content = RecordDict()
    for name, (kind, values) in records.items():
        if kind == "A":
            content[name] = ArrayRecord({k: v if isinstance(v, Array) else
                                         Array(np.array(v, copy=True, order="C"))
                                         for k, v in values.items()})
        else:
            content[name] = (MetricRecord if kind == "M" else ConfigRecord)(values)
    return content


def _mutate(rng: random.Random, records: dict[str, Any]) -> str:
    """One random change of the reply's records (in place); its kind."""
    weird = [float("nan"), float("inf"), -1.0, 0, 2**62, [1, 2], 1.5, True, "x", "r" * 10000]
    kind = rng.choice(["payload", "metrics", "run", "records", "privacy"])
    if kind == "payload":
        arrays = records["payload"][1]
        name = rng.choice(sorted(arrays))
        a = arrays[name]
        op = rng.choice(["drop", "add", "rename", "dtype", "shape", "nan", "truncate", "dims"])
        if op == "drop":
            del arrays[name]
        elif op == "add":
            arrays["extra"] = np.zeros(2, np.float32)
        elif op == "rename":
            arrays[rng.choice(["x", "a b", "é"])] = arrays.pop(name)
        elif op == "dtype":
            arrays[name] = a.astype(rng.choice([np.float16, np.float64, np.int32, np.bool_,
                                                np.complex64, np.dtype(">f4")]))
        elif op == "shape":
            arrays[name] = rng.choice([a.reshape(1, -1), a.ravel()[:-1], np.array(a.ravel()[0])])
        elif op == "nan" and a.dtype.kind == "f":
            a.ravel()[0] = np.nan
        elif op == "truncate":
            whole = Array(np.array(a, copy=True, order="C"))
            arrays[name] = Array(dtype=whole.dtype, shape=tuple(whole.shape), stype=whole.stype,
                                 data=whole.data[: rng.randrange(len(whole.data))])
        elif op == "dims":
            arrays[name] = a.reshape((1,) * 9 + a.shape)
        return f"payload:{op}"
    if kind == "metrics":
        metrics = records["metrics"][1]
        key = rng.choice(sorted(metrics) + ["test-metric"])
        if rng.random() < 0.3:
            metrics.pop(key, None)
        else:
            value = rng.choice(weird)
            if not isinstance(value, (bool, str)):
                metrics[key] = value
        return "metrics"
    if kind == "run":
        run = records["run"][1]
        key = rng.choice(["method", "stage", "round"])
        run[key] = rng.choice([0, 2, -1, "fedora", "evaluate", "", "fedavg" * 5000, 10**18])
        return "run"
    if kind == "privacy":
        records["metrics"][1].update({"epsilon-spent": 1.0, "epsilon-budget": 8.0,
                                      "ledger-entries": 1})
        records["ledger"] = ("C", {"entries": 1, "head": "a" * 64, "noise-multiplier": 1.0,
                                   "accountant": "pld"})
        return "privacy"
    name = rng.choice(sorted(records))
    records[name] = rng.choice([("C", {"reason": "x"}), ("M", {"x": 1.0}),
                                ("A", {"x": np.zeros(1, np.float32)})])
    return f"records:{name}"


def _envelope_case(rng: random.Random, cap: dict[str, Any], records: dict[str, Any]
                   ) -> tuple[str, RecordDict]:
    """The valid reply with a broken, foreign or misplaced signature; its kind."""
    op = rng.choice(["flip", "other-client", "other-round", "unknown-key", "not-allowlisted",
                     "after-sign", "truncated", "none"])
    content = _content(records)
    if op in ("unknown-key", "not-allowlisted", "other-client"):
        who = {"unknown-key": "client-000", "not-allowlisted": "client-007",
               "other-client": "client-001"}[op]
        digest = content_digest(content, run_id=42, config_hash=cap["config_hash"],
                                message_type=MSG_ROUND)
        envelope = make_envelope(Identity.generate(who), "server", 1, reply_kind(MSG_ROUND), digest)
        content[ENVELOPE_RECORD] = ConfigRecord({"server": json.dumps(envelope.to_dict())})
        return op, content
    cap["signer"].sign(content, MSG_ROUND, ["server"], 2 if op == "other-round" else 1,
                       reply=True)
    header = json.loads(content[ENVELOPE_RECORD]["server"])
    if op == "flip":
        field = rng.choice(["signature", "nonce", "payload_sha256", "kind"])
        header[field] = header[field][:-1] + ("0" if header[field][-1] != "0" else "1")
        content[ENVELOPE_RECORD] = ConfigRecord({"server": json.dumps(header)})
    elif op == "after-sign":
        content["run"] = ConfigRecord({**dict(content["run"]), "round": 2})
    elif op == "truncated":
        content[ENVELOPE_RECORD] = ConfigRecord({"server": json.dumps(header)[:-5]})
    elif op == "none":
        del content[ENVELOPE_RECORD]
    return f"envelope:{op}", content


def _state(cap: dict[str, Any]) -> Any:
    server, run = cap["server"], cap["run"]
    return copy.deepcopy((server.privacy, server.refused, run.answered, run.schema.__dict__))


def test_mutated_replies_are_rejected_or_equal_in_form_and_never_raise(captured):
    cap = captured
    server, run = cap["server"], cap["run"]
    base = _records(cap["reply"])
    valid = base["payload"][1]
    rng = random.Random(20261206)
    outcomes: Counter[tuple[str, str]] = Counter()
    clean = _state(cap)
    for _ in range(CASES):
        records = copy.deepcopy(base)
        if rng.random() < 0.7:
            kind = _mutate(rng, records)
            try:
                content = _content(records)
            except (TypeError, ValueError):  # Flower itself cannot carry it
                continue
            cap["signer"].sign(content, MSG_ROUND, ["server"], 1, reply=True)
        else:
            kind, content = _envelope_case(rng, cap, records)
        server.privacy, server.refused, run.answered, schema = copy.deepcopy(clean)
        run.schema.__dict__.update(schema)
        rejections = len(server.rejections)
        with contextlib.redirect_stdout(io.StringIO()):
            out = server_app._exchange_payloads(_Grid(content), server, run, "round", 1,
                                                {0: cap["payload"]}, 5.0)
        if 0 in out.payloads:
            got = out.payloads[0]
            assert sorted(got) == sorted(valid), kind
            assert all(got[k].numpy().dtype == valid[k].dtype
                       and got[k].numpy().shape == valid[k].shape for k in got), kind
            outcomes[kind, "taken"] += 1
        elif 0 in out.refused:
            outcomes[kind, "refusal"] += 1
        else:
            assert len(server.rejections) == rejections + 1, kind
            assert _state(cap) == clean, kind
            outcomes[kind, server.rejections[-1]["reason"]] += 1
    rejected = sum(n for (k, o), n in outcomes.items() if o not in ("taken", "refusal"))
    assert rejected > CASES // 2, outcomes
