"""Timing and fault injection for the emulator, per instance, with defaults for instances not named.

Set at start (`python -m include.local_aws --pending-seconds 3 ...`) or at run time with
`POST /_local_aws/faults` and a JSON body such as:

    {"defaults": {"agent_registration_seconds": 5},
     "instances": {"i-0123456789abcdef0": {"insufficient_capacity_starts": 2, "agent_never_online": true}},
     "throttle_fraction": 0.1}
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class InstanceFaults:
    """How one emulated instance behaves. Durations are seconds."""

    pending_seconds: float = 2.0  # StartInstances: pending -> running
    stopping_seconds: float = 2.0  # StopInstances: stopping -> stopped
    agent_registration_seconds: float = 1.0  # running -> SSM PingStatus Online (slow registration: raise it)
    agent_never_online: bool = False  # the SSM agent never registers
    insufficient_capacity_starts: int = 0  # the first N StartInstances fail with InsufficientInstanceCapacity
    invocation_visibility_seconds: float = 0.0  # after SendCommand, the invocation is unknown for this long

    @classmethod
    def from_json(cls, data: dict[str, Any], base: InstanceFaults | None = None) -> InstanceFaults:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {sorted(known)}")
        return replace(base or cls(), **data)


@dataclass
class FaultPlan:
    defaults: InstanceFaults
    instances: dict[str, InstanceFaults]
    throttle_fraction: float = 0.0  # share of SSM and EC2 calls answered with a throttling error

    def for_instance(self, instance_id: str) -> InstanceFaults:
        return self.instances.get(instance_id, self.defaults)

    def update(self, data: dict[str, Any]) -> None:
        if "defaults" in data:
            self.defaults = InstanceFaults.from_json(data["defaults"], self.defaults)
        for instance_id, settings in data.get("instances", {}).items():
            self.instances[instance_id] = InstanceFaults.from_json(settings, self.for_instance(instance_id))
        if "throttle_fraction" in data:
            fraction = float(data["throttle_fraction"])
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"throttle_fraction {fraction} is outside 0..1")
            self.throttle_fraction = fraction
