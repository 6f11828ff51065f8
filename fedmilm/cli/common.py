"""Shared pieces of the console entry points."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmilm.config import ConfigError, FedMilmConfig, load_config, to_yaml
from fedmilm.data import DataFormatError, count_users, load_user
from fedmilm.devices.availability import TraceFormatError, availability_for
from fedmilm.metrics import read_records
from fedmilm.model import smollm2
from fedmilm.privacy.calibrate import resolve_privacy
from fedmilm.privacy.distributed import DistributedNoise, distributed_noise_for
from fedmilm.privacy.plan import UserLevelPlan, plan_user_level, swamp_warning
from fedmilm.privacy.tree import default_separation, ftrl_participations
from fedmilm.training.device import DeviceError, resolve_device

log = logging.getLogger("fedmilm")

# conf/ sits at the repository root, beside this package (editable install).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def load_or_exit(raw: DictConfig) -> FedMilmConfig:
    """Typed, validated config with calibrated noise; on any problem print one line per key
    and exit with code 2."""
    try:
        cfg = load_config(raw)
        users = count_users(cfg.data)
        if users is not None and users < cfg.federation.num_clients:
            raise ConfigError([f"federation.num_clients={cfg.federation.num_clients} exceeds the "
                               f"{users} user files in data.path={cfg.data.path!r}"])
        sizes = None
        if users is not None:  # every user file is read once here: a bad line stops us now
            sizes = [len(load_user(cfg.data, user=u, seed=cfg.seed).train)
                     for u in range(cfg.federation.num_clients)]
        availability_for(cfg)  # a malformed trace stops us now, not in round 1
        cfg = resolve_privacy(cfg, sizes if cfg.privacy.sample_level else None)
        device = resolve_device(cfg.train.device)  # no GPU for train.device=cuda: stop now
        cfg = replace(cfg, train=replace(cfg.train, device=device))
    except (ConfigError, DataFormatError, TraceFormatError, DeviceError) as err:
        for line in str(err).splitlines():
            print(f"fedmilm: config error: {line}", file=sys.stderr)
        sys.exit(2)
    return cfg


def run_dir_and_config(raw: DictConfig, hydra_dir: str, task_overrides: list[str]
                       ) -> tuple[FedMilmConfig, Path]:
    """The config and run directory of this invocation: Hydra's new directory, or with
    `resume=RUN_DIR` that directory and the config saved in it (other overrides are refused:
    a resumed run must be the same experiment)."""
    resume = raw.get("resume")
    if not resume:
        return load_or_exit(raw), Path(hydra_dir)
    run_dir = Path(str(resume)).expanduser().resolve()
    others = [o for o in task_overrides if not o.lstrip("+~").startswith("resume=")]
    problems = []
    if others:
        problems.append(f"resume={resume} continues the saved config; drop the other overrides "
                        f"({' '.join(others)})")
    if not (run_dir / "config.yaml").is_file():
        problems.append(f"resume={resume}: no config.yaml there; point it at a run directory")
    if problems:
        for line in problems:
            print(f"fedmilm: config error: {line}", file=sys.stderr)
        sys.exit(2)
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.resume = str(run_dir)
    return load_or_exit(saved), run_dir


class RunFailed(RuntimeError):
    """The federation ran but did not finish its rounds: one line for the user, exit 1."""


def fail_in_one_line(err: RunFailed) -> None:
    """Print `err` as the user's one line (the log above has the detail) and exit 1."""
    print(f"fedmilm: run failed: {err}", file=sys.stderr)
    sys.exit(1)


