"""A warm phone service behind the relay ClientApp: the real phone app answers relayed
messages with the phone's own node config, failures cost one message, and a relay that is not
this device's gets nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmilm import protocol
from fedmilm.adapters import cached_adapter_space, wire
from fedmilm.clients.app import app
from fedmilm.clients.entry import PhoneEntry, relay
from fedmilm.clients.service import PhoneService
from fedmilm.clients.storage import PERSONAL_FILE
from fedmilm.config import to_yaml
from fedmilm.deploy.link import LinkError, ensure_key, private_folder, serve_forever
from fedmilm.privacy.policy import POLICY_FILE, policy_for_run
from fedmilm.privacy.randomness import SeededRandom
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture
def phone(tmp_path) -> Iterator[tuple[PhoneService, dict]]:
    """Device 0's warm service (the real phone app) on its link, in a thread; yields the
    service and the node config its relay has (the link only)."""
    own = tmp_path / "devices" / "0"
    own.mkdir(parents=True)
    (own / POLICY_FILE).write_text(policy_for_run(tiny_config().privacy).to_json())
    link = private_folder(tmp_path / "l0")
    key = ensure_key(link)
    service = PhoneService(app, {protocol.PARTITION_ID: 0, protocol.DEVICE_DIR: str(own),
                                 protocol.PRIVACY_POLICY: str(own / POLICY_FILE)})
    stop, errors = threading.Event(), []
    thread = threading.Thread(target=serve_forever, args=(link, key, service.handle),
                              kwargs={"max_bytes": 1 << 26, "on_error": errors.append,
                                      "stop": stop}, daemon=True)
    thread.start()
    while not link.socket.exists():
        threading.Event().wait(0.01)
    # what the relay's own SuperNode config says about the phone must not matter
    yield service, {protocol.PHONE_LINK: str(link.folder), protocol.PARTITION_ID: 7,
                    protocol.DEVICE_DIR: str(tmp_path / "server-says")}
    stop.set()
    thread.join(timeout=5)


def _message(message_type: str, *, run_config: str | None = None) -> Message:
    cfg = tiny_config()
    space = cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                 seed=cfg.seed)
    config = ConfigRecord({protocol.SERVER_ROUND: 1,
                           protocol.RUN_CONFIG: run_config or to_yaml(cfg)})
    down = wire.encode(space.initial_state(space.global_keys), "fp32", SeededRandom(0))
    return Message(content=RecordDict({protocol.GLOBAL_ARRAYS: down, protocol.CONFIG: config}),
                   dst_node_id=11, message_type=message_type)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=11, node_config=dict(node_config), state=RecordDict(),
                   run_config={})


def test_relayed_messages_are_answered_by_the_warm_phone_with_its_own_node_config(phone,
                                                                                  tmp_path):
    service, relay_config = phone
    query = relay(Message(RecordDict(), dst_node_id=11, message_type=MessageType.QUERY),
                  _context(relay_config))
    assert query.content.metric_records[protocol.METRICS][protocol.DEVICE_ID] == 0  # not 7
    for _ in range(2):  # one process, two rounds of work: nothing is reloaded in between
        reply = relay(_message(MessageType.TRAIN), _context(relay_config))
        assert set(reply.content.array_records[protocol.UPDATE_ARRAYS])
    assert service.served == 3
    assert (tmp_path / "devices" / "0" / PERSONAL_FILE).exists()
    assert not (tmp_path / "server-says").exists()


def test_a_failing_message_costs_one_reply_and_the_phone_serves_on(phone):
    _, relay_config = phone
    with pytest.raises(RuntimeError, match="the phone failed this message: .*lora.r"):
        relay(_message(MessageType.TRAIN, run_config=to_yaml(tiny_config()).replace(
            "  r: 8\n", "  r: -8\n")), _context(relay_config))
    reply = relay(_message(MessageType.EVALUATE), _context(relay_config))
    assert reply.content.metric_records[protocol.METRICS][protocol.LOSS_GLOBAL] > 0


def test_a_relay_holding_another_devices_key_gets_nothing(phone, tmp_path):
    service, relay_config = phone
    other = private_folder(tmp_path / "l1")
    ensure_key(other)
    other.socket.symlink_to(relay_config[protocol.PHONE_LINK] + "/sock")  # device 0's socket
    with pytest.raises(LinkError, match="closed the link"):
        relay(_message(MessageType.TRAIN), _context({protocol.PHONE_LINK: str(other.folder)}))
    assert service.served == 0


def test_without_a_link_the_entry_runs_the_phone_in_its_own_process(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    reply = PhoneEntry()(Message(RecordDict(), dst_node_id=11, message_type=MessageType.QUERY),
                         _context({protocol.PARTITION_ID: 3, protocol.DEVICE_DIR: str(own)}))
    assert reply.content.metric_records[protocol.METRICS][protocol.DEVICE_ID] == 3
