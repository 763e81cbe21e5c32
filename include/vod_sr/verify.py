"""Verification of an instance's outputs in S3, from the chunk scripts' results plus S3 listings.

A chunk's script rewrites its results object as each file ends, so a chunk whose command was cancelled or timed out
(SSM kills it with SIGKILL: nothing runs at its end) still credits every file it finished. Only when a chunk's results
lack some of its files does verify ask SSM about the chunk's command: the `VODSR-RESULT` lines of its output fill in
what the results object lacks (it is missing when storing it failed, and a kill can fall between a file's result
line and its store), and each file still without a result is failed with how the command ended.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from include.vod_sr.plan import Chunk, FileJob, existing_objects
from include.vod_sr.script import chunk_keys, parse_result_lines
from include.vod_sr.sources import S3Object

log = logging.getLogger(__name__)

# The first line of a chunk's script (`script.script_header`), found in ListCommands' copy of the script.
_SCRIPT_HEADER = re.compile(r"# vod-sr run (\S+) chunk (\d+):")
# SSM's clock (RequestedDateTime) against S3's (the chunk list's LastModified, written just before SendCommand).
_CLOCK_MARGIN = timedelta(minutes=10)


def file_record(job: FileJob, status: str, reason: str = "", bytes_written: int = 0) -> dict[str, Any]:
    return {
        "index": job.index,
        "source": job.source.uri,
        "output": job.output.uri,
        "status": status,
        "reason": reason,
        "bytes": bytes_written,
    }


def unfinished_reason(invocation: Mapping[str, Any] | None) -> str:
    """Why a file has no result from the instance, from its chunk's SSM invocation (None: SSM has none)."""
    if invocation is None:
        return "no result from the instance: SSM has no command for its chunk (it was never sent)"
    status, details = invocation.get("Status"), invocation.get("StatusDetails")
    match status, details:
        case ("Cancelled" | "Cancelling", _):
            return "not finished when its chunk's command was cancelled"
        case ("TimedOut", "DeliveryTimedOut"):
            return "not started: its chunk's command was never delivered to the instance (DeliveryTimedOut)"
        case ("TimedOut", _):
            return f"not finished when its chunk's command timed out ({details}: the SSM executionTimeout)"
        case ("Pending" | "InProgress" | "Delayed", _):
            return f"no result yet: its chunk's command was still {status} when verified"
        case ("Failed", _):
            return (
                f"not finished: its chunk's command failed ({details}, exit code {invocation.get('ResponseCode')}) "
                "before this file was done"
            )
        case _:
            return f"no result from the instance although its chunk's command ended {status} ({details})"


def verify_file(
    job: FileJob,
    reported: Mapping[str, Any] | None,
    listed: Mapping[str, Any] | None,
    sent_at: datetime | None,
    unfinished: str = "no result from the instance: its chunk command did not finish",
) -> dict[str, Any]:
    """One output: the script reported it written, it exists, is non-empty, has the size the script wrote and was
    written after this run sent its chunk (`sent_at`: the chunk list's LastModified, S3's own clock). `unfinished`
    is the reason given when the instance reported nothing for the file."""
    if reported is None:
        return file_record(job, "failed", unfinished)
    if reported["status"] != "ok":
        return file_record(job, "failed", f"{reported['stage'] or 'processing'} failed on the instance")
    if listed is None:
        return file_record(job, "failed", "output object missing")
    size = listed["Size"]
    if sent_at is None or listed["LastModified"] < sent_at:
        return file_record(job, "failed", "output was not written by this run (it predates the chunk)", size)
    if size == 0:
        return file_record(job, "failed", "output object is empty", size)
    if size != reported["bytes"]:
        return file_record(job, "failed", f"output is {size} bytes; the instance wrote {reported['bytes']}", size)
    return file_record(job, "ok", "", size)


