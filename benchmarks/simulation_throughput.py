"""Simulation throughput: client updates per minute, three ways, side by side in one run.

  (a) ideal  - the same local training and evaluation back to back in one plain Python process,
               no Flower, base model loaded once;
  (b) reload - the FlowerTune pattern: the base model is loaded (and LoRA-wrapped) again for every
               client in every round;
  (sim)      - `fedmilm-simulate` itself: Flower's simulation engine on Ray, in a fresh process.

All three run the same rounds, cohorts and per-phone work (`fedmilm.training.phone`), with the
configuration given as Hydra overrides. Writes the result into BENCHMARKS.md.

    python benchmarks/simulation_throughput.py [--repeats N] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

from _common import config, machine, median, write_section  # noqa: E402

from fedmilm.adapters import AdapterSpace, build_adapter_space, cached_adapter_space  # noqa: E402
from fedmilm.aggregation import apply_update, weighted_mean  # noqa: E402
from fedmilm.config import FedMilmConfig  # noqa: E402
from fedmilm.config.schema import ModelConfig  # noqa: E402
from fedmilm.data import encode_all, load_user  # noqa: E402
from fedmilm.training import evaluate_phone, train_phone  # noqa: E402
from fedmilm.training.device import base_dtype, resolve_device  # noqa: E402
from fedmilm.training.runtimes import EagerRuntime  # noqa: E402


def no_flower(cfg: FedMilmConfig, get_space: Callable[[], AdapterSpace]) -> int:
    """The federation's work without Flower; returns the number of client updates."""
    fed, mode = cfg.federation, cfg.personalization.mode
    users = list(range(fed.num_clients))
    sampler = random.Random(f"fedmilm-sampling:{cfg.seed}")
    space = get_space()
    global_state = space.initial_state(space.global_keys)
    personal: dict[int, dict] = {}
    base_loss: dict[int, float] = {}
    data: dict[int, tuple] = {}
    updates = 0

    def examples(user: int, space: AdapterSpace) -> tuple:
        if user not in data:
            d = load_user(cfg.data, user=user, seed=cfg.seed)
            data[user] = (encode_all(space.tokenizer, d.train, cfg.data.max_length),
                          encode_all(space.tokenizer, d.heldout, cfg.data.max_length))
        return data[user]

    for server_round in range(1, fed.rounds + 1):
        outcomes = []
        for user in sorted(sampler.sample(users, fed.clients_per_round)):
            space = get_space()
            state = personal.get(user, space.initial_state(space.personal_keys))
            outcome = train_phone(EagerRuntime(space), global_state=global_state,
                                  personal_state=state, examples=examples(user, space)[0],
                                  train=cfg.train, seed=server_round * 10_007 + user)
            personal[user] = outcome.personal
            outcomes.append(outcome)
        updates += len(outcomes)
        mean = weighted_mean([o.update for o in outcomes], [o.stats.examples for o in outcomes])
        global_state = apply_update(global_state, mean)
        evaluated = users if fed.clients_per_eval is None else sorted(
            sampler.sample(users, fed.clients_per_eval))
        for user in evaluated:
            space = get_space()
            result = evaluate_phone(
                EagerRuntime(space), global_state=global_state,
                personal_state=personal.get(user, space.initial_state(space.personal_keys)),
                examples=examples(user, space)[1], batch_size=cfg.train.eval_batch_size,
                loss_base=base_loss.get(user))
            base_loss[user] = result.loss_base
    assert mode == space.mode
    return updates


def _on_device(cfg: FedMilmConfig) -> tuple[ModelConfig, str]:
    """The model config and device a virtual phone uses (`train.device`; bf16 base on CUDA),
    so the baselines run where the federation's phones run."""
    device = resolve_device(cfg.train.device)
    return replace(cfg.model, dtype=base_dtype(cfg.model.dtype, device)), device


def run_ideal(cfg: FedMilmConfig) -> tuple[float, int]:
    started = time.perf_counter()
    model, device = _on_device(cfg)
    updates = no_flower(cfg, lambda: cached_adapter_space(
        model, cfg.lora, mode=cfg.personalization.mode, seed=cfg.seed, device=device))
    return time.perf_counter() - started, updates


def run_reload(cfg: FedMilmConfig) -> tuple[float, int]:
    started = time.perf_counter()
    model, device = _on_device(cfg)
    updates = no_flower(cfg, lambda: build_adapter_space(
        model, cfg.lora, mode=cfg.personalization.mode, seed=cfg.seed, device=device))
    return time.perf_counter() - started, updates


def run_simulation(overrides: list[str]) -> tuple[float, int]:
    """`fedmilm-simulate` in a fresh process, timed from launch to exit."""
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from fedmilm.cli.simulate import main; main()",
                        *overrides, f"hydra.run.dir={run_dir}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return seconds, sum(r["clients"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config(args.overrides)
    runners = {"ideal": lambda: run_ideal(cfg),
               "simulation": lambda: run_simulation(args.overrides),
               "reload": lambda: run_reload(cfg)}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for name, run in runners.items():  # interleaved, so drift hits every variant alike
            seconds, updates = run()
            rates[name].append(updates / (seconds / 60))
            print(f"repeat {repeat + 1}: {name:<10} {updates} updates in {seconds:6.1f} s "
                  f"= {rates[name][-1]:.2f} updates/min", flush=True)
    med = {name: median(values) for name, values in rates.items()}
    ratio = {name: med[name] / med["ideal"] for name in med}
    command = "python benchmarks/simulation_throughput.py " + " ".join(
        [f"--repeats {args.repeats}", *args.overrides])
    body = f"""## Simulation throughput (client updates per minute)

Command: `{command.strip()}` (model `{cfg.model.name}`, {cfg.federation.num_clients} phones,
{cfg.federation.clients_per_round} per round, {cfg.federation.rounds} rounds, personalization
`{cfg.personalization.mode}`, every phone evaluated each round). Machine: {machine()}.
Median of {args.repeats} interleaved repeat(s); wall time from start to finish of each variant
(the simulation includes Python start-up, Ray start-up and loading the model in the server too).

| variant | updates/min | ratio to ideal |
|---|---|---|
| (a) ideal: one plain process, no Flower | {med['ideal']:.2f} | 1.00 |
| fedmilm-simulate (Flower simulation engine, Ray) | {med['simulation']:.2f} | \
{ratio['simulation']:.2f} |
| (b) FlowerTune pattern: reload base model per client per round | {med['reload']:.2f} | \
{ratio['reload']:.2f} |
"""
    write_section("simulation-throughput", body)
    print(body)


if __name__ == "__main__":
    main()
