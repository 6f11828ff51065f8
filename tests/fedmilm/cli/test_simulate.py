"""`fedmilm-simulate` end to end: the real Flower simulation engine (Ray), real PEFT adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedmilm.adapters import build_adapter_space
from fedmilm.metrics.per_phone import PER_PHONE_FILE, read_per_phone
from fedmilm.model import load_base_model
from tests.conftest import tiny_config

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it

REQUIRED = {"round", "loss_base", "loss_global", "loss_personal", "epsilon_user",
            "epsilon_sample_max", "delta", "bytes_up", "clients"}
SIMULATE = [sys.executable, "-c", "from fedmilm.cli.simulate import main; main()"]
SMALL = ["model=tiny", "federation.num_clients=4", "federation.clients_per_round=2",
         "federation.rounds=2", "train.lr=0.02"]


def _simulate(args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run([*SIMULATE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


@pytest.fixture(scope="module")
def dual_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    done = _simulate([*SMALL, "personalization=dual", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_metrics_have_every_round_and_key(dual_run):
    rows = [json.loads(line) for line in (dual_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert REQUIRED <= set(row)
        assert row["clients"] == 2 and row["rejected"] == 0
        assert row["bytes_up"] > 0 and row["evaluated"] == 4  # every phone evaluated
        assert row["epsilon_user"] is None and row["epsilon_sample_max"] is None
    per_phone = read_per_phone(dual_run / PER_PHONE_FILE)
    assert sorted(per_phone) == [1, 2]
    assert sorted(p["device"] for p in per_phone[2]) == [0, 1, 2, 3]
    last = rows[-1]
    assert last["loss_global"] < last["loss_base"]  # the federation learned something


def test_int8_updates_both_ways_cost_a_quarter_and_still_learn(dual_run, tmp_path):
    """The same federation as `dual_run` with `aggregation.upload=int8 download=int8`."""
    done = _simulate([*SMALL, "personalization=dual", "aggregation.upload=int8",
                      "aggregation.download=int8", f"hydra.run.dir={tmp_path}"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (dual_run / "metrics.jsonl").read_text().splitlines()]
    for row, fp32 in zip(rows, plain, strict=True):
        assert row["clients"] == 2 and row["rejected"] == 0
        # at most 1 byte a value instead of 4 (with tensor names and .npy headers: 0.27 here)
        assert row["bytes_up"] / fp32["bytes_up"] < 0.3
        assert row["bytes_down"] / fp32["bytes_down"] < 0.3
    assert rows[-1]["loss_global"] < rows[-1]["loss_base"]
    assert rows[-1]["loss_global"] == pytest.approx(plain[-1]["loss_global"], rel=0.02)


def test_global_adapter_loads_with_peft_and_holds_the_trained_tensors(dual_run):
    cfg = tiny_config("personalization=dual")
    space = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=cfg.seed)
    tensors = load_file(str(dual_run / "global_adapter" / "adapter_model.safetensors"))
    assert tensors and not any("personal" in k for k in tensors)
    base = load_base_model(cfg.model, space.tokenizer, cfg.seed)
    model = PeftModel.from_pretrained(base, str(dual_run / "global_adapter"))
    loaded = {k: p for k, p in model.named_parameters() if "lora_B" in k}
    assert loaded and any(float(p.abs().sum()) > 0 for p in loaded.values())  # B moved off 0


def test_outputs_and_device_storage_are_apart(dual_run):
    assert (dual_run / "plots" / "loss_per_round.png").stat().st_size > 0
    assert (dual_run / "plots" / "per_client_loss.png").stat().st_size > 0
    phones = sorted(p for p in (dual_run / "devices").iterdir() if p.is_dir())
    assert 2 <= len(phones) <= 4  # every phone that trained keeps its personal part
    assert all((p / "personal_adapter.safetensors").exists() for p in phones)
    server_files = [p for p in dual_run.rglob("*") if "devices" not in p.parts and p.is_file()]
    assert not any("personal" in p.name for p in server_files)


def test_fedsa_personal_beats_global(tmp_path):
    done = _simulate([*SMALL, "personalization=fedsa", "federation.clients_per_round=4",
                      f"hydra.run.dir={tmp_path}"])
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss_personal"] < last["loss_global"]
    assert last["loss_global"] == pytest.approx(last["loss_base"], abs=1e-5)  # B personal, 0 init


def test_invalid_config_stops_before_training(tmp_path):
    """The command itself (every other bad value is checked in process: test_fail_fast.py):
    Hydra's own error for an unknown config group, and ours for a bad value, both before any
    training and without a metrics file."""
    done = _simulate(["model=nonexistent", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert done.returncode != 0 and "model/nonexistent" in done.stderr
    done = _simulate(["lora.r=-1", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["fedmilm: config error: lora.r=-1 is invalid; "
                                                "it must be > 0"]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_runtime_crash_ends_the_command_at_once_with_one_line(tmp_path):
    """Workers that can never start (each phone asks for 64 CPUs): Flower's runtime crashes and
    its ServerApp thread would wait out the round deadline (600 s); we stop in seconds."""
    started = time.monotonic()
    done = _simulate(["model=tiny", "federation.cpus_per_client=64", "federation.rounds=1",
                      f"hydra.run.dir={tmp_path}"], timeout=180)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmilm: run failed: the simulation runtime crashed")
    assert time.monotonic() - started < 120


def test_both_privacy_levels_are_accounted_and_reported(tmp_path):
    done = _simulate([*SMALL, "privacy=both", "privacy.seeded_noise=true", "lora.variant=ffa",
                      "privacy.user.allow_swamped=true", "personalization=dual",
                      "federation.min_replies=1", "privacy.sample.target_epsilon=50",
                      f"hydra.run.dir={tmp_path}"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    user = [r["epsilon_user"] for r in rows]
    assert 0 < user[0] < user[1]  # composed across rounds, never reset
    assert all(r["delta"] == 1e-5 and r["accountant"] == "prv" for r in rows)
    # under user-level DP, who took part is not released; under DP the per-phone values come
    # from the simulator's diagnostics, labelled as outside the guarantee
    assert all(r["clients"] is None and r["rejected"] is None for r in rows)
    assert all(r["seeded_noise"] and "outside the DP guarantee" in r["diagnostics"]
               for r in rows)
    assert "SEEDED DP NOISE" in done.stdout + done.stderr
    assert rows[-1]["epsilon_sample_max"] > 0
    ledgers = list((tmp_path / "devices").glob("*/privacy_ledger.json"))
    assert ledgers and (tmp_path / "plots" / "epsilon_per_round.png").stat().st_size > 0
    assert not any("ledger" in p.name for p in tmp_path.iterdir())  # ledgers stay on phones
    # The server's accountant history is an output: epsilon can be recomputed from it.
    from fedmilm.privacy import Accountant

    state = json.loads((tmp_path / "privacy_accountant.json").read_text())
    assert state["delta"] == 1e-5 and sum(n for _, _, n in state["history"]) == 2
    again = Accountant(state["mechanism"])
    again.load_state_dict({k: v for k, v in state.items() if k != "delta"})
    assert again.epsilon(1e-5) == pytest.approx(user[-1])


def test_a_stop_at_the_user_level_budget_is_a_success(tmp_path):
    """The run stops before the round that would exceed its target, writes every output, says
    why, and exits 0."""
    from fedmilm.privacy import Accountant

    rate = 2 / 4  # clients_per_round / num_clients in SMALL
    after = []
    accountant = Accountant("prv")
    for _ in range(2):
        accountant.step(noise_multiplier=1.0, sample_rate=rate)
        after.append(accountant.epsilon(1e-3))
    target = (after[0] + after[1]) / 2  # room for one round, not two
    done = _simulate([*SMALL, "privacy=user", "privacy.user.allow_swamped=true",
                      "privacy.user.noise_multiplier=1.0",
                      f"privacy.user.target_epsilon={target}", "privacy.delta=1e-3",
                      f"hydra.run.dir={tmp_path}"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["epsilon_user"] <= target
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and "target_epsilon" in summary[
        "stopped_early_because"]
    assert "stopped after round 1 of 2" in done.stdout + done.stderr
    assert (tmp_path / "global_adapter" / "adapter_model.safetensors").exists()


def test_dp_ftrl_run_enforces_separation_adapts_its_clip_per_tree_and_accounts(tmp_path):
    """DP-FTRL with adaptive clipping and server momentum, end to end: no phone trains twice
    within min_separation rounds (read from what the virtual phones left on disk), the clip
    changes only when a tree starts, and epsilon is the tree accountant's."""
    from fedmilm.privacy.tree import TreeAccountant

    done = _simulate(["model=tiny", "personalization=none", "privacy=user",
                      "privacy.user.mechanism=ftrl", "privacy.user.adaptive_clip=true",
                      "privacy.user.allow_swamped=true", "privacy.user.noise_multiplier=0.05",
                      "privacy.user.clip_count_noise=1.0", "aggregation.server_optimizer=momentum",
                      "aggregation.server_lr=0.5", "federation.num_clients=6",
                      "federation.clients_per_round=2", "federation.rounds=7",
                      "privacy.delta=1e-3", "train.lr=0.02", f"hydra.run.dir={tmp_path}"])
    assert done.returncode == 0, done.stderr[-3000:]
    trained: dict[int, list[int]] = {}
    for server_round in range(1, 8):
        folder = tmp_path / "diagnostics" / f"round_{server_round:04d}" / "train"
        for device in sorted(int(p.stem) for p in folder.glob("*.json")):
            trained.setdefault(device, []).append(server_round)
    assert sum(map(len, trained.values())) == 14  # two phones each round
    for rounds in trained.values():
        assert all(b - a >= 3 for a, b in zip(rounds, rounds[1:], strict=False)), trained
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clips = [r["clip_norm"] for r in rows]
    assert clips[0] == clips[1] == clips[2] != clips[3] == clips[4] == clips[5] != clips[6]
    accountant = TreeAccountant(0.05, 3, None)
    accountant.step(7)
    assert rows[-1]["epsilon_user"] == pytest.approx(accountant.epsilon(1e-3), rel=1e-9)
    saved = json.loads((tmp_path / "privacy_accountant.json").read_text())
    assert saved["mechanism"] == "tree" and saved["rounds"] == 7
    ckpt = tmp_path / "checkpoints" / "round_0007" / "server_optimizer.safetensors"
    assert set(load_file(str(ckpt))) and all(k.startswith("first.") for k in load_file(str(ckpt)))


