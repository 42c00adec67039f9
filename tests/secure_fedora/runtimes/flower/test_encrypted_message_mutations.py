"""Seeded mutations of the real messages of an encrypted-relatedness Flower run (CKKS, key
holder client 0), each signed again by its real sender (authentic but damaged) and driven
through the real code: the ServerApp's reading of the key holder's ceremony reply
(``_open_ceremony``) and of a client's encrypted summary (``_take_uploads``, then the rows
``_server_rows`` computes and the key holder decrypts), the ClientApp's encrypted-summary and
decryption handlers. Every case ends in the genuine result or a named refusal: a recorded
rejection naming the client, a DeployError naming the client or key holder, or the handler's
error (the client's error reply); no release is journaled for a refused message."""

from __future__ import annotations

import contextlib
import io
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from privacy.ckks import EncryptedRow, InnerProductUpload
from secure_fedora.core.config import ExperimentConfig
from secure_fedora.runtimes.flower import client_app, server_app
from secure_fedora.runtimes.flower.ceremony import public_context_digest
from secure_fedora.runtimes.flower.envelopes import MessageSecurity
from secure_fedora.runtimes.flower.protocol import (
    MSG_CEREMONY,
    MSG_DECRYPT,
    MSG_ENCRYPTED_SUMMARY,
    DeployError,
    NodeSettings,
    RunSettings,
)
from secure_fedora.runtimes.flower.state import NodeStateError, ReleaseJournal
from secure_fedora.secure.relatedness import (
    SecureRelatednessError,
    create_keys,
    encrypt_summary,
    public_keys,
    seal_keys,
    sealed_context_statement,
)
from tests.secure_fedora.runtimes.flower.deploy_support import (  # noqa: F401 - a fixture
    InMemoryGrid,
    run_config,
    task_identity,
)
from tests.secure_fedora.runtimes.flower.test_encrypted_flower import enc_config
from tests.secure_fedora.runtimes.flower.test_reply_mutations import (
    _content,
    _Grid,
    _records,
    task_identity_of_node_0,
)
from tests.secure_fedora.secure.test_encrypted_mutations import (
    LAST_BITS_SCALE,
    _edit_seal_header,
    _flip,
    _other_parameters,
    _rescaled,
    _transparent,
    _upload,
)

HOLDER = 0
SEED = 20261207


class _Stop(BaseException):
    """Ends the captured run once the key holder has answered the decryption."""


