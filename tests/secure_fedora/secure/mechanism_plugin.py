"""A plug-in Gaussian mechanism and a FedAvg plug-in releasing it each round, as a privacy
researcher would add them without editing the package (used by the plug-in mechanism tests).

``label_share_test``: the share of a client's training labels equal to 0, a mean of
per-record values in ``[0, clip]`` over the public count ``m = data.train_per_client``:
under add/remove one record the sum moves by at most ``clip``, the mean by ``clip / m``.
"""

from __future__ import annotations

from typing import Any

from privacy.mechanisms import MECHANISMS, MechanismSpec
from secure_fedora.algorithms.contract import ROUND, ReleaseSpec
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
