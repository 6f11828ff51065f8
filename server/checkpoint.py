"""Server checkpoints: everything needed to continue a run after the server dies.

One folder per completed round, `checkpoints/round_NNNN/`, written under a temporary name and
renamed into place, so a folder that exists is complete: a `kill -9` mid-write leaves only a
temporary folder that is ignored and cleaned up. The last `KEEP` rounds are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedmilm.adapters import State

log = logging.getLogger("fedmilm.server")

KEEP = 2
FORMAT_VERSION = 2
_PREFIX = "round_"
OPTIMIZER_FILE = "server_optimizer.safetensors"


@dataclass
class ServerState:
    """The server's state after `round` completed rounds."""

    round: int
    global_state: State
    sampler: random.Random
    aggregator: dict[str, Any]
    ledger_trainings: dict[int, int]   # sample-level DP (without user-level): device id -> the
                                       # ledger count it last reported (a decrease is flagged)
    epsilon_sample_max: float | None = None  # simulation diagnostics: largest phone epsilon
    optimizer: State = field(default_factory=dict)  # the server optimizer's tensors (if any)


def config_fingerprint(config_text: str) -> str:
    """Identifies the run's config, so a checkpoint is never resumed under another one."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


def _sampler_to_json(sampler: random.Random) -> list:
    version, internal, gauss = sampler.getstate()
    return [version, list(internal), gauss]


def _sampler_from_json(raw: list) -> random.Random:
    sampler = random.Random()
    sampler.setstate((raw[0], tuple(raw[1]), raw[2]))
    return sampler


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, state: ServerState, *, fingerprint: str) -> Path:
    """Write round `state.round` atomically; drop all but the newest `KEEP` rounds."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{state.round:04d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.global_state.items()}
    save_file(tensors, str(tmp / "global.safetensors"))
    if state.optimizer:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.optimizer.items()},
                  str(tmp / OPTIMIZER_FILE))
    meta = {"version": FORMAT_VERSION, "round": state.round, "config": fingerprint,
            "sampler": _sampler_to_json(state.sampler), "aggregator": state.aggregator,
            "ledger_trainings": {str(k): v for k, v in state.ledger_trainings.items()},
            "epsilon_sample_max": state.epsilon_sample_max}
    with open(tmp / "server.json", "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a rerun of a round replaces its old folder
    os.replace(tmp, final)
    _fsync_dir(folder)
    for old in checkpoints(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to another config or format: resuming from it would be wrong."""


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete round folder, or None when there is none."""
    rounds = checkpoints(folder)
    return rounds[-1] if rounds else None


def checkpoints(folder: Path) -> list[Path]:
    """Every complete round folder, oldest first (by number: round_10000 after round_9999)."""
    found = [p for p in folder.glob(f"{_PREFIX}[0-9]*")
             if p.is_dir() and p.name.removeprefix(_PREFIX).isdigit()]
    return sorted(found, key=round_of)


def round_of(path: Path) -> int:
    """The round number a checkpoint folder is named after."""
    return int(path.name.removeprefix(_PREFIX))


def load_latest_intact(folder: Path, *, fingerprint: str) -> tuple[Path, ServerState] | None:
    """The newest checkpoint that loads; a damaged newer one (a disk error, a hand edit) is
    skipped with a warning. `CheckpointMismatch` (another config) is never skipped."""
    for path in reversed(checkpoints(folder)):
        try:
            return path, load_checkpoint(path, fingerprint=fingerprint)
        except CheckpointMismatch:
            raise
        except Exception as err:  # noqa: BLE001 - any damage: fall back to an older round
            log.warning("checkpoint %s is damaged (%s: %s); trying the one before it", path,
                        type(err).__name__, str(err).splitlines()[0][:120] if str(err) else "")
    return None


def load_checkpoint(path: Path, *, fingerprint: str) -> ServerState:
    """Read one round folder; refuses another config's or format's checkpoint."""
    meta = json.loads((path / "server.json").read_text(encoding="utf-8"))
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{path}: checkpoint format {meta.get('version')} is not "
                                 "supported")
    if meta["config"] != fingerprint:
        raise CheckpointMismatch(f"{path}: checkpoint was written under a different config; "
                                 "resume with the run's own config.yaml")
    return ServerState(round=int(meta["round"]),
                       global_state=load_file(str(path / "global.safetensors")),
                       sampler=_sampler_from_json(meta["sampler"]),
                       aggregator=meta["aggregator"],
                       ledger_trainings={int(k): int(v)
                                         for k, v in meta["ledger_trainings"].items()},
                       epsilon_sample_max=meta["epsilon_sample_max"],
                       optimizer=load_file(str(path / OPTIMIZER_FILE))
                       if (path / OPTIMIZER_FILE).exists() else {})
