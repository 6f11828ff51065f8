"""One fix to Flower 1.42's simulation engine so that a fleet of virtual phones costs nothing
while it waits.

Flower's engine hands messages to its Ray workers from a thread that, every 100 ms, asks the
link state for the next message of *every* virtual node, and each ask scans *every* stored
message: O(nodes x outstanding messages) per sweep. With 10,000 phones that thread holds the
GIL most of the time and the server and workers slow down even in rounds of ten phones. The
replacement below asks only for the nodes that have an undelivered message (one pass over the
outstanding messages), and otherwise runs Flower's own code: the same `get_message_ins` call,
the same TTL checks, the same one-message-per-node-per-sweep rule.

flwr is pinned exactly (pyproject.toml); a test checks that the function this replaces still
exists with the signature it had, so a Flower upgrade that moves it fails loudly.
"""

from __future__ import annotations

import threading
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState

SWEEP_S = 0.1  # as Flower's own loop

FLOWER_DISPATCH = vce_api.add_messages_to_queue


def nodes_with_pending(state: LinkState, nodes: dict[int, int]) -> list[int]:
    """Virtual nodes that have an undelivered message; every node for a link state this does
    not know (Flower's full scan then)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return list(nodes)
    with lock:
        pending = {m.metadata.dst_node_id for m in store.values()
                   if m.metadata.delivered_at == ""}
    return [node for node in pending if node in nodes]


def dispatch_pending(state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, int],
                     f_stop: threading.Event) -> None:
    """Drop-in for `vce_api.add_messages_to_queue`."""
    while not f_stop.is_set():
        for node_id in nodes_with_pending(state, nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(SWEEP_S)


def install() -> None:
    """Use `dispatch_pending` in this process's simulation engine (idempotent)."""
    vce_api.add_messages_to_queue = dispatch_pending
