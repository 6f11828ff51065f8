"""A phone's own storage: its personal adapter, which never leaves the device, and a record of
how many DP-SGD trainings its privacy ledger had charged when it last trained."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedmilm.adapters.space import AdapterLayout, State

PERSONAL_FILE = "personal_adapter.safetensors"
META_FILE = "personal_adapter.json"
TRAINED_FILE = "trained.json"


def _fingerprint(space: AdapterLayout) -> str:
    """Identifies the adapter layout, so a stale file from another setup is never loaded."""
    layout = [(k, list(space.initial[k].shape)) for k in space.personal_keys]
    return hashlib.sha256(json.dumps([space.mode, layout]).encode()).hexdigest()[:16]


class DeviceStorage:
    """The folder `devices/<id>/` of one (virtual) phone."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def load_personal(self, space: AdapterLayout) -> State:
        """The stored personal part, or its initial value on a phone's first round."""
        if not space.personal_keys:
            return {}
        path = self.folder / PERSONAL_FILE
        if not path.is_file():
            return space.initial_state(space.personal_keys)
        meta = json.loads((self.folder / META_FILE).read_text())
        if meta.get("layout") != _fingerprint(space):
            raise ValueError(f"{path} was written for a different model/LoRA/personalization "
                             "setup; use a new run directory or delete that file")
        return load_file(str(path))

    def save_personal(self, space: AdapterLayout, personal: State) -> None:
        """Write atomically (temp file + rename): a crash never leaves a half-written adapter."""
        if not personal:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{PERSONAL_FILE}.tmp"
        save_file({k: v.contiguous() for k, v in personal.items()}, str(tmp))
        (self.folder / META_FILE).write_text(json.dumps({"layout": _fingerprint(space)}))
        os.replace(tmp, self.folder / PERSONAL_FILE)

    def record_training(self, ledger_trainings: int) -> None:
        """Mark that this phone holds trained state, with its ledger's training count then
        (0 without DP-SGD): a ledger later found missing or behind it was lost or rolled back."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{TRAINED_FILE}.tmp"
        tmp.write_text(json.dumps({"ledger_trainings": ledger_trainings}))
        os.replace(tmp, self.folder / TRAINED_FILE)

    def ledger_trainings(self) -> int | None:
        """The ledger's training count at the last training; None if the phone never trained
        and -1 if it holds a personal adapter but no such record (its history is unknown)."""
        path = self.folder / TRAINED_FILE
        if path.is_file():
            try:
                return int(json.loads(path.read_text())["ledger_trainings"])
            except (ValueError, KeyError, TypeError):
                return -1
        return -1 if (self.folder / PERSONAL_FILE).is_file() else None
