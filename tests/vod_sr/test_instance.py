"""Instance handling against moto's EC2. moto 5.2.5 has no DescribeInstanceInformation and no live SSM commands,
so those come from `StubSsm`, a small explicit stub; tests/local_aws and tests/e2e cover them on the emulator."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from include.local_aws.world import boto_client
from include.vod_sr.instance import (
    LEASE_TTL,
    Action,
    InstanceCapacityError,
    InstanceUnusable,
    acquire_instance,
    agent_online,
    command_comment,
    drop_lease,
    ensure_started,
    instance_action,
    instance_state,
    is_ready,
    leases,
    live_leases,
    refresh_lease,
    release,
    release_record,
    take_lease,
    unfixable_error_code,
)


class StubSsm:
    """Stub for the SSM calls moto lacks: DescribeInstanceInformation, and ListCommands with live commands.

    `ping` maps an instance to its PingStatus, with LastPingDateTime now, or to (PingStatus, LastPingDateTime)."""

    def __init__(
        self,
        ping: dict[str, str | tuple[str, datetime | None]] | None = None,
        commands: list[dict] | None = None,
        failing_cancels: tuple[str, ...] = (),
    ) -> None:
        self.ping = {i: p if isinstance(p, tuple) else (p, datetime.now(UTC)) for i, p in (ping or {}).items()}
        self.commands = commands or []
        self.failing_cancels = failing_cancels
        self.cancelled: list[str] = []

    def cancel_command(self, CommandId, InstanceIds):
        if CommandId in self.failing_cancels:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "CancelCommand")
        self.cancelled.append(CommandId)

    def describe_instance_information(self, Filters):
        wanted = Filters[0]["Values"]
        items = []
        for instance_id, (status, last_ping) in self.ping.items():
            if instance_id in wanted:
                items.append({"InstanceId": instance_id, "PingStatus": status})
                if last_ping is not None:
                    items[-1]["LastPingDateTime"] = last_ping
        return {"InstanceInformationList": items}

    def get_paginator(self, name):
        assert name == "list_commands"
        return self

    def paginate(self, InstanceId, Filters):
        return [{"Commands": [c for c in self.commands if InstanceId in c["InstanceIds"]]}]


@pytest.fixture
def ec2():
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-1")


def new_instance(ec2, state: str = "running") -> str:
    instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    if state == "stopped":
        ec2.stop_instances(InstanceIds=[instance_id])
    elif state == "terminated":
        ec2.terminate_instances(InstanceIds=[instance_id])
    return instance_id


class TestInstanceAction:
    @pytest.mark.parametrize(
        ("state", "action"),
        [
            ("running", Action.USE),
            ("stopped", Action.START),
            ("pending", Action.WAIT_RUNNING),
            ("stopping", Action.WAIT_STOPPED_THEN_START),
        ],
    )
    def test_usable_states(self, state, action):
        assert instance_action(state) is action

    @pytest.mark.parametrize("state", ["terminated", "shutting-down", "rebooting-into-the-void"])
    def test_unusable_states_are_clear_errors(self, state):
        with pytest.raises(InstanceUnusable, match=f"instance is {state}; it cannot be started"):
            instance_action(state)


class TestEnsureStarted:
    def test_stopped_instance_is_started(self, ec2):
        instance_id = new_instance(ec2, "stopped")

        assert ensure_started(ec2, instance_id, timeout=10, poll_interval=1) == "stopped"
        assert instance_state(ec2, instance_id) in ("pending", "running")

    def test_running_instance_is_used_as_is(self, ec2):
        instance_id = new_instance(ec2)

        assert ensure_started(ec2, instance_id, timeout=10, poll_interval=1) == "running"

    def test_terminated_instance_is_a_clear_error(self, ec2):
        instance_id = new_instance(ec2, "terminated")

        with pytest.raises(InstanceUnusable, match="instance is terminated"):
            ensure_started(ec2, instance_id, timeout=10, poll_interval=1)

    def test_unknown_instance_is_a_clear_error(self, ec2):
        with pytest.raises(InstanceUnusable, match="i-0000000000000dead does not exist"):
            ensure_started(ec2, "i-0000000000000dead", timeout=10, poll_interval=1)

    def test_stopping_instance_is_waited_for_then_started(self, ec2):
        instance_id = new_instance(ec2, "stopped")
        calls = []
        ec2.meta.events.register("before-call.ec2", lambda model, **_: calls.append(model.name))
        states = iter(["stopping", "stopping", "stopped"])
        # moto stops instantly; make DescribeInstances report `stopping` twice, as AWS does for a while.
        ec2.meta.events.register(
            "after-call.ec2.DescribeInstances",
            lambda parsed, **_: parsed["Reservations"][0]["Instances"][0]["State"].update(Name=next(states, "stopped")),
        )

        ensure_started(ec2, instance_id, timeout=10, poll_interval=1)

        assert calls == ["DescribeInstances", "DescribeInstances", "DescribeInstances", "StartInstances"]

    def test_insufficient_capacity_is_its_own_error(self, ec2):
        instance_id = new_instance(ec2, "stopped")

        def no_capacity(**_):
            raise ClientError(
                {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no g6e.xlarge capacity"}},
                "StartInstances",
            )

        ec2.meta.events.register("before-call.ec2.StartInstances", no_capacity)

        with pytest.raises(InstanceCapacityError, match="no g6e.xlarge capacity"):
            ensure_started(ec2, instance_id, timeout=10, poll_interval=1)


def ready(ec2, ssm, instance_id: str) -> bool:
    return is_ready(ec2, ssm, instance_id, lease_id="run-b", holder="manual__b")


def report_state(ec2, name: str, times: int = 1) -> None:
    """Make DescribeInstances report `name` for the next `times` calls (moto flips states instantly)."""
    states = iter([name] * times)

    def rewrite(parsed, **_):
        if (state := next(states, None)) is not None:
            parsed["Reservations"][0]["Instances"][0]["State"]["Name"] = state

    ec2.meta.events.register("after-call.ec2.DescribeInstances", rewrite)


def ec2_calls(ec2) -> list[str]:
    calls: list[str] = []
    ec2.meta.events.register("before-call.ec2", lambda model, **_: calls.append(model.name))
    return calls


class TestReadiness:
    def test_running_is_not_ready_until_the_agent_is_online(self, ec2):
        instance_id = new_instance(ec2)

        assert not ready(ec2, StubSsm({}), instance_id)
        assert not ready(ec2, StubSsm({instance_id: "ConnectionLost"}), instance_id)
        assert ready(ec2, StubSsm({instance_id: "Online"}), instance_id)

    def test_other_instances_being_online_does_not_count(self):
        assert not agent_online(StubSsm({"i-other": "Online"}), "i-mine")

    @pytest.mark.parametrize("state", ["terminated", "shutting-down"])
    def test_an_instance_going_away_is_an_error(self, ec2, state):
        instance_id = new_instance(ec2)
        report_state(ec2, state)

        with pytest.raises(InstanceUnusable, match=f"went {state} while waiting"):
            ready(ec2, StubSsm({instance_id: "Online"}), instance_id)


class TestStoppedUnderTheRun:
    """Another run's release stopped the instance just after this run's acquire saw it running (issue 8, point 5)."""

    def test_a_stopped_instance_is_started_again_under_the_runs_lease(self, ec2, caplog):
        instance_id = new_instance(ec2, "stopped")
        calls = ec2_calls(ec2)

        assert not ready(ec2, StubSsm({instance_id: "Online"}), instance_id)

        assert "StartInstances" in calls
        assert instance_state(ec2, instance_id) in ("pending", "running")
        assert live_leases(ec2, instance_id) == {"run-b": "manual__b"}  # re-taken in case it was dropped
        assert (
            "was stopped under this run, which holds lease run-b (Client.UserInitiatedShutdown: User initiated "
            "shutdown): starting it again" in caplog.text
        )

    def test_a_stopping_instance_is_waited_for_not_started_yet(self, ec2, caplog):
        instance_id = new_instance(ec2)
        report_state(ec2, "stopping")
        calls = ec2_calls(ec2)

        assert not ready(ec2, StubSsm({instance_id: "Online"}), instance_id)

        assert "StartInstances" not in calls  # EC2 refuses to start a stopping instance
        assert "is stopping under this run, which holds lease run-b" in caplog.text

    def test_no_capacity_for_the_restart_is_tried_again_at_the_next_check(self, ec2, caplog):
        instance_id = new_instance(ec2, "stopped")

        def no_capacity(**_):
            raise ClientError(
                {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no g6e.xlarge capacity"}},
                "StartInstances",
            )

        ec2.meta.events.register("before-call.ec2.StartInstances", no_capacity)

        assert not ready(ec2, StubSsm({instance_id: "Online"}), instance_id)
        assert "no g6e.xlarge capacity; trying again at the next check" in caplog.text


def launch_time(ec2, instance_id: str) -> datetime:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["LaunchTime"]


def report_state_reason(ec2, code: str, message: str) -> None:
    """Make DescribeInstances report this StateReason, as after a start that went pending -> stopped."""

    def rewrite(parsed, **_):
        parsed["Reservations"][0]["Instances"][0]["StateReason"] = {"Code": code, "Message": message}

    ec2.meta.events.register("after-call.ec2.DescribeInstances", rewrite)


def refuse(ec2, operation: str, code: str, message: str = "You are not authorized to perform this operation.") -> None:
    def refused(**_):
        raise ClientError({"Error": {"Code": code, "Message": message}}, operation)

    ec2.meta.events.register(f"before-call.ec2.{operation}", refused)


class TestStaleOnline:
    """PingStatus Online counts only with a last ping from this boot (issue 8, point 6)."""

    def test_online_from_before_the_launch_is_not_ready(self, ec2, caplog):
        instance_id = new_instance(ec2)
        before_launch = launch_time(ec2, instance_id) - timedelta(minutes=3)

        with caplog.at_level("INFO", logger="include.vod_sr.instance"):
            assert not ready(ec2, StubSsm({instance_id: ("Online", before_launch)}), instance_id)
        assert "a stale Online from the previous boot" in caplog.text

    def test_online_with_a_ping_since_the_launch_is_ready(self, ec2):
        instance_id = new_instance(ec2)
        after_launch = launch_time(ec2, instance_id) + timedelta(seconds=40)

        assert ready(ec2, StubSsm({instance_id: ("Online", after_launch)}), instance_id)

    def test_online_without_a_last_ping_is_not_trusted(self, ec2):
        instance_id = new_instance(ec2)

        assert not ready(ec2, StubSsm({instance_id: ("Online", None)}), instance_id)


class TestStartsThatGoPendingThenStopped:
    """EC2's StateReason decides: capacity is tried again, a launch error fails at once (issue 8, point 6)."""

    def test_a_capacity_reason_is_started_again(self, ec2, caplog):
        instance_id = new_instance(ec2, "stopped")
        report_state_reason(
            ec2,
            "Server.InsufficientInstanceCapacity",
            "Server.InsufficientInstanceCapacity: Insufficient capacity to satisfy instance request",
        )
        calls = ec2_calls(ec2)

        assert not ready(ec2, StubSsm(), instance_id)

        assert "StartInstances" in calls
        assert (
            "EC2 could not start" in caplog.text and "Insufficient capacity to satisfy instance request" in caplog.text
        )

    @pytest.mark.parametrize(
        ("code", "message"),
        [
            ("Client.InternalError", "Client.InternalError: Client error on launch"),
            ("Client.InvalidKMSKey.InvalidState", "Client.InvalidKMSKey.InvalidState: The KMS key provided is in an i"),
            ("Client.VolumeLimitExceeded", "Client.VolumeLimitExceeded: Volume limit exceeded"),
        ],
    )
    def test_a_launch_error_fails_at_once_with_ec2s_message(self, ec2, code, message):
        instance_id = new_instance(ec2, "stopped")
        report_state_reason(ec2, code, message)
        calls = ec2_calls(ec2)

        with pytest.raises(InstanceUnusable, match=f"could not start: EC2 says {message}"):
            ready(ec2, StubSsm(), instance_id)

        assert "StartInstances" not in calls  # it would fail the same way

    def test_the_kms_case_says_what_to_check(self, ec2):
        instance_id = new_instance(ec2, "stopped")
        report_state_reason(ec2, "Client.InternalError", "Client.InternalError: Client error on launch")

        with pytest.raises(InstanceUnusable, match="EC2 cannot use the volume's KMS key"):
            ready(ec2, StubSsm(), instance_id)


