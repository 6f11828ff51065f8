"""The bridge process: phones that speak only HTTPS join the Flower federation through it.

Each bridged phone has a SuperNode (its own registered key) whose relay ClientApp
(`fedmilm.clients.entry`) hands every message over the device's authenticated local link to
this process, exactly as a warm phone's relay does to its service. Here a train message
becomes a job on the board (`fedmilm.bridge.board`); the phone pulls it over HTTPS
(`fedmilm.bridge.http`), trains with the exported programs, uploads its update and result; the
update goes back to the relay as the phone's reply. A phone that does not finish before the
round's deadline costs that reply only. Bridged phones do not evaluate (they decline).

Scale: one SuperNode and one relay per bridged phone is right for pilots of tens of phones; a
fleet needs the bridge to be one Flower node that multiplexes many phones (a SuperNode speaking
for a cohort), which Flower 1.42 does not offer.

    python -m fedmilm.clients.bridge --config bridge.json
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedmilm import protocol
from fedmilm.adapters import State, wire
from fedmilm.bridge import floats
from fedmilm.bridge.board import Board, Offer, new_job_id
from fedmilm.bridge.http import Bridge, BridgeServer, Enrolment, server_tls
from fedmilm.bridge.limits import bridged_problems
from fedmilm.bridge.signing import Verifier
from fedmilm.clients.app import received_global
from fedmilm.clients.phone import config_from_text
from fedmilm.clients.service import answer
from fedmilm.deploy.link import private_folder, read_key, serve_forever
from fedmilm.export.job import TrainJob
from fedmilm.export.manifest import INITIAL_ADAPTER, Manifest
from fedmilm.export.ptd import ptd_to_adapter
from fedmilm.privacy.randomness import SecureRandom
from fedmilm.training.skeleton import planned_steps

log = logging.getLogger("fedmilm.bridge")
REPLY_MARGIN_S = 3.0  # a job expires this long before the round's deadline: the reply must travel


@lru_cache(maxsize=2)
def _initial(folder: str) -> State:
    manifest = Manifest.read(Path(folder))
    return ptd_to_adapter(manifest, (Path(folder) / INITIAL_ADAPTER).read_bytes())


@dataclass
class BridgedPhone:
    """The link endpoint of one bridged phone: Flower messages in, jobs out."""

    device: str
    partition: int
    bridge: Bridge

    def handle(self, frames: list[bytes]) -> list[bytes]:
        return answer(frames, lambda message, _: self._reply(message),
                      f"bridged phone {self.device}")

    def _reply(self, message: Message) -> Message:
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:
            values = {protocol.DEVICE_ID: self.partition}
        elif kind == MessageType.EVALUATE:
            values = {protocol.DECLINED: protocol.DECLINED_EVALUATION}
        elif kind == MessageType.TRAIN:
            return self._train(message)
        else:
            raise ValueError(f"a bridged phone answers no {kind} messages")
        return Message(content=RecordDict({protocol.METRICS: MetricRecord(values)}),
                       reply_to=message)

    def _train(self, message: Message) -> Message:
        config = message.content.config_records[protocol.CONFIG]
        cfg = config_from_text(str(config[protocol.RUN_CONFIG]))
        problems = bridged_problems(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        folder = Path(str(cfg.client.export_dir))
        bundle_id, files = self.bridge.bundle(folder)
        manifest = Manifest.read(folder)
        received = received_global(message, cfg)
        global_keys = [t.peft_key for t in manifest.adapter if t.part == "global"]
        if set(received) != set(global_keys):
            raise ValueError("the server's global part does not match the bundle's adapter")
        adapter = {**_initial(str(folder)), **received}
        deadline = float(config.get(protocol.DEADLINE, time.time()
                                    + cfg.federation.round_timeout_s))
        offer = Offer(id=new_job_id(), server_round=int(config[protocol.SERVER_ROUND]),
                      job=TrainJob(epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                                   sampling="shuffle", noise_multiplier=None,
                                   max_grad_norm=None),
                      bundle=bundle_id, files=files.files,
                      adapter=floats.pack([adapter[k] for k in manifest.peft_keys()]),
                      upload_size=floats.size_of([list(received[k].shape)
                                                   for k in global_keys]),
                      clip_norm=cfg.privacy.user.clip_norm if cfg.privacy.user_level else None,
                      expires=deadline - REPLY_MARGIN_S)
        job = self.bridge.board.post(self.device, offer)
        # under user-level DP who takes part is secret from log readers (as on the server)
        say = log.debug if cfg.privacy.user_level else log.info
        say("round %d: job for bridged phone %s, due in %.0f s", offer.server_round,
            self.device, offer.expires - time.time())
        if not self.bridge.board.wait(job):
            raise TimeoutError("the phone did not finish its job before the round's deadline")
        assert job.result is not None
        update = dict(zip(global_keys, floats.unpack(bytes(job.received), [
            list(received[k].shape) for k in global_keys]), strict=True))
        result = job.result
        if cfg.privacy.any_dp:  # only the clipped update; nothing derived from the data
            metrics = MetricRecord({})
        else:
            examples = result.examples // cfg.train.epochs
            if result.steps != planned_steps(examples, epochs=cfg.train.epochs,
                                             batch_size=cfg.train.batch_size):
                raise ValueError(f"the phone ran {result.steps} steps for {examples} examples; "
                                 "its result is discarded")
            metrics = MetricRecord({protocol.NUM_EXAMPLES: examples,
                                    protocol.TRAIN_LOSS: float(result.loss),
                                    protocol.TRAIN_STEPS: result.steps,
                                    protocol.TRAIN_TOKENS: result.tokens,
                                    protocol.TRAIN_SECONDS: float(result.seconds)})
        say("round %d: bridged phone %s delivered", offer.server_round, self.device)
        arrays = wire.encode(update, "fp32", SecureRandom())
        return Message(content=RecordDict({protocol.UPDATE_ARRAYS: arrays,
                                           protocol.METRICS: metrics}), reply_to=message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path,
                        help="JSON: host, port, cert, key (null: plain HTTP), max_mb, devices")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    from fedmilm.runtime import quiet_offline_env

    quiet_offline_env()
    settings = json.loads(args.config.read_text())
    devices = settings["devices"]
    bridge = Bridge(Board(), Verifier(), Enrolment(
        {device: spec["enrolment_sha256"] for device, spec in devices.items()}))
    for device, spec in devices.items():
        link = private_folder(Path(spec["link"]))
        phone = BridgedPhone(device, int(spec["partition"]), bridge)
        threading.Thread(target=serve_forever, args=(link, read_key(link), phone.handle),
                         kwargs={"max_bytes": int(settings["max_mb"]) << 20,
                                 "on_error": lambda line: log.warning("bridge link: %s", line)},
                         daemon=True, name=f"link-{device}").start()
    tls = None if settings["cert"] is None else server_tls(Path(settings["cert"]),
                                                           Path(settings["key"]))
    server = BridgeServer((settings["host"], int(settings["port"])), bridge, tls)
    log.info("bridge ready on %s://%s:%d for %d phone(s)", "https" if tls else "http",
             settings["host"], int(settings["port"]), len(devices))
    server.serve_forever()


if __name__ == "__main__":
    main()
