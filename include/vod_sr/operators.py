"""Operators for vod-sr: the deferrable wait on an SSM command.

Imported by the DAG file, so botocore and the provider are imported only where they are used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

EVENT_STATUSES = ("success", "failed", "timeout", "undelivered")


class WaitForSsmCommandOperator(BaseOperator):
    """Wait, deferred, for an SSM command sent by an upstream task; fail with its detail if it did not succeed.

    :param command: the sending task's result: `command_id`, `instance_id` and `timeout` (seconds the command
        may run, SSM's executionTimeout). The wait allows `delivery_timeout` on top of it.
    :param poll_interval: seconds between status polls in the triggerer.
    :param delivery_timeout: seconds SSM may take to list the invocation after SendCommand.
    :param aws_conn_id: Airflow connection for AWS.
    :param region_name: AWS region; the connection's when None.
    """

    template_fields: Sequence[str] = ("command",)

    def __init__(
        self,
        *,
        command: Mapping[str, Any],
        poll_interval: float = 15,
        delivery_timeout: int = 300,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.poll_interval = poll_interval
        self.delivery_timeout = delivery_timeout
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name

    @cached_property
    def hook(self) -> Any:
        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        from include.vod_sr.commands import BOTO_CONFIG

        return SsmHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name, config=BOTO_CONFIG)

    def execute(self, context: Any) -> None:
        from include.vod_sr.triggers import SsmCommandTrigger

        now = time.time()
        self.defer(
            trigger=SsmCommandTrigger(
                command_id=self.command["command_id"],
                instance_id=self.command["instance_id"],
                deadline=now + int(self.command["timeout"]) + self.delivery_timeout,
                delivery_deadline=now + self.delivery_timeout,
                poll_interval=self.poll_interval,
                aws_conn_id=self.aws_conn_id,
                region_name=self.region_name,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        from include.vod_sr.commands import describe_invocation, get_invocation
        from include.vod_sr.script import parse_result_lines

        if not event or event.get("status") not in EVENT_STATUSES:
            raise AirflowException(f"unexpected trigger event: {event!r}")
        command_id, instance_id = event["command_id"], event["instance_id"]
        invocation = get_invocation(self.hook.conn, command_id, instance_id)
        if invocation is None:
            raise AirflowFailException(f"{event['message']}; it was never delivered to {instance_id}")
        if event["status"] == "timeout":
            self.log.error("Cancelling command %s: the wait reached its deadline", command_id)
            self.hook.conn.cancel_command(CommandId=command_id, InstanceIds=[instance_id])
        if invocation["Status"] != "Success":
            self.log.error("%s", describe_invocation(invocation))
            raise AirflowFailException(
                f"SSM command {command_id} on {instance_id} ended {invocation['Status']} "
                f"({invocation.get('StatusDetails')}, exit code {invocation.get('ResponseCode')}); "
                "stderr and stdout tails are in the log above"
            )
        self.log.info("%s", describe_invocation(invocation))
        return {
            "command_id": command_id,
            "instance_id": instance_id,
            "results": {str(k): v for k, v in parse_result_lines(invocation.get("StandardOutputContent", "")).items()},
        }
