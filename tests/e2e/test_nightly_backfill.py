"""Nightly runs and backfills over dates with the real scheduler (issue 10, points 1, 2 and 4).

The production deployment (PostgreSQL, Redis, Celery workers, triggerers; `Backend.celery`) with vod_sr_nightly
watching `nightly/`. Objects are dated through the emulator (S3 never lets a client set LastModified), on and just
inside the edges of three days. `airflow backfill create` over those days must give three runs, one after the other,
each taking exactly its day's file; each successful run's outputs event starts the example downstream DAG
vod_sr_publish, whose manifests list every output once. The run the scheduler makes by itself for last night (nothing
arrived) succeeds without starting the instance.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from include.local_aws.airflow_stack import AirflowStack
from include.local_aws.world import OUTPUT_BUCKET, SOURCE_BUCKET, make_sample_clip
from include.vod_sr.plan import run_token
from include.vod_sr.publish import PUBLISHED_PREFIX
from tests.e2e.conftest import stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack]
NIGHTLY, PUBLISH = "vod_sr_nightly", "vod_sr_publish"
DAY_1 = datetime(2026, 11, 1, tzinfo=UTC)
UPLOADS = {
    "nightly/before the backfill.mp4": DAY_1 - timedelta(seconds=1),
    "nightly/day 1, noon.mp4": DAY_1 + timedelta(hours=12),
    "nightly/day 2, first second.mp4": DAY_1 + timedelta(days=1),  # on the edge: day 2's, not day 1's
    "nightly/day 3, last second.mp4": DAY_1 + timedelta(days=3) - timedelta(seconds=1),
    "nightly/after the backfill.mp4": DAY_1 + timedelta(days=3),
}


@pytest.fixture
def airflow(world, airflow_backend, tmp_path) -> Iterator[AirflowStack]:
    clip = make_sample_clip(tmp_path / "clip.mp4", seconds=2, size="320x240")
    for key, when in UPLOADS.items():
        world.upload(key, clip)
        world.emulator.set_last_modified(SOURCE_BUCKET, key, when)
    env = {
        **stack_env(),
        "VOD_SR_NIGHTLY_PREFIXES": "nightly/",
        "VOD_SR_NIGHTLY_SETTLE_SECONDS": "0",
        "VOD_SR_NIGHTLY_START_DATE": "2026-10-01",
    }
    stack = AirflowStack(tmp_path / "airflow-home", env, backend=airflow_backend)
    stack.start(dag_ids=("vod_sr_batch", NIGHTLY, PUBLISH))
    yield stack
    stack.stop()
    assert stack.leaked == []


def runs_of(airflow: AirflowStack, dag_id: str) -> list[dict]:
    return airflow.api("GET", f"/dags/{dag_id}/dagRuns?limit=100&order_by=logical_date")["dag_runs"]


def report_of(world, dag_id: str, run_id: str) -> dict:
    body = world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=f"vod-sr-reports/{run_token(dag_id, run_id)}.json")["Body"]
    return json.loads(body.read())


def test_a_backfill_over_three_days_takes_each_days_files_one_run_after_the_other(airflow, world, figures):
    # The scheduler's own run for last night: nothing arrived then.
    airflow.wait_until(lambda: any(r["state"] == "success" for r in runs_of(airflow, NIGHTLY)), 300, "no nightly run")
    (last_night,) = runs_of(airflow, NIGHTLY)
    assert last_night["run_type"] == "scheduled"
    assert airflow.task_states(last_night["dag_run_id"], NIGHTLY)["plan"] == "success"
    assert "StartInstances" not in world.actions()  # an empty interval starts no instance

    backfill_command = [airflow.airflow, "backfill", "create", "--dag-id", NIGHTLY]
    backfill = subprocess.run(
        [*backfill_command, "--from-date", "2026-11-01", "--to-date", "2026-11-03", "--max-active-runs", "1"],
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert backfill.returncode == 0, backfill.stderr[-3000:]

    def backfill_runs() -> list[dict]:
        return [r for r in runs_of(airflow, NIGHTLY) if r["run_type"] == "backfill"]

    started = datetime.now(UTC)
    airflow.wait_until(
        lambda: len(backfill_runs()) == 3 and all(r["state"] in ("success", "failed") for r in backfill_runs()),
        900,
        "the backfill never finished",
    )
    runs = backfill_runs()
    figures["backfill_three_days_seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    assert [r["state"] for r in runs] == ["success"] * 3, [airflow.task_states(r["dag_run_id"], NIGHTLY) for r in runs]
    taken = {
        r["logical_date"][:10]: sorted(f["source"] for f in report_of(world, NIGHTLY, r["dag_run_id"])["files"])
        for r in runs
    }
    assert taken == {
        "2026-11-01": [f"s3://{SOURCE_BUCKET}/nightly/day 1, noon.mp4"],
        "2026-11-02": [f"s3://{SOURCE_BUCKET}/nightly/day 2, first second.mp4"],
        "2026-11-03": [f"s3://{SOURCE_BUCKET}/nightly/day 3, last second.mp4"],
    }
    spans = sorted((r["start_date"], r["end_date"]) for r in runs)
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(spans)), spans  # queued

    # The hand-off: every successful run with outputs started the downstream DAG, whose manifests list them once.
    def published() -> list[str]:
        listed = world.s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=PUBLISHED_PREFIX).get("Contents", [])
        manifests = [json.loads(world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=o["Key"])["Body"].read()) for o in listed]
        return sorted(output["output"] for manifest in manifests for output in manifest["outputs"])

    airflow.wait_until(lambda: len(published()) == 3, 300, "the downstream DAG did not publish the three outputs")
    assert published() == [
        f"s3://{OUTPUT_BUCKET}/nightly/day 1, noon_sr_cpu.mp4",
        f"s3://{OUTPUT_BUCKET}/nightly/day 2, first second_sr_cpu.mp4",
        f"s3://{OUTPUT_BUCKET}/nightly/day 3, last second_sr_cpu.mp4",
    ]
    # A manifest is written before its task and run are marked done: wait for the runs to end, then judge them.
    airflow.wait_until(
        lambda: all(r["state"] in ("success", "failed") for r in runs_of(airflow, PUBLISH)), 120, "publish never ended"
    )
    assert {r["state"] for r in runs_of(airflow, PUBLISH)} == {"success"}
    assert all(r["run_type"] == "asset_triggered" for r in runs_of(airflow, PUBLISH))
