"""May a phone train now? What is known about it (`Conditions`) and the rule (`DevicePolicy`).

Pure logic: the readers that fill `Conditions` on a real phone live in `fedmilm.clients`, and
availability traces fill them in simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmilm.config.schema import DeviceConfig


@dataclass(frozen=True)
class Conditions:
    """What is known about the phone right now (None: unknown)."""

    battery_percent: float | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    unmetered: bool | None = None
    source: str = "unknown"


@dataclass(frozen=True)
class DevicePolicy:
    """When a phone may train. `allow_unknown=False` treats an unknown fact as a no."""

    require_charging: bool = True
    min_battery_percent: float = 50.0
    require_unmetered: bool = True
    max_temperature_c: float = 40.0
    allow_unknown: bool = False

    def refusal(self, now: Conditions) -> str | None:
        """Why the phone must not train now, or None when it may."""
        checks: list[tuple[bool | None, str]] = []
        if self.require_charging:
            checks.append((now.charging, "not charging"))
        if self.min_battery_percent > 0:
            ok = None if now.battery_percent is None else (
                now.battery_percent >= self.min_battery_percent)
            checks.append((ok, f"battery below {self.min_battery_percent:g}%"))
        if self.require_unmetered:
            checks.append((now.unmetered, "network is metered or down"))
        ok = None if now.temperature_c is None else now.temperature_c <= self.max_temperature_c
        checks.append((ok, f"hotter than {self.max_temperature_c:g} C"))
        for ok, reason in checks:
            if ok is False:
                return reason
            if ok is None and not self.allow_unknown:
                return f"unknown whether {reason.replace('not ', '')}"
        return None


def policy_of(device: DeviceConfig) -> DevicePolicy:
    """The policy the `device.*` config keys describe."""
    return DevicePolicy(require_charging=device.require_charging,
                        min_battery_percent=device.min_battery_percent,
                        require_unmetered=device.require_unmetered,
                        max_temperature_c=device.max_temperature_c,
                        allow_unknown=device.allow_unknown)
