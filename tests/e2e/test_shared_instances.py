"""An instance shared by several runs, and starts that go wrong, end to end: dag.test() + the emulator + the real
AWS CLI and ffmpeg on the "instance" (issue 8, points 4, 5 and 6).

The other run is played by the test: its lease is an EC2 tag, its release a StopInstances at the worst moment.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from include.local_aws.world import OUTPUT_BUCKET, make_sample_clip
from include.vod_sr.report import REPORT_PREFIX

pytestmark = pytest.mark.e2e

LEASE = "vod-sr:lease:"


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """A 2 s clip: these tests are about the instance, not the video, so each file should cost little GPU time."""
    return make_sample_clip(tmp_path_factory.mktemp("short") / "short.mp4", seconds=2, size="320x240")


def upload(world, short_clip, count: int) -> list[str]:
    keys = [f"shared/{n}.mp4" for n in range(count)]
    for key in keys:
        world.upload(key, short_clip)
    return keys


def task_log(caplog, capfd) -> str:
    captured = capfd.readouterr()
    return caplog.text + captured.out + captured.err


def lease_tags(world) -> dict[str, str]:
    tags = world.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [world.instance_id]}])["Tags"]
    return {tag["Key"]: tag["Value"] for tag in tags if tag["Key"].startswith(LEASE)}


def stored_report(world) -> dict[str, Any]:
    (item,) = world.s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=REPORT_PREFIX)["Contents"]
    return json.loads(world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=item["Key"])["Body"].read())


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def calls(world, action: str) -> list[dict[str, Any]]:
    return [call for call in world.emulator.calls() if call["action"] == action]


def in_background(until: Callable[[], bool], then: Callable[[], None], timeout: float = 120) -> threading.Thread:
    """Run `then` once `until()` holds (polled every 0.1 s), in a thread, as another actor would."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until():
                then()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, name="other-actor", daemon=True)
    thread.start()
    return thread


def try_numbers(run, task_id: str) -> list[int]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id="vod_sr_batch", run_id=run.run_id, task_id=task_id).all()
        return [ti.try_number for ti in tis]


class TestLeases:
    """Point 4: leases clean up after themselves, a working run refreshes its own, the log names the one that
    keeps an instance up."""

    def test_expired_lease_deleted_own_lease_refreshed_and_the_other_runs_lease_named(
        self, world, short_clip, caplog, capfd
    ):
        keys = upload(world, short_clip, 4)  # one chunk more than run_chunks sends at once (three per GPU slot)
        world.ec2.create_tags(
            Resources=[world.instance_id],
            Tags=[
                {"Key": f"{LEASE}crashed", "Value": "2020-01-01T00:00:00Z manual__crashed_long_ago"},
                {"Key": f"{LEASE}other-run", "Value": f"{now_text()} manual__other"},
            ],
        )

        run = world.run(sources=keys, chunk_size=1)

        assert run.state == "success", run.task_states
        assert set(lease_tags(world)) == {f"{LEASE}other-run"}  # the expired one deleted, ours released
        log = task_log(caplog, capfd)
        assert "Deleting the expired lease crashed held by manual__crashed_long_ago" in log
        # The other run's lease keeps the instance up, and the log says which lease, whose, and how old.
        assert world.instance_state() == "running"
        assert "left running: lease other-run held by manual__other, taken or refreshed" in log
        # Refreshed while the run works: a CreateTags after chunks were already sent (4 chunks, 3 in flight).
        sends = [call["time"] for call in calls(world, "SendCommand")]
        assert any(call["time"] > sends[1] for call in calls(world, "CreateTags")), "lease never refreshed mid-run"


def start_and_wait_online(world) -> None:
    """Start the world's instance as another run would have, and wait until its agent is Online."""
    from include.local_aws.world import boto_client

    ssm = boto_client("ssm", world.emulator.endpoint_url)
    world.ec2.start_instances(InstanceIds=[world.instance_id])
    # Running first, then an Online from this boot: the world's instance was launched and stopped, and SSM shows
    # that boot's stale Online for a while (EC2 refuses to stop an instance still pending).
    world.ec2.get_waiter("instance_running").wait(InstanceIds=[world.instance_id], WaiterConfig={"Delay": 0.5})
    launched = world.ec2.describe_instances(InstanceIds=[world.instance_id])["Reservations"][0]["Instances"][0][
        "LaunchTime"
    ]
    deadline = time.monotonic() + 60
    while not any(
        item["PingStatus"] == "Online" and item["LastPingDateTime"] >= launched
        for item in ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [world.instance_id]}])[
            "InstanceInformationList"
        ]
    ):
        assert time.monotonic() < deadline, "the agent never came Online"
        time.sleep(0.2)


