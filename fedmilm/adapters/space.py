"""The LoRA adapter space of one (base model, LoRA setup, personalisation mode).

A space wraps the frozen base model with PEFT LoRA once, records every adapter tensor at its
initial value, and splits the tensors into the *global* part (travels, is averaged) and the
*personal* part (never leaves the phone). Clients swap tensors in place per virtual client, so one
space per worker process serves every phone that process simulates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase

from fedmilm.config.schema import ArchitectureConfig, LoraConfig, ModelConfig
from fedmilm.model import load_base_model, load_tokenizer
from fedmilm.model.quantize import quantize_frozen_base

State = dict[str, torch.Tensor]


def adapter_names(mode: str) -> tuple[str, ...]:
    """PEFT adapter names a mode installs; the first one holds the global part."""
    return ("global", "personal") if mode == "dual" else ("default",)


def is_global(key: str, mode: str) -> bool:
    """Whether an adapter tensor (by PEFT parameter name) belongs to the global part."""
    if mode == "none":
        return True
    if mode == "fedsa":  # FedSA-LoRA: share A, keep B
        return ".lora_A." in key
    if mode == "dual":
        return ".global." in key
    raise ValueError(f"personalization.mode={mode!r} is unknown; choose none, fedsa or dual")


@dataclass
class AdapterLayout:
    """Which adapter tensors exist, which part each belongs to, and their initial values: all
    a phone's storage and protocol need (an ExecuTorch phone has this without the model)."""

    mode: str
    global_keys: tuple[str, ...]
    personal_keys: tuple[str, ...]
    initial: State  # float32 copy of every trainable adapter tensor right after initialisation

    @property
    def global_coordinates(self) -> int:
        """Numbers in the global part: what travels, and what user-level noise is added to."""
        return sum(self.initial[k].numel() for k in self.global_keys)

    def initial_state(self, keys: tuple[str, ...]) -> State:
        """The initial values of the named tensors (what a phone starts from)."""
        return {k: self.initial[k].clone() for k in keys}


@dataclass
class AdapterSpace(AdapterLayout):
    """A PEFT model plus the bookkeeping to move its adapter tensors in and out."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    frozen_keys: tuple[str, ...]  # FFA-LoRA's A matrices: fixed by the seed, never sent

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.model.named_parameters() if k in self.initial}

    def state(self, keys: tuple[str, ...]) -> State:
        """Float32 copies of the named adapter tensors (what may be stored or sent)."""
        params = self._params()
        return {k: params[k].detach().to("cpu", torch.float32).clone() for k in keys}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into the model in place; unknown keys or shapes are an error."""
        params = self._params()
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"{len(unknown)} tensor(s) are not adapter tensors here, "
                           f"e.g. {unknown[0]!r}")
        with torch.no_grad():
            for key, value in state.items():
                if value.shape != params[key].shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} != "
                                     f"{tuple(params[key].shape)}")
                params[key].copy_(value)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the local optimizer updates: global and personal adapter tensors.

        Re-freezes FFA's A matrices first: PEFT's `disable_adapter()` re-enables gradients on
        every tensor of the active adapters when it exits.
        """
        frozen = set(self.frozen_keys)
        for key, param in self.model.named_parameters():
            if key in frozen:
                param.requires_grad_(False)
        return list(self._params().values())


def build_adapter_space(model_cfg: ModelConfig, lora_cfg: LoraConfig, *, mode: str,
                        seed: int, device: str = "cpu") -> AdapterSpace:
    """Load the base model and wrap it with LoRA, deterministically from `seed`.

    `lora.variant=ffa` is FFA-LoRA (Sun et al. 2024): A stays at its random init (the same on
    every phone, from the seed) and only B trains and travels, which behaves better under DP.
    """
    tokenizer = load_tokenizer(model_cfg)
    base = load_base_model(model_cfg, tokenizer, seed)
    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                              lora_dropout=lora_cfg.dropout,
                              target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    names = adapter_names(mode)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, peft_cfg, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, peft_cfg)
    model.base_model.set_adapter(list(names))  # all adapters active and trainable together
    quantize_frozen_base(model, model_cfg.quantization)
    frozen = tuple(k for k, p in model.named_parameters()
                   if p.requires_grad and lora_cfg.variant == "ffa" and ".lora_A." in k)
    for key, param in model.named_parameters():
        if key in frozen:
            param.requires_grad_(False)
    keys = [k for k, p in model.named_parameters() if p.requires_grad]
    initial = {k: p.detach().to(torch.float32).clone()
               for k, p in model.named_parameters() if k in set(keys)}
    model.to(device)  # built on the CPU from the seed: the same initial values everywhere
    return AdapterSpace(
        model=model, tokenizer=tokenizer, mode=mode,
        global_keys=tuple(k for k in keys if is_global(k, mode)),
        personal_keys=tuple(k for k in keys if not is_global(k, mode)),
        frozen_keys=frozen,
        initial=initial,
    )


@lru_cache(maxsize=3)
def _cached(key: str) -> AdapterSpace:
    spec = json.loads(key)
    model = spec["model"]
    if model["architecture"] is not None:
        model["architecture"] = ArchitectureConfig(**model["architecture"])
    return build_adapter_space(ModelConfig(**model), LoraConfig(**spec["lora"]),
                               mode=spec["mode"], seed=spec["seed"], device=spec["device"])


def cached_adapter_space(model_cfg: ModelConfig, lora_cfg: LoraConfig, *, mode: str,
                         seed: int, device: str = "cpu") -> AdapterSpace:
    """The per-process space: the base model is loaded once and reused by every client this
    process serves. Up to three setups are kept (the tiers of `lora.rank_by_tier`, each its
    own model copy); a fourth replaces the least recently used."""
    key = json.dumps({"model": asdict(model_cfg), "lora": asdict(lora_cfg), "mode": mode,
                      "seed": seed, "device": device}, sort_keys=True)
    return _cached(key)


def release_cached_spaces() -> None:
    """Drop every cached model: a process that only checked the model (a deployment's CLI,
    whose phones and server run elsewhere) should not hold it for the whole run."""
    _cached.cache_clear()
