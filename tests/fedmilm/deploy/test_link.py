"""The local link between a relay and its phone's endpoint: mutual authentication with the
device's own key, bounded frames, and an endpoint that survives bad peers."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmilm.deploy.link import (
    KEY_BYTES,
    LinkError,
    LinkPaths,
    ensure_key,
    private_folder,
    read_key,
    request,
    serve_forever,
)

MAX = 1 << 16


class Endpoint:
    """A link endpoint in a thread that echoes its request and counts what it handled."""

    def __init__(self, paths: LinkPaths, key: bytes) -> None:
        self.paths, self.handled, self.errors = paths, [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=serve_forever, args=(paths, key, self._handle),
                                       kwargs={"max_bytes": MAX, "on_error": self.errors.append,
                                               "stop": self.stop}, daemon=True)

    def _handle(self, frames: list[bytes]) -> list[bytes]:
        self.handled.append(frames)
        return [b"echo", *frames]


@pytest.fixture
def devices(tmp_path) -> Iterator[tuple[Endpoint, Endpoint]]:
    """Two devices' links (short paths: a Unix socket path has ~100 bytes), endpoints up."""
    endpoints = []
    for name in ("a", "b"):
        paths = private_folder(tmp_path / name)
        endpoints.append(Endpoint(paths, ensure_key(paths)))
        endpoints[-1].thread.start()
    for endpoint in endpoints:
        while not endpoint.paths.socket.exists():
            threading.Event().wait(0.01)
    yield endpoints[0], endpoints[1]
    for endpoint in endpoints:
        endpoint.stop.set()
        endpoint.thread.join(timeout=5)


def test_a_relay_with_its_devices_key_gets_its_reply(devices):
    a, _ = devices
    reply = request(a.paths, read_key(a.paths), [b"message", b""], max_bytes=MAX, timeout_s=5)
    assert reply == [b"echo", b"message", b""] and a.handled == [[b"message", b""]]


def test_another_devices_relay_is_refused_before_its_message_is_read(devices):
    a, b = devices
    with pytest.raises(LinkError, match="closed the link"):
        request(a.paths, read_key(b.paths), [b"steal"], max_bytes=MAX, timeout_s=5)
    assert a.handled == [] and any("refused" in e for e in a.errors)
    # and the endpoint still serves its own device afterwards
    assert request(a.paths, read_key(a.paths), [b"ok"], max_bytes=MAX, timeout_s=5)[1] == b"ok"


def test_a_relay_sends_nothing_to_an_endpoint_without_its_devices_key(tmp_path, devices):
    """An impostor listening where the relay looks cannot prove it holds this device's key:
    the relay checks the endpoint's proof and the message never leaves. (Here the impostor
    answers any proof with a made-up one.)"""
    a, _ = devices
    impostor = private_folder(tmp_path / "imp")
    received = []

    def impostor_endpoint(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(os.urandom(32))
            conn.recv(64)
            conn.sendall(os.urandom(32))
            received.append(conn.recv(1 << 16))  # b"" once the relay hangs up

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(impostor.socket))
        listener.listen(1)
        thread = threading.Thread(target=impostor_endpoint, args=(listener,))
        thread.start()
        with pytest.raises(LinkError, match="does not hold this device's link key"):
            request(impostor, read_key(a.paths), [b"private update"], max_bytes=MAX,
                    timeout_s=5)
        thread.join(timeout=5)
    assert received == [b""]


def test_oversized_requests_are_refused_before_they_are_read(devices):
    a, _ = devices
    with pytest.raises(LinkError):
        request(a.paths, read_key(a.paths), [b"x" * (MAX + 1)], max_bytes=MAX, timeout_s=5)
    assert a.handled == [] and any(f"{MAX:,} bytes" in e for e in a.errors)


def test_a_peer_that_lies_about_a_frames_length_costs_only_itself(devices):
    """A raw peer that stops mid-handshake or claims a huge frame count is dropped."""
    a, _ = devices
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(a.paths.socket))
        raw.recv(32)
        raw.sendall(os.urandom(10))  # a partial handshake, then gone
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # wrong proof, many frames
        raw.connect(str(a.paths.socket))
        raw.recv(32)
        raw.sendall(os.urandom(64) + struct.pack(">Q", 2**40))
        try:
            assert raw.recv(8) == b""
        except ConnectionResetError:
            pass
    assert a.handled == []
    assert request(a.paths, read_key(a.paths), [b"ok"], max_bytes=MAX, timeout_s=5)[1] == b"ok"


def test_keys_are_private_random_and_kept(tmp_path):
    paths = private_folder(tmp_path / "k")
    assert paths.folder.stat().st_mode & 0o777 == 0o700
    key = ensure_key(paths)
    assert len(key) == KEY_BYTES and paths.key.stat().st_mode & 0o777 == 0o600
    assert ensure_key(paths) == key  # a restarted endpoint keeps the device's key
    assert ensure_key(private_folder(tmp_path / "k2")) != key
    paths.key.chmod(0o644)
    with pytest.raises(LinkError, match="readable by others"):
        read_key(paths)
    paths.key.chmod(0o600)
    paths.key.write_bytes(b"short")
    with pytest.raises(LinkError, match="32-byte"):
        read_key(paths)


def test_a_socket_path_too_long_for_the_os_is_refused_in_one_line(tmp_path):
    with pytest.raises(LinkError, match="shorter run directory"):
        private_folder(tmp_path / ("x" * 120))


def test_no_endpoint_is_one_clear_error(tmp_path):
    paths = private_folder(tmp_path / "none")
    with pytest.raises(LinkError, match="no phone endpoint"):
        request(paths, ensure_key(paths), [b"x"], max_bytes=MAX, timeout_s=1)


def test_the_socket_only_admits_its_owner(devices):
    a, _ = devices
    assert Path(a.paths.socket).stat().st_mode & 0o077 == 0
