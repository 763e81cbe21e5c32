"""The run report: one row per file, a JSON copy in S3, and a conf that re-runs only the failures."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from include.vod_sr.plan import FileJob
from include.vod_sr.verify import file_record

REPORT_PREFIX = "vod-sr-reports/"


class BatchFailed(RuntimeError):
    """At least one file of the run has no verified output."""


def build_report(
    *,
    run_id: str,
    run_token: str,
    params: Mapping[str, Any],
    planned: Iterable[FileJob],
    verified: Iterable[Iterable[Mapping[str, Any]]],
    skipped: Iterable[FileJob],
    transient_aws_errors: Iterable[int | None] | None = None,
) -> dict[str, Any]:
    """One record per file: verified ones as verify judged them, planned ones nobody verified as failed (their
    instance's lane stopped before verification, e.g. it could not be started), skipped ones as skipped.

    `transient_aws_errors`: each lane's count of throttling/5xx/connection errors that outlasted the client's retries
    (run_chunks' XCom `transient_aws_errors`); each was retried, and a count above zero says AWS was struggling.
    """
    records = {record["index"]: dict(record) for lane in verified for record in lane}
    for job in planned:
        records.setdefault(
            job.index, file_record(job, "failed", "not verified: its instance's lane failed earlier (see its tasks)")
        )
    for job in skipped:
        records[job.index] = file_record(job, "skipped", "output already exists (overwrite is off)")
    files = sorted(records.values(), key=lambda record: record["index"])
    retry_sources = [record["source"] for record in files if record["status"] == "failed"]
    retry_conf = {**dict(params), "sources": retry_sources, "prefixes": [], "manifest": None}
    report = {
        "run_id": run_id,
        "run_token": run_token,
        "counts": dict(Counter(record["status"] for record in files)),
        "files": files,
        "retry_conf": retry_conf if retry_sources else None,
    }
    if transient_aws_errors is not None:
        report["transient_aws_errors"] = sum(count or 0 for count in transient_aws_errors)
    return report


def format_table(report: Mapping[str, Any]) -> str:
    rows = [("#", "status", "bytes", "source", "output", "reason")]
    rows += [
        (str(r["index"]), r["status"], str(r.get("bytes", "")), r.get("source", ""), r.get("output", ""), r["reason"])
        for r in report["files"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    if report.get("transient_aws_errors") is not None:
        lines.append(f"transient AWS errors: {report['transient_aws_errors']}")
    return "\n".join(lines)


def write_report(s3: Any, bucket: str, report: Mapping[str, Any]) -> str:
    key = f"{REPORT_PREFIX}{report['run_token']}.json"
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(report, indent=2, ensure_ascii=False).encode(),
        ContentType="application/json",
    )
    return f"s3://{bucket}/{key}"


def raise_if_failed(report: Mapping[str, Any]) -> None:
    failed = [r for r in report["files"] if r["status"] == "failed"]
    if failed:
        lines = [f"{r['source']}: {r['reason']}" for r in failed[:20]]
        retry = json.dumps(report["retry_conf"], ensure_ascii=False) if report["retry_conf"] else "n/a"
        raise BatchFailed(
            f"{len(failed)} file(s) failed:\n"
            + "\n".join(lines)
            + f"\nTo re-run only the failed files, trigger with: {retry}"
        )
