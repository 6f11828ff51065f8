"""An availability trace decides who may be sampled each round, in a real simulated federation:
only phones idle, charging and on Wi-Fi in that round's slot train."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flwr.simulation import run_simulation

from fedmilm.clients import app as phone_app
from fedmilm.clients.storage import PERSONAL_FILE
from fedmilm.config import to_yaml
from fedmilm.privacy.policy import write_phone_policy
from fedmilm.server.app import make_server_app
from tests.conftest import private_ray, tiny_config

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it
ROOT = Path(__file__).resolve().parents[2]
TRACE = """device,slot,idle,charging,unmetered,battery_percent,temperature_c
0,0,1,1,1,80,30
1,0,1,1,1,80,30
2,0,1,0,1,80,30
3,0,0,1,1,80,30
2,1,1,1,1,90,31
3,1,1,1,0,90,31
"""


def test_only_available_phones_are_sampled(tmp_path, monkeypatch):
    trace = tmp_path / "trace.csv"
    trace.write_text(TRACE)
    cfg = tiny_config("personalization=dual", "federation.num_clients=4",
                      "federation.clients_per_round=2", "federation.min_replies=1",
                      "federation.rounds=2", "device.availability=trace",
                      f"device.availability_path={trace}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                "")]))
    run_dir = tmp_path / "run"
    write_phone_policy(cfg.privacy, run_dir / "devices")
    run_simulation(server_app=make_server_app(to_yaml(cfg), str(run_dir)),
                   client_app=phone_app.make_client_app(str(run_dir / "devices"),
                                                        str(run_dir / "diagnostics")),
                   num_supernodes=4,
                   backend_config=private_ray())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["available"], r["sampled"], r["clients"]) for r in rows] == [(2, 2, 2), (1, 1, 1)]
    trained = {d for d in range(4) if (run_dir / "devices" / str(d) / PERSONAL_FILE).exists()}
    assert trained == {0, 1, 2}  # device 3 was never idle, charging and on Wi-Fi at once
