"""Local, Ditto, APFL, FedAMP and IFCA declare the entries of every server message
(``message_entries``), so a Flower client refuses a signed message its method cannot use (an
entry renamed, missing, one too many, reshaped, retyped or not finite) before any budget is
admitted: an error naming the entry, and the node's files (ledger, release journal, saved
state) exactly as before the message. Genuine messages of real runs pass, with and without DP."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message

from secure_fedora.algorithms.contract import (
    EVALUATE,
    FINALIZE,
    ROUND,
    SETUP,
    ContractError,
    check_message_entries,
)
from secure_fedora.core.config import ExperimentConfig, parse_config
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.contexts import build_algorithm, client_context
from secure_fedora.runtimes.flower.envelopes import ENVELOPE_RECORD
from secure_fedora.runtimes.flower.protocol import (
    MSG_EVALUATE,
    MSG_FINALIZE,
    MSG_ROUND,
    RunSettings,
)
from secure_fedora.runtimes.inprocess import build_clients
from tests.secure_fedora.runtimes.flower.deploy_support import (
    TINY,
    InMemoryGrid,
    file_tree,
    run_config,
    server_security,
    task_identity,
)

pytestmark = pytest.mark.usefixtures("task_identity")
_ = task_identity  # the fixture, imported for use above

BASELINES = ("local", "ditto", "apfl", "fedamp", "ifca")
CLUSTERS = 3  # IFCA's K: not the default, so a declaration of a constant K would fail

Change = Callable[[dict[str, np.ndarray]], str]
"""Mutates a message's arrays in place; returns the entry the refusal must name."""


def _config(method: str, dp: bool, rounds: int = 1, **data: Any) -> ExperimentConfig:
    """The tiny three-client setting running ``method``; under DP with private validation
    (IFCA: public validation, choosing its cluster on it, as its DP runs must)."""
    raw = copy.deepcopy(TINY)
    raw["methods"] = [method]
    raw["training"]["rounds"] = rounds
    raw["data"].update(data)
    raw["baselines"] = {"ifca": {"num_clusters": CLUSTERS}}
    if dp:
        raw["privacy"] = {"enabled": True, "epsilon": 8.0, "delta": 1e-3}
        raw["data"]["validation"] = "public" if method == "ifca" else "private"
        if method == "ifca":
            raw["baselines"]["ifca"]["selection_split"] = "val"
    return parse_config(raw)


# ----------------------------------------------------------------------------- mutations


def _rename(arrays: dict[str, np.ndarray]) -> str:
    name = sorted(arrays)[0]
    arrays["renamed"] = arrays.pop(name)
    return name


def _missing(arrays: dict[str, np.ndarray]) -> str:
    name = sorted(arrays)[-1]  # IFCA: the version, which its client half reads with .get
    del arrays[name]
    return name


def _extra(arrays: dict[str, np.ndarray]) -> str:
    arrays["extra"] = np.zeros(3, np.float32)
    return "extra"


def _model_entry(arrays: dict[str, np.ndarray]) -> str:
    return max(arrays, key=lambda k: arrays[k].size)


def _reshape(arrays: dict[str, np.ndarray]) -> str:
    name = _model_entry(arrays)
    arrays[name] = arrays[name][:-1]
    return name


def _retype(arrays: dict[str, np.ndarray]) -> str:
    name = _model_entry(arrays)
    arrays[name] = arrays[name].astype(np.float64)
    return name


def _retype_small(arrays: dict[str, np.ndarray]) -> str:
    name = min(arrays, key=lambda k: arrays[k].size)  # IFCA's version: int64 -> int32
    arrays[name] = arrays[name].astype(np.int32)
    return name


def _nan(arrays: dict[str, np.ndarray]) -> str:
    name = _model_entry(arrays)
    arrays[name] = arrays[name].copy()
    arrays[name].reshape(-1)[0] = np.nan
    return name


MUTATIONS: dict[str, Change] = {
    "renamed": _rename,
    "missing": _missing,
    "extra": _extra,
    "reshaped": _reshape,
    "retyped": _retype,
    "nan": _nan,
}

#: The stages whose messages carry entries, by method (the others carry none: only an extra
#: entry applies to them).
CARRYING = {
    "local": set(),
    "ditto": {ROUND},
    "apfl": {ROUND, EVALUATE},
    "fedamp": {ROUND},
    "ifca": {ROUND, EVALUATE, FINALIZE},
}

#: Which client's message of which stage each run changes (round 1, the last round).
SLOTS = ((0, ROUND, MSG_ROUND), (1, EVALUATE, MSG_EVALUATE), (2, FINALIZE, MSG_FINALIZE))


