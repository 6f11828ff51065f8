"""Each phone's private data: train and held-out interactions of one user."""

from __future__ import annotations

from dataclasses import dataclass

from fedmilm.config.schema import DataConfig
from fedmilm.data import jsonl, synthetic
from fedmilm.data.canary import canary_conversation, canary_secret
from fedmilm.data.synthetic import Conversation


@dataclass(frozen=True)
class UserData:
    """A user's interactions, split once into what the phone trains on and what it keeps."""

    train: list[Conversation]
    heldout: list[Conversation]


def count_users(cfg: DataConfig) -> int | None:
    """How many users the source has, or None when it can make any number (synthetic)."""
    return len(jsonl.user_files(cfg.path)) if cfg.source == "jsonl" else None


def _with_system(items: list[Conversation], prompt: str | None) -> list[Conversation]:
    if prompt is None:
        return items
    return [c if c[0]["role"] == "system" else [{"role": "system", "content": prompt}, *c]
            for c in items]


def load_user(cfg: DataConfig, *, user: int, seed: int) -> UserData:
    """Data of user `user` (the phone's partition id), with `cfg.system_prompt` prepended to
    conversations that have no system message of their own, and the audit's canary planted
    into the training part of the first `cfg.canary_users` phones."""
    data = _load(cfg, user=user, seed=seed)
    if user < cfg.canary_users:
        planted = [canary_conversation(canary_secret(seed=seed, user=user))] * cfg.canary_repeats
        data = UserData(train=data.train + planted, heldout=data.heldout)
    return UserData(train=_with_system(data.train, cfg.system_prompt),
                    heldout=_with_system(data.heldout, cfg.system_prompt))


def _load(cfg: DataConfig, *, user: int, seed: int) -> UserData:
    if cfg.source == "synthetic":
        total = cfg.train_per_user + cfg.heldout_per_user
        items = synthetic.user_conversations(seed=seed, user=user, count=total,
                                             zh_fraction=cfg.zh_fraction)
        return UserData(train=items[: cfg.train_per_user], heldout=items[cfg.train_per_user:])
    assert cfg.path is not None
    items = jsonl.read_user_file(jsonl.user_files(cfg.path)[user])
    if len(items) < 2:
        raise jsonl.DataFormatError(f"user {user} has {len(items)} conversation(s); at least 2 "
                                    "are needed (one to train on, one held out)")
    held = min(max(1, round(len(items) * cfg.heldout_fraction)), len(items) - 1)
    train, heldout = items[: len(items) - held], items[len(items) - held:]
    return UserData(train=train[: cfg.train_per_user], heldout=heldout[: cfg.heldout_per_user])
