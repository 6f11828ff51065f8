"""Utility of user-level DP: held-out loss of the global adapter against the noise per
coordinate, per mechanism, then the cohort at which epsilon <= 8 keeps half of the non-DP gain.

What decides utility is the noise in the released mean: each coordinate gets std z C with
z = sigma / m (sigma the noise multiplier, m the cohort, C the clip). A 2-core CPU trains a
few phones per round of the default model, so each run uses a small real cohort (`--cohort`,
5 of 20 phones) with sigma = z m, for a grid of z, and for each mechanism (DP-FedAvg with
Poisson cohorts, DP-FTRL) and variant (standard LoRA, FFA-LoRA, adaptive clipping). Against
the base model and a run without DP, the largest z that keeps at least half of the non-DP
improvement is then turned into a cohort: the smallest m whose calibrated sigma(m) for
epsilon <= 8 at delta = 1 / N^1.1 gives sigma(m) / m <= z, for populations N the machine
cannot run. That last step is an extrapolation (one mean update from m phones has less
sampling noise than from 5, so it leans conservative), and the report says so.

    python benchmarks/dp_utility.py [--z 0.0004 0.0015 0.006] [--only poisson ftrl ...]
                                    [--name NAME] [--fresh] [hydra overrides...]

Results accumulate in benchmarks/results/NAME.json (a rerun skips finished runs unless
`--fresh`), the plot goes to benchmarks/results/NAME.png, the tables to BENCHMARKS.md's
section NAME (default name: dp-utility).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from _common import ROOT, config, last_round, machine, write_section

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

from fedmilm.privacy.plan import plan_user_level, smallest_useful_cohort  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASE = ["personalization=none"]  # the global adapter carries everything learnt
VARIANTS = {  # name -> (mechanism, extra overrides)
    "poisson": ("poisson", []),
    "ftrl": ("ftrl", []),
    "poisson-ffa": ("poisson", ["lora.variant=ffa"]),
    "ftrl-ffa": ("ftrl", ["lora.variant=ffa"]),
    "poisson-adaptive": ("poisson", ["privacy.user.adaptive_clip=true"]),
    # half the noise variance from the phones' Skellam shares under SecAgg+, half from the tree
    "ftrl-distributed": ("ftrl", ["aggregation.secure=true", "aggregation.secagg_shares=3",
                                  "aggregation.secagg_threshold=2", "federation.min_replies=3"]),
}
TARGET_EPSILON = 8.0
POPULATIONS = (10_000, 100_000, 1_000_000, 10_000_000)


def runs(grid: list[float], cohort: int, only: list[str]) -> dict[str, list[str]]:
    """Run key -> overrides: no DP, then each variant at each z (z = 0: clipping only)."""
    plan = {"none": ["privacy=none"]}
    for name in only:
        mechanism, extra = VARIANTS[name]
        for z in (0.0, *grid):
            sigma = max(z * cohort, 1e-9)  # z = 0: clipped, equal weights, no noise to speak of
            if name.endswith("-distributed"):  # the same fresh noise per round, split in two
                sigma /= math.sqrt(2)
                extra = [*extra, f"privacy.user.distributed_noise={sigma:.6g}"]
            plan[f"{name}@{z:g}"] = ["privacy=user", f"privacy.user.mechanism={mechanism}",
                                     f"privacy.user.noise_multiplier={sigma:.6g}",
                                     "privacy.user.target_epsilon=null",
                                     "privacy.user.allow_swamped=true", *extra]
    return plan


def cohort_for(z: float, *, population: int, rounds: int, coordinates: int,
               mechanism: str) -> int | None:
    """The smallest cohort with sigma(m) / m <= z at epsilon <= 8, delta = 1 / N^1.1."""
    delta = population ** -1.1
    plan = plan_user_level(population=population, cohort=1, rounds=rounds, delta=delta,
                           coordinates=coordinates, accountant="prv", noise_multiplier=1.0,
                           mechanism=mechanism)
    return smallest_useful_cohort(plan, target_epsilon=TARGET_EPSILON, accountant="prv",
                                  max_ratio=z * math.sqrt(coordinates))


def coordinates_of(overrides: list[str]) -> int:
    from fedmilm.server.federation import run_space

    return run_space(config([*BASE, *overrides])).global_coordinates


def report(results: dict, grid: list[float], only: list[str], overrides: list[str]) -> str:
    base, nodp = results["none"]["loss_base"], results["none"]["loss_global"]
    gain = base - nodp
    cfg = config([*BASE, *overrides])
    fed = cfg.federation
    lines = [f"Default model, {fed.num_clients} phones, {fed.clients_per_round} per round, "
             f"{fed.rounds} rounds, clip C = {cfg.privacy.user.clip_norm:g}, personalization=none; "
             "held-out loss of the global adapter (all phones), "
             f"base {base:.3f}, no DP {nodp:.3f}. z = noise std per coordinate of the released "
             f"mean over C (sigma / m). Kept = share of the non-DP improvement kept.", "",
             "| run | " + " | ".join(f"z = {z:g}" for z in (0.0, *grid)) + " |",
             "|---|" + "---|" * (len(grid) + 1)]
    half: dict[str, float | None] = {}
    for name in only:
        cells, best = [], None
        for z in (0.0, *grid):
            row = results.get(f"{name}@{z:g}")
            if row is None:
                cells.append("-")
                continue
            kept = (base - row["loss_global"]) / gain if gain > 0 else float("nan")
            cells.append(f"{row['loss_global']:.3f} ({kept:.0%})")
            if kept >= 0.5 and z > 0:
                best = z
        half[name] = best
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Extrapolation (not measured): the smallest cohort whose noise per coordinate "
              f"is at most the largest z that kept >= 50%, at epsilon <= {TARGET_EPSILON:g} and "
              f"delta = 1/N^1.1 over the same {cfg.federation.rounds} rounds "
              "(DP-FTRL: separation N // m).", "",
              "| run | z kept >= 50% | " + " | ".join(f"N = {n:,}" for n in POPULATIONS) + " |",
              "|---|---|" + "---|" * len(POPULATIONS)]
    for name in only:
        z = half[name]
        mechanism, extra = VARIANTS[name]
        if z is None:
            lines.append(f"| {name} | none measured | " + " | ".join("-" for _ in POPULATIONS)
                         + " |")
            continue
        d = coordinates_of([*overrides, *extra])
        cohorts = [cohort_for(z, population=n, rounds=cfg.federation.rounds, coordinates=d,
                              mechanism=mechanism) for n in POPULATIONS]
        cells = ["none" if m is None else f"{m:,} ({100 * m / n:.2g}%)"
                 for m, n in zip(cohorts, POPULATIONS, strict=True)]
        lines.append(f"| {name} | {z:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, grid: list[float], only: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, nodp = results["none"]["loss_base"], results["none"]["loss_global"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    floor = grid[0] / 4  # z = 0 drawn at the left edge of the log axis
    for name in only:
        points = [(z or floor, results[f"{name}@{z:g}"]["loss_global"]) for z in (0.0, *grid)
                  if f"{name}@{z:g}" in results]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.axhline(base, color="grey", linestyle=":", label="base model")
    ax.axhline(nodp, color="black", linestyle="--", label="no DP")
    ax.axhline((base + nodp) / 2, color="red", linestyle="-.", label="half the no-DP gain")
    ax.set_xscale("log")
    ax.set_xlabel("noise std per coordinate of the released mean / clip (sigma / m); "
                  "left edge: clip only")
    ax.set_ylabel("held-out loss, global adapter")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=float, nargs="+", default=[0.0004, 0.0015, 0.006])
    parser.add_argument("--cohort", type=int, default=None,
                        help="phones per round (default: the config's)")
    parser.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--name", default="dp-utility", help="results file and report section")
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs too")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: plot and report what the results file holds")
    args, overrides = parser.parse_known_args()
    cohort = args.cohort or config(overrides).federation.clients_per_round
    overrides = [*overrides, f"federation.clients_per_round={cohort}"]
    store = RESULTS / f"{args.name}.json"
    results = {} if args.fresh or not store.exists() else json.loads(store.read_text())
    plan = runs(args.z, cohort, args.only)
    for i, (key, extra) in enumerate(plan.items(), 1):
        if key in results or args.report_only:
            continue
        print(f"[{i}/{len(plan)}] {key} ...", flush=True)
        results[key] = last_round([*BASE, *overrides, *extra])
        print(f"    loss_global {results[key]['loss_global']:.3f} "
              f"({results[key]['wall_s']:.0f} s)", flush=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=1))
    plot(results, args.z, args.only, RESULTS / f"{args.name}.png")
    body = report(results, args.z, args.only, overrides)
    command = " ".join(["python benchmarks/dp_utility.py", *sys.argv[1:]])
    write_section(args.name, f"## User-level DP: utility against noise ({args.name})\n\n"
                  f"`{command}`  \n{machine()}. Plot: `benchmarks/results/{args.name}.png`."
                  f"\n\n{body}")
    print(body)


if __name__ == "__main__":
    main()
