"""What the server writes: each round's line in `metrics.jsonl`, and at the end the PEFT
adapter, plots and `summary.json`. Under DP nothing per phone comes from the wire: simulator
diagnostics are read from disk and labelled as outside the guarantee."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedmilm import protocol
from fedmilm.adapters import AdapterSpace, State, save_global_adapter
from fedmilm.aggregation import Aggregator
from fedmilm.config import FedMilmConfig
from fedmilm.metrics import (
    DIAGNOSTICS_LABEL,
    ClientEval,
    RoundRecord,
    losses_by_rank,
    mean_or_none,
    plot_clients,
    plot_losses,
    plot_privacy,
    read_records,
)
from fedmilm.metrics.diagnostics import TRAIN as DIAG_TRAIN
from fedmilm.metrics.diagnostics import read_diagnostics
from fedmilm.metrics.per_phone import PER_PHONE_FILE, read_per_phone
from fedmilm.server.checkpoint import ServerState
from fedmilm.server.messages import TrainOutcome, Wiring


def round_record(server_round: int, *, cohort: list[int], outcome: TrainOutcome,
                  evals: list[ClientEval], bytes_down: int, started: float,
                  seconds_train: float,
                  aggregator: Aggregator, state: ServerState, cfg: FedMilmConfig,
                  trained: dict[int, dict] | None) -> RoundRecord:
    """The round's line. Under user-level DP, counts of who took part are not released (null);
    under any DP, per-phone training statistics come only from simulator diagnostics
    (`trained`), labelled as outside the guarantee, and never from the wire."""
    replies, skipped = outcome.replies, outcome.step is None
    secret = cfg.privacy.user_level
    dp = cfg.privacy.any_dp
    if dp:
        stats = list((trained or {}).values())
        losses = [t[protocol.TRAIN_LOSS] for t in stats]
        tokens = sum(t[protocol.TRAIN_TOKENS] for t in stats)
        seconds = sum(t[protocol.TRAIN_SECONDS] for t in stats)
    else:
        losses = [u.train_loss for u in replies.accepted]
        tokens = sum(u.tokens or 0 for u in replies.accepted)
        seconds = sum(u.seconds or 0.0 for u in replies.accepted)
    return RoundRecord(
        round=server_round, clients=None if secret else 0 if skipped else outcome.contributors,
        sampled=len(cohort),
        rejected=None if secret else replies.rejected,
        declined=None if secret else replies.declined,
        train_loss=mean_or_none(losses),
        loss_base=mean_or_none([e.loss_base for e in evals]),
        loss_global=mean_or_none([e.loss_global for e in evals]),
        loss_personal=mean_or_none([e.loss_personal for e in evals]),
        bytes_up=None if secret else outcome.bytes_up, bytes_down=bytes_down,
        seconds=time.perf_counter() - started,
        tokens_per_s=tokens / seconds if seconds > 0 else None,
        epsilon_user=aggregator.epsilon(),
        epsilon_server=aggregator.epsilon_server(),
        epsilon_sample_max=state.epsilon_sample_max,
        delta=cfg.privacy.delta if dp else None,
        accountant=cfg.privacy.accountant if dp else None,
        evaluated=len(evals) or None, seconds_train=seconds_train, skipped=skipped,
        loss_by_rank=losses_by_rank(evals),
        seeded_noise=dp and cfg.privacy.seeded_noise,
        diagnostics=DIAGNOSTICS_LABEL if dp and trained is not None else None,
        ledger_decreases=outcome.ledger_decreases,
    )


def trained_diagnostics(cfg: FedMilmConfig, wiring: Wiring, state: ServerState,
                         server_round: int, cohort_devices: list[int]) -> dict[int, dict] | None:
    """Under DP in simulation: what the cohort's virtual phones left on disk about their
    training (outside the wire); keeps the largest phone epsilon seen."""
    if not cfg.privacy.any_dp or wiring.diagnostics is None:
        return None
    trained = read_diagnostics(wiring.diagnostics, server_round, DIAG_TRAIN, cohort_devices)
    epsilons = [t["epsilon_sample"] for t in trained.values() if t.get("epsilon_sample")]
    if epsilons:
        state.epsilon_sample_max = max([*epsilons, state.epsilon_sample_max or 0.0])
    return trained


def finish(space: AdapterSpace, global_state: State, cfg: FedMilmConfig, run_dir: Path,
            *, completed: int, stopped_because: str | None) -> None:
    (run_dir / "summary.json").write_text(json.dumps({
        "rounds_planned": cfg.federation.rounds, "rounds_completed": completed,
        "stopped_early_because": stopped_because}))
    base = cfg.model.path or cfg.model.name
    save_global_adapter(space, global_state, run_dir / "global_adapter", base_model=base)
    records = read_records(run_dir / "metrics.jsonl")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    if not records:
        return
    plot_losses(records, plots / "loss_per_round.png")
    if any(r["epsilon_user"] is not None or r["epsilon_sample_max"] is not None for r in records):
        plot_privacy(records, plots / "epsilon_per_round.png")
    per_phone = read_per_phone(run_dir / PER_PHONE_FILE)
    if per_phone:
        last = max(per_phone)
        plot_clients(per_phone[last], last, plots / "per_client_loss.png")
