"""Phones as devices: conditions, training policy, availability over time."""

from fedmilm.devices.conditions import Conditions, DevicePolicy

__all__ = ["Conditions", "DevicePolicy"]
