"""Scheduled selection: which objects a nightly run (or one run of a backfill over dates) takes.

A run with data interval [start, end) takes the objects under the watch prefixes whose S3 LastModified falls in
[start - settle, end - settle). Adjacent intervals give adjacent windows, so every object falls in exactly one run's
window: none is taken twice, none is missed on an edge (an object modified exactly at a window's end belongs to the
next one). The settle time exists because a multipart upload's LastModified is when it *began*: a window is listed
`settle` after it ends, so an upload that began inside it has had that long to complete and be listed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from include.vod_sr.plan import PlanError
from include.vod_sr.settings import Settings


def selection_window(
    interval_start: datetime | None, interval_end: datetime | None, settle_seconds: int
) -> tuple[datetime, datetime]:
    """The LastModified window [start, end) of a run whose data interval is [interval_start, interval_end)."""
    if interval_start is None or interval_end is None or not interval_start < interval_end:
        raise PlanError(
            f"this DAG takes what arrived during its data interval, and this run has none ({interval_start} to "
            f"{interval_end}): let the schedule or a backfill start it, or use vod_sr_batch for ad-hoc runs"
        )
    shift = timedelta(seconds=settle_seconds)
    return interval_start - shift, interval_end - shift


def check_nightly_settings(settings: Settings, reason: str = "vod_sr_nightly watches VOD_SR_NIGHTLY_PREFIXES") -> None:
    """Scheduled runs take the form's defaults: refuse to define the DAG (an import error in the UI naming the
    settings) rather than let Airflow reject it for "required params without default values". `reason` names the
    DAG and the setting that turned it on (vod_sr_events passes its own). The GPUs are named instances or a fleet
    (launch template and size): settings refuse both at once."""
    has_fleet = bool(settings.fleet_size and settings.launch_template)
    missing = [
        name
        for name, value in (
            (
                "VOD_SR_INSTANCE_IDS (or a fleet: VOD_SR_LAUNCH_TEMPLATE and VOD_SR_FLEET_SIZE)",
                settings.instance_ids or has_fleet,
            ),
            ("VOD_SR_SOURCE_BUCKET", settings.source_bucket),
            ("VOD_SR_OUTPUT_BUCKET", settings.output_bucket),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"{reason} but needs {', '.join(missing)} set too")


def nightly_timetable(settings: Settings) -> Any:
    """The schedule as data intervals between cron ticks (a plain cron string would give Airflow 3's
    CronTriggerTimetable, whose runs have an empty interval)."""
    from airflow.sdk import CronDataIntervalTimetable

    return CronDataIntervalTimetable(settings.nightly_schedule, timezone=settings.nightly_timezone)


def nightly_start_date(settings: Settings) -> datetime:
    """The first interval a backfill may cover (midnight of VOD_SR_NIGHTLY_START_DATE in the schedule's zone)."""
    import pendulum

    try:
        return pendulum.parse(settings.nightly_start_date, tz=settings.nightly_timezone)
    except (ValueError, pendulum.parsing.exceptions.ParserError) as error:
        raise ValueError(f"VOD_SR_NIGHTLY_START_DATE={settings.nightly_start_date!r} is not a date: {error}") from None
