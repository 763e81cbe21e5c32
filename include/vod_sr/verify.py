"""Verification of an instance's outputs in S3, from the chunk scripts' results plus S3 listings."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from include.vod_sr.plan import Chunk, FileJob, existing_objects
from include.vod_sr.script import chunk_keys, parse_result_lines
from include.vod_sr.sources import S3Object


def file_record(job: FileJob, status: str, reason: str = "", bytes_written: int = 0) -> dict[str, Any]:
    return {
        "index": job.index,
        "source": job.source.uri,
        "output": job.output.uri,
        "status": status,
        "reason": reason,
        "bytes": bytes_written,
    }


def verify_file(
    job: FileJob,
    reported: Mapping[str, Any] | None,
    listed: Mapping[str, Any] | None,
    sent_at: datetime | None,
) -> dict[str, Any]:
    """One output: the script reported it written, it exists, is non-empty, has the size the script wrote and was
    written after this run sent its chunk (`sent_at`: the chunk list's LastModified, S3's own clock)."""
    if reported is None:
        return file_record(job, "failed", "no result from the instance: its chunk command did not finish")
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


def verify_chunks(s3: Any, bucket: str, run_token: str, chunks: list[Chunk]) -> list[dict[str, Any]]:
    """Every file of `chunks`. S3 calls: one GetObject per chunk's results, listings for the rest."""
    run_objects = {
        obj.key: item
        for obj, item in existing_objects(
            s3, [S3Object(bucket, key) for chunk in chunks for key in chunk_keys(run_token, chunk.index)]
        ).items()
    }
    outputs = existing_objects(s3, [job.output for chunk in chunks for job in chunk.files])
    records = []
    for chunk in chunks:
        files_key, results_key = chunk_keys(run_token, chunk.index)
        sent_at = run_objects[files_key]["LastModified"] if files_key in run_objects else None
        results = None
        if results_key in run_objects:
            body = s3.get_object(Bucket=bucket, Key=results_key)["Body"].read().decode()
            results = parse_result_lines(body)
        for job in chunk.files:
            reported = None if results is None else results.get(job.index, {"status": "failed", "stage": "reporting"})
            records.append(verify_file(job, reported, outputs.get(job.output), sent_at))
    return records
