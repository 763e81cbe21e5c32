"""SSM Run Command: send a script, wait for it (blocking or deferred), read and explain the outcome.

The wait treats "no invocation yet" as pending. Right after SendCommand, SSM may not know the invocation
(`InvocationDoesNotExist`, or an empty ListCommandInvocations); provider 9.39.0's SsmRunCommandTrigger reports
success in that case, before the command ran. Here a missing invocation is pending until a delivery bound passes.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, WaiterError
from botocore.exceptions import ConnectionError as BotoConnectionError

from include.vod_sr.instance import live_commands, waiter_config
from include.vod_sr.limits import MAX_COMMENT_LENGTH
from include.vod_sr.script import RUNS_PREFIX, as_run_shell_command
from include.vod_sr.settings import Settings

log = logging.getLogger(__name__)

DOCUMENT_NAME = "AWS-RunShellScript"
TAIL_LINES = 20
TAIL_CHARS = 4_000  # a tail made of a few very long lines stays readable
# GetCommandInvocation returns only the first characters of each stream; the whole of it is in S3 (send_command).
INVOCATION_OUTPUT_LIMITS = {"stderr": 8_000, "stdout": 24_000}
TAIL_BYTES = 64 * 1024  # read from the end of a stream's copy in S3: plenty for TAIL_LINES lines
_STREAM_FIELDS = {
    "stderr": ("StandardErrorContent", "StandardErrorUrl"),
    "stdout": ("StandardOutputContent", "StandardOutputUrl"),
}
# SendCommand is throttled ("Rate exceeded"); adaptive retries back off client-side instead of failing a task.
BOTO_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 10})
# The trigger polls again every poll interval until each command's deadline, so one poll needs few retries: a poll
# that still fails is logged, counted and retried by the loop. Short retries also keep on_kill's cancels inside the
# triggerer's on_kill timeout (30 s by default).
POLL_MAX_ATTEMPTS = 3
POLL_CONFIG = Config(
    retries={"mode": "adaptive", "total_max_attempts": POLL_MAX_ATTEMPTS}, connect_timeout=10, read_timeout=30
)
# SendCommand has no idempotency token, and botocore resends a request whose answer it did not get (a read timeout,
# a dropped connection, a 5xx): SSM may have accepted the first, and the chunk then runs twice. A chunk's SendCommand
# goes through a client that never resends (SEND_CONFIG), and `send_chunk_once` decides: after an answer that never
# came, it looks the command up by its script header before sending anything again.
SEND_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=10, read_timeout=60)
SEND_ATTEMPTS = 5
SEND_BACKOFF_CAP = 30  # seconds between two sends of one chunk, at most
# Error codes that mean "try again later" (botocore's throttling and transient codes, plus 5xx codes by name).
TRANSIENT_ERROR_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "SlowDown",
    }
)


class CommandFailed(RuntimeError):
    """An SSM command ended in a state other than Success."""


class Outcome(enum.Enum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"


PENDING_STATES = ("Pending", "InProgress", "Delayed")
# Cancelling always ends in Cancelled: the command will not succeed, so stop waiting.
FAILED_STATES = ("Cancelled", "Cancelling", "TimedOut", "Failed")
# The `invocation_status` the wait gives a command whose instance went down under it (SsmCommandsTrigger): SSM itself
# keeps such a command InProgress for hours.
INSTANCE_LOST = "InstanceLost"
# EC2 states of an instance whose commands died with it (SSM does not say so: its invocations stay InProgress).
INSTANCE_DOWN_STATES = frozenset({"stopping", "stopped", "shutting-down", "terminated"})
# SSM's clock (RequestedDateTime) against S3's (a chunk list's LastModified, written just before its SendCommand).
CLOCK_MARGIN = timedelta(minutes=10)


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


def is_transient_response(response: Mapping[str, Any]) -> bool:
    """Whether an AWS error response (a ClientError's `response`) is throttling or a server-side failure."""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return response.get("Error", {}).get("Code") in TRANSIENT_ERROR_CODES or status >= 500


def is_transient_error(error: BaseException) -> bool:
    """Whether `error` may go away by itself: throttling, a 5xx, a dropped connection or a timeout.

    AccessDenied, InvalidInstanceId, an expired token and the like are not: no amount of waiting fixes them.
    """
    if isinstance(error, ClientError):
        return is_transient_response(error.response)
    # EndpointConnectionError, ConnectTimeoutError (ConnectionError); ConnectionClosedError, ReadTimeoutError
    # (HTTPClientError): the classes botocore's own retry modes treat as transient.
    return isinstance(error, (BotoConnectionError, HTTPClientError))


def describe_error(error: BaseException) -> str:
    """A one-line description of an AWS call's error, for the log."""
    if isinstance(error, ClientError):
        detail = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{detail.get('Code')} (HTTP {status}): {detail.get('Message', '')}".rstrip(": ")
    return f"{type(error).__name__}: {error}"


def cancel_commands(ssm: Any, commands: Iterable[Mapping[str, Any]]) -> list[str]:
    """Cancel each of `commands` (dicts with `command_id` and `instance_id`), going on past a cancel that fails.

    Returns the ids of the commands whose cancel failed; each failure is logged.
    """
    failed = []
    for command in commands:
        try:
            ssm.cancel_command(CommandId=command["command_id"], InstanceIds=[command["instance_id"]])
        except Exception as error:
            log.error("Could not cancel SSM command %s on %s: %s", command["command_id"], command["instance_id"], error)
            failed.append(command["command_id"])
        else:
            log.warning("Cancelled SSM command %s on %s", command["command_id"], command["instance_id"])
    return failed


def ssm_output_prefix(run_token: str) -> str:
    """SendCommand's OutputS3KeyPrefix for a run's commands, in the output bucket. SSM's agent writes each command's
    whole stdout and stderr below it with the instance role, at
    `<command id>/<instance id>/awsrunShellScript/0.awsrunShellScript/stdout` (and `stderr`)."""
    return f"{RUNS_PREFIX}{run_token}/ssm-output/"


def _run_named_by(comment: str) -> str | None:
    """The run token a `instance.command_comment` names ("vod-sr <token> <what>"), or None."""
    marker, _, rest = comment.partition(" ")
    token = rest.partition(" ")[0]
    return token if marker == "vod-sr" and token else None


def send_command(
    ssm: Any,
    instance_id: str,
    script_body: str,
    *,
    comment: str,
    execution_timeout: int,
    delivery_timeout: int,
    output_bucket: str | None = None,
) -> str:
    """Send a bash script to one instance; returns the command id.

    A command whose comment names a run (`instance.command_comment`) has SSM store its whole output in
    `output_bucket` (None: the deployment's, VOD_SR_OUTPUT_BUCKET) under `ssm_output_prefix`: GetCommandInvocation
    returns only the first 24,000 / 8,000 characters of stdout / stderr. Without a bucket or a run, SSM keeps only
    that truncated text.
    """
    run_token = _run_named_by(comment)
    bucket = Settings.from_env().output_bucket if output_bucket is None else output_bucket
    output = (
        {"OutputS3BucketName": bucket, "OutputS3KeyPrefix": ssm_output_prefix(run_token)}
        if bucket and run_token
        else {}
    )
    response = ssm.send_command(
        InstanceIds=[instance_id],
        DocumentName=DOCUMENT_NAME,
        Comment=comment[:MAX_COMMENT_LENGTH],
        TimeoutSeconds=delivery_timeout,
        Parameters={"commands": [as_run_shell_command(script_body)], "executionTimeout": [str(execution_timeout)]},
        **output,
    )
    return response["Command"]["CommandId"]


def answer_unknown(error: BaseException) -> bool:
    """Whether SSM may have accepted a request that raised `error`: it was sent and no answer said otherwise (a read
    timeout, a connection closed under it, a 5xx). A throttle or a connection never made (ConnectionError) was not."""
    if isinstance(error, ClientError):
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return isinstance(error, HTTPClientError)


def send_chunk_once(
    send_ssm: Any,
    ssm: Any,
    instance_id: str,
    script_body: str,
    *,
    run_token: str,
    chunk: int,
    sleep: Callable[[float], None] = time.sleep,
    **send: Any,
) -> str:
    """`send_command` for chunk `chunk`'s script (its first line is `script.script_header`), so that SSM runs it
    once: `send_ssm` must not resend by itself (SEND_CONFIG). After an error that leaves it unknown whether SSM
    took the command (`answer_unknown`), SSM's own record (`sent_chunk_commands`, through `ssm`) is read first and a
    command found there is the one returned; only a chunk SSM has no command for is sent again. Throttling and
    connections never made are retried with backoff, up to SEND_ATTEMPTS sends. Returns the command id."""
    since = datetime.now(UTC)
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            return send_command(send_ssm, instance_id, script_body, **send)
        except Exception as error:
            if not is_transient_error(error) or attempt == SEND_ATTEMPTS:
                raise
            if answer_unknown(error):
                found = sent_chunk_commands(ssm, instance_id, run_token, since).get(chunk)
                if found:
                    command_id = found[-1]["CommandId"]
                    log.warning(
                        "SendCommand of chunk %s got no answer (%s), but SSM had taken it: command %s",
                        chunk,
                        describe_error(error),
                        command_id,
                    )
                    return command_id
            log.warning("SendCommand of chunk %s failed (%s); sending it again", chunk, describe_error(error))
            sleep(min(2.0**attempt, SEND_BACKOFF_CAP))
    raise AssertionError("unreachable")


def sent_chunk_commands(ssm: Any, instance_id: str, run_token: str, since: datetime) -> dict[int, list[dict[str, Any]]]:
    """SSM's own record of this run's chunk commands on `instance_id` sent after `since`: chunk index -> its commands
    (ListCommands entries: CommandId, Status, RequestedDateTime, Parameters, TimeoutSeconds), oldest first.

    This is what lets a retry of run_chunks re-attach instead of sending again. SSM writes the record when it accepts
    the SendCommand, so it also holds a command whose caller never learned its id (its worker died, or the answer
    was lost to a read timeout: SendCommand has no idempotency token, and botocore itself resends it after one).
    A chunk's command is recognised by the first line of its script (`script.script_header`), not by its comment.
    One paginated ListCommands, bounded by `since`.
    """
    header = re.compile(rf"# vod-sr run {re.escape(run_token)} chunk (\d+):")
    found: dict[int, list[dict[str, Any]]] = {}
    pages = ssm.get_paginator("list_commands").paginate(
        InstanceId=instance_id,
        Filters=[
            {"key": "InvokedAfter", "value": (since.astimezone(UTC) - CLOCK_MARGIN).strftime("%Y-%m-%dT%H:%M:%SZ")}
        ],
    )
    for page in pages:
        for command in page.get("Commands", []):
            match = header.search("\n".join(command.get("Parameters", {}).get("commands", [])))
            if match is not None:
                found.setdefault(int(match.group(1)), []).append(command)
    for commands in found.values():
        commands.sort(key=lambda command: command["RequestedDateTime"])
    return found


def get_invocation(ssm: Any, command_id: str, instance_id: str) -> dict[str, Any] | None:
    """The invocation of `command_id` on `instance_id`, or None while SSM does not know it yet."""
    try:
        return ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    except ClientError as error:
        if is_invocation_missing(error):
            return None
        raise


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    tail = "\n".join(text.rstrip().splitlines()[-lines:])
    return tail if len(tail) <= TAIL_CHARS else "..." + tail[-TAIL_CHARS:]


def full_output_uri(invocation: Mapping[str, Any], stream: str) -> str | None:
    """The s3:// address of the whole `stream` ("stdout" or "stderr") of an ended invocation, from the URL SSM gives
    (`StandardOutputUrl` / `StandardErrorUrl`); None when the command named no output bucket."""
    parts = urlsplit(invocation.get(_STREAM_FIELDS[stream][1]) or "")
    host, path = parts.netloc, unquote(parts.path).lstrip("/")
    if host.startswith(("s3.", "s3-")):  # path style: https://s3.<region>.amazonaws.com/<bucket>/<key>
        bucket, _, key = path.partition("/")
    else:  # virtual-hosted style: https://<bucket>.s3.<region>.amazonaws.com/<key>
        bucket, key = host.partition(".s3")[0], path
    return f"s3://{bucket}/{key}" if bucket and key else None


def read_output_tail(s3: Any, uri: str) -> str | None:
    """The end of the object at `uri` (its last TAIL_BYTES, one ranged GET, cut to whole lines); None when it cannot
    be read, which is logged (the stream may have been empty, or the copy not written yet)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        response = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{TAIL_BYTES}")
        data = response["Body"].read()
    except (ClientError, BotoCoreError) as error:
        log.warning("Could not read the command's output at %s: %s", uri, describe_error(error))
        return None
    text = data.decode("utf-8", errors="replace")
    started_mid_way = not (response.get("ContentRange") or "bytes 0-").startswith("bytes 0-")
    return text.partition("\n")[2] if started_mid_way else text


def describe_invocation(invocation: dict[str, Any], s3: Any = None) -> str:
    """Status, StatusDetails, exit code and the tails of stderr and stdout, for the task log.

    GetCommandInvocation holds only the first 8,000 characters of stderr (24,000 of stdout): past that, its tail is
    the middle of the output. With `s3` (a client) the tails are read from the whole output SSM stored in S3 (see
    `send_command`), and the s3:// link to it is given; without a copy, a tail that may be cut says so.
    """
    parts = [
        f"SSM command {invocation.get('CommandId')} on {invocation.get('InstanceId')}: "
        f"Status={invocation.get('Status')} StatusDetails={invocation.get('StatusDetails')} "
        f"exit code={invocation.get('ResponseCode')}"
    ]
    for stream, (content_field, _) in _STREAM_FIELDS.items():
        text = invocation.get(content_field) or ""
        if not text.strip():
            continue
        uri = full_output_uri(invocation, stream)
        whole = read_output_tail(s3, uri) if s3 is not None and uri else None
        limit = INVOCATION_OUTPUT_LIMITS[stream]
        if whole is not None:
            parts.append(f"--- last {TAIL_LINES} lines of {stream} (all of it: {uri}) ---\n{_tail(whole)}")
        elif len(text) >= limit:
            where = f"all of it: {uri}" if uri else "SSM stored no copy in S3"
            parts.append(
                f"--- last {TAIL_LINES} lines of the first {limit:,} characters of {stream}, all that "
                f"GetCommandInvocation returns: the output is longer and this is not its end ({where}) ---\n"
                f"{_tail(text)}"
            )
        else:
            parts.append(
                f"--- last {TAIL_LINES} lines of {stream}{f' (all of it: {uri})' if uri else ''} ---\n{_tail(text)}"
            )
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
    output_bucket: str | None = None,
    s3: Any = None,
    quick_polls: int = 0,
) -> dict[str, Any]:
    """Send a short script and block until it ends (botocore's CommandExecuted waiter); raise on failure.

    `quick_polls`: first read its status each second, up to that many times, before the waiter's `poll_interval`
    pace, so a command that ends within seconds is not waited on for a whole interval.

    `timeout` is the script's execution timeout. SSM starts that clock when it delivers the command, which may take
    up to `delivery_timeout` (an agent that has just come Online), so the wait allows both: it never gives up on a
    command SSM would still run. A throttling or 5xx answer that outlasts the client's retries ends botocore's
    waiter, not the command: the wait goes on until then.

    A command with the same `comment` still live on the instance (an earlier try of the same task, whose worker died
    or gave up waiting) is cancelled first, so a retry never runs beside it.

    The failure names the true end of the output and where all of it is (`describe_invocation`): SSM stores it in
    `output_bucket` (see `send_command`), and `s3`, a client, reads its tail.
    """
    cancel_commands(
        ssm,
        [
            {"command_id": command["CommandId"], "instance_id": instance_id}
            for command in live_commands(ssm, instance_id)
            if command.get("Comment") == comment[:MAX_COMMENT_LENGTH]
        ],
    )
    command_id = send_command(
        ssm,
        instance_id,
        script_body,
        comment=comment,
        execution_timeout=timeout,
        delivery_timeout=delivery_timeout,
        output_bucket=output_bucket,
    )
    deadline = time.monotonic() + delivery_timeout + timeout
    for _ in range(quick_polls):
        time.sleep(1)
        try:
            invocation = get_invocation(ssm, command_id, instance_id)
        except (ClientError, BotoConnectionError, HTTPClientError):
            break  # the waiter below deals with errors
        if invocation is not None and invocation["Status"] not in ("Pending", "InProgress", "Delayed"):
            break
    if not _wait_until_executed(ssm, command_id, instance_id, deadline, poll_interval):
        invocation = get_invocation(ssm, command_id, instance_id)
        if invocation is None:
            raise CommandFailed(f"SSM command {command_id} was never delivered to {instance_id}")
        raise CommandFailed(describe_invocation(invocation, s3))
    return ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)


def _wait_until_executed(ssm: Any, command_id: str, instance_id: str, deadline: float, poll_interval: int) -> bool:
    """botocore's CommandExecuted waiter, started again after a transient error until `deadline` (monotonic);
    True when the command succeeded."""
    while True:
        remaining = max(poll_interval, round(deadline - time.monotonic()))
        try:
            ssm.get_waiter("command_executed").wait(
                CommandId=command_id, InstanceId=instance_id, WaiterConfig=waiter_config(remaining, poll_interval)
            )
            return True
        except WaiterError as error:  # the waiter turns error responses into WaiterError
            transient, reason = is_transient_response(error.last_response or {}), str(error)
        except (BotoConnectionError, HTTPClientError) as error:  # and lets connection errors through
            transient, reason = True, describe_error(error)
        if not transient or time.monotonic() >= deadline:
            return False
        log.warning("Waiting for SSM command %s on %s: %s; still waiting", command_id, instance_id, reason)