class TestStopRaces:
    """Point 5: an instance stopped under a run is started again; only vod-sr's commands keep it up; the report
    says when and why an instance was left running."""

    def test_run_b_starts_its_instance_again_after_run_a_stopped_it_under_b_and_finishes(
        self, world, short_clip, caplog, capfd
    ):
        keys = upload(world, short_clip, 1)
        # Slow registration, so B is still waiting for the agent when A's stop lands.
        world.emulator.set_faults({"instances": {world.instance_id: {"agent_registration_seconds": 4}}})
        world.ec2.start_instances(InstanceIds=[world.instance_id])  # still running for run A
        world.emulator.reset_calls()

        def b_acquired_a_running_instance() -> bool:
            actions = [call["action"] for call in world.emulator.calls()]
            leased = "CreateTags" in actions and "DescribeInstances" in actions[actions.index("CreateTags") :]
            return leased and world.instance_state() == "running"

        # Run A's release saw no other lease a moment ago: it stops the instance right after B's acquire saw it up.
        run_a = in_background(
            b_acquired_a_running_instance, lambda: world.ec2.stop_instances(InstanceIds=[world.instance_id])
        )
        run = world.run(sources=keys)
        run_a.join(timeout=1)

        assert run.state == "success", run.task_states
        # A's stop, then B's own at the end; one start, B's, once A's stop had landed (its acquire found it running).
        assert len(calls(world, "StopInstances")) >= 2
        assert len(calls(world, "StartInstances")) == 1
        assert stored_report(world)["counts"] == {"ok": 1}
        log = task_log(caplog, capfd)
        assert "was stopped under this run, which holds lease" in log or "is stopping under this run" in log
        assert world.instance_state() == "stopped"

    def test_a_foreign_live_command_does_not_keep_the_instance_running(self, world, short_clip, caplog, capfd):
        from include.local_aws.world import boto_client

        keys = upload(world, short_clip, 1)
        start_and_wait_online(world)
        ssm = boto_client("ssm", world.emulator.endpoint_url)
        patching = ssm.send_command(
            InstanceIds=[world.instance_id],
            DocumentName="AWS-RunShellScript",
            Comment="Patch Manager: AWS-RunPatchBaseline",
            Parameters={"commands": ["sleep 600"]},
        )["Command"]["CommandId"]

        run = world.run(sources=keys)

        assert run.state == "success", run.task_states
        assert world.instance_state() == "stopped"
        assert stored_report(world)["instances_left_running"] == {}
        invocation = ssm.get_command_invocation(CommandId=patching, InstanceId=world.instance_id)
        # The stop killed it; nothing reports that, so SSM keeps it InProgress until it expires.
        assert invocation["Status"] == "InProgress"
        assert f"Not vod-sr's, so it does not keep the instance up (the stop ends it): command {patching}" in (
            task_log(caplog, capfd)
        )

    def test_the_report_says_when_and_why_an_instance_was_left_running(self, world, short_clip, caplog, capfd):
        keys = upload(world, short_clip, 1)

        run = world.run(sources=keys, stop_when_done=False)

        assert run.state == "success", run.task_states
        assert world.instance_state() == "running"
        reason = "left running (stop_when_done is off)"
        assert stored_report(world)["instances_left_running"] == {world.instance_id: reason}
        assert f"instance {world.instance_id} {reason}" in task_log(caplog, capfd)  # the report's table
        world.ec2.stop_instances(InstanceIds=[world.instance_id])


