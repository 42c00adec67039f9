"""Federated methods over one shared state layout: FEDORA and the baselines.

A method decides what each participant starts from, which regularization it trains with and
how the server combines what it receives. It never moves messages: the in-process runtime
(and the Flower runtime) call these methods. All client parameters are rows of one
(N x P) matrix, so aggregation and propagation are single matrix products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secure_fedora import fedora
from secure_fedora.client import (
    FlatModel,
    GradientOracle,
    TrainConfig,
    Workspace,
    evaluate,
    local_train,
)
from secure_fedora.partition import ClientData

__all__ = [
    "FedAvg",
    "Fedora",
    "FederatedMethod",
    "Local",
    "MethodContext",
    "Relatedness",
    "plain_overlaps",
]


@dataclass
class MethodContext:
    """What every method needs: the clients' data, the model layout and the local trainer."""

    clients: Sequence[ClientData]
    flat: FlatModel
    train: TrainConfig
    oracle: GradientOracle
    workspace: Workspace
    generators: list[torch.Generator]
    init: Tensor
    num_classes: int = 10
    privacy: Any = None  # secure_fedora.private.FederationPrivacy when DP is on
    transport: Any = None  # secure_fedora.transport.SecureTransport with [security] envelopes

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def select(self, i: int) -> None:
        """Point a DP oracle at client ``i``'s noise multiplier and generator."""
        if self.privacy is not None:
            self.oracle.select(self.privacy.clients[i].noise_multiplier, self.generators[i])

    def train_client(self, i: int, theta: Tensor, phi: Tensor | None = None, lam: float = 0.0) -> int:
        """Run client ``i``'s local training on ``theta`` in place; returns the step count."""
        c = self.clients[i]
        self.select(i)
        return local_train(
            self.flat, theta, c.train_x, c.train_y, self.train, self.oracle,
            self.generators[i], self.workspace, phi=phi, lam=lam,
        )


@dataclass
class Relatedness:
    """The relatedness graph and propagation matrix FEDORA uses (and reports)."""

    overlaps: Tensor
    similarity: Tensor
    graph: Tensor
    propagation: Tensor
    mode: str = "plain"
    details: dict[str, Any] = field(default_factory=dict)


def plain_overlaps(clients: Sequence[ClientData], num_classes: int, q: int) -> tuple[Tensor, Tensor]:
    """Summaries (N x d x q) and their overlap blocks, computed in the clear (no privacy)."""
    summaries = torch.stack(
        [fedora.client_summary(c.train_x, c.train_y, num_classes, q) for c in clients]
    )
    return summaries, fedora.subspace_overlaps(summaries)


class FederatedMethod:
    """Base class: a method owns its parameter matrices and reports per-client eval rows."""

    name = "method"

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.theta = ctx.init.unsqueeze(0).repeat(ctx.num_clients, 1)

    def setup(self) -> None:
        """Work done once before the first round (e.g. relatedness)."""

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        raise TypeError(f"{type(self).__name__} does not define train_round")

    def eval_row(self, i: int) -> Tensor:
        """The parameters on which client ``i`` is evaluated (its personalized model)."""
        return self.theta[i]

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_matrix(self.theta, state["theta"], "theta")

    def extra_results(self) -> dict[str, Any]:
        """Method-specific results added to results.json at the end of a run."""
        return {}


def _load_matrix(target: Tensor, value: Tensor, name: str) -> None:
    if not isinstance(value, Tensor) or value.shape != target.shape:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"checkpoint field {name!r} has shape {shape}, expected {tuple(target.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"checkpoint field {name!r} contains non-finite values")
    target.copy_(value)


class Local(FederatedMethod):
    """Local-only training: every client trains alone; nothing is communicated."""

    name = "local"

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        steps = sum(self.ctx.train_client(i, self.theta[i]) for i in participants)
        return {"steps": float(steps)}


