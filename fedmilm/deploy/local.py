"""A real Flower deployment on one host: SuperLink + one SuperNode per phone, TLS and SuperNode
authentication on, the run submitted with `flwr run`, every process stopped at the end.

The same ServerApp (`fedmilm.server.app:app`) and ClientApp as in simulation run here; the
Hydra config reaches the ServerApp through the run config (YAML in `fedmilm-config`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from fedmilm import protocol
from fedmilm.config import FedMilmConfig, to_yaml
from fedmilm.deploy.bridged import bridge_settings, provision_phone
from fedmilm.deploy.credentials import Credentials, create_credentials
from fedmilm.deploy.link import LinkPaths, ensure_key, private_folder
from fedmilm.deploy.processes import (
    Managed,
    ProcessGroup,
    free_port,
    kill_strays,
    log_tail,
    wait_for_path,
    wait_for_port,
)
from fedmilm.privacy.policy import POLICY_FILE, write_phone_policy
from fedmilm.runtime import OFFLINE_ENV

log = logging.getLogger("fedmilm.deploy")

CONNECTION = "fedmilm"  # the connection name in the flwr CLI's config.toml
APP_DIR = Path(__file__).resolve().parents[2]  # the project (pyproject.toml = the Flower app)
# What `flwr run` packages into the app bundle (FAB). Flower walks the whole folder it is given,
# .venv included (~65k files, 5-15 s per run), so the run is submitted from a copy of these.
APP_PARTS = ("pyproject.toml", "fedmilm", "server", "clients", "conf")


def _tool(name: str) -> str:
    """A Flower executable from this Python's environment."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found; install fedmilm with its pinned flwr")
    return found


def child_env() -> dict[str, str]:
    """Environment of every Flower process we start: offline, unbuffered, and with this
    Python's bin folder first on PATH, because the SuperLink and SuperNodes start
    `flower-superexec` by name (a venv that is not activated would not be found)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", "PATH": path,
            # how often a SuperExec looks for a message to start a ClientApp for (Flower's
            # default, 1 s, adds half a second to every message on average)
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


@dataclass(frozen=True)
class Layout:
    """Where a deployment keeps its state inside the run directory."""

    run_dir: Path

    @property
    def root(self) -> Path:
        return self.run_dir / "deploy"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def flwr_home(self, who: str) -> Path:
        return self.root / "flwr_home" / who

    def device_dir(self, index: int) -> Path:
        return self.run_dir / "devices" / str(index)  # the same place simulation uses

    def link(self, index: int) -> LinkPaths:
        """The device's local link between its relay and its warm service."""
        return LinkPaths(self.device_dir(index) / "link")

    def bridge_link(self, index: int) -> LinkPaths:
        """A bridged phone's link between its relay and the bridge (server side)."""
        return LinkPaths(self.root / "bridge" / str(index))


def _quoted(value: Path) -> str:
    if any(c in str(value) for c in "\"'"):
        raise ValueError(f"device folder {value} must not contain quotes")
    return f"'{value}'"


def node_config(index: int, num_nodes: int, device_dir: Path) -> str:
    """A SuperNode's `--node-config`: its user partition, its own storage folder and its own
    privacy policy file in it."""
    return (f"{protocol.PARTITION_ID}={index} num-partitions={num_nodes} "
            f"{protocol.DEVICE_DIR}={_quoted(device_dir)} "
            f"{protocol.PRIVACY_POLICY}={_quoted(device_dir / POLICY_FILE)}")


def relay_node_config(link: LinkPaths, max_mb: int) -> str:
    """The `--node-config` of a SuperNode whose phone is a long-lived endpoint: its relay
    needs only the link (the phone's own node config stays with the phone)."""
    return f"{protocol.PHONE_LINK}={_quoted(link.folder)} {protocol.PHONE_LINK_MAX_MB}={max_mb}"


