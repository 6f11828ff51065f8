"""A phone that speaks only HTTPS (the Python reference phone: HTTP + the ExecuTorch runtime,
step for step what the Android app does) in a real `fedmilm-deploy` federation with TLS and
SuperNode authentication, next to a warm phone service. Killed mid-job, the round carries on
without it; restarted, its next job succeeds."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from fedmilm.config import to_yaml
from fedmilm.deploy.local import LocalFederation
from fedmilm.deploy.processes import log_tail
from tests.conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.export]  # a federation that exports its programs

MID_JOB = {"bundle", "adapter", "training", "upload"}


def _wait(condition, timeout: float, what: str, federation: LocalFederation):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} within {timeout:.0f} s\n{federation.failure_context()}")


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _phase(storage: Path) -> str | None:
    try:
        return json.loads((storage / "progress.json").read_text()).get("phase")
    except (OSError, ValueError):
        return None


def test_a_reference_phone_killed_mid_job_costs_one_reply_and_its_next_job_succeeds(tmp_path):
    cfg = tiny_config("federation.num_clients=2", "federation.clients_per_round=2",
                      "federation.rounds=2", "federation.min_replies=1",
                      "federation.round_timeout_s=30", "client.runtime=executorch",
                      "client.delegate=none", "deploy.bridged_phones=1",
                      "deploy.reference_phones=false", "train.lr=0.02")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with LocalFederation(cfg, run_dir) as federation:
        assert federation.bridge_url.startswith("https://") and federation.bridged == [1]
        phone_dir = federation.layout.device_dir(1)
        # the phone is up and polling before the run starts (its first job is round 1's)
        phone = federation.start_reference_phone(1, upload_piece_kb=1)
        _wait(lambda: not (phone_dir / "enrolment").exists(), 300,
              "the phone never registered its key", federation)
        outcome: dict[str, int] = {}
        run = threading.Thread(target=lambda: outcome.update(
            code=federation.submit_and_stream(echo=False)))
        run.start()
        try:
            _wait(lambda: _phase(phone_dir) in MID_JOB, 300, "the phone never started a job",
                  federation)
            phone.proc.send_signal(signal.SIGKILL)  # mid-job, whatever it was doing
            phone.proc.wait()
            first = _wait(lambda: _rows(run_dir), 120, "round 1 never ended", federation)[0]
            assert first["clients"] == 1  # the warm phone's update; the killed phone's is lost
            assert _phase(phone_dir) != "done"
            federation.start_reference_phone(1, upload_piece_kb=1)  # same storage, same key
            run.join(timeout=300)
        finally:
            if run.is_alive():
                federation.processes.stop_all()
                run.join(timeout=60)
        assert outcome.get("code") == 0, federation.failure_context()
        bridge_log = log_tail(federation.layout.logs / "bridge.log", 200)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["clients"] == 2
    progress = json.loads((phone_dir / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["round"] == 2
    assert "registered its key" in bridge_log and "bridged phone 1 delivered" in bridge_log
    assert "did not finish its job before the round's deadline" in bridge_log
    assert sorted((phone_dir / "personal").glob("*.f32"))  # its personal part, on the phone
    assert not (phone_dir / "enrolment").exists() and (phone_dir / "key.pem").stat().st_mode \
        & 0o077 == 0
