"""EC2 instance states that take time, and the SSM agent registration that follows `running`.

moto flips StartInstances/StopInstances instantly. Here a started instance stays `pending` and a stopped one
`stopping` for a configurable time, as on AWS, so the DAG's waits are exercised for real. As on AWS, every start
sets a new `LaunchTime`, a start can end `pending -> stopped` with a `StateReason` (capacity, a KMS key the volume
cannot use), the SSM agent's `LastPingDateTime` follows its heartbeats, and after a stop `PingStatus` stays a stale
`Online` for a while. Requests naming an instance can be refused as for a principal lacking the permission.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from include.local_aws.faults import DENIABLE_ACTIONS, FaultPlan

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
        self._last_ping: dict[str, float] = {}  # wall-clock time of the agent's last heartbeat
        self.running_intervals: dict[str, list[list[float | None]]] = {}  # wall-clock [running, stop requested]

    def _set_state(self, instance: Any, name: str) -> None:
        instance._state.name = name
        instance._state.code = STATE_CODES[name]

    def _later(self, instance_id: str, seconds: float, state: str, reason: tuple[str, str] | None = None) -> None:
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
                    if reason is not None:
                        from moto.ec2.models.instances import StateReason

                        code, message = reason
                        instance.state_reason = StateReason(message, code)
                        instance._reason = message  # StateTransitionReason
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

    def check_request(self, action: str, instance_ids: list[str]) -> None:
        """Raise the error AWS would give before moto serves an EC2 request naming these instances: the permission
        faults, and CreateTags on an instance that does not exist (moto accepts any id)."""
        if action in DENIABLE_ACTIONS:
            for instance_id in instance_ids:
                faults = self._faults.for_instance(instance_id)
                if action in faults.denied_actions:
                    raise Ec2Error(
                        faults.denied_error,
                        "You are not authorized to perform this operation. User: "
                        "arn:aws:sts::123456789012:assumed-role/vod-sr-airflow/airflow is not authorized to perform: "
                        f"ec2:{action} on resource: arn:aws:ec2:us-east-1:123456789012:instance/{instance_id} "
                        f"because no identity-based policy allows the ec2:{action} action",
                    )
        if action == "CreateTags":
            for instance_id in instance_ids:
                if instance_id.startswith("i-") and find_instance(instance_id) is None:
                    raise Ec2Error("InvalidInstanceID.NotFound", f"The instance ID '{instance_id}' does not exist")

    def started(self, instance_ids: list[str], previous: dict[str, str]) -> None:
        """moto has set them running; show pending for a while, as AWS does, with a new LaunchTime. A start the
        faults make fail goes on to `stopped` with their StateReason instead of `running`."""
        from moto.core.utils import utcnow

        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is None or previous.get(instance_id) in ("running", "pending"):
                continue
            with self._lock:
                self._running_since.pop(instance_id, None)
                self._set_state(instance, "pending")
                instance.launch_time = utcnow()  # moto sets it once, at RunInstances; EC2 at every start
            faults = self._faults.for_instance(instance_id)
            if (reason := self._faults.failed_start(instance_id)) is not None:
                self._later(instance_id, faults.pending_seconds, "stopped", reason)
            else:
                self._later(instance_id, faults.pending_seconds, "running")

    def stopped(self, instance_ids: list[str], previous: dict[str, str]) -> None:
        """moto has set them stopped; show stopping for a while and end the agent's work on them."""
        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is None or previous.get(instance_id) in ("stopped", "stopping"):
                continue
            with self._lock:
                if self._agent_up(instance_id, running=previous.get(instance_id) == "running"):
                    self._last_ping[instance_id] = time.time()  # its last heartbeat: the stale Online shows it
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
        """Whether the instance's agent is really connected (what delivery of commands depends on)."""
        instance = find_instance(instance_id)
        faults = self._faults.for_instance(instance_id)
        if instance is None or instance.state != "running" or faults.agent_never_online:
            return False
        with self._lock:
            since = self._running_since.setdefault(instance_id, time.monotonic())
        return time.monotonic() - since >= faults.agent_registration_seconds

    def _agent_up(self, instance_id: str, *, running: bool) -> bool:
        """Whether the agent was connected, for an instance that was `running` (caller holds the lock)."""
        faults = self._faults.for_instance(instance_id)
        since = self._running_since.get(instance_id)
        return (
            running
            and since is not None
            and not faults.agent_never_online
            and time.monotonic() - since >= faults.agent_registration_seconds
        )

    def ping(self, instance_id: str) -> tuple[str, float | None]:
        """What DescribeInstanceInformation shows: PingStatus and LastPingDateTime (wall-clock seconds, or None if
        the agent never checked in). A connected agent heartbeats all the time; after it went away, SSM keeps
        showing Online with its last heartbeat for `stale_online_seconds`, then ConnectionLost."""
        if self.agent_online(instance_id):
            now = time.time()
            with self._lock:
                self._last_ping[instance_id] = now
            return "Online", now
        with self._lock:
            last = self._last_ping.get(instance_id)
        if last is not None and time.time() - last < self._faults.for_instance(instance_id).stale_online_seconds:
            return "Online", last
        return "ConnectionLost", last