class TestErrorsNoRetryFixes:
    """AccessDenied, UnauthorizedOperation, an unknown instance: fail at once, naming the error (issue 8, point 6)."""

    @pytest.mark.parametrize(
        "code",
        [
            "AccessDenied",
            "AccessDeniedException",
            "UnauthorizedOperation",
            "AuthFailure",
            "InvalidInstanceID.NotFound",
            "InvalidInstanceID.Malformed",
            "InvalidInstanceId",
            "ExpiredToken",
            "UnrecognizedClientException",
        ],
    )
    def test_unfixable(self, code):
        assert unfixable_error_code(ClientError({"Error": {"Code": code}}, "StartInstances")) == code

    @pytest.mark.parametrize(
        "code",
        [
            "InsufficientInstanceCapacity",
            "IncorrectInstanceState",
            "RequestLimitExceeded",
            "InternalError",
            "Throttling",
        ],
    )
    def test_retryable(self, code):
        assert unfixable_error_code(ClientError({"Error": {"Code": code}}, "StartInstances")) is None

    def test_an_unauthorized_start_fails_naming_the_error_and_drops_the_lease(self, ec2):
        instance_id = new_instance(ec2, "stopped")
        refuse(ec2, "StartInstances", "UnauthorizedOperation")

        with pytest.raises(InstanceUnusable) as refused:
            acquire_instance(ec2, instance_id, "run-a", "manual__a", timeout=10, poll_interval=1)

        assert str(refused.value).startswith(
            f"StartInstances for instance {instance_id} was refused with UnauthorizedOperation: You are not authorized"
        )
        assert "No retry can fix this" in str(refused.value) and "iam/airflow-principal-policy.json" in str(
            refused.value
        )
        assert live_leases(ec2, instance_id) == {}

    @pytest.mark.parametrize("operation", ["CreateTags", "DescribeTags", "DescribeInstances"])
    def test_access_denied_on_any_call_of_acquire_fails_at_once(self, ec2, operation):
        instance_id = new_instance(ec2, "stopped")
        refuse(ec2, operation, "AccessDenied", "User is not authorized")

        with pytest.raises(
            InstanceUnusable, match=f"{operation} for instance {instance_id} was refused with AccessDenied"
        ):
            acquire_instance(ec2, instance_id, "run-a", "manual__a", timeout=10, poll_interval=1)

    def test_an_unknown_instance_says_to_check_the_id(self, ec2):
        instance_id = new_instance(ec2)
        refuse(ec2, "CreateTags", "InvalidInstanceID.NotFound", "The instance ID 'i-0dead' does not exist")

        with pytest.raises(InstanceUnusable, match="No retry can fix this: check the instance id"):
            acquire_instance(ec2, instance_id, "run-a", "manual__a", timeout=10, poll_interval=1)

    def test_capacity_on_acquire_stays_retryable_and_drops_the_lease(self, ec2):
        instance_id = new_instance(ec2, "stopped")
        refuse(ec2, "StartInstances", "InsufficientInstanceCapacity", "no g6e.xlarge capacity")

        with pytest.raises(InstanceCapacityError):
            acquire_instance(ec2, instance_id, "run-a", "manual__a", timeout=10, poll_interval=1)

        assert live_leases(ec2, instance_id) == {}

    def test_a_refused_readiness_check_fails_at_once(self, ec2):
        instance_id = new_instance(ec2)

        class DeniedSsm(StubSsm):
            def describe_instance_information(self, Filters):
                raise ClientError(
                    {"Error": {"Code": "AccessDeniedException", "Message": "not authorized"}},
                    "DescribeInstanceInformation",
                )

        with pytest.raises(InstanceUnusable, match="DescribeInstanceInformation .* refused with AccessDeniedException"):
            ready(ec2, DeniedSsm(), instance_id)


