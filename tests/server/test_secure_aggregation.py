"""SecAgg+ (Flower's legacy workflow) inside a real simulated federation: the server's step is
the mean of the phones' updates within quantisation error, also when a phone drops out, and it
combines with user-level DP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fedmilm.adapters import build_adapter_space
from fedmilm.privacy.calibrate import resolve_privacy
from tests.conftest import tiny_config
from tests.server import faulty_phones
from tests.server.test_failures import _global, _rows, _run

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it
SECURE = ["personalization=none", "aggregation.secure=true", "aggregation.secagg_shares=3",
          "aggregation.secagg_threshold=2", "federation.num_clients=4",
          "federation.clients_per_round=4", "federation.min_replies=2", "train.lr=0.05",
          "federation.round_timeout_s=120"]


def test_secure_mean_matches_the_plain_mean_despite_a_dropout(tmp_path, monkeypatch):
    cfg = tiny_config(*SECURE, "federation.rounds=1")
    honest = tmp_path / "honest"
    honest.mkdir()
    monkeypatch.setattr(faulty_phones, "app", faulty_phones.secure_app)
    _run(cfg, tmp_path / "run", {3: "crash"}, honest, monkeypatch)

    [row] = _rows(tmp_path / "run")
    assert row["clients"] == 3 and row["rejected"] == 1 and not row["skipped"]
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    initial = space.initial_state(space.global_keys)
    updates = [load_file(str(honest / f"round1_device{d}.safetensors")) for d in (0, 1, 2)]
    after = _global(tmp_path / "run", 1)
    agg = cfg.aggregation
    step = 2 * agg.secagg_clip_range / agg.secagg_quant_range  # one quantisation level
    moved, quantised = 0.0, 0.0
    for key in space.global_keys:
        plain = sum(u[key] for u in updates) / 3
        torch.testing.assert_close(after[key] - initial[key], plain, rtol=0, atol=2 * step)
        moved = max(moved, float(plain.abs().max()))
        quantised = max(quantised, float((after[key] - initial[key] - plain).abs().max()))
    assert moved > 100 * step  # the updates are far larger than the tolerance
    assert quantised > step / 100  # SecAgg+'s stochastic quantisation really happened


def test_secure_aggregation_combines_with_user_level_dp(tmp_path, monkeypatch):
    cfg = resolve_privacy(tiny_config(
        *SECURE, "federation.rounds=2", "privacy=user", "privacy.seeded_noise=true",
        "privacy.user.noise_multiplier=0.5", "privacy.user.target_epsilon=null",
        "privacy.user.clip_norm=0.05"))
    honest = tmp_path / "honest"
    honest.mkdir()
    monkeypatch.setattr(faulty_phones, "app", faulty_phones.secure_app)
    _run(cfg, tmp_path / "run", {}, honest, monkeypatch)

    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] is None for r in rows)  # not released under user-level DP
    assert 0 < rows[0]["epsilon_user"] < rows[1]["epsilon_user"]
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    agg, values = cfg.aggregation, sum(v.numel() for v in space.initial_state(
        space.global_keys).values())
    room = 2 * agg.secagg_clip_range / agg.secagg_quant_range * values ** 0.5
    assert honest.iterdir()
    for path in honest.iterdir():  # each phone clipped its update before masking, leaving
        update = load_file(str(path))  # room for SecAgg+'s quantisation error
        norm = sum(float(v.pow(2).sum()) for v in update.values()) ** 0.5
        assert norm <= (0.05 - room) * (1 + 1e-4)
    history = json.loads((tmp_path / "run" / "privacy_accountant.json").read_text())
    assert sum(entry[2] for entry in history["history"]) == 2


DISTRIBUTED = [*SECURE, "federation.rounds=1", "privacy=user", "privacy.seeded_noise=true",
               "privacy.user.mechanism=ftrl", "privacy.user.noise_multiplier=1e-6",
               "privacy.user.target_epsilon=null", "privacy.user.clip_norm=0.05",
               "privacy.user.distributed_noise=1e-3", "privacy.user.allow_swamped=true"]


def _distributed_round(tmp_path, monkeypatch, min_replies: int):
    """One DP-FTRL round with phones' noise, phone 3 crashing inside SecAgg+: (config, the
    server's global step x the expected cohort, the shares of the three that arrived)."""
    cfg = resolve_privacy(tiny_config(*DISTRIBUTED, f"federation.min_replies={min_replies}"))
    honest = tmp_path / "honest"
    honest.mkdir()
    monkeypatch.setattr(faulty_phones, "app", faulty_phones.secure_app)
    _run(cfg, tmp_path / "run", {3: "crash"}, honest, monkeypatch)
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    initial = space.initial_state(space.global_keys)
    after = _global(tmp_path / "run", 1)
    step = {k: (after[k] - initial[k]).double() * 4 for k in space.global_keys}
    shares = [load_file(str(honest / f"round1_device{d}.safetensors")) for d in (0, 1, 2)]
    return cfg, step, shares


def test_phones_noise_reaches_the_server_only_inside_the_sum_and_exactly(tmp_path,
                                                                          monkeypatch):
    cfg, step, shares = _distributed_round(tmp_path, monkeypatch, min_replies=3)
    grid = 2 * cfg.aggregation.secagg_clip_range / cfg.aggregation.secagg_quant_range
    moved = residual = 0.0
    for key, value in step.items():
        summed = sum(s[key].double() for s in shares)
        index = shares[0][key].double() / grid
        assert torch.equal(index, index.round())  # each phone's share lies on SecAgg+'s grid
        moved = max(moved, float(summed.abs().max()))
        residual = max(residual, float((value - summed).abs().max()))
    assert moved > 100 * grid
    assert residual < grid / 4  # SecAgg+ summed the shares exactly (no stochastic rounding)
    [row] = _rows(tmp_path / "run")
    assert row["clients"] is None and math.isfinite(row["epsilon_server"])
    assert row["epsilon_user"] <= row["epsilon_server"]


def test_the_server_does_not_unmask_fewer_shares_than_it_charged(tmp_path, monkeypatch):
    _, step, shares = _distributed_round(tmp_path, monkeypatch, min_replies=4)
    for key, value in step.items():  # only the server's own (tiny) noise moved the adapter
        assert float(value.abs().max()) < 1e-5 < float(shares[0][key].abs().max())
