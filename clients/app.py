"""The Flower ClientApp: a phone's train and evaluate handlers.

Thin by design: unpack the message, check the request against the phone's own privacy policy,
call `fedmilm.training`, keep the personal part in device storage, reply with the global update.
Under differential privacy the reply carries the clipped update and nothing else derived from
private data (no losses, counts, tokens, timings or epsilon). No training text, no personal
tensor and no raw loss per example ever goes into a reply or a log line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmilm import protocol
from fedmilm.adapters import State, wire
from fedmilm.adapters.hetero import pad, truncate
from fedmilm.clients.conditions import read_conditions
from fedmilm.clients.phone import Phone, phone_for
from fedmilm.clients.privacy import LEDGER_FILE, dp_sgd_for, open_ledger, sample_noise_for
from fedmilm.clients.secure import secure_aggregation_mod
from fedmilm.config import FedMilmConfig
from fedmilm.devices import policy_of
from fedmilm.metrics.diagnostics import EVALUATE, TRAIN, write_diagnostic
from fedmilm.privacy import BudgetExceeded, LedgerError, PrivacyLedger
from fedmilm.privacy.distributed import distributed_noise_for, noisy_share
from fedmilm.privacy.policy import POLICY_FILE
from fedmilm.privacy.randomness import PrivateRandom, SeededRandom, private_random
from fedmilm.privacy.user_level import upload_clip_norm
from fedmilm.runtime import quiet_offline_env
from fedmilm.training import DpSgd, evaluate_phone, train_phone
from fedmilm.training.memory import MemoryBudgetError

quiet_offline_env()
log = logging.getLogger("fedmilm.client")


def _declined(msg: Message, code: int, ledger: PrivacyLedger | None = None) -> Message:
    values: dict[str, int | float] = {protocol.DECLINED: code}
    if ledger is not None:
        values[protocol.LEDGER_TRAININGS] = ledger.trainings
    return Message(content=RecordDict({protocol.METRICS: MetricRecord(values)}), reply_to=msg)


def identify(msg: Message, context: Context) -> Message:
    """Announce this phone's device id (its partition id), so sampling and per-phone metrics
    stay stable when node ids change (a new simulation, a restarted server)."""
    device = int(context.node_config[protocol.PARTITION_ID])
    metrics = MetricRecord({protocol.DEVICE_ID: device})
    return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)


def _privacy_for(phone: Phone, num_examples: int) -> tuple[int, PrivacyLedger | None,
                                                            DpSgd | None]:
    """(decline code or 0, ledger, DP-SGD) after checking the run against the phone's own
    policy and ledger."""
    cfg = phone.cfg
    try:
        policy = phone.policy()
        noise = sample_noise_for(cfg, policy, num_examples) if cfg.privacy.sample_level else None
    except ValueError as err:
        log.warning("phone declines to train: %s", err)
        return protocol.DECLINED_POLICY, None, None
    refusal = policy.refusal(cfg.privacy, noise)
    if refusal is not None:
        log.warning("phone declines to train: %s", refusal)
        return protocol.DECLINED_POLICY, None, None
    if not cfg.privacy.sample_level:
        return 0, None, None
    try:
        ledger = open_ledger(cfg, policy, phone.storage)
    except LedgerError as err:
        log.warning("phone refuses to train: %s", err)
        return protocol.DECLINED_LEDGER, None, None
    try:
        assert noise is not None
        dp = dp_sgd_for(cfg, ledger, num_examples, noise=noise,
                        test_seed=phone.dp_test_seed(policy))
    except BudgetExceeded as err:
        log.info("phone declines to train: %s", err)
        return protocol.DECLINED_BUDGET, ledger, None
    return 0, ledger, dp


def train(msg: Message, context: Context) -> Message:
    """Train on the phone's private data; reply with the update of the global part."""
    phone = phone_for(msg, context)
    cfg, (examples, _) = phone.cfg, phone.examples()
    if cfg.device.check_conditions:
        refusal = policy_of(cfg.device).refusal(read_conditions())
        if refusal is not None:
            log.info("phone declines to train: %s", refusal)
            return _declined(msg, protocol.DECLINED_CONDITIONS)
    code, ledger, dp = _privacy_for(phone, len(examples))
    if code:
        return _declined(msg, code, ledger)
    try:
        runtime = phone.runtime()
    except MemoryBudgetError as err:
        log.warning("phone declines to train: %s", err)
        return _declined(msg, protocol.DECLINED_MEMORY, ledger)
    space = runtime.layout
    full = received_global(msg, cfg)
    received = full if phone.rank is None else truncate(full, phone.rank)
    clip = _upload_clip(cfg, full) if cfg.privacy.user_level else None
    outcome = train_phone(runtime, global_state=received,
                          personal_state=phone.storage.load_personal(space),
                          examples=examples, train=cfg.train, seed=phone.task_seed, dp=dp,
                          clip_norm=clip)
    if ledger is not None:  # the ledger is saved before anything derived from training leaves
        ledger.trainings += 1
        ledger.save(phone.storage.folder / LEDGER_FILE)
    phone.storage.save_personal(space, outcome.personal)
    recorded = phone.storage.ledger_trainings()
    phone.storage.record_training(ledger.trainings if ledger is not None
                                  else max(recorded or 0, 0))
    stats = outcome.stats
    private = {protocol.NUM_EXAMPLES: len(examples), protocol.TRAIN_LOSS: float(stats.loss),
               protocol.TRAIN_STEPS: stats.steps, protocol.TRAIN_TOKENS: stats.tokens,
               protocol.TRAIN_SECONDS: float(stats.seconds)}
    if not cfg.privacy.any_dp:
        metrics = MetricRecord(private)
    else:  # only what the accountant covers leaves; the simulator may keep the rest locally
        metrics = MetricRecord({} if ledger is None
                               else {protocol.LEDGER_TRAININGS: ledger.trainings})
        if phone.diagnostics_dir is not None:
            write_diagnostic(phone.diagnostics_dir, phone.server_round, TRAIN, phone.user,
                             {**private, "epsilon_sample": ledger.epsilon if ledger else None})
    if cfg.privacy.user_level and cfg.privacy.user.adaptive_clip:  # accounted by the server
        metrics[protocol.WITHIN_CLIP] = 0.5 if outcome.within_clip else -0.5
    update = outcome.update
    if phone.rank is not None:  # zero-padded back to the server's rank
        update = pad(update, full)
        metrics[protocol.LORA_RANK] = phone.rank
    random = _upload_random(phone)
    noise = distributed_noise_for(cfg, num_values=sum(v.numel() for v in full.values()))
    if noise is not None:  # this phone's share of the noise, before SecAgg+ masks the update
        update = noisy_share(update, noise, random)
    upload = cfg.aggregation.upload
    # Under user-level DP what the server decodes must stay within the clip; a noisy share is
    # meant to exceed it (the clip bounds the update before its noise) and travels as float32.
    arrays = (wire.encode_within(update, upload, clip, random)
              if clip is not None and noise is None else wire.encode(update, upload, random))
    content = RecordDict({protocol.UPDATE_ARRAYS: arrays, protocol.METRICS: metrics})
    return Message(content=content, reply_to=msg)


