"""Event-driven selection (vod_sr_events): reading uploads out of the asset events an SQS watcher produces, the
settings that turn the mode on, and the DAG being defined only when they do."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from urllib.parse import quote_plus

import pytest

from include.vod_sr import events
from include.vod_sr.events import late_asset_events, sources_from_asset_events, still_present, upload_asset
from include.vod_sr.plan import BatchRequest, PlanError, plan_batch
from include.vod_sr.settings import Settings
from tests.conftest import REPO_ROOT
from tests.vod_sr.test_plan import INSTANCE_ID, OUTPUT, SOURCE, TOKEN, put, s3  # noqa: F401 - s3 is a fixture
from tests.vod_sr.test_sources import HOSTILE_KEYS

QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/vod-sr-uploads"


def s3_record(key: str, event_name: str = "ObjectCreated:Put", bucket: str = SOURCE, size: int = 1234, **kw) -> dict:
    """One record as S3 writes it (notification-content-structure, event version 2.1): the key URL-encoded with '+'
    for spaces; S3 keeps '/' (safe="/"), moto encodes it too (the default, safe="")."""
    encoded = kw.get("encoded", quote_plus(key, safe=kw.get("safe", "/")))
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-29T03:04:05.678Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "vod-sr-uploads",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": encoded,
                "size": size,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "sequencer": "0A1B2C3D4E5F678901",
            },
        },
    }


def message(body: dict | str, message_id: str = "m-1") -> dict:
    """An SQS message as ReceiveMessage returns it and SqsSensorTrigger passes it on."""
    return {
        "MessageId": message_id,
        "ReceiptHandle": f"receipt-{message_id}",
        "MD5OfBody": "0123456789abcdef0123456789abcdef",
        "Body": body if isinstance(body, str) else json.dumps(body),
    }


def asset_event(*messages: dict, event_id: int = 1) -> SimpleNamespace:
    """An asset event whose extra is what Trigger.submit_event stores for a watcher's TriggerEvent (Airflow 3.3)."""
    payload = {"status": "success", "message_batch": list(messages)}
    return SimpleNamespace(id=event_id, extra={"from_trigger": True, "payload": payload})


def uploads(*keys: str) -> dict:
    return {"Records": [s3_record(key) for key in keys]}


TEST_EVENT = {
    "Service": "Amazon S3",
    "Event": "s3:TestEvent",
    "Time": "2026-11-29T03:00:00.000Z",
    "Bucket": SOURCE,
    "RequestId": "5582815E1AEA5ADF",
    "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
}


