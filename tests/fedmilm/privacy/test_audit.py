from __future__ import annotations

import math

import pytest

from fedmilm.data import load_user
from fedmilm.data.canary import DIGITS, canary_secret, candidate_secrets
from fedmilm.privacy.audit import exposure, membership_auc
from tests.conftest import tiny_config


def test_membership_auc_closed_forms():
    assert membership_auc([0.1, 0.2], [0.5, 0.9]) == 1.0
    assert membership_auc([0.5, 0.9], [0.1, 0.2]) == 0.0
    assert membership_auc([0.3], [0.3]) == 0.5
    with pytest.raises(ValueError):
        membership_auc([], [1.0])


def test_canaries_are_planted_only_where_asked():
    cfg = tiny_config("data.canary_users=2", "data.canary_repeats=3")
    secret = canary_secret(seed=0, user=1)
    assert len(secret) == DIGITS and secret.isdigit()
    planted = load_user(cfg.data, user=1, seed=0)
    texts = [m["content"] for c in planted.train for m in c]
    assert sum(secret in t for t in texts) == 3
    assert not any(secret in m["content"] for c in planted.heldout for m in c)
    clean = load_user(cfg.data, user=2, seed=0)
    assert len(clean.train) == cfg.data.train_per_user


def test_candidates_are_distinct_same_format_and_exclude_the_secret():
    others = candidate_secrets("4821", count=255, seed=0)
    assert len(set(others)) == 255 and "4821" not in others
    assert all(len(s) == DIGITS and s.isdigit() for s in others)



def test_exposure_is_max_when_the_secret_ranks_first_and_zero_when_last(monkeypatch):
    import fedmilm.privacy.audit as audit

    def fake_losses(_model, _tok, conversations, **_):
        # secret first in the list: give it the lowest (or highest) loss
        return [0.0 if i == 0 else 1.0 + i for i in range(len(conversations))]

    monkeypatch.setattr(audit, "conversation_losses", fake_losses)
    best = exposure(None, None, "1234", candidates=15, seed=0, max_length=64,
                    system_prompt=None)
    assert best == pytest.approx(math.log2(16))
    monkeypatch.setattr(audit, "conversation_losses",
                        lambda _m, _t, convs, **_: [99.0] + [1.0] * (len(convs) - 1))
    assert exposure(None, None, "1234", candidates=15, seed=0, max_length=64,
                    system_prompt=None) == pytest.approx(0.0)
