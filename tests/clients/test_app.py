"""The ClientApp handlers, called the way Flower calls them, and everything they send."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmilm import protocol
from fedmilm.adapters import cached_adapter_space, wire
from fedmilm.clients.app import app, received_global
from fedmilm.clients.storage import PERSONAL_FILE
from fedmilm.config import to_yaml
from fedmilm.privacy.policy import POLICY_FILE, PhonePolicy, policy_for_run
from fedmilm.privacy.randomness import SeededRandom
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _call(cfg, message_type: str, tmp_path, user: int = 0, server_round: int = 1, *,
          policy: PhonePolicy | None = None, diagnostics: bool = False,
          clip: float | None = None) -> Message:
    """One message through the deployed app, with the node config a real phone has: its own
    storage folder and its own policy file (by default: accepting what `cfg` asks)."""
    from fedmilm.privacy.calibrate import resolve_privacy

    cfg = resolve_privacy(cfg)
    space = cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                 seed=cfg.seed)
    config = ConfigRecord({protocol.SERVER_ROUND: server_round, protocol.RUN_CONFIG: to_yaml(cfg),
                           "storage-root": str(tmp_path / "server-says")})  # must be ignored
    if clip is not None:  # adaptive clipping: the round's clip
        config[protocol.CLIP_NORM] = clip
    down = wire.encode(space.initial_state(space.global_keys), cfg.aggregation.download,
                       SeededRandom(0))
    content = RecordDict({protocol.GLOBAL_ARRAYS: down, protocol.CONFIG: config})
    msg = Message(content=content, dst_node_id=11, message_type=message_type)
    own = tmp_path / "devices" / str(user)
    own.mkdir(parents=True, exist_ok=True)
    policy_path = own / POLICY_FILE
    policy_path.write_text((policy or policy_for_run(cfg.privacy)).to_json())
    node_config = {protocol.PARTITION_ID: user, protocol.DEVICE_DIR: str(own),
                   protocol.PRIVACY_POLICY: str(policy_path)}
    if diagnostics:
        node_config[protocol.DIAGNOSTICS_DIR] = str(tmp_path / "diagnostics")
    context = Context(run_id=1, node_id=11, node_config=node_config, state=RecordDict(),
                      run_config={})
    return app(msg, context)


@pytest.mark.parametrize("mode", ["none", "fedsa", "dual"])
def test_train_reply_carries_only_the_global_update(tmp_path, mode):
    cfg = tiny_config(f"personalization={mode}")
    space = cached_adapter_space(cfg.model, cfg.lora, mode=mode, seed=cfg.seed)
    reply = _call(cfg, MessageType.TRAIN, tmp_path, user=3)
    assert not reply.has_error()
    content = reply.content
    # Exactly one ArrayRecord (the update) and one MetricRecord; no ConfigRecord, no text.
    assert list(content.array_records) == [protocol.UPDATE_ARRAYS]
    assert list(content.metric_records) == [protocol.METRICS]
    assert not content.config_records
    update = content.array_records[protocol.UPDATE_ARRAYS].to_torch_state_dict()
    assert set(update) == set(space.global_keys)
    assert not set(update) & set(space.personal_keys)
    assert all(v.dtype == torch.float32 for v in update.values())
    # The personal part went to the phone's own storage instead.
    assert (tmp_path / "devices" / "3" / PERSONAL_FILE).exists() == bool(space.personal_keys)
    metrics = content.metric_records[protocol.METRICS]
    assert metrics[protocol.NUM_EXAMPLES] == cfg.data.train_per_user
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_evaluate_reply_has_three_losses_and_nothing_else(tmp_path):
    cfg = tiny_config("personalization=dual")
    _call(cfg, MessageType.TRAIN, tmp_path, user=2)
    reply = _call(cfg, MessageType.EVALUATE, tmp_path, user=2)
    assert not reply.content.array_records and not reply.content.config_records
    metrics = reply.content.metric_records[protocol.METRICS]
    assert set(metrics) == {protocol.NUM_EXAMPLES, protocol.LOSS_BASE, protocol.LOSS_GLOBAL,
                            protocol.LOSS_PERSONAL}
    # The personal part trained on the phone and is in effect: it changes the loss.
    assert metrics[protocol.LOSS_PERSONAL] != metrics[protocol.LOSS_GLOBAL]


def test_bad_config_is_refused_naming_the_key(tmp_path):
    """Flower's runtime turns a handler exception into an error reply (the server logs it)."""
    from fedmilm.config import ConfigError

    cfg = tiny_config()
    cfg.data.source = "nonsense"
    with pytest.raises(ConfigError, match="data.source"):
        _call(cfg, MessageType.TRAIN, tmp_path)