def cli_config(address: str, ca_cert: Path | None) -> str:
    """The flwr CLI's `config.toml` naming our SuperLink connection (None: insecure)."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    lines.append("insecure = true" if ca_cert is None
                 else f"root-certificates = {json.dumps(str(ca_cert))}")
    return "\n".join(lines) + "\n"


def threads_per_phone(cfg: FedMilmConfig) -> int:
    """CPU threads each local phone's training may use: the machine's cores shared by the
    phones of one round. On one host several ClientApp processes run at once, and torch's
    default (all cores each) oversubscribes the CPU; measured 10x slower training."""
    if cfg.deploy.threads_per_phone is not None:
        return cfg.deploy.threads_per_phone
    concurrent = min(cfg.federation.clients_per_round, cfg.federation.num_clients)
    return max(1, (os.cpu_count() or 1) // concurrent)


def remote_cli(cfg: FedMilmConfig, run_dir: Path) -> FlwrCli:
    """The flwr CLI for an existing SuperLink (`deploy.connect`), e.g. on another host or in
    the Docker compose federation; TLS with the CA in `deploy.credentials_dir`."""
    ca_cert = None
    if not cfg.deploy.insecure:
        ca_cert = Path(str(cfg.deploy.credentials_dir)).expanduser() / "ca.crt"
        if not ca_cert.is_file():
            raise FileNotFoundError(f"{ca_cert} not found: deploy.credentials_dir must hold the "
                                    "SuperLink's CA certificate (ca.crt)")
    else:
        log.warning("deploy.insecure=true: talking to %s without TLS", cfg.deploy.connect)
    return FlwrCli(Layout(run_dir), str(cfg.deploy.connect), ca_cert, child_env())


def stage_app(dest: Path) -> Path:
    """A fresh copy of the Flower app's files in `dest`, for `flwr run` to package."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise RuntimeError(f"{APP_DIR} has no pyproject.toml: submitting a run needs fedmilm "
                           "installed from its source checkout (pip install -e .)")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "android")
    for part in APP_PARTS:
        source = APP_DIR / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=skip)
        else:
            shutil.copy2(source, dest / part)
    return dest


def run_config_toml(cfg: FedMilmConfig, run_dir: Path,
                    identities: dict[int, int] | None = None) -> str:
    """The run config file for `flwr run --run-config` (JSON strings are valid TOML)."""
    mapping = "" if identities is None else json.dumps({str(k): v for k, v in
                                                        identities.items()})
    return (f"{protocol.RUN_CONFIG} = {json.dumps(to_yaml(cfg))}\n"
            f"{protocol.RUN_DIR} = {json.dumps(str(run_dir))}\n"
            f"{protocol.NODE_DEVICES} = {json.dumps(mapping)}\n")


class FlwrCli:
    """The flwr CLI pointed at one SuperLink: register keys, submit a run and stream its log."""

    def __init__(self, layout: Layout, address: str, ca_cert: Path | None,
                 env: dict[str, str]) -> None:
        self.layout, self.address = layout, address
        self.home = layout.flwr_home("cli")
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(cli_config(address, ca_cert))
        self.env = {**env, "FLWR_HOME": str(self.home)}

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the flwr CLI against our SuperLink connection."""
        return subprocess.run([_tool("flwr"), *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink (`flwr supernode register`);
        the node id the SuperLink gave it."""
        done = self.flwr("supernode", "register", str(public_key), CONNECTION,
                         "--format", "json")
        try:
            return int(json.loads(done.stdout)["node-id"])
        except (ValueError, KeyError, TypeError) as err:
            raise RuntimeError(f"registering {public_key.name} failed:\n{done.stdout}"
                               f"{done.stderr}") from err

    def submit_and_stream(self, cfg: FedMilmConfig, server_run_dir: Path, *,
                          echo: bool = True, identities: dict[int, int] | None = None) -> int:
        """Submit the run with `flwr run --stream`, echo its log until it ends; exit code.
        `server_run_dir` is where the ServerApp writes, on the SuperLink's host; `identities`
        (node id -> device id, from key registration) binds each phone to its key."""
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        run_config = self.layout.root / "run_config.toml"
        run_config.write_text(run_config_toml(cfg, server_run_dir, identities))
        app = stage_app(self.layout.root / "app")
        argv = [_tool("flwr"), "run", str(app), CONNECTION, "--run-config",
                str(run_config), "--stream"]
        with open(self.layout.logs / "run.log", "w", encoding="utf-8") as out:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=self.env, start_new_session=True)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    out.write(line)
                    if echo:
                        print(line, end="", flush=True)
                return proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: stop the stream, by force if it must
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


