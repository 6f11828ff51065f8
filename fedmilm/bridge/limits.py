"""What a bridged phone can take part in (config validation and the bridge both ask)."""

from __future__ import annotations

from fedmilm.config.schema import FedMilmConfig


def bridged_problems(cfg: FedMilmConfig) -> list[str]:
    """What a run asks that a bridged phone cannot do yet, as config errors."""
    problems = []
    if cfg.client.runtime != "executorch":
        problems.append("bridged phones train the exported programs: client.runtime=executorch")
    if cfg.privacy.sample_level:
        problems.append("bridged phones keep no DP-SGD privacy ledger yet: privacy=none or user")
    if cfg.privacy.user_level and cfg.privacy.user.adaptive_clip:
        problems.append("bridged phones do not vote on adaptive clipping: "
                        "privacy.user.adaptive_clip=false")
    if cfg.aggregation.upload != "fp32" or cfg.aggregation.secure:
        problems.append("bridged phones upload float32 without SecAgg+: aggregation.upload=fp32 "
                        "aggregation.secure=false")
    if cfg.lora.rank_by_tier:
        problems.append("bridged phones train the exported rank only: lora.rank_by_tier=null")
    return problems
