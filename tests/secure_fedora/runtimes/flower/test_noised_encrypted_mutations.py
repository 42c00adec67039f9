"""Seeded mutations of the real messages of a noised+encrypted Flower run (DP summary under
CKKS, csprng noise, key holder client 0), driven through the real ServerApp and ClientApp
code with the generators of :mod:`.test_encrypted_message_mutations` (the encrypted mode
without DP), plus the DP side: a client's first summary request (its noise admitted by the
budget gate and written to its ledger before the ciphertext leaves) and the ledger report
signed with its summary reply. Every case ends in the genuine result or a named refusal, and:
no ledger entry (budget) for a release that was never made, no release journaled twice,
every ledger verifying (:func:`audits.verify.check_ledger_lines`), no other error out of a
handler."""

from __future__ import annotations

import contextlib
import io
import math
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, MetricRecord, RecordDict

from audits.verify import check_ledger_lines
from privacy.identity import load_identity
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.protocol import MSG_ENCRYPTED_SUMMARY, DeployError
from secure_fedora.runtimes.flower.state import ReleaseJournal
from secure_fedora.secure.relatedness import SecureRelatednessError
from tests.secure_fedora.runtimes.flower.test_encrypted_flower import enc_config
from tests.secure_fedora.runtimes.flower.test_encrypted_message_mutations import (
    FLOWS as ENCRYPTED_FLOWS,
)
from tests.secure_fedora.runtimes.flower.test_encrypted_message_mutations import (
    MUST_REFUSE as ENCRYPTED_MUST_REFUSE,
)
from tests.secure_fedora.runtimes.flower.test_encrypted_message_mutations import (
    REQUEST_KINDS,
    capture_run,
    run_flow,
    summary_request,
)
from tests.secure_fedora.runtimes.flower.test_reply_mutations import (
    _content,
    _Grid,
    task_identity_of_node_0,
)

SEED = 20261208
RUN = 42


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """:func:`capture_run` of a noised+encrypted run (csprng noise, the deployed mode)."""
    with task_identity_of_node_0():
        cap = capture_run(
            tmp_path_factory.mktemp("noised-encrypted-mutations"),
            enc_config("noised+encrypted", noise="csprng"),
        )
        cap["keys"] = {
            c: load_identity(
                cap["root"] / "ids" / f"client-{c:03d}", f"client-{c:03d}"
            ).signing_key.public_key()
            for c in range(3)
        }
        yield cap


def _ledger_path(node_dir: Path, client: int) -> Path:
    return node_dir / "runs" / str(RUN) / "fedora" / f"client-{client:03d}.jsonl"


def _ledger(cap: dict[str, Any], client: int, node_dir: Path | None = None) -> list[str]:
    """Client ``client``'s ledger lines (none when it has no ledger), after checking that
    they verify with the audit's integrity checks under the client's own key."""
    path = _ledger_path(node_dir or cap["root"] / "nodes" / f"node-{client}", client)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    _, findings = check_ledger_lines(
        lines, cap["keys"][client], f"client-{client:03d}", torn=not text.endswith("\n")
    )
    assert findings == [], findings
    return lines


def _releases(node_dir: Path) -> list[tuple[int, int, str]]:
    path = node_dir / "runs" / str(RUN) / "releases.jsonl"
    if not path.exists():
        return []
    return [(e["client"], e["round"], e["kind"]) for e in ReleaseJournal(path).entries()]


def _state(cap: dict[str, Any]) -> tuple[Any, ...]:
    """Every client's ledger (verified) and release journal."""
    nodes = cap["root"] / "nodes"
    return tuple((tuple(_ledger(cap, c)), tuple(_releases(nodes / f"node-{c}"))) for c in range(3))


