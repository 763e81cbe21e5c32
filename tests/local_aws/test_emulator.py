"""The local AWS emulator over real HTTP: its SSM agent really runs commands, EC2 takes time, faults inject."""

from __future__ import annotations

import time
import urllib.error

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from include.local_aws.world import boto_client
from scripts.bench import max_overlap


def wait_for_invocation(ssm, command_id: str, instance_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        invocation = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        if invocation["Status"] not in ("Pending", "InProgress", "Delayed"):
            return invocation
        assert time.monotonic() < deadline, invocation["Status"]
        time.sleep(0.2)


def send(ssm, instance_id: str, script: str, **extra) -> str:
    parameters = {"commands": [script], **extra.pop("parameters", {})}
    return ssm.send_command(
        InstanceIds=[instance_id], DocumentName="AWS-RunShellScript", Parameters=parameters, **extra
    )["Command"]["CommandId"]


def state(ec2, instance_id: str) -> str:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


@pytest.fixture
def clients(emulator_env):
    url = emulator_env.endpoint_url
    return boto_client("ec2", url), boto_client("ssm", url), boto_client("s3", url)


class TestSsmAgent:
    def test_command_really_runs_with_exit_code_and_output(self, clients, running_instance):
        _, ssm, _ = clients

        invocation = wait_for_invocation(
            ssm, send(ssm, running_instance, "echo out; echo err >&2; exit 3"), running_instance
        )

        assert (invocation["Status"], invocation["StatusDetails"], invocation["ResponseCode"]) == (
            "Failed",
            "Failed",
            3,
        )
        assert (invocation["StandardOutputContent"], invocation["StandardErrorContent"]) == ("out\n", "err\n")

    def test_output_is_truncated_like_aws(self, clients, running_instance):
        _, ssm, _ = clients

        invocation = wait_for_invocation(
            ssm,
            send(
                ssm, running_instance, "head -c 30000 /dev/zero | tr '\\0' o; head -c 9000 /dev/zero | tr '\\0' e >&2"
            ),
            running_instance,
        )

        assert len(invocation["StandardOutputContent"]) == 24_000
        assert len(invocation["StandardErrorContent"]) == 8_000

    def test_commands_run_with_sh_like_the_real_agent(self, clients, running_instance):
        _, ssm, _ = clients

        # `[[` is bash-only: under sh it fails, which is why vod-sr wraps its scripts in `bash -c`.
        invocation = wait_for_invocation(ssm, send(ssm, running_instance, "[[ 1 == 1 ]]"), running_instance)

        assert invocation["Status"] == "Failed"

    def test_aws_cli_inside_the_script_reaches_the_emulator_without_credentials_in_the_script(
        self, clients, running_instance
    ):
        _, ssm, s3 = clients
        s3.create_bucket(Bucket="agent-bucket")
        s3.put_object(Bucket="agent-bucket", Key="it's $(id).txt", Body=b"hello")

        invocation = wait_for_invocation(
            ssm, send(ssm, running_instance, 'aws s3 cp "s3://agent-bucket/it\'s \\$(id).txt" - '), running_instance
        )

        assert invocation["StandardOutputContent"] == "hello", invocation["StandardErrorContent"]

    def test_execution_timeout_is_enforced(self, clients, running_instance):
        _, ssm, _ = clients

        command_id = send(ssm, running_instance, "sleep 30", parameters={"executionTimeout": ["1"]})
        invocation = wait_for_invocation(ssm, command_id, running_instance, timeout=10)

        assert (invocation["Status"], invocation["StatusDetails"]) == ("TimedOut", "ExecutionTimedOut")

    def test_cancel_kills_the_script(self, clients, running_instance):
        _, ssm, _ = clients
        command_id = send(ssm, running_instance, "sleep 30")
        time.sleep(1)

        ssm.cancel_command(CommandId=command_id, InstanceIds=[running_instance])
        invocation = wait_for_invocation(ssm, command_id, running_instance, timeout=10)

        assert invocation["Status"] == "Cancelled"

    def test_list_commands_and_invocations(self, clients, running_instance):
        _, ssm, _ = clients
        command_id = send(ssm, running_instance, "sleep 2")

        listed = ssm.list_commands(InstanceId=running_instance)["Commands"]
        invocations = ssm.list_command_invocations(CommandId=command_id)["CommandInvocations"]

        assert [c["Status"] for c in listed if c["CommandId"] == command_id] in (["Pending"], ["InProgress"])
        assert [i["InstanceId"] for i in invocations] == [running_instance]

    def test_unknown_instance_is_rejected(self, clients):
        _, ssm, _ = clients

        with pytest.raises(ClientError, match="InvalidInstanceId"):
            send(ssm, "i-00000000000000000", "true")


class TestEc2Lifecycle:
    def test_start_and_stop_take_time_and_the_agent_follows(self, clients, running_instance, emulator_env):
        ec2, ssm, _ = clients
        emulator_env.set_faults(
            {"instances": {running_instance: {"pending_seconds": 1, "stopping_seconds": 1, "stale_online_seconds": 0}}}
        )

        ec2.stop_instances(InstanceIds=[running_instance])
        assert state(ec2, running_instance) == "stopping"
        ec2.get_waiter("instance_stopped").wait(InstanceIds=[running_instance], WaiterConfig={"Delay": 1})
        info = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [running_instance]}])
        assert info["InstanceInformationList"][0]["PingStatus"] == "ConnectionLost"

        ec2.start_instances(InstanceIds=[running_instance])
        assert state(ec2, running_instance) == "pending"
        ec2.get_waiter("instance_running").wait(InstanceIds=[running_instance], WaiterConfig={"Delay": 1})

    def test_commands_to_a_stopped_instance_are_not_delivered(self, clients, running_instance):
        ec2, ssm, _ = clients
        ec2.stop_instances(InstanceIds=[running_instance])
        ec2.get_waiter("instance_stopped").wait(InstanceIds=[running_instance], WaiterConfig={"Delay": 1})

        command_id = send(ssm, running_instance, "echo never", TimeoutSeconds=30)
        time.sleep(1)
        assert ssm.get_command_invocation(CommandId=command_id, InstanceId=running_instance)["Status"] == "Pending"

    def test_start_while_stopping_is_refused_like_aws(self, clients, running_instance, emulator_env):
        ec2, _, _ = clients
        emulator_env.set_faults({"instances": {running_instance: {"stopping_seconds": 5}}})
        ec2.stop_instances(InstanceIds=[running_instance])

        with pytest.raises(ClientError, match="IncorrectInstanceState"):
            ec2.start_instances(InstanceIds=[running_instance])

    def test_a_stop_kills_the_command_without_a_word_and_the_next_boot_runs_it_again(self, clients, running_instance):
        # AWS: "If the agent isn't running or available on the node, the command status remains at In Progress until
        # the agent is available again" (Understanding command statuses); the agent then submits the documents it
        # had in progress again (aws/amazon-ssm-agent, processor.go processInProgressDocuments).
        ec2, ssm, _ = clients
        command_id = send(ssm, running_instance, 'echo run >> "$HOME/runs"; sleep 3; cat "$HOME/runs"')
        time.sleep(1)

        ec2.stop_instances(InstanceIds=[running_instance])
        ec2.get_waiter("instance_stopped").wait(InstanceIds=[running_instance], WaiterConfig={"Delay": 1})
        time.sleep(4)  # longer than the script had left: it did not go on running
        assert ssm.get_command_invocation(CommandId=command_id, InstanceId=running_instance)["Status"] == "InProgress"

        ec2.start_instances(InstanceIds=[running_instance])
        invocation = wait_for_invocation(ssm, command_id, running_instance, timeout=30)

        assert (invocation["Status"], invocation["StandardOutputContent"]) == ("Success", "run\nrun\n")

    def test_a_cancel_sent_just_before_a_stop_still_ends_the_command(self, clients, running_instance):
        # The agent gets a cancel within a moment; an OS shutdown takes seconds.
        ec2, ssm, _ = clients
        command_id = send(ssm, running_instance, "sleep 30")
        time.sleep(1)

        ssm.cancel_command(CommandId=command_id, InstanceIds=[running_instance])
        ec2.stop_instances(InstanceIds=[running_instance])

        assert wait_for_invocation(ssm, command_id, running_instance, timeout=10)["Status"] == "Cancelled"

    def test_a_command_whose_instance_never_comes_back_expires_as_delivery_timed_out(
        self, clients, running_instance, emulator_env
    ):
        ec2, ssm, _ = clients
        # Short timeouts so it expires within the test: SSM's smallest TimeoutSeconds is 30, which botocore checks
        # before sending, so this one request goes without botocore's checks (the emulator takes any timeout).
        unchecked = boto_client("ssm", emulator_env.endpoint_url, config=Config(parameter_validation=False))
        command_id = send(
            unchecked, running_instance, "sleep 30", TimeoutSeconds=3, parameters={"executionTimeout": ["2"]}
        )
        time.sleep(1)

        ec2.terminate_instances(InstanceIds=[running_instance])
        time.sleep(1)
        assert ssm.get_command_invocation(CommandId=command_id, InstanceId=running_instance)["Status"] == "InProgress"
        invocation = wait_for_invocation(ssm, command_id, running_instance, timeout=15)

        assert (invocation["Status"], invocation["StatusDetails"]) == ("TimedOut", "DeliveryTimedOut")


