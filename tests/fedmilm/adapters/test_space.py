from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedmilm.adapters import build_adapter_space, cached_adapter_space, save_global_adapter
from fedmilm.model import load_base_model
from tests.conftest import tiny_config


def _space(mode: str):
    cfg = tiny_config(f"personalization={mode}")
    return cfg, build_adapter_space(cfg.model, cfg.lora, mode=mode, seed=cfg.seed)


def test_none_shares_everything():
    _, space = _space("none")
    assert space.global_keys and not space.personal_keys


def test_fedsa_shares_a_keeps_b():
    _, space = _space("fedsa")
    assert all(".lora_A." in k for k in space.global_keys)
    assert all(".lora_B." in k for k in space.personal_keys)
    assert len(space.global_keys) == len(space.personal_keys)


def test_dual_has_two_active_adapters():
    _, space = _space("dual")
    assert all(".global." in k for k in space.global_keys)
    assert all(".personal." in k for k in space.personal_keys)
    # Both adapters train: every adapter tensor is trainable.
    trainable = {k for k, p in space.model.named_parameters() if p.requires_grad}
    assert trainable == set(space.global_keys) | set(space.personal_keys)


def test_load_and_state_round_trip_and_reject_unknown():
    _, space = _space("fedsa")
    state = {k: torch.randn_like(v) for k, v in space.state(space.global_keys).items()}
    space.load(state)
    assert all(torch.equal(space.state(space.global_keys)[k], state[k]) for k in state)
    with pytest.raises(KeyError):
        space.load({"not.a.tensor": torch.zeros(1)})
    key = space.global_keys[0]
    with pytest.raises(ValueError, match="shape"):
        space.load({key: torch.zeros(3, 3, 3)})


def test_same_seed_same_initial_adapter():
    cfg, a = _space("dual")
    b = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=cfg.seed)
    assert all(torch.equal(a.initial[k], b.initial[k]) for k in a.initial)


def test_cached_space_is_reused_per_process(tiny_cfg):
    first = cached_adapter_space(tiny_cfg.model, tiny_cfg.lora, mode="dual", seed=0)
    assert cached_adapter_space(tiny_cfg.model, tiny_cfg.lora, mode="dual", seed=0) is first
    assert cached_adapter_space(tiny_cfg.model, tiny_cfg.lora, mode="none", seed=0) is not first


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # fedsa: B is not global
@pytest.mark.parametrize("mode", ["none", "fedsa", "dual"])
def test_global_adapter_loads_with_peft(tmp_path, mode):
    cfg, space = _space(mode)
    trained = {k: v + 0.05 * torch.randn_like(v)
               for k, v in space.state(space.global_keys).items()}
    folder = save_global_adapter(space, trained, tmp_path / "adapter", base_model="tiny")
    base = load_base_model(cfg.model, space.tokenizer, cfg.seed)
    loaded = PeftModel.from_pretrained(base, str(folder))
    loaded_tensors = {k: p for k, p in loaded.named_parameters() if "lora_" in k}
    # Every global tensor arrives under PEFT's default adapter name with its trained value...
    for key, value in trained.items():
        name = key.replace(".global.", ".default.")
        assert torch.allclose(loaded_tensors[name], value)
    # ...and nothing personal was written: under fedsa B stays at PEFT's zero init.
    if mode == "fedsa":
        assert all(float(p.abs().sum()) == 0 for k, p in loaded_tensors.items() if "lora_B" in k)
