"""The virtual phone: local training that runs only the exported programs, through ExecuTorch's
runtime (the C++ runtime and kernels the Android library wraps), never the PyTorch model.

It follows the eager loop step for step (same batch plan, same AdamW, same Opacus clipping and
noise draws), so on the same data and seed its update matches the eager phone's within float
tolerance. What differs is only where the arithmetic runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
from executorch.extension.training import TrainingModule

from fedmilm.data.chat import IGNORE, Batch, Example
from fedmilm.export.job import JobResult, TrainJob
from fedmilm.export.manifest import Manifest, inside
from fedmilm.export.ptd import adapter_to_ptd, ptd_to_adapter
from fedmilm.privacy.randomness import private_random
from fedmilm.training.local import batch_plan, micro_batches


@dataclass(frozen=True)
class PhonePrograms:
    """An exported bundle in memory: what a phone downloads once."""

    folder: Path
    manifest: Manifest
    train: bytes
    adamw: bytes
    dp_grad: bytes | None

    @staticmethod
    def load(folder: Path) -> PhonePrograms:
        """Read a bundle, verifying every program against the manifest's sha256 and
        ExecuTorch's file identifier before anything reaches the runtime: a corrupt or
        swapped program is a clear `ValueError`, never a crashed process."""
        folder = Path(folder)
        manifest = Manifest.read(folder)
        programs = manifest.programs
        dp = programs.get("dp_grad")
        return PhonePrograms(folder=folder, manifest=manifest,
                             train=_verified(folder, manifest, programs["train"].file),
                             adamw=_verified(folder, manifest, programs["adamw"].file),
                             dp_grad=None if dp is None else _verified(folder, manifest,
                                                                       dp.file))


def _verified(folder: Path, manifest: Manifest, name: str) -> bytes:
    """The bytes of program `name`, checked against the manifest before any parsing."""
    blob = inside(folder, name, f"{folder}/manifest.json").read_bytes()
    expected = manifest.sha256.get(name)
    if expected is None or hashlib.sha256(blob).hexdigest() != expected:
        raise ValueError(f"{folder / name} does not match the sha256 in its manifest: the "
                         "bundle is corrupt or was altered; re-export it")
    if not re.fullmatch(rb"ET[0-9]{2}", blob[4:8]):
        raise ValueError(f"{folder / name} is not an ExecuTorch program")
    return blob


@lru_cache(maxsize=2)
def cached_programs(folder: str) -> PhonePrograms:
    """Once per process: one simulation worker serves many virtual phones."""
    return PhonePrograms.load(Path(folder))


def pad_to_program(batch: Batch, *, rows: int, seq_len: int, pad_id: int) -> Batch:
    """Right-pad a (b, t) batch to the program's (rows, seq_len); extra rows carry no labels."""
    b, t = batch.input_ids.shape
    if b > rows or t > seq_len:
        raise ValueError(f"batch {b}x{t} exceeds the exported {rows}x{seq_len}; re-export with "
                         "a larger client.micro_batch or data.max_length")
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, seq_len), dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE, dtype=torch.long)
    ids[:b, :t], mask[:b, :t], labels[:b, :t] = (batch.input_ids, batch.attention_mask,
                                                 batch.labels)
    return Batch(ids, mask, labels)


