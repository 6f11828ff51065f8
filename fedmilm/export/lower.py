"""Lower exported graphs to ExecuTorch programs (`.pte` bytes, plus the `.ptd` bytes of the
frozen base when the program keeps it outside)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from executorch.backends.xnnpack.partition.config.gemm_configs import (
    AddmmConfig,
    LinearConfig,
    MMConfig,
)
from executorch.backends.xnnpack.partition.config.generic_node_configs import (
    BMMConfig,
    PermuteConfig,
)
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
from torch.export import ExportedProgram
from torch.fx import Node

from fedmilm.export.graphs import BASE_PREFIX

BASE_TAG = "base"  # the external data file ExecuTorch writes the base's constants into


def _core_aten_only(program: ExportedProgram) -> ExportedProgram:
    """Rewrite `aten.empty_permuted` (not core ATen; HF Llama's backward emits it) into
    `aten.empty`: both make an uninitialised buffer that is fully overwritten, and the
    permutation only picks a memory layout, which ExecuTorch plans itself."""
    changed = False
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.empty_permuted.default:
            node.target = torch.ops.aten.empty.memory_format
            node.args = (node.args[0],)
            changed = True
    if changed:
        program.graph_module.recompile()
    return program


def _without_round_trip_transposes(program: ExportedProgram) -> ExportedProgram:
    """Drop `permute(permute(x))` pairs that give `x` back. The backward of every linear layer
    multiplies by the transpose of the forward's transposed weight; ExecuTorch would copy the
    base's weights twice per step for it (a fifth of the delegated default-model step)."""
    permute = torch.ops.aten.permute.default
    changed = False
    for node in program.graph.nodes:
        inner = node.args[0] if node.op == "call_function" and node.target == permute else None
        if isinstance(inner, Node) and inner.op == "call_function" and inner.target == permute:
            outer_dims, inner_dims = node.args[1], inner.args[1]
            if all(inner_dims[d] == i for i, d in enumerate(outer_dims)):
                node.replace_all_uses_with(inner.args[0])
                changed = True
    if changed:
        program.graph.eliminate_dead_code()
        program.graph_module.recompile()
    return program


def _base_constant(node: Node) -> str | None:
    return BASE_TAG if BASE_PREFIX in node.name else None


def _products_to_xnnpack() -> XnnpackPartitioner:
    """The products and the transposes around them (ExecuTorch's own transpose copies element
    by element), with weights as the delegate's inputs rather than its own constants: the frozen
    base stays in the one shared `base.ptd` (XNNPACK would otherwise copy each weight into the
    program) and the adapter, an input, is a weight XNNPACK accepts. The full partitioner grew
    past 24 GiB lowering the default model's train program."""
    return XnnpackPartitioner(configs=[MMConfig, AddmmConfig, LinearConfig, BMMConfig,
                                       PermuteConfig],
                              force_non_static_weights_for_f32_linear=True)


@dataclass(frozen=True)
class Lowered:
    """One lowered program: its `.pte`, the base's `.ptd` (or None), and the bytes of working
    memory ExecuTorch planned for it (allocated when the program is loaded)."""

    pte: bytes
    base: bytes | None
    planned_bytes: int


def to_executorch(program: ExportedProgram, *, delegate: str = "none") -> Lowered:
    """The base's constants (see `graphs.BASE_PREFIX`) go to the `.ptd`, so every program of a
    bundle shares one base file. `delegate="xnnpack"` hands the matrix products (70% of a step
    on ExecuTorch's own kernels) to XNNPACK, each as its own small partition."""
    core = _without_round_trip_transposes(_core_aten_only(program.run_decompositions()))
    edge = (to_edge(core) if delegate == "none"
            else to_edge_transform_and_lower(core, partitioner=[_products_to_xnnpack()]))
    lowered = edge.to_executorch(ExecutorchBackendConfig(external_constants=_base_constant))
    buffer = io.BytesIO()
    lowered.write_to_file(buffer)
    blobs = {name: bytes(blob) for name, blob in lowered._tensor_data.items()}
    if set(blobs) - {BASE_TAG}:
        raise RuntimeError(f"ExecuTorch wrote unexpected data files {sorted(blobs)}")
    plan = lowered.executorch_program.execution_plan[0]
    return Lowered(buffer.getvalue(), blobs.get(BASE_TAG), sum(plan.non_const_buffer_sizes))
