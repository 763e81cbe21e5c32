"""The sweeper's decisions against the local AWS emulator: real EC2 state, tags and SSM commands; the run states come
from a table (`Runs`), as the Task SDK would answer them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from include.local_aws.world import boto_client
from include.vod_sr.instance import LEASE_TIME_FORMAT, command_comment, lease_tag_key
from include.vod_sr.plan import run_token
from include.vod_sr.sweeper import (
    KEEP_RUNNING_TAG,
    LAUNCHED_BY_TAG,
    RUN_TOKEN_TAG,
    Action,
    SweepEntry,
    SweepReport,
    airflow_run_states,
    launched_action,
    lease_run,
    split_launched_by,
    sweep,
)

AMI = "ami-12345678"
BATCH = "vod_sr_batch"
ENDED_RUN = "manual__2026-11-28T01:00:00+00:00"
RUNNING_RUN = "manual__2026-11-29T01:00:00+00:00"
NO_GRACE = timedelta(0)


class Runs:
    """Run states by (dag_id, run_id), None for a run that does not exist; remembers what it was asked."""

    def __init__(self, states: dict[tuple[str, str], str] | None = None, failing: tuple[str, ...] = ()) -> None:
        self.states = states or {}
        self.failing = failing
        self.asked: list[tuple[str, str]] = []

    def __call__(self, dag_id: str, run_id: str) -> str | None:
        self.asked.append((dag_id, run_id))
        if run_id in self.failing:
            raise ConnectionError("the API server did not answer")
        return self.states.get((dag_id, run_id))


RUNS = Runs({(BATCH, ENDED_RUN): "failed", (BATCH, RUNNING_RUN): "running"})


@pytest.fixture
def aws(emulator_env):
    """EC2 and SSM clients on the emulator; every instance a test launches is terminated afterwards."""
    ec2, ssm = boto_client("ec2", emulator_env.endpoint_url), boto_client("ssm", emulator_env.endpoint_url)
    launched: list[str] = []

    def launch(tags: dict[str, str] | None = None, *, running: bool = True) -> str:
        spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in (tags or {}).items()]}]
        instance_id = ec2.run_instances(
            ImageId=AMI, MinCount=1, MaxCount=1, **({"TagSpecifications": spec} if tags else {})
        )["Instances"][0]["InstanceId"]
        launched.append(instance_id)
        if running:
            ec2.get_waiter("instance_running").wait(
                InstanceIds=[instance_id], WaiterConfig={"Delay": 1, "MaxAttempts": 30}
            )
        return instance_id

    class Aws:
        pass

    aws = Aws()
    aws.ec2, aws.ssm, aws.launch, aws.emulator = ec2, ssm, launch, emulator_env
    yield aws
    for instance_id in launched:
        try:
            ec2.terminate_instances(InstanceIds=[instance_id])
        except Exception:
            pass


def state(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


def tags(ec2, instance_id: str) -> dict[str, str]:
    instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def lease(run_id: str, *, dag_id: str = BATCH, taken: datetime | None = None, holder: str | None = None):
    """The lease tag acquire writes for the run: key by the run's token, value `<time> <run id>`."""
    when = (taken or datetime.now(UTC)).strftime(LEASE_TIME_FORMAT)
    return lease_tag_key(run_token(dag_id, run_id)), f"{when} {holder if holder is not None else run_id}"


def launched_by(run_id: str, dag_id: str = BATCH) -> dict[str, str]:
    return {LAUNCHED_BY_TAG: f"{dag_id}/{run_id}", RUN_TOKEN_TAG: run_token(dag_id, run_id)}


def entry_of(report: SweepReport, instance_id: str) -> SweepEntry:
    found = report.by_instance()
    assert instance_id in found, f"{instance_id} was not swept: {report.table()}"
    return found[instance_id]


def wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


