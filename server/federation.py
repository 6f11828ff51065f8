"""The server's round loop: sample, train, validate, aggregate, evaluate, record, finish."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedmilm.adapters import AdapterSpace, State, cached_adapter_space, wire
from fedmilm.aggregation import Aggregator, create_aggregator
from fedmilm.aggregation.server_optimizer import server_optimizer_for
from fedmilm.config import FedMilmConfig, to_yaml
from fedmilm.devices import availability_for, policy_of
from fedmilm.metrics import (
    ClientEval,
    append_record,
    format_progress,
    interrupted_record,
    read_records,
)
from fedmilm.metrics.diagnostics import EVALUATE as DIAG_EVALUATE
from fedmilm.metrics.diagnostics import read_diagnostics
from fedmilm.metrics.per_phone import PER_PHONE_FILE, append_per_phone, keep_rounds_up_to
from fedmilm.metrics.progress import RoundProgress
from fedmilm.privacy.randomness import SecureRandom
from fedmilm.server.checkpoint import (
    ServerState,
    checkpoints,
    config_fingerprint,
    load_latest_intact,
    round_of,
    save_checkpoint,
)
from fedmilm.server.messages import (
    EVALUATE,
    TRAIN,
    ClientUpdate,
    TrainCollector,
    TrainOutcome,
    TrainReplies,
    Wiring,
    build_messages,
    client_eval,
    collect_device_ids,
    collect_evals,
    query_messages,
    round_config,
)
from fedmilm.server.outputs import finish, round_record, trained_diagnostics
from fedmilm.server.secure import secure_mean
from fedmilm.server.transport import stream_replies
from fedmilm.training.runtimes import runtime_class

log = logging.getLogger("fedmilm.server")

CHECKPOINTS = "checkpoints"
DIAGNOSTICS = "diagnostics"  # simulation: per-phone results virtual phones leave under DP
NODE_WAIT_S = 120.0  # how long to wait for the simulated/deployed phones to register
QUERY_WINDOW = 256  # identity queries out at once: they cost a phone milliseconds, not seconds


def wait_for_nodes(grid: Grid, *, wanted: int, needed: int) -> list[int]:
    """Node ids once `wanted` phones are connected; after NODE_WAIT_S settle for `needed`."""
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= needed:
                log.warning("only %d of %d phones connected; continuing", len(nodes), wanted)
                return nodes
            raise RuntimeError(f"only {len(nodes)} phones connected after {NODE_WAIT_S:.0f} s; "
                               f"federation.clients_per_round needs {needed}")
        time.sleep(0.5)


def _warn_risky(cfg: FedMilmConfig) -> None:
    if not cfg.privacy.any_dp:
        log.warning("differential privacy is off (privacy=none): updates are not clipped or "
                    "noised; use privacy=sample|user|both for formal guarantees")
    elif cfg.privacy.seeded_noise:
        log.warning("privacy.seeded_noise=true: DP randomness is reproducible from the seed, so "
                    "anyone with the config can replay it: no guarantee holds; tests only")
    if (cfg.privacy.user_level and cfg.privacy.user.mechanism == "poisson"
            and cfg.device.availability != "always"):
        log.warning("privacy.user.mechanism=poisson assumes every phone is sampled "
                    "independently with probability clients_per_round / num_clients each round; "
                    "with device.availability=%s availability also decides who trains, which "
                    "that epsilon does not cover. privacy.user.mechanism=ftrl assumes no "
                    "sampling (only a minimum separation between a phone's rounds)",
                    cfg.device.availability)


def _left(deadline: float) -> float:
    """Seconds until the round's deadline (0 once it passed)."""
    return max(0.0, deadline - time.monotonic())


def _progress(cfg: FedMilmConfig, server_round: int, phase: str, sampled: int,
              secret: bool = False) -> RoundProgress:
    return RoundProgress(server_round=server_round, rounds=cfg.federation.rounds, phase=phase,
                         sampled=sampled, every_s=cfg.federation.progress_every_s,
                         emit=log.info, counts_secret=secret)


def global_arrays(state: ServerState, cfg: FedMilmConfig) -> ArrayRecord:
    """The global part as it travels down (`aggregation.download`); int8's rounding draws come
    from the server's CSPRNG. The server keeps its own copy exact."""
    return wire.encode(state.global_state, cfg.aggregation.download, SecureRandom())


