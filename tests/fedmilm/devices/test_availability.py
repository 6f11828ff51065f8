"""Availability traces: CSV loading with clear errors, the synthetic diurnal trace, and which
devices a round may sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmilm.devices import DevicePolicy
from fedmilm.devices.availability import TraceFormatError, load_trace, synthetic_trace

HEADER = "device,slot,idle,charging,unmetered,battery_percent,temperature_c\n"


def _trace(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(HEADER + rows)
    return path


def test_csv_trace_decides_per_slot(tmp_path):
    trace = load_trace(_trace(tmp_path, "0,0,1,1,1,80,30\n"
                                        "1,0,1,0,1,80,30\n"      # not charging
                                        "2,0,0,1,1,80,30\n"      # in use
                                        "0,1,1,1,1,20,30\n"      # battery low
                                        "1,1,1,1,1,90,\n"))      # temperature unknown
    policy = DevicePolicy()
    assert trace.num_slots == 2
    assert trace.available([0, 1, 2, 3], 1, policy) == [0]  # device 3 is not in the trace
    assert trace.available([0, 1, 2], 2, policy) == []
    assert trace.available([0, 1, 2], 2, DevicePolicy(allow_unknown=True)) == [1]
    assert trace.available([0, 1, 2], 3, policy) == [0]  # the trace repeats
    assert trace.slot_of(4, slots_per_round=3) == 1


@pytest.mark.parametrize(("rows", "needle"), [
    ("0,0,maybe,1,1,80,30\n", "trace.csv:2 column idle"),
    ("0,x,1,1,1,80,30\n", "trace.csv:2 column slot"),
    ("0,0,1,1,1,80,30\n0,0,1,1,1,hot,30\n", "trace.csv:3 column battery_percent"),
    ("", "no rows"),
])
def test_bad_trace_files_name_file_line_and_column(tmp_path, rows, needle):
    with pytest.raises(TraceFormatError, match=needle):
        load_trace(_trace(tmp_path, rows))


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("device,slot\n0,0\n")
    with pytest.raises(TraceFormatError, match="missing columns"):
        load_trace(path)


def test_synthetic_trace_is_seeded_and_diurnal():
    a, b = synthetic_trace(200, seed=1), synthetic_trace(200, seed=1)
    assert a == b and a != synthetic_trace(200, seed=2)
    devices, policy = list(range(200)), DevicePolicy()
    night = len(a.available(devices, 4, policy))   # slot 3: 03:00
    day = len(a.available(devices, 15, policy))    # slot 14: 14:00
    assert night > 0.5 * 200 and day < 0.1 * 200


def test_config_picks_the_trace_and_the_policy(tmp_path):
    from fedmilm.config import ConfigError
    from fedmilm.devices import availability_for, policy_of
    from tests.conftest import tiny_config

    assert availability_for(tiny_config()) is None
    synthetic = availability_for(tiny_config("device.availability=synthetic"))
    assert synthetic is not None and synthetic.num_slots == 24
    cfg = tiny_config("device.min_battery_percent=70", "device.allow_unknown=true")
    assert policy_of(cfg.device) == DevicePolicy(min_battery_percent=70, allow_unknown=True)
    with pytest.raises(ConfigError, match="device.availability_path"):
        tiny_config("device.availability=trace")
    with pytest.raises(ConfigError, match="device.availability='weekly'"):
        tiny_config("device.availability=weekly")
