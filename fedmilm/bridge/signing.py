"""Signed bridge requests: a phone proves each request with its own ECDSA P-256 key.

Like a SuperNode's key, the phone's key pair is made on the phone and only the public half is
registered (once, with a one-time enrolment code the operator hands the phone's owner). Every
later request carries the device id, a timestamp, a fresh nonce and a signature over the
method, the path with its query, those three and the body's SHA-256: a captured request cannot
be replayed (nonce, time window), re-aimed (path) or altered (body), and a phone cannot act for
another device (its signature verifies only with its own registered key).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DEVICE, TIME, NONCE, SIGNATURE = ("X-Fedmilm-Device", "X-Fedmilm-Time", "X-Fedmilm-Nonce",
                                  "X-Fedmilm-Signature")
MAX_SKEW_S = 300       # a request's timestamp must be this close to the bridge's clock
MAX_PUBLIC_KEY = 1024  # bytes of a PEM public key


class SignatureError(ValueError):
    """A request that does not prove who sent it (one line, safe to return to the caller)."""


def canonical(method: str, target: str, device: str, timestamp: str, nonce: str,
              body: bytes) -> bytes:
    """The bytes a request's signature covers."""
    return "\n".join(["fedmilm-bridge-v1", method.upper(), target, device, timestamp, nonce,
                      hashlib.sha256(body).hexdigest()]).encode()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def load_private(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public(pem: str) -> ec.EllipticCurvePublicKey:
    """A registered public key: PEM, P-256 only; `SignatureError` for anything else."""
    if not isinstance(pem, str) or len(pem) > MAX_PUBLIC_KEY:
        raise SignatureError("public_key must be a PEM string of at most 1024 bytes")
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as err:
        raise SignatureError("public_key is not a PEM public key") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SignatureError("public_key must be an EC P-256 key")
    return key


def sign(key: ec.EllipticCurvePrivateKey, device: str, method: str, target: str,
         body: bytes = b"") -> dict[str, str]:
    """The headers that prove a request (the phone's side)."""
    timestamp, nonce = str(int(time.time())), secrets.token_urlsafe(16)
    signature = key.sign(canonical(method, target, device, timestamp, nonce, body),
                         ec.ECDSA(hashes.SHA256()))
    return {DEVICE: device, TIME: timestamp, NONCE: nonce,
            SIGNATURE: base64.b64encode(signature).decode()}


class Verifier:
    """The bridge's side: registered keys per device, and the nonces seen within the window."""

    def __init__(self) -> None:
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def register(self, device: str, pem: str) -> None:
        key = load_public(pem)
        with self._lock:
            self._keys[device] = key

    def registered(self, device: str) -> bool:
        return device in self._keys

    def verify(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> str:
        """The device that signed this request; `SignatureError` otherwise."""
        device, timestamp = headers.get(DEVICE, ""), headers.get(TIME, "")
        nonce, signature = headers.get(NONCE, ""), headers.get(SIGNATURE, "")
        key = self._keys.get(device)
        if key is None:
            raise SignatureError("unknown device: register its key first")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_SKEW_S:
            raise SignatureError(f"request time is not within {MAX_SKEW_S} s of the bridge's")
        if not 16 <= len(nonce) <= 64:
            raise SignatureError("request nonce missing or malformed")
        try:
            key.verify(base64.b64decode(signature, validate=True),
                       canonical(method, target, device, timestamp, nonce, body),
                       ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as err:
            raise SignatureError("bad request signature") from err
        with self._lock:
            now = time.time()
            self._seen = {n: t for n, t in self._seen.items() if now - t < 2 * MAX_SKEW_S}
            if nonce in self._seen:
                raise SignatureError("replayed request")
            self._seen[nonce] = now
        return device