def test_audit_runs_each_mode_and_writes_its_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "from fedmilm.cli.audit import main; main()", *SMALL,
         "federation.clients_per_round=4", "federation.rounds=1",
         "audit.modes=[none,sample]", "audit.canary_users=2",
         "audit.candidates=31", "audit.mia_per_phone=2", "privacy.sample.target_epsilon=100",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "audit.json").read_text())
    assert list(results) == ["none", "sample"]
    for mode, r in results.items():
        assert len(r["exposure_global"]) == len(r["exposure_personal"]) == 2
        assert all(0 <= x <= 5 for x in r["exposure_global"] + r["exposure_personal"])
        assert 0 <= r["auc_global"] <= 1 and r["canary_phone_trained"] == [True, True]
        assert (tmp_path / mode / "metrics.jsonl").exists()
    assert results["none"]["epsilon_sample_max"] is None
    assert results["sample"]["epsilon_sample_max"] > 0
    assert "| sample |" in (tmp_path / "audit.md").read_text()
    assert (tmp_path / "plots" / "audit.png").stat().st_size > 0


def test_multirun_sweep_gives_one_run_directory_per_job(tmp_path):
    done = _simulate(["-m", "model=tiny", "federation.num_clients=2",
                      "federation.clients_per_round=2", "federation.rounds=1", "lora.r=2,4",
                      f"hydra.sweep.dir={tmp_path}"])
    assert done.returncode == 0, done.stderr[-3000:]
    for job, rank in ((0, 2), (1, 4)):
        adapter = json.loads((tmp_path / str(job) / "global_adapter" /
                              "adapter_config.json").read_text())
        assert adapter["r"] == rank
        assert (tmp_path / str(job) / "metrics.jsonl").read_text().count("\n") == 1


