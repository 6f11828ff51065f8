"""The training policy: when a phone may train, and why not."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedmilm.devices import Conditions, DevicePolicy

GOOD = Conditions(battery_percent=80, charging=True, temperature_c=30, unmetered=True)


@pytest.mark.parametrize(("change", "reason"), [
    ({"charging": False}, "not charging"),
    ({"battery_percent": 20.0}, "battery below 50%"),
    ({"unmetered": False}, "metered"),
    ({"temperature_c": 45.0}, "hotter than 40 C"),
    ({"unmetered": None}, "unknown whether"),
])
def test_policy_refuses_with_the_reason(change, reason):
    assert DevicePolicy().refusal(GOOD) is None
    refusal = DevicePolicy().refusal(replace(GOOD, **change))
    assert refusal is not None and reason in refusal


def test_policy_can_accept_unknowns_and_drop_requirements():
    unknown = Conditions()
    assert DevicePolicy(allow_unknown=True).refusal(unknown) is None
    relaxed = DevicePolicy(require_charging=False, require_unmetered=False,
                           min_battery_percent=0, allow_unknown=True)
    assert relaxed.refusal(Conditions(charging=False, unmetered=False)) is None
