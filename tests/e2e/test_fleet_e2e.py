"""Fleets end to end (issue 13 part 1): vod_sr_batch launches its instances from a launch template, uses them as lanes
and terminates them, on dag.test() + the emulator, with the real AWS CLI and ffmpeg on the launched "instances".

Each test finds the run's instances by the tag the sweeper reads (`vod-sr:launched-by` = "<dag_id>/<run_id>"). The
named instance of the `world` fixture stays configured (VOD_SR_INSTANCE_IDS), so each fleet run clears instance_ids,
as an operator does in the form; it must never be started.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest

from include.local_aws.server import EMULATOR_REGION
from include.local_aws.world import (
    BLUEWHALE_AMI,
    INSTANCE_PROFILE,
    OUTPUT_BUCKET,
    SOURCE_BUCKET,
    create_launch_template,
    make_sample_clip,
)
from include.vod_sr.fleet import LAUNCHED_BY_TAG, RUN_TOKEN_TAG
from include.vod_sr.plan import run_token
from include.vod_sr.report import REPORT_PREFIX
from tests.e2e.test_iam_least_privilege import Request, iam_requests, principal_of
from tests.test_deployment_files import LAUNCH_ADDITION, PRINCIPAL_POLICIES, SAMPLE, IamPolicy

pytestmark = pytest.mark.e2e

DAG_ID = "vod_sr_batch"


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """A 2 s clip: these tests are about the instances, so each file should cost little CPU."""
    return make_sample_clip(tmp_path_factory.mktemp("fleet") / "short.mp4", seconds=2, size="320x240")


@pytest.fixture
def template(world) -> dict[str, str]:
    """A fresh launch template (Bluewhale AMI, g6e.xlarge, the instance profile, On-Demand): name and id. Capacity
    limits and the faults the tests set are lifted again after the test."""
    name = f"bluewhale-{uuid.uuid4().hex[:8]}"
    template_id = create_launch_template(world.emulator.endpoint_url, name)
    yield {"name": name, "id": template_id}
    world.emulator.set_faults(
        {
            "capacity": {},
            "spot_capacity": {},
            "spot_error": "InsufficientInstanceCapacity",
            # "defaults" are merged into the emulator's: the settings the tests change are set back one by one
            "defaults": {
                "agent_never_online": False,
                "denied_actions": [],
                "launch_visibility_seconds": 0.0,
                "spot_interruption_seconds": None,
                "model_run_seconds": None,
            },
        }
    )


def upload(world, clip, count: int, prefix: str = "fleet") -> list[str]:
    keys = [f"{prefix}/{n}.mp4" for n in range(count)]
    for key in keys:
        world.upload(key, clip)
    return keys


def fleet_conf(template: dict[str, str], size: int = 3, **extra: Any) -> dict[str, Any]:
    return {"instance_ids": [], "fleet_size": size, "launch_template": template["name"], "chunk_size": 1, **extra}


def launched_by(world, run_id: str) -> dict[str, dict[str, Any]]:
    """The instances launched for the run, found by the sweeper's tag, by id."""
    found = world.ec2.describe_instances(
        Filters=[{"Name": f"tag:{LAUNCHED_BY_TAG}", "Values": [f"{DAG_ID}/{run_id}"]}]
    )["Reservations"]
    return {i["InstanceId"]: i for r in found for i in r["Instances"]}


def states(instances: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(i["State"]["Name"] for i in instances.values())


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def stored_report(world) -> dict[str, Any]:
    (item,) = world.s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=REPORT_PREFIX)["Contents"]
    return json.loads(world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=item["Key"])["Body"].read())


def task_log(caplog, capfd) -> str:
    captured = capfd.readouterr()
    return caplog.text + captured.out + captured.err


def launch_attempts(world) -> list[tuple[str, str]]:
    return [
        (
            call["params"].get("InstanceType", "template"),
            "Spot" if call["params"].get("InstanceMarketOptions.MarketType") == "spot" else "On-Demand",
        )
        for call in world.emulator.calls()
        if call["action"] == "RunInstances"
    ]


