"""Lower exported graphs to ExecuTorch programs (`.pte` bytes, plus `.ptd` bytes of the
trainable tensors when they are kept outside the program)."""

from __future__ import annotations

import io

import torch
from executorch.exir import ExecutorchBackendConfig, to_edge
from torch.export import ExportedProgram


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


def to_executorch(program: ExportedProgram, *,
                  external_weights: bool = False) -> tuple[bytes, bytes | None]:
    """(`.pte` bytes, `.ptd` bytes or None). With `external_weights` the program's trainable
    tensors go to the `.ptd`, so a new adapter ships without resending the program."""
    lowered = to_edge(_core_aten_only(program.run_decompositions())).to_executorch(
        ExecutorchBackendConfig(external_mutable_weights=external_weights))
    buffer = io.BytesIO()
    lowered.write_to_file(buffer)
    data = None
    if external_weights:
        blobs = list(lowered._tensor_data.values())
        if len(blobs) != 1:
            raise RuntimeError(f"expected one external data file, ExecuTorch made {len(blobs)}")
        data = bytes(blobs[0])
    return buffer.getvalue(), data
