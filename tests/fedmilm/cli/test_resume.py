"""`kill -9` of a running `fedmilm-simulate`, then `resume=RUN_DIR`: nothing lost or doubled.

The resumed run must end with the same rounds, the same user-level epsilon and (with seeded
noise and no personal state) the same global adapter as an uninterrupted run with the seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fedmilm.cli.test_simulate import SIMULATE, _simulate

RUN = ["model=tiny", "personalization=none", "privacy=user", "privacy.seeded_noise=true",
       "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=null",
       "federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=3",
       "train.lr=0.02"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _kill_after_first_checkpoint(run_dir: Path) -> None:
    proc = subprocess.Popen([*SIMULATE, *RUN, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = run_dir / "checkpoints" / "round_0001"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)  # Ray's helpers share the driver's fate; give them a moment to go
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of the killed run is left running


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _simulate([*RUN, f"hydra.run.dir={straight}"])
    assert done.returncode == 0, done.stderr[-3000:]

    _kill_after_first_checkpoint(killed)
    assert not (killed / "checkpoints" / "round_0003").exists()  # it really died mid-run
    assert not (killed / "global_adapter").exists()
    resumed = _simulate([f"resume={killed}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing after round" in resumed.stderr + resumed.stdout

    expected, got = _rows(straight), _rows(killed)
    assert [r["round"] for r in got] == [1, 2, 3]  # no round lost or counted twice
    assert [r["epsilon_user"] for r in got] == pytest.approx([r["epsilon_user"] for r in expected])
    history = json.loads((killed / "privacy_accountant.json").read_text())["history"]
    assert sum(entry[2] for entry in history) == 3  # three accountant steps, not four
    a = load_file(str(straight / "global_adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "global_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_overrides_and_missing_runs(tmp_path):
    done = _simulate([f"resume={tmp_path}", "seed=3"])
    assert done.returncode == 2
    assert "drop the other overrides (seed=3)" in done.stderr
    assert "no config.yaml there" in done.stderr
