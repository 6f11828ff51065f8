"""Phones as devices: conditions, training policy, availability over time."""

from fedmilm.devices.availability import AvailabilityTrace, availability_for
from fedmilm.devices.conditions import Conditions, DevicePolicy, policy_of

__all__ = ["AvailabilityTrace", "Conditions", "DevicePolicy", "availability_for", "policy_of"]
