"""Per-round metrics: the record written to `metrics.jsonl`, one JSON object a line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean


@dataclass(frozen=True)
class ClientEval:
    """One phone's held-out losses, keyed by its device id (the stable pseudonym a phone
    announces: `partition-id` of its node config), never by anything it holds."""

    device: int
    loss_base: float
    loss_global: float
    loss_personal: float | None
    rank: int | None = None        # heterogeneous ranks: the phone's LoRA rank


@dataclass(frozen=True)
class RoundRecord:
    """Everything a user needs to judge one round. Privacy fields are null without DP."""

    round: int
    clients: int                   # phones whose update was aggregated (0 if skipped)
    sampled: int
    rejected: int
    declined: int                  # phones that refused to train (DP-SGD budget spent)
    train_loss: float | None
    loss_base: float | None
    loss_global: float | None
    loss_personal: float | None
    bytes_up: int                  # update bytes received this round, all phones together
    bytes_down: int                # global-adapter bytes sent for training
    seconds: float
    tokens_per_s: float | None     # local training throughput summed over phones
    epsilon_user: float | None = None
    epsilon_sample_max: float | None = None
    delta: float | None = None
    accountant: str | None = None  # which accountant produced the epsilons
    skipped: bool = False          # too few valid replies: the global adapter did not change
    available: int | None = None   # phones the availability trace allowed to be sampled
    loss_by_rank: dict[str, dict] | None = None  # heterogeneous ranks: mean losses per rank
    per_client: list[ClientEval] = field(default_factory=list)


def losses_by_rank(evals: list[ClientEval]) -> dict[str, dict] | None:
    """Utility per device tier: mean held-out losses of the phones of each LoRA rank."""
    ranks = sorted({e.rank for e in evals if e.rank is not None})
    if not ranks:
        return None
    out = {}
    for rank in ranks:
        group = [e for e in evals if e.rank == rank]
        out[str(rank)] = {"phones": len(group),
                          "loss_global": mean_or_none([e.loss_global for e in group]),
                          "loss_personal": mean_or_none([e.loss_personal for e in group])}
    return out


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the non-null values, or None when there are none."""
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def append_record(path: Path, record: RoundRecord) -> None:
    """Append one round to `metrics.jsonl` (flushed, so a crash keeps every finished round)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(record)) + "\n")
        handle.flush()


def read_records(path: Path) -> list[dict]:
    """All rounds of a run, in order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def format_progress(record: RoundRecord, total_rounds: int) -> str:
    """One human line per round."""
    def fmt(value: float | None) -> str:
        return "  -  " if value is None else f"{value:.3f}"

    privacy = ""
    if record.epsilon_user is not None or record.epsilon_sample_max is not None:
        privacy = (f" | eps user {fmt(record.epsilon_user)} sample-max "
                   f"{fmt(record.epsilon_sample_max)}")
    skipped = " SKIPPED (adapter unchanged)" if record.skipped else ""
    if record.available is not None:
        skipped += f" | available {record.available}"
    return (f"round {record.round:>3}/{total_rounds}{skipped} | clients "
            f"{record.clients}/{record.sampled}"
            f" (rejected {record.rejected}, declined {record.declined}) | train "
            f"{fmt(record.train_loss)} | held-out base {fmt(record.loss_base)} global "
            f"{fmt(record.loss_global)} personal {fmt(record.loss_personal)}{privacy} | "
            f"{record.bytes_up / 1e6:.2f} MB up | {record.seconds:.1f} s")
