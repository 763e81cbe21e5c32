"""The example downstream step (dags/vod_sr_publish.py): a manifest of the outputs that the triggering vod-sr runs
produced, written next to the reports, for a packaging or CDN step to pick up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from include.vod_sr.report import REPORT_PREFIX, put_json

PUBLISHED_PREFIX = f"{REPORT_PREFIX}published/"


def manifest_from_events(events: Iterable[Any]) -> dict[str, Any]:
    """One manifest for every outputs event behind this run (several vod-sr runs may have ended since the last one):
    outputs in event order, each once; the runs and reports they came from."""
    outputs: dict[str, dict[str, Any]] = {}
    runs = []
    for event in events:
        extra: Mapping[str, Any] = event.extra or {}
        runs.append({k: extra.get(k) for k in ("dag_id", "run_id", "report", "output_count", "outputs_truncated")})
        for produced in extra.get("outputs") or []:
            outputs.setdefault(produced["output"], produced)
    return {"runs": runs, "outputs": list(outputs.values())}


def report_bucket(manifest: Mapping[str, Any]) -> str:
    """Where the manifest goes: next to the latest run's report."""
    reports = [run["report"] for run in manifest["runs"] if (run.get("report") or "").startswith("s3://")]
    if not reports:
        raise ValueError("no triggering vod-sr run names its report: nothing to publish next to")
    return reports[-1].removeprefix("s3://").split("/", 1)[0]


def write_manifest(s3: Any, bucket: str, name: str, manifest: Mapping[str, Any]) -> str:
    return put_json(s3, bucket, f"{PUBLISHED_PREFIX}{name}.json", manifest)
