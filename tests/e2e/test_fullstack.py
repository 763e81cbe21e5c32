"""The production deployment on one machine: PostgreSQL, Redis, and Airflow's API server, scheduler, dag-processor,
two Celery workers and two triggerers, each its own process with its own hostname as on separate hosts, against the
emulator, driven through the REST API v2. Unlike dag.test(), this runs tasks on Celery workers and the deferred wait
in a real triggerer."""

from __future__ import annotations

import dataclasses
import time

import pytest

from include.local_aws.airflow_stack import AirflowStack
from include.local_aws.world import SAMPLE_KEY, boto_client, create_world
from tests.e2e.conftest import stack_env

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack]
DAG_ID = "vod_sr_batch"


@pytest.fixture
def airflow(shared_airflow, world):
    """The session's shared stack: these tests name their instance in the run's conf."""
    return shared_airflow


@pytest.fixture
def own_airflow(world, airflow_backend, tmp_path):
    """A stack of this test's own, for a test that kills one of its components."""
    stack = AirflowStack(tmp_path / "airflow-home", stack_env(), backend=airflow_backend).start()
    yield stack
    stack.stop()
    assert stack.leaked == []  # every process ended with its component


def test_triggered_through_the_rest_api_the_triggerer_runs_the_wait(airflow, world):
    world.upload(SAMPLE_KEY)

    run_id = airflow.trigger({"sources": [SAMPLE_KEY], "model": "cpu", "instance_ids": [world.instance_id]})
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
    # A model run paced to 90 s (as a GPU's would be) keeps the SR command busy: long enough to give up on it while
    # it runs, without upscaling a long clip on the CPU the other stack-tier tests share.
    world.emulator.set_faults({"instances": {world.instance_id: {"model_run_seconds": 90}}})
    world.upload("long.mp4")
    run_id = airflow.trigger({"sources": ["long.mp4"], "model": "cpu", "instance_ids": [world.instance_id]})
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


def test_a_batch_whose_lanes_land_on_both_workers_finishes(world, airflow_backend, tmp_path, figures):
    # One task at a time per worker: while one worker runs a lane's task, the other lane's goes to the other worker.
    backend = dataclasses.replace(airflow_backend, worker_concurrency=1)
    started = time.monotonic()
    airflow = AirflowStack(tmp_path / "airflow-home", stack_env(), backend=backend).start()
    figures["celery_stack_start_seconds"] = round(time.monotonic() - started, 1)
    try:
        second_instance = create_world(world.emulator.endpoint_url)
        sources = [f"lanes/{n}.mp4" for n in range(4)]
        for key in sources:
            world.upload(key)

        triggered = time.monotonic()
        run_id = airflow.trigger(
            {"sources": sources, "model": "cpu", "instance_ids": [world.instance_id, second_instance], "chunk_size": 1}
        )

        assert airflow.wait_for_run(run_id, 400) == "success", airflow.task_states(run_id)
        figures["two_lanes_four_files_run_seconds"] = round(time.monotonic() - triggered, 1)
        tis = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]
        lane_hosts = {ti["hostname"] for ti in tis if ti["task_id"].startswith("lane.")}
        figures["two_lanes_task_instances_per_worker"] = {
            host: sum(ti["hostname"] == host for ti in tis) for host in sorted(lane_hosts)
        }
        assert lane_hosts == {"worker-1", "worker-2"}, [(ti["task_id"], ti["map_index"], ti["hostname"]) for ti in tis]
        for key in sources:
            output = key.replace(".mp4", "_sr_cpu.mp4")
            assert world.s3.head_object(Bucket="vod-sr-demo-output", Key=output)["ContentLength"] > 0
        states = world.ec2.describe_instances(InstanceIds=[world.instance_id, second_instance])["Reservations"]
        assert {i["State"]["Name"] for r in states for i in r["Instances"]} == {"stopped"}
    finally:
        airflow.stop()
    assert airflow.leaked == []


def triggerer_holding(airflow: AirflowStack, run_id: str) -> str | None:
    """Hostname of the triggerer running the deferred run_chunks' trigger, or None while it is unassigned."""
    ti = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/lane.run_chunks/0")
    triggerer_id = ((ti or {}).get("trigger") or {}).get("triggerer_id")  # no ti: not mapped yet
    if ti is None or ti["state"] != "deferred" or triggerer_id is None:
        return None
    jobs = airflow.api("GET", "/jobs?job_type=TriggererJob&limit=100")["jobs"]
    return next(job["hostname"] for job in jobs if job["id"] == triggerer_id)


def test_a_triggerer_lost_while_a_chunk_is_deferred_hands_its_trigger_to_the_other(
    own_airflow, world, tmp_path, figures
):
    airflow = own_airflow
    # The chunk must still run after the takeover: its model run is paced to 45 s (as a GPU's would be) rather than a
    # 60 s 640x480 clip upscaled on the CPU, which loaded the machine the other stack-tier tests share.
    world.emulator.set_faults({"instances": {world.instance_id: {"model_run_seconds": 45}}})
    world.upload("long.mp4")
    run_id = airflow.trigger({"sources": ["long.mp4"], "model": "cpu"})
    airflow.wait_until(lambda: triggerer_holding(airflow, run_id) is not None, 240, "the wait never deferred")
    holder = triggerer_holding(airflow, run_id)
    survivor = ({"triggerer-1", "triggerer-2"} - {holder}).pop()

    killed_at = time.monotonic()
    airflow.kill_component(holder)  # SIGKILL the triggerer and its process group: its host is gone

    airflow.wait_until(lambda: triggerer_holding(airflow, run_id) == survivor, 120, f"{survivor} never took over")
    figures["triggerer_killed_to_trigger_taken_over_seconds"] = round(time.monotonic() - killed_at, 1)
    assert airflow.wait_for_run(run_id, 400) == "success", airflow.task_states(run_id)
    assert world.s3.head_object(Bucket="vod-sr-demo-output", Key="long_sr_cpu.mp4")["ContentLength"] > 0
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    sr_commands = [c for c in ssm.list_commands(InstanceId=world.instance_id)["Commands"] if "chunk 0" in c["Comment"]]
    assert [c["Status"] for c in sr_commands] == ["Success"]  # waited for by the survivor, not sent again
