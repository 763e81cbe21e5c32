"""The emulator delivers S3 upload notifications to SQS, and the queue watcher's real trigger (common-messaging's
MessageQueueTrigger, scheme "sqs", with the pinned Amazon provider and aiobotocore) turns them into the payload that
`sources_from_asset_events` reads: the whole path from an upload to a run's sources, short of the scheduler."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from include.local_aws.upload_events import create_upload_queue
from include.local_aws.world import boto_client
from include.vod_sr.events import sources_from_asset_events, upload_asset
from include.vod_sr.settings import Settings
from tests.vod_sr.test_sources import HOSTILE_KEYS


@pytest.fixture
def bucket(emulator_env):
    name = f"vod-sr-events-{uuid.uuid4().hex[:8]}"
    boto_client("s3", emulator_env.endpoint_url).create_bucket(Bucket=name)
    return name


def watcher_trigger(queue_url: str):
    """The trigger of vod_sr_events' Asset watcher, as the DAG builds it (short waits for the test)."""
    (watcher,) = upload_asset(Settings(events_queue_url=queue_url, events_poll_pause=1)).watchers
    trigger = watcher.trigger
    trigger.wait_time_seconds = 1
    return trigger


def fire(trigger, timeout: float = 30) -> dict:
    """Run the trigger until it fires once (as the triggerer does); the asset event's extra it would make."""

    async def first() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    payload = asyncio.run(asyncio.wait_for(first(), timeout))
    return {"from_trigger": True, "payload": payload}  # Trigger.submit_event's extra in Airflow 3.3


def received_messages(extras: list[dict]) -> int:
    return sum(len(extra["payload"]["message_batch"]) for extra in extras)


def test_uploads_reach_the_queue_and_the_watcher_names_them(emulator_env, bucket):
    s3 = boto_client("s3", emulator_env.endpoint_url)
    queue_url = create_upload_queue(emulator_env.endpoint_url, bucket, queue_name=bucket, prefix="incoming/")
    trigger = watcher_trigger(queue_url)

    test_event = fire(trigger)  # S3 (and moto) send a test event when the notification is configured
    assert sources_from_asset_events([{"extra": test_event}]) == []
    assert test_event["payload"]["message_batch"][0]["Body"].count("s3:TestEvent") == 1

    # moto's server cannot take a key with a newline in a URL path; the unit tests decode one
    odd = [key for key in HOSTILE_KEYS if "\n" not in key] + ["plus+sign%41.mp4", "q?x=1&y=%41+#frag.mp4", "🎬 ü.mp4"]
    keys = [f"incoming/{key}" for key in odd]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"video")
    s3.put_object(Bucket=bucket, Key="incoming/readme.txt", Body=b"text")  # notified, not a video
    s3.put_object(Bucket=bucket, Key="elsewhere/skip.mp4", Body=b"video")  # outside the notification's prefix
    extras: list[dict] = []
    deadline = time.monotonic() + 60
    while received_messages(extras) < len(keys) + 1:
        assert time.monotonic() < deadline, f"only {received_messages(extras)} messages arrived"
        extras.append(fire(trigger))

    assert sorted(sources_from_asset_events([{"extra": extra} for extra in extras])) == sorted(
        f"s3://{bucket}/{key}" for key in keys
    )
    sqs = boto_client("sqs", emulator_env.endpoint_url)
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"  # the watcher deleted what it received
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_a_multipart_upload_is_announced(emulator_env, bucket):
    s3 = boto_client("s3", emulator_env.endpoint_url)
    queue_url = create_upload_queue(emulator_env.endpoint_url, bucket, queue_name=bucket)
    trigger = watcher_trigger(queue_url)
    fire(trigger)  # the test event

    upload = s3.create_multipart_upload(Bucket=bucket, Key="big file.mp4")
    part = s3.upload_part(Bucket=bucket, Key="big file.mp4", UploadId=upload["UploadId"], PartNumber=1, Body=b"v" * 64)
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="big file.mp4",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )

    assert sources_from_asset_events([{"extra": fire(trigger)}]) == [f"s3://{bucket}/big file.mp4"]
