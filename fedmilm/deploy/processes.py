"""Child processes that are always cleaned up: each in its own process group, stopped with
SIGTERM and then SIGKILL, whatever way the parent leaves (return, exception, Ctrl-C)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fedmilm.deploy")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Managed:
    """One started child process and where its output goes."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    argv: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class ProcessGroup:
    """Children started through `start`, stopped together by `stop_all` (newest first)."""

    env: dict[str, str]
    log_dir: Path
    children: list[Managed] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, extra_env: dict[str, str] | None = None
              ) -> Managed:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**self.env, **(extra_env or {})})
        child = Managed(name, proc, log_path, argv, dict(extra_env or {}))
        self.children.append(child)
        return child

    def restart(self, child: Managed) -> Managed:
        """Start `child`'s command again (it has exited); the new process replaces it."""
        self.children.remove(child)
        return self.start(child.name, child.argv, extra_env=child.extra_env)

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child's process group, wait up to `grace_s`, then SIGKILL."""
        for child in reversed(self.children):
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, grace_s)
        for child in self.children:  # also reaps grandchildren left in the group
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()
        self.children.clear()


def kill_strays(marker: str) -> list[int]:
    """SIGKILL every other process whose command line contains `marker` (Linux /proc).

    Flower's SuperExec starts ServerApp/ClientApp processes in sessions of their own, out of
    reach of a process-group signal. They stop themselves with SIGINT once their parent is
    gone, which does nothing when SIGINT is ignored (inherited from a shell that started us in
    the background). Every such process names our run's folders, so the run directory is a
    safe marker."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_path(child: Managed, path: Path, timeout_s: float) -> None:
    """Block until `child` has created `path` (e.g. the socket it listens on); fail fast if
    it exits."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n"
                               f"{log_tail(child.log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} did not create {path} within {timeout_s:.0f} s:"
                               f"\n{log_tail(child.log_path)}")
        time.sleep(0.2)


def wait_for_port(child: Managed, host: str, port: int, timeout_s: float) -> None:
    """Block until `host:port` accepts connections; fail fast if the child exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n"
                               f"{log_tail(child.log_path)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{child.name} is not listening on {host}:{port} after {timeout_s:.0f} s:"
                       f"\n{log_tail(child.log_path)}")