class _Runtime:
    """The loaded programs of one local training and the adapter tensors they update."""

    def __init__(self, programs: PhonePrograms, adapter_ptd: bytes) -> None:
        self.manifest = programs.manifest
        self.names = [t.program_key for t in self.manifest.adapter]
        state = ptd_to_adapter(self.manifest, adapter_ptd)  # refuses a .ptd for other programs
        self.adapter = [state[k] for k in self.manifest.peft_keys()]
        self._ptd = adapter_ptd  # kept referenced: the runtime reads the buffer, it does not copy
        self.train = TrainingModule(_load_for_executorch_from_buffer(programs.train, self._ptd))
        self.adamw = _load_for_executorch_from_buffer(programs.adamw)
        self.dp_grad = (None if programs.dp_grad is None
                        else _load_for_executorch_from_buffer(programs.dp_grad))
        self.exp_avg = [torch.zeros_like(t) for t in self.adapter]
        self.exp_avg_sq = [torch.zeros_like(t) for t in self.adapter]
        self.steps = 0

    def gradients(self, part: Batch, real: int, weight: float) -> tuple[list[torch.Tensor],
                                                                        torch.Tensor]:
        """Gradients of sum_i weight * loss_i over the `real` leading rows of one padded
        micro-batch (padded rows weigh 0), and that weighted loss."""
        rows = self.manifest.micro_batch
        weights = torch.zeros(rows)
        weights[:real] = weight
        loss = self.train.forward_backward("forward", (part.input_ids, part.attention_mask,
                                                       part.labels, weights))[0]
        named = self.train.named_gradients()
        return [named[n].clone() for n in self.names], loss

    def dp_gradients(self, part: Batch, noise: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                             torch.Tensor]:
        assert self.dp_grad is not None
        out = self.dp_grad.run_method("forward", (*self.adapter, part.input_ids,
                                                  part.attention_mask, part.labels, *noise))
        return [t.clone() for t in out[:-1]], out[-1].clone()

    def apply_adamw(self, grads: list[torch.Tensor]) -> None:
        self.steps += 1
        n = len(self.adapter)
        out = self.adamw.run_method("forward", (torch.tensor(float(self.steps)), *self.adapter,
                                                *grads, *self.exp_avg, *self.exp_avg_sq))
        self.adapter = [t.clone() for t in out[:n]]
        self.exp_avg = [t.clone() for t in out[n:2 * n]]
        self.exp_avg_sq = [t.clone() for t in out[2 * n:]]
        if self.train.named_params is not None:  # write the new adapter into the program
            params = self.train.named_parameters()
            for name, value in zip(self.names, self.adapter, strict=True):
                params[name].copy_(value)


def train_with_programs(programs: PhonePrograms, adapter_ptd: bytes, examples: list[Example],
                        job: TrainJob, *, pad_id: int) -> tuple[bytes, JobResult]:
    """Run one `TrainJob` through ExecuTorch: the phone's loop, step for step the eager
    `fedmilm.training.local.train_local` (same batch plan, AdamW, Opacus clipping and noise
    draws for the same seed). Returns the trained adapter as a `.ptd` and the job's result."""
    manifest = programs.manifest
    if job.dp and programs.dp_grad is None:
        raise ValueError(f"{programs.folder} has no dp_grad.pte; re-export with sample-level DP")
    if not examples:
        raise ValueError("no training examples on this phone")
    runtime = _Runtime(programs, adapter_ptd)
    # Shuffling (no DP) follows the job's seed; DP-SGD's masks and noise come from the phone's
    # CSPRNG unless a virtual phone in a test asked for reproducible DP with `seed`.
    seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(7), "little")
    generator = torch.Generator().manual_seed(seed)
    private = private_random(job.seed) if job.dp else None
    plan = batch_plan(examples, epochs=job.epochs, batch_size=job.batch_size, pad_id=pad_id,
                      generator=generator, poisson=private)
    rows, seq_len = manifest.micro_batch, manifest.seq_len
    started = time.perf_counter()
    loss_sum, done, seen, tokens = 0.0, 0, 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in plan:
            done += 1
            noise = None
            if private is not None:  # Opacus's draw order: one N(0, std) per tensor, per step
                std = float(job.noise_multiplier) * float(job.max_grad_norm)  # type: ignore
                noise = [private.normal(t.shape, std) for t in runtime.adapter]
            if batch is None:  # empty Poisson draw: a noise-only step, as the accountant assumes
                assert noise is not None
                runtime.apply_adamw([z / job.batch_size for z in noise])
                continue
            b = batch.input_ids.size(0)
            total: list[torch.Tensor] | None = None
            for index, part in enumerate(micro_batches(batch, rows)):
                padded = pad_to_program(part, rows=rows, seq_len=seq_len, pad_id=pad_id)
                if noise is None:
                    grads, loss = runtime.gradients(padded, part.input_ids.size(0), 1.0 / b)
                    loss_sum += float(loss) * b
                else:
                    step_noise = noise if index == 0 else [torch.zeros_like(z) for z in noise]
                    grads, losses = runtime.dp_gradients(padded, step_noise)
                    loss_sum += float(losses.sum())
                total = grads if total is None else [t + g for t, g in zip(total, grads,
                                                                          strict=True)]
            assert total is not None
            runtime.apply_adamw(total)
            seen += b
            tokens += int(batch.attention_mask.sum())
    result_ptd = adapter_to_ptd(manifest, dict(zip(manifest.peft_keys(), runtime.adapter,
                                                   strict=True)))
    return result_ptd, JobResult(steps=done, examples=seen, tokens=tokens,
                                 loss=loss_sum / max(seen, 1),
                                 seconds=time.perf_counter() - started)
