"""The phone runtime interface: how a phone runs its local computations, chosen by
`client.runtime`.

A runtime answers four questions, and nothing outside this interface asks which runtime runs:
- `check(cfg, space)`: can phones of this config run at all (start-up, one line on failure)?
- `prepare_run(cfg, space, run_dir)`: what the server does once per run before phones start;
  returns the config the phones receive; `finish_run(...)`: what it leaves for phones after;
- `for_phone(cfg, load_space)`: the runtime a phone builds once per process (eager: the model
  and its memory plan; ExecuTorch: the loaded programs, without ever loading the model);
- `layout`: the adapter tensors it trains (keys, parts, initial values);
- `train` / `evaluate`: one local training and one held-out evaluation.

Eager (PyTorch + PEFT + Opacus) lives here; ExecuTorch (`fedmilm.export.phone_runtime`) is
imported only by phones that name it. Both train through the shared skeleton
(`fedmilm.training.skeleton`). Neither charges a privacy accountant: `train_phone` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Protocol

from fedmilm.adapters.space import AdapterLayout, AdapterSpace, State
from fedmilm.config import FedMilmConfig
from fedmilm.config.schema import TrainConfig
from fedmilm.data.chat import Example, batches
from fedmilm.training.local import train_local
from fedmilm.training.loss import mean_loss
from fedmilm.training.memory import MemoryPlan, gradient_checkpointing, plan_for, resident_bytes
from fedmilm.training.skeleton import DpNoise, TrainStats

log = logging.getLogger("fedmilm.runtime")


class PhoneRuntime(Protocol):
    """One phone's runtime for one config (see the module docstring)."""

    layout: AdapterLayout

    def train(self, state: State, examples: list[Example], *, train: TrainConfig, seed: int,
              dp: DpNoise | None) -> tuple[State, TrainStats]:
        """Train from `state` (every adapter tensor); the trained tensors and what it did."""
        ...

    def evaluate(self, *, global_state: State, personal_state: State, examples: list[Example],
                 batch_size: int, loss_base: float | None) -> tuple[float, float, float | None]:
        """(base, base + global, base + global + personal or None) held-out losses; the base's
        is recomputed only when `loss_base` is None."""
        ...


class EagerRuntime:
    """PyTorch + PEFT on the phone, Opacus for DP-SGD, within the phone's memory plan."""

    def __init__(self, space: AdapterSpace, plan: MemoryPlan | None = None) -> None:
        self.space = self.layout = space
        self.plan = plan

    @staticmethod
    def check(cfg: FedMilmConfig, space: AdapterSpace) -> None:
        """`MemoryBudgetError` when `client.memory_budget_mb` fits nothing."""
        plan_for(cfg, space.model)

    @staticmethod
    def prepare_run(cfg: FedMilmConfig, space: AdapterSpace, run_dir: Path) -> FedMilmConfig:
        plan = plan_for(cfg, space.model)  # a budget nothing fits stops here, not on phones
        log.info("phones train with micro-batch %d, gradient checkpointing %s (estimated peak "
                 "%.0f MiB)", plan.micro_batch, "on" if plan.checkpointing else "off",
                 plan.estimated_bytes / 2**20)
        return cfg

    @staticmethod
    def finish_run(cfg: FedMilmConfig, space: AdapterSpace, global_state: State,
                   run_dir: Path) -> None:
        """Nothing: the run directory's PEFT adapter is what eager phones load."""

    @classmethod
    def for_phone(cls, cfg: FedMilmConfig,
                  load_space: Callable[[], AdapterSpace]) -> EagerRuntime:
        """Planned from what this process holds with the model loaded, measured here."""
        space = load_space()
        return cls(space, plan_for(cfg, space.model, resident=resident_bytes()))

    def train(self, state: State, examples: list[Example], *, train: TrainConfig, seed: int,
              dp: DpNoise | None) -> tuple[State, TrainStats]:
        space, plan = self.space, self.plan
        space.load(state)
        with gradient_checkpointing(space.model, plan is not None and plan.checkpointing):
            stats = train_local(space.model, space.trainable_parameters(), examples,
                                epochs=train.epochs, batch_size=train.batch_size, lr=train.lr,
                                weight_decay=train.weight_decay,
                                pad_id=space.tokenizer.pad_token_id, seed=seed, dp=dp,
                                micro_batch=None if plan is None else plan.micro_batch)
        return space.state(tuple(space.initial)), stats

    def evaluate(self, *, global_state: State, personal_state: State, examples: list[Example],
                 batch_size: int, loss_base: float | None) -> tuple[float, float, float | None]:
        space = self.space
        held = batches(examples, batch_size=batch_size, pad_id=space.tokenizer.pad_token_id)
        if loss_base is None:
            with space.model.disable_adapter():
                loss_base = mean_loss(space.model, held)
        space.load(global_state)
        space.load(space.initial_state(space.personal_keys))
        loss_global = mean_loss(space.model, held)
        loss_personal = None
        if space.personal_keys:
            space.load(personal_state)
            loss_personal = mean_loss(space.model, held)
        return loss_base, loss_global, loss_personal


RUNTIMES = {"eager": "fedmilm.training.runtimes:EagerRuntime",
            "executorch": "fedmilm.export.phone_runtime:ExecuTorchRuntime"}


def runtime_class(name: str):  # noqa: ANN201 - a class following `PhoneRuntime`
    """The runtime `client.runtime` names (imported on first use: ExecuTorch only if named)."""
    if name not in RUNTIMES:
        raise ValueError(f"client.runtime={name!r} is unknown; choose one of "
                         f"{', '.join(RUNTIMES)}")
    module, _, attribute = RUNTIMES[name].partition(":")
    return getattr(import_module(module), attribute)
