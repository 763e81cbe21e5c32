"""The deferrable wait on SSM command invocations, run by Airflow's triggerer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from botocore.exceptions import ClientError

from include.vod_sr.commands import (
    INSTANCE_DOWN_STATES,
    INSTANCE_LOST,
    POLL_CONFIG,
    Outcome,
    describe_error,
    invocation_outcome,
    is_invocation_missing,
    is_transient_error,
)

# Bound of one read of a chunk's results object, the client's retries included: progress must not hold up the polls.
PROGRESS_READ_TIMEOUT = 20.0
# Keys a command dict carries for progress lines (see `ChunkProgress.of`); a trigger serialized without them (an older
# vod-sr) waits as before, without progress lines.
PROGRESS_FIELDS = ("position", "lane_chunks", "files", "results_bucket", "results_key")
_NO_RESULTS_YET = frozenset({"NoSuchKey", "404"})  # before the chunk's first file ends
# A LaunchTime this long after a command was sent means the instance was started again since (its command died with
# the old boot). The margin keeps a few seconds of clock skew between this host and EC2 from reading as a restart; a
# restart is also seen as a stopping or stopped state at the polls in between.
RELAUNCH_MARGIN_SECONDS = 60


@dataclass
class ChunkProgress:
    """What the wait knows of one command's chunk: where its results object is, and what was last read and logged."""

    label: str  # "chunk 3/20", "chunk 3/20 (sent again)"
    files: int
    bucket: str
    key: str
    etag: str | None = None  # of the last results object read: the next read asks only for a newer one
    counts: tuple[int, int] | None = None  # files with a result, of which failed; None: not read yet
    logged: tuple[int, int] = (0, 0)
    errors_logged: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, command: Mapping[str, Any]) -> ChunkProgress | None:
        try:
            position, lane_chunks, files, bucket, key = (command[name] for name in PROGRESS_FIELDS)
            label = f"chunk {int(position)}/{int(lane_chunks)}" + (" (sent again)" if command.get("resent") else "")
            return cls(label, int(files), str(bucket), str(key))
        except (KeyError, TypeError, ValueError):
            return None

    def line(self, instance_id: str) -> str:
        done, failed = self.counts or (0, 0)
        return f"{self.label} on {instance_id}: {done}/{self.files} files done" + (
            f" ({failed} failed)" if failed else ""
        )


def _error_code(error: BaseException) -> str:
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code") or "")
    return type(error).__name__


def _not_modified(error: BaseException) -> bool:
    return isinstance(error, ClientError) and (
        error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 304
        or _error_code(error) in ("304", "NotModified")
    )


