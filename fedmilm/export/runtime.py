"""The virtual phone: local training and evaluation that run only the exported programs, through
ExecuTorch's runtime (the C++ runtime and kernels the Android library wraps), never the PyTorch
model.

Training runs the shared step skeleton (`fedmilm.training.skeleton`) with an `ExecuTorchEngine`:
same batch plan, same AdamW, same Opacus clipping and noise draws as the eager phone, so on the
same data and seed its update matches within float tolerance. What differs is only where the
arithmetic runs.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from executorch.extension.pybindings import portable_lib
from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

from fedmilm.data.chat import IGNORE, Batch, Example, batches
from fedmilm.export.job import JobResult, TrainJob
from fedmilm.export.manifest import INITIAL_ADAPTER, Manifest, inside
from fedmilm.export.ptd import adapter_to_ptd, ptd_to_adapter
from fedmilm.privacy.randomness import private_random
from fedmilm.training.skeleton import DpNoise, run_steps

BACKENDS = {"xnnpack": "XnnpackBackend"}  # client.delegate -> the runtime's backend name


class PhonePrograms:
    """An exported bundle in memory: what a phone downloads once. Programs are loaded into
    ExecuTorch on first use; they all read the one base buffer. Of the model programs (train,
    eval, dp_grad) only the one in use stays loaded: each holds its planned working memory
    (1.56 GiB for a 2 x 128 backward pass at 1.3B), so a phone's peak is the base plus the
    largest of them, not their sum. Switching reloads a program (the base is not copied),
    twice a round."""

    def __init__(self, folder: Path, manifest: Manifest, programs: dict[str, bytes],
                 base: bytes, initial: dict[str, torch.Tensor]) -> None:
        self.folder, self.manifest = folder, manifest
        self._programs, self._base = programs, base  # referenced: the runtime does not copy
        self.initial = initial  # every adapter tensor at its exported (initial) value
        self._loaded: dict[str, object] = {}

    @staticmethod
    def load(folder: Path) -> PhonePrograms:
        """Read a bundle, verifying every program and the base against the manifest's sha256
        (and programs against ExecuTorch's file identifier) before anything reaches the
        runtime: a corrupt, swapped or mismatched file is a clear `ValueError`, never a crashed
        process or a program running on weights it was not exported with."""
        folder = Path(folder)
        manifest = Manifest.read(folder)
        _check_backend(folder, manifest.delegate)
        programs = {name: _verified(folder, manifest, spec.file)
                    for name, spec in manifest.programs.items()}
        initial = ptd_to_adapter(manifest, _verified(folder, manifest, INITIAL_ADAPTER))
        return PhonePrograms(folder, manifest, programs, _verified_base(folder, manifest),
                             initial)

    @property
    def loaded(self) -> set[str]:
        """The programs loaded now (each holding its planned working memory)."""
        return set(self._loaded)

    def separate_module(self, name: str, **options):  # noqa: ANN003, ANN201
        """A copy of program `name` loaded apart from the kept ones, with ExecuTorch's load
        `options` (e.g. `enable_etdump=True` to profile it)."""
        data = self._base if self.manifest.programs[name].data_file else None
        return _load_for_executorch_from_buffer(self._programs[name], data, **options)

    def has(self, name: str) -> bool:
        return name in self._programs

    def module(self, name: str):  # noqa: ANN201 - ExecuTorch's module type is private
        """The loaded program `name` (train, eval, dp_grad, adamw)."""
        if name not in self._loaded:
            if self.manifest.programs[name].data_file:  # free the other model program first
                self._loaded = {n: m for n, m in self._loaded.items()
                                if not self.manifest.programs[n].data_file}
            self._loaded[name] = self.separate_module(name)
        return self._loaded[name]


def _check_backend(folder: Path, delegate: str) -> None:
    """A bundle lowered to a delegate runs only where the runtime has that backend built in
    (an Android library without XNNPACK would fail at the first step, not here)."""
    backend = BACKENDS.get(delegate)
    if delegate != "none" and (backend is None or backend not in
                               portable_lib._get_registered_backend_names()):
        raise ValueError(f"{folder} was exported with client.delegate={delegate}, which this "
                         "ExecuTorch runtime does not have; re-export with client.delegate=none")


def _verified(folder: Path, manifest: Manifest, name: str) -> bytes:
    """The bytes of bundle file `name`, checked against the manifest before any parsing."""
    blob = inside(folder, name, f"{folder}/manifest.json").read_bytes()
    expected = manifest.sha256.get(name)
    if expected is None or hashlib.sha256(blob).hexdigest() != expected:
        raise ValueError(f"{folder / name} does not match the sha256 in its manifest: the "
                         "bundle is corrupt or was altered; re-export it")
    if name.endswith(".pte") and not re.fullmatch(rb"ET[0-9]{2}", blob[4:8]):
        raise ValueError(f"{folder / name} is not an ExecuTorch program")
    return blob


def _verified_base(folder: Path, manifest: Manifest) -> bytes:
    """The base file, read once and checked against the manifest (size first: a wrong file
    is refused before it is read whole)."""
    spec = manifest.base
    path = inside(folder, spec.file, f"{folder}/manifest.json")
    if path.stat().st_size != spec.size:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, the manifest's base has "
                         f"{spec.size}: it is another model's base; re-export the bundle")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != spec.sha256:
        raise ValueError(f"{path} does not match the base's sha256 in the manifest: it is "
                         "another model's base or corrupt; re-export the bundle")
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

    def __init__(self, programs: PhonePrograms, adapter: list[torch.Tensor], *,
                 batch_size: int) -> None:
        self.manifest, self.programs = programs.manifest, programs
        self.adapter = adapter
        self.exp_avg = [torch.zeros_like(t) for t in adapter]
        self.exp_avg_sq = [torch.zeros_like(t) for t in adapter]
        self.batch_size, self.steps = batch_size, 0
        self.total: list[torch.Tensor] | None = None

    def adapter_shapes(self) -> list[torch.Size]:
        return [t.shape for t in self.adapter]

    def accumulate(self, part: Batch, *, rows: int, dp: bool) -> float:
        real = part.input_ids.size(0)
        padded = pad_to_program(part, rows=self.manifest.micro_batch,
                                seq_len=self.manifest.seq_len,
                                pad_id=int(self.manifest.tokenizer["pad_token_id"]))
        batch = (padded.input_ids, padded.attention_mask, padded.labels)
        if dp:  # (sum of clipped per-example gradients) / expected batch; the noise comes in step
            zeros = [torch.zeros_like(t) for t in self.adapter]
            out = self.programs.module("dp_grad").run_method("forward",
                                                             (*self.adapter, *batch, *zeros))
            loss_sum = float(out[-1].sum())
        else:  # gradients of sum_i loss_i / rows over the real rows; padded rows weigh 0
            weights = torch.zeros(self.manifest.micro_batch)
            weights[:real] = 1.0 / rows
            out = self.programs.module("train").run_method("forward",
                                                           (*self.adapter, *batch, weights))
            loss_sum = float(out[-1]) * rows
        grads = [t.clone() for t in out[:-1]]
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
        out = self.programs.module("adamw").run_method(
            "forward", (torch.tensor(float(self.steps)), *self.adapter, *grads, *self.exp_avg,
                        *self.exp_avg_sq))
        self.adapter = [t.clone() for t in out[:n]]
        self.exp_avg = [t.clone() for t in out[n:2 * n]]
        self.exp_avg_sq = [t.clone() for t in out[2 * n:]]


def heldout_loss(programs: PhonePrograms, adapter: Mapping[str, torch.Tensor],
                 examples: list[Example]) -> float:
    """Mean held-out loss per assistant token through the evaluation program, with every
    adapter tensor given (all lora_B zero: the base model's loss)."""
    manifest = programs.manifest
    inputs = [adapter[k] for k in manifest.peft_keys()]
    pad_id = int(manifest.tokenizer["pad_token_id"])
    total, count = 0.0, 0
    for batch in batches(examples, batch_size=manifest.micro_batch, pad_id=pad_id):
        padded = pad_to_program(batch, rows=manifest.micro_batch, seq_len=manifest.seq_len,
                                pad_id=pad_id)
        loss, tokens = programs.module("eval").run_method(
            "forward", (*inputs, padded.input_ids, padded.attention_mask, padded.labels))
        total, count = total + float(loss), count + int(tokens)
    if count == 0:
        raise ValueError("no assistant tokens to evaluate on (all truncated away?)")
    return total / count


def train_with_programs(programs: PhonePrograms, adapter_ptd: bytes, examples: list[Example],
                        job: TrainJob) -> tuple[bytes, JobResult]:
    """Run one `TrainJob` through ExecuTorch with the shared skeleton: the same batch plan,
    AdamW, Opacus clipping and noise draws as the eager phone for the same seed. Returns the
    trained adapter as a `.ptd` and the job's result."""
    manifest = programs.manifest
    if job.dp and not programs.has("dp_grad"):
        raise ValueError(f"{programs.folder} has no dp_grad.pte; re-export with sample-level DP")
    state = ptd_to_adapter(manifest, adapter_ptd)  # refuses a .ptd for other programs
    engine = ExecuTorchEngine(programs, [state[k] for k in manifest.peft_keys()],
                              batch_size=job.batch_size)
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