def _upload_random(phone: Phone) -> PrivateRandom:
    """The draws that round an upload (and share distributed noise). Under DP: the phone's
    CSPRNG (seeded only where a test asks and its own policy allows). Without DP nothing is
    hidden, and the task seed makes a simulation rerun identically."""
    if phone.cfg.privacy.any_dp:
        return private_random(phone.dp_test_seed(phone.policy()))
    return SeededRandom(phone.task_seed)


def received_global(msg: Message, cfg: FedMilmConfig) -> State:
    """The global part the server sent, decoded from `aggregation.download`; its size is
    checked against its own shapes first (a phone trusts the server no further)."""
    arrays = msg.content.array_records[protocol.GLOBAL_ARRAYS]
    shapes = {k: torch.empty(a.shape, device="meta") for k, a in arrays.items()
              if k != wire.SCALES}
    fmt = cfg.aggregation.download
    problem = wire.problem(arrays, shapes, fmt)
    if problem:
        raise ValueError(f"the server's global adapter is not {fmt}: {problem}")
    return wire.decode(arrays, shapes, fmt)


def _upload_clip(cfg: FedMilmConfig, full: State) -> float:
    """The norm a user-level update is clipped to before it leaves: the accounted clip, less
    SecAgg+'s worst-case quantisation error so the dequantised sum stays within it."""
    agg = cfg.aggregation
    return upload_clip_norm(cfg.privacy.user.clip_norm,
                            num_values=sum(v.numel() for v in full.values()),
                            secagg_clip_range=agg.secagg_clip_range if agg.secure else None,
                            secagg_quant_range=agg.secagg_quant_range if agg.secure else None)


