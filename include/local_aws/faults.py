"""Timing and fault injection for the emulator, per instance, with defaults for instances not named.

Set at start (`python -m include.local_aws --pending-seconds 3 ...`) or at run time with
`POST /_local_aws/faults` and a JSON body such as:

    {"defaults": {"agent_registration_seconds": 5},
     "instances": {"i-0123456789abcdef0": {"insufficient_capacity_starts": 2, "agent_never_online": true,
                                           "invocation_read_errors": 6, "invocation_read_error": "ServiceUnavailable"},
                   "i-0fedcba9876543210": {"failed_starts": 1, "failed_start_reason": "Client.InternalError",
                                           "denied_actions": ["StartInstances"], "stale_online_seconds": 300}},
     "throttle_fraction": 0.1,
     "capacity": {"g6e.12xlarge": 0, "g6e.xlarge": 2}, "spot_capacity": {"*": 0},
     "spot_error": "InsufficientInstanceCapacity"}

`capacity` and `spot_capacity` are EC2's room for new instances, by instance type, for RunInstances (On-Demand and
Spot): how many more instances of that type it can still launch, `"*"` for each type not named; a type not limited
launches without limit. Each launch uses the room up (setting the market's map again refills it), and as on AWS a
RunInstances that cannot get its MinCount fails whole, one that can gets as many as it asked for up to its MaxCount.
Beyond the room, On-Demand fails with `InsufficientInstanceCapacity` (CAPACITY_ERROR) and Spot with `spot_error`,
one of SPOT_ERRORS. `{"capacity": {}, "spot_capacity": {}}` lifts the limits.
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

# StateReason of a start that goes pending -> stopped, by code: EC2's own messages. Capacity is Server.*; a KMS key
# the instance's volume cannot use (a missing grant, a disabled key) shows as Client.InternalError "Client error on
# launch", or Client.InvalidKMSKey.InvalidState.
FAILED_START_REASONS: dict[str, str] = {
    "Server.InsufficientInstanceCapacity": "Server.InsufficientInstanceCapacity: Insufficient capacity to satisfy "
    "instance request",
    "Server.InternalError": "Server.InternalError: Internal error on launch",
    "Client.InternalError": "Client.InternalError: Client error on launch",
    "Client.InvalidKMSKey.InvalidState": "Client.InvalidKMSKey.InvalidState: The KMS key provided is in an incorrect "
    "state",
    "Client.VolumeLimitExceeded": "Client.VolumeLimitExceeded: Volume limit exceeded",
}
# RunInstances beyond `capacity` (On-Demand): EC2's error, a server error (HTTP 500, which SDKs retry), its message
# naming the type and the zone.
CAPACITY_ERROR = (
    "InsufficientInstanceCapacity",
    "500 Internal Server Error",
    "We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested ({zone}). Our "
    "system will be working on provisioning additional capacity. You can currently get {instance_type} capacity by not "
    "specifying an Availability Zone in your request or choosing {other_zones}.",
)
# RunInstances with InstanceMarketOptions spot beyond `spot_capacity`, by `spot_error`: (HTTP status, message). No
# capacity is InsufficientInstanceCapacity with EC2's Spot message; the Spot quota and a MaxPrice under the Spot price
# are client errors.
SPOT_ERRORS: dict[str, tuple[str, str]] = {
    "InsufficientInstanceCapacity": (
        "500 Internal Server Error",
        "There is no Spot capacity available that matches your request.",
    ),
    "MaxSpotInstanceCountExceeded": ("400 Bad Request", "Max spot instance count exceeded"),
    "SpotMaxPriceTooLow": (
        "400 Bad Request",
        "Your Spot request price of {max_price} is lower than the minimum required Spot request fulfillment price of "
        "{minimum_price}.",
    ),
}
# Errors for `denied_actions` (EC2 answers UnauthorizedOperation; AccessDenied is what some callers meet instead).
DENIED_ERRORS = ("UnauthorizedOperation", "AccessDenied")
# EC2 actions `denied_actions` can refuse, for requests that name the instance.
DENIABLE_ACTIONS = ("StartInstances", "StopInstances", "DescribeInstances", "CreateTags", "DeleteTags", "DescribeTags")


@dataclass(frozen=True)
class InstanceFaults:
    """How one emulated instance behaves. Durations are seconds."""

    pending_seconds: float = 2.0  # StartInstances and RunInstances: pending -> running
    stopping_seconds: float = 2.0  # StopInstances: stopping -> stopped
    shutting_down_seconds: float | None = None  # TerminateInstances: shutting-down -> terminated; None: stopping's
    agent_registration_seconds: float = 1.0  # running -> SSM PingStatus Online (slow registration: raise it)
    agent_never_online: bool = False  # the SSM agent never registers
    insufficient_capacity_starts: int = 0  # the first N StartInstances fail with InsufficientInstanceCapacity
    invocation_visibility_seconds: float = 0.0  # after SendCommand, the invocation is unknown for this long
    # The next N GetCommandInvocation calls about this instance (counted from when this is set) fail with
    # `invocation_read_error`, one of INVOCATION_READ_ERRORS.
    invocation_read_errors: int = 0
    invocation_read_error: str = "InternalServerError"
    # The next N SendCommands to this instance (counted from when this is set) are accepted, so the command exists
    # and runs, but the connection is closed before the answer: what a read timeout or a dropped connection leaves a
    # caller with, not knowing whether SSM took the command (SendCommand has no idempotency token).
    send_answers_lost: int = 0
    # After the agent goes offline (the instance stops), DescribeInstanceInformation keeps answering PingStatus
    # Online with the last LastPingDateTime for this long, as AWS does for minutes; a quick stop/start shows the
    # stale Online while the new boot's agent has not checked in yet. Short by default to keep tests quick.
    stale_online_seconds: float = 3.0
    # The next N starts (counted from when this is set) go pending -> stopped with StateReason
    # `failed_start_reason`, one of FAILED_START_REASONS.
    failed_starts: int = 0
    failed_start_reason: str = "Server.InsufficientInstanceCapacity"
    # EC2 actions (DENIABLE_ACTIONS) refused for this instance with `denied_error`, one of DENIED_ERRORS, as for a
    # principal whose policy lacks them.
    denied_actions: tuple[str, ...] = ()
    denied_error: str = "UnauthorizedOperation"
    # Each model run (the chunk script's ffmpeg marked VOD_SR_SR_RUN=1) lasts this long at least: the real ffmpeg
    # (niced) makes the output, then the stand-in waits out the rest. A GPU's pace, which does not slow down when the
    # emulator's host runs short of CPU (benchmarks on a small machine); None: as long as the real ffmpeg takes.
    model_run_seconds: float | None = None
    # For this long after RunInstances launched it, requests naming the instance by id answer
    # InvalidInstanceID.NotFound: the EC2 API is eventually consistent, and "if you successfully run the RunInstances
    # command, and then immediately run another command using the instance ID that was provided in the response of
    # RunInstances, it may return an InvalidInstanceID.NotFound error. This does not mean the instance does not
    # exist" (Amazon EC2 Developer Guide, "Eventual consistency in the Amazon EC2 API"). Set it in the defaults: the
    # ids of instances still to be launched are not known. 0: visible at once.
    launch_visibility_seconds: float = 0.0
    # The SSM agent's own limits (aws/amazon-ssm-agent, agent/appconfig/constants.go: DefaultCommandWorkersLimit = 5,
    # DefaultCommandWorkerBufferLimit = 5; `Mds.CommandWorkersLimit` / `Mds.CommandWorkerBufferLimit` in
    # amazon-ssm-agent.json raise them): this many commands execute at once, this many more wait in the agent's job
    # queue (already reported InProgress), and a command beyond both stays Pending in SSM while the agent's message
    # loop retries it every `agent_buffer_full_retry_seconds` (mdsinteractor.go: "Will wake up every 10 seconds till
    # the buffer is free"); cancels reach the agent through the same loop, so they wait behind it too.
    # A Spot instance (launched with InstanceMarketOptions spot) is interrupted this many seconds after it first runs
    # (None: never): its instance metadata serves the interruption notice at `spot/instance-action`
    # ({"action": "terminate", "time": ...}, 404 before), and `spot_notice_seconds` later it goes shutting-down ->
    # terminated with StateReason Server.SpotInstanceTermination, as EC2 does ("Spot Instance interruption notices":
    # a two-minute warning). Set it in the defaults for instances still to be launched.
    spot_interruption_seconds: float | None = None
    spot_notice_seconds: float = 120.0
    command_workers_limit: int = 5
    command_worker_buffer_limit: int = 5
    agent_buffer_full_retry_seconds: float = 10.0

    @classmethod
    def from_json(cls, data: dict[str, Any], base: InstanceFaults | None = None) -> InstanceFaults:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {sorted(known)}")
        error = data.get("invocation_read_error", "InternalServerError")
        if error not in INVOCATION_READ_ERRORS:
            raise ValueError(f"invocation_read_error {error!r} is not one of {sorted(INVOCATION_READ_ERRORS)}")
        reason = data.get("failed_start_reason", "Server.InsufficientInstanceCapacity")
        if reason not in FAILED_START_REASONS:
            raise ValueError(f"failed_start_reason {reason!r} is not one of {sorted(FAILED_START_REASONS)}")
        if data.get("denied_error", "UnauthorizedOperation") not in DENIED_ERRORS:
            raise ValueError(f"denied_error {data['denied_error']!r} is not one of {list(DENIED_ERRORS)}")
        if "denied_actions" in data:
            unknown_actions = set(data["denied_actions"]) - set(DENIABLE_ACTIONS)
            if unknown_actions:
                raise ValueError(f"denied_actions {sorted(unknown_actions)} are not among {list(DENIABLE_ACTIONS)}")
            data = {**data, "denied_actions": tuple(data["denied_actions"])}
        for limit in ("command_workers_limit", "command_worker_buffer_limit"):
            if limit in data and (not isinstance(data[limit], int) or data[limit] < 1):
                raise ValueError(
                    f"{limit} must be a whole number of at least 1 (the agent's minimum), not {data[limit]!r}"
                )
        return replace(base or cls(), **data)


@dataclass
class FaultPlan:
    defaults: InstanceFaults
    instances: dict[str, InstanceFaults]
    throttle_fraction: float = 0.0  # share of SSM and EC2 calls answered with a throttling error
    capacity: dict[str, int] = field(default_factory=dict)  # RunInstances On-Demand room by type (module docstring)
    spot_capacity: dict[str, int] = field(default_factory=dict)  # the same for Spot
    spot_error: str = "InsufficientInstanceCapacity"  # one of SPOT_ERRORS
    _launched: Counter[tuple[bool, str]] = field(default_factory=Counter)  # (spot, type) -> launched since set
    _read_errors_served: Counter[str] = field(default_factory=Counter)
    _failed_starts_served: Counter[str] = field(default_factory=Counter)
    _answers_lost_served: Counter[str] = field(default_factory=Counter)
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

    def send_answer_lost(self, instance_id: str) -> bool:
        """Whether the answer to this SendCommand to `instance_id` must be lost (the command is still accepted)."""
        faults = self.for_instance(instance_id)
        with self._lock:
            if self._answers_lost_served[instance_id] >= faults.send_answers_lost:
                return False
            self._answers_lost_served[instance_id] += 1
        return True

    def failed_start(self, instance_id: str) -> tuple[str, str] | None:
        """The StateReason (code, message) this start of `instance_id` must fail with, or None to let it run."""
        faults = self.for_instance(instance_id)
        with self._lock:
            if self._failed_starts_served[instance_id] >= faults.failed_starts:
                return None
            self._failed_starts_served[instance_id] += 1
        return faults.failed_start_reason, FAILED_START_REASONS[faults.failed_start_reason]

    def take_launch_capacity(self, instance_type: str, *, spot: bool, min_count: int, max_count: int) -> int | None:
        """How many instances a RunInstances of `instance_type` launches: MaxCount, or what room is left when that is
        at least MinCount (and that room is used up); None when the room is short of MinCount, for the launch fails
        whole."""
        limits = self.spot_capacity if spot else self.capacity
        with self._lock:
            limit = limits.get(instance_type, limits.get("*"))
            if limit is None:
                return max_count
            room = max(0, limit - self._launched[spot, instance_type])
            if room < min_count:
                return None
            count = min(max_count, room)
            self._launched[spot, instance_type] += count
            return count

    def update(self, data: dict[str, Any]) -> None:
        if "defaults" in data:
            self.defaults = InstanceFaults.from_json(data["defaults"], self.defaults)
            with self._lock:
                if "invocation_read_errors" in data["defaults"]:
                    self._read_errors_served.clear()
                if "failed_starts" in data["defaults"]:
                    self._failed_starts_served.clear()
                if "send_answers_lost" in data["defaults"]:
                    self._answers_lost_served.clear()
        for instance_id, settings in data.get("instances", {}).items():
            self.instances[instance_id] = InstanceFaults.from_json(settings, self.for_instance(instance_id))
            with self._lock:
                if "invocation_read_errors" in settings:
                    self._read_errors_served.pop(instance_id, None)
                if "failed_starts" in settings:
                    self._failed_starts_served.pop(instance_id, None)
                if "send_answers_lost" in settings:
                    self._answers_lost_served.pop(instance_id, None)
        if "throttle_fraction" in data:
            fraction = float(data["throttle_fraction"])
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"throttle_fraction {fraction} is outside 0..1")
            self.throttle_fraction = fraction
        self._update_capacity(data)

    def _update_capacity(self, data: dict[str, Any]) -> None:
        """`capacity`, `spot_capacity`, `spot_error`: all checked before any is applied."""
        if data.get("spot_error", "InsufficientInstanceCapacity") not in SPOT_ERRORS:
            raise ValueError(f"spot_error {data['spot_error']!r} is not one of {sorted(SPOT_ERRORS)}")
        for market in ("capacity", "spot_capacity"):
            limits = data.get(market, {})
            if not isinstance(limits, dict) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in limits.values()
            ):
                raise ValueError(f"{market} must map instance types (or '*') to counts >= 0, not {limits!r}")
        if "spot_error" in data:
            self.spot_error = data["spot_error"]
        for market, spot in (("capacity", False), ("spot_capacity", True)):
            if market in data:
                limits = data[market]
                with self._lock:
                    setattr(self, market, dict(limits))
                    for key in [key for key in self._launched if key[0] == spot]:
                        del self._launched[key]
