"""Config schema, loading and validation."""

from fedmilm.config.load import load_config, to_yaml
from fedmilm.config.schema import FedMilmConfig
from fedmilm.config.validate import ConfigError, validate_config

__all__ = ["ConfigError", "FedMilmConfig", "load_config", "to_yaml", "validate_config"]
