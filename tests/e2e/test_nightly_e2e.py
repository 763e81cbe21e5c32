"""vod_sr_nightly end to end through dag.test(): emulator, real AWS CLI and ffmpeg, objects dated through the
emulator. An interval in which nothing arrived is a quick success that starts no instance and emits no outputs
event; an interval with uploads takes exactly them and emits one event listing the outputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from include.local_aws.world import OUTPUT_BUCKET, SOURCE_BUCKET
from include.vod_sr.assets import OUTPUTS_ASSET_NAME
from tests.conftest import REPO_ROOT
from tests.e2e.test_batch_e2e import stored_report

pytestmark = pytest.mark.e2e
DAY = datetime(2026, 11, 10, tzinfo=UTC)


@pytest.fixture
def nightly(world, monkeypatch):
    """Run vod_sr_nightly for the data interval starting at a given day; returns (dag run, its data interval)."""
    monkeypatch.setenv("VOD_SR_NIGHTLY_PREFIXES", "arrivals/")
    monkeypatch.setenv("VOD_SR_NIGHTLY_SETTLE_SECONDS", "0")
    monkeypatch.setenv("VOD_SR_NIGHTLY_START_DATE", "2026-10-01")
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags["vod_sr_nightly"]

    def run(day: datetime):
        # A run started by hand at a tick gets the interval that ended there (what the scheduler runs then).
        dag_run = dag.test(logical_date=day + timedelta(days=1))
        return dag_run, (dag_run.data_interval_start, dag_run.data_interval_end)

    return run


def outputs_events() -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
        return [event.extra for event in query.filter(AssetModel.name == OUTPUTS_ASSET_NAME).all()]


def test_an_interval_in_which_nothing_arrived_succeeds_without_starting_the_instance(world, nightly):
    world.upload("arrivals/old.mp4")
    world.emulator.set_last_modified(SOURCE_BUCKET, "arrivals/old.mp4", DAY - timedelta(days=3))
    events_before = len(outputs_events())

    dag_run, interval = nightly(DAY)

    assert interval == (DAY, DAY + timedelta(days=1))
    assert str(dag_run.state) == "success"
    assert "StartInstances" not in world.actions() and "SendCommand" not in world.actions()
    assert world.instance_state() == "stopped"
    assert len(outputs_events()) == events_before  # nothing produced: downstream DAGs are not woken


def test_an_interval_takes_exactly_what_arrived_in_it_and_hands_the_outputs_on(world, nightly):
    dated = {
        "arrivals/the day before.mp4": DAY - timedelta(seconds=1),
        "arrivals/at midnight.mp4": DAY,
        "arrivals/sub/late 'tonight' $(id).mp4": DAY + timedelta(days=1, seconds=-1),
        "arrivals/the next day.mp4": DAY + timedelta(days=1),
    }
    for key, when in dated.items():
        world.upload(key)
        world.emulator.set_last_modified(SOURCE_BUCKET, key, when)
    events_before = len(outputs_events())

    dag_run, _ = nightly(DAY)

    assert str(dag_run.state) == "success"
    report = stored_report(world, dag_run)
    assert sorted(f["source"] for f in report["files"]) == [
        f"s3://{SOURCE_BUCKET}/arrivals/at midnight.mp4",
        f"s3://{SOURCE_BUCKET}/arrivals/sub/late 'tonight' $(id).mp4",
    ]
    assert report["counts"] == {"ok": 2}
    (event,) = outputs_events()[events_before:]
    assert event["dag_id"] == "vod_sr_nightly" and event["output_count"] == 2
    assert sorted(o["output"] for o in event["outputs"]) == [
        f"s3://{OUTPUT_BUCKET}/arrivals/at midnight_sr_cpu.mp4",
        f"s3://{OUTPUT_BUCKET}/arrivals/sub/late 'tonight' $(id)_sr_cpu.mp4",
    ]


def test_a_fleet_deployment_runs_its_night_on_a_launched_instance(world, monkeypatch):
    # Issue 21 point 1: a deployment with a fleet (no named instances) gets vod_sr_nightly, and its runs launch,
    # use and terminate their instances like vod_sr_batch's.
    import uuid

    from airflow.dag_processing.dagbag import DagBag

    from include.local_aws.world import create_launch_template
    from include.vod_sr.fleet import LAUNCHED_BY_TAG

    template = f"bluewhale-{uuid.uuid4().hex[:8]}"
    create_launch_template(world.emulator.endpoint_url, template)
    for name, value in {
        "VOD_SR_NIGHTLY_PREFIXES": "arrivals/",
        "VOD_SR_NIGHTLY_SETTLE_SECONDS": "0",
        "VOD_SR_NIGHTLY_START_DATE": "2026-10-01",
        "VOD_SR_INSTANCE_IDS": "",
        "VOD_SR_LAUNCH_TEMPLATE": template,
        "VOD_SR_FLEET_SIZE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    night = DAY + timedelta(days=5)  # an interval of its own: the module's other tests upload to the same prefix
    key = "arrivals/fleet night.mp4"
    world.upload(key)
    world.emulator.set_last_modified(SOURCE_BUCKET, key, night + timedelta(hours=3))
    dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags["vod_sr_nightly"]

    dag_run = dag.test(logical_date=night + timedelta(days=1))

    assert str(dag_run.state) == "success"
    assert [f["source"] for f in stored_report(world, dag_run)["files"]] == [f"s3://{SOURCE_BUCKET}/{key}"]
    launched = world.ec2.describe_instances(
        Filters=[{"Name": f"tag:{LAUNCHED_BY_TAG}", "Values": [f"vod_sr_nightly/{dag_run.run_id}"]}]
    )["Reservations"]
    assert [i["State"]["Name"] for r in launched for i in r["Instances"]] == ["terminated"]
    assert world.instance_state() == "stopped"  # the deployment's named instance of `world` is not used
