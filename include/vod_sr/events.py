"""Event-driven selection (vod_sr_events): S3 event notifications -> an SQS queue -> an Airflow Asset -> a run.

The Asset "vod_sr_uploads" has an `AssetWatcher` whose trigger (the common-messaging provider's
`MessageQueueTrigger`, scheme "sqs", which is the Amazon provider's `SqsSensorTrigger`) long-polls the queue in the
triggerer. Each receive that returns messages deletes them from the queue and becomes one asset event whose `extra`
is, in Airflow 3.3 (`Trigger.submit_event`):

    {"from_trigger": true, "payload": {"status": "success", "message_batch": [<SQS message>, ...]}}

where each SQS message is ReceiveMessage's dict (`MessageId`, `ReceiptHandle`, `MD5OfBody`, `Body`), and `Body` is
the S3 notification as JSON text: `{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": ...},
"object": {"key": <URL-encoded key>, "size": ...}}}, ...]}`, or S3's `{"Event": "s3:TestEvent", ...}` sent when the
notification is configured. A body that is an SNS notification (S3 -> SNS -> SQS without raw delivery) is unwrapped.
The trigger deletes the messages as it receives them (before Airflow stores the asset event): a triggerer killed in
between loses that batch's messages; the uploads are still in S3 for a vod_sr_batch or nightly run.

`vod_sr_events` runs one at a time: events that arrive while a run works wait in Airflow's asset queue and the next
run takes them together. Airflow 3.3 gives that run only the events up to the *first* one queued (its `run_after`);
the later ones are left to whichever run a future upload starts (apache/airflow#56050). `late_asset_events` fetches
them, so the run takes every upload that arrived before it started.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

from include.vod_sr.settings import Settings
from include.vod_sr.sources import DEFAULT_SOURCE_EXTENSIONS, SourceError, parse_source

log = logging.getLogger(__name__)

UPLOAD_ASSET_NAME = "vod_sr_uploads"
UPLOAD_WATCHER_NAME = "vod_sr_upload_queue"
LONG_POLL_SECONDS = 20  # SQS's longest wait: a message arriving during it is received at once
MAX_MESSAGES = 10  # SQS's most per receive; more waiting messages come with the next receives (asset events)


def upload_asset(settings: Settings) -> Any:
    """The Asset whose events start vod_sr_events: a watcher on the SQS queue S3 notifies of uploads."""
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
    from airflow.sdk import Asset, AssetWatcher

    if not settings.events_queue_url:
        raise ValueError("VOD_SR_EVENTS_QUEUE_URL is not set: there is no queue to watch")
    trigger = MessageQueueTrigger(
        scheme="sqs",
        sqs_queue=settings.events_queue_url,
        aws_conn_id=settings.aws_conn_id,
        max_messages=MAX_MESSAGES,
        wait_time_seconds=LONG_POLL_SECONDS,
        waiter_delay=settings.events_poll_pause,
    )
    return Asset(name=UPLOAD_ASSET_NAME, watchers=[AssetWatcher(name=UPLOAD_WATCHER_NAME, trigger=trigger)])


def _flatten(events: Any) -> list[Any]:
    """The asset events, from the `triggering_asset_events` mapping (asset -> events) or any iterable of them."""
    if isinstance(events, Mapping):
        return [event for group in events.values() for event in group]
    return list(events or [])


def _extra(event: Any) -> Any:
    return event.get("extra") if isinstance(event, Mapping) else getattr(event, "extra", None)


def _event_name(event: Any) -> str:
    """How the log names an asset event: its id or timestamp where it has one."""
    for attribute in ("id", "timestamp"):
        value = event.get(attribute) if isinstance(event, Mapping) else getattr(event, attribute, None)
        if value is not None:
            return f"asset event {value}"
    return "an asset event"


def _normalised_extensions(extensions: Iterable[Any] | None) -> tuple[str, ...]:
    wanted = tuple(e.lower() for e in (extensions or ()) if isinstance(e, str))
    return wanted or DEFAULT_SOURCE_EXTENSIONS


class _Malformed(ValueError):
    """One message or record cannot be read; it is logged and skipped."""


def _records(body: Any) -> list[Any] | None:
    """The S3 event records of a message body; None for S3's test event. Raises _Malformed."""
    if not isinstance(body, str):
        raise _Malformed(f"its Body is {type(body).__name__}, not text")
    try:
        data = json.loads(body)
    except ValueError as error:
        raise _Malformed(f"its Body is not JSON ({error}): {body[:200]!r}") from None
    if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return _records(data["Message"])  # S3 -> SNS -> SQS without raw message delivery
    if isinstance(data, dict) and data.get("Event") == "s3:TestEvent":
        return None
    if not isinstance(data, dict) or not isinstance(data.get("Records"), list):
        raise _Malformed(f"its Body is not an S3 event notification (no Records list): {body[:200]!r}")
    return data["Records"]


