"""Local training and evaluation on one phone."""

from fedmilm.training.local import train_local
from fedmilm.training.loss import mean_loss, per_example_loss, token_loss_sum
from fedmilm.training.phone import EvalOutcome, TrainOutcome, evaluate_phone, train_phone
from fedmilm.training.skeleton import DpNoise, DpSgd, TrainStats, dp_sample_rate, planned_steps

__all__ = ["DpNoise", "DpSgd", "EvalOutcome", "TrainOutcome", "TrainStats", "dp_sample_rate",
           "evaluate_phone", "mean_loss", "per_example_loss", "planned_steps", "token_loss_sum",
           "train_local", "train_phone"]
