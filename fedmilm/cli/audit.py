"""`fedmilm-audit`: an empirical privacy audit of the federation.

Plants a secret canary into a few phones' data, runs one simulated federation per privacy mode
(`audit.modes`), and measures for the global and the personalised models the canary exposure and
a loss-based membership-inference AUC, next to the epsilon each mode claims. Writes
`audit.json`, `audit.md` and `plots/audit.png` into the run directory, one sub-folder per mode.

    fedmilm-audit [overrides]   e.g. audit.modes=[none,user] privacy.user.noise_multiplier=2
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedmilm.adapters import build_adapter_space, load_global_adapter  # noqa: E402
from fedmilm.cli.common import CONFIG_DIR, load_component, load_or_exit  # noqa: E402
from fedmilm.config import FedMilmConfig, load_config  # noqa: E402
from fedmilm.data import load_user  # noqa: E402
from fedmilm.data.canary import canary_secret  # noqa: E402
from fedmilm.metrics import read_records  # noqa: E402
from fedmilm.metrics.plots import plot_audit  # noqa: E402
from fedmilm.privacy.audit import conversation_losses, exposure, membership_auc  # noqa: E402

STORAGE = "fedmilm.clients.storage:DeviceStorage"  # the phones' storage, named, not imported
log = logging.getLogger("fedmilm.audit")


def _run_mode(mode: str, cfg: FedMilmConfig, task_overrides: list[str], out: Path) -> Path:
    """One real federation (`fedmilm-simulate` in its own process) with canaries planted."""
    run_dir = out / mode
    kept = [o for o in task_overrides if o.split("=")[0].lstrip("+~") not in ("privacy", "audit")
            and not o.startswith(("audit.", "hydra."))]
    # leakage is measured at the config's noise whatever its utility: no swamp refusal here
    args = [*kept, f"privacy={mode}", "privacy.user.allow_swamped=true",
            f"data.canary_users={cfg.audit.canary_users}",
            f"data.canary_repeats={cfg.audit.canary_repeats}", f"hydra.run.dir={run_dir}"]
    log.info("audit: federation with privacy=%s ...", mode)
    subprocess.run([sys.executable, "-c", "from fedmilm.cli.simulate import main; main()",
                    *args], check=True)
    return run_dir


def _measure(run_dir: Path, audit_seed: int, candidates: int, per_phone: int) -> dict:
    cfg = load_config(OmegaConf.load(run_dir / "config.yaml"))
    space = build_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                seed=cfg.seed)
    space.load(load_global_adapter(space, run_dir / "global_adapter"))
    storage = load_component(STORAGE)
    kw = dict(max_length=cfg.data.max_length)

    def canary_exposure(user: int) -> float:
        return exposure(space.model, space.tokenizer, canary_secret(seed=cfg.seed, user=user),
                        candidates=candidates, seed=audit_seed,
                        system_prompt=cfg.data.system_prompt, **kw)

    def mia(personal: bool) -> float:
        members, others = [], []
        for user in range(cfg.federation.num_clients):
            space.load(storage(run_dir / "devices" / str(user)).load_personal(space) if personal
                       else space.initial_state(space.personal_keys))
            data = load_user(cfg.data, user=user, seed=cfg.seed)
            members += conversation_losses(space.model, space.tokenizer,
                                           data.train[:per_phone], **kw)
            others += conversation_losses(space.model, space.tokenizer,
                                          data.heldout[:per_phone], **kw)
        return membership_auc(members, others)

    users = range(cfg.data.canary_users)
    space.load(space.initial_state(space.personal_keys))
    result = {"exposure_global": [canary_exposure(u) for u in users], "auc_global": mia(False)}
    result["exposure_personal"], result["canary_phone_trained"] = [], []
    for user in users:  # a phone that was never sampled could not leak its canary
        result["canary_phone_trained"].append(
            (run_dir / "devices" / str(user)).is_dir())
        space.load(storage(run_dir / "devices" / str(user)).load_personal(space))
        result["exposure_personal"].append(canary_exposure(user))
    result["auc_personal"] = mia(True) if space.personal_keys else None
    last = read_records(run_dir / "metrics.jsonl")[-1]
    result.update({k: last[k] for k in ("epsilon_user", "epsilon_sample_max", "delta",
                                        "loss_global", "loss_personal")})
    return result


def _table(results: dict[str, dict], max_bits: float) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [f"Exposure in bits (max {max_bits:.1f}; ~0 = no better than a guess), "
             "membership-inference AUC (0.5 = chance).", "",
             "| privacy | eps user | eps sample (worst phone) | canary phones that trained | "
             "exposure global | exposure personal | MIA AUC global | MIA AUC personal | "
             "held-out loss global | personal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {f(r['epsilon_user'])} | {f(r['epsilon_sample_max'])} | "
            f"{sum(r['canary_phone_trained'])}/{len(r['canary_phone_trained'])} | "
            f"{', '.join(f(x) for x in r['exposure_global'])} | "
            f"{', '.join(f(x) for x in r['exposure_personal'])} | {f(r['auc_global'])} | "
            f"{f(r['auc_personal'])} | {f(r['loss_global'])} | {f(r['loss_personal'])} |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _main(raw: DictConfig) -> None:
    cfg = load_or_exit(raw)
    if cfg.audit.canary_users < 1 or cfg.audit.canary_users > cfg.federation.num_clients:
        sys.exit(f"fedmilm: config error: audit.canary_users={cfg.audit.canary_users} must be in "
                 f"[1, federation.num_clients={cfg.federation.num_clients}]")
    out = Path(HydraConfig.get().runtime.output_dir)
    task = list(HydraConfig.get().overrides.task)
    results = {mode: _measure(_run_mode(mode, cfg, task, out), cfg.seed, cfg.audit.candidates,
                              cfg.audit.mia_per_phone) for mode in cfg.audit.modes}
    (out / "audit.json").write_text(json.dumps(results, indent=2))
    table = _table(results, max_bits=math.log2(cfg.audit.candidates + 1))
    (out / "audit.md").write_text(table)
    (out / "plots").mkdir(exist_ok=True)
    plot_audit(results, out / "plots" / "audit.png")
    print(table)


def main() -> None:
    """Console entry point."""
    sys.exit(_main())
