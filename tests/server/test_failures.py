"""Phones that crash, straggle or send bad updates, inside a real simulated federation.

Each test runs Flower's simulation engine with `faulty_phones.app`: real fedmilm handlers plus
a mod that makes chosen devices misbehave. The server must leave them out, say why with the
node id, and aggregate exactly the honest updates, or skip the round cleanly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from flwr.simulation import run_simulation
from safetensors.torch import load_file

from fedmilm.adapters import build_adapter_space
from fedmilm.config import to_yaml
from fedmilm.privacy.accountant import Accountant
from fedmilm.privacy.calibrate import resolve_privacy
from fedmilm.privacy.policy import write_phone_policy
from fedmilm.server.app import make_server_app
from tests.conftest import private_ray, tiny_config
from tests.server import faulty_phones

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it

ROOT = Path(__file__).resolve().parents[2]


def _run(cfg, run_dir: Path, faults: dict[int, str], honest_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv(faulty_phones.FAULTS_ENV, json.dumps({str(k): v for k, v in
                                                              faults.items()}))
    monkeypatch.setenv(faulty_phones.HONEST_DIR_ENV, str(honest_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                "")]))
    write_phone_policy(cfg.privacy, run_dir / "devices")
    run_simulation(server_app=make_server_app(to_yaml(cfg), str(run_dir)),
                   client_app=faulty_phones.app(str(run_dir / "devices"),
                                                str(run_dir / "diagnostics")),
                   num_supernodes=cfg.federation.num_clients,
                   backend_config=private_ray(1))


def _federate(cfg, tmp_path: Path, faults: dict[int, str], monkeypatch, caplog) -> Path:
    """One simulated federation into `tmp_path/run`, server warnings captured; returns the
    folder where honest phones left their updates."""
    honest = tmp_path / "honest"
    honest.mkdir()
    with caplog.at_level(logging.WARNING, logger="fedmilm.server"):
        _run(cfg, tmp_path / "run", faults, honest, monkeypatch)
    return honest


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _global(run_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"round_{server_round:04d}" /
                         "global.safetensors"))


BAD_UPDATES = {4: "nan", 5: "inf", 6: "missing", 7: "extra", 8: "shape", 9: "dtype",
               10: "norm"}
REASONS = {"nan": "contains NaN or inf", "inf": "contains NaN or inf",
           "missing": "arrays, expected", "extra": "arrays, expected",
           "shape": "shape (", "dtype": "dtype int64", "norm": "exceeds federation.max"}


def test_only_honest_updates_reach_the_global_adapter(tmp_path, monkeypatch, caplog):
    faults = {2: "crash", 3: "straggler", **BAD_UPDATES}
    cfg = tiny_config("personalization=none", "federation.num_clients=11",
                      "federation.clients_per_round=11", "federation.min_replies=2",
                      "federation.rounds=1", "federation.round_timeout_s=30", "train.lr=0.05")
    honest = _federate(cfg, tmp_path, faults, monkeypatch, caplog)

    [row] = _rows(tmp_path / "run")
    assert row["round"] == 1 and row["clients"] == 2 and row["rejected"] == 9
    # one deadline covers training and evaluation: the straggler costs the round 30 s, not 60
    assert row["seconds"] < 45
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "rejected: client error" in log and "simulated phone crash" in log
    assert "1 phone(s) did not reply within federation.round_timeout_s" in log
    for fault, reason in REASONS.items():
        lines = [line for line in log.splitlines() if reason in line]
        assert lines and all("from node " in line for line in lines), fault

    # the new global part is exactly initial + mean of the two honest updates
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    initial = space.initial_state(space.global_keys)
    updates = [load_file(str(honest / f"round1_device{d}.safetensors")) for d in (0, 1)]
    after = _global(tmp_path / "run", 1)
    for key in space.global_keys:
        expected = initial[key] + (updates[0][key] + updates[1][key]) / 2
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-7)
    assert any(float((after[k] - initial[k]).abs().max()) > 0 for k in space.global_keys)


def test_one_phone_cannot_set_the_global_step(tmp_path, monkeypatch, caplog):
    """A phone claiming 10^15 examples weighs like a full honest phone; a phone sending 50x
    an honest update (under the absolute cap) is rejected by the cohort-relative bound."""
    cfg = tiny_config("personalization=none", "federation.num_clients=5",
                      "federation.clients_per_round=5", "federation.min_replies=2",
                      "federation.rounds=1", "train.lr=0.05", "federation.max_update_norm=1e6")
    honest = _federate(cfg, tmp_path, {3: "liar", 4: "long"}, monkeypatch, caplog)
    [row] = _rows(tmp_path / "run")
    assert row["clients"] == 4 and row["rejected"] == 1
    assert "norm_bound_multiple" in caplog.text
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    initial = space.initial_state(space.global_keys)
    updates = [load_file(str(honest / f"round1_device{d}.safetensors")) for d in (0, 1, 2, 3)]
    after = _global(tmp_path / "run", 1)
    for key in space.global_keys:  # every phone holds train_per_user examples: equal weights
        expected = initial[key] + sum(u[key] for u in updates) / 4
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-7)


def test_round_with_too_few_valid_replies_is_skipped(tmp_path, monkeypatch):
    cfg = tiny_config("personalization=none", "federation.num_clients=4",
                      "federation.clients_per_round=4", "federation.min_replies=3",
                      "federation.rounds=1", "federation.round_timeout_s=60")
    honest = tmp_path / "honest"
    honest.mkdir()
    _run(cfg, tmp_path / "run", {2: "crash", 3: "nan"}, honest, monkeypatch)

    [row] = _rows(tmp_path / "run")
    assert row["skipped"] and row["clients"] == 0 and row["rejected"] == 2
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    initial = space.initial_state(space.global_keys)
    after = _global(tmp_path / "run", 1)
    assert all(torch.equal(after[k], initial[k]) for k in space.global_keys)


def test_user_level_dp_releases_no_counts_and_never_skips_on_them(tmp_path, monkeypatch):
    """Two of four phones fail: under user-level DP the round is still released (noisy mean
    with the fixed denominator) and accounted, and neither the contributor count nor the
    rejections appear in the outputs."""
    cfg = resolve_privacy(tiny_config(
        "personalization=none", "privacy=user", "privacy.seeded_noise=true",
        "privacy.user.noise_multiplier=1.0", "privacy.user.target_epsilon=null",
        "federation.num_clients=4", "federation.clients_per_round=4",
        "federation.min_replies=3", "federation.rounds=2", "federation.round_timeout_s=60"))
    honest = tmp_path / "honest"
    honest.mkdir()
    _run(cfg, tmp_path / "run", {2: "crash", 3: "nan"}, honest, monkeypatch)

    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(not r["skipped"] and r["clients"] is None and r["rejected"] is None
               and r["declined"] is None and r["bytes_up"] is None for r in rows)
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    initial = space.initial_state(space.global_keys)
    after = _global(tmp_path / "run", 2)
    assert any(not torch.equal(after[k], initial[k]) for k in space.global_keys)
    reference = Accountant("prv")  # every round charged: q = 4/4 each round
    for _ in rows:
        reference.step(noise_multiplier=1.0, sample_rate=1.0)
    assert rows[-1]["epsilon_user"] == pytest.approx(reference.epsilon(cfg.privacy.delta))
