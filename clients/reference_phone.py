"""The reference phone: what the Android app does, step for step, in Python, with nothing but
HTTPS and the ExecuTorch runtime (no Flower, no PyTorch model). It is how we test the bridge
and the Kotlin sample's protocol against a real federation.

Its storage folder is its whole world: `phone.json` (the bridge's address, its device id, the
CA it trusts), `interactions.jsonl` (its tokenised private interactions), `enrolment` (a
one-time code, deleted once its key is registered), `key.pem` (its own signing key, made here,
never sent), `bundles/` (downloaded once, verified), `personal/` (its personal adapter, never
sent) and `progress.json` (where it is, for its owner).

    python -m fedmilm.clients.reference_phone --storage DIR [--once] [--poll-s 1]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import shutil
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fedmilm.bridge import floats
from fedmilm.bridge.signing import load_private, new_key, public_pem, sign
from fedmilm.data.chat import Example
from fedmilm.deploy.credentials import private_pem, write_file
from fedmilm.export.job import JobResult, TrainJob
from fedmilm.export.ptd import adapter_to_ptd, ptd_to_adapter
from fedmilm.export.runtime import PhonePrograms, train_with_programs
from fedmilm.privacy.user_level import clip_update

log = logging.getLogger("fedmilm.phone")
DOWNLOAD_PIECE = 1 << 20


class Expired(Exception):
    """The job is gone (410): its round's deadline passed, or a newer job replaced it."""


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class BridgeClient:
    """Signed HTTPS requests to the bridge (a fresh connection each: phones roam)."""

    def __init__(self, storage: Path) -> None:
        settings = json.loads((storage / "phone.json").read_text())
        self.url, self.device = urlsplit(settings["bridge"]), str(settings["device"])
        if self.url.scheme != "https" and not settings.get("insecure"):
            raise ValueError("the bridge must be reached over https")
        self.tls = (ssl.create_default_context(cafile=settings["ca"])
                    if self.url.scheme == "https" else None)
        self.storage = storage
        self.key = self._own_key()

    def _own_key(self):  # noqa: ANN202 - cryptography's private key type
        path = self.storage / "key.pem"
        if not path.is_file():
            write_file(path, private_pem(new_key()), private=True)
        return load_private(path.read_bytes())

    def request(self, method: str, target: str, body: bytes = b"", *, signed: bool = True,
                headers: dict[str, str] | None = None, timeout: float = 60) -> Answer:
        all_headers = {"Content-Length": str(len(body)), **(headers or {})}
        if signed:
            all_headers.update(sign(self.key, self.device, method, target, body))
        kind = http.client.HTTPSConnection if self.tls else http.client.HTTPConnection
        options = {"context": self.tls} if self.tls else {}
        conn = kind(self.url.hostname, self.url.port, timeout=timeout, **options)
        try:
            conn.request(method, target, body=body, headers=all_headers)
            response = conn.getresponse()
            return Answer(response.status, response.read())
        finally:
            conn.close()

    def checked(self, method: str, target: str, body: bytes = b"", *,
                ok: tuple[int, ...] = (200, 204), **options) -> Answer:  # noqa: ANN003
        answer = self.request(method, target, body, **options)
        if answer.status == 410:
            raise Expired(target)
        if answer.status not in ok:
            raise RuntimeError(f"{method} {target}: {answer.status} {answer.body[:200]!r}")
        return answer

    def register(self) -> None:
        """Register this phone's public key once, with its one-time enrolment code."""
        code_file = self.storage / "enrolment"
        if not code_file.is_file():
            return  # registered before
        body = json.dumps({"device": self.device, "public_key": public_pem(self.key),
                           "enrolment": code_file.read_text().strip()}).encode()
        self.checked("POST", "/v1/register", body, signed=False)
        code_file.unlink()
        log.info("phone %s: key registered", self.device)

    def download(self, target: str, dest: Path, size: int) -> None:
        """`target` into `dest`, resuming from what a dropped connection left in `dest`."""
        while (held := dest.stat().st_size if dest.exists() else 0) < size:
            answer = self.checked("GET", target, headers={"Range": f"bytes={held}-"},
                                  ok=(200, 206))
            mode = "ab" if answer.status == 206 else "wb"
            with open(dest, mode) as out:
                out.write(answer.body)
        if dest.stat().st_size != size:
            dest.unlink()
            raise RuntimeError(f"{target} is larger than announced")


