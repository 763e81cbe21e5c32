"""
## Publish vod-sr outputs (example downstream DAG)

Scheduled on the `vod_sr_outputs` asset: it runs after every vod-sr run (batch, nightly or event-driven) that produced
outputs, reads the outputs from the triggering asset events' extra and writes a manifest of them to
`s3://OUTPUT_BUCKET/vod-sr-reports/published/<run>.json`. Replace the task with your own packaging (HLS, CDN
invalidation, catalogue update) and keep the schedule.
"""

from __future__ import annotations

from airflow.sdk import DAG, get_current_context, task

from include.vod_sr.assets import outputs_asset
from include.vod_sr.settings import Settings

SETTINGS = Settings.from_env()
OUTPUTS = outputs_asset(SETTINGS)

with DAG("vod_sr_publish", schedule=OUTPUTS, doc_md=__doc__, tags=["vod-sr"], max_active_runs=1) as vod_sr_publish:

    @task
    def publish_manifest() -> str:
        """Write one manifest of the new outputs of every vod-sr run behind this run."""
        from include.vod_sr.aws import aws_client
        from include.vod_sr.plan import run_token
        from include.vod_sr.publish import manifest_from_events, report_bucket, write_manifest

        context = get_current_context()
        manifest = manifest_from_events(context["triggering_asset_events"][OUTPUTS])
        name = run_token(context["dag"].dag_id, context["run_id"])
        location = write_manifest(aws_client("s3", SETTINGS.aws_conn_id), report_bucket(manifest), name, manifest)
        print(f"{len(manifest['outputs'])} output(s) of {len(manifest['runs'])} run(s) published in {location}")
        return location

    publish_manifest()
