"""fedmilm: privacy-preserving federated LoRA fine-tuning of on-device language models."""

__version__ = "0.1.0"
