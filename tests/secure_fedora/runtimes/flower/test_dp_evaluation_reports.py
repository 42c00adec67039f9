"""A DP client's evaluation reply reports its epsilon and ledger head in both runtimes, under
its signature: a tampered field is refused alike, and a report that goes back stops the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from privacy.envelope import decode_message, encode_message
from privacy.ledger import LedgerError
from secure_fedora.algorithms.messages import KIND_EVALUATION_REPLY
from secure_fedora.runtimes.flower import server_app
from secure_fedora.runtimes.flower.protocol import MSG_EVALUATE, RunSettings
from secure_fedora.secure import private
from secure_fedora.secure import transport as transport_module
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    InMemoryGrid,
    in_process,
    run_config,
    task_identity,
)
from tests.secure_fedora.runtimes.flower.test_rejected_downloads import _config


def _flower_field(field: str) -> Any:
    """A Flower evaluation reply with ``field`` changed (the envelope as signed)."""
    def tamper(_request: Message, reply: Message) -> Message:
        metrics = reply.content["metrics"]
        if field == "ledger-head":
            record = reply.content["ledger"]
            record["head"] = "0" * 64 if record["head"] != "0" * 64 else "1" * 64
        elif field == "ledger-entries":
            metrics[field] = int(metrics[field]) - 1
        else:
            metrics[field] = float(metrics[field]) / 2
        return reply

    return tamper


# each field's place from the end of the in-process reply vector (metrics first)
INPROCESS_FIELD = {"epsilon-spent": -11, "epsilon-budget": -10, "ledger-entries": -9,
                   "ledger-head": -1}


def _tamper_inprocess(monkeypatch: pytest.MonkeyPatch, field: str, client: int, rnd: int) -> None:
    """In process: client ``client``'s round-``rnd`` evaluation reply with ``field`` changed
    (the envelope as signed)."""
    real_init = transport_module.SecureExchange.__init__
    index = INPROCESS_FIELD[field]

    def channel(kind: str, r: int, i: int, message: bytes) -> bytes:
        if kind != KIND_EVALUATION_REPLY or (i, r) != (client, rnd):
            return message
        envelope, payload = decode_message(message)
        assert len(payload) > 8 * 11, "the reply carries no ledger report"
        values = np.frombuffer(payload[-8 * 11:], dtype="<f8").copy()
        values[index] = values[index] - 1 if values[index] >= 1 else values[index] + 1
        return encode_message(envelope, payload[:-8 * 11] + values.tobytes())

    def init(self, transport, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, transport, **{**kwargs, "channel": channel})

    monkeypatch.setattr(transport_module.SecureExchange, "__init__", init)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("field", sorted(INPROCESS_FIELD))
def test_a_tampered_epsilon_or_ledger_head_in_an_evaluation_reply_is_refused_in_both_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    """On Flower a DP client's evaluation reply carries its epsilon spent and budget, its
    ledger's entry count and head, under the reply's signature: one changed on the way is
    refused (payload hash) and the client keeps its last metrics. In process the reply carried
    the metrics only, so there was nothing to tamper with and nothing the server checked; it
    now carries the same fields, refused alike."""
    cfg = _config("fedavg", dp=True)
    rc = run_config(cfg, tmp_path, **{"result-dir": str(tmp_path / "res"),
                                      "reproducible-dp-noise": True})
    grid = InMemoryGrid(tmp_path / "nodes", rc, 3,
                        tamper_reply={(1, 2, MSG_EVALUATE): _flower_field(field)})
    results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)  # type: ignore[arg-type]
    flower = [(r["client"], r["round"], r["reason"]) for r in results["security"]["rejections"]]
    assert flower == [(1, 2, "payload_hash_mismatch")]
    _tamper_inprocess(monkeypatch, field, 1, 2)
    sim, outcome = in_process(cfg, tmp_path, "fedavg")
    ours = sim.methods["fedavg"].exchange.rejections
    assert [(r.client, r.round, r.reason) for r in ours] == flower
    assert [r["evaluated"] for r in sim.history] == [r["evaluated"] for r in results["rounds"]] \
        == [3, 2, 3]
    mine, theirs = outcome.to_json(), results["methods"]["fedavg"]
    assert np.allclose(mine["final"]["per_client"], theirs["final"]["per_client"], atol=1e-4, rtol=0)
    # the server holds each client's last report, with the epsilon Flower's holds; a Flower
    # client closes its ledger as it answers the final evaluation, so its last report counts
    # the close entry, which in process is written after the final evaluation (heads differ
    # anyway: ledger lines name their run)
    reports = sim._ledger_reports["fedavg"]
    for i, their in enumerate(results["privacy"]["fedavg"]["clients"]):
        assert reports[i]["ledger_entries"] == their["ledger_entries"] - 1
        assert reports[i]["epsilon_spent"] == pytest.approx(their["epsilon_spent"], rel=1e-9)

@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("went", ["entries", "head", "epsilon"])
def test_an_in_process_ledger_report_that_goes_back_stops_the_run_as_on_flower(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, went: str) -> None:
    """Client 1 signs a round-3 evaluation reply whose ledger report does not extend its
    round-2 one (fewer entries, another head at the same count, or a lower epsilon): the
    Flower server stops the run (tests/.../test_node_state_loss.py); in process the server
    never saw a report, so the run completed. It stops now, naming the client."""
    real = private.ledger_report
    reported: dict[int, list[list[float]]] = {}

    def report(client: Any) -> list[float]:
        values = real(client)
        i = int(client.client_id.split("-")[-1])
        earlier = reported.setdefault(i, [])
        if i == 1 and len(earlier) == 2:  # its round-3 reply, after two accepted ones
            last = earlier[-1]
            if went == "entries":
                values = [*last[:2], last[2] - 1, *last[3:]]
            elif went == "head":
                values = [*last[:3], (last[3] + 1) % 2 ** 32, *last[4:]]
            else:
                values = [last[0] / 2, *values[1:]]
        earlier.append(values)
        return values

    monkeypatch.setattr(private, "ledger_report", report)
    cfg = _config("fedavg", dp=True)
    with pytest.raises(LedgerError, match=r"client 1 reported a ledger that went back"):
        in_process(cfg, tmp_path, "fedavg")