class LocalFederation:
    """Start, use and always stop a SuperLink with `num_nodes` SuperNodes on this host."""

    def __init__(self, cfg: FedMilmConfig, run_dir: Path) -> None:
        self.cfg, self.layout = cfg, Layout(run_dir)
        self.host = cfg.deploy.host
        self.port = cfg.deploy.port or free_port(self.host)
        self.address = f"{self.host}:{self.port}"
        self.creds: Credentials | None = None
        self.processes = ProcessGroup(env=child_env(), log_dir=self.layout.logs)
        self.phone_threads = threads_per_phone(cfg)
        self.identities: dict[int, int] = {}  # node id -> device id, bound to registered keys
        self.services: dict[int, Managed] = {}  # device -> its warm phone service
        n, k = cfg.federation.num_clients, cfg.deploy.bridged_phones
        self.bridged = list(range(n - k, n))  # phones that speak HTTPS through the bridge
        self.bridge_url: str | None = None
        self.phones: dict[int, Managed] = {}  # bridged device -> its reference phone
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._restart_crashed_services, daemon=True,
                                          name="phone-service-watchdog")

    def __enter__(self) -> LocalFederation:
        try:
            self._start()
        except BaseException:
            self.processes.stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._watchdog.is_alive():
            self._watchdog.join()
        self.processes.stop_all()
        strays = kill_strays(str(self.layout.root))
        if strays:
            log.info("stopped %d Flower app process(es) left behind", len(strays))

    # ---- start-up
    def _credentials(self) -> Credentials:
        chosen = self.cfg.deploy.credentials_dir
        folder = Path(chosen).expanduser() if chosen else self.layout.root / "credentials"
        return create_credentials(folder, num_nodes=self.cfg.federation.num_clients,
                                  hosts=(self.host, "localhost"))

    def _start(self) -> None:
        n = self.cfg.federation.num_clients
        if self.cfg.deploy.insecure:
            log.warning("deploy.insecure=true: TLS and SuperNode authentication are OFF; anyone "
                        "who reaches %s can join or read the federation", self.address)
        else:
            self.creds = self._credentials()
        self.cli = FlwrCli(self.layout, self.address,
                           None if self.creds is None else self.creds.ca_cert,
                           self.processes.env)
        if self.cfg.deploy.warm_phones:  # they load torch while the SuperLink starts
            for index in range(n):
                if index not in self.bridged:
                    self.start_phone_service(index)
        if self.bridged:
            self._start_bridge()
        self._start_superlink()
        for index in range(n):
            if self.creds is not None:  # the SuperLink's node id for phone index's key
                self.identities[self.cli.register(self.creds.node_public_key(index))] = index
            self.start_supernode(index)
        for index, child in self.services.items():
            wait_for_path(child, self.layout.link(index).socket,
                          self.cfg.deploy.startup_timeout_s)
        if self.services:
            self._watchdog.start()
        if self.cfg.deploy.reference_phones:
            for index in self.bridged:
                self.start_reference_phone(index)
        log.info("local federation up: SuperLink %s (%s), %d SuperNodes%s%s", self.address,
                 "insecure" if self.creds is None else "TLS + SuperNode auth", n,
                 ", warm phone services" if self.services else "",
                 f", {len(self.bridged)} bridged phone(s) at {self.bridge_url}"
                 if self.bridged else "")

    def _start_bridge(self) -> None:
        """The HTTPS bridge (`fedmilm.clients.bridge`) with the deployment's certificate, a
        link per bridged phone, and each bridged phone's own folder staged."""
        port = self.cfg.deploy.bridge_port or free_port(self.host)
        scheme = "http" if self.creds is None else "https"
        self.bridge_url = f"{scheme}://{self.host}:{port}"
        devices = {}
        for index in self.bridged:
            link = private_folder(self.layout.bridge_link(index).folder)
            ensure_key(link)
            code = provision_phone(self.layout.device_dir(index), self.cfg, index,
                                   bridge_url=self.bridge_url,
                                   ca_cert=None if self.creds is None else self.creds.ca_cert)
            devices[index] = (link.folder, code)
        settings = self.layout.root / "bridge.json"
        settings.write_text(bridge_settings(
            host=self.host, port=port, max_mb=self.cfg.deploy.max_message_mb,
            cert=None if self.creds is None else self.creds.server_cert,
            key=None if self.creds is None else self.creds.server_key, devices=devices))
        child = self.processes.start("bridge", [sys.executable, "-m", "fedmilm.clients.bridge",
                                                "--config", str(settings)])
        wait_for_port(child, self.host, port, self.cfg.deploy.startup_timeout_s)

    def start_reference_phone(self, index: int, *, upload_piece_kb: int = 1024) -> Managed:
        """The Python reference phone for bridged device `index`, on its own folder."""
        argv = [sys.executable, "-m", "fedmilm.clients.reference_phone",
                "--storage", str(self.layout.device_dir(index)), "--poll-s", "0.5",
                "--upload-piece-kb", str(upload_piece_kb)]
        child = self.processes.start(f"reference-phone-{index}", argv,
                                     extra_env=self._phone_threads())
        self.phones[index] = child
        return child

    def _start_superlink(self) -> None:
        argv = [_tool("flower-superlink"), "--host", self.host, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.creds is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.creds.ca_cert),
                     "--ssl-certfile", str(self.creds.server_cert),
                     "--ssl-keyfile", str(self.creds.server_key), "--enable-supernode-auth"]
        child = self.processes.start("superlink", argv, extra_env={
            "FLWR_HOME": str(self.layout.flwr_home("superlink"))})
        wait_for_port(child, self.host, self.port, self.cfg.deploy.startup_timeout_s)

    def _phone_node_config(self, index: int) -> str:
        """Phone `index`'s own node config (its partition, storage and privacy policy)."""
        device = self.layout.device_dir(index)
        write_phone_policy(self.cfg.privacy, device)
        return node_config(index, self.cfg.federation.num_clients, device)

    def _phone_threads(self) -> dict[str, str]:
        threads = str(self.phone_threads)  # torch reads these at import
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def start_phone_service(self, index: int) -> Managed:
        """Start phone `index`'s warm service (`fedmilm.clients.service`) with the phone's own
        node config and its link key (made once; kept across restarts)."""
        link = private_folder(self.layout.link(index).folder)
        ensure_key(link)
        link.socket.unlink(missing_ok=True)  # a stale socket of an earlier run is not an answer
        argv = [sys.executable, "-m", "fedmilm.clients.service", "--link", str(link.folder),
                "--node-config", self._phone_node_config(index),
                "--max-mb", str(self.cfg.deploy.max_message_mb)]
        child = self.processes.start(f"phone-{index}", argv, extra_env=self._phone_threads())
        self.services[index] = child
        return child

    def _restart_crashed_services(self) -> None:
        """Watchdog: a phone service that exits while the federation runs is started again;
        its personal adapter and privacy ledger are on its device storage, so nothing is lost
        but the message it was handling (that reply fails; the round carries on)."""
        while not self._stopping.wait(0.5):
            for index, child in list(self.services.items()):
                if child.proc.poll() is not None and not self._stopping.is_set():
                    log.warning("phone %d's service exited with code %s; restarting it (its "
                                "storage and ledger are kept)", index, child.proc.returncode)
                    self.services[index] = self.processes.restart(child)

    def start_supernode(self, index: int, *, private_key: Path | None = None,
                        name: str | None = None) -> subprocess.Popen:
        """Start SuperNode `index`: with a warm phone service it relays to it, else its
        ClientApp runs phone `index` (partition, device folder) itself; with TLS it
        authenticates with `private_key` (default: its own registered key)."""
        max_mb = self.cfg.deploy.max_message_mb
        if index in self.bridged:
            own = relay_node_config(self.layout.bridge_link(index), max_mb)
        elif index in self.services:
            own = relay_node_config(self.layout.link(index), max_mb)
        else:
            own = self._phone_node_config(index)
        name = name or f"supernode-{index}"
        argv = [_tool("flower-supernode"), "--superlink", self.address,
                "--port", str(free_port()), "--node-config", own, "--max-retries", "3"]
        if self.creds is None:
            argv.append("--insecure")
        else:
            key = private_key or self.creds.node_key(index)
            argv += ["--root-certificates", str(self.creds.ca_cert),
                     "--auth-supernode-private-key", str(key)]
        child = self.processes.start(name, argv, extra_env={  # threads: for its ClientApps
            "FLWR_HOME": str(self.layout.flwr_home(name)), **self._phone_threads()})
        return child.proc

    # ---- the run
    def submit_and_stream(self, *, echo: bool = True) -> int:
        """Submit this config's run and stream it; the ServerApp writes the run directory."""
        return self.cli.submit_and_stream(self.cfg, self.layout.run_dir, echo=echo,
                                          identities=self.identities or None)

    def failure_context(self) -> str:
        """Log tails of every process, for an error message."""
        return "\n".join(f"--- {c.name} ---\n{log_tail(c.log_path, 8)}"
                         for c in self.processes.children)
