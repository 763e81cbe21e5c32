"""EC2 instance states that take time, and the SSM agent registration that follows `running`.

moto flips StartInstances/StopInstances instantly. Here a started instance stays `pending` and a stopped one
`stopping` for a configurable time, as on AWS, so the DAG's waits are exercised for real.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from include.local_aws.faults import FaultPlan

STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


class Ec2Error(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def find_instance(instance_id: str) -> Any | None:
    """The moto Instance with this id, in whichever account and region holds it."""
    from moto.ec2.models import ec2_backends

    for account_backends in ec2_backends.values():
        for backend in account_backends.values():
            if (instance := backend.get_instance_by_id(instance_id)) is not None:
                return instance
    return None


class Ec2Lifecycle:
    def __init__(self, faults: FaultPlan, on_stopping: Callable[[str], None]) -> None:
        self._faults = faults
        self._on_stopping = on_stopping
        self._lock = threading.Lock()
        self._generation: Counter[str] = Counter()
        self._running_since: dict[str, float] = {}
        self._start_attempts: Counter[str] = Counter()
        self.running_intervals: dict[str, list[list[float | None]]] = {}  # wall-clock [running, stop requested]

    def _set_state(self, instance: Any, name: str) -> None:
        instance._state.name = name
        instance._state.code = STATE_CODES[name]

    def _later(self, instance_id: str, seconds: float, state: str) -> None:
        with self._lock:
            self._generation[instance_id] += 1
            generation = self._generation[instance_id]

        def apply() -> None:
            with self._lock:
                if self._generation[instance_id] != generation:
                    return  # a newer transition replaced this one
                instance = find_instance(instance_id)
                if instance is not None:
                    self._set_state(instance, state)
                    if state == "running":
                        self._running_since[instance_id] = time.monotonic()
                        self.running_intervals.setdefault(instance_id, []).append([time.time(), None])

        timer = threading.Timer(seconds, apply)
        timer.daemon = True
        timer.start()

    def check_start(self, instance_ids: list[str]) -> None:
        """Raise the error AWS would give before moto starts these instances."""
        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is None:
                continue  # moto answers InvalidInstanceID.NotFound itself
            if instance.state in ("stopping", "shutting-down", "terminated"):
                raise Ec2Error(
                    "IncorrectInstanceState",
                    f"The instance '{instance_id}' is not in a state from which it can be started.",
                )
            self._start_attempts[instance_id] += 1
            if self._start_attempts[instance_id] <= self._faults.for_instance(instance_id).insufficient_capacity_starts:
                raise Ec2Error(
                    "InsufficientInstanceCapacity",
                    "We currently do not have sufficient g6e.xlarge capacity in the Availability Zone you requested.",
                )

    def check_stop(self, instance_ids: list[str]) -> None:
        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is not None and instance.state == "pending":
                raise Ec2Error(
                    "IncorrectInstanceState",
                    f"The instance '{instance_id}' is not in a state from which it can be stopped.",
                )

    def started(self, instance_ids: list[str], previous: dict[str, str]) -> None:
        """moto has set them running; show pending for a while, as AWS does."""
        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is None or previous.get(instance_id) in ("running", "pending"):
                continue
            with self._lock:
                self._running_since.pop(instance_id, None)
                self._set_state(instance, "pending")
            self._later(instance_id, self._faults.for_instance(instance_id).pending_seconds, "running")

    def stopped(self, instance_ids: list[str], previous: dict[str, str]) -> None:
        """moto has set them stopped; show stopping for a while and end the agent's work on them."""
        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is None or previous.get(instance_id) in ("stopped", "stopping"):
                continue
            with self._lock:
                self._running_since.pop(instance_id, None)
                self._set_state(instance, "stopping")
                for interval in self.running_intervals.get(instance_id, []):
                    if interval[1] is None:
                        interval[1] = time.time()
            self._on_stopping(instance_id)
            self._later(instance_id, self._faults.for_instance(instance_id).stopping_seconds, "stopped")

    def states(self, instance_ids: list[str]) -> dict[str, str]:
        return {i: inst.state for i in instance_ids if (inst := find_instance(i)) is not None}

    def registered(self, instance_id: str) -> bool:
        """Whether the instance's SSM agent has ever registered (so SSM knows the instance)."""
        return self.agent_online(instance_id) or instance_id in self._generation

    def agent_online(self, instance_id: str) -> bool:
        instance = find_instance(instance_id)
        faults = self._faults.for_instance(instance_id)
        if instance is None or instance.state != "running" or faults.agent_never_online:
            return False
        with self._lock:
            since = self._running_since.setdefault(instance_id, time.monotonic())
        return time.monotonic() - since >= faults.agent_registration_seconds
