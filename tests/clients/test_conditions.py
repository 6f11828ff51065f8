"""Device-condition readers against sample readings (Termux:API JSON, sysfs trees)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedmilm.clients import conditions as cond
from fedmilm.clients.conditions import parse_termux_battery, parse_termux_wifi, read_sysfs
from fedmilm.devices import Conditions, DevicePolicy

SAMPLES = Path(__file__).parent / "samples"


def _sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def test_full_termux_reading():
    now = parse_termux_battery(_sample("termux_battery_full.json"))
    assert now == Conditions(battery_percent=78.0, charging=True, temperature_c=31.4,
                             unmetered=None, source="termux")


def test_older_termux_app_with_six_fields():
    now = parse_termux_battery(_sample("termux_battery_old.json"))
    assert (now.battery_percent, now.charging, now.temperature_c) == (34.0, False, 29.0)


def test_full_battery_on_usb_counts_as_on_power_but_is_too_hot():
    now = parse_termux_battery(_sample("termux_battery_hot_usb.json"))
    assert now.charging is True and now.temperature_c == 46.2
    assert DevicePolicy().refusal(now) is not None


def test_sparse_reading_leaves_unknowns_unknown():
    now = parse_termux_battery(_sample("termux_battery_sparse.json"))
    assert now.charging is True and now.battery_percent is None and now.temperature_c is None


def test_level_and_scale_give_the_percentage_when_it_is_missing():
    assert parse_termux_battery('{"level": 3, "scale": 4}').battery_percent == 75.0


@pytest.mark.parametrize("text", ["[]", "not json", "42"])
def test_garbage_is_a_clear_error(text):
    with pytest.raises(ValueError):
        parse_termux_battery(text)


def test_wifi_state():
    assert parse_termux_wifi(_sample("termux_wifi_connected.json")) is True
    assert parse_termux_wifi(_sample("termux_wifi_off.json")) is False
    assert parse_termux_wifi("{}") is None


def test_sysfs_phone_tree():
    now = read_sysfs(SAMPLES / "sysfs_phone")
    assert (now.battery_percent, now.charging, now.temperature_c) == (64.0, True, 33.8)


def test_sysfs_laptop_tree_without_temperature():
    now = read_sysfs(SAMPLES / "sysfs_laptop")
    assert (now.battery_percent, now.charging, now.temperature_c) == (23.0, False, None)


def test_sysfs_unreadable_files_are_unknown(tmp_path):
    battery = tmp_path / "battery"
    battery.mkdir()
    (battery / "type").write_text("Battery\n")
    (battery / "capacity").mkdir()  # reading a directory fails like a protected file
    assert read_sysfs(tmp_path).battery_percent is None
    assert read_sysfs(tmp_path / "absent") == Conditions(source="sysfs")


def test_reader_survives_a_hanging_termux_api(monkeypatch, tmp_path):
    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(cmd=args[0], timeout=1)

    monkeypatch.setattr(cond.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cond.subprocess, "run", hang)
    monkeypatch.setattr(cond, "SYSFS_POWER", SAMPLES / "sysfs_phone")
    now = cond.read_conditions()  # both Termux:API calls time out: sysfs, Wi-Fi unknown
    assert now.source == "sysfs" and now.battery_percent == 64.0 and now.unmetered is None
