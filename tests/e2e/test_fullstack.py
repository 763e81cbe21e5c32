"""The real Airflow components (`airflow standalone`: scheduler, dag-processor, triggerer, API server) against the
emulator, driven through the REST API v2. Unlike dag.test(), this runs the deferred wait in the real triggerer."""

from __future__ import annotations

import os

import pytest

from include.local_aws.airflow_stack import AirflowStack
from include.local_aws.world import SAMPLE_KEY, boto_client, make_sample_clip

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack]
DAG_ID = "vod_sr_batch"


@pytest.fixture
def airflow(world, tmp_path):
    stack = AirflowStack(tmp_path / "airflow-home", dict(os.environ)).start()
    yield stack
    stack.stop()


def test_triggered_through_the_rest_api_the_triggerer_runs_the_wait(airflow, world):
    world.upload(SAMPLE_KEY)

    run_id = airflow.trigger({"sources": [SAMPLE_KEY], "model": "cpu"})
    assert airflow.wait_for_run(run_id, 300) == "success", airflow.task_states(run_id)
    assert world.s3.head_object(Bucket="vod-sr-demo-output", Key="original_640x480_10s_sr_cpu.mp4")["ContentLength"] > 0
    assert world.instance_state() == "stopped"
    wait_logs = (
        airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=lane.run_chunks" / "map_index=0"
    )
    assert "Pausing task as DEFERRED" in (wait_logs / "attempt=1.log").read_text()
    (trigger_log,) = wait_logs.glob("attempt=1.log.trigger.*.log")  # written by the triggerer process
    assert "Trigger fired event" in trigger_log.read_text() and "'outcome': 'success'" in trigger_log.read_text()


def test_marking_a_run_failed_still_stops_the_instance_and_cancels_its_command(airflow, world, tmp_path):
    # A 90 s clip keeps the SR command busy for half a minute: long enough to give up on it while it runs.
    world.upload("long.mp4", make_sample_clip(tmp_path / "long.mp4", seconds=90))
    run_id = airflow.trigger({"sources": ["long.mp4"], "model": "cpu"})
    airflow.wait_until(
        lambda: airflow.task_states(run_id).get("lane.run_chunks") == "deferred", 240, "the wait never deferred"
    )

    airflow.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", {"state": "failed"})
    airflow.wait_until(
        lambda: airflow.task_states(run_id).get("lane.release") in ("success", "failed"), 240, "the teardown never ran"
    )

    assert airflow.task_states(run_id)["lane.release"] == "success"
    assert world.instance_state() == "stopped"
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    commands = ssm.list_commands(InstanceId=world.instance_id)["Commands"]
    sr_commands = [c for c in commands if "chunk 0" in c["Comment"]]
    assert [c["Status"] for c in sr_commands] == ["Cancelled"]


def test_a_triggerer_lost_while_a_chunk_is_deferred_is_replaced_and_the_run_finishes(airflow, world, tmp_path):
    world.upload("long.mp4", make_sample_clip(tmp_path / "long.mp4", seconds=60))
    run_id = airflow.trigger({"sources": ["long.mp4"], "model": "cpu"})
    airflow.wait_until(
        lambda: airflow.task_states(run_id).get("lane.run_chunks") == "deferred", 240, "the wait never deferred"
    )
    old_triggerers = airflow.component_pids("triggerer")

    new_triggerer = airflow.replace_triggerer()

    assert new_triggerer not in old_triggerers
    airflow.wait_until(lambda: airflow.component_pids("triggerer") == [new_triggerer], 30, "the old triggerer lives")
    assert airflow.wait_for_run(run_id, 400) == "success", airflow.task_states(run_id)
    assert world.s3.head_object(Bucket="vod-sr-demo-output", Key="long_sr_cpu.mp4")["ContentLength"] > 0
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    sr_commands = [c for c in ssm.list_commands(InstanceId=world.instance_id)["Commands"] if "chunk 0" in c["Comment"]]
    assert [c["Status"] for c in sr_commands] == ["Success"]  # waited for, not sent again
