"""The Flower ClientApp: a phone's train and evaluate handlers.

Thin by design: unpack the message, call `fedmilm.training`, keep the personal part in device
storage, reply with the global update and metrics only. No training text, no personal tensor and
no raw loss per example ever goes into a reply or a log line.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmilm import protocol
from fedmilm.adapters.hetero import pad, truncate
from fedmilm.clients.conditions import read_conditions
from fedmilm.clients.phone import phone_for
from fedmilm.clients.privacy import LEDGER_FILE, dp_sgd_for, open_ledger
from fedmilm.clients.secure import secure_aggregation_mod
from fedmilm.devices import policy_of
from fedmilm.privacy import BudgetExceeded, PrivacyLedger
from fedmilm.runtime import quiet_offline_env
from fedmilm.training import evaluate_phone, train_phone
from fedmilm.training.memory import MemoryBudgetError

quiet_offline_env()
log = logging.getLogger("fedmilm.client")
app = ClientApp()


def _declined(msg: Message, code: int, ledger: PrivacyLedger | None = None) -> Message:
    values: dict[str, int | float] = {protocol.DECLINED: code}
    if ledger is not None:
        values[protocol.EPSILON_SAMPLE] = ledger.epsilon
    return Message(content=RecordDict({protocol.METRICS: MetricRecord(values)}), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Announce this phone's device id (its partition id), so sampling and per-phone metrics
    stay stable when node ids change (a new simulation, a restarted server)."""
    device = int(context.node_config[protocol.PARTITION_ID])
    metrics = MetricRecord({protocol.DEVICE_ID: device})
    return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Train on the phone's private data; reply with the update of the global part."""
    phone = phone_for(msg, context)
    if phone.cfg.device.check_conditions:
        refusal = policy_of(phone.cfg.device).refusal(read_conditions())
        if refusal is not None:
            log.info("phone declines to train: %s", refusal)
            return _declined(msg, protocol.DECLINED_CONDITIONS)
    cfg, space, (examples, _) = phone.cfg, phone.space, phone.examples()
    ledger, dp = None, None
    if cfg.privacy.sample_level:
        ledger = open_ledger(cfg, phone.storage.folder)
        try:
            dp = dp_sgd_for(cfg, ledger, len(examples))
        except BudgetExceeded as err:
            log.info("phone declines to train: %s", err)
            return _declined(msg, protocol.DECLINED_BUDGET, ledger)
    programs, plan = None, None
    if cfg.client.runtime == "executorch":
        programs = phone.programs()
    else:
        try:
            plan = phone.memory_plan()
        except MemoryBudgetError as err:
            log.warning("phone declines to train: %s", err)
            return _declined(msg, protocol.DECLINED_MEMORY, ledger)
    full = msg.content.array_records[protocol.GLOBAL_ARRAYS].to_torch_state_dict()
    received = full if phone.rank is None else truncate(full, phone.rank)
    outcome = train_phone(space, global_state=received,
                          personal_state=phone.storage.load_personal(space),
                          examples=examples, train=cfg.train, seed=phone.task_seed, dp=dp,
                          clip_norm=cfg.privacy.user.clip_norm if cfg.privacy.user_level else None,
                          plan=plan, programs=programs)
    if ledger is not None:  # the ledger is saved before anything derived from training leaves
        ledger.save(phone.storage.folder / LEDGER_FILE)
    phone.storage.save_personal(space, outcome.personal)
    stats = outcome.stats
    metrics = MetricRecord({
        protocol.NUM_EXAMPLES: len(examples),
        protocol.TRAIN_LOSS: float(stats.loss),
        protocol.TRAIN_STEPS: stats.steps,
        protocol.TRAIN_TOKENS: stats.tokens,
        protocol.TRAIN_SECONDS: float(stats.seconds),
        **({protocol.EPSILON_SAMPLE: ledger.epsilon} if ledger is not None else {}),
    })
    update = outcome.update
    if phone.rank is not None:  # zero-padded back to the server's rank
        update = pad(update, full)
        metrics[protocol.LORA_RANK] = phone.rank
    content = RecordDict({protocol.UPDATE_ARRAYS: ArrayRecord(update),
                          protocol.METRICS: metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out losses of base, base + global and base + global + personal."""
    phone = phone_for(msg, context)
    space, (_, heldout) = phone.space, phone.examples()
    received = msg.content.array_records[protocol.GLOBAL_ARRAYS].to_torch_state_dict()
    if phone.rank is not None:
        received = truncate(received, phone.rank)
    outcome = evaluate_phone(space, global_state=received,
                             personal_state=phone.storage.load_personal(space),
                             examples=heldout, batch_size=phone.cfg.train.eval_batch_size,
                             loss_base=phone.base_loss)
    phone.remember_base_loss(outcome.loss_base)
    values = {protocol.NUM_EXAMPLES: outcome.examples, protocol.LOSS_BASE: outcome.loss_base,
              protocol.LOSS_GLOBAL: outcome.loss_global}
    if outcome.loss_personal is not None:
        values[protocol.LOSS_PERSONAL] = outcome.loss_personal
    if phone.rank is not None:
        values[protocol.LORA_RANK] = phone.rank
    content = RecordDict({protocol.METRICS: MetricRecord(values)})
    return Message(content=content, reply_to=msg)
