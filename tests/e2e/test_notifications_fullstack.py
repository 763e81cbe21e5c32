"""Notifications on the production deployment (PostgreSQL, Celery, API server, scheduler, dag-processor, workers,
triggerers; tests/e2e/test_fullstack.py), against the emulator's SNS with an SQS queue subscribed to the topic.

- A vod_sr_batch run's success is published by the DAG's on_success_callback, which Airflow 3 runs in the
  dag-processor once the scheduler has seen the run end.
- A vod_sr_nightly run stuck past VOD_SR_DEADLINE_MINUTES (its instance's SSM agent never comes Online) is published
  by the DeadlineAlert: the scheduler notices the deadline has passed and queues its AsyncCallback, which a
  triggerer runs."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from include.local_aws.airflow_stack import AirflowStack
from include.local_aws.world import SAMPLE_KEY, SOURCE_BUCKET, create_world
from tests.e2e.conftest import stack_env
from tests.e2e.test_notifications_e2e import subscribed_topic

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack]
NIGHTLY = "vod_sr_nightly"


def wait_for_events(topic, events: set[str], timeout: float, airflow: AirflowStack) -> dict[str, dict]:
    """The messages published to the topic by vod_sr_event (success, failure, deadline), once each of `events` came."""
    found: dict[str, list[dict]] = {}
    deadline = time.monotonic() + timeout
    while not events <= set(found):
        assert time.monotonic() < deadline, f"only {sorted(found)} of {sorted(events)} arrived\n{airflow.tail()}"
        for message in topic.messages(wait=5):
            found.setdefault(message["MessageAttributes"]["vod_sr_event"]["Value"], []).append(message)
    assert {event: len(messages) for event, messages in found.items()} == dict.fromkeys(events, 1)
    return {event: messages[0] for event, messages in found.items()}


# It failed on a loaded machine, and then alone too, for a reason of the test stack's own: its components had no
# shared Fernet key (AirflowStack sets one now), so the triggerers could not decrypt the deadline's callback and died.
def test_success_is_published_by_the_dag_processor_and_a_stuck_nightly_run_by_its_deadline(
    world, airflow_backend, tmp_path, monkeypatch, figures
):
    topic = subscribed_topic(world.emulator.endpoint_url, "vod-sr-fullstack")
    # The nightly run takes yesterday's uploads on the world's instance, whose agent never comes Online: it waits
    # (up to VOD_SR_AGENT_ONLINE_TIMEOUT) past its one-minute deadline. The batch run uses a second instance.
    world.emulator.set_faults({"instances": {world.instance_id: {"agent_never_online": True}}})
    yesterday_noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=1)
    world.upload("incoming/late.mp4")
    world.emulator.set_last_modified(SOURCE_BUCKET, "incoming/late.mp4", yesterday_noon)
    second_instance = create_world(world.emulator.endpoint_url)
    world.upload(SAMPLE_KEY)
    for name, value in {
        "VOD_SR_SNS_TOPIC_ARN": topic.arn,
        "VOD_SR_DEADLINE_MINUTES": "1",
        "VOD_SR_NIGHTLY_PREFIXES": "incoming/",
        "VOD_SR_NIGHTLY_SETTLE_SECONDS": "0",
        "VOD_SR_AGENT_ONLINE_TIMEOUT": "600",
    }.items():
        monkeypatch.setenv(name, value)

    airflow = AirflowStack(tmp_path / "airflow-home", stack_env(), backend=airflow_backend)
    airflow.start(dag_ids=("vod_sr_batch", NIGHTLY))
    try:
        run_id = airflow.trigger({"sources": [SAMPLE_KEY], "model": "cpu", "instance_ids": [second_instance]})
        airflow.wait_until(
            lambda: airflow.api("GET", f"/dags/{NIGHTLY}/dagRuns")["dag_runs"], 120, "no nightly run was scheduled"
        )
        (nightly,) = airflow.api("GET", f"/dags/{NIGHTLY}/dagRuns")["dag_runs"]  # catchup is off: the last day only
        assert nightly["run_type"] == "scheduled", nightly
        assert airflow.wait_for_run(run_id, 300) == "success", airflow.task_states(run_id)

        published = wait_for_events(topic, {"success", "deadline"}, 300, airflow)
        alerted = time.monotonic()

        success, alert = published["success"], published["deadline"]
        for message in (success, alert):
            print(f"Published:\n{message['Subject']}\n{message['Message']}\n")
        assert success["Subject"] == "vod-sr vod_sr_batch: succeeded, 1 ok"
        assert f"vod_sr_batch run {run_id} succeeded." in success["Message"]
        assert f"Instance time: {second_instance} " in success["Message"]
        assert alert["Subject"] == f"vod-sr {NIGHTLY}: still running past its deadline"
        assert f"{NIGHTLY} run {nightly['dag_run_id']} is still running 1 min after it was queued" in alert["Message"]
        assert airflow.run_state(nightly["dag_run_id"], NIGHTLY) == "running"  # an alert, not a kill
        deadlines = [
            datetime.fromisoformat(nightly["queued_at"].replace("Z", "+00:00")) + timedelta(minutes=1),
            datetime.fromisoformat(alert["Timestamp"].replace("Z", "+00:00")),
        ]
        figures["deadline_alert_seconds_after_deadline"] = round((deadlines[1] - deadlines[0]).total_seconds(), 1)
        assert deadlines[0] <= deadlines[1]

        # Stop the stuck run: its teardown stops the instance; the deadline fired once only.
        airflow.api("PATCH", f"/dags/{NIGHTLY}/dagRuns/{nightly['dag_run_id']}", {"state": "failed"})
        airflow.wait_until(
            lambda: airflow.task_states(nightly["dag_run_id"], NIGHTLY).get("lane.release") in ("success", "failed"),
            240,
            "the nightly run's teardown never ran",
        )
        time.sleep(max(0.0, 10 - (time.monotonic() - alerted)))
        later = topic.messages(wait=2)
        print("Final state of the nightly run:", airflow.run_state(nightly["dag_run_id"], NIGHTLY))
        print("Published after it was marked failed:", [(m["Subject"], m["Message"]) for m in later])
        assert [m for m in later if m["MessageAttributes"]["vod_sr_event"]["Value"] == "deadline"] == []
    finally:
        airflow.stop()
    assert airflow.leaked == []
