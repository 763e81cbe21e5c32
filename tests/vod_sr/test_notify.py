"""Notifications: the settings, what they add to the DAG (nothing when nothing is configured), the messages, and that
a notification never fails or hangs anything."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from moto import mock_aws

from include.vod_sr import notify
from include.vod_sr.instance import release_record
from include.vod_sr.notify import (
    RunNotifier,
    deadline_alert,
    deadline_message,
    notification_kwargs,
    report_uri,
    run_message,
)
from include.vod_sr.plan import run_token
from include.vod_sr.report import build_report, format_table
from include.vod_sr.settings import Settings
from tests.vod_sr.test_nightly import DEPLOYMENT

TOPIC = "arn:aws:sns:us-east-1:123456789012:vod-sr"
OUTPUT = "vod-out"
URI = f"s3://{OUTPUT}/vod-sr-reports/0123456789abcdef.json"


def report(files: list[dict], **extra) -> dict:
    counts: dict[str, int] = {}
    for f in files:
        counts[f["status"]] = counts.get(f["status"], 0) + 1
    return {"run_id": "manual__1", "run_token": "0123456789abcdef", "counts": counts, "files": files, **extra}


def record(n: int, status: str, reason: str = "") -> dict:
    return {
        "index": n,
        "source": f"s3://src/f{n:02d}.mp4",
        "output": f"s3://{OUTPUT}/f{n:02d}_sr_A.mp4",
        "status": status,
        "reason": reason,
    }


class TestSettings:
    def test_nothing_is_configured_by_default(self, monkeypatch):
        monkeypatch.delenv("VOD_SR_SNS_TOPIC_ARN", raising=False)
        monkeypatch.delenv("VOD_SR_DEADLINE_MINUTES", raising=False)

        settings = Settings.from_env()

        assert (settings.sns_topic_arn, settings.deadline_minutes) == ("", 0)

    def test_topic_and_deadline_from_the_environment(self, monkeypatch):
        monkeypatch.setenv("VOD_SR_SNS_TOPIC_ARN", f" {TOPIC} ")
        monkeypatch.setenv("VOD_SR_DEADLINE_MINUTES", "360")

        settings = Settings.from_env()

        assert (settings.sns_topic_arn, settings.deadline_minutes) == (TOPIC, 360)

    @pytest.mark.parametrize(("value", "message"), [("6h", "is not a whole number"), ("-5", "must be at least 0")])
    def test_a_bad_deadline_is_named(self, monkeypatch, value, message):
        monkeypatch.setenv("VOD_SR_DEADLINE_MINUTES", value)

        with pytest.raises(ValueError, match=f"VOD_SR_DEADLINE_MINUTES='{value}' {message}"):
            Settings.from_env()


class TestWhatTheDagGets:
    @pytest.mark.parametrize("scheduled", [True, False])
    def test_nothing_configured_adds_no_callback_and_no_deadline(self, scheduled):
        assert notification_kwargs(Settings(), scheduled=scheduled) == {}

    def test_a_topic_adds_a_success_and_a_failure_notifier(self):
        kwargs = notification_kwargs(Settings(sns_topic_arn=TOPIC, output_bucket=OUTPUT), scheduled=False)

        assert set(kwargs) == {"on_success_callback", "on_failure_callback"}
        success, failure = kwargs["on_success_callback"], kwargs["on_failure_callback"]
        assert isinstance(success, RunNotifier) and success.succeeded and not failure.succeeded
        assert (success.topic_arn, success.aws_conn_id, success.output_bucket) == (TOPIC, "aws_default", OUTPUT)

    def test_a_deadline_is_only_for_scheduled_dags(self):
        settings = Settings(sns_topic_arn=TOPIC, deadline_minutes=90, output_bucket=OUTPUT)

        assert "deadline" not in notification_kwargs(settings, scheduled=False)
        alert = notification_kwargs(settings, scheduled=True)["deadline"]

        from airflow.sdk import AsyncCallback, DeadlineReference

        assert alert.reference == DeadlineReference.DAGRUN_QUEUED_AT
        assert alert.interval == timedelta(minutes=90)
        assert isinstance(alert.callback, AsyncCallback)
        assert alert.callback.path == "include.vod_sr.notify.deadline_alert"
        assert alert.callback.kwargs == {
            "topic_arn": TOPIC,
            "aws_conn_id": "aws_default",
            "output_bucket": OUTPUT,
            "minutes": 90,
        }

    def test_no_deadline_without_minutes(self):
        assert "deadline" not in notification_kwargs(Settings(sns_topic_arn=TOPIC), scheduled=True)

    def test_a_deadline_without_a_topic_is_refused_for_a_scheduled_dag(self):
        with pytest.raises(ValueError, match="VOD_SR_DEADLINE_MINUTES=30 needs VOD_SR_SNS_TOPIC_ARN"):
            notification_kwargs(Settings(deadline_minutes=30), scheduled=True)
        assert notification_kwargs(Settings(deadline_minutes=30), scheduled=False) == {}

    @pytest.mark.parametrize("arn", ["vod-sr", "arn:aws:sqs:us-east-1:123456789012:q", "arn:aws:sns:us-east-1:1:t"])
    def test_a_malformed_topic_arn_is_refused(self, arn):
        with pytest.raises(ValueError, match="is not an SNS topic ARN"):
            notification_kwargs(Settings(sns_topic_arn=arn), scheduled=False)

    def test_the_topics_region_is_where_the_message_goes(self):
        assert notify.topic_region("arn:aws:sns:eu-west-1:123456789012:vod-sr.fifo") == "eu-west-1"
        assert notify.topic_region("arn:aws-cn:sns:cn-north-1:123456789012:t") == "cn-north-1"


class TestParsedDags:
    """The DAG folder parsed in a fresh interpreter, as the dag-processor does, with the settings in its env."""

    CODE = (
        "import json; from airflow.dag_processing.dagbag import DagBag; bag = DagBag(dag_folder='dags');"
        "d = lambda dag: dag and {'success': type(dag.on_success_callback).__name__,"
        "'failure': type(dag.on_failure_callback).__name__,"
        "'deadline': [{'reference': type(a.reference).__name__, 'seconds': a.interval.total_seconds(),"
        "'callback': type(a.callback).__name__, 'path': a.callback.path, 'kwargs': a.callback.kwargs}"
        "for a in (dag.deadline or [])]};"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},"
        "'batch': d(bag.dags.get('vod_sr_batch')), 'nightly': d(bag.dags.get('vod_sr_nightly'))}))"
    )

    def parse(self, **env: str) -> dict:
        import os
        import subprocess
        import sys

        from tests.conftest import REPO_ROOT

        result = subprocess.run(
            [sys.executable, "-c", self.CODE],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "VOD_SR_SNS_TOPIC_ARN": "", "VOD_SR_DEADLINE_MINUTES": "", **env},
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])

    def test_the_nightly_dag_alerts_past_its_deadline_and_both_dags_notify(self):
        parsed = self.parse(
            **DEPLOYMENT, VOD_SR_NIGHTLY_PREFIXES="incoming/", VOD_SR_SNS_TOPIC_ARN=TOPIC, VOD_SR_DEADLINE_MINUTES="360"
        )

        assert parsed["errors"] == {}
        assert parsed["nightly"]["deadline"] == [
            {
                "reference": "DagRunQueuedAtDeadline",
                "seconds": 6 * 3600,
                "callback": "AsyncCallback",
                "path": "include.vod_sr.notify.deadline_alert",
                "kwargs": {
                    "topic_arn": TOPIC,
                    "aws_conn_id": "aws_default",
                    "output_bucket": DEPLOYMENT["VOD_SR_OUTPUT_BUCKET"],
                    "minutes": 360,
                },
            }
        ]
        for dag in ("batch", "nightly"):
            assert (parsed[dag]["success"], parsed[dag]["failure"]) == ("RunNotifier", "RunNotifier")
        assert parsed["batch"]["deadline"] == []  # triggered by people: no deadline

    def test_nothing_configured_gives_no_callbacks_and_no_deadline(self):
        parsed = self.parse(**DEPLOYMENT, VOD_SR_NIGHTLY_PREFIXES="incoming/")

        assert parsed["errors"] == {}
        for dag in ("batch", "nightly"):
            assert parsed[dag] == {"success": "NoneType", "failure": "NoneType", "deadline": []}

    def test_a_deadline_without_a_topic_is_an_import_error_of_the_nightly_dag_only(self):
        parsed = self.parse(**DEPLOYMENT, VOD_SR_NIGHTLY_PREFIXES="incoming/", VOD_SR_DEADLINE_MINUTES="60")

        (error,) = parsed["errors"].values()
        assert "VOD_SR_DEADLINE_MINUTES=60 needs VOD_SR_SNS_TOPIC_ARN" in error
        assert parsed["batch"]["success"] == "NoneType" and parsed["nightly"] is None


class TestRunMessage:
    def message(self, stored: dict | None, succeeded: bool, **kwargs) -> tuple[str, str]:
        return run_message(
            dag_id="vod_sr_batch", run_id="manual__1", succeeded=succeeded, report=stored, report_uri=URI, **kwargs
        )

    def test_success_gives_counts_instance_time_and_the_reports_location(self):
        stored = report(
            [record(0, "ok"), record(1, "ok"), record(2, "skipped")],
            instance_seconds={"i-0aaa": 312},
            instances_left_running={},
        )

        subject, text = self.message(stored, True, run_url="https://airflow.example/dags/vod_sr_batch/runs/manual__1")

        assert subject == "vod-sr vod_sr_batch: succeeded, 2 ok, 1 skipped"
        assert text.splitlines() == [
            "vod_sr_batch run manual__1 succeeded.",
            "",
            "Files: 2 ok, 1 skipped",
            "Instance time: i-0aaa 5 min 12 s",
            f"Report: {URI}",
            "Run in Airflow: https://airflow.example/dags/vod_sr_batch/runs/manual__1",
        ]

    def test_failure_names_failed_files_capped_with_the_rerun_link_and_conf(self):
        files = [record(n, "failed", "ffmpeg exited 1: " + "x" * 500) for n in range(25)] + [record(25, "ok")]
        conf = {"sources": [f["source"] for f in files[:25]], "overwrite": True}
        stored = report(
            files,
            instance_seconds={"i-0aaa": 100, "i-0bbb": None},
            retry_conf=conf,
            rerun_link="/vod-sr/dags/vod_sr_batch/trigger?conf=%7B%7D",
            command_output=f"s3://{OUTPUT}/vod-sr-runs/0123456789abcdef/ssm-output/",
        )

        subject, text = self.message(stored, False, failed_task="report")
        lines = text.splitlines()

        assert subject == "vod-sr vod_sr_batch: FAILED, 25 of 26 file(s) failed"
        assert lines[:5] == [
            "vod_sr_batch run manual__1 failed.",
            "Failed task: report",
            "",
            "Files: 1 ok, 25 failed",
            "Failed files (25):",
        ]
        listed = [line for line in lines if line.startswith("  s3://src/")]
        assert [line.split(": ")[0].strip() for line in listed] == [f"s3://src/f{n:02d}.mp4" for n in range(20)]
        assert all(len(line) < 240 and line.endswith("...") for line in listed)  # reasons shortened
        assert "  ... and 5 more (all in the report)" in lines
        assert "Instance time: 100 s in all (i-0aaa 100 s, i-0bbb unknown)" in lines
        assert f"Report: {URI}" in lines
        assert "Re-run only the failed files: /vod-sr/dags/vod_sr_batch/trigger?conf=%7B%7D" in lines
        assert f"or trigger vod_sr_batch with: {json.dumps(conf)}" in lines
        assert f"Whole output of the run's SSM commands: {stored['command_output']}" in lines

    def test_the_estimated_cost_follows_the_instance_time(self):
        cost = {"currency": "USD", "total": 0.9305, "partial": False, "instances": {}, "unpriced": []}
        stored = report([record(0, "ok")], instance_seconds={"i-0aaa": 1800}, cost=cost)

        _, text = self.message(stored, True)
        lines = text.splitlines()

        assert lines[lines.index("Instance time: i-0aaa 30 min 0 s") + 1] == "Estimated EC2 cost: 0.9305 USD"

    def test_a_partial_cost_says_how_many_instances_it_leaves_out(self):
        cost = {
            "currency": "EUR",
            "total": 1.5,
            "partial": True,
            "instances": {},
            "unpriced": [
                {"instance_id": "i-0bbb", "reason": "its running time is unknown"},
                {"instance_id": "i-0ccc", "reason": "no EUR hourly rate for g5.xlarge"},
            ],
        }
        stored = report([record(0, "failed", "broken")], instance_seconds={"i-0aaa": 3600}, cost=cost)

        _, text = self.message(stored, False)

        assert "Estimated EC2 cost: 1.5000 EUR (partial: 2 instance(s) unpriced, see the report)" in text.splitlines()

    def test_a_report_without_a_cost_has_no_cost_line(self):
        _, text = self.message(report([record(0, "ok")], instance_seconds={"i-0aaa": 60}), True)

        assert "cost" not in text

    def test_a_conf_too_long_for_a_message_is_left_to_the_report(self):
        sources = [f"s3://src/{n:05d}.mp4" for n in range(500)]
        stored = report([record(0, "failed", "broken")], retry_conf={"sources": sources}, rerun_link=None)

        _, text = self.message(stored, False)

        assert "Re-run only the failed files: trigger vod_sr_batch with the report's retry_conf (" in text
        assert sources[-1] not in text

    def test_an_empty_interval_is_a_success_with_nothing_to_do(self):
        subject, text = self.message(report([], instance_seconds={}), True)

        assert subject == "vod-sr vod_sr_batch: succeeded, no files to do"
        assert "Files: none (nothing to do)" in text and "Instance time: none (no instance was used)" in text

    def test_a_run_without_a_report_says_so_and_names_the_failed_task(self):
        subject, text = self.message(None, False, report_error="not found", failed_task="plan")

        assert subject == "vod-sr vod_sr_batch: FAILED, no report"
        assert "Failed task: plan" in text and "No report was stored (not found)" in text
        assert f"Report location: {URI}" in text

    def test_file_names_reach_the_reader_as_they_are_and_the_subject_stays_within_snss_rules(self):
        stored = report([record(0, "failed", "{{ conf }} 한글")])
        stored["files"][0]["source"] = "s3://src/{{ dag }} 한글.mp4"

        subject, text = run_message(
            dag_id="vod_sr_" + "x" * 200, run_id="r", succeeded=False, report=stored, report_uri=URI
        )

        assert "s3://src/{{ dag }} 한글.mp4: {{ conf }} 한글" in text
        assert len(subject) <= 100 and subject.isascii() and subject.isprintable()

    def test_the_report_location_is_the_runs_token_under_vod_sr_reports(self):
        token = run_token("vod_sr_nightly", "scheduled__2026-11-28T00:00:00+00:00")

        assert report_uri(OUTPUT, "vod_sr_nightly", "scheduled__2026-11-28T00:00:00+00:00") == (
            f"s3://{OUTPUT}/vod-sr-reports/{token}.json"
        )


class TestInstanceTime:
    @pytest.fixture
    def ec2(self):
        with mock_aws():
            yield boto3.client("ec2", region_name="us-east-1")

    def instance(self, ec2) -> tuple[str, datetime]:
        instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        described = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        return instance_id, described["LaunchTime"]

    def test_of_an_instance_left_running_is_the_time_since_its_start(self, ec2):
        instance_id, launched = self.instance(ec2)

        assert release_record(ec2, instance_id, "left running: ...", now=launched + timedelta(seconds=312)) == {
            "instance_id": instance_id,
            "outcome": "left running: ...",
            "instance_seconds": 312,
            "instance_type": "m1.small",  # moto's default type
        }

    @pytest.mark.parametrize("outcome", ["stopped", "already stopped"])
    def test_of_a_stopped_instance_ends_at_the_stop_ec2_records(self, ec2, outcome):
        # Whoever stopped it (run_chunks' early release, usually): EC2's StateTransitionReason has the time.
        instance_id, launched = self.instance(ec2)
        ec2.stop_instances(InstanceIds=[instance_id])
        stopped = (launched + timedelta(seconds=312)).strftime("%Y-%m-%d %H:%M:%S")

        def stop_time(parsed, **_):
            parsed["Reservations"][0]["Instances"][0]["StateTransitionReason"] = f"User initiated ({stopped} GMT)"

        ec2.meta.events.register("after-call.ec2.DescribeInstances", stop_time)

        later = launched + timedelta(hours=5)
        assert release_record(ec2, instance_id, outcome, now=later)["instance_seconds"] == 312

    def test_is_unknown_when_ec2_gives_no_stop_time(self, ec2):
        instance_id, launched = self.instance(ec2)
        ec2.stop_instances(InstanceIds=[instance_id])

        def no_time(parsed, **_):
            parsed["Reservations"][0]["Instances"][0]["StateTransitionReason"] = ""

        ec2.meta.events.register("after-call.ec2.DescribeInstances", no_time)

        assert release_record(ec2, instance_id, "already stopped", now=launched)["instance_seconds"] is None

    def test_a_failing_describe_is_only_logged(self, ec2, caplog):
        instance_id, _ = self.instance(ec2)

        def refuse(**_):
            raise RuntimeError("EC2 is down")

        ec2.meta.events.register("before-call.ec2.DescribeInstances", refuse)

        assert release_record(ec2, instance_id, "left running")["instance_seconds"] is None
        assert "Could not read the launch time" in caplog.text

    def test_goes_into_the_report_and_its_table(self):
        built = build_report(
            run_id="manual__1",
            run_token="0123456789abcdef",
            params={},
            planned=[],
            verified=[],
            skipped=[],
            released=[
                {"instance_id": "i-0aaa", "outcome": "stopped", "instance_seconds": 312},
                {"instance_id": "i-0bbb", "outcome": "already stopped", "instance_seconds": None},
                {"instance_id": "i-0ccc", "outcome": "not released, it may still be running: boom"},
            ],
        )

        assert built["instance_seconds"] == {"i-0aaa": 312, "i-0bbb": None, "i-0ccc": None}
        assert "instance i-0aaa was up 312 s in the start this run used" in format_table(built)


@pytest.fixture
def aws():
    """moto's S3, SNS and SQS with the topic, a queue subscribed to it, and the output bucket."""
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=OUTPUT)
        sns, sqs = boto3.client("sns", region_name="us-east-1"), boto3.client("sqs", region_name="us-east-1")
        topic = sns.create_topic(Name="vod-sr")["TopicArn"]
        queue = sqs.create_queue(QueueName="notifications")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)

        def published() -> list[dict]:
            messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
            return [json.loads(m["Body"]) for m in messages]

        yield SimpleNamespace(s3=s3, topic=topic, published=published)


