"""Build the messages the server sends and read the replies it gets, as typed values."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedmilm import protocol
from fedmilm.adapters import State
from fedmilm.aggregation import update_problem
from fedmilm.metrics import ClientEval

log = logging.getLogger("fedmilm.server")


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted training reply."""

    device: int
    update: State
    num_examples: int
    train_loss: float
    tokens: int
    seconds: float
    nbytes: int
    rank: int | None = None  # heterogeneous ranks: the rank the phone trained


@dataclass
class TrainReplies:
    """A round's training replies, sorted into what counts and what does not."""

    accepted: list[ClientUpdate] = field(default_factory=list)
    rejected: int = 0
    declined: int = 0                  # phones whose DP-SGD budget is spent
    epsilon_sample: dict[int, float] = field(default_factory=dict)  # device -> ledger epsilon


def round_config(server_round: int, config_text: str, storage_root: str) -> ConfigRecord:
    """What every phone is told each round: the round, the run config, where storage lives."""
    return ConfigRecord({protocol.SERVER_ROUND: server_round, protocol.RUN_CONFIG: config_text,
                         protocol.STORAGE_ROOT: storage_root})


def build_messages(nodes: list[int], *, message_type: str, global_state: State,
                   server_round: int, config_text: str, storage_root: str) -> list[Message]:
    """One message per node, each with its own fresh records."""
    messages = []
    for node in nodes:
        config = round_config(server_round, config_text, storage_root)
        content = RecordDict({protocol.GLOBAL_ARRAYS: ArrayRecord(global_state),
                              protocol.CONFIG: config})
        messages.append(Message(content=content, dst_node_id=node, message_type=message_type))
    return messages


def query_messages(nodes: list[int]) -> list[Message]:
    """Ask every node for its device id (answered without touching model or data)."""
    return [Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=node,
                    message_type=MessageType.QUERY) for node in nodes]


def collect_device_ids(replies: list[Message]) -> dict[int, int]:
    """node id -> device id from the query replies. Nodes that fail, or claim a device id
    another node already holds, are left out (and logged)."""
    devices: dict[int, int] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        metrics = None if reply.has_error() else reply.content.metric_records.get(protocol.METRICS)
        if metrics is None or protocol.DEVICE_ID not in metrics:
            log.warning("node %d left out: it did not announce a device id", node)
            continue
        device = int(metrics[protocol.DEVICE_ID])
        if device in devices.values():
            log.warning("node %d left out: device id %d is already taken", node, device)
            continue
        devices[node] = device
    return devices


def _reject(node: int, devices: dict[int, int], reason: str) -> None:
    log.warning("round reply from node %d (device %s) rejected: %s", node,
                devices.get(node, "?"), reason)


def _parse_update(reply: Message, reference: State, max_norm: float,
                  device: int) -> ClientUpdate | str:
    content = reply.content
    if protocol.UPDATE_ARRAYS not in content.array_records:
        return f"no '{protocol.UPDATE_ARRAYS}' arrays in the reply"
    if protocol.METRICS not in content.metric_records:
        return f"no '{protocol.METRICS}' metrics in the reply"
    arrays = content.array_records[protocol.UPDATE_ARRAYS]
    try:
        update = arrays.to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - any undecodable payload is a bad reply
        return f"undecodable arrays ({type(err).__name__})"
    problem = update_problem(update, reference, max_norm=max_norm)
    if problem:
        return problem
    metrics = content.metric_records[protocol.METRICS]
    examples = int(metrics.get(protocol.NUM_EXAMPLES, 0))
    if examples <= 0:
        return f"'{protocol.NUM_EXAMPLES}' must be a positive count"
    return ClientUpdate(device=device, update=update, num_examples=examples,
                        train_loss=float(metrics.get(protocol.TRAIN_LOSS, float("nan"))),
                        tokens=int(metrics.get(protocol.TRAIN_TOKENS, 0)),
                        seconds=float(metrics.get(protocol.TRAIN_SECONDS, 0.0)),
                        nbytes=arrays.count_bytes(),
                        rank=int(metrics[protocol.LORA_RANK]) if protocol.LORA_RANK in metrics
                        else None)


def collect_updates(replies: list[Message], reference: State, *, max_norm: float,
                    devices: dict[int, int]) -> TrainReplies:
    """Sort replies into accepted updates, rejections (each logged with its node id and reason)
    and privacy-budget declines (a normal non-participation). `devices`: node id -> device id."""
    out = TrainReplies()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            _reject(node, devices, f"client error: {reply.error.reason}")
            out.rejected += 1
            continue
        if node not in devices:
            _reject(node, devices, "not a node this round was sent to")
            out.rejected += 1
            continue
        device = devices[node]
        metrics = reply.content.metric_records.get(protocol.METRICS)
        if metrics is not None and protocol.EPSILON_SAMPLE in metrics:
            out.epsilon_sample[device] = float(metrics[protocol.EPSILON_SAMPLE])
        if metrics is not None and protocol.DECLINED in metrics:
            code = int(metrics[protocol.DECLINED])
            why = protocol.DECLINE_REASONS.get(code, f"unknown reason code {code}")
            log.info("device %d declined to train: %s", device, why)
            out.declined += 1
            continue
        parsed = _parse_update(reply, reference, max_norm, device)
        if isinstance(parsed, str):
            _reject(node, devices, parsed)
            out.rejected += 1
        else:
            out.accepted.append(parsed)
    return out


def collect_evals(replies: list[Message], devices: dict[int, int]) -> list[ClientEval]:
    """Per-phone held-out losses from the evaluate replies that carry them."""
    evals = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if (reply.has_error() or node not in devices
                or protocol.METRICS not in reply.content.metric_records):
            reason = reply.error.reason if reply.has_error() else "no metrics or unknown node"
            log.warning("evaluation reply from node %d dropped: %s", node, reason)
            continue
        m = reply.content.metric_records[protocol.METRICS]
        personal = m.get(protocol.LOSS_PERSONAL)
        rank = int(m[protocol.LORA_RANK]) if protocol.LORA_RANK in m else None
        evals.append(ClientEval(device=devices[node], rank=rank,
                                loss_base=float(m[protocol.LOSS_BASE]),
                                loss_global=float(m[protocol.LOSS_GLOBAL]),
                                loss_personal=None if personal is None else float(personal)))
    return sorted(evals, key=lambda e: e.device)


TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
