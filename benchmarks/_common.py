"""Helpers shared by the benchmark scripts: config composition and BENCHMARKS.md sections."""

from __future__ import annotations

import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from fedmilm.config import FedMilmConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "BENCHMARKS.md"
SIMULATE = [sys.executable, "-c", "from fedmilm.cli.simulate import main; main()"]


def config(overrides: list[str]) -> FedMilmConfig:
    """The config `fedmilm-simulate` would run with these overrides."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return load_config(compose(config_name="config", overrides=overrides))


def machine() -> str:
    """One line describing where the numbers came from."""
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, Python {platform.python_version()}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name -->` markers in BENCHMARKS.md."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    REPORT.write_text(text)


def last_round(overrides: list[str]) -> dict:
    """Run one `fedmilm-simulate` federation in a temporary folder; its last round's record
    (plus `wall_s`)."""
    with tempfile.TemporaryDirectory(prefix="fedmilm-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        started = time.perf_counter()
        done = subprocess.run([*SIMULATE, *overrides, f"hydra.run.dir={run_dir}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(overrides)}: {done.stderr.strip()[-600:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {**rows[-1], "wall_s": time.perf_counter() - started}


LOSSES = ("loss_base", "loss_global", "loss_personal")


def loss_cells(row: dict, reference: dict, *, is_reference: bool) -> list[str]:
    """A run's last-round held-out losses, each with its change against `reference`'s."""
    cells = []
    for key in LOSSES:
        value, ref = row[key], reference[key]
        change = "" if is_reference or value is None else f" ({value / ref - 1:+.1%})"
        cells.append("-" if value is None else f"{value:.3f}{change}")
    return cells


def run_child(script: str, argv: list[str]) -> dict:
    """Run `script` with `argv` in a fresh process (peak memory is per process) and return the
    JSON object of its last output line; its stderr tail on failure."""
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])
