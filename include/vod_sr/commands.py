"""SSM Run Command: send a script, wait for it (blocking or deferred), read and explain the outcome.

The wait treats "no invocation yet" as pending. Right after SendCommand, SSM may not know the invocation
(`InvocationDoesNotExist`, or an empty ListCommandInvocations); provider 9.39.0's SsmRunCommandTrigger reports
success in that case, before the command ran. Here a missing invocation is pending until a delivery bound passes.
"""

from __future__ import annotations

import enum
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError, WaiterError

from include.vod_sr.instance import waiter_config
from include.vod_sr.limits import MAX_COMMENT_LENGTH
from include.vod_sr.script import as_run_shell_command

DOCUMENT_NAME = "AWS-RunShellScript"
TAIL_LINES = 20
# SendCommand is throttled ("Rate exceeded"); adaptive retries back off client-side instead of failing a task.
BOTO_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 10})


class CommandFailed(RuntimeError):
    """An SSM command ended in a state other than Success."""


class Outcome(enum.Enum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"


PENDING_STATES = ("Pending", "InProgress", "Delayed")
# Cancelling always ends in Cancelled: the command will not succeed, so stop waiting.
FAILED_STATES = ("Cancelled", "Cancelling", "TimedOut", "Failed")


def invocation_outcome(status: str | None) -> Outcome:
    """Classify an invocation Status; `None` means SSM does not list the invocation yet."""
    if status is None or status in PENDING_STATES:
        return Outcome.PENDING
    if status == "Success":
        return Outcome.SUCCESS
    if status in FAILED_STATES:
        return Outcome.FAILED
    raise ValueError(f"unknown SSM invocation status {status!r}")


def is_invocation_missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "InvocationDoesNotExist"


def send_command(
    ssm: Any,
    instance_id: str,
    script_body: str,
    *,
    comment: str,
    execution_timeout: int,
    delivery_timeout: int,
) -> str:
    """Send a bash script to one instance; returns the command id."""
    response = ssm.send_command(
        InstanceIds=[instance_id],
        DocumentName=DOCUMENT_NAME,
        Comment=comment[:MAX_COMMENT_LENGTH],
        TimeoutSeconds=delivery_timeout,
        Parameters={"commands": [as_run_shell_command(script_body)], "executionTimeout": [str(execution_timeout)]},
    )
    return response["Command"]["CommandId"]


def get_invocation(ssm: Any, command_id: str, instance_id: str) -> dict[str, Any] | None:
    """The invocation of `command_id` on `instance_id`, or None while SSM does not know it yet."""
    try:
        return ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    except ClientError as error:
        if is_invocation_missing(error):
            return None
        raise


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def describe_invocation(invocation: dict[str, Any]) -> str:
    """Status, StatusDetails, exit code and the tails of stderr and stdout, for the task log."""
    parts = [
        f"SSM command {invocation.get('CommandId')} on {invocation.get('InstanceId')}: "
        f"Status={invocation.get('Status')} StatusDetails={invocation.get('StatusDetails')} "
        f"exit code={invocation.get('ResponseCode')}"
    ]
    for name, field in (("stderr", "StandardErrorContent"), ("stdout", "StandardOutputContent")):
        text = invocation.get(field) or ""
        if text.strip():
            parts.append(f"--- last {TAIL_LINES} lines of {name} ---\n{_tail(text)}")
    return "\n".join(parts)


def run_and_wait(
    ssm: Any,
    instance_id: str,
    script_body: str,
    *,
    comment: str,
    timeout: int,
    poll_interval: int,
    delivery_timeout: int,
) -> dict[str, Any]:
    """Send a short script and block until it ends (botocore's CommandExecuted waiter); raise on failure."""
    command_id = send_command(
        ssm, instance_id, script_body, comment=comment, execution_timeout=timeout, delivery_timeout=delivery_timeout
    )
    try:
        ssm.get_waiter("command_executed").wait(
            CommandId=command_id, InstanceId=instance_id, WaiterConfig=waiter_config(timeout, poll_interval)
        )
    except WaiterError:
        invocation = get_invocation(ssm, command_id, instance_id)
        if invocation is None:
            raise CommandFailed(f"SSM command {command_id} was never delivered to {instance_id}") from None
        raise CommandFailed(describe_invocation(invocation)) from None
    return ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