def evaluate(msg: Message, context: Context) -> Message:
    """Held-out losses of base, base + global and base + global + personal. Under DP they are
    not released: a simulated phone leaves them for the researcher on its own disk, a deployed
    phone declines."""
    phone = phone_for(msg, context)
    if phone.cfg.privacy.any_dp and phone.diagnostics_dir is None:
        return _declined(msg, protocol.DECLINED_POLICY)
    runtime, (_, heldout) = phone.runtime(), phone.examples()
    received = received_global(msg, phone.cfg)
    if phone.rank is not None:
        received = truncate(received, phone.rank)
    outcome = evaluate_phone(runtime, global_state=received,
                             personal_state=phone.storage.load_personal(runtime.layout),
                             examples=heldout, batch_size=phone.cfg.train.eval_batch_size,
                             loss_base=phone.base_loss)
    phone.remember_base_loss(outcome.loss_base)
    values = {protocol.NUM_EXAMPLES: outcome.examples, protocol.LOSS_BASE: outcome.loss_base,
              protocol.LOSS_GLOBAL: outcome.loss_global}
    if outcome.loss_personal is not None:
        values[protocol.LOSS_PERSONAL] = outcome.loss_personal
    if phone.rank is not None:
        values[protocol.LORA_RANK] = phone.rank
    if phone.cfg.privacy.any_dp:
        assert phone.diagnostics_dir is not None
        write_diagnostic(phone.diagnostics_dir, phone.server_round, EVALUATE, phone.user, values)
        values = {}
    content = RecordDict({protocol.METRICS: MetricRecord(values)})
    return Message(content=content, reply_to=msg)


def simulated_phone_mod(device_root: str, diagnostics_dir: str):  # noqa: ANN201 - a Flower mod
    """The node config a simulated phone would have on a real device: its own storage folder
    under `device_root`, its own policy file there, and the simulator's diagnostics folder.
    (Flower's simulation engine sets only the partition id.)"""
    def mod(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
        device = str(context.node_config[protocol.PARTITION_ID])
        own = Path(device_root) / device
        policy = own / POLICY_FILE
        context.node_config[protocol.DEVICE_DIR] = str(own)
        context.node_config[protocol.PRIVACY_POLICY] = str(
            policy if policy.is_file() else Path(device_root) / POLICY_FILE)
        context.node_config[protocol.DIAGNOSTICS_DIR] = diagnostics_dir
        return call_next(msg, context)

    return mod


def make_client_app(device_root: str | None = None, diagnostics_dir: str | None = None, *,
                    mods: tuple = (), train_mods: tuple = (secure_aggregation_mod,)) -> ClientApp:
    """The phone app. Deployment: `app` below (node config from the SuperNode). Simulation:
    bound to the simulated phones' storage root and the diagnostics folder. `mods` wrap every
    message after the node config is set, `train_mods` the train handler (tests add faults)."""
    own = [] if device_root is None else [simulated_phone_mod(device_root, str(diagnostics_dir))]
    client = ClientApp(mods=[*own, *mods])
    client.query()(identify)
    client.train(mods=list(train_mods))(train)
    client.evaluate()(evaluate)
    return client


app = make_client_app()
