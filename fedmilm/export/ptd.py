"""Adapter tensors <-> ExecuTorch `.ptd` (FlatTensor) bytes.

The server writes each round's global adapter (personal tensors at their initial values) into a
`.ptd` for the phone's runtime, which hands the tensors to the programs as inputs, and reads a
phone's trained tensors back. Keys are the manifest's `program_key`s (the PEFT keys).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from executorch.exir._serialize._cord import Cord
from executorch.exir._serialize.data_serializer import DataEntry, DataPayload
from executorch.exir.scalar_type import ScalarType
from executorch.exir.tensor_layout import TensorLayout
from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

from fedmilm.export.manifest import Manifest

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


def adapter_to_ptd(manifest: Manifest, state: Mapping[str, torch.Tensor]) -> bytes:
    """A `.ptd` for the exported `train.pte` from PEFT-keyed adapter tensors (every tensor the
    manifest lists: the server fills the personal part with its initial values)."""
    missing = [t.peft_key for t in manifest.adapter if t.peft_key not in state]
    if missing:
        raise KeyError(f"{len(missing)} adapter tensor(s) missing for the .ptd, e.g. "
                       f"{missing[0]!r}")
    for t in manifest.adapter:
        if list(state[t.peft_key].shape) != t.shape:
            raise ValueError(f"{t.peft_key}: shape {list(state[t.peft_key].shape)} != exported "
                             f"{t.shape}")
    return write_ptd({t.program_key: state[t.peft_key] for t in manifest.adapter})


def ptd_to_adapter(manifest: Manifest, blob: bytes) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of a phone's `.ptd`; names or shapes the manifest does not know are
    an error (nothing is silently dropped)."""
    tensors = read_ptd(blob)
    known = {t.program_key: t for t in manifest.adapter}
    unknown = sorted(set(tensors) - set(known))
    if unknown or len(tensors) != len(known):
        raise ValueError(f"the .ptd does not match the manifest: {len(unknown)} unknown and "
                         f"{len(set(known) - set(tensors))} missing tensor(s)")
    for name, value in tensors.items():
        if list(value.shape) != known[name].shape:
            raise ValueError(f"{name}: shape {list(value.shape)} != exported {known[name].shape}")
    return {known[name].peft_key: value for name, value in tensors.items()}
