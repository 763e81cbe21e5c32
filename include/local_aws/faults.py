"""Timing and fault injection for the emulator, per instance, with defaults for instances not named.

Set at start (`python -m include.local_aws --pending-seconds 3 ...`) or at run time with
`POST /_local_aws/faults` and a JSON body such as:

    {"defaults": {"agent_registration_seconds": 5},
     "instances": {"i-0123456789abcdef0": {"insufficient_capacity_starts": 2, "agent_never_online": true,
                                           "invocation_read_errors": 6, "invocation_read_error": "ServiceUnavailable"}},
     "throttle_fraction": 0.1}
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any

# How the emulator answers a GetCommandInvocation that `invocation_read_errors` makes fail: HTTP status line and
# message of the JSON error, or None for a connection closed without any response.
INVOCATION_READ_ERRORS: dict[str, tuple[str, str] | None] = {
    "InternalServerError": ("500 Internal Server Error", "An internal error occurred"),
    "ServiceUnavailable": ("503 Service Unavailable", "The service is unavailable; try again later"),
    "ThrottlingException": ("400 Bad Request", "Rate exceeded"),
    "AccessDeniedException": ("400 Bad Request", "not authorized to perform: ssm:GetCommandInvocation"),
    "connection_drop": None,
}


@dataclass(frozen=True)
class InstanceFaults:
    """How one emulated instance behaves. Durations are seconds."""

    pending_seconds: float = 2.0  # StartInstances: pending -> running
    stopping_seconds: float = 2.0  # StopInstances: stopping -> stopped
    agent_registration_seconds: float = 1.0  # running -> SSM PingStatus Online (slow registration: raise it)
    agent_never_online: bool = False  # the SSM agent never registers
    insufficient_capacity_starts: int = 0  # the first N StartInstances fail with InsufficientInstanceCapacity
    invocation_visibility_seconds: float = 0.0  # after SendCommand, the invocation is unknown for this long
    # The next N GetCommandInvocation calls about this instance (counted from when this is set) fail with
    # `invocation_read_error`, one of INVOCATION_READ_ERRORS.
    invocation_read_errors: int = 0
    invocation_read_error: str = "InternalServerError"

    @classmethod
    def from_json(cls, data: dict[str, Any], base: InstanceFaults | None = None) -> InstanceFaults:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {sorted(known)}")
        error = data.get("invocation_read_error", "InternalServerError")
        if error not in INVOCATION_READ_ERRORS:
            raise ValueError(f"invocation_read_error {error!r} is not one of {sorted(INVOCATION_READ_ERRORS)}")
        return replace(base or cls(), **data)


@dataclass
class FaultPlan:
    defaults: InstanceFaults
    instances: dict[str, InstanceFaults]
    throttle_fraction: float = 0.0  # share of SSM and EC2 calls answered with a throttling error
    _read_errors_served: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def for_instance(self, instance_id: str) -> InstanceFaults:
        return self.instances.get(instance_id, self.defaults)

    def invocation_read_error(self, instance_id: str) -> str | None:
        """The error this GetCommandInvocation about `instance_id` must fail with, or None to answer it."""
        faults = self.for_instance(instance_id)
        with self._lock:
            if self._read_errors_served[instance_id] >= faults.invocation_read_errors:
                return None
            self._read_errors_served[instance_id] += 1
        return faults.invocation_read_error

    def update(self, data: dict[str, Any]) -> None:
        if "defaults" in data:
            self.defaults = InstanceFaults.from_json(data["defaults"], self.defaults)
            if "invocation_read_errors" in data["defaults"]:
                with self._lock:
                    self._read_errors_served.clear()
        for instance_id, settings in data.get("instances", {}).items():
            self.instances[instance_id] = InstanceFaults.from_json(settings, self.for_instance(instance_id))
            if "invocation_read_errors" in settings:
                with self._lock:
                    self._read_errors_served.pop(instance_id, None)
        if "throttle_fraction" in data:
            fraction = float(data["throttle_fraction"])
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"throttle_fraction {fraction} is outside 0..1")
            self.throttle_fraction = fraction
