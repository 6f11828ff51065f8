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
import math
from dataclasses import asdict, dataclass

JOB_VERSION = 1
SAMPLING = ("shuffle", "poisson")
MAX_EPOCHS, MAX_BATCH = 100, 4096  # a job beyond these is a mistake or an attack on the phone


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
        if not (1 <= self.epochs <= MAX_EPOCHS and 1 <= self.batch_size <= MAX_BATCH):
            problems.append(f"epochs must be in [1, {MAX_EPOCHS}] and batch_size in "
                            f"[1, {MAX_BATCH}]")
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
        """Parse `job.json`; `ValueError` for anything but a valid job of the right types."""
        try:
            raw = json.loads(text)
            fields = {"epochs": int, "batch_size": int, "sampling": str, "version": int,
                      "noise_multiplier": float, "max_grad_norm": float, "seed": int}
            for key, kind in fields.items():
                value = raw.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(
                        value, (int, float) if kind is float else kind)):
                    raise ValueError(f"{key} must be a {kind.__name__}")
            return TrainJob(**raw)
        except (TypeError, AttributeError, json.JSONDecodeError) as err:
            raise ValueError(f"invalid job: {err}") from err


@dataclass(frozen=True)
class JobResult:
    """What the runtime reports next to `result.ptd` (no per-example values: they are private)."""

    steps: int       # optimizer steps planned and taken (empty Poisson draws included)
    examples: int    # examples seen, counting epochs
    tokens: int
    loss: float      # mean training loss per example over all steps
    seconds: float

    def __post_init__(self) -> None:
        counts = (self.steps, self.examples, self.tokens)
        reals = (self.loss, self.seconds)
        if (any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts)
                or any(isinstance(v, bool) or not isinstance(v, int | float)
                       or not math.isfinite(v) or v < 0 for v in reals)):
            raise ValueError("invalid result: steps, examples and tokens must be integers >= 0, "
                             "loss and seconds finite numbers >= 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> JobResult:
        """Parse `result.json` (written by the phone's runtime: untrusted); `ValueError` for
        anything but a valid result."""
        try:
            return JobResult(**json.loads(text))
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"invalid result: {err}") from err