class TestFaults:
    def test_insufficient_capacity_on_the_first_starts(self, clients, running_instance, emulator_env):
        ec2, _, _ = clients
        ec2.stop_instances(InstanceIds=[running_instance])
        ec2.get_waiter("instance_stopped").wait(InstanceIds=[running_instance], WaiterConfig={"Delay": 1})
        emulator_env.set_faults({"instances": {running_instance: {"insufficient_capacity_starts": 2}}})

        for _ in range(2):
            with pytest.raises(ClientError, match="InsufficientInstanceCapacity"):
                ec2.start_instances(InstanceIds=[running_instance])
        ec2.start_instances(InstanceIds=[running_instance])

        assert state(ec2, running_instance) == "pending"

    def test_agent_never_online(self, clients, running_instance, emulator_env):
        _, ssm, _ = clients
        emulator_env.set_faults({"instances": {running_instance: {"agent_never_online": True}}})

        info = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [running_instance]}])

        assert [i for i in info["InstanceInformationList"] if i["PingStatus"] == "Online"] == []

    def test_invocation_invisible_for_a_while_after_send(self, clients, running_instance, emulator_env):
        _, ssm, _ = clients
        emulator_env.set_faults({"instances": {running_instance: {"invocation_visibility_seconds": 1.5}}})
        command_id = send(ssm, running_instance, "true")

        assert ssm.list_command_invocations(CommandId=command_id)["CommandInvocations"] == []
        with pytest.raises(ClientError, match="InvocationDoesNotExist"):
            ssm.get_command_invocation(CommandId=command_id, InstanceId=running_instance)
        time.sleep(2)
        assert wait_for_invocation(ssm, command_id, running_instance)["Status"] == "Success"

    @pytest.mark.e2e
    @pytest.mark.parametrize(
        ("error", "expected", "http_status"),
        [
            pytest.param("InternalServerError", "InternalServerError", 500, id="500"),
            pytest.param("ServiceUnavailable", "ServiceUnavailable", 503, id="503"),
            pytest.param("ThrottlingException", "ThrottlingException", 400, id="throttled"),
            pytest.param("AccessDeniedException", "AccessDeniedException", 400, id="denied"),
            pytest.param("connection_drop", "ConnectionClosedError", None, id="connection-drop"),
        ],
    )
    def test_invocation_reads_fail_as_injected_then_recover(
        self, clients, running_instance, emulator_env, error, expected, http_status
    ):
        _, ssm, _ = clients
        strict = boto_client("ssm", emulator_env.endpoint_url, Config(retries={"total_max_attempts": 1}))
        command_id = send(ssm, running_instance, "true")
        emulator_env.set_faults(
            {"instances": {running_instance: {"invocation_read_errors": 2, "invocation_read_error": error}}}
        )

        failures = []
        for _ in range(2):
            with pytest.raises((ClientError, ConnectionClosedError)) as failure:
                strict.get_command_invocation(CommandId=command_id, InstanceId=running_instance)
            response = getattr(failure.value, "response", None) or {}
            failures.append((type(failure.value).__name__, response.get("ResponseMetadata", {}).get("HTTPStatusCode")))

        expected_class = "ClientError" if error == "ServiceUnavailable" else expected  # not in SSM's error model
        assert failures == [(expected_class, http_status)] * 2
        assert wait_for_invocation(strict, command_id, running_instance)["Status"] == "Success"

    def test_unknown_injected_error_is_refused(self, emulator_env):
        with pytest.raises(urllib.error.HTTPError, match="400"):
            emulator_env.set_faults({"instances": {"i-1": {"invocation_read_error": "Gremlins"}}})

    def test_throttling_is_absorbed_by_botocore_adaptive_retries(self, emulator_env):
        emulator_env.set_faults({"throttle_fraction": 1.0})
        with pytest.raises(ClientError, match="ThrottlingException"):
            strict = boto_client("ssm", emulator_env.endpoint_url, Config(retries={"max_attempts": 1}))
            strict.describe_instance_information()

        emulator_env.set_faults({"throttle_fraction": 0.3})
        emulator_env.reset_calls()
        adaptive = boto_client(
            "ssm", emulator_env.endpoint_url, Config(retries={"mode": "adaptive", "max_attempts": 10})
        )
        for _ in range(10):
            adaptive.describe_instance_information()

        assert len(emulator_env.calls()) > 10  # the throttled attempts were retried, and the log saw them


