"""Shared pieces of the console entry points."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedmilm.config import ConfigError, FedMilmConfig, load_config
from fedmilm.data import DataFormatError, count_users
from fedmilm.model import smollm2
from fedmilm.privacy.calibrate import resolve_privacy

# conf/ sits at the repository root, beside this package (editable install).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def load_or_exit(raw: DictConfig) -> FedMilmConfig:
    """Typed, validated config with calibrated noise; on any problem print one line per key
    and exit with code 2."""
    try:
        cfg = resolve_privacy(load_config(raw))
        users = count_users(cfg.data)
        if users is not None and users < cfg.federation.num_clients:
            raise ConfigError([f"federation.num_clients={cfg.federation.num_clients} exceeds the "
                               f"{users} user files in data.path={cfg.data.path!r}"])
    except (ConfigError, DataFormatError) as err:
        for line in str(err).splitlines():
            print(f"fedmilm: config error: {line}", file=sys.stderr)
        sys.exit(2)
    return cfg


def prepare_model(cfg: FedMilmConfig) -> None:
    """Convert the embedded model once, here, before any worker process would race to do it."""
    if cfg.model.source == "smollm2":
        smollm2.model_dir(cfg.model.cache_dir)
    elif cfg.model.source == "llama-config":  # config-built models borrow SmolLM2's tokenizer
        smollm2.tokenizer_dir(cfg.model.cache_dir)


def load_component(ref: str) -> Any:
    """Resolve a 'module:attribute' component string, as Flower's app components are named."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
