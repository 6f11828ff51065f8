"""Base models: the embedded SmolLM2 default, config-built Llamas, any local HF causal LM."""

from fedmilm.model.loader import load_base_model, load_tokenizer

__all__ = ["load_base_model", "load_tokenizer"]
