"""A plug-in Gaussian mechanism and FedAvg plug-ins releasing it each round or once at setup,
as a privacy researcher would add them without editing the package (used by the plug-in
mechanism tests).

``label_share_test``: the share of a client's training labels equal to 0, a mean of
per-record values in ``[0, clip]`` over the public count ``m = data.train_per_client``:
under add/remove one record the sum moves by at most ``clip``, the mean by ``clip / m``.
"""

from __future__ import annotations

from typing import Any

from privacy.mechanisms import MECHANISMS, MechanismSpec
from secure_fedora.algorithms.contract import ROUND, SETUP, ReleaseSpec
from secure_fedora.algorithms.methods import FedAvg

MECHANISM = "label_share_test"
ENTRY = "label_share"

if MECHANISM not in MECHANISMS:
    MECHANISMS.register(MechanismSpec(
        MECHANISM, "Gaussian mechanism on the share of training labels equal to 0",
        {"clip": "number", "m": "count"},
        lambda p: float(p["clip"]) / p["m"],
        record_params=lambda cfg: {
            "clip": float(cfg.privacy.mechanisms[MECHANISM].params.get("clip", 1.0))
            if MECHANISM in cfg.privacy.mechanisms else 1.0,
            "m": cfg.data.train_per_client}))


def label_share(y: Any, m: int) -> Any:
    """The labels equal to 0 over the public count ``m`` (the record's), not over the client's
    own rows: removing one of them moves it by at most ``1 / m`` whatever the client holds."""
    return (y == 0).double().sum() / m


class LabelShareFedAvg(FedAvg):
    """FedAvg whose clients also release their noised label-0 share every round (declared as
    an extra mechanism of the round model release); the server averages the shares."""

    name = "label_share_fedavg"
    #: The mechanism the client code releases (a test may point it at an undeclared one).
    released = MECHANISM

    @classmethod
    def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
        return tuple(ReleaseSpec(s.kind, (*s.mechanisms, MECHANISM), s.when, s.encrypted)
                     if (s.kind, s.when) == ("model", ROUND) else s
                     for s in super().releases(cfg))

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        entries = super().reply_entries(cfg, stage)
        if stage == ROUND and cfg.privacy.enabled:  # released only under DP
            return {**entries, ENTRY: f"the noised label-0 share ({MECHANISM}, accounted with "
                                      "the round's model release)"}
        return entries

    def client_update(self, i: int, rnd: int, message: Any) -> Any:
        reply = dict(super().client_update(i, rnd, message))
        if self.ctx.privacy is not None:
            value = label_share(self.ctx.clients[i].train_y,
                                self.ctx.privacy.cfg.data.train_per_client)
            reply[ENTRY] = self.ctx.privacy.gaussian(i, self.released, value,
                                                     self.ctx.noise[i]).reshape(1)
        return reply

    def aggregate(self, rnd: int, replies: Any) -> dict[str, float]:
        stats = super().aggregate(rnd, replies)
        shares = [float(r[ENTRY]) for r in replies.values() if ENTRY in r]
        return {**stats, **({"label_share": sum(shares) / len(shares)} if shares else {})}


#: The setup release's kind and the setup reply entry carrying it.
SETUP_KIND = "label_share_setup"


class SetupLabelShareFedAvg(FedAvg):
    """FedAvg whose clients release their noised label-0 share once, in the setup exchange
    (a setup release of the plug-in mechanism alone); the server keeps their mean and reports
    it with every round."""

    name = "setup_label_share_fedavg"
    setup_share: float | None = None

    @classmethod
    def releases(cls, cfg: Any) -> tuple[ReleaseSpec, ...]:
        return (ReleaseSpec(SETUP_KIND, (MECHANISM,), SETUP), *super().releases(cfg))

    @classmethod
    def reply_entries(cls, cfg: Any, stage: str) -> dict[str, str]:
        entries = super().reply_entries(cfg, stage)
        if stage == SETUP:
            return {**entries, ENTRY: f"the noised label-0 share ({MECHANISM}, the setup "
                                      "release)"}
        return entries

    def setup_messages(self) -> dict[int, Any]:
        return {i: {} for i in range(self.ctx.num_clients)}

    def client_setup(self, i: int, message: Any) -> Any:
        y = self.ctx.clients[i].train_y
        if self.ctx.privacy is None:  # released only under DP: without it, the plain share
            return {ENTRY: label_share(y, int(y.numel())).reshape(1)}
        value = label_share(y, self.ctx.privacy.cfg.data.train_per_client)
        return {ENTRY: self.ctx.privacy.gaussian(i, MECHANISM, value,
                                                 self.ctx.noise[i]).reshape(1)}

    def server_setup(self, replies: Any) -> None:
        self.setup_share = sum(float(r[ENTRY]) for r in replies.values()) / len(replies)

    def aggregate(self, rnd: int, replies: Any) -> dict[str, float]:
        stats = super().aggregate(rnd, replies)
        return {**stats, **({"setup_share": self.setup_share}
                            if self.setup_share is not None else {})}


def _tampered(how: str, value: Any, released: Any) -> Any:
    """What a buggy plug-in replies instead of ``released`` (the noised ``value``): ``raw``
    the un-noised value, ``float32`` the release cast down (other bits), ``reshaped`` the
    release itself in another shape (the same release)."""
    if how == "raw":
        return value.reshape(1)
    if how == "float32":
        return released.float().reshape(1)
    if how == "reshaped":
        return released.reshape(1, 1)
    raise ValueError(how)


class RawLabelShareFedAvg(LabelShareFedAvg):
    """:class:`LabelShareFedAvg` whose client code calls ``gaussian`` but replies with
    something else (:attr:`tamper`); :attr:`seen` records what reached the server."""

    tamper = "raw"
    seen: list[Any] = []

    def client_update(self, i: int, rnd: int, message: Any) -> Any:
        reply = dict(FedAvg.client_update(self, i, rnd, message))
        value = label_share(self.ctx.clients[i].train_y,
                            self.ctx.privacy.cfg.data.train_per_client)
        released = self.ctx.privacy.gaussian(i, MECHANISM, value, self.ctx.noise[i])
        return {**reply, ENTRY: _tampered(self.tamper, value, released)}

    def aggregate(self, rnd: int, replies: Any) -> dict[str, float]:
        type(self).seen.extend(dict(replies).values())
        return super().aggregate(rnd, replies)


class RawSetupLabelShareFedAvg(SetupLabelShareFedAvg):
    """:class:`SetupLabelShareFedAvg` whose ``client_setup`` calls ``gaussian`` but replies
    with something else (:attr:`tamper`); :attr:`seen` records what reached the server."""

    tamper = "raw"
    seen: list[Any] = []

    def client_setup(self, i: int, message: Any) -> Any:
        value = label_share(self.ctx.clients[i].train_y,
                            self.ctx.privacy.cfg.data.train_per_client)
        released = self.ctx.privacy.gaussian(i, MECHANISM, value, self.ctx.noise[i])
        return {ENTRY: _tampered(self.tamper, value, released)}

    def server_setup(self, replies: Any) -> None:
        type(self).seen.extend(dict(replies).values())
        super().server_setup(replies)
