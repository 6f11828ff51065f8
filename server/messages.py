"""Build the messages the server sends and read the replies it gets, as typed values."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedmilm import protocol
from fedmilm.adapters import State, wire
from fedmilm.aggregation import update_problem
from fedmilm.aggregation.streaming import StreamingNormBound
from fedmilm.metrics import ClientEval
from fedmilm.privacy.user_level import l2_norm

log = logging.getLogger("fedmilm.server")


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted training reply."""

    device: int
    update: State
    num_examples: int              # its FedAvg weight (1 under DP: counts are not released)
    train_loss: float | None
    tokens: int | None
    seconds: float | None
    nbytes: int
    rank: int | None = None  # heterogeneous ranks: the rank the phone trained
    within_clip: float | None = None  # adaptive clipping: the phone's +-0.5 vote


@dataclass
class TrainReplies:
    """A round's training replies, sorted into what counts and what does not."""

    accepted: list[ClientUpdate] = field(default_factory=list)
    rejected: int = 0
    declined: int = 0                  # phones that declined (budget, policy, conditions, ...)
    ledger_trainings: dict[int, int] = field(default_factory=dict)  # device -> its ledger count


@dataclass(frozen=True)
class Wiring:
    """What every message of this run carries and how replies map to phones; fixed for the
    whole run, so it is computed once."""

    config_text: str               # the validated run config as YAML
    devices: dict[int, int]        # node id -> device id
    diagnostics: Path | None       # simulation: where virtual phones leave per-phone results


@dataclass
class TrainOutcome:
    """A round's training result: the global step (None: skipped) and what to record."""

    step: State | None
    replies: TrainReplies
    contributors: int
    bytes_up: int
    bytes_down: int
    ledger_decreases: int | None = None


def round_config(server_round: int, config_text: str, clip_norm: float | None = None,
                 deadline: float | None = None) -> ConfigRecord:
    """What every phone is told each round: the round, the run config, (adaptive clipping)
    the round's clip: a request, each phone checks it against its own policy; where its
    storage lives is its own business. `deadline` (unix time) tells a phone that works
    asynchronously (a bridged phone) when its job stops being worth finishing."""
    values: dict[str, int | float | str] = {protocol.SERVER_ROUND: server_round,
                                            protocol.RUN_CONFIG: config_text}
    if deadline is not None:
        values[protocol.DEADLINE] = float(deadline)
    if clip_norm is not None:
        values[protocol.CLIP_NORM] = float(clip_norm)
    return ConfigRecord(values)


def build_messages(nodes: list[int], *, message_type: str, global_arrays: ArrayRecord,
                   server_round: int, config_text: str, clip_norm: float | None = None,
                   deadline: float | None = None) -> Iterator[Message]:
    """One message per node, built as it is sent. They share one ArrayRecord (the global part
    in the run's download format) and one ConfigRecord (nobody mutates them), so a cohort costs
    one adapter's memory, not one per phone."""
    content = RecordDict({protocol.GLOBAL_ARRAYS: global_arrays,
                          protocol.CONFIG: round_config(server_round, config_text, clip_norm,
                                                        deadline)})
    for node in nodes:
        yield Message(content=content, dst_node_id=node, message_type=message_type)


def query_messages(nodes: list[int]) -> list[Message]:
    """Ask every node for its device id (answered without touching model or data)."""
    return [Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=node,
                    message_type=MessageType.QUERY) for node in nodes]


def collect_device_ids(replies: list[Message],
                       identities: dict[int, int] | None = None) -> dict[int, int]:
    """node id -> device id from the query replies. Nodes that fail, or claim a device id
    another node already holds, are left out (and logged). With `identities` (node id -> the
    device id its registered key belongs to) a node's claim must match its key's device:
    no phone can take another's id, or its storage and sampling slot."""
    devices: dict[int, int] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        metrics = None if reply.has_error() else reply.content.metric_records.get(protocol.METRICS)
        device = metric(metrics, protocol.DEVICE_ID, int, minimum=0)
        if isinstance(device, str) or device is None:
            log.warning("node %d left out: no usable device id (%s)", node, device)
            continue
        if identities is not None and identities.get(node) != device:
            log.warning("node %d left out: it claims device %d, its registered key belongs to "
                        "%s", node, device, identities.get(node, "no device"))
            continue
        if device in devices.values():
            log.warning("node %d left out: device id %d is already taken", node, device)
            continue
        devices[node] = device
    return devices


def _reject(node: int, devices: dict[int, int], reason: str, quiet: bool) -> None:
    """Log a rejected reply with its node and device, or, under user-level DP (where who took
    part in a round is secret from log readers), without them at debug level."""
    if quiet:
        log.debug("a round reply was rejected: %s", reason)
    else:
        log.warning("round reply from node %d (device %s) rejected: %s", node,
                    devices.get(node, "?"), reason)


