"""`fedmilm-simulate`: a simulated federation of phones on this workstation (Flower + Ray).

    fedmilm-simulate [hydra overrides]          e.g. federation.rounds=8 personalization=fedsa
    fedmilm-simulate -m lora.r=4,8,16           a sweep, one run directory per job
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()  # before flwr/ray are imported: telemetry and usage stats stay off

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedmilm.cli.common import (  # noqa: E402
    CONFIG_DIR,
    RunFailed,
    fail_in_one_line,
    load_component,
    prepare_run,
    report_run,
    run_dir_and_config,
)
from fedmilm.config import FedMilmConfig, to_yaml  # noqa: E402
from fedmilm.privacy.policy import write_phone_policy  # noqa: E402
from fedmilm.runtime import VERBOSE_ENV  # noqa: E402
from fedmilm.training.device import phones_gpu_share  # noqa: E402

SERVER_FACTORY = "fedmilm.server.app:make_server_app"
CLIENT_FACTORY = "fedmilm.clients.app:make_client_app"

log = logging.getLogger("fedmilm")


IN_FLIGHT_PER_WORKER = 4  # messages queued per Ray worker: enough that none ever idles


def backend_config(cfg: FedMilmConfig) -> dict:
    """Ray resources: `cpus_per_client` (and on CUDA `gpus_per_client`) per virtual phone,
    i.e. one base-model copy per worker. A private Ray instance unless
    `federation.ray_address` names a running cluster."""
    gpus = phones_gpu_share(cfg.train.device, cfg.federation.gpus_per_client)
    resources = {"num_cpus": cfg.federation.cpus_per_client, "num_gpus": gpus}
    if cfg.federation.ray_address:  # the cluster's own settings apply; attach_ray connected
        return {"client_resources": resources, "init_args": {}}
    init_args: dict = {"address": "local",  # a new Ray of our own, never a running cluster
                       "_node_ip_address": "127.0.0.1",
                       "logging_level": "INFO" if cfg.verbose else "ERROR",
                       "log_to_driver": True,
                       "include_dashboard": False,
                       "object_store_memory": 512 * 1024 * 1024}  # adapters are MBs, not GBs
    if cfg.federation.total_cpus is not None:
        init_args["num_cpus"] = cfg.federation.total_cpus
    return {"client_resources": resources, "init_args": init_args}


def with_in_flight(cfg: FedMilmConfig) -> FedMilmConfig:
    """`federation.max_in_flight` for a simulation: null becomes IN_FLIGHT_PER_WORKER per Ray
    worker of this machine, so Flower's engine never scans a cohort-long queue."""
    fed = cfg.federation
    if fed.max_in_flight is not None:
        return cfg
    cpus = fed.total_cpus or os.cpu_count() or 1
    workers = max(1, cpus // fed.cpus_per_client)
    return replace(cfg, federation=replace(fed, max_in_flight=IN_FLIGHT_PER_WORKER * workers))


def private_ray_token() -> None:
    """Token authentication for the private Ray: Ray 2.55's gRPC servers listen on every
    interface whatever node address they are given, so a fresh random token (in this process's
    environment only, inherited by its Ray processes, never written) keeps other users and
    hosts out of it."""
    if os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN"):
        return  # set already (an earlier run in this process: Ray keeps the first it read)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def attach_ray(address: str) -> None:
    """Connect this driver to an existing Ray cluster (Flower then reuses the connection) and
    say what it offers. Every node needs fedmilm installed, as on this machine."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=True)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = int(ray.cluster_resources().get("CPU", 0))
    log.info("attached to the Ray cluster at %s: %d nodes, %d CPUs", address, len(nodes), cpus)


def simulate(cfg: FedMilmConfig, run_dir: Path) -> None:
    """Run one simulated federation whose outputs go to `run_dir`."""
    if not cfg.federation.ray_address:
        private_ray_token()  # before Ray is imported: it reads its auth settings once
    from flwr.simulation import run_simulation

    from fedmilm.cli import flower_engine

    flower_engine.install()  # Flower's dispatcher scans every node every 100 ms
    cfg = with_in_flight(cfg)
    prepare_run(cfg, run_dir)
    devices = run_dir / "devices"  # the virtual phones' own storage, and their own policy
    write_phone_policy(cfg.privacy, devices)
    server_app = load_component(SERVER_FACTORY)(to_yaml(cfg), str(run_dir))
    client_app = load_component(CLIENT_FACTORY)(str(devices), str(run_dir / "diagnostics"))
    started = time.perf_counter()
    if cfg.federation.ray_address:
        attach_ray(cfg.federation.ray_address)
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=cfg.federation.num_clients,
                       backend_config=backend_config(cfg))
    except RuntimeError as err:  # Flower: "Simulation Runtime crashed" and its cause
        cause: BaseException = err
        while cause.__cause__ is not None:  # Flower wraps the reason twice
            cause = cause.__cause__
        stop_now(f"the simulation runtime crashed: {type(cause).__name__}: "
                 f"{str(cause).splitlines()[0] if str(cause) else ''}")
    report_run(cfg, run_dir, started)


def stop_now(line: str) -> None:
    """One line, then exit 1 at once: after a runtime crash Flower's ServerApp thread (not a
    daemon) would keep the process waiting out its round deadline. Ray's processes share this
    process's fate, as after a kill."""
    print(f"fedmilm: run failed: {line}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _main(raw: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    cfg, run_dir = run_dir_and_config(raw, hydra_cfg.runtime.output_dir,
                                      list(hydra_cfg.overrides.task))
    logging.getLogger("flwr").propagate = False  # flwr has its own handler; no double lines
    if cfg.verbose:
        os.environ[VERBOSE_ENV] = "1"  # Ray workers inherit it: their libraries speak too
    else:
        logging.getLogger("flwr").addFilter(_not_deprecation)
    try:
        simulate(cfg, run_dir)
    except RunFailed as err:
        fail_in_one_line(err)


def _not_deprecation(record: logging.LogRecord) -> bool:
    """Flower 1.42 prints a banner on every run that `run_simulation` is deprecated; fedmilm
    keeps it on purpose (BENCHMARKS.md: `flwr run` measured slower), so a user need not see
    it (`verbose=true` shows it)."""
    return "DEPRECATED FEATURE" not in record.getMessage()


def main() -> None:
    """Console entry point."""
    sys.exit(_main())
