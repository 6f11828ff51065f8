"""The server's optimizer on the mean update: the published update rules, and its state
through a checkpoint."""

from __future__ import annotations

import random

import pytest
import torch

from fedmilm.aggregation.server_optimizer import ServerOptimizer
from fedmilm.config.validate import ConfigError
from fedmilm.server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from tests.conftest import tiny_config

X0 = {"w": torch.tensor([1.0, -2.0, 0.5])}
UPDATES = [{"w": torch.tensor([0.1, 0.2, -0.3])}, {"w": torch.tensor([0.3, -0.1, 0.0])},
           {"w": torch.tensor([-0.2, 0.4, 0.1])}]


def _run(optimizer: ServerOptimizer, updates=UPDATES) -> dict:
    x = X0
    for update in updates:
        x = optimizer.step(x, update)
    return x


def test_sgd_scales_the_mean_update():
    x = _run(ServerOptimizer("sgd", lr=0.5, momentum=0.9, beta2=0.99, eps=1e-3))
    expected = X0["w"] + 0.5 * sum(u["w"] for u in UPDATES)
    torch.testing.assert_close(x["w"], expected)


def test_momentum_is_heavy_ball_on_the_mean_update():
    x = _run(ServerOptimizer("momentum", lr=0.5, momentum=0.9, beta2=0.99, eps=1e-3))
    m, expected = torch.zeros(3), X0["w"].clone()
    for u in UPDATES:
        m = 0.9 * m + u["w"]
        expected = expected + 0.5 * m
    torch.testing.assert_close(x["w"], expected)


def test_adam_is_fedadam():
    x = _run(ServerOptimizer("adam", lr=0.1, momentum=0.9, beta2=0.99, eps=1e-3))
    m, v, expected = torch.zeros(3), torch.zeros(3), X0["w"].clone()
    for u in UPDATES:
        m = 0.9 * m + 0.1 * u["w"]
        v = 0.99 * v + 0.01 * u["w"] ** 2
        expected = expected + 0.1 * m / (v.sqrt() + 1e-3)
    torch.testing.assert_close(x["w"], expected)


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_state_through_a_checkpoint_continues_exactly(tmp_path, kind):
    settings = dict(lr=0.1, momentum=0.9, beta2=0.99, eps=1e-3)
    straight = _run(ServerOptimizer(kind, **settings))
    first = ServerOptimizer(kind, **settings)
    x = _run(first, UPDATES[:2])
    state = ServerState(round=2, global_state=x, sampler=random.Random(0), aggregator={},
                        ledger_trainings={}, optimizer=first.state())
    loaded = load_checkpoint(save_checkpoint(tmp_path, state, fingerprint="f"), fingerprint="f")
    resumed = ServerOptimizer(kind, **settings)
    resumed.load(loaded.optimizer)
    torch.testing.assert_close(resumed.step(loaded.global_state, UPDATES[2])["w"],
                               straight["w"])
    fresh = ServerOptimizer(kind, **settings)  # what a resume without the state would do
    assert not torch.allclose(fresh.step(loaded.global_state, UPDATES[2])["w"], straight["w"])


def test_state_of_another_optimizer_is_refused():
    adam = ServerOptimizer("adam", lr=0.1, momentum=0.9, beta2=0.99, eps=1e-3)
    _run(adam)
    with pytest.raises(ValueError, match="momentum server optimizer"):
        ServerOptimizer("momentum", lr=0.1, momentum=0.9, beta2=0.99, eps=1e-3).load(adam.state())


def test_config_names_the_bad_key():
    from fedmilm.config import validate_config

    for override, key in (("aggregation.server_optimizer=lion", "aggregation.server_optimizer"),
                          ("aggregation.server_momentum=1.0", "aggregation.server_momentum"),
                          ("aggregation.server_lr=0", "aggregation.server_lr")):
        with pytest.raises(ConfigError, match=key):
            validate_config(tiny_config(override))
