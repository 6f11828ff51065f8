"""The ExecuTorch phone runtime (`client.runtime=executorch`): local training runs only through
the exported programs, handed to the on-device runtime as a `TrainJob` and an adapter `.ptd`,
exactly as the Android app receives them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from fedmilm.adapters.space import AdapterLayout, AdapterSpace, State
from fedmilm.config import FedMilmConfig
from fedmilm.config.schema import TrainConfig
from fedmilm.data.chat import Example
from fedmilm.export.bundle import ensure_bundle
from fedmilm.export.job import TrainJob
from fedmilm.export.manifest import Manifest
from fedmilm.export.ptd import adapter_to_ptd, ptd_to_adapter
from fedmilm.export.runtime import (
    PhonePrograms,
    cached_programs,
    heldout_loss,
    train_with_programs,
)
from fedmilm.training.skeleton import DpNoise, TrainStats, planned_steps


class ExecuTorchRuntime:
    """A phone that trains through ExecuTorch's runtime (see the module docstring)."""

    def __init__(self, programs: PhonePrograms) -> None:
        self.programs = programs
        manifest = programs.manifest
        parts = {t.peft_key: t.part for t in manifest.adapter}
        self.layout = AdapterLayout(
            mode=manifest.personalization,
            global_keys=tuple(k for k in manifest.peft_keys() if parts[k] == "global"),
            personal_keys=tuple(k for k in manifest.peft_keys() if parts[k] == "personal"),
            initial=programs.initial)

    @staticmethod
    def check(cfg: FedMilmConfig, space: AdapterSpace) -> None:
        """The exported programs fix their memory at export: nothing to plan."""

    @staticmethod
    def prepare_run(cfg: FedMilmConfig, space: AdapterSpace, run_dir: Path) -> FedMilmConfig:
        """Export the programs once per run; phones get their folder in the config."""
        folder = ensure_bundle(space, cfg, run_dir)
        return dataclasses.replace(cfg, client=dataclasses.replace(cfg.client,
                                                                   export_dir=str(folder)))

    @staticmethod
    def finish_run(cfg: FedMilmConfig, space: AdapterSpace, global_state: State,
                   run_dir: Path) -> None:
        """The final global adapter as the `.ptd` a phone app downloads next."""
        manifest = Manifest.read(Path(cfg.client.export_dir))
        full = {**space.initial_state(tuple(space.initial)), **global_state}
        (run_dir / "global_adapter.ptd").write_bytes(adapter_to_ptd(manifest, full))

    @classmethod
    def for_phone(cls, cfg: FedMilmConfig,
                  load_space: Callable[[], AdapterSpace]) -> ExecuTorchRuntime:
        """The bundle the server exported, read once per process; the eager model is never
        loaded (`load_space` is not called)."""
        if not cfg.client.export_dir:
            raise ValueError("client.runtime=executorch but no client.export_dir reached the "
                             "phone; the ServerApp sets it when it exports the programs")
        return cls(cached_programs(cfg.client.export_dir))

    def train(self, state: State, examples: list[Example], *, train: TrainConfig, seed: int,
              dp: DpNoise | None) -> tuple[State, TrainStats]:
        """Hand the on-device runtime a job and the adapter as a `.ptd`; read its `.ptd` back.
        A result that ran other than the planned steps is discarded (the ledger was charged
        for the plan)."""
        job = TrainJob(epochs=train.epochs, batch_size=train.batch_size,
                       sampling="poisson" if dp else "shuffle",
                       noise_multiplier=dp.noise_multiplier if dp else None,
                       max_grad_norm=dp.max_grad_norm if dp else None,
                       seed=dp.random.test_seed if dp else seed)  # DP: the runtime's CSPRNG
        manifest = self.programs.manifest
        result_ptd, result = train_with_programs(self.programs, adapter_to_ptd(manifest, state),
                                                 examples, job)
        planned = planned_steps(len(examples), epochs=train.epochs, batch_size=train.batch_size)
        if result.steps != planned:
            raise RuntimeError(f"the on-device runtime ran {result.steps} steps, the job asked "
                               f"for {planned}; its result is discarded")
        stats = TrainStats(loss=result.loss, steps=result.steps, examples=result.examples,
                           tokens=result.tokens, seconds=result.seconds)
        return ptd_to_adapter(manifest, result_ptd), stats

    def evaluate(self, *, global_state: State, personal_state: State, examples: list[Example],
                 batch_size: int, loss_base: float | None) -> tuple[float, float, float | None]:
        """Held-out losses through the evaluation program (`batch_size` is the exported
        micro-batch's). The base model's is the adapter with every lora_B zero: LoRA then adds
        exact zeros to each layer."""
        initial = self.programs.initial
        with_global = {**initial, **global_state}
        if loss_base is None:
            base = {k: torch.zeros_like(v) if ".lora_B." in k else v
                    for k, v in with_global.items()}
            loss_base = heldout_loss(self.programs, base, examples)
        loss_global = heldout_loss(self.programs, with_global, examples)
        loss_personal = None
        if self.layout.personal_keys:
            loss_personal = heldout_loss(self.programs, {**with_global, **personal_state},
                                         examples)
        return loss_base, loss_global, loss_personal
