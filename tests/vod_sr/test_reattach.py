"""A retry of run_chunks re-attaches to what an earlier try sent instead of sending it again (issue 8, point 9).

The worker running run_chunks can die between two SendCommands (or right after one, before it learned the command
id: SendCommand has no idempotency token). The next try must find, in SSM's own record of this run's commands, the
chunks already sent: wait again for those still running, not send those that ended, and send only the rest.

Real HTTP to the emulator, whose agent runs each chunk's command. The chunk scripts are replaced by a `sleep` under
the real script's first line (the header SSM's record is searched by), so a chunk runs as long as the test needs.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from include.local_aws.world import boto_client
from include.vod_sr.catalog import BUILTIN_MODELS
from include.vod_sr.commands import get_invocation
from include.vod_sr.operators import RESEND_INDEX_BASE
from include.vod_sr.plan import BatchRequest, plan_batch
from include.vod_sr.script import script_header

LIVE = ("Pending", "InProgress", "Delayed")
EXECUTION_TIMEOUT = 120
DELIVERY_TIMEOUT = 30


class RecordingTi:
    def __init__(self) -> None:
        self.xcom: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value


class Lane:
    """One instance's lane as plan makes it (three one-file chunks), chunk scripts that sleep `seconds[chunk]`."""

    def __init__(self, endpoint_url: str, instance_id: str, seconds: dict[int, float], monkeypatch) -> None:
        self.instance_id = instance_id
        self.s3, self.ssm = boto_client("s3", endpoint_url), boto_client("ssm", endpoint_url)
        self.ec2 = boto_client("ec2", endpoint_url)
        bucket = f"reattach-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=bucket)
        keys = [f"in/{n}.mp4" for n in range(3)]
        for key in keys:
            self.s3.put_object(Bucket=bucket, Key=key, Body=b"not really a video")
        request = BatchRequest.from_params(
            {
                "sources": keys,
                "model": "cpu",
                "source_bucket": bucket,
                "output_bucket": bucket,
                "instance_ids": [instance_id],
                "chunk_size": 1,
                "execution_timeout": EXECUTION_TIMEOUT,
                "stop_when_done": False,
            }
        )
        (lane,) = plan_batch(request, self.s3, run_token=uuid.uuid4().hex[:16]).lanes()
        self.lane = {**lane, "model": BUILTIN_MODELS["cpu"].to_xcom()}
        self.token = lane["run_token"]

        def sleeping_script(model, run_token, chunk_index, *args, **kwargs) -> str:
            return (
                f"{script_header(run_token, chunk_index)} test\nsleep {seconds[chunk_index]}\necho chunk {chunk_index}"
            )

        monkeypatch.setattr("include.vod_sr.script.render_sr_script", sleeping_script)

    def operator(self, **kwargs: Any) -> Any:
        """A fresh RunChunksOperator for this lane: what a new try of the task starts with."""
        from include.vod_sr.operators import RunChunksOperator

        # Two out at once (the default is three per GPU slot): the scenarios below are written for two.
        return RunChunksOperator(
            task_id="run_chunks",
            lane=self.lane,
            poll_interval=0.5,
            delivery_timeout=DELIVERY_TIMEOUT,
            in_flight=2,
            **kwargs,
        )

    def commands_by_chunk(self) -> dict[int, list[dict[str, Any]]]:
        found: dict[int, list[dict[str, Any]]] = {}
        for command in self.ssm.list_commands(InstanceId=self.instance_id)["Commands"]:
            script = "\n".join(command["Parameters"]["commands"])
            for chunk in (0, 1, 2, RESEND_INDEX_BASE, RESEND_INDEX_BASE + 1):
                if script_header(self.token, chunk) in script:
                    found.setdefault(chunk, []).append(command)
        return found

    def wait_until_running(self, command_id: str) -> None:
        deadline = time.monotonic() + 30
        while (get_invocation(self.ssm, command_id, self.instance_id) or {}).get("Status") != "InProgress":
            assert time.monotonic() < deadline, f"command {command_id} never ran"
            time.sleep(0.2)

    def wait_until_ended(self, command_id: str) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            invocation = get_invocation(self.ssm, command_id, self.instance_id)
            if invocation is not None and invocation["Status"] not in LIVE:
                return invocation["Status"]
            time.sleep(0.2)
        raise AssertionError(f"command {command_id} did not end")

    def ssm_stop_instance(self) -> None:
        self.ec2.stop_instances(InstanceIds=[self.instance_id])

    def cancel_all(self) -> None:
        for commands in self.commands_by_chunk().values():
            for command in commands:
                if command["Status"] in LIVE:
                    self.ssm.cancel_command(CommandId=command["CommandId"])