class TestSourcesFromAssetEvents:
    def test_an_s3_notification_names_its_upload(self):
        events_ = [asset_event(message(uploads("incoming/show s01e01.mp4")))]

        assert sources_from_asset_events(events_) == [f"s3://{SOURCE}/incoming/show s01e01.mp4"]

    @pytest.mark.parametrize("safe", ["/", ""], ids=["s3-keeps-slashes", "moto-encodes-slashes"])
    @pytest.mark.parametrize(
        "key",
        [
            *HOSTILE_KEYS,
            "plus+sign and%20percent.mp4",  # a '+' in a key is %2B and a '%' is %25: never read as a space
            "quotes 'single' \"double\" $(id) `id`.mp4",
            "émission/épisode 1 — ü.mp4",
            "emoji 🎬/clip.mp4",
        ],
        ids=repr,
    )
    def test_keys_are_url_decoded_exactly(self, key, safe):
        event = asset_event(message({"Records": [s3_record(key, safe=safe)]}))

        assert sources_from_asset_events([event]) == [f"s3://{SOURCE}/{key}"]

    def test_the_triggering_events_mapping_and_several_events_messages_and_records(self):
        first = asset_event(message(uploads("a.mp4", "b.mov"), "m-1"), message(uploads("c.mkv"), "m-2"), event_id=1)
        second = asset_event(message({"Records": [s3_record("d.ts", bucket="partner-drop")]}, "m-3"), event_id=2)
        triggering = {"vod_sr_uploads": [first, second]}  # asset -> its events

        assert sources_from_asset_events(triggering) == [
            f"s3://{SOURCE}/a.mp4",
            f"s3://{SOURCE}/b.mov",
            f"s3://{SOURCE}/c.mkv",
            "s3://partner-drop/d.ts",
        ]

    def test_duplicates_are_taken_once_in_first_seen_order(self):
        redelivered = message(uploads("b.mp4"), "m-2")  # SQS delivers at least once
        events_ = [
            asset_event(message(uploads("a.mp4", "b.mp4"), "m-1"), redelivered, event_id=1),
            asset_event(redelivered, message(uploads("a.mp4"), "m-3"), event_id=2),  # overwritten upload
        ]

        assert sources_from_asset_events(events_) == [f"s3://{SOURCE}/a.mp4", f"s3://{SOURCE}/b.mp4"]

    @pytest.mark.parametrize("kind", ["Put", "Post", "Copy", "CompleteMultipartUpload"])
    def test_every_object_created_kind_counts(self, kind):
        event = asset_event(message({"Records": [s3_record("a.mp4", event_name=f"ObjectCreated:{kind}")]}))

        assert sources_from_asset_events([event]) == [f"s3://{SOURCE}/a.mp4"]

    def test_other_event_kinds_are_ignored(self, caplog):
        records = [
            s3_record("gone.mp4", event_name="ObjectRemoved:Delete"),
            s3_record("restored.mp4", event_name="ObjectRestore:Completed"),
            s3_record("new.mp4"),
        ]
        with caplog.at_level(logging.INFO, logger=events.__name__):
            found = sources_from_asset_events([asset_event(message({"Records": records}))])

        assert found == [f"s3://{SOURCE}/new.mp4"]
        assert "Ignored ObjectRemoved:Delete of s3://src-bucket/gone.mp4" in caplog.text

    def test_s3_test_events_are_ignored(self, caplog):
        with caplog.at_level(logging.INFO, logger=events.__name__):
            found = sources_from_asset_events([asset_event(message(TEST_EVENT, "m-test"), message(uploads("a.mp4")))])

        assert found == [f"s3://{SOURCE}/a.mp4"]
        assert "Ignored SQS message m-test: S3's test event" in caplog.text

    def test_a_batch_of_only_test_events_names_nothing(self):
        assert sources_from_asset_events([asset_event(message(TEST_EVENT))]) == []

    def test_non_videos_folder_markers_and_empty_uploads_are_left_out(self, caplog):
        records = [
            s3_record("notes.txt"),
            s3_record("incoming/"),  # the console's "create folder"
            s3_record("empty.mp4", size=0),
            s3_record("UPPER.MP4"),
        ]
        with caplog.at_level(logging.INFO, logger=events.__name__):
            found = sources_from_asset_events([asset_event(message({"Records": records}))])

        assert found == [f"s3://{SOURCE}/UPPER.MP4"]
        assert "Ignored s3://src-bucket/notes.txt: not a video" in caplog.text
        assert "Ignored s3://src-bucket/empty.mp4: the upload is empty (0 bytes)" in caplog.text

    def test_the_runs_extensions_choose_what_is_a_video(self):
        records = [s3_record("master.mxf"), s3_record("a.mp4")]

        assert sources_from_asset_events([asset_event(message({"Records": records}))], [".MXF"]) == [
            f"s3://{SOURCE}/master.mxf"
        ]

    def test_an_sns_envelope_is_unwrapped(self):
        envelope = {
            "Type": "Notification",
            "MessageId": "6a1f3b1c-0000-4000-8000-000000000000",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:vod-sr-uploads",
            "Subject": "Amazon S3 Notification",
            "Message": json.dumps(uploads("via sns.mp4")),
        }

        assert sources_from_asset_events([asset_event(message(envelope))]) == [f"s3://{SOURCE}/via sns.mp4"]

    @pytest.mark.parametrize(
        ("bad", "logged"),
        [
            pytest.param(
                message("not json {", "m-bad"),
                "Skipped SQS message m-bad in asset event 1: its Body is not JSON",
                id="not-json",
            ),
            pytest.param(message({"hello": "world"}, "m-bad"), "no Records list", id="not-s3"),
            pytest.param(message(json.dumps([1, 2]), "m-bad"), "no Records list", id="json-list"),
            pytest.param({"MessageId": "m-bad"}, "its Body is NoneType, not text", id="no-body"),
            pytest.param("just a string", "it is not an SQS message", id="not-a-message"),
            pytest.param(
                message({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}, "m-bad"),
                "Skipped a record of SQS message m-bad in asset event 1: a record has no s3.bucket.name",
                id="no-key",
            ),
            pytest.param(
                message({"Records": [s3_record("x", encoded="bad%FFbyte.mp4")]}, "m-bad"),
                "key 'bad%FFbyte.mp4' does not decode to UTF-8",
                id="not-utf8",
            ),
            pytest.param(message({"Records": [{"s3": {}}]}, "m-bad"), "a record has no eventName", id="no-name"),
            pytest.param(message({"Records": ["x"]}, "m-bad"), "a record is not an object", id="record-type"),
            pytest.param(
                message({"Records": [s3_record("a.mp4", bucket="Not_A_Bucket")]}, "m-bad"),
                "is not a valid S3 bucket name",
                id="bad-bucket",
            ),
        ],
    )
    def test_a_malformed_message_is_named_and_skipped_and_the_rest_of_the_batch_kept(self, bad, logged, caplog):
        batch = asset_event(message(uploads("before.mp4"), "m-1"), bad, message(uploads("after.mp4"), "m-2"))
        with caplog.at_level(logging.WARNING, logger=events.__name__):
            found = sources_from_asset_events([batch])

        assert found == [f"s3://{SOURCE}/before.mp4", f"s3://{SOURCE}/after.mp4"]
        assert logged in caplog.text

    @pytest.mark.parametrize(
        "extra",
        [{}, {"from_trigger": True}, {"payload": {"status": "success"}}, {"payload": "text"}, None],
        ids=["empty", "no-payload", "no-batch", "payload-text", "none"],
    )
    def test_an_event_not_from_the_queue_watcher_is_named_and_skipped(self, extra, caplog):
        with caplog.at_level(logging.WARNING, logger=events.__name__):
            found = sources_from_asset_events(
                [SimpleNamespace(id=7, extra=extra), asset_event(message(uploads("a.mp4")))]
            )

        assert found == [f"s3://{SOURCE}/a.mp4"]
        assert "Skipped asset event 7: its extra holds no SQS message batch" in caplog.text

    def test_the_task_sdks_own_event_objects(self):
        """The run's context holds TriggeringAssetEventsAccessor of AssetEventDagRunReferenceResult (Airflow 3.3)."""
        from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
        from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

        event = AssetEventDagRunReferenceResult(
            asset={"name": "vod_sr_uploads", "uri": "vod_sr_uploads", "extra": {}},
            extra=asset_event(message(uploads("sdk.mp4"))).extra,
            source_task_id=None,
            source_dag_id=None,
            source_run_id=None,
            source_map_index=None,
            source_aliases=[],
            timestamp=datetime.now(UTC),
        )

        assert sources_from_asset_events(TriggeringAssetEventsAccessor.build([event])) == [f"s3://{SOURCE}/sdk.mp4"]

    def test_no_events_name_nothing(self):
        assert sources_from_asset_events({}) == [] and sources_from_asset_events(None) == []