class TestLaunchedInstances:
    @pytest.mark.parametrize("run_state", ["success", "failed"])
    def test_an_instance_whose_run_ended_is_terminated(self, aws, run_state):
        instance_id = aws.launch(launched_by(ENDED_RUN))

        report = sweep(aws.ec2, aws.ssm, Runs({(BATCH, ENDED_RUN): run_state}), grace=NO_GRACE)

        entry = entry_of(report, instance_id)
        assert (entry.outcome(False), entry.error) == ("terminated", "")
        assert f"its run ended ({run_state})" in entry.reason
        assert entry.run == f"{BATCH}/{ENDED_RUN}"
        assert state(aws.ec2, instance_id) in ("shutting-down", "terminated")

    def test_a_stopped_instance_whose_run_ended_is_terminated_too(self, aws):
        instance_id = aws.launch(launched_by(ENDED_RUN))
        aws.ec2.stop_instances(InstanceIds=[instance_id])

        sweep(aws.ec2, aws.ssm, RUNS, grace=NO_GRACE)

        assert state(aws.ec2, instance_id) in ("shutting-down", "terminated")

    @pytest.mark.parametrize("run_state", ["running", "queued"])
    def test_an_instance_whose_run_is_live_is_left(self, aws, run_state):
        instance_id = aws.launch(launched_by(RUNNING_RUN))

        report = sweep(aws.ec2, aws.ssm, Runs({(BATCH, RUNNING_RUN): run_state}), grace=NO_GRACE)

        assert entry_of(report, instance_id).action is Action.LEAVE
        assert f"its run is {run_state}" in entry_of(report, instance_id).reason
        assert state(aws.ec2, instance_id) == "running"

    def test_a_recent_instance_whose_run_is_not_visible_is_left_for_the_grace_period(self, aws):
        instance_id = aws.launch(launched_by("manual__not-visible-yet"))

        report = sweep(aws.ec2, aws.ssm, RUNS, grace=timedelta(minutes=10))

        assert entry_of(report, instance_id).action is Action.LEAVE
        assert "not visible yet" in entry_of(report, instance_id).reason
        assert state(aws.ec2, instance_id) == "running"

    def test_after_the_grace_period_an_instance_whose_run_does_not_exist_is_terminated(self, aws):
        instance_id = aws.launch(launched_by("manual__deleted"))

        later = datetime.now(UTC) + timedelta(minutes=11)
        report = sweep(aws.ec2, aws.ssm, RUNS, grace=timedelta(minutes=10), now=later)

        assert entry_of(report, instance_id).outcome(False) == "terminated"
        assert "no longer exists" in entry_of(report, instance_id).reason
        assert state(aws.ec2, instance_id) in ("shutting-down", "terminated")

    def test_a_run_state_that_cannot_be_read_leaves_the_instance_and_is_reported_as_a_failure(self, aws):
        instance_id = aws.launch(launched_by("manual__unreadable"))

        report = sweep(aws.ec2, aws.ssm, Runs(failing=("manual__unreadable",)), grace=NO_GRACE)

        entry = entry_of(report, instance_id)
        assert entry.action is Action.LEAVE
        assert "could not read the state of run vod_sr_batch/manual__unreadable" in entry.error
        assert entry in report.failures
        assert state(aws.ec2, instance_id) == "running"

    def test_an_instance_tagged_keep_running_is_left(self, aws):
        instance_id = aws.launch({**launched_by(ENDED_RUN), KEEP_RUNNING_TAG: "debugging the AMI"})

        report = sweep(aws.ec2, aws.ssm, RUNS, grace=NO_GRACE)

        assert entry_of(report, instance_id).action is Action.LEAVE
        assert state(aws.ec2, instance_id) == "running"

    def test_each_run_is_asked_once(self, aws):
        first, second = aws.launch(launched_by(ENDED_RUN)), aws.launch(launched_by(ENDED_RUN))
        runs = Runs({(BATCH, ENDED_RUN): "success"})

        sweep(aws.ec2, aws.ssm, runs, grace=NO_GRACE)

        assert runs.asked.count((BATCH, ENDED_RUN)) == 1
        assert {state(aws.ec2, first), state(aws.ec2, second)} <= {"shutting-down", "terminated"}


