"""Export a phone's training programs, initial adapter, tokenizer and manifest into a folder.

Layout (all written to a temporary folder, then renamed into place):
  manifest.json   methods, tensor order and shapes, PEFT key mapping, hyper-parameters, versions
  train.pte       joint forward/backward over one micro-batch (TrainingModule, method `forward`)
  adapter.ptd     the trainable adapter tensors `train.pte` loads (the server rewrites this file)
  adamw.pte       one AdamW update of the adapter tensors
  dp_grad.pte     (with DP-SGD) per-example gradients, clipping, supplied noise
  tokenizer/      the tokenizer files and chat template
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from fedmilm.adapters.space import AdapterSpace
from fedmilm.config import FedMilmConfig
from fedmilm.export import graphs
from fedmilm.export.lower import to_executorch
from fedmilm.export.manifest import (
    FORMAT_VERSION,
    AdapterTensor,
    Manifest,
    ProgramSpec,
    TensorSpec,
)
from fedmilm.export.ptd import read_ptd, write_ptd

log = logging.getLogger("fedmilm.export")
WRAPPER_PREFIX = "model."  # `graphs.WeightedLoss` holds the PEFT model as `self.model`
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW defaults, which the eager phone uses


@dataclass(frozen=True)
class ExportTimings:
    """Seconds per stage and bytes per file, for users and benchmarks."""

    seconds: dict[str, float]
    sizes: dict[str, int]


def micro_batch_of(cfg: FedMilmConfig) -> int:
    """The exported micro-batch: `client.micro_batch`, else the whole training batch."""
    return cfg.client.micro_batch or cfg.train.batch_size


def export_fingerprint(cfg: FedMilmConfig) -> str:
    """Hash of everything the programs depend on: model, LoRA, personalisation, training
    hyper-parameters, seed (random bases, FFA's frozen A), shapes and the DP clipping bound.
    A bundle is used only when this matches the run's config."""
    sample = cfg.privacy.sample
    model = dataclasses.replace(cfg.model, cache_dir="")  # a host's cache path is not the model
    relevant = (model, cfg.lora, cfg.personalization, cfg.train, cfg.seed,
                cfg.data.max_length, micro_batch_of(cfg),
                (cfg.privacy.sample_level, sample.max_grad_norm))
    return hashlib.sha256(repr(relevant).encode()).hexdigest()[:16]


def ensure_bundle(space: AdapterSpace, cfg: FedMilmConfig, run_dir: Path) -> Path:
    """The bundle the phones of this run train with: `client.export_dir` if given (it must
    match this config), else `RUN_DIR/export`, exported now unless a matching one is there
    (a resumed run)."""
    wanted = export_fingerprint(cfg)
    if cfg.client.export_dir:
        folder = Path(cfg.client.export_dir).expanduser().resolve()
        found = Manifest.read(folder).config_fingerprint
        if found != wanted:
            raise ValueError(f"client.export_dir={folder} was exported for another config "
                             f"(fingerprint {found}, this run needs {wanted}); run "
                             "fedmilm-export with this run's overrides")
        return folder
    folder = run_dir / "export"
    if folder.is_dir():
        try:
            if Manifest.read(folder).config_fingerprint == wanted:
                return folder
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale: export again
    log.info("exporting the ExecuTorch training programs into %s (once per run)", folder)
    space.load(space.initial_state(tuple(space.initial)))
    _, timings = export_bundle(space, cfg, folder)
    log.info("exported in %.1f s: %s", sum(timings.seconds.values()),
             ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in timings.sizes.items()))
    return folder


def _spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name=name, shape=list(tensor.shape), dtype=str(tensor.dtype).split(".")[1])


def _batch_specs(micro_batch: int, seq_len: int) -> list[TensorSpec]:
    ids, mask, labels = graphs.batch_inputs(micro_batch, seq_len)
    return [_spec("input_ids", ids), _spec("attention_mask", mask), _spec("labels", labels)]



