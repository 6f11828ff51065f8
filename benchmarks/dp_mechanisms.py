"""DP-FedAvg (Poisson) against DP-FTRL (tree) at the same epsilon: where does each win?

Pure accounting, no training: for a population N, a cohort m and a number of rounds T, the
noise multiplier each mechanism needs for epsilon = 8 at delta = 1 / N^1.1, and the noise std
per coordinate left in the model after round T (over the clip; `UserLevelPlan.
model_noise_over_clip`). DP-FedAvg adds a fresh draw every round (sqrt(T) of them, but a small
sigma thanks to amplification by sampling); DP-FTRL needs no sampling and a phone trains at
most once per N // m rounds, its noise piling up only over tree nodes.

    python benchmarks/dp_mechanisms.py [--population N] [--coordinates D]
"""

from __future__ import annotations

import argparse
import warnings

from _common import write_section

from fedmilm.privacy.plan import plan_user_level

EPSILON = 8.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=1_000_000)
    parser.add_argument("--coordinates", type=int, default=460_800,
                        help="global adapter size (default: the default model's)")
    args = parser.parse_args()
    n, d = args.population, args.coordinates
    delta = n ** -1.1
    rows = ["| cohort m | rounds T | DP-FedAvg sigma | DP-FTRL sigma | model noise / C, DP-FedAvg "
            "| model noise / C, DP-FTRL | less noise |", "|---|---|---|---|---|---|---|"]
    for cohort in (1_000, 10_000):
        for rounds in (100, 1_000, 2_000):
            plans = {}
            for mechanism in ("poisson", "ftrl"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plans[mechanism] = plan_user_level(
                        population=n, cohort=cohort, rounds=rounds, delta=delta, coordinates=d,
                        accountant="prv", target_epsilon=EPSILON, mechanism=mechanism)
            fedavg, ftrl = plans["poisson"], plans["ftrl"]
            better = "ftrl" if ftrl.model_noise_over_clip < fedavg.model_noise_over_clip else \
                "poisson"
            rows.append(f"| {cohort:,} | {rounds:,} | {fedavg.noise_multiplier:.3g} | "
                        f"{ftrl.noise_multiplier:.3g} | {fedavg.model_noise_over_clip:.3g} | "
                        f"{ftrl.model_noise_over_clip:.3g} | {better} |")
    body = "\n".join(rows)
    write_section("dp-mechanisms", f"## User-level mechanisms at the same epsilon\n\n"
                  f"`python benchmarks/dp_mechanisms.py --population {n} --coordinates {d}`  \n"
                  f"Accounting only (no training): N = {n:,} phones, epsilon {EPSILON:g} at "
                  f"delta = 1/N^1.1, d = {d:,} global coordinates; DP-FTRL with separation "
                  f"N // m. Model noise / C = std per coordinate of all noise in the model after "
                  f"round T, over the clip.\n\n{body}")
    print(body)


if __name__ == "__main__":
    main()