def _cases() -> list[Any]:
    """Every change under DP for IFCA (the richest messages: K cluster models and their
    version); for the other methods two changes under DP (where a refusal after admission
    would leave a ledger entry) and one without, drawn with a fixed seed. The check itself is
    one function for every method (test_message_entries.py covers its partitions); what
    differs per method is the declaration, which every genuine run and
    test_every_stage_is_declared... pin down. The suite's time keeps the grid small."""
    cases = []
    draw = random.Random(25)
    for method in BASELINES:
        kinds = list(MUTATIONS) if CARRYING[method] else ["extra"]
        if method == "ifca":
            kinds.append("retyped-version")
        for dp in (False, True):
            count = len(kinds) if dp and method == "ifca" else (2 if dp else 1)
            for kind in sorted(draw.sample(kinds, min(count, len(kinds)))):
                cases.append(
                    pytest.param(method, dp, kind, id=f"{method}-{'dp' if dp else 'plain'}-{kind}")
                )
    return cases


ALL_CHANGES = {**MUTATIONS, "retyped-version": _retype_small}


# ----------------------------------------------------------------------------- the grid run


class _Watch:
    """Tampers with client ``c``'s first ``kind`` message of round ``rnd`` (signed again by
    the server's key, so the client verifies it as the server's) and records node ``c``'s
    files just before and just after the client handled it."""

    def __init__(self, rc: dict[str, Any], root: Path, change: Change) -> None:
        self.signer = server_security(rc, root / "resign")
        self.root, self.change = root, change
        self.pending: dict[tuple[int, str], str] = {}  # (client, kind) -> entry to name
        self.trees: dict[tuple[int, str], tuple[dict[str, Any], dict[str, Any]]] = {}
        self.done: set[tuple[int, str]] = set()

    def tamper(self, client: int, kind: str) -> Callable[[Message], Message]:
        def apply(request: Message) -> Message:
            if (client, kind) in self.done:  # asked again: the genuine message
                return request
            self.done.add((client, kind))
            content = request.content
            rnd = json.loads(content[ENVELOPE_RECORD][f"client-{client:03d}"])["round"]
            del content[ENVELOPE_RECORD]
            arrays = {k: content["payload"][k].numpy() for k in content["payload"].keys()}
            applies = bool(arrays) or self.change is _extra
            if not applies:
                self.signer.sign(
                    content,
                    request.metadata.message_type,
                    [f"client-{client:03d}"],
                    rnd,
                    reply=False,
                )
                return request
            self.pending[client, kind] = self.change(arrays)
            content["payload"] = ArrayRecord(
                {k: Array(np.array(v, copy=True)) for k, v in arrays.items()}
            )
            content["run"]["has-payload"] = True  # an evaluation message may carry none
            self.signer.sign(
                content, request.metadata.message_type, [f"client-{client:03d}"], rnd, reply=False
            )
            return request

        return apply

    def handlers(self) -> dict[str, Callable[[Message, Any], Message]]:
        """The ClientApp's handlers, recording the node's files around a changed message."""
        out = dict(client_app.HANDLERS)
        for kind, real in client_app.HANDLERS.items():

            def handle(
                request: Message, context: Any, _real: Any = real, _kind: str = kind
            ) -> Message:
                client = int(context.node_config["partition-id"])
                if (client, _kind) not in self.pending or (client, _kind) in self.trees:
                    return _real(request, context)
                node = self.root / "nodes" / f"node-{client}"
                before = _lasting_files(node)
                try:
                    return _real(request, context)
                finally:
                    self.trees[client, _kind] = (before, _lasting_files(node))

            out[kind] = handle
        return out


def _lasting_files(node: Path) -> dict[str, Any]:
    """Node ``node``'s files (ledgers, release journal, saved states, partitions) but those a
    refused message writes on purpose: its envelope nonce memory (a verified request's nonce
    is recorded whatever the client then does with the message), the stage lock it was
    recorded under and the node's own error log."""
    return {
        k: v
        for k, v in file_tree(node).items()
        if stat.S_ISREG(v[0])
        and "nonce" not in Path(k).name
        and Path(k).name not in (".stage.lock", client_app.CLIENT_ERRORS_LOG)
    }