def export_bundle(space: AdapterSpace, cfg: FedMilmConfig, out: Path, *,
                  with_dp: bool | None = None) -> tuple[Manifest, ExportTimings]:
    """Export `space` (at its current adapter values) for `cfg` into `out`.

    `with_dp` (default: whether sample-level DP is configured) adds `dp_grad.pte`.
    """
    with_dp = cfg.privacy.sample_level if with_dp is None else with_dp
    if cfg.model.dtype == "bfloat16":
        log.warning("exporting a bfloat16 base: ExecuTorch 1.5.1 runs bf16 matrix products with "
                    "its portable kernels, ~10x slower than float32 on this CPU "
                    "(BENCHMARKS.md); model.dtype=float32 is the faster choice for "
                    "client.runtime=executorch")
    micro, seq_len = micro_batch_of(cfg), cfg.data.max_length
    params = dict(zip(space.initial, space.trainable_parameters(), strict=True))
    keys = list(params)
    adapter = {k: p.detach().to(torch.float32).clone() for k, p in params.items()}
    seconds: dict[str, float] = {}
    files: dict[str, bytes] = {}

    started = time.perf_counter()
    joint = graphs.train_graph(space.model, micro_batch=micro, seq_len=seq_len)
    seconds["train_graph"] = time.perf_counter() - started
    started = time.perf_counter()
    files["train.pte"], ptd = to_executorch(joint, external_weights=True)
    seconds["train_lower"] = time.perf_counter() - started
    program_keys = {k: WRAPPER_PREFIX + k for k in keys}
    if ptd is None or set(read_ptd(ptd)) != set(program_keys.values()):
        raise RuntimeError("ExecuTorch named the program's adapter tensors differently than "
                           "expected; this ExecuTorch version is not supported")
    files["adapter.ptd"] = write_ptd({program_keys[k]: adapter[k] for k in keys})

    started = time.perf_counter()
    files["adamw.pte"], _ = to_executorch(graphs.adamw_graph(
        [t.shape for t in adapter.values()], lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay))
    seconds["adamw"] = time.perf_counter() - started

    if with_dp:
        started = time.perf_counter()
        files["dp_grad.pte"], _ = to_executorch(graphs.dp_grad_graph(
            space.model, adapter, micro_batch=micro, seq_len=seq_len,
            max_grad_norm=cfg.privacy.sample.max_grad_norm, expected_batch=cfg.train.batch_size))
        seconds["dp_grad"] = time.perf_counter() - started

    tensors = [AdapterTensor(peft_key=k, program_key=program_keys[k],
                             shape=list(adapter[k].shape),
                             part="global" if k in space.global_keys else "personal")
               for k in keys]
    manifest = _manifest(space, cfg, adapter, tensors, micro=micro, seq_len=seq_len,
                         with_dp=with_dp)
    manifest = dataclasses.replace(manifest, sha256={
        name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()
        if name.endswith(".pte")})
    sizes = _write_atomically(out, files, manifest, space)
    return manifest, ExportTimings(seconds=seconds, sizes=sizes)


def _manifest(space: AdapterSpace, cfg: FedMilmConfig, adapter: dict[str, torch.Tensor],
              tensors: list[AdapterTensor], *, micro: int, seq_len: int,
              with_dp: bool) -> Manifest:
    per_tensor = [_spec(t.peft_key, adapter[t.peft_key]) for t in tensors]
    weight = TensorSpec("example_weight", [micro], "float32")
    loss = TensorSpec("loss", [], "float32")

    def renamed(prefix: str) -> list[TensorSpec]:
        return [TensorSpec(f"{prefix}:{s.name}", s.shape, s.dtype) for s in per_tensor]

    programs = {
        "train": ProgramSpec(
            file="train.pte", method="forward", data_file="adapter.ptd",
            inputs=[*_batch_specs(micro, seq_len), weight], outputs=[loss],
            description="sum_i example_weight_i * loss_i (mean next-token cross-entropy of row "
                        "i over its labelled tokens); TrainingModule.forward_backward gives the "
                        "gradients of the adapter tensors (program keys), named_parameters() "
                        "are them in place"),
        "adamw": ProgramSpec(
            file="adamw.pte", method="forward",
            inputs=[TensorSpec("step", [], "float32"), *renamed("param"), *renamed("grad"),
                    *renamed("exp_avg"), *renamed("exp_avg_sq")],
            outputs=[*renamed("param"), *renamed("exp_avg"), *renamed("exp_avg_sq")],
            description="one torch.optim.AdamW step; step counts from 1; start the moments "
                        "at zero each round"),
    }
    dp = None
    if with_dp:
        dp = {"max_grad_norm": cfg.privacy.sample.max_grad_norm,
              "expected_batch_size": cfg.train.batch_size}
        programs["dp_grad"] = ProgramSpec(
            file="dp_grad.pte", method="forward",
            inputs=[*renamed("param"), *_batch_specs(micro, seq_len), *renamed("noise")],
            outputs=[*renamed("grad"), TensorSpec("losses", [micro], "float32")],
            description="(sum_i clip(g_i, max_grad_norm) + noise) / expected_batch_size; "
                        "noise = noise_multiplier * max_grad_norm * N(0, 1) on one micro-batch "
                        "of a step and zeros on the others; padded rows need no labels")
    tok = space.tokenizer
    return Manifest(
        format_version=FORMAT_VERSION,
        model={"name": cfg.model.name, "source": cfg.model.source, "dtype": cfg.model.dtype},
        tokenizer={"folder": "tokenizer", "pad_token_id": tok.pad_token_id,
                   "eos_token_id": tok.eos_token_id, "vocab_size": len(tok),
                   "label_ignore_index": -100},
        lora={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules":
              list(cfg.lora.target_modules), "variant": cfg.lora.variant},
        personalization=cfg.personalization.mode,
        seq_len=seq_len, micro_batch=micro,
        hyper_parameters={"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
                          "betas": list(BETAS), "eps": EPS, "epochs": cfg.train.epochs,
                          "batch_size": cfg.train.batch_size},
        dp=dp, adapter=tensors, programs=programs,
        versions={name: version(name) for name in ("fedmilm", "torch", "executorch", "peft",
                                                    "transformers")},
        config_fingerprint=export_fingerprint(cfg),
        notes=["Right-pad every row to seq_len with pad_token_id, attention_mask 0 and label "
               "-100; pad missing rows the same way with example_weight 0.",
               "Labels are the input ids on assistant tokens and -100 elsewhere (the model's "
               "chat template; see tokenizer/)."])


def _write_atomically(out: Path, files: dict[str, bytes], manifest: Manifest,
                      space: AdapterSpace) -> dict[str, int]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, blob in files.items():
        (staging / name).write_bytes(blob)
    space.tokenizer.save_pretrained(str(staging / "tokenizer"))
    manifest.write(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return {name: len(blob) for name, blob in files.items()}