class TestNamedInstances:
    def test_a_lease_of_an_ended_run_is_dropped_and_the_instance_stopped(self, aws):
        key, value = lease(ENDED_RUN)  # as acquire writes it: the holder is the bare run id, placed by its token
        instance_id = aws.launch({key: value})

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=NO_GRACE)

        entry = entry_of(report, instance_id)
        assert (entry.outcome(False), entry.error) == ("stopped", "")
        assert entry.dropped_leases == (run_token(BATCH, ENDED_RUN),)
        assert f"its run {BATCH}/{ENDED_RUN} ended (failed)" in entry.reason
        assert entry.run == f"{BATCH}/{ENDED_RUN}"
        assert key not in tags(aws.ec2, instance_id)
        assert state(aws.ec2, instance_id) in ("stopping", "stopped")

    def test_a_young_lease_of_a_run_that_no_longer_exists_is_dead(self, aws):
        key, value = lease("manual__deleted-run")
        instance_id = aws.launch({key: value})

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=NO_GRACE)

        assert entry_of(report, instance_id).outcome(False) == "stopped"
        assert "no longer exists" in entry_of(report, instance_id).reason
        assert key not in tags(aws.ec2, instance_id)

    def test_a_holder_naming_its_dag_is_read_as_dag_slash_run(self, aws):
        key, value = lease(ENDED_RUN, dag_id="vod_sr_fleet_test", holder=f"vod_sr_fleet_test/{ENDED_RUN}")
        instance_id = aws.launch({key: value})
        runs = Runs({("vod_sr_fleet_test", ENDED_RUN): "success"})

        report = sweep(aws.ec2, aws.ssm, runs, named_instance_ids=[instance_id], grace=NO_GRACE)

        assert entry_of(report, instance_id).outcome(False) == "stopped"
        assert ("vod_sr_fleet_test", ENDED_RUN) in runs.asked

    def test_an_instance_found_only_by_its_lease_tag_is_swept(self, aws):
        key, value = lease(ENDED_RUN)
        instance_id = aws.launch({key: value})

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[], grace=NO_GRACE)

        assert entry_of(report, instance_id).outcome(False) == "stopped"

    def test_an_expired_lease_is_dropped_whatever_its_run(self, aws):
        key, value = lease("someone-else", taken=datetime.now(UTC) - timedelta(hours=50))
        instance_id = aws.launch({key: value})

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=NO_GRACE)

        assert entry_of(report, instance_id).outcome(False) == "stopped"
        assert "has not refreshed it for 50 h" in entry_of(report, instance_id).reason
        assert key not in tags(aws.ec2, instance_id)

    def test_a_live_lease_of_a_running_run_leaves_the_instance_alone(self, aws):
        ended_key, ended_value = lease(ENDED_RUN)
        live_key, live_value = lease(RUNNING_RUN)
        instance_id = aws.launch({ended_key: ended_value, live_key: live_value})

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=NO_GRACE)

        entry = entry_of(report, instance_id)
        assert entry.action is Action.LEAVE
        assert f"its run {BATCH}/{RUNNING_RUN} is running" in entry.reason
        assert state(aws.ec2, instance_id) == "running"
        # The ended run's lease goes anyway; the running run's stays.
        assert live_key in tags(aws.ec2, instance_id)
        assert ended_key not in tags(aws.ec2, instance_id)

    def test_a_lease_whose_run_cannot_be_placed_leaves_the_instance_alone(self, aws):
        key, value = lease("run-of-an-unknown-dag", dag_id="some_other_dag")
        instance_id = aws.launch({key: value})

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=NO_GRACE)

        assert entry_of(report, instance_id).action is Action.LEAVE
        assert "cannot place" in entry_of(report, instance_id).reason
        assert key in tags(aws.ec2, instance_id)
        assert state(aws.ec2, instance_id) == "running"

    def test_a_live_vod_sr_command_leaves_the_instance_alone(self, aws, running_instance):
        command_id = aws.ssm.send_command(
            InstanceIds=[running_instance],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": ["sleep 30"]},
            Comment=command_comment(run_token(BATCH, RUNNING_RUN), "chunk 00001"),
        )["Command"]["CommandId"]
        try:
            report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[running_instance], grace=NO_GRACE)

            entry = entry_of(report, running_instance)
            assert entry.action is Action.LEAVE
            assert command_id in entry.reason
            assert state(aws.ec2, running_instance) == "running"
        finally:
            aws.ssm.cancel_command(CommandId=command_id)

    def test_a_command_of_the_ended_run_is_cancelled_and_does_not_keep_the_instance_up(self, aws, running_instance):
        key, value = lease(ENDED_RUN)
        aws.ec2.create_tags(Resources=[running_instance], Tags=[{"Key": key, "Value": value}])
        command_id = aws.ssm.send_command(
            InstanceIds=[running_instance],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": ["sleep 30"]},
            Comment=command_comment(run_token(BATCH, ENDED_RUN), "chunk 00001"),
        )["Command"]["CommandId"]
        aws.emulator.reset_calls()

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[running_instance], grace=NO_GRACE)

        entry = entry_of(report, running_instance)
        assert entry.outcome(False) == "stopped"
        assert f"cancelled the ended run's command(s) {command_id}" in entry.reason
        assert "CancelCommand" in [c["action"] for c in aws.emulator.calls()]
        wait_for(lambda: state(aws.ec2, running_instance) == "stopped")

    def test_a_running_instance_with_nothing_keeping_it_up_is_stopped(self, aws):
        instance_id = aws.launch()

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=NO_GRACE)

        assert entry_of(report, instance_id).outcome(False) == "stopped"
        assert "no live lease and no live vod-sr command" in entry_of(report, instance_id).reason
        assert state(aws.ec2, instance_id) in ("stopping", "stopped")

    def test_an_instance_started_within_the_grace_period_is_left(self, aws):
        instance_id = aws.launch()

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=timedelta(minutes=10))

        assert entry_of(report, instance_id).action is Action.LEAVE
        assert "started" in entry_of(report, instance_id).reason
        assert state(aws.ec2, instance_id) == "running"

    def test_a_stopped_named_instance_is_not_touched(self, aws):
        instance_id = aws.launch()
        aws.ec2.stop_instances(InstanceIds=[instance_id])
        wait_for(lambda: state(aws.ec2, instance_id) == "stopped")

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[instance_id], grace=NO_GRACE)

        assert instance_id not in report.by_instance()

    def test_a_named_id_that_does_not_exist_is_no_error(self, aws):
        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=["i-0000000000000dead"], grace=NO_GRACE)

        assert "i-0000000000000dead" not in report.by_instance()


