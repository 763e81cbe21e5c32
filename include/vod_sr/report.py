"""The run report: one row per file, a JSON copy in S3, and a conf that re-runs only the failures."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from include.vod_sr.commands import ssm_output_prefix
from include.vod_sr.cost import Rates, format_money, run_cost
from include.vod_sr.instance import STOPPED_OUTCOMES
from include.vod_sr.links import prefilled_trigger_link
from include.vod_sr.plan import FileJob
from include.vod_sr.verify import LEFT, file_record, media_summary

REPORT_PREFIX = "vod-sr-reports/"


class BatchFailed(RuntimeError):
    """At least one file of the run has no verified output."""


def per_lane(value: Any) -> list[Any]:
    """A mapped lane task's results, one per lane. Airflow 3.3 hands over the only result of a single map index
    unwrapped, and None when no lane produced one."""
    if value is None:
        return []
    if isinstance(value, Mapping | int | str):
        return [value]
    return list(value)


def build_report(
    *,
    run_id: str,
    run_token: str,
    params: Mapping[str, Any],
    planned: Iterable[FileJob],
    verified: Iterable[Iterable[Mapping[str, Any]]],
    skipped: Iterable[FileJob],
    transient_aws_errors: Iterable[int | None] | None = None,
    released: Iterable[Mapping[str, str]] | None = None,
    dag_id: str = "",
    ui_base_url: str = "",
    rates: Rates | None = None,
) -> dict[str, Any]:
    """One record per file: verified ones as verify judged them, planned ones nobody verified as failed (their
    instance's lane stopped before verification, e.g. it could not be started), skipped ones as skipped.

    `transient_aws_errors`: each lane's count of throttling/5xx/connection errors that outlasted the client's retries
    (run_chunks' XCom `transient_aws_errors`); each was retried, and a count above zero says AWS was struggling.
    `released`: each lane's release outcome (`{"instance_id", "outcome", "instance_seconds"}`); those that did not
    stop the instance are listed under `instances_left_running` with the reason, and each instance's running time in
    the start the run used (`instance.release_record`) under `instance_seconds` (None: unknown).
    `dag_id` and `ui_base_url` (the Airflow UI's base URL, may be empty): for the one-click re-run link.
    `rates` (with `released`): the instances' estimated EC2 cost under `cost` (`cost.run_cost`), priced from each
    release record's `instance_seconds` and `instance_type`.
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
    # Overwrite: a failed file's output may exist (a broken output, or an upload that ended just before a kill);
    # without it the re-run would skip that file as done and succeed. Only the failed files are listed.
    retry_conf = {**dict(params), "sources": retry_sources, "prefixes": [], "manifest": None, "overwrite": True}
    # Files the run's budget kept from being sent: not failures, work for the next run (with the same budget).
    left_sources = [record["source"] for record in files if record["status"] == LEFT]
    left_conf = {**dict(params), "sources": left_sources, "prefixes": [], "manifest": None}
    report = {
        "run_id": run_id,
        "run_token": run_token,
        "counts": dict(Counter(record["status"] for record in files)),
        "files": files,
        "retry_conf": retry_conf if retry_sources else None,
        "rerun_link": prefilled_trigger_link(ui_base_url, dag_id, retry_conf) if retry_sources and dag_id else None,
        "left_conf": left_conf if left_sources else None,
        "left_link": prefilled_trigger_link(ui_base_url, dag_id, left_conf) if left_sources and dag_id else None,
    }
    if params.get("budget") is not None:
        report["budget"] = {
            "amount": params["budget"],
            "currency": rates.currency if rates is not None else None,
            "reached": bool(left_sources),
        }
    if transient_aws_errors is not None:
        report["transient_aws_errors"] = sum(count or 0 for count in transient_aws_errors)
    if retry_sources and params.get("output_bucket"):
        # Every SSM command's whole stdout and stderr, by command id; run_chunks' log links each failed one.
        report["command_output"] = f"s3://{params['output_bucket']}/{ssm_output_prefix(run_token)}"
    if released is not None:
        released = list(released)
        report["instances_left_running"] = {
            r["instance_id"]: r["outcome"] for r in released if r["outcome"] not in STOPPED_OUTCOMES
        }
        report["instance_seconds"] = {r["instance_id"]: r.get("instance_seconds") for r in released}
        if rates is not None:
            report["cost"] = run_cost(released, rates)
    return report


def format_table(report: Mapping[str, Any]) -> str:
    rows = [("#", "status", "bytes", "figures (source -> output)", "source", "output", "reason")]
    rows += [
        (
            str(r["index"]),
            r["status"],
            str(r.get("bytes", "")),
            media_summary(r),
            r.get("source", ""),
            r.get("output", ""),
            r["reason"],
        )
        for r in report["files"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    if report.get("transient_aws_errors") is not None:
        lines.append(f"transient AWS errors: {report['transient_aws_errors']}")
    if report.get("command_output"):
        lines.append(f"whole output of the run's SSM commands: {report['command_output']}")
    lines += [f"instance {i} {why}" for i, why in (report.get("instances_left_running") or {}).items()]
    lines += [
        f"instance {i} was up {'an unknown time' if s is None else f'{s} s'} in the start this run used"
        for i, s in (report.get("instance_seconds") or {}).items()
    ]
    if report.get("cost"):
        lines += cost_lines(report["cost"])
    if report.get("left_conf"):
        lines.append(left_line(report))
    return "\n".join(lines)


def left_line(report: Mapping[str, Any]) -> str:
    """What the report says of the files the budget left: how many, and how to run them."""
    left = report["left_conf"]
    budget = report.get("budget") or {}
    link = f" open {report['left_link']} or" if report.get("left_link") else ""
    amount = f" of {budget['amount']} {budget.get('currency') or ''}".rstrip() if budget else ""
    return (
        f"{len(left['sources'])} file(s) left for the next run: the run's budget{amount} was reached. To run them,"
        f"{link} trigger with: {json.dumps(left, ensure_ascii=False)}"
    )


def cost_lines(cost: Mapping[str, Any]) -> list[str]:
    """The table's estimated cost: a line per instance, then the total (saying when it leaves instances out)."""
    currency = cost["currency"]
    why = {u["instance_id"]: u["reason"] for u in cost.get("unpriced") or []}
    lines = []
    for instance_id, entry in (cost.get("instances") or {}).items():
        if entry.get("cost") is None:
            lines.append(
                f"instance {instance_id} ({entry.get('instance_type') or 'type unknown'}) cost unknown: "
                f"{why.get(instance_id, 'not priced')}"
            )
        else:
            lines.append(
                f"instance {instance_id} ({entry['instance_type']}) cost about {format_money(entry['cost'], currency)}"
                f": {entry['billed_seconds']} s billed at {entry['hourly_rate']} {currency}/h"
            )
    total = f"estimated EC2 cost: {format_money(cost['total'], currency)}"
    if cost.get("unpriced"):
        total += f" (partial: {len(cost['unpriced'])} instance(s) unpriced)"
    return [*lines, total]


def put_json(s3: Any, bucket: str, key: str, document: Mapping[str, Any]) -> str:
    """Store `document` as readable UTF-8 JSON; returns its s3:// URI."""
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(document, indent=2, ensure_ascii=False).encode(),
        ContentType="application/json",
    )
    return f"s3://{bucket}/{key}"


def write_report(s3: Any, bucket: str, report: Mapping[str, Any]) -> str:
    return put_json(s3, bucket, f"{REPORT_PREFIX}{report['run_token']}.json", report)


def raise_if_failed(report: Mapping[str, Any]) -> None:
    failed = [r for r in report["files"] if r["status"] == "failed"]
    if failed:
        lines = [f"{r['source']}: {r['reason']}" for r in failed[:20]]
        retry = json.dumps(report["retry_conf"], ensure_ascii=False) if report["retry_conf"] else "n/a"
        link = report.get("rerun_link")
        raise BatchFailed(
            f"{len(failed)} file(s) failed:\n"
            + "\n".join(lines)
            + (f"\nTo re-run only the failed files, open {link}" if link else "")
            + f"\n{'or ' if link else 'To re-run only the failed files, '}trigger with: {retry}"
        )
