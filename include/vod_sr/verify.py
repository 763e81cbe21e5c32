"""Verification of a chunk's outputs in S3."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from include.vod_sr.plan import Chunk, FileJob

RUN_METADATA_KEY = "vod-sr-run"  # set by the chunk script on every upload (`aws s3 cp --metadata`)
NO_RESULT_LINE = {"status": "failed", "stage": "processing (no result line)"}


def file_record(job: FileJob, status: str, reason: str = "", bytes_written: int = 0) -> dict[str, Any]:
    return {
        "index": job.index,
        "source": job.source.uri,
        "output": job.output.uri,
        "status": status,
        "reason": reason,
        "bytes": bytes_written,
    }


def verify_file(s3: Any, job: FileJob, run_token: str, reported: Mapping[str, Any] | None) -> dict[str, Any]:
    """One output: it exists, is non-empty, carries this run's token and the size the script reported."""
    if reported is not None and reported.get("status") != "ok":
        return file_record(
            job, "failed", f"{reported.get('stage') or 'processing'} failed on the instance; see the wait task's log"
        )
    try:
        head = s3.head_object(Bucket=job.output.bucket, Key=job.output.key)
    except ClientError as error:
        if error.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return file_record(job, "failed", "output object missing")
        raise
    size = head["ContentLength"]
    written_by = head.get("Metadata", {}).get(RUN_METADATA_KEY)
    if written_by != run_token:
        return file_record(job, "failed", f"output was not written by this run (run token {written_by!r})", size)
    if size == 0:
        return file_record(job, "failed", "output object is empty", size)
    if reported is not None and reported.get("bytes") != size:
        return file_record(job, "failed", f"output is {size} bytes; the instance wrote {reported.get('bytes')}", size)
    return file_record(job, "ok", "", size)


def verify_chunk(
    s3: Any, chunk: Chunk, run_token: str, results: Mapping[str, Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """Every file of the chunk; `results` are the script's per-file lines (None when its command failed)."""
    return [
        verify_file(s3, job, run_token, None if results is None else results.get(str(job.index), NO_RESULT_LINE))
        for job in chunk.files
    ]