class TestStrangers:
    def test_an_instance_vod_sr_does_not_know_is_never_touched(self, aws):
        stranger = aws.launch({"Name": "someone's web server", "vod-sr-fleet": "not a lease"})
        aws.emulator.reset_calls()

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[], grace=NO_GRACE)

        named_it = [c["action"] for c in aws.emulator.calls() if stranger in str(c.get("params", ""))]
        assert named_it == []  # no call of the sweep named it (the listings found it by no filter of ours)
        assert stranger not in report.by_instance()
        assert state(aws.ec2, stranger) == "running"
        assert tags(aws.ec2, stranger) == {"Name": "someone's web server", "vod-sr-fleet": "not a lease"}


class TestDryRun:
    def test_a_dry_run_reports_and_changes_nothing(self, aws):
        leaked = aws.launch(launched_by(ENDED_RUN))
        key, value = lease(ENDED_RUN)
        named = aws.launch({key: value})
        aws.emulator.reset_calls()

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[named], grace=NO_GRACE, dry_run=True)

        assert entry_of(report, leaked).outcome(True) == "would terminate"
        assert entry_of(report, named).outcome(True) == "would stop"
        assert entry_of(report, named).dropped_leases == ()
        assert "dry run" in report.table()
        assert (state(aws.ec2, leaked), state(aws.ec2, named)) == ("running", "running")
        assert tags(aws.ec2, named)[key] == value
        changing = {"TerminateInstances", "StopInstances", "DeleteTags", "CreateTags", "CancelCommand"}
        assert [c["action"] for c in aws.emulator.calls() if c["action"] in changing] == []