def _send(grid: Grid, nodes: list[int], message_type: str, down: ArrayRecord,
          server_round: int, cfg: FedMilmConfig, wiring: Wiring, deadline: float,
          progress: RoundProgress, clip_norm: float | None = None) -> Iterator[Message]:
    """The replies of `nodes` to this round's message (carrying `down`), as they arrive."""
    messages = build_messages(nodes, message_type=message_type, global_arrays=down,
                              server_round=server_round, config_text=wiring.config_text,
                              clip_norm=clip_norm, deadline=time.time() + _left(deadline))
    for reply in stream_replies(grid, messages, deadline=deadline,
                                window=cfg.federation.max_in_flight, on_wait=progress.tick):
        progress.reply()
        yield reply


def _train_plain(grid: Grid, cohort: list[int], state: ServerState, server_round: int,
                 aggregator: Aggregator, cfg: FedMilmConfig, wiring: Wiring,
                 deadline: float) -> TrainOutcome:
    """Send the global part; validate each reply as it arrives and fold it into the round's
    running sums (the update is dropped at once: memory stays one adapter)."""
    fed = cfg.federation
    secret = cfg.privacy.user_level  # who took part is secret from log readers
    round_sum = aggregator.start_round()
    ranked = bool(cfg.lora.rank_by_tier)

    def fold(update: ClientUpdate) -> None:
        round_sum.add(update.update, aggregator.weight_of(update.num_examples),
                      (update.rank or cfg.lora.r) if ranked else None)
        if update.within_clip is not None:
            aggregator.vote(update.within_clip)

    # under user-level DP the clip bounds every phone (and keeps the analysis): no norm bound
    collector = TrainCollector(state.global_state, devices=wiring.devices,
                               max_norm=aggregator.max_update_norm, dp=cfg.privacy.any_dp,
                               quiet=secret, fold=fold, votes=aggregator.round_clip is not None,
                               norm_multiple=None if secret else fed.norm_bound_multiple,
                               upload=cfg.aggregation.upload)
    answered = 0
    down = global_arrays(state, cfg)
    for reply in _send(grid, cohort, TRAIN, down, server_round, cfg, wiring, deadline,
                       _progress(cfg, server_round, "training", len(cohort), secret),
                       aggregator.round_clip):
        answered += 1
        collector.take(reply)
    replies = collector.finish()
    missing = len(cohort) - answered
    if missing and not secret:
        log.warning("round %d: %d phone(s) did not reply within federation.round_timeout_s="
                    "%g s; left out", server_round, missing, fed.round_timeout_s)
    replies.rejected += missing
    step = aggregator.finish_round(round_sum, state.global_state)
    return TrainOutcome(step=step, replies=replies, contributors=round_sum.count,
                        bytes_up=sum(u.nbytes for u in replies.accepted),
                        bytes_down=len(cohort) * down.count_bytes(),
                        ledger_decreases=None if secret else _track_ledgers(state, replies))


def _track_ledgers(state: ServerState, replies: TrainReplies) -> int | None:
    """Keep each device's reported DP-SGD ledger count and flag a decrease (its budget was
    reset). Not under user-level DP: the server keeps nothing per phone there."""
    if not replies.ledger_trainings:
        return None
    decreases = 0
    for device, count in replies.ledger_trainings.items():
        before = state.ledger_trainings.get(device)
        if before is not None and count < before:
            decreases += 1
            log.warning("device %d reports %d DP-SGD trainings in its privacy ledger, fewer than "
                        "the %d it reported before: its ledger was reset or rolled back",
                        device, count, before)
        state.ledger_trainings[device] = count
    return decreases


def _train_secure(grid: Grid, cohort: list[int], state: ServerState, server_round: int,
                  aggregator: Aggregator, cfg: FedMilmConfig, wiring: Wiring,
                  deadline: float) -> TrainOutcome:
    """SecAgg+: the server sees only the mean; per-phone validation is impossible by design
    (SecAgg+ bounds each coordinate to +-secagg_clip_range instead)."""
    config = round_config(server_round, wiring.config_text)
    result = secure_mean(grid, cohort, global_state=state.global_state, config=config,
                         server_round=server_round, agg=cfg.aggregation,
                         timeout=_left(deadline),
                         floor=cfg.federation.min_replies
                         if cfg.privacy.user_level and cfg.privacy.user.distributed_noise
                         else 0)
    step = aggregator.aggregate_secure(result.mean, result.count, state.global_state)
    replies = TrainReplies(rejected=len(cohort) - result.count)
    plain = ArrayRecord(state.global_state).count_bytes()  # SecAgg+ runs carry float32
    return TrainOutcome(step=step, replies=replies, contributors=result.count,
                        bytes_up=result.count * plain, bytes_down=len(cohort) * plain)