def capture_run(root: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """A three-client run of ``cfg`` (an encrypted relatedness mode) stopped after the key
    holder's decryption: the server, every request and reply of the ceremony, the encrypted
    summaries and the decryption, and every client's signer (call it inside
    ``task_identity_of_node_0()``)."""
    rc = run_config(cfg, root)
    settings = RunSettings.from_run_config(rc)
    cap: dict[str, Any] = {"requests": {}, "replies": {}}
    real_take, real_rows = server_app._take_uploads, server_app._server_rows

    def take(grid, server, sealed, client_of, uploads, *rest):  # type: ignore[no-untyped-def]
        real_take(grid, server, sealed, client_of, uploads, *rest)
        cap.update(
            server=server,
            sealed=dict(sealed),
            uploads=dict(uploads),
            envelopes=dict(rest[0]),
            val0=rest[2],
            test0=rest[3],
        )

    def rows(server, layout, uploads, envelopes, nodes):  # type: ignore[no-untyped-def]
        cap.update(layout=layout, nodes=list(nodes))
        cap["rows"] = real_rows(server, layout, uploads, envelopes, nodes)
        return cap["rows"]

    def keep_request(kind: str, client: int):  # type: ignore[no-untyped-def]
        def keep(request: Message) -> Message:
            cap["requests"][kind, client] = _records(request)
            return request

        return keep

    def keep_reply(kind: str, client: int):  # type: ignore[no-untyped-def]
        def keep(_request: Message, reply: Message) -> Message:
            cap["replies"][kind, client] = _records(reply)
            if kind == MSG_DECRYPT:
                raise _Stop
            return reply

        return keep

    kinds = (MSG_CEREMONY, MSG_ENCRYPTED_SUMMARY, MSG_DECRYPT)
    grid = InMemoryGrid(
        root / "nodes",
        rc,
        3,
        tamper_request={(c, 0, k): keep_request(k, c) for c in range(3) for k in kinds},
        tamper_reply={(c, 0, k): keep_reply(k, c) for c in range(3) for k in kinds},
    )
    saved = (server_app._take_uploads, server_app._server_rows)
    server_app._take_uploads, server_app._server_rows = take, rows
    try:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(_Stop):
            server_app.run_federation(grid, settings, 42)  # type: ignore[arg-type]
    finally:
        server_app._take_uploads, server_app._server_rows = saved
    cap.update(
        grid=grid,
        rc=rc,
        root=root,
        settings=settings,
        answered=cap["requests"][MSG_DECRYPT, HOLDER]["rows"][1]["answered-ceremony"],
        overlaps=cap["replies"][MSG_DECRYPT, HOLDER]["overlaps"][1]["overlaps"],
    )
    cap["signers"] = {
        c: MessageSecurity.for_client(
            settings.identity_dir.parent / f"client-{c:03d}",
            root / "signers" / str(c),
            42,
            settings.config_hash,
            c,
            3,
        )
        for c in range(3)
    }
    return cap


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """:func:`capture_run` of an encrypted run (no DP)."""
    with task_identity_of_node_0():
        yield capture_run(tmp_path_factory.mktemp("encrypted-mutations"), enc_config())


def _context(cap: dict[str, Any], client: int) -> Context:
    node = 1000 + client
    return Context(42, node, dict(cap["grid"].node_config[node]), RecordDict(), dict(cap["rc"]))


def _holder_keys(cap: dict[str, Any]) -> Any:
    node = NodeSettings.from_node_config(cap["grid"].node_config[1000 + HOLDER], 3)
    return client_app._key_holder_store(node, 42, cap["signers"][HOLDER].identity).secret_context()


def _journal(cap: dict[str, Any], client: int) -> list[dict[str, Any]]:
    path = cap["root"] / "nodes" / f"node-{client}" / "runs" / "42" / "releases.jsonl"
    return ReleaseJournal(path).entries()


def _decrypt(cap: dict[str, Any], rows: Any, answered: Any = None) -> str:
    """The key holder's answer to a decryption request of ``rows`` signed by the server:
    "genuine" (the captured overlaps) or the refusal's class; never a new journal record
    for a refusal."""
    server = cap["server"]
    before = _journal(cap, HOLDER)
    _, message = server_app._addressed(
        server,
        HOLDER,
        MSG_DECRYPT,
        RecordDict(
            {
                "rows": ConfigRecord(
                    {
                        "rows": rows,
                        "answered-ceremony": cap["answered"] if answered is None else answered,
                    }
                )
            }
        ),
    )
    try:
        reply = client_app.decrypt_overlaps_handler(message, _context(cap, HOLDER))
    except (SecureRelatednessError, DeployError, NodeStateError) as err:
        assert _journal(cap, HOLDER) == before, err
        return f"key holder refuses: {type(err).__name__}"
    got = reply.content["overlaps"]["overlaps"].numpy()
    error = float(abs(got - cap["overlaps"]).max())
    assert error < 1e-4, f"the key holder released overlaps off by {error:.3g}"
    return "genuine"


class _HolderGrid:
    """Delivers each pushed message to the key holder's ClientApp handler, as Flower runs it
    (an error is an error reply)."""

    def __init__(self, cap: dict[str, Any]) -> None:
        self.cap, self.replies = cap, {}
        self.handle = client_app._error_reply(
            client_app._withholding(client_app.decrypt_overlaps_handler))

    def get_node_ids(self) -> list[int]:
        return [1000, 1001, 1002]

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = "m"
            self.replies["m"] = self.handle(m, _context(self.cap, HOLDER))
        return ["m"]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _blame(cap: dict[str, Any], uploads: dict[int, Any], rows: list[bytes], client: int) -> str:
    """The ServerApp's decryption step (``_key_holder_overlaps``) for ``rows`` whose values
    the key holder refuses, answered by the key holder's real handler: the run stops naming
    ``client`` alone, or every client as one or more at fault; nothing is journaled
    anywhere."""
    before = [_journal(cap, c) for c in range(3)]
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(DeployError) as stopped:
        server_app._key_holder_overlaps(_HolderGrid(cap), cap["server"], cap["layout"],
                                        uploads, rows, cap["answered"], {})
    text = str(stopped.value)
    assert [_journal(cap, c) for c in range(3)] == before
    assert "the key holder (client 0) refused the encrypted Gram rows" in text, text
    if f"client {client}'s encrypted summary decrypts to values no honest upload gives" in text:
        return "server stops: client named"
    assert "one or more of clients 0, 1, 2 sent an encrypted summary" in text, text
    return "server stops: clients named"


# --------------------------------------------------------------------------- mutations


def _mutated_columns(cap: dict[str, Any], rng: random.Random, client: int, kind: str) -> Any:
    columns = cap["replies"][MSG_ENCRYPTED_SUMMARY, client]["upload"][1]["columns"]
    blob = columns[0]
    other = cap["replies"][MSG_ENCRYPTED_SUMMARY, (client + 1) % 3]["upload"][1]["columns"][0]
    if kind == "truncated":
        return [blob[: rng.randrange(len(blob))]]
    if kind == "bit-flip":
        return [_flip(rng, blob)]
    if kind == "bit-flip-header":
        return [_flip(rng, blob, 64)]
    if kind == "seal-header":
        return [_edit_seal_header(rng, blob)]
    if kind == "empty":
        return rng.choice([[b""], []])
    if kind == "huge":
        return [blob + bytes(rng.randrange(1, 2**20))]
    if kind == "other-client":
        return [other]
    if kind == "other-client-reindexed":
        return [_upload(other, index=client)]
    if kind == "levels-swapped":
        up = InnerProductUpload.deserialize(blob)
        return [_upload(blob, packed=up.broadcast[:1], broadcast=[*up.packed, *up.broadcast[1:]])]
    if kind in ("scale", "scale-last-bits"):
        up = InnerProductUpload.deserialize(blob)
        scale = rng.choice([2.0**20, 2.0**41, 2.0**59, 1.0])
        scale = LAST_BITS_SCALE if kind == "scale-last-bits" else scale
        return [_upload(blob, packed=[_rescaled(cap["server"].ckks_context, up.packed[0], scale)])]
    if kind == "parameters":
        up = InnerProductUpload.deserialize(blob)
        return [_upload(blob, packed=[_other_parameters(rng)] * len(up.packed))]
    if kind == "count":
        return [blob, blob]
    if kind == "not-bytes":
        return rng.choice([[1], ["x"], [[blob]]])
    if kind == "replayed":  # the client's own earlier upload, signed again: genuine
        return list(columns)
    if kind == "transparent":  # all-zero polynomials: SEAL's products refuse it, unnamed
        up = InnerProductUpload.deserialize(blob)
        zero = _transparent(cap["server"].ckks_context, up.broadcast[-1])
        return [_upload(blob, broadcast=[*up.broadcast[:-1], zero])]
    raise AssertionError(kind)


SUMMARY_KINDS = [
    "truncated",
    "bit-flip",
    "bit-flip-header",
    "seal-header",
    "empty",
    "huge",
    "other-client",
    "other-client-reindexed",
    "levels-swapped",
    "scale",
    "scale-last-bits",
    "parameters",
    "count",
    "not-bytes",
    "replayed",
    "transparent",
]


def summary_reply_case(cap: dict[str, Any], rng: random.Random, kind: str) -> str:
    """Client ``c``'s encrypted-summary reply, its columns damaged and signed again by ``c``,
    through the ServerApp's reading of it, its row computation and the key holder."""
    server, c = cap["server"], rng.randrange(3)
    records = {k: (t, dict(v)) for k, (t, v) in cap["replies"][MSG_ENCRYPTED_SUMMARY, c].items()}
    records["upload"] = ("C", {"columns": _mutated_columns(cap, rng, c, kind)})
    try:
        content = _content(records)
    except (TypeError, ValueError):  # Flower itself cannot carry it
        return "not carried"
    cap["signers"][c].sign(content, MSG_ENCRYPTED_SUMMARY, ["server"], 0, reply=True)
    node = server.node_of_client[c]
    uploads: dict[int, Any] = {}
    envelopes: dict[int, Any] = {}
    rejections = len(server.rejections)
    with contextlib.redirect_stdout(io.StringIO()):
        server_app._take_uploads(
            _Grid(content),
            server,
            {c: cap["sealed"][c]},
            {node: c},
            uploads,
            envelopes,
            {},
            cap["val0"],
            cap["test0"],
            {},
            set(),
        )
    if c not in uploads:
        assert len(server.rejections) == rejections + 1, kind
        assert server.rejections[-1]["client"] == c, kind
        return "rejected: " + server.rejections[-1]["reason"]
    every = {**cap["uploads"], c: uploads[c]}
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            rows = server_app._server_rows(
                server, cap["layout"], every, {**cap["envelopes"], **envelopes}, cap["nodes"]
            )
        except DeployError as err:
            assert f"missing clients [{c}]" in str(err), err
            assert server.rejections[-1]["client"] == c, kind
            return "rejected: unusable ciphertexts"
    outcome = _decrypt(cap, rows)
    if outcome == "key holder refuses: RowValuesError":
        return _blame(cap, every, rows, c)
    return outcome


ROW_KINDS = [
    "truncated",
    "bit-flip",
    "swapped",
    "dropped",
    "repeated",
    "upload-as-row",
    "scale",
    "other-row-data",
    "huge",
    "not-a-list",
    "answered-other",
    "genuine",
]


def decrypt_request_case(cap: dict[str, Any], rng: random.Random, kind: str) -> str:
    """The server's decryption request with its rows damaged (signed by the server)."""
    rows: Any = list(cap["rows"])
    k = rng.randrange(len(rows))
    answered = None
    if kind == "truncated":
        rows[k] = rows[k][: rng.randrange(len(rows[k]))]
    elif kind == "bit-flip":
        rows[k] = _flip(rng, rows[k])
    elif kind == "swapped":
        rows[0], rows[1] = rows[1], rows[0]
    elif kind == "dropped":
        rows.pop(k)
    elif kind == "repeated":
        rows.append(rows[k])
    elif kind == "upload-as-row":
        up = cap["uploads"][k][0]
        rows[k] = EncryptedRow(k, rng.choice([up.packed[0], up.broadcast[0]])).serialize()
    elif kind == "scale":
        data = EncryptedRow.deserialize(rows[k]).data
        rows[k] = EncryptedRow(
            k, _rescaled(cap["server"].ckks_context, data, rng.choice([2.0**20, 2.0**41, 2.0**59]))
        ).serialize()
    elif kind == "other-row-data":
        rows[k] = EncryptedRow(k, EncryptedRow.deserialize(rows[(k + 1) % 3]).data).serialize()
    elif kind == "huge":
        rows[k] = rows[k] + bytes(rng.randrange(1, 2**20))
    elif kind == "not-a-list":
        rows = rng.choice([b"x", [], [1, 2, 3]])
    elif kind == "answered-other":
        answered = rng.choice(["0" * 64, "ab", 7])
    elif kind != "genuine":
        raise AssertionError(kind)
    try:
        return _decrypt(cap, rows, answered)
    except ValueError as err:  # Flower cannot carry the record
        assert kind == "not-a-list", err
        return "not carried"


REQUEST_KINDS = ["truncated", "bit-flip", "other-client", "empty", "layout", "no-record", "genuine"]


def summary_request(
    cap: dict[str, Any], rng: random.Random, kind: str, clients: Sequence[int] = range(3)
) -> tuple[int, Message]:
    """The server's encrypted-summary request to a client ``c`` of ``clients`` with its sealed
    context or layout damaged by ``kind``, signed by the server: ``(c, request)``."""
    c = clients[rng.randrange(len(clients))]
    record = dict(cap["requests"][MSG_ENCRYPTED_SUMMARY, c]["ckks"][1])
    blob = record["sealed-context"]
    if kind == "truncated":
        record["sealed-context"] = blob[: rng.randrange(len(blob))]
    elif kind == "bit-flip":
        record["sealed-context"] = _flip(rng, blob)
    elif kind == "other-client":
        record["sealed-context"] = cap["sealed"][(c + 1) % 3].blob
    elif kind == "empty":
        record["sealed-context"] = rng.choice([b"", "x", 0])
    elif kind == "layout":
        record[rng.choice(["num-vectors", "dim"])] = rng.choice([0, 1, 2**40, -3, "x"])
    elif kind != "no-record" and kind != "genuine":
        raise AssertionError(kind)
    content = RecordDict() if kind == "no-record" else RecordDict({"ckks": ConfigRecord(record)})
    _, message = server_app._addressed(cap["server"], c, MSG_ENCRYPTED_SUMMARY, content)
    return c, message


def summary_request_case(cap: dict[str, Any], rng: random.Random, kind: str) -> str:
    """:func:`summary_request` handled by the client, which answered it before."""
    c, message = summary_request(cap, rng, kind)
    before = _journal(cap, c)
    try:
        reply = client_app.encrypted_summary(message, _context(cap, c))
    except (SecureRelatednessError, DeployError) as err:
        assert _journal(cap, c) == before, err
        return f"client refuses: {type(err).__name__}"
    # the saved summary encrypted again: the same release, journaled once
    assert _journal(cap, c) == before
    assert len(reply.content["upload"]["columns"]) == 1
    return "genuine"


CEREMONY_KINDS = [
    "truncated",
    "bit-flip",
    "with-secret-key",
    "no-galois-keys",
    "other-key",
    "garbage",
    "missing",
    "sealed-missing",
    "signature-missing",
    "signature-swapped",
    "genuine",
]


def ceremony_reply_case(cap: dict[str, Any], rng: random.Random, kind: str) -> str:
    """The key holder's ceremony reply with its public context damaged, read by the server;
    a context that still opens but is not the key holder's stops the decryption."""
    server = cap["server"]
    records = {k: (t, dict(v)) for k, (t, v) in cap["replies"][MSG_CEREMONY, HOLDER].items()}
    record = records["ceremony"][1]
    public = record["public-context"]
    if kind == "truncated":
        record["public-context"] = public[: rng.randrange(len(public))]
    elif kind == "bit-flip":
        record["public-context"] = _flip(rng, public)
    elif kind == "with-secret-key":
        record["public-context"] = _holder_keys(cap).serialize(save_secret_key=True)
    elif kind == "no-galois-keys":
        record["public-context"] = server.ckks_context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=True,
        )
    elif kind == "other-key":
        from secure_fedora.secure.relatedness import create_keys, public_keys

        record["public-context"] = public_keys(create_keys())
    elif kind == "garbage":
        record["public-context"] = rng.randbytes(rng.randrange(1, 4000))
    elif kind == "missing":
        record.pop("public-context")
    elif kind == "sealed-missing":
        record.pop(f"sealed-{server.client_ids[rng.randrange(3)]}")
    elif kind == "signature-missing":
        record.pop(f"signature-{server.client_ids[rng.randrange(3)]}")
    elif kind == "signature-swapped":  # client 0's blob with client 1's signature, and back
        ids = server.client_ids
        record[f"signature-{ids[0]}"], record[f"signature-{ids[1]}"] = (
            record[f"signature-{ids[1]}"],
            record[f"signature-{ids[0]}"],
        )
    elif kind != "genuine":
        raise AssertionError(kind)
    saved = server.ckks_context
    try:
        answered, _ = server_app._open_ceremony(server, HOLDER, _content(records), {})
    except DeployError as err:
        assert f"key holder (client {HOLDER})" in str(err), err
        assert server.ckks_context is saved
        return "server stops: DeployError"
    finally:
        opened, server.ckks_context = server.ckks_context, saved
    if answered == cap["answered"]:
        return "genuine"
    # another context than the key holder stored: the rows computed with it are not
    # decrypted (the key holder checks the answered digest before it decrypts anything)
    assert public_context_digest(record["public-context"]) == answered
    assert opened is not saved
    return _decrypt(cap, cap["rows"], answered)


