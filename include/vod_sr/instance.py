"""The GPU instance: EC2 state handling, SSM readiness, leases and stop-when-idle.

Runs that share an instance each hold a lease (an EC2 tag), refreshed while they work; expired leases are deleted
where leases are read. A run's teardown drops its own lease and stops the instance only when no other live lease
and no live vod-sr command of another run remain, so one run never stops another's work, and nothing else (a
patching command, a command stuck Pending) keeps the instance running. A run whose instance is stopped under it
starts it again. AWS errors no retry fixes become InstanceUnusable, with a message that says what to fix.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from include.vod_sr.fleet import RUN_TOKEN_TAG

log = logging.getLogger(__name__)

LEASE_TAG_PREFIX = "vod-sr:lease:"
LEASE_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Longer than SSM's 48 h execution ceiling. A working run refreshes its lease at every step (acquire, readiness,
# install, every chunk sent), and no step outlasts one command, so a lease not refreshed for this long is abandoned.
LEASE_TTL = timedelta(hours=49)
LIVE_COMMAND_STATES = ("Pending", "InProgress", "Delayed", "Cancelling")
COMMAND_COMMENT_PREFIX = "vod-sr "
RELEASE_XCOM_KEY = "release"  # the release task's `release_record`, read by the report
# Release outcomes after which the instance costs nothing more (the report lists any other as left running).
STOPPED_OUTCOMES = ("stopped", "stopping", "already stopped", "terminated", "terminating", "already terminated")
# SSM delivers a command to an Online agent within seconds; one Pending this long is not going anywhere soon.
STUCK_PENDING_AFTER = timedelta(minutes=10)
# AWS error codes no retry fixes: the principal lacks a permission or its credentials are refused, or the instance id
# is wrong. Failing at once says so, where four backoff retries would only delay the same message by minutes.
UNFIXABLE_ERROR_CODES = frozenset(
    {
        "UnauthorizedOperation",
        "AuthFailure",
        "Blocked",
        "OptInRequired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidInstanceId",
        "InvalidInstanceID",
    }
)
UNFIXABLE_ERROR_PREFIXES = ("AccessDenied", "InvalidInstanceID.", "Unauthorized")
# StateReason codes of a stopped instance that a start may follow: a stop asked for (by a user, another run's
# release, or the instance's own shutdown) and EC2's own trouble (Server.*: capacity, internal errors) that passes.
# Any other Client.* reason on a start that went pending -> stopped is a launch error (a KMS key the volume cannot
# use, a volume limit): starting again fails the same way.
RESTARTABLE_REASONS = ("Client.UserInitiatedShutdown", "Client.InstanceInitiatedShutdown")


class InstanceUnusable(RuntimeError):
    """The instance cannot be used for work (missing, terminated, or stopped under our feet)."""


class InstanceCapacityError(RuntimeError):
    """EC2 has no capacity for the instance type right now; retrying later may succeed."""


class Action(enum.Enum):
    USE = "use"
    START = "start"
    WAIT_RUNNING = "wait until running"
    WAIT_STOPPED_THEN_START = "wait until stopped, then start"


def instance_action(state: str) -> Action:
    """What to do with an instance found in `state` before sending it work."""
    match state:
        case "running":
            return Action.USE
        case "stopped":
            return Action.START
        case "pending":
            return Action.WAIT_RUNNING
        case "stopping":
            return Action.WAIT_STOPPED_THEN_START
        case _:
            raise InstanceUnusable(f"instance is {state}; it cannot be started")


def waiter_config(timeout: int, poll_interval: int) -> dict[str, int]:
    """A botocore WaiterConfig that gives up after about `timeout` seconds."""
    return {"Delay": poll_interval, "MaxAttempts": max(1, math.ceil(timeout / poll_interval))}


def unfixable_error_code(error: BaseException) -> str | None:
    """The error code of an AWS error that no retry fixes (see UNFIXABLE_ERROR_CODES), or None."""
    if not isinstance(error, ClientError):
        return None
    code = error.response.get("Error", {}).get("Code", "")
    return code if code in UNFIXABLE_ERROR_CODES or code.startswith(UNFIXABLE_ERROR_PREFIXES) else None


@contextmanager
def unusable_when_unfixable(instance_id: str) -> Iterator[None]:
    """Turn an AWS error no retry fixes into InstanceUnusable naming the call, the code and what to do, so the task
    fails at once with a clear message instead of retrying."""
    try:
        yield
    except ClientError as error:
        code = unfixable_error_code(error)
        if code is None:
            raise
        if code.startswith("InvalidInstanceI"):
            fix = "check the instance id (the form's instance_ids, VOD_SR_INSTANCE_IDS) and the connection's region"
        else:
            fix = (
                "the AWS principal of Airflow's connection lacks this permission or its credentials are refused; "
                "see iam/airflow-principal-policy.json"
            )
        message = error.response.get("Error", {}).get("Message", "")
        raise InstanceUnusable(
            f"{error.operation_name} for instance {instance_id} was refused with {code}: {message}. "
            f"No retry can fix this: {fix}"
        ) from None


@dataclass(frozen=True)
class InstanceStatus:
    """What DescribeInstances says about the instance, as far as vod-sr cares."""

    state: str
    launch_time: datetime | None = None  # EC2 sets it at every start
    reason_code: str = ""  # StateReason: why it is stopped (a stop asked for, or a start that failed)
    reason_message: str = ""
    transition_reason: str = ""  # StateTransitionReason: "User initiated (2026-11-29 06:12:40 GMT)" after a stop
    instance_type: str | None = None  # "g6e.xlarge"; None when EC2 does not say
    tags: Mapping[str, str] = field(default_factory=dict)

    def launched_for(self, lease_id: str) -> bool:
        """Whether the instance was launched for the run holding `lease_id` (its fleet): tagged with its run token."""
        return bool(lease_id) and self.tags.get(RUN_TOKEN_TAG) == lease_id


def describe_instance(ec2: Any, instance_id: str) -> InstanceStatus:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as error:
        if error.response["Error"]["Code"] in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            raise InstanceUnusable(f"instance {instance_id} does not exist: {error}") from None
        raise
    instances = [i for r in reservations for i in r["Instances"]]
    if not instances:
        raise InstanceUnusable(f"instance {instance_id} does not exist")
    found = instances[0]
    reason = found.get("StateReason") or {}
    return InstanceStatus(
        found["State"]["Name"],
        found.get("LaunchTime"),
        reason.get("Code", ""),
        reason.get("Message", ""),
        found.get("StateTransitionReason") or "",
        found.get("InstanceType") or None,
        {tag["Key"]: tag.get("Value", "") for tag in found.get("Tags") or ()},
    )


def instance_state(ec2: Any, instance_id: str) -> str:
    return describe_instance(ec2, instance_id).state


def acquire_instance(
    ec2: Any, instance_id: str, lease_id: str, holder: str, *, timeout: int, poll_interval: int
) -> str:
    """The acquire task's job: take the run's lease, start the instance if it is stopped; returns the state it was
    found in. On failure the lease is dropped again. An AWS error no retry fixes (a permission missing, a wrong
    instance id) raises InstanceUnusable with a clear message; InstanceCapacityError is worth retrying later."""
    with unusable_when_unfixable(instance_id):
        take_lease(ec2, instance_id, lease_id, holder)
    try:
        with unusable_when_unfixable(instance_id):
            return ensure_started(ec2, instance_id, timeout=timeout, poll_interval=poll_interval)
    except Exception:
        try:
            drop_lease(ec2, instance_id, lease_id)
        except Exception as error:
            log.warning("Could not drop lease %s on %s (it expires by itself): %s", lease_id, instance_id, error)
        raise


def ensure_started(ec2: Any, instance_id: str, *, timeout: int, poll_interval: int) -> str:
    """Make sure the instance is running or starting; returns the state it was found in.

    Does not wait for `running`: that wait belongs to the readiness check, so a slow start still ends with the
    run's teardown stopping the instance.
    """
    found = instance_state(ec2, instance_id)
    action = instance_action(found)
    log.info("Instance %s is %s: %s", instance_id, found, action.value)
    if action is Action.WAIT_STOPPED_THEN_START:
        ec2.get_waiter("instance_stopped").wait(
            InstanceIds=[instance_id], WaiterConfig=waiter_config(timeout, poll_interval)
        )
        action = Action.START
    if action is Action.START:
        start_instance(ec2, instance_id)
    return found


def start_instance(ec2: Any, instance_id: str) -> None:
    """StartInstances; EC2's capacity error becomes InstanceCapacityError (worth retrying later)."""
    try:
        ec2.start_instances(InstanceIds=[instance_id])
    except ClientError as error:
        if error.response["Error"]["Code"] == "InsufficientInstanceCapacity":
            raise InstanceCapacityError(
                f"EC2 has no capacity to start {instance_id}: {error.response['Error'].get('Message', '')}"
            ) from error
        raise