def discover_devices(grid: Grid, nodes: list[int], timeout: float,
                     identities: dict[int, int] | None = None,
                     window: int | None = None) -> dict[int, int]:
    """node id -> device id for every node that answers the identity query in time; with
    `identities` (authenticated deployment) only the id bound to each node's key counts.
    `window`: queries out at once (Flower's in-memory link state scans every stored message
    for each node it serves: 10,000 queries at once would cost 10,000^2 steps)."""
    replies = list(stream_replies(grid, query_messages(nodes),
                                  deadline=time.monotonic() + timeout, window=window))
    devices = collect_device_ids(replies, identities)
    if not devices:
        raise RuntimeError("no phone announced a device id; is the ClientApp fedmilm's?")
    return devices


def _start_state(cfg: FedMilmConfig, space: AdapterSpace, aggregator: Aggregator,
                 run_dir: Path, fingerprint: str) -> ServerState:
    """A fresh state, or the last checkpoint's when `cfg.resume` is set."""
    fresh = ServerState(round=0, global_state=space.initial_state(space.global_keys),
                        sampler=random.Random(f"fedmilm-sampling:{cfg.seed}"),
                        aggregator=aggregator.state_dict(), ledger_trainings={})
    metrics_path = run_dir / "metrics.jsonl"
    if not cfg.resume:
        metrics_path.unlink(missing_ok=True)
        (run_dir / PER_PHONE_FILE).unlink(missing_ok=True)
        return fresh
    found = load_latest_intact(run_dir / CHECKPOINTS, fingerprint=fingerprint)
    if found is None:
        log.warning("resume: no intact round checkpointed in %s; starting at round 1", run_dir)
        metrics_path.unlink(missing_ok=True)
        (run_dir / PER_PHONE_FILE).unlink(missing_ok=True)
        return fresh
    path, state = found
    aggregator.load_state_dict(state.aggregator)
    newest = max(round_of(p) for p in checkpoints(run_dir / CHECKPOINTS))
    if newest > state.round:  # those rounds' aggregates may have been released: charge them
        aggregator.charge_lost_rounds(newest - state.round)
    kept = [r for r in read_records(metrics_path) if r["round"] <= state.round] \
        if metrics_path.exists() else []  # rounds after the checkpoint: redone
    lines = [json.dumps(r) for r in kept]
    if not kept or kept[-1]["round"] < state.round:  # accounted and released, never recorded
        dp = cfg.privacy.any_dp
        lines.append(json.dumps(asdict(interrupted_record(
            state.round, epsilon_user=aggregator.epsilon(),
            delta=cfg.privacy.delta if dp else None,
            accountant=cfg.privacy.accountant if dp else None))))
    metrics_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    keep_rounds_up_to(run_dir / PER_PHONE_FILE, state.round)
    log.info("resume: continuing after round %d from %s", state.round, path)
    return state


def run_space(cfg: FedMilmConfig) -> AdapterSpace:
    """The run's adapter space, loaded once per process."""
    return cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                seed=cfg.seed)


def _evaluate(grid: Grid, state: ServerState, server_round: int, cfg: FedMilmConfig,
              wiring: Wiring, population: list[int], deadline: float) -> list[ClientEval]:
    """Held-out losses per phone. Without DP they travel in the evaluate replies. Under DP
    nothing derived from private held-out data is released: a simulation's virtual phones
    leave their losses on the researcher's disk (diagnostics, labelled as outside the
    guarantee); a deployment does not evaluate on phones at all."""
    fed = cfg.federation
    if cfg.privacy.any_dp and wiring.diagnostics is None:
        return []
    if _left(deadline) <= 0:
        log.warning("round %d: no time left for evaluation within federation.round_timeout_s="
                    "%g s (one deadline covers training and evaluation)", server_round,
                    fed.round_timeout_s)
        return []
    node_of = {device: node for node, device in wiring.devices.items()}
    eval_devices = (population if fed.clients_per_eval is None
                    else sorted(state.sampler.sample(population, fed.clients_per_eval)))
    progress = _progress(cfg, server_round, "evaluation", len(eval_devices),
                         cfg.privacy.user_level)
    replies = list(_send(grid, [node_of[d] for d in eval_devices], EVALUATE,
                         global_arrays(state, cfg),
                         server_round, cfg, wiring, deadline, progress))
    if not cfg.privacy.any_dp:
        return collect_evals(replies, wiring.devices)
    assert wiring.diagnostics is not None
    left = read_diagnostics(wiring.diagnostics, server_round, DIAG_EVALUATE, eval_devices)
    parsed = [client_eval(device, values) for device, values in left.items()]
    return sorted((e for e in parsed if isinstance(e, ClientEval)), key=lambda e: e.device)


