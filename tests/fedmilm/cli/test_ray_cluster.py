"""`fedmilm-simulate federation.ray_address=...` on a real two-node Ray cluster (a head and a
worker started on loopback by the test), instead of a private Ray instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmilm.deploy.processes import free_port
from fedmilm.runtime import OFFLINE_ENV
from tests.fedmilm.cli.test_simulate import SMALL, _simulate

RAY = str(Path(sys.executable).with_name("ray"))
NODE = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
        "--object-store-memory", str(200 * 1024 * 1024)]


def _ray(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **OFFLINE_ENV})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.fixture()
def ray_cluster():
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        _ray("start", "--head", "--port", str(port), "--include-dashboard=false", *NODE)
        _ray("start", "--address", address, *NODE)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_simulation_attaches_to_an_existing_two_node_cluster(tmp_path, ray_cluster):
    run_dir = tmp_path / "run"
    done = _simulate([*SMALL, f"federation.ray_address={ray_cluster}",
                      "federation.cpus_per_client=1", f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"attached to the Ray cluster at {ray_cluster}: 2 nodes, 2 CPUs" in done.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["clients"] == 2
    status = subprocess.run([RAY, "status", "--address", ray_cluster], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0  # the cluster outlives the run: it belongs to the lab


def test_total_cpus_is_refused_with_a_cluster():
    done = _simulate(["model=tiny", "federation.ray_address=127.0.0.1:1",
                      "federation.total_cpus=4"])
    assert done.returncode == 2 and "federation.total_cpus applies to a private" in done.stderr
