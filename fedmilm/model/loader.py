"""Build the frozen base model and its tokenizer from a `ModelConfig`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedmilm.config.schema import ModelConfig
from fedmilm.model import smollm2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_dir(cfg: ModelConfig) -> Path | None:
    """Folder of pretrained weights, or None for a model built from an architecture config."""
    if cfg.source == "smollm2":
        return smollm2.model_dir(cfg.cache_dir)
    if cfg.source == "hf":
        assert cfg.path is not None
        return Path(cfg.path).expanduser()
    return None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with a chat template; config-built models reuse SmolLM2's tokenizer."""
    folder = weights_dir(cfg) if cfg.source == "hf" else smollm2.tokenizer_dir(cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer in {folder} has no chat template; fedmilm formats "
                         "interactions with the model's own template")
    return tokenizer


def _llama_from_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                       seed: int) -> PreTrainedModel:
    arch = cfg.architecture
    assert arch is not None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Same seed => same random base on the server and on every phone, without touching global RNG.
    # Built directly in the target dtype: a float32 build first would double the peak memory
    # (5.4 GB at 1.3B parameters), which a phone's memory budget cannot afford.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM._from_config(config, dtype=DTYPES[cfg.dtype])


def load_base_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                    seed: int) -> PreTrainedModel:
    """Load (or build) the base model, frozen, in `cfg.dtype`."""
    folder = weights_dir(cfg)
    if folder is None:
        model = _llama_from_config(cfg, tokenizer, seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[cfg.dtype])
    model.requires_grad_(False)
    return model