class TestStillPresent:
    def test_uploads_deleted_since_and_unknown_buckets_are_left_out(self, s3, caplog):  # noqa: F811 - s3 is the fixture's client
        put(s3, "kept.mp4")
        put(s3, "deleted.mp4")
        s3.delete_object(Bucket=SOURCE, Key="deleted.mp4")
        uris = [f"s3://{SOURCE}/kept.mp4", f"s3://{SOURCE}/deleted.mp4", "s3://no-such-bucket-here/x.mp4"]
        with caplog.at_level(logging.WARNING, logger=events.__name__):
            assert still_present(uris, s3) == [f"s3://{SOURCE}/kept.mp4"]

        assert "bucket 'no-such-bucket-here' does not exist" in caplog.text
        assert "no longer in S3" in caplog.text and "deleted.mp4" in caplog.text

    @pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
    def test_hostile_keys_are_found(self, s3, key):  # noqa: F811 - s3 is the fixture's client
        put(s3, key)

        assert still_present([f"s3://{SOURCE}/{key}"], s3) == [f"s3://{SOURCE}/{key}"]


class TestEmptyEventBatch:
    PARAMS = {"model": "A", "source_bucket": SOURCE, "output_bucket": OUTPUT, "instance_ids": [INSTANCE_ID]}

    def test_an_event_batch_with_no_upload_is_an_empty_plan(self, s3):  # noqa: F811 - s3 is the fixture's client
        request = BatchRequest.from_params({**self.PARAMS, "sources": [], "allow_empty": True})

        planned = plan_batch(request, s3, run_token=TOKEN)

        assert planned.file_count == 0 and planned.lanes() == [] and planned.skipped == ()

    @pytest.mark.parametrize("allow_empty", [None, False, "true", 1])
    def test_otherwise_no_sources_is_still_an_error(self, allow_empty):
        params = {**self.PARAMS, "sources": [], **({"allow_empty": allow_empty} if allow_empty is not None else {})}

        with pytest.raises(PlanError, match="no sources"):
            BatchRequest.from_params(params)