def test_mixed_rank_federation_reports_utility_per_tier(tmp_path):
    run_dir = tmp_path / "run"
    done = _simulate([*SMALL, "personalization=dual", "lora.r=8",
                      "lora.rank_by_tier={low:4,high:8}", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 2 for r in rows)
    by_rank = rows[-1]["loss_by_rank"]
    assert set(by_rank) == {"4", "8"} and all(t["phones"] == 2 for t in by_rank.values())
    last = read_per_phone(run_dir / PER_PHONE_FILE)[2]
    assert {c["device"]: c["rank"] for c in last} == {0: 4, 1: 8, 2: 4, 3: 8}
    assert rows[-1]["loss_global"] < rows[-1]["loss_base"]
    tensors = load_file(str(run_dir / "global_adapter" / "adapter_model.safetensors"))
    assert all(t.shape[0] == 8 for k, t in tensors.items() if "lora_A" in k)  # server keeps r=8


def test_executorch_phones_train_only_through_exported_programs_and_learn(tmp_path):
    """`fedmilm-export` makes the bundle; every phone of the federation then trains through it.
    (The DP-SGD program is checked against Opacus in tests/fedmilm/export: same CI minutes.)"""
    bundle, run_dir = tmp_path / "bundle", tmp_path / "run"
    same = [*SMALL, "client.runtime=executorch"]
    exported = subprocess.run(
        [sys.executable, "-c", "from fedmilm.cli.export import main; main()", *same,
         f"client.export_dir={bundle}", f"hydra.run.dir={tmp_path / 'export-run'}"],
        capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert {p.name for p in bundle.iterdir()} == {"train.pte", "eval.pte", "adamw.pte",
                                                   "base.ptd", "adapter.ptd", "manifest.json",
                                                   "tokenizer"}
    done = _simulate([*same, f"client.export_dir={bundle}",
                      f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exporting the ExecuTorch" not in done.stderr  # the given bundle was used
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [2, 2]
    assert rows[-1]["loss_global"] < rows[-1]["loss_base"]
    assert rows[-1]["loss_global"] < rows[0]["loss_global"]  # and keeps learning
    from fedmilm.export.manifest import Manifest
    from fedmilm.export.ptd import ptd_to_adapter

    served = ptd_to_adapter(Manifest.read(bundle), (run_dir / "global_adapter.ptd").read_bytes())
    saved = load_file(str(run_dir / "global_adapter" / "adapter_model.safetensors"))
    assert len(saved) == len([k for k in served if ".global." in k])
    for key, value in saved.items():  # PEFT's saved names drop the adapter name
        match = [v for k, v in served.items() if k.replace(".global", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value)
