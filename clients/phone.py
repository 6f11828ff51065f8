"""What a phone needs for a message: its config, its adapter space, its data, its storage.

Everything expensive is cached per process: in simulation one Ray worker serves many virtual
phones, so the base model is loaded once and only adapter tensors change per phone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from flwr.app import Context, Message
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from fedmilm import protocol
from fedmilm.adapters import AdapterSpace, cached_adapter_space
from fedmilm.adapters.hetero import lora_for_rank, tier_of
from fedmilm.clients.storage import DeviceStorage
from fedmilm.config import FedMilmConfig, load_config
from fedmilm.data import Example, encode_all, load_user
from fedmilm.model import load_tokenizer
from fedmilm.privacy.policy import PhonePolicy, read_policy
from fedmilm.training.device import base_dtype, resolve_device
from fedmilm.training.runtimes import PhoneRuntime, runtime_class


@lru_cache(maxsize=8)
def config_from_text(text: str) -> FedMilmConfig:
    """The run config a message carries, parsed once per process."""
    return load_config(OmegaConf.create(text))


def _space(cfg: FedMilmConfig, rank: int | None = None) -> AdapterSpace:
    """The tier's space on the device this phone trains on (`train.device`)."""
    lora = cfg.lora if rank is None else lora_for_rank(cfg.lora, rank)
    device = resolve_device(cfg.train.device)
    model = replace(cfg.model, dtype=base_dtype(cfg.model.dtype, device))
    return cached_adapter_space(model, lora, mode=cfg.personalization.mode, seed=cfg.seed,
                                device=device)


@lru_cache(maxsize=8)
def _tokenizer(config_text: str) -> PreTrainedTokenizerBase:
    """Loaded once per process, not once per phone (any tier's space shares it)."""
    return load_tokenizer(config_from_text(config_text).model)


@lru_cache(maxsize=1024)
def _examples(config_text: str, user: int) -> tuple[list[Example], list[Example]]:
    cfg = config_from_text(config_text)
    tokenizer, max_length = _tokenizer(config_text), cfg.data.max_length
    data = load_user(cfg.data, user=user, seed=cfg.seed)
    return (encode_all(tokenizer, data.train, max_length),
            encode_all(tokenizer, data.heldout, max_length))


@lru_cache(maxsize=8)
def _runtime(config_text: str, rank: int | None) -> PhoneRuntime:
    """The runtime `client.runtime` names, built once per process and tier: its memory plan
    (measured in this process with the model loaded) or its loaded programs."""
    cfg = config_from_text(config_text)
    return runtime_class(cfg.client.runtime).for_phone(cfg, lambda: _space(cfg, rank))


# Held-out loss of the frozen base model per (config, user): it can never change within a run.
_BASE_LOSSES: dict[tuple[str, int], float] = {}


@dataclass(frozen=True)
class Phone:
    """One phone's view of the current message."""

    config_text: str
    user: int
    storage: DeviceStorage
    server_round: int
    rank: int | None = None  # heterogeneous ranks: this phone's tier rank (None: lora.r)
    policy_path: Path | None = None      # its own privacy policy (node config)
    diagnostics_dir: Path | None = None  # simulation only: where the simulator reads results
    round_clip: float | None = None      # adaptive clipping: this round's user-level clip

    @property
    def cfg(self) -> FedMilmConfig:
        """The run config, with this round's clip when the server adapts it (the phone's own
        policy checks that clip like any other request)."""
        cfg = config_from_text(self.config_text)
        if self.round_clip is None:
            return cfg
        user = replace(cfg.privacy.user, clip_norm=self.round_clip)
        return replace(cfg, privacy=replace(cfg.privacy, user=user))

    def examples(self) -> tuple[list[Example], list[Example]]:
        """(train, held-out) examples of this phone's user, tokenised once per process."""
        return _examples(self.config_text, self.user)

    @property
    def base_loss(self) -> float | None:
        """This phone's base-model held-out loss if this process computed it before."""
        return _BASE_LOSSES.get((self.config_text, self.user))

    def runtime(self) -> PhoneRuntime:
        """This phone's runtime; raises `MemoryBudgetError` when its budget fits nothing."""
        return _runtime(self.config_text, self.rank)

    def remember_base_loss(self, value: float) -> None:
        _BASE_LOSSES[(self.config_text, self.user)] = value

    @property
    def task_seed(self) -> int:
        """Distinct per (run seed, round, user), identical on a rerun: seeds shuffling and
        LoRA dropout, never DP randomness (see `dp_test_seed`)."""
        return (self.cfg.seed * 1_000_003 + self.server_round * 10_007 + self.user) % 2**31

    def policy(self) -> PhonePolicy:
        """This phone's own privacy policy; `ValueError` when its node config names none."""
        if self.policy_path is None:
            raise ValueError(f"no '{protocol.PRIVACY_POLICY}' in this phone's node config")
        return read_policy(self.policy_path)

    def dp_test_seed(self, policy: PhonePolicy) -> int | None:
        """A seed for DP randomness only when the run asks for it (tests) and this phone's
        own policy allows it (simulation); None means the CSPRNG."""
        seeded = self.cfg.privacy.seeded_noise and policy.allow_seeded_noise
        return self.task_seed if seeded else None


def phone_for(msg: Message, context: Context) -> Phone:
    """Resolve config, user, storage and policy for this message. Storage and policy come
    from the phone's own node config only: a phone never writes where the server says."""
    config = msg.content.config_records[protocol.CONFIG]
    node = context.node_config
    user = int(node[protocol.PARTITION_ID])
    if protocol.DEVICE_DIR not in node:
        raise ValueError(f"no '{protocol.DEVICE_DIR}' in this phone's node config: it does not "
                         "know where its own storage is")
    config_text = str(config[protocol.RUN_CONFIG])
    tiers = config_from_text(config_text).lora.rank_by_tier
    declared = node.get(protocol.DEVICE_TIER)
    tier = tier_of(user, tiers, None if declared is None else str(declared))
    policy = node.get(protocol.PRIVACY_POLICY)
    diagnostics = node.get(protocol.DIAGNOSTICS_DIR)
    clip = config.get(protocol.CLIP_NORM)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)
                             or not math.isfinite(clip) or clip <= 0):
        raise ValueError(f"'{protocol.CLIP_NORM}' in the round's config is not a positive number")
    return Phone(config_text=config_text, user=user,
                 storage=DeviceStorage(Path(str(node[protocol.DEVICE_DIR]))),
                 server_round=int(config[protocol.SERVER_ROUND]),
                 rank=None if tier is None else tiers[tier],
                 policy_path=None if policy is None else Path(str(policy)),
                 diagnostics_dir=None if diagnostics is None else Path(str(diagnostics)),
                 round_clip=None if clip is None else float(clip))