class TestErrors:
    def test_an_aws_error_on_one_instance_does_not_stop_the_others(self, aws):
        refused = aws.launch()
        stoppable = aws.launch()
        leaked = aws.launch(launched_by(ENDED_RUN))
        aws.emulator.set_faults({"instances": {refused: {"denied_actions": ["StopInstances"]}}})

        report = sweep(aws.ec2, aws.ssm, RUNS, named_instance_ids=[refused, stoppable], grace=NO_GRACE)

        assert entry_of(report, refused).outcome(False) == "stop FAILED"
        assert "UnauthorizedOperation" in entry_of(report, refused).error
        assert [e.instance_id for e in report.failures] == [refused]
        assert refused in report.failure_message()
        assert entry_of(report, stoppable).outcome(False) == "stopped"
        assert entry_of(report, leaked).outcome(False) == "terminated"
        assert state(aws.ec2, refused) == "running"
        assert state(aws.ec2, stoppable) in ("stopping", "stopped")
        assert state(aws.ec2, leaked) in ("shutting-down", "terminated")
        assert report.counts()["failed"] == 1

    def test_the_task_fails_at_the_end_naming_the_instance(self, aws, monkeypatch):
        from airflow.sdk.exceptions import AirflowFailException

        from include.vod_sr.settings import Settings
        from include.vod_sr.sweeper import sweep_task

        refused = aws.launch()
        leaked = aws.launch(launched_by(ENDED_RUN))
        aws.emulator.set_faults({"instances": {refused: {"denied_actions": ["StopInstances"]}}})
        monkeypatch.setenv("VOD_SR_INSTANCE_IDS", refused)
        monkeypatch.setenv("VOD_SR_SWEEP_GRACE_SECONDS", "0")

        with pytest.raises(AirflowFailException, match=refused):
            sweep_task(Settings.from_env(), FakeTi({(BATCH, ENDED_RUN): "success"}), dry_run=False)

        assert state(aws.ec2, leaked) in ("shutting-down", "terminated")  # the failure came after the others

    def test_the_task_returns_the_report_when_all_went_well(self, aws, monkeypatch):
        from include.vod_sr.settings import Settings
        from include.vod_sr.sweeper import sweep_task

        leaked = aws.launch(launched_by(ENDED_RUN))
        monkeypatch.setenv("VOD_SR_INSTANCE_IDS", "")
        monkeypatch.setenv("VOD_SR_SWEEP_GRACE_SECONDS", "0")

        result = sweep_task(Settings.from_env(), FakeTi({(BATCH, ENDED_RUN): "success"}), dry_run=False)

        rows = {row["instance_id"]: row for row in result["instances"]}
        assert rows[leaked]["action"] == "terminated"
        assert rows[leaked]["run"] == f"{BATCH}/{ENDED_RUN}"
        assert result["dry_run"] is False and result["counts"]["terminated"] >= 1


class FakeTi:
    """`RuntimeTaskInstance.get_dagrun_state` as the Task SDK answers it: the state, or AirflowRuntimeError with the
    API server's 404 for a run it does not know."""

    def __init__(self, states: dict[tuple[str, str], str], status_code: int = 404, in_process: bool = False) -> None:
        self.states = states
        self.status_code = status_code
        self.in_process = in_process  # dag.test(): the client's ServerResponseError reaches the task untranslated

    def get_dagrun_state(self, dag_id: str, run_id: str):
        import httpx
        from airflow.sdk.api.client import ServerResponseError
        from airflow.sdk.api.datamodels._generated import DagRunState
        from airflow.sdk.exceptions import AirflowRuntimeError, ErrorType
        from airflow.sdk.execution_time.comms import ErrorResponse

        if (dag_id, run_id) in self.states:
            return DagRunState(self.states[(dag_id, run_id)])
        if self.in_process:
            request = httpx.Request("GET", f"http://in-process/execution/dag-runs/{dag_id}/{run_id}/state")
            response = httpx.Response(self.status_code, request=request)
            raise ServerResponseError("Server returned error", request=request, response=response)
        raise AirflowRuntimeError(
            ErrorResponse(
                error=ErrorType.API_SERVER_ERROR,
                detail={"status_code": self.status_code, "message": "Not Found", "detail": {"reason": "not_found"}},
            )
        )


