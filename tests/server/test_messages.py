"""Reply collection against crafted replies: each bad reply costs that reply, never the run."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmilm import protocol
from fedmilm.adapters import wire
from fedmilm.privacy.randomness import SeededRandom
from fedmilm.server.messages import (
    collect_device_ids,
    collect_evals,
    collect_updates,
)

REF = {"a.lora_A.weight": torch.zeros(4, 3), "a.lora_B.weight": torch.zeros(3, 4)}
DEVICES = {100 + i: i for i in range(10)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _reply(node: int, *, arrays: ArrayRecord | None = None, metrics: dict | None = None,
           kind: str = "train") -> Message:
    sent = Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=node,
                   message_type=kind)
    content = RecordDict({})
    if arrays is not None:
        content[protocol.UPDATE_ARRAYS] = arrays
    if metrics is not None:
        content[protocol.METRICS] = MetricRecord(metrics)
    reply = Message(content=content, reply_to=sent)
    return reply


def _update(scale: float = 0.01) -> ArrayRecord:
    return ArrayRecord({k: torch.full_like(v, scale) for k, v in REF.items()})


def _oversized() -> ArrayRecord:
    """Metadata that claims the reference shape over 10 MB of payload."""
    record = _update()
    key = next(iter(REF))
    record[key] = Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray",
                        data=b"\0" * 10_000_000)
    return record


CRAFTED = {
    "no arrays": dict(metrics={protocol.NUM_EXAMPLES: 5}),
    "no metrics": dict(arrays=_update()),
    "nan count": dict(arrays=_update(), metrics={protocol.NUM_EXAMPLES: float("nan")}),
    "inf count": dict(arrays=_update(), metrics={protocol.NUM_EXAMPLES: float("inf")}),
    "fractional count": dict(arrays=_update(), metrics={protocol.NUM_EXAMPLES: 2.5}),
    "zero count": dict(arrays=_update(), metrics={protocol.NUM_EXAMPLES: 0}),
    "negative loss": dict(arrays=_update(), metrics={protocol.NUM_EXAMPLES: 4,
                                                     protocol.TRAIN_LOSS: -1.0}),
    "nan rank": dict(arrays=_update(), metrics={protocol.NUM_EXAMPLES: 4,
                                                protocol.LORA_RANK: float("nan")}),
    "extra array": dict(arrays=ArrayRecord({**{k: torch.zeros_like(v) for k, v in REF.items()},
                                            "lm_head.weight": torch.zeros(2, 2)}),
                        metrics={protocol.NUM_EXAMPLES: 4}),
    "oversized payload": dict(arrays=_oversized(), metrics={protocol.NUM_EXAMPLES: 4}),
    "int64 array": dict(arrays=ArrayRecord({k: torch.zeros(v.shape, dtype=torch.int64)
                                            for k, v in REF.items()}),
                        metrics={protocol.NUM_EXAMPLES: 4}),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_train_reply_is_rejected_alone(name, caplog):
    honest = _reply(100, arrays=_update(), metrics={protocol.NUM_EXAMPLES: 4})
    crafted = _reply(101, **CRAFTED[name])
    out = collect_updates([honest, crafted], REF, max_norm=10.0, devices=DEVICES)
    assert [u.device for u in out.accepted] == [0] and out.rejected == 1
    assert "from node 101" in caplog.text


def test_an_upload_in_another_format_than_the_runs_is_rejected_alone(caplog):
    """An int8 run accepts int8 codes and turns away float32 (and vice versa)."""
    codes = wire.encode({k: torch.full_like(v, 0.01) for k, v in REF.items()}, "int8",
                        SeededRandom(0))
    replies = [_reply(100, arrays=codes, metrics={protocol.NUM_EXAMPLES: 4}),
               _reply(101, arrays=_update(), metrics={protocol.NUM_EXAMPLES: 4})]
    out = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES, upload="int8")
    assert [u.device for u in out.accepted] == [0] and out.rejected == 1
    torch.testing.assert_close(out.accepted[0].update["a.lora_A.weight"],
                               torch.full((4, 3), 0.01))
    assert out.accepted[0].nbytes < _update().count_bytes() / 3
    assert "from node 101" in caplog.text and "int8" in caplog.text
    plain = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES)
    assert [u.device for u in plain.accepted] == [1] and plain.rejected == 1


def _int8_with(key: str, array: Array) -> ArrayRecord:
    record = wire.encode({k: torch.full_like(v, 0.01) for k, v in REF.items()}, "int8",
                         SeededRandom(0))
    record[key] = array
    return record


CRAFTED_INT8 = {
    "a zlib bomb": _int8_with("a.lora_A.weight", Array(
        dtype="int8", shape=(4, 3), stype=wire.DEFLATED, data=zlib.compress(b"\0" * 10_000))),
    "claimed huge shape": _int8_with("a.lora_A.weight", Array(
        dtype="int8", shape=(10**9, 10**9), stype=wire.RAW, data=b"\0" * 12)),
    "nan scale": _int8_with(wire.SCALES, Array(
        dtype="float32", shape=(2,), stype=wire.RAW,
        data=np.array([float("nan"), 1.0], dtype="<f4").tobytes())),
    "huge scale": _int8_with(wire.SCALES, Array(
        dtype="float32", shape=(2,), stype=wire.RAW,
        data=np.array([3e38, 3e38], dtype="<f4").tobytes())),
}


@pytest.mark.parametrize("name", sorted(CRAFTED_INT8))
def test_a_crafted_int8_reply_is_rejected_alone(name, caplog):
    """Any value, any size: in an int8 run one phone's crafted codes or scales cost that reply
    (a huge scale decodes to inf or past the norm bound), and the honest one still counts."""
    honest = wire.encode({k: torch.full_like(v, 0.01) for k, v in REF.items()}, "int8",
                         SeededRandom(1))
    replies = [_reply(100, arrays=honest, metrics={protocol.NUM_EXAMPLES: 4}),
               _reply(101, arrays=CRAFTED_INT8[name], metrics={protocol.NUM_EXAMPLES: 4})]
    out = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES, upload="int8")
    assert [u.device for u in out.accepted] == [0] and out.rejected == 1
    assert "from node 101" in caplog.text


def test_an_oversized_payload_is_refused_before_it_is_decoded(monkeypatch):
    decoded = []
    original = ArrayRecord.to_torch_state_dict
    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict",
                        lambda self: decoded.append(1) or original(self))
    out = collect_updates([_reply(101, **CRAFTED["oversized payload"])], REF, max_norm=10.0,
                          devices=DEVICES)
    assert out.rejected == 1 and decoded == []


def test_under_dp_replies_carry_no_weights_and_count_one_each():
    replies = [_reply(100 + i, arrays=_update(), metrics={}) for i in range(3)]
    out = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES, dp=True)
    assert [u.num_examples for u in out.accepted] == [1, 1, 1]


def test_adaptive_clip_votes_must_be_exactly_plus_or_minus_a_half(caplog):
    votes = [0.5, -0.5, None, 0.3, 1.0, float("nan"), 0]
    replies = [_reply(100 + i, arrays=_update(),
                      metrics={} if v is None else {protocol.WITHIN_CLIP: v})
               for i, v in enumerate(votes)]
    out = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES, dp=True, votes=True)
    assert [u.within_clip for u in out.accepted] == [0.5, -0.5] and out.rejected == 5
    plain = collect_updates(replies[2:3], REF, max_norm=10.0, devices=DEVICES, dp=True)
    assert [u.within_clip for u in plain.accepted] == [None]  # no vote asked, none read


def test_declines_and_ledger_counts_are_read_defensively():
    replies = [_reply(100, metrics={protocol.DECLINED: 1, protocol.LEDGER_TRAININGS: 3}),
               _reply(101, metrics={protocol.DECLINED: float("nan")}),
               _reply(102, metrics={protocol.DECLINED: 2, protocol.LEDGER_TRAININGS: -4})]
    out = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES)
    assert out.declined == 2 and out.rejected == 1  # a NaN decline code is a bad reply
    assert out.ledger_trainings == {0: 3}  # a negative count is ignored


def test_an_update_far_longer_than_the_cohorts_is_rejected():
    replies = [_reply(100 + i, arrays=_update(s), metrics={protocol.NUM_EXAMPLES: 4})
               for i, s in enumerate([0.010, 0.012, 0.009, 0.011, 0.5])]
    out = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES)
    assert len(out.accepted) == 5  # all under the absolute cap...
    out = collect_updates(replies, REF, max_norm=10.0, devices=DEVICES, norm_multiple=5.0)
    assert [u.device for u in out.accepted] == [0, 1, 2, 3] and out.rejected == 1


def test_bad_evaluation_and_identity_replies_are_dropped_alone():
    good = {protocol.LOSS_BASE: 2.0, protocol.LOSS_GLOBAL: 1.5}
    evals = collect_evals([_reply(100, metrics=good, kind="evaluate"),
                           _reply(101, metrics={protocol.LOSS_BASE: 2.0}, kind="evaluate"),
                           _reply(102, metrics={**good, protocol.LOSS_GLOBAL: float("nan")},
                                  kind="evaluate")], DEVICES)
    assert [e.device for e in evals] == [0]
    ids = collect_device_ids([_reply(5, metrics={protocol.DEVICE_ID: 7}, kind="query"),
                              _reply(6, metrics={protocol.DEVICE_ID: 7}, kind="query"),
                              _reply(7, metrics={protocol.DEVICE_ID: float("nan")}, kind="query"),
                              _reply(8, metrics={protocol.DEVICE_ID: -1}, kind="query"),
                              _reply(9, metrics={}, kind="query")])
    assert ids == {5: 7}


def test_fedavg_caps_a_phones_self_reported_weight():
    from fedmilm.aggregation import FedAvg, aggregate_all
    from tests.conftest import tiny_config

    agg = FedAvg(tiny_config())
    honest, liar = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    step = aggregate_all(agg, [honest, honest, liar], [16, 16, 10**15], REF)
    cap = agg.max_weight
    assert torch.allclose(step["w"], torch.full((2,), cap / (32 + cap)))
    assert float(step["w"][0]) < 0.5  # the liar does not get to set the step
    assert np.isfinite(float(step["w"][0]))


def test_with_registered_keys_a_phone_cannot_claim_another_phones_id(caplog):
    """Authenticated deployment: node 5's key is device 0's, node 6's is device 1's. Node 6
    claiming device 0 (to take its storage or its place) is left out; an unregistered node
    too."""
    replies = [_reply(5, metrics={protocol.DEVICE_ID: 0}, kind="query"),
               _reply(6, metrics={protocol.DEVICE_ID: 0}, kind="query"),
               _reply(7, metrics={protocol.DEVICE_ID: 2}, kind="query")]
    assert collect_device_ids(replies, {5: 0, 6: 1}) == {5: 0}
    assert "its registered key belongs to 1" in caplog.text
