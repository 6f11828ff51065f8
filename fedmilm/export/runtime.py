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
from fedmilm.training.skeleton import DpNoise, run_steps


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


class ExecuTorchEngine:
    """The skeleton's arithmetic through the loaded programs; the adapter tensors they update."""

    def __init__(self, programs: PhonePrograms, adapter_ptd: bytes, *, batch_size: int) -> None:
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
        self.batch_size, self.steps = batch_size, 0
        self.total: list[torch.Tensor] | None = None

    def adapter_shapes(self) -> list[torch.Size]:
        return [t.shape for t in self.adapter]

    def accumulate(self, part: Batch, *, rows: int, dp: bool) -> float:
        real = part.input_ids.size(0)
        padded = pad_to_program(part, rows=self.manifest.micro_batch,
                                seq_len=self.manifest.seq_len,
                                pad_id=int(self.manifest.tokenizer["pad_token_id"]))
        if dp:  # (sum of clipped per-example gradients) / expected batch; the noise comes in step
            assert self.dp_grad is not None
            zeros = [torch.zeros_like(t) for t in self.adapter]
            out = self.dp_grad.run_method("forward", (*self.adapter, padded.input_ids,
                                                      padded.attention_mask, padded.labels,
                                                      *zeros))
            grads, loss_sum = [t.clone() for t in out[:-1]], float(out[-1].sum())
        else:  # gradients of sum_i loss_i / rows over the real rows; padded rows weigh 0
            weights = torch.zeros(self.manifest.micro_batch)
            weights[:real] = 1.0 / rows
            loss = self.train.forward_backward("forward", (padded.input_ids,
                                                           padded.attention_mask,
                                                           padded.labels, weights))[0]
            named = self.train.named_gradients()
            grads, loss_sum = [named[n].clone() for n in self.names], float(loss) * rows
        self.total = grads if self.total is None else [t + g for t, g in zip(self.total, grads,
                                                                             strict=True)]
        return loss_sum

    def step(self, noise: list[torch.Tensor] | None) -> None:
        grads = self.total if self.total is not None else [torch.zeros_like(t)
                                                           for t in self.adapter]
        if noise is not None:
            grads = [g + z / self.batch_size for g, z in zip(grads, noise, strict=True)]
        self.total = None
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
                        job: TrainJob) -> tuple[bytes, JobResult]:
    """Run one `TrainJob` through ExecuTorch with the shared skeleton: the same batch plan,
    AdamW, Opacus clipping and noise draws as the eager phone for the same seed. Returns the
    trained adapter as a `.ptd` and the job's result."""
    manifest = programs.manifest
    if job.dp and programs.dp_grad is None:
        raise ValueError(f"{programs.folder} has no dp_grad.pte; re-export with sample-level DP")
    engine = ExecuTorchEngine(programs, adapter_ptd, batch_size=job.batch_size)
    # Shuffling (no DP) follows the job's seed; DP-SGD's masks and noise come from the phone's
    # CSPRNG unless a virtual phone in a test asked for reproducible DP with `seed`.
    seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(7), "little")
    dp = None
    if job.dp:
        assert job.noise_multiplier is not None and job.max_grad_norm is not None
        dp = DpNoise(job.noise_multiplier, job.max_grad_norm, private_random(job.seed))
    stats = run_steps(engine, examples, epochs=job.epochs, batch_size=job.batch_size,
                      pad_id=int(manifest.tokenizer["pad_token_id"]), seed=seed, dp=dp,
                      micro_batch=manifest.micro_batch)
    result_ptd = adapter_to_ptd(manifest, dict(zip(manifest.peft_keys(), engine.adapter,
                                                   strict=True)))
    return result_ptd, JobResult(steps=stats.steps, examples=stats.examples,
                                 tokens=stats.tokens, loss=stats.loss, seconds=stats.seconds)
