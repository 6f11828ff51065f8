"""A quantized frozen base (`model.quantization=int8|nf4`): close to the float base on fresh
random data, backward keeps the quantized weight (not a float copy), DP-SGD and checkpointing
train through it exactly as through any base, and the memory planner counts it as stored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmilm.adapters import build_adapter_space
from fedmilm.config.validate import ConfigError
from fedmilm.data import encode_all, load_user
from fedmilm.model.quantize import (
    QuantizedLinear,
    dense_weight,
    quantize_frozen_base,
    stored_bytes,
)
from fedmilm.privacy.randomness import SeededRandom
from fedmilm.training import DpNoise, train_local
from fedmilm.training.memory import estimate_peak_bytes, gradient_checkpointing, weight_bytes
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
TOLERANCE = {"int8": 0.01, "nf4": 0.12}  # relative error of a layer's output (4-bit: ~9%)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576)])  # SmolLM2's linears
def test_a_quantized_layer_and_its_input_gradient_match_the_float_one(method, dtype, shape):
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(shape[1], shape[0]).to(dtype).requires_grad_(False)
    quantized = QuantizedLinear(linear, method)
    x = torch.randn(4, 7, shape[1], generator=generator).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = quantized(x), linear(x_ref)
    upstream = torch.randn(y.shape, generator=generator).to(dtype)
    y.backward(upstream)
    y_ref.backward(upstream)
    assert y.dtype == dtype and _relative(y, y_ref) < TOLERANCE[method]
    assert _relative(x.grad, x_ref.grad) < TOLERANCE[method]
    assert stored_bytes(quantized.weight) < 0.55 * linear.weight.numel() * 2  # int8 or 4-bit
    if method == "int8":  # the direct q x scale is torchao's own dequantization, bit for bit
        torch.testing.assert_close(dense_weight(quantized.weight, dtype),
                                   quantized.weight.dequantize(dtype), rtol=0, atol=0)
    elif dtype == torch.bfloat16:  # the chunked pair-table decode is torchao's, bit for bit
        torch.testing.assert_close(dense_weight(quantized.weight, dtype),
                                   quantized.weight.get_original_weight(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_backward_keeps_each_weight_quantized_not_a_float_copy(method):
    layers = [nn.Linear(1024, 1024, bias=False).to(torch.bfloat16).requires_grad_(False)
              for _ in range(6)]
    stack = nn.Sequential(*(QuantizedLinear(layer, method) for layer in layers))
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(stored_bytes(tensor))
        return tensor

    x = torch.randn(2, 1024, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        stack(x).float().sum().backward()
    float_weights = sum(layer.weight.numel() * 2 for layer in layers)
    assert sum(saved) < 0.55 * float_weights  # what the graph holds: the quantized tensors
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.fixture(scope="module")
def spaces():
    cfg = tiny_config("personalization=dual")
    built = {}
    for method in ("none", "int8", "nf4"):
        quantized = tiny_config("personalization=dual", f"model.quantization={method}")
        built[method] = build_adapter_space(quantized.model, quantized.lora, mode="dual", seed=0)
    examples = encode_all(built["none"].tokenizer, load_user(cfg.data, user=2, seed=0).train,
                          cfg.data.max_length)
    return built, examples


def test_the_quantized_base_with_lora_stays_close_to_the_float_base(spaces):
    built, _ = spaces
    generator = torch.Generator().manual_seed(5)
    start = {k: torch.randn(v.shape, generator=generator) * 0.05
             for k, v in built["none"].initial.items()}  # LoRA away from zero: it acts
    ids = torch.randint(0, built["none"].tokenizer.vocab_size, (3, 24), generator=generator)
    logits = {}
    for method, space in built.items():
        space.load(start)
        with torch.no_grad():
            logits[method] = space.model(input_ids=ids).logits
    replaced = sum(isinstance(m, QuantizedLinear) for m in built["int8"].model.modules())
    assert replaced == 7 * 2  # q k v o gate up down in each of the tiny model's 2 layers
    assert _relative(logits["int8"], logits["none"]) < 0.02
    assert 0 < _relative(logits["nf4"], logits["none"]) < 0.15
    assert tuple(built["int8"].initial) == tuple(built["none"].initial)  # the same adapter
    for key, value in built["none"].initial.items():
        assert torch.equal(built["int8"].initial[key], value)  # LoRA float32, same init


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_dp_sgd_and_checkpointing_train_through_a_quantized_base(spaces, method):
    built, examples = spaces
    space = built[method]
    start = {k: v.clone() for k, v in space.initial.items()}
    results = []
    for checkpointing in (False, True):
        space.load(start)
        with gradient_checkpointing(space.model, checkpointing):
            stats = train_local(space.model, space.trainable_parameters(), examples, epochs=1,
                                batch_size=8, lr=0.02, weight_decay=0.0,
                                pad_id=space.tokenizer.pad_token_id, seed=4,
                                dp=DpNoise(0.7, 1.0, SeededRandom(4)), micro_batch=None)
        results.append((space.state(tuple(start)), stats.steps))
    (plain, steps), (checkpointed, steps_ckpt) = results
    assert steps == steps_ckpt and steps  # DP-SGD ran the same steps
    moved = max(float((plain[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    for key in start:  # re-entrant recomputation through the quantized layers: same step
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_the_memory_planner_counts_the_base_as_stored(spaces):
    built, _ = spaces
    sizes = {m: weight_bytes(s.model) for m, s in built.items()}
    float_linears = sum(stored_bytes(m.weight) for name, m in
                        built["none"].model.named_modules()
                        if type(m) is nn.Linear and ".layers." in name and "lora_" not in name)
    assert sizes["none"] - sizes["int8"] > 0.45 * float_linears  # 4 bytes -> 1 (+ scales)
    assert sizes["int8"] > sizes["nf4"]
    estimates = {m: estimate_peak_bytes(s.model, micro_batch=2, seq_len=64, checkpointing=False,
                                        dp=True) for m, s in built.items()}
    assert estimates["int8"] < estimates["none"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.quantization=int4"], "model.quantization"),
    (["model.quantization=nf4", "client.runtime=executorch"], "nf4 is eager-only"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_a_model_without_decoder_linears_is_left_as_it_is():
    model = nn.Sequential(nn.Linear(8, 8).requires_grad_(False))  # no `.layers.` inside
    assert quantize_frozen_base(model, "int8") == 0 and type(model[0]) is nn.Linear
