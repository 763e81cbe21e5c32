from __future__ import annotations

import asyncio
import time

import pytest
from botocore.exceptions import ClientError

from include.local_aws.world import boto_client
from include.vod_sr.commands import (
    CommandFailed,
    Outcome,
    describe_invocation,
    get_invocation,
    invocation_outcome,
    run_and_wait,
    send_command,
)
from include.vod_sr.triggers import SsmCommandsTrigger

COMMAND_ID = "11111111-2222-3333-4444-555555555555"
INSTANCE_ID = "i-0123456789abcdef0"
MISSING = ClientError({"Error": {"Code": "InvocationDoesNotExist", "Message": ""}}, "GetCommandInvocation")


def collect_events(trigger) -> list[dict]:
    async def run() -> list[dict]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(run())


class StubAsyncSsm:
    """Stub aiobotocore SSM client: answers GetCommandInvocation from a script of statuses per command
    (None: not known yet); the last status of a script repeats."""

    def __init__(self, statuses: dict[str, list[str | None]]) -> None:
        self.statuses = {command_id: list(script) for command_id, script in statuses.items()}
        self.polls = 0

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def get_command_invocation(self, CommandId, InstanceId):
        self.polls += 1
        script = self.statuses[CommandId]
        status = script.pop(0) if len(script) > 1 else script[0]
        if status is None:
            raise MISSING
        return {"Status": status}


def stub_trigger(monkeypatch, client: StubAsyncSsm, **bounds) -> SsmCommandsTrigger:
    class StubHook:
        async def get_async_conn(self):
            return client

    monkeypatch.setattr(SsmCommandsTrigger, "hook", lambda self: StubHook())
    now = time.time()
    commands = [
        {
            "command_id": command_id,
            "instance_id": INSTANCE_ID,
            "deadline": bounds.get("deadline", now + 60),
            "delivery_deadline": bounds.get("delivery_deadline", now + 60),
        }
        for command_id in client.statuses
    ]
    return SsmCommandsTrigger(commands=commands, poll_interval=0.01)


class TestInvocationOutcome:
    @pytest.mark.parametrize("status", [None, "Pending", "InProgress", "Delayed"])
    def test_pending(self, status):
        assert invocation_outcome(status) is Outcome.PENDING

    @pytest.mark.parametrize("status", ["Cancelled", "Cancelling", "TimedOut", "Failed"])
    def test_failed(self, status):
        assert invocation_outcome(status) is Outcome.FAILED

    def test_success(self):
        assert invocation_outcome("Success") is Outcome.SUCCESS

    def test_unknown_status_is_not_guessed(self):
        with pytest.raises(ValueError, match="unknown SSM invocation status 'Exploded'"):
            invocation_outcome("Exploded")


class TestSsmCommandsTrigger:
    def test_unknown_invocation_right_after_send_is_pending_not_success(self, monkeypatch):
        client = StubAsyncSsm({COMMAND_ID: [None, None, "Pending", "InProgress", "Success"]})

        (event,) = collect_events(stub_trigger(monkeypatch, client))

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert client.polls == 5

    def test_failure_is_reported_with_the_invocation_status(self, monkeypatch):
        (event,) = collect_events(stub_trigger(monkeypatch, StubAsyncSsm({COMMAND_ID: ["InProgress", "Failed"]})))

        (command,) = event["commands"]
        assert (command["command_id"], command["outcome"], command["invocation_status"]) == (
            COMMAND_ID,
            "failed",
            "Failed",
        )

    def test_fires_when_the_first_of_several_commands_ends(self, monkeypatch):
        client = StubAsyncSsm({"running": ["InProgress"], "queued": ["InProgress", "InProgress", "Success"]})

        (event,) = collect_events(stub_trigger(monkeypatch, client))

        assert [(c["command_id"], c["outcome"]) for c in event["commands"]] == [("queued", "success")]

    def test_polls_one_call_per_command_not_per_file(self, monkeypatch):
        client = StubAsyncSsm({"a": ["InProgress"] * 9 + ["Success"], "b": ["InProgress"]})

        collect_events(stub_trigger(monkeypatch, client))

        assert client.polls == 20  # 10 rounds x 2 commands

    def test_never_listed_invocation_ends_at_the_delivery_bound(self, monkeypatch):
        trigger = stub_trigger(monkeypatch, StubAsyncSsm({COMMAND_ID: [None]}), delivery_deadline=time.time() + 0.05)

        (event,) = collect_events(trigger)

        assert [c["outcome"] for c in event["commands"]] == ["undelivered"]

    def test_long_running_command_ends_at_the_deadline(self, monkeypatch):
        trigger = stub_trigger(monkeypatch, StubAsyncSsm({COMMAND_ID: ["InProgress"]}), deadline=time.time() + 0.05)

        (event,) = collect_events(trigger)

        assert [(c["outcome"], c["invocation_status"]) for c in event["commands"]] == [("timeout", "InProgress")]

    def test_serializes_to_its_own_arguments(self):
        commands = [{"command_id": "c", "instance_id": "i", "deadline": 2.0, "delivery_deadline": 1.0}]
        trigger = SsmCommandsTrigger(
            commands=commands,
            poll_interval=5,
            resume_state=[{"chunk": 0}],
            aws_conn_id="aws_x",
            region_name="eu-west-1",
        )

        path, kwargs = trigger.serialize()

        assert path == "include.vod_sr.triggers.SsmCommandsTrigger"
        assert SsmCommandsTrigger(**kwargs).serialize() == (path, kwargs)


