"""Shared fixtures: composed configs and a tiny adapter space, all offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()
# A cache of the test session's own, so tests prove the conversion path instead of relying on
# whatever an earlier run left in ~/.cache (the tokenizer conversion takes ~4 s once).
# Parallel workers (pytest-xdist) split the cores instead of each taking all of them (two
# workers x two torch threads on two cores run slower than one thread each).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    _WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
# Parallel workers (pytest-xdist) share one cache per test run; conversion takes a file lock.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault("FEDMILM_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"fedmilm-test-cache-{_RUN}") if _RUN
                      else tempfile.mkdtemp(prefix="fedmilm-test-cache-"))

CONF = Path(__file__).resolve().parents[1] / "conf"


def private_ray(cpus_per_client: int = 2) -> dict:
    """Flower backend config for an in-process simulation on a Ray of the test's own
    (`address=local`): with parallel test workers, a plain `ray.init()` would join whichever
    Ray another worker started last, and lose it when that test ends."""
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"address": "local", "_node_ip_address": "127.0.0.1", "num_cpus": 2,
                          "include_dashboard": False}}


def compose_config(overrides: list[str]):
    """The raw composed config, as `fedmilm-simulate` would see it."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=overrides)


def tiny_config(*overrides: str):
    from fedmilm.config import load_config

    return load_config(compose_config(["model=tiny", *overrides]))


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()
