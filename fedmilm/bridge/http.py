"""The bridge's HTTPS server: registration, jobs, resumable downloads and uploads (PROTOCOL.md).

Every request except registration is signed by the phone's registered key
(`fedmilm.bridge.signing`); every body is bounded by its declared length before it is read and
validated before it is used; every refusal is one JSON line `{"error": ...}` with a status
code, and costs only that request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fedmilm.bridge.board import Board, JobGone
from fedmilm.bridge.signing import SignatureError, Verifier, load_public
from fedmilm.export.job import JobResult
from fedmilm.export.manifest import MANIFEST_FILE, Manifest, inside

log = logging.getLogger("fedmilm.bridge")

MAX_CHUNK = 8 << 20        # bytes of one upload request
MAX_SMALL_BODY = 8 << 10   # registration and result bodies
SEND_CHUNK = 1 << 20
DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
JOB_ID = r"(?P<job>[A-Za-z0-9_-]{8,64})"
ROUTES = [("POST", re.compile(r"/v1/register"), "_register"),
          ("GET", re.compile(r"/v1/jobs/next"), "_next_job"),
          ("GET", re.compile(r"/v1/bundles/(?P<bundle>[0-9a-f]{64})/(?P<name>[A-Za-z0-9_.-]+)"),
           "_bundle_file"),
          ("GET", re.compile(rf"/v1/jobs/{JOB_ID}/adapter"), "_adapter"),
          ("GET", re.compile(rf"/v1/jobs/{JOB_ID}/update"), "_update_held"),
          ("PUT", re.compile(rf"/v1/jobs/{JOB_ID}/update"), "_update_piece"),
          ("POST", re.compile(rf"/v1/jobs/{JOB_ID}/result"), "_result")]


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class BundleFiles:
    """An exported bundle as the bridge serves it: the files a phone needs, sizes, digests."""

    folder: Path
    files: dict[str, dict]

    @staticmethod
    def of(folder: Path) -> tuple[str, BundleFiles]:
        """(bundle id = the manifest's sha256, its files) for an exported bundle folder. The
        other files' digests are the manifest's own (the base is not read again): a file on
        disk that no longer matches is refused by the phone, as by any runtime."""
        manifest = Manifest.read(folder)
        raw = (folder / MANIFEST_FILE).read_bytes()
        digests = {**manifest.sha256, manifest.base.file: manifest.base.sha256}
        files = {MANIFEST_FILE: {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}
        for name, digest in sorted(digests.items()):
            path = inside(folder, name, f"{folder}/{MANIFEST_FILE}")
            files[name] = {"size": path.stat().st_size, "sha256": digest}
        return files[MANIFEST_FILE]["sha256"], BundleFiles(folder, files)


class Enrolment:
    """One-time enrolment codes per device (only their SHA-256 is kept)."""

    def __init__(self, code_hashes: dict[str, str]) -> None:
        self._hashes, self._lock = dict(code_hashes), threading.Lock()

    def redeem(self, device: str, code: str) -> bool:
        given = hashlib.sha256(code.encode()).hexdigest()
        with self._lock:
            expected = self._hashes.get(device)
            if expected is None or not hmac.compare_digest(given, expected):
                return False
            del self._hashes[device]
            return True


class Bridge:
    """State shared by the request handlers."""

    def __init__(self, board: Board, verifier: Verifier, enrolment: Enrolment) -> None:
        self.board, self.verifier, self.enrolment = board, verifier, enrolment
        self.bundles: dict[str, BundleFiles] = {}
        self._lock = threading.Lock()

    def bundle(self, folder: Path) -> tuple[str, BundleFiles]:
        """Serve the bundle in `folder` (hashed once per folder)."""
        with self._lock:
            for bundle_id, files in self.bundles.items():
                if files.folder == folder:
                    return bundle_id, files
            bundle_id, files = BundleFiles.of(folder)
            self.bundles[bundle_id] = files
            return bundle_id, files


class Handler(BaseHTTPRequestHandler):
    server: BridgeServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # a connection silent this long is dropped (its TLS handshake included)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        """No access log (a phone's polling is not news); refusals are logged in `_refuse`."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # ---- plumbing
    def _dispatch(self, method: str) -> None:
        try:
            path = urlsplit(self.path).path
            for verb, pattern, handler in ROUTES:
                match = pattern.fullmatch(path)
                if match and verb == method:
                    getattr(self, handler)(**match.groupdict())
                    return
            raise Refused(404, f"no {method} {path}")
        except Refused as err:
            self._refuse(err.status, str(err))
        except JobGone as err:
            self._refuse(410, str(err))
        except SignatureError as err:
            self._refuse(401, str(err))
        except (ValueError, UnicodeDecodeError) as err:
            self._refuse(400, str(err).splitlines()[0][:300])

    def _refuse(self, status: int, reason: str) -> None:
        log.info("bridge: %d for %s %s: %s", status, self.command, urlsplit(self.path).path,
                 reason)
        self._send_json(status, {"error": reason[:300]})

    def _send_json(self, status: int, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _no_content(self) -> None:
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body(self, limit: int) -> bytes:
        """The request body, refused before it is read if its declared length is over `limit`."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            if self.command == "GET":
                return b""
            raise Refused(411, "Content-Length is required")
        if int(length) > limit:
            self.close_connection = True
            raise Refused(413, f"a body of {int(length):,} bytes is over the {limit:,} allowed")
        return self.rfile.read(int(length))

    def _signed(self, body: bytes = b"") -> str:
        return self.server.bridge.verifier.verify(self.command, self.path, self.headers, body)

    def _send_bytes(self, size: int, read: Callable[[int, int], bytes]) -> None:
        """Bytes [start, size) of a resource, honouring `Range: bytes=start-` (resume)."""
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted is not None:
            match = re.fullmatch(r"bytes=(\d+)-", wanted.strip())
            if not match or int(match.group(1)) > size:
                raise Refused(416, f"only 'Range: bytes=N-' with N <= {size} is served")
            start, status = int(match.group(1)), 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        for offset in range(start, size, SEND_CHUNK):
            self.wfile.write(read(offset, min(SEND_CHUNK, size - offset)))

    # ---- routes
    def _register(self) -> None:
        """`{"device", "public_key", "enrolment"}`: bind the phone's key to its device once."""
        try:
            request = json.loads(self._body(MAX_SMALL_BODY))
            device, pem, code = request["device"], request["public_key"], request["enrolment"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise Refused(400, "registration needs device, public_key and enrolment") from err
        if not isinstance(device, str) or not DEVICE_ID.fullmatch(device) or not isinstance(
                code, str):
            raise Refused(400, "device must be 1-64 letters, digits, '-' or '_'")
        bridge = self.server.bridge
        try:
            load_public(pem)  # a malformed key must not burn the code
        except SignatureError as err:
            raise Refused(400, str(err)) from err
        if not bridge.enrolment.redeem(device, code):
            raise Refused(403, "unknown device or enrolment code already used")
        bridge.verifier.register(device, pem)
        log.info("bridge: device %s registered its key", device)
        self._no_content()

    def _next_job(self) -> None:
        device = self._signed()
        offer = self.server.bridge.board.next_for(device)
        if offer is None:
            self._no_content()
        else:
            self._send_json(200, offer.describe())

    def _bundle_file(self, bundle: str, name: str) -> None:
        self._signed()
        files = self.server.bridge.bundles.get(bundle)
        if files is None or name not in files.files:
            raise Refused(404, "no such bundle file")
        path = files.folder / name

        def read(offset: int, size: int) -> bytes:
            with open(path, "rb") as data:
                data.seek(offset)
                return data.read(size)

        self._send_bytes(files.files[name]["size"], read)

    def _adapter(self, job: str) -> None:
        device = self._signed()
        adapter = self.server.bridge.board.job(device, job).offer.adapter
        self._send_bytes(len(adapter), lambda offset, size: adapter[offset:offset + size])

    def _update_held(self, job: str) -> None:
        device = self._signed()
        held = self.server.bridge.board.job(device, job).received
        self._send_json(200, {"received": len(held)})

    def _update_piece(self, job: str) -> None:
        query = parse_qs(urlsplit(self.path).query)
        offset = query.get("offset", [""])[0]
        if not offset.isdigit():
            raise Refused(400, "PUT .../update needs ?offset=N (the bytes the bridge holds)")
        body = self._body(MAX_CHUNK)
        device = self._signed(body)
        try:
            held = self.server.bridge.board.append(device, job, int(offset), body)
        except ValueError as err:
            raise Refused(409, str(err)) from err
        self._send_json(200, {"received": held})

    def _result(self, job: str) -> None:
        body = self._body(MAX_SMALL_BODY)
        device = self._signed(body)
        self.server.bridge.board.job(device, job)  # a gone job is 410 whatever the body
        result = JobResult.from_json(body.decode())
        try:
            self.server.bridge.board.finish(device, job, result)
        except ValueError as err:
            raise Refused(409, str(err)) from err
        self._no_content()


class BridgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], bridge: Bridge,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(address, Handler)
        self.bridge = bridge
        if tls is not None:
            # the handshake runs in the request's thread: a slow phone never blocks accept()
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ with the deployment's server certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context