def test_user_level_updates_leave_the_phone_clipped(tmp_path):
    from fedmilm.privacy.user_level import l2_norm

    cfg = tiny_config("privacy=user", "privacy.user.clip_norm=0.01", "train.lr=0.05")
    reply = _call(cfg, MessageType.TRAIN, tmp_path, user=1)
    update = reply.content.array_records[protocol.UPDATE_ARRAYS].to_torch_state_dict()
    assert l2_norm(update) == pytest.approx(0.01, rel=1e-4)  # trained far more, sent clipped


def test_sample_level_ledger_composes_and_the_phone_declines_past_its_budget(tmp_path):
    import json

    from fedmilm.clients.privacy import LEDGER_FILE
    from fedmilm.privacy import Accountant

    probe = tiny_config("privacy=sample")
    n, batch = probe.data.train_per_user, probe.train.batch_size
    steps = probe.train.epochs * -(-n // batch)
    one_round = Accountant("prv").epsilon_after(1e-5, noise_multiplier=1.0,
                                                sample_rate=batch / n, num_steps=steps)
    cfg = tiny_config("privacy=sample", "privacy.sample.noise_multiplier=1.0",
                      f"privacy.sample.target_epsilon={one_round * 1.05}")
    first = _call(cfg, MessageType.TRAIN, tmp_path, user=4, server_round=1)
    assert first.content.metric_records[protocol.METRICS][protocol.LEDGER_TRAININGS] == 1
    ledger = json.loads((tmp_path / "devices" / "4" / LEDGER_FILE).read_text())
    assert ledger["history"] == [[1.0, batch / n, steps]]
    second = _call(cfg, MessageType.TRAIN, tmp_path, user=4, server_round=2)
    metrics = second.content.metric_records[protocol.METRICS]
    assert metrics[protocol.DECLINED] == 1 and not second.content.array_records
    again = json.loads((tmp_path / "devices" / "4" / LEDGER_FILE).read_text())
    assert again["history"] == ledger["history"]  # nothing more was spent


def test_phone_declines_when_its_device_policy_says_no(tmp_path, monkeypatch):
    from fedmilm.clients import app as phone_app
    from fedmilm.devices import Conditions

    unplugged = Conditions(battery_percent=90, charging=False, temperature_c=30, unmetered=True)
    monkeypatch.setattr(phone_app, "read_conditions", lambda: unplugged)
    reply = _call(tiny_config("device.check_conditions=true"), MessageType.TRAIN, tmp_path)
    assert not reply.content.array_records  # nothing trained, nothing sent
    metrics = reply.content.metric_records[protocol.METRICS]
    assert metrics[protocol.DECLINED] == protocol.DECLINED_CONDITIONS
    assert not (tmp_path / "devices" / "0" / PERSONAL_FILE).exists()

    plugged = Conditions(battery_percent=90, charging=True, temperature_c=30, unmetered=True)
    monkeypatch.setattr(phone_app, "read_conditions", lambda: plugged)
    reply = _call(tiny_config("device.check_conditions=true"), MessageType.TRAIN, tmp_path)
    assert list(reply.content.array_records) == [protocol.UPDATE_ARRAYS]


def test_phone_declines_when_training_cannot_fit_its_memory_budget(tmp_path):
    reply = _call(tiny_config("client.memory_budget_mb=64"), MessageType.TRAIN, tmp_path)
    assert not reply.content.array_records
    metrics = reply.content.metric_records[protocol.METRICS]
    assert metrics[protocol.DECLINED] == protocol.DECLINED_MEMORY
    assert not (tmp_path / "devices" / "0" / PERSONAL_FILE).exists()


@pytest.mark.parametrize("mode", ["sample", "user", "both"])
def test_a_dp_phone_sends_its_update_and_nothing_derived_from_its_data(tmp_path, mode):
    """No example count, loss, token count, timing or epsilon on the wire under DP."""
    reply = _call(tiny_config(f"privacy={mode}"), MessageType.TRAIN, tmp_path, user=1)
    assert list(reply.content.array_records) == [protocol.UPDATE_ARRAYS]
    metrics = reply.content.metric_records[protocol.METRICS]
    allowed = {protocol.LEDGER_TRAININGS} if mode != "user" else set()
    assert set(metrics) == allowed


def test_an_int8_phone_uploads_codes_within_the_user_level_clip(tmp_path):
    """int8 both ways under user-level DP: the reply is int8 codes that decode to an update
    no longer than the clip, and the phone evaluates from an int8 global too."""
    cfg = tiny_config("privacy=user", "aggregation.upload=int8", "aggregation.download=int8",
                      "privacy.user.clip_norm=0.01", "train.lr=0.05")
    space = cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                 seed=cfg.seed)
    reference = space.initial_state(space.global_keys)
    arrays = _call(cfg, MessageType.TRAIN, tmp_path, user=1).content.array_records[
        protocol.UPDATE_ARRAYS]
    assert wire.problem(arrays, reference, "int8") is None
    from fedmilm.privacy.user_level import l2_norm

    assert l2_norm(wire.decode(arrays, reference, "int8")) <= 0.01
    assert wire.problem(arrays, reference, "fp32") is not None
    cfg = tiny_config("aggregation.download=int8")
    reply = _call(cfg, MessageType.EVALUATE, tmp_path, user=1)
    assert protocol.LOSS_GLOBAL in reply.content.metric_records[protocol.METRICS]