class TestStartsAndReadiness:
    """Point 6: a stale Online is not ready, EC2's StateReason decides after a failed start, and errors no retry
    fixes fail at once."""

    def test_a_stale_online_right_after_a_quick_stop_start_is_not_taken_as_ready(
        self, world, short_clip, caplog, capfd
    ):
        keys = upload(world, short_clip, 1)
        registration = 8
        world.emulator.set_faults(
            {
                "instances": {
                    world.instance_id: {
                        "stale_online_seconds": 120,  # AWS shows the stale Online for minutes
                        "agent_registration_seconds": registration,
                        "stopping_seconds": 1.5,
                    }
                }
            }
        )
        start_and_wait_online(world)
        world.ec2.stop_instances(InstanceIds=[world.instance_id])  # the quick stop/start: the run starts it again
        world.emulator.reset_calls()

        with caplog.at_level("INFO", logger="include.vod_sr.instance"):
            run = world.run(sources=keys)

        assert run.state == "success", run.task_states
        boot = world.emulator.timeline()[world.instance_id]["running"][-1][0]  # when the run's start got running
        first_send = calls(world, "SendCommand")[0]["time"]
        # Nothing is sent before this boot's agent checked in, although SSM said Online all along.
        assert first_send >= boot + registration - 0.5, (first_send - boot, run.task_states)
        assert "a stale Online from the previous boot" in task_log(caplog, capfd)

    def test_a_start_that_goes_pending_then_stopped_for_capacity_is_retried_and_the_run_succeeds(
        self, world, short_clip, caplog, capfd
    ):
        keys = upload(world, short_clip, 1)
        world.emulator.set_faults(
            {
                "instances": {
                    world.instance_id: {
                        "failed_starts": 1,
                        "failed_start_reason": "Server.InsufficientInstanceCapacity",
                    }
                }
            }
        )

        run = world.run(sources=keys)

        assert run.state == "success", run.task_states
        assert len(calls(world, "StartInstances")) == 2
        log = task_log(caplog, capfd)
        assert "EC2 could not start" in log and "Insufficient capacity to satisfy instance request" in log
        assert world.instance_state() == "stopped"

    def test_a_start_that_goes_pending_then_stopped_for_a_kms_grant_fails_at_once_with_ec2s_message(
        self, world, short_clip, caplog, capfd
    ):
        keys = upload(world, short_clip, 1)
        world.emulator.set_faults(
            {"instances": {world.instance_id: {"failed_starts": 5, "failed_start_reason": "Client.InternalError"}}}
        )

        run = world.run(sources=keys)

        assert run.state == "failed"
        assert run.task_states["lane.wait_for_agent"] == ["failed"]
        assert try_numbers(run, "lane.wait_for_agent") == [1]  # not retried: it would fail the same way
        assert (
            f"instance {world.instance_id} could not start: EC2 says Client.InternalError: Client error on launch"
            in (task_log(caplog, capfd))
        )
        assert len(calls(world, "StartInstances")) == 1
        assert run.task_states["lane.release"] == ["success"]
        assert world.instance_state() == "stopped"

    def test_an_unauthorized_start_fails_acquire_at_its_first_try(self, world, short_clip, caplog, capfd):
        keys = upload(world, short_clip, 1)
        world.emulator.set_faults(
            {
                "instances": {
                    world.instance_id: {"denied_actions": ["StartInstances"], "denied_error": "UnauthorizedOperation"}
                }
            }
        )

        run = world.run(sources=keys)

        assert run.state == "failed"
        assert run.task_states["lane.acquire"] == ["failed"]
        assert try_numbers(run, "lane.acquire") == [1]  # acquire has retries=4 with backoff: none is used
        log = task_log(caplog, capfd)
        assert f"StartInstances for instance {world.instance_id} was refused with UnauthorizedOperation" in log
        assert "No retry can fix this" in log
        assert len(calls(world, "StartInstances")) == 1
        assert lease_tags(world) == {}  # acquire dropped its lease
        assert world.instance_state() == "stopped"

    def test_an_unknown_instance_fails_acquire_at_its_first_try(self, world, short_clip, caplog, capfd):
        keys = upload(world, short_clip, 1)

        run = world.run(sources=keys, instance_ids=["i-0123456789abcdef0"])

        assert run.state == "failed"
        assert try_numbers(run, "lane.acquire") == [1]
        log = task_log(caplog, capfd)
        assert "CreateTags for instance i-0123456789abcdef0 was refused with InvalidInstanceID.NotFound" in log
        assert "check the instance id" in log
