"""`fedmilm-privacy-plot`: one privacy-utility plot from the run directories of a sweep.

    fedmilm-simulate -m privacy=user privacy.user.noise_multiplier=0.5,1,2,4
    fedmilm-privacy-plot multirun/<date>/<time> [--out tradeoff.png]

Every folder below the given ones that holds a `metrics.jsonl` is one point: the final held-out
loss (global, and personalised when present) against the epsilon the run claims.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmilm.metrics import read_records
from fedmilm.metrics.plots import plot_tradeoff


def collect(folders: list[Path]) -> list[dict]:
    """The last round of every run found under `folders`, with the run's folder."""
    points = []
    for metrics in sorted(m for f in folders for m in f.rglob("metrics.jsonl")):
        records = read_records(metrics)
        if records:
            points.append({**records[-1], "run": str(metrics.parent)})
    return points


def main() -> None:
    """Console entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("privacy_utility.png"))
    args = parser.parse_args()
    points = [p for p in collect(args.folders)
              if p["epsilon_user"] is not None or p["epsilon_sample_max"] is not None]
    if not points:
        sys.exit("fedmilm: no run with a DP epsilon found under " +
                 ", ".join(map(str, args.folders)))
    plot_tradeoff(points, args.out)
    for p in sorted(points, key=lambda p: p["epsilon_user"] or p["epsilon_sample_max"]):
        print(f"eps_user={p['epsilon_user']} eps_sample_max={p['epsilon_sample_max']} "
              f"loss_global={p['loss_global']:.3f} loss_personal={p['loss_personal']} {p['run']}")
    print(f"wrote {args.out}")
