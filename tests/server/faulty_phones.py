"""A ClientApp of real fedmilm phones, some of which misbehave on purpose (test-only).

The fault of each device id comes from the environment (Ray workers inherit it), so one
simulated federation can hold a crashing phone, a straggler and every kind of bad update.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

from fedmilm import protocol
from fedmilm.clients import app as phone_app
from fedmilm.clients.secure import secure_aggregation_mod

FAULTS_ENV = "FEDMILM_TEST_FAULTS"        # JSON {device id: fault name}
HONEST_DIR_ENV = "FEDMILM_TEST_HONEST_DIR"  # where honest updates are written for checking
STRAGGLER_SLEEP_S = 50.0


def _corrupt(update: dict[str, torch.Tensor], fault: str) -> dict[str, torch.Tensor]:
    first = sorted(update)[0]
    bad = dict(update)
    if fault == "nan":
        bad[first] = torch.full_like(update[first], float("nan"))
    elif fault == "inf":
        bad[first] = torch.full_like(update[first], float("inf"))
    elif fault == "missing":
        del bad[first]
    elif fault == "extra":
        bad["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    elif fault == "shape":
        bad[first] = torch.zeros(update[first].shape[0] + 1, *update[first].shape[1:])
    elif fault == "dtype":
        bad[first] = update[first].to(torch.int64)
    elif fault == "norm":
        bad[first] = update[first] + 1e6
    elif fault == "long":  # under the absolute cap, 50x an honest update
        bad = {k: v * 50 for k, v in update.items()}
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return bad


def _misbehave(msg: Message, context: Context, call) -> Message:
    if msg.metadata.message_type != "train":
        return call(msg, context)
    device = int(context.node_config[protocol.PARTITION_ID])
    fault = json.loads(os.environ.get(FAULTS_ENV, "{}")).get(str(device))
    if fault == "crash":
        raise RuntimeError("simulated phone crash")
    if fault == "straggler":
        time.sleep(STRAGGLER_SLEEP_S)  # answers long after the round deadline
    reply = call(msg, context)
    update = reply.content.array_records[protocol.UPDATE_ARRAYS].to_torch_state_dict()
    metrics = reply.content.metric_records[protocol.METRICS]
    if fault == "liar":  # an honest update with a claim to outweigh everyone
        metrics[protocol.NUM_EXAMPLES] = 10**15
    if fault in (None, "straggler", "liar"):
        server_round = int(msg.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])
        name = f"round{server_round}_device{device}.safetensors"
        save_file({k: v.contiguous() for k, v in update.items()},
                  str(Path(os.environ[HONEST_DIR_ENV]) / name))
        return reply
    content = RecordDict({protocol.UPDATE_ARRAYS: ArrayRecord(_corrupt(update, fault)),
                          protocol.METRICS: metrics})
    return Message(content=content, reply_to=msg)


def app(device_root: str, diagnostics: str) -> ClientApp:
    """Simulated fedmilm phones, the chosen ones misbehaving."""
    return phone_app.make_client_app(device_root, diagnostics, mods=(_misbehave,), train_mods=())


def secure_app(device_root: str, diagnostics: str) -> ClientApp:
    """The same phones behind Flower's SecAgg+ (the fault mod sits inside it, on our layout)."""
    return phone_app.make_client_app(device_root, diagnostics,
                                     train_mods=(secure_aggregation_mod, _misbehave))
