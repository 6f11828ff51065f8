from __future__ import annotations

from fedmilm.config.schema import DataConfig
from fedmilm.data import load_user
from fedmilm.data.synthetic import user_conversations


def _cfg(**kw) -> DataConfig:
    base = dict(source="synthetic", path=None, train_per_user=12, heldout_per_user=4,
                heldout_fraction=0.25, zh_fraction=0.5, max_length=128, system_prompt=None,
                canary_users=0, canary_repeats=0)
    return DataConfig(**{**base, **kw})


def test_deterministic_by_seed_and_user():
    a = user_conversations(seed=1, user=3, count=10, zh_fraction=0.3)
    assert a == user_conversations(seed=1, user=3, count=10, zh_fraction=0.3)
    assert a != user_conversations(seed=2, user=3, count=10, zh_fraction=0.3)
    assert a != user_conversations(seed=1, user=4, count=10, zh_fraction=0.3)


def test_conversations_are_user_then_assistant():
    for conversation in user_conversations(seed=0, user=0, count=30, zh_fraction=0.0):
        assert [m["role"] for m in conversation] == ["user", "assistant"]
        assert all(m["content"].strip() for m in conversation)


def test_languages_follow_zh_fraction():
    def is_zh(user: int) -> bool:
        text = user_conversations(seed=0, user=user, count=5, zh_fraction=0.5)[0][1]["content"]
        return any("\u4e00" <= ch <= "\u9fff" for ch in text)

    zh = sum(is_zh(u) for u in range(200))
    assert 60 < zh < 140  # ~100 expected for a fraction of 0.5
    assert not any(
        any("\u4e00" <= ch <= "\u9fff" for ch in
            user_conversations(seed=0, user=u, count=5, zh_fraction=0.0)[0][1]["content"])
        for u in range(20))


def test_personas_are_non_iid():
    """Two users resolving 'call my <relation>' get different names: personal knowledge."""
    replies = [{m["content"] for c in user_conversations(seed=0, user=u, count=60, zh_fraction=0)
                for m in c if m["role"] == "assistant" and m["content"].startswith("Calling")}
               for u in (0, 1)]
    assert replies[0] and replies[1] and not replies[0] & replies[1]


def test_train_and_heldout_are_disjoint_and_sized():
    data = load_user(_cfg(), user=5, seed=0)
    assert (len(data.train), len(data.heldout)) == (12, 4)
    assert data.train + data.heldout == user_conversations(seed=0, user=5, count=16,
                                                           zh_fraction=0.5)


def test_system_prompt_is_prepended():
    data = load_user(_cfg(system_prompt="Be brief."), user=1, seed=0)
    system = {"role": "system", "content": "Be brief."}
    assert all(c[0] == system for c in data.train + data.heldout)
    assert [m["role"] for m in data.train[0]] == ["system", "user", "assistant"]