def callback_context(dag_id: str = "vod_sr_batch", run_id: str = "manual__1", **extra) -> dict:
    return {"dag": SimpleNamespace(dag_id=dag_id), "run_id": run_id, "reason": "success", **extra}


class TestRunNotifier:
    def notifier(self, aws, succeeded: bool) -> RunNotifier:
        return RunNotifier(topic_arn=aws.topic, aws_conn_id=None, output_bucket=OUTPUT, succeeded=succeeded)

    def test_publishes_the_stored_report(self, aws):
        token = run_token("vod_sr_batch", "manual__1")
        stored = report([record(0, "ok")], instance_seconds={"i-0aaa": 42})
        aws.s3.put_object(Bucket=OUTPUT, Key=f"vod-sr-reports/{token}.json", Body=json.dumps(stored).encode())

        self.notifier(aws, True)(callback_context())  # as the dag-processor calls it

        (message,) = aws.published()
        assert message["Subject"] == "vod-sr vod_sr_batch: succeeded, 1 ok"
        assert "Instance time: i-0aaa 42 s" in message["Message"]
        assert f"Report: s3://{OUTPUT}/vod-sr-reports/{token}.json" in message["Message"]
        assert message["MessageAttributes"]["vod_sr_event"] == {"Type": "String", "Value": "success"}

    def test_publishes_the_reports_estimated_cost(self, aws):
        from include.vod_sr.cost import Rates

        token = run_token("vod_sr_batch", "manual__1")
        stored = build_report(
            run_id="manual__1",
            run_token=token,
            params={},
            planned=[],
            verified=[],
            skipped=[],
            released=[
                {
                    "instance_id": "i-0aaa",
                    "outcome": "stopped",
                    "instance_seconds": 1800,
                    "instance_type": "g6e.xlarge",
                },
                {"instance_id": "i-0bbb", "outcome": "stopped", "instance_seconds": 600, "instance_type": None},
            ],
            rates=Rates(),
        )
        aws.s3.put_object(Bucket=OUTPUT, Key=f"vod-sr-reports/{token}.json", Body=json.dumps(stored).encode())

        self.notifier(aws, False)(callback_context())

        (message,) = aws.published()
        assert "Estimated EC2 cost: 0.9305 USD (partial: 1 instance(s) unpriced, see the report)" in message["Message"]

    def test_reads_the_report_from_the_runs_own_output_bucket(self, aws):
        aws.s3.create_bucket(Bucket="other-out")
        token = run_token("vod_sr_batch", "manual__1")
        aws.s3.put_object(Bucket="other-out", Key=f"vod-sr-reports/{token}.json", Body=json.dumps(report([])))

        self.notifier(aws, True)(callback_context(params={"output_bucket": "other-out"}))

        (message,) = aws.published()
        assert f"Report: s3://other-out/vod-sr-reports/{token}.json" in message["Message"]

    def test_a_failure_without_a_report_still_goes_out(self, aws):
        ti = SimpleNamespace(task_id="plan", map_index=-1)

        self.notifier(aws, False)(callback_context(ti=ti))

        (message,) = aws.published()
        assert message["Subject"] == "vod-sr vod_sr_batch: FAILED, no report"
        assert "Failed task: plan" in message["Message"]
        assert message["MessageAttributes"]["vod_sr_event"]["Value"] == "failure"

    def test_a_failing_publish_is_logged_and_raises_nothing(self, aws, caplog):
        notifier = RunNotifier(
            topic_arn="arn:aws:sns:us-east-1:123456789012:no-such-topic",
            aws_conn_id=None,
            output_bucket=OUTPUT,
            succeeded=True,
        )

        with caplog.at_level(logging.ERROR):
            notifier(callback_context())

        assert "Could not publish the run's success" in caplog.text
        assert aws.published() == []

    def test_an_unreachable_aws_gives_up_in_seconds(self, monkeypatch, caplog):
        # Nothing listens on the endpoint: connect timeouts and retries are short, so the callback ends soon.
        import time

        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
        notifier = RunNotifier(topic_arn=TOPIC, aws_conn_id=None, output_bucket=OUTPUT, succeeded=False)

        started = time.monotonic()
        notifier(callback_context())

        assert time.monotonic() - started < 30
        assert "Could not publish the run's failure" in caplog.text