def test_a_dp_phones_int8_rounding_cannot_be_replayed_from_the_public_config(tmp_path):
    """Same run config, same phone, same round, same (deterministic) local training: under
    DP the rounding draws come from the phone's CSPRNG, so the server cannot redo them."""
    cfg = tiny_config("privacy=user", "aggregation.upload=int8", "privacy.user.clip_norm=1e3",
                      "privacy.phone.max_user_clip=1e4")
    first, again = (_call(cfg, MessageType.TRAIN, tmp_path / str(i), user=1).content
                    .array_records[protocol.UPDATE_ARRAYS] for i in range(2))
    assert first[wire.SCALES].data == again[wire.SCALES].data  # the same update was trained
    assert any(first[k].data != again[k].data for k in first if k != wire.SCALES)


def test_a_phone_refuses_a_global_adapter_in_another_format():
    cfg = tiny_config("aggregation.download=int8")
    space = cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                 seed=cfg.seed)
    float32 = ArrayRecord(space.initial_state(space.global_keys))  # the run says int8
    msg = Message(content=RecordDict({protocol.GLOBAL_ARRAYS: float32}), dst_node_id=11,
                  message_type=MessageType.TRAIN)
    with pytest.raises(ValueError, match="not int8"):
        received_global(msg, cfg)


def test_a_dp_phone_releases_no_evaluation(tmp_path):
    """Deployed (no diagnostics folder): it declines. Simulated: it leaves its losses on the
    researcher's disk, outside the wire, and replies with nothing."""
    cfg = tiny_config("privacy=sample")
    reply = _call(cfg, MessageType.EVALUATE, tmp_path, user=2)
    assert dict(reply.content.metric_records[protocol.METRICS]) == {
        protocol.DECLINED: protocol.DECLINED_POLICY}
    reply = _call(cfg, MessageType.EVALUATE, tmp_path, user=2, diagnostics=True)
    assert not reply.content.array_records and not dict(
        reply.content.metric_records[protocol.METRICS])
    left = list((tmp_path / "diagnostics").rglob("2.json"))
    assert len(left) == 1 and protocol.LOSS_BASE in left[0].read_text()


@pytest.mark.parametrize("clip,within", [(0.01, -0.5), (1e6, 0.5)])
def test_adaptive_clipping_uses_the_rounds_clip_and_sends_only_its_vote(tmp_path, clip, within):
    from fedmilm.privacy.user_level import l2_norm

    cfg = tiny_config("privacy=user", "privacy.user.adaptive_clip=true", "train.lr=0.05",
                      "privacy.phone.max_user_clip=1e7")
    reply = _call(cfg, MessageType.TRAIN, tmp_path, user=1, clip=clip)
    update = reply.content.array_records[protocol.UPDATE_ARRAYS].to_torch_state_dict()
    assert l2_norm(update) <= clip * (1 + 1e-4)
    metrics = dict(reply.content.metric_records[protocol.METRICS])
    assert metrics == {protocol.WITHIN_CLIP: within}


def test_a_round_clip_above_the_phones_policy_is_declined(tmp_path):
    cfg = tiny_config("privacy=user", "privacy.user.adaptive_clip=true")
    reply = _call(cfg, MessageType.TRAIN, tmp_path, user=2, clip=5.0,
                  policy=_stricter(cfg, max_user_clip=1.0))
    assert not reply.content.array_records
    assert reply.content.metric_records[protocol.METRICS][protocol.DECLINED] == \
        protocol.DECLINED_POLICY


def _stricter(cfg, **changes) -> PhonePolicy:
    import dataclasses

    return dataclasses.replace(policy_for_run(cfg.privacy), **changes)


