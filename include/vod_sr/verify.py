"""Verification of an instance's outputs in S3, from the chunk scripts' results plus S3 listings.

An output counts only when it is the source upscaled: the chunk script measures each source and output with ffmpeg
right after the model ran (`Media`), and `media_mismatch` fails an output whose resolution is not the model's scale
of the source's, whose video is shorter or longer than the source's by more than the tolerance, or that has fewer
audio streams than its source.

A chunk's script rewrites its results object as each file ends, so a chunk whose command was cancelled or timed out
(SSM kills it with SIGKILL: nothing runs at its end) still credits every file it finished. Only when a chunk's results
lack some of its files does verify ask SSM about the chunk's command: the `VODSR-RESULT` lines of its output fill in
what the results object lacks (it is missing when storing it failed, and a kill can fall between a file's result
line and its store), and each file still without a result is failed with how the command ended.

Each record also names the file's QC contact sheet (see `script.render_sr_script`): `qc`, the `s3://` URI of the JPEG
the instance uploaded (None when there is none), and `qc_reason`, "" when there is one, else why not. A sheet is only
for a person to look at: it never decides a file's status.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from include.vod_sr.plan import Chunk, FileJob, existing_objects
from include.vod_sr.script import chunk_keys, parse_result_lines
from include.vod_sr.sources import S3Object

log = logging.getLogger(__name__)

# The first line of a chunk's script (`script.script_header`), found in ListCommands' copy of the script.
_SCRIPT_HEADER = re.compile(r"# vod-sr run (\S+) chunk (\d+):")
_SIZE = re.compile(r"(\d+)x(\d+)")
# Encoders round odd sizes to even ones (yuv420p), so a scaled size may be off by a pixel or two.
_RESOLUTION_SLACK = 2
# SSM's clock (RequestedDateTime) against S3's (the chunk list's LastModified, written just before SendCommand).
_CLOCK_MARGIN = timedelta(minutes=10)


@dataclass(frozen=True)
class Media:
    """A video as the chunk script measured it with ffmpeg: its first video stream's size and duration (None where
    ffmpeg found no video stream) and how many audio streams it has."""

    width: int | None
    height: int | None
    seconds: float | None
    audio_streams: int

    @classmethod
    def parse(cls, text: str) -> Media | None:
        """The script's `WIDTHxHEIGHT SECONDS AUDIO-STREAMS` ("-" for what ffmpeg did not report); None when the
        figures are missing (the file failed before they were taken) or garbled."""
        parts = text.split()
        if len(parts) != 3 or not parts[2].isdigit():
            return None
        size = _SIZE.fullmatch(parts[0])
        if size is None and parts[0] != "-":
            return None
        try:
            seconds = None if parts[1] == "-" else float(parts[1])
        except ValueError:
            return None
        width, height = (int(size[1]), int(size[2])) if size else (None, None)
        return cls(width, height, seconds, int(parts[2]))

    def __str__(self) -> str:
        size = f"{self.width}x{self.height}" if self.width is not None else "no video"
        seconds = f"{self.seconds:.2f} s" if self.seconds is not None else "duration unknown"
        return f"{size}, {seconds}, {self.audio_streams} audio"


def media_mismatch(source: Media | None, output: Media | None, *, scale: float, duration_tolerance: float) -> str:
    """Why `output` is not `source` upscaled `scale` times, naming each mismatch; "" when it is."""
    if source is None or output is None:
        return "no media figures from the instance: the output could not be checked"
    if output.width is None or output.height is None:
        return "output has no video stream"
    problems = []
    if source.width is None or source.height is None:
        problems.append("the source's resolution is unknown")
    else:
        expected = (round(source.width * scale), round(source.height * scale))
        # Either orientation: ffmpeg applies a source's rotation metadata, so a portrait phone clip comes out upright.
        if not any(
            abs(output.width - width) <= _RESOLUTION_SLACK and abs(output.height - height) <= _RESOLUTION_SLACK
            for width, height in (expected, expected[::-1])
        ):
            problems.append(
                f"output resolution {output.width}x{output.height}, expected {expected[0]}x{expected[1]} "
                f"({scale:g}x the source's {source.width}x{source.height})"
            )
    if output.seconds is None or source.seconds is None:
        problems.append("the video's duration is unknown")
    elif abs(output.seconds - source.seconds) > duration_tolerance:
        problems.append(
            f"output video lasts {output.seconds:.2f} s, the source's {source.seconds:.2f} s "
            f"(tolerance {duration_tolerance:g} s)"
        )
    if output.audio_streams < source.audio_streams:
        problems.append(
            f"output lost audio: {output.audio_streams} audio stream(s), the source has {source.audio_streams}"
        )
    return "; ".join(problems)


QC_NOT_MADE = "not made"


def qc_sheet(field: object, bucket: str) -> tuple[str | None, str]:
    """The contact sheet's URI and why there is none, from a result's `qc` field (`script.parse_result_lines`): the
    JPEG's key in `bucket` (the results object's), or `-` and why not; empty (a failed file) or None (a line from
    before contact sheets) when none was made."""
    if not isinstance(field, str) or field in ("", "-"):
        return None, QC_NOT_MADE
    if field.startswith("-"):
        return None, field[1:]
    return f"s3://{bucket}/{field}", ""


def file_record(
    job: FileJob,
    status: str,
    reason: str = "",
    bytes_written: int = 0,
    source_media: Media | None = None,
    output_media: Media | None = None,
    qc: str | None = None,
    qc_reason: str = QC_NOT_MADE,
    sr_seconds: int | None = None,
) -> dict[str, Any]:
    """A file's row in the report. `sr_seconds`: how long its ffmpeg ran on the instance (None: never ran)."""
    return {
        "index": job.index,
        "source": job.source.uri,
        "output": job.output.uri,
        "status": status,
        "reason": reason,
        "bytes": bytes_written,
        "source_media": asdict(source_media) if source_media else None,
        "output_media": asdict(output_media) if output_media else None,
        "qc": qc,
        "qc_reason": qc_reason,
        "sr_seconds": sr_seconds,
    }


