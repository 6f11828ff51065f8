"""The phone's side of a round: `job.json` + `adapter.ptd` in, `result.json` + `result.ptd` out.

This is the whole contract between whoever talks to the server (our ClientApp, or a bridge for
the Android app) and the on-device runtime that executes the exported programs. Everything that
needs judgement (noise calibration, budgets, validation of the result) stays on the Python side;
the runtime only samples batches, draws noise and runs the programs.

Sampling and noise are drawn on the phone: a server that chose the batches or the noise could
undo the amplification by subsampling or subtract the noise. `seed` exists for virtual phones
(reproducible tests); a real phone leaves it null and uses a secure random source.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

JOB_VERSION = 1
SAMPLING = ("shuffle", "poisson")


@dataclass(frozen=True)
class TrainJob:
    """One local training, as the runtime receives it."""

    epochs: int
    batch_size: int
    sampling: str                   # shuffle: epochs of shuffled batches | poisson: DP-SGD draws
    noise_multiplier: float | None  # poisson only: noise std = noise_multiplier * max_grad_norm
    max_grad_norm: float | None
    seed: int | None = None         # virtual phones only
    version: int = JOB_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.version != JOB_VERSION:
            problems.append(f"version {self.version} is not {JOB_VERSION}")
        if self.sampling not in SAMPLING:
            problems.append(f"sampling={self.sampling!r} is not one of {', '.join(SAMPLING)}")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append("epochs and batch_size must be >= 1")
        dp_fields = (self.noise_multiplier, self.max_grad_norm)
        if (self.sampling == "poisson") != all(v is not None for v in dp_fields):
            problems.append("noise_multiplier and max_grad_norm go with sampling=poisson only")
        elif self.sampling == "poisson" and not all(v > 0 for v in dp_fields):  # type: ignore
            problems.append("noise_multiplier and max_grad_norm must be > 0")
        if problems:
            raise ValueError("invalid job: " + "; ".join(problems))

    @property
    def dp(self) -> bool:
        return self.sampling == "poisson"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> TrainJob:
        return TrainJob(**json.loads(text))


@dataclass(frozen=True)
class JobResult:
    """What the runtime reports next to `result.ptd` (no per-example values: they are private)."""

    steps: int       # optimizer steps planned and taken (empty Poisson draws included)
    examples: int    # examples seen, counting epochs
    tokens: int
    loss: float      # mean training loss per example over all steps
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> JobResult:
        return JobResult(**json.loads(text))