def _grid_run(
    root: Path,
    cfg: ExperimentConfig,
    watch_change: Change | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> tuple[dict[str, Any], InMemoryGrid, _Watch | None]:
    rc = run_config(cfg, root, **{"result-dir": str(root / "res")})
    watch = None
    tamper = {}
    if watch_change is not None:
        assert monkeypatch is not None
        watch = _Watch(rc, root, watch_change)
        rounds = cfg.training.rounds
        wire = {MSG_ROUND: 1, MSG_EVALUATE: rounds, MSG_FINALIZE: rounds + 1}
        tamper = {(c, wire[kind], kind): watch.tamper(c, kind) for c, _, kind in SLOTS}
        monkeypatch.setattr(client_app, "HANDLERS", watch.handlers())
    grid = InMemoryGrid(root / "nodes", rc, 3, tamper_request=tamper)
    with contextlib.redirect_stdout(io.StringIO()):
        results = server_app.run_federation(grid, RunSettings.from_run_config(rc), 42)
    return results, grid, watch


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
@pytest.mark.parametrize("method", BASELINES)
def test_every_genuine_message_of_a_real_run_passes_the_declaration(
    tmp_path: Path, method: str, dp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real rounds, every evaluation and the finalize exchange: every client answers every
    message, and each message it checked was declared (none went unchecked)."""
    checked: list[tuple[str, bool]] = []
    real = client_app.check_message_entries

    def spy(algorithm: Any, name: str, stage: str, i: int, message: Any) -> None:
        checked.append((stage, algorithm.message_entries(stage) is not None))
        real(algorithm, name, stage, i, message)

    monkeypatch.setattr(client_app, "check_message_entries", spy)
    results, grid, _ = _grid_run(tmp_path, _config(method, dp, rounds=2))
    assert grid.errors == [] and results["events"] == []
    assert [r["replied"] for r in results["rounds"]] == [3, 3]
    assert checked and all(declared for _, declared in checked)
    stages = {s for s, _ in checked}
    finalizes = method == "ifca" or (method == "apfl" and not dp)
    assert stages == {ROUND, EVALUATE} | ({FINALIZE} if finalizes else set())


@pytest.mark.parametrize("method, dp, kind", _cases())
def test_a_changed_message_is_refused_naming_the_entry_before_anything_is_admitted(
    tmp_path: Path, method: str, dp: bool, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client 0's round message, client 1's (final) evaluation message and client 2's finalize
    message, each changed where the change applies to it: each is refused with an error
    naming the method, the exchange and the entry, and the node's ledger, journal and saved
    state are byte for byte what they were before the message (no budget admitted, no
    release journaled, no exchange marked answered). The run goes on without client 0's
    round-1 reply; the final evaluation and finalize messages, asked again, pass."""
    results, grid, watch = _grid_run(tmp_path, _config(method, dp), ALL_CHANGES[kind], monkeypatch)
    assert watch is not None and watch.pending, "the change applied to no message"
    stage_of = {k: s for _, s, k in SLOTS}
    assert sorted((c, k) for c, k, _ in grid.errors) == sorted(watch.pending)
    for client, kind_sent, err in grid.errors:
        entry = watch.pending[client, kind_sent]
        text = str(err)
        if kind == "nan":  # refused by the payload decoding, before the declaration is read
            assert f"tensor {entry!r} contains non-finite values" in text
        else:
            assert isinstance(err, ContractError), text
            assert (
                f"method {method!r}: the {stage_of[kind_sent]} message to client {client}" in text
                and repr(entry) in text
                and "refused before anything was admitted" in text
            ), text
        before, after = watch.trees[client, kind_sent]
        assert after == before, sorted(
            k for k in set(before) | set(after) if before.get(k) != after.get(k)
        )
    replied = [r["replied"] for r in results["rounds"]]
    assert replied == ([2] if (0, MSG_ROUND) in watch.pending else [3])


@pytest.mark.parametrize("method", BASELINES)
def test_every_stage_is_declared_and_shapes_follow_the_model_and_the_run(method: str) -> None:
    """Every exchange is declared (a stage a method never sends is declared empty), from the
    model's parameter count and dtype and IFCA's number of clusters; a setup message with an
    entry, which none of them sends, is refused."""
    cfg = parse_config(
        {
            **_config(method, False).model_dump(mode="json", exclude_none=True),
            "model": {"name": "cnn"},
            "baselines": {"ifca": {"num_clusters": 5}},
        }
    )
    client = build_clients(cfg)[1]
    algorithm = build_algorithm(method, client_context(cfg, 1, client), cfg)
    p = algorithm.ctx.flat.num_params
    model = (algorithm.ctx.init.dtype, (p,))
    expected = {
        "local": {SETUP: {}, ROUND: {}, EVALUATE: {}, FINALIZE: {}},
        "ditto": {SETUP: {}, ROUND: {"global": model}, EVALUATE: {}, FINALIZE: {}},
        "apfl": {SETUP: {}, ROUND: {"global": model}, EVALUATE: {"global": model}, FINALIZE: {}},
        "fedamp": {SETUP: {}, ROUND: {"message": model}, EVALUATE: {}, FINALIZE: {}},
    }.get(method)
    if expected is None:
        clusters = {"clusters": (model[0], (5, p)), "clusters_version": (torch.int64, ())}
        expected = {SETUP: {}, ROUND: clusters, EVALUATE: clusters, FINALIZE: clusters}
    assert {s: algorithm.message_entries(s) for s in expected} == expected
    with pytest.raises(ContractError, match=r"the setup message to client 1 carries \['x'\]"):
        check_message_entries(algorithm, method, SETUP, 1, {"x": torch.zeros(2)})


@pytest.mark.parametrize("method, stage", [("fedavg", SETUP), ("fedprox", SETUP),
                                           ("fedora", FINALIZE)])
def test_a_stage_fedavg_fedprox_and_fedora_never_send_is_declared_empty(method: str,
                                                                        stage: str) -> None:
    """FedAvg and FedProx send no setup message, FEDORA no finalize message: each declares
    that stage empty, so a message of it carrying an entry is refused by name."""
    cfg = _config(method, False)
    algorithm = build_algorithm(method, client_context(cfg, 1, build_clients(cfg)[1]), cfg)
    assert algorithm.message_entries(stage) == {}
    with pytest.raises(ContractError, match=rf"the {stage} message to client 1 carries \['x'\]"):
        check_message_entries(algorithm, method, stage, 1, {"x": torch.zeros(2)})