class FakeAccessor:
    """Stands in for the task SDK's InletEventsAccessor (a query to the Execution API)."""

    calls: list = []
    result: list = []

    def __init__(self, asset_name=None, asset_uri=None, alias_name=None):
        self.query = {"name": asset_name, "uri": asset_uri}

    def after(self, when):
        self.query["after"] = when
        return self

    def before(self, when):
        self.query["before"] = when
        FakeAccessor.calls.append(self.query)
        return FakeAccessor.result


class TestLateAssetEvents:
    RUN_AFTER = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)

    def context(self, run_type: str = "asset_triggered") -> dict:
        from airflow.sdk import Asset

        dag_run = SimpleNamespace(
            run_type=run_type, run_after=self.RUN_AFTER, start_date=self.RUN_AFTER + timedelta(minutes=7)
        )
        return {"dag_run": dag_run, "triggering_asset_events": {Asset(name="vod_sr_uploads"): [asset_event()]}}

    @pytest.fixture
    def accessor(self, monkeypatch):
        from airflow.sdk.execution_time import context

        FakeAccessor.calls, FakeAccessor.result = [], [asset_event(message(uploads("late.mp4")), event_id=9)]
        monkeypatch.setattr(context, "InletEventsAccessor", FakeAccessor)
        return FakeAccessor

    def test_events_queued_after_the_runs_first_and_before_it_started_are_fetched(self, accessor):
        found = late_asset_events(self.context())

        assert accessor.calls == [
            {
                "name": "vod_sr_uploads",
                "uri": "vod_sr_uploads",
                "after": self.RUN_AFTER,
                "before": self.RUN_AFTER + timedelta(minutes=7),
            }
        ]
        assert sources_from_asset_events(found) == [f"s3://{SOURCE}/late.mp4"]

    def test_a_manual_run_has_none(self, accessor):
        assert late_asset_events(self.context("manual")) == [] and accessor.calls == []

    def test_a_refused_query_is_logged_and_the_run_goes_on(self, monkeypatch, caplog):
        from airflow.sdk.execution_time import context

        class Refusing(FakeAccessor):
            def before(self, when):
                raise RuntimeError("API_SERVER_ERROR")

        monkeypatch.setattr(context, "InletEventsAccessor", Refusing)
        with caplog.at_level(logging.WARNING, logger=events.__name__):
            assert late_asset_events(self.context()) == []
        assert "Could not list the vod_sr_uploads events queued after this run's first one" in caplog.text


class TestSettings:
    def test_off_by_default(self, monkeypatch):
        monkeypatch.delenv("VOD_SR_EVENTS_QUEUE_URL", raising=False)
        monkeypatch.delenv("VOD_SR_EVENTS_POLL_PAUSE_SECONDS", raising=False)

        settings = Settings.from_env()

        assert settings.events_queue_url == "" and settings.events_poll_pause == 5

    def test_read_from_the_environment(self, monkeypatch):
        monkeypatch.setenv("VOD_SR_EVENTS_QUEUE_URL", f"  {QUEUE_URL} ")
        monkeypatch.setenv("VOD_SR_EVENTS_POLL_PAUSE_SECONDS", "0")

        settings = Settings.from_env()

        assert settings.events_queue_url == QUEUE_URL and settings.events_poll_pause == 0

    @pytest.mark.parametrize("value", ["-1", "soon"])
    def test_a_bad_pause_names_the_setting(self, monkeypatch, value):
        monkeypatch.setenv("VOD_SR_EVENTS_POLL_PAUSE_SECONDS", value)

        with pytest.raises(ValueError, match="VOD_SR_EVENTS_POLL_PAUSE_SECONDS"):
            Settings.from_env()

    def test_the_asset_watches_the_queue_with_the_sqs_trigger(self):
        asset = upload_asset(Settings(events_queue_url=QUEUE_URL, aws_conn_id="aws_uploads", events_poll_pause=3))

        (watcher,) = asset.watchers
        classpath, kwargs = watcher.trigger.serialize()
        assert asset.name == "vod_sr_uploads"
        assert classpath == "airflow.providers.amazon.aws.triggers.sqs.SqsSensorTrigger"
        assert kwargs | {"sqs_queue": QUEUE_URL, "aws_conn_id": "aws_uploads"} == kwargs
        assert (kwargs["max_messages"], kwargs["wait_time_seconds"], kwargs["waiter_delay"]) == (10, 20, 3)
        assert kwargs["delete_message_on_reception"] is True

    def test_no_queue_no_asset(self):
        with pytest.raises(ValueError, match="VOD_SR_EVENTS_QUEUE_URL is not set"):
            upload_asset(Settings())


