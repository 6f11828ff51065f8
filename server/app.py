"""The Flower ServerApps: thin shells around `run_federation`.

`make_server_app` binds a config by closure (simulation: Flower's Python simulation API has no
run_config channel). `app` is the deployment ServerApp (`flwr run`): it reads the same YAML from
the run config keys `fedmilm-config` and `run-dir`, which `fedmilm-deploy` fills in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fedmilm import protocol
from fedmilm.config import load_config
from fedmilm.runtime import quiet_offline_env
from fedmilm.server.federation import DIAGNOSTICS, run_federation


def make_server_app(config_text: str, run_dir: str) -> ServerApp:
    """A simulation's ServerApp bound to one validated run config (YAML) and its run directory;
    its virtual phones leave per-phone diagnostics in `run_dir/diagnostics` under DP."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_offline_env()
        run_federation(grid, load_config(OmegaConf.create(config_text)), Path(run_dir),
                       diagnostics=Path(run_dir) / DIAGNOSTICS)

    return app


app = ServerApp()


@app.main()
def deployed(grid: Grid, context: Context) -> None:
    """Deployment entry: config and run directory come from the run config."""
    quiet_offline_env()
    logging.getLogger("fedmilm").setLevel(logging.INFO)  # round progress in `flwr run --stream`
    config_text = str(context.run_config.get(protocol.RUN_CONFIG, ""))
    run_dir = str(context.run_config.get(protocol.RUN_DIR, ""))
    if not config_text or not run_dir:
        raise ValueError(f"run config needs '{protocol.RUN_CONFIG}' (YAML) and "
                         f"'{protocol.RUN_DIR}'; start runs with fedmilm-deploy")
    mapping = str(context.run_config.get(protocol.NODE_DEVICES, ""))
    identities = {int(k): int(v) for k, v in json.loads(mapping).items()} if mapping else None
    if identities is None:
        logging.getLogger("fedmilm.server").warning(
            "phones' device ids are self-declared (no key registration known to this run: "
            "deploy.insecure=true or an external SuperLink); any node can claim any id")
    run_federation(grid, load_config(OmegaConf.create(config_text)), Path(run_dir),
                   identities=identities)