def run_federation(grid: Grid, cfg: FedMilmConfig, run_dir: Path,
                   diagnostics: Path | None = None,
                   identities: dict[int, int] | None = None) -> State:
    """Run every round (after the last checkpoint when resuming), checkpoint each one, and write
    the run directory; returns the final global part. `diagnostics`: simulation only, the
    folder where virtual phones leave per-phone results under DP. `identities`: deployment
    with authenticated SuperNodes, node id -> the device id its registered key belongs to."""
    fed = cfg.federation
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = to_yaml(cfg)
    fingerprint = config_fingerprint(to_yaml(replace(cfg, resume=None)))
    space = run_space(cfg)
    runtime = runtime_class(cfg.client.runtime)
    phones_cfg = runtime.prepare_run(cfg, space, run_dir)
    if phones_cfg != cfg:  # e.g. the exported programs' folder
        config_text = to_yaml(phones_cfg)
    aggregator = create_aggregator(cfg, space.global_coordinates)
    optimizer = server_optimizer_for(cfg.aggregation)
    state = _start_state(cfg, space, aggregator, run_dir, fingerprint)
    optimizer.load(state.optimizer)
    devices = discover_devices(grid, wait_for_nodes(grid, wanted=fed.num_clients,
                                                    needed=fed.clients_per_round),
                               timeout=fed.round_timeout_s, identities=identities,
                               window=None if fed.max_in_flight is None
                               else max(fed.max_in_flight, QUERY_WINDOW))
    wiring = Wiring(config_text, devices, diagnostics)
    node_of = {device: node for node, device in devices.items()}
    trace, policy = availability_for(cfg), policy_of(cfg.device)
    population = sorted(node_of)  # sampling is over device ids: stable across restarts
    metrics_path = run_dir / "metrics.jsonl"
    _warn_risky(cfg)
    log.info("federation: %d phones, %d per round, %d rounds, personalization=%s, privacy=%s, "
             "%d global tensors", len(population), fed.clients_per_round, fed.rounds,
             cfg.personalization.mode, cfg.privacy.mode, len(space.global_keys))
    stopped_because = None
    for server_round in range(state.round + 1, fed.rounds + 1):
        if not aggregator.may_continue():
            stopped_because = (f"the next round would exceed privacy.user.target_epsilon="
                               f"{cfg.privacy.user.target_epsilon:g}")
            log.warning("stopping before round %d: %s", server_round, stopped_because)
            break
        started = time.perf_counter()
        deadline = time.monotonic() + fed.round_timeout_s  # training and evaluation together
        # ---- train: sample, send the global part, collect and validate updates
        eligible = population if trace is None else trace.available(
            population, server_round, policy, cfg.device.slots_per_round)
        cohort_devices = aggregator.cohort(eligible, state.sampler, server_round)
        cohort = [node_of[d] for d in cohort_devices]
        train = _train_secure if cfg.aggregation.secure else _train_plain
        clip = aggregator.round_clip  # the clip this round's phones are told (adaptive)
        outcome = train(grid, cohort, state, server_round, aggregator, cfg, wiring, deadline)
        seconds_train = time.perf_counter() - started
        if outcome.step is None:
            log.warning("round %d skipped: %d valid replies < federation.min_replies=%d",
                        server_round, outcome.contributors, fed.min_replies)
        else:
            state.global_state = optimizer.step(state.global_state, outcome.step)
            state.optimizer = optimizer.state()
        trained = trained_diagnostics(cfg, wiring, state, server_round, cohort_devices)
        # ---- account before release: the charged accountant and the new global part are on
        # disk before anything derived from them leaves (a resume re-sends this aggregate)
        state.round, state.aggregator = server_round, aggregator.state_dict()
        save_checkpoint(run_dir / CHECKPOINTS, state, fingerprint=fingerprint)
        accountant = aggregator.accountant_state()
        if accountant is not None:
            (run_dir / "privacy_accountant.json").write_text(json.dumps(accountant))
        # ---- evaluate, record
        evals = _evaluate(grid, state, server_round, cfg, wiring, population, deadline)
        record = round_record(server_round, cohort=cohort, outcome=outcome, evals=evals,
                               bytes_down=outcome.bytes_down, started=started,
                               seconds_train=seconds_train, aggregator=aggregator,
                               state=state, cfg=cfg, trained=trained)
        if trace is not None:
            record = replace(record, available=len(eligible))
        if clip is not None:
            record = replace(record, clip_norm=clip)
        append_record(metrics_path, record)
        append_per_phone(run_dir / PER_PHONE_FILE, server_round, evals)
        log.info(format_progress(record, fed.rounds))
    # ---- finish: PEFT adapter and plots
    finish(space, state.global_state, cfg, run_dir, completed=state.round,
            stopped_because=stopped_because)
    runtime.finish_run(phones_cfg, space, state.global_state, run_dir)
    return state.global_state
