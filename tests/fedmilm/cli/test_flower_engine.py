"""The one Flower engine loop fedmilm replaces: still there with the same signature, and the
replacement finds exactly the nodes that have an undelivered message in Flower's real link
state (the e2e fleet test runs the whole engine with it)."""

from __future__ import annotations

import inspect
import threading
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from fedmilm.cli import flower_engine


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def test_the_replaced_function_is_flowers_with_the_same_parameters():
    original = flower_engine.FLOWER_DISPATCH
    assert original.__module__ == vce_api.__name__
    assert (list(inspect.signature(original).parameters)
            == list(inspect.signature(flower_engine.dispatch_pending).parameters))
    assert "add_messages_to_queue" in inspect.getsource(vce_api.run_api)


def _state_with_messages(destinations: list[int]):
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=1)  # registered as run_simulation does
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    nodes = vce_api._register_nodes(50, factory)
    node_ids = list(nodes)
    for index in destinations:
        message = Message(content=RecordDict({"c": ConfigRecord({})}),
                          dst_node_id=node_ids[index], message_type="query")
        state.message_ins_store[f"m{index}"] = message
    return state, nodes, node_ids


def test_only_nodes_with_an_undelivered_message_are_asked():
    state, nodes, node_ids = _state_with_messages([3, 7, 7, 20])
    assert sorted(flower_engine.nodes_with_pending(state, nodes)) == sorted(
        {node_ids[3], node_ids[7], node_ids[20]})
    state.message_ins_store["m3"].metadata.delivered_at = "2026-01-01T00:00:00"
    assert sorted(flower_engine.nodes_with_pending(state, nodes)) == sorted(
        {node_ids[7], node_ids[20]})


def test_an_unknown_link_state_falls_back_to_every_node():
    assert flower_engine.nodes_with_pending(object(), {1: 0, 2: 1}) == [1, 2]


def test_the_loop_asks_only_those_nodes_and_stops_when_told(monkeypatch):
    state, nodes, node_ids = _state_with_messages([1, 2])
    asked: list[int] = []
    original = state.get_message_ins
    monkeypatch.setattr(state, "get_message_ins",
                        lambda node_id, limit: asked.append(node_id) or original(node_id, limit))
    stop, queue = threading.Event(), Queue()
    thread = threading.Thread(target=flower_engine.dispatch_pending,
                              args=(state, queue, nodes, stop))
    thread.start()
    stop.wait(0.35)  # three or four sweeps
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive() and queue.qsize() == 2  # each pending message, once
    assert set(asked) <= {node_ids[1], node_ids[2]}  # never the 48 idle nodes