class TestDescribeInvocation:
    def test_failure_detail_has_status_details_exit_code_and_tails(self):
        invocation = {
            "CommandId": COMMAND_ID,
            "InstanceId": INSTANCE_ID,
            "Status": "Failed",
            "StatusDetails": "Failed",
            "ResponseCode": 1,
            "StandardErrorContent": "\n".join(f"err line {n}" for n in range(100)),
            "StandardOutputContent": "VODSR-RESULT\t0\tfailed\t0\t3\tffmpeg\n",
        }

        text = describe_invocation(invocation)

        assert "Status=Failed StatusDetails=Failed exit code=1" in text
        assert "err line 99" in text and "err line 79" not in text
        assert "VODSR-RESULT" in text


class TestAgainstTheEmulator:
    """Real HTTP to the emulator, whose agent really runs the script."""

    def test_trigger_waits_for_a_command_ssm_does_not_list_yet(self, running_instance, emulator_env):
        # SSM's eventual consistency: the invocation is unknown for 2 s after SendCommand.
        emulator_env.set_faults({"instances": {running_instance: {"invocation_visibility_seconds": 2}}})
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        command_id = send_command(
            ssm, running_instance, "sleep 3; echo done", comment="t", execution_timeout=60, delivery_timeout=30
        )
        assert get_invocation(ssm, command_id, running_instance) is None
        command = {
            "command_id": command_id,
            "instance_id": running_instance,
            "deadline": time.time() + 60,
            "delivery_deadline": time.time() + 30,
        }

        (event,) = collect_events(SsmCommandsTrigger(commands=[command], poll_interval=0.5))

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert get_invocation(ssm, command_id, running_instance)["StandardOutputContent"] == "done\n"

    def test_provider_trigger_reports_success_before_the_command_ran(self, running_instance, emulator_env):
        """Why vod-sr has its own trigger: provider 9.39.0's lists invocations once and succeeds on an empty list."""
        from airflow.providers.amazon.aws.triggers.ssm import SsmRunCommandTrigger

        emulator_env.set_faults({"instances": {running_instance: {"invocation_visibility_seconds": 5}}})
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        command_id = send_command(
            ssm, running_instance, "sleep 2; exit 7", comment="t", execution_timeout=60, delivery_timeout=30
        )

        events = collect_events(SsmRunCommandTrigger(command_id=command_id, waiter_delay=1, aws_conn_id="aws_default"))

        assert [e["status"] for e in events] == ["success"]  # yet the command exits 7 two seconds later

    def test_run_and_wait_fails_with_stderr(self, running_instance, emulator_env):
        ssm = boto_client("ssm", emulator_env.endpoint_url)

        with pytest.raises(CommandFailed) as failure:
            run_and_wait(
                ssm,
                running_instance,
                "echo starting; echo 'E: Unable to locate package' >&2; exit 100",
                comment="t",
                timeout=30,
                poll_interval=1,
                delivery_timeout=30,
            )

        assert "Status=Failed" in str(failure.value) and "exit code=100" in str(failure.value)
        assert "E: Unable to locate package" in str(failure.value)

    def test_run_and_wait_returns_the_invocation(self, running_instance, emulator_env):
        ssm = boto_client("ssm", emulator_env.endpoint_url)

        invocation = run_and_wait(
            ssm, running_instance, "echo ok", comment="t", timeout=30, poll_interval=1, delivery_timeout=30
        )

        assert (invocation["Status"], invocation["StandardOutputContent"]) == ("Success", "ok\n")
