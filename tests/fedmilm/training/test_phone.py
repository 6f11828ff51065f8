from __future__ import annotations

import pytest
import torch

from fedmilm.adapters import build_adapter_space
from fedmilm.data import encode_all, load_user
from fedmilm.training import evaluate_phone, train_phone
from fedmilm.training.runtimes import EagerRuntime
from tests.conftest import tiny_config


@pytest.fixture(scope="module", params=["none", "fedsa", "dual"])
def setup(request):
    cfg = tiny_config(f"personalization={request.param}", "train.lr=0.02")
    space = build_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode, seed=0)
    data = load_user(cfg.data, user=0, seed=0)
    train = encode_all(space.tokenizer, data.train, cfg.data.max_length)
    return cfg, space, train


def _train(cfg, space, examples, seed=1):
    return train_phone(EagerRuntime(space), global_state=space.initial_state(space.global_keys),
                       personal_state=space.initial_state(space.personal_keys),
                       examples=examples, train=cfg.train, seed=seed)


def test_update_covers_global_part_only(setup):
    cfg, space, examples = setup
    outcome = _train(cfg, space, examples)
    assert set(outcome.update) == set(space.global_keys)
    assert set(outcome.personal) == set(space.personal_keys)
    assert sum(float(v.norm()) for v in outcome.update.values()) > 0
    assert outcome.stats.steps == cfg.train.epochs * -(-len(examples) // cfg.train.batch_size)


def test_training_is_deterministic_by_seed(setup):
    cfg, space, examples = setup
    a, b, c = (_train(cfg, space, examples, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
    assert any(not torch.equal(a.update[k], c.update[k]) for k in a.update)


def test_training_lowers_the_loss_on_what_it_trained(setup):
    cfg, space, examples = setup
    before = evaluate_phone(EagerRuntime(space),
                            global_state=space.initial_state(space.global_keys),
                            personal_state=space.initial_state(space.personal_keys),
                            examples=examples, batch_size=8)
    outcome = _train(cfg, space, examples)
    trained_global = {k: space.initial[k] + outcome.update[k] for k in outcome.update}
    after = evaluate_phone(EagerRuntime(space), global_state=trained_global,
                           personal_state=outcome.personal, examples=examples, batch_size=8)
    best_after = after.loss_personal if after.loss_personal is not None else after.loss_global
    assert best_after < before.loss_global
    assert after.loss_base == pytest.approx(before.loss_base)  # the base model stays frozen


def test_evaluation_semantics_per_mode(setup):
    cfg, space, examples = setup
    initial = evaluate_phone(EagerRuntime(space),
                             global_state=space.initial_state(space.global_keys),
                             personal_state=space.initial_state(space.personal_keys),
                             examples=examples, batch_size=8)
    if space.mode == "none":
        assert initial.loss_personal is None
    else:
        # With LoRA's zero-initialised B, adding the initial personal part changes nothing.
        assert initial.loss_personal == pytest.approx(initial.loss_global, abs=1e-6)
    assert initial.loss_global == pytest.approx(initial.loss_base, abs=1e-5)
