"""The GPU instance: EC2 state handling, SSM readiness, leases and stop-when-idle.

Runs that share an instance each hold a lease (an EC2 tag). A run's teardown drops its own lease and stops the
instance only when no other live lease and no live SSM command remain, so one run never stops another's work.
"""

from __future__ import annotations

import enum
import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

log = logging.getLogger(__name__)

LEASE_TAG_PREFIX = "vod-sr:lease:"
LEASE_TTL = timedelta(hours=49)  # longer than SSM's 48 h execution ceiling: a lease past this is abandoned
LIVE_COMMAND_STATES = ("Pending", "InProgress", "Delayed", "Cancelling")


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


def instance_state(ec2: Any, instance_id: str) -> str:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as error:
        if error.response["Error"]["Code"] in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            raise InstanceUnusable(f"instance {instance_id} does not exist: {error}") from None
        raise
    instances = [i for r in reservations for i in r["Instances"]]
    if not instances:
        raise InstanceUnusable(f"instance {instance_id} does not exist")
    return instances[0]["State"]["Name"]


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
        try:
            ec2.start_instances(InstanceIds=[instance_id])
        except ClientError as error:
            if error.response["Error"]["Code"] == "InsufficientInstanceCapacity":
                raise InstanceCapacityError(
                    f"EC2 has no capacity to start {instance_id}: {error.response['Error'].get('Message', '')}"
                ) from error
            raise
    return found


def agent_online(ssm: Any, instance_id: str) -> bool:
    """Whether the instance's SSM agent reports PingStatus Online (EC2 `running` is not enough)."""
    info = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])
    return any(
        item["InstanceId"] == instance_id and item.get("PingStatus") == "Online"
        for item in info.get("InstanceInformationList", [])
    )


def is_ready(ec2: Any, ssm: Any, instance_id: str) -> bool:
    """True once the instance runs and its SSM agent is Online; raises if it can no longer get there."""
    state = instance_state(ec2, instance_id)
    if state in ("stopping", "stopped", "shutting-down", "terminated"):
        raise InstanceUnusable(f"instance {instance_id} went {state} while waiting for it to become ready")
    return state == "running" and agent_online(ssm, instance_id)


def lease_tag_key(lease_id: str) -> str:
    return f"{LEASE_TAG_PREFIX}{lease_id}"


def take_lease(ec2: Any, instance_id: str, lease_id: str, holder: str, *, now: datetime | None = None) -> None:
    """Record that a run uses the instance until it releases it (or the lease expires)."""
    taken = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ec2.create_tags(
        Resources=[instance_id], Tags=[{"Key": lease_tag_key(lease_id), "Value": f"{taken} {holder}"[:256]}]
    )


def live_leases(ec2: Any, instance_id: str, *, now: datetime | None = None) -> dict[str, str]:
    """Leases on the instance that have not expired, as lease id -> holder."""
    now = now or datetime.now(UTC)
    tags = ec2.describe_tags(
        Filters=[{"Name": "resource-id", "Values": [instance_id]}, {"Name": "key", "Values": [f"{LEASE_TAG_PREFIX}*"]}]
    )["Tags"]
    leases = {}
    for tag in tags:
        taken_text, _, holder = tag.get("Value", "").partition(" ")
        try:
            taken = datetime.strptime(taken_text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            taken = now  # unreadable: treat as live rather than stop someone's work
        if now - taken < LEASE_TTL:
            leases[tag["Key"][len(LEASE_TAG_PREFIX) :]] = holder
    return leases


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
    return f"vod-sr {lease_id} {what}"


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
) -> str:
    """Cancel this run's live commands, drop its lease; stop the instance if asked and nobody else uses it, waiting
    for `stopped` unless `wait` is off. Idempotent: a second call finds no command of ours live, the lease gone and
    the instance stopping or stopped.

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
    drop_lease(ec2, instance_id, lease_id)
    if not stop:
        return _left_running("left running (stop_when_done is off)", cancel_errors)
    other_leases = live_leases(ec2, instance_id)
    if other_leases:
        return _left_running(f"left running: leased by {', '.join(sorted(other_leases.values()))}", cancel_errors)
    other_commands = [c["CommandId"] for c in commands if c not in ours]
    if other_commands:
        return _left_running(f"left running: SSM commands still live: {', '.join(other_commands)}", cancel_errors)
    state = instance_state(ec2, instance_id)
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
