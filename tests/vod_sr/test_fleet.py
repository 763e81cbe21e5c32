"""Fleets launched from a launch template (include/vod_sr/fleet.py), against the emulator over HTTP: its RunInstances
from templates, capacity faults by type and market, Spot, TerminateInstances. Two doubles are named as such: a client
that refuses one RunInstances with an error the emulator does not make (a permission missing, a throttle), wrapping
the real emulator client."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from include.local_aws.world import boto_client, create_launch_template
from include.vod_sr.fleet import (
    LAUNCHED_BY_TAG,
    MAX_FLEET_SIZE,
    RUN_TOKEN_TAG,
    FleetError,
    FleetRequest,
    LaunchOption,
    fleet_tags,
    launch_fleet,
    terminate_fleet,
)

NO_RETRIES = Config(retries={"total_max_attempts": 1})  # as fleet.launch_client: capacity errors are HTTP 500s
DAG_ID = "vod_sr_batch"


@pytest.fixture
def fleet_env(emulator_env):
    """The session's emulator; capacity limits lifted again afterwards."""
    yield emulator_env
    emulator_env.set_faults(
        {
            "capacity": {},
            "spot_capacity": {},
            "spot_error": "InsufficientInstanceCapacity",
            "defaults": {"launch_visibility_seconds": 0.0},
        }
    )


@pytest.fixture
def ec2(fleet_env):
    return boto_client("ec2", fleet_env.endpoint_url, NO_RETRIES)


@pytest.fixture
def template(fleet_env) -> str:
    """A fresh launch template (Bluewhale AMI, g6e.xlarge, the instance profile, On-Demand); its name."""
    name = f"bluewhale-{uuid.uuid4().hex[:8]}"
    create_launch_template(fleet_env.endpoint_url, name)
    return name


@pytest.fixture
def run() -> dict[str, str]:
    """A run's launch tags: a fresh run id and token, so the test finds its own instances."""
    token = uuid.uuid4().hex[:16]
    return fleet_tags(DAG_ID, f"manual__{token}", token)


