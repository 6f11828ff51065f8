"""Who can train when: availability traces that drive sampling in simulation.

A trace holds, for each device and time slot (an hour by default), its conditions: charging,
battery, unmetered network, temperature, and whether the user is idle. A device is available in a
slot when it is idle and the `DevicePolicy` allows its conditions. Round r covers slot
`(r - 1) * slots_per_round mod num_slots` (traces repeat, like days).

Formats: CSV with header `device,slot,idle,charging,unmetered,battery_percent,temperature_c`
(empty cell = unknown), or `synthetic_trace`, a seeded diurnal pattern: most phones charge on
Wi-Fi overnight, some also during the day.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from fedmilm.config.schema import FedMilmConfig
from fedmilm.devices.conditions import Conditions, DevicePolicy

COLUMNS = ("device", "slot", "idle", "charging", "unmetered", "battery_percent",
           "temperature_c")


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names file, line and column."""


@dataclass(frozen=True)
class Slot:
    """One device in one time slot."""

    idle: bool
    conditions: Conditions


@dataclass(frozen=True)
class AvailabilityTrace:
    """Per-device conditions over `num_slots` repeating slots."""

    slots: dict[tuple[int, int], Slot]
    num_slots: int

    def slot_of(self, server_round: int, slots_per_round: int = 1) -> int:
        return ((server_round - 1) * slots_per_round) % self.num_slots

    def available(self, devices: list[int], server_round: int, policy: DevicePolicy,
                  slots_per_round: int = 1) -> list[int]:
        """The devices that may train in this round's slot (unlisted devices may not)."""
        slot = self.slot_of(server_round, slots_per_round)
        out = []
        for device in devices:
            entry = self.slots.get((device, slot))
            if entry is not None and entry.idle and policy.refusal(entry.conditions) is None:
                out.append(device)
        return out


def _cell(value: str, kind: type, where: str) -> object:
    if value.strip() == "":
        return None
    try:
        if kind is bool:
            lowered = value.strip().lower()
            if lowered not in ("0", "1", "true", "false"):
                raise ValueError(value)
            return lowered in ("1", "true")
        return kind(value)
    except ValueError as err:
        raise TraceFormatError(f"{where}: {value!r} is not a {kind.__name__}") from err


def load_trace(path: Path) -> AvailabilityTrace:
    """Read a CSV trace; every problem is reported with file:line and column."""
    slots: dict[tuple[int, int], Slot] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise TraceFormatError(f"{path}:1: missing columns {sorted(missing)}; expected "
                                   f"{','.join(COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            def get(column: str, kind: type, row: dict = row, line: int = line) -> object:
                return _cell(row[column] or "", kind, f"{path}:{line} column {column}")
            device, slot = get("device", int), get("slot", int)
            if device is None or slot is None or slot < 0:
                raise TraceFormatError(f"{path}:{line}: device and slot (>= 0) are required")
            slots[(device, slot)] = Slot(
                idle=bool(get("idle", bool)),
                conditions=Conditions(charging=get("charging", bool),
                                      unmetered=get("unmetered", bool),
                                      battery_percent=get("battery_percent", float),
                                      temperature_c=get("temperature_c", float),
                                      source="trace"))
    if not slots:
        raise TraceFormatError(f"{path}: no rows")
    return AvailabilityTrace(slots, num_slots=1 + max(slot for _, slot in slots))


def synthetic_trace(num_devices: int, *, seed: int, num_slots: int = 24) -> AvailabilityTrace:
    """A day of hourly slots: each phone charges on Wi-Fi for 5-9 night hours starting between
    21:00 and 01:00 (idle, battery rising), and with probability 0.1 in any daytime hour."""
    rng = random.Random(f"fedmilm-availability:{seed}")
    slots: dict[tuple[int, int], Slot] = {}
    for device in range(num_devices):
        start, length = rng.randrange(21, 26), rng.randrange(5, 10)
        night = {(start + h) % num_slots for h in range(length)}
        for slot in range(num_slots):
            on_charger = slot in night or rng.random() < 0.1
            battery = min(100.0, 40.0 + 10.0 * len([h for h in night if h < slot]))
            slots[(device, slot)] = Slot(
                idle=slot in night or rng.random() < 0.3,
                conditions=Conditions(charging=on_charger, unmetered=on_charger or
                                      rng.random() < 0.5, battery_percent=battery,
                                      temperature_c=30.0 + 8.0 * rng.random(),
                                      source="synthetic"))
    return AvailabilityTrace(slots, num_slots=num_slots)


def availability_for(cfg: FedMilmConfig) -> AvailabilityTrace | None:
    """The run's trace (`device.availability`), or None when every phone is always available."""
    if cfg.device.availability == "synthetic":
        return synthetic_trace(cfg.federation.num_clients, seed=cfg.seed)
    if cfg.device.availability == "trace":
        return load_trace(Path(str(cfg.device.availability_path)).expanduser())
    return None
