"""One phone's work in a round: train or evaluate given the global and personal tensors.

Pure functions over an `AdapterSpace`: no Flower, no storage. The ClientApp (and the benchmarks)
call these, so simulation, deployment and the no-Flower baseline run the very same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmilm.adapters.space import AdapterSpace, State
from fedmilm.config.schema import TrainConfig
from fedmilm.data.chat import Example, batches
from fedmilm.privacy.user_level import clip_update, l2_norm
from fedmilm.training.local import (
    DpSgd,
    TrainStats,
    dp_sample_rate,
    planned_steps,
    train_local,
)
from fedmilm.training.loss import mean_loss
from fedmilm.training.memory import MemoryPlan, gradient_checkpointing

if TYPE_CHECKING:  # ExecuTorch is imported only by phones that run it
    from fedmilm.export.runtime import PhonePrograms


@dataclass(frozen=True)
class TrainOutcome:
    """The update of the global part (what may travel) and the new personal part (what stays)."""

    update: State
    personal: State
    stats: TrainStats
    within_clip: bool | None = None  # user-level: the update fitted under the clip unscaled


@dataclass(frozen=True)
class EvalOutcome:
    """Held-out loss per assistant token of the three models a phone can run."""

    loss_base: float
    loss_global: float           # global part, personal part at its initial value
    loss_personal: float | None  # global + personal; None when nothing is personal
    examples: int


def train_phone(space: AdapterSpace, *, global_state: State, personal_state: State,
                examples: list[Example], train: TrainConfig, seed: int,
                dp: DpSgd | None = None, clip_norm: float | None = None,
                plan: MemoryPlan | None = None,
                programs: PhonePrograms | None = None) -> TrainOutcome:
    """Install both parts, train locally (DP-SGD when `dp` is set), return the update of the
    global part (clipped to `clip_norm` for user-level DP) and the new personal part.

    `plan` sets micro-batch and gradient checkpointing (memory budget). With `programs` the
    training runs only through the exported ExecuTorch programs (`client.runtime=executorch`);
    the eager model is not touched.
    """
    if programs is not None:
        trained, stats = _train_on_device(programs, {**global_state, **personal_state},
                                          examples, train=train, seed=seed, dp=dp,
                                          pad_id=space.tokenizer.pad_token_id)
        personal = {k: trained[k] for k in space.personal_keys}
    else:
        space.load(global_state)
        space.load(personal_state)
        with gradient_checkpointing(space.model, plan is not None and plan.checkpointing):
            stats = train_local(space.model, space.trainable_parameters(), examples,
                                epochs=train.epochs, batch_size=train.batch_size, lr=train.lr,
                                weight_decay=train.weight_decay,
                                pad_id=space.tokenizer.pad_token_id, seed=seed, dp=dp,
                                micro_batch=None if plan is None else plan.micro_batch)
        trained = space.state(space.global_keys)
        personal = space.state(space.personal_keys)
    update = {k: trained[k] - global_state[k] for k in space.global_keys}
    within = None
    if clip_norm is not None:
        within = l2_norm(update) <= clip_norm
        update = clip_update(update, clip_norm)
    return TrainOutcome(update=update, personal=personal, stats=stats, within_clip=within)


def _train_on_device(programs: PhonePrograms, state: State, examples: list[Example], *,
                     train: TrainConfig, seed: int, dp: DpSgd | None,
                     pad_id: int) -> tuple[State, TrainStats]:
    """Hand the on-device runtime a job and the adapter as a `.ptd`, read its `.ptd` back, and
    charge the accountant here for every step the job ran (the runtime only executes)."""
    from fedmilm.export.job import TrainJob
    from fedmilm.export.ptd import adapter_to_ptd, ptd_to_adapter
    from fedmilm.export.runtime import train_with_programs

    job = TrainJob(epochs=train.epochs, batch_size=train.batch_size,
                   sampling="poisson" if dp else "shuffle",
                   noise_multiplier=dp.noise_multiplier if dp else None,
                   max_grad_norm=dp.max_grad_norm if dp else None,
                   seed=dp.random.test_seed if dp else seed)  # DP: the runtime's own CSPRNG
    manifest = programs.manifest
    result_ptd, result = train_with_programs(programs, adapter_to_ptd(manifest, state),
                                             examples, job, pad_id=pad_id)
    planned = planned_steps(len(examples), epochs=train.epochs, batch_size=train.batch_size)
    if result.steps != planned:  # the ledger is charged for what was asked, never for less
        raise RuntimeError(f"the on-device runtime ran {result.steps} steps, the job asked for "
                           f"{planned}; its result is discarded")
    if dp is not None:
        dp.accountant.step(noise_multiplier=dp.noise_multiplier, num_steps=planned,
                           sample_rate=dp_sample_rate(len(examples), batch_size=train.batch_size))
    stats = TrainStats(loss=result.loss, steps=result.steps, examples=result.examples,
                       tokens=result.tokens, seconds=result.seconds)
    return ptd_to_adapter(manifest, result_ptd), stats


def evaluate_phone(space: AdapterSpace, *, global_state: State, personal_state: State,
                   examples: list[Example], batch_size: int,
                   loss_base: float | None = None) -> EvalOutcome:
    """Losses of base, base + global, base + global + personal on held-out examples.

    The base model and the held-out set never change, so a caller may pass `loss_base` from an
    earlier evaluation of the same phone and save a third of the work.
    """
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
    return EvalOutcome(loss_base=loss_base, loss_global=loss_global,
                       loss_personal=loss_personal, examples=len(examples))