def _once(cap: dict[str, Any]) -> None:
    """No release journaled twice: one summary per client, the key holder's overlaps once."""
    nodes = cap["root"] / "nodes"
    for c in range(3):
        kinds = Counter(kind for _, _, kind in _releases(nodes / f"node-{c}"))
        assert kinds["summary"] == 1 and kinds["overlaps"] <= (1 if c == 0 else 0), (c, kinds)


# --------------------------------------------------------------------------- the DP flows


def first_request_case(cap: dict[str, Any], rng: random.Random, kind: str) -> str:
    """:func:`summary_request` (a mutated one) as the first message a fresh node of client 1
    or 2 gets, then the genuine request, then the genuine request again: a refused request
    admits no budget and journals nothing; the genuine one releases the noised summary with
    one ledger entry and one journal record, and the repeat adds neither."""
    c, message = summary_request(cap, rng, kind, clients=(1, 2))
    fresh = cap["root"] / "fresh" / f"node-{c}"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(cap["root"] / "nodes" / f"node-{c}" / "partitions", fresh / "partitions")
    config = {**cap["grid"].node_config[1000 + c], "state-dir": str(fresh)}

    def handle(request: Any) -> bool:
        context = Context(RUN, 1000 + c, dict(config), RecordDict(), dict(cap["rc"]))
        try:
            reply = client_app.encrypted_summary(request, context)
        except (SecureRelatednessError, DeployError):
            return False
        assert "upload" in reply.content and "refusal" not in reply.content
        return True

    outcome = "genuine" if handle(message) else "client refuses"
    if outcome != "genuine":
        assert _ledger(cap, c, fresh) == [] and _releases(fresh) == [], kind
    for _ in range(1 if outcome == "genuine" else 2):
        _, genuine = summary_request(cap, random.Random(c), "genuine", clients=(c,))
        assert handle(genuine), kind
    ledger = _ledger(cap, c, fresh)
    assert len(ledger) == 1 and '"gaussian_summary"' in ledger[0], ledger
    assert _releases(fresh) == [(c, 0, "summary")]
    return outcome


def _ledger_report(
    cap: dict[str, Any], rng: random.Random, kind: str, client: int
) -> dict[str, tuple[str, dict[str, Any]]]:
    records = {
        k: (t, dict(v)) for k, (t, v) in cap["replies"][MSG_ENCRYPTED_SUMMARY, client].items()
    }
    metrics, ledger = records["metrics"][1], records["ledger"][1]
    if kind == "spent":
        metrics["epsilon-spent"] = rng.choice([-1.0, math.nan, math.inf, "x", 2**70])
    elif kind == "over-budget":  # no gate admits it
        metrics["epsilon-spent"] = rng.choice([8.000001, 9.0, 1e300])
    elif kind == "budget":
        metrics["epsilon-budget"] = rng.choice([0.0, 4.0, 8.000001, math.nan, -8.0])
    elif kind == "entries":
        metrics["ledger-entries"] = rng.choice([0, 2, -1, 2**40])
    elif kind == "record-entries":
        ledger["entries"] = rng.choice([0, 2, -1])
    elif kind == "head":
        ledger["head"] = rng.choice(["0" * 64, "xyz", 7])
    elif kind == "noise":
        key = rng.choice(["noise-multiplier", "summary-noise", "lambda-noise"])
        ledger[key] = rng.choice([ledger[key] * 1.5, 0.0, -1.0, math.nan])
    elif kind == "accountant":
        ledger["accountant"] = rng.choice(["rdp", "none", ""])
    elif kind == "no-ledger":
        records.pop("ledger")
    elif kind == "no-spent":
        del metrics["epsilon-spent"]
    elif kind == "no-metrics":
        records.pop("metrics")
    elif kind != "genuine":
        raise AssertionError(kind)
    return records


LEDGER_KINDS = [
    "spent",
    "over-budget",
    "budget",
    "entries",
    "record-entries",
    "head",
    "noise",
    "accountant",
    "no-ledger",
    "no-spent",
    "no-metrics",
    "genuine",
]


