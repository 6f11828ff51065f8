"""Write the global adapter in PEFT's own format, loadable with `PeftModel.from_pretrained`."""

from __future__ import annotations

from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedmilm.adapters.space import AdapterSpace, State, adapter_names, is_global


def save_global_adapter(space: AdapterSpace, global_state: State, folder: str | Path,
                        *, base_model: str) -> Path:
    """Save only the global tensors as a PEFT adapter (personal tensors never reach disk here).

    Under `fedsa` the file holds the shared A matrices; PEFT then starts B from its zero init.
    Under FFA-LoRA the frozen A matrices of the global adapter go in too (they are the shared
    seed-fixed init, not personal). The space's model is the template and gets `global_state`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = adapter_names(space.mode)[0]
    space.load(global_state)
    tensors = get_peft_model_state_dict(space.model, adapter_name=name)
    exported = [*global_state, *(k for k in space.frozen_keys if is_global(k, space.mode))]
    wanted = {key.replace(f".{name}.", ".") for key in exported}
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items() if k in wanted}
    if len(tensors) != len(exported):
        raise RuntimeError(f"PEFT export found {len(tensors)} of {len(global_state)} tensors")
    config = space.model.peft_config[name]
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def load_global_adapter(space: AdapterSpace, folder: str | Path) -> State:
    """Read a global adapter written by `save_global_adapter` back into the space's naming."""
    name = adapter_names(space.mode)[0]
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    ours = {key.replace(f".{name}.", "."): key for key in space.global_keys}
    missing = sorted(set(ours) - set(tensors))
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} global tensor(s), e.g. {missing[0]!r}: "
                         "was it written for another model, LoRA or personalization setup?")
    return {ours[k]: tensors[k].to(space.initial[ours[k]].dtype) for k in ours}
