"""LoRA adapters: the global/personal split, in-place swapping, PEFT export."""

from fedmilm.adapters.peft_io import load_global_adapter, save_global_adapter
from fedmilm.adapters.space import (
                                    AdapterLayout,
                                    AdapterSpace,
                                    State,
                                    build_adapter_space,
                                    cached_adapter_space,
                                    is_global,
)

__all__ = ["AdapterLayout", "AdapterSpace", "State", "build_adapter_space",
           "cached_adapter_space", "is_global", "load_global_adapter", "save_global_adapter"]