def agent_information(ssm: Any, instance_id: str) -> dict[str, Any] | None:
    """The instance's entry in DescribeInstanceInformation (PingStatus, LastPingDateTime, ...), or None."""
    info = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])
    return next((i for i in info.get("InstanceInformationList", []) if i["InstanceId"] == instance_id), None)


def agent_online(ssm: Any, instance_id: str, *, since: datetime | None = None) -> bool:
    """Whether the instance's SSM agent reports PingStatus Online (EC2 `running` is not enough), with a last ping at
    or after `since` when given: right after a quick stop/start, SSM still says Online from the previous boot."""
    return _online_since(agent_information(ssm, instance_id) or {}, since)


def _online_since(item: Mapping[str, Any], since: datetime | None) -> bool:
    last_ping = item.get("LastPingDateTime")
    return item.get("PingStatus") == "Online" and (
        since is None or (isinstance(last_ping, datetime) and last_ping >= since)
    )


def is_ready(ec2: Any, ssm: Any, instance_id: str, *, lease_id: str, holder: str) -> bool:
    """One look for the readiness wait: True once EC2 says running and the SSM agent is Online.

    Online counts only with a LastPingDateTime at or after the instance's LaunchTime: right after a quick stop/start
    SSM still shows the previous boot's Online, and a command sent then waits for an agent that is not there yet.

    The run holds a lease on the instance, so finding it stopping or stopped is not the end: another run's release
    can stop it just after this run's acquire saw it running (that run saw no lease yet), and a start can go
    pending -> stopped when EC2 lacks capacity. Then the instance is started again once stopped (re-taking the lease
    first, in case it was dropped) and the wait goes on, within the sensor's bound. Raises InstanceUnusable when the
    instance cannot get there: terminated, a start that failed with a launch error (StateReason Client.*: a KMS key
    the volume cannot use, ...; EC2's message is given), or an AWS error no retry fixes.
    """
    with unusable_when_unfixable(instance_id):
        return _is_ready(ec2, ssm, instance_id, lease_id=lease_id, holder=holder)