FLOWS = {
    "summary reply": (summary_reply_case, SUMMARY_KINDS, 80),
    "decryption request": (decrypt_request_case, ROW_KINDS, 48),
    "summary request": (summary_request_case, REQUEST_KINDS, 28),
    "ceremony reply": (ceremony_reply_case, CEREMONY_KINDS, 33),
}
MUST_REFUSE = {
    "summary reply": set(SUMMARY_KINDS)
    - {"bit-flip", "bit-flip-header", "seal-header", "replayed"},
    "decryption request": set(ROW_KINDS) - {"bit-flip", "genuine"},
    "summary request": set(REQUEST_KINDS) - {"genuine"},
    "ceremony reply": set(CEREMONY_KINDS) - {"bit-flip", "genuine"},
}


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_mutated_encrypted_messages_end_genuine_or_in_a_named_refusal(
    run: dict[str, Any], flow: str
) -> None:
    with task_identity_of_node_0():
        run_flow(run, flow, FLOWS, MUST_REFUSE, SEED)


def run_flow(run: dict[str, Any], flow: str, flows: dict[str, Any],
             must_refuse: dict[str, set[str]], seed: int) -> Counter[tuple[str, str]]:
    """Run ``flow``'s seeded cases (``flows[flow]``: case maker, kinds, count) against the
    captured ``run``: a kind in ``must_refuse[flow]`` never ends genuine, a genuine one always
    does, and more than half the cases end in a refusal. The outcomes by (kind, outcome)."""
    make, kinds, cases = flows[flow]
    rng = random.Random(f"{seed}-{flow}")
    outcomes: Counter[tuple[str, str]] = Counter()
    for n in range(cases):
        kind = kinds[n % len(kinds)]
        outcome = make(run, rng, kind)
        assert not (kind in must_refuse[flow] and outcome == "genuine"), (flow, kind)
        assert kind != "genuine" or outcome == "genuine", (flow, outcome)
        outcomes[kind, outcome] += 1
    assert sum(outcomes.values()) == cases
    assert sum(n for (_, o), n in outcomes.items() if o != "genuine") > cases // 2, outcomes
    return outcomes


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("context", ["with secret key", "truncated"])
def test_an_unusable_public_context_from_the_key_holder_stops_the_run_naming_it(
    tmp_path: Path, context: str
) -> None:
    """An authentic ceremony reply whose public context the server refuses (it holds the
    secret key, or does not parse) ended the run with the relatedness layer's ValueError out of
    the ServerApp; it is a DeployError naming the key holder, before any summary is asked."""
    cfg = enc_config()
    rc = run_config(cfg, tmp_path)
    settings = RunSettings.from_run_config(rc)
    signer = MessageSecurity.for_client(
        settings.identity_dir.parent / "client-000",
        tmp_path / "signer",
        42,
        settings.config_hash,
        0,
        3,
    )

    def unusable(request: Message, reply: Message) -> Message:
        records = _records(reply)
        public = records["ceremony"][1]["public-context"]
        if context == "truncated":
            records["ceremony"][1]["public-context"] = public[: len(public) // 2]
        else:
            node = NodeSettings.from_node_config(grid.node_config[1000], 3)
            keys = client_app._key_holder_store(node, 42, signer.identity).secret_context()
            records["ceremony"][1]["public-context"] = keys.serialize(save_secret_key=True)
        content = _content(records)
        signer.sign(content, MSG_CEREMONY, ["server"], 0, reply=True)
        return Message(content, reply_to=request)

    grid = InMemoryGrid(
        tmp_path / "nodes", rc, 3, tamper_reply={(HOLDER, 0, MSG_CEREMONY): unusable}
    )
    with (
        contextlib.redirect_stdout(io.StringIO()),
        pytest.raises(
            DeployError,
            match=r"the key holder \(client 0\) returned an unusable public CKKS "
            r"context: the key holder's public context is refused: ",
        ),
    ):
        server_app.run_federation(grid, settings, 42)  # type: ignore[arg-type]
    assert not any(m.metadata.message_type == MSG_ENCRYPTED_SUMMARY for m in grid.sent)


FORGED = [
    "server-made, unsigned",
    "server-made, signed by the server",
    "server-made, the genuine signature",
    "another client's context and signature",
    "signed for another run",
    "signed for another config",
    "another public context stated",
    "genuine",
]


@pytest.mark.parametrize("kind", FORGED)
def test_a_context_the_key_holder_did_not_seal_for_this_run_and_client_is_refused(
    run: dict[str, Any], kind: str
) -> None:
    """A client opens only a secret context that the key holder signed for this run, this
    client and the public context the server states. A context the server made and sealed to
    the client's real X25519 key (whose secret key the server would hold) was opened and
    used to encrypt the client's summary; it, and a genuine blob re-bound to another client,
    run or public context, is refused naming the key holder, nothing encrypted or journaled."""
    server, c = run["server"], 1
    holder = run["signers"][HOLDER].identity
    party = server.client_ids[c]
    record = dict(run["requests"][MSG_ENCRYPTED_SUMMARY, c]["ckks"][1])
    agreement = run["signers"][c].identity.agreement_key.public_key()

    def holder_signs(blob: bytes, **over: Any) -> bytes:
        fields = dict(
            run_id=42,
            config_hash=run["settings"].config_hash,
            key_holder=holder.party_id,
            recipient=party,
            public_digest=record["public-context-digest"],
            blob=blob,
        )
        return holder.sign(sealed_context_statement(**{**fields, **over}))

    if kind.startswith("server-made"):
        secret = create_keys()
        record["sealed-context"] = seal_keys(secret, {party: agreement}, party)[party]
        record["public-context-digest"] = public_context_digest(public_keys(secret))
        if kind == "server-made, unsigned":
            del record["context-signature"]
        elif kind == "server-made, signed by the server":
            record["context-signature"] = server.security.identity.sign(
                sealed_context_statement(
                    run_id=42,
                    config_hash=run["settings"].config_hash,
                    key_holder=holder.party_id,
                    recipient=party,
                    public_digest=record["public-context-digest"],
                    blob=record["sealed-context"],
                )
            )
    elif kind == "another client's context and signature":
        other = run["sealed"][2]
        record["sealed-context"], record["context-signature"] = other.blob, other.signature
    elif kind == "signed for another run":
        record["context-signature"] = holder_signs(record["sealed-context"], run_id=43)
    elif kind == "signed for another config":
        record["context-signature"] = holder_signs(record["sealed-context"], config_hash="0" * 64)
    elif kind == "another public context stated":
        record["public-context-digest"] = public_context_digest(public_keys(create_keys()))
    _, message = server_app._addressed(
        server, c, MSG_ENCRYPTED_SUMMARY, RecordDict({"ckks": ConfigRecord(record)})
    )
    before = _journal(run, c)
    with task_identity_of_node_0():
        if kind == "genuine":
            reply = client_app.encrypted_summary(message, _context(run, c))
            assert len(reply.content["upload"]["columns"]) == 1
            return
        with pytest.raises(SecureRelatednessError) as refused:
            client_app.encrypted_summary(message, _context(run, c))
    text = str(refused.value)
    assert "not signed by the key holder client-000 for run 42, client-001" in text, text
    assert "nothing encrypted" in text
    assert _journal(run, c) == before


def test_rows_the_server_cannot_compute_for_no_client_s_fault_stop_the_run_naming_the_key_holder(
    run: dict[str, Any],
) -> None:
    """``_server_rows`` let gram_rows' SecureRelatednessError for a failure no upload explains
    (here: a server context holding the secret key) out of the ServerApp unattributed; it is
    a DeployError naming the key holder and the clients whose uploads went in, no one rejected."""
    server = run["server"]
    saved, rejections = server.ckks_context, len(server.rejections)
    server.ckks_context = _holder_keys(run)
    try:
        with pytest.raises(
            DeployError,
            match=r"rows of clients \[0, 1, 2\] could not be computed under the public CKKS "
            r"context of the key holder \(client 0\), no client's ciphertexts explaining it: "
            r".*secret key",
        ):
            server_app._server_rows(
                server, run["layout"], dict(run["uploads"]), dict(run["envelopes"]), run["nodes"]
            )
    finally:
        server.ckks_context = saved
    assert len(server.rejections) == rejections


@pytest.mark.parametrize("part", ["packed", "broadcast"])
def test_a_summary_under_another_key_is_refused_at_decryption_naming_its_client(
    run: dict[str, Any], part: str
) -> None:
    """Client 2's authentic reply whose ciphertexts (its packed or its broadcast ones) are
    another context's: they load and sit at the right level and scale, and the key holder
    refused the rows they spoil without naming anyone (a DeployError "did not return the
    overlaps, asked twice: SecureRelatednessError ..."). The ServerApp now asks the key holder
    about each client's rows computed alone, and the run stops naming client 2 only; nothing
    is journaled, no overlaps are released."""
    c, layout = 2, run["layout"]
    good = InnerProductUpload.deserialize(
        run["replies"][MSG_ENCRYPTED_SUMMARY, c]["upload"][1]["columns"][0])
    foreign = InnerProductUpload.deserialize(encrypt_summary(
        create_keys(), layout, c, torch.linalg.qr(torch.randn(
        layout.dim, 1, generator=torch.Generator().manual_seed(0)))[0])[0])
    bad = InnerProductUpload(c, foreign.packed if part == "packed" else good.packed,
                             foreign.broadcast if part == "broadcast" else good.broadcast)
    uploads = {**run["uploads"], c: [bad]}
    with task_identity_of_node_0(), contextlib.redirect_stdout(io.StringIO()):
        rows = server_app._server_rows(run["server"], layout, dict(uploads),
                                       dict(run["envelopes"]), run["nodes"])
        assert _decrypt(run, rows) == "key holder refuses: RowValuesError"
        assert _blame(run, uploads, rows, c) == "server stops: client named"
