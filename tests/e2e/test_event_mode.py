"""vod_sr_events on the production deployment (PostgreSQL, Celery workers, two triggerers, the scheduler and the API
server, each its own process) against the emulator: uploads to the source bucket notify an SQS queue (moto delivers S3
notifications to SQS in server mode, so nothing here sends the event messages itself), the Asset watcher in a
triggerer receives them, and the scheduler starts runs of the DAG by itself.

- S3's test event (sent when the notification is set up) starts a run that ends as a success with no instance started;
- an upload starts a run by itself, which processes it (the delay from the upload to the run's start is measured);
- uploads made while a run works, each received as an asset event of its own, are all taken by ONE following run.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from include.local_aws.airflow_stack import AirflowStack
from include.local_aws.upload_events import create_upload_queue
from include.local_aws.world import OUTPUT_BUCKET, SOURCE_BUCKET, airflow_env, make_sample_clip
from tests.e2e.conftest import stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack]
DAG_ID = "vod_sr_events"
PREFIX = "incoming/"


@pytest.fixture
def queue_url(world):
    """A queue notified of the source bucket's uploads under incoming/ (holding S3's test event already)."""
    url = create_upload_queue(
        world.emulator.endpoint_url, SOURCE_BUCKET, queue_name=f"vod-sr-uploads-{uuid.uuid4().hex[:8]}", prefix=PREFIX
    )
    yield url
    world.s3.put_bucket_notification_configuration(Bucket=SOURCE_BUCKET, NotificationConfiguration={})


@pytest.fixture
def airflow(world, queue_url, airflow_backend, tmp_path):
    env = {
        **stack_env(),
        **airflow_env(world.emulator.endpoint_url, world.instance_id),
        "VOD_SR_EVENTS_QUEUE_URL": queue_url,
        "VOD_SR_START_RETRY_DELAY": "1",
    }
    stack = AirflowStack(tmp_path / "airflow-home", env, backend=airflow_backend)
    stack.start(dag_ids=("vod_sr_batch", DAG_ID))
    yield stack
    stack.stop()
    assert stack.leaked == []  # every process ended with its component


def runs(airflow: AirflowStack) -> list[dict]:
    """vod_sr_events' runs, oldest first."""
    return airflow.api("GET", f"/dags/{DAG_ID}/dagRuns?order_by=run_after&limit=100")["dag_runs"]


def new_run(airflow: AirflowStack, known: set[str], timeout: float) -> dict:
    """The first run not in `known` to appear, waiting for it."""
    found: list[dict] = []

    def appeared() -> bool:
        found[:] = [run for run in runs(airflow) if run["dag_run_id"] not in known]
        return bool(found)

    airflow.wait_until(appeared, timeout, f"no new {DAG_ID} run started by itself")
    return found[0]


def finished(airflow: AirflowStack, run: dict, timeout: float) -> dict:
    state = airflow.wait_for_run(run["dag_run_id"], timeout, dag_id=DAG_ID)
    assert state == "success", airflow.task_states(run["dag_run_id"], dag_id=DAG_ID)
    return airflow.run(run["dag_run_id"], dag_id=DAG_ID)


def planned(airflow: AirflowStack, run: dict) -> dict:
    """The run's plan summary (file count, ...), from XCom."""
    path = f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/plan/xcomEntries/summary"
    return airflow.api("GET", path)["value"]


def consumed_events(airflow: AirflowStack, run: dict) -> list[dict]:
    path = f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents"
    return airflow.api("GET", path)["asset_events"]


def upload_events_since(airflow: AirflowStack, since: datetime) -> list[dict]:
    (asset,) = airflow.api("GET", "/assets?name_pattern=vod_sr_uploads")["assets"]
    events = airflow.api("GET", f"/assets/events?asset_id={asset['id']}&limit=100&order_by=timestamp")["asset_events"]
    return [event for event in events if datetime.fromisoformat(event["timestamp"]) >= since]


def output_size(world, key: str) -> int:
    return world.s3.head_object(Bucket=OUTPUT_BUCKET, Key=key)["ContentLength"]


def test_uploads_start_runs_by_themselves_and_a_burst_is_one_run(airflow, world, tmp_path, figures):
    clip = make_sample_clip(tmp_path / "clip.mp4", seconds=2, size="320x240")

    # S3's test event, queued when the notification was set up: a run with nothing to do, no instance started.
    test_run = finished(airflow, new_run(airflow, set(), 180), 120)
    assert planned(airflow, test_run)["file_count"] == 0
    assert "StartInstances" not in world.actions() and "SendCommand" not in world.actions()
    assert world.instance_state() == "stopped"
    known = {test_run["dag_run_id"]}

    # One upload: a run starts by itself and processes it.
    uploaded_at = datetime.now(UTC)
    world.upload(f"{PREFIX}first 'upload' $(id).mp4", clip)
    first = new_run(airflow, known, 120)
    started = datetime.fromisoformat(finished(airflow, first, 300)["start_date"])
    figures["event_upload_to_run_start_seconds"] = round((started - uploaded_at).total_seconds(), 1)
    queued = datetime.fromisoformat(airflow.run(first["dag_run_id"], DAG_ID)["queued_at"])
    figures["event_upload_to_run_queued_seconds"] = round((queued - uploaded_at).total_seconds(), 1)
    assert first["run_type"] == "asset_triggered"
    assert planned(airflow, first)["file_count"] == 1
    assert output_size(world, f"{PREFIX}first 'upload' $(id)_sr_cpu.mp4") > 0
    assert world.instance_state() == "stopped"
    known.add(first["dag_run_id"])

    # A run at work; three uploads while it works, far enough apart to be received as asset events of their own.
    world.upload(f"{PREFIX}busy.mp4", make_sample_clip(tmp_path / "busy.mp4", seconds=4, size="320x240"))
    busy = new_run(airflow, known, 120)
    airflow.wait_until(
        lambda: airflow.task_states(busy["dag_run_id"], DAG_ID).get("plan") == "success", 120, "busy run never planned"
    )
    known.add(busy["dag_run_id"])
    burst_from = datetime.now(UTC)
    burst = [f"{PREFIX}burst/{n} ü.mp4" for n in range(3)]
    for key in burst:
        world.upload(key, clip)
        time.sleep(4)  # the watcher is back polling about 1 s after it fires
    assert airflow.run_state(busy["dag_run_id"], DAG_ID) == "running", "the busy run ended before the burst did"
    assert {run["dag_run_id"] for run in runs(airflow)} == known  # nothing started beside the working run
    finished(airflow, busy, 300)

    following = new_run(airflow, known, 120)
    finished(airflow, following, 300)
    known.add(following["dag_run_id"])
    time.sleep(20)  # long enough for a second or third run to be created if the burst were not one batch
    assert {run["dag_run_id"] for run in runs(airflow)} == known, "the burst started more than one run"
    assert planned(airflow, following)["file_count"] == 3
    for key in burst:
        assert output_size(world, key.replace(".mp4", "_sr_cpu.mp4")) > 0
    burst_events = upload_events_since(airflow, burst_from)
    figures["event_burst_asset_events"] = len(burst_events)
    figures["event_burst_events_given_by_airflow"] = len(consumed_events(airflow, following))
    assert len(burst_events) >= 2, "the burst arrived as one asset event: it did not test batching across events"
    assert world.instance_state() == "stopped"