def ready_within(
    ec2: Any, ssm: Any, instance_id: str, *, lease_id: str, holder: str, seconds: float, interval: float = 1.0
) -> bool:
    """`is_ready`, looked at again every `interval` seconds for up to `seconds`: True as soon as it is.

    The readiness sensor's poke: an agent usually comes Online seconds after the instance runs, and a sensor
    rescheduled for its poke interval (15 s by default) would leave the GPU idle that long. Longer waits (a cold boot,
    a slow registration) go back to the sensor's reschedules, which hold no worker slot."""
    deadline = time.monotonic() + seconds
    while True:
        if is_ready(ec2, ssm, instance_id, lease_id=lease_id, holder=holder):
            return True
        if time.monotonic() + interval > deadline:
            return False
        time.sleep(interval)


def _is_ready(ec2: Any, ssm: Any, instance_id: str, *, lease_id: str, holder: str) -> bool:
    status = describe_instance(ec2, instance_id)
    state = status.state
    match state:
        case "running":
            item = agent_information(ssm, instance_id) or {}
            if item.get("PingStatus") != "Online":
                log.info("Waiting for the SSM agent of %s: PingStatus %s", instance_id, item.get("PingStatus"))
                return False
            if not _online_since(item, status.launch_time):
                log.info(
                    "The SSM agent of %s says Online, but its last ping (%s) is from before the instance's launch "
                    "(%s): a stale Online from the previous boot; waiting for the agent to check in",
                    instance_id,
                    item.get("LastPingDateTime"),
                    status.launch_time,
                )
                return False
            return True
        case "pending":
            return False
        case "stopping":
            log.warning(
                "Instance %s is stopping under this run, which holds lease %s (another run's release, or someone, "
                "stopped it): it is started again once stopped",
                instance_id,
                lease_id,
            )
            return False
        case "stopped":
            reason = status.reason_message or status.reason_code or "no StateReason"
            if status.reason_code.startswith("Client.") and status.reason_code not in RESTARTABLE_REASONS:
                raise InstanceUnusable(
                    f"instance {instance_id} could not start: EC2 says {reason}{_launch_hint(status)}"
                )
            if status.reason_code.startswith("Server."):
                log.warning("EC2 could not start %s (%s): starting it again", instance_id, reason)
            else:
                log.warning(
                    "Instance %s was stopped under this run, which holds lease %s (%s): starting it again",
                    instance_id,
                    lease_id,
                    reason,
                )
            refresh_lease(ec2, instance_id, lease_id, holder)
            try:
                start_instance(ec2, instance_id)
            except InstanceCapacityError as error:
                log.warning("%s; trying again at the next check", error)
            return False
        case _:
            raise InstanceUnusable(f"instance {instance_id} went {state} while waiting for it to become ready")


