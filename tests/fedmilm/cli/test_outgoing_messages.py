"""Every message phones send during a real simulated federation, inspected on the way out.

A recording mod wraps the very train/evaluate handlers of `fedmilm.clients.app` inside Flower's
simulation engine and writes down, for each reply, its record names, array keys, metric keys and
types, and the update's norm. Personal tensors and raw text must never appear.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.simulation import run_simulation

from fedmilm import protocol
from fedmilm.adapters import build_adapter_space
from fedmilm.clients import app as phone_app
from fedmilm.config import to_yaml
from fedmilm.privacy.calibrate import resolve_privacy
from fedmilm.privacy.policy import write_phone_policy
from fedmilm.privacy.user_level import l2_norm
from fedmilm.server.app import make_server_app
from tests.conftest import private_ray, tiny_config

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it

LOG_DIR_ENV = "FEDMILM_TEST_OUTGOING_DIR"


def _recorder(msg: Message, context: Context, call) -> Message:
    reply = call(msg, context)
    content = reply.content
    update = content.array_records.get(protocol.UPDATE_ARRAYS)
    entry = {
        "type": msg.metadata.message_type,
        "array_records": list(content.array_records),
        "config_records": list(content.config_records),
        "array_keys": sorted(update.keys()) if update is not None else [],
        "norm": l2_norm(update.to_torch_state_dict()) if update is not None else None,
        "metrics": {k: type(v).__name__ for m in content.metric_records.values()
                    for k, v in m.items()},
    }
    path = Path(os.environ[LOG_DIR_ENV]) / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(entry))
    return reply


@pytest.mark.parametrize("mode,privacy", [("fedsa", "user"), ("dual", "both")])
def test_no_personal_tensor_or_text_leaves_a_phone(tmp_path, monkeypatch, mode, privacy):
    """Every reply of a DP federation: the clipped global update, and under DP-SGD the ledger
    count the server already knows; nothing else derived from a phone's data."""
    clip = 0.02
    cfg = resolve_privacy(tiny_config(
        f"personalization={mode}", f"privacy={privacy}",
        f"privacy.user.clip_norm={clip}", "federation.num_clients=3",
        "federation.clients_per_round=2", "federation.min_replies=1", "federation.rounds=2",
        "privacy.delta=1e-3", "privacy.sample.target_epsilon=null", "train.lr=0.05"))
    logs = tmp_path / "outgoing"
    logs.mkdir()
    monkeypatch.setenv(LOG_DIR_ENV, str(logs))  # Ray workers inherit the environment...
    root = str(Path(__file__).resolve().parents[3])  # ...and import this module's recorder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    write_phone_policy(cfg.privacy, tmp_path / "run" / "devices")
    run_simulation(server_app=make_server_app(to_yaml(cfg), str(tmp_path / "run")),
                   client_app=phone_app.make_client_app(str(tmp_path / "run" / "devices"),
                                                        str(tmp_path / "run" / "diagnostics"),
                                                        mods=(_recorder,)),
                   num_supernodes=3,
                   backend_config=private_ray())
    entries = [json.loads(p.read_text()) for p in logs.iterdir()]
    space = build_adapter_space(cfg.model, cfg.lora, mode=mode, seed=cfg.seed)
    trains = [e for e in entries if e["type"] == "train"]
    assert trains and len(entries) > len(trains)  # both kinds of reply were inspected
    allowed = {protocol.LEDGER_TRAININGS} if privacy == "both" else set()
    for entry in entries:
        assert entry["config_records"] == []  # no strings of any kind go back
        if entry["type"] == "query":  # the identity query: the phone's pseudonym only
            assert set(entry["metrics"]) == {protocol.DEVICE_ID}
        else:  # no count, loss, token, timing or epsilon
            assert set(entry["metrics"]) <= allowed
    for entry in trains:
        assert entry["array_records"] == [protocol.UPDATE_ARRAYS]
        assert entry["array_keys"] == sorted(space.global_keys)
        assert not set(entry["array_keys"]) & set(space.personal_keys)
        assert entry["norm"] <= clip * (1 + 1e-4)  # user-level updates arrive clipped
