"""The phone's side of SecAgg+: Flower's `secaggplus_mod` around our own train handler.

SecAgg+ speaks Flower's legacy FitIns/FitRes record layout; `secure_aggregation_mod` routes
SecAgg+ messages through `secaggplus_mod` and translates, in its masked-vector stage, between
that layout and ours, so the one train handler serves plain and secure rounds alike.
"""

from __future__ import annotations

from collections.abc import Callable

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedmilm import protocol
from fedmilm.adapters.packing import from_ndarrays, to_ndarrays
from fedmilm.clients.phone import phone_for
from fedmilm.training.memory import MemoryBudgetError

Handler = Callable[[Message, Context], Message]


def _legacy_train(call_next: Handler) -> Handler:
    """Our train handler, reading FitIns records and answering with FitRes records."""
    def train_legacy(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = ConfigRecord(dict(fitins.config))
        msg.content = RecordDict({protocol.CONFIG: config})
        try:
            layout = phone_for(msg, context).runtime().layout
        except MemoryBudgetError as err:  # the train handler would decline: no masked update
            raise RuntimeError(f"this phone declines the secure round: {err}") from err
        reference = layout.initial_state(layout.global_keys)
        received = from_ndarrays(parameters_to_ndarrays(fitins.parameters), reference)
        msg.content = RecordDict({protocol.GLOBAL_ARRAYS: ArrayRecord(received),
                                  protocol.CONFIG: config})
        reply = call_next(msg, context)
        if reply.has_error() or protocol.UPDATE_ARRAYS not in reply.content.array_records:
            raise RuntimeError("this phone has no update for the secure round (declined)")
        update = reply.content.array_records[protocol.UPDATE_ARRAYS].to_torch_state_dict()
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(to_ndarrays(update)),
                        num_examples=1, metrics={})  # weight 1: SecAgg+ yields a uniform mean
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return train_legacy


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """SecAgg+ messages go through Flower's `secaggplus_mod`; all others pass unchanged."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _legacy_train(call_next))