def instances_of(ec2, tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The run's instances, by id, in any state."""
    found = ec2.describe_instances(Filters=[{"Name": f"tag:{RUN_TOKEN_TAG}", "Values": [tags[RUN_TOKEN_TAG]]}])
    return {i["InstanceId"]: i for r in found["Reservations"] for i in r["Instances"]}


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def launch_attempts(emulator) -> list[tuple[str, str]]:
    """Each RunInstances the emulator served: (instance type or "template", market)."""
    return [
        (
            call["params"].get("InstanceType", "template"),
            "Spot" if call["params"].get("InstanceMarketOptions.MarketType") == "spot" else "On-Demand",
        )
        for call in emulator.calls()
        if call["action"] == "RunInstances"
    ]


def wait_terminated(ec2, instance_ids: list[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = ec2.describe_instances(InstanceIds=instance_ids)["Reservations"]
        states = {i["State"]["Name"] for r in found for i in r["Instances"]}
        if states == {"terminated"}:
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.2)


class RefusingClient:
    """Double: the emulator's client, except that RunInstances calls matching `refuse` raise `error` (a code the
    emulator does not answer RunInstances with: a permission missing, a throttle), `times` times at most."""

    def __init__(self, real: Any, refuse, error: str, *, status: int = 400, times: int = 1_000) -> None:
        self.real, self.refuse, self.error, self.status, self.times = real, refuse, error, status, times
        self.run_instances_calls: list[dict[str, Any]] = []

    def run_instances(self, **kwargs: Any) -> dict[str, Any]:
        self.run_instances_calls.append(kwargs)
        if self.times and self.refuse(kwargs):
            self.times -= 1
            raise ClientError(
                {
                    "Error": {"Code": self.error, "Message": f"{self.error} (test double)"},
                    "ResponseMetadata": {"HTTPStatusCode": self.status},
                },
                "RunInstances",
            )
        return self.real.run_instances(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class TestFleetRequest:
    def test_options_go_spot_then_on_demand_for_each_type_in_turn(self):
        request = FleetRequest("t", 3, spot=True, instance_types=("g6e.xlarge", "g6e.2xlarge"))

        assert [str(o) for o in request.options()] == [
            "Spot g6e.xlarge",
            "On-Demand g6e.xlarge",
            "Spot g6e.2xlarge",
            "On-Demand g6e.2xlarge",
        ]

    def test_without_spot_or_types_the_template_type_on_demand_is_the_one_option(self):
        assert FleetRequest("t", 1).options() == [LaunchOption(None, spot=False)]

    @pytest.mark.parametrize(
        ("template", "spec"),
        [
            ("lt-0123456789abcdef0", {"LaunchTemplateId": "lt-0123456789abcdef0", "Version": "$Default"}),
            ("bluewhale-g6e", {"LaunchTemplateName": "bluewhale-g6e", "Version": "$Default"}),
        ],
        ids=["id", "name"],
    )
    def test_the_template_is_named_by_id_or_name(self, template, spec):
        assert FleetRequest(template, 1).template_spec == spec

    def test_problems_are_each_named(self):
        problems = FleetRequest("x", MAX_FLEET_SIZE + 1, version="v1", instance_types=("gpu",)).problems()

        assert len(problems) == 4
        assert "fleet_size 51 is outside 1..50" in problems[1]

    def test_launch_tags_name_the_dag_and_run_for_the_sweeper(self):
        tags = fleet_tags("vod_sr_nightly", "scheduled__2026-11-28T00:00:00+00:00", "0123456789abcdef")

        assert tags == {
            "vod-sr:launched-by": "vod_sr_nightly/scheduled__2026-11-28T00:00:00+00:00",
            "vod-sr:run-token": "0123456789abcdef",
            "Name": "vod-sr 0123456789abcdef",
        }

    def test_a_launched_by_value_over_ec2s_limit_is_refused_not_cut(self):
        with pytest.raises(ValueError, match="256"):
            fleet_tags("d" * 200, "r" * 60, "0123456789abcdef")


class TestLaunch:
    def test_three_instances_launch_with_the_runs_tags_on_instance_and_volume(self, ec2, fleet_env, template, run):
        fleet_env.reset_calls()

        launched = launch_fleet(ec2, FleetRequest(template, 3), run, client_token="vod-sr-test-1")

        found = instances_of(ec2, run)
        assert sorted(launched) == sorted(found) and len(launched) == 3
        assert launch_attempts(fleet_env) == [("template", "On-Demand")]  # one call: MaxCount 3
        for n, instance_id in enumerate(launched):
            tags = tags_of(found[instance_id])
            assert tags[LAUNCHED_BY_TAG] == f"{DAG_ID}/manual__{run[RUN_TOKEN_TAG]}"
            assert tags["Name"] == f"vod-sr {run[RUN_TOKEN_TAG]} {n}"
            assert found[instance_id]["InstanceType"] == "g6e.xlarge"  # the template's type
        volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": launched}])["Volumes"]
        assert len(volumes) == 3
        assert {tags_of(v)[LAUNCHED_BY_TAG] for v in volumes} == {run[LAUNCHED_BY_TAG]}

    def test_spot_is_asked_first(self, ec2, fleet_env, template, run):
        fleet_env.reset_calls()

        launched = launch_fleet(ec2, FleetRequest(template, 2, spot=True), run)

        assert launch_attempts(fleet_env) == [("template", "Spot")]
        assert {i["InstanceLifecycle"] for i in instances_of(ec2, run).values()} == {"spot"}
        assert len(launched) == 2

    @pytest.mark.parametrize(
        "spot_error", ["InsufficientInstanceCapacity", "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow"]
    )
    def test_no_spot_falls_back_to_on_demand_of_the_same_type(self, ec2, fleet_env, template, run, spot_error, caplog):
        fleet_env.set_faults({"spot_capacity": {"*": 0}, "spot_error": spot_error})
        fleet_env.reset_calls()

        with caplog.at_level(logging.WARNING, logger="include.vod_sr.fleet"):
            launched = launch_fleet(ec2, FleetRequest(template, 3, spot=True), run)

        assert launch_attempts(fleet_env) == [("template", "Spot"), ("template", "On-Demand")]
        assert len(launched) == 3
        assert all("InstanceLifecycle" not in i for i in instances_of(ec2, run).values())  # On-Demand
        assert f"No Spot (the template type) for this run: {spot_error}" in caplog.text

    def test_a_type_without_capacity_falls_through_spot_then_on_demand_to_the_next_type(
        self, ec2, fleet_env, template, run
    ):
        fleet_env.set_faults({"capacity": {"g6e.12xlarge": 0}, "spot_capacity": {"*": 0}})
        fleet_env.reset_calls()
        request = FleetRequest(template, 3, spot=True, instance_types=("g6e.12xlarge", "g6e.24xlarge"))

        launched = launch_fleet(ec2, request, run)

        assert launch_attempts(fleet_env) == [
            ("g6e.12xlarge", "Spot"),
            ("g6e.12xlarge", "On-Demand"),
            ("g6e.24xlarge", "Spot"),
            ("g6e.24xlarge", "On-Demand"),
        ]
        assert {i["InstanceType"] for i in instances_of(ec2, run).values()} == {"g6e.24xlarge"}
        assert len(launched) == 3

    def test_what_one_type_lacks_is_taken_from_the_next(self, ec2, fleet_env, template, run):
        fleet_env.set_faults({"capacity": {"g6e.xlarge": 2}})
        fleet_env.reset_calls()

        launched = launch_fleet(ec2, FleetRequest(template, 3, instance_types=("g6e.xlarge", "g6e.2xlarge")), run)

        found = instances_of(ec2, run)
        assert [found[i]["InstanceType"] for i in launched] == ["g6e.xlarge", "g6e.xlarge", "g6e.2xlarge"]
        assert [tags_of(found[i])["Name"].rsplit(" ", 1)[1] for i in launched] == ["0", "1", "2"]

    def test_fewer_than_asked_goes_on_with_what_launched_and_says_so(self, ec2, fleet_env, template, run, caplog):
        fleet_env.set_faults({"capacity": {"g6e.xlarge": 2}})

        with caplog.at_level(logging.WARNING, logger="include.vod_sr.fleet"):
            launched = launch_fleet(ec2, FleetRequest(template, 3), run)

        assert len(launched) == 2
        assert "Launched 2 of the 3 instance(s) asked for: EC2 had no more capacity" in caplog.text

    def test_no_capacity_anywhere_fails_naming_every_option_and_leaves_nothing(self, ec2, fleet_env, template, run):
        fleet_env.set_faults({"capacity": {"*": 0}, "spot_capacity": {"*": 0}})

        with pytest.raises(FleetError) as failure:
            launch_fleet(ec2, FleetRequest(template, 3, spot=True, instance_types=("g6e.xlarge", "g6e.2xlarge")), run)

        message = str(failure.value)
        assert message.startswith(f"no instance could be launched from launch template {template!r}")
        for option in ("Spot g6e.xlarge", "On-Demand g6e.xlarge", "Spot g6e.2xlarge", "On-Demand g6e.2xlarge"):
            assert f"{option}: InsufficientInstanceCapacity (HTTP 500)" in message
        assert instances_of(ec2, run) == {}

    def test_an_unknown_template_fails_at_once_saying_what_to_check(self, ec2, fleet_env, run):
        fleet_env.reset_calls()

        with pytest.raises(FleetError, match="InvalidLaunchTemplateName.NotFoundException") as failure:
            launch_fleet(ec2, FleetRequest("no-such-template", 2, instance_types=("g6e.xlarge", "g6e.2xlarge")), run)

        assert str(failure.value).endswith(
            "does not exist. Check launch_template / launch_template_version (VOD_SR_LAUNCH_TEMPLATE) and the "
            "connection's region"
        )
        assert len(launch_attempts(fleet_env)) == 1  # not tried again with the next type

    def test_a_permission_error_terminates_what_was_launched_and_names_the_policy(self, ec2, fleet_env, template, run):
        fleet_env.set_faults({"capacity": {"g6e.xlarge": 1}})
        refusing = RefusingClient(ec2, lambda call: call.get("InstanceType") == "g6e.2xlarge", "UnauthorizedOperation")
        request = FleetRequest(template, 3, instance_types=("g6e.xlarge", "g6e.2xlarge", "g6e.4xlarge"))

        with pytest.raises(FleetError) as failure:
            launch_fleet(refusing, request, run)

        (first,) = instances_of(ec2, run)
        message = str(failure.value)
        assert "RunInstances (On-Demand g6e.2xlarge)" in message and "UnauthorizedOperation" in message
        assert f"the 1 instance(s) it had launched were terminated: {first}" in message
        assert "iam/airflow-principal-policy.launch.json" in message
        assert len(refusing.run_instances_calls) == 2  # g6e.4xlarge never tried
        wait_terminated(ec2, [first])

    def test_a_launch_interrupted_by_the_tasks_end_terminates_what_it_launched(self, ec2, fleet_env, template, run):
        fleet_env.set_faults({"capacity": {"g6e.xlarge": 1}})

        class Killed(BaseException):  # as the task runner's SIGTERM handling raises while a call is in flight
            pass

        class KilledClient(RefusingClient):
            def run_instances(self, **kwargs: Any) -> dict[str, Any]:
                if kwargs.get("InstanceType") == "g6e.2xlarge":
                    raise Killed()
                return self.real.run_instances(**kwargs)

        with pytest.raises(Killed):
            launch_fleet(
                KilledClient(ec2, None, ""),
                FleetRequest(template, 2, instance_types=("g6e.xlarge", "g6e.2xlarge")),
                run,
            )

        wait_terminated(ec2, list(instances_of(ec2, run)))

    def test_a_throttled_launch_is_retried_with_the_same_client_token(self, ec2, fleet_env, template, run):
        throttled = RefusingClient(ec2, lambda call: True, "RequestLimitExceeded", status=503, times=1)
        slept: list[float] = []

        launched = launch_fleet(
            throttled, FleetRequest(template, 2), run, client_token="vod-sr-t-1", sleep=slept.append
        )

        assert len(launched) == 2 and len(slept) == 1
        assert [c["ClientToken"] for c in throttled.run_instances_calls] == ["vod-sr-t-1-0", "vod-sr-t-1-0"]
        assert len(instances_of(ec2, run)) == 2


class TestEventualConsistency:
    """Right after RunInstances, EC2 may answer InvalidInstanceID.NotFound for the new ids (EC2 Developer Guide,
    "Eventual consistency in the Amazon EC2 API"); the emulator does so for `launch_visibility_seconds`."""

    def test_the_emulator_does_not_know_a_new_id_for_a_while_by_id_but_a_filter_finds_nothing_amiss(
        self, ec2, fleet_env, template
    ):
        fleet_env.set_faults({"defaults": {"launch_visibility_seconds": 1.5}})
        (instance,) = ec2.run_instances(LaunchTemplate={"LaunchTemplateName": template}, MinCount=1, MaxCount=1)[
            "Instances"
        ]
        instance_id = instance["InstanceId"]

        with pytest.raises(ClientError, match="InvalidInstanceID.NotFound"):
            ec2.describe_instances(InstanceIds=[instance_id])
        with pytest.raises(ClientError, match="InvalidInstanceID.NotFound"):
            ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "Name", "Value": "x"}])
        ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": [instance_id]}])  # no error by filter
        time.sleep(1.6)
        assert ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        ec2.terminate_instances(InstanceIds=[instance_id])

    def test_a_launch_waits_until_ec2_knows_its_instances_then_names_them(self, ec2, fleet_env, template, run):
        fleet_env.set_faults({"defaults": {"launch_visibility_seconds": 1.5}})

        launched = launch_fleet(ec2, FleetRequest(template, 2), run, client_token="vod-sr-visible-1")

        # Named "<base> <n>" (not only the launch tag's base name): the CreateTags came once EC2 knew the ids.
        found = instances_of(ec2, run)
        assert sorted(tags_of(found[i])["Name"] for i in launched) == [
            f"vod-sr {run[RUN_TOKEN_TAG]} {n}" for n in (0, 1)
        ]
        assert {found[i]["State"]["Name"] for i in launched} <= {"pending", "running"}
        terminate_fleet(ec2, launched)


