"""Simulator diagnostics: per-phone results a virtual phone leaves on the researcher's disk.

Under differential privacy a phone's reply carries its clipped update and nothing else. In a
simulation the researcher owns every virtual phone and may still want their losses, epsilons and
timings; the phones write them here, outside the wire protocol, and the server's records label
them as outside the DP guarantee. A deployed phone has no diagnostics folder and writes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TRAIN, EVALUATE = "train", "evaluate"


def _folder(root: Path, server_round: int, kind: str) -> Path:
    return root / f"round_{server_round:04d}" / kind


def write_diagnostic(root: Path, server_round: int, kind: str, device: int,
                     values: dict[str, float | int | None]) -> None:
    """One phone's numbers for one round (atomic: a reader never sees half a file)."""
    folder = _folder(root, server_round, kind)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{device}.tmp"
    tmp.write_text(json.dumps(values))
    os.replace(tmp, folder / f"{device}.json")


def read_diagnostics(root: Path, server_round: int, kind: str,
                     devices: list[int]) -> dict[int, dict]:
    """The numbers `devices` left for this round (phones that left none are absent)."""
    folder, out = _folder(root, server_round, kind), {}
    for device in devices:
        path = folder / f"{device}.json"
        if path.is_file():
            out[device] = json.loads(path.read_text())
    return out