class TestAirflowRunStates:
    def test_the_state_is_its_plain_value(self):
        assert airflow_run_states(FakeTi({(BATCH, RUNNING_RUN): "running"}))(BATCH, RUNNING_RUN) == "running"

    def test_a_run_the_api_server_does_not_know_is_none(self):
        assert airflow_run_states(FakeTi({}))(BATCH, "manual__gone") is None

    def test_other_api_errors_are_raised(self):
        from airflow.sdk.exceptions import AirflowRuntimeError

        with pytest.raises(AirflowRuntimeError):
            airflow_run_states(FakeTi({}, status_code=500))(BATCH, "manual__gone")

    def test_under_dag_test_a_run_the_api_server_does_not_know_is_none_too(self):
        assert airflow_run_states(FakeTi({}, in_process=True))(BATCH, "manual__gone") is None

    def test_under_dag_test_other_api_errors_are_raised(self):
        from airflow.sdk.api.client import ServerResponseError

        with pytest.raises(ServerResponseError):
            airflow_run_states(FakeTi({}, status_code=500, in_process=True))(BATCH, "manual__gone")


class TestDecisions:
    @pytest.mark.parametrize(
        ("run_state", "age", "expected"),
        [
            pytest.param("success", timedelta(0), Action.TERMINATE, id="ended-even-if-young"),
            pytest.param("failed", None, Action.TERMINATE, id="failed"),
            pytest.param("running", timedelta(days=3), Action.LEAVE, id="running-even-if-old"),
            pytest.param("queued", timedelta(days=3), Action.LEAVE, id="queued"),
            pytest.param("some-new-state", timedelta(days=3), Action.LEAVE, id="unknown-state-is-not-ended"),
            pytest.param(None, timedelta(minutes=9), Action.LEAVE, id="missing-within-grace"),
            pytest.param(None, timedelta(minutes=10), Action.TERMINATE, id="missing-after-grace"),
            pytest.param(None, None, Action.TERMINATE, id="missing-no-launch-time"),
        ],
    )
    def test_launched_action(self, run_state, age, expected):
        assert launched_action(run_state, age, timedelta(minutes=10))[0] is expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("vod_sr_batch/manual__2026-11-29T01:00:00+00:00", ("vod_sr_batch", "manual__2026-11-29T01:00:00+00:00")),
            ("vod_sr_batch/run/with/slashes", ("vod_sr_batch", "run/with/slashes")),
            ("no-slash", None),
            ("/run", None),
            ("dag/", None),
        ],
        ids=repr,
    )
    def test_split_launched_by(self, value, expected):
        assert split_launched_by(value) == expected

    def test_a_bare_holder_is_placed_by_the_lease_id(self):
        from include.vod_sr.instance import Lease

        key, value = lease(RUNNING_RUN, dag_id="vod_sr_nightly")
        placed = lease_run(Lease.from_tag({"Key": key, "Value": value}), ["vod_sr_batch", "vod_sr_nightly"])

        assert placed == ("vod_sr_nightly", RUNNING_RUN)


class TestSweeperDag:
    """The DAG file only wires: schedule, one run at a time, the deployment's pool, a dry-run param."""

    def load(self, monkeypatch, **env: str):
        import runpy

        from tests.conftest import REPO_ROOT

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(REPO_ROOT / "dags" / "vod_sr_sweeper.py"))["vod_sr_sweeper"]

    def test_defaults(self, monkeypatch):
        dag = self.load(monkeypatch, VOD_SR_POOL="vod-sr-aws")

        assert dag.schedule == "*/15 * * * *"
        assert (dag.catchup, dag.max_active_runs, dag.tags) == (False, 1, {"vod-sr"})
        assert [(t.task_id, t.pool, t.retries) for t in dag.tasks] == [("sweep", "vod-sr-aws", 0)]
        assert dag.params["dry_run"] is False
        assert "vod-sr:launched-by" in dag.doc_md

    def test_schedule_from_the_settings_and_none_for_manual_only(self, monkeypatch):
        assert self.load(monkeypatch, VOD_SR_SWEEP_SCHEDULE="@hourly").schedule == "@hourly"
        assert self.load(monkeypatch, VOD_SR_SWEEP_SCHEDULE="none").schedule is None

    def test_a_negative_grace_is_refused(self, monkeypatch):
        with pytest.raises(ValueError, match="VOD_SR_SWEEP_GRACE_SECONDS"):
            self.load(monkeypatch, VOD_SR_SWEEP_GRACE_SECONDS="-1")
