"""Device conditions read on the phone: Android through Termux:API, or Linux sysfs.

Every reader returns what it could read and None for the rest: `termux-battery-status` writes
each field only when Android reports it, sysfs files may be missing or SELinux-protected, and a
Termux:API call may hang (it gets a timeout). `fedmilm.devices.DevicePolicy` decides what an
unknown value means.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

from fedmilm.devices.conditions import Conditions

SYSFS_POWER = Path("/sys/class/power_supply")
TERMUX_TIMEOUT_S = 10.0
_CHARGING_STATUS = {"CHARGING", "FULL"}


def parse_termux_battery(text: str) -> Conditions:
    """`termux-battery-status` JSON: any field may be missing. `charging` means on external
    power (plugged in), so a full battery on the charger counts."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("termux-battery-status did not print a JSON object")
    percent = data.get("percentage")
    if percent is None and data.get("level") is not None and data.get("scale"):
        percent = 100.0 * float(data["level"]) / float(data["scale"])
    plugged, status = data.get("plugged"), data.get("status")
    charging = None  # "on external power": plugged says it directly, status only hints
    if isinstance(plugged, str):
        charging = plugged.upper() != "UNPLUGGED"
    elif isinstance(status, str) and status.upper() != "UNKNOWN":
        charging = status.upper() in _CHARGING_STATUS
    temperature = data.get("temperature")
    return Conditions(battery_percent=None if percent is None else float(percent),
                      charging=charging,
                      temperature_c=None if temperature is None else float(temperature),
                      source="termux")


def parse_termux_wifi(text: str) -> bool | None:
    """`termux-wifi-connectioninfo` JSON: True when associated with a Wi-Fi network."""
    data = json.loads(text)
    state = data.get("supplicant_state") if isinstance(data, dict) else None
    return None if state is None else str(state).upper() == "COMPLETED"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # missing, or "Permission denied" under SELinux
        return None


def read_sysfs(root: Path = SYSFS_POWER) -> Conditions:
    """The first battery under `root` (capacity, status, temp in tenths of a degree), and any
    online AC/USB/wireless supply as charging."""
    conditions = Conditions(source="sysfs")
    if not root.is_dir():
        return conditions
    plugged = None
    for supply in sorted(root.iterdir()):
        kind = _read(supply / "type")
        if kind == "Battery" and conditions.battery_percent is None:
            capacity, status, temp = (_read(supply / n) for n in ("capacity", "status", "temp"))
            charging = None if status in (None, "Unknown") else status in ("Charging", "Full")
            conditions = replace(
                conditions, battery_percent=None if capacity is None else float(capacity),
                charging=charging, temperature_c=None if temp is None else float(temp) / 10)
        elif kind in ("Mains", "USB", "Wireless") and _read(supply / "online") is not None:
            plugged = bool(plugged) or _read(supply / "online") == "1"
    if conditions.charging is None and plugged is not None:
        conditions = replace(conditions, charging=plugged)
    return conditions


def _termux(command: str) -> str | None:
    if shutil.which(command) is None:
        return None
    try:
        done = subprocess.run([command], capture_output=True, text=True,
                              timeout=TERMUX_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # Termux:API is known to hang on some devices
        return None
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def read_conditions() -> Conditions:
    """This device's conditions: Termux:API when present, else sysfs."""
    battery = _termux("termux-battery-status")
    now = parse_termux_battery(battery) if battery is not None else read_sysfs(SYSFS_POWER)
    wifi = _termux("termux-wifi-connectioninfo")
    return replace(now, unmetered=None if wifi is None else parse_termux_wifi(wifi))