def report_run(cfg: FedMilmConfig, run_dir: Path, started: float) -> None:
    """Check that every planned round ran (or the run stopped at its privacy budget, which is
    a success) and log the last round's losses; raise if rounds are missing or all skipped."""
    metrics, summary_path = run_dir / "metrics.jsonl", run_dir / "summary.json"
    records = read_records(metrics) if metrics.exists() else []
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    stopped = summary.get("stopped_early_because")
    if len(records) != cfg.federation.rounds and not (stopped and records):
        raise RunFailed(f"the federation stopped after {len(records)} of "
                        f"{cfg.federation.rounds} rounds; see the log above")
    if all(r["skipped"] for r in records):
        raise RunFailed(f"every one of the {len(records)} rounds was skipped (too few valid "
                        "replies): the adapter never changed; see the log above")
    if stopped:
        log.info("stopped after round %d of %d: %s", len(records), cfg.federation.rounds,
                 stopped)
    last = records[-1]
    log.info("done in %.0f s. Last round held-out loss: base %s, global %s, personal %s",
             time.perf_counter() - started, *(_fmt(last[k]) for k in
                                               ("loss_base", "loss_global", "loss_personal")))
    log.info("outputs: %s (metrics.jsonl, global_adapter/, plots/, checkpoints/, devices/)",
             run_dir)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def prepare_run(cfg: FedMilmConfig, run_dir: Path) -> None:
    """Prepare the model, check what only a loaded model can tell (its folder, the LoRA target
    modules, the phones' memory budget) and only then write config.yaml (kept as is on
    resume): a run that cannot start leaves nothing but Hydra's folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_model(cfg)
    check_model(cfg)
    if not cfg.resume:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))


def check_model(cfg: FedMilmConfig) -> None:
    """Load the run's adapter space once in this process (an in-process ServerApp reuses it)
    and plan eager phones' memory; exit 2 with one line naming the key on failure."""
    from fedmilm.adapters import cached_adapter_space
    from fedmilm.training.memory import MemoryBudgetError
    from fedmilm.training.runtimes import runtime_class

    try:
        space = cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                     seed=cfg.seed)
    except (ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        key = (f"lora.target_modules={list(cfg.lora.target_modules)}"
               if "target modules" in first.lower() else f"model ({cfg.model.name})")
        _exit_with(f"config error: {key}: {first}")
    try:
        runtime_class(cfg.client.runtime).check(cfg, space)
    except MemoryBudgetError as err:
        _exit_with(f"memory budget error: {err}")
    if cfg.privacy.user_level:
        check_signal(cfg, space.global_coordinates)
        check_distributed(cfg, space.global_coordinates)


def planned_distributed(cfg: FedMilmConfig,
                        coordinates: int) -> tuple[DistributedNoise, int] | None:
    """The run's distributed noise and the most rounds one phone can train in (None: off)."""
    noise = distributed_noise_for(cfg, coordinates)
    if noise is None:
        return None
    user = cfg.privacy.user
    separation = user.min_separation or default_separation(cfg.federation.num_clients,
                                                           cfg.federation.clients_per_round)
    return noise, ftrl_participations(cfg.federation.rounds, separation,
                                      user.max_participations)


def check_distributed(cfg: FedMilmConfig, coordinates: int) -> None:
    """Refuse (exit 2, one line) a SecAgg+ range the phones' noise would overflow."""
    planned = planned_distributed(cfg, coordinates)
    if planned is None:
        return
    problem = planned[0].range_problem(planned[1], cfg.privacy.delta)
    if problem is not None:
        _exit_with(f"config error: {problem}")


def user_level_plan(cfg: FedMilmConfig, coordinates: int) -> UserLevelPlan:
    """The run's user-level DP plan (noise already resolved by `resolve_privacy`, or calibrated
    here from the target when the config is raw)."""
    user, fed = cfg.privacy.user, cfg.federation
    return plan_user_level(population=fed.num_clients, cohort=fed.clients_per_round,
                           rounds=fed.rounds, delta=cfg.privacy.delta, coordinates=coordinates,
                           accountant=cfg.privacy.accountant,
                           target_epsilon=user.target_epsilon,
                           noise_multiplier=user.noise_multiplier, mechanism=user.mechanism,
                           min_separation=user.min_separation,
                           max_participations=user.max_participations,
                           distributed_noise=user.distributed_noise or 0.0)


def check_signal(cfg: FedMilmConfig, coordinates: int) -> None:
    """Refuse (exit 2, one line) a run whose user-level noise would swamp every round's step,
    naming the cohort that would not; only warn with `privacy.user.allow_swamped=true`."""
    user = cfg.privacy.user
    line = swamp_warning(user_level_plan(cfg, coordinates), accountant=cfg.privacy.accountant,
                         max_ratio=user.max_noise_to_signal)
    if line is None:
        return
    if user.allow_swamped:
        log.warning("privacy.user: %s (running anyway: privacy.user.allow_swamped=true)", line)
    else:
        _exit_with(f"config error: privacy.user: {line}; set privacy.user.allow_swamped=true "
                   "to run anyway")


def _exit_with(line: str) -> None:
    print(f"fedmilm: {line}", file=sys.stderr)
    sys.exit(2)


def prepare_model(cfg: FedMilmConfig) -> None:
    """Convert the embedded model once, here, before any worker process would race to do it."""
    if cfg.model.source == "smollm2":
        smollm2.model_dir(cfg.model.cache_dir)
    elif cfg.model.source == "llama-config":  # config-built models borrow SmolLM2's tokenizer
        smollm2.tokenizer_dir(cfg.model.cache_dir)


def load_component(ref: str) -> Any:
    """Resolve a 'module:attribute' component string, as Flower's app components are named."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