def _upload(record: Any, extensions: tuple[str, ...]) -> str | None:
    """The `s3://bucket/key` URI a record announces, or None when the record is not a new video. Raises _Malformed."""
    if not isinstance(record, dict):
        raise _Malformed(f"a record is not an object: {record!r}")
    event_name = record.get("eventName")
    if not isinstance(event_name, str):
        raise _Malformed(f"a record has no eventName: {json.dumps(record)[:300]}")
    try:
        bucket = record["s3"]["bucket"]["name"]
        raw_key = record["s3"]["object"]["key"]
    except (KeyError, TypeError):
        raise _Malformed(f"a record has no s3.bucket.name or s3.object.key: {json.dumps(record)[:300]}") from None
    if not isinstance(bucket, str) or not isinstance(raw_key, str):
        raise _Malformed(f"a record's bucket or key is not text: {json.dumps(record)[:300]}")
    try:
        # S3 URL-encodes event keys, spaces as '+' (a '+' in the key is %2B); the bytes are UTF-8.
        key = unquote_plus(raw_key, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as error:
        raise _Malformed(f"key {raw_key!r} does not decode to UTF-8: {error}") from None
    if not event_name.startswith("ObjectCreated:"):
        log.info("Ignored %s of s3://%s/%s: only ObjectCreated events are processed", event_name, bucket, key)
        return None
    if not key.lower().endswith(extensions):  # folder markers ("folder/") too
        log.info("Ignored s3://%s/%s: not a video (extensions %s)", bucket, key, ", ".join(extensions))
        return None
    try:
        source = parse_source(f"s3://{bucket}/{key}", "")
    except SourceError as error:
        raise _Malformed(f"its object is not a usable source: {error}") from None
    if record["s3"]["object"].get("size") == 0:
        log.warning("Ignored %s: the upload is empty (0 bytes)", source.uri)
        return None
    return source.uri


def sources_from_asset_events(events: Any, extensions: Iterable[Any] | None = None) -> list[str]:
    """The uploads (`s3://bucket/key`, keys decoded) announced by the S3 notifications behind `events`, in order,
    each once.

    `events` is the run's `triggering_asset_events` (asset -> events) or a list of asset events (objects with an
    `extra`, or dicts). Only `ObjectCreated:*` records of objects ending in one of `extensions` (the run's extensions,
    default the video containers) are taken; S3's test events, other event types, folder markers and empty objects
    are skipped with a log line. A message that cannot be read is logged, naming it, and skipped: one bad message
    never fails the batch.
    """
    wanted = _normalised_extensions(extensions)
    found: dict[str, None] = {}
    seen_messages: set[str] = set()
    for event in _flatten(events):
        extra = _extra(event)
        payload = extra.get("payload") if isinstance(extra, Mapping) else None
        batch = payload.get("message_batch") if isinstance(payload, Mapping) else None
        if not isinstance(batch, list):
            log.warning(
                "Skipped %s: its extra holds no SQS message batch (extra.payload.message_batch); not from the "
                "queue watcher? extra=%s",
                _event_name(event),
                json.dumps(extra, default=str)[:300],
            )
            continue
        for message in batch:
            message_id = message.get("MessageId", "?") if isinstance(message, Mapping) else "?"
            if message_id != "?" and message_id in seen_messages:
                continue  # the same event reached through an alias, or fetched twice
            seen_messages.add(message_id)
            try:
                if not isinstance(message, Mapping):
                    raise _Malformed(f"it is not an SQS message: {message!r}"[:300])
                records = _records(message.get("Body"))
                if records is None:
                    log.info("Ignored SQS message %s: S3's test event (sent when notifications are set up)", message_id)
                    continue
                for record in records:
                    try:
                        uri = _upload(record, wanted)
                    except _Malformed as error:
                        log.warning(
                            "Skipped a record of SQS message %s in %s: %s", message_id, _event_name(event), error
                        )
                        continue
                    if uri is not None:
                        found.setdefault(uri, None)
            except _Malformed as error:
                log.warning("Skipped SQS message %s in %s: %s", message_id, _event_name(event), error)
    return list(found)


def late_asset_events(context: Mapping[str, Any]) -> list[Any]:
    """Upload events this asset-triggered run should take but Airflow 3.3 did not give it: those that arrived after
    the first event it was queued for (its `run_after`) and before it started.

    While a run works, later events wait in Airflow's asset queue; the next run is created with `run_after` = when
    the first of them was queued and gets only the events up to then (apache/airflow#56050): the others would wait
    for whatever run a future upload starts. This run takes them. A later run given them too finds their outputs and
    skips them. Not an asset-triggered run (a manual one): none. If Airflow refuses the query, the run goes on with
    its triggering events and says so.
    """
    from airflow.sdk import Asset

    dag_run = context.get("dag_run")
    if dag_run is None or getattr(dag_run, "run_type", None) != "asset_triggered":
        return []
    since = dag_run.run_after
    until = getattr(dag_run, "start_date", None) or datetime.now(UTC)
    assets = [asset for asset in context.get("triggering_asset_events") or {} if isinstance(asset, Asset)]
    found: list[Any] = []
    for asset in assets:
        try:
            from airflow.sdk.execution_time.context import InletEventsAccessor

            found += list(InletEventsAccessor(asset_name=asset.name, asset_uri=asset.uri).after(since).before(until))
        except Exception as error:  # an internal API of the task SDK: never fail the run over it
            log.warning(
                "Could not list the %s events queued after this run's first one (%s: %s); uploads announced after "
                "%s will be taken by the next run an upload starts",
                asset.name,
                type(error).__name__,
                error,
                since,
            )
    return found


def still_present(uris: Iterable[str], s3_client: Any) -> list[str]:
    """`uris` less the objects no longer in S3 (deleted or renamed since their upload), each logged: one listing per
    folder. A bucket that does not exist (a forged or stale message) is logged and skipped, not fatal."""
    from include.vod_sr.plan import PlanError, existing_objects

    objects = [parse_source(uri, "") for uri in uris]
    present: set[Any] = set()
    for bucket in dict.fromkeys(obj.bucket for obj in objects):
        try:
            present |= set(existing_objects(s3_client, [obj for obj in objects if obj.bucket == bucket]))
        except PlanError as error:
            log.warning("Skipped the uploads announced in s3://%s/: %s", bucket, error)
    gone = [obj.uri for obj in objects if obj not in present]
    if gone:
        log.warning("Skipped %d upload(s) no longer in S3 (deleted or renamed since): %s", len(gone), gone[:20])
    return [obj.uri for obj in objects if obj in present]
