"""
## VOD super-resolution, on upload

The same pipeline as `vod_sr_batch` (one implementation: `include/vod_sr/pipeline.py`), started by uploads: S3 sends
an event notification to an SQS queue for each new object, the Asset `vod_sr_uploads` watches that queue from the
triggerer, and each batch of messages starts a run that takes the videos they name, with the deployment's model,
instances and output naming.

One run at a time: uploads that arrive while a run works wait and are taken together by the next run, so a burst of
uploads starts the GPU once, not once per file. A batch with no usable upload (S3's test event, a non-video, an
object deleted since) ends quickly as a success without starting any instance. Outputs that already exist are
skipped, so a message delivered twice processes nothing twice.

Defined only when `VOD_SR_EVENTS_QUEUE_URL` names the queue. `VOD_SR_EVENTS_POLL_PAUSE_SECONDS` (default 5) is the
pause between empty long polls (README, Scheduling: Event-driven runs).
"""

from __future__ import annotations

import dataclasses

from airflow.sdk import DAG

from include.vod_sr.events import upload_asset
from include.vod_sr.nightly import check_nightly_settings
from include.vod_sr.pipeline import vod_sr_dag
from include.vod_sr.settings import Settings

SETTINGS = Settings.from_env()

if SETTINGS.events_queue_url:
    # An event-started run has no form: its defaults must be a complete request.
    check_nightly_settings(SETTINGS, "vod_sr_events reads VOD_SR_EVENTS_QUEUE_URL")
    vod_sr_events: DAG = vod_sr_dag(
        "vod_sr_events",
        doc_md=__doc__,
        schedule=upload_asset(SETTINGS),
        selection="events",
        # One run at a time whatever VOD_SR_MAX_ACTIVE_RUNS says: that is what batches the uploads up.
        settings=dataclasses.replace(SETTINGS, max_active_runs=1),
    )
