"""Hand-off to downstream work: each successful run that produced outputs emits an Asset event for the deployment's
output location, with the run's outputs in the event's extra, so packaging or publishing DAGs can be scheduled on
it (`schedule=outputs_asset(settings)`; example: dags/vod_sr_publish.py).

The report task's outlet is an AssetAlias: the event is attached to the asset only when the run has outputs, so a
nightly run that found nothing new does not wake the downstream DAGs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import Asset, AssetAlias

from include.vod_sr.settings import Settings

OUTPUTS_ASSET_NAME = "vod_sr_outputs"
OUTPUTS_ALIAS = AssetAlias(name="vod_sr_outputs_of_a_run", group="vod-sr")
# An asset event's extra lives in the metadata database: a big run lists its first outputs and points at the report.
MAX_OUTPUTS_IN_EVENT = 1000


def outputs_asset(settings: Settings) -> Asset:
    """The deployment's output location as an Asset (by name; the URI says where it is when the bucket is set)."""
    if settings.output_bucket:
        return Asset(name=OUTPUTS_ASSET_NAME, uri=f"s3://{settings.output_bucket}/", group="vod-sr")
    return Asset(name=OUTPUTS_ASSET_NAME, group="vod-sr")


def outputs_event_extra(report: Mapping[str, Any], report_uri: str, dag_id: str) -> dict[str, Any] | None:
    """The extra of a run's outputs event: what it produced (output, source, bytes), or None if it produced
    nothing (skipped files were produced by an earlier run and are not listed again)."""
    produced = [
        {"output": record["output"], "source": record["source"], "bytes": record.get("bytes")}
        for record in report["files"]
        if record["status"] == "ok"
    ]
    if not produced:
        return None
    return {
        "dag_id": dag_id,
        "run_id": report["run_id"],
        "report": report_uri,
        "output_count": len(produced),
        "outputs": produced[:MAX_OUTPUTS_IN_EVENT],
        "outputs_truncated": len(produced) > MAX_OUTPUTS_IN_EVENT,  # then the report lists them all
    }
