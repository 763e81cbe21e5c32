"""The sweeper DAG end to end: `dag.test()` on the emulator, with the run states read through the Task SDK
(`ti.get_dagrun_state`, answered by the in-process Execution API from this session's metadata DB).

The vod_sr_batch runs whose instances are swept are DagRun rows written into that DB (no FK binds a DagRun to its
DAG): one that ended, one still running; a third run id exists nowhere, like a run deleted from the UI. The rows are
deleted again afterwards.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from include.local_aws.world import BLUEWHALE_AMI, boto_client
from include.vod_sr.instance import LEASE_TIME_FORMAT, lease_tag_key
from include.vod_sr.plan import run_token
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

BATCH = "vod_sr_batch"


@pytest.fixture
def batch_runs(airflow_db):
    """Create vod_sr_batch DagRun rows in the given states; {state: run_id}. Deleted afterwards."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    created: list[str] = []

    def create(state: str) -> str:
        run_id = f"manual__sweeper-e2e-{state}-{uuid.uuid4().hex[:8]}"
        now = datetime.now(UTC)
        with create_session() as session:
            session.add(
                DagRun(
                    dag_id=BATCH,
                    run_id=run_id,
                    run_after=now,
                    start_date=now,
                    state=DagRunState(state),
                    run_type=DagRunType.MANUAL,
                    triggered_by=DagRunTriggeredByType.TEST,
                )
            )
        created.append(run_id)
        return run_id

    yield create
    with create_session() as session:
        session.query(DagRun).filter(DagRun.dag_id == BATCH, DagRun.run_id.in_(created)).delete()


def launch(ec2, tags: dict[str, str]) -> str:
    spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    instance_id = ec2.run_instances(ImageId=BLUEWHALE_AMI, MinCount=1, MaxCount=1, TagSpecifications=spec)["Instances"][
        0
    ]["InstanceId"]
    ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id], WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    return instance_id


def launched_by(run_id: str) -> dict[str, str]:
    return {"vod-sr:launched-by": f"{BATCH}/{run_id}", "vod-sr:run-token": run_token(BATCH, run_id)}


def lease_of(run_id: str) -> dict[str, str]:
    """The lease acquire writes: key by the run's token, value `<time> <run id>`."""
    return {lease_tag_key(run_token(BATCH, run_id)): f"{datetime.now(UTC).strftime(LEASE_TIME_FORMAT)} {run_id}"}


def describe(ec2, instance_id: str) -> dict[str, Any]:
    instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {"state": instance["State"]["Name"], "tags": {t["Key"]: t["Value"] for t in instance.get("Tags", [])}}


def run_sweeper(**conf: Any) -> tuple[str, str, dict[str, Any] | None]:
    """vod_sr_sweeper through dag.test(): (run state, sweep task state, its XCom)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags["vod_sr_sweeper"]
    dag_run = dag.test(run_conf=conf)
    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=dag_run.run_id, task_id="sweep").one()
        row = (
            session.query(XComModel)
            .filter_by(dag_id=dag.dag_id, run_id=dag_run.run_id, task_id="sweep", key="return_value")
            .one_or_none()
        )
        return str(dag_run.state), str(ti.state), None if row is None else XComModel.deserialize_value(row)


def test_the_sweeper_terminates_a_leaked_fleet_and_leaves_a_leased_instance_alone(
    emulator_env, batch_runs, monkeypatch
):
    ec2 = boto_client("ec2", emulator_env.endpoint_url)
    ended, running = batch_runs("success"), batch_runs("running")
    deleted = "manual__sweeper-e2e-deleted-run"  # no such run: deleted from the UI, or its DB lost
    leaked = launch(ec2, launched_by(ended))  # a fleet instance whose run ended without terminating it
    orphan = launch(ec2, launched_by(deleted))
    working = launch(ec2, launched_by(running))  # a fleet instance of a run still going
    leased = launch(ec2, lease_of(running))  # a named instance a running run holds
    abandoned = launch(ec2, lease_of(ended))  # a named instance whose run ended with its lease on
    stranger = launch(ec2, {"Name": "not vod-sr's"})
    monkeypatch.setenv("VOD_SR_INSTANCE_IDS", f"{leased},{abandoned}")
    monkeypatch.setenv("VOD_SR_SWEEP_GRACE_SECONDS", "0")

    run_state, task_state, report = run_sweeper()

    assert (run_state, task_state) == ("success", "success")
    assert describe(ec2, leaked)["state"] in ("shutting-down", "terminated")
    assert describe(ec2, orphan)["state"] in ("shutting-down", "terminated")
    assert describe(ec2, working)["state"] == "running"
    assert describe(ec2, leased)["state"] == "running"
    assert lease_tag_key(run_token(BATCH, running)) in describe(ec2, leased)["tags"]
    assert describe(ec2, abandoned)["state"] in ("stopping", "stopped")
    assert lease_tag_key(run_token(BATCH, ended)) not in describe(ec2, abandoned)["tags"]
    assert describe(ec2, stranger)["state"] == "running"
    rows = {row["instance_id"]: row for row in report["instances"]}
    assert (rows[leaked]["action"], rows[leaked]["run"]) == ("terminated", f"{BATCH}/{ended}")
    assert "its run ended (success)" in rows[leaked]["reason"]
    assert "its run no longer exists" in rows[orphan]["reason"]
    assert rows[orphan]["action"] == "terminated"
    assert (rows[working]["action"], rows[leased]["action"]) == ("left", "left")
    assert f"its run {BATCH}/{running} is running" in rows[leased]["reason"]
    assert rows[abandoned]["action"] == "stopped"
    assert rows[abandoned]["dropped_leases"] == [run_token(BATCH, ended)]
    assert stranger not in rows


def test_a_dry_run_reports_without_ending_anything(emulator_env, batch_runs, monkeypatch):
    ec2 = boto_client("ec2", emulator_env.endpoint_url)
    leaked = launch(ec2, launched_by(batch_runs("failed")))
    monkeypatch.setenv("VOD_SR_INSTANCE_IDS", "")
    monkeypatch.setenv("VOD_SR_SWEEP_GRACE_SECONDS", "0")

    run_state, _, report = run_sweeper(dry_run=True)

    assert run_state == "success"
    assert report["dry_run"] is True
    assert {row["instance_id"]: row["action"] for row in report["instances"]}[leaked] == "would terminate"
    assert describe(ec2, leaked)["state"] == "running"
    ec2.terminate_instances(InstanceIds=[leaked])
