"""The three computations a phone runs, as `torch.export` graphs ready for ExecuTorch.

- `train`: one joint forward + backward over a fixed-shape micro-batch. Its trainable tensors
  (the LoRA adapter) are the program's parameters, so ExecuTorch's `TrainingModule` returns
  their gradients and lets the phone overwrite them in place.
- `dp_grad`: the per-example part of a DP-SGD step (Abadi et al. 2016, as Opacus does it):
  per-example gradients (`vmap(grad)`), clipping to `max_grad_norm`, plus Gaussian noise that
  the caller supplies as an input, divided by the expected batch size. Traced with `make_fx`
  first, because `torch.export` cannot export `torch.func.grad` directly.
- `adamw`: one AdamW update (PyTorch's single-tensor formula), because ExecuTorch's runtime
  only ships SGD and our eager phones train with AdamW.

Shapes are fixed at export (micro-batch x sequence length); callers pad, and padded rows carry
zero weight (and no labels), so they change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch.export import ExportedProgram, export
from torch.export.experimental import _export_forward_backward
from torch.func import functional_call, grad_and_value, vmap
from torch.fx.experimental.proxy_tensor import make_fx

from fedmilm.data.chat import Batch
from fedmilm.training.loss import per_example_loss

CLIP_EPSILON = 1e-6  # Opacus's per-sample clip factor: C / (norm + 1e-6)


@contextmanager
def exportable(model: torch.nn.Module):
    """Eager attention and eval mode while tracing: SDPA's CPU backward kernel is not a core
    ATen operator (ExecuTorch has no kernel for it), and dropout must not be traced."""
    config = model.config
    previous, was_training = config._attn_implementation, model.training
    model.set_attn_implementation("eager")
    model.eval()
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)


class WeightedLoss(torch.nn.Module):
    """sum_i w_i * loss_i: with w_i = 1/b for the b real rows of a batch and 0 for padding,
    gradients of micro-batches add up to the gradient of the batch mean."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, example_weight: torch.Tensor) -> torch.Tensor:
        losses = per_example_loss(self.model, Batch(input_ids, attention_mask, labels))
        return (losses * example_weight).sum()


def batch_inputs(micro_batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Example inputs of the exported shapes (values are irrelevant for tracing)."""
    ids = torch.ones((micro_batch, seq_len), dtype=torch.long)
    return ids, torch.ones_like(ids), ids.clone()


def train_graph(model: torch.nn.Module, *, micro_batch: int, seq_len: int) -> ExportedProgram:
    """Joint forward/backward graph; the model's trainable tensors become its parameters."""
    weights = torch.full((micro_batch,), 1.0 / micro_batch)
    with exportable(model):
        program = export(WeightedLoss(model), (*batch_inputs(micro_batch, seq_len), weights),
                         strict=False)
        return _export_forward_backward(program)


def _opacus_clip_sum(grads: Sequence[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    norms = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=-1) for g in grads], dim=1)
    factor = (max_grad_norm / (norms.norm(2, dim=1) + CLIP_EPSILON)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) for g in grads]


def dp_grad_function(model: torch.nn.Module, keys: Sequence[str], *, max_grad_norm: float,
                     expected_batch: int) -> Callable[..., tuple]:
    """f(*adapter, input_ids, attention_mask, labels, *noise) -> (*gradient, losses).

    gradient = (sum_i clip(g_i) + noise) / expected_batch, exactly Opacus's DPOptimizer for
    `loss_reduction="mean"` when noise = noise_multiplier * max_grad_norm * N(0, 1). The noise
    is an input because the multiplier is calibrated per phone (and a phone's runtime owns its
    random source). Padded rows have no labels, hence zero loss and zero gradient.
    """
    count = len(keys)

    def one_example(adapter: tuple[torch.Tensor, ...], ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        batch = Batch(ids.unsqueeze(0), mask.unsqueeze(0), labels.unsqueeze(0))
        wrapped = _Functional(model, dict(zip(keys, adapter, strict=True)))
        return per_example_loss(wrapped, batch)[0]

    per_example = vmap(grad_and_value(one_example), in_dims=(None, 0, 0, 0))

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        adapter, (ids, mask, labels), noise = args[:count], args[count:count + 3], args[count + 3:]
        grads, losses = per_example(tuple(adapter), ids, mask, labels)
        clipped = _opacus_clip_sum(grads, max_grad_norm)
        return (*[(g + z) / expected_batch for g, z in zip(clipped, noise, strict=True)],
                losses)

    return step


class _Functional(torch.nn.Module):
    """The model called with the adapter tensors given explicitly (for `torch.func`)."""

    def __init__(self, model: torch.nn.Module, adapter: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.adapter = model, adapter

    def forward(self, **kwargs: torch.Tensor):
        return functional_call(self.inner, self.adapter, args=(), kwargs=kwargs, strict=False)


class _Traced(torch.nn.Module):
    """Wraps a `make_fx` graph so that `torch.export` sees an ordinary module."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph

    def forward(self, *args: torch.Tensor):
        return self.graph_module(*args)


def dp_grad_graph(model: torch.nn.Module, adapter: dict[str, torch.Tensor], *, micro_batch: int,
                  seq_len: int, max_grad_norm: float, expected_batch: int) -> ExportedProgram:
    """`dp_grad_function` as an exported graph; inputs in `adapter`'s key order."""
    keys = list(adapter)
    fn = dp_grad_function(model, keys, max_grad_norm=max_grad_norm,
                          expected_batch=expected_batch)
    tensors = [adapter[k].detach().to(torch.float32).clone() for k in keys]
    args = (*tensors, *batch_inputs(micro_batch, seq_len), *[torch.zeros_like(t) for t in tensors])
    with exportable(model):
        traced = make_fx(fn, tracing_mode="real")(*args)
        return export(_Traced(traced), args, strict=False)


class AdamW(torch.nn.Module):
    """One step of `torch.optim.AdamW` (single-tensor form) with fixed hyper-parameters.

    forward(step, *params, *grads, *exp_avg, *exp_avg_sq) -> (*params, *exp_avg, *exp_avg_sq),
    where `step` counts from 1.
    """

    def __init__(self, count: int, *, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        self.count, self.lr, self.weight_decay = count, lr, weight_decay
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps

    def forward(self, step: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.count
        params, grads = tensors[:n], tensors[n:2 * n]
        exp_avgs, exp_avg_sqs = tensors[2 * n:3 * n], tensors[3 * n:]
        bias1 = 1 - torch.pow(self.beta1, step)
        bias2_sqrt = torch.sqrt(1 - torch.pow(self.beta2, step))
        new_params, new_avgs, new_sqs = [], [], []
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
            p = p * (1 - self.lr * self.weight_decay)
            m = m + (g - m) * (1 - self.beta1)
            v = v * self.beta2 + g * g * (1 - self.beta2)
            denom = torch.sqrt(v) / bias2_sqrt + self.eps
            new_params.append(p - (self.lr / bias1) * m / denom)
            new_avgs.append(m)
            new_sqs.append(v)
        return (*new_params, *new_avgs, *new_sqs)


def adamw_graph(shapes: Sequence[torch.Size], *, lr: float, weight_decay: float) -> ExportedProgram:
    # Distinct example tensors: export would treat one tensor passed twice as one input.
    args = (torch.ones(()), *[torch.zeros(s) for _ in range(4) for s in shapes])
    return export(AdamW(len(shapes), lr=lr, weight_decay=weight_decay), args, strict=False)
