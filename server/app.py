"""The Flower ServerApp: a thin shell around `run_federation`."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from fedmilm.config import load_config
from fedmilm.runtime import quiet_offline_env
from fedmilm.server.federation import run_federation


def make_server_app(config_text: str, run_dir: str) -> ServerApp:
    """A ServerApp bound to one validated run config (YAML) and its run directory.

    The config travels by closure: Flower's Python simulation API has no run_config channel.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_offline_env()
        run_federation(grid, load_config(OmegaConf.create(config_text)), Path(run_dir))

    return app
