"""`fedmilm-simulate`: a simulated federation of phones on this workstation (Flower + Ray).

    fedmilm-simulate [hydra overrides]          e.g. federation.rounds=8 personalization=fedsa
    fedmilm-simulate -m lora.r=4,8,16           a sweep, one run directory per job
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()  # before flwr/ray are imported: telemetry and usage stats stay off

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedmilm.cli.common import CONFIG_DIR, load_component, load_or_exit, prepare_model  # noqa: E402
from fedmilm.config import FedMilmConfig, to_yaml  # noqa: E402
from fedmilm.metrics import read_records  # noqa: E402

SERVER_FACTORY = "fedmilm.server.app:make_server_app"
CLIENT_APP = "fedmilm.clients.app:app"

log = logging.getLogger("fedmilm")


def backend_config(cfg: FedMilmConfig) -> dict:
    """Ray resources: `cpus_per_client` per virtual phone, i.e. one base-model copy per worker."""
    init_args: dict = {"logging_level": "ERROR", "log_to_driver": True,
                       "include_dashboard": False,
                       "object_store_memory": 512 * 1024 * 1024}  # adapters are MBs, not GBs
    if cfg.federation.total_cpus is not None:
        init_args["num_cpus"] = cfg.federation.total_cpus
    return {"client_resources": {"num_cpus": cfg.federation.cpus_per_client, "num_gpus": 0.0},
            "init_args": init_args}


def simulate(cfg: FedMilmConfig, run_dir: Path) -> None:
    """Run one simulated federation whose outputs go to `run_dir`."""
    from flwr.simulation import run_simulation

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    prepare_model(cfg)
    server_app = load_component(SERVER_FACTORY)(to_yaml(cfg), str(run_dir))
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=load_component(CLIENT_APP),
                   num_supernodes=cfg.federation.num_clients,
                   backend_config=backend_config(cfg))
    metrics = run_dir / "metrics.jsonl"
    records = read_records(metrics) if metrics.exists() else []
    if len(records) != cfg.federation.rounds:
        raise RuntimeError(f"the federation stopped after {len(records)} of "
                           f"{cfg.federation.rounds} rounds; see the log above")
    last = records[-1]
    log.info("done in %.0f s. Last round held-out loss: base %s, global %s, personal %s",
             time.perf_counter() - started, *(_fmt(last[k]) for k in
                                               ("loss_base", "loss_global", "loss_personal")))
    log.info("outputs: %s (metrics.jsonl, global_adapter/, plots/, devices/)", run_dir)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _main(raw: DictConfig) -> None:
    cfg = load_or_exit(raw)
    logging.getLogger("flwr").propagate = False  # flwr has its own handler; no double lines
    simulate(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console entry point."""
    sys.exit(_main())