def released(log: str) -> dict[str, str]:
    """Each lane's release outcome, as the release task logs it (and hands the report)."""
    return dict(re.findall(r"Instance (i-[0-9a-f]+): ([a-z ]+); up", log))


class TestAFleetRunsABatch:
    def test_three_launched_instances_run_the_batch_and_are_all_terminated(
        self, world, template, short_clip, tmp_path, caplog, capfd
    ):
        keys = upload(world, short_clip, 3)
        # EC2's eventual consistency: for 3 s after RunInstances, requests naming a new id answer
        # InvalidInstanceID.NotFound (faults.py). The lanes' acquire once took such an instance for gone.
        world.emulator.set_faults({"defaults": {"launch_visibility_seconds": 3.0}})

        run = world.run(sources=keys, **fleet_conf(template))

        log = task_log(caplog, capfd)
        assert run.state == "success", run.task_states
        fleet = launched_by(world, run.run_id)
        assert len(fleet) == 3
        assert states(fleet) == ["terminated"] * 3
        token = run_token(DAG_ID, run.run_id)
        assert sorted(tags_of(i)["Name"] for i in fleet.values()) == [f"vod-sr {token} {n}" for n in range(3)]
        assert {tags_of(i)[RUN_TOKEN_TAG] for i in fleet.values()} == {token}
        assert {(i["ImageId"], i["InstanceType"]) for i in fleet.values()} == {(BLUEWHALE_AMI, "g6e.xlarge")}
        assert run.task_states["lane.acquire"] == ["success"] * 3  # one lane per launched instance
        # run_chunks' early release begins the termination as its last command ends; the teardown then waits for it
        # (or finds it done), and says so to the report.
        assert released(log) == dict.fromkeys(fleet, "terminated")
        report = stored_report(world)
        assert report["counts"] == {"ok": 3}
        assert report["instances_left_running"] == {}
        # Each instance had a lane (one chunk each), and its running time is known up to its termination.
        assert set(report["instance_seconds"]) == set(fleet)
        assert all(seconds is not None for seconds in report["instance_seconds"].values())
        assert world.instance_state() == "stopped"  # the named instance was never touched
        assert "StartInstances" not in world.actions()

    def test_a_failing_run_still_terminates_every_launched_instance(self, world, template, short_clip):
        keys = upload(world, short_clip, 2)
        world.upload("fleet/corrupt.mp4", body=b"this is not a video" * 100)

        run = world.run(sources=[*keys, "fleet/corrupt.mp4"], **fleet_conf(template))

        assert run.state == "failed"
        assert sorted(run.task_states["lane.run_chunks"]) == ["failed", "success", "success"]
        assert run.task_states["lane.release"] == ["success"] * 3
        fleet = launched_by(world, run.run_id)
        assert len(fleet) == 3
        assert states(fleet) == ["terminated"] * 3
        files = {f["source"].rsplit("/", 1)[-1]: f["status"] for f in stored_report(world)["files"]}
        assert files == {"0.mp4": "ok", "1.mp4": "ok", "corrupt.mp4": "failed"}

    def test_a_lane_whose_agent_never_comes_online_terminates_its_instance(
        self, world, template, short_clip, monkeypatch
    ):
        monkeypatch.setenv("VOD_SR_AGENT_ONLINE_TIMEOUT", "4")
        world.emulator.set_faults({"defaults": {"agent_never_online": True}})
        keys = upload(world, short_clip, 2)

        run = world.run(sources=keys, **fleet_conf(template, size=2))

        assert run.state == "failed"
        assert run.task_states["lane.wait_for_agent"] == ["failed", "failed"]
        assert "SendCommand" not in world.actions()
        assert states(launched_by(world, run.run_id)) == ["terminated"] * 2

    def test_an_acquire_that_fails_for_good_terminates_its_instance_though_no_teardown_runs(
        self, world, template, short_clip, caplog, capfd
    ):
        # Tagging refused (as without the lease permission): acquire fails at once, so the lane's teardown is skipped.
        world.emulator.set_faults({"defaults": {"denied_actions": ["CreateTags"]}})
        keys = upload(world, short_clip, 1)

        run = world.run(sources=keys, **fleet_conf(template, size=1))

        assert run.state == "failed"
        assert run.task_states["lane.acquire"] == ["failed"]
        assert run.task_states["lane.release"] == ["upstream_failed"]
        (instance,) = launched_by(world, run.run_id).values()
        assert instance["State"]["Name"] in ("shutting-down", "terminated")
        assert f"Terminated {instance['InstanceId']}: its lane could not acquire it" in task_log(caplog, capfd)


