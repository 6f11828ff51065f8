"""A deployed round next to a simulated one: same config, same machine, one run.

  (sim)    `fedmilm-simulate`: Flower's simulation engine on Ray, base model cached per worker;
  (deploy) `fedmilm-deploy`: real flower-superlink + flower-supernode processes with TLS and
           SuperNode authentication; Flower starts a fresh ClientApp process per message.

Reports the median wall time per round (training + evaluation of every phone) and the bytes per
client per round, up (the update) and down (the global part), from each run's metrics.jsonl.

    python benchmarks/deployed_round.py [hydra overrides...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

from _common import machine, median, write_section  # noqa: E402

DEFAULTS = ["federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=3",
            "federation.min_replies=2"]
COMMANDS = {"sim": "from fedmilm.cli.simulate import main; main()",
            "deploy": "from fedmilm.cli.deploy import main; main()"}


def run(kind: str, overrides: list[str], run_dir: Path) -> tuple[float, list[dict]]:
    """Wall seconds of the whole command, and its per-round records."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", COMMANDS[kind], *overrides,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return wall, rows


def _row(label: str, r: dict) -> str:
    return (f"| {label} | {r['round_s']:.1f} | {r['wall']:.0f} | {r['up']:,.0f} | "
            f"{r['down']:,.0f} | {r['loss']:.3f} |")


def main() -> None:
    overrides = [*DEFAULTS, *sys.argv[1:]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sim", "deploy"):
            wall, rows = run(kind, overrides, Path(tmp) / kind)
            per_client = [r for r in rows if r["clients"]]
            results[kind] = {
                "wall": wall,
                "round_s": median([r["seconds"] for r in rows]),
                "up": median([r["bytes_up"] / r["clients"] for r in per_client]),
                "down": median([r["bytes_down"] / r["sampled"] for r in rows]),
                "loss": rows[-1]["loss_global"],
            }
            print(kind, results[kind], flush=True)
    sim, dep = results["sim"], results["deploy"]
    body = f"""## Deployed round vs simulated round

`python benchmarks/deployed_round.py {' '.join(sys.argv[1:])}`
(config: {' '.join(overrides)}; {machine()}). One run each, back to back on this machine.
Round time = training of the sampled phones + evaluation of every phone, median over rounds.

| engine | s per round (median) | whole command (s) | bytes up per client \
| bytes down per client | held-out loss global, last round |
|---|---|---|---|---|---|
{_row("simulation (Ray, model cached per worker)", sim)}
{_row("deployment (SuperLink + SuperNodes, TLS + auth)", dep)}

Deployment/simulation time per round: {dep['round_s'] / sim['round_s']:.2f}x. The deployment
engine starts a new ClientApp process (Python, torch, model load) for every train and evaluate
message, which dominates at this model size; the payloads are identical (the float32 global
LoRA tensors down, their update up).
"""
    write_section("deployed-round", body)


if __name__ == "__main__":
    main()
