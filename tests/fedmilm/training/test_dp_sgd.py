"""DP-SGD through Opacus inside the one training loop, and FFA-LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opacus import GradSampleModule
from peft import PeftModel

from fedmilm.adapters import build_adapter_space, save_global_adapter
from fedmilm.data import batches, encode_all, load_user
from fedmilm.model import load_base_model
from fedmilm.privacy import Accountant
from fedmilm.privacy.randomness import SeededRandom
from fedmilm.training import DpSgd, per_example_loss, planned_steps, train_phone
from fedmilm.training.runtimes import EagerRuntime
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config("personalization=dual", "train.lr=0.02")
    space = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=0)
    data = load_user(cfg.data, user=1, seed=0)
    return cfg, space, encode_all(space.tokenizer, data.train, cfg.data.max_length)


def _dp_train(cfg, space, examples, *, noise=0.5, clip=1.0, seed=3):
    accountant = Accountant("prv")
    train = dataclasses.replace(cfg.train, epochs=2, batch_size=8)
    outcome = train_phone(EagerRuntime(space),
                          global_state=space.initial_state(space.global_keys),
                          personal_state=space.initial_state(space.personal_keys),
                          examples=examples, train=train, seed=seed,
                          dp=DpSgd(noise_multiplier=noise, max_grad_norm=clip,
                                   accountant=accountant, random=SeededRandom(seed)))
    return outcome.stats, accountant, space.state(space.global_keys)


def test_every_dp_step_is_charged_to_the_accountant_once(setup):
    cfg, space, examples = setup
    stats, accountant, _ = _dp_train(cfg, space, examples)
    expected = planned_steps(len(examples), epochs=2, batch_size=8)
    assert stats.steps == accountant.steps == expected  # charged once per step, not twice
    assert accountant.history == [(0.5, 8 / len(examples), expected)]
    assert accountant.epsilon(1e-5) > 0


def test_seeded_dp_training_replays_and_leaves_no_opacus_hooks(setup):
    cfg, space, examples = setup
    _, _, a = _dp_train(cfg, space, examples, seed=5)
    _, _, b = _dp_train(cfg, space, examples, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not isinstance(space.model, GradSampleModule)
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in space.model.modules())
    assert hooks == 0
    assert not any(hasattr(p, "grad_sample") for p in space.model.parameters())


def test_per_example_clipping_matches_a_manual_computation(setup):
    """One DP step without noise equals the mean of per-example gradients clipped to C."""
    cfg, space, examples = setup
    clip = 1e-3
    batch = batches(examples[:4], batch_size=4, pad_id=space.tokenizer.pad_token_id)[0]
    params = space.trainable_parameters()
    space.load(space.initial_state(space.global_keys + space.personal_keys))
    manual = [torch.zeros_like(p) for p in params]
    for i in range(4):
        one = batches([examples[i]], batch_size=1, pad_id=space.tokenizer.pad_token_id)[0]
        grads = torch.autograd.grad(per_example_loss(space.model, one).sum(), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for acc, g in zip(manual, grads, strict=True):
            acc += g * min(1.0, clip / float(norm)) / 4
    gsm = GradSampleModule(space.model, batch_first=True, loss_reduction="mean")
    gsm.train()  # Opacus captures activations in training mode only
    try:
        per_example_loss(gsm, batch).mean().backward()  # fills p.grad_sample, (B, *shape)
        norms = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in params))
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        for p, expected in zip(params, manual, strict=True):
            clipped = torch.einsum("i,i...->...", factors, p.grad_sample) / 4
            assert torch.allclose(clipped, expected, atol=1e-8)
    finally:
        gsm._close()
        space.model.zero_grad(set_to_none=True)


def test_ffa_freezes_a_trains_b_and_exports_a_loadable_adapter(tmp_path):
    cfg = tiny_config("lora.variant=ffa", "personalization=none", "train.lr=0.05")
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    assert space.frozen_keys and all(".lora_A." in k for k in space.frozen_keys)
    assert all(".lora_B." in k for k in space.global_keys)
    frozen_before = {k: p.detach().clone() for k, p in space.model.named_parameters()
                     if k in space.frozen_keys}
    examples = encode_all(space.tokenizer, load_user(cfg.data, user=0, seed=0).train, 128)
    outcome = train_phone(EagerRuntime(space),
                          global_state=space.initial_state(space.global_keys),
                          personal_state={}, examples=examples, train=cfg.train, seed=0)
    assert set(outcome.update) == set(space.global_keys)
    params = dict(space.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in frozen_before.items())
    trained = {k: space.initial[k] + outcome.update[k] for k in outcome.update}
    folder = save_global_adapter(space, trained, tmp_path / "ffa", base_model="tiny")
    loaded = PeftModel.from_pretrained(load_base_model(cfg.model, space.tokenizer, 0),
                                       str(folder))
    batch = batches(examples[:2], batch_size=2, pad_id=space.tokenizer.pad_token_id)[0]
    space.load(trained)
    with torch.no_grad():
        ours = space.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        theirs = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
