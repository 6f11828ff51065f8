"""Turn a composed Hydra/OmegaConf config into the typed, validated `FedMilmConfig`."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmilm.config.schema import FedMilmConfig
from fedmilm.config.validate import ConfigError, validate_config

# `${or_default:${resume},...}` in conf/config.yaml: a resumed run logs into its own directory.
OmegaConf.register_new_resolver("or_default", lambda value, default: value or default,
                                replace=True)
# `${if_resume:${resume},A,B}`: a resumed run keeps the original's `.hydra/` and writes its own
# Hydra record beside it.
OmegaConf.register_new_resolver(
    "if_resume", lambda resume, then, otherwise: then if resume else otherwise, replace=True)


def load_config(raw: DictConfig | dict[str, Any]) -> FedMilmConfig:
    """Merge `raw` onto the schema (types, unknown keys), then run the semantic checks.

    Hydra's own keys (`hydra:`) are ignored. Raises `ConfigError` with a readable message.
    """
    try:
        if isinstance(raw, DictConfig):  # resolving here: a bad ${...} is one config line
            raw = OmegaConf.to_container(raw, resolve=True)
        raw = {k: v for k, v in dict(raw).items() if k != "hydra"}
        merged = OmegaConf.merge(OmegaConf.structured(FedMilmConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = str(err).splitlines()[0]
        raise ConfigError([f"{key}: {reason}"]) from err
    assert isinstance(cfg, FedMilmConfig)
    validate_config(cfg)
    return cfg


def to_yaml(cfg: FedMilmConfig) -> str:
    """Serialise a typed config (used to ship it to the ServerApp and into the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
