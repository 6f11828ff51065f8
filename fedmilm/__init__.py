"""fedmilm: privacy-preserving federated LoRA fine-tuning of on-device language models."""

from fedmilm.runtime import quiet_logs

quiet_logs()  # before any submodule imports peft/torchao: workers start quiet too

__version__ = "0.1.0"