def statuses(ssm, command_ids: list[str], instance_id: str) -> list[str]:
    return [ssm.get_command_invocation(CommandId=c, InstanceId=instance_id)["Status"] for c in command_ids]


TIMED_SLEEP = "echo $(date +%s.%N); sleep {seconds}; echo $(date +%s.%N)"


class TestAgentLimits:
    """The real agent runs at most 5 commands at once and queues 5 more (aws/amazon-ssm-agent,
    agent/appconfig/constants.go, task/pool.go); beyond that SSM keeps the command Pending while the agent retries it
    every 10 s (mdsinteractor.go). The emulator's defaults are the agent's; a test shortens the retry."""

    def test_twelve_commands_run_five_at_a_time_and_the_last_two_wait_in_ssm(
        self, clients, running_instance, emulator_env
    ):
        _, ssm, _ = clients
        emulator_env.set_faults({"instances": {running_instance: {"agent_buffer_full_retry_seconds": 1}}})
        command_ids = [send(ssm, running_instance, TIMED_SLEEP.format(seconds=2)) for _ in range(12)]
        time.sleep(1)

        assert statuses(ssm, command_ids, running_instance) == ["InProgress"] * 10 + ["Pending"] * 2

        invocations = [wait_for_invocation(ssm, c, running_instance, timeout=60) for c in command_ids]
        assert [i["Status"] for i in invocations] == ["Success"] * 12
        spans = [tuple(map(float, i["StandardOutputContent"].split())) for i in invocations]
        assert max_overlap(spans) == 5
        assert min(start for start, _ in spans[10:]) >= max(end for _, end in spans[:5]) - 0.1  # waited for room

    def test_a_raised_workers_limit_runs_more_at_once(self, clients, running_instance, emulator_env):
        _, ssm, _ = clients
        emulator_env.set_faults({"instances": {running_instance: {"command_workers_limit": 8}}})
        command_ids = [send(ssm, running_instance, TIMED_SLEEP.format(seconds=2)) for _ in range(8)]

        invocations = [wait_for_invocation(ssm, c, running_instance, timeout=60) for c in command_ids]

        assert max_overlap([tuple(map(float, i["StandardOutputContent"].split())) for i in invocations]) == 8

    def test_a_queued_command_cancelled_never_runs_and_a_pending_one_is_dropped_by_ssm(
        self, clients, running_instance, emulator_env
    ):
        _, ssm, _ = clients
        limits = {"command_workers_limit": 1, "command_worker_buffer_limit": 1}
        emulator_env.set_faults({"instances": {running_instance: limits}})
        running, queued = (send(ssm, running_instance, "sleep 3; echo ran") for _ in range(2))
        time.sleep(1)
        assert statuses(ssm, [running, queued], running_instance) == ["InProgress", "InProgress"]

        ssm.cancel_command(CommandId=queued, InstanceIds=[running_instance])

        cancelled = wait_for_invocation(ssm, queued, running_instance, timeout=2)
        assert (cancelled["Status"], cancelled["ExecutionStartDateTime"]) == ("Cancelled", "")  # never started
        assert wait_for_invocation(ssm, running, running_instance)["Status"] == "Success"

    def test_a_cancel_waits_behind_a_send_the_agent_has_no_room_for(self, clients, running_instance, emulator_env):
        _, ssm, _ = clients
        limits = {"command_workers_limit": 1, "command_worker_buffer_limit": 1, "agent_buffer_full_retry_seconds": 1}
        emulator_env.set_faults({"instances": {running_instance: limits}})
        first, queued, held = (send(ssm, running_instance, "sleep 2; echo ran") for _ in range(3))
        time.sleep(0.8)
        assert statuses(ssm, [first, queued, held], running_instance) == ["InProgress", "InProgress", "Pending"]

        ssm.cancel_command(CommandId=first, InstanceIds=[running_instance])

        # The agent still holds `held` (no room), so the cancel queues behind it: `first` runs to its end.
        ended = wait_for_invocation(ssm, first, running_instance, timeout=10)
        assert (ended["Status"], ended["StandardOutputContent"]) == ("Success", "ran\n")

    def test_limits_below_one_are_refused(self, emulator_env):
        with pytest.raises(urllib.error.HTTPError, match="400"):
            emulator_env.set_faults({"instances": {"i-1": {"command_workers_limit": 0}}})