def chunk_commands(ssm: Any, instance_id: str, run_token: str, since: datetime) -> dict[int, str]:
    """This run's chunk commands on `instance_id` sent after `since`: chunk index -> command id (the latest, should
    a chunk have been sent twice). One paginated ListCommands."""
    latest: dict[int, tuple[datetime, str]] = {}
    pages = ssm.get_paginator("list_commands").paginate(
        InstanceId=instance_id,
        Filters=[{"key": "InvokedAfter", "value": (since - _CLOCK_MARGIN).strftime("%Y-%m-%dT%H:%M:%SZ")}],
    )
    for page in pages:
        for command in page.get("Commands", []):
            header = _SCRIPT_HEADER.search("\n".join(command.get("Parameters", {}).get("commands", [])))
            if header is None or header.group(1) != run_token:
                continue
            index, requested = int(header.group(2)), command["RequestedDateTime"]
            if index not in latest or requested > latest[index][0]:
                latest[index] = (requested, command["CommandId"])
    return {index: command_id for index, (_, command_id) in latest.items()}


def _incomplete_chunks_from_ssm(
    ssm: Any, run_token: str, chunks: Iterable[Chunk], sent_at: Mapping[int, datetime]
) -> dict[int, Mapping[str, Any] | None]:
    """The SSM invocation of each of `chunks` (None where SSM has no command for it): one ListCommands per instance,
    one GetCommandInvocation per chunk."""
    from include.vod_sr.commands import get_invocation

    by_instance: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        by_instance.setdefault(chunk.instance_id, []).append(chunk)
    invocations: dict[int, Mapping[str, Any] | None] = {}
    for instance_id, instance_chunks in by_instance.items():
        sent = [sent_at[c.index] for c in instance_chunks if c.index in sent_at]
        commands = chunk_commands(ssm, instance_id, run_token, min(sent)) if sent else {}
        for chunk in instance_chunks:
            command_id = commands.get(chunk.index)
            invocations[chunk.index] = None if command_id is None else get_invocation(ssm, command_id, instance_id)
    return invocations


def verify_chunks(
    s3: Any, bucket: str, run_token: str, chunks: list[Chunk], *, ssm: Any = None
) -> list[dict[str, Any]]:
    """Every file of `chunks`. S3 calls: one GetObject per chunk's results, listings for the rest. SSM calls (with
    `ssm`), only for chunks whose results lack some of their files: one ListCommands per instance and one
    GetCommandInvocation per such chunk."""
    run_objects = {
        obj.key: item
        for obj, item in existing_objects(
            s3, [S3Object(bucket, key) for chunk in chunks for key in chunk_keys(run_token, chunk.index)]
        ).items()
    }
    outputs = existing_objects(s3, [job.output for chunk in chunks for job in chunk.files])
    sent_at: dict[int, datetime] = {}
    results: dict[int, dict[int, dict[str, Any]]] = {}
    for chunk in chunks:
        files_key, results_key = chunk_keys(run_token, chunk.index)
        if files_key in run_objects:
            sent_at[chunk.index] = run_objects[files_key]["LastModified"]
        results[chunk.index] = {}
        if results_key in run_objects:
            body = s3.get_object(Bucket=bucket, Key=results_key)["Body"].read().decode()
            results[chunk.index] = parse_result_lines(body)
    incomplete = [c for c in chunks if any(job.index not in results[c.index] for job in c.files)]
    invocations: dict[int, Mapping[str, Any] | None] = {}
    if ssm is not None and incomplete:
        try:
            invocations = _incomplete_chunks_from_ssm(ssm, run_token, incomplete, sent_at)
        except (ClientError, BotoCoreError) as error:  # the S3 results alone still verify every finished file
            log.warning("Could not read the SSM commands of chunks %s: %s", [c.index for c in incomplete], error)
    records = []
    for chunk in chunks:
        reported = results[chunk.index]
        unfinished = "no result from the instance: its chunk command did not finish"
        if chunk.index in invocations:
            invocation = invocations[chunk.index]
            printed = parse_result_lines((invocation or {}).get("StandardOutputContent") or "")
            reported = {**printed, **reported}
            unfinished = unfinished_reason(invocation)
        for job in chunk.files:
            records.append(
                verify_file(job, reported.get(job.index), outputs.get(job.output), sent_at.get(chunk.index), unfinished)
            )
    return records