def parse_events_dag(**env: str) -> dict:
    """The DAG folder parsed in a fresh interpreter with `env` (settings are read at parse time)."""
    code = (
        "import json; from airflow.dag_processing.dagbag import DagBag; bag = DagBag(dag_folder='dags');"
        "d = bag.dags.get('vod_sr_events');"
        "asset = d and d.timetable.asset_condition;"
        "print(json.dumps({'dags': sorted(bag.dags), 'errors': {k: str(v) for k, v in bag.import_errors.items()},"
        "'events': d and {'timetable': type(d.timetable).__name__, 'asset': asset.name,"
        "'trigger': asset.watchers[0].trigger.serialize(), 'max_active_runs': d.max_active_runs,"
        "'tasks': sorted(t.task_id for t in d.tasks), 'sources': d.params['sources']}}, default=str))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VOD_SR_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env={**clean, **env}, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


DEPLOYMENT = {"VOD_SR_INSTANCE_IDS": INSTANCE_ID, "VOD_SR_SOURCE_BUCKET": SOURCE, "VOD_SR_OUTPUT_BUCKET": OUTPUT}


class TestEventsDag:
    def test_exists_only_when_a_queue_is_configured(self):
        parsed = parse_events_dag(**DEPLOYMENT)

        assert parsed["errors"] == {} and "vod_sr_events" not in parsed["dags"] and "vod_sr_batch" in parsed["dags"]

    def test_is_the_batch_pipeline_started_by_the_upload_asset_one_run_at_a_time(self):
        parsed = parse_events_dag(**DEPLOYMENT, VOD_SR_EVENTS_QUEUE_URL=QUEUE_URL, VOD_SR_MAX_ACTIVE_RUNS="3")

        assert parsed["errors"] == {}
        dag = parsed["events"]
        assert dag["timetable"] == "AssetTriggeredTimetable" and dag["asset"] == "vod_sr_uploads"
        classpath, kwargs = dag["trigger"]
        assert classpath.endswith("SqsSensorTrigger") and kwargs["sqs_queue"] == QUEUE_URL
        assert kwargs["aws_conn_id"] == "aws_default"
        assert dag["max_active_runs"] == 1  # what batches the uploads, whatever VOD_SR_MAX_ACTIVE_RUNS says
        assert {"plan", "report", "lane.acquire", "lane.run_chunks", "lane.release"} <= set(dag["tasks"])
        assert dag["sources"] == []

    def test_a_fleet_deployment_runs_its_events_on_its_fleet(self):
        fleet = {"VOD_SR_LAUNCH_TEMPLATE": "lt-0123", "VOD_SR_FLEET_SIZE": "3", "VOD_SR_INSTANCE_IDS": ""}
        parsed = parse_events_dag(**{**DEPLOYMENT, **fleet}, VOD_SR_EVENTS_QUEUE_URL=QUEUE_URL)

        assert parsed["errors"] == {}
        assert "vod_sr_events" in parsed["dags"]

    def test_a_queue_without_the_deployment_settings_is_an_import_error_naming_them(self):
        parsed = parse_events_dag(VOD_SR_EVENTS_QUEUE_URL=QUEUE_URL, VOD_SR_INSTANCE_IDS=INSTANCE_ID)

        assert "vod_sr_events" not in parsed["dags"]
        (error,) = parsed["errors"].values()
        assert (
            "vod_sr_events reads VOD_SR_EVENTS_QUEUE_URL but needs VOD_SR_SOURCE_BUCKET, VOD_SR_OUTPUT_BUCKET set too"
            in error
        )
