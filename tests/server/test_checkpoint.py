"""Checkpoints and metrics after what `kill -9` and disks leave behind."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fedmilm.metrics import read_records
from fedmilm.server.checkpoint import (
    KEEP,
    CheckpointMismatch,
    ServerState,
    checkpoints,
    latest_checkpoint,
    load_latest_intact,
    round_of,
    save_checkpoint,
)


def _state(server_round: int) -> ServerState:
    return ServerState(round=server_round, global_state={"w": torch.full((3,), server_round)},
                       sampler=random.Random(server_round), aggregator={"kind": "fedavg"},
                       ledger_trainings={7: server_round})


def test_only_the_newest_rounds_are_kept(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, _state(r), fingerprint="f")
    assert [p.name for p in checkpoints(tmp_path)] == [f"round_{r:04d}"
                                                      for r in range(6 - KEEP, 6)]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary folder is left behind


def test_pruning_orders_rounds_by_number_past_four_digits(tmp_path):
    """round_10000 sorts before round_9999 as text: pruning by name would delete the newest."""
    for r in (9998, 9999, 10000, 10001):
        save_checkpoint(tmp_path, _state(r), fingerprint="f")
    assert [round_of(p) for p in checkpoints(tmp_path)] == [10000, 10001]
    assert latest_checkpoint(tmp_path).name == "round_10001"
    (tmp_path / "round_notes").mkdir()  # a stray folder is neither pruned nor read
    save_checkpoint(tmp_path, _state(10002), fingerprint="f")
    assert [round_of(p) for p in checkpoints(tmp_path)] == [10001, 10002]
    assert (tmp_path / "round_notes").is_dir()


@pytest.mark.parametrize("damage", ["json", "tensor", "missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, caplog):
    for r in (1, 2):
        save_checkpoint(tmp_path, _state(r), fingerprint="f")
    newest = tmp_path / "round_0002"
    if damage == "json":
        (newest / "server.json").write_text('{"version": 2, "rou')
    elif damage == "tensor":
        (newest / "global.safetensors").write_bytes(b"\0" * 10)
    else:
        (newest / "server.json").unlink()
    path, state = load_latest_intact(tmp_path, fingerprint="f")
    assert path.name == "round_0001" and state.round == 1
    assert torch.equal(state.global_state["w"], torch.full((3,), 1.0))
    assert "round_0002 is damaged" in caplog.text


def test_a_checkpoint_of_another_config_is_never_skipped(tmp_path):
    save_checkpoint(tmp_path, _state(1), fingerprint="f")
    with pytest.raises(CheckpointMismatch, match="different config"):
        load_latest_intact(tmp_path, fingerprint="other")


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 1}) + "\n" + '{"round": 2, "clie')
    assert read_records(path) == [{"round": 1}]
    assert "torn last line" in caplog.text
    path.write_text('{"round": 1, "cl\n' + json.dumps({"round": 2}) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):  # damage mid-file is not torn
        read_records(path)
