"""
## VOD super-resolution, nightly

The same pipeline as `vod_sr_batch` (one implementation: `include/vod_sr/pipeline.py`), on a schedule: each run
takes the videos that **arrived under the watch prefixes during its data interval** (by S3 `LastModified`, the
window `[start, end)` shifted back by the settle time), with the deployment's model, instances and output naming.
An interval in which nothing arrived ends quickly as a success without starting any instance. Outputs that already
exist are skipped, so nothing is processed twice.

Re-processing past days is a backfill over dates:
`airflow backfill create --dag-id vod_sr_nightly --from-date 2026-11-01 --to-date 2026-11-07`
(or the UI's backfill dialog); `max_active_runs` queues its runs on the shared instances.

Defined only when `VOD_SR_NIGHTLY_PREFIXES` names the folders to watch. Settings: `VOD_SR_NIGHTLY_SCHEDULE` (cron or
preset, default `@daily`), `VOD_SR_NIGHTLY_TIMEZONE`, `VOD_SR_NIGHTLY_SETTLE_SECONDS`, `VOD_SR_NIGHTLY_START_DATE`
(README, Scheduling).
"""

from __future__ import annotations

from airflow.sdk import DAG

from include.vod_sr.nightly import check_nightly_settings, nightly_start_date, nightly_timetable
from include.vod_sr.pipeline import vod_sr_dag
from include.vod_sr.settings import Settings

SETTINGS = Settings.from_env()

if SETTINGS.nightly_prefixes:
    check_nightly_settings(SETTINGS)  # a scheduled run has no form: its defaults must be a complete request
    vod_sr_nightly: DAG = vod_sr_dag(
        "vod_sr_nightly",
        doc_md=__doc__,
        schedule=nightly_timetable(SETTINGS),
        selection="interval",
        settings=SETTINGS,
        start_date=nightly_start_date(SETTINGS),
        catchup=False,  # a new deployment starts with last night, not with every night since the start date
    )
