"""TLS and SuperNode-authentication material for a Flower deployment, made with `cryptography`.

Layout of a credentials folder (all private keys 0600):
    ca.crt, ca.key                 a private certificate authority (keep ca.key offline)
    server.crt, server.key         the SuperLink's certificate, signed by the CA, for `hosts`
    nodes/node-<i>, node-<i>.pub   one ECDSA P-384 key pair per SuperNode, OpenSSH format
                                   (the public keys are what `flwr supernode register` takes)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    """Paths of one credentials folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, index: int) -> Path:
        return self.folder / "nodes" / f"node-{index}"

    def node_public_key(self, index: int) -> Path:
        return self.folder / "nodes" / f"node-{index}.pub"


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write `path` afresh, created with its mode (0600 if `private`): a file that was there
    before is removed first, so its old, looser mode never carries over to a secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (it is kept in a 0600 file)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, public_key, issuer: x509.Name, signer,
                 *, ca: bool, hosts: list[str] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        builder = (builder.add_extension(_san(hosts), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    return builder.sign(signer, hashes.SHA384())


def create_credentials(folder: Path, *, num_nodes: int,
                       hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Credentials:
    """Create a CA, a SuperLink certificate valid for `hosts`, and `num_nodes` node key pairs.

    Existing files are kept (a CA is never silently replaced); only missing pieces are made,
    so adding phones later is `create_credentials(folder, num_nodes=more)`.
    """
    creds = Credentials(folder)
    if not creds.ca_cert.exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmilm CA")])
        ca_cert = _certificate("fedmilm CA", ca_key.public_key(), name, ca_key, ca=True)
        write_file(folder / "ca.key", private_pem(ca_key), private=True)
        write_file(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    if not creds.server_cert.exists():
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
        server_key = ec.generate_private_key(ec.SECP384R1())
        cert = _certificate("fedmilm superlink", server_key.public_key(), ca_cert.subject,
                            ca_key, ca=False, hosts=list(hosts))
        write_file(creds.server_key, private_pem(server_key), private=True)
        write_file(creds.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    for index in range(num_nodes):
        if creds.node_key(index).exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        write_file(creds.node_key(index), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()), private=True)
        write_file(creds.node_public_key(index), key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
            private=False)
    return creds
