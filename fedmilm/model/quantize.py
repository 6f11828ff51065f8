"""A quantized frozen base: int8 weight-only per output channel, or NF4 as in QLoRA (torchao).

Phones that fine-tune 1-2B models keep the frozen base quantized and train only the adapter.
`quantize_frozen_base` replaces every frozen linear layer of the decoder blocks (LoRA's base
layers included) by a `QuantizedLinear` holding torchao's quantized weight; embeddings, norms and
the LM head stay in `model.dtype` (SmolLM2 ties the head to the embeddings), LoRA tensors stay
float32.

Training needs gradients with respect to each layer's input through its frozen weight. torchao's
int8 linear saves a dequantized copy of the weight for the backward pass, which would keep a
float copy of every layer alive from forward to backward; `QuantizedLinear` saves the quantized
tensor and dequantizes it again in backward (as torchao's own NF4 linear does), so a step holds
one float layer at a time. Opacus's per-example hooks sit on the LoRA layers only, and
re-entrant checkpointing simply recomputes through it.
"""

from __future__ import annotations

import ctypes
import gc

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import Int8Tensor, NF4Tensor, PerRow

from fedmilm.config.validate import QUANTIZATIONS

NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's blocks: 64 weights per scale, 256 scales per
                                       # second-level scale
DEQUANTIZE_CHUNK = 2**18  # NF4 weights decoded at a time (their int64 codes: 2 MiB)


def scaler_block(scalers: int) -> int:
    """QLoRA's 256 scales per second-level scale, or the largest divisor of `scalers` below it
    (torchao needs whole blocks: 576 x 576 weights have 5,184 scales, so 192)."""
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, scalers) + 1) if scalers % d == 0)


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight a quantized tensor stands for. Symmetric per-row int8 is q x scale,
    computed straight in `dtype`: torchao's general dequantize goes through int32 and float32
    copies (5x the result's size at its peak, on every use of every layer)."""
    if isinstance(weight, NF4Tensor):
        return _nf4_dense(weight, dtype)
    scale = weight.scale.to(dtype)
    if scale.dim() == 1:  # torchao keeps per-row scales as (out, 1); a view of a constant
        scale = scale.view(-1, 1)  # would not lower to ExecuTorch
    return weight.qdata.to(dtype).mul_(scale)  # symmetric: no zero point


def _nf4_dense(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NF4 -> `dtype`, a chunk at a time into one output tensor. torchao's
    `get_original_weight` decodes every 4-bit code into an int64 index at once (~11x the float
    result's size at its peak, measured), which would dwarf the layer it dequantizes. Each byte
    holds two codes, so one lookup in a 256-entry table of value pairs decodes both."""
    count, block = weight.numel(), weight.block_size
    table = weight.nf4.to(dtype)
    byte = torch.arange(256)
    pairs = torch.stack((table[byte >> 4], table[byte & 0b1111]), dim=-1)
    packed = _PAIR_WORD[dtype]
    pairs = pairs.view(packed).view(256)  # one machine word per byte's two values
    scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                       weight.scaler_block_size).to(dtype)
    out = torch.empty(count, dtype=dtype)
    step = max(block, DEQUANTIZE_CHUNK // block * block)
    for start in range(0, count, step):
        end = min(start + step, count)
        codes = weight.quantized_data[start // 2:end // 2].long()
        values = pairs[codes].view(dtype).view(-1, block)
        out[start:end] = values.mul_(scales[start // block:end // block, None]).view(-1)
    return out.view(weight.shape)


_PAIR_WORD = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


class _DequantizingLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen quantized W, keeping W quantized (not its float copy) for the
    backward pass. Written in functorch's form (`setup_context`, a generated vmap rule), so
    the exported programs can trace it through `grad` and `vmap`; the layer travels as a
    plain object, since functorch would unwrap a quantized tensor passed as an input."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        return F.linear(x, dense_weight(layer.weight, x.dtype), layer.bias)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
        ctx.layer = inputs[1]  # frozen: nothing to track for autograd

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ dense_weight(ctx.layer.weight, grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight lives quantized (int8 or NF4)."""

    def __init__(self, linear: nn.Linear, method: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if method == "int8":
            quantized = Int8Tensor.from_hp(weight, granularity=PerRow())
            zero = getattr(quantized, "zero_point", None)
            if zero is not None and bool(zero.any()):  # `dense_weight` assumes symmetric
                raise RuntimeError("torchao quantized a weight asymmetrically; this torchao "
                                   "version is not supported")
        elif method == "nf4":
            quantized = NF4Tensor.from_tensor(weight, NF4_BLOCK,
                                              scaler_block(weight.numel() // NF4_BLOCK))
        else:
            raise ValueError(f"unknown quantization {method!r}; use one of {QUANTIZATIONS}")
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.bias = (None if linear.bias is None
                     else nn.Parameter(linear.bias.detach(), requires_grad=False))
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizingLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.method}"


def quantizable(name: str, module: nn.Module) -> bool:
    """A frozen linear layer of the decoder blocks (not a LoRA tensor, not the LM head)."""
    return (type(module) is nn.Linear and not module.weight.requires_grad
            and ".layers." in f".{name}." and "lora_" not in name)


def quantize_frozen_base(model: nn.Module, method: str) -> int:
    """Quantize the frozen decoder linears of `model` in place; the number replaced."""
    if method == "none":
        return 0
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; use one of {QUANTIZATIONS}")
    names = [name for name, module in model.named_modules() if quantizable(name, module)]
    for name in names:  # by name: no reference to a float layer outlives its replacement
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantizedLinear(getattr(parent, child), method))
    release_freed_memory()
    return len(names)


def release_freed_memory() -> None:
    """Hand the float weights' freed pages back to the OS (glibc keeps freed heap memory in the
    process, so the resident size would stay that of the float base)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: a quantized tensor's inner data, not its nominal dtype."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
