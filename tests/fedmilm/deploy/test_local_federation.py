"""Real `flower-superlink` / `flower-supernode` processes on 127.0.0.1 with TLS and SuperNode
authentication: a full run, a refused stranger, plain HTTP refused, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from fedmilm.config import to_yaml
from fedmilm.deploy.credentials import create_credentials
from fedmilm.deploy.local import LocalFederation, cli_config, node_config, remote_cli
from fedmilm.deploy.processes import kill_strays, log_tail
from tests.conftest import tiny_config

pytestmark = pytest.mark.e2e  # a whole federation: `make test-fast` skips it

SMALL = ["federation.num_clients=2", "federation.clients_per_round=2", "federation.rounds=2",
         "federation.round_timeout_s=180", "train.lr=0.02"]
DEPLOY = [sys.executable, "-c", "from fedmilm.cli.deploy import main; main()"]


def _alive(pattern: str) -> list[str]:
    done = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if "pgrep" not in line]


def _gone(pattern: str, within: float) -> list[str]:
    """Processes matching `pattern` still alive after `within` seconds (Flower's app processes
    exit on their own once their parent is gone, polling every 0.2 s)."""
    deadline = time.monotonic() + within
    while (alive := _alive(pattern)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_tls_authenticated_federation_runs_and_refuses_strangers(tmp_path):
    cfg = tiny_config(*SMALL)
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    stranger = create_credentials(tmp_path / "stranger", num_nodes=1)  # never registered
    with LocalFederation(cfg, run_dir) as federation:
        host, port = federation.host, federation.port
        # a SuperNode whose key is not registered is refused and gives up
        rogue = federation.start_supernode(0, private_key=stranger.node_key(0), name="stranger")
        assert _wait_exit(rogue, timeout=120) != 0
        assert "Failed to activate SuperNode" in log_tail(federation.layout.logs /
                                                          "stranger.log", 40)
        # TLS is on: plain HTTP gets nothing, HTTPS with our CA is answered
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5).read()
        context = ssl.create_default_context(cafile=str(federation.creds.ca_cert))
        try:
            urllib.request.urlopen(f"https://{host}:{port}/health", timeout=5, context=context)
        except urllib.error.HTTPError as err:  # any HTTP status proves the TLS handshake
            assert err.code < 600
        # the registered phones train two rounds to completion; the run is submitted the way
        # a user submits to a SuperLink that runs elsewhere (deploy.connect)
        remote = replace(cfg, deploy=replace(cfg.deploy, connect=federation.address,
                                             credentials_dir=str(federation.creds.folder)))
        code = remote_cli(remote, run_dir).submit_and_stream(remote, run_dir, echo=False)
        assert code == 0, federation.failure_context()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 2 for r in rows)
    assert rows[-1]["loss_global"] < rows[-1]["loss_base"]
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints" / "round_0002").is_dir()
    for device in ("0", "1"):  # each SuperNode kept its personal part in its own folder
        assert (run_dir / "devices" / device / "personal_adapter.safetensors").exists()
    assert _gone(str(run_dir), within=30) == []  # no SuperLink, SuperNode or SuperExec left
    with pytest.raises(OSError):  # and the port is free again
        import socket

        socket.create_connection((host, port), timeout=2).close()


def _ctrl_c_enabled() -> None:
    """Restore SIGINT's default in the child: a suite started in the background by a
    non-interactive shell (`make test &`, nohup) ignores SIGINT, every child inherits that,
    and Python then never turns SIGINT into KeyboardInterrupt; Ctrl-C at a terminal does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_every_process(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*DEPLOY, "model=tiny", *SMALL, "federation.rounds=20",
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_ctrl_c_enabled)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "local federation up" in line:
                break
        else:
            pytest.fail("".join(lines[-30:]))
        assert len(_alive(str(run_dir))) >= 3  # SuperLink and two SuperNodes were running
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, rest[-2000:]
        assert "continue with fedmilm-deploy resume=" in rest
        time.sleep(1)
        assert _alive(str(run_dir)) == []
    finally:  # a failed check must not leave a 20-round federation running for the suite
        proc.kill()
        kill_strays(str(run_dir))


def test_insecure_mode_must_be_asked_for_and_configs_are_well_formed(tmp_path):
    cfg = tiny_config(*SMALL)
    assert cfg.deploy.insecure is False  # TLS + node auth by default
    creds = create_credentials(tmp_path / "c", num_nodes=1)
    secure = cli_config("127.0.0.1:9000", creds.ca_cert)
    assert "insecure =" not in secure and str(creds.ca_cert) in secure
    assert "insecure = true" in cli_config("127.0.0.1:9000", None)
    assert node_config(3, 8, Path("/data/p3")) == (
        "partition-id=3 num-partitions=8 device-dir='/data/p3' "
        "privacy-policy='/data/p3/privacy_policy.json'")
    with pytest.raises(ValueError, match="quotes"):
        node_config(0, 1, Path("/tmp/it's"))
    assert (tmp_path / "c" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert creds.node_key(0).stat().st_mode & 0o777 == 0o600


def _service_pid(run_dir: Path, device: int) -> int | None:
    marker = f"fedmilm.clients.service --link {run_dir}/devices/{device}/link"
    found = [line.split()[0] for line in _alive(marker)]
    return int(found[0]) if found else None


def test_deployed_dp_run_writes_nothing_per_phone_and_a_crashed_phone_keeps_its_ledger(
        tmp_path):
    """`fedmilm-deploy` under both DP levels, each phone a warm service: the phones train and
    keep their ledgers in their own storage; the server's outputs hold no per-phone row, loss
    or count. Phone 0's service is killed after round 1: the deployment restarts it and its
    ledger goes on counting where it stopped (state on the device survives the crash)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*DEPLOY, "model=tiny", *SMALL, "privacy=both",
                             "privacy.delta=1e-3", "privacy.user.allow_swamped=true",
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_ctrl_c_enabled)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        crashed = _service_pid(run_dir, 0)
        assert crashed is not None
        os.kill(crashed, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    finally:
        proc.kill()
        kill_strays(str(run_dir))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["evaluated"] is None and row["diagnostics"] is None
        assert all(row[k] is None for k in ("clients", "rejected", "declined", "train_loss",
                                            "loss_base", "loss_global", "loss_personal",
                                            "epsilon_sample_max"))
        assert row["epsilon_user"] > 0
    assert not (run_dir / "per_phone.jsonl.gz").exists() and not (run_dir / "diagnostics").exists()
    assert "phone 0's service exited" in output and "restarting it" in output
    for device in (0, 1):
        service_log = (run_dir / "deploy" / "logs" / f"phone-{device}.log").read_text()
        trained = service_log.count("train message answered")
        ledger = json.loads((run_dir / "devices" / str(device) / "privacy_ledger.json")
                            .read_text())
        assert ledger["trainings"] == trained >= 1  # charged once per training, never reset
        assert service_log.count("phone service ready") == (2 if device == 0 else 1)
    restarted = (run_dir / "deploy" / "logs" / "phone-0.log").read_text().split(
        "phone service ready")[-1]
    assert "train message answered" in restarted  # the restarted service trained again


def test_deploy_refuses_seeded_dp_noise(tmp_path):
    done = subprocess.run([*DEPLOY, "model=tiny", "privacy=sample", "privacy.seeded_noise=true",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "privacy.seeded_noise=true" in done.stderr and "refuses" in done.stderr