class TestTerminate:
    def test_terminate_fleet_terminates_every_instance(self, ec2, template, run):
        launched = launch_fleet(ec2, FleetRequest(template, 3), run)

        assert terminate_fleet(ec2, launched) == launched
        wait_terminated(ec2, launched)

    def test_a_refused_termination_is_raised_after_trying(self, ec2, template, run):
        launched = launch_fleet(ec2, FleetRequest(template, 1), run)

        with pytest.raises(ClientError, match="InvalidInstanceID"):
            terminate_fleet(ec2, ["i-0000000000000dead"])
        terminate_fleet(ec2, launched)


class TestDeploymentDefaults:
    """VOD_SR_* settings for fleets (include/vod_sr/settings.py), read at DAG parse time."""

    @pytest.fixture(autouse=True)
    def clean_env(self, monkeypatch):
        for name in (
            "VOD_SR_INSTANCE_IDS",
            "VOD_SR_INSTANCE_ID",
            "VOD_SR_LAUNCH_TEMPLATE",
            "VOD_SR_LAUNCH_TEMPLATE_VERSION",
            "VOD_SR_FLEET_SIZE",
            "VOD_SR_SPOT",
            "VOD_SR_FLEET_INSTANCE_TYPES",
        ):
            monkeypatch.delenv(name, raising=False)

    def test_a_nightly_fleet_from_the_environment(self, monkeypatch):
        from include.vod_sr.settings import Settings

        monkeypatch.setenv("VOD_SR_LAUNCH_TEMPLATE", "bluewhale-g6e")
        monkeypatch.setenv("VOD_SR_FLEET_SIZE", "4")
        monkeypatch.setenv("VOD_SR_SPOT", "true")
        monkeypatch.setenv("VOD_SR_FLEET_INSTANCE_TYPES", "g6e.xlarge, g6e.2xlarge")

        settings = Settings.from_env()

        assert (settings.launch_template, settings.launch_template_version, settings.fleet_size) == (
            "bluewhale-g6e",
            "$Default",
            4,
        )
        assert (settings.spot, settings.fleet_instance_types) == (True, ("g6e.xlarge", "g6e.2xlarge"))

    def test_no_fleet_by_default(self):
        from include.vod_sr.settings import Settings

        assert (Settings.from_env().fleet_size, Settings.from_env().launch_template) == (0, "")

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            pytest.param({"VOD_SR_FLEET_SIZE": "3"}, "VOD_SR_LAUNCH_TEMPLATE is not", id="no-template"),
            pytest.param(
                {
                    "VOD_SR_FLEET_SIZE": "3",
                    "VOD_SR_LAUNCH_TEMPLATE": "t-1",
                    "VOD_SR_INSTANCE_IDS": "i-0123456789abcdef0",
                },
                "either a fleet or named instances",
                id="both",
            ),
            pytest.param({"VOD_SR_FLEET_SIZE": "51", "VOD_SR_LAUNCH_TEMPLATE": "t-1"}, "over 50", id="too-many"),
            pytest.param({"VOD_SR_FLEET_SIZE": "three"}, "not a whole number", id="not-a-number"),
        ],
    )
    def test_a_default_fleet_that_cannot_work_fails_at_parse_time(self, monkeypatch, env, message):
        from include.vod_sr.settings import Settings

        for name, value in env.items():
            monkeypatch.setenv(name, value)

        with pytest.raises(ValueError, match=message):
            Settings.from_env()
