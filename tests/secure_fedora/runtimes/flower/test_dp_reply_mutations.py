"""Seeded mutations of a DP run's real first-contact (hello) reply and evaluation reply,
delivered to the ServerApp's checks (the real exchange, ``_first_contact`` / ``_take_hellos``
and ``_exchange_payloads`` / ``_take_evaluation_metrics``, with the server and method state of
a tiny DP run): every mutation is rejected with a recorded reason (changing none of the
server's state), stops the run with a DeployError naming the client, or is taken with values
a valid reply may hold; none raises anything else out of the ServerApp."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict

from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.envelopes import ENVELOPE_RECORD, MessageSecurity
from secure_fedora.runtimes.flower.protocol import (
    MSG_EVALUATE,
    MSG_HELLO,
    DeployError,
)
from tests.secure_fedora.runtimes.flower.deploy_support import (
    dp_config,
    with_methods,
)
from tests.secure_fedora.runtimes.flower.test_reply_mutations import (
    _content,
    _records,
    capture_exchange,
    task_identity_of_node_0,
)

CASES = 160
WEIRD: list[Any] = [float("nan"), float("inf"), -float("inf"), -1.0, -1, 0, 0.5, 1.5, 2**62,
                    10**18, True, False, "x", "", "r" * 10000, [1, 2], [1.5], [], ["a"]]


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny DP FEDORA run stopped at its round-1 evaluation: the server (whose hello
    replies were captured too) and method run, client 0's request and real reply of both."""

    def take_hellos(cap: dict[str, Any], real: Any) -> Any:
        def hellos(server, replies, schemas):  # type: ignore[no-untyped-def]
            if "hello" not in cap:
                cap["hello"] = replies[0][0]
                cap["hello-state"] = _hello_state(server)
                real(server, replies, schemas)
                cap["hello-row"] = copy.deepcopy(server.sizes[0])
                return None
            return real(server, replies, schemas)
        return hellos

    with task_identity_of_node_0():
        yield capture_exchange(tmp_path_factory.mktemp("dp-mutations"),
                               with_methods(dp_config(rounds=2), "fedora"), "evaluate", 1,
                               {"_take_hellos": take_hellos})

class _Grid:
    """Answers the one pushed message with ``content``, signed by client 0 at the message's
    envelope round (or ``rnd`` when given), through the real exchange."""

    def __init__(self, content: RecordDict, signer: MessageSecurity | None,
                 message_type: str, rnd: int | None = None) -> None:
        self.content, self.signer, self.type, self.rnd = content, signer, message_type, rnd
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [1000, 1001, 1002]

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = "m"
            if self.signer is not None:
                header = json.loads(m.content[ENVELOPE_RECORD]["client-000"])
                self.signer.sign(self.content, self.type, ["server"],
                                 header["round"] if self.rnd is None else self.rnd, reply=True)
            self.replies["m"] = Message(self.content, reply_to=m)
        return ["m"]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _change(rng: random.Random, values: dict[str, Any], keys: list[str]) -> str:
    """Drop, rename, add or set one of ``values`` (a record's entries) to an odd value."""
    key = rng.choice(sorted(values) + keys + ["extra"])
    op = rng.choice(["drop", "rename", "set", "set", "set"])
    if op == "drop":
        values.pop(key, None)
    elif op == "rename" and key in values:
        values[rng.choice(["x", key.upper(), f"meta-{key}", key + " "])] = values.pop(key)
    else:
        values[key] = rng.choice(WEIRD)
    return f"{op}:{key}"


def _hello_state(server: Any) -> Any:
    return copy.deepcopy((server.sizes, server.client_errors, server.client_compute,
                          server.data_fingerprints, server.node_of_client))


def _restore_hello(server: Any, state: Any) -> None:
    (server.sizes, server.client_errors, server.client_compute, server.data_fingerprints,
     server.node_of_client) = copy.deepcopy(state)


def _valid_size_row(row: dict[str, Any], valid: dict[str, Any]) -> bool:
    """Whether ``row`` (a client's recorded split sizes and facts) is one a valid hello reply
    gives: the valid one's keys (a partition fact may be left out), integer sizes >= 0,
    finite numbers, short texts."""
    if not {"id", "train", "val", "test"} <= set(row) <= set(valid) or row["id"] != 0:
        return False
    if any(isinstance(row[k], bool) or not isinstance(row[k], int) or row[k] < 0
           for k in ("train", "val", "test")):
        return False
    return all(not isinstance(v, float) or math.isfinite(v) for v in row.values()) and \
        all(not isinstance(v, str) or len(v) <= 200 for v in row.values())


def test_mutated_dp_hello_replies_are_rejected_or_valid_and_never_raise(captured):
    cap = captured
    server = cap["server"]
    base = _records(cap["hello"])
    clean = cap["hello-state"]
    valid_info = base["client"][1]
    rng = random.Random(20261207)
    outcomes: Counter[str] = Counter()
    keys = [k for k in valid_info if k not in ("client-id", "config-hash")]
    keys += ["meta-train", "meta-id", "meta-x", "data-fingerprint"]
    scope = server.scope
    server.scope = server_app.HELLO_SCOPE
    try:
        for _ in range(CASES):
            records = copy.deepcopy(base)
            kind = _change(rng, records["client"][1], keys)
            try:
                content = _content(records)
            except (TypeError, ValueError):  # Flower itself cannot carry it
                continue
            _restore_hello(server, clean)
            rejections = len(server.rejections)
            schemas: dict[int, Any] = {}
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    replies, _ = server_app._first_contact(
                        _Grid(content, cap["signer"], MSG_HELLO), server, [1000], MSG_HELLO,
                        {}, record_moves=False)
                    server_app._take_hellos(server, replies, schemas)
            except DeployError as err:
                assert "1000" in str(err), (kind, err)  # the run stops, naming the node
                outcomes[f"{kind}:stop"] += 1
                continue
            if 0 in schemas:
                row = server.sizes[0]
                assert _valid_size_row(row, cap["hello-row"]), (kind, row)
                assert len(server.rejections) == rejections, kind
                outcomes["taken"] += 1
            else:
                assert len(server.rejections) == rejections + 1, kind
                assert server.sizes == clean[0], kind
                assert (server.client_errors, server.client_compute) == clean[1:3], kind
                outcomes[server.rejections[-1]["reason"]] += 1
    finally:
        server.scope = scope
        _restore_hello(server, clean)
    assert sum(n for k, n in outcomes.items() if k != "taken" and ":stop" not in k) > CASES // 3, \
        outcomes


