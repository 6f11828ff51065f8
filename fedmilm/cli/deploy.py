"""`fedmilm-deploy`: the federation on Flower's Deployment Engine, on this host.

    fedmilm-deploy [hydra overrides]             e.g. federation.num_clients=4 federation.rounds=3
    fedmilm-deploy deploy.insecure=true          no TLS / node auth (warns; loopback only)
    fedmilm-deploy resume=RUN_DIR                continue a killed run from its last checkpoint

Starts a SuperLink (TLS, SuperNode authentication) and one SuperNode per phone, registers the
phones' keys, submits the run with `flwr run`, streams its log, writes the same run directory as
`fedmilm-simulate` and stops every process at the end, on Ctrl-C and on failure.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedmilm.adapters.space import release_cached_spaces  # noqa: E402
from fedmilm.cli.common import (  # noqa: E402
    CONFIG_DIR,
    RunFailed,
    fail_in_one_line,
    prepare_run,
    report_run,
    run_dir_and_config,
)
from fedmilm.config import FedMilmConfig  # noqa: E402
from fedmilm.deploy.local import LocalFederation, remote_cli  # noqa: E402

log = logging.getLogger("fedmilm")


def _stop_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C, so the `with` block below stops every child."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def deploy(cfg: FedMilmConfig, run_dir: Path) -> None:
    """Run one deployed federation whose outputs go to `run_dir`."""
    prepare_run(cfg, run_dir)
    release_cached_spaces()  # the phones and the ServerApp load it in their own processes
    started = time.perf_counter()
    if cfg.deploy.connect:
        _submit_to_existing(cfg, run_dir, started)
        return
    with LocalFederation(cfg, run_dir) as federation:
        code = federation.submit_and_stream()
        if code != 0:
            raise RunFailed(f"flwr run exited with code {code}; process logs in "
                            f"{federation.layout.logs}\n{federation.failure_context()}")
    report_run(cfg, run_dir, started)


def _submit_to_existing(cfg: FedMilmConfig, run_dir: Path, started: float) -> None:
    """`deploy.connect`: the SuperLink and SuperNodes run elsewhere; only submit and stream."""
    server_dir = Path(cfg.deploy.server_run_dir) if cfg.deploy.server_run_dir else run_dir
    code = remote_cli(cfg, run_dir).submit_and_stream(cfg, server_dir)
    if code != 0:
        raise RunFailed(f"flwr run exited with code {code}; see {run_dir}/deploy/logs")
    if server_dir == run_dir:
        report_run(cfg, run_dir, started)
    else:
        log.info("run finished; its outputs are in %s on the SuperLink's host", server_dir)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _main(raw: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    cfg, run_dir = run_dir_and_config(raw, hydra_cfg.runtime.output_dir,
                                      list(hydra_cfg.overrides.task))
    if cfg.privacy.seeded_noise and cfg.privacy.any_dp:
        print("fedmilm: config error: privacy.seeded_noise=true makes DP randomness replayable "
              "from the config; fedmilm-deploy refuses it (simulation tests only)",
              file=sys.stderr)
        sys.exit(2)
    _stop_on_sigterm()
    try:
        deploy(cfg, run_dir)
    except RunFailed as err:
        fail_in_one_line(err)
    except KeyboardInterrupt:
        log.warning("interrupted: every SuperLink/SuperNode process was stopped; continue with "
                    "fedmilm-deploy resume=%s", run_dir)
        sys.exit(130)


def main() -> None:
    """Console entry point."""
    sys.exit(_main())