class TestCapacity:
    def test_no_spot_falls_back_to_on_demand_and_a_type_without_room_to_the_next(self, world, template, short_clip):
        world.emulator.set_faults({"spot_capacity": {"*": 0}, "capacity": {"g6e.12xlarge": 0}})
        keys = upload(world, short_clip, 2)

        run = world.run(
            sources=keys,
            **fleet_conf(template, size=2, spot=True, fleet_instance_types=["g6e.12xlarge", "g6e.2xlarge"]),
        )

        assert run.state == "success", run.task_states
        assert launch_attempts(world) == [
            ("g6e.12xlarge", "Spot"),
            ("g6e.12xlarge", "On-Demand"),
            ("g6e.2xlarge", "Spot"),
            ("g6e.2xlarge", "On-Demand"),
        ]
        fleet = launched_by(world, run.run_id)
        assert {(i["InstanceType"], i.get("InstanceLifecycle", "on-demand")) for i in fleet.values()} == {
            ("g6e.2xlarge", "on-demand")
        }
        assert states(fleet) == ["terminated"] * 2

    def test_spot_when_there_is_room(self, world, template, short_clip):
        keys = upload(world, short_clip, 1)

        run = world.run(sources=keys, **fleet_conf(template, size=1, spot=True))

        assert run.state == "success", run.task_states
        (instance,) = launched_by(world, run.run_id).values()
        assert (instance["InstanceLifecycle"], instance["State"]["Name"]) == ("spot", "terminated")

    def test_fewer_instances_than_asked_run_the_whole_batch(self, world, template, short_clip, caplog, capfd):
        world.emulator.set_faults({"capacity": {"g6e.xlarge": 2}})
        keys = upload(world, short_clip, 3)

        run = world.run(sources=keys, **fleet_conf(template, size=3))

        assert run.state == "success", run.task_states
        fleet = launched_by(world, run.run_id)
        assert states(fleet) == ["terminated"] * 2
        assert stored_report(world)["counts"] == {"ok": 3}
        assert "Launched 2 of the 3 instance(s) asked for" in task_log(caplog, capfd)

    def test_no_capacity_at_all_fails_in_plan_with_nothing_launched(self, world, template, short_clip, caplog, capfd):
        world.emulator.set_faults({"capacity": {"*": 0}, "spot_capacity": {"*": 0}})
        keys = upload(world, short_clip, 1)

        run = world.run(sources=keys, **fleet_conf(template, size=2, spot=True))

        assert run.state == "failed"
        assert run.task_states["plan"] == ["failed"]
        assert launched_by(world, run.run_id) == {}
        assert "the fleet could not be launched: no instance could be launched" in task_log(caplog, capfd)


class TestNothingLaunchedForBadInput:
    @pytest.mark.parametrize(
        "conf",
        [
            pytest.param({"sources": ["fleet/absent.mp4"]}, id="missing-source"),
            pytest.param({"sources": ["fleet/0.mp4"], "instance_ids": ["i-0123456789abcdef0"]}, id="ids-and-fleet"),
            pytest.param({"sources": ["fleet/0.mp4"], "launch_template": None}, id="no-template"),
            pytest.param({"sources": ["fleet/0.mp4"], "stop_when_done": False}, id="keep-running"),
        ],
    )
    def test_bad_input_fails_in_plan_before_anything_is_launched(self, world, template, short_clip, conf):
        upload(world, short_clip, 1)

        run = world.run(**{**fleet_conf(template), **conf})

        assert run.state == "failed"
        assert run.task_states["plan"] == ["failed"]
        assert "RunInstances" not in world.actions()
        assert launched_by(world, run.run_id) == {}

    def test_a_run_with_nothing_to_do_launches_nothing(self, world, template, short_clip):
        keys = upload(world, short_clip, 1)
        assert world.run(sources=keys, **fleet_conf(template, size=1)).state == "success"
        world.emulator.reset_calls()

        rerun = world.run(sources=keys, **fleet_conf(template, size=1))  # its output exists: skipped

        assert rerun.state == "success"
        assert "RunInstances" not in world.actions()