def _evaluation_state(cap: dict[str, Any]) -> Any:
    server, run = cap["server"], cap["run"]
    tracker = run.tracker
    return copy.deepcopy((server.privacy, server.refused, run.answered, run.schema.pins,
                          run.evaluated, tracker.last_val.tolist(), tracker.last_test.tolist()))


def _restore_evaluation(cap: dict[str, Any], state: Any) -> None:
    server, run = cap["server"], cap["run"]
    (server.privacy, server.refused, run.answered, run.schema.pins, run.evaluated, val, test) = \
        copy.deepcopy(state)
    run.tracker.last_val.copy_(torch.tensor(val, dtype=run.tracker.last_val.dtype))
    run.tracker.last_test.copy_(torch.tensor(test, dtype=run.tracker.last_test.dtype))


def _mutate_evaluation(rng: random.Random, records: dict[str, Any]) -> str:
    kind = rng.choice(["metrics", "metrics", "ledger", "ledger", "run", "records", "payload"])
    if kind == "metrics":
        return "metrics:" + _change(rng, records["metrics"][1],
                                    ["test-metric", "val-metric", "epsilon-spent",
                                     "epsilon-budget", "ledger-entries"])
    if kind == "ledger":
        return "ledger:" + _change(rng, records["ledger"][1],
                                   ["entries", "head", "noise-multiplier", "accountant",
                                    "summary-noise", "lambda-noise", "repeated"])
    if kind == "run":
        return "run:" + _change(rng, records["run"][1], ["method", "stage", "round"])
    if kind == "payload":
        records["payload"][1][rng.choice(["global", "x", "lambda"])] = \
            rng.choice([np.zeros(2, np.float32), np.array([np.nan], np.float32)])
        return "payload:add"
    name = rng.choice(sorted(records))
    records[name] = rng.choice([("C", {"reason": "x"}), ("M", {"x": 1.0}),
                                ("A", {"x": np.zeros(1, np.float32)})])
    return f"records:{name}"


def test_mutated_dp_evaluation_replies_are_rejected_or_valid_and_never_raise(captured):
    cap = captured
    server, run = cap["server"], cap["run"]
    base = _records(cap["reply"])
    valid_test = float(base["metrics"][1]["test-metric"])
    rng = random.Random(20261208)
    outcomes: Counter[str] = Counter()
    clean = _evaluation_state(cap)
    scope = server.scope
    server.scope = run.name
    with contextlib.redirect_stdout(io.StringIO()):  # the report a valid reply records
        server_app._exchange_payloads(_Grid(_content(base), cap["signer"], MSG_EVALUATE),
                                      server, run, "evaluate", 1, {0: cap["payload"]}, 5.0)
    valid_report = copy.deepcopy(server.privacy[run.name][0])
    try:
        for case in range(CASES):
            records = copy.deepcopy(base)
            rnd = None
            if case % 8 == 7:
                kind, rnd = "envelope:other-round", 2
            else:
                kind = _mutate_evaluation(rng, records)
            try:
                content = _content(records)
            except (TypeError, ValueError):
                continue
            _restore_evaluation(cap, clean)
            rejections, events = len(server.rejections), len(server.events)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    out = server_app._exchange_payloads(
                        _Grid(content, cap["signer"], MSG_EVALUATE, rnd), server, run,
                        "evaluate", 1, {0: cap["payload"]}, 5.0)
                    fresh = server_app._take_evaluation_metrics(server, run, 1, out.metrics)
            except DeployError as err:
                assert "client" in str(err), (kind, err)
                outcomes["stop"] += 1
                continue
            if fresh == [0]:
                test = float(run.tracker.last_test[0])
                assert math.isfinite(test) and 0.0 <= test <= 1.0, kind
                assert len(server.rejections) == rejections, kind
                # what a valid reply reports: a budget other than the config's or a ledger
                # count other than its record's is no report a client makes
                assert server.privacy[run.name][0] == valid_report, kind
                outcomes["taken" if test == valid_test else "taken-other"] += 1
            elif 0 in out.metrics:
                # a valid reply whose metric is not one (NaN, outside [0, 1], missing): its
                # ledger report is taken (the client closed its ledger up to it), the metric
                # is left out, an event says so, the client keeps its last metrics
                assert len(server.rejections) == rejections, kind
                assert "keeps its last metrics" in server.events[-1]["event"], kind
                now = _evaluation_state(cap)
                assert now[3:] == clean[3:], kind  # no pin, metric or evaluated client
                assert now[0][run.name][0] == valid_report, kind
                outcomes["metric-left-out"] += 1
            else:
                assert len(server.rejections) == rejections + 1, (kind, server.events[events:])
                assert _evaluation_state(cap) == clean, kind
                outcomes[server.rejections[-1]["reason"]] += 1
    finally:
        server.scope = scope
        _restore_evaluation(cap, clean)
    assert sum(n for k, n in outcomes.items() if not k.startswith("taken")) > CASES // 3, outcomes
