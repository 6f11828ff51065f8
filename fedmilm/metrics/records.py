"""Per-round metrics: the record written to `metrics.jsonl`, one JSON object a line."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

log = logging.getLogger("fedmilm")


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
    clients: int | None            # phones whose update was aggregated (0 if skipped; null
                                   # under user-level DP: not released unnoised)
    sampled: int | None
    rejected: int | None
    declined: int | None           # phones that declined to train (budget, policy, ...)
    train_loss: float | None
    loss_base: float | None
    loss_global: float | None
    loss_personal: float | None
    bytes_up: int | None           # update bytes received this round, all phones together
    bytes_down: int | None         # global-adapter bytes sent for training
    seconds: float | None
    tokens_per_s: float | None     # local training throughput summed over phones
    epsilon_user: float | None = None
    epsilon_sample_max: float | None = None
    delta: float | None = None
    accountant: str | None = None  # which accountant produced the epsilons
    skipped: bool = False          # too few valid replies: the global adapter did not change
    available: int | None = None   # phones the availability trace allowed to be sampled
    loss_by_rank: dict[str, dict] | None = None  # heterogeneous ranks: mean losses per rank
    seeded_noise: bool = False     # DP randomness reproducible from the seed (tests only)
    diagnostics: str | None = None  # where per-phone values came from when not from the wire
    ledger_decreases: int | None = None  # phones whose ledger count went back (a reset budget)
    interrupted: bool = False      # the server died after this round was accounted and
                                   # checkpointed, before it was evaluated and recorded
    evaluated: int | None = None   # phones whose held-out losses were averaged (each one's
                                   # row is in per_phone.jsonl.gz)
    seconds_train: float | None = None  # the training phase alone (send to last reply)
    clip_norm: float | None = None  # adaptive clipping: the user-level clip of this round
    epsilon_server: float | None = None  # distributed noise: against the server operator


DIAGNOSTICS_LABEL = ("simulator: per-phone values the virtual phones left on disk, outside the "
                     "wire protocol and outside the DP guarantee")


def interrupted_record(server_round: int, *, epsilon_user: float | None,
                       delta: float | None, accountant: str | None) -> RoundRecord:
    """The line for a round that was accounted and checkpointed but never recorded (its
    privacy fields come from the checkpointed accountant)."""
    return RoundRecord(round=server_round, clients=None, sampled=None, rejected=None,
                       declined=None, train_loss=None, loss_base=None, loss_global=None,
                       loss_personal=None, bytes_up=None, bytes_down=None, seconds=None,
                       tokens_per_s=None, epsilon_user=epsilon_user, delta=delta,
                       accountant=accountant, interrupted=True)


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
    """All rounds of a run, in order. A torn last line (what `kill -9` in the middle of an
    append leaves) is dropped with a warning; a bad line before it is an error naming it."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [(n, line) for n, line in enumerate(handle, start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if index < len(lines) - 1:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from err
            log.warning("%s:%d: dropped a torn last line (an interrupted write)", path, number)
    return records


def format_progress(record: RoundRecord, total_rounds: int) -> str:
    """One human line per round."""
    def fmt(value: float | None) -> str:
        return "  -  " if value is None else f"{value:.3f}"

    def count(value: int | None) -> str:
        return "-" if value is None else str(value)

    privacy = ""
    if record.epsilon_user is not None or record.epsilon_sample_max is not None:
        privacy = (f" | eps user {fmt(record.epsilon_user)} sample-max "
                   f"{fmt(record.epsilon_sample_max)}")
    if record.epsilon_server is not None:
        privacy += f" server {fmt(record.epsilon_server)}"
    if record.seeded_noise:
        privacy += " | SEEDED DP NOISE (tests only)"
    skipped = " SKIPPED (adapter unchanged)" if record.skipped else ""
    if record.available is not None:
        skipped += f" | available {record.available}"
    up = "-" if record.bytes_up is None else f"{record.bytes_up / 1e6:.2f}"
    return (f"round {record.round:>3}/{total_rounds}{skipped} | clients "
            f"{count(record.clients)}/{count(record.sampled)}"
            f" (rejected {count(record.rejected)}, declined {count(record.declined)}) | train "
            f"{fmt(record.train_loss)} | held-out base {fmt(record.loss_base)} global "
            f"{fmt(record.loss_global)} personal {fmt(record.loss_personal)}{privacy} | "
            f"{up} MB up | {record.seconds or 0:.1f} s")
