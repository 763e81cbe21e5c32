from __future__ import annotations

import asyncio
import io
import threading
import time
from datetime import UTC, datetime

import pytest
from airflow.sdk.exceptions import TaskDeferred
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from include.local_aws.world import boto_client
from include.vod_sr.commands import (
    BOTO_CONFIG,
    POLL_MAX_ATTEMPTS,
    SEND_CONFIG,
    CommandFailed,
    Outcome,
    describe_invocation,
    full_output_uri,
    get_invocation,
    invocation_outcome,
    is_transient_error,
    read_output_tail,
    run_and_wait,
    send_chunk_once,
    send_command,
)
from include.vod_sr.instance import command_comment
from include.vod_sr.script import script_header
from include.vod_sr.triggers import SsmCommandsTrigger

COMMAND_ID = "11111111-2222-3333-4444-555555555555"
INSTANCE_ID = "i-0123456789abcdef0"
MISSING = ClientError({"Error": {"Code": "InvocationDoesNotExist", "Message": ""}}, "GetCommandInvocation")
ENDPOINT = "https://ssm.us-east-1.amazonaws.com"


def aws_error(code: str, http_status: int, message: str = "") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": http_status}},
        "GetCommandInvocation",
    )


THROTTLED = aws_error("ThrottlingException", 400, "Rate exceeded")
TRANSIENT_ERRORS = [
    pytest.param(THROTTLED, id="ThrottlingException"),
    pytest.param(aws_error("Throttling", 400), id="Throttling"),
    pytest.param(aws_error("RequestLimitExceeded", 503), id="RequestLimitExceeded"),
    pytest.param(aws_error("InternalServerError", 500), id="InternalServerError"),
    pytest.param(aws_error("ServiceUnavailable", 503), id="ServiceUnavailable"),
    pytest.param(aws_error("SomethingNew", 502), id="any-5xx"),
    pytest.param(EndpointConnectionError(endpoint_url=ENDPOINT), id="EndpointConnectionError"),
    pytest.param(ConnectionClosedError(endpoint_url=ENDPOINT), id="ConnectionClosedError"),
    pytest.param(ReadTimeoutError(endpoint_url=ENDPOINT), id="ReadTimeoutError"),
    pytest.param(ConnectTimeoutError(endpoint_url=ENDPOINT), id="ConnectTimeoutError"),
]
PERMANENT_ERRORS = [
    pytest.param(aws_error("AccessDeniedException", 400, "not authorized"), id="AccessDeniedException"),
    pytest.param(aws_error("InvalidInstanceId", 400), id="InvalidInstanceId"),
    pytest.param(aws_error("ExpiredTokenException", 400), id="ExpiredTokenException"),
    pytest.param(NoCredentialsError(), id="NoCredentialsError"),
]


def collect_events(trigger) -> list[dict]:
    async def run() -> list[dict]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(run())


class StubAsyncSsm:
    """Stub aiobotocore SSM client: answers GetCommandInvocation from a script of statuses per command
    (None: not known yet; an exception: raised); the last status of a script repeats. CancelCommand raises for
    the commands in `failing_cancels` and records the others."""

    def __init__(self, statuses: dict[str, list], failing_cancels: tuple[str, ...] = ()) -> None:
        self.statuses = {command_id: list(script) for command_id, script in statuses.items()}
        self.polls = 0
        self.failing_cancels = failing_cancels
        self.cancelled: list[str] = []

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
        if isinstance(status, Exception):
            raise status
        return {"Status": status}

    async def cancel_command(self, CommandId, InstanceIds):
        if CommandId in self.failing_cancels:
            raise aws_error("InternalServerError", 500, "cancel failed")
        self.cancelled.append(CommandId)