class TestLeasesAndRelease:
    def test_release_stops_an_instance_nobody_else_uses(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")

        outcome = release(ec2, StubSsm(), instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert outcome == "stopped"
        assert instance_state(ec2, instance_id) == "stopped"
        assert live_leases(ec2, instance_id) == {}

    def test_release_leaves_the_instance_to_another_runs_lease(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")
        take_lease(ec2, instance_id, "run-b", "manual__b")

        outcome = release(ec2, StubSsm(), instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert outcome == "left running: lease run-b held by manual__b, taken or refreshed 0 s ago"
        assert instance_state(ec2, instance_id) == "running"
        assert set(live_leases(ec2, instance_id)) == {"run-b"}

    def test_release_leaves_the_instance_while_a_command_is_live(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")
        ssm = StubSsm(
            commands=[
                {
                    "CommandId": "c-1",
                    "InstanceIds": [instance_id],
                    "Status": "InProgress",
                    "Comment": command_comment("run-b", "chunk 0 (1 files)"),
                }
            ]
        )

        outcome = release(ec2, ssm, instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert outcome == (
            "left running: another vod-sr run's command(s) still live: c-1 (vod-sr run-b chunk 0 (1 files), InProgress)"
        )
        assert instance_state(ec2, instance_id) == "running"
        assert ssm.cancelled == []  # another run's command is not ours to cancel

    def test_release_cancels_this_runs_orphaned_commands_and_stops(self, ec2):
        instance_id = new_instance(ec2)
        ssm = StubSsm(
            commands=[
                {
                    "CommandId": "c-mine",
                    "InstanceIds": [instance_id],
                    "Status": "InProgress",
                    "Comment": command_comment("run-a", "chunk 0 (3 files)"),
                }
            ]
        )

        outcome = release(ec2, ssm, instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert ssm.cancelled == ["c-mine"]
        assert outcome == "stopped"

    def test_finished_commands_do_not_keep_the_instance_up(self, ec2):
        instance_id = new_instance(ec2)
        ssm = StubSsm(commands=[{"CommandId": "c-1", "InstanceIds": [instance_id], "Status": "Success"}])

        assert release(ec2, ssm, instance_id, "run-a", stop=True, timeout=10, poll_interval=1) == "stopped"

    def test_expired_lease_of_a_crashed_run_is_ignored(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "crashed", "manual__old", now=datetime.now(UTC) - LEASE_TTL - timedelta(minutes=1))

        assert live_leases(ec2, instance_id) == {}
        assert release(ec2, StubSsm(), instance_id, "run-a", stop=True, timeout=10, poll_interval=1) == "stopped"

    def test_stop_when_done_off_leaves_it_running(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")

        outcome = release(ec2, StubSsm(), instance_id, "run-a", stop=False, timeout=10, poll_interval=1)

        assert outcome.startswith("left running")
        assert instance_state(ec2, instance_id) == "running"
        assert live_leases(ec2, instance_id) == {}

    def test_early_release_then_the_teardown_is_idempotent(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")

        first = release(ec2, StubSsm(), instance_id, "run-a", stop=True, timeout=10, poll_interval=1, wait=False)
        second = release(ec2, StubSsm(), instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert (first, second) == ("stopping", "already stopped")
        assert instance_state(ec2, instance_id) == "stopped"

    def test_drop_lease_is_idempotent(self, ec2):
        instance_id = new_instance(ec2)

        drop_lease(ec2, instance_id, "never-taken")

        assert live_leases(ec2, instance_id) == {}


def lease_tags(ec2, instance_id: str) -> dict[str, str]:
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])["Tags"]
    return {tag["Key"]: tag["Value"] for tag in tags if tag["Key"].startswith("vod-sr:lease:")}


LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


class TestLeasesCleanUpAfterThemselves:
    """Expired leases are deleted where they are read; a working run refreshes its own (issue 8, point 4)."""

    def test_an_expired_lease_is_deleted_when_the_leases_are_read(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "crashed", "manual__old", now=LONG_AGO)
        take_lease(ec2, instance_id, "run-b", "manual__b")

        assert live_leases(ec2, instance_id) == {"run-b": "manual__b"}
        assert set(lease_tags(ec2, instance_id)) == {"vod-sr:lease:run-b"}

    def test_a_lease_refreshed_after_it_was_read_is_not_deleted(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "slow", "manual__slow", now=LONG_AGO)
        # The run refreshes its lease between our DescribeTags and our DeleteTags.
        ec2.meta.events.register(
            "before-call.ec2.DeleteTags",
            lambda **_: ec2.create_tags(
                Resources=[instance_id],
                Tags=[{"Key": "vod-sr:lease:slow", "Value": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} manual__slow"}],
            ),
            unique_id="refresh-in-between",
        )

        leases(ec2, instance_id)

        assert set(lease_tags(ec2, instance_id)) == {"vod-sr:lease:slow"}

    def test_leaked_leases_at_the_tag_limit_do_not_block_the_next_run(self, ec2):
        instance_id = new_instance(ec2)
        leaked = [{"Key": f"vod-sr:lease:crashed-{n}", "Value": "2020-01-01T00:00:00Z manual__old"} for n in range(50)]
        ec2.create_tags(Resources=[instance_id], Tags=leaked)  # EC2's limit: 50 tags per resource

        take_lease(ec2, instance_id, "run-a", "manual__a")

        assert set(lease_tags(ec2, instance_id)) == {"vod-sr:lease:run-a"}

    def test_a_refreshed_lease_outlives_the_ttl_counted_from_when_it_was_taken(self, ec2):
        instance_id = new_instance(ec2)
        taken = datetime.now(UTC) - LEASE_TTL + timedelta(minutes=5)
        take_lease(ec2, instance_id, "long-run", "backfill__1", now=taken)

        assert refresh_lease(ec2, instance_id, "long-run", "backfill__1") is True

        later = datetime.now(UTC) + timedelta(minutes=10)  # past the TTL of the first take
        assert live_leases(ec2, instance_id, now=later) == {"long-run": "backfill__1"}

    def test_a_refresh_re_creates_a_deleted_lease(self, ec2):
        instance_id = new_instance(ec2)

        refresh_lease(ec2, instance_id, "run-a", "manual__a")

        assert live_leases(ec2, instance_id) == {"run-a": "manual__a"}

    def test_a_failed_refresh_is_logged_not_raised(self, ec2, caplog):
        instance_id = new_instance(ec2)

        def throttled(**_):
            raise ClientError({"Error": {"Code": "RequestLimitExceeded", "Message": "Rate exceeded"}}, "CreateTags")

        ec2.meta.events.register("before-call.ec2.CreateTags", throttled)

        assert refresh_lease(ec2, instance_id, "run-a", "manual__a") is False
        assert "Could not refresh lease run-a" in caplog.text

    def test_the_lease_that_keeps_the_instance_up_is_named_with_its_holder_and_age(self, ec2, caplog):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-b", "manual__b", now=datetime.now(UTC) - timedelta(minutes=42))

        with caplog.at_level("INFO", logger="include.vod_sr.instance"):
            outcome = release(ec2, StubSsm(), instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert outcome == "left running: lease run-b held by manual__b, taken or refreshed 42 min ago"
        assert "stays up for another run: lease run-b held by manual__b" in caplog.text


def live_command(instance_id: str, command_id: str, run: str, status: str = "InProgress") -> dict:
    return {
        "CommandId": command_id,
        "InstanceIds": [instance_id],
        "Status": status,
        "Comment": command_comment(run, "chunk 0 (3 files)"),
    }


class TestOnlyVodSrCommandsKeepTheInstanceUp:
    """A foreign command or a stuck Pending one must not leave the instance running (issue 8, point 5)."""

    def test_a_foreign_live_command_does_not_keep_the_instance_up(self, ec2, caplog):
        instance_id = new_instance(ec2)
        patching = {
            "CommandId": "c-patch",
            "InstanceIds": [instance_id],
            "Status": "InProgress",
            "DocumentName": "AWS-RunPatchBaseline",
            "Comment": "",
        }

        outcome = release(
            ec2, StubSsm(commands=[patching]), instance_id, "run-a", stop=True, timeout=10, poll_interval=1
        )

        assert outcome == "stopped"
        assert "Not vod-sr's, so it does not keep the instance up (the stop ends it): command c-patch" in caplog.text

    def test_a_stuck_pending_vod_sr_command_does_not_keep_the_instance_up(self, ec2, caplog):
        instance_id = new_instance(ec2)
        stuck = {
            **live_command(instance_id, "c-stuck", "run-b", status="Pending"),
            "RequestedDateTime": datetime.now(UTC) - timedelta(minutes=40),
        }

        outcome = release(ec2, StubSsm(commands=[stuck]), instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert outcome == "stopped"
        assert "Stuck Pending for 40 min" in caplog.text

    def test_a_vod_sr_command_just_sent_keeps_the_instance_up(self, ec2):
        instance_id = new_instance(ec2)
        just_sent = {
            **live_command(instance_id, "c-new", "run-b", status="Pending"),
            "RequestedDateTime": datetime.now(UTC) - timedelta(seconds=20),
        }

        outcome = release(
            ec2, StubSsm(commands=[just_sent]), instance_id, "run-a", stop=True, timeout=10, poll_interval=1
        )

        assert outcome.startswith("left running: another vod-sr run's command(s) still live: c-new")
        assert instance_state(ec2, instance_id) == "running"


class TestReleaseCancelsOrphans:
    """This run's live commands are cancelled first, whatever else release decides (issue 8, point 3)."""

    def test_stop_when_done_off_still_cancels_this_runs_live_command(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")
        ssm = StubSsm(commands=[live_command(instance_id, "c-mine", "run-a")])

        outcome = release(ec2, ssm, instance_id, "run-a", stop=False, timeout=10, poll_interval=1)

        assert ssm.cancelled == ["c-mine"]
        assert outcome == "left running (stop_when_done is off)"
        assert instance_state(ec2, instance_id) == "running"

    def test_another_runs_lease_still_cancels_this_runs_command_and_not_the_others(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")
        take_lease(ec2, instance_id, "run-b", "manual__b")
        ssm = StubSsm(
            commands=[live_command(instance_id, "c-mine", "run-a"), live_command(instance_id, "c-theirs", "run-b")]
        )

        outcome = release(ec2, ssm, instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert ssm.cancelled == ["c-mine"]
        assert outcome == "left running: lease run-b held by manual__b, taken or refreshed 0 s ago"

    def test_a_run_whose_token_extends_ours_is_not_ours(self, ec2):
        instance_id = new_instance(ec2)
        ssm = StubSsm(commands=[live_command(instance_id, "c-other", "run-ab")])

        outcome = release(ec2, ssm, instance_id, "run-a", stop=True, timeout=10, poll_interval=1)

        assert ssm.cancelled == []
        assert outcome.startswith("left running: another vod-sr run's command(s) still live: c-other")

    def test_a_failing_cancel_does_not_stop_the_other_cancels_and_fails_when_the_instance_stays_up(self, ec2):
        instance_id = new_instance(ec2)
        take_lease(ec2, instance_id, "run-a", "manual__a")
        ssm = StubSsm(
            commands=[live_command(instance_id, f"c-{n}", "run-a") for n in range(3)], failing_cancels=("c-0",)
        )

        with pytest.raises(ClientError, match="ThrottlingException"):
            release(ec2, ssm, instance_id, "run-a", stop=False, timeout=10, poll_interval=1)

        assert ssm.cancelled == ["c-1", "c-2"]
        assert live_leases(ec2, instance_id) == {}  # the lease is dropped before the error is raised

    def test_a_failing_cancel_is_ended_by_the_stop(self, ec2):
        instance_id = new_instance(ec2)
        ssm = StubSsm(commands=[live_command(instance_id, "c-0", "run-a")], failing_cancels=("c-0",))

        assert release(ec2, ssm, instance_id, "run-a", stop=True, timeout=10, poll_interval=1) == "stopped"

    def test_a_command_already_cancelling_is_not_cancelled_again_nor_keeps_the_instance_up(self, ec2):
        instance_id = new_instance(ec2)
        ssm = StubSsm(commands=[live_command(instance_id, "c-0", "run-a", status="Cancelling")])

        assert release(ec2, ssm, instance_id, "run-a", stop=True, timeout=10, poll_interval=1) == "stopped"
        assert ssm.cancelled == []


class TestReleaseRecordInstanceType:
    """The release record names the instance type, which the report's cost estimate prices."""

    def test_is_the_type_ec2_describes(self, ec2):
        instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="g6e.2xlarge")[
            "Instances"
        ][0]["InstanceId"]
        ec2.stop_instances(InstanceIds=[instance_id])

        record = release_record(ec2, instance_id, "stopped")

        assert record["instance_type"] == "g6e.2xlarge"
        assert set(record) == {"instance_id", "outcome", "instance_seconds", "instance_type"}

    def test_is_none_when_ec2_cannot_be_asked(self, ec2, caplog):
        instance_id = new_instance(ec2)

        def refuse(**_):
            raise RuntimeError("EC2 is down")

        ec2.meta.events.register("before-call.ec2.DescribeInstances", refuse)

        record = release_record(ec2, instance_id, "left running")

        assert (record["instance_type"], record["instance_seconds"]) == (None, None)

    def test_is_none_when_ec2_does_not_say(self, ec2):
        instance_id = new_instance(ec2)

        def no_type(parsed, **_):
            del parsed["Reservations"][0]["Instances"][0]["InstanceType"]

        ec2.meta.events.register("after-call.ec2.DescribeInstances", no_type)

        assert release_record(ec2, instance_id, "left running")["instance_type"] is None


def status_of(ssm, command_id: str, instance_id: str) -> str:
    return ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)["Status"]


def wait_for_status(ssm, command_id: str, instance_id: str, wanted: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while (status := status_of(ssm, command_id, instance_id)) != wanted and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


@pytest.mark.e2e
class TestReleaseCancelsOrphansOnTheEmulator:
    """Real SSM commands on the emulated instance: release's ListCommands and CancelCommand over HTTP."""

    @pytest.fixture
    def clients(self, emulator_env):
        return boto_client("ec2", emulator_env.endpoint_url), boto_client("ssm", emulator_env.endpoint_url)

    @staticmethod
    def send(ssm, instance_id: str, run: str) -> str:
        command_id = ssm.send_command(
            InstanceIds=[instance_id],
            DocumentName="AWS-RunShellScript",
            Comment=command_comment(run, "chunk 0 (1 files)"),
            Parameters={"commands": ["sleep 120"]},
        )["Command"]["CommandId"]
        assert wait_for_status(ssm, command_id, instance_id, "InProgress") == "InProgress"
        return command_id

    def test_stop_when_done_off_cancels_this_runs_live_command(self, clients, running_instance):
        ec2, ssm = clients
        take_lease(ec2, running_instance, "run-a", "manual__a")
        orphan = self.send(ssm, running_instance, "run-a")

        outcome = release(ec2, ssm, running_instance, "run-a", stop=False, timeout=10, poll_interval=1)

        assert outcome == "left running (stop_when_done is off)"
        assert wait_for_status(ssm, orphan, running_instance, "Cancelled") == "Cancelled"
        assert instance_state(ec2, running_instance) == "running"

    def test_another_runs_lease_cancels_this_runs_command_but_not_the_other_runs(self, clients, running_instance):
        ec2, ssm = clients
        take_lease(ec2, running_instance, "run-a", "manual__a")
        take_lease(ec2, running_instance, "run-b", "manual__b")
        orphan, theirs = self.send(ssm, running_instance, "run-a"), self.send(ssm, running_instance, "run-b")
        try:
            outcome = release(ec2, ssm, running_instance, "run-a", stop=True, timeout=10, poll_interval=1)

            assert outcome.startswith("left running: lease run-b held by manual__b")
            assert wait_for_status(ssm, orphan, running_instance, "Cancelled") == "Cancelled"
            assert status_of(ssm, theirs, running_instance) == "InProgress"
            assert set(live_leases(ec2, running_instance)) == {"run-b"}
        finally:
            ssm.cancel_command(CommandId=theirs)


@pytest.mark.e2e
class TestReleaseTerminatesLaunchedInstances:
    """Instances launched for a run (fleet.py) are terminated by its release, on the emulator over HTTP."""

    TOKEN = "0123456789abcdef"

    @pytest.fixture
    def clients(self, emulator_env):
        return boto_client("ec2", emulator_env.endpoint_url), boto_client("ssm", emulator_env.endpoint_url)

    @pytest.fixture
    def launched(self, clients, emulator_env) -> str:
        """An instance launched for run TOKEN from a launch template, still pending, its lease taken."""
        from include.local_aws.world import create_launch_template
        from include.vod_sr.fleet import FleetRequest, fleet_tags, launch_fleet

        ec2, _ = clients
        template = create_launch_template(emulator_env.endpoint_url, "vod-sr-release-tests")
        (instance_id,) = launch_fleet(ec2, FleetRequest(template, 1), fleet_tags("d", "r", self.TOKEN))
        take_lease(ec2, instance_id, self.TOKEN, "r")
        return instance_id

    def test_the_lanes_flag_terminates_even_a_pending_instance(self, clients, launched):
        ec2, ssm = clients
        assert instance_state(ec2, launched) == "pending"

        outcome = release(ec2, ssm, launched, self.TOKEN, stop=True, timeout=20, poll_interval=1, terminate=True)

        assert (outcome, instance_state(ec2, launched)) == ("terminated", "terminated")

    def test_without_the_flag_its_tags_say_it_was_launched_for_this_run(self, clients, launched):
        ec2, ssm = clients  # run_chunks' early release knows only stop_when_done

        outcome = release(ec2, ssm, launched, self.TOKEN, stop=True, timeout=20, poll_interval=1, wait=False)

        assert outcome == "terminating"
        assert instance_state(ec2, launched) in ("shutting-down", "terminated")
        again = release(ec2, ssm, launched, self.TOKEN, stop=True, timeout=20, poll_interval=1, terminate=True)
        assert again == "terminated"

    def test_another_runs_release_stops_it_never_terminates_it(self, clients, launched):
        ec2, ssm = clients
        ec2.get_waiter("instance_running").wait(InstanceIds=[launched], WaiterConfig={"Delay": 1, "MaxAttempts": 30})
        take_lease(ec2, launched, "another-run", "r2")
        release(ec2, ssm, launched, self.TOKEN, stop=True, timeout=20, poll_interval=1, terminate=False)

        outcome = release(ec2, ssm, launched, "another-run", stop=True, timeout=20, poll_interval=1)

        assert (outcome, instance_state(ec2, launched)) == ("stopped", "stopped")
        ec2.terminate_instances(InstanceIds=[launched])

    def test_its_record_counts_the_instance_time_to_the_termination(self, clients, launched):
        ec2, ssm = clients
        ec2.get_waiter("instance_running").wait(InstanceIds=[launched], WaiterConfig={"Delay": 1, "MaxAttempts": 30})
        time.sleep(1)
        outcome = release(ec2, ssm, launched, self.TOKEN, stop=True, timeout=20, poll_interval=1, terminate=True)

        record = release_record(ec2, launched, outcome)

        assert record["outcome"] == "terminated"
        assert record["instance_type"] == "g6e.xlarge"
        assert record["instance_seconds"] is not None and record["instance_seconds"] >= 1


class TestReadyWithin:
    """The readiness sensor's poke looks again every second for a while (moto's EC2 and SSM; is_ready's own cases
    are above)."""

    def test_true_at_the_first_look_that_finds_it_ready(self, ec2, monkeypatch):
        import include.vod_sr.instance as instance

        looks = iter([False, False, True])
        monkeypatch.setattr(instance, "is_ready", lambda *a, **k: next(looks))
        started = time.monotonic()

        assert instance.ready_within(ec2, None, "i-x", lease_id="l", holder="h", seconds=10, interval=0.2)
        assert 0.4 <= time.monotonic() - started < 2

    def test_false_once_the_time_is_up(self, monkeypatch):
        import include.vod_sr.instance as instance

        looks: list[bool] = []
        monkeypatch.setattr(instance, "is_ready", lambda *a, **k: looks.append(False) or False)
        started = time.monotonic()

        assert not instance.ready_within(None, None, "i-x", lease_id="l", holder="h", seconds=1, interval=0.2)
        assert time.monotonic() - started < 1.5 and 4 <= len(looks) <= 6