@pytest.mark.parametrize("overrides,changes", [
    (["privacy=none"], {"allow_no_dp": False}),
    (["privacy=sample", "privacy.sample.noise_multiplier=0.9"], {"min_sample_noise": 1.0}),
    (["privacy=user", "privacy.user.noise_multiplier=0.5"], {"min_user_noise": 1.0}),
    (["privacy=user", "privacy.user.clip_norm=5"], {"max_user_clip": 1.0}),
    (["privacy=sample", "privacy.delta=1e-3"], {"delta": 1e-5}),
    (["privacy=sample", "privacy.seeded_noise=true"], {"allow_seeded_noise": False}),
])
def test_a_server_asking_for_less_than_the_phones_policy_is_declined(tmp_path, overrides,
                                                                    changes):
    cfg = tiny_config(*overrides)
    reply = _call(cfg, MessageType.TRAIN, tmp_path, user=3, policy=_stricter(cfg, **changes))
    assert not reply.content.array_records
    metrics = reply.content.metric_records[protocol.METRICS]
    assert metrics[protocol.DECLINED] == protocol.DECLINED_POLICY
    assert not (tmp_path / "devices" / "3" / PERSONAL_FILE).exists()  # nothing trained
    assert not (tmp_path / "server-says").exists()  # the server's path was never written


def test_the_phones_own_epsilon_cap_wins_over_a_larger_server_target(tmp_path):
    cfg = tiny_config("privacy=sample", "privacy.sample.target_epsilon=1000")
    reply = _call(cfg, MessageType.TRAIN, tmp_path, user=3,
                  policy=_stricter(cfg, max_sample_epsilon=0.01))
    assert reply.content.metric_records[protocol.METRICS][protocol.DECLINED] == \
        protocol.DECLINED_BUDGET


@pytest.mark.parametrize("damage", ["delete", "roll back", "corrupt"])
def test_a_lost_or_tampered_ledger_next_to_trained_state_stops_training(tmp_path, damage):
    from fedmilm.clients.privacy import LEDGER_FILE

    cfg = tiny_config("privacy=sample", "privacy.sample.target_epsilon=null")
    ledger = tmp_path / "devices" / "5" / LEDGER_FILE
    _call(cfg, MessageType.TRAIN, tmp_path, user=5, server_round=1)
    after_one = ledger.read_text()
    _call(cfg, MessageType.TRAIN, tmp_path, user=5, server_round=2)
    if damage == "delete":
        ledger.unlink()
    elif damage == "roll back":
        ledger.write_text(after_one)  # a valid file, one training behind
    else:
        ledger.write_text(ledger.read_text()[:-30])
    reply = _call(cfg, MessageType.TRAIN, tmp_path, user=5, server_round=3)
    assert reply.content.metric_records[protocol.METRICS][protocol.DECLINED] == \
        protocol.DECLINED_LEDGER
    assert not reply.content.array_records


def test_a_phone_without_its_own_storage_in_its_node_config_refuses(tmp_path):
    cfg = tiny_config()
    space = cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                 seed=cfg.seed)
    config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.RUN_CONFIG: to_yaml(cfg),
                           "storage-root": str(tmp_path / "server-says")})
    msg = Message(content=RecordDict({protocol.GLOBAL_ARRAYS: ArrayRecord(
        space.initial_state(space.global_keys)), protocol.CONFIG: config}),
        dst_node_id=11, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=11, node_config={protocol.PARTITION_ID: 0},
                      state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=protocol.DEVICE_DIR):
        app(msg, context)
    assert not (tmp_path / "server-says").exists()


@pytest.mark.parametrize("seeded", [False, True])
def test_dp_sgd_cannot_be_replayed_from_the_public_config(tmp_path, seeded):
    """An adversary holding config.yaml reruns the phone's training on the same data and seed:
    with the phone's CSPRNG the update differs (batch masks and noise are secret); only
    `privacy.seeded_noise=true` (tests) makes it replayable, which proves the check can fail."""
    cfg = tiny_config("privacy=sample", "privacy.sample.target_epsilon=null",
                      f"privacy.seeded_noise={str(seeded).lower()}")
    phone = _call(cfg, MessageType.TRAIN, tmp_path / "phone", user=6)
    replay = _call(cfg, MessageType.TRAIN, tmp_path / "adversary", user=6)
    a, b = (r.content.array_records[protocol.UPDATE_ARRAYS].to_torch_state_dict()
            for r in (phone, replay))
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == seeded


def test_a_phone_without_its_own_policy_declines(tmp_path):
    cfg = tiny_config()
    space = cached_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                 seed=cfg.seed)
    config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.RUN_CONFIG: to_yaml(cfg)})
    msg = Message(content=RecordDict({protocol.GLOBAL_ARRAYS: ArrayRecord(
        space.initial_state(space.global_keys)), protocol.CONFIG: config}),
        dst_node_id=11, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=11, node_config={
        protocol.PARTITION_ID: 0, protocol.DEVICE_DIR: str(tmp_path / "own")},
        state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert reply.content.metric_records[protocol.METRICS][protocol.DECLINED] == \
        protocol.DECLINED_POLICY
    assert not reply.content.array_records