LEFT = "left"  # a file the run's budget kept from being sent: not failed, left for the next run


def split_left_for_budget(
    chunks: Iterable[Chunk], left: Mapping[str, Any] | None
) -> tuple[list[Chunk], list[dict[str, Any]]]:
    """A lane's chunks to verify, and a `left` record for each file of the chunks the run's budget kept from being
    sent (`left`: what run_chunks stored, `stored_plan.load_left`; None: nothing was kept back)."""
    if not left:
        return list(chunks), []
    from include.vod_sr.cost import format_money

    unsent = set(left.get("chunk_indices") or ())
    reason = (
        f"not started: the run's budget of {format_money(left['budget'], left['currency'])} was reached "
        f"({format_money(left['spent'], left['currency'])} spent); left for the next run"
    )
    sent = [chunk for chunk in chunks if chunk.index not in unsent]
    records = [file_record(job, LEFT, reason) for chunk in chunks if chunk.index in unsent for job in chunk.files]
    return sent, records


def media_summary(record: Mapping[str, Any]) -> str:
    """A record's figures for a report table: `640x480, 10.00 s, 1 audio -> 1280x960, 10.00 s, 1 audio`."""
    figures = [record.get("source_media"), record.get("output_media")]
    if not any(figures):
        return ""
    return " -> ".join(str(Media(**f)) if f else "-" for f in figures)


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


def instances_down(ec2: Any, instance_ids: Iterable[str]) -> dict[str, str]:
    """Which of `instance_ids` EC2 shows down (commands.INSTANCE_DOWN_STATES): id -> state and StateReason. One
    DescribeInstances; an error leaves the answer empty (the reasons then say what SSM says)."""
    from include.vod_sr.commands import INSTANCE_DOWN_STATES

    wanted = sorted(set(instance_ids))
    if not wanted:
        return {}
    try:  # a filter, not InstanceIds: an id EC2 no longer knows is left out instead of failing the call
        reservations = ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": wanted}])["Reservations"]
    except (ClientError, BotoCoreError) as error:
        log.warning("Could not read the states of instances %s: %s", wanted, error)
        return {}
    down = {}
    for instance in (i for r in reservations for i in r["Instances"]):
        state = instance["State"]["Name"]
        if state in INSTANCE_DOWN_STATES:
            reason = (instance.get("StateReason") or {}).get("Message")
            down[instance["InstanceId"]] = state + (f": {reason}" if reason else "")
    return down


