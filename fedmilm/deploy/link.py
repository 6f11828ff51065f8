"""The local link between a phone's relay ClientApp and the long-lived process that does the
phone's work (its warm phone service, or the bridge that stands for an HTTP phone).

A Unix socket in a folder only the device's owner can enter, and on top of it a mutual
challenge-response with a key only that device's relay and endpoint hold (HMAC-SHA256 over
both sides' fresh nonces): a process that can reach the socket but lacks the device's key
(another device's relay, another user's process) learns nothing and is refused before a
single byte of a message is read. Each connection carries one request and one reply as
length-prefixed frames, bounded before they are read. Imports nothing heavy: the relay runs
in a fresh process for every Flower message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedmilm.deploy.credentials import write_file

KEY_BYTES = 32
NONCE_BYTES = 32
IDLE_S = 60.0  # a peer silent this long mid-request is dropped
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux; keep a margin
_LENGTH = struct.Struct(">Q")


class LinkError(RuntimeError):
    """The link failed: no endpoint, a wrong key, a broken or oversized frame."""


class NoEndpoint(LinkError):
    """Nothing listens on the device's socket (yet: an endpoint may be restarting)."""


class LinkClosed(LinkError):
    """The other side hung up mid-exchange (it refused us, or it stopped)."""


@dataclass(frozen=True)
class LinkPaths:
    """Where one device's link lives: its socket and its key, in a private folder."""

    folder: Path

    @property
    def socket(self) -> Path:
        return self.folder / "sock"

    @property
    def key(self) -> Path:
        return self.folder / "key"


def private_folder(folder: Path) -> LinkPaths:
    """Create (or tighten) the link folder: mode 0700, so only its owner reaches the socket."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    paths = LinkPaths(folder)
    if len(os.fsencode(paths.socket)) > MAX_SOCKET_PATH:
        raise LinkError(f"{paths.socket} is longer than {MAX_SOCKET_PATH} bytes, the limit of a "
                        "Unix socket path; use a shorter run directory")
    return paths


def ensure_key(paths: LinkPaths) -> bytes:
    """The device's link key: made once from the OS CSPRNG (mode 0600), then kept, so a
    restarted endpoint and the device's relays still share it."""
    if not paths.key.is_file():
        write_file(paths.key, secrets.token_bytes(KEY_BYTES), private=True)
    return read_key(paths)


def read_key(paths: LinkPaths) -> bytes:
    """The device's link key; refused if others could read it or it has the wrong size."""
    try:
        info = paths.key.stat()
        key = paths.key.read_bytes()
    except OSError as err:
        raise LinkError(f"no link key at {paths.key}: {err.strerror}") from err
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise LinkError(f"{paths.key} is readable by others; it must be mode 0600")
    if len(key) != KEY_BYTES:
        raise LinkError(f"{paths.key} is not a {KEY_BYTES}-byte link key")
    return key


def _proof(key: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(key, role + server_nonce + client_nonce, hashlib.sha256).digest()


def _read_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise LinkClosed("the other side closed the link mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_frames(conn: socket.socket, frames: list[bytes]) -> None:
    """The frame count, then each frame after its length. An empty frame is not written at
    all: the peer has everything once it has the length and may already have closed."""
    conn.sendall(_LENGTH.pack(len(frames)))
    for frame in frames:
        conn.sendall(_LENGTH.pack(len(frame)))
        if frame:
            conn.sendall(frame)


def read_frames(conn: socket.socket, max_bytes: int, max_frames: int = 4) -> list[bytes]:
    """Frames of one request or reply; the sizes are checked before anything is read."""
    (count,) = _LENGTH.unpack(_read_exact(conn, _LENGTH.size))
    if count > max_frames:
        raise LinkError(f"{count} frames, at most {max_frames} are allowed")
    frames, total = [], 0
    for _ in range(count):
        (size,) = _LENGTH.unpack(_read_exact(conn, _LENGTH.size))
        total += size
        if total > max_bytes:
            raise LinkError(f"a message over {max_bytes:,} bytes is refused")
        frames.append(_read_exact(conn, size))
    return frames


def accept_peer(conn: socket.socket, key: bytes) -> None:
    """Endpoint side of the handshake; `LinkError` if the peer does not hold `key`."""
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    conn.sendall(server_nonce)
    client_nonce = _read_exact(conn, NONCE_BYTES)
    claimed = _read_exact(conn, hashlib.sha256().digest_size)
    if not hmac.compare_digest(claimed, _proof(key, b"relay", server_nonce, client_nonce)):
        raise LinkError("a peer without this device's link key was refused")
    conn.sendall(_proof(key, b"endpoint", server_nonce, client_nonce))


def serve_forever(paths: LinkPaths, key: bytes, handle: Callable[[list[bytes]], list[bytes]],
                  *, max_bytes: int, on_error: Callable[[str], None],
                  stop: threading.Event | None = None) -> None:
    """Answer one authenticated request per connection with `handle`, one at a time (a phone
    does one thing at a time), until `stop` is set. A refused, stalled (`IDLE_S` without a
    byte) or broken connection costs only itself."""
    with bind(paths) as listener:
        listener.settimeout(0.5)  # to notice `stop`
        while stop is None or not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(IDLE_S)
                try:
                    accept_peer(conn, key)
                    reply = handle(read_frames(conn, max_bytes))
                    send_frames(conn, reply)
                except (LinkError, OSError) as err:
                    on_error(str(err) or type(err).__name__)


def bind(paths: LinkPaths) -> socket.socket:
    """A listening Unix socket at `paths.socket` (a stale one from a crashed endpoint is
    replaced); only the owner may connect (mode 0600 inside a 0700 folder)."""
    paths.socket.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(paths.socket))
    finally:
        os.umask(old)
    listener.listen(8)
    return listener


def request(paths: LinkPaths, key: bytes, frames: list[bytes], *, max_bytes: int,
            timeout_s: float | None) -> list[bytes]:
    """Relay side: authenticate both ways, send one request, wait for its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        try:
            conn.connect(str(paths.socket))
        except OSError as err:
            raise NoEndpoint(f"no phone endpoint at {paths.socket}: {err.strerror}") from err
        try:
            server_nonce = _read_exact(conn, NONCE_BYTES)
            client_nonce = secrets.token_bytes(NONCE_BYTES)
            conn.sendall(client_nonce + _proof(key, b"relay", server_nonce, client_nonce))
            answer = _read_exact(conn, hashlib.sha256().digest_size)
            if not hmac.compare_digest(answer, _proof(key, b"endpoint", server_nonce,
                                                      client_nonce)):
                raise LinkError("the endpoint does not hold this device's link key")
            send_frames(conn, frames)
            return read_frames(conn, max_bytes)
        except TimeoutError as err:
            raise LinkError(f"the phone endpoint did not answer within {timeout_s:.0f} s") from err
        except (OSError, LinkClosed) as err:
            raise LinkClosed("the phone endpoint closed the link (refused, or it stopped "
                             "mid-message)") from err