def ledger_report_case(cap: dict[str, Any], rng: random.Random, kind: str) -> str:
    """Client ``c``'s summary reply with its ledger report damaged, signed again by ``c``,
    read by the ServerApp: accepted (then it states the captured report), rejected naming
    ``c`` or a DeployError naming ``c``; the server's record of ``c``'s ledger changes for
    no refused reply."""
    server, c = cap["server"], rng.randrange(3)
    records = _ledger_report(cap, rng, kind, c)
    try:
        content = _content(records)
    except (TypeError, ValueError):  # Flower itself cannot carry it
        return "not carried"
    if isinstance(records.get("metrics", (None, None))[1], dict):
        assert isinstance(content["metrics"], MetricRecord)
    cap["signers"][c].sign(content, MSG_ENCRYPTED_SUMMARY, ["server"], 0, reply=True)
    before = {k: dict(v) for k, v in server.privacy.get(server.scope, {}).items()}
    rejections, uploads = len(server.rejections), {}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            server_app._take_uploads(
                _Grid(content),
                server,
                {c: cap["sealed"][c]},
                {server.node_of_client[c]: c},
                uploads,
                {},
                {},
                cap["val0"],
                cap["test0"],
                {},
                set(),
            )
    except DeployError as err:
        assert server.client_ids[c] in str(err), err
        outcome = "server stops: DeployError"
    else:
        if c in uploads:
            outcome = "genuine"
        else:
            assert len(server.rejections) == rejections + 1, kind
            assert server.rejections[-1]["client"] == c, kind
            outcome = "rejected: " + server.rejections[-1]["reason"].split(":")[0]
    after = server.privacy.get(server.scope, {})
    assert {k: dict(v) for k, v in after.items()} == before, kind
    return outcome


# --------------------------------------------------------------------------- the cases


def _guarded(make: Callable[[dict[str, Any], random.Random, str], str]) -> Callable[..., str]:
    """A flow of the encrypted mode, run on the DP capture: no ledger or journal changes
    (every one of its messages is to or from a client that already released its summary)."""

    def case(cap: dict[str, Any], rng: random.Random, kind: str) -> str:
        before = _state(cap)
        outcome = make(cap, rng, kind)
        assert _state(cap) == before, kind
        return outcome

    return case


FLOWS: dict[str, tuple[Callable[..., str], list[str], int]] = {
    **{
        name: (_guarded(make), kinds, cases)
        for name, (make, kinds, cases) in ENCRYPTED_FLOWS.items()
    },
    "first summary request": (first_request_case, REQUEST_KINDS, 28),
    "ledger report": (ledger_report_case, LEDGER_KINDS, 48),
}
MUST_REFUSE = {
    **ENCRYPTED_MUST_REFUSE,
    "first summary request": set(REQUEST_KINDS) - {"genuine"},
    "ledger report": set(LEDGER_KINDS) - {"genuine"},
}


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_mutated_noised_encrypted_messages_end_genuine_or_refused_with_the_budget_exact(
    run: dict[str, Any], flow: str
) -> None:
    with task_identity_of_node_0():
        run_flow(run, flow, FLOWS, MUST_REFUSE, SEED)
        _once(run)


@pytest.mark.parametrize("kind", ["over-budget", "no-spent"])
def test_a_summary_reply_reporting_past_its_budget_or_no_spending_is_rejected_naming_it(
    run: dict[str, Any], kind: str
) -> None:
    """An authentic noised+encrypted summary reply whose ledger report states more epsilon
    spent than the client's budget, or no epsilon spent at all, was accepted: the server
    recorded the impossible spending as the client's (results.json would state it), or took
    a DP summary with no ledger state to anchor. Both are rejected as malformed, naming the
    client, and the server's record of its ledger is unchanged."""
    with task_identity_of_node_0():
        for seed in range(3):
            outcome = ledger_report_case(run, random.Random(seed), kind)
            assert outcome == "rejected: malformed_payload", (kind, outcome)
