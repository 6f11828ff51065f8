from __future__ import annotations

import pytest
import torch

from fedmilm.adapters import build_adapter_space
from fedmilm.clients.storage import PERSONAL_FILE, DeviceStorage
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def spaces():
    out = {}
    for mode in ("fedsa", "dual", "none"):
        cfg = tiny_config(f"personalization={mode}")
        out[mode] = build_adapter_space(cfg.model, cfg.lora, mode=mode, seed=0)
    return out


def test_first_round_starts_from_initial_personal_part(tmp_path, spaces):
    space = spaces["fedsa"]
    personal = DeviceStorage(tmp_path / "7").load_personal(space)
    assert set(personal) == set(space.personal_keys)
    assert all(torch.equal(personal[k], space.initial[k]) for k in personal)


def test_round_trip_persists_across_instances(tmp_path, spaces):
    space = spaces["dual"]
    state = {k: torch.randn_like(v) for k, v in space.initial_state(space.personal_keys).items()}
    DeviceStorage(tmp_path / "3").save_personal(space, state)
    again = DeviceStorage(tmp_path / "3").load_personal(space)
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert not list((tmp_path / "3").glob("*.tmp"))


def test_refuses_a_file_from_another_setup(tmp_path, spaces):
    dual, fedsa = spaces["dual"], spaces["fedsa"]
    DeviceStorage(tmp_path).save_personal(dual, dual.initial_state(dual.personal_keys))
    with pytest.raises(ValueError, match="different model/LoRA/personalization"):
        DeviceStorage(tmp_path).load_personal(fedsa)


def test_nothing_is_stored_without_a_personal_part(tmp_path, spaces):
    storage = DeviceStorage(tmp_path / "0")
    storage.save_personal(spaces["none"], {})
    assert storage.load_personal(spaces["none"]) == {}
    assert not (tmp_path / "0" / PERSONAL_FILE).exists()
