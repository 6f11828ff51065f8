"""The manifest: everything an on-device runtime needs to drive the exported programs.

Written as `manifest.json` beside the programs. The Android app (and our virtual phone) read
method names, tensor order, shapes and hyper-parameters from here instead of hard-coding them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
INITIAL_ADAPTER = "adapter.ptd"  # every adapter tensor at its exported value


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a program."""

    name: str
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class ProgramSpec:
    """One `.pte` file, its method and its calling convention."""

    file: str
    method: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data_file: str | None = None  # `.ptd` it loads (the base), if any
    description: str = ""
    planned_bytes: int = 0  # working memory ExecuTorch allocates when it loads the program


@dataclass(frozen=True)
class AdapterTensor:
    """One trainable adapter tensor: PEFT key, program key, shape, and whether it travels."""

    peft_key: str
    program_key: str
    shape: list[int]
    part: str  # global (sent to the server) | personal (stays on the phone)


@dataclass(frozen=True)
class BaseSpec:
    """The frozen base every model program loads: one data file, shipped once."""

    file: str
    sha256: str
    size: int
    dtype: str          # the base's float dtype (embeddings, norms, head)
    quantization: str   # none | int8: the decoder linears as stored in the file


@dataclass(frozen=True)
class Manifest:
    """What `fedmilm-export` wrote, and how to use it."""

    format_version: int
    model: dict[str, str]
    tokenizer: dict[str, object]
    lora: dict[str, object]
    personalization: str
    seq_len: int
    micro_batch: int
    hyper_parameters: dict[str, float | int | list[float]]
    dp: dict[str, float | int] | None
    adapter: list[AdapterTensor]
    base: BaseSpec
    programs: dict[str, ProgramSpec]
    versions: dict[str, str]
    config_fingerprint: str
    sha256: dict[str, str] = field(default_factory=dict)  # program / adapter file -> digest
    delegate: str = "none"  # the backend the model programs were lowered to (the runtime needs it)
    notes: list[str] = field(default_factory=list)

    def peft_keys(self) -> list[str]:
        """Adapter keys in program order (the order of every per-tensor input and output)."""
        return [t.peft_key for t in self.adapter]

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        return path

    @staticmethod
    def read(folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run fedmilm-export first")
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {raw.get('format_version')} is not "
                             f"{FORMAT_VERSION}; re-export with this fedmilm")
        raw["adapter"] = [AdapterTensor(**t) for t in raw["adapter"]]
        raw["base"] = BaseSpec(**raw["base"])
        inside(Path(folder), raw["base"].file, f"{path}: base.file")
        for name, program in raw["programs"].items():
            for key in ("file", "data_file"):
                if program.get(key) is not None:
                    inside(Path(folder), program[key], f"{path}: programs.{name}.{key}")
        raw["programs"] = {
            name: ProgramSpec(**{**p, "inputs": [TensorSpec(**t) for t in p["inputs"]],
                                 "outputs": [TensorSpec(**t) for t in p["outputs"]]})
            for name, p in raw["programs"].items()}
        return Manifest(**raw)


def inside(folder: Path, name: str, where: str) -> Path:
    """`folder/name`, refusing any name that would leave the bundle folder (absolute paths,
    `..`, sub-folders, links)."""
    candidate = folder / name
    if (not name or Path(name).is_absolute() or Path(name).name != name
            or candidate.resolve().parent != folder.resolve()):
        raise ValueError(f"{where}: {name!r} is not a file inside the bundle")
    return candidate
