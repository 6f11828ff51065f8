"""One phone's work in a round: train or evaluate given the global and personal tensors.

Pure functions over a `PhoneRuntime`: no Flower, no storage. The ClientApp (and the benchmarks)
call these, so simulation, deployment and the no-Flower baseline run the very same code.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmilm.adapters.space import State
from fedmilm.config.schema import TrainConfig
from fedmilm.data.chat import Example
from fedmilm.privacy.user_level import clip_update, l2_norm
from fedmilm.training.runtimes import PhoneRuntime
from fedmilm.training.skeleton import DpSgd, TrainStats, dp_sample_rate, planned_steps


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


def train_phone(runtime: PhoneRuntime, *, global_state: State, personal_state: State,
                examples: list[Example], train: TrainConfig, seed: int,
                dp: DpSgd | None = None, clip_norm: float | None = None) -> TrainOutcome:
    """Train both parts locally on `runtime` (DP-SGD when `dp` is set), return the update of the
    global part (clipped to `clip_norm` for user-level DP) and the new personal part.

    The one place sample-level privacy is charged, for every runtime: every planned step, to
    `dp.accountant`, before any training (and so before anything derived from it leaves).
    """
    if dp is not None:
        n = len(examples)
        dp.accountant.step(noise_multiplier=dp.noise_multiplier,
                           sample_rate=dp_sample_rate(n, batch_size=train.batch_size),
                           num_steps=planned_steps(n, epochs=train.epochs,
                                                   batch_size=train.batch_size))
    trained, stats = runtime.train({**global_state, **personal_state}, examples, train=train,
                                   seed=seed, dp=None if dp is None else dp.noise)
    layout = runtime.layout
    personal = {k: trained[k] for k in layout.personal_keys}
    update = {k: trained[k] - global_state[k] for k in layout.global_keys}
    within = None
    if clip_norm is not None:
        within = l2_norm(update) <= clip_norm
        update = clip_update(update, clip_norm)
    return TrainOutcome(update=update, personal=personal, stats=stats, within_clip=within)


def evaluate_phone(runtime: PhoneRuntime, *, global_state: State, personal_state: State,
                   examples: list[Example], batch_size: int,
                   loss_base: float | None = None) -> EvalOutcome:
    """Losses of base, base + global, base + global + personal on held-out examples.

    The base model and the held-out set never change, so a caller may pass `loss_base` from an
    earlier evaluation of the same phone and save a third of the work.
    """
    base, global_, personal = runtime.evaluate(global_state=global_state,
                                               personal_state=personal_state, examples=examples,
                                               batch_size=batch_size, loss_base=loss_base)
    return EvalOutcome(loss_base=base, loss_global=global_, loss_personal=personal,
                       examples=len(examples))
