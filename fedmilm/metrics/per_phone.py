"""Per-phone held-out losses, one gzip-compressed JSON line per evaluated round.

Kept out of `metrics.jsonl` so that file stays a few hundred bytes a round at any cohort
(1,000 evaluated phones would add ~100 KB to every line). `per_phone.jsonl.gz` grows with the
phones evaluated (`federation.clients_per_eval`), compressed about 5x.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import asdict
from pathlib import Path

from fedmilm.metrics.records import ClientEval

log = logging.getLogger("fedmilm")

PER_PHONE_FILE = "per_phone.jsonl.gz"


def append_per_phone(path: Path, server_round: int, evals: list[ClientEval]) -> None:
    """Append one round's rows (a gzip member of its own: a crash loses at most this one)."""
    if not evals:
        return
    line = json.dumps({"round": server_round, "phones": [asdict(e) for e in evals]})
    with gzip.open(path, "at", encoding="utf-8") as handle:
        handle.write(line + "\n")


def read_per_phone(path: Path) -> dict[int, list[dict]]:
    """round -> its phones' rows. Member by member: a torn last member (a crash in the middle
    of an append) is dropped whole, never half-read."""
    rounds: dict[int, list[dict]] = {}
    data = path.read_bytes() if path.exists() else b""
    while data:
        member = zlib.decompressobj(wbits=31)  # one gzip member
        try:
            text = member.decompress(data)
        except zlib.error:
            text = b""
        if not member.eof:
            log.warning("%s: dropped a torn last round (an interrupted write)", path)
            break
        for line in text.decode("utf-8").splitlines():
            row = json.loads(line)
            rounds[int(row["round"])] = row["phones"]
        data = member.unused_data
    return rounds


def keep_rounds_up_to(path: Path, last_round: int) -> None:
    """Drop rounds after `last_round` (a resume redoes them)."""
    if not path.exists():
        return
    kept = {r: rows for r, rows in read_per_phone(path).items() if r <= last_round}
    path.unlink()
    for server_round, rows in sorted(kept.items()):
        append_per_phone(path, server_round, [ClientEval(**row) for row in rows])
