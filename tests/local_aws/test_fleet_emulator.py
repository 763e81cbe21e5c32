"""The emulator launches fleets as EC2 does (issue 13): RunInstances from a launch template, capacity faults, Spot,
TerminateInstances that takes time, over real HTTP with boto3."""

from __future__ import annotations

import json
import time
import urllib.error
import uuid

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from include.local_aws.world import BLUEWHALE_AMI, INSTANCE_PROFILE, boto_client, create_launch_template

RUN_TAG = "vod-sr:run"
NO_RETRIES = Config(retries={"total_max_attempts": 1})  # capacity errors are HTTP 500s, which botocore retries
SPOT = {
    "MarketType": "spot",
    "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
}


@pytest.fixture
def fleet_env(emulator_env):
    """The session's emulator; capacity limits lifted again afterwards."""
    yield emulator_env
    emulator_env.set_faults({"capacity": {}, "spot_capacity": {}, "spot_error": "InsufficientInstanceCapacity"})


@pytest.fixture
def ec2(fleet_env):
    return boto_client("ec2", fleet_env.endpoint_url, NO_RETRIES)


@pytest.fixture
def ssm(fleet_env):
    return boto_client("ssm", fleet_env.endpoint_url)


@pytest.fixture
def template(fleet_env) -> str:
    """A fresh launch template (Bluewhale AMI, g6e.xlarge, the instance profile); its name."""
    name = f"bluewhale-{uuid.uuid4().hex[:8]}"
    create_launch_template(fleet_env.endpoint_url, name)
    return name


def run_tags(token: str) -> list[dict]:
    return [{"ResourceType": "instance", "Tags": [{"Key": RUN_TAG, "Value": token}]}]


def launch(ec2, template: str, count: int = 1, *, max_count: int | None = None, **extra) -> list[str]:
    reservation = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": template, "Version": "$Default"},
        MinCount=count,
        MaxCount=max_count or count,
        **extra,
    )
    return [i["InstanceId"] for i in reservation["Instances"]]


def described(ec2, instance_ids: list[str]) -> dict[str, dict]:
    reservations = ec2.describe_instances(InstanceIds=instance_ids)["Reservations"]
    return {i["InstanceId"]: i for r in reservations for i in r["Instances"]}


def states(ec2, instance_ids: list[str]) -> list[str]:
    found = described(ec2, instance_ids)
    return [found[i]["State"]["Name"] for i in instance_ids]