class FedAvg(FederatedMethod):
    """FedAvg (McMahan et al., AISTATS 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data"): participants start from the global model, train
    locally, and the server averages their models weighted by training-set size.

    Evaluated both as the global model and after local fine-tuning of the final global model
    (``finetune_epochs`` epochs, best epoch chosen on each client's validation data).
    """

    name = "fedavg"

    def __init__(self, ctx: MethodContext, finetune_epochs: int = 5) -> None:
        super().__init__(ctx)
        self.global_params = ctx.init.clone()
        self.finetune_epochs = finetune_epochs
        self.weights = torch.tensor([float(c.train_x.shape[0]) for c in ctx.clients])

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        steps = 0
        for i in participants:
            self.theta[i].copy_(self.global_params)
            steps += self.ctx.train_client(i, self.theta[i])
        idx = torch.as_tensor(list(participants))
        w = self.weights[idx] / self.weights[idx].sum()
        self.global_params.copy_(w @ self.theta[idx])
        return {"steps": float(steps)}

    def eval_row(self, i: int) -> Tensor:
        return self.global_params

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "global": self.global_params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _load_matrix(self.global_params, state["global"], "global")

    def extra_results(self) -> dict[str, Any]:
        """Fine-tune the final global model on each client; pick the epoch on validation."""
        if self.finetune_epochs == 0:
            return {}
        ctx = self.ctx
        one_epoch = TrainConfig(**{**ctx.train.__dict__, "local_epochs": 1})
        per_client = []
        row = torch.empty_like(self.global_params)
        for i, c in enumerate(ctx.clients):
            row.copy_(self.global_params)
            ctx.select(i)
            best_val = evaluate(ctx.flat, row, c.val_x, c.val_y).accuracy
            best_test = evaluate(ctx.flat, row, c.test_x, c.test_y).accuracy
            for _ in range(self.finetune_epochs):
                local_train(ctx.flat, row, c.train_x, c.train_y, one_epoch, ctx.oracle,
                            ctx.generators[i], ctx.workspace)
                val = evaluate(ctx.flat, row, c.val_x, c.val_y).accuracy
                if val > best_val:
                    best_val = val
                    best_test = evaluate(ctx.flat, row, c.test_x, c.test_y).accuracy
            per_client.append(best_test)
        return {"finetuned_test_accuracy": per_client}


