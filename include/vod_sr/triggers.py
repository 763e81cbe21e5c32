"""The deferrable wait on SSM command invocations, run by Airflow's triggerer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from botocore.exceptions import ClientError

from include.vod_sr.commands import (
    POLL_CONFIG,
    Outcome,
    describe_error,
    invocation_outcome,
    is_invocation_missing,
    is_transient_error,
)


class SsmCommandsTrigger(BaseTrigger):
    """Fires as soon as one of `commands` has ended or passed a bound, listing every command that has.

    Unlike provider 9.39.0's SsmRunCommandTrigger, an invocation SSM does not list yet is pending, not success.
    Polling costs one GetCommandInvocation per command still running each `poll_interval`, whatever the number of
    files those commands process. Bounds are absolute epoch times, so a triggerer restart does not extend them.

    A poll that fails with a transient error (throttling, a 5xx, a dropped connection or a timeout, after the
    client's own retries) leaves its command pending: it is logged, counted per command in the event's
    `transient_errors`, and polled again until the command's deadline. Failing the wait would fail the task, and its
    teardown would cancel GPU work that is running fine. Any other error (AccessDenied, InvalidInstanceId, ...)
    ends the wait at once with an event of status "error" and a message saying why.

    :param commands: dicts with `command_id`, `instance_id`, `deadline` (epoch seconds after which the wait gives
        up: outcome "timeout") and `delivery_deadline` (by which SSM must list the invocation: "undelivered").
    :param poll_interval: seconds between polls.
    :param resume_state: returned untouched in the event, for the deferring task to continue where it left off
        (dag.test() in Airflow 3.3 drops `defer(kwargs=...)`, so the state travels with the trigger).
    :param aws_conn_id: Airflow connection for AWS.
    :param region_name: AWS region; the connection's when None.
    """

    def __init__(
        self,
        *,
        commands: list[dict[str, Any]],
        poll_interval: float,
        resume_state: Any = None,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
    ) -> None:
        super().__init__()
        self.commands = commands
        self.poll_interval = poll_interval
        self.resume_state = resume_state
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{self.__class__.__module__}.{self.__class__.__qualname__}",
            {
                "commands": self.commands,
                "poll_interval": self.poll_interval,
                "resume_state": self.resume_state,
                "aws_conn_id": self.aws_conn_id,
                "region_name": self.region_name,
            },
        )

    def hook(self) -> Any:
        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        return SsmHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name, config=POLL_CONFIG)

    async def _status(self, client: Any, command: dict[str, Any]) -> str | None:
        try:
            invocation = await client.get_command_invocation(
                CommandId=command["command_id"], InstanceId=command["instance_id"]
            )
        except ClientError as error:
            if not is_invocation_missing(error):
                raise
            return None
        return invocation["Status"]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        transient_errors = {command["command_id"]: 0 for command in self.commands}
        async with await self.hook().get_async_conn() as client:
            while True:
                ended = []
                for command in self.commands:
                    try:
                        status = await self._status(client, command)
                    except Exception as error:
                        if not is_transient_error(error):
                            yield TriggerEvent(
                                {
                                    "status": "error",
                                    "message": f"cannot read SSM command {command['command_id']} on "
                                    f"{command['instance_id']}: {describe_error(error)}; "
                                    "waiting longer would not fix this",
                                    "commands": [],
                                    "transient_errors": transient_errors,
                                    "resume_state": self.resume_state,
                                }
                            )
                            return
                        transient_errors[command["command_id"]] += 1
                        self.log.warning(
                            "Polling SSM command %s on %s failed (%s); treating it as still running until its "
                            "deadline (%s transient error(s) so far)",
                            command["command_id"],
                            command["instance_id"],
                            describe_error(error),
                            transient_errors[command["command_id"]],
                        )
                        if time.time() > command["deadline"]:
                            ended.append({**command, "outcome": "timeout", "invocation_status": None})
                        continue
                    outcome = invocation_outcome(status)
                    now = time.time()
                    if outcome is not Outcome.PENDING:
                        ended.append({**command, "outcome": outcome.value, "invocation_status": status})
                    elif status is None and now > command["delivery_deadline"]:
                        ended.append({**command, "outcome": "undelivered", "invocation_status": None})
                    elif now > command["deadline"]:
                        ended.append({**command, "outcome": "timeout", "invocation_status": status})
                    else:
                        self.log.info(
                            "SSM command %s on %s: %s",
                            command["command_id"],
                            command["instance_id"],
                            status or "not listed yet",
                        )
                if ended:
                    yield TriggerEvent(
                        {
                            "status": "ended",
                            "commands": ended,
                            "transient_errors": transient_errors,
                            "resume_state": self.resume_state,
                        }
                    )
                    return
                await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """A user killed the waiting task: do not leave its GPU commands running unattended. Every command gets its
        cancel, also when the cancel of another one fails (the run's teardown tries again)."""
        async with await self.hook().get_async_conn() as client:
            for command in self.commands:
                try:
                    await client.cancel_command(CommandId=command["command_id"], InstanceIds=[command["instance_id"]])
                except Exception as error:
                    self.log.error(
                        "Could not cancel SSM command %s on %s: %s",
                        command["command_id"],
                        command["instance_id"],
                        describe_error(error),
                    )
                else:
                    self.log.warning("Cancelled SSM command %s on %s", command["command_id"], command["instance_id"])