def metric(metrics: object, key: str, kind: type, *, minimum: float | None = None,
           required: bool = True) -> int | float | None | str:
    """One value of a phone's MetricRecord, checked: a finite number of `kind` (ints for
    counts), at least `minimum`. Returns the value, None when absent and optional, or the
    reason it is unusable (a string) - never raises, whatever the phone sent."""
    if metrics is None or key not in metrics:  # type: ignore[operator]
        return f"no '{key}' in its metrics" if required else None
    value = metrics[key]  # type: ignore[index]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"'{key}' is not a number"
    if kind is int and (not float(value).is_integer() or not math.isfinite(value)):
        return f"'{key}' is not an integer"
    if not math.isfinite(value):
        return f"'{key}' is not finite"
    if minimum is not None and value < minimum:
        return f"'{key}'={value} is below {minimum}"
    return kind(value)


def _parse_update(reply: Message, reference: State, max_norm: float, device: int, dp: bool,
                  votes: bool = False, upload: str = "fp32") -> ClientUpdate | str:
    content = reply.content
    if protocol.UPDATE_ARRAYS not in content.array_records:
        return f"no '{protocol.UPDATE_ARRAYS}' arrays in the reply"
    arrays = content.array_records[protocol.UPDATE_ARRAYS]
    problem = wire.problem(arrays, reference, upload)  # before a byte of it is decoded
    if problem:
        return problem
    try:
        update = wire.decode(arrays, reference, upload)
    except ValueError as err:
        return str(err)
    problem = update_problem(update, reference, max_norm=max_norm)
    if problem:
        return problem
    metrics = content.metric_records.get(protocol.METRICS)
    rank = metric(metrics, protocol.LORA_RANK, int, minimum=1, required=False)
    if dp:  # only the update travels: equal weights, no private statistics
        if isinstance(rank, str):
            return rank
        vote = metric(metrics, protocol.WITHIN_CLIP, float) if votes else None
        if isinstance(vote, str) or vote not in (None, -0.5, 0.5):
            return vote if isinstance(vote, str) else f"'{protocol.WITHIN_CLIP}' is not +-0.5"
        return ClientUpdate(device=device, update=update, num_examples=1, train_loss=None,
                            tokens=None, seconds=None, nbytes=arrays.count_bytes(), rank=rank,
                            within_clip=vote)
    values = {key: metric(metrics, key, kind, minimum=low, required=key == protocol.NUM_EXAMPLES)
              for key, kind, low in ((protocol.NUM_EXAMPLES, int, 1),
                                     (protocol.TRAIN_LOSS, float, 0),
                                     (protocol.TRAIN_TOKENS, int, 0),
                                     (protocol.TRAIN_SECONDS, float, 0))}
    bad = [v for v in (*values.values(), rank) if isinstance(v, str)]
    if bad:
        return bad[0]
    return ClientUpdate(device=device, update=update,
                        num_examples=values[protocol.NUM_EXAMPLES],  # type: ignore[arg-type]
                        train_loss=values[protocol.TRAIN_LOSS],  # type: ignore[arg-type]
                        tokens=values[protocol.TRAIN_TOKENS],  # type: ignore[arg-type]
                        seconds=values[protocol.TRAIN_SECONDS],  # type: ignore[arg-type]
                        nbytes=arrays.count_bytes(), rank=rank)  # type: ignore[arg-type]


RELATIVE_BOUND_MIN_UPDATES = 3  # below this, a median says nothing: only the absolute cap