@pytest.fixture
def lane_on(running_instance, emulator_env, monkeypatch):
    lanes: list[Lane] = []

    def make(seconds: dict[int, float]) -> Lane:
        lanes.append(Lane(emulator_env.endpoint_url, running_instance, seconds, monkeypatch))
        return lanes[-1]

    yield make
    for lane in lanes:
        lane.cancel_all()


def task_context() -> dict[str, Any]:
    return {"ti": RecordingTi(), "run_id": "manual__reattach-test"}


def defer(operator, context=None) -> Any:
    """Run the operator's execute until it defers; returns the trigger it deferred on."""
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context or task_context())
    return deferred.value.trigger


async def first_event(trigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


class WorkerDied(BaseException):
    """The task's process lost mid-call (SIGKILL, OOM): nothing in it handles this, as nothing could."""


def sends(emulator) -> int:
    return sum(call["action"] == "SendCommand" for call in emulator.calls())


class TestARetryReattachesInsteadOfResending:
    def test_retry_after_the_worker_died_between_sends_waits_on_live_chunks_and_sends_only_the_rest(
        self, lane_on, emulator_env
    ):
        lane = lane_on({0: 0, 1: 60, 2: 0})
        emulator_env.reset_calls()
        first = defer(lane.operator())
        first_sent = {entry["chunk"]: entry for entry in first.resume_state["entries"]}
        assert sorted(first_sent) == [0, 1] and sends(emulator_env) == 2  # two in flight, then deferred
        # The worker dies here: the deferral never reaches Airflow. Chunk 0 ends meanwhile, chunk 1 runs on.
        assert lane.wait_until_ended(first_sent[0]["command_id"]) == "Success"

        retry = defer(lane.operator())

        assert sends(emulator_env) == 3  # chunk 2 only
        by_chunk = lane.commands_by_chunk()
        assert {chunk: len(commands) for chunk, commands in by_chunk.items()} == {0: 1, 1: 1, 2: 1}
        waited_on = [command["command_id"] for command in retry.commands]
        assert waited_on == [first_sent[1]["command_id"], by_chunk[2][0]["CommandId"]]
        state = {entry["chunk"]: entry for entry in retry.resume_state["entries"]}
        # Chunk 0 succeeded in the first try: the state counts it instead of carrying it (compact between deferrals)
        assert sorted(state) == [1, 2] and retry.resume_state["succeeded"] == 1
        # The re-attached chunk keeps the bounds of its send: a retry does not extend them.
        assert state[1]["deadline"] == pytest.approx(first_sent[1]["deadline"], abs=5)
        assert state[1]["delivery_deadline"] == pytest.approx(first_sent[1]["delivery_deadline"], abs=5)

    def test_a_command_sent_although_sendcommand_never_answered_is_found_not_sent_again(self, lane_on, emulator_env):
        # SendCommand has no idempotency token: the request can reach SSM and its answer be lost with the worker that
        # sent it (a read timeout within the task is looked up at once: commands.send_chunk_once). Nothing on the
        # Airflow side ever learned that command's id.
        lane = lane_on({0: 60, 1: 60, 2: 60})
        first = lane.operator()
        real_send = first.send_ssm.send_command
        answered: list[str] = []

        def worker_dies_on_second_send(**kwargs):
            response = real_send(**kwargs)
            if answered:
                raise WorkerDied  # after SSM took the command, before its answer was read
            answered.append(response["Command"]["CommandId"])
            return response

        first.send_ssm.send_command = worker_dies_on_second_send
        emulator_env.reset_calls()
        with pytest.raises(WorkerDied):
            first.execute(task_context())  # the try fails; Airflow retries it

        retry = defer(lane.operator())

        assert sends(emulator_env) == 2  # chunks 0 and 1 by the first try; the retry sent nothing
        by_chunk = lane.commands_by_chunk()
        assert {chunk: len(commands) for chunk, commands in by_chunk.items()} == {0: 1, 1: 1}
        assert [command["command_id"] for command in retry.commands] == [
            by_chunk[0][0]["CommandId"],
            by_chunk[1][0]["CommandId"],
        ]

    def test_a_chunk_sent_twice_keeps_its_first_command_and_the_duplicate_is_cancelled(self, lane_on, emulator_env):
        # A chunk can still be in SSM twice: a resend whose ListCommands lookup lagged behind SSM (send_chunk_once), or
        # a try of a version whose botocore resent a SendCommand whose answer timed out.
        lane = lane_on({0: 60, 1: 60, 2: 60})
        first = lane.operator()
        real_send = first.send_ssm.send_command

        def sent_twice(**kwargs):
            response = real_send(**kwargs)
            real_send(**kwargs)
            return response

        first.send_ssm.send_command = sent_twice
        first_sent = {entry["chunk"]: entry for entry in defer(first).resume_state["entries"]}
        assert {chunk: len(commands) for chunk, commands in lane.commands_by_chunk().items()} == {0: 2, 1: 2}

        retry = defer(lane.operator())

        assert [command["command_id"] for command in retry.commands] == [
            first_sent[0]["command_id"],
            first_sent[1]["command_id"],
        ]
        for chunk in (0, 1):
            (duplicate,) = [
                command["CommandId"]
                for command in lane.commands_by_chunk()[chunk]
                if command["CommandId"] != first_sent[chunk]["command_id"]
            ]
            assert lane.wait_until_ended(duplicate) == "Cancelled"
            assert get_invocation(lane.ssm, first_sent[chunk]["command_id"], lane.instance_id)["Status"] in LIVE

    def test_a_retry_after_every_chunk_ended_sends_nothing_and_reports_the_outcomes(self, lane_on, emulator_env):
        from airflow.sdk.exceptions import AirflowFailException

        lane = lane_on({0: 0, 1: 0, 2: "x; exit 3"})  # chunk 2 fails
        first = lane.operator()
        first_sent = {entry["chunk"]: entry for entry in defer(first).resume_state["entries"]}
        for entry in first_sent.values():
            lane.wait_until_ended(entry["command_id"])
        # A later try that had sent chunk 2 as well (this one died before deferring on it).
        second = defer(lane.operator())
        (chunk_2,) = [entry for entry in second.resume_state["entries"] if entry["chunk"] == 2]
        lane.wait_until_ended(chunk_2["command_id"])
        emulator_env.reset_calls()

        with pytest.raises(AirflowFailException, match="1 of 3 chunk command.* chunk 2 failed"):
            lane.operator().execute(task_context())

        assert sends(emulator_env) == 0

    def test_a_retry_that_finds_every_chunk_sent_does_not_install_the_cli_again(self, lane_on, emulator_env):
        # The last resume may have released the instance already: a retry then only re-attaches and reports.
        from include.vod_sr.operators import CliInstall

        lane = lane_on({0: 0, 1: 0, 2: 0})
        for entry in defer(lane.operator()).resume_state["entries"]:  # chunks 0 and 1
            lane.wait_until_ended(entry["command_id"])
        for entry in defer(lane.operator()).resume_state["entries"]:  # a second try: re-attaches, sends chunk 2
            lane.wait_until_ended(entry["command_id"])
        emulator_env.reset_calls()

        done = lane.operator(install_cli=CliInstall(skip_install=True, timeout=60)).execute(task_context())

        assert done["outcomes"] == {"success": 3}
        assert sends(emulator_env) == 0  # no install command, no chunk

    def test_a_retry_after_chunks_were_sent_again_reattaches_to_the_resends(self, lane_on, emulator_env):
        import asyncio

        lane = lane_on({0: 60, 1: 60, 2: 60, RESEND_INDEX_BASE: 60, RESEND_INDEX_BASE + 1: 60})
        first = lane.operator()
        trigger = defer(first)
        for command in trigger.commands:
            lane.wait_until_running(command["command_id"])
        lane.ssm_stop_instance()  # both commands in flight die with the instance (SSM keeps them InProgress)
        event = asyncio.run(first_event(trigger))  # the wait sees the instance down in EC2
        assert sorted(c["invocation_status"] for c in event["commands"]) == ["InstanceLost", "InstanceLost"]
        with pytest.raises(TaskDeferred) as resent:
            first.resume(task_context(), event)  # starts the instance again, sends both chunks again
        resends = [command["command_id"] for command in resent.value.trigger.commands]
        assert sorted(lane.commands_by_chunk()) == [0, 1, RESEND_INDEX_BASE, RESEND_INDEX_BASE + 1]
        emulator_env.reset_calls()

        retry = defer(lane.operator())  # the worker died after sending the resends

        assert [command["command_id"] for command in retry.commands] == resends
        assert sends(emulator_env) == 0
        assert [(e["chunk"], e.get("resent")) for e in retry.resume_state["entries"]] == [(0, True), (1, True)]

    def test_a_first_try_asks_ssm_nothing_before_sending(self, lane_on, emulator_env):
        lane = lane_on({0: 0, 1: 0, 2: 0})
        emulator_env.reset_calls()

        defer(lane.operator())

        actions = [call["action"] for call in emulator_env.calls()]
        assert "ListCommands" not in actions  # no chunk list in S3 yet: nothing can have been sent
        assert actions.count("SendCommand") == 2


class StubListCommands:
    """Stub SSM client whose ListCommands paginator yields `commands` over two pages."""

    def __init__(self, commands: list[dict[str, Any]]) -> None:
        self.commands = commands
        self.calls: list[dict[str, Any]] = []

    def get_paginator(self, name):
        assert name == "list_commands"
        stub = self

        class Paginator:
            def paginate(self, **kwargs):
                stub.calls.append(kwargs)
                half = len(stub.commands) // 2
                return [{"Commands": stub.commands[:half]}, {"Commands": stub.commands[half:]}]

        return Paginator()


def listed(command_id: str, script: str, minute: int) -> dict[str, Any]:
    from datetime import UTC, datetime

    return {
        "CommandId": command_id,
        "Status": "InProgress",
        "RequestedDateTime": datetime(2026, 11, 29, 8, minute, tzinfo=UTC),
        "Parameters": {"commands": [f"exec /bin/bash -c '{script}\nset -euo pipefail' vod-sr"]},
    }


class TestSentChunkCommands:
    TOKEN = "0123456789abcdef"

    def test_finds_this_runs_chunks_by_their_script_header_oldest_first(self):
        from datetime import UTC, datetime

        from include.vod_sr.commands import sent_chunk_commands

        ssm = StubListCommands(
            [
                listed("dup-later", script_header(self.TOKEN, 3) + " model cpu", 7),
                listed("chunk-0", script_header(self.TOKEN, 0) + " model cpu", 5),
                listed("other-run", script_header("fedcba9876543210", 0) + " model cpu", 5),
                listed("longer-token", script_header(self.TOKEN + "ff", 1) + " model cpu", 5),
                listed("install", "# install the AWS CLI", 4),
                listed("dup-first", script_header(self.TOKEN, 3) + " model cpu", 6),
            ]
        )

        found = sent_chunk_commands(ssm, "i-1", self.TOKEN, datetime(2026, 11, 29, 8, 5, tzinfo=UTC))

        assert {chunk: [c["CommandId"] for c in commands] for chunk, commands in found.items()} == {
            0: ["chunk-0"],
            3: ["dup-first", "dup-later"],
        }
        # Bounded by the oldest chunk list, less a margin for the clocks of S3 and SSM.
        assert ssm.calls == [
            {"InstanceId": "i-1", "Filters": [{"key": "InvokedAfter", "value": "2026-11-29T07:55:00Z"}]}
        ]


class StubEc2:
    def __init__(self, state: str, launched_ago: float) -> None:
        from datetime import UTC, datetime, timedelta

        self.instance = {
            "State": {"Name": state},
            "LaunchTime": datetime.now(UTC) - timedelta(seconds=launched_ago),
        }

    def describe_instances(self, InstanceIds):
        return {"Reservations": [{"Instances": [self.instance]}]}


class TestWhenAChunkIsSentAgain:
    """Only a chunk whose command failed because its instance went down is sent again, and only once."""

    @pytest.fixture
    def operator(self, monkeypatch):
        from include.vod_sr.operators import RunChunksOperator

        lane = {"instance_id": "i-1", "run_token": "t", "output_bucket": "b", "execution_timeout": 60, "chunks": []}
        operator = RunChunksOperator(task_id="run_chunks", lane=lane, delivery_timeout=30)
        operator.calls = []
        monkeypatch.setattr(operator, "_resend_unfinished", lambda entry: operator.calls.append("resend"))
        monkeypatch.setattr(operator, "_merge_resent_results", lambda entry: operator.calls.append("merge"))
        return operator

    @staticmethod
    def ended(sent_ago: float, **extra) -> dict[str, Any]:
        return {
            "chunk": 0,
            "command_id": "c",
            "instance_id": "i-1",
            "delivery_deadline": time.time() - sent_ago + 30,
            "outcome": "failed",
            **extra,
        }

    @pytest.mark.parametrize(
        ("state", "launched_ago", "status", "expected"),
        [
            pytest.param("stopping", 600, "Failed", ["resend"], id="instance-stopping"),
            pytest.param("stopped", 600, "Failed", ["resend"], id="instance-stopped"),
            pytest.param("running", 10, "Failed", ["resend"], id="instance-started-again-since"),
            pytest.param("running", 600, "Failed", [], id="instance-up-all-along"),
            pytest.param("stopped", 600, "Cancelled", [], id="cancelled"),
            pytest.param("stopped", 600, "TimedOut", [], id="timed-out"),
        ],
    )
    def test_a_failed_chunk_is_sent_again_only_when_its_instance_went_down(
        self, operator, state, launched_ago, status, expected
    ):
        operator.ec2 = StubEc2(state, launched_ago)

        operator._after_end(self.ended(sent_ago=60), status)

        assert operator.calls == expected

    def test_a_resent_chunk_that_dies_again_is_not_sent_a_third_time(self, operator):
        operator.ec2 = StubEc2("stopped", 600)

        operator._after_end(self.ended(sent_ago=60, resent=True, first_command_id="c0"), "Failed")

        assert operator.calls == ["merge"]  # its files that ended are credited; the rest fail in the report

    def test_a_successful_chunk_is_not_sent_again(self, operator):
        operator.ec2 = StubEc2("stopped", 600)

        operator._after_end({**self.ended(sent_ago=60), "outcome": "success"}, "Success")

        assert operator.calls == []