def test_a_fleet_run_needs_only_the_base_policy_and_the_launch_addition(world, template, short_clip):
    """Every AWS call Airflow made in a fleet run, as IAM authorizes it, is allowed by the Airflow principal's policy
    plus iam/airflow-principal-policy.launch.json, the run's instances named by their tags only; and the addition
    grants nothing the run did not use."""
    keys = upload(world, short_clip, 2)
    world.emulator.reset_calls()  # from here on, every call is the run's

    run = world.run(sources=keys, **fleet_conf(template, size=2))
    calls = world.emulator.calls()

    assert run.state == "success", run.task_states
    fleet = launched_by(world, run.run_id)
    instance_tags = {instance_id: tags_of(instance) for instance_id, instance in fleet.items()}
    template_arn = f"arn:aws:ec2:{EMULATOR_REGION}:{SAMPLE['ACCOUNT_ID']}:launch-template/{template['id']}"
    requests, unattributed = [], []
    for call in calls:
        principal = principal_of(call)
        if principal == "airflow" and call["action"] == "RunInstances":
            requests += launch_requests(call, template_arn)
        elif principal == "airflow":
            requests += [r for r in iam_requests(call, principal, "fleet", instance_tags) if r.principal == "airflow"]
        elif principal is None:
            unattributed.append(call["action"])
    values = {
        **SAMPLE,
        "REGION": EMULATOR_REGION,
        "INSTANCE_ID": world.instance_id,
        "SOURCE_BUCKET": SOURCE_BUCKET,
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "LAUNCH_TEMPLATE_ID": template["id"],
        "INSTANCE_ROLE_NAME": INSTANCE_PROFILE,  # the emulator's role and profile share the name
    }
    base = IamPolicy.load(PRINCIPAL_POLICIES["airflow"], values)
    addition = IamPolicy.load(LAUNCH_ADDITION, values)
    both = IamPolicy({"Statement": [*base.statements, *addition.statements]}, "base + launch addition")

    assert unattributed == []  # the launch client goes through the AWS connection like every other
    assert sorted({refusal for r in requests for refusal in r.refused_by(both)}) == []
    used = {r.action for r in requests}
    assert sorted(addition.granted_actions() - used) == []
    # Without the addition the fleet is out of reach: the base policy names the instances it may use.
    assert {r.action for r in requests if r.refused_by(base)} >= {
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ssm:SendCommand",
        "iam:PassRole",
    }


def launch_requests(call: dict[str, Any], template_arn: str) -> list[Request]:
    """What IAM authorizes for a RunInstances from a launch template with tags: RunInstances on every resource the
    launch creates or uses (each with ec2:LaunchTemplate, the new instance and volumes with the request's tags too),
    ec2:CreateTags with ec2:CreateAction=RunInstances for the tags, and iam:PassRole of the template's instance role."""
    params = call["params"]
    tags: dict[str, str] = {}
    for key, value in params.items():
        found = re.fullmatch(r"TagSpecification\.(\d+)\.Tag\.(\d+)\.Key", key)
        if found:
            tags[value] = params[f"TagSpecification.{found[1]}.Tag.{found[2]}.Value"]
    region, account = EMULATOR_REGION, SAMPLE["ACCOUNT_ID"]
    from_template = {"ec2:LaunchTemplate": template_arn}
    tagged_launch = from_template | {f"aws:RequestTag/{k}": v for k, v in tags.items()} | {"aws:TagKeys": list(tags)}
    resources = [
        (f"arn:aws:ec2:{region}:{account}:instance/i-0000000000000new0", tagged_launch),
        (f"arn:aws:ec2:{region}:{account}:volume/vol-0000000000000new0", tagged_launch),
        (template_arn, from_template),
        (f"arn:aws:ec2:{region}::image/{BLUEWHALE_AMI}", from_template),
        (f"arn:aws:ec2:{region}:{account}:subnet/subnet-00000000", from_template),
        (f"arn:aws:ec2:{region}:{account}:security-group/sg-00000000", from_template),
        (f"arn:aws:ec2:{region}:{account}:network-interface/eni-00000000", from_template),
    ]
    if params.get("InstanceMarketOptions.MarketType") == "spot":
        resources.append((f"arn:aws:ec2:{region}:{account}:spot-instances-request/sir-00000000", from_template))
    created = [(arn, {"ec2:CreateAction": "RunInstances"}) for arn, _ in resources[:2]]
    role = (f"arn:aws:iam::{account}:role/{INSTANCE_PROFILE}", {"iam:PassedToService": "ec2.amazonaws.com"})
    return [
        Request("airflow", "fleet", "ec2:RunInstances", resources),
        Request("airflow", "fleet", "ec2:CreateTags", created),
        Request("airflow", "fleet", "iam:PassRole", [role]),
    ]