class ReferencePhone:
    def __init__(self, storage: Path, *, upload_piece: int = 1 << 20) -> None:
        self.storage, self.upload_piece = storage, upload_piece
        self.bridge = BridgeClient(storage)
        self._programs: dict[str, PhonePrograms] = {}

    def progress(self, **state: object) -> None:
        path = self.storage / "progress.json"
        path.with_suffix(".tmp").write_text(json.dumps(state))
        path.with_suffix(".tmp").replace(path)

    def examples(self) -> list[Example]:
        lines = (self.storage / "interactions.jsonl").read_text().splitlines()
        return [Example(**json.loads(line)) for line in lines if line.strip()]

    def bundle(self, offer: dict) -> PhonePrograms:
        """The job's bundle: downloaded once (resumably), every file checked against the
        sizes and digests the job lists, then loaded (which checks the manifest's digests)."""
        bundle_id = offer["bundle"]
        if bundle_id in self._programs:
            return self._programs[bundle_id]
        final = self.storage / "bundles" / bundle_id
        if not final.is_dir():
            partial = final.with_suffix(".partial")
            partial.mkdir(parents=True, exist_ok=True)
            for name, spec in offer["files"].items():
                if Path(name).name != name:
                    raise ValueError(f"bundle file name {name!r} is not a plain file name")
                dest = partial / name
                self.progress(job=offer["id"], phase="bundle", file=name)
                self.bridge.download(f"/v1/bundles/{bundle_id}/{name}", dest, spec["size"])
                if _sha256(dest) != spec["sha256"]:
                    dest.unlink()
                    raise ValueError(f"bundle file {name} does not match its digest")
            if _sha256(partial / "manifest.json") != bundle_id:
                raise ValueError("the bundle's manifest is not the one the job names")
            partial.rename(final)
        self._programs = {bundle_id: PhonePrograms.load(final)}  # one bundle in memory
        return self._programs[bundle_id]

    def run_job(self, offer: dict) -> None:
        """One job: bundle, adapter, train, keep the personal part, upload the update."""
        job_id = offer["id"]
        job = TrainJob.from_json(json.dumps(offer["job"]))
        programs = self.bundle(offer)
        manifest = programs.manifest
        shapes = [t.shape for t in manifest.adapter]
        if offer["adapter"]["size"] != floats.size_of(shapes):
            raise ValueError("the job's adapter does not fit the bundle's manifest")
        folder = self.storage / "jobs" / job_id
        for old in (self.storage / "jobs").glob("*"):  # left by a job that expired or crashed
            if old.name != job_id:
                shutil.rmtree(old, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        self.progress(job=job_id, phase="adapter")
        self.bridge.download(offer["adapter"]["path"], folder / "adapter.f32",
                             offer["adapter"]["size"])
        received = dict(zip(manifest.peft_keys(), floats.unpack(
            (folder / "adapter.f32").read_bytes(), shapes), strict=True))
        state = {**received, **self.personal(manifest)}
        self.progress(job=job_id, phase="training")
        trained_ptd, result = train_with_programs(programs, adapter_to_ptd(manifest, state),
                                                  self.examples(), job)
        trained = ptd_to_adapter(manifest, trained_ptd)
        self.save_personal(manifest, trained)  # never leaves the phone
        global_keys = [t.peft_key for t in manifest.adapter if t.part == "global"]
        update = {k: trained[k] - received[k] for k in global_keys}
        if offer.get("clip_norm") is not None:  # user-level DP: bounded before it leaves
            update = clip_update(update, float(offer["clip_norm"]))
        self.upload(offer, floats.pack([update[k] for k in global_keys]))
        self.bridge.checked("POST", offer["result"], released(offer, result).to_json().encode())
        shutil.rmtree(folder, ignore_errors=True)
        self.progress(job=job_id, phase="done", round=offer["round"])
        log.info("phone %s: job of round %d done", self.bridge.device, offer["round"])

    def upload(self, offer: dict, blob: bytes) -> None:
        """The update in pieces; after a dropped connection, ask what the bridge holds and go
        on from there."""
        if len(blob) != offer["update"]["size"]:
            raise ValueError("the update does not have the size the job announced")
        path = offer["update"]["path"]
        held = self.bridge.checked("GET", path).json()["received"]
        while held < len(blob):
            self.progress(job=offer["id"], phase="upload", sent=held)
            try:
                piece = blob[held:held + self.upload_piece]
                held = self.bridge.checked("PUT", f"{path}?offset={held}", piece).json()[
                    "received"]
            except OSError:
                time.sleep(1)
                held = self.bridge.checked("GET", path).json()["received"]

    def personal(self, manifest) -> dict:  # noqa: ANN001 - Manifest
        """Its personal tensors, if it trained before (else the job's initial values)."""
        tensors = {}
        for t in manifest.adapter:
            path = self.storage / "personal" / f"{t.program_key}.f32"
            if t.part == "personal" and path.is_file():
                tensors[t.peft_key] = floats.unpack(path.read_bytes(), [t.shape])[0]
        return tensors

    def save_personal(self, manifest, trained: dict) -> None:  # noqa: ANN001 - Manifest
        folder = self.storage / "personal"
        folder.mkdir(mode=0o700, exist_ok=True)
        for t in manifest.adapter:
            if t.part == "personal":
                tmp = folder / f"{t.program_key}.tmp"
                tmp.write_bytes(floats.pack([trained[t.peft_key]]))
                tmp.replace(folder / f"{t.program_key}.f32")  # atomic

    def poll(self) -> bool:
        """Do the next job if there is one; whether there was."""
        answer = self.bridge.checked("GET", "/v1/jobs/next")
        if answer.status == 204:
            return False
        offer = answer.json()
        try:
            self.run_job(offer)
        except Expired:
            log.warning("phone %s: job of round %s expired before it was done",
                        self.bridge.device, offer.get("round"))
        return True


def released(offer: dict, result: JobResult) -> JobResult:
    """What the phone tells about its training: under user-level DP (the offer has a clip)
    nothing derived from its data leaves it but the clipped update, so every count is 0."""
    if offer.get("clip_norm") is None:
        return result
    return JobResult(steps=0, examples=0, tokens=0, loss=0.0, seconds=0.0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(DOWNLOAD_PIECE):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, type=Path, help="the phone's own folder")
    parser.add_argument("--poll-s", type=float, default=1.0, help="wait between job checks")
    parser.add_argument("--upload-piece-kb", type=int, default=1024)
    parser.add_argument("--once", action="store_true", help="one job (or none), then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    phone = ReferencePhone(args.storage, upload_piece=args.upload_piece_kb << 10)
    while True:
        try:
            phone.bridge.register()  # once; until then the bridge may not be up yet
            worked = phone.poll()
        except (OSError, RuntimeError, ValueError) as err:
            log.warning("phone %s: %s", phone.bridge.device, err)
            worked = False
        if args.once:
            return
        if not worked:
            time.sleep(args.poll_s)


if __name__ == "__main__":
    sys.exit(main())
