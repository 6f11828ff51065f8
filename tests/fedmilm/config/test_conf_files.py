"""Every option of every config group composes and validates; bad values name their key."""

from __future__ import annotations

import pytest

from fedmilm.config import ConfigError, load_config
from tests.conftest import CONF, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).rglob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "hf"):
        (tmp_path / "config.json").write_text('{"model_type": "llama"}')
        overrides.append(f"model.path={tmp_path}")
    if (group, option) == ("data", "jsonl"):
        overrides.append(f"data.path={tmp_path}")
    cfg = load_config(compose_config(overrides))
    assert getattr(cfg, group) is not None


def test_design_keys_are_overridable():
    cfg = load_config(compose_config([
        "federation.num_clients=50", "federation.clients_per_round=10", "federation.rounds=8",
        "personalization=fedsa", "lora.r=16", "seed=3"]))
    assert (cfg.federation.num_clients, cfg.federation.clients_per_round) == (50, 10)
    assert (cfg.federation.rounds, cfg.lora.r, cfg.seed) == (8, 16, 3)
    assert cfg.personalization.mode == "fedsa"


@pytest.mark.parametrize("override,key", [
    ("lora.r=-4", "lora.r"),
    ("federation.clients_per_round=30", "federation.clients_per_round"),
    ("train.lr=0", "train.lr"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("federation.min_replies=0", "federation.min_replies"),
    ("data=jsonl", "data.path"),
])
def test_invalid_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(compose_config([override]))
    assert key in str(err.value)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(compose_config(["lora.r=0", "train.epochs=0"]))
    assert len(err.value.problems) == 2


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(compose_config(["lora.r=eight"]))


def test_hf_model_needs_a_real_folder(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        load_config(compose_config(["model=hf"]))
    with pytest.raises(ConfigError, match="config.json"):
        load_config(compose_config(["model=hf", f"model.path={tmp_path}"]))


@pytest.mark.parametrize("overrides,reason", [
    (["deploy.bridged_phones=1"], "client.runtime=executorch"),
    (["deploy.bridged_phones=1", "client.runtime=executorch", "privacy=sample"],
     "no DP-SGD privacy ledger"),
    (["deploy.bridged_phones=1", "client.runtime=executorch", "aggregation.upload=int8"],
     "aggregation.upload=fp32"),
    (["deploy.bridged_phones=99"], "federation.num_clients"),
    (["deploy.max_message_mb=0"], "deploy.max_message_mb"),
    (["deploy.bridge_port=70000"], "deploy.bridge_port"),
])
def test_what_bridged_phones_cannot_do_is_refused_at_start_up(overrides, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config(compose_config(["model=tiny", *overrides]))


def test_bridged_phones_with_what_they_support_compose():
    cfg = load_config(compose_config(["model=tiny", "deploy.bridged_phones=2",
                                      "client.runtime=executorch", "privacy=user"]))
    assert cfg.deploy.bridged_phones == 2 and cfg.deploy.warm_phones