def wait_states(ec2, instance_ids: list[str], wanted: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (now := states(ec2, instance_ids)) != [wanted] * len(instance_ids):
        assert time.monotonic() < deadline, now
        time.sleep(0.1)


def ping_statuses(ssm, instance_ids: list[str]) -> dict[str, str]:
    listed = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": instance_ids}])
    return {i["InstanceId"]: i["PingStatus"] for i in listed["InstanceInformationList"]}


def wait_online(ssm, instance_ids: list[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (pings := ping_statuses(ssm, instance_ids)) != dict.fromkeys(instance_ids, "Online"):
        assert time.monotonic() < deadline, pings
        time.sleep(0.1)


def send(ssm, instance_id: str, script: str) -> str:
    return ssm.send_command(
        InstanceIds=[instance_id], DocumentName="AWS-RunShellScript", Parameters={"commands": [script]}
    )["Command"]["CommandId"]


def wait_for_invocation(ssm, command_id: str, instance_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            invocation = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        except ClientError as error:  # right after SendCommand the invocation may not exist yet
            if error.response["Error"]["Code"] != "InvocationDoesNotExist":
                raise
        else:
            if invocation["Status"] not in ("Pending", "InProgress", "Delayed"):
                return invocation
        assert time.monotonic() < deadline, "the invocation never ended"
        time.sleep(0.2)


def refused(call) -> dict:
    """The error of a call EC2 refuses: code, message and HTTP status."""
    with pytest.raises(ClientError) as failure:
        call()
    response = failure.value.response
    return {**response["Error"], "status": response["ResponseMetadata"]["HTTPStatusCode"]}


class TestLaunchFromTemplate:
    def test_three_instances_start_pending_then_run_with_the_templates_ami_profile_and_the_runs_tags(
        self, ec2, template
    ):
        token = uuid.uuid4().hex

        fleet = launch(ec2, template, 3, TagSpecifications=run_tags(token))

        assert len(fleet) == 3
        assert states(ec2, fleet) == ["pending"] * 3
        wait_states(ec2, fleet, "running")
        for instance in described(ec2, fleet).values():
            tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
            assert (instance["ImageId"], instance["InstanceType"], tags[RUN_TAG]) == (
                BLUEWHALE_AMI,
                "g6e.xlarge",
                token,
            )
            assert instance["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{INSTANCE_PROFILE}")
            assert "InstanceLifecycle" not in instance  # On-Demand

    def test_max_count_launches_as_many_as_asked_for(self, ec2, template):
        fleet = launch(ec2, template, 1, max_count=3)

        assert len(fleet) == 3  # AWS launches up to MaxCount when it can; moto launched MinCount

    def test_a_launched_agent_is_unknown_to_ssm_until_it_comes_online_then_runs_commands(self, ec2, ssm, template):
        (instance_id,) = launch(ec2, template)

        assert states(ec2, [instance_id]) == ["pending"]
        assert ping_statuses(ssm, [instance_id]) == {}
        assert refused(lambda: send(ssm, instance_id, "true"))["Code"] == "InvalidInstanceId"
        wait_online(ssm, [instance_id])
        invocation = wait_for_invocation(ssm, send(ssm, instance_id, "echo hello from $HOME"), instance_id)

        assert invocation["Status"] == "Success"
        assert invocation["StandardOutputContent"].startswith("hello from /")

    def test_the_instance_type_override_sets_the_gpus(self, ec2, ssm, template, fleet_env):
        (instance_id,) = launch(ec2, template, InstanceType="g6e.12xlarge")
        wait_online(ssm, [instance_id])

        listed = wait_for_invocation(ssm, send(ssm, instance_id, "nvidia-smi -L"), instance_id)

        assert described(ec2, [instance_id])[instance_id]["InstanceType"] == "g6e.12xlarge"
        assert len(listed["StandardOutputContent"].splitlines()) == 4
        assert fleet_env.timeline()[instance_id]["gpus"] == 4

    def test_an_instance_that_never_ran_cannot_be_stopped(self, ec2, template):
        (instance_id,) = launch(ec2, template)

        error = refused(lambda: ec2.stop_instances(InstanceIds=[instance_id]))

        assert error["Code"] == "IncorrectInstanceState"
        assert "never reached the 'running' state" in error["Message"]

    @pytest.mark.parametrize("where", ["request", "template"])
    def test_spot_instances_say_so(self, ec2, fleet_env, template, where):
        if where == "template":
            create_launch_template(fleet_env.endpoint_url, template, spot=True)  # a new default version
        extra = {"InstanceMarketOptions": SPOT} if where == "request" else {}

        (instance_id,) = launch(ec2, template, **extra)

        assert described(ec2, [instance_id])[instance_id]["InstanceLifecycle"] == "spot"

    @pytest.mark.parametrize(
        ("spec", "code", "message"),
        [
            pytest.param(
                {"LaunchTemplateName": "no-such-template"},
                "InvalidLaunchTemplateName.NotFoundException",
                "The specified launch template, with template name no-such-template, does not exist.",
                id="name",
            ),
            pytest.param(
                {"LaunchTemplateId": "lt-0123456789abcdef0"},
                "InvalidLaunchTemplateId.NotFound",
                "The specified launch template, with template ID lt-0123456789abcdef0, does not exist.",
                id="id",
            ),
        ],
    )
    def test_an_unknown_launch_template_is_refused_like_ec2(self, ec2, spec, code, message):
        error = refused(lambda: ec2.run_instances(LaunchTemplate=spec, MinCount=1, MaxCount=1))

        assert (error["Code"], error["Message"], error["status"]) == (code, message, 400)

    def test_an_unknown_template_version_is_refused_like_ec2(self, ec2, template):
        error = refused(
            lambda: ec2.run_instances(
                LaunchTemplate={"LaunchTemplateName": template, "Version": "9"}, MinCount=1, MaxCount=1
            )
        )

        assert error["Code"] == "InvalidLaunchTemplateId.VersionNotFound"
        assert error["Message"].startswith("Could not find the specified version 9 for the launch template")


class TestCapacityFaults:
    @pytest.mark.parametrize(
        ("spot_error", "message", "status"),
        [
            pytest.param(
                "InsufficientInstanceCapacity",
                "There is no Spot capacity available that matches your request.",
                500,
                id="no-capacity",
            ),
            pytest.param("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded", 400, id="quota"),
            pytest.param(
                "SpotMaxPriceTooLow",
                "Your Spot request price of 0.2 is lower than the minimum required Spot request fulfillment price of "
                "0.2500.",
                400,
                id="price",
            ),
        ],
    )
    def test_no_spot_room_fails_with_ec2s_error_and_on_demand_still_launches(
        self, ec2, fleet_env, template, spot_error, message, status
    ):
        fleet_env.set_faults({"spot_capacity": {"g6e.xlarge": 0}, "spot_error": spot_error})
        spot = {**SPOT, "SpotOptions": {**SPOT["SpotOptions"], "MaxPrice": "0.2"}}

        error = refused(lambda: launch(ec2, template, InstanceMarketOptions=spot))

        assert (error["Code"], error["Message"], error["status"]) == (spot_error, message, status)
        assert len(launch(ec2, template)) == 1  # the fallback to On-Demand

    def test_spot_from_the_template_meets_the_spot_fault(self, ec2, fleet_env, template):
        create_launch_template(fleet_env.endpoint_url, template, spot=True)
        fleet_env.set_faults({"spot_capacity": {"*": 0}})

        error = refused(lambda: launch(ec2, template))

        assert error["Message"] == "There is no Spot capacity available that matches your request."

    def test_a_type_without_capacity_fails_and_the_next_type_launches(self, ec2, fleet_env, template):
        fleet_env.set_faults({"capacity": {"g6e.12xlarge": 0}})

        error = refused(lambda: launch(ec2, template, InstanceType="g6e.12xlarge"))
        fallback = launch(ec2, template, InstanceType="g6e.24xlarge")

        assert (error["Code"], error["status"]) == ("InsufficientInstanceCapacity", 500)
        assert error["Message"].startswith(
            "We currently do not have sufficient g6e.12xlarge capacity in the Availability Zone you requested "
            "(us-east-1a)."
        )
        assert described(ec2, fallback)[fallback[0]]["InstanceType"] == "g6e.24xlarge"

    def test_min_count_is_all_or_nothing_and_max_count_takes_what_room_there_is(self, ec2, fleet_env, template):
        fleet_env.set_faults({"capacity": {"g6e.xlarge": 2}})
        token = uuid.uuid4().hex

        error = refused(lambda: launch(ec2, template, 3, TagSpecifications=run_tags(token)))
        nothing = ec2.describe_instances(Filters=[{"Name": f"tag:{RUN_TAG}", "Values": [token]}])["Reservations"]
        some = launch(ec2, template, 1, max_count=3, TagSpecifications=run_tags(token))
        room_used_up = refused(lambda: launch(ec2, template, 1))

        assert (error["Code"], nothing) == ("InsufficientInstanceCapacity", [])
        assert len(some) == 2
        assert room_used_up["Code"] == "InsufficientInstanceCapacity"

    def test_capacity_errors_are_server_errors_that_sdks_retry_and_the_call_log_records(self, fleet_env, template):
        two_attempts = Config(retries={"mode": "standard", "total_max_attempts": 2})
        retrying = boto_client("ec2", fleet_env.endpoint_url, two_attempts)
        fleet_env.set_faults({"capacity": {"g6e.48xlarge": 0}})
        fleet_env.reset_calls()

        refused(lambda: launch(retrying, template, InstanceType="g6e.48xlarge"))

        attempts = [c for c in fleet_env.calls() if c["action"] == "RunInstances"]
        assert [(c["service"], c["params"]["InstanceType"]) for c in attempts] == [("ec2", "g6e.48xlarge")] * 2

    @pytest.mark.parametrize(
        "faults",
        [{"capacity": {"g6e.xlarge": -1}}, {"spot_capacity": ["g6e.xlarge"]}, {"spot_error": "Gremlins"}],
        ids=["negative", "not-a-map", "unknown-error"],
    )
    def test_bad_capacity_settings_are_refused(self, fleet_env, faults):
        with pytest.raises(urllib.error.HTTPError, match="400"):
            fleet_env.set_faults(faults)


class TestTerminate:
    def test_shutting_down_then_terminated_the_agent_leaves_ssm_and_nothing_restarts_it(
        self, ec2, ssm, template, fleet_env
    ):
        (instance_id,) = launch(ec2, template)
        wait_online(ssm, [instance_id])
        fleet_env.reset_calls()

        answer = ec2.terminate_instances(InstanceIds=[instance_id])["TerminatingInstances"][0]
        shutting_down = states(ec2, [instance_id])
        terminated_by = time.time()
        wait_states(ec2, [instance_id], "terminated")

        assert (answer["CurrentState"]["Name"], shutting_down) == ("shutting-down", ["shutting-down"])
        assert ping_statuses(ssm, [instance_id]) == {}
        assert refused(lambda: send(ssm, instance_id, "true"))["Code"] == "InvalidInstanceId"
        assert refused(lambda: ec2.start_instances(InstanceIds=[instance_id]))["Code"] == "IncorrectInstanceState"
        assert refused(lambda: ec2.stop_instances(InstanceIds=[instance_id]))["Code"] == "IncorrectInstanceState"
        assert states(ec2, [instance_id]) == ["terminated"]
        ((started, ended),) = fleet_env.timeline()[instance_id]["running"]
        assert started < ended <= terminated_by
        first_call = fleet_env.calls()[0]
        assert (first_call["action"], first_call["params"]["InstanceId.1"]) == ("TerminateInstances", instance_id)

    def test_terminating_leaves_running_commands_in_progress_as_a_stop_does(self, ec2, ssm, template):
        (instance_id,) = launch(ec2, template)
        wait_online(ssm, [instance_id])
        command_id = send(ssm, instance_id, "sleep 30")
        time.sleep(1)

        ec2.terminate_instances(InstanceIds=[instance_id])
        ec2.get_waiter("instance_terminated").wait(InstanceIds=[instance_id], WaiterConfig={"Delay": 1})

        # No agent reports any more (test_emulator.py, TestEc2Lifecycle): SSM keeps it InProgress.
        assert ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)["Status"] == "InProgress"

    def test_a_fleet_still_pending_is_terminated_without_ever_running(self, ec2, template, fleet_env):
        fleet = launch(ec2, template, 3)

        answer = ec2.terminate_instances(InstanceIds=fleet)["TerminatingInstances"]
        wait_states(ec2, fleet, "terminated")
        time.sleep(1)  # past the pending time: the launch must not bring them up after all

        assert [i["PreviousState"]["Name"] for i in answer] == ["pending"] * 3
        assert states(ec2, fleet) == ["terminated"] * 3
        assert all(fleet_env.timeline().get(i, {}).get("running", []) == [] for i in fleet)


class TestSpotInterruptions:
    """EC2 warns a Spot instance two minutes before it takes it back ("Spot Instance interruption notices", Amazon EC2
    User Guide): `spot/instance-action` in its instance metadata, then shutting-down -> terminated with StateReason
    Server.SpotInstanceTermination. Shortened here by the fault's own settings."""

    IMDS_READ = (
        'token=$(curl -sf -X PUT "${AWS_EC2_METADATA_SERVICE_ENDPOINT}latest/api/token" '
        '-H "X-aws-ec2-metadata-token-ttl-seconds: 60") && '
        'curl -s -w " %{http_code}" -H "X-aws-ec2-metadata-token: $token" '
        '"${AWS_EC2_METADATA_SERVICE_ENDPOINT}latest/meta-data/spot/instance-action"'
    )

    def test_the_notice_is_in_the_instance_metadata_then_the_instance_is_terminated(
        self, ec2, ssm, template, fleet_env
    ):
        fleet_env.set_faults({"defaults": {"spot_interruption_seconds": 4, "spot_notice_seconds": 3}})
        (instance_id,) = launch(ec2, template, InstanceMarketOptions=SPOT)
        wait_online(ssm, [instance_id])

        before = wait_for_invocation(ssm, send(ssm, instance_id, self.IMDS_READ), instance_id)
        assert before["StandardOutputContent"].endswith(" 404"), before
        deadline = time.monotonic() + 20
        while True:  # the notice, read from the instance as a script on it would
            read = wait_for_invocation(ssm, send(ssm, instance_id, self.IMDS_READ), instance_id)
            if read["StandardOutputContent"].endswith(" 200"):
                break
            assert time.monotonic() < deadline, read
            time.sleep(0.5)
        notice = json.loads(read["StandardOutputContent"].rsplit(" ", 1)[0])
        assert notice["action"] == "terminate" and notice["time"].endswith("Z")
        assert states(ec2, [instance_id]) == ["running"]  # the notice comes first

        wait_states(ec2, [instance_id], "terminated", timeout=20)
        reason = described(ec2, [instance_id])[instance_id]["StateReason"]
        assert reason["Code"] == "Server.SpotInstanceTermination"

    def test_an_on_demand_instance_is_never_interrupted(self, ec2, ssm, template, fleet_env):
        fleet_env.set_faults({"defaults": {"spot_interruption_seconds": 1, "spot_notice_seconds": 1}})
        (instance_id,) = launch(ec2, template)
        wait_online(ssm, [instance_id])
        time.sleep(3)

        assert states(ec2, [instance_id]) == ["running"]
