"""`kill -9` of a running `fedmilm-simulate`, then `resume=RUN_DIR`: nothing lost or doubled.

The resumed run must end with the same rounds, the same user-level epsilon and (with seeded
noise and no personal state) the same global adapter as an uninterrupted run with the seed:
the server's Adam state must come back from the checkpoint for that.
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

from tests.conftest import private_ray
from tests.fedmilm.cli.test_simulate import SIMULATE, _simulate

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it

RUN = ["model=tiny", "personalization=none", "privacy=user", "privacy.seeded_noise=true",
       "privacy.user.allow_swamped=true",
       "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=null",
       "federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=3",
       "train.lr=0.02", "aggregation.server_optimizer=adam", "aggregation.server_lr=0.01"]


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
    original = (killed / ".hydra" / "overrides.yaml").read_text()
    resumed = _simulate([f"resume={killed}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing after round" in resumed.stderr + resumed.stdout
    assert (killed / ".hydra" / "overrides.yaml").read_text() == original  # kept as it was
    assert list((killed / ".hydra-resumed").iterdir())  # the resume's own record beside it

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


class _CrashAtFirstRelease:
    """A Grid that dies the moment the server first sends out anything derived from round 1's
    aggregate (the evaluate messages), after noting what it would have released."""

    def __init__(self, grid, released: list) -> None:
        self.grid, self.released = grid, released

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the real Grid
        return getattr(self.grid, name)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "evaluate":
            self.released.append(messages[0].content.array_records["global"]
                                 .to_torch_state_dict())
            raise SystemExit("killed in the release window")
        return self.grid.push_messages(messages)


class _Recording(_CrashAtFirstRelease):
    """A Grid that notes the global part sent for training, once per round (nothing
    crashes)."""

    def __init__(self, grid, released: list) -> None:
        super().__init__(grid, released)
        self.rounds: set[int] = set()

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type != "train":
                continue
            server_round = message.content.config_records["config"]["server-round"]
            if server_round not in self.rounds:
                self.rounds.add(server_round)
                self.released.append(message.content.array_records["global"]
                                     .to_torch_state_dict())
        return self.grid.push_messages(messages)


def _serve(cfg, run_dir: Path, grid_type, released: list) -> None:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedmilm.clients.app import make_client_app
    from fedmilm.privacy.policy import write_phone_policy
    from fedmilm.server.federation import run_federation

    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:  # noqa: ANN001
        run_federation(grid_type(grid, released), cfg, run_dir, diagnostics=run_dir / "diag")

    write_phone_policy(cfg.privacy, run_dir / "devices")
    run_simulation(server_app=server, num_supernodes=cfg.federation.num_clients,
                   client_app=make_client_app(str(run_dir / "devices"), str(run_dir / "diag")),
                   backend_config=private_ray())


def test_a_crash_in_the_release_window_resends_the_accounted_aggregate(tmp_path):
    """Round 1's noisy aggregate is checkpointed with its accountant step before it is first
    sent; after a crash at that moment the resumed run sends exactly that aggregate on, and
    the accountant holds one step per round: nothing released twice under one charge."""
    from dataclasses import replace

    from fedmilm.privacy.calibrate import resolve_privacy
    from tests.conftest import tiny_config

    cfg = resolve_privacy(tiny_config(*RUN[1:], "federation.rounds=2"))
    run_dir = tmp_path / "run"
    first: list = []
    _serve(cfg, run_dir, _CrashAtFirstRelease, first)
    assert len(first) == 1 and (run_dir / "checkpoints" / "round_0001").is_dir()
    accounted = json.loads((run_dir / "privacy_accountant.json").read_text())["history"]
    assert sum(entry[2] for entry in accounted) == 1  # charged before the release

    again: list = []
    _serve(replace(cfg, resume=str(run_dir)), run_dir, _Recording, again)
    assert len(again) == 1  # round 2's train messages carry round 1's aggregate
    for key, value in first[0].items():
        assert torch.equal(again[0][key], value)
    rows = _rows(run_dir)
    assert [(r["round"], r["interrupted"]) for r in rows] == [(1, True), (2, False)]
    assert rows[0]["epsilon_user"] is not None
    history = json.loads((run_dir / "privacy_accountant.json").read_text())["history"]
    assert sum(entry[2] for entry in history) == 2