class StubAsyncEc2:
    """Stub aiobotocore EC2 client: every instance asked about is running, launched long ago."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def describe_instances(self, InstanceIds):
        launched = datetime(2026, 1, 1, tzinfo=UTC)
        instances = [{"InstanceId": i, "State": {"Name": "running"}, "LaunchTime": launched} for i in InstanceIds]
        return {"Reservations": [{"Instances": instances}]}


def stub_trigger(monkeypatch, client: StubAsyncSsm, **bounds) -> SsmCommandsTrigger:
    class StubHook:
        def __init__(self, conn) -> None:
            self.conn = conn

        async def get_async_conn(self):
            return self.conn

    monkeypatch.setattr(SsmCommandsTrigger, "hook", lambda self: StubHook(client))
    monkeypatch.setattr(SsmCommandsTrigger, "ec2_hook", lambda self: StubHook(StubAsyncEc2()))
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

    @pytest.mark.parametrize("error", TRANSIENT_ERRORS)
    def test_transient_errors_while_the_command_runs_are_pending_and_counted(self, monkeypatch, error):
        client = StubAsyncSsm({COMMAND_ID: ["InProgress", error, error, error, "InProgress", "Success"]})

        (event,) = collect_events(stub_trigger(monkeypatch, client))

        assert event["status"] == "ended"
        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert event["transient_errors"] == {COMMAND_ID: 3}

    def test_transient_errors_after_the_delivery_bound_do_not_make_a_running_command_undelivered(self, monkeypatch):
        client = StubAsyncSsm({COMMAND_ID: ["InProgress", THROTTLED, THROTTLED, "Success"]})

        (event,) = collect_events(stub_trigger(monkeypatch, client, delivery_deadline=time.time() - 1))

        assert [c["outcome"] for c in event["commands"]] == ["success"]

    def test_transient_errors_are_counted_per_command_also_for_those_still_running(self, monkeypatch):
        client = StubAsyncSsm({"running": ["InProgress", THROTTLED, "InProgress"], "ends": ["InProgress", "Success"]})

        (event,) = collect_events(stub_trigger(monkeypatch, client))

        assert event["transient_errors"] == {"running": 1, "ends": 0}

    def test_transient_errors_until_the_deadline_end_in_timeout(self, monkeypatch):
        client = StubAsyncSsm({COMMAND_ID: ["InProgress", aws_error("InternalServerError", 500)]})

        (event,) = collect_events(stub_trigger(monkeypatch, client, deadline=time.time() + 0.1))

        assert [(c["outcome"], c["invocation_status"]) for c in event["commands"]] == [("timeout", None)]
        assert event["transient_errors"][COMMAND_ID] >= 1

    @pytest.mark.parametrize("error", PERMANENT_ERRORS)
    def test_an_error_no_retry_fixes_ends_the_wait_at_once_with_a_clear_message(self, monkeypatch, error):
        client = StubAsyncSsm({COMMAND_ID: [error, "Success"]})

        (event,) = collect_events(stub_trigger(monkeypatch, client))

        assert event["status"] == "error"
        assert client.polls == 1
        assert f"cannot read SSM command {COMMAND_ID} on {INSTANCE_ID}" in event["message"]
        assert (error.response["Error"]["Code"] if isinstance(error, ClientError) else "NoCredentialsError") in (
            event["message"]
        )

    def test_on_kill_cancels_every_command_even_when_one_cancel_fails(self, monkeypatch):
        client = StubAsyncSsm({"a": ["InProgress"], "b": ["InProgress"], "c": ["InProgress"]}, failing_cancels=("a",))
        trigger = stub_trigger(monkeypatch, client)

        asyncio.run(trigger.on_kill())

        assert client.cancelled == ["b", "c"]

    def test_waiting_for_all_fires_once_with_every_command_when_the_last_ends(self, monkeypatch):
        client = StubAsyncSsm(
            {"a": ["InProgress", "Success"], "b": ["InProgress", "InProgress", "InProgress", "Failed"]}
        )
        trigger = stub_trigger(monkeypatch, client)
        trigger.wait_for_all = True

        (event,) = collect_events(trigger)

        assert [(c["command_id"], c["outcome"]) for c in event["commands"]] == [("a", "success"), ("b", "failed")]
        assert client.polls == 2 + 4  # an ended command is not polled again

    def test_by_default_it_fires_at_the_first_end(self, monkeypatch):
        client = StubAsyncSsm({"a": ["InProgress", "Success"], "b": ["InProgress", "InProgress", "Failed"]})

        (event,) = collect_events(stub_trigger(monkeypatch, client))

        assert [c["command_id"] for c in event["commands"]] == ["a"]

    def test_no_poll_before_not_before(self, monkeypatch):
        client = StubAsyncSsm({"a": ["Success"]})
        trigger = stub_trigger(monkeypatch, client)
        trigger.not_before = time.time() + 1.5
        started = time.monotonic()

        (event,) = collect_events(trigger)

        assert time.monotonic() - started >= 1.4 and event["commands"][0]["outcome"] == "success"

    def test_serializes_to_its_own_arguments(self):
        commands = [{"command_id": "c", "instance_id": "i", "deadline": 2.0, "delivery_deadline": 1.0}]
        trigger = SsmCommandsTrigger(
            commands=commands,
            poll_interval=5,
            resume_state=[{"chunk": 0}],
            aws_conn_id="aws_x",
            region_name="eu-west-1",
            wait_for_all=True,
            not_before=1234.5,
        )

        path, kwargs = trigger.serialize()

        assert path == "include.vod_sr.triggers.SsmCommandsTrigger"
        assert SsmCommandsTrigger(**kwargs).serialize() == (path, kwargs)


class TestIsTransientError:
    @pytest.mark.parametrize("error", TRANSIENT_ERRORS)
    def test_transient(self, error):
        assert is_transient_error(error)

    @pytest.mark.parametrize("error", [*PERMANENT_ERRORS, pytest.param(MISSING, id="InvocationDoesNotExist")])
    def test_not_transient(self, error):
        assert not is_transient_error(error)


class StubSsm:
    """Stub boto3 SSM client for the operator: GetCommandInvocation answers Success or raises `read_error`;
    CancelCommand raises for `failing_cancels` and records the others."""

    def __init__(self, read_error: Exception | None = None, failing_cancels: tuple[str, ...] = ()) -> None:
        self.read_error = read_error
        self.failing_cancels = failing_cancels
        self.cancelled: list[str] = []

    def get_command_invocation(self, CommandId, InstanceId):
        if self.read_error is not None:
            raise self.read_error
        return {"CommandId": CommandId, "InstanceId": InstanceId, "Status": "Success", "ResponseCode": 0}

    def cancel_command(self, CommandId, InstanceIds):
        if CommandId in self.failing_cancels:
            raise aws_error("ThrottlingException", 400, "Rate exceeded")
        self.cancelled.append(CommandId)


class RecordingTi:
    def __init__(self) -> None:
        self.xcom: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value


def sent_entry(command_id: str, outcome: str | None = None, transient_errors: int = 0) -> dict:
    return {
        "chunk": int(command_id[-1]) if command_id[-1].isdigit() else 0,
        "command_id": command_id,
        "instance_id": INSTANCE_ID,
        "deadline": time.time() + 60,
        "delivery_deadline": time.time() + 60,
        "outcome": outcome,
        "transient_errors": transient_errors,
    }


def chunks_operator(ssm, chunk_count: int, monkeypatch):
    from include.vod_sr.operators import RunChunksOperator

    lane = {"instance_id": INSTANCE_ID, "run_token": "run-a", "stop_when_done": True, "chunks": [{}] * chunk_count}
    operator = RunChunksOperator(task_id="run_chunks", lane=lane)
    operator.ssm = ssm
    monkeypatch.setattr(operator, "_release_early", lambda: 0)
    return operator


class TestRunChunksOperatorAndAwsErrors:
    def test_a_transient_error_reading_an_ended_command_is_logged_and_counted_not_fatal(self, monkeypatch, capsys):
        operator = chunks_operator(StubSsm(read_error=THROTTLED), 1, monkeypatch)
        entry = sent_entry("c0", outcome="success")

        operator._report_end(entry)

        assert entry["transient_errors"] == 1
        assert (
            "reading its command c0 failed (ThrottlingException (HTTP 400): Rate exceeded)" in capsys.readouterr().out
        )

    def test_a_permanent_error_reading_an_ended_command_still_fails(self, monkeypatch):
        operator = chunks_operator(StubSsm(read_error=aws_error("AccessDeniedException", 400)), 1, monkeypatch)

        with pytest.raises(ClientError, match="AccessDenied"):
            operator._report_end(sent_entry("c0", outcome="success"))

    def test_resume_adds_the_triggers_counts_and_pushes_the_lanes_total(self, monkeypatch):
        operator = chunks_operator(StubSsm(), 2, monkeypatch)
        sent = [sent_entry("c0", outcome="success", transient_errors=1), sent_entry("c1")]
        event = {
            "status": "ended",
            "commands": [{**sent[1], "outcome": "success", "invocation_status": "Success"}],
            "transient_errors": {"c1": 4},
            "resume_state": sent,
        }
        ti = RecordingTi()

        result = operator.resume({"ti": ti}, event)

        assert [(e["outcome"], e["transient_errors"]) for e in sent] == [("success", 1), ("success", 4)]
        assert ti.xcom == {"transient_aws_errors": 5}
        assert result == {"chunks": 2, "outcomes": {"success": 2}}  # counts in XCom, not an entry per chunk

    def test_an_error_event_fails_the_task_with_the_triggers_message(self, monkeypatch):
        from airflow.sdk.exceptions import AirflowFailException

        operator = chunks_operator(StubSsm(), 1, monkeypatch)
        event = {
            "status": "error",
            "message": "cannot read SSM command c0 on i-1: AccessDeniedException (HTTP 400)",
            "commands": [],
            "transient_errors": {"c0": 2},
            "resume_state": [sent_entry("c0")],
        }
        ti = RecordingTi()

        with pytest.raises(AirflowFailException, match="AccessDeniedException"):
            operator.resume({"ti": ti}, event)
        assert ti.xcom == {"transient_aws_errors": 2}

    def test_on_kill_cancels_every_live_command_even_when_one_cancel_fails(self, monkeypatch):
        ssm = StubSsm(failing_cancels=("c0",))
        operator = chunks_operator(ssm, 4, monkeypatch)
        operator._sent = [sent_entry("c0"), sent_entry("c1"), sent_entry("c2", outcome="success"), sent_entry("c3")]

        operator.on_kill()

        assert ssm.cancelled == ["c1", "c3"]

    def test_the_report_shows_the_lanes_transient_errors(self):
        from include.vod_sr.report import build_report, format_table

        report = build_report(
            run_id="r", run_token="t", params={}, planned=[], verified=[], skipped=[], transient_aws_errors=[3, None, 1]
        )

        assert report["transient_aws_errors"] == 4
        assert format_table(report).splitlines()[-1] == "transient AWS errors: 4"

    def test_a_failed_runs_report_links_the_whole_output_of_its_commands(self):
        from include.vod_sr.plan import FileJob
        from include.vod_sr.report import build_report, format_table
        from include.vod_sr.sources import S3Object

        job = FileJob(0, S3Object("src-bucket", "a.mp4"), S3Object("out-bucket", "a_sr.mp4"))
        params = {"output_bucket": "out-bucket"}

        failed = build_report(run_id="r", run_token="tok", params=params, planned=[job], verified=[], skipped=[])
        done = build_report(run_id="r", run_token="tok", params=params, planned=[], verified=[], skipped=[job])

        assert failed["command_output"] == "s3://out-bucket/vod-sr-runs/tok/ssm-output/"
        assert "whole output of the run's SSM commands: s3://out-bucket/vod-sr-runs/tok/ssm-output/" in format_table(
            failed
        )
        assert "command_output" not in done


KEY_URL = (
    f"out-bucket/vod-sr-runs/tok/ssm-output/{COMMAND_ID}/{INSTANCE_ID}/awsrunShellScript/0.awsrunShellScript/stderr"
)


def failed_invocation(stderr: str, stderr_url: str = "") -> dict:
    return {
        "CommandId": COMMAND_ID,
        "InstanceId": INSTANCE_ID,
        "Status": "Failed",
        "StatusDetails": "Failed",
        "ResponseCode": 1,
        "StandardErrorContent": stderr,
        "StandardErrorUrl": stderr_url,
    }


class StubS3:
    """Stub boto3 S3 client for the ranged GetObject that reads an output's tail: serves `body` as S3 does (a suffix
    range gives the last bytes and their Content-Range), or raises `error`."""

    def __init__(self, body: bytes = b"", error: Exception | None = None) -> None:
        self.body, self.error = body, error

    def get_object(self, Bucket, Key, Range):
        if self.error is not None:
            raise self.error
        start = max(0, len(self.body) - int(Range.removeprefix("bytes=-")))
        return {
            "Body": io.BytesIO(self.body[start:]),
            "ContentRange": f"bytes {start}-{len(self.body) - 1}/{len(self.body)}",
        }


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

    def test_the_tails_come_from_the_whole_output_in_s3_with_its_link(self):
        whole = "".join(f"[h264] warning {n}\n" for n in range(2000)) + "THE REAL ERROR\n"
        invocation = failed_invocation(stderr=whole[:8000], stderr_url=f"https://s3.eu-west-1.amazonaws.com/{KEY_URL}")

        text = describe_invocation(invocation, StubS3(whole.encode()))

        assert f"--- last 20 lines of stderr (all of it: s3://{KEY_URL}) ---" in text
        assert text.endswith("[h264] warning 1999\nTHE REAL ERROR")

    def test_without_a_copy_in_s3_a_cut_stderr_says_it_is_not_the_end(self):
        text = describe_invocation(failed_invocation(stderr="x" * 8000), StubS3(b"unused"))

        assert (
            "--- last 20 lines of the first 8,000 characters of stderr, all that GetCommandInvocation returns: the "
            "output is longer and this is not its end (SSM stored no copy in S3) ---"
        ) in text

    def test_an_unreadable_copy_falls_back_to_the_cut_text_and_still_links_it(self):
        missing = ClientError({"Error": {"Code": "NoSuchKey", "Message": ""}}, "GetObject")
        invocation = failed_invocation(stderr="x" * 8000, stderr_url=f"https://s3.amazonaws.com/{KEY_URL}")

        text = describe_invocation(invocation, StubS3(error=missing))

        assert f"the output is longer and this is not its end (all of it: s3://{KEY_URL}) ---" in text

    def test_a_tail_read_from_the_middle_of_the_copy_starts_at_a_whole_line(self):
        whole = "".join(f"{n:05d}" + "y" * 9994 + "\n" for n in range(20)).encode()  # 10,000 bytes a line

        tail = read_output_tail(StubS3(whole), f"s3://{KEY_URL}")

        assert [line[:5] for line in tail.splitlines()] == [f"{n:05d}" for n in range(14, 20)]

    @pytest.mark.parametrize(
        ("url", "uri"),
        [
            pytest.param(f"https://s3.eu-west-1.amazonaws.com/{KEY_URL}", f"s3://{KEY_URL}", id="path-style"),
            pytest.param(f"https://s3.amazonaws.com/{KEY_URL}", f"s3://{KEY_URL}", id="us-east-1-global"),
            pytest.param(
                "https://out-bucket.s3.eu-west-1.amazonaws.com/" + KEY_URL.partition("/")[2],
                f"s3://{KEY_URL}",
                id="virtual-hosted",
            ),
            pytest.param("", None, id="no-output-bucket"),
        ],
    )
    def test_the_link_is_ssms_own_url(self, url, uri):
        assert full_output_uri({"StandardErrorUrl": url}, "stderr") == uri


def sent_for_the_wait(ssm, instance_id: str, script: str, execution_timeout: int = 60) -> dict:
    """Send `script` and describe its command as run_chunks hands it to the wait (sent now, delivered within 30 s)."""
    now = time.time()
    command_id = send_command(
        ssm, instance_id, script, comment="t", execution_timeout=execution_timeout, delivery_timeout=30
    )
    return {
        "command_id": command_id,
        "instance_id": instance_id,
        "deadline": now + execution_timeout + 30,
        "delivery_deadline": now + 30,
        "sent_at": now,
    }


class TestAgainstTheEmulator:
    """Real HTTP to the emulator, whose agent really runs the script."""

    @staticmethod
    def chunk_commands(ssm, instance_id: str, header: str) -> list[dict]:
        listed = ssm.list_commands(InstanceId=instance_id)["Commands"]
        return [c for c in listed if header in "\n".join(c["Parameters"]["commands"])]

    def test_a_send_whose_answer_is_lost_is_one_command_not_two(self, running_instance, emulator_env):
        # The emulator accepts the SendCommand and drops the connection before answering (`send_answers_lost`), as
        # a read timeout or a dropped connection leaves a caller: SSM has the command, the caller does not know it.
        emulator_env.set_faults({"instances": {running_instance: {"send_answers_lost": 1}}})
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        header = script_header("0123456789abcdef", 7)
        slept: list[float] = []

        command_id = send_chunk_once(
            boto_client("ssm", emulator_env.endpoint_url, SEND_CONFIG),
            ssm,
            running_instance,
            f"{header}\necho once",
            run_token="0123456789abcdef",
            chunk=7,
            sleep=slept.append,
            comment="t",
            execution_timeout=60,
            delivery_timeout=30,
        )

        assert [c["CommandId"] for c in self.chunk_commands(ssm, running_instance, header)] == [command_id]
        assert slept == []  # found at once, nothing sent again

    def test_botocore_alone_resends_a_send_whose_answer_is_lost(self, running_instance, emulator_env):
        # Why send_chunk_once exists: with the usual retrying client the same loss runs the chunk twice.
        emulator_env.set_faults({"instances": {running_instance: {"send_answers_lost": 1}}})
        ssm = boto_client("ssm", emulator_env.endpoint_url, BOTO_CONFIG)
        header = script_header("fedcba9876543210", 3)

        send_command(
            ssm, running_instance, f"{header}\necho twice", comment="t", execution_timeout=60, delivery_timeout=30
        )

        assert len(self.chunk_commands(ssm, running_instance, header)) == 2

    def test_a_send_that_never_reached_ssm_is_sent_again(self, running_instance, emulator_env):
        emulator_env.set_faults({"throttle_fraction": 1.0})  # every SSM call throttled: nothing taken
        ssm = boto_client("ssm", emulator_env.endpoint_url, SEND_CONFIG)
        header = script_header("00112233445566ff", 1)

        def lift_the_throttle(seconds: float) -> None:
            emulator_env.set_faults({"throttle_fraction": 0.0})

        command_id = send_chunk_once(
            ssm,
            ssm,
            running_instance,
            f"{header}\necho resent",
            run_token="00112233445566ff",
            chunk=1,
            sleep=lift_the_throttle,
            comment="t",
            execution_timeout=60,
            delivery_timeout=30,
        )

        assert [c["CommandId"] for c in self.chunk_commands(ssm, running_instance, header)] == [command_id]

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

    def test_trigger_ends_a_command_whose_instance_went_down_though_ssm_still_says_in_progress(
        self, running_instance, emulator_env
    ):
        ssm, ec2 = boto_client("ssm", emulator_env.endpoint_url), boto_client("ec2", emulator_env.endpoint_url)
        command = sent_for_the_wait(ssm, running_instance, "sleep 60", execution_timeout=120)
        command_id = command["command_id"]
        while (get_invocation(ssm, command_id, running_instance) or {}).get("Status") != "InProgress":
            assert time.time() < command["sent_at"] + 20, "the command never ran"
            time.sleep(0.2)
        ec2.stop_instances(InstanceIds=[running_instance])

        started = time.monotonic()
        (event,) = collect_events(SsmCommandsTrigger(commands=[command], poll_interval=0.5))

        assert [(c["outcome"], c["invocation_status"]) for c in event["commands"]] == [("failed", "InstanceLost")]
        assert time.monotonic() - started < 10
        assert get_invocation(ssm, command_id, running_instance)["Status"] == "InProgress"  # SSM cannot tell

    def test_trigger_that_cannot_ask_ec2_goes_on_with_ssms_statuses(self, running_instance, emulator_env, capsys):
        denied = {"denied_actions": ["DescribeInstances"], "denied_error": "UnauthorizedOperation"}
        emulator_env.set_faults({"instances": {running_instance: denied}})
        command = sent_for_the_wait(boto_client("ssm", emulator_env.endpoint_url), running_instance, "sleep 1")

        (event,) = collect_events(SsmCommandsTrigger(commands=[command], poll_interval=0.5))

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert f"Cannot check the instances {running_instance} in EC2 (UnauthorizedOperation" in capsys.readouterr().out

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

    def test_quick_polls_end_a_short_command_without_waiting_a_whole_interval(self, running_instance, emulator_env):
        # The CLI install when the AMI has the CLI: it ends within a second or two, the first chunk waits for it.
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        started = time.monotonic()

        invocation = run_and_wait(
            ssm,
            running_instance,
            "echo ok",
            comment="t",
            timeout=60,
            poll_interval=30,
            delivery_timeout=30,
            quick_polls=10,
        )

        assert (invocation["Status"], invocation["StandardOutputContent"]) == ("Success", "ok\n")
        assert time.monotonic() - started < 10  # the waiter alone sleeps its 30 s interval after its first read

    def test_run_and_wait_allows_delivery_plus_execution(self, running_instance, emulator_env):
        # The agent is offline when the command is sent (the instance is booting): SSM delivers it about 3 s later,
        # and its execution timeout (3 s) starts only then.
        ec2, ssm = boto_client("ec2", emulator_env.endpoint_url), boto_client("ssm", emulator_env.endpoint_url)
        ec2.stop_instances(InstanceIds=[running_instance])
        ec2.get_waiter("instance_stopped").wait(InstanceIds=[running_instance], WaiterConfig={"Delay": 0.2})
        boot = threading.Timer(2, lambda: ec2.start_instances(InstanceIds=[running_instance]))
        boot.start()
        started = time.monotonic()
        try:
            invocation = run_and_wait(
                ssm, running_instance, "sleep 2; echo ok", comment="t", timeout=3, poll_interval=1, delivery_timeout=30
            )
        finally:
            boot.join()

        assert (invocation["Status"], invocation["StandardOutputContent"]) == ("Success", "ok\n")
        assert time.monotonic() - started > 3  # longer than the execution timeout alone

    def test_a_retry_cancels_the_earlier_attempt_before_sending_again(self, running_instance, emulator_env):
        # run_chunks' first try sent the CLI install, then its worker died (or gave up waiting) with it still running.
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        ours, theirs = (command_comment(token, "install AWS CLI") for token in ("0123456789abcdef", "fedcba9876543210"))
        first, other_run = (
            send_command(ssm, running_instance, "sleep 60", comment=c, execution_timeout=120, delivery_timeout=30)
            for c in (ours, theirs)
        )
        deadline = time.monotonic() + 20
        while {get_invocation(ssm, c, running_instance)["Status"] for c in (first, other_run)} != {"InProgress"}:
            assert time.monotonic() < deadline
            time.sleep(0.2)

        try:
            invocation = run_and_wait(
                ssm, running_instance, "echo second try", comment=ours, timeout=30, poll_interval=1, delivery_timeout=30
            )
            statuses = [get_invocation(ssm, c, running_instance)["Status"] for c in (first, other_run)]
        finally:
            ssm.cancel_command(CommandId=other_run)

        assert invocation["StandardOutputContent"] == "second try\n"
        assert statuses == ["Cancelled", "InProgress"]  # another run's command is not this task's to cancel

    @pytest.mark.e2e
    @pytest.mark.parametrize(
        "error", ["InternalServerError", "ServiceUnavailable", "ThrottlingException", "connection_drop"]
    )
    def test_trigger_outlasts_transient_errors_while_the_command_runs(self, running_instance, emulator_env, error):
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        command_id = send_command(
            ssm, running_instance, "sleep 2; echo done", comment="t", execution_timeout=60, delivery_timeout=30
        )
        # Two polls' worth: the trigger's client tries each poll POLL_MAX_ATTEMPTS times before the loop sees an error.
        emulator_env.set_faults(
            {
                "instances": {
                    running_instance: {"invocation_read_errors": 2 * POLL_MAX_ATTEMPTS, "invocation_read_error": error}
                }
            }
        )
        emulator_env.reset_calls()
        command = {
            "command_id": command_id,
            "instance_id": running_instance,
            "deadline": time.time() + 60,
            "delivery_deadline": time.time() + 30,
        }

        (event,) = collect_events(SsmCommandsTrigger(commands=[command], poll_interval=0.5))

        assert (event["status"], [c["outcome"] for c in event["commands"]]) == ("ended", ["success"])
        assert event["transient_errors"] == {command_id: 2}
        reads = [c for c in emulator_env.calls() if c["action"] == "GetCommandInvocation"]
        assert len(reads) > 2 * POLL_MAX_ATTEMPTS  # every injected error was served over HTTP, then a real answer

    @pytest.mark.e2e
    def test_trigger_ends_at_once_on_an_error_no_retry_fixes(self, running_instance, emulator_env):
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        command_id = send_command(
            ssm, running_instance, "sleep 30", comment="t", execution_timeout=60, delivery_timeout=30
        )
        denied = {"invocation_read_errors": 1000, "invocation_read_error": "AccessDeniedException"}
        emulator_env.set_faults({"instances": {running_instance: denied}})
        command = {
            "command_id": command_id,
            "instance_id": running_instance,
            "deadline": time.time() + 60,
            "delivery_deadline": time.time() + 30,
        }
        started = time.monotonic()
        try:
            (event,) = collect_events(SsmCommandsTrigger(commands=[command], poll_interval=0.5))
        finally:
            emulator_env.set_faults({"instances": {running_instance: {"invocation_read_errors": 0}}})
            ssm.cancel_command(CommandId=command_id)

        assert event["status"] == "error"
        assert "AccessDeniedException" in event["message"] and command_id in event["message"]
        assert time.monotonic() - started < 5  # not after the command's 30 s, nor its 60 s deadline

    @pytest.mark.e2e
    def test_run_and_wait_outlasts_transient_errors_that_end_botocores_waiter(self, running_instance, emulator_env):
        ssm = boto_client("ssm", emulator_env.endpoint_url, Config(retries={"total_max_attempts": 1}))
        emulator_env.set_faults(
            {
                "instances": {
                    running_instance: {"invocation_read_errors": 3, "invocation_read_error": "ServiceUnavailable"}
                }
            }
        )

        invocation = run_and_wait(
            ssm, running_instance, "sleep 1; echo ok", comment="t", timeout=30, poll_interval=1, delivery_timeout=30
        )

        assert (invocation["Status"], invocation["StandardOutputContent"]) == ("Success", "ok\n")


class TestCompactState:
    """Between deferrals the trigger carries the live commands and the failed ones; succeeded chunks are counted."""

    def test_succeeded_chunks_are_counted_not_carried(self, monkeypatch):
        operator = chunks_operator(StubSsm(), 2, monkeypatch)
        sent = [sent_entry("c0", outcome="success", transient_errors=2), sent_entry("c1"), sent_entry("c2")]
        sent[2]["outcome"] = "failed"

        with pytest.raises(TaskDeferred) as deferred:
            operator._advance({"ti": RecordingTi(), "run_id": "r"}, sent)

        state = deferred.value.trigger.resume_state
        assert [entry["command_id"] for entry in state["entries"]] == ["c1", "c2"]
        assert (state["succeeded"], state["succeeded_transient_errors"]) == (1, 2)

    def test_a_state_from_before_it_was_compact_still_resumes(self, monkeypatch):
        operator = chunks_operator(StubSsm(), 1, monkeypatch)
        sent = [sent_entry("c0")]
        event = {
            "status": "ended",
            "commands": [{**sent[0], "outcome": "success", "invocation_status": "Success"}],
            "resume_state": sent,  # a list: a trigger deferred by the earlier version of the operator
        }

        assert operator.resume({"ti": RecordingTi()}, event)["outcomes"] == {"success": 1}