@pytest.mark.fullstack
def test_marking_a_fleet_run_failed_still_terminates_its_instance(world, template, shared_airflow, tmp_path):
    """The production deployment (scheduler, Celery workers, triggerers): a run marked failed in the UI while its
    chunk runs still has its teardown terminate the launched instance."""
    stack = shared_airflow
    # A 90 s clip keeps the SR command busy long enough to give up on the run while it runs.
    world.upload("fleet/long.mp4", make_sample_clip(tmp_path / "long.mp4", seconds=90))
    run_id = stack.trigger({"sources": ["fleet/long.mp4"], "model": "cpu", **fleet_conf(template, size=1)})
    stack.wait_until(
        lambda: stack.task_states(run_id).get("lane.run_chunks") == "deferred", 300, "the wait never deferred"
    )

    stack.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", {"state": "failed"})
    stack.wait_until(
        lambda: stack.task_states(run_id).get("lane.release") in ("success", "failed"), 240, "no teardown ran"
    )

    assert stack.task_states(run_id)["lane.release"] == "success"
    (instance,) = launched_by(world, run_id).values()
    assert instance["State"]["Name"] == "terminated"


class TestSpotInterruptions:
    def test_a_lane_whose_spot_instance_is_taken_back_ends_at_once_and_says_why(self, world, template, short_clip):
        # Each model run lasts 60 s (a GPU's pace); EC2 takes the instance back 2 s after its notice, a few seconds
        # into the first model runs. SSM would keep the commands InProgress for hours (nothing reports from a
        # terminated instance): the lane must end within a couple of polls, send nothing more to the dead instance,
        # and say for each file what happened.
        world.emulator.set_faults(
            {"defaults": {"spot_interruption_seconds": 8, "spot_notice_seconds": 2, "model_run_seconds": 60}}
        )
        keys = upload(world, short_clip, 5, prefix="spot")  # 5 chunks of 1 file: 3 go out at once (1 GPU)
        started = time.monotonic()

        run = world.run(sources=keys, **fleet_conf(template, size=1, spot=True))

        assert run.state == "failed", run.task_states
        assert time.monotonic() - started < 55  # before the first model run could even have ended
        (instance,) = launched_by(world, run.run_id).values()
        assert instance["StateReason"]["Code"] == "Server.SpotInstanceTermination"
        assert world.actions().count("SendCommand") == 1 + 3  # the CLI install, then 3 chunks; none after the loss
        reasons = {entry["source"].rsplit("/", 1)[-1]: entry["reason"] for entry in stored_report(world)["files"]}
        lost = (
            f"not finished: its instance {instance['InstanceId']} went down under its chunk "
            "(terminated: Server.SpotInstanceTermination: Spot instance termination)"
        )
        never_sent = "no result from the instance: SSM has no command for its chunk (it was never sent)"
        assert reasons == {"0.mp4": lost, "1.mp4": lost, "2.mp4": lost, "3.mp4": never_sent, "4.mp4": never_sent}
