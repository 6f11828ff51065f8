"""Adapter tensors <-> ExecuTorch `.ptd` (FlatTensor) bytes.

The server writes each round's global adapter (plus, on the phone, its personal part) into a
`.ptd` that the exported training program loads, and reads a phone's trained tensors back.
Keys are the program's tensor names; `Manifest.program_keys` maps them to PEFT keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from executorch.exir._serialize._cord import Cord
from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
from executorch.exir.scalar_type import ScalarType
from executorch.exir.tensor_layout import TensorLayout
from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

ALIGNMENT = 16
_DTYPES = {ScalarType.FLOAT: torch.float32}


def write_ptd(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise float32 tensors by name."""
    buffers, entries = [], {}
    for index, (name, tensor) in enumerate(tensors.items()):
        value = tensor.detach().to(torch.float32).contiguous()
        buffers.append(value.numpy().tobytes())
        entries[name] = DataEntry(buffer_index=index, alignment=ALIGNMENT,
                                  tensor_layout=TensorLayout.from_tensor(value))
    return bytes(FlatTensorSerializer().serialize(DataPayload(buffers=buffers,
                                                              named_data=entries)))


def read_ptd(blob: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a `.ptd` by name (copies, so the blob can be dropped)."""
    payload = FlatTensorSerializer().deserialize(Cord(blob))
    tensors = {}
    for name, entry in payload.named_data.items():
        layout = entry.tensor_layout
        if layout is None or ScalarType(layout.scalar_type) not in _DTYPES:
            raise ValueError(f"{name}: not a float32 tensor entry; fedmilm adapters are float32")
        raw = bytearray(bytes(payload.buffers[entry.buffer_index]))
        flat = torch.frombuffer(raw, dtype=_DTYPES[ScalarType(layout.scalar_type)])
        tensors[name] = flat.reshape(layout.sizes).clone()
    return tensors