def published_alerts(monkeypatch) -> list[tuple]:
    """What the deadline alert publishes, kept instead of sent to SNS."""
    sent: list[tuple] = []

    async def apublish(*args):
        sent.append(args)

    monkeypatch.setattr(notify, "apublish", apublish)
    return sent


def deadline_context(state: str = "running", run_type: str = "scheduled", conf: dict | None = None) -> dict:
    return {
        "dag_run": {
            "dag_id": "vod_sr_nightly",
            "dag_run_id": "scheduled__2026-11-28T00:00:00+00:00",
            "state": state,
            "run_type": run_type,
            "queued_at": "2026-11-29T00:00:02Z",
            "start_date": "2026-11-29T00:00:03Z",
            "data_interval_start": "2026-11-28T00:00:00Z",
            "data_interval_end": "2026-11-29T00:00:00Z",
            "conf": conf or {},
        },
        "deadline": {"id": "d-1", "deadline_time": datetime(2026, 11, 29, 6, 0, 2, tzinfo=UTC)},
    }


class TestDeadlineAlert:
    @pytest.fixture(autouse=True)
    def unclaimed(self, request, monkeypatch):
        """The alert is not marked sent yet (the claim itself is tested on moto's S3 below)."""
        if "aws" not in request.fixturenames:
            monkeypatch.setattr(notify, "claim_alert", lambda *args: (True, ""))

    def alert(self, topic: str, context: dict) -> str:
        return asyncio.run(
            deadline_alert(topic_arn=topic, aws_conn_id=None, output_bucket=OUTPUT, minutes=360, context=context)
        )

    def test_the_message_says_how_late_and_where_the_report_will_be(self):
        context = deadline_context()
        uri = report_uri(OUTPUT, "vod_sr_nightly", context["dag_run"]["dag_run_id"])

        subject, text = deadline_message(
            context["dag_run"], deadline_time=context["deadline"]["deadline_time"], minutes=360, report_uri=uri
        )

        assert subject == "vod-sr vod_sr_nightly: still running past its deadline"
        assert text.splitlines()[0] == (
            "vod_sr_nightly run scheduled__2026-11-28T00:00:00+00:00 is still running 360 min after it was queued "
            "(VOD_SR_DEADLINE_MINUTES; deadline 2026-11-29T06:00:02+00:00)."
        )
        assert "Queued at 2026-11-29T00:00:02Z, started at 2026-11-29T00:00:03Z." in text
        assert f"Its report will be at {uri} when it ends." in text

    def test_a_run_still_going_is_published(self, monkeypatch):
        sent = published_alerts(monkeypatch)

        assert self.alert(TOPIC, deadline_context(conf={"output_bucket": "other-out"})) == "sent"
        ((topic, conn, _, text, attributes),) = sent
        assert (topic, conn, attributes) == (TOPIC, None, {"vod_sr_event": "deadline", "dag_id": "vod_sr_nightly"})
        assert "s3://other-out/vod-sr-reports/" in text  # the run's own output bucket

    @pytest.mark.parametrize(
        ("state", "run_type", "result"),
        [
            ("failed", "scheduled", "not sent: the run had ended (failed)"),  # 3.3.2 keeps a failed run's deadline
            ("success", "scheduled", "not sent: the run had ended (success)"),
            ("running", "backfill", "not sent: a backfill run"),
        ],
    )
    def test_nothing_is_sent_for_a_run_that_ended_or_a_backfill_run(self, monkeypatch, state, run_type, result):
        async def apublish(*args):
            raise AssertionError("published")

        monkeypatch.setattr(notify, "apublish", apublish)

        assert self.alert(TOPIC, deadline_context(state, run_type)) == result

    def test_a_failing_publish_is_logged_and_raises_nothing(self, aws, caplog):
        result = self.alert("arn:aws:sns:us-east-1:123456789012:no-such-topic", deadline_context())

        assert result.startswith("not sent: ")
        assert "Could not publish the deadline alert" in caplog.text

    def test_a_hanging_publish_is_given_up(self, monkeypatch, caplog):
        async def hang(*args):
            await asyncio.sleep(3600)

        monkeypatch.setattr(notify, "apublish", hang)
        monkeypatch.setattr(notify, "DEADLINE_PUBLISH_TIMEOUT", 0.2)

        assert self.alert(TOPIC, deadline_context()).startswith("not sent: TimeoutError")

    def test_of_two_triggerers_running_the_same_alert_only_one_publishes(self, aws, monkeypatch):
        # Seen with two triggerers on Airflow 3.3.2: one deadline callback ran in both within half a second.
        sent = published_alerts(monkeypatch)

        first, second = self.alert(TOPIC, deadline_context()), self.alert(TOPIC, deadline_context())

        assert (first, second) == ("sent", "not sent: already sent by another triggerer")
        assert len(sent) == 1

    def test_a_claim_whose_answer_was_lost_and_retried_is_still_ours(self, aws, monkeypatch):
        # Seen in the full-stack test under load: the marker was written, both triggerers then said "already sent",
        # and nothing was sent. botocore retries a PutObject whose answer it did not get (a read timeout on a
        # triggerer whose event loop was blocked), and the retry meets the marker the first attempt wrote: 412.
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        class AnswerLostOnce:
            """Double: moto's S3 client, whose first PutObject is written but answered as botocore's retry of it
            would be (the same request sent again)."""

            def __init__(self, real: Any) -> None:
                self.real, self.lost = real, False

            def put_object(self, **kwargs: Any) -> Any:
                if not self.lost:
                    self.lost = True
                    self.real.put_object(**kwargs)  # written; its answer never reaches the caller
                return self.real.put_object(**kwargs)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.real, name)

        real_get_conn = AwsBaseHook.get_conn
        monkeypatch.setattr(AwsBaseHook, "get_conn", lambda hook: AnswerLostOnce(real_get_conn(hook)))
        sent = published_alerts(monkeypatch)

        first, second = self.alert(TOPIC, deadline_context()), self.alert(TOPIC, deadline_context())

        assert (first, second) == ("sent", "not sent: already sent by another triggerer")
        assert len(sent) == 1

    def test_an_alert_that_cannot_be_marked_sent_is_sent_anyway(self, aws, monkeypatch, caplog):
        sent = published_alerts(monkeypatch)
        context = deadline_context(conf={"output_bucket": "no-such-bucket"})

        assert self.alert(TOPIC, context) == "sent" and len(sent) == 1
        assert "Could not mark the deadline alert as sent (NoSuchBucket): sending it anyway" in caplog.text