class TrainCollector:
    """Sorts training replies one at a time, as they arrive, into accepted updates, rejections
    (each logged with its node id and reason, unless `quiet`) and declines (a normal
    non-participation). `devices`: node id -> device id. `dp`: replies carry only the update
    (and a ledger count), never private statistics. `norm_multiple`: also reject an update
    longer than that many times the round's median norm so far (`StreamingNormBound`).
    `fold`: takes each accepted update (the server adds it to its running sums), after which
    only the update's statistics are kept; without it the updates themselves are kept.
    `votes`: adaptive clipping: a reply must carry its +-0.5 clip vote. `upload`: the wire
    format updates must arrive in (`fedmilm.adapters.wire`)."""

    def __init__(self, reference: State, *, max_norm: float, devices: dict[int, int],
                 dp: bool = False, quiet: bool = False, norm_multiple: float | None = None,
                 fold: Callable[[ClientUpdate], None] | None = None,
                 votes: bool = False, upload: str = "fp32") -> None:
        self.reference, self.max_norm, self.devices = reference, max_norm, devices
        self.dp, self.quiet, self.fold, self.votes = dp, quiet, fold, votes
        self.upload = upload
        self.out = TrainReplies()
        self._bound = (None if norm_multiple is None
                       else StreamingNormBound(norm_multiple, RELATIVE_BOUND_MIN_UPDATES))

    def take(self, reply: Message) -> None:
        """Sort one reply (the caller may drop it afterwards)."""
        out, devices, quiet = self.out, self.devices, self.quiet
        node = reply.metadata.src_node_id
        if reply.has_error():
            _reject(node, devices, f"client error: {reply.error.reason}", quiet)
            out.rejected += 1
            return
        if node not in devices:
            _reject(node, devices, "not a node this round was sent to", quiet)
            out.rejected += 1
            return
        device = devices[node]
        metrics = reply.content.metric_records.get(protocol.METRICS)
        count = metric(metrics, protocol.LEDGER_TRAININGS, int, minimum=0, required=False)
        if isinstance(count, int):
            out.ledger_trainings[device] = count
        declined = metric(metrics, protocol.DECLINED, int, required=False)
        if isinstance(declined, int):
            why = protocol.DECLINE_REASONS.get(declined, f"unknown reason code {declined}")
            if quiet:
                log.debug("a phone declined to train: %s", why)
            else:
                log.info("device %d declined to train: %s", device, why)
            out.declined += 1
            return
        parsed = _parse_update(reply, self.reference, self.max_norm, device, self.dp,
                               self.votes, self.upload)
        if isinstance(parsed, str):
            _reject(node, devices, parsed, quiet)
            out.rejected += 1
        elif self._bound is None:
            self._accept(parsed)
        else:
            self._bound.offer(parsed, l2_norm(parsed.update), self._judge)

    def finish(self) -> TrainReplies:
        """The round's replies, once no more will come."""
        if self._bound is not None:
            self._bound.flush(self._judge)
        return self.out

    def _judge(self, update: object, norm: float, bound: float | None) -> None:
        assert isinstance(update, ClientUpdate) and self._bound is not None
        if bound is not None and norm > bound:
            multiple = self._bound.multiple
            node = next((n for n, d in self.devices.items() if d == update.device), -1)
            _reject(node, self.devices,
                    f"update norm {norm:.3g} exceeds federation.norm_bound_multiple="
                    f"{multiple:g} x the round's median so far {bound / multiple:.3g}",
                    self.quiet)
            self.out.rejected += 1
        else:
            self._accept(update)

    def _accept(self, update: ClientUpdate) -> None:
        if self.fold is None:
            self.out.accepted.append(update)
            return
        self.fold(update)
        self.out.accepted.append(replace(update, update={}))


def collect_updates(replies: Iterable[Message], reference: State, *, max_norm: float,
                    devices: dict[int, int], dp: bool = False, quiet: bool = False,
                    norm_multiple: float | None = None, votes: bool = False,
                    upload: str = "fp32") -> TrainReplies:
    """`TrainCollector` over a batch of replies, keeping the accepted updates."""
    collector = TrainCollector(reference, max_norm=max_norm, devices=devices, dp=dp,
                               quiet=quiet, norm_multiple=norm_multiple, votes=votes,
                               upload=upload)
    for reply in replies:
        collector.take(reply)
    return collector.finish()


def collect_evals(replies: list[Message], devices: dict[int, int]) -> list[ClientEval]:
    """Per-phone held-out losses from the evaluate replies that carry them."""
    evals = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if (not reply.has_error() and protocol.METRICS in reply.content.metric_records
                and protocol.DECLINED in reply.content.metric_records[protocol.METRICS]):
            continue  # a phone that does not evaluate (under DP, or bridged) said so
        if (reply.has_error() or node not in devices
                or protocol.METRICS not in reply.content.metric_records):
            reason = reply.error.reason if reply.has_error() else "no metrics or unknown node"
            log.warning("evaluation reply from node %d dropped: %s", node, reason)
            continue
        parsed = client_eval(devices[node], reply.content.metric_records[protocol.METRICS])
        if isinstance(parsed, str):
            log.warning("evaluation reply from node %d dropped: %s", node, parsed)
            continue
        evals.append(parsed)
    return sorted(evals, key=lambda e: e.device)


def client_eval(device: int, values: object) -> ClientEval | str:
    """One phone's held-out losses from its evaluate metrics (or the simulator's diagnostics
    file), or why they are unusable."""
    losses = {key: metric(values, key, float, minimum=0, required=key != protocol.LOSS_PERSONAL)
              for key in (protocol.LOSS_BASE, protocol.LOSS_GLOBAL, protocol.LOSS_PERSONAL)}
    rank = metric(values, protocol.LORA_RANK, int, minimum=1, required=False)
    bad = [v for v in (*losses.values(), rank) if isinstance(v, str)]
    if bad:
        return bad[0]
    return ClientEval(device=device, rank=rank,  # type: ignore[arg-type]
                      loss_base=losses[protocol.LOSS_BASE],  # type: ignore[arg-type]
                      loss_global=losses[protocol.LOSS_GLOBAL],  # type: ignore[arg-type]
                      loss_personal=losses[protocol.LOSS_PERSONAL])  # type: ignore[arg-type]


TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