def ping(ssm, instance_id: str) -> dict:
    (item,) = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])[
        "InstanceInformationList"
    ]
    return item


def described(ec2, instance_id: str) -> dict:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def wait_state(ec2, instance_id: str, wanted: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (instance := described(ec2, instance_id))["State"]["Name"] != wanted:
        assert time.monotonic() < deadline, instance["State"]
        time.sleep(0.1)
    return instance


@pytest.mark.e2e
class TestAwsLikeStartsAndPings:
    """What AWS does and moto did not: heartbeats and a stale Online, a new LaunchTime per start, starts that end
    pending -> stopped, permission errors, CreateTags on an unknown instance (issue 8, point 6)."""

    def test_last_ping_follows_the_heartbeats_and_a_stop_leaves_a_stale_online(
        self, clients, running_instance, emulator_env
    ):
        ec2, ssm, _ = clients
        emulator_env.set_faults({"instances": {running_instance: {"stale_online_seconds": 2, "stopping_seconds": 0.2}}})
        online = ping(ssm, running_instance)
        assert online["PingStatus"] == "Online"
        assert abs(time.time() - online["LastPingDateTime"].timestamp()) < 2

        stopped_at = time.time()
        ec2.stop_instances(InstanceIds=[running_instance])
        wait_state(ec2, running_instance, "stopped")
        stale = ping(ssm, running_instance)

        assert stale["PingStatus"] == "Online"  # what AWS shows for minutes after a stop
        assert stale["LastPingDateTime"].timestamp() <= stopped_at + 0.5
        time.sleep(2)
        gone = ping(ssm, running_instance)
        assert (gone["PingStatus"], gone["LastPingDateTime"]) == ("ConnectionLost", stale["LastPingDateTime"])

    def test_every_start_has_a_new_launch_time_and_a_quick_restart_shows_the_old_ping_first(
        self, clients, running_instance, emulator_env
    ):
        ec2, ssm, _ = clients
        assert ping(ssm, running_instance)["PingStatus"] == "Online"  # this boot's agent checked in
        first_launch = described(ec2, running_instance)["LaunchTime"]
        emulator_env.set_faults(
            {
                "instances": {
                    running_instance: {
                        "stale_online_seconds": 60,
                        "stopping_seconds": 0.2,
                        "pending_seconds": 0.2,
                        "agent_registration_seconds": 2,
                    }
                }
            }
        )
        ec2.stop_instances(InstanceIds=[running_instance])
        wait_state(ec2, running_instance, "stopped")
        time.sleep(1.1)  # LaunchTime has whole seconds

        ec2.start_instances(InstanceIds=[running_instance])
        launch = wait_state(ec2, running_instance, "running")["LaunchTime"]
        early = ping(ssm, running_instance)

        assert launch > first_launch
        assert early["PingStatus"] == "Online" and early["LastPingDateTime"] < launch  # stale: the previous boot's
        time.sleep(2.2)
        fresh = ping(ssm, running_instance)
        assert fresh["PingStatus"] == "Online" and fresh["LastPingDateTime"] >= launch

    @pytest.mark.parametrize(
        ("reason", "message"),
        [
            pytest.param(
                "Server.InsufficientInstanceCapacity",
                "Server.InsufficientInstanceCapacity: Insufficient capacity to satisfy instance request",
                id="capacity",
            ),
            pytest.param("Client.InternalError", "Client.InternalError: Client error on launch", id="kms-grant"),
        ],
    )
    def test_a_start_can_go_pending_then_stopped_with_ec2s_state_reason(
        self, clients, running_instance, emulator_env, reason, message
    ):
        ec2, _, _ = clients
        emulator_env.set_faults({"instances": {running_instance: {"stopping_seconds": 0.2, "pending_seconds": 0.5}}})
        ec2.stop_instances(InstanceIds=[running_instance])
        wait_state(ec2, running_instance, "stopped")
        emulator_env.set_faults({"instances": {running_instance: {"failed_starts": 1, "failed_start_reason": reason}}})

        ec2.start_instances(InstanceIds=[running_instance])
        assert described(ec2, running_instance)["State"]["Name"] == "pending"
        failed = wait_state(ec2, running_instance, "stopped")

        assert failed["StateReason"] == {"Code": reason, "Message": message}
        ec2.start_instances(InstanceIds=[running_instance])  # the fault was for one start
        assert wait_state(ec2, running_instance, "running")["StateReason"].get("Code", "") == ""

    @pytest.mark.parametrize("action", ["StartInstances", "CreateTags", "DescribeInstances"])
    @pytest.mark.parametrize("error", ["UnauthorizedOperation", "AccessDenied"])
    def test_denied_actions_are_refused_for_that_instance_only(
        self, clients, running_instance, emulator_env, action, error
    ):
        ec2, _, _ = clients
        other = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        emulator_env.set_faults({"instances": {running_instance: {"denied_actions": [action], "denied_error": error}}})
        call = {
            "StartInstances": lambda i: ec2.start_instances(InstanceIds=[i]),
            "CreateTags": lambda i: ec2.create_tags(Resources=[i], Tags=[{"Key": "k", "Value": "v"}]),
            "DescribeInstances": lambda i: ec2.describe_instances(InstanceIds=[i]),
        }[action]

        with pytest.raises(ClientError) as refused:
            call(running_instance)
        call(other)

        assert refused.value.response["Error"]["Code"] == error
        assert f"not authorized to perform: ec2:{action}" in refused.value.response["Error"]["Message"]
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    def test_create_tags_on_an_unknown_instance_is_refused_like_aws(self, clients):
        ec2, _, _ = clients

        with pytest.raises(ClientError, match="InvalidInstanceID.NotFound"):
            ec2.create_tags(Resources=["i-0000000000000dead"], Tags=[{"Key": "k", "Value": "v"}])

    @pytest.mark.parametrize(
        "faults",
        [{"failed_start_reason": "Gremlins"}, {"denied_actions": ["TerminateInstances"]}, {"denied_error": "Nope"}],
        ids=["reason", "action", "error"],
    )
    def test_unknown_fault_values_are_refused(self, emulator_env, faults):
        with pytest.raises(urllib.error.HTTPError, match="400"):
            emulator_env.set_faults({"instances": {"i-1": faults}})


def test_call_log_counts_every_call(emulator_env):
    emulator_env.reset_calls()
    ssm, s3 = boto_client("ssm", emulator_env.endpoint_url), boto_client("s3", emulator_env.endpoint_url)

    ssm.describe_instance_information()
    s3.list_buckets()

    assert [(c["service"], c["action"], c["caller"]) for c in emulator_env.calls()] == [
        ("ssm", "DescribeInstanceInformation", "orchestrator"),
        ("s3", "GET bucket", "orchestrator"),
    ]


def test_timeline_records_command_runs_and_the_instances_calls(clients, running_instance, emulator_env):
    _, ssm, _ = clients
    command_id = send(ssm, running_instance, "aws s3 ls >/dev/null; sleep 1", Comment="timed")
    wait_for_invocation(ssm, command_id, running_instance)

    (run,) = emulator_env.timeline()[running_instance]["commands"]

    assert run["comment"] == "timed" and run["end"] - run["start"] >= 1
    assert any(c["caller"] == "instance" and c["service"] == "s3" for c in emulator_env.calls())


@pytest.fixture
def four_gpu_instance(emulator_env):
    """A fresh g6e.12xlarge (4 GPUs) whose SSM agent is Online."""
    ec2, ssm = boto_client("ec2", emulator_env.endpoint_url), boto_client("ssm", emulator_env.endpoint_url)
    instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="g6e.12xlarge")[
        "Instances"
    ][0]["InstanceId"]
    deadline = time.monotonic() + 30
    while not ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])[
        "InstanceInformationList"
    ]:
        assert time.monotonic() < deadline, "the emulated agent never came Online"
        time.sleep(0.2)
    return instance_id


