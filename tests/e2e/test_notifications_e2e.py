"""Notifications end to end: vod_sr_batch through dag.test() on the emulator with VOD_SR_SNS_TOPIC_ARN set. The
emulator's SNS delivers to an SQS queue subscribed to the topic, from which the test reads what was published.

dag.test() runs the DAG-level callbacks itself, in its own process, once the run has ended (DagRun.update_state with
execute_callbacks=True, then DagRun.execute_dag_callbacks); a deployment runs the same notifier in the dag-processor
(tests/e2e/test_notifications_fullstack.py)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from include.local_aws.world import OUTPUT_BUCKET, SAMPLE_KEY, boto_client
from include.vod_sr.plan import run_token
from include.vod_sr.report import REPORT_PREFIX

pytestmark = pytest.mark.e2e


@dataclass
class Topic:
    arn: str
    sqs: Any
    queue_url: str

    def messages(self, wait: int = 2) -> list[dict[str, Any]]:
        """Every SNS notification published since the last call (the SNS envelopes, as SQS receives them)."""
        found: list[dict[str, Any]] = []
        while True:
            received = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0 if found else wait
            ).get("Messages", [])
            if not received:
                return found
            for message in received:
                found.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])


def subscribed_topic(endpoint_url: str, name: str) -> Topic:
    """A fresh SNS topic on the emulator with an SQS queue subscribed to it."""
    sns, sqs = boto_client("sns", endpoint_url), boto_client("sqs", endpoint_url)
    arn = sns.create_topic(Name=name)["TopicArn"]
    queue_url = sqs.create_queue(QueueName=f"{name}-inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn)
    topic = Topic(arn, sqs, queue_url)
    topic.messages(wait=0)  # an earlier test's leftovers, if the names met
    return topic


@pytest.fixture
def topic(world, monkeypatch, request) -> Topic:
    topic = subscribed_topic(world.emulator.endpoint_url, f"vod-sr-{request.node.name[:40].replace('_', '-')}")
    monkeypatch.setenv("VOD_SR_SNS_TOPIC_ARN", topic.arn)
    return topic


def stored(world, dag_id: str, run_id: str) -> dict[str, Any]:
    key = f"{REPORT_PREFIX}{run_token(dag_id, run_id)}.json"
    return json.loads(world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read())


def test_a_successful_run_publishes_one_message_with_counts_instance_time_and_report(world, topic):
    world.upload(SAMPLE_KEY)

    run = world.run(sources=[SAMPLE_KEY])

    assert run.state == "success", run.task_states
    (message,) = topic.messages()
    print("Published:\n" + json.dumps({k: message[k] for k in ("Subject", "Message")}, indent=2, ensure_ascii=False))
    report = stored(world, "vod_sr_batch", run.run_id)
    seconds = report["instance_seconds"][world.instance_id]
    assert isinstance(seconds, int) and 0 < seconds < 300  # the instance's start to its stop, from EC2
    assert message["TopicArn"] == topic.arn
    assert message["Subject"] == "vod-sr vod_sr_batch: succeeded, 1 ok"
    assert message["MessageAttributes"]["vod_sr_event"] == {"Type": "String", "Value": "success"}
    text = message["Message"].splitlines()
    assert text[0] == f"vod_sr_batch run {run.run_id} succeeded."
    assert "Files: 1 ok" in text
    assert f"Instance time: {world.instance_id} {seconds} s" in text
    assert f"Report: s3://{OUTPUT_BUCKET}/{REPORT_PREFIX}{report['run_token']}.json" in text


def test_a_failed_run_publishes_a_failure_message_naming_the_file_and_the_rerun(world, topic):
    world.upload("good.mp4")
    world.upload("corrupt.mp4", body=b"this is not a video" * 100)

    run = world.run(sources=["good.mp4", "corrupt.mp4"])

    assert run.state == "failed"
    (message,) = topic.messages()
    print("Published:\n" + json.dumps({k: message[k] for k in ("Subject", "Message")}, indent=2, ensure_ascii=False))
    report = stored(world, "vod_sr_batch", run.run_id)
    assert message["Subject"] == "vod-sr vod_sr_batch: FAILED, 1 of 2 file(s) failed"
    assert message["MessageAttributes"]["vod_sr_event"]["Value"] == "failure"
    text = message["Message"]
    assert f"vod_sr_batch run {run.run_id} failed." in text
    assert "Failed task: report" in text
    assert "Files: 1 ok, 1 failed" in text
    assert "Failed files (1):\n  s3://vod-sr-demo-source/corrupt.mp4: " in text
    assert f"Instance time: {world.instance_id} {report['instance_seconds'][world.instance_id]} s" in text
    assert f"Report: s3://{OUTPUT_BUCKET}/{REPORT_PREFIX}{report['run_token']}.json" in text
    assert f"Re-run only the failed files: {report['rerun_link']}" in text
    assert f"or trigger vod_sr_batch with: {json.dumps(report['retry_conf'], ensure_ascii=False)}" in text


def test_bad_input_publishes_a_failure_without_a_report(world, topic):
    world.upload("present.mp4")

    run = world.run(sources=["present.mp4", "absent.mp4"])

    assert run.state == "failed"
    (message,) = topic.messages()
    assert message["Subject"] == "vod-sr vod_sr_batch: FAILED, no report"
    assert "No report was stored (not found)" in message["Message"]


def test_a_topic_that_does_not_exist_changes_nothing_for_the_run(world, monkeypatch, caplog):
    monkeypatch.setenv("VOD_SR_SNS_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:no-such-topic")
    world.upload(SAMPLE_KEY)

    run = world.run(sources=[SAMPLE_KEY])

    assert run.state == "success", run.task_states
    assert "Could not publish the run's success" in caplog.text


def test_the_deadline_alert_publishes_through_the_providers_async_hook(world, topic):
    # The triggerer's part, called as its CallbackTrigger does (aiobotocore over HTTP to the emulator's SNS, with the
    # aws_default connection); the full stack test has the scheduler fire it.
    from include.vod_sr.notify import deadline_alert

    dag_run = {"dag_id": "vod_sr_nightly", "dag_run_id": "scheduled__x", "state": "running", "run_type": "scheduled"}
    context = {
        "dag_run": {**dag_run, "queued_at": "2026-11-29T00:00:02Z", "start_date": "2026-11-29T00:00:03Z", "conf": {}},
        "deadline": {"id": "d", "deadline_time": "2026-11-29T06:00:02Z"},
    }

    result = asyncio.run(
        deadline_alert(
            topic_arn=topic.arn, aws_conn_id="aws_default", output_bucket=OUTPUT_BUCKET, minutes=360, context=context
        )
    )

    assert result == "sent"
    (message,) = topic.messages()
    assert message["Subject"] == "vod-sr vod_sr_nightly: still running past its deadline"
    assert message["MessageAttributes"]["vod_sr_event"]["Value"] == "deadline"
