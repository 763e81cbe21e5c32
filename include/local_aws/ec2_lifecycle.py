"""EC2 instance states that take time, and the SSM agent registration that follows `running`.

moto flips RunInstances/StartInstances/StopInstances/TerminateInstances instantly. Here a launched or started
instance stays `pending`, a stopped one `stopping` and a terminated one `shutting-down` for a configurable time, as on
AWS, so the DAG's waits are exercised for real. As on AWS, every start sets a new `LaunchTime`, a start can end
`pending -> stopped` with a `StateReason` (capacity, a KMS key the volume cannot use), the SSM agent's
`LastPingDateTime` follows its heartbeats, and after a stop `PingStatus` stays a stale `Online` for a while. Requests
naming an instance can be refused as for a principal lacking the permission.

RunInstances (`plan_launch`, `launched`) is served as EC2 serves it where moto is kinder: it launches MaxCount
instances when there is room (moto launches MinCount), fails whole when the fault plan's capacity cannot cover
MinCount, takes the instance type, Spot market and instance profile from the launch template too (moto takes only the
type, and gives a request's instance profile to the first instance alone), and answers an unknown launch template
with EC2's errors (moto: a generic message, or a server error for an unknown id). A launched instance's SSM agent is
unknown to SSM until it first comes Online. A terminated instance leaves SSM (DescribeInstanceInformation no longer
lists it, SendCommand refuses it) and cannot be started or stopped (moto starts it again).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from include.local_aws.faults import CAPACITY_ERROR, DENIABLE_ACTIONS, SPOT_ERRORS, FaultPlan

# Requests naming a just-launched instance by id that EC2's eventual consistency can answer with
# InvalidInstanceID.NotFound (faults.py, `launch_visibility_seconds`).
LAUNCH_INCONSISTENT_ACTIONS = (
    "DescribeInstances",
    "DescribeInstanceStatus",
    "CreateTags",
    "StartInstances",
    "StopInstances",
    "TerminateInstances",
)
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


class Ec2Error(Exception):
    def __init__(self, code: str, message: str, status: str = "400 Bad Request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # the HTTP status line EC2 answers with


@dataclass(frozen=True)
class LaunchRequest:
    """What of a RunInstances request decides what EC2 launches (the query form's parameters)."""

    region: str
    min_count: int
    max_count: int
    instance_type: str | None = None
    template: Mapping[str, str] | None = None  # LaunchTemplateId or LaunchTemplateName, and Version
    market_type: str | None = None  # InstanceMarketOptions.MarketType
    max_price: str | None = None  # InstanceMarketOptions.SpotOptions.MaxPrice
    zone: str | None = None  # Placement.AvailabilityZone
    profile: Mapping[str, str] | None = None  # IamInstanceProfile: Name or Arn

    @classmethod
    def from_form(cls, form: Mapping[str, str], region: str) -> LaunchRequest:
        def part(prefix: str) -> dict[str, str] | None:
            fields = {key[len(prefix) :]: value for key, value in form.items() if key.startswith(prefix)}
            return fields or None

        return cls(
            region=region,
            min_count=int(form.get("MinCount", 1)),
            max_count=int(form.get("MaxCount", form.get("MinCount", 1))),
            instance_type=form.get("InstanceType"),
            template=part("LaunchTemplate."),
            market_type=form.get("InstanceMarketOptions.MarketType"),
            max_price=form.get("InstanceMarketOptions.SpotOptions.MaxPrice"),
            zone=form.get("Placement.AvailabilityZone"),
            profile=part("IamInstanceProfile."),
        )


@dataclass(frozen=True)
class Launch:
    """What a RunInstances launches: `count` instances of `instance_type`, Spot or not, with this instance profile
    (from the request, else the launch template)."""

    count: int
    instance_type: str
    spot: bool
    profile: Mapping[str, str] | None


def _ec2_backend(region: str) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    return ec2_backends[DEFAULT_ACCOUNT_ID][region]


def launch_template_data(spec: Mapping[str, str], region: str) -> dict[str, Any]:
    """The LaunchTemplateData of the version a RunInstances names, or the Ec2Error EC2 answers: moto answers an
    unknown name with a generic message and an unknown id with a server error."""
    backend = _ec2_backend(region)
    if "LaunchTemplateId" in spec:
        template = backend.launch_templates.get(spec["LaunchTemplateId"])
        if template is None:
            raise Ec2Error(
                "InvalidLaunchTemplateId.NotFound",
                f"The specified launch template, with template ID {spec['LaunchTemplateId']}, does not exist.",
            )
    elif "LaunchTemplateName" in spec:
        template_id = backend.launch_template_name_to_ids.get(spec["LaunchTemplateName"])
        if template_id is None:
            raise Ec2Error(
                "InvalidLaunchTemplateName.NotFoundException",
                f"The specified launch template, with template name {spec['LaunchTemplateName']}, does not exist.",
            )
        template = backend.launch_templates[template_id]
    else:
        raise Ec2Error(
            "MissingParameter", "The request must contain the parameter launchTemplateId or launchTemplateName"
        )
    version = spec.get("Version", "$Default")
    try:
        return dict(template.get_version(version).data)
    except Exception as error:  # moto's InvalidLaunchTemplateVersionNotFound, with EC2's code and message
        code = getattr(error, "code", "InvalidLaunchTemplateId.VersionNotFound")
        raise Ec2Error(code, getattr(error, "message", str(error))) from error


def _check_instance_profile(profile: Mapping[str, str]) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    known = backend.get_instance_profiles()
    if "Arn" in profile and not any(p.arn == profile["Arn"] for p in known):
        raise Ec2Error(
            "InvalidParameterValue",
            f"Value ({profile['Arn']}) for parameter iamInstanceProfile.arn is invalid. Invalid IAM Instance Profile "
            "ARN",
        )
    if "Name" in profile and not any(p.name == profile["Name"] for p in known):
        raise Ec2Error(
            "InvalidParameterValue",
            f"Value ({profile['Name']}) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile "
            "name",
        )


def find_instance(instance_id: str) -> Any | None:
    """The moto Instance with this id, in whichever account and region holds it."""
    from moto.ec2.models import ec2_backends

    for account_backends in ec2_backends.values():
        for backend in account_backends.values():
            if (instance := backend.get_instance_by_id(instance_id)) is not None:
                return instance
    return None


class Ec2Lifecycle:
    def __init__(self, faults: FaultPlan, on_stopping: Callable[[str, bool], None]) -> None:
        self._faults = faults
        self._on_stopping = on_stopping
        self._lock = threading.Lock()
        self._generation: Counter[str] = Counter()
        self._running_since: dict[str, float] = {}
        self._start_attempts: Counter[str] = Counter()
        self._last_ping: dict[str, float] = {}  # wall-clock time of the agent's last heartbeat
        self._unregistered: set[str] = set()  # launched, and their SSM agent has not come Online yet
        self._never_running: set[str] = set()  # launched, and not running yet
        self._visible_after: dict[str, float] = {}  # launched: unknown to requests by id until then (monotonic)
        self.running_intervals: dict[str, list[list[float | None]]] = {}  # wall-clock [running, stop requested]
        self.spot_notices: dict[str, dict[str, str]] = {}  # instance -> its `spot/instance-action` document

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
                        self._never_running.discard(instance_id)
                        self._running_since[instance_id] = time.monotonic()
                        self.running_intervals.setdefault(instance_id, []).append([time.time(), None])
                        self._plan_spot_interruption(instance)

        timer = threading.Timer(seconds, apply)
        timer.daemon = True
        timer.start()

    def _plan_spot_interruption(self, instance: Any) -> None:
        """A Spot instance with `spot_interruption_seconds` set gets its notice then, and is terminated
        `spot_notice_seconds` later (faults.py). Once per instance: a terminated instance does not run again. Called
        with the lock held (when the instance comes to `running`)."""
        faults = self._faults.for_instance(instance.id)
        if getattr(instance, "lifecycle", None) != "spot" or faults.spot_interruption_seconds is None:
            return
        if instance.id in self.spot_notices:
            return

        def notice() -> None:
            from datetime import UTC, datetime, timedelta

            current = find_instance(instance.id)
            if current is None or current.state != "running":
                return
            when = datetime.now(UTC) + timedelta(seconds=faults.spot_notice_seconds)
            with self._lock:
                self.spot_notices[instance.id] = {"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
            timer = threading.Timer(faults.spot_notice_seconds, interrupt)
            timer.daemon = True
            timer.start()

        def interrupt() -> None:
            current = find_instance(instance.id)
            if current is None or current.state in ("shutting-down", "terminated"):
                return
            from moto.ec2.models.instances import StateReason

            previous = current.state
            code, message = (
                "Server.SpotInstanceTermination",
                "Server.SpotInstanceTermination: Spot instance termination",
            )
            current.ec2_backend.terminate_instances([instance.id])
            with self._lock:  # EC2's reason from shutting-down on (moto's terminate says a user shut it down)
                current.state_reason = StateReason(message, code)
                current._reason = message
            self.terminated([instance.id], {instance.id: previous}, reason=(code, message))

        self.spot_notices.setdefault(instance.id, {})  # planned: not planned again (the caller holds the lock)
        timer = threading.Timer(faults.spot_interruption_seconds, notice)
        timer.daemon = True
        timer.start()

    def spot_instance_action(self, instance_id: str) -> dict[str, str] | None:
        """The instance's `spot/instance-action` metadata: the interruption notice, or None (IMDS answers 404)."""
        with self._lock:
            return self.spot_notices.get(instance_id) or None

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
            if instance is None:
                continue
            with self._lock:
                never_running = instance_id in self._never_running
            if instance.state == "pending" and never_running:
                raise Ec2Error(
                    "IncorrectInstanceState",
                    f"Instance '{instance_id}' cannot be stopped as it has never reached the 'running' state.",
                )
            if instance.state in ("pending", "shutting-down", "terminated"):
                raise Ec2Error(
                    "IncorrectInstanceState",
                    f"The instance '{instance_id}' is not in a state from which it can be stopped.",
                )

    def plan_launch(self, request: LaunchRequest) -> Launch:
        """What this RunInstances launches, or the Ec2Error EC2 refuses it with: an unknown launch template or
        instance profile, or too little capacity for MinCount (the fault plan's `capacity` / `spot_capacity`)."""
        template = launch_template_data(request.template, request.region) if request.template else {}
        instance_type = request.instance_type or template.get("InstanceType") or "m1.small"
        market = request.market_type or template.get("InstanceMarketOptions", {}).get("MarketType")
        spot = market == "spot"
        profile = request.profile or template.get("IamInstanceProfile") or None
        if profile:
            _check_instance_profile(profile)
        count = self._faults.take_launch_capacity(
            instance_type, spot=spot, min_count=request.min_count, max_count=request.max_count
        )
        if count is None:
            zone = request.zone or f"{request.region}a"
            if spot:
                code = self._faults.spot_error
                status, message = SPOT_ERRORS[code]
                max_price = request.max_price or template.get("InstanceMarketOptions", {}).get("SpotOptions", {}).get(
                    "MaxPrice", "0.5"
                )
                raise Ec2Error(
                    code,
                    message.format(max_price=max_price, minimum_price=f"{float(max_price) * 1.25:.4f}"),
                    status,
                )
            code, status, message = CAPACITY_ERROR
            others = ", ".join(f"{request.region}{z}" for z in "bcd" if f"{request.region}{z}" != zone)
            raise Ec2Error(code, message.format(instance_type=instance_type, zone=zone, other_zones=others), status)
        return Launch(count, instance_type, spot, profile)

    def launched(self, instance_ids: list[str], launch: Launch) -> None:
        """moto has launched them running; show pending for a while, as AWS does. Their agents are unknown to SSM
        until they first come Online. Gives every instance the launch's instance profile and Spot lifecycle where
        moto did not."""
        from moto.ec2.exceptions import IncorrectStateIamProfileAssociationError

        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is None:
                continue
            if launch.profile and instance_id not in instance.ec2_backend.iam_instance_profile_associations:
                try:
                    instance.ec2_backend.associate_iam_instance_profile(
                        instance_id=instance_id,
                        iam_instance_profile_name=launch.profile.get("Name"),
                        iam_instance_profile_arn=launch.profile.get("Arn"),
                    )
                except IncorrectStateIamProfileAssociationError:
                    pass
            if launch.spot:
                instance.lifecycle = "spot"
            with self._lock:
                hidden = self._faults.for_instance(instance_id).launch_visibility_seconds
                if hidden > 0:
                    self._visible_after[instance_id] = time.monotonic() + hidden
                self._unregistered.add(instance_id)
                self._never_running.add(instance_id)
                self._running_since.pop(instance_id, None)
                self._set_state(instance, "pending")
            self._later(instance_id, self._faults.for_instance(instance_id).pending_seconds, "running")

    def check_visible(self, action: str, named_ids: list[str]) -> None:
        """InvalidInstanceID.NotFound for a request that names (by id, not by a filter) an instance launched less
        than its `launch_visibility_seconds` ago: EC2's eventual consistency after RunInstances (faults.py)."""
        now = time.monotonic()
        with self._lock:
            hidden = [i for i in named_ids if self._visible_after.get(i, 0.0) > now]
        if hidden and action in LAUNCH_INCONSISTENT_ACTIONS:
            raise Ec2Error("InvalidInstanceID.NotFound", f"The instance ID '{hidden[0]}' does not exist")

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
            self._going_down(instance, running=previous.get(instance_id) == "running", state="stopping")
            self._later(instance_id, self._faults.for_instance(instance_id).stopping_seconds, "stopped")

    def terminated(
        self, instance_ids: list[str], previous: dict[str, str], reason: tuple[str, str] | None = None
    ) -> None:
        """moto has set them terminated; show shutting-down for a while (then terminated, with `reason` as its
        StateReason when given) and end the agent's work on them, as a stop does."""
        for instance_id in instance_ids:
            instance = find_instance(instance_id)
            if instance is None or previous.get(instance_id) in ("shutting-down", "terminated"):
                continue
            self._going_down(instance, running=previous.get(instance_id) == "running", state="shutting-down")
            faults = self._faults.for_instance(instance_id)
            seconds = faults.stopping_seconds if faults.shutting_down_seconds is None else faults.shutting_down_seconds
            self._later(instance_id, seconds, "terminated", reason)

    def _going_down(self, instance: Any, *, running: bool, state: str) -> None:
        """Stopping or shutting down: the agent's last heartbeat, the running interval closed, its commands ended."""
        instance_id = instance.id
        with self._lock:
            agent_was_up = self._agent_up(instance_id, running=running)
            if agent_was_up:
                self._last_ping[instance_id] = time.time()  # its last heartbeat: the stale Online shows it
                self._unregistered.discard(instance_id)
            self._running_since.pop(instance_id, None)
            self._set_state(instance, state)
            for interval in self.running_intervals.get(instance_id, []):
                if interval[1] is None:
                    interval[1] = time.time()
        self._on_stopping(instance_id, agent_was_up)

    def states(self, instance_ids: list[str]) -> dict[str, str]:
        return {i: inst.state for i in instance_ids if (inst := find_instance(i)) is not None}

    def registered(self, instance_id: str) -> bool:
        """Whether SSM knows the instance: its agent registered once (a launched instance's agent, when it first came
        Online), it is not terminated (SSM forgets a terminated instance), and its agent is not one that never
        registers (`agent_never_online`)."""
        if self.agent_online(instance_id):
            return True
        instance = find_instance(instance_id)
        if instance is None or instance.state == "terminated":
            return False
        if self._faults.for_instance(instance_id).agent_never_online:
            return False
        with self._lock:
            return instance_id in self._generation and instance_id not in self._unregistered

    def agent_online(self, instance_id: str) -> bool:
        """Whether the instance's agent is really connected (what delivery of commands depends on)."""
        instance = find_instance(instance_id)
        faults = self._faults.for_instance(instance_id)
        if instance is None or instance.state != "running" or faults.agent_never_online:
            return False
        with self._lock:
            since = self._running_since.setdefault(instance_id, time.monotonic())
            online = time.monotonic() - since >= faults.agent_registration_seconds
            if online:
                self._unregistered.discard(instance_id)
        return online

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