class TestGpus:
    """Each instance has its type's GPUs: a stand-in nvidia-smi lists them, a stand-in ffmpeg (the real one, timed)
    records each model run's GPU in the timeline."""

    @pytest.mark.parametrize(
        ("instance_type", "gpus"),
        [("g6e.xlarge", 1), ("g6e.12xlarge", 4), ("g6e.24xlarge", 4), ("g6e.48xlarge", 8), ("m5.large", 0)],
    )
    def test_one_table_of_gpus_per_instance_type(self, instance_type, gpus):
        from include.local_aws.gpus import gpu_count

        assert gpu_count(instance_type) == gpus

    def test_nvidia_smi_lists_the_instance_types_gpus_and_the_script_counts_them(
        self, clients, four_gpu_instance, emulator_env
    ):
        from include.vod_sr.script import GPU_COUNT_SCRIPT, as_run_shell_command, parse_gpu_count

        _, ssm, _ = clients

        listed = wait_for_invocation(ssm, send(ssm, four_gpu_instance, "nvidia-smi -L"), four_gpu_instance)
        counted = wait_for_invocation(
            ssm, send(ssm, four_gpu_instance, as_run_shell_command(GPU_COUNT_SCRIPT)), four_gpu_instance
        )

        lines = listed["StandardOutputContent"].splitlines()
        assert [line.split(" (UUID: GPU-")[0] for line in lines] == [f"GPU {k}: NVIDIA L40S" for k in range(4)]
        assert len({line.split("UUID: ")[1] for line in lines}) == 4
        assert (counted["Status"], parse_gpu_count(counted["StandardOutputContent"])) == ("Success", 4)
        assert emulator_env.timeline()[four_gpu_instance]["gpus"] == 4

    def test_an_instance_without_gpus_counts_one_slot_with_a_warning(self, clients, running_instance):
        from include.vod_sr.script import GPU_COUNT_SCRIPT, as_run_shell_command, parse_gpu_count

        _, ssm, _ = clients

        counted = wait_for_invocation(
            ssm, send(ssm, running_instance, as_run_shell_command(GPU_COUNT_SCRIPT)), running_instance
        )

        assert parse_gpu_count(counted["StandardOutputContent"]) == 1
        assert "nvidia-smi -L failed: NVIDIA-SMI has failed" in counted["StandardErrorContent"]

    def test_four_chunks_sent_at_once_run_on_the_four_gpus_together(
        self, clients, four_gpu_instance, emulator_env, tmp_path
    ):
        import uuid

        from include.local_aws.world import make_sample_clip
        from include.vod_sr.catalog import SrModel
        from include.vod_sr.commands import send_command
        from include.vod_sr.plan import Chunk, FileJob
        from include.vod_sr.script import chunk_keys, chunk_list, parse_result_lines, render_sr_script
        from include.vod_sr.sources import S3Object

        _, ssm, s3 = clients
        bucket = f"gpus-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        s3.upload_file(str(make_sample_clip(tmp_path / "clip.mp4", seconds=6, size="64x48")), bucket, "clip.mp4")
        # `realtime`: each model run lasts as long as the clip plays, so runs that overlap show in the timeline.
        model = SrModel(
            name="rt", title="rt", video_filter="realtime,scale=iw*2:ih*2", output_args=("-c:v", "libx264", "-an")
        )
        commands = []
        for index in range(4):
            files_key, results_key = chunk_keys("gpus", index)
            job = FileJob(index, S3Object(bucket, "clip.mp4"), S3Object(bucket, f"out/{index}.mp4"))
            s3.put_object(Bucket=bucket, Key=files_key, Body=chunk_list(Chunk(index, four_gpu_instance, (job,))))
            body = render_sr_script(
                model, "gpus", index, f"s3://{bucket}/{files_key}", f"s3://{bucket}/{results_key}", gpus=4
            )
            commands.append(body)
        command_ids = [
            send_command(ssm, four_gpu_instance, body, comment=f"gpus {n}", execution_timeout=120, delivery_timeout=60)
            for n, body in enumerate(commands)
        ]

        invocations = [wait_for_invocation(ssm, c, four_gpu_instance, timeout=120) for c in command_ids]

        for invocation in invocations:
            assert invocation["Status"] == "Success", invocation["StandardErrorContent"]
            assert [r["status"] for r in parse_result_lines(invocation["StandardOutputContent"]).values()] == ["ok"]
        slots = sorted(int(i["StandardErrorContent"].split("took slot ")[1].split()[0]) for i in invocations)
        assert slots == [0, 1, 2, 3]
        busy = emulator_env.timeline()[four_gpu_instance]["gpu_busy"]
        assert sorted(busy) == ["0", "1", "2", "3"]
        assert all(len(runs) == 1 for runs in busy.values())  # one model run each; probes and contact sheets aside
        runs = [runs[0] for runs in busy.values()]
        assert max(start for start, _ in runs) < min(end for _, end in runs)  # all four GPUs busy at once
        assert all(end - start >= 5 for start, end in runs)
