"""Fit one phone's local training into a memory budget.

The phone picks the largest micro-batch (gradients accumulate to the full batch, so training is
unchanged) and turns on gradient checkpointing only when no micro-batch fits without it. The
estimate is analytic, from the loaded model's own shapes, and deliberately conservative; it is
checked against measured peak RSS in `benchmarks/memory_budget.py` (see BENCHMARKS.md).

Checkpointing is re-entrant (`use_reentrant=True` plus input gradients): Opacus's per-example
hooks fail under transformers' default non-re-entrant checkpointing
(`../shared/notes/performance-facts.md`), and with re-entrant mode the clipped gradients are
bit-identical to no checkpointing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedmilm.config.schema import FedMilmConfig
from fedmilm.model.quantize import QuantizedLinear, stored_bytes

MIB = 2**20
RUNTIME_BYTES = 512 * MIB  # Python + torch + transformers + peft + opacus: 424 MiB measured
SAFETY = 1.3               # headroom over the per-token activation count below
MARGIN_BYTES = 256 * MIB   # what the measured resident size cannot see yet and what varies:
                           # a DP step's first-use costs (Opacus hooks, the CSPRNG, autograd
                           # threads) and allocator scratch; peak minus estimate moved
                           # by up to 102 MiB between runs of one plan; another machine measured
                           # 41-56 MiB above an earlier 1.3B estimate
DEQUANTIZED_COPIES = 3     # float copies of a quantized layer alive while it runs (measured
                           # peaks on 2048 x 5504: int8 1.4, NF4 1.7-2.6)


class MemoryBudgetError(ValueError):
    """No micro-batch and checkpointing choice fits the phone's budget."""


@dataclass(frozen=True)
class MemoryPlan:
    """How the phone trains: rows per forward/backward and whether to checkpoint."""

    micro_batch: int
    checkpointing: bool
    estimated_bytes: int


def _shapes(model: torch.nn.Module) -> tuple[int, int, int, int]:
    config = model.config
    return (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.vocab_size)


def _lora_inputs(model: torch.nn.Module) -> int:
    """Sum of in_features of trainable LoRA A matrices: Opacus keeps each one's input."""
    return sum(p.shape[1] for k, p in model.named_parameters()
               if p.requires_grad and ".lora_A." in k)


def estimate_peak_bytes(model: torch.nn.Module, *, micro_batch: int, seq_len: int,
                        checkpointing: bool, dp: bool, resident: int | None = None) -> int:
    """Peak resident bytes of one local training step (a Llama-style decoder).

    What the process already holds (`resident`: its measured size with the model loaded, never
    taken below the runtime constant plus the weights, which a memory-mapped base may not have
    paged in yet) + the adapter (fp32) with its gradient and AdamW moments + activations kept
    for the backward pass per token: per layer ~30 h + 8 i bytes in 16-bit activations (norms
    upcast to fp32, q/k/v, rotary, attention output, the MLP's four i-wide tensors), or only
    each layer's input when checkpointing (plus one layer recomputed), and the logits path
    (~16 bytes per vocabulary entry: 16-bit logits, fp32 copy, log-softmax and its gradient).
    DP adds each LoRA input in fp32 and per-example gradients. A quantized base adds the float
    copies of the layer being dequantized; a fixed margin covers what varies between machines.
    """
    hidden, inter, layers, vocab = _shapes(model)
    act = model.get_input_embeddings().weight.element_size()  # the frozen base's dtype
    held = RUNTIME_BYTES + weight_bytes(model)
    if resident is not None:
        held = max(held, resident)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    layer = (15 * hidden + 4 * inter) * act
    per_token = (hidden * act * layers + layer if checkpointing else layer * layers)
    per_token += 16 * vocab
    if dp:
        per_token += 4 * _lora_inputs(model)
    tokens = micro_batch * seq_len
    per_example = 2 * trainable * micro_batch if dp else 0
    return int(held + 3 * trainable + per_example + SAFETY * per_token * tokens
               + DEQUANTIZED_COPIES * _dequantized_layer(model, act) + MARGIN_BYTES)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights hold (a quantized base counts at its stored size)."""
    return sum(stored_bytes(p) for p in model.parameters())


def _dequantized_layer(model: torch.nn.Module, act: int) -> int:
    """A quantized base dequantizes one linear at a time (forward and backward): the largest."""
    return max((m.in_features * m.out_features * act for m in model.modules()
                if isinstance(m, QuantizedLinear)), default=0)


def plan_memory(model: torch.nn.Module, *, budget_mb: float | None, batch_size: int,
                seq_len: int, micro_batch: int | None, checkpointing: str,
                dp: bool, resident: int | None = None) -> MemoryPlan:
    """The plan for `client.*` settings. Without a budget: the configured micro-batch (or the
    whole batch) and checkpointing only if asked. With one: the largest micro-batch up to that,
    without checkpointing if possible (re-computation costs 1.2-1.5x time), else with it (unless
    `checkpointing="off"`). Raises `MemoryBudgetError` if nothing fits. `resident`: what the
    process measurably holds now (`resident_bytes()` on the phone itself)."""
    largest = min(micro_batch or batch_size, batch_size)

    def need(rows: int, on: bool) -> int:
        return estimate_peak_bytes(model, micro_batch=rows, seq_len=seq_len, checkpointing=on,
                                   dp=dp, resident=resident)

    if budget_mb is None:
        on = checkpointing == "on"
        return MemoryPlan(largest, on, need(largest, on))
    choices = {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    budget = int(budget_mb * MIB)
    for on in choices:
        for rows in range(largest, 0, -1):
            if need(rows, on) <= budget:
                return MemoryPlan(rows, on, need(rows, on))
    smallest = need(1, choices[-1])
    weights = weight_bytes(model)
    raise MemoryBudgetError(
        f"client.memory_budget_mb={budget_mb:g} is too small: even micro-batch 1 "
        f"{'with' if choices[-1] else 'without'} gradient checkpointing needs an estimated "
        f"{smallest / MIB:.0f} MiB (model weights alone {weights / MIB:.0f} MiB, sequence length "
        f"{seq_len}); raise the budget, shorten data.max_length, use a bfloat16 or quantized base"
        + (" or allow client.gradient_checkpointing=auto" if checkpointing == "off" else ""))


def plan_for(cfg: FedMilmConfig, model: torch.nn.Module, *,
             resident: int | None = None) -> MemoryPlan:
    """`plan_memory` for a run config's `client.*`, `train.batch_size` and `data.max_length`."""
    client = cfg.client
    return plan_memory(model, budget_mb=client.memory_budget_mb,
                       batch_size=cfg.train.batch_size, seq_len=cfg.data.max_length,
                       micro_batch=client.micro_batch,
                       checkpointing=client.gradient_checkpointing,
                       dp=cfg.privacy.sample_level, resident=resident)


def resident_bytes() -> int | None:
    """This process's resident size now (Linux and Android: /proc), else None. The phone plans
    from it: the runtime's real footprint on this device, not a constant from another one."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def reset_peak() -> None:
    """Linux: restart this process's peak-RSS mark at its current RSS (measurements only)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def peak_bytes() -> int:
    """Linux: this process's peak RSS since the last `reset_peak` (VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Re-entrant checkpointing of every decoder layer for the duration, then off again (the
    cached model serves other phones)."""
    if not enabled:
        yield
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    try:
        yield
    finally:
        base.gradient_checkpointing_disable()
        base.disable_input_require_grads()
