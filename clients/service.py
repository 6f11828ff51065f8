"""A warm phone: one long-lived process per device that does the phone's work for every
Flower message, so torch, the base model (or the ExecuTorch programs) and the tokenised data
are loaded once per device, not once per message.

Flower 1.42's SuperNode starts a fresh ClientApp process for each message; on a deployed phone
that process is the thin relay in `fedmilm.clients.entry`, which hands the message to this
service over the device's authenticated local link (`fedmilm.deploy.link`). The service runs
the same ClientApp (`fedmilm.clients.app`) as simulation, with its own node config: the one it
was started with, never one a relay sends. Its state (personal adapter, privacy ledger) lives
in device storage, so a restarted service carries on where the crashed one stopped.

    python -m fedmilm.clients.service --link DIR --node-config "partition-id=0 ..."
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.config import parse_config_args
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedmilm.deploy.link import LinkError, private_folder, read_key, serve_forever

log = logging.getLogger("fedmilm.phone")
OK, FAILED = b"ok", b"error"


def encode_request(message: Message, context: Context) -> list[bytes]:
    """The relay's request: the Flower message and its context (state travels both ways)."""
    return [message_to_proto(message).SerializeToString(),
            context_to_proto(context).SerializeToString()]


def decode_request(frames: list[bytes]) -> tuple[Message, Context]:
    if len(frames) != 2:
        raise LinkError(f"a request has 2 frames, not {len(frames)}")
    return (message_from_proto(ProtoMessage.FromString(frames[0])),
            context_from_proto(ProtoContext.FromString(frames[1])))


def answer(frames: list[bytes], respond: Callable[[Message, Context], Message],
           who: str) -> list[bytes]:
    """An endpoint's reply frames to one relayed request: `respond`'s reply and the context's
    new state, or one line saying why it failed (Flower turns that into an error reply that
    costs this message, never the endpoint)."""
    try:
        message, context = decode_request(frames)
        reply = respond(message, context)
    except Exception as err:  # noqa: BLE001 - one bad message must not stop the phone
        log.warning("%s: message failed: %s: %s", who, type(err).__name__, err)
        return [FAILED, f"{type(err).__name__}: {err}".encode()[:2000]]
    return [OK, message_to_proto(reply).SerializeToString(),
            recorddict_to_proto(context.state).SerializeToString()]


class PhoneService:
    """Answers relayed messages with a ClientApp and this device's own node config."""

    def __init__(self, client_app: ClientApp, node_config: dict) -> None:
        self.client_app, self.node_config = client_app, dict(node_config)
        self.served = 0

    def handle(self, frames: list[bytes]) -> list[bytes]:
        return answer(frames, self._respond, "phone service")

    def _respond(self, message: Message, context: Context) -> Message:
        started = time.perf_counter()
        context.node_config = dict(self.node_config)  # the phone's own, never the relay's
        reply = self.client_app(message=message, context=context)
        self.served += 1
        log.info("%s message answered in %.1f s", message.metadata.message_type,
                 time.perf_counter() - started)
        return reply


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link", required=True, type=Path, help="the device's link folder")
    parser.add_argument("--node-config", required=True, help="this phone's own node config")
    parser.add_argument("--max-mb", type=int, default=256, help="largest message accepted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    from fedmilm.runtime import quiet_offline_env

    quiet_offline_env()
    paths = private_folder(args.link)
    try:
        key = read_key(paths)
    except LinkError as err:
        sys.exit(f"fedmilm phone service: {err}")
    from fedmilm.clients.app import app  # torch and the training stack: once per device

    service = PhoneService(app, parse_config_args([args.node_config]))
    log.info("phone service ready on %s", paths.socket)
    serve_forever(paths, key, service.handle, max_bytes=args.max_mb << 20,
                  on_error=lambda line: log.warning("phone service: %s", line))


if __name__ == "__main__":
    main()
