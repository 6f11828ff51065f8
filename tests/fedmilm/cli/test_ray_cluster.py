"""`fedmilm-simulate federation.ray_address=...` on a real two-node Ray cluster (a head and a
worker started on loopback by the test), instead of a private Ray instance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedmilm.deploy.processes import free_port, kill_strays
from fedmilm.runtime import OFFLINE_ENV
from tests.fedmilm.cli.test_simulate import SMALL, _simulate

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it

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
    """A head and a worker of our own, in a temp folder of our own. Stopped by killing exactly
    the processes that name that folder: `ray stop` would stop every Ray on the machine, a
    user's running simulation included."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="fmr", dir="/tmp")  # short: Ray's socket paths are long
    try:
        _ray("start", "--head", "--port", str(port), "--include-dashboard=false",
             f"--temp-dir={temp}", *NODE)
        _ray("start", "--address", address, *NODE)
        yield address
    finally:
        kill_strays(temp)
        shutil.rmtree(temp, ignore_errors=True)


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


def test_the_private_ray_ignores_a_running_cluster_and_admits_only_its_token(tmp_path,
                                                                           ray_cluster):
    """With a cluster already running (and RAY_ADDRESS pointing at it), a plain simulation
    still starts a Ray of its own, which a driver without its token cannot join."""
    run_dir = tmp_path / "run"
    done = subprocess.run([*SIMULATE_PROBE, str(run_dir)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["gcs"] != ray_cluster and probe["joined_with_token"]
    assert not probe["joined_without_token"]


SIMULATE_PROBE = [sys.executable, "-c", """
import json, os, subprocess, sys
from fedmilm.cli.simulate import backend_config, private_ray_token
from tests.conftest import tiny_config
private_ray_token()
import ray
ray.init(**backend_config(tiny_config())["init_args"])
gcs = ray.get_runtime_context().gcs_address
join = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print('JOINED')"
def joins(env):
    try:
        out = subprocess.run([sys.executable, "-c", join, gcs], capture_output=True, text=True,
                             timeout=60, env=env)
        return "JOINED" in out.stdout
    except subprocess.TimeoutExpired:
        return False
stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
print(json.dumps({"gcs": gcs, "joined_with_token": joins(dict(os.environ)),
                  "joined_without_token": joins(stranger)}))
ray.shutdown()
"""]
