"""Adaptive clipping: it finds the quantile it aims for, its count fits inside the accounted
noise (checked with dp-accounting), and the server keeps and applies its clip correctly."""

from __future__ import annotations

import math
import random

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedmilm.aggregation import DpFedAvg, DpFtrl, aggregate_all
from fedmilm.config import ConfigError
from fedmilm.privacy.adaptive_clip import QuantileClip, update_noise_multiplier
from fedmilm.privacy.calibrate import resolve_privacy
from fedmilm.privacy.randomness import SeededRandom
from tests.conftest import tiny_config

REF = {"a": torch.zeros(64)}


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_the_clip_converges_to_the_target_quantile_of_synthetic_norms(quantile):
    """Log-normal update norms (median 1): from a clip 20x too small, 200 rounds of 200
    phones' noisy votes bring the clip to the target quantile of the norms."""
    norms, noise = random.Random(7), SeededRandom(1)
    clip = QuantileClip(clip=0.05, quantile=quantile, lr=0.2, count_noise=10.0, expected=200)
    trail = []
    for _ in range(200):
        votes = sum((0.5 if norms.lognormvariate(0, 0.5) <= clip.clip else -0.5)
                    for _ in range(200))
        clip.update(votes, noise)
        trail.append(clip.clip)
    truth = math.exp(0.5 * {0.5: 0.0, 0.9: 1.2816}[quantile])
    settled = sum(trail[-50:]) / 50
    assert settled == pytest.approx(truth, rel=0.1)


def test_update_and_count_compose_to_the_accounted_gaussian():
    """The update (sensitivity 1, noise sigma_u) and the count (sensitivity 1/2, noise s)
    together: dp-accounting's PLD equals one Gaussian of multiplier sigma."""
    sigma, count_noise = 1.3, 2.0
    sigma_u = update_noise_multiplier(sigma, count_noise)
    assert sigma_u > sigma
    both = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    both.compose(dp_event.GaussianDpEvent(sigma_u))
    both.compose(dp_event.GaussianDpEvent(2 * count_noise))  # s at sensitivity 1/2
    one = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    one.compose(dp_event.GaussianDpEvent(sigma))
    for epsilon in (0.5, 1.0, 2.0):
        assert both.get_delta(epsilon) == pytest.approx(one.get_delta(epsilon), rel=1e-3)
    with pytest.raises(ValueError, match="must exceed half"):
        update_noise_multiplier(2.0, 0.9)


def _adaptive(*overrides: str):
    cfg = resolve_privacy(tiny_config("privacy=user", "privacy.user.adaptive_clip=true",
                                      "privacy.seeded_noise=true", "federation.num_clients=20",
                                      "federation.clients_per_round=5", *overrides))
    return cfg


def test_dp_fedavg_moves_the_clip_every_round_and_checkpoints_it():
    agg = DpFedAvg(_adaptive("privacy.user.clip_count_noise=1.0"))
    start = agg.round_clip
    updates = [{"a": torch.full((64,), 0.01)}] * 5
    round_sum = agg.start_round()
    for update in updates:
        round_sum.add(update, 1.0)
        agg.vote(-0.5)  # every update was clipped: the clip must grow
    agg.finish_round(round_sum, REF)
    assert agg.round_clip > start and agg.max_update_norm == pytest.approx(
        agg.round_clip * 1.001)
    restored = DpFedAvg(_adaptive("privacy.user.clip_count_noise=1.0"))
    restored.load_state_dict(agg.state_dict())
    assert restored.round_clip == agg.round_clip
    assert restored.adaptive.clip == agg.adaptive.clip


def test_dp_ftrl_changes_the_clip_only_when_a_tree_starts():
    agg = DpFtrl(_adaptive("privacy.user.mechanism=ftrl", "privacy.user.min_separation=3",
                           "privacy.user.clip_count_noise=1.0"))
    clips, sampler = [], random.Random(0)
    for server_round in range(1, 8):
        agg.cohort(list(range(20)), sampler, server_round)
        clips.append(agg.round_clip)
        round_sum = agg.start_round()
        for _ in range(5):
            round_sum.add({"a": torch.full((64,), 0.01)}, 1.0)
            agg.vote(-0.5)
        agg.finish_round(round_sum, REF)
    assert clips[0] == clips[1] == clips[2] < clips[3] == clips[4] == clips[5] < clips[6]
    assert agg.tree.std == pytest.approx(agg.update_noise * clips[6])


def test_config_refuses_adaptive_clipping_that_cannot_work():
    with pytest.raises(ConfigError, match="aggregation.secure"):
        _adaptive("aggregation.secure=true")
    with pytest.raises(ConfigError, match="privacy.user.clip_count_noise"):
        _adaptive("privacy.user.clip_count_noise=0.1")  # 2 s = 0.2 < sigma = 1
    with pytest.raises(ConfigError, match="privacy.user.clip_quantile"):
        _adaptive("privacy.user.clip_quantile=1.5")


def test_a_noise_only_round_still_moves_the_clip_by_noise_alone():
    agg = DpFedAvg(_adaptive())
    before = agg.round_clip
    aggregate_all(agg, [], [], REF)  # nobody replied: votes 0, the count's noise decides
    assert agg.round_clip != before


def test_a_reply_longer_than_the_rounds_clip_or_with_a_bad_vote_is_rejected_alone():
    """One phone cannot set the step: the server bounds each update by this round's clip and
    each vote to exactly +-1/2; the other replies still count."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmilm import protocol
    from fedmilm.server.messages import collect_updates

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    agg = DpFedAvg(_adaptive("privacy.user.clip_count_noise=1.0"))

    def reply(node: int, scale: float, vote: float) -> Message:
        sent = Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=node,
                       message_type="train")
        content = RecordDict({protocol.UPDATE_ARRAYS: ArrayRecord({"a": torch.full((64,), scale)}),
                              protocol.METRICS: MetricRecord({protocol.WITHIN_CLIP: vote})})
        return Message(content=content, reply_to=sent)

    fits = agg.round_clip / 8 / 2  # norm = scale * sqrt(64) = half the clip
    replies = [reply(10, fits, 0.5), reply(11, agg.round_clip, 0.5), reply(12, fits, 1e9)]
    out = collect_updates(replies, REF, max_norm=agg.max_update_norm, dp=True, votes=True,
                          devices={10: 0, 11: 1, 12: 2}, quiet=True)
    assert len(out.accepted) == 1 and out.rejected == 2
