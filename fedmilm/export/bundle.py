"""Export a phone's training programs, initial adapter, tokenizer and manifest into a folder.

Layout (all written to a temporary folder, then renamed into place):
  manifest.json   methods, tensor order and shapes, PEFT keys, hyper-parameters, versions, hashes
  base.ptd        the frozen base (int8 decoder linears with model.quantization=int8), shipped
                  once and loaded by every model program below
  train.pte       adapter gradients over one micro-batch (adapter tensors are inputs)
  eval.pte        summed held-out loss and token count over one micro-batch
  dp_grad.pte     (with DP-SGD) per-example gradients, clipping, supplied noise
  adamw.pte       one AdamW update of the adapter tensors
  adapter.ptd     the initial adapter tensors (the server sends each round's the same way)
  tokenizer/      the tokenizer files and chat template
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch.export import ExportedProgram

from fedmilm.adapters.space import AdapterSpace
from fedmilm.config import FedMilmConfig
from fedmilm.export import graphs
from fedmilm.export.lower import to_executorch
from fedmilm.export.manifest import (
    FORMAT_VERSION,
    INITIAL_ADAPTER,
    AdapterTensor,
    BaseSpec,
    Manifest,
    ProgramSpec,
    TensorSpec,
)
from fedmilm.export.ptd import write_ptd

log = logging.getLogger("fedmilm.export")
BASE_FILE = "base.ptd"
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW defaults, which the eager phone uses


@dataclass(frozen=True)
class ExportTimings:
    """Seconds per stage and bytes per file, for users and benchmarks."""

    seconds: dict[str, float]
    sizes: dict[str, int]
    planned: dict[str, int]  # program -> working memory ExecuTorch planned for it


def micro_batch_of(cfg: FedMilmConfig) -> int:
    """The exported micro-batch: `client.micro_batch`, else the whole training batch."""
    return cfg.client.micro_batch or cfg.train.batch_size


def export_fingerprint(cfg: FedMilmConfig) -> str:
    """Hash of everything the programs depend on: model, LoRA, personalisation, training
    hyper-parameters, seed (random bases, FFA's frozen A), shapes and the DP clipping bound.
    A bundle is used only when this matches the run's config."""
    sample = cfg.privacy.sample
    model = dataclasses.replace(cfg.model, cache_dir="")  # a host's cache path is not the model
    # (model.quantization is part of it: the base file holds the quantized weights)
    relevant = (model, cfg.lora, cfg.personalization, cfg.train, cfg.seed,
                cfg.data.max_length, micro_batch_of(cfg), cfg.client.delegate,
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
    """Export `space` for `cfg` into `out` (`adapter.ptd`: the adapter's initial values).

    `with_dp` (default: whether sample-level DP is configured) adds `dp_grad.pte`.
    """
    with_dp = cfg.privacy.sample_level if with_dp is None else with_dp
    if cfg.model.dtype == "bfloat16":
        log.warning("exporting a bfloat16 base: ExecuTorch 1.5.1 runs bf16 matrix products with "
                    "its portable kernels, ~10x slower than float32 on this CPU "
                    "(BENCHMARKS.md); model.dtype=float32 is the faster choice for "
                    "client.runtime=executorch")
    if cfg.client.delegate == "xnnpack":
        log.info("lowering with XNNPACK (client.delegate=xnnpack) needs about twice the memory "
                 "and four times the time of lowering without a delegate: the default model "
                 "peaked at 14.4 GiB; milm-1.3b did not fit in 24 GiB (use client.delegate=none "
                 "there; BENCHMARKS.md)")
    micro, seq_len = micro_batch_of(cfg), cfg.data.max_length
    params = dict(zip(space.initial, space.trainable_parameters(), strict=True))
    adapter = {k: p.detach().to(torch.float32).clone() for k, p in params.items()}
    seconds: dict[str, float] = {}
    files: dict[str, bytes] = {}
    bases: dict[str, bytes] = {}
    planned: dict[str, int] = {}

    def lowered(name: str, build: Callable[[], ExportedProgram]) -> None:
        started = time.perf_counter()
        program = build()
        seconds[f"{name}_graph"] = time.perf_counter() - started
        started = time.perf_counter()
        lowered_program = to_executorch(program, delegate="none" if name == "adamw"
                                        else cfg.client.delegate)
        seconds[f"{name}_lower"] = time.perf_counter() - started
        files[f"{name}.pte"] = lowered_program.pte
        planned[name] = lowered_program.planned_bytes
        if lowered_program.base is not None:
            bases[name] = lowered_program.base

    shape = {"micro_batch": micro, "seq_len": seq_len}
    lowered("train", lambda: graphs.train_graph(space.model, adapter, **shape))
    lowered("eval", lambda: graphs.eval_graph(space.model, adapter, **shape))
    if with_dp:
        lowered("dp_grad", lambda: graphs.dp_grad_graph(
            space.model, adapter, **shape, max_grad_norm=cfg.privacy.sample.max_grad_norm,
            expected_batch=cfg.train.batch_size))
    lowered("adamw", lambda: graphs.adamw_graph([t.shape for t in adapter.values()],
                                                lr=cfg.train.lr,
                                                weight_decay=cfg.train.weight_decay))
    files[BASE_FILE] = _one_base(bases)
    files[INITIAL_ADAPTER] = write_ptd({k: space.initial[k] for k in adapter})

    tensors = [AdapterTensor(peft_key=k, program_key=k, shape=list(adapter[k].shape),
                             part="global" if k in space.global_keys else "personal")
               for k in adapter]
    base = BaseSpec(file=BASE_FILE, sha256=hashlib.sha256(files[BASE_FILE]).hexdigest(),
                    size=len(files[BASE_FILE]), dtype=cfg.model.dtype,
                    quantization=cfg.model.quantization)
    manifest = _manifest(space, cfg, adapter, tensors, base, micro=micro, seq_len=seq_len,
                         with_dp=with_dp)
    manifest = dataclasses.replace(manifest, sha256={
        name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()
        if name != BASE_FILE},  # the base's digest is in `base`
        programs={name: dataclasses.replace(spec, planned_bytes=planned[name])
                  for name, spec in manifest.programs.items()})
    sizes = _write_atomically(out, files, manifest, space)
    return manifest, ExportTimings(seconds=seconds, sizes=sizes, planned=planned)


def _one_base(bases: dict[str, bytes]) -> bytes:
    """The base file all model programs wrote: they must agree byte for byte, or one program
    would run against weights it was not exported with."""
    digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in bases.items()}
    if len(set(digests.values())) != 1 or "train" not in bases:
        raise RuntimeError(f"the exported programs disagree about the frozen base ({digests}); "
                           "this model or ExecuTorch version is not supported")
    return bases["train"]


def _manifest(space: AdapterSpace, cfg: FedMilmConfig, adapter: dict[str, torch.Tensor],
              tensors: list[AdapterTensor], base: BaseSpec, *, micro: int, seq_len: int,
              with_dp: bool) -> Manifest:
    per_tensor = [_spec(t.peft_key, adapter[t.peft_key]) for t in tensors]
    weight = TensorSpec("example_weight", [micro], "float32")
    loss = TensorSpec("loss", [], "float32")

    def renamed(prefix: str) -> list[TensorSpec]:
        return [TensorSpec(f"{prefix}:{s.name}", s.shape, s.dtype) for s in per_tensor]

    programs = {
        "train": ProgramSpec(
            file="train.pte", method="forward", data_file=base.file,
            inputs=[*renamed("param"), *_batch_specs(micro, seq_len), weight],
            outputs=[*renamed("grad"), loss],
            description="gradients of sum_i example_weight_i * loss_i (mean next-token "
                        "cross-entropy of row i over its labelled tokens) with respect to the "
                        "adapter tensors, and that sum"),
        "eval": ProgramSpec(
            file="eval.pte", method="forward", data_file=base.file,
            inputs=[*renamed("param"), *_batch_specs(micro, seq_len)],
            outputs=[TensorSpec("loss_sum", [], "float32"), TensorSpec("tokens", [], "int64")],
            description="summed next-token cross-entropy over labelled positions and their "
                        "count; held-out loss = total loss_sum / total tokens. All lora_B "
                        "tensors zero give the base model's loss"),
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
            file="dp_grad.pte", method="forward", data_file=base.file,
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
        dp=dp, adapter=tensors, base=base, programs=programs,
        versions={name: version(name) for name in ("fedmilm", "torch", "executorch", "peft",
                                                    "transformers")},
        config_fingerprint=export_fingerprint(cfg), delegate=cfg.client.delegate,
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
