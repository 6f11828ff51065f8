"""Heterogeneous LoRA ranks (HetLoRA-style zero-padding, Cho et al. 2024).

The server keeps the global adapter at the largest rank R. A phone of rank r < R trains the
first r rank components: rows of lora_A (r x in) and columns of lora_B (out x r). Its update is
zero-padded back to R, and each rank component is averaged over the phones that hold it, so
small phones do not dilute the components only large phones train. Every tier uses
alpha_r = alpha * r / R: the LoRA scaling alpha / r is the same for all, so a truncated adapter
is exactly the leading part of the full one.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedmilm.adapters.space import State
from fedmilm.config.schema import LoraConfig


def rank_axis(key: str) -> int | None:
    """Which axis of a LoRA tensor is the rank axis (None: not a LoRA factor)."""
    if "lora_A" in key:
        return 0
    if "lora_B" in key:
        return 1
    return None


def truncate(state: State, rank: int) -> State:
    """The leading `rank` components of every LoRA factor."""
    out = {}
    for key, value in state.items():
        axis = rank_axis(key)
        out[key] = value if axis is None else value.narrow(axis, 0, rank).clone()
    return out


def pad(state: State, reference: State) -> State:
    """Zero-pad every tensor to the shape of its `reference` counterpart."""
    out = {}
    for key, ref in reference.items():
        value, axis = state[key], rank_axis(key)
        if axis is None or value.shape == ref.shape:
            out[key] = value.to(torch.float32)
            continue
        padded = torch.zeros_like(ref, dtype=torch.float32)
        padded.narrow(axis, 0, value.shape[axis]).copy_(value)
        out[key] = padded
    return out


def tier_of(device: int, rank_by_tier: dict[str, int] | None, declared: str | None = None
            ) -> str | None:
    """A phone's tier: the one it declares (node config `device-tier`), else assigned round
    robin by device id in config order (simulation). None when ranks are homogeneous."""
    if not rank_by_tier:
        return None
    if declared is not None:
        if declared not in rank_by_tier:
            raise ValueError(f"device tier {declared!r} is not one of {sorted(rank_by_tier)}")
        return declared
    names = list(rank_by_tier)
    return names[device % len(names)]


def lora_for_rank(lora: LoraConfig, rank: int) -> LoraConfig:
    """The LoRA setup of a rank-`rank` phone: same scaling alpha / r as the full rank."""
    return replace(lora, r=rank, alpha=lora.alpha * rank / lora.r, rank_by_tier=None)
