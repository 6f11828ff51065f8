"""The server's step on the round's mean update (Reddi et al. 2021, "Adaptive Federated
Optimization"): the mean update is a pseudo-gradient, and the server may apply it with
momentum (FedAvgM; DP-FedAvgM under user-level DP) or Adam (FedAdam) instead of adding it.

Under user-level DP the optimizer only post-processes the released (noisy) mean, so it costs
no privacy, and its state may be checkpointed like the global part itself.
"""

from __future__ import annotations

import torch

from fedmilm.adapters.space import State
from fedmilm.config.schema import AggregationConfig

KINDS = ("sgd", "momentum", "adam")


class ServerOptimizer:
    """x <- x + lr * direction(mean update); `momentum` and `adam` keep one or two tensors per
    global tensor (FedAdam as published: no bias correction, adaptivity `eps`)."""

    def __init__(self, kind: str, *, lr: float, momentum: float, beta2: float,
                 eps: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"server optimizer {kind!r} is unknown; choose one of {KINDS}")
        self.kind, self.lr, self.beta1, self.beta2, self.eps = kind, lr, momentum, beta2, eps
        self.first: State = {}
        self.second: State = {}

    def step(self, params: State, update: State) -> State:
        """The new global part after one mean `update`."""
        if self.kind == "sgd":
            return {k: params[k] + self.lr * update[k] for k in params}
        if self.kind == "momentum":
            self.first = {k: self.beta1 * self.first[k] + update[k] if k in self.first
                          else update[k].clone() for k in params}
            return {k: params[k] + self.lr * self.first[k] for k in params}
        self.first = {k: self.beta1 * self.first.get(k, torch.zeros_like(update[k]))
                      + (1 - self.beta1) * update[k] for k in params}
        self.second = {k: self.beta2 * self.second.get(k, torch.zeros_like(update[k]))
                       + (1 - self.beta2) * update[k].square() for k in params}
        return {k: params[k] + self.lr * self.first[k] / (self.second[k].sqrt() + self.eps)
                for k in params}

    def state(self) -> State:
        """Its tensors, named for a checkpoint ('first.' / 'second.' + the global key)."""
        return {**{f"first.{k}": v for k, v in self.first.items()},
                **{f"second.{k}": v for k, v in self.second.items()}}

    def load(self, tensors: State) -> None:
        """Restore `state()`; refuses tensors of another optimizer."""
        needs = {"sgd": (), "momentum": ("first",), "adam": ("first", "second")}[self.kind]
        kinds = {name.split(".", 1)[0] for name in tensors}
        if tensors and kinds != set(needs):
            raise ValueError(f"optimizer state holds {sorted(kinds)}, a {self.kind} server "
                             f"optimizer keeps {list(needs)}")
        self.first = {n.split(".", 1)[1]: v for n, v in tensors.items() if n.startswith("first.")}
        self.second = {n.split(".", 1)[1]: v for n, v in tensors.items()
                       if n.startswith("second.")}


def server_optimizer_for(aggregation: AggregationConfig) -> ServerOptimizer:
    """The optimizer `aggregation.server_optimizer` and its settings name."""
    return ServerOptimizer(aggregation.server_optimizer, lr=aggregation.server_lr,
                           momentum=aggregation.server_momentum, beta2=aggregation.server_beta2,
                           eps=aggregation.server_eps)
