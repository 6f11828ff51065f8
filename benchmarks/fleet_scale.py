"""Fleet scale: seconds per client update and the server's peak memory as the cohort grows.

Each cohort runs as its own `fedmilm-simulate` process over the same population (10,000
phones by default), one round, one local step per phone (`train.epochs=1`, a whole phone's
data in one batch), a fixed small evaluation (`federation.clients_per_eval`), so what changes
between the runs is only how many phones train. Seconds per update = the round's training
phase (`seconds_train` in metrics.jsonl: first message out to last reply folded in) / phones
aggregated. Server peak RSS = the high-water mark of the `fedmilm-simulate` process (the
ServerApp, Flower's engine and the Ray driver; the Ray workers are the phones, not counted).
Writes the table into BENCHMARKS.md.

    python benchmarks/fleet_scale.py [--phones N] [--cohorts 10 100 1000] [--name NAME]
                                     [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import machine, write_section

SIMULATE = [sys.executable, "-c", "from fedmilm.cli.simulate import main; main()"]


def _peak_rss_mib(pid: int, stop: threading.Event, out: list[float]) -> None:
    """Poll /proc for the process's own high-water mark (VmHWM) until it exits."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.2)


def run_cohort(phones: int, cohort: int, evaluate: int, overrides: list[str]) -> dict:
    """One federation; its round record plus wall time, startup time and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="fedmilm-fleet-") as tmp:
        run_dir = Path(tmp) / "run"
        args = [f"federation.num_clients={phones}", f"federation.clients_per_round={cohort}",
                f"federation.clients_per_eval={evaluate}", "federation.rounds=1",
                "train.epochs=1", "train.batch_size=16", "federation.round_timeout_s=3600",
                "federation.min_replies=1", *overrides, f"hydra.run.dir={run_dir}"]
        started = time.perf_counter()
        process = subprocess.Popen([*SIMULATE, *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        stop, peaks = threading.Event(), []
        watcher = threading.Thread(target=_peak_rss_mib, args=(process.pid, stop, peaks))
        watcher.start()
        output, _ = process.communicate()
        stop.set()
        watcher.join()
        wall = time.perf_counter() - started
        if process.returncode != 0:
            raise SystemExit(f"cohort {cohort} failed:\n{output[-3000:]}")
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"cohort": cohort, "updates": record["clients"], "train_s": record["seconds_train"],
            "round_s": record["seconds"], "wall_s": wall, "startup_s": wall - record["seconds"],
            "rss_mib": max(peaks) if peaks else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--cohorts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--evaluate", type=int, default=10, help="phones evaluated per round")
    parser.add_argument("--name", default="fleet-tiny", help="BENCHMARKS.md section name")
    args, overrides = parser.parse_known_args()
    overrides = overrides or ["model=tiny"]
    rows = []
    for cohort in args.cohorts:
        row = run_cohort(args.phones, cohort, args.evaluate, overrides)
        row["per_update_s"] = row["train_s"] / row["updates"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    first = rows[0]
    lines = [
        f"## Fleet scale: {' '.join(overrides)}, {args.phones} phones",
        "",
        f"Command: `python benchmarks/fleet_scale.py --phones {args.phones} --cohorts "
        f"{' '.join(map(str, args.cohorts))} --evaluate {args.evaluate} --name {args.name} "
        f"{' '.join(overrides)}`",
        f"Machine: {machine()}. {args.phones} virtual phones, one round, one local step per "
        f"phone, {args.evaluate} phones evaluated.",
        "",
        "| cohort | updates | training phase s | s / update | vs first | round s | "
        "start-up s | server peak RSS MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['cohort']} | {row['updates']} | {row['train_s']:.1f} | "
                     f"{row['per_update_s']:.3f} | "
                     f"{row['per_update_s'] / first['per_update_s']:.2f}x | "
                     f"{row['round_s']:.1f} | {row['startup_s']:.1f} | {row['rss_mib']:.0f} |")
    write_section(args.name, "\n".join(lines))


if __name__ == "__main__":
    main()
