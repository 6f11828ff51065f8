"""The ClientApp Flower starts for every message (the `clientapp` component of the app).

On a deployed phone with a warm service (node config `phone-link`), it is a thin relay: it
imports neither torch nor the model, hands the message to the device's long-lived endpoint over
the authenticated local link and returns its reply; the endpoint is the phone's warm service
(`fedmilm.clients.service`) or the bridge standing for an HTTP phone. Without `phone-link`
(Docker compose, an operator's own SuperNodes) it runs the phone in this process, as before.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, recorddict_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedmilm import protocol
from fedmilm.clients.service import FAILED, OK, encode_request
from fedmilm.deploy.link import LinkError, LinkPaths, NoEndpoint, read_key, request

DEFAULT_MAX_MB = 256
ENDPOINT_WAIT_S = 60.0  # how long a relay waits for a (re)starting endpoint to listen


def _request(paths: LinkPaths, frames: list[bytes], max_bytes: int) -> list[bytes]:
    """Send once the endpoint listens; a missing or refusing socket is an endpoint being
    (re)started by fedmilm-deploy, so wait for it, up to `ENDPOINT_WAIT_S`."""
    key = read_key(paths)
    deadline = time.monotonic() + ENDPOINT_WAIT_S
    while True:
        try:
            return request(paths, key, frames, max_bytes=max_bytes, timeout_s=None)
        except NoEndpoint:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def relay(message: Message, context: Context) -> Message:
    """The endpoint's reply to `message`; the context takes the endpoint's new state."""
    node = context.node_config
    paths = LinkPaths(Path(str(node[protocol.PHONE_LINK])))
    max_bytes = int(node.get(protocol.PHONE_LINK_MAX_MB, DEFAULT_MAX_MB)) << 20
    frames = _request(paths, encode_request(message, context), max_bytes)
    if frames[:1] == [FAILED] and len(frames) == 2:
        raise RuntimeError(f"the phone failed this message: {frames[1].decode(errors='replace')}")
    if frames[:1] != [OK] or len(frames) != 3:
        raise LinkError("the phone endpoint sent a malformed reply")
    reply = message_from_proto(ProtoMessage.FromString(frames[1]))
    context.state = recorddict_from_proto(ProtoRecordDict.FromString(frames[2]))
    return reply


class PhoneEntry(ClientApp):
    """Relays to the device's endpoint when its node config names one, else runs the phone."""

    def __call__(self, message: Message, context: Context) -> Message:
        if protocol.PHONE_LINK in context.node_config:
            return relay(message, context)
        from fedmilm.clients.app import app as in_process  # torch: only without a service

        return in_process(message=message, context=context)


app = PhoneEntry()