def _launch_hint(status: InstanceStatus) -> str:
    if status.reason_code == "Client.InternalError" or status.reason_code.startswith("Client.InvalidKMSKey"):
        return (
            ". With an encrypted EBS volume this means EC2 cannot use the volume's KMS key: the key must be enabled "
            "and its key policy or a grant must let EC2 use it for the instance (README, IAM)"
        )
    return ""


def lease_tag_key(lease_id: str) -> str:
    return f"{LEASE_TAG_PREFIX}{lease_id}"


@dataclass(frozen=True)
class Lease:
    """A run's claim on the instance: the tag `vod-sr:lease:<lease id>` = "<taken or last refreshed, UTC> <holder>"."""

    lease_id: str
    holder: str
    refreshed: datetime | None  # None when the tag's time cannot be read
    value: str

    @classmethod
    def from_tag(cls, tag: dict[str, str]) -> Lease:
        value = tag.get("Value", "")
        time_text, _, holder = value.partition(" ")
        try:
            refreshed: datetime | None = datetime.strptime(time_text, LEASE_TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            refreshed = None
        return cls(tag["Key"][len(LEASE_TAG_PREFIX) :], holder, refreshed, value)

    def expired(self, now: datetime) -> bool:
        # An unreadable time counts as live: better an instance left up than someone's work stopped.
        return self.refreshed is not None and now - self.refreshed >= LEASE_TTL

    def describe(self, now: datetime) -> str:
        """Which lease this is, for the log and the report: id, holder and age."""
        age = "at an unreadable time" if self.refreshed is None else f"{_age(now - self.refreshed)} ago"
        return f"lease {self.lease_id} held by {self.holder or '?'}, taken or refreshed {age}"


def _age(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _lease_tag(lease_id: str, holder: str, now: datetime | None) -> dict[str, str]:
    taken = (now or datetime.now(UTC)).strftime(LEASE_TIME_FORMAT)
    return {"Key": lease_tag_key(lease_id), "Value": f"{taken} {holder}"[:256]}


def leases(ec2: Any, instance_id: str, *, now: datetime | None = None) -> list[Lease]:
    """The live leases on the instance. Expired ones (a run that died without releasing) are deleted here, so
    leaked tags never pile up toward EC2's 50-tag limit, where `CreateTags` and with it every acquire would fail."""
    now = now or datetime.now(UTC)
    tags = ec2.describe_tags(
        Filters=[{"Name": "resource-id", "Values": [instance_id]}, {"Name": "key", "Values": [f"{LEASE_TAG_PREFIX}*"]}]
    )["Tags"]
    live = []
    for lease in sorted((Lease.from_tag(tag) for tag in tags), key=lambda lease: lease.lease_id):
        if not lease.expired(now):
            live.append(lease)
            continue
        log.warning(
            "Deleting the expired %s on %s: its run ended without releasing it", lease.describe(now), instance_id
        )
        try:  # with its value: a lease refreshed since it was read is not deleted
            ec2.delete_tags(
                Resources=[instance_id], Tags=[{"Key": lease_tag_key(lease.lease_id), "Value": lease.value}]
            )
        except Exception as error:
            log.warning("Could not delete the expired lease %s on %s: %s", lease.lease_id, instance_id, error)
    return live


def live_leases(ec2: Any, instance_id: str, *, now: datetime | None = None) -> dict[str, str]:
    """Leases on the instance that have not expired, as lease id -> holder (expired ones are deleted)."""
    return {lease.lease_id: lease.holder for lease in leases(ec2, instance_id, now=now)}


def take_lease(ec2: Any, instance_id: str, lease_id: str, holder: str, *, now: datetime | None = None) -> None:
    """Record that a run uses the instance until it releases it (or the lease expires), first deleting expired
    leases so the new tag fits under EC2's 50-tag limit."""
    others = [lease for lease in leases(ec2, instance_id, now=now) if lease.lease_id != lease_id]
    if others:
        when = now or datetime.now(UTC)
        log.info("Instance %s is also used by: %s", instance_id, "; ".join(lease.describe(when) for lease in others))
    ec2.create_tags(Resources=[instance_id], Tags=[_lease_tag(lease_id, holder, now)])


def refresh_lease(ec2: Any, instance_id: str, lease_id: str, holder: str, *, now: datetime | None = None) -> bool:
    """Mark this run's lease as still in use (it expires LEASE_TTL after its last refresh), re-creating it if it was
    deleted. Never raises: a failed refresh is logged and the next one makes up for it, so it never fails GPU work."""
    try:
        ec2.create_tags(Resources=[instance_id], Tags=[_lease_tag(lease_id, holder, now)])
    except Exception as error:
        log.warning("Could not refresh lease %s on %s (retried at the next step): %s", lease_id, instance_id, error)
        return False
    log.info("Refreshed lease %s of %s on %s", lease_id, holder, instance_id)
    return True


def refresh_lane_lease(lane: Mapping[str, Any], holder: str, aws_conn_id: str | None) -> bool:
    """`refresh_lease` for a lane of the plan (`instance_id`, `run_token`), through the Airflow AWS connection."""
    from include.vod_sr.aws import aws_client

    return refresh_lease(aws_client("ec2", aws_conn_id), lane["instance_id"], lane["run_token"], holder)


def drop_lease(ec2: Any, instance_id: str, lease_id: str) -> None:
    ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": lease_tag_key(lease_id)}])


def live_commands(ssm: Any, instance_id: str, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """SSM commands still pending or running on the instance (looking back over SSM's 48 h ceiling)."""
    since = (now or datetime.now(UTC)) - LEASE_TTL
    paginator = ssm.get_paginator("list_commands")
    live = []
    for page in paginator.paginate(
        InstanceId=instance_id, Filters=[{"key": "InvokedAfter", "value": since.strftime("%Y-%m-%dT%H:%M:%SZ")}]
    ):
        live.extend(c for c in page.get("Commands", []) if c.get("Status") in LIVE_COMMAND_STATES)
    return live


def command_comment(lease_id: str, what: str) -> str:
    """The SendCommand comment for this run's commands: it names the run so its teardown can find them."""
    return f"{COMMAND_COMMENT_PREFIX}{lease_id} {what}"


def keeping_commands(commands: list[dict[str, Any]], *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Of other runs' live commands, those that keep the instance up at release: only vod-sr's own, executing or
    just sent. A foreign command (patching, State Manager, someone's shell) and one Pending or Delayed for longer
    than STUCK_PENDING_AFTER do not: otherwise the instance would run on, unseen, while the run reports success.
    The stop ends them."""
    now = now or datetime.now(UTC)
    keepers = []
    for command in commands:
        what = f"{command['CommandId']} ({command.get('DocumentName', '?')}, {command.get('Comment', '')!r})"
        if not command.get("Comment", "").startswith(COMMAND_COMMENT_PREFIX):
            log.warning("Not vod-sr's, so it does not keep the instance up (the stop ends it): command %s", what)
        elif command.get("Status") == "Cancelling":
            continue  # being cancelled: it ends anyway
        elif command.get("Status") in ("Pending", "Delayed") and _waiting_for(command, now) > STUCK_PENDING_AFTER:
            log.warning(
                "Stuck %s for %s, so it does not keep the instance up (the stop ends it): command %s",
                command.get("Status"),
                _age(_waiting_for(command, now)),
                what,
            )
        else:
            keepers.append(command)
    return keepers


def _waiting_for(command: dict[str, Any], now: datetime) -> timedelta:
    requested = command.get("RequestedDateTime")
    if not isinstance(requested, datetime):
        return timedelta(0)  # unknown: count it as just sent
    return now - (requested if requested.tzinfo else requested.replace(tzinfo=UTC))


def release(
    ec2: Any,
    ssm: Any,
    instance_id: str,
    lease_id: str,
    *,
    stop: bool,
    timeout: int,
    poll_interval: int,
    wait: bool = True,
    terminate: bool | None = None,
) -> str:
    """Cancel this run's live commands, drop its lease; stop the instance if asked and nobody else uses it, waiting
    for `stopped` unless `wait` is off. Idempotent: a second call finds no command of ours live, the lease gone and
    the instance stopping or stopped.

    An instance launched for this run (its fleet, fleet.py) is terminated instead, waiting for `terminated` unless
    `wait` is off: at once when `terminate` is True (its lane says so); when None, if its tags say it was launched
    for this run (`RUN_TOKEN_TAG` = `lease_id`), read where the instance's state is read anyway (run_chunks' early
    release does not know the lane's flag); False never terminates.

    The cancel comes first, whether or not the instance is stopped: the teardown runs once every task of this run
    has ended (the early release once all its chunks have), so a command of ours still live is orphaned (a killed
    wait, a run marked failed, a worker that died between SendCommand and deferring, a duplicate of a SendCommand
    retried after a read timeout) and would hold the GPU and the instance lock for up to 48 h. Every cancel is
    tried; if one failed and the instance stays up, its error is raised once the lease is dropped, so the teardown
    fails visibly and is retried.
    """
    commands = live_commands(ssm, instance_id)
    ours = [c for c in commands if c.get("Comment", "").startswith(command_comment(lease_id, ""))]
    cancel_errors = _cancel_orphans(ssm, instance_id, ours)
    if terminate:
        _drop_lease_quietly(ec2, instance_id, lease_id)
        return _terminate(ec2, instance_id, instance_state(ec2, instance_id), timeout, poll_interval, wait)
    drop_lease(ec2, instance_id, lease_id)
    if not stop:
        return _left_running("left running (stop_when_done is off)", cancel_errors)
    now = datetime.now(UTC)
    other_leases = leases(ec2, instance_id, now=now)
    if other_leases:
        why = "; ".join(lease.describe(now) for lease in other_leases)
        log.info("Instance %s stays up for another run: %s", instance_id, why)
        return _left_running(f"left running: {why}", cancel_errors)
    keepers = keeping_commands([c for c in commands if c not in ours], now=now)
    if keepers:
        why = "; ".join(f"{c['CommandId']} ({c.get('Comment', '')}, {c.get('Status')})" for c in keepers)
        log.info("Instance %s stays up for another vod-sr run's command(s): %s", instance_id, why)
        return _left_running(f"left running: another vod-sr run's command(s) still live: {why}", cancel_errors)
    status = describe_instance(ec2, instance_id)
    state = status.state
    if terminate is None and status.launched_for(lease_id):
        return _terminate(ec2, instance_id, state, timeout, poll_interval, wait)
    if state in ("stopped", "terminated"):
        return f"already {state}"
    config = waiter_config(timeout, poll_interval)
    if state == "pending":  # EC2 refuses to stop a pending instance
        ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id], WaiterConfig=config)
    if state != "stopping":
        ec2.stop_instances(InstanceIds=[instance_id])
    if not wait:
        return "stopping"
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id], WaiterConfig=config)
    return "stopped"


def _terminate(ec2: Any, instance_id: str, state: str, timeout: int, poll_interval: int, wait: bool) -> str:
    """Terminate an instance launched for this run (found in `state`); the termination also ends any command still
    on it. EC2 terminates a pending instance too. Found terminated (run_chunks' early release began it) is
    "terminated" too: the run's instance is gone, which is what the report says."""
    if state == "terminated":
        return "terminated"
    if state != "shutting-down":
        log.info("Terminating %s: it was launched for this run", instance_id)
        ec2.terminate_instances(InstanceIds=[instance_id])
    if not wait:
        return "terminating"
    ec2.get_waiter("instance_terminated").wait(
        InstanceIds=[instance_id], WaiterConfig=waiter_config(timeout, poll_interval)
    )
    return "terminated"


def _drop_lease_quietly(ec2: Any, instance_id: str, lease_id: str) -> None:
    """Drop the lease of an instance about to be terminated: a failure does not matter (the lease goes with it)."""
    try:
        drop_lease(ec2, instance_id, lease_id)
    except Exception as error:
        log.info("Lease %s on %s not dropped (the instance is terminated anyway): %s", lease_id, instance_id, error)


def release_record(ec2: Any, instance_id: str, outcome: str, *, now: datetime | None = None) -> dict[str, Any]:
    """What the release task hands the report (XCom RELEASE_XCOM_KEY): the instance, the release's outcome and
    `instance_seconds`, how long the instance ran in the start this run used, as EC2 tells it: from its LaunchTime
    (set at every start) to its stop (the time in StateTransitionReason, "User initiated (... GMT)": EC2 bills
    nothing from `stopping` on), whoever stopped it (run_chunks' early release usually has, before the teardown
    runs); for an instance left running, to now. None when EC2 cannot tell (no LaunchTime, a stop time it does not
    give or from before the launch) or cannot be asked: it is only reported, and never fails a release.
    `instance_type` (for the report's cost estimate): None when EC2 cannot be asked."""
    seconds = None
    try:
        status = describe_instance(ec2, instance_id)
    except Exception as error:
        log.warning("Could not read the launch time of %s for the report: %s", instance_id, error)
        status = None
    if status is not None and status.launch_time is not None:
        launched = status.launch_time if status.launch_time.tzinfo else status.launch_time.replace(tzinfo=UTC)
        if status.state in ("running", "pending"):
            until: datetime | None = now or datetime.now(UTC)
        else:
            until = _stop_time(status.transition_reason)
        if until is not None and until >= launched:
            seconds = round((until - launched).total_seconds())
    return {
        "instance_id": instance_id,
        "outcome": outcome,
        "instance_seconds": seconds,
        "instance_type": status.instance_type if status is not None else None,
    }


def _stop_time(transition_reason: str) -> datetime | None:
    """The time in EC2's StateTransitionReason after a stop: "User initiated (2026-11-29 06:12:40 GMT)"."""
    match = re.search(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)", transition_reason)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC) if match else None


def _cancel_orphans(ssm: Any, instance_id: str, commands: list[dict[str, Any]]) -> list[Exception]:
    """Cancel each of this run's live commands, going on past a cancel that fails; returns the errors."""
    errors = []
    for command in commands:
        if command.get("Status") == "Cancelling":
            continue
        log.warning("Cancelling orphaned command %s (%s)", command["CommandId"], command.get("Comment"))
        try:
            ssm.cancel_command(CommandId=command["CommandId"], InstanceIds=[instance_id])
        except Exception as error:
            log.error("Could not cancel command %s on %s: %s", command["CommandId"], instance_id, error)
            errors.append(error)
    return errors


def _left_running(outcome: str, cancel_errors: list[Exception]) -> str:
    """The instance stays up, so an orphan whose cancel failed would go on running there: raise (the teardown is
    retried). When the instance stops instead, the stop ends the orphan."""
    if cancel_errors:
        raise cancel_errors[0]
    return outcome
