"""Where virtual phones compute: `train.device=auto|cpu|cuda`.

A workstation's GPU runs the phones' local training and evaluation in simulation (real phones
run on their own CPU/NPU through the phone runtime). On CUDA the frozen base is bf16 (the
adapter stays float32: PEFT keeps LoRA weights in float32, and only float32 travels).
"""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The requested device is not there: one line for the user."""


def resolve_device(name: str, *, cuda_available: bool | None = None) -> str:
    """'cpu' or 'cuda' for `train.device`; auto picks CUDA when present."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "auto":
        return "cuda" if available else "cpu"
    if name == "cuda" and not available:
        raise DeviceError("train.device=cuda but this machine has no usable CUDA device "
                          "(torch.cuda.is_available() is False); use train.device=auto or cpu")
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"train.device={name!r} is not allowed; choose auto, cpu or cuda")
    return name


def base_dtype(model_dtype: str, device: str) -> str:
    """The frozen base's dtype on `device`: bf16 on CUDA (half the memory and the tensor
    cores' type), the configured `model.dtype` on CPU (where bf16 matmuls are slow)."""
    return "bfloat16" if device == "cuda" else model_dtype


def phones_gpu_share(device: str, gpus_per_client: float) -> float:
    """Ray's GPU resource per virtual phone: the configured share, or one whole GPU when
    phones train on CUDA and no share was set (Ray must know, or every worker lands on GPU 0
    unaccounted); none on CPU."""
    if device != "cuda":
        return 0.0
    return gpus_per_client if gpus_per_client > 0 else 1.0
