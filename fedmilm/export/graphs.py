"""The computations a phone runs, as `torch.export` graphs ready for ExecuTorch.

Every model program takes the adapter tensors as *inputs* (in the manifest's order) and holds the
frozen base as constants under stable names (`frozen_base__<module path>`), which lowering moves
into one external data file, `base.ptd`. So the programs themselves are small, the base ships
once and every program loads the same file, and a new adapter needs no new file on the phone's
side of the runtime (ExecuTorch loads one data file per program: the base).

- `train`: gradients of sum_i w_i * loss_i over a fixed-shape micro-batch (`grad_and_value`);
  with w_i = 1/b for the b real rows and 0 for padding, micro-batches add up to the batch mean.
- `dp_grad`: the per-example part of a DP-SGD step (Abadi et al. 2016, as Opacus does it):
  per-example gradients (`vmap(grad)`), clipping to `max_grad_norm`, plus Gaussian noise that
  the caller supplies as an input, divided by the expected batch size.
- `eval`: the summed next-token loss over labelled positions and their count (held-out loss per
  token, as the eager phone computes it; all-zero LoRA B matrices give the base model's).
- `adamw`: one AdamW update (PyTorch's single-tensor formula), because ExecuTorch's runtime
  only ships SGD and our eager phones train with AdamW.

Model programs are traced with `make_fx` first (`torch.export` cannot export `torch.func`
transforms directly), then exported. Shapes are fixed at export (micro-batch x sequence
length); callers pad, and padded rows carry zero weight (and no labels), so they change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch.export import ExportedProgram, export
from torch.func import functional_call, grad_and_value, vmap
from torch.fx.experimental.proxy_tensor import make_fx

from fedmilm.data.chat import Batch
from fedmilm.training.loss import per_example_loss, token_losses

BASE_PREFIX = "frozen_base__"  # names of the base's constants: lowering sends them to base.ptd
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


def batch_inputs(micro_batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Example inputs of the exported shapes (values are irrelevant for tracing)."""
    ids = torch.ones((micro_batch, seq_len), dtype=torch.long)
    return ids, torch.ones_like(ids), ids.clone()


def frozen_constants(model: torch.nn.Module) -> dict[int, str]:
    """id(tensor) -> stable name for every frozen tensor of `model` (the inner tensors of a
    quantized weight included), so that tracing names the base the same in every program."""
    names: dict[int, str] = {}
    for path, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if getattr(tensor, "requires_grad", False):
            continue
        stem = BASE_PREFIX + path.replace(".", "__")
        names[id(tensor)] = stem
        if hasattr(tensor, "__tensor_flatten__"):  # int8: qdata and scale are what is stored
            inner, _ = tensor.__tensor_flatten__()
            for attribute in inner:
                names[id(getattr(tensor, attribute))] = f"{stem}__{attribute}"
    return names


def _name_base(graph: torch.fx.GraphModule, names: dict[int, str]) -> torch.fx.GraphModule:
    """Rename the traced constants that are base tensors (make_fx calls them
    `_param_constantN` in tracing order) to their stable names."""
    renamed: dict[str, str] = {}
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target not in renamed:
            stable = names.get(id(getattr(graph, node.target)))
            if stable is None:  # a small constant made while tracing: stays in the program
                continue
            renamed[node.target] = stable
            setattr(graph, stable, getattr(graph, node.target))
        node.target = renamed[node.target]
    for old in renamed:
        delattr(graph, old)
    graph.recompile()
    return graph


def _traced_program(model: torch.nn.Module, fn: Callable[..., tuple],
                    args: tuple[torch.Tensor, ...]) -> ExportedProgram:
    """`fn(*args)` traced through `model` into an exported program with a stably named base."""
    with exportable(model):
        traced = _name_base(make_fx(fn, tracing_mode="real")(*args), frozen_constants(model))
        return export(_Traced(traced), args, strict=False)


def _adapter_args(adapter: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [adapter[k].detach().to(torch.float32).clone() for k in adapter]


def train_function(model: torch.nn.Module, keys: Sequence[str]) -> Callable[..., tuple]:
    """f(*adapter, input_ids, attention_mask, labels, example_weight) ->
    (*gradient, sum_i w_i * loss_i)."""
    count = len(keys)

    def weighted(adapter: tuple[torch.Tensor, ...], ids: torch.Tensor, mask: torch.Tensor,
                 labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        wrapped = _Functional(model, dict(zip(keys, adapter, strict=True)))
        return (per_example_loss(wrapped, Batch(ids, mask, labels)) * weight).sum()

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads, loss = grad_and_value(weighted)(tuple(args[:count]), *args[count:])
        return (*grads, loss)

    return step


def train_graph(model: torch.nn.Module, adapter: dict[str, torch.Tensor], *, micro_batch: int,
                seq_len: int) -> ExportedProgram:
    """`train_function` as an exported graph; inputs in `adapter`'s key order."""
    weights = torch.full((micro_batch,), 1.0 / micro_batch)
    args = (*_adapter_args(adapter), *batch_inputs(micro_batch, seq_len), weights)
    return _traced_program(model, train_function(model, list(adapter)), args)


def eval_function(model: torch.nn.Module, keys: Sequence[str]) -> Callable[..., tuple]:
    """f(*adapter, input_ids, attention_mask, labels) -> (summed token loss, token count)."""
    count = len(keys)

    def evaluate(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wrapped = _Functional(model, dict(zip(keys, args[:count], strict=True)))
        token, labelled = token_losses(wrapped, Batch(*args[count:]))
        return token.sum(), labelled.sum()

    return evaluate


def eval_graph(model: torch.nn.Module, adapter: dict[str, torch.Tensor], *, micro_batch: int,
               seq_len: int) -> ExportedProgram:
    """`eval_function` as an exported graph; inputs in `adapter`'s key order."""
    args = (*_adapter_args(adapter), *batch_inputs(micro_batch, seq_len))
    with torch.no_grad():
        return _traced_program(model, eval_function(model, list(adapter)), args)


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
    fn = dp_grad_function(model, list(adapter), max_grad_norm=max_grad_norm,
                          expected_batch=expected_batch)
    tensors = _adapter_args(adapter)
    args = (*tensors, *batch_inputs(micro_batch, seq_len), *[torch.zeros_like(t) for t in tensors])
    return _traced_program(model, fn, args)


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
