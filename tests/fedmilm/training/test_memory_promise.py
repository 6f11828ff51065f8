"""The memory budget is a promise: a phone's measured step peak stays within the plan it chose.

Each case runs in a fresh process (peak RSS is per process) that plans the way a phone does
(`plan_for` with `resident_bytes()` measured after the model is loaded), with a budget that just
admits micro-batch 1, then trains two steps and reports its peak RSS. The process first takes a
few hundred MiB of ballast, standing in for a phone whose runtime holds more than the planner's
constant assumes; the model has one very wide MLP, so a quantized layer's dequantized copies
weigh more than its activations. Linux only (/proc).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BALLAST_MIB = 384
WIDE = ("model=tiny", "model.dtype=bfloat16", "model.architecture.hidden_size=256",
        "model.architecture.intermediate_size=24576", "data.max_length=32",
        "train.batch_size=2", "client.gradient_checkpointing=auto")


def child(overrides: list[str], dp: bool) -> None:
    """In a fresh process: ballast, model, the phone's plan, two training steps; one JSON line."""
    import numpy as np
    import torch

    from fedmilm.adapters import build_adapter_space
    from fedmilm.config import load_config
    from fedmilm.data import IGNORE
    from fedmilm.data.chat import Example
    from fedmilm.privacy.randomness import private_random
    from fedmilm.training import DpNoise, train_local
    from fedmilm.training.memory import (
        MIB,
        estimate_peak_bytes,
        gradient_checkpointing,
        peak_bytes,
        plan_for,
        reset_peak,
        resident_bytes,
    )
    from tests.conftest import compose_config

    ballast = np.ones(BALLAST_MIB * 2**20, dtype=np.uint8)  # touched: resident
    cfg = load_config(compose_config(overrides))
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    model, seq = space.model, cfg.data.max_length
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(4):
        ids = torch.randint(0, len(space.tokenizer), (seq,), generator=gen).tolist()
        examples.append(Example(ids, [IGNORE] * (seq // 2) + ids[seq // 2:]))
    resident = resident_bytes()
    budget = estimate_peak_bytes(model, micro_batch=1, seq_len=seq, checkpointing=True, dp=dp,
                                 resident=resident)
    client = dataclasses.replace(cfg.client, memory_budget_mb=budget / MIB)
    plan = plan_for(dataclasses.replace(cfg, client=client), model, resident=resident)
    reset_peak()
    with gradient_checkpointing(model, plan.checkpointing):
        for step in range(2):
            noise = DpNoise(1.0, 1.0, private_random()) if dp else None
            train_local(model, space.trainable_parameters(), examples[2 * step:2 * step + 2],
                        epochs=1, batch_size=2, lr=1e-4, weight_decay=0.0,
                        pad_id=space.tokenizer.pad_token_id, seed=step, dp=noise,
                        micro_batch=plan.micro_batch)
    print(json.dumps({"peak": peak_bytes(), "budget": budget, "micro": plan.micro_batch,
                      "checkpointing": plan.checkpointing, "ballast": int(ballast[-1])}))


@pytest.mark.memory
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("quantization", "dp"), [("int8", True), ("nf4", True), ("nf4", False)])
def test_a_phones_step_stays_within_the_budget_its_plan_chose(quantization, dp):
    overrides = [*WIDE, f"model.quantization={quantization}"]
    code = (f"from tests.fedmilm.training.test_memory_promise import child; "
            f"child({overrides!r}, {dp})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["micro"] == 1 and result["checkpointing"]  # the budget admitted only that
    assert result["peak"] <= result["budget"], (
        f"step peak {result['peak'] / 2**20:.0f} MiB exceeds the plan's budget "
        f"{result['budget'] / 2**20:.0f} MiB")