class Fedora(FederatedMethod):
    """FEDORA (Wu, Bao, Ainsworth, He, KDD 2023, "Personalized Federated Learning with
    Parameter Propagation"): relatedness from data subspaces, a top-k graph, a personalized
    PageRank propagation matrix P; each client is pulled toward ``phi_i = sum_j P_ij theta_j``
    only when ``phi_i`` has lower validation loss than its own model.

    ``relatedness_fn`` computes the overlap blocks (plain, noised or encrypted). With
    ``private_validation`` the regularization weight comes from the client's accounted,
    noised loss difference (``ctx.privacy.private_lambda``) instead of the exact rule.
    """

    name = "fedora"

    def __init__(
        self,
        ctx: MethodContext,
        q: int = 1,
        tau: float = 10.0,
        k: int = 2,
        alpha: float = 0.8,
        propagation: str = "dense",
        relatedness_fn: Callable[[], tuple[Tensor, dict[str, Any]]] | None = None,
        relatedness_mode: str = "plain",
        private_validation: bool = False,
    ) -> None:
        super().__init__(ctx)
        self.q, self.tau, self.k, self.alpha = q, tau, k, alpha
        self.propagation_mode = propagation
        self.phi = self.theta.clone()
        self.relatedness: Relatedness | None = None
        self._relatedness_fn = relatedness_fn or (
            lambda: (plain_overlaps(ctx.clients, ctx.num_classes, q)[1], {})
        )
        self._relatedness_mode = relatedness_mode
        self.private_validation = private_validation
        self.last_lambdas = torch.zeros(ctx.num_clients)
        # Optional secure message paths, set by the runtime: a SecureExchange (signed
        # envelopes) and an EncryptedPropagator (CKKS propagation).
        self.exchange: Any = None
        self.propagator: Any = None

    def setup(self) -> None:
        if self.private_validation and self.ctx.privacy is None:
            raise ValueError("private validation needs the client privacy state (ctx.privacy)")
        if self.relatedness is not None:
            return
        overlaps, details = self._relatedness_fn()
        self.relatedness = self._build_relatedness(overlaps, details)

    def _build_relatedness(self, overlaps: Tensor, details: dict[str, Any]) -> Relatedness:
        similarity = fedora.similarity_matrix(overlaps, self.tau)
        graph = fedora.topk_graph(similarity, self.k)
        if self.propagation_mode == "power":
            prop = fedora.propagation_matrix_power(graph, self.alpha)
        else:
            prop = fedora.propagation_matrix(graph, self.alpha)
        return Relatedness(overlaps, similarity, graph, prop, self._relatedness_mode, details)

    def train_round(self, rnd: int, participants: Sequence[int]) -> dict[str, float]:
        assert self.relatedness is not None, "setup() must run before the first round"
        ctx = self.ctx
        steps = 0
        lambdas = []
        for i in participants:
            lam = self.regularization(i)
            self.last_lambdas[i] = lam
            lambdas.append(lam)
            steps += ctx.train_client(i, self.theta[i], self.phi[i], lam)
        plaintext_messages = self.exchange is not None and self.propagator is None
        if plaintext_messages:
            # rejected uploads are restored to the server's last accepted row
            self.exchange.upload_theta(rnd, self.theta, participants)
        self.propagate(rnd, participants)
        if plaintext_messages:
            self.exchange.download_phi(rnd, self.phi)
        return {
            "steps": float(steps),
            "mean_lambda": float(sum(lambdas) / max(len(lambdas), 1)),
            "pulled_fraction": float(sum(1 for v in lambdas if v > 0) / max(len(lambdas), 1)),
        }

    def regularization(self, i: int) -> float:
        """``lambda_i`` from client ``i``'s validation data (exact, or accounted and noised)."""
        ctx = self.ctx
        c = ctx.clients[i]
        if self.private_validation:
            return ctx.privacy.private_lambda(
                i, self.theta[i], self.phi[i], c.val_x, c.val_y, ctx.generators[i], ctx.flat.bind
            )
        loss_local = evaluate(ctx.flat, self.theta[i], c.val_x, c.val_y).loss
        loss_received = evaluate(ctx.flat, self.phi[i], c.val_x, c.val_y).loss
        return fedora.regularization_weight(loss_local, loss_received)

    def propagate(self, rnd: int = 0, participants: Sequence[int] | None = None) -> None:
        """Server step: ``phi_i <- sum_j P_ij theta_j`` for every client."""
        assert self.relatedness is not None
        if self.propagator is not None:
            self.phi.copy_(self.propagator.propagate(
                self.relatedness.propagation, self.theta, changed=participants, rnd=rnd,
                exchange=self.exchange))
        elif self.propagation_mode == "power":
            self.phi.copy_(fedora.propagate_power(self.relatedness.graph, self.theta, self.alpha))
        else:
            self.phi.copy_(fedora.propagate(self.relatedness.propagation, self.theta))

    def attach(self, new_summary_overlaps: Tensor) -> Tensor:
        """The parameters handed to a late-joining client: ``phi_new = w @ theta``."""
        assert self.relatedness is not None
        w = fedora.attach_from_overlaps(
            new_summary_overlaps, self.relatedness.propagation, self.tau, self.k
        )
        return w.to(self.theta.dtype) @ self.theta

    def state_dict(self) -> dict[str, Any]:
        assert self.relatedness is not None
        r = self.relatedness
        return {
            "theta": self.theta,
            "phi": self.phi,
            "relatedness": {
                "overlaps": r.overlaps, "similarity": r.similarity, "graph": r.graph,
                "propagation": r.propagation, "mode": r.mode, "details": r.details,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        _load_matrix(self.phi, state["phi"], "phi")
        r = state["relatedness"]
        self.relatedness = Relatedness(
            r["overlaps"], r["similarity"], r["graph"], r["propagation"], r["mode"], r["details"]
        )

    def extra_results(self) -> dict[str, Any]:
        assert self.relatedness is not None
        security: dict[str, Any] = {}
        if self.exchange is not None:
            security["rejections"] = [r.to_dict() for r in self.exchange.rejections]
            security["transport"] = self.exchange.transport.stats.to_dict()
        if self.propagator is not None:
            security["encrypted_propagation"] = self.propagator.stats.to_dict()
        return {
            **security,
            "relatedness_mode": self.relatedness.mode,
            "graph_neighbours": [
                torch.nonzero(row).flatten().tolist() for row in self.relatedness.graph
            ],
        }