class SsmCommandsTrigger(BaseTrigger):
    """Fires as soon as one of `commands` has ended or passed a bound, listing every command that has.

    Unlike provider 9.39.0's SsmRunCommandTrigger, an invocation SSM does not list yet is pending, not success.
    Polling costs one GetCommandInvocation per command still running each `poll_interval`, whatever the number of
    files those commands process. Bounds are absolute epoch times, so a triggerer restart does not extend them.

    While a chunk runs, each poll also reads its results object (rewritten by the chunk's script as each file ends) and
    logs, whenever the count moved, `chunk 3/20 on i-0abc: 7/10 files done (1 failed)`; when its command ends, the
    final count, with the outcome. One GetObject per live command per poll, conditional on the ETag last read
    (IfNoneMatch: an unchanged object answers 304, no body). Progress is only for the log: a read that fails (no
    object before the first file ends, throttling, a denial, a timeout, anything) is logged once per command and
    error code, at debug level for a missing object and warning otherwise, and never fails or ends the wait. A command
    dict without the progress fields (a trigger serialized by an older vod-sr) is waited on without progress lines.

    Each poll also asks EC2 about the instances of the commands still live (one DescribeInstances for all): a command
    whose instance is stopping, stopped, shutting down or terminated, or was started again after the command was sent
    (`sent_at`), ends at once with outcome "failed" and `invocation_status` INSTANCE_LOST, since SSM would keep it
    InProgress for hours. A DescribeInstances that fails is logged and the wait goes on (SSM's status and the
    deadlines still end every command).

    A poll that fails with a transient error (throttling, a 5xx, a dropped connection or a timeout, after the
    client's own retries) leaves its command pending: it is logged, counted per command in the event's
    `transient_errors`, and polled again until the command's deadline. Failing the wait would fail the task, and its
    teardown would cancel GPU work that is running fine. Any other error (AccessDenied, InvalidInstanceId, ...)
    ends the wait at once with an event of status "error" and a message saying why.

    :param commands: dicts with `command_id`, `instance_id`, `deadline` (epoch seconds after which the wait gives
        up: outcome "timeout") and `delivery_deadline` (by which SSM must list the invocation: "undelivered");
        optionally `sent_at` (epoch seconds of the SendCommand: a later LaunchTime is a restart) and, for progress
        lines, `position` (the chunk's 1-based place in its lane), `lane_chunks`, `files`
        (files the command processes), `results_bucket`, `results_key` and `resent` (a chunk sent again).
    :param poll_interval: seconds between polls.
    :param resume_state: returned untouched in the event, for the deferring task to continue where it left off
        (dag.test() in Airflow 3.3 drops `defer(kwargs=...)`, so the state travels with the trigger).
    :param aws_conn_id: Airflow connection for AWS.
    :param region_name: AWS region; the connection's when None.
    :param wait_for_all: fire only once every command has ended (listing them all), not at the first: the task has
        nothing more to send, so resuming it at each end would only add task runs (and scheduler races).
    :param not_before: epoch seconds before which the first poll is not made (0: at once). A task resumed within a
        second or two of its deferral can meet the scheduler still handling that deferral's exit and lose its try
        (apache/airflow#72716, Airflow 3.3); the deferring task sets it a few seconds ahead.
    """

    def __init__(
        self,
        *,
        commands: list[dict[str, Any]],
        poll_interval: float,
        resume_state: Any = None,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        wait_for_all: bool = False,
        not_before: float = 0.0,
    ) -> None:
        super().__init__()
        self.commands = commands
        self.poll_interval = poll_interval
        self.resume_state = resume_state
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.wait_for_all = wait_for_all
        self.not_before = not_before

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{self.__class__.__module__}.{self.__class__.__qualname__}",
            {
                "commands": self.commands,
                "poll_interval": self.poll_interval,
                "resume_state": self.resume_state,
                "aws_conn_id": self.aws_conn_id,
                "region_name": self.region_name,
                "wait_for_all": self.wait_for_all,
                "not_before": self.not_before,
            },
        )

    def hook(self) -> Any:
        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        return SsmHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name, config=POLL_CONFIG)

    def s3_hook(self) -> Any:
        """The hook of the S3 client that reads the chunks' results objects (progress lines only)."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        return AwsBaseHook(
            aws_conn_id=self.aws_conn_id, region_name=self.region_name, client_type="s3", config=POLL_CONFIG
        )

    def ec2_hook(self) -> Any:
        """The hook of the EC2 client that checks the commands' instances are still up."""
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        return AwsBaseHook(
            aws_conn_id=self.aws_conn_id, region_name=self.region_name, client_type="ec2", config=POLL_CONFIG
        )

    async def _instances(self, ec2: Any, commands: list[dict[str, Any]]) -> dict[str, Mapping[str, Any]]:
        """What EC2 says of the instances of `commands` (one DescribeInstances; an `instance-id` filter, so an id EC2
        no longer knows is left out rather than failing the call): instance id -> its description. Never raises: a
        failed read is logged and leaves the wait to SSM's statuses."""
        instance_ids = sorted({command["instance_id"] for command in commands})
        if not instance_ids:
            return {}
        try:
            response = await ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": instance_ids}])
        except Exception as error:
            self.log.warning(
                "Cannot check the instances %s in EC2 (%s); going on with SSM's statuses",
                ", ".join(instance_ids),
                describe_error(error),
            )
            return {}
        return {i["InstanceId"]: i for r in response.get("Reservations", []) for i in r.get("Instances", [])}

    @staticmethod
    def _lost(command: Mapping[str, Any], instance: Mapping[str, Any] | None) -> str | None:
        """Why `command` died with its instance (`instance`: EC2's description), or None while the instance is up
        in the boot the command was sent to."""
        if instance is None:
            return None
        state = instance["State"]["Name"]
        if state in INSTANCE_DOWN_STATES:
            reason = (instance.get("StateReason") or {}).get("Message")
            return state + (f" ({reason})" if reason else "")
        launched, sent_at = instance.get("LaunchTime"), command.get("sent_at")
        if sent_at and launched is not None and launched.timestamp() > sent_at + RELAUNCH_MARGIN_SECONDS:
            return f"started again at {launched.isoformat()}, after the command was sent"
        return None

    async def _s3_client(self, stack: AsyncExitStack) -> Any:
        """An async S3 client for progress, closed with `stack`; None (and a warning) if it cannot be made."""
        try:
            return await stack.enter_async_context(await self.s3_hook().get_async_conn())
        except Exception as error:
            self.log.warning(
                "Cannot make an S3 client to read the chunks' progress (%s); waiting without progress lines",
                describe_error(error),
            )
            return None

    async def _get_results(self, s3: Any, progress: ChunkProgress) -> tuple[str | None, str]:
        request = {"Bucket": progress.bucket, "Key": progress.key}
        if progress.etag:
            request["IfNoneMatch"] = progress.etag
        response = await s3.get_object(**request)
        async with response["Body"] as body:
            data = await body.read()
        return response.get("ETag"), data.decode("utf-8", errors="replace")

    async def _progress(
        self, s3: Any, command: Mapping[str, Any], progress: ChunkProgress | None, ended: str | None = None
    ) -> None:
        """Read `command`'s results object (one conditional GetObject) and log its count if it moved, or, once the
        command has `ended` (its outcome), the final count. Never raises: progress is only for the log."""
        if s3 is None or progress is None:
            return
        try:
            etag, text = await asyncio.wait_for(self._get_results(s3, progress), PROGRESS_READ_TIMEOUT)
        except Exception as error:
            if not _not_modified(error):
                code = _error_code(error) or "error"
                if code in _NO_RESULTS_YET and progress.counts is None:
                    progress.counts = (0, 0)  # no file has ended yet
                if code not in progress.errors_logged:
                    progress.errors_logged.add(code)
                    self.log.log(
                        logging.DEBUG if code in _NO_RESULTS_YET else logging.WARNING,
                        "Cannot read the progress of %s on %s from s3://%s/%s (%s); the wait goes on",
                        progress.label,
                        command["instance_id"],
                        progress.bucket,
                        progress.key,
                        describe_error(error) if not isinstance(error, TimeoutError) else "no answer in time",
                    )
        else:
            from include.vod_sr.script import parse_result_lines

            results = parse_result_lines(text)
            progress.etag = etag
            progress.counts = (len(results), sum(result["status"] != "ok" for result in results.values()))
        if ended is not None:
            if progress.counts is not None:
                self.log.info("%s; its command ended (%s)", progress.line(command["instance_id"]), ended)
        elif progress.counts is not None and progress.counts != progress.logged:
            progress.logged = progress.counts
            self.log.info("%s", progress.line(command["instance_id"]))

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
        progress = {command["command_id"]: ChunkProgress.of(command) for command in self.commands}
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(await self.hook().get_async_conn())
            ec2 = await stack.enter_async_context(await self.ec2_hook().get_async_conn())
            s3 = await self._s3_client(stack) if any(progress.values()) else None
            if (settle := self.not_before - time.time()) > 0:
                await asyncio.sleep(settle)
            ended: list[dict[str, Any]] = []  # every command seen ended, each polled no more
            while True:
                seen_ended = {command["command_id"] for command in ended}
                live = [c for c in self.commands if c["command_id"] not in seen_ended]
                instances = await self._instances(ec2, live)
                for command in live:
                    ended_before = len(ended)
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
                    else:
                        outcome = invocation_outcome(status)
                        now = time.time()
                        lost = (
                            None
                            if outcome is not Outcome.PENDING
                            else self._lost(command, instances.get(command["instance_id"]))
                        )
                        if lost is not None:  # SSM would say InProgress for hours: nothing reports from it
                            self.log.warning(
                                "SSM command %s (%s): its instance %s is %s; the command died with it",
                                command["command_id"],
                                status or "not listed yet",
                                command["instance_id"],
                                lost,
                            )
                            ended.append({**command, "outcome": "failed", "invocation_status": INSTANCE_LOST})
                        elif outcome is not Outcome.PENDING:
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
                    # After the status: a command seen ended has stored its last result.
                    await self._progress(
                        s3,
                        command,
                        progress[command["command_id"]],
                        ended[-1]["outcome"] if len(ended) > ended_before else None,
                    )
                if ended and (not self.wait_for_all or len(ended) == len(self.commands)):
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
