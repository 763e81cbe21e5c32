"""The deferrable wait on one SSM command invocation, run by Airflow's triggerer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from botocore.exceptions import ClientError

from include.vod_sr.commands import BOTO_CONFIG, Outcome, invocation_outcome, is_invocation_missing


class SsmCommandTrigger(BaseTrigger):
    """Fires once the invocation of `command_id` on `instance_id` has ended, or a bound has passed.

    Unlike provider 9.39.0's SsmRunCommandTrigger, an invocation SSM does not know yet is pending, not success.
    Bounds are absolute epoch times, so a triggerer restart does not extend them.

    :param command_id: the SSM command to wait for.
    :param instance_id: the one instance the command was sent to.
    :param deadline: epoch seconds after which the wait gives up (status "timeout").
    :param delivery_deadline: epoch seconds by which SSM must list the invocation (status "undelivered").
    :param poll_interval: seconds between GetCommandInvocation calls.
    :param aws_conn_id: Airflow connection for AWS.
    :param region_name: AWS region; the connection's when None.
    """

    def __init__(
        self,
        *,
        command_id: str,
        instance_id: str,
        deadline: float,
        delivery_deadline: float,
        poll_interval: float,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
    ) -> None:
        super().__init__()
        self.command_id = command_id
        self.instance_id = instance_id
        self.deadline = deadline
        self.delivery_deadline = delivery_deadline
        self.poll_interval = poll_interval
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{self.__class__.__module__}.{self.__class__.__qualname__}",
            {
                "command_id": self.command_id,
                "instance_id": self.instance_id,
                "deadline": self.deadline,
                "delivery_deadline": self.delivery_deadline,
                "poll_interval": self.poll_interval,
                "aws_conn_id": self.aws_conn_id,
                "region_name": self.region_name,
            },
        )

    def hook(self) -> Any:
        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        return SsmHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name, config=BOTO_CONFIG)

    def _event(self, status: str, invocation_status: str | None, message: str) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": status,
                "command_id": self.command_id,
                "instance_id": self.instance_id,
                "invocation_status": invocation_status,
                "message": message,
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async with await self.hook().get_async_conn() as client:
            while True:
                try:
                    invocation = await client.get_command_invocation(
                        CommandId=self.command_id, InstanceId=self.instance_id
                    )
                    status = invocation["Status"]
                except ClientError as error:
                    if not is_invocation_missing(error):
                        raise
                    status = None
                outcome = invocation_outcome(status)
                now = time.time()
                if outcome is not Outcome.PENDING:
                    yield self._event(outcome.value, status, f"command {self.command_id} ended {status}")
                    return
                if status is None and now > self.delivery_deadline:
                    yield self._event("undelivered", None, f"SSM never listed command {self.command_id}")
                    return
                if now > self.deadline:
                    yield self._event("timeout", status, f"command {self.command_id} still {status} at the deadline")
                    return
                self.log.info("SSM command %s on %s: %s", self.command_id, self.instance_id, status or "not listed yet")
                await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """A user killed the waiting task: do not leave its GPU command running unattended."""
        async with await self.hook().get_async_conn() as client:
            await client.cancel_command(CommandId=self.command_id, InstanceIds=[self.instance_id])
