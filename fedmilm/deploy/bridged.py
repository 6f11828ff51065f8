"""Bridged phones in a local deployment: the bridge's settings and each phone's own folder.

On a real phone the owner's app holds its interactions and is handed its enrolment code out of
band (a QR code); here `fedmilm-deploy` stages the same things in each bridged phone's device
folder, which is all the reference phone reads.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict
from pathlib import Path

from fedmilm.config import FedMilmConfig
from fedmilm.data import encode_all, load_user
from fedmilm.deploy.credentials import write_file
from fedmilm.model import load_tokenizer


def provision_phone(storage: Path, cfg: FedMilmConfig, partition: int, *, bridge_url: str,
                    ca_cert: Path | None) -> str:
    """Stage bridged phone `partition`'s folder: its settings, its tokenised interactions and a
    fresh one-time enrolment code. Returns the code's SHA-256 (all the bridge keeps); a phone
    that registered before keeps its key and needs no new code."""
    storage.mkdir(parents=True, exist_ok=True)
    settings = {"bridge": bridge_url, "device": str(partition),
                "ca": None if ca_cert is None else str(ca_cert), "insecure": ca_cert is None}
    (storage / "phone.json").write_text(json.dumps(settings, indent=2) + "\n")
    tokenizer = load_tokenizer(cfg.model)
    user = load_user(cfg.data, user=partition, seed=cfg.seed)
    lines = [json.dumps(asdict(e)) for e in encode_all(tokenizer, user.train, cfg.data.max_length)]
    write_file(storage / "interactions.jsonl", ("\n".join(lines) + "\n").encode(), private=True)
    code = secrets.token_urlsafe(24)
    write_file(storage / "enrolment", code.encode(), private=True)
    return hashlib.sha256(code.encode()).hexdigest()


def bridge_settings(*, host: str, port: int, cert: Path | None, key: Path | None, max_mb: int,
                    devices: dict[int, tuple[Path, str]]) -> str:
    """The bridge process's `--config` (JSON): where it listens, its TLS files, and per
    bridged device its link folder and enrolment code hash."""
    return json.dumps({"host": host, "port": port,
                       "cert": None if cert is None else str(cert),
                       "key": None if key is None else str(key), "max_mb": max_mb,
                       "devices": {str(i): {"partition": i, "link": str(link),
                                            "enrolment_sha256": code}
                                   for i, (link, code) in devices.items()}}, indent=2)
