"""The bridge's job board: at most one job per bridged phone, its transfers and its result.

A job is what the phone's relay asked for (one Flower train message), put on the board until
the phone has pulled it, uploaded its update in as many pieces as its connection allows and
reported its result, or until the round's deadline passes. Thread-safe: the HTTP server's
threads and the relay endpoints share it.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from dataclasses import dataclass, field

from fedmilm.export.job import JobResult, TrainJob


class JobGone(LookupError):
    """The job expired, was replaced by the next round's, or never belonged to this device."""


@dataclass(frozen=True)
class Offer:
    """What a phone learns about its job (`GET /v1/jobs/next`)."""

    id: str
    job: TrainJob
    bundle: str                   # the bundle's id: its manifest's sha256
    files: dict[str, dict]        # bundle file -> {"size", "sha256"}
    adapter: bytes                # every adapter tensor, float32 little-endian, manifest order
    upload_size: int              # bytes of the update the phone sends back
    clip_norm: float | None       # user-level DP: the L2 norm the phone clips its update to
    expires: float                # unix time: the round's deadline less a margin
    server_round: int

    def describe(self) -> dict:
        """The JSON answer of `GET /v1/jobs/next` (`schemas/offer.schema.json`)."""
        return {"id": self.id, "round": self.server_round, "job": json.loads(self.job.to_json()),
                "bundle": self.bundle, "files": self.files,
                "adapter": {"path": f"/v1/jobs/{self.id}/adapter", "size": len(self.adapter)},
                "update": {"path": f"/v1/jobs/{self.id}/update", "size": self.upload_size},
                "result": f"/v1/jobs/{self.id}/result", "clip_norm": self.clip_norm,
                "expires": math.floor(self.expires)}


@dataclass
class Job:
    offer: Offer
    device: str
    received: bytearray = field(default_factory=bytearray)
    result: JobResult | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def expired(self) -> bool:
        return time.time() >= self.offer.expires


def new_job_id() -> str:
    return secrets.token_urlsafe(18)


class Board:
    """Jobs by device; every accessor checks the job belongs to the asking device."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def post(self, device: str, offer: Offer) -> Job:
        """Put a new job up for `device`; any earlier one is gone."""
        job = Job(offer, device)
        with self._lock:
            old = self._jobs.get(device)
            self._jobs[device] = job
        if old is not None:
            old.done.set()
        return job

    def next_for(self, device: str) -> Offer | None:
        with self._lock:
            job = self._jobs.get(device)
        if job is None or job.expired or job.result is not None:
            return None
        return job.offer

    def job(self, device: str, job_id: str) -> Job:
        """`device`'s live job `job_id`; `JobGone` if there is none."""
        with self._lock:
            job = self._jobs.get(device)
        if job is None or not secrets.compare_digest(job.offer.id, job_id):
            raise JobGone("no such job for this device (expired, replaced or never offered)")
        if job.expired:
            raise JobGone("the job expired with its round's deadline")
        return job

    def append(self, device: str, job_id: str, offset: int, chunk: bytes) -> int:
        """Add a piece of the update at `offset` (= what the bridge holds: a phone resumes by
        asking for that first); the total it now holds."""
        job = self.job(device, job_id)
        with self._lock:
            if job.result is not None:
                raise ValueError("the job's result is in; the update cannot change")
            if offset != len(job.received):
                raise ValueError(f"offset {offset} is not the {len(job.received)} bytes held")
            if offset + len(chunk) > job.offer.upload_size:
                raise ValueError(f"the update has {job.offer.upload_size} bytes, not more")
            job.received += chunk
            return len(job.received)

    def finish(self, device: str, job_id: str, result: JobResult) -> None:
        """The phone's result: accepted once the whole update is in and the steps match."""
        job = self.job(device, job_id)
        with self._lock:
            if len(job.received) != job.offer.upload_size:
                raise ValueError(f"the update is incomplete: {len(job.received)} of "
                                 f"{job.offer.upload_size} bytes")
            if job.result is not None:
                raise ValueError("the job's result is already in")
            job.result = result
        job.done.set()

    def wait(self, job: Job) -> bool:
        """Block until `job` has its result (True) or expires or is replaced (False)."""
        job.done.wait(timeout=max(0.0, job.offer.expires - time.time()))
        return job.result is not None and self._jobs.get(job.device) is job
