"""Scheduled selection: each run takes what arrived under the watch prefixes during its data interval, by S3
LastModified; adjacent runs never take a file twice and never miss one on an edge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from include.local_aws.server import set_last_modified
from include.vod_sr.nightly import selection_window
from include.vod_sr.plan import BatchRequest, PlanError, plan_batch
from include.vod_sr.settings import Settings
from tests.conftest import REPO_ROOT
from tests.vod_sr.test_plan import INSTANCE_ID, OUTPUT, SOURCE, TOKEN, put, s3  # noqa: F401 - s3 is a fixture

MIDNIGHT = datetime(2026, 11, 27, tzinfo=UTC)
DAY = timedelta(days=1)


def nightly_request(window: tuple[datetime, datetime] | None, prefixes: tuple[str, ...] = ("incoming/",)):
    params = {"model": "A", "source_bucket": SOURCE, "output_bucket": OUTPUT, "instance_ids": [INSTANCE_ID]}
    return BatchRequest.from_params({**params, "prefixes": list(prefixes)}, modified_window=window)


def upload_at(s3, key: str, when: datetime) -> None:  # noqa: F811 - s3 is the fixture's client
    put(s3, key)
    set_last_modified(SOURCE, key, when.isoformat())


def taken(s3, window: tuple[datetime, datetime]) -> list[str]:  # noqa: F811
    planned = plan_batch(nightly_request(window), s3, run_token=TOKEN)
    return sorted(job.source.key for chunk in planned.chunks for job in chunk.files)


class TestSelectionWindow:
    def test_is_the_data_interval_shifted_back_by_the_settle_time(self):
        assert selection_window(MIDNIGHT, MIDNIGHT + DAY, 3600) == (
            MIDNIGHT - timedelta(hours=1),
            MIDNIGHT + DAY - timedelta(hours=1),
        )

    def test_adjacent_intervals_give_adjacent_windows(self):
        first = selection_window(MIDNIGHT, MIDNIGHT + DAY, 1800)
        second = selection_window(MIDNIGHT + DAY, MIDNIGHT + 2 * DAY, 1800)

        assert first[1] == second[0]

    @pytest.mark.parametrize(
        ("start", "end"), [(None, MIDNIGHT), (MIDNIGHT, None), (MIDNIGHT, MIDNIGHT), (MIDNIGHT + DAY, MIDNIGHT)]
    )
    def test_a_run_without_an_interval_is_refused_before_anything_starts(self, start, end):
        with pytest.raises(PlanError, match="takes what arrived during its data interval, and this run has none"):
            selection_window(start, end, 0)


class TestIntervalSelection:
    def test_objects_on_the_edges_go_to_exactly_one_of_two_adjacent_runs(self, s3):  # noqa: F811
        first, second = (MIDNIGHT - DAY, MIDNIGHT), (MIDNIGHT, MIDNIGHT + DAY)
        uploads = {
            "incoming/before-first.mp4": first[0] - timedelta(seconds=1),
            "incoming/first-start.mp4": first[0],  # a window's start is in it ...
            "incoming/first-last-second.mp4": first[1] - timedelta(seconds=1),
            "incoming/on-the-edge.mp4": MIDNIGHT,  # ... its end is the next window's start
            "incoming/second-last-second.mp4": second[1] - timedelta(seconds=1),
            "incoming/after-second.mp4": second[1],
        }
        for key, when in uploads.items():
            upload_at(s3, key, when)

        in_first, in_second = taken(s3, first), taken(s3, second)

        assert in_first == ["incoming/first-last-second.mp4", "incoming/first-start.mp4"]
        assert in_second == ["incoming/on-the-edge.mp4", "incoming/second-last-second.mp4"]
        assert not set(in_first) & set(in_second)  # never twice
        between = {k for k, when in uploads.items() if first[0] <= when < second[1]}
        assert set(in_first) | set(in_second) == between  # never missed

    def test_an_upload_that_began_before_the_window_ended_is_taken_by_that_window_once_listed(self, s3):  # noqa: F811
        # A multipart upload carries the time it began. Listed at the end of the interval it was not there yet; the
        # settle time moves the listing after it completed, and the object still belongs to the window it began in.
        window = selection_window(MIDNIGHT - DAY, MIDNIGHT, settle_seconds=3600)
        upload_at(s3, "incoming/slow-multipart.mp4", MIDNIGHT - timedelta(minutes=70))

        assert taken(s3, window) == ["incoming/slow-multipart.mp4"]
        assert taken(s3, selection_window(MIDNIGHT, MIDNIGHT + DAY, settle_seconds=3600)) == []

    def test_an_interval_in_which_nothing_arrived_is_an_empty_plan_not_an_error(self, s3):  # noqa: F811
        upload_at(s3, "incoming/old.mp4", MIDNIGHT - 10 * DAY)

        planned = plan_batch(nightly_request((MIDNIGHT, MIDNIGHT + DAY)), s3, run_token=TOKEN)

        assert planned.chunks == () and planned.lanes() == []
        assert planned.summary()["modified_window"] == [MIDNIGHT.isoformat(), (MIDNIGHT + DAY).isoformat()]

    def test_only_videos_under_the_watch_prefixes_are_taken(self, s3):  # noqa: F811
        for key in ("incoming/a.mp4", "incoming/notes.txt", "elsewhere/b.mp4", "incoming/deep/c.MOV"):
            upload_at(s3, key, MIDNIGHT + timedelta(hours=3))

        assert taken(s3, (MIDNIGHT, MIDNIGHT + DAY)) == ["incoming/a.mp4", "incoming/deep/c.MOV"]

    def test_a_file_whose_output_exists_is_not_done_again(self, s3):  # noqa: F811
        upload_at(s3, "incoming/a.mp4", MIDNIGHT + timedelta(hours=3))
        put(s3, "incoming/a_sr_A.mp4", bucket=OUTPUT)

        planned = plan_batch(nightly_request((MIDNIGHT, MIDNIGHT + DAY)), s3, run_token=TOKEN)

        assert planned.chunks == () and [job.source.key for job in planned.skipped] == ["incoming/a.mp4"]

    def test_a_scheduled_run_needs_watch_prefixes(self):
        with pytest.raises(PlanError, match="no watch prefixes.*VOD_SR_NIGHTLY_PREFIXES"):
            nightly_request((MIDNIGHT, MIDNIGHT + DAY), prefixes=())

    def test_a_run_triggered_by_hand_still_fails_on_an_empty_prefix(self, s3):  # noqa: F811
        with pytest.raises(PlanError, match="holds no files"):
            plan_batch(nightly_request(None), s3, run_token=TOKEN)


class TestNightlySettings:
    def test_prefixes_are_comma_separated_or_a_json_list(self, monkeypatch):
        monkeypatch.setenv("VOD_SR_NIGHTLY_PREFIXES", "incoming/, s3://other/uploads/ ,")
        assert Settings.from_env().nightly_prefixes == ("incoming/", "s3://other/uploads/")
        monkeypatch.setenv("VOD_SR_NIGHTLY_PREFIXES", json.dumps(["a,b/", "c/"]))
        assert Settings.from_env().nightly_prefixes == ("a,b/", "c/")

    @pytest.mark.parametrize(
        ("name", "value", "message"),
        [
            ("VOD_SR_NIGHTLY_PREFIXES", "[1]", "must be a JSON list of strings"),
            ("VOD_SR_NIGHTLY_PREFIXES", "[oops", "is not a JSON list"),
            ("VOD_SR_NIGHTLY_SETTLE_SECONDS", "-1", "must be at least 0"),
        ],
    )
    def test_bad_values_are_named(self, monkeypatch, name, value, message):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=message):
            Settings.from_env()

    def test_settle_time_may_be_zero(self, monkeypatch):
        monkeypatch.setenv("VOD_SR_NIGHTLY_SETTLE_SECONDS", "0")
        assert Settings.from_env().nightly_settle == 0


def parse_dags(**env: str) -> dict[str, object]:
    """The DAG folder parsed in a fresh interpreter with `env` (settings are read at parse time)."""
    code = (
        "import json; from airflow.dag_processing.dagbag import DagBag; bag = DagBag(dag_folder='dags');"
        "n = bag.dags.get('vod_sr_nightly');"
        "print(json.dumps({'dags': sorted(bag.dags), 'errors': {k: str(v) for k, v in bag.import_errors.items()},"
        "'nightly': n and {'timetable': type(n.timetable).__name__, 'summary': n.timetable.expression,"
        "'tasks': sorted(t.task_id for t in n.tasks), 'max_active_runs': n.max_active_runs,"
        "'prefixes': n.params['prefixes'], 'catchup': n.catchup, 'start': n.start_date.isoformat(),"
        "'fleet': {k: n.params[k] for k in ('fleet_size', 'launch_template', 'instance_ids')}}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


DEPLOYMENT = {"VOD_SR_INSTANCE_IDS": INSTANCE_ID, "VOD_SR_SOURCE_BUCKET": SOURCE, "VOD_SR_OUTPUT_BUCKET": OUTPUT}


class TestNightlyDag:
    def test_exists_only_when_it_has_prefixes_to_watch(self):
        parsed = parse_dags(VOD_SR_NIGHTLY_PREFIXES="")

        assert parsed["errors"] == {} and "vod_sr_nightly" not in parsed["dags"]

    def test_is_the_batch_pipeline_on_data_intervals_of_the_configured_schedule(self):
        parsed = parse_dags(
            **DEPLOYMENT,
            VOD_SR_NIGHTLY_PREFIXES="incoming/,s3://partner/drop/",
            VOD_SR_NIGHTLY_SCHEDULE="30 2 * * *",
            VOD_SR_NIGHTLY_START_DATE="2026-06-01",
        )

        assert parsed["errors"] == {}
        nightly = parsed["nightly"]
        # A plain cron string would be CronTriggerTimetable in Airflow 3: runs with an empty data interval.
        assert nightly["timetable"] == "CronDataIntervalTimetable" and nightly["summary"] == "30 2 * * *"
        assert nightly["tasks"] == [
            "lane.acquire",
            "lane.release",
            "lane.run_chunks",
            "lane.verify",
            "lane.wait_for_agent",
            "plan",
            "report",
        ]
        assert nightly["max_active_runs"] == 1  # backfill runs queue on the shared instances
        assert nightly["prefixes"] == ["incoming/", "s3://partner/drop/"]
        assert nightly["catchup"] is False and nightly["start"].startswith("2026-06-01T00:00:00")

    def test_without_instances_or_buckets_the_import_error_names_the_settings(self):
        parsed = parse_dags(VOD_SR_NIGHTLY_PREFIXES="incoming/", VOD_SR_INSTANCE_IDS="", VOD_SR_OUTPUT_BUCKET="")

        (error,) = parsed["errors"].values()
        assert (
            "needs VOD_SR_INSTANCE_IDS (or a fleet: VOD_SR_LAUNCH_TEMPLATE and VOD_SR_FLEET_SIZE), "
            "VOD_SR_SOURCE_BUCKET, VOD_SR_OUTPUT_BUCKET set too" in error
        )
        assert "vod_sr_batch" in parsed["dags"]  # the batch DAG is unaffected

    def test_a_fleet_deployment_runs_nightly_on_its_fleet(self):
        # Issue 21: with a fleet (and so no VOD_SR_INSTANCE_IDS, which settings refuse beside one) the DAG folder
        # showed "vod_sr_nightly watches VOD_SR_NIGHTLY_PREFIXES but needs VOD_SR_INSTANCE_IDS set too".
        fleet = {"VOD_SR_LAUNCH_TEMPLATE": "lt-0123", "VOD_SR_FLEET_SIZE": "3", "VOD_SR_INSTANCE_IDS": ""}
        parsed = parse_dags(**{**DEPLOYMENT, **fleet}, VOD_SR_NIGHTLY_PREFIXES="incoming/")

        assert parsed["errors"] == {}
        assert parsed["nightly"]["fleet"] == {"fleet_size": 3, "launch_template": "lt-0123", "instance_ids": []}
