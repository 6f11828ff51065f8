"""`fedmilm-privacy-plan`: what user-level DP will cost a run's adapter, before it runs.

    fedmilm-privacy-plan privacy=user privacy.user.target_epsilon=8 \
        federation.num_clients=10000 federation.clients_per_round=1000

Prints the noise multiplier the accountant needs for the target (or the epsilon a fixed one
gives), the noise std per coordinate relative to the clip norm, the noise-to-signal norm
ratio of a round's step, the noise left in the model after the last round, and the smallest
cohort at which the ratio stays at or below `privacy.user.max_noise_to_signal`. Either
mechanism (`privacy.user.mechanism=poisson|ftrl`); run it once with each to compare them.
"""

from __future__ import annotations

import sys

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedmilm.cli.common import (  # noqa: E402
    CONFIG_DIR,
    load_or_exit,
    planned_distributed,
    user_level_plan,
)
from fedmilm.privacy.plan import UserLevelPlan, smallest_useful_cohort  # noqa: E402
from fedmilm.server.federation import run_space  # noqa: E402


def report(plan: UserLevelPlan, *, clip: float, accountant: str, target: float | None,
           useful: int | None | str, max_ratio: float = 1.0,
           server: tuple[float, int] | None = None) -> list[str]:
    """The planner's lines (pure, so tests read exactly what users read). `server`: with
    distributed noise, (epsilon against the server, the fewest shares it unmasks)."""
    swamped = plan.noise_to_signal > max_ratio
    if plan.mechanism == "ftrl":
        cap = plan.max_participations
        head = ["user-level DP-FTRL, tree aggregation, exact Gaussian (GDP) accounting",
                f"population {plan.population}, cohort {plan.cohort}, {plan.rounds} rounds, "
                f"delta {plan.delta:g}; a phone trains at most once every "
                f"{plan.min_separation} rounds" + ("" if cap is None else f", {cap} times")]
    else:
        head = [f"user-level DP-FedAvg, Poisson sampling, accountant {accountant}",
                f"population {plan.population}, expected cohort {plan.cohort} "
                f"(q = {plan.sample_rate:.4g}), {plan.rounds} rounds, delta {plan.delta:g}"]
    lines = [
        *head,
        f"noise multiplier {plan.noise_multiplier:.4g} -> epsilon {plan.epsilon:.3g} after "
        f"{plan.rounds} rounds" + ("" if target is None
                                   else f" (privacy.user.target_epsilon = {target:g})"),
        f"global adapter part: {plan.coordinates:,} coordinates, clip norm C = {clip:g}",
        f"noise std per coordinate of the released mean: {plan.noise_std_over_clip:.3g} x C",
        f"noise-to-signal norm ratio of a round's step: >= {plan.noise_to_signal:.3g}"
        + (" (the noise swamps the signal)" if swamped else ""),
        f"noise std per coordinate in the model after round {plan.rounds}: "
        f"{plan.model_noise_over_clip:.3g} x C",
    ]
    if server is not None:
        lines.insert(3, f"phones' own noise {plan.distributed_noise:.4g} x C per round under "
                        f"SecAgg+ -> epsilon {server[0]:.3g} against the server itself (at least "
                        f"{server[1]} shares unmasked; readers of the outputs: the smaller one)")
    if isinstance(useful, str):
        lines.append(useful)
    elif useful is None:
        lines.append(f"no cohort up to the whole population ({plan.population}) keeps the ratio "
                     f"<= {max_ratio:g} at this epsilon: more phones, fewer rounds or a larger "
                     "epsilon")
    else:
        lines.append(f"smallest expected cohort with ratio <= {max_ratio:g} at this epsilon: "
                     f"{useful}")
    return lines


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _main(raw: DictConfig) -> None:
    cfg = load_or_exit(raw)
    user = cfg.privacy.user
    if user.noise_multiplier is None and user.target_epsilon is None:
        print("fedmilm: config error: set privacy.user.target_epsilon or "
              "privacy.user.noise_multiplier", file=sys.stderr)
        sys.exit(2)
    coordinates = run_space(cfg).global_coordinates
    plan = user_level_plan(cfg, coordinates)
    planned = planned_distributed(cfg, coordinates)
    server = None if planned is None else (
        planned[0].epsilon(planned[1], cfg.privacy.delta), planned[0].floor)
    useful: int | None | str
    limit = user.max_noise_to_signal
    if plan.noise_to_signal <= limit:
        useful = "the noise does not swamp the signal at this cohort"
    else:
        useful = smallest_useful_cohort(plan, target_epsilon=plan.epsilon,
                                        accountant=cfg.privacy.accountant, max_ratio=limit)
    for line in report(plan, clip=user.clip_norm, accountant=cfg.privacy.accountant,
                       target=user.target_epsilon, useful=useful, max_ratio=limit,
                       server=server):
        print(line)


def main() -> None:
    """Console entry point."""
    sys.exit(_main())
