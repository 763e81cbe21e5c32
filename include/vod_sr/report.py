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
    verified: Iterable[Iterable[Mapping[str, Any]]],
    skipped: Iterable[FileJob],
    planned_count: int,
) -> dict[str, Any]:
    files = [dict(record) for chunk in verified for record in chunk]
    files += [file_record(job, "skipped", "output already exists (overwrite is off)") for job in skipped]
    files.sort(key=lambda record: record["index"])
    seen = {record["index"] for record in files if record["status"] != "skipped"}
    if len(seen) < planned_count:
        # A chunk whose verify never ran (its send failed, say): nothing about its files is known.
        files.append({"index": None, "status": "failed", "reason": f"{planned_count - len(seen)} file(s) not verified"})
    failed = [record for record in files if record["status"] == "failed"]
    retry_sources = [record["source"] for record in failed if record.get("source")]
    return {
        "run_id": run_id,
        "run_token": run_token,
        "counts": dict(Counter(record["status"] for record in files)),
        "files": files,
        "retry_conf": {**dict(params), "sources": retry_sources} if retry_sources else None,
    }


def format_table(report: Mapping[str, Any]) -> str:
    rows = [("#", "status", "bytes", "source", "output", "reason")]
    rows += [
        (str(r["index"]), r["status"], str(r.get("bytes", "")), r.get("source", ""), r.get("output", ""), r["reason"])
        for r in report["files"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    )


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
        lines = [f"{r.get('source') or '?'}: {r['reason']}" for r in failed[:20]]
        retry = json.dumps(report["retry_conf"], ensure_ascii=False) if report["retry_conf"] else "n/a"
        raise BatchFailed(
            f"{len(failed)} file(s) failed:\n"
            + "\n".join(lines)
            + f"\nTo re-run only the failed files, trigger with: {retry}"
        )