def verify_file(
    job: FileJob,
    reported: Mapping[str, Any] | None,
    listed: Mapping[str, Any] | None,
    sent_at: datetime | None,
    unfinished: str = "no result from the instance: its chunk command did not finish",
    *,
    scale: float = 2.0,
    duration_tolerance: float = 0.5,
    results_bucket: str,
) -> dict[str, Any]:
    """One output: the script reported it written, it exists, is non-empty, has the size the script wrote, was
    written after this run sent its chunk (`sent_at`: the chunk list's LastModified, S3's own clock) and is its
    source upscaled `scale` times (`media_mismatch`). `unfinished` is the reason given when the instance reported
    nothing for the file. The contact sheet the result names is in `results_bucket` (see `qc_sheet`)."""
    if reported is None:
        return file_record(job, "failed", unfinished)
    source = Media.parse(str(reported.get("source_media") or ""))
    output = Media.parse(str(reported.get("output_media") or ""))
    qc, qc_reason = qc_sheet(reported.get("qc"), results_bucket)
    # A file that failed before its ffmpeg ran (download, lock or budget) reports 0 s: no SR time to show.
    stage = str(reported.get("stage") or "")
    ran = reported["status"] == "ok" or (stage.startswith("ffmpeg") and "not started" not in stage)
    sr_seconds = reported.get("seconds") if ran else None

    def record(status: str, reason: str = "", size: int = 0) -> dict[str, Any]:
        return file_record(job, status, reason, size, source, output, qc, qc_reason, sr_seconds)

    if reported["status"] != "ok":
        return record("failed", f"{reported['stage'] or 'processing'} failed on the instance")
    if listed is None:
        return record("failed", "output object missing")
    size = listed["Size"]
    if sent_at is None or listed["LastModified"] < sent_at:
        return record("failed", "output was not written by this run (it predates the chunk)", size)
    if size == 0:
        return record("failed", "output object is empty", size)
    if size != reported["bytes"]:
        return record("failed", f"output is {size} bytes; the instance wrote {reported['bytes']}", size)
    mismatch = media_mismatch(source, output, scale=scale, duration_tolerance=duration_tolerance)
    if mismatch:
        return record("failed", mismatch, size)
    return record("ok", "", size)


def chunk_commands(ssm: Any, instance_id: str, run_token: str, since: datetime) -> dict[int, str]:
    """This run's chunk commands on `instance_id` sent after `since`: chunk index -> command id. Should a chunk have
    been sent twice, the first, as run_chunks keeps it (and cancels the duplicate). One paginated ListCommands."""
    first: dict[int, tuple[datetime, str]] = {}
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
            if index not in first or requested < first[index][0]:
                first[index] = (requested, command["CommandId"])
    return {index: command_id for index, (_, command_id) in first.items()}


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
    s3: Any,
    bucket: str,
    run_token: str,
    chunks: list[Chunk],
    *,
    ssm: Any = None,
    ec2: Any = None,
    scale: float = 2.0,
    duration_tolerance: float = 0.5,
) -> list[dict[str, Any]]:
    """Every file of `chunks`, made by a model of `scale` (see `verify_file`). S3 calls: one GetObject per chunk's
    results, listings for the rest. SSM calls (with `ssm`), only for chunks whose results lack some of their files:
    one ListCommands per instance and one GetCommandInvocation per such chunk. EC2 (with `ec2`), only where such a
    command is still live: one DescribeInstances, so a file whose instance went down under it (SSM keeps its command
    InProgress) says so."""
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
    live = {"Pending", "InProgress", "Delayed"}
    down = (
        instances_down(ec2, (c.instance_id for c in chunks if (invocations.get(c.index) or {}).get("Status") in live))
        if ec2 is not None
        else {}
    )
    records = []
    for chunk in chunks:
        reported = results[chunk.index]
        unfinished = "no result from the instance: its chunk command did not finish"
        if chunk.index in invocations:
            invocation = invocations[chunk.index]
            printed = parse_result_lines((invocation or {}).get("StandardOutputContent") or "")
            reported = {**printed, **reported}
            unfinished = unfinished_reason(invocation)
            if (invocation or {}).get("Status") in live and chunk.instance_id in down:
                why = down[chunk.instance_id]
                unfinished = f"not finished: its instance {chunk.instance_id} went down under its chunk ({why})"
        for job in chunk.files:
            records.append(
                verify_file(
                    job,
                    reported.get(job.index),
                    outputs.get(job.output),
                    sent_at.get(chunk.index),
                    unfinished,
                    scale=scale,
                    duration_tolerance=duration_tolerance,
                    results_bucket=bucket,
                )
            )
    return records
